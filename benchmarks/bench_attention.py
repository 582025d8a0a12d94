#!/usr/bin/env python
"""attnkit attention benchmark: attnkit's choice against every peer, one process, same inputs.

    python benchmarks/bench_attention.py --out DIR [--smoke] [--only NAME ...] [--modes fwd fwd+bwd]
                                         [--peers attnkit sdpa_cudnn ...] [--budget-s S] [--list]

Workloads (bf16; full run, for an H100):
- dense and causal at L = 1k, 4k, 16k, D = 64 (H = 32) and 128 (H = 16): d_model 2048,
  B = max(1, 16384 // L), so 16k tokens per case;
- sliding window 1024 (causal), L = 16k, D = 128, H = 16, B = 1;
- a bf16 bias with its gradient at transformer head dims (`bias_*`, B = 16384 // L): shared by
  the batch ([1, H, L, L]) at L = 1k, 4k and D = 64, 96, 128; one per batch row ([B, H, L, L]),
  and shared beside a causal mask or a key padding mask [B, 1, 1, L], at L = 1k, D = 64;
- issue 5's Evoformer grid (`evoformer_*`, D = 32): MSA row attention, B = 128 rows, H = 8,
  L = 256, 512, 1024, and triangle attention, B = L rows, H = 4, L = 256, 512, with an additive
  pair bias [1, H, L, L] that requires grad (bf16, see the workload note);
each timed "fwd" (inference: no_grad, inputs without grad) and "fwd+bwd" (forward, then
torch.autograd.grad(out, [q, k, v(, bias)], fixed random grad): the backward includes dbias).

Peers: attnkit (backend="auto"; the row names the backend explain() reports),
torch SDPA forced to each kernel (sdpa_cudnn, sdpa_flash, sdpa_efficient, sdpa_math),
FlexAttention compiled (flex: torch.compile(flex_attention, dynamic=False) with a
create_block_mask for causal / window, a score_mod reading the bias), and eager math
(softmax(q k^T * scale + bias / mask) v in bf16). SDPA peers use is_causal=True for causal
(Lq == Lk, so its top-left alignment is the contract's bottom-right) and a materialised bool
mask for the window. sdpa_math and eager are skipped at L >= 16k (O(L^2) memory).
ds4sci: DeepSpeed's DS4Sci_EvoformerAttention kernels on the biased workloads, built from
DeepSpeed's sources where they are set up (benchmarks/ds4sci.py says how), given its own
[1, N, L, H, D] layout (converted before timing) and reported as unavailable elsewhere.

Before it is timed, each peer's forward output (and for fwd+bwd its gradients, through a
grad that is non-zero on the checked rows only) is compared with attnkit's float32
`reference` backend on a slice of the batch and of the query rows; a peer whose error is
far above bf16 rounding is marked BAD and cannot be "best". A peer that fails
(unsupported, OOM, compile error) is recorded with its error text.

Peak memory (CUDA): the memory one more call allocates above what was allocated before it
(inputs excluded; fwd+bwd includes the gradients), measured after the first call.

Timing (harness.time_fn_stats): CUDA events, warm-up / rep budgets of 10 / 50 ms per peer,
median; the peers of a (workload, mode) are timed in 2 rounds, the second in reverse order,
and ms is the mean of the two medians (an H100 running near its power limit slows down over
a few seconds of load, which otherwise favours whichever peer runs first). A full run took
~170 s of wall time on an H100 (torch 2.11, triton 3.6), FlexAttention compiles included;
--budget-s (default 300 s on CUDA) records the peers left as skipped if a run goes long.

Writes DIR/results.json and DIR/results.md (rewritten after every workload, so a run cut
short keeps what it measured) and prints, last, one compact table per workload.
`--smoke`: tiny shapes on whatever device is there, few reps (on the CPU FlexAttention is
inference-only, so its fwd+bwd rows are skipped there).
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the time budget counts from here (imports and CUDA start-up included)

import argparse
import fnmatch
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ds4sci  # noqa: E402
import harness as H  # noqa: E402

attnkit = H.import_attnkit()

from harness import SDPA_KERNELS, SDPBackend, compiled_flex, create_block_mask, sdpa_kernel  # noqa: E402

PEERS = ("attnkit", "attnkit_triton", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "sdpa_math", "flex", "eager",
         "ds4sci")
MODES = ("fwd", "fwd+bwd")
# Correctness bars against the float32 reference (relative L2 error). bf16 rounding of the
# output alone gives ~2-4e-3; a wrong mask or scale gives > 1e-1.
FWD_REL_TOL = 2e-2
GRAD_REL_TOL = 5e-2
CHECK_BATCHES = 2
CHECK_ROWS = 256


@dataclass
class Workload:
    name: str
    B: int
    Hq: int
    L: int
    D: int
    causal: bool = False
    window: int | None = None
    bias: bool = False
    bias_batch: bool = False  # the bias is [B, H, L, L] (one per batch row), not [1, H, L, L]
    keymask: bool = False  # a key padding mask [B, 1, 1, L] (bool, about 10% of the keys masked out)
    long: bool = False  # nominally L >= 16k: O(L^2)-memory peers (sdpa_math, eager) are skipped
    note: str = ""

    def shape(self) -> str:
        kind = "dense"
        if self.window is not None:
            kind = f"causal window {self.window}"
        elif self.causal:
            kind = "causal"
        if self.bias:
            kind += f", bias [{self.B if self.bias_batch else 1},{self.Hq},{self.L},{self.L}]"
        if self.keymask:
            kind += f", key mask [{self.B},1,1,{self.L}]"
        return f"B={self.B} Hq=Hkv={self.Hq} Lq=Lk={self.L} D={self.D} bf16, {kind}"

    def flops(self, mode: str) -> float:
        if self.keymask:  # only the pairs the key mask leaves (and causal: keys at or before the query)
            km = key_mask(self)
            j = torch.arange(self.L)
            per_key = (self.L - j) if self.causal else torch.full((self.L,), self.L)
            pairs = (km * per_key).sum().item() / self.B  # per (batch, head), averaged as attended_pairs does
            return 4.0 * self.B * self.Hq * self.D * pairs * H.MODE_FACTOR[mode]
        return H.attention_flops(
            self.B, self.Hq, self.L, self.L, self.D, causal=self.causal, window=self.window, mode=mode
        )


def key_mask(wl: "Workload") -> torch.Tensor:
    """The key padding mask of a keymask workload: bool [B, L] on the CPU, ~10% of the keys out, never key 0."""
    km = torch.rand(wl.B, wl.L, generator=torch.Generator().manual_seed(1)) > 0.1
    km[:, 0] = True
    return km


EVO_NOTE = (
    "Evoformer MSA row attention: bias is bf16 (not float32) so that SDPA takes it as attn_mask "
    "in q's dtype; the same bf16 bias goes to every peer; it requires grad and fwd+bwd computes dbias."
)

BIAS_NOTE = "one bf16 [1, H, L, L] bias shared by the batch, requiring grad: fwd+bwd computes dbias (as for Evoformer)"


KEYMASK_TIMING = ("SDPA peers fold the key mask into their mask or bias inside each timed call (as a user writes it); "
                  "flex's BlockMask is built once, outside timing; FLOPs count only the pairs the key mask leaves")
KEYMASK_NOTE = ("a bool key padding mask [B, 1, 1, L] (about 10% of the keys out); SDPA peers get it (and the causal "
                "mask) as one bool attn_mask, flex a key-mask BlockMask. " + KEYMASK_TIMING)

BIAS_BATCH_NOTE = "one bf16 [B, H, L, L] bias (a bias per batch row), requiring grad: fwd+bwd computes dbias"


def workloads(smoke: bool) -> list[Workload]:
    if smoke:  # same kinds, tiny: exercises every code path, including the long-L skips
        return [
            Workload("dense_L64_D64", 2, 2, 64, 64),
            Workload("causal_L128_D64", 2, 2, 128, 64, causal=True),
            Workload("causal_L256_D128_long", 1, 2, 256, 128, causal=True, long=True,
                     note="stands for L=16k: sdpa_math and eager skipped"),
            Workload("window32_L256_D64_long", 1, 2, 256, 64, causal=True, window=32, long=True),
            Workload("evoformer_B4_H2_L64_D32", 4, 2, 64, 32, bias=True, note=EVO_NOTE),
            Workload("bias_batch_causal_L96_D64", 2, 2, 96, 64, causal=True, bias=True, bias_batch=True,
                     note=BIAS_BATCH_NOTE),
            Workload("bias_keymask_L80_D64", 2, 2, 80, 64, bias=True, keymask=True,
                     note=BIAS_NOTE + "; " + KEYMASK_TIMING),
            Workload("keymask_causal_L72_D64", 2, 2, 72, 64, causal=True, keymask=True, note=KEYMASK_NOTE),
        ]
    out = []
    for L in (1024, 4096, 16384):
        for D in (64, 128):
            Hq = 32 if D == 64 else 16  # d_model 2048
            B = max(1, 16384 // L)
            for causal in (False, True):
                out.append(Workload(f"{'causal' if causal else 'dense'}_L{L}_D{D}", B, Hq, L, D,
                                    causal=causal, long=L >= 16384))
    out.append(Workload("window1024_L16384_D128", 1, 16, 16384, 128, causal=True, window=1024, long=True,
                        note="SDPA peers get a materialised [L, L] bool mask, as a user would write"))
    # a shared [1, H, L, L] bias with its gradient at transformer head dims (T5 / ALiBi-style learned
    # position bias): where `auto` should go for biased calls with D > 32
    for L in (1024, 4096):
        for D in (64, 128):
            Hq = 32 if D == 64 else 16
            out.append(Workload(f"bias_L{L}_D{D}", max(1, 16384 // L), Hq, L, D, bias=True, note=BIAS_NOTE))
    # a head dim that is not a power of two (FlexAttention pads it to 128, as ours does)
    out.append(Workload("bias_L1024_D96", 16, 16, 1024, 96, bias=True, note=BIAS_NOTE))
    # the biased rule of `auto` beyond the shared bias it was measured on: a bias per batch row (its
    # gradient has no batch sum), and a shared bias beside a causal mask
    out.append(Workload("bias_batch_L1024_D64", 16, 32, 1024, 64, bias=True, bias_batch=True, note=BIAS_BATCH_NOTE))
    out.append(Workload("bias_causal_L1024_D64", 16, 32, 1024, 64, causal=True, bias=True, note=BIAS_NOTE))
    out.append(Workload("bias_keymask_L1024_D64", 16, 32, 1024, 64, bias=True, keymask=True,
                        note=BIAS_NOTE + "; " + KEYMASK_TIMING))
    # a key padding mask alone, where `auto` takes our kernel at D <= 64 (2026-11-24)
    for L, causal in ((1024, False), (4096, False), (4096, True)):
        out.append(Workload(f"keymask{'_causal' if causal else ''}_L{L}_D64", 16384 // L, 32, L, 64, causal=causal,
                            keymask=True, note=KEYMASK_NOTE))
    # issue 5's Evoformer grid: MSA row attention (B = N_seq = 128 rows, 8 heads) and triangle
    # attention (B = N_res rows, 4 heads), D = 32, one [1, H, L, L] pair bias shared by every row
    for L in (256, 512, 1024):
        out.append(Workload(f"evoformer_msa_B128_H8_L{L}_D32", 128, 8, L, 32, bias=True, note=EVO_NOTE))
    for L in (256, 512):
        out.append(Workload(f"evoformer_tri_B{L}_H4_L{L}_D32", L, 4, L, 32, bias=True, note=EVO_NOTE))
    return out


# --------------------------------------------------------------------------- per-workload state
@dataclass
class State:
    wl: Workload
    device: torch.device
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor | None
    grad_out: torch.Tensor
    scale: float
    sdpa_mask: torch.Tensor | None = None  # bool [1,1,L,L], True = attend (a window; causal beside a key mask)
    eager_excluded: torch.Tensor | None = None  # bool [L,L], True = masked out
    keymask: torch.Tensor | None = None  # bool [B, 1, 1, L], True = attend (keymask workloads)
    block_mask: object = None
    bsel: int = 1
    qsel: torch.Tensor | None = None
    ref_out: torch.Tensor | None = None
    ref_grads: dict = field(default_factory=dict)
    grad_check: torch.Tensor | None = None


def geometry_keep(wl: Workload, rows: torch.Tensor, Lk: int, device) -> torch.Tensor | None:
    """Bool [len(rows), Lk] of allowed keys for query rows (Lq == Lk here), built independently of attnkit."""
    if not wl.causal and wl.window is None:
        return None
    i = rows.view(-1, 1).to(device)
    j = torch.arange(Lk, device=device).view(1, -1)
    keep = j <= i
    if wl.window is not None:
        keep = keep & (j >= i - (wl.window - 1))
    return keep


def make_state(wl: Workload, device: torch.device, need_grad_ref: bool, use_flex: bool) -> State:
    torch.manual_seed(0)
    dt = torch.bfloat16
    shape = (wl.B, wl.Hq, wl.L, wl.D)
    q = torch.randn(shape, device=device, dtype=dt)
    k = torch.randn(shape, device=device, dtype=dt)
    v = torch.randn(shape, device=device, dtype=dt)
    bias = torch.randn(wl.B if wl.bias_batch else 1, wl.Hq, wl.L, wl.L, device=device, dtype=dt) if wl.bias else None
    st = State(wl, device, q, k, v, bias, torch.randn(shape, device=device, dtype=dt), 1.0 / math.sqrt(wl.D))
    full_rows = torch.arange(wl.L, device=device)
    if wl.window is not None or (wl.causal and wl.keymask):  # SDPA takes no attn_mask beside is_causal=True
        st.sdpa_mask = geometry_keep(wl, full_rows, wl.L, device).view(1, 1, wl.L, wl.L)
    if (wl.causal or wl.window is not None) and not wl.long:
        st.eager_excluded = ~geometry_keep(wl, full_rows, wl.L, device)
    if wl.keymask:  # ~10% of the keys out; never a whole row (key 0 stays)
        if wl.window is not None:  # the flex peer's mask_mod below knows causal only
            raise ValueError(f"{wl.name}: a key mask beside a window is not set up for every peer")
        st.keymask = key_mask(wl).to(device).view(wl.B, 1, 1, wl.L)
    if use_flex and create_block_mask is not None and wl.keymask:
        kmask, causal = st.keymask.view(wl.B, wl.L), wl.causal

        def key_mask_mod(b, h, q_idx, kv_idx):
            keep = kmask[b, kv_idx]
            return keep & (kv_idx <= q_idx) if causal else keep
        st.block_mask = create_block_mask(key_mask_mod, wl.B, None, wl.L, wl.L, device=device)
    elif use_flex and create_block_mask is not None and (wl.causal or wl.window is not None):
        W = wl.window

        if W is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return kv_idx <= q_idx
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & (kv_idx > q_idx - W)
        st.block_mask = create_block_mask(mask_mod, None, None, wl.L, wl.L, device=device)

    # Reference on a slice: the first CHECK_BATCHES batch rows, CHECK_ROWS query rows spread over L.
    st.bsel = min(wl.B, CHECK_BATCHES)
    n_rows = min(wl.L, CHECK_ROWS)
    st.qsel = torch.linspace(0, wl.L - 1, n_rows, device=device).round().long().unique()
    nb, qsel = st.bsel, st.qsel
    keep = geometry_keep(wl, qsel, wl.L, device)
    if st.keymask is not None:
        keep = st.keymask[:nb] if keep is None else st.keymask[:nb] & keep
    qs = q[:nb][:, :, qsel].float().requires_grad_(need_grad_ref)
    ks = k[:nb].float().requires_grad_(need_grad_ref)
    vs = v[:nb].float().requires_grad_(need_grad_ref)
    bs = bias[:nb][:, :, qsel].float().requires_grad_(need_grad_ref) if bias is not None else None
    with torch.set_grad_enabled(need_grad_ref):
        ref = attnkit.attention(qs, ks, vs, mask=keep, bias=bs, scale=st.scale, backend="reference")
    st.ref_out = ref.detach()
    if need_grad_ref:
        gsel = torch.randn(ref.shape, device=device, dtype=dt)
        st.grad_check = torch.zeros(shape, device=device, dtype=dt)
        st.grad_check[:nb, :, qsel] = gsel
        ins = [qs, ks, vs] + ([bs] if bs is not None else [])
        grads = torch.autograd.grad(ref, ins, gsel.float())
        st.ref_grads = dict(zip(["dq", "dk", "dv", "dbias"], [g.detach() for g in grads]))
    return st


# --------------------------------------------------------------------------- peers
def configure_dynamo() -> None:
    """Every shape x mask x grad-mode is a recompile of flex_attention (attnkit's compiled flex shares
    the code object): raise the limit well above what this run needs, and make hitting it an error
    rather than a silent fall-back to the unfused eager path."""
    cfg = torch._dynamo.config
    for name, val in (("recompile_limit", 512), ("cache_size_limit", 512),
                      ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), val))
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(cfg, name):
            setattr(cfg, name, True)


def skip_reason(peer: str, wl: Workload, mode: str, device: torch.device) -> str | None:
    if peer in ("sdpa_math", "eager") and wl.long:
        return "O(L^2) memory at L >= 16k: not run"
    if peer == "attnkit_triton" and device.type != "cuda":
        return "CUDA only here"
    if peer == "flex" and device.type == "cpu" and mode == "fwd+bwd":
        return "FlexAttention on the CPU is inference-only"
    if peer.startswith("sdpa_") and sdpa_kernel is None:
        return "torch.nn.attention.sdpa_kernel missing"
    if peer.startswith("sdpa_") and wl.bias and wl.causal:
        return "SDPA takes no attn_mask beside is_causal=True"
    if peer == "ds4sci":
        if not wl.bias or wl.bias_batch or wl.keymask or wl.causal or wl.window is not None or wl.D > 64:
            return "DS4Sci_EvoformerAttention: biased, unmasked workloads with D <= 64 only"
        if device.type != "cuda":
            return "DS4Sci_EvoformerAttention: CUDA only"
        if ds4sci.load() is None:
            return f"DS4Sci_EvoformerAttention: {ds4sci.why()}"
    return None


def make_call(peer: str, st: State, q, k, v, bias):
    """A zero-argument callable computing this peer's forward output on (q, k, v, bias)."""
    wl, scale = st.wl, st.scale
    if peer in ("attnkit", "attnkit_triton"):
        kw = dict(causal=wl.causal, window=wl.window, bias=bias, mask=st.keymask, scale=scale,
                  backend="triton" if peer == "attnkit_triton" else "auto")
        return lambda: attnkit.attention(q, k, v, **kw)
    if peer in SDPA_KERNELS:
        backend = getattr(SDPBackend, SDPA_KERNELS[peer])
        km = st.keymask
        if st.sdpa_mask is not None:  # a window, or causal beside a key mask (no bias: skipped above)
            attn_mask, is_causal = st.sdpa_mask, False
        else:
            attn_mask, is_causal = bias, wl.causal

        def sdpa():
            am = attn_mask
            if km is not None:  # folded into the bias or the bool mask in each call, as a user would write it
                if am is None:
                    am = km
                else:
                    am = am & km if am.dtype == torch.bool else am.masked_fill(~km, float("-inf"))
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=am, is_causal=is_causal, scale=scale)
        return sdpa
    if peer == "flex":
        fn = compiled_flex()
        bm = st.block_mask
        if st.wl.bias_batch:
            def bias_mod(score, b, h, q_idx, kv_idx):
                return score + bias[b, h, q_idx, kv_idx]
        else:
            def bias_mod(score, b, h, q_idx, kv_idx):
                return score + bias[0, h, q_idx, kv_idx]
        score_mod = bias_mod if bias is not None else None
        return lambda: fn(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale)
    if peer == "ds4sci":  # q, k, v, bias in its own layout (prepare_peer)
        return lambda: ds4sci.attention(q, k, v, bias)
    if peer == "eager":
        excluded, km = st.eager_excluded, st.keymask

        def eager():
            s = torch.matmul(q, k.transpose(-2, -1)) * scale
            if bias is not None:
                s = s + bias
            if excluded is not None:
                s = s.masked_fill(excluded, float("-inf"))
            if km is not None:
                s = s.masked_fill(~km, float("-inf"))
            return torch.matmul(torch.softmax(s, dim=-1), v)
        return eager
    raise ValueError(f"unknown peer {peer!r}")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_forward(st: State, out: torch.Tensor) -> dict:
    got = out[: st.bsel][:, :, st.qsel].float()
    ref = st.ref_out
    finite = bool(torch.isfinite(got).all())
    err = float((got - ref).abs().max()) if finite else float("inf")
    rel = rel_l2(got, ref) if finite else float("inf")
    return {"max_abs_err": err, "rel_err": rel, "correct": finite and rel <= FWD_REL_TOL}


def check_grads(st: State, grads: list[torch.Tensor]) -> dict:
    nb, qsel = st.bsel, st.qsel
    got = {"dq": grads[0][:nb][:, :, qsel], "dk": grads[1][:nb], "dv": grads[2][:nb]}
    if st.bias is not None:
        got["dbias"] = grads[3][:nb][:, :, qsel]
    errs = {}
    for name, g in got.items():
        errs[name] = rel_l2(g, st.ref_grads[name]) if bool(torch.isfinite(g).all()) else float("inf")
    worst = max(errs.values())
    return {"grad_rel_err": worst, "grad_errs": errs, "grad_correct": worst <= GRAD_REL_TOL}


@dataclass
class Candidate:
    """A peer that passed its first call: the record so far and the callable to time."""

    peer: str
    timed: object
    base: dict
    extra: dict
    round_ms: list = field(default_factory=list)
    stats: list = field(default_factory=list)


def _sdpa_reasons(caught) -> list[str]:
    """SDPA says why a forced kernel cannot run only in warnings: the informative ones."""
    why = []
    for w in caught:
        m = " ".join(str(w.message).split())
        m = re.sub(r"\s*\(Triggered internally at [^)]*\)\.?", "", m).strip()[:240]
        if not m or m.endswith("not used because:") or "runtime disabled" in m:
            continue  # headers without a reason, and the kernels this peer switched off itself
        if m not in why:
            why.append(m)
    return why


def prepare_peer(peer: str, st: State, mode: str, args, t_start: float):
    """Skip, build, first-call (compile) and check one peer: a final record, or a Candidate to time."""
    wl, device = st.wl, st.device
    base = dict(flops=wl.flops(mode), shape=wl.shape(), workload_note=wl.note)
    why = skip_reason(peer, wl, mode, device)
    if why is None and args.budget_s and time.perf_counter() - t_start > args.budget_s:
        why = f"time budget of {args.budget_s:.0f} s spent before this peer"
    if why is not None:
        return H.make_record(wl.name, mode, peer, status="skipped", error=why, **base)

    extra: dict = {}
    if mode == "fwd":
        q, k, v = st.q.detach(), st.k.detach(), st.v.detach()
        bias = st.bias.detach() if st.bias is not None else None
        inputs = None
    else:
        q, k, v = (t.detach().requires_grad_() for t in (st.q, st.k, st.v))
        bias = st.bias.detach().requires_grad_() if st.bias is not None else None
        inputs = [q, k, v] + ([bias] if bias is not None else [])
    # a peer with its own layout gets its inputs converted here, outside the timed calls, and its
    # outputs and gradients converted back (as views) for the checks only
    native = peer == "ds4sci"
    to_common = ds4sci.to_common if native else (lambda t, kind: t)
    grad_out, grad_check = st.grad_out, st.grad_check
    if native:
        q, k, v = (ds4sci.to_native(t, "qkv").requires_grad_(mode != "fwd") for t in (st.q, st.k, st.v))
        bias = ds4sci.to_native(st.bias, "bias").requires_grad_(mode != "fwd")
        inputs = None if mode == "fwd" else [q, k, v, bias]
        grad_out = ds4sci.to_native(grad_out, "qkv")
        grad_check = None if grad_check is None else ds4sci.to_native(grad_check, "qkv")

    if peer == "attnkit":
        with torch.set_grad_enabled(mode != "fwd"):
            plan, err, _ = H.run_guarded(lambda: attnkit.explain(
                q, k, v, causal=wl.causal, window=wl.window, bias=bias, mask=st.keymask, scale=st.scale))
        extra["backend"] = plan.backend if plan is not None else f"explain failed: {err}"
        if plan is not None:
            extra["plan"] = str(plan)

    call, err, _ = H.run_guarded(lambda: make_call(peer, st, q, k, v, bias))
    if err is not None:
        return H.make_record(wl.name, mode, peer, status="error", error=err, **base, **extra)

    # First call (compiles where it must) + correctness check.
    def first():
        t0 = time.perf_counter()
        with torch.set_grad_enabled(mode != "fwd"):
            out = call()
            res = check_forward(st, to_common(out, "qkv"))
            if inputs is not None:
                grads = torch.autograd.grad(out, inputs, grad_check)
                res.update(check_grads(st, [to_common(g, kind) for g, kind in zip(grads, ("qkv",) * 3 + ("bias",))]))
                del grads
        del out
        H.sync(device)
        res["first_call_s"] = time.perf_counter() - t0
        return res

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chk, err, _ = H.run_guarded(first)
    if err is not None:
        why = _sdpa_reasons(caught)
        if why:
            err += " [warnings: " + " | ".join(why[:4]) + "]"
        return H.make_record(wl.name, mode, peer, status="error", error=err, **base, **extra)
    if "grad_correct" in chk:
        chk["correct"] = chk["correct"] and chk.pop("grad_correct")
    extra.update(chk)

    if mode == "fwd":
        def timed():
            with torch.no_grad():
                return call()
    else:
        gout = grad_out

        def timed():
            return torch.autograd.grad(call(), inputs, gout)
    if device.type == "cuda":  # memory one call needs above the inputs (after the compile, on its own)
        H.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _, err, _ = H.run_guarded(lambda: H.sync(device) if timed() is not None else None)
        if err is None:
            extra["peak_mib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return Candidate(peer, timed, base, extra)


def bench_mode(st: State, mode: str, args, t_start: float, log) -> list[dict]:
    """All peers of one (workload, mode): prepare each, then time them in rounds.

    Round r times the candidates in order, round r+1 in reverse order, and so on; a
    peer's ms is the mean of its per-round medians. The H100 boosts its clock after
    an idle moment and throttles under sustained load, so whoever runs first after
    the set-up would otherwise look a few percent faster; alternating the order
    gives every peer the same average position.
    """
    wl, device = st.wl, st.device
    results: dict[str, dict] = {}
    cands: list[Candidate] = []
    for peer in args.peers:
        res = prepare_peer(peer, st, mode, args, t_start)
        if isinstance(res, Candidate):
            cands.append(res)
        else:
            results[peer] = res
            log(res)
    for r in range(max(1, args.rounds)):
        if r > 0 and args.budget_s and time.perf_counter() - t_start > args.budget_s:
            break  # keep the rounds already measured
        for c in (cands if r % 2 == 0 else cands[::-1]):
            if c.peer in results:  # failed in an earlier round
                continue
            stats, err, _ = H.run_guarded(lambda: H.time_fn_stats(  # noqa: B023
                c.timed, warmup=args.warmup_ms, rep=args.rep_ms, device=device, min_rep=args.min_rep))
            if err is not None:
                results[c.peer] = H.make_record(wl.name, mode, c.peer, status="error",
                                                error="while timing: " + err, **c.base, **c.extra)
                log(results[c.peer])
                continue
            c.round_ms.append(stats["median_ms"])
            c.stats.append(stats)
    paired = _paired_with_best(cands, results, device, args)
    for c in cands:
        if c.peer in results:
            continue
        ms = sum(c.round_ms) / len(c.round_ms)
        extra = dict(c.extra)
        extra.update({
            "round_ms": c.round_ms,
            "min_ms": min(s["min_ms"] for s in c.stats),
            "p20_ms": min(s["p20_ms"] for s in c.stats),
            "p80_ms": max(s["p80_ms"] for s in c.stats),
            "n_rep": sum(s["n_rep"] for s in c.stats),
        })
        if c.peer == "attnkit" and paired:
            extra.update(paired)
        results[c.peer] = H.make_record(wl.name, mode, c.peer, ms=ms, **c.base, **extra)
        log(results[c.peer])
    c = None
    cands.clear()
    return [results[p] for p in args.peers if p in results]


def _paired_with_best(cands, results, device, args) -> dict:
    """attnkit against the fastest other peer, timed call by call in alternation.

    The round medians drift by up to ~15% on a throttling GPU depending on which
    peer ran just before; interleaving the two calls removes that from their ratio.
    """
    ok = [c for c in cands if c.peer not in results and c.round_ms]
    mine = next((c for c in ok if c.peer == "attnkit"), None)
    others = [c for c in ok if not c.peer.startswith("attnkit") and c.extra.get("correct", True) is not False]
    if mine is None or not others or device.type != "cuda":
        return {}
    best = min(others, key=lambda c: sum(c.round_ms) / len(c.round_ms))
    (a, b), err, _ = H.run_guarded(lambda: H.time_interleaved(mine.timed, best.timed, n=args.paired_n, device=device))
    if err is not None:
        return {"paired_error": err}
    return {"paired_peer": best.peer, "paired_ms": a, "paired_peer_ms": b, "paired_ratio": b / a}


# --------------------------------------------------------------------------- console table
def side_by_side(records: list[dict], modes: list[str], note_width: int = 44) -> str:
    """One compact table per workload, the modes side by side."""
    lines: list[str] = []
    names: list[str] = []
    for r in records:
        if r["workload"] not in names:
            names.append(r["workload"])
    cell_w = 33
    for name in names:
        rows = [r for r in records if r["workload"] == name]
        first = rows[0]
        gf = "  ".join(f"{m} {next((r['flops'] for r in rows if r['mode'] == m), 0) / 1e9:.4g}" for m in modes)
        lines.append(f"== {name}: {first.get('shape', '')}; GFLOP {gf}")
        hdr = f"  {'peer':<15}"
        for m in modes:
            hdr += f"| {m + ': ms  TFLOP/s ratio  ceil':<{cell_w}}"
        hdr += "| check       | note"
        lines.append(hdr)
        peers = []
        for r in rows:
            if r["peer"] not in peers:
                peers.append(r["peer"])
        for p in peers:
            line = f"  {p:<15}"
            notes, checks = [], []
            for m in modes:
                r = next((x for x in rows if x["peer"] == p and x["mode"] == m), None)
                if r is None:
                    cell = ""
                elif r["status"] != "ok":
                    cell = r["status"].upper()
                    short = H._short(H.error_summary(r.get("error")), note_width)
                    if short and short not in notes:
                        notes.append(short)
                else:
                    ceil = r["frac_matmul_ceiling"]
                    cell = (f"{r['ms']:>9.4g} {r['tflops']:>7.4g} {H._fmt(r['ratio_to_best'], '>5.2f')} "
                            f"{'    -' if ceil is None else format(100 * ceil, '>5.1f') + '%'}")
                if r is not None and r.get("max_abs_err") is not None and not checks:
                    checks.append(f"{r['max_abs_err']:.1e}")
                if r is not None and r.get("correct") is False:
                    checks.append(f"BAD({m})")
                if r is not None and r.get("backend") and f"-> {r['backend']}" not in notes:
                    notes.append(f"-> {r['backend']}")
                line += f"| {cell:<{cell_w}}"
            line += f"| {' '.join(checks) or '-':<12}| {'; '.join(notes)}"
            lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def select(items: list[Workload], patterns: list[str] | None) -> list[Workload]:
    if not patterns:
        return items
    return [w for w in items if any(p in w.name or fnmatch.fnmatch(w.name, p) for p in patterns)]


def log_record(rec: dict) -> None:
    if rec["status"] == "ok":
        rounds = rec.get("round_ms") or []
        desc = f"{rec['ms']:.4g} ms {rec['tflops']:.4g} TFLOP/s"
        if len(rounds) > 1:
            desc += " (rounds " + "/".join(f"{x:.4g}" for x in rounds) + ")"
        if rec.get("paired_ratio"):
            desc += (f" [interleaved with {rec['paired_peer']}: {rec['paired_ms']:.4g} vs "
                     f"{rec['paired_peer_ms']:.4g} ms, ratio {rec['paired_ratio']:.3f}]")
    else:
        desc = f"{rec['status']}: {H._short(H.error_summary(rec.get('error')), 110)}"
    if rec.get("peak_mib") is not None:
        desc += f" peak +{rec['peak_mib']:.0f} MiB"
    chk = "" if rec.get("max_abs_err") is None else f" err {rec['max_abs_err']:.1e}"
    chk += " BAD" if rec.get("correct") is False else ""
    fc = f" (first call {rec['first_call_s']:.1f}s)" if (rec.get("first_call_s") or 0) > 2 else ""
    print(f"[{time.perf_counter() - T0:6.1f}s] {rec['workload']} {rec['mode']} {rec['peer']}: {desc}{chk}{fc}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="directory for results.json and results.md")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few reps: checks the script end to end")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="workloads whose name contains / matches NAME")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS))
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--warmup-ms", type=float, default=None, help="warm-up budget per timing (ms)")
    ap.add_argument("--rep-ms", type=float, default=None, help="timed budget per timing (ms)")
    ap.add_argument("--min-rep", type=int, default=3)
    ap.add_argument("--paired-n", type=int, default=40,
                    help="calls of attnkit and of the fastest other peer timed alternately (CUDA only)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="timing rounds over the peers, alternating their order; ms = mean of the rounds' medians")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock seconds after which remaining peers are recorded as skipped "
                         "(counted from start-up; default 300 on CUDA, 100 for --smoke, 0 = none)")
    ap.add_argument("--no-ceilings", action="store_true", help="skip measuring the matmul/copy ceilings")
    ap.add_argument("--list", action="store_true", help="print the workloads and their FLOPs, then exit")
    args = ap.parse_args(argv)

    t_start = T0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wls = select(workloads(args.smoke), args.only)
    if args.list:
        for w in wls:
            print(f"{w.name:<30} {w.shape():<60} " + "  ".join(f"{m} {w.flops(m) / 1e9:.4g} GFLOP" for m in args.modes))
        return 0
    if not args.out:
        ap.error("--out DIR is required (unless --list)")
    if not wls:
        ap.error(f"--only {args.only} matches no workload; --list shows them")
    cuda = device.type == "cuda"
    if args.warmup_ms is None:
        args.warmup_ms = 10.0 if cuda else 5.0
    if args.rep_ms is None:
        args.rep_ms = (20.0 if args.smoke else 50.0) if cuda else 20.0
    if args.budget_s is None:
        args.budget_s = 100.0 if args.smoke else (300.0 if cuda else 0.0)
    os.makedirs(args.out, exist_ok=True)
    json_path, md_path = os.path.join(args.out, "results.json"), os.path.join(args.out, "results.md")
    configure_dynamo()
    if cuda:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)

    print(f"attnkit bench on {device} ({'smoke' if args.smoke else 'full'}), {len(wls)} workloads, "
          f"modes {args.modes}, peers {args.peers}", flush=True)
    ceilings = None
    if not args.no_ceilings:
        if cuda and not args.smoke:
            ceilings = H.measure_ceilings(device)
        else:
            ceilings = H.measure_ceilings(device, matmul_n=512 if not cuda else 2048,
                                          copy_bytes=(64 << 20) if not cuda else (256 << 20), rep=50.0)
        print(f"ceilings: bf16 matmul {ceilings['matmul_tflops']:.4g} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s "
              f"({time.perf_counter() - t_start:.1f} s)", flush=True)
    meta = H.collect_meta(
        device,
        title="attnkit attention benchmark" + (" (smoke)" if args.smoke else ""),
        smoke=args.smoke,
        command="python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        timing=(f"median of individually timed calls ({'CUDA events' if cuda else 'time.perf_counter'}), "
                f"budgets warmup {args.warmup_ms:g} ms / rep {args.rep_ms:g} ms, at least {args.min_rep} reps, "
                f"{args.rounds} rounds over the peers in alternating order, ms = mean of the rounds' medians, "
                "no L2 flush; fwd = inference (no_grad); fwd+bwd = forward + torch.autograd.grad(out, "
                "[q, k, v(, bias)], fixed random grad); first call (compilation) not timed"),
        notes=("correctness: forward (and gradients) vs attnkit's float32 reference on "
               f"{CHECK_BATCHES} batch rows x {CHECK_ROWS} query rows; BAD = relative L2 error > "
               f"{FWD_REL_TOL:g} (fwd) / {GRAD_REL_TOL:g} (grads)"),
    )

    records: list[dict] = []
    use_flex = "flex" in args.peers
    for wl in wls:
        t_wl = time.perf_counter()
        st, err, _ = H.run_guarded(lambda: make_state(wl, device, "fwd+bwd" in args.modes, use_flex))
        if err is not None:
            for mode in args.modes:
                for peer in args.peers:
                    records.append(H.make_record(wl.name, mode, peer, status="error",
                                                 error="workload setup failed: " + err,
                                                 flops=wl.flops(mode), shape=wl.shape()))
            print(f"[{time.perf_counter() - t_start:6.1f}s] {wl.name}: setup failed: {err}", flush=True)
            continue
        for mode in args.modes:
            records.extend(bench_mode(st, mode, args, t_start, log_record))
        del st
        H.free_memory()
        meta["wall_s"] = round(time.perf_counter() - t_start, 1)
        H.write_results(records, ceilings, meta, json_path, md_path)
        print(f"[{time.perf_counter() - t_start:6.1f}s] {wl.name} done in {time.perf_counter() - t_wl:.1f} s",
              flush=True)

    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    H.write_results(records, ceilings, meta, json_path, md_path)
    counts = H.records_by_status(records)
    print()
    print(f"device {meta.get('device_name')}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
          f"{meta['date_utc']}")
    if ceilings:
        print(f"ceilings: bf16 matmul {ceilings['matmul_tflops']:.4g} TFLOP/s, copy {ceilings['copy_gbps']:.0f} GB/s")
    print("FLOPs: 4*B*Hq*D*(attended pairs, exact), fwd+bwd = 3.5 x fwd. ratio = TFLOP/s / best peer's "
          "(attnkit: best non-attnkit peer). ceil = fraction of the matmul ceiling. check = max|err| of fwd vs fp32 ref.")
    print(side_by_side(records, args.modes))
    print(f"\n{len(records)} rows {counts}; wall {meta['wall_s']} s; wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
