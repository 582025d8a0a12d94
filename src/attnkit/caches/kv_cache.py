"""A contiguous, preallocated KV cache for decoding (static shapes, CUDA-graph friendly)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import positive_int
from .base import DecodeCache, check_dtype, check_new_kv, check_num_new, decode_key_mask

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
        check_dtype(dtype)
        self.k = torch.zeros(batch_size, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, num_kv_heads, max_len, dv, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.host_lengths = [0] * batch_size
        self._undo: tuple[Tensor, list[int]] | None = None  # (lengths, host_lengths) before the last append

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
        """Empty every sequence. Buffers written with autograd on (out of place) hold the last rollout's
        graph: they are detached, so the next rollout's backward does not run into it."""
        if self.k.grad_fn is not None or self.v.grad_fn is not None:
            self.k, self.v = self.k.detach(), self.v.detach()
        self.lengths.zero_()
        self.host_lengths = [0] * self.batch_size
        self._undo = None

    def advance(self, n: int) -> None:
        """Move the host copy of the lengths by n (after a captured graph appended n tokens)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"advance takes a token count >= 0, got {n!r}")
        self.host_lengths = [x + n for x in self.host_lengths]
        self._undo = None

    def append(self, k_new: Tensor, v_new: Tensor, num_new: Tensor | list[int] | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Write k_new/v_new [B, Hkv, L_new, D] after each sequence's tokens.

        num_new: optional int [B], how many of the L_new tokens of each sequence
        are real (right-padded prefill); default all. Only those are written, so only they
        count against max_len (eager; under torch.compile the whole L_new must fit).
        Returns (k, v, old_lengths, new_lengths), k/v being the full buffers.

        With autograd on and inputs that require grad (or buffers that do), the write is out of place
        (the buffers are copied, O(max_len), so that gradients through earlier steps stay right);
        decode under torch.no_grad() to write in place.

        Under torch.compile the host-side check is off (it would make the graph depend on the
        lengths' values): there an append past max_len fails a device assertion instead
        (torch._assert_async: the error surfaces asynchronously, at the next synchronisation),
        positions past max_len are clamped into the buffer, so nothing outside it is touched,
        and `host_lengths` does not move (use `advance`).
        """
        B = self.batch_size
        compiling = torch.compiler.is_compiling()
        if not compiling and self.lengths.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError("this KVCache was built under torch.inference_mode: append to it under inference_mode "
                             "too (its tensors cannot change outside it), or build it outside; nothing was written")
        Ln = check_new_kv(k_new, v_new, B, self.k, self.v)
        H = self.k.shape[1]
        counts = check_num_new(num_new, B, Ln)  # reads a tensor num_new on the host: padded prefill only
        if not compiling:
            over = [i for i, (n, c) in enumerate(zip(self.host_lengths, counts)) if n + c > self.max_len]
            if over:
                raise ValueError(
                    f"KV cache overflow: sequence(s) {over} hold {[self.host_lengths[i] for i in over]} "
                    f"tokens; appending {[counts[i] for i in over]} exceeds max_len {self.max_len}; "
                    "nothing was written"
                )
        old = self.lengths.clone()
        if compiling:
            torch._assert_async((old <= self.max_len - Ln).all(), "KV cache overflow: an append ran past max_len")
        # Out of place with autograd: the call before may have saved the buffers for its backward, which an
        # in-place write would invalidate. Each step then copies the buffers (O(max_len)) and they hold its
        # graph, as a torch.cat cache does; decode under torch.no_grad() (and in captured graphs) in place.
        out_of_place = torch.is_grad_enabled() and (k_new.requires_grad or v_new.requires_grad
                                                    or self.k.requires_grad)
        if num_new is not None and not compiling:
            # Ragged: only the real tokens are written (the padding of a sequence near max_len has no slot).
            real = torch.arange(Ln).view(1, Ln) < torch.tensor(counts).view(B, 1)
            rows, toks = real.nonzero().t().to(old.device)  # built on the host, where the counts are
            # from the lengths tensor, not host_lengths: those lag after compiled appends / graph replays
            slots = old.long()[rows] + toks
            for name, new_t in (("k", k_new), ("v", v_new)):
                buf = getattr(self, name).transpose(1, 2)  # [B, max_len, Hkv, D]: (row, slot) pairs index it
                vals = new_t.transpose(1, 2)[rows, toks]
                if out_of_place:
                    setattr(self, name, buf.index_put((rows, slots), vals).transpose(1, 2))
                else:
                    buf.index_put_((rows, slots), vals)
        else:
            pos = (old.view(B, 1).long() + torch.arange(Ln, device=old.device)).clamp_max(self.max_len - 1)
            idx = pos.view(B, 1, Ln, 1)
            ik, iv = idx.expand(B, H, Ln, self.k.shape[3]), idx.expand(B, H, Ln, self.v.shape[3])
            if out_of_place:
                self.k, self.v = self.k.scatter(2, ik, k_new), self.v.scatter(2, iv, v_new)
            else:
                self.k.scatter_(2, ik, k_new)
                self.v.scatter_(2, iv, v_new)
        if num_new is None:
            self.lengths.add_(Ln)
        elif isinstance(num_new, Tensor):
            self.lengths.add_(num_new.to(device=old.device, dtype=old.dtype))
        else:
            self.lengths.add_(torch.tensor(counts, device=old.device, dtype=old.dtype))
        if not compiling:
            self._undo = (old, self.host_lengths)
            self.host_lengths = [a + b for a, b in zip(self.host_lengths, counts)]
        return self.k, self.v, old, self.lengths

    def rollback(self) -> None:
        """Undo the last append (see DecodeCache): the lengths and host_lengths before it."""
        if self._undo is None:
            raise RuntimeError("KVCache.rollback: no append to undo (one rollback per append, not after reset)")
        old, host = self._undo
        self.lengths.copy_(old)
        self.host_lengths = host
        self._undo = None

    def append_for_attention(self, k_new: Tensor, v_new: Tensor) -> dict[str, Tensor]:
        """append(), then the contract's keyword arguments over the buffers in place: k, v and
        cache_seqlens (the lengths tensor itself, so a captured CUDA graph reads its current
        values on every replay)."""
        self.append(k_new, v_new)
        return {"k": self.k, "v": self.v, "cache_seqlens": self.lengths}

    def key_mask(self, old_lengths: Tensor, new_tokens: int, *, causal: bool = True,
                 window: int | tuple[int, int] | None = None) -> Tensor:
        """Bool [B, 1, L_new, max_len]: query i of sequence b (position old[b] + i) may see key j.

        Keys must be written (j < new length) and, when causal, not after the query
        (j <= old[b] + i); with a window as the contract's (an int W: old[b] + i - W < j <= old[b] + i;
        or a (left, right) pair).
        """
        return decode_key_mask(old_lengths, self.lengths, new_tokens, self.max_len, causal=causal, window=window)
