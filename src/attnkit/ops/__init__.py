"""Kernels: our fused softmax attention (served by the `triton` backend) and linear attention."""

from .linear import FEATURE_MAPS, feature_map, linear_attention  # module `linear`: the name is the function

__all__ = ["FEATURE_MAPS", "feature_map", "linear_attention"]
