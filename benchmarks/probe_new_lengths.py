#!/usr/bin/env python
"""Probe: the host cost of a shape never seen before, per step of a cache growing by one key.

Decode steps over plain K/V tensors (q [1, 32, Lq, 128], k/v views [1, 8, L, 128] of one buffer, bf16,
causal), 600 steps per path, each path on lengths no other path has used (L = 1025, 1026, ... for the
first; the next starts where it ended), a synchronize after every step, wall time per step. cuDNN builds
an execution graph for every new shape; our decode kernel keeps one plan per split cap and compiles per
what Triton specialises its ints on. Paths, in this order (the order matters: SDPA's kernel choice
depends on whether an order was ever set in the process):

- `sdpa`: attnkit's sdpa backend (cuDNN first for a family's first CUDNN_GRAPHS_PER_FAMILY shapes);
- `auto`: attnkit.attention with backend="auto";
- `direct`: F.scaled_dot_product_attention (lower-right causal mask for Lq > 1);
- `triton`: the decode kernel, forced;
- with --forced, then: `cudnn` and `flash`, SDPA called directly inside `sdpa_kernel(...)` of that kernel.

    python benchmarks/probe_new_lengths.py [--lq 1 4] [--steps 600] [--forced]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnkit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lq", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--forced", action="store_true", help="also SDPA's cuDNN and flash kernels, forced")
    args = ap.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    B, HQ, HKV, D, L0, N = 1, 32, 8, 128, 1024, args.steps
    kinds = ("sdpa", "auto", "direct", "triton") + (("cudnn", "flash") if args.forced else ())
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, Hq {HQ}, Hkv {HKV}, D {D}, "
          f"B {B}, causal; {N} new lengths per path from {L0 + 1}, wall time per step (synchronised)")
    g = torch.Generator(device="cuda").manual_seed(0)
    for Lq in args.lq:
        q = torch.randn(B, HQ, Lq, D, device="cuda", dtype=torch.bfloat16, generator=g)
        bk = torch.randn(B, HKV, L0 + len(kinds) * N, D, device="cuda", dtype=torch.bfloat16, generator=g)
        bv = torch.randn(B, HKV, L0 + len(kinds) * N, D, device="cuda", dtype=torch.bfloat16, generator=g)

        def direct(k, v):
            mask = causal_lower_right(Lq, k.shape[2]) if Lq > 1 else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

        def forced(kernel):
            def f(k, v):
                with sdpa_kernel(kernel):
                    return direct(k, v)
            return f
        paths = {"direct": direct, "cudnn": forced(SDPBackend.CUDNN_ATTENTION),
                 "flash": forced(SDPBackend.FLASH_ATTENTION)}
        start = L0
        for kind in kinds:
            f = paths.get(kind) or (lambda k, v, be=kind: attnkit.attention(q, k, v, causal=True, backend=be))
            ts = []
            try:
                with torch.no_grad():
                    for s in range(N):
                        L = start + s + 1
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        f(bk[:, :, :L], bv[:, :, :L])
                        torch.cuda.synchronize()
                        ts.append(time.perf_counter() - t0)
            except RuntimeError as e:  # a forced kernel that does not take the call
                print(f"Lq {Lq} {kind:>6}: {str(e).splitlines()[0][:100]}")
                start += N
                continue
            start += N
            srt = sorted(ts)
            slow = [i for i, t in enumerate(ts) if t > 5e-3]
            print(f"Lq {Lq} {kind:>6}: total {sum(ts):.3f} s; median {srt[N // 2] * 1e6:.0f} us, "
                  f"p99 {srt[int(N * 0.99)] * 1e6:.0f} us, max {srt[-1] * 1e3:.1f} ms; steps over 5 ms: {len(slow)} "
                  f"{slow[:12]}")


if __name__ == "__main__":
    main()
