"""MixedAttention: named token groups, which group attends to which, and cached anchor K/V.

Anchor attention (AB-UPT and its kin) splits a sequence into groups, e.g.
surface anchors, surface queries, volume anchors, volume queries, and lets each
group attend only to chosen groups. One QKV projection and one output
projection serve every group.

Two forms compute the same function:
- sequential (`parallel=False`): one attention call per pattern, the readable form;
- parallel (`parallel=True`): either ONE attention call over the whole sequence
  with the layout as a `GroupMask` (one launch of our Triton kernel on CUDA,
  visiting only the allowed tiles; a block mask under FlexAttention), or one
  call per distinct key/value set with the patterns that share it batched
  together. It picks per layout: see `_fused_pays`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from .._bounded import put
from .._checks import backend_name, describe, flag, positive_int, probability, tensor
from ..functional import attention
from ..groups import GroupMask, SegmentLayout
from .rope import RotaryEmbedding

__all__ = ["TokenSpec", "AttentionPattern", "MixedAttentionConfig", "MixedAttention"]

_INITS = ("truncnormal", "xavier", "torch")
KVCacheDict = dict[str, dict[str, Tensor]]


@dataclass(frozen=True)
class TokenSpec:
    """A named token group; size None means its K/V come from a KV cache, not from the input."""

    name: str
    size: int | None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TokenSpec name must be a non-empty str, got {self.name!r}")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0):
            raise ValueError(f"TokenSpec {self.name!r}: size must be an int >= 0 or None, got {self.size!r}")


@dataclass(frozen=True)
class AttentionPattern:
    """The groups in query_tokens attend to (only) the groups in key_value_tokens."""

    query_tokens: Sequence[str]
    key_value_tokens: Sequence[str]

    def __post_init__(self) -> None:
        for name in ("query_tokens", "key_value_tokens"):
            val = getattr(self, name)
            if not isinstance(val, (list, tuple)):
                raise TypeError(f"AttentionPattern.{name} must be a list or tuple of group names, "
                                f"got {type(val).__name__} {val!r:.60}")
            if not all(isinstance(t, str) for t in val) or len(val) == 0:
                raise ValueError(f"AttentionPattern.{name} must be a non-empty list of group names, got {val!r}")
            twice = sorted({t for t in val if val.count(t) > 1})
            if twice:  # a key group listed twice would enter the softmax twice
                raise ValueError(f"AttentionPattern.{name} lists {twice} more than once: {val!r}")
            object.__setattr__(self, name, tuple(val))


@dataclass
class MixedAttentionConfig:
    """dim: model width (divisible by num_heads). use_rope: rotate q/k by `freqs`. bias: bias in the
    projections. init_weights: "truncnormal" (std 0.02), "xavier" or "torch". parallel: the fast form.
    dropout: on the attention probabilities (training). qk_norm: RMS-normalise q and k per head.
    backend: attnkit backend name for the attention calls."""

    dim: int
    num_heads: int
    use_rope: bool = False
    bias: bool = True
    init_weights: str = "truncnormal"
    parallel: bool = True
    dropout: float = 0.0
    qk_norm: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("dim", "num_heads"):
            positive_int(name, getattr(self, name))
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.use_rope and (self.dim // self.num_heads) % 2:
            raise ValueError(f"use_rope needs an even head dim, got {self.dim // self.num_heads}")
        if self.init_weights not in _INITS:
            raise ValueError(f"init_weights must be one of {_INITS}, got {self.init_weights!r}")
        probability("dropout", self.dropout)
        for name in ("use_rope", "bias", "parallel", "qk_norm"):
            flag(name, getattr(self, name))
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a str, got {type(self.backend).__name__}")
        backend_name(self.backend)


@dataclass(frozen=True, eq=False)  # hashed by identity: one object per cached layout
class _Layout:
    """A checked (token_specs, attention_patterns) pair with token offsets into x."""

    spans: dict  # input group -> (start, end) in x
    cached: tuple  # names of cached groups
    kv_sets: tuple  # ((kv names...), (query names...)), patterns merged by identical kv set
    patterns: tuple  # ((kv names...), (query names...)), one per pattern as written
    n_tokens: int
    memo: dict = field(default_factory=dict)  # what calls derive from the layout (evicted with it)

    @property
    def uses_cache(self) -> bool:
        return any(n in self.cached for kv, _ in self.kv_sets for n in kv)


def _check_types(token_specs, patterns) -> None:
    for name, seq, cls in (("token_specs", token_specs, TokenSpec), ("attention_patterns", patterns, AttentionPattern)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of {cls.__name__}, got {describe(seq)}")
        for item in seq:
            if not isinstance(item, cls):
                raise TypeError(f"{name} must hold {cls.__name__} objects, got {describe(item)}")


def _check_layout(token_specs: Sequence[TokenSpec], patterns: Sequence[AttentionPattern], n: int) -> _Layout:
    """The layout of specs and patterns whose types the caller checked (_check_types)."""
    names = [s.name for s in token_specs]
    for s in token_specs:
        if names.count(s.name) > 1:
            raise ValueError(f"token group {s.name!r} appears {names.count(s.name)} times in token_specs")
    spans, start = {}, 0
    for s in token_specs:
        if s.size is not None:
            spans[s.name] = (start, start + s.size)
            start += s.size
    if start != n:
        sizes = {s.name: s.size for s in token_specs if s.size is not None}
        raise ValueError(f"input group sizes {sizes} sum to {start}, but x has {n} tokens")
    cached = tuple(s.name for s in token_specs if s.size is None)
    seen_as_query: dict[str, int] = {}
    merged: "OrderedDict[tuple, list]" = OrderedDict()
    written = []
    for pi, p in enumerate(patterns):
        for g in (*p.query_tokens, *p.key_value_tokens):
            if g not in names:
                raise ValueError(f"pattern {pi} names token group {g!r}, which is not in token_specs {names}")
        for g in p.query_tokens:
            if g in cached:
                raise ValueError(f"token group {g!r} comes from the KV cache (size=None) and cannot be a query")
            if g in seen_as_query:
                raise ValueError(f"token group {g!r} is a query in patterns {seen_as_query[g]} and {pi}; "
                                 "patterns must not overlap")
            seen_as_query[g] = pi
        merged.setdefault(tuple(p.key_value_tokens), []).extend(p.query_tokens)
        written.append((tuple(p.key_value_tokens), tuple(p.query_tokens)))
    missing = [g for g in spans if g not in seen_as_query]
    if missing:
        raise ValueError(f"token group(s) {missing} are never a query; every input group must be the "
                         "query of exactly one pattern")
    return _Layout(spans, cached, tuple((kv, tuple(qs)) for kv, qs in merged.items()), tuple(written), n)


def _rms_norm(t: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    tf = t.to(torch.promote_types(t.dtype, torch.float32))  # half in float32, float64 kept
    # back to t's dtype after the weight: under autocast a float32 weight must not promote q/k past v
    return (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(t.dtype)


class MixedAttention(nn.Module):
    """Attention over named token groups. x [B, N, dim] -> (out [B, N, dim], new_kv_cache).

    forward(x, token_specs, attention_patterns, key_padding_mask=None, freqs=None, kv_cache=None):
      x: the input groups (size not None) concatenated in token_specs order.
      attention_patterns: exhaustive and non-overlapping: every input group is the
        query of exactly one pattern; cached groups may only be keys/values.
      key_padding_mask: bool [B, N], True = real token; padded tokens are never
        attended to (pass None when nothing is padded: an all-True mask is still a mask,
        here and in the cache it returns, and masked calls take slower kernels).
        Cached tokens are valid unless their entry carries a "mask".
        Rows with no valid key give 0.
      freqs: RoPE for the input tokens: angles [N, D/2] or [B, N, D/2], or a
        (cos, sin) pair of that shape (e.g. RotaryEmbedding.cos_sin(N)); ignored
        when use_rope=False (as in emmi's anchor attention).
      kv_cache: {group: {"k": [B, H, size, D], "v": [B, H, size, D]}} for the size=None groups,
        optionally with "mask": bool [B, size], True = real token.
    Returns new_kv_cache = {group: {"k", "v"}} for every input group used as keys/values
    (post-RoPE, post-qk-norm), with "mask" (that group's slice of key_padding_mask) when a
    key_padding_mask was given, so that padded anchors stay unattended when the cache is read;
    or None when this call read cached groups.
    """

    def __init__(self, config: MixedAttentionConfig):
        super().__init__()
        if not isinstance(config, MixedAttentionConfig):
            raise TypeError(f"config must be a MixedAttentionConfig, got {type(config).__name__}")
        self.config = config
        self.num_heads = config.num_heads
        self.head_dim = config.dim // config.num_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=config.bias)
        self.proj = nn.Linear(config.dim, config.dim, bias=config.bias)
        if config.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(self.head_dim))
            self.k_norm = nn.Parameter(torch.ones(self.head_dim))
        else:
            self.register_parameter("q_norm", None)
            self.register_parameter("k_norm", None)
        self._init_weights(config.init_weights)
        self._layouts: dict = {}

    def _init_weights(self, how: str) -> None:
        for lin in (self.qkv, self.proj):
            if how == "truncnormal":
                nn.init.trunc_normal_(lin.weight, std=0.02)
            elif how == "xavier":
                nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None and how != "torch":
                nn.init.zeros_(lin.bias)

    # ------------------------------------------------------------------ helpers
    def _layout(self, token_specs, patterns, n: int) -> _Layout:
        """The checked layout, kept for the last 16 (specs, patterns, length) keys."""
        _check_types(token_specs, patterns)  # before hashing them into the key
        key = (tuple(token_specs), tuple(patterns), n)
        hit = self._layouts.get(key)
        if hit is None:
            hit = put(self._layouts, key, _check_layout(token_specs, patterns, n), 16)
        return hit

    def _rope(self, q: Tensor, k: Tensor, freqs) -> tuple[Tensor, Tensor]:
        if freqs is None:
            raise ValueError("use_rope=True needs freqs (angles [N, D/2] or a (cos, sin) pair)")
        if isinstance(freqs, (tuple, list)) and len(freqs) == 2:
            cos, sin = freqs
        elif isinstance(freqs, Tensor):
            cos, sin = torch.cos(freqs), torch.sin(freqs)
        else:
            raise TypeError(f"freqs must be a tensor of angles or a (cos, sin) pair, got {type(freqs).__name__}")
        B, N, half = q.shape[0], q.shape[2], self.head_dim // 2
        for name, t in (("cos", cos), ("sin", sin)):
            if isinstance(t, Tensor) and not t.is_floating_point():
                # complex freqs (torch.polar, as emmi/noether's RopeFrequency gives) rotate adjacent dim
                # pairs there; attnkit rotates the two halves, so the same numbers would mean another rotation
                raise TypeError(f"freqs must be real angles or a real (cos, sin) pair (attnkit rotates the halves "
                                f"of D, not adjacent pairs), got {describe(t)}")
            ok = isinstance(t, Tensor) and t.dim() in (2, 3) and tuple(t.shape[-2:]) == (N, half)
            if not ok or (t.dim() == 3 and t.shape[0] not in (1, B)):
                raise ValueError(f"freqs ({name}) must be [N, D/2] = [{N}, {half}] or [B, N, D/2] with B = {B}, "
                                 f"got {list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        return RotaryEmbedding.rotate(q, cos, sin), RotaryEmbedding.rotate(k, cos, sin)

    def _attend(self, q, k, v, mask=None, mask_mod=None) -> Tensor:
        return attention(q, k, v, mask=mask, mask_mod=mask_mod,
                         dropout_p=self.config.dropout if self.training else 0.0, backend=self.config.backend)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, token_specs: Sequence[TokenSpec], attention_patterns: Sequence[AttentionPattern],
                key_padding_mask: Tensor | None = None, freqs=None,
                kv_cache: KVCacheDict | None = None) -> tuple[Tensor, KVCacheDict | None]:
        if tensor("x", x).dim() != 3 or x.shape[-1] != self.config.dim:
            raise ValueError(f"x must be [B, N, dim={self.config.dim}], got {list(x.shape)}")
        B, N, _ = x.shape
        lay = self._layout(token_specs, attention_patterns, N)
        if key_padding_mask is not None:
            if tensor("key_padding_mask", key_padding_mask).dtype != torch.bool:
                raise TypeError(f"key_padding_mask must be a bool tensor (True = real key), got "
                                f"{describe(key_padding_mask)}")
            if tuple(key_padding_mask.shape) != (B, N):
                raise ValueError(f"key_padding_mask must be bool [B, N] = [{B}, {N}], got "
                                 f"{key_padding_mask.dtype} {list(key_padding_mask.shape)}")
        cache = self._check_cache(lay, kv_cache, B, x)
        H, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, D]
        if self.q_norm is not None:
            q, k = _rms_norm(q, self.q_norm), _rms_norm(k, self.k_norm)
        if self.config.use_rope:
            q, k = self._rope(q, k, freqs)
        if self.config.parallel and not lay.uses_cache and self._fused_decision(lay, x):
            out = self._fused(lay, q, k, v, key_padding_mask)
        else:
            out = self._per_kv_set(lay, q, k, v, key_padding_mask, cache, merge=self.config.parallel)
        out = self.proj(out.transpose(1, 2).reshape(B, N, self.config.dim))
        if lay.uses_cache:
            return out, None
        used = {g for kv, _ in lay.kv_sets for g in kv}
        new_cache = {g: {"k": k[:, :, s:e], "v": v[:, :, s:e]} for g, (s, e) in lay.spans.items() if g in used}
        if key_padding_mask is not None:
            for g, entry in new_cache.items():
                s, e = lay.spans[g]
                entry["mask"] = key_padding_mask[:, s:e].clone()  # the caller's buffer may be reused
        return out, new_cache

    def _check_cache(self, lay: _Layout, kv_cache, B: int, x: Tensor) -> KVCacheDict:
        needed = {g for kv, _ in lay.kv_sets for g in kv if g in lay.cached}
        if not needed:
            return {}
        if kv_cache is None:
            raise ValueError(f"token group(s) {sorted(needed)} have size=None but no kv_cache was given")
        if not isinstance(kv_cache, Mapping):
            raise TypeError(f"kv_cache must be a dict of group name -> {{'k', 'v'[, 'mask']}}, got "
                            f"{describe(kv_cache)}")
        for g in sorted(needed):
            entry = kv_cache.get(g)
            if not isinstance(entry, Mapping) or "k" not in entry or "v" not in entry:
                raise ValueError(f"kv_cache has no 'k'/'v' for cached token group {g!r}")
            kk, vv = tensor(f"kv_cache[{g!r}]['k']", entry["k"]), tensor(f"kv_cache[{g!r}]['v']", entry["v"])
            if kk.dim() != 4 or kk.shape[0] != B or kk.shape[1] != self.num_heads or kk.shape[3] != self.head_dim \
                    or vv.shape != kk.shape:
                raise ValueError(f"kv_cache[{g!r}] k/v must be [B, H, size, D] = [{B}, {self.num_heads}, size, "
                                 f"{self.head_dim}], got {list(kk.shape)} / {list(vv.shape)}")
            m = entry.get("mask")
            if m is not None and (not isinstance(m, Tensor) or m.dtype != torch.bool
                                  or tuple(m.shape) != (B, kk.shape[2])):
                seen = f"{m.dtype} {list(m.shape)}" if isinstance(m, Tensor) else type(m).__name__
                raise ValueError(f"kv_cache[{g!r}]['mask'] must be bool [B, size] = [{B}, {kk.shape[2]}], got {seen}")
        return {g: kv_cache[g] for g in needed}

    # The sequential form, and the parallel form's "one call per distinct key/value set".
    def _per_kv_set(self, lay: _Layout, q, k, v, kpm, cache, merge: bool) -> Tensor:
        # [B, N, H, D] in memory, so that merging the heads for the projection is a free view
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
        for kv_names, q_names in (lay.kv_sets if merge else lay.patterns):
            qi = self._gather(q, lay, q_names)
            if qi.shape[2] == 0:
                continue  # empty query groups
            ks, vs, ms = [], [], []  # ms: each group's key padding mask [B, size], None = all real
            for g in kv_names:
                if g in lay.cached:
                    ks.append(cache[g]["k"].to(k.dtype))
                    vs.append(cache[g]["v"].to(v.dtype))
                    ms.append(cache[g].get("mask"))
                else:
                    s, e = lay.spans[g]
                    ks.append(k[:, :, s:e])
                    vs.append(v[:, :, s:e])
                    ms.append(kpm[:, s:e] if kpm is not None else None)
            kk = ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)
            vv = vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)
            mask = None
            if any(m is not None for m in ms):
                ms = [m.to(q.device) if m is not None else torch.ones(q.shape[0], t.shape[2], dtype=torch.bool,
                                                                      device=q.device) for m, t in zip(ms, ks)]
                mask = (ms[0] if len(ms) == 1 else torch.cat(ms, dim=1))[:, None, None, :]
            if kk.shape[2] == 0:
                o = torch.zeros_like(qi)  # no key at all: rows with nothing to attend give 0
            else:
                o = self._attend(qi, kk, vv, mask=mask)
            self._scatter(out, o, lay, q_names)
        return out

    @staticmethod
    def _runs(lay: _Layout, names) -> list[tuple[int, int]]:
        """Contiguous (start, end) runs of x covered by the named groups, in order; empty groups give none
        (an empty write into `out` before a full one breaks autograd's in-place check)."""
        runs: list[list[int]] = []
        for g in names:
            s, e = lay.spans[g]
            if e == s:
                continue
            if runs and runs[-1][1] == s:
                runs[-1][1] = e
            else:
                runs.append([s, e])
        return [(s, e) for s, e in runs]

    def _gather(self, t: Tensor, lay: _Layout, names) -> Tensor:
        parts = [t[:, :, s:e] for s, e in self._runs(lay, names)] or [t[:, :, :0]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)  # a view when contiguous

    def _scatter(self, out: Tensor, o: Tensor, lay: _Layout, names) -> None:
        i = 0
        for s, e in self._runs(lay, names):
            out[:, :, s:e] = o[:, :, i:i + e - s]
            i += e - s

    # ------------------------------------------------------------------ fused form
    def _fused_decision(self, lay: _Layout, x: Tensor) -> bool:
        """`_fused_pays`, remembered per (layout, device type): it is on every call's path."""
        key = ("fused?", x.device.type)
        hit = lay.memo.get(key)
        if hit is None:
            hit = lay.memo[key] = bool(self._fused_pays(lay, x))
        return hit

    def _fused_pays(self, lay: _Layout, x: Tensor) -> bool:
        """One block-sparse call beats a loop of dense calls when the calls are many or small.

        On an H100 (issue 4, benchmarks/bench_mixed.py): 2 key/value sets of 16k-64k tokens
        each -> the loop of cuDNN calls wins (our fused Triton launch is 1.2-1.6x slower there);
        8 groups of 512 -> the fused launch wins by 3x over the loop. Rule: fuse on CUDA
        when there are more than 2 key/value sets or the smallest call has < 4096 x 4096 pairs.
        On the CPU the loop always runs (no block-sparse kernel there).
        """
        if x.device.type != "cuda":
            return False
        sizes = []
        for kv, qs in lay.kv_sets:
            nq = sum(lay.spans[g][1] - lay.spans[g][0] for g in qs)
            nk = sum(lay.spans[g][1] - lay.spans[g][0] for g in kv)
            sizes.append(nq * nk)
        return len(lay.kv_sets) > 2 or min(sizes) < 4096 * 4096

    def _fused(self, lay: _Layout, q, k, v, kpm) -> Tensor:
        mod = self._group_mask_mod(lay, q.device)
        mask = kpm[:, None, None, :] if kpm is not None else None
        return self._attend(q, k, v, mask=mask, mask_mod=mod)

    def _group_mask_mod(self, lay: _Layout, device) -> GroupMask:
        """The layout as one GroupMask over the whole sequence (query set i -> its key groups)."""
        key = ("mod", str(device))
        hit = lay.memo.get(key)
        if hit is None:
            sets = tuple((tuple(self._runs(lay, qs)), tuple(self._runs(lay, kv))) for kv, qs in lay.kv_sets)
            hit = lay.memo[key] = GroupMask(SegmentLayout(lay.n_tokens, lay.n_tokens, sets), device)
        return hit

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, num_heads={c.num_heads}, parallel={c.parallel}, use_rope={c.use_rope}, qk_norm={c.qk_norm}"
