"""MultiHeadAttention on CUDA: torch.compile(fullgraph=True) with gradients on the sdpa and
flex paths, and a decode step captured in a CUDA graph. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import attnkit

pytestmark = pytest.mark.cuda


def _layer(backend: str, window=None, sinks=False):
    torch.manual_seed(0)
    cfg = attnkit.AttentionConfig(
        d_model=512, n_heads=8, use_rope=True, use_gqa=True, gqa_groups=2, backend=backend,
        window=window, use_attention_sinks=sinks, num_attention_sinks=4 if sinks else 0,
    )
    return attnkit.MultiHeadAttention(cfg).cuda().to(torch.bfloat16)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("backend,window", [("sdpa", None), ("flex", None), ("flex", 64)],
                         ids=["sdpa", "flex", "flex-window"])
def test_compile_fullgraph_fwd_bwd(backend, window):
    mod = _layer(backend, window)
    x = torch.randn(2, 256, 512, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(x)
    xe = x.clone().requires_grad_()
    eager = mod(xe, causal=True)
    ge = torch.autograd.grad(eager, [xe] + list(mod.parameters()), g)
    xc = x.clone().requires_grad_()
    compiled = torch.compile(mod.forward, fullgraph=True)
    out = compiled(xc, causal=True)
    gc = torch.autograd.grad(out, [xc] + list(mod.parameters()), g)
    assert _rel(out, eager) < 2e-2
    for a, b in zip(gc, ge):
        assert torch.isfinite(a).all()
        assert _rel(a, b) < 5e-2


@pytest.mark.parametrize("sinks,window", [(False, None), (True, 32)], ids=["plain", "sinks-window"])
def test_decode_cuda_graph_matches_eager_and_full(sinks, window):
    mod = _layer("auto", window, sinks)
    B, P, steps = 4, 100, 6
    x = torch.randn(B, P + steps, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        full = mod(x, causal=True)
        cache = mod.new_kv_cache(B, 128)
        mod(x[:, :P], kv_cache=cache)
        tok = torch.empty(B, 1, 512, device="cuda", dtype=torch.bfloat16)
        tok.copy_(x[:, P:P + 1])
        # Warm up on a side stream, then capture one step at length P.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                cache.lengths.fill_(P)
                mod(tok, kv_cache=cache)
        torch.cuda.current_stream().wait_stream(s)
        cache.lengths.fill_(P)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = mod(tok, kv_cache=cache)
        cache.lengths.fill_(P)
        outs = []
        for t in range(steps):  # each replay appends one token and advances the device lengths
            tok.copy_(x[:, P + t:P + t + 1])
            graph.replay()
            outs.append(static_out.clone())
        assert int(cache.lengths[0]) == P + steps
        dec = torch.cat(outs, dim=1)
    assert _rel(dec, full[:, P:]) < 2e-2
