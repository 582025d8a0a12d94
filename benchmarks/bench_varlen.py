#!/usr/bin/env python
"""Varlen prefill (issue 6): packed sequences of different lengths in one call.

    python benchmarks/bench_varlen.py --out DIR        # CUDA: the grid below
    python benchmarks/bench_varlen.py --smoke --out DIR  # tiny shapes, any device

Workload: 16 sequences with seeded lengths in [64, 4096] (one packing, flash-attn's cu_seqlens
layout), GQA 32/8, D = 128, bf16; causal (bottom-right per sequence) and not; forward and
forward+backward (grads of q, k, v). Peers, in one process on the same inputs:

- attnkit_auto / attnkit_triton / attnkit_flex: `attnkit.varlen_attention` (one contract call with
  a document mask: the Triton kernel visits the diagonal tiles only; FlexAttention a block mask);
- sdpa_loop: one `F.scaled_dot_product_attention` call per sequence (what users write without a
  varlen kernel; SDPA picks its kernel);
- sdpa_padded: the batch padded to the longest sequence with a key-padding mask (SDPA with a
  boolean attn_mask; causal folded into the mask).

TFLOP/s count the pairs each sequence attends (4 * Hq * D per pair forward; fwd+bwd = 3.5x),
never the padding. ratio: over the best non-attnkit peer. check: relative L2 error of the
output (fwd+bwd: and of dq, dk, dv, the worst) against attnkit's reference backend in float32,
one call per sequence (BAD > 2e-2). Writes DIR/varlen.json (harness.write_report: every row)
and DIR/varlen.md.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import torch
import torch.nn.functional as F

import harness as H

HQ, HKV = 32, 8


def lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(x) for x in torch.randint(lo, hi + 1, (n,), generator=g)]


def peers(q, k, v, cu, lens, causal):
    """name -> fn(q, k, v) returning the packed output [total, Hq, D]."""
    import attnkit

    def varlen(backend):
        return lambda q, k, v: attnkit.varlen_attention(q, k, v, cu, cu, causal=causal, backend=backend)

    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)

    def loop(q, k, v):
        outs = []
        for a, b in zip(offs, offs[1:]):
            qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    B, Lmax = len(lens), max(lens)
    pos = torch.arange(Lmax, device=q.device)
    valid = pos[None, :] < torch.tensor(lens, device=q.device)[:, None]  # [B, Lmax]
    keep = valid[:, None, None, :]
    if causal:  # equal query and key lengths: bottom-right is top-left
        keep = keep & (pos[None, None, :, None] >= pos[None, None, None, :])
    idx = torch.cat([torch.arange(n, device=q.device) + b * Lmax for b, n in enumerate(lens)])

    def padded(q, k, v):
        def pad(t):
            out = t.new_zeros(B * Lmax, *t.shape[1:])
            out = out.index_copy(0, idx, t)
            return out.view(B, Lmax, *t.shape[1:]).transpose(1, 2)
        o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keep, enable_gqa=True)
        return o.transpose(1, 2).reshape(B * Lmax, *o.shape[1:2], o.shape[-1]).index_select(0, idx)

    return {"attnkit_auto": varlen("auto"), "attnkit_triton": varlen("triton"), "attnkit_flex": varlen("flex"),
            "sdpa_loop": loop, "sdpa_padded": padded}


def reference(q, k, v, do, lens, causal):
    """(out, (dq, dk, dv)) in float32 from attnkit's reference backend, one call per sequence (the
    packed [total, total] scores would not fit at the benchmark's lengths)."""
    import attnkit
    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    outs, a = [], 0
    for n in lens:
        qi, ki, vi = (t[a:a + n].transpose(0, 1)[None] for t in leaves)
        outs.append(attnkit.attention(qi, ki, vi, causal=causal, backend="reference")[0].transpose(0, 1))
        a += n
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, leaves, do.float())
    return out.detach(), grads


def _rel(a, b) -> float:
    return ((a.float() - b).norm() / b.norm()).item()


def run(out_dir: str | None, smoke: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, lo, hi, D = (16, 64, 4096, 128) if not smoke else (4, 3, 40, 16)
    lens = lengths(n, lo, hi)
    total = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(total, HQ, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(total, HKV, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(total, HKV, D, device=device, dtype=dtype, generator=g)
    do = torch.randn(total, HQ, D, device=device, dtype=dtype, generator=g)
    if device.type != "cuda":
        ceil = {}
    elif smoke:  # smaller ceilings, as bench_attention's smoke
        ceil = H.measure_ceilings(device, matmul_n=2048, copy_bytes=256 << 20, rep=50.0)
    else:
        ceil = H.measure_ceilings(device)
    meta = H.collect_meta(device)
    ceiling = f"- bf16 matmul ceiling: {ceil['matmul_tflops']:.1f} TFLOP/s" if ceil else "- CPU smoke run"
    lines = ["# attnkit varlen benchmark (issue 6)", "",
             f"- device: **{meta.get('device_name', device)}**, date: {meta['date_utc']}",
             f"- torch {torch.__version__}, triton {meta.get('triton')}, attnkit ({meta.get('attnkit_commit')})",
             ceiling,
             f"- {n} sequences, lengths {lens} ({total} tokens), Hq {HQ}, Hkv {HKV}, D {D}, {dtype}", ""]
    records = []
    for causal in (False, True):
        pairs = sum(H.attended_pairs(L, L, causal=causal) for L in lens)
        fwd_flops = 4.0 * HQ * D * pairs
        fns = peers(q, k, v, cu, lens, causal)
        want, want_grads = reference(q, k, v, do, lens, causal)
        for mode in ("fwd", "fwd+bwd"):
            flops = fwd_flops * (3.5 if mode == "fwd+bwd" else 1.0)
            rows = []
            for name, fn in fns.items():
                def call(fn=fn):
                    if mode == "fwd":
                        with torch.no_grad():
                            return fn(q, k, v)
                    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                    return torch.autograd.grad(fn(*leaves), leaves, do)
                wl = "causal" if causal else "dense"
                try:
                    with torch.no_grad():
                        err = _rel(fn(q, k, v), want)
                    if mode == "fwd+bwd":
                        err = max(err, *(_rel(g, r) for g, r in zip(call(), want_grads)))
                    ms = H.time_fn(call, warmup=10, rep=50)
                    rows.append(H.make_record(wl, mode, name, flops=flops, ms=ms, rel_err=err, correct=err < 2e-2))
                except Exception as e:  # noqa: BLE001 - a peer that cannot run is recorded
                    rows.append(H.make_record(wl, mode, name, flops=flops, status="error",
                                              error=H.error_summary(H.error_text(e))))
                H.free_memory()
            ok = [r for r in rows if r["status"] == "ok" and r["correct"] and not r["peer"].startswith("attnkit")]
            best = max(ok, key=lambda r: r["tflops"], default=None)
            for r in rows:
                if r["status"] == "ok":
                    if best:
                        r["ratio_to_best"], r["ratio_baseline"] = r["tflops"] / best["tflops"], best["peer"]
                    if ceil:
                        r["frac_matmul_ceiling"] = r["tflops"] / ceil["matmul_tflops"]
            first = len(lines)
            lines += H.markdown_table(f"## {'causal' if causal else 'dense'} — {mode} ({flops / 1e9:.1f} GFLOP)", rows)
            records += rows
            print("\n".join(lines[first:]), flush=True)
    if out_dir:
        H.write_report(out_dir, "varlen", meta, records, lines, ceilings=ceil, lengths=lens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    a = ap.parse_args()
    run(a.out, a.smoke)


if __name__ == "__main__":
    main()
