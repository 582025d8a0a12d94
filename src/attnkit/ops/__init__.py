"""Kernels that are not softmax attention (and so not backends of the contract)."""

from .linear_attention import FEATURE_MAPS, feature_map, linear_attention

__all__ = ["FEATURE_MAPS", "feature_map", "linear_attention"]
