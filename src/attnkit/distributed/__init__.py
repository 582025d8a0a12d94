"""Context parallelism: attention over a sequence sharded across the ranks of a torch.distributed group.

    import attnkit.distributed as cp
    q_loc = cp.shard_sequence(q, rank, world, layout="zigzag")          # [B, H, L, D] -> [B, H, Lpad/P, D]
    out_loc = cp.ring_attention(q_loc, k_loc, v_loc, causal=True, layout="zigzag", seq_len=L)
    out = cp.unshard_sequence(out_loc, layout="zigzag", seq_len=L)      # all-gathered [B, H, L, D]

Two strategies, selectable by name in `context_parallel_attention(..., strategy=)`:
- "ring" (`ring_attention`): K/V shards travel around the ring with asynchronous
  point-to-point sends overlapped with the local attention; partial results merge by
  log-sum-exp; backward as its own autograd Function. No rank ever holds more than two
  K/V shards (and their gradients).
- "all_to_all" (`all_to_all_attention`, DeepSpeed-Ulysses style): all-to-all from sequence
  shards to head shards, one local attention over the whole sequence, all-to-all back.
  Needs the query heads divisible by the world size.

Both call the contract (`attnkit.attention`) for the local work, so `backend="auto"` picks
the local kernel; both see global positions in causal, window and mask_mod; both take the
true sequence length as `seq_len=` (padding positions are masked as keys, give 0 as queries).
"""

from __future__ import annotations

from torch import Tensor

from ..request import MaskMod
from ._validate import check_call
from .sharding import LAYOUTS, padded_length, shard_chunks, shard_positions, shard_sequence, unshard_sequence

__all__ = [
    "ring_attention", "all_to_all_attention", "context_parallel_attention", "STRATEGIES", "LAYOUTS",
    "shard_sequence", "unshard_sequence", "padded_length", "shard_chunks", "shard_positions",
]

STRATEGIES = ("ring", "all_to_all")

_DOC_ARGS = """
    Args:
        q: this rank's query shard [B, Hq, Ls, D]; k, v: its K/V shards [B, Hkv, Ls, D|Dv]
            (the same Ls on every rank; `shard_sequence` cuts and pads a full sequence).
        group: the process group (default: the world); every rank of it must call.
        causal, window, scale, softcap: as in `attnkit.attention`, on global positions of the
            whole sequence (Lq == Lk there, so causal is plain j <= i).
        mask_mod: FlexAttention-style `(b, h, q_idx, kv_idx) -> bool` called with GLOBAL
            positions and global query head indices.
        return_lse: also return the float32 log-sum-exp [B, Hq, Ls] of this rank's rows
            (-inf for rows that see nothing, padding included); differentiable.
        layout: "contiguous" (rank r holds chunk r of P) or "zigzag" (chunks r and 2P-1-r of 2P:
            balanced under causal masks).
        seq_len: the true total length when the shards were padded (default P * Ls): keys at
            positions >= seq_len are masked and those query rows return 0.
        backend: the contract backend of the local attention calls ("auto" by default).

    Bad input (an uninitialised process group, shards of different shapes on different ranks,
    any argument one rank rejects) raises on every rank before any data moves, never a hang.

    Returns:
        out [B, Hq, Ls, Dv] in q's dtype (this rank's rows), or (out, lse) with return_lse.
"""


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False, window=None, scale: float | None = None,
    softcap: float | None = None, mask_mod: MaskMod | None = None, return_lse: bool = False,
    layout: str = "contiguous", seq_len: int | None = None, backend: str = "auto",
):
    from .ring import local_requests, ring_forward_backward

    s = check_call("ring_attention", q, k, v, group=group, causal=causal, window=window, scale=scale,
                   softcap=softcap, mask_mod=mask_mod, return_lse=return_lse, layout=layout, seq_len=seq_len,
                   backend=backend, heads_per_rank=False, local_requests=lambda s: local_requests(s, q, k, v))
    out, lse = ring_forward_backward(s, q, k, v)
    return (out, lse) if return_lse else out


def all_to_all_attention(
    q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False, window=None, scale: float | None = None,
    softcap: float | None = None, mask_mod: MaskMod | None = None, return_lse: bool = False,
    layout: str = "contiguous", seq_len: int | None = None, backend: str = "auto",
):
    from .all_to_all import all_to_all_forward, local_requests

    s = check_call("all_to_all_attention", q, k, v, group=group, causal=causal, window=window, scale=scale,
                   softcap=softcap, mask_mod=mask_mod, return_lse=return_lse, layout=layout, seq_len=seq_len,
                   backend=backend, heads_per_rank=True,
                   local_requests=lambda s: local_requests(s, q, k, v, return_lse))
    out, lse = all_to_all_forward(s, q, k, v, return_lse)
    return (out, lse) if return_lse else out


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, *, strategy: str = "ring", **kwargs):
    """`ring_attention` (strategy="ring") or `all_to_all_attention` (strategy="all_to_all"), same arguments."""
    if strategy == "ring":
        return ring_attention(q, k, v, **kwargs)
    if strategy == "all_to_all":
        return all_to_all_attention(q, k, v, **kwargs)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")


ring_attention.__doc__ = (
    """Attention over a sequence sharded across ranks; K/V shards travel around a ring.

    Each step posts the asynchronous send/receive of the next K/V shard (only the Hkv heads
    travel), then runs this rank's queries against the shard it holds through the contract
    with return_lse=True, and merges the partial result by log-sum-exp. Pairs of shards with
    nothing visible are skipped. The backward pass is its own autograd Function: per pair one
    `attnkit.attention_backward` with the rows' global output and lse (the pair's share of the
    gradient, no forward recomputed on sdpa / triton / chunked); dK/dV accumulate while
    travelling around the ring.
""" + _DOC_ARGS)
all_to_all_attention.__doc__ = (
    """Attention over a sequence sharded across ranks, by all-to-all head parallelism (Ulysses).

    All-to-all turns the sequence shards of every head into the whole sequence of Hq / P heads,
    one call of the contract runs the attention, all-to-all turns it back. Needs Hq divisible
    by the world size (ValueError on every rank otherwise); K/V heads are repeated when Hkv is
    not a multiple of the world size. Holds the full sequence of Hq / P heads per rank.
""" + _DOC_ARGS)
