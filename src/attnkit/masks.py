"""Masks and mods on index grids, shared by the backends that evaluate them densely.

FlexAttention calls a mod on scalar indices; the pure-PyTorch backends call
the same mod once on broadcast index grids (b [B,1,1,1], h [1,H,1,1],
q_idx [1,1,Lq,1], kv_idx [1,1,1,Lk], all int32). Mods must therefore be
element-wise, which FlexAttention requires too.
"""

from __future__ import annotations

import functools
import numbers
import types

import torch
from torch import Tensor, nn

from ._checks import broadcasts_to
from .groups import SegmentLayout
from .request import AttentionRequest

__all__ = [
    "index_grid",
    "bounds_allow",
    "tile_fully_outside",
    "tile_allowed",
    "apply_score_mod",
    "slice_4d",
    "closure_tensors",
    "closure_scalars",
    "grad_outside_closure",
]


def index_grid(
    batch: int, heads: int, q_start: int, q_end: int, k_start: int, k_end: int, device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Broadcastable int32 (b, h, q_idx, kv_idx) grids over a tile, in global positions."""
    b = torch.arange(batch, device=device, dtype=torch.int32).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device, dtype=torch.int32).view(1, -1, 1, 1)
    i = torch.arange(q_start, q_end, device=device, dtype=torch.int32).view(1, 1, -1, 1)
    j = torch.arange(k_start, k_end, device=device, dtype=torch.int32).view(1, 1, 1, -1)
    return b, h, i, j


def bounds_allow(i, j, offset: int, left: int | None, right: int | None):
    """Causal/window predicate: i + offset - left <= j <= i + offset + right.

    Works on scalars (inside FlexAttention mods) and on broadcast grids.
    """
    keep = None
    if right is not None:
        keep = j <= i + (offset + right)
    if left is not None:
        lo = j >= i + (offset - left)
        keep = lo if keep is None else keep & lo
    return keep


def tile_fully_outside(req: AttentionRequest, q_start: int, q_end: int, k_start: int, k_end: int) -> bool:
    """True when causal/window bounds exclude every (query, key) pair of the tile."""
    bounds = req.key_bounds
    if bounds is None:
        return False
    left, right = bounds
    off = req.offset
    # The first key of the tile lies right of the last query's reach, or the
    # last key lies left of the first query's reach.
    if right is not None and k_start > (q_end - 1) + off + right:
        return True
    if left is not None and k_end - 1 < q_start + off - left:
        return True
    return False


def slice_4d(t: Tensor, q_start: int, q_end: int, k_start: int, k_end: int) -> Tensor:
    """Slice the [.., .., Lq, Lk] dims of a broadcast 4-D tensor, leaving size-1 dims alone."""
    qs = slice(None) if t.shape[2] == 1 else slice(q_start, q_end)
    ks = slice(None) if t.shape[3] == 1 else slice(k_start, k_end)
    return t[:, :, qs, ks]


def tile_allowed(
    req: AttentionRequest, q_start: int, q_end: int, k_start: int, k_end: int
) -> Tensor | None:
    """Bool tile of allowed pairs (broadcastable to [B, Hq, bq, bk]), or None if all are allowed."""
    allowed = None
    if req.mask is not None:
        allowed = slice_4d(req.mask, q_start, q_end, k_start, k_end)
    bounds = req.key_bounds
    if bounds is not None or req.mask_mod is not None:
        b, h, i, j = index_grid(req.batch, req.heads_q, q_start, q_end, k_start, k_end, req.device)
        if bounds is not None:
            keep = bounds_allow(i, j, req.offset, *bounds)
            allowed = keep if allowed is None else allowed & keep
        if req.mask_mod is not None:
            keep = mask_mod_result(req.mask_mod(b, h, i, j), (req.batch, req.heads_q, q_end - q_start, k_end - k_start))
            allowed = keep if allowed is None else allowed & keep
    return allowed


def mask_mod_result(keep, target: tuple[int, int, int, int]) -> Tensor:
    """keep, checked as a mask_mod's result on a [B, Hq, queries, keys] = target tile: a bool tensor that
    broadcasts to it (TypeError / ValueError naming mask_mod)."""
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"mask_mod must return a bool tensor, got {getattr(keep, 'dtype', type(keep).__name__)}")
    _check_mod_shape("mask_mod", keep, target)
    return keep


def _check_mod_shape(name: str, out: Tensor, target: tuple[int, int, int, int]) -> None:
    """A mod's result must broadcast to the [B, Hq, rows, cols] tile it was called on (its index arguments do)."""
    if out.shape != target and not broadcasts_to(out.shape, target):
        raise ValueError(f"{name} must return a tensor broadcastable to the [B, Hq, queries, keys] = {list(target)} "
                         f"of its index arguments, got shape {list(out.shape)}")


def apply_score_mod(req: AttentionRequest, s: Tensor, q_start: int, k_start: int) -> Tensor:
    """Run the user's score_mod on a [B, Hq, bq, bk] tile of scores (global indices)."""
    b, h, i, j = index_grid(
        req.batch, req.heads_q, q_start, q_start + s.shape[2], k_start, k_start + s.shape[3], s.device
    )
    out = req.score_mod(s, b, h, i, j)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        got = f"a {str(out.dtype).replace('torch.', '')} tensor" if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"score_mod must return a floating tensor (the new scores), got {got}")
    if out.shape == s.shape:
        return out
    _check_mod_shape("score_mod", out, tuple(s.shape))
    return out.expand_as(s)


def closure_tensors(fn, *, requires_grad: bool = False) -> list[Tensor]:
    """Tensors a mod closes over: closure cells, default arguments, functools.partial args, module
    parameters and buffers, bound-method owners, the attributes of callable objects and other plain objects,
    lists/tuples/dicts of those (3 levels deep).

    With requires_grad=True only those that require grad (the chunked backend routes their
    gradients); otherwise all of them (FlexAttention's BlockMask cache keys on their versions).
    """
    return _closure(fn, requires_grad)[0]


def _numpy_scalar(obj) -> bool:
    """A numpy scalar (np.int64, np.bool_, ...): hashable, unlike a 0-d ndarray (which is left out)."""
    return type(obj).__module__ == "numpy" and type(obj).__name__ != "ndarray" and getattr(obj, "ndim", None) == 0


def closure_scalars(fn) -> tuple:
    """The ints, floats, strings and bools a mod closes over, found where closure_tensors looks:
    with the tensors' versions, what FlexAttention's BlockMask cache keys a mask_mod's state on."""
    return tuple(_closure(fn, False)[1])


def _closure(fn, requires_grad: bool) -> tuple[list[Tensor], list]:
    found: list[Tensor] = []
    scalars: list = []

    def visit(obj, depth: int) -> None:
        if depth > 3 or obj is None:
            return
        if isinstance(obj, Tensor):
            if (obj.requires_grad or not requires_grad) and not any(obj is t for t in found):
                found.append(obj)
        elif isinstance(obj, SegmentLayout):
            # frozen; a GroupMask's tables (tensors, found beside it) are built from it and say the same.
            # Walking its sets cost ~1.4 ms per call at 1024 sequences, hashing it ~40 us.
            return
        elif isinstance(obj, (str, numbers.Number)) or _numpy_scalar(obj):  # np.int64 is no int
            if depth:
                scalars.append(obj)
        elif isinstance(obj, nn.Module):
            for t in (*obj.parameters(), *obj.buffers()):
                visit(t, depth + 1)
        elif isinstance(obj, functools.partial):
            visit(obj.func, depth + 1)
            for a in list(obj.args) + list(obj.keywords.values()):
                visit(a, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for a in obj:
                visit(a, depth + 1)
        elif isinstance(obj, dict):
            for a in obj.values():
                visit(a, depth + 1)
        elif isinstance(obj, (types.FunctionType, types.MethodType)):
            for cell in getattr(obj, "__closure__", None) or ():
                try:
                    visit(cell.cell_contents, depth + 1)
                except ValueError:  # empty cell
                    pass
            visit(getattr(obj, "__defaults__", None), depth + 1)  # def mod(b, h, i, j, doc=doc)
            visit(getattr(obj, "__kwdefaults__", None), depth + 1)
            visit(getattr(obj, "__self__", None), depth + 1)
        elif not isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType)):
            # a callable object's (or an owner's) state: its attributes count as the object's own level,
            # so that a method reading self.cfg.n is seen (method, self, cfg, n)
            visit(getattr(obj, "__dict__", None), depth)

    visit(fn, 0)
    return found, scalars


def grad_outside_closure(req: AttentionRequest, captured: list[Tensor]) -> bool:
    """True when req.score_mod's output depends on a tensor requiring grad that is not in captured
    (e.g. one read from a module global): a backend that routes the gradients of captured tensors
    only (chunked, flex) would drop its gradient, so requests say so (feature
    'score_mod_grad_elsewhere') and the dispatcher takes a backend that differentiates the mod with
    plain autograd (reference).

    Runs the mod on a [B, Hq, 1, 1] probe and walks its autograd graph, stopping at the captured
    tensors: at their edges (node, output), not at their whole nodes, since a node's other outputs
    (`a, b = x.unbind(0)` with only a captured) may carry a gradient the capture does not route.
    """
    with torch.enable_grad():
        probe = apply_score_mod(req, req.q.new_zeros(req.batch, req.heads_q, 1, 1, dtype=torch.float32), 0, 0)
    if probe.grad_fn is None:
        return False
    stop = {(id(t.grad_fn), t.output_nr) for t in captured if t.grad_fn is not None}
    leaves = {id(t) for t in captured}
    todo, seen = [(probe.grad_fn, probe.output_nr)], set()
    while todo:
        node, out = todo.pop()
        if node is None or id(node) in seen or (id(node), out) in stop:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)  # AccumulateGrad holds its leaf
        if var is not None and id(var) not in leaves:
            return True
        todo.extend(node.next_functions)  # (node, output index) of each input
    return False
