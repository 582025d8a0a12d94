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
skips a kernel that cannot take the inputs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import tile_allowed
from ..request import AttentionRequest
from .base import Backend, Capabilities

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # pragma: no cover - torch < 2.3 is below our floor
    SDPBackend = sdpa_kernel = causal_lower_right = None

_FEATURES = frozenset(
    {"mask", "bias", "bias_grad", "causal", "window", "mask_mod", "group_mask", "dropout", "gqa",
     "value_head_dim", "backward", "kv_lengths", "paged"}
)
CUDA_PRIORITY = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


class _CudaPriority:
    """Puts cuDNN first in SDPA's CUDA kernel order for one call, then restores the order.

    torch's own `sdpa_kernel(..., set_priority=True)` does the same but costs
    ~45 us of Python per call; this sets the order with two C calls. torch's
    default order is flash > efficient > math > cuDNN.
    """

    def __init__(self) -> None:
        get = getattr(torch._C, "_get_sdp_priority_order", None)
        self._set = getattr(torch._C, "_set_sdp_priority_order", None)
        self._get = get
        self._order = None
        if get is not None and self._set is not None and SDPBackend is not None:
            want = [int(getattr(SDPBackend, n)) for n in CUDA_PRIORITY if hasattr(SDPBackend, n)]
            self._order = want + [b for b in get() if b not in want]
        self._saved = None

    def __enter__(self):
        if self._order is not None:
            self._saved = self._get()
            self._set(self._order)
        return self

    def __exit__(self, *exc) -> None:
        if self._order is not None:
            self._set(self._saved)


_NULL = contextlib.nullcontext()
_CUDA_PRIORITY = _CudaPriority()


def _kernel_context(device_type: str):
    """Context that orders SDPA's kernels on CUDA (cuDNN first); a no-op elsewhere or when compiling."""
    if device_type != "cuda" or torch.compiler.is_compiling():
        return _NULL
    return _CUDA_PRIORITY


class SdpaBackend(Backend):
    name = "sdpa"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64}),
        features=_FEATURES,
        notes="torch SDPA (cuDNN > flash > efficient > math on CUDA); windows/mask_mod materialise a mask",
    )

    def speed(self, req: AttentionRequest) -> float:
        dense_mask = req.mask is not None or req.bias is not None or req.mask_mod is not None
        dense_mask = dense_mask or req.window is not None or req.cache_seqlens is not None
        if req.device.type == "cuda":
            return 30.0 if dense_mask else 100.0
        return 30.0 if dense_mask else 50.0

    def run(self, req: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        req = req.densified()  # cache_seqlens / block_table -> gathered K/V and a mask
        kw = dict(dropout_p=req.dropout_p, scale=req.scale, enable_gqa=req.heads_q != req.heads_kv)
        explicit = (
            req.mask is not None or req.bias is not None or req.mask_mod is not None
            or req.window is not None
        )
        with _kernel_context(req.device.type):
            if not explicit:
                return self._plain(req, **kw), None
            return self._masked(req, **kw), None

    def _plain(self, req: AttentionRequest, **kw) -> Tensor:
        q, k, v = req.q, req.k, req.v
        Lq, Lk = req.len_q, req.len_k
        if not req.causal:
            return F.scaled_dot_product_attention(q, k, v, **kw)
        if Lq == Lk:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
        if Lq < Lk:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(Lq, Lk), **kw)
        # Lq > Lk: the first Lq - Lk rows see no key at all.
        tail = F.scaled_dot_product_attention(q[:, :, Lq - Lk:], k, v, is_causal=True, **kw)
        head = tail.new_zeros(req.batch, req.heads_q, Lq - Lk, req.head_dim_v)
        return torch.cat([head, tail], dim=2)

    def _masked(self, req: AttentionRequest, **kw) -> Tensor:
        allowed = tile_allowed(req, 0, req.len_q, 0, req.len_k)
        bias = req.bias
        valid = allowed
        if bias is not None:
            finite = bias > float("-inf")
            valid = finite if valid is None else valid & finite
        rows_ok = valid.any(dim=-1, keepdim=True)
        # Unmask dead rows inside the call (no NaN, no NaN gradient); zero them after.
        if allowed is not None:
            allowed = allowed | ~rows_ok
        if bias is not None:
            bias = torch.where(rows_ok, bias, torch.zeros((), dtype=bias.dtype, device=bias.device))
            attn_mask = bias.to(req.dtype)
            if allowed is not None:
                attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
        else:
            attn_mask = allowed
        out = F.scaled_dot_product_attention(req.q, req.k, req.v, attn_mask=attn_mask, **kw)
        return out.masked_fill(~rows_ok, 0.0)
