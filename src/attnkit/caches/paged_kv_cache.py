"""A paged KV cache: a pool of fixed-size blocks, a block allocator with reference counts,
per-sequence block tables (vLLM's PagedAttention layout; FlashInfer's "HND" page layout)."""

from __future__ import annotations

import itertools
from collections import deque
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .._checks import positive_int
from .base import DecodeCache, all_ints, check_dtype, check_new_kv, check_num_new, decode_key_mask, short

__all__ = ["PagedKVCache"]

MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 16, 256


class PagedKVCache(DecodeCache):
    """One layer's K/V in a pool of blocks: k [num_blocks, Hkv, block_size, D], v [..., Dv].

    Sequences (ids handed out by `add_sequence`, never reused) own lists of blocks, their
    block tables: token t of a sequence lives in block `table[t // block_size]` at offset
    `t % block_size`. Blocks are allocated as sequences grow and return to the free list
    when no table holds them any more.

    Allocator:
      add_sequence() -> seq id (empty, no block yet).
      fork(seq_id) -> child id: the child's table is a copy of the parent's; the blocks are
        shared (reference count + 1 each), nothing is copied.
      free(seq_id): drops the sequence; blocks whose count falls to 0 become free.
      Copy-on-write: a write into a last block that is shared (count > 1, partly filled)
        first copies that block to a fresh one for the writing sequence, so the other
        holders never see the write. Full shared blocks are never written.
      Free blocks are handed out first-in first-out, starting in `allocation_order`
      (default 0, 1, 2, ...; a shuffled permutation gives non-contiguous tables for tests).

    Writing and reading:
      write(seq_ids, k_new, v_new, num_new=None): appends [B, Hkv, L, D] to those sequences
        (the prefill path: the prompt's K/V go into blocks; any later step the same way).
      block_table(seq_ids) -> int32 [B, max_blocks], padded with -1 (`pad=`);
      lengths(seq_ids) -> int32 [B]: what a paged kernel reads.
      gather(seq_ids) -> contiguous k, v [B, Hkv, max(lengths), D], zeros after each length.

    Decoding interface (`DecodeCache`, what MultiHeadAttention uses): `bind(seq_ids)` picks
    the batch; `append_for_attention(k_new, v_new)` writes for that batch and returns the
    contract's keyword arguments (the pool as k/v, `block_table`, `cache_seqlens`), which the
    `triton` backend's split-KV decode kernel reads in place. `append(k_new, v_new)` writes
    and returns the gathered K/V with the lengths before and after, and `key_mask` masks
    them: the general path (a copy of every cached token of the batch each step).

    Block size: 16 (vLLM's default) shares prefixes finely and wastes under 16 tokens per
    sequence. Blocks of 128 tokens or more (at least the decode kernel's key tile) decode as fast as
    a contiguous cache; 16-token blocks ~2% slower on an H100 at D = 128 (docs/benchmarks.md, decoding).

    Nothing fails silently, nothing is lost: every check (sequence ids, shapes, dtypes,
    devices, enough free blocks for the whole write, copy-on-write copies included) runs
    before anything changes, so an operation that raises leaves the cache as it was.
    The bookkeeping lives on the host (Python lists); the pool and the int32 tables are
    on the cache's device. One PagedKVCache per layer: a model applies the same
    add/fork/free/bind calls to the cache of each of its layers.
    """

    def __init__(self, num_blocks: int, num_kv_heads: int, head_dim: int, block_size: int = 16, *,
                 head_dim_v: int | None = None, dtype: torch.dtype = torch.float32, device=None,
                 allocation_order: Sequence[int] | None = None):
        for name, val in (("num_blocks", num_blocks), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                          ("block_size", block_size)):
            positive_int(name, val)
        # powers of two: the decode kernel tiles a block with tl.arange(0, block_size)
        if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], "
                             f"got {block_size}")
        dv = head_dim if head_dim_v is None else positive_int("head_dim_v", head_dim_v)
        check_dtype(dtype)
        if allocation_order is None:
            order = list(range(num_blocks))
        else:
            if isinstance(allocation_order, Tensor):
                allocation_order = allocation_order.tolist()
            order = [int(b) for b in allocation_order] if all_ints(allocation_order) else None
            if order is None or sorted(order) != list(range(num_blocks)):
                bad = [] if order is None else [b for b in order if not 0 <= b < num_blocks]
                raise ValueError(
                    f"allocation_order must be a permutation of the block ids 0..{num_blocks - 1} "
                    f"(num_blocks={num_blocks}), got {short(allocation_order)}"
                    + (f"; out of range: {short(bad)}" if bad else ""))
        self.block_size = block_size
        self.k = torch.zeros(num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(num_blocks, num_kv_heads, block_size, dv, dtype=dtype, device=device)
        self._free: deque[int] = deque(order)
        self._refs: list[int] = [0] * num_blocks
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0
        self._batch: tuple[int, ...] = ()
        self._undo: tuple | None = None  # what rollback() needs to undo the last write

    # ------------------------------------------------------------------ state

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def seq_ids(self) -> tuple[int, ...]:
        """The live sequences, in creation order."""
        return tuple(self._tables)

    @property
    def batch(self) -> tuple[int, ...]:
        """The sequences `append` / `key_mask` / `next_positions` work on (see `bind`)."""
        return self._batch

    def free_blocks(self) -> list[int]:
        """The free block ids, in the order they will be handed out."""
        return list(self._free)

    def ref_counts(self) -> list[int]:
        """Per block: how many block tables hold it (0 = free)."""
        return list(self._refs)

    def blocks_needed(self, seq_ids: Sequence[int], num_new: Sequence[int]) -> int:
        """Free blocks that appending num_new[i] tokens to seq_ids[i] takes (copy-on-write included)."""
        ids = self._check_ids(seq_ids, "seq_ids")
        return self._plan(ids, check_num_new(num_new, len(ids), None))[0]

    # ------------------------------------------------------------------ allocator

    def add_sequence(self) -> int:
        """A new empty sequence; returns its id (blocks come with its first write)."""
        sid = self._next_id
        self._next_id += 1
        self._undo = None
        self._tables[sid] = []
        self._lengths[sid] = 0
        return sid

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing seq_id's tokens (its blocks, reference counts + 1); returns its id."""
        self._check_id(seq_id, "seq_id")
        child = self.add_sequence()  # (drops the undo record)
        self._tables[child] = list(self._tables[seq_id])
        self._lengths[child] = self._lengths[seq_id]
        for b in self._tables[child]:
            self._refs[b] += 1
        return child

    def free(self, seq_id: int) -> None:
        """Drop seq_id; blocks no other table holds return to the free list (in table order). With
        autograd on, writes into the pool chain one graph over every sequence (call backward once over
        their losses); when the pool holds no sequence any more, that history is dropped (detached)."""
        self._check_id(seq_id, "seq_id")
        self._undo = None
        for b in self._tables.pop(seq_id):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
        del self._lengths[seq_id]
        if not self._tables and (self.k.grad_fn is not None or self.v.grad_fn is not None):
            self.k, self.v = self.k.detach(), self.v.detach()

    # ------------------------------------------------------------------ writes

    def write(self, seq_ids: Sequence[int], k_new: Tensor, v_new: Tensor,
              num_new: Tensor | Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Append k_new [B, Hkv, L, D] / v_new [B, Hkv, L, Dv] to the B sequences seq_ids.

        num_new: how many of the L tokens of each sequence are real (right-padded input,
        as KVCache.append), default all L. Allocates the blocks needed, copying a shared
        last block first (copy-on-write). Returns int32 (old_lengths, new_lengths) [B].
        Raises (changing nothing) on an unknown, freed or repeated id, a bad shape, dtype
        or device, or when the pool has fewer free blocks than the write needs.
        """
        ids = self._check_ids(seq_ids, "seq_ids")
        B = len(ids)
        L = check_new_kv(k_new, v_new, B, self.k, self.v)
        counts = check_num_new(num_new, B, L)
        need, cow = self._plan(ids, counts)
        if need > len(self._free):
            raise ValueError(
                f"paged KV cache out of blocks: appending {counts} tokens to sequences {list(ids)} needs "
                f"{need} free blocks (copy-on-write included), the pool has {len(self._free)} free of "
                f"{self.num_blocks}; nothing was written")
        old = [self._lengths[s] for s in ids]
        # The new state, computed aside: fresh blocks in the order the free list hands them out,
        # copy-on-write copies first, then each sequence's growth.
        bs, fresh = self.block_size, list(itertools.islice(self._free, need))
        taken = iter(fresh)
        tables = {s: list(self._tables[s]) for s in ids}
        copies = []  # (seq, table index, shared block, its copy)
        for s, i in cow:
            copies.append((s, i, tables[s][i], next(taken)))
            tables[s][i] = copies[-1][3]
        blk, off, rows, cols = [], [], [], []
        for r, (s, c) in enumerate(zip(ids, counts)):
            table, n = tables[s], self._lengths[s]
            while len(table) * bs < n + c:
                table.append(next(taken))
            blk.extend(table[t // bs] for t in range(n, n + c))
            off.extend(t % bs for t in range(n, n + c))
            rows.extend([r] * c)
            cols.extend(range(c))
        # The tensors first: until the bookkeeping below changes, what they write lies in free
        # blocks or past the lengths, where nothing reads it, so a write that raises changes nothing.
        for _, _, src, dst in copies:
            self.k[dst].copy_(self.k[src])
            self.v[dst].copy_(self.v[src])
        if blk:
            dev = self.k.device
            blk_t, off_t = torch.tensor(blk, device=dev), torch.tensor(off, device=dev)
            rows_t, cols_t = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
            # k_new[rows, :, cols] is [N, Hkv, D]: one token per row, as self.k[blk, :, off]
            self.k[blk_t, :, off_t] = k_new[rows_t, :, cols_t]
            self.v[blk_t, :, off_t] = v_new[rows_t, :, cols_t]
        # Then the bookkeeping (nothing here can raise).
        for _ in fresh:
            self._free.popleft()
        for b in fresh:
            self._refs[b] = 1
        for _, _, src, _ in copies:
            self._refs[src] -= 1
        self._undo = (ids, old, [len(self._tables[s]) for s in ids], copies, fresh)
        for s, c in zip(ids, counts):
            self._tables[s] = tables[s]
            self._lengths[s] += c
        return self._int32(old), self._int32([self._lengths[s] for s in ids])

    def rollback(self) -> None:
        """Undo the last write (append, append_for_attention): lengths, tables, reference counts and
        the free list as before it, provided no add_sequence / fork / free / write came after."""
        if self._undo is None:
            raise RuntimeError("PagedKVCache.rollback: no write to undo (one rollback per write, and not "
                               "after add_sequence / fork / free)")
        ids, old, table_lens, copies, fresh = self._undo
        for s, i, src, _ in copies:
            self._tables[s][i] = src
            self._refs[src] += 1
        for s, n, t in zip(ids, old, table_lens):
            del self._tables[s][t:]
            self._lengths[s] = n
        for b in fresh:
            self._refs[b] = 0
        self._free.extendleft(reversed(fresh))
        self._undo = None

    # ------------------------------------------------------------------ reads

    def lengths(self, seq_ids: Sequence[int] | None = None) -> Tensor:
        """Int32 [B]: the token count of each sequence (default: the bound batch)."""
        ids = self._ids_or_batch(seq_ids)
        return self._int32([self._lengths[s] for s in ids])

    def block_table(self, seq_ids: Sequence[int] | None = None, *, width: int | None = None,
                    pad: int = -1) -> Tensor:
        """Int32 [B, width]: row b lists the blocks of seq_ids[b] in token order, then `pad`.

        width defaults to the longest table (at least 1); a larger one (fixed shapes for a
        kernel) is fine, a smaller one raises. Only the first ceil(lengths[b] / block_size)
        entries of a row are real; the padding (-1 by default, loud if a kernel reads it)
        must never be dereferenced.
        """
        ids = self._ids_or_batch(seq_ids)
        longest = max([len(self._tables[s]) for s in ids], default=0)
        if width is None:
            width = max(longest, 1)
        elif isinstance(width, bool) or not isinstance(width, int) or width < longest:
            raise ValueError(f"width must be an int >= the longest block table ({longest}), got {width!r}")
        if isinstance(pad, bool) or not isinstance(pad, int):
            raise TypeError(f"pad must be an int, got {type(pad).__name__}")
        rows = [self._tables[s] + [pad] * (width - len(self._tables[s])) for s in ids]
        return torch.tensor(rows, dtype=torch.int32, device=self.k.device).view(len(ids), width)

    def gather(self, seq_ids: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """Contiguous k [B, Hkv, L, D], v [B, Hkv, L, Dv] with L = the longest sequence.

        Positions past a sequence's length are 0. A copy of every cached token: the
        slow path of decoding (a paged kernel reads the blocks in place instead).
        """
        ids = self._ids_or_batch(seq_ids)
        B, bs = len(ids), self.block_size
        lens = [self._lengths[s] for s in ids]
        L = max(lens, default=0)
        nb = -(-L // bs)
        table = self.block_table(ids, width=max(nb, 1), pad=0)[:, :nb].long()  # pad 0: a valid index, masked below
        Hkv = self.num_kv_heads
        out = []
        for pool in (self.k, self.v):
            g = pool[table]  # [B, nb, Hkv, bs, D]
            g = g.permute(0, 2, 1, 3, 4).reshape(B, Hkv, nb * bs, pool.shape[-1])[:, :, :L]
            valid = torch.arange(L, device=pool.device).view(1, 1, -1, 1) < self._int32(lens).view(-1, 1, 1, 1)
            out.append(g.masked_fill(~valid, 0))
        return out[0], out[1]

    # ------------------------------------------------------------------ decoding interface

    def bind(self, seq_ids: Sequence[int]) -> "PagedKVCache":
        """Make seq_ids (live, distinct, at least one) the batch of append/key_mask/next_positions."""
        ids = self._check_ids(seq_ids, "seq_ids")
        if not ids:
            raise ValueError("bind needs at least one sequence id, got none")
        self._batch = ids
        return self

    def next_positions(self, new_tokens: int) -> Tensor:
        """Int64 [B, new_tokens]: positions of the bound batch's next tokens."""
        return self.lengths().long().view(-1, 1) + torch.arange(new_tokens, device=self.k.device)

    def append(self, k_new: Tensor, v_new: Tensor, num_new: Tensor | Sequence[int] | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """write() to the bound batch, then gather(): returns (k, v, old_lengths, new_lengths)
        with k/v contiguous [B, Hkv, max(new_lengths), D] (correct but slow, see the class)."""
        old, new = self.write(self._require_batch(), k_new, v_new, num_new)
        k, v = self.gather(self._batch)
        return k, v, old, new

    def append_for_attention(self, k_new: Tensor, v_new: Tensor) -> dict[str, Tensor]:
        """write() to the bound batch, then the contract's keyword arguments over the pool in
        place: k, v (the pool), block_table (int32, padded with -1: never read) and
        cache_seqlens (int32 lengths after the write)."""
        ids = self._require_batch()
        self.write(ids, k_new, v_new)
        return {"k": self.k, "v": self.v, "cache_seqlens": self.lengths(ids), "block_table": self.block_table(ids)}

    def key_mask(self, old_lengths: Tensor, new_tokens: int, *, causal: bool = True,
                 window: int | tuple[int, int] | None = None) -> Tensor:
        """Bool [B, 1, L_new, max(lengths)] for the K/V `append` just returned (see KVCache.key_mask)."""
        lens = self.lengths(self._require_batch())
        return decode_key_mask(old_lengths, lens, new_tokens, int(max(self._lengths[s] for s in self._batch)),
                               causal=causal, window=window)

    # ------------------------------------------------------------------ checks

    def _int32(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=self.k.device)

    def _check_id(self, seq_id, name: str) -> int:
        if isinstance(seq_id, bool) or not isinstance(seq_id, int):
            raise TypeError(f"{name} must be an int sequence id, got {type(seq_id).__name__} {seq_id!r}")
        if seq_id not in self._tables:
            if 0 <= seq_id < self._next_id:
                raise ValueError(f"{name}: sequence {seq_id} was freed (live sequences: {short(self.seq_ids)})")
            raise ValueError(f"{name}: unknown sequence id {seq_id} (live sequences: {short(self.seq_ids)})")
        return seq_id

    def _check_ids(self, seq_ids, name: str) -> tuple[int, ...]:
        if isinstance(seq_ids, (int, Tensor)) or not isinstance(seq_ids, Iterable):
            raise TypeError(f"{name} must be a sequence of int ids, got {type(seq_ids).__name__}")
        ids = tuple(self._check_id(s, name) for s in seq_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"{name} must not repeat a sequence, got {list(ids)}")
        return ids

    def _ids_or_batch(self, seq_ids) -> tuple[int, ...]:
        return self._require_batch() if seq_ids is None else self._check_ids(seq_ids, "seq_ids")

    def _require_batch(self) -> tuple[int, ...]:
        if not self._batch:
            raise ValueError("no batch bound: call bind(seq_ids) before append/key_mask/next_positions")
        return self._check_ids(self._batch, "bound batch (bind a new one)")

    def _plan(self, ids: tuple[int, ...], counts: list[int]) -> tuple[int, list[tuple[int, int]]]:
        """(free blocks the write takes, [(seq, table index)] of shared last blocks to copy first).

        Simulated in batch order: once one holder of a shared block has copied it away,
        the block may no longer be shared for the next one (parent and child both writing).
        """
        bs, refs = self.block_size, {}
        need, cow = 0, []
        for s, c in zip(ids, counts):
            n, table = self._lengths[s], self._tables[s]
            if c == 0:
                continue
            if n % bs:
                last = table[-1]
                r = refs.get(last, self._refs[last])
                if r > 1:
                    cow.append((s, len(table) - 1))
                    refs[last] = r - 1
                    need += 1
            need += -(-(n + c) // bs) - len(table)
        return need, cow

