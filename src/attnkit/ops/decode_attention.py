"""Split-KV decoding (FlashDecoding) in Triton: a few queries per sequence against a long KV cache.

q [B, Hq, Lq, D] (Lq <= 16: one new token, or a few for speculative decoding) against

- a contiguous cache k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], or
- a paged pool k [num_blocks, Hkv, block_size, D], v [..., Dv] read through
  block_table [B, max_blocks] (PagedKVCache's layout): logical key t of sequence b lives in
  block block_table[b, t // block_size] at slot t % block_size,

with per-sequence lengths cache_seqlens [B] (None: every sequence has all Lk keys). Causal and
window bounds are aligned per sequence: query i of sequence b sits at key position
cache_seqlens[b] - Lq + i. Softcap, sink logits (they join the denominator) and the
log-sum-exp as in the contract. Forward only.

Work: one program per (batch x kv head x row block, split). A program's rows are the
Hq / Hkv query heads of its kv head times the Lq queries, the M dimension of one tl.dot, so
each K/V tile is read once for the whole GQA group. The keys sequence b's queries may see,
[lo_b, len_b) (lo_b > 0 only under a window), are cut into BLOCK_N tiles and the tiles dealt
into num_splits contiguous runs of equal size, so the splits of a sequence share its work
whatever its length; tiles past its length or left of its window are never visited, and a
split with no tile writes an empty partial. num_splits comes from B * Hkv and the *logical*
key length only, never from the lengths' values (no device sync: a decode step stays
capturable in a CUDA graph), so that small batches with long caches fill the GPU.

Each split writes a float32 partial output (already normalised) and its log-sum-exp, then
counts itself in its row block's arrival counter; the split that arrives last merges the block's
partials by log-sum-exp and adds the sinks to the denominator, so a decode call is one launch
(a separate merge kernel, its launch and ramp, cost the H100's split rows 0.1-4% of a call:
docs/benchmarks.md, "The merge inside the split kernel"). On a GPU the counters live per
(device, stream), and each launch leaves them at zero. With one split the program finishes its
rows itself.

A paged tile may span several pages (block_size < BLOCK_N): then each key's block id is read
from the table, masked past the sequence's length, so that padding entries such as -1 are never
dereferenced. Or it lies inside one page (block_size >= BLOCK_N): then one id per tile, and
the rows' offsets are affine as in a contiguous cache.

float16/bfloat16 multiply in their own type with float32 accumulation; float32 in IEEE
float32 (no tf32).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.runtime import driver
except ImportError:  # pragma: no cover - triton is a hard dependency on Linux
    triton = tl = driver = None

from .._bounded import put
from ._launch import INTERPRET, Launch, block_dim as _pow2, cdiv as _cdiv, next_pow2 as _p2, on_device as _on

__all__ = ["decode_attention", "num_splits_for", "TRITON_ERROR", "MAX_LQ"]

TRITON_ERROR = None if triton is not None else "triton is not installed"
MAX_LQ = 16  # queries per sequence the kernel takes (request.DECODE_MAX_LQ)
MAX_SPLITS = 128
# A split reads at least this many keys: below it the merge and the partials cost more
# than the parallelism gains (H100, bf16, 2026-11-23: B8 x 1k paged, 1 split 1244 GB/s, 4 splits 749).
MIN_KEYS_PER_SPLIT = 1024
_LOG2E = 1.4426950408889634

_INTERPRET = INTERPRET

if triton is not None:
    from .flash_attention import _mm, _tanh  # the same products and tanh as the flash kernels

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, LENS, BT, SINKS, O, LSE, W, CNT,
        skb, skh, skn, skd, svb, svh, svn, svd, LK,  # a contiguous cache's: given per call (_plan)
        sqb, sqh, sqm, sqd, sbtb, sbtn, sob, soh, som, sod,
        Hq, Hkv, G, Lq, NUM_MBLOCKS, NUM_SPLITS, W_LSE, scale, softcap, left, right,
        HAS_LENS: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
        FINAL: tl.constexpr, STORE_LSE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, MERGE_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        mblk = pid % NUM_MBLOCKS
        bhk = pid // NUM_MBLOCKS
        hk = (bhk % Hkv).to(tl.int64)
        b = (bhk // Hkv).to(tl.int64)

        # rows: query head g of the group (h = hk * G + g) x query i
        r = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = r < G * Lq
        g = r // Lq
        i = r % Lq
        h = hk * G + g
        dq = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqm + dq[None, :] * sqd,
                    mask=row_ok[:, None] & (dq[None, :] < D), other=0.0)

        if HAS_LENS:
            seqlen = tl.load(LENS + b).to(tl.int32)
        else:
            seqlen = LK
        qpos = seqlen - Lq + i  # per-sequence bottom-right alignment
        # the keys some row of the block may see: [lo, seqlen) (right >= 0, so never past seqlen)
        lo = 0
        if HAS_LEFT:
            first = seqlen - Lq + tl.min(tl.where(row_ok, i, Lq), 0)
            lo = tl.maximum(first - left, 0)
        t0 = lo // BLOCK_N
        n_tiles = tl.maximum(tl.cdiv(seqlen, BLOCK_N) - t0, 0)
        per = tl.cdiv(n_tiles, NUM_SPLITS)
        t_start = t0 + split * per
        t_end = tl.minimum(t_start + per, t0 + n_tiles)

        k_base = K + hk * skh
        v_base = V + hk * svh
        if not PAGED:
            k_base += b * skb
            v_base += b * svb
        bt_row = BT + b * sbtb

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if FINAL and HAS_SINKS:  # the sink logit opens the softmax: in the denominator, with no value
            m_i = tl.load(SINKS + h, mask=row_ok, other=float("-inf")).to(tl.float32)
            l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for t in range(t_start, t_end):
            offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            key_ok = offs_n < seqlen
            if PAGED and PAGE >= BLOCK_N:  # the tile lies in one page: one block id, rows as in a contiguous cache
                blk = tl.load(bt_row + (t * BLOCK_N // PAGE) * sbtn).to(tl.int64)  # t * BLOCK_N < seqlen
                slot = (t * BLOCK_N) % PAGE + tl.arange(0, BLOCK_N)
                k_rows = blk * skb + slot * skn
                v_rows = blk * svb + slot * svn
            elif PAGED:  # each key's block from the table; entries past the length are never read
                blk = tl.load(bt_row + (offs_n // PAGE) * sbtn, mask=key_ok, other=0).to(tl.int64)
                k_rows = blk * skb + (offs_n % PAGE) * skn
                v_rows = blk * svb + (offs_n % PAGE) * svn
            else:
                k_rows = offs_n.to(tl.int64) * skn
                v_rows = offs_n.to(tl.int64) * svn
            k = tl.load(k_base + k_rows[:, None] + dq[None, :] * skd,
                        mask=key_ok[:, None] & (dq[None, :] < D), other=0.0)
            v = tl.load(v_base + v_rows[:, None] + dv[None, :] * svd,
                        mask=key_ok[:, None] & (dv[None, :] < DV), other=0.0)
            s = _mm(q, tl.trans(k), PRECISION, UPCAST) * scale
            if SOFTCAP:
                s = softcap * _tanh(s * (1.0 / softcap), PRECISION)
            ok = key_ok[None, :]
            if HAS_LEFT:
                ok = ok & (offs_n[None, :] >= (qpos - left)[:, None])
            if HAS_RIGHT:
                ok = ok & (offs_n[None, :] <= (qpos + right)[:, None])
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
            p = tl.exp2((s - m_use[:, None]) * 1.4426950408889634)
            alpha = tl.exp2((m_i - m_use) * 1.4426950408889634)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, UPCAST)
            m_i = m_new

        dead = l_i == 0.0
        out = acc / tl.where(dead, 1.0, l_i)[:, None]
        lse = tl.where(dead, float("-inf"), m_i + tl.log(tl.where(dead, 1.0, l_i)))
        if FINAL:
            tl.store(O + b * sob + h[:, None] * soh + i[:, None] * som + dv[None, :] * sod,
                     out.to(O.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
            if STORE_LSE:
                tl.store(LSE + (b * Hq + h) * Lq + i, lse, mask=row_ok)
        else:  # the partials of rows x splits: outputs [B * Hq * Lq, splits, DV] at W, their lse at W + W_LSE
            prow = ((b * Hq + h) * Lq + i) * NUM_SPLITS + split
            tl.store(W + prow[:, None] * DV + dv[None, :], out, mask=row_ok[:, None] & (dv[None, :] < DV))
            tl.store(W + W_LSE + prow, lse, mask=row_ok)
            # The last split of this row block to finish merges them all: no second launch. The barrier
            # orders every thread's stores before the release; the acquire orders the reads after the others'.
            tl.debug_barrier()
            arrived = tl.atomic_add(CNT + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == NUM_SPLITS - 1:
                tl.store(CNT + pid, 0)  # back to zero for the next launch on this stream
                if MERGE_ROWS == BLOCK_R:  # the usual case (a few rows): one pass, no loop
                    _merge_splits(W, SINKS, O, LSE, b, hk, mblk * BLOCK_M, Hq, G, Lq, NUM_SPLITS, W_LSE,
                                  sob, soh, som, sod, HAS_SINKS, STORE_LSE, DV, BLOCK_R, BLOCK_S, BLOCK_DV)
                else:  # BLOCK_R rows at a time, in a loop (unrolled, the passes' registers would add up)
                    for r0 in range(0, MERGE_ROWS, BLOCK_R):
                        _merge_splits(W, SINKS, O, LSE, b, hk, mblk * BLOCK_M + r0, Hq, G, Lq, NUM_SPLITS, W_LSE,
                                      sob, soh, som, sod, HAS_SINKS, STORE_LSE, DV, BLOCK_R, BLOCK_S, BLOCK_DV)

    @triton.jit
    def _merge_splits(W, SINKS, O, LSE, b, hk, first, Hq, G, Lq, NUM_SPLITS, W_LSE, sob, soh, som, sod,
                      HAS_SINKS: tl.constexpr, STORE_LSE: tl.constexpr, DV: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
        """Rows first .. first + BLOCK_R of kv head hk's group (of sequence b) from all splits' partials,
        merged online by log-sum-exp: out = sum_s exp(lse_s - lse) out_s, lse = log(sum_s exp(lse_s) +
        exp(sink)). BLOCK_S splits at a time, their loads in flight together; BLOCK_R and BLOCK_S are
        small enough that the merge needs no more registers than the key loop before it. The partials
        come from other programs: read past L1 (.cg)."""
        r = first + tl.arange(0, BLOCK_R)
        row_ok = r < G * Lq
        i = r % Lq
        h = hk * G + r // Lq
        row = (b * Hq + h) * Lq + i
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_DV)
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        den = tl.zeros([BLOCK_R], tl.float32)
        if HAS_SINKS:  # the sink opens the denominator with no value
            m = tl.load(SINKS + h, mask=row_ok, other=float("-inf")).to(tl.float32)
            den = tl.where(m == float("-inf"), 0.0, 1.0)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            ok = row_ok[:, None] & (s0 + s[None, :] < NUM_SPLITS)
            prow = row[:, None] * NUM_SPLITS + s0 + s[None, :]  # [BLOCK_R, BLOCK_S]
            ls = tl.load(W + W_LSE + prow, mask=ok, other=float("-inf"), cache_modifier=".cg")  # -inf: empty split
            o = tl.load(W + prow[:, :, None] * DV + d[None, None, :], mask=ok[:, :, None] & (d[None, None, :] < DV),
                        other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m, tl.max(ls, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_use)
            w = tl.exp(ls - m_use[:, None])
            den = den * alpha + tl.sum(w, 1)
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
            m = m_new
        dead = den == 0.0
        out = acc / tl.where(dead, 1.0, den)[:, None]
        lse = tl.where(dead, float("-inf"), m + tl.log(tl.where(dead, 1.0, den)))
        tl.store(O + b * sob + h[:, None] * soh + i[:, None] * som + d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & (d[None, :] < DV))
        if STORE_LSE:
            tl.store(LSE + row, lse, mask=row_ok)


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: few programs run fastest
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


# Split programs the wave rule below counts per SM: two, which keep the memory busy (the paged
# D <= 128 bf16 config takes 191 registers, so two fit; the contiguous one fits three), while fewer
# splits mean longer runs and fewer partials (H100, bf16, paged, kernel-only, 2026-11-23: B32 x 8k, 256 programs:
# 1 split 2934-2951 GB/s, 3 splits 2857-2888; B8 x 32k-128k: 4 splits 2889-3021, 6 splits 2687-2988;
# B1 x 128k: 33 splits 2748-2750, 48 splits 2508-2686).
PROGRAMS_PER_SM = 2


def num_splits_for(programs: int, len_k: int, device: torch.device) -> int:
    """Splits per sequence, so that the split programs fill whole waves of PROGRAMS_PER_SM per SM:
    the fewest splits whose programs fill >= 95% of their last wave, else the best-filled count.
    A last wave that is partly filled leaves SMs idle while it runs: B1 x 128k had 8 programs x 66
    splits = 1.33 waves. Each split reads at least MIN_KEYS_PER_SPLIT keys of the logical length,
    and at most MAX_SPLITS splits; with two full waves or more, one split. Depends on shapes only
    (never on the lengths' values: no device sync)."""
    slots = PROGRAMS_PER_SM * _sm_count(device)
    programs = max(programs, 1)
    s_max = _split_cap(len_k)
    if programs >= 2 * slots:
        return 1
    best, best_fill = 1, 0.0
    for s in range(1, s_max + 1):
        waves = s * programs / slots
        fill = waves / math.ceil(waves)  # busy fraction of the slots over the waves
        if fill >= 0.95:
            return s
        if fill > best_fill:
            best, best_fill = s, fill
    return best


def _split_cap(len_k: int) -> int:
    """The most splits num_splits_for gives a logical key length: all it reads of that length."""
    return max(1, min(_cdiv(len_k, MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def _config(d: int, dv: int, f32: bool, rows: int, paged: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Memory-bound: large key tiles, several stages in
    flight; the rows (query heads of a group x queries) fill one M tile of 16 to 64.

    Paged tiles need more stages for the same bytes in flight: their K/V addresses come from a
    block-table load, which the pipeliner schedules stages ahead of them, so at 3 stages K and V had
    one buffer each (39 KB of shared memory against the contiguous kernel's 72 KB). 64-key tiles at
    5 stages gave them two (H100, bf16, D = 128, page 16, kernel-only, 2026-11-23: B8 x 32k 2153 ->
    2722 GB/s); 128-key tiles at 4 stages (74 KB) are as fast or up to 3% faster with the split rule
    of PROGRAMS_PER_SM = 2 (B128 x 8k 2946 -> 3031; B1 x 128k 2750 -> 2748; B1 x 8k 754 -> 734).
    Those numbers are for pages smaller than the tile. With 128-token pages (one block id per tile),
    3 and 4 stages measured within 1% (docs/results/tune_decode_page128_h100_2026-11-23.txt)."""
    block_m = min(64, max(16, _p2(rows)))
    if _INTERPRET:
        return block_m, 16, 1, 1  # small key tiles: the tests' short caches still span several
    dmax = max(d, dv)
    if f32:
        return block_m, 32, 4, 2
    if dmax <= 64:
        return block_m, 128, 4, 3
    if dmax <= 128:
        return (block_m, 128, 4, 4) if paged else (block_m, 64, 4, 3)
    return block_m, 32, 4, 2


class _Plan:
    """Everything a decode call derives from its key (shapes, strides, dtype, flags): the outputs'
    layouts and the launch. Kept per key, so a decode step repeating the last one's shapes
    only allocates and launches."""

    __slots__ = ("out_size", "out_stride", "lse_size", "w_size", "split", "programs")


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 256


def decode_attention(q: Tensor, k: Tensor, v: Tensor, *, cache_seqlens: Tensor | None = None,
                     block_table: Tensor | None = None, scale: float | None = None,
                     softcap: float | None = None, sinks: Tensor | None = None,
                     bounds: tuple[int | None, int | None] | None = None,
                     num_splits: int | None = None, return_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """Split-KV decode attention (forward only; inputs are assumed checked by the contract).

    q [B, Hq, Lq, D] with Lq <= 16; k/v contiguous [B, Hkv, Lk, D|Dv], or a block pool
    [num_blocks, Hkv, block_size, D|Dv] with block_table int32 [B, max_blocks] (then
    cache_seqlens is required). cache_seqlens int32/int64 [B]: valid keys per sequence (None:
    all). bounds: (left, right) key offsets around each sequence's diagonal (None side =
    unbounded; right >= 0). num_splits: override the heuristic (tests).
    Returns (out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] float32, -inf on empty rows);
    lse is None when not return_lse (then it is neither stored nor allocated).
    """
    if triton is None:
        raise RuntimeError(TRITON_ERROR)
    # The kernels read lens[b] and sinks[h] at b and h: a strided or expanded view (stride 0) would be
    # misread, or read past its storage. contiguous() is free for the usual contiguous tensors.
    if cache_seqlens is not None:
        cache_seqlens = cache_seqlens.contiguous()
    if sinks is not None:
        sinks = sinks.contiguous()
    paged = block_table is not None
    device = q.device
    # What the plan derives from; the heuristic and the interpreter flag too (tests swap them). A contiguous
    # cache's length and strides are given per launch instead: a cache that grows by a token per step (a
    # model's own cache, passed as plain tensors) then reuses one plan, rebuilt only when the split rule's
    # cap moves (every MIN_KEYS_PER_SPLIT keys), not one plan and one launch through Triton's slow path
    # per step. (The split count reads nothing else of the length; num_splits, from the tests, is
    # clipped to the key tiles.)
    if paged:
        kv_key, kv_ints = (k.shape, k.stride(), v.shape, v.stride(), block_table.shape, block_table.stride()), ()
    else:
        Lk = k.shape[2]
        kv_key = (k.shape[:2], k.shape[3], v.shape[3], _split_cap(Lk) if num_splits is None else Lk)
        kv_ints = (*k.stride(), *v.stride(), Lk)
    key = (q.shape, q.stride(), kv_key, q.dtype, cache_seqlens is not None, sinks is not None, scale, softcap,
           bounds, num_splits, return_lse, num_splits_for, _INTERPRET, device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(q, k, v, block_table, cache_seqlens is not None, scale, softcap, sinks is not None,
                     bounds, num_splits, return_lse)
        put(_PLANS, key, plan, _MAX_PLANS)

    # Two allocations per step at most (each costs microseconds of host time): out, and the
    # partials when there are several splits; lse only when asked for.
    out = torch.empty_strided(plan.out_size, plan.out_stride, dtype=q.dtype, device=device)
    lse = torch.empty(plan.lse_size, device=device, dtype=torch.float32) if return_lse else None
    lens = cache_seqlens if cache_seqlens is not None else q  # any pointer when unused: never read
    bt = block_table if paged else q
    sk = sinks if sinks is not None else q
    lse_ = lse if return_lse else out
    with _on(q):
        if not plan.programs:  # one split: the split kernel writes the output itself
            plan.split(q, k, v, lens, bt, sk, out, lse_, out, out, ints=kv_ints)
        else:
            w = torch.empty(plan.w_size, device=device, dtype=torch.float32)
            plan.split(q, k, v, lens, bt, sk, out, lse_, w, _counters(device, plan.programs), ints=kv_ints)
    return out, lse


_COUNTERS: dict[tuple, Tensor] = {}
_MAX_COUNTERS = 64  # sets kept: torch pools 32 streams per priority and device


def _counters(device: torch.device, n: int) -> Tensor:
    """n zeroed int32 arrival counters for the split programs (one per row block). Every launch leaves
    them at zero (the last split of a row block resets its counter), so the launches of one stream,
    which run in order, share one set: one per (device, stream), never a fill per call. While a CUDA
    graph is being captured, a fresh set per call instead (its zero fill is captured with it, and the
    graph's memory pool holds it as it holds the partials), so graphs replayed on other streams
    never share counters with each other or with eager calls."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        # The interpreter: a launch stopped part-way (an exception, Ctrl-C) would leave counts behind
        # for every later call, where on a GPU it ends the context; zeros cost nothing next to it.
        return torch.zeros(n, device=device, dtype=torch.int32)
    # Streams by their raw handle: one that is destroyed while its work still runs and whose handle
    # comes back (an ExternalStream) would share a set; torch's own streams are pooled, never destroyed.
    key = (device.index, driver.active.get_current_stream(device.index))
    c = _COUNTERS.get(key)
    if c is None or c.numel() < n:  # a smaller set goes back to its stream's pool, in stream order
        # Streams come and go (ExternalStream handles): past _MAX_COUNTERS the oldest set is dropped. Its
        # memory returns to its stream's pool in stream order, after the launches that use it.
        c = put(_COUNTERS, key, torch.zeros(max(n, 1024), device=device, dtype=torch.int32), _MAX_COUNTERS)
    return c


def _plan(q: Tensor, k: Tensor, v: Tensor, block_table: Tensor | None, has_lens: bool, scale: float | None,
          softcap: float | None, has_sinks: bool, bounds, num_splits: int | None, store_lse: bool) -> _Plan:
    B, Hq, Lq, D = q.shape
    Hkv, DV = k.shape[1], v.shape[3]
    paged = block_table is not None
    if paged and not has_lens:
        raise ValueError("decode_attention: block_table needs cache_seqlens")
    if Lq > MAX_LQ:
        raise ValueError(f"decode_attention takes at most {MAX_LQ} queries per sequence, got Lq={Lq}")
    page = k.shape[2] if paged else 1
    if page & (page - 1):
        raise ValueError(f"decode_attention: the block size must be a power of two, got {page}")
    LK = block_table.shape[1] * page if paged else k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    G = Hq // Hkv
    rows = G * Lq
    f32 = q.dtype == torch.float32
    bm, bn, warps, stages = _config(D, DV, f32, rows, paged)
    n_mblocks = _cdiv(rows, bm)
    br = min(bm, _p2(rows), max(1, 2048 // _pow2(DV)))  # rows the merge takes at a time (see BLOCK_S)
    programs = B * Hkv * n_mblocks
    S = num_splits if num_splits is not None else num_splits_for(programs, LK, q.device)
    S = max(1, min(int(S), _cdiv(LK, bn)))
    left, right = bounds if bounds is not None else (None, None)

    p = _Plan()
    # out: [B, Lq, Hq, Dv] in memory (flash-attn's layout), so that merging heads afterwards is a free view
    p.out_size, p.out_stride = (B, Hq, Lq, DV), (Lq * Hq * DV, DV, Hq * DV, 1)
    p.lse_size = (B, Hq, Lq)
    # the splits' partials in one float32 buffer: outputs [B * Hq * Lq, S, DV], then (64-byte aligned) their lse
    rows_m = B * Hq * Lq
    w_lse = _cdiv(rows_m * S * DV, 16) * 16
    p.w_size = (w_lse + rows_m * S,)
    bts = block_table.stride() if paged else (0, 0)
    kv_fixed = (*k.stride(), *v.stride(), LK) if paged else ()  # a contiguous cache's come per call
    p.split = Launch(_decode_split_kernel, (programs, S), (
        *kv_fixed, *q.stride(), *bts, *p.out_stride,
        Hq, Hkv, G, Lq, n_mblocks, S, w_lse, float(scale), float(softcap or 1.0), left or 0, right or 0), dict(
        HAS_LENS=has_lens, PAGED=paged, PAGE=page,
        HAS_LEFT=left is not None, HAS_RIGHT=right is not None, SOFTCAP=softcap is not None,
        HAS_SINKS=has_sinks, FINAL=S == 1, STORE_LSE=store_lse,
        PRECISION="ieee" if f32 else "tf32", UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
        D=D, DV=DV, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV),
        # the merge's tiles: [rows, Dv] of at most 2048 elements, [rows, splits, Dv] of at most 4096 (16 and
        # 32 registers a thread at 4 warps: 64 rows at once spilled at D = 128 and 256); MERGE_ROWS: the
        # rows of a block that can exist (the key loop pads them to 16 for tl.dot)
        MERGE_ROWS=min(bm, _p2(rows)), BLOCK_R=br, BLOCK_S=max(1, min(_p2(S), 4096 // (br * _pow2(DV))))),
        num_warps=warps, num_stages=stages, interpret=_INTERPRET, device=q.device.index, ints=0 if paged else 9)
    p.programs = programs if S > 1 else 0
    return p
