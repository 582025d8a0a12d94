"""examples/: greedy generation with the paged KV cache equals recomputing every step."""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

import attnkit

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_generation_equals_recompute(block_size):
    gen = _load("generate_paged")
    torch.manual_seed(3)
    model = gen.TinyDecoder(kv_heads=1).double().eval()  # MQA here; the script's default is GQA 4/2
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (1, 17, 33)]
    paged, paged_logits = gen.generate_paged(model, prompts, steps=10, block_size=block_size)
    full, full_logits = gen.generate_recompute(model, prompts, steps=10)
    assert paged == full
    assert paged_logits.shape == full_logits.shape == (3, 10, 97)
    assert gen.logits_error(paged_logits, full_logits) <= 1e-9  # tokens alone missed a prompt-only RoPE bug
    assert len({t for seq in full for t in seq}) > 3  # a non-degenerate continuation
    for steps in (0, 1):  # the prefill's token is the first generated one, or none
        a, la = gen.generate_paged(model, prompts, steps, block_size)
        b, lb = gen.generate_recompute(model, prompts, steps)
        assert a == b and gen.logits_error(la, lb) <= 1e-9


def test_the_logits_check_sees_a_cache_that_is_slightly_wrong(monkeypatch):
    """Keys 0.1% off in the cache keep the greedy tokens of this random model, not its logits."""
    gen = _load("generate_paged")
    torch.manual_seed(3)
    model = gen.TinyDecoder().double().eval()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 23)]
    full, full_logits = gen.generate_recompute(model, prompts, steps=4)
    real = attnkit.PagedKVCache.write

    def noisy(self, seq_ids, k_new, v_new, num_new=None):
        return real(self, seq_ids, k_new * 1.001, v_new, num_new)

    monkeypatch.setattr(attnkit.PagedKVCache, "write", noisy)
    paged, paged_logits = gen.generate_paged(model, prompts, steps=4)
    assert paged == full  # the tokens alone do not show it
    assert gen.logits_error(paged_logits, full_logits) > 1e-9


def test_generate_script_runs():
    """The script as a user runs it: exit code 0 means every prompt's tokens matched."""
    r = subprocess.run([sys.executable, str(EXAMPLES / "generate_paged.py"), "--steps", "6"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("== recompute") == 3
