"""attnkit: one attention contract for PyTorch, many backends, one dispatcher."""

from .backends import BACKENDS, Backend, Capabilities, get_backend, register_backend
from .dispatch import Plan
from .functional import attention, attention_backward, explain
from .groups import GroupMask, SegmentLayout
from .request import AttentionRequest
from .caches import DecodeCache, KVCache, PagedKVCache
from .varlen import varlen_attention
from .modules import (
    ATTENTION_REGISTRY, AttentionConfig, AttentionRegistry, BaseAttention, FlashAttention,
    GatedAttention, LinearAttention, LiteAttention, MultiHeadAttention, RopeScaling,
    RotaryEmbedding, StandardAttention, SwappableMixin, swap,
    TokenSpec, AttentionPattern, MixedAttentionConfig, MixedAttention,
    EvoformerAttention, MSARowAttentionWithPairBias, TriangleAttention, TriangleAttentionStartingNode,
    TriangleAttentionEndingNode,
)

__version__ = "0.1.0"

__all__ = [
    "attention", "attention_backward", "explain", "varlen_attention", "Plan", "AttentionRequest", "Backend", "Capabilities",
    "BACKENDS", "get_backend", "register_backend", "__version__", "GroupMask", "SegmentLayout",
    "DecodeCache", "KVCache", "PagedKVCache", "ATTENTION_REGISTRY", "AttentionConfig", "AttentionRegistry", "BaseAttention",
    "FlashAttention", "GatedAttention", "LinearAttention", "LiteAttention", "MultiHeadAttention",
    "RopeScaling", "RotaryEmbedding", "StandardAttention", "SwappableMixin", "swap",
    "TokenSpec", "AttentionPattern", "MixedAttentionConfig", "MixedAttention",
    "EvoformerAttention", "MSARowAttentionWithPairBias", "TriangleAttention",
    "TriangleAttentionStartingNode", "TriangleAttentionEndingNode",
]


def available_backends() -> list[str]:
    """Names of the registered backends usable in this process."""
    return [n for n, b in BACKENDS.items() if b.available() is None]


__all__.append("available_backends")
