"""`chunked`: pure-PyTorch online softmax over (query, key) tiles, O(L) memory.

Forward keeps a running max, denominator and accumulator per query row and
never holds more than one [B, Hq, block_q, block_k] tile of scores. The
backward is a custom autograd Function that recomputes each tile from the
saved log-sum-exp, as FlashAttention does; the tile's logits are rebuilt under
autograd so that bias, softcap and score_mod gradients come from one code path.
Runs on every device torch runs on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._autograd import first_order_only
from .._checks import positive_int
from ..masks import apply_score_mod, closure_tensors, slice_4d, tile_allowed, tile_fully_outside
from ..request import AttentionRequest
from .base import ALL_FEATURES, Backend, Capabilities

# Target elements of one score tile (2**22 fp32 = 16 MiB); the 16-row floor of block_q can exceed it
# when B * Hq is large (e.g. 1024 Evoformer rows x heads: ~8M elements).
_TILE_ELEMENTS = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile_logits(
    req: AttentionRequest, q_t: Tensor, k_t: Tensor, bias_t: Tensor | None, qs: int, ks: int
) -> Tensor:
    """Masked logits of one tile, [B, Hq, bq, bk], in the compute dtype of q_t."""
    B, Hq, bq, D = q_t.shape
    Hkv, bk = k_t.shape[1], k_t.shape[2]
    g = Hq // Hkv
    # GQA without repeating K: fold the g query heads of a group into rows.
    s = torch.matmul(q_t.reshape(B, Hkv, g * bq, D), k_t.transpose(-1, -2)).view(B, Hq, bq, bk)
    s = s * req.scale
    if bias_t is not None:
        s = s + bias_t
    if req.softcap is not None:
        s = req.softcap * torch.tanh(s / req.softcap)
    if req.score_mod is not None:
        s = apply_score_mod(req, s, qs, ks)
    allowed = tile_allowed(req, qs, qs + bq, ks, ks + bk)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s


class _Tiling:
    def __init__(self, req: AttentionRequest, block_q: int | None, block_k: int | None):
        self.bk = block_k or min(req.len_k, 1024)
        rows = max(1, _TILE_ELEMENTS // (req.batch * req.heads_q * self.bk))
        self.bq = block_q or max(16, min(req.len_q, rows))

    def tiles(self, req: AttentionRequest):
        for qi, qs in enumerate(range(0, req.len_q, self.bq)):
            qe = min(qs + self.bq, req.len_q)
            for ki, ks in enumerate(range(0, req.len_k, self.bk)):
                ke = min(ks + self.bk, req.len_k)
                if not tile_fully_outside(req, qs, qe, ks, ke):
                    yield qi, ki, qs, qe, ks, ke


def _dropout_keep(req: AttentionRequest, seed: int, qi: int, ki: int, shape) -> Tensor:
    """The tile's dropout keep-mask, regenerated identically in the backward."""
    gen = torch.Generator(device=req.device)
    gen.manual_seed((seed + 1_000_003 * qi + 7_919 * ki) % (1 << 62))
    return torch.rand(shape, generator=gen, device=req.device) >= req.dropout_p


def _grouped(t: Tensor, heads_kv: int) -> Tensor:
    """[B, Hq, ...] -> [B, Hkv, g * ...] (consecutive query heads share a kv head)."""
    B, Hq = t.shape[:2]
    return t.reshape(B, heads_kv, (Hq // heads_kv) * t.shape[2], *t.shape[3:])


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, req, tiling, q, k, v, bias, sinks, *captured):
        ct = _compute_dtype(q.dtype)
        B, Hq, Lq = q.shape[:3]
        Hkv, Dv = k.shape[1], v.shape[3]
        m = torch.full((B, Hq, Lq, 1), float("-inf"), dtype=ct, device=q.device)
        den = torch.zeros((B, Hq, Lq, 1), dtype=ct, device=q.device)
        acc = torch.zeros((B, Hq, Lq, Dv), dtype=ct, device=q.device)
        seed = int(torch.randint(0, 1 << 62, (1,)).item()) if req.dropout_p > 0 else 0
        q_t, q_row = None, -1
        for qi, ki, qs, qe, ks, ke in tiling.tiles(req):
            if qi != q_row:  # tiles come row by row: cast each query block once
                q_t, q_row = q[:, :, qs:qe].to(ct), qi
            k_t = k[:, :, ks:ke].to(ct)
            bias_t = slice_4d(bias, qs, qe, ks, ke).to(ct) if bias is not None else None
            s = _tile_logits(req, q_t, k_t, bias_t, qs, ks)
            m_tile = s.amax(dim=-1, keepdim=True)
            m_new = torch.maximum(m[:, :, qs:qe], m_tile)
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = torch.exp(s - m_safe)
            alpha = torch.exp(m[:, :, qs:qe] - m_safe)
            den[:, :, qs:qe] = den[:, :, qs:qe] * alpha + p.sum(dim=-1, keepdim=True)
            if req.dropout_p > 0:
                p = p * _dropout_keep(req, seed, qi, ki, p.shape) / (1.0 - req.dropout_p)
            pv = torch.matmul(_grouped(p, Hkv), v[:, :, ks:ke].to(ct)).view(B, Hq, qe - qs, Dv)
            acc[:, :, qs:qe] = acc[:, :, qs:qe] * alpha + pv
            m[:, :, qs:qe] = m_new
        if sinks is not None:
            sk = sinks.to(ct).view(1, Hq, 1, 1)
            m_new = torch.maximum(m, sk)
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))  # dead row, no sink
            alpha = torch.exp(m - m_safe)
            den = den * alpha + torch.exp(sk - m_safe)
            acc = acc * alpha
            m = m_new
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        out_c = acc / torch.where(den == 0, torch.ones_like(den), den)
        lse = (torch.log(den) + m_safe).squeeze(-1)  # -inf where nothing was attended
        ctx.req, ctx.tiling, ctx.seed = req, tiling, seed
        # The unrounded output keeps rowsum(dO * O) accurate in half precision.
        ctx.save_for_backward(q, k, v, bias, sinks, out_c, lse)
        # The mod reads these very objects; the backward differentiates with respect to
        # them, so they are kept as they are (saved copies would be other tensors).
        ctx.captured = captured
        return out_c.to(q.dtype), lse

    @staticmethod
    @first_order_only("the chunked backend")
    def backward(ctx, d_out, d_lse):
        q, k, v, bias, sinks, out, lse = ctx.saved_tensors
        need_bias = bias is not None and ctx.needs_input_grad[5]
        dq, dk, dv, dbias, dcap, delta, lse_safe = _tiles_backward(
            ctx.req, ctx.tiling, ctx.seed, q, k, v, bias, out, lse, d_out, d_lse, ctx.captured, need_bias)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[6]:
            p_sink = torch.exp(sinks.to(lse_safe.dtype).view(1, -1, 1) - lse_safe)
            dsinks = (-(p_sink * delta)).sum(dim=(0, 2)).to(sinks.dtype)
        return (
            None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            dbias.to(bias.dtype) if dbias is not None else None, dsinks, *dcap,
        )


def _tiles_backward(req, tiling, seed, q, k, v, bias, out, lse, d_out, d_lse, captured, need_bias):
    """dq, dk, dv (float32 / float64), dbias, the captured tensors' gradients, delta and the
    +inf-for-dead-rows lse, tile by tile from out and lse (the Function's saved ones, or the given
    statistics of `backward_from_stats`): P = exp(S - lse), dS = P * (dP - rowsum(dO * O) + dlse)."""
    ct = _compute_dtype(q.dtype)
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    dq = torch.zeros(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=q.device)
    dv = torch.zeros(v.shape, dtype=ct, device=q.device)
    dbias = torch.zeros(bias.shape, dtype=ct, device=q.device) if need_bias else None
    dcap = [torch.zeros_like(c) for c in captured]
    d_out_c = torch.zeros_like(out) if d_out is None else d_out.to(ct)
    delta = (d_out_c * out).sum(dim=-1)  # rowsum(dO * O) [B, Hq, Lq]
    if d_lse is not None:
        delta = delta - d_lse.to(ct)  # d lse / d s_j = p_j folds into the same term
    # exp(s - lse) must be 0 on rows with nothing to attend (lse = -inf).
    lse_safe = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse).to(ct)

    for qi, ki, qs, qe, ks, ke in tiling.tiles(req):
        with torch.enable_grad():
            q_t = q[:, :, qs:qe].to(ct).detach().requires_grad_()
            k_t = k[:, :, ks:ke].to(ct).detach().requires_grad_()
            bias_t = None
            if bias is not None:
                bias_t = slice_4d(bias, qs, qe, ks, ke).to(ct).detach().requires_grad_(need_bias)
            s = _tile_logits(req, q_t, k_t, bias_t, qs, ks)
        p = torch.exp(s.detach() - lse_safe[:, :, qs:qe, None])
        v_t = v[:, :, ks:ke].to(ct)
        do_t = d_out_c[:, :, qs:qe]
        if req.dropout_p > 0:
            keep = _dropout_keep(req, seed, qi, ki, p.shape).to(ct) / (1.0 - req.dropout_p)
            pd = p * keep
        else:
            keep, pd = None, p
        bq, bk = qe - qs, ke - ks
        # dV = P^T dO, summed over the query heads of each kv head.
        dv[:, :, ks:ke] += torch.matmul(_grouped(pd, Hkv).transpose(-1, -2), _grouped(do_t, Hkv))
        dp = torch.matmul(_grouped(do_t, Hkv), v_t.transpose(-1, -2)).view(B, Hq, bq, bk)
        if keep is not None:
            dp = dp * keep
        ds = p * (dp - delta[:, :, qs:qe, None])
        wrt = [q_t, k_t] + ([bias_t] if need_bias else []) + list(captured)
        # retain_graph: a captured non-leaf tensor's own graph is shared by every tile.
        grads = torch.autograd.grad(s, wrt, ds, allow_unused=True, retain_graph=bool(captured))
        dq[:, :, qs:qe] += grads[0]
        dk[:, :, ks:ke] += grads[1]
        rest = grads[2:]
        if need_bias:
            gb = rest[0]
            slice_4d(dbias, qs, qe, ks, ke).add_(gb)  # a view: accumulates in place
            rest = rest[1:]
        for acc, gcap in zip(dcap, rest):
            if gcap is not None:
                acc += gcap
    return dq, dk, dv, dbias, dcap, delta, lse_safe


class ChunkedBackend(Backend):
    """Online-softmax tiles in plain PyTorch; `block_q`/`block_k` override the tile size."""

    name = "chunked"
    capabilities = Capabilities(
        devices=frozenset({"cpu", "cuda"}),
        dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64}),
        features=ALL_FEATURES - {"score_mod_grad_elsewhere"},
        notes="pure PyTorch, O(L) memory, recomputing backward (from saved out/lse); float32 accumulation",
    )

    def __init__(self, block_q: int | None = None, block_k: int | None = None):
        """block_q, block_k: tile sizes (rows, keys); None = chosen per call."""
        for name, size in (("block_q", block_q), ("block_k", block_k)):
            if size is not None:
                positive_int(name, size)
        self.block_q, self.block_k = block_q, block_k

    def speed(self, req: AttentionRequest) -> float:
        return 20.0 if req.device.type == "cpu" else 5.0

    def run(self, req: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        req = req.densified()  # cache_seqlens / block_table -> gathered K/V and a mask
        tiling = _Tiling(req, self.block_q, self.block_k)
        captured = []
        if req.score_mod is not None:
            # Their gradients are routed through the autograd Function below; a mod reading a tensor
            # that requires grad from anywhere else never gets here (feature 'score_mod_grad_elsewhere').
            captured = req.mod_grad_tensors
            if captured is None:  # not scanned by the request (no grad, attention_backward)
                captured = closure_tensors(req.score_mod, requires_grad=True)
        out, lse = _ChunkedAttention.apply(
            req, tiling, req.q, req.k, req.v, req.bias, req.sinks, *captured
        )
        return out, (lse if req.return_lse else None)

    def backward_from_stats(self, req, do, out, lse, dlse):
        """The tiled backward of `_ChunkedAttention` on the given statistics (no forward recomputed)."""
        req = req.densified()
        q, k, v = req.q.detach(), req.k.detach(), req.v.detach()
        bias = req.bias.detach() if req.bias is not None else None
        ct = _compute_dtype(q.dtype)
        dq, dk, dv, *_ = _tiles_backward(req, _Tiling(req, self.block_q, self.block_k), 0, q, k, v, bias,
                                         out.to(ct), lse, do, dlse, (), False)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
