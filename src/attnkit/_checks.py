"""Argument checks shared by the contract, the modules and the caches (one message style)."""

from __future__ import annotations


def describe(value) -> str:
    """A value as error messages show it: a tensor's dtype, shape and device, else its type and repr."""
    if hasattr(value, "dtype") and hasattr(value, "shape") and hasattr(value, "device"):
        return f"{str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r:.60}"


def positive_int(name: str, value) -> int:
    """value as an int >= 1, else ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def real(name: str, value) -> float:
    """value as a float (an int or float, not a bool), else TypeError naming the argument; range
    checks stay with the caller."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def probability(name: str, value) -> float:
    """value as a float in [0, 1), else ValueError naming the argument (dropout rates)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)


def backend_name(name) -> str:
    """A backend name known now ("auto" or registered), so a typo fails at construction."""
    if name != "auto":
        from .backends import get_backend  # ValueError listing the known names

        get_backend(name)
    return name
