"""Choosing a backend for a request, and saying why.

`auto` keeps the backends whose capabilities cover the request, then takes the
one with the highest expected speed (`Backend.speed`, a per-device heuristic
checked against benchmarks/). `reference` is the oracle and is chosen only
when nothing else can serve.

Backends decide from `AttentionRequest.signature` alone (device, dtype, head
dims, features), so the choice is cached per signature: a call pays one dict
lookup, not a walk over every backend's capability table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import backends as _backends
from .backends import Backend, get_backend
from .request import AttentionRequest

__all__ = ["Plan", "plan", "choose", "clear_cache"]

_CHOICE_CACHE: dict[tuple, Backend] = {}


@dataclass(frozen=True)
class Plan:
    """The dispatcher's decision: the chosen backend and why each other one was passed over."""

    backend: str
    request: str
    reason: str
    passed_over: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"attnkit plan for {self.request}", f"  -> {self.backend}: {self.reason}"]
        for name, why in self.passed_over.items():
            lines.append(f"     {name}: {why}")
        return "\n".join(lines)


def clear_cache() -> None:
    """Forget cached choices (called when the backend registry changes)."""
    _CHOICE_CACHE.clear()


def choose(req: AttentionRequest, backend: str = "auto") -> Backend:
    """The backend that will run req; a forced backend that cannot serve req is a ValueError."""
    if torch.compiler.is_compiling():  # traced once per graph; keep the global dict out of guards
        return get_backend(plan(req, backend).backend)
    key = (backend, req.signature)
    hit = _CHOICE_CACHE.get(key)
    if hit is not None:
        return hit
    chosen = get_backend(plan(req, backend).backend)
    _CHOICE_CACHE[key] = chosen
    return chosen


def plan(req: AttentionRequest, backend: str = "auto") -> Plan:
    """The full decision with reasons (uncached; `explain` prints it)."""
    if backend != "auto":
        chosen = get_backend(backend)
        why = chosen.unsupported(req)
        if why is not None:
            raise ValueError(f"backend {backend!r} cannot serve this call: {why} ({req.describe()})")
        return Plan(backend, req.describe(), "forced by backend=", {})

    candidates: list[tuple[float, Backend]] = []
    passed: dict[str, str] = {}
    for b in _backends.BACKENDS.values():
        why = b.unsupported(req)
        if why is None:
            candidates.append((b.speed(req), b))
        else:
            passed[b.name] = "cannot serve: " + why
    if not candidates:
        raise ValueError(f"no backend can serve this call ({req.describe()}): {passed}")
    candidates.sort(key=lambda sb: -sb[0])
    best_speed, best = candidates[0]
    for s, b in candidates[1:]:
        passed[b.name] = f"can serve, expected slower (speed score {s:g} < {best_speed:g})"
    reason = f"fastest capable backend on {req.device.type} (speed score {best_speed:g})"
    ordered = {n: passed[n] for n in _backends.BACKENDS if n in passed}
    return Plan(best.name, req.describe(), reason, ordered)
