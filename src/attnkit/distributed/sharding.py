"""How a sequence is split over the ranks of a context-parallel group.

A sequence of true length ``seq_len`` is padded at its end to ``padded_length`` and cut
into equal chunks:

- ``"contiguous"``: ``P`` chunks; rank ``r`` holds chunk ``r``, i.e. positions
  ``[r * Lpad / P, (r + 1) * Lpad / P)`` (``Lpad`` a multiple of ``P``).
- ``"zigzag"``: ``2P`` chunks of ``C = Lpad / (2P)``; rank ``r`` holds chunk ``r``
  then chunk ``2P - 1 - r`` (``Lpad`` a multiple of ``2P``). Under a causal mask every
  rank then has the same number of (query, key) pairs to compute.

Every rank's shard has the same length ``Lpad / P``; local order follows global order.
Positions ``>= seq_len`` are padding: attention masks them as keys and returns 0 (log-sum-exp
``-inf``) for them as queries, and ``unshard_sequence`` drops them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .._checks import integer

__all__ = ["LAYOUTS", "padded_length", "shard_chunks", "shard_positions", "shard_sequence", "unshard_sequence"]

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _chunks_per_rank(layout: str) -> int:
    return 2 if check_layout(layout) == "zigzag" else 1


def _check_world(rank, world_size) -> None:
    integer("rank", rank)
    integer("world_size", world_size)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")


def _check_dim(dim, x: Tensor) -> int:
    """dim as an index in [0, x.dim()) (negative counts from the end), else a ValueError naming it."""
    if not -x.dim() <= integer("dim", dim) < x.dim():
        raise ValueError(f"dim must lie in [{-x.dim()}, {x.dim()}) for a tensor of shape {list(x.shape)}, got {dim}")
    return dim % x.dim()


def padded_length(seq_len: int, world_size: int, layout: str = "contiguous") -> int:
    """The total length a sequence of ``seq_len`` tokens is padded to: a multiple of P (contiguous) or 2P (zigzag)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    _check_world(0, world_size)
    m = world_size * _chunks_per_rank(layout)
    return -(-seq_len // m) * m


def shard_chunks(rank: int, world_size: int, layout: str = "contiguous") -> tuple[int, ...]:
    """Global chunk indices held by ``rank``, in local order (chunks of Lpad / P or Lpad / 2P tokens)."""
    _check_world(rank, world_size)
    if check_layout(layout) == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def shard_positions(rank: int, world_size: int, layout: str, shard_len: int) -> tuple[tuple[int, int], ...]:
    """The global positions of a shard as (global start, length) segments, in local order."""
    chunks = shard_chunks(rank, world_size, layout)
    if shard_len % len(chunks):
        raise ValueError(f"a {layout} shard must have a length divisible by {len(chunks)}, got {shard_len}")
    c = shard_len // len(chunks)
    return tuple((ch * c, c) for ch in chunks)


def shard_sequence(x: Tensor, rank: int, world_size: int, *, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """Rank ``rank``'s shard of the full sequence ``x`` (sequence along ``dim``; [B, H, L, D] -> dim 2).

    ``x`` is zero-padded at its end to ``padded_length(L, world_size, layout)`` first; the
    shard has ``padded_length / world_size`` positions (contiguous for "contiguous"; chunk
    ``rank`` then chunk ``2 * world_size - 1 - rank`` for "zigzag"). Pass the true ``L`` as
    ``seq_len=`` to the attention when it was padded.
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        got = "a 0-d tensor" if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"x must be a torch.Tensor with a sequence dim, got {got}")
    _check_world(rank, world_size)
    dim = _check_dim(dim, x)
    L = x.shape[dim]
    Lpad = padded_length(L, world_size, layout)
    if Lpad != L:
        pad_shape = list(x.shape)
        pad_shape[dim] = Lpad - L
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    c = Lpad // (world_size * _chunks_per_rank(layout))
    parts = [x.narrow(dim, ch * c, c) for ch in shard_chunks(rank, world_size, layout)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard_sequence(
    shards: Sequence[Tensor] | Tensor, *, layout: str = "contiguous", seq_len: int | None = None,
    dim: int = 2, group=None,
) -> Tensor:
    """The full sequence from the shards of every rank, padding dropped: the inverse of shard_sequence.

    ``shards``: the list of every rank's shard in rank order (no communication), or this
    rank's shard alone, which is then all-gathered over ``group`` (every rank of the group
    must call; the result is not differentiable). ``seq_len``: the true length (default:
    all positions, i.e. no padding).
    """
    if isinstance(shards, Tensor):
        import torch.distributed as dist

        from ._validate import resolve_group

        group, _, world = resolve_group(group, "unshard_sequence")
        gathered = [torch.empty_like(shards) for _ in range(world)]
        dist.all_gather(gathered, shards.contiguous(), group=group)
        shards = gathered
    if not isinstance(shards, (list, tuple)) or not shards or not all(isinstance(s, Tensor) for s in shards):
        raise TypeError(f"shards must be a tensor or a non-empty list of tensors, got {type(shards).__name__}")
    world = len(shards)
    dim = _check_dim(dim, shards[0])
    n = _chunks_per_rank(layout)
    shard_len = shards[0].shape[dim]
    if any(s.shape != shards[0].shape for s in shards) or shard_len % n:
        raise ValueError(
            f"shards must share one shape with a length divisible by {n} along dim {dim}, "
            f"got {[list(s.shape) for s in shards]}"
        )
    c = shard_len // n
    chunks: dict[int, Tensor] = {}
    for r, s in enumerate(shards):
        for i, ch in enumerate(shard_chunks(r, world, layout)):
            chunks[ch] = s.narrow(dim, i * c, c)
    full = torch.cat([chunks[i] for i in range(world * n)], dim=dim)
    if seq_len is not None:
        if padded_length(seq_len, world, layout) != full.shape[dim]:
            raise ValueError(
                f"seq_len={seq_len} does not match the shards: {world} shards of {shard_len} hold "
                f"{full.shape[dim]} positions, and {layout} pads {seq_len} to {padded_length(seq_len, world, layout)}"
            )
        full = full.narrow(dim, 0, seq_len)
    return full
