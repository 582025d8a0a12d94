#!/usr/bin/env python
"""attnkit decode benchmark (issue 6): one new token per sequence against a long KV cache.

    python benchmarks/bench_decode.py --out DIR [--smoke] [--only NAME ...] [--peers P ...]
                                      [--block-size 16] [--block-order shuffled|allocated]
                                      [--softcap C] [--budget-s S] [--list]

Grid (issue 6): bf16, GQA 32 query / 8 KV heads, D = 128, one query per sequence, every
sequence holding the same number of cached tokens: batch 1, 8, 32, 128 x cached 1k, 8k, 32k,
128k tokens. A case whose contiguous cache plus paged pool (2 x B x L x 8 x 128 x 2 x 2 bytes)
does not fit in 80% of the free device memory is recorded as skipped.

Peers, in one process, on the same cached tokens:
- attnkit: `attnkit.attention(q, pool_k, pool_v, cache_seqlens=, block_table=, causal=True)`,
  backend auto (the row names what `explain` picked: the split-KV decode kernel of the triton
  backend on CUDA), over a PagedKVCache-layout pool [num_blocks, 8, block_size, 128] whose
  blocks are handed out in a shuffled order (no table is contiguous: a pool after much
  allocating and freeing), or with `--block-order allocated` as a fresh PagedKVCache hands them
  out when the batch is prefilled into it (sequence b holds blocks b * n .. b * n + n - 1;
  tests/test_paged_kv_cache.py checks that this is the cache's order);
- attnkit_contiguous: the same call over a contiguous [B, 8, L, 128] cache with cache_seqlens;
- sdpa_cudnn / sdpa_flash / sdpa_efficient / sdpa_math: torch SDPA forced to one kernel over
  the contiguous cache (every sequence holds exactly L keys, so no mask: the issue's bar),
  enable_gqa=True; sdpa_math only where B * L <= 64k tokens;
- flex: compiled FlexAttention over the contiguous cache (enable_gqa, no block mask; torch
  picks its decoding kernel for short query lengths); CUDA only (on the CPU it compiles per
  shape and is slow);
- eager: softmax(q k^T * scale) v in bf16 with each GQA group folded into rows (no K/V repeat),
  where B * L <= 64k tokens;
- flashinfer: FlashInfer's BatchDecodeWithPagedKVCacheWrapper over the same paged pool and
  tables (layout "HND"; plan() before timing, run() timed), where the package imports (it is
  not a dependency: skipped with the reason otherwise).

`--softcap C` (Gemma 2's logit softcap, C * tanh(s / C)): the attnkit rows pass softcap=C, flex a
score_mod, eager the formula, FlashInfer its logits_soft_cap; SDPA has no softcap, so its kernels run
without it as the bar of the same bytes (their rows are not checked against the softcapped reference).

Read ceilings (instruments, not peers: no attention, never "best", no error check): read_paged
and read_contiguous read the same K/V as attnkit and attnkit_contiguous in the same order (the
paged pool through the same block table; (B x 8 kv heads, splits) programs as the decode kernel's
split rule gives, 128-key tiles, 4 warps) and only multiply each tile by a constant (two small
dots, so that the loads stay pipelined as in the decode kernel); CUDA with Triton only, L a
multiple of 128. They tell what reading the cache in that order costs on this device: the
scattered blocks of a small page size read slower than a contiguous cache whatever the kernel
does with them. The summary gives attnkit paged as a fraction of read_paged.

Metric: K/V bytes read per second. bytes = B * L * Hkv * (D + Dv) * 2: every cached K and V
element read once (q and the output are under 0.1% of that) -> GB/s (1e9 B/s). ratio = GB/s
over the best non-attnkit peer (attnkit rows) or over the best row (the others). copy = GB/s
as a fraction of the measured device copy ceiling (harness.measure_ceilings: a 1 GiB device
copy, bytes read + written); a decode only reads, so it may pass 100%. Small caches (B x L x 4 KiB
below ~50 MB) stay in the H100's L2 between timed calls (no flush, as in every attnkit
benchmark): their GB/s are not HBM numbers.

Each peer's output is checked against attnkit's float32 `reference` on the first two
sequences before it is timed (BAD: relative L2 error > 2e-2; a BAD row cannot be best).
Timing: harness.time_fn_stats (CUDA events, median), 2 rounds over the peers in alternating
order, ms = mean of the rounds' medians. Writes DIR/decode.json and DIR/decode.md (rewritten
after every case) and prints a summary against issue 6's goal: paged decode >= 0.9 x the best
SDPA kernel over a contiguous cache on every case, >= 1.0 x where B * L >= 256k tokens.
`--smoke`: tiny shapes on any device (CPU: attnkit's auto choice there is sdpa over the
densified cache; `--backend triton` with TRITON_INTERPRET=1 runs the decode kernel), few reps.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness as H  # noqa: E402

attnkit = H.import_attnkit()

from harness import SDPA_KERNELS, SDPBackend, compiled_flex, flex_attention, sdpa_kernel  # noqa: E402

PEERS = ("attnkit", "attnkit_contiguous", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "eager",
         "flashinfer", "read_paged", "read_contiguous")
READS = ("read_paged", "read_contiguous")  # instruments: read ceilings of the two access orders
try:  # optional peer: not a dependency of attnkit (docs/benchmarks.md says how it was carried to the GPU)
    import flashinfer
except Exception:  # noqa: BLE001 - absent, or present but unusable here: the peer is skipped with the reason
    flashinfer = None
FLASHINFER_WORKSPACE_BYTES = 128 * 2**20
SMALL_TOKENS = 64 * 1024  # sdpa_math and eager only up to this many cached tokens (B * L)
GOAL_TOKENS = 256 * 1024  # issue 6: >= 1.0 x SDPA-contiguous from here on, >= 0.9 x below
SOFTCAP: float | None = None  # --softcap
FWD_REL_TOL = 2e-2
CHECK_SEQS = 2
READ_BLOCK_N = 128

try:
    import triton
    import triton.language as tl
except ImportError:  # the read instruments are skipped with the reason
    triton = None

if triton is not None:
    @triton.jit
    def _read_kv_kernel(K, V, BT, OUT, skb, skh, skn, svb, svh, svn, sbtb, Hkv, L, NUM_SPLITS,
                        PAGED: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
        """Reads the K/V tiles the decode kernel's program (b, kv head, split) reads, in the same
        order, and reduces them to one number (the dots keep the loads pipelined as there)."""
        pid = tl.program_id(0)
        split = tl.program_id(1)
        hk = (pid % Hkv).to(tl.int64)
        b = (pid // Hkv).to(tl.int64)
        per = tl.cdiv(L // BLOCK_N, NUM_SPLITS)
        t_start = split * per
        t_end = tl.minimum(t_start + per, L // BLOCK_N)
        d = tl.arange(0, D)
        ones_q = tl.full([16, D], 1.0, K.dtype.element_ty)
        ones_p = tl.full([16, BLOCK_N], 1.0, V.dtype.element_ty)
        acc_k = tl.zeros([16, BLOCK_N], tl.float32)
        acc_v = tl.zeros([16, D], tl.float32)
        k_base = K + hk * skh
        v_base = V + hk * svh
        if not PAGED:
            k_base += b * skb
            v_base += b * svb
        for t in range(t_start, t_end):
            offs = t * BLOCK_N + tl.arange(0, BLOCK_N)
            if PAGED and PAGE >= BLOCK_N:
                blk = tl.load(BT + b * sbtb + (t * BLOCK_N) // PAGE).to(tl.int64)
                slot = (t * BLOCK_N) % PAGE + tl.arange(0, BLOCK_N)
                k_rows, v_rows = blk * skb + slot * skn, blk * svb + slot * svn
            elif PAGED:
                blk = tl.load(BT + b * sbtb + offs // PAGE).to(tl.int64)
                k_rows, v_rows = blk * skb + (offs % PAGE) * skn, blk * svb + (offs % PAGE) * svn
            else:
                k_rows, v_rows = offs.to(tl.int64) * skn, offs.to(tl.int64) * svn
            acc_k += tl.dot(ones_q, tl.trans(tl.load(k_base + k_rows[:, None] + d[None, :])))
            acc_v += tl.dot(ones_p, tl.load(v_base + v_rows[:, None] + d[None, :]))
        tl.store(OUT + pid * NUM_SPLITS + split, tl.sum(tl.sum(acc_k, 1), 0) + tl.sum(tl.sum(acc_v, 1), 0))


def read_call(st: State, paged: bool):
    """The read instrument over the pool (paged) or the contiguous cache: a no-argument callable that
    launches it and returns its per-program sums."""
    from attnkit.ops.decode_attention import num_splits_for  # the decode kernel's split rule

    c = st.case
    k, v = (st.kp, st.vp) if paged else (st.k, st.v)
    splits = num_splits_for(c.B * c.Hkv, c.L, st.q.device)
    out = torch.empty(c.B * c.Hkv * splits, device=st.q.device, dtype=torch.float32)
    page = st.kp.shape[2] if paged else 1
    grid = (c.B * c.Hkv, splits)
    args = (k, v, st.table, out, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            st.table.stride(0), c.Hkv, c.L, splits)
    meta = dict(PAGED=paged, PAGE=page, BLOCK_N=READ_BLOCK_N, D=c.D, num_warps=4, num_stages=4 if paged else 3)

    def run():
        _read_kv_kernel[grid](*args, **meta)
        return out  # per program: 16 x (the sum of its K tiles + the sum of its V tiles)
    return run


@dataclass
class Case:
    name: str
    B: int
    L: int
    Hq: int = 32
    Hkv: int = 8
    D: int = 128

    @property
    def tokens(self) -> int:
        return self.B * self.L

    def kv_bytes(self, itemsize: int = 2) -> int:
        return self.B * self.L * self.Hkv * 2 * self.D * itemsize

    def shape(self) -> str:
        return (f"B={self.B} L={self.L} Hq={self.Hq} Hkv={self.Hkv} D={self.D} bf16, 1 query per sequence; "
                f"K/V {self.kv_bytes() / 2**20:.4g} MiB")


def cases(smoke: bool) -> list[Case]:
    if smoke:
        return [Case("B1_L200", 1, 200, 4, 2, 32), Case("B2_L1000", 2, 1000, 4, 2, 32), Case("B3_L96", 3, 96, 4, 2, 32)]
    return [Case(f"B{B}_L{L // 1024}k", B, L) for B in (1, 8, 32, 128) for L in (1024, 8192, 32768, 131072)]


# --------------------------------------------------------------------------- state
@dataclass
class State:
    case: Case
    q: torch.Tensor
    k: torch.Tensor  # contiguous [B, Hkv, L, D]
    v: torch.Tensor
    kp: torch.Tensor  # pool [num_blocks, Hkv, bs, D]
    vp: torch.Tensor
    table: torch.Tensor  # int32 [B, L / bs]
    lens: torch.Tensor  # int32 [B]
    ref: torch.Tensor  # float32 reference output of the first CHECK_SEQS sequences
    backend: str = "auto"  # for the attnkit rows


def make_state(c: Case, device: torch.device, block_size: int, block_order: str = "shuffled") -> State:
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16
    q = torch.randn(c.B, c.Hq, 1, c.D, device=device, dtype=dt, generator=g)
    k = torch.randn(c.B, c.Hkv, c.L, c.D, device=device, dtype=dt, generator=g)
    v = torch.randn(c.B, c.Hkv, c.L, c.D, device=device, dtype=dt, generator=g)
    nb = -(-c.L // block_size)
    num_blocks = c.B * nb
    if block_order == "shuffled":
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    else:  # "allocated": a fresh PagedKVCache's order after prefilling the batch
        order = torch.arange(num_blocks, dtype=torch.int32)
    table = order.view(c.B, nb).to(device)
    kp = torch.zeros(num_blocks, c.Hkv, block_size, c.D, device=device, dtype=dt)
    vp = torch.zeros_like(kp)
    pad = nb * block_size - c.L
    for src, pool in ((k, kp), (v, vp)):  # pool[table[b, j]] = tokens j*bs .. (j+1)*bs of sequence b
        s = F.pad(src, (0, 0, 0, pad)) if pad else src
        pool[table.view(-1).long()] = s.view(c.B, c.Hkv, nb, block_size, c.D).transpose(1, 2).reshape(
            num_blocks, c.Hkv, block_size, c.D)
    lens = torch.full((c.B,), c.L, dtype=torch.int32, device=device)
    n = min(c.B, CHECK_SEQS)
    ref = attnkit.attention(q[:n].float(), k[:n].float(), v[:n].float(), softcap=SOFTCAP, backend="reference")
    return State(c, q, k, v, kp, vp, table, lens, ref)


# --------------------------------------------------------------------------- peers


def skip_reason(peer: str, c: Case, device: torch.device) -> str | None:
    if peer in ("sdpa_math", "eager") and c.tokens > SMALL_TOKENS:
        return f"B x L > {SMALL_TOKENS // 1024}k tokens: not run (materialises the scores)"
    if peer.startswith("sdpa_") and sdpa_kernel is None:
        return "torch.nn.attention.sdpa_kernel missing"
    if peer == "flex" and (flex_attention is None or device.type != "cuda"):
        return "FlexAttention: CUDA only here"
    if peer == "flashinfer" and (flashinfer is None or device.type != "cuda"):
        return "FlashInfer: not installed here" if flashinfer is None else "FlashInfer: CUDA only"
    if peer in READS:
        if triton is None or device.type != "cuda":
            return "read ceiling: CUDA with Triton only"
        if c.L % READ_BLOCK_N:
            return f"read ceiling: L must be a multiple of {READ_BLOCK_N}"
    return None


def make_call(peer: str, st: State):
    c, q, k, v = st.case, st.q, st.k, st.v
    be = st.backend
    if peer == "attnkit":
        return lambda: attnkit.attention(q, st.kp, st.vp, cache_seqlens=st.lens, block_table=st.table, causal=True,
                                         softcap=SOFTCAP, backend=be)
    if peer == "attnkit_contiguous":
        return lambda: attnkit.attention(q, k, v, cache_seqlens=st.lens, causal=True, softcap=SOFTCAP, backend=be)
    if peer in READS:
        return read_call(st, paged=peer == "read_paged")
    if peer in SDPA_KERNELS:
        backend = getattr(SDPBackend, SDPA_KERNELS[peer])

        def sdpa():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return sdpa
    if peer == "flex":
        fn = compiled_flex()
        if SOFTCAP is None:
            return lambda: fn(q, k, v, enable_gqa=True)
        cap = SOFTCAP

        def softcap(score, b, h, i, j):
            return cap * torch.tanh(score / cap)
        return lambda: fn(q, k, v, score_mod=softcap, enable_gqa=True)
    if peer == "flashinfer":
        # its paged decode over the same pool: separate K and V in the "HND" layout, [pages, Hkv, page, D];
        # plan() once, as a serving step plans once for all layers; run() alone is timed
        bs, nb = st.kp.shape[2], st.table.shape[1]
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=q.device), kv_layout="HND")
        indptr = torch.arange(c.B + 1, dtype=torch.int32, device=q.device) * nb
        last = torch.full((c.B,), c.L - (nb - 1) * bs, dtype=torch.int32, device=q.device)
        wrapper.plan(indptr, st.table.reshape(-1).contiguous(), last, c.Hq, c.Hkv, c.D, bs,
                     pos_encoding_mode="NONE", data_type=q.dtype, q_data_type=q.dtype, logits_soft_cap=SOFTCAP)
        q3 = q[:, :, 0]  # [B, Hq, D]
        return lambda: wrapper.run(q3, (st.kp, st.vp)).unsqueeze(2)
    if peer == "eager":
        G, scale = c.Hq // c.Hkv, 1.0 / math.sqrt(c.D)

        def eager():
            qg = q.view(c.B, c.Hkv, G, c.D)  # [B, Hkv, G * Lq, D]: the group as rows, K/V not repeated
            s = torch.matmul(qg, k.transpose(-1, -2)) * scale
            if SOFTCAP is not None:
                s = SOFTCAP * torch.tanh(s / SOFTCAP)
            p = torch.softmax(s, dim=-1)
            return torch.matmul(p, v).view(c.B, c.Hq, 1, c.D)
        return eager
    raise ValueError(f"unknown peer {peer!r}")


def check(st: State, out: torch.Tensor) -> dict:
    got = out[: st.ref.shape[0]].float()
    if not bool(torch.isfinite(got).all()):
        return {"rel_err": float("inf"), "correct": False}
    rel = float((got - st.ref).norm() / st.ref.norm())
    return {"rel_err": rel, "max_abs_err": float((got - st.ref).abs().max()), "correct": rel <= FWD_REL_TOL}


def record(c: Case, peer: str, **kw) -> dict:
    rec = {"workload": c.name, "peer": peer, "B": c.B, "L": c.L, "tokens": c.tokens, "kv_bytes": c.kv_bytes(),
           "shape": c.shape(), "status": "ok", "ms": None, "gbps": None, "ratio_to_best": None,
           "ratio_baseline": None, "frac_copy_ceiling": None}
    rec.update(kw)
    if rec["status"] == "ok" and rec["ms"]:
        rec["gbps"] = c.kv_bytes() / (rec["ms"] * 1e-3) / 1e9
    return rec


def fill_ratios(rows: list[dict], ceilings: dict | None) -> None:
    ok = [r for r in rows if r["status"] == "ok" and r["gbps"] and r.get("correct", True) is not False
          and r["peer"] not in READS]
    best_all = max(ok, key=lambda r: r["gbps"], default=None)
    best_other = max((r for r in ok if not r["peer"].startswith("attnkit")), key=lambda r: r["gbps"], default=None)
    copy = (ceilings or {}).get("copy_gbps")
    for r in rows:
        if r["status"] != "ok" or not r["gbps"]:
            continue
        base = best_other if r["peer"].startswith("attnkit") else best_all
        if base is not None:
            r["ratio_to_best"], r["ratio_baseline"] = r["gbps"] / base["gbps"], base["peer"]
        if copy:
            r["frac_copy_ceiling"] = r["gbps"] / copy


def bench_case(st: State, args, device, t_start: float, log) -> list[dict]:
    c = st.case
    rows: dict[str, dict] = {}
    timed: list[tuple[str, object, dict]] = []
    for peer in args.peers:
        why = skip_reason(peer, c, device)
        if why is None and args.budget_s and time.perf_counter() - t_start > args.budget_s:
            why = f"time budget of {args.budget_s:.0f} s spent before this peer"
        if why is not None:
            rows[peer] = record(c, peer, status="skipped", error=why)
            log(rows[peer])
            continue
        extra: dict = {}
        if peer.startswith("attnkit"):
            k, v = (st.kp, st.vp) if peer == "attnkit" else (st.k, st.v)
            kw = dict(cache_seqlens=st.lens, causal=True, backend=args.backend)
            if peer == "attnkit":
                kw["block_table"] = st.table
            plan, err, _ = H.run_guarded(lambda: attnkit.explain(st.q, k, v, **kw))  # noqa: B023
            extra["backend"] = plan.backend if plan is not None else f"explain failed: {err}"
        call, err, _ = H.run_guarded(lambda: make_call(peer, st))  # noqa: B023
        if err is None and peer in READS:  # an instrument: no attention output to check; compiled here, untimed
            _, err, _ = H.run_guarded(call)
            chk = {"instrument": True}
        elif err is None and SOFTCAP is not None and peer.startswith("sdpa_"):  # the bar: no softcap, not checked
            _, err, _ = H.run_guarded(call)
            chk = {"no_softcap": True}
        elif err is None:
            with torch.no_grad():
                chk, err, _ = H.run_guarded(lambda: check(st, call()))  # noqa: B023
        if err is not None:
            rows[peer] = record(c, peer, status="error", error=err, **extra)
            log(rows[peer])
            continue
        extra.update(chk)
        timed.append((peer, call, extra))
    medians: dict[str, list[float]] = {p: [] for p, _, _ in timed}
    for r in range(max(1, args.rounds)):
        for peer, call, _ in (timed if r % 2 == 0 else timed[::-1]):
            if peer in rows:
                continue

            def run():
                with torch.no_grad():
                    return call()  # noqa: B023

            stats, err, _ = H.run_guarded(lambda: H.time_fn_stats(  # noqa: B023
                run, warmup=args.warmup_ms, rep=args.rep_ms, device=device, min_rep=args.min_rep))
            if err is not None:
                rows[peer] = record(c, peer, status="error", error="while timing: " + err)
                log(rows[peer])
                continue
            medians[peer].append(stats["median_ms"])
    for peer, _, extra in timed:
        if peer not in rows:
            ms = sum(medians[peer]) / len(medians[peer])
            rows[peer] = record(c, peer, ms=ms, round_ms=medians[peer], **extra)
    out = [rows[p] for p in args.peers if p in rows]
    fill_ratios(out, args.ceilings)
    for r in out:
        if r["status"] == "ok":
            log(r)
    return out


# --------------------------------------------------------------------------- report
def _f(v, spec):
    return "-" if v is None else format(v, spec)


def summary(records: list[dict]) -> list[str]:
    """issue 6's goal per case: attnkit (paged) over the best SDPA kernel on the contiguous cache."""
    lines = ["| case | tokens | attnkit paged GB/s | contiguous GB/s | best SDPA (contiguous) GB/s | paged / SDPA | goal | met "
             "| read ceiling, paged order GB/s | paged / read ceiling |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name in dict.fromkeys(r["workload"] for r in records):
        rows = [r for r in records if r["workload"] == name]
        ok = {r["peer"]: r for r in rows if r["status"] == "ok"}
        mine, cont, read = ok.get("attnkit"), ok.get("attnkit_contiguous"), ok.get("read_paged")
        sdpa = [r for r in rows if r["peer"].startswith("sdpa_") and r["status"] == "ok" and r.get("correct", True)]
        best = max(sdpa, key=lambda r: r["gbps"], default=None)
        tokens = rows[0]["tokens"]
        goal = 1.0 if tokens >= GOAL_TOKENS else 0.9
        ratio = mine["gbps"] / best["gbps"] if mine and best else None
        met = "-" if ratio is None else ("yes" if ratio >= goal else "**no**")
        if mine and mine.get("correct") is False:
            met = "**no (BAD result)**"
        lines.append(f"| {name} | {tokens} | {_f(mine and mine['gbps'], '.4g')} | {_f(cont and cont['gbps'], '.4g')} | "
                     f"{_f(best and best['gbps'], '.4g')}" + (f" ({best['peer']})" if best else "") +
                     f" | {_f(ratio, '.3f')} | {goal:g} | {met} | {_f(read and read['gbps'], '.4g')} | "
                     f"{_f(mine and read and mine['gbps'] / read['gbps'], '.3f')} |")
    return lines


def write(args, meta: dict, ceilings: dict | None, records: list[dict]) -> str:
    lines = [f"# {meta['title']}", "",
             f"- device: **{meta.get('device_name')}**" + (" (smoke run: tiny shapes, not a measurement)" if args.smoke else ""),
             f"- date: {meta.get('date_utc')}",
             f"- torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA {meta.get('cuda')}, "
             f"cuDNN {meta.get('cudnn')}, attnkit {meta.get('attnkit')} ({meta.get('attnkit_commit')})"]
    if ceilings:
        lines.append(f"- ceilings (measured in this run): device copy **{ceilings['copy_gbps']:.0f} GB/s** "
                     f"(read + write), bf16 matmul {ceilings['matmul_tflops']:.4g} TFLOP/s")
    lines += [f"- {k}: {meta[k]}" for k in ("command", "timing", "notes", "wall_s") if meta.get(k)]
    lines += ["", "## Against issue 6's goal", ""] + summary(records) + [""]
    for name in dict.fromkeys(r["workload"] for r in records):
        rows = [r for r in records if r["workload"] == name]
        lines += [f"## {name}", "", rows[0]["shape"], "",
                  "| peer | ms | GB/s | ratio | copy | rounds (ms) | rel err | note |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in rows:
            note = []
            if r.get("backend"):
                note.append(f"chose {r['backend']}")
            if r.get("instrument"):
                note.append("read ceiling: an instrument, not a peer")
            if r.get("no_softcap"):
                note.append("without the softcap (SDPA has none): the bar of the same bytes")
            if r["status"] != "ok":
                note.append(f"{r['status']}: {H._short(H.error_summary(r.get('error')), 200)}")
            if r.get("correct") is False:
                note.append("**BAD**")
            frac = r.get("frac_copy_ceiling")
            lines.append(f"| {r['peer']} | {_f(r['ms'], '.4g')} | {_f(r['gbps'], '.4g')} | {_f(r['ratio_to_best'], '.2f')} | "
                         f"{_f(frac and 100 * frac, '.1f')}{'%' if frac else ''} | "
                         f"{' / '.join(format(x, '.4g') for x in r.get('round_ms') or []) or '-'} | "
                         f"{_f(r.get('rel_err'), '.1e')} | {'; '.join(note).replace('|', '/')} |")
        lines.append("")
    return H.write_report(args.out, "decode", meta, records, lines, ceilings=ceilings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="directory for decode.json and decode.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few reps: checks the script end to end")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="cases whose name contains NAME")
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    ap.add_argument("--block-size", type=int, default=16, help="paged pool block size (16 to 256, power of two)")
    ap.add_argument("--block-order", choices=("shuffled", "allocated"), default="shuffled",
                    help="pool blocks in shuffled order (default), or in a fresh PagedKVCache's order")
    ap.add_argument("--backend", default="auto",
                    help="backend of the attnkit rows (default auto; `--smoke --backend triton` under "
                         "TRITON_INTERPRET=1 runs the decode kernel on the CPU)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--warmup-ms", type=float, default=None)
    ap.add_argument("--rep-ms", type=float, default=None)
    ap.add_argument("--min-rep", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--softcap", type=float, default=None, help="logit softcap C of every call (SDPA runs without)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds after which remaining peers are recorded as skipped (default 600 on CUDA, 0 = none)")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the cases, then exit")
    args = ap.parse_args(argv)
    if args.softcap is not None and not args.softcap > 0:
        ap.error(f"--softcap must be > 0, got {args.softcap}")
    global SOFTCAP
    SOFTCAP = args.softcap

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    todo = [c for c in cases(args.smoke) if not args.only or any(p in c.name for p in args.only)]
    if args.list:
        for c in todo:
            print(f"{c.name:<14} {c.shape()}")
        return 0
    if not args.out:
        ap.error("--out DIR is required (unless --list)")
    if not todo:
        ap.error(f"--only {args.only} matches no case; --list shows them")
    cuda = device.type == "cuda"
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else (10.0 if cuda else 2.0)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else ((20.0 if args.smoke else 50.0) if cuda else 10.0)
    if args.budget_s is None:
        args.budget_s = 600.0 if cuda and not args.smoke else 0.0
    if cuda:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    print(f"attnkit decode bench on {device} ({'smoke' if args.smoke else 'full'}), {len(todo)} cases, "
          f"peers {args.peers}", flush=True)
    ceilings = None
    if not args.no_ceilings:
        ceilings = (H.measure_ceilings(device) if cuda and not args.smoke else
                    H.measure_ceilings(device, matmul_n=512, copy_bytes=64 << 20, rep=20.0))
        print(f"ceilings: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul {ceilings['matmul_tflops']:.4g} TFLOP/s",
              flush=True)
    args.ceilings = ceilings
    meta = H.collect_meta(
        device, title="attnkit decode benchmark (issue 6)" + (" (smoke)" if args.smoke else ""), smoke=args.smoke,
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        timing=(f"median of individually timed calls ({'CUDA events' if cuda else 'time.perf_counter'}), warmup "
                f"{args.warmup_ms:g} ms / rep {args.rep_ms:g} ms budgets, {args.rounds} rounds in alternating order, "
                "ms = mean of the rounds' medians, no L2 flush, no_grad; first call not timed"),
        notes=(f"GB/s = K/V bytes (B * L * Hkv * (D + Dv) * 2) / time; paged pool block size {args.block_size}, "
               + (f"softcap {SOFTCAP:g} (not on the SDPA rows); " if SOFTCAP is not None else "") +
               f"blocks in {'shuffled' if args.block_order == 'shuffled' else 'allocation (fresh cache)'} order; "
               "rel err vs float32 reference on the first 2 sequences, BAD > "
               f"{FWD_REL_TOL:g}"),
    )

    def log(r):
        if r["status"] == "ok":
            desc = f"{r['ms']:.4g} ms {r['gbps']:.4g} GB/s ratio {_f(r['ratio_to_best'], '.2f')}"
            if "rel_err" in r:
                desc += f" err {r['rel_err']:.1e}" + (" BAD" if r.get("correct") is False else "")
        else:
            desc = f"{r['status']}: {H._short(H.error_summary(r.get('error')), 110)}"
        if r.get("backend"):
            desc += f" (chose {r['backend']})"
        print(f"[{time.perf_counter() - T0:6.1f}s] {r['workload']} {r['peer']}: {desc}", flush=True)

    records: list[dict] = []
    for c in todo:
        need = 2 * c.kv_bytes() + (c.kv_bytes() // c.B * min(c.B, CHECK_SEQS) * 2)  # cache + pool + fp32 check copy
        free = torch.cuda.mem_get_info(device)[0] if cuda else None
        if free is not None and need > 0.8 * free:
            for p in args.peers:
                records.append(record(c, p, status="skipped",
                                      error=f"does not fit: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"))
            print(f"[{time.perf_counter() - T0:6.1f}s] {c.name}: skipped (needs ~{need / 2**30:.1f} GiB)", flush=True)
            continue
        st, err, _ = H.run_guarded(lambda: make_state(c, device, args.block_size, args.block_order))  # noqa: B023
        if st is not None:
            st.backend = args.backend
        if err is not None:
            records += [record(c, p, status="error", error="setup failed: " + err) for p in args.peers]
            print(f"[{time.perf_counter() - T0:6.1f}s] {c.name}: setup failed: {err}", flush=True)
            continue
        records += bench_case(st, args, device, T0, log)
        del st
        H.free_memory()
        meta["wall_s"] = round(time.perf_counter() - T0, 1)
        write(args, meta, ceilings, records)
    meta["wall_s"] = round(time.perf_counter() - T0, 1)
    write(args, meta, ceilings, records)
    print("\n" + "\n".join(summary(records)))
    print(f"\nwall {meta['wall_s']} s; wrote {os.path.join(args.out, 'decode.json')} and decode.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
