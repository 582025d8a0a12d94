"""All-to-all (Ulysses-style) head parallelism: trade sequence shards for head shards.

Each rank holds a sequence shard [B, H, L/P, D] of every head. One all-to-all turns that into
the whole sequence of H/P heads [B, H/P, L, D] (rank r takes heads [r H/P, (r+1) H/P)); the
gathered chunks are put back in global order (zigzag shards are unzipped) and the padding is
cut off, so the local step is ONE plain call of the contract with causal / window / mask_mod
on global positions; then the reverse all-to-all returns the output (and lse) to the sequence
shards. The all-to-alls are autograd Functions (the backward of one is the other), so the
backward is the contract's own backward between two all-to-alls.

GQA: K/V heads go to the rank of their query heads. When Hkv is not a multiple of P, each
K/V head is repeated P / gcd(Hkv, P) times first (Hkv * that = lcm(Hkv, P) divides Hq), so that
every rank receives exactly the K/V heads its query heads read; the repeat's backward sums
the gradients back. Needs Hq % P == 0 (a ValueError on every rank otherwise).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..functional import attention
from ..groups import GroupMask
from ..request import AttentionRequest, build_request
from ._validate import CPSettings
from .ring import global_mask_mod
from .sharding import shard_positions

__all__ = ["all_to_all_forward"]


def _a2a(x: Tensor, group) -> Tensor:
    import torch.distributed as dist

    x = x.contiguous()
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x, group=group)
    return y


def _seq_to_heads(x: Tensor, group, world: int) -> Tensor:
    """[B, H, Ls, D] sequence shard -> [B, H/P, P*Ls, D] (shards in rank order)."""
    B, H, Ls, D = x.shape
    y = _a2a(x.reshape(B, world, H // world, Ls, D).transpose(0, 1), group)  # [P(src rank), B, H/P, Ls, D]
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // world, world * Ls, D)


def _heads_to_seq(x: Tensor, group, world: int) -> Tensor:
    """[B, H/P, P*Ls, D] -> [B, H, Ls, D]: the inverse of _seq_to_heads."""
    B, Hp, L, D = x.shape
    Ls = L // world
    y = _a2a(x.reshape(B, Hp, world, Ls, D).permute(2, 0, 1, 3, 4), group)  # [P(head group), B, H/P, Ls, D]
    return y.transpose(0, 1).reshape(B, world * Hp, Ls, D)


class _AllToAll(torch.autograd.Function):
    """_seq_to_heads (to_heads) or _heads_to_seq; the backward of each is the other."""

    @staticmethod
    def forward(ctx, x, group, world, to_heads: bool):
        ctx.args = (group, world, to_heads)
        return (_seq_to_heads if to_heads else _heads_to_seq)(x, group, world)

    @staticmethod
    def backward(ctx, g):
        group, world, to_heads = ctx.args
        # the inverse exchange, through this Function again, so that it is differentiable in turn
        return _AllToAll.apply(g, group, world, not to_heads), None, None, None


def _global_order(s: CPSettings, device) -> Tensor | None:
    """Gathered index of each real global position 0..seq_len-1, or None when they already coincide."""
    starts = [g for r in range(s.world) for g, _ in shard_positions(r, s.world, s.layout, s.shard_len)]
    c = s.shard_len * s.world // len(starts)
    if starts == sorted(starts) and s.seq_len == s.shard_len * s.world:
        return None
    pos = torch.cat([torch.arange(g, g + c) for g in starts])  # global position of each gathered index
    return torch.argsort(pos)[: s.seq_len].to(device)


def _local_kwargs(s: CPSettings, Hq: int) -> dict:
    """The local call's rules: the same kind of mask_mod on every rank (a rank whose call differed
    could be refused by a backend that takes the others')."""
    mask_mod = s.mask_mod
    if mask_mod is not None and not isinstance(mask_mod, GroupMask):
        # The user's mask_mod sees global head indices (positions are global already); a GroupMask
        # reads no head and stays itself (backends run it as a token-group layout).
        mask_mod = global_mask_mod((0,), (0,), 0, s.seq_len, None, mask_mod, head_offset=s.rank * (Hq // s.world))
    return dict(causal=s.causal, window=s.window, scale=s.scale, softcap=s.softcap, mask_mod=mask_mod)


def _kv_heads(Hkv: int, P: int) -> int:
    """K/V heads before the exchange: repeated up to a multiple of P when P does not divide them."""
    return Hkv if Hkv % P == 0 else Hkv * (P // math.gcd(Hkv, P))


def local_requests(s: CPSettings, q: Tensor, k: Tensor, v: Tensor, return_lse: bool) -> list[AttentionRequest]:
    """The request of this rank's local call (its heads, the whole sequence), on stand-ins of the
    exchanged shapes, for `check_call` to try against a forced backend before any exchange."""
    P, grads = s.world, torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    Hkv = _kv_heads(k.shape[1], P)

    def stand_in(t: Tensor, heads: int) -> Tensor:
        return t.new_empty((), requires_grad=grads).expand(t.shape[0], heads // P, s.seq_len, t.shape[3])

    return [build_request(stand_in(q, q.shape[1]), stand_in(k, Hkv), stand_in(v, Hkv), return_lse=return_lse,
                          **_local_kwargs(s, q.shape[1]))]


def all_to_all_forward(s: CPSettings, q: Tensor, k: Tensor, v: Tensor, return_lse: bool):
    """(out, lse or None) of all-to-all attention over this rank's shards; differentiable."""
    P, group = s.world, s.group
    Hq, Hkv = q.shape[1], k.shape[1]
    if _kv_heads(Hkv, P) != Hkv:
        rep = _kv_heads(Hkv, P) // Hkv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    qh, kh, vh = (_AllToAll.apply(t, group, P, True) for t in (q, k, v))
    order = _global_order(s, q.device)
    if order is not None:
        qh, kh, vh = (t.index_select(2, order) for t in (qh, kh, vh))
    res = attention(qh, kh, vh, return_lse=return_lse, backend=s.backend, **_local_kwargs(s, Hq))
    out, lse = res if return_lse else (res, None)
    if order is not None:
        full = (q.shape[0], Hq // P, P * s.shard_len)
        out = out.new_zeros(*full, out.shape[-1]).index_copy(2, order, out)
        if lse is not None:
            lse = lse.new_full(full, float("-inf")).index_copy(2, order, lse)
    out = _AllToAll.apply(out, group, P, False)
    if lse is not None:
        lse = _AllToAll.apply(lse.unsqueeze(-1), group, P, False).squeeze(-1)
    return out, lse
