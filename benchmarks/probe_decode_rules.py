#!/usr/bin/env python
"""Probe: decode-shaped calls without `cache_seqlens` (plain K/V tensors holding exactly the cached
tokens), and where `auto` should send them on CUDA.

A decoder that keeps its own cache, as transformers' DynamicCache does, calls attention with the new
tokens' queries and every cached key, `causal=True`: q [B, Hq, Lq_new, D], k/v [B, Hkv, L, D]. That is
decode-shaped (AttentionRequest.decode_shaped) without per-sequence lengths. For each row: every
backend forced through `attnkit.attention` on the same inputs (forward, no gradient), and torch SDPA
called directly with the mask the call means (none for Lq_new = 1, where bottom-right causal hides
nothing; `causal_lower_right` otherwise) per kernel, as the bar. Each backend's output is checked
against the float32 reference first. K/V bytes read per second (B * L * Hkv * 2D * 2 bytes), ms, the
least of 3 interleaved rounds (`harness.best_of_rounds`). bf16, 32 query heads, 8 KV heads, D = 128 unless
told otherwise.
With --softcap, SDPA has no such argument: its direct rows run without it, as the bar of the same bytes
(the attnkit rows pass it and are checked). With --window W, the direct rows read every key while the
window leaves Lq_new + W - 1 of them: GB/s then counts those for every row (compare ms).

    python benchmarks/probe_decode_rules.py                   # the grid
    python benchmarks/probe_decode_rules.py --batches 8 --lengths 8192 --lq 1 4 --dims 64 256 \
        --dtype float16 --window 4096 --softcap 50
    python benchmarks/probe_decode_rules.py --splits      # the kernel alone, per split count (below)
    python benchmarks/probe_decode_rules.py --grow cat --lq 1 4 16   # a growing cache (below)

--splits: one query per sequence, our decode kernel called directly (ops.decode_attention, contiguous
cache, no mask) at split counts 1-64 and at the split rule's choice (marked *), against SDPA's cuDNN and
flash kernels called directly: what the kernel does on the small calls where the rows above swing with
the host.

--grow views|cat: a cache that grows with every step, as in generation. From each length of --lengths
every backend keeps growing its own cache, loop after loop (--steps per loop, default 32), so that no
step, timed or not, sees a length seen before in the process (a per-length plan or cuDNN graph cached by
an earlier loop or by another backend would hide the cost that generation pays): with n backends, the
i-th sees lengths L + i + 1, L + i + 1 + n, ... (n keys more per step, lengths interleaved so that all
run about the same lengths). k/v are longer views of one buffer (`views`) or new tensors made by
torch.cat each step as transformers' DynamicCache makes them (`cat`; the copy is in every backend's
time). Microseconds per step, the GPU timed over whole loops (so a loop bound by the host shows the
host's time), the least of 3 interleaved rounds. SDPA called directly is the bar. The first loop's last
step is checked against the float32 reference.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402

HQ = 32


def sdpa_peers(q, k, v, causal: bool) -> dict:
    """torch SDPA per kernel, called directly with the mask the attnkit call means."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    Lq, L = q.shape[2], k.shape[2]
    mask = causal_lower_right(Lq, L) if causal and Lq > 1 else None
    out = {}
    for name, kind in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                       ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fn(kind=kind):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        try:
            fn()
            torch.cuda.synchronize()
        except RuntimeError:  # this kernel does not serve the call (e.g. flash with a lower-right mask)
            continue
        out[name] = fn
    return out


SPLIT_CASES = [  # (B, Hq, Hkv, D, L): one-query calls of 30-200 us
    (1, 32, 8, 256, 8192), (1, 16, 8, 256, 8192), (1, 32, 8, 256, 32768), (8, 16, 8, 256, 8192),
    (1, 32, 8, 128, 8192), (1, 32, 8, 128, 32768), (1, 32, 8, 64, 8192),
    (32, 32, 1, 128, 8192), (1, 32, 1, 128, 8192), (1, 32, 1, 128, 32768), (8, 32, 8, 128, 8192)]


def split_sweep() -> None:
    from attnkit.ops import decode_attention as da
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, one query, contiguous cache")
    print("us per call; s<n>: the decode kernel at n splits (*: the rule's); ratios: best SDPA kernel's time over ours")
    g = torch.Generator(device="cuda").manual_seed(0)
    for B, Hq, Hkv, D, L in SPLIT_CASES:
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
        fns = {n.replace("sdpa_", ""): f for n, f in sdpa_peers(q, k, v, causal=False).items()
               if n != "sdpa_efficient"}
        rule = da.num_splits_for(B * Hkv, L, q.device)
        for s in sorted({1, 2, 4, 8, 16, 32, 64, rule}):
            fns[f"s{s}" + ("*" if s == rule else "")] = (
                lambda s=s: da.decode_attention(q, k, v, num_splits=s, return_lse=False)[0])
        ref = fns["cudnn"]() if "cudnn" in fns else fns["flash"]()
        for n, f in fns.items():
            err = (f().float() - ref.float()).abs().max().item()
            if err > 0.05:
                raise AssertionError(f"{n}: max difference {err:.3g} from SDPA at B {B} D {D} L {L}")
        t = harness.best_of_rounds(fns, rounds=3, warmup=10, rep=40)
        sdpa = min(t[n] for n in ("cudnn", "flash") if n in t)
        ours = [n for n in t if n.startswith("s")]
        print(f"B{B} Hq{Hq}/Hkv{Hkv} D{D} L{L}: " + "  ".join(f"{n} {t[n] * 1e3:.1f}us" for n in fns)
              + f"   rule/sdpa {sdpa / t[next(n for n in ours if n.endswith('*'))]:.2f}"
              + f"  best-split/sdpa {sdpa / min(t[n] for n in ours):.2f}")


def grow_rows(args, dtype) -> None:
    """The --grow grid (see the module docstring)."""
    import attnkit
    from torch.nn.attention.bias import causal_lower_right
    HKV, N = args.kv_heads, args.steps
    loops = 1 + 3 * 4  # the check, then 3 rounds of time_fn's untimed call and 3 timed loops (warmup=rep=0)
    n_be = 4  # backends: auto, sdpa, triton, sdpa_direct
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.dtype}, Hq {HQ}, Hkv {HKV}, "
          f"causal, a cache growing every step ({args.grow}), {N} steps per loop, no length seen twice")
    print("us per step; ratio: the best direct SDPA time over attnkit auto's (> 1: auto faster)")
    g = torch.Generator(device="cuda").manual_seed(0)
    for D, Lq, B, L0 in itertools.product(args.dims, args.lq, args.batches, args.lengths):
        q = torch.randn(B, HQ, Lq, D, device="cuda", dtype=dtype, generator=g)
        Lmax = L0 + n_be * (loops * N + 1)
        buf_k = torch.randn(B, HKV, Lmax, D, device="cuda", dtype=dtype, generator=g)
        buf_v = torch.randn(B, HKV, Lmax, D, device="cuda", dtype=dtype, generator=g)

        def make_loop(step, i):
            """N steps of a cache that goes on growing from where the last loop left it (the i-th backend's
            lengths: L0 + i + 1 + n_be * s)."""
            state = {"L": L0 + i + 1 - n_be}
            if args.grow == "cat":
                state["k"], state["v"] = buf_k[:, :, :L0 + i + 1 - n_be], buf_v[:, :, :L0 + i + 1 - n_be]

            def loop():
                for _ in range(N):
                    L0_, L = state["L"], state["L"] + n_be
                    state["L"] = L
                    if args.grow == "views":
                        k, v = buf_k[:, :, :L], buf_v[:, :, :L]
                    else:
                        k = state["k"] = torch.cat([state["k"], buf_k[:, :, L0_:L]], dim=2)
                        v = state["v"] = torch.cat([state["v"], buf_v[:, :, L0_:L]], dim=2)
                    out = step(k, v)
                return out
            return loop

        steps = {be: (lambda k, v, be=be: attnkit.attention(q, k, v, causal=True, backend=be))
                 for be in ("auto", "sdpa", "triton")}

        def direct(k, v):  # lower-right causal for Lq > 1 (none for one query: it hides nothing)
            mask = causal_lower_right(Lq, k.shape[2]) if Lq > 1 else None
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        steps["sdpa_direct"] = direct
        assert len(steps) == n_be
        with torch.no_grad():
            fns, first = {}, {}
            row_start = time.perf_counter()
            for i, (name, step) in enumerate(steps.items()):
                fns[name] = make_loop(step, i)
                last = L0 + i + 1 + n_be * (N - 1)  # the first loop's last length
                ref = attnkit.attention(q[:1].float(), buf_k[:1, :, :last].float(), buf_v[:1, :, :last].float(),
                                        causal=True, backend="reference")
                t0 = time.perf_counter()
                err = (fns[name]()[:1].float() - ref).abs().max().item()  # .item() waits for the loop
                first[name] = time.perf_counter() - t0
                if err > 0.05:
                    raise AssertionError(f"{name}: max error {err:.3g} at B {B} L0 {L0} Lq {Lq}")
            t = harness.best_of_rounds(fns, rounds=3, warmup=0, rep=0)
        us = {n: ms * 1e3 / N for n, ms in t.items()}
        picked = attnkit.explain(q, buf_k[:, :, :L0], buf_v[:, :, :L0], causal=True).backend
        print(f"D {D} Lq {Lq:>2} B {B:>3} L {L0:>6}: " + "  ".join(f"{n} {us[n]:.1f}" for n in us)
              + f"  sdpa-direct/auto {us['sdpa_direct'] / us['auto']:.2f}"
              + f"  sdpa-direct/triton {us['sdpa_direct'] / us['triton']:.2f}  [{picked}]"
              + f"  (row {time.perf_counter() - row_start:.1f} s; first loops, s: "
              + " ".join(f"{n} {first[n]:.2f}" for n in first) + ")")


def main() -> None:
    import attnkit
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    ap.add_argument("--lq", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dims", type=int, nargs="+", default=[128])
    ap.add_argument("--kv-heads", type=int, default=8, help="KV heads (32 query heads)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--softcap", type=float, default=None)
    ap.add_argument("--splits", action="store_true", help="the kernel alone per split count (see the docstring)")
    ap.add_argument("--grow", choices=("views", "cat"), default=None,
                    help="a cache growing by a token per step (see the docstring)")
    ap.add_argument("--steps", type=int, default=32, help="steps per loop with --grow")
    args = ap.parse_args()
    if args.splits:
        split_sweep()
        return
    dtype, HKV = getattr(torch, args.dtype), args.kv_heads
    if args.grow:
        grow_rows(args, dtype)
        return
    kw = dict(causal=True, window=args.window, softcap=args.softcap)
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; {args.dtype}, Hq {HQ}, Hkv {HKV}, "
          f"window {args.window}, softcap {args.softcap}")
    print("GB/s of K/V read (ms); ratio: attnkit auto over the best direct SDPA kernel")
    g = torch.Generator(device="cuda").manual_seed(0)
    for D, Lq, B, L in itertools.product(args.dims, args.lq, args.batches, args.lengths):
        q = torch.randn(B, HQ, Lq, D, device="cuda", dtype=dtype, generator=g)
        k = torch.randn(B, HKV, L, D, device="cuda", dtype=dtype, generator=g)
        v = torch.randn(B, HKV, L, D, device="cuda", dtype=dtype, generator=g)
        ref = attnkit.attention(q[:1].float(), k[:1].float(), v[:1].float(), backend="reference", **kw)
        fns = {}
        for be in ("auto", "sdpa", "triton", "flex"):
            def fn(be=be):
                return attnkit.attention(q, k, v, backend=be, **kw)
            with torch.no_grad():
                try:
                    err = (fn()[:1].float() - ref).abs().max().item()
                except (ValueError, RuntimeError) as e:  # a backend that does not serve the call
                    print(f"  {be}: {str(e).splitlines()[0][:120]}")
                    continue
            if err > 0.05:
                raise AssertionError(f"{be}: max error {err:.3g} at B {B} L {L} Lq {Lq}")
            fns[be] = fn
        fns.update(sdpa_peers(q, k, v, causal=True))
        with torch.no_grad():
            t = harness.best_of_rounds(fns, rounds=3, warmup=10, rep=40)
        keys = L if args.window is None else min(L, Lq + args.window - 1)
        gbs = {n: B * keys * HKV * 2 * D * 2 / (ms * 1e-3) / 1e9 for n, ms in t.items()}
        direct = max(gbs[n] for n in gbs if n.startswith("sdpa_"))
        picked = attnkit.explain(q, k, v, **kw).backend
        cells = "  ".join(f"{n} {gbs[n]:.0f} ({t[n]:.4f})" for n in fns)
        print(f"D {D} Lq {Lq:>2} B {B:>3} L {L:>6}: {cells}  auto/sdpa-direct {gbs['auto'] / direct:.2f}  "
              f"[{picked}]")


if __name__ == "__main__":
    main()
