"""Argument checks shared by the contract, the modules and the caches (one message style)."""

from __future__ import annotations

import torch


def describe(value) -> str:
    """A value as error messages show it: a tensor's dtype, shape and device, else its type and repr."""
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)} on {value.device}"
    return f"{type_name(value)} {value!r:.60}"


def type_name(value) -> str:
    """value's type as messages name it: `int`, but `numpy.bool` (whose bare name would read as `bool`)."""
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def tensor(name: str, value) -> torch.Tensor:
    """value if it is a tensor, else TypeError naming the argument (shapes stay with the caller)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {describe(value)}")
    return value


def flag(name: str, value) -> bool:
    """value if it is a bool, else TypeError naming the argument (a string "false" would be truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {describe(value)}")
    return value


def integer(name: str, value) -> int:
    """value if it is an int (not a bool), else TypeError naming the argument; ranges stay with the caller."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {describe(value)}")
    return value


def positive_int(name: str, value) -> int:
    """value as an int >= 1, else ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def real(name: str, value) -> float:
    """value as a float (an int or float, not a bool), else TypeError naming the argument; range
    checks stay with the caller."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type_name(value)} {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int past float's range
        raise ValueError(f"{name} must be a finite number, got an int of {len(str(abs(value)))} digits") from None


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


def broadcasts_to(shape, target: tuple[int, ...]) -> bool:
    """Whether a tensor of `shape` broadcasts to exactly `target` (no more dims, no dim growing it)."""
    try:
        return len(shape) <= len(target) and torch.broadcast_shapes(shape, target) == tuple(target)
    except RuntimeError:
        return False


def key_padding_mask(name: str, mask, batch: int, length: int):
    """A key padding mask as bool [batch, length] (a view where possible): [B, L], or any shape
    that broadcasts to [B, 1, 1, L]; True = real key. TypeError / ValueError naming the argument."""
    import torch

    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = real key), got {describe(mask)}")
    if mask.dim() == 2 and mask.shape[0] in (1, batch) and mask.shape[1] == length:  # [B, L]
        return mask.expand(batch, length)
    target = (batch, 1, 1, length)
    if not broadcasts_to(mask.shape, target):
        raise ValueError(f"{name} must be a key padding mask [B, L] = [{batch}, {length}] or broadcastable to "
                         f"[B, 1, 1, L] = {list(target)}, got shape {list(mask.shape)}")
    return mask.expand(target).reshape(batch, length)
