"""`python -m attnkit demo` (the README's main job): it checks what it prints. A backend whose output,
lse, gradients or no-grad (inference) path is wrong is marked BAD and the demo exits 1."""

import pytest
import torch

import attnkit
from attnkit import demo

SMALL = ["--device", "cpu", "--length", "64"]


@pytest.fixture
def few_backends(monkeypatch):
    """Only the backends that are quick on a CPU (the triton interpreter would take minutes here)."""
    monkeypatch.setattr(demo, "BACKENDS", {n: attnkit.BACKENDS[n] for n in ("sdpa", "chunked", "reference")})


def _patch_chunked(monkeypatch, change):
    real = demo.attention

    def attention(q, k, v, *, backend="auto", **kw):
        res = real(q, k, v, backend=backend, **kw)
        return change(res) if backend == "chunked" else res

    monkeypatch.setattr(demo, "attention", attention)


def test_demo_runs_clean(few_backends, capsys):
    assert demo.main(SMALL) == 0
    out = capsys.readouterr().out
    assert "BAD (" not in out and "ERROR" not in out
    for case in ("dense", "bias+grad", "sinks+lse", "decode Lq=1"):
        assert case in out


def test_demo_flags_a_wrong_output(few_backends, monkeypatch, capsys):
    _patch_chunked(monkeypatch, lambda r: r * 1.02 if isinstance(r, torch.Tensor) else (r[0] * 1.02, *r[1:]))
    assert demo.main(SMALL) == 1
    assert "BAD (" in capsys.readouterr().out


def test_demo_flags_a_wrong_lse(few_backends, monkeypatch, capsys):
    _patch_chunked(monkeypatch, lambda r: (r[0], r[1] + 1.0) if isinstance(r, tuple) else r)
    assert demo.main(SMALL) == 1
    bad = [line for line in capsys.readouterr().out.splitlines() if "BAD (" in line]
    assert len(bad) == 1 and "chunked" in bad[0]  # the sinks+lse case alone returns an lse


def test_demo_flags_a_wrong_inference_path(few_backends, monkeypatch, capsys):
    """The no-grad call (which e.g. takes the decode kernel on CUDA) is checked, not only timed."""
    def change(r):
        if torch.is_grad_enabled():
            return r
        return torch.zeros_like(r) if isinstance(r, torch.Tensor) else (torch.zeros_like(r[0]), *r[1:])

    _patch_chunked(monkeypatch, change)
    assert demo.main(SMALL) == 1
    assert "BAD (" in capsys.readouterr().out


def test_unknown_command_is_named(capsys):
    from attnkit.__main__ import main

    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_demo_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--device", "mps"])
    with pytest.raises(SystemExit):
        demo.main(["--length", "4"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            demo.main(["--device", "cuda"])


def test_demo_flags_small_wrong_outputs_in_half_precision(monkeypatch):
    """The BAD bar is relative: in bfloat16 (the CUDA demo's dtype) a decode output 0.8x too small, or one that
    missed its last keys, is caught (an absolute floor of 4 eps = 0.03 let both pass: decode outputs are ~0.1)."""
    ref = torch.randn(1, 8, 1, 64, dtype=torch.float64) * 0.05
    for wrong in (ref * 0.8, ref * 1.1):
        rows = [dict(backend="reference", err=demo._err([ref.bfloat16()], [ref]), grad_err=None),
                dict(backend="chunked", err=demo._err([wrong.bfloat16()], [ref]), grad_err=None)]
        demo._judge(rows, torch.bfloat16)
        assert not rows[0]["bad"] and rows[1]["bad"], rows
    rows = [dict(backend="reference", err=float("inf"), grad_err=None),
            dict(backend="chunked", err=1e3, grad_err=None)]
    demo._judge(rows, torch.bfloat16)
    assert rows[0]["bad"] and rows[1]["bad"]  # a broken oracle does not wave the others through
