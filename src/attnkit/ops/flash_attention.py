"""Our FlashAttention-style Triton kernels: forward with online softmax, backward from the lse.

The work list is a *segment table*, so one launch serves dense attention and
token-group layouts (MixedAttention) alike:

- a query **set** is a list of query runs (contiguous token ranges) that attend
  to the same list of key **segments** (contiguous key ranges);
- the forward and the dQ kernels take one program per (query block, batch x
  head), where each query block lies inside one run of one set, and loop over
  that set's key segments only: tiles outside the pattern are never visited;
- the dK/dV kernel takes one program per (key block, batch x kv head) and loops
  over the query runs of every set whose segments hold that key block, and over
  the query heads of its GQA group, so it needs no atomics.

Dense attention is one set: query run [0, Lq), key segment [0, Lk). Query
tokens in no set get zero output and lse -inf; key tokens in no segment get zero
dK/dV. On top of the table: a bool mask and an additive bias read in place
through their strides (broadcast dims have stride 0; the bias gradient is summed
over them inside the dQ kernel; one whose rows do not start on 16-element
boundaries, Lk = 300 say, is first copied once into padded rows: _aligned),
softcap, sink logits, and bottom-right causal / window bounds (tiles outside
them are skipped). GQA reads kv head h // (Hq // Hkv).
Any head dim (padded to a power of two in registers), Lq != Lk, Dv != D.

Key tiles sit on the BLOCK_N grid and come in three kinds: interior (every pair
allowed by the segment and the bounds: no per-pair test), edge, and the one tile
across Lk (the only one whose keys need a memory guard); a layout with no edge
tile (every segment bound on the grid or at Lk, no window) compiles without the
edge loops, and one whose Lk is a multiple of BLOCK_N without the tail loop (fewer
registers: EDGES / TAIL). Tile starts are
computed as t * BLOCK_N so that the compiler knows them aligned: bias and mask
rows then load as 16-byte vectors (a per-key guard, or an unknown alignment,
makes them scalar loads, ~10x slower). Scores stay in "score units" (q k^T
alone when there is no bias and no softcap; the tanh of the logits over the softcap
with one) and the scale (or the softcap) folds into the exp's FMA:
p = exp2(s * exp_scale - m * exp_scale).

float16/bfloat16 multiply in their own type; float32 multiplies in IEEE float32
(`tl.dot(input_precision="ieee")`, no tf32). Accumulation is float32.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch import Tensor

from . import _launch
from ._launch import INTERPRET, Launch, block_dim as _pow2, next_pow2 as _p2, on_device as _on
from .._autograd import first_order_only
from .._bounded import put
from ..groups import SegmentLayout, dense_layout

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a hard dependency on Linux
    triton = tl = None

__all__ = ["SegmentLayout", "dense_layout", "flash_attention", "TRITON_ERROR"]

TRITON_ERROR = None if triton is not None else "triton is not installed"
_LOG2E = 1.4426950408889634


_INTERPRET = INTERPRET
# inline PTX: compiled kernels of a CUDA build only (not the interpreter, not ROCm)
_ASM = tl.constexpr(not INTERPRET and torch.version.hip is None) if tl is not None else None


# ---------------------------------------------------------------------------
# the work lists
# ---------------------------------------------------------------------------


_TABLES: dict = {}


def _tables(layout: SegmentLayout, block_m: int, block_n: int, device: torch.device) -> dict[str, Tensor]:
    """int32 device tables of the layout for the given block sizes (cached: built once per layout)."""
    key = (layout, block_m, block_n, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    nsets = len(layout.sets)
    qb = layout.q_blocks(block_m)
    qtab = [x for s, e, si in qb for x in (s, e, si if si >= 0 else nsets)]  # set `nsets` is empty
    segptr, segs = [0], []
    for _, ksegs in layout.sets:
        segs += [x for s, e in ksegs if e > s for x in (s, e)]
        segptr.append(len(segs) // 2)
    segptr.append(segptr[-1])
    kb = layout.k_blocks(block_n)
    ktab, runptr, runs = [], [0], []
    for s, e, users in kb:
        for si in users:
            runs += [x for a, b in layout.sets[si][0] if b > a for x in (a, b)]
        ktab += [s, e]
        runptr.append(len(runs) // 2)

    # the largest power of two (<= block_n) dividing every key block's start: the dK/dV kernel
    # may assume it, so that a block's bias/mask columns load as aligned vectors
    kalign = block_n
    while kalign > 1 and any(s % kalign for s, _, _ in kb):
        kalign //= 2

    # whether a segment may leave a partial key tile before Lk's last tile (if not, the kernels
    # compile their interior and tail loops only: fewer registers), and whether Lk ends in one
    edges = any(x % block_n and x != layout.len_k for _, ksegs in layout.sets for s, e in ksegs if e > s
                for x in (s, e))

    def t(xs):
        return torch.tensor(xs if xs else [0], dtype=torch.int32, device=device)

    hit = {"qtab": t(qtab), "n_qblocks": len(qb), "segptr": t(segptr), "segs": t(segs),
           "ktab": t(ktab), "n_kblocks": len(kb), "runptr": t(runptr), "runs": t(runs), "kalign": kalign,
           "edges": edges, "tail": layout.len_k % block_n != 0}
    return put(_TABLES, key, hit, 64)


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        # Triton 3.6's CPU interpreter multiplies bfloat16 wrongly: there, multiply the same
        # bfloat16 values in float32 (what the tensor cores do, exactly, with float32 accumulation).
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b, accumulated by the tensor cores in place (no separate add)."""
        if UPCAST:
            return acc + tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, acc, input_precision=PRECISION)

    @triton.jit
    def _program(NBLOCKS, H, GROUP, BATCH, HEAD_MAJOR: tl.constexpr, GRID3: tl.constexpr, BIG: tl.constexpr):
        """(block index, b * H + h, b, h, kv head) of this program. GRID3: a 3-D grid (blocks, B, H)
        (HEAD_MAJOR) or (blocks, H, B), whose indices need no division (fewer registers: ~20 in
        the forward); else one axis of blocks x B x H, for B or H past axis 1/2's limit of 65535.
        Neighbouring programs share (b, h), and so K/V in L2. HEAD_MAJOR runs the batch of one head
        before the next head: programs in flight then share that head's bias and bias-gradient
        rows in L2 (a bias broadcast over the batch)."""
        if GRID3:
            blk = tl.program_id(0)
            if HEAD_MAJOR:
                b = tl.program_id(1)
                h = tl.program_id(2)
            else:
                h = tl.program_id(1)
                b = tl.program_id(2)
        else:
            blk = tl.program_id(0) % NBLOCKS
            i = tl.program_id(0) // NBLOCKS
            if HEAD_MAJOR:
                h = i // BATCH
                b = i % BATCH
            else:
                h = i % H
                b = i // H
        bh = b * H + h
        if BIG:  # offsets past 2**31 elements: the products with the strides in int64
            return blk, bh, b.to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)
        return blk, bh, b, h, h // GROUP

    @triton.jit
    def _rows(start, end, BLOCK: tl.constexpr, BIG: tl.constexpr):
        offs = start + tl.arange(0, BLOCK)
        if BIG:  # some element lies 2**31 or more from its tensor's start: index in int64
            offs = offs.to(tl.int64)
        return offs, offs < end

    @triton.jit
    def _query_block(QTAB, blk, BLOCK_M: tl.constexpr, BIG: tl.constexpr):
        """Query block blk of the table: its [start, end), its set, its row offsets and their validity."""
        q_start = tl.load(QTAB + 3 * blk)
        q_end = tl.load(QTAB + 3 * blk + 1)
        offs_m, row_ok = _rows(q_start, q_end, BLOCK_M, BIG)
        return q_start, q_end, tl.load(QTAB + 3 * blk + 2), offs_m, row_ok

    @triton.jit
    def _load_rows(offs_m, q_end):
        """The rows a query block reads its bias and mask tiles at: rows past the block (never
        stored; p = 0 there in the backward) read its last row, so that the loads in the key loops
        need no row guard (blocks are never empty)."""
        return tl.minimum(offs_m, q_end - 1)

    @triton.jit
    def _load(base, rows, ok, s_row, s_col, COLS, BLOCK_COLS: tl.constexpr):
        """A [rows, BLOCK_COLS] tile, zero outside (ok, col < COLS)."""
        cols = tl.arange(0, BLOCK_COLS)
        return tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col,
                       mask=ok[:, None] & (cols[None, :] < COLS), other=0.0)

    @triton.jit
    def _store(base, rows, ok, s_row, s_col, COLS, val, BLOCK_COLS: tl.constexpr):
        cols = tl.arange(0, BLOCK_COLS)
        tl.store(base + rows[:, None] * s_row + cols[None, :] * s_col, val.to(base.dtype.element_ty),
                 mask=ok[:, None] & (cols[None, :] < COLS))

    @triton.jit
    def _tanh(x, PRECISION: tl.constexpr):
        """tanh of a float32 tile. Half-precision calls on a GPU take the hardware's tanh.approx.f32 (one
        MUFU op, relative error <= 2^-10.99, as flash-attn's softcap does): through the sigmoid, ptxas
        built ~18 instructions per score, and a softcapped forward issued 26 per score instead of 8 (sm_90a,
        D = 64). float32 calls and the interpreter take a float32-accurate tanh (~1.5 ulp): below |x| = 0.625
        Cephes' odd polynomial, above it 1 - 2 / (exp(2|x|) + 1). The sigmoid form 2 sigmoid(2x) - 1 loses
        the small values to cancellation (absolute error ~1e-7), which the softcap multiplies: at a softcap of
        1e4 the scores were off by 1e-3."""
        if _ASM and PRECISION != "ieee":
            return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        ax = tl.abs(x)
        z = x * x
        small = x + x * z * ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
                              + 1.33314422036e-1) * z - 3.33332819422e-1)
        big = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)  # exp overflows to inf past |x| ~ 44: 1 exactly
        return tl.where(ax < 0.625, small, tl.where(x < 0, -big, big))

    @triton.jit
    def _allowed(keep, in_mem, qi, kj, MASK_BH, smm, smn, offset, left, right,
                 HAS_MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
        """Pairs (query qi, key kj; broadcast tiles in either orientation) that `keep` (a vector:
        no full-tile op when nothing else applies), the bounds and the mask allow. `in_mem`
        guards the mask read (the compiler drops it when there is no mask). HAS_MASK 2: a key mask
        (_mask_kind), read as one row of keys kj [1, keys] (in_mem: a guard of that shape)."""
        ok = keep
        if HAS_LEFT:
            ok = ok & (kj >= qi + offset - left)
        if HAS_RIGHT:
            ok = ok & (kj <= qi + offset + right)
        if HAS_MASK == 2:
            ok = ok & (tl.load(MASK_BH + kj * smn, mask=in_mem, other=0) != 0)
        elif HAS_MASK:
            ok = ok & (tl.load(MASK_BH + qi * smm + kj * smn, mask=in_mem, other=0) != 0)
        return ok

    @triton.jit
    def _widen(x):
        """float32 of a bfloat16 tile (exact). On the GPU one integer op per element, by hand: ptxas
        widens the upper half of each packed pair with two (PRMT, IMAD), 48 ops per 32 elements in
        the forward's inner loop, which issued ~12.5 ops per score."""
        if _ASM:
            return tl.inline_asm_elementwise("shl.b32 $0, $2, 16;\n\tand.b32 $1, $2, 0xffff0000;", "=r,=r,r",
                                             [x], dtype=tl.float32, is_pure=True, pack=2)
        return x.to(tl.float32)

    @triton.jit
    def _bias(BIAS_BH, qi, kj, in_mem, sbm, sbn):
        """The additive bias of pairs (qi, kj), read in place (broadcast dims: stride 0)."""
        b = tl.load(BIAS_BH + qi * sbm + kj * sbn, mask=in_mem, other=0.0)
        if b.dtype == tl.bfloat16:
            return _widen(b)
        return b.to(tl.float32)

    @triton.jit
    def _logits(q, k, offs_m, offs_n, tile_mem, bias_bh, sbm, sbn, scale, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """[queries, keys] scores in *score units*, and their tanh (for the softcap's gradient). With
        neither bias nor softcap: q k^T alone (the scale folds into the exp's FMA). With a softcap:
        t = tanh(logits / softcap), the capped logits over the softcap (the softcap folds into the exp
        instead, _exp_scale). Else the logits q k^T * scale + bias."""
        s = _mm(q, tl.trans(k), PRECISION, UPCAST)
        if HAS_BIAS:
            s = s * scale + _bias(bias_bh, offs_m[:, None], offs_n[None, :], tile_mem, sbm, sbn)
        t = s
        if SOFTCAP:
            if HAS_BIAS:
                t = _tanh(s * (1.0 / softcap), PRECISION)
            else:
                t = _tanh(s * (scale / softcap), PRECISION)
            s = t
        return s, t

    @triton.jit
    def _key_cols(start_n, lo, hi, LK, LKP, BLOCK_N: tl.constexpr, BIG: tl.constexpr, TILE: tl.constexpr):
        """Key offsets of the tile at start_n (on the BLOCK_N grid), which of them the segment
        [lo, hi) holds, which exist (< LK), and the memory guard [1, keys] of a bias/mask tile
        (its rows are in memory: callers clamp them, see _load_rows). Tiles wholly below LK need
        no guard: a constant one, which the compiler drops with its per-vector selects. Across LK
        the guard is keys < LKP: LK, or LK rounded up to 16 where the host knows the rows' memory
        reaches that far (_guard_len), so that those loads stay wide vectors (a guard at LK
        itself would force scalar loads)."""
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if BIG:
            offs_n = offs_n.to(tl.int64)
        if TILE == 2:
            exists = offs_n < LK
            tile_mem = (offs_n < LKP)[None, :]
        else:
            exists = tl.full([BLOCK_N], 1, tl.int1)
            tile_mem = tl.full([1, BLOCK_N], 1, tl.int1)
        return offs_n, (offs_n >= lo) & (offs_n < hi), exists, tile_mem

    @triton.jit
    def _key_tile(q, offs_m, offs_n, col_ok, exists, tile_mem, k_base, skn, skd, D,
                  mask_bh, smm, smn, bias_bh, sbm, sbn, scale, softcap, offset, left, right,
                  HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, TILE: tl.constexpr,
                  BLOCK_D: tl.constexpr):
        """The K tile of keys offs_n; the scores of the query block against it and their tanh
        (_logits); and which pairs are allowed (TILE 0, interior: only the bool mask applies).
        Callers load the V tile where they use it (fewer live registers meanwhile)."""
        k = _load(k_base, offs_n, exists, skn, skd, D, BLOCK_D)
        s, t = _logits(q, k, offs_m, offs_n, tile_mem, bias_bh, sbm, sbn, scale, softcap,
                       HAS_BIAS, SOFTCAP, PRECISION, UPCAST)
        if TILE == 0:  # wholly inside the segment and the bounds
            ok = tile_mem
            if HAS_MASK == 2:  # a key mask: one row of keys for the whole tile
                ok = tl.load(mask_bh + offs_n[None, :] * smn) != 0
            elif HAS_MASK:
                ok = tl.load(mask_bh + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=tile_mem, other=0) != 0
        else:  # keys outside the segment must not count; query rows past the block are never stored
            ok = _allowed(col_ok[None, :], tile_mem, offs_m[:, None], offs_n[None, :],
                          mask_bh, smm, smn, offset, left, right, HAS_MASK, HAS_LEFT, HAS_RIGHT)
        return k, s, t, ok

    @triton.jit
    def _bias_grad(DB_BH, ds, rows, row_ok, cols, col_ok, exists, tile_mem, sdbm, sdbn,
                   SUM_M: tl.constexpr, SUM_N: tl.constexpr, ATOMIC: tl.constexpr):
        """Add a [M, N] tile of ds into the float32 bias gradient: summed in registers over a
        broadcast query / key dim first; atomically when other programs share the elements
        (bias broadcast over batch or heads), else a plain store of the segment's own columns
        (two segments of one set may share a tile on the BLOCK_N grid). ds is 0 outside the
        segment and on rows past the block (p = 0 there), so atomics may add the whole tile."""
        if SUM_M and SUM_N:
            tl.atomic_add(DB_BH, tl.sum(tl.sum(ds, 1), 0), sem="relaxed")
        elif SUM_M:
            tl.atomic_add(DB_BH + cols * sdbn, tl.sum(ds, 0), mask=exists, sem="relaxed")
        elif SUM_N:
            tl.atomic_add(DB_BH + rows * sdbm, tl.sum(ds, 1), mask=row_ok, sem="relaxed")
        elif ATOMIC:
            tl.atomic_add(DB_BH + rows[:, None] * sdbm + cols[None, :] * sdbn, ds, mask=row_ok[:, None] & tile_mem,
                          sem="relaxed")
        else:
            tl.store(DB_BH + rows[:, None] * sdbm + cols[None, :] * sdbn, ds, mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _key_range(SEGS, si, q_start, q_end, offset, left, right, LK, klo, khi, HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, HAS_LIVE: tl.constexpr, BLOCK_N: tl.constexpr):
        """Segment si's keys that some query of [q_start, q_end) may reach under the bounds, [lo, hi),
        and the key tiles of the BLOCK_N grid that cover them, cut into kinds: [t0, i0) and
        [i1, below) edge tiles; [i0, i1) interior tiles (every pair allowed by the segment and the
        bounds: no per-pair test); [max(t0, F), t_end) the tile across LK, if any (F = LK // BLOCK_N,
        below = min(t_end, F)). Loops run over tile indices and start at t * BLOCK_N, which the
        compiler knows to be aligned (a multiple_of hint on a loop variable is lost). HAS_LIVE: only
        keys in [klo, khi) (on the BLOCK_N grid, _live_keys) can be allowed by the mask."""
        lo = tl.load(SEGS + 2 * si)
        hi = tl.load(SEGS + 2 * si + 1)
        if HAS_LIVE:
            lo = tl.maximum(lo, klo)
            hi = tl.minimum(hi, khi)
        lo_all = lo  # keys that every query of the block may reach
        hi_all = hi
        if HAS_LEFT:
            lo = tl.maximum(lo, q_start + offset - left)
            lo_all = tl.maximum(lo_all, q_end - 1 + offset - left)
        if HAS_RIGHT:
            hi = tl.minimum(hi, q_end - 1 + offset + right + 1)
            hi_all = tl.minimum(hi_all, q_start + offset + right + 1)
        t0 = lo // BLOCK_N
        t_end = tl.where(hi > lo, tl.cdiv(hi, BLOCK_N), t0)
        below = tl.minimum(t_end, LK // BLOCK_N)  # tiles wholly below LK end here
        i0 = tl.minimum(tl.maximum(tl.cdiv(lo_all, BLOCK_N), t0), below)
        i1 = tl.minimum(tl.maximum(hi_all // BLOCK_N, i0), below)
        return lo, hi, t0, i0, i1, below, t_end

    @triton.jit
    def _live_keys(LIVE, b, h, blk, slb, slh, slk, LK, ROWS: tl.constexpr, HAS_LIVE: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        """(klo, khi, f0, f1): [klo, khi) the key tiles (BLOCK_N grid) holding every key that the mask allows
        to some query of block blk of batch rows b .. b + ROWS - 1, head h (_live's table), [0, LK) without
        one; tiles [f0, f1) (indices) are full: the mask allows every pair of them (none without a table)."""
        if HAS_LIVE:
            live = LIVE + b * slb + h * slh + blk * slk
            first = tl.load(live)
            end = tl.load(live + 1)
            f_first = tl.load(live + 2)
            f_end = tl.load(live + 3)
            for r in tl.static_range(1, ROWS):  # the dQ kernel's paired rows: the union of their keys,
                first = tl.minimum(first, tl.load(live + r * slb))  # the intersection of their full tiles
                end = tl.maximum(end, tl.load(live + r * slb + 1))
                f_first = tl.maximum(f_first, tl.load(live + r * slb + 2))
                f_end = tl.minimum(f_end, tl.load(live + r * slb + 3))
            return (first // BLOCK_N * BLOCK_N, tl.cdiv(end, BLOCK_N) * BLOCK_N, tl.cdiv(f_first, BLOCK_N),
                    f_end // BLOCK_N)
        return 0, LK, 0, 0

    @triton.jit
    def _full_split(i0, i1, f0, f1, FULL: tl.constexpr):
        """(g0, nf): the tiles [i0, i1) split into full ones [g0, g0 + nf) = [f0, f1) within [i0, i1), which
        need no mask, and the others: a loop of i1 - i0 - nf iterations over t, tile t + nf from g0 on.
        Without FULL none is full (nf = 0)."""
        if FULL:
            g0 = tl.minimum(tl.maximum(f0, i0), i1)
            return g0, tl.minimum(tl.maximum(f1, g0), i1) - g0
        return i0, 0

    @triton.jit
    def _occupancy_kernel(MASK, OCC, LQM, LKM, smb, smh, smm, smn, HM, NR, NC, NCB,
                          G: tl.constexpr, C: tl.constexpr):
        """OCC[z, r, c] = 1 where the mask (batch / head z = bm * HM + hm, [LQM, LKM]) allows some pair of
        the G x G tile (r, c), 2 where it allows all of its pairs (within the mask), else 0. One program
        reads G rows x C keys, along the keys (coalesced): program (r, cb, z) is r + NR * (cb + NCB * z) of a
        1-D grid (axes 1 and 2 stop at 65535; Bm * Hm need not)."""
        pid = tl.program_id(0)
        r = pid % NR
        cb = (pid // NR) % NCB
        z = pid // NR // NCB
        rows = r * G + tl.arange(0, G)
        cols = cb * C + tl.arange(0, C)
        base = MASK + (z // HM).to(tl.int64) * smb + (z % HM).to(tl.int64) * smh
        inside = (rows < LQM)[:, None] & (cols < LKM)[None, :]
        m = tl.load(base + rows.to(tl.int64)[:, None] * smm + cols.to(tl.int64)[None, :] * smn, mask=inside, other=0)
        hit = tl.max(tl.max(tl.reshape((m != 0).to(tl.int32), [G, C // G, G]), 2), 0)
        full = tl.min(tl.min(tl.reshape(((m != 0) | ~inside).to(tl.int32), [G, C // G, G]), 2), 0)
        hit += hit * full
        tiles = cb * (C // G) + tl.arange(0, C // G)
        tl.store(OCC + z.to(tl.int64) * NR * NC + r * NC + tiles, hit.to(tl.int8), mask=tiles < NC)

    @triton.jit
    def _occ_cols(occ, c0, b0, b1, NC, n_scan, KEYS: tl.constexpr, BLOCK_S: tl.constexpr):
        """Occupancy tiles c0 .. c0 + BLOCK_S of the scanned axis over the block's tiles [b0, b1): (live for
        some, full for all (1 / 0), their indices). A block with no tile (b0 = b1) has none full."""
        sc = c0 + tl.arange(0, BLOCK_S)
        hit = tl.zeros([BLOCK_S], tl.int32)
        full = tl.full([BLOCK_S], 1, tl.int32)
        for bb in range(b0, b1):
            if KEYS:
                o = tl.load(occ + bb * NC + sc, mask=sc < n_scan, other=0).to(tl.int32)
            else:
                o = tl.load(occ + sc * NC + bb, mask=sc < n_scan, other=0).to(tl.int32)
            hit = tl.maximum(hit, o)
            full = tl.minimum(full, (o == 2).to(tl.int32))
        full = tl.where(b1 > b0, full, 0)
        return hit, full, sc

    @triton.jit
    def _live_kernel(OCC, OUT, TAB, TAB_STEP, NR, NC, N_TRUE, SCAN_BCAST, NB, G: tl.constexpr, KEYS: tl.constexpr,
                     BLOCK_S: tl.constexpr):
        """For block blk of the kernels' table TAB ([TAB[TAB_STEP * blk], TAB[TAB_STEP * blk + 1]): query
        rows if KEYS, else keys) and mask batch / head z = program_id(1): [first, end) of the other axis
        (keys if KEYS) where the occupancy OCC [z, NR, NC] of G x G tiles has a live tile for some row of
        the block, in elements, as OUT[z, blk, 0:2]; (N_TRUE, 0) if none. OUT[z, blk, 2:4]: the first run
        of tiles full for every row of the block ((N_TRUE, 0) if none). SCAN_BCAST: the mask is broadcast
        along the scanned axis (one tile stands for all N_TRUE). Program (blk, z) is blk + NB * z of a 1-D
        grid (NB blocks)."""
        blk = tl.program_id(0) % NB
        z = tl.program_id(0) // NB
        b0 = tl.load(TAB + TAB_STEP * blk) // G
        b1 = tl.cdiv(tl.load(TAB + TAB_STEP * blk + 1), G)
        occ = OCC + z.to(tl.int64) * NR * NC
        if KEYS:
            n_scan = NC
            b1 = tl.minimum(b1, NR)
        else:
            n_scan = NR
            b1 = tl.minimum(b1, NC)
        first = n_scan
        last = -1
        f_first = n_scan
        for c0 in range(0, n_scan, BLOCK_S):
            hit, full, sc = _occ_cols(occ, c0, b0, b1, NC, n_scan, KEYS, BLOCK_S)
            first = tl.minimum(first, tl.min(tl.where(hit > 0, sc, n_scan)))
            last = tl.maximum(last, tl.max(tl.where(hit > 0, sc, -1)))
            f_first = tl.minimum(f_first, tl.min(tl.where(full > 0, sc, n_scan)))
        f_end = n_scan  # the run of full tiles from f_first ends at the next tile that is not full
        for c0 in range(f_first // BLOCK_S * BLOCK_S, n_scan, BLOCK_S):
            hit, full, sc = _occ_cols(occ, c0, b0, b1, NC, n_scan, KEYS, BLOCK_S)
            f_end = tl.minimum(f_end, tl.min(tl.where((full == 0) & (sc > f_first), sc, n_scan)))
        end = tl.where(SCAN_BCAST != 0, N_TRUE, tl.minimum((last + 1) * G, N_TRUE))
        out = OUT + (z.to(tl.int64) * NB + blk) * 4
        tl.store(out, tl.where(last >= 0, first * G, N_TRUE))
        tl.store(out + 1, tl.where(last >= 0, end, 0))
        f_stop = tl.where(SCAN_BCAST != 0, N_TRUE, tl.minimum(f_end * G, N_TRUE))
        tl.store(out + 2, tl.where(f_first < n_scan, f_first * G, N_TRUE))
        tl.store(out + 3, tl.where(f_first < n_scan, f_stop, 0))

    @triton.jit
    def _lse_log2(LSE_BH, rows, ok):
        """The saved lse in log2 units; +inf on rows with no key, so that their p is 0."""
        lse = tl.load(LSE_BH + rows, mask=ok, other=float("-inf")) * 1.4426950408889634
        return tl.where(lse == float("-inf"), float("inf"), lse)

    @triton.jit
    def _fwd_tile(acc, m_i, l_i, q, ld_rows, start_n, lo, hi, LK, LKP, k_base, skn, skd, v_base, svn, svd, D, DV,
                  mask_bh, smm, smn, bias_bh, sbm, sbn, scale, softcap, exp_scale, offset, left, right,
                  HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
                  HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr,
                  TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        """One key tile of the online softmax; m_i in score units, p = exp2((s - m) * exp_scale).
        ld_rows: the query rows, clamped to the block (_load_rows)."""
        offs_n, col_ok, exists, tile_mem = _key_cols(start_n, lo, hi, LK, LKP, BLOCK_N, BIG, TILE)
        k, s, _, ok = _key_tile(q, ld_rows, offs_n, col_ok, exists, tile_mem, k_base, skn, skd, D,
                                mask_bh, smm, smn, bias_bh, sbm, sbn, scale, softcap, offset, left, right,
                                HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, TILE, BLOCK_D)
        if TILE != 0 or HAS_MASK:
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # 0 on rows with no key yet, and on rows whose logits all lie below -FLT_MAX / exp_scale (HF's
        # finfo.min masks), where s * exp_scale is -inf too: their p is 0 (not NaN) and the row ends empty
        m_use = m_new * exp_scale
        m_use = tl.where(m_use == float("-inf"), 0.0, m_use)
        p = tl.exp2(s * exp_scale - m_use[:, None])  # one FMA per score
        alpha = tl.exp2(m_i * exp_scale - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base, offs_n, exists, svn, svd, DV, BLOCK_DV)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        return acc, m_new, l_i

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, LSE, MASK, BIAS, SINKS, LIVE, QTAB, SEGPTR, SEGS, NBLOCKS,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        smb, smh, smm, smn, sbb, sbh, sbm, sbn,
        H, GROUP, BATCH, Lq, LK, LKP, D, DV, scale, softcap, exp_scale, offset, left, right, slb, slh, slk,
        HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_LIVE: tl.constexpr, EDGES: tl.constexpr, TAIL: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr, HEAD_MAJOR: tl.constexpr, GRID3: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        blk, bh, b, h, hk = _program(NBLOCKS, H, GROUP, BATCH, HEAD_MAJOR, GRID3, BIG)
        q_start, q_end, qset, offs_m, row_ok = _query_block(QTAB, blk, BLOCK_M, BIG)
        q = _load(Q + b * sqb + h * sqh, offs_m, row_ok, sqm, sqd, D, BLOCK_D)
        ld_rows = _load_rows(offs_m, q_end)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        mask_bh = MASK + b * smb + h * smh
        bias_bh = BIAS + b * sbb + h * sbh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        if HAS_SINKS:  # the sink logit opens the softmax: in the denominator, with no value
            m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINKS + h).to(tl.float32) * (1.4426950408889634 / exp_scale)
            l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        klo, khi, f0, f1 = _live_keys(LIVE, b, h, blk, slb, slh, slk, LK, 1, HAS_LIVE, BLOCK_N)
        for si in range(tl.load(SEGPTR + qset), tl.load(SEGPTR + qset + 1)):
            lo, hi, t0, i0, i1, below, t_end = _key_range(SEGS, si, q_start, q_end, offset, left, right, LK,
                                                          klo, khi, HAS_LEFT, HAS_RIGHT, HAS_LIVE, BLOCK_N)
            if EDGES:
                for t in range(t0, i0):  # edge tiles before the interior
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, ld_rows, t * BLOCK_N, lo, hi, LK, LKP,
                                              k_base, skn, skd, v_base, svn, svd, D, DV, mask_bh, smm, smn,
                                              bias_bh, sbm, sbn, scale, softcap, exp_scale, offset, left, right,
                                              HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG,
                                              1, BLOCK_N, BLOCK_D, BLOCK_DV)
            g0, nf = _full_split(i0, i1, f0, f1, HAS_LIVE and HAS_MASK)
            for t in range(i0, i1 - nf):  # interior tiles: no per-pair test but the mask's
                tt = t
                if HAS_LIVE and HAS_MASK:
                    tt = t + tl.where(t >= g0, nf, 0)
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, ld_rows, tt * BLOCK_N, lo, hi, LK, LKP,
                                          k_base, skn, skd, v_base, svn, svd, D, DV, mask_bh, smm, smn,
                                          bias_bh, sbm, sbn, scale, softcap, exp_scale, offset, left, right,
                                          HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG,
                                          0, BLOCK_N, BLOCK_D, BLOCK_DV)
            if HAS_LIVE and HAS_MASK:
                for t in range(g0, g0 + nf):  # interior tiles the mask allows whole: not read
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, ld_rows, t * BLOCK_N, lo, hi, LK, LKP,
                                              k_base, skn, skd, v_base, svn, svd, D, DV, mask_bh, smm, smn,
                                              bias_bh, sbm, sbn, scale, softcap, exp_scale, offset, left, right,
                                              0, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG,
                                              0, BLOCK_N, BLOCK_D, BLOCK_DV)
            if EDGES:
                for t in range(i1, below):  # edge tiles after it
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, ld_rows, t * BLOCK_N, lo, hi, LK, LKP,
                                              k_base, skn, skd, v_base, svn, svd, D, DV, mask_bh, smm, smn,
                                              bias_bh, sbm, sbn, scale, softcap, exp_scale, offset, left, right,
                                              HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG,
                                              1, BLOCK_N, BLOCK_D, BLOCK_DV)
            if TAIL:
                for t in range(tl.maximum(t0, LK // BLOCK_N), t_end):  # the tile across LK, if any
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, ld_rows, t * BLOCK_N, lo, hi, LK, LKP,
                                              k_base, skn, skd, v_base, svn, svd, D, DV, mask_bh, smm, smn,
                                              bias_bh, sbm, sbn, scale, softcap, exp_scale, offset, left, right,
                                              HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG,
                                              2, BLOCK_N, BLOCK_D, BLOCK_DV)
        dead = l_i == 0.0
        out = acc / tl.where(dead, 1.0, l_i)[:, None]
        lse = tl.where(dead, float("-inf"), (m_i * exp_scale + tl.log2(tl.where(dead, 1.0, l_i))) / 1.4426950408889634)
        _store(O + b * sob + h * soh, offs_m, row_ok, som, sod, DV, out, BLOCK_DV)
        tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=row_ok)

    @triton.jit
    def _row_delta(o_base, do, DLSE, DELTA, bh, Lq, offs_m, row_ok, som, sod, DV, HAS_DLSE: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
        """delta = rowsum(dO * O) (- dlse) of a query block's rows in float32, stored for the dK/dV kernel."""
        o = _load(o_base, offs_m, row_ok, som, sod, DV, BLOCK_DV).to(tl.float32)
        delta = tl.sum(o * do.to(tl.float32), 1)
        if HAS_DLSE:  # d lse / d s = p: folds into the softmax backward as -dlse
            delta -= tl.load(DLSE + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
        tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, delta, mask=row_ok)
        return delta

    @triton.jit
    def _dq_tile(dq, q, do, lse, delta, ld_rows, start_n, lo, hi, LK, LKP, k_base, skn, skd, v_base, svn, svd,
                 D, DV, mask_bh, smm, smn, bias_bh, sbm, sbn, scale, softcap, exp_scale, offset, left, right,
                 HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
                 HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr,
                 TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        """One key tile of dQ, and its ds (d loss / d logit) for the bias gradient. lse in log2 units;
        ld_rows: the query rows, clamped to the block (_load_rows)."""
        offs_n, col_ok, exists, tile_mem = _key_cols(start_n, lo, hi, LK, LKP, BLOCK_N, BIG, TILE)
        k, s, t, ok = _key_tile(q, ld_rows, offs_n, col_ok, exists, tile_mem, k_base, skn, skd, D,
                                mask_bh, smm, smn, bias_bh, sbm, sbn, scale, softcap, offset, left, right,
                                HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, TILE, BLOCK_D)
        p = tl.exp2(s * exp_scale - lse[:, None])
        if TILE != 0 or HAS_MASK:
            p = tl.where(ok, p, 0.0)
        v = _load(v_base, offs_n, exists, svn, svd, DV, BLOCK_DV)
        dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])  # d loss / d logit
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
            if TILE == 2:  # bias columns past LK (read up to LKP) may hold NaN: 0 * NaN must not reach dq
                ds = tl.where(ok, ds, 0.0)
        return _mma(ds.to(k.dtype), k, dq, PRECISION, UPCAST), ds

    @triton.jit
    def _dq_step(dqs, qs, dos, lses, deltas, offs_m, row_ok, ld_rows, start_n, lo, hi, LK, LKP,
                 k_base, v_base, mask_bh, skb, svb, smb, skn, skd, svn, svd,
                 D, DV, smm, smn, bias_bh, sbm, sbn, dbias_bh, sdbm, sdbn, scale, softcap, exp_scale,
                 offset, left, right,
                 HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
                 HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr,
                 BIAS_GRAD: tl.constexpr, DB_SUM_M: tl.constexpr, DB_SUM_N: tl.constexpr, DB_ATOMIC: tl.constexpr,
                 ROWS: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_DV: tl.constexpr):
        """One key tile of dQ for the program's ROWS batch rows (tuples of their operands), then the
        bias gradient: the rows' ds add up before the one atomic add (a bias shared by the batch)."""
        dq0, ds = _dq_tile(dqs[0], qs[0], dos[0], lses[0], deltas[0], ld_rows, start_n, lo, hi, LK, LKP, k_base,
                           skn, skd, v_base, svn, svd, D, DV, mask_bh, smm, smn, bias_bh, sbm, sbn, scale, softcap,
                           exp_scale, offset, left, right, HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT,
                           PRECISION, UPCAST, BIG, TILE, BLOCK_N, BLOCK_D, BLOCK_DV)
        out = (dq0,)
        for r in tl.static_range(1, ROWS):  # the next rows share the bias tile (bias_bh)
            dq_r, ds_r = _dq_tile(dqs[r], qs[r], dos[r], lses[r], deltas[r], ld_rows, start_n, lo, hi, LK, LKP,
                                  k_base + r * skb, skn, skd, v_base + r * svb, svn, svd, D, DV, mask_bh + r * smb,
                                  smm, smn, bias_bh, sbm, sbn, scale, softcap, exp_scale, offset, left, right,
                                  HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG, TILE,
                                  BLOCK_N, BLOCK_D, BLOCK_DV)
            out = out + (dq_r,)
            ds += ds_r
        if BIAS_GRAD:  # d loss / d bias = ds, summed over the bias's broadcast dims
            offs_n, col_ok, exists, tile_mem = _key_cols(start_n, lo, hi, LK, LKP, BLOCK_N, BIG, TILE)
            _bias_grad(dbias_bh, ds, offs_m, row_ok, offs_n, col_ok, exists, tile_mem, sdbm, sdbn,
                       DB_SUM_M, DB_SUM_N, DB_ATOMIC)
        return out

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, MASK, BIAS, DBIAS, O, DLSE, LIVE, QTAB, SEGPTR, SEGS, NBLOCKS,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
        sdqb, sdqh, sdqm, sdqd, sob, soh, som, sod, smb, smh, smm, smn, sbb, sbh, sbm, sbn, sdbb, sdbh, sdbm, sdbn,
        H, GROUP, BATCH, Lq, LK, LKP, D, DV, scale, softcap, exp_scale, offset, left, right, slb, slh, slk,
        HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_LIVE: tl.constexpr, EDGES: tl.constexpr, TAIL: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr, HEAD_MAJOR: tl.constexpr, GRID3: tl.constexpr,
        BIAS_GRAD: tl.constexpr, DB_SUM_M: tl.constexpr, DB_SUM_N: tl.constexpr, DB_ATOMIC: tl.constexpr,
        ROWS: tl.constexpr, HAS_DLSE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        """dQ of one query block of batch rows b .. b + ROWS - 1 (BATCH counts groups of ROWS), which
        share one bias-gradient atomic per tile: 1 / ROWS of the atomic traffic of a bias broadcast
        over the batch (see _batch_rows). It also writes the rows' delta for the dK/dV kernel (the
        query blocks cover every row)."""
        blk, bh, b, h, hk = _program(NBLOCKS, H, GROUP, BATCH, HEAD_MAJOR, GRID3, BIG)
        b = ROWS * b
        bh = b * H + h
        q_start, q_end, qset, offs_m, row_ok = _query_block(QTAB, blk, BLOCK_M, BIG)
        dbias_bh = DBIAS + b * sdbb + h * sdbh
        bias_bh = BIAS + b * sbb + h * sbh  # ROWS > 1 needs a bias broadcast over the batch: shared
        ld_rows = _load_rows(offs_m, q_end)
        qs = ()
        dos = ()
        lses = ()
        deltas = ()
        dqs = ()
        for r in tl.static_range(ROWS):
            q = _load(Q + (b + r) * sqb + h * sqh, offs_m, row_ok, sqm, sqd, D, BLOCK_D)
            do = _load(DO + (b + r) * sdob + h * sdoh, offs_m, row_ok, sdom, sdod, DV, BLOCK_DV)
            qs = qs + (q,)
            dos = dos + (do,)
            lses = lses + (_lse_log2(LSE + (bh + r * H).to(tl.int64) * Lq, offs_m, row_ok),)
            deltas = deltas + (_row_delta(O + (b + r) * sob + h * soh, do, DLSE, DELTA, bh + r * H, Lq, offs_m,
                                          row_ok, som, sod, DV, HAS_DLSE, BLOCK_DV),)
            dqs = dqs + (tl.zeros([BLOCK_M, BLOCK_D], tl.float32),)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        mask_bh = MASK + b * smb + h * smh
        klo, khi, f0, f1 = _live_keys(LIVE, b, h, blk, slb, slh, slk, LK, ROWS, HAS_LIVE, BLOCK_N)
        for si in range(tl.load(SEGPTR + qset), tl.load(SEGPTR + qset + 1)):
            lo, hi, t0, i0, i1, below, t_end = _key_range(SEGS, si, q_start, q_end, offset, left, right, LK,
                                                          klo, khi, HAS_LEFT, HAS_RIGHT, HAS_LIVE, BLOCK_N)
            if EDGES:
                for t in range(t0, i0):  # edge tiles before the interior
                    dqs = _dq_step(
                        dqs, qs, dos, lses, deltas, offs_m, row_ok, ld_rows, t * BLOCK_N, lo, hi, LK, LKP,
                        k_base, v_base, mask_bh, skb, svb, smb, skn, skd, svn, svd, D, DV, smm, smn,
                        bias_bh, sbm, sbn, dbias_bh, sdbm, sdbn, scale, softcap, exp_scale, offset, left, right,
                        HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG, BIAS_GRAD, DB_SUM_M,
                        DB_SUM_N, DB_ATOMIC, ROWS, 1, BLOCK_N, BLOCK_D, BLOCK_DV)
            g0, nf = _full_split(i0, i1, f0, f1, HAS_LIVE and HAS_MASK)
            for t in range(i0, i1 - nf):  # interior tiles: no per-pair test but the mask's
                tt = t
                if HAS_LIVE and HAS_MASK:
                    tt = t + tl.where(t >= g0, nf, 0)
                dqs = _dq_step(
                    dqs, qs, dos, lses, deltas, offs_m, row_ok, ld_rows, tt * BLOCK_N, lo, hi, LK, LKP,
                    k_base, v_base, mask_bh, skb, svb, smb, skn, skd, svn, svd, D, DV, smm, smn,
                    bias_bh, sbm, sbn, dbias_bh, sdbm, sdbn, scale, softcap, exp_scale, offset, left, right,
                    HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG, BIAS_GRAD, DB_SUM_M,
                    DB_SUM_N, DB_ATOMIC, ROWS, 0, BLOCK_N, BLOCK_D, BLOCK_DV)
            if HAS_LIVE and HAS_MASK:
                for t in range(g0, g0 + nf):  # interior tiles the mask allows whole: not read
                    dqs = _dq_step(
                        dqs, qs, dos, lses, deltas, offs_m, row_ok, ld_rows, t * BLOCK_N, lo, hi, LK, LKP,
                        k_base, v_base, mask_bh, skb, svb, smb, skn, skd, svn, svd, D, DV, smm, smn,
                        bias_bh, sbm, sbn, dbias_bh, sdbm, sdbn, scale, softcap, exp_scale, offset, left, right,
                        0, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG, BIAS_GRAD, DB_SUM_M,
                        DB_SUM_N, DB_ATOMIC, ROWS, 0, BLOCK_N, BLOCK_D, BLOCK_DV)
            if EDGES:
                for t in range(i1, below):  # edge tiles after it
                    dqs = _dq_step(
                        dqs, qs, dos, lses, deltas, offs_m, row_ok, ld_rows, t * BLOCK_N, lo, hi, LK, LKP,
                        k_base, v_base, mask_bh, skb, svb, smb, skn, skd, svn, svd, D, DV, smm, smn,
                        bias_bh, sbm, sbn, dbias_bh, sdbm, sdbn, scale, softcap, exp_scale, offset, left, right,
                        HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG, BIAS_GRAD, DB_SUM_M,
                        DB_SUM_N, DB_ATOMIC, ROWS, 1, BLOCK_N, BLOCK_D, BLOCK_DV)
            if TAIL:
                for t in range(tl.maximum(t0, LK // BLOCK_N), t_end):  # the tile across LK, if any
                    dqs = _dq_step(
                        dqs, qs, dos, lses, deltas, offs_m, row_ok, ld_rows, t * BLOCK_N, lo, hi, LK, LKP,
                        k_base, v_base, mask_bh, skb, svb, smb, skn, skd, svn, svd, D, DV, smm, smn,
                        bias_bh, sbm, sbn, dbias_bh, sdbm, sdbn, scale, softcap, exp_scale, offset, left, right,
                        HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG, BIAS_GRAD, DB_SUM_M,
                        DB_SUM_N, DB_ATOMIC, ROWS, 2, BLOCK_N, BLOCK_D, BLOCK_DV)
        for r in tl.static_range(ROWS):
            _store(DQ + (b + r) * sdqb + h * sdqh, offs_m, row_ok, sdqm, sdqd, D, dqs[r] * scale, BLOCK_D)

    @triton.jit
    def _dkdv_tile(dk, dv, k, v, offs_n, col_ok, start_m, hi, q_base, do_base, LSE_BH, DELTA_BH, mask_bh, bias_bh,
                   sqm, sqd, sdom, sdod, smm, smn, sbm, sbn, LKP, D, DV, scale, softcap, exp_scale, offset, left, right,
                   HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
                   HAS_RIGHT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr,
                   KEY_EDGE: tl.constexpr, ROW_EDGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr):
        """dK, dV of the key block from the query tile at start_m (ROW_EDGE: it crosses hi).
        Scores in the [queries, keys] orientation: bias and mask rows load as wide vectors and lse /
        delta are per-row values; P^T and dS^T go to the MMAs through shared memory."""
        offs_m, row_ok = _rows(start_m, hi, BLOCK_M, BIG)
        if not ROW_EDGE:  # every row is below hi: a constant guard, which the loads drop
            row_ok = tl.full([BLOCK_M], 1, tl.int1)
        if KEY_EDGE:  # keys < LKP: see _key_cols
            key_mem = (offs_n < LKP)[None, :]
            tile_mem = row_ok[:, None] & key_mem
        else:
            key_mem = tl.full([1, offs_n.shape[0]], 1, tl.int1)
            tile_mem = row_ok[:, None]
        q = _load(q_base, offs_m, row_ok, sqm, sqd, D, BLOCK_D)
        do = _load(do_base, offs_m, row_ok, sdom, sdod, DV, BLOCK_DV)
        lse = _lse_log2(LSE_BH, offs_m, row_ok)
        delta = tl.load(DELTA_BH + offs_m, mask=row_ok, other=0.0)
        s, t = _logits(q, k, offs_m, offs_n, tile_mem, bias_bh, sbm, sbn, scale, softcap,
                       HAS_BIAS, SOFTCAP, PRECISION, UPCAST)
        p = tl.exp2(s * exp_scale - lse[:, None])
        # rows past hi have lse = +inf, so p = 0 there; key columns past the block are never stored
        if ROW_EDGE or HAS_MASK or HAS_LEFT or HAS_RIGHT:
            ok = _allowed(row_ok[:, None], key_mem if HAS_MASK == 2 else tile_mem, offs_m[:, None], offs_n[None, :],
                          mask_bh, smm, smn, offset, left, right, HAS_MASK, HAS_LEFT, HAS_RIGHT)
            p = tl.where(ok, p, 0.0)
        dv = _mma(tl.trans(p.to(do.dtype)), do, dv, PRECISION, UPCAST)
        dp = _mm(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dk = _mma(tl.trans(ds.to(q.dtype)), q, dk, PRECISION, UPCAST)
        return dk, dv

    @triton.jit
    def _dkdv_block(Q, DO, LSE, DELTA, MASK, BIAS, LIVE, RUNPTR, RUNS, blk, k, v, offs_n, col_ok, k_start, k_end, b, hk,
                    sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod, smb, smh, smm, smn, sbb, sbh, sbm, sbn,
                    H, GROUP, Lq, LKP, D, DV, scale, softcap, exp_scale, offset, left, right, slb, slh, slk,
                    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, HAS_LEFT: tl.constexpr,
                    HAS_RIGHT: tl.constexpr, HAS_LIVE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BIG: tl.constexpr,
                    KEY_EDGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
        """dK, dV of one key block: every query of the sets that read it, every head of its GQA group.
        HAS_LIVE: only the queries the mask lets see some key of the block (_live's table), and the mask
        is not read on the whole query tiles it allows entirely."""
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        for g in range(0, GROUP):  # the query heads that read this kv head: no atomics needed
            h = hk * GROUP + g
            bh = b * H + h
            q_base = Q + b * sqb + h * sqh
            do_base = DO + b * sdob + h * sdoh
            mask_bh = MASK + b * smb + h * smh
            bias_bh = BIAS + b * sbb + h * sbh
            if HAS_LIVE:
                live = LIVE + b * slb + h * slh + blk * slk
                q_first = tl.load(live)
                q_end = tl.load(live + 1)
                fq_first = tl.load(live + 2)  # queries whose rows the mask allows whole in this key block
                fq_end = tl.load(live + 3)
            for ri in range(tl.load(RUNPTR + blk), tl.load(RUNPTR + blk + 1)):
                lo = tl.load(RUNS + 2 * ri)
                hi = tl.load(RUNS + 2 * ri + 1)
                if HAS_LIVE:
                    lo = tl.maximum(lo, q_first)
                    hi = tl.minimum(hi, q_end)
                if HAS_RIGHT:  # queries whose reach ends left of this key block
                    lo = tl.maximum(lo, k_start - offset - right)
                if HAS_LEFT:  # queries whose reach starts right of it
                    hi = tl.minimum(hi, k_end - 1 - offset + left + 1)
                n_full = tl.maximum(hi - lo, 0) // BLOCK_M
                g0 = 0
                nf = 0
                if HAS_LIVE and HAS_MASK:  # whole tiles [g0, g0 + nf) inside [fq_first, fq_end): mask not read
                    g0, nf = _full_split(0, n_full, tl.cdiv(tl.maximum(fq_first - lo, 0), BLOCK_M),
                                         tl.maximum(fq_end - lo, 0) // BLOCK_M, True)
                for i in range(0, n_full - nf):  # whole query tiles: no per-row test
                    ii = i
                    if HAS_LIVE and HAS_MASK:
                        ii = i + tl.where(i >= g0, nf, 0)
                    dk, dv = _dkdv_tile(dk, dv, k, v, offs_n, col_ok, lo + ii * BLOCK_M, hi, q_base, do_base,
                                        LSE + bh * Lq, DELTA + bh * Lq, mask_bh, bias_bh, sqm, sqd, sdom, sdod,
                                        smm, smn, sbm, sbn, LKP, D, DV, scale, softcap, exp_scale, offset, left, right,
                                        HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG,
                                        KEY_EDGE, False, BLOCK_M, BLOCK_D, BLOCK_DV)
                if HAS_LIVE and HAS_MASK:
                    for i in range(g0, g0 + nf):
                        dk, dv = _dkdv_tile(dk, dv, k, v, offs_n, col_ok, lo + i * BLOCK_M, hi, q_base, do_base,
                                            LSE + bh * Lq, DELTA + bh * Lq, mask_bh, bias_bh, sqm, sqd, sdom, sdod,
                                            smm, smn, sbm, sbn, LKP, D, DV, scale, softcap, exp_scale, offset, left,
                                            right, 0, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG,
                                            KEY_EDGE, False, BLOCK_M, BLOCK_D, BLOCK_DV)
                if lo + n_full * BLOCK_M < hi:  # the run's last, partial tile
                    dk, dv = _dkdv_tile(dk, dv, k, v, offs_n, col_ok, lo + n_full * BLOCK_M, hi, q_base, do_base,
                                        LSE + bh * Lq, DELTA + bh * Lq, mask_bh, bias_bh, sqm, sqd, sdom, sdod,
                                        smm, smn, sbm, sbn, LKP, D, DV, scale, softcap, exp_scale, offset, left, right,
                                        HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, PRECISION, UPCAST, BIG,
                                        KEY_EDGE, True, BLOCK_M, BLOCK_D, BLOCK_DV)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV_, LSE, DELTA, MASK, BIAS, LIVE, KTAB, RUNPTR, RUNS, NBLOCKS,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdob, sdoh, sdom, sdod,
        sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd, smb, smh, smm, smn, sbb, sbh, sbm, sbn,
        H, HKV, GROUP, BATCH, Lq, LKP, D, DV, scale, softcap, exp_scale, offset, left, right, slb, slh, slk,
        HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, HAS_LIVE: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr, BIG: tl.constexpr, HEAD_MAJOR: tl.constexpr, GRID3: tl.constexpr,
        KALIGN: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ):
        blk, _, b, hk, _ = _program(NBLOCKS, HKV, 1, BATCH, HEAD_MAJOR, GRID3, BIG)
        k_start = tl.load(KTAB + 2 * blk) // KALIGN * KALIGN  # exact (KALIGN divides every start): tells the compiler
        k_end = tl.load(KTAB + 2 * blk + 1)
        offs_n, col_ok = _rows(k_start, k_end, BLOCK_N, BIG)
        k = _load(K + b * skb + hk * skh, offs_n, col_ok, skn, skd, D, BLOCK_D)
        v = _load(V + b * svb + hk * svh, offs_n, col_ok, svn, svd, DV, BLOCK_DV)
        if HAS_BIAS or HAS_MASK:
            if k_end - k_start == BLOCK_N:  # a full block: its bias/mask columns load as vectors
                dk, dv = _dkdv_block(Q, DO, LSE, DELTA, MASK, BIAS, LIVE, RUNPTR, RUNS, blk, k, v, offs_n, col_ok,
                                     k_start, k_end, b, hk, sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod,
                                     smb, smh, smm, smn, sbb, sbh, sbm, sbn, H, GROUP, Lq, LKP, D, DV,
                                     scale, softcap, exp_scale, offset, left, right, slb, slh, slk,
                                     HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, HAS_LIVE, PRECISION, UPCAST, BIG,
                                     False, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
            else:
                dk, dv = _dkdv_block(Q, DO, LSE, DELTA, MASK, BIAS, LIVE, RUNPTR, RUNS, blk, k, v, offs_n, col_ok,
                                     k_start, k_end, b, hk, sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod,
                                     smb, smh, smm, smn, sbb, sbh, sbm, sbn, H, GROUP, Lq, LKP, D, DV,
                                     scale, softcap, exp_scale, offset, left, right, slb, slh, slk,
                                     HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, HAS_LIVE, PRECISION, UPCAST, BIG,
                                     True, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
        else:  # nothing is read along the keys
            dk, dv = _dkdv_block(Q, DO, LSE, DELTA, MASK, BIAS, LIVE, RUNPTR, RUNS, blk, k, v, offs_n, col_ok,
                                 k_start, k_end, b, hk, sqb, sqh, sqm, sqd, sdob, sdoh, sdom, sdod,
                                 smb, smh, smm, smn, sbb, sbh, sbm, sbn, H, GROUP, Lq, LKP, D, DV,
                                 scale, softcap, exp_scale, offset, left, right, slb, slh, slk,
                                 HAS_MASK, HAS_BIAS, SOFTCAP, HAS_LEFT, HAS_RIGHT, HAS_LIVE, PRECISION, UPCAST, BIG,
                                 True, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV)
        _store(DK + b * sdkb + hk * sdkh, offs_n, col_ok, sdkn, sdkd, D, dk * scale, BLOCK_D)
        _store(DV_ + b * sdvb + hk * sdvh, offs_n, col_ok, sdvn, sdvd, DV, dv, BLOCK_DV)


# ---------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------


def _config(d: int, dv: int, interp: bool, f32: bool = False, rows: int = 1) -> dict:
    """Block sizes and warps. Under the interpreter (numpy) fewer, larger tiles run faster;
    32 still leaves partial tiles in the tests' odd lengths. rows: the batch rows each dQ program
    takes (_batch_rows: more than one when it sums a bias gradient shared by the batch)."""
    if interp:
        return dict(fwd=(32, 32, 1, 1), dq=(32, 32, 1, 1), dkdv=(32, 32, 1, 1))
    if f32:  # IEEE float32 products run on the FMA units: small tiles keep registers (and compile times) sane
        return dict(fwd=(64, 32, 4, 2), dq=(32, 32, 4, 2), dkdv=(32, 32, 4, 2))
    # (BLOCK_M, BLOCK_N, num_warps, num_stages), from benchmarks/tune_triton.py and the forward /
    # backward sweeps of docs/results/tune_triton_h100_2026-11-22.txt and tune_triton_bias_h100_2026-11-22.txt
    # (H100, bf16): the best or within ~3% of it on dense, causal, group and biased (Evoformer) workloads.
    dmax = max(d, dv)
    if dmax <= 32:  # fwd 64 x 64 since 2026-11-23 (Evoformer: x1.06 at MSA L1024, x1.27 triangle L256, 0.97 MSA L256);
        # dK/dV 64 x 64 x 3 stages under _maxnreg's cap since 2026-11-23 (Evoformer backward x1.02-1.11)
        return dict(fwd=(64, 64, 4, 3), dq=(64, 32, 4, 3), dkdv=(64, 64, 4, 3))
    # dQ programs of two batch rows (a shared bias's gradient): 64 x 32 x 3 stages, as at D <= 32; the tiles
    # below spill there. Whole backward, shared bias, L = 1024 / 4096: x1.28 / x1.04 at D = 64, x1.49 / x1.51
    # at D = 128 (docs/results/bwd_sweep_dq_h100_2026-11-24.txt). Not for one row: there it ran x1.02 / x0.90
    # at D = 64 against the tile below (x1.22 / x1.11 at D = 128), in the same sweep.
    paired = rows > 1
    if dmax <= 64:
        return dict(fwd=(128, 64, 4, 3), dq=(64, 32, 4, 3) if paired else (64, 64, 4, 3), dkdv=(64, 64, 4, 2))
    if dmax <= 128:  # dkdv: 64 x 64 since the [queries, keys] orientation (2026-11-23: 2.07 vs 2.69 ms at 32 x 64)
        return dict(fwd=(128, 64, 8, 3), dq=(64, 32, 4, 3) if paired else (64, 64, 4, 2), dkdv=(64, 64, 4, 2))
    # up to 256: smaller tiles so that the stages fit in shared memory (228 KB)
    return dict(fwd=(64, 32, 4, 2), dq=(32, 32, 4, 2), dkdv=(32, 32, 4, 2))


def _maxnreg(kind: str, d: int, dv: int, cfg: tuple) -> _launch.Caps:
    """Register caps where one was measured to pay (H100, bf16, Evoformer shapes, 2026-11-23); _launch
    keeps the first that builds without spills (or within a Cap's allowance), else none.

    - Forward, D <= 32, 128 x 32 tiles: 158 registers, 3 programs per multiprocessor; under 128 (no
      spills) 4 fit: 8-10% faster at L=512, 1% at L=1024 (that tile is the tuner's candidate now).
    - Forward, D <= 32, the 64 x 64 default: 128 registers (4 programs, as many as shared memory holds at
      3 stages); under 112 it ran 1-4% faster (MSA L=512/1024, triangle L=512; no change at L=256). With
      the tile across Lk (Lk off the 64 grid) it needs 144 (3 programs) and spills under 112, so 128 follows.
    - dK/dV, D <= 32, 64 x 64 x 3 stages: under 168, 3 programs fit (2 uncapped); ptxas then spills
      52-144 B outside the innermost loops (bias, masks, bounds; none without a bias), where the 64 x 128
      default it replaced spilled 164 B inside them. The allowance, 48 words (192 B), holds those
      builds; the whole backward ran x1.02-1.11 (docs/results/dkdv_cap_ab_h100_2026-11-23.txt). A bias
      with a mask and causal / window bounds spills 224-240 B under the cap (offline builds) and runs
      uncapped: 222-250 registers, no spills, 2 programs per SM (not timed)."""
    if kind == "fwd" and max(d, dv) <= 32:
        return {(128, 32, 4, 3): 128, (64, 64, 4, 3): (112, 128)}.get(cfg)
    if kind == "dkdv" and max(d, dv) <= 32 and cfg == (64, 64, 4, 3):
        return _launch.Cap(168, spills=48)
    return None


# ATTNKIT_TRITON_AUTOTUNE=1: time these candidates (plus the default) on the first call of each
# kind of problem and keep the fastest for the process. Off by default: every candidate compiles
# (seconds each) on that first call. float32 and the interpreter always use _config.
AUTOTUNE_CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)],
    "dq": [(64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (32, 32, 4, 2)],
    "dkdv": [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)],
}
_TUNED: dict = {}


def autotuning() -> bool:
    """True when ATTNKIT_TRITON_AUTOTUNE=1 (read at each call)."""
    return os.environ.get("ATTNKIT_TRITON_AUTOTUNE", "0") == "1"


def _tuning() -> bool:
    """Whether launches go through _pick (autotuning now, or configs tuned earlier in the process)."""
    return bool(_TUNED) or autotuning()


def _pick(kind: str, key: tuple, default: tuple, launch, reset=None) -> None:
    """Run `launch(config)` once with the chosen config. With autotuning on, the first call of a key
    times every candidate (CUDA events on the launch's device, median of 5 after a warm-up;
    candidates that fail to compile are skipped), keeps the fastest for the process, and re-runs it
    last so that its outputs stand (`reset()` first clears what a launch accumulates into). A tuned
    config that fails on a later call of the same key falls back to the default."""
    cfg = _TUNED.get((kind, key))
    if cfg is None and autotuning():
        best = (math.inf, default)
        for c in dict.fromkeys([default] + AUTOTUNE_CANDIDATES[kind]):
            try:
                launch(c)
                times = []
                for _ in range(5):
                    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    t0.record()
                    launch(c)
                    t1.record()
                    t1.synchronize()
                    times.append(t0.elapsed_time(t1))
            except Exception:  # noqa: BLE001 - a config that does not fit (shared memory, registers)
                continue
            best = min(best, (sorted(times)[2], c))
        cfg = _TUNED[(kind, key)] = best[1]
        if reset is not None:
            reset()
    if cfg is not None and cfg != default:
        try:
            launch(cfg)
            return
        except Exception:  # noqa: BLE001 - the key does not pin every compile-time detail (strides)
            if reset is not None:
                reset()
    ran = _with_fallback(kind, default, launch)
    if ran != default:  # the default does not build on this GPU: later calls of the key go straight to ran
        _TUNED[(kind, key)] = ran


# The config a kernel falls back to when its own does not build on this GPU (Triton raises
# OutOfResources when the tiles need more shared memory or registers than it has, e.g. D = 256 on a
# GPU with ~100 KB of shared memory per multiprocessor, not the H100's 228): the smallest tiles, one stage.
_FALLBACK = (32, 32, 4, 1)


def _with_fallback(kind: str, cfg: tuple, run) -> tuple:
    """run(cfg), or run(_FALLBACK) with a warning if cfg does not build on this GPU; returns the config
    that ran. Triton raises OutOfResources when it loads the build, before the launch: nothing has been
    written (a bias gradient's atomics included), so the second run starts clean."""
    try:
        run(cfg)
        return cfg
    except _launch.OUT_OF_RESOURCES as e:
        if cfg == _FALLBACK:
            raise
        warnings.warn(f"attnkit: the Triton {kind} kernel's config {cfg} (BLOCK_M, BLOCK_N, warps, stages) does "
                      f"not fit this GPU ({' '.join(str(e).split())[:200]}); calls like this one run {_FALLBACK}",
                      RuntimeWarning, stacklevel=2)
        run(_FALLBACK)
        return _FALLBACK


def _tune_key(q, k, v, mask, bias, softcap, bounds, layout) -> tuple:
    """What the best config depends on: dims, dtype, features, and the problem size (rounded)."""
    return (str(q.device), q.shape[3], v.shape[3], q.dtype, q.shape[1] // k.shape[1],
            None if mask is None else tuple(n == 1 for n in mask.shape),
            None if bias is None else tuple(n == 1 for n in bias.shape),
            softcap is not None, bounds, layout.sets == ((((0, q.shape[2]),), ((0, k.shape[2]),)),),
            _p2(q.shape[0] * q.shape[1]), _p2(q.shape[2]), _p2(k.shape[2]))


# Kernel sweeps may force the program order (None: the rule of _head_major).
_HEAD_MAJOR: bool | None = None


def _head_major(bias: Tensor | None, B: int) -> bool:
    """Order programs head by head when the bias is shared across the batch (see _program)."""
    if _HEAD_MAJOR is not None:
        return _HEAD_MAJOR
    return bias is not None and bias.shape[0] == 1 and B > 1


# Kernel sweeps may set the dQ kernel's batch rows per program (None: the rule of _batch_rows).
_ROWS: int | None = None


def _batch_rows(bias: Tensor | None, bias_grad: bool, B: int) -> int:
    """How many batch rows each dQ program takes (1, 2 or 4): more than one when the bias gradient is
    summed over the batch, whose atomic adds then fall to 1 / rows. Two, the rule: four rows (sweeps
    only) need 216-255 registers (2 programs per SM) and ran the whole backward x0.97-1.01 at best on the
    Evoformer shapes at L >= 512, x0.39-0.73 at L <= 300 (docs/results/dq_rows_h100_2026-11-24.txt)."""
    if not (bias_grad and bias is not None and bias.shape[0] == 1):
        return 1
    want = 2 if _ROWS is None else _ROWS
    return next(r for r in (4, 2, 1) if r <= want and B % r == 0)


_GRID_AXIS_LIMIT = 65535  # CUDA's limit on grid axes 1 and 2 (tests lower it to reach the 1-D grid)


def _grid3(B: int, H: int) -> bool:
    """Whether (blocks, B, H) fits a 3-D grid; see _program."""
    return B <= _GRID_AXIS_LIMIT and H <= _GRID_AXIS_LIMIT


def _grid(nblocks: int, B: int, H: int, head_major: bool) -> tuple:
    """The launch grid that _program decodes."""
    if not _grid3(B, H):
        return (nblocks * B * H,)
    return (nblocks, B, H) if head_major else (nblocks, H, B)


def _big(*ts: Tensor | None) -> bool:
    """True when some element lies 2**31 or more elements from its tensor's start (int32 would wrap)."""
    for t in ts:
        # a view reaches no further than its storage: the cheap test settles almost every call
        if t is not None and t.untyped_storage().nbytes() >= 2**31 * t.element_size():
            if sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31:
                return True
    return False


def _precision(dtype: torch.dtype, interp: bool) -> dict:
    return dict(PRECISION="ieee" if dtype == torch.float32 else "tf32", UPCAST=interp and dtype == torch.bfloat16)


def _bits(mask: Tensor | None, dummy: Tensor) -> Tensor:
    """A bool mask as the kernels read it (bytes); dummy (any pointer, never read) when there is none."""
    if mask is None:
        return dummy
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _padded(shape, dtype: torch.dtype, device) -> Tensor:
    """A zero tensor of `shape` whose strides other than the last are multiples of 16: a view of
    rows padded with zeros to 16 elements (see _aligned and _guard_len)."""
    n = shape[-1]
    return torch.zeros(*shape[:-1], -(-n // 16) * 16, dtype=dtype, device=device)[..., :n]


def _aligned(t: Tensor | None) -> Tensor | None:
    """A mask or bias as the kernels read it fast: t itself when its rows start on 16-element
    boundaries (every stride but the last a multiple of 16, unit last stride, a 16-byte aligned
    base), else a copy of it (its own shape, never expanded) that does. Triton specialises integer
    arguments on divisibility by 16; without it the loads of a bias or mask tile are scalar and are
    not pipelined, and the forward ran ~8x slower per pair (H100, Lk = 300 or 1000 against 320 or
    1024, 2026-11-23). Called where autograd does not record it (_FlashAttention.forward): the
    bias gradient comes back in t's shape."""
    if t is None or t.shape[-1] == 1:  # nothing is vectorised along a broadcast key dim
        return t
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        t.stride(i) % 16 == 0 for i in range(t.dim() - 1) if t.shape[i] > 1)
    if ok:
        return t
    n = t.shape[-1]
    if n % 16 == 0:
        return t.clone(memory_format=torch.contiguous_format)
    return torch.nn.functional.pad(t.contiguous(), (0, -n % 16))[..., :n]  # one launch: copy and zero padding


def _guard_len(lk: int, *ts: Tensor | None) -> int:
    """LKP of the kernels: how far along the keys they may read mask / bias rows (and add zeros into
    the bias gradient's, always a _padded buffer). Lk rounded up to 16 where every such tensor's
    storage reaches that far past its last row (an _aligned copy does), so that the tile across Lk
    loads them as vectors like the others; else Lk."""
    lkp = -(-lk // 16) * 16
    if lkp == lk:
        return lk
    for t in ts:
        if t is None or t.shape[-1] == 1:
            continue
        last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + (lkp - lk) * t.stride(-1)
        if last >= t.untyped_storage().nbytes() // t.element_size():
            return lk
    return lkp


def _mask_kind(mask: Tensor | None) -> int:
    """HAS_MASK of the kernels: 0 no mask; 2 a key mask [B|1, H|1, 1, Lk] (one row per tile, broadcast
    over the queries: the Evoformer modules' masks; a [64, 64] byte tile cost the forward's loop ~200
    more instructions); 1 any other mask, read as [queries, keys] tiles."""
    if mask is None:
        return 0
    return 2 if mask.shape[2] == 1 else 1


def _bcast_strides(t: Tensor | None) -> tuple[int, int, int, int]:
    """A 4-D mask / bias (or its gradient buffer)'s strides, 0 along broadcast dims (all 0 for None:
    the kernel never reads it)."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(4))


# Kernel sweeps may turn off the skipping of the tiles a mask leaves empty (see _live_spec).
_SKIP_MASKED = True
_OCC_TILE = 32  # the occupancy's G x G tiles: the ranges' granularity (every kernel tile is a multiple)
_ONE_BLOCK: dict = {}  # per device: the [start, end) table of a single block [0, 1) (a broadcast block axis)


def _live_spec(mask: Tensor | None, tab: Tensor, n_blocks: int, lq: int, lk: int, keys: bool):
    """How a kernel finds the part of the mask that can be live for each of its blocks, so that it skips
    the tiles a mask leaves empty (causal or padding masks as tensors, e.g. transformers' [B, 1, L, L]).
    keys: per query block (tab: QTAB, 3 ints per block), the keys the mask allows to some of its rows
    (forward, dQ); else per key block (tab: KTAB, 2 per block), the queries (dK/dV). Returns (spec for
    _live, the main kernel's (slb, slh, slk) strides into the [Bm, Hm, blocks, 4] table), or (None,
    (0, 0, 0)) without a mask. A mask broadcast along the block axis has one block for all."""
    if mask is None or not _SKIP_MASKED:
        return None, (0, 0, 0)
    if mask.shape[2 if keys else 3] == 1:
        key = str(tab.device)
        if key not in _ONE_BLOCK:
            _ONE_BLOCK[key] = torch.tensor([0, 1], dtype=torch.int32, device=tab.device)
        tab, n_blocks, step = _ONE_BLOCK[key], 1, 0
    else:
        step = 3 if keys else 2
    bm, hm = mask.shape[0], mask.shape[1]
    scan_bcast = mask.shape[3 if keys else 2] == 1
    spec = (tab, n_blocks, step, keys, lk if keys else lq, scan_bcast)
    return spec, (hm * n_blocks * 4 if bm > 1 else 0, n_blocks * 4 if hm > 1 else 0, 4 if step else 0)


def _occupancy(bits: Tensor) -> Tensor:
    """[Bm * Hm, ceil(Lq_m / G), ceil(Lk_m / G)] int8: which G x G tiles of the mask (its bytes, bits;
    broadcast dims of size 1 stay 1) hold an allowed pair. One read of the mask."""
    g, c = _OCC_TILE, 4 * _OCC_TILE if _INTERPRET else 8 * _OCC_TILE
    bm, hm, lqm, lkm = bits.shape
    nr, nc = -(-lqm // g), -(-lkm // g)
    ncb = -(-lkm // c)
    occ = torch.empty(bm * hm, nr, nc, dtype=torch.int8, device=bits.device)
    with _on(bits):  # _launch: Triton's own launch path costs tens of us of host time, as long as this kernel
        _launch.launch(_occupancy_kernel, (nr * ncb * bm * hm,), (bits, occ, lqm, lkm, *_bcast_strides(bits), hm,
                       nr, nc, ncb), dict(G=g, C=c), num_warps=4, num_stages=2, interpret=_INTERPRET)
    return occ


def _live(bits: Tensor, spec, occ: dict | None = None) -> Tensor:
    """The [Bm, Hm, blocks, 4] int32 table of a _live_spec, from the mask's bytes (bits); bits itself
    (never read) without a spec. occ: a dict that keeps the mask's occupancy for the next call (a
    forward that autograd records and its backward's two kernels read one)."""
    if spec is None:
        return bits
    tab, n_blocks, step, keys, n_true, scan_bcast = spec
    o = occ.get("occ") if occ is not None else None
    if o is None:
        o = _occupancy(bits)
        if occ is not None:
            occ["occ"] = o
    out = torch.empty(bits.shape[0], bits.shape[1], n_blocks, 4, dtype=torch.int32, device=bits.device)
    with _on(bits):
        _launch.launch(_live_kernel, (n_blocks * o.shape[0],), (o, out, tab, step, o.shape[1], o.shape[2], n_true,
                       int(scan_bcast), n_blocks), dict(G=_OCC_TILE, KEYS=keys, BLOCK_S=32 if _INTERPRET else 128), num_warps=4,
                       num_stages=2, interpret=_INTERPRET)
    return out


def _bounds(bounds) -> tuple[int, int, bool, bool]:
    left, right = bounds if bounds is not None else (None, None)
    return (left or 0, right or 0, left is not None, right is not None)


def _exp_scale(bias, softcap, scale: float) -> float:
    """p = exp2(s * exp_scale - ...): the kernels' scores s are tanh(logits / softcap) with a softcap,
    q k^T alone when there is neither bias nor softcap, else logits in natural units (_logits)."""
    if softcap is not None:
        return softcap * _LOG2E
    return _LOG2E if bias is not None else scale * _LOG2E


def _out_stride(B: int, H: int, Lq: int, DV: int) -> tuple[int, int, int, int]:
    """Strides of an output [B, H, Lq, Dv] laid out [B, Lq, H, Dv] in memory (flash-attn's layout:
    merging heads afterwards is a free view)."""
    return (Lq * H * DV, DV, H * DV, 1)


def _fwd_call(q, k, v, o, mask, bias, sinks, layout, scale, softcap, bounds, cfg) -> tuple:
    """The forward kernel's launch for config cfg = (BLOCK_M, BLOCK_N, warps, stages), as
    (table tensors, grid, non-tensor arguments, constexprs, options, live spec). Its tensor arguments
    are (q, k, v, o, lse, mask bits, bias, sinks, live table, *tables); the live table is made per call
    from the mask by _live (the live spec: _live_spec)."""
    B, H, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    bm, bn, warps, stages = cfg
    tab = _tables(layout, bm, bn, q.device)
    left, right, has_l, has_r = _bounds(bounds)
    head_major = _head_major(bias, B)
    live, lstrides = _live_spec(mask, tab["qtab"], tab["n_qblocks"], Lq, Lk, keys=True)
    rest = (tab["n_qblocks"], *q.stride(), *k.stride(), *v.stride(), *o.stride(), *_bcast_strides(mask),
            *_bcast_strides(bias), H, H // Hkv, B, Lq, Lk, _guard_len(Lk, mask, bias), D, DV, scale, softcap or 1.0,
            _exp_scale(bias, softcap, scale), Lk - Lq, left, right, *lstrides)
    consts = dict(
        HAS_MASK=_mask_kind(mask), HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
        HAS_SINKS=sinks is not None, HAS_LEFT=has_l, HAS_RIGHT=has_r, HAS_LIVE=live is not None,
        EDGES=tab["edges"] or has_l or has_r, TAIL=tab["tail"],
        **_precision(q.dtype, _INTERPRET), BIG=_big(q, k, v, o, mask, bias), HEAD_MAJOR=head_major,
        GRID3=_grid3(B, H), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(DV))
    opts = dict(num_warps=warps, num_stages=stages, maxnreg=_maxnreg("fwd", D, DV, cfg))
    return ((tab["qtab"], tab["segptr"], tab["segs"]), _grid(tab["n_qblocks"], B, H, head_major), rest, consts, opts,
            live)


def _bwd_flags(q, v, mask, bias, softcap, bounds, big: bool) -> tuple[dict, tuple]:
    """The constexprs and trailing scalars the dQ and dK/dV kernels share; big: _big of the kernel's
    tensors."""
    left, right, has_l, has_r = _bounds(bounds)
    flags = dict(HAS_MASK=_mask_kind(mask), HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
                 HAS_LEFT=has_l, HAS_RIGHT=has_r, BIG=big,
                 **_precision(q.dtype, _INTERPRET), BLOCK_D=_pow2(q.shape[3]), BLOCK_DV=_pow2(v.shape[3]))
    return flags, (left, right)


def _dq_call(q, k, v, do, dq, o, has_dlse: bool, mask, bias, dbias, layout, scale, softcap, bounds, cfg) -> tuple:
    """The dQ kernel's launch (see _fwd_call); tensors (q, k, v, do, dq, lse, delta, mask bits, bias,
    dbias, o, dlse, live table, *tables). dbias: the float32 gradient buffer (None: no bias gradient); delta is
    written by the kernel."""
    B, H, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    bm, bn, warps, stages = cfg
    bias_grad = dbias is not None
    tab = _tables(layout, bm, bn, q.device)
    flags, (left, right) = _bwd_flags(q, v, mask, bias, softcap, bounds,
                                      _big(q, k, v, do, dq, o, mask, bias, dbias))
    rows = _batch_rows(bias, bias_grad, B)
    nb = B // rows  # the dQ grid's batch extent
    dq_major = _head_major(bias, B) and bias_grad
    live, lstrides = _live_spec(mask, tab["qtab"], tab["n_qblocks"], Lq, Lk, keys=True)
    rest = (tab["n_qblocks"], *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(), *o.stride(),
            *_bcast_strides(mask), *_bcast_strides(bias), *_bcast_strides(dbias),
            H, H // Hkv, nb, Lq, Lk, _guard_len(Lk, mask, bias), D, DV, scale, softcap or 1.0,
            _exp_scale(bias, softcap, scale), Lk - Lq, left, right, *lstrides)
    consts = dict(
        **flags, HAS_LIVE=live is not None, HEAD_MAJOR=dq_major, GRID3=_grid3(nb, H), ROWS=rows, HAS_DLSE=has_dlse,
        EDGES=tab["edges"] or flags["HAS_LEFT"] or flags["HAS_RIGHT"], TAIL=tab["tail"],
        BIAS_GRAD=bias_grad, DB_SUM_M=bias_grad and bias.shape[2] == 1 and Lq > 1,
        DB_SUM_N=bias_grad and bias.shape[3] == 1 and Lk > 1,
        DB_ATOMIC=bias_grad and ((bias.shape[0] == 1 and B > 1) or (bias.shape[1] == 1 and H > 1)),
        BLOCK_M=bm, BLOCK_N=bn)
    return ((tab["qtab"], tab["segptr"], tab["segs"]), _grid(tab["n_qblocks"], nb, H, dq_major), rest, consts,
            dict(num_warps=warps, num_stages=stages, maxnreg=_maxnreg("dq", D, DV, cfg)), live)


def _dkdv_call(q, k, v, do, dk, dv, mask, bias, layout, scale, softcap, bounds, cfg) -> tuple:
    """The dK/dV kernel's launch (see _fwd_call); tensors (q, k, v, do, dk, dv, lse, delta, mask bits,
    bias, live table, *tables)."""
    B, H, Lq, D = q.shape
    Hkv, Lk, DV = k.shape[1], k.shape[2], v.shape[3]
    bm, bn, warps, stages = cfg
    tab = _tables(layout, bm, bn, q.device)
    flags, (left, right) = _bwd_flags(q, v, mask, bias, softcap, bounds, _big(q, k, v, do, dk, dv, mask, bias))
    head_major = _head_major(bias, B)
    live, lstrides = _live_spec(mask, tab["ktab"], tab["n_kblocks"], Lq, Lk, keys=False)
    rest = (tab["n_kblocks"], *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            *_bcast_strides(mask), *_bcast_strides(bias),
            H, Hkv, H // Hkv, B, Lq, _guard_len(Lk, mask, bias), D, DV, scale, softcap or 1.0,
            _exp_scale(bias, softcap, scale), Lk - Lq, left, right, *lstrides)
    consts = dict(**flags, HAS_LIVE=live is not None, HEAD_MAJOR=head_major, GRID3=_grid3(B, Hkv), KALIGN=tab["kalign"], BLOCK_M=bm,
                  BLOCK_N=bn)
    return ((tab["ktab"], tab["runptr"], tab["runs"]), _grid(tab["n_kblocks"], B, Hkv, head_major), rest, consts,
            dict(num_warps=warps, num_stages=stages, maxnreg=_maxnreg("dkdv", D, DV, cfg)), live)


def _run_call(kernel, call: tuple, tensors: tuple, bits: Tensor, q: Tensor, occ: dict | None = None) -> None:
    """Launch a (tables, grid, rest, consts, options, live spec) call through _launch.launch (the tuner's
    path), on q's device; bits: the mask's bytes (or a dummy) for the live table (occ: see _live)."""
    tabs, grid, rest, consts, opts, live = call
    with _on(q):
        _launch.launch(kernel, grid, tensors + (_live(bits, live, occ),) + tabs + rest, consts,
                       interpret=_INTERPRET, **opts)


def _planned(kernel, call: tuple, device: torch.device) -> tuple:
    """(Launch, table tensors, live spec) of a call: relaunched later with the tensors (and the live
    table made from this call's mask: _live) only."""
    tabs, grid, rest, consts, opts, live = call
    return Launch(kernel, grid, rest, consts, interpret=_INTERPRET,
                  device=device.index if device.type == "cuda" else None, **opts), tabs, live


def _run_planned(plans: list, i: int, kind: str, kernel, call_for, cfg_for, tensors: tuple, bits: Tensor,
                 q: Tensor, occ: dict | None) -> None:
    """Run plans[i] (a _planned) with the tensors, on q's device. An empty slot is filled first from
    call_for(cfg) with cfg_for()'s config (_with_fallback: a smaller one if that one does not build here)."""
    def run(plan):
        launch, tabs, live = plan
        with _on(q):
            launch(*tensors, _live(bits, live, occ), *tabs)

    if plans[i] is not None:
        run(plans[i])
        return

    def make(cfg):
        plan = _planned(kernel, call_for(cfg), q.device)
        run(plan)  # builds it: a config that does not fit raises here, and is not kept
        plans[i] = plan
    _with_fallback(kind, cfg_for(), make)


# A forward's or backward's launches, kept per key: shapes, strides, dtype, flags, scalars, and the
# module knobs that tests and sweeps set. Calls repeating a key (every step of a training loop)
# skip the argument building and launch with the tensors only: at Evoformer L = 256 the host, not
# the GPU, bounds a step. Used unless the tuner is active (_tuning), which picks configs per call.
_PLANS: dict[tuple, list] = {}  # [forward] or [dQ, dK/dV]: each a _planned, or None until made
_MAX_PLANS = 256


def _plan_key(*parts) -> tuple:
    return (*parts, _config, _maxnreg, _tables, _HEAD_MAJOR, _ROWS, _GRID_AXIS_LIMIT, _INTERPRET, _SKIP_MASKED)


def _keep(key: tuple, plan: list) -> list:
    return put(_PLANS, key, plan, _MAX_PLANS)


def _meta(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype)


def _forward(q, k, v, mask, bias, sinks, layout, scale, softcap, bounds, occ: dict | None = None):
    """(o, lse). occ: a dict that keeps the mask's occupancy for the backward (see _live)."""
    B, H, Lq, D = q.shape
    DV = v.shape[3]
    o = torch.empty_strided((B, H, Lq, DV), _out_stride(B, H, Lq, DV), device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    bits = _bits(mask, q)
    tensors = (q, k, v, o, lse, bits, bias if bias is not None else q, sinks if sinks is not None else q)
    f32 = q.dtype == torch.float32
    if _INTERPRET or f32 or not _tuning():
        key = _plan_key("fwd", q.shape, q.stride(), q.dtype, k.shape, k.stride(), v.shape, v.stride(), _meta(mask),
                        _meta(bias), _guard_len(k.shape[2], mask, bias), sinks is not None, layout, scale, softcap,
                        bounds, q.device)
        def call(cfg):
            return _fwd_call(q, k, v, o, mask, bias, sinks, layout, scale, softcap, bounds, cfg)

        def default():
            return _config(D, DV, _INTERPRET, f32)["fwd"]
        _run_planned(_PLANS.get(key) or _keep(key, [None]), 0, "fwd", _fwd_kernel, call, default, tensors, bits, q,
                     occ)
        return o, lse

    def launch(cfg):
        _run_call(_fwd_kernel, _fwd_call(q, k, v, o, mask, bias, sinks, layout, scale, softcap, bounds, cfg),
                  tensors, bits, q, occ)

    with _on(q):  # the tuner's CUDA events on q's device
        _pick("fwd", _tune_key(q, k, v, mask, bias, softcap, bounds, layout) + (sinks is not None,),
              _config(D, DV, _INTERPRET, f32)["fwd"], launch)
    return o, lse


def _backward(do, q, k, v, o, lse, dlse, mask, bias, bias_grad: bool, sinks, sinks_grad: bool,
              layout, scale, softcap, bounds, kv_grad: bool = True, occ: dict | None = None):
    """(dq, dk, dv, dbias, dsinks). The dQ kernel always runs (it also sums the bias gradient);
    the dK/dV kernel only with kv_grad (else dk, dv are None). occ: the forward's (see _live)."""
    B, H, Lq, D = q.shape
    DV = v.shape[3]
    f32 = q.dtype == torch.float32
    delta = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    dlse = dlse.float().contiguous() if dlse is not None else None
    dq = torch.empty_like(q)
    # float32, the bias's own (4-D) shape: the sum over its broadcast dims happens in the dQ kernel
    dbias = _padded(bias.shape, torch.float32, q.device) if bias_grad else None  # zeros
    m = _bits(mask, q)
    occ = {} if occ is None else occ  # the mask's occupancy, made once for all three kernels' live tables (_live)
    bt = bias if bias is not None else q
    dq_in = (q, k, v, do, dq, lse, delta, m, bt, dbias if dbias is not None else q, o,
             dlse if dlse is not None else delta)
    planned = _INTERPRET or f32 or not _tuning()

    def config() -> dict:  # a plan holds its configs: the dQ programs' rows are worked out only when one is made
        return _config(D, DV, _INTERPRET, f32, _batch_rows(bias, bias_grad, B))
    cfg = None if planned else config()
    if planned:
        key = _plan_key("bwd", q.shape, q.stride(), q.dtype, k.shape, k.stride(), v.shape, v.stride(), do.stride(),
                        o.stride(), _meta(mask), _meta(bias), _guard_len(k.shape[2], mask, bias), bias_grad,
                        dlse is not None, layout, scale, softcap, bounds, q.device)
        plans = _PLANS.get(key) or _keep(key, [None, None])  # [dQ (and delta), dK/dV]

        def dq_call(cfg):
            return _dq_call(q, k, v, do, dq, o, dlse is not None, mask, bias, dbias, layout, scale, softcap, bounds,
                            cfg)
        _run_planned(plans, 0, "dq", _bwd_dq_kernel, dq_call, lambda: config()["dq"], dq_in, m, q, occ)
    else:
        key = _tune_key(q, k, v, mask, bias, softcap, bounds, layout) + (bias_grad, dlse is not None)
        with _on(q):  # the tuner's CUDA events on q's device
            _pick("dq", key, cfg["dq"], lambda c: _run_call(_bwd_dq_kernel, _dq_call(
                q, k, v, do, dq, o, dlse is not None, mask, bias, dbias, layout, scale, softcap, bounds, c), dq_in, m, q,
                occ),
                reset=dbias.zero_ if dbias is not None else None)
    # The bias gradient in the bias's dtype now, so that its float32 buffer is freed before dk and dv
    # exist: the backward's peak memory holds one copy of it, not two.
    dq_in = None  # drops its reference to the float32 bias gradient (the lambda above is done with it)
    dbias = dbias.to(bias.dtype) if dbias is not None else None
    dk = dv = None
    if kv_grad:
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dkdv_in = (q, k, v, do, dk, dv, lse, delta, m, bt)
        if planned:
            def dkdv_call(cfg):
                return _dkdv_call(q, k, v, do, dk, dv, mask, bias, layout, scale, softcap, bounds, cfg)
            _run_planned(plans, 1, "dkdv", _bwd_dkdv_kernel, dkdv_call, lambda: config()["dkdv"], dkdv_in, m, q, occ)
        else:
            with _on(q):
                _pick("dkdv", key, cfg["dkdv"], lambda c: _run_call(_bwd_dkdv_kernel, _dkdv_call(
                    q, k, v, do, dk, dv, mask, bias, layout, scale, softcap, bounds, c), dkdv_in, m, q, occ))
    dsinks = None
    if sinks_grad:  # d lse / d sink = p_sink: the sink's share of every row's softmax
        # a row whose lse is -inf (no key, sink -inf) has p_sink 0, not exp(-inf - -inf) = NaN
        p_sink = torch.where(torch.isneginf(lse), 0.0, torch.exp(sinks.float().view(1, H, 1) - lse))
        dsinks = (-(p_sink * delta).sum(dim=(0, 2))).to(sinks.dtype)
    return dq, dk, dv, dbias, dsinks


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, sinks, mask, layout, scale, softcap, bounds):
        ctx.set_materialize_grads(False)  # an unused lse gets no gradient: no zeros to read back
        bias = _aligned(bias)  # here, not recorded by autograd: no extra nodes in the backward
        ctx.occ = {}  # the mask's occupancy (a small int8 tensor): the backward's live tables reuse it
        o, lse = _forward(q, k, v, mask, bias, sinks, layout, scale, softcap, bounds, ctx.occ)
        # the mask too: autograd then refuses a backward after an in-place change of it (the occupancy
        # above, and the forward's output, are of the mask as it was)
        ctx.save_for_backward(q, k, v, o, lse, bias, sinks, mask)
        ctx.layout, ctx.scale, ctx.softcap, ctx.bounds = layout, scale, softcap, bounds
        return o, lse

    @staticmethod
    @first_order_only("the triton backend")
    def backward(ctx, do, dlse):
        q, k, v, o, lse, bias, sinks, mask = ctx.saved_tensors
        if do is None:  # only lse was used
            do = torch.zeros_like(o)
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        sinks_grad = sinks is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dbias, dsinks = _backward(do, q, k, v, o, lse, dlse, mask, bias, bias_grad,  # do: any strides
                                              sinks, sinks_grad, ctx.layout, ctx.scale, ctx.softcap, ctx.bounds,
                                              kv_grad=ctx.needs_input_grad[1] or ctx.needs_input_grad[2],
                                              occ=ctx.occ)
        return dq, dk, dv, dbias, dsinks, None, None, None, None, None


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
                    bias: Tensor | None = None, layout: SegmentLayout | None = None, scale: float | None = None,
                    softcap: float | None = None, sinks: Tensor | None = None,
                    bounds: tuple[int | None, int | None] | None = None) -> tuple[Tensor, Tensor]:
    """Fused attention over a segment layout. q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv].

    mask: bool, broadcastable 4-D [B|1, Hq|1, Lq|1, Lk|1] (True = attend), read in place. Tiles it leaves
      empty at a block's start or end (causal, window or padding masks as tensors) are skipped, and a run
      of tiles it allows whole runs without reading it: one pass over the mask first finds, per block,
      the range that can be live and that run (_live).
    bias: additive logits, the same broadcastable 4-D shapes, read in place; its gradient (when it
      requires one) comes back in its own shape, summed over the broadcast dims inside the kernel.
      A mask or bias whose strides (but the last) are not multiples of 16 elements is copied once,
      in its own shape, into rows padded to 16 (the kernels' loads are then vectors: ~8x faster).
    layout: which query runs see which key segments (default: dense).
    softcap: logits (scores plus bias) become softcap * tanh(logits / softcap) before masking.
    sinks: [Hq] logits that join each row's softmax denominator with no value (differentiable).
    bounds: (left, right) key offsets around the bottom-right diagonal (None side = unbounded).
    Returns (out [B, Hq, Lq, Dv], lse [B, Hq, Lq] float32, -inf on rows with no key and no sink);
    both are differentiable.
    """
    if triton is None:
        raise RuntimeError(TRITON_ERROR)
    Lq, Lk = q.shape[2], k.shape[2]
    if layout is None:
        layout = dense_layout(Lq, Lk)
    elif (layout.len_q, layout.len_k) != (Lq, Lk):
        raise ValueError(f"layout is for Lq={layout.len_q}, Lk={layout.len_k}; q/k have Lq={Lq}, Lk={Lk}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not scale > 0:  # the kernels track row maxima of unscaled scores
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if bias is not None and bias.dim() != 4:
        raise ValueError(f"bias must be 4-D (broadcastable to [B, Hq, Lq, Lk]), got shape {list(bias.shape)}")
    if sinks is not None and sinks.shape != (q.shape[1],):
        raise ValueError(f"sinks must have shape [Hq] = [{q.shape[1]}], got {list(sinks.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0, got {softcap!r}")
    softcap = None if softcap is None else float(softcap)
    mask = _aligned(mask)
    if sinks is not None:
        sinks = sinks.contiguous()  # the kernels read sinks[h] at h (a strided or expanded view would be misread)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (q, k, v, bias, sinks)):
        return _forward(q, k, v, mask, _aligned(bias), sinks, layout, float(scale), softcap, bounds)  # no autograd node
    return _FlashAttention.apply(q, k, v, bias, sinks, mask, layout, float(scale), softcap, bounds)
