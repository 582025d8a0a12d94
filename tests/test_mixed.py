"""Tests of attnkit.MixedAttention: named token groups, attention patterns, anchor KV cache.

Everything is checked against a plain PyTorch re-implementation written in this
file (one explicit [N, N] group mask over the concatenated sequence, key padding
on top, a "safe" softmax whose rows with no valid key give 0), in three forms of
the module:
- "seq":   parallel=False (one attention call per pattern as written);
- "loop":  parallel=True, one call per distinct key/value set (the CPU default);
- "fused": parallel=True with `_fused_pays` monkeypatched to True (one call with a
           group mask_mod over the whole sequence).
Helpers are self-contained (no imports from the other test files).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from attnkit import AttentionPattern, MixedAttention, MixedAttentionConfig, RotaryEmbedding, TokenSpec

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODES = ("seq", "loop", "fused")
F64_RTOL = 1e-10  # float64: the module and the reference differ by summation order only
F32_FWD_RTOL = 2e-5  # float32 vs the float64 reference
F32_GRAD_RTOL = 1e-4
F32_SELF_RTOL = 2e-6  # two float32 forms of the module against each other (fwd)
F32_SELF_GRAD_RTOL = 1e-5
QK_EPS = 1e-6

# ---------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------

# name -> (dim, heads, batch, [(group, size)], [(queries, keys/values)], index of the pattern whose
# keys are all padded in batch row 1 by the "dead row" padding)
LAYOUTS = {
    # the documented anchor-attention example
    "ref": (32, 4, 2,
            [("sa", 100), ("sq", 50), ("va", 80), ("vq", 60)],
            [(["sa", "sq"], ["sa"]), (["va", "vq"], ["va"])],
            0),
    # sizes that are not multiples of 128 (nor of each other); b attends to everything
    "uneven": (24, 2, 2,
               [("a", 37), ("b", 129), ("c", 5)],
               [(["a", "c"], ["b"]), (["b"], ["a", "b", "c"])],
               0),
    # 7 small groups: P0/P1 and P2/P3 share their key/value sets (merged by the parallel form),
    # g0 and g1 are keys of several patterns, g4 attends to everything, query groups of a merged
    # set are not contiguous nor in x order, key/value lists are not in x order.
    "many": (32, 2, 3,
             [("g0", 3), ("g1", 7), ("g2", 1), ("g3", 12), ("g4", 5), ("g5", 9), ("g6", 4)],
             [(["g0"], ["g1", "g2"]),
              (["g3"], ["g1", "g2"]),
              (["g5", "g1"], ["g0"]),
              (["g2"], ["g0"]),
              (["g4"], ["g0", "g1", "g2", "g3", "g4", "g5", "g6"]),
              (["g6"], ["g6", "g3"])],
             5),
}


def specs_patterns(layout):
    _, _, _, groups, pats, _ = LAYOUTS[layout]
    specs = [TokenSpec(n, s) for n, s in groups]
    patterns = [AttentionPattern(q, kv) for q, kv in pats]
    return specs, patterns


def spans_of(specs):
    spans, start = {}, 0
    for s in specs:
        if s.size is not None:
            spans[s.name] = (start, start + s.size)
            start += s.size
    return spans, start


def group_mask(specs, patterns, n) -> torch.Tensor:
    """allowed[i, j] = group(j) is in the key/value set of group(i)'s pattern."""
    spans, total = spans_of(specs)
    assert total == n
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for p in patterns:
        for qg in p.query_tokens:
            qs, qe = spans[qg]
            for kg in p.key_value_tokens:
                ks, ke = spans[kg]
                allowed[qs:qe, ks:ke] = True
    return allowed


def distinct_kv_sets(patterns):
    return len({tuple(p.key_value_tokens) for p in patterns})


# ---------------------------------------------------------------------------
# the plain re-implementation
# ---------------------------------------------------------------------------


def rotate_half(t, cos, sin):
    """t [B, H, N, D]; cos/sin [N, D/2] or [B, N, D/2]; dims [0, D/2) pair with [D/2, D)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    h = t.shape[-1] // 2
    t1, t2 = t[..., :h], t[..., h:]
    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], dim=-1)


def ref_forward(m, x, specs, patterns, kpm=None, freqs=None):
    """Returns (out [B, N, dim], k, v [B, H, N, D] after norm/RoPE, allowed [B, N, N])."""
    cfg = m.config
    B, N, C = x.shape
    H = cfg.num_heads
    D = C // H
    qkv = x @ m.qkv.weight.t()
    if m.qkv.bias is not None:
        qkv = qkv + m.qkv.bias
    qkv = qkv.reshape(B, N, 3, H, D)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, N, D]
    if cfg.qk_norm:
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + QK_EPS) * m.q_norm
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + QK_EPS) * m.k_norm
    if cfg.use_rope:
        if isinstance(freqs, (tuple, list)):
            cos, sin = freqs
        else:
            cos, sin = torch.cos(freqs), torch.sin(freqs)
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
    allowed = group_mask(specs, patterns, N).expand(B, N, N)
    if kpm is not None:
        allowed = allowed & kpm[:, None, :]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    mask4 = allowed[:, None]
    dead = ~mask4.any(-1, keepdim=True)
    s = s.masked_fill(~mask4, float("-inf")).masked_fill(dead, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(dead, 0.0)
    o = (p @ v).transpose(1, 2).reshape(B, N, C)
    out = o @ m.proj.weight.t()
    if m.proj.bias is not None:
        out = out + m.proj.bias
    return out, k, v, allowed


# ---------------------------------------------------------------------------
# building modules and inputs
# ---------------------------------------------------------------------------


def randomize_(m: MixedAttention, seed: int) -> MixedAttention:
    """Random non-trivial parameters (non-zero biases, norm weights away from 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                r = torch.randn(p.shape, generator=g) * (1.3 / math.sqrt(p.shape[1]))
            elif name in ("q_norm", "k_norm"):
                r = 1.0 + 0.4 * torch.randn(p.shape, generator=g)
            else:
                r = 0.5 * torch.randn(p.shape, generator=g)
            p.copy_(r.to(p.dtype))
    return m


def set_mode(m: MixedAttention, mode: str) -> MixedAttention:
    assert mode in MODES
    m.config.parallel = mode != "seq"
    if mode == "fused":
        m._fused_pays = lambda lay, x: True
    else:
        m._fused_pays = lambda lay, x: False
    return m


def make_module(dim, heads, mode="seq", dtype=torch.float64, seed=0, **cfg) -> MixedAttention:
    torch.manual_seed(seed)
    m = MixedAttention(MixedAttentionConfig(dim=dim, num_heads=heads, **cfg))
    randomize_(m, seed + 1)
    m = m.to(dtype)
    return set_mode(m, mode)


def clone_module(m: MixedAttention, mode: str, dtype=None) -> MixedAttention:
    m2 = copy.deepcopy(m)
    m2.config = copy.deepcopy(m.config)
    if dtype is not None:
        m2 = m2.to(dtype)
    return set_mode(m2, mode)


def rand_x(B, N, dim, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, dim, generator=g).to(dtype)


def rand_kpm(B, N, seed, p=0.25):
    g = torch.Generator().manual_seed(seed)
    kpm = torch.rand(B, N, generator=g) > p
    return kpm


def dead_row_kpm(layout, seed):
    """Random padding, plus: in batch row 1 every key of pattern `dead` is padded."""
    dim, heads, B, groups, pats, dead = LAYOUTS[layout]
    specs, patterns = specs_patterns(layout)
    spans, N = spans_of(specs)
    kpm = rand_kpm(B, N, seed)
    kpm[0] = True  # one unpadded row
    for kg in pats[dead][1]:
        s, e = spans[kg]
        kpm[1, s:e] = False
    # make sure every other pattern keeps at least one valid key in row 1 (the dead rows are exactly
    # those of pattern `dead`, and the test below checks that they are found)
    for i, (qs, kvs) in enumerate(pats):
        if i != dead and not any(set(kvs) & set(pats[dead][1])):
            s, e = spans[kvs[0]]
            kpm[1, s] = True
    return kpm


def rope_freqs(kind, B, N, D, seed):
    if kind == "cossin":
        return RotaryEmbedding(D).cos_sin(N)
    g = torch.Generator().manual_seed(seed)
    if kind == "angles":  # float32 values (exactly representable in both test dtypes)
        return torch.rand(N, D // 2, generator=g) * 6.0
    if kind == "batch_angles":
        return torch.rand(B, N, D // 2, generator=g).double() * 2 * math.pi
    raise AssertionError(kind)


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def assert_rel(a, b, rtol, name):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    err = rel_err(a, b)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}"


def run_module(m, x, specs, patterns, g_out, **kw):
    x = x.detach().clone().requires_grad_(True)
    out, cache = m(x, specs, patterns, **kw)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad((out * g_out).sum(), [x, *params.values()])
    return out.detach(), cache, dict(zip(["x", *params], grads))


def run_ref(m, x, specs, patterns, g_out, kpm=None, freqs=None):
    x = x.detach().clone().requires_grad_(True)
    out, k, v, allowed = ref_forward(m, x, specs, patterns, kpm=kpm, freqs=freqs)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad((out * g_out).sum(), [x, *params.values()])
    return out.detach(), k.detach(), v.detach(), allowed, dict(zip(["x", *params], grads))


# ---------------------------------------------------------------------------
# forward + backward against the re-implementation
# ---------------------------------------------------------------------------

# feature -> (config kwargs, padding, rope kind)
FEATURES = {
    "plain": ({}, None, None),
    "pad": ({}, "dead", None),
    "rope_cossin": ({"use_rope": True}, None, "cossin"),
    "rope_angles": ({"use_rope": True}, None, "angles"),
    "rope_batch_angles_pad": ({"use_rope": True}, "dead", "batch_angles"),
    "nobias_pad": ({"bias": False}, "dead", None),
    "qknorm": ({"qk_norm": True}, None, None),
    "qknorm_rope_pad": ({"qk_norm": True, "use_rope": True}, "dead", "cossin"),
}

def _reference_params():
    return [pytest.param(layout, feat, mode, dtype, id=f"{layout}-{feat}-{mode}-{dtype}")
            for layout in LAYOUTS for feat in FEATURES for mode in MODES for dtype in ("f64", "f32")]


_REF_CACHE: dict = {}


@pytest.mark.parametrize("layout,feat,mode,dtype", _reference_params())
def test_matches_reference_fwd_bwd(layout, feat, mode, dtype):
    dim, heads, B, _, _, dead = LAYOUTS[layout]
    cfg, pad, rope = FEATURES[feat]
    specs, patterns = specs_patterns(layout)
    spans, N = spans_of(specs)
    D = dim // heads
    dt = torch.float64 if dtype == "f64" else torch.float32
    seed = sum(map(ord, layout + feat))
    # parameters, inputs and angles are float32 values, so the float64 reference of the float32
    # test is the float64 test's reference: computed once per (layout, feature), shared by the modes
    m = make_module(dim, heads, mode, dt, seed=seed, **cfg)
    x = rand_x(B, N, dim, seed + 1, dt)
    g_out = rand_x(B, N, dim, seed + 2, dt)
    kpm = dead_row_kpm(layout, seed + 3) if pad else None
    freqs = rope_freqs(rope, B, N, D, seed + 4) if rope else None
    if rope == "angles":
        freqs = freqs.to(dt)  # raw angles in the input's precision

    calls = []
    orig_attend = m._attend

    def spy(q, k, v, mask=None, mask_mod=None):
        calls.append(mask_mod is not None)
        return orig_attend(q, k, v, mask=mask, mask_mod=mask_mod)

    m._attend = spy
    out, cache, grads = run_module(m, x, specs, patterns, g_out, key_padding_mask=kpm, freqs=freqs)
    key = (layout, feat)
    if key not in _REF_CACHE:
        m64 = clone_module(m, "seq", torch.float64)
        ref_freqs = freqs.double() if isinstance(freqs, torch.Tensor) else freqs
        _REF_CACHE[key] = run_ref(m64, x.double(), specs, patterns, g_out.double(), kpm, ref_freqs)
    r_out, r_k, r_v, allowed, r_grads = _REF_CACHE[key]

    # the intended path ran
    if mode == "fused":
        assert calls == [True], calls
    elif mode == "loop":
        assert calls == [False] * distinct_kv_sets(patterns), calls
    else:
        assert calls == [False] * len(patterns), calls

    assert out.dtype == dt and out.shape == (B, N, dim)
    fwd_tol, grad_tol = (F64_RTOL, F64_RTOL) if dt == torch.float64 else (F32_FWD_RTOL, F32_GRAD_RTOL)
    assert_rel(out, r_out, fwd_tol, "out")
    for name, r in r_grads.items():
        assert grads[name] is not None, f"no gradient for {name}"
        assert_rel(grads[name], r, grad_tol, f"grad {name}")

    # rows with no valid key: attention output 0 -> exactly proj.bias (0 without bias), never NaN
    dead_rows = ~allowed.any(-1)  # [B, N]
    if pad:
        want_dead = torch.zeros(B, N, dtype=torch.bool)
        for qg in LAYOUTS[layout][4][dead][0]:
            s, e = spans[qg]
            want_dead[1, s:e] = True
        assert (dead_rows & want_dead).equal(want_dead)
    if dead_rows.any():
        bias = m.proj.bias.detach() if m.proj.bias is not None else torch.zeros(dim, dtype=dt)
        assert torch.equal(out[dead_rows], bias.expand(int(dead_rows.sum()), dim)), \
            "query rows whose keys are all padded must output exactly proj.bias"

    # new_kv_cache: k/v (after norm and RoPE) of every input group used as keys/values
    used = {g for p in patterns for g in p.key_value_tokens}
    assert cache is not None and set(cache) == used
    for g in used:
        s, e = spans[g]
        assert cache[g]["k"].shape == (B, heads, e - s, D)
        assert_rel(cache[g]["k"].detach(), r_k[:, :, s:e], fwd_tol, f"cache k {g}")
        assert_rel(cache[g]["v"].detach(), r_v[:, :, s:e], fwd_tol, f"cache v {g}")


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("mode", MODES)
def test_other_backends(backend, mode):
    layout = "many"
    dim, heads, B, _, _, _ = LAYOUTS[layout]
    specs, patterns = specs_patterns(layout)
    _, N = spans_of(specs)
    m = make_module(dim, heads, mode, torch.float64, seed=11, use_rope=True, backend=backend)
    x, g_out = rand_x(B, N, dim, 12), rand_x(B, N, dim, 13)
    kpm = dead_row_kpm(layout, 14)
    freqs = RotaryEmbedding(dim // heads).cos_sin(N)
    out, _, grads = run_module(m, x, specs, patterns, g_out, key_padding_mask=kpm, freqs=freqs)
    r_out, _, _, _, r_grads = run_ref(m, x, specs, patterns, g_out, kpm, freqs)
    assert_rel(out, r_out, F64_RTOL, "out")
    for name, r in r_grads.items():
        assert_rel(grads[name], r, F64_RTOL, f"grad {name}")


# ---------------------------------------------------------------------------
# random layouts (hypothesis)
# ---------------------------------------------------------------------------


@st.composite
def random_layouts(draw):
    n = draw(st.integers(2, 6))
    names = [f"t{i}" for i in range(n)]
    sizes = [draw(st.integers(1, 17)) for _ in range(n)]
    # partition the groups into query sets (shuffled), each with a non-empty random kv list
    order = draw(st.permutations(names))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=n - 1)))
    parts = [order[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
    pats = []
    for qs in parts:
        kv = draw(st.lists(st.sampled_from(names), min_size=1, max_size=n, unique=True))
        if draw(st.booleans()) and pats:  # reuse a previous kv set: patterns that get merged
            kv = list(pats[draw(st.integers(0, len(pats) - 1))][1])
        pats.append((list(qs), kv))
    B = draw(st.integers(1, 3))
    pad = draw(st.booleans())
    seed = draw(st.integers(0, 10_000))
    return names, sizes, pats, B, pad, seed


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_layouts())
def test_random_layouts_all_forms_match_reference(lay):
    names, sizes, pats, B, pad, seed = lay
    specs = [TokenSpec(n, s) for n, s in zip(names, sizes)]
    patterns = [AttentionPattern(q, kv) for q, kv in pats]
    N = sum(sizes)
    dim, heads = 16, 2
    x, g_out = rand_x(B, N, dim, seed), rand_x(B, N, dim, seed + 1)
    kpm = rand_kpm(B, N, seed + 2, p=0.4) if pad else None
    base = make_module(dim, heads, "seq", torch.float64, seed=seed % 97, use_rope=True)
    freqs = rope_freqs("batch_angles", B, N, dim // heads, seed + 3)
    r_out, _, _, allowed, r_grads = run_ref(base, x, specs, patterns, g_out, kpm, freqs)
    for mode in MODES:
        m = clone_module(base, mode)
        out, cache, grads = run_module(m, x, specs, patterns, g_out, key_padding_mask=kpm, freqs=freqs)
        assert_rel(out, r_out, F64_RTOL, f"{mode} out")
        for name, r in r_grads.items():
            assert_rel(grads[name], r, F64_RTOL, f"{mode} grad {name}")
        dead = ~allowed.any(-1)
        assert torch.equal(out[dead], m.proj.bias.detach().expand(int(dead.sum()), dim))
        assert set(cache) == {g for _, kv in pats for g in kv}


# ---------------------------------------------------------------------------
# parallel == sequential in float32
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("feat", ["plain", "pad", "qknorm_rope_pad", "rope_batch_angles_pad"])
@pytest.mark.parametrize("mode", ["loop", "fused"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_equals_sequential_float32(layout, mode, feat):
    dim, heads, B, _, _, _ = LAYOUTS[layout]
    cfg, pad, rope = FEATURES[feat]
    specs, patterns = specs_patterns(layout)
    _, N = spans_of(specs)
    seq = make_module(dim, heads, "seq", torch.float32, seed=21, **cfg)
    par = clone_module(seq, mode)
    assert par.config.parallel and not seq.config.parallel
    x, g_out = rand_x(B, N, dim, 22, torch.float32), rand_x(B, N, dim, 23, torch.float32)
    kpm = dead_row_kpm(layout, 24) if pad else None
    freqs = rope_freqs(rope, B, N, dim // heads, 25) if rope else None
    o_s, c_s, g_s = run_module(seq, x, specs, patterns, g_out, key_padding_mask=kpm, freqs=freqs)
    o_p, c_p, g_p = run_module(par, x, specs, patterns, g_out, key_padding_mask=kpm, freqs=freqs)
    assert o_p.dtype == torch.float32
    assert_rel(o_p, o_s, F32_SELF_RTOL, "out")
    torch.testing.assert_close(o_p, o_s, rtol=1e-5, atol=1e-5)
    for name in g_s:
        assert_rel(g_p[name], g_s[name], F32_SELF_GRAD_RTOL, f"grad {name}")
    assert set(c_p) == set(c_s)
    for g in c_s:
        torch.testing.assert_close(c_p[g]["k"], c_s[g]["k"], rtol=0, atol=0)  # same projection code
        torch.testing.assert_close(c_p[g]["v"], c_s[g]["v"], rtol=0, atol=0)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_attention_call_count_per_form(layout):
    """seq: one call per pattern; loop: one per distinct key/value set (merged); fused: one."""
    dim, heads, B, _, _, _ = LAYOUTS[layout]
    specs, patterns = specs_patterns(layout)
    _, N = spans_of(specs)
    want = {"seq": len(patterns), "loop": distinct_kv_sets(patterns), "fused": 1}
    if layout == "many":
        assert want == {"seq": 6, "loop": 4, "fused": 1}
    x = rand_x(B, N, dim, 1)
    for mode in MODES:
        m = make_module(dim, heads, mode)
        n = []
        orig = m._attend
        m._attend = lambda *a, **k: (n.append(1), orig(*a, **k))[1]
        m(x, specs, patterns)
        assert len(n) == want[mode], (mode, len(n))


# ---------------------------------------------------------------------------
# locality
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["ref", "many", "uneven"])
def test_group_output_ignores_groups_it_cannot_see(layout, mode):
    dim, heads, B, _, _, _ = LAYOUTS[layout]
    specs, patterns = specs_patterns(layout)
    spans, N = spans_of(specs)
    m = make_module(dim, heads, mode, seed=31, use_rope=True)
    freqs = RotaryEmbedding(dim // heads).cos_sin(N)
    x = rand_x(B, N, dim, 32)
    out, _ = m(x, specs, patterns, freqs=freqs)
    checked = 0
    for p in patterns:
        for qg in p.query_tokens:
            hidden = [g for g in spans if g not in p.key_value_tokens and g != qg]
            if not hidden:
                continue
            x2 = x.clone()
            for g in hidden:
                s, e = spans[g]
                x2[:, s:e] = torch.randn(B, e - s, dim, dtype=x.dtype) * 3
            out2, _ = m(x2, specs, patterns, freqs=freqs)
            s, e = spans[qg]
            torch.testing.assert_close(out2[:, s:e], out[:, s:e], rtol=1e-12, atol=1e-12,
                                       msg=lambda msg: f"{qg} changed when {hidden} changed: {msg}")
            assert not torch.allclose(out2, out), "the perturbation changed nothing at all"
            # gradient view: d out[qg] / d x[hidden] is exactly 0
            xg = x.clone().requires_grad_(True)
            o, _ = m(xg, specs, patterns, freqs=freqs)
            (gx,) = torch.autograd.grad((o[:, s:e] * torch.randn_like(o[:, s:e])).sum(), xg)
            for g in hidden:
                hs, he = spans[g]
                assert torch.all(gx[:, hs:he] == 0), f"gradient leaked from {qg} to {g}"
            vis = [g for g in p.key_value_tokens if g != qg]
            if vis:
                vs, ve = spans[vis[0]]
                assert gx[:, vs:ve].abs().sum() > 0, f"{qg} gets no gradient into its key group {vis[0]}"
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_padded_tokens_do_not_affect_other_outputs(layout, mode):
    dim, heads, B, _, _, _ = LAYOUTS[layout]
    specs, patterns = specs_patterns(layout)
    _, N = spans_of(specs)
    m = make_module(dim, heads, mode, seed=41, qk_norm=True)
    x = rand_x(B, N, dim, 42)
    kpm = rand_kpm(B, N, 43, p=0.3)
    kpm[0, :] = True
    kpm[-1, 0] = False
    out, _ = m(x, specs, patterns, key_padding_mask=kpm)
    x2 = x.clone()
    x2[~kpm] = torch.randn(int((~kpm).sum()), dim, dtype=x.dtype) * 5
    out2, _ = m(x2, specs, patterns, key_padding_mask=kpm)
    torch.testing.assert_close(out2[kpm], out[kpm], rtol=1e-12, atol=1e-12)
    # the padded tokens' own rows (their queries changed) did change: the perturbation was real
    assert not torch.allclose(out2[~kpm], out[~kpm])
    # without the mask the same perturbation is seen by the real tokens
    o3, _ = m(x, specs, patterns)
    o4, _ = m(x2, specs, patterns)
    assert not torch.allclose(o4[kpm], o3[kpm])


# ---------------------------------------------------------------------------
# KV cache round trip
# ---------------------------------------------------------------------------


def _roundtrip_case(kind):
    """(full specs, full patterns, cached specs, cached patterns, query groups, cached groups)."""
    if kind == "anchors":
        full = [TokenSpec("sa", 100), TokenSpec("sq", 50), TokenSpec("va", 80), TokenSpec("vq", 60)]
        fpat = [AttentionPattern(["sa", "sq"], ["sa"]), AttentionPattern(["va", "vq"], ["va"])]
        cached = [TokenSpec("sa", None), TokenSpec("sq", 50), TokenSpec("va", None), TokenSpec("vq", 60)]
        cpat = [AttentionPattern(["sq"], ["sa"]), AttentionPattern(["vq"], ["va"])]
        return full, fpat, cached, cpat, ["sq", "vq"]
    if kind == "mixed_kv":
        # queries attend to cached anchors AND to themselves; two query groups share one kv set
        full = [TokenSpec("a", 37), TokenSpec("q1", 20), TokenSpec("b", 11), TokenSpec("q2", 9)]
        fpat = [AttentionPattern(["a", "b"], ["a", "b"]), AttentionPattern(["q1"], ["b", "a", "q1"]),
                AttentionPattern(["q2"], ["a"])]
        cached = [TokenSpec("a", None), TokenSpec("q1", 20), TokenSpec("b", None), TokenSpec("q2", 9)]
        cpat = [AttentionPattern(["q1"], ["b", "a", "q1"]), AttentionPattern(["q2"], ["a"])]
        return full, fpat, cached, cpat, ["q1", "q2"]
    raise AssertionError(kind)


@pytest.mark.parametrize("pad_anchors", [False, True], ids=["real_anchors", "padded_anchors"])
@pytest.mark.parametrize("feat", ["plain", "rope_qknorm"])
@pytest.mark.parametrize("kind", ["anchors", "mixed_kv"])
@pytest.mark.parametrize("mode", MODES)
def test_kv_cache_round_trip(mode, kind, feat, pad_anchors):
    """A call on the cache gives the queries what the full call gave them. Padded anchors: the cache
    carries their mask, so they stay unattended (they were attended before the cache had one)."""
    dim, heads, B = 32, 4, 2
    D = dim // heads
    cfg = {"use_rope": True, "qk_norm": True} if feat == "rope_qknorm" else {}
    full, fpat, cached, cpat, qgroups = _roundtrip_case(kind)
    spans, N = spans_of(full)
    m = make_module(dim, heads, mode, seed=51, **cfg)
    x = rand_x(B, N, dim, 52)
    freqs = RotaryEmbedding(D).cos_sin(N) if cfg else None
    # padding on query tokens, and on the anchors too with pad_anchors
    kpm = torch.ones(B, N, dtype=torch.bool)
    kpm_q = rand_kpm(B, N, 53, p=0.3)
    for g in spans if pad_anchors else qgroups:
        s, e = spans[g]
        kpm[:, s:e] = kpm_q[:, s:e]
    out, cache = m(x, full, fpat, key_padding_mask=kpm, freqs=freqs)
    assert cache is not None
    used = {g for p in fpat for g in p.key_value_tokens}
    assert set(cache) == used
    assert all(torch.equal(cache[g]["mask"], kpm[:, slice(*spans[g])]) for g in used)

    idx = torch.cat([torch.arange(*spans[g]) for g in qgroups])
    xq = x[:, idx]
    fq = (freqs[0][idx], freqs[1][idx]) if freqs is not None else None
    out_q, new = m(xq, cached, cpat, key_padding_mask=kpm[:, idx], freqs=fq, kv_cache=cache)
    assert new is None, "new_kv_cache must be None when cached groups were read"
    assert out_q.shape == (B, len(idx), dim)
    torch.testing.assert_close(out_q, out[:, idx], rtol=1e-10, atol=1e-12)

    # the cache really is used: a different cache gives different outputs
    other = {g: {"k": c["k"] + 0.5, "v": c["v"] * -1.0} for g, c in cache.items()}
    out_o, _ = m(xq, cached, cpat, key_padding_mask=kpm[:, idx], freqs=fq, kv_cache=other)
    assert not torch.allclose(out_o, out_q)

    # and the round trip also agrees with the re-implementation (float64)
    if not cfg.get("qk_norm"):
        r_out, _, _, _ = ref_forward(m, x, full, fpat, kpm=kpm, freqs=freqs)
        torch.testing.assert_close(out_q, r_out[:, idx], rtol=1e-10, atol=1e-12)


def test_kv_cache_dtype_is_converted():
    """A float32 cache read by a float64 call is used in the call's dtype (same result to fp32 rounding)."""
    full, fpat, cached, cpat, qgroups = _roundtrip_case("anchors")
    spans, N = spans_of(full)
    m = make_module(32, 4, "loop", seed=55)
    x = rand_x(2, N, 32, 56)
    out, cache = m(x, full, fpat)
    idx = torch.cat([torch.arange(*spans[g]) for g in qgroups])
    c32 = {g: {"k": c["k"].float(), "v": c["v"].float()} for g, c in cache.items()}
    out_q, _ = m(x[:, idx], cached, cpat, kv_cache=c32)
    assert out_q.dtype == torch.float64
    torch.testing.assert_close(out_q, out[:, idx], rtol=1e-5, atol=1e-6)


def _cache_setup():
    full, fpat, cached, cpat, qgroups = _roundtrip_case("anchors")
    spans, N = spans_of(full)
    m = make_module(32, 4, "loop", seed=61)
    x = rand_x(2, N, 32, 62)
    _, cache = m(x, full, fpat)
    idx = torch.cat([torch.arange(*spans[g]) for g in qgroups])
    return m, x[:, idx], cached, cpat, cache


CACHE_BREAKERS = {
    "wrong_batch": lambda c: {**c, "va": {"k": c["va"]["k"][:1], "v": c["va"]["v"][:1]}},
    "wrong_heads": lambda c: {**c, "va": {"k": c["va"]["k"][:, :2], "v": c["va"]["v"][:, :2]}},
    "wrong_head_dim": lambda c: {**c, "va": {"k": c["va"]["k"][..., :4], "v": c["va"]["v"][..., :4]}},
    "k_v_mismatch": lambda c: {**c, "va": {"k": c["va"]["k"], "v": c["va"]["v"][:, :, :5]}},
    "three_dims": lambda c: {**c, "va": {"k": c["va"]["k"][0], "v": c["va"]["v"][0]}},
    "missing_group": lambda c: {"sa": c["sa"]},
    "missing_v": lambda c: {**c, "va": {"k": c["va"]["k"]}},
    "mask_not_bool": lambda c: {**c, "va": {**c["va"], "mask": torch.ones(2, c["va"]["k"].shape[2])}},
    "mask_wrong_size": lambda c: {**c, "va": {**c["va"], "mask": torch.ones(2, 3, dtype=torch.bool)}},
}


@pytest.mark.parametrize("breaker", list(CACHE_BREAKERS))
def test_bad_kv_cache_raises_naming_group(breaker):
    m, xq, cached, cpat, cache = _cache_setup()
    m(xq, cached, cpat, kv_cache=cache)  # the unbroken cache works
    with pytest.raises(ValueError) as ei:
        m(xq, cached, cpat, kv_cache=CACHE_BREAKERS[breaker](cache))
    assert "'va'" in str(ei.value), str(ei.value)
    assert "kv_cache" in str(ei.value), str(ei.value)


def _cache_call(breaker):
    m, xq, cached, cpat, cache = _cache_setup()
    return m(xq, cached, cpat, kv_cache=breaker(cache))


def test_missing_kv_cache_for_size_none_group():
    m, xq, cached, cpat, cache = _cache_setup()
    with pytest.raises(ValueError) as ei:
        m(xq, cached, cpat)
    msg = str(ei.value)
    assert "'sa'" in msg and "'va'" in msg and "kv_cache" in msg and "size=None" in msg, msg


# ---------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------

REF_SPECS = [TokenSpec("sa", 10), TokenSpec("sq", 5), TokenSpec("va", 8), TokenSpec("vq", 6)]
REF_PATS = [AttentionPattern(["sa", "sq"], ["sa"]), AttentionPattern(["va", "vq"], ["va"])]
N_REF = 29


def _call(specs=REF_SPECS, pats=REF_PATS, n=N_REF, B=2, **kw):
    rope = kw.pop("rope", False)
    m = make_module(32, 4, "loop", use_rope=rope)
    x = rand_x(B, n, 32, 71)
    return m(x, specs, pats, **kw)


BAD_INPUTS = {
    "never_a_query": (lambda: _call(pats=[AttentionPattern(["sa", "sq", "va"], ["sa"])]),
                      ["'vq'", "never a query"]),
    "query_in_two_patterns": (lambda: _call(pats=[*REF_PATS, AttentionPattern(["sq"], ["va"])]),
                              ["'sq'", "patterns 0 and 2"]),
    "query_twice_in_one_pattern": (lambda: _call(pats=[AttentionPattern(["sa", "sq", "sa"], ["sa"]),
                                                       REF_PATS[1]]),
                                   ["'sa'", "more than once"]),
    "key_twice_in_one_pattern": (lambda: _call(pats=[AttentionPattern(["sa", "sq"], ["sa", "sa"]), REF_PATS[1]]),
                                 ["key_value_tokens", "'sa'", "more than once"]),
    "unknown_query": (lambda: _call(pats=[*REF_PATS, AttentionPattern(["zz"], ["sa"])]),
                      ["'zz'", "not in token_specs"]),
    "unknown_key": (lambda: _call(pats=[REF_PATS[0], AttentionPattern(["va", "vq"], ["va", "nope"])]),
                    ["'nope'", "not in token_specs"]),
    "sizes_do_not_sum_to_n": (lambda: _call(n=N_REF + 1), ["sum to 29", "30 tokens", "'sa'"]),
    "sizes_too_big": (lambda: _call(n=N_REF - 3), ["sum to 29", "26 tokens"]),
    "duplicated_name": (lambda: _call(specs=[*REF_SPECS, TokenSpec("sq", 3)], n=N_REF + 3),
                        ["'sq'", "2 times"]),
    "cached_group_as_query": (lambda: _call(specs=[TokenSpec("sa", None), *REF_SPECS[1:]], n=N_REF - 10),
                              ["'sa'", "cannot be a query"]),
    "missing_kv_cache": (lambda: _call(specs=[TokenSpec("sa", None), *REF_SPECS[1:]], n=N_REF - 10,
                                       pats=[AttentionPattern(["sq"], ["sa"]), REF_PATS[1]]),
                         ["'sa'", "kv_cache"]),
    "kpm_wrong_shape": (lambda: _call(key_padding_mask=torch.ones(2, N_REF + 1, dtype=torch.bool)),
                        ["key_padding_mask", "[2, 29]"]),
    "kpm_1d": (lambda: _call(key_padding_mask=torch.ones(N_REF, dtype=torch.bool)), ["key_padding_mask"]),
    "kpm_wrong_batch": (lambda: _call(key_padding_mask=torch.ones(1, N_REF, dtype=torch.bool)),
                        ["key_padding_mask"]),
    "rope_without_freqs": (lambda: _call(rope=True), ["freqs"]),
    "freqs_wrong_n": (lambda: _call(rope=True, freqs=torch.rand(N_REF + 1, 4)), ["freqs", "got [30, 4]"]),
    "freqs_wrong_half_dim": (lambda: _call(rope=True, freqs=torch.rand(N_REF, 3)), ["freqs", "got [29, 3]"]),
    "cossin_wrong_n": (lambda: _call(rope=True, freqs=RotaryEmbedding(8).cos_sin(N_REF - 1)), ["freqs", "[28, 4]"]),
    "freqs_1d": (lambda: _call(rope=True, freqs=torch.rand(4)), ["freqs"]),
    "freqs_wrong_batch": (lambda: _call(rope=True, freqs=torch.rand(3, N_REF, 4)), ["freqs", "[3, 29, 4]"]),
    "cossin_shapes_differ": (lambda: _call(rope=True, freqs=(torch.rand(N_REF, 4), torch.rand(N_REF - 1, 4))),
                             ["freqs", "[28, 4]"]),
    "x_2d": (lambda: make_module(32, 4)(rand_x(1, N_REF, 32, 0)[0], REF_SPECS, REF_PATS), ["x", "dim=32"]),
    "x_wrong_dim": (lambda: make_module(32, 4)(rand_x(2, N_REF, 16, 0), REF_SPECS, REF_PATS), ["dim=32"]),
}

def _bad_params():
    return [pytest.param(fn, words, id=name) for name, (fn, words) in BAD_INPUTS.items()]


@pytest.mark.parametrize("fn,words", _bad_params())
def test_bad_input_raises_value_error_naming_why(fn, words):
    with pytest.raises(ValueError) as ei:
        fn()
    msg = str(ei.value)
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"


def test_good_call_of_bad_input_table_works():
    """The base call that every bad input perturbs is itself valid (so the table tests what it says)."""
    out, cache = _call()
    assert out.shape == (2, N_REF, 32) and set(cache) == {"sa", "va"}
    out, _ = _call(rope=True, freqs=torch.rand(N_REF, 4))
    out, _ = _call(rope=True, freqs=torch.rand(2, N_REF, 4))
    out, _ = _call(rope=True, freqs=RotaryEmbedding(8).cos_sin(N_REF))
    out, _ = _call(key_padding_mask=torch.ones(2, N_REF, dtype=torch.bool))


@pytest.mark.parametrize("kw,words", [
    (dict(dim=30, num_heads=4), ["dim (30)", "num_heads (4)"]),
    (dict(dim=0, num_heads=1), ["dim"]),
    (dict(dim=32, num_heads=0), ["num_heads"]),
    (dict(dim=32.0, num_heads=4), ["dim"]),
    (dict(dim=32, num_heads=4, init_weights="kaiming"), ["init_weights", "kaiming"]),
    (dict(dim=32, num_heads=4, dropout=1.0), ["dropout"]),
    (dict(dim=32, num_heads=4, dropout=-0.1), ["dropout"]),
    (dict(dim=32, num_heads=4, dropout=float("nan")), ["dropout"]),
    (dict(dim=32, num_heads=4, dropout="0.1"), ["dropout"]),
    (dict(dim=32, num_heads=4, dropout=True), ["dropout"]),
    (dict(dim=36, num_heads=4, use_rope=True), ["even head dim", "9"]),
], ids=["not_divisible", "dim0", "heads0", "dim_float", "init", "dropout1", "dropout_neg", "dropout_nan",
        "dropout_str", "dropout_bool", "odd_head_dim_rope"])
def test_config_validation(kw, words):
    with pytest.raises(ValueError) as ei:
        MixedAttentionConfig(**kw)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_config_valid_edge_values():
    MixedAttentionConfig(dim=36, num_heads=4)  # odd head dim is fine without RoPE
    MixedAttentionConfig(dim=32, num_heads=4, dropout=0.99)
    MixedAttentionConfig(dim=32, num_heads=4, dropout=0)
    with pytest.raises(TypeError):
        MixedAttention(dict(dim=32, num_heads=4))


@pytest.mark.parametrize("make,words", [
    (lambda: TokenSpec("", 3), ["name"]),
    (lambda: TokenSpec("a", -1), ["'a'", "size"]),
    (lambda: TokenSpec("a", 2.0), ["'a'", "size"]),
    (lambda: TokenSpec("a", True), ["'a'", "size"]),
    (lambda: AttentionPattern([], ["a"]), ["query_tokens"]),
    (lambda: AttentionPattern(["a"], []), ["key_value_tokens"]),
    (lambda: AttentionPattern(["a"], ["a", 3]), ["key_value_tokens"]),
], ids=["empty_name", "neg_size", "float_size", "bool_size", "no_queries", "no_keys", "non_str_key"])
def test_spec_and_pattern_validation(make, words):
    with pytest.raises(ValueError) as ei:
        make()
    for w in words:
        assert w in str(ei.value), str(ei.value)


@pytest.mark.parametrize("make,words", [
    (lambda: AttentionPattern("a", ["a"]), ["query_tokens", "str"]),
    (lambda: AttentionPattern(["a"], None), ["key_value_tokens", "NoneType"]),
    (lambda: MixedAttentionConfig(dim=32, num_heads=4, bias="False"), ["bias", "str"]),
    (lambda: MixedAttentionConfig(dim=32, num_heads=4, parallel="no"), ["parallel"]),
    (lambda: MixedAttentionConfig(dim=32, num_heads=4, use_rope=1), ["use_rope"]),
    (lambda: MixedAttentionConfig(dim=32, num_heads=4, qk_norm=None), ["qk_norm"]),
    (lambda: _call(specs=[("sa", 10), *REF_SPECS[1:]]), ["token_specs", "TokenSpec", "tuple"]),
    (lambda: _call(pats=[["sa", "sq"], REF_PATS[1]]), ["attention_patterns", "AttentionPattern", "list"]),
    (lambda: _call(specs=(s for s in REF_SPECS)), ["token_specs", "generator"]),
    (lambda: _call(key_padding_mask=torch.ones(2, N_REF)), ["key_padding_mask", "bool", "float32"]),
    (lambda: _call(key_padding_mask=torch.ones(2, N_REF, dtype=torch.int64)), ["key_padding_mask", "bool"]),
    (lambda: _call(key_padding_mask=[[True] * N_REF] * 2), ["key_padding_mask", "torch.Tensor", "list"]),
    (lambda: make_module(32, 4)([[0.0] * 32] * N_REF, REF_SPECS, REF_PATS), ["x", "torch.Tensor", "list"]),
    (lambda: _cache_call(lambda c: [c["sa"], c["va"]]), ["kv_cache", "dict", "list"]),
    (lambda: _cache_call(lambda c: {**c, "va": {"k": c["va"]["k"].tolist(), "v": c["va"]["v"]}}),
     ["kv_cache['va']['k']", "torch.Tensor", "list"]),
], ids=["str_queries", "none_keys", "bias_str", "parallel_str", "use_rope_int", "qk_norm_none", "spec_tuple",
        "pattern_list", "specs_generator", "kpm_float", "kpm_int", "kpm_list", "x_list", "kv_cache_list",
        "kv_cache_k_list"])
def test_type_errors_name_the_argument(make, words):
    with pytest.raises(TypeError) as ei:
        make()
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_layout_memo_is_bounded():
    """What calls derive from a layout lives on it, so it is evicted with it: inputs of ever new
    lengths (point clouds) keep at most 16 layouts."""
    m = make_module(16, 2, "loop")
    for n in range(1, 40):
        specs = [TokenSpec("a", n), TokenSpec("b", 1)]
        m(rand_x(1, n + 1, 16, n), specs, [AttentionPattern(["a", "b"], ["a"])])
    assert len(m._layouts) == 16


@pytest.mark.parametrize("mode", MODES)
def test_layout_memo_is_keyed_by_length(mode):
    """The checked layout is remembered per (specs, patterns, N): a module that served N tokens must
    still refuse the same specs and patterns with another N (the sizes fix N), not reuse the layout
    checked for the first call (it filled the extra tokens with garbage or dropped some)."""
    m = make_module(32, 4, mode, seed=73)
    x = rand_x(2, N_REF, 32, 74)
    want, _ = m(x, REF_SPECS, REF_PATS)
    for n in (N_REF + 1, N_REF - 3):
        with pytest.raises(ValueError, match=f"sum to {N_REF}, but x has {n} tokens"):
            m(rand_x(2, n, 32, 75), REF_SPECS, REF_PATS)
    got, _ = m(x, REF_SPECS, REF_PATS)  # and the right length still works, as before
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("first", ["cpu", "other"])
def test_fused_decision_is_remembered_per_device_type(first):
    """`_fused_pays` is remembered on the layout per device type: a layout first seen on one device
    must be decided again on another (the loop always runs on the CPU; on CUDA the fused launch may
    pay). CPU-only: the other device is "meta", for which a stub `_fused_pays` says True."""
    dim, heads, B, _, _, _ = LAYOUTS["many"]
    specs, patterns = specs_patterns("many")
    _, N = spans_of(specs)
    m = make_module(dim, heads, "loop", seed=76)
    asked = []
    m._fused_pays = lambda lay, x: (asked.append(x.device.type), x.device.type == "meta")[1]
    calls = []
    orig_attend = m._attend
    m._attend = lambda q, k, v, mask=None, mask_mod=None: (calls.append(mask_mod is not None),
                                                           orig_attend(q, k, v, mask=mask, mask_mod=mask_mod))[1]
    x = rand_x(B, N, dim, 77)
    lay = m._layout(specs, patterns, N)  # the layout forward() uses (the same object, remembered)
    other = torch.empty(B, N, dim, dtype=x.dtype, device="meta")
    for _ in range(2):  # the second round is answered from the memo
        if first == "other":
            assert m._fused_decision(lay, other) is True
        m(x, specs, patterns)
        assert calls == [False] * distinct_kv_sets(patterns), calls  # the CPU ran the loop
        calls.clear()
        assert m._fused_decision(lay, other) is True
        assert m._layout(specs, patterns, N) is lay
        assert sorted(asked) == ["cpu", "meta"], asked  # once per device type


# ---------------------------------------------------------------------------
# size-0 groups
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_size_zero_group(mode):
    """A pattern whose only key group is empty gives rows with no key (-> proj.bias); an empty query
    group is allowed; everything else is as in the reference."""
    specs = [TokenSpec("a", 10), TokenSpec("e", 0), TokenSpec("b", 5)]
    pats = [AttentionPattern(["a"], ["a", "e"]), AttentionPattern(["b"], ["e"]), AttentionPattern(["e"], ["b"])]
    m = make_module(32, 4, mode)
    x, g_out = rand_x(2, 15, 32, 81), rand_x(2, 15, 32, 82)
    out, cache, grads = run_module(m, x, specs, pats, g_out)
    r_out, _, _, _, r_grads = run_ref(m, x, specs, pats, g_out)
    assert_rel(out, r_out, F64_RTOL, "out")
    assert torch.equal(out[:, 10:], m.proj.bias.detach().expand(2, 5, 32))
    for name, r in r_grads.items():
        assert_rel(grads[name], r, F64_RTOL, f"grad {name}")
    assert cache["e"]["k"].shape == (2, 4, 0, 8)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("one_pattern", [True, False])
def test_size_zero_query_group_listed_first(mode, one_pattern):
    """An empty query group before the others of its pattern: its (empty) write into the output came
    first and autograd's in-place check then refused the full write after it (one pattern over all of x)."""
    if one_pattern:
        specs, pats = [TokenSpec("a", 11), TokenSpec("e", 0)], [AttentionPattern(["e", "a"], ["a"])]
    else:
        specs = [TokenSpec("a", 7), TokenSpec("e", 0), TokenSpec("b", 4)]
        pats = [AttentionPattern(["e", "a"], ["a", "b"]), AttentionPattern(["b"], ["a"])]
    m = make_module(32, 4, mode)
    x, g_out = rand_x(2, 11, 32, 83), rand_x(2, 11, 32, 84)
    out, _, grads = run_module(m, x, specs, pats, g_out)
    r_out, _, _, _, r_grads = run_ref(m, x, specs, pats, g_out)
    assert_rel(out, r_out, F64_RTOL, "out")
    for name, r in r_grads.items():
        assert_rel(grads[name], r, F64_RTOL, f"grad {name}")


def test_qk_norm_under_autocast_keeps_q_k_v_in_one_dtype():
    """A float32 module under bf16 autocast: the q/k norm's float32 weight must not promote q and k
    past v (the contract refuses mixed dtypes); the result follows the float32 module's."""
    specs, pats = REF_SPECS, REF_PATS
    m = MixedAttention(MixedAttentionConfig(dim=32, num_heads=4, qk_norm=True, backend="chunked"))
    with torch.no_grad():
        for p in (m.q_norm, m.k_norm):
            p.copy_(torch.rand_like(p) + 0.5)  # not ones, so that a dropped weight shows
    x = torch.randn(2, N_REF, 32, generator=torch.Generator().manual_seed(85))
    want, _ = m(x, specs, pats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = m(x, specs, pats)
    assert got.dtype == torch.bfloat16
    err = ((got.float() - want).norm() / want.norm()).item()
    assert err < 3e-2, err  # bf16 projections and attention: ~1e-2 relative


# ---------------------------------------------------------------------------
# init and dropout
# ---------------------------------------------------------------------------


def test_init_weights_options_construct_and_differ():
    dim = 64
    mods = {}
    for how in ("truncnormal", "xavier", "torch"):
        torch.manual_seed(0)
        mods[how] = MixedAttention(MixedAttentionConfig(dim=dim, num_heads=4, init_weights=how))
    t, xv, tc = mods["truncnormal"], mods["xavier"], mods["torch"]
    # truncnormal: std 0.02, zero biases
    for lin in (t.qkv, t.proj):
        assert abs(lin.weight.std().item() - 0.02) < 0.002
        assert torch.all(lin.bias == 0)
    # xavier uniform: within +-sqrt(6 / (fan_in + fan_out)), std = bound / sqrt(3), zero biases
    for lin in (xv.qkv, xv.proj):
        fo, fi = lin.weight.shape
        bound = math.sqrt(6.0 / (fi + fo))
        assert lin.weight.abs().max().item() <= bound
        assert abs(lin.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
        assert torch.all(lin.bias == 0)
    # torch default (kaiming uniform a=sqrt(5)): within +-1/sqrt(fan_in), non-zero biases
    for lin in (tc.qkv, tc.proj):
        bound = 1.0 / math.sqrt(lin.weight.shape[1])
        assert lin.weight.abs().max().item() <= bound
        assert abs(lin.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
        assert not torch.all(lin.bias == 0)
    names = list(mods)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(mods[names[i]].qkv.weight, mods[names[j]].qkv.weight)
    specs, pats = specs_patterns("ref")
    x = rand_x(1, 290, dim, 3, torch.float32)
    outs = {h: mods[h](x, specs, pats)[0] for h in names}
    assert not torch.allclose(outs["truncnormal"], outs["xavier"])
    assert not torch.allclose(outs["xavier"], outs["torch"])
    q = MixedAttention(MixedAttentionConfig(dim=dim, num_heads=4, qk_norm=True, init_weights="xavier"))
    assert q.q_norm.shape == (16,) and torch.all(q.q_norm == 1) and torch.all(q.k_norm == 1)
    assert t.q_norm is None and "q_norm" not in dict(t.named_parameters())
    nb = MixedAttention(MixedAttentionConfig(dim=dim, num_heads=4, bias=False))
    assert nb.qkv.bias is None and nb.proj.bias is None


@pytest.mark.parametrize("mode", MODES)
def test_dropout_train_vs_eval(mode):
    specs, pats = specs_patterns("ref")
    m = make_module(32, 4, mode, torch.float32, seed=91, dropout=0.4)
    nodrop = clone_module(m, mode)
    nodrop.config.dropout = 0.0
    x = rand_x(1, 290, 32, 92, torch.float32)
    m.train()
    with torch.no_grad():
        a, _ = m(x, specs, pats)
        b, _ = m(x, specs, pats)
        ref, _ = nodrop.train()(x, specs, pats)
    assert not torch.allclose(a, b), "dropout > 0 in train mode must change outputs between calls"
    assert not torch.allclose(a, ref)
    assert torch.isfinite(a).all()
    m.eval()
    c, _ = m(x, specs, pats)
    d, _ = m(x, specs, pats)
    assert torch.equal(c, d), "eval mode must be deterministic"
    torch.testing.assert_close(c, ref, rtol=0, atol=0)


def test_dropout_is_unbiased():
    """The mean over many training passes approaches the eval output (inverted dropout scaling)."""
    dim, heads, B, _, _, _ = LAYOUTS["many"]
    specs, pats = specs_patterns("many")
    m = make_module(dim, heads, "loop", torch.float32, seed=93, dropout=0.3)
    x = rand_x(1, 41, dim, 94, torch.float32)
    ev, _ = m.eval()(x, specs, pats)
    m.train()
    with torch.no_grad():
        samples = torch.stack([m(x, specs, pats)[0] for _ in range(48)])
    one = sum(rel_err(s, ev) for s in samples) / len(samples)  # a single pass: ~ev + noise
    assert one > 1e-2
    assert rel_err(samples.mean(0), ev) < one / 3  # the noise averages out (~ one / sqrt(48))


def test_complex_freqs_are_refused():
    """Complex freqs (torch.polar, emmi/noether's RopeFrequency) rotate adjacent dim pairs there; attnkit
    rotates halves, so they are a TypeError naming freqs, not silently cast to their real part."""
    mod = MixedAttention(MixedAttentionConfig(dim=16, num_heads=2, use_rope=True))
    specs, pats = [TokenSpec("a", 6)], [AttentionPattern(["a"], ["a"])]
    ang = torch.randn(1, 6, 4)
    for freqs in (torch.polar(torch.ones_like(ang), ang), (torch.cos(ang).cfloat(), torch.sin(ang))):
        with pytest.raises(TypeError, match="freqs must be real angles.*complex64 tensor"):
            mod(torch.randn(1, 6, 16), specs, pats, freqs=freqs)
