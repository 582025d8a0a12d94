"""The decoding interface shared by the contiguous KVCache and the PagedKVCache.

MultiHeadAttention decodes with any `DecodeCache`: it asks for the RoPE positions of the
tokens it is about to add (`next_positions`), then either

- appends their K/V with `append_for_attention`, which returns the contract's keyword
  arguments to attend over the cache *in place* (k, v, cache_seqlens, and block_table for
  a paged cache): the decode path, no copy of the cache and no mask; or
- appends with `append` (K/V covering every cached token of the batch, gathered for a
  paged cache) and masks what a query may not see with `key_mask`: the general path
  (learnable sink tokens, user masks or biases, a cache dtype other than the model's).

Both caches also expose their storage as `k` and `v` (same dtype). `rollback()` undoes the
last append when the attention call after it fails, so that a failing call changes nothing.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..request import check_window

__all__ = ["DecodeCache"]


class DecodeCache(ABC):
    """What a module needs of a KV cache to decode a batch of B sequences.

    k, v: the cache's storage tensors (their dtype is the cache's dtype).
    next_positions(new_tokens) -> int64 [B, new_tokens]: positions of the next tokens
        (each sequence's current length + 0..new_tokens-1), for RoPE.
    append(k_new, v_new) -> (k, v, old_lengths, new_lengths): writes [B, Hkv, L_new, D]
        after each sequence's tokens; k/v [B, Hkv, L_keys, D] hold every cached token of
        sequence b at positions 0..new_lengths[b]-1 (anything after is stale or padding).
    key_mask(old_lengths, new_tokens, causal=True, window=None) -> bool [B, 1, L_new, L_keys]
        for the k/v the last append returned.
    append_for_attention(k_new, v_new) -> dict: appends L_new tokens to every sequence of the
        batch and returns `attnkit.attention` keyword arguments over every cached token:
        k, v (the storage itself), cache_seqlens (the lengths after the write) and, for a
        paged cache, block_table. Query i of the new tokens then sits at key position
        cache_seqlens[b] - L_new + i: the contract's per-sequence alignment. None (the
        default) when a cache has no in-place path; nothing is appended then.
    rollback(): undoes the last append (either kind), provided nothing else changed the cache
        since: the lengths (and a paged cache's blocks) are as before it. What it wrote stays
        in slots past the lengths, where nothing reads it. MultiHeadAttention calls it when
        the attention call after an append raises.
    """

    k: Tensor
    v: Tensor

    @abstractmethod
    def next_positions(self, new_tokens: int) -> Tensor:
        ...

    @abstractmethod
    def append(self, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ...

    @abstractmethod
    def key_mask(self, old_lengths: Tensor, new_tokens: int, *, causal: bool = True,
                 window: int | tuple[int, int] | None = None) -> Tensor:
        ...

    def append_for_attention(self, k_new: Tensor, v_new: Tensor) -> dict[str, Tensor] | None:
        return None

    @abstractmethod
    def rollback(self) -> None:
        ...


def check_dtype(dtype) -> None:
    """A cache's storage dtype: a floating torch.dtype, else TypeError."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def check_new_kv(k_new, v_new, batch: int, k: Tensor, v: Tensor) -> int:
    """L_new of k_new [batch, Hkv, L_new, D] / v_new [batch, Hkv, L_new, Dv] written into storage
    k / v (Hkv at dim 1, D / Dv last); TypeError / ValueError naming the argument otherwise."""
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    Hkv, D, Dv = k.shape[1], k.shape[3], v.shape[3]
    if k_new.dim() != 4 or k_new.shape[0] != batch or k_new.shape[1] != Hkv or k_new.shape[3] != D:
        raise ValueError(f"k_new must be [B, Hkv, L, D] = [{batch}, {Hkv}, L, {D}], got {list(k_new.shape)}")
    L = k_new.shape[2]
    if v_new.dim() != 4 or tuple(v_new.shape) != (batch, Hkv, L, Dv):
        raise ValueError(f"v_new must be [B, Hkv, L, Dv] = [{batch}, {Hkv}, {L}, {Dv}], got {list(v_new.shape)}")
    if k_new.dtype != k.dtype or v_new.dtype != v.dtype:
        raise TypeError(f"cache holds {k.dtype}, got k_new {k_new.dtype}, v_new {v_new.dtype}")
    if k_new.device != k.device or v_new.device != k.device:
        raise ValueError(f"cache is on {k.device}, got k_new on {k_new.device}, v_new on {v_new.device}")
    return L


def check_num_new(num_new, batch: int, limit: int | None) -> list[int]:
    """num_new (None: `limit` each; an integer tensor [batch] or `batch` ints) as ints in [0, limit]
    (limit None: >= 0). Reading a tensor synchronises with its device."""
    if num_new is None:
        if limit is None:
            raise ValueError("num_new is required here: one token count per sequence")
        return [limit] * batch
    if isinstance(num_new, Tensor):
        if num_new.dtype.is_floating_point or num_new.dtype == torch.bool or tuple(num_new.shape) != (batch,):
            raise ValueError(f"num_new must be an integer tensor of shape [B] = [{batch}], got {num_new!r:.80}")
        counts = [int(c) for c in num_new.tolist()]
    elif all_ints(num_new) and len(num_new) == batch:
        counts = [int(c) for c in num_new]
    else:
        raise ValueError(f"num_new must be B = {batch} ints, got {short(num_new)}")
    if any(c < 0 or (limit is not None and c > limit) for c in counts):
        allowed = f"lie in [0, L_new={limit}]" if limit is not None else "be >= 0"
        raise ValueError(f"num_new must {allowed}, got {counts}")
    return counts


def all_ints(xs) -> bool:
    """xs is a sized iterable of integers (Python or numpy; not bools)."""
    try:
        len(xs)
        return all(not isinstance(x, bool) and isinstance(x, numbers.Integral) for x in xs)
    except TypeError:
        return False


def short(xs, n: int = 16) -> str:
    """repr of a list, cut after n items (error messages)."""
    try:
        xs = list(xs)
    except TypeError:
        return repr(xs)
    return repr(xs) if len(xs) <= n else repr(xs[:n])[:-1] + f", ... ({len(xs)} in all)]"


def decode_key_mask(old_lengths: Tensor, new_lengths: Tensor, new_tokens: int, num_keys: int, *,
                    causal: bool = True, window: int | tuple[int, int] | None = None) -> Tensor:
    """Bool [B, 1, new_tokens, num_keys]: query i of sequence b (position old[b] + i) may see key j.

    Keys must be written (j < new[b]) and, when causal, not after the query (j <= old[b] + i);
    a window as the contract's (an int W: old[b] + i - W < j <= old[b] + i; or a (left, right) pair).
    Padding queries of a ragged append (i >= new[b] - old[b]) thus never see the stale slots after a
    sequence's tokens.
    """
    bounds = check_window(window, num_keys + new_tokens)  # (TypeError / ValueError naming window)
    dev = old_lengths.device
    j = torch.arange(num_keys, device=dev).view(1, 1, 1, -1)
    qpos = old_lengths.long().view(-1, 1, 1, 1) + torch.arange(new_tokens, device=dev).view(1, 1, -1, 1)
    keep = j < new_lengths.long().view(-1, 1, 1, 1)
    if causal:
        keep = keep & (j <= qpos)
    if bounds is not None:
        left, right = bounds
        if left is not None:
            keep = keep & (j >= qpos - left)
        if right is not None:
            keep = keep & (j <= qpos + right)
    return keep
