"""Split-head attention modules: q, k, v arrive as [B, H, L, D]; every one calls the contract or an op."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._checks import backend_name, integer, key_padding_mask, positive_int, probability, real, tensor
from ..functional import attention
from ..ops.linear import FEATURE_MAPS, linear_attention, linear_backend
from .base import ATTENTION_REGISTRY, BaseAttention

__all__ = ["StandardAttention", "FlashAttention", "GatedAttention", "LinearAttention", "LiteAttention"]


class _SplitHeadsModule(BaseAttention):
    """Holds the dimensions and dropout that every split-head kind takes."""

    def __init__(self, num_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self._num_heads = positive_int("num_heads", num_heads)
        self._head_dim = positive_int("head_dim", head_dim)
        self.dropout = probability("dropout", dropout)

    @property
    def num_heads(self) -> int:
        return self._num_heads

    @property
    def head_dim(self) -> int:
        return self._head_dim


class _SoftmaxAttention(_SplitHeadsModule):
    """Shared body of the modules that are exactly the contract with a fixed backend."""

    default_backend = "auto"

    def __init__(self, num_heads: int, head_dim: int, dropout: float = 0.0, backend: str | None = None):
        super().__init__(num_heads, head_dim, dropout)
        self.backend = backend_name(backend or self.default_backend)

    def forward(self, q, k, v, mask=None, bias=None):
        """q [B, H, Lq, D], k/v [B, H(kv), Lk, D]; mask bool / bias float broadcastable to [B, H, Lq, Lk]."""
        self.check_heads(q)
        return attention(
            q, k, v, mask=mask, bias=bias, dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
        )


@ATTENTION_REGISTRY.register("standard")
class StandardAttention(_SoftmaxAttention):
    """Vanilla scaled dot-product attention: the plain math (`reference` backend), every device.

    Args: num_heads, head_dim, dropout (on the probabilities, training only).
    Shapes: q [B, H, Lq, D], k, v [B, H, Lk, D] -> [B, H, Lq, D].
    """

    default_backend = "reference"


@ATTENTION_REGISTRY.register("flash")
class FlashAttention(_SoftmaxAttention):
    """Fused attention: the dispatcher's fastest exact backend (cuDNN/flash SDPA, FlexAttention, ...).

    Same interface and math as StandardAttention. Shapes: q [B, H, Lq, D], k, v [B, H, Lk, D].
    """

    default_backend = "auto"

    @classmethod
    def from_standard(cls, module: BaseAttention) -> "FlashAttention":
        """Convert any BaseAttention: same dimensions, dropout and any parameters that fit."""
        if not isinstance(module, BaseAttention):
            raise TypeError(f"from_standard takes a BaseAttention, got {type(module).__name__}")
        from .base import _rebuild

        return _rebuild(module, cls)


@ATTENTION_REGISTRY.register("gated")
class GatedAttention(_SoftmaxAttention):
    """AlphaFold2 / OpenFold gated attention: softmax attention (pair bias welcome) times a sigmoid gate.

    out = attention(q, k, v, mask, bias) * sigmoid(q W_g + b_g), with W_g [D, D]
    initialised to 0 and b_g to `gate_init_bias`, so the gate starts at
    sigmoid(gate_init_bias) everywhere. Shapes: q [B, H, Lq, D] -> [B, H, Lq, D].
    """

    def __init__(self, num_heads: int, head_dim: int, dropout: float = 0.0, gate_init_bias: float = 1.0,
                 backend: str | None = None):
        super().__init__(num_heads, head_dim, dropout, backend)
        self.gate_init_bias = real("gate_init_bias", gate_init_bias)
        if not math.isfinite(self.gate_init_bias):
            raise ValueError(f"gate_init_bias must be finite, got {gate_init_bias!r}")
        self.gate = nn.Linear(head_dim, head_dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, self.gate_init_bias)

    def forward(self, q, k, v, mask=None, bias=None):
        if isinstance(v, Tensor) and v.dim() == 4 and v.shape[-1] != self.head_dim:  # the gate is [.., D]
            raise ValueError(f"GatedAttention gates its output with a [.., head_dim={self.head_dim}] gate, so v "
                             f"must have head dim {self.head_dim}, got v {list(v.shape)}")
        out = super().forward(q, k, v, mask=mask, bias=bias)
        return out * torch.sigmoid(self.gate(q))


def _seed(seed) -> int:
    """seed as torch.Generator.manual_seed takes it: an int in [-2**63, 2**64)."""
    if not -(2**63) <= integer("seed", seed) < 2**64:
        raise ValueError(f"seed must be in [-2**63, 2**64) (torch.Generator's range), got {seed}")
    return seed


@ATTENTION_REGISTRY.register("linear")
class LinearAttention(_SplitHeadsModule):
    """Kernelised linear attention in O(L * D^2): feature maps "elu" (elu + 1), "relu", "favor+".

    "favor+" uses `num_features` positive orthogonal random features (Performer),
    drawn from `seed` and kept in a buffer; `redraw_projection()` draws anew.
    `causal=True` (Lq == Lk) runs chunkwise: states per chunk, not per position. `backend` picks where
    either form runs (`ops.linear_attention`: "auto", "chunked" for PyTorch, "triton" for attnkit's kernels).
    `mask` is a key padding mask ([B, Lk] or broadcastable to [B, 1, 1, Lk], True = real key);
    linear attention has no logits, so `bias` is refused. `dropout` applies to the output (there is
    no matrix of probabilities to drop from). Shapes: q [B, H, Lq, D], k, v [B, Hkv, Lk, D] with H a multiple
    of Hkv (GQA / MQA: each kv head's state serves its group of query heads).
    """

    def __init__(self, num_heads: int, head_dim: int, feature_map: str = "elu", causal: bool = False,
                 num_features: int | None = None, seed: int = 0, dropout: float = 0.0, backend: str = "auto"):
        super().__init__(num_heads, head_dim, dropout)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        self.backend = linear_backend(backend)
        if num_features is not None:
            positive_int("num_features", num_features)
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
        self.feature_map, self.causal, self.seed = feature_map, causal, _seed(seed)
        self.num_features = head_dim if num_features is None else num_features
        proj = self._draw(self.seed) if feature_map == "favor+" else torch.empty(0)
        self.register_buffer("projection", proj)

    def _draw(self, seed: int) -> Tensor:
        """[D, M] Gaussian-norm orthogonal random features (blocks of a QR), from a fixed seed."""
        g = torch.Generator().manual_seed(seed)
        d, m = self._head_dim, self.num_features
        blocks = []
        for _ in range(math.ceil(m / d)):
            qm, r = torch.linalg.qr(torch.randn(d, d, generator=g))
            # signs from R's diagonal: Q is then Haar-uniform, which the estimator's unbiasedness needs
            # (the bare QR fixes R's diagonal positive, biasing Q's columns)
            blocks.append(qm * torch.sign(torch.diagonal(r)))
        w = torch.cat(blocks, dim=1)[:, :m]
        norms = torch.randn(d, m, generator=g).norm(dim=0)
        return w * norms

    def redraw_projection(self, seed: int | None = None) -> None:
        """Draw new FAVOR+ features (seed=None: the next seed)."""
        if self.feature_map != "favor+":
            return
        seed = _seed(self.seed + 1 if seed is None else seed)
        self.projection.copy_(self._draw(seed).to(self.projection))
        self.seed = seed  # after the draw: a refused seed leaves the module as it was

    def forward(self, q, k, v, mask=None, bias=None):
        self.check_heads(q)
        if bias is not None:
            raise ValueError("LinearAttention has no logits to bias; bias must be None")
        out = linear_attention(
            q, k, v, feature_map_kind=self.feature_map,
            projection=self.projection if self.feature_map == "favor+" else None,
            causal=self.causal, key_mask=mask, backend=self.backend,
        )
        return nn.functional.dropout(out, self.dropout, self.training)


@ATTENTION_REGISTRY.register("lite")
class LiteAttention(_SplitHeadsModule):
    """Element-wise gated attention (attnax's LITE): no q k^T, one gate logit per position.

    a_i = w . (q_i * k_i) + b (a Linear(head_dim, 1) over the Hadamard product),
    p = softmax over positions i of a, out_i = p_i * v_i. Needs Lq == Lk.
    `mask` is a key padding mask ([B, L] or broadcastable to [B, 1, 1, L]); masked positions get
    p = 0 (attnax multiplies after the softmax; we exclude them from it, so the
    weights still sum to 1). Shapes: q, k, v [B, H, L, D] -> [B, H, L, D].
    """

    def __init__(self, num_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__(num_heads, head_dim, dropout)
        self.gate_proj = nn.Linear(head_dim, 1)

    def forward(self, q, k, v, mask=None, bias=None):
        self.check_heads(q)
        k, v = tensor("k", k), tensor("v", v)
        if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
            raise TypeError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if q.shape != k.shape:
            raise ValueError(f"LiteAttention needs q, k [B, H, L, D] of one shape, got {list(q.shape)}, {list(k.shape)}")
        if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
            raise ValueError(f"LiteAttention needs v [B, H, L, Dv] with q's B, H, L = {list(q.shape[:3])}, "
                             f"got v {list(v.shape)}")
        if bias is not None:
            raise ValueError("LiteAttention has no pairwise logits to bias; bias must be None")
        if q.shape[2] == 0:  # no tokens: nothing to pool (and no max to take)
            return torch.zeros_like(v)
        logits = self.gate_proj(q * k)  # [B, H, L, 1]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if mask is not None:
            B, L = q.shape[0], q.shape[2]
            keep = key_padding_mask("mask", mask, B, L).view(B, 1, L, 1)
            logits = logits.masked_fill(~keep, float("-inf"))
        m = logits.amax(dim=2, keepdim=True)
        e = torch.exp(logits - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
        den = e.sum(dim=2, keepdim=True)
        p = e / torch.where(den == 0, torch.ones_like(den), den)
        out = (p * v.to(p.dtype)).to(v.dtype)
        return nn.functional.dropout(out, self.dropout, self.training)
