"""`reference`: the plain math, materialising [B, Hq, Lq, Lk]. The oracle of every test.

Computes in float32, or float64 when the inputs are float64. Deliberately
simple and independent of the other backends' helpers (its causal/window mask
is built with tril/triu, not the index predicate the others share), so that a
bug in shared code shows up as a disagreement. The one exception: cache_seqlens /
block_table go through `AttentionRequest.densified()` like every other backend; the
tests check that helper against per-sequence plain calls and explicit masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import apply_score_mod, mask_mod_result
from ..request import AttentionRequest
from .base import ALL_FEATURES, Backend, Capabilities


def _bounds_mask(req: AttentionRequest) -> Tensor | None:
    bounds = req.key_bounds
    if bounds is None:
        return None
    left, right = bounds
    ones = torch.ones(req.len_q, req.len_k, dtype=torch.bool, device=req.device)
    keep = ones
    if right is not None:  # j - i <= offset + right
        keep = keep & ones.tril(diagonal=req.offset + right)
    if left is not None:  # j - i >= offset - left
        keep = keep & ones.triu(diagonal=req.offset - left)
    return keep


class ReferenceBackend(Backend):
    name = "reference"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64}),
        features=ALL_FEATURES,
        notes="plain math in float32 (float64 for float64 inputs); O(Lq*Lk) memory",
    )

    def speed(self, req: AttentionRequest) -> float:
        return 1.0  # the oracle, never preferred

    def run(self, req: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        req = req.densified()  # cache_seqlens / block_table -> gathered K/V and a mask
        ct = torch.float64 if req.dtype == torch.float64 else torch.float32
        B, Hq, Lq, Lk = req.batch, req.heads_q, req.len_q, req.len_k
        g = Hq // req.heads_kv
        q = req.q.to(ct)
        k = req.k.to(ct).repeat_interleave(g, dim=1)
        v = req.v.to(ct).repeat_interleave(g, dim=1)

        s = torch.matmul(q, k.transpose(-1, -2)) * req.scale
        if req.bias is not None:
            s = s + req.bias.to(ct)
        if req.softcap is not None:
            s = req.softcap * torch.tanh(s / req.softcap)
        if req.score_mod is not None:
            s = apply_score_mod(req, s, 0, 0)

        keep = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
        if req.mask is not None:
            keep = keep & req.mask
        bm = _bounds_mask(req)
        if bm is not None:
            keep = keep & bm
        if req.mask_mod is not None:
            b = torch.arange(B, device=q.device, dtype=torch.int32).view(-1, 1, 1, 1)
            h = torch.arange(Hq, device=q.device, dtype=torch.int32).view(1, -1, 1, 1)
            i = torch.arange(Lq, device=q.device, dtype=torch.int32).view(1, 1, -1, 1)
            j = torch.arange(Lk, device=q.device, dtype=torch.int32).view(1, 1, 1, -1)
            keep = keep & mask_mod_result(req.mask_mod(b, h, i, j), (B, Hq, Lq, Lk))
        s = s.masked_fill(~keep, float("-inf"))

        if req.sinks is not None:
            sink_col = req.sinks.to(ct).view(1, Hq, 1, 1).expand(B, Hq, Lq, 1)
            s = torch.cat([s, sink_col], dim=-1)
        # Softmax that gives 0 (not NaN) on rows whose logits are all -inf.
        m = s.amax(dim=-1, keepdim=True).detach()
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        den = e.sum(dim=-1, keepdim=True)
        dead = den == 0
        p = e / torch.where(dead, torch.ones_like(den), den)
        # log of 1, not 0, on dead rows: their -inf comes from the where, so no inf * 0 = NaN flows back
        lse = torch.where(dead, float("-inf"), torch.log(torch.where(dead, torch.ones_like(den), den)) + m).squeeze(-1)
        p = p[..., :Lk]
        if req.dropout_p > 0:
            p = F.dropout(p, req.dropout_p, training=True)
        out = torch.matmul(p, v).to(req.dtype)
        return out, (lse if req.return_lse else None)  # already in ct: float32, or float64
