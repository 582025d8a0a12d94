"""Kernelised linear attention (Katharopoulos et al. 2020; Performer's FAVOR+), O(L * D^2).

out_i = phi(q_i) . S / (phi(q_i) . z), with S = sum_j phi(k_j) v_j^T and
z = sum_j phi(k_j) over the keys query i may see (all of them, or j <= i
when causal, computed chunkwise: prefix sums over chunk states plus a masked product within
a chunk, memory O(L * (M * Dv / 64 + 64)) per head). Both forms run in PyTorch (autograd gives their
backward; the non-causal one is two batched matmuls) or, on CUDA, in the Triton kernels of
`ops.chunk_product` (the same chunkwise steps fused, with a backward of their own).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import flag, key_padding_mask, tensor
from . import chunk_product

__all__ = ["BACKENDS", "FEATURE_MAPS", "feature_map", "linear_attention", "linear_backend"]

FEATURE_MAPS = ("elu", "relu", "favor+")
# Where linear attention runs: "chunked" (PyTorch), "triton" (ops.chunk_product), "auto" (triton where it can).
BACKENDS = ("auto", "chunked", "triton")
# Causal chunk length: states are kept per chunk, [B, H, L / CHUNK, M, Dv], not per position, and the
# quadratic part within a chunk costs [B, Hq, L, CHUNK].
CHUNK = 64


def _favor_log_features(x: Tensor, projection: Tensor | None) -> Tensor:
    """log of FAVOR+ positive random features: w.x - |x|^2 / 2 with x pre-scaled by D^-1/4,
    so that phi(q).phi(k) estimates exp(q.k / sqrt(D)) (times 1/M, applied by the caller)."""
    if projection is None:
        raise ValueError("feature map 'favor+' needs a projection matrix [D, M]")
    x = x * x.shape[-1] ** -0.25
    return x @ projection.to(x.dtype) - 0.5 * (x * x).sum(dim=-1, keepdim=True)


def _favor_exp(log_phi: Tensor, dims) -> Tensor:
    """exp(log_phi - shift) / sqrt(M), the shift a detached max over dims (-inf where all are -inf:
    masked keys only, whose features are then 0). Any shift shared by the keys cancels in num / den."""
    if log_phi.numel() == 0:  # no keys: no features, and no max to take
        return log_phi.exp()
    stab = log_phi.amax(dim=dims, keepdim=True).detach()
    stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))
    return torch.exp(log_phi - stab) / math.sqrt(log_phi.shape[-1])


def _causal_chunkwise(qf: Tensor, kf: Tensor, vf: Tensor) -> tuple[Tensor, Tensor]:
    """Causal numerator [B, Hkv, G, L, Dv] and denominator [B, Hkv, G, L] for qf [B, Hkv, G, L, M],
    kf [B, Hkv, L, M], vf [B, Hkv, L, Dv]: sum over j <= i of (qf_i . kf_j) v_j and of qf_i . kf_j.

    The chunkwise form (as flash-linear-attention's chunk kernels): keys of earlier chunks through the
    summed state phi(k)^T v of those chunks, keys of the query's own chunk through a masked
    [CHUNK, CHUNK] product. A per-position prefix sum would hold [B, H, L, M, Dv]."""
    B, Hkv, G, L, M = qf.shape
    E = vf.shape[-1]
    C = min(CHUNK, max(L, 1))
    n = -(-L // C)
    pad = n * C - L  # zero features: padded keys add nothing, padded queries are cut off
    q = F.pad(qf, (0, 0, 0, pad)).view(B, Hkv, G, n, C, M)
    kt = F.pad(kf, (0, 0, 0, pad)).view(B, Hkv, 1, n, C, M).transpose(-1, -2)  # [.., 1, n, M, C]: shared by G
    v = F.pad(vf, (0, 0, 0, pad)).view(B, Hkv, 1, n, C, E)
    # matmul rather than einsum: the same products at a fraction of the host time (these shapes are small)
    s = kt @ v  # each chunk's state [.., n, M, E]
    z = kt.sum(dim=-1, keepdim=True)  # [.., n, M, 1]
    # exclusive prefix over chunks: the state of every chunk before
    s = torch.cat([torch.zeros_like(s[:, :, :, :1]), s[:, :, :, :-1].cumsum(dim=3)], dim=3)
    z = torch.cat([torch.zeros_like(z[:, :, :, :1]), z[:, :, :, :-1].cumsum(dim=3)], dim=3)
    a = (q @ kt).tril_()  # [.., G, n, C, C]: within the chunk, keys up to the query
    num = q @ s + a @ v
    den = (q @ z).squeeze(-1) + a.sum(dim=-1)
    return num.reshape(B, Hkv, G, n * C, E)[:, :, :, :L], den.reshape(B, Hkv, G, n * C)[:, :, :, :L]


def linear_backend(name: str) -> str:
    """name if it is one of BACKENDS, else a ValueError listing them."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def feature_map(x: Tensor, kind: str, projection: Tensor | None = None, *, is_query: bool = True) -> Tensor:
    """phi(x) for x [B, H, L, D]; "favor+" needs projection [D, M] and returns [B, H, L, M].

    FAVOR+ features carry a shift for float32 range, as in Performer: one per row for queries
    (is_query=True: it cancels in each query's num / den), one per (batch, head) over all positions
    and features for keys (is_query=False). Keys must share theirs: a shift per key would weight
    the keys differently."""
    if kind == "elu":
        return F.elu(x) + 1.0
    if kind == "relu":
        return F.relu(x)
    if kind == "favor+":
        return _favor_exp(_favor_log_features(x, projection), -1 if is_query else (-2, -1))
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
    backend: str = "auto",
) -> Tensor:
    """Linear attention. q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] -> [B, Hq, Lq, Dv].

    GQA / MQA: Hq a multiple of Hkv; query head h reads kv head h // (Hq / Hkv), as torch's
    enable_gqa does. The key-value state is built once per kv head and shared by its group.

    key_mask: bool [B, Lk] or anything broadcastable to [B, 1, 1, Lk], True = real key;
    masked keys contribute nothing, and a query with no real key (or, for "relu", phi(q) . z = 0)
    gets 0. causal requires Lq == Lk. Half-precision inputs compute in float32, float64 in float64.

    backend: "chunked", PyTorch ops (causal: over 64-token chunks; not causal: two batched matmuls);
    "triton", attnkit's Triton kernels (`ops.chunk_product`: the same chunkwise steps in two launches per
    product, elu / relu features made as q and k are loaded, float32 sums of tf32 products for causal
    half-precision inputs and of three tf32 products (float32's error) otherwise; CUDA, or the CPU
    under TRITON_INTERPRET=1; not float64; first-order gradients only: differentiating its backward again
    raises, "chunked" differentiates twice); "auto", triton for
    CUDA tensors that are not float64 when Triton is installed, outside torch.compile, else chunked.

    The output is a convex combination of the values (the features are nonnegative), so no epsilon
    is added to the denominator: one would dominate FAVOR+'s shifted denominators, which can be
    ~1e-8 at head dim 128. Causal FAVOR+ shares the keys' shift over all positions, as Performer
    does: exact in real arithmetic; in float32 a key whose log-features lie more than ~87 below
    the largest of its (batch, head) contributes 0.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(name, t)
    causal = flag("causal", causal)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [B, H, L, D], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if (k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]
            or (q.shape[1] % k.shape[1] if k.shape[1] else q.shape[1])):
        raise ValueError(
            f"linear attention needs q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] with Hq a "
            f"multiple of Hkv; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal linear attention needs Lq == Lk, got {q.shape[2]} and {k.shape[2]}")
    linear_backend(backend)
    if backend == "triton" and not chunk_product.available(q):
        raise ValueError(
            f"backend='triton' needs a CUDA tensor (or TRITON_INTERPRET=1 on the CPU), Triton installed, and "
            f"not float64 (the kernels compute in float32); got a {q.dtype} tensor on {q.device}"
        )
    # auto inside torch.compile keeps the PyTorch form, which the compiler traces whole (it would break its
    # graph at the kernels' launches)
    fused = backend != "chunked" and (
        backend == "triton" or (q.is_cuda and chunk_product.available(q) and not torch.compiler.is_compiling()))
    dtype = q.dtype
    if fused and key_mask is None and feature_map_kind in ("elu", "relu"):  # features made as the kernels load
        return chunk_product.fused_linear_attention(q, k, v, feature_map_kind, causal)
    B, Hq, Lq = q.shape[:3]
    Hkv = k.shape[1]
    ct = torch.promote_types(dtype, torch.float32)
    qf = feature_map(q.to(ct), feature_map_kind, projection)
    qf = qf.view(B, Hkv, Hq // max(Hkv, 1), Lq, qf.shape[-1])  # [B, Hkv, G, Lq, M]: a kv head's query group
    keep = None
    if key_mask is not None:
        B, Lk = k.shape[0], k.shape[2]
        keep = key_padding_mask("mask", key_mask, B, Lk).view(B, 1, Lk, 1)
    if feature_map_kind == "favor+":
        # One shift for the keys of a (batch, head), over real keys only, so that a huge padded
        # key cannot underflow the real ones.
        log_k = _favor_log_features(k.to(ct), projection)
        if keep is not None:
            log_k = log_k.masked_fill(~keep, float("-inf"))
        kf = _favor_exp(log_k, (-2, -1))
    else:
        kf = feature_map(k.to(ct), feature_map_kind, projection)
        if keep is not None:
            kf = kf * keep.to(kf.dtype)
    if fused:
        return chunk_product.fused_linear_attention(qf.view(B, Hq, Lq, qf.shape[-1]), kf, v, None, causal).to(dtype)
    vf = v.to(ct)
    if not causal:
        kt = kf.transpose(-1, -2).unsqueeze(2)  # [B, Hkv, 1, M, Lk]: shared by the query group
        num = qf @ (kt @ vf.unsqueeze(2))
        den = (qf @ kt.sum(dim=-1, keepdim=True)).squeeze(-1)
    else:
        num, den = _causal_chunkwise(qf, kf, vf)
    # den = 0 only where every weight is 0; num is 0 there too
    out = num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)
    return out.reshape(B, Hq, Lq, out.shape[-1]).to(dtype)
