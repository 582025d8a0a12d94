"""Token-group layouts: which query runs attend to which key segments.

A :class:`SegmentLayout` is the structure; a :class:`GroupMask` is that
structure as a FlexAttention-style ``mask_mod`` (callable on indices, so every
backend that takes a mask_mod serves it), which also carries the structure so
that the ``triton`` backend can launch once and visit only the allowed tiles
(the contract's ``group_mask`` feature). MixedAttention builds one per layout.
"""

from __future__ import annotations

import functools

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SegmentLayout", "dense_layout", "GroupMask"]


@dataclass(frozen=True)
class SegmentLayout:
    """Which query runs attend to which key segments. All ranges are [start, end) token indices.

    sets: ((query runs, key segments), ...); each a tuple of (start, end) pairs. A query
    token may lie in at most one set's runs; key segments of one set must not overlap.
    """

    len_q: int
    len_k: int
    sets: tuple

    def __post_init__(self) -> None:
        for name in ("len_q", "len_k"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"SegmentLayout {name} must be an int >= 0, got {val!r}")
        object.__setattr__(self, "sets", _as_sets(self.sets))  # nested tuples of ints: hashable, cached by value
        seen = []
        for si, (qruns, ksegs) in enumerate(self.sets):
            for s, e in qruns:
                if not 0 <= s <= e <= self.len_q:
                    raise ValueError(f"set {si}: query run ({s}, {e}) outside [0, {self.len_q}]")
                if e > s:  # an empty run (a group of size 0) holds no token
                    seen.append((s, e, si))
            for s, e in ksegs:
                if not 0 <= s <= e <= self.len_k:
                    raise ValueError(f"set {si}: key segment ({s}, {e}) outside [0, {self.len_k}]")
            ks = sorted(k for k in ksegs if k[1] > k[0])
            if any(a[1] > b[0] for a, b in zip(ks, ks[1:])):
                raise ValueError(f"set {si}: key segments {ks} overlap")
        seen.sort()
        for a, b in zip(seen, seen[1:]):
            if a[1] > b[0]:
                raise ValueError(f"query runs ({a[0]}, {a[1]}) of set {a[2]} and ({b[0]}, {b[1]}) of set {b[2]} "
                                 "overlap; a query token belongs to one set")

    def q_blocks(self, block_m: int) -> list[tuple[int, int, int]]:
        """(start, end, set) per query block; uncovered query tokens get set -1 (no keys)."""
        runs = sorted((s, e, si) for si, (qr, _) in enumerate(self.sets) for s, e in qr if e > s)
        full, pos = [], 0
        for s, e, si in runs:
            if s > pos:
                full.append((pos, s, -1))
            full.append((s, e, si))
            pos = e
        if pos < self.len_q:
            full.append((pos, self.len_q, -1))
        return [(b, min(b + block_m, e), si) for s, e, si in full for b in range(s, e, block_m)]

    def key_classes(self) -> list[tuple[int, int, tuple[int, ...]]]:
        """[0, len_k) cut where set membership changes: (start, end, the sets whose segments hold it)."""
        cuts = sorted({0, self.len_k, *(x for _, ksegs in self.sets for seg in ksegs for x in seg)})
        return [(a, b, tuple(si for si, (_, ksegs) in enumerate(self.sets) if any(s <= a and b <= e for s, e in ksegs)))
                for a, b in zip(cuts, cuts[1:])]

    def k_blocks(self, block_n: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """(start, end, sets that read it) per key block: the key classes cut at the block size."""
        return [(x, min(x + block_n, b), users) for a, b, users in self.key_classes() for x in range(a, b, block_n)]


def _as_sets(sets) -> tuple:
    """((query runs, key segments), ...) as nested tuples of int pairs, or a TypeError saying what was seen."""
    def pairs(x, what, si):
        try:
            out = tuple((a, b) for a, b in x)
        except (TypeError, ValueError):
            raise TypeError(f"set {si}: {what} must be (start, end) int pairs, got {x!r}") from None
        if not all(isinstance(a, int) and not isinstance(a, bool) for p in out for a in p):
            raise TypeError(f"set {si}: {what} must be (start, end) int pairs, got {x!r}")
        return out

    try:
        items = list(sets)
    except TypeError:
        raise TypeError(f"sets must be a sequence of (query runs, key segments) pairs, got {sets!r}") from None
    out = []
    for si, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"set {si} must be a (query runs, key segments) pair, got {item!r}")
        out.append((pairs(item[0], "query runs", si), pairs(item[1], "key segments", si)))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def dense_layout(len_q: int, len_k: int) -> SegmentLayout:
    # cached: a kernel call's own overhead (validating a layout costs ~50 us of Python)
    return SegmentLayout(len_q, len_k, ((((0, len_q),), ((0, len_k),)),))


class GroupMask:
    """mask_mod(b, h, q_idx, kv_idx) -> bool: True iff q_idx lies in a query run of some set
    and kv_idx in one of that set's key segments. Element-wise on index tensors of any shape
    (scalars under FlexAttention, broadcast grids elsewhere); its lookup tables live on `device`.
    """

    def __init__(self, layout: SegmentLayout, device: torch.device | str = "cpu") -> None:
        if not isinstance(layout, SegmentLayout):
            raise TypeError(f"layout must be a SegmentLayout, got {type(layout).__name__}")
        self.layout = layout
        nsets = len(layout.sets)
        classes = layout.key_classes()
        qset = torch.full((layout.len_q,), nsets, dtype=torch.int32)  # row `nsets`: attends nothing
        kcls = torch.zeros(layout.len_k, dtype=torch.int32)
        allowed = torch.zeros(nsets + 1, max(len(classes), 1), dtype=torch.bool)
        for ci, (a, b, users) in enumerate(classes):
            kcls[a:b] = ci
            allowed[list(users), ci] = True
        for si, (qruns, _) in enumerate(layout.sets):
            for s, e in qruns:
                qset[s:e] = si
        self.qset, self.kcls, self.allowed = qset.to(device), kcls.to(device), allowed.to(device)

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.allowed[self.qset[q_idx], self.kcls[kv_idx]]

    def __repr__(self) -> str:
        return f"GroupMask(len_q={self.layout.len_q}, len_k={self.layout.len_k}, sets={len(self.layout.sets)})"
