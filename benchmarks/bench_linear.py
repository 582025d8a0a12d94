#!/usr/bin/env python
"""Linear attention (the modules issue): `attnkit.ops.linear_attention` against its peers.

    python benchmarks/bench_linear.py --out DIR          # CUDA: the grid below
    python benchmarks/bench_linear.py --smoke --out DIR  # tiny shapes, any device

Workload: B = 4, H = 8, D = Dv = 64, L = 1024, 4096, 16384, bf16 inputs; the elu + 1 feature map
(so M = D); causal and not; forward and forward+backward (grads of q, k, v). Peers, in one process
on the same inputs:

- attnkit: `attnkit.ops.linear_attention` (backend "auto": on CUDA attnkit's Triton kernels,
  ops/chunk_product.py, 128-token chunks, float32 sums);
- attnkit_chunked: the same with backend="chunked" (its PyTorch form in float32: causal in 64-token
  chunks, not causal two batched matmuls);
- fla_chunk: flash-linear-attention's Triton `chunk_linear_attn(normalize=True)` on phi(q), phi(k)
  (causal only; it has no non-causal form), if the package imports;
- prefix_sum: the per-position prefix-sum form (causal: S_i = cumsum phi(k_j) v_j^T, a
  [B, H, L, M, Dv] float32 tensor; attnkit's causal path before 2026-11-25), where it fits;
- sdpa (orientation only, not the same operation, never the ratio's baseline): softmax attention
  through `F.scaled_dot_product_attention`, to show the length where the linear form pays.

Work counted: 4 * M * Dv flops per token and head forward (the state product and its read-out),
3x that for forward+backward; TFLOP/s and the fraction of the bf16 matmul ceiling use that count. The op
is memory-bound at these sizes, so each row also shows GB/s of the least traffic any implementation
needs (forward: q, k, v read and o written; forward+backward: that, then q, k, v, do read and dq, dk, dv
written: 4 and 11 bf16 tensors of [B, H, L, D]) and its fraction of the measured copy ceiling.
ratio (harness.fill_ratios): attnkit's rows over the best peer that is not attnkit's, the others' over the best row; sdpa
is an instrument there, never the baseline.
check: each peer is first run on [1, 2, 2048, 64] against the quadratic formula in float64 (output,
and for fwd+bwd dq, dk, dv), relative L2 error, BAD over 2e-2. Writes DIR/linear.json and DIR/linear.md.
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


def _phi(x):
    return F.elu(x) + 1.0


def quadratic(q, k, v, causal):
    """The O(L^2) formula in x's dtype: rows of phi(q) phi(k)^T (causally masked) normalised, @ v."""
    a = _phi(q) @ _phi(k).transpose(-1, -2)
    if causal:
        a = a * torch.ones(a.shape[-2:], dtype=torch.bool, device=a.device).tril()
    return (a / a.sum(-1, keepdim=True)) @ v


def prefix_sum(q, k, v, causal):
    """The per-position prefix-sum form (float32), causal only."""
    qf, kf, vf = _phi(q.float()), _phi(k.float()), v.float()
    s = torch.einsum("bhkm,bhke->bhkme", kf, vf).cumsum(dim=2)
    z = kf.cumsum(dim=2)
    num = torch.einsum("bhqm,bhqme->bhqe", qf, s)
    den = torch.einsum("bhqm,bhqm->bhq", qf, z)
    return (num / den.unsqueeze(-1)).to(q.dtype)


def peers(causal: bool) -> dict:
    """name -> fn(q, k, v) -> out [B, H, L, Dv], and the names that are orientation only."""
    from attnkit.ops import linear_attention

    fns = {"attnkit": lambda q, k, v: linear_attention(q, k, v, feature_map_kind="elu", causal=causal)}
    fns["attnkit_chunked"] = lambda q, k, v: linear_attention(q, k, v, feature_map_kind="elu", causal=causal,
                                                              backend="chunked")
    if causal:
        try:
            from fla.ops.linear_attn import chunk_linear_attn

            def fla(q, k, v):  # fla's layout is [B, T, H, K]; it scales q.k, which normalising cancels
                t = [x.transpose(1, 2) for x in (_phi(q), _phi(k), v)]
                return chunk_linear_attn(*t, normalize=True)[0].transpose(1, 2)
            fns["fla_chunk"] = fla
        except Exception as e:  # noqa: BLE001 - a peer that does not import is reported
            print(f"fla_chunk: not importable ({type(e).__name__}: {e})", flush=True)
        fns["prefix_sum"] = lambda q, k, v: prefix_sum(q, k, v, causal)
    fns["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fns


def _rel(a, b) -> float:
    return ((a.double() - b).norm() / b.norm()).item()


def check(fn, causal, device, dtype, grads: bool) -> float:
    """Worst relative error of fn's output (and grads) against the float64 formula on a small shape."""
    g = torch.Generator(device=device).manual_seed(7)
    q, k, v, do = (torch.randn(1, 2, 2048, 64, device=device, dtype=dtype, generator=g) for _ in range(4))
    leaves = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
    out, ref = fn(*leaves), quadratic(*ref_leaves, causal)
    err = _rel(out, ref)
    if grads:
        got = torch.autograd.grad(out, leaves, do)
        want = torch.autograd.grad(ref, ref_leaves, do.double())
        err = max(err, *(_rel(a, b) for a, b in zip(got, want)))
    return err


def run(out_dir: str | None, smoke: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, Hh, D = (4, 8, 64) if not smoke else (1, 2, 64)
    lengths = (1024, 4096, 16384) if not smoke else (256,)
    if device.type != "cuda":
        ceil = {}
    elif smoke:
        ceil = H.measure_ceilings(device, matmul_n=2048, copy_bytes=256 << 20, rep=50.0)
    else:
        ceil = H.measure_ceilings(device)
    meta = H.collect_meta(device)
    lines = ["# attnkit linear attention benchmark", "",
             f"- device: **{meta.get('device_name', device)}**, date: {meta['date_utc']}",
             f"- torch {torch.__version__}, triton {meta.get('triton')}, attnkit ({meta.get('attnkit_commit')})",
             f"- bf16 matmul ceiling: {ceil['matmul_tflops']:.1f} TFLOP/s" if ceil else "- CPU smoke run",
             f"- B {B}, H {Hh}, D = Dv = M = {D} (elu + 1 features), {dtype}", ""]
    records = []
    for causal in (False, True):
        fns = peers(causal)
        wl = "causal" if causal else "dense"
        for mode in ("fwd", "fwd+bwd"):
            errs = {}
            for name, fn in fns.items():
                if name == "sdpa":
                    continue  # another operation: nothing to check against the formula
                err, text, _ = H.run_guarded(lambda: check(fn, causal, device, dtype, mode == "fwd+bwd"))
                errs[name] = err if text is None else text
            for L in lengths:
                g = torch.Generator(device=device).manual_seed(L)
                q, k, v, do = (torch.randn(B, Hh, L, D, device=device, dtype=dtype, generator=g) for _ in range(4))
                flops = 4.0 * B * Hh * L * D * D * (3.0 if mode == "fwd+bwd" else 1.0)
                moved = (11 if mode == "fwd+bwd" else 4) * B * Hh * L * D * q.element_size()
                rows = []
                for name, fn in fns.items():
                    def call(fn=fn):
                        if mode == "fwd":
                            with torch.no_grad():
                                return fn(q, k, v)
                        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
                        return torch.autograd.grad(fn(*leaves), leaves, do)
                    err = errs.get(name)
                    if isinstance(err, str):
                        rows.append(H.make_record(f"{wl} L={L}", mode, name, flops=flops, status="error",
                                                  error=H.error_summary(err)))
                        continue
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    ms, text, _ = H.run_guarded(lambda: H.time_fn(call, warmup=10, rep=50))
                    if text is not None:
                        rows.append(H.make_record(f"{wl} L={L}", mode, name, flops=flops, status="error",
                                                  error=H.error_summary(text)))
                        continue
                    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
                    rows.append(H.make_record(f"{wl} L={L}", mode, name, flops=flops, ms=ms,
                                              rel_err=err, correct=err is None or err < 2e-2, peak_mib=peak,
                                              instrument=name == "sdpa",
                                              note="softmax attention, for orientation" if name == "sdpa" else None))
                    H.free_memory()
                H.fill_ratios(rows, ceil)
                first = len(lines)
                def gbps(r):
                    return None if r["status"] != "ok" or r.get("instrument") else moved / (r["ms"] * 1e-3) / 1e9
                cols = {"GB/s": lambda r: "-" if gbps(r) is None else f"{gbps(r):.0f}",
                        "of copy": lambda r: "-" if gbps(r) is None or not ceil else
                        f"{100 * gbps(r) / ceil['copy_gbps']:.0f}%",
                        "peak MiB": lambda r: "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"}
                lines += H.markdown_table(f"## {wl}, L = {L} — {mode} ({flops / 1e9:.1f} GFLOP counted)", rows, cols)
                records += rows
                print("\n".join(lines[first:]), flush=True)
    if out_dir:
        H.write_report(out_dir, "linear", meta, records, lines, ceilings=ceil)
    if any(r["status"] == "ok" and not r["correct"] for r in records if r["peer"].startswith("attnkit")):
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on any device")
    a = ap.parse_args()
    run(a.out, a.smoke)


if __name__ == "__main__":
    main()
