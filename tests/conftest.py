"""Shared helpers of the attnkit test suite.

- random inputs (fresh ``randn``, never zeros) from a seeded generator;
- a float64 oracle: ``attnkit.attention(..., backend="reference")`` on float64
  copies of every input (bias, sinks and the tensors a mod closes over too);
- a naive attention in the test dtype (logits, softmax and ``@ v`` all in that
  dtype, differentiable): the "plain low-precision math" of the DESIGN's
  correctness rule;
- ``assert_close_rel``: the tolerance rule itself;
- ``check_against_oracle``: forward + backward of one backend vs the oracle;
- the ``device`` fixture: "cpu" always, "cuda" marked ``cuda`` and skipped
  without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import attnkit
from attnkit.request import build_request

# ---------------------------------------------------------------------------
# devices
# ---------------------------------------------------------------------------

HAS_CUDA = torch.cuda.is_available()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# ---------------------------------------------------------------------------
# tolerance rule
# ---------------------------------------------------------------------------

LOWP = (torch.float16, torch.bfloat16)
FWD_RTOL_FP32 = 2e-5
GRAD_RTOL_FP32 = 5e-5
LOWP_FACTOR = 3.0
LOWP_FLOOR = 1e-4
# A reference whose RMS is below this is mathematically zero (e.g. dq when Lk == 1):
# the backend's value must then be zero up to float32 accumulation noise.
DEGENERATE_RMS = 1e-9
DEGENERATE_ATOL_RMS = 1e-5


def _rms(t: torch.Tensor) -> float:
    return (t.double().norm() / math.sqrt(max(t.numel(), 1))).item()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (absolute RMS when ref is degenerate zero)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    num = (out64 - ref64).norm().item()
    den = ref64.norm().item()
    if den == 0.0 or _rms(ref64) < DEGENERATE_RMS:
        return num / math.sqrt(max(ref64.numel(), 1))
    return num / den


def assert_close_rel(
    out: torch.Tensor,
    ref64: torch.Tensor,
    lowp_baseline_err: float | None = None,
    *,
    rtol: float = FWD_RTOL_FP32,
    name: str = "out",
    fp32_baseline_err: float | None = None,
) -> None:
    """The DESIGN's correctness rule for one tensor.

    float32 (``lowp_baseline_err is None``): ``||out - ref|| / ||ref|| <= rtol``.
    If ``fp32_baseline_err`` (plain float32 math vs the same reference) is given,
    the bound is ``max(rtol, 3 x fp32_baseline_err)``: only ill-conditioned calls
    (e.g. a saturated softcap, whose tanh' = 1 - tanh^2 cancels in float32) are
    allowed more than rtol, and only as much as plain float32 math needs.
    float16/bfloat16: the error must be <= 3x the error of the plain
    low-precision math baseline (vs the same float64 reference) + 1e-4.
    A mathematically-zero reference (RMS < 1e-9) needs an RMS below 1e-5, or below 3x the RMS of plain
    float32 math (``fp32_baseline_err``, then an RMS itself) where that is larger: a gradient that is 0
    by cancellation of large terms.
    Non-finite values where the reference is finite always fail.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    o, r = out.detach().double().cpu(), ref64.detach().double().cpu()
    bad = ~torch.isfinite(o) & torch.isfinite(r)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the reference is finite"
    if _rms(r) < DEGENERATE_RMS:
        err = rel_err(o, r)
        bound = max(DEGENERATE_ATOL_RMS, LOWP_FACTOR * (fp32_baseline_err or 0.0))
        assert err <= bound, f"{name}: reference is ~0 but RMS(out) = {err:.3e} > {bound:.3e}"
        return
    err = rel_err(o, r)
    if lowp_baseline_err is None:
        bound = rtol
        what = f"rtol {rtol:g}"
        if fp32_baseline_err is not None and LOWP_FACTOR * fp32_baseline_err > rtol:
            bound = LOWP_FACTOR * fp32_baseline_err
            what = f"ill-conditioned: 3 x plain float32 error {fp32_baseline_err:.3e}"
    else:
        bound = LOWP_FACTOR * lowp_baseline_err + LOWP_FLOOR
        what = f"3 x baseline {lowp_baseline_err:.3e} + {LOWP_FLOOR:g}"
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.3e} ({what})"


def assert_lse_close(lse: torch.Tensor, ref64: torch.Tensor, lowp_baseline_err: float | None = None,
                     *, rtol: float = FWD_RTOL_FP32, name: str = "lse",
                     fp32_baseline_err: float | None = None) -> None:
    """-inf positions must match exactly; finite ones follow assert_close_rel."""
    l, r = lse.detach().double().cpu(), ref64.detach().double().cpu()
    assert l.shape == r.shape, f"{name}: shape {tuple(l.shape)} != {tuple(r.shape)}"
    assert not torch.isnan(l).any(), f"{name}: NaN in lse"
    assert torch.equal(torch.isneginf(l), torch.isneginf(r)), (
        f"{name}: -inf positions differ: backend {torch.isneginf(l).nonzero().tolist()[:8]} "
        f"vs reference {torch.isneginf(r).nonzero().tolist()[:8]}"
    )
    assert not torch.isposinf(l).any(), f"{name}: +inf in lse"
    fin = torch.isfinite(r)
    if fin.any():
        assert_close_rel(l[fin], r[fin], lowp_baseline_err, rtol=rtol, name=name,
                         fp32_baseline_err=fp32_baseline_err)


# ---------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------


def randn(*shape, dtype=torch.float32, device="cpu", gen: torch.Generator | None = None, std=1.0):
    """Fresh standard-normal values, generated in float32 on the CPU (reproducible), then moved."""
    t = torch.randn(*shape, generator=gen, dtype=torch.float32) * std
    return t.to(device=device, dtype=dtype)


def make_qkv(B, Hq, Hkv, Lq, Lk, D, Dv=None, *, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    q = randn(B, Hq, Lq, D, dtype=dtype, device=device, gen=g)
    k = randn(B, Hkv, Lk, D, dtype=dtype, device=device, gen=g)
    v = randn(B, Hkv, Lk, Dv, dtype=dtype, device=device, gen=g)
    return q, k, v


# ---------------------------------------------------------------------------
# naive low-precision attention (the DESIGN's "plain PyTorch math")
# ---------------------------------------------------------------------------


def _grids(B, H, Lq, Lk, device):
    b = torch.arange(B, device=device, dtype=torch.int32).view(-1, 1, 1, 1)
    h = torch.arange(H, device=device, dtype=torch.int32).view(1, -1, 1, 1)
    i = torch.arange(Lq, device=device, dtype=torch.int32).view(1, 1, -1, 1)
    j = torch.arange(Lk, device=device, dtype=torch.int32).view(1, 1, 1, -1)
    return b, h, i, j


def allowed_pairs(B, H, Lq, Lk, *, mask=None, causal=False, window=None, mask_mod=None, device="cpu"):
    """[B, H, Lq, Lk] bool of attended pairs, from the contract's text (index arithmetic)."""
    b, h, i, j = _grids(B, H, Lq, Lk, device)
    off = Lk - Lq
    keep = torch.ones(B, H, Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        keep = keep & (j <= i + off)
    if window is not None:
        if isinstance(window, int):
            keep = keep & (j > i + off - window) & (j <= i + off)
        else:
            left, right = window
            if left is not None and left != -1:
                keep = keep & (j >= i + off - left)
            if right is not None and right != -1:
                keep = keep & (j <= i + off + right)
    if mask is not None:
        keep = keep & mask.to(device)
    if mask_mod is not None:
        keep = keep & mask_mod(b, h, i, j)
    return keep


def naive_attention(q, k, v, *, mask=None, bias=None, causal=False, window=None, scale=None,
                    softcap=None, score_mod=None, mask_mod=None, sinks=None, return_lse=False):
    """Attention written plainly in q's dtype (no upcast). Differentiable; safe on empty rows."""
    dt = q.dtype
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    kk = k.repeat_interleave(g, dim=1)
    vv = v.repeat_interleave(g, dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ kk.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(dt)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if score_mod is not None:
        b, h, i, j = _grids(B, Hq, Lq, Lk, q.device)
        s = score_mod(s, b, h, i, j).to(dt).expand(B, Hq, Lq, Lk)
    keep = allowed_pairs(B, Hq, Lq, Lk, mask=mask, causal=causal, window=window,
                         mask_mod=mask_mod, device=q.device)
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(dt).view(1, Hq, 1, 1).expand(B, Hq, Lq, 1)], dim=-1)
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(den == 0, torch.ones_like(den), den)
    out = p[..., :Lk] @ vv
    if return_lse:
        lse = (torch.log(den) + m).squeeze(-1)
        return out, lse if dt == torch.float64 else lse.float()
    return out


# ---------------------------------------------------------------------------
# cases: a shape + a feature set, rebuilt per dtype/device
# ---------------------------------------------------------------------------


@dataclass
class Case:
    """One attention call. ``extras(B, Hq, Lq, Lk, gen)`` returns the extra tensors
    (float32 CPU; floats get gradients) and ``build(tensors)`` turns the tensor dict
    (q, k, v and the extras) into attention() keyword arguments, so that the oracle
    can rebuild the same call (mods included) on float64 copies."""

    name: str
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    Lq: int = 33
    Lk: int = 33
    D: int = 24
    Dv: int | None = None
    kw: dict = field(default_factory=dict)  # plain options (causal, window, softcap, scale, return_lse)
    extras: Callable | None = None
    build: Callable | None = None
    no_grad: tuple = ()  # extra float tensors that must not get a gradient
    seed: int = 0

    def __str__(self) -> str:
        return self.name

    def replace(self, **kw) -> "Case":
        d = dict(self.__dict__)
        d.update(kw)
        return Case(**d)


def case_tensors(case: Case, dtype, device) -> dict[str, torch.Tensor]:
    q, k, v = make_qkv(case.B, case.Hq, case.Hkv, case.Lq, case.Lk, case.D, case.Dv,
                       dtype=dtype, device=device, seed=case.seed)
    t = {"q": q, "k": k, "v": v}
    if case.extras is not None:
        g = torch.Generator().manual_seed(case.seed + 1000)
        for n, x in case.extras(case.B, case.Hq, case.Lq, case.Lk, g).items():
            t[n] = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    return t


def case_kwargs(case: Case, t: dict) -> dict:
    kw = dict(case.kw)
    if case.build is not None:
        kw.update(case.build(t))
    return kw


def default_build(t: dict) -> dict:
    """bias / mask / sinks tensors pass straight through as keyword arguments."""
    return {n: t[n] for n in ("bias", "mask", "sinks") if n in t}


def grad_names(case: Case, t: dict) -> list[str]:
    return [n for n, x in t.items() if x.is_floating_point() and n not in case.no_grad]


# ---------------------------------------------------------------------------
# running one backend against the oracle
# ---------------------------------------------------------------------------


def _clone_inputs(t: dict, names_grad, dtype=None) -> dict:
    out = {}
    for n, x in t.items():
        y = x.detach().clone()
        if dtype is not None and y.is_floating_point():
            y = y.to(dtype)
        if n in names_grad:
            y.requires_grad_(True)
        out[n] = y
    return out


def _loss(out, lse, g_out, g_lse):
    loss = (out * g_out.to(out.dtype)).sum().float()
    if lse is not None and g_lse is not None:
        finite = torch.isfinite(lse)
        loss = loss + (torch.where(finite, lse, torch.zeros_like(lse)) * g_lse.to(lse.dtype)).sum().float()
    return loss


@dataclass
class RunResult:
    out: torch.Tensor
    lse: torch.Tensor | None
    grads: dict


def run_call(fn, t: dict, case: Case, names_grad, g_out, g_lse, *, backward=True) -> RunResult:
    """fn(q, k, v, **kw) -> out or (out, lse); loss = <out, g_out> (+ <lse, g_lse>)."""
    kw = case_kwargs(case, t)
    res = fn(t["q"], t["k"], t["v"], **kw)
    out, lse = res if isinstance(res, tuple) else (res, None)
    grads = {}
    if backward:
        loss = _loss(out, lse, g_out, g_lse)
        wrt = [t[n] for n in names_grad]
        gs = torch.autograd.grad(loss, wrt, allow_unused=True)
        grads = {n: gg for n, gg in zip(names_grad, gs)}
    return RunResult(out.detach(), None if lse is None else lse.detach(), grads)


def attention_fn(backend):
    """A callable (q, k, v, **kw) for a backend name or a Backend instance (run directly)."""
    if isinstance(backend, str):
        return lambda q, k, v, **kw: attnkit.attention(q, k, v, backend=backend, **kw)

    def fn(q, k, v, **kw):
        req = build_request(q, k, v, **kw)
        why = backend.unsupported(req)
        assert why is None, why
        out, lse = backend.run(req)
        return (out, lse) if kw.get("return_lse") else out

    return fn


def oracle_fn(q, k, v, **kw):
    return attnkit.attention(q, k, v, backend="reference", **kw)


def check_against_oracle(fn, case: Case, dtype, device, *, backward=True, names_grad=None,
                         fwd_rtol=FWD_RTOL_FP32, grad_rtol=GRAD_RTOL_FP32) -> RunResult:
    """Run fn on the case, compare out (+lse) and all gradients with the float64 oracle."""
    t = case_tensors(case, dtype, device)
    if names_grad is None:
        names_grad = grad_names(case, t) if backward else []
    gg = torch.Generator().manual_seed(case.seed + 2000)
    Dv = case.D if case.Dv is None else case.Dv
    g_out = randn(case.B, case.Hq, case.Lq, Dv, dtype=dtype, device=device, gen=gg)
    want_lse = case.kw.get("return_lse", False)
    g_lse = randn(case.B, case.Hq, case.Lq, device=device, gen=gg) if want_lse else None

    ctx = torch.enable_grad() if backward else torch.no_grad()
    with ctx:
        res = run_call(fn, _clone_inputs(t, names_grad), case, names_grad, g_out, g_lse, backward=backward)
        ref = run_call(oracle_fn, _clone_inputs(t, names_grad, torch.float64), case, names_grad,
                       g_out.double(), None if g_lse is None else g_lse.double(), backward=backward)
        # plain math in the test dtype: the low-precision bar, and the float32 conditioning check
        base = None
        if dtype != torch.float64:
            base = run_call(naive_attention, _clone_inputs(t, names_grad), case, names_grad, g_out, g_lse,
                            backward=backward)
    lowp = dtype in LOWP

    def errs(b, r):
        """(lowp_baseline_err, fp32_baseline_err) for assert_close_rel."""
        if base is None:
            return None, None
        e = rel_err(b, r)
        return (e, None) if lowp else (None, e)

    assert res.out.dtype == dtype, f"output dtype {res.out.dtype} != input dtype {dtype}"
    assert res.out.device.type == torch.device(device).type
    lo, f32 = errs(base.out, ref.out) if base is not None else (None, None)
    assert_close_rel(res.out, ref.out, lo, rtol=fwd_rtol, name="out", fp32_baseline_err=f32)
    if want_lse:
        assert res.lse is not None, "return_lse=True returned no lse"
        want_dt = torch.float64 if dtype == torch.float64 else torch.float32
        assert res.lse.dtype == want_dt, f"lse dtype {res.lse.dtype} != {want_dt}"
        assert res.lse.shape == (case.B, case.Hq, case.Lq)
        lo = f32 = None
        if base is not None:
            fin = torch.isfinite(ref.lse)
            lo, f32 = errs(base.lse[fin], ref.lse[fin]) if fin.any() else (0.0 if lowp else None, None)
        assert_lse_close(res.lse, ref.lse, lo, rtol=fwd_rtol, fp32_baseline_err=f32)
    # rows with nothing to attend: exactly 0 out and exactly 0 gradient for q, whatever the backend
    kw = case_kwargs(case, t)
    keep = allowed_pairs(case.B, case.Hq, case.Lq, case.Lk, mask=kw.get("mask"), causal=kw.get("causal", False),
                         window=kw.get("window"), mask_mod=kw.get("mask_mod"), device=device)
    dead = ~keep.any(-1)
    if dead.any():
        assert torch.all(res.out[dead] == 0), "a row with nothing to attend must output exactly 0"
        if "q" in res.grads:
            assert torch.all(res.grads["q"][dead] == 0), "a row with nothing to attend must get zero dq"
    for n in names_grad:
        g, r = res.grads[n], ref.grads[n]
        assert r is not None, f"oracle has no gradient for {n}"
        assert g is not None, f"no gradient reached {n}"
        assert g.shape == t[n].shape, f"grad of {n} has shape {tuple(g.shape)}, input {tuple(t[n].shape)}"
        lo, f32 = errs(base.grads[n], r) if base is not None else (None, None)
        assert_close_rel(g, r, lo, rtol=grad_rtol, name=f"grad {n}", fp32_baseline_err=f32)
    return res


def expect_refusal(backend_name: str, t: dict, kw: dict, expected_words) -> None:
    """Forcing a backend that cannot serve must raise ValueError naming what is missing."""
    with pytest.raises(ValueError) as ei:
        attnkit.attention(t["q"], t["k"], t["v"], backend=backend_name, **kw)
    msg = str(ei.value)
    assert backend_name in msg, msg
    for w in expected_words:
        assert w in msg, f"{w!r} not named in: {msg}"


# ---------------------------------------------------------------------------
# the module tests' bound: a fixed relative tolerance (float64 oracles)
# ---------------------------------------------------------------------------


def rel_norm(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; ||out - ref|| when ref is exactly 0."""
    o, r = out.detach().double(), ref.detach().double()
    den = r.norm().item()
    num = (o - r).norm().item()
    return num if den == 0.0 else num / den


def assert_close_tol(out: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "out") -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    if ref.detach().double().norm().item() < 1e-9:
        # mathematically zero (e.g. the gradient of a bias that a softmax is invariant to):
        # only rounding noise is allowed, scaled like the bound
        worst = out.detach().double().abs().max().item()
        assert worst <= 10 * tol, f"{name}: reference is 0 but max |out| = {worst:.3e}"
        return
    err = rel_norm(out, ref)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"
