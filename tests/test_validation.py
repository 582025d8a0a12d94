"""Bad input raises ValueError/TypeError naming the argument; forced backends and explain()."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import attnkit
from attnkit.backends import BACKENDS
from attnkit.request import build_request
from conftest import make_qkv

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 5, 7, 8


@pytest.fixture
def qkv():
    return make_qkv(B, HQ, HKV, LQ, LK, D, seed=7)


def _raises(exc, words, fn):
    with pytest.raises(exc) as ei:
        fn()
    msg = str(ei.value)
    for w in words:
        assert re.search(w, msg), f"{w!r} not in message: {msg}"
    return msg


# ---------------------------------------------------------------------------
# q, k, v
# ---------------------------------------------------------------------------

QKV_BAD = [
    # id, mutate(q, k, v) -> (q, k, v), exception, words the message must contain
    ("q_rank3", lambda q, k, v: (q[0], k, v), ValueError, [r"\bq\b", "4-D", r"\[4, 5, 8\]"]),
    ("k_rank5", lambda q, k, v: (q, k[None], v), ValueError, [r"\bk\b", "4-D"]),
    ("v_rank2", lambda q, k, v: (q, k, v[0, 0]), ValueError, [r"\bv\b", "4-D"]),
    ("q_not_tensor", lambda q, k, v: (q.tolist(), k, v), TypeError, [r"\bq\b", "Tensor"]),
    ("v_not_tensor", lambda q, k, v: (q, k, v.numpy()), TypeError, [r"\bv\b", "Tensor"]),
    ("q_int_dtype", lambda q, k, v: (q.long(), k, v), TypeError, [r"\bq\b", "dtype"]),
    ("mixed_dtypes", lambda q, k, v: (q, k.double(), v), TypeError, ["dtype", "float32", "float64"]),
    ("mixed_dtypes_bf16", lambda q, k, v: (q, k, v.bfloat16()), TypeError, ["dtype", "bfloat16"]),
    ("mixed_devices_k", lambda q, k, v: (q, k.to("meta"), v), ValueError, ["device", "meta"]),
    ("mixed_devices_v", lambda q, k, v: (q, k, v.to("meta")), ValueError, ["device", "meta"]),
    ("batch_mismatch_k", lambda q, k, v: (q, k[:1], v), ValueError, ["batch", r"\[2, 4, 5, 8\]", r"\[1, 2, 7, 8\]"]),
    ("batch_mismatch_v", lambda q, k, v: (q, k, v[:1]), ValueError, ["batch"]),
    ("heads_k_v_mismatch", lambda q, k, v: (q, k, v[:, :1]), ValueError, ["heads", r"\bk\b", r"\bv\b"]),
    ("hq_not_multiple", lambda q, k, v: (q[:, :3], k, v), ValueError, ["multiple", "Hq=3", "Hkv=2"]),
    ("hkv_more_than_hq", lambda q, k, v: (q[:, :1], k, v), ValueError, ["multiple", "Hq=1", "Hkv=2"]),
    ("kv_length_mismatch", lambda q, k, v: (q, k, v[:, :, :5]), ValueError, ["length", r"\bk\b", r"\bv\b"]),
    ("qk_dim_mismatch", lambda q, k, v: (q, k[..., :6], v), ValueError, ["head dim", r"\bq\b", r"\bk\b"]),
    ("empty_lk", lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, ["empty"]),
    ("empty_lq", lambda q, k, v: (q[:, :, :0], k, v), ValueError, ["empty"]),
    ("empty_dv", lambda q, k, v: (q, k, v[..., :0]), ValueError, ["empty"]),
]


@pytest.mark.parametrize("mutate,exc,words", [c[1:] for c in QKV_BAD], ids=[c[0] for c in QKV_BAD])
def test_bad_qkv(qkv, mutate, exc, words):
    q, k, v = mutate(*qkv)
    _raises(exc, words, lambda: attnkit.attention(q, k, v))
    _raises(exc, words, lambda: build_request(q, k, v))  # the same check, directly


# ---------------------------------------------------------------------------
# keyword arguments
# ---------------------------------------------------------------------------

KW_BAD = [
    # mask
    ("mask_float", lambda: dict(mask=torch.ones(LQ, LK)), TypeError, ["mask", "bool", "float32"]),
    ("mask_int", lambda: dict(mask=torch.ones(LQ, LK, dtype=torch.int64)), TypeError, ["mask", "bool"]),
    ("mask_list", lambda: dict(mask=[[True] * LK] * LQ), TypeError, ["mask"]),
    ("mask_not_broadcastable_lk", lambda: dict(mask=torch.ones(LQ, LK + 1, dtype=torch.bool)), ValueError,
     ["mask", r"\[5, 8\]", "broadcast"]),
    ("mask_not_broadcastable_heads", lambda: dict(mask=torch.ones(B, 3, LQ, LK, dtype=torch.bool)), ValueError,
     ["mask", "broadcast"]),
    ("mask_not_broadcastable_batch", lambda: dict(mask=torch.ones(3, 1, 1, LK, dtype=torch.bool)), ValueError,
     ["mask", "broadcast"]),
    ("mask_rank5", lambda: dict(mask=torch.ones(1, 1, 1, LQ, LK, dtype=torch.bool)), ValueError, ["mask", "dims"]),
    ("mask_rank0", lambda: dict(mask=torch.tensor(True)), ValueError, ["mask"]),
    ("mask_other_device", lambda: dict(mask=torch.ones(LQ, LK, dtype=torch.bool, device="meta")), ValueError,
     ["mask", "meta"]),
    # bias
    ("bias_int", lambda: dict(bias=torch.ones(LQ, LK, dtype=torch.int32)), TypeError, ["bias", "float"]),
    ("bias_bool", lambda: dict(bias=torch.ones(LQ, LK, dtype=torch.bool)), TypeError, ["bias"]),
    ("bias_not_tensor", lambda: dict(bias=1.0), TypeError, ["bias"]),
    ("bias_not_broadcastable", lambda: dict(bias=torch.randn(HQ, LQ + 1, LK)), ValueError, ["bias", "broadcast"]),
    ("bias_heads_kv_not_q", lambda: dict(bias=torch.randn(HKV, LQ, LK)), ValueError, ["bias", "broadcast"]),
    ("bias_rank5", lambda: dict(bias=torch.randn(1, B, HQ, LQ, LK)), ValueError, ["bias"]),
    ("bias_other_device", lambda: dict(bias=torch.randn(LQ, LK, device="meta")), ValueError, ["bias", "meta"]),
    ("bias_float8", lambda: dict(bias=torch.randn(LQ, LK).to(torch.float8_e4m3fn)), TypeError,
     ["bias", "float8_e4m3fn", "float16, bfloat16, float32 or float64"]),
    # window
    ("window_0", lambda: dict(window=0), ValueError, ["window", ">= 1"]),
    ("window_neg", lambda: dict(window=-3), ValueError, ["window"]),
    ("window_bool", lambda: dict(window=True), TypeError, ["window", "bool"]),
    ("window_float", lambda: dict(window=2.0), TypeError, ["window"]),
    ("window_str", lambda: dict(window="4"), TypeError, ["window"]),
    ("window_triple", lambda: dict(window=(1, 2, 3)), TypeError, ["window"]),
    ("window_tuple_neg_left", lambda: dict(window=(-2, 0)), ValueError, ["window", "left"]),
    ("window_tuple_neg_right", lambda: dict(window=(0, -5)), ValueError, ["window", "right"]),
    ("window_tuple_float", lambda: dict(window=(1.5, 0)), ValueError, ["window", "left"]),
    ("window_tuple_bool", lambda: dict(window=(True, 0)), ValueError, ["window", "left"]),
    # scalars
    ("causal_int", lambda: dict(causal=1), TypeError, ["causal"]),
    ("causal_none", lambda: dict(causal=None), TypeError, ["causal"]),
    ("causal_numpy", lambda: dict(causal=np.bool_(True)), TypeError, ["causal must be a bool", r"numpy\.bool"]),
    ("softcap_zero", lambda: dict(softcap=0.0), ValueError, ["softcap"]),
    ("softcap_negative", lambda: dict(softcap=-1.0), ValueError, ["softcap"]),
    ("softcap_nan", lambda: dict(softcap=float("nan")), ValueError, ["softcap"]),
    ("softcap_bool", lambda: dict(softcap=True), TypeError, ["softcap", "bool True"]),
    ("softcap_str", lambda: dict(softcap="2"), TypeError, ["softcap", "str '2'"]),
    ("scale_inf", lambda: dict(scale=float("inf")), ValueError, ["scale"]),
    ("scale_nan", lambda: dict(scale=float("nan")), ValueError, ["scale"]),
    ("scale_zero", lambda: dict(scale=0.0), ValueError, ["scale"]),
    ("scale_negative", lambda: dict(scale=-0.5), ValueError, ["scale"]),
    ("scale_bool", lambda: dict(scale=True), TypeError, ["scale"]),
    ("scale_tensor", lambda: dict(scale=torch.tensor(0.5)), TypeError, ["scale"]),
    ("scale_huge_int", lambda: dict(scale=10**400), ValueError, ["scale", "finite", "401 digits"]),
    ("softcap_huge_int", lambda: dict(softcap=10**400), ValueError, ["softcap", "finite", "401 digits"]),
    ("dropout_1", lambda: dict(dropout_p=1.0), ValueError, ["dropout_p"]),
    ("dropout_neg", lambda: dict(dropout_p=-0.1), ValueError, ["dropout_p"]),
    ("dropout_nan", lambda: dict(dropout_p=float("nan")), ValueError, ["dropout_p"]),
    ("dropout_bool", lambda: dict(dropout_p=True), ValueError, ["dropout_p"]),
    ("return_lse_int", lambda: dict(return_lse=1), TypeError, ["return_lse"]),
    # sinks
    ("sinks_wrong_shape", lambda: dict(sinks=torch.randn(HKV)), ValueError, ["sinks", r"\[4\]", r"\[2\]"]),
    ("sinks_2d", lambda: dict(sinks=torch.randn(1, HQ)), ValueError, ["sinks"]),
    ("sinks_int", lambda: dict(sinks=torch.arange(HQ)), TypeError, ["sinks"]),
    ("sinks_list", lambda: dict(sinks=[0.0] * HQ), TypeError, ["sinks"]),
    ("sinks_other_device", lambda: dict(sinks=torch.randn(HQ, device="meta")), ValueError, ["sinks", "meta"]),
    # mods
    ("score_mod_not_callable", lambda: dict(score_mod=3), TypeError, ["score_mod", "callable"]),
    ("mask_mod_not_callable", lambda: dict(mask_mod=torch.ones(LQ, LK, dtype=torch.bool)), TypeError,
     ["mask_mod", "callable"]),
]


@pytest.mark.parametrize("make_kw,exc,words", [c[1:] for c in KW_BAD], ids=[c[0] for c in KW_BAD])
def test_bad_keyword(qkv, make_kw, exc, words):
    q, k, v = qkv
    kw = make_kw()
    _raises(exc, words, lambda: attnkit.attention(q, k, v, **kw))
    _raises(exc, words, lambda: attnkit.explain(q, k, v, **kw))


def test_softcap_inf_is_refused_or_harmless(qkv):
    """softcap=inf passes the `> 0` check; it must then act as no cap, not turn every logit into NaN."""
    q, k, v = qkv
    try:
        out = attnkit.attention(q, k, v, softcap=float("inf"), backend="reference")
    except (ValueError, TypeError) as e:
        assert "softcap" in str(e)
        return
    assert torch.isfinite(out).all(), "softcap=inf was accepted and produced NaN"
    torch.testing.assert_close(out, attnkit.attention(q, k, v, backend="reference"))


GOOD_KW = [
    ("mask_1d", lambda: dict(mask=torch.rand(LK) > 0.3)),
    ("mask_2d", lambda: dict(mask=torch.rand(LQ, LK) > 0.3)),
    ("mask_3d", lambda: dict(mask=torch.rand(HQ, LQ, LK) > 0.3)),
    ("mask_keypad", lambda: dict(mask=torch.rand(B, 1, 1, LK) > 0.3)),
    ("bias_1d", lambda: dict(bias=torch.randn(LK))),
    ("bias_b11k", lambda: dict(bias=torch.randn(B, 1, 1, LK))),
    ("bias_float64_with_float32_q", lambda: dict(bias=torch.randn(LQ, LK, dtype=torch.float64))),
    ("window_list", lambda: dict(window=[2, 1])),
    ("window_left_none", lambda: dict(window=(None, 0))),
    ("window_huge", lambda: dict(window=10_000)),
    ("scale_int", lambda: dict(scale=1)),
    ("softcap_int", lambda: dict(softcap=3)),
]


@pytest.mark.parametrize("make_kw", [c[1] for c in GOOD_KW], ids=[c[0] for c in GOOD_KW])
def test_good_keyword_accepted_and_matches_reference(qkv, make_kw):
    q, k, v = qkv
    kw = make_kw()
    out = attnkit.attention(q, k, v, **kw)
    assert out.shape == (B, HQ, LQ, D) and out.dtype == q.dtype
    kw64 = {n: (x.double() if torch.is_tensor(x) and x.is_floating_point() else x) for n, x in kw.items()}
    ref = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", **kw64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


# Windows with both sides unbounded are legal ((-1, -1) is flash-attn's "no window"); they must
# behave like no window on every backend, also together with a mask.
UNBOUNDED = [(-1, -1), (None, None), (None, -1)]


def _unbounded_params():
    out = []
    for backend in ["reference", "chunked", "sdpa", "flex"]:
        for window in UNBOUNDED:
            for with_mask in (False, True):
                if backend == "flex" and with_mask:
                    continue  # each flex call on the CPU compiles; one variant is enough
                marks = []
                wid = str(window).replace(" ", "")
                out.append(pytest.param(backend, window, with_mask, marks=marks,
                                        id=f"{backend}-{wid}-{'mask' if with_mask else 'nomask'}"))
    return out


@pytest.mark.parametrize("backend,window,with_mask", _unbounded_params())
def test_unbounded_window_is_no_window(backend, window, with_mask):
    q, k, v = make_qkv(B, HQ, HKV, LQ, LK, 16, seed=7)  # head dim 16 so that flex can serve
    kw = {"mask": torch.rand(LQ, LK, generator=torch.Generator().manual_seed(3)) > 0.3} if with_mask else {}
    out = attnkit.attention(q, k, v, window=window, backend=backend, **kw)
    ref = attnkit.attention(q.double(), k.double(), v.double(), backend="reference", **kw)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["chunked", "sdpa", "reference"])
def test_mask_mod_must_return_bool(qkv, backend):
    q, k, v = qkv
    _raises(TypeError, ["mask_mod", "bool"],
            lambda: attnkit.attention(q, k, v, mask_mod=lambda b, h, i, j: (j <= i + 1).int(), backend=backend))


@pytest.mark.parametrize("backend", ["chunked", "sdpa", "reference"])
def test_mods_must_return_the_shape_of_their_tile(qkv, backend):
    """A mod whose result does not broadcast to the [B, Hq, queries, keys] of its index arguments: a
    ValueError naming it (reference returned a 5-D output, the others raised from deep inside)."""
    q, k, v = qkv
    _raises(ValueError, ["mask_mod", "broadcastable", r"\[1, 2, 3, 4, 5\]"],
            lambda: attnkit.attention(q, k, v, mask_mod=lambda b, h, i, j: torch.ones(1, 2, 3, 4, 5, dtype=torch.bool),
                                      backend=backend))
    if backend != "sdpa":  # sdpa cannot serve a score_mod
        _raises(ValueError, ["score_mod", "broadcastable", r"\[7\]"],
                lambda: attnkit.attention(q, k, v, score_mod=lambda s, b, h, i, j: torch.zeros(7), backend=backend))


def test_flex_names_a_wrong_mask_mod_result():
    """flex evaluates a mask_mod under vmap on scalar indices, whose own errors named neither the mod nor
    the fault (an unpacking error, an assert on the dtype): the same TypeError / ValueError as elsewhere."""
    q, k, v = make_qkv(1, 2, 2, 6, 6, 16, seed=9)
    for mod, exc, words in ((lambda b, h, i, j: torch.ones(3, dtype=torch.bool), ValueError, ["broadcastable", r"\[3\]"]),
                            (lambda b, h, i, j: True, TypeError, ["bool tensor", "got bool"]),
                            (lambda b, h, i, j: i - j, TypeError, ["bool tensor", "int32"])):
        _raises(exc, ["mask_mod", *words], lambda: attnkit.attention(q, k, v, mask_mod=mod, backend="flex"))
    ref = attnkit.attention(q, k, v, mask_mod=lambda b, h, i, j: j <= i, backend="reference")
    torch.testing.assert_close(attnkit.attention(q, k, v, mask_mod=lambda b, h, i, j: j <= i, backend="flex"), ref,
                               rtol=1e-5, atol=1e-5)


def test_score_mod_must_return_tensor(qkv):
    q, k, v = qkv
    _raises(TypeError, ["score_mod"],
            lambda: attnkit.attention(q, k, v, score_mod=lambda s, b, h, i, j: 1.0, backend="chunked"))


# ---------------------------------------------------------------------------
# backends: forced, unknown, explain, auto
# ---------------------------------------------------------------------------


def test_unknown_backend_lists_known(qkv):
    q, k, v = qkv
    msg = _raises(ValueError, ["triton_v9", "auto"], lambda: attnkit.attention(q, k, v, backend="triton_v9"))
    for name in BACKENDS:
        assert name in msg, f"known backend {name} not listed: {msg}"
    _raises(ValueError, ["triton_v9"], lambda: attnkit.explain(q, k, v, backend="triton_v9"))
    _raises(TypeError, ["backend"], lambda: attnkit.attention(q, k, v, backend=None))


FORCED = [
    # backend, kwargs, words in the message
    ("sdpa", dict(softcap=2.0), ["'softcap'"]),
    ("sdpa", dict(sinks=torch.randn(HQ)), ["'sinks'"]),
    ("sdpa", dict(return_lse=True, dropout_p=0.1), ["'return_lse'", "'dropout'"]),
    ("sdpa", dict(score_mod=lambda s, b, h, i, j: s), ["'score_mod'"]),
    ("sdpa", dict(softcap=2.0, return_lse=True, dropout_p=0.1), ["'softcap'", "'return_lse'", "'dropout'"]),
    ("flex", dict(), ["head dim 8"]),  # D=8 < 16
]


@pytest.mark.parametrize("backend,kw,words", FORCED, ids=[f"{b}-{'-'.join(kw) or 'headdim'}" for b, kw, _ in FORCED])
def test_forced_backend_that_cannot_serve(qkv, backend, kw, words):
    q, k, v = qkv
    msg = _raises(ValueError, [re.escape(w) for w in words] + [backend],
                  lambda: attnkit.attention(q, k, v, backend=backend, **kw))
    assert "cannot serve" in msg
    _raises(ValueError, [re.escape(w) for w in words], lambda: attnkit.explain(q, k, v, backend=backend, **kw))
    # and the capability table agrees
    req = build_request(q, k, v, **kw)
    why = BACKENDS[backend].unsupported(req)
    assert why is not None and all(w in why for w in words)
    assert BACKENDS[backend].capabilities.missing(req)


def test_flex_cpu_refuses_gradients():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, seed=1)
    q.requires_grad_(True)
    _raises(ValueError, ["flex", "'backward'"], lambda: attnkit.attention(q, k, v, backend="flex"))
    bias = torch.randn(8, 8, requires_grad=True)
    _raises(ValueError, ["'bias_grad'"], lambda: attnkit.attention(q.detach(), k, v, bias=bias, backend="flex"))
    with torch.no_grad():  # no gradient wanted: flex can serve
        req = build_request(q, k, v, bias=bias)
        assert BACKENDS["flex"].unsupported(req) is None


def test_explain_names_every_backend(qkv):
    q, k, v = qkv
    plan = attnkit.explain(q, k, v, causal=True)
    assert isinstance(plan, attnkit.Plan)
    assert plan.backend in BACKENDS
    assert set(plan.passed_over) | {plan.backend} == set(BACKENDS)
    assert plan.backend not in plan.passed_over
    text = str(plan)
    for name in BACKENDS:
        assert name in text
    assert "causal" in plan.request and "[2, 4, 5, 8]" in plan.request
    assert plan.reason
    # explain agrees with what attention() runs: same result as forcing the chosen backend
    out = attnkit.attention(q, k, v, causal=True)
    forced = attnkit.attention(q, k, v, causal=True, backend=plan.backend)
    assert torch.equal(out, forced)


def test_explain_softcap_on_cpu_passes_over_sdpa():
    q, k, v = make_qkv(2, 4, 2, 9, 9, 16, seed=2)
    plan = attnkit.explain(q, k, v, softcap=5.0)
    assert plan.backend != "sdpa"
    assert "sdpa" in plan.passed_over
    assert "softcap" in plan.passed_over["sdpa"]
    assert "cannot serve" in plan.passed_over["sdpa"]
    assert "softcap" in str(plan)


def test_explain_forced(qkv):
    q, k, v = qkv
    plan = attnkit.explain(q, k, v, backend="chunked", window=3)
    assert plan.backend == "chunked" and plan.passed_over == {}
    assert "window" in plan.request


AUTO_REQUESTS = [
    ("dense", dict()),
    ("causal", dict(causal=True)),
    ("mask", dict(mask=torch.rand(LQ, LK) > 0.5)),
    ("bias", dict(bias=torch.randn(HQ, LQ, LK))),
    ("softcap", dict(softcap=3.0)),
    ("sinks_lse", dict(sinks=torch.randn(HQ), return_lse=True)),
    ("score_mod", dict(score_mod=lambda s, b, h, i, j: s * 0.5)),
    ("mask_mod", dict(mask_mod=lambda b, h, i, j: j <= i)),
    ("dropout", dict(dropout_p=0.1)),
    ("window", dict(window=(2, 1))),
]


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("kw", [c[1] for c in AUTO_REQUESTS], ids=[c[0] for c in AUTO_REQUESTS])
def test_auto_never_picks_reference_when_another_can_serve(qkv, kw, grad):
    q, k, v = qkv
    q = q.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        req = build_request(q, k, v, **kw)
        others = [n for n, b in BACKENDS.items() if n != "reference" and b.unsupported(req) is None]
        plan = attnkit.explain(q, k, v, **kw)
    assert others, "chunked serves everything"
    assert plan.backend != "reference"
    assert plan.backend in others
    assert "reference" in plan.passed_over and "slower" in plan.passed_over["reference"]


def test_auto_prefers_sdpa_for_plain_cpu_call(qkv):
    q, k, v = qkv
    assert attnkit.explain(q, k, v).backend == "sdpa"


def test_available_backends_and_registry():
    names = attnkit.available_backends()
    for n in ("reference", "chunked", "sdpa", "flex"):
        assert n in names
    with pytest.raises(ValueError, match="already registered"):
        attnkit.register_backend(attnkit.backends.ChunkedBackend())
    with pytest.raises(TypeError):
        attnkit.register_backend("chunked")

    class Auto(attnkit.backends.ChunkedBackend):
        name = "auto"
    with pytest.raises(ValueError, match="'auto' is reserved"):
        attnkit.register_backend(Auto(), replace=True)
    assert "auto" not in attnkit.backends.BACKENDS


def test_capabilities_reject_unknown_feature_names():
    with pytest.raises(ValueError, match="unknown feature"):
        attnkit.Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                             features=frozenset({"causal", "telepathy"}))


def test_outputs_keep_dtype_and_lse_is_float32():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v = make_qkv(1, 2, 1, 4, 6, 8, dtype=dtype, seed=9)
        out, lse = attnkit.attention(q, k, v, return_lse=True, backend="chunked")
        assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (1, 2, 4)
    q, k, v = make_qkv(1, 2, 1, 4, 6, 8, dtype=torch.float64, seed=9)
    for backend in ("reference", "chunked"):
        out, lse = attnkit.attention(q, k, v, return_lse=True, backend=backend)
        assert out.dtype == torch.float64 and lse.dtype == torch.float64


def test_request_normalisation():
    q, k, v = make_qkv(2, 4, 2, 5, 7, 8)
    req = build_request(q, k, v, window=3, mask=torch.ones(LK, dtype=torch.bool), bias=torch.randn(LQ, LK))
    assert req.window == (2, 0)
    assert req.mask.dim() == 4 and req.bias.dim() == 4
    assert req.scale == pytest.approx(8 ** -0.5)
    assert build_request(q, k, v, window=(-1, 3)).window == (None, 3)
    assert build_request(q, k, v, causal=True, window=(4, 9)).key_bounds == (4, 0)
    assert build_request(q, k, v, causal=True).key_bounds == (None, 0)
    assert build_request(q, k, v).key_bounds is None
    assert build_request(q, k, v).offset == 2
    assert "gqa" in build_request(q, k, v).features()


def test_registering_a_backend_invalidates_cached_choice(qkv):
    """auto caches its choice per request signature; a newly registered faster backend must win at once."""
    from attnkit.backends import ALL_FEATURES, Backend, Capabilities
    from attnkit.dispatch import clear_cache

    q, k, v = qkv
    before = attnkit.attention(q, k, v, causal=True)  # fills the cache for this signature

    class Toy(Backend):
        name = "toy_fastest"
        capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                                    features=ALL_FEATURES)
        calls = 0

        def speed(self, req):
            return 1e9

        def run(self, req):
            Toy.calls += 1
            return BACKENDS["reference"].run(req)

    try:
        attnkit.register_backend(Toy())
        assert attnkit.explain(q, k, v, causal=True).backend == "toy_fastest"
        out = attnkit.attention(q, k, v, causal=True)
        assert Toy.calls == 1, "a stale cached choice ran instead of the newly registered backend"
        torch.testing.assert_close(out, before, rtol=1e-5, atol=1e-6)
    finally:
        BACKENDS.pop("toy_fastest", None)
        clear_cache()
    assert attnkit.explain(q, k, v, causal=True).backend != "toy_fastest"


class _ToyBuildError(RuntimeError):
    """What a toy backend raises when it 'cannot build' a kernel (stands in for Inductor's errors)."""


def _toy_failing_builds(name: str = "toy_builds"):
    """A fastest backend whose kernels 'fail to build' for causal calls and fail for real on windows."""
    from attnkit.backends import ALL_FEATURES, Backend, Capabilities

    class Toy(Backend):
        capabilities = Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float32}),
                                    features=ALL_FEATURES)
        build_errors = (_ToyBuildError,)
        calls = 0

        def speed(self, req):
            return 1e9

        def _check(self, req):
            Toy.calls += 1
            if req.causal:
                raise _ToyBuildError("toy kernel needs 300000 bytes of shared memory, 232448 available")
            if req.window is not None:
                raise RuntimeError("a toy bug, not a build failure")

        def run(self, req):
            self._check(req)
            return BACKENDS["reference"].run(req)

        def backward_from_stats(self, req, do, out, lse, dlse):
            self._check(req)
            return BACKENDS["reference"].backward_from_stats(req, do, out, lse, dlse)

    Toy.name = name
    return Toy


def test_auto_passes_over_a_backend_that_cannot_build_the_call(qkv):
    """A build error under auto: warned once, remembered for the signature (explain says why), the next
    backend runs; other signatures, forced calls and errors that are not build errors are untouched."""
    import warnings

    from attnkit.dispatch import clear_cache

    q, k, v = qkv
    Toy = _toy_failing_builds()
    want = attnkit.attention(q, k, v, causal=True, backend="reference")
    try:
        attnkit.register_backend(Toy())
        assert attnkit.explain(q, k, v, causal=True).backend == "toy_builds"
        with pytest.warns(RuntimeWarning, match=r"'toy_builds' could not build a kernel for .*300000 bytes"):
            out = attnkit.attention(q, k, v, causal=True)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        assert Toy.calls == 1
        plan = attnkit.explain(q, k, v, causal=True)
        assert plan.backend not in ("toy_builds", "reference"), plan
        assert plan.passed_over["toy_builds"].startswith("cannot serve: failed to build a kernel"), plan
        assert "300000 bytes" in plan.passed_over["toy_builds"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # remembered: no second attempt, no second warning
            out2 = attnkit.attention(q, k, v, causal=True)
        assert Toy.calls == 1 and torch.equal(out, out2)
        # Another signature still runs on it; a forced call gets the error; a bug is not a build error.
        attnkit.attention(q, k, v)
        assert Toy.calls == 2
        with pytest.raises(_ToyBuildError):
            attnkit.attention(q, k, v, causal=True, backend="toy_builds")
        with pytest.raises(RuntimeError, match="a toy bug"):
            attnkit.attention(q, k, v, window=3)
        clear_cache()  # forgets the failure with the cached choices
        assert attnkit.explain(q, k, v, causal=True).backend == "toy_builds"
    finally:
        BACKENDS.pop("toy_builds", None)
        clear_cache()


def test_attention_backward_passes_over_a_backend_that_cannot_build_the_call(qkv):
    from attnkit.dispatch import clear_cache

    q, k, v = (t.double() for t in qkv)
    out, lse = attnkit.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    do = torch.randn_like(out)
    want = attnkit.attention_backward(do, q, k, v, out, lse, causal=True, backend="reference")
    Toy = _toy_failing_builds("toy_builds_bwd")
    Toy.capabilities = attnkit.Capabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.float64}),
                                            features=attnkit.backends.ALL_FEATURES)
    try:
        attnkit.register_backend(Toy())
        with pytest.warns(RuntimeWarning, match="'toy_builds_bwd' could not build"):
            got = attnkit.attention_backward(do, q, k, v, out, lse, causal=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert Toy.calls == 1
    finally:
        BACKENDS.pop("toy_builds_bwd", None)
        clear_cache()


def test_cached_choice_follows_grad_mode():
    """The same tensors with and without gradients are different signatures (flex on CPU: forward only)."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, seed=4)
    q.requires_grad_(True)
    with torch.no_grad():
        with_no_grad = attnkit.explain(q, k, v, backend="auto")
        assert "backward" not in with_no_grad.request
        attnkit.attention(q, k, v, softcap=2.0)
    out = attnkit.attention(q, k, v, softcap=2.0)  # must pick a backend with a backward
    assert out.requires_grad
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_backward_requests_have_their_own_signature():
    """attention_backward's request and a differentiated forward both carry 'backward', but a backend
    may take one and not the other (sdpa's lse on CUDA): the cached choice must not cross over."""
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, seed=5)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    fwd = build_request(*leaves, return_lse=True)
    bwd = build_request(q, k, v, return_lse=True, for_backward=True)
    assert "backward" in fwd.features() and "backward" in bwd.features()
    assert fwd.signature != bwd.signature


def test_wide_causal_chunks_have_their_own_signature():
    """On CUDA a causal chunk of queries against more keys with >= WIDE_CHUNK_ROWS query rows (B x Hq x Lq)
    ranks differently (triton's speed rule): the flag is exact at the threshold, needs causal, Lq < Lk and
    plain tensors (with cache_seqlens the keys' length is a capacity), and is part of the signature."""
    from attnkit.request import WIDE_CHUNK_ROWS

    def req(B, Hq, Lq, Lk, **kw):
        g = torch.Generator().manual_seed(6)
        q = torch.randn(B, Hq, Lq, 8, generator=g)
        k, v = torch.randn(B, 1, Lk, 8, generator=g), torch.randn(B, 1, Lk, 8, generator=g)
        return build_request(q, k, v, **kw)

    rows = WIDE_CHUNK_ROWS // 64
    wide = req(2, 32, rows, rows + 1, causal=True)
    assert wide.wide_chunk
    assert not req(2, 32, rows - 1, rows + 1, causal=True).wide_chunk  # one query row per head short
    assert not req(2, 32, rows, rows + 1).wide_chunk  # not causal
    assert not req(2, 32, rows, rows, causal=True).wide_chunk  # square: top-left and bottom-right agree
    assert not req(2, 32, rows, rows + 1, causal=True, cache_seqlens=rows + 1).wide_chunk
    assert wide.signature != req(2, 32, rows - 1, rows + 1, causal=True).signature


def test_one_query_and_several_have_their_own_signature():
    """On CUDA a decode step over plain K/V tensors goes to the decode kernel with 2-16 queries and stays
    with SDPA with one (triton's speed rule): the choice cached for one must not serve the other."""
    g = torch.Generator().manual_seed(7)
    k, v = torch.randn(2, 2, 50, 8, generator=g), torch.randn(2, 2, 50, 8, generator=g)
    one, four, four_b = (build_request(torch.randn(2, 4, n, 8, generator=g), k, v, causal=True) for n in (1, 4, 5))
    assert one.decode_shaped and four.decode_shaped
    assert one.signature != four.signature == four_b.signature


def test_value_head_dims_have_their_own_signature():
    """sdpa returns lse only with Dv == D: a choice cached for Dv == D must not serve Dv != D (and back)."""
    from attnkit import dispatch
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g)
    same, other = (torch.randn(1, 2, 8, dv, generator=g) for dv in (16, 8))
    assert attnkit.explain(q, k, same, return_lse=True).backend == "sdpa"
    assert attnkit.explain(q, k, other, return_lse=True).backend != "sdpa"
    for first, second in ((same, other), (other, same)):
        dispatch.clear_cache()
        for v in (first, second):
            out, lse = attnkit.attention(q, k, v, return_lse=True)
            ref, ref_lse = attnkit.attention(q, k, v, return_lse=True, backend="reference")
            assert out.shape[-1] == v.shape[-1]
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
            assert dispatch.choose(build_request(q, k, v, return_lse=True)).name == \
                attnkit.explain(q, k, v, return_lse=True).backend
    # Dv itself, not only Dv != D: backends bound the larger head dim (triton 256, flex's tiles by size)
    sigs = {build_request(q, k, torch.randn(1, 2, 8, dv, generator=g)).signature for dv in (8, 32, 512)}
    assert len(sigs) == 3


def test_decode_steps_over_plain_tensors_rank_as_on_cuda(monkeypatch):
    """The CUDA ranking of decode steps over plain K/V tensors, on requests built on the CPU and taken for
    CUDA ones (the speed rules read the device from the request): causal half-precision calls of 2-16
    queries go to the decode kernel ahead of SDPA; one query, float32, or no causal stay with SDPA."""
    from attnkit.request import AttentionRequest
    monkeypatch.setattr(AttentionRequest, "device", property(lambda self: torch.device("cuda")))
    g = torch.Generator().manual_seed(8)

    def best(Lq, dtype=torch.bfloat16, **kw):
        q = torch.randn(2, 8, Lq, 16, generator=g).to(dtype)
        k, v = (torch.randn(2, 2, 300, 16, generator=g).to(dtype) for _ in range(2))
        req = build_request(q, k, v, **kw)
        speeds = {name: b.speed(req) for name, b in BACKENDS.items() if name in ("sdpa", "flex", "triton")}
        return max(speeds, key=speeds.get)

    assert best(4, causal=True) == "triton"
    assert best(16, torch.float16, causal=True, return_lse=True) == "triton"
    assert best(1, causal=True) == "sdpa"
    assert best(4, torch.float32, causal=True) == "sdpa"
    assert best(4) == "sdpa"
    assert best(17, causal=True) == "sdpa"  # not decode-shaped (and under the wide chunks' rows)


@pytest.mark.parametrize("make", [
    lambda: attnkit.StandardAttention(2, 8, backend="nope"),
    lambda: attnkit.FlashAttention(2, 8, backend="nope"),
    lambda: attnkit.AttentionConfig(d_model=16, n_heads=2, backend="nope"),
    lambda: attnkit.MixedAttentionConfig(dim=16, num_heads=2, backend="nope"),
], ids=["standard", "flash", "attention_config", "mixed_config"])
def test_unknown_backend_fails_at_construction(make):
    _raises(ValueError, ["nope", "known backends"], make)


@pytest.mark.parametrize("make,words", [
    (lambda: attnkit.LinearAttention(2, 8, num_features=0), ["num_features"]),
    (lambda: attnkit.LinearAttention(2, 8, num_features=-3), ["num_features"]),
    (lambda: attnkit.KVCache(1, 1, 4, 8, head_dim_v=-1), ["head_dim_v"]),
    (lambda: attnkit.KVCache(1, 1, 4, 8).advance(-5), ["advance"]),
    (lambda: attnkit.KVCache(2, 1, 4, 8).append(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8),
                                                torch.tensor([3])), ["num_new"]),
    (lambda: attnkit.KVCache(2, 1, 4, 8).append(torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8),
                                                torch.tensor([5, -1])), ["num_new"]),
], ids=["num_features_0", "num_features_neg", "head_dim_v_neg", "advance_neg", "num_new_shape", "num_new_range"])
def test_module_and_cache_arguments(make, words):
    _raises(ValueError, words, make)


def test_bounded_caches_shared_by_threads():
    """The module caches (plans, kernels, choices, masks) drop their oldest entries past a cap through
    `_bounded.put`: threads that fill one cache at once never raise, and the cap holds."""
    import sys
    import threading
    from attnkit import _bounded, dispatch
    from attnkit.backends.base import Backend

    class Keeps(Backend):  # a backend whose prepared run is a plain function
        name = "keeps"

        def prepare(self, req):
            return lambda *a: None

    req = build_request(*make_qkv(1, 1, 1, 2, 2, 8))
    cache, errors = {}, []

    def prepare(t):
        for i in range(5000):
            dispatch.prepare((t, i), "keeps", keeps, req)

    def fill(t):
        for i in range(5000):
            _bounded.put(cache, (t, i), i, 8)
            _bounded.touch(cache, (t, i - 1))

    def run(work, t):
        try:
            work(t)
        except Exception as e:  # noqa: BLE001 - any error escaping a cache is the defect
            errors.append(repr(e))

    keeps = Keeps()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for work in (prepare, fill):
            threads = [threading.Thread(target=run, args=(work, t)) for t in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert errors == [] and len(cache) <= 8 and len(dispatch._PREPARED) <= dispatch._MAX_PREPARED
    finally:
        sys.setswitchinterval(old)
        dispatch.clear_cache()
    # a byte budget: the oldest entries but the newest go while the weights add up to more
    sized = {}
    for i, w in enumerate((5, 5, 5, 20)):
        _bounded.put(sized, i, w, 10, weight=lambda x: x, budget=12)
    assert sized == {3: 20}
    _bounded.put(sized, 4, 1, 10, weight=lambda x: x, budget=30)
    assert list(sized) == [3, 4] and _bounded.touch(sized, 3) == 20 and list(sized) == [4, 3]


@pytest.mark.parametrize("kind", ["window", "mask_mod"])
def test_cpu_windows_past_the_mask_size_rule_go_to_chunked(kind):
    """On the CPU sdpa builds a window's or mask_mod's [Lq, Lk] mask: past CPU_BUILT_MASK_PAIRS pairs auto
    takes chunked (O(L) memory, and faster there: L = 8192, window 128: 368 against 694 ms, 2026-11-25)."""
    from attnkit import dispatch
    from attnkit.request import CPU_BUILT_MASK_PAIRS
    kw = dict(window=32) if kind == "window" else dict(mask_mod=lambda b, h, i, j: j <= i)
    small = make_qkv(1, 1, 1, 64, 64, 8)
    n = math.isqrt(CPU_BUILT_MASK_PAIRS) + 1
    big = make_qkv(1, 1, 1, n, n, 8)
    wide = make_qkv(1, 1, 1, 64, CPU_BUILT_MASK_PAIRS // 64 + 1, 8)  # Lq << Lk: the pairs count, not Lq^2
    assert attnkit.explain(*small, **kw).backend == "sdpa"
    for qkv in (big, wide):
        plan = attnkit.explain(*qkv, **kw)
        assert plan.backend == "chunked", str(plan)
    assert attnkit.explain(*make_qkv(1, 1, 1, 64, CPU_BUILT_MASK_PAIRS // 64, 8), **kw).backend == "sdpa"
    # what runs follows the rule too, in either order (the cached choice is per signature)
    for first, second in ((small, big), (big, small)):
        dispatch.clear_cache()
        for qkv in (first, second):
            req = build_request(*qkv, **kw)
            assert dispatch.choose(req).name == attnkit.explain(*qkv, **kw).backend


def test_chunked_block_sizes_and_score_mod_results_are_checked(qkv):
    """ChunkedBackend's tile sizes must be positive ints (a negative one gave an all-zero output); a score_mod
    must return floating scores, refused by name on every backend that runs mods."""
    from attnkit.backends import ChunkedBackend
    for kw in (dict(block_q=-4), dict(block_k=0), dict(block_q=2.5)):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a positive int"):
            ChunkedBackend(**kw)
    q, k, v = qkv
    for mod, got in ((lambda s, b, h, i, j: i - j, "int32 tensor"), (lambda s, b, h, i, j: s > 0, "bool tensor"),
                     (lambda s, b, h, i, j: 1.0, "float")):
        for backend in ("reference", "chunked"):
            with torch.no_grad(), pytest.raises(TypeError, match=f"score_mod must return a floating tensor.*{got}"):
                attnkit.attention(q, k, v, score_mod=mod, backend=backend)


def test_a_group_mask_on_another_device_is_named():
    from attnkit.groups import GroupMask, SegmentLayout
    q, k, v = make_qkv(1, 2, 2, 4, 4, 8)
    layout = SegmentLayout(4, 4, ((((0, 4),), ((0, 4),)),))
    with pytest.raises(ValueError, match="mask_mod is a GroupMask with its tables on meta but q is on cpu"):
        attnkit.attention(q, k, v, mask_mod=GroupMask(layout, "meta"))
