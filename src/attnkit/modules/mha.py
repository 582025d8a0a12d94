"""AttentionConfig and MultiHeadAttention on [B, L, d_model]: GQA/MQA, RoPE, sinks, windows, KV cache."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from .._checks import backend_name, describe, flag, positive_int, probability, real, tensor
from ..caches.base import DecodeCache
from ..caches.kv_cache import KVCache
from ..caches.paged_kv_cache import PagedKVCache
from ..functional import attention
from .rope import RopeScaling, RotaryEmbedding

__all__ = ["AttentionConfig", "MultiHeadAttention"]


@dataclass
class AttentionConfig:
    """Hyperparameters of MultiHeadAttention, checked on construction.

    d_model: model width, divisible by n_heads. n_heads: query heads.
    use_rope / rope_base / rope_scaling: rotary embeddings; rope_scaling is a
        float factor (1.0 = off, else linear), a dict or a RopeScaling
        ("linear", "ntk", "yarn").
    use_attention_sinks / num_attention_sinks: learnable sink tokens prepended
        to K/V that every query sees (num_attention_sinks > 0 when on).
    use_gqa / gqa_groups: num_kv_heads = gqa_groups (1 = MQA); must divide n_heads.
    dropout: on the attention probabilities, training only.
    use_flash: True = the dispatcher picks the backend; False = the reference math.
    window: causal sliding window in tokens (None = off).
    qkv_bias: bias in the q/k/v projections.
    backend: backend name for attnkit.attention when use_flash (default "auto").
    score_mod: FlexAttention-style score_mod passed to every call, on positions in the sequence:
        q_idx is the query's position (also when decoding with a cache), kv_idx the key token's;
        the learnable sink slots do not pass through it.
    attention_fn: a callable with attnkit.attention's signature that replaces it.
    """

    d_model: int
    n_heads: int
    use_rope: bool = False
    rope_base: float = 10000.0
    rope_scaling: float | dict | RopeScaling = 1.0
    use_attention_sinks: bool = False
    num_attention_sinks: int = 0
    use_gqa: bool = False
    gqa_groups: int = 1
    dropout: float = 0.0
    use_flash: bool = True
    window: int | None = None
    qkv_bias: bool = False
    backend: str = "auto"
    score_mod: Callable | None = None
    attention_fn: Callable | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads"):
            positive_int(name, getattr(self, name))
        for name in ("use_rope", "use_attention_sinks", "use_gqa", "use_flash", "qkv_bias"):
            flag(name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.use_rope and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"use_rope needs an even head dim, got d_model / n_heads = {self.d_model // self.n_heads}")
        if not real("rope_base", self.rope_base) > 1.0:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base!r}")
        self.rope_scaling = RopeScaling.parse(self.rope_scaling)
        n = self.num_attention_sinks
        if isinstance(n, bool) or not isinstance(n, int) or n < (1 if self.use_attention_sinks else 0):
            raise ValueError(f"num_attention_sinks must be an int, > 0 when use_attention_sinks (else >= 0), "
                             f"got {n!r}")
        positive_int("gqa_groups", self.gqa_groups)
        if self.use_gqa and self.n_heads % self.gqa_groups:
            raise ValueError(f"gqa_groups ({self.gqa_groups}) must divide n_heads ({self.n_heads})")
        probability("dropout", self.dropout)
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be None or an int >= 1, got {self.window!r}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a str, got {type(self.backend).__name__}")
        backend_name(self.backend)
        for name in ("score_mod", "attention_fn"):
            fn = getattr(self, name)
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None, got {type(fn).__name__}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        return self.gqa_groups if self.use_gqa else self.n_heads


class MultiHeadAttention(nn.Module):
    """Self-attention on x [B, L, d_model] -> [B, L, d_model].

    Projections q_proj (d_model -> d_model), k_proj / v_proj (d_model ->
    num_kv_heads * head_dim), o_proj; RoPE on q and k; GQA through the
    contract (K/V heads are never repeated); `sinks`, when enabled, is a
    learnable (num_attention_sinks, d_model) parameter projected to K/V and
    prepended (no RoPE), visible to every query, even outside the window.

    forward(x, attn_bias=None, *, mask=None, causal=False, positions=None, kv_cache=None):
      attn_bias: additive [B, 1, L, L] (0 keep, -inf masked), as the reference API.
      mask: bool, True = attend, broadcastable to [B, H, L, L].
      causal: causal self-attention (implied by a window and by decoding with a cache).
      positions: RoPE positions (None = 0..L-1, or after the cache's tokens).
      kv_cache: a DecodeCache (KVCache, or a PagedKVCache bound to a batch of
        sequences with `bind`); the new K/V are appended and attention runs over
        everything cached so far (prefill, then single-token decode steps). Without
        sink tokens, mask or attn_bias (and with the cache in the module's dtype) the
        contract reads the cache in place through `cache_seqlens` (+ `block_table` for a
        paged cache: the triton backend's split-KV decode kernel on CUDA); otherwise the
        cached K/V are gathered and masked.
    """

    def __init__(self, config: AttentionConfig):
        super().__init__()
        if not isinstance(config, AttentionConfig):
            raise TypeError(f"config must be an AttentionConfig, got {type(config).__name__}")
        self.config = config
        self.num_heads = config.n_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        d, kvd = config.d_model, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(d, kvd, bias=config.qkv_bias)
        self.v_proj = nn.Linear(d, kvd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(d, d)
        self.rope = (
            RotaryEmbedding(self.head_dim, config.rope_base, config.rope_scaling) if config.use_rope else None
        )
        if config.use_attention_sinks:
            self.sinks = nn.Parameter(torch.randn(config.num_attention_sinks, d) * 0.02)
        else:
            self.register_parameter("sinks", None)
        self._attend = config.attention_fn or attention
        self._backend = config.backend if config.use_flash else "reference"

    def _split(self, t: Tensor, heads: int) -> Tensor:
        B, L = t.shape[:2]
        return t.view(B, L, heads, self.head_dim).transpose(1, 2)

    def _sink_kv(self, B: int) -> tuple[Tensor, Tensor]:
        s = self.sinks.unsqueeze(0)  # [1, S, d_model]
        k = self._split(self.k_proj(s), self.num_kv_heads).expand(B, -1, -1, -1)
        v = self._split(self.v_proj(s), self.num_kv_heads).expand(B, -1, -1, -1)
        return k, v

    def forward(self, x: Tensor, attn_bias: Tensor | None = None, *, mask: Tensor | None = None,
                causal: bool = False, positions=None, kv_cache: DecodeCache | None = None) -> Tensor:
        if tensor("x", x).dim() != 3 or x.shape[-1] != self.config.d_model:
            raise ValueError(f"x must be [B, L, d_model={self.config.d_model}], got {list(x.shape)}")
        if kv_cache is not None and not isinstance(kv_cache, DecodeCache):
            raise TypeError(f"kv_cache must be a KVCache or PagedKVCache (a DecodeCache), got {type(kv_cache).__name__}")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool):
            raise TypeError(f"mask must be a bool tensor (True = attend), got {describe(mask)}")
        B, L, _ = x.shape
        q = self._split(self.q_proj(x), self.num_heads)
        k = self._split(self.k_proj(x), self.num_kv_heads)
        v = self._split(self.v_proj(x), self.num_kv_heads)
        window = self.config.window
        start = None  # with a cache: each sequence's position of the first new token, int64 [B]
        if kv_cache is not None:
            if L == 0:
                raise ValueError(f"x must hold at least one new token with a kv_cache, got {list(x.shape)}")
            if kv_cache.k.device != x.device:  # before RoPE, whose device error would not name the cache
                raise ValueError(f"kv_cache is on {kv_cache.k.device}, x on {x.device}")
            ck, cv = kv_cache.k.shape, kv_cache.v.shape  # [B or blocks, Hkv, len or block, D]: dims 1 and 3
            if (ck[1], ck[3], cv[3]) != (self.num_kv_heads, self.head_dim, self.head_dim):
                raise ValueError(f"kv_cache holds {ck[1]} kv heads of dims {ck[3]} / {cv[3]} (k / v), this module "
                                 f"{self.num_kv_heads} of dim {self.head_dim}; build it with new_kv_cache / "
                                 "new_paged_kv_cache")
            nxt = kv_cache.next_positions(L)
            if nxt.shape[0] != B:  # before RoPE, whose broadcast error would not name the cache
                raise ValueError(f"kv_cache holds a batch of {nxt.shape[0]} sequences, x has B = {B}")
            start = nxt[:, 0]
            if positions is None:
                positions = nxt
        if self.rope is not None:
            q, k = self.rope(q, k, positions)

        kw: dict = dict(scale=self.scale, dropout_p=self.config.dropout if self.training else 0.0,
                        backend=self._backend)
        num_sinks = self.sinks.shape[0] if self.sinks is not None else 0
        if self.config.score_mod is not None:
            kw["score_mod"] = _positional_score_mod(self.config.score_mod, start, num_sinks)
        cached = None
        if kv_cache is not None and self.sinks is None and mask is None and attn_bias is None \
                and kv_cache.k.dtype == k.dtype:
            # decode path: attend over the cache in place (cache_seqlens, block_table); every
            # sequence appends the same L tokens, so query i sits at length_b - L + i
            cached = kv_cache.append_for_attention(k, v)
        wrote = cached is not None
        try:  # once the cache is written, a call that raises undoes the write
            if cached is not None:
                k, v = cached.pop("k"), cached.pop("v")
                kw.update(cached)
                causal_arg, window_arg = True, window
            elif kv_cache is not None:  # general path: gathered K/V and a key mask
                k, v, old, _ = kv_cache.append(k.to(kv_cache.k.dtype), v.to(kv_cache.v.dtype))
                wrote = True
                k, v = k.to(q.dtype), v.to(q.dtype)
                keep = kv_cache.key_mask(old, L, causal=True, window=window)
                if mask is not None:
                    try:
                        torch.broadcast_shapes(mask.shape, keep.shape)
                    except RuntimeError:
                        raise ValueError(f"mask must broadcast to [B, H, L, L_keys] = [{B}, {self.num_heads}, {L}, "
                                         f"{keep.shape[-1]}] (L_keys: the cached tokens), got "
                                         f"{list(mask.shape)}") from None
                mask = keep if mask is None else mask & keep
                causal_arg, window_arg = False, None
            else:
                causal_arg, window_arg = causal or window is not None, window

            if self.sinks is not None:
                sk, sv = self._sink_kv(B)
                k = torch.cat([sk.to(k.dtype), k], dim=2)
                v = torch.cat([sv.to(v.dtype), v], dim=2)
                pad = (num_sinks, 0)
                if attn_bias is not None:
                    attn_bias = nn.functional.pad(attn_bias, pad, value=0.0)
                if mask is not None:
                    mask = nn.functional.pad(mask, pad, value=True)
                if window_arg is not None:
                    # Bottom-right alignment already lets every causal query see the sinks;
                    # a window would hide them, so the window moves into a mask_mod.
                    off = k.shape[2] - L
                    kw["mask_mod"] = _sink_window_mod(num_sinks, off, window_arg)
                    window_arg = None
            out = self._attend(q, k, v, mask=mask, bias=attn_bias, causal=causal_arg, window=window_arg, **kw)
        except BaseException:
            if wrote and not torch.compiler.is_compiling():  # (compiled appends keep no undo record)
                kv_cache.rollback()
            raise
        out = out.transpose(1, 2).reshape(B, L, self.config.d_model)
        return self.o_proj(out)

    def new_kv_cache(self, batch_size: int, max_len: int, *, dtype=None, device=None) -> KVCache:
        """A KVCache shaped for this layer."""
        p = self.q_proj.weight
        return KVCache(batch_size, self.num_kv_heads, max_len, self.head_dim,
                       dtype=dtype or p.dtype, device=device or p.device)

    def new_paged_kv_cache(self, num_blocks: int, block_size: int = 16, *, dtype=None, device=None,
                           allocation_order=None) -> PagedKVCache:
        """A PagedKVCache shaped for this layer (add sequences, `bind` a batch, then decode)."""
        p = self.q_proj.weight
        return PagedKVCache(num_blocks, self.num_kv_heads, self.head_dim, block_size,
                            dtype=dtype or p.dtype, device=device or p.device, allocation_order=allocation_order)


def _positional_score_mod(user: Callable, start: Tensor | None, num_sinks: int) -> Callable:
    """The config's score_mod on positions in the sequence: q_idx is the query's position
    (+ start[b] when decoding with a cache, whose new queries the contract numbers from 0) and
    kv_idx the key token's (- num_sinks: the sink slots come first; their scores are left as they
    are). So a position-dependent mod (ALiBi) gives the same scores cached as recomputed."""
    if start is None and not num_sinks:
        return user

    def score_mod(score, b, h, q_idx, kv_idx):
        qi = q_idx if start is None else q_idx + start[b]
        if not num_sinks:
            return user(score, b, h, qi, kv_idx)
        token = user(score, b, h, qi, torch.clamp(kv_idx - num_sinks, min=0))
        return torch.where(kv_idx < num_sinks, score, token)

    return score_mod


@functools.lru_cache(maxsize=64)
def _sink_window_mod(num_sinks: int, offset: int, window: int):
    """One function object per geometry, so FlexAttention's BlockMask cache hits across calls."""

    def mask_mod(b, h, q_idx, kv_idx):
        recent = (kv_idx <= q_idx + offset) & (kv_idx > q_idx + offset - window)
        return (kv_idx < num_sinks) | recent

    return mask_mod
