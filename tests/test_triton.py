"""The `triton` backend (ops/flash_attention.py) and token-group masks (GroupMask).

The whole case matrix of test_backends.py runs the triton backend too; here are
the token-group layouts, the edge behaviours shared with the other backends, and
the layout checks. On the CPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, as CI runs them); without it the CPU tests are skipped.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import attnkit
from attnkit import GroupMask, SegmentLayout
from attnkit.ops import flash_attention as fa
from attnkit.ops.flash_attention import flash_attention
from attnkit.request import build_request
from cases import TRITON_INTERPRET, _bias, _merge
from conftest import (Case, allowed_pairs, assert_close_rel, attention_fn, check_against_oracle, default_build,
                      make_qkv, naive_attention, randn, rel_err)
import test_backends  # its test functions are reused below (imported by name, pytest would collect them twice)
from test_backends import run_case


@pytest.fixture
def tdevice(device):
    if device == "cpu" and not TRITON_INTERPRET:
        pytest.skip("the triton backend runs on the CPU only with TRITON_INTERPRET=1")
    return device


def _triton(q, k, v, **kw):
    return attnkit.attention(q, k, v, backend="triton", **kw)


# ---------------------------------------------------------------------------
# token-group layouts
# ---------------------------------------------------------------------------

# (len_q, len_k, sets): uneven sizes, tokens in no set, a key group shared by two sets,
# non-adjacent runs, Lq != Lk.
LAYOUTS = {
    "two_patterns": (50, 50, [([(0, 10), (20, 30)], [(0, 10)]), ([(10, 20), (30, 45)], [(0, 10), (20, 30), (45, 50)])]),
    "abupt_small": (33 + 17 + 29 + 21, 100, [([(0, 50)], [(0, 33)]), ([(50, 100)], [(0, 33), (50, 79)])]),
    "uncovered": (37, 37, [([(5, 20)], [(0, 3), (30, 37)]), ([(25, 30)], [(3, 30)])]),
    "lq_ne_lk": (19, 45, [([(0, 7)], [(0, 20)]), ([(7, 19)], [(20, 45), (0, 5)])]),
    "empty_keys": (24, 24, [([(0, 12)], []), ([(12, 24)], [(0, 24)])]),
    "one_token_groups": (6, 6, [([(i, i + 1)], [(0, 1), (i, i + 1)] if i else [(0, 1)]) for i in range(6)]),
}


def _group_case(layout_name: str, **kw) -> Case:
    Lq, Lk, sets = LAYOUTS[layout_name]
    layout = SegmentLayout(Lq, Lk, tuple((tuple(q), tuple(k)) for q, k in sets))

    def build(t):
        out = default_build(t)
        dev = t["q"].device if t.get("q") is not None else "cpu"
        out["mask_mod"] = GroupMask(layout, dev)
        return out

    base = dict(name=f"group_{layout_name}", Lq=Lq, Lk=Lk, build=build)
    base.update(kw)
    return Case(**base)


def _keypad(B, H, Lq, Lk, g):
    m = torch.rand(B, 1, 1, Lk, generator=g) > 0.25
    return {"mask": m}


# (B, heads) kept small: on the CPU these run in Triton's interpreter
GROUP_CASES = [_group_case(n, B=1, Hq=2, Hkv=2) for n in LAYOUTS] + [
    _group_case("two_patterns", Hq=4, Hkv=1, D=40, name="group_gqa_d40"),
    _group_case("abupt_small", B=2, Hq=2, Hkv=1, extras=_keypad, name="group_keypad"),
    _group_case("lq_ne_lk", kw=dict(causal=True, return_lse=True), name="group_causal_lse"),
    _group_case("two_patterns", kw=dict(window=(7, 3)), D=16, Dv=8, name="group_window_dv"),
    # a pair bias shared by the batch (Evoformer-like), on a group layout: its gradient sums over B
    _group_case("abupt_small", B=2, Hq=2, Hkv=1, name="group_pair_bias",
                extras=lambda B, H, Lq, Lk, g: {"bias": torch.randn(H, Lq, Lk, generator=g)}),
    # a full bias (gradient stored, not added) where one set's two key segments share a key tile
    _group_case("two_patterns", B=2, Hq=2, Hkv=2, name="group_full_bias_shared_tile",
                extras=lambda B, H, Lq, Lk, g: {"bias": torch.randn(B, H, Lq, Lk, generator=g)}),
    # softcap over a bias, and sinks, on a group layout with uncovered query rows
    _group_case("uncovered", B=1, Hq=2, Hkv=1, kw=dict(softcap=1.5, return_lse=True), name="group_softcap_sinks",
                extras=lambda B, H, Lq, Lk, g: {"bias": torch.randn(1, H, 1, Lk, generator=g),
                                                "sinks": torch.randn(H, generator=g)}),
]


@pytest.mark.parametrize("case", GROUP_CASES, ids=[c.name for c in GROUP_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_group_layouts_match_oracle(case, dtype, tdevice):
    """Forward and backward (q, k, v and the mask's ...) against the float64 reference."""
    run_case("triton", case, dtype, tdevice)


@pytest.mark.parametrize("backend", ["reference", "chunked", "sdpa", "flex"])
@pytest.mark.parametrize("name", ["two_patterns", "uncovered", "lq_ne_lk"])
def test_group_mask_is_a_mask_mod(name, backend):
    """Every backend that takes a mask_mod takes a GroupMask, and it means the dense mask of its layout."""
    Lq, Lk, sets = LAYOUTS[name]
    layout = SegmentLayout(Lq, Lk, tuple((tuple(q), tuple(k)) for q, k in sets))
    dense = torch.zeros(Lq, Lk, dtype=torch.bool)
    for qruns, ksegs in sets:
        for qs, qe in qruns:
            for ks, ke in ksegs:
                dense[qs:qe, ks:ke] = True
    q, k, v = make_qkv(2, 2, 2, Lq, Lk, 16, seed=4)
    gm = GroupMask(layout)
    got = attnkit.attention(q, k, v, mask_mod=gm, backend=backend)
    want = attnkit.attention(q.double(), k.double(), v.double(), mask=dense, backend="reference")
    assert_close_rel(got, want)
    assert torch.equal(allowed_pairs(2, 2, Lq, Lk, mask_mod=gm)[0, 0], dense)
    assert "group_mask" in build_request(q, k, v, mask_mod=gm).features()


def test_segment_layout_is_checked():
    with pytest.raises(ValueError, match=r"query runs \(0, 8\) of set 0 and \(5, 12\) of set 1 overlap"):
        SegmentLayout(20, 20, ((((0, 8),), ((0, 20),)), (((5, 12),), ((0, 20),))))
    with pytest.raises(ValueError, match="key segments .* overlap"):
        SegmentLayout(20, 20, ((((0, 8),), ((0, 10), (5, 12))),))
    with pytest.raises(ValueError, match=r"query run \(0, 21\) outside \[0, 20\]"):
        SegmentLayout(20, 20, ((((0, 21),), ((0, 20),)),))
    with pytest.raises(ValueError, match=r"key segment \(-1, 3\)"):
        SegmentLayout(20, 20, ((((0, 2),), ((-1, 3),)),))
    with pytest.raises(TypeError, match="layout must be a SegmentLayout"):
        GroupMask([(0, 1)])
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16)
    with pytest.raises(ValueError, match="layout is for Lq=20, Lk=20; q/k have Lq=8, Lk=8"):
        flash_attention(q, k, v, layout=SegmentLayout(20, 20, ()))
    for n in (4, 20):  # a GroupMask for other lengths, through the contract on any backend
        gm = GroupMask(SegmentLayout(n, n, ((((0, 2),), ((0, n),)),)))
        for backend in ("auto", "reference", "chunked", "sdpa"):
            with pytest.raises(ValueError, match=f"GroupMask for Lq={n}, Lk={n}; q/k have Lq=8, Lk=8"):
                attnkit.attention(q, k, v, mask_mod=gm, backend=backend)


def test_segment_layout_boundaries_are_exact():
    """The checks refuse an overlap of ONE token and a key segment ONE past len_k, and accept their
    valid neighbours (touching ranges, a segment ending exactly at len_k): the boundaries are pinned.
    len_q != len_k, so that each range is checked against its own length."""
    # key segments of one set: touching is fine, one shared token is an overlap (in any listed order)
    SegmentLayout(12, 20, ((((0, 12),), ((0, 5), (5, 8))),))
    SegmentLayout(12, 20, ((((0, 12),), ((5, 8), (0, 5))),))
    with pytest.raises(ValueError, match=r"set 0: key segments \[\(0, 5\), \(4, 8\)\] overlap"):
        SegmentLayout(12, 20, ((((0, 12),), ((0, 5), (4, 8))),))
    with pytest.raises(ValueError, match=r"set 1: key segments \[\(0, 5\), \(4, 8\)\] overlap"):
        SegmentLayout(12, 20, ((((0, 6),), ((0, 20),)), (((6, 12),), ((4, 8), (0, 5)))))
    # query runs: touching runs of two sets (or of one set) are fine, one shared token is refused
    SegmentLayout(12, 20, ((((0, 5),), ((0, 20),)), (((5, 12),), ((0, 20),))))
    SegmentLayout(12, 20, ((((0, 5), (5, 12)), ((0, 20),)),))
    with pytest.raises(ValueError, match=r"query runs \(0, 5\) of set 0 and \(4, 12\) of set 1 overlap"):
        SegmentLayout(12, 20, ((((0, 5),), ((0, 20),)), (((4, 12),), ((0, 20),))))
    with pytest.raises(ValueError, match=r"query runs \(0, 5\) of set 0 and \(4, 12\) of set 0 overlap"):
        SegmentLayout(12, 20, ((((0, 5), (4, 12)), ((0, 20),)),))
    # a key segment may end at len_k (20, past len_q = 12), not one past it
    lay = SegmentLayout(12, 20, ((((0, 12),), ((15, 20),)),))
    assert lay.k_blocks(16) == [(0, 15, ()), (15, 20, (0,))]
    with pytest.raises(ValueError, match=r"set 0: key segment \(15, 21\) outside \[0, 20\]"):
        SegmentLayout(12, 20, ((((0, 12),), ((15, 21),)),))
    with pytest.raises(ValueError, match=r"set 0: key segment \(20, 21\) outside \[0, 20\]"):
        SegmentLayout(12, 20, ((((0, 12),), ((20, 21),)),))
    # and a query run may end at len_q, not one past it
    SegmentLayout(12, 20, ((((7, 12),), ((0, 20),)),))
    with pytest.raises(ValueError, match=r"set 0: query run \(7, 13\) outside \[0, 12\]"):
        SegmentLayout(12, 20, ((((7, 13),), ((0, 20),)),))
    # the accepted touching layouts mean what they say
    gm = GroupMask(SegmentLayout(12, 20, ((((0, 5),), ((0, 5), (5, 8))), (((5, 12),), ((15, 20),)))))
    want = torch.zeros(12, 20, dtype=torch.bool)
    want[:5, :8] = True
    want[5:, 15:] = True
    assert torch.equal(allowed_pairs(1, 1, 12, 20, mask_mod=gm)[0, 0], want)


def test_group_tables_skip_disallowed_tiles():
    """The work lists (query blocks with their set, key blocks with the sets that read them) hold
    each set's own ranges only, cut at the block size; the kernels loop over exactly these."""
    lay = SegmentLayout(40, 40, ((((0, 20),), ((0, 20),)), (((20, 40),), ((20, 40),))))
    qb = lay.q_blocks(16)
    assert qb == [(0, 16, 0), (16, 20, 0), (20, 36, 1), (36, 40, 1)]
    kb = lay.k_blocks(16)
    assert kb == [(0, 16, (0,)), (16, 20, (0,)), (20, 36, (1,)), (36, 40, (1,))]
    # uncovered query tokens are blocks with set -1; unread key tokens are blocks read by nobody
    lay2 = SegmentLayout(10, 10, ((((2, 5),), ((6, 8),)),))
    assert lay2.q_blocks(16) == [(0, 2, -1), (2, 5, 0), (5, 10, -1)]
    assert lay2.k_blocks(16) == [(0, 6, ()), (6, 8, (0,)), (8, 10, ())]


# ---------------------------------------------------------------------------
# behaviours every backend shares, run on triton
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mask", "causal_lq_gt_lk", "bias_neg_inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fully_masked_rows_triton(kind, dtype, tdevice):
    test_backends.test_fully_masked_rows(kind, "triton", dtype, tdevice)


def test_dead_rows_lse_triton(tdevice):
    q, k, v = make_qkv(2, 4, 2, 20, 9, 16, seed=11, device=tdevice)
    out, lse = _triton(q, k, v, causal=True, return_lse=True)
    assert torch.isneginf(lse[:, :, :11]).all() and torch.isfinite(lse[:, :, 11:]).all()
    assert torch.all(out[:, :, :11] == 0)


def test_sink_neg_inf_on_dead_rows_triton(tdevice):
    """A sink of -inf (a head without one) on rows with no key (causal, Lq > Lk): the sink's
    gradient is 0 there, not exp(-inf - -inf) = NaN."""
    case = Case("sink_neg_inf_dead_rows", B=1, Hq=2, Hkv=1, Lq=40, Lk=20, D=16, kw=dict(causal=True),
                extras=lambda B, H, Lq, Lk, g: {"sinks": torch.tensor([float("-inf"), 0.5])}, build=default_build)
    run_case("triton", case, torch.float32, tdevice)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_finfo_min_bias_rows_triton(dtype, tdevice):
    """An HF-style additive mask (finfo.min where excluded): scores * log2(e) overflow to -inf. Rows
    with some kept key match the reference; rows with none end empty (output 0, lse -inf: the
    documented difference from the reference's uniform average); nothing is NaN."""
    B, H, L, D = 1, 2, 24, 16
    q, k, v = make_qkv(B, H, H, L, L, D, seed=12, device=tdevice, dtype=dtype)
    g = torch.Generator().manual_seed(13)
    keep = torch.rand(1, H, L, L, generator=g) > 0.3
    keep[:, :, 5] = False  # row 5: every key excluded
    bias = torch.zeros(1, H, L, L, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min).to(tdevice)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, bias)]
    out, lse = _triton(*leaves[:3], bias=leaves[3], return_lse=True)
    g_out = randn(*out.shape, gen=g, device=tdevice, dtype=dtype)
    g_out[:, :, 5] = 0  # as a loss over the unpadded rows: the empty row's output does not count
    grads = torch.autograd.grad((out.float() * g_out.float()).sum(), leaves)
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in grads)
    assert torch.all(out[:, :, 5] == 0) and torch.isneginf(lse[:, :, 5]).all()
    l64 = [x.detach().double().requires_grad_(True) for x in leaves]
    ref, ref_lse = attnkit.attention(*l64[:3], bias=l64[3], return_lse=True, backend="reference")
    refg = torch.autograd.grad((ref * g_out.double()).sum(), l64)
    rows = [i for i in range(L) if i != 5]
    rtol = 5e-5 if dtype == torch.float32 else 3e-2  # bf16: a loose bound; the accuracy rule is test_backends'
    assert_close_rel(out[:, :, rows], ref[:, :, rows], rtol=rtol)
    assert_close_rel(lse[:, :, rows], ref_lse[:, :, rows], rtol=rtol, name="lse")
    for n, a, r in zip(["q", "k", "v", "bias"], grads, refg):
        assert_close_rel(a, r, rtol=rtol, name=f"grad {n}")


def test_noncontiguous_triton(tdevice):
    """q/k/v views of packed [B, L, H, D] tensors and a transposed key-padding-like mask, read in place."""
    B, L, Lk, Hq, Hkv, D = 2, 19, 27, 4, 2, 24
    g = torch.Generator().manual_seed(8)
    q_bl = randn(B, L, Hq, D, gen=g, device=tdevice)
    kv_bl = randn(B, Lk, 2, Hkv, D, gen=g, device=tdevice)
    mask = (randn(B, 1, Lk, L, gen=g, device=tdevice) > -1.0).transpose(-1, -2)
    leaves = [q_bl.requires_grad_(True), kv_bl.requires_grad_(True)]
    q, k, v = q_bl.transpose(1, 2), kv_bl[:, :, 0].transpose(1, 2), kv_bl[:, :, 1].transpose(1, 2)
    assert not any(x.is_contiguous() for x in (q, k, v, mask))
    out = _triton(q, k, v, mask=mask, causal=True)
    g_out = randn(*out.shape, gen=g, device=tdevice)
    grads = torch.autograd.grad((out * g_out).sum(), leaves)
    l64 = [x.detach().double().requires_grad_(True) for x in leaves]
    ref = attnkit.attention(l64[0].transpose(1, 2), l64[1][:, :, 0].transpose(1, 2), l64[1][:, :, 1].transpose(1, 2),
                            mask=mask.contiguous(), causal=True, backend="reference")
    refg = torch.autograd.grad((ref * g_out.double()).sum(), l64)
    assert_close_rel(out, ref)
    for n, a, r in zip(["q", "kv"], grads, refg):
        assert_close_rel(a, r, rtol=5e-5, name=f"grad {n}")


def test_gradient_through_lse_triton(tdevice):
    q, k, v = make_qkv(2, 4, 2, 13, 21, 16, seed=31, device=tdevice)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = _triton(*leaves, causal=True, return_lse=True)
    w = torch.linspace(-1, 2, lse.numel(), device=tdevice).view_as(lse)
    grads = torch.autograd.grad((lse * w).sum() + out.sum(), leaves)
    l64 = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    out64, lse64 = attnkit.attention(*l64, causal=True, return_lse=True, backend="reference")
    ref = torch.autograd.grad((lse64 * w.double()).sum() + out64.sum(), l64)
    for n, a, r in zip("qkv", grads, ref):
        assert_close_rel(a, r, rtol=5e-5, name=f"grad {n}")


def test_softcap_with_a_bias_view_over_nan_padding(tdevice):
    """A bias sliced from a wider buffer whose unused columns hold NaN is read in place, its tail
    tile up to Lk rounded to 16: with a softcap, 0 * NaN of those columns reached dq."""
    B, H, Lq, Lk, D = 1, 2, 19, 37, 16
    g = torch.Generator().manual_seed(41)
    q, k, v = randn(B, H, Lq, D, gen=g, device=tdevice), randn(B, H, Lk, D, gen=g, device=tdevice), \
        randn(B, H, Lk, D, gen=g, device=tdevice)
    wide = torch.full((H, Lq, 48), float("nan"), device=tdevice)
    wide[..., :Lk] = randn(H, Lq, Lk, gen=g, device=tdevice)
    bias = wide[..., :Lk].requires_grad_(False)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = _triton(*leaves, bias=bias, softcap=2.0)
    grads = torch.autograd.grad(out.sum(), leaves)
    l64 = [x.double().requires_grad_(True) for x in (q, k, v)]
    ref = attnkit.attention(*l64, bias=bias.double(), softcap=2.0, backend="reference")
    refg = torch.autograd.grad(ref.sum(), l64)
    assert_close_rel(out, ref)
    for n, a, r in zip("qkv", grads, refg):
        assert_close_rel(a, r, rtol=5e-5, name=f"grad {n}")


@pytest.mark.parametrize("softcap", [30.0, 1e4])
def test_float32_softcap_keeps_float32_accuracy(tdevice, softcap):
    """float32 scores under a large softcap: the kernels' tanh must be accurate near 0, where
    2 sigmoid(2x) - 1 had an absolute error ~1e-7 that the softcap multiplied (1e3x plain float32
    math's error at a softcap of 1e4). Flash kernel (fwd + dq) and decode kernel (4 queries)."""
    B, H, L, D = 1, 2, 40, 32
    g = torch.Generator().manual_seed(43)
    q64, k64, v64 = (torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(tdevice) for _ in range(3))
    scale = D ** -0.5

    def plain32(q):  # plain float32 torch math: the bar
        s = (q.float() @ k64.float().transpose(-1, -2)) * scale
        return torch.softmax(softcap * torch.tanh(s / softcap), -1) @ v64.float()

    for rows in (L, 4):
        q = q64[:, :, :rows]
        ref = attnkit.attention(q, k64, v64, softcap=softcap, backend="reference")
        bar = (plain32(q).double() - ref).norm() / ref.norm()
        out = _triton(q.float(), k64.float(), v64.float(), softcap=softcap)
        assert_close_rel(out, ref, rtol=max(3 * bar.item(), 1e-6), name=f"out ({rows} queries)")
    q32 = q64.float().requires_grad_(True)
    q_ref = q64.clone().requires_grad_(True)
    (dq,) = torch.autograd.grad(_triton(q32, k64.float(), v64.float(), softcap=softcap).sum(), q32)
    (dq64,) = torch.autograd.grad(attnkit.attention(q_ref, k64, v64, softcap=softcap, backend="reference").sum(),
                                  q_ref)
    assert_close_rel(dq, dq64, rtol=5e-6, name="dq")


def test_bias_only_gradient_skips_dkdv(tdevice, monkeypatch):
    """When only the bias needs a gradient, the dK/dV kernel is not launched."""
    launched = []
    real = fa._bwd_dkdv_kernel

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def __getitem__(self, grid):
            launched.append(grid)
            return real[grid]

        def warmup(self, *a, **kw):
            launched.append("warmup")
            return real.warmup(*a, **kw)

    monkeypatch.setattr(fa, "_bwd_dkdv_kernel", Spy())
    fa._PLANS.clear()
    q, k, v = make_qkv(1, 2, 2, 20, 20, 16, seed=42, device=tdevice)
    bias = randn(2, 20, 20, gen=torch.Generator().manual_seed(43), device=tdevice).requires_grad_(True)
    out = _triton(q, k, v, bias=bias)
    (gb,) = torch.autograd.grad(out.sum(), bias)
    b64 = bias.detach().double().requires_grad_(True)
    ref = attnkit.attention(q.double(), k.double(), v.double(), bias=b64, backend="reference")
    assert_close_rel(gb, torch.autograd.grad(ref.sum(), b64)[0], rtol=5e-5, name="grad bias")
    assert launched == []
    leaves = [x.clone().requires_grad_(True) for x in (q, k)]
    _triton(leaves[0], leaves[1], v, bias=bias).sum().backward()
    assert launched, "the spy must see the dK/dV kernel when k needs a gradient"


@pytest.mark.parametrize("backend", ["triton", "chunked"])
def test_second_order_gradients_raise(backend):
    """A gradient penalty through a fused backward must not silently drop the second order."""
    if backend == "triton" and not TRITON_INTERPRET:
        pytest.skip("the triton backend runs on the CPU only with TRITON_INTERPRET=1")
    q, k, v = (x.requires_grad_(True) for x in make_qkv(1, 2, 2, 8, 8, 16, seed=44))
    out = attnkit.attention(q, k, v, backend=backend)
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        (gq ** 2).sum().backward()
    out = attnkit.attention(q, k, v, backend="reference")  # the reference backend differentiates twice
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    (gq ** 2).sum().backward()
    assert q.grad.abs().sum() > 0
    # a penalty on an input's gradient, differentiated for a weight alone (autograd.grad runs only the
    # nodes on the paths to it): the attention's second order lies on them, so it raises, not drops it
    x, w = q.detach()[..., :8].requires_grad_(True), torch.randn(8, 16, requires_grad=True)
    out = attnkit.attention(x @ w, k.detach(), v.detach(), backend=backend)
    (gx,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no second-order gradient"):
        torch.autograd.grad((gx ** 2).sum(), w)


def test_triton_refuses_what_it_lacks():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16)
    for kw, word in [(dict(score_mod=lambda s, b, h, i, j: s * 2), "'score_mod'"),
                     (dict(mask_mod=lambda b, h, i, j: j <= i), "'mask_mod'"),
                     (dict(dropout_p=0.1), "'dropout'")]:
        with pytest.raises(ValueError, match=word):
            _triton(q, k, v, **kw)
    if not TRITON_INTERPRET:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            _triton(q, k, v)


def test_offsets_past_int32(tdevice):
    """A mask whose rows lie 2**30 elements apart: row 2 starts at element 2**31, which int32
    index arithmetic would wrap. (Virtual memory only: the untouched pages are never real.)"""
    if tdevice != "cpu":
        pytest.skip("the same kernel code on the GPU; the CPU keeps this cheap")
    Lq, Lk, S = 3, 16, 1 << 30
    buf = torch.empty(4 * S + Lk + 64, dtype=torch.bool)
    buf[:Lk + 64] = False  # where a wrapped read of row 2 would land
    mask = buf.as_strided((1, 1, Lq, Lk), (0, 0, S, 1), storage_offset=2 * S)
    mask[...] = True
    q, k, v = make_qkv(1, 1, 1, Lq, Lk, 16, seed=2)
    out, lse = _triton(q, k, v, mask=mask, return_lse=True)
    ref, lref = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", return_lse=True)
    assert_close_rel(out, ref)
    assert_close_rel(lse, lref, name="lse")


def _assert_matches_float64(got, q, k, v, bias, g_out, **kw):
    """got = [out, dq, dk, dv, dbias] of attention(q, k, v, bias=bias, **kw) with upstream gradient g_out:
    within the float32 rule of the float64 reference (gradients to 5e-5)."""
    l64 = [x.double().requires_grad_(True) for x in (q, k, v, bias)]
    ref = attnkit.attention(*l64[:3], bias=l64[3], backend="reference", **kw)
    refg = torch.autograd.grad((ref * g_out.double()).sum(), l64)
    assert_close_rel(got[0], ref)
    for n, a, r in zip(["dq", "dk", "dv", "dbias"], got[1:], refg):
        assert_close_rel(a, r, rtol=5e-5, name=f"grad {n}")


@pytest.mark.parametrize("shared_bias", [False, True], ids=["bias_per_batch", "bias_shared"])
def test_one_axis_grid_matches_three_axis_grid(shared_bias, tdevice, monkeypatch):
    """Past 65535 batch rows or heads the kernels fall back to one grid axis (blocks x B x H) and
    decode it themselves: with the axis limit lowered, that path must give what the 3-D grid gives,
    in both program orders (head-major when the bias is shared by the batch), forward and backward."""
    q, k, v = make_qkv(3, 4, 2, 37, 45, 16, seed=12, device=tdevice)
    g = torch.Generator().manual_seed(13)
    bias = randn(1 if shared_bias else 3, 4, 37, 45, gen=g, device=tdevice)
    g_out = randn(3, 4, 37, 16, gen=g, device=tdevice)

    def run():
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, bias)]
        out = _triton(*leaves[:3], bias=leaves[3], causal=True)
        return [out, *torch.autograd.grad((out * g_out).sum(), leaves)]

    three = run()
    monkeypatch.setattr(fa, "_GRID_AXIS_LIMIT", 2)  # B = 3 > 2: one axis
    assert not fa._grid3(3, 4)
    one = run()
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], one, three):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    _assert_matches_float64(one, q, k, v, bias, g_out, causal=True)


def test_mask_helper_kernels_use_one_grid_axis(tdevice, monkeypatch):
    """The mask's occupancy and live-range kernels run one program per (tile, mask batch x head) on a
    1-D grid: CUDA stops axes 1 and 2 at 65535, and a mask's Bm x Hm need not. A per-(b, h) mask over
    several occupancy rows and key chunks, forward and backward, against the float64 reference."""
    from attnkit.ops import _launch

    grids = []
    real = _launch.launch

    def spy(kernel, grid, *a, **kw):
        grids.append((getattr(kernel, "fn", kernel).__name__, tuple(grid)))
        return real(kernel, grid, *a, **kw)

    monkeypatch.setattr(_launch, "launch", spy)
    B, H, Lq, Lk, D = 3, 2, 70, 300, 16  # 3 occupancy rows, 10 columns in 2+ key chunks
    q, k, v = make_qkv(B, H, H, Lq, Lk, D, seed=44, device=tdevice)
    g = torch.Generator().manual_seed(45)
    mask = torch.rand(B, H, Lq, Lk, generator=g) < 0.5
    mask[:, :, :, 200:] = False  # tiles with nothing to attend: the live ranges end early
    mask[0, 1, :40, :64] = True  # tiles allowed whole
    mask = mask.to(tdevice)
    g_out = randn(B, H, Lq, D, gen=g, device=tdevice)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = _triton(*leaves, mask=mask)
    got = [out, *torch.autograd.grad((out * g_out).sum(), leaves)]
    helpers = [gr for name, gr in grids if name in ("_occupancy_kernel", "_live_kernel")]
    assert helpers and all(len(gr) == 1 for gr in helpers), grids
    l64 = [x.double().requires_grad_(True) for x in (q, k, v)]
    ref = attnkit.attention(*l64, mask=mask, backend="reference")
    refg = torch.autograd.grad((ref * g_out.double()).sum(), l64)
    assert_close_rel(got[0], ref)
    for n, a, r in zip("qkv", got[1:], refg):
        assert_close_rel(a, r, rtol=5e-5, name=f"grad {n}")


@pytest.mark.parametrize("rows", [2, 4])
def test_grouped_dq_programs_match_single(tdevice, monkeypatch, rows):
    """With a bias shared by the batch and its gradient, each dQ program takes `rows` batch rows and
    adds their ds before one atomic: that path (GQA, causal, a per-row key-padding mask, odd
    lengths) must give what one row per program gives, and match the float64 reference. (Without
    a mask it runs in every shared-bias gradient test, e.g. group_pair_bias.)"""
    B, Hq, Hkv, Lq, Lk, D = 4, 4, 2, 37, 45, 16
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=21, device=tdevice)
    g = torch.Generator().manual_seed(22)
    bias = randn(1, Hq, Lq, Lk, gen=g, device=tdevice)
    g_out = randn(B, Hq, Lq, D, gen=g, device=tdevice)
    mask = _keypad(B, Hq, Lq, Lk, g)["mask"].to(tdevice)  # differs per row: each row's own mask pointer

    def run():
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, bias)]
        out = _triton(*leaves[:3], bias=leaves[3], mask=mask, causal=True)
        return [out, *torch.autograd.grad((out * g_out).sum(), leaves)]

    monkeypatch.setattr(fa, "_ROWS", rows)
    assert fa._batch_rows(bias, True, B) == rows and fa._batch_rows(bias, True, 6) == 2
    assert fa._batch_rows(bias, True, 3) == 1 and fa._batch_rows(bias, False, B) == 1
    assert fa._batch_rows(bias.expand(B, -1, -1, -1), True, B) == 1
    grouped = run()
    monkeypatch.setattr(fa, "_ROWS", 1)
    assert fa._batch_rows(bias, True, B) == 1
    single = run()
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], grouped, single):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    _assert_matches_float64(grouped, q, k, v, bias, g_out, mask=mask, causal=True)


def test_loop_flags_follow_the_layout():
    """The tables say whether any key tile can be an edge tile (a segment bound off the BLOCK_N
    grid, other than Lk) and whether Lk ends in a partial tile; without them the kernels compile
    their interior loop only."""
    dense = fa._tables(fa.dense_layout(64, 64), 32, 32, torch.device("cpu"))
    assert not dense["edges"] and not dense["tail"]
    odd = fa._tables(fa.dense_layout(64, 45), 32, 32, torch.device("cpu"))
    assert not odd["edges"] and odd["tail"]  # the segment ends at Lk: its last tile is the tail
    groups = fa._tables(SegmentLayout(64, 64, ((((0, 64),), ((0, 40),)),)), 32, 32, torch.device("cpu"))
    assert groups["edges"] and not groups["tail"]


@pytest.mark.parametrize("lk", [64, 45], ids=["aligned", "tail"])
def test_skipped_loops_change_nothing(lk, tdevice, monkeypatch):
    """With the edge loops (and the tail loop) compiled out, forward and backward must equal the
    kernels that compile every loop (there the skipped loops run zero times), bit for bit."""
    B, H, Lq, D = 2, 2, 40, 16
    q, k, v = make_qkv(B, H, H, Lq, lk, D, seed=31, device=tdevice)
    g = torch.Generator().manual_seed(32)
    bias = randn(1, H, Lq, lk, gen=g, device=tdevice)
    g_out = randn(B, H, Lq, D, gen=g, device=tdevice)

    def run():
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, bias)]
        out = _triton(*leaves[:3], bias=leaves[3])
        return [out, *torch.autograd.grad((out * g_out).sum(), leaves)]

    bn = fa._config(D, D, fa._INTERPRET)["fwd"][1]
    assert not fa._tables(fa.dense_layout(Lq, lk), 32, bn, torch.device(tdevice))["edges"]
    lean = run()
    real = fa._tables

    def every_loop(*a, **kw):
        return dict(real(*a, **kw), edges=True, tail=True)

    monkeypatch.setattr(fa, "_tables", every_loop)
    full = run()
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], lean, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    ref = attnkit.attention(*(x.double() for x in (q, k, v)), bias=bias.double(), backend="reference")
    assert_close_rel(lean[0], ref)


def _skip_masks(B, H, Lq, Lk, g):
    """Masks that leave whole tiles empty (the kernels skip those): name -> bool mask."""
    qi = torch.arange(Lq)[:, None]
    kj = torch.arange(Lk)[None, :]
    causal = kj <= qi + (Lk - Lq)  # bottom-right, as causal=True
    start = torch.tensor([0, 37, 70, 5][:B]).view(B, 1, 1, 1)  # left padding per batch row
    width = torch.tensor([3, 20, 50, 9][:H]).view(1, H, 1, 1)  # a band per head
    lengths = torch.tensor([Lk, 40, 0, 33][:B]).view(B, 1, 1, 1)  # right padding; row 2 sees no key
    return {
        "causal": causal.view(1, 1, Lq, Lk),
        "hf_left_pad_causal": causal & (kj >= start),
        "band_per_head": (kj <= qi + (Lk - Lq)) & (kj > qi + (Lk - Lq) - width),
        "key_right_pad": torch.arange(Lk).view(1, 1, 1, Lk) < lengths,
        "query_rows": (torch.rand(B, 1, Lq, 1, generator=g) > 0.5),
        "random_sparse": torch.rand(B, H, Lq, Lk, generator=g) > 0.97,
    }


def test_live_table_matches_the_mask(tdevice):
    """_live's table: per block of the block axis, [first, end) of the scanned axis where the mask allows a
    pair, widened to the occupancy's G x G tiles ((Lk or Lq, 0) where none), against a torch computation of
    the same; broadcast dims collapse to one block, or stand for the whole scanned axis."""
    B, H, Lq, Lk, G = 3, 2, 70, 101, fa._OCC_TILE
    g = torch.Generator().manual_seed(41)
    for name, mask in _skip_masks(B, H, Lq, Lk, g).items():
        mask = fa._aligned(mask.to(tdevice))
        for keys, block in ((True, 32), (False, 16), (True, 64)):
            lay = fa.dense_layout(Lq, Lk)
            tab = fa._tables(lay, block, block, torch.device(tdevice))
            spec, strides = fa._live_spec(mask, tab["qtab" if keys else "ktab"],
                                          tab["n_qblocks" if keys else "n_kblocks"], Lq, Lk, keys)
            got = fa._live(fa._bits(mask, mask), spec).cpu()
            m = mask.cpu() if keys else mask.cpu().transpose(2, 3)  # [Bm, Hm, block axis, scanned axis]
            n_true = Lk if keys else Lq
            blocks = 1 if m.shape[2] == 1 else -(-m.shape[2] // block)
            assert got.shape == (mask.shape[0], mask.shape[1], blocks, 4), (name, keys)
            assert strides[2] == (0 if blocks == 1 else 4)
            # G x G tiles whose pairs (within the mask) are all allowed, [Bm, Hm, row tiles, column tiles]
            pad = torch.nn.functional.pad(m, (0, -m.shape[3] % G, 0, -m.shape[2] % G), value=True)
            full_tiles = pad.view(*m.shape[:2], pad.shape[2] // G, G, pad.shape[3] // G, G).all(5).all(3)
            for i in range(blocks):
                lo, hi = i * block // G * G, -(-(i + 1) * block // G) * G  # the block's rows, widened to G
                hit = m[:, :, lo:hi].any(2)  # [Bm, Hm, scanned]
                if hit.shape[-1] == 1:  # broadcast: one entry for the whole axis
                    first, end = torch.zeros_like(hit[..., 0], dtype=torch.long), torch.full_like(hit[..., 0], n_true,
                                                                                               dtype=torch.long)
                    live = hit[..., 0]
                else:
                    tiles = torch.nn.functional.pad(hit, (0, -hit.shape[-1] % G)).view(*hit.shape[:2], -1, G).any(-1)
                    idx = torch.arange(tiles.shape[-1])
                    first = torch.where(tiles, idx, tiles.shape[-1]).amin(-1) * G
                    end = torch.clamp((torch.where(tiles, idx, -1).amax(-1) + 1) * G, max=n_true)
                    live = tiles.any(-1)
                first = torch.where(live, first, n_true)
                end = torch.where(live, end, 0)
                assert torch.equal(got[:, :, i, 0], first.int()), (name, keys, i, got[:, :, i], first, end)
                assert torch.equal(got[:, :, i, 1], end.int()), (name, keys, i, got[:, :, i], first, end)
                # the first run of tiles full for every row tile of the block
                cols = full_tiles[:, :, lo // G:-(-hi // G)].all(2)  # [Bm, Hm, column tiles]
                for bm in range(cols.shape[0]):
                    for hm in range(cols.shape[1]):
                        c = cols[bm, hm].tolist()
                        if True not in c:
                            want = (n_true, 0)
                        elif len(c) == 1:  # broadcast (or a single tile): the whole axis
                            want = (0, n_true)
                        else:
                            f = c.index(True)
                            e = next((j for j in range(f + 1, len(c)) if not c[j]), len(c))
                            want = (f * G, min(e * G, n_true))
                        assert tuple(got[bm, hm, i, 2:].tolist()) == want, (name, keys, i, bm, hm, c)


@pytest.mark.parametrize("kind", ["causal", "hf_left_pad_causal", "band_per_head", "key_right_pad", "query_rows",
                                  "random_sparse", "paired_rows"])
def test_masks_that_empty_tiles_match_reference(kind, tdevice, monkeypatch):
    """Tiles a mask tensor leaves empty are skipped (_live_spec): forward and gradients (with a bias:
    its gradient too) match float64 and the kernels that visit every tile. Lq != Lk, lengths off the
    tile grid, GQA, rows with no key (output 0), per-row masks under paired dQ rows (their union)."""
    B, Hq, Hkv, Lq, Lk, D = 4, 2, 1, 90, 101, 16
    q, k, v = make_qkv(B, Hq, Hkv, Lq, Lk, D, seed=43, device=tdevice)
    g = torch.Generator().manual_seed(44)
    masks = _skip_masks(B, Hq, Lq, Lk, g)
    mask = (masks["hf_left_pad_causal"] if kind == "paired_rows" else masks[kind]).to(tdevice)
    bias = randn(1, Hq, Lq, Lk, gen=g, device=tdevice)
    g_out = randn(B, Hq, Lq, D, gen=g, device=tdevice)
    if kind == "paired_rows":
        monkeypatch.setattr(fa, "_ROWS", 2)

    def run():
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, bias)]
        out = _triton(*leaves[:3], bias=leaves[3], mask=mask)
        return [out, *torch.autograd.grad((out * g_out).sum(), leaves)]

    skipping = run()
    monkeypatch.setattr(fa, "_SKIP_MASKED", False)
    every = run()
    for name, a, b in zip(["out", "dq", "dk", "dv", "dbias"], skipping, every):  # summation order may differ
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    _assert_matches_float64(skipping, q, k, v, bias, g_out, mask=mask)
    dead = ~mask.expand(B, Hq, Lq, Lk).any(-1)
    if dead.any():
        assert skipping[0][dead].abs().max() == 0


def test_kernels_read_the_live_table(tdevice, monkeypatch):
    """The three kernels take only what the live table allows: told that no pair of any block is live,
    the output and every gradient are zeros, although the mask allows everything."""
    B, H, Lq, Lk, D = 2, 2, 40, 50, 16
    q, k, v = (x.requires_grad_(True) for x in make_qkv(B, H, H, Lq, Lk, D, seed=45, device=tdevice))
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=tdevice)
    real = fa._live

    def nothing_live(bits, spec, occ=None):
        out = real(bits, spec, occ)
        if spec is not None:
            out[..., 0] = spec[-2]  # (n_true, 0): empty
            out[..., 1] = 0
        return out

    monkeypatch.setattr(fa, "_live", nothing_live)
    out = _triton(q, k, v, mask=mask)
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    for name, t in zip(["out", "dq", "dk", "dv"], (out, *grads)):
        assert t.abs().max() == 0, name
    monkeypatch.setattr(fa, "_live", real)
    assert _triton(q, k, v, mask=mask).abs().max() > 0


def test_kernels_run_full_tiles_without_the_mask(tdevice, monkeypatch):
    """Tiles the live table calls full run without reading the mask: told that every tile is full, the
    three kernels give unmasked attention (output and gradients), although the mask hides half the keys.
    Lengths on every kernel's tile grid, so that every tile is an interior one."""
    B, H, L, D = 2, 2, 128, 16
    q, k, v = make_qkv(B, H, H, L, L, D, seed=46, device=tdevice)
    mask = (torch.arange(L, device=tdevice) % 2 == 0).view(1, 1, 1, L).expand(B, 1, L, L).contiguous()
    g_out = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(47)).to(tdevice)
    real = fa._live

    def all_full(bits, spec, occ=None):
        out = real(bits, spec, occ)
        if spec is not None:
            out[..., 0] = out[..., 2] = 0
            out[..., 1] = out[..., 3] = spec[-2]
        return out

    def run(**kw):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = _triton(*leaves, **kw)
        return [out, *torch.autograd.grad((out * g_out).sum(), leaves)]

    monkeypatch.setattr(fa, "_live", all_full)
    told = run(mask=mask)
    monkeypatch.setattr(fa, "_live", real)
    plain = run()
    masked = run(mask=mask)
    for name, a, b, c in zip(["out", "dq", "dk", "dv"], told, plain, masked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
        assert rel_err(a, c) > 0.1, name



def test_one_mask_occupancy_per_step(tdevice, monkeypatch):
    """A forward that autograd records keeps the mask's occupancy for its backward: one pass over the
    mask per training step, not two. Without autograd the forward makes one of its own."""
    B, H, Lq, Lk, D = 2, 2, 40, 70, 16
    q, k, v = (x.requires_grad_(True) for x in make_qkv(B, H, H, Lq, Lk, D, seed=48, device=tdevice))
    mask = torch.rand(B, 1, Lq, Lk, generator=torch.Generator().manual_seed(49)).to(tdevice) < 0.7
    made = []
    real = fa._occupancy
    monkeypatch.setattr(fa, "_occupancy", lambda bits: made.append(bits.shape) or real(bits))
    out = _triton(q, k, v, mask=mask)
    assert len(made) == 1
    torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    assert len(made) == 1
    with torch.no_grad():
        _triton(q, k, v, mask=mask)
    assert len(made) == 2


def test_a_mask_changed_before_the_backward_is_refused(tdevice):
    """The forward's output and its mask occupancy are of the mask as it was: a backward after an
    in-place change of the mask raises (autograd's version check), as for any saved tensor."""
    # rows of 48 keys: read in place (a row stride off the 16-element grid would be copied first: _aligned)
    q, k, v = (x.requires_grad_(True) for x in make_qkv(1, 2, 2, 40, 48, 16, seed=51, device=tdevice))
    mask = torch.ones(1, 1, 40, 48, dtype=torch.bool, device=tdevice).tril()
    out = flash_attention(q, k, v, mask=mask)[0]
    mask.fill_(True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# A case for the build fallback: a bias shared by the batch (its gradient by atomics, paired dQ rows),
# a random key mask, GQA, lengths off every tile grid.
_FALLBACK_CASE = Case("fallback", B=2, Hq=4, Hkv=2, Lq=70, Lk=45, D=24, seed=50,
                      extras=_merge(_bias(lambda B, H, Lq, Lk: (1, H, Lq, Lk)), _keypad), build=default_build)


def _configs(call: tuple) -> tuple:
    """A kernel call's (BLOCK_M, BLOCK_N, warps, stages)."""
    return call[3]["BLOCK_M"], call[3]["BLOCK_N"], call[4]["num_warps"], call[4]["num_stages"]


def _fallback_warnings(record) -> list[str]:
    """The kernel kinds named by the fallback warnings of a pytest.warns record, in order."""
    return [str(w.message).split("Triton ")[1].split(" kernel")[0] for w in record
            if "does not fit this GPU" in str(w.message)]


def test_configs_that_do_not_build_fall_back(tdevice, monkeypatch):
    """A kernel whose config does not build on the GPU (Triton's OutOfResources, raised before the
    launch) runs with fa._FALLBACK instead, for the forward and both backward kernels, and warns once
    per plan; the results, a shared bias's gradient (atomics) included, stay right."""
    out_of_resources = fa._launch.OUT_OF_RESOURCES[0]
    real = fa._planned
    failed = []

    def planned(kernel, call, device):
        launch, tabs, live = real(kernel, call, device)
        if _configs(call) != fa._FALLBACK:
            def launch(*tensors, cfg=_configs(call)):
                failed.append(cfg)
                raise out_of_resources(300_000, 232_448, "shared memory")
        return launch, tabs, live

    monkeypatch.setattr(fa, "_PLANS", {})
    monkeypatch.setattr(fa, "_planned", planned)
    with pytest.warns(RuntimeWarning) as record:
        check_against_oracle(attention_fn("triton"), _FALLBACK_CASE, torch.float32, tdevice)
    assert _fallback_warnings(record) == ["fwd", "dq", "dkdv"]
    assert len(failed) == 3
    # the plans keep the fallback: a second step neither fails nor warns
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        check_against_oracle(attention_fn("triton"), _FALLBACK_CASE, torch.float32, tdevice)
    assert len(failed) == 3


def test_the_tuner_falls_back_too(monkeypatch):
    """The tuner's path (_pick): a tuned config that fails is cleared (reset) and the default runs; a
    default that does not build runs fa._FALLBACK, once with a warning, and the key keeps it, so later
    calls go straight to it. A failure at _FALLBACK itself raises."""
    out_of_resources = fa._launch.OUT_OF_RESOURCES[0]
    monkeypatch.setattr(fa, "_TUNED", {})
    key, default, tuned = ("a key",), (64, 64, 4, 3), (128, 64, 8, 3)
    fa._TUNED[("dq", key)] = tuned
    tried, resets = [], []

    def launch(cfg):
        tried.append(cfg)
        if cfg != fa._FALLBACK:
            raise out_of_resources(300_000, 232_448, "shared memory")

    with pytest.warns(RuntimeWarning, match="the Triton dq kernel's config \\(64, 64, 4, 3\\)"):
        fa._pick("dq", key, default, launch, reset=lambda: resets.append(1))
    assert tried == [tuned, default, fa._FALLBACK] and len(resets) == 1
    assert fa._TUNED[("dq", key)] == fa._FALLBACK
    tried.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fa._pick("dq", key, default, launch)
    assert tried == [fa._FALLBACK]
    with pytest.raises(out_of_resources):
        fa._pick("dq", ("another key",), fa._FALLBACK, lambda cfg: launch(None))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_oversized_configs_fall_back_on_the_gpu(dtype, tdevice, monkeypatch):
    """On a GPU, configs that really need more shared memory than it has (twelve stages of 64-key
    tiles at D = 128: > 300 KB) fall back for all three kernels, and the results stay right."""
    if tdevice != "cuda":
        pytest.skip("shared memory limits exist on a GPU only")
    big = dict(fwd=(128, 64, 4, 12), dq=(64, 64, 4, 12), dkdv=(64, 64, 4, 12))
    monkeypatch.setattr(fa, "_config", lambda *a, **kw: dict(big))
    monkeypatch.setattr(fa, "_PLANS", {})
    case = _FALLBACK_CASE.replace(D=128, Lq=300, Lk=260)
    with pytest.warns(RuntimeWarning) as record:
        check_against_oracle(attention_fn("triton"), case, dtype, tdevice)
    assert _fallback_warnings(record) == ["fwd", "dq", "dkdv"]


def test_segment_layout_normalises_sets():
    """Lists become tuples (the layout is hashed by the kernels' table cache); bad values are named."""
    lay = SegmentLayout(10, 10, [[[(0, 5)], [(0, 5)]], [[[5, 10]], [(0, 10)]]])
    assert lay.sets == ((((0, 5),), ((0, 5),)), (((5, 10),), ((0, 10),)))
    hash(lay)
    with pytest.raises(TypeError, match="set 0: query runs must be \\(start, end\\) int pairs"):
        SegmentLayout(10, 10, [[[(0, 5.5)], []]])
    with pytest.raises(TypeError, match="set 1 must be a \\(query runs, key segments\\) pair"):
        SegmentLayout(10, 10, [[[(0, 5)], []], [(0, 5)]])
    # an empty query run (a group of size 0) may sit anywhere
    SegmentLayout(20, 20, ((((0, 20),), ((0, 10),)), (((10, 10),), ((0, 10),))))


# ---------------------------------------------------------------------------
# CUDA: real sizes, and the dispatcher's choice
# ---------------------------------------------------------------------------

CUDA_GROUP = [
    _group_case("two_patterns", name="cu_group_small"),
]


def _big_group_case(name, sizes, patterns, B=2, Hq=4, Hkv=4, D=64, **kw) -> Case:
    starts, s = {}, 0
    for g, n in sizes:
        starts[g] = (s, s + n)
        s += n
    sets = tuple((tuple(starts[g] for g in qs), tuple(starts[g] for g in kv)) for qs, kv in patterns)
    layout = SegmentLayout(s, s, sets)

    def build(t):
        out = default_build(t)
        out["mask_mod"] = GroupMask(layout, t["q"].device if t.get("q") is not None else "cpu")
        return out

    return Case(name=name, B=B, Hq=Hq, Hkv=Hkv, Lq=s, Lk=s, D=D, build=build, **kw)


CUDA_GROUP += [
    _big_group_case("cu_abupt_D64", [("sa", 700), ("sq", 300), ("va", 500), ("vq", 1100)],
                    [(["sa", "sq"], ["sa"]), (["va", "vq"], ["va", "sa"])]),
    _big_group_case("cu_8x200_D72_gqa", [(f"g{i}", 200) for i in range(8)],
                    [([f"g{i}"], ["g0"] if i == 0 else ["g0", f"g{i}"]) for i in range(8)], Hq=8, Hkv=2, D=72),
    _big_group_case("cu_abupt_D128_keypad", [("sa", 640), ("sq", 333), ("va", 512), ("vq", 777)],
                    [(["sa", "sq"], ["sa"]), (["va", "vq"], ["va"])], D=128, extras=_keypad),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", CUDA_GROUP, ids=[c.name for c in CUDA_GROUP])
def test_cuda_group_layouts(case, dtype):
    run_case("triton", case, dtype, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("D", [16, 32, 48, 80, 96, 256])
def test_cuda_head_dims(D):
    run_case("triton", Case(f"cu_d{D}", B=2, Hq=4, Hkv=2, Lq=300, Lk=515, D=D, kw=dict(causal=True)),
             torch.bfloat16, "cuda")


def _pair_bias(B, H, Lq, Lk, g):  # Evoformer: one [H, L, L] bias for every row, with key padding
    return {"bias": torch.randn(H, Lq, Lk, generator=g), "mask": torch.rand(B, 1, 1, Lk, generator=g) > 0.2}


CUDA_FEATURES = [
    # lengths off the block grid, head dims 32 / 64 / 128, bias shared by the batch with its gradient
    Case("cu_evo_msa_L300_D32", B=8, Hq=4, Hkv=4, Lq=300, Lk=300, D=32, extras=_pair_bias,
         build=default_build),
    Case("cu_bias_causal_gqa_D128", B=2, Hq=8, Hkv=2, Lq=259, Lk=391, D=128, kw=dict(causal=True),
         extras=lambda B, H, Lq, Lk, g: {"bias": torch.randn(1, H, Lq, Lk, generator=g)}, build=default_build),
    Case("cu_softcap_sinks_window_D64", B=2, Hq=8, Hkv=2, Lq=517, Lk=517, D=64,
         kw=dict(window=(100, 0), softcap=2.0, return_lse=True),
         extras=lambda B, H, Lq, Lk, g: {"sinks": torch.randn(H, generator=g),
                                         "bias": torch.randn(B, 1, 1, Lk, generator=g)}, build=default_build),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("case", CUDA_FEATURES, ids=[c.name for c in CUDA_FEATURES])
def test_cuda_features(case, dtype):
    run_case("triton", case, dtype, "cuda")


def compiled_kernels(kernel) -> list:
    """The compiled kernels of `kernel` launched so far, through _launch.launch (the tuner's path) or
    through a kept plan's Launch."""
    from attnkit.ops import _launch
    found = [hit[0] for key, hit in _launch._CACHE.items() if key[0] is kernel]  # (compiled, fn, lead)
    for plan in fa._PLANS.values():
        for part in (plan if isinstance(plan[0], tuple) else (plan,)):  # backward plans hold three
            launch = part[0] if part is not None else None  # (Launch, tables); None: not planned yet
            if launch is not None and launch.kernel is kernel:
                found += [hit[0] for hit in launch._compiled.values()]
    return found


@pytest.mark.cuda
def test_cuda_autotune(monkeypatch):
    """ATTNKIT_TRITON_AUTOTUNE=1: every candidate runs once, the winner's outputs stand (the bias
    gradient that the dQ kernel accumulates is cleared before the final launch)."""
    monkeypatch.setenv("ATTNKIT_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(fa, "_TUNED", {})
    run_case("triton", CUDA_FEATURES[0], torch.bfloat16, "cuda")
    assert sorted({kind for kind, _ in fa._TUNED}) == ["dkdv", "dq", "fwd"]


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("D", [64, 128])
def test_cuda_autotune_candidates_match_reference(D, kind, monkeypatch):
    """Every config the autotuner may pick, and the defaults, is at least as close to float64 as
    plain bf16 math (the correct builds sit at a third of it), here with a shared bias and its
    gradient: a config that Triton builds wrong must never win a timing. (32, 128, 8, 2), a dK/dV tile
    of the sweeps, gave dK 1.7-7.1e-2 off at D = 128 against 2.4e-3 for the others and 5.9-8.2e-3
    for bf16 math (H100, triton 3.6, 2026-11-24: docs/results/dkdv_32x128x8_check_h100_2026-11-24.txt),
    so it is in no candidate list."""
    B, H, L = 2, 4, 512
    q, k, v = make_qkv(B, H, H, L, L, D, dtype=torch.bfloat16, device="cuda", seed=5)
    g = torch.Generator().manual_seed(6)
    bias = randn(1, H, L, L, dtype=torch.bfloat16, device="cuda", gen=g)
    g_out = randn(B, H, L, D, dtype=torch.bfloat16, device="cuda", gen=g)

    def run(fn, dtype):
        leaves = [x.to(dtype).requires_grad_(True) for x in (q, k, v, bias)]
        out = fn(*leaves)
        return [out, *torch.autograd.grad(out, leaves, g_out.to(dtype))]
    ref = run(lambda q, k, v, b: attnkit.attention(q, k, v, bias=b, backend="reference"), torch.float64)
    bar = [rel_err(a, r) for a, r in zip(run(lambda q, k, v, b: naive_attention(q, k, v, bias=b), torch.bfloat16), ref)]
    from triton.runtime.errors import OutOfResources
    monkeypatch.delenv("ATTNKIT_TRITON_AUTOTUNE", raising=False)  # each candidate runs itself, never a tuned winner
    monkeypatch.setattr(fa, "_TUNED", {})
    monkeypatch.setattr(fa, "_PLANS", {})
    base = fa._config
    default = base(D, D, False, False, fa._batch_rows(bias, True, B))[kind]
    for cfg in dict.fromkeys([default] + fa.AUTOTUNE_CANDIDATES[kind]):
        def config(d, dv, interp, f32=False, rows=1, cfg=cfg):
            return {**base(d, dv, interp, f32, rows), kind: cfg}
        monkeypatch.setattr(fa, "_config", config)
        try:
            got = run(lambda q, k, v, b: attnkit.attention(q, k, v, bias=b, backend="triton"), torch.bfloat16)
        except OutOfResources:  # the tuner skips a candidate that does not fit (shared memory); the default must
            assert cfg != default
            continue
        for name, a, r, worst in zip(["out", "dq", "dk", "dv", "dbias"], got, ref, bar):
            assert rel_err(a, r) <= worst, (cfg, name, rel_err(a, r), worst)


@pytest.mark.cuda
@pytest.mark.parametrize("cap", [None, 128, 24, (24, 128), "cap72_allowed"],
                         ids=["uncapped", "cap128", "cap24_spills", "caps_24_128", "cap72_allowed"])
def test_cuda_register_cap(cap, monkeypatch):
    """The forward's register cap (_maxnreg): a cap that fits gives the uncapped results; one that
    would spill is dropped by _launch (the uncapped build runs), never a slow or wrong kernel; of
    several caps, the first that fits is kept; a Cap with a spill allowance is kept if its build
    spills within it (results still right)."""
    from attnkit.ops import _launch
    if cap == "cap72_allowed":  # spills (668 B offline at L = 300), kept all the same
        cap = _launch.Cap(72, spills=1 << 20)
    monkeypatch.setattr(fa, "_maxnreg", lambda kind, d, dv, cfg: cap if kind == "fwd" else None)
    monkeypatch.setattr(_launch, "_CACHE", {})
    monkeypatch.setattr(fa, "_PLANS", {})
    run_case("triton", CUDA_FEATURES[0], torch.bfloat16, "cuda")  # the Evoformer MSA case, D = 32
    fwd = compiled_kernels(fa._fwd_kernel)
    if isinstance(cap, _launch.Cap):  # kept although it spills
        assert fwd and all(c.n_regs <= 72 and c.n_spills > 0 for c in fwd)
        return
    assert fwd and all(c.n_spills == 0 for c in fwd)
    if cap == 24:  # far too few: ptxas refuses the build (its MMAs need 58), so the uncapped one ran
        assert all(c.n_regs > cap for c in fwd)
    if cap == (24, 128):  # 24 spills, so the build under 128 ran
        assert all(24 < c.n_regs <= 128 for c in fwd)


def test_launch_keeps_the_first_cap_that_builds_within_its_allowance(monkeypatch):
    """_launch._compile's choice among register caps, without a GPU (a stand-in kernel whose builds
    report their spills): caps are tried in order; a plain int cap is kept only without spills, a
    Cap up to its allowance (Triton's n_spills, 32-bit words); a cap too tight to build is skipped;
    with none kept, the uncapped build runs."""
    from attnkit.ops import _launch

    class Built:
        def __init__(self, regs, spills):
            self.n_regs, self.n_spills = regs, spills

        def _init_handles(self):
            pass

        def __getitem__(self, grid):
            return lambda *args, stream=None: ran.append(self.n_regs)

    class Kernel:
        arg_names = ["x", "BLOCK"]
        spills = {96: 40, 128: 12, 168: 0}

        def warmup(self, *args, grid, num_warps, num_stages, maxnreg, **consts):
            if maxnreg < 64:
                raise RuntimeError("ptxas: insufficient registers")
            return Built(maxnreg, self.spills[maxnreg])

        def __getitem__(self, grid):  # the uncapped build, through Triton's own path
            return lambda *args, **kw: ran.append(None) or Built(None, 0)

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return None

    monkeypatch.setattr(_launch, "driver", type("D", (), {"active": Driver()}), raising=False)  # none without triton
    kernel, Cap = Kernel(), _launch.Cap
    for caps, regs in [(None, None), (168, 168), (128, None), ((32, 96, 128, 168), 168), (Cap(128, 12), 128),
                       (Cap(128, 11), None), ((Cap(96, 39), Cap(128, 16), 168), 128), ((32, Cap(96, 40)), 96)]:
        ran = []
        built = _launch._compile(kernel, (1,), (0,), {"BLOCK": 16}, 4, 3, caps)
        assert ran == [regs] and built.n_regs == regs, (caps, ran)


def test_misaligned_masks_and_biases_are_copied_into_padded_rows():
    """A mask or bias whose rows do not start on 16-element boundaries is copied once, in its own
    shape, into rows padded with zeros (Triton vectorises and pipelines the loads only then); an
    aligned one is read in place. The kernels read into the padding (_guard_len) only where the
    storage reaches that far."""
    aligned = torch.randn(2, 3, 5, 32)
    assert fa._aligned(aligned) is aligned and fa._guard_len(32, aligned) == 32
    column = torch.randn(2, 3, 5, 1)  # broadcast along the keys: nothing is vectorised there
    assert fa._aligned(column) is column
    for t in (torch.randn(2, 3, 5, 37), torch.randn(2, 1, 1, 37), torch.rand(2, 1, 5, 37) > 0.5,
              torch.randn(2, 3, 37, 5).transpose(-1, -2)[..., :3]):
        c = fa._aligned(t)
        assert c is not t and c.dtype == t.dtype and torch.equal(c, t), t.shape
        assert c.stride(-1) == 1 and all(st % 16 == 0 for n, st in zip(c.shape[:-1], c.stride()) if n > 1)
        n = t.shape[-1]
        assert fa._guard_len(n, c) == -(-n // 16) * 16
        assert not c._base[..., n:].any()  # the padding the kernels may read: zeros
    tight = torch.randn(2, 3, 5, 37)  # its last row ends where the storage does
    assert fa._guard_len(37, tight) == 37 and fa._guard_len(37, fa._aligned(tight), tight) == 37
    roomy = torch.randn(5, 48)[:, :37]  # aligned rows with room past Lk: read in place, guard rounded up
    assert fa._aligned(roomy) is roomy and fa._guard_len(37, roomy) == 48
    assert fa._guard_len(37, torch.randn(4 * 48 + 37).as_strided((5, 37), (48, 1))) == 37  # storage ends at Lk


def _offline_script(name: str, *args: str):
    """Run benchmarks/<name> (a build for sm_90a on this GPU-less machine: compiled, not interpreted)."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", name)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_offline_build_of_an_off_grid_length_does_not_spill():
    """benchmarks/offline_build.py builds the three kernels for sm_90a on this (GPU-less) machine. At
    L = 300 (a bias row stride off the 16-element grid) the forward built before _aligned and
    _guard_len needed 255 registers and spilled 280 bytes with 13 layout conversions; now it builds
    as at L = 304 (128 registers under its cap, no spills). Its interior key loop, read from the SASS,
    issued 12.5 instructions per score before the bias widening (_widen) and the guards were trimmed
    (11.3 after), and 17.6 with a key mask read as byte tiles (14.1 as one row of keys per tile). The
    dK/dV kernel builds under its register cap although it spills a little (52 B, 144 B with the key
    mask): _launch keeps it within the cap's allowance."""
    import re
    for mask, per_score, conversions_max in (("none", 11.6, 7), ("key", 14.5, 9)):
        r = _offline_script("offline_build.py", "--L", "300", "--D", "32", "--bias", "pair", "--mask", mask)
        rows = {m[0]: (int(m[1]), int(m[2]), int(m[3])) for m in re.findall(
            r"(fwd|dq|dkdv)\s+\([^)]*\)\s+registers\s+(\d+)\s+spill stores\s+(\d+) B\s+layout conversions (\d+)",
            r.stdout)}
        assert set(rows) == {"fwd", "dq", "dkdv"}, r.stdout
        regs, spills, conversions = rows["fwd"]
        # with a mask, the loop over the tiles it allows whole (_full_split) adds two conversions (7 before)
        assert spills == 0 and regs < 200 and conversions <= conversions_max, r.stdout
        fwd_lines = r.stdout.split("  dq ")[0]  # the forward's rows: its innermost loops, interior one first
        loops = [float(x) for x in re.findall(r"\(([\d.]+) per score\)", fwd_lines)]
        assert loops and min(loops) <= per_score, r.stdout
        # dK/dV keeps its cap (3 programs per multiprocessor): it spills within the allowance, not in its loops
        regs, spills, _ = rows["dkdv"]
        assert regs == 168 and 0 < spills <= 192 and "(cap 168, 192 B of spills allowed)" in r.stdout, r.stdout


def test_gluon_probe_builds_offline():
    """benchmarks/probe_gluon_fwd.py (issue 5's Gluon forward, bias on the tensor cores) builds for
    sm_90a on this GPU-less machine. It held 4 programs per multiprocessor (124 registers, 45 KB of
    shared memory, no spills) and 8.8 instructions per score in its inner loop against the Triton
    forward's 11.2 when it was timed (docs/benchmarks.md, 2026-11-24); a Triton upgrade that loses
    that shows here."""
    import re
    r = _offline_script("probe_gluon_fwd.py", "--build", "--no-overlap")
    m = re.search(r"registers (\d+), spill stores (\d+) B, shared memory (\d+) B; innermost MMA loop: \d+ "
                  r"\(([\d.]+) per score\)", r.stdout)
    assert m, r.stdout
    regs, spills, smem, per_score = int(m[1]), int(m[2]), int(m[3]), float(m[4])
    assert regs <= 128 and spills == 0 and smem <= 57 * 1024 and per_score <= 9.2, r.stdout


def test_gluon_warp_specialized_probe_builds_offline():
    """benchmarks/probe_gluon_ws_fwd.py (issue 5's warp-specialised Gluon forward) builds for sm_90a on
    this GPU-less machine. Its best variant held 4 CTAs per multiprocessor under maxnreg 64 (the consumer
    warpgroup gets 104 registers after setmaxnreg), no spills, 41 KB of shared memory and 245 instructions
    per 64 x 64 tile when it was timed (docs/benchmarks.md, 2026-11-24)."""
    import re
    r = _offline_script("probe_gluon_ws_fwd.py", "--build")
    m = re.search(r"ws_r64 registers (\d+), spills (\d+) B, shared (\d+) B, loops (\d+)", r.stdout)
    assert m, r.stdout
    regs, spills, smem, loop = (int(x) for x in m.groups())
    assert regs == 64 and spills == 0 and smem <= 45 * 1024 and loop <= 260, r.stdout


def test_one_pass_backward_probe_matches_float64():
    """benchmarks/probe_fused_bwd.py (issue 5's one-pass backward and batch-loop dQ kernel, measured slower
    than today's backward on 2026-11-24) still computes the right gradients: its --check runs both kernels
    in the interpreter on float32 inputs against float64 autograd."""
    import os
    import re
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "probe_fused_bwd.py")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    errs = [float(x) for x in re.findall(r"(?:dq|dk|dv|dbias) ([\d.e+-]+)", r.stdout)]
    assert len(errs) == 22, r.stdout  # two shapes: 2 one-pass variants x 4 grads, 2 (B = 4) or 1 batch loops x 2
    assert max(errs) < 1e-5, r.stdout


def test_backward_frees_float32_bias_gradient_before_dk_dv(tdevice, monkeypatch):
    """The backward's float32 bias-gradient buffer is gone (cast to the bias's dtype and dropped)
    by the time dk and dv are allocated, so the peak memory holds one copy of the bias gradient.
    The buffer is followed through a weak reference; the CUDA test below measures the peak."""
    import weakref
    B, H, L, D = 2, 2, 24, 16
    q, k, v = (x.requires_grad_(True) for x in make_qkv(B, H, H, L, L, D, dtype=torch.bfloat16, device=tdevice))
    bias = torch.randn(1, H, L, L, device=tdevice).to(torch.bfloat16).requires_grad_(True)
    out = attnkit.attention(q, k, v, bias=bias, backend="triton")
    buffers, alive_at_alloc = [], []
    zeros, empty_like = torch.zeros, torch.empty_like

    def spy_zeros(*a, **kw):
        t = zeros(*a, **kw)
        shape = tuple(t.shape)  # the buffer's rows may be padded (flash_attention._padded)
        if t.dtype == torch.float32 and shape[:-1] == tuple(bias.shape[:-1]) and shape[-1] >= bias.shape[-1]:
            buffers.append(weakref.ref(t))
        return t

    def spy_empty_like(t, *a, **kw):
        if buffers:  # after the buffer: the allocations of dk and dv
            alive_at_alloc.append(any(r() is not None for r in buffers))
        return empty_like(t, *a, **kw)

    monkeypatch.setattr(torch, "zeros", spy_zeros)
    monkeypatch.setattr(torch, "empty_like", spy_empty_like)
    grads = torch.autograd.grad(out, (q, k, v, bias), torch.randn_like(out))
    monkeypatch.undo()
    assert len(buffers) == 1 and alive_at_alloc == [False, False], (len(buffers), alive_at_alloc)
    assert grads[3].dtype == bias.dtype and grads[3].shape == bias.shape


@pytest.mark.cuda
def test_cuda_backward_peak_holds_one_bias_gradient():
    """The backward frees the float32 bias-gradient buffer (after casting it to the bias's dtype)
    before it allocates dk and dv, so that its peak holds dq, dk, dv, delta and one bias-sized
    gradient; with the float32 buffer alive alongside, the peak was larger by 4 bytes per bias element."""
    B, H, L, D = 8, 4, 256, 32
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g).to(torch.bfloat16).requires_grad_(True)
               for _ in range(3))
    bias = torch.randn(1, H, L, L, device="cuda", generator=g).to(torch.bfloat16).requires_grad_(True)
    do = torch.randn(B, H, L, D, device="cuda", generator=g).to(torch.bfloat16)
    out = attnkit.attention(q, k, v, bias=bias, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(out, (q, k, v, bias), do)
    peak = torch.cuda.max_memory_allocated() - base
    one, nb, delta = q.numel() * 2, bias.numel(), B * H * L * 4  # bytes of dq (= dk = dv), bias elements, delta
    expected = max(one + delta + nb * (4 + 2),  # the cast: dq, delta, the float32 buffer and its copy
                   3 * one + delta + nb * 2)    # dK/dV: dq, dk, dv, delta and the bias's gradient
    assert peak <= expected + 128 * 1024, (peak, expected)
    # the reordering must not change the results: out and every gradient against float64, with
    # plain bfloat16 math as the bar (DESIGN.md's rule)
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v, bias)]
    ref = attnkit.attention(*leaves[:3], bias=leaves[3], backend="reference")
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    plain = [x.detach().requires_grad_(True) for x in (q, k, v, bias)]
    base = naive_attention(*plain[:3], bias=plain[3])
    base_grads = torch.autograd.grad(base, plain, do)
    assert_close_rel(out, ref, rel_err(base, ref))
    for n, a, r, b in zip("q k v bias".split(), grads, ref_grads, base_grads):
        assert_close_rel(a, r, rel_err(b, r), name=f"grad {n}")


@pytest.mark.cuda
def test_cuda_fast_launch_respects_specialisation():
    """ops/_launch.py relaunches a cached compiled kernel when a cheap key matches: calls that
    differ only in what Triton specialises on (16-byte alignment of a pointer, a stride that is
    or is not a multiple of 16, a size of 1) must get their own kernels and stay exact."""
    g = torch.Generator().manual_seed(5)
    base = randn(2, 4, 64, 33, gen=g, device="cuda").to(torch.bfloat16)
    variants = {
        "aligned": lambda t: t[..., :32],                       # row stride 33: not a multiple of 16
        "contiguous": lambda t: t[..., :32].contiguous(),       # stride 32
        "misaligned": lambda t: t[..., 1:33],                   # data pointer 2 bytes past 16
        "one_row": lambda t: t[:1, :, :1, :32],                 # sizes of 1
    }
    before = len(compiled_kernels(fa._fwd_kernel))
    for name, view in variants.items():
        for _ in range(2):  # the second call takes the cached kernel
            q, k, v = view(base), view(base.flip(2)), view(base.roll(3, dims=2))
            out = attnkit.attention(q, k, v, causal=True, backend="triton")
            ref = attnkit.attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
            assert_close_rel(out, ref, rel_err(naive_attention(q, k, v, causal=True), ref), name=name)
    assert len(compiled_kernels(fa._fwd_kernel)) - before >= 3  # distinct specialisations, distinct kernels


@pytest.mark.cuda
def test_cuda_auto_picks_triton_for_small_heads_with_a_bias():
    """auto on CUDA: our kernel for a half-precision bias at head dims <= 64 and at the other head
    dims up to 128 (80, 96: measured ahead of flex or SDPA), flex at 128 and 256; a mask alone or
    float32 stays with the others."""
    for D, ours in ((32, True), (16, True), (64, True), (80, True), (96, True), (128, False), (256, False)):
        q, k, v = make_qkv(4, 8, 8, 300, 300, D, dtype=torch.bfloat16, device="cuda")
        bias = torch.randn(1, 8, 300, 300, device="cuda", dtype=torch.bfloat16)
        for backward in (False, True):
            got = attnkit.explain(q, k, v, bias=bias, for_backward=backward).backend
            assert (got == "triton") == ours, (D, got)
    mask = torch.rand(4, 1, 1, 300, device="cuda") > 0.1
    assert attnkit.explain(q, k, v, mask=mask).backend in ("sdpa", "flex")
    q, k, v = make_qkv(4, 8, 8, 300, 300, 32, dtype=torch.float32, device="cuda")  # IEEE float32 here: not ours
    assert attnkit.explain(q, k, v, bias=torch.randn(1, 8, 300, 300, device="cuda")).backend != "triton"


@pytest.mark.cuda
def test_cuda_auto_picks_triton_where_it_measured_faster_without_a_bias():
    """auto on CUDA in half precision (H100 measurements, docs/benchmarks.md): sinks and softcap up to
    D = 128 (a bias with a softcap too); a mask tensor up to D = 128; a window in training up to D = 64.
    The rest stays with flex / SDPA, and so does float32."""
    def choice(D, backward, dtype=torch.bfloat16, **kw):
        q, k, v = make_qkv(4, 8, 8, 300, 300, D, dtype=dtype, device="cuda")
        return attnkit.explain(q, k, v, for_backward=backward, **kw).backend

    sinks = torch.randn(8, device="cuda", dtype=torch.bfloat16)
    keys = torch.rand(4, 1, 1, 300, device="cuda") > 0.1
    for D in (64, 128):
        for backward in (False, True):
            assert choice(D, backward, sinks=sinks) == "triton", (D, backward)
            assert choice(D, backward, causal=True, sinks=sinks) == "triton", (D, backward)
            assert choice(D, backward, softcap=30.0) == "triton", (D, backward)
            assert choice(D, backward, mask=keys) == "triton", (D, backward)
            assert (choice(D, backward, window=64) == "triton") == (backward and D <= 64), (D, backward)
    for D in (96, 128):
        for backward in (False, True):
            assert choice(D, backward, mask=keys, causal=True) == "triton", (D, backward)
            assert choice(D, backward, mask=keys, window=64) == "triton", (D, backward)
    assert choice(96, True, mask=keys) == "triton"
    full = torch.rand(4, 1, 300, 300, device="cuda") > 0.1  # a query dim: ours up to D = 128 too
    for D in (96, 128):
        assert choice(D, False, mask=full) == "triton" and choice(D, True, mask=full) == "triton", D
    pair = torch.randn(1, 8, 300, 300, device="cuda", dtype=torch.bfloat16)
    assert choice(128, True, bias=pair, causal=True, softcap=30.0) == "triton"
    assert choice(128, True, bias=pair) != "triton"
    assert choice(256, True, mask=keys, causal=True) != "triton"
    assert choice(256, True, mask=keys) != "triton"
    assert choice(256, True, sinks=sinks) != "triton"
    assert choice(64, True, causal=True) == "sdpa"
    assert choice(64, True, dtype=torch.float32, mask=keys) != "triton"
    assert choice(64, True, dtype=torch.float32, sinks=sinks.float()) != "triton"


@pytest.mark.cuda
def test_cuda_auto_takes_wide_causal_chunks():
    """A causal chunk of queries against more keys (Lq < Lk, plain tensors) in inference goes to our kernel
    when it has >= WIDE_CHUNK_ROWS query rows (measured ahead of SDPA's lower-right kernel there), and
    matches float64 as plain math does; fewer rows, gradients, extra features, square or non-causal calls
    and float32 stay where they were."""
    from attnkit.request import WIDE_CHUNK_ROWS

    def qkv(B, Lq, Lk, D=128, Hq=32, Hkv=8, dtype=torch.bfloat16):
        return make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=dtype, device="cuda")

    def choice(*t, **kw):
        return attnkit.explain(*t, **kw).backend

    assert 32 * 512 == WIDE_CHUNK_ROWS
    q, k, v = qkv(1, 512, 1500, D=96)  # Lq and Lk off the tile grid, D not a power of two
    assert choice(q, k, v, causal=True) == "triton"
    with torch.no_grad():
        out = attnkit.attention(q, k, v, causal=True)
    ref = attnkit.attention(q.double(), k.double(), v.double(), causal=True, backend="reference")
    assert_close_rel(out, ref, rel_err(naive_attention(q, k, v, causal=True), ref))
    assert choice(*qkv(2, 300, 4096, D=64), causal=True) == "triton"  # 19200 rows
    assert choice(*qkv(1, 512, 4096, Hkv=32), causal=True) == "triton"  # no GQA: 'causal' alone
    assert choice(*qkv(1, 256, 32768), causal=True) == "sdpa"  # 8192 rows: one program per two SMs
    assert choice(*qkv(64, 16, 4096), causal=True) == "triton"  # 32768 rows, decode-shaped: the decode kernel's
    assert choice(*qkv(1, 512, 512), causal=True) == "sdpa"  # square: cuDNN
    assert choice(*qkv(1, 512, 4096)) == "sdpa"  # not causal
    assert choice(*qkv(1, 512, 4096), causal=True, window=256) != "triton"  # a window: not measured
    assert choice(*qkv(1, 512, 4096, dtype=torch.float32), causal=True) != "triton"
    q.requires_grad_(True)
    assert choice(q, k, v, causal=True) != "triton"  # training: the backward was not measured here


@pytest.mark.cuda
def test_cuda_auto_picks_triton_for_groups():
    case = CUDA_GROUP[1]
    q, k, v = make_qkv(1, 4, 4, case.Lq, case.Lk, 64, dtype=torch.bfloat16, device="cuda")
    kw = case.build({"q": q})
    assert attnkit.explain(q, k, v, mask_mod=kw["mask_mod"]).backend == "triton"


# ---------------------------------------------------------------------------
# MixedAttention's fused form on the triton backend
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("padding", [False, True])
def test_mixed_attention_fused_on_triton(padding, tdevice):
    """One GroupMask call on triton == the sequential form (one reference call per pattern), fwd + bwd."""
    from attnkit import AttentionPattern as P, MixedAttention, MixedAttentionConfig, TokenSpec as T

    specs = [T("sa", 21), T("sq", 13), T("va", 30), T("vq", 17)]
    pats = [P(["sa", "sq"], ["sa"]), P(["va", "vq"], ["va", "sa"])]
    N = 81
    torch.manual_seed(3)
    seq = MixedAttention(MixedAttentionConfig(dim=64, num_heads=2, parallel=False, backend="reference")).to(tdevice)
    fused = MixedAttention(MixedAttentionConfig(dim=64, num_heads=2, parallel=True, backend="triton")).to(tdevice)
    fused.load_state_dict(seq.state_dict())
    fused._fused_pays = lambda lay, x: True  # the CPU default is the per-key/value-set loop
    x = randn(2, N, 64, gen=torch.Generator().manual_seed(4), device=tdevice)
    kpm = (torch.rand(2, N, generator=torch.Generator().manual_seed(5)) > 0.2).to(tdevice) if padding else None
    g = randn(2, N, 64, gen=torch.Generator().manual_seed(6), device=tdevice)
    res = []
    for m in (seq, fused):
        xg = x.clone().requires_grad_(True)
        out, cache = m(xg, specs, pats, key_padding_mask=kpm)
        res.append((out, torch.autograd.grad(out, [xg, *m.parameters()], g), cache))
    assert_close_rel(res[1][0], res[0][0].double(), rtol=2e-5, name="out")
    for i, (a, b) in enumerate(zip(res[1][1], res[0][1])):
        assert_close_rel(a, b.double(), rtol=1e-4, name=f"grad {i}")
    assert set(res[1][2]) == {"sa", "va"}


def test_mixed_attention_fused_with_an_empty_group(tdevice):
    from attnkit import AttentionPattern as P, MixedAttention, MixedAttentionConfig, TokenSpec as T

    specs, pats = [T("a", 10), T("z", 0), T("b", 11)], [P(["a", "b"], ["a"]), P(["z"], ["a"])]
    torch.manual_seed(0)
    fused = MixedAttention(MixedAttentionConfig(dim=32, num_heads=2, backend="triton")).to(tdevice)
    fused._fused_pays = lambda lay, x: True
    seq = MixedAttention(MixedAttentionConfig(dim=32, num_heads=2, parallel=False, backend="reference")).to(tdevice)
    seq.load_state_dict(fused.state_dict())
    x = randn(2, 21, 32, gen=torch.Generator().manual_seed(1), device=tdevice)
    assert_close_rel(fused(x, specs, pats)[0], seq(x, specs, pats)[0].double(), rtol=2e-5)


# From the fourth mutation audit: host-side tables and plans.


def test_edge_flag_sees_segment_starts_off_the_grid(tdevice):
    """A key segment that starts inside a tile (and ends on the grid or at Lk) has an edge tile: the tables
    must say so, or the kernels compile the edge loops out and drop its first, partial tile. Every layout of
    the suite had some segment END off the grid, so a flag reading the ends only (mutant A03) passed."""
    from attnkit import GroupMask, SegmentLayout
    from attnkit.ops import flash_attention as fa

    L = 64
    layout = SegmentLayout(L, L, ((((0, 40),), ((10, L),)), (((40, L),), ((0, 32), (45, L)))))
    bn = fa._config(16, 16, fa._INTERPRET)["fwd"][1]
    assert fa._tables(layout, 32, bn, torch.device(tdevice))["edges"]
    q, k, v = make_qkv(2, 2, 1, L, L, 16, seed=405, device=tdevice)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attnkit.attention(*leaves, backend="triton", mask_mod=GroupMask(layout, tdevice))
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(406)).to(tdevice)
    grads = torch.autograd.grad(out, leaves, g_out)
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    ref = attnkit.attention(*ref_leaves, backend="reference", mask_mod=GroupMask(layout, tdevice))
    ref_grads = torch.autograd.grad(ref, ref_leaves, g_out.double())
    assert_close_rel(out, ref)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close_rel(a, b, rtol=5e-5, name=f"d{name}")


def test_backward_plans_tell_output_gradient_layouts_apart(tdevice, monkeypatch):
    """The backward keeps its launches per key of what they bake in, do's strides among them: steps of one
    shape whose output gradients come in other layouts (contiguous, [B, L, H, D] as attention outputs are
    laid out, transposed) each get their own plan. A key without do's strides (mutant A16) replayed the
    first layout's strides: dq, dk, dv off by O(1), silently."""
    from attnkit.ops import flash_attention as fa

    monkeypatch.setattr(fa, "_PLANS", {})
    B, H, L, D = 1, 2, 24, 16
    q, k, v = make_qkv(B, H, H, L, L, D, seed=407, device=tdevice)
    gen = torch.Generator().manual_seed(408)
    layouts = [torch.randn(B, H, L, D, generator=gen),
               torch.randn(B, L, H, D, generator=gen).transpose(1, 2),
               torch.randn(B, H, D, L, generator=gen).transpose(2, 3)]
    for do in layouts:
        do = do.to(tdevice)
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        grads = torch.autograd.grad(attnkit.attention(*leaves, backend="triton", causal=True), leaves, do)
        ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
        ref = attnkit.attention(*ref_leaves, backend="reference", causal=True)
        for name, a, b in zip("qkv", grads, torch.autograd.grad(ref, ref_leaves, do.double())):
            assert_close_rel(a, b, rtol=5e-5, name=f"d{name}, do strides {tuple(do.stride())}")


def test_group_tables_are_kept_per_block_shape():
    """_tables caches a layout's work lists per (BLOCK_M, BLOCK_N): on a GPU the forward, dQ and dK/dV
    kernels use different tiles (dQ 64 x 32 beside dK/dV 64 x 64 at D = 64 with a shared bias's gradient).
    A cache key without BLOCK_N (mutant A19) handed the dK/dV kernel the key blocks of 32; the interpreter
    runs 32 x 32 tiles everywhere, so only this check sees it on the CPU."""
    from attnkit.ops import flash_attention as fa

    layout = fa.dense_layout(100, 200)
    for bm, bn in [(64, 32), (64, 64), (32, 64), (64, 32)]:
        tab = fa._tables(layout, bm, bn, torch.device("cpu"))
        assert tab["n_qblocks"] == -(-100 // bm) and tab["n_kblocks"] == -(-200 // bn), (bm, bn)
        assert tab["ktab"][:4].tolist() == [0, bn, bn, 2 * bn] and tab["tail"] == (200 % bn != 0)
