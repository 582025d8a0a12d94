"""Every backend against the float64 reference, forward and backward.

A backend that can serve a case (``backend.unsupported(req) is None``) must
match the oracle under the DESIGN's tolerance rule; one that cannot must
refuse when forced, with a ValueError that names the missing capability, and
its refusal must agree with the capabilities the DESIGN gives it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnkit
from attnkit.backends import ChunkedBackend
from attnkit.backends.base import ALL_FEATURES, Capabilities
from attnkit.request import build_request
from cases import (BY_NAME, CASE_IDS, CASES, REL_RADIUS, TRITON_INTERPRET, alibi_score_mod, dead_rows_mask_mod,
                   expected_missing, rel_table_build)
from conftest import (
    Case,
    allowed_pairs,
    assert_close_rel,
    attention_fn,
    case_kwargs,
    case_tensors,
    check_against_oracle,
    default_build,
    expect_refusal,
    grad_names,
    make_qkv,
    naive_attention,
    randn,
    rel_err,
)

# Backends run through attnkit.attention(backend=name), plus chunked with forced small tiles.
SMALL_TILES = {"chunked_8x16": (8, 16), "chunked_5x7": (5, 7)}
NAMED = ["reference", "chunked", "sdpa", "flex", "triton", "auto"]


def _resolve(name: str):
    if name in SMALL_TILES:
        bq, bk = SMALL_TILES[name]
        return "chunked", attention_fn(ChunkedBackend(block_q=bq, block_k=bk))
    return name, attention_fn(name)


def run_case(backend_name: str, case: Case, dtype, device, *, backward=True):
    """Compare with the oracle if the backend can serve, else check the refusal."""
    base_name, fn = _resolve(backend_name)
    t = case_tensors(case, dtype, device)
    names = grad_names(case, t) if backward else []
    for n in names:
        t[n].requires_grad_(True)
    kw = case_kwargs(case, t)
    with torch.set_grad_enabled(backward):
        req = build_request(t["q"], t["k"], t["v"], **kw)
        if base_name == "auto":
            chosen = attnkit.explain(t["q"], t["k"], t["v"], **kw).backend
            assert chosen != "reference", "auto picked the reference although chunked serves everything"
            base_name = chosen
        why = attnkit.get_backend(base_name).unsupported(req)
        words = expected_missing(base_name, case, torch.device(device).type, backward)
        if why is not None:
            assert words, f"{base_name} refuses a call the DESIGN says it serves: {why}"
            expect_refusal(base_name, t, kw, words)
            return None
    assert not words, f"{base_name} claims to serve a call lacking {words}"
    return check_against_oracle(fn, case, dtype, device, backward=backward)


# ---------------------------------------------------------------------------
# the CPU float32 matrix: every case x every backend, forward + backward
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", NAMED + list(SMALL_TILES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_float32(case, backend):
    run_case(backend, case, torch.float32, "cpu")


# A few small cases in bfloat16 on the CPU (flex: float32 only, see test_flex_cpu_forward).
BF16_CPU_CASES = ["dense", "gqa_2", "causal_lq_gt_lk", "bias_h_lq_lk", "mask_dead_rows", "sinks", "combo_llm",
                  "score_mod_learnable", "lk_1"]


@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_8x16", "sdpa"])
@pytest.mark.parametrize("case_name", BF16_CPU_CASES)
def test_cpu_bfloat16(case_name, backend):
    run_case(backend, BY_NAME[case_name], torch.bfloat16, "cpu")


@pytest.mark.parametrize("case_name", ["dense", "causal_lq_lt_lk", "bias_full", "mask_dead_rows"])
@pytest.mark.parametrize("backend", ["chunked_8x16", "sdpa"])
def test_cpu_float16(case_name, backend):
    run_case(backend, BY_NAME[case_name], torch.float16, "cpu")


# float64 is accepted by reference and chunked so that tests can build a double oracle.
@pytest.mark.parametrize("case_name", ["combo_llm", "combo_mods", "mask_dead_rows_bias"])
def test_chunked_float64_tight(case_name):
    check_against_oracle(attention_fn(ChunkedBackend(block_q=8, block_k=16)), BY_NAME[case_name],
                         torch.float64, "cpu", fwd_rtol=1e-12, grad_rtol=1e-11)


# ---------------------------------------------------------------------------
# the oracle itself against the contract written out by hand
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_matches_contract_text(case):
    """conftest.naive_attention (index arithmetic from the contract) vs reference, both float64."""

    def naive(q, k, v, **kw):
        return naive_attention(q, k, v, **kw)

    check_against_oracle(naive, case, torch.float64, "cpu", fwd_rtol=1e-12, grad_rtol=1e-11)


@pytest.mark.parametrize(
    "Lq,Lk,kw",
    [
        (6, 6, dict(causal=True)),
        (2, 5, dict(causal=True)),  # the smallest causal call that hides a key (sdpa: Lq > 1 gets a mask)
        (4, 9, dict(causal=True)),
        (9, 4, dict(causal=True)),
        (7, 11, dict(window=3)),
        (11, 7, dict(window=3)),
        (8, 12, dict(window=(2, 1))),
        (8, 12, dict(window=(0, 0))),
        (8, 12, dict(window=(-1, 1))),
        (8, 12, dict(window=(2, -1))),
        (8, 12, dict(window=(None, 2))),
        (12, 8, dict(causal=True, window=(3, 4))),
        (8, 12, dict(causal=True, window=4)),
    ],
    ids=lambda x: str(x).replace(" ", "") if isinstance(x, dict) else str(x),
)
@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_5x7", "sdpa"])
def test_which_keys_are_attended(backend, Lq, Lk, kw):
    """v = identity makes out the attention matrix: its support must be the contract's pairs."""
    _, fn = _resolve(backend)
    q, k, _ = make_qkv(1, 2, 2, Lq, Lk, 8, seed=3)
    v = torch.eye(Lk).expand(1, 2, Lk, Lk)
    p = fn(q, k, v, **kw)
    want = allowed_pairs(1, 2, Lq, Lk, causal=kw.get("causal", False), window=kw.get("window"))
    got = p > 0
    assert torch.equal(got, want), f"attended pairs differ:\n{got[0, 0].int()}\nexpected\n{want[0, 0].int()}"
    rows = want.any(-1, keepdim=True)
    sums = p.sum(-1, keepdim=True)
    assert torch.allclose(sums, rows.float(), atol=1e-6), "rows must sum to 1 (0 for empty rows)"


@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_8x16", "sdpa"])
def test_gqa_head_mapping(backend):
    """Query head h reads kv head h // (Hq // Hkv): compare with per-head MHA calls."""
    _, fn = _resolve(backend)
    q, k, v = make_qkv(2, 6, 2, 9, 14, 16, seed=5)
    out = fn(q, k, v, causal=True)
    g = 3
    for h in range(6):
        kv = h // g
        one = attnkit.attention(q[:, h:h + 1].double(), k[:, kv:kv + 1].double(), v[:, kv:kv + 1].double(),
                                causal=True, backend="reference")
        assert_close_rel(out[:, h:h + 1], one, name=f"head {h}")


# ---------------------------------------------------------------------------
# fully masked rows: exactly zero output, zero/finite gradients, lse -inf
# ---------------------------------------------------------------------------

# the four ways a row ends up with nothing to attend
DEAD = ["mask", "causal_lq_gt_lk", "mask_mod", "bias_neg_inf"]


def _dead_setup(kind, device):
    B, H, Lq, Lk, D = 2, 4, 20, 14, 16
    if kind == "causal_lq_gt_lk":
        Lk = 9
    q, k, v = make_qkv(B, H, 2, Lq, Lk, D, device=device, seed=11)
    kw = {}
    dead = torch.zeros(B, H, Lq, dtype=torch.bool)
    g = torch.Generator().manual_seed(12)
    if kind == "mask":
        m = torch.rand(B, H, Lq, Lk, generator=g) > 0.4
        m[:, :, 0] = True
        m[:, :, 4] = False
        m[1, 3, 7] = False
        kw["mask"] = m.to(device)
        dead[:, :, 4] = True
        dead[1, 3, 7] = True
    elif kind == "causal_lq_gt_lk":
        kw["causal"] = True
        dead[:, :, : Lq - Lk] = True
    elif kind == "mask_mod":
        kw["mask_mod"] = lambda b, h, i, j: ~((i == 2) | ((b == 1) & (h == 2) & (i == 9))) & (j >= 0)
        dead[:, :, 2] = True
        dead[1, 2, 9] = True
    elif kind == "bias_neg_inf":
        bias = torch.randn(B, H, Lq, Lk, generator=g)
        bias[:, :, 6] = float("-inf")
        bias[0, 1, 3] = float("-inf")
        kw["bias"] = bias.to(device).requires_grad_(True)
        dead[:, :, 6] = True
        dead[0, 1, 3] = True
    return q, k, v, kw, dead.to(device)


@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_5x7", "sdpa"])
@pytest.mark.parametrize("kind", DEAD)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fully_masked_rows(kind, backend, dtype, device):
    base, fn = _resolve(backend)
    q, k, v, kw, dead = _dead_setup(kind, device)
    q, k, v = (x.to(dtype).requires_grad_(True) for x in (q, k, v))
    if "bias" in kw:
        kw["bias"] = kw["bias"].detach().to(dtype).requires_grad_(True)
    out = fn(q, k, v, **kw)
    assert dead.any() and not dead.all()
    assert torch.all(out[dead] == 0), "a row with nothing to attend must output exactly 0"
    assert (out[~dead].abs().sum(-1) > 0).all(), "live rows must not be zero"
    g_out = randn(*out.shape, dtype=dtype, device=device, gen=torch.Generator().manual_seed(1))
    leaves = [q, k, v] + ([kw["bias"]] if "bias" in kw else [])
    grads = torch.autograd.grad((out * g_out).sum(), leaves)
    for name, gr in zip("qkvb", grads):
        assert torch.isfinite(gr).all(), f"non-finite grad of {name}"
    assert torch.all(grads[0][dead] == 0), "q rows that attend nothing must get exactly zero gradient"
    assert grads[0][~dead].abs().sum() > 0
    if "bias" in kw:
        assert torch.all(grads[3][dead] == 0), "bias rows of a dead query row must get zero gradient"
    # and it matches the oracle everywhere
    ref = attnkit.attention(*(x.detach().double() for x in (q, k, v)), backend="reference",
                            **{n: (x.detach().double() if n == "bias" else x) for n, x in kw.items()})
    base_err = None
    if dtype != torch.float32:
        base_err = rel_err(naive_attention(q.detach(), k.detach(), v.detach(),
                                           **{n: (x.detach() if torch.is_tensor(x) else x) for n, x in kw.items()}),
                           ref)
    assert_close_rel(out, ref, base_err)


@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_5x7"])
@pytest.mark.parametrize("kind", DEAD)
def test_fully_masked_rows_lse(kind, backend, device):
    _, fn = _resolve(backend)
    q, k, v, kw, dead = _dead_setup(kind, device)
    out, lse = fn(q, k, v, return_lse=True, **kw)
    assert lse.dtype == torch.float32
    assert torch.isneginf(lse[dead]).all(), "lse of a row with nothing to attend must be -inf"
    assert torch.isfinite(lse[~dead]).all()
    assert torch.all(out[dead] == 0)
    # with sinks the row still outputs 0, but its lse is the sink's logit
    sinks = torch.randn(q.shape[1], generator=torch.Generator().manual_seed(4)).to(device)
    out_s, lse_s = fn(q, k, v, return_lse=True, sinks=sinks, **kw)
    assert torch.all(out_s[dead] == 0)
    sink_b = sinks.view(1, -1, 1).expand_as(lse_s)
    assert torch.allclose(lse_s[dead], sink_b[dead], rtol=0, atol=1e-6)
    # the finite lse differentiated (a z-loss, a merge), with a head whose sink is -inf (none): no NaN
    sinks[0] = float("-inf")
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, sinks)]
    lkw = {n: (x.detach().clone().requires_grad_(True) if n == "bias" else x) for n, x in kw.items()}
    out_s, lse_s = fn(*leaves[:3], return_lse=True, sinks=leaves[3], **lkw)
    assert torch.all(out_s[dead] == 0) and not torch.isnan(lse_s).any()
    loss = out_s.sum() + torch.where(torch.isfinite(lse_s), lse_s, torch.zeros_like(lse_s)).sum()
    grads = torch.autograd.grad(loss, leaves + ([lkw["bias"]] if "bias" in lkw else []))
    for name, gr in zip(["q", "k", "v", "sinks", "bias"], grads):
        assert torch.isfinite(gr).all(), f"non-finite grad of {name}"


def test_dead_rows_with_sinks_gradients():
    """A dead row with sinks: out 0, lse = sink, d lse / d sink = 1, q/k/v untouched by it."""
    q, k, v = make_qkv(1, 2, 1, 6, 4, 8, seed=21)
    q.requires_grad_(True)
    sinks = torch.tensor([0.3, -0.7], requires_grad=True)
    for backend in ["reference", "chunked"] + (["triton"] if TRITON_INTERPRET else []):
        out, lse = attnkit.attention(q, k, v, causal=True, sinks=sinks, return_lse=True, backend=backend)
        # rows 0, 1 are dead (Lq - Lk = 2)
        gs, gq = torch.autograd.grad(lse[:, :, :2].sum(), [sinks, q])
        assert torch.allclose(gs, torch.tensor([2.0, 2.0])), (backend, gs)
        assert torch.all(gq == 0), backend


# ---------------------------------------------------------------------------
# non-contiguous inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_8x16", "sdpa"])
def test_noncontiguous_inputs(backend, device):
    _, fn = _resolve(backend)
    B, L, Lk, Hq, Hkv, D = 2, 19, 27, 4, 2, 24
    g = torch.Generator().manual_seed(8)
    q_bl = randn(B, L, Hq, D, gen=g, device=device)
    kv_bl = randn(B, Lk, 2, Hkv, D, gen=g, device=device)  # packed k/v, [B, L, 2, H, D]
    bias_t = randn(Hq, Lk, L, gen=g, device=device)  # stored transposed
    mask = (randn(B, 1, Lk, L, gen=g, device=device) > -1.0).transpose(-1, -2)  # non-contiguous mask too
    leaves = [q_bl.requires_grad_(True), kv_bl.requires_grad_(True), bias_t.requires_grad_(True)]
    q, k, v = q_bl.transpose(1, 2), kv_bl[:, :, 0].transpose(1, 2), kv_bl[:, :, 1].transpose(1, 2)
    bias = bias_t.transpose(-1, -2)
    assert not any(x.is_contiguous() for x in (q, k, v, bias, mask))
    out = fn(q, k, v, bias=bias, mask=mask, causal=True)
    g_out = randn(*out.shape, gen=g, device=device)
    grads = torch.autograd.grad((out * g_out).sum(), leaves)

    leaves64 = [x.detach().double().requires_grad_(True) for x in leaves]
    q6, kv6, b6 = leaves64
    ref = attnkit.attention(q6.transpose(1, 2).contiguous(), kv6[:, :, 0].transpose(1, 2).contiguous(),
                            kv6[:, :, 1].transpose(1, 2).contiguous(), bias=b6.transpose(-1, -2).contiguous(),
                            mask=mask.contiguous(), causal=True, backend="reference")
    refg = torch.autograd.grad((ref * g_out.double()).sum(), leaves64)
    assert_close_rel(out, ref)
    for n, a, r in zip(["q", "kv", "bias"], grads, refg):
        assert_close_rel(a, r, rtol=5e-5, name=f"grad {n}")


# ---------------------------------------------------------------------------
# gradient through lse alone; lse of a known case
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_5x7"])
def test_gradient_through_lse_only(backend, device):
    _, fn = _resolve(backend)
    q, k, v = make_qkv(2, 4, 2, 13, 21, 16, seed=31, device=device)
    bias = randn(4, 13, 21, gen=torch.Generator().manual_seed(32), device=device)
    sinks = randn(4, gen=torch.Generator().manual_seed(33), device=device)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, bias, sinks)]
    _, lse = fn(*leaves[:3], bias=leaves[3], sinks=leaves[4], causal=True, return_lse=True)
    w = torch.linspace(-1, 2, lse.numel(), device=device).view_as(lse)
    grads = torch.autograd.grad((lse * w).sum(), leaves, allow_unused=True)
    l64 = [x.detach().double().requires_grad_(True) for x in (q, k, v, bias, sinks)]
    _, lse64 = attnkit.attention(*l64[:3], bias=l64[3], sinks=l64[4], causal=True, return_lse=True,
                                 backend="reference")
    ref = torch.autograd.grad((lse64 * w.double()).sum(), l64, allow_unused=True)
    assert_close_rel(lse, lse64, name="lse")
    for n, a, r in zip("qkvbs", grads, ref):
        if r is None:  # v does not reach lse
            assert a is None or torch.all(a == 0), n
            continue
        assert a is not None, f"no grad for {n}"
        assert_close_rel(a, r, rtol=5e-5, name=f"grad {n}")


@pytest.mark.parametrize("wants", ["bias", "q_bias", "k_v", "v_sinks"])
@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_5x7", "sdpa", "triton"])
def test_gradients_of_some_inputs_only(backend, wants, device):
    """Only some inputs require grad (a frozen encoder's k/v, a learned bias alone): each backend must
    return exactly those gradients, right, and no gradient for the others. (Every other test sets
    requires_grad on every float input, so a wrong needs_input_grad index went unseen.)"""
    base_name, fn = _resolve(backend)
    if base_name == "triton" and device == "cpu" and not TRITON_INTERPRET:
        pytest.skip("the triton backend runs on the CPU only with TRITON_INTERPRET=1")
    g = torch.Generator().manual_seed(34)
    q, k, v = make_qkv(2, 4, 2, 11, 19, 16, seed=35, device=device)
    bias = randn(4, 11, 19, gen=g, device=device)
    sinks = randn(4, gen=g, device=device) if wants == "v_sinks" else None
    names = {"bias": ["b"], "q_bias": ["q", "b"], "k_v": ["k", "v"], "v_sinks": ["v", "s"]}[wants]  # the leaves
    inputs = dict(q=q, k=k, v=v, b=bias, s=sinks)
    if sinks is None:
        del inputs["s"]
    if base_name == "sdpa" and sinks is not None:
        pytest.skip("sdpa has no sinks")

    def run(dtype, which, name):
        ts = {n: t.detach().to(dtype).requires_grad_(n in names) for n, t in inputs.items()}
        out = (fn if which is None else attention_fn(which))(ts["q"], ts["k"], ts["v"], bias=ts["b"],
                                                             sinks=ts.get("s"), causal=True)
        g_out = torch.linspace(-1, 1, out.numel(), device=device, dtype=dtype).view_as(out)
        leaves = [ts[n] for n in names]
        grads = dict(zip(names, torch.autograd.grad((out * g_out).sum(), leaves)))
        assert all(ts[n].grad is None for n in ts), name
        return out, grads

    out, grads = run(torch.float32, None, backend)
    ref, ref_grads = run(torch.float64, "reference", "reference")
    assert_close_rel(out, ref)
    for n in names:
        assert grads[n] is not None and grads[n].shape == inputs[n].shape, n
        assert_close_rel(grads[n], ref_grads[n], rtol=5e-5, name=f"grad {n}")


LAST_DIM_LAYOUTS = {  # views whose last dim is not unit-stride, as the lse kernels get them
    "q_d_major": lambda q, k, v: (q.mT.contiguous().mT, k, v),
    "k_d_major": lambda q, k, v: (q, k.mT.contiguous().mT, v),
    "v_strided": lambda q, k, v: (q, k, torch.stack([v, v], -1).flatten(-2)[..., ::2]),
    "v_expanded_over_d": lambda q, k, v: (q, k, v[..., :1].expand_as(v)),
}


@pytest.mark.parametrize("lse", [False, True], ids=["out", "lse"])
def test_sdpa_runs_one_causal_query_without_a_mask(lse, device, monkeypatch):
    """A decode step (one query, bottom-right causal: every key visible) reaches SDPA as one plain call, not
    through a lower-right CausalBias or cut into pieces; out (and lse, and the gradients) as the reference."""
    from attnkit.backends import sdpa as sdpa_mod
    seen = []
    if lse:
        orig = sdpa_mod._LsePlan.__init__

        def spy(self, pieces, *a, **kw):
            seen.append(pieces)
            orig(self, pieces, *a, **kw)
        monkeypatch.setattr(sdpa_mod._LsePlan, "__init__", spy)
    else:
        orig = sdpa_mod.F.scaled_dot_product_attention

        def spy(*a, **kw):
            seen.append(kw)
            return orig(*a, **kw)
        monkeypatch.setattr(sdpa_mod.F, "scaled_dot_product_attention", spy)
    cpu = torch.device(device).type == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    q, k, v = make_qkv(2, 4, 2, 1, 37, 64, seed=35, device=device, dtype=dtype)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
    # (CUDA: no lse with gradients on sdpa)
    grads_too = not attnkit.get_backend("sdpa").unsupported(build_request(*leaves, causal=True, return_lse=lse))
    res = attnkit.attention(*(leaves if grads_too else (q, k, v)), causal=True, return_lse=lse, backend="sdpa")
    if lse:
        assert [(p.q0, p.q1, p.k0, p.k1, p.causal) for p in seen[0]] == [(0, 1, 0, 37, False)]
    else:
        assert len(seen) == 1 and seen[0].get("attn_mask") is None and not seen[0].get("is_causal", False)
    out, lse_ = res if lse else (res, None)
    l64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref, ref_lse = attnkit.attention(*l64, causal=True, return_lse=True, backend="reference")
    base = None if cpu else rel_err(naive_attention(q, k, v, causal=True), ref)
    assert_close_rel(out, ref, base)
    if lse:
        assert_close_rel(lse_, ref_lse, name="lse", rtol=1e-5 if cpu else 1e-2)
    if not grads_too:
        return
    w = torch.randn(out.shape, device=device, dtype=torch.float64)
    grads = torch.autograd.grad((out * w.to(dtype)).sum(), leaves)
    refg = torch.autograd.grad((ref * w).sum(), l64)
    plain = [x.detach().requires_grad_(True) for x in (q, k, v)]
    baseg = torch.autograd.grad((naive_attention(*plain, causal=True) * w.to(dtype)).sum(), plain)
    for n, a, r, b in zip("qkv", grads, refg, baseg):
        assert_close_rel(a, r, None if cpu else rel_err(b, r), rtol=5e-5, name=f"grad {n}")


def test_sdpa_puts_cudnn_first_for_a_bounded_number_of_shapes_per_family(monkeypatch):
    """cuDNN builds a graph per new shape (tens of ms): per family of calls (dtype, heads, head dims, kind) it
    goes first for the first CUDNN_GRAPHS_PER_FAMILY shapes (batch, lengths, strides) and for those again,
    never for the family's later shapes; other families have their own count."""
    from attnkit.backends import sdpa as sdpa_mod
    monkeypatch.setattr(sdpa_mod, "_CUDNN_GRAPHS", {})
    n = sdpa_mod.CUDNN_GRAPHS_PER_FAMILY
    buf_k, buf_v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    q = torch.randn(2, 8, 1, 16)
    first = sdpa_mod._cudnn_first
    kind = ("plain", False, False, False)
    assert [first(q, buf_k[:, :, :L], buf_v[:, :, :L], kind) for L in range(1, n + 3)] == [True] * n + [False] * 2
    assert first(q, buf_k[:, :, :1], buf_v[:, :, :1], kind)  # built: still first
    assert first(q, buf_k[:, :, :2].contiguous(), buf_v[:, :, :2].contiguous(), kind) is False  # other strides
    assert first(q[:1], buf_k[:1, :, :1], buf_v[:1, :, :1], kind) is False  # another batch: another shape
    assert first(q, buf_k[:, :, :n + 2], buf_v[:, :, :n + 2], ("lse", False, "forward"))  # another kind
    assert first(q.half(), buf_k[:, :, :n + 2].half(), buf_v[:, :, :n + 2].half(), kind)  # another dtype
    # past the cap: cuDNN after flash and efficient, before math (which would build [B, Hq, Lq, Lk] scores)
    if sdpa_mod._CUDA_NO_CUDNN._order is not None:
        names = {int(getattr(sdpa_mod.SDPBackend, m)): m for m in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION",
                                                                      "CUDNN_ATTENTION", "MATH")}
        assert [names.get(b) for b in sdpa_mod._CUDA_NO_CUDNN._order[:4]] == [
            "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    # the lse path: cuDNN moves behind flash for the family's later shapes
    tried = []

    def run(name):
        tried.append(name)
        return name
    monkeypatch.setattr(sdpa_mod, "lse_kernels", lambda *a, **kw: (sdpa_mod.CUDNN, sdpa_mod.FLASH))
    monkeypatch.setattr(sdpa_mod, "_CUDNN_GRAPHS", {})
    lse_kind = ("lse", False, "forward")
    for L in range(1, n + 2):
        sdpa_mod._try_kernels(q, buf_k[:, :, :L + 10], buf_v[:, :, :L + 10], False, "forward", run)
    assert tried == [sdpa_mod.CUDNN] * n + [sdpa_mod.FLASH]
    assert len(sdpa_mod._CUDNN_GRAPHS[next(f for f in sdpa_mod._CUDNN_GRAPHS if f[-1] == lse_kind)]) == n


@pytest.mark.cuda
def test_cuda_sdpa_decode_over_a_growing_cache_stops_building_cudnn_graphs(monkeypatch):
    """One query against a cache growing by a token per call on the sdpa backend (plain path and lse path):
    after CUDNN_GRAPHS_PER_FAMILY lengths cuDNN is put last (so no graph is built per step), and every step
    still matches the float64 reference."""
    from attnkit.backends import sdpa as sdpa_mod
    monkeypatch.setattr(sdpa_mod, "_CUDNN_GRAPHS", {})
    monkeypatch.setattr(sdpa_mod, "_BROKEN", set())
    entered = []
    orig_enter = sdpa_mod._CudaPriority.__enter__
    monkeypatch.setattr(sdpa_mod._CudaPriority, "__enter__",
                        lambda self: entered.append(self is sdpa_mod._CUDA_PRIORITY) or orig_enter(self))
    n = sdpa_mod.CUDNN_GRAPHS_PER_FAMILY
    q, buf_k, buf_v = make_qkv(2, 8, 2, 1, 3 * n, 64, seed=36, device="cuda", dtype=torch.bfloat16)
    cudnn_lse = sdpa_mod.lse_kernels(q, buf_k, buf_v)[:1] == (sdpa_mod.CUDNN,)
    for lse in (False, True):
        entered.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for L in range(n + 1, 3 * n + 1):
                k, v = buf_k[:, :, :L], buf_v[:, :, :L]
                with torch.no_grad():
                    res = attnkit.attention(q, k, v, causal=True, return_lse=lse, backend="sdpa")
                out = res[0] if lse else res
                ref = attnkit.attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
                assert_close_rel(out, ref, rel_err(naive_attention(q, k, v, causal=True), ref), name=f"L={L}")
        # the SDPA entry op only: some torch 2.11 builds also record an inner aten::_cudnn_attention_forward
        cudnn_calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_dot_product_cudnn_attention")
        assert cudnn_calls <= n, cudnn_calls  # at most n shapes ran cuDNN: at most n graphs built
        if not lse:  # the plain path: cuDNN first for the first n lengths, then after flash (set, not left to torch)
            assert entered == [True] * n + [False] * n
        elif cudnn_lse:  # (the lse path tries cuDNN first on this GPU: its family filled up)
            fam = [f for f in sdpa_mod._CUDNN_GRAPHS if f[-1][0] == "lse"]
            assert fam and all(len(sdpa_mod._CUDNN_GRAPHS[f]) == n for f in fam)


def test_sdpa_kernel_order_is_restored_after_calls_on_several_threads():
    """SDPA's kernel order is one setting of the process: attnkit's calls on several threads (DataParallel
    replicas, a threaded server) each see their own order inside the call and leave the order as it was."""
    import sys
    import threading
    from attnkit.backends import sdpa as sdpa_mod
    ctxs = (sdpa_mod._CUDA_PRIORITY, sdpa_mod._CUDA_NO_CUDNN)
    if any(c._order is None for c in ctxs):
        pytest.skip("this torch has no SDPA priority order")
    get, set_ = torch._C._get_sdp_priority_order, torch._C._set_sdp_priority_order
    original = list(get())
    seen = []

    def calls(ctx):
        for _ in range(300):
            with ctx:
                seen.append(list(get()) == ctx._order)
                with ctx:  # (nested: the inner exit restores the outer order)
                    pass
                seen.append(list(get()) == ctx._order)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the contexts too
    try:
        threads = [threading.Thread(target=calls, args=(c,)) for c in ctxs * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert list(get()) == original
        assert len(seen) == 4 * 600 and all(seen)
    finally:
        sys.setswitchinterval(old)
        set_(original)


@pytest.mark.parametrize("lse", [False, True], ids=["out", "lse"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("backend", ["chunked", "sdpa", "flex", "triton"])
def test_a_float32_bias_wider_than_half_inputs(backend, dtype, lse, device):
    """A float32 bias with half-precision q/k/v: values past float16's range (1e5 + noise, whose differences
    decide the softmax; float16 only: bfloat16 keeps float32's range but not its precision, and sdpa casts
    the mask to q's dtype) and HF-style finfo(float32).min key padding. Every backend adds it as the
    reference does (sdpa with float16 takes each row's largest value off before the cast); no NaN."""
    B, H, Lq, Lk, D = 2, 2, 9, 13, 16
    q, k, v = make_qkv(B, H, H, Lq, Lk, D, seed=37, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(38)
    big = (1e5 + 3 * torch.randn(B, 1, Lq, Lk, generator=g)).to(device)
    pad = (2 * torch.randn(1, H, Lq, Lk, generator=g)).to(device)
    pad[..., Lk - 4:] = torch.finfo(torch.float32).min
    # keys the mask hides carry a bias 5000 above the others: a row shift that counted them would leave
    # the visible values near -5000, where float16's spacing is 4
    hidden = (2 * torch.randn(1, H, Lq, Lk, generator=g)).to(device)
    hidden[..., 1::3] += 5000.0
    hide = (torch.arange(Lk, device=device) % 3 != 1).expand(1, 1, Lq, Lk)
    cases = (("big", big, None), ("hidden_big", hidden, hide)) if dtype == torch.float16 else ()
    for name, bias, mask in cases + (("padding", pad, None),):
        req = build_request(q, k, v, bias=bias, mask=mask, return_lse=lse)
        if attnkit.get_backend(backend).unsupported(req) is not None:
            continue
        res = attnkit.attention(q, k, v, bias=bias, mask=mask, return_lse=lse, backend=backend)
        out, out_lse = res if lse else (res, None)
        ref, ref_lse = attnkit.attention(q.double(), k.double(), v.double(), bias=bias.double(), mask=mask,
                                         return_lse=True, backend="reference")
        assert not out.isnan().any(), (name, backend)
        # plain math either way: in half precision after taking each row's largest allowed value off
        # (else it overflows), or with the scores in float32, as torch promotes half scores + a float32 bias
        seen = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        shifted = seen - seen.amax(-1, keepdim=True)
        f32 = naive_attention(q.float(), k.float(), v.float(), bias=seen).to(dtype)
        base = max(rel_err(naive_attention(q, k, v, bias=shifted), ref), rel_err(f32, ref))
        assert_close_rel(out, ref, base, name=f"{name} out")
        if lse:  # float32 lse of values ~1e5: its own float32 rounding (~1e-2 absolute) dominates
            torch.testing.assert_close(out_lse.double(), ref_lse, rtol=1e-6, atol=0.05, msg=f"{name} lse")


@pytest.mark.cuda
def test_cuda_auto_lse_inside_the_users_sdpa_kernel_context(monkeypatch):
    """auto chose sdpa for a return_lse call; the same call inside the user's sdpa_kernel([MATH]) (no
    lse-returning kernel enabled) goes to the next backend instead of raising (the settings are part of the
    signature), nothing of it stays once the context is left, and a kernel that breaks after the choice
    was cached falls back with a warning."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from attnkit import dispatch
    from attnkit.backends import sdpa as sdpa_mod
    monkeypatch.setattr(sdpa_mod, "_PROBES", {})
    dispatch.clear_cache()
    q, k, v = make_qkv(2, 4, 4, 64, 64, 64, seed=39, device="cuda", dtype=torch.bfloat16)
    ref, ref_lse = attnkit.attention(q.double(), k.double(), v.double(), causal=True, return_lse=True,
                                     backend="reference")
    base = rel_err(naive_attention(q, k, v, causal=True), ref)

    def runs_on():
        return dispatch.choose(build_request(q, k, v, causal=True, return_lse=True)).name

    with torch.no_grad():
        assert attnkit.explain(q, k, v, causal=True, return_lse=True).backend == "sdpa"
        outs = [attnkit.attention(q, k, v, causal=True, return_lse=True)]
        with sdpa_kernel([SDPBackend.MATH]):  # the settings are part of the signature: a choice of its own
            assert runs_on() != "sdpa"
            outs.append(attnkit.attention(q, k, v, causal=True, return_lse=True))
        assert runs_on() == "sdpa"  # and nothing of it stays behind
        # a choice cached before a kernel broke: the call falls back (a build error) and says so
        monkeypatch.setattr(sdpa_mod, "lse_kernels", lambda *a, **kw: ())
        with pytest.warns(RuntimeWarning, match="'sdpa' could not build"):
            outs.append(attnkit.attention(q, k, v, causal=True, return_lse=True))
    for out, lse in outs:
        assert_close_rel(out, ref, base)
        assert_close_rel(lse, ref_lse, name="lse", rtol=1e-2)
    dispatch.clear_cache()


@pytest.mark.parametrize("layout", list(LAST_DIM_LAYOUTS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_lse_path_reads_any_last_dim_stride(layout, causal, device):
    """sdpa's return_lse path calls torch's private kernels, which read rows as contiguous: inputs
    with a non-unit last-dim stride must reach them as copies (out, lse and grads as the reference)."""
    cpu = torch.device(device).type == "cpu"  # CUDA's lse kernels take half precision and D >= 16
    dtype, D = (torch.float32, 8) if cpu else (torch.bfloat16, 64)
    q, k, v = LAST_DIM_LAYOUTS[layout](*make_qkv(1, 2, 2, 16, 20, D, seed=34, device=device, dtype=dtype))
    assert any(t.stride(-1) != 1 for t in (q, k, v))
    l64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    ref, ref_lse = attnkit.attention(*l64, causal=causal, return_lse=True, backend="reference")
    out, lse = attnkit.attention(q, k, v, causal=causal, return_lse=True, backend="sdpa")
    base = None if cpu else rel_err(naive_attention(q, k, v, causal=causal), ref)
    assert_close_rel(out, ref, base)
    assert_close_rel(lse, ref_lse, name="lse", rtol=1e-5 if cpu else 1e-2)  # (the wrong rows were off by ~1)
    leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]  # same strides as the views
    if attnkit.get_backend("sdpa").unsupported(build_request(*leaves, causal=causal, return_lse=True)):
        return  # (CUDA: no float32 lse gradients on sdpa)
    out, lse = attnkit.attention(*leaves, causal=causal, return_lse=True, backend="sdpa")
    w = torch.linspace(-1, 2, lse.numel(), device=device).view_as(lse)
    grads = torch.autograd.grad(out.sum() + (lse * w).sum(), leaves)
    refg = torch.autograd.grad(ref.sum() + (ref_lse * w.double()).sum(), l64)
    for n, a, r in zip("qkv", grads, refg):
        assert_close_rel(a, r, rtol=5e-5, name=f"grad {n}")


@pytest.mark.parametrize("backend", ["reference", "chunked", "sdpa", "triton"])
def test_windows_wider_than_the_keys_are_unbounded(backend, device):
    """A window side of Lq + Lk keys or more excludes nothing: any int (2**31, 2**63 - 1 included)
    gives the unbounded result, with no int32 / int64 overflow on the way."""
    if backend == "triton" and device == "cpu" and not TRITON_INTERPRET:
        pytest.skip("the triton backend runs on the CPU only with TRITON_INTERPRET=1")
    q, k, v = make_qkv(1, 2, 2, 9, 14, 16, seed=35, device=device)
    causal = attnkit.attention(q, k, v, causal=True, backend="reference")
    dense = attnkit.attention(q, k, v, backend="reference")
    for w in (22, 23, 2**31 - 1, 2**31, 2**40, 2**63 - 1):
        assert_close_rel(attnkit.attention(q, k, v, window=w, backend=backend), causal)
        assert_close_rel(attnkit.attention(q, k, v, window=(w, w), backend=backend), dense)
    assert build_request(q, k, v, window=(23, 0)).window == (None, 0)  # Lq + Lk = 23
    assert build_request(q, k, v, window=(22, 0)).window == (22, 0)


def test_lse_value_by_hand():
    """lse of a tiny case computed with torch.logsumexp, sinks included."""
    q, k, v = make_qkv(1, 2, 2, 3, 5, 4, seed=41)
    sinks = torch.tensor([0.5, -1.0])
    s = (q @ k.transpose(-1, -2)) / 2.0
    want = torch.logsumexp(torch.cat([s, sinks.view(1, 2, 1, 1).expand(1, 2, 3, 1)], -1), -1)
    for backend in ["reference", "chunked"]:
        _, lse = attnkit.attention(q, k, v, sinks=sinks, return_lse=True, backend=backend)
        torch.testing.assert_close(lse, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# score_mod closing over a learnable tensor: its gradient reaches the caller
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_5x7"])
def test_score_mod_captured_tensor_gradient(backend, device):
    _, fn = _resolve(backend)
    q, k, v = make_qkv(2, 4, 2, 15, 22, 16, seed=51, device=device)
    q.requires_grad_(True)
    rel = randn(4, 2 * REL_RADIUS + 1, gen=torch.Generator().manual_seed(52), device=device).requires_grad_(True)
    out = fn(q, k, v, **{**rel_table_build({"rel": rel}), "causal": True})
    g_out = randn(*out.shape, gen=torch.Generator().manual_seed(53), device=device)
    (grad,) = torch.autograd.grad((out * g_out).sum(), [rel])
    rel64 = rel.detach().double().requires_grad_(True)
    ref = attnkit.attention(q.double(), k.double(), v.double(), **{**rel_table_build({"rel": rel64}), "causal": True},
                            backend="reference")
    (grad64,) = torch.autograd.grad((ref * g_out.double()).sum(), [rel64])
    assert grad.abs().sum() > 0
    assert_close_rel(grad, grad64, rtol=5e-5, name="grad rel")


class _Holder:
    pass


_GLOBAL_TABLE: dict = {}  # a mod's tensor reached through a module global: nothing can find it


def _attribute_mod():
    """A score_mod whose learnable tensor sits on an object attribute (not a closure cell)."""
    holder = _Holder()
    holder.t = torch.tensor([0.3, -0.2], requires_grad=True)

    def mod(s, b, h, i, j):
        return s + holder.t[h] * (i - j).to(s.dtype)

    return mod, holder.t


def _global_mod():
    t = _GLOBAL_TABLE["t"] = torch.tensor([0.3, -0.2], requires_grad=True)

    def mod(s, b, h, i, j):
        return s + _GLOBAL_TABLE["t"][h] * (i - j).to(s.dtype)

    return mod, t


def test_score_mod_tensor_on_an_attribute_gets_its_gradient_on_chunked():
    q, k, v = make_qkv(1, 2, 2, 5, 6, 8, seed=54)
    q.requires_grad_(True)
    mod, t = _attribute_mod()
    outs = [attnkit.attention(q, k, v, score_mod=mod, backend=b) for b in ("chunked", "reference")]
    grads = [torch.autograd.grad(o.pow(2).sum(), [q, t]) for o in outs]
    assert grads[1][1].abs().sum() > 0
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)


def test_score_mod_hidden_tensor_is_refused_by_chunked_and_auto_takes_reference():
    """A mod whose tensor requiring grad the chunked backend cannot find must not drop the gradient
    silently: forced chunked refuses the call, naming why; auto runs it where the gradient arrives."""
    q, k, v = make_qkv(1, 2, 2, 5, 6, 8, seed=54)
    q.requires_grad_(True)
    mod, t = _global_mod()
    with pytest.raises(ValueError, match="score_mod_grad_elsewhere"):
        attnkit.attention(q, k, v, score_mod=mod, backend="chunked")
    assert attnkit.explain(q, k, v, score_mod=mod).backend == "reference"
    outs = [attnkit.attention(q, k, v, score_mod=mod, backend=b) for b in ("auto", "reference")]
    grads = [torch.autograd.grad(o.pow(2).sum(), [q, t]) for o in outs]
    assert grads[1][1].abs().sum() > 0
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    with torch.no_grad():  # no gradient wanted: chunked serves it again
        assert attnkit.explain(q, k, v, score_mod=mod, backend="chunked").backend == "chunked"


_SHARED: dict = {}  # the other output of a node whose first output a mod captures


def test_score_mod_hidden_output_of_a_captured_node_gets_its_gradient():
    """a, b = x.unbind(0): the mod captures a in its closure and reads b from a global. Both are outputs of
    one autograd node; the gradient through b must not be lost (chunked routes a's only: auto takes reference)."""
    q, k, v = make_qkv(1, 2, 2, 5, 6, 8, seed=61)
    x = torch.tensor([[0.3, -0.2], [0.1, 0.4]], requires_grad=True)
    a, _SHARED["b"] = x.unbind(0)

    def mod(s, b_, h, i, j):
        return s + (a[h] + _SHARED["b"][h]) * (i - j).to(s.dtype)

    assert attnkit.explain(q, k, v, score_mod=mod).backend == "reference"
    (g,) = torch.autograd.grad(attnkit.attention(q, k, v, score_mod=mod).pow(2).sum(), [x])
    (want,) = torch.autograd.grad(attnkit.attention(q, k, v, score_mod=mod, backend="reference").pow(2).sum(), [x])
    assert want[1].abs().sum() > 0
    torch.testing.assert_close(g, want)


def test_score_mod_global_tensor_under_torch_compile():
    """torch.compile(fullgraph=True) traces a call whose mod reads a global tensor requiring grad (the
    request's gradient probe, which walks autograd nodes, stays out of the trace), and the gradient arrives."""
    q, k, v = make_qkv(1, 2, 2, 5, 6, 8, seed=59)
    mod, t = _global_mod()
    f = torch.compile(lambda q, k, v: attnkit.attention(q, k, v, score_mod=mod, backend="reference"),
                      backend="eager", fullgraph=True)
    (g,) = torch.autograd.grad(f(q, k, v).pow(2).sum(), [t])
    (want,) = torch.autograd.grad(attnkit.attention(q, k, v, score_mod=mod, backend="reference").pow(2).sum(), [t])
    torch.testing.assert_close(g, want)
    assert want.abs().sum() > 0


@pytest.mark.parametrize("make", [_attribute_mod, _global_mod], ids=["attribute", "global"])
def test_score_mod_tensor_gradient_under_torch_compile_on_auto(make):
    """auto under torch.compile (graph breaks allowed): the mod's tensor gets its gradient (chunked's Function
    lost it there, silently), and q's gradient is right."""
    q, k, v = make_qkv(1, 2, 2, 5, 6, 8, seed=60)
    q.requires_grad_(True)
    mod, t = make()
    f = torch.compile(lambda q, k, v: attnkit.attention(q, k, v, score_mod=mod), backend="eager")
    got = torch.autograd.grad(f(q, k, v).pow(2).sum(), [q, t])
    want = torch.autograd.grad(attnkit.attention(q, k, v, score_mod=mod, backend="reference").pow(2).sum(), [q, t])
    assert want[1].abs().sum() > 0
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("make", [_attribute_mod, _global_mod], ids=["attribute", "global"])
@pytest.mark.parametrize("backend", ["chunked", "auto"])
def test_score_mod_hidden_tensor_only_grad_is_not_silently_dropped(make, backend):
    q, k, v = make_qkv(1, 2, 2, 5, 6, 8, seed=55)  # no input requires grad, only the mod's tensor
    mod, t = make()
    ref = attnkit.attention(q, k, v, score_mod=mod, backend="reference")
    (g_ref,) = torch.autograd.grad((ref * v.mean()).sum() + ref.pow(2).sum(), [t])
    assert g_ref.abs().sum() > 0
    try:
        out = attnkit.attention(q, k, v, score_mod=mod, backend=backend)
    except ValueError as e:  # refusing is fine for a forced backend, never for auto
        assert backend != "auto" and "score_mod_grad_elsewhere" in str(e)
        return
    assert out.requires_grad, "the score_mod's tensor requires grad but the output has no grad_fn"
    (g,) = torch.autograd.grad((out * v.mean()).sum() + out.pow(2).sum(), [t])
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_5x7"])
def test_score_mod_closure_tensor_only_grad(backend):
    """Only the closed-over tensor requires grad (frozen q/k/v): its gradient still arrives."""
    _, fn = _resolve(backend)
    q, k, v = make_qkv(2, 4, 2, 11, 17, 16, seed=56)
    rel = randn(4, 2 * REL_RADIUS + 1, gen=torch.Generator().manual_seed(57)).requires_grad_(True)
    out = fn(q, k, v, **rel_table_build({"rel": rel}))
    g_out = randn(*out.shape, gen=torch.Generator().manual_seed(58))
    (grad,) = torch.autograd.grad((out * g_out).sum(), [rel])
    rel64 = rel.detach().double().requires_grad_(True)
    ref = attnkit.attention(q.double(), k.double(), v.double(), **rel_table_build({"rel": rel64}),
                            backend="reference")
    (grad64,) = torch.autograd.grad((ref * g_out.double()).sum(), [rel64])
    assert_close_rel(grad, grad64, rtol=5e-5, name="grad rel")


# ---------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "chunked", "chunked_5x7", "sdpa"])
def test_dropout_mean_approaches_no_dropout(backend, device):
    """N independent draws (as N batch copies): the mean of out and of the grads tends to the
    dropout-free value at the 1/sqrt(N) rate, and a single draw differs from it."""
    _, fn = _resolve(backend)
    N, p = 1500, 0.3
    q, k, v = make_qkv(1, 2, 2, 9, 13, 8, seed=61, device=device)
    qN, kN, vN = (x.expand(N, *x.shape[1:]).clone().requires_grad_(True) for x in (q, k, v))
    g_out = randn(1, 2, 9, 8, gen=torch.Generator().manual_seed(62), device=device)
    torch.manual_seed(1234)
    if device == "cuda":
        torch.cuda.manual_seed(1234)
    out = fn(qN, kN, vN, dropout_p=p, causal=True)
    grads = torch.autograd.grad((out * g_out).sum(), [qN, kN, vN])
    q1, k1, v1 = (x.clone().requires_grad_(True) for x in (q, k, v))
    ref = attnkit.attention(q1, k1, v1, causal=True, backend="reference")
    ref_grads = torch.autograd.grad((ref * g_out).sum(), [q1, k1, v1])
    for name, draws, want in [("out", out.detach(), ref.detach())] + [
        (f"grad {n}", gr, rg) for n, gr, rg in zip("qkv", grads, ref_grads)
    ]:
        single = sum(rel_err(draws[i:i + 1], want) for i in range(0, N, 50)) / (N // 50)
        assert single > 0.05, f"{name}: dropout did not change single draws (rel dev {single:.3g})"
        mean_err = rel_err(draws.mean(0, keepdim=True), want)
        bound = 3.0 * single / math.sqrt(N)
        assert mean_err < bound, f"{name}: mean over {N} draws is off by {mean_err:.3g} > {bound:.3g}"


def test_dropout_draws_differ_and_zero_p_is_exact():
    q, k, v = make_qkv(1, 2, 2, 9, 13, 8, seed=63)
    for backend in ["reference", "chunked", "sdpa"]:
        a = attnkit.attention(q, k, v, dropout_p=0.5, backend=backend)
        b = attnkit.attention(q, k, v, dropout_p=0.5, backend=backend)
        assert not torch.equal(a, b), f"{backend}: two dropout draws are identical"
        c = attnkit.attention(q, k, v, dropout_p=0.0, backend=backend)
        ref = attnkit.attention(q.double(), k.double(), v.double(), backend="reference")
        assert_close_rel(c, ref)


def _seeded(fn):
    def wrapped(*args):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return fn(*args)

    return wrapped


def test_chunked_dropout_gradcheck():
    """float64 gradcheck of chunked with dropout; reseeding makes the mask deterministic."""
    be = ChunkedBackend(block_q=2, block_k=3)
    g = torch.Generator().manual_seed(71)
    q = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)

    @_seeded
    def f(q, k, v, bias):
        out, _ = be.run(build_request(q, k, v, bias=bias, dropout_p=0.4, causal=True))
        return out

    # the mask is really applied and really deterministic
    assert torch.equal(f(q, k, v, bias), f(q, k, v, bias))
    nodrop, _ = be.run(build_request(q, k, v, bias=bias, causal=True))
    assert not torch.allclose(f(q, k, v, bias), nodrop)
    assert torch.autograd.gradcheck(f, (q, k, v, bias), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_chunked_gradcheck_all_features():
    """float64 gradcheck: GQA + bias + softcap + sinks + learnable score_mod + causal, out and lse."""
    be = ChunkedBackend(block_q=3, block_k=4)
    g = torch.Generator().manual_seed(81)
    q = torch.randn(1, 4, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 1, 9, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    rel = torch.randn(4, 2 * REL_RADIUS + 1, generator=g, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, bias, sinks, rel):
        kw = rel_table_build({"rel": rel})
        req = build_request(q, k, v, bias=bias, sinks=sinks, softcap=1.5, causal=True, return_lse=True, **kw)
        return be.run(req)

    assert torch.autograd.gradcheck(f, (q, k, v, bias, sinks, rel), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_chunked_gradcheck_dead_rows_and_window():
    be = ChunkedBackend(block_q=2, block_k=3)
    g = torch.Generator().manual_seed(91)
    q = torch.randn(2, 2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 1, 7, 5, generator=g) > 0.3
    mask[:, :, 5] = False

    def f(q, k, v):
        return be.run(build_request(q, k, v, mask=mask, window=(1, 2), causal=True))[0]

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# flex on the CPU: forward only, a handful of compiled calls
# ---------------------------------------------------------------------------

FLEX_CPU_CASES = [
    # each is one compile (~8 s on this CPU); chosen to cover mods, masks, GQA, Dv, dead rows
    Case("flex_gqa_causal_keypad", B=2, Hq=4, Hkv=2, Lq=37, Lk=45, D=16, kw=dict(causal=True),
         extras=BY_NAME["mask_keypad"].extras, build=default_build),
    Case("flex_window_bias_softcap_dv", B=2, Hq=4, Hkv=1, Lq=29, Lk=29, D=32, Dv=16,
         kw=dict(window=(3, 2), softcap=2.0, scale=1.0),
         extras=BY_NAME["bias_h_lq_lk"].extras, build=default_build),
    Case("flex_mods_dead_rows_lq_gt_lk", B=2, Hq=4, Hkv=2, Lq=26, Lk=18, D=16, kw=dict(causal=True),
         extras=BY_NAME["score_mod_learnable"].extras,
         build=lambda t: {**rel_table_build(t), "mask_mod": checker_and_dead}),
    Case("flex_mask_dead_rows_decode", B=2, Hq=4, Hkv=2, Lq=1, Lk=50, D=16,
         extras=BY_NAME["mask_keypad"].extras, build=default_build),
    Case("flex_alibi_mqa_window_bias_keypad_like", B=2, Hq=4, Hkv=1, Lq=33, Lk=47, D=32, kw=dict(window=7),
         extras=BY_NAME["bias_keypad_like"].extras, build=lambda t: {**default_build(t), "score_mod": alibi_score_mod}),
    Case("flex_full_mask_dead_rows_2d_bias", B=2, Hq=4, Hkv=2, Lq=24, Lk=31, D=16,
         extras=lambda B, H, Lq, Lk, g: {**BY_NAME["mask_dead_rows"].extras(B, H, Lq, Lk, g),
                                         "bias": torch.randn(Lq, Lk, generator=g)},
         build=lambda t: {**default_build(t), "mask_mod": dead_rows_mask_mod}),
]


def checker_and_dead(b, h, i, j):
    return (((i + 2 * j + b + h) % 4) != 0) & (i != 5)


@pytest.mark.slow
@pytest.mark.parametrize("case", FLEX_CPU_CASES, ids=[c.name for c in FLEX_CPU_CASES])
def test_flex_cpu_forward(case):
    res = run_case("flex", case, torch.float32, "cpu", backward=False)
    assert res is not None, "flex must serve forward-only calls on the CPU"


class _DocMask:
    """A mask_mod object whose state (a tensor changed in place, an int set anew) lives in attributes."""

    def __init__(self, doc, limit):
        self.doc, self.limit = doc, limit

    def __call__(self, b, h, q_idx, kv_idx):
        return (self.doc[q_idx] == self.doc[kv_idx]) & (kv_idx < self.limit)


@pytest.mark.slow
def test_flex_block_mask_follows_a_mask_mod_objects_state():
    """flex caches BlockMasks per mask_mod and its state: a changed attribute builds a new one. (On the CPU
    flex evaluates every element, so a stale BlockMask still gives the right values: the key shows it.)"""
    from attnkit.backends.flex import _mask_key

    L = 256
    q, k, v = make_qkv(1, 2, 2, L, L, 16, seed=96)
    doc = torch.zeros(L, dtype=torch.long)
    mod = _DocMask(doc, L)
    steps = [lambda: None, lambda: doc[128:].fill_(1), lambda: setattr(mod, "limit", 100),
             lambda: setattr(mod, "doc", torch.arange(L) // 64)]
    keys = []
    for change in steps:
        change()
        keys.append(_mask_key(build_request(q, k, v, mask_mod=mod))[0])
        out = attnkit.attention(q, k, v, mask_mod=mod, backend="flex")
        ref = attnkit.attention(q.double(), k.double(), v.double(), mask_mod=mod, backend="reference")
        assert_close_rel(out, ref)
    assert len(set(keys)) == len(steps), "a change of the mask_mod's state left its BlockMask key as it was"


def test_flex_serves_inference_tensors():
    """Masks made under torch.inference_mode (a mask, cache_seqlens' length mask, a mask_mod's closure
    tensor) have no version counter: flex's BlockMask key read it and raised. They are built anew each
    call instead, and right after a change in place."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, seed=100)
    with torch.inference_mode():
        mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(101)) > 0.3
        doc = torch.arange(8) // 4
    mod = lambda b, h, i, j: doc[i] == doc[j]  # noqa: E731
    calls = [dict(mask=mask), dict(mask_mod=mod), dict(cache_seqlens=torch.tensor([5]), causal=True)]
    for kw in calls:
        with torch.inference_mode():
            out = attnkit.attention(q, k, v, backend="flex", **kw)
        ref = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", **kw)
        assert_close_rel(out, ref)
    with torch.inference_mode():
        doc[4:] = 0  # one document now
        out = attnkit.attention(q, k, v, backend="flex", mask_mod=mod)
    assert_close_rel(out, attnkit.attention(q.double(), k.double(), v.double(), backend="reference"))


def test_flex_block_mask_key_follows_closure_scalars():
    """Numbers a mask_mod closes over directly (not through an object) are part of the BlockMask key."""
    from attnkit.backends.flex import _mask_key

    limit, offset = 40, 0.0

    def mod(b, h, q_idx, kv_idx):
        return kv_idx + offset < limit

    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, seed=99)
    req = build_request(q, k, v, mask_mod=mod)
    key = _mask_key(req)[0]
    limit = 30
    key2 = _mask_key(req)[0]
    offset = 1.5
    assert len({key, key2, _mask_key(req)[0]}) == 3


def test_flex_block_mask_key_follows_default_arguments():
    """A mask_mod holding its tensor as a default argument (def mod(b, h, i, j, doc=doc)): the
    BlockMask cache key must see the tensor's contents, or a compiled flex call reuses the
    block sparsity of stale contents (on the CPU flex evaluates every element, so only the key
    shows it)."""
    from attnkit.backends.flex import _mask_key
    from attnkit.request import build_request

    doc = torch.zeros(64, dtype=torch.long)

    def mod(b, h, q_idx, kv_idx, doc=doc, *, limit=40):
        return (doc[q_idx] == doc[kv_idx]) & (kv_idx < limit)

    q, k, v = make_qkv(1, 2, 2, 64, 64, 16, seed=98)
    req = build_request(q, k, v, mask_mod=mod)
    key, deps = _mask_key(req)
    assert any(t is doc for t in deps) and 40 in key[-1]
    doc[32:] = 1
    assert _mask_key(req)[0] != key
    mod.__kwdefaults__["limit"] = 30
    assert 30 in _mask_key(req)[0][-1]


@pytest.mark.parametrize("layout", ["contiguous", "bshd_view"])
def test_flex_cpu_small_shapes(layout):
    """torch 2.13's compiled CPU flex gave NaN at B2 x H2 x L8, D = 16 (and wrong values on
    [B, L, H, D] views): the backend runs it uncompiled on the CPU."""
    g = torch.Generator().manual_seed(97)
    shape = (2, 8, 2, 16) if layout == "bshd_view" else (2, 2, 8, 16)
    q, k, v = (randn(*shape, gen=g) for _ in range(3))
    if layout == "bshd_view":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    for kw in ({}, {"causal": True}):
        out = attnkit.attention(q, k, v, backend="flex", **kw)
        ref = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", **kw)
        assert_close_rel(out, ref)
    cu = torch.tensor([0, 5, 8])  # varlen hands flex [1, H, total, D] views of packed rows
    qp, kp, vp = (x[0].transpose(0, 1) for x in (q, k, v))
    out = attnkit.varlen_attention(qp, kp, vp, cu, cu, causal=True, backend="flex")
    ref = attnkit.varlen_attention(qp.double(), kp.double(), vp.double(), cu, cu, causal=True, backend="reference")
    assert_close_rel(out, ref)


def test_flex_cpu_refuses_backward_lse_sinks_without_compiling():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, seed=95)
    with pytest.raises(ValueError, match="'backward'"):
        attnkit.attention(q.requires_grad_(True), k, v, backend="flex")
    q = q.detach()
    with pytest.raises(ValueError, match="'return_lse'"):
        attnkit.attention(q, k, v, return_lse=True, backend="flex")
    with pytest.raises(ValueError, match="'sinks'"):
        attnkit.attention(q, k, v, sinks=torch.randn(2), backend="flex")
    with pytest.raises(ValueError, match="head dim 8"):
        attnkit.attention(*make_qkv(1, 2, 2, 8, 8, 8), backend="flex")


# ---------------------------------------------------------------------------
# CUDA: float16 / bfloat16, realistic shapes and the edge shapes
# ---------------------------------------------------------------------------

CUDA_REALISTIC = [
    Case("cu_dense_L1024_D128", B=2, Hq=8, Hkv=8, Lq=1024, Lk=1024, D=128),
    Case("cu_causal_gqa_L1024_D64", B=2, Hq=8, Hkv=2, Lq=1024, Lk=1024, D=64, kw=dict(causal=True)),
    Case("cu_causal_decode_chunk_512x1024", B=2, Hq=8, Hkv=2, Lq=512, Lk=1024, D=64, kw=dict(causal=True)),
    Case("cu_window256_L1024_D64", B=2, Hq=8, Hkv=8, Lq=1024, Lk=1024, D=64, kw=dict(window=256)),
    Case("cu_pair_bias_L512_D64", B=2, Hq=8, Hkv=8, Lq=512, Lk=512, D=64,
         extras=BY_NAME["bias_h_lq_lk"].extras, build=default_build),
    Case("cu_keypad_L512_D128", B=2, Hq=8, Hkv=4, Lq=512, Lk=512, D=128,
         extras=BY_NAME["mask_keypad"].extras, build=default_build),
    Case("cu_softcap_lse_L1024_D128", B=2, Hq=8, Hkv=2, Lq=1024, Lk=1024, D=128,
         kw=dict(causal=True, softcap=20.0, return_lse=True)),
    Case("cu_sinks_L512_D64", B=2, Hq=8, Hkv=2, Lq=512, Lk=512, D=64, kw=dict(window=128),
         extras=BY_NAME["sinks"].extras, build=default_build),
    Case("cu_odd_L1000x777_D72", B=2, Hq=8, Hkv=2, Lq=777, Lk=1000, D=72, Dv=40, kw=dict(causal=True)),
    Case("cu_odd_L1000x777_D64", B=2, Hq=8, Hkv=2, Lq=777, Lk=1000, D=64, kw=dict(causal=True)),
]
CUDA_EDGE = ["dense", "gqa_4", "mqa", "dv_ne_d", "lq_lt_lk", "lq_gt_lk", "lq_1", "lk_1", "d40", "d72",
             "causal_lq_gt_lk", "window_tuple", "causal_window_int", "softcap", "bias_full", "bias_keypad_like",
             "mask_dead_rows", "mask_2d", "score_mod_learnable", "mask_mod_checker", "sinks", "lse_mask_dead_rows",
             "combo_llm", "combo_mods"]
CUDA_CASES = CUDA_REALISTIC + [BY_NAME[n] for n in CUDA_EDGE]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("backend", ["chunked", "sdpa", "triton", "reference"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c.name for c in CUDA_CASES])
def test_cuda_lowp(case, backend, dtype):
    run_case(backend, case, dtype, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["chunked", "sdpa", "triton"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c.name for c in CUDA_CASES])
def test_cuda_float32(case, backend):
    run_case(backend, case, torch.float32, "cuda")


# flex compiles forward + backward per shape/mod: a subset, covering its translation of every feature
FLEX_CUDA = [
    ("cu_causal_gqa_L1024_D64", torch.bfloat16), ("cu_causal_gqa_L1024_D64", torch.float16),
    ("cu_pair_bias_L512_D64", torch.bfloat16), ("cu_softcap_lse_L1024_D128", torch.bfloat16),
    ("cu_sinks_L512_D64", torch.float16), ("cu_odd_L1000x777_D64", torch.bfloat16),
    ("cu_odd_L1000x777_D72", torch.bfloat16),  # head dims 72 / 40: padded inside flex
    ("cu_keypad_L512_D128", torch.float16), ("mask_dead_rows", torch.bfloat16),
    ("score_mod_learnable", torch.bfloat16), ("mask_mod_checker", torch.float16),
    ("combo_llm", torch.bfloat16), ("combo_mods", torch.float16), ("lq_1", torch.bfloat16),
    ("causal_lq_gt_lk", torch.bfloat16), ("lse_mask_dead_rows", torch.float16), ("sinks_causal_lq_gt_lk", torch.bfloat16),
    ("window_tuple", torch.float16), ("bias_keypad_like", torch.bfloat16), ("gqa_4", torch.float16),
    ("d8", torch.bfloat16),  # d8: refused (head dim 8)
    # head dims off the powers of two, padded inside flex (D = 40 and 72 failed on torch 2.11 once, 2026-11-22)
    ("d40", torch.float32), ("d40", torch.float16), ("d72", torch.float32), ("d72", torch.bfloat16),
    ("dv_ne_d", torch.float32), ("combo_pair_bias", torch.float16),
    # D = 64 with a mask tensor: 64 x 64 tiles (flex's own did not build a bias beside a key mask, torch 2.11)
    ("cu_pair_bias_keypad_L512_D64", torch.bfloat16), ("cu_pair_bias_keypad_L512_D64", torch.float16),
]
# realistic sizes of small cases, for flex only
FLEX_CUDA_EXTRA = {
    "cu_pair_bias_keypad_L512_D64": BY_NAME["combo_pair_bias"].replace(
        name="cu_pair_bias_keypad_L512_D64", Hq=8, Hkv=8, Lq=512, Lk=512, D=64),
}

def _flex_case(name: str) -> Case:
    """The edge cases at their own head dim (mostly 24: flex pads it to 32 inside)."""
    return {c.name: c for c in CUDA_CASES}.get(name) or FLEX_CUDA_EXTRA.get(name) or BY_NAME[name]


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("case_name,dtype", FLEX_CUDA,
                         ids=[f"{n}-{str(d).replace('torch.', '')}" for n, d in FLEX_CUDA])
def test_cuda_flex(case_name, dtype):
    run_case("flex", _flex_case(case_name), dtype, "cuda")


def _doc_bias_call(D: int, seed: int):
    """A training call with a document mask_mod and a learnable bias (flex's territory under auto)."""
    B, H, L = 2, 4, 512
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    bias = torch.randn(1, H, L, L, device="cuda", dtype=torch.bfloat16, generator=g)
    doc = (torch.arange(L, device="cuda") * 3) // L  # three documents

    def same_doc(b, h, i, j):
        return doc[i] == doc[j]

    return (q, k, v, bias), do, same_doc


def _grads(backend, tensors, do, mask_mod, dtype=None, wrap=None):
    """(out, dq, dk, dv, dbias) of the call on backend ("naive": plain math in the inputs' dtype)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in tensors]

    def f(q, k, v, bias):
        if backend == "naive":
            return naive_attention(q, k, v, bias=bias, mask_mod=mask_mod)
        return attnkit.attention(q, k, v, bias=bias, mask_mod=mask_mod, backend=backend)

    out = (wrap or (lambda fn, *a: fn(*a)))(f, *leaves)
    return (out, *torch.autograd.grad(out, leaves, do.to(out.dtype)))


def test_flex_builds_its_backward_on_detached_copies_and_passes_its_failure_on():
    """flex's early backward build (CPU, a stand-in for the compiled kernel): the stand-in sees detached
    copies with the call's requires_grad; what its backward raises reaches run's caller; no .grad fills;
    only the bias learning still builds; nothing to build, or inside torch.func, builds nothing."""
    from attnkit.backends import flex as flex_mod

    class Refused(RuntimeError):
        pass

    class Kernel(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, bias):
            return q * bias.sum() + k.sum() + v.sum()

        refuse = True

        @staticmethod
        def backward(ctx, g):
            if Kernel.refuse:
                raise Refused("the backward does not fit (out of resource)")
            return g, g, g, torch.zeros(1, 3, 5, 5)  # shapes only: nothing here may reach a .grad

    seen = []

    def fn(q, k, v, score_mod=None, return_lse=False, **kw):
        seen.append((q.requires_grad, k.requires_grad, v.requires_grad, q.grad_fn))
        bias = score_mod.bias
        out = Kernel.apply(q, k, v, bias)
        return (out, out.sum(-1)) if return_lse else out

    def call(q, k, v, bias):
        req = build_request(q, k, v, bias=bias)
        score_mod = lambda s, *idx: s  # noqa: E731
        score_mod.bias = req.bias
        return req, dict(score_mod=score_mod, return_lse=True)

    x = torch.randn(2, 3, 5, 8, requires_grad=True)
    q = x * 2  # non-leaf
    k = torch.randn(2, 3, 5, 8, requires_grad=True)
    v = torch.randn(2, 3, 5, 8)
    bias = torch.randn(3, 5, 5, requires_grad=True)
    req, kw = call(q, k, v, bias)
    with pytest.raises(Refused):
        flex_mod._build_backward(fn, req, kw)
    assert seen[-1][:3] == (True, True, False) and seen[-1][3] is None  # detached leaves, same requires_grad
    Kernel.refuse = False
    assert flex_mod._build_backward(fn, req, kw) is True
    assert x.grad is None and k.grad is None and bias.grad is None  # gradients returned, never accumulated
    Kernel.refuse = True

    req, kw = call(q.detach(), k.detach(), v, bias)  # only the bias learns
    with pytest.raises(Refused):
        flex_mod._build_backward(fn, req, kw)
    assert bias.grad is None
    req, kw = call(q.detach(), k.detach(), v, bias.detach())  # nothing learns: nothing to build
    n = len(seen)
    assert flex_mod._build_backward(fn, req, kw) is False and len(seen) == n

    def inside(t):
        r, w = call(t, k, v, bias)
        assert flex_mod._build_backward(fn, r, w) is False
        return (t * 2).sum()

    torch.func.grad(inside)(torch.randn(2, 3, 5, 8))
    assert len(seen) == n


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_auto_runs_a_call_flex_cannot_build_elsewhere():
    """D = 128, a document mask_mod and a bias, in training: on torch 2.11 (H100) Inductor built the
    forward but not the backward (out of shared memory). The failure must surface inside the forward
    call, where auto can still pass it on; the gradients must be right either way."""
    import warnings

    from attnkit.dispatch import clear_cache

    tensors, do, same_doc = _doc_bias_call(128, seed=31)
    leaves = [t.clone().requires_grad_() for t in tensors]
    clear_cache()  # no failure remembered from an earlier test
    assert attnkit.explain(*leaves[:3], bias=leaves[3], mask_mod=same_doc).backend == "flex"
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = _grads("auto", tensors, do, same_doc)  # on torch 2.11, flex's backward failing here raised
        plan = attnkit.explain(*leaves[:3], bias=leaves[3], mask_mod=same_doc)
    finally:
        clear_cache()  # the failure is not for later tests to inherit
    want = _grads("reference", tensors, do, same_doc, dtype=torch.float64)
    base = _grads("naive", tensors, do, same_doc)  # plain math in bf16
    for g, w, b in zip(got, want, base):
        assert_close_rel(g, w, rel_err(b, w))
    failed = [w for w in seen if "could not build" in str(w.message)]
    print("flex build failures:", [str(w.message)[:200] for w in failed], "->", plan.backend)
    if failed:  # torch 2.11 on an H100: the backward's tile needs more shared memory than there is
        assert "'flex' could not build" in str(failed[0].message)
        assert plan.backend != "flex" and "failed to build" in plan.passed_over["flex"], str(plan)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_flex_first_training_call_under_activation_checkpointing():
    """flex builds its backward inside the first training call of a signature; activation checkpointing
    around that call must not see the extra graph (it counts the tensors saved by forward and recompute)."""
    from torch.utils.checkpoint import checkpoint

    from attnkit.backends import get_backend

    tensors, do, same_doc = _doc_bias_call(64, seed=32)
    get_backend("flex")._backward_built.clear()  # the next training call builds its backward again
    got = _grads("flex", tensors, do, same_doc, wrap=lambda fn, *a: checkpoint(fn, *a, use_reentrant=False))
    assert get_backend("flex")._backward_built, "the checkpointed call did not build flex's backward"
    want = _grads("reference", tensors, do, same_doc, dtype=torch.float64)
    base = _grads("naive", tensors, do, same_doc)
    for g, w, b in zip(got, want, base):
        assert_close_rel(g, w, rel_err(b, w))


@pytest.mark.cuda
def test_cuda_auto_choices():
    """auto on CUDA: never the reference; SDPA for plain calls; a capable backend for the rest."""
    q, k, v = make_qkv(2, 8, 2, 256, 256, 64, dtype=torch.bfloat16, device="cuda")
    assert attnkit.explain(q, k, v, causal=True).backend == "sdpa"
    # dense / causal with lse: SDPA's lse-returning kernels (cuDNN / flash), ahead of flex
    assert attnkit.explain(q, k, v, causal=True, return_lse=True).backend == "sdpa"
    assert attnkit.explain(q, k, v, return_lse=True, for_backward=True).backend == "sdpa"
    for kw in [dict(softcap=30.0), dict(sinks=torch.randn(8, device="cuda", dtype=torch.bfloat16)),
               dict(return_lse=True, window=64), dict(score_mod=lambda s, b, h, i, j: s)]:
        plan = attnkit.explain(q, k, v, **kw)
        assert plan.backend not in ("reference", "sdpa"), (kw, str(plan))
        assert "cannot serve" in plan.passed_over["sdpa"]
    assert attnkit.explain(q, k, v, window=64).backend != "reference"
    out = attnkit.attention(q, k, v, causal=True)
    ref = attnkit.attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
    base = rel_err(naive_attention(q, k, v, causal=True), ref)
    assert_close_rel(out, ref, base)


def test_flex_block_masks_keep_a_bounded_number_of_bytes_of_mask_tensors(monkeypatch):
    """flex caches a BlockMask per mask tensor and keeps that tensor alive with it: past the cache's byte
    budget the oldest entries (and so the callers' masks they hold) go; the newest one is always kept."""
    import gc
    import weakref
    from attnkit.backends import flex as flex_mod
    flex = attnkit.get_backend("flex")
    monkeypatch.setattr(flex, "_block_masks", {})
    q = torch.randn(1, 1, 32, 16)
    nbytes = torch.ones(1, 1, 32, 32, dtype=torch.bool).untyped_storage().nbytes()
    monkeypatch.setattr(flex_mod, "_BLOCK_MASK_CACHE_BYTES", 2 * nbytes)
    refs = []
    for i in range(6):
        m = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(i)) > 0.3
        refs.append(weakref.ref(m))
        with torch.no_grad():
            out = attnkit.attention(q, q, q, mask=m, backend="flex")
        ref = attnkit.attention(q.double(), q.double(), q.double(), mask=m, backend="reference")
        assert_close_rel(out, ref)
        del m
    gc.collect()
    assert [r() is not None for r in refs] == [False] * 4 + [True] * 2
    assert len(flex._block_masks) == 2


def test_flex_block_masks_follow_numpy_and_nested_scalars_a_mask_mod_reads(monkeypatch):
    """flex keys its BlockMask cache on the scalars a mask_mod closes over: numpy scalars (np.int64 is no int)
    and attributes of attributes (a method reading self.cfg.n) count, so a changed value builds a new mask."""
    from torch.nn.attention.flex_attention import create_block_mask
    from attnkit.masks import closure_scalars
    flex = attnkit.get_backend("flex")
    monkeypatch.setattr(flex, "_block_masks", {})

    class Cfg:
        n = 40

    class Masker:
        def __init__(self):
            self.cfg, self.limit = Cfg(), np.int64(40)

        def by_numpy(self, b, h, i, j):
            return j < self.limit

        def by_attribute(self, b, h, i, j):
            return j < self.cfg.n

    m = Masker()
    q = torch.randn(1, 1, 256, 16)
    assert closure_scalars(m.by_numpy) == (np.int64(40),) and 40 in closure_scalars(m.by_attribute)
    for mod, change in ((m.by_numpy, lambda: setattr(m, "limit", np.int64(200))),
                        (m.by_attribute, lambda: setattr(m.cfg, "n", 200))):
        first = flex.block_mask(build_request(q, q, q, mask_mod=mod))
        change()
        again = flex.block_mask(build_request(q, q, q, mask_mod=mod))
        assert again is not first
        fresh = create_block_mask(lambda b, h, i, j: mod(b, h, i, j), 1, 1, 256, 256, device="cpu")
        assert torch.equal(again.to_dense(), fresh.to_dense())


def test_flex_mask_cache_keys_and_weights_only_what_it_must(monkeypatch):
    """A 0-d numpy array in a mask_mod's closure is no key part (unhashable; it raised), a GroupMask's layout
    is not walked (its tables say the same; walking 1024 sequences cost ~1.4 ms a call), and the byte budget
    weighs the user's mask tensors only (module parameters a mod reads made the cache drop every entry)."""
    from torch import nn
    from attnkit.backends import flex as flex_mod
    from attnkit.groups import GroupMask, SegmentLayout
    from attnkit.masks import closure_scalars
    flex = attnkit.get_backend("flex")
    monkeypatch.setattr(flex, "_block_masks", {})
    q = torch.randn(1, 1, 64, 16)
    limit = np.array(40)

    def below(b, h, i, j):
        return j < int(limit)

    assert closure_scalars(below) == ()
    with torch.no_grad():
        out = attnkit.attention(q, q, q, mask_mod=below, backend="flex")
    assert_close_rel(out, attnkit.attention(q.double(), q.double(), q.double(), mask_mod=below, backend="reference"))
    cu = list(range(0, 65, 4))
    g = GroupMask(SegmentLayout(64, 64, tuple((((a, b),), ((a, b),)) for a, b in zip(cu, cu[1:]))))
    assert closure_scalars(g) == ()

    class Gate(nn.Module):  # a mod that is a method of a module with (here: 1 MiB of) parameters
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1 << 18))

        def causal(self, b, h, i, j):
            return j <= i

        def banded(self, b, h, i, j):
            return (j <= i) & (j > i - 8)

    gate = Gate()
    monkeypatch.setattr(flex_mod, "_BLOCK_MASK_CACHE_BYTES", 1 << 10)
    first = [flex.block_mask(build_request(q, q, q, mask_mod=m)) for m in (gate.causal, gate.banded)]
    again = [flex.block_mask(build_request(q, q, q, mask_mod=m)) for m in (gate.causal, gate.banded)]
    assert all(a is b for a, b in zip(first, again)) and len(flex._block_masks) == 3  # (with `below`)


def _ref64(q, k, v, **kw):
    return attnkit.attention(q.double(), k.double(), v.double(), backend="reference", **kw)


# From the fourth mutation audit: the flex BlockMask cache and the capability table.


def test_flex_block_mask_key_tells_bounds_apart(monkeypatch):
    """Calls of one shape that differ only in their causal / window bounds get their own BlockMask (its
    mask_mod holds the bounds): a key without them (mutant F02) served the causal call's mask to the
    windowed calls after it, silently."""
    flex = attnkit.get_backend("flex")
    monkeypatch.setattr(flex, "_block_masks", {})
    q, k, v = make_qkv(1, 2, 2, 16, 24, 16, seed=401)
    with torch.no_grad():
        for kw in (dict(causal=True), dict(causal=True, window=3), dict(window=(2, 5)), dict(window=(4, 0)),
                   dict(causal=True)):
            assert_close_rel(attnkit.attention(q, k, v, backend="flex", **kw), _ref64(q, k, v, **kw), name=str(kw))


def test_flex_block_mask_covers_every_batch_row_and_head():
    """A mask tensor with a batch (or head) dim of its own gets a BlockMask with that dim: each (b, h) visits
    every block where its mask allows a pair. Built for batch row / head 0 only (mutant F01), the block
    sparsity of row 0 is applied to every row; on the CPU flex evaluates every element and hides it, on CUDA
    the blocks it skips drop keys."""
    flex = attnkit.get_backend("flex")
    B, H, L, blk = 2, 2, 256, 128
    q, k, v = make_qkv(B, H, H, L, L, 16, seed=402)
    per_batch = torch.zeros(B, 1, L, L, dtype=torch.bool)
    per_batch[0, :, :, :blk] = True  # batch row 0: the first key block only
    per_batch[1, :, :, blk:] = True  # batch row 1: the second only
    per_head = per_batch.transpose(0, 1).contiguous()  # [1, H, L, L]: the same by head
    for mask in (per_batch, per_head):
        bm = flex.block_mask(build_request(q, k, v, mask=mask))
        dense = bm.to_dense().bool()  # [B|1, H|1, query blocks, key blocks]
        occ = mask.view(mask.shape[0], mask.shape[1], L // blk, blk, L // blk, blk).any(dim=5).any(dim=3)
        shape = torch.broadcast_shapes(dense.shape, occ.shape)
        assert bool((dense.expand(shape) | ~occ.expand(shape)).all()), "a block the mask allows is skipped"


def test_flex_block_mask_key_tells_batch_and_heads_apart(monkeypatch):
    """A mask_mod's BlockMask has the call's batch and heads: one built for B = 1 is no BlockMask for B = 2 of
    the same mod and lengths. A cache key without them (mutant F09) returned the B = 1 mask, whose block
    sparsity (that of batch row 0) CUDA then applies to every row; on the CPU the values hide it."""
    flex = attnkit.get_backend("flex")
    monkeypatch.setattr(flex, "_block_masks", {})
    L, blk = 256, 128

    def mod(b, h, i, j):  # batch row b (head h) sees key block (b + h) % 2 only
        return (j // blk) == ((b + h) % 2)

    for B, H in [(1, 1), (2, 1), (2, 2)]:
        q, k, v = make_qkv(B, H, H, L, L, 16, seed=409 + B + H)
        dense = flex.block_mask(build_request(q, k, v, mask_mod=mod)).to_dense().bool()
        b = torch.arange(B).view(B, 1, 1, 1)
        h = torch.arange(H).view(1, H, 1, 1)
        kb = torch.arange(L // blk).view(1, 1, 1, -1)
        want = (kb == (b + h) % 2).expand(B, H, L // blk, L // blk)
        assert dense.shape == want.shape and torch.equal(dense, want), (B, H)


def test_capabilities_head_dim_limits_are_inclusive():
    """max_head_dim is the largest head dim served (triton's 256 included), for D and Dv alike: a `>=`
    (mutant B01) refused D = 256 on triton, which only the CUDA tests ran."""
    caps = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}), features=ALL_FEATURES,
                        min_head_dim=8, max_head_dim=64)
    for D, Dv, ok in [(64, 64, True), (8, 8, True), (65, 64, False), (64, 65, False), (7, 8, False)]:
        q, k, v = make_qkv(1, 1, 1, 2, 3, D, Dv, seed=403)
        assert (caps.missing(build_request(q, k, v)) == []) == ok, (D, Dv)
    q, k, v = make_qkv(1, 1, 1, 2, 3, 256, seed=404)
    assert attnkit.get_backend("triton").capabilities.missing(build_request(q, k, v)) == []
