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
