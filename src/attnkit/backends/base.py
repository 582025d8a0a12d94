"""What a backend is: declared capabilities, a speed estimate, and a run method."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..request import AttentionRequest

__all__ = ["Capabilities", "Backend", "ALL_FEATURES"]

# Every feature name a request can need (AttentionRequest.features()).
ALL_FEATURES = frozenset(
    {
        "mask", "bias", "bias_grad", "causal", "window", "softcap", "score_mod", "mask_mod", "group_mask",
        "sinks", "dropout", "return_lse", "gqa", "value_head_dim", "backward",
        "kv_lengths",  # cache_seqlens given: per-sequence key lengths, per-sequence causal/window alignment
        "paged",  # block_table given: k/v are a block pool read through the table
    }
)


@dataclass(frozen=True)
class Capabilities:
    """A backend's static promise: where it runs and which features it honours exactly.

    `features_by_device` narrows `features` on a device (e.g. FlexAttention has
    no backward on the CPU). `notes` is free text shown by `explain`.
    """

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    features: frozenset[str]
    min_head_dim: int = 1
    max_head_dim: int | None = None
    head_dims: frozenset[int] | None = None  # an explicit allow-list, when only some dims compile
    features_by_device: dict[str, frozenset[str]] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.features) - ALL_FEATURES
        for feats in self.features_by_device.values():
            unknown |= set(feats) - ALL_FEATURES
        if unknown:
            raise ValueError(f"unknown feature names {sorted(unknown)}; known: {sorted(ALL_FEATURES)}")

    def features_on(self, device_type: str) -> frozenset[str]:
        return self.features_by_device.get(device_type, self.features)

    def missing(self, req: AttentionRequest) -> list[str]:
        """Human-readable list of what this backend lacks for req (empty = it can serve)."""
        out = []
        dev = req.device.type
        if dev not in self.devices:
            out.append(f"device '{dev}' (runs on {sorted(self.devices)})")
        if req.dtype not in self.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"dtype {str(req.dtype).replace('torch.', '')} (supports {names})")
        for d, name in ((req.head_dim, "head dim"), (req.head_dim_v, "value head dim")):
            if d < self.min_head_dim or (self.max_head_dim is not None and d > self.max_head_dim):
                out.append(f"{name} {d} (supports {self.min_head_dim}..{self.max_head_dim or 'any'})")
            elif self.head_dims is not None and d not in self.head_dims:
                out.append(f"{name} {d} (supports {sorted(self.head_dims)})")
        lacking = sorted(req.features() - self.features_on(dev))
        if lacking:
            out.append("feature " + ", ".join(f"'{f}'" for f in lacking) + f" on {dev}")
        return out


class Backend:
    """Base class. Subclasses set `name` and `capabilities` and implement `run`.

    `unsupported` and `speed` must depend on `req.signature` only (device,
    dtype, head dims, features): the dispatcher caches its choice per signature.
    """

    name: str = ""
    capabilities: Capabilities

    def available(self) -> str | None:
        """None when usable in this process, else why not (e.g. a missing package)."""
        return None

    def unsupported(self, req: AttentionRequest) -> str | None:
        """Why this backend cannot serve req, or None. Default: the capability table."""
        why = self.available()
        if why is not None:
            return why
        missing = self.capabilities.missing(req)
        return "missing " + "; ".join(missing) if missing else None

    def speed(self, req: AttentionRequest) -> float:
        """Expected relative speed on req (higher is faster); only compared across backends."""
        raise NotImplementedError

    def run(self, req: AttentionRequest) -> tuple[Tensor, Tensor | None]:
        """Compute (out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] float32 or None)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attnkit backend {self.name!r}>"
