#!/usr/bin/env python
"""Probe: where `auto` should send masks, softcap, windows and sinks on CUDA (the triton backend's speed rule).

For each row, our Triton kernel (`backend="triton"`) against every peer backend that serves the call
(`flex`, `sdpa`), all forced through `attnkit.attention` on the same inputs: forward (no_grad) and
forward+backward (`torch.autograd.grad` of q, k, v and the bias), ms, the least of 3 interleaved rounds
(`harness.best_of_rounds`). Each backend's forward is first checked against the float32 reference on
one batch row. bf16, H = 16, B x L = 16k tokens unless told otherwise. It prints what `auto` picks
for each row.

    python benchmarks/probe_auto_rules.py            # the rows
    python benchmarks/probe_auto_rules.py --tokens 65536 --heads 32 --lengths 2048 --dims 96 \
        --kinds "key mask" softcap                   # other shapes: every (L, D, kind) of the lists
    python benchmarks/probe_auto_rules.py ... --fresh-mask   # new mask contents before every call
    python benchmarks/probe_auto_rules.py --tiles    # FlexAttention's default tiles against 64 x 64 at
                                                     # D = 40 and 56 (the flex backend's tile rule)

Results (H100, 2026-11-24): docs/benchmarks.md, "Where `auto` sends masks, softcap, windows and sinks".
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import harness  # noqa: E402

H, TOKENS = 16, 16384
FRESH_MASK = False  # --fresh-mask: every call sees new mask contents, as a padding mask of a new batch


KINDS = ("key mask", "key pad", "left pad", "causal + softcap", "window", "sinks", "causal + sinks", "key mask + causal",
         "softcap", "key mask + window", "full mask", "hf mask", "window + sinks", "bias + window",
         "bias + causal + softcap", "bias + sinks")


def rows() -> list[tuple[int, int, str]]:
    """The default rows (L, D, kind): kind names the call's keywords (see `keywords`)."""
    out = []
    for L in (1024, 4096):
        for D in (64, 128):
            out += [(L, D, k) for k in ("key mask", "causal + softcap", "window", "sinks", "causal + sinks")]
        out += [(L, 64, "key mask + causal"), (L, 64, "softcap")]
    for D in (64, 128):
        out += [(1024, D, k) for k in ("window + sinks", "bias + window", "bias + causal + softcap", "bias + sinks")]
    return out


def keywords(kind: str, L: int, B: int, D: int, g: torch.Generator) -> dict:
    kw: dict = {}
    for part in kind.split(" + "):
        if part == "key mask":
            km = torch.rand(B, 1, 1, L, device="cuda", generator=g) > 0.1
            km[..., 0] = True
            kw["mask"] = km
        elif part in ("key pad", "left pad"):  # padding as tokenizers make it: lengths in [L/2, L], one whole
            lens = torch.randint(L // 2, L + 1, (B, 1, 1, 1), device="cuda", generator=g)
            j = torch.arange(L, device="cuda").view(1, 1, 1, L)
            kw["mask"] = j < lens if part == "key pad" else j >= L - lens
        elif part == "full mask":  # [B, 1, L, L], 10% of pairs masked at random (no tile is empty)
            fm = torch.rand(B, 1, L, L, device="cuda", generator=g) > 0.1
            fm[..., 0] = True
            kw["mask"] = fm
        elif part == "hf mask":  # [B, 1, L, L]: causal and key padding in one tensor, as transformers builds it
            km = torch.rand(B, 1, 1, L, device="cuda", generator=g) > 0.1
            km[..., 0] = True
            kw["mask"] = torch.ones(L, L, dtype=torch.bool, device="cuda").tril() & km
        elif part == "causal":
            kw["causal"] = True
        elif part == "softcap":
            kw["softcap"] = 30.0
        elif part == "window":
            kw["window"] = L // 4
        elif part == "sinks":
            kw["sinks"] = torch.randn(H, device="cuda", dtype=torch.bfloat16, generator=g)
        elif part == "bias":
            kw["bias"] = torch.randn(1, H, L, L, device="cuda", dtype=torch.bfloat16, generator=g)
        else:
            raise ValueError(f"unknown part {part!r} of row kind {kind!r}")
    return kw


def run_row(L: int, D: int, kind: str) -> str:
    import attnkit
    from attnkit.request import build_request

    B = TOKENS // L
    g = torch.Generator(device="cuda").manual_seed(L + D)
    q, k, v, go = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    kw = keywords(kind, L, B, D, g)
    bias = kw.pop("bias", None)
    with torch.no_grad():
        req = build_request(q, k, v, bias=bias, **kw)
        backends = [b for b in ("triton", "flex", "sdpa") if attnkit.get_backend(b).unsupported(req) is None]
        one = {n: (t[:1] if torch.is_tensor(t) and t.dim() == 4 and t.shape[0] == B and B > 1 else t)
               for n, t in kw.items()}
        ref = attnkit.attention(q[:1], k[:1], v[:1], bias=bias, backend="reference", **one)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([bias.clone().requires_grad_()] if bias is not None else [])
    # With FRESH_MASK each call first copies the next of two mask contents into the mask (the first is the
    # checked one): a backend that caches work per mask (flex's block mask) redoes it, as in training.
    variants = [kw["mask"].clone(), keywords(kind, L, B, D, g)["mask"]] if FRESH_MASK and "mask" in kw else None
    calls = [0]

    def renew():
        if variants is not None:
            kw["mask"].copy_(variants[calls[0] % 2])
            calls[0] += 1

    fwd, fwdbwd, errs = {}, {}, []
    for b in backends:
        def f(b=b):
            renew()
            with torch.no_grad():
                return attnkit.attention(q, k, v, bias=bias, backend=b, **kw)

        def fb(b=b):
            renew()
            out = attnkit.attention(*leaves[:3], bias=leaves[3] if bias is not None else None, backend=b, **kw)
            return torch.autograd.grad(out, leaves, go)

        out, err, _ = harness.run_guarded(f)
        if err is not None:
            errs.append(f"{b} failed: {harness.error_summary(err)}")
            continue
        rel = float((out[:1].float() - ref.float()).norm() / ref.float().norm())
        if rel > 0.02:
            errs.append(f"{b} BAD forward (rel err {rel:.1e})")
            continue
        fb()  # builds flex's backward before timing
        fwd[b], fwdbwd[b] = f, fb
    t_f = harness.best_of_rounds(fwd) if fwd else {}
    t_b = harness.best_of_rounds(fwdbwd) if fwdbwd else {}
    with torch.no_grad():
        auto_f = attnkit.explain(q, k, v, bias=bias, **kw).backend
    auto_b = attnkit.explain(*leaves[:3], bias=leaves[3] if bias is not None else None, **kw).backend
    cells = ", ".join(f"{b} {t_f[b]:.3f} / {t_b[b]:.3f}" for b in t_f)
    ratio = ""
    peers = [b for b in t_f if b != "triton"]
    if "triton" in t_f and peers:
        ratio = (f"; ours / best peer: fwd {min(t_f[p] for p in peers) / t_f['triton']:.2f}x, "
                 f"fwd+bwd {min(t_b[p] for p in peers) / t_b['triton']:.2f}x")
    extra = ("; " + "; ".join(errs)) if errs else ""
    return f"L={L} B={B} D={D} {kind}: {cells} ms{ratio}; auto fwd {auto_f}, fwd+bwd {auto_b}{extra}"


def run_tiles() -> None:
    """FlexAttention called directly, its default kernel options against BLOCK_M = BLOCK_N = 64."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    fx = torch.compile(flex_attention, dynamic=False)
    B, L = 16, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    km = torch.rand(B, L, device="cuda", generator=g) > 0.1
    km[:, 0] = True
    masks = {"causal": create_block_mask(lambda b, h, i, j: j <= i, None, None, L, L, device="cuda"),
             "key mask": create_block_mask(lambda b, h, i, j: km[b, j], B, None, L, L, device="cuda")}
    opts = {"default": None, "64x64": {"BLOCK_M": 64, "BLOCK_N": 64}}
    for D in (40, 56, 64):
        q, k, v, go = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
        bias = torch.randn(1, H, L, L, device="cuda", dtype=torch.bfloat16, generator=g)
        for mname, bm, with_bias in (("causal", masks["causal"], False), ("key mask", masks["key mask"], False),
                                     ("key mask + bias", masks["key mask"], True)):
            train = mname != "causal"
            leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([bias.clone().requires_grad_()] if with_bias else [])
            fns_f, fns_b, fails = {}, {}, []
            for oname, o in opts.items():
                def f(o=o):
                    with torch.no_grad():
                        sm = (lambda s, b, h, i, j: s + bias[0, h, i, j]) if with_bias else None
                        return fx(q, k, v, score_mod=sm, block_mask=bm, kernel_options=o)

                def fb(o=o):
                    sm = (lambda s, b, h, i, j: s + leaves[3][0, h, i, j]) if with_bias else None
                    return torch.autograd.grad(fx(*leaves[:3], score_mod=sm, block_mask=bm, kernel_options=o), leaves, go)

                _, err, _ = harness.run_guarded(lambda: (f(), fb() if train else None))
                if err is not None:
                    fails.append(f"{oname} failed: {harness.error_summary(err)}")
                    continue
                fns_f[oname] = f
                if train:
                    fns_b[oname] = fb
            t_f = harness.best_of_rounds(fns_f) if fns_f else {}
            t_b = harness.best_of_rounds(fns_b) if fns_b else {}
            cells = " | ".join(f"{o} {t_f[o]:.3f} / " + (f"{t_b[o]:.3f}" if o in t_b else "-") for o in t_f)
            print(f"D={D} {mname}: fwd / fwd+bwd ms: {cells}" + ("; " + "; ".join(fails) if fails else ""), flush=True)


def main() -> None:
    global H, TOKENS, FRESH_MASK
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", action="store_true", help="FlexAttention's tiles at D = 40 / 56 / 64 instead")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="B x L of every row (default %(default)s)")
    ap.add_argument("--heads", type=int, default=H, help="heads of every row (default %(default)s)")
    ap.add_argument("--lengths", type=int, nargs="+", help="with --dims and --kinds: rows of every combination")
    ap.add_argument("--dims", type=int, nargs="+", help="head dims")
    ap.add_argument("--fresh-mask", action="store_true",
                    help="new mask contents before every call (flex rebuilds its block mask, as in training)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, metavar="KIND", help=f"of {KINDS}")
    args = ap.parse_args()
    chosen = (args.lengths, args.dims, args.kinds)
    if any(c is not None for c in chosen) and not all(c is not None for c in chosen):
        ap.error("--lengths, --dims and --kinds go together")
    for L in args.lengths or ():
        if L < 1 or args.tokens % L:
            ap.error(f"--lengths: {L} does not divide --tokens {args.tokens}")
    H, TOKENS, FRESH_MASK = args.heads, args.tokens, args.fresh_mask
    if not torch.cuda.is_available():
        raise SystemExit("probe_auto_rules needs a CUDA device")
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 512)
    meta = harness.collect_meta("cuda")
    print(f"{meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date_utc']}, "
          f"attnkit {meta.get('attnkit_commit')}", flush=True)
    if args.tiles:
        run_tiles()
        return
    todo = rows() if args.lengths is None else [(L, D, k) for L in args.lengths for D in args.dims for k in args.kinds]
    for L, D, kind in todo:
        print(run_row(L, D, kind), flush=True)


if __name__ == "__main__":
    main()
