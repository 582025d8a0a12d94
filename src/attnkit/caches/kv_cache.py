"""A contiguous, preallocated KV cache for decoding (static shapes, CUDA-graph friendly)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import positive_int
from .base import DecodeCache, decode_key_mask

__all__ = ["KVCache"]


class KVCache(DecodeCache):
    """Per-layer K/V buffers [B, Hkv, max_len, D] plus per-sequence lengths.

    `append(k_new, v_new)` writes [B, Hkv, L_new, D] at each sequence's current
    length with index arithmetic on device tensors (no host sync unless
    `num_new` is given; fixed shapes, so a decode step can be captured in a CUDA graph) and returns the whole
    buffers with the lengths before and after the write. Keys at positions
    >= a sequence's length are stale and must be masked (`key_mask`).

    An append that would run past max_len raises and writes nothing; the
    check uses a host-side copy of the lengths (`host_lengths`), kept in step
    by `append`. After replaying a captured graph, call `advance(n)` to move
    the host copy by the n tokens the replay appended.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int, *,
                 head_dim_v: int | None = None, dtype: torch.dtype = torch.float32, device=None):
        for name, val in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads),
                          ("max_len", max_len), ("head_dim", head_dim)):
            positive_int(name, val)
        dv = head_dim if head_dim_v is None else positive_int("head_dim_v", head_dim_v)
        self.k = torch.zeros(batch_size, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, num_kv_heads, max_len, dv, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.host_lengths = [0] * batch_size

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    def next_positions(self, new_tokens: int) -> Tensor:
        """Int64 [B, new_tokens]: positions of the next tokens (device arithmetic, no host sync)."""
        return self.lengths.long().view(-1, 1) + torch.arange(new_tokens, device=self.lengths.device)

    def reset(self) -> None:
        self.lengths.zero_()
        self.host_lengths = [0] * self.batch_size

    def advance(self, n: int) -> None:
        """Move the host copy of the lengths by n (after a captured graph appended n tokens)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"advance takes a token count >= 0, got {n!r}")
        self.host_lengths = [x + n for x in self.host_lengths]

    def append(self, k_new: Tensor, v_new: Tensor, num_new: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Write k_new/v_new [B, Hkv, L_new, D] after each sequence's tokens.

        num_new: optional int [B], how many of the L_new tokens of each sequence
        are real (right-padded prefill); default all. Returns (k, v, old_lengths,
        new_lengths), k/v being the full buffers.
        """
        B, H, Ln = k_new.shape[:3]
        if k_new.shape[0] != self.batch_size or k_new.shape[1] != self.k.shape[1] or k_new.shape[3] != self.k.shape[3]:
            raise ValueError(f"k_new must be [B, Hkv, L, D] = [{self.batch_size}, {self.k.shape[1]}, L, {self.k.shape[3]}], got {list(k_new.shape)}")
        if v_new.shape[:3] != k_new.shape[:3] or v_new.shape[3] != self.v.shape[3]:
            raise ValueError(f"v_new must be [B, Hkv, L, Dv] matching k_new, got {list(v_new.shape)}")
        if k_new.dtype != self.k.dtype or v_new.dtype != self.v.dtype:
            raise TypeError(f"cache holds {self.k.dtype}, got k {k_new.dtype}, v {v_new.dtype}")
        counts = [Ln] * B
        if num_new is not None:
            if not isinstance(num_new, Tensor) or num_new.dtype.is_floating_point or num_new.dtype == torch.bool \
                    or tuple(num_new.shape) != (B,):
                raise ValueError(f"num_new must be an integer tensor of shape [B] = [{B}], got {num_new!r:.80}")
            counts = [int(c) for c in num_new.tolist()]  # host sync: padded prefill only
            if any(c < 0 or c > Ln for c in counts):
                raise ValueError(f"num_new must lie in [0, L_new={Ln}], got {counts}")
        if not torch.compiler.is_compiling():
            over = [i for i, n in enumerate(self.host_lengths) if n + Ln > self.max_len]
            if over:
                raise ValueError(
                    f"KV cache overflow: sequence(s) {over} hold {[self.host_lengths[i] for i in over]} "
                    f"tokens; appending {Ln} exceeds max_len {self.max_len}; nothing was written"
                )
        old = self.lengths.clone()
        pos = (old.view(B, 1).long() + torch.arange(Ln, device=old.device)).clamp_max(self.max_len - 1)
        idx = pos.view(B, 1, Ln, 1)
        self.k.scatter_(2, idx.expand(B, H, Ln, self.k.shape[3]), k_new)
        self.v.scatter_(2, idx.expand(B, H, Ln, self.v.shape[3]), v_new)
        added = torch.full_like(old, Ln) if num_new is None else num_new.to(old.dtype)
        self.lengths.add_(added)
        if not torch.compiler.is_compiling():
            self.host_lengths = [a + b for a, b in zip(self.host_lengths, counts)]
        return self.k, self.v, old, self.lengths

    def append_for_attention(self, k_new: Tensor, v_new: Tensor) -> dict[str, Tensor]:
        """append(), then the contract's keyword arguments over the buffers in place: k, v and
        cache_seqlens (the lengths tensor itself, so a captured CUDA graph reads its current
        values on every replay)."""
        self.append(k_new, v_new)
        return {"k": self.k, "v": self.v, "cache_seqlens": self.lengths}

    def key_mask(self, old_lengths: Tensor, new_tokens: int, *, causal: bool = True,
                 window: int | None = None) -> Tensor:
        """Bool [B, 1, L_new, max_len]: query i of sequence b (position old[b] + i) may see key j.

        Keys must be written (j < new length) and, when causal, not after the query
        (j <= old[b] + i); with a window W, recent (j > old[b] + i - W).
        """
        return decode_key_mask(old_lengths, self.lengths, new_tokens, self.max_len, causal=causal, window=window)
