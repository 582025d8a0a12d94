"""Choosing a backend for a request, and saying why.

`auto` keeps the backends whose capabilities cover the request, then takes the
one with the highest expected speed (`Backend.speed`, a per-device heuristic
checked against benchmarks/). `reference` is the oracle and is chosen only
when nothing else can serve.

Backends decide from `AttentionRequest.signature` alone (device, dtype, head
dims, features, whether the call is decode-shaped or a wide causal chunk, one
query or more), so the choice is cached per signature: a call pays one dict lookup, not a walk
over every backend's capability table.

Calls against a cache (decode steps) go further: the run a backend prepared for a call
(`Backend.prepare`) is kept under the call's `request.replay_key`, and `attention` replays it
for later calls with that key without building their request.

A backend that fails to BUILD its kernel for a call (one of its `Backend.build_errors`: Inductor
could not compile a FlexAttention variant, a Triton kernel asked for more shared memory than the
GPU has) is not an answer under `auto`: `serve` warns once, passes that backend over for the call's
signature from then on (`plan` says so), and runs the next one. A forced backend's errors are raised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable
import warnings

import torch

from . import backends as _backends
from ._bounded import put
from .backends import Backend, get_backend
from .request import AttentionRequest

__all__ = ["Plan", "plan", "choose", "serve", "clear_cache", "prepare", "prepared"]

_CHOICE_CACHE: dict[tuple, Backend] = {}
_PREPARED: dict[tuple, tuple[Callable, bool]] = {}
_MAX_PREPARED = 256
# (backend name, signature) -> the build error that backend raised for a call with that signature
_BUILD_FAILED: dict[tuple, str] = {}


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
    """Forget cached choices, prepared runs and build failures (called when the backend registry changes)."""
    _CHOICE_CACHE.clear()
    _PREPARED.clear()
    _BUILD_FAILED.clear()


def prepared(key: tuple, backend: str) -> tuple[Callable, bool] | None:
    """(run, on_cpu) kept by `prepare` for a replay key and backend name, or None."""
    if backend.__class__ is not str or torch.compiler.is_compiling():  # traced code: no global dict
        return None
    return _PREPARED.get((backend, key))


def prepare(key: tuple, backend: str, chosen: Backend, req: AttentionRequest) -> None:
    """Keep chosen's prepared run for req (a call that passed the checks) under its replay key."""
    if backend.__class__ is not str or torch.compiler.is_compiling():
        return
    run = chosen.prepare(req)
    if run is not None:
        put(_PREPARED, (backend, key), (run, req.device.type == "cpu"), _MAX_PREPARED)


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


def serve(req: AttentionRequest, backend: str, call: Callable[[Backend], object]) -> tuple[Backend, object]:
    """(chosen, call(chosen)) for the backend that serves req; under `auto`, past those that cannot build it.

    A build error of the chosen backend (`Backend.build_errors`) is remembered for req's signature and
    warned about once; the call then goes to the next backend `plan` ranks. Any other error, a forced
    backend's, and errors inside the caller's torch.compile (raised when the caller's graph is built,
    not here) propagate.
    """
    chosen = choose(req, backend)
    while True:
        try:
            return chosen, call(chosen)
        except chosen.build_errors as e:
            if backend != "auto" or torch.compiler.is_compiling():
                raise
            error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            _BUILD_FAILED[(chosen.name, req.signature)] = error
            _CHOICE_CACHE.pop((backend, req.signature), None)
            failed, chosen = chosen.name, choose(req, backend)
            warnings.warn(
                f"attnkit: backend {failed!r} could not build a kernel for {req.describe()} ({error}); "
                f"calls like it now run on {chosen.name!r} (attnkit.explain shows the plan)",
                RuntimeWarning, stacklevel=3,
            )


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
        if why is None and (b.name, req.signature) in _BUILD_FAILED:
            why = "failed to build a kernel for a call like this one: " + _BUILD_FAILED[(b.name, req.signature)]
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
