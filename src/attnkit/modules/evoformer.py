"""Protein-model attention (AlphaFold2 / OpenFold Evoformer): gated multi-head attention with an
additive pair bias, MSA row attention with pair bias, and triangle attention.

Layouts and parameter names follow OpenFold (`openfold/model/primitives.py` `Attention`,
`msa.py` `MSARowAttentionWithPairBias`, `triangular_attention.py`), so an OpenFold state dict
loads with `load_state_dict(strict=True)`. Every attention product goes through the contract
`attnkit.attention`; the bias is handed over broadcast (never one copy per MSA row) and gets its
gradient from the contract's reduction over the broadcast dims.

Masks differ from OpenFold in one place: OpenFold adds -1e9 to masked logits, so a query whose
keys are all masked averages every value uniformly; here masks are bool (True = attend) and such
a query's attention is 0 (the contract's empty-row rule), so the module returns linear_o's bias
for it. Rows with at least one kept key agree with OpenFold.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .._checks import backend_name, positive_int
from ..functional import attention

__all__ = [
    "EvoformerAttention",
    "MSARowAttentionWithPairBias",
    "TriangleAttention",
    "TriangleAttentionStartingNode",
    "TriangleAttentionEndingNode",
]


# ---------------------------------------------------------------------------
# argument checks and broadcast bookkeeping
# ---------------------------------------------------------------------------


def _check_chunk_size(chunk_size) -> int | None:
    """None, or an int >= 1 (TypeError / ValueError naming chunk_size)."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be None or an int >= 1, got {type(chunk_size).__name__} {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size}")
    return chunk_size


def _check_backend(backend) -> str | None:
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"backend must be None or a backend name (str), got {type(backend).__name__}")
    return backend_name(backend)


def _as_bool_mask(name: str, mask: Tensor) -> Tensor:
    """bool masks as they are; 0/1 numbers (OpenFold's float masks, 1 = keep) become mask > 0.5."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool, or 0/1 float with 1 = keep), got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or 0/1 real numbers, got dtype {mask.dtype}")
    return mask > 0.5


def _check_broadcast(name: str, shape: Sequence[int], target: Sequence[int], form: str) -> None:
    """shape has target's rank and each dim is 1 or target's (ValueError naming name otherwise)."""
    if len(shape) != len(target) or any(s != 1 and s != t for s, t in zip(shape, target)):
        raise ValueError(f"{name} must be {form}, broadcastable to {list(target)}, got shape {list(shape)}")


def _compact(t: Tensor) -> Tensor:
    """t with every stride-0 (expanded) dim narrowed to size 1: the same values, broadcast by the
    contract instead of being copied by a later reshape."""
    for d in range(t.dim()):
        if t.shape[d] > 1 and t.stride(d) == 0:
            t = t.narrow(d, 0, 1)
    return t


def _split_point(lead: Sequence[int], leads: list[Sequence[int]]) -> int:
    """Smallest k such that, for every tensor's leading sizes, the dims lead[k:] are either all
    broadcast (1) or all full: those dims then flatten into the contract's batch by a view (size 1
    or prod(lead[k:])), and the dims lead[:k] are looped over."""
    n = len(lead)
    for k in range(n + 1):
        if all(
            all(tl[i] == 1 for i in range(k, n)) or all(tl[i] == lead[i] for i in range(k, n))
            for tl in leads
        ):
            return k
    return n  # unreachable: k = n always qualifies


def _per_outer(t: Tensor | None, outer_idx: tuple[int, ...]) -> Tensor | None:
    """t [*lead_t, h, lq, lk] at one outer index (broadcast outer dims read at 0), with the inner
    leading dims merged into one rows dim: [rows or 1, h, lq, lk]."""
    if t is None:
        return None
    idx = tuple(i if t.shape[j] != 1 else 0 for j, i in enumerate(outer_idx))
    t = t[idx] if idx else t
    rows = math.prod(t.shape[: t.dim() - 3])
    return t.reshape(rows, *t.shape[-3:])  # a view, or a copy of real (compacted) data only


def _unravel(i: int, shape: Sequence[int]) -> tuple[int, ...]:
    """The multi-index of flat index i in a row-major shape."""
    idx = []
    for size in reversed(shape):
        i, r = divmod(i, size)
        idx.append(r)
    return tuple(reversed(idx))


def _rows(t: Tensor | None, start: int, end: int) -> Tensor | None:
    if t is None or t.shape[0] == 1:
        return t
    return t[start:end]


# ---------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------


class EvoformerAttention(nn.Module):
    """OpenFold's gated multi-head attention (`primitives.Attention`) on the attnkit contract.

    q = linear_q(q_x), k = linear_k(kv_x), v = linear_v(kv_x), each split into num_heads heads of
    c_hidden channels; o = softmax(q k^T / sqrt(c_hidden) + bias, masked) v; with gating,
    o = o * sigmoid(linear_g(q_x)); out = linear_o(o).

    The gate is computed from the module's INPUT q_x ([*, Lq, c_q] -> num_heads * c_hidden), as in
    AlphaFold2; `GatedAttention` (the split-head kind) gates from the already projected
    per-head query instead, with a [head_dim, head_dim] weight.

    Parameters (OpenFold names): linear_q, linear_k, linear_v [c -> num_heads * c_hidden, no bias],
    linear_g [c_q -> num_heads * c_hidden, with bias; weight 0 and bias 1 at init] (None when
    gating=False), linear_o [num_heads * c_hidden -> c_q, weight and bias 0 at init: OpenFold's
    "final" init, so a fresh residual update is 0]. linear_q/k/v start Glorot-uniform.

    Args:
        c_q, c_k, c_v: channels of q_x and kv_x (keys and values are both projected from kv_x, so
            c_v must equal c_k).
        c_hidden: channels per head (the logit scale is 1 / sqrt(c_hidden)).
        num_heads: heads (OpenFold's `no_heads`, also readable under that name).
        gating: the sigmoid output gate.
        backend: attnkit backend name for every contract call; None = "auto".

    forward(q_x [*, Lq, c_q], kv_x [*, Lk, c_k], mask=None, bias=None, chunk_size=None) -> [*, Lq, c_q]
        mask: bool, True = attend; either a key mask [*, Lk] or a tensor with the rank of
            [*, H, Lq, Lk] broadcastable to it. A query with no key to attend gets attention 0
            (its output is linear_o's bias); OpenFold's -1e9 would average all values instead.
        bias: additive float logits broadcastable to [*, H, Lq, Lk] (fewer leading dims broadcast
            as in torch); gets its gradient, summed over the dims it was broadcast over.
        chunk_size: at most this many of the flattened batch rows per contract call (OpenFold's
            inference memory bound); results equal the unchunked call up to float rounding.
            None = as few calls as possible.

    The leading dims * flatten into the contract's batch. A bias or mask broadcast over them stays
    broadcast (it reaches the contract with size 1 on the batch dim, never expanded and copied).
    When one of them is broadcast over some leading dims but not over others (the MSA pair bias
    [batch, 1, H, L, L] with batch > 1), the module loops over the outer leading dims (one
    contract call per batch element, or per chunk of one) so that the inner ones stay broadcast.
    """

    def __init__(self, c_q: int, c_k: int, c_v: int, c_hidden: int, num_heads: int, gating: bool = True,
                 backend: str | None = None):
        super().__init__()
        for name, value in (("c_q", c_q), ("c_k", c_k), ("c_v", c_v), ("c_hidden", c_hidden),
                            ("num_heads", num_heads)):
            positive_int(name, value)
        if c_v != c_k:
            raise ValueError(f"c_v ({c_v}) must equal c_k ({c_k}): keys and values are both projected from kv_x")
        if not isinstance(gating, bool):
            raise TypeError(f"gating must be a bool, got {type(gating).__name__}")
        self.c_q, self.c_k, self.c_v, self.c_hidden = c_q, c_k, c_v, c_hidden
        self.num_heads = num_heads
        self.gating = gating
        self.backend = _check_backend(backend)
        hc = num_heads * c_hidden
        self.linear_q = nn.Linear(c_q, hc, bias=False)
        self.linear_k = nn.Linear(c_k, hc, bias=False)
        self.linear_v = nn.Linear(c_v, hc, bias=False)
        self.linear_o = nn.Linear(hc, c_q)
        for lin in (self.linear_q, self.linear_k, self.linear_v):
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(self.linear_o.weight)
        nn.init.zeros_(self.linear_o.bias)
        if gating:
            self.linear_g = nn.Linear(c_q, hc)
            nn.init.zeros_(self.linear_g.weight)
            nn.init.ones_(self.linear_g.bias)
        else:
            self.register_module("linear_g", None)

    @property
    def no_heads(self) -> int:
        """OpenFold's name for num_heads."""
        return self.num_heads

    def extra_repr(self) -> str:
        return (f"c_q={self.c_q}, c_k={self.c_k}, c_hidden={self.c_hidden}, num_heads={self.num_heads}, "
                f"gating={self.gating}, backend={self.backend or 'auto'!r}")

    # --- input checks ---------------------------------------------------------

    def _check_inputs(self, q_x: Tensor, kv_x: Tensor) -> tuple[tuple[int, ...], int, int]:
        for name, t, c, cname in (("q_x", q_x, self.c_q, "c_q"), ("kv_x", kv_x, self.c_k, "c_k")):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() < 2 or t.shape[-1] != c:
                raise ValueError(f"{name} must be [*, L, {cname}={c}], got shape {list(t.shape)}")
        if q_x.shape[:-2] != kv_x.shape[:-2]:
            raise ValueError(
                f"q_x and kv_x must share their leading dims *: q_x {list(q_x.shape)} ([*, Lq, c_q]), "
                f"kv_x {list(kv_x.shape)} ([*, Lk, c_k])"
            )
        return tuple(q_x.shape[:-2]), q_x.shape[-2], kv_x.shape[-2]

    def _check_mask(self, mask, lead: tuple[int, ...], target: tuple[int, ...]) -> Tensor | None:
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            what = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor (True = attend), got {what}")
        n, Lk = len(lead), target[-1]
        if mask.dim() == n + 1:  # a key mask [*, Lk]
            _check_broadcast("mask", mask.shape, (*lead, Lk), "a key mask [*, Lk] or [*, H, Lq, Lk]")
            return mask[..., None, None, :]
        _check_broadcast("mask", mask.shape, target, "a key mask [*, Lk] or [*, H, Lq, Lk]")
        return mask

    def _check_bias(self, bias, target: tuple[int, ...]) -> Tensor | None:
        if bias is None:
            return None
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            what = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
            raise TypeError(f"bias must be a floating tensor (additive logits), got {what}")
        if bias.dim() > len(target):
            raise ValueError(f"bias must broadcast to [*, H, Lq, Lk] = {list(target)}, got shape {list(bias.shape)}")
        bias = bias.reshape((1,) * (len(target) - bias.dim()) + tuple(bias.shape))
        _check_broadcast("bias", bias.shape, target, "[*, H, Lq, Lk]")
        return bias

    # --- forward ---------------------------------------------------------------

    def forward(self, q_x: Tensor, kv_x: Tensor, mask: Tensor | None = None, bias: Tensor | None = None,
                chunk_size: int | None = None) -> Tensor:
        lead, Lq, Lk = self._check_inputs(q_x, kv_x)
        chunk = _check_chunk_size(chunk_size)
        H, C = self.num_heads, self.c_hidden
        target = (*lead, H, Lq, Lk)
        # An expanded (stride-0) dim goes back to size 1, so that no reshape below copies it. Not for a
        # bias whose own .grad is read (a leaf, or retain_grad): narrowing would put its gradient in slot 0.
        own_grad = isinstance(bias, Tensor) and bias.requires_grad and (bias.is_leaf or bias.retains_grad)
        mask = self._check_mask(mask, lead, target)
        bias = self._check_bias(bias, target)
        mask = _compact(mask) if mask is not None else None
        bias = _compact(bias) if bias is not None and not own_grad else bias

        n = len(lead)
        k = _split_point(lead, [t.shape[:n] for t in (mask, bias) if t is not None])
        outer_shape, inner = lead[:k], math.prod(lead[k:])
        n_outer = math.prod(outer_shape)
        # [outer, inner, L, H, C]: the projections are row-independent, so they run once on every row
        q = self.linear_q(q_x).reshape(n_outer, inner, Lq, H, C)
        kk = self.linear_k(kv_x).reshape(n_outer, inner, Lk, H, C)
        v = self.linear_v(kv_x).reshape(n_outer, inner, Lk, H, C)
        step = max(inner, 1) if chunk is None else chunk
        backend = self.backend or "auto"

        outs = []
        for o in range(n_outer):
            o_idx = _unravel(o, outer_shape)
            m_o, b_o = _per_outer(mask, o_idx), _per_outer(bias, o_idx)
            for s in range(0, inner, step):
                e = min(s + step, inner)
                out = attention(
                    q[o, s:e].transpose(1, 2), kk[o, s:e].transpose(1, 2), v[o, s:e].transpose(1, 2),
                    mask=_rows(m_o, s, e), bias=_rows(b_o, s, e), backend=backend,
                )
                outs.append(out.transpose(1, 2))  # [rows, Lq, H, C]
        if outs:
            o_all = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
            o_all = o_all.reshape(*lead, Lq, H * C)
        else:  # an empty leading dim: nothing to attend, keep the shapes
            o_all = q_x.new_zeros(*lead, Lq, H * C)
        if self.linear_g is not None:
            o_all = o_all * torch.sigmoid(self.linear_g(q_x))
        return self.linear_o(o_all)


class _BackendViaMha:
    """`backend` of a wrapper module reads and writes its inner EvoformerAttention's."""

    mha: EvoformerAttention

    @property
    def backend(self) -> str | None:
        return self.mha.backend

    @backend.setter
    def backend(self, value: str | None) -> None:
        self.mha.backend = _check_backend(value)


class MSARowAttentionWithPairBias(_BackendViaMha, nn.Module):
    """AlphaFold2 Algorithm 7 (OpenFold's `MSARowAttentionWithPairBias`): each MSA row attends
    along the residues, with a bias from the pair representation shared by every row.

    m' = layer_norm_m(m); b = linear_z(layer_norm_z(z)) permuted to [*, H, N_res, N_res];
    returns mha(m', m', key mask, bias = b broadcast over the N_seq rows): the UPDATE
    [*, N_seq, N_res, c_m], not m + update (as in OpenFold).

    Parameters (OpenFold names): layer_norm_m (LayerNorm c_m), layer_norm_z (LayerNorm c_z),
    linear_z (c_z -> num_heads, no bias, std 1/sqrt(c_z) at init), mha (EvoformerAttention(c_m,
    c_m, c_m, c_hidden, num_heads)).

    forward(m [*, N_seq, N_res, c_m], z [*, N_res, N_res, c_z], mask=None, chunk_size=None)
        mask: [*, N_seq, N_res] (size-1 dims broadcast), bool (True = keep) or 0/1 numbers as in
            OpenFold (1 = keep; a value > 0.5 counts as kept). Key mask: residue j of row s is
            visible to row s's queries iff mask[s, j]. A row with no kept residue (a padding
            sequence) gets attention 0, where OpenFold's -1e9 averages its values uniformly.
        chunk_size: at most this many MSA rows (times batch elements) per contract call.

    The pair bias is one [*, H, N_res, N_res] tensor (made contiguous once, so kernels read its
    key rows as vectors) handed to the contract with size 1 on the row dim; its gradient, summed
    over the rows by the contract, reaches z. With batch dims * of size > 1, one contract call per
    batch element (see EvoformerAttention).
    """

    def __init__(self, c_m: int, c_z: int, c_hidden: int, num_heads: int, backend: str | None = None):
        super().__init__()
        for name, value in (("c_m", c_m), ("c_z", c_z), ("c_hidden", c_hidden), ("num_heads", num_heads)):
            positive_int(name, value)
        self.c_m, self.c_z, self.c_hidden, self.num_heads = c_m, c_z, c_hidden, num_heads
        self.layer_norm_m = nn.LayerNorm(c_m)
        self.layer_norm_z = nn.LayerNorm(c_z)
        self.linear_z = nn.Linear(c_z, num_heads, bias=False)
        nn.init.normal_(self.linear_z.weight, std=1.0 / math.sqrt(c_z))
        self.mha = EvoformerAttention(c_m, c_m, c_m, c_hidden, num_heads, gating=True, backend=backend)

    @property
    def no_heads(self) -> int:
        return self.num_heads

    def forward(self, m: Tensor, z: Tensor, mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
        if not isinstance(m, Tensor) or m.dim() < 3 or m.shape[-1] != self.c_m:
            got = list(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"m must be [*, N_seq, N_res, c_m={self.c_m}], got {got}")
        batch, n_res = tuple(m.shape[:-3]), m.shape[-2]
        want_z = [*batch, n_res, n_res, self.c_z]
        if not isinstance(z, Tensor) or tuple(z.shape) != tuple(want_z):
            got = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"z must be [*, N_res, N_res, c_z] = {want_z} to match m {list(m.shape)} "
                f"([*, N_seq, N_res, c_m]) and c_z={self.c_z}, got {got}"
            )
        _check_chunk_size(chunk_size)
        if mask is not None:
            mask = _as_bool_mask("mask", mask)
            _check_broadcast("mask", mask.shape, m.shape[:-1], "[*, N_seq, N_res] (the MSA mask)")

        m = self.layer_norm_m(m)
        # [*, N_res, N_res, H] -> [*, 1, H, N_res, N_res]: one bias for every MSA row
        b = self.linear_z(self.layer_norm_z(z)).movedim(-1, -3).contiguous().unsqueeze(-4)
        return self.mha(m, m, mask=mask, bias=b, chunk_size=chunk_size)


class TriangleAttention(_BackendViaMha, nn.Module):
    """AlphaFold2 Algorithms 13/14 (OpenFold's `TriangleAttention`): attention along the rows of
    the pair representation, biased by the pair representation itself.

    Starting node (starting=True): for each row i, query (i, j) attends to keys (i, k) with bias
    b[h, j, k] = linear(layer_norm(x))[j, k, h], one [*, H, I, J] bias shared by every row i.
    Ending node (starting=False): the same on x with its two pair dims transposed, and the result
    transposed back (OpenFold's way).

    Parameters (OpenFold names): layer_norm (LayerNorm c_in), linear (c_in -> num_heads, no bias,
    std 1/sqrt(c_in) at init), mha (EvoformerAttention(c_in, c_in, c_in, c_hidden, num_heads)).

    forward(x [*, I, J, c_in] with I == J, mask=None, chunk_size=None) -> the update [*, I, J, c_in]
        mask: [*, I, J] (size-1 dims broadcast), bool or 0/1 numbers (> 0.5 = keep); pair (i, k)
            is a visible key of row i iff mask[i, k] (for the ending node, mask[k, i] in x's
            layout). A row with no visible key gets attention 0 (OpenFold: a uniform average).
        chunk_size: at most this many rows (times batch elements) per contract call.
    """

    def __init__(self, c_in: int, c_hidden: int, num_heads: int, starting: bool = True,
                 backend: str | None = None):
        super().__init__()
        for name, value in (("c_in", c_in), ("c_hidden", c_hidden), ("num_heads", num_heads)):
            positive_int(name, value)
        if not isinstance(starting, bool):
            raise TypeError(f"starting must be a bool, got {type(starting).__name__}")
        self.c_in, self.c_hidden, self.num_heads, self.starting = c_in, c_hidden, num_heads, starting
        self.layer_norm = nn.LayerNorm(c_in)
        self.linear = nn.Linear(c_in, num_heads, bias=False)
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(c_in))
        self.mha = EvoformerAttention(c_in, c_in, c_in, c_hidden, num_heads, gating=True, backend=backend)

    @property
    def no_heads(self) -> int:
        return self.num_heads

    def extra_repr(self) -> str:
        return f"starting={self.starting}"

    def forward(self, x: Tensor, mask: Tensor | None = None, chunk_size: int | None = None) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() < 3 or x.shape[-1] != self.c_in or x.shape[-3] != x.shape[-2]:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a square pair tensor [*, I, J, c_in={self.c_in}] with I == J, got {got}")
        _check_chunk_size(chunk_size)
        if mask is not None:
            mask = _as_bool_mask("mask", mask)
            _check_broadcast("mask", mask.shape, x.shape[:-1], "[*, I, J] (the pair mask)")
        if not self.starting:
            x = x.transpose(-2, -3)
            mask = mask.transpose(-1, -2) if mask is not None else None
        x = self.layer_norm(x)
        # [*, I, J, H] -> [*, 1, H, I, J]: row i's queries j and keys k read b[h, j, k]
        b = self.linear(x).movedim(-1, -3).contiguous().unsqueeze(-4)
        out = self.mha(x, x, mask=mask, bias=b, chunk_size=chunk_size)
        return out.transpose(-2, -3) if not self.starting else out


class TriangleAttentionStartingNode(TriangleAttention):
    """Triangle attention around the starting node (AlphaFold2 Algorithm 13): TriangleAttention(starting=True).

    forward(x [*, I, J, c_in] with I == J, mask [*, I, J] or None, chunk_size=None) -> the update [*, I, J, c_in]
    (see TriangleAttention).
    """

    def __init__(self, c_in: int, c_hidden: int, num_heads: int, backend: str | None = None):
        super().__init__(c_in, c_hidden, num_heads, starting=True, backend=backend)


class TriangleAttentionEndingNode(TriangleAttention):
    """Triangle attention around the ending node (AlphaFold2 Algorithm 14): TriangleAttention(starting=False).

    forward(x [*, I, J, c_in] with I == J, mask [*, I, J] or None, chunk_size=None) -> the update [*, I, J, c_in]
    (see TriangleAttention).
    """

    def __init__(self, c_in: int, c_hidden: int, num_heads: int, backend: str | None = None):
        super().__init__(c_in, c_hidden, num_heads, starting=False, backend=backend)
