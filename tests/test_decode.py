"""Decoding through the contract: `cache_seqlens` / `block_table` (issue 6).

- the split-KV decode kernel (ops/decode_attention.py, the triton backend's decode path)
  on a paged pool and on a contiguous cache, against an oracle that knows nothing of either:
  the float64 `reference` on the contiguous K/V with an explicit per-sequence mask built
  here from the contract's text; random shuffled block tables with shared prefix blocks,
  lengths from 1 to several blocks (never multiples of the block size) and 0 (dead rows),
  GQA 1/4/8, Lq 1 and 4, causal, windows, softcap, sinks, lse, head dims 64/80/128,
  float32 / bfloat16 / float16 under the DESIGN's relative rule; every slot of the pool
  and of the contiguous cache that must not be read holds large garbage;
- the shared densifying helper (`AttentionRequest.densified()`) through reference,
  chunked, sdpa and flex, forward, and backward into the pool (shared blocks accumulate);
- validation errors, request shapes / features, the dispatcher, the module wiring;
- CUDA (marked `cuda`): real shapes, block sizes 16 and 256, the dispatcher's choice, a
  CUDA-graph decode loop, int64 addressing of a large pool.

On the CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1); without it the
kernel tests are skipped, the rest runs.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass, field, replace

import pytest
import torch

import attnkit
from attnkit import dispatch, functional
from attnkit.ops import decode_attention as da
from attnkit.request import build_request, replay_key
from cases import TRITON_INTERPRET
from conftest import LOWP, assert_close_rel, assert_close_tol, assert_lse_close, naive_attention, randn, rel_err

GARBAGE_K, GARBAGE_V = 30.0, 1000.0  # in every slot no query may read: huge scores and values if read


# ---------------------------------------------------------------------------
# building a cache: contiguous and paged views of the same tokens
# ---------------------------------------------------------------------------


@dataclass
class Decode:
    q: torch.Tensor  # [B, Hq, Lq, D]
    k: torch.Tensor  # contiguous [B, Hkv, W * bs, D], garbage past each length
    v: torch.Tensor
    kp: torch.Tensor  # pool [num_blocks, Hkv, bs, D], garbage in unused slots and blocks
    vp: torch.Tensor
    table: torch.Tensor  # int32 [B, W]: used entries, then padding (-1, a spare block, out of range)
    lens: torch.Tensor  # int32 [B]
    sinks: torch.Tensor | None
    bs: int


def make_decode(B, Hq, Hkv, Lq, D, lens, bs, *, Dv=None, dtype=torch.float32, device="cpu", seed=0,
                sinks=False) -> Decode:
    """Sequence 1 shares sequence 0's full prefix blocks (the same physical blocks, as after a
    fork); block ids are a random permutation of the pool; each row of the table is padded
    with a different kind of entry that must never be read."""
    Dv = D if Dv is None else Dv
    assert len(lens) == B
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-n // bs) for n in lens]
    W = max(nblk) + 1  # one padding column at least
    Lc = W * bs
    q = randn(B, Hq, Lq, D, gen=g)
    k = randn(B, Hkv, Lc, D, gen=g)
    v = randn(B, Hkv, Lc, Dv, gen=g)
    shared = min(lens[0], lens[1]) // bs if B > 1 else 0
    if shared:
        k[1, :, :shared * bs] = k[0, :, :shared * bs]
        v[1, :, :shared * bs] = v[0, :, :shared * bs]
    for b, n in enumerate(lens):
        k[b, :, n:] = GARBAGE_K
        v[b, :, n:] = GARBAGE_V
    spare = 3
    num_blocks = sum(nblk) - shared + spare
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    kp = torch.full((num_blocks, Hkv, bs, D), GARBAGE_K)
    vp = torch.full((num_blocks, Hkv, bs, Dv), GARBAGE_V)
    table = []
    for b in range(B):
        row = []
        for j in range(nblk[b]):
            if b == 1 and j < shared:
                blk = table[0][j]  # the shared prefix
            else:
                blk = ids.pop()
                kp[blk] = k[b, :, j * bs:(j + 1) * bs]
                vp[blk] = v[b, :, j * bs:(j + 1) * bs]
            row.append(blk)
        pad = [-1, ids[0], num_blocks + 7][b % 3]  # ids[0]: a spare (garbage) block
        table.append(row + [pad] * (W - len(row)))
    s = randn(Hq, gen=g) + 1.0 if sinks else None
    cast = dict(dtype=dtype, device=device)
    return Decode(q.to(**cast), k.to(**cast), v.to(**cast), kp.to(**cast), vp.to(**cast),
                  torch.tensor(table, dtype=torch.int32, device=device),
                  torch.tensor(lens, dtype=torch.int32, device=device),
                  None if s is None else s.to(**cast), bs)


def allowed_mask(lens, Lq: int, Lk: int, causal=False, window=None) -> torch.Tensor:
    """Bool [B, 1, Lq, Lk] from the contract's text: sequence b's query i sits at key position
    lens[b] - Lq + i; keys >= lens[b] are never seen; causal / window around that position."""
    rows = []
    j = torch.arange(Lk).view(1, -1)
    for n in [int(x) for x in lens]:
        pos = (n - Lq + torch.arange(Lq)).view(-1, 1)
        keep = (j < n).expand(Lq, Lk)
        if causal:
            keep = keep & (j <= pos)
        if isinstance(window, int):
            keep = keep & (j <= pos) & (j > pos - window)
        elif window is not None:
            left, right = window
            if left is not None and left != -1:
                keep = keep & (j >= pos - left)
            if right is not None and right != -1:
                keep = keep & (j <= pos + right)
        rows.append(keep)
    return torch.stack(rows).unsqueeze(1)


def oracle(d: Decode, kw: dict, dtype=torch.float64):
    """(out, lse) of the float64 reference on the contiguous K/V with the explicit mask (no
    cache_seqlens: independent of the code under test), and the same in plain low-precision
    math (the DESIGN's baseline)."""
    mask = allowed_mask(d.lens.cpu(), d.q.shape[2], d.k.shape[2], kw.get("causal", False),
                        kw.get("window")).to(d.q.device)
    extra = {n: kw[n] for n in ("softcap", "scale") if n in kw}
    ref = attnkit.attention(d.q.double(), d.k.double(), d.v.double(), mask=mask, return_lse=True,
                            sinks=None if d.sinks is None else d.sinks.double(), backend="reference", **extra)
    base = naive_attention(d.q, d.k, d.v, mask=mask, sinks=d.sinks, return_lse=True, **extra)
    return ref, base, mask


def check(out, lse, ref, base, mask, dtype, name=""):
    """The DESIGN's rule on out (and lse), exact zeros on rows with nothing to attend."""
    (r, rl), (b, bl) = ref, base
    lowp = dtype in LOWP
    assert out.dtype == dtype, f"{name}: output dtype {out.dtype}"
    e = rel_err(b, r)
    assert_close_rel(out, r, e if lowp else None, fp32_baseline_err=None if lowp else e, name=f"{name} out")
    dead = ~mask.any(-1).expand(out.shape[:3])
    if dead.any():
        assert torch.all(out[dead] == 0), f"{name}: a row with nothing to attend must output exactly 0"
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == out.shape[:3]
        fin = torch.isfinite(rl)
        el = rel_err(bl[fin], rl[fin]) if fin.any() else 0.0
        assert_lse_close(lse, rl, el if lowp else None, fp32_baseline_err=None if lowp else el, name=f"{name} lse")


def contract_kw(d: Decode, kw: dict, paged: bool) -> dict:
    out = dict(kw, cache_seqlens=d.lens)
    if d.sinks is not None:
        out["sinks"] = d.sinks
    if paged:
        out["block_table"] = d.table
    return out


@pytest.fixture
def tdevice(device):
    if device == "cpu" and not TRITON_INTERPRET:
        pytest.skip("the triton backend runs on the CPU only with TRITON_INTERPRET=1")
    return device


@pytest.fixture
def spy_decode(monkeypatch):
    """Counts calls of the decode kernel (the triton backend looks it up on the module)."""
    calls = []
    orig = da.decode_attention

    def wrapped(*a, **kw):
        calls.append(kw)
        return orig(*a, **kw)

    monkeypatch.setattr(da, "decode_attention", wrapped)
    return calls


# ---------------------------------------------------------------------------
# the decode kernel: paged == contiguous == reference
# ---------------------------------------------------------------------------


@dataclass
class DCase:
    name: str
    dtype: torch.dtype
    Hq: int
    Hkv: int
    Lq: int
    D: int
    bs: int
    lens: tuple  # in blocks of bs: (whole blocks, extra tokens) pairs, or plain ints
    kw: dict = field(default_factory=dict)
    sinks: bool = False
    Dv: int | None = None
    splits: int | None = None  # forced number of key splits (None: the heuristic)

    def lengths(self) -> list[int]:
        return [x if isinstance(x, int) else x[0] * self.bs + x[1] for x in self.lens]


F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# Lengths: 1 to several blocks, never a multiple of the block size, and 0 (a dead sequence).
# The interpreter's key tile is 16: block size 8 puts two pages in a tile, 32 two tiles in a page.
KERNEL_CASES = [
    DCase("f32_mha_lq1_plain", F32, 2, 2, 1, 64, 8, ((3, 5), (2, 7), 1, 0), kw=dict(return_lse=True)),
    DCase("f32_gqa4_lq4_causal_d80", F32, 8, 2, 4, 80, 16, ((2, 3), (3, 9), 2, 0), kw=dict(causal=True, return_lse=True),
          splits=3),
    DCase("f32_gqa8_lq1_window", F32, 8, 1, 1, 64, 32, ((2, 5), (1, 30), 7, 0), kw=dict(causal=True, window=20),
          splits=4),
    DCase("f32_gqa4_lq4_window_lr_softcap_sinks_dv", F32, 8, 2, 4, 64, 8, ((4, 1), (2, 3), 3, 0), Dv=48,
          kw=dict(window=(5, 2), softcap=2.0, return_lse=True), sinks=True, splits=2),
    DCase("f32_gqa4_lq4_causal_window_splits", F32, 4, 1, 4, 64, 16, ((5, 3), (5, 1), 9, 1),
          kw=dict(causal=True, window=11, return_lse=True), splits=5),
    DCase("bf16_gqa4_lq1_causal_sinks_d128", BF16, 8, 2, 1, 128, 16, ((3, 1), (2, 9), 1, 0),
          kw=dict(causal=True, return_lse=True), sinks=True, splits=3),
    DCase("bf16_gqa8_lq4_causal_window_softcap_d80", BF16, 8, 1, 4, 80, 8, ((4, 3), (2, 1), 5, 0),
          kw=dict(causal=True, window=9, softcap=3.0)),
    DCase("f16_mha_lq4_causal", F16, 2, 2, 4, 64, 32, ((1, 13), (2, 1), 3, 0), kw=dict(causal=True, return_lse=True),
          splits=2),
    DCase("f16_gqa4_lq1_plain_d80", F16, 4, 1, 1, 80, 16, ((2, 15), (1, 3), 1, 0)),
]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c.name for c in KERNEL_CASES])
def test_decode_kernel_paged_contiguous_reference(case, tdevice, spy_decode, monkeypatch):
    if case.splits is not None:
        monkeypatch.setattr(da, "num_splits_for", lambda programs, len_k, device: case.splits)
    d = make_decode(4, case.Hq, case.Hkv, case.Lq, case.D, case.lengths(), case.bs, Dv=case.Dv, dtype=case.dtype,
                    device=tdevice, seed=zlib.crc32(case.name.encode()) % 1000, sinks=case.sinks)
    ref, base, mask = oracle(d, case.kw)
    with torch.no_grad():
        for paged in (True, False):
            k, v = (d.kp, d.vp) if paged else (d.k, d.v)
            res = attnkit.attention(d.q, k, v, backend="triton", **contract_kw(d, case.kw, paged))
            out, lse = res if isinstance(res, tuple) else (res, None)
            check(out, lse, ref, base, mask, case.dtype, name="paged" if paged else "contiguous")
    assert len(spy_decode) == 2, "decode-shaped calls must run the decode kernel"


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64])
def test_decode_kernel_any_split_count(splits, tdevice):
    """The merge by log-sum-exp is exact whatever the split count: splits that get no tile (more
    splits than tiles, or tiles left of a window) write empty partials; sinks join once."""
    d = make_decode(3, 4, 2, 2, 64, [70, 45, 3], 16, device=tdevice, seed=5, sinks=True)
    kw = dict(causal=True, window=(24, 0))
    ref, base, mask = oracle(d, kw)
    req = build_request(d.q, d.kp, d.vp, **contract_kw(d, kw, True))
    out, lse = da.decode_attention(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table, scale=req.scale,
                                   sinks=d.sinks, bounds=req.key_bounds, num_splits=splits)
    check(out, lse, ref, base, mask, torch.float32, name=f"{splits} splits")


def test_decode_split_counters_return_to_zero(tdevice, monkeypatch):
    """The split that arrives last merges its row block and resets the block's arrival counter, so
    every launch leaves the counters at zero and the next launch on the stream starts clean: repeated
    calls give the same result, which matches the reference. 16 query heads per kv head x 8 queries
    = 128 rows: two row blocks per (sequence, kv head), each with its own counter, and at D = 128 each
    merged 16 rows at a time (the merge's row loop)."""
    used = []
    orig = da._counters
    monkeypatch.setattr(da, "_counters", lambda device, n: used.append(orig(device, n)) or used[-1])
    d = make_decode(2, 16, 1, 8, 128, [50, 37], 16, device=tdevice, seed=8, sinks=True)
    kw = dict(causal=True)
    ref, base, mask = oracle(d, kw)
    req = build_request(d.q, d.kp, d.vp, **contract_kw(d, kw, True))
    runs = [da.decode_attention(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table, scale=req.scale,
                                sinks=d.sinks, bounds=req.key_bounds, num_splits=3) for _ in range(3)]
    check(*runs[0], ref, base, mask, torch.float32, name="3 splits, 2 row blocks")
    for out, lse in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])
    assert len(used) == 3 and all(int(c.abs().sum()) == 0 for c in used)


@pytest.mark.skipif(not TRITON_INTERPRET, reason="reorders the Triton interpreter's programs")
def test_decode_splits_merge_in_any_program_order(monkeypatch):
    """On a GPU the split programs finish in any order, and whichever arrives last in its row block
    merges it. The interpreter runs them in grid order (each block's last split last); here they run
    in a random order, over several row blocks and sequences: one counter per row block, the merge
    reads every split, and a block's merger may run before other blocks' splits (a counter shared by
    the blocks fails this; the tests in grid order do not see it)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    order = []

    def shuffled_dim(x, y, z):
        order[:] = [(i, j, k) for i in range(x) for j in range(y) for k in range(z)]
        random.Random(x * 131 + y).shuffle(order)
        return set_dim(x, y, z)

    monkeypatch.setattr(builder, "set_grid_dim", shuffled_dim)
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: set_idx(*order.pop()))
    for B, Hq, Hkv, Lq, lens, splits in [(2, 4, 2, 1, [100, 60], 4), (2, 20, 1, 4, [70, 33], 5),
                                         (3, 8, 2, 2, [90, 0, 40], 3)]:
        d = make_decode(B, Hq, Hkv, Lq, 16, lens, 16, device="cpu", seed=B * Hq + splits, sinks=True)
        kw = dict(causal=True)
        ref, base, mask = oracle(d, kw)
        req = build_request(d.q, d.kp, d.vp, **contract_kw(d, kw, True))
        out, lse = da.decode_attention(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table, scale=req.scale,
                                       sinks=d.sinks, bounds=req.key_bounds, num_splits=splits)
        check(out, lse, ref, base, mask, torch.float32, name=f"B{B} Hq{Hq} Lq{Lq} {splits} splits, shuffled")


@pytest.mark.parametrize("Lq", [1, 3])
def test_decode_kernel_window_edge_on_every_tile_offset(Lq, tdevice):
    """The first tile a sequence visits under a window starts where its window starts: lengths
    40..56 put the window's left edge at every offset of a key tile (16 in the interpreter, 32 to
    128 on a GPU: 17 lengths cover the interpreter's every offset; the GPU cases cover others)."""
    lens = list(range(40, 57))
    d = make_decode(len(lens), 2, 1, Lq, 16, lens, 16, device=tdevice, seed=40 + Lq)
    kw = dict(causal=True, window=20, return_lse=True)
    ref, base, mask = oracle(d, kw)
    with torch.no_grad():
        out, lse = attnkit.attention(d.q, d.kp, d.vp, backend="triton", **contract_kw(d, kw, True))
    check(out, lse, ref, base, mask, torch.float32)


def test_decode_kernel_dead_sequences_and_int_lengths(tdevice):
    """Length 0 everywhere: output exactly 0, lse -inf (the sink's logit with sinks), no NaN.
    cache_seqlens as an int (every sequence) and as int64 give the same as int32."""
    d = make_decode(2, 4, 2, 1, 64, [0, 0], 16, device=tdevice, seed=6)
    with torch.no_grad():
        for splits in (1, 3):
            out, lse = da.decode_attention(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table,
                                           num_splits=splits)
            assert torch.all(out == 0) and torch.isneginf(lse).all()
        sinks = torch.tensor([0.5, -1.0, 2.0, float("-inf")], device=tdevice)
        out, lse = attnkit.attention(d.q, d.k, d.v, cache_seqlens=0, sinks=sinks, return_lse=True, backend="triton")
        assert torch.all(out == 0) and torch.equal(lse, sinks.view(1, 4, 1).expand(2, 4, 1))
        e = make_decode(3, 4, 2, 4, 64, [33, 33, 33], 16, device=tdevice, seed=7)
        ref = attnkit.attention(e.q, e.k, e.v, cache_seqlens=e.lens, causal=True, backend="triton")
        for lens in (33, e.lens.long()):
            got = attnkit.attention(e.q, e.k, e.v, cache_seqlens=lens, causal=True, backend="triton")
            assert torch.equal(got, ref)


def test_decode_kernel_noncontiguous_views(tdevice):
    """q and a contiguous cache given as views of [B, L, H, D] tensors (flash-attn's layout)."""
    d = make_decode(2, 8, 2, 3, 64, [40, 21], 16, device=tdevice, seed=8)
    q = d.q.transpose(1, 2).contiguous().transpose(1, 2)
    k = d.k.transpose(1, 2).contiguous().transpose(1, 2)
    v = d.v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    kw = dict(causal=True, return_lse=True)
    ref, base, mask = oracle(d, kw)
    with torch.no_grad():
        out, lse = attnkit.attention(q, k, v, cache_seqlens=d.lens, backend="triton", **kw)
    check(out, lse, ref, base, mask, torch.float32)


def test_decode_kernel_strided_and_expanded_lengths_and_sinks(tdevice):
    """cache_seqlens and sinks as strided views (a column of a 2-D tensor) and as expanded views
    (stride 0: torch.tensor([n]).expand(B)) give what their contiguous copies give; the kernels read
    them at b and h, which misread these views (errors of 0.1-0.8, reads past the storage)."""
    d = make_decode(3, 4, 2, 1, 64, [5, 40, 33], 16, device=tdevice, seed=11)
    g = torch.Generator().manual_seed(12)
    lens2 = torch.stack([d.lens, torch.zeros_like(d.lens)], 1)  # [B, 2]: lengths in column 0
    sinks2 = (3 * torch.randn(4, 2, generator=g)).to(tdevice)
    one = torch.tensor([5], dtype=torch.int32, device=tdevice)  # every sequence holds 5 tokens at least
    cases = [(lens2[:, 0], None), (d.lens, sinks2[:, 0]), (one.expand(3), None),
             (d.lens, sinks2[:1, 0].expand(4))]
    with torch.no_grad():
        for lens, sinks in cases:
            assert not lens.is_contiguous() or not sinks.is_contiguous()
            for kv in ((d.k, d.v, None), (d.kp, d.vp, d.table)):
                got = attnkit.attention(d.q, kv[0], kv[1], cache_seqlens=lens, block_table=kv[2], sinks=sinks,
                                        backend="triton")
                want = attnkit.attention(d.q.double(), d.k.double(), d.v.double(), cache_seqlens=lens.contiguous(),
                                         sinks=None if sinks is None else sinks.double(), backend="reference")
                assert_close_rel(got, want)


def test_flash_kernel_strided_sinks(tdevice):
    """The prefill kernel reads sinks[h] too: a strided view of them gives the reference's output."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 4, 20, 16, generator=g).to(tdevice) for _ in range(3))
    sinks = (3 * torch.randn(4, 2, generator=g)).to(tdevice)[:, 1]
    with torch.no_grad():
        got = attnkit.attention(q, k, v, sinks=sinks, causal=True, backend="triton")
    want = attnkit.attention(q.double(), k.double(), v.double(), sinks=sinks.double(), causal=True,
                             backend="reference")
    assert_close_rel(got, want)


def test_decode_plans_tell_calls_apart(tdevice, monkeypatch):
    """decode_attention keeps its plan (grid, split count, constexprs, strides) per key of what the
    plan derives from. Calls differing in one such thing only (bounds, softcap, scale, sinks,
    q's strides, the table's width and so the split count, the lengths' dtype, paged or not),
    interleaved twice (the second round runs on kept plans), each match the oracle."""
    monkeypatch.setattr(da, "_PLANS", {})
    # the split count may read the length of a contiguous cache only through its cap (_split_cap): 1 at 64 keys,
    # 2 at the wider table's 96
    monkeypatch.setattr(da, "MIN_KEYS_PER_SPLIT", 64)
    monkeypatch.setattr(da, "num_splits_for", lambda programs, len_k, device: 1 if len_k <= 64 else 3)
    d = make_decode(3, 8, 2, 2, 64, [40, 21, 9], 16, device=tdevice, seed=11, sinks=True)  # table 4 wide: 1 split
    wide = make_decode(3, 8, 2, 2, 64, [70, 21, 9], 16, device=tdevice, seed=12, sinks=True)  # 6 wide: 3 splits
    nosinks = replace(d, sinks=None)
    variants = [
        ("causal", d, dict(causal=True)),
        ("window", d, dict(causal=True, window=5)),
        ("plain", d, {}),
        ("softcap", d, dict(causal=True, softcap=2.0)),
        ("scale", d, dict(causal=True, scale=0.3)),
        ("no sinks", nosinks, dict(causal=True)),
        ("q strides", replace(d, q=d.q.transpose(1, 2).contiguous().transpose(1, 2)), dict(causal=True)),
        ("wider table", wide, dict(causal=True)),
        ("int64 lengths", replace(d, lens=d.lens.long()), dict(causal=True)),
    ]
    with torch.no_grad():
        for _ in range(2):
            for name, dd, kw in variants:
                ref, base, mask = oracle(dd, kw)
                for paged in (True, False):
                    k, v = (dd.kp, dd.vp) if paged else (dd.k, dd.v)
                    out, lse = attnkit.attention(dd.q, k, v, backend="triton", return_lse=True,
                                                 **contract_kw(dd, kw, paged))
                    check(out, lse, ref, base, mask, torch.float32, name=f"{name}, paged={paged}")
    assert len(da._PLANS) == 2 * (len(variants) - 1)  # int64 lengths: causal's plan (the launch reads dtypes)


@pytest.fixture
def count_requests(monkeypatch):
    """Counts the requests attnkit.attention builds for calls against a cache (a replayed call builds
    none), from a clean slate."""
    calls = []
    orig = functional.build_request

    def wrapped(*a, **kw):
        if kw.get("cache_seqlens") is not None:
            calls.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(functional, "build_request", wrapped)
    dispatch.clear_cache()
    yield calls
    dispatch.clear_cache()


def test_decode_steps_replay_without_a_request(tdevice, count_requests):
    """The first call of a structure builds its request; later steps with new queries and lengths
    (written in place, as a cache does) replay it and match the oracle. Variants differing in one
    scalar each get their own replay (a key without it would replay the wrong call)."""
    d = make_decode(3, 8, 2, 2, 64, [40, 21, 9], 16, device=tdevice, seed=13, sinks=True)
    nosinks = replace(d, sinks=None)
    variants = [(nosinks, dict(causal=True)), (nosinks, dict(causal=True, window=5)),
                (nosinks, dict(causal=True, window=(6, 0))), (nosinks, dict(causal=True, softcap=2.0)),
                (nosinks, dict(causal=True, scale=0.3)), (d, dict(causal=True)), (nosinks, {}),
                (nosinks, dict(causal=True, return_lse=True))]
    g = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for step in range(3):
            for i, (dd, kw) in enumerate(variants):
                dd.q.copy_(randn(*dd.q.shape, gen=g, device=tdevice))
                dd.lens.copy_(torch.tensor([40 - step, 21 + step, 9 - 3 * step], dtype=torch.int32))
                ref, base, mask = oracle(dd, kw)
                res = attnkit.attention(dd.q, dd.kp, dd.vp, backend="triton", **contract_kw(dd, kw, True))
                out, lse = res if kw.get("return_lse") else (res, None)
                check(out, lse, ref, base, mask, torch.float32, name=f"step {step}, {kw}")
                assert len(count_requests) == (len(variants) if step else i + 1), "a repeated step built a request"
        q = d.q.clone().requires_grad_(True)  # a gradient to record: the full path (the flash kernel)
        with torch.enable_grad():
            attnkit.attention(q, d.kp, d.vp, backend="triton", **contract_kw(nosinks, {}, True))
        assert len(count_requests) == len(variants) + 1
    dispatch.clear_cache()  # what registering a backend does: the next call builds its request again
    with torch.no_grad():
        attnkit.attention(d.q, d.kp, d.vp, backend="triton", **contract_kw(nosinks, {}, True))
    assert len(count_requests) == len(variants) + 2


def test_decode_kernel_plain_decode_without_lengths(tdevice, spy_decode):
    """A decode-shaped call without cache_seqlens (every key valid) also runs the decode kernel,
    bottom-right causal included (Lq > Lk: the first rows see nothing)."""
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for Lq, Lk in ((1, 37), (8, 21), (16, 5)):
            q, k, v = randn(2, 4, Lq, 32, gen=g, device=tdevice), randn(2, 2, Lk, 32, gen=g, device=tdevice), \
                randn(2, 2, Lk, 32, gen=g, device=tdevice)
            out, lse = attnkit.attention(q, k, v, causal=True, return_lse=True, backend="triton")
            ref, rl = attnkit.attention(q.double(), k.double(), v.double(), causal=True, return_lse=True,
                                        backend="reference")
            assert_close_rel(out, ref)
            assert_lse_close(lse, rl)
    assert len(spy_decode) == 3


def test_triton_cache_calls_that_are_not_decode_shaped(tdevice, spy_decode):
    """More than 16 queries, or a gradient: the triton backend densifies (gathered K/V + mask)
    and runs its flash kernel; forward and gradients into the pool match the oracle."""
    d = make_decode(2, 4, 2, 20, 32, [45, 30], 16, device=tdevice, seed=10)
    kw = dict(causal=True)
    ref, base, mask = oracle(d, kw)
    q, kp, vp = (x.clone().requires_grad_(True) for x in (d.q, d.kp, d.vp))
    out = attnkit.attention(q, kp, vp, backend="triton", **contract_kw(d, kw, True))
    check(out.detach(), None, ref, base, mask, torch.float32)
    assert not spy_decode
    gq = torch.autograd.grad(out.sum(), q)[0]
    q64 = d.q.double().requires_grad_(True)
    r = attnkit.attention(q64, d.k.double(), d.v.double(), mask=mask, backend="reference")
    assert_close_rel(gq, torch.autograd.grad(r.sum(), q64)[0], rtol=5e-5, name="grad q")


# ---------------------------------------------------------------------------
# the shared helper through the CPU backends (forward, and backward into the pool)
# ---------------------------------------------------------------------------

HELPER_CASES = [
    ("plain_lse", dict(return_lse=True), False),
    ("causal_lq4", dict(causal=True), False),
    ("window_softcap_sinks", dict(causal=True, window=7, softcap=2.0, return_lse=True), True),
    ("window_lr", dict(window=(6, 2)), False),
]
# what each backend is specified not to do (README table): the helper does not change that
LACKS = {"sdpa": {"softcap", "sinks"}, "flex": {"sinks", "return_lse"}}


@pytest.mark.parametrize("backend", ["reference", "chunked", "sdpa", "flex"])
@pytest.mark.parametrize("name,kw,sinks", HELPER_CASES, ids=[c[0] for c in HELPER_CASES])
def test_cpu_backends_paged_and_contiguous(backend, name, kw, sinks):
    lacks = LACKS.get(backend, set())
    if (sinks and "sinks" in lacks) or (set(kw) & lacks):
        pytest.skip(f"{backend} does not take {sorted((set(kw) | ({'sinks'} if sinks else set())) & lacks)}")
    if backend == "flex" and name != "causal_lq4":
        pytest.skip("flex compiles per shape on the CPU: one case is enough")
    Lq = 4 if name == "causal_lq4" else 1
    d = make_decode(4, 8, 2, Lq, 16, [37, 20, 1, 0], 8, seed=11, sinks=sinks)
    ref, base, mask = oracle(d, kw)
    for paged in (True, False):
        k, v = (d.kp, d.vp) if paged else (d.k, d.v)
        res = attnkit.attention(d.q, k, v, backend=backend, **contract_kw(d, kw, paged))
        out, lse = res if isinstance(res, tuple) else (res, None)
        check(out, lse, ref, base, mask, torch.float32, name=f"{backend} {'paged' if paged else 'contiguous'}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backend", ["chunked", "sdpa"])
def test_cpu_backends_low_precision(backend, dtype):
    d = make_decode(4, 8, 2, 4, 64, [37, 20, 1, 0], 16, dtype=dtype, seed=12)
    kw = dict(causal=True)
    ref, base, mask = oracle(d, kw)
    out = attnkit.attention(d.q, d.kp, d.vp, backend=backend, **contract_kw(d, kw, True))
    check(out, None, ref, base, mask, dtype, name=backend)


@pytest.mark.parametrize("backend", ["reference", "chunked", "sdpa"])
def test_helper_gradients_into_the_pool(backend):
    """Gradients reach q and the pool; a block shared by two sequences gets both their parts.
    Oracle: per-sequence plain calls (no cache_seqlens) on K/V sliced from a float64 pool by hand."""
    d = make_decode(3, 4, 2, 2, 16, [37, 21, 5], 8, seed=13)
    kw = dict(causal=True, window=30)
    g_out = randn(3, 4, 2, 16, gen=torch.Generator().manual_seed(14))
    leaves = [x.clone().requires_grad_(True) for x in (d.q, d.kp, d.vp)]
    out = attnkit.attention(*leaves, backend=backend, cache_seqlens=d.lens, block_table=d.table, **kw)
    grads = torch.autograd.grad((out * g_out).sum(), leaves)

    l64 = [x.detach().double().requires_grad_(True) for x in (d.q, d.kp, d.vp)]
    outs = []
    for b, n in enumerate(d.lens.tolist()):
        blocks = d.table[b, :-(-n // d.bs)].tolist()
        k = torch.cat([l64[1][i] for i in blocks], dim=1)[None, :, :n]  # [1, Hkv, n, D]
        v = torch.cat([l64[2][i] for i in blocks], dim=1)[None, :, :n]
        outs.append(attnkit.attention(l64[0][b:b + 1], k, v, backend="reference", **kw))
    ref = torch.cat(outs)
    rgrads = torch.autograd.grad((ref * g_out.double()).sum(), l64)
    assert_close_rel(out, ref)
    shared = d.table[0, 0].item()
    assert shared == d.table[1, 0].item(), "the setup shares the first block"
    assert grads[1][shared].abs().sum() > 0
    for name, a, r in zip(("q", "k pool", "v pool"), grads, rgrads):
        assert_close_rel(a, r, rtol=5e-5, name=f"grad {name}")


def test_densified_request():
    """The helper's request: gathered K/V of the logical length, lengths + per-sequence bounds as a
    mask and-ed with the user's; causal/window gone; the user's mask kept."""
    d = make_decode(3, 4, 2, 2, 16, [37, 20, 0], 8, seed=15)
    user = torch.rand(3, 1, 1, d.table.shape[1] * 8, generator=torch.Generator().manual_seed(1)) > 0.3
    req = build_request(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table, causal=True, window=9,
                        mask=user)
    plain = req.densified()
    assert plain.cache_seqlens is None and plain.block_table is None and not plain.causal and plain.window is None
    assert plain.k.shape == d.k.shape and plain.v.shape == d.v.shape
    for b, n in enumerate(d.lens.tolist()):
        assert torch.equal(plain.k[b, :, :n], d.k[b, :, :n]) and torch.equal(plain.v[b, :, :n], d.v[b, :, :n])
    want = allowed_mask(d.lens, 2, d.k.shape[2], causal=True, window=9) & user
    assert torch.equal(plain.mask.expand_as(want), want)
    assert "kv_lengths" not in plain.features() and "mask" in plain.features()
    assert build_request(d.q, d.k, d.v).densified().k is d.k  # nothing to fold: the same request


# ---------------------------------------------------------------------------
# request shapes, features, dispatch
# ---------------------------------------------------------------------------


def test_request_shapes_and_features():
    d = make_decode(3, 8, 2, 4, 16, [37, 20, 1], 8, seed=16)
    req = build_request(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table, causal=True)
    W = d.table.shape[1]
    assert (req.batch, req.heads_q, req.heads_kv, req.len_q, req.len_k) == (3, 8, 2, 4, W * 8)
    assert req.block_size == 8 and req.head_dim == 16 and req.head_dim_v == 16
    assert {"kv_lengths", "paged", "causal", "gqa"} <= req.features()
    assert req.decode_shaped
    assert "block_table [3, %d] (block size 8)" % W in req.describe()
    contiguous = build_request(d.q, d.k, d.v, cache_seqlens=d.lens)
    assert "kv_lengths" in contiguous.features() and "paged" not in contiguous.features()
    assert contiguous.len_k == d.k.shape[2] and contiguous.block_size is None
    # not decode-shaped: more queries than the kernel takes, a mask, a gradient
    q17 = torch.randn(3, 8, 17, 16)
    assert not build_request(q17, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table).decode_shaped
    assert not build_request(d.q, d.k, d.v, cache_seqlens=d.lens, mask=torch.ones(1, dtype=torch.bool)).decode_shaped
    assert not build_request(d.q.requires_grad_(True), d.k, d.v, cache_seqlens=d.lens).decode_shaped
    # a signature per decode-shapedness: the cached choice must not leak between the two
    assert req.signature != build_request(q17, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table,
                                          causal=True).signature
    # the logical length is what a mask / bias must broadcast to
    build_request(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table, bias=torch.randn(W * 8))
    assert torch.equal(build_request(d.q, d.k, d.v, cache_seqlens=5).cache_seqlens, torch.full((3,), 5, dtype=torch.int32))


def test_explain_and_auto_on_cpu():
    d = make_decode(2, 4, 2, 1, 16, [20, 9], 8, seed=17)
    plan = attnkit.explain(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table, causal=True)
    assert plan.backend == "sdpa"
    assert "paged" in plan.request and "kv_lengths" in plan.request
    plan = attnkit.explain(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table, softcap=5.0)
    assert plan.backend == "chunked" and "'softcap'" in plan.passed_over["sdpa"]


def test_num_splits_heuristic():
    cpu = torch.device("cpu")  # 2 "SMs" in the heuristic: few programs in the interpreter
    slots = da.PROGRAMS_PER_SM * 2
    assert da.num_splits_for(1, 100_000, cpu) == slots  # one full wave
    assert da.num_splits_for(4, 100_000, cpu) * 4 % slots == 0  # whole waves
    assert da.num_splits_for(1, 3 * da.MIN_KEYS_PER_SPLIT - 1, cpu) == 3  # at least MIN_KEYS_PER_SPLIT keys
    assert da.num_splits_for(1, da.MIN_KEYS_PER_SPLIT, cpu) == 1
    assert da.num_splits_for(64, 100_000, cpu) == 1
    assert da.num_splits_for(1, 10**9, cpu) <= da.MAX_SPLITS


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

B_, HQ, HKV, D_, BS, NB, W_ = 2, 4, 2, 8, 4, 6, 3


def _paged_inputs():
    g = torch.Generator().manual_seed(18)
    q = randn(B_, HQ, 1, D_, gen=g)
    kp, vp = randn(NB, HKV, BS, D_, gen=g), randn(NB, HKV, BS, D_, gen=g)
    table = torch.tensor([[0, 1, -1], [2, 3, 4]], dtype=torch.int32)
    lens = torch.tensor([5, 12], dtype=torch.int32)
    return q, kp, vp, table, lens


def _i32(*rows):
    return torch.tensor(rows, dtype=torch.int32)


BAD = [
    # (id, changes to the (q, k, v, kwargs) of a valid paged call, exception, words)
    ("seqlens_float", lambda a: a["kw"].update(cache_seqlens=torch.tensor([5.0, 12.0])), TypeError,
     ["cache_seqlens", "int32/int64", "float32"]),
    ("seqlens_bool", lambda a: a["kw"].update(cache_seqlens=True), TypeError, ["cache_seqlens"]),
    ("seqlens_list", lambda a: a["kw"].update(cache_seqlens=[5, 12]), TypeError, ["cache_seqlens", "list"]),
    ("seqlens_shape", lambda a: a["kw"].update(cache_seqlens=_i32(5, 12, 1)), ValueError,
     ["cache_seqlens", r"\[B\] = \[2\]", r"\[3\]"]),
    ("seqlens_2d", lambda a: a["kw"].update(cache_seqlens=_i32([5, 12])), ValueError, ["cache_seqlens", r"\[1, 2\]"]),
    ("seqlens_device", lambda a: a["kw"].update(cache_seqlens=torch.tensor([5, 12], device="meta")), ValueError,
     ["cache_seqlens", "meta"]),
    ("seqlens_past_logical_length", lambda a: a["kw"].update(cache_seqlens=_i32(5, 13)), ValueError,
     ["cache_seqlens", r"\[0, 12\]", "13"]),
    ("seqlens_negative", lambda a: a["kw"].update(cache_seqlens=_i32(-1, 3)), ValueError, ["cache_seqlens", "-1"]),
    ("seqlens_int_too_big", lambda a: a["kw"].update(cache_seqlens=99), ValueError, ["cache_seqlens", "99"]),
    ("table_without_seqlens", lambda a: a["kw"].pop("cache_seqlens"), ValueError, ["block_table", "cache_seqlens"]),
    ("table_int64", lambda a: a["kw"].update(block_table=a["kw"]["block_table"].long()), TypeError,
     ["block_table", "int32", "int64"]),
    ("table_1d", lambda a: a["kw"].update(block_table=_i32(0, 1, 2)), TypeError, ["block_table", r"\[3\]"]),
    ("table_rows", lambda a: a["kw"].update(block_table=_i32([0, 1, 2])), ValueError,
     ["block_table", "B = 2", r"\[1, 3\]"]),
    ("table_empty", lambda a: a["kw"].update(block_table=torch.zeros(2, 0, dtype=torch.int32)), ValueError,
     ["block_table", "column"]),
    ("table_device", lambda a: a["kw"].update(block_table=a["kw"]["block_table"].to("meta")), ValueError,
     ["block_table", "meta"]),
    ("table_id_out_of_range", lambda a: a["kw"]["block_table"].__setitem__((1, 2), NB), ValueError,
     [r"block_table\[1, 2\] = 6", "6 blocks", "12 tokens"]),
    ("table_id_negative_in_use", lambda a: a["kw"]["block_table"].__setitem__((0, 1), -1), ValueError,
     [r"block_table\[0, 1\] = -1"]),
    ("pool_block_size_not_pow2", lambda a: a.update(k=a["k"][:, :, :3], v=a["v"][:, :, :3]), ValueError,
     ["power-of-two", "block", r"\[6, 2, 3, 8\]"]),
    ("pool_num_blocks_mismatch", lambda a: a.update(v=a["v"][:5]), ValueError, ["blocks", r"\[6, 2, 4, 8\]", r"\[5, 2, 4, 8\]"]),
    ("pool_block_size_mismatch", lambda a: a.update(v=a["v"][:, :, :2]), ValueError, ["block size"]),
    ("pool_heads_mismatch", lambda a: a.update(v=a["v"][:, :1]), ValueError, ["heads"]),
    ("pool_rank3", lambda a: a.update(k=a["k"][0]), ValueError, [r"\bk\b", "4-D"]),
    ("pool_no_blocks", lambda a: (a.update(k=a["k"][:0], v=a["v"][:0]), a["kw"]["block_table"].fill_(-1),
                                  a["kw"].update(cache_seqlens=_i32(0, 0))), ValueError,
     ["at least one block", r"\[0, 2, 4, 8\]"]),
    ("mask_not_logical_length", lambda a: a["kw"].update(mask=torch.ones(4, dtype=torch.bool)), ValueError,
     ["mask", "broadcast", r"\[2, 4, 1, 12\]"]),
    ("contiguous_seqlens_past_lk", lambda a: (a.update(k=a["k"][:2], v=a["v"][:2]), a["kw"].pop("block_table")),
     ValueError, ["cache_seqlens", r"\[0, 4\]"]),
]


@pytest.mark.parametrize("mutate,exc,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_cache_arguments(mutate, exc, words):
    q, kp, vp, table, lens = _paged_inputs()
    a = {"q": q, "k": kp, "v": vp, "kw": dict(cache_seqlens=lens, block_table=table)}
    mutate(a)
    for fn in (attnkit.attention, attnkit.explain, build_request):
        with pytest.raises(exc) as ei:
            fn(a["q"], a["k"], a["v"], **a["kw"])
        for w in words:
            assert re.search(w, str(ei.value)), f"{w!r} not in message: {ei.value}"


def test_replay_key_covers_what_the_checks_read():
    """replay_key declines what it cannot key exactly, and keys apart what the checks tell apart."""
    q, kp, vp, table, lens = _paged_inputs()
    base = dict(causal=True, window=None, scale=None, softcap=None, sinks=None, dropout_p=0.0, return_lse=False,
                cache_seqlens=lens, block_table=table)
    key = replay_key(q, kp, vp, **base)
    assert key is not None
    declined = dict(causal=1, window=[3, 0], scale=True, softcap=torch.tensor(2.0), return_lse=0,
                    dropout_p=0.1, cache_seqlens=5)
    for name, value in declined.items():
        assert replay_key(q, kp, vp, **dict(base, **{name: value})) is None, name
    assert replay_key(torch.nn.Parameter(q), kp, vp, **base) is None  # a subclass
    with torch.enable_grad():
        assert replay_key(q.clone().requires_grad_(True), kp, vp, **base) is None
    others = [dict(window=3), dict(window=(3, None)), dict(scale=0.5), dict(softcap=2.0), dict(return_lse=True),
              dict(causal=False), dict(cache_seqlens=lens.long()), dict(block_table=table[:, :2]),
              dict(block_table=None), dict(sinks=torch.zeros(HQ))]
    keys = {key} | {replay_key(q, kp, vp, **dict(base, **o)) for o in others}
    keys |= {replay_key(q.double(), kp, vp, **base), replay_key(q[:, :2], kp, vp, **base),
             replay_key(q, kp.to("meta"), vp, **base)}
    assert len(keys) == len(others) + 4


@pytest.mark.parametrize("mutate,exc,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_cache_arguments_after_replayed_steps(mutate, exc, words, count_requests):
    """Every check still fires once a valid call of the same structure is being replayed (in-place
    changes of the lengths' or the table's values included: CPU values are checked per call)."""
    if not TRITON_INTERPRET:
        pytest.skip("replays run on the triton backend: on the CPU under TRITON_INTERPRET=1")
    q, kp, vp, table, lens = _paged_inputs()
    a = {"q": q, "k": kp, "v": vp, "kw": dict(cache_seqlens=lens, block_table=table)}
    with torch.no_grad():
        for _ in range(2):
            attnkit.attention(q, kp, vp, backend="triton", **a["kw"])
        assert len(count_requests) == 1
        mutate(a)
        with pytest.raises(exc) as ei:
            attnkit.attention(a["q"], a["k"], a["v"], backend="triton", **a["kw"])
    for w in words:
        assert re.search(w, str(ei.value)), f"{w!r} not in message: {ei.value}"


def test_padding_entries_are_never_checked_or_read():
    """Entries past a sequence's last used block may hold anything (-1, out of range)."""
    q, kp, vp, table, lens = _paged_inputs()
    table[0, 2] = 10**6
    lens[0] = 8  # exactly 2 blocks: entry 2 is padding
    out = attnkit.attention(q, kp, vp, cache_seqlens=lens, block_table=table, backend="reference")
    assert torch.isfinite(out).all()
    lens[1] = 0
    table[1] = -5  # a dead sequence reads nothing
    attnkit.attention(q, kp, vp, cache_seqlens=lens, block_table=table)


@pytest.mark.parametrize("backend", ["reference", "chunked", "sdpa", "flex", "triton"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("Lq,grad", [(4, True), (20, False)], ids=["4q_grad", "20q"])
def test_unwritten_cache_slots_never_reach_the_result(backend, paged, Lq, grad):
    """Slots past a sequence's length (a torch.empty cache, a free block that -1 padding is clamped
    to) may hold NaN: calls that gather and mask the cache must not let it in through p @ v or
    ds @ k (0 * NaN). The result equals the same call over a cache with finite values there."""
    if backend == "triton" and not TRITON_INTERPRET:
        pytest.skip("the triton backend runs on the CPU only with TRITON_INTERPRET=1")
    if backend == "flex" and grad:
        pytest.skip("flex has no backward on the CPU")
    g = torch.Generator().manual_seed(47)
    B, Hq, Hkv, D, bs = 2, 4, 2, 16, 8
    lens = torch.tensor([13, 24], dtype=torch.int32)
    if paged:
        k, v = (torch.randn(6, Hkv, bs, D, generator=g) for _ in range(2))
        table = torch.tensor([[1, 2, -1], [3, 4, 5]], dtype=torch.int32)
        unwritten = torch.zeros(6, Hkv, bs, D, dtype=torch.bool)
        unwritten[0] = True  # free: entry -1 is clamped to it
        unwritten[2, :, 13 - bs:] = True  # the tail of sequence 0's last block
    else:
        k, v = (torch.randn(B, Hkv, 3 * bs, D, generator=g) for _ in range(2))
        table = None
        unwritten = torch.arange(3 * bs).view(1, 1, -1, 1) >= lens.view(-1, 1, 1, 1)
        unwritten = unwritten.expand(B, Hkv, 3 * bs, D)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    results = []
    for fill in (float("nan"), 0.0):
        kk, vv = k.masked_fill(unwritten, fill), v.masked_fill(unwritten, fill)
        qq = q.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = attnkit.attention(qq, kk, vv, cache_seqlens=lens, block_table=table, causal=True, backend=backend)
        results.append((out, torch.autograd.grad(out.sum(), qq)[0] if grad else None))
    (out_nan, dq_nan), (out_ok, dq_ok) = results
    assert torch.isfinite(out_ok).all()
    torch.testing.assert_close(out_nan, out_ok, rtol=0, atol=0)
    if grad:
        torch.testing.assert_close(dq_nan, dq_ok, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# MultiHeadAttention: decoding passes the cache in place
# ---------------------------------------------------------------------------


def _spy_mha(**cfg):
    seen = []

    def spy(q, k, v, **kw):
        seen.append({n: kw.get(n) for n in ("cache_seqlens", "block_table", "mask", "causal", "window")})
        return attnkit.attention(q, k, v, **kw)

    torch.manual_seed(19)
    return attnkit.MultiHeadAttention(attnkit.AttentionConfig(attention_fn=spy, **cfg)), seen


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "contiguous"])
def test_mha_decodes_through_cache_seqlens(paged):
    mod, seen = _spy_mha(d_model=32, n_heads=4, use_gqa=True, gqa_groups=2, window=5)
    cache = mod.new_paged_kv_cache(8, 16) if paged else mod.new_kv_cache(2, 40)
    if paged:
        cache.bind([cache.add_sequence(), cache.add_sequence()])
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        mod(x[:, :20], kv_cache=cache)
        mod(x[:, 20:], kv_cache=cache)
    for s in seen:
        assert s["mask"] is None and s["causal"] is True and s["window"] == 5
        assert s["cache_seqlens"] is not None and (s["block_table"] is not None) == paged
    assert seen[-1]["cache_seqlens"].tolist() == [21, 21]
    if not paged:
        assert seen[-1]["cache_seqlens"] is cache.lengths  # the live tensor: CUDA graphs replay it


def test_mha_general_path_keeps_gather_and_mask():
    """Learnable sink tokens (K/V rows the cache does not hold) and user masks take the gather +
    key-mask path; nothing is appended twice."""
    mod, seen = _spy_mha(d_model=32, n_heads=4, use_attention_sinks=True, num_attention_sinks=2)
    cache = mod.new_paged_kv_cache(8, 16)
    cache.bind([cache.add_sequence()])
    with torch.no_grad():
        mod(torch.randn(1, 5, 32), kv_cache=cache)
    assert seen[-1]["cache_seqlens"] is None and seen[-1]["mask"] is not None
    assert cache.lengths().tolist() == [5]
    mod2, seen2 = _spy_mha(d_model=32, n_heads=4)
    c2 = mod2.new_kv_cache(1, 10)
    with torch.no_grad():
        mod2(torch.randn(1, 3, 32), kv_cache=c2, mask=torch.ones(1, 1, 3, 10, dtype=torch.bool))
    assert seen2[-1]["cache_seqlens"] is None and c2.host_lengths == [3]


@pytest.mark.parametrize("cfg", [dict(), dict(use_gqa=True, gqa_groups=1, use_rope=True, window=9)],
                         ids=["mha", "mqa_rope_window"])
def test_mha_paged_decode_on_triton_equals_recompute(cfg, tdevice):
    """Prefill (21 tokens: densified + flash kernel), then 1- and 4-token steps (decode kernel)."""
    torch.manual_seed(20)
    mod = attnkit.MultiHeadAttention(attnkit.AttentionConfig(d_model=64, n_heads=4, backend="triton", **cfg))
    ref_mod = attnkit.MultiHeadAttention(attnkit.AttentionConfig(d_model=64, n_heads=4, backend="reference", **cfg))
    ref_mod.load_state_dict(mod.state_dict())
    mod, ref_mod = mod.to(tdevice), ref_mod.to(tdevice)
    x = randn(2, 30, 64, gen=torch.Generator().manual_seed(21), device=tdevice)
    with torch.no_grad():
        full = ref_mod(x, causal=True)
        cache = mod.new_paged_kv_cache(8, 16, allocation_order=[5, 2, 7, 0, 3, 6, 1, 4])
        cache.bind([cache.add_sequence(), cache.add_sequence()])
        outs = [mod(x[:, :21], kv_cache=cache)]
        for t0, t1 in ((21, 22), (22, 26), (26, 30)):
            outs.append(mod(x[:, t0:t1], kv_cache=cache))
    assert_close_tol(torch.cat(outs, 1), full, 1e-4)


# ---------------------------------------------------------------------------
# CUDA: real shapes
# ---------------------------------------------------------------------------


def _cuda_decode(B, Hq, Hkv, Lq, D, lens, bs, dtype, seed, sinks=False) -> Decode:
    """make_decode, built on the CPU in float32 and moved (the builder is a Python loop over blocks)."""
    return make_decode(B, Hq, Hkv, Lq, D, lens, bs, dtype=dtype, device="cuda", seed=seed, sinks=sinks)


CUDA_CASES = [
    # (name, B, Hq, Hkv, Lq, D, lens, bs, kw, sinks)
    ("llama_gqa4_d128_bs16", 8, 32, 8, 1, 128, [4000, 3001, 17, 1, 2500, 999, 3333, 0], 16, dict(causal=True), False),
    ("llama_gqa4_d128_bs256_lq4", 8, 32, 8, 4, 128, [4000, 3001, 17, 1, 2500, 999, 3333, 5], 256,
     dict(causal=True, return_lse=True), False),
    ("mha_d64_bs16_window", 4, 16, 16, 1, 64, [3000, 2049, 700, 33], 16, dict(causal=True, window=512), False),
    ("gqa8_d256_bs256_softcap_sinks", 2, 16, 2, 4, 256, [2900, 1500], 256,
     dict(causal=True, softcap=30.0, return_lse=True), True),
    ("gqa8_d64_bs16_lq1_lr_window", 3, 8, 1, 1, 64, [1234, 77, 4095], 16, dict(window=(300, 0)), False),
    ("gqa4_d128_bs16_lq16", 2, 8, 2, 16, 128, [2047, 300], 16, dict(causal=True, return_lse=True), False),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=[c[0] for c in CUDA_CASES])
def test_cuda_decode_kernel(case, dtype, spy_decode):
    name, B, Hq, Hkv, Lq, D, lens, bs, kw, sinks = case
    d = _cuda_decode(B, Hq, Hkv, Lq, D, lens, bs, dtype, seed=len(name), sinks=sinks)
    ref, base, mask = oracle(d, kw)
    with torch.no_grad():
        for paged in (True, False):
            k, v = (d.kp, d.vp) if paged else (d.k, d.v)
            res = attnkit.attention(d.q, k, v, **contract_kw(d, kw, paged))  # auto: must pick triton
            out, lse = res if isinstance(res, tuple) else (res, None)
            check(out, lse, ref, base, mask, dtype, name=f"{name} {'paged' if paged else 'contiguous'}")
    assert len(spy_decode) == 2, "auto must run the decode kernel on CUDA decode calls with cache_seqlens"


@pytest.mark.cuda
@pytest.mark.parametrize("splits", [1, 5, 128])
def test_cuda_decode_split_counts(splits):
    d = _cuda_decode(2, 32, 8, 1, 128, [3000, 1], 16, torch.bfloat16, seed=30, sinks=True)
    kw = dict(causal=True)
    ref, base, mask = oracle(d, kw)
    out, lse = da.decode_attention(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table,
                                   sinks=d.sinks, bounds=(None, 0), num_splits=splits)
    check(out, lse, ref, base, mask, torch.bfloat16)


@pytest.mark.cuda
def test_cuda_decode_counter_sets_are_bounded_across_streams(monkeypatch):
    """One arrival-counter set per stream, the oldest dropped past _MAX_COUNTERS: calls on more
    streams than that stay correct (a dropped stream gets a fresh zeroed set when it comes back)."""
    monkeypatch.setattr(da, "_COUNTERS", {})
    monkeypatch.setattr(da, "_MAX_COUNTERS", 2)
    d = _cuda_decode(2, 32, 8, 1, 128, [3000, 700], 16, torch.bfloat16, seed=33, sinks=True)
    ref, base, mask = oracle(d, dict(causal=True))
    streams = [torch.cuda.current_stream()] + [torch.cuda.Stream(priority=p) for p in (0, -1)]
    for rnd in range(2):
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                out, lse = da.decode_attention(d.q, d.kp, d.vp, cache_seqlens=d.lens, block_table=d.table,
                                               sinks=d.sinks, bounds=(None, 0), num_splits=5)
            torch.cuda.current_stream().wait_stream(s)
            check(out, lse, ref, base, mask, torch.bfloat16, name=f"round {rnd}, stream {s.cuda_stream}")
            assert len(da._COUNTERS) <= 2
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in da._COUNTERS.values())


@pytest.mark.cuda
def test_cuda_auto_picks_triton_for_paged_decode():
    d = _cuda_decode(2, 32, 8, 1, 128, [100, 50], 16, torch.bfloat16, seed=31)
    kw = dict(cache_seqlens=d.lens, block_table=d.table, causal=True)
    assert attnkit.explain(d.q, d.kp, d.vp, **kw).backend == "triton"
    assert attnkit.explain(d.q, d.k, d.v, cache_seqlens=d.lens).backend == "triton"
    # with a gradient the decode kernel cannot serve: triton's flash kernel is not preferred then
    q = d.q.clone().requires_grad_(True)
    assert attnkit.explain(q, d.kp, d.vp, **kw).backend != "triton"


PLAIN_CASES = [
    # (name, B, Hq, Hkv, Lq, D, Dv, Lk, kw): decode steps over plain K/V tensors (no cache_seqlens)
    ("gqa4_d128_lq1", 3, 32, 8, 1, 128, 128, 1000, dict(causal=True)),
    ("gqa4_d128_lq4_lse", 2, 32, 8, 4, 128, 128, 777, dict(causal=True, return_lse=True)),
    ("mha_d64_lq16_window", 2, 8, 8, 16, 64, 64, 300, dict(causal=True, window=100)),
    ("gqa8_d256_lq1_softcap", 2, 16, 2, 1, 256, 256, 513, dict(causal=True, softcap=30.0)),
    ("mqa_d80_lq3_not_causal", 2, 8, 1, 3, 80, 80, 129, dict()),
    ("gqa2_d40_lq1_key1", 2, 4, 2, 1, 40, 40, 1, dict(causal=True)),
    ("gqa4_d64_lq4_key2_rows_dead", 2, 8, 2, 4, 64, 64, 2, dict(causal=True, return_lse=True)),  # rows 0-1: no key
    ("gqa2_d64_dv24_lq8_square", 2, 4, 2, 8, 64, 24, 8, dict(causal=True)),  # Lq == Lk, Dv != D
    ("gqa4_d48_lq2_sinks", 2, 8, 2, 2, 48, 48, 70, dict(causal=True, sinks=True)),
]


@pytest.mark.parametrize("case", PLAIN_CASES, ids=[c[0] for c in PLAIN_CASES])
def test_decode_kernel_over_plain_kv_views(case, tdevice, spy_decode):
    """A model keeping its own cache calls attention with the new queries and every cached key. The decode
    kernel serves that call over K/V views that are not contiguous, in half precision (float32 in the
    interpreter), and matches the float64 reference as plain math does. On CUDA `auto` sends causal calls of
    2-16 queries to it (and any with sinks, under the sinks rule); one query, or a call that is not causal,
    stays with SDPA / flex (docs/benchmarks.md, "Decode steps over plain K/V tensors", "A cache that grows
    every step")."""
    name, B, Hq, Hkv, Lq, D, Dv, Lk, kw = case
    kw = dict(kw)
    cuda = tdevice == "cuda"
    g = torch.Generator(device=tdevice).manual_seed(len(name))
    sinks = torch.randn(Hq, device=tdevice, generator=g) if kw.pop("sinks", False) else None
    for dtype in (torch.bfloat16, torch.float16) if cuda else (torch.float32,):
        q = torch.randn(B, Lq, Hq, D, device=tdevice, dtype=dtype, generator=g).transpose(1, 2)  # [B, Hq, Lq, D] view
        k = torch.randn(B, Lk, Hkv, D + 8, device=tdevice, dtype=dtype, generator=g)[..., :D].transpose(1, 2)
        v = torch.randn(B, Lk, Hkv, Dv, device=tdevice, dtype=dtype, generator=g).transpose(1, 2)
        s = None if sinks is None else sinks.to(dtype)
        if cuda:  # (with sinks, triton's sinks rule takes the call, and its decode kernel serves it)
            ours = s is not None or (kw.get("causal", False) and Lq > 1)
            assert (attnkit.explain(q, k, v, sinks=s, **kw).backend == "triton") == ours, name
        calls = len(spy_decode)
        with torch.no_grad():
            res = attnkit.attention(q, k, v, sinks=s, backend="triton", **kw)
        assert len(spy_decode) == calls + 1, f"{name}: the decode kernel did not run"
        out, lse = res if kw.get("return_lse") else (res, None)
        rkw = {n: kw[n] for n in ("causal", "window", "softcap") if n in kw}
        ref = attnkit.attention(q.double(), k.double(), v.double(), return_lse=True, backend="reference",
                                sinks=None if s is None else s.double(), **rkw)
        mask = allowed_mask(torch.full((B,), Lk), Lq, Lk, kw.get("causal", False), kw.get("window")).to(tdevice)
        extra = {"softcap": kw["softcap"]} if "softcap" in kw else {}
        base = naive_attention(q, k, v, mask=mask, sinks=s, return_lse=True, **extra)
        check(out, lse, ref, base, mask, dtype, name=f"{name} {dtype}")


def test_decode_kernel_over_a_growing_plain_cache(tdevice, monkeypatch):
    """A model's own cache grows by a token per step: k/v arrive as plain tensors one key longer each call,
    either new tensors (torch.cat, as transformers' DynamicCache grows: new strides) or longer views of one
    buffer. The decode kernel keeps one plan per split cap (MIN_KEYS_PER_SPLIT made 32 here, and 64 SMs
    assumed, so the lengths cross several caps and the later plans run several splits), not one per
    length, and gives the length and strides to each launch. On a GPU a plan compiles a kernel (Triton's
    own path) once per combination of what Triton specialises those ints on (== 1, a multiple of 16), and
    only then; every step must still match the float64 reference, so a kernel compiled for a length that is
    a multiple of 16 never runs one that is not."""
    from attnkit.ops import _launch
    monkeypatch.setattr(da, "_PLANS", {})
    monkeypatch.setattr(da, "MIN_KEYS_PER_SPLIT", 32)
    monkeypatch.setattr(da, "_sm_count", lambda device: 64)
    builds = []
    orig_compile = _launch._compile
    monkeypatch.setattr(_launch, "_compile", lambda *a, **kw: builds.append(1) or orig_compile(*a, **kw))
    cuda = tdevice == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    B, Hq, Hkv, Lq, D = 2, 8, 2, 3, 40
    lengths = [1, 2, 3, 15, 16, 17, 32, 33, 47, 48, 64, 65, 99, 100]
    if cuda:  # key tiles of 128 there: longer caches for several splits
        lengths += [129, 200, 256, 257, 300]
    Lmax = lengths[-1]
    g = torch.Generator(device=tdevice).manual_seed(41)
    q = torch.randn(B, Hq, Lq, D, device=tdevice, dtype=dtype, generator=g)
    buf_k = torch.randn(B, Hkv, Lmax, D, device=tdevice, dtype=dtype, generator=g)
    buf_v = torch.randn(B, Hkv, Lmax, D, device=tdevice, dtype=dtype, generator=g)
    kinds = set()  # (split cap, what Triton specialises the 9 per-launch ints on)
    for grown in ("views", "cat"):
        for L in lengths:
            if grown == "views":
                k, v = buf_k[:, :, :L], buf_v[:, :, :L]
            else:  # fresh contiguous tensors: the batch and head strides change with L
                k = torch.cat([buf_k[:, :, :L - 1], buf_k[:, :, L - 1:L]], dim=2)
                v = torch.cat([buf_v[:, :, :L - 1], buf_v[:, :, L - 1:L]], dim=2)
            kinds.add((da._split_cap(L), tuple(map(_launch.int_spec, (*k.stride(), *v.stride(), L)))))
            with torch.no_grad():
                out, lse = attnkit.attention(q, k, v, causal=True, return_lse=True, backend="triton")
            ref = attnkit.attention(q.double(), k.double(), v.double(), causal=True, return_lse=True,
                                    backend="reference")
            mask = allowed_mask(torch.full((B,), L), Lq, L, True, None).to(tdevice)
            base = naive_attention(q, k, v, mask=mask, return_lse=True)
            check(out, lse, ref, base, mask, dtype, name=f"{grown} L={L}")
    caps = {da._split_cap(L) for L in lengths}
    assert len(da._PLANS) == len(caps), sorted(da._PLANS)
    assert max(p.split.grid[1] for p in da._PLANS.values()) > 1  # plans reused across lengths with splits
    if cuda:
        assert len(builds) == len(kinds) < 2 * len(lengths), (len(builds), len(kinds))
    plan = next(iter(da._PLANS.values()))
    with pytest.raises(TypeError, match="expected 9 ints per call, got 0"):
        plan.split(q, q, q, q, q, q, q, q, q, q)


@pytest.mark.cuda
def test_cuda_big_pool_int64_offsets():
    """A pool of more than 2**31 elements: blocks near its end must be addressed in int64."""
    nb, Hkv, bs, D = 70_000, 8, 16, 256  # 2.3e9 elements per pool (4.6 GB in bf16)
    kp = torch.empty(nb, Hkv, bs, D, device="cuda", dtype=torch.bfloat16)
    vp = torch.empty(nb, Hkv, bs, D, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(32)
    blocks = torch.tensor([[nb - 1, nb - 7, 3, nb - 2]], dtype=torch.int32, device="cuda")
    for b in blocks[0].tolist():
        kp[b].normal_(generator=g)
        vp[b].normal_(generator=g)
    q = torch.randn(1, 16, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    lens = torch.tensor([61], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        out = attnkit.attention(q, kp, vp, cache_seqlens=lens, block_table=blocks, backend="triton")
    k = torch.cat([kp[b] for b in blocks[0].tolist()], dim=1)[None, :, :61].double()
    v = torch.cat([vp[b] for b in blocks[0].tolist()], dim=1)[None, :, :61].double()
    ref = attnkit.attention(q.double(), k, v, backend="reference")
    base = naive_attention(q, k.to(q.dtype), v.to(q.dtype))
    assert_close_rel(out, ref, rel_err(base, ref))


@pytest.mark.cuda
def test_cuda_graph_decode_loop():
    """A decode step captured once replays correctly while the lengths grow (read on device)."""
    torch.manual_seed(33)
    B, Hq, Hkv, D, L = 4, 32, 8, 128, 512
    dt = torch.bfloat16
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dt)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=dt)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=dt)
    lens = torch.tensor([100, 7, 300, 1], dtype=torch.int32, device="cuda")
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                attnkit.attention(q, k, v, cache_seqlens=lens, causal=True)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = attnkit.attention(q, k, v, cache_seqlens=lens, causal=True)
        for step in range(3):
            lens.add_(37 * step)
            graph.replay()
            mask = allowed_mask(lens.cpu(), 1, L, causal=True).cuda()
            ref = attnkit.attention(q.double(), k.double(), v.double(), mask=mask, backend="reference")
            base = naive_attention(q, k, v, mask=mask)
            assert_close_rel(static, ref, rel_err(base, ref), name=f"replay {step}")


@pytest.mark.cuda
def test_cuda_split_decode_in_graphs_and_on_streams():
    """Split decoding on several streams at once: two captured graphs (torch captures both on one
    shared capture stream) replayed at the same time on two streams, while eager calls run on two
    others. Each stream has its own arrival counters and each graph its own (made during capture),
    so no launch sees another's counts: every result equals its value when run alone, bit for bit
    (the merge reads the splits in a fixed order)."""
    torch.manual_seed(35)
    B, Hq, Hkv, D, L = 2, 32, 8, 128, 8192
    dt = torch.bfloat16
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dt)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=dt)
    qs = [torch.randn(B, Hq, 1, D, device="cuda", dtype=dt) for _ in range(4)]
    lens = torch.tensor([8000, 3001], dtype=torch.int32, device="cuda")

    def call(q):
        return da.decode_attention(q, k, v, cache_seqlens=lens, num_splits=4)

    alone = [call(q) for q in qs]
    streams = [torch.cuda.Stream() for _ in range(4)]
    main = torch.cuda.current_stream()
    graphed = (0, 3)
    with torch.no_grad():
        streams[0].wait_stream(main)
        with torch.cuda.stream(streams[0]):
            call(qs[0])
        main.wait_stream(streams[0])
        graphs, static = {}, {}
        for i in graphed:
            graphs[i] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[i]):
                static[i] = call(qs[i])
        for _ in range(10):
            results = {}
            for s in streams:
                s.wait_stream(main)
            for i in graphed:
                with torch.cuda.stream(streams[i]):
                    graphs[i].replay()
            for i in (1, 2):
                with torch.cuda.stream(streams[i]):
                    results[i] = [call(qs[i]) for _ in range(3)]
            for s in streams:
                main.wait_stream(s)
            torch.cuda.synchronize()
            for i in graphed:
                assert torch.equal(static[i][0], alone[i][0]) and torch.equal(static[i][1], alone[i][1])
            for i in (1, 2):
                for out, lse in results[i]:
                    assert torch.equal(out, alone[i][0]) and torch.equal(lse, alone[i][1])


@pytest.mark.cuda
def test_cuda_mha_paged_decode_equals_full():
    torch.manual_seed(34)
    cfg = attnkit.AttentionConfig(d_model=1024, n_heads=8, use_rope=True, use_gqa=True, gqa_groups=2)
    mod = attnkit.MultiHeadAttention(cfg).cuda().to(torch.bfloat16)
    B, P, steps = 4, 700, 5
    x = torch.randn(B, P + steps, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        full = mod(x, causal=True)
        cache = mod.new_paged_kv_cache(400, 16, allocation_order=torch.randperm(400).tolist())
        cache.bind([cache.add_sequence() for _ in range(B)])
        mod(x[:, :P], kv_cache=cache)
        outs = [mod(x[:, P + t:P + t + 1], kv_cache=cache) for t in range(steps)]
    dec = torch.cat(outs, 1)
    err = ((dec.float() - full[:, P:].float()).norm() / full[:, P:].float().norm()).item()
    assert err < 2e-2, err
