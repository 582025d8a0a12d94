"""The decoding interface shared by the contiguous KVCache and the PagedKVCache.

MultiHeadAttention decodes with any `DecodeCache`: it asks for the RoPE positions of the
tokens it is about to add (`next_positions`), then either

- appends their K/V with `append_for_attention`, which returns the contract's keyword
  arguments to attend over the cache *in place* (k, v, cache_seqlens, and block_table for
  a paged cache): the decode path, no copy of the cache and no mask; or
- appends with `append` (K/V covering every cached token of the batch, gathered for a
  paged cache) and masks what a query may not see with `key_mask`: the general path
  (learnable sink tokens, user masks or biases, a cache dtype other than the model's).

Both caches also expose their storage as `k` and `v` (same dtype).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

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
                 window: int | None = None) -> Tensor:
        ...

    def append_for_attention(self, k_new: Tensor, v_new: Tensor) -> dict[str, Tensor] | None:
        return None


def decode_key_mask(old_lengths: Tensor, new_lengths: Tensor, new_tokens: int, num_keys: int, *,
                    causal: bool = True, window: int | None = None) -> Tensor:
    """Bool [B, 1, new_tokens, num_keys]: query i of sequence b (position old[b] + i) may see key j.

    Keys must be written (j < new[b]) and, when causal, not after the query (j <= old[b] + i);
    with a window W, recent (j > old[b] + i - W). Padding queries of a ragged append
    (i >= new[b] - old[b]) thus never see the stale slots after a sequence's tokens.
    """
    dev = old_lengths.device
    j = torch.arange(num_keys, device=dev).view(1, 1, 1, -1)
    qpos = old_lengths.long().view(-1, 1, 1, 1) + torch.arange(new_tokens, device=dev).view(1, 1, -1, 1)
    keep = j < new_lengths.long().view(-1, 1, 1, 1)
    if causal:
        keep = keep & (j <= qpos)
    if window is not None:
        keep = keep & (j > qpos - window)
    return keep
