"""The backend registry: every backend the dispatcher may choose, by name."""

from __future__ import annotations

from .base import ALL_FEATURES, Backend, Capabilities
from .chunked import ChunkedBackend
from .flex import FlexBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .triton import TritonBackend

__all__ = [
    "ALL_FEATURES", "Backend", "Capabilities", "BACKENDS", "register_backend", "get_backend",
    "ReferenceBackend", "ChunkedBackend", "SdpaBackend", "FlexBackend", "TritonBackend",
]

BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a backend instance to the registry under backend.name."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be an attnkit Backend instance, got {type(backend).__name__}")
    if not isinstance(backend.name, str) or not backend.name:
        raise ValueError(f"backend.name must be a non-empty string, got {backend.name!r}")
    if backend.name == "auto":
        raise ValueError("backend.name 'auto' is reserved for the dispatcher (backend='auto' picks among the others)")
    if backend.name in BACKENDS and not replace:
        raise ValueError(f"a backend named {backend.name!r} is already registered; pass replace=True")
    BACKENDS[backend.name] = backend
    from ..dispatch import clear_cache  # cached choices may now be stale

    clear_cache()
    return backend


def get_backend(name: str) -> Backend:
    """The registered backend called name; an unknown name lists the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    try:
        return BACKENDS[name]
    except KeyError:
        known = ", ".join(["auto", *BACKENDS])
        raise ValueError(f"unknown backend {name!r}; known backends: {known}") from None


for _b in (SdpaBackend(), FlexBackend(), TritonBackend(), ChunkedBackend(), ReferenceBackend()):
    register_backend(_b)
