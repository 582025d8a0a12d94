"""Split-head attention modules (Standard, Flash, Gated, Linear, Lite), the registry,
from_config and swapping, each checked against plain PyTorch written here.

Every reference below is re-derived from the math in the modules' docstrings and
computed in float64 (on float64 copies of the inputs), so a float32 module is
compared with exact math and a float64 module with float64 math.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import zlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch import nn

import attnkit
from attnkit import (
    ATTENTION_REGISTRY,
    AttentionRegistry,
    BaseAttention,
    FlashAttention,
    GatedAttention,
    LinearAttention,
    LiteAttention,
    StandardAttention,
    SwappableMixin,
    swap,
)
from attnkit.ops import feature_map, linear_attention
from conftest import assert_close_tol as assert_close, rel_norm as rel_err

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]

# relative (norm-wise) error bounds vs a float64 reference
FWD_TOL = {torch.float32: 2e-5, torch.float64: 1e-10}
GRAD_TOL = {torch.float32: 5e-5, torch.float64: 1e-10}
# float32-level bounds for both dtypes: kept from when linear attention computed float64 inputs in
# float32 (it now keeps float64), and LiteAttention upcasts its logits to at least float32.
F32_FWD, F32_GRAD = 2e-5, 5e-5


# ---------------------------------------------------------------------------
# helpers (kept local on purpose)
# ---------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float32, gen=None, std=1.0) -> torch.Tensor:
    """Fresh standard-normal values (float64 draw, then cast)."""
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(True)


def safe_softmax(s: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax that gives 0 (not NaN) on slices that are entirely -inf."""
    m = s.amax(dim=dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(dim=dim, keepdim=True)
    return e / torch.where(den == 0, torch.ones_like(den), den)


def ref_softmax_attention(q, k, v, mask=None, bias=None):
    """softmax(q k^T / sqrt(D) + bias, masked) @ v with query head h reading kv head h // (Hq/Hkv)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return safe_softmax(s) @ v


def key_padding(B: int, L: int, lengths) -> torch.Tensor:
    """[B, 1, 1, L] bool, True for the first lengths[b] keys of row b."""
    lens = torch.tensor(lengths).view(B, 1)
    return (torch.arange(L).view(1, L) < lens).view(B, 1, 1, L)


def grads_of(loss: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = list(tensors)
    gs = torch.autograd.grad(loss, [tensors[n] for n in names], allow_unused=True)
    return dict(zip(names, gs))


def compare_grads(got: dict, want: dict, tol: float) -> None:
    for n, r in want.items():
        g = got[n]
        assert g is not None, f"no gradient reached {n}"
        assert_close(g, r, tol, name=f"grad {n}")


# ---------------------------------------------------------------------------
# softmax kinds: standard / flash / gated vs plain math
# ---------------------------------------------------------------------------

SOFTMAX_KINDS = ["standard", "flash", "gated"]
# (name, Hq, Hkv, with mask, with bias); GQA only for standard / flash (per the module docs)
SCENARIOS = [
    ("plain", 4, 4, False, False),
    ("mask", 4, 4, True, False),
    ("bias", 4, 4, False, True),
    ("mask_bias", 4, 4, True, True),
    ("gqa2", 4, 2, False, False),
    ("mqa_mask", 4, 1, True, False),
]


def _build_softmax(kind: str, H: int, D: int, dtype, gen) -> BaseAttention:
    mod = ATTENTION_REGISTRY.build(kind, num_heads=H, head_dim=D)
    if kind == "gated":
        # random gate weights so that the gate's math and gradients are actually exercised
        with torch.no_grad():
            mod.gate.weight.copy_(randn(D, D, gen=gen, std=0.3))
            mod.gate.bias.copy_(randn(D, gen=gen))
    return mod.to(dtype)


SOFTMAX_CASES = [
    pytest.param(kind, sc, id=f"{kind}-{sc[0]}")
    for kind in SOFTMAX_KINDS
    for sc in SCENARIOS
    if kind != "gated" or sc[1] == sc[2]
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,scenario", SOFTMAX_CASES)
def test_softmax_modules_match_plain_math(kind, scenario, dtype):
    name, Hq, Hkv, with_mask, with_bias = scenario
    B, L, D = 3, 11, 16
    g = _gen(zlib.crc32(f"{kind}/{name}".encode()))
    mod = _build_softmax(kind, Hq, D, dtype, g)
    assert isinstance(mod, {"standard": StandardAttention, "flash": FlashAttention, "gated": GatedAttention}[kind])
    q = leaf(randn(B, Hq, L, D, dtype=dtype, gen=g))
    k = leaf(randn(B, Hkv, L, D, dtype=dtype, gen=g))
    v = leaf(randn(B, Hkv, L, D, dtype=dtype, gen=g))
    mask = key_padding(B, L, [L, 0, 6]) if with_mask else None  # row 1 is fully padded
    bias = leaf(randn(Hq, L, L, dtype=dtype, gen=g)) if with_bias else None  # pair bias, broadcast over B
    g_out = randn(B, Hq, L, D, dtype=dtype, gen=g)

    out = mod(q, k, v, mask=mask, bias=bias)
    assert out.dtype == dtype and out.shape == (B, Hq, L, D)
    mine = {"q": q, "k": k, "v": v}
    if bias is not None:
        mine["bias"] = bias
    params = dict(mod.named_parameters())
    got = grads_of((out * g_out).sum(), {**mine, **params})

    # reference in float64 on copies
    r = {n: leaf(t, torch.float64) for n, t in mine.items()}
    rp = {n: leaf(p, torch.float64) for n, p in params.items()}
    ref = ref_softmax_attention(r["q"], r["k"], r["v"], mask=mask, bias=r.get("bias"))
    if kind == "gated":
        ref = ref * torch.sigmoid(r["q"] @ rp["gate.weight"].T + rp["gate.bias"])
    want = grads_of((ref * g_out.double()).sum(), {**r, **rp})

    assert_close(out, ref, FWD_TOL[dtype])
    compare_grads(got, want, GRAD_TOL[dtype])
    if bias is not None:
        assert got["bias"].shape == bias.shape  # gradient in the bias's own (broadcast) shape
    if with_mask:
        # the fully padded batch row: exactly zero, and zero gradient, never NaN
        assert torch.all(out[1] == 0)
        assert torch.all(got["q"][1] == 0)
        for n, gr in got.items():
            assert torch.isfinite(gr).all(), f"non-finite grad {n}"


def test_gated_gate_starts_at_sigmoid_of_init_bias():
    torch.manual_seed(0)
    mod = GatedAttention(2, 8, gate_init_bias=0.7)
    assert torch.all(mod.gate.weight == 0) and torch.all(mod.gate.bias == 0.7)
    assert mod.gate.weight.shape == (8, 8)
    q, k, v = (randn(2, 2, 5, 8, gen=_gen(1)) for _ in range(3))
    plain = StandardAttention(2, 8)(q, k, v)
    assert_close(mod(q, k, v), plain * torch.sigmoid(torch.tensor(0.7)), 2e-6)


def test_softmax_modules_check_heads():
    mod = StandardAttention(4, 8)
    with pytest.raises(ValueError, match="expects q"):
        mod(randn(1, 3, 5, 8), randn(1, 3, 5, 8), randn(1, 3, 5, 8))
    with pytest.raises(ValueError, match="expects q"):
        mod(randn(1, 4, 5, 6), randn(1, 4, 5, 6), randn(1, 4, 5, 6))
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        mod([[0.0] * 8], randn(1, 4, 5, 8), randn(1, 4, 5, 8))


def test_dropout_only_in_training():
    g = _gen(3)
    q, k, v = (randn(2, 2, 16, 8, gen=g) for _ in range(3))
    mod = StandardAttention(2, 8, dropout=0.5)
    mod.eval()
    assert_close(mod(q, k, v), ref_softmax_attention(q.double(), k.double(), v.double()), 2e-5)
    mod.train()
    torch.manual_seed(0)
    a = mod(q, k, v)
    assert rel_err(a, ref_softmax_attention(q.double(), k.double(), v.double())) > 1e-2
    with pytest.raises(ValueError, match="dropout"):
        StandardAttention(2, 8, dropout=1.0)


# ---------------------------------------------------------------------------
# LinearAttention
# ---------------------------------------------------------------------------


def _phi(x: torch.Tensor, kind: str, projection: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "elu":
        return torch.where(x > 0, x + 1.0, torch.exp(x))  # elu(x) + 1
    if kind == "relu":
        return x.clamp_min(0.0)
    # FAVOR+ positive random features (Performer), x pre-scaled by D^-1/4 so that
    # E[phi(q).phi(k)] = exp(q.k / sqrt(D)); no stabiliser (inputs are small here).
    d = x.shape[-1]
    x = x * d ** -0.25
    w = projection.to(x.dtype)
    return torch.exp(x @ w - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(w.shape[-1])


def ref_linear_attention(q, k, v, kind, projection=None, causal=False, key_mask=None):
    """O(L^2): A = phi(q) phi(k)^T (masked), rows normalised, then @ v."""
    a = _phi(q, kind, projection) @ _phi(k, kind, projection).transpose(-1, -2)
    if causal:
        Lq, Lk = a.shape[-2:]
        a = a * torch.ones(Lq, Lk, dtype=torch.bool, device=a.device).tril()
    if key_mask is not None:
        a = a * key_mask.to(a.dtype)
    den = a.sum(-1, keepdim=True)
    return (a / torch.where(den == 0, torch.ones_like(den), den)) @ v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["elu", "relu"])
def test_linear_attention_matches_quadratic_formula(kind, causal, dtype):
    B, H, L, D = 2, 3, 13, 16
    g = _gen(11 + causal)
    mod = LinearAttention(H, D, feature_map=kind, causal=causal).to(dtype)
    # relu features: positive-leaning inputs so that no query row has phi(q) = 0
    shift = 0.5 if kind == "relu" else 0.0
    q = leaf(randn(B, H, L, D, dtype=dtype, gen=g) + shift)
    k = leaf(randn(B, H, L, D, dtype=dtype, gen=g) + shift)
    v = leaf(randn(B, H, L, D, dtype=dtype, gen=g))
    g_out = randn(B, H, L, D, dtype=dtype, gen=g)
    out = mod(q, k, v)
    assert out.dtype == dtype
    got = grads_of((out * g_out).sum(), {"q": q, "k": k, "v": v})
    r = {n: leaf(t, torch.float64) for n, t in (("q", q), ("k", k), ("v", v))}
    ref = ref_linear_attention(r["q"], r["k"], r["v"], kind, causal=causal)
    want = grads_of((ref * g_out.double()).sum(), r)
    assert_close(out, ref, F32_FWD)
    compare_grads(got, want, F32_GRAD)
    if causal:
        # the first query sees only the first key: its output is v_0 exactly
        assert_close(out[:, :, 0], v[:, :, 0].detach(), 1e-5, name="out[0]")


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("L", [64, 65, 150, 300])
@pytest.mark.parametrize("kind", ["elu", "favor+"])
def test_causal_linear_attention_over_several_chunks(kind, L):
    """Causal lengths around and past the chunk of the chunkwise form (64): earlier chunks' keys reach
    a query through the chunk states, its own chunk's through the masked product; GQA; forward and
    gradients against the quadratic formula. No tensor of [B, H, L, M, Dv] is made (the per-position
    prefix-sum form held one)."""
    from attnkit.ops.linear import CHUNK
    B, Hq, Hkv, D, M = 1, 4, 2, 16, 32
    g = _gen(41 + L)
    mod = LinearAttention(Hq, D, feature_map=kind, causal=True, num_features=M)
    q, k, v = leaf(randn(B, Hq, L, D, gen=g)), leaf(randn(B, Hkv, L, D, gen=g)), leaf(randn(B, Hkv, L, D, gen=g))
    g_out = randn(B, Hq, L, D, gen=g)
    with _LargestTensor() as seen:
        out = mod(q, k, v)
        got = grads_of((out * g_out).sum(), {"q": q, "k": k, "v": v})
    r = {n: leaf(t, torch.float64) for n, t in (("q", q), ("k", k), ("v", v))}
    G = Hq // Hkv
    proj = mod.projection.double() if kind == "favor+" else None
    ref = ref_linear_attention(r["q"], r["k"].repeat_interleave(G, 1), r["v"].repeat_interleave(G, 1), kind, proj,
                               True)
    want = grads_of((ref * g_out.double()).sum(), r)
    assert_close(out, ref, F32_FWD)
    compare_grads(got, want, F32_GRAD)
    m = M if kind == "favor+" else D
    per_position_state = B * Hkv * L * m * D
    n = -(-L // CHUNK)  # chunks; the last one padded
    assert seen.most <= max(B * Hq * n * CHUNK * CHUNK, B * Hkv * n * m * D, B * Hq * n * CHUNK * max(m, D)), seen.most
    if L > 2 * CHUNK:
        assert seen.most < per_position_state


@pytest.mark.parametrize("L", [0, 1])
def test_causal_linear_attention_at_lengths_0_and_1(L):
    """No token: an empty output and empty gradients (the chunkwise reshape raised); one token: v itself.
    Dv != D, GQA."""
    g = _gen(47)
    q, k, v = leaf(randn(2, 4, L, 8, gen=g)), leaf(randn(2, 2, L, 8, gen=g)), leaf(randn(2, 2, L, 5, gen=g))
    out = linear_attention(q, k, v, causal=True)
    assert out.shape == (2, 4, L, 5)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    if L:
        assert_close(out, v.detach().repeat_interleave(2, 1), 1e-6)


@pytest.mark.parametrize("Hkv", [2, 1], ids=["gqa", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("kind", ["elu", "favor+"])
def test_linear_attention_gqa_matches_repeated_kv(kind, causal, Hkv):
    """k, v with fewer heads: query head h reads kv head h // (Hq / Hkv), as the quadratic formula
    over K/V repeated per group gives; gradients reach the shared k, v (summed over the group).
    A key padding mask too (full case)."""
    B, Hq, L, D = 2, 4, 11, 8
    g = _gen(31 + causal)
    mod = LinearAttention(Hq, D, feature_map=kind, causal=causal, num_features=12)
    q, k, v = leaf(randn(B, Hq, L, D, gen=g)), leaf(randn(B, Hkv, L, D, gen=g)), leaf(randn(B, Hkv, L, D, gen=g))
    mask = None if causal else torch.arange(L).view(1, L) < torch.tensor([[L], [L - 4]])
    g_out = randn(B, Hq, L, D, gen=g)
    out = mod(q, k, v, mask=mask)
    got = grads_of((out * g_out).sum(), {"q": q, "k": k, "v": v})
    r = {n: leaf(t, torch.float64) for n, t in (("q", q), ("k", k), ("v", v))}
    G = Hq // Hkv
    proj = mod.projection.double() if kind == "favor+" else None
    ref = ref_linear_attention(r["q"], r["k"].repeat_interleave(G, 1), r["v"].repeat_interleave(G, 1), kind, proj,
                               causal, None if mask is None else mask.view(B, 1, 1, L))
    want = grads_of((ref * g_out.double()).sum(), r)
    assert_close(out, ref, F32_FWD)
    compare_grads(got, want, F32_GRAD)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        linear_attention(q, randn(B, 3, L, D, gen=g), randn(B, 3, L, D, gen=g))
    empty = torch.empty(B, 0, L, D)
    assert linear_attention(empty, empty, empty).shape == (B, 0, L, D)  # no heads at all: an empty result
    with pytest.raises(ValueError, match="multiple of Hkv"):
        linear_attention(q, empty, empty)


def test_ops_modules_are_not_shadowed_by_their_functions():
    """attnkit.ops.linear_attention is the function; its module is attnkit.ops.linear (a module named
    like the function it exports was unreachable as a module: `import attnkit.ops.linear_attention`
    bound the function)."""
    import importlib

    mod = importlib.import_module("attnkit.ops.linear")
    assert mod.linear_attention is linear_attention and callable(linear_attention)
    import attnkit.ops as ops

    for name in ops.__all__:
        assert not inspect.ismodule(getattr(ops, name)), name


def test_linear_attention_cross_lengths():
    g = _gen(12)
    q = randn(2, 2, 5, 8, gen=g)
    k, v = randn(2, 2, 9, 8, gen=g), randn(2, 2, 9, 8, gen=g)
    out = LinearAttention(2, 8)(q, k, v)
    assert_close(out, ref_linear_attention(q.double(), k.double(), v.double(), "elu"), F32_FWD)
    with pytest.raises(ValueError, match="Lq == Lk"):
        LinearAttention(2, 8, causal=True)(q, k, v)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_linear_attention_favor_matches_quadratic_formula(causal):
    B, H, L, D, M = 2, 2, 12, 8, 64
    g = _gen(13)
    mod = LinearAttention(H, D, feature_map="favor+", num_features=M, causal=causal)
    assert mod.projection.shape == (D, M)
    q, k = randn(B, H, L, D, gen=g, std=0.5), randn(B, H, L, D, gen=g, std=0.5)
    v = randn(B, H, L, D, gen=g)
    ref = ref_linear_attention(q.double(), k.double(), v.double(), "favor+", mod.projection.double(), causal)
    assert_close(mod(q, k, v), ref, 1e-4)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_linear_attention_favor_at_a_real_head_dim(causal):
    """D = M = 128 on unit-normal inputs: the shifted denominators reach ~1e-8, where an absolute
    epsilon (the old 1e-6) dominated them (errors up to 3.2). Reference: FAVOR+'s own weights
    exp(log phi(q) + log phi(k)) summed over features in log space, in float64."""
    B, H, L, D = 1, 2, 96, 128
    g = _gen(21 + causal)
    mod = LinearAttention(H, D, feature_map="favor+", causal=causal)
    q, k, v = (randn(B, H, L, D, gen=g) for _ in range(3))
    out = mod(q, k, v)
    w = mod.projection.double()

    def log_phi(x):
        x = x.double() * D ** -0.25
        return x @ w - 0.5 * (x * x).sum(-1, keepdim=True)

    logits = torch.logsumexp(log_phi(q)[..., :, None, :] + log_phi(k)[..., None, :, :], dim=-1)
    if causal:
        logits = logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    assert_close(out, logits.softmax(-1) @ v.double(), F32_FWD)


def test_linear_attention_favor_feature_map_of_keys():
    """feature_map(k, is_query=False) shares one shift over the keys: the quadratic form built from
    the public feature maps equals linear_attention."""
    B, H, L, D = 2, 2, 20, 16
    g = _gen(23)
    mod = LinearAttention(H, D, feature_map="favor+")
    q, k, v = (randn(B, H, L, D, gen=g) for _ in range(3))
    a = feature_map(q, "favor+", mod.projection) @ feature_map(k, "favor+", mod.projection, is_query=False).mT
    assert_close(mod(q, k, v), (a / a.sum(-1, keepdim=True)) @ v, 1e-5)


def test_linear_attention_float64_gradcheck_and_dtype_checks():
    g = _gen(24)
    mod = LinearAttention(1, 6, feature_map="favor+", num_features=8, causal=True).double()
    q, k, v = (randn(1, 1, 5, 6, gen=g).double().requires_grad_() for _ in range(3))
    assert mod(q, k, v).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b, c: mod(a, b, c), (q, k, v))
    with pytest.raises(TypeError, match="one floating dtype"):
        linear_attention(q.detach(), k.detach().float(), v.detach())
    # a 1-D key mask [Lk] broadcasts over the batch; a bad shape names the argument
    qf, kf, vf = (randn(3, 1, 4, 6, gen=g) for _ in range(3))
    keep = torch.tensor([True, True, False, True])
    assert torch.equal(linear_attention(qf, kf, vf, key_mask=keep),
                       linear_attention(qf, kf, vf, key_mask=keep.expand(3, 4)))
    with pytest.raises(ValueError, match="mask"):
        linear_attention(qf, kf, vf, key_mask=torch.ones(2, 4, dtype=torch.bool))


def test_linear_attention_favor_approximates_softmax():
    B, H, L, D = 2, 2, 12, 8
    g = _gen(14)
    q, k = randn(B, H, L, D, gen=g, std=0.5), randn(B, H, L, D, gen=g, std=0.5)
    v = randn(B, H, L, D, gen=g)
    exact = ref_softmax_attention(q.double(), k.double(), v.double())
    errs = {}
    for m in (16, 4096):
        errs[m] = rel_err(LinearAttention(H, D, feature_map="favor+", num_features=m)(q, k, v), exact)
    assert errs[4096] < errs[16], errs
    assert errs[4096] < 0.1, errs


def test_linear_attention_favor_features_are_unbiased():
    """Performer's positive features estimate exp(x . y) without bias when the projection's columns
    are Gaussian in law: mean_m exp(w_m . (x + y) - (|x|^2 + |y|^2) / 2) -> exp(x . y). Orthogonal
    blocks from a QR keep that only with R's signs folded in."""
    D, M = 8, 65536
    ws = [LinearAttention(1, D, feature_map="favor+", num_features=M, seed=s).projection.double() for s in range(3)]
    for pair in range(3):
        g = _gen(15 + pair)
        x, y = randn(D, gen=g, std=0.3).double(), randn(D, gen=g, std=0.3).double()
        est = sum(torch.exp((x + y) @ w - (x @ x + y @ y) / 2).mean() for w in ws) / len(ws)
        # measured: within 0.4% of the target; 2-12% off with the bare QR
        assert abs(est / torch.exp(x @ y) - 1) < 0.02, (pair, est.item(), torch.exp(x @ y).item())


def test_linear_attention_favor_projection_redraw():
    D, M = 8, 20
    a = LinearAttention(2, D, feature_map="favor+", num_features=M, seed=5)
    b = LinearAttention(2, D, feature_map="favor+", num_features=M, seed=5)
    c = LinearAttention(2, D, feature_map="favor+", num_features=M, seed=6)
    assert a.projection.shape == (D, M)
    assert torch.isfinite(a.projection).all() and a.projection.abs().sum() > 0
    assert torch.equal(a.projection, b.projection)  # same seed -> same buffer
    assert not torch.allclose(a.projection, c.projection)
    assert "projection" in a.state_dict()
    # orthogonal blocks: the first D columns are orthogonal directions
    w = a.projection[:, :D]
    gram = (w / w.norm(dim=0)).T @ (w / w.norm(dim=0))
    assert torch.allclose(gram, torch.eye(D), atol=1e-5)

    before = a.projection.clone()
    buf = a.projection
    a.redraw_projection()  # next seed: 6
    assert a.seed == 6
    assert a.projection is buf, "redraw must update the buffer in place"
    assert not torch.allclose(a.projection, before)
    assert torch.equal(a.projection, c.projection)
    b.redraw_projection()
    assert torch.equal(a.projection, b.projection)  # deterministic
    a.redraw_projection(seed=5)
    assert torch.equal(a.projection, before)
    # a non-favor+ module has no projection to redraw
    e = LinearAttention(2, D)
    e.redraw_projection()
    assert e.projection.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["elu", "relu", "favor+"])
def test_linear_attention_key_padding_mask(kind, dtype):
    B, H, L, D = 3, 2, 10, 8
    g = _gen(15)
    mod = LinearAttention(H, D, feature_map=kind, num_features=16).to(dtype)
    q = randn(B, H, L, D, dtype=dtype, gen=g, std=0.5) + (0.5 if kind == "relu" else 0.0)
    k = randn(B, H, L, D, dtype=dtype, gen=g, std=0.5) + (0.5 if kind == "relu" else 0.0)
    v = randn(B, H, L, D, dtype=dtype, gen=g)
    lengths = [L, 4, 0]
    mask4 = key_padding(B, L, lengths)
    out = mod(q, k, v, mask=mask4)
    out2 = mod(q, k, v, mask=mask4.view(B, L))  # [B, L] form
    assert torch.equal(out, out2)
    # padded keys have no effect: changing them changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[~mask4.view(B, 1, L, 1).expand_as(k2)] = 7.0
    v2[~mask4.view(B, 1, L, 1).expand_as(v2)] = -5.0
    assert_close(mod(q, k2, v2, mask=mask4), out, 1e-6)
    # same as attending over the real keys only
    short = mod(q[1:2], k[1:2, :, :4], v[1:2, :, :4])
    assert_close(out[1:2], short, 1e-5)
    if kind != "favor+":
        ref = ref_linear_attention(q.double(), k.double(), v.double(), kind, key_mask=mask4)
        assert_close(out, ref, F32_FWD)
    # fully padded row: zeros, not NaN
    assert torch.isfinite(out).all()
    assert torch.all(out[2] == 0)
    with pytest.raises(TypeError, match="bool"):
        mod(q, k, v, mask=mask4.float())


def test_linear_and_gated_argument_checks():
    for kw, exc, what in ((dict(causal="no"), TypeError, "causal"), (dict(seed="x"), TypeError, "seed"),
                          (dict(seed=True), TypeError, "seed")):
        with pytest.raises(exc, match=what):
            LinearAttention(2, 4, **kw)
    with pytest.raises(TypeError, match="gate_init_bias"):
        GatedAttention(2, 4, gate_init_bias="a")
    with pytest.raises(ValueError, match="gate_init_bias"):
        GatedAttention(2, 4, gate_init_bias=float("nan"))
    g = _gen(25)
    q = randn(2, 2, 3, 4, gen=g)
    with pytest.raises(ValueError, match="mask"):
        LiteAttention(2, 4)(q, q, q, mask=torch.ones(3, 3, dtype=torch.bool))


def test_linear_attention_refuses_bias_and_bad_feature_map():
    g = _gen(16)
    q, k, v = (randn(1, 2, 4, 8, gen=g) for _ in range(3))
    for fm in ("elu", "favor+"):
        with pytest.raises(ValueError, match="bias"):
            LinearAttention(2, 8, feature_map=fm)(q, k, v, bias=randn(2, 4, 4, gen=g))
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttention(2, 8, feature_map="softmax")


# ---------------------------------------------------------------------------
# LiteAttention
# ---------------------------------------------------------------------------


def ref_lite(q, k, v, w, b, mask=None):
    """logit_i = w . (q_i * k_i) + b; p = softmax over unmasked positions; out_i = p_i v_i."""
    logits = (q * k) @ w.T + b  # [B, H, L, 1]
    if mask is not None:
        L = q.shape[2]
        logits = logits.masked_fill(~mask.reshape(-1, 1, L, 1), float("-inf"))
    return safe_softmax(logits, dim=2) * v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_lite_attention_matches_formula(masked, dtype):
    B, H, L, D = 3, 2, 9, 16
    g = _gen(21 + masked)
    mod = LiteAttention(H, D).to(dtype)
    assert mod.gate_proj.weight.shape == (1, D)
    q, k, v = (leaf(randn(B, H, L, D, dtype=dtype, gen=g)) for _ in range(3))
    mask = key_padding(B, L, [L, 5, 0]) if masked else None
    g_out = randn(B, H, L, D, dtype=dtype, gen=g)
    out = mod(q, k, v, mask=mask)
    assert out.dtype == dtype and out.shape == (B, H, L, D)
    params = dict(mod.named_parameters())
    got = grads_of((out * g_out).sum(), {"q": q, "k": k, "v": v, **params})
    r = {n: leaf(t, torch.float64) for n, t in (("q", q), ("k", k), ("v", v))}
    rp = {n: leaf(p, torch.float64) for n, p in params.items()}
    ref = ref_lite(r["q"], r["k"], r["v"], rp["gate_proj.weight"], rp["gate_proj.bias"], mask)
    want = grads_of((ref * g_out.double()).sum(), {**r, **rp})
    assert_close(out, ref, F32_FWD)
    compare_grads(got, want, F32_GRAD)
    # the weights p_i = out_i / v_i sum to one per (b, h) over the real positions
    p = (out / v).detach().double()[..., 0]
    sums = p.sum(-1)
    if masked:
        assert torch.equal(mod(q, k, v, mask=mask.view(B, L)), out)  # [B, L] form
        assert torch.allclose(sums[:2], torch.ones_like(sums[:2]), atol=1e-5)
        assert torch.all(out[1, :, 5:] == 0)  # padded positions
        assert torch.all(out[2] == 0)  # fully padded row: zeros, not NaN
        for n, gr in got.items():
            assert torch.isfinite(gr).all(), f"non-finite grad {n}"
    else:
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)


def test_lite_attention_errors():
    g = _gen(23)
    mod = LiteAttention(2, 8)
    q = randn(1, 2, 6, 8, gen=g)
    k = randn(1, 2, 7, 8, gen=g)
    with pytest.raises(ValueError, match="one shape"):
        mod(q, k, randn(1, 2, 7, 8, gen=g))
    with pytest.raises(ValueError, match="bias"):
        mod(q, q, q, bias=randn(2, 6, 6, gen=g))
    with pytest.raises(TypeError, match="bool"):
        mod(q, q, q, mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match="padding mask"):
        mod(q, q, q, mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"v \[B, H, L, Dv\].*got v \[1, 2, 7, 8\]"):
        mod(q, q, k)
    for bad in (q.long(), q.half(), q.bool()):  # an int64 v gave int64 zeros; mixed dtypes passed
        with pytest.raises(TypeError, match="one floating dtype"):
            mod(q, q, bad)
        with pytest.raises(TypeError, match="one floating dtype"):
            mod(q, bad, q)
    for cls in (LiteAttention, LinearAttention):
        with pytest.raises(TypeError, match="k must be a torch.Tensor, got NoneType"):
            cls(2, 8)(q, None, q)


def test_gated_attention_refuses_a_value_head_dim_its_gate_cannot_take():
    """The gate is [.., head_dim]: Dv = 4 raised a raw broadcast error and Dv = 1 broadcast silently."""
    g = _gen(24)
    mod = GatedAttention(2, 8)
    q = randn(1, 2, 5, 8, gen=g)
    for dv in (4, 1):
        with pytest.raises(ValueError, match=f"v must have head dim 8, got v \\[1, 2, 5, {dv}\\]"):
            mod(q, q, randn(1, 2, 5, dv, gen=g))


def test_linear_attention_seed_range():
    """Seeds outside torch.Generator's range fail naming seed, and a refused redraw changes nothing."""
    with pytest.raises(ValueError, match="seed"):
        LinearAttention(2, 8, feature_map="favor+", seed=2**64)
    mod = LinearAttention(2, 8, feature_map="favor+", seed=2**64 - 1)
    before = mod.projection.clone()
    with pytest.raises(ValueError, match="seed"):
        mod.redraw_projection()
    assert mod.seed == 2**64 - 1 and torch.equal(mod.projection, before)


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------

BUILTIN = ["flash", "gated", "linear", "lite", "standard"]


@pytest.fixture
def registry_sandbox(monkeypatch):
    """Registrations made in a test go to a copy of the global registry, dropped afterwards."""
    monkeypatch.setattr(ATTENTION_REGISTRY, "_classes", dict(ATTENTION_REGISTRY._classes))
    return ATTENTION_REGISTRY


def test_registry_lists_builtins_sorted():
    names = ATTENTION_REGISTRY.list()
    assert set(BUILTIN) <= set(names)
    assert names == sorted(names)
    for n in BUILTIN:
        assert n in ATTENTION_REGISTRY
    fresh = AttentionRegistry()
    assert fresh.list() == []
    for n in ("zeta", "alpha", "mid"):
        fresh.register(n)(type(f"K_{n}", (StandardAttention,), {}))
    assert fresh.list() == ["alpha", "mid", "zeta"]


def test_registry_builds_each_kind():
    expect = {"standard": StandardAttention, "flash": FlashAttention, "gated": GatedAttention,
              "linear": LinearAttention, "lite": LiteAttention}
    for name, cls in expect.items():
        mod = ATTENTION_REGISTRY.build(name, num_heads=3, head_dim=8)
        assert type(mod) is cls and mod.num_heads == 3 and mod.head_dim == 8
        assert ATTENTION_REGISTRY.get(name) is cls
        assert ATTENTION_REGISTRY.name_of(mod) == name
    g = ATTENTION_REGISTRY.build("gated", num_heads=2, head_dim=4, dropout=0.25, gate_init_bias=-0.5)
    assert g.dropout == 0.25 and g.gate_init_bias == -0.5 and torch.all(g.gate.bias == -0.5)
    lin = ATTENTION_REGISTRY.build("linear", num_heads=2, head_dim=4, feature_map="relu", causal=True)
    assert lin.feature_map == "relu" and lin.causal


def test_registry_register_user_class(registry_sandbox):
    @registry_sandbox.register("scaled_standard")
    class Halved(BaseAttention):
        def __init__(self, num_heads, head_dim, factor=0.5):
            super().__init__()
            self._h, self._d, self.factor = num_heads, head_dim, factor

        @property
        def num_heads(self):
            return self._h

        @property
        def head_dim(self):
            return self._d

        def forward(self, q, k, v, mask=None, bias=None):
            return self.factor * attnkit.attention(q, k, v, mask=mask, bias=bias)

    assert Halved.__name__ == "Halved"  # the decorator returns the class itself
    assert "scaled_standard" in registry_sandbox.list()
    assert registry_sandbox.list() == sorted(registry_sandbox.list())
    mod = registry_sandbox.build("scaled_standard", num_heads=2, head_dim=8, factor=0.25)
    assert isinstance(mod, Halved) and mod.factor == 0.25
    g = _gen(31)
    q, k, v = (randn(1, 2, 5, 8, gen=g) for _ in range(3))
    assert_close(mod(q, k, v), 0.25 * ref_softmax_attention(q.double(), k.double(), v.double()), 2e-5)
    # re-registering the same class under its name is allowed; another class is not
    registry_sandbox.register("scaled_standard")(Halved)
    with pytest.raises(ValueError, match="already registered"):
        registry_sandbox.register("scaled_standard")(type("Other", (StandardAttention,), {}))
    with pytest.raises(ValueError, match="already registered"):
        registry_sandbox.register("standard")(Halved)
    assert registry_sandbox.get("standard") is StandardAttention
    # swap can target the user kind
    model = nn.Module()
    model.a = StandardAttention(2, 8)
    assert swap(model, "attention", "scaled_standard") == 1
    assert isinstance(model.a, Halved) and model.a.factor == 0.5


def test_registry_user_class_gone_after_sandbox():
    assert "scaled_standard" not in ATTENTION_REGISTRY.list()


def test_registry_errors():
    with pytest.raises(KeyError) as ei:
        ATTENTION_REGISTRY.build("nonexistent_kind", num_heads=1, head_dim=4)
    msg = str(ei.value)
    assert "nonexistent_kind" in msg
    for n in BUILTIN:
        assert n in msg, f"{n!r} not listed in {msg}"
    reg = AttentionRegistry()
    with pytest.raises(TypeError, match="BaseAttention"):
        reg.register("x")(nn.Linear)
    with pytest.raises(TypeError, match="BaseAttention"):
        reg.register("x")(lambda q, k, v: q)
    with pytest.raises(ValueError, match="non-empty"):
        reg.register("")
    with pytest.raises(ValueError, match="non-empty"):
        reg.register(None)
    assert reg.list() == []


# ---------------------------------------------------------------------------
# from_config
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Cfg:
    num_heads: int = 4
    head_dim: int = 8
    dropout: float = 0.1
    gate_init_bias: float = 0.25
    feature_map: str = "relu"
    d_model: int = 999  # not an argument of any module: ignored


def test_from_config_picks_matching_fields():
    cfg = _Cfg()
    g = GatedAttention.from_config(cfg)
    assert type(g) is GatedAttention
    assert (g.num_heads, g.head_dim, g.dropout, g.gate_init_bias) == (4, 8, 0.1, 0.25)
    assert torch.all(g.gate.bias == 0.25)
    s = StandardAttention.from_config(cfg)
    assert type(s) is StandardAttention and (s.num_heads, s.head_dim, s.dropout) == (4, 8, 0.1)
    lin = LinearAttention.from_config(cfg, causal=True)
    assert lin.feature_map == "relu" and lin.causal
    lite = LiteAttention.from_config(cfg, head_dim=16)
    assert lite.head_dim == 16 and lite.gate_proj.in_features == 16
    # overrides win over the config
    g2 = GatedAttention.from_config(cfg, num_heads=2, dropout=0.0, gate_init_bias=-1.0)
    assert (g2.num_heads, g2.head_dim, g2.dropout, g2.gate_init_bias) == (2, 8, 0.0, -1.0)
    assert cfg.num_heads == 4  # config untouched


def test_from_config_errors():
    with pytest.raises(TypeError, match="gate_init_bias"):
        StandardAttention.from_config(_Cfg(), gate_init_bias=2.0)
    with pytest.raises(TypeError, match="bogus"):
        GatedAttention.from_config(_Cfg(), bogus=1)
    with pytest.raises(TypeError, match="dataclass"):
        StandardAttention.from_config({"num_heads": 2, "head_dim": 4})
    with pytest.raises(TypeError, match="dataclass"):
        StandardAttention.from_config(_Cfg)  # the class, not an instance
    with pytest.raises(ValueError, match="num_heads"):
        StandardAttention.from_config(_Cfg(num_heads=0))


# ---------------------------------------------------------------------------
# swap / SwappableMixin / from_standard
# ---------------------------------------------------------------------------


class _Inner(nn.Module):
    def __init__(self, att: BaseAttention):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.att = att


class _Model(SwappableMixin, nn.Module):
    """Attention modules at several depths and in containers."""

    def __init__(self, kinds):
        super().__init__()
        mods = [ATTENTION_REGISTRY.build(k, num_heads=2, head_dim=8) for k in kinds]
        self.top = mods[0]
        self.inner = _Inner(mods[1])
        self.stack = nn.ModuleList([nn.Identity(), mods[2]])
        self.table = nn.ModuleDict({"deep": nn.Sequential(nn.Identity(), _Inner(mods[3]))})

    def attentions(self) -> list[BaseAttention]:
        return [self.top, self.inner.att, self.stack[1], self.table["deep"][1].att]

    def forward(self, q, k, v):
        return torch.stack([a(q, k, v) for a in self.attentions()])


def _qkv(seed, dtype=torch.float32, B=2, H=2, L=7, D=8):
    g = _gen(seed)
    return tuple(randn(B, H, L, D, dtype=dtype, gen=g) for _ in range(3))


def _randomize_gates(model: nn.Module, seed: int) -> None:
    g = _gen(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GatedAttention):
                m.gate.weight.copy_(randn(*m.gate.weight.shape, gen=g, std=0.5))
                m.gate.bias.copy_(randn(*m.gate.bias.shape, gen=g))


def test_swap_standard_to_flash_keeps_outputs():
    model = _Model(["standard"] * 4)
    for a in model.attentions():
        a.dropout = 0.125
    model.eval()
    q, k, v = _qkv(41)
    before = model(q, k, v)
    old = model.attentions()
    n = swap(model, "attention", "flash")
    assert n == 4
    new = model.attentions()
    for o, a in zip(old, new):
        assert type(a) is FlashAttention and a is not o
        assert (a.num_heads, a.head_dim, a.dropout) == (2, 8, 0.125)
        assert a.backend == "auto", "a swapped-in flash must use the dispatcher, not the old backend"
        assert not a.training
    assert isinstance(model.inner.norm, nn.LayerNorm)  # other modules untouched
    assert_close(model(q, k, v), before, 2e-5)
    assert_close(before[0], ref_softmax_attention(q.double(), k.double(), v.double()), 2e-5)


def test_swap_mixed_model_and_round_trip_keeps_gate_weights():
    torch.manual_seed(0)
    model = _Model(["gated", "standard", "gated", "gated"])
    model.top.gate_init_bias = 0.3  # a constructor setting that must carry over
    _randomize_gates(model, 42)
    model.eval()
    q, k, v = _qkv(43)
    before = model(q, k, v)
    gates = [(a.gate.weight.clone(), a.gate.bias.clone()) if isinstance(a, GatedAttention) else None
             for a in model.attentions()]

    # gated -> "gated": every module rebuilt (standard becomes gated with a fresh gate)
    old = model.attentions()
    assert model.swap("attention", "gated") == 4
    for i, (o, a) in enumerate(zip(old, model.attentions())):
        assert type(a) is GatedAttention and a is not o
        if gates[i] is not None:
            assert torch.equal(a.gate.weight, gates[i][0]) and torch.equal(a.gate.bias, gates[i][1])
    assert model.top.gate_init_bias == 0.3
    after = model(q, k, v)
    for i in (0, 2, 3):
        assert_close(after[i], before[i], 1e-6, name=f"gated module {i}")
    # the former standard one now has an init gate: sigmoid(1.0) * plain attention
    assert_close(after[1], before[1] * torch.sigmoid(torch.tensor(1.0)), 2e-6)

    # -> "flash": the gate goes away, every module computes plain softmax attention
    assert swap(model, "attention", "flash") == 4
    plain = ref_softmax_attention(q.double(), k.double(), v.double())
    out = model(q, k, v)
    for i, a in enumerate(model.attentions()):
        assert type(a) is FlashAttention
        assert not hasattr(a, "gate")
        assert_close(out[i], plain, 2e-5)


def test_swap_preserves_train_eval_dtype_and_grad_flow():
    model = _Model(["gated", "lite", "gated", "lite"]).double()
    _randomize_gates(model, 44)
    model.train()
    model.stack[1].eval()
    modes = [a.training for a in model.attentions()]
    assert modes == [True, True, False, True]
    assert swap(model, "attention", "gated") == 4
    assert [a.training for a in model.attentions()] == modes
    for a in model.attentions():
        assert a.gate.weight.dtype == torch.float64
    # the swapped modules are registered: their parameters are the model's and get grads
    names = {n for n, _ in model.named_parameters()}
    assert "table.deep.1.att.gate.weight" in names and "top.gate.weight" in names
    q, k, v = _qkv(45, torch.float64)
    model.eval()
    model(q, k, v).sum().backward()
    assert model.top.gate.weight.grad is not None and model.top.gate.weight.grad.abs().sum() > 0


def test_swap_errors_leave_model_alone():
    model = _Model(["standard"] * 4)
    old = model.attentions()
    with pytest.raises(KeyError, match="no_such_kind") as ei:
        swap(model, "attention", "no_such_kind")
    assert "standard" in str(ei.value) and "flash" in str(ei.value)
    with pytest.raises(ValueError, match="attention"):
        swap(model, "norm", "flash")
    with pytest.raises(TypeError):
        swap(StandardAttention(2, 8), "attention", "flash")
    assert all(a is o for a, o in zip(model.attentions(), old))
    assert swap(nn.Sequential(nn.Linear(2, 2)), "attention", "flash") == 0


def test_swap_refuses_to_drop_causal_and_changes_nothing():
    """A causal LinearAttention swapped to a kind without a causal setting would let queries see later
    keys: refused, naming causal, and no module of the model is replaced (not even the ones before it)."""
    model = _Model(["standard", "linear", "standard", "standard"])
    model.inner.att = LinearAttention(2, 8, causal=True)
    old = model.attentions()
    with pytest.raises(ValueError, match="causal"):
        swap(model, "attention", "flash")
    assert all(a is o for a, o in zip(model.attentions(), old))
    assert swap(model, "attention", "linear") == 4  # the causal one keeps causal
    assert model.inner.att.causal and not model.top.causal


def test_swappable_mixin():
    model = _Model(["standard", "gated", "standard", "gated"])
    assert isinstance(model, SwappableMixin)
    assert model.swap("attention", "flash") == 4
    assert all(type(a) is FlashAttention for a in model.attentions())
    with pytest.raises(KeyError):
        model.swap("attention", "nope")


def test_flash_from_standard():
    std = StandardAttention(3, 16, dropout=0.2)
    std.eval()
    fl = FlashAttention.from_standard(std)
    assert type(fl) is FlashAttention
    assert (fl.num_heads, fl.head_dim, fl.dropout) == (3, 16, 0.2)
    assert not fl.training
    assert fl.backend == "auto"
    q, k, v = _qkv(46, H=3, D=16)
    assert_close(fl(q, k, v), std(q, k, v), 2e-5)
    gated = GatedAttention(2, 8, dropout=0.1)
    fg = FlashAttention.from_standard(gated)
    assert type(fg) is FlashAttention and (fg.num_heads, fg.head_dim, fg.dropout) == (2, 8, 0.1)
    assert fg.training
    with pytest.raises(TypeError, match="BaseAttention"):
        FlashAttention.from_standard(nn.Linear(2, 2))


def test_swap_parameterless_module_into_float64_model():
    model = nn.Module()
    model.proj = nn.Linear(8, 8)
    model.att = StandardAttention(2, 8)
    model = model.double()
    assert swap(model, "attention", "gated") == 1
    q, k, v = _qkv(47, torch.float64)
    out = model.att(q, k, v)  # RuntimeError: mat1 and mat2 must have the same dtype
    assert out.dtype == torch.float64


@pytest.mark.parametrize("seed", [2.7, "3", True])
def test_redraw_projection_takes_an_int_seed(seed):
    m = attnkit.LinearAttention(2, 4, feature_map="favor+")
    before = m.projection.clone()
    with pytest.raises(TypeError, match="seed must be an int"):
        m.redraw_projection(seed)
    assert torch.equal(m.projection, before)


def test_linear_and_lite_attention_without_keys():
    """No keys: every feature map returns zeros (FAVOR+ raised an IndexError from its max), and LiteAttention
    of no tokens returns no tokens."""
    q, none = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 0, 4)
    for fm in ("elu", "relu", "favor+"):
        out = attnkit.LinearAttention(2, 4, feature_map=fm)(q, none, none)
        assert out.shape == q.shape and torch.equal(out, torch.zeros_like(out)), fm
    assert attnkit.LiteAttention(2, 4)(none, none, none).shape == none.shape


def test_swap_keeps_a_shared_module_shared():
    shared = attnkit.GatedAttention(2, 8)
    model = nn.ModuleDict({"x": shared, "y": nn.ModuleDict({"z": shared})})
    n_params = sum(p.numel() for p in model.parameters())
    assert attnkit.swap(model, "attention", "flash") == 1
    assert model["x"] is model["y"]["z"] and isinstance(model["x"], attnkit.FlashAttention)
    assert sum(p.numel() for p in model.parameters()) <= n_params


def test_lite_attention_float64_at_float64_precision():
    """float64 inputs are computed in float64 (no float32 logits, no epsilon in the denominator)."""
    mod = LiteAttention(2, 16).double()
    q, k, v = (randn(3, 2, 9, 16, dtype=torch.float64, gen=_gen(30 + i)) for i in range(3))
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4, [False] * 9])
    for m in (None, mask):
        ref = ref_lite(q, k, v, mod.gate_proj.weight, mod.gate_proj.bias, m)
        out = mod(q, k, v, mask=m)
        assert ((out - ref).norm() / ref.norm()).item() < 1e-12


@pytest.mark.parametrize("cls", [LiteAttention, LinearAttention])
def test_output_dropout_only_in_training(cls):
    """Output dropout acts in training only: in eval the module equals one without dropout."""
    mod = cls(2, 8, dropout=0.5).eval()
    q, k, v = (randn(2, 2, 16, 8, gen=_gen(40 + i)) for i in range(3))
    ref = cls(2, 8).eval()
    ref.load_state_dict(mod.state_dict())
    assert torch.equal(mod(q, k, v), ref(q, k, v))
    mod.train()
    torch.manual_seed(0)
    assert not torch.equal(mod(q, k, v), ref(q, k, v))


def test_linear_attention_favor_keeps_fewer_features_than_head_dim():
    mod = LinearAttention(2, 16, feature_map="favor+", num_features=8)
    assert mod.num_features == 8 and mod.projection.shape == (16, 8)


@pytest.mark.parametrize("shape", [(1, 2, 0, 4), (1, 0, 3, 4)], ids=["no_tokens", "no_heads"])
def test_causal_linear_attention_of_nothing_is_empty(shape):
    """No tokens or no heads: an empty result, causal or not."""
    e = torch.randn(*shape)
    for causal in (False, True):
        assert linear_attention(e, e, e, causal=causal).shape == shape, causal
