#!/usr/bin/env python
"""attnkit context-parallel benchmark (issue 7): ring and all-to-all attention over every visible GPU.

    python benchmarks/bench_ring.py --out DIR [--smoke] [--gpus N] [--lengths 131072 524288]
                                    [--modes fwd fwd+bwd] [--peers ...] [--reps 5] [--list]

No torchrun: the script spawns one process per GPU (torch.multiprocessing), NCCL on GPUs
(gloo on the CPU), with NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 set before
the process group starts (NVLink multicast off).

Grid (issue 7): bf16, D = 128, 32 query heads / 8 KV heads, B = 1, total sequence 128k and 512k
tokens, causal and non-causal, forward and forward+backward. Peers, per workload:
- ring_contiguous / ring_zigzag: `attnkit.distributed.ring_attention` (zigzag only for causal:
  without a mask both layouts do the same work);
- all_to_all: `attnkit.distributed.all_to_all_attention` (contiguous shards);
- torch_cp: torch's `torch.distributed.tensor.experimental.context_parallel` around
  `F.scaled_dot_product_attention(..., enable_gqa=True)` (its default rotation and, for causal,
  its default head-tail load balancing); if GQA fails there, again with K/V repeated to 32 heads
  (noted); any failure is recorded with its error;
- single / single_lse: ONE GPU running the same per-GPU shard with no communication:
  `attnkit.attention(q_shard [L/P], k, v [L])` (bottom-right causal: the last contiguous shard's
  view), backend auto, without and with `return_lse=True` (the ring's local steps need lse, so
  single_lse is the rate of the local kernel the ring can use). Every rank runs it at once.

Metrics: per-GPU TFLOP/s = (FLOPs of the whole attention counting only unmasked pairs, the
harness's convention: 4 * B * Hq * D * pairs, fwd+bwd = 3.5 x) / P / time, time = the slowest
rank's median; ratio = per-GPU TFLOP/s / the best distributed peer's (harness.fill_ratios over
the distributed rows: BAD rows are never best; the single rows are the efficiency reference, not
peers); ceil = per-GPU TFLOP/s / rank 0's measured bf16 matmul ceiling; efficiency = per-GPU
TFLOP/s / the single row's TFLOP/s (1.0 = the kernel rate of one GPU, communication hidden and
work balanced); zigzag gain = ring_zigzag TFLOP/s / ring_contiguous TFLOP/s (causal). Timing:
harness.time_fn_stats with fixed call counts (all ranks must make the same calls): 1 untimed +
--reps timed calls, median.
Before timing, each distributed peer (torch_cp included: its output and gradients are gathered back
into sequence order with torch's context_parallel_unshard) is checked at a small size (1024 tokens
per rank) against `attnkit.attention` over the gathered sequence in float32: output and (fwd+bwd)
dq/dk/dv relative L2 error <= 2e-2, else the row is BAD.

Output: DIR/ring.json and DIR/ring.md (rewritten after every workload), a table on stdout.
`--smoke`: 2 processes on the CPU with gloo and tiny shapes (checks the script end to end; torch_cp
only with `--peers ... torch_cp`: on the CPU its first call takes ~90 s, and its CPU flash kernels have
no sharding rule for causal or backward, so those rows are recorded errors there).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import dataclass  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import harness as H  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

attnkit = H.import_attnkit()
import attnkit.distributed as cp  # noqa: E402

PEERS = ("ring_contiguous", "ring_zigzag", "all_to_all", "torch_cp", "single", "single_lse")
CHECK_TOKENS_PER_RANK = 1024
CHECK_REL_TOL = 2e-2


@dataclass(frozen=True)
class Workload:
    L: int
    causal: bool
    mode: str
    B: int = 1
    Hq: int = 32
    Hkv: int = 8
    D: int = 128

    @property
    def name(self) -> str:
        n = f"{self.L // 1024}k" if self.L % 1024 == 0 else str(self.L)
        return f"L{n}_{'causal' if self.causal else 'dense'}"

    def shape(self, world: int) -> str:
        return (f"B={self.B} L={self.L} Hq={self.Hq} Hkv={self.Hkv} D={self.D}, {world} ranks x {self.L // world} "
                f"tokens, {'causal' if self.causal else 'non-causal'}")


def workloads(args) -> list[Workload]:
    """The grid, less the workloads --only leaves out."""
    dims = dict(Hq=4, Hkv=2, D=16) if args.smoke else {}
    grid = [Workload(L, c, m, **dims) for L in args.lengths for c in (False, True) for m in args.modes]
    return [w for w in grid if not args.only or any(o in w.name for o in args.only)]


def peers_for(w: Workload, peers) -> list[str]:
    return [p for p in peers if not (p == "ring_zigzag" and not w.causal)]


# --------------------------------------------------------------------------- one peer on one rank
def _rand(shape, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def _full(w: Workload, L: int, dtype, device):
    """The same full q, k, v on every rank (shared seed)."""
    return [_rand((w.B, h, L, w.D), dtype, device, i) for i, h in enumerate((w.Hq, w.Hkv, w.Hkv))]


def _cp_fn(peer: str, w: Workload, backend: str):
    layout = "zigzag" if peer == "ring_zigzag" else "contiguous"
    strategy = "all_to_all" if peer == "all_to_all" else "ring"
    return layout, lambda q, k, v: cp.context_parallel_attention(q, k, v, strategy=strategy, layout=layout,
                                                                 causal=w.causal, backend=backend)


def _step(fn, tensors, mode: str, g_out):
    """One timed call: forward (no grad) or forward + backward through autograd.grad."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(*tensors)
    out = fn(*tensors)
    return torch.autograd.grad(out, tensors, g_out)


def make_call(peer: str, w: Workload, mode: str, rank: int, world: int, device, backend: str):
    """(callable, note) for one peer on this rank, inputs allocated."""
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    Ls = w.L // world
    grad = mode != "fwd"
    if peer in ("single", "single_lse"):
        q = _rand((w.B, w.Hq, Ls, w.D), dt, device, 100 + rank).requires_grad_(grad)
        k, v = (_rand((w.B, w.Hkv, w.L, w.D), dt, device, 200 + i).requires_grad_(grad) for i in range(2))
        lse = peer == "single_lse"

        def fn(q, k, v):
            res = attnkit.attention(q, k, v, causal=w.causal, return_lse=lse, backend=backend)
            return res[0] if lse else res
        plan = attnkit.explain(q, k, v, causal=w.causal, return_lse=lse, backend=backend).backend
        g = torch.randn_like(q) if grad else None
        return (lambda: _step(fn, (q, k, v), mode, g)), f"chose {plan}"
    if peer == "torch_cp":
        return make_torch_cp(w, mode, world, device, dt)
    _, fn = _cp_fn(peer, w, backend)
    q = _rand((w.B, w.Hq, Ls, w.D), dt, device, 100 + rank).requires_grad_(grad)
    k, v = (_rand((w.B, w.Hkv, Ls, w.D), dt, device, 200 + 10 * rank + i).requires_grad_(grad) for i in range(2))
    # the ring merges its local steps by lse (computed without autograd inside its own Function);
    # all-to-all makes one plain call over the whole sequence
    with torch.no_grad():
        plan = attnkit.explain(q[:, :, :64], k[:, :, :64], v[:, :, :64], causal=w.causal,
                               return_lse=peer != "all_to_all", backend=backend).backend
    g = torch.randn_like(q) if grad else None
    return (lambda: _step(fn, (q, k, v), mode, g)), f"local steps on {plan}"


def make_torch_cp(w: Workload, mode: str, world: int, device, dt, full=None):
    """torch's context_parallel around SDPA; returns (callable, note). Raises where it cannot run.

    full: the full-sequence q, k, v and (fwd+bwd) gradient of the output, the same on every rank
    (default: random, w.L tokens); they are sharded by torch. The callable carries .ctx (the open
    context: the caller closes it), .mesh, and .fn, .inputs, .g (this rank's shards) for the check.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh(device.type, (world,))
    grad = mode != "fwd"
    note = "torch default rotation" + (", head-tail load balancing" if w.causal else "")
    try:  # torch refuses load balancing without is_causal: balance causal workloads only
        from torch.distributed.tensor.experimental._attention import _cp_options
        _cp_options.enable_load_balance = w.causal
    except (ImportError, AttributeError):
        pass
    for repeat in (False, True):
        if full is None:
            bufs = _full(w, w.L, dt, device) + [_rand((w.B, w.Hq, w.L, w.D), dt, device, 7)]
        else:
            bufs = [t.clone() for t in full]  # sharded in place below: keep the caller's for the retry
        bufs = bufs[:4 if grad else 3]
        if repeat:
            bufs[1:3] = [t.repeat_interleave(w.Hq // w.Hkv, dim=1) for t in bufs[1:3]]
        ctx = context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2] * len(bufs), no_restore_buffers=set(bufs))
        ctx.__enter__()  # shards the buffers in place; left open while this peer is timed (closed by the caller)
        ts = [t.detach().requires_grad_(grad) for t in bufs[:3]]
        g = bufs[3] if grad else None  # sharded like q, so like the output

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=w.causal, enable_gqa=not repeat)
        try:
            _step(fn, ts, mode, g)
        except Exception:  # noqa: BLE001 - GQA may be unsupported there: retry with repeated K/V
            ctx.__exit__(None, None, None)
            if repeat:
                raise
            continue
        call = (lambda: _step(fn, ts, mode, g))  # noqa: E731
        call.ctx, call.mesh, call.fn, call.inputs, call.g = ctx, mesh, fn, ts, g  # type: ignore[attr-defined]
        return call, note + ("; K/V repeated to Hq heads (enable_gqa failed)" if repeat else "")
    raise AssertionError("unreachable")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _torch_cp_outputs(w: Workload, mode: str, world: int, device, dt, full) -> list[torch.Tensor]:
    """torch_cp's output (and, fwd+bwd, dq, dk, dv) for full = [q, k, v, grad of the output],
    gathered back into sequence order (torch's context_parallel_unshard undoes its load balancing)."""
    try:
        from torch.distributed.tensor.experimental import context_parallel_unshard
    except ImportError:
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    call, _ = make_torch_cp(w, mode, world, device, dt, full=[t.to(dt) for t in full])
    try:
        out = call.fn(*call.inputs)
        got = [out.detach()]
        if mode != "fwd":
            got += torch.autograd.grad(out, call.inputs, call.g)
        got = context_parallel_unshard(call.mesh, got, [2] * len(got))
    finally:
        call.ctx.__exit__(None, None, None)
    if mode != "fwd" and got[2].shape[1] != w.Hkv:  # K/V were repeated to Hq heads: sum each group's grads
        got[2:] = [t.unflatten(1, (w.Hkv, -1)).sum(2) for t in got[2:]]
    return got


def check_peer(peer: str, w: Workload, mode: str, rank: int, world: int, device, backend: str) -> float | None:
    """Worst relative error of a distributed peer vs full-sequence float32 attention at a small size."""
    if peer in ("single", "single_lse"):
        return None
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    L = CHECK_TOKENS_PER_RANK * world if device.type == "cuda" else 64 * world
    full = _full(w, L, torch.float32, device)
    ref = [t.clone().requires_grad_(True) for t in full]
    r_out = attnkit.attention(*ref, causal=w.causal)
    g = _rand(r_out.shape, torch.float32, device, 7)
    want = [r_out.detach()] + (list(torch.autograd.grad(r_out, ref, g)) if mode != "fwd" else [])
    if peer == "torch_cp":
        got = _torch_cp_outputs(w, mode, world, device, dt, full + [g])
    else:
        layout, fn = _cp_fn(peer, w, backend)
        loc = [cp.shard_sequence(t.to(dt), rank, world, layout=layout).requires_grad_(True) for t in full]
        out = fn(*loc)
        got = [out.detach()]
        if mode != "fwd":
            got += torch.autograd.grad(out, loc, cp.shard_sequence(g.to(dt), rank, world, layout=layout))
        got = [cp.unshard_sequence(t, layout=layout) for t in got]
    return max(_rel(a, b) for a, b in zip(got, want))


# --------------------------------------------------------------------------- worker
def _max_over_ranks(x: float, device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def run_peer(peer, w, mode, rank, world, device, args) -> dict:
    """Check, then time one peer on every rank; the record (rank 0's view of all ranks)."""
    err = None
    chk = None
    call = None
    try:
        chk = check_peer(peer, w, mode, rank, world, device, args.backend)
        call, note = make_call(peer, w, mode, rank, world, device, args.backend)
    except Exception as exc:  # noqa: BLE001
        err, note = H.error_text(exc), ""
    errors = [None] * world
    dist.all_gather_object(errors, err)
    bad = [(r, e) for r, e in enumerate(errors) if e]
    ms = None
    if not bad:
        dist.barrier()
        stats, err, _ = H.run_guarded(lambda: H.time_fn_stats(call, warmup=0.0, rep=0.0, min_rep=args.reps,
                                                               device=device))
        dist.all_gather_object(errors, err)
        bad = [(r, e) for r, e in enumerate(errors) if e]
        if not bad:
            ms = _max_over_ranks(stats["median_ms"], device)
    if call is not None and hasattr(call, "ctx"):
        call.ctx.__exit__(None, None, None)
    del call
    H.free_memory()
    Lq = w.L // world if peer.startswith("single") else w.L
    flops = H.attention_flops(w.B, w.Hq, Lq, w.L, w.D, causal=w.causal, mode=mode)
    per_gpu = flops if peer.startswith("single") else flops / world
    rec = H.make_record(w.name, mode, peer, flops=per_gpu, ms=ms, status="error" if bad else "ok",
                        error="; ".join(f"rank {r}: {e}" for r, e in bad[:2]) or None,
                        shape=w.shape(world), L=w.L, causal=w.causal, world=world, note=note)
    if chk is not None:
        rec["rel_err"] = _max_over_ranks(chk, device)
        rec["correct"] = rec["rel_err"] <= CHECK_REL_TOL
    return rec


def worker(rank: int, world: int, init_file: str, args) -> None:
    cuda = not args.smoke
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method="file://" + init_file, rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=args.timeout_s))
    ceilings = None
    if rank == 0 and not args.no_ceilings:
        ceilings = (H.measure_ceilings(device) if cuda else
                    H.measure_ceilings(device, matmul_n=256, copy_bytes=16 << 20, rep=10.0))
    dist.barrier()
    meta = H.collect_meta(
        device, title="attnkit context-parallel benchmark (issue 7)" + (" (smoke)" if args.smoke else ""),
        smoke=args.smoke, world_size=world, command=args.command,
        timing=(f"harness.time_fn_stats with fixed counts (1 untimed + {args.reps} timed calls, "
                "median), slowest rank"),
        notes=("per-GPU TFLOP/s: unmasked pairs of the whole attention / P; single: one GPU, q shard [L/P] vs "
               "K/V [L], no communication; ratio: per-GPU TFLOP/s / the best distributed peer's (BAD rows and "
               "the single rows never best); ceil: fraction of rank 0's bf16 matmul ceiling; "
               "efficiency: per-GPU TFLOP/s / single's; zigzag gain: ring_zigzag / "
               f"ring_contiguous (causal); rel err: small-size check vs float32 full attention (BAD > "
               f"{CHECK_REL_TOL:g})"),
    )
    records: list[dict] = []
    for w in workloads(args):
        rows = []
        for peer in peers_for(w, args.peers):
            rec = run_peer(peer, w, w.mode, rank, world, device, args)
            rows.append(rec)
            if rank == 0:
                state = (f"{rec['ms']:.4g} ms, {rec['tflops']:.4g} TFLOP/s per GPU" if rec["status"] == "ok" else
                         f"{rec['status']}: {H._short(rec['error'], 160)}")
                chk = f", rel err {rec['rel_err']:.1e}" if rec.get("rel_err") is not None else ""
                print(f"[{time.perf_counter() - T0:7.1f}s] {w.name} {w.mode} {peer}: {state}{chk} ({rec['note']})",
                      flush=True)
        fill(rows, ceilings)
        records += rows
        if rank == 0:
            meta["wall_s"] = round(time.perf_counter() - T0, 1)
            write(args.out, meta, ceilings, records)
    if rank == 0:
        print("\n" + "\n".join(table(records)))
        print(f"\nwrote {os.path.join(args.out, 'ring.json')} and ring.md")
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- report
def fill(rows: list[dict], ceilings: dict | None) -> None:
    """Ratio to the best distributed peer and fraction of the matmul ceiling (harness.fill_ratios: BAD
    rows are never best; the single rows are the efficiency reference, not peers, so they take no
    ratio); efficiency vs the single row; zigzag gain on the ring_zigzag row."""
    H.fill_ratios([r for r in rows if not r["peer"].startswith("single")], ceilings,
                  ours=lambda peer: peer.startswith(("ring_", "all_to_all")))
    peak = (ceilings or {}).get("matmul_tflops")
    by = {r["peer"]: r for r in rows if r["status"] == "ok" and r["tflops"]}
    for r in rows:
        if r["status"] != "ok" or not r["tflops"]:
            continue
        if peak:
            r["frac_matmul_ceiling"] = r["tflops"] / peak
        if "single" in by and not r["peer"].startswith("single"):
            r["efficiency"] = r["tflops"] / by["single"]["tflops"]
        if r["peer"] == "ring_zigzag" and "ring_contiguous" in by:
            r["zigzag_gain"] = r["tflops"] / by["ring_contiguous"]["tflops"]


def table(records: list[dict]) -> list[str]:
    lines = ["| workload | mode | peer | ms | TFLOP/s per GPU | ratio | ceil | efficiency | zigzag gain | rel err | note |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in records:
        note = r.get("note") or ""
        if r["status"] != "ok":
            note = f"{r['status']}: {H._short(r.get('error'), 200)}"
        bad = " **BAD**" if r.get("correct") is False else ""
        ceil = None if r["frac_matmul_ceiling"] is None else 100 * r["frac_matmul_ceiling"]
        lines.append(f"| {r['workload']} | {r['mode']} | {r['peer']} | {H._fmt(r['ms'], '.4g')} | {H._fmt(r['tflops'], '.4g')} | "
                     f"{H._fmt(r['ratio_to_best'], '.2f')} | {H._fmt(ceil, '.1f')}{'%' if ceil is not None else ''} | "
                     f"{H._fmt(r.get('efficiency'), '.2f')} | {H._fmt(r.get('zigzag_gain'), '.2f')} | "
                     f"{H._fmt(r.get('rel_err'), '.1e')}{bad} | {note.replace('|', '/')} |")
    return lines


def write(out_dir: str, meta: dict, ceilings: dict | None, records: list[dict]) -> str:
    lines = [f"# {meta['title']}", "",
             f"- device: **{meta.get('device_name')}** x {meta.get('world_size')}"
             + (" (smoke run: tiny shapes, not a measurement)" if meta.get("smoke") else ""),
             f"- date: {meta.get('date_utc')}",
             f"- torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
             f"attnkit {meta.get('attnkit')} ({meta.get('attnkit_commit')})"]
    if ceilings:
        lines.append(f"- ceilings (rank 0, this run): bf16 matmul {ceilings['matmul_tflops']:.4g} TFLOP/s, "
                     f"copy {ceilings['copy_gbps']:.0f} GB/s")
    lines += [f"- {k}: {meta[k]}" for k in ("command", "timing", "notes", "wall_s") if meta.get(k)]
    lines += ["", f"FLOPs: {H.FLOP_CONVENTION}", ""] + table(records)
    return H.write_report(out_dir, "ring", meta, records, lines, ceilings=ceilings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="directory for ring.json and ring.md")
    ap.add_argument("--smoke", action="store_true", help="2 CPU processes, gloo, tiny shapes")
    ap.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: all visible)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="total sequence lengths (default 128k 512k)")
    ap.add_argument("--modes", nargs="+", choices=("fwd", "fwd+bwd"), default=["fwd", "fwd+bwd"])
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=None,
                    help="default: all (--smoke: all but torch_cp, whose first call takes ~90 s on the CPU)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="workloads whose name contains NAME (e.g. L128k_causal)")
    ap.add_argument("--backend", default="auto", help="contract backend of the local steps and of single")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per peer (fixed: every rank makes the same calls)")
    ap.add_argument("--timeout-s", type=float, default=900.0, help="process-group timeout (a hang fails after it)")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the workloads (those --only selects), then exit")
    args = ap.parse_args(argv)
    if args.lengths is None:
        args.lengths = [128, 256] if args.smoke else [128 * 1024, 512 * 1024]
    if args.peers is None:
        args.peers = [p for p in PEERS if not (args.smoke and p == "torch_cp")]
    if args.smoke:
        world = 2
        args.reps = min(args.reps, 2)
    elif args.list and not torch.cuda.is_available():
        world = args.gpus or 8  # the shapes an 8-GPU host would run
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: use --smoke on the CPU")
        world = args.gpus or torch.cuda.device_count()
    if args.list:
        for w in workloads(args):
            print(f"{w.name:<16} {w.mode:<8} {w.shape(world)}; peers {peers_for(w, args.peers)}")
        return 0
    if not args.out:
        ap.error("--out DIR is required (unless --list)")
    bad = [L for L in args.lengths if L % (2 * world)]
    if bad:
        ap.error(f"--lengths {bad} must be multiples of 2 x {world} ranks")
    args.command = "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:]))
    # NVLink multicast off (see the device notes), before any process group exists.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    print(f"attnkit ring bench: {world} {'CPU processes (gloo, smoke)' if args.smoke else 'GPUs (NCCL)'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(worker, args=(world, os.path.join(tmp, "init"), args), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
