"""The module caches' one way to stay bounded while several threads share them.

Plans, compiled kernels, dispatch choices and masks are kept in plain (insertion-ordered) dicts. Reads
are one `cache.get(key)`, atomic under the GIL. Writes go through `put`, which drops the oldest entries
past a cap under one lock, so that two threads never drop the same entry, nor walk a dict that another
one resizes; `touch` moves a hit to the back (least recently used first out).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Hashable, TypeVar

__all__ = ["put", "touch"]

V = TypeVar("V")
_LOCK = threading.RLock()  # (reentrant: hashing a key or dropping an entry runs arbitrary Python)
_MISSING = object()


def put(cache: dict, key: Hashable, value: V, cap: int, *, weight: Callable[[Any], int] | None = None,
        budget: int = 0) -> V:
    """cache[key] = value, first dropping the oldest entries so that at most `cap` remain; returns value.

    With `weight` (an entry's bytes, say), the oldest entries but the newest are then dropped while the
    entries' weights add up to more than `budget`.
    """
    with _LOCK:
        if key not in cache:
            while len(cache) >= cap:
                _drop_oldest(cache)
        cache[key] = value
        while weight is not None and len(cache) > 1 and sum(weight(v) for v in cache.values()) > budget:
            _drop_oldest(cache)
    return value


def _drop_oldest(cache: dict) -> None:
    try:
        del cache[next(iter(cache))]
    except (KeyError, RuntimeError):  # an unlocked pop / clear elsewhere took it meanwhile
        pass


def touch(cache: dict, key: Hashable) -> Any:
    """Move cache[key] (if there) to the back, the last to be dropped; returns it, or None."""
    with _LOCK:
        value = cache.pop(key, _MISSING)
        if value is _MISSING:
            return None
        cache[key] = value
        return value
