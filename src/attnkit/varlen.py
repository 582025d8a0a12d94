"""Packed variable-length attention (flash-attn's `flash_attn_varlen_func` layout) on the contract.

Sequences of different lengths are packed along one token axis and delimited by
cumulative lengths: sequence d holds query tokens [cu_seqlens_q[d], cu_seqlens_q[d+1])
and key tokens [cu_seqlens_k[d], cu_seqlens_k[d+1]); a query attends only to keys of its
own sequence. The call becomes ONE contract call on a batch of 1 with a document mask:

- a `GroupMask` (one set per sequence) when the mask is block-diagonal, which the
  `triton` backend runs in one launch over the diagonal tiles only, and FlexAttention /
  chunked / reference take as a mask_mod;
- causal attention and windows are bottom-right aligned per sequence (flash-attn's rule). When
  every sequence has as many queries as keys that is the global diagonal (so the GroupMask plus
  `causal` / `window`); otherwise a per-sequence mask_mod.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bounded import put, touch
from .functional import attention
from .groups import GroupMask, SegmentLayout
from ._checks import backend_name
from .request import build_request, check_window, combined_bounds

__all__ = ["varlen_attention"]

_MASKS: dict = {}  # (cu_q, cu_k, device) -> GroupMask: built once per packing (the last 16 used)


def _offsets(name: str, cu: Tensor, total: int) -> tuple[int, ...]:
    """cu_seqlens as host ints [0, ..., total], non-decreasing (TypeError / ValueError naming it)."""
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        what = f"{cu.dtype} tensor of shape {list(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        raise TypeError(f"{name} must be a 1-D int32/int64 tensor [num_seqs + 1], got {what}")
    xs = tuple(int(x) for x in cu.tolist())  # host sync, as flash-attn's max_seqlen arguments are
    if len(xs) < 2 or xs[0] != 0 or xs[-1] != total or any(b < a for a, b in zip(xs, xs[1:])):
        raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}, got "
                         f"{list(xs) if len(xs) <= 12 else list(xs[:6]) + ['...'] + list(xs[-3:])}")
    return xs


def _group_mask(cu_q: tuple[int, ...], cu_k: tuple[int, ...], device: torch.device) -> GroupMask:
    key = (cu_q, cu_k, str(device))
    hit = touch(_MASKS, key)
    if hit is None:
        sets = tuple((((a, b),), ((c, d),)) for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]))
        hit = put(_MASKS, key, GroupMask(SegmentLayout(cu_q[-1], cu_k[-1], sets), device), 16)
    return hit


def _bounds_per_sequence(cu_q: tuple[int, ...], cu_k: tuple[int, ...], left: int | None, right: int | None,
                         device: torch.device):
    """mask_mod: same sequence, and key j in [diag - left, diag + right] around the query's own
    bottom-right diagonal, diag = i + Lk_d - Lq_d in local positions, i.e. i + cu_k[d+1] - cu_q[d+1]
    in packed positions (a None side unbounded)."""
    lens_q = torch.tensor([b - a for a, b in zip(cu_q, cu_q[1:])], device=device)
    lens_k = torch.tensor([b - a for a, b in zip(cu_k, cu_k[1:])], device=device)
    ids = torch.arange(len(lens_q), device=device)
    seq_q = torch.repeat_interleave(ids, lens_q)
    seq_k = torch.repeat_interleave(ids, lens_k)
    shift = torch.tensor([d - b for b, d in zip(cu_q[1:], cu_k[1:])], device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        sq = seq_q[q_idx]
        diag = q_idx + shift[sq]
        keep = sq == seq_k[kv_idx]
        if left is not None:
            keep = keep & (kv_idx >= diag - left)
        if right is not None:
            keep = keep & (kv_idx <= diag + right)
        return keep

    return mask_mod


def _no_keys(q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool, backend: str, **rules):
    """The call of an empty side, after the contract's checks (on one-token stand-ins): out 0, lse -inf,
    differentiable (zero gradients) as the contract's results are."""
    stand_ins = [t.new_zeros(1, t.shape[1], 1, t.shape[2]) for t in (q, k, v)]
    build_request(*stand_ins, return_lse=return_lse, **rules)  # heads, head dims, dtypes, devices, rules
    backend_name(backend)
    group = q.shape[1] // k.shape[1]
    # a product over no keys: exact zeros, joined to q, k and v by autograd (NaN-free)
    out = torch.einsum("qhd,khd,khe->qhe", q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
    if not return_lse:
        return out
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    return out, torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=ct, device=q.device)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *,
                     causal: bool = False, window: int | tuple[int | None, int | None] | None = None,
                     scale: float | None = None, softcap: float | None = None, return_lse: bool = False,
                     backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed sequences of different lengths, in one contract call.

    Args:
        q: [total_q, Hq, D]; k: [total_k, Hkv, D]; v: [total_k, Hkv, Dv] (flash-attn's varlen layout).
        cu_seqlens_q, cu_seqlens_k: int32/int64 [num_seqs + 1], 0 = cu[0] <= cu[1] <= ... = total;
            sequence d owns query rows cu_seqlens_q[d]:cu_seqlens_q[d+1] and the matching key rows.
            Empty sequences are allowed. Read on the host (one sync per call).
        max_seqlen_q, max_seqlen_k: flash-attn's arguments, in its positions; not needed (the
            lengths are read from cu_seqlens), but when given they must bound every sequence.
        causal: per sequence, bottom-right aligned (local key j <= local query i + Lk_d - Lq_d).
        window: as in `attnkit.attention` (W, or (left, right) with -1/None unbounded; flash-attn's
            window_size), around each sequence's own bottom-right diagonal.
        scale, softcap, backend: as in `attnkit.attention`.
        return_lse: also return the log-sum-exp [Hq, total_q] (flash-attn's layout), float32 (float64 for
            float64 inputs).

    Returns:
        out [total_q, Hq, Dv] (a query whose sequence has no key gets 0), or (out, lse).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = f"shape {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be packed [total, heads, head_dim], got {got}")
    cu_q = _offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    cu_k = _offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
                         f"{len(cu_q) - 1} and {len(cu_k) - 1}")
    for name, bound, cu in (("max_seqlen_q", max_seqlen_q, cu_q), ("max_seqlen_k", max_seqlen_k, cu_k)):
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < longest):
            raise ValueError(f"{name} must be an int >= the longest sequence ({longest}), got {bound!r}")
    if k.shape[0] != v.shape[0]:
        raise ValueError(f"k and v must hold the same packed keys (dim 0), got k {list(k.shape)}, v {list(v.shape)}")
    if q.shape[0] == 0 or k.shape[0] == 0:  # nothing to attend (the contract takes no empty tensor)
        return _no_keys(q, k, v, causal=causal, window=window, scale=scale, softcap=softcap, return_lse=return_lse,
                        backend=backend)
    same = all(b - a == d - c for a, b, c, d in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]))
    bounds = combined_bounds(causal, check_window(window, q.shape[0] + k.shape[0]))
    if bounds is not None and not same:
        kw = dict(mask_mod=_bounds_per_sequence(cu_q, cu_k, *bounds, q.device))
    else:  # block-diagonal; with equal lengths per sequence the global diagonal is each sequence's
        kw = dict(mask_mod=_group_mask(cu_q, cu_k, q.device), causal=causal, window=window)
    res = attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
                    scale=scale, softcap=softcap, return_lse=return_lse, backend=backend, **kw)
    out, lse = res if return_lse else (res, None)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out
