#!/usr/bin/env python
"""Ring and all-to-all attention across processes, checked against one process.

Starts `--world` processes (gloo on the CPU, or NCCL with `--device cuda`, one GPU each), gives
every rank its zigzag shard of one random causal sequence whose length does not divide by
2 x world (it is padded), runs `attnkit.distributed.context_parallel_attention` with each
strategy forward and backward, gathers output and gradients, and compares them with
`attnkit.attention` over the whole sequence in one process. Exit code 0 when they agree.

    python examples/ring_attention.py [--world 2] [--length 45] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
import torch.distributed as dist

import attnkit
import attnkit.distributed as cp


def run(rank: int, world: int, init_file: str, args) -> None:
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="file://" + init_file,
                            rank=rank, world_size=world)
    B, Hq, Hkv, L, D = 1, 4, 2, args.length, 16
    g = torch.Generator().manual_seed(0)  # the same full sequence on every rank
    q, k, v = (torch.randn(B, h, L, D, generator=g).to(device) for h in (Hq, Hkv, Hkv))
    g_out = torch.randn(B, Hq, L, D, generator=g).to(device)

    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = attnkit.attention(*full, causal=True)
    ref_grads = torch.autograd.grad(ref, full, g_out)

    ok = True
    for strategy in ("ring", "all_to_all"):
        # This rank's zigzag shards (zero-padded to a multiple of 2 x world); the true length as seq_len.
        loc = [cp.shard_sequence(t, rank, world, layout="zigzag").requires_grad_(True) for t in (q, k, v)]
        out = cp.context_parallel_attention(*loc, strategy=strategy, causal=True, layout="zigzag", seq_len=L)
        grads = torch.autograd.grad(out, loc, cp.shard_sequence(g_out, rank, world, layout="zigzag"))
        got = [cp.unshard_sequence(t, layout="zigzag", seq_len=L) for t in (out.detach(), *grads)]
        errs = [float((a - b).norm() / b.norm()) for a, b in zip(got, (ref.detach(), *ref_grads))]
        ok &= max(errs) < 1e-4
        if rank == 0:
            print(f"{strategy:>10}: {world} ranks x {loc[0].shape[2]} positions (length {L}, padded to "
                  f"{cp.padded_length(L, world, 'zigzag')}): relative error out {errs[0]:.1e}, "
                  f"dq {errs[1]:.1e}, dk {errs[2]:.1e}, dv {errs[3]:.1e}")
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--length", type=int, default=45)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(run, args=(args.world, os.path.join(tmp, "init"), args), nprocs=args.world)
    print("ok: both strategies equal single-process attention")
    return 0


if __name__ == "__main__":
    sys.exit(main())
