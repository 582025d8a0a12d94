"""DeepSpeed's DS4Sci_EvoformerAttention kernels as a benchmark peer (issue 5), without DeepSpeed.

DeepSpeed ships these kernels (CUTLASS, derived from xformers' memory-efficient attention) as
sources that it compiles on first use; its Python package pulls in much that a benchmark does not
need. This module builds the same sources with torch's cpp_extension and calls the two entry points
they export, `attention` and `attention_bwd`, with the arguments DeepSpeed's own wrapper passes.

Set-up (the device has nvcc; nothing is fetched):
- ATTNKIT_DS4SCI_SRC: DeepSpeed's `csrc/deepspeed4science/evoformer_attn` directory (from its sdist);
- CUTLASS_PATH: a directory holding `include/cutlass/cutlass.h` (the nvidia-cutlass wheel's
  `cutlass_library/source` will do);
- optional ATTNKIT_DS4SCI_BUILD: the build directory (kept between calls of one machine).
`available()` says why the peer cannot run when it cannot.

Layout: DeepSpeed takes q, k, v as [B, N, L, H, D] (N: MSA rows or triangle rows) and the pair bias as
[B, 1, H, L, L]; its softmax scale is fixed at 1 / sqrt(D) and it supports D <= 64 and L > 16.
`to_native` and `to_common` convert from and to attnkit's [N, H, L, D] outside the timed calls.
"""

from __future__ import annotations

import os

import torch

_EXT = None
_WHY: str | None = None


def _paths() -> tuple[str, str] | str:
    src, cutlass = os.environ.get("ATTNKIT_DS4SCI_SRC"), os.environ.get("CUTLASS_PATH")
    if not src or not os.path.isfile(os.path.join(src, "attention_back.cu")):
        return "set ATTNKIT_DS4SCI_SRC to DeepSpeed's csrc/deepspeed4science/evoformer_attn"
    if not cutlass or not os.path.isfile(os.path.join(cutlass, "include", "cutlass", "cutlass.h")):
        return "set CUTLASS_PATH to a directory with include/cutlass/cutlass.h"
    return src, cutlass


def load():
    """The compiled extension (built on the first call; some minutes), or None with `why()` set."""
    global _EXT, _WHY
    if _EXT is not None or _WHY is not None:
        return _EXT
    paths = _paths()
    if isinstance(paths, str):
        _WHY = paths
        return None
    if not torch.cuda.is_available():
        _WHY = "CUDA only"
        return None
    src, cutlass = paths
    major, minor = torch.cuda.get_device_capability()
    from torch.utils import cpp_extension

    build = os.environ.get("ATTNKIT_DS4SCI_BUILD") or os.path.join(os.path.expanduser("~"), ".cache", "ds4sci")
    os.makedirs(build, exist_ok=True)
    try:
        _EXT = cpp_extension.load(
            name="ds4sci_evoformer_attn",
            sources=[os.path.join(src, f) for f in ("attention.cpp", "attention_back.cu", "attention_cu.cu")],
            extra_include_paths=[src, os.path.join(cutlass, "include"),
                                 os.path.join(cutlass, "tools", "util", "include")],
            # the flags DeepSpeed's builder gives nvcc that matter here, for this device's arch only
            extra_cuda_cflags=["-O3", "--use_fast_math", "-std=c++17", "--expt-relaxed-constexpr",
                               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                               "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                               f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
            build_directory=build, verbose=False)
    except Exception as exc:  # a peer that does not build is reported, not fatal
        _WHY = f"build failed: {type(exc).__name__}: {str(exc)[-600:]}"
    return _EXT


def why() -> str | None:
    """Why the peer is unavailable (None once it has loaded, or before load() was called)."""
    return _WHY


class _Evoformer(torch.autograd.Function):
    """DeepSpeed's kernels on native-layout tensors: q, k, v [B, N, L, H, D], bias [B, 1, H, L, L]."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        ext = load()
        B, N, L, H, _ = q.shape
        o = torch.empty_like(q)
        # the kernel writes the log-sum-exp for query rows rounded up to 32
        lse = torch.empty(B * N, H, (L + 31) // 32 * 32, device=q.device, dtype=torch.float32)
        none = q.new_empty(0)  # bias1, the [B, N, 1, 1, L] mask bias: not used here
        ext.attention(q, k, v, none, bias, o, lse)
        ctx.save_for_backward(q, k, v, o, lse, bias)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, bias = ctx.saved_tensors
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if ctx.needs_input_grad[3] \
            else lse.new_empty(0)
        load().attention_bwd(do.contiguous(), q, k, v, o, lse, torch.empty_like(lse), q.new_empty(0), bias,
                             dq, dk, dv, lse.new_empty(0), dbias)
        return dq, dk, dv, dbias.to(bias.dtype) if ctx.needs_input_grad[3] else None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + bias) v on native-layout, contiguous tensors (see the module doc)."""
    return _Evoformer.apply(q, k, v, bias)


def to_native(t: torch.Tensor, kind: str) -> torch.Tensor:
    """attnkit layout -> DeepSpeed's, contiguous: q/k/v [N, H, L, D] -> [1, N, L, H, D];
    bias [1, H, L, L] -> [1, 1, H, L, L]."""
    if kind == "bias":
        return t.unsqueeze(0).contiguous()
    return t.transpose(1, 2).unsqueeze(0).contiguous()


def to_common(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The inverse of to_native, as a view."""
    return t[0] if kind == "bias" else t[0].transpose(1, 2)
