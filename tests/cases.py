"""The attention calls the backend tests run: features x edge shapes.

Each Case's tensors are rebuilt per dtype/device from seeds (see conftest.case_tensors).
"""

from __future__ import annotations

import os

import torch

from attnkit import GroupMask

from conftest import Case, default_build

# Triton kernels run on the CPU only in its interpreter (CI sets this).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# --- extra tensors ---------------------------------------------------------


def _bias(shape_fn):
    return lambda B, H, Lq, Lk, g: {"bias": torch.randn(*shape_fn(B, H, Lq, Lk), generator=g)}


def _mask(shape_fn, p=0.3, dead_rows=False):
    def extras(B, H, Lq, Lk, g):
        shape = shape_fn(B, H, Lq, Lk)
        m = torch.rand(*shape, generator=g) > p
        if len(shape) >= 2 and shape[-2] > 1:
            m[..., 0, :] |= True  # keep some structure: row 0 sees everything
        if dead_rows:
            m[..., 3, :] = False  # a fully masked row in every (b, h)
            if len(shape) == 4 and shape[0] > 1 and shape[1] > 1:
                m[1, 1, 5, :] = False  # and one in a single (b, h)
        return {"mask": m}

    return extras


def _keypad(B, H, Lq, Lk, g):
    lens = torch.randint(1, Lk + 1, (B,), generator=g)
    lens[0] = Lk  # one unpadded sequence
    return {"mask": (torch.arange(Lk).view(1, Lk) < lens.view(B, 1)).view(B, 1, 1, Lk)}


def _sinks(B, H, Lq, Lk, g):
    return {"sinks": torch.randn(H, generator=g) + 1.0}


def _merge(*fns):
    def extras(B, H, Lq, Lk, g):
        out = {}
        for f in fns:
            out.update(f(B, H, Lq, Lk, g))
        return out

    return extras


# --- mods ------------------------------------------------------------------


def alibi_score_mod(s, b, h, i, j):
    """ALiBi-like relative-position penalty, slope depends on the head."""
    slope = torch.exp2(-(h + 1).to(s.dtype) * 0.5)
    return s - slope * (i - j).abs().to(s.dtype)


REL_RADIUS = 6


def _rel_table(B, H, Lq, Lk, g):
    return {"rel": torch.randn(H, 2 * REL_RADIUS + 1, generator=g) * 0.5}


def rel_table_build(t):
    """T5-style learnable relative-position bias, closed over by the score_mod."""
    rel = t["rel"]

    def score_mod(s, b, h, i, j):
        idx = (i - j).clamp(-REL_RADIUS, REL_RADIUS) + REL_RADIUS
        return s + rel[h, idx]

    kw = default_build(t)
    kw["score_mod"] = score_mod
    return kw


def checker_mask_mod(b, h, i, j):
    """Depends on every index grid (b, h, q, kv): catches a backend that mixes them up."""
    return ((i + 2 * j + b + h) % 4) != 0


def dead_rows_mask_mod(b, h, i, j):
    """Rows i % 7 == 3 see nothing; the others see keys j != i % 3 (broadcast over b, h)."""
    return (i % 7 != 3) & (j != i % 3)


def _with(score_mod=None, mask_mod=None):
    def build(t):
        kw = default_build(t)
        if score_mod is not None:
            kw["score_mod"] = score_mod
        if mask_mod is not None:
            kw["mask_mod"] = mask_mod
        return kw

    return build


# --- the matrix ------------------------------------------------------------

B_ = lambda B, H, Lq, Lk: (B, H, Lq, Lk)  # noqa: E731

CASES: list[Case] = [
    # dense, shapes, GQA
    Case("dense"),
    Case("dense_mha", Hq=3, Hkv=3),
    Case("gqa_2", Hq=4, Hkv=2),
    Case("gqa_4", Hq=8, Hkv=2, Lq=20, Lk=20),
    Case("mqa", Hq=4, Hkv=1),
    Case("dv_ne_d", D=24, Dv=40),
    Case("dv_lt_d", D=40, Dv=8, Lq=17, Lk=29),
    Case("lq_lt_lk", Lq=13, Lk=41),
    Case("lq_gt_lk", Lq=41, Lk=13),
    Case("lq_1", Lq=1, Lk=37),
    Case("lk_1", Lq=19, Lk=1),
    Case("lq_1_lk_1", Lq=1, Lk=1),
    Case("d8", D=8),
    Case("d40", D=40, Lq=18, Lk=35),
    Case("d72", D=72, Lq=21, Lk=21),
    Case("scale_explicit", kw=dict(scale=0.9)),
    # causal / window
    Case("causal", kw=dict(causal=True)),
    Case("causal_lq_lt_lk", Lq=13, Lk=41, kw=dict(causal=True)),
    Case("causal_lq_gt_lk", Lq=41, Lk=13, kw=dict(causal=True)),
    Case("causal_lq_1", Lq=1, Lk=30, kw=dict(causal=True)),
    Case("window_int", kw=dict(window=5)),
    Case("window_1", Lq=10, Lk=20, kw=dict(window=1)),
    Case("window_tuple", Lq=25, Lk=40, kw=dict(window=(3, 2))),
    Case("window_left_unbounded", kw=dict(window=(-1, 2))),
    Case("window_right_none", Lq=30, Lk=22, kw=dict(window=(4, None))),
    Case("causal_window_int", Lq=29, Lk=40, kw=dict(causal=True, window=6)),
    Case("causal_window_tuple", kw=dict(causal=True, window=(3, 5))),
    # softcap
    Case("softcap", kw=dict(softcap=2.0, scale=1.0)),
    # bias
    Case("bias_full", extras=_bias(B_), build=default_build),
    Case("bias_h_lq_lk", Lq=21, Lk=34, extras=_bias(lambda B, H, Lq, Lk: (H, Lq, Lk)), build=default_build),
    Case("bias_keypad_like", extras=_bias(lambda B, H, Lq, Lk: (B, 1, 1, Lk)), build=default_build),
    Case("bias_2d", Lq=17, Lk=26, extras=_bias(lambda B, H, Lq, Lk: (Lq, Lk)), build=default_build),
    # a per-row constant bias cancels in the softmax: its gradient is exactly zero
    Case("bias_row_constant", Lq=15, Lk=22, extras=_bias(lambda B, H, Lq, Lk: (B, H, Lq, 1)), build=default_build),
    Case("bias_causal_gqa", Hq=4, Hkv=1, Lq=20, Lk=31, kw=dict(causal=True),
         extras=_bias(B_), build=default_build),
    # bool masks
    Case("mask_keypad", extras=_keypad, build=default_build),
    Case("mask_full", extras=_mask(B_), build=default_build),
    Case("mask_2d", Lq=23, Lk=31, extras=_mask(lambda B, H, Lq, Lk: (Lq, Lk)), build=default_build),
    Case("mask_1d", extras=_mask(lambda B, H, Lq, Lk: (Lk,)), build=default_build),
    Case("mask_dead_rows", extras=_mask(B_, p=0.5, dead_rows=True), build=default_build),
    Case("mask_rows_only", Lq=19, Lk=23, extras=_mask(lambda B, H, Lq, Lk: (B, 1, Lq, 1), p=0.4),
         build=default_build),  # [B, 1, Lq, 1]: whole query rows switched off
    Case("mask_dead_rows_bias", extras=_merge(_mask(B_, dead_rows=True), _bias(lambda B, H, Lq, Lk: (H, Lq, Lk))),
         build=default_build),
    # mods
    Case("score_mod_alibi", build=_with(score_mod=alibi_score_mod)),
    Case("score_mod_learnable", Lq=19, Lk=27, extras=_rel_table, build=rel_table_build),
    Case("mask_mod_checker", build=_with(mask_mod=checker_mask_mod)),
    Case("mask_mod_dead_rows", Lq=22, Lk=30, build=_with(mask_mod=dead_rows_mask_mod)),
    # sinks / lse
    Case("sinks", extras=_sinks, build=default_build),
    Case("sinks_causal_lq_gt_lk", Lq=30, Lk=12, kw=dict(causal=True), extras=_sinks, build=default_build),
    Case("lse", kw=dict(return_lse=True)),
    Case("lse_causal_lq_gt_lk", Lq=30, Lk=17, kw=dict(causal=True, return_lse=True)),
    Case("lse_mask_dead_rows", kw=dict(return_lse=True), extras=_mask(B_, dead_rows=True), build=default_build),
    Case("lse_sinks_window", kw=dict(return_lse=True, window=(2, 3)), extras=_sinks, build=default_build),
    # combinations
    Case("combo_llm", Hq=8, Hkv=2, Lq=18, Lk=40, kw=dict(causal=True, window=9, softcap=3.0, return_lse=True),
         extras=_merge(_sinks, _keypad), build=default_build),
    Case("combo_pair_bias", Lq=26, Lk=26, D=40,
         extras=_merge(_bias(lambda B, H, Lq, Lk: (B, 1, Lq, Lk)), _keypad), build=default_build),
    Case("combo_mods", Hq=4, Hkv=1, Lq=21, Lk=35, D=24, Dv=16, kw=dict(causal=True, softcap=4.0),
         extras=_merge(_rel_table, _bias(lambda B, H, Lq, Lk: (H, 1, Lk))),
         build=lambda t: {**rel_table_build(t), "mask_mod": checker_mask_mod}),
]

CASE_IDS = [c.name for c in CASES]
BY_NAME = {c.name: c for c in CASES}


def expected_features(case: Case, with_grad: bool) -> set[str]:
    """The feature names the contract's capability table should see for the case (by hand)."""
    f: set[str] = set()
    kw = case.kw
    extras = case.extras(case.B, case.Hq, case.Lq, case.Lk, torch.Generator().manual_seed(0)) if case.extras else {}
    built = case.build({"q": None, **extras}) if case.build is not None else {}
    if "mask" in built:
        f.add("mask")
    if "bias" in built:
        f.add("bias")
        if with_grad:
            f.add("bias_grad")
    if kw.get("causal"):
        f.add("causal")
    if kw.get("window") is not None:
        f.add("window")
    if kw.get("softcap") is not None:
        f.add("softcap")
    if "score_mod" in built:
        f.add("score_mod")
    if "mask_mod" in built:
        f.add("group_mask" if isinstance(built["mask_mod"], GroupMask) else "mask_mod")
    if "sinks" in built:
        f.add("sinks")
    if kw.get("return_lse"):
        f.add("return_lse")
    if case.Hq != case.Hkv:
        f.add("gqa")
    if case.Dv is not None and case.Dv != case.D:
        f.add("value_head_dim")
    if with_grad:
        f.add("backward")
    return f


# What each backend is specified NOT to do (DESIGN.md + the backends' docs), per device.
SPEC_LACKS = {
    "reference": {"cpu": set(), "cuda": set()},
    "chunked": {"cpu": set(), "cuda": set()},
    "sdpa": {"cpu": {"softcap", "score_mod", "sinks"},
             "cuda": {"softcap", "score_mod", "sinks"}},
    "flex": {"cpu": {"backward", "bias_grad", "return_lse", "sinks", "dropout"},
             "cuda": {"dropout"}},
    "triton": {d: {"score_mod", "mask_mod", "dropout"}
               for d in ("cpu", "cuda")},
}
# Features a backend serves, but not together with others: (feature, {the others}) per device.
# sdpa returns the lse through SDPA's lse-returning kernels (README): no dropout, bias gradient or
# Dv != D with them, and on CUDA no mask tensor of any kind.
_SDPA_LSE_CPU = {"dropout", "bias_grad", "value_head_dim"}
SPEC_LACKS_TOGETHER = {
    "sdpa": {"cpu": [("return_lse", _SDPA_LSE_CPU)],
             "cuda": [("return_lse", _SDPA_LSE_CPU | {"mask", "bias", "window", "mask_mod", "group_mask",
                                                      "kv_lengths", "paged"})]},
}
# Head dims a backend is specified to take (None = any). flex: multiples of 8 in 16..128, and 256 (README).
SPEC_HEAD_DIMS = {"flex": set(range(16, 129, 8)) | {256}}


def expected_missing(backend: str, case: Case, device: str, with_grad: bool) -> list[str]:
    """Words the refusal message must contain; empty when the backend should serve the case."""
    feats = expected_features(case, with_grad)
    lacks = set(feats & SPEC_LACKS[backend][device])
    for f, others in SPEC_LACKS_TOGETHER.get(backend, {}).get(device, []):
        if f in feats and feats & others:
            lacks |= {f} | (feats & others)
    if backend == "triton" and device == "cpu" and not TRITON_INTERPRET:
        return ["TRITON_INTERPRET=1"]  # refused before any feature is looked at
    words = [f"'{f}'" for f in sorted(lacks)]
    dims = SPEC_HEAD_DIMS.get(backend)
    if dims is not None:
        if case.D not in dims:
            words.append(f"head dim {case.D}")
        if case.Dv is not None and case.Dv not in dims:
            words.append(f"value head dim {case.Dv}")
    return words
