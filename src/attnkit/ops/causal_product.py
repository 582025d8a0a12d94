"""Causal linear attention in Triton: the chunkwise causal product and its backward.

The one primitive, over rows of N independent sequences (a batch row and head each),

    y_i = sum over j in W(i) of (a_i . b_j + sa_i + sb_j) c_j,   W(i) = {j <= i}, or {j >= i} (reverse)

with a, b [N, L, M], c [N, L, E] and the per-position scalars sa, sb [N, L] optional. Forward
linear attention is y = num with a = phi(q), b = phi(k), c = v, plus den_i = sum over W(i) of
a_i . b_j; the three gradients are three more products of the same kind (see `_Causal.backward`).

Each product takes three steps, all parallel over chunks of CHUNK positions, as
flash-linear-attention's chunk kernels split the work:
1. `_state_kernel`: each chunk's state b_c^T c_c [M, E] (and the vector states the scalars need),
   written one slot further along the scan direction;
2. `torch.cumsum` over the chunk axis: slot s then holds the sum of every chunk before chunk s
   (after it, reversed);
3. `_output_kernel`: each chunk reads its slot, a_c @ state, plus the masked [CHUNK, CHUNK] product
   within the chunk.

Features and values may be any float dtype; every product runs in float32 (on the GPU's tensor
cores as three tf32 products, `tf32x3`, whose error is that of float32 math) and every state and
output is float32. The caller (`linear.linear_attention`) computes the feature maps and masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._launch import INTERPRET, block_dim, cdiv, launch, on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton missing: callers take the PyTorch path
    triton = tl = None

__all__ = ["causal_linear_attention", "causal_product", "available"]

CHUNK = 64  # positions per chunk: states [N, L / CHUNK, M, E] and a [CHUNK, CHUNK] product per chunk
_BLOCK = 64  # feature / value columns per program (wider feature dims loop, wider value dims split the grid)
# float32 products on the GPU: three tf32 products per dot (float32's error at tensor-core speed); the
# interpreter multiplies in float32 whatever this says
PRECISION = "tf32x3"


def available(x: Tensor) -> bool:
    """Whether the kernels can run on x: a CUDA tensor with Triton, or any tensor under the interpreter;
    float64 never (the kernels compute in float32)."""
    return tl is not None and x.dtype != torch.float64 and (x.is_cuda or INTERPRET)


if tl is not None:

    @triton.jit
    def _state_kernel(b_ptr, c_ptr, sb_ptr, s_ptr, t_ptr, r_ptr, z_ptr,
                      L, M, E, n_chunks, n_eb,
                      CHUNK: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr, REVERSE: tl.constexpr,
                      HAS_SA: tl.constexpr, HAS_SB: tl.constexpr, DEN: tl.constexpr, PREC: tl.constexpr):
        """Chunk c's state into slot c + 1 (reverse: n - c), and zeros into slot 0 from the chunk whose
        state no chunk reads (the last one in scan order). s [N, n, M, E]; t, r [N, n, E]; z [N, n, M].
        Grid (n_chunks, N, M blocks x E blocks)."""
        c = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        mb = tl.program_id(2) // n_eb
        eb = tl.program_id(2) % n_eb
        last = (c == 0) if REVERSE else (c == n_chunks - 1)
        slot = 0 if last else (n_chunks - c if REVERSE else c + 1)
        keep = 0.0 if last else 1.0
        pos = c * CHUNK + tl.arange(0, CHUNK)
        in_l = pos < L
        om = mb * BM + tl.arange(0, BM)
        oe = eb * BE + tl.arange(0, BE)
        b = tl.load(b_ptr + row * L * M + pos[:, None] * M + om[None, :], mask=in_l[:, None] & (om[None, :] < M),
                    other=0.0).to(tl.float32)
        cv = tl.load(c_ptr + row * L * E + pos[:, None] * E + oe[None, :], mask=in_l[:, None] & (oe[None, :] < E),
                     other=0.0).to(tl.float32)
        st = tl.dot(tl.trans(b), cv, input_precision=PREC) * keep
        base = row * n_chunks + slot
        tl.store(s_ptr + base * M * E + om[:, None] * E + oe[None, :], st, mask=(om[:, None] < M) & (oe[None, :] < E))
        if HAS_SA:  # sum of c, for the sa_i * c_j terms
            tl.store(t_ptr + base * E + oe, tl.sum(cv, axis=0) * keep, mask=(oe < E) & (mb == 0))
        if HAS_SB:  # sum of sb_j c_j
            sb = tl.load(sb_ptr + row * L + pos, mask=in_l, other=0.0).to(tl.float32)
            tl.store(r_ptr + base * E + oe, tl.sum(sb[:, None] * cv, axis=0) * keep, mask=(oe < E) & (mb == 0))
        if DEN:  # sum of b, for the denominator
            tl.store(z_ptr + base * M + om, tl.sum(b, axis=0) * keep, mask=(om < M) & (eb == 0))

    @triton.jit
    def _output_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, s_ptr, t_ptr, r_ptr, z_ptr, y_ptr, den_ptr,
                       L, M, E, n_chunks,
                       CHUNK: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr, REVERSE: tl.constexpr,
                       HAS_SA: tl.constexpr, HAS_SB: tl.constexpr, DEN: tl.constexpr, PREC: tl.constexpr):
        """y for chunk c and one block of E columns: a_c @ (states of the chunks before, from slot c)
        plus the chunk's own masked product. With DEN, y = num / den (0 where den = 0) and den goes to
        den [N, L] (from the first E block). Grid (n_chunks, N, E blocks)."""
        c = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        eb = tl.program_id(2)
        slot = n_chunks - 1 - c if REVERSE else c
        base = row * n_chunks + slot
        pos = c * CHUNK + tl.arange(0, CHUNK)
        in_l = pos < L
        oe = eb * BE + tl.arange(0, BE)
        in_e = oe < E
        acc = tl.zeros((CHUNK, BE), dtype=tl.float32)
        a_b = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
        den = tl.zeros((CHUNK,), dtype=tl.float32)
        for m0 in range(0, M, BM):
            om = m0 + tl.arange(0, BM)
            in_m = om < M
            a = tl.load(a_ptr + row * L * M + pos[:, None] * M + om[None, :], mask=in_l[:, None] & in_m[None, :],
                        other=0.0).to(tl.float32)
            b = tl.load(b_ptr + row * L * M + pos[:, None] * M + om[None, :], mask=in_l[:, None] & in_m[None, :],
                        other=0.0).to(tl.float32)
            a_b += tl.dot(a, tl.trans(b), input_precision=PREC)
            st = tl.load(s_ptr + base * M * E + om[:, None] * E + oe[None, :], mask=in_m[:, None] & in_e[None, :],
                         other=0.0)
            acc += tl.dot(a, st, input_precision=PREC)
            if DEN:
                z = tl.load(z_ptr + base * M + om, mask=in_m, other=0.0)
                den += tl.sum(a * z[None, :], axis=1)
        # padded positions have zero a, b, c and scalars: they add nothing
        if HAS_SA:
            sa = tl.load(sa_ptr + row * L + pos, mask=in_l, other=0.0).to(tl.float32)
            a_b += sa[:, None]
            t = tl.load(t_ptr + base * E + oe, mask=in_e, other=0.0)
            acc += sa[:, None] * t[None, :]
        if HAS_SB:
            sb = tl.load(sb_ptr + row * L + pos, mask=in_l, other=0.0).to(tl.float32)
            a_b += sb[None, :]
            r = tl.load(r_ptr + base * E + oe, mask=in_e, other=0.0)
            acc += r[None, :]
        ii = tl.arange(0, CHUNK)
        seen = (ii[None, :] >= ii[:, None]) if REVERSE else (ii[None, :] <= ii[:, None])
        a_b = tl.where(seen, a_b, 0.0)
        cv = tl.load(c_ptr + row * L * E + pos[:, None] * E + oe[None, :], mask=in_l[:, None] & in_e[None, :],
                     other=0.0).to(tl.float32)
        acc += tl.dot(a_b, cv, input_precision=PREC)
        if DEN:
            den += tl.sum(a_b, axis=1)
            acc = acc / tl.where(den > 0, den, 1.0)[:, None]  # den = 0 only where every weight is 0
            tl.store(den_ptr + row * L + pos, den, mask=in_l & (eb == 0))
        tl.store(y_ptr + row * L * E + pos[:, None] * E + oe[None, :], acc, mask=in_l[:, None] & in_e[None, :])


def _rows(name: str, x: Tensor, n: int, length: int) -> Tensor:
    if x.dim() != 3 or x.shape[0] != n or x.shape[1] != length:
        raise ValueError(f"{name} must be [N={n}, L={length}, *], got {list(x.shape)}")
    return x.contiguous()


def causal_product(a: Tensor, b: Tensor, c: Tensor, *, sa: Tensor | None = None, sb: Tensor | None = None,
                   den: bool = False, reverse: bool = False) -> tuple[Tensor, Tensor | None]:
    """y [N, L, E] (float32) with y_i = sum over j <= i (reverse: j >= i) of (a_i . b_j + sa_i + sb_j) c_j,
    for a, b [N, L, M], c [N, L, E], sa, sb [N, L]. With den=True (no sa, sb) it returns
    (y / den, den) with den_i = sum of a_i . b_j over the same j (y = 0 where den = 0); else (y, None)."""
    N, L, M = a.shape
    E = c.shape[-1]
    a, b, c = _rows("a", a, N, L), _rows("b", b, N, L), _rows("c", c, N, L)
    if b.shape[-1] != M:
        raise ValueError(f"a and b must share their feature dim, got {list(a.shape)} and {list(b.shape)}")
    if den and (sa is not None or sb is not None):
        raise ValueError("causal_product: den=True takes no sa / sb")
    dev = a.device
    y = torch.empty(N, L, E, device=dev, dtype=torch.float32)
    d = torch.empty(N, L, device=dev, dtype=torch.float32) if den else None
    if N == 0 or L == 0 or E == 0:
        if d is not None:
            d.zero_()
        return y.zero_(), d
    sa = sa.contiguous() if sa is not None else None
    sb = sb.contiguous() if sb is not None else None
    n = cdiv(L, CHUNK)
    bm, be = min(_BLOCK, block_dim(M)), min(_BLOCK, block_dim(E))
    n_eb = cdiv(E, be)
    f32 = dict(device=dev, dtype=torch.float32)
    s = torch.empty(N, n, M, E, **f32)
    t = torch.empty(N, n, E, **f32) if sa is not None else s
    r = torch.empty(N, n, E, **f32) if sb is not None else s
    z = torch.empty(N, n, M, **f32) if den else s
    flags = dict(CHUNK=CHUNK, BM=bm, BE=be, REVERSE=reverse, HAS_SA=sa is not None, HAS_SB=sb is not None,
                 DEN=den, PREC=PRECISION)
    with on_device(a):
        launch(_state_kernel, (n, N, cdiv(M, bm) * n_eb), (b, c, s if sb is None else sb, s, t, r, z, L, M, E, n, n_eb),
               flags, num_warps=4, num_stages=1, interpret=INTERPRET)
        for buf in {id(x): x for x in (s, t, r, z)}.values():
            buf.cumsum_(dim=1)  # slot k: the chunks before k in scan order (slot 0 holds zeros)
        launch(_output_kernel, (n, N, n_eb),
               (a, b, c, s if sa is None else sa, s if sb is None else sb, s, t, r, z, y, y if d is None else d,
                L, M, E, n),
               flags, num_warps=4, num_stages=2, interpret=INTERPRET)
    return y, d


class _Causal(torch.autograd.Function):
    """o = num / den of causal linear attention over rows: qf, kf [N, L, M], v [N, L, E] -> o [N, L, E] float32.

    With g = do, dnum = g / den and dden = -(g . o) / den (both 0 where den = 0), since
    num_i = sum_{j<=i} (qf_i . kf_j) v_j and den_i = sum_{j<=i} qf_i . kf_j:
        dqf_i = sum_{j<=i} (dnum_i . v_j + dden_i) kf_j    (a = dnum, b = v, c = kf, sa = dden)
        dkf_j   = sum_{i>=j} (v_j . dnum_i + dden_i) qf_i           (a = v, b = dnum, c = qf, sb = dden, reverse)
        dv_j    = sum_{i>=j} (kf_j . qf_i) dnum_i                   (a = kf, b = qf, c = dnum, reverse)
    """

    @staticmethod
    def forward(ctx, qf: Tensor, kf: Tensor, v: Tensor) -> Tensor:
        o, den = causal_product(qf, kf, v, den=True)
        ctx.save_for_backward(qf, kf, v, o, den)
        return o

    @staticmethod
    def backward(ctx, g: Tensor):
        qf, kf, v, o, den = ctx.saved_tensors
        live = den > 0
        inv = torch.where(live, 1.0 / torch.where(live, den, 1.0), 0.0)
        g = g.float()
        dnum = g * inv.unsqueeze(-1)
        dden = -(g * o).sum(-1) * inv
        dq = dk = dv = None
        if ctx.needs_input_grad[0]:
            dq = causal_product(dnum, v, kf, sa=dden)[0].to(qf.dtype)
        if ctx.needs_input_grad[1]:
            dk = causal_product(v, dnum, qf, sb=dden, reverse=True)[0].to(kf.dtype)
        if ctx.needs_input_grad[2]:
            dv = causal_product(kf, qf, dnum, reverse=True)[0].to(v.dtype)
        return dq, dk, dv


def causal_linear_attention(qf: Tensor, kf: Tensor, v: Tensor) -> Tensor:
    """Causal linear attention from features: qf, kf [N, L, M], v [N, L, E] -> [N, L, E] float32,
    o_i = sum_{j<=i} (qf_i . kf_j) v_j / sum_{j<=i} qf_i . kf_j (0 where that sum is 0). Differentiable."""
    return _Causal.apply(qf, kf, v)
