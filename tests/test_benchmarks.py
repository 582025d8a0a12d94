"""The benchmark scripts' own arithmetic: what their summaries conclude from the rows, and what their
instruments read. (Their timings need a GPU; these checks do not.)"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
bench_decode = pytest.importorskip("bench_decode")

from attnkit.ops._launch import INTERPRET  # noqa: E402


def _rec(peer, gbps, **kw):
    c = bench_decode.Case("B8_L32k", 8, 32768)
    return bench_decode.record(c, peer, ms=c.kv_bytes() / (gbps * 1e9) * 1e3, **kw)


def _met(records):
    bench_decode.fill_ratios(records, None)
    row = bench_decode.summary(records)[2].split("|")
    return row[8].strip(), row


def test_decode_summary_refuses_a_bad_attnkit_row():
    good = [_rec("attnkit", 3000, correct=True), _rec("sdpa_cudnn", 2900, correct=True)]
    assert _met(good)[0] == "yes"
    bad = [_rec("attnkit", 3000, correct=False, rel_err=0.5), _rec("sdpa_cudnn", 2900, correct=True)]
    assert "BAD" in _met(bad)[0]


def test_decode_read_ceiling_is_never_the_best_peer():
    rows = [_rec("attnkit", 2950, correct=True), _rec("sdpa_cudnn", 3000, correct=True),
            _rec("read_paged", 3050, instrument=True)]
    met, cells = _met(rows)
    assert met == "**no**"  # 2950 / 3000, not against the faster instrument
    assert cells[6].strip() == "0.983" and cells[10].strip() == "0.967"  # paged / SDPA, paged / read ceiling
    assert rows[0]["ratio_baseline"] == "sdpa_cudnn" and rows[2]["ratio_baseline"] == "sdpa_cudnn"


@pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()), reason="runs a Triton kernel")
@pytest.mark.parametrize("block_size,order", [(16, "shuffled"), (128, "shuffled"), (256, "allocated")])
def test_decode_read_instrument_reads_every_cached_key_once(block_size, order):
    """The read ceiling sums ones @ K^T and ones @ V over the tiles it loads: each (sequence, kv head)'s
    programs give 16 x (sum K + sum V) of that sequence and head when they read each of its cached keys
    once, through the table, whatever the pool's order."""
    device = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")
    c = bench_decode.Case("t", 2, 512, Hq=4, Hkv=2, D=16)
    st = bench_decode.make_state(c, device, block_size, order)
    dt = torch.float16  # the interpreter multiplies bfloat16 wrongly
    for name in ("k", "v", "kp", "vp"):
        setattr(st, name, getattr(st, name).to(dt))
    want = 16 * (st.k.double().sum((2, 3)) + st.v.double().sum((2, 3))).flatten()  # [B * Hkv]
    tol = 1e-4 * 16 * (st.k.double().abs().sum((2, 3)) + st.v.double().abs().sum((2, 3))).flatten()
    for paged in (True, False):
        got = bench_decode.read_call(st, paged)().double().view(c.B * c.Hkv, -1).sum(1)  # over the splits
        assert ((got - want).abs() <= tol).all(), (paged, got.tolist(), want.tolist())


def test_decode_softcap_reaches_the_reference_and_the_peers(monkeypatch):
    """With --softcap the reference and the CPU's peers apply it: attnkit and eager pass the check,
    and the same call without the softcap fails it (a softcap of 1 changes the output). (FlexAttention's
    score_mod and FlashInfer's logits_soft_cap are checked the same way by the script on a GPU.)"""
    monkeypatch.setattr(bench_decode, "SOFTCAP", 1.0)
    c = bench_decode.Case("t", 2, 300, Hq=4, Hkv=2, D=16)
    st = bench_decode.make_state(c, torch.device("cpu"), 16)
    st.backend = "reference"
    with torch.no_grad():
        for peer in ("attnkit", "attnkit_contiguous", "eager"):
            assert bench_decode.check(st, bench_decode.make_call(peer, st)())["correct"], peer
        monkeypatch.setattr(bench_decode, "SOFTCAP", None)
        assert not bench_decode.check(st, bench_decode.make_call("attnkit", st)())["correct"]


# --------------------------------------------------------------------------- bench_modules, bench_ring,
# bench_mixed, bench_varlen (CPU)
def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modules_hand_peer_computes_what_attnkit_computes(dtype):
    """The hand-written SDPA peer rotates by float64 angles as attnkit does, even after .to(bf16):
    it matches MultiHeadAttention within 3x of the dtype's own error against float64."""
    import attnkit
    import bench_modules

    torch.manual_seed(0)
    cfg = attnkit.AttentionConfig(d_model=128, n_heads=4, use_rope=True, use_gqa=True, gqa_groups=2)
    mha = attnkit.MultiHeadAttention(cfg).to(dtype)
    hand = bench_modules.HandSdpaMHA(mha).to("cpu", dtype)
    m64 = attnkit.MultiHeadAttention(cfg).double()
    m64.load_state_dict(mha.state_dict())
    # x 4: logits large enough for the rotation to matter. The old peer (float32 angles; in bf16, bf16
    # frequencies: off by radians at position 2047) was ~13x attnkit's own error against float64 here.
    x = (4 * torch.randn(1, 2048, 128)).to(dtype)
    with torch.no_grad():
        ours, theirs, exact = mha(x, causal=True), hand(x), m64(x.double(), causal=True)
    assert _rel(theirs, ours) <= 3 * _rel(ours, exact)


def test_modules_fwd_bwd_flops_count_attention_at_3_5x():
    import bench_modules
    import harness

    attn = harness.attention_flops(2, 4, 64, 64, 32, causal=True)
    proj = 2 * 2 * 64 * 128 * (2 * 128 + 2 * 2 * 32)
    assert bench_modules.mha_flops(2, 64, 128, 4, 2, "fwd") == attn + proj
    assert bench_modules.mha_flops(2, 64, 128, 4, 2, "fwd+bwd") == 3.5 * attn + 3 * proj


def test_ring_list_prints_only_the_workloads_only_selects(capsys):
    import bench_ring

    assert bench_ring.main(["--list", "--only", "L128k_causal"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["L128k_causal", "fwd"], ["L128k_causal", "fwd+bwd"]]
    assert bench_ring.main(["--list", "--smoke", "--only", "L256", "--modes", "fwd"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["L256_dense", "L256_causal"]


def test_ring_ratio_skips_bad_and_single_rows():
    import bench_ring
    import harness

    def row(peer, ms, **kw):
        return harness.make_record("L128k_causal", "fwd", peer, flops=1e12, ms=ms, **kw)

    # attnkit's rows (ring_*, all_to_all) against the best correct peer that is not ours: torch_cp, when correct
    rows = [row("ring_contiguous", 10, correct=True), row("ring_zigzag", 8, correct=True),
            row("torch_cp", 9, correct=True), row("single", 4)]
    bench_ring.fill(rows, {"matmul_tflops": 1000.0})
    assert [r["ratio_baseline"] for r in rows] == ["torch_cp", "torch_cp", "ring_zigzag", None]
    assert rows[1]["ratio_to_best"] == pytest.approx(9 / 8) and rows[0]["ratio_to_best"] == pytest.approx(0.9)
    assert rows[3]["frac_matmul_ceiling"] == pytest.approx(0.25) and rows[0]["efficiency"] == pytest.approx(0.4)
    assert "| 0.90 | 10.0% |" in bench_ring.table(rows)[2]
    # a BAD torch_cp is never best: our rows then have no peer to be measured against
    rows = [row("ring_contiguous", 10, correct=True), row("ring_zigzag", 8, correct=True),
            row("torch_cp", 5, correct=False, rel_err=0.5), row("single", 4)]
    bench_ring.fill(rows, {"matmul_tflops": 1000.0})
    assert [r["ratio_baseline"] for r in rows] == [None, None, "ring_zigzag", None]


def test_mixed_bad_row_is_never_best():
    import bench_mixed
    import harness

    ref = torch.randn(2, 16, 8)
    assert bench_mixed.check(ref + 1e-4 * torch.randn_like(ref), ref)["correct"]
    wrong = bench_mixed.check(1.1 * ref, ref)
    assert not wrong["correct"] and wrong["rel_err"] == pytest.approx(0.1, rel=1e-4)

    def row(peer, ms, chk):
        return harness.make_record("b_8x512_d192", "fwd", peer, flops=1e9, ms=ms, **chk)

    ok = {"correct": True}
    rows = [row("attnkit", 2.0, ok), row("loop_sdpa", 3.0, ok), row("fused_flex", 1.0, wrong),
            row("fused_triton", 1.5, ok), row("fused_sdpa_dense", 2.5, ok)]
    bench_mixed.fill_ratios(rows)
    by = {r["peer"]: r for r in rows}
    # attnkit: against the fastest correct peer that is not ours (not fused_flex: BAD; not fused_triton: ours)
    assert by["attnkit"]["ratio_baseline"] == "fused_sdpa_dense" and by["attnkit"]["ratio_to_best"] == 1.25
    assert by["loop_sdpa"]["ratio_baseline"] == "fused_triton" and by["fused_flex"]["ratio_baseline"] == "fused_triton"


def test_mixed_flops_count_each_pattern_and_the_projections():
    import bench_mixed
    from attnkit import AttentionPattern as P, TokenSpec as T

    specs, pats = [T("a", 3), T("b", 5)], [P(["a"], ["a"]), P(["b"], ["a", "b"])]
    attn, proj = 4 * 2 * 8 * (3 * 3 + 5 * 8), 2 * 2 * 8 * 8 * 4 * 8  # B 2, dim 8 (2 heads of 4), N 8
    assert bench_mixed.module_flops(specs, pats, 2, 8, 2, "fwd") == attn + proj
    assert bench_mixed.module_flops(specs, pats, 2, 8, 2, "fwd+bwd") == 3.5 * attn + 3 * proj


def test_varlen_smoke_writes_its_json(tmp_path, monkeypatch):
    import json

    import bench_varlen

    every = bench_varlen.peers  # the SDPA peers only: attnkit's Triton rows crawl in the interpreter
    monkeypatch.setattr(bench_varlen, "peers", lambda *a: {k: f for k, f in every(*a).items() if k.startswith("sdpa")})
    bench_varlen.run(str(tmp_path), smoke=True)
    recs = json.loads((tmp_path / "varlen.json").read_text())["records"]
    assert len(recs) == 2 * 2 * 2 and (tmp_path / "varlen.md").exists()
    loop = [r for r in recs if r["peer"] == "sdpa_loop"]
    assert all(r["status"] == "ok" and r["correct"] and r["tflops"] > 0 for r in loop)


def test_linear_smoke_checks_every_peer(tmp_path, monkeypatch):
    """The linear benchmark's check can fail: the formula peers pass it, and a wrong attnkit row is
    marked BAD and makes the script exit 1."""
    import json

    import bench_linear

    bench_linear.run(str(tmp_path), smoke=True)
    recs = json.loads((tmp_path / "linear.json").read_text())["records"]
    checked = [r for r in recs if r["peer"] != "sdpa"]
    assert {r["peer"] for r in checked} >= {"attnkit", "attnkit_chunked", "prefix_sum"}
    assert all(r["status"] == "ok" and r["correct"] and r["rel_err"] < 1e-5 for r in checked)
    every = bench_linear.peers

    def wrong(causal):  # the values shifted by one position
        return {"attnkit": lambda q, k, v: every(causal)["attnkit"](q, k, v.roll(1, dims=2))}

    monkeypatch.setattr(bench_linear, "peers", wrong)
    with pytest.raises(SystemExit):
        bench_linear.run(str(tmp_path), smoke=True)
    recs = json.loads((tmp_path / "linear.json").read_text())["records"]
    assert recs and not any(r["correct"] for r in recs)


def test_attention_key_mask_rows_count_only_the_pairs_the_mask_leaves():
    """A key padding mask takes ~10% of the pairs out: the FLOPs are those of the pairs left (with causal too),
    as attended_pairs counts them from the dense mask (they were counted as if nothing was masked: 1.11x)."""
    import bench_attention
    import harness
    for wl in bench_attention.workloads(True):
        if not wl.keymask:
            continue
        keep = bench_attention.key_mask(wl).view(wl.B, 1, 1, wl.L).expand(wl.B, 1, wl.L, wl.L)
        if wl.causal:
            keep = keep & torch.ones(wl.L, wl.L, dtype=torch.bool).tril()
        exact = harness.attention_flops(wl.B, wl.Hq, wl.L, wl.L, wl.D, mask=keep, mode="fwd+bwd")
        assert abs(wl.flops("fwd+bwd") / exact - 1) < 1e-3, wl.name
        assert wl.flops("fwd+bwd") < 0.95 * harness.attention_flops(wl.B, wl.Hq, wl.L, wl.L, wl.D, causal=wl.causal,
                                                                    mode="fwd+bwd")
