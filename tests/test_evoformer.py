"""Evoformer attention modules (EvoformerAttention, MSARowAttentionWithPairBias, TriangleAttention)
against OpenFold's math written here in plain PyTorch, forward and backward.

The reference below reads the module's parameters by OpenFold's names (a state dict), builds the
attention with torch broadcasting (the pair bias as [*, 1, H, N, N], the key mask as
[*, 1, 1, N]), and uses -inf for masked keys with fully masked rows set to 0 (attnkit's rule;
`masking="openfold"` adds -1e9 instead, as OpenFold does). It runs on float64 copies, so a float32
module is compared with exact math and a float64 module with float64 math.

The triton cases run on the CPU only under TRITON_INTERPRET=1 (tiny shapes); the bf16 case at the
end needs a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from attnkit import (
    EvoformerAttention,
    MSARowAttentionWithPairBias,
    TriangleAttention,
    TriangleAttentionEndingNode,
    TriangleAttentionStartingNode,
)
from attnkit.modules import evoformer as evo_mod
from conftest import assert_close_rel, assert_close_tol as assert_close, rel_err

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]
BACKENDS = ["reference", "chunked", "auto"]
# relative (norm-wise) error bounds vs the float64 reference
FWD_TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: 5e-5, torch.float64: 1e-10}
# chunked vs unchunked runs of one module: identical math, only the call split differs
CHUNK_TOL = 1e-12


# ---------------------------------------------------------------------------
# OpenFold's math, written plainly (kept local on purpose)
# ---------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float64, gen=None, std=1.0) -> torch.Tensor:
    """Fresh standard-normal values (float64 draw, then cast)."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def safe_softmax(s: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim that gives 0 (not NaN) on rows that are entirely -inf."""
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den == 0, torch.ones_like(den), den)


def of_attention(p, pre, q_x, kv_x, *, H, C, biases=(), key_mask=None, masking="inf"):
    """OpenFold's primitives.Attention: q_x [*, Lq, c_q], kv_x [*, Lk, c_k]; biases broadcast to
    [*, H, Lq, Lk]; key_mask bool [*, Lk] (True = keep)."""

    def heads(t):  # [*, L, H * C] -> [*, H, L, C]
        return t.unflatten(-1, (H, C)).transpose(-2, -3)

    q = heads(q_x @ p[pre + "linear_q.weight"].T)
    k = heads(kv_x @ p[pre + "linear_k.weight"].T)
    v = heads(kv_x @ p[pre + "linear_v.weight"].T)
    a = (q @ k.transpose(-1, -2)) / math.sqrt(C)
    for b in biases:
        a = a + b
    if key_mask is not None:
        km = key_mask[..., None, None, :]
        if masking == "inf":
            a = a.masked_fill(~km, float("-inf"))
        else:  # OpenFold: inf * (mask - 1) with inf = 1e9
            a = a + 1e9 * (km.to(a.dtype) - 1)
    o = (safe_softmax(a) @ v).transpose(-2, -3).flatten(-2)  # [*, Lq, H * C]
    if pre + "linear_g.weight" in p:
        o = o * torch.sigmoid(q_x @ p[pre + "linear_g.weight"].T + p[pre + "linear_g.bias"])
    return o @ p[pre + "linear_o.weight"].T + p[pre + "linear_o.bias"]


def torch_layer_norm(x, w, b, eps=1e-5):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, eps)


def of_msa_row(p, m, z, mask, *, H, C, masking="inf", ln=layer_norm):
    """Algorithm 7: m [*, S, N, c_m], z [*, N, N, c_z], mask bool [*, S, N] or None."""
    m = ln(m, p["layer_norm_m.weight"], p["layer_norm_m.bias"])
    zb = ln(z, p["layer_norm_z.weight"], p["layer_norm_z.bias"]) @ p["linear_z.weight"].T
    pair = zb.permute(*range(zb.dim() - 3), -1, -3, -2).unsqueeze(-4)  # [*, 1, H, N, N]
    return of_attention(p, "mha.", m, m, H=H, C=C, biases=[pair], key_mask=mask, masking=masking)


def of_triangle(p, x, mask, *, H, C, starting, masking="inf"):
    """Algorithms 13/14: x [*, I, J, c_in], mask bool [*, I, J] or None."""
    if not starting:
        x = x.transpose(-2, -3)
        mask = None if mask is None else mask.transpose(-1, -2)
    x = layer_norm(x, p["layer_norm.weight"], p["layer_norm.bias"])
    tb = x @ p["linear.weight"].T  # [*, I, J, H]
    tri = tb.permute(*range(tb.dim() - 3), -1, -3, -2).unsqueeze(-4)  # [*, 1, H, I, J]
    out = of_attention(p, "mha.", x, x, H=H, C=C, biases=[tri], key_mask=mask, masking=masking)
    return out if starting else out.transpose(-2, -3)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Replace every parameter (OpenFold's zero / one inits included) by fresh random values of a
    sensible scale: LayerNorm weights near 1, linear weights ~ 1/sqrt(fan_in), biases ~ 0.3."""
    g = _gen(seed)
    with torch.no_grad():
        for name, prm in module.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                val = 1 + randn(*prm.shape, gen=g, std=0.2)
            elif prm.dim() == 2:
                val = randn(*prm.shape, gen=g, std=1.0 / math.sqrt(prm.shape[1]))
            else:
                val = randn(*prm.shape, gen=g, std=0.3)
            prm.copy_(val.to(prm.dtype))
    return module


def ref_params(module) -> dict:
    """float64 leaf copies of the module's parameters, keyed by their (OpenFold) names."""
    return {n: t.detach().double().clone().requires_grad_(True) for n, t in module.named_parameters()}


def msa_mask(batch, S, N, gen, dead_rows=True) -> torch.Tensor:
    """bool [*batch, S, N], ~70% kept, and (dead_rows) the last MSA row entirely masked."""
    mask = torch.rand(*batch, S, N, generator=gen) < 0.7
    mask[..., 0] = True  # keep every other row alive
    if dead_rows and S > 1:
        mask[..., -1, :] = False
    return mask


def pair_mask(batch, N, gen, dead_rows=True) -> torch.Tensor:
    """bool [*batch, N, N], ~70% kept, with row 1 entirely masked and column 2 too (so both the
    starting and the ending node see a key-less row)."""
    mask = torch.rand(*batch, N, N, generator=gen) < 0.7
    if dead_rows:
        mask[..., 1, :] = False
        mask[..., :, 2] = False
    return mask


def module_grads(module, inputs: dict) -> dict:
    """Gradients of the inputs, then of every parameter by name."""
    out = {n: t.grad for n, t in inputs.items()}
    out.update({n: p.grad for n, p in module.named_parameters()})
    return out


def check_module_vs_ref(module, run_module, run_ref, inputs: dict, dtype, g_out):
    """Forward and backward of the module (in dtype) against the float64 reference: out, input
    gradients and every parameter gradient."""
    mod_in = {n: t.detach().clone().to(dtype).requires_grad_(True) for n, t in inputs.items()}
    ref_in = {n: t.detach().clone().double().requires_grad_(True) for n, t in inputs.items()}
    p64 = ref_params(module)
    module.zero_grad(set_to_none=True)
    out = run_module(**mod_in)
    (out * g_out.to(dtype)).sum().backward()
    ref = run_ref(p64, **ref_in)
    (ref * g_out.double()).sum().backward()
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, FWD_TOL[dtype], name="out")
    got = module_grads(module, mod_in)
    want = {n: t.grad for n, t in ref_in.items()}
    want.update({n: t.grad for n, t in p64.items()})
    for n, r in want.items():
        assert got[n] is not None, f"no gradient reached {n}"
        assert torch.isfinite(got[n]).all(), f"grad {n}: non-finite values"
        assert_close(got[n], r, GRAD_TOL[dtype], name=f"grad {n}")
    return out


# ---------------------------------------------------------------------------
# MSA row attention with pair bias
# ---------------------------------------------------------------------------

C_M, C_Z, HEADS, C_HID = 16, 8, 3, 6  # c_hidden 6: a head dim that is no multiple of 8 or 16
# (batch dims, N_seq, N_res, masked?)
MSA_CASES = [
    pytest.param((), 1, 13, False, id="seq1-res13"),
    pytest.param((), 3, 37, True, id="seq3-res37-mask"),
    pytest.param((1,), 2, 13, True, id="b1-seq2-mask"),
    pytest.param((2,), 3, 13, True, id="b2-seq3-mask"),  # the per-batch-element loop
]


def _msa_inputs(batch, S, N, masked, seed=0):
    g = _gen(seed)
    inputs = {"m": randn(*batch, S, N, C_M, gen=g), "z": randn(*batch, N, N, C_Z, gen=g)}
    mask = msa_mask(batch, S, N, g) if masked else None
    g_out = randn(*batch, S, N, C_M, gen=g)
    return inputs, mask, g_out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,S,N,masked", MSA_CASES)
def test_msa_row_matches_openfold(batch, S, N, masked, dtype, backend):
    mod = randomize_(MSARowAttentionWithPairBias(C_M, C_Z, C_HID, HEADS, backend=backend), 1).to(dtype)
    inputs, mask, g_out = _msa_inputs(batch, S, N, masked)
    out = check_module_vs_ref(
        mod, lambda m, z: mod(m, z, mask=mask),
        lambda p, m, z: of_msa_row(p, m, z, mask, H=HEADS, C=C_HID), inputs, dtype, g_out,
    )
    if masked:  # the masked-out MSA row: attention 0, so the update is linear_o's bias
        dead = out[..., -1, :, :]
        assert torch.equal(dead, mod.mha.linear_o.bias.detach().expand_as(dead))


@pytest.mark.parametrize("backend", BACKENDS)
def test_msa_row_float_mask_is_openfold_mask(backend):
    """A 0/1 float mask (OpenFold's convention, 1 = keep) means the same as its bool."""
    mod = randomize_(MSARowAttentionWithPairBias(C_M, C_Z, C_HID, HEADS, backend=backend), 2).double()
    inputs, mask, _ = _msa_inputs((), 3, 13, True, seed=3)
    with torch.no_grad():
        a = mod(inputs["m"], inputs["z"], mask=mask)
        b = mod(inputs["m"], inputs["z"], mask=mask.double())
        c = mod(inputs["m"], inputs["z"], mask=mask.to(torch.int64))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_msa_row_differs_from_openfold_only_on_fully_masked_rows():
    """OpenFold's -1e9 and attnkit's -inf agree wherever a row keeps a key; a row without any
    key averages the values uniformly in OpenFold and gives attention 0 here."""
    mod = randomize_(MSARowAttentionWithPairBias(C_M, C_Z, C_HID, HEADS, backend="reference"), 4).double()
    inputs, mask, _ = _msa_inputs((), 3, 13, True, seed=5)
    p = ref_params(mod)
    with torch.no_grad():
        ours = mod(inputs["m"], inputs["z"], mask=mask)
        of = of_msa_row(p, inputs["m"], inputs["z"], mask, H=HEADS, C=C_HID, masking="openfold")
    assert_close(ours[:-1], of[:-1], 1e-10, name="rows with a kept key")
    assert rel_err(ours[-1], of[-1]) > 1e-2, "the fully masked row should differ from OpenFold's average"


# ---------------------------------------------------------------------------
# triangle attention
# ---------------------------------------------------------------------------

C_IN = 12
TRI_CASES = [
    pytest.param((), 13, False, id="res13"),
    pytest.param((), 13, True, id="res13-mask"),
    pytest.param((2,), 11, True, id="b2-res11-mask"),
]


def _tri_inputs(batch, N, masked, seed=0):
    g = _gen(seed)
    inputs = {"x": randn(*batch, N, N, C_IN, gen=g)}
    mask = pair_mask(batch, N, g) if masked else None
    g_out = randn(*batch, N, N, C_IN, gen=g)
    return inputs, mask, g_out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("starting", [True, False], ids=["starting", "ending"])
@pytest.mark.parametrize("batch,N,masked", TRI_CASES)
def test_triangle_matches_openfold(batch, N, masked, starting, dtype, backend):
    cls = TriangleAttentionStartingNode if starting else TriangleAttentionEndingNode
    mod = randomize_(cls(C_IN, C_HID, HEADS, backend=backend), 6).to(dtype)
    assert isinstance(mod, TriangleAttention) and mod.starting is starting
    inputs, mask, g_out = _tri_inputs(batch, N, masked)
    out = check_module_vs_ref(
        mod, lambda x: mod(x, mask=mask),
        lambda p, x: of_triangle(p, x, mask, H=HEADS, C=C_HID, starting=starting), inputs, dtype, g_out,
    )
    if masked:  # starting: row 1 of x has no key; ending: column 2 of x has none
        dead = out[..., 1, :, :] if starting else out[..., :, 2, :]
        assert torch.equal(dead, mod.mha.linear_o.bias.detach().expand_as(dead))


def test_triangle_alias_equals_flag():
    a = TriangleAttentionEndingNode(C_IN, C_HID, HEADS)
    b = TriangleAttention(C_IN, C_HID, HEADS, starting=False)
    b.load_state_dict(randomize_(a, 7).state_dict())
    x = randn(9, 9, C_IN, gen=_gen(8), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


# ---------------------------------------------------------------------------
# EvoformerAttention on its own: cross attention, full-rank masks and biases, gating off
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS + ["triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gating", [True, False], ids=["gated", "ungated"])
def test_evoformer_attention_cross_full_bias(gating, dtype, backend):
    """q_x [2, 3, 7, c_q] attends kv_x [2, 3, 13, c_k]; a full per-row bias [2, 3, H, 7, 13] and a
    mask of the rank of [*, H, Lq, Lk] broadcast over heads, with some query rows fully masked."""
    if backend == "triton" and (not TRITON_INTERPRET or dtype == torch.float64):
        pytest.skip("triton: float32 and (on the CPU) TRITON_INTERPRET=1 only")
    c_q, c_k, H, C = 10, 14, 2, 5
    mod = randomize_(EvoformerAttention(c_q, c_k, c_k, C, H, gating=gating, backend=backend), 9).to(dtype)
    assert (mod.linear_g is None) != gating
    g = _gen(10)
    inputs = {"q_x": randn(2, 3, 7, c_q, gen=g), "kv_x": randn(2, 3, 13, c_k, gen=g),
              "bias": randn(2, 3, H, 7, 13, gen=g)}
    mask = torch.rand(2, 3, 1, 7, 13, generator=g) < 0.6
    mask[0, 1, 0, 4] = False  # one query with no key
    g_out = randn(2, 3, 7, c_q, gen=g)

    def ref(p, q_x, kv_x, bias):
        keep = mask.expand(2, 3, H, 7, 13)
        return of_attention({"mha." + n: t for n, t in p.items()}, "mha.", q_x, kv_x, H=H, C=C,
                            biases=[bias.masked_fill(~keep, float("-inf"))])

    check_module_vs_ref(mod, lambda q_x, kv_x, bias: mod(q_x, kv_x, mask=mask, bias=bias), ref, inputs, dtype,
                        g_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_evoformer_attention_loops_over_two_outer_dims(backend):
    """lead [2, 3, 4] with a bias per (dim 0, dim 1) row, broadcast over dim 2, and a mask per
    (dim 0, dim 2): the module loops over the outer [2, 3] (a bias read per outer index, in
    row-major order) and batches the inner 4; outputs and the bias gradient land on their rows."""
    c, H, C = 6, 2, 3
    mod = randomize_(EvoformerAttention(c, c, c, C, H, backend=backend), 13).double()
    g = _gen(14)
    inputs = {"q_x": randn(2, 3, 4, 5, c, gen=g), "kv_x": randn(2, 3, 4, 7, c, gen=g),
              "bias": randn(2, 3, 1, H, 5, 7, gen=g)}
    mask = torch.rand(2, 1, 4, 1, 5, 7, generator=g) < 0.7
    g_out = randn(2, 3, 4, 5, c, gen=g)

    def ref(p, q_x, kv_x, bias):
        keep = mask.expand(2, 3, 4, H, 5, 7)
        return of_attention({"mha." + n: t for n, t in p.items()}, "mha.", q_x, kv_x, H=H, C=C,
                            biases=[bias.expand(2, 3, 4, H, 5, 7).masked_fill(~keep, float("-inf"))])

    calls = []
    real = evo_mod.attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(evo_mod, "attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        check_module_vs_ref(mod, lambda q_x, kv_x, bias: mod(q_x, kv_x, mask=mask, bias=bias), ref, inputs,
                            torch.float64, g_out)
    assert len(calls) >= 6  # the outer [2, 3] is looped over (not flattened into one call)


def test_evoformer_attention_key_mask_and_lower_rank_bias():
    """A key mask [*, Lk] and a bias [H, Lq, Lk] broadcast over the leading dims (torch rules)."""
    H, C = 2, 4
    mod = randomize_(EvoformerAttention(8, 8, 8, C, H), 11).double()
    g = _gen(12)
    x = randn(3, 5, 9, 8, gen=g)
    bias = randn(H, 9, 9, gen=g)
    key_mask = torch.rand(3, 5, 9, generator=g) < 0.6
    p = {"mha." + n: t for n, t in ref_params(mod).items()}
    with torch.no_grad():
        out = mod(x, x, mask=key_mask, bias=bias)
        ref = of_attention(p, "mha.", x, x, H=H, C=C, biases=[bias], key_mask=key_mask)
    assert_close(out, ref, 1e-10)


# ---------------------------------------------------------------------------
# chunk_size: any chunking gives the unchunked result; the number of contract calls
# ---------------------------------------------------------------------------


def _spy(monkeypatch) -> list:
    """Record every contract call the modules make (q's shape, the bias and mask passed)."""
    calls = []
    real = evo_mod.attention

    def spy(q, k, v, **kw):
        calls.append({"q": tuple(q.shape), "bias": kw.get("bias"), "mask": kw.get("mask"),
                      "backend": kw.get("backend")})
        return real(q, k, v, **kw)

    monkeypatch.setattr(evo_mod, "attention", spy)
    return calls


def _fwd_bwd(mod, args: dict, g_out, **kw):
    leaves = {n: t.detach().clone().requires_grad_(True) for n, t in args.items()}
    mod.zero_grad(set_to_none=True)
    out = mod(*leaves.values(), **kw)
    (out * g_out).sum().backward()
    grads = module_grads(mod, leaves)
    return out.detach(), grads


@pytest.mark.parametrize("batch,S", [((), 5), ((2,), 5)], ids=["seq5", "b2-seq5"])
@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_msa_row_chunk_sizes_agree(batch, S, backend, monkeypatch):
    N = 13
    mod = randomize_(MSARowAttentionWithPairBias(C_M, C_Z, C_HID, HEADS, backend=backend), 13).double()
    inputs, mask, g_out = _msa_inputs(batch, S, N, True, seed=14)
    calls = _spy(monkeypatch)
    nb = math.prod(batch)
    base, base_g = _fwd_bwd(mod, inputs, g_out, mask=mask)
    assert len(calls) == nb  # one call (per batch element)
    for chunk in (1, 3, 5, 64):
        calls.clear()
        out, grads = _fwd_bwd(mod, inputs, g_out, mask=mask, chunk_size=chunk)
        assert len(calls) == nb * math.ceil(S / chunk), f"chunk_size={chunk}: {len(calls)} contract calls"
        assert all(c["q"][0] <= chunk for c in calls)
        assert_close(out, base, CHUNK_TOL, name=f"out (chunk_size={chunk})")
        for n, gr in base_g.items():
            assert_close(grads[n], gr, CHUNK_TOL, name=f"grad {n} (chunk_size={chunk})")


@pytest.mark.parametrize("starting", [True, False], ids=["starting", "ending"])
def test_triangle_chunk_sizes_agree(starting, monkeypatch):
    N = 11
    mod = randomize_(TriangleAttention(C_IN, C_HID, HEADS, starting=starting, backend="chunked"), 15).double()
    inputs, mask, g_out = _tri_inputs((), N, True, seed=16)
    calls = _spy(monkeypatch)
    base, base_g = _fwd_bwd(mod, inputs, g_out, mask=mask)
    assert len(calls) == 1
    for chunk in (1, 3):
        calls.clear()
        out, grads = _fwd_bwd(mod, inputs, g_out, mask=mask, chunk_size=chunk)
        assert len(calls) == math.ceil(N / chunk)
        assert_close(out, base, CHUNK_TOL, name=f"out (chunk_size={chunk})")
        for n, gr in base_g.items():
            assert_close(grads[n], gr, CHUNK_TOL, name=f"grad {n} (chunk_size={chunk})")


# ---------------------------------------------------------------------------
# the pair bias reaches the contract broadcast over the rows, never copied per row
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [(), (1,), (2,)], ids=["nobatch", "b1", "b2"])
def test_msa_pair_bias_not_materialised(batch, monkeypatch):
    S, N = 4, 13
    mod = randomize_(MSARowAttentionWithPairBias(C_M, C_Z, C_HID, HEADS, backend="chunked"), 17)
    inputs, mask, g_out = _msa_inputs(batch, S, N, True, seed=18)
    calls = _spy(monkeypatch)
    m = inputs["m"].float().requires_grad_(True)
    z = inputs["z"].float().requires_grad_(True)
    mod(m, z, mask=mask).backward(g_out.float())
    assert len(calls) == max(1, math.prod(batch))
    for c in calls:
        b = c["bias"]
        assert c["q"] == (S, HEADS, N, C_HID)  # the MSA rows are the contract's batch
        assert b.shape == (1, HEADS, N, N), f"pair bias reached the contract as {tuple(b.shape)}"
        assert b.requires_grad, "the pair bias must carry its gradient to z"
        assert c["mask"].shape == (S, 1, 1, N)
        assert c["backend"] == "chunked"
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_triangle_bias_not_materialised(monkeypatch):
    N = 11
    mod = randomize_(TriangleAttentionEndingNode(C_IN, C_HID, HEADS), 19)
    calls = _spy(monkeypatch)
    x = randn(N, N, C_IN, gen=_gen(20), dtype=torch.float32)
    mod(x, mask=pair_mask((), N, _gen(21)))
    (c,) = calls
    assert c["bias"].shape == (1, HEADS, N, N) and c["q"] == (N, HEADS, N, C_HID)
    assert c["backend"] == "auto"  # backend=None means the dispatcher


def test_expanded_bias_stays_broadcast(monkeypatch):
    """A bias the caller expanded over the leading dims (stride 0) is passed with size 1 there."""
    H, C, S, L = 2, 4, 6, 9
    mod = randomize_(EvoformerAttention(8, 8, 8, C, H, backend="reference"), 22).double()
    g = _gen(23)
    x = randn(S, L, 8, gen=g)
    bias = randn(1, H, L, L, gen=g)
    calls = _spy(monkeypatch)
    with torch.no_grad():
        a = mod(x, x, bias=bias.expand(S, H, L, L))
        b = mod(x, x, bias=bias)
    assert [tuple(c["bias"].shape) for c in calls] == [(1, H, L, L)] * 2
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["leaf", "retain_grad"])
def test_expanded_bias_whose_grad_is_read_gets_per_element_gradients(kind):
    """An expanded bias that is itself a leaf (or retains its grad) is not narrowed: each of its
    elements gets its own gradient, as in plain torch (narrowing put all of it in slot 0)."""
    H, C, S, L = 2, 4, 5, 7
    mod = randomize_(EvoformerAttention(8, 8, 8, C, H, backend="reference"), 24).double()
    g = _gen(25)
    x, g_out = randn(S, L, 8, gen=g), randn(S, L, 8, gen=g)
    base = randn(1, H, L, L, gen=g)
    if kind == "leaf":
        bias = base.expand(S, H, L, L).detach().requires_grad_(True)
    else:
        bias = base.requires_grad_(True).expand(S, H, L, L)
        bias.retain_grad()
    mod(x, x, bias=bias).backward(g_out)
    want = bias.detach().clone().requires_grad_(True)  # the same values, materialised
    mod(x, x, bias=want).backward(g_out)
    assert_close_rel(bias.grad, want.grad, rtol=1e-10, name="bias.grad")
    assert bias.grad[1:].abs().sum() > 0  # not all in slot 0


def test_empty_msa_keeps_shapes():
    mod = randomize_(MSARowAttentionWithPairBias(C_M, C_Z, C_HID, HEADS), 36)
    out = mod(torch.randn(2, 0, 7, C_M), torch.randn(2, 7, 7, C_Z), chunk_size=3)
    assert out.shape == (2, 0, 7, C_M)
    assert mod(torch.randn(0, 7, C_M), torch.randn(7, 7, C_Z)).shape == (0, 7, C_M)


# ---------------------------------------------------------------------------
# OpenFold state dicts and inits
# ---------------------------------------------------------------------------

MHA_KEYS = {
    "mha.linear_q.weight", "mha.linear_k.weight", "mha.linear_v.weight",
    "mha.linear_g.weight", "mha.linear_g.bias", "mha.linear_o.weight", "mha.linear_o.bias",
}


def _openfold_state(shapes: dict, seed: int) -> dict:
    g = _gen(seed)
    return {n: randn(*s, gen=g, std=1.0 / math.sqrt(s[-1]) if len(s) == 2 else 0.3).float()
            for n, s in shapes.items()}


def test_msa_row_loads_openfold_state_dict():
    H, C, hc = 4, 8, 32
    shapes = {
        "layer_norm_m.weight": (C_M,), "layer_norm_m.bias": (C_M,),
        "layer_norm_z.weight": (C_Z,), "layer_norm_z.bias": (C_Z,),
        "linear_z.weight": (H, C_Z),
        "mha.linear_q.weight": (hc, C_M), "mha.linear_k.weight": (hc, C_M), "mha.linear_v.weight": (hc, C_M),
        "mha.linear_g.weight": (hc, C_M), "mha.linear_g.bias": (hc,),
        "mha.linear_o.weight": (C_M, hc), "mha.linear_o.bias": (C_M,),
    }
    state = _openfold_state(shapes, 24)
    mod = MSARowAttentionWithPairBias(C_M, C_Z, C, H)
    assert set(mod.state_dict()) == set(shapes)
    mod.load_state_dict(state, strict=True)
    g = _gen(25)
    m, z = randn(3, 13, C_M, gen=g, dtype=torch.float32), randn(13, 13, C_Z, gen=g, dtype=torch.float32)
    mask = msa_mask((), 3, 13, g)
    with torch.no_grad():
        out = mod(m, z, mask=mask)
    p = {n: t.double() for n, t in state.items()}
    assert_close(out, of_msa_row(p, m.double(), z.double(), mask, H=H, C=C), FWD_TOL[torch.float32])


def test_triangle_loads_openfold_state_dict():
    H, C, hc = 2, 8, 16
    shapes = {
        "layer_norm.weight": (C_IN,), "layer_norm.bias": (C_IN,), "linear.weight": (H, C_IN),
        "mha.linear_q.weight": (hc, C_IN), "mha.linear_k.weight": (hc, C_IN), "mha.linear_v.weight": (hc, C_IN),
        "mha.linear_g.weight": (hc, C_IN), "mha.linear_g.bias": (hc,),
        "mha.linear_o.weight": (C_IN, hc), "mha.linear_o.bias": (C_IN,),
    }
    state = _openfold_state(shapes, 26)
    for starting in (True, False):
        mod = TriangleAttention(C_IN, C, H, starting=starting)
        assert set(mod.state_dict()) == set(shapes)
        mod.load_state_dict(state, strict=True)
        x = randn(9, 9, C_IN, gen=_gen(27), dtype=torch.float32)
        with torch.no_grad():
            out = mod(x)
        p = {n: t.double() for n, t in state.items()}
        assert_close(out, of_triangle(p, x.double(), None, H=H, C=C, starting=starting), FWD_TOL[torch.float32])


def test_openfold_inits():
    """gating init (weight 0, bias 1), final init of linear_o (0): a fresh update is exactly 0."""
    mod = MSARowAttentionWithPairBias(C_M, C_Z, C_HID, HEADS)
    a = mod.mha
    assert torch.equal(a.linear_g.weight, torch.zeros_like(a.linear_g.weight))
    assert torch.equal(a.linear_g.bias, torch.ones_like(a.linear_g.bias))
    assert not a.linear_o.weight.any() and not a.linear_o.bias.any()
    assert a.linear_q.bias is None and a.linear_k.bias is None and a.linear_v.bias is None
    assert mod.linear_z.bias is None and a.no_heads == HEADS and mod.no_heads == HEADS
    g = _gen(28)
    out = mod(randn(2, 7, C_M, gen=g, dtype=torch.float32), randn(7, 7, C_Z, gen=g, dtype=torch.float32))
    assert not out.any()
    ungated = EvoformerAttention(8, 8, 8, 4, 2, gating=False)
    assert ungated.linear_g is None and "linear_g.weight" not in ungated.state_dict()


def test_backend_attribute_reaches_the_contract(monkeypatch):
    mod = randomize_(MSARowAttentionWithPairBias(C_M, C_Z, C_HID, HEADS), 29)
    calls = _spy(monkeypatch)
    m, z = randn(2, 7, C_M, dtype=torch.float32), randn(7, 7, C_Z, dtype=torch.float32)
    mod.backend = "reference"
    assert mod.mha.backend == "reference"
    mod(m, z)
    mod.backend = None
    mod(m, z)
    assert [c["backend"] for c in calls] == ["reference", "auto"]
    with pytest.raises(ValueError, match="nope"):
        mod.backend = "nope"


# ---------------------------------------------------------------------------
# bad input: the error names the argument, what was seen and what was expected
# ---------------------------------------------------------------------------


def _msa():
    return MSARowAttentionWithPairBias(C_M, C_Z, C_HID, HEADS)


def _m(*shape):
    return torch.randn(*shape)


ERRORS = [
    ("m c_m", lambda: _msa()(_m(3, 13, C_M + 1), _m(13, 13, C_Z)), ValueError, ["m", f"c_m={C_M}", "17"]),
    ("m rank", lambda: _msa()(_m(13, C_M), _m(13, 13, C_Z)), ValueError, ["m", "N_seq"]),
    ("z c_z", lambda: _msa()(_m(3, 13, C_M), _m(13, 13, C_Z + 2)), ValueError, ["z", "c_z", "[13, 13, 10]"]),
    ("z N_res", lambda: _msa()(_m(3, 13, C_M), _m(12, 12, C_Z)), ValueError, ["z", "[13, 13, 8]", "[12, 12, 8]"]),
    ("z batch", lambda: _msa()(_m(2, 3, 13, C_M), _m(13, 13, C_Z)), ValueError, ["z", "[2, 13, 13, 8]"]),
    ("msa mask shape", lambda: _msa()(_m(3, 13, C_M), _m(13, 13, C_Z), mask=torch.ones(3, 12, dtype=torch.bool)),
     ValueError, ["mask", "[3, 13]", "[3, 12]"]),
    ("msa mask rank", lambda: _msa()(_m(3, 13, C_M), _m(13, 13, C_Z), mask=torch.ones(13, dtype=torch.bool)),
     ValueError, ["mask", "[13]"]),
    ("chunk 0", lambda: _msa()(_m(3, 13, C_M), _m(13, 13, C_Z), chunk_size=0), ValueError, ["chunk_size", "0"]),
    ("chunk float", lambda: _msa()(_m(3, 13, C_M), _m(13, 13, C_Z), chunk_size=2.0), TypeError,
     ["chunk_size", "float"]),
    ("chunk bool", lambda: _msa()(_m(3, 13, C_M), _m(13, 13, C_Z), chunk_size=True), TypeError, ["chunk_size"]),
    ("heads 0", lambda: MSARowAttentionWithPairBias(C_M, C_Z, C_HID, 0), ValueError, ["num_heads", "0"]),
    ("c_hidden 0", lambda: MSARowAttentionWithPairBias(C_M, C_Z, 0, 2), ValueError, ["c_hidden", "0"]),
    ("tri c_hidden", lambda: TriangleAttention(C_IN, -1, 2), ValueError, ["c_hidden", "-1"]),
    ("tri heads", lambda: TriangleAttentionStartingNode(C_IN, 4, 0), ValueError, ["num_heads"]),
    ("evo heads", lambda: EvoformerAttention(8, 8, 8, 4, 1.5), ValueError, ["num_heads", "1.5"]),
    ("evo c_v", lambda: EvoformerAttention(8, 8, 6, 4, 2), ValueError, ["c_v", "c_k"]),
    ("backend", lambda: EvoformerAttention(8, 8, 8, 4, 2, backend="nope"), ValueError, ["nope"]),
    ("tri not square", lambda: TriangleAttention(C_IN, 4, 2)(_m(5, 6, C_IN)), ValueError, ["x", "I == J", "[5, 6, 12]"]),
    ("tri c_in", lambda: TriangleAttention(C_IN, 4, 2)(_m(5, 5, 3)), ValueError, ["x", f"c_in={C_IN}"]),
    ("tri mask", lambda: TriangleAttention(C_IN, 4, 2)(_m(5, 5, C_IN), mask=torch.ones(5, 4)), ValueError,
     ["mask", "[5, 5]", "[5, 4]"]),
    ("tri chunk", lambda: TriangleAttention(C_IN, 4, 2)(_m(5, 5, C_IN), chunk_size=-3), ValueError, ["chunk_size", "-3"]),
    ("evo c_q", lambda: EvoformerAttention(8, 6, 6, 4, 2)(_m(5, 7), _m(5, 6)), ValueError, ["q_x", "c_q=8", "[5, 7]"]),
    ("evo c_k", lambda: EvoformerAttention(8, 6, 6, 4, 2)(_m(5, 8), _m(5, 7)), ValueError, ["kv_x", "c_k=6"]),
    ("evo lead", lambda: EvoformerAttention(8, 8, 8, 4, 2)(_m(2, 5, 8), _m(3, 5, 8)), ValueError,
     ["q_x", "kv_x", "[2, 5, 8]", "[3, 5, 8]"]),
    ("evo mask dtype", lambda: EvoformerAttention(8, 8, 8, 4, 2)(_m(5, 8), _m(5, 8), mask=torch.ones(5)),
     TypeError, ["mask", "bool", "float32"]),
    ("evo mask shape", lambda: EvoformerAttention(8, 8, 8, 4, 2)(_m(3, 5, 8), _m(3, 4, 8),
                                                                 mask=torch.ones(3, 5, dtype=torch.bool)),
     ValueError, ["mask", "[3, 4]", "[3, 5]"]),
    ("evo bias shape", lambda: EvoformerAttention(8, 8, 8, 4, 2)(_m(3, 5, 8), _m(3, 4, 8), bias=_m(3, 2, 5, 5)),
     ValueError, ["bias", "[3, 2, 5, 4]", "[3, 2, 5, 5]"]),
    ("evo bias rank", lambda: EvoformerAttention(8, 8, 8, 4, 2)(_m(5, 8), _m(5, 8), bias=_m(1, 1, 2, 5, 5)),
     ValueError, ["bias", "[2, 5, 5]"]),
    ("evo bias dtype", lambda: EvoformerAttention(8, 8, 8, 4, 2)(_m(5, 8), _m(5, 8), bias=torch.ones(5, dtype=torch.int64)),
     TypeError, ["bias", "int64"]),
]


@pytest.mark.parametrize("call,exc,words", [pytest.param(c, e, w, id=i) for i, c, e, w in ERRORS])
def test_errors_name_the_argument(call, exc, words):
    with pytest.raises(exc) as ei:
        call()
    msg = str(ei.value)
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"


# ---------------------------------------------------------------------------
# triton (CPU only under TRITON_INTERPRET=1: tiny shapes)
# ---------------------------------------------------------------------------

needs_interpreter = pytest.mark.skipif(
    not TRITON_INTERPRET, reason="the triton backend runs on the CPU only with TRITON_INTERPRET=1"
)
T_HEADS, T_HID = 2, 8


@needs_interpreter
@pytest.mark.parametrize("batch,S,N", [((), 2, 13), ((2,), 2, 11)], ids=["seq2-res13", "b2-seq2-res11"])
def test_msa_row_triton_interpreter(batch, S, N):
    mod = randomize_(MSARowAttentionWithPairBias(C_M, C_Z, T_HID, T_HEADS, backend="triton"), 30)
    g = _gen(31)
    inputs = {"m": randn(*batch, S, N, C_M, gen=g), "z": randn(*batch, N, N, C_Z, gen=g)}
    mask = msa_mask(batch, S, N, g)
    g_out = randn(*batch, S, N, C_M, gen=g)
    check_module_vs_ref(
        mod, lambda m, z: mod(m, z, mask=mask),
        lambda p, m, z: of_msa_row(p, m, z, mask, H=T_HEADS, C=T_HID), inputs, torch.float32, g_out,
    )


@needs_interpreter
@pytest.mark.parametrize("starting", [True, False], ids=["starting", "ending"])
def test_triangle_triton_interpreter(starting):
    N = 13
    mod = randomize_(TriangleAttention(C_IN, T_HID, T_HEADS, starting=starting, backend="triton"), 32)
    inputs, mask, g_out = _tri_inputs((), N, True, seed=33)
    check_module_vs_ref(
        mod, lambda x: mod(x, mask=mask, chunk_size=5),
        lambda p, x: of_triangle(p, x, mask, H=T_HEADS, C=T_HID, starting=starting), inputs, torch.float32, g_out,
    )


# ---------------------------------------------------------------------------
# CUDA, bf16, backend="auto" (runs on a GPU machine only)
# ---------------------------------------------------------------------------


@pytest.mark.cuda
def test_msa_row_bf16_cuda_auto():
    """bf16 on the dispatcher's choice vs the float64 module on the reference backend (same
    bf16-rounded weights and inputs): each error within 3x that of OpenFold's math done plainly in
    bf16 (+1e-4), forward and every gradient. layer_norm_z.bias gets a gradient that is exactly 0
    in exact math (a per-head constant shift of every logit row); there the bf16 noise is held to
    3x the plain bf16 math's noise (+1e-4) instead. The bf16 baseline uses torch's layer_norm, the
    op the module uses: its bf16 parameter gradients are noisier than a hand-written LayerNorm's,
    and the rule is about the attention, not about LayerNorm."""
    S, N, c_m, c_z, H, C = 8, 77, 64, 32, 4, 16
    mod = randomize_(MSARowAttentionWithPairBias(c_m, c_z, C, H, backend="auto"), 34).cuda().to(torch.bfloat16)
    ref_mod = MSARowAttentionWithPairBias(c_m, c_z, C, H, backend="reference").cuda().double()
    ref_mod.load_state_dict({n: t.double() for n, t in mod.state_dict().items()})
    g = _gen(35)
    m = randn(1, S, N, c_m, gen=g).to(torch.bfloat16).cuda()
    z = randn(1, N, N, c_z, gen=g).to(torch.bfloat16).cuda()
    mask = msa_mask((1,), S, N, g).cuda()
    g_out = randn(1, S, N, c_m, gen=g).cuda()

    def run(module, dtype):
        mm = m.to(dtype).clone().requires_grad_(True)
        zz = z.to(dtype).clone().requires_grad_(True)
        if module is None:  # OpenFold's math, plainly in dtype
            p = {n: t.detach().clone().requires_grad_(True) for n, t in mod.named_parameters()}
            out = of_msa_row(p, mm, zz, mask, H=H, C=C, ln=torch_layer_norm)
        else:
            module.zero_grad(set_to_none=True)
            p = dict(module.named_parameters())
            out = module(mm, zz, mask=mask)
        (out.double() * g_out).sum().backward()
        grads = {"m": mm.grad, "z": zz.grad}
        grads.update({n: t.grad for n, t in p.items()})
        return out.detach(), grads

    out, grads = run(mod, torch.bfloat16)
    ref, ref_g = run(ref_mod, torch.float64)
    base, base_g = run(None, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_close_rel(out, ref, rel_err(base, ref), name="out")
    for n, r in ref_g.items():
        assert grads[n] is not None and torch.isfinite(grads[n]).all(), f"grad {n}: missing or non-finite"
        rms = r.double().norm().item() / math.sqrt(r.numel())
        if rms < 1e-9:  # mathematically zero
            noise = grads[n].double().norm().item() / math.sqrt(r.numel())
            base_noise = base_g[n].double().norm().item() / math.sqrt(r.numel())
            assert noise <= 3 * base_noise + 1e-4, f"grad {n}: RMS {noise:.3e} vs plain bf16 {base_noise:.3e}"
            continue
        assert_close_rel(grads[n], r, rel_err(base_g[n], r), name=f"grad {n}")
