"""`flex`: torch FlexAttention, compiled, with the contract's features written as mods.

- bias -> a score_mod that reads the bias in place (broadcast dims indexed at 0,
  so its gradient has the bias's own shape, never [B, H, Lq, Lk]);
- softcap -> tanh score_mod; the user's score_mod runs last;
- bool mask, causal/window (bottom-right aligned) and the user's mask_mod ->
  one mask_mod, turned into a BlockMask that is cached per
  (mask_mod, the contents of every tensor it closes over, bounds, mask tensor,
  shape, device); a tensor a mask_mod reads from a global is not tracked, so
  change such a tensor only together with the function;
- cache_seqlens / block_table -> `AttentionRequest.densified()`: the paged cache
  gathered, lengths and per-sequence alignment as a bool mask (a new BlockMask per call);
- sinks -> the kernel's log-sum-exp: out * sigmoid(lse - sink), which needs
  the gradient through lse that compiled FlexAttention provides on CUDA.
On the CPU, compiled FlexAttention is inference-only and returns no lse.

Inductor may fail to build a variant (a tile that needs more shared memory than the GPU has):
that is one of `build_errors`, and `auto` then runs the next backend. Inductor builds the
backward only when autograd first reaches it, after the forward returned; so the first training
call of each kernel variant (shapes, mods, layouts: `_variant`) builds it at once, on a detached
copy of the inputs (`run`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .._bounded import put, touch
from ..masks import bounds_allow, closure_scalars, closure_tensors, index_grid, mask_mod_result
from ..ops._launch import OUT_OF_RESOURCES
from ..request import AttentionRequest
from .base import Backend, Capabilities

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch < 2.5 is below our floor
    create_block_mask = flex_attention = None

_CUDA_FEATURES = frozenset(
    {"mask", "bias", "bias_grad", "causal", "window", "softcap", "score_mod", "mask_mod", "group_mask", "sinks",
     "return_lse", "gqa", "value_head_dim", "backward", "kv_lengths", "paged"}
)
_CPU_FEATURES = frozenset(
    {"mask", "bias", "causal", "window", "softcap", "score_mod", "mask_mod", "group_mask", "gqa",
     "value_head_dim", "kv_lengths", "paged"}
)
_BLOCK_MASK_CACHE_SIZE = 32
# The entries keep their mask tensors alive (a BlockMask's mask_mod reads the user's mask): past this many
# bytes of them the oldest go, so that a new [B, H, L, L] mask per call holds at most about this much.
_BLOCK_MASK_CACHE_BYTES = 1 << 30
_BUILT_CACHE_SIZE = 1024
_compiled = None


def _kernel_options(req: AttentionRequest) -> dict | None:
    """Tiles for compiled FlexAttention where its defaults were measured slow or failed to build.

    H100, torch 2.11, bf16, B16 x H16 x L1024, 2026-11-24 (docs/benchmarks.md, "FlexAttention's own tiles
    at D = 64"): at D = 64 its default forward ran 1.05-23x slower than 64 x 64 tiles on eight of nine
    mask / bias kinds (a key mask [B, 1, 1, L]: 6.02 against 0.26 ms), and the ninth, a bias beside a key
    mask, did not build (out of shared memory). Forward+backward: 64 x 64 won with a key mask (6.89
    against 1.11 ms) and lost up to 1.54x with a causal mask and a bias, so training keeps the defaults
    unless a mask tensor is read. At D = 40 and 56 the two were within 7% of each other on the same rows
    (its defaults built every one), D <= 32 was mixed and at D = 128 64 x 64 was slower forward on every
    row: those keep the defaults."""
    d = max(req.head_dim, req.head_dim_v)
    half = req.dtype in (torch.float16, torch.bfloat16)  # float32 was not measured: its defaults stay
    if req.device.type == "cuda" and half and d == 64 and (not req.needs_grad or req.mask is not None):
        return {"BLOCK_M": 64, "BLOCK_N": 64}
    return None


def _eager_flex(*args, **kwargs):
    """flex_attention uncompiled (the CPU path), without torch's warning that it is unfused."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(*args, **kwargs)


def _compiled_flex():
    global _compiled
    if _compiled is None:
        # Each new shape/mod is a recompile; torch's default limit of 8 would
        # silently drop to the unfused eager path in a long-running process. The limit is one setting
        # of the process (the user's own torch.compile'd functions get it too; README, "flex"): scoping
        # it to each call cost ~4 us of host time per call (torch 2.13, CPU).
        cfg = torch._dynamo.config
        name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, name, max(getattr(cfg, name), 64))
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _variant(req: AttentionRequest, kwargs: dict) -> tuple:
    """What Inductor compiles a new FlexAttention kernel pair for (compiled with dynamic=False): shapes and
    strides, the mods' code, the bias's and mask's layout, the scale and the kernel options."""
    def code(f):
        return getattr(f, "__code__", type(f)) if f is not None else None

    def layout(t):
        return (tuple(t.shape), t.stride()) if t is not None else None

    return (req.signature, layout(req.q), layout(req.k), layout(req.v), layout(req.bias), layout(req.mask),
            code(req.score_mod), code(req.mask_mod), req.causal, req.window, req.softcap, req.scale,
            tuple(sorted((kwargs["kernel_options"] or {}).items())))


def _can_build_backward_now() -> bool:
    """Inside torch.func transforms or where saved-tensor hooks are disabled, the extra graph cannot be made."""
    functorch = getattr(torch._C, "_functorch", None)
    if functorch is not None and hasattr(functorch, "peek_interpreter_stack"):
        if functorch.peek_interpreter_stack() is not None:
            return False
    hooks_on = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    return hooks_on is None or hooks_on()


def _build_backward(fn, req: AttentionRequest, kwargs: dict) -> bool:
    """Run fn forward and backward once on detached copies of q, k, v, so that Inductor builds the
    backward now: a failure then raises inside `run`, where the dispatcher can still pass the call to
    another backend, and not inside autograd after the forward returned. Same shapes, strides and
    requires_grad as the call, so the call reuses both builds. Tensors the mods read (the bias) are
    the call's own: torch.autograd.grad returns their gradients instead of accumulating them, and stops
    at them. Under identity saved-tensor hooks: a caller's activation checkpointing must not see this
    graph. False when nothing was built (nothing flex differentiates requires grad, or no graph can be
    made here): the backward then builds when autograd reaches it."""
    if not _can_build_backward_now():
        return False
    q, k, v = (t.detach().requires_grad_(t.requires_grad) for t in (req.q, req.k, req.v))
    read = (req.bias, *(req.mod_grad_tensors or ()))  # sinks join after the kernel: not flex's to build
    wrt = [t for t in (q, k, v) if t.requires_grad] + [t for t in read if t is not None and t.requires_grad]
    if not wrt:
        return False
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        res = fn(q, k, v, **kwargs)
        out = res[0] if isinstance(res, tuple) else res
        torch.autograd.grad(out, wrt, torch.ones_like(out))
    return True


def _pick(idx, size: int):
    """Index a broadcast dim: 0 where the tensor has size 1 there."""
    return idx if size != 1 else 0


def _score_mod(req: AttentionRequest):
    bias, softcap, user = req.bias, req.softcap, req.score_mod
    if bias is None and softcap is None and user is None:
        return None
    shape = tuple(bias.shape) if bias is not None else None

    def score_mod(score, b, h, q_idx, kv_idx):
        if bias is not None:
            score = score + bias[
                _pick(b, shape[0]), _pick(h, shape[1]), _pick(q_idx, shape[2]), _pick(kv_idx, shape[3])
            ]
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if user is not None:
            score = user(score, b, h, q_idx, kv_idx)
        return score

    return score_mod


def _tensor_id(t: Tensor) -> tuple:
    """Identity of a tensor's contents: storage, view and in-place version."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)


def _mask_key(req: AttentionRequest) -> tuple[tuple, list[Tensor]]:
    """Cache key of req's BlockMask, and the tensors it depends on (kept alive with the entry).

    The user's mask_mod is keyed by identity AND by its state: the contents of every tensor and
    the value of every int / float / str it closes over (closure cells, default arguments, a
    callable object's attributes: masks.closure_tensors), so a document-id tensor changed in place, or a length
    attribute set anew, builds a new mask. (Globals it reads are not tracked.) The key is None when a
    tensor is an inference tensor (made under torch.inference_mode): it has no version counter, so a
    change in place could not be seen, and its mask is built anew every call.
    """
    deps = [req.mask] if req.mask is not None else []
    state = ()
    if req.mask_mod is not None:
        deps += closure_tensors(req.mask_mod)
        state = closure_scalars(req.mask_mod)
    if any(t.is_inference() for t in deps):
        return None, deps
    return (req.key_bounds, req.offset, req.mask_mod, tuple(_tensor_id(t) for t in deps), state), deps


class FlexBackend(Backend):
    name = "flex"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        features=_CUDA_FEATURES,
        features_by_device={"cpu": _CPU_FEATURES},
        # Multiples of 8 up to 128, and 256: on an H100 (torch 2.11, 2026-11-24) each of 24-112 and 256
        # compiled and matched the float64 oracle forward and backward (bf16/fp16/float32; GQA, Dv != D,
        # bias, mods, window, sinks); 160 and 192 ran out of shared memory with a bias or in float32.
        head_dims=frozenset(range(16, 129, 8)) | {256},
        notes="compiled FlexAttention; block masks cached; CPU: uncompiled, inference only, no lse/sinks",
    )
    build_errors = (torch._dynamo.exc.BackendCompilerFailed, *OUT_OF_RESOURCES)  # Inductor's errors subclass it

    def __init__(self) -> None:
        self._block_masks: dict = {}  # the last used BlockMasks, with the tensors their keys name
        self._backward_built: dict = {}  # `_variant`s whose backward run built

    def available(self) -> str | None:
        return None if flex_attention is not None else "torch.nn.attention.flex_attention is missing"

    def speed(self, req: AttentionRequest) -> float:
        if req.device.type != "cuda":
            return 8.0  # uncompiled (materialises the scores); forward only
        if req.window is not None or req.mask_mod is not None or req.bias is not None:
            return 70.0  # block sparsity / bias read in place: ahead of SDPA's dense masks
        if req.mask is not None or req.cache_seqlens is not None:
            # A mask tensor (cache_seqlens become one) usually changes every call (padding, decode steps): its
            # BlockMask is rebuilt each time, and cannot be built inside CUDA-graph capture.
            return 25.0
        return 60.0

    def block_mask(self, req: AttentionRequest):
        """The cached BlockMask of req's mask, causal/window and mask_mod (None if dense)."""
        bounds, mask, user = req.key_bounds, req.mask, req.mask_mod
        if bounds is None and mask is None and user is None:
            return None
        B = req.batch if (user is not None or (mask is not None and mask.shape[0] != 1)) else None
        H = req.heads_q if (user is not None or (mask is not None and mask.shape[1] != 1)) else None
        # Inside torch.compile the mask is built in the graph: a lookup in this
        # process-wide dict would make dynamo guard on (and trace) every cached key.
        compiling = torch.compiler.is_compiling()
        key, deps = (None, None) if compiling else _mask_key(req)
        key = None if key is None else (key, B, H, req.len_q, req.len_k, str(req.device))
        hit = None if key is None else touch(self._block_masks, key)
        if hit is not None:
            return hit[0]
        if user is not None and not compiling:
            # flex's vmap over scalar indices would report a wrong result in its own words (an unpacking
            # error, an assert on the dtype): check it on a [B, Hq, 1, 1] tile as the other backends do
            mask_mod_result(user(*index_grid(req.batch, req.heads_q, 0, 1, 0, 1, req.device)),
                            (req.batch, req.heads_q, 1, 1))
        offset = req.offset
        mshape = tuple(mask.shape) if mask is not None else None

        def mask_mod(b, h, q_idx, kv_idx):
            keep = None
            if bounds is not None:
                keep = bounds_allow(q_idx, kv_idx, offset, *bounds)
            if mask is not None:
                m = mask[_pick(b, mshape[0]), _pick(h, mshape[1]), _pick(q_idx, mshape[2]), _pick(kv_idx, mshape[3])]
                keep = m if keep is None else keep & m
            if user is not None:
                u = user(b, h, q_idx, kv_idx)
                keep = u if keep is None else keep & u
            return keep

        # On CUDA the mask is evaluated block by block (compiled) instead of as one dense
        # [B, H, Lq, Lk] bool, which would not fit for long sequences (112k tokens: 12.5 GB).
        # (Not inside torch.compile: there the whole graph is compiled anyway, and
        # create_block_mask(_compile=True) warns, which breaks fullgraph tracing.)
        bm = create_block_mask(mask_mod, B, H, req.len_q, req.len_k, device=req.device,
                               _compile=req.device.type == "cuda" and not compiling)
        if key is None:
            return bm
        # Keep the key's tensors alive with the entry so their storage cannot be reused
        # by other tensors that would then hit this key.
        # weighed by the user's mask tensor alone: what the cache may keep alive past its caller (a mod's
        # closure tensors, module parameters among them, live anyway)
        size = req.mask.untyped_storage().nbytes() if req.mask is not None else 0
        put(self._block_masks, key, (bm, deps, size), _BLOCK_MASK_CACHE_SIZE, weight=lambda e: e[2],
            budget=_BLOCK_MASK_CACHE_BYTES)
        return bm

    def run(self, req: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        req = req.densified()  # cache_seqlens / block_table -> gathered K/V and a mask
        want_lse = req.return_lse or req.sinks is not None
        # On the CPU flex runs uncompiled: torch 2.13's compiled CPU kernel returns wrong values or NaN
        # on small shapes (B2 x H2 x L8, D = 16 gave NaN), and the CPU path is a reference here anyway.
        # (Inside the caller's torch.compile, flex_attention is compiled with the caller's graph.)
        if torch.compiler.is_compiling():
            fn = flex_attention
        else:
            fn = _compiled_flex() if req.device.type == "cuda" else _eager_flex
        q, k, v = req.q, req.k, req.v
        if not req.needs_grad:  # flex refuses inputs that merely carry requires_grad on the CPU
            q, k, v = q.detach(), k.detach(), v.detach()
        kwargs = dict(
            score_mod=_score_mod(req),
            block_mask=self.block_mask(req),
            scale=req.scale,
            enable_gqa=req.heads_q != req.heads_kv,
            return_lse=want_lse,
            kernel_options=_kernel_options(req),
        )
        if req.needs_grad and fn is _compiled:
            variant = _variant(req, kwargs)
            if variant not in self._backward_built and _build_backward(fn, req, kwargs):
                put(self._backward_built, variant, None, _BUILT_CACHE_SIZE)
        res = fn(q, k, v, **kwargs)
        if not want_lse:
            return res, None
        out, lse = res
        lse = lse.float()
        if req.sinks is not None:
            sink = req.sinks.float().view(1, -1, 1)
            total = torch.logaddexp(lse, sink)
            out = (out.float() * torch.exp(lse - total).unsqueeze(-1)).to(req.dtype)
            lse = total
        return out, (lse if req.return_lse else None)
