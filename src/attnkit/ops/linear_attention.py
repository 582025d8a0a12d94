"""Kernelised linear attention (Katharopoulos et al. 2020; Performer's FAVOR+), O(L * D^2).

out_i = phi(q_i) . S / (phi(q_i) . z), with S = sum_j phi(k_j) v_j^T and
z = sum_j phi(k_j) over the keys query i may see (all of them, or j <= i
when causal, computed with prefix sums). Pure PyTorch; autograd gives the
backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FEATURE_MAPS", "feature_map", "linear_attention"]

FEATURE_MAPS = ("elu", "relu", "favor+")
_EPS = 1e-6


def _favor_log_features(x: Tensor, projection: Tensor | None) -> Tensor:
    """log of FAVOR+ positive random features: w.x - |x|^2 / 2 with x pre-scaled by D^-1/4,
    so that phi(q).phi(k) estimates exp(q.k / sqrt(D)) (times 1/M, applied by the caller)."""
    if projection is None:
        raise ValueError("feature map 'favor+' needs a projection matrix [D, M]")
    x = x * x.shape[-1] ** -0.25
    return x @ projection.to(x.dtype) - 0.5 * (x * x).sum(dim=-1, keepdim=True)


def feature_map(x: Tensor, kind: str, projection: Tensor | None = None) -> Tensor:
    """phi(x) for x [B, H, L, D]; "favor+" needs projection [D, M] and returns [B, H, L, M]."""
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    if kind == "favor+":
        log_phi = _favor_log_features(x, projection)
        # A shift keeps exp finite and cancels in a query's own num / den ratio.
        stab = log_phi.amax(dim=-1, keepdim=True).detach()
        return torch.exp(log_phi - stab) / math.sqrt(projection.shape[-1])
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {kind!r}")


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    feature_map_kind: str = "elu",
    projection: Tensor | None = None,
    causal: bool = False,
    key_mask: Tensor | None = None,
) -> Tensor:
    """Linear attention. q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] -> [B, H, Lq, Dv].

    key_mask: bool [B, Lk] or anything broadcastable to [B, 1, 1, Lk], True = real key;
    masked keys contribute nothing. causal requires Lq == Lk. Computed in float32.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, L, D], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if k.shape[:3] != v.shape[:3] or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"linear attention needs q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]; "
            f"got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal linear attention needs Lq == Lk, got {q.shape[2]} and {k.shape[2]}")
    dtype = q.dtype
    qf = feature_map(q.float(), feature_map_kind, projection)
    vf = v.float()
    keep = None
    if key_mask is not None:
        if key_mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool (True = real key), got {key_mask.dtype}")
        B, Lk = k.shape[0], k.shape[2]
        km = key_mask.reshape(key_mask.shape[0], -1) if key_mask.dim() != 2 else key_mask
        if km.shape[-1] != Lk or km.shape[0] not in (1, B) or km.numel() != km.shape[0] * Lk:
            raise ValueError(
                f"linear attention takes a key padding mask [B, Lk] = [{B}, {Lk}] "
                f"(or [B, 1, 1, Lk]), got shape {list(key_mask.shape)}"
            )
        keep = km.view(km.shape[0], 1, Lk, 1)
    if feature_map_kind == "favor+":
        # Keys share ONE shift per (batch, head), taken over real keys only, so that it
        # cancels in num / den and a huge padded key cannot underflow the real ones.
        log_k = _favor_log_features(k.float(), projection)
        if keep is not None:
            log_k = log_k.masked_fill(~keep, float("-inf"))
        stab = log_k.amax(dim=(-2, -1), keepdim=True).detach()
        stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))
        kf = torch.exp(log_k - stab) / math.sqrt(projection.shape[-1])
    else:
        kf = feature_map(k.float(), feature_map_kind, projection)
        if keep is not None:
            kf = kf * keep.to(kf.dtype)
    if not causal:
        s = torch.einsum("bhkm,bhke->bhme", kf, vf)
        z = kf.sum(dim=2)
        num = torch.einsum("bhqm,bhme->bhqe", qf, s)
        den = torch.einsum("bhqm,bhm->bhq", qf, z)
    else:
        # Prefix sums over positions: S_i = sum_{j<=i} phi(k_j) v_j^T.
        s = torch.einsum("bhkm,bhke->bhkme", kf, vf).cumsum(dim=2)
        z = kf.cumsum(dim=2)
        num = torch.einsum("bhqm,bhqme->bhqe", qf, s)
        den = torch.einsum("bhqm,bhqm->bhq", qf, z)
    return (num / (den.unsqueeze(-1) + _EPS)).to(dtype)
