"""Reusable pieces of attnkit's benchmarks: ceilings, timing, FLOP counts, result records.

Every speed claim of the project goes through this module, so that all of them
use one timer, one FLOP convention and one results format:

- ``measure_ceilings(device)``: the device's measured bf16 matmul rate and
  device-to-device copy bandwidth, taken in the same process as the benchmark.
- ``time_fn(fn, warmup=, rep=)``: median milliseconds of ``fn()`` (CUDA events on
  a GPU, ``time.perf_counter`` on the CPU); budgets in milliseconds, as in
  ``triton.testing.do_bench``.
- ``attended_pairs`` / ``attention_flops``: the FLOP convention (see FLOP_CONVENTION).
- ``make_record`` / ``fill_ratios`` / ``write_results``: result rows, ratios to the
  best peer, and the JSON + markdown files.
- ``run_guarded``: runs one peer so that its failure (unsupported, OOM, compile
  error) becomes a recorded error, never a crash.

No function here needs a GPU: on the CPU everything runs with small sizes, which
is what ``--smoke`` runs use.
"""

from __future__ import annotations

import datetime as _dt
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Iterable

import torch

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - torch < 2.3
    SDPBackend = sdpa_kernel = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5
    create_block_mask = flex_attention = None

__all__ = [
    "SDPA_KERNELS",
    "import_attnkit",
    "compiled_flex",
    "FLOP_CONVENTION",
    "ATTNKIT_PEER",
    "measure_ceilings",
    "time_fn",
    "time_fn_stats",
    "sync",
    "attended_pairs",
    "attention_flops",
    "make_record",
    "fill_ratios",
    "run_guarded",
    "error_text",
    "error_summary",
    "free_memory",
    "collect_meta",
    "format_table",
    "write_results",
]

# The SDPA peers of every benchmark: peer name -> torch.nn.attention.SDPBackend member.
SDPA_KERNELS = {
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_math": "MATH",
}
_COMPILED_FLEX = None


def compiled_flex():
    """torch.compile(flex_attention, dynamic=False), built once per process (every benchmark's flex peer)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        if flex_attention is None:
            raise RuntimeError("torch.nn.attention.flex_attention is not available in this torch")
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


FLOP_CONVENTION = (
    "forward FLOPs = 2*B*Hq*(D + Dv)*pairs = 4*B*Hq*D*pairs for Dv == D, where pairs is the exact "
    "number of (query, key) pairs attended (Lq*Lk dense; counted from the causal / sliding-window "
    "geometry, bottom-right aligned, otherwise); fwd+bwd = 3.5 x forward (backward = 2.5 x forward, "
    "the FlashAttention convention). Masked-out pairs are not counted, even for peers that compute them."
)

# The name of the attnkit row: its ratio is taken against the best *other* peer
# (rows named attnkit_* are attnkit's own forced backends, not peers).
ATTNKIT_PEER = "attnkit"


def import_attnkit():
    """attnkit, imported from this checkout's src/ when it is not installed (benchmarks run from a checkout)."""
    try:
        import attnkit
    except ImportError:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
        import attnkit
    return attnkit


# --------------------------------------------------------------------------- timing
def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device=None) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    elif _is_cuda(device):
        torch.cuda.synchronize(device)


def time_fn_stats(
    fn: Callable[[], Any],
    warmup: float = 25.0,
    rep: float = 100.0,
    *,
    device=None,
    min_rep: int = 3,
    max_rep: int = 10_000,
    first_call: bool = True,
) -> dict:
    """Time fn() like triton.testing.do_bench, returning statistics in milliseconds.

    warmup / rep are *time budgets in ms*. Scheme: one untimed call (compiles,
    allocator warm-up; skipped with first_call=False), a 3-call estimate, then
    ``warmup/estimate`` untimed calls and ``rep/estimate`` timed ones (at least
    min_rep), each timed alone: CUDA events on a GPU, time.perf_counter after a
    synchronize on the CPU. No L2 flushing between calls (not needed at the
    sizes benchmarked here). With warmup <= 0 and rep <= 0 the counts are fixed:
    the untimed call, then min_rep timed calls (no estimate, no warm-up).

    Returns {"median_ms", "min_ms", "p20_ms", "p80_ms", "n_rep"}.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = _is_cuda(device)
    if first_call:
        fn()
        sync(device)
    if warmup <= 0 and rep <= 0:
        # Fixed counts (multi-rank runs, where every rank must make the same
        # calls): the first call warmed up, so time min_rep calls and nothing else.
        n_est = 0
        est = 1.0
    else:
        n_est = 3
    if n_est and cuda:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n_est):
            fn()
        e.record()
        torch.cuda.synchronize()
        est = s.elapsed_time(e) / n_est
    elif n_est:
        t0 = time.perf_counter()
        for _ in range(n_est):
            fn()
        est = (time.perf_counter() - t0) * 1e3 / n_est
    est = max(est, 1e-3)
    n_warm = max(1 if n_est else 0, min(int(warmup / est), max_rep))
    n_rep = max(min_rep, min(int(rep / est), max_rep))
    for _ in range(n_warm):
        fn()
    times: list[float] = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        torch.cuda.synchronize()
        for i in range(n_rep):
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) for a, b in zip(starts, ends)]
    else:
        for _ in range(n_rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()

    def q(frac: float) -> float:
        return times[min(len(times) - 1, max(0, int(round(frac * (len(times) - 1)))))]

    return {
        "median_ms": statistics.median(times),
        "min_ms": times[0],
        "p20_ms": q(0.2),
        "p80_ms": q(0.8),
        "n_rep": len(times),
    }


def time_interleaved(fn_a: Callable[[], Any], fn_b: Callable[[], Any], *, n: int = 60, warmup: int = 5,
                     device=None) -> tuple[float, float]:
    """Median ms of fn_a and fn_b timed call by call in alternation (a b b a a b ...).

    Clock boost, throttling and whatever the previous workload left behind then
    hit both alike, so their ratio is fair even when round-by-round timing drifts.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    for _ in range(warmup):
        fn_a()
        fn_b()
    sync(device)
    ta: list[float] = []
    tb: list[float] = []
    cuda = _is_cuda(device)
    for i in range(n):
        order = ((fn_a, ta), (fn_b, tb)) if i % 2 == 0 else ((fn_b, tb), (fn_a, ta))
        for fn, acc in order:
            if cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                acc.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter()
                fn()
                acc.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ta), statistics.median(tb)


def time_fn(fn: Callable[[], Any], warmup: float = 25.0, rep: float = 100.0, **kw) -> float:
    """Median milliseconds of fn() (see time_fn_stats for the scheme and the keywords)."""
    return time_fn_stats(fn, warmup=warmup, rep=rep, **kw)["median_ms"]


def best_of_rounds(fns: dict[str, Callable[[], Any]], rounds: int = 3, warmup: float = 10.0,
                   rep: float = 40.0) -> dict[str, float]:
    """The least of each function's per-round medians (ms): every round times all of them (time_fn),
    in alternating order, so that drift between rounds hits them alike (the kernel A/B scheme of the
    probes)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            times[n].append(time_fn(fns[n], warmup=warmup, rep=rep))
    return {n: min(t) for n, t in times.items()}


# --------------------------------------------------------------------------- ceilings
def measure_ceilings(
    device,
    *,
    matmul_n: int = 8192,
    copy_bytes: int = 1 << 30,
    dtype: torch.dtype = torch.bfloat16,
    warmup: float = 25.0,
    rep: float = 200.0,
) -> dict:
    """The device's measured ceilings, for 'fraction of the ceiling' columns.

    - matmul: ``a @ b`` with a, b random ``matmul_n``-square matrices of ``dtype``
      (bf16), 2*n^3 FLOPs per product, median time -> TFLOP/s.
    - copy: ``dst.copy_(src)`` of ``copy_bytes`` (1 GiB) on the device; bytes
      read + bytes written (2 x copy_bytes) over the median time -> GB/s (1e9 B/s).
    """
    device = torch.device(device)
    out: dict = {"device": str(device)}
    gen = torch.Generator(device=device)
    gen.manual_seed(1234)
    n = matmul_n
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    st = time_fn_stats(functools.partial(torch.matmul, a, b), warmup=warmup, rep=rep, device=device)
    out["matmul_tflops"] = 2.0 * n**3 / (st["median_ms"] * 1e-3) / 1e12
    out["matmul"] = {"shape": [n, n, n], "dtype": str(dtype).replace("torch.", ""), **st}
    del a, b
    n_el = copy_bytes // 4
    src = torch.empty(n_el, device=device, dtype=torch.float32).uniform_(generator=gen)
    dst = torch.empty_like(src)
    st = time_fn_stats(functools.partial(dst.copy_, src), warmup=warmup, rep=rep, device=device)
    moved = 2 * n_el * 4
    out["copy_gbps"] = moved / (st["median_ms"] * 1e-3) / 1e9
    out["copy"] = {"bytes_copied": n_el * 4, "bytes_counted": moved, **st}
    del src, dst
    free_memory()
    return out


# --------------------------------------------------------------------------- FLOPs
def _window_bounds(causal: bool, window) -> tuple[int | None, int | None] | None:
    """(left, right) key offsets around the aligned diagonal (None = unbounded), as in the contract."""
    if window is None and not causal:
        return None
    if window is None:
        left, right = None, None
    elif isinstance(window, int):
        left, right = window - 1, 0
    else:
        left, right = window
        left = None if left is None or left == -1 else left
        right = None if right is None or right == -1 else right
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def attended_pairs(Lq: int, Lk: int, *, causal: bool = False, window=None, mask: torch.Tensor | None = None) -> int:
    """Exact number of (query, key) pairs attended, per (batch, head), bottom-right aligned.

    Query i lines up with key ``i + (Lk - Lq)``; causal keeps keys up to that
    diagonal, window=W keeps the W most recent keys (diagonal included), a
    (left, right) window keeps keys in [diag - left, diag + right]. Counted row
    by row from that geometry, not approximated by /2. With a bool ``mask``
    (broadcastable to [.., Lq, Lk], True = attend, no causal/window) the count is
    its number of True entries per (batch, head), averaged.
    """
    if mask is not None:
        if causal or window is not None:
            raise ValueError("attended_pairs: pass either a mask or causal/window geometry, not both")
        lead = tuple(mask.shape[:-2])  # a [Lk] or [Lq, Lk] mask has no batch/head dims
        m = torch.broadcast_to(mask, (*lead, Lq, Lk)).reshape(-1, Lq, Lk)
        return int(round(m.sum().item() / m.shape[0]))
    bounds = _window_bounds(causal, window)
    if bounds is None:
        return Lq * Lk
    left, right = bounds
    off = Lk - Lq
    total = 0
    for i in range(Lq):
        d = i + off
        lo = 0 if left is None else max(0, d - left)
        hi = Lk - 1 if right is None else min(Lk - 1, d + right)
        if hi >= lo:
            total += hi - lo + 1
    return total


MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}  # FLOP_CONVENTION: backward = 2.5x forward


def attention_flops(
    B: int, Hq: int, Lq: int, Lk: int, D: int, Dv: int | None = None, *,
    causal: bool = False, window=None, mask: torch.Tensor | None = None, mode: str = "fwd",
) -> float:
    """FLOPs of one attention call under FLOP_CONVENTION; mode 'fwd', 'bwd' or 'fwd+bwd'."""
    Dv = D if Dv is None else Dv
    fwd = 2.0 * B * Hq * (D + Dv) * attended_pairs(Lq, Lk, causal=causal, window=window, mask=mask)
    return fwd * MODE_FACTOR[mode]


# --------------------------------------------------------------------------- records
def make_record(
    workload: str, mode: str, peer: str, *, flops: float | None = None, ms: float | None = None,
    status: str = "ok", error: str | None = None, **extra,
) -> dict:
    """One result row. TFLOP/s is derived from flops and ms; ratios come from fill_ratios."""
    tflops = None
    if status == "ok" and ms is not None and flops:
        tflops = flops / (ms * 1e-3) / 1e12
    rec = {
        "workload": workload, "mode": mode, "peer": peer, "status": status,
        "ms": ms, "tflops": tflops, "flops": flops,
        "ratio_to_best": None, "ratio_baseline": None, "frac_matmul_ceiling": None,
        "error": error,
    }
    rec.update(extra)
    return rec


def _eligible(r: dict) -> bool:
    # A peer whose output failed its correctness check is not allowed to be "best", nor an instrument
    # (a read ceiling, another operation shown for orientation).
    return (r["status"] == "ok" and r["tflops"] is not None and r.get("correct", True) is not False
            and not r.get("instrument"))


def fill_ratios(records: list[dict], ceilings: dict | None,
                ours: Callable[[str], bool] | None = None) -> list[dict]:
    """Set ratio_to_best and frac_matmul_ceiling on every ok row, per (workload, mode).

    ratio_to_best = this row's TFLOP/s / the best comparable row's TFLOP/s
    (= best ms / this ms): for attnkit's own rows (`ours(peer)`, default: names starting with
    "attnkit") the best row that is not ours, for the others the best row overall (ours included).
    > 1 means faster than that best. Rows that failed their correctness check never count as best.
    """
    ours = ours or (lambda peer: peer.startswith(ATTNKIT_PEER))
    peak = (ceilings or {}).get("matmul_tflops")
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["workload"], r["mode"]), []).append(r)
    for rows in groups.values():
        ok = [r for r in rows if _eligible(r)]
        best_all = max(ok, key=lambda r: r["tflops"], default=None)
        others = [r for r in ok if not ours(r["peer"])]
        best_other = max(others, key=lambda r: r["tflops"], default=None)
        for r in rows:
            if r["status"] != "ok" or r["tflops"] is None:
                continue
            base = best_other if ours(r["peer"]) else best_all
            if base is not None and base["tflops"]:
                r["ratio_to_best"] = r["tflops"] / base["tflops"]
                r["ratio_baseline"] = base["peer"]
            if peak:
                r["frac_matmul_ceiling"] = r["tflops"] / peak
    return records


# --------------------------------------------------------------------------- guarded runs
def error_text(exc: BaseException, limit: int = 1500) -> str:
    """'Type: message' of an exception, trimmed (first lines and the last line kept)."""
    msg = f"{type(exc).__name__}: {exc}".strip()
    if len(msg) > limit:
        lines = msg.splitlines()
        head = "\n".join(lines[:8])[: limit - 200]
        msg = head + "\n...\n" + lines[-1][:190]
    return msg


def error_summary(text: str | None) -> str:
    """The informative part of an error text: SDPA's reasons when it gave any, else the text."""
    if not text:
        return ""
    if "[warnings: " in text:
        return "no kernel: " + text.split("[warnings: ", 1)[1].rstrip("]")
    return text


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "CUDA error: out of memory" in text


def run_guarded(fn: Callable[[], Any]) -> tuple[Any, str | None, bool]:
    """Run fn(); return (result, None, False), or (None, error text, was_oom) if it raised.

    After an out-of-memory error the caching allocator is emptied. KeyboardInterrupt
    and SystemExit propagate.
    """
    try:
        return fn(), None, False
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - any peer failure becomes a record
        oom = _is_oom(exc)
        text = error_text(exc)
        if os.environ.get("ATTNKIT_BENCH_TRACEBACK"):
            traceback.print_exc()
        del exc
        free_memory()
        if oom:
            text = "OOM: " + text
        return None, text, oom


# --------------------------------------------------------------------------- metadata + output
def _git_commit(path: str) -> str | None:
    """ATTNKIT_COMMIT when set (a copied tree's .git may lag its files), else git's HEAD."""
    if os.environ.get("ATTNKIT_COMMIT"):
        return os.environ["ATTNKIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def collect_meta(device, **extra) -> dict:
    """Device name, date and library versions for the results header."""
    device = torch.device(device)
    meta: dict = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "triton": None,
        "device_type": device.type,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        meta["device_name"] = props.name
        meta["device_sm_count"] = props.multi_processor_count
        meta["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["device_capability"] = f"{props.major}.{props.minor}"
        try:
            meta["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # noqa: BLE001
            pass
    else:
        meta["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"
    try:
        import attnkit

        meta["attnkit"] = attnkit.__version__
        meta["attnkit_commit"] = _git_commit(os.path.dirname(os.path.abspath(attnkit.__file__)))
    except Exception:  # noqa: BLE001
        pass
    meta["flop_convention"] = FLOP_CONVENTION
    meta.update(extra)
    return meta


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _short(text: str | None, n: int) -> str:
    if not text:
        return ""
    one = " ".join(str(text).split())
    return one if len(one) <= n else one[: n - 3] + "..."


def _check_cell(r: dict) -> str:
    if r.get("max_abs_err") is None:
        return "-"
    s = f"{r['max_abs_err']:.1e}"
    if r.get("grad_rel_err") is not None:
        s += f" g{r['grad_rel_err']:.0e}"
    if r.get("correct") is False:
        s += " BAD"
    return s


def _note_cell(r: dict, n: int) -> str:
    parts = []
    if r.get("backend"):
        parts.append(f"chose {r['backend']}")
    if r["status"] != "ok":
        parts.append(f"{r['status']}: {_short(error_summary(r.get('error')), n)}")
    if r.get("peak_mib") is not None:
        parts.append(f"peak +{r['peak_mib']:.0f} MiB")
    if r.get("note"):
        parts.append(_short(r["note"], n))
    return "; ".join(parts)


def markdown_table(title: str, rows: list[dict], extra: dict[str, Callable[[dict], str]] | None = None) -> list[str]:
    """Lines of one markdown table of rows whose ratios are set: peer, ms, TFLOP/s, ratio, fraction of the
    matmul ceiling, the extra columns (name -> cell of a row), check (rel_err, BAD when not correct), note."""
    extra = extra or {}
    lines = [title, "", "| peer | ms | TFLOP/s | ratio | ceil | " + "".join(f"{n} | " for n in extra) + "check | note |",
             "| --- | ---: | ---: | ---: | ---: | " + "---: | " * len(extra) + "---: | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['peer']} | - | - | - | - | " + "- | " * len(extra) + f"- | error: {r['error']} |")
            continue
        # an instrument's rate would be counted in the workload's flops, which it does not do: ms only
        tflops, frac = (None, None) if r.get("instrument") else (r["tflops"], r["frac_matmul_ceiling"])
        chk = "-" if r.get("rel_err") is None else f"{r['rel_err']:.1e}" + ("" if r.get("correct", True) else " BAD")
        lines.append(f"| {r['peer']} | {r['ms']:.4f} | {_fmt(tflops, '.2f')} | {_fmt(r['ratio_to_best'], '.2f')} | "
                     f"{_fmt(None if frac is None else 100 * frac, '.1f')}{'%' if frac is not None else ''} | "
                     + "".join(f"{cell(r)} | " for cell in extra.values()) + f"{chk} | {r.get('note') or ''} |")
    lines.append("")
    return lines


def group_records(records: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """[((workload, mode), rows)] in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["workload"], r["mode"]), []).append(r)
    return list(groups.items())


def write_report(out_dir: str, stem: str, meta: dict, records: list[dict], md_lines: list[str], **extra) -> str:
    """Write OUT/stem.json (meta, records, extra) and OUT/stem.md; return the markdown."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "records": records, **extra}, f, indent=1, default=str)
    md = "\n".join(md_lines)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(md + "\n")
    return md


def format_table(records: list[dict], *, note_width: int = 70) -> str:
    """Compact text tables, one per (workload, mode): peer, ms, TFLOP/s, ratio, fraction of ceiling."""
    lines: list[str] = []
    for key, rows in group_records(records):
        desc = rows[0].get("shape", "")
        gflop = rows[0].get("flops")
        lines.append(f"== {key[0]} [{key[1]}] {desc}" + (f"  {gflop / 1e9:.3g} GFLOP" if gflop else ""))
        lines.append(f"  {'peer':<15}{'ms':>10}{'TFLOP/s':>9}{'ratio':>7}{'ceil':>7}  {'check(max|err|)':<18} note")
        for r in rows:
            ceil = None if r["frac_matmul_ceiling"] is None else 100 * r["frac_matmul_ceiling"]
            lines.append(
                f"  {r['peer']:<15}{_fmt(r['ms'], '.4g'):>10}{_fmt(r['tflops'], '.4g'):>9}"
                f"{_fmt(r['ratio_to_best'], '.2f'):>7}{_fmt(ceil, '.1f') + ('%' if ceil is not None else ''):>7}"
                f"  {_check_cell(r):<18} {_note_cell(r, note_width)}"
            )
    return "\n".join(lines)


def write_results(records: list[dict], ceilings: dict | None, meta: dict, json_path: str, md_path: str) -> None:
    """Write the records as JSON and as a markdown report (header: device, date, versions, ceilings)."""
    fill_ratios(records, ceilings)
    for p in (json_path, md_path):
        d = os.path.dirname(os.path.abspath(p))
        os.makedirs(d, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "ceilings": ceilings, "records": records}, f, indent=1, default=str)

    c = ceilings or {}
    md: list[str] = []
    md.append(f"# {meta.get('title', 'attnkit benchmark')}")
    md.append("")
    md.append(f"- device: **{meta.get('device_name')}**" + (" (smoke run: tiny shapes, not a measurement)" if meta.get("smoke") else ""))
    md.append(f"- date: {meta.get('date_utc')}")
    md.append(
        f"- torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
        f"cuDNN {meta.get('cudnn')}, python {meta.get('python')}, attnkit {meta.get('attnkit')}"
        + (f" ({meta['attnkit_commit']})" if meta.get("attnkit_commit") else "")
    )
    if c:
        mm, cp = c.get("matmul", {}), c.get("copy", {})
        md.append(
            f"- ceilings (measured in this run): {mm.get('dtype', 'bf16')} matmul {'x'.join(map(str, mm.get('shape', [])))}: "
            f"**{_fmt(c.get('matmul_tflops'), '.4g')} TFLOP/s**; device copy of "
            f"{_fmt(cp.get('bytes_copied', 0) / 2**20, '.0f')} MiB (read + write counted): "
            f"**{_fmt(c.get('copy_gbps'), '.0f')} GB/s**"
        )
    md.append(f"- FLOPs: {FLOP_CONVENTION}")
    md.append(
        "- ratio: this row's TFLOP/s over the best comparable row's (the best non-attnkit peer for "
        "attnkit; the best row overall for the others); > 1 = faster. ceil: fraction of the measured "
        "matmul ceiling. check: max |out - reference| of the forward on a slice (g: worst relative "
        "L2 error of the gradients); BAD rows are excluded from 'best'. rounds: the median of each timing "
        "round (peers timed in alternating order; ms is their mean)."
    )
    for k in ("notes", "timing", "command", "wall_s"):
        if meta.get(k):
            md.append(f"- {k}: {meta[k]}")
    md.append("")
    for key, rows in group_records(records):
        desc = rows[0].get("shape", "")
        gflop = rows[0].get("flops")
        md.append(f"## {key[0]} — {key[1]}")
        md.append("")
        md.append(f"{desc}" + (f"; {gflop / 1e9:.4g} GFLOP" if gflop else "") + (f". {rows[0]['workload_note']}" if rows[0].get("workload_note") else ""))
        md.append("")
        md.append("| peer | ms | TFLOP/s | ratio | ceil | rounds (ms) | max abs err | rel err | note |")
        md.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in rows:
            ceil = None if r["frac_matmul_ceiling"] is None else 100 * r["frac_matmul_ceiling"]
            rel = r.get("rel_err")
            g = r.get("grad_rel_err")
            rel_s = _fmt(rel, ".1e") + (f" (grad {g:.1e})" if g is not None else "")
            if r.get("correct") is False:
                rel_s += " **BAD**"
            md.append(
                f"| {r['peer']} | {_fmt(r['ms'], '.4g')} | {_fmt(r['tflops'], '.4g')} | "
                f"{_fmt(r['ratio_to_best'], '.2f')} | {_fmt(ceil, '.1f')}{'%' if ceil is not None else ''} | "
                f"{' / '.join(format(x, '.4g') for x in r.get('round_ms') or []) or '-'} | "
                f"{_fmt(r.get('max_abs_err'), '.1e')} | {rel_s} | {_note_cell(r, 300).replace('|', '/')} |"
            )
        md.append("")
    with open(md_path, "w") as f:
        f.write("\n".join(md))


def records_by_status(records: Iterable[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out


if __name__ == "__main__":  # quick self-check of the FLOP geometry
    assert attended_pairs(4, 4, causal=True) == 10
    assert attended_pairs(2, 4, causal=True) == 3 + 4  # bottom-right: rows see 3 and 4 keys
    assert attended_pairs(4, 2, causal=True) == 0 + 0 + 1 + 2
    assert attended_pairs(3, 4, mask=torch.tensor([True, False, True, True])) == 9  # a [Lk] key mask
    L, W = 16384, 1024
    assert attended_pairs(L, L, window=W) == W * (W + 1) // 2 + (L - W) * W
    assert attended_pairs(L, L, causal=True, window=W) == attended_pairs(L, L, window=W)
    assert attended_pairs(8, 8) == 64
    i = torch.arange(8).view(-1, 1)
    j = torch.arange(8).view(1, -1)
    assert attended_pairs(8, 8, mask=(j <= i) & (j > i - 3)) == attended_pairs(8, 8, window=3)
    print("harness self-check ok;", math.isclose(attention_flops(1, 1, 4, 4, 8, causal=True, mode="fwd+bwd"), 3.5 * 4 * 8 * 10))
