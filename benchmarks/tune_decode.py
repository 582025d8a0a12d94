#!/usr/bin/env python
"""Split-count and tile sweep for attnkit's paged decode kernel (ops/decode_attention.py), CUDA only.

    python benchmarks/tune_decode.py [--cases 128x8192,8x32768] [--splits 1,2,4] [--configs 64:4:5,128:4:4]
                                     [--page 16] [--out FILE]

For each case (batch x cached length; GQA 32/8, D = 128, bf16, one query per sequence, pool
blocks in shuffled order) and each (BLOCK_N, num_warps, num_stages) x num_splits, times the
paged decode call (CUDA events, median of 5 rounds of 20 calls; launches included, as a
decode step pays them) and prints K/V GB/s; cuDNN SDPA over a contiguous cache of the same
shape, timed before and after in the same process, gives the ratio. "d" marks the split
count of the current rule (num_splits_for).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import torch
import torch.nn.functional as F

from attnkit.ops import decode_attention as da

HQ, HKV, D = 32, 8, 128


def bench(fn, n: int = 20, rounds: int = 5) -> float:
    """Median ms per call over `rounds` timings of `n` back-to-back calls. Not harness.time_fn, which
    times each call alone: decode steps run back to back, so their launch gaps overlap the kernels."""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / n)
    return sorted(ts)[len(ts) // 2]


def sweep_case(B: int, L: int, page: int, configs: list, splits: list) -> str:
    g = torch.Generator(device="cuda").manual_seed(0)
    nb = B * L // page
    k = torch.randn(nb, HKV, page, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    table = torch.randperm(nb, device="cuda", generator=g).to(torch.int32).view(B, -1)
    lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
    q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    kc = torch.randn(B, HKV, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    nbytes = B * L * HKV * 2 * D * 2
    rule = da.num_splits_for(B * HKV, L, q.device)

    def cudnn():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, kc, vc, enable_gqa=True)

    t_cudnn = [bench(cudnn)]
    ref = da.decode_attention(q, k, v, cache_seqlens=lens, block_table=table, return_lse=False)[0]
    orig = da._config
    cells = []
    try:
        for cfg in configs:
            da._config = lambda d, dv, f32, rows, paged=False, cfg=cfg: (orig(d, dv, f32, rows, paged)[0],) + cfg
            for S in dict.fromkeys([rule] + splits):
                da._PLANS.clear()

                def call():
                    return da.decode_attention(q, k, v, cache_seqlens=lens, block_table=table, return_lse=False,
                                               num_splits=S)

                err = (call()[0].float() - ref.float()).abs().max().item()
                mark = "d" if S == rule else ""
                bad = "" if err < 2e-2 else f" BAD {err:.1e}"
                cells.append((nbytes / bench(call) / 1e6, f"{cfg[0]}:{cfg[1]}:{cfg[2]} S{S}{mark}{bad}"))
    finally:
        da._config = orig
        da._PLANS.clear()
    t_cudnn.append(bench(cudnn))
    cu = nbytes / (sum(t_cudnn) / 2) / 1e6
    best = max(cells)
    row = " ".join(f"{name}={gbs:.0f}" for gbs, name in cells)
    return f"B{B} x {L}: cuDNN {cu:.0f} GB/s | best {best[1]} {best[0]:.0f} ({best[0] / cu:.3f}) | {row}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="128x8192,32x8192,32x32768,8x32768,8x131072,1x131072")
    ap.add_argument("--splits", default="1,2,3,4,6")
    ap.add_argument("--configs", default="64:4:5,128:4:4", help="BLOCK_N:num_warps:num_stages, comma-separated")
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--out", default=None, help="also write the lines to this file")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_decode.py needs CUDA")
    cases = [tuple(int(x) for x in c.split("x")) for c in a.cases.split(",")]
    configs = [tuple(int(x) for x in c.split(":")) for c in a.configs.split(",")]
    splits = [int(s) for s in a.splits.split(",")]
    head = (f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, page {a.page}, "
            f"GQA {HQ}/{HKV}, D {D}, bf16; paged K/V GB/s per (BLOCK_N:warps:stages S splits)")
    print(head, flush=True)
    lines = [head]
    for B, L in cases:
        lines.append(sweep_case(B, L, a.page, configs, splits))
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
