#!/usr/bin/env python
"""Probe: the chunk length of attnkit's causal linear-attention kernels, and where their time goes.

Causal elu linear attention through `linear_attention(..., backend="triton")`, B 4, H 8, D = Dv 64, bf16,
L = 4096 and 16384, forward and forward+backward, for each chunk length in --chunks (ops.chunk_product.CHUNK:
states [B, H, L / CHUNK, M, E] make four trips through memory per product, the in-chunk product grows with
CHUNK). Each chunk length is first checked against the float64 formula on [1, 2, 2048, 64] (forward and the
three gradients; BAD over 2e-2), then timed in alternating rounds (median ms per round, the least of the
rounds). Last, at the default chunk length, a torch.profiler split of one forward and one forward+backward
per L, causal and not: GPU time per kernel name and in all, beside the wall time (their gap is host time:
Python, autograd, launches).

    python benchmarks/probe_linear.py [--chunks 64 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import torch  # noqa: E402

import harness as H  # noqa: E402
from attnkit.ops import chunk_product as cp  # noqa: E402
from attnkit.ops import linear_attention  # noqa: E402
from bench_linear import check  # noqa: E402


def step(q, k, v, do, mode, causal=True):
    if mode == "fwd":
        with torch.no_grad():
            return linear_attention(q, k, v, causal=causal, backend="triton")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    return torch.autograd.grad(linear_attention(*leaves, causal=causal, backend="triton"), leaves, do)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    variants = args.chunks
    default = cp.CHUNK

    def use(variant):
        cp.CHUNK = variant
    dev = torch.device("cuda")
    meta = H.collect_meta(dev)
    print(f"{meta.get('device_name')}, {meta['date_utc']}, torch {torch.__version__}, triton {meta.get('triton')}")
    fn = lambda q, k, v: linear_attention(q, k, v, causal=True, backend="triton")  # noqa: E731
    for variant in variants:
        use(variant)
        err = check(fn, True, dev, torch.bfloat16, grads=True)
        print(f"chunk {variant}: fwd+bwd error against float64 {err:.2e}"
              f"{'  BAD' if err > 2e-2 else ''}")
    for L in (4096, 16384):
        g = torch.Generator(device=dev).manual_seed(L)
        q, k, v, do = (torch.randn(4, 8, L, 64, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(4))
        for mode in ("fwd", "fwd+bwd"):
            best = {vr: float("inf") for vr in variants}
            for r in range(args.rounds):
                for variant in variants if r % 2 == 0 else variants[::-1]:
                    use(variant)
                    best[variant] = min(best[variant], H.time_fn(lambda: step(q, k, v, do, mode), warmup=10, rep=50))
            base = best[variants[0]]
            print(f"L={L} {mode}: " + ", ".join(f"chunk {c} {ms:.4f} ms (x{base / ms:.3f})"
                                                for c, ms in best.items()), flush=True)
    from torch.profiler import ProfilerActivity, profile

    use(default)
    for L in (4096, 16384):
        q, k, v, do = (torch.randn(4, 8, L, 64, device=dev, dtype=torch.bfloat16) for _ in range(4))
        for causal in (True, False):
            for mode in ("fwd", "fwd+bwd"):
                for _ in range(3):
                    step(q, k, v, do, mode, causal)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    step(q, k, v, do, mode, causal)
                    torch.cuda.synchronize()
                rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
                gpu = sum(e.device_time_total for e in rows) / 1e3
                wall = H.time_fn(lambda: step(q, k, v, do, mode, causal), warmup=5, rep=30)
                print(f"chunk {default}, {'causal' if causal else 'not causal'}, one {mode} at L={L}: GPU {gpu:.3f} ms "
                      f"in all, wall {wall:.3f} ms; per kernel:")
                for e in rows[:6]:
                    print(f"  {e.device_time_total / 1e3:8.3f} ms  x{e.count:<3d} {e.key[:90]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
