"""The validated, normalised form of one call of the contract.

`attnkit.attention(...)` turns its arguments into an :class:`AttentionRequest`
once; backends and the dispatcher only ever read this object, so every check
lives here and nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ._checks import describe as _what, probability, real
from .groups import GroupMask

__all__ = ["AttentionRequest", "build_request", "replay_key", "check_cache_values", "check_stats",
           "SUPPORTED_DTYPES", "DECODE_MAX_LQ"]

# float64 is accepted so that the reference (and gradcheck) can run in double.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Calls with at most this many queries per sequence (and nothing that needs the full kernel)
# are "decode-shaped": the triton backend runs its split-KV decode kernel on them.
DECODE_MAX_LQ = 16
# Features a decode-shaped call must not need (the decode kernel is forward-only and reads no
# mask, bias or mod; everything else of the contract it honours).
_NOT_DECODE = frozenset({"mask", "bias", "bias_grad", "score_mod", "mask_mod", "group_mask", "dropout", "backward"})
# A causal chunk of queries against more keys (Lq < Lk: a prefill chunk, speculative tokens) with at least
# this many query rows (B x Hq x Lq) is "wide": about one 128-row program per SM of an H100 (128 programs on
# its 132 SMs) without splitting the keys (the triton backend's rule for such calls: backends/triton.py).
WIDE_CHUNK_ROWS = 16384
# On the CPU, a window or mask_mod over more than this many (query, key) pairs is "a big built mask":
# sdpa would build its [Lq, Lk] mask (L = 12288, window 64: 729 MiB peak against chunked's 91 MiB,
# torch 2.13), so `auto` takes chunked (backends/sdpa.py).
CPU_BUILT_MASK_PAIRS = 1 << 24

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(eq=False)
class AttentionRequest:
    """One attention call, checked. Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv].

    With a `block_table` [B, max_blocks], k/v are a block pool [num_blocks, Hkv, block_size, D|Dv]
    and the logical key length `len_k` is max_blocks * block_size. With `cache_seqlens` [B],
    sequence b's keys are 0..cache_seqlens[b]-1 and causal/window are aligned per sequence
    (query i sits at key position cache_seqlens[b] - Lq + i); `offset` and `key_bounds` then
    describe the logical layout only, so backends other than the decode kernel run
    `densified()`, the equivalent plain request.

    Treat as read-only. (Not a frozen dataclass: frozen __init__ costs ~10 us
    per call, and this object is built on every attention call.)
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None  # bool, viewed as 4-D, broadcastable to [B, Hq, Lq, Lk]
    bias: Tensor | None  # float, viewed as 4-D, broadcastable to [B, Hq, Lq, Lk]
    causal: bool
    # (left, right) key offsets around the aligned diagonal; None = unbounded side.
    window: tuple[int | None, int | None] | None
    scale: float
    softcap: float | None
    score_mod: ScoreMod | None
    mask_mod: MaskMod | None
    sinks: Tensor | None  # [Hq]
    dropout_p: float
    return_lse: bool
    cache_seqlens: Tensor | None = None  # int32/int64 [B] on q's device: valid keys per sequence
    block_table: Tensor | None = None  # int32 [B, max_blocks]: k/v are then a block pool
    # A call of `attention_backward`: gradients of q, k, v are wanted whatever requires_grad says
    # (feature 'backward'); a bias is a constant there (no 'bias_grad': its gradient is not returned).
    for_backward: bool = False
    # Derived once in __post_init__ (plain attributes: cheap, and traceable by torch.compile).
    needs_grad: bool = field(init=False)
    # score_mod reads a tensor requiring grad from where masks.closure_tensors cannot find it (a global):
    # only backends that differentiate the mod with plain autograd can give it its gradient.
    mod_grad_elsewhere: bool = field(init=False)
    # The tensors requiring grad the score_mod closes over (masks.closure_tensors), when the request
    # scanned them (a grad-enabled forward outside torch.compile); None otherwise.
    mod_grad_tensors: list | None = field(init=False)
    _features: frozenset = field(init=False)
    # At most DECODE_MAX_LQ queries and no feature the split-KV decode kernel lacks (mask, bias,
    # mods, dropout, gradients): what the triton backend decodes in place.
    decode_shaped: bool = field(init=False)
    wide_chunk: bool = field(init=False)  # see WIDE_CHUNK_ROWS
    big_built_mask: bool = field(init=False)  # see CPU_BUILT_MASK_PAIRS
    signature: tuple = field(init=False)

    def __post_init__(self) -> None:
        # Runs on every attention call: plain locals, no properties.
        q, v, bias, sinks, mod = self.q, self.v, self.bias, self.sinks, self.score_mod
        grad_on = torch.is_grad_enabled()
        inputs_grad = (q.requires_grad or self.k.requires_grad or v.requires_grad
                       or (bias is not None and bias.requires_grad) or (sinks is not None and sinks.requires_grad))
        tensors, elsewhere = None, False
        if mod is not None and grad_on and not self.for_backward:
            if torch.compiler.is_compiling():
                # In a trace neither the closure scan nor the probe can run (dynamo fails on both), and
                # the chunked backend's Function loses a mod's captured gradients there: count it.
                elsewhere = True
            else:
                from .masks import closure_tensors, grad_outside_closure  # masks imports this module

                tensors = closure_tensors(mod, requires_grad=True)
                elsewhere = grad_outside_closure(self, tensors)
        self.mod_grad_tensors, self.mod_grad_elsewhere = tensors, elsewhere
        self.needs_grad = self.for_backward or grad_on and (inputs_grad or bool(tensors) or elsewhere)
        self._features = f = self._compute_features()
        qs = q.shape
        self.decode_shaped = qs[2] <= DECODE_MAX_LQ and f.isdisjoint(_NOT_DECODE)
        # Everything backend choice may depend on; the dispatcher caches its choice per signature.
        # for_backward too: a backend may take attention_backward's request but not a forward whose
        # outputs (lse included) are differentiated (sdpa's lse on CUDA), and both carry 'backward'.
        self.wide_chunk = (self.causal and self.cache_seqlens is None and qs[2] < self.k.shape[2]
                           and qs[0] * qs[1] * qs[2] >= WIDE_CHUNK_ROWS)
        self.big_built_mask = (q.device.type == "cpu" and ("window" in f or "mask_mod" in f)
                               and qs[2] * self.len_k > CPU_BUILT_MASK_PAIRS)
        # The user's sdpa_kernel(...) settings decide which of SDPA's lse kernels exist (sdpa's CUDA lse path):
        # a choice made inside such a context must not outlive it, nor one made outside enter it.
        sdp = None
        if (self.return_lse or self.for_backward) and q.device.type == "cuda":
            cuda = torch.backends.cuda
            sdp = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled())
        # One query or more: decode steps over plain K/V tensors go to the decode kernel only with more.
        self.signature = (q.device.type, q.dtype, qs[3], v.shape[3], f, self.decode_shaped, self.for_backward,
                          self.wide_chunk, qs[2] == 1, self.big_built_mask, sdp)

    # --- shapes -----------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads_q(self) -> int:
        return self.q.shape[1]

    @property
    def heads_kv(self) -> int:
        return self.k.shape[1]

    @property
    def len_q(self) -> int:
        return self.q.shape[2]

    @property
    def len_k(self) -> int:
        """Key length of the logical layout (max_blocks * block_size for a paged cache)."""
        if self.block_table is not None:
            return self.block_table.shape[1] * self.k.shape[2]
        return self.k.shape[2]

    @property
    def block_size(self) -> int | None:
        """Tokens per block of a paged k/v pool, None when k/v are contiguous."""
        return self.k.shape[2] if self.block_table is not None else None

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def head_dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def offset(self) -> int:
        """Diagonal shift of bottom-right alignment: query i lines up with key i + offset.

        With cache_seqlens the shift is per sequence (cache_seqlens[b] - Lq); this is the
        logical layout's, which `densified()` folds into a mask.
        """
        return self.len_k - self.len_q

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def key_bounds(self) -> tuple[int | None, int | None] | None:
        """Combined causal/window limits as (left, right) around the aligned diagonal.

        Query i may see key j iff i + offset - left <= j <= i + offset + right
        (a None side is unbounded). None when neither causal nor window is set.
        """
        return combined_bounds(self.causal, self.window)

    def features(self) -> frozenset[str]:
        """Names of the capabilities this call needs (matched against Capabilities.features)."""
        return self._features

    def _compute_features(self) -> frozenset[str]:
        f: set[str] = set()
        if self.mask is not None:
            f.add("mask")
        if self.bias is not None:
            f.add("bias")
            if self.needs_grad and self.bias.requires_grad and not self.for_backward:
                f.add("bias_grad")
        if self.causal:
            f.add("causal")
        if self.window is not None:
            f.add("window")
        if self.softcap is not None:
            f.add("softcap")
        if self.score_mod is not None:
            f.add("score_mod")
            if self.mod_grad_elsewhere:
                f.add("score_mod_grad_elsewhere")
        if self.mask_mod is not None:
            # A GroupMask is a mask_mod whose structure a kernel can read (see groups.py).
            f.add("group_mask" if isinstance(self.mask_mod, GroupMask) else "mask_mod")
        if self.sinks is not None:
            f.add("sinks")
        if self.dropout_p > 0:
            f.add("dropout")
        if self.return_lse:
            f.add("return_lse")
        qs, ks, vs = self.q.shape, self.k.shape, self.v.shape
        if qs[1] != ks[1]:
            f.add("gqa")
        if vs[3] != qs[3]:
            f.add("value_head_dim")
        if self.needs_grad:
            f.add("backward")
        if self.cache_seqlens is not None:
            f.add("kv_lengths")
        if self.block_table is not None:
            f.add("paged")
        return frozenset(f)

    def describe(self) -> str:
        feats = ", ".join(sorted(self.features())) or "dense"
        paged = ""
        if self.block_table is not None:
            paged = f" block_table {list(self.block_table.shape)} (block size {self.block_size})"
        return (
            f"q {list(self.q.shape)} k {list(self.k.shape)} v {list(self.v.shape)}{paged} "
            f"{str(self.dtype).replace('torch.', '')} on {self.device.type}; features: {feats}"
        )

    def densified(self) -> "AttentionRequest":
        """The equivalent plain request: no cache_seqlens, no block_table.

        A paged k/v pool is gathered into contiguous [B, Hkv, len_k, D] tensors (table
        entries past a sequence's last used block are clamped into range); the per-sequence
        lengths and the per-sequence causal/window bounds become a bool mask [B, 1, Lq, len_k]
        (and-ed with the user's mask); causal=False, window=None. Keys and values past each
        sequence's length are zeros in the result: a cache's unwritten slots may hold anything
        (torch.empty), and a masked NaN still reaches p @ v and ds @ k as 0 * NaN. That costs a
        copy of a contiguous cache (a paged one is zeroed in its gathered copy). The backends
        that do not read the cache in place call this first. Returns self when there is nothing
        to fold.
        """
        if self.cache_seqlens is None:
            return self
        Lq, Lk = self.len_q, self.len_k
        lens = self.cache_seqlens.long().view(-1, 1, 1, 1)
        j = torch.arange(Lk, device=self.device).view(1, 1, 1, Lk)
        keep = j < lens  # [B, 1, 1, Lk]
        unwritten = ~keep.transpose(2, 3)  # [B, 1, Lk, 1]: the key rows of k and v
        if self.block_table is not None:
            k = _gather_pages(self.k, self.block_table).masked_fill_(unwritten, 0)
            v = _gather_pages(self.v, self.block_table).masked_fill_(unwritten, 0)
        else:
            k, v = self.k.masked_fill(unwritten, 0), self.v.masked_fill(unwritten, 0)
        bounds = self.key_bounds
        if bounds is not None:
            qpos = lens - Lq + torch.arange(Lq, device=self.device).view(1, 1, Lq, 1)
            left, right = bounds
            if left is not None:
                keep = keep & (j >= qpos - left)
            if right is not None:
                keep = keep & (j <= qpos + right)
        else:
            keep = keep.expand(-1, -1, Lq, -1)
        mask = keep if self.mask is None else keep & self.mask
        return AttentionRequest(
            q=self.q, k=k, v=v, mask=mask, bias=self.bias, causal=False, window=None, scale=self.scale,
            softcap=self.softcap, score_mod=self.score_mod, mask_mod=self.mask_mod, sinks=self.sinks,
            dropout_p=self.dropout_p, return_lse=self.return_lse, for_backward=self.for_backward,
        )


def _gather_pages(pool: Tensor, block_table: Tensor) -> Tensor:
    """[num_blocks, H, block_size, D] pool + [B, max_blocks] table -> [B, H, max_blocks * block_size, D]."""
    B, nb = block_table.shape
    _, H, bs, D = pool.shape
    idx = block_table.long().clamp(0, pool.shape[0] - 1)  # unused entries (-1 padding): any block, masked
    return pool[idx].permute(0, 2, 1, 3, 4).reshape(B, H, nb * bs, D)


def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def _as_4d(name: str, t: Tensor, target: tuple[int, int, int, int]) -> Tensor:
    """View t (rank <= 4) as 4-D by adding leading dims; check it broadcasts to target."""
    if t.dim() > 4 or t.dim() == 0:
        raise ValueError(
            f"{name} must have 1 to 4 dims broadcastable to [B, Hq, Lq, Lk] = {list(target)}, "
            f"got shape {_shape(t)}"
        )
    t4 = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t
    for size, want in zip(t4.shape, target):
        if size != 1 and size != want:
            raise ValueError(
                f"{name} of shape {_shape(t)} does not broadcast to [B, Hq, Lq, Lk] = {list(target)}"
            )
    return t4


def combined_bounds(causal: bool, window: tuple[int | None, int | None] | None
                    ) -> tuple[int | None, int | None] | None:
    """causal and a normalised window (check_window) as one (left, right) key range around the
    aligned diagonal (a None side unbounded); None when neither is set."""
    if window is None and not causal:
        return None
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def check_window(window, reach: int) -> tuple[int | None, int | None] | None:
    """(left, right) from an int W or a pair; a side of at least reach = Lq + Lk keys excludes
    nothing, so it becomes None (unbounded): the kernels' int32 and int64 index arithmetic never
    sees offsets larger than the lengths."""
    if window is None:
        return None
    if isinstance(window, bool):
        raise TypeError(f"window must be an int >= 1 or a (left, right) pair, got bool {window}")
    if isinstance(window, int):
        if window < 1:
            raise ValueError(f"window must be >= 1 (the query itself counts), got {window}")
        return (window - 1 if window - 1 < reach else None, 0)
    if isinstance(window, (tuple, list)) and len(window) == 2:
        out = []
        for side, w in zip(("left", "right"), window):
            if w is None or (isinstance(w, int) and not isinstance(w, bool) and w == -1):
                out.append(None)  # flash-attn writes an unbounded side as -1
            elif isinstance(w, int) and not isinstance(w, bool) and w >= 0:
                out.append(w if w < reach else None)
            else:
                raise ValueError(
                    f"window {side} must be an int >= 0, or -1/None for unbounded, got {w!r}"
                )
        if out[0] is None and out[1] is None:
            return None  # unbounded on both sides: no window at all
        return (out[0], out[1])
    raise TypeError(f"window must be an int >= 1 or a (left, right) pair, got {window!r}")


def build_request(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    window=None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    cache_seqlens: Tensor | int | None = None,
    block_table: Tensor | None = None,
    for_backward: bool = False,
    global_len: int | None = None,
) -> AttentionRequest:
    """Check every argument of the contract and return the normalised request.

    for_backward=True builds the request of an `attention_backward` call (see AttentionRequest).
    A window side of Lq + Lk keys or more excludes nothing and becomes None. global_len: context
    parallelism's call, q/k/v being shards of a sequence of global_len tokens on which windows and
    mask_mods act: windows are normalised on it, and a GroupMask's lengths are not the shards'.

    Shapes, dtypes and devices are always checked. The *values* of cache_seqlens and
    block_table (lengths within the logical key length, block ids within the pool) are
    checked only when they live on the CPU: on a GPU reading them would synchronise every
    decode step, so there they are the caller's promise (PagedKVCache builds valid ones).
    """
    # Runs on every call (every decode step): the common case in few Python operations, the
    # message built only on failure.
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        name, t = next((n, t) for n, t in (("q", q), ("k", k), ("v", v)) if not isinstance(t, Tensor))
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        bad, t = next((n, t) for n, t in (("q", q), ("k", k), ("v", v)) if t.dim() != 4)
        raise ValueError(f"{bad} must be 4-D [B, H, L, D] (heads already split), got shape {_shape(t)}")
    dtype = q.dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"q has dtype {dtype}; expected one of float32, float16, bfloat16 (float64 for references)"
        )
    if k.dtype != dtype or v.dtype != dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    device = q.device
    if k.device != device or v.device != device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, Hq, Lq, D = qs
    paged = block_table is not None
    if paged:
        if ks[0] != vs[0]:
            raise ValueError(
                f"paged k and v must hold the same number of blocks (dim 0), got k {_shape(k)}, v {_shape(v)}"
            )
        if ks[2] != vs[2]:
            raise ValueError(
                f"paged k and v must have the same block size (dim 2), got k {_shape(k)}, v {_shape(v)}"
            )
    elif ks[0] != B or vs[0] != B:
        raise ValueError(
            f"batch mismatch: q {_shape(q)}, k {_shape(k)}, v {_shape(v)} (dim 0 must agree)"
        )
    if ks[1] != vs[1]:
        raise ValueError(f"k and v must have the same number of heads, got k {_shape(k)}, v {_shape(v)}")
    if ks[2] != vs[2]:
        raise ValueError(f"k and v must have the same length, got k {_shape(k)}, v {_shape(v)}")
    if ks[3] != D:
        raise ValueError(f"q and k must have the same head dim, got q {_shape(q)}, k {_shape(k)}")
    Hkv = ks[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (GQA/MQA), got Hq={Hq}, Hkv={Hkv}"
        )
    if min(B, Hq, Lq, D) == 0 or ks[2] == 0 or vs[3] == 0:
        raise ValueError(f"empty input: q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    Lk = ks[2]
    if paged:
        Lk = _check_block_table(block_table, cache_seqlens, k, B, device)
    cache_seqlens = _check_cache_seqlens(cache_seqlens, B, Lk, device)
    if cache_seqlens is not None and device.type == "cpu":  # values: only where reading them costs no device sync
        check_cache_values(k, cache_seqlens, block_table)
    target = (B, Hq, Lq, Lk)

    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(
                f"mask must be bool (True = attend), got dtype {mask.dtype}; pass float masks as bias="
            )
        if mask.device != device:
            raise ValueError(f"mask is on {mask.device} but q is on {device}")
        mask = _as_4d("mask", mask, target)
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a floating torch.Tensor, got {type(bias).__name__}")
        if bias.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"bias must be a floating tensor (additive logits) of dtype float16, bfloat16, float32 "
                            f"or float64, got dtype {bias.dtype}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but q is on {device}")
        bias = _as_4d("bias", bias, target)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {_what(causal)}")
    win = check_window(window, Lq + Lk if global_len is None else 2 * global_len)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    elif not (math.isfinite(real("scale", scale)) and scale > 0):
        raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
    if softcap is not None:
        softcap = real("softcap", softcap)
        if not 0 < softcap < math.inf:
            raise ValueError(f"softcap must be a finite float > 0 or None, got {softcap!r}")
    if score_mod is not None or mask_mod is not None:
        for name, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        lay = mask_mod.layout if isinstance(mask_mod, GroupMask) else None
        if lay is not None and mask_mod.allowed.device != device:
            raise ValueError(f"mask_mod is a GroupMask with its tables on {mask_mod.allowed.device} but q is on "
                             f"{device}; build it with GroupMask(layout, device=q.device)")
        if lay is not None and global_len is None and (lay.len_q, lay.len_k) != (Lq, Lk):
            raise ValueError(f"mask_mod is a GroupMask for Lq={lay.len_q}, Lk={lay.len_k}; q/k have Lq={Lq}, "
                             f"Lk={Lk}")
    if sinks is not None:
        if not isinstance(sinks, Tensor) or not sinks.is_floating_point():
            raise TypeError(f"sinks must be a floating tensor of shape [Hq]={[Hq]}, got {sinks!r:.60}")
        if sinks.shape != (Hq,):
            raise ValueError(f"sinks must have shape [Hq] = [{Hq}], got {_shape(sinks)}")
        if sinks.device != device:
            raise ValueError(f"sinks is on {sinks.device} but q is on {device}")
    if dropout_p.__class__ is not float or dropout_p != 0.0:  # the default passes as it is
        dropout_p = probability("dropout_p", dropout_p)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {_what(return_lse)}")
    return AttentionRequest(
        q=q, k=k, v=v, mask=mask, bias=bias, causal=causal, window=win, scale=float(scale),
        softcap=softcap, score_mod=score_mod, mask_mod=mask_mod, sinks=sinks,
        dropout_p=dropout_p, return_lse=return_lse, cache_seqlens=cache_seqlens,
        block_table=block_table, for_backward=for_backward,
    )


def check_stats(
    req: AttentionRequest, do: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Check the saved statistics of an `attention_backward` call against its request.

    do, out: [B, Hq, Lq, Dv], any floating dtype, on q's device (backends cast them as their kernels
    need). lse, dlse: [B, Hq, Lq]; returned contiguous in the float32 compute dtype (float64 for
    float64 inputs), the layout every backend's kernel reads.
    """
    B, Hq, Lq = req.batch, req.heads_q, req.len_q
    want = {"do": (B, Hq, Lq, req.head_dim_v), "out": (B, Hq, Lq, req.head_dim_v), "lse": (B, Hq, Lq),
            "dlse": (B, Hq, Lq)}
    names = {"do": "[B, Hq, Lq, Dv] (the output's shape)", "out": "[B, Hq, Lq, Dv] (the output's shape)",
             "lse": "[B, Hq, Lq]", "dlse": "[B, Hq, Lq] (lse's shape)"}
    for name, t in (("do", do), ("out", out), ("lse", lse), ("dlse", dlse)):
        if t is None and name == "dlse":
            continue
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor of shape {names[name]} = "
                            f"{list(want[name])}, got {_what(t)}")
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{name} must have shape {names[name]} = {list(want[name])}, got {_shape(t)} "
                             f"(q {_shape(req.q)}, v {_shape(req.v)})")
        if t.device != req.device:
            raise ValueError(f"{name} is on {t.device} but q is on {req.device}")
    ct = torch.float64 if req.dtype == torch.float64 else torch.float32
    lse = lse.to(ct).contiguous()
    dlse = dlse.to(ct).contiguous() if dlse is not None else None
    return do, out, lse, dlse


def _check_block_table(block_table, cache_seqlens, k: Tensor, B: int, device: torch.device) -> int:
    """Check a paged call's block table against the pool k; return the logical key length."""
    if cache_seqlens is None:
        raise ValueError("block_table needs cache_seqlens (the number of valid tokens of each sequence), got None")
    if not isinstance(block_table, Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise TypeError(f"block_table must be an int32 tensor [B, max_blocks], got {_what(block_table)}")
    if block_table.shape[0] != B:
        raise ValueError(f"block_table must have B = {B} rows (q's batch), got shape {_shape(block_table)}")
    if block_table.shape[1] == 0:
        raise ValueError(f"block_table must have at least one column, got shape {_shape(block_table)}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {device}")
    if k.shape[0] == 0:
        raise ValueError(f"paged k/v must hold at least one block (dim 0 of [num_blocks, Hkv, block_size, D]), "
                         f"got k {_shape(k)}")
    bs = k.shape[2]
    if bs & (bs - 1):
        raise ValueError(
            f"paged k/v must have a power-of-two block size (dim 2 of [num_blocks, Hkv, block_size, D]), "
            f"got k {_shape(k)}"
        )
    return block_table.shape[1] * bs


def _check_block_ids(block_table: Tensor, cache_seqlens: Tensor, num_blocks: int, bs: int) -> None:
    """Every entry a sequence reads (the first ceil(length / block_size)) is a block of the pool."""
    lens = cache_seqlens.long()
    used = torch.arange(block_table.shape[1]).view(1, -1) < ((lens + bs - 1) // bs).view(-1, 1)
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bad.any():
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"block_table[{b}, {j}] = {int(block_table[b, j])} is not a block of the pool "
            f"(k holds {num_blocks} blocks: ids 0..{num_blocks - 1}); sequence {b} has "
            f"{int(lens[b])} tokens, so its first {int((lens[b] + bs - 1) // bs)} entries are read"
        )


def _check_seqlen_values(lens: Tensor, Lk: int) -> None:
    """Lengths (a CPU tensor) must lie in [0, Lk]."""
    if lens.min() < 0 or lens.max() > Lk:
        shown = lens.tolist()
        shown = shown if len(shown) <= 16 else shown[:16] + ["..."]
        raise ValueError(f"cache_seqlens must lie in [0, {Lk}] (the logical key length), got {shown}")


def _check_cache_seqlens(cache_seqlens, B: int, Lk: int, device: torch.device) -> Tensor | None:
    """cache_seqlens as an int tensor [B] on q's device (an int: the same length for every sequence)."""
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        _check_seqlen_values(torch.tensor([cache_seqlens]), Lk)
        return torch.full((B,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"cache_seqlens must be an int32/int64 tensor [B] = [{B}] or an int, got {_what(cache_seqlens)}"
        )
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must have shape [B] = [{B}], got {_shape(cache_seqlens)}")
    if cache_seqlens.device != device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {device}")
    return cache_seqlens


def check_cache_values(k: Tensor, cache_seqlens: Tensor, block_table: Tensor | None) -> None:
    """The values of a CPU call's cache_seqlens (within the logical key length) and block table (every
    entry a sequence reads is a block of the pool k); their shapes are checked already."""
    bs = k.shape[2]
    _check_seqlen_values(cache_seqlens, bs if block_table is None else block_table.shape[1] * bs)
    if block_table is not None:
        _check_block_ids(block_table, cache_seqlens, k.shape[0], bs)


_OPT_NUM = (type(None), int, float)  # exact classes: bool, numpy scalars and the like are not keyed
_OPT_INT = (type(None), int)


def replay_key(q, k, v, causal, window, scale, softcap, sinks, dropout_p, return_lse, cache_seqlens,
               block_table) -> tuple | None:
    """For a call against a cache with no mask, bias, score_mod or mask_mod (the caller checks those;
    a decode step), a key of everything build_request reads to check and normalise it: each
    tensor's class, shape, dtype and device, the scalars by value and exact class. Two calls with
    equal keys pass or fail its checks alike and normalise alike, the values of CPU tensors aside
    (check_cache_values), and run alike but for the tensors' data and strides. None for a call with
    anything the key would not capture exactly (a tensor subclass, an int cache_seqlens, a list
    window, a numpy scalar or a bool where a number belongs, a gradient to record): it takes the
    full path."""
    T = Tensor
    if not (q.__class__ is T and k.__class__ is T and v.__class__ is T and cache_seqlens.__class__ is T
            and (block_table is None or block_table.__class__ is T) and (sinks is None or sinks.__class__ is T)
            and causal.__class__ is bool and return_lse.__class__ is bool
            and scale.__class__ in _OPT_NUM and softcap.__class__ in _OPT_NUM
            and dropout_p.__class__ in _OPT_NUM and dropout_p == 0):
        return None
    if window is not None and window.__class__ is not int and not (
            window.__class__ is tuple and len(window) == 2
            and window[0].__class__ in _OPT_INT and window[1].__class__ in _OPT_INT):
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (sinks is not None and sinks.requires_grad)):
        return None
    return (q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device,
            cache_seqlens.shape, cache_seqlens.dtype, cache_seqlens.device,
            None if block_table is None else (block_table.shape, block_table.dtype, block_table.device),
            None if sinks is None else (sinks.shape, sinks.dtype, sinks.device),
            causal, window, scale, softcap, return_lse)
