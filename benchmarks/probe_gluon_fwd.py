#!/usr/bin/env python
"""Probe (issue 5): a Gluon forward for Hopper with the bias added by the tensor cores. Not a backend.

Our Triton forward spends ~7 of its ~11 instructions per score on the softmax and 2 on the bias (a
bf16 -> fp32 widening and an FMA with the scale). Gluon (Triton's lower-level dialect, in the triton
3.6 wheel as triton.experimental.gluon) lets the tensor cores do that part instead:

    S = bias_tile @ I + (q * scale) @ K^T          (two wgmma products into one accumulator)
    p = exp2(S * log2e - m * log2e)                (one FMA + one MUFU per score)

The bias tile goes from global memory to shared memory by cp.async and is read by the wgmma as its A
operand (no ldmatrix, no widening); I is a [BN, BN] identity kept in shared memory; q is scaled and
rounded to the input dtype once per program (as SDPA's math path scales q). The PV product can run
asynchronously beside the next tile's softmax (OVERLAP, FA3's intra-warpgroup overlap).

The probe's kernel handles what issue 5's benchmark needs and nothing more: bias [1 or B, H, Lq, Lk]
(last dim contiguous), no mask, Lk a multiple of 64, D a multiple of 16 up to 128, bf16 / fp16.

    python benchmarks/probe_gluon_fwd.py --build [--BM 64 --warps 4] [--no-overlap] [--maxnreg N]
        # CPU: build for sm_90a (offline_build's stand-in driver), print registers, shared memory and
        # the inner loop's instructions per score
    python benchmarks/probe_gluon_fwd.py
        # CUDA: error vs float64 on 4 rows (and bf16 math's), then time our Triton forward, compiled
        # FlexAttention and the Gluon variants on issue 5's Evoformer shapes (min of 3 interleaved rounds)

Results (H100, 2026-11-24): docs/benchmarks.md, "A Gluon forward with the bias on the tensor cores".
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (  # noqa: E402
    async_copy, fence_async_shared, warpgroup_mma, warpgroup_mma_wait)


@gluon.jit
def _gluon_fwd_kernel(Q, K, V, O, LSE, BIAS,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, sbb, sbh, sbm,
                 H, LQ, LK, scale,
                 BM: gl.constexpr, BN: gl.constexpr, D: gl.constexpr, HAS_BIAS: gl.constexpr,
                 OVERLAP: gl.constexpr = True):
    """One [BM, D] query block of one (b, h). Prefetch distance 1: tile j + 1's K, V and bias load
    (cp.async) during tile j. K and bias: 2 buffers (tile j's are free once S_j is waited for); V: 3
    (PV_{j-1} still reads V_{j-1} during iteration j). OVERLAP: S_j's softmax runs while PV_{j-1} is on
    the tensor cores (FA3's intra-warpgroup overlap; 12 more registers)."""
    pid_m = gl.program_id(0)
    b = gl.program_id(1)
    h = gl.program_id(2)
    dtype: gl.constexpr = Q.dtype.element_ty
    NW: gl.constexpr = gl.num_warps()
    LOG2E: gl.constexpr = 1.4426950408889634

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1], instr_shape=[16, D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    TPC: gl.constexpr = D // 8  # threads along D, 16-byte vectors
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPC, TPC], [NW, 1], [1, 0])
    BTPC: gl.constexpr = BN // 8
    bl_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // BTPC, BTPC], [NW, 1], [1, 0])
    kv_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, D], dtype)
    b_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, BN], dtype)
    e_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, BN], dtype)

    # q * scale, rounded once to the input dtype (as SDPA's math path scales q), as the A operand in registers
    qm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, a_layout))
    qd = gl.arange(0, D, layout=gl.SliceLayout(0, a_layout))
    q = gl.load(Q + b * sqb + h * sqh + qm[:, None] * sqm + qd[None, :], mask=qm[:, None] < LQ, other=0.0)
    qa = (q.to(gl.float32) * scale).to(dtype)

    k_smem = gl.allocate_shared_memory(dtype, [2, BN, D], kv_sl)
    v_smem = gl.allocate_shared_memory(dtype, [3, BN, D], kv_sl)
    dd = gl.arange(0, D, layout=gl.SliceLayout(0, ld_layout))
    kn = gl.arange(0, BN, layout=gl.SliceLayout(1, ld_layout))
    k_ptrs = K + b * skb + h * skh + kn[:, None] * skn + dd[None, :]
    v_ptrs = V + b * svb + h * svh + kn[:, None] * svn + dd[None, :]
    n_tiles = LK // BN
    if HAS_BIAS:
        bias_smem = gl.allocate_shared_memory(dtype, [2, BM, BN], b_sl)
        bm_ = gl.minimum(pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, bl_layout)), LQ - 1)
        bn_ = gl.arange(0, BN, layout=gl.SliceLayout(0, bl_layout))
        bc_ptrs = BIAS + b * sbb + h * sbh + bm_[:, None] * sbm + bn_[None, :]
        er = gl.arange(0, BN, layout=gl.SliceLayout(1, bl_layout))
        eye_smem = gl.allocate_shared_memory(dtype, [BN, BN], e_sl,
                                             gl.where(er[:, None] == bn_[None, :], 1.0, 0.0).to(dtype))

    v_smem.index(2).store(gl.zeros([BN, D], dtype, ld_layout))  # read (times P = 0) before the first tile
    fence_async_shared()  # the generic-proxy stores above (identity, zeros) before wgmma reads them
    async_copy.async_copy_global_to_shared(k_smem.index(0), k_ptrs)
    async_copy.async_copy_global_to_shared(v_smem.index(0), v_ptrs)
    if HAS_BIAS:
        async_copy.async_copy_global_to_shared(bias_smem.index(0), bc_ptrs)
    async_copy.commit_group()

    zero_s = gl.zeros([BM, BN], gl.float32, s_layout)
    m_i = gl.full([BM], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, s_layout))
    o = gl.zeros([BM, D], gl.float32, o_layout)
    p = zero_s
    for j in range(0, n_tiles):
        nxt = gl.minimum(j + 1, n_tiles - 1)  # past the end: reload the last tile (never read)
        async_copy.async_copy_global_to_shared(k_smem.index((j + 1) % 2), k_ptrs + nxt * BN * skn)
        async_copy.async_copy_global_to_shared(v_smem.index((j + 1) % 3), v_ptrs + nxt * BN * svn)
        if HAS_BIAS:
            async_copy.async_copy_global_to_shared(bias_smem.index((j + 1) % 2), bc_ptrs + nxt * BN)
        async_copy.commit_group()
        async_copy.wait_group(1)
        gl.thread_barrier()
        if HAS_BIAS:
            s_tok = warpgroup_mma(bias_smem.index(j % 2), eye_smem, zero_s, use_acc=False, is_async=True)
            s_tok = warpgroup_mma(qa, k_smem.index(j % 2).permute((1, 0)), s_tok, is_async=True)
        else:
            s_tok = warpgroup_mma(qa, k_smem.index(j % 2).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        # P_{j-1} V_{j-1} (P = 0 before the first tile: adds nothing)
        pb = gl.convert_layout(p.to(dtype), p_layout)
        o_tok = warpgroup_mma(pb, v_smem.index((j + 2) % 3), o, is_async=True)
        if OVERLAP:
            s = warpgroup_mma_wait(1, deps=(s_tok,))
        else:
            s, o, pb = warpgroup_mma_wait(0, deps=(s_tok, o_tok, pb))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        alpha = gl.exp2((m_i - m_new) * LOG2E)
        p = gl.exp2(gl.fma(s, LOG2E, -(m_new * LOG2E)[:, None]))  # one FMA per score: scale and bias are in s
        l_i = l_i * alpha + gl.sum(p, 1)
        if OVERLAP:
            o, pb = warpgroup_mma_wait(0, deps=(o_tok, pb))
        o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        m_i = m_new

    pb = gl.convert_layout(p.to(dtype), p_layout)
    o = warpgroup_mma(pb, v_smem.index((n_tiles - 1) % 3), o)
    async_copy.wait_group(0)
    o = o / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    om = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
    od = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + b * sob + h * soh + om[:, None] * som + od[None, :], o.to(dtype), mask=om[:, None] < LQ)
    lse = m_i + gl.log2(l_i) / LOG2E
    lm = pid_m * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
    gl.store(LSE + (b * H + h) * LQ + lm, lse, mask=lm < LQ)


def gluon_fwd(q, k, v, bias, scale: float, BM: int = 64, BN: int = 64, warps: int = 4, overlap: bool = True):
    """(grid, arguments, constexprs, out, lse) of one launch; q, k, v [B, H, L, D], bias broadcastable to
    [B, H, Lq, Lk]."""
    B, H, L, D = q.shape
    LK = k.shape[2]
    if LK % BN or D % 16 or D > 128 or any(t.stride(3) != 1 for t in (q, k, v)):
        raise ValueError(f"the probe needs Lk % {BN} == 0, D % 16 == 0, D <= 128 and contiguous head dims")
    o = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    if bias is not None:
        bb = bias.expand(B, H, L, LK)
        sb = bb.stride()
        if sb[3] != 1:
            raise ValueError("the probe needs the bias's last dim contiguous")
    else:
        bb, sb = q, (0, 0, 0, 0)
    grid = (triton.cdiv(L, BM), B, H)
    args = (q, k, v, o, lse, bb, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *sb[:3],
            H, L, LK, scale)
    consts = dict(BM=BM, BN=BN, D=D, HAS_BIAS=bias is not None, OVERLAP=overlap, num_warps=warps)
    return grid, args, consts, o, lse


VARIANTS = {  # name: (gluon_fwd keywords, register cap)
    "g64_overlap": (dict(BM=64, warps=4), None),
    "g64": (dict(BM=64, warps=4, overlap=False), None),
    "g64_cap104": (dict(BM=64, warps=4, overlap=False), 104),
    "g128x8w": (dict(BM=128, warps=8, overlap=False), None),
}


def build(args) -> None:
    import offline_build as ob
    from triton.runtime import driver
    driver.set_active(ob._Hopper())
    B, H, L, D = 2, 2, 512, args.D
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(3))
    bias = None if args.no_bias else torch.randn(1, H, L, L, dtype=torch.bfloat16)
    grid, a, consts, _, _ = gluon_fwd(q, k, v, bias, D ** -0.5, BM=args.BM, warps=args.warps,
                                      overlap=not args.no_overlap)
    built = _gluon_fwd_kernel.warmup(*a, **consts, grid=grid, **({"maxnreg": args.maxnreg} if args.maxnreg else {}))
    regs, spills = ob.ptxas_stats(built.asm["ptx"])
    per = args.BM * 64 / (32 * args.warps)
    loops = ", ".join(f"{n} ({n / per:.2f} per score)" for n in ob.loop_sizes(built.asm["cubin"]))
    print(f"registers {regs}, spill stores {spills} B, shared memory {built.metadata.shared} B; "
          f"innermost MMA loop: {loops}")


def rel(a, c) -> float:
    """Relative L2 error of a against c, in float64."""
    return ((a.double() - c.double()).norm() / c.double().norm()).item()


def evoformer_cases(D: int = 32):
    """Issue 5's Evoformer shapes on CUDA, bf16, pair bias [1, H, L, L]: yields (name, q, k, v, bias, scale,
    flops, rows, (o64, lse64), peers), where (o64, lse64) is the float64 reference on batch rows `rows`
    and peers holds our Triton forward and compiled FlexAttention (score_mod reading the bias)."""
    import harness as hn
    import attnkit
    from attnkit.ops import flash_attention as fa

    dev = torch.device("cuda")
    flex = hn.compiled_flex()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    for name, B, H, L in [("MSA L=256", 128, 8, 256), ("MSA L=512", 128, 8, 512), ("MSA L=1024", 128, 8, 1024),
                          ("triangle L=256", 256, 4, 256), ("triangle L=512", 512, 4, 512)]:
        g = torch.Generator(device=dev).manual_seed(1)
        q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        bias = torch.randn(1, H, L, L, device=dev, dtype=torch.bfloat16, generator=g)
        scale, flops = D ** -0.5, 4.0 * B * H * D * L * L
        rows = slice(0, 4)  # float64 reference on 4 rows; bf16 math's error there for the 2-3x rule
        ref = attnkit.attention(q[rows].double(), k[rows].double(), v[rows].double(), bias=bias.double(), scale=scale,
                                backend="reference", return_lse=True)
        layout, bias_al, pair = fa.dense_layout(L, L), fa._aligned(bias), bias[0]
        peers = {"triton": lambda: fa._forward(q, k, v, None, bias_al, None, layout, scale, None, None),
                 "flex": lambda: flex(q, k, v, score_mod=lambda s, b, h, i, j: s + pair[h, i, j], scale=scale)}
        yield name, q, k, v, bias, scale, flops, rows, ref, peers


def report(name: str, errs: list[str], fns: dict, flops: float, rows, ref, variants) -> None:
    """Print the errors (ours appended) and the min-of-rounds timings of fns, with ratios for `variants`."""
    import harness as hn
    ot, lt = fns["triton"]()
    errs.append(f"triton {rel(ot[rows], ref[0]):.2e} (lse {rel(lt[rows], ref[1]):.1e})")
    print(f"{name}: error vs float64, out (lse): " + ", ".join(errs), flush=True)
    best = hn.best_of_rounds(fns)
    print("  ms (TFLOP/s): " + ", ".join(f"{n} {best[n]:.4f} ({flops / best[n] / 1e9:.0f})" for n in fns), flush=True)
    print("  triton / variant: " + ", ".join(f"{n} {best['triton'] / best[n]:.3f}" for n in variants)
          + ";  flex / variant: " + ", ".join(f"{n} {best['flex'] / best[n]:.3f}" for n in variants), flush=True)


def run() -> None:
    for name, q, k, v, bias, scale, flops, r, ref, fns in evoformer_cases():
        sb = (q[r] @ k[r].transpose(-1, -2)) * scale + bias
        errs = [f"bf16 math {rel(torch.softmax(sb.float(), -1).to(torch.bfloat16) @ v[r], ref[0]):.2e}"]
        for vname, (kw, cap) in VARIANTS.items():
            grid, a, consts, o, lse = gluon_fwd(q, k, v, bias, scale, **kw)
            if cap:
                consts["maxnreg"] = cap
            _gluon_fwd_kernel[grid](*a, **consts)
            errs.append(f"{vname} {rel(o[r], ref[0]):.2e} (lse {rel(lse[r], ref[1]):.1e})")
            fns[vname] = lambda grid=grid, a=a, consts=consts: _gluon_fwd_kernel[grid](*a, **consts)
        report(name, errs, fns, flops, r, ref, VARIANTS)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", action="store_true", help="offline sm_90a build on this machine (no GPU needed)")
    ap.add_argument("--BM", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--D", type=int, default=32)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--no-bias", action="store_true")
    ap.add_argument("--maxnreg", type=int, default=None)
    args = ap.parse_args()
    if args.build:
        build(args)
    elif torch.cuda.is_available():
        run()
    else:
        print("no CUDA device: use --build for the offline build")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
