"""attnkit.attention_backward (the backward from given statistics) and sdpa's return_lse.

- every backend that runs here against float64 autograd of the reference, with and without a
  gradient through lse: causal (Lq == Lk, Lq > Lk, Lq < Lk), windows, masks with dead rows,
  GQA/MQA, bias, softcap and mods where the backend takes them;
- the "global statistics" property ring attention relies on: the calls over two key parts (and
  two query shards), each given the GLOBAL out and lse, sum to the full gradient;
- the backends that read the statistics (sdpa, chunked, triton) never run a forward;
- sdpa's lse: values and gradients (through out and lse) against the reference, every dtype;
- bad statistics raise, naming the argument.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.backends import sdpa as sdpa_mod
from cases import TRITON_INTERPRET
from conftest import assert_close_rel, assert_lse_close, make_qkv, naive_attention, randn, rel_err

GRAD_RTOL = 5e-5
NATIVE = ["sdpa", "chunked", "triton"]  # read the statistics: no forward in attention_backward
ALL = ["reference", "chunked", "sdpa", "triton"]


def _skip_unavailable(backend: str) -> None:
    if backend == "triton" and not TRITON_INTERPRET:
        pytest.skip("triton runs on the CPU only under TRITON_INTERPRET=1")


def _features_ok(backend: str, kw: dict) -> bool:
    """What the backend takes in these tests (its capability table, README)."""
    if backend == "sdpa":
        return not ({"softcap", "score_mod"} & set(kw))
    if backend == "triton":
        return not ({"score_mod", "mask_mod"} & set(kw))
    return True


def _tensors(B, Hq, Hkv, Lq, Lk, D, *, dtype=torch.float32, seed=0):
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    do = randn(B, Hq, Lq, D, dtype=dtype, gen=g)
    dlse = randn(B, Hq, Lq, gen=g)
    return q, k, v, do, dlse


def _oracle(q, k, v, do, dlse, **kw):
    """float64 (out, lse) of the reference and autograd's (dq, dk, dv) of <out, do> + <lse, dlse>."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    kw64 = {n: (x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()}
    out, lse = attnkit.attention(*leaves, return_lse=True, backend="reference", **kw64)
    loss = (out * do.double()).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * dlse.double()).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


def _check_grads(got, ref, name=""):
    for n, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert r.double().norm() > 0, f"{name}{n}: the reference gradient is 0 (the test could not fail)"
        assert torch.isfinite(g).all(), f"{name}{n}: non-finite values"
        assert_close_rel(g, r, rtol=GRAD_RTOL, name=name + n)


def _checker(b, h, i, j):
    return ((i + j) % 3 != 0) | (j == 0)


def _rel_bias(score, b, h, q_idx, kv_idx):
    return score - 0.1 * (q_idx - kv_idx).abs()


CALLS = {
    "dense": dict(),
    "causal": dict(causal=True),
    "causal_lq_gt_lk": dict(causal=True, _shape=(13, 7)),
    "causal_lq_lt_lk": dict(causal=True, _shape=(7, 13)),
    "window": dict(window=(3, 1), _shape=(9, 14)),
    "mask_dead_rows": dict(_mask="dead"),
    "bias": dict(_bias=True, _shape=(9, 11)),
    "softcap": dict(softcap=2.0),
    "mask_mod": dict(mask_mod=_checker, _shape=(9, 12)),
    "score_mod": dict(score_mod=_rel_bias, causal=True),
    "mqa": dict(_heads=(4, 1), causal=True),
}


def _build(name: str, seed: int = 0):
    spec = dict(CALLS[name])
    Lq, Lk = spec.pop("_shape", (10, 10))
    Hq, Hkv = spec.pop("_heads", (4, 2))
    q, k, v, do, dlse = _tensors(2, Hq, Hkv, Lq, Lk, 16, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    if spec.pop("_mask", None):
        mask = torch.rand(2, 1, Lq, Lk, generator=g) < 0.6
        mask[0, :, 2] = False  # whole rows with nothing to attend
        mask[1, :, -1] = False
        spec["mask"] = mask
    if spec.pop("_bias", None):
        spec["bias"] = torch.randn(Hq, Lq, Lk, generator=g)
    return (q, k, v, do, dlse), spec


@pytest.mark.parametrize("with_dlse", [False, True], ids=["no_dlse", "dlse"])
@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("backend", ALL)
def test_matches_reference_autograd(backend, name, with_dlse):
    _skip_unavailable(backend)
    (q, k, v, do, dlse), kw = _build(name)
    dlse = dlse if with_dlse else None
    out, lse, ref = _oracle(q, k, v, do, dlse, **kw)
    fn = lambda: attnkit.attention_backward(do, q, k, v, out.float(), lse.float(), dlse=dlse, backend=backend, **kw)  # noqa: E731
    if not _features_ok(backend, kw):
        with pytest.raises(ValueError, match=backend):
            fn()
        return
    got = fn()
    assert [g.dtype for g in got] == [torch.float32] * 3
    assert [g.shape for g in got] == [q.shape, k.shape, v.shape]
    _check_grads(got, ref)
    dead = torch.isneginf(lse)
    if dead.any():  # rows with nothing to attend: exactly 0 dq, whatever dlse says there
        assert torch.all(got[0][dead] == 0)


@pytest.mark.parametrize("backend", ALL)
def test_gradient_matches_own_autograd(backend):
    """With the call's own (out, lse), the primitive equals autograd of the same backend."""
    _skip_unavailable(backend)
    q, k, v, do, dlse = _tensors(1, 4, 2, 12, 12, 16, seed=3)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = attnkit.attention(*leaves, causal=True, return_lse=True, backend=backend)
    want = torch.autograd.grad((out * do).sum() + (lse * dlse).sum(), leaves)
    got = attnkit.attention_backward(do, q, k, v, out.detach(), lse.detach(), dlse=dlse, causal=True, backend=backend)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- global statistics
@pytest.mark.parametrize("with_dlse", [False, True], ids=["no_dlse", "dlse"])
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("backend", ALL)
def test_global_statistics_of_two_shards_sum_to_the_full_gradient(backend, causal, with_dlse):
    """Two query shards x two key shards (a 2-rank ring in one process): each call gets the GLOBAL
    out/lse of its rows; dq sums over key shards, dk/dv over query shards, = the full gradient.
    Causal: global positions as a sliced mask (a shard pair that sees nothing of a row keeps it)."""
    _skip_unavailable(backend)
    L, s = 14, 8  # shards [0, 8) and [8, 14): unequal on purpose
    q, k, v, do, dlse = _tensors(2, 4, 2, L, L, 16, seed=11)
    dlse = dlse if with_dlse else None
    full_mask = torch.ones(L, L, dtype=torch.bool).tril() if causal else None
    out, lse, ref = _oracle(q, k, v, do, dlse, mask=full_mask)
    out, lse = out.float(), lse.float()
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    shards = [slice(0, s), slice(s, L)]
    for r in shards:
        for c in shards:
            kw = {"mask": full_mask[r, c]} if causal else {}
            if causal and not full_mask[r, c].any():
                continue  # the ring skips pairs with nothing visible
            gq, gk, gv = attnkit.attention_backward(
                do[:, :, r], q[:, :, r], k[:, :, c], v[:, :, c], out[:, :, r], lse[:, :, r],
                dlse=None if dlse is None else dlse[:, :, r], backend=backend, **kw)
            dq[:, :, r] += gq
            dk[:, :, c] += gk
            dv[:, :, c] += gv
    _check_grads((dq, dk, dv), ref)
    # and the pieces alone are not the answer (the property is about the sum)
    assert rel_err(gq, ref[0][:, :, shards[1]]) > 1e-2


def test_global_statistics_with_plain_and_causal_parts():
    """The ring's own calls: a plain part and a square-causal part of the keys with the global
    statistics (what sdpa does inside for a bottom-right causal call with Lq < Lk, and what a
    zigzag ring does per pair), on every backend that takes causal."""
    Lq, Lk = 6, 15
    q, k, v, do, dlse = _tensors(1, 4, 2, Lq, Lk, 16, seed=5)
    out, lse, ref = _oracle(q, k, v, do, dlse, causal=True)
    out, lse = out.float(), lse.float()
    for backend in ["reference", "chunked", "sdpa"] + (["triton"] if TRITON_INTERPRET else []):
        a = attnkit.attention_backward(do, q, k[:, :, :Lk - Lq], v[:, :, :Lk - Lq], out, lse, dlse=dlse,
                                       backend=backend)
        b = attnkit.attention_backward(do, q, k[:, :, Lk - Lq:], v[:, :, Lk - Lq:], out, lse, dlse=dlse,
                                       causal=True, backend=backend)
        _check_grads((a[0] + b[0], torch.cat([a[1], b[1]], 2), torch.cat([a[2], b[2]], 2)), ref, f"{backend} ")


# --------------------------------------------------------------------------- dead rows, no recompute
@pytest.mark.parametrize("backend", ALL)
def test_rows_with_nothing_to_attend_get_zero_gradient(backend):
    """lse -inf rows (given as such): dq 0, no NaN anywhere, even with dlse and do nonzero there."""
    _skip_unavailable(backend)
    q, k, v, do, dlse = _tensors(1, 2, 2, 6, 6, 8, seed=2)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 1, :] = False
    mask[..., 4, :] = False
    out, lse, ref = _oracle(q, k, v, do, dlse, mask=mask)
    assert torch.isneginf(lse[..., [1, 4]]).all()
    got = attnkit.attention_backward(do, q, k, v, out.float(), lse.float(), dlse=dlse, mask=mask, backend=backend)
    assert all(torch.isfinite(g).all() for g in got)
    assert torch.all(got[0][:, :, [1, 4]] == 0)
    _check_grads(got, ref)


@pytest.mark.parametrize("backend", NATIVE)
def test_native_backends_run_no_forward(backend, monkeypatch):
    _skip_unavailable(backend)
    q, k, v, do, dlse = _tensors(1, 4, 2, 9, 9, 16, seed=4)
    out, lse, ref = _oracle(q, k, v, do, dlse, causal=True)
    b = attnkit.get_backend(backend)

    def no_forward(req):
        raise AssertionError(f"{backend}.backward_from_stats ran a forward")

    monkeypatch.setattr(b, "run", no_forward)
    if backend == "sdpa":
        monkeypatch.setattr(sdpa_mod, "_kernel_forward", no_forward)
    got = attnkit.attention_backward(do, q, k, v, out.float(), lse.float(), dlse=dlse, causal=True, backend=backend)
    _check_grads(got, ref)


def test_flex_on_cpu_refuses_naming_what_it_lacks():
    q, k, v, do, _ = _tensors(1, 2, 2, 16, 16, 16)
    out, lse = attnkit.attention(q, k, v, return_lse=True, backend="reference")
    with pytest.raises(ValueError, match="flex.*'backward'"):
        attnkit.attention_backward(do, q, k, v, out, lse, backend="flex")


def test_auto_plan_and_the_backward_request():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16)
    plan = attnkit.explain(q, k, v, causal=True, return_lse=True, for_backward=True)
    assert plan.backend == "sdpa", str(plan)
    assert "backward" in plan.request and "return_lse" in plan.request
    bias = torch.randn(8, 8, requires_grad=True)  # a constant in attention_backward: no 'bias_grad'
    req = attnkit.request.build_request(q, k, v, bias=bias, return_lse=True, for_backward=True)
    assert "bias_grad" not in req.features() and "backward" in req.features()
    plan = attnkit.explain(q, k, v, softcap=2.0, return_lse=True, for_backward=True)
    assert plan.backend == "chunked" and "'softcap'" in plan.passed_over["sdpa"]


# --------------------------------------------------------------------------- bad input
def _bad_calls():
    q, k, v, do, dlse = _tensors(1, 4, 2, 5, 7, 8)
    out, lse = torch.zeros_like(do), torch.zeros(1, 4, 5)
    return [
        ("do_shape", dict(do=do[:, :, :4]), ValueError, ["do", "[1, 4, 5, 8]", "[1, 4, 4, 8]"]),
        ("out_shape", dict(out=out[..., :4]), ValueError, ["out", "[1, 4, 5, 8]"]),
        ("lse_shape", dict(lse=lse[..., None]), ValueError, ["lse", "[1, 4, 5]", "[1, 4, 5, 1]"]),
        ("dlse_shape", dict(dlse=dlse[:, :2]), ValueError, ["dlse", "[1, 4, 5]"]),
        ("lse_int", dict(lse=lse.long()), TypeError, ["lse", "int64"]),
        ("do_not_tensor", dict(do=[1.0]), TypeError, ["do", "list"]),
        ("q_rank", dict(q=q[0]), ValueError, ["q", "4-D"]),
        ("kv_heads", dict(k=k[:, :1]), ValueError, ["k", "heads"]),
        ("backend", dict(backend="nope"), ValueError, ["nope", "known backends"]),
    ], (q, k, v, do, out, lse)


@pytest.mark.parametrize("i", range(9))
def test_bad_statistics_raise_naming_the_argument(i):
    calls, (q, k, v, do, out, lse) = _bad_calls()
    name, over, exc, words = calls[i]
    args = dict(do=do, q=q, k=k, v=v, out=out, lse=lse)
    kw = {n: over.pop(n) for n in list(over) if n in ("dlse", "backend")}
    args.update(over)
    with pytest.raises(exc) as ei:
        attnkit.attention_backward(args["do"], args["q"], args["k"], args["v"], args["out"], args["lse"], **kw)
    for w in words:
        assert w in str(ei.value), f"{name}: {w!r} not in {ei.value}"


# --------------------------------------------------------------------------- sdpa's lse
SDPA_LSE = [
    ("dense_gqa", dict(), (11, 11), (4, 2)),
    ("causal", dict(causal=True), (12, 12), (4, 4)),
    ("causal_lq_gt_lk", dict(causal=True), (14, 6), (4, 2)),
    ("causal_lq_lt_lk", dict(causal=True), (5, 16), (4, 1)),  # two pieces merged by lse
    ("window", dict(window=4), (9, 13), (4, 2)),
    ("mask_dead_rows", dict(_mask=True), (9, 13), (4, 2)),
    ("bias", dict(_bias=True), (8, 10), (2, 2)),
    ("mask_mod", dict(mask_mod=_checker), (9, 10), (4, 2)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("name,kw,shape,heads", SDPA_LSE, ids=[c[0] for c in SDPA_LSE])
def test_sdpa_lse_values_and_gradients(name, kw, shape, heads, dtype):
    """sdpa's (out, lse) and the gradients of <out, g_out> + <lse, g_lse> (the augmented dlse
    columns) against the float64 reference; bf16 within 3x plain bf16 math."""
    (Lq, Lk), (Hq, Hkv) = shape, heads
    kw = dict(kw)
    q, k, v, do, dlse = _tensors(2, Hq, Hkv, Lq, Lk, 16, dtype=dtype, seed=21)
    g = torch.Generator().manual_seed(9)
    if kw.pop("_mask", False):
        mask = torch.rand(2, 1, Lq, Lk, generator=g) < 0.5
        mask[1, :, 3] = False
        kw["mask"] = mask
    if kw.pop("_bias", False):
        kw["bias"] = torch.randn(1, Hq, Lq, Lk, generator=g).to(dtype)  # a constant: no bias gradient with lse
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = attnkit.attention(*leaves, return_lse=True, backend="sdpa", **kw)
    assert out.dtype == dtype and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss = (out.double() * do.double()).sum() + (torch.where(torch.isfinite(lse), lse, 0).double() * dlse.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    r_out, r_lse, ref = _oracle(q, k, v, do, dlse, **kw)
    lowp = dtype == torch.bfloat16
    base = None
    if lowp:  # plain bf16 math: the bar of the correctness rule
        bl = [t.clone().requires_grad_(True) for t in (q, k, v)]
        b_out, b_lse = naive_attention(*bl, return_lse=True, **kw)
        b_loss = (b_out.double() * do.double()).sum() + (torch.where(torch.isfinite(b_lse), b_lse, 0).double()
                                                         * dlse.double()).sum()
        base = (b_out, b_lse, torch.autograd.grad(b_loss, bl))
    tol = dict(rtol=1e-12) if dtype == torch.float64 else {}
    assert_close_rel(out, r_out, rel_err(base[0], r_out) if lowp else None, name="out", **tol)
    fin = torch.isfinite(r_lse)
    assert_lse_close(lse, r_lse, rel_err(base[1][fin], r_lse[fin]) if lowp else None, **tol)
    for n, gg, rr, i in zip(("dq", "dk", "dv"), grads, ref, range(3)):
        assert rr.norm() > 0
        assert_close_rel(gg, rr, rel_err(base[2][i], rr) if lowp else None, name=n,
                         rtol=1e-11 if dtype == torch.float64 else GRAD_RTOL)


def test_sdpa_lse_only_used_and_the_cpu_kernels_run(monkeypatch):
    """Only lse used downstream (do is None in the Function): gradients still exact; and the
    CPU flash kernels are what runs (no fallback to another backend)."""
    calls = []
    real_f, real_b = sdpa_mod._kernel_forward, sdpa_mod._kernel_backward
    monkeypatch.setattr(sdpa_mod, "_kernel_forward", lambda *a: calls.append("f") or real_f(*a))
    monkeypatch.setattr(sdpa_mod, "_kernel_backward", lambda *a: calls.append("b") or real_b(*a))
    q, k, v, do, dlse = _tensors(1, 4, 2, 7, 9, 16, seed=8)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    _, lse = attnkit.attention(*leaves, causal=True, return_lse=True, backend="sdpa")
    grads = torch.autograd.grad((lse * dlse).sum(), leaves)
    assert calls == ["f", "f", "b", "b"]  # Lq < Lk causal: a plain and a square-causal piece
    _, _, ref = _oracle(q, k, v, torch.zeros_like(do), dlse, causal=True)
    _check_grads(grads[:2], ref[:2])
    assert torch.all(grads[2] == 0)  # lse does not depend on v


def test_sdpa_lse_refusals_name_the_combination():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="'return_lse' together with 'dropout'"):
        attnkit.attention(q, k, v, return_lse=True, dropout_p=0.5, backend="sdpa")
    bias = torch.randn(8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="'return_lse' together with 'bias_grad'"):
        attnkit.attention(q, k, v, bias=bias, return_lse=True, backend="sdpa")
    v2 = torch.randn(1, 2, 8, 8)
    with pytest.raises(ValueError, match="'return_lse' together with 'value_head_dim'"):
        attnkit.attention(q, k, v2, return_lse=True, backend="sdpa")
    # without lse the same calls are served
    attnkit.attention(q, k, v, dropout_p=0.5, backend="sdpa")
    attnkit.attention(q, k, v2, backend="sdpa")
    with pytest.raises(ValueError, match="unknown feature"):
        attnkit.Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                             features=frozenset({"causal"}), exclusive_by_device={"cpu": {"causal": frozenset({"x"})}})


def test_with_dlse_columns_fold_dlse_into_delta():
    """The augmented inputs: rowsum(do' * out') = rowsum(do * out) - dlse, do' v'^T = do v^T, S unchanged."""
    q, k, v, do, dlse = _tensors(1, 2, 2, 5, 6, 12, dtype=torch.bfloat16, seed=1)
    out = randn(1, 2, 5, 12, dtype=torch.bfloat16)
    dlse = dlse * 100  # large: the hi/lo split must keep it to ~16 bits
    q2, k2, v2, do2, out2 = sdpa_mod._with_dlse(q, k, v, do, out, dlse)
    assert q2.shape[-1] % 8 == 0 and q2.shape[-1] >= 14
    delta = (do2.float() * out2.float()).sum(-1)
    want = (do.float() * out.float()).sum(-1) - dlse
    assert (delta - want).abs().max() <= 1e-3 * dlse.abs().max()
    torch.testing.assert_close(do2.float() @ v2.float().transpose(-1, -2), do.float() @ v.float().transpose(-1, -2))
    torch.testing.assert_close(q2.float() @ k2.float().transpose(-1, -2), q.float() @ k.float().transpose(-1, -2))


def test_sdpa_kernels_never_see_minus_inf_lse(monkeypatch):
    """CUDA's flash backward reads an lse of -inf as 0 (P = exp(S), not 0): rows that attend nothing
    must reach every kernel as +inf. (The CPU kernel copes either way, so this checks what the
    kernels are handed.)"""
    seen = []
    real = sdpa_mod._kernel_backward

    def spy(do, q, k, v, out, lse, *rest):
        seen.append(lse.clone())
        return real(do, q, k, v, out, lse, *rest)

    monkeypatch.setattr(sdpa_mod, "_kernel_backward", spy)
    q, k, v, do, dlse = _tensors(1, 2, 2, 6, 6, 16, seed=6)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse, ref = _oracle(q, k, v, do, dlse, mask=mask)
    lse = lse.float()
    lse[..., 4] = float("-inf")  # a row some other key shard would own (dead here too: P = 0)
    attnkit.attention_backward(do, q, k, v, out.float(), lse, dlse=dlse, mask=mask, backend="sdpa")
    attnkit.attention_backward(do, q, k, v, out.float(), lse, backend="sdpa")  # plain, no mask
    assert len(seen) == 2
    for x in seen:
        assert not torch.isneginf(x).any() and torch.isposinf(x[..., 4]).all()
    assert torch.isposinf(seen[0][..., 2]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("shape,causal", [((300, 300), False), ((257, 257), True), ((170, 300), True),
                                          ((300, 170), True)], ids=["dense", "causal", "causal_lq_lt_lk",
                                                                   "causal_lq_gt_lk"])
@pytest.mark.parametrize("backend", ["sdpa", "triton", "chunked"])
def test_cuda_backward_from_statistics(backend, shape, causal, heads):
    """On a GPU, bf16, D = 64: attention_backward with the call's own float64 statistics against float64
    autograd, within the rule's factor of plain bf16 autograd; sdpa through its cuDNN / flash lse kernels
    (ring attention's local backward on CUDA)."""
    from attnkit.request import build_request
    (Lq, Lk), (Hq, Hkv) = shape, heads
    q, k, v = make_qkv(2, Hq, Hkv, Lq, Lk, 64, dtype=torch.bfloat16, device="cuda", seed=71)
    do = randn(2, Hq, Lq, 64, dtype=torch.bfloat16, device="cuda", gen=torch.Generator().manual_seed(72))
    why = attnkit.get_backend(backend).unsupported(build_request(q, k, v, causal=causal, return_lse=True,
                                                                 for_backward=True))
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    out64, lse64, ref = _oracle(q, k, v, do, None, causal=causal)
    got = attnkit.attention_backward(do, q, k, v, out64.to(q.dtype), lse64.float(), causal=causal, backend=backend)
    plain = [t.detach().requires_grad_(True) for t in (q, k, v)]
    base = torch.autograd.grad((naive_attention(*plain, causal=causal) * do).sum(), plain)
    for n, g, r, b in zip(("dq", "dk", "dv"), got, ref, base):
        assert torch.isfinite(g).all(), n
        assert_close_rel(g, r, rel_err(b, r), name=n)
