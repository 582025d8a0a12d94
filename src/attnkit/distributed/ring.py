"""Ring attention: K/V shards travel around the ranks, partial results merge by log-sum-exp.

Forward, on rank r of P (step t = 0 .. P-1): rank r holds the K/V shard of rank
s = (r - t) mod P. It posts the asynchronous send of that shard to rank r+1 and the receive
of the next one from rank r-1, then runs the local attention of its queries against the shard
it holds (through the contract, `attnkit.attention(..., return_lse=True)`, so `auto` picks the
backend), then merges that partial (out_s, lse_s) into its running result:
    lse = logaddexp(lse, lse_s),  out = out * exp(lse_old - lse) + out_s * exp(lse_s - lse)
(a row that has seen nothing stays at out 0, lse -inf; never NaN).

Which local call a (query shard, key shard) pair needs is decided from global positions
(`plan_pair`): pairs with nothing visible are skipped; pairs wholly visible run with no mask;
the diagonal pair runs `causal`/`window` as the contract's own arguments where local and
global positions agree; every other pair (window edges, padding, mask_mod) runs with a
mask_mod that maps local indices to global positions (FlexAttention keeps its block
sparsity; wrappers are cached so its BlockMask cache hits).

Backward (`RingAttentionFunction.backward`): K/V travel the same ring again, with float32 dK/dV
accumulators that travel with them and reach their owner after P hops. Per pair, the
contract's backward from saved statistics (`attnkit.attention_backward`) runs with the
GLOBAL merged output O and log-sum-exp of the rows (and the incoming dlse only when the ring's
lse output was used): P_pair = exp(S_pair - lse) are the pair's entries of the global softmax
and delta = rowsum(dO * O) - dlse is the global row's, so the call returns exactly the pair's
share of dq, dk, dv; no pair's forward is recomputed where the backend reads the statistics
directly (sdpa's kernels, triton, chunked). Nothing of size L x L and no K/V beyond two
shards (plus their gradients) live on a rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._autograd import first_order_only
from .._bounded import put, touch
from ..functional import attention, attention_backward
from ..masks import bounds_allow
from ..request import AttentionRequest, build_request
from ..merge import merge_partial
from ._validate import CPSettings
from .sharding import shard_positions

__all__ = ["ring_forward_backward", "RingCall", "plan_pair", "GlobalMaskMod", "global_mask_mod", "merge_partial"]

_EMPTY, _FULL, _PARTIAL = 0, 1, 2
_WRAPPERS: dict = {}
_WRAPPER_CACHE_SIZE = 256


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- which call per pair
class GlobalMaskMod:
    """A mask_mod over a tile of local indices that decides on global positions.

    Local index ``idx`` of the query (key) tile lies at global position ``idx + starts[0]``
    in its first segment of ``seg`` positions and ``idx - seg + starts[1]`` in the second.
    Positions ``>= seq_len`` are padding (never attend, never attended; the user's mask_mod sees them
    as position seq_len - 1), then causal/window bounds and the user's mask_mod apply on global positions. ``head_offset`` is added to
    the head index (all-to-all attention runs a slice of the heads per rank).
    """

    def __init__(self, q_starts, k_starts, seg, seq_len, bounds, user, head_offset=0):
        self.q_starts, self.k_starts, self.seg = tuple(q_starts), tuple(k_starts), seg
        self.seq_len, self.bounds, self.user, self.head_offset = seq_len, bounds, user, head_offset

    def _pos(self, idx, starts):
        if len(starts) == 1:
            return idx + starts[0] if starts[0] else idx
        return torch.where(idx < self.seg, idx + starts[0], idx + (starts[1] - self.seg))

    def __call__(self, b, h, q_idx, kv_idx):
        i, j = self._pos(q_idx, self.q_starts), self._pos(kv_idx, self.k_starts)
        keep = (i < self.seq_len) & (j < self.seq_len)
        if self.bounds is not None:
            keep = keep & bounds_allow(i, j, 0, *self.bounds)
        if self.user is not None:
            # padding positions (excluded by `keep`) reach the user's mod as the last real one: a mod that
            # indexes a tensor of the true length (document ids, a GroupMask) must not read past it
            last = self.seq_len - 1
            hh = h + self.head_offset if self.head_offset else h
            keep = keep & self.user(b, hh, i.clamp(max=last), j.clamp(max=last))
        return keep


def global_mask_mod(q_starts, k_starts, seg, seq_len, bounds, user, head_offset=0) -> GlobalMaskMod:
    """The cached GlobalMaskMod of these arguments (one object per key, so FlexAttention's BlockMask cache hits)."""
    key = (tuple(q_starts), tuple(k_starts), seg, seq_len, bounds, id(user), head_offset)
    hit = touch(_WRAPPERS, key)
    if hit is not None and hit.user is user:
        return hit
    fn = GlobalMaskMod(q_starts, k_starts, seg, seq_len, bounds, user, head_offset)
    return put(_WRAPPERS, key, fn, _WRAPPER_CACHE_SIZE)


@dataclass(frozen=True)
class RingCall:
    """One local attention call: q rows [q_lo, q_hi) against k/v rows [k_lo, k_hi), with kwargs."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    kwargs: dict = field(default_factory=dict)
    kind: str = "full"  # "full" (no mask), "diagonal" (causal/window as given), "masked" (global mask_mod)

    def pairs(self) -> int:
        return (self.q_hi - self.q_lo) * (self.k_hi - self.k_lo)


def _classify(s: CPSettings, qg: int, kg: int, c: int) -> int:
    """EMPTY / FULL / PARTIAL for c queries from global qg against c keys from global kg."""
    L = s.seq_len
    if qg >= L or kg >= L:
        return _EMPTY
    q_last, k_last = min(qg + c, L) - 1, min(kg + c, L) - 1
    bounds = s.bounds
    left, right = bounds if bounds is not None else (None, None)
    if right is not None and kg > q_last + right:
        return _EMPTY
    if left is not None and k_last < qg - left:
        return _EMPTY
    full = s.mask_mod is None and qg + c <= L and kg + c <= L
    full = full and (right is None or kg + c - 1 <= qg + right) and (left is None or kg >= qg + c - 1 - left)
    return _FULL if full else _PARTIAL


def plan_pair(s: CPSettings, q_rank: int, k_rank: int) -> RingCall | None:
    """The local call of q_rank's queries against k_rank's keys, or None when nothing is visible."""
    qsegs = shard_positions(q_rank, s.world, s.layout, s.shard_len)
    ksegs = shard_positions(k_rank, s.world, s.layout, s.shard_len)
    c = qsegs[0][1]
    kinds = [[_classify(s, qg, kg, c) for kg, _ in ksegs] for qg, _ in qsegs]
    rows = [i for i in range(len(qsegs)) if any(x != _EMPTY for x in kinds[i])]
    cols = [j for j in range(len(ksegs)) if any(kinds[i][j] != _EMPTY for i in range(len(qsegs)))]
    if not rows:
        return None
    # With at most two segments per shard, the used segments are contiguous in local order.
    q_lo, q_hi, k_lo, k_hi = rows[0] * c, (rows[-1] + 1) * c, cols[0] * c, (cols[-1] + 1) * c
    if all(kinds[i][j] == _FULL for i in rows for j in cols):
        return RingCall(q_lo, q_hi, k_lo, k_hi)
    whole = len(rows) == len(qsegs) and len(cols) == len(ksegs)
    unpadded = max(g + n for g, n in qsegs) <= s.seq_len
    if q_rank == k_rank and whole and unpadded and s.mask_mod is None and (
        s.layout == "contiguous" or s.window is None
    ):
        # Local order is global order and the shard is one run (contiguous), or only causal
        # applies (zigzag keeps the order, so j <= i locally iff globally).
        return RingCall(q_lo, q_hi, k_lo, k_hi, {"causal": s.causal, "window": s.window}, "diagonal")
    fn = global_mask_mod([qsegs[i][0] for i in rows], [ksegs[j][0] for j in cols], c, s.seq_len, s.bounds,
                         s.mask_mod)
    return RingCall(q_lo, q_hi, k_lo, k_hi, {"mask_mod": fn}, "masked")


# --------------------------------------------------------------------------- communication
class _Ring:
    """Point-to-point exchanges with the ring neighbours (rank + 1 receives what we send)."""

    def __init__(self, s: CPSettings):
        import torch.distributed as dist

        self.dist, self.group, self.world, self.rank = dist, s.group, s.world, s.rank

        def glob(r: int) -> int:
            return r if s.group is None else dist.get_global_rank(s.group, r)

        self.next, self.prev = glob((s.rank + 1) % s.world), glob((s.rank - 1) % s.world)

    def start(self, send: list[Tensor], recv: list[Tensor], tag: int) -> list:
        """Post send[i] -> next and recv[i] <- prev (tags tag + i); returns the works to wait on."""
        dist = self.dist
        ops = []
        for i, (a, b) in enumerate(zip(send, recv)):
            ops.append(dist.P2POp(dist.isend, a, self.next, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, b, self.prev, self.group, tag + i))
        return dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for w in works or ():
        w.wait()


def _pair(bufs: list[list[Tensor]], step: int) -> list[Tensor]:
    return bufs[step % 2]


# --------------------------------------------------------------------------- forward / backward
def _local(s: CPSettings, call: RingCall, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return attention(
        q[:, :, call.q_lo:call.q_hi], k[:, :, call.k_lo:call.k_hi], v[:, :, call.k_lo:call.k_hi],
        scale=s.scale, softcap=s.softcap, return_lse=True, backend=s.backend, **call.kwargs,
    )


def ring_forward(s: CPSettings, plan: list[RingCall | None], q: Tensor, k: Tensor, v: Tensor):
    """(out in q's dtype, lse float32/64) of q against every rank's K/V; plan[src] is the call per source rank."""
    ct = acc_dtype(q.dtype)
    B, Hq, Ls, _ = q.shape
    out = torch.zeros(B, Hq, Ls, v.shape[-1], dtype=ct, device=q.device)
    lse = torch.full((B, Hq, Ls), float("-inf"), dtype=ct, device=q.device)
    ring = _Ring(s) if s.world > 1 else None
    cur = [k.contiguous(), v.contiguous()]
    bufs = [[torch.empty_like(t) for t in cur] for _ in range(2 if ring is not None else 0)]
    for step in range(s.world):
        src = (s.rank - step) % s.world
        works = ring.start(cur, _pair(bufs, step), 0) if step < s.world - 1 else None
        call = plan[src]
        if call is not None:
            o, l = _local(s, call, q, *cur)
            merge_partial(out[:, :, call.q_lo:call.q_hi], lse[:, :, call.q_lo:call.q_hi], o, l)
        _wait(works)
        if works is not None:
            cur = _pair(bufs, step)
    return out.to(q.dtype), lse


def ring_backward(s: CPSettings, plan: list[RingCall | None], q, k, v, out, lse, dout, dlse):
    """(dq, dk, dv) of the ring forward; dK/dV accumulators travel with the K/V shards.

    out, lse: the merged (global) forward results of this rank's rows; dlse None unless the
    ring's lse output was used downstream.
    """
    ct = acc_dtype(q.dtype)
    dout = torch.zeros_like(out) if dout is None else dout.to(out.dtype)
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    ring = _Ring(s) if s.world > 1 else None
    cur = [k.contiguous(), v.contiguous()]
    bufs = [[torch.empty_like(t) for t in cur] for _ in range(2 if ring is not None else 0)]
    dkv = [[torch.zeros(k.shape, dtype=ct, device=k.device), torch.zeros(v.shape, dtype=ct, device=v.device)]]
    if ring is not None:
        dkv.append([torch.empty_like(t) for t in dkv[0]])
    dkv_works = None
    for step in range(s.world):
        src = (s.rank - step) % s.world
        works = ring.start(cur, _pair(bufs, step), 0) if step < s.world - 1 else None
        call = plan[src]
        grads = None
        if call is not None:
            grads = _pair_grads(s, call, q, cur[0], cur[1], out, lse, dout, dlse, dq)
        _wait(dkv_works)  # the accumulator of this shard, from rank - 1 (step > 0)
        acc = _pair(dkv, step)
        if grads is not None:
            acc[0][:, :, call.k_lo:call.k_hi] += grads[0]
            acc[1][:, :, call.k_lo:call.k_hi] += grads[1]
        if ring is not None:  # pass it on; after the last step it reaches the shard's owner
            dkv_works = ring.start(acc, _pair(dkv, step + 1), 2)
        _wait(works)
        if works is not None:
            cur = _pair(bufs, step)
    _wait(dkv_works)
    dk, dv = _pair(dkv, s.world) if ring is not None else dkv[0]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _pair_grads(s: CPSettings, call: RingCall, q, k, v, out, lse, dout, dlse, dq) -> tuple[Tensor, Tensor]:
    """One pair's share of the gradients from the global statistics; dq accumulates in place."""
    rows, cols = slice(call.q_lo, call.q_hi), slice(call.k_lo, call.k_hi)
    gq, gk, gv = attention_backward(
        dout[:, :, rows], q[:, :, rows], k[:, :, cols], v[:, :, cols], out[:, :, rows], lse[:, :, rows],
        dlse=None if dlse is None else dlse[:, :, rows], scale=s.scale, softcap=s.softcap, backend=s.backend,
        **call.kwargs,
    )
    dq[:, :, rows] += gq
    return gk, gv


class RingAttentionFunction(torch.autograd.Function):
    """Ring attention forward and backward over the shards of one sequence (see the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, s: CPSettings, plan: list):
        out, lse = ring_forward(s, plan, q, k, v)
        ctx.set_materialize_grads(False)  # an unused lse gets dlse None: no dlse work in the backward
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.settings, ctx.plan = s, plan
        return out, lse

    @staticmethod
    @first_order_only("ring attention")
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.settings, ctx.plan, q, k, v, out, lse, dout, dlse)
        return dq, dk, dv, None, None


def local_requests(s: CPSettings, q: Tensor, k: Tensor, v: Tensor) -> list[AttentionRequest]:
    """The requests of this rank's local calls (forward, and `attention_backward` where a gradient
    is wanted), for `check_call` to try against a forced backend before any exchange."""
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    reqs = []
    for src in range(s.world):
        call = plan_pair(s, s.rank, src)
        if call is None:
            continue
        args = (q[:, :, call.q_lo:call.q_hi], k[:, :, call.k_lo:call.k_hi], v[:, :, call.k_lo:call.k_hi])
        kw = dict(scale=s.scale, softcap=s.softcap, return_lse=True, **call.kwargs)
        with torch.no_grad():  # the forward runs in the ring's autograd Function, without grad
            reqs.append(build_request(*(t.detach() for t in args), **kw))
        if grads:
            reqs.append(build_request(*(t.detach() for t in args), for_backward=True, **kw))
    return reqs


def ring_forward_backward(s: CPSettings, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of the ring over this rank's shards; differentiable wrt q, k, v."""
    plan = [plan_pair(s, s.rank, src) for src in range(s.world)]
    return RingAttentionFunction.apply(q, k, v, s, plan)
