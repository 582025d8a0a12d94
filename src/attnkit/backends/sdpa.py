"""`sdpa`: torch.nn.functional.scaled_dot_product_attention, translated to the contract.

Translation rules (SDPA's own semantics differ from the contract in three places):
- causal: SDPA's `is_causal` is top-left aligned. Lq == Lk is the same thing;
  Lq < Lk uses torch's lower-right CausalBias; Lq > Lk runs the last Lk query
  rows square-causal and returns zeros for the first Lq - Lk rows (they see no key).
- windows and mask_mod have no SDPA argument: they are materialised as a bool
  [.., Lq, Lk] mask (O(Lq*Lk) memory; `flex` is the fast path for them).
- rows with nothing to attend to would give NaN: they are unmasked inside the
  call and their output is set to 0 afterwards, so gradients stay finite too.
On CUDA the kernel priority is cuDNN > flash > memory-efficient > math; torch
skips a kernel that cannot take the inputs. cuDNN builds an execution graph for every new
shape (~40-50 ms of host time on an H100, torch 2.11): a family of calls (dtype, heads, head
dims, kind) whose shapes keep changing, as a decode loop over a growing cache's lengths or
prompts of every length, puts cuDNN first for at most CUDNN_GRAPHS_PER_FAMILY of them; its
other shapes run flash > efficient > cuDNN > math. See `_cudnn_first`.

return_lse (and `backward_from_stats`, the backward from given statistics) runs SDPA's private
kernels that also return the log-sum-exp, through torch's own aten ops:
- CPU: `_scaled_dot_product_flash_attention_for_cpu` (+ `_backward`): every dtype, GQA, an additive
  float mask (masks, bias, windows, mask_mod, bottom-right causal folded into it as above);
- CUDA: the first of cuDNN > flash (flash first past a family's cuDNN shapes; the memory-efficient
  kernel is left out, `_CUDA_LSE_KERNELS`) that torch's `can_use_*` accepts for the
  call (`_scaled_dot_product_{cudnn,flash}_attention` + `_backward`): no mask, bias,
  window or mask_mod there (those go to flex / triton / chunked); GQA where the kernel takes it.
  A kernel that raises is recorded and the next one is tried (with a warning).
Causal calls are cut into square top-left causal and plain pieces (Lq > Lk: the last Lk rows;
Lq < Lk: the first Lk - Lq keys plain, the rest square causal, merged by lse), so the kernels'
own `is_causal` only ever sees square blocks. lse is natural-log float32 [B, Hq, Lq] (float64 for
float64 on the CPU) whatever layout the kernel keeps (cuDNN [B, H, Lq, 1], efficient padded to a
multiple of 32), -inf on rows that attend nothing; the backward hands the kernels +inf there
(P = exp(S - lse) = 0). A gradient through lse (dlse) is folded into the kernels' delta =
rowsum(dO * O) by two extra value columns (`_with_dlse`). No dropout, no bias gradient and
Dv == D with return_lse.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._autograd import first_order_only
from .._bounded import put
from ..masks import tile_allowed
from ..merge import merge_partial
from ..request import AttentionRequest
from .base import Backend, Capabilities

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # pragma: no cover - torch < 2.3 is below our floor
    SDPBackend = sdpa_kernel = causal_lower_right = None

_FEATURES = frozenset(
    {"mask", "bias", "bias_grad", "causal", "window", "mask_mod", "group_mask", "dropout", "gqa",
     "value_head_dim", "backward", "kv_lengths", "paged", "return_lse"}
)
# What SDPA's lse-returning kernels cannot combine with return_lse, per device (CUDA: no mask tensor).
_LSE_CPU = frozenset({"dropout", "bias_grad", "value_head_dim"})
_LSE_EXCLUSIVE = {
    "cpu": {"return_lse": _LSE_CPU},
    "cuda": {"return_lse": _LSE_CPU | {"mask", "bias", "window", "mask_mod", "group_mask", "kv_lengths", "paged"}},
}
CUDA_PRIORITY = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


# SDPA's kernel order is one setting of the process: calls on several threads take turns setting and
# restoring it, so that none restores an order another one set (which would outlive both calls).
_PRIORITY_LOCK = threading.RLock()


class _CudaPriority:
    """Sets SDPA's CUDA kernel order for one call (`order`: SDPBackend names, first to last; the rest keep
    torch's order after them), then restores the order.

    torch's own `sdpa_kernel(..., set_priority=True)` does the same but costs
    ~45 us of Python per call; this sets the order with two C calls. The call holds `_PRIORITY_LOCK`
    from enter to exit: attnkit's calls on other threads wait (SDPA calls of the user's own on another
    thread meanwhile run under this order, as with torch's `sdpa_kernel`).
    """

    def __init__(self, order: tuple[str, ...]) -> None:
        get = getattr(torch._C, "_get_sdp_priority_order", None)
        self._set = getattr(torch._C, "_set_sdp_priority_order", None)
        self._get = get
        self._order = None
        if get is not None and self._set is not None and SDPBackend is not None:
            want = [int(getattr(SDPBackend, n)) for n in order if hasattr(SDPBackend, n)]
            self._order = want + [b for b in get() if b not in want]
        self._saved: list[list[int]] = []  # a stack: one entry per enter not yet exited (under the lock)

    def __enter__(self):
        if self._order is not None:
            _PRIORITY_LOCK.acquire()
            try:
                saved = self._get()
                self._set(self._order)
            except BaseException:
                _PRIORITY_LOCK.release()
                raise
            self._saved.append(saved)
        return self

    def __exit__(self, *exc) -> None:
        if self._order is not None:
            self._set(self._saved.pop())
            _PRIORITY_LOCK.release()


_NULL = contextlib.nullcontext()
_CUDA_PRIORITY = _CudaPriority(CUDA_PRIORITY)
# cuDNN after flash and efficient, set explicitly (left to torch's order, torch 2.11 ran cuDNN for one-query
# calls on an H100 all the same), but before math: for what neither takes (GQA with a mask, Dv != D) a graph
# costs less than math's [B, Hq, Lq, Lk] scores.
_CUDA_NO_CUDNN = _CudaPriority(("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"))

# cuDNN builds (and torch caches) an execution graph per call shape: q/k/v sizes and strides, dtype,
# causal, mask. A new one took ~40-50 ms of host time on an H100 (torch 2.11.0+cu130, 2026-11-24), against
# ~60-100 us for a one-query decode step: a cache that grows by a token per step paid it on every step
# (docs/benchmarks.md, "A cache that grows every step"). Per family of calls (all but the lengths, batch and strides),
# cuDNN goes first for the first CUDNN_GRAPHS_PER_FAMILY shapes and for those again; the family's other
# shapes run flash > efficient > cuDNN > math, which builds a graph only for what flash and efficient refuse.
# A count, not a cost model: more than 8 shapes that each recur (buckets, several batch sizes) leave the
# later ones off cuDNN; eager calls only (under torch.compile the compiled graph picks its kernel).
CUDNN_GRAPHS_PER_FAMILY = 8
_CUDNN_GRAPHS: dict[tuple, set] = {}  # family -> the shapes cuDNN was put first for (so built)
_MAX_FAMILIES = 1024


def _cudnn_first(q: Tensor, k: Tensor, v: Tensor, kind: tuple) -> bool:
    """Whether a CUDA call on q, k, v (of a `kind`: causal, masked, forward / backward) puts cuDNN first."""
    family = (q.device, q.dtype, q.shape[1], k.shape[1], q.shape[3], v.shape[3], kind)
    shapes = _CUDNN_GRAPHS.get(family)
    if shapes is None:
        shapes = put(_CUDNN_GRAPHS, family, set(), _MAX_FAMILIES)
    shape = (q.shape[0], q.shape[2], k.shape[2], q.stride(), k.stride(), v.stride())
    if shape in shapes:
        return True
    if len(shapes) < CUDNN_GRAPHS_PER_FAMILY:
        shapes.add(shape)
        return True
    return False


def _kernel_context(req: AttentionRequest):
    """Context that orders SDPA's kernels on CUDA (cuDNN first, unless `_cudnn_first` says its graphs churn);
    a no-op elsewhere or when compiling."""
    if req.device.type != "cuda" or torch.compiler.is_compiling():
        return _NULL
    kind = ("plain", _causal_hides(req), _explicit(req), req.needs_grad)
    return _CUDA_PRIORITY if _cudnn_first(req.q, req.k, req.v, kind) else _CUDA_NO_CUDNN


class NoLseKernel(ValueError):
    """No lse-returning SDPA kernel runs a call that `unsupported` let through: one broke since, or the
    user's `sdpa_kernel(...)` context left none enabled. A build error: `auto` goes to the next backend."""


class SdpaBackend(Backend):
    name = "sdpa"
    build_errors = (NoLseKernel,)
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64}),
        features=_FEATURES,
        exclusive_by_device=_LSE_EXCLUSIVE,
        notes="torch SDPA (cuDNN > flash > efficient > math on CUDA); windows/mask_mod materialise a mask; "
              "return_lse through SDPA's lse-returning kernels (CPU: with masks; CUDA: dense/causal only)",
    )

    def unsupported(self, req: AttentionRequest) -> str | None:
        why = super().unsupported(req)
        if why is None and req.return_lse and req.device.type == "cuda":
            why = _cuda_lse_unsupported(req)
        return why

    def speed(self, req: AttentionRequest) -> float:
        dense_mask = req.mask is not None or req.bias is not None or req.mask_mod is not None
        dense_mask = dense_mask or req.window is not None or req.cache_seqlens is not None
        if req.device.type == "cuda":
            return 30.0 if dense_mask else 100.0
        if req.big_built_mask:
            return 15.0  # below chunked (20), whose memory is O(L), not the [Lq, Lk] mask built here
        return 30.0 if dense_mask else 50.0

    def run(self, req: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        req = req.densified()  # cache_seqlens / block_table -> gathered K/V and a mask
        if req.return_lse:
            plan = _lse_plan(req)
            if req.needs_grad:
                return _SdpaLse.apply(plan, req.q, req.k, req.v)
            return plan.forward(req.q, req.k, req.v)
        kw = dict(dropout_p=req.dropout_p, scale=req.scale, enable_gqa=req.heads_q != req.heads_kv)
        if not _explicit(req):
            with _kernel_context(req):
                return self._plain(req, **kw), None
        attn_mask, rows_ok, _ = _dense_mask(req)  # (outside the kernel-order lock: it runs the user's mods)
        with _kernel_context(req):
            out = F.scaled_dot_product_attention(req.q, req.k, req.v, attn_mask=attn_mask, **kw)
        return out.masked_fill(~rows_ok, 0.0), None

    def _plain(self, req: AttentionRequest, **kw) -> Tensor:
        q, k, v = req.q, req.k, req.v
        Lq, Lk = req.len_q, req.len_k
        if not _causal_hides(req):
            return F.scaled_dot_product_attention(q, k, v, **kw)
        if Lq == Lk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        if Lq < Lk:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), **kw)
        # Lq > Lk: the first Lq - Lk rows see no key at all.
        tail = F.scaled_dot_product_attention(q[:, :, Lq - Lk:], k, v, is_causal=True, **kw)
        head = tail.new_zeros(req.batch, req.heads_q, Lq - Lk, req.head_dim_v)
        return torch.cat([head, tail], dim=2)

    def backward_from_stats(self, req, do, out, lse, dlse):
        """The lse-returning kernels' own backward with the given statistics (no forward recomputed).

        A dlse on CUDA goes to the chunked backend's tiled backward instead: the extra value columns
        that fold dlse into the kernels' delta gave wrong dq / dk there (H100, torch 2.11,
        2026-11-23; right on the CPU kernel)."""
        if dlse is not None and req.device.type == "cuda":
            from .chunked import ChunkedBackend
            return ChunkedBackend().backward_from_stats(req, do, out, lse, dlse)
        req = req.densified()
        return _lse_plan(req).backward(do, req.q, req.k, req.v, out, lse, dlse)


def _causal_hides(req: AttentionRequest) -> bool:
    """Whether req's causal rule hides any key. Bottom-right causal with one query (a decode step) hides
    none: SDPA then runs without a mask, as its fastest kernels want, not with a lower-right CausalBias."""
    return req.causal and req.len_q > 1


def _explicit(req: AttentionRequest) -> bool:
    """The call needs an attention mask tensor (mask, bias, window, mask_mod)."""
    return req.mask is not None or req.bias is not None or req.mask_mod is not None or req.window is not None


def _dense_mask(req: AttentionRequest, float_mask: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """(SDPA attn_mask, rows_ok [.., Lq, 1], shift [.., Lq, 1] or None): every pair rule of req as one bool
    (or additive float in req's dtype) mask broadcastable to [B, Hq, Lq, Lk]. Rows with nothing to attend
    are unmasked inside it (no NaN, no NaN gradient): the caller zeroes them after.

    A float32 (or bfloat16) bias with float16 q (1e5, or HF's finfo(float32).min padding) would overflow
    to +-inf in the cast: each row's largest allowed value (`shift`, no gradient) is taken off first, which
    leaves the softmax as it is and the lse short by `shift`. bfloat16 keeps float32's range: a bias is
    cast as it is (with float32's precision lost; values below -3.39e38 become -inf, which masks)."""
    allowed = tile_allowed(req, 0, req.len_q, 0, req.len_k)
    bias = req.bias
    valid = allowed
    if bias is not None:
        finite = bias > float("-inf")
        valid = finite if valid is None else valid & finite
    rows_ok = valid.any(dim=-1, keepdim=True)
    if allowed is not None:
        allowed = allowed | ~rows_ok
    if bias is None and not float_mask:
        return allowed, rows_ok, None
    shift = None
    if bias is not None:
        bias = torch.where(rows_ok, bias, torch.zeros((), dtype=bias.dtype, device=bias.device))
        # float16 only (max 65504): bfloat16 keeps float32's range (only finfo(float32).min-like values
        # round to -inf, which then masks), and the shift's passes over the bias doubled a CPU call
        if req.dtype == torch.float16 and torch.finfo(bias.dtype).max > torch.finfo(req.dtype).max:
            top = bias.detach() if allowed is None else bias.detach().masked_fill(~allowed, float("-inf"))
            top = top.amax(dim=-1, keepdim=True)
            shift = torch.where(top.isfinite(), top, torch.zeros((), dtype=top.dtype, device=top.device))
            bias = bias - shift
        attn_mask = bias.to(req.dtype)
    else:
        attn_mask = torch.zeros(allowed.shape, dtype=req.dtype, device=req.device)
    if allowed is not None:
        attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
    return attn_mask, rows_ok, shift


# --------------------------------------------------------------------------- return_lse
_ATEN = torch.ops.aten
CUDNN, FLASH, EFFICIENT = "cudnn", "flash", "efficient"
# The order `_CudaPriority` gives SDPA. The memory-efficient kernel is left out: on an H100
# (torch 2.11, 2026-11-23) its lse path hit an illegal memory access on a causal Lq < Lk piece.
_CUDA_LSE_KERNELS = (CUDNN, FLASH)
_BROKEN: set[tuple[str, str]] = set()  # (kernel, "forward" | "backward") that raised in this process
_PROBES: dict[tuple, tuple[str, ...]] = {}


def _can_use(kernel: str):
    cuda = torch.backends.cuda
    return {CUDNN: cuda.can_use_cudnn_attention, FLASH: cuda.can_use_flash_attention,
            EFFICIENT: cuda.can_use_efficient_attention}[kernel]


def lse_kernels(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, direction: str = "forward") -> tuple[str, ...]:
    """The lse-returning SDPA kernels that can run this (unmasked) call, in the order they are tried.

    "cpu" on the CPU; on CUDA the names of cuDNN / flash (`_CUDA_LSE_KERNELS`) that torch's `can_use_*`
    accepts for a training call on these shapes (the user's `sdpa_kernel` settings included),
    minus those that raised here before.
    """
    if q.device.type != "cuda":
        return ("cpu",)
    sdpa_params = getattr(torch.backends.cuda, "SDPAParams", None)
    if sdpa_params is None:  # pragma: no cover - torch < 2.3 is below our floor
        return ()
    gqa = q.shape[1] != k.shape[1]
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))  # ask for kernels that train
    params = sdpa_params(q, k, v, None, 0.0, causal, gqa)
    return tuple(n for n in _CUDA_LSE_KERNELS if (n, direction) not in _BROKEN and _can_use(n)(params))


def _cuda_lse_unsupported(req: AttentionRequest) -> str | None:
    """Why no lse-returning SDPA kernel takes req's dtype / head dim / GQA on this GPU, or None.

    Probed once per (device, dtype, head dim, GQA) on tiny tensors: the dispatcher caches its
    choice per signature, and these are the signature's parts the kernels' rules depend on.
    """
    if req.needs_grad and not req.for_backward:
        # a differentiable lse needs the dlse path, wrong on CUDA (see backward_from_stats); the
        # no-grad forward (what ring attention's steps run) and attention_backward stay on SDPA
        return "missing feature 'return_lse' with gradients on cuda (the lse kernels' dlse path is not exact there)"
    gqa = "gqa" in req.features()
    cuda = torch.backends.cuda  # the user's sdpa_kernel(...) settings decide which kernels can_use_* takes
    enabled = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled())
    key = (str(req.device), req.dtype, req.head_dim, gqa, enabled)
    if key not in _PROBES:
        z = [torch.zeros(1, h, 128, req.head_dim, dtype=req.dtype, device=req.device) for h in (2 if gqa else 1, 1, 1)]
        _PROBES[key] = lse_kernels(*z)
    if _PROBES[key]:
        return None
    dt = str(req.dtype).replace("torch.", "")
    return (f"missing feature 'return_lse' on cuda for {dt}, head dim {req.head_dim}{' with GQA' if gqa else ''}: "
            "no lse-returning SDPA kernel (cuDNN / flash) takes it")


@dataclass(frozen=True)
class _Piece:
    """One kernel call: query rows [q0, q1) against keys [k0, k1), square top-left causal or plain."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool


@dataclass(frozen=True)
class _LsePlan:
    """How one return_lse call runs: pieces, and (CPU) the additive mask with its dead rows."""

    pieces: tuple[_Piece, ...]
    scale: float
    mask: Tensor | None = None  # additive float [.., Lq, Lk] in q's dtype, dead rows unmasked
    dead: Tensor | None = None  # bool [.., Lq]: rows with nothing to attend (with a mask)
    shift: Tensor | None = None  # [B, Hq, Lq]: what `_dense_mask` took off the mask's rows (the lse adds it back)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] float32, float64 for float64)."""
        B, H, Lq = q.shape[:3]
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        whole = _Piece(0, Lq, 0, k.shape[2], self.pieces[0].causal)
        if self.pieces == (whole,):
            out, lse = _kernel_forward(q, k, v, self.mask, whole.causal, self.scale)
            lse = lse.to(ct)
        else:  # merged in float32 by lse; rows no piece covers stay 0 / -inf
            out = torch.zeros(B, H, Lq, v.shape[3], dtype=ct, device=q.device)
            lse = torch.full((B, H, Lq), float("-inf"), dtype=ct, device=q.device)
            for p in self.pieces:
                o, l_ = _kernel_forward(q[:, :, p.q0:p.q1], k[:, :, p.k0:p.k1], v[:, :, p.k0:p.k1], None, p.causal,
                                        self.scale)
                merge_partial(out[:, :, p.q0:p.q1], lse[:, :, p.q0:p.q1], o, l_)
            out = out.to(q.dtype)
        if self.shift is not None:
            lse = lse + self.shift.to(lse.dtype)
        if self.dead is not None:
            out = out.masked_fill(self.dead.unsqueeze(-1), 0.0)
            lse = lse.masked_fill(self.dead, float("-inf"))
        return out, lse

    def backward(self, do, q, k, v, out, lse, dlse) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) in q's dtype from the given out / lse [B, Hq, Lq] (and dlse)."""
        D, Dv = q.shape[3], v.shape[3]
        do, out = do.to(q.dtype), out.to(q.dtype)
        if self.shift is not None:  # the kernels see the shifted mask
            lse = lse - self.shift.to(lse.dtype)
        lse_k = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)  # P = 0 there
        if self.dead is not None:
            lse_k = lse_k.masked_fill(self.dead, float("inf"))
        if dlse is not None:
            if q.is_cuda:  # unreachable through dispatch (see _cuda_lse_unsupported): never return wrong grads
                raise RuntimeError("sdpa: a gradient through lse is not supported on CUDA (its dlse fold is wrong there)")
            q, k, v, do, out = _with_dlse(q, k, v, do, out, dlse)
        Lq, Lk = q.shape[2], k.shape[2]
        if len(self.pieces) == 1 and self.pieces[0] == _Piece(0, Lq, 0, Lk, self.pieces[0].causal):
            dq, dk, dv = _kernel_backward(do, q, k, v, out, lse_k, self.mask, self.pieces[0].causal, self.scale)
        else:
            dq = torch.zeros(q.shape, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype, device=q.device)
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
            for p in self.pieces:
                r = slice(p.q0, p.q1)
                gq, gk, gv = _kernel_backward(do[:, :, r], q[:, :, r], k[:, :, p.k0:p.k1], v[:, :, p.k0:p.k1],
                                              out[:, :, r], lse_k[:, :, r], None, p.causal, self.scale)
                dq[:, :, r] += gq
                dk[:, :, p.k0:p.k1] = gk  # pieces never share keys
                dv[:, :, p.k0:p.k1] = gv
            dq = dq.to(q.dtype)
        return dq[..., :D], dk[..., :D], dv[..., :Dv]


def _lse_plan(req: AttentionRequest) -> _LsePlan:
    Lq, Lk = req.len_q, req.len_k
    if _explicit(req):
        mask, rows_ok, shift = _dense_mask(req, float_mask=True)
        dead = None if bool(rows_ok.all()) else ~rows_ok.squeeze(-1)
        if shift is not None:
            shift = shift.squeeze(-1).expand(req.batch, req.heads_q, Lq)
        return _LsePlan((_Piece(0, Lq, 0, Lk, False),), req.scale, mask, dead, shift)
    if not _causal_hides(req) or Lq == Lk:
        pieces = (_Piece(0, Lq, 0, Lk, _causal_hides(req)),)
    elif Lq > Lk:  # the first Lq - Lk rows see no key
        pieces = (_Piece(Lq - Lk, Lq, 0, Lk, True),)
    else:  # every query sees the first Lk - Lq keys; the last Lq keys are a square causal block
        pieces = (_Piece(0, Lq, 0, Lk - Lq, False), _Piece(0, Lq, Lk - Lq, Lk, True))
    return _LsePlan(pieces, req.scale)


class _SdpaLse(torch.autograd.Function):
    """(out, lse) of an lse-returning SDPA plan; its backward is the plan's, with dlse."""

    @staticmethod
    def forward(ctx, plan: _LsePlan, q, k, v):
        out, lse = plan.forward(q, k, v)
        ctx.set_materialize_grads(False)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    @first_order_only("sdpa with return_lse")
    def backward(ctx, do, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if do is None:  # only lse was used
            do = torch.zeros_like(out)
        dq, dk, dv = ctx.plan.backward(do, q, k, v, out, lse, dlse)
        return None, dq, dk, dv


def _with_dlse(q, k, v, do, out, dlse):
    """Inputs whose kernel backward computes delta = rowsum(do * out) - dlse (kernels take no dlse).

    Two extra value columns (then zeros up to a multiple of 8, the kernels' alignment): v gets 0
    there, out gets -dlse split in two parts of q's dtype (hi + lo: dlse to ~16 bits in bfloat16),
    do gets 1, so rowsum(do' * out') = rowsum(do * out) - dlse while do' v'^T = do v^T; q and k get
    zeros (SDPA kernels want one head dim; the scale is passed explicitly). The extra columns of the
    gradients are dropped by the caller.
    """
    D = q.shape[3]
    pad = (D + 2 + 7) // 8 * 8 - D
    hi = dlse.to(q.dtype)
    lo = (dlse - hi.to(dlse.dtype)).to(q.dtype)
    rest = pad - 2
    out = torch.cat([out, -hi.unsqueeze(-1), -lo.unsqueeze(-1), out.new_zeros(*out.shape[:3], rest)], dim=-1)
    do = torch.cat([do, do.new_ones(*do.shape[:3], 2), do.new_zeros(*do.shape[:3], rest)], dim=-1)
    q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    return q, k, v, do, out


def _pad8(t: Tensor) -> Tensor:
    """t with its last dim zero-padded to a multiple of 8 (flash's alignment; as torch's SDPA does)."""
    pad = -t.shape[-1] % 8
    return F.pad(t, (0, pad)) if pad else t


def _unit_last(*ts: Tensor) -> tuple[Tensor, ...]:
    """Each tensor with a unit stride in its last dim (a copy where not): the private kernels below
    read rows as contiguous, unlike the public SDPA, which copies such inputs itself."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


def _lse_out(raw: Tensor, B: int, H: int, Lq: int) -> Tensor:
    """A kernel's lse ([B, H, Lq], cuDNN's [B, H, Lq, 1], efficient's [B, H, 32k]) as [B, H, Lq]; -inf where dead."""
    lse = raw.reshape(B, H, -1)[:, :, :Lq]
    return torch.where(lse == float("inf"), torch.full_like(lse, float("-inf")), lse)  # flash: +inf on dead rows


def _try_kernels(q, k, v, causal: bool, direction: str, run):
    """run(kernel) on the first kernel of `lse_kernels` that does not raise (a raising one is skipped from now on);
    cuDNN last where `_cudnn_first` says no."""
    kernels = lse_kernels(q, k, v, causal, direction)
    lse_kind = ("lse", causal, direction)
    if kernels[:1] == (CUDNN,) and not torch.compiler.is_compiling() and not _cudnn_first(q, k, v, lse_kind):
        kernels = kernels[1:] + kernels[:1]
    err = None
    for name in kernels:
        try:
            return run(name)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:
            if name == "cpu":
                raise
            _BROKEN.add((name, direction))
            warnings.warn(f"attnkit sdpa: the {name} kernel's {direction} with log-sum-exp raised ({exc}); "
                          "trying the next SDPA kernel from now on", RuntimeWarning, stacklevel=3)
            err = exc
    raise NoLseKernel(
        f"backend 'sdpa' cannot run this return_lse call's {direction}: no lse-returning SDPA kernel "
        f"(cuDNN / flash) takes q {list(q.shape)} k {list(k.shape)} {q.dtype} on {q.device} "
        f"(tried {list(kernels)}; last error: {err}); pass backend='flex' or 'chunked'"
    )


def _kernel_forward(q, k, v, mask, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse [B, H, Lq] natural log, -inf on dead rows) of one unpieced kernel call."""
    B, H, Lq = q.shape[:3]
    q, k, v = _unit_last(q, k, v)

    def run(kernel: str):
        if kernel == "cpu":
            return _ATEN._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        if kernel == CUDNN:
            return _ATEN._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)[:2]
        if kernel == FLASH:
            res = _ATEN._scaled_dot_product_flash_attention(_pad8(q), _pad8(k), _pad8(v), 0.0, causal, False,
                                                            scale=scale)
            return res[0][..., :v.shape[3]], res[1]
        return _ATEN._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)[:2]

    out, raw = _try_kernels(q, k, v, causal, "forward", run)
    return out, _lse_out(raw, B, H, Lq)


def _kernel_backward(do, q, k, v, out, lse, mask, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one unpieced kernel call from out and lse ([B, H, Lq], +inf on dead rows)."""
    Lq, Lk = q.shape[2], k.shape[2]
    lse = lse.contiguous()
    do, q, k, v, out = _unit_last(do, q, k, v, out)
    no_rng = torch.zeros((), dtype=torch.int64, device=q.device)  # dropout 0: the kernels read no seed

    def run(kernel: str):
        if kernel == "cpu":
            return _ATEN._scaled_dot_product_flash_attention_for_cpu_backward(
                do, q, k, v, out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32),
                0.0, causal, attn_mask=mask, scale=scale)
        if kernel == CUDNN:
            t = [x.contiguous() for x in (do, q, k, v, out)]
            return _ATEN._scaled_dot_product_cudnn_attention_backward(
                *t, lse.float().unsqueeze(-1), no_rng, no_rng, None, None, None, Lq, Lk, 0.0, causal, scale=scale)
        if kernel == FLASH:
            D = v.shape[3]
            g = _ATEN._scaled_dot_product_flash_attention_backward(
                _pad8(do), _pad8(q), _pad8(k), _pad8(v), _pad8(out), lse.float(), None, None, Lq, Lk, 0.0, causal,
                no_rng, no_rng, scale=scale)
            return g[0][..., :q.shape[3]], g[1][..., :k.shape[3]], g[2][..., :D]
        lse_p = F.pad(lse.float(), (0, -Lq % 32))  # efficient keeps lse padded to a multiple of 32 rows
        return _ATEN._scaled_dot_product_efficient_attention_backward(
            do, q, k, v, None, out, lse_p, no_rng, no_rng, 0.0, [True, True, True, False], causal, scale=scale)[:3]

    return _try_kernels(q, k, v, causal, "backward", run)
