"""AttentionConfig, MultiHeadAttention, RotaryEmbedding and KV-cache decoding, each checked
against a reference written here in plain PyTorch (float64), with the module's weights.

Note on tolerances: RotaryEmbedding rotates float64 inputs in float64 (half inputs in float32),
so every float64 case, RoPE included, is held to 1e-10; float32 runs to a float32-level bound.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import attnkit
from attnkit import AttentionConfig, KVCache, MultiHeadAttention, RopeScaling, RotaryEmbedding
from conftest import assert_close_tol as assert_close, rel_norm as rel_err

TIGHT64 = 1e-10
F32_FWD, F32_GRAD = 2e-5, 5e-5


# ---------------------------------------------------------------------------
# helpers (kept local on purpose)
# ---------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype=torch.float64, gen=None, std=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)


def leaf(t, dtype=torch.float64):
    return t.detach().clone().to(dtype).requires_grad_(True)


def safe_softmax(s, dim=-1):
    m = s.amax(dim=dim, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(dim=dim, keepdim=True)
    return e / torch.where(den == 0, torch.ones_like(den), den)


def make_mha(seed=0, dtype=torch.float64, **cfg) -> MultiHeadAttention:
    """A module with every parameter random (sinks at unit scale so that they matter)."""
    torch.manual_seed(seed)
    mod = MultiHeadAttention(AttentionConfig(**cfg)).to(dtype)
    g = _gen(seed + 100)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            p.copy_(randn(*p.shape, gen=g, std=1.0 if name == "sinks" else 0.3))
    return mod


# --- reference RoPE (rotate-half: dim i pairs with dim i + D/2) --------------


def ref_inv_freq(D: int, base: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    i = torch.arange(D // 2, dtype=torch.float64)
    f = scaling.factor
    if scaling.kind == "ntk":
        base = base * f ** (D / (D - 2))
    inv = base ** (-2.0 * i / D)
    mscale = 1.0
    if scaling.kind == "linear":
        inv = inv / f  # position interpolation: positions / factor
    elif scaling.kind == "yarn":
        # HF transformers' _compute_yarn_parameters (truncate=True), which checkpoints follow:
        # correction dims floor / ceil, a ramp linear in the pair index between them.
        def correction_dim(turns):
            return D * math.log(scaling.original_max_positions / (turns * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
        high = min(math.ceil(correction_dim(scaling.beta_slow)), D - 1)
        extrapolation = 1.0 - ((i - low) / (high - low if high != low else 0.001)).clamp(0.0, 1.0)
        inv = (inv / f) * (1.0 - extrapolation) + inv * extrapolation
        mscale = 1.0 + 0.1 * math.log(f)
    return inv, mscale


def ref_rotate(x, pos, inv, mscale):
    """x [B, H, L, D]; pos [L] or [B, L] (float64)."""
    ang = pos.to(torch.float64).unsqueeze(-1) * inv  # [L, D/2] or [B, L, D/2]
    cos, sin = torch.cos(ang) * mscale, torch.sin(ang) * mscale
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _positions(positions, L):
    if positions is None:
        return torch.arange(L)
    if isinstance(positions, int):
        return torch.arange(L) + positions
    return positions


# --- reference multi-head attention -------------------------------------------


def ref_params(mod: MultiHeadAttention) -> dict[str, torch.Tensor]:
    return {n: leaf(p) for n, p in mod.named_parameters()}


def _lin(P, name, x):
    y = x @ P[f"{name}.weight"].T
    b = P.get(f"{name}.bias")
    return y if b is None else y + b


def ref_mha(P, cfg: AttentionConfig, x, *, attn_bias=None, mask=None, causal=False, positions=None,
            score_mod=None):
    """Self-attention written out: projections, RoPE, sinks (no RoPE, always visible), repeated
    KV heads, explicit masked softmax, output projection. Everything in x's dtype."""
    B, L, dm = x.shape
    H = cfg.n_heads
    D = dm // H
    Hkv = cfg.gqa_groups if cfg.use_gqa else H
    q = _lin(P, "q_proj", x).view(B, L, H, D).transpose(1, 2)
    k = _lin(P, "k_proj", x).view(B, L, Hkv, D).transpose(1, 2)
    v = _lin(P, "v_proj", x).view(B, L, Hkv, D).transpose(1, 2)
    if cfg.use_rope:
        inv, ms = ref_inv_freq(D, cfg.rope_base, RopeScaling.parse(cfg.rope_scaling))
        pos = _positions(positions, L)
        q, k = ref_rotate(q, pos, inv, ms), ref_rotate(k, pos, inv, ms)
    S = 0
    if cfg.use_attention_sinks:
        sinks = P["sinks"]
        S = sinks.shape[0]
        sk = _lin(P, "k_proj", sinks).view(1, S, Hkv, D).transpose(1, 2).expand(B, -1, -1, -1)
        sv = _lin(P, "v_proj", sinks).view(1, S, Hkv, D).transpose(1, 2).expand(B, -1, -1, -1)
        k, v = torch.cat([sk, k], dim=2), torch.cat([sv, v], dim=2)
    rep = H // Hkv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)  # [B, H, L, S + L]
    if attn_bias is not None:
        s = s + torch.cat([torch.zeros(*attn_bias.shape[:-1], S, dtype=s.dtype), attn_bias.to(s.dtype)], -1)
    i = torch.arange(L).view(L, 1)
    j = torch.arange(S + L).view(1, S + L)
    tok = j - S  # token index of each key; negative for sinks
    is_sink = tok < 0
    if score_mod is not None:  # on token positions; the sink slots keep their scores
        modded = score_mod(s, torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1),
                           i.view(1, 1, L, 1), tok.clamp(min=0).view(1, 1, 1, S + L))
        s = torch.where(is_sink.view(1, 1, 1, S + L), s, modded)
    allowed = torch.ones(L, S + L, dtype=torch.bool)
    if causal or cfg.window is not None:
        allowed &= (tok <= i) | is_sink
    if cfg.window is not None:
        allowed &= (tok > i - cfg.window) | is_sink
    allowed = allowed.view(1, 1, L, S + L)
    if mask is not None:
        allowed = allowed & torch.cat([torch.ones(*mask.shape[:-1], S, dtype=torch.bool), mask], -1)
    p = safe_softmax(s.masked_fill(~allowed, float("-inf")))
    out = (p @ v).transpose(1, 2).reshape(B, L, dm)
    return _lin(P, "o_proj", out)


def run_and_grads(fn, x, params: dict, g_out):
    """out, {x and params: grad} for loss <out, g_out>."""
    out = fn(x)
    names = ["x", *params]
    tensors = [x, *params.values()]
    gs = torch.autograd.grad((out * g_out.to(out.dtype)).sum(), tensors, allow_unused=True)
    return out, dict(zip(names, gs))


def check_module_vs_reference(mod, x, fwd_kw=None, ref_kw=None, *, fwd_tol=TIGHT64, grad_tol=TIGHT64,
                              seed=0):
    fwd_kw = fwd_kw or {}
    ref_kw = dict(fwd_kw, **(ref_kw or {}))
    g_out = randn(*x.shape, gen=_gen(seed + 7))
    xm = leaf(x, x.dtype)
    mp = dict(mod.named_parameters())
    out, got = run_and_grads(lambda t: mod(t, **fwd_kw), xm, mp, g_out)
    P = ref_params(mod)
    xr = leaf(x)
    ref, want = run_and_grads(lambda t: ref_mha(P, mod.config, t, **ref_kw), xr, P, g_out)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, ref, fwd_tol)
    assert set(got) == set(want)
    for n in want:
        assert got[n] is not None, f"no gradient reached {n}"
        assert_close(got[n], want[n], grad_tol, name=f"grad {n}")
    return out, ref


# ---------------------------------------------------------------------------
# AttentionConfig validation
# ---------------------------------------------------------------------------

BAD_CONFIGS = [
    ("not_divisible", dict(d_model=30, n_heads=4), ValueError, "d_model"),
    ("zero_heads", dict(d_model=32, n_heads=0), ValueError, "n_heads"),
    ("bool_d_model", dict(d_model=True, n_heads=1), ValueError, "d_model"),
    ("odd_rope_head_dim", dict(d_model=12, n_heads=4, use_rope=True), ValueError, "use_rope"),
    ("rope_base", dict(d_model=32, n_heads=4, use_rope=True, rope_base=1.0), ValueError, "rope_base"),
    ("no_sinks", dict(d_model=32, n_heads=4, use_attention_sinks=True, num_attention_sinks=0),
     ValueError, "num_attention_sinks"),
    ("gqa_not_dividing", dict(d_model=32, n_heads=4, use_gqa=True, gqa_groups=3), ValueError, "gqa_groups"),
    ("gqa_zero", dict(d_model=32, n_heads=4, use_gqa=True, gqa_groups=0), ValueError, "gqa_groups"),
    ("dropout_one", dict(d_model=32, n_heads=4, dropout=1.0), ValueError, "dropout"),
    ("dropout_negative", dict(d_model=32, n_heads=4, dropout=-0.1), ValueError, "dropout"),
    ("window_zero", dict(d_model=32, n_heads=4, window=0), ValueError, "window"),
    ("window_bool", dict(d_model=32, n_heads=4, window=True), ValueError, "window"),
    ("rope_scaling_kind", dict(d_model=32, n_heads=4, use_rope=True, rope_scaling={"kind": "bogus", "factor": 2.0}),
     ValueError, r"rope[ _]scaling"),
    ("rope_scaling_factor", dict(d_model=32, n_heads=4, use_rope=True, rope_scaling=0.5), ValueError,
     r"rope[ _]scaling"),
    ("rope_scaling_type", dict(d_model=32, n_heads=4, use_rope=True, rope_scaling="yarn"), TypeError,
     "rope_scaling"),
    ("attention_fn", dict(d_model=32, n_heads=4, attention_fn=42), TypeError, "attention_fn"),
    ("score_mod", dict(d_model=32, n_heads=4, score_mod="tanh"), TypeError, "score_mod"),
    ("backend_type", dict(d_model=32, n_heads=4, backend=None), TypeError, "backend"),
    ("rope_base_type", dict(d_model=32, n_heads=4, use_rope=True, rope_base=None), TypeError, "rope_base"),
    ("rope_scaling_factor_type", dict(d_model=32, n_heads=4, use_rope=True,
                                      rope_scaling={"kind": "linear", "factor": "2"}), TypeError, "factor"),
]


@pytest.mark.parametrize("kw,exc,field", [b[1:] for b in BAD_CONFIGS], ids=[b[0] for b in BAD_CONFIGS])
def test_config_rejects_bad_field(kw, exc, field):
    with pytest.raises(exc, match=field):
        AttentionConfig(**kw)


def test_config_accepts_and_normalises():
    c = AttentionConfig(d_model=32, n_heads=4, use_rope=True, rope_scaling=2.0)
    assert c.rope_scaling == RopeScaling("linear", 2.0)
    assert AttentionConfig(d_model=32, n_heads=4, use_rope=True).rope_scaling.kind == "none"
    c = AttentionConfig(d_model=32, n_heads=4, rope_scaling={"kind": "yarn", "factor": 8.0})
    assert c.rope_scaling.kind == "yarn" and c.rope_scaling.factor == 8.0
    # gqa_groups only has to divide n_heads when GQA is on
    c = AttentionConfig(d_model=32, n_heads=4, gqa_groups=3)
    assert c.num_kv_heads == 4 and c.head_dim == 8
    assert AttentionConfig(d_model=32, n_heads=4, use_gqa=True, gqa_groups=2).num_kv_heads == 2
    with pytest.raises(TypeError, match="AttentionConfig"):
        MultiHeadAttention({"d_model": 32, "n_heads": 4})


# ---------------------------------------------------------------------------
# attributes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("gqa,sinks,bias", [(None, 0, False), (2, 3, True), (1, 1, False)])
def test_attributes(gqa, sinks, bias):
    cfg = AttentionConfig(d_model=48, n_heads=6, use_gqa=gqa is not None, gqa_groups=gqa or 1,
                          use_attention_sinks=sinks > 0, num_attention_sinks=sinks, qkv_bias=bias)
    mod = MultiHeadAttention(cfg)
    kv = gqa if gqa is not None else 6
    assert mod.config is cfg
    assert (mod.num_heads, mod.head_dim, mod.num_kv_heads) == (6, 8, kv)
    assert mod.scale == pytest.approx(1 / math.sqrt(8))
    assert mod.q_proj.weight.shape == (48, 48)
    assert mod.k_proj.weight.shape == (kv * 8, 48)
    assert mod.v_proj.weight.shape == (kv * 8, 48)
    assert mod.o_proj.weight.shape == (48, 48)
    for p in (mod.q_proj, mod.k_proj, mod.v_proj):
        assert (p.bias is not None) == bias
    assert mod.o_proj.bias is not None
    if sinks:
        assert isinstance(mod.sinks, nn.Parameter) and mod.sinks.shape == (sinks, 48)
        assert "sinks" in dict(mod.named_parameters())
    else:
        assert mod.sinks is None
    cache = mod.new_kv_cache(3, 20)
    assert cache.k.shape == (3, kv, 20, 8) and cache.v.shape == (3, kv, 20, 8)
    assert cache.lengths.dtype == torch.int32 and cache.host_lengths == [0, 0, 0]


def test_forward_rejects_bad_input():
    mod = MultiHeadAttention(AttentionConfig(d_model=32, n_heads=4))
    with pytest.raises(ValueError, match="d_model"):
        mod(randn(2, 5, 16, dtype=torch.float32))
    with pytest.raises(ValueError, match="d_model"):
        mod(randn(5, 32, dtype=torch.float32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        mod([[0.0] * 32] * 5)


# ---------------------------------------------------------------------------
# forward + backward vs the reference (float64)
# ---------------------------------------------------------------------------

_YARN = RopeScaling("yarn", 4.0, original_max_positions=64)

# (id, config, forward kwargs builder)
MHA_CASES = [
    ("plain", {}, {}),
    ("causal", {}, {"causal": True}),
    ("gqa2_causal", dict(use_gqa=True, gqa_groups=2), {"causal": True}),
    ("mqa", dict(use_gqa=True, gqa_groups=1), {}),
    ("qkv_bias_gqa", dict(qkv_bias=True, use_gqa=True, gqa_groups=2), {"causal": True}),
    ("rope", dict(use_rope=True), {"causal": True}),
    ("rope_linear", dict(use_rope=True, rope_scaling=2.0), {"causal": True}),
    ("rope_ntk", dict(use_rope=True, rope_scaling={"kind": "ntk", "factor": 4.0}), {"causal": True}),
    ("rope_yarn", dict(use_rope=True, rope_scaling=_YARN), {"causal": True}),
    ("rope_yarn_offset", dict(use_rope=True, rope_scaling=_YARN, rope_base=500.0), {"positions": 37}),
    ("rope_positions_tensor", dict(use_rope=True, use_gqa=True, gqa_groups=2), {"positions": "tensor"}),
    ("sinks", dict(use_attention_sinks=True, num_attention_sinks=3), {"causal": True}),
    ("sinks_noncausal", dict(use_attention_sinks=True, num_attention_sinks=1), {}),
    ("window", dict(window=3), {}),
    ("window_causal", dict(window=4), {"causal": True}),
    ("sinks_window_gqa", dict(use_attention_sinks=True, num_attention_sinks=2, window=3, use_gqa=True,
                              gqa_groups=2), {"causal": True}),
    ("attn_bias", {}, {"attn_bias": True}),
    ("attn_bias_causal_gqa", dict(use_gqa=True, gqa_groups=2), {"attn_bias": True, "causal": True}),
    ("attn_bias_sinks", dict(use_attention_sinks=True, num_attention_sinks=2), {"attn_bias": True}),
    ("mask", dict(use_gqa=True, gqa_groups=1), {"mask": True}),
    ("mask_sinks_window", dict(use_attention_sinks=True, num_attention_sinks=2, window=5), {"mask": True}),
    ("everything", dict(use_rope=True, rope_scaling={"kind": "ntk", "factor": 2.0}, qkv_bias=True,
                        use_attention_sinks=True, num_attention_sinks=2, use_gqa=True, gqa_groups=2, window=4),
     {"causal": True, "attn_bias": True}),
]


def _attn_bias(B, L, gen):
    """[B, 1, L, L], 0 / -inf style with random finite values too; row 2 of batch 1 fully -inf."""
    bias = randn(B, 1, L, L, gen=gen)
    drop = torch.rand(B, 1, L, L, generator=gen) < 0.3
    drop[..., 0] = False  # keep key 0 so most rows see something even when causal
    bias = bias.masked_fill(drop, float("-inf"))
    bias[1, 0, 2, :] = float("-inf")
    return bias


def _fwd_kwargs(spec: dict, B, L, gen):
    kw = dict(spec)
    if kw.get("attn_bias"):
        kw["attn_bias"] = _attn_bias(B, L, gen)
    if kw.get("mask"):
        m = torch.ones(B, 1, 1, L, dtype=torch.bool)
        m[0, ..., 7:] = False
        m[1, ..., ::3] = False
        kw["mask"] = m
    if isinstance(kw.get("positions"), str):
        kw["positions"] = torch.stack([torch.arange(L) * 2 + 5, torch.arange(L) + 100])  # [B, L]
    return kw


@pytest.mark.parametrize("cfg,spec", [c[1:] for c in MHA_CASES], ids=[c[0] for c in MHA_CASES])
def test_mha_matches_reference_float64(cfg, spec):
    B, L = 2, 10
    mod = make_mha(seed=len(str(cfg)) + 3 * len(spec), d_model=32, n_heads=4, **cfg)
    g = _gen(5)
    x = randn(B, L, 32, gen=g)
    kw = _fwd_kwargs(spec, B, L, g)
    out, ref = check_module_vs_reference(mod, x, kw)
    if kw.get("attn_bias") is not None and not cfg.get("use_attention_sinks"):
        # the fully -inf row attends to nothing: attention output 0, so out = o_proj.bias
        assert_close(out[1, 2], mod.o_proj.bias.detach(), 1e-12, name="dead row")


@pytest.mark.parametrize("cfg,spec", [
    (dict(use_gqa=True, gqa_groups=2, use_attention_sinks=True, num_attention_sinks=2, window=3), {"causal": True}),
    (dict(use_rope=True, rope_scaling=_YARN, qkv_bias=True), {"attn_bias": True}),
], ids=["gqa_sinks_window", "rope_yarn_bias"])
def test_mha_matches_reference_float32(cfg, spec):
    B, L = 2, 9
    mod = make_mha(seed=9, dtype=torch.float32, d_model=32, n_heads=4, **cfg)
    g = _gen(6)
    x = randn(B, L, 32, gen=g, dtype=torch.float32)
    check_module_vs_reference(mod, x, _fwd_kwargs(spec, B, L, g), fwd_tol=F32_FWD, grad_tol=F32_GRAD)


def test_sinks_change_the_output_and_window_hides_old_tokens():
    """Sanity of the setup: sinks and windows matter, so the reference comparisons can fail."""
    g = _gen(8)
    x = randn(1, 12, 32, gen=g)
    base = make_mha(seed=1, d_model=32, n_heads=4)
    with_sinks = make_mha(seed=1, d_model=32, n_heads=4, use_attention_sinks=True, num_attention_sinks=2)
    with torch.no_grad():
        for n, p in base.named_parameters():
            p.copy_(dict(with_sinks.named_parameters())[n])
        a, b = base(x, causal=True), with_sinks(x, causal=True)
        assert rel_err(a, b) > 1e-3
        windowed = make_mha(seed=1, d_model=32, n_heads=4, window=2)
        windowed.load_state_dict(base.state_dict())
        w = windowed(x)
        # the first two rows are the same as causal; later rows differ
        assert_close(w[:, :2], a[:, :2], 1e-12)
        assert rel_err(w[:, 5:], a[:, 5:]) > 1e-3


# ---------------------------------------------------------------------------
# RotaryEmbedding
# ---------------------------------------------------------------------------

SCALINGS = [
    pytest.param(1.0, id="none"),
    pytest.param(3.0, id="linear_float"),
    pytest.param({"kind": "linear", "factor": 2.0}, id="linear"),
    pytest.param({"kind": "ntk", "factor": 4.0}, id="ntk"),
    pytest.param(RopeScaling("yarn", 8.0, original_max_positions=128, beta_fast=16.0, beta_slow=2.0), id="yarn"),
]


@pytest.mark.parametrize("scaling", SCALINGS)
def test_rope_matches_reference(scaling):
    D = 16
    rope = RotaryEmbedding(D, base=1000.0, scaling=scaling, max_positions=64)
    g = _gen(51)
    q, k = randn(2, 4, 9, D, gen=g), randn(2, 2, 9, D, gen=g)
    inv, ms = ref_inv_freq(D, 1000.0, RopeScaling.parse(scaling))
    for positions in (None, 13, torch.arange(9) * 3, torch.stack([torch.arange(9), torch.arange(9) + 40])):
        rq, rk = rope(q, k, positions)
        assert rq.dtype == q.dtype and rk.shape == k.shape
        pos = _positions(positions, 9)
        assert_close(rq, ref_rotate(q, pos, inv, ms), TIGHT64, name="q")
        assert_close(rk, ref_rotate(k, pos, inv, ms), TIGHT64, name="k")
    # the scaling actually changes the rotation (so the comparisons above can fail)
    if RopeScaling.parse(scaling).kind != "none":
        inv0, _ = ref_inv_freq(D, 1000.0, RopeScaling())
        assert rel_err(rope(q, k, 13)[0], ref_rotate(q, torch.arange(9) + 13, inv0, 1.0)) > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_rope_half_inputs_rotate_in_float32(dtype):
    """Half-precision q/k rotate in float32 and round once: the result is within 1.2x of the float64
    rotation rounded to the dtype (rotating in the dtype itself measured 1.6x at position ~3800, bf16)."""
    D = 64
    rope = RotaryEmbedding(D, base=10000.0, max_positions=4096)
    g = _gen(52)
    q, k = randn(2, 4, 64, D, gen=g).to(dtype), randn(2, 2, 64, D, gen=g).to(dtype)
    inv, ms = ref_inv_freq(D, 10000.0, RopeScaling())
    rq, rk = rope(q, k, 3800)
    assert rq.dtype == dtype and rk.dtype == dtype
    pos = torch.arange(64) + 3800
    for name, got, x in (("q", rq, q), ("k", rk, k)):
        exact = ref_rotate(x.double(), pos, inv, ms)
        floor = rel_err(exact.to(dtype), exact)  # rounding the exact result once
        assert rel_err(got, exact) <= 1.2 * floor, (name, rel_err(got, exact), floor)


def test_rope_yarn_ramps_over_pairs_like_hf():
    """The Llama-3-style YaRN case (D = 128, factor 4, 4096 trained positions): pairs 0-19 keep their
    frequency, pairs from 46 on are interpolated, and the ramp between them is linear in the index
    (a ramp linear in the turns, the paper's formula, differs by up to 42% at pair 34)."""
    rope = RotaryEmbedding(128, base=10000.0, scaling={"kind": "yarn", "factor": 4.0, "original_max_positions": 4096})
    inv0 = 1.0 / 10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    ratio = rope.inv_freq / inv0  # 1 = kept, 1/4 = interpolated
    assert torch.allclose(ratio[:21], torch.ones(21, dtype=torch.float64))
    assert torch.allclose(ratio[46:], torch.full((18,), 0.25, dtype=torch.float64))
    ramp = (1 - ratio[20:47]) / 0.75
    assert torch.allclose(ramp, torch.arange(27, dtype=torch.float64) / 26)


def test_rope_argument_checks():
    for kw, exc in ((dict(max_positions=-5), ValueError), (dict(max_positions=2.5), ValueError),
                    (dict(base=float("inf")), ValueError), (dict(scaling={"kind": "none", "factor": 4.0}), ValueError),
                    (dict(scaling={"kind": "linear", "factor": float("inf")}), ValueError)):
        with pytest.raises(exc, match="max_positions|base|factor"):
            RotaryEmbedding(8, **kw)
    rope = RotaryEmbedding(8)
    with pytest.raises(TypeError, match="positions"):
        rope(randn(1, 1, 3, 8), randn(1, 1, 3, 8), positions=True)
    with pytest.raises(ValueError, match="one length"):
        rope(randn(1, 1, 3, 8), randn(1, 1, 5, 8))


def test_rope_odd_head_dim_raises():
    for d in (7, 1, 0):
        with pytest.raises(ValueError, match="head_dim"):
            RotaryEmbedding(d)
    rope = RotaryEmbedding(8)
    with pytest.raises(ValueError, match="head_dim"):
        rope(randn(1, 1, 3, 6), randn(1, 1, 3, 6))


def test_rope_int_offset_equals_tensor_positions():
    rope = RotaryEmbedding(16, max_positions=32)
    g = _gen(52)
    q, k = randn(2, 3, 7, 16, dtype=torch.float32, gen=g), randn(2, 1, 7, 16, dtype=torch.float32, gen=g)
    for off in (0, 5, 25, 30):  # 30 + 7 > 32: the table grows
        a = rope(q, k, off)
        b = rope(q, k, torch.arange(7) + off)
        c = rope(q, k, torch.arange(7).expand(2, 7) + off)
        for x, y in ((a, b), (a, c)):
            assert torch.allclose(x[0], y[0], rtol=1e-6, atol=1e-6)
            assert torch.allclose(x[1], y[1], rtol=1e-6, atol=1e-6)
    assert torch.equal(rope(q, k)[0], rope(q, k, 0)[0])
    # per-batch positions differ per row
    pos = torch.stack([torch.arange(7), torch.arange(7) + 11])
    rq, _ = rope(q, k, pos)
    assert torch.allclose(rq[1], rope(q[1:], k[1:], 11)[0][0], atol=1e-6)
    assert torch.allclose(rq[0], rope(q[:1], k[:1], 0)[0][0], atol=1e-6)
    with pytest.raises(ValueError, match="positions"):
        rope(q, k, torch.arange(6))
    with pytest.raises(TypeError, match="positions"):
        rope(q, k, torch.arange(7).float())
    with pytest.raises(ValueError, match="offset"):
        rope(q, k, -1)


def test_rope_tables_grow_on_demand():
    rope = RotaryEmbedding(8, max_positions=16)
    assert rope.cos_table.shape[0] == 16
    big = RotaryEmbedding(8, max_positions=4096)
    g = _gen(53)
    q, k = randn(1, 2, 10, 8, dtype=torch.float32, gen=g), randn(1, 2, 10, 8, dtype=torch.float32, gen=g)
    out = rope(q, k, 100)
    assert rope.cos_table.shape[0] >= 110 and rope.sin_table.shape[0] == rope.cos_table.shape[0]
    ref = big(q, k, 100)
    assert torch.allclose(out[0], ref[0], atol=1e-6) and torch.allclose(out[1], ref[1], atol=1e-6)
    # a long sequence from 0 also grows the table
    q2, k2 = randn(1, 1, 300, 8, dtype=torch.float32, gen=g), randn(1, 1, 300, 8, dtype=torch.float32, gen=g)
    a = rope(q2, k2)
    b = big(q2, k2)
    assert torch.allclose(a[0], b[0], atol=1e-5) and rope.cos_table.shape[0] >= 300
    # and the module inside MultiHeadAttention grows too (default tables: 2048)
    mod = make_mha(seed=2, dtype=torch.float32, d_model=16, n_heads=2, use_rope=True)
    x = randn(1, 4, 16, dtype=torch.float32, gen=g)
    with torch.no_grad():
        y = mod(x, positions=3000)
        z = mod(x, positions=torch.arange(4) + 3000)
    assert mod.rope.cos_table.shape[0] >= 3004
    assert torch.allclose(y, z, atol=1e-5)


@pytest.mark.parametrize("pairs", [[(5, 2), (40, 37), (203, 200)], [(0, 9), (17, 26), (120, 129)]])
def test_rope_relative_position_property(pairs):
    """<R_m q, R_n k> depends on m - n only (scaling "none")."""
    D = 16
    rope = RotaryEmbedding(D, base=10000.0)
    g = _gen(54)
    q, k = randn(1, 1, 1, D, gen=g), randn(1, 1, 1, D, gen=g)
    dots = []
    for m, n in pairs:
        rq, _ = rope(q, q, torch.tensor([m]))
        _, rk = rope(k, k, torch.tensor([n]))
        dots.append((rq * rk).sum().item())
    for d in dots[1:]:
        assert d == pytest.approx(dots[0], rel=1e-4, abs=1e-4)
    # and it does depend on the offset (else the check is vacuous)
    rq, _ = rope(q, q, torch.tensor([pairs[0][0] + 3]))
    _, rk = rope(k, k, torch.tensor([pairs[0][1]]))
    assert abs((rq * rk).sum().item() - dots[0]) > 1e-3


# ---------------------------------------------------------------------------
# decode with a KV cache == one causal forward
# ---------------------------------------------------------------------------

DECODE_CASES = [
    ("plain", {}),
    ("rope", dict(use_rope=True)),
    ("rope_yarn", dict(use_rope=True, rope_scaling=_YARN)),
    ("gqa", dict(use_gqa=True, gqa_groups=2)),
    ("mqa_rope", dict(use_gqa=True, gqa_groups=1, use_rope=True)),
    ("window", dict(window=3)),
    ("sinks", dict(use_attention_sinks=True, num_attention_sinks=2)),
    ("window_sinks", dict(window=2, use_attention_sinks=True, num_attention_sinks=3)),
    ("rope_gqa_window_sinks", dict(use_rope=True, use_gqa=True, gqa_groups=2, window=4,
                                   use_attention_sinks=True, num_attention_sinks=2, qkv_bias=True)),
]


@pytest.mark.parametrize("cfg", [c[1] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
@pytest.mark.parametrize("prefill", [1, 6])
def test_decode_with_cache_matches_full_forward(cfg, prefill):
    B, N = 2, 5
    T = prefill + N
    mod = make_mha(seed=11, d_model=32, n_heads=4, **cfg)
    x = randn(B, T, 32, gen=_gen(61 + prefill))
    with torch.no_grad():
        full = mod(x, causal=True)
        cache = mod.new_kv_cache(B, T + 2)
        assert cache.k.dtype == torch.float64
        outs = [mod(x[:, :prefill], kv_cache=cache)]
        assert cache.lengths.tolist() == [prefill] * B and cache.host_lengths == [prefill] * B
        for t in range(prefill, T):
            outs.append(mod(x[:, t:t + 1], kv_cache=cache))
    dec = torch.cat(outs, dim=1)
    assert_close(dec, full, 1e-6)
    assert cache.lengths.tolist() == [T] * B and cache.host_lengths == [T] * B
    assert cache.lengths.dtype == torch.int32
    if cfg.get("use_rope"):
        # rope in the reference too: the decode result is the true causal attention
        P = ref_params(mod)
        assert_close(dec, ref_mha(P, mod.config, x, causal=True), TIGHT64)
    else:
        assert_close(dec, ref_mha(ref_params(mod), mod.config, x, causal=True), 1e-10)


def test_decode_cache_overflow_leaves_cache_unchanged():
    B = 2
    mod = make_mha(seed=12, d_model=32, n_heads=4, use_rope=True, use_gqa=True, gqa_groups=2,
                   use_attention_sinks=True, num_attention_sinks=1, window=3)
    x = randn(B, 6, 32, gen=_gen(62))
    cache = mod.new_kv_cache(B, 5)
    with torch.no_grad():
        mod(x[:, :4], kv_cache=cache)
        mod(x[:, 4:5], kv_cache=cache)  # exactly full
        state = (cache.k.clone(), cache.v.clone(), cache.lengths.clone(), list(cache.host_lengths))
        with pytest.raises(ValueError, match="overflow"):
            mod(x[:, 5:6], kv_cache=cache)
        with pytest.raises(ValueError, match="max_len"):
            mod(x[:, :2], kv_cache=cache)
    assert torch.equal(cache.k, state[0]) and torch.equal(cache.v, state[1])
    assert torch.equal(cache.lengths, state[2]) and cache.host_lengths == state[3] == [5, 5]


def test_kv_cache_append_and_overflow_direct():
    g = _gen(63)
    cache = KVCache(2, 2, 6, 4, dtype=torch.float32)
    k, v = randn(2, 2, 3, 4, dtype=torch.float32, gen=g), randn(2, 2, 3, 4, dtype=torch.float32, gen=g)
    kk, vv, old, new = cache.append(k, v, num_new=torch.tensor([3, 2]))  # ragged: row 1 keeps 2 of 3
    assert old.tolist() == [0, 0] and new.tolist() == [3, 2] and cache.host_lengths == [3, 2]
    assert kk is cache.k and vv is cache.v
    assert torch.equal(cache.k[0, :, :3], k[0]) and torch.equal(cache.v[0, :, :3], v[0])
    assert torch.equal(cache.k[1, :, :2], k[1, :, :2]) and torch.equal(cache.v[1, :, :2], v[1, :, :2])
    k2, v2 = randn(2, 2, 3, 4, dtype=torch.float32, gen=g), randn(2, 2, 3, 4, dtype=torch.float32, gen=g)
    _, _, old, new = cache.append(k2, v2)
    assert old.tolist() == [3, 2] and new.tolist() == [6, 5]
    assert torch.equal(cache.k[0, :, 3:6], k2[0]) and torch.equal(cache.k[1, :, 2:5], k2[1])
    state = (cache.k.clone(), cache.v.clone(), cache.lengths.clone(), list(cache.host_lengths))
    # row 0 is full: a one-token append overflows there and must write nothing, not even to row 1
    with pytest.raises(ValueError, match="overflow") as ei:
        cache.append(k2[:, :, :1], v2[:, :, :1])
    assert "[0]" in str(ei.value)
    assert torch.equal(cache.k, state[0]) and torch.equal(cache.v, state[1])
    assert torch.equal(cache.lengths, state[2]) and cache.host_lengths == state[3]
    with pytest.raises(TypeError, match="dtype|holds"):
        cache.append(k2.double(), v2.double())
    cache.reset()
    assert cache.lengths.tolist() == [0, 0] and cache.host_lengths == [0, 0]


@pytest.mark.parametrize("grad", [False, True], ids=["in_place", "autograd"])
def test_kv_cache_ragged_append_counts_real_tokens_only(grad):
    """With num_new only the real tokens are written and counted against max_len: a full sequence that
    takes no token does not block the others, and padding past max_len is never written (it had no slot:
    it was refused before, or clamped onto the last slot)."""
    g = _gen(65)
    cache = KVCache(3, 2, 6, 4, dtype=torch.float64)
    k0, v0 = randn(3, 2, 5, 4, gen=g), randn(3, 2, 5, 4, gen=g)
    cache.append(k0, v0, num_new=[5, 1, 3])
    k1, v1 = leaf(randn(3, 2, 3, 4, gen=g)).requires_grad_(grad), randn(3, 2, 3, 4, gen=g)
    with torch.set_grad_enabled(grad):
        kk, vv, old, new = cache.append(k1, v1, num_new=[1, 3, 2])  # row 0: 5 + 3 padded > 6, 5 + 1 real fits
    assert old.tolist() == [5, 1, 3] and new.tolist() == [6, 4, 5] and cache.host_lengths == [6, 4, 5]
    want_k, want_v = torch.zeros(3, 2, 6, 4, dtype=torch.float64), torch.zeros(3, 2, 6, 4, dtype=torch.float64)
    for b, (n0, n1) in enumerate(((5, 1), (1, 3), (3, 2))):
        want_k[b, :, :n0], want_v[b, :, :n0] = k0[b, :, :n0], v0[b, :, :n0]
        want_k[b, :, n0:n0 + n1], want_v[b, :, n0:n0 + n1] = k1[b, :, :n1].detach(), v1[b, :, :n1]
        assert torch.equal(kk[b, :, :n0 + n1], want_k[b, :, :n0 + n1]) and torch.equal(vv[b, :, :n0 + n1],
                                                                                       want_v[b, :, :n0 + n1])
    if grad:  # the gradient reaches exactly the real tokens
        (kk * torch.arange(1, 7, dtype=torch.float64).view(1, 1, 6, 1)).sum().backward()
        want = torch.zeros_like(k1)
        for b, (n0, n1) in enumerate(((5, 1), (1, 3), (3, 2))):
            want[b, :, :n1] = torch.arange(n0 + 1, n0 + n1 + 1, dtype=torch.float64).view(1, -1, 1)
        assert torch.equal(k1.grad, want)
    # row 0 is full now: it may take 0 tokens while the others take theirs, not 1
    with torch.no_grad():
        cache.append(k1.detach()[:, :, :1], v1[:, :, :1], num_new=[0, 1, 1])
        assert cache.host_lengths == [6, 5, 6]
        state = (cache.k.clone(), cache.lengths.clone(), list(cache.host_lengths))
        with pytest.raises(ValueError, match=r"sequence\(s\) \[0, 2\] hold \[6, 6\] tokens; appending \[1, 1\]"):
            cache.append(k1.detach()[:, :, :1], v1[:, :, :1], num_new=[1, 1, 1])
    assert torch.equal(cache.k, state[0]) and torch.equal(cache.lengths, state[1]) and cache.host_lengths == state[2]


def test_kv_cache_ragged_append_after_a_compiled_one_writes_after_it():
    """A compiled append moves the lengths tensor, not host_lengths: a ragged append after it must write
    after the compiled tokens (its slots came from host_lengths and overwrote them)."""
    g = _gen(66)
    cache = KVCache(3, 2, 8, 4, dtype=torch.float64)
    k1, v1, k2, v2 = (randn(3, 2, n, 4, gen=g) for n in (1, 1, 2, 2))
    torch.compile(lambda c, k, v: c.append(k, v), backend="eager")(cache, k1, v1)
    assert cache.lengths.tolist() == [1, 1, 1]
    cache.append(k2, v2, num_new=[2, 1, 0])
    assert cache.lengths.tolist() == [3, 2, 1]
    assert torch.equal(cache.k[:, :, :1], k1) and torch.equal(cache.v[:, :, :1], v1)
    assert torch.equal(cache.k[0, :, 1:3], k2[0]) and torch.equal(cache.k[1, :, 1:2], k2[1, :, :1])


@pytest.mark.parametrize("call,exc,words", [
    (lambda c, k: c.append(k[:, :, :, 0], k[:, :, :, 0]), ValueError, "k_new must be [B, Hkv, L, D] = [2, 2, L, 4]"),
    (lambda c, k: c.append(k, k[0]), ValueError, "v_new must be"),
    (lambda c, k: c.append(k.tolist(), k), TypeError, "k_new must be a Tensor"),
    (lambda c, k: c.append(k.to("meta"), k.to("meta")), ValueError, "meta"),
    (lambda c, k: c.append(k, k, num_new=[3, 1]), ValueError, "num_new must lie in"),
    (lambda c, k: c.append(k, k, num_new=torch.tensor([1.0, 1.0])), ValueError, "num_new"),
], ids=["rank", "v_shape", "not_tensor", "device", "num_new_range", "num_new_float"])
def test_kv_cache_rejects_bad_append_and_writes_nothing(call, exc, words):
    cache = KVCache(2, 2, 6, 4, dtype=torch.float32)
    k = randn(2, 2, 2, 4, dtype=torch.float32, gen=_gen(64))
    cache.append(k, k)
    state = (cache.k.clone(), cache.lengths.clone(), list(cache.host_lengths))
    with pytest.raises(exc, match=re.escape(words) if "[" in words else words):
        call(cache, k)
    assert torch.equal(cache.k, state[0]) and torch.equal(cache.lengths, state[1]) and cache.host_lengths == state[2]
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 1, 4, 4, dtype=torch.int32)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_rollouts_with_autograd_each_backpropagate(paged):
    """Decoding with autograd on, rollout after rollout on one cache: the writes of a rollout hold its
    graph, and reset() (contiguous) or freeing the last sequence (paged) drops it, so the next
    rollout's backward does not run into the freed graph of the one before."""
    mod = make_mha(seed=67, d_model=16, n_heads=2, use_gqa=True, gqa_groups=1, use_rope=True)
    cache = mod.new_kv_cache(2, 8) if not paged else mod.new_paged_kv_cache(8, 16)
    for rollout in range(2):
        if paged:
            ids = [cache.add_sequence() for _ in range(2)]
            step_cache = cache.bind(ids)
        else:
            step_cache = cache
        x = randn(2, 3, 16, gen=_gen(68 + rollout))
        loss = mod(x, causal=True, kv_cache=step_cache).sum()
        loss = loss + mod(randn(2, 1, 16, gen=_gen(70 + rollout)), causal=True, kv_cache=step_cache).sum()
        loss.backward()  # the second rollout raised "backward through the graph a second time"
        assert all(p.grad is not None for p in mod.parameters())
        mod.zero_grad()
        if paged:
            for i in ids:
                cache.free(i)
        else:
            cache.reset()
        assert cache.k.grad_fn is None and cache.v.grad_fn is None


def test_kv_cache_built_under_inference_mode_refuses_appends_outside_it():
    """Its tensors cannot change outside inference_mode: refused before anything is written (the lengths
    moved before the failure, the host copy did not)."""
    with torch.inference_mode():
        cache = KVCache(2, 1, 8, 4, dtype=torch.float32)
        k = randn(2, 1, 3, 4, dtype=torch.float32, gen=_gen(72))
        cache.append(k, k)
    with pytest.raises(ValueError, match="inference_mode"):
        cache.append(k.clone(), k.clone())
    assert cache.lengths.tolist() == [3, 3] and cache.host_lengths == [3, 3]


def test_kv_cache_of_other_heads_is_named():
    mod = make_mha(seed=73, d_model=16, n_heads=2)
    x = randn(2, 3, 16, gen=_gen(74))
    pool = attnkit.PagedKVCache(4, 2, 4, 16)
    for cache in (KVCache(2, 1, 8, 8), KVCache(2, 2, 8, 4), KVCache(2, 2, 8, 8, head_dim_v=4),
                  pool.bind([pool.add_sequence(), pool.add_sequence()])):
        with pytest.raises(ValueError, match="kv_cache holds"):  # was an error naming k_new
            mod(x, causal=True, kv_cache=cache)


def test_kv_cache_rollback_undoes_the_last_append():
    cache = KVCache(2, 2, 8, 4, dtype=torch.float32)
    k = randn(2, 2, 3, 4, dtype=torch.float32, gen=_gen(65))
    cache.append(k, k, num_new=[3, 1])
    cache.append(k, k)
    assert cache.lengths.tolist() == [6, 4] and cache.host_lengths == [6, 4]
    cache.rollback()
    assert cache.lengths.tolist() == [3, 1] and cache.host_lengths == [3, 1]
    with pytest.raises(RuntimeError, match="rollback"):  # one append, one rollback
        cache.rollback()
    cache.append(k, k)
    cache.reset()
    with pytest.raises(RuntimeError, match="rollback"):
        cache.rollback()
    cache.append(k, k)
    cache.advance(1)  # a captured graph appended: the undo record is stale
    with pytest.raises(RuntimeError, match="rollback"):
        cache.rollback()
    assert cache.host_lengths == [4, 4]


@pytest.mark.slow
def test_kv_cache_overflow_under_compile_fails_and_stays_in_bounds():
    """Under torch.compile the host check is off: an append past max_len fails a device assertion
    (on the CPU: at once) and its positions are clamped into the buffers."""
    cache = KVCache(1, 1, 3, 4, dtype=torch.float32)
    step = torch.compile(lambda k, v: cache.append(k, v)[3].clone(), fullgraph=True, backend="eager")
    k = randn(1, 1, 1, 4, dtype=torch.float32, gen=_gen(66))
    for n in range(3):
        assert step(k + n, k).tolist() == [n + 1]
    with pytest.raises(RuntimeError, match="overflow"):
        step(k + 7, k)
    assert torch.equal(cache.k[0, 0, :, 0], (k[0, 0, 0, 0] + torch.arange(3.0)))  # nothing overwritten


# ---------------------------------------------------------------------------
# backend choice, attention_fn, score_mod
# ---------------------------------------------------------------------------


def _spy_backend(monkeypatch, name):
    backend = attnkit.get_backend(name)
    calls = []
    orig = backend.run

    def run(req):
        calls.append(req)
        return orig(req)

    monkeypatch.setattr(backend, "run", run)
    return calls


def test_use_flash_false_uses_reference(monkeypatch):
    ref_calls = _spy_backend(monkeypatch, "reference")
    chunk_calls = _spy_backend(monkeypatch, "chunked")
    common = dict(d_model=32, n_heads=4, use_gqa=True, gqa_groups=2, use_rope=True)
    fast = make_mha(seed=13, dtype=torch.float32, **common)
    slow = MultiHeadAttention(AttentionConfig(use_flash=False, backend="chunked", **common))
    slow.load_state_dict(fast.state_dict())
    x = randn(2, 9, 32, dtype=torch.float32, gen=_gen(71))
    a = fast(x, causal=True)
    assert len(ref_calls) == 0, "use_flash=True must not run the reference on the CPU"
    b = slow(x, causal=True)
    assert len(ref_calls) == 1 and len(chunk_calls) == 0, "use_flash=False must ignore backend= and use reference"
    assert_close(a, b, 2e-5)
    # use_flash=True honours the configured backend
    chunked = MultiHeadAttention(AttentionConfig(backend="chunked", **common))
    chunked.load_state_dict(fast.state_dict())
    c = chunked(x, causal=True)
    assert len(chunk_calls) == 1 and len(ref_calls) == 1
    assert_close(c, b, 2e-5)


def test_attention_fn_is_called_and_used():
    seen = []

    def counting(q, k, v, **kw):
        seen.append((tuple(q.shape), tuple(k.shape), kw))
        return attnkit.attention(q, k, v, **kw)

    common = dict(d_model=32, n_heads=4, use_gqa=True, gqa_groups=2, window=3)
    base = make_mha(seed=14, **common)
    mod = MultiHeadAttention(AttentionConfig(attention_fn=counting, **common)).double()
    mod.load_state_dict(base.state_dict())
    x = randn(2, 8, 32, gen=_gen(72))
    out = mod(x)
    assert len(seen) == 1
    qs, ks, kw = seen[0]
    assert qs == (2, 4, 8, 8) and ks == (2, 2, 8, 8)  # kv heads not repeated
    assert kw["causal"] is True and kw["window"] == 3
    assert_close(out, base(x), 1e-12)
    mod(x)
    assert len(seen) == 2

    # the callable's result is what the module projects
    def doubled(q, k, v, **kw):
        return 2.0 * attnkit.attention(q, k, v, **kw)

    mod2 = MultiHeadAttention(AttentionConfig(attention_fn=doubled, **common)).double()
    mod2.load_state_dict(base.state_dict())
    bias = base.o_proj.bias.detach()
    assert_close(mod2(x) - bias, 2.0 * (base(x) - bias), 1e-12)

    def zeros(q, k, v, **kw):
        return torch.zeros_like(q)

    mod3 = MultiHeadAttention(AttentionConfig(attention_fn=zeros, **common)).double()
    mod3.load_state_dict(base.state_dict())
    assert_close(mod3(x), bias.expand(2, 8, 32), 1e-12)


@pytest.mark.parametrize("use_flash", [True, False], ids=["auto", "reference"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_score_mod_from_config_is_applied(use_flash, causal):
    slopes = torch.tensor([0.1, 0.25, 0.5, 1.0], dtype=torch.float64)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    mod = make_mha(seed=15, d_model=32, n_heads=4, use_gqa=True, gqa_groups=2, score_mod=alibi,
                   use_flash=use_flash)
    x = randn(2, 9, 32, gen=_gen(73))
    out, ref = check_module_vs_reference(mod, x, {"causal": causal}, {"score_mod": alibi})
    # and the mod matters
    plain = ref_mha(ref_params(mod), mod.config, x, causal=causal)
    assert rel_err(out, plain) > 1e-3


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("cfg", [{}, dict(use_attention_sinks=True, num_attention_sinks=2)], ids=["plain", "sinks"])
def test_score_mod_sees_positions_when_decoding(paged, cfg):
    """A position-dependent score_mod (ALiBi) decodes as it computes the whole sequence: the
    module hands it each query's position in the sequence and each key token's, not the
    contract's indices into the new queries (from 0) or into the keys (sink slots first)."""
    slopes = torch.tensor([0.1, 0.25, 0.5, 1.0], dtype=torch.float64)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    mod = make_mha(seed=17, d_model=32, n_heads=4, use_gqa=True, gqa_groups=2, score_mod=alibi, **cfg)
    B, T, pre = 2, 9, 4
    x = randn(B, T, 32, gen=_gen(75))
    ref = ref_mha(ref_params(mod), mod.config, x, causal=True, score_mod=alibi)
    with torch.no_grad():
        assert_close(mod(x, causal=True), ref, 1e-10)
        if paged:
            cache = mod.new_paged_kv_cache(8, 16)
            cache.bind([cache.add_sequence() for _ in range(B)])
        else:
            cache = mod.new_kv_cache(B, T)
        outs = [mod(x[:, :pre], kv_cache=cache)]
        outs += [mod(x[:, t:t + 1], kv_cache=cache) for t in range(pre, T)]
    assert_close(torch.cat(outs, 1), ref, 1e-10)
    plain = ref_mha(ref_params(mod), mod.config, x, causal=True)
    assert rel_err(ref, plain) > 1e-3  # the mod matters


def test_score_mod_positions_follow_each_sequence_when_lengths_differ():
    """Sequences of a paged batch at different lengths: each sequence's new query sits at its own
    position, so a position-dependent score_mod decodes as each sequence computed alone."""
    slopes = torch.tensor([0.1, 0.25, 0.5, 1.0], dtype=torch.float64)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    mod = make_mha(seed=19, d_model=32, n_heads=4, use_gqa=True, gqa_groups=2, score_mod=alibi)
    pres, steps = (3, 7), 3
    xs = [randn(1, p + steps, 32, gen=_gen(76 + i)) for i, p in enumerate(pres)]
    cache = mod.new_paged_kv_cache(8, 16)
    ids = [cache.add_sequence() for _ in pres]
    with torch.no_grad():
        for sid, x, p in zip(ids, xs, pres):  # prefill each sequence alone: lengths 3 and 7
            cache.bind([sid])
            mod(x[:, :p], kv_cache=cache)
        cache.bind(ids)
        outs = [mod(torch.cat([x[:, p + t:p + t + 1] for x, p in zip(xs, pres)]), kv_cache=cache)
                for t in range(steps)]
    dec = torch.cat(outs, 1)  # [2, steps, 32]
    for i, (x, p) in enumerate(zip(xs, pres)):
        ref = ref_mha(ref_params(mod), mod.config, x, causal=True, score_mod=alibi)[:, p:]
        assert_close(dec[i:i + 1], ref, TIGHT64)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_user_mask_with_a_cache_keeps_causality_and_written_keys(paged):
    """A user mask given with a cache narrows the cache's own key mask (causal, written keys);
    it never replaces it."""
    B, T, pre = 2, 9, 4
    mod = make_mha(seed=20, d_model=32, n_heads=4, use_gqa=True, gqa_groups=2)
    x = randn(B, T, 32, gen=_gen(78))
    g = _gen(79)
    kpm = torch.rand(B, 1, 1, T, generator=g) > 0.3
    kpm[:, ..., 0] = True  # every query keeps a key
    ref = ref_mha(ref_params(mod), mod.config, x, causal=True, mask=kpm)
    if paged:
        cache = mod.new_paged_kv_cache(8, 16)
        cache.bind([cache.add_sequence() for _ in range(B)])
    else:
        cache = mod.new_kv_cache(B, T + 3)
    with torch.no_grad():
        outs = []
        for a, e in [(0, pre)] + [(t, t + 1) for t in range(pre, T)]:
            width = cache.max_len if not paged else e  # the cache's key count after this write
            m = torch.ones(B, 1, 1, width, dtype=torch.bool)
            m[..., :min(width, T)] = kpm[..., :min(width, T)]
            outs.append(mod(x[:, a:e], mask=m, kv_cache=cache))
    assert_close(torch.cat(outs, 1), ref, TIGHT64)
    assert rel_err(ref, ref_mha(ref_params(mod), mod.config, x, causal=True)) > 1e-3  # the mask matters


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", ["backend", "mask_shape", "mask_dtype", "bias_shape"])
def test_failing_call_leaves_cache_unchanged(paged, case):
    """The cache is written before the attention call; when that call raises, the write is undone."""
    cfg = dict(score_mod=lambda s, b, h, qi, ki: s) if case == "backend" else {}
    mod = make_mha(seed=18, d_model=32, n_heads=4, **cfg)
    if case == "backend":  # sdpa cannot serve a score_mod: the dispatcher raises after the write
        mod._backend = "sdpa"
    x = randn(1, 4, 32, gen=_gen(76))
    if paged:
        cache = mod.new_paged_kv_cache(4, 16)
        cache.bind([cache.add_sequence()])
        state = lambda: (cache.lengths().tolist(), cache.block_table().tolist(), cache.free_blocks(),
                         cache.ref_counts())
    else:
        cache = mod.new_kv_cache(1, 16)
        state = lambda: (cache.lengths.tolist(), list(cache.host_lengths))
    with torch.no_grad():
        if case != "backend":
            mod(x[:, :3], kv_cache=cache)
        before = state()
        kw, exc, words = {
            "backend": ({}, ValueError, "score_mod"),
            "mask_shape": (dict(mask=torch.ones(1, 1, 1, 7, dtype=torch.bool)), ValueError, "mask"),
            "mask_dtype": (dict(mask=torch.ones(1, 1, 1, 4)), TypeError, "mask must be a bool"),
            "bias_shape": (dict(attn_bias=torch.zeros(1, 1, 1, 3, dtype=torch.float64)), ValueError, "bias"),
        }[case]
        with pytest.raises(exc, match=words):
            mod(x[:, 3:4], kv_cache=cache, **kw)
        assert state() == before
        mod._backend = "auto"
        mod(x[:, 3:4], kv_cache=cache)  # and the cache still works
    assert state() != before


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------


def _compile_case(backend):
    cfg = dict(d_model=64, n_heads=4, use_rope=True, use_gqa=True, gqa_groups=2, backend=backend)
    return make_mha(seed=16, dtype=torch.float32, **cfg), randn(2, 16, 64, dtype=torch.float32, gen=_gen(74))


@pytest.mark.slow
def test_compile_fullgraph_sdpa_matches_eager():
    mod, x = _compile_case("sdpa")
    xe = leaf(x, torch.float32)
    eager = mod(xe, causal=True)
    eager.sum().backward()
    g_eager = {n: p.grad.clone() for n, p in mod.named_parameters()}
    mod.zero_grad()
    compiled = torch.compile(mod.forward, fullgraph=True)
    xc = leaf(x, torch.float32)
    out = compiled(xc, causal=True)
    assert_close(out, eager, 1e-5)
    out.sum().backward()
    assert_close(xc.grad, xe.grad, 1e-5, name="grad x")
    for n, p in mod.named_parameters():
        assert_close(p.grad, g_eager[n], 1e-5, name=f"grad {n}")
    # also vs the float64 reference
    ref = ref_mha(ref_params(mod), mod.config, x.double(), causal=True)
    assert_close(out, ref, F32_FWD)


@pytest.mark.slow
def test_compile_fullgraph_flex_matches_eager_no_grad():
    mod, x = _compile_case("flex")
    with torch.no_grad():
        eager = mod(x, causal=True)
        compiled = torch.compile(mod.forward, fullgraph=True)
        out = compiled(x, causal=True)
    assert_close(out, eager, 1e-5)
    ref = ref_mha(ref_params(mod), mod.config, x.double(), causal=True)
    assert_close(out, ref, F32_FWD)


def _decode_cache(mod, kind: str, B: int, device=None):
    if kind == "kv":
        return KVCache(B, mod.num_kv_heads, 16, mod.head_dim, dtype=torch.float64, device=device)
    c = attnkit.PagedKVCache(8, mod.num_kv_heads, mod.head_dim, 16, dtype=torch.float64, device=device)
    c.bind([c.add_sequence() for _ in range(B)])
    return c


@pytest.mark.parametrize("kind", ["kv", "paged"])
def test_decode_steps_with_gradients_match_the_full_forward(kind):
    """Prefill then one-token steps through a cache with autograd on (GQA, RoPE): the gradient of x equals
    the full causal forward's (a KVCache written in place used to invalidate the step before's saved K/V)."""
    mod = make_mha(seed=1, d_model=32, n_heads=4, use_gqa=True, gqa_groups=2, use_rope=True)
    x, gout = randn(2, 6, 32, gen=_gen(3)), randn(2, 6, 32, gen=_gen(4))
    xf = x.clone().requires_grad_(True)
    (mod(xf, causal=True) * gout).sum().backward()
    xd = x.clone().requires_grad_(True)
    c = _decode_cache(mod, kind, 2)
    outs = [mod(xd[:, :3], kv_cache=c)] + [mod(xd[:, t:t + 1], kv_cache=c) for t in (3, 4, 5)]
    (torch.cat(outs, 1) * gout).sum().backward()
    assert rel_err(xd.grad, xf.grad) < 1e-10
    for p in mod.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("kind", ["kv", "paged"])
def test_cache_arguments_of_the_wrong_length_or_device(kind):
    """With a kv_cache: no new token, or a cache on another device (with RoPE, whose own error would not name
    the cache), is a ValueError naming it; the cache is left as it was."""
    mod = make_mha(seed=1, d_model=32, n_heads=4, use_rope=True)
    c = _decode_cache(mod, kind, 2)
    x = randn(2, 3, 32, gen=_gen(3))
    with torch.no_grad():
        mod(x, kv_cache=c)
        before = c.next_positions(1).clone()
        with pytest.raises(ValueError, match=r"at least one new token with a kv_cache, got \[2, 0, 32\]"):
            mod(x[:, :0], kv_cache=c)
        assert torch.equal(c.next_positions(1), before)
        with pytest.raises(ValueError, match="kv_cache is on meta, x on cpu"):
            mod(x, kv_cache=_decode_cache(mod, kind, 2, device="meta"))


def test_cache_key_masks_take_the_contracts_windows():
    """key_mask's window is the contract's: an int W shows keys (pos - W, pos] even without causal, a pair
    (left, right) shows [pos - left, pos + right]; a bad window is refused, not an empty mask."""
    c = KVCache(1, 1, 8, 4)
    _, _, old, _ = c.append(randn(1, 1, 5, 4, dtype=torch.float32), randn(1, 1, 5, 4, dtype=torch.float32))
    m = c.key_mask(old, 5, causal=False, window=2)[0, 0, :, :5]
    i, j = torch.arange(5).view(-1, 1), torch.arange(5).view(1, -1)
    assert torch.equal(m, (j <= i) & (j > i - 2))
    m = c.key_mask(old, 5, causal=False, window=(1, 2))[0, 0, :, :5]
    assert torch.equal(m, (j >= i - 1) & (j <= i + 2))
    for bad, exc in ((0, ValueError), (-3, ValueError), (True, TypeError), ((1, -2), ValueError)):
        with pytest.raises(exc, match="window"):
            c.key_mask(old, 5, window=bad)


@pytest.mark.parametrize("field", ["use_rope", "use_flash", "use_gqa", "qkv_bias", "use_attention_sinks"])
def test_attention_config_flags_must_be_bools(field):
    """A string "false" is truthy: AttentionConfig's flags take bools only, as MixedAttentionConfig's do."""
    with pytest.raises(TypeError, match=f"{field} must be a bool, got str 'false'"):
        AttentionConfig(d_model=64, n_heads=4, **{field: "false"})


@pytest.mark.parametrize("n, sinks", [(True, True), (0, True), (-1, False), (1.5, False)])
def test_attention_config_sink_counts(n, sinks):
    with pytest.raises(ValueError, match="num_attention_sinks must be an int"):
        AttentionConfig(d_model=64, n_heads=4, use_attention_sinks=sinks, num_attention_sinks=n)


def test_rope_refuses_what_it_cannot_rotate():
    """positions of another batch, a 0-d positions tensor, ntk scaling at head_dim 2 and an infinite
    beta_fast are errors naming the argument (they broadcast q/k to the wrong batch, or raised IndexError,
    ZeroDivisionError or a bare math domain error)."""
    r = RotaryEmbedding(8)
    q = k = randn(1, 2, 5, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"positions \[B, L\] must have B = 1 or q's batch 1, got \[2, 5\]"):
        r(q, k, torch.arange(10).view(2, 5))
    with pytest.raises(ValueError, match=r"positions must be \[L\] or \[B, L\]"):
        r(q, k, torch.tensor(3))
    with pytest.raises(ValueError, match="ntk rope scaling needs head_dim >= 4, got 2"):
        RotaryEmbedding(2, scaling={"kind": "ntk", "factor": 2.0})
    with pytest.raises(ValueError, match="finite beta_fast"):
        RopeScaling("yarn", 2.0, beta_fast=float("inf"))
    qb, kb = randn(2, 2, 5, 8, dtype=torch.float32), randn(2, 2, 5, 8, dtype=torch.float32)
    pos = torch.arange(10).view(2, 5)
    one, _ = r(qb[:1], kb[:1], pos[:1])
    both, _ = r(qb, kb, pos)
    assert torch.equal(both[:1], one)  # (batched positions of the right batch still rotate row by row)


@pytest.mark.parametrize("backend", ["sdpa", "chunked"])
def test_kv_cache_append_without_grad_after_one_with_grad(backend):
    """Buffers that hold a graph are written out of place even when the new K/V need no gradient."""
    cache = KVCache(1, 1, 8, 4, dtype=torch.float64)
    x = leaf(randn(1, 1, 2, 4, gen=_gen(90)))
    k, v, *_ = cache.append(x, 2 * x)
    out = attnkit.attention(randn(1, 1, 1, 4, gen=_gen(91)), k, v, backend=backend)
    cache.append(randn(1, 1, 1, 4, gen=_gen(92)), randn(1, 1, 1, 4, gen=_gen(93)))
    out.sum().backward()  # raised: "modified by an inplace operation"
    assert x.grad is not None and torch.isfinite(x.grad).all()
