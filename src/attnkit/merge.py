"""Merging partial attention results of the same query rows by their log-sum-exp.

Attention over keys K1 and K2 together is the merge of the calls over K1 and over K2:
    lse = logaddexp(lse_1, lse_2),  out = out_1 exp(lse_1 - lse) + out_2 exp(lse_2 - lse).
Ring attention merges one partial per key shard; the `sdpa` backend merges the two key ranges
of a bottom-right causal call with Lq < Lk.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["merge_partial"]


def merge_partial(out: Tensor, lse: Tensor, part_out: Tensor, part_lse: Tensor) -> None:
    """out [.., L, Dv], lse [.., L] (float, in place) <- their log-sum-exp merge with a partial result.

    A row whose merged lse is -inf (nothing attended on either side) stays at out 0, never NaN.
    """
    part_lse = part_lse.to(lse.dtype)
    new = torch.logaddexp(lse, part_lse)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)
    w_old, w_new = torch.exp(lse - safe), torch.exp(part_lse - safe)
    out.mul_(w_old.unsqueeze(-1)).add_(part_out.to(out.dtype) * w_new.unsqueeze(-1))
    lse.copy_(new)
