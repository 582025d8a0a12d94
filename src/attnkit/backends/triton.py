"""`triton`: attnkit's own fused kernels (ops/flash_attention.py).

One launch per call, for dense attention and for token-group layouts given as a
`GroupMask` (the `group_mask` feature), where it visits only the tiles the groups
allow. Reads a bool mask and an additive bias in place through their strides (the
bias gradient is summed over the bias's broadcast dims inside the dQ kernel, with
float32 atomics where programs share elements); causal/window tiles outside the
bounds are skipped; softcap and sink logits (with their gradient). float32 inputs
multiply in IEEE float32 (no tf32). On CUDA `auto` picks it for token groups and for
half-precision biased calls with head dims up to 64 (Evoformer at D = 32, a shared [1, H, L, L] bias
at D = 64: forward at FlexAttention's level or above, forward+backward above it; docs/benchmarks.md,
issue 5), and at the other head dims up to 128 (80, 96, ...: D = 96 measured ahead of
FlexAttention forward, even forward+backward); FlexAttention keeps D = 128, where the two are even.
In inference it also takes wide causal chunks (Lq < Lk over plain tensors, `AttentionRequest.wide_chunk`),
where SDPA runs its memory-efficient kernel.
On the CPU it runs only under Triton's interpreter (TRITON_INTERPRET=1), for tests.

Decode-shaped calls (at most 16 queries per sequence, no gradient, no mask / bias / mods /
dropout: `AttentionRequest.decode_shaped`) run the split-KV decode kernel
(ops/decode_attention.py), which reads a contiguous or paged cache in place with per-sequence
lengths (`cache_seqlens`, `block_table`). Other calls with a cache are densified
(`AttentionRequest.densified()`: gathered K/V and a mask) and run the flash kernel. On CUDA
`auto` picks triton for decode-shaped calls with cache_seqlens (the other backends must
build a mask, and gather a paged cache, first), and for causal ones of 2-16 queries over plain K/V
tensors; one query over plain tensors stays with SDPA (see speed()).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..groups import GroupMask
from ..ops import decode_attention as da
from ..ops import flash_attention as fa
from ..ops._launch import OUT_OF_RESOURCES
from ..request import AttentionRequest
from .base import Backend, Capabilities

_FEATURES = frozenset({"mask", "bias", "bias_grad", "causal", "window", "group_mask", "softcap", "sinks",
                       "return_lse", "gqa", "value_head_dim", "backward", "kv_lengths", "paged"})


class TritonBackend(Backend):
    name = "triton"
    capabilities = Capabilities(
        devices=frozenset({"cuda", "cpu"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}),
        features=_FEATURES,
        max_head_dim=256,
        notes="attnkit's Triton kernels: one launch over a token-group layout; float32 in IEEE (no tf32); "
              "CPU only under TRITON_INTERPRET=1",
    )
    # A kernel whose tiles do not fit this GPU first runs smaller ones (flash_attention._with_fallback); only
    # when those do not fit either does `auto` move on to the next backend.
    build_errors = OUT_OF_RESOURCES

    def available(self) -> str | None:
        if fa.TRITON_ERROR is None and not fa._INTERPRET and not torch.cuda.is_available():
            return "no CUDA device, and Triton's CPU interpreter is off (TRITON_INTERPRET=1)"
        return fa.TRITON_ERROR

    def unsupported(self, req: AttentionRequest) -> str | None:
        why = super().unsupported(req)
        if why is None and req.device.type == "cpu" and not fa._INTERPRET:
            why = "device 'cpu' runs Triton kernels only under its interpreter (TRITON_INTERPRET=1)"
        return why

    def speed(self, req: AttentionRequest) -> float:
        if req.device.type != "cuda":
            return 0.5  # the interpreter: for tests only
        if req.decode_shaped and req.cache_seqlens is not None:
            return 90.0  # the split-KV decode kernel reads the cache in place; the others build a mask (and gather)
        if req.decode_shaped and req.causal and req.len_q > 1 and req.dtype in (torch.float16, torch.bfloat16):
            # Causal decode steps of 2-16 queries over plain K/V tensors (a model keeping its own cache;
            # speculative tokens): SDPA's kernels read K/V once per query head there, ours once per KV head.
            # H100, bf16, 32 query heads over 8 KV heads, D = 128, a cache growing every step, no length seen
            # twice (one plan per split cap, the length given per launch): 1.03-4.81x SDPA called directly and
            # 1.35-4.78x our sdpa backend over views of one buffer; 1.03-1.37x SDPA with the torch.cat of
            # DynamicCache in every step's time (probe_decode_rules.py --grow, 2026-11-24 ~23:15 UTC). Fixed
            # shapes, D = 64-256, window, softcap, float16: 0.998-18x the best other backend (20:50 UTC). One
            # query stays with SDPA (0.82-1.24x of it between runs, the small rows bound by the host):
            # docs/benchmarks.md, "Decode steps over plain K/V tensors" and "A cache that grows every step".
            # float32 was not measured. Above SDPA's 100.
            return 110.0
        if "group_mask" in req.features():
            return 80.0  # one launch over the allowed tiles only; ahead of flex's block mask (issue 4 bench)
        if req.dtype not in (torch.float16, torch.bfloat16):
            return 20.0  # float32 multiplies in IEEE float32 on the FMA units here: the others use tf32 or cuDNN
        dmax = max(req.head_dim, req.head_dim_v)
        # Ahead of flex's 70 (and SDPA's 30 for masks) where measured faster: H100, bf16, against the best peer
        # that serves the call, forward / forward+backward (docs/benchmarks.md, "Where `auto` sends masks,
        # softcap, windows and sinks": benchmarks/probe_auto_rules.py, H16, B x L = 16k tokens, L = 1024 and
        # 4096, 2026-11-24 12:58 UTC). A call with several of these features takes the first rule that
        # matches; not every combination was measured.
        if req.sinks is not None and dmax <= 128:
            # flex adds a sink through its lse, in a second pass over out; ours inside the kernel. D = 64 / 128,
            # alone, causal, with a window or a bias: 1.21-3.00x / 1.06-2.33x.
            return 75.0
        if req.bias is not None:
            # Heads up to 64: Evoformer D = 32, 0.95-1.72x / 1.10-1.41x flex (05:32 UTC); a [1, H, L, L] bias
            # at D = 64, 1.42-1.46x / 1.25-1.27x (06:53 UTC); per batch row 1.34x / 1.04x, beside a causal mask
            # 1.54x / 1.34x (08:33 UTC); beside a window 1.23x / 1.27x, beside causal and softcap 1.59x / 2.88x
            # (tanh.approx, 14:29 UTC). At D = 128 the two are even (forward+backward 0.91-1.02x, beside a window
            # 0.93x), so flex keeps D = 128, unless a softcap is set beside the bias: with a causal mask, ours
            # 1.68x / 1.33x flex (14:29 UTC). Other head dims up to 128 (flex pads them to a power of two, as we
            # do) are ours: D = 96, 1.34x / 0.95x flex, and 2.9x / 2.2x SDPA's bias-gradient kernel.
            pays = dmax & (dmax - 1) or req.softcap is not None
            return 75.0 if dmax <= 64 or (dmax <= 128 and pays) else 20.0
        if req.softcap is not None and dmax <= 128:
            # With tanh.approx (14:27 UTC), D = 64 / 128, L = 1024 / 4096, with and without causal: 1.53-1.97x
            # flex forward, 1.42-2.49x forward+backward. (Through the sigmoid, flex's forward was ahead at D = 64.)
            return 75.0
        if req.mask is not None and dmax <= 128:
            # A mask tensor read in place: flex rebuilds its block mask whenever the mask changes, SDPA reads it
            # dense and computes every tile; ours skips the tiles it leaves empty and runs those it allows whole
            # without reading it. A padding key mask at D = 96 / 128 (right or left, lengths in [L/2, L]):
            # 1.6-1.8x SDPA forward, 1.4-1.5x forward+backward, and at D = 128 1.07-1.16x / 0.97-1.01x flex with
            # its block mask cached (19:43-19:48 UTC). Beside causal or a window, SDPA ran 0.42-0.51x of ours at
            # D = 96 / 128; with a query dim ([B, 1, L, L], as transformers builds causal + padding) 1.86-2.78x SDPA forward+backward, 0.98-1.20x
            # flex. Only a key mask of random holes (no tile to skip) ran behind SDPA, by up to 8% (0.92x
            # forward at L = 4096, D = 128; D = 96 not measured): a choice, since a key mask is a padding mask
            # in nearly every model. Measurements: docs/benchmarks.md, "Where `auto` sends masks, ...", "The rules
            # at another shape, ...", "Tiles a mask tensor allows whole run without it" and "Padding key masks".
            return 75.0
        if req.window is not None and req.needs_grad and dmax <= 64:
            # Training at D = 64: forward+backward 1.35x (L = 1024, W = 256) and 1.11x (L = 4096, W = 1024).
            # Inference (0.95-1.24x) and D = 128 (0.92-1.02x / 0.96-0.97x) stay with flex.
            return 75.0
        if req.wide_chunk and not req.decode_shaped and req.features() <= {"causal", "gqa"}:
            # Inference over a causal chunk of queries against more keys (Lq < Lk, plain tensors: a prefill chunk
            # after a cache). SDPA has no bottom-right causal in cuDNN or flash and runs its memory-efficient
            # kernel there; ours skips the tiles above the diagonal. With >= 16k query rows (B x Hq x Lq, one
            # program per SM without splitting the keys), H100, bf16, 32 query heads over 8 or 32 KV heads,
            # Lq = 128-2048 against 4k-32k keys, D = 64 / 128 / 256: 1.10-1.58x the best other backend but one
            # row (0.93x flex at D = 64, B1 x 512 x 32k; 1.17x SDPA there). With fewer rows ours (no split over
            # the keys) fell to 0.19-0.4x SDPA's on 32k keys, so those stay with SDPA (probe_decode_rules.py
            # --lq 32 128 512 2048, 2026-11-24 21:28-21:34 UTC; docs/benchmarks.md, "Chunks of queries"). Not
            # for decode-shaped chunks (<= 16 queries, e.g. B32 x 32 heads x 16): the decode kernel runs them,
            # under its rule for plain K/V tensors above.
            return 105.0
        return 20.0  # dense/causal: cuDNN is faster; elsewhere flex or SDPA were faster or not compared

    def prepare(self, req: AttentionRequest):
        """Decode-shaped calls: the decode kernel's call with req's scalars (it keeps its own plan per
        shapes and strides)."""
        if not req.decode_shaped:
            return None
        scale, softcap, bounds, return_lse = req.scale, req.softcap, req.key_bounds, req.return_lse

        def run(q, k, v, cache_seqlens, block_table, sinks):
            # no detach: a decode-shaped call records no gradient, and the kernels no autograd
            return da.decode_attention(q, k, v, cache_seqlens=cache_seqlens, block_table=block_table, scale=scale,
                                       softcap=softcap, sinks=sinks, bounds=bounds, return_lse=return_lse)
        return run

    def run(self, req: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        if req.decode_shaped:
            return self.prepare(req)(req.q, req.k, req.v, req.cache_seqlens, req.block_table, req.sinks)
        req = req.densified()  # cache_seqlens / block_table -> gathered K/V and a mask
        layout = req.mask_mod.layout if isinstance(req.mask_mod, GroupMask) else None
        q, k, v, bias, sinks = req.q, req.k, req.v, req.bias, req.sinks
        if not req.needs_grad:
            q, k, v = q.detach(), k.detach(), v.detach()
            bias = bias.detach() if bias is not None else None
            sinks = sinks.detach() if sinks is not None else None
        out, lse = fa.flash_attention(q, k, v, mask=req.mask, bias=bias, layout=layout, scale=req.scale,
                                      softcap=req.softcap, sinks=sinks, bounds=req.key_bounds)
        return out, (lse if req.return_lse else None)

    def backward_from_stats(self, req, do, out, lse, dlse):
        """The flash kernels' own backward (`flash_attention._backward`) on the given statistics."""
        req = req.densified()
        layout = req.mask_mod.layout if isinstance(req.mask_mod, GroupMask) else fa.dense_layout(req.len_q, req.len_k)
        q, k, v = req.q.detach(), req.k.detach(), req.v.detach()
        bias = req.bias.detach() if req.bias is not None else None
        dq, dk, dv, _, _ = fa._backward(do.to(q.dtype), q, k, v, out.to(q.dtype), lse, dlse, req.mask, bias, False,
                                        None, False, layout, req.scale, req.softcap, req.key_bounds)
        return dq, dk, dv
