"""Rotary position embeddings (Su et al. 2021) with linear, NTK and YaRN context extension."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._checks import positive_int, real

__all__ = ["RopeScaling", "RotaryEmbedding"]

_KINDS = ("none", "linear", "ntk", "yarn")


@dataclass(frozen=True)
class RopeScaling:
    """How to stretch RoPE beyond the trained context.

    kind: "none" (factor 1); "linear" (positions / factor, position interpolation);
    "ntk" (NTK-aware: base * factor ** (D / (D - 2))); "yarn" (per-frequency
    blend of interpolated and original frequencies, ramped linearly over the
    dimension pairs between those that turn beta_fast and beta_slow times over
    original_max_positions, as HF transformers' and vLLM's YaRN; cos/sin scaled
    by 0.1 * ln(factor) + 1).
    """

    kind: str = "none"
    factor: float = 1.0
    original_max_positions: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"rope_scaling kind must be one of {_KINDS}, got {self.kind!r}")
        if not 1.0 <= real("rope scaling factor", self.factor) < math.inf:
            raise ValueError(f"rope scaling factor must be finite and >= 1.0, got {self.factor!r}")
        if self.kind == "none" and self.factor != 1.0:
            raise ValueError(f"rope scaling kind 'none' takes factor 1.0, got {self.factor!r}; "
                             f"name the kind of scaling ('linear', 'ntk', 'yarn')")
        positive_int("original_max_positions", self.original_max_positions)
        if not math.inf > real("beta_fast", self.beta_fast) > real("beta_slow", self.beta_slow) > 0:
            raise ValueError(f"need finite beta_fast > beta_slow > 0, got {self.beta_fast}, {self.beta_slow}")

    @classmethod
    def parse(cls, spec) -> "RopeScaling":
        """A float factor (1.0 = none, else linear), a dict of fields, or a RopeScaling."""
        if isinstance(spec, RopeScaling):
            return spec
        if isinstance(spec, bool):
            raise TypeError(f"rope_scaling must be a float, dict or RopeScaling, got {spec!r}")
        if isinstance(spec, (int, float)):
            return cls("none" if spec == 1.0 else "linear", float(spec))
        if isinstance(spec, dict):
            return cls(**spec)
        raise TypeError(f"rope_scaling must be a float, dict or RopeScaling, got {type(spec).__name__}")


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position (rotate-half / GPT-NeoX layout: dims [0, D/2) pair with [D/2, D)).

    Args:
        head_dim: even D.
        base: frequency base theta.
        scaling: RopeScaling, a float factor or a dict (see RopeScaling).
        max_positions: initial size of the cos/sin tables; they grow on demand.

    `forward(q, k, positions=None)` with q [B, Hq, L, D], k [B, Hkv, L, D] and
    positions None (0..L-1), an int offset (offset..offset+L-1), or an integer
    tensor [L] or [B, L] of explicit positions. Returns rotated (q, k) in their dtypes.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling=1.0, max_positions: int = 2048):
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim >= 2, got {head_dim!r}")
        if not 1.0 < real("rope base", base) < math.inf:
            raise ValueError(f"rope base must be finite and > 1, got {base!r}")
        positive_int("max_positions", max_positions)
        self.head_dim, self.base = head_dim, float(base)
        self.scaling = RopeScaling.parse(scaling)
        if self.scaling.kind == "ntk" and head_dim < 4:  # its base exponent d / (d - 2) needs d > 2
            raise ValueError(f"ntk rope scaling needs head_dim >= 4, got {head_dim}")
        # Frequencies and tables are plain float64 attributes, not buffers: model.to(bf16)
        # must not round them (a bf16 angle at position 4000 is off by whole radians).
        self._inv64, self.mscale = self._frequencies()
        self._tables: dict[str, tuple[Tensor, Tensor]] = {}
        self._inv_by_device: dict[str, Tensor] = {}
        self._initial_positions = max_positions
        self._last_device = "cpu"
        self._table(max_positions, "cpu")

    def _frequencies(self) -> tuple[Tensor, float]:
        d, s = self.head_dim, self.scaling
        base = self.base
        if s.kind == "ntk":
            base = base * s.factor ** (d / (d - 2))
        inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        mscale = 1.0
        if s.kind == "linear":
            inv = inv / s.factor
        elif s.kind == "yarn":
            # As HF transformers and vLLM compute it (checkpoints are trained with theirs): the
            # dimension pairs that turn beta_fast / beta_slow times over the trained context, rounded
            # out to whole pairs, bound a ramp that is linear in the pair index. Pairs below it keep
            # their frequency, pairs above it are interpolated.
            def pair_at(turns: float) -> float:
                return d * math.log(s.original_max_positions / (turns * 2 * math.pi)) / (2 * math.log(base))

            low = max(math.floor(pair_at(s.beta_fast)), 0)
            high = min(math.ceil(pair_at(s.beta_slow)), d - 1)
            ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
            inv = ramp * inv / s.factor + (1 - ramp) * inv
            mscale = 0.1 * math.log(s.factor) + 1.0
        return inv, mscale  # float64: tables are built in double, sliced into the input's precision

    @property
    def cos_table(self) -> Tensor:
        """[positions, D/2] float64 cos table of the device used last (grows on demand)."""
        return self._tables[self._last_device][0]

    @property
    def sin_table(self) -> Tensor:
        return self._tables[self._last_device][1]

    @property
    def inv_freq(self) -> Tensor:
        """[D/2] float64 rotation frequencies (scaling applied)."""
        return self._inv64

    def _inv_on(self, device) -> Tensor:
        """inv_freq on device, copied once: a host-to-device copy inside CUDA-graph capture fails."""
        key = str(device)
        inv = self._inv_by_device.get(key)
        if inv is None:
            inv = self._inv_by_device[key] = self._inv64.to(device)
        return inv

    def _table(self, n: int, device) -> tuple[Tensor, Tensor]:
        """float64 cos/sin tables of at least n positions on device, grown on demand."""
        key = str(torch.device(device) if device is not None else torch.device("cpu"))
        cos, sin = self._tables.get(key, (None, None))
        if cos is None or cos.shape[0] < n:
            have = 0 if cos is None else cos.shape[0]
            size = max(n, 2 * have, self._initial_positions)
            t = torch.arange(size, dtype=torch.float64, device=key)
            ang = torch.outer(t, self._inv_on(key))
            cos, sin = torch.cos(ang) * self.mscale, torch.sin(ang) * self.mscale
            self._tables[key] = (cos, sin)
        self._last_device = key
        return cos, sin

    def cos_sin(self, length: int, positions=None, device=None) -> tuple[Tensor, Tensor]:
        """cos, sin [L, D/2] or [B, L, D/2] (float64) for the given positions."""
        if isinstance(positions, bool):
            raise TypeError(f"positions must be None, an int or an integer tensor, got {positions!r}")
        if positions is None or isinstance(positions, int):
            start = 0 if positions is None else positions
            if start < 0:
                raise ValueError(f"position offset must be >= 0, got {start}")
            cos, sin = self._table(start + length, device)
            return cos[start:start + length], sin[start:start + length]
        if not isinstance(positions, Tensor) or positions.dtype.is_floating_point or positions.dtype == torch.bool:
            raise TypeError(f"positions must be None, an int or an integer tensor, got {positions!r:.60}")
        if positions.dim() not in (1, 2) or positions.shape[-1] != length:
            raise ValueError(f"positions must be [L] or [B, L] with L = {length}, got {list(positions.shape)}")
        # Explicit positions: angles computed directly (no table lookup, no host sync).
        ang = positions.to(torch.float64).unsqueeze(-1) * self._inv_on(positions.device)
        return torch.cos(ang) * self.mscale, torch.sin(ang) * self.mscale

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [B, H, L, D]; cos/sin [L, D/2] or [B, L, D/2]."""
        if cos.dim() == 3:  # per-batch positions: [B, 1, L, D/2]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        ct = torch.promote_types(x.dtype, torch.float32)  # half inputs rotate in float32
        cos, sin = cos.to(ct), sin.to(ct)
        xf = x.to(ct)
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def forward(self, q: Tensor, k: Tensor, positions=None) -> tuple[Tensor, Tensor]:
        if q.shape[-1] != self.head_dim or k.shape[-1] != self.head_dim:
            raise ValueError(f"RoPE built for head_dim {self.head_dim}, got q {list(q.shape)}, k {list(k.shape)}")
        if q.dim() != 4 or k.dim() != 4 or k.shape[2] != q.shape[2]:
            raise ValueError(f"RoPE rotates q [B, Hq, L, D] and k [B, Hkv, L, D] of one length L (same positions), "
                             f"got q {list(q.shape)}, k {list(k.shape)}")
        if isinstance(positions, Tensor) and positions.dim() == 2 and positions.shape[0] not in (1, q.shape[0]):
            raise ValueError(f"positions [B, L] must have B = 1 or q's batch {q.shape[0]}, got {list(positions.shape)}")
        cos, sin = self.cos_sin(q.shape[2], positions, q.device)
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)
