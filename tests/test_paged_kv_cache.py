"""PagedKVCache: the block allocator (reference counts, fork, copy-on-write), its int32 tables,
every error leaving the cache unchanged, and MultiHeadAttention decoding with it:
paged decode == contiguous KVCache decode == recomputing the whole sequence without a cache.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import attnkit
from attnkit import DecodeCache, KVCache, PagedKVCache
from conftest import assert_close_tol as assert_close
from test_mha import _gen, make_mha, randn  # the decoding tests' own helpers, shared

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
ROPE_TOL = 2e-5  # RoPE rotates in float32 (see test_mha's docstring)


def shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def snapshot(c: PagedKVCache) -> tuple:
    ids = c.seq_ids
    return (ids, c.block_table(ids).tolist(), c.lengths(ids).tolist(), c.free_blocks(), c.ref_counts(),
            c.batch, c.k.clone(), c.v.clone())


def assert_unchanged(c: PagedKVCache, snap: tuple) -> None:
    now = snapshot(c)
    for i, name in enumerate(("seq_ids", "tables", "lengths", "free list", "ref counts", "batch")):
        assert now[i] == snap[i], f"{name} changed: {snap[i]} -> {now[i]}"
    assert torch.equal(now[6], snap[6]) and torch.equal(now[7], snap[7]), "pool tensors changed"


# ---------------------------------------------------------------------------
# construction, tables
# ---------------------------------------------------------------------------


def test_shapes_tables_and_interface():
    c = PagedKVCache(6, 2, 8, 16, head_dim_v=4, dtype=torch.float64, allocation_order=[5, 4, 3, 2, 1, 0])
    assert isinstance(c, DecodeCache) and isinstance(KVCache(1, 1, 4, 8), DecodeCache)
    assert attnkit.PagedKVCache is PagedKVCache and attnkit.caches.PagedKVCache is PagedKVCache
    assert c.k.shape == (6, 2, 16, 8) and c.v.shape == (6, 2, 16, 4) and c.k.dtype == torch.float64
    assert c.num_blocks == 6 and c.num_free_blocks == 6 and c.free_blocks() == [5, 4, 3, 2, 1, 0]
    a, b = c.add_sequence(), c.add_sequence()
    assert (a, b) == (0, 1) and c.seq_ids == (0, 1)
    g = _gen(1)
    old, new = c.write([a, b], randn(2, 2, 20, 8, gen=g), randn(2, 2, 20, 4, gen=g), num_new=[20, 3])
    assert old.tolist() == [0, 0] and new.tolist() == [20, 3]
    assert old.dtype == new.dtype == torch.int32
    t = c.block_table([a, b])
    assert t.dtype == torch.int32 and t.tolist() == [[5, 4], [3, -1]]  # blocks handed out in order; pad -1
    assert c.block_table([b], width=4, pad=0).tolist() == [[3, 0, 0, 0]]
    assert c.block_table([]).shape == (0, 1)
    assert c.lengths([b, a]).tolist() == [3, 20] and c.lengths([b, a]).dtype == torch.int32
    assert c.ref_counts() == [0, 0, 0, 1, 1, 1]
    k, v = c.gather([a, b])
    assert k.shape == (2, 2, 20, 8) and v.shape == (2, 2, 20, 4)
    assert torch.all(k[1, :, 3:] == 0) and torch.all(v[1, :, 3:] == 0)  # padding is zero, not stale
    assert c.bind([b, a]) is c and c.batch == (b, a)
    assert c.next_positions(2).tolist() == [[3, 4], [20, 21]]
    with pytest.raises(ValueError, match="width"):
        c.block_table([a], width=1)


def test_fresh_cache_prefill_hands_out_blocks_in_order():
    """A batch prefilled into a fresh cache gets consecutive blocks per sequence, in batch order:
    benchmarks/bench_decode.py --block-order allocated builds its tables on this."""
    B, L, bs = 3, 40, 16
    c = PagedKVCache(B * 3, 2, 4, bs, dtype=torch.float64)
    ids = [c.add_sequence() for _ in range(B)]
    g = _gen(2)
    c.write(ids, randn(B, 2, L, 4, gen=g), randn(B, 2, L, 4, gen=g))
    assert c.block_table(ids).tolist() == torch.arange(B * 3).view(B, 3).tolist()


@pytest.mark.parametrize("kw,words", [
    (dict(block_size=8), ["block_size", "8"]),
    (dict(block_size=512), ["block_size", "512"]),
    (dict(block_size=48), ["block_size", "power of two"]),
    (dict(num_blocks=0), ["num_blocks"]),
    (dict(head_dim_v=0), ["head_dim_v"]),
    (dict(allocation_order=[0, 1, 2, 9]), ["allocation_order", "out of range", "9"]),
    (dict(allocation_order=[0, 1, 1, 2]), ["allocation_order", "permutation"]),
    (dict(allocation_order=[0, 1, 2]), ["allocation_order", "permutation"]),
    (dict(allocation_order=[0, 1, 2, -1]), ["allocation_order", "-1"]),
], ids=["bs8", "bs512", "bs48", "blocks0", "dv0", "order_range", "order_dup", "order_short", "order_neg"])
def test_constructor_errors(kw, words):
    args = dict(num_blocks=4, num_kv_heads=1, head_dim=8)
    args.update(kw)
    with pytest.raises(ValueError) as ei:
        PagedKVCache(**args)
    for w in words:
        assert w in str(ei.value), f"{w!r} not in: {ei.value}"
    with pytest.raises(TypeError, match="dtype"):
        PagedKVCache(4, 1, 8, dtype=torch.int32)


# ---------------------------------------------------------------------------
# fork and copy-on-write
# ---------------------------------------------------------------------------


def test_fork_shares_blocks_and_cow_leaves_parent_intact():
    g = _gen(2)
    c = PagedKVCache(8, 2, 4, 16, dtype=torch.float64, allocation_order=shuffled(8, 2))
    p = c.add_sequence()
    c.write([p], randn(1, 2, 20, 4, gen=g), randn(1, 2, 20, 4, gen=g))  # one full block + 4 tokens
    pk, pv = (t.clone() for t in c.gather([p]))
    child = c.fork(p)
    assert c.block_table([child]).tolist() == c.block_table([p]).tolist()
    shared = c.block_table([p])[0].tolist()
    assert [c.ref_counts()[b] for b in shared] == [2, 2]
    free_before = c.num_free_blocks
    ck, cv = randn(1, 2, 3, 4, gen=g), randn(1, 2, 3, 4, gen=g)
    c.write([child], ck, cv)
    # the child copied the shared partial block, then wrote: one new block, the full one still shared
    assert c.num_free_blocks == free_before - 1
    tc = c.block_table([child])[0].tolist()
    assert tc[0] == shared[0] and tc[1] != shared[1]
    assert c.ref_counts()[shared[0]] == 2 and c.ref_counts()[shared[1]] == 1 and c.ref_counts()[tc[1]] == 1
    k, v = c.gather([p])
    assert torch.equal(k, pk) and torch.equal(v, pv), "copy-on-write changed the parent"
    k, v = c.gather([child])
    assert torch.equal(k[:, :, :20], pk) and torch.equal(k[:, :, 20:], ck) and torch.equal(v[:, :, 20:], cv)
    # the parent writes into its own (no longer shared) block: no copy
    free_before = c.num_free_blocks
    c.write([p], randn(1, 2, 1, 4, gen=g), randn(1, 2, 1, 4, gen=g))
    assert c.num_free_blocks == free_before and c.block_table([p])[0].tolist() == shared
    c.free(p)
    assert c.ref_counts()[shared[0]] == 1 and shared[1] in c.free_blocks()
    c.free(child)
    assert c.num_free_blocks == 8 and c.ref_counts() == [0] * 8


def test_cow_when_parent_and_children_write_in_one_batch():
    """Three holders of one partial block write together: two copies, the last holder keeps it."""
    g = _gen(3)
    c = PagedKVCache(6, 1, 2, 16, dtype=torch.float64)
    p = c.add_sequence()
    c.write([p], randn(1, 1, 5, 2, gen=g), randn(1, 1, 5, 2, gen=g))
    a, b = c.fork(p), c.fork(p)
    assert c.blocks_needed([p, a, b], [1, 1, 1]) == 2
    kn, vn = randn(3, 1, 1, 2, gen=g), randn(3, 1, 1, 2, gen=g)
    c.write([p, a, b], kn, vn)
    tables = c.block_table([p, a, b])[:, 0].tolist()
    assert len(set(tables)) == 3 and tables[2] == 0 and c.num_free_blocks == 3
    k, _ = c.gather([p, a, b])
    assert torch.equal(k[:, :, 5], kn[:, :, 0])
    assert torch.equal(k[0, :, :5], k[1, :, :5]) and torch.equal(k[0, :, :5], k[2, :, :5])


def test_full_shared_block_is_not_copied():
    c = PagedKVCache(4, 1, 2, 16, dtype=torch.float64)
    g = _gen(4)
    p = c.add_sequence()
    c.write([p], randn(1, 1, 16, 2, gen=g), randn(1, 1, 16, 2, gen=g))
    ch = c.fork(p)
    c.write([ch], randn(1, 1, 1, 2, gen=g), randn(1, 1, 1, 2, gen=g))
    assert c.block_table([ch]).tolist() == [[0, 1]] and c.ref_counts() == [2, 1, 0, 0]


# ---------------------------------------------------------------------------
# paged == contiguous, at the cache level
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [16, 32])
def test_gather_equals_contiguous_cache(block_size):
    g = _gen(5)
    B, H, D, Dv = 3, 2, 5, 3
    paged = PagedKVCache(16, H, D, block_size, head_dim_v=Dv, dtype=torch.float64,
                         allocation_order=shuffled(16, block_size))
    cont = KVCache(B, H, 120, D, head_dim_v=Dv, dtype=torch.float64)
    ids = [paged.add_sequence() for _ in range(B)]
    paged.bind(ids)
    for L, num_new in ((37, [37, 5, 17]), (1, None), (20, [0, 20, 11]), (4, [4, 1, 3])):
        kn, vn = randn(B, H, L, D, gen=g), randn(B, H, L, Dv, gen=g)
        n = None if num_new is None else torch.tensor(num_new)
        kp, vp, oldp, newp = paged.append(kn, vn, n)
        _, _, oldc, newc = cont.append(kn, vn, n)
        assert oldp.tolist() == oldc.tolist() and newp.tolist() == newc.tolist()
        assert kp.shape[2] == max(newc.tolist())
        for b, n_b in enumerate(newc.tolist()):
            assert torch.equal(kp[b, :, :n_b], cont.k[b, :, :n_b]) and torch.equal(vp[b, :, :n_b], cont.v[b, :, :n_b])
        old = oldp
        for causal in (True, False):
            for window in (None, 3):
                mp = paged.key_mask(old, L, causal=causal, window=window)
                mc = cont.key_mask(old, L, causal=causal, window=window)
                assert torch.equal(mp, mc[..., :kp.shape[2]]) and not mc[..., kp.shape[2]:].any()


# ---------------------------------------------------------------------------
# MultiHeadAttention: paged decode == contiguous decode == recompute
# ---------------------------------------------------------------------------

MHA_CFGS = [
    ("gqa1", dict(d_model=32, n_heads=4)),
    ("gqa4", dict(d_model=32, n_heads=4, use_gqa=True, gqa_groups=1)),
    ("gqa4_rope_window_sinks", dict(d_model=64, n_heads=8, use_gqa=True, gqa_groups=2, use_rope=True,
                                    window=19, use_attention_sinks=True, num_attention_sinks=2, qkv_bias=True)),
]


def _tol(dtype, cfg):
    return max(TOL[dtype], ROPE_TOL) if cfg.get("use_rope") else TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", [c[1] for c in MHA_CFGS], ids=[c[0] for c in MHA_CFGS])
@pytest.mark.parametrize("block_size,prefill,step", [(16, 21, 1), (32, 37, 1), (16, 13, 4)])
def test_mha_paged_equals_contiguous_equals_recompute(dtype, cfg, block_size, prefill, step):
    B, T = 2, prefill + 12
    mod = make_mha(seed=21, dtype=dtype, **cfg)
    x = randn(B, T, cfg["d_model"], dtype=dtype, gen=_gen(22 + prefill))
    with torch.no_grad():
        full = mod(x, causal=True)
        paged = mod.new_paged_kv_cache(12, block_size, allocation_order=shuffled(12, prefill))
        assert paged.k.dtype == dtype
        paged.bind([paged.add_sequence() for _ in range(B)])
        cont = mod.new_kv_cache(B, T)
        outs_p, outs_c = [mod(x[:, :prefill], kv_cache=paged)], [mod(x[:, :prefill], kv_cache=cont)]
        for t in range(prefill, T, step):
            outs_p.append(mod(x[:, t:t + step], kv_cache=paged))
            outs_c.append(mod(x[:, t:t + step], kv_cache=cont))
    dec_p, dec_c = torch.cat(outs_p, 1), torch.cat(outs_c, 1)
    assert paged.lengths().tolist() == [T] * B
    tol = _tol(dtype, cfg)
    assert_close(dec_p, dec_c, TOL[dtype], "paged vs contiguous")
    assert_close(dec_p, full, tol, "paged vs recompute")
    assert_close(dec_c, full, tol, "contiguous vs recompute")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", [c[1] for c in MHA_CFGS], ids=[c[0] for c in MHA_CFGS])
def test_mha_ragged_batch_with_forks(dtype, cfg):
    """Prompts of 5, 23 and 40 tokens prefilled one by one; the 23-token one forked twice
    (a shared partial block: copy-on-write on the first step); all five decode together,
    each with its own tokens. Each output equals recomputing that sequence from scratch."""
    d, steps, bs = cfg["d_model"], 9, 16
    mod = make_mha(seed=31, dtype=dtype, **cfg)
    g = _gen(32)
    prompts = [randn(1, n, d, dtype=dtype, gen=g) for n in (5, 23, 40)]
    cache = mod.new_paged_kv_cache(20, bs, allocation_order=shuffled(20, 33))
    seqs = []
    with torch.no_grad():
        pre = []
        for p in prompts:
            s = cache.add_sequence()
            pre.append(mod(p, kv_cache=cache.bind([s])))
            seqs.append(s)
        forks = [cache.fork(seqs[1]), cache.fork(seqs[1])]
        shared = cache.block_table([seqs[1]])[0, 1].item()
        assert cache.ref_counts()[shared] == 3
        all_ids = seqs + forks
        full_inputs = prompts + [prompts[1], prompts[1]]
        cache.bind(all_ids)
        conts = randn(len(all_ids), steps, d, dtype=dtype, gen=g)
        outs = [mod(conts[:, t:t + 1], kv_cache=cache) for t in range(steps)]
    dec = torch.cat(outs, 1)
    assert cache.lengths().tolist() == [5 + steps, 23 + steps, 40 + steps, 23 + steps, 23 + steps]
    assert cache.ref_counts()[shared] == 1, "two of the three holders copied the shared block"
    tol = _tol(dtype, cfg)
    with torch.no_grad():
        for i, inp in enumerate(full_inputs):
            whole = torch.cat([inp, conts[i:i + 1]], 1)
            ref = mod(whole, causal=True)
            n = inp.shape[1]
            assert_close(dec[i:i + 1], ref[:, n:], tol, f"decode of sequence {i}")
            if i < 3:
                assert_close(pre[i], ref[:, :n], tol, f"prefill of sequence {i}")


def test_mha_rejects_bad_cache_and_leaves_paged_cache_unchanged():
    mod = make_mha(seed=41, d_model=32, n_heads=4, use_rope=True)
    x = randn(2, 60, 32, gen=_gen(42))
    with pytest.raises(TypeError, match="kv_cache"):
        mod(x, kv_cache={"k": None})
    cache = mod.new_paged_kv_cache(4, 16)
    a, b = cache.add_sequence(), cache.add_sequence()
    with torch.no_grad():
        with pytest.raises(ValueError, match="bind"):
            mod(x[:, :1], kv_cache=cache)
        cache.bind([a])
        with pytest.raises(ValueError, match="batch of 1"):
            mod(x, kv_cache=cache)
        cache.bind([a, b])
        mod(x[:, :17], kv_cache=cache)  # 2 blocks each: the pool is full
    cache.free(b)
    cache.bind([a])
    snap = snapshot(cache)
    with torch.no_grad(), pytest.raises(ValueError, match="out of blocks"):
        mod(x[:1, :50], kv_cache=cache)  # 17 + 50 tokens take 5 blocks: 3 more, 2 are free
    assert_unchanged(cache, snap)


# ---------------------------------------------------------------------------
# every error leaves the cache unchanged
# ---------------------------------------------------------------------------


def _populated() -> tuple[PagedKVCache, dict]:
    g = _gen(51)
    c = PagedKVCache(5, 2, 4, 16, dtype=torch.float32, allocation_order=[3, 0, 4, 1, 2])
    a, b, gone = c.add_sequence(), c.add_sequence(), c.add_sequence()
    c.write([a, b, gone], randn(3, 2, 18, 4, dtype=torch.float32, gen=g), randn(3, 2, 18, 4, dtype=torch.float32, gen=g),
            num_new=[18, 7, 3])
    c.free(gone)
    ch = c.fork(b)
    c.bind([a, ch])
    kv = lambda B, L, **kw: (randn(B, 2, L, 4, dtype=torch.float32, gen=g), randn(B, 2, L, 4, dtype=torch.float32, gen=g))
    return c, dict(a=a, b=b, gone=gone, ch=ch, kv=kv)


ERRORS = {
    "free_unknown": (ValueError, ["unknown", "99"], lambda c, s: c.free(99)),
    "free_twice": (ValueError, ["freed", "2"], lambda c, s: c.free(s["gone"])),
    "free_bool": (TypeError, ["seq_id"], lambda c, s: c.free(True)),
    "fork_freed": (ValueError, ["freed"], lambda c, s: c.fork(s["gone"])),
    "table_freed": (ValueError, ["freed"], lambda c, s: c.block_table([s["a"], s["gone"]])),
    "lengths_unknown": (ValueError, ["unknown", "7"], lambda c, s: c.lengths([7])),
    "ids_not_a_list": (TypeError, ["seq_ids"], lambda c, s: c.lengths(0)),
    "write_freed": (ValueError, ["freed"], lambda c, s: c.write([s["gone"]], *s["kv"](1, 1))),
    "write_repeat": (ValueError, ["repeat"], lambda c, s: c.write([s["a"], s["a"]], *s["kv"](2, 1))),
    "bind_freed": (ValueError, ["freed"], lambda c, s: c.bind([s["a"], s["gone"]])),
    "bind_empty": (ValueError, ["bind"], lambda c, s: c.bind([])),
    "k_batch": (ValueError, ["k_new", "[2, 2, L, 4]"], lambda c, s: c.append(*s["kv"](3, 1))),
    "k_heads": (ValueError, ["k_new"], lambda c, s: c.append(randn(2, 1, 1, 4, dtype=torch.float32), s["kv"](2, 1)[1])),
    "k_rank": (ValueError, ["k_new"], lambda c, s: c.append(randn(2, 2, 4, dtype=torch.float32), s["kv"](2, 1)[1])),
    "v_len": (ValueError, ["v_new"], lambda c, s: c.append(s["kv"](2, 2)[0], s["kv"](2, 1)[1])),
    "v_dim": (ValueError, ["v_new"], lambda c, s: c.append(s["kv"](2, 1)[0], randn(2, 2, 1, 3, dtype=torch.float32))),
    "dtype": (TypeError, ["float32", "float64"], lambda c, s: c.append(*(t.double() for t in s["kv"](2, 1)))),
    "device": (ValueError, ["meta"], lambda c, s: c.append(*(t.to("meta") for t in s["kv"](2, 1)))),
    "not_tensor": (TypeError, ["k_new"], lambda c, s: c.append([[0.0]], s["kv"](2, 1)[1])),
    "num_new_shape": (ValueError, ["num_new"], lambda c, s: c.append(*s["kv"](2, 2), torch.tensor([1]))),
    "num_new_range": (ValueError, ["num_new", "3"], lambda c, s: c.append(*s["kv"](2, 2), [3, 1])),
    "num_new_float": (ValueError, ["num_new"], lambda c, s: c.append(*s["kv"](2, 2), torch.tensor([1.0, 1.0]))),
    # a: 18 tokens in 2 blocks, ch shares b's partial block: 15 tokens for both take 1 + (1 + 1) = 3 > 2 free
    "out_of_blocks_cow": (ValueError, ["out of blocks", "3 free blocks", "2 free"],
                          lambda c, s: c.append(*s["kv"](2, 15))),
    "out_of_blocks": (ValueError, ["out of blocks", "nothing was written"], lambda c, s: c.write([s["b"]], *s["kv"](1, 60))),
    "bound_then_freed": (ValueError, ["bound batch", "freed"], lambda c, s: c.append(*s["kv"](2, 1))),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_leave_cache_unchanged(name):
    exc, words, call = ERRORS[name]
    c, s = _populated()
    assert c.num_free_blocks == 2 and c.blocks_needed([s["a"], s["ch"]], [15, 15]) == 3
    if name == "bound_then_freed":  # freeing a bound sequence is legal; appending to it after is not
        c.free(s["ch"])
    snap = snapshot(c)
    with pytest.raises(exc) as ei:
        call(c, s)
    for w in words:
        assert w in str(ei.value), f"{w!r} not in: {ei.value}"
    assert_unchanged(c, snap)


@pytest.mark.parametrize("cow", [False, True], ids=["new_blocks", "copy_on_write"])
def test_a_write_that_fails_midway_leaves_cache_unchanged(cow):
    """The pool's V tensor refuses in-place writes (an inference tensor, outside inference mode),
    so a write fails after its K writes: the bookkeeping must not have moved, and the K it wrote
    must lie where nothing reads it."""
    c, s = _populated()
    if not cow:
        c.bind([s["a"]])
    kn, vn = s["kv"](len(c.batch), 14)  # fits: ch copies its shared block
    snap = snapshot(c)
    before = c.gather(c.batch)
    with torch.inference_mode():
        c.v = c.v.clone()
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        c.append(kn, vn)
    assert snapshot(c)[:6] == snap[:6]
    after = c.gather(c.batch)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    with pytest.raises(RuntimeError, match="rollback"):  # a failed write is not a write to undo
        c.rollback()


def test_rollback_restores_blocks_tables_and_free_order():
    c, s = _populated()
    snap = snapshot(c)
    c.append(*s["kv"](2, 14))  # a: one new block; ch: a copy of b's shared block and one new block
    assert c.num_free_blocks == 0 and c.ref_counts() == [1] * 5
    c.rollback()
    assert snapshot(c)[:6] == snap[:6]
    k, v = c.append(*s["kv"](2, 14))[:2]  # the same blocks again, in the same order
    assert c.num_free_blocks == 0
    for call in (lambda: c.fork(s["a"]), lambda: c.free(s["b"]), lambda: c.add_sequence()):
        c.append(*s["kv"](2, 0))
        call()
        with pytest.raises(RuntimeError, match="rollback"):  # only right after a write
            c.rollback()


def test_blocks_needed_and_allocation_order_checks():
    c, s = _populated()
    ids = [s["a"], s["ch"]]
    for bad in ([-1, 2], [1], [1, 2, 3], [2.7, 1], 5):
        with pytest.raises(ValueError, match="num_new"):
            c.blocks_needed(ids, bad)
    assert c.blocks_needed(ids, torch.tensor([15, 15])) == c.blocks_needed(ids, [15, 15]) == 3
    np = pytest.importorskip("numpy")
    order = np.random.default_rng(0).permutation(6)
    assert PagedKVCache(6, 1, 4, 16, allocation_order=order).free_blocks() == order.tolist()
    with pytest.raises(ValueError, match="permutation"):
        PagedKVCache(6, 1, 4, 16, allocation_order=np.arange(5))


def test_freed_blocks_are_handed_out_first_in_first_out():
    """As documented: a freed sequence's blocks join the end of the free list in table order, and the
    next writes take blocks from its front."""
    c = PagedKVCache(8, 1, 2, 16, dtype=torch.float32)
    a, b = c.add_sequence(), c.add_sequence()
    kv = torch.randn(2, 1, 40, 2)
    c.write([a, b], kv, kv)  # 3 blocks each
    ta, tb = (c.block_table([x])[0].tolist() for x in (a, b))
    assert c.free_blocks() == [6, 7]
    c.free(b)
    c.free(a)
    assert c.free_blocks() == [6, 7, *tb, *ta]
    n = c.add_sequence()
    c.write([n], kv[:1, :, :20], kv[:1, :, :20])  # 2 blocks: the oldest free ones
    assert c.block_table([n])[0].tolist() == [6, 7]
    assert c.free_blocks() == [*tb, *ta]


def test_an_exactly_fitting_append_succeeds():
    c, s = _populated()
    c.append(*s["kv"](2, 14))  # a: 18 + 14 = 32 (2 blocks); ch: copy + 7 + 14 = 21 (2 blocks): 2 new
    assert c.num_free_blocks == 0 and c.lengths().tolist() == [32, 21]


# ---------------------------------------------------------------------------
# allocator invariants (property-based)
# ---------------------------------------------------------------------------

NB, BS, H, D, DV = 10, 16, 2, 3, 2


def expected_need(tables: dict, lens: dict, refs: list, ids, counts) -> int:
    """Free blocks a write takes, written from the spec: new blocks to hold the tokens,
    plus one copy per partly filled last block still shared when its turn comes."""
    refs, need = list(refs), 0
    for s, c in zip(ids, counts):
        if c == 0:
            continue
        n = lens[s]
        if n % BS and refs[tables[s][-1]] > 1:
            refs[tables[s][-1]] -= 1
            need += 1
        need += -(-(n + c) // BS) - -(-n // BS)
    return need


class AllocatorMachine(RuleBasedStateMachine):
    """Random add/write/fork/free (and illegal calls) against a shadow copy of every sequence's K/V."""

    def __init__(self):
        super().__init__()
        self.cache = PagedKVCache(NB, H, D, BS, head_dim_v=DV, dtype=torch.float64,
                                  allocation_order=shuffled(NB, 7))
        self.shadow: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.freed: list[int] = []
        self.counter = 0

    def _fresh(self, shape):
        self.counter += 1
        return randn(*shape, gen=_gen(1000 + self.counter))

    @rule()
    def add(self):
        s = self.cache.add_sequence()
        self.shadow[s] = (torch.zeros(H, 0, D, dtype=torch.float64), torch.zeros(H, 0, DV, dtype=torch.float64))

    @precondition(lambda self: self.shadow)
    @rule(data=st.data(), L=st.integers(1, 40))
    def write(self, data, L):
        live = sorted(self.shadow)
        ids = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=3, unique=True))
        counts = data.draw(st.lists(st.integers(0, L), min_size=len(ids), max_size=len(ids)))
        kn, vn = self._fresh((len(ids), H, L, D)), self._fresh((len(ids), H, L, DV))
        c = self.cache
        tables = dict(zip(c.seq_ids, [r[:(-(-n // BS))] for r, n in zip(c.block_table(c.seq_ids).tolist(),
                                                                        c.lengths(c.seq_ids).tolist())]))
        lens = dict(zip(c.seq_ids, c.lengths(c.seq_ids).tolist()))
        need = expected_need(tables, lens, c.ref_counts(), ids, counts)
        assert c.blocks_needed(ids, counts) == need
        shared_last = [s for s, n in zip(ids, counts) if n and lens[s] % BS and c.ref_counts()[tables[s][-1]] > 1]
        if shared_last:
            event("write into a shared partial block (copy-on-write)")
        if need > c.num_free_blocks:
            event("out of blocks")
            snap = snapshot(c)
            with pytest.raises(ValueError, match="out of blocks"):
                c.write(ids, kn, vn, counts)
            assert_unchanged(c, snap)
            return
        free_before = c.num_free_blocks
        if data.draw(st.booleans(), label="undo"):  # a write, then its rollback: the bookkeeping as before
            event("rollback")
            snap = snapshot(c)
            c.write(ids, kn, vn, counts)
            c.rollback()
            assert snapshot(c)[:6] == snap[:6]
            with pytest.raises(RuntimeError, match="rollback"):
                c.rollback()
            return
        c.write(ids, kn, vn, torch.tensor(counts))
        assert c.num_free_blocks == free_before - need
        for i, (s, n) in enumerate(zip(ids, counts)):
            k, v = self.shadow[s]
            self.shadow[s] = (torch.cat([k, kn[i, :, :n]], 1), torch.cat([v, vn[i, :, :n]], 1))

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def fork(self, data):
        p = data.draw(st.sampled_from(sorted(self.shadow)))
        ch = self.cache.fork(p)
        self.shadow[ch] = self.shadow[p]

    @precondition(lambda self: self.shadow)
    @rule(data=st.data())
    def free(self, data):
        s = data.draw(st.sampled_from(sorted(self.shadow)))
        self.cache.free(s)
        del self.shadow[s]
        self.freed.append(s)

    @precondition(lambda self: self.freed)
    @rule(data=st.data(), op=st.sampled_from(["free", "fork", "write", "table"]))
    def use_freed(self, data, op):
        s = data.draw(st.sampled_from(self.freed))
        c, snap = self.cache, snapshot(self.cache)
        call = {"free": lambda: c.free(s), "fork": lambda: c.fork(s), "table": lambda: c.block_table([s]),
                "write": lambda: c.write([s], self._fresh((1, H, 1, D)), self._fresh((1, H, 1, DV)))}[op]
        with pytest.raises(ValueError, match="freed"):
            call()
        assert_unchanged(c, snap)

    @invariant()
    def blocks_accounted_for(self):
        c = self.cache
        ids = c.seq_ids
        assert set(ids) == set(self.shadow)
        lens = c.lengths(ids).tolist()
        rows = c.block_table(ids).tolist()
        holders = [0] * NB
        for row, n in zip(rows, lens):
            nb = -(-n // BS)
            real = row[:nb]
            assert all(b == -1 for b in row[nb:]), f"table {row} of a {n}-token sequence"
            assert len(set(real)) == nb and all(0 <= b < NB for b in real)
            for b in real:
                holders[b] += 1
        free = c.free_blocks()
        assert len(set(free)) == len(free), f"a block is twice in the free list: {free}"
        assert c.ref_counts() == holders, "reference counts differ from the number of tables holding each block"
        assert all(holders[b] == 0 for b in free), "a free block is held by a table"
        used = sum(1 for h in holders if h)
        assert len(free) + used == NB, f"leak: {len(free)} free + {used} used != {NB}"

    @invariant()
    def data_intact(self):
        ids = self.cache.seq_ids
        if not ids:
            return
        k, v = self.cache.gather(ids)
        for i, s in enumerate(ids):
            sk, sv = self.shadow[s]
            n = sk.shape[1]
            assert torch.equal(k[i, :, :n], sk) and torch.equal(v[i, :, :n], sv), f"sequence {s} lost data"


AllocatorMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                              suppress_health_check=[HealthCheck.too_slow])
test_allocator_invariants = AllocatorMachine.TestCase


def test_gather_zeroes_stale_slots_past_each_length():
    """A block freed by a rollback keeps its stale keys; the next owner's gather shows zeros past its length."""
    c = PagedKVCache(4, 1, 4, 16, dtype=torch.float64)
    a = c.add_sequence()
    g = torch.Generator().manual_seed(3)
    c.write([a], *(torch.randn(1, 1, 10, 4, generator=g, dtype=torch.float64) for _ in range(2)))
    c.rollback()  # block 0 is free again with 10 stale slots
    b = c.add_sequence()
    c.write([a, b], *(torch.randn(2, 1, 8, 4, generator=g, dtype=torch.float64) for _ in range(2)), num_new=[3, 8])
    k, v = c.gather([a, b])
    assert torch.all(k[0, :, 3:] == 0) and torch.all(v[0, :, 3:] == 0)
