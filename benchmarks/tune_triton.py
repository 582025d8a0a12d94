#!/usr/bin/env python
"""Block-size sweep for attnkit's Triton attention kernels (ops/flash_attention.py), CUDA only.

    python benchmarks/tune_triton.py [--out DIR] [--quick]

For each workload and each candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) of the
forward, dQ and dK/dV kernels, times the kernel call alone (CUDA events, median) and prints
ms and TFLOP/s; the current default configuration is marked. Workloads: dense and causal
bf16 attention, the two MixedAttention layouts of issue 4 as GroupMask layouts, and Evoformer
shapes with a [1, H, L, L] pair bias (its gradient included in the backward).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import torch

import harness as H
from attnkit.groups import SegmentLayout
from attnkit.ops import flash_attention as fa

CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 128, 4, 3),
            (64, 64, 4, 2), (128, 128, 4, 2)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3)],
    # not (32, 128, 8, 2): Triton 3.6 builds it wrong at D = 128 (dK 1.7-7.1e-2 off; tests/test_triton.py,
    # test_cuda_autotune_candidates_match_reference)
    "dkdv": [(64, 64, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2)],
}
# A candidate whose outputs differ from the default config's by more than this (relative L2) is
# reported WRONG and not timed: the configs differ only in summation order (~1e-3 in bf16).
MISMATCH = 1e-2


def group_layout(sizes, patterns) -> SegmentLayout:
    spans, s = {}, 0
    for g, n in sizes:
        spans[g] = (s, s + n)
        s += n
    return SegmentLayout(s, s, tuple((tuple(spans[g] for g in qs), tuple(spans[g] for g in kv)) for qs, kv in patterns))


def workloads(quick: bool):
    k = 1024
    a = group_layout([("sa", 16 * k), ("sq", 16 * k), ("va", 16 * k), ("vq", 64 * k)],
                     [(["sa", "sq"], ["sa"]), (["va", "vq"], ["va"])])
    b = group_layout([(f"g{i}", 512) for i in range(8)],
                     [([f"g{i}"], ["g0"] if i == 0 else ["g0", f"g{i}"]) for i in range(8)])
    # (name, B, H, L, D, layout, bounds, pair bias [1, H, L, L] with its gradient)
    out = [
        ("mixed_b_8x512_H12_D64", 4, 12, 4096, 64, b, None, False),
        ("mixed_a_abupt_H12_D64", 1, 12, a.len_q, 64, a, None, False),
        ("dense_L4096_H32_D64", 4, 32, 4096, 64, None, None, False),
        ("causal_L4096_H16_D128", 4, 16, 4096, 128, None, (None, 0), False),
        ("dense_L4096_H16_D128", 4, 16, 4096, 128, None, None, False),
        ("evo_msa_B128_H8_L512_D32", 128, 8, 512, 32, None, None, True),
        ("evo_msa_B128_H8_L1024_D32", 128, 8, 1024, 32, None, None, True),
        ("evo_tri_B256_H4_L256_D32", 256, 4, 256, 32, None, None, True),
    ]
    return out[:2] if quick else out


def pairs_of(layout: SegmentLayout | None, L: int, bounds) -> int:
    if layout is None:
        return L * (L + 1) // 2 if bounds is not None else L * L
    return sum(sum(e - s for s, e in qr) * sum(e - s for s, e in ks) for qr, ks in layout.sets)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", default=None, help="workloads whose name contains one of these")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("CUDA only")
        return 0
    dev = torch.device("cuda")
    default = fa._config
    recs = []
    for name, B, Hh, L, D, layout, bounds, has_bias in workloads(args.quick):
        if args.only and not any(x in name for x in args.only):
            continue
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(B, Hh, L, D, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
        bias = torch.randn(1, Hh, L, L, device=dev, dtype=torch.bfloat16, generator=g) if has_bias else None
        do = torch.randn_like(q)
        lay = layout if layout is not None else fa.dense_layout(L, L)
        flops = 4.0 * B * Hh * D * pairs_of(layout, L, bounds)
        fwd_args = (q, k, v, None, bias, None, lay, D ** -0.5, None, bounds)
        o, lse = fa._forward(*fwd_args)
        bwd_args = (do, q, k, v, o, lse, None, None, bias, has_bias, None, False, lay, D ** -0.5, None, bounds)
        want = {"fwd": [o], "bwd": [g for g in fa._backward(*bwd_args)[:4] if g is not None]}
        rows = fa._batch_rows(bias, has_bias, B)
        base = default(D, D, False, False, rows)
        for kind, cands in CANDIDATES.items():
            for cfg in cands:
                def cfg_fn(d, dv, interp, f32=False, rows=1, *, _k=kind, _c=cfg):
                    c = dict(default(d, dv, interp, f32, rows))
                    c[_k] = _c
                    return c
                fa._config = cfg_fn
                try:
                    if kind == "fwd":
                        fn = lambda: fa._forward(*fwd_args)[:1]  # noqa: E731
                        mult = 1.0
                    else:
                        fn = lambda: [g for g in fa._backward(*bwd_args)[:4] if g is not None]  # noqa: E731
                        mult = 2.5  # the whole backward (both kernels) is timed; only `kind`'s config varies
                    diff = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                               for a, b in zip(fn(), want["fwd" if kind == "fwd" else "bwd"]))
                    if diff > MISMATCH:
                        raise ValueError(f"WRONG: outputs {diff:.1e} off the default config's")
                    ms = H.time_fn(fn, warmup=5, rep=20)
                    err = None
                except Exception as e:  # a config that does not fit (shared memory) is recorded, not fatal
                    ms, err = None, f"{type(e).__name__}: {str(e)[:100]}"
                finally:
                    fa._config = default
                mark = "*" if cfg == base[kind] else " "
                tf = flops * mult / (ms * 1e-3) / 1e12 if ms else None
                recs.append(dict(workload=name, kernel=kind, config=cfg, default=cfg == base[kind], ms=ms,
                                 tflops=tf, error=err))
                print(f"{name:28s} {kind:5s} {mark}{str(cfg):20s} "
                      + (f"{ms:8.3f} ms {tf:7.1f} TFLOP/s" if ms else err), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "tune_triton.json"), "w") as f:
            json.dump(recs, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
