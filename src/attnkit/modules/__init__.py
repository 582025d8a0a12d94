"""Modules built on the contract: split-head attention kinds, the registry, MultiHeadAttention, RoPE."""

from .attention import FlashAttention, GatedAttention, LinearAttention, LiteAttention, StandardAttention
from .base import ATTENTION_REGISTRY, AttentionRegistry, BaseAttention, SwappableMixin, swap
from .mha import AttentionConfig, MultiHeadAttention
from .mixed import AttentionPattern, MixedAttention, MixedAttentionConfig, TokenSpec
from .rope import RopeScaling, RotaryEmbedding

__all__ = [
    "BaseAttention", "AttentionRegistry", "ATTENTION_REGISTRY", "swap", "SwappableMixin",
    "StandardAttention", "FlashAttention", "GatedAttention", "LinearAttention", "LiteAttention",
    "AttentionConfig", "MultiHeadAttention", "RopeScaling", "RotaryEmbedding",
    "TokenSpec", "AttentionPattern", "MixedAttentionConfig", "MixedAttention",
]
