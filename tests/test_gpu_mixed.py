"""MixedAttention on CUDA: the fused form (one call with a GroupMask: our Triton kernel under
backend auto, or FlexAttention) and the per-key/value-set form agree with the sequential form,
forward and backward, in bf16. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from attnkit import AttentionPattern as P, MixedAttention, MixedAttentionConfig, TokenSpec as T

pytestmark = pytest.mark.cuda

LAYOUTS = {
    "anchors": ([T("sa", 300), T("sq", 150), T("va", 200), T("vq", 170)],
                [P(["sa", "sq"], ["sa"]), P(["va", "vq"], ["va"])]),
    "small_groups": ([T(f"g{i}", 96 + 17 * i) for i in range(6)],
                     [P([f"g{i}"], ["g0"] if i == 0 else ["g0", f"g{i}"]) for i in range(6)]),
}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("form", ["fused", "fused_flex", "per_kv_set"])
def test_parallel_matches_sequential_bf16(layout, form):
    specs, pats = LAYOUTS[layout]
    N = sum(s.size for s in specs)
    torch.manual_seed(0)
    seq = MixedAttention(MixedAttentionConfig(dim=128, num_heads=4, parallel=False)).cuda().to(torch.bfloat16)
    backend = "flex" if form == "fused_flex" else "auto"
    par = MixedAttention(MixedAttentionConfig(dim=128, num_heads=4, parallel=True, backend=backend))
    par = par.cuda().to(torch.bfloat16)
    par.load_state_dict(seq.state_dict())
    par._fused_pays = lambda lay, x: form != "per_kv_set"
    x = torch.randn(2, N, 128, device="cuda", dtype=torch.bfloat16)
    kpm = torch.rand(2, N, device="cuda") > 0.1
    g = torch.randn_like(x)
    outs = []
    for m in (seq, par):
        xg = x.clone().requires_grad_()
        out, _ = m(xg, specs, pats, key_padding_mask=kpm)
        grads = torch.autograd.grad(out, [xg] + list(m.parameters()), g)
        outs.append((out, grads))
    assert _rel(outs[1][0], outs[0][0]) < 2e-2
    for a, b in zip(outs[1][1], outs[0][1]):
        assert torch.isfinite(a).all() and _rel(a, b) < 5e-2
