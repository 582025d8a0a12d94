"""varlen_attention (packed sequences, flash-attn's cu_seqlens layout) against a loop of
per-sequence reference calls, forward and backward."""

from __future__ import annotations

import pytest
import torch

import attnkit
from cases import TRITON_INTERPRET
from conftest import assert_close_rel, naive_attention, rel_err

# sequence lengths (queries, keys): empty ones, 1-token ones, lengths off every block size
SAME = ([0, 5, 17, 1, 33], [0, 5, 17, 1, 33])
DIFF = ([3, 0, 20, 7], [9, 4, 11, 7])


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


def _packed(lq, lk, Hq=4, Hkv=2, D=12, Dv=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), Hq, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(sum(lk), Hkv, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(sum(lk), Hkv, Dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _loop(q, k, v, lq, lk, **kw):
    """One reference call per sequence: the oracle."""
    outs, lses, a, c = [], [], 0, 0
    for nq, nk in zip(lq, lk):
        qi = q[a:a + nq].transpose(0, 1)[None]
        ki, vi = k[c:c + nk].transpose(0, 1)[None], v[c:c + nk].transpose(0, 1)[None]
        if nk == 0:  # nothing to attend: the contract's empty-row rule
            outs.append(q.new_zeros(nq, q.shape[1], v.shape[2]))
            lses.append(torch.full((q.shape[1], nq), float("-inf"), dtype=torch.float64, device=q.device))
        elif nq:
            o, lse = attnkit.attention(qi, ki, vi, return_lse=True, backend="reference", **kw)
            outs.append(o[0].transpose(0, 1))
            lses.append(lse[0])
        a, c = a + nq, c + nk
    return torch.cat(outs), torch.cat(lses, dim=1)


BACKENDS = ["reference", "chunked", "sdpa", "auto"] + (["triton"] if TRITON_INTERPRET else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens,causal,window", [
    (SAME, False, None), (SAME, True, None), (DIFF, False, None), (DIFF, True, None),
    (SAME, True, 4), (DIFF, False, (3, 2)), (DIFF, True, 5), (SAME, False, (2, -1)),
], ids=["same", "same_causal", "diff", "diff_causal", "same_causal_w4", "diff_w3_2", "diff_causal_w5",
        "same_w2_inf"])
def test_varlen_matches_per_sequence_loop(lens, causal, window, backend):
    lq, lk = lens
    if backend == "triton" and (causal or window is not None) and lq != lk:
        pytest.skip("per-sequence bottom-right bounds are a generic mask_mod: not a triton feature")
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = _packed(lq, lk, dtype=dtype, Dv=12 if backend == "sdpa" else 8)  # sdpa's lse needs Dv == D
    for t in (q, k, v):
        t.requires_grad_(True)
    out, lse = attnkit.varlen_attention(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk), causal=causal, window=window,
                                        return_lse=True, backend=backend)
    qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = _loop(qr, kr, vr, lq, lk, causal=causal, window=window)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert out.shape == ref.shape and torch.allclose(out.double(), ref, atol=tol, rtol=tol)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.allclose(lse.double()[fin], ref_lse[fin], atol=tol, rtol=tol)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    refs = torch.autograd.grad(ref, (qr, kr, vr), g)
    for name, a, b in zip("qkv", grads, refs):
        assert torch.allclose(a.double(), b, atol=10 * tol, rtol=10 * tol), name


def test_varlen_mask_kinds(monkeypatch):
    """Block-diagonal packings reach the contract as one cached GroupMask (one set per sequence,
    `causal` passed through when every sequence has as many queries as keys); per-sequence
    bottom-right causal with unequal lengths as a plain mask_mod."""
    seen = []
    real = attnkit.varlen.attention
    monkeypatch.setattr(attnkit.varlen, "attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    for (lq, lk), causal in ((SAME, True), (DIFF, False), (SAME, False), (DIFF, True)):
        q, k, v = _packed(lq, lk)
        attnkit.varlen_attention(q, k, v, _cu(lq), _cu(lk), causal=causal)
    kinds = [(type(kw["mask_mod"]).__name__, kw.get("causal", False)) for kw in seen]
    assert kinds == [("GroupMask", True), ("GroupMask", False), ("GroupMask", False), ("function", False)]
    assert seen[0]["mask_mod"] is seen[2]["mask_mod"]  # same packing: the cached mask
    assert len(seen[1]["mask_mod"].layout.sets) == len(DIFF[0])


@pytest.mark.parametrize("kw,err,match", [
    (dict(cu_seqlens_q=torch.tensor([0, 5.0])), TypeError, "cu_seqlens_q must be a 1-D int32/int64"),
    (dict(cu_seqlens_q=torch.tensor([1, 6], dtype=torch.int32)), ValueError, "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 2, 6], dtype=torch.int32)), ValueError, "cu_seqlens_k must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 6], dtype=torch.int32)), ValueError, "describe as many sequences"),
    (dict(q=torch.randn(1, 6, 4, 8)), ValueError, "q must be packed"),
    (dict(max_seqlen_q=3), ValueError, r"max_seqlen_q must be an int >= the longest sequence \(4\)"),
    (dict(max_seqlen_k=5.0), ValueError, "max_seqlen_k must be an int"),
    (dict(window=0), ValueError, "window"),
    (dict(v=torch.randn(7, 2, 8)), ValueError, r"k and v must hold the same packed keys"),
])
def test_varlen_bad_input(kw, err, match):
    args = dict(q=torch.randn(6, 4, 8), k=torch.randn(6, 2, 8), v=torch.randn(6, 2, 8),
                cu_seqlens_q=torch.tensor([0, 2, 6], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 1, 6], dtype=torch.int32))
    args.update(kw)
    with pytest.raises(err, match=match):
        attnkit.varlen_attention(**args)


def test_varlen_empty_packings():
    """No queries, or no keys at all: an empty output, or zeros with lse -inf (as empty sequences)."""
    cu0, cu3 = torch.tensor([0, 0, 0]), torch.tensor([0, 1, 3])
    out, lse = attnkit.varlen_attention(torch.randn(0, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 6), cu0, cu3,
                                        return_lse=True)
    assert out.shape == (0, 4, 6) and lse.shape == (4, 0)
    q = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    out, lse = attnkit.varlen_attention(q, torch.randn(0, 2, 8, dtype=torch.float64),
                                        torch.randn(0, 2, 6, dtype=torch.float64), cu3, cu0, causal=True,
                                        return_lse=True)
    assert torch.equal(out, torch.zeros(3, 4, 6, dtype=torch.float64)) and torch.isneginf(lse).all()
    assert lse.dtype == torch.float64  # (as the contract's lse of float64 inputs)
    out.sum().backward()  # differentiable, as the contract's results: zero gradient
    assert torch.equal(q.grad, torch.zeros_like(q))
    # the contract's checks still run when a side is empty
    for kw, err, match in ((dict(q=torch.randn(0, 3, 8)), ValueError, "divisible|multiple"),
                           (dict(k=torch.randn(3, 2, 6)), ValueError, "head dim|head_dim"),
                           (dict(window=0), ValueError, "window"),
                           (dict(backend="nope"), ValueError, "unknown backend")):
        args = dict(q=torch.randn(0, 4, 8), k=torch.randn(3, 2, 8), v=torch.randn(3, 2, 6), cu_seqlens_q=cu0,
                    cu_seqlens_k=cu3)
        args.update(kw)
        with pytest.raises(err, match=match):
            attnkit.varlen_attention(**args)


@pytest.mark.parametrize("window", [(-1, -1), (None, None), (10_000, 10_000)])
def test_varlen_unbounded_windows_with_unequal_lengths(window):
    """flash-attn's default window_size (-1, -1), or any window wider than the packing, is no window (it raised a
    TypeError when the sequences' q and k lengths differed)."""
    lq, lk = [3, 20, 7], [9, 11, 7]
    q, k, v = _packed(lq, lk)
    out = attnkit.varlen_attention(q, k, v, _cu(lq), _cu(lk), window=window, backend="reference")
    assert torch.equal(out, attnkit.varlen_attention(q, k, v, _cu(lq), _cu(lk), backend="reference"))


# ---------------------------------------------------------------------------
# on the GPU: bfloat16, realistic lengths, every backend that takes a document mask
# ---------------------------------------------------------------------------

CUDA_LENS = [100, 1, 257, 64, 0, 513]  # off every tile size, an empty and a 1-token sequence


def _loop_plain(q, k, v, lens, causal, window=None):
    """Per-sequence attention written plainly in q's dtype: the low-precision baseline."""
    outs, a = [], 0
    for n in lens:
        if n:
            qi, ki, vi = (t[a:a + n].transpose(0, 1)[None] for t in (q, k, v))
            outs.append(naive_attention(qi, ki, vi, causal=causal, window=window)[0].transpose(0, 1))
        a += n
    return torch.cat(outs)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "flex", "auto"])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 100)],
                         ids=["dense", "causal", "causal_w100"])
def test_cuda_varlen_bf16(backend, causal, window):
    """Packed bf16 sequences on the GPU, forward and backward, against float64 per-sequence calls,
    within DESIGN's low-precision rule (3x plain bf16 math over the same sequences)."""
    lens = CUDA_LENS
    q, k, v = (t.cuda() for t in _packed(lens, lens, Hq=8, Hkv=2, D=64, Dv=64, dtype=torch.bfloat16, seed=7))
    cu = _cu(lens).cuda()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attnkit.varlen_attention(*leaves, cu, cu, causal=causal, window=window, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(out)
    grads = torch.autograd.grad(out, leaves, g)
    r64 = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref, _ = _loop(*r64, lens, lens, causal=causal, window=window)
    refg = torch.autograd.grad(ref, r64, g.double())
    lp = [t.clone().requires_grad_(True) for t in (q, k, v)]
    base = _loop_plain(*lp, lens, causal, window)
    baseg = torch.autograd.grad(base, lp, g)
    assert_close_rel(out, ref, rel_err(base, ref), name="out")
    for n, a, r, b in zip("qkv", grads, refg, baseg):
        assert_close_rel(a, r, rel_err(b, r), name=f"d{n}")


@pytest.mark.parametrize("lq,lk,kw", [
    ([3, 5], [5, 3], dict(causal=True)),            # equal totals, unequal sequences
    ([2], [10], dict(window=4)),                     # window wider than all queries, narrower than the keys
    ([2, 3], [12, 9], dict(causal=True, window=(6, 0))),
], ids=["equal_totals_causal", "window_past_total_q", "window_pair_past_total_q"])
def test_varlen_bounds_per_sequence_edge_packings(lq, lk, kw):
    q, k, v = _packed(lq, lk)
    out = attnkit.varlen_attention(q, k, v, _cu(lq), _cu(lk), backend="reference", **kw)
    ref, _ = _loop(q, k, v, lq, lk, **kw)
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-10)


def test_varlen_cached_mask_is_keyed_on_both_packings():
    """Two calls with the same cu_seqlens_q but different cu_seqlens_k must not share a cached GroupMask."""
    lq = [4, 4]
    for lk in ([2, 6], [6, 2]):
        q, k, v = _packed(lq, lk)
        out = attnkit.varlen_attention(q, k, v, _cu(lq), _cu(lk), backend="reference")
        ref, _ = _loop(q, k, v, lq, lk)
        assert torch.allclose(out, ref, atol=1e-10, rtol=1e-10), lk
