"""The kernel contract: one function for every attention variant.

See README.md ("The contract") for the full semantics. Layout [B, H, L, D] with
heads split; GQA by head grouping; masks are bool with True = attend; bias is
additive; causal is bottom-right aligned when Lq != Lk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import Plan, plan, prepare, prepared, serve
from .request import MaskMod, ScoreMod, build_request, check_cache_values, replay_key, check_stats

__all__ = ["attention", "attention_backward", "explain"]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    window: int | tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
    cache_seqlens: Tensor | int | None = None,
    block_table: Tensor | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Scaled dot-product attention under one contract, on the best backend for the call.

    Args:
        q: [B, Hq, Lq, D]. k: [B, Hkv, Lk, D]. v: [B, Hkv, Lk, Dv]. Hq % Hkv == 0;
            query head h reads kv head h // (Hq // Hkv).
        mask: bool, True = attend, broadcastable to [B, Hq, Lq, Lk].
        bias: additive float logits, broadcastable to [B, Hq, Lq, Lk]; differentiable.
        causal: query i sees key j iff j <= i + Lk - Lq (bottom-right aligned).
        window: int W (the W most recent keys, the aligned diagonal included) or
            (left, right) key offsets around the aligned diagonal (-1/None = unbounded).
        scale: logit scale, default 1/sqrt(D).
        softcap: logits become softcap * tanh(logits / softcap).
        score_mod: FlexAttention-style `(score, b, h, q_idx, kv_idx) -> score`.
        mask_mod: FlexAttention-style `(b, h, q_idx, kv_idx) -> bool`.
        sinks: [Hq] logits that join each row's softmax denominator with no value.
        dropout_p: dropout on the attention probabilities (applied whenever > 0).
        return_lse: also return the float32 log-sum-exp [B, Hq, Lq] of each row
            (sinks included; -inf for a row with nothing to attend; float64 for
            float64 inputs, which sdpa, chunked and reference take).
        cache_seqlens: decoding against a KV cache (flash-attn's `flash_attn_with_kvcache`
            name): int32/int64 [B] on q's device, or an int for every sequence. Sequence b's
            keys are 0..cache_seqlens[b]-1 (later ones are never seen) and causal / window are
            aligned per sequence: query i sits at key position cache_seqlens[b] - Lq + i.
        block_table: int32 [B, max_blocks] (needs cache_seqlens): k and v are then a block pool
            [num_blocks, Hkv, block_size, D] / [..., Dv] (PagedKVCache.k / .v; block_size a
            power of two); token t of sequence b lives in block block_table[b, t // block_size]
            at slot t % block_size; the logical key length is max_blocks * block_size and
            entries past a sequence's last used block are never read. Values (lengths, block
            ids) are checked for CPU tensors only: on a GPU checking would synchronise every
            decode step, so there they are the caller's promise.
        backend: "auto" or a registered backend name ("sdpa", "flex", "chunked", "reference", ...).

    Logits are built in this order: scale * q k^T, + bias, softcap, score_mod,
    then mask / causal / window / mask_mod (and keys past cache_seqlens) set excluded
    pairs to -inf. A row with nothing to attend to returns 0 and gets zero gradient.

    Returns:
        out [B, Hq, Lq, Dv] in q's dtype, or (out, lse) when return_lse. out may be a strided view:
        SDPA's flash kernel and ours lay it out [B, Lq, Hq, Dv] in memory (as flash-attn does), so
        that merging the heads afterwards is free; use .reshape, not .view, on it. Gradients are
        first order: differentiating them again raises, except on the reference backend.
    """
    # A decode step repeats the previous step's call but for the tensors' data: once a call with
    # the same replay_key has passed the checks (those of the values of CPU tensors are rerun),
    # it runs as the backend prepared it, without a request (the host time of a step is the
    # bound on small caches).
    key = None
    if cache_seqlens is not None and mask is None and bias is None and score_mod is None and mask_mod is None:
        key = replay_key(q, k, v, causal, window, scale, softcap, sinks, dropout_p, return_lse, cache_seqlens,
                         block_table)
        hit = prepared(key, backend) if key is not None else None
        if hit is not None:
            run, on_cpu = hit
            if on_cpu:
                check_cache_values(k, cache_seqlens, block_table)
            out, lse = run(q, k, v, cache_seqlens, block_table, sinks)
            return (out, lse) if return_lse else out
    req = build_request(
        q, k, v, mask=mask, bias=bias, causal=causal, window=window, scale=scale,
        softcap=softcap, score_mod=score_mod, mask_mod=mask_mod, sinks=sinks,
        dropout_p=dropout_p, return_lse=return_lse, cache_seqlens=cache_seqlens, block_table=block_table,
    )
    chosen, (out, lse) = serve(req, backend, lambda b: b.run(req))
    if key is not None:
        prepare(key, backend, chosen, req)
    return (out, lse) if return_lse else out


def attention_backward(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    dlse: Tensor | None = None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    window: int | tuple[int | None, int | None] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod: MaskMod | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `attention(q, k, v, **same)` at `do` (and `dlse`), from the GIVEN out and lse.

    The backward pass of a fused attention kernel, exposed: with S the masked logits of the call
    (same keyword meanings as `attention`),

        P = exp(S - lse),  delta = rowsum(do * out) - dlse,  dS = P * (do v^T - delta),
        dq = dS k * scale, dk = dS^T q * scale, dv = P^T do   (through softcap / score_mod as usual)

    with out and lse taken as given, never recomputed. With the call's own (out, lse) these are
    the gradients autograd gives. With a row's GLOBAL statistics, where the keys of k/v are only
    a part of the keys the row attends to (the rest elsewhere, merged by log-sum-exp), they are
    exactly this part's share of the full gradient: ring attention sums them over the parts.

    Args:
        do: [B, Hq, Lq, Dv], the gradient of out. q, k, v: as in `attention` (no gradient flows).
        out: [B, Hq, Lq, Dv], the (merged) output. lse: [B, Hq, Lq] float log-sum-exp of each row
            (-inf for a row that attends nothing: its gradients are 0). A call with `sinks` passes
            its lse as it is (the sink only enters through lse).
        dlse: [B, Hq, Lq], the gradient of lse, or None (lse not used downstream).
        mask, bias, causal, window, scale, softcap, score_mod, mask_mod: as in `attention`; bias is
            a constant here (its gradient, like those of tensors a score_mod reads, is not returned).
        backend: as in `attention`: `auto` picks among the backends that serve the call with gradients,
            and on CUDA also SDPA's lse-returning kernels for dense and causal calls. sdpa (those kernels'
            own backward), triton and chunked read the statistics directly; flex and reference recompute
            their forward once (exact).

    Returns:
        (dq [B, Hq, Lq, D], dk [B, Hkv, Lk, D], dv [B, Hkv, Lk, Dv]) in q's dtype, not differentiable.
    """
    req = build_request(
        q, k, v, mask=mask, bias=bias, causal=causal, window=window, scale=scale, softcap=softcap,
        score_mod=score_mod, mask_mod=mask_mod, return_lse=True, for_backward=True,
    )
    do, out, lse, dlse = check_stats(req, do, out, lse, dlse)
    with torch.no_grad():
        return serve(req, backend, lambda b: b.backward_from_stats(req, do, out, lse, dlse))[1]


def explain(q: Tensor, k: Tensor, v: Tensor, *, backend: str = "auto", **kwargs) -> Plan:
    """The plan `attention(q, k, v, **kwargs)` would follow: chosen backend and why the others were not.

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] and the keyword arguments as in `attention`;
    `for_backward=True` gives the plan of `attention_backward` (the backward from saved statistics) instead.
    `print(attnkit.explain(...))` gives a readable table; the Plan's fields are
    `backend`, `request`, `reason` and `passed_over` (name -> reason).
    """
    req = build_request(q, k, v, **kwargs)
    return plan(req, backend)
