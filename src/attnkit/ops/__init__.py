"""Kernels: our fused softmax attention (served by the `triton` backend) and linear attention."""

from .linear_attention import FEATURE_MAPS, feature_map, linear_attention

__all__ = ["FEATURE_MAPS", "feature_map", "linear_attention"]
