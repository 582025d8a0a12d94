"""`python -m attnkit demo`: every available backend on a few feature sets, against the reference.

Prints one row per (feature set, backend): the error of the output (and lse) and of
the gradients against a float64 reference, relative to each reference tensor's largest
value, the forward time, or why the backend cannot serve that call. A row whose error
exceeds 4x the `reference` backend's error in the same dtype (the same math, unfused)
plus 4 eps is marked BAD (the reference row itself past 64 eps), and the demo then exits
with status 1, as it does when a backend raises.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import BACKENDS, attention, explain
from .groups import GroupMask, SegmentLayout
from .request import build_request


def _cases(device: torch.device, dtype: torch.dtype, long: int):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    B, Hq, Hkv, L, D = 2, 8, 2, long, 64
    pad = torch.ones(B, 1, 1, L, dtype=torch.bool, device=device)
    pad[1, ..., L // 2:] = False  # second sequence is half padding
    pad[0, ..., :] = False  # first sequence: nothing to attend (rows must give 0)
    alibi = torch.linspace(0.05, 0.5, Hq, device=device)

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score - alibi[h] * (q_idx - kv_idx).abs()

    def doc_mask(b, h, q_idx, kv_idx):
        return (q_idx // 64) == (kv_idx // 64)

    yield "dense", (rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), {}
    yield "causal", (rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), dict(causal=True)
    yield "window 64", (rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), dict(window=64)
    yield "bias+grad", (rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), dict(bias=rnd(Hq, L, L))
    yield "key padding", (rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), dict(mask=pad)
    yield "softcap 5", (rnd(B, Hq, L, D, scale=3), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), dict(softcap=5.0)
    yield "score_mod alibi", (rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), dict(score_mod=alibi_mod)
    yield "mask_mod docs", (rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), dict(mask_mod=doc_mask)
    # anchor attention: queries [0, L/2) see the first quarter, queries [L/2, L) the second half
    groups = GroupMask(SegmentLayout(L, L, ((((0, L // 2),), ((0, L // 4),)), (((L // 2, L),), ((L // 2, L),)))),
                       device)
    yield "token groups", (rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), dict(mask_mod=groups)
    yield "sinks+lse", (rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), dict(
        sinks=rnd(Hq), causal=True, return_lse=True)
    yield "decode Lq=1", (rnd(B, Hq, 1, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)), dict(causal=True)


def _run(backend, q, k, v, kw, grad_outs):
    """Forward (+ backward when grad_outs are given) -> (outputs, grads); outputs: (out,) or (out, lse)."""
    res = attention(q, k, v, backend=backend, **kw)
    outs = res if isinstance(res, tuple) else (res,)
    if grad_outs is None:
        return outs, None
    leaves = [q, k, v] + [t for t in (kw.get("bias"), kw.get("sinks")) if t is not None]
    return outs, torch.autograd.grad(outs, leaves, [g.to(o.dtype) for g, o in zip(grad_outs, outs)])


def _err(outs, refs) -> float:
    """Max error of each tensor (out, lse, or a gradient) against the float64 reference, relative to the
    reference tensor's largest magnitude, the worst of them; an lse that is -inf where the reference's
    is not (or the other way round) is an infinite error."""
    err = 0.0
    for a, b in zip(outs, refs):
        a = a.double()
        fin = torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), fin):
            return float("inf")
        if fin.any():
            scale = b[fin].abs().max().item()
            err = max(err, (a[fin] - b[fin]).abs().max().item() / (scale if scale > 0 else 1.0))
    return err


def _timed(fn, device, reps: int) -> float:
    """Median wall time of reps calls; the caller has made one call already (first calls compile and
    allocate)."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_demo(device: str | None = None, length: int | None = None) -> list[dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    L = length or (1024 if dev.type == "cuda" else 256)
    rows = []
    print(f"attnkit demo on {dev.type} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"{str(dtype).replace('torch.', '')}, torch {torch.__version__}")
    g = torch.Generator(device="cpu").manual_seed(1)
    for name, (q, k, v), kw in _cases(dev, dtype, L):
        # incoming gradients in the working dtype; the reference gets the same (rounded) values
        grad_outs = [torch.randn(q.shape[0], q.shape[1], q.shape[2], v.shape[3], generator=g).to(dev, dtype)]
        if kw.get("return_lse"):
            grad_outs.append(torch.randn(q.shape[0], q.shape[1], q.shape[2], generator=g).to(dev, torch.float32))
        leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        kw64 = {a: (b.detach().double().requires_grad_() if isinstance(b, torch.Tensor) and b.is_floating_point() else b)
                for a, b in kw.items()}
        ref_outs, ref_grads = _run("reference", *leaves64, kw64, [t.double() for t in grad_outs])
        ref_outs = [t.detach() for t in ref_outs]
        chosen = explain(q, k, v, **kw).backend
        case_rows = []
        for bname, backend in BACKENDS.items():
            ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
            kwl = {a: (b.detach().requires_grad_() if isinstance(b, torch.Tensor) and b.is_floating_point() else b)
                   for a, b in kw.items()}
            req = build_request(ql, kl, vl, **kwl)
            why = backend.unsupported(req)
            with_grad = why is None
            if why is not None:
                # A forward-only backend (e.g. flex on the CPU) still shows its forward.
                with torch.no_grad():
                    why = backend.unsupported(build_request(ql, kl, vl, **kwl))
            if why is not None:
                case_rows.append(dict(case=name, backend=bname, note=why.replace("missing ", "cannot: ")))
                continue
            try:
                if with_grad:
                    outs, grads = _run(bname, ql, kl, vl, kwl, grad_outs)
                    err = _err(outs, ref_outs)
                else:
                    err, grads = 0.0, None
                with torch.no_grad():  # the call inference makes (and the one timed, warmed up by this check)
                    err = max(err, _err(_run(bname, ql, kl, vl, kwl, None)[0], ref_outs))
                    ms = _timed(lambda: attention(ql, kl, vl, backend=bname, **kwl), dev, 5)
                gerr = None
                if grads is not None:
                    gerr = _err(grads, ref_grads)
                case_rows.append(dict(case=name, backend=bname, err=err, grad_err=gerr, ms=ms,
                                      auto=(bname == chosen)))
            except Exception as e:  # a demo reports, it does not stop
                case_rows.append(dict(case=name, backend=bname, note=f"ERROR {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]))
        _judge(case_rows, dtype)
        rows += case_rows
    _print(rows)
    return rows


def _judge(rows: list[dict], dtype: torch.dtype) -> None:
    """Mark rows (one case) whose relative error exceeds 4x the reference backend's in the same dtype
    (plus 4 eps: an exact reference still leaves rounding room); the reference row itself is bad past
    64 eps (its math runs in float32 at least: a NaN, or a broken oracle, must not pass the rest)."""
    ref = next((r for r in rows if r["backend"] == "reference" and "err" in r), None)
    eps = torch.finfo(dtype).eps
    for r in rows:
        if "err" not in r or ref is None:
            continue
        errs = [(r["err"], ref["err"])]
        if r["grad_err"] is not None and ref["grad_err"] is not None:
            errs.append((r["grad_err"], ref["grad_err"]))
        bound = (lambda e_ref: 64 * eps) if r is ref else (lambda e_ref: 4 * e_ref + 4 * eps)
        r["bad"] = any(not e <= bound(e_ref) for e, e_ref in errs)  # (not <=: a NaN error is bad)
    if ref is not None and ref["bad"]:  # no oracle to judge by: nothing in the case passes
        for r in rows:
            if "err" in r:
                r["bad"] = True


def _print(rows: list[dict]) -> None:
    print(f"\n{'case':<16} {'backend':<10} {'rel err':>9} {'grad err':>9} {'fwd ms':>8}  note")
    print("-" * 80)
    last = None
    for r in rows:
        case = r["case"] if r["case"] != last else ""
        last = r["case"]
        if "note" in r:
            print(f"{case:<16} {r['backend']:<10} {'':>9} {'':>9} {'':>8}  {r['note']}")
            continue
        g = f"{r['grad_err']:.1e}" if r["grad_err"] is not None else "fwd only"
        mark = ("BAD (over 4x the reference backend's error)  " if r.get("bad") else "") + ("<- auto" if r["auto"] else "")
        print(f"{case:<16} {r['backend']:<10} {r['err']:>9.1e} {g:>9} {r['ms']:>8.2f}  {mark}")
    print("\nerrors: max |x - float64 reference| / max |reference| of each of out and lse (forward with and without "
          "gradients), and of dq, dk, dv, dbias, dsinks, the worst of them; BAD: over 4x the reference backend's "
          "error in the same dtype (+ 4 eps). fwd ms: median of 5 calls after a warm-up (wall time). '<- auto' "
          "marks the backend the dispatcher picks.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m attnkit demo", description=__doc__)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--length", type=int, default=None,
                   help="sequence length of every case, at least 16 (default: 1024 on CUDA, 256 on the CPU)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    if args.length is not None and args.length < 16:
        p.error(f"--length: expected an integer >= 16, got {args.length}")
    rows = run_demo(args.device, args.length)
    bad = [r for r in rows if r.get("bad") or ("note" in r and r["note"].startswith("ERROR"))]
    return 1 if bad else 0
