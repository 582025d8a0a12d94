#!/usr/bin/env python
"""Probe (issue 6): TMA loads for the split-KV decode kernel, and the device's streaming-read ceiling. CUDA only.

    python benchmarks/probe_tma_decode.py [--ceilings]      # PAGE=128 (env) sets the pool's block size

A copy of the decode kernel's split program whose K/V tiles come through host-side tensor descriptors
(Hopper's TMA engine) instead of pointer loads: contiguous caches and pages of >= BLOCK_N tokens only
(one block id per tile), full tiles only (the grid's lengths are multiples of 128), no masks, windows,
softcap or sinks; the splits are merged by the library's merge launch of that day (the tree of b5ea606:
the merge has since moved into the split kernel, so this probe runs on that tree only, e.g. in
`git worktree add /tmp/probe b5ea606`). Per case it prints K/V GB/s
and the ratio to cuDNN over a contiguous cache for the library's kernels and for the TMA kernel over
five (BLOCK_N, warps, stages) configs and three split counts, with the max |difference| to the
library's output. --ceilings first measures a 4 GiB streaming read with pointer and TMA loads (1-4
programs per SM), torch.sum and a device copy. Not a backend: measured on 2026-11-24 and not kept
(docs/benchmarks.md, "The read ceilings of the access orders").
"""
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor
from attnkit.ops import decode_attention as da
from tune_decode import bench  # median ms of rounds of back-to-back calls

if not hasattr(da, "_decode_merge_kernel"):
    raise SystemExit("probe_tma_decode.py needs the decode module of b5ea606 (its separate merge launch); "
                     "run it in a worktree of that commit")

HQ, HKV, D = 32, 8, 128


@triton.jit
def _tma_split(Q, KD, VD, LENS, BT, O, W, sqb, sqh, sbtb, sob, soh,
               Hq, Hkv, G, LK, NUM_SPLITS, W_LSE, scale,
               PAGED: tl.constexpr, PAGE: tl.constexpr, FINAL: tl.constexpr, D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    hk = pid % Hkv
    b = pid // Hkv
    r = tl.arange(0, BLOCK_M)
    row_ok = r < G
    h = hk * G + r
    dq = tl.arange(0, D)
    q = tl.load(Q + b.to(tl.int64) * sqb + h[:, None] * sqh + dq[None, :], mask=row_ok[:, None], other=0.0)
    seqlen = tl.load(LENS + b)
    n_tiles = seqlen // BLOCK_N
    per = tl.cdiv(n_tiles, NUM_SPLITS)
    t_start = split * per
    t_end = tl.minimum(t_start + per, n_tiles)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    qs = scale * 1.4426950408889634
    for t in range(t_start, t_end):
        if PAGED:
            blk = tl.load(BT + b * sbtb + (t * BLOCK_N) // PAGE)
            row0 = (blk * Hkv + hk) * PAGE + (t * BLOCK_N) % PAGE
        else:
            row0 = (b * Hkv + hk) * LK + t * BLOCK_N
        k = KD.load([row0, 0])
        v = VD.load([row0, 0])
        s = tl.dot(q, tl.trans(k)) * qs
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(tl.where(dead, 1.0, l_i))) * 0.6931471805599453)
    if FINAL:
        tl.store(O + b.to(tl.int64) * sob + h[:, None] * soh + dq[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])
    else:
        prow = (b.to(tl.int64) * Hq + h) * NUM_SPLITS + split
        tl.store(W + prow[:, None] * D + dq[None, :], out, mask=row_ok[:, None])
        tl.store(W + W_LSE + prow, lse, mask=row_ok)


@triton.jit
def _read_ptr(X, N_ROWS, ROWS_PER, OUT, BLOCK: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    r0 = pid * ROWS_PER
    q = tl.full([16, D], 1.0, tl.bfloat16)
    acc = tl.zeros([16, BLOCK], tl.float32)
    d = tl.arange(0, D)
    for t in range(0, ROWS_PER // BLOCK):
        rows = (r0 + t * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        x = tl.load(X + rows[:, None] * D + d[None, :])
        acc += tl.dot(q, tl.trans(x))
    tl.store(OUT + pid * 16 * BLOCK + tl.arange(0, 16)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], acc)


@triton.jit
def _read_tma(XD, N_ROWS, ROWS_PER, OUT, BLOCK: tl.constexpr, D: tl.constexpr):
    pid = tl.program_id(0)
    r0 = pid * ROWS_PER
    q = tl.full([16, D], 1.0, tl.bfloat16)
    acc = tl.zeros([16, BLOCK], tl.float32)
    for t in range(0, ROWS_PER // BLOCK):
        x = XD.load([r0 + t * BLOCK, 0])
        acc += tl.dot(q, tl.trans(x))
    tl.store(OUT + pid * 16 * BLOCK + tl.arange(0, 16)[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], acc)


def ceilings():
    n_rows = 16 * 1024 * 1024  # 4 GiB of bf16 [n_rows, 128]
    x = torch.randn(n_rows, D, device="cuda", dtype=torch.bfloat16)
    nbytes = x.numel() * 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"read ceiling, 4 GiB bf16 [{n_rows}, 128]")
    t = bench(lambda: x.sum(dtype=torch.float32), n=5)
    print(f"  torch sum: {nbytes / t / 1e6:.0f} GB/s")
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x), n=5)
    print(f"  torch copy (read+write): {2 * nbytes / t / 1e6:.0f} GB/s")
    for per_sm in (1, 2, 3, 4):
        progs = per_sm * sms
        for block, stages, warps in ((128, 3, 4), (128, 4, 4), (64, 4, 4), (128, 6, 4), (64, 8, 4)):
            rows_per = (n_rows // progs) // block * block
            out = torch.empty(progs * 16 * block, device="cuda", dtype=torch.float32)
            desc = TensorDescriptor(x, [n_rows, D], [D, 1], [block, D])
            try:
                tp = bench(lambda: _read_ptr[(progs,)](x, n_rows, rows_per, out, BLOCK=block, D=D,
                                                        num_warps=warps, num_stages=stages), n=5)
                tt = bench(lambda: _read_tma[(progs,)](desc, n_rows, rows_per, out, BLOCK=block, D=D,
                                                        num_warps=warps, num_stages=stages), n=5)
                b = progs * rows_per * D * 2
                print(f"  {per_sm}/SM block {block} stages {stages}: pointer {b / tp / 1e6:.0f}  tma {b / tt / 1e6:.0f} GB/s",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  {per_sm}/SM block {block} stages {stages}: {type(e).__name__}: {str(e)[:200]}")


def case(B, L, page, configs):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kc = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    nb = B * L // page
    kp = torch.randn(nb, HKV, page, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vp = torch.randn_like(kp)
    table = torch.randperm(nb, device="cuda", generator=g).to(torch.int32).view(B, -1)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    nbytes = B * L * HKV * 2 * D * 2
    scale = 1 / math.sqrt(D)

    def cudnn():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

    lib_c = lambda: da.decode_attention(q, kc, vc, cache_seqlens=lens, return_lse=False)
    lib_p = lambda: da.decode_attention(q, kp, vp, cache_seqlens=lens, block_table=table, return_lse=False)
    ref_c = lib_c()[0].float()
    ref_p = lib_p()[0].float()

    def make(paged, S, bn, warps, stages):
        k, v = (kp, vp) if paged else (kc, vc)
        kd = TensorDescriptor(k, [k.numel() // D, D], [D, 1], [bn, D])
        vd = TensorDescriptor(v, [v.numel() // D, D], [D, 1], [bn, D])
        rows_m = B * HQ
        w_lse = -(-rows_m * S * D // 16) * 16
        plan = da._plan(q, k, v, table if paged else None, True, None, None, False, None, S, False)

        def call():
            o = torch.empty_strided(plan.out_size, plan.out_stride, dtype=q.dtype, device="cuda")
            w = torch.empty(plan.w_size, device="cuda", dtype=torch.float32) if S > 1 else o
            _tma_split[(B * HKV, S)](q, kd, vd, lens, table, o, w, q.stride(0), q.stride(1), table.stride(0),
                                     plan.out_stride[0], plan.out_stride[1], HQ, HKV, HQ // HKV, L if not paged else 0,
                                     S, w_lse, scale, PAGED=paged, PAGE=page if paged else 1, FINAL=S == 1, D=D,
                                     BLOCK_M=16, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            if S > 1:
                plan.merge(w, q, o, o)
            return o
        return call

    rule = da.num_splits_for(B * HKV, L, q.device)
    t_cu = [bench(cudnn)]
    res = {"lib contiguous": bench(lib_c), "lib paged": bench(lib_p)}
    errs = {}
    for paged in (False, True):
        for S in dict.fromkeys([rule, max(1, rule // 2), rule * 2]):
            for bn, warps, stages in configs:
                name = f"tma {'paged' if paged else 'contig'} S{S}{'d' if S == rule else ''} {bn}:{warps}:{stages}"
                try:
                    fn = make(paged, S, bn, warps, stages)
                    o = fn().float()
                    errs[name] = (o - (ref_p if paged else ref_c)).abs().max().item()
                    res[name] = bench(fn)
                except Exception as e:  # noqa: BLE001
                    print(f"  {name}: {type(e).__name__}: {str(e)[:300]}")
    t_cu.append(bench(cudnn))
    cu = nbytes / (sum(t_cu) / 2) / 1e6
    print(f"B{B} x {L} page {page}: cuDNN {cu:.0f} GB/s ({t_cu[0]*1e3:.1f}/{t_cu[1]*1e3:.1f} us)")
    for name, t in res.items():
        gbs = nbytes / t / 1e6
        e = errs.get(name)
        print(f"  {name:32s} {gbs:6.0f} GB/s  {gbs / cu:.3f}" + (f"  err {e:.1e}" if e is not None else ""))
    sys.stdout.flush()


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("probe_tma_decode.py needs CUDA")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    if "--ceilings" in sys.argv:
        ceilings()
    configs = [(128, 4, 3), (128, 4, 4), (64, 4, 4), (64, 4, 6), (128, 8, 4)]
    page = int(os.environ.get("PAGE", "128"))
    cases = [(8, 32768), (8, 131072), (32, 8192), (32, 32768), (32, 131072), (128, 8192), (128, 32768), (1, 131072)]
    for B, L in cases:
        case(B, L, page, configs)
        torch.cuda.empty_cache()
