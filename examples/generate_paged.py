#!/usr/bin/env python
"""Greedy generation with a paged KV cache, checked against recomputing the whole sequence.

A tiny randomly initialised decoder (token embedding, pre-norm blocks of attnkit's
MultiHeadAttention with RoPE and GQA plus an MLP, an output head) generates from a
batch of prompts of different lengths:

- with the cache: each prompt is prefilled into its own sequence of a per-layer
  `PagedKVCache`, then all sequences decode together, one token per step;
- without: every step runs the model over each whole sequence and takes the last logits.

Greedy decoding must produce the same tokens both ways, from the same logits (to float64
rounding: equal tokens alone would pass a cache that is slightly wrong).

    python examples/generate_paged.py [--steps 16] [--block-size 16] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import attnkit


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)). x [B, L, d_model]."""

    def __init__(self, d_model: int, n_heads: int, kv_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = attnkit.MultiHeadAttention(attnkit.AttentionConfig(
            d_model=d_model, n_heads=n_heads, use_rope=True, use_gqa=kv_heads < n_heads, gqa_groups=kv_heads))
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: Tensor, kv_cache=None) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=True, kv_cache=kv_cache)
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    """ids [B, L] -> logits [B, L, vocab]; `caches` (one per block) continue earlier tokens."""

    def __init__(self, vocab: int = 97, d_model: int = 64, n_heads: int = 4, kv_heads: int = 2, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, kv_heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids: Tensor, caches=None) -> Tensor:
        x = self.embed(ids)
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if caches is None else caches[i])
        return self.head(self.norm(x))


@torch.no_grad()
def generate_recompute(model: TinyDecoder, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], Tensor]:
    """Greedy, re-running the model over each whole sequence at every step (no cache).
    Returns the tokens and the logits each was chosen from [B, steps, vocab]."""
    out, logits = [], []
    for p in prompts:
        ids = torch.tensor([p], device=model.embed.weight.device)
        rows = []
        for _ in range(steps):
            rows.append(model(ids)[0, -1])
            ids = torch.cat([ids, rows[-1].argmax().view(1, 1)], dim=1)
        out.append(ids[0, len(p):].tolist())
        logits.append(torch.stack(rows) if rows else model.head.weight.new_zeros(0, model.head.out_features))
    return out, torch.stack(logits)


@torch.no_grad()
def generate_paged(model: TinyDecoder, prompts: list[list[int]], steps: int, block_size: int = 16,
                   num_blocks: int = 64) -> tuple[list[list[int]], Tensor]:
    """Greedy with one PagedKVCache per layer: prefill each prompt, then decode the batch together.
    Returns the tokens and the logits each was chosen from [B, steps, vocab]."""
    dev = model.embed.weight.device
    caches = [blk.attn.new_paged_kv_cache(num_blocks, block_size) for blk in model.blocks]
    seqs = [[c.add_sequence() for c in caches] for _ in prompts]  # the same ids in every layer's cache
    last = []
    for p, ids in zip(prompts, seqs):
        last.append(model(torch.tensor([p], device=dev), [c.bind([s]) for c, s in zip(caches, ids)])[0, -1])
    rows = [torch.stack(last)]  # [B, vocab]
    tokens = rows[0].argmax(-1, keepdim=True)  # [B, 1]
    out = [tokens]
    for _ in range(steps - 1):
        bound = [c.bind([ids[i] for ids in seqs]) for i, c in enumerate(caches)]
        rows.append(model(tokens, bound)[:, -1])
        tokens = rows[-1].argmax(-1, keepdim=True)
        out.append(tokens)
    for ids in seqs:
        for c, s in zip(caches, ids):
            c.free(s)
    # steps = 0: the prefill's token is not kept
    return torch.cat(out, dim=1)[:, :steps].tolist(), torch.stack(rows, dim=1)[:, :steps]


def logits_error(a: Tensor, b: Tensor) -> float:
    """Largest difference of two runs' logits, relative to their largest magnitude."""
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300) if b.numel() else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.steps < 0:
        ap.error(f"--steps must be >= 0, got {args.steps}")
    torch.manual_seed(0)
    model = TinyDecoder().to(device=args.device, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (5, 23, 40)]
    paged, paged_logits = generate_paged(model, prompts, args.steps, args.block_size)
    full, full_logits = generate_recompute(model, prompts, args.steps)
    for p, a, b in zip(prompts, paged, full):
        print(f"prompt of {len(p):2d} tokens -> {a}  {'==' if a == b else '!='} recompute")
    err = logits_error(paged_logits, full_logits)
    print(f"logits: largest difference {err:.1e} of their largest magnitude (float64; bound 1e-9)")
    return 0 if paged == full and err <= 1e-9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
