"""Checks that fail on every rank together, before any communication that could hang.

A rank that raised on its own while the others went on into a send or a collective would
leave them blocked. So each rank checks its own arguments, catches the error, and joins
ONE small all_gather of (the error text, the arguments every rank must agree on); then all
ranks raise: the rank at fault its own error, the others a ValueError naming it. Arguments
that differ between ranks (a shard length, a flag) raise a ValueError listing each rank's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from .._checks import backend_name
from ..backends import get_backend
from ..request import AttentionRequest, MaskMod, build_request
from .sharding import check_layout

__all__ = ["resolve_group", "agree", "CPSettings", "check_call"]

_FIELD_BYTES = 96
_MSG_BYTES = 1024


def resolve_group(group, fn: str):
    """(group, this rank in it, its size); a ValueError when torch.distributed is not initialised."""
    import torch.distributed as dist

    if not dist.is_available():
        raise ValueError(f"{fn}: group={group!r} needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise ValueError(
            f"{fn}: group={group!r} but torch.distributed is not initialised; call "
            f"torch.distributed.init_process_group(...) on every rank first"
        )
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{fn}: group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{fn}: this process (global rank {dist.get_rank()}) is not a member of group={group!r}")
    return group, rank, dist.get_world_size(group)


def _encode(text: str, n: int) -> list[int]:
    b = text.encode("utf-8", "replace")[:n]
    return list(b) + [0] * (n - len(b))


def _decode(row: list[int]) -> str:
    return bytes(x for x in row if x).decode("utf-8", "replace")


def _gather_device(group, q) -> torch.device:
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        if isinstance(q, Tensor) and q.device.type == "cuda":
            return q.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(fn: str, group, world: int, q, fields: dict[str, object], error: BaseException | None) -> None:
    """All-gather (error, fields) once; raise the same way on every rank if any rank erred or fields differ."""
    import torch.distributed as dist

    msg = "" if error is None else f"{type(error).__name__}: {error}"
    row = _encode(msg, _MSG_BYTES)
    for value in fields.values():
        row += _encode(str(value), _FIELD_BYTES)
    mine = torch.tensor(row, dtype=torch.uint8, device=_gather_device(group, q))
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    rows = [r.cpu().tolist() for r in rows]
    bad = [(r, _decode(row[:_MSG_BYTES])) for r, row in enumerate(rows) if any(row[:_MSG_BYTES])]
    if bad:
        if error is not None:
            raise error
        who = ", ".join(f"rank {r} ({m})" for r, m in bad)
        raise ValueError(f"{fn}: stopped on every rank because {who} rejected its input")
    for i, name in enumerate(fields):
        lo = _MSG_BYTES + i * _FIELD_BYTES
        seen = [_decode(row[lo:lo + _FIELD_BYTES]) for row in rows]
        if len(set(seen)) > 1:
            shown = ", ".join(f"rank {r}: {s}" for r, s in enumerate(seen))
            hint = ""
            if "shape" in name:
                hint = (" (every rank holds an equal shard of one sequence: pad it with "
                        "attnkit.distributed.shard_sequence and pass the true length as seq_len=)")
            raise ValueError(f"{fn}: every rank must pass the same {name}, got {shown}{hint}")


@dataclass(frozen=True)
class CPSettings:
    """A checked context-parallel call: what both strategies need."""

    group: object
    rank: int
    world: int
    shard_len: int
    seq_len: int
    layout: str
    causal: bool
    window: tuple[int | None, int | None] | None  # normalised (left, right), as in AttentionRequest
    scale: float
    softcap: float | None
    mask_mod: MaskMod | None
    backend: str
    # Causal and window folded into (left, right) key offsets around the query (global positions;
    # AttentionRequest.key_bounds of the same flags), None when neither is set.
    bounds: tuple[int | None, int | None] | None


def check_call(fn: str, q, k, v, *, group, causal, window, scale, softcap, mask_mod, return_lse, layout,
               seq_len, backend, heads_per_rank: bool,
               local_requests: Callable[[CPSettings], Iterable[AttentionRequest]] | None = None) -> CPSettings:
    """Check a context-parallel call on every rank together (see the module docstring).

    local_requests(settings): the requests of this rank's local calls. A forced backend must serve each
    of them: a rank whose calls differ from the others' (padding only, a masked pair) would otherwise
    raise in the middle of the exchanges while its neighbours wait for it.
    """
    group, rank, world = resolve_group(group, fn)
    error: BaseException | None = None
    s = None
    try:
        padded = world * q.shape[2] if isinstance(q, Tensor) and q.dim() == 4 else None
        req = build_request(q, k, v, causal=causal, window=window, scale=scale, softcap=softcap,
                            mask_mod=mask_mod, return_lse=return_lse, global_len=padded)
        check_layout(layout)
        backend_name(backend)
        Ls = q.shape[2]
        if k.shape[2] != Ls:
            raise ValueError(
                f"q and k/v must be shards of one sequence of the same length (dim 2), got q {list(q.shape)}, "
                f"k {list(k.shape)}"
            )
        if layout == "zigzag" and Ls % 2:
            raise ValueError(
                f"a zigzag shard holds two equal chunks, so its length (dim 2 of q) must be even, got {Ls}"
            )
        total = world * Ls
        if seq_len is None:
            seq_len = total
        elif isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= total:
            raise ValueError(
                f"seq_len must be an int in [1, {total}] ({world} ranks x shards of {Ls}), got {seq_len!r}"
            )
        if heads_per_rank and req.heads_q % world:
            raise ValueError(
                f"all-to-all attention gives each rank Hq / world_size query heads, so the heads of q "
                f"(Hq = {req.heads_q}, q {list(q.shape)}) must be divisible by the world size {world}; "
                f"use strategy='ring' for this head count"
            )
        s = CPSettings(
            group=group, rank=rank, world=world, shard_len=Ls, seq_len=seq_len, layout=layout, causal=causal,
            window=req.window, scale=req.scale, softcap=req.softcap, mask_mod=mask_mod, backend=backend,
            bounds=req.key_bounds,
        )
        if backend != "auto" and local_requests is not None:
            chosen = get_backend(backend)
            for local in local_requests(s):
                why = chosen.unsupported(local)
                if why is not None:
                    raise ValueError(f"backend {backend!r} cannot serve this rank's local call: {why} "
                                     f"({local.describe()}); pass backend='auto'")
    except (ValueError, TypeError) as exc:
        error = exc
    fields = {
        "q shape": _shape(q), "k shape": _shape(k), "v shape": _shape(v),
        "dtype": getattr(q, "dtype", None), "causal": causal, "window": window,
        "scale": scale, "softcap": softcap, "mask_mod (None or not)": mask_mod is None,
        "return_lse": return_lse, "layout": layout, "seq_len": seq_len,
    }
    agree(fn, group, world, q, fields, error)
    return s


def _shape(t) -> object:
    return list(t.shape) if isinstance(t, Tensor) else type(t).__name__

