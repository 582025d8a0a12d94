"""Context parallelism (attnkit.distributed) on gloo: 2 and 4 CPU processes per group.

Every case runs ring or all-to-all attention on the shards of a random sequence, gathers
the output, log-sum-exp and the gradients of q, k, v, and compares them with
`attnkit.attention(..., backend="reference")` over the whole sequence in float64:
relative error < 1e-5 in float32 (1e-10 for the float64 cases).

Process start-up dominates (importing attnkit costs ~7 s of CPU per process here), so each
world size starts ONE group of worker processes that runs every case and sends per-case
results back through a queue; the parametrised tests below only read them. The workers come
from a forkserver that imported attnkit once (a fresh interpreter per worker, as spawn gives,
cost ~30 s for the two groups on a 2-core machine; this takes ~10 s). Every group is bounded:
gloo operations time out after 30 s and the parent kills the workers after GROUP_TIMEOUT_S and
fails the cases that did not finish, naming the one that hung.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback
import zlib
from dataclasses import dataclass, replace

import pytest
import torch

import attnkit
import attnkit.distributed as cp
from attnkit.distributed._validate import CPSettings
from attnkit.distributed.ring import plan_pair

WORLD_SIZES = (2, 4)
GROUP_TIMEOUT_S = 150.0
OP_TIMEOUT_S = 30.0
RTOL = {"float32": 1e-5, "float64": 1e-10}


# --------------------------------------------------------------------------- mods (global positions)
def doc_causal(b, h, i, j):
    """Documents of 7 tokens, causal inside each."""
    return ((i // 7) == (j // 7)) & (j <= i)


def head_mod(b, h, i, j):
    """Even query heads see every key, odd ones only keys at or before them (global head index)."""
    return ((h % 2) == 0) | (j <= i)


def dead_rows(b, h, i, j):
    """Causal, and every query at a position = 3 (mod 5) sees nothing."""
    return (j <= i) & ((i % 5) != 3)


_DOC_IDS = torch.tensor([0] * 5 + [1] * 4 + [2] * 4)  # FlexAttention's document idiom, for L = 13 exactly


def doc_ids(b, h, i, j):
    """Causal inside documents looked up in a tensor of the true length (padding must never index it)."""
    return (_DOC_IDS[i] == _DOC_IDS[j]) & (j <= i)


def doc3_causal(b, h, i, j):
    """Documents of 3 tokens, causal inside each (only the cached-wrapper sequences use it)."""
    return ((i // 3) == (j // 3)) & (j <= i)


def head_band(b, h, i, j):
    """Causal, and global query head h sees its h + 1 latest keys: a shifted head index shifts every band."""
    return (j <= i) & (i - j <= h)


MODS = {"doc_causal": doc_causal, "head_mod": head_mod, "dead_rows": dead_rows, "doc_ids": doc_ids,
        "doc3_causal": doc3_causal, "head_band": head_band}


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class DCase:
    name: str
    L: int
    strategy: str = "ring"
    layout: str = "contiguous"
    causal: bool = False
    window: object = None
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    D: int = 8
    mask_mod: str | None = None
    softcap: float | None = None
    return_lse: bool = True
    dtype: str = "float32"
    subgroups: bool = False  # 4 processes as two groups of 2 (group=), concurrently

    @property
    def kwargs(self) -> dict:
        return dict(causal=self.causal, window=self.window, softcap=self.softcap,
                    mask_mod=MODS[self.mask_mod] if self.mask_mod else None)


_BASE = [
    DCase("dense_gqa", 24),
    DCase("causal_mqa", 24, causal=True, Hkv=1, D=16),
    DCase("causal_pad13", 13, causal=True, Hkv=4, B=1),
    DCase("dense_pad30", 30, Hkv=1),
    DCase("window5_pad30", 30, window=5),
    DCase("window_3_2", 24, window=(3, 2), Hkv=1),
    DCase("doc_mask_mod_pad30", 30, mask_mod="doc_causal"),
    DCase("head_mask_mod", 24, mask_mod="head_mod"),
    DCase("dead_rows_pad13", 13, mask_mod="dead_rows"),
    DCase("doc_ids_pad13", 13, mask_mod="doc_ids", Hkv=4),
    DCase("softcap_causal_pad13", 13, causal=True, softcap=2.0),
    DCase("causal_no_lse", 24, causal=True, return_lse=False),
]
CASES = [
    replace(c, name=f"{s}-{lay}-{c.name}", strategy=s, layout=lay)
    for s in ("ring", "all_to_all") for lay in ("contiguous", "zigzag") for c in _BASE
] + [
    DCase("ring-zigzag-causal_f64", 30, layout="zigzag", causal=True, dtype="float64"),
    DCase("ring-contiguous-window_f64", 24, window=(4, 1), dtype="float64"),
    # a window wider than a shard pair (2 x 8 or 2 x 15 keys) but not than the sequence: its bound is global
    DCase("ring-zigzag-window20_pad30", 30, layout="zigzag", window=20),
    DCase("all_to_all-zigzag-causal_f64", 30, strategy="all_to_all", layout="zigzag", causal=True, dtype="float64"),
]
SUBGROUP_CASES = [
    DCase("subgroups-ring-zigzag-causal", 13, layout="zigzag", causal=True, subgroups=True),
    DCase("subgroups-all_to_all-contiguous", 24, strategy="all_to_all", window=5, subgroups=True),
]
# Calls one after the other in ONE process with the same user mask_mod object that differ only in seq_len
# or only in the head count (all-to-all: rank r's heads start at r * Hq / P). The global mask wrapper is
# cached per process, so each call must get its own: a shorter call's must not mask a longer call's last
# keys, nor a head offset serve another. Lengths: 15 and 16 pad to the same 16 tokens on 2 and 4 ranks in
# both layouts (the same shard starts, so the same ring pairs); 13 too except contiguous on 2 ranks (14).
SEQUENCES = {
    "cache-seq_len": tuple(
        DCase(f"cache-seq_len-{s}-{lay}-L{L}", L, strategy=s, layout=lay, mask_mod="doc3_causal", Hkv=4)
        for s in ("ring", "all_to_all") for lay in ("contiguous", "zigzag") for L in (13, 15, 16)),
    "cache-head_offset": tuple(
        DCase(f"cache-head_offset-{lay}-Hq{Hq}", 16, strategy="all_to_all", layout=lay, Hq=Hq, Hkv=4,
              mask_mod="head_band")
        for lay in ("contiguous", "zigzag") for Hq in (4, 8)),
}
ERROR_CASES = ("mismatched_shard_lengths", "one_rank_bad_input", "flags_differ", "heads_not_divisible",
               "seq_len_too_long", "group_not_a_group", "forced_backend_refuses_local_calls")
SPY_CASES = ("spy-ring-zigzag-causal", "spy-ring-contiguous-causal")


def _cases_for(world: int) -> list[DCase]:
    return CASES + (SUBGROUP_CASES if world == 4 else [])


# --------------------------------------------------------------------------- worker side
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def _inputs(c: DCase, seed: int):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, c.dtype)
    shape_q, shape_kv = (c.B, c.Hq, c.L, c.D), (c.B, c.Hkv, c.L, c.D)
    q, k, v = (torch.randn(s, generator=g, dtype=torch.float64) for s in (shape_q, shape_kv, shape_kv))
    g_out = torch.randn(shape_q, generator=g, dtype=torch.float64)
    g_lse = torch.randn(c.B, c.Hq, c.L, generator=g, dtype=torch.float64)
    return [t.to(dt) for t in (q, k, v)], g_out, g_lse


def _loss(out, lse, g_out, g_lse):
    loss = (out.double() * g_out).sum()
    if lse is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).double() * g_lse).sum()
    return loss


def _run_case(c: DCase, rank: int, world: int, group) -> dict:
    """Run one case on this rank; return its errors against the float64 reference."""
    (q, k, v), g_out, g_lse = _inputs(c, seed=zlib.crc32(c.name.encode()) % 1000)
    ref = [t.double().requires_grad_(True) for t in (q, k, v)]
    r_out, r_lse = attnkit.attention(*ref, return_lse=True, backend="reference", **c.kwargs)
    _loss(r_out, r_lse if c.return_lse else None, g_out, g_lse).backward()

    lay = c.layout
    loc = [cp.shard_sequence(t, rank, world, layout=lay).detach().requires_grad_(True) for t in (q, k, v)]
    res = cp.context_parallel_attention(*loc, strategy=c.strategy, group=group, layout=lay, seq_len=c.L,
                                        return_lse=c.return_lse, **c.kwargs)
    out, lse = res if c.return_lse else (res, None)
    assert out.dtype == q.dtype and out.shape == loc[0].shape[:3] + (c.D,), (out.dtype, out.shape)
    shard = lambda t: cp.shard_sequence(t, rank, world, layout=lay)  # noqa: E731
    _loss(out, lse, shard(g_out), None if lse is None else shard(g_lse)).backward()

    errs = {}
    # Padding rows of this rank: exactly 0 out, -inf lse, 0 gradient.
    pos = shard(torch.arange(cp.padded_length(c.L, world, lay)).view(1, 1, -1, 1)).view(-1)
    pad = pos >= c.L
    if pad.any():
        assert torch.all(out[:, :, pad] == 0), "padded query rows must return 0"
        assert torch.all(loc[0].grad[:, :, pad] == 0), "padded query rows must get zero dq"
        if lse is not None:
            assert torch.all(torch.isneginf(lse[:, :, pad])), "padded query rows must have lse -inf"
    gather = lambda t: cp.unshard_sequence(t.detach(), layout=lay, seq_len=c.L, group=group)  # noqa: E731
    errs["out"] = _rel(gather(out), r_out)
    if lse is not None:
        full = gather(lse)
        fin = torch.isfinite(r_lse)
        assert torch.equal(torch.isneginf(full), ~fin), "lse must be -inf exactly where the reference is"
        errs["lse"] = _rel(full[fin], r_lse[fin])
    for name, t, r in zip("qkv", loc, ref):
        errs["d" + name] = _rel(gather(t.grad), r.grad)
    if c.mask_mod == "dead_rows":  # whole rows with nothing to attend: out 0 (rank-local check above covers pad)
        dead = (torch.arange(c.L) % 5) == 3
        assert torch.all(gather(out)[:, :, dead] == 0)
    return errs


def _run_sequence(cases: tuple[DCase, ...], rank: int, world: int) -> dict:
    """_run_case for each case in order, in this process: {case name: its errors}."""
    errs = {}
    for c in cases:
        try:
            errs[c.name] = _run_case(c, rank, world, None)
        except Exception as exc:
            raise AssertionError(f"{c.name} (after {list(errs) or 'none'}): {type(exc).__name__}: {exc}") from exc
    return {"errs": errs}


def _run_error_case(name: str, rank: int, world: int) -> dict:
    """Call with bad input; report what this rank raised (the parent checks every rank raised)."""
    g = torch.Generator().manual_seed(rank)
    Ls = 4
    kw: dict = {}
    fn = cp.ring_attention
    Hq, Hkv = 4, 2
    if name == "mismatched_shard_lengths" and rank == 0:
        Ls = 6
    if name == "heads_not_divisible":
        fn, Hq, Hkv = cp.all_to_all_attention, 3, 1
    if name == "flags_differ":
        kw["causal"] = rank == 0
    if name == "seq_len_too_long":
        kw["seq_len"] = world * Ls + 1
    if name == "group_not_a_group":
        kw["group"] = 5
    Dv = 8
    if name == "forced_backend_refuses_local_calls":
        # sdpa's CPU lse kernel takes no Dv != D; the last rank holds padding only (seq_len = 5 over
        # shards of 2 on 4 ranks) and runs no call: it must raise too, not wait for the others
        Ls, Dv, kw["backend"], kw["seq_len"] = 2, 6, "sdpa", 2 * world - 3
    q = torch.randn(1, Hq, Ls, 8, generator=g)
    k, v = torch.randn(1, Hkv, Ls, 8, generator=g), torch.randn(1, Hkv, Ls, Dv, generator=g)
    if name == "one_rank_bad_input" and rank == world - 1:
        q = q[0]
    try:
        fn(q, k, v, **kw)
    except (ValueError, TypeError) as exc:
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None, "message": ""}


def _run_spy_case(name: str, rank: int, world: int) -> dict:
    """Record every local attention call (forward, and backward from statistics) and every sent
    buffer of one ring forward + backward."""
    import attnkit.distributed.ring as ring_mod

    layout = "zigzag" if "zigzag" in name else "contiguous"
    B, Hq, Hkv, D, L = 1, 4, 2, 8, 8 * world
    calls, bwd_calls, sent = [], [], []
    orig_attention, orig_backward, orig_start = ring_mod.attention, ring_mod.attention_backward, ring_mod._Ring.start

    def spy_attention(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[2], v.shape[2], sorted(x for x in kw if kw[x] is not None)))
        return orig_attention(q, k, v, **kw)

    def spy_backward(do, q, k, v, out, lse, **kw):
        bwd_calls.append((q.shape[2], k.shape[2], v.shape[2], kw.get("dlse") is not None))
        return orig_backward(do, q, k, v, out, lse, **kw)

    def spy_start(self, send, recv, tag):
        sent.extend((tuple(t.shape), t.dtype) for t in send)
        return orig_start(self, send, recv, tag)

    ring_mod.attention, ring_mod.attention_backward, ring_mod._Ring.start = spy_attention, spy_backward, spy_start
    try:
        g = torch.Generator().manual_seed(7)
        full = [torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv)]
        loc = [cp.shard_sequence(t, rank, world, layout=layout).requires_grad_(True) for t in full]
        out = cp.ring_attention(*loc, causal=True, layout=layout)
        n_fwd = len(calls)
        out.sum().backward()
    finally:
        ring_mod.attention, ring_mod.attention_backward, ring_mod._Ring.start = orig_attention, orig_backward, orig_start
    Ls = L // world
    assert all(max(a, b, c) <= Ls for a, b, c, _ in calls + bwd_calls), f"a local call saw more than one shard: {calls}"
    assert all(s[1] == Hkv for s, _ in sent), f"only K/V shards and dK/dV of Hkv={Hkv} heads may travel: {sent}"
    assert all(s[2] == Ls for s, _ in sent), f"a sent buffer is not one shard long ({Ls}): {sent}"
    assert not any(x[3] for x in bwd_calls), "the ring's lse was not used: no dlse may reach the pairs"
    fwd = calls[:n_fwd]
    return {"n_fwd": n_fwd, "fwd_pairs": sum(a * b for a, b, _, _ in fwd), "n_bwd": len(bwd_calls),
            "n_bwd_forward": len(calls) - n_fwd, "bwd_shapes": [c[:3] for c in bwd_calls],
            "fwd_shapes": [c[:3] for c in fwd], "n_sent": len(sent), "Ls": Ls}


def _worker(rank: int, world: int, init_file: str, results) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=OP_TIMEOUT_S))
        subgroup = None
        if world == 4:
            pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            subgroup = pairs[rank // 2]
        jobs = [(n, _run_error_case, (n, rank, world)) for n in ERROR_CASES]
        jobs += [(n, _run_spy_case, (n, rank, world)) for n in SPY_CASES]
        jobs += [(n, _run_sequence, (cases, rank, world)) for n, cases in SEQUENCES.items()]
        for c in _cases_for(world):
            r, w, grp = (rank % 2, 2, subgroup) if c.subgroups else (rank, world, None)
            jobs.append((c.name, _run_case, (c, r, w, grp)))
        for name, fn, args in jobs:
            results.put(("start", rank, name, None))
            t0 = time.perf_counter()
            try:
                out = {"ok": True, **fn(*args)}
            except Exception as exc:  # noqa: BLE001 - reported to the parent per case
                out = {"ok": False, "error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"}
            out["s"] = time.perf_counter() - t0
            results.put(("result", rank, name, out))
        dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001
        results.put(("fatal", rank, None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    results.put(("done", rank, None, None))


# --------------------------------------------------------------------------- parent side
def _context():
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed", "attnkit", "attnkit.distributed"])
        return ctx
    return mp.get_context("spawn")


def _run_group(world: int, tmpdir: str) -> dict:
    """Start `world` workers, collect {case: {rank: result}}; a hang fails the unfinished cases."""
    ctx = _context()
    results = ctx.Queue()
    init_file = os.path.join(tmpdir, f"init_{world}")
    procs = [ctx.Process(target=_worker, args=(r, world, init_file, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out: dict = {"_fatal": [], "_current": {}}
    done: set[int] = set()
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    try:
        while len(done) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                hung = ", ".join(f"rank {r} in {n!r}" for r, n in sorted(out["_current"].items()))
                out["_fatal"].append(f"timed out after {GROUP_TIMEOUT_S:.0f} s (a hang?): {hung}")
                break
            try:
                kind, rank, name, payload = results.get(timeout=min(left, 2.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in done]
                if dead:
                    out["_fatal"].append(f"worker ranks {dead} died (exit codes "
                                         f"{[procs[r].exitcode for r in dead]})")
                    break
                continue
            if kind == "start":
                out["_current"][rank] = name
            elif kind == "result":
                out.setdefault(name, {})[rank] = payload
            elif kind == "fatal":
                out["_fatal"].append(f"rank {rank}: {payload}")
            elif kind == "done":
                done.add(rank)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return out


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    cache: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in cache:
            cache[world] = _run_group(world, str(tmp_path_factory.mktemp(f"cp{world}")))
        return cache[world]

    return get


def _results(groups, world: int, name: str) -> dict:
    res = groups(world)
    got = res.get(name, {})
    if len(got) < world or res["_fatal"]:
        pytest.fail(f"case {name!r} on {world} ranks: results from ranks {sorted(got)} of {world}; "
                    f"group problems: {res['_fatal'] or 'none'}")
    return got


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", CASES + SUBGROUP_CASES, ids=lambda c: c.name)
def test_matches_single_process_attention(groups, world, case):
    if case.subgroups and world != 4:
        pytest.skip("subgroups: 4 processes as two groups of 2")
    got = _results(groups, world, case.name)
    bad = {r: x["error"] for r, x in got.items() if not x["ok"]}
    assert not bad, f"{case.name} failed on ranks {sorted(bad)}:\n" + "\n".join(bad.values())
    tol = RTOL[case.dtype]
    for rank, x in got.items():
        errs = {k: v for k, v in x.items() if k not in ("ok", "s")}
        assert {"out", "dq", "dk", "dv"} <= set(errs), errs
        assert ("lse" in errs) == case.return_lse
        worst = max(errs, key=errs.get)
        assert errs[worst] < tol, f"rank {rank}: relative error of {worst} {errs[worst]:.2e} >= {tol:g} ({errs})"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", SEQUENCES)
def test_cached_mask_wrapper_serves_only_its_own_call(groups, world, name):
    """Calls in one process with one mask_mod object, differing only in seq_len or in all-to-all's head
    offset, each match the single-process reference (a wrapper cached for one must not serve the next)."""
    got = _results(groups, world, name)
    bad = {r: x["error"] for r, x in got.items() if not x["ok"]}
    assert not bad, f"{name} failed on ranks {sorted(bad)}:\n" + "\n".join(bad.values())
    tol = RTOL["float32"]
    for rank, x in sorted(got.items()):
        assert list(x["errs"]) == [c.name for c in SEQUENCES[name]]
        for case, errs in x["errs"].items():
            worst = max(errs, key=errs.get)
            assert errs[worst] < tol, f"rank {rank}, {case}: relative error of {worst} {errs[worst]:.2e} ({errs})"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ERROR_CASES)
def test_bad_input_raises_on_every_rank(groups, world, name):
    got = _results(groups, world, name)
    for rank, x in sorted(got.items()):
        assert x["ok"], x.get("error")
        assert x["raised"] is not None, f"rank {rank} did not raise on {name}"
    msgs = {r: x["message"] for r, x in got.items()}
    kinds = {r: x["raised"] for r, x in got.items()}
    if name == "mismatched_shard_lengths":
        assert all(k == "ValueError" and "q shape" in m and "rank 0: [1, 4, 6, 8]" in m and "seq_len" in m
                   for k, m in zip(kinds.values(), msgs.values())), msgs
    elif name == "one_rank_bad_input":
        last = world - 1
        assert kinds[last] == "ValueError" and "4-D" in msgs[last], msgs[last]
        assert all(kinds[r] == "ValueError" and f"rank {last}" in msgs[r] and "4-D" in msgs[r]
                   for r in range(last)), msgs
    elif name == "flags_differ":
        assert all(k == "ValueError" and "causal" in m for k, m in zip(kinds.values(), msgs.values())), msgs
    elif name == "heads_not_divisible":
        assert all(k == "ValueError" and "Hq = 3" in m and f"world size {world}" in m
                   for k, m in zip(kinds.values(), msgs.values())), msgs
    elif name == "seq_len_too_long":
        assert all(k == "ValueError" and "seq_len" in m for k, m in zip(kinds.values(), msgs.values())), msgs
    elif name == "group_not_a_group":
        assert all(k == "TypeError" and "ProcessGroup" in m for k, m in zip(kinds.values(), msgs.values())), msgs
    elif name == "forced_backend_refuses_local_calls":  # (the cases after it ran on the same group)
        assert all(k == "ValueError" for k in kinds.values()), kinds
        assert "backend 'sdpa' cannot serve this rank's local call" in msgs[0] and "value_head_dim" in msgs[0], msgs
        assert "stopped on every rank because rank 0" in msgs[world - 1], msgs[world - 1]


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_ring_sends_shards_only_and_skips_masked_pairs(groups, world):
    """No local call sees more than one shard of K/V; only Hkv-head shards travel; causal work is balanced by zigzag."""
    zig = _results(groups, world, "spy-ring-zigzag-causal")
    con = _results(groups, world, "spy-ring-contiguous-causal")
    for got in (zig, con):
        for rank, x in got.items():
            assert x["ok"], x.get("error")
    Ls = zig[0]["Ls"]
    c = Ls // 2
    # zigzag: every rank computes P calls and the same number of pairs (the diagonal 2c x 2c
    # causal call, then c x 2c or 2c x c half blocks).
    assert {x["n_fwd"] for x in zig.values()} == {world}
    assert {x["fwd_pairs"] for x in zig.values()} == {4 * c * c + (world - 1) * 2 * c * c}
    # contiguous: rank r skips the r+1 .. P-1 key shards (wholly in its future).
    assert [con[r]["n_fwd"] for r in range(world)] == [r + 1 for r in range(world)]
    for x in list(zig.values()) + list(con.values()):
        # backward: one call of the backward from statistics per computed pair, no forward recomputed
        assert x["n_bwd"] == x["n_fwd"] and sorted(x["bwd_shapes"]) == sorted(x["fwd_shapes"])
        assert x["n_bwd_forward"] == 0, "the ring's backward must not call the forward contract"
        # forward: P-1 hops of (K, V); backward: P-1 hops of (K, V) and P hops of (dK, dV)
        assert x["n_sent"] == 2 * (world - 1) * 2 + 2 * world


# --------------------------------------------------------------------------- in this process (no group)
def test_uninitialised_group_is_a_clear_error():
    import torch.distributed as dist

    assert not dist.is_initialized()
    q = torch.randn(1, 2, 4, 8)
    for fn in (cp.ring_attention, cp.all_to_all_attention):
        with pytest.raises(ValueError, match="not initialised.*init_process_group"):
            fn(q, q, q)
    with pytest.raises(ValueError, match="not initialised"):
        cp.unshard_sequence(q)
    with pytest.raises(ValueError, match="strategy must be one of"):
        cp.context_parallel_attention(q, q, q, strategy="ulysses2")


@pytest.mark.parametrize("layout", cp.LAYOUTS)
@pytest.mark.parametrize("world", (1, 2, 3, 4))
@pytest.mark.parametrize("L", (1, 7, 13, 24, 30))
def test_shard_unshard_round_trip(layout, world, L):
    x = torch.randn(2, 3, L, 5)
    shards = [cp.shard_sequence(x, r, world, layout=layout) for r in range(world)]
    Lpad = cp.padded_length(L, world, layout)
    assert Lpad % (world * (2 if layout == "zigzag" else 1)) == 0 and 0 <= Lpad - L < 2 * world
    assert all(s.shape == (2, 3, Lpad // world, 5) for s in shards)
    assert torch.equal(cp.unshard_sequence(shards, layout=layout, seq_len=L), x)
    pos = [cp.shard_sequence(torch.arange(L), r, world, layout=layout, dim=0) for r in range(world)]
    for r in range(world):  # shard_positions describes what shard_sequence cut
        segs = cp.shard_positions(r, world, layout, Lpad // world)
        want = torch.cat([torch.arange(g, g + n) for g, n in segs])
        real = want < L
        assert torch.equal(pos[r][real], want[real])


def test_sharding_helpers_refuse_bad_arguments():
    """world_size 0 or of another type, a 0-d tensor and a dim outside the tensor are errors naming them (they
    divided by zero, returned a float, or wrapped dim 5 of a 4-D tensor around to shard the heads)."""
    x = torch.randn(1, 2, 10, 4)
    for call, err, match in (
        (lambda: cp.padded_length(10, 0), ValueError, "world_size must be >= 1, got 0"),
        (lambda: cp.padded_length(10, 2.0), TypeError, "world_size must be an int, got float"),
        (lambda: cp.shard_sequence(x, 0, 0), ValueError, "world_size must be >= 1"),
        (lambda: cp.shard_sequence(x, 0, "2"), TypeError, "world_size must be an int, got str"),
        (lambda: cp.shard_sequence(torch.tensor(3.0), 0, 2), TypeError, "0-d tensor"),
        (lambda: cp.shard_sequence(x, 0, 2, dim=5), ValueError, r"dim must lie in \[-4, 4\)"),
        (lambda: cp.unshard_sequence([x, x], dim=7), ValueError, r"dim must lie in \[-4, 4\)"),
    ):
        with pytest.raises(err, match=match):
            call()
    assert torch.equal(cp.shard_sequence(x, 1, 2, dim=-2), cp.shard_sequence(x, 1, 2, dim=2))


def _settings(world, layout, L, causal=False, window=None, mask_mod=None, rank=0) -> CPSettings:
    from attnkit.request import build_request

    Lpad = cp.padded_length(L, world, layout)
    x = torch.zeros(1, 1, 1, 8)
    req = build_request(x, x, x, causal=causal, window=window, global_len=Lpad)  # as check_call
    return CPSettings(group=None, rank=rank, world=world, shard_len=Lpad // world, seq_len=L, layout=layout,
                      causal=causal, window=req.window, scale=1.0, softcap=None, mask_mod=mask_mod,
                      backend="auto", bounds=req.key_bounds)


def test_plan_skips_masked_pairs_and_uses_plain_calls():
    s = _settings(4, "zigzag", 64, causal=True)  # c = 8, shards of 16
    for r in range(4):
        calls = [plan_pair(s, r, t) for t in range(4)]
        assert calls[r].kind == "diagonal" and calls[r].kwargs == {"causal": True, "window": None}
        others = [calls[t] for t in range(4) if t != r]
        assert all(x.kind == "full" and x.pairs() == 8 * 16 for x in others)
    s = _settings(4, "contiguous", 64, causal=True)
    for r in range(4):
        kinds = [None if x is None else x.kind for x in (plan_pair(s, r, t) for t in range(4))]
        assert kinds == ["full"] * r + ["diagonal"] + [None] * (3 - r)
    s = _settings(4, "contiguous", 64, window=3)  # only the neighbouring shard's edge is visible
    assert plan_pair(s, 2, 1).kind == "masked" and plan_pair(s, 2, 0) is None and plan_pair(s, 2, 3) is None
    assert plan_pair(s, 2, 2).kind == "diagonal"
    s = _settings(2, "contiguous", 13)  # padding: the last shard's keys are masked, not dense
    assert plan_pair(s, 0, 1).kind == "masked" and plan_pair(s, 0, 0).kind == "full"
    s = _settings(2, "contiguous", 64, mask_mod=doc_causal)  # a mask_mod: never "full"
    assert plan_pair(s, 1, 0).kind == "masked"


def _visible(i, j, L, causal, window, mask_mod=None):
    """Whether global query i sees global key j, written from the user's arguments (not from bounds)."""
    keep = (i < L) & (j < L)
    if causal:
        keep = keep & (j <= i)
    if isinstance(window, int):
        keep = keep & (j <= i) & (j > i - window)
    elif window is not None:
        left, right = window
        keep = keep & (j >= i - left if left is not None else True) & (j <= i + right if right is not None else True)
    if mask_mod is not None:
        keep = keep & mask_mod(0, 0, i.clamp(max=L - 1), j.clamp(max=L - 1))
    return keep


def _call_visible(call, Ls: int) -> torch.Tensor:
    """[Ls, Ls]: what the plan's local call lets this rank's queries see of the source rank's keys."""
    got = torch.zeros(Ls, Ls, dtype=torch.bool)
    if call is None:
        return got
    i = torch.arange(call.q_hi - call.q_lo).view(-1, 1)
    j = torch.arange(call.k_hi - call.k_lo).view(1, -1)
    if call.kind == "full":
        assert call.kwargs == {}, call
        tile = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool)
    elif call.kind == "diagonal":  # the contract's own causal/window, on local indices
        assert set(call.kwargs) == {"causal", "window"} and i.shape[0] == j.shape[1] == Ls, call
        tile = _visible(i, j, Ls, call.kwargs["causal"], call.kwargs["window"])
    else:
        assert call.kind == "masked" and set(call.kwargs) == {"mask_mod"}, call
        tile = call.kwargs["mask_mod"](torch.zeros(()), torch.zeros(()), i, j).expand(i.shape[0], j.shape[1])
    got[call.q_lo:call.q_hi, call.k_lo:call.k_hi] = tile
    return got


def _plan_mismatches(world, layout, L, causal=False, window=None, mask_mod=None) -> list[str]:
    s = _settings(world, layout, L, causal=causal, window=window, mask_mod=mask_mod)
    Lpad = world * s.shard_len
    pos = [torch.cat([torch.arange(g, g + n) for g, n in cp.shard_positions(r, world, layout, s.shard_len)])
           for r in range(world)]
    bad = []
    for r in range(world):
        for t in range(world):
            call = plan_pair(s, r, t)
            want = _visible(pos[r].view(-1, 1), pos[t].view(1, -1), L, causal, window, mask_mod)
            got = _call_visible(call, s.shard_len)
            what = (f"world={world} {layout} L={L} (Lpad {Lpad}) causal={causal} window={window} "
                    f"mask_mod={getattr(mask_mod, '__name__', None)}: q rank {r}, k rank {t}, {call}")
            if not torch.equal(got, want):
                bad.append(f"{what}: the call sees {got.int().tolist()}, the pair {want.int().tolist()}")
            elif call is not None and not got.any() and mask_mod is None:  # (a user's mod: the plan cannot know)
                bad.append(f"{what}: a call with nothing visible (should be skipped)")
            elif call is not None and call.kind == "masked" and mask_mod is None:
                tile = got[call.q_lo:call.q_hi, call.k_lo:call.k_hi]
                if tile.all():
                    bad.append(f"{what}: masked, but every pair of the call is visible (should be plain)")
    return bad


_PLAN_WINDOWS = (None, 1, 2, 3, 4, 5, 7, (0, 0), (0, 1), (1, 0), (0, 2), (2, 0), (1, 3), (3, 1), (2, 2),
                 (4, 0), (6, None), (None, 2), (None, 0))


@pytest.mark.parametrize("world", (1, 2, 3, 4))
def test_plan_classification_matches_dense_mask(world):
    """Brute force over small sequences, layouts, causal and windows at every edge: the union of the plan's
    local calls of each (query rank, key rank) pair sees exactly the pairs of the dense global mask. A pair
    run plain ("full") must be wholly visible, a skipped one wholly hidden, a masked one (no mask_mod) mixed."""
    bad = []
    for layout in cp.LAYOUTS:
        for L in range(1, 4 * world + 3):
            for causal in (False, True):
                for window in _PLAN_WINDOWS:
                    bad += _plan_mismatches(world, layout, L, causal, window)
    assert not bad, f"{len(bad)} plan mismatches, first ones:\n" + "\n".join(bad[:5])


def test_plan_mask_wrappers_follow_seq_len_and_bounds():
    """Same user mask_mod object, same padded length (so the same shard starts), different true lengths
    and windows, one after the other: each call's cached global wrapper must mask this call's padding."""
    bad = []
    for world in (2, 3, 4):
        for layout in cp.LAYOUTS:
            for L in range(2 * world * 2, 2 * world * 3 + 1):  # each Lpad in order from its shortest length up
                for window in (None, 3, (1, 2)):
                    bad += _plan_mismatches(world, layout, L, window=window, mask_mod=doc_causal)
                    bad += _plan_mismatches(world, layout, L, causal=True, window=window, mask_mod=dead_rows)
    assert not bad, f"{len(bad)} plan mismatches, first ones:\n" + "\n".join(bad[:5])


def test_global_mask_mod_positions():
    """The wrapper maps local tile indices to global positions (two zigzag segments)."""
    from attnkit.distributed.ring import global_mask_mod

    seen = []

    def rec(b, h, i, j):
        seen.append((i.clone(), j.clone()))
        return torch.ones_like(i + j, dtype=torch.bool)

    fn = global_mask_mod((8, 40), (16,), 4, 42, None, rec)
    assert fn is global_mask_mod((8, 40), (16,), 4, 42, None, rec)  # cached: FlexAttention's cache hits
    i = torch.arange(8).view(-1, 1)
    j = torch.arange(4).view(1, -1)
    keep = fn(torch.zeros(1), torch.zeros(1), i, j)
    gi, gj = seen[0]
    # positions 42, 43 are padding (seq_len 42): excluded, and the user's mod sees them as 41, the last real one
    assert gi.view(-1).tolist() == [8, 9, 10, 11, 40, 41, 41, 41] and gj.view(-1).tolist() == [16, 17, 18, 19]
    assert keep[:6].all() and not keep[6:].any()


@pytest.mark.slow
def test_global_mask_mod_runs_under_flex_attention():
    """On CUDA the masked ring steps run on FlexAttention, which traces the wrapper (vmap over
    scalar indices): the same tile through compiled flex (CPU forward, ~20 s of compiling) and
    through the reference must agree, zigzag segments, padding, bounds and head offset included."""
    from attnkit.distributed.ring import global_mask_mod

    def doc_heads(b, h, i, j):
        return ((i // 7) == (j // 7)) | (h == 3)

    # q: chunks 2 and 5 of 8 tokens (global 16.. and 40..); k: chunks 0 and 7 (0.., 56..); seq_len 60.
    fn = global_mask_mod((16, 40), (0, 56), 8, 60, (None, 0), doc_heads, head_offset=2)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g) for _ in range(3))
    got = attnkit.attention(q, k, v, mask_mod=fn, backend="flex")
    want = attnkit.attention(q, k, v, mask_mod=fn, backend="reference")
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.all(want[:, 0] == want[:, 1])  # head 1 (global 3) sees more than head 0 (global 2)


def test_example_script_runs():
    """examples/ring_attention.py as a user runs it (2 spawned gloo ranks): exit code 0 = both strategies match."""
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "ring_attention.py")
    r = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "ok: both strategies" in r.stdout and r.stdout.count("relative error") == 2
