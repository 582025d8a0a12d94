#!/usr/bin/env python
"""Probe: our Triton kernels skipping the tiles a mask tensor leaves empty and running the tiles it allows whole
without reading it, against the same kernels reading the mask in every live tile (the full ranges of the live
table cleared), visiting every tile (`flash_attention._SKIP_MASKED`), the backward making the mask's occupancy
again instead of taking the forward's, FlexAttention and SDPA, all through `attnkit.attention` with forced
backends on the same inputs. bf16, H = 16, B x L = 16k tokens; forward (no_grad) and forward+backward
(`torch.autograd.grad` of q, k, v), ms, least of 3 interleaved rounds. Masks: transformers-style [B, 1, L, L]
causal + key padding (random or right padding), key padding [B, 1, 1, L], and masks with no empty tile
(the cost of finding the live tiles). CUDA only.

    python benchmarks/probe_mask_skip.py

Results (H100, 2026-11-24): docs/benchmarks.md, "Tiles a mask tensor leaves empty are skipped".
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import triton  # noqa: E402

import attnkit  # noqa: E402
import harness  # noqa: E402
from attnkit.ops import flash_attention as fa  # noqa: E402

if not torch.cuda.is_available():
    raise SystemExit("probe_mask_skip needs a CUDA device")

torch._dynamo.config.cache_size_limit = 512
if hasattr(torch._dynamo.config, "recompile_limit"):
    torch._dynamo.config.recompile_limit = 512
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
H, TOK = 16, 16384


def masks(kind, B, L, g):
    dev = "cuda"
    lengths = torch.randint(L // 2, L + 1, (B,), device=dev, generator=g)
    right = torch.arange(L, device=dev).view(1, 1, 1, L) < lengths.view(B, 1, 1, 1)
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    if kind == "hf causal + random pad":
        km = torch.rand(B, 1, 1, L, device=dev, generator=g) > 0.1
        km[..., 0] = True
        return causal & km
    if kind == "hf causal + right pad":
        return causal & right
    if kind == "key right pad":
        return right
    if kind == "full random":
        m = torch.rand(B, 1, L, L, device=dev, generator=g) > 0.1
        m[..., 0] = True
        return m
    if kind == "key random":
        m = torch.rand(B, 1, 1, L, device=dev, generator=g) > 0.1
        m[..., 0] = True
        return m
    raise ValueError(kind)


_LIVE = fa._live


def _live_ranges_only(bits, spec, occ=None):
    """fa._live with the full-tile ranges cleared: the kernels then read the mask in every live tile."""
    out = _LIVE(bits, spec, occ)
    if spec is not None:
        out[..., 2] = spec[-2]
        out[..., 3] = 0
    return out


_BACKWARD = fa._backward


def _backward_own_occupancy(*args, occ=None, **kw):
    """fa._backward making the mask's occupancy again (as before ce7a53e), not taking the forward's."""
    return _BACKWARD(*args, **kw)


ROWS = [(L, D, k) for k in ("hf causal + random pad",) for L in (1024, 4096) for D in (64, 128)] + \
       [(4096, D, k) for k in ("hf causal + right pad", "key right pad") for D in (64, 128)] + \
       [(L, 64, "full random") for L in (1024, 4096)] + [(1024, 64, "key random")]

for L, D, kind in ROWS:
    B = TOK // L
    g = torch.Generator(device="cuda").manual_seed(L + D)
    q, k, v, go = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    mask = masks(kind, B, L, g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attnkit.attention(q[:1].float(), k[:1].float(), v[:1].float(), mask=mask[:1], backend="reference")
    fwd, fb, errs = {}, {}, []
    for name, be, skip in (("ours skip", "triton", True), ("ours occupancy twice", "triton", "twice"),
                           ("ours ranges only", "triton", "ranges"), ("ours every", "triton", False),
                           ("flex", "flex", None), ("sdpa", "sdpa", None)):
        def setup(skip):
            if skip is not None:
                fa._SKIP_MASKED = bool(skip)
                fa._live = _live_ranges_only if skip == "ranges" else _LIVE
                fa._backward = _backward_own_occupancy if skip == "twice" else _BACKWARD

        def f(be=be, skip=skip):
            setup(skip)
            with torch.no_grad():
                return attnkit.attention(q, k, v, mask=mask, backend=be)

        def fbw(be=be, skip=skip):
            setup(skip)
            out = attnkit.attention(*leaves, mask=mask, backend=be)
            return torch.autograd.grad(out, leaves, go)
        try:
            out = f()
            grads = fbw()
        except Exception as e:  # noqa: BLE001
            errs.append(f"{name} failed {type(e).__name__}: {str(e)[:200]}")
            continue
        rel = float((out[:1].float() - ref).norm() / ref.norm())
        errs.append(f"{name} {rel:.1e}")
        fwd[name], fb[name] = f, fbw
    # skip vs every: identical?
    fa._SKIP_MASKED, fa._live, fa._backward = True, _LIVE, _BACKWARD
    a = torch.autograd.grad(attnkit.attention(*leaves, mask=mask, backend="triton"), leaves, go)
    fa._SKIP_MASKED = False
    b = torch.autograd.grad(attnkit.attention(*leaves, mask=mask, backend="triton"), leaves, go)
    fa._SKIP_MASKED = True
    same = all(torch.equal(x, y) for x, y in zip(a, b))
    tf = harness.best_of_rounds(fwd)
    tb = harness.best_of_rounds(fb)
    print(f"L={L} B={B} D={D} {kind}: err vs fp32 ref {', '.join(errs)}; grads skip==every {same}", flush=True)
    print("   fwd ms " + ", ".join(f"{n} {tf[n]:.3f}" for n in tf) + " | fwd+bwd ms " + ", ".join(f"{n} {tb[n]:.3f}" for n in tb), flush=True)
    s = "ours skip"
    r = "ours ranges only"
    print(f"   full tiles unmasked: x{tf[r] / tf[s]:.2f} fwd, x{tb[r] / tb[s]:.2f} fwd+bwd; the forward's occupancy "
          f"reused: x{tb['ours occupancy twice'] / tb[s]:.3f} fwd+bwd", flush=True)
    print(f"   skip speed-up fwd {tf['ours every'] / tf[s]:.2f}x fwd+bwd {tb['ours every'] / tb[s]:.2f}x; "
          + "; ".join(f"{p} / ours: fwd {tf[p] / tf[s]:.2f}x fwd+bwd {tb[p] / tb[s]:.2f}x" for p in ("flex", "sdpa") if p in tf),
          flush=True)
