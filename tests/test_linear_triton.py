"""Linear attention on attnkit's Triton kernels (ops/chunk_product.py, backend="triton" of
ops.linear_attention), causal and not, against the quadratic formula in float64.

On the CPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, as CI runs them); without it
those tests are skipped. The CUDA tests take real shapes in bfloat16 and float16.
"""

from __future__ import annotations


import pytest
import torch

from attnkit import LinearAttention
from attnkit.ops import chunk_product as cp
from attnkit.ops import linear_attention
from cases import TRITON_INTERPRET
from conftest import LOWP, assert_close_rel, randn, rel_err
from test_modules import _phi, ref_linear_attention  # the float64 formula (helpers only: no tests imported)


@pytest.fixture
def tdevice(device):
    if device == "cpu" and not TRITON_INTERPRET:
        pytest.skip("the Triton kernels run on the CPU only with TRITON_INTERPRET=1")
    return device


def _rep(x, heads):
    return x.repeat_interleave(heads // x.shape[1], 1)


def _product64(a, b, c, sa=None, sb=None, reverse=False, causal=True):
    """The quadratic form of chunk_product in float64, heads repeated to the larger count:
    (y, rowsum of the masked a b^T)."""
    H = max(a.shape[1], b.shape[1])
    a, b, c = _rep(a.double(), H), _rep(b.double(), H), _rep(c.double(), H)
    w = a @ b.transpose(-1, -2)
    seen = torch.ones(a.shape[2], b.shape[2], dtype=torch.bool, device=a.device)
    if causal:
        seen = seen.triu() if reverse else seen.tril()
    plain = (w * seen).sum(-1)
    if sa is not None:
        w = w + sa.double()[..., :, None]
    if sb is not None:
        w = w + _rep(sb.double(), H)[..., None, :]
    w = w * seen
    return w @ c, plain


def _quadratic(q, k, v, kind="elu", projection=None, key_mask=None, causal=True):
    """Linear attention, O(Lq Lk), in q's dtype (test_modules' reference), with k, v [B, Hkv, Lk, *]
    repeated over the query heads' groups and key_mask [B, Lk]."""
    G = q.shape[1] // k.shape[1]
    mask = None if key_mask is None else key_mask.view(key_mask.shape[0], 1, 1, -1)
    return ref_linear_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), kind, projection, causal,
                                mask)


def _grads(out, g_out, xs):
    return torch.autograd.grad(out, xs, g_out)


# shapes (B, Ha, Hb, L, M, E): one position; lengths off the 128-position chunk; feature / value dims off 16;
# M past one feature block (the kernel loops) and E past one value block (the grid splits); a with more
# heads than b and c (GQA, as the forward) and fewer (as dk and dv)
PRODUCT_SHAPES = [(2, 1, 1, 1, 8, 8), (1, 3, 3, 70, 8, 12), (2, 2, 2, 130, 20, 70), (1, 4, 2, 128, 16, 16),
                  (1, 2, 4, 200, 80, 24)]


def _features64(op):
    x = op.x.double()
    x = x if op.phi is None else _phi(x, op.phi)
    return x if op.scale is None else x * op.scale.double()[..., None]


MODES = {"fwd": dict(), "rev": dict(reverse=True), "full": dict(causal=False)}


def _lb(L, mode):
    """b's and c's length: a's when causal, another (more chunks, or fewer) when not."""
    return L if mode != "full" else (L + 130 if L < 100 else L // 3)


@pytest.mark.parametrize("shape", PRODUCT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("scalars", ["none", "sa", "sb"])
def test_chunk_product_matches_quadratic_form(tdevice, shape, mode, scalars):
    B, Ha, Hb, L, M, E = shape
    H, Lb = max(Ha, Hb), _lb(L, mode)
    seed = sum(shape) * 6 + 3 * list(MODES).index(mode) + ["none", "sa", "sb"].index(scalars)
    g = torch.Generator().manual_seed(seed)
    a = randn(B, Ha, L, M, gen=g, device=tdevice)
    b = randn(B, Hb, Lb, M, gen=g, device=tdevice)
    c = randn(B, Hb, Lb, E, gen=g, device=tdevice)
    kw = {}
    if scalars != "none":
        kw[scalars] = randn(B, H if scalars == "sa" else Hb, L if scalars == "sa" else Lb, gen=g, device=tdevice)
    y, den = cp.chunk_product(a, b, c, **MODES[mode], **kw)
    want, _ = _product64(a, b, c, **MODES[mode], **kw)
    assert den is None and y.dtype == torch.float32 and y.shape == (B, H, L, E)
    assert_close_rel(y, want)


@pytest.mark.parametrize("phi", ["elu", "relu"])
def test_chunk_product_fused_operands(tdevice, phi):
    """Feature maps applied on load, per-position scales, the derivative factor, strided (transposed)
    operands in bf16, a narrower output dtype."""
    B, Ha, Hb, L, M, E = 2, 4, 2, 150, 24, 40
    g = torch.Generator().manual_seed(11 + len(phi))
    a = cp.Operand(randn(B, L, Ha, M, gen=g, device=tdevice).transpose(1, 2), phi, randn(B, Ha, L, gen=g, device=tdevice))
    b = cp.Operand(randn(B, Hb, L, M, gen=g, device=tdevice, dtype=torch.bfloat16), phi)
    c = cp.Operand(randn(B, Hb, L, E, gen=g, device=tdevice), None, randn(B, Hb, L, gen=g, device=tdevice))
    x = cp.Operand(randn(B, L, 1, E, gen=g, device=tdevice).transpose(1, 2), phi)
    assert not a.x.is_contiguous()
    for mode in MODES.values():
        y, _ = cp.chunk_product(a, b, c, dphi=x, **mode)
        want, _ = _product64(_features64(a), _features64(b), _features64(c), **mode)
        xd = x.x.double()
        want = want * (torch.where(xd > 0, 1.0, torch.exp(xd)) if phi == "elu" else (xd > 0).double())
        assert_close_rel(y, want)
    half, _ = cp.chunk_product(a, b, c, out_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert rel_err(half, _product64(_features64(a), _features64(b), _features64(c))[0]) < 8e-3


@pytest.mark.parametrize("shape", PRODUCT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "full"])
def test_chunk_product_normalised_with_its_denominator(tdevice, shape, mode):
    B, Ha, Hb, L, M, E = shape
    Lb = _lb(L, mode)
    g = torch.Generator().manual_seed(7 + L)
    a, b = randn(B, Ha, L, M, gen=g, device=tdevice).abs(), randn(B, Hb, Lb, M, gen=g, device=tdevice).abs()
    c = randn(B, Hb, Lb, E, gen=g, device=tdevice)
    y, den = cp.chunk_product(a, b, c, den=True, **MODES[mode])
    num, den64 = _product64(a, b, c, **MODES[mode])
    assert_close_rel(den, den64, name="den")
    assert_close_rel(y, num / den64[..., None])


def test_chunk_product_refuses_bad_input():
    a = torch.rand(2, 1, 5, 4)
    with pytest.raises(ValueError, match="a causal product needs a and b of one length, got La = 5, Lb = 6"):
        cp.chunk_product(a, torch.rand(2, 1, 6, 4), torch.rand(2, 1, 6, 3))
    with pytest.raises(ValueError, match=r"c must be \[B=2, H, L=6"):
        cp.chunk_product(a, torch.rand(2, 1, 6, 4), torch.rand(2, 1, 5, 3), causal=False)
    with pytest.raises(ValueError, match=r"b must be \[B=2, H, L=5"):
        cp.chunk_product(a, torch.rand(3, 1, 5, 4), torch.rand(2, 1, 5, 3))
    with pytest.raises(ValueError, match="Ha, Hb dividing"):
        cp.chunk_product(a, torch.rand(2, 1, 5, 3), torch.rand(2, 1, 5, 3))
    with pytest.raises(ValueError, match="Ha, Hb dividing"):
        cp.chunk_product(torch.rand(2, 3, 5, 4), torch.rand(2, 2, 5, 4), torch.rand(2, 2, 5, 3))
    with pytest.raises(ValueError, match="den=True takes no sa"):
        cp.chunk_product(a, a, a, den=True, sa=torch.rand(2, 1, 5))
    with pytest.raises(ValueError, match="feature map must be one of"):
        cp.chunk_product(cp.Operand(a, "gelu"), a, a)
    with pytest.raises(TypeError, match=r"a must be a torch.Tensor, got list"):
        cp.chunk_product([1.0], a, a)
    with pytest.raises(ValueError, match=r"a \[B, Ha, La, M\] and b \[B, Hb, Lb, M\] must be 4-D, got \[2, 5\]"):
        cp.chunk_product(torch.rand(2, 5), a, a)
    with pytest.raises(ValueError, match="precision must be one of"):
        cp.chunk_product(a, a, a, precision="bf16")
    with pytest.raises(TypeError, match="causal must be a bool, got str"):
        cp.chunk_product(a, a, a, causal="False")
    with pytest.raises(ValueError, match="dphi.x must be"):  # checked with no keys too (that returns early)
        cp.chunk_product(a, torch.rand(2, 1, 0, 4), torch.rand(2, 1, 0, 3), causal=False,
                         dphi=cp.Operand(torch.rand(2, 1, 5, 9), "elu"))
    with pytest.raises(ValueError, match=r"scale must be \[2, 1, 5\]"):
        cp.chunk_product(cp.Operand(a, None, torch.rand(2, 5)), a, a)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kind", ["elu", "relu", "favor+"])
@pytest.mark.parametrize("L", [1, 65, 150])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_linear_attention_forward_and_gradients(tdevice, kind, L, dtype, causal):
    """Forward and the three gradients against float64, GQA (4 query heads on 2 kv heads), Dv != D,
    Lq != Lk when not causal; low precision within 3x of the quadratic formula computed in that dtype."""
    B, Hq, Hkv, D, Dv, M = 2, 4, 2, 12, 20, 24
    Lk = L if causal else {1: 3, 65: 200, 150: 1}[L]
    g = torch.Generator().manual_seed(L * 7 + len(kind) + causal)
    shift = 0.5 if kind == "relu" else 0.0  # no query row with phi(q) = 0
    q = (randn(B, Hq, L, D, gen=g) + shift).to(tdevice, dtype)
    k = (randn(B, Hkv, Lk, D, gen=g) + shift).to(tdevice, dtype)
    v = randn(B, Hkv, Lk, Dv, gen=g).to(tdevice, dtype)
    proj = randn(D, M, gen=g).to(tdevice) if kind == "favor+" else None
    g_out = randn(B, Hq, L, Dv, gen=g).to(tdevice, dtype)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = linear_attention(*xs, feature_map_kind=kind, projection=proj, causal=causal, backend="triton")
    assert out.dtype == dtype and out.shape == (B, Hq, L, Dv)
    got = _grads(out, g_out, xs)
    r = [x.detach().double().requires_grad_() for x in (q, k, v)]
    p64 = None if proj is None else proj.double()
    ref = _quadratic(*r, kind, p64, causal=causal)
    want = _grads(ref, g_out.double(), r)
    base = f32 = None
    if dtype in LOWP:
        lp = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        low = _quadratic(*lp, kind, None if proj is None else proj.to(dtype), causal=causal)
        base = [rel_err(low, ref)] + [rel_err(x, y) for x, y in zip(_grads(low, g_out, lp), want)]
    else:  # plain float32 math of the same algorithm (the PyTorch form): for gradients that are 0 by cancellation
        lp = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        plain = linear_attention(*lp, feature_map_kind=kind, projection=proj, causal=causal, backend="chunked")
        f32 = [rel_err(plain, ref)] + [rel_err(x, y) for x, y in zip(_grads(plain, g_out, lp), want)]
    for i, (name, x, y) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *got), (ref, *want))):
        assert x.dtype == dtype, name
        assert_close_rel(x, y, None if base is None else base[i], rtol=2e-5 if i == 0 else 5e-5, name=name,
                         fp32_baseline_err=None if f32 is None else f32[i])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_linear_attention_masks_and_empty_rows(tdevice, causal):
    """A key padding mask; queries whose visible keys are all masked get 0 (not NaN) and finite
    gradients (not causal: a batch row whose keys are all masked); non-contiguous q, k, v (transposed
    views)."""
    B, H, L, D = 2, 3, 90, 16
    g = torch.Generator().manual_seed(5 + causal)
    q = randn(B, L, H, D, gen=g, device=tdevice).transpose(1, 2).requires_grad_()
    k = randn(B, L, H, D, gen=g, device=tdevice).transpose(1, 2).requires_grad_()
    v = randn(B, L, H, D, gen=g, device=tdevice).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    start = torch.tensor([[0], [70 if causal else L]], device=tdevice)  # batch row 1: its first 70 keys masked, or all
    keep = torch.arange(L, device=tdevice)[None, :] >= start
    out = linear_attention(q, k, v, causal=causal, key_mask=keep, backend="triton")
    assert torch.isfinite(out).all()
    empty = 70 if causal else L
    assert torch.equal(out[1, :, :empty], torch.zeros_like(out[1, :, :empty]))
    g_out = randn(B, H, L, D, gen=g, device=tdevice)
    got = torch.autograd.grad(out, (q, k, v), g_out)
    r = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = _quadratic(*r, key_mask=keep, causal=causal)
    want = torch.autograd.grad(ref, r, g_out.double())
    assert_close_rel(out, ref)
    for name, x, y in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(x).all(), name
        assert_close_rel(x, y, rtol=5e-5, name=name)


@pytest.mark.parametrize("Lq, Lk, causal", [(0, 0, True), (1, 1, True), (0, 3, False), (3, 0, False), (3, 1, False)])
def test_triton_linear_attention_at_lengths_0_and_1(tdevice, Lq, Lk, causal):
    """No queries, no keys (every query gets 0, every gradient 0), one key (every query gets its value)."""
    q, k, v = (randn(2, 4, Lq, 8, device=tdevice).requires_grad_(), randn(2, 2, Lk, 8, device=tdevice).requires_grad_(),
               randn(2, 2, Lk, 5, device=tdevice).requires_grad_())
    out = linear_attention(q, k, v, causal=causal, backend="triton")
    assert out.shape == (2, 4, Lq, 5)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    if not Lq:
        assert not k.grad.abs().sum() and not v.grad.abs().sum()
    if Lk == 0:
        assert not out.abs().sum() and not q.grad.abs().sum()
    elif Lq:
        want = v.detach().repeat_interleave(2, 1).expand(2, 4, Lq, 5)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_triton_and_chunked_agree_and_module_passes_backend(tdevice, monkeypatch):
    """The module's backend reaches the op (the kernels run for "triton" only): both backends give the
    same result (float32), and bad backends are refused by name."""
    calls = []
    real = cp.fused_linear_attention
    monkeypatch.setattr(cp, "fused_linear_attention", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    q, k, v = (randn(1, 2, 100, 8, gen=g, device=tdevice) for _ in range(3))
    for causal in (True, False):
        a = LinearAttention(2, 8, causal=causal, backend="triton")(q, k, v)
        assert len(calls) == 1
        b = LinearAttention(2, 8, causal=causal, backend="chunked")(q, k, v)
        assert len(calls) == 1
        calls.clear()
        assert rel_err(a, b) < 1e-5
    with pytest.raises(ValueError, match="backend must be one of"):
        LinearAttention(2, 8, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_attention(q, k, v, causal=True, backend="flex")
    with pytest.raises(TypeError, match="causal must be a bool, got str"):
        linear_attention(q, k, v, causal="False")


def test_triton_backend_refuses_float64_and_auto_keeps_it_in_pytorch():
    q = torch.rand(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton' needs .* not float64"):
        linear_attention(q, q, q, causal=True, backend="triton")
    assert linear_attention(q, q, q, causal=True).dtype == torch.float64  # auto: the PyTorch form


@pytest.mark.skipif(TRITON_INTERPRET, reason="the refusal is for a CPU tensor without the interpreter")
def test_triton_backend_refuses_cpu_without_the_interpreter():
    q = torch.rand(1, 1, 4, 8)
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        linear_attention(q, q, q, causal=True, backend="triton")


def test_auto_takes_the_kernels_only_for_cuda_tensors(monkeypatch):
    """auto on a CPU tensor never calls the kernels, even under the interpreter; on CUDA it does."""
    calls = []
    real = cp.fused_linear_attention
    monkeypatch.setattr(cp, "fused_linear_attention", lambda *a: calls.append(1) or real(*a))
    q = torch.rand(1, 2, 70, 8)
    for causal in (True, False):
        linear_attention(q, q, q, causal=causal)
    assert not calls
    if torch.cuda.is_available():
        for causal in (True, False):
            linear_attention(q.cuda(), q.cuda(), q.cuda(), causal=causal)
        assert len(calls) == 2


def test_kernel_path_holds_no_quadratic_or_per_position_state(tdevice):
    """The kernels' buffers: chunk states [N, L / CHUNK, M, E] and [N, L] vectors, never [L, L] or
    [L, M, E] per row (the prefix-sum form's)."""
    if tdevice != "cuda":
        pytest.skip("allocation sizes are read from the CUDA caching allocator")
    N, L, M = 8, 4096, 64
    q, k, v = (torch.rand(1, N, L, M, device="cuda") for _ in range(3))
    per_position = N * L * M * M * 4
    for causal in (True, False):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        linear_attention(q, k, v, causal=causal, backend="triton")
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra < per_position / 8, (causal, extra)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("L", [1000, 4096])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cuda_triton_linear_attention_real_shapes(dtype, L, causal):
    """B 2, H 8 (GQA 8/2), D 64, elu features (not causal: 700 more keys than queries): output and
    gradients against float64, within 3x of the quadratic formula in the same dtype, and as close as the
    PyTorch form."""
    B, Hq, Hkv, D = 2, 8, 2, 64
    Lk = L if causal else L + 700
    g = torch.Generator().manual_seed(L + causal)
    q, k = randn(B, Hq, L, D, gen=g).cuda().to(dtype), randn(B, Hkv, Lk, D, gen=g).cuda().to(dtype)
    v = randn(B, Hkv, Lk, D, gen=g).cuda().to(dtype)
    g_out = randn(B, Hq, L, D, gen=g).cuda().to(dtype)
    r = [x.double().requires_grad_() for x in (q, k, v)]
    ref = _quadratic(*r, causal=causal)
    want = _grads(ref, g_out.double(), r)
    lp = [x.clone().requires_grad_() for x in (q, k, v)]
    low = _quadratic(*lp, causal=causal)
    base = [rel_err(low, ref)] + [rel_err(x, y) for x, y in zip(_grads(low, g_out, lp), want)]
    for backend in ("triton", "chunked"):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = linear_attention(*xs, causal=causal, backend=backend)
        got = _grads(out, g_out, xs)
        for i, (name, x, y) in enumerate(zip(("out", "dq", "dk", "dv"), (out, *got), (ref, *want))):
            assert_close_rel(x, y, base[i], name=f"{backend} {name}")


# ---------------------------------------------------------------------------
# from a review of the kernels (2026-11-25): each fails on the code before its fix
# ---------------------------------------------------------------------------


def test_chunk_product_scalars_with_scales_and_features(tdevice):
    """sa / sb beside scales on every operand and a feature map on c, forward and reverse: the scale of c
    multiplies the scalars' terms too; and den beside a scaled c counts the weights without that scale."""
    B, H, L, M, E = 1, 2, 100, 16, 24
    g = torch.Generator().manual_seed(19)

    def op(W, phi=None):
        return cp.Operand(randn(B, H, L, W, gen=g, device=tdevice), phi, randn(B, H, L, gen=g, device=tdevice))

    a, b, c = op(M), op(M, "relu"), op(E, "elu")
    sa, sb = randn(B, H, L, gen=g, device=tdevice), randn(B, H, L, gen=g, device=tdevice)
    fa, fb, fc = _features64(a), _features64(b), _features64(c)
    for mode in MODES.values():
        y, _ = cp.chunk_product(a, b, c, sa=sa, sb=sb, **mode)
        assert_close_rel(y, _product64(fa, fb, fc, sa=sa, sb=sb, **mode)[0])
    pa, pb = cp.Operand(a.x, "elu"), cp.Operand(b.x, "elu")
    y, den = cp.chunk_product(pa, pb, c, den=True)
    num, den64 = _product64(_features64(pa), _features64(pb), fc)
    assert_close_rel(den, den64, name="den")
    assert_close_rel(y, num / den64[..., None])


def test_chunk_product_without_features_still_adds_the_scalars(tdevice):
    """M = 0: a . b is 0, but sum (sa_i + sb_j) c_j is not (the kernels returned zeros)."""
    g = torch.Generator().manual_seed(23)
    B, H, L, E = 2, 2, 70, 8
    a, b = torch.empty(B, H, L, 0, device=tdevice), torch.empty(B, H, L, 0, device=tdevice)
    c = randn(B, H, L, E, gen=g, device=tdevice)
    for kw in ({"sa": randn(B, H, L, gen=g, device=tdevice)}, {"sb": randn(B, H, L, gen=g, device=tdevice)}):
        for mode in MODES.values():
            y, _ = cp.chunk_product(a, b, c, **mode, **kw)
            assert_close_rel(y, _product64(a, b, c, **mode, **kw)[0])


def test_chunk_product_refuses_bad_scalars_heads_and_dtypes():
    a = torch.rand(2, 2, 5, 4)
    with pytest.raises(ValueError, match=r"sa must be \[2, 2, 5\], got \[1, 1, 5\]"):
        cp.chunk_product(a, a, a, sa=torch.rand(1, 1, 5))
    with pytest.raises(ValueError, match=r"sb must be \[2, 2, 5\], got \[2, 2, 4\]"):
        cp.chunk_product(a, a, a, sb=torch.rand(2, 2, 4))
    with pytest.raises(ValueError, match="both have heads or both have none"):
        cp.chunk_product(torch.rand(2, 0, 5, 4), a, a)
    with pytest.raises(ValueError, match="dphi.x must be"):
        cp.chunk_product(a, a, a, dphi=cp.Operand(torch.rand(2, 0, 5, 4), "elu"))
    with pytest.raises(TypeError, match="a must be float16, bfloat16 or float32.*float64"):
        cp.chunk_product(a.double(), a, a)
    with pytest.raises(ValueError, match="Hq a multiple of Hkv"):
        cp.fused_linear_attention(torch.rand(1, 2, 5, 4), torch.rand(1, 4, 5, 4), torch.rand(1, 4, 5, 4), "elu")


def test_triton_linear_attention_refuses_second_order_gradients(tdevice):
    """create_graph=True: the kernels' backward builds no graph, so differentiating it again raises (it
    silently dropped the second-order terms); the chunked backend differentiates twice."""
    g = torch.Generator().manual_seed(29)
    q, k, v = (randn(1, 2, 70, 8, gen=g, device=tdevice).requires_grad_() for _ in range(3))
    out = linear_attention(q, k, v, causal=True, backend="triton")
    gq, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second-order gradient; use backend='chunked'"):
        torch.autograd.grad(gq.pow(2).sum(), (q, k, v))
    out = linear_attention(q, k, v, causal=True, backend="chunked")
    gq, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    assert all(x is not None for x in torch.autograd.grad(gq.pow(2).sum(), (q, k, v)))


@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_triton_linear_attention_gradient_of_one_input(tdevice, which, causal):
    """Only one of q, k, v requires grad (GQA 4/2): its gradient is the float64 formula's, the others get none."""
    g = torch.Generator().manual_seed(31 + which)
    Lk = 90 if causal else 140
    x = [randn(1, 4, 90, 8, gen=g, device=tdevice), randn(1, 2, Lk, 8, gen=g, device=tdevice),
         randn(1, 2, Lk, 6, gen=g, device=tdevice)]
    x[which].requires_grad_()
    g_out = randn(1, 4, 90, 6, gen=g, device=tdevice)
    got, = torch.autograd.grad(linear_attention(*x, causal=causal, backend="triton"), x[which], g_out)
    r = [t.detach().double().requires_grad_(i == which) for i, t in enumerate(x)]
    want, = torch.autograd.grad(_quadratic(*r, causal=causal), r[which], g_out.double())
    assert_close_rel(got, want, rtol=5e-5)


def test_triton_linear_attention_keeps_a_non_finite_value_where_causality_puts_it(tdevice):
    """An inf in the last key reaches only the last query (it made every position NaN: the zeros of slot
    0 were the last chunk's state times 0); an inf in the first position's output gradient stays in the
    first chunk's key gradients (the reverse products; within a chunk, the masked product's 0 * inf is NaN
    in every backend's matmul)."""
    g = torch.Generator().manual_seed(37)
    L = 2 * cp.CHUNK + 2
    q, k, v = (randn(1, 1, L, 8, gen=g, device=tdevice) for _ in range(3))
    k[..., L - 1, :] = float("inf")
    for backend in ("triton", "chunked"):
        out = linear_attention(q, k, v, causal=True, backend=backend)
        assert torch.isfinite(out[..., :L - 1, :]).all(), backend
    k = randn(1, 1, L, 8, gen=g, device=tdevice).requires_grad_()
    v = v.clone().requires_grad_()
    g_out = randn(1, 1, L, 8, gen=g, device=tdevice)
    g_out[..., 0, :] = float("inf")
    dk, dv = torch.autograd.grad(linear_attention(q, k, v, causal=True, backend="triton"), (k, v), g_out)
    assert torch.isfinite(dk[..., cp.CHUNK:, :]).all() and torch.isfinite(dv[..., cp.CHUNK:, :]).all()


def test_triton_linear_attention_saves_a_float32_output_for_its_gradients(tdevice):
    """dden = -(g . o) / den reads the forward's output: kept in float32, bf16 gradients stay near the
    chunked form's error (from a bf16 copy of o, dq's was 3.9x it). Interpreter only: on the GPU the tf32
    products set the error. The bound is 2.5x, not ~1x: the interpreter stores bf16 by truncation, not
    rounding, which alone doubles the error of a kernel's bf16 output."""
    if tdevice != "cpu":
        pytest.skip("the interpreter multiplies in float32, as the chunked form does")
    g = torch.Generator().manual_seed(41)
    x = [randn(2, 2, 150, 16, gen=g).bfloat16() for _ in range(3)]
    g_out = randn(2, 2, 150, 16, gen=g).bfloat16()
    r = [t.double().requires_grad_() for t in x]
    want = torch.autograd.grad(_quadratic(*r), r, g_out.double())
    errs = {}
    for backend in ("triton", "chunked"):
        leaves = [t.clone().requires_grad_() for t in x]
        got = torch.autograd.grad(linear_attention(*leaves, causal=True, backend=backend), leaves, g_out)
        errs[backend] = [rel_err(a, b) for a, b in zip(got, want)]
    for name, t, c in zip(("dq", "dk", "dv"), errs["triton"], errs["chunked"]):
        assert t <= 2.5 * c, (name, t, c)


def test_triton_linear_attention_positions_past_int32_offsets(tmp_path):
    """A strided q whose position stride times its length passes 2**31 elements (a [B, L, H, D] layout at
    L * H * D >= 2**31): offsets in 64 bits. A sparse file holds it: only the touched pages take memory."""
    if not TRITON_INTERPRET:
        pytest.skip("runs the kernels on the CPU (TRITON_INTERPRET=1)")
    L, D, s_l, off = 130, 16, 1 << 24, 1 << 31
    n = off + (L - 1) * s_l + D
    path = tmp_path / "sparse.bin"
    with open(path, "wb") as f:
        f.truncate(n * 2)
    store = torch.from_file(str(path), shared=True, size=n, dtype=torch.float16)
    q = store.as_strided((1, 1, L, D), (n, n, s_l, 1), off)
    g = torch.Generator().manual_seed(43)
    q.copy_(randn(1, 1, L, D, gen=g).half())
    k, v = randn(1, 1, L, D, gen=g).half(), randn(1, 1, L, D, gen=g).half()
    out = linear_attention(q, k, v, causal=True, backend="triton")
    ref = _quadratic(q.double(), k.double(), v.double())
    low = _quadratic(q, k, v)
    assert_close_rel(out, ref, rel_err(low, ref))
    del q, store


@pytest.mark.parametrize("mode, programs", [("fwd", None), ("rev", None), ("full", None), ("full", 8), ("full", 1)],
                         ids=["fwd", "rev", "full", "full_groups_of_8", "full_one_group"])
def test_many_chunks(tdevice, monkeypatch, mode, programs):
    """Thirteen chunks of 16 positions (the scan sums many states, where the default CHUNK gives these
    shapes two): every scalar kind, scales, features, den, M and E past one block, GQA; and linear
    attention's gradients. Not causal: 70 positions of a against 200 of b and c, and (STATE_PROGRAMS) a
    state program summing 8 chunks (the last group short) or all 13."""
    B, Ha, Hb, Lb, M, E = 1, 4, 2, 200, 40, 72
    L = Lb if mode != "full" else 70
    g = torch.Generator().manual_seed(53 + len(mode) + (programs or 0))
    a = cp.Operand(randn(B, Ha, L, M, gen=g, device=tdevice), "elu", randn(B, Ha, L, gen=g, device=tdevice))
    b = cp.Operand(randn(B, Hb, Lb, M, gen=g, device=tdevice), "relu", randn(B, Hb, Lb, gen=g, device=tdevice))
    c = cp.Operand(randn(B, Hb, Lb, E, gen=g, device=tdevice), None, randn(B, Hb, Lb, gen=g, device=tdevice))
    sa, sb = randn(B, Ha, L, gen=g, device=tdevice), randn(B, Hb, Lb, gen=g, device=tdevice)
    if programs is not None:
        monkeypatch.setattr(cp, "STATE_PROGRAMS", programs)
    monkeypatch.setattr(cp, "CHUNK", 16)
    fa, fb, fc = _features64(a), _features64(b), _features64(c)
    for kw in ({}, {"sa": sa}, {"sb": sb}):
        y, _ = cp.chunk_product(a, b, c, **MODES[mode], **kw)
        assert_close_rel(y, _product64(fa, fb, fc, **MODES[mode], **kw)[0])
    y, den = cp.chunk_product(cp.Operand(a.x, "elu"), cp.Operand(b.x, "elu"), c.x, den=True, **MODES[mode])
    num, den64 = _product64(_features64(cp.Operand(a.x, "elu")), _features64(cp.Operand(b.x, "elu")), c.x,
                            **MODES[mode])
    assert_close_rel(den, den64, name="den")
    assert_close_rel(y, num / den64[..., None])
    if mode != "rev":
        causal = mode == "fwd"
        x = [t.clone().requires_grad_() for t in (a.x, b.x, c.x)]
        g_out = randn(B, Ha, L, E, gen=g, device=tdevice)
        got = torch.autograd.grad(linear_attention(*x, causal=causal, backend="triton"), x, g_out)
        r = [t.detach().double().requires_grad_() for t in x]
        want = torch.autograd.grad(_quadratic(*r, causal=causal), r, g_out.double())
        for name, p, w in zip(("dq", "dk", "dv"), got, want):
            assert_close_rel(p, w, rtol=5e-5, name=name)


@pytest.mark.cuda
def test_cuda_auto_inside_torch_compile_keeps_the_pytorch_form():
    """torch.compile(fullgraph=True) of a call with backend="auto" traces whole (the kernels' launches
    would break the graph), and matches the kernels outside it."""
    q, k, v = (torch.randn(1, 2, 100, 16, device="cuda") for _ in range(3))
    for causal in (True, False):
        compiled = torch.compile(lambda q, k, v: linear_attention(q, k, v, causal=causal), fullgraph=True)
        assert rel_err(compiled(q, k, v), linear_attention(q, k, v, causal=causal)) < 1e-5

