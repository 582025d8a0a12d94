"""Linear attention in Triton: the chunkwise product (causal or not) and its backward.

The one primitive, for every batch row and head h of H = max(Ha, Hb),

    y_i = sum over j in W(i) of (a_i . b_j + sa_i + sb_j) c_j,
    W(i) = {j <= i} (causal), {j >= i} (causal, reverse), or every j (not causal)

with a [B, Ha, La, M], b [B, Hb, Lb, M], c [B, Hb, Lb, E] read in place through their strides (head h
reads head h // (H / Ha) of a, h // (H / Hb) of b and c: GQA without copies; La == Lb when causal), and
the per-position scalars sa, sb optional. Each operand may carry a feature map applied as it is loaded
(elu + 1, relu) and a per-position scale; the output may be multiplied by a feature map's derivative at x
(the chain rule of a fused feature map). Linear attention is y = num with a = phi(q), b = phi(k), c = v,
plus den_i = sum over W(i) of a_i . b_j; its three gradients are three more products of the same
kind (`_Fused.backward`).

Each product takes three steps, all parallel over chunks of CHUNK positions, as
flash-linear-attention's chunk kernels split the work:
1. `_state_kernel`: each chunk's state b_c^T c_c [M, E] (and the vectors the scalars need), once per
   head of b and c; causal: written one slot further along the scan direction;
2. causal: `torch.cumsum` over the chunk axis, so that slot s holds the sum of every chunk before
   chunk s (after it, reversed); not causal: `torch.sum`, one state of all chunks;
3. `_output_kernel`: each chunk of a reads its state, a_c @ state; causal: plus the masked
   [CHUNK, CHUNK] product within the chunk.

Inputs may be any float dtype but float64; products accumulate in float32 on the GPU's tensor cores,
in tf32 for half-precision callers and as three tf32 products (`tf32x3`, float32's error) for float32
ones, and for every non-causal call (`_Fused.forward`); states are float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._autograd import first_order_only
from .._checks import flag, tensor
from ._launch import INTERPRET, block_dim, cdiv, launch, on_device

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton missing: callers take the PyTorch path
    triton = tl = None

__all__ = ["PHI", "Operand", "available", "chunk_product", "fused_linear_attention"]

# Positions per chunk: states [B, H, L / CHUNK, M, E] and a [CHUNK, CHUNK] product per chunk. 128 over 64:
# half the state traffic (H100, bf16, D 64, L 16k: forward 1.21x, forward+backward 1.24x; benchmarks/probe_linear.py).
CHUNK = 128
# Products on the GPU's tensor cores: "tf32" (10-bit mantissas, float32 sums: an error of ~2^-11, under the
# 2^-9 of a bfloat16 result) for half-precision callers, "tf32x3" (three tf32 products: float32's error)
# for float32 ones. The interpreter multiplies in float32 whatever the precision says.
# Per precision: (feature and value columns per program, warps) of the causal output kernel; wider feature
# dims loop, wider value dims split the grid. Chosen offline (sm_90a builds): these build without spills at
# M = E = 64 in all four products, where 64 columns at tf32x3 spill 200-750 bytes. The state kernel, and the
# output kernel when not causal (no [CHUNK, CHUNK] product), take 64 columns at either precision without
# spills (the state kernel at 4 warps, 8 when it loops over chunks; the output kernel at 8): fewer programs,
# each reading its chunk of the operands once.
CONFIGS = {"tf32": (64, 8), "tf32x3": (32, 8)}
WIDE = 64
# Not causal, each state program sums several chunks (a partial state per program, summed after), as many
# as leave at least this many programs (H100, bf16, D 64, not causal: 512 timed best or within 2% of it
# among 256 .. 2048 and one chunk per program, at 4k and 16k tokens; one chunk: 2-8% slower at 16k).
STATE_PROGRAMS = 512
PHI = {None: 0, "elu": 1, "relu": 2}  # feature maps the kernels apply on load: elu(x) + 1, relu(x)


def available(x: Tensor) -> bool:
    """Whether the kernels can run on x: a CUDA tensor with Triton, or any tensor under the interpreter;
    float64 never (the kernels compute in float32)."""
    return tl is not None and x.dtype != torch.float64 and (x.is_cuda or INTERPRET)


if tl is not None:

    @triton.jit
    def _tile(ptr, s_b, s_h, s_l, bi, hi, pos, cols, L, W, PHI: tl.constexpr, scale_ptr, H, SCALED: tl.constexpr):
        """x[bi, hi, pos, cols] as float32 [len(pos), len(cols)], zero off [L, W], phi applied
        (1: elu + 1, 2: relu), times scale[bi, hi, pos] ([B, H, L] contiguous) if SCALED."""
        m = (pos < L)[:, None] & (cols < W)[None, :]
        x = tl.load(ptr + bi * s_b + hi * s_h + pos[:, None] * s_l + cols[None, :], mask=m, other=0.0)
        x = x.to(tl.float32)
        if PHI == 1:
            x = tl.where(m, tl.where(x > 0, x + 1.0, tl.exp(x)), 0.0)
        elif PHI == 2:
            x = tl.maximum(x, 0.0)
        if SCALED:
            x *= tl.load(scale_ptr + (bi * H + hi) * L + pos, mask=pos < L, other=0.0)[:, None]
        return x

    @triton.jit
    def _tf32(x):
        """x rounded to tf32 (10-bit mantissa, to nearest, ties away), as the tensor cores' tf32 products
        round their operands."""
        return (x.to(tl.uint32, bitcast=True) + 0x1000 & 0xFFFFE000).to(tl.float32, bitcast=True)

    @triton.jit
    def _state_kernel(b_ptr, b_sb, b_sh, b_sl, bs_ptr, c_ptr, c_sb, c_sh, c_sl, cs_ptr, sb_ptr,
                      s_ptr, t_ptr, r_ptr, z_ptr, Hs, L, M, E, n_slots, n_eb,
                      CHUNK: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr, REVERSE: tl.constexpr,
                      FULL: tl.constexpr, PHI_B: tl.constexpr, PHI_C: tl.constexpr, SCALE_B: tl.constexpr,
                      SCALE_C: tl.constexpr, HAS_SA: tl.constexpr, HAS_SB: tl.constexpr, DEN: tl.constexpr,
                      PREC: tl.constexpr, G: tl.constexpr):
        """Chunk c's state into slot c + 1 (reverse: n - c), and zeros into slot 0 from the chunk whose
        state no chunk reads (the last in scan order). FULL (no mask): the sum of chunks cG .. cG + G - 1
        into slot c (n_slots = cdiv(chunks, G): fewer, longer programs whose loads overlap the products).
        s [B * Hs, n_slots, M, E]; t, r [B * Hs, n_slots, E]; z [B * Hs, n_slots, M]. Grid (n_slots, B * Hs,
        M blocks x E blocks), Hs the heads of b and c, L their length."""
        c = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        bi = row // Hs
        hi = row % Hs
        mb = tl.program_id(2) // n_eb
        eb = tl.program_id(2) % n_eb
        om = mb * BM + tl.arange(0, BM)
        oe = eb * BE + tl.arange(0, BE)
        if FULL:
            base = row * n_slots + c
            st = tl.zeros((BM, BE), dtype=tl.float32)
            t_c = tl.zeros((BE,), dtype=tl.float32)
            r_c = tl.zeros((BE,), dtype=tl.float32)
            z_c = tl.zeros((BM,), dtype=tl.float32)
            for i in range(G):  # positions past L load as zeros
                pos = ((c * G + i) * CHUNK + tl.arange(0, CHUNK)).to(tl.int64)
                b = _tile(b_ptr, b_sb, b_sh, b_sl, bi, hi, pos, om, L, M, PHI_B, bs_ptr, Hs, SCALE_B)
                cv = _tile(c_ptr, c_sb, c_sh, c_sl, bi, hi, pos, oe, L, E, PHI_C, cs_ptr, Hs, SCALE_C)
                st += tl.dot(tl.trans(b), cv, input_precision=PREC)
                if HAS_SA:
                    t_c += tl.sum(cv, axis=0)
                if HAS_SB:
                    sb = tl.load(sb_ptr + row * L + pos, mask=pos < L, other=0.0)
                    r_c += tl.sum(sb[:, None] * cv, axis=0)
                if DEN:
                    z_c += tl.sum(b, axis=0)
        else:
            last = (c == 0) if REVERSE else (c == n_slots - 1)
            base = row * n_slots + (0 if last else (n_slots - c if REVERSE else c + 1))
            pos = (c * CHUNK + tl.arange(0, CHUNK)).to(tl.int64)  # times a position stride: past 2**31 on long inputs
            b = _tile(b_ptr, b_sb, b_sh, b_sl, bi, hi, pos, om, L, M, PHI_B, bs_ptr, Hs, SCALE_B)
            cv = _tile(c_ptr, c_sb, c_sh, c_sl, bi, hi, pos, oe, L, E, PHI_C, cs_ptr, Hs, SCALE_C)
            # the slot-0 zeros by where, not by a product: an inf in that chunk must not make them NaN
            st = tl.where(last, 0.0, tl.dot(tl.trans(b), cv, input_precision=PREC))
            if HAS_SA:  # sum of c, for the sa_i * c_j terms
                t_c = tl.where(last, 0.0, tl.sum(cv, axis=0))
            if HAS_SB:  # sum of sb_j c_j
                sb = tl.load(sb_ptr + row * L + pos, mask=pos < L, other=0.0)
                r_c = tl.where(last, 0.0, tl.sum(sb[:, None] * cv, axis=0))
            if DEN:  # sum of b, for the denominator
                z_c = tl.where(last, 0.0, tl.sum(b, axis=0))
        tl.store(s_ptr + base * M * E + om[:, None] * E + oe[None, :], st, mask=(om[:, None] < M) & (oe[None, :] < E))
        if HAS_SA:
            tl.store(t_ptr + base * E + oe, t_c, mask=(oe < E) & (mb == 0))
        if HAS_SB:
            tl.store(r_ptr + base * E + oe, r_c, mask=(oe < E) & (mb == 0))
        if DEN:
            tl.store(z_ptr + base * M + om, z_c, mask=(om < M) & (eb == 0))

    @triton.jit
    def _output_kernel(a_ptr, a_sb, a_sh, a_sl, as_ptr, b_ptr, b_sb, b_sh, b_sl, bs_ptr,
                       c_ptr, c_sb, c_sh, c_sl, cs_ptr, x_ptr, x_sb, x_sh, x_sl,
                       sa_ptr, sb_ptr, s_ptr, t_ptr, r_ptr, z_ptr, y_ptr, den_ptr,
                       H, GA, GBC, GX, L, M, E, n_chunks,
                       CHUNK: tl.constexpr, BM: tl.constexpr, BE: tl.constexpr, REVERSE: tl.constexpr,
                       FULL: tl.constexpr, PHI_A: tl.constexpr, PHI_B: tl.constexpr, PHI_C: tl.constexpr,
                       SCALE_A: tl.constexpr, SCALE_B: tl.constexpr, SCALE_C: tl.constexpr, DPHI: tl.constexpr,
                       HAS_SA: tl.constexpr, HAS_SB: tl.constexpr, DEN: tl.constexpr, PREC: tl.constexpr):
        """y [B, H, L, E] for chunk c and one block of E columns: a_c @ (states of the chunks before, from
        slot c) plus the chunk's own masked product, times phi'(x) if DPHI. With DEN, y = num / den
        (0 where den = 0) and den [B, H, L] (from the first E block). Head h reads head h // GA of a,
        h // GBC of b, c and the states, h // GX of x. FULL (no mask): a_c @ the one summed state, b and c
        not read (L is a's length, b's may differ). Grid (n_chunks, B * H, E blocks)."""
        c = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)
        bi = row // H
        hi = row % H
        ha = hi // GA
        hs = hi // GBC
        Hs = H // GBC
        eb = tl.program_id(2)
        if FULL:
            base = bi * Hs + hs
        else:
            base = (bi * Hs + hs) * n_chunks + (n_chunks - 1 - c if REVERSE else c)
        pos = (c * CHUNK + tl.arange(0, CHUNK)).to(tl.int64)
        in_l = pos < L
        oe = eb * BE + tl.arange(0, BE)
        in_e = oe < E
        acc = tl.zeros((CHUNK, BE), dtype=tl.float32)
        a_b = tl.zeros((CHUNK, CHUNK), dtype=tl.float32)
        den = tl.zeros((CHUNK,), dtype=tl.float32)
        # the operands' scales multiply the products' rows and columns, not the operands: a half-precision
        # operand then reaches a tf32 product unrounded, as plain float32 math would multiply it
        for m0 in range(0, M, BM):
            om = m0 + tl.arange(0, BM)
            in_m = om < M
            a = _tile(a_ptr, a_sb, a_sh, a_sl, bi, ha, pos, om, L, M, PHI_A, as_ptr, H // GA, False)
            if not FULL:
                b = _tile(b_ptr, b_sb, b_sh, b_sl, bi, hs, pos, om, L, M, PHI_B, bs_ptr, Hs, False)
                a_b += tl.dot(a, tl.trans(b), input_precision=PREC)
            st = tl.load(s_ptr + base * M * E + om[:, None] * E + oe[None, :], mask=in_m[:, None] & in_e[None, :],
                         other=0.0)
            acc += tl.dot(a, st, input_precision=PREC)
            if DEN:
                z = tl.load(z_ptr + base * M + om, mask=in_m, other=0.0)
                den += tl.sum(a * z[None, :], axis=1)
        if SCALE_A:
            sc = tl.load(as_ptr + (bi * (H // GA) + ha) * L + pos, mask=in_l, other=0.0)
            a_b *= sc[:, None]
            acc *= sc[:, None]
            den *= sc
        if SCALE_B and not FULL:
            a_b *= tl.load(bs_ptr + (bi * Hs + hs) * L + pos, mask=in_l, other=0.0)[None, :]
        # padded positions have zero a, b, c and scalars: they add nothing
        if HAS_SA:
            sa = tl.load(sa_ptr + row * L + pos, mask=in_l, other=0.0)
            a_b += sa[:, None]
            t = tl.load(t_ptr + base * E + oe, mask=in_e, other=0.0)
            acc += sa[:, None] * t[None, :]
        if HAS_SB:
            if not FULL:
                sb = tl.load(sb_ptr + (bi * Hs + hs) * L + pos, mask=in_l, other=0.0)
                a_b += sb[None, :]
            r = tl.load(r_ptr + base * E + oe, mask=in_e, other=0.0)
            acc += r[None, :]
        if not FULL:  # the chunk's own keys, through the masked product
            ii = tl.arange(0, CHUNK)
            seen = (ii[None, :] >= ii[:, None]) if REVERSE else (ii[None, :] <= ii[:, None])
            a_b = tl.where(seen, a_b, 0.0)
            if DEN:
                if PREC == "tf32":
                    # the weights the product rounds to tf32, and the denominator sums the same ones: a row
                    # that sees one key returns its value exactly
                    a_b = _tf32(a_b)
                den += tl.sum(a_b, axis=1)
            if SCALE_C:
                a_b *= tl.load(cs_ptr + (bi * Hs + hs) * L + pos, mask=in_l, other=0.0)[None, :]
            cv = _tile(c_ptr, c_sb, c_sh, c_sl, bi, hs, pos, oe, L, E, PHI_C, cs_ptr, Hs, False)
            acc += tl.dot(a_b, cv, input_precision=PREC)
        if DEN:
            acc = acc / tl.where(den != 0, den, 1.0)[:, None]  # den = 0 where every weight is 0
            tl.store(den_ptr + row * L + pos, den, mask=in_l & (eb == 0))
        if DPHI != 0:
            x = tl.load(x_ptr + bi * x_sb + (hi // GX) * x_sh + pos[:, None] * x_sl + oe[None, :],
                        mask=in_l[:, None] & in_e[None, :], other=0.0).to(tl.float32)
            if DPHI == 1:
                acc *= tl.where(x > 0, 1.0, tl.exp(x))
            else:
                acc = tl.where(x > 0, acc, 0.0)
        tl.store(y_ptr + row * L * E + pos[:, None] * E + oe[None, :], acc, mask=in_l[:, None] & in_e[None, :])


class Operand(NamedTuple):
    """A product's operand: x [B, Hx, L, W] (read through its strides; the last must be 1), the
    feature map applied on load (None, "elu", "relu"), and an optional per-position scale [B, Hx, L]."""

    x: Tensor
    phi: str | None = None
    scale: Tensor | None = None


def _operand(name: str, op: Operand | Tensor, B: int, L: int) -> Operand:
    op = op if isinstance(op, Operand) else Operand(op)
    x = tensor(name, op.x)
    if x.dim() != 4 or x.shape[0] != B or x.shape[2] != L:
        raise ValueError(f"{name} must be [B={B}, H, L={L}, *], got {list(x.shape)}")
    if op.phi not in PHI:
        raise ValueError(f"{name}: feature map must be one of {list(PHI)}, got {op.phi!r}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    scale = None if op.scale is None else op.scale.float().contiguous()
    if scale is not None and scale.shape != x.shape[:3]:
        raise ValueError(f"{name}: scale must be {list(x.shape[:3])}, got {list(scale.shape)}")
    return Operand(x, op.phi, scale)


def chunk_product(a: Operand | Tensor, b: Operand | Tensor, c: Operand | Tensor, *, sa: Tensor | None = None,
                  sb: Tensor | None = None, den: bool = False, causal: bool = True, reverse: bool = False,
                  dphi: Operand | None = None, out_dtype: torch.dtype = torch.float32,
                  precision: str = "tf32x3") -> tuple[Tensor, Tensor | None]:
    """y [B, H, La, E] with y_i = sum over j in W(i) of (a_i . b_j + sa_i + sb_j) c_j, for a [B, Ha, La, M],
    b [B, Hb, Lb, M], c [B, Hb, Lb, E], H = max(Ha, Hb) a multiple of both (head h reads head h // (H / Ha)
    of a, h // (H / Hb) of b and c), sa [B, H, La], sb [B, Hb, Lb] (float32). W(i): j <= i when causal
    (reverse: j >= i; both need La == Lb), every j when not.
    den=True (no sa, sb) returns (y / den, den [B, H, La]) with den_i = sum of a_i . b_j over the same j
    (y = num = 0 where den = 0, as where every weight is 0: features are meant to be nonnegative); else
    (y, None). dphi: y times the derivative of dphi.phi at dphi.x [B, Hd, La, E] (head h // (H / Hd)).
    y is float32 unless out_dtype says otherwise. precision: a key of CONFIGS, how the GPU multiplies."""
    causal, reverse = flag("causal", causal), flag("reverse", reverse)
    lead = tensor("a", a.x if isinstance(a, Operand) else a)
    other = tensor("b", b.x if isinstance(b, Operand) else b)
    if lead.dim() != 4 or other.dim() != 4:
        raise ValueError(f"a [B, Ha, La, M] and b [B, Hb, Lb, M] must be 4-D, got {list(lead.shape)}, "
                         f"{list(other.shape)}")
    B, La, Lb = lead.shape[0], lead.shape[2], other.shape[2]
    if causal and La != Lb:
        raise ValueError(f"a causal product needs a and b of one length, got La = {La}, Lb = {Lb}")
    a, b, c = _operand("a", a, B, La), _operand("b", b, B, Lb), _operand("c", c, B, Lb)
    M, E = a.x.shape[3], c.x.shape[3]
    Ha, Hb = a.x.shape[1], b.x.shape[1]
    H = max(Ha, Hb)
    if b.x.shape[3] != M or c.x.shape[1] != Hb or (Ha and H % Ha) or (Hb and H % Hb):
        raise ValueError(f"a [B, Ha, La, M], b [B, Hb, Lb, M], c [B, Hb, Lb, E] with Ha, Hb dividing the larger; "
                         f"got {list(a.x.shape)}, {list(b.x.shape)}, {list(c.x.shape)}")
    if (Ha == 0) != (Hb == 0):
        raise ValueError(f"a and b must both have heads or both have none, got a {list(a.x.shape)}, "
                         f"b {list(b.x.shape)}")
    for name, op in (("a", a), ("b", b), ("c", c)):
        if op.x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32 (the kernels compute in float32), "
                            f"got {op.x.dtype}")
    for name, v, want in (("sa", sa, (B, H, La)), ("sb", sb, (B, Hb, Lb))):
        if v is not None and tuple(v.shape) != want:
            raise ValueError(f"{name} must be {list(want)}, got {list(v.shape)}")
    if den and (sa is not None or sb is not None):
        raise ValueError("chunk_product: den=True takes no sa / sb")
    if precision not in CONFIGS:
        raise ValueError(f"precision must be one of {list(CONFIGS)}, got {precision!r}")
    if dphi is not None:
        dphi = _operand("dphi", dphi, B, La)
        if dphi.x.shape[3] != E or not dphi.x.shape[1] or H % dphi.x.shape[1]:
            raise ValueError(f"dphi.x must be [B, Hd, La, E={E}] with Hd dividing {H}, got {list(dphi.x.shape)}")
    dev = a.x.device
    y = torch.empty(B, H, La, E, device=dev, dtype=out_dtype)
    d = torch.empty(B, H, La, device=dev, dtype=torch.float32) if den else None
    if y.numel() == 0 or Lb == 0 or (M == 0 and sa is None and sb is None):  # no a . b and no scalars
        if d is not None:
            d.zero_()
        return y.zero_(), d
    sa = sa.float().contiguous() if sa is not None else None
    sb = sb.float().contiguous() if sb is not None else None
    na, nb = cdiv(La, CHUNK), cdiv(Lb, CHUNK)
    cols, warps = CONFIGS[precision] if causal else (WIDE, 8)
    bm, be = min(cols, block_dim(M)), min(cols, block_dim(E))
    n_eb = cdiv(E, be)
    sm, se = min(WIDE, block_dim(M)), min(WIDE, block_dim(E))  # the state kernel's blocks
    n_seb = cdiv(E, se)
    blocks = max(1, cdiv(M, sm)) * n_seb  # at least one block of M: with M = 0 the scalars' vectors are still written
    rows = B * Hb * blocks
    group = 1  # chunks per state program (not causal): the most, up to 16, that leave STATE_PROGRAMS programs
    while not causal and group < 16 and cdiv(nb, 2 * group) * rows >= STATE_PROGRAMS:
        group *= 2
    ns = nb if causal else cdiv(nb, group)
    f32 = dict(device=dev, dtype=torch.float32)
    s = torch.empty(B * Hb, ns, M, E, **f32)
    t = torch.empty(B * Hb, ns, E, **f32) if sa is not None else s
    r = torch.empty(B * Hb, ns, E, **f32) if sb is not None else s
    z = torch.empty(B * Hb, ns, M, **f32) if den else s
    common = dict(CHUNK=CHUNK, REVERSE=reverse and causal, FULL=not causal)
    tail = dict(HAS_SA=sa is not None, HAS_SB=sb is not None, DEN=den, PREC=precision)

    def strided(op: Operand) -> tuple:
        return (op.x, op.x.stride(0), op.x.stride(1), op.x.stride(2))

    def scale(op: Operand) -> Tensor:
        return s if op.scale is None else op.scale

    x = dphi.x if dphi is not None else a.x
    states = dict(PHI_B=PHI[b.phi], PHI_C=PHI[c.phi], SCALE_B=b.scale is not None, SCALE_C=c.scale is not None,
                  **tail)
    with on_device(a.x):
        launch(_state_kernel, (ns, B * Hb, blocks),
               (*strided(b), scale(b), *strided(c), scale(c), s if sb is None else sb, s, t, r, z, Hb, Lb, M, E,
                ns, n_seb),
               dict(common, BM=sm, BE=se, G=group, **states), num_warps=4 if causal else 8,
               num_stages=1 if causal else 2, interpret=INTERPRET)
        bufs = {id(v): v for v in (s, t, r, z)}.values()
        if causal:
            for buf in bufs:
                buf.cumsum_(dim=1)  # slot k: the chunks before k in scan order (slot 0 holds zeros)
        else:  # every chunk's state summed into one
            summed = {id(v): v.sum(dim=1, keepdim=True) for v in bufs}
            s, t, r, z = (summed[id(v)] for v in (s, t, r, z))
        launch(_output_kernel, (na, B * H, n_eb),
               (*strided(a), scale(a), *strided(b), scale(b), *strided(c), scale(c), x, x.stride(0), x.stride(1),
                x.stride(2), s if sa is None else sa, s if sb is None else sb, s, t, r, z, y, y if d is None else d,
                H, H // Ha, H // Hb, H // x.shape[1], La, M, E, na),
               dict(common, BM=bm, BE=be, PHI_A=PHI[a.phi], PHI_B=PHI[b.phi], PHI_C=PHI[c.phi],
                    SCALE_A=a.scale is not None, SCALE_B=b.scale is not None, SCALE_C=c.scale is not None,
                    DPHI=0 if dphi is None else PHI[dphi.phi], **tail),
               num_warps=warps, num_stages=2, interpret=INTERPRET)
    return y, d


class _Fused(torch.autograd.Function):
    """o = num / den of linear attention: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, E]
    -> o [B, Hq, Lq, E] in q's dtype, with features phi(q), phi(k) made on load (phi None: q and k are
    the features already); causal (Lq == Lk) or not.

    With g = do, dnum = g / den and dden = -(g . o) / den (both 0 where den = 0), since
    num_i = sum_{j in W(i)} (qf_i . kf_j) v_j and den_i = sum_{j in W(i)} qf_i . kf_j:
        dqf_i = sum_{j in W(i)} (dnum_i . v_j + dden_i) kf_j    (a = dnum, b = v, c = kf, sa = dden)
        dkf_j = sum_{i: j in W(i)} (v_j . dnum_i + dden_i) qf_i  (a = v, b = dnum, c = qf, sb = dden, reverse)
        dv_j  = sum_{i: j in W(i)} (kf_j . qf_i) dnum_i          (a = kf, b = qf, c = dnum, reverse)
    and dq = dqf * phi'(q), dk = dkf * phi'(k) (in the kernels). With GQA, dk and dv come per query
    head and are summed over each kv head's group.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, phi: str | None, causal: bool, grad: bool) -> Tensor:
        # v is the caller's own tensor (q and k may be float32 features of half-precision inputs). Not causal,
        # float32's error for every dtype: there the products are a small share of the work (memory decides),
        # and tf32 sums of the summed state disagree with the float32 denominator and scalar terms by ~2^-11
        # (one key would not return its value, nor give dq = dk = 0); causal, the chunk's own product
        # rounds its weights for the first of those instead.
        half = v.dtype in (torch.float16, torch.bfloat16)
        prec = "tf32" if half and causal else "tf32x3"
        # float32 o when a backward will read it (dden), else straight into q's dtype
        o, den = chunk_product(Operand(q, phi), Operand(k, phi), v, den=True, causal=causal,
                               out_dtype=torch.float32 if grad else q.dtype, precision=prec)
        ctx.phi, ctx.causal, ctx.prec = phi, causal, prec
        ctx.save_for_backward(q, k, v, o, den)
        return o.to(q.dtype)

    @staticmethod
    @first_order_only("linear attention on the triton backend",
                      "use backend='chunked' to differentiate linear attention twice")
    def backward(ctx, g: Tensor):
        q, k, v, o, den = ctx.saved_tensors
        phi, prec = ctx.phi, ctx.prec
        live = den != 0
        inv = torch.where(live, 1.0 / torch.where(live, den, 1.0), 0.0)
        dden = -(g * o).sum(-1) * inv  # float32 by promotion, no copy of g (an einsum here ran as a gemv: 5x slower)
        dnum = Operand(g, None, inv)
        B, Hq = q.shape[:2]
        Hkv = k.shape[1]

        def grouped(x: Tensor, like: Tensor) -> Tensor:  # per query head -> per kv head
            if Hq != Hkv:
                x = x.view(B, Hkv, Hq // Hkv, *x.shape[2:]).sum(2)
            return x.to(like.dtype)

        grouped_dtype = torch.float32 if Hq != Hkv else None
        kw = dict(causal=ctx.causal, precision=prec)
        dq = dk = dv = None
        if ctx.needs_input_grad[0]:
            dq = chunk_product(dnum, v, Operand(k, phi), sa=dden, dphi=Operand(q, phi) if phi else None,
                               out_dtype=q.dtype, **kw)[0]
        if ctx.needs_input_grad[1]:
            dk = grouped(chunk_product(v, dnum, Operand(q, phi), sb=dden, reverse=True,
                                       dphi=Operand(k, phi) if phi else None,
                                       out_dtype=grouped_dtype or k.dtype, **kw)[0], k)
        if ctx.needs_input_grad[2]:
            dv = grouped(chunk_product(Operand(k, phi), Operand(q, phi), dnum, reverse=True,
                                       out_dtype=grouped_dtype or v.dtype, **kw)[0], v)
        return dq, dk, dv, None, None, None


def fused_linear_attention(q: Tensor, k: Tensor, v: Tensor, phi: str | None = None, causal: bool = True) -> Tensor:
    """Linear attention on the kernels: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, E] ->
    [B, Hq, Lq, E] in q's dtype, o_i = sum_j (qf_i . kf_j) v_j / sum_j qf_i . kf_j over j <= i if causal
    (Lq == Lk), every j if not (0 where that sum is 0), with qf = phi(q), kf = phi(k) ("elu": elu + 1,
    "relu"; None: q and k are features already). Query head h reads kv head h // (Hq / Hkv).
    Differentiable in q, k, v."""
    if q.dim() != 4 or k.dim() != 4 or (q.shape[1] % k.shape[1] if k.shape[1] else q.shape[1]):
        raise ValueError(f"q [B, Hq, Lq, D] and k [B, Hkv, Lk, D] need Hq a multiple of Hkv, got q {list(q.shape)}, "
                         f"k {list(k.shape)}")
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return _Fused.apply(q, k, v, phi, causal, grad)
