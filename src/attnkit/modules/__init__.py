"""Modules built on the contract: split-head attention kinds, the registry, MultiHeadAttention, RoPE,
mixed token-group attention, and the Evoformer (protein) attention modules."""

from .attention import FlashAttention, GatedAttention, LinearAttention, LiteAttention, StandardAttention
from .base import ATTENTION_REGISTRY, AttentionRegistry, BaseAttention, SwappableMixin, swap
from .evoformer import (
    EvoformerAttention, MSARowAttentionWithPairBias, TriangleAttention, TriangleAttentionEndingNode,
    TriangleAttentionStartingNode,
)
from .mha import AttentionConfig, MultiHeadAttention
from .mixed import AttentionPattern, MixedAttention, MixedAttentionConfig, TokenSpec
from .rope import RopeScaling, RotaryEmbedding

__all__ = [
    "BaseAttention", "AttentionRegistry", "ATTENTION_REGISTRY", "swap", "SwappableMixin",
    "StandardAttention", "FlashAttention", "GatedAttention", "LinearAttention", "LiteAttention",
    "AttentionConfig", "MultiHeadAttention", "RopeScaling", "RotaryEmbedding",
    "TokenSpec", "AttentionPattern", "MixedAttentionConfig", "MixedAttention",
    "EvoformerAttention", "MSARowAttentionWithPairBias", "TriangleAttention",
    "TriangleAttentionStartingNode", "TriangleAttentionEndingNode",
]
