#!/usr/bin/env python
"""Probe (issue 5): a one-pass backward for a bias shared by the batch. Not a backend.

Today's backward runs two kernels that each recompute the scores and probabilities: dQ (which also adds
the bias gradient, two batch rows per atomic) and dK/dV. Here one kernel does both, as FlashAttention-2
does: a program owns one key block of ROWS batch rows of one head and walks the query blocks; dK and dV
stay in registers, dQ goes out by float32 atomics, and the rows' ds add up before one bias-gradient atomic.
The scores are computed once instead of twice; the price is the dQ atomics (per key block, [BM, D] floats
per row).

Restrictions: bias [1, H, L, L] (bf16 or float32), Lq = Lk = L a multiple of BM and BN, D a power of two,
B a multiple of ROWS, contiguous [B, H, L, D] inputs, no mask, no causal.

    python benchmarks/probe_fused_bwd.py --build    # offline sm_90a builds: registers, spills, loop sizes
    TRITON_INTERPRET=1 python benchmarks/probe_fused_bwd.py --check   # CPU: against float64, small shapes
    python benchmarks/probe_fused_bwd.py            # CUDA: error vs float64, the L2's atomic-add rate, then
                                                    # today's backward against the variants on issue 5's
                                                    # shapes (kernel level)

A second variant keeps today's dK/dV kernel and replaces the dQ kernel (_dq_batch_kernel): one program per
(query block, key block, head) loops over a chunk of the batch rows, so the bias gradient sums in registers.
Results (H100, 2026-11-24): both slower than today's backward (0.72-0.87x); docs/benchmarks.md, "A one-pass
backward, and a dQ kernel that loops over the batch".
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from attnkit.ops import flash_attention as fa  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _pre_kernel(O, DO, DELTA, DQ, L, D: tl.constexpr, BM: tl.constexpr):
    """delta = rowsum(dO * O) of one query block of one (b, h); zeroes its float32 dQ rows."""
    m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    rows = m * BM + tl.arange(0, BM)
    cols = tl.arange(0, D)
    off = bh * L * D + rows[:, None] * D + cols[None, :]
    o = tl.load(O + off).to(tl.float32)
    do = tl.load(DO + off).to(tl.float32)
    tl.store(DELTA + bh * L + rows, tl.sum(o * do, 1))
    tl.store(DQ + off, tl.zeros([BM, D], tl.float32))


@triton.jit
def _row(Q, DO, LSE, DELTA, DQ, dk, dv, k, v, bias, b, h, H, L, rows, cols, scale, ds_sum,
         D: tl.constexpr, PRECISION: tl.constexpr):
    """One batch row's share of a (query tile, key block): dv, dk accumulate, dq goes out by atomics."""
    bh = (b * H + h).to(tl.int64)
    off = bh * L * D + rows[:, None] * D + cols[None, :]
    q = tl.load(Q + off)
    do = tl.load(DO + off)
    lse = tl.load(LSE + bh * L + rows) * 1.4426950408889634
    delta = tl.load(DELTA + bh * L + rows)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + bias
    p = tl.exp2(s * 1.4426950408889634 - lse[:, None])
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dsl = ds.to(q.dtype)
    dk = tl.dot(tl.trans(dsl), q, dk, input_precision=PRECISION)
    dq = tl.dot(dsl, k, input_precision=PRECISION)
    tl.atomic_add(DQ + off, dq, sem="relaxed")
    return dk, dv, ds_sum + ds


@triton.jit
def _fused_bwd_kernel(Q, K, V, DO, LSE, DELTA, BIAS, DQ, DK, DV, DB, H, L, scale,
                      ROWS: tl.constexpr, ROTATE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      D: tl.constexpr, PRECISION: tl.constexpr):
    kb = tl.program_id(0)
    b0 = tl.program_id(1) * ROWS
    h = tl.program_id(2)
    keys = kb * BN + tl.arange(0, BN)
    cols = tl.arange(0, D)
    koff = keys[:, None] * D + cols[None, :]
    bh0 = (b0 * H + h).to(tl.int64) * L * D
    k0 = tl.load(K + bh0 + koff)
    v0 = tl.load(V + bh0 + koff)
    dk0 = tl.zeros([BN, D], tl.float32)
    dv0 = tl.zeros([BN, D], tl.float32)
    if ROWS == 2:
        bh1 = ((b0 + 1) * H + h).to(tl.int64) * L * D
        k1 = tl.load(K + bh1 + koff)
        v1 = tl.load(V + bh1 + koff)
        dk1 = tl.zeros([BN, D], tl.float32)
        dv1 = tl.zeros([BN, D], tl.float32)
    n_m = L // BM
    bias_h = BIAS + h.to(tl.int64) * L * L
    db_h = DB + h.to(tl.int64) * L * L
    for i in range(0, n_m):
        mb = i
        if ROTATE:  # programs of other key blocks start elsewhere: their dQ atomics hit other rows
            mb = (i + kb) % n_m
        rows = mb * BM + tl.arange(0, BM)
        boff = rows[:, None] * L + keys[None, :]
        bias = fa._bias(bias_h, rows[:, None], keys[None, :], True, L, 1)
        ds_sum = tl.zeros([BM, BN], tl.float32)
        dk0, dv0, ds_sum = _row(Q, DO, LSE, DELTA, DQ, dk0, dv0, k0, v0, bias, b0, h, H, L, rows, cols, scale,
                                ds_sum, D, PRECISION)
        if ROWS == 2:
            dk1, dv1, ds_sum = _row(Q, DO, LSE, DELTA, DQ, dk1, dv1, k1, v1, bias, b0 + 1, h, H, L, rows, cols,
                                    scale, ds_sum, D, PRECISION)
        tl.atomic_add(db_h + boff, ds_sum, sem="relaxed")
    tl.store(DK + bh0 + koff, (dk0 * scale).to(DK.dtype.element_ty))
    tl.store(DV + bh0 + koff, dv0.to(DV.dtype.element_ty))
    if ROWS == 2:
        tl.store(DK + bh1 + koff, (dk1 * scale).to(DK.dtype.element_ty))
        tl.store(DV + bh1 + koff, dv1.to(DV.dtype.element_ty))


def fused_backward(do, q, k, v, o, lse, bias, scale, ROWS=2, BM=64, BN=64, warps=4, stages=2, rotate=False,
                   maxnreg=None, launch=True):
    """(dq, dk, dv, dbias) of attention with a bias [1, H, L, L] shared by the batch; or, launch=False,
    the kernels' (grid, args, constexprs) for an offline build."""
    B, H, L, D = q.shape
    dev = q.device
    delta = torch.empty(B, H, L, device=dev, dtype=torch.float32)
    dq32 = torch.empty(B, H, L, D, device=dev, dtype=torch.float32)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    db = torch.zeros(1, H, L, L, device=dev, dtype=torch.float32)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    pre = ((L // BM, B * H), (o, do, delta, dq32, L), dict(D=D, BM=BM))
    consts = dict(ROWS=ROWS, ROTATE=rotate, BM=BM, BN=BN, D=D, PRECISION=prec, num_warps=warps, num_stages=stages)
    if maxnreg:
        consts["maxnreg"] = maxnreg
    main = ((L // BN, B // ROWS, H), (q, k, v, do, lse, delta, bias, dq32, dk, dv, db, H, L, scale), consts)
    if not launch:
        return pre, main
    _pre_kernel[pre[0]](*pre[1], **pre[2])
    _fused_bwd_kernel[main[0]](*main[1], **main[2])
    return (dq32 * scale).to(q.dtype), dk, dv, db.to(bias.dtype)


@triton.jit
def _dq_batch_kernel(Q, K, V, DO, LSE, DELTA, BIAS, DQ, DB, H, L, scale, RB,
                     ATOMIC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr,
                     PRECISION: tl.constexpr):
    """dQ and the bias gradient of one (query block, key block) tile of one head, over RB batch rows:
    the bias tile is read and widened once, the bias gradient sums in registers over the rows (one
    store, or one atomic per chunk of rows), and dQ goes out by atomics ([BM, D] per row and tile)."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    h = tl.program_id(2) % H
    b0 = tl.program_id(2) // H * RB
    rows = i * BM + tl.arange(0, BM)
    keys = j * BN + tl.arange(0, BN)
    cols = tl.arange(0, D)
    qoff = rows[:, None] * D + cols[None, :]
    koff = keys[:, None] * D + cols[None, :]
    boff = h.to(tl.int64) * L * L + rows[:, None] * L + keys[None, :]
    bias = fa._bias(BIAS, boff, 0, True, 1, 0) * 1.4426950408889634
    db = tl.zeros([BM, BN], tl.float32)
    for b in range(b0, b0 + RB):
        bh = (b * H + h).to(tl.int64)
        q = tl.load(Q + bh * L * D + qoff)
        do = tl.load(DO + bh * L * D + qoff)
        k = tl.load(K + bh * L * D + koff)
        v = tl.load(V + bh * L * D + koff)
        lse = tl.load(LSE + bh * L + rows) * 1.4426950408889634
        delta = tl.load(DELTA + bh * L + rows)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        p = tl.exp2(s * (scale * 1.4426950408889634) + (bias - lse[:, None]))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        db += ds
        dq = tl.dot(ds.to(q.dtype), k, input_precision=PRECISION)
        tl.atomic_add(DQ + bh * L * D + qoff, dq, sem="relaxed")
    if ATOMIC:
        tl.atomic_add(DB + boff, db, sem="relaxed")
    else:
        tl.store(DB + boff, db)


def dq_batch(do, q, k, v, o, lse, bias, scale, RB=None, BM=64, BN=64, warps=4, stages=2, maxnreg=None,
             launch=True):
    """(dq, dbias) by _dq_batch_kernel; RB: batch rows per program (default: enough chunks of the batch for
    ~4 programs per SM)."""
    B, H, L, D = q.shape
    dev = q.device
    if RB is None:
        tiles = H * (L // BM) * (L // BN)
        chunks = 1
        while tiles * chunks < 4 * 132 and B % (2 * chunks) == 0:
            chunks *= 2
        RB = B // chunks
    delta = torch.empty(B, H, L, device=dev, dtype=torch.float32)
    dq32 = torch.empty(B, H, L, D, device=dev, dtype=torch.float32)
    atomic = RB < B
    db = (torch.zeros if atomic else torch.empty)(1, H, L, L, device=dev, dtype=torch.float32)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    pre = ((L // BM, B * H), (o, do, delta, dq32, L), dict(D=D, BM=BM))
    consts = dict(ATOMIC=atomic, BM=BM, BN=BN, D=D, PRECISION=prec, num_warps=warps, num_stages=stages)
    if maxnreg:
        consts["maxnreg"] = maxnreg
    main = ((L // BM, L // BN, H * (B // RB)), (q, k, v, do, lse, delta, bias, dq32, db, H, L, scale, RB), consts)
    if not launch:
        return pre, main
    _pre_kernel[pre[0]](*pre[1], **pre[2])
    _dq_batch_kernel[main[0]](*main[1], **main[2])
    return (dq32 * scale).to(q.dtype), db.to(bias.dtype)


DQ_VARIANTS = {  # name: dq_batch keywords
    "dqb_64x64": dict(),
    "dqb_64x128": dict(BN=128),
    "dqb_64x128_w8": dict(BN=128, warps=8),
    "dqb_128x128_w8": dict(BM=128, BN=128, warps=8),
    "dqb_64x64_s3": dict(stages=3),
    "dqb_64x64@168": dict(maxnreg=168),
}


@triton.jit
def _red_kernel(DST, N, ROUNDS, BM: tl.constexpr, BN: tl.constexpr):
    """Atomic float32 adds of [BM, BN] tiles into DST (N tiles, cycled): the L2's reduction ceiling."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    val = tl.full([BM, BN], 1.0, tl.float32)
    for r in range(ROUNDS):
        t = (pid * ROUNDS + r) % N
        tl.atomic_add(DST + t.to(tl.int64) * BM * BN + offs, val, sem="relaxed")


def atomic_ceiling() -> None:
    import harness as hn
    for mib in (4, 32, 256):
        n = mib * 2**20 // (64 * 64 * 4)
        dst = torch.zeros(n * 64 * 64, device="cuda")
        progs, rounds = 132 * 16, 64
        fn = lambda: _red_kernel[(progs,)](dst, n, rounds, BM=64, BN=64, num_warps=4)  # noqa: E731
        ms = min(hn.time_fn(fn, warmup=10, rep=50) for _ in range(3))
        byts = progs * rounds * 64 * 64 * 4
        print(f"atomic float32 adds into {mib} MiB: {byts / ms / 1e6:.0f} GB/s of addends ({ms:.3f} ms)", flush=True)


VARIANTS = {  # name: fused_backward keywords (offline sm_90a builds: registers, spills, loop instructions per score)
    "r1@168": dict(ROWS=1, maxnreg=168),  # 168, 0, 17.0: 3 programs per SM
    "r2": dict(ROWS=2),  # 255, 88 B, 14.8
    "r2_rot": dict(ROWS=2, rotate=True),
}

def _reference(do, q, k, v, bias, scale):
    q64, k64, v64, b64 = (t.double().requires_grad_() for t in (q, k, v, bias))
    p = torch.softmax(q64 @ k64.transpose(-1, -2) * scale + b64, -1)
    o = p @ v64
    o.backward(do.double())
    return o, torch.logsumexp(q64 @ k64.transpose(-1, -2) * scale + b64, -1), (q64.grad, k64.grad, v64.grad, b64.grad)


def rel(a, c) -> float:
    return ((a.double() - c.double()).norm() / c.double().norm()).item()


def check() -> None:
    """Against float64 on small shapes (CPU interpreter or CUDA)."""
    dev = torch.device("cuda" if torch.cuda.is_available() and not fa._INTERPRET else "cpu")
    dt = torch.float32 if dev.type == "cpu" else torch.bfloat16
    for B, H, L, D in [(4, 2, 64, 32), (2, 3, 128, 16)]:
        g = torch.Generator(device=dev).manual_seed(3)
        q, k, v, do = (torch.randn(B, H, L, D, device=dev, dtype=dt, generator=g) for _ in range(4))
        bias = torch.randn(1, H, L, L, device=dev, dtype=dt, generator=g)
        scale = D ** -0.5
        o64, lse64, ref = _reference(do, q, k, v, bias, scale)
        o, lse = o64.to(dt), lse64.float()
        blk = 32 if dev.type == "cpu" else 64
        for rows in (1, 2):
            got = fused_backward(do, q, k, v, o, lse, bias, scale, ROWS=rows, BM=blk, BN=blk, warps=4, rotate=rows == 2)
            print(f"check B{B} H{H} L{L} D{D} {dt} rows {rows}: "
                  + " ".join(f"{n} {rel(a, c):.2e}" for n, a, c in zip(("dq", "dk", "dv", "dbias"), got, ref)),
                  flush=True)
        for rb in sorted({2, B}):
            got = dq_batch(do, q, k, v, o, lse, bias, scale, RB=rb, BM=blk, BN=blk, warps=4)
            print(f"check B{B} H{H} L{L} D{D} {dt} dq_batch, {rb} rows per program: "
                  f"dq {rel(got[0], ref[0]):.2e} dbias {rel(got[1], ref[3]):.2e}", flush=True)


def build() -> None:
    import offline_build as ob
    from triton.runtime import driver
    driver.set_active(ob._Hopper())
    B, H, L, D = 4, 2, 512, 32
    q, k, v, do, o = (torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(5))
    lse = torch.randn(B, H, L)
    bias = torch.randn(1, H, L, L, dtype=torch.bfloat16)
    for name, kw in VARIANTS.items():
        _, (grid, a, consts) = fused_backward(do, q, k, v, o, lse, bias, D ** -0.5, launch=False, **kw)
        built = _fused_bwd_kernel.warmup(*a, **consts, grid=grid)
        regs, spills = ob.ptxas_stats(built.asm["ptx"])
        sass = ob.loop_sizes(built.asm["cubin"])
        per = kw.get("BM", 64) * kw.get("BN", 64) * kw.get("ROWS", 2) / (32 * kw.get("warps", 4))
        loops = ", ".join(f"{n} ({n / per:.2f} per score)" for n in sass)
        print(f"{name}: registers {regs}, spills {spills} B, shared {built.metadata.shared} B, loops {loops}",
              flush=True)


def run() -> None:
    import harness as hn
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    check()
    atomic_ceiling()
    D = 32
    for name, B, H, L in [("MSA L=256", 128, 8, 256), ("MSA L=512", 128, 8, 512), ("MSA L=1024", 128, 8, 1024),
                          ("triangle L=256", 256, 4, 256), ("triangle L=512", 512, 4, 512)]:
        g = torch.Generator(device=dev).manual_seed(1)
        q, k, v, do = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        bias = torch.randn(1, H, L, L, device=dev, dtype=torch.bfloat16, generator=g)
        scale = D ** -0.5
        lay, ab = fa.dense_layout(L, L), fa._aligned(bias)
        o, lse = fa._forward(q, k, v, None, ab, None, lay, scale, None, None)
        o = o.contiguous()  # the forward lays o out [B, L, H, D]; the probe's kernels read [B, H, L, D]
        fns = {"today": lambda: fa._backward(do, q, k, v, o, lse, None, None, ab, True, None, False, lay, scale,
                                             None, None)[:4]}
        base = fns["today"]()
        errs = []
        for vname, kw in VARIANTS.items():
            try:
                got = fused_backward(do, q, k, v, o, lse, bias, scale, **kw)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001  (a variant that fails to build or run is reported, not fatal)
                print(f"  {vname}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            errs.append(f"{vname} " + "/".join(f"{rel(a, c):.1e}" for a, c in zip(got, base)))
            fns[vname] = lambda kw=kw: fused_backward(do, q, k, v, o, lse, bias, scale, **kw)
        print(f"{name}: vs today's backward (dq/dk/dv/dbias): " + ", ".join(errs), flush=True)
        best = hn.best_of_rounds(fns)
        flops = 2.5 * 4.0 * B * H * D * L * L
        print("  ms (TFLOP/s): " + ", ".join(f"{n} {best[n]:.4f} ({flops / best[n] / 1e9:.0f})" for n in fns),
              flush=True)
        print("  today / variant: " + ", ".join(f"{n} {best['today'] / best[n]:.3f}" for n in fns if n != "today"),
              flush=True)
        # dQ + bias gradient alone: today's dQ kernel (kv_grad=False) against the batch-loop kernel
        fns = {"today_dq": lambda: fa._backward(do, q, k, v, o, lse, None, None, ab, True, None, False, lay, scale,
                                                None, None, kv_grad=False)}
        errs = []
        for vname, kw in DQ_VARIANTS.items():
            try:
                got = dq_batch(do, q, k, v, o, lse, bias, scale, **kw)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                print(f"  {vname}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            errs.append(f"{vname} {rel(got[0], base[0]):.1e}/{rel(got[1], base[3]):.1e}")
            fns[vname] = lambda kw=kw: dq_batch(do, q, k, v, o, lse, bias, scale, **kw)
        print("  dq only, vs today's (dq/dbias): " + ", ".join(errs), flush=True)
        best2 = hn.best_of_rounds(fns)
        dkdv = best["today"] - best2["today_dq"]
        print("  dq-only ms: " + ", ".join(f"{n} {best2[n]:.4f}" for n in fns)
              + f"; today's dK/dV (difference) {dkdv:.4f}", flush=True)
        print("  whole backward with it, today / (variant + today's dK/dV): " + ", ".join(
            f"{n} {best['today'] / (best2[n] + dkdv):.3f}" for n in fns if n != "today_dq"), flush=True)


if __name__ == "__main__":
    if "--build" in sys.argv[1:]:
        build()
    elif "--check" in sys.argv[1:] or not torch.cuda.is_available():
        check()
    else:
        run()
