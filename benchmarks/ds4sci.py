"""DeepSpeed's DS4Sci_EvoformerAttention kernels as a benchmark peer (issue 5), without DeepSpeed.

DeepSpeed ships these kernels (CUTLASS, derived from xformers' memory-efficient attention) as
sources that it compiles on first use; its Python package pulls in much that a benchmark does not
need. This module builds the same sources with torch's cpp_extension and calls the two entry points
they export, `attention` and `attention_bwd`, with the arguments DeepSpeed's own wrapper passes.

Set-up (the device has nvcc; nothing is fetched there):

    pip download --no-deps --no-binary=:all: deepspeed==0.19.8 -d D
    pip download --no-deps --only-binary=:all: nvidia-cutlass==4.2.0.0 -d D
    python benchmarks/ds4sci.py D/deepspeed-0.19.8.tar.gz D/nvidia_cutlass-4.2.0.0-py3-none-any.whl .ds

then, where the benchmark runs: ATTNKIT_DS4SCI_SRC=.ds/evo CUTLASS_PATH=.ds/cutlass (optional
ATTNKIT_DS4SCI_BUILD: the build directory). The set-up keeps only the bfloat16 / Sm80 branch of the
sources' dispatch macros (the kernels an H100 runs for bf16 inputs, unchanged), which cuts the build
to ~5 minutes on the device's 16 cores. `why()` says why the peer cannot run when it cannot.

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


def _setup(sdist: str, cutlass_wheel: str, dest: str) -> None:
    """Extract the evoformer sources and CUTLASS's headers into dest/evo and dest/cutlass, keeping
    only the bfloat16 / Sm80 branch of the sources' dispatch macros."""
    import re
    import shutil
    import tarfile
    import zipfile

    evo, cut = os.path.join(dest, "evo"), os.path.join(dest, "cutlass")
    prefix = "csrc/deepspeed4science/evoformer_attn/"
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name.split("/", 1)[-1]
            if m.isfile() and rel.startswith(prefix):
                out = os.path.join(evo, rel[len(prefix):])
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with tar.extractfile(m) as f, open(out, "wb") as g:
                    shutil.copyfileobj(f, g)
    with zipfile.ZipFile(cutlass_wheel) as z:
        for name in z.namelist():
            for src, dst in (("cutlass_library/source/include/", "include/"),
                             ("cutlass_library/source/tools/util/include/", "tools/util/include/")):
                if name.startswith(src) and not name.endswith("/"):
                    out = os.path.join(cut, dst + name[len(src):])
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with z.open(name) as f, open(out, "wb") as g:
                        shutil.copyfileobj(f, g)
    path = os.path.join(evo, "gemm_kernel_utils.h")
    text = open(path).read()
    one = (
        "#define DISPATCH_ARCHTAG(CC, func) { \\\n"
        "    EVOFORMER_CHECK((CC) >= 80, \"this build holds the Sm80 kernels only\"); \\\n"
        "    using ArchTag = cutlass::arch::Sm80; func; }\n\n"
        "#define DISPATCH_TYPES(tensor, func) { \\\n"
        "    EVOFORMER_CHECK(tensor.scalar_type() == at::ScalarType::BFloat16, \"this build holds bf16 only\"); \\\n"
        "    using scalar_t = cutlass::bfloat16_t; using torch_scalar_t = at::BFloat16; func; }\n\n")
    text, n = re.subn(r"#define DISPATCH_ARCHTAG.*?(?=#define DISPATCH_BOOL)", lambda _: one, text, flags=re.S)
    if n != 1:
        raise SystemExit(f"{path}: dispatch macros not found (another DeepSpeed version?)")
    open(path, "w").write(text)
    print(f"wrote {evo} and {cut}")


if __name__ == "__main__":
    import sys

    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("deepspeed_sdist", help="deepspeed-0.19.8.tar.gz")
    ap.add_argument("cutlass_wheel", help="nvidia_cutlass-4.2.0.0-py3-none-any.whl")
    ap.add_argument("dest", help="where the trimmed sources (evo/) and CUTLASS headers (cutlass/) go")
    args = ap.parse_args()
    _setup(args.deepspeed_sdist, args.cutlass_wheel, args.dest)
