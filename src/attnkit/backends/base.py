"""What a backend is: declared capabilities, a speed estimate, and a run method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..request import AttentionRequest

__all__ = ["Capabilities", "Backend", "ALL_FEATURES", "recompute_backward"]

# Every feature name a request can need (AttentionRequest.features()).
ALL_FEATURES = frozenset(
    {
        "mask", "bias", "bias_grad", "causal", "window", "softcap", "score_mod", "mask_mod", "group_mask",
        "sinks", "dropout", "return_lse", "gqa", "value_head_dim", "backward",
        "kv_lengths",  # cache_seqlens given: per-sequence key lengths, per-sequence causal/window alignment
        "paged",  # block_table given: k/v are a block pool read through the table
        # score_mod reads a tensor requiring grad from where the closure scan cannot find it (a global)
        "score_mod_grad_elsewhere",
    }
)


@dataclass(frozen=True)
class Capabilities:
    """A backend's static promise: where it runs and which features it honours exactly.

    `features_by_device` narrows `features` on a device (e.g. FlexAttention has
    no backward on the CPU). `exclusive_by_device` names, per device, features that are served
    but not together with some others (feature -> those others; e.g. sdpa's return_lse with
    dropout). `notes` is free text shown by `explain`.
    """

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    features: frozenset[str]
    min_head_dim: int = 1
    max_head_dim: int | None = None
    head_dims: frozenset[int] | None = None  # an explicit allow-list, when only some dims compile
    features_by_device: dict[str, frozenset[str]] = field(default_factory=dict)
    exclusive_by_device: dict[str, dict[str, frozenset[str]]] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.features) - ALL_FEATURES
        for feats in self.features_by_device.values():
            unknown |= set(feats) - ALL_FEATURES
        for rules in self.exclusive_by_device.values():
            for feat, others in rules.items():
                unknown |= ({feat} | set(others)) - ALL_FEATURES
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
        feats = req.features()
        lacking = sorted(feats - self.features_on(dev))
        if lacking:
            out.append("feature " + ", ".join(f"'{f}'" for f in lacking) + f" on {dev}")
        for feat, others in self.exclusive_by_device.get(dev, {}).items():
            clash = sorted(feats & others)
            if feat in feats and clash:
                out.append(f"feature '{feat}' together with " + ", ".join(f"'{f}'" for f in clash) + f" on {dev}")
        return out


class Backend:
    """Base class. Subclasses set `name` and `capabilities` and implement `run`.

    `unsupported` and `speed` must depend on `req.signature` only (device,
    dtype, head dims, features, whether the call is decode-shaped or a wide
    causal chunk, one query or more): the dispatcher caches its choice per signature.
    """

    name: str = ""
    capabilities: Capabilities
    # Exceptions that mean "could not build a kernel for this call": a compiler's failure (for flex,
    # Inductor's BackendCompilerFailed, whatever its cause: out of shared memory, a lowering it lacks, a
    # device out of memory while it autotunes) or a config that does not fit the GPU (Triton's
    # OutOfResources). Under `auto` the dispatcher then runs the next backend (`dispatch.serve`). Never
    # Exception or RuntimeError: a wrong input or a bug of the run must reach the caller.
    build_errors: tuple[type[BaseException], ...] = ()

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

    def prepare(self, req: AttentionRequest):
        """For a call against a cache (`request.replay_key`), a function that runs it and every later
        call with its key from their tensors alone, as run(req) would: `fn(q, k, v, cache_seqlens,
        block_table, sinks) -> (out, lse or None)`; the dispatcher keeps it. None (the default):
        such calls are built into requests and run."""
        return None

    def backward_from_stats(
        self, req: AttentionRequest, do: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(dq, dk, dv) of req's attention at (do, dlse), from the GIVEN out and lse (`attention_backward`).

        P = exp(S - lse), delta = rowsum(do * out) - dlse, dS = P * (do v^T - delta): no forward
        is recomputed where a kernel reads saved statistics. req is a `for_backward` request
        (`check_stats` has checked do/out [B, Hq, Lq, Dv] and made lse/dlse contiguous float32).
        Runs under no_grad. Default: `recompute_backward` (exact on every backend that can run
        req with gradients, at the cost of one forward); backends with such a kernel override it.
        """
        return recompute_backward(self, req, do, out, lse, dlse)

    def __repr__(self) -> str:
        return f"<attnkit backend {self.name!r}>"


def recompute_backward(
    backend: Backend, req: AttentionRequest, do: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The generic `backward_from_stats`: recompute the call's own (out_s, lse_s) on `backend` and
    differentiate them with

        g_out = w * do,   g_lse = w * (rowsum(do * out_s) - delta),   w = exp(lse_s - lse)

    (delta = rowsum(do * out) - dlse; w = 0 where lse or lse_s is -inf). The backend's own score
    gradient P_s * (g_out v^T - rowsum(g_out * out_s)) + g_lse * P_s then equals
    exp(S - lse) * (do v^T - delta), the gradient from the given statistics (docs/distributed.md).
    """
    ct = lse.dtype
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in (req.q, req.k, req.v))
        bias = req.bias.detach() if req.bias is not None else None
        sub = dataclasses.replace(req, q=q, k=k, v=v, bias=bias, return_lse=True, for_backward=False)
        o_s, l_s = backend.run(sub)
    lse_safe = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    w = torch.exp(l_s.detach().to(ct) - lse_safe)
    do_c = do.to(ct)
    delta = (do_c * out.to(ct)).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    g_out = (w.unsqueeze(-1) * do_c).to(o_s.dtype)
    g_lse = (w * ((do_c * o_s.detach().to(ct)).sum(-1) - delta)).to(l_s.dtype)
    grads = torch.autograd.grad((o_s, l_s), (q, k, v), (g_out, g_lse), allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, (q, k, v)))
