"""Launching Triton kernels with little host overhead.

`kernel[grid](*args, **constexprs)` costs tens of microseconds of Python per launch in
Triton 3.6 (it re-derives the specialisation of every argument and builds a string key),
which at Evoformer sizes is as long as the kernel itself. `launch` keeps the compiled
kernel of each call under a cheap key that is finer than Triton's own specialisation key:
every int and float argument by value, every tensor by dtype and 16-byte alignment, the
constexprs, warps and stages. Two calls with equal keys would compile to the same kernel,
so the cached one is launched directly; a new key goes through Triton's normal path once
(which compiles, or finds its own cached kernel). Call sites keep each argument's Python
type fixed (a float parameter always gets a float), since 1 == 1.0 == True as dict keys.
Under the interpreter every call takes Triton's path.

`Launch` goes further for a call site that can key the launch itself (decode steps, where
every call repeats the last one's shapes): grid and non-tensor arguments are fixed when it is
built, so a launch reads only its tensors' dtypes and alignment. A few ints may instead be given
per call (a cache that grows by a token per step: its length and strides); a launch then also
reads what Triton specialises those on.
"""

from __future__ import annotations

import contextlib
import operator
import os
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._bounded import put

try:
    import triton
    from triton.runtime import driver
except ImportError:  # pragma: no cover - triton missing: the kernels report it
    triton = None

__all__ = ["launch", "Launch", "int_spec", "Cap", "INTERPRET", "OUT_OF_RESOURCES", "interpreting", "next_pow2",
           "block_dim", "cdiv", "on_device"]

# What Triton raises when a kernel's config does not fit the GPU (shared memory, registers).
OUT_OF_RESOURCES: tuple[type[BaseException], ...] = (
    (triton.runtime.errors.OutOfResources,) if triton is not None else ()
)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton decides interpretation when the kernels are defined (import time): so do we.
INTERPRET = interpreting()


def next_pow2(n: int) -> int:
    """The next power of two >= n, in plain Python (triton.next_power_of_2 and triton.cdiv are
    JIT functions: ~10 us per call from the host)."""
    return 1 << max(0, n - 1).bit_length()


def block_dim(d: int) -> int:
    """The tile width covering a head dim of d (a power of two, at least 16 for tl.dot)."""
    return max(16, next_pow2(d))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def on_device(t: Tensor):
    """Launch on t's GPU (Triton launches on the current device). No guard when t is on the current
    device already (the usual case: entering and leaving torch.cuda.device costs microseconds)."""
    if not t.is_cuda or t.device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


class Cap(NamedTuple):
    """A register cap per thread, and the local memory (Triton's n_spills: 32-bit words) that a build
    under it may spill and still be kept. A plain int cap allows none."""

    regs: int
    spills: int = 0


Caps = int | Cap | tuple[int | Cap, ...] | None

_CACHE: dict[tuple, Any] = {}
_MAX_ENTRIES = 512
_LAYOUTS: dict[tuple, tuple] = {}


def _layout(kernel, args: tuple) -> tuple:
    """Where the tensors sit among a kernel's positional arguments (fixed per call site), and
    C-level getters for the tensors and for the rest."""
    key = (kernel, len(args))
    hit = _LAYOUTS.get(key)
    if hit is None:
        tensors = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        others = [i for i in range(len(args)) if i not in tensors]
        hit = _LAYOUTS[key] = (_getter(tensors), _getter(others))
    return hit


def _getter(idx: list[int]):
    if not idx:
        return lambda args: ()
    if len(idx) == 1:
        return lambda args, i=idx[0]: (args[i],)
    return operator.itemgetter(*idx)


def launch(kernel, grid: tuple, args: tuple, consts: dict, *, num_warps: int, num_stages: int,
           interpret: bool, maxnreg: Caps = None) -> None:
    """Run `kernel[grid](*args, **consts, num_warps=, num_stages=)`.

    args are the kernel's leading parameters, in order; consts name all the rest (its constexprs).
    maxnreg: a register cap per thread (more programs per multiprocessor), or caps to try in order:
    the first under which the compiler fits the kernel without spilling to local memory (or within
    a Cap's allowance) is kept (none: the uncapped build).
    """
    if interpret:
        kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        return
    device = driver.active.get_current_device()
    tensors, others = _layout(kernel, args)
    try:
        spec = tuple([(t.dtype, not t.data_ptr() & 15) for t in tensors(args)])
    except AttributeError:  # a call site put a tensor where another call had something else
        kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        return
    key = (kernel, device, num_warps, num_stages, maxnreg, tuple(consts.values()), others(args), spec)
    hit = _CACHE.get(key)
    if hit is None:
        compiled = _compile(kernel, grid, args, consts, num_warps, num_stages, maxnreg)
        put(_CACHE, key, (compiled, *_direct(compiled)), _MAX_ENTRIES)
        return
    names = kernel.arg_names[len(args):]  # the constexprs, in the kernel's parameter order
    grid3 = tuple(grid) + (1,) * (3 - len(grid))  # a compiled kernel's runner reads all three axes
    _run(hit, grid3, driver.active.get_current_stream(device), args + tuple(consts[n] for n in names))


def _compile(kernel, grid: tuple, args: tuple, consts: dict, num_warps: int, num_stages: int,
             maxnreg: Caps = None):
    """Launch through Triton's own path (which compiles, or finds its cached kernel); return the
    compiled kernel it ran. With maxnreg (a cap, or caps in order), the first capped build that does
    not spill (or spills within its Cap's allowance) runs."""
    for cap in (maxnreg,) if isinstance(maxnreg, (int, Cap)) else maxnreg or ():
        regs, allowed = (cap, 0) if isinstance(cap, int) else cap
        try:
            capped = kernel.warmup(*args, **consts, grid=grid, num_warps=num_warps, num_stages=num_stages,
                                   maxnreg=regs)
            if hasattr(capped, "result"):
                capped = capped.result()
            capped._init_handles()  # loads the module: n_spills is known from here on
        except Exception:  # noqa: BLE001 - a cap too tight to build at all (Triton raises): try the next
            capped = None
        if capped is not None and capped.n_spills <= allowed:
            names = kernel.arg_names[len(args):]
            device = driver.active.get_current_device()
            capped[tuple(grid) + (1,) * (3 - len(grid))](*args, *(consts[n] for n in names),
                                                         stream=driver.active.get_current_stream(device))
            return capped
    compiled = kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
    if hasattr(compiled, "result"):  # an asynchronous compile
        compiled = compiled.result()
    return compiled


class Launch:
    """One launch of `kernel` on one device with its grid, non-tensor arguments and constexprs fixed:
    called with the tensors only, as `Launch(...)(*tensors)`, with `device` current (on_device).

    For kernels whose parameters are the tensors, then `rest` (ints and floats, in order), then
    the constexprs named in `consts`. The call site keeps it under a key of everything `rest`,
    `consts` and grid derive from (shapes, strides, flags) and the device; a launch then reads
    only what Triton also specialises on and the key cannot hold: each tensor's dtype and
    16-byte alignment. As with `launch`, a new combination takes Triton's path once, and the
    interpreter always does.

    With `ints=n`, the n parameters after the tensors are given per call instead, as
    `Launch(...)(*tensors, ints=(...))`, and `rest` holds those after them: values the key need not
    hold (a growing cache's length and strides). A launch then also reads what Triton specialises
    ints on (== 1, a multiple of 16, 32 or 64 bits: `int_spec`), so one compiled kernel never runs
    values it was not compiled for.
    """

    __slots__ = ("kernel", "grid", "grid3", "rest", "consts", "tail", "n_ints", "num_warps", "num_stages",
                 "maxnreg", "interpret", "device", "_compiled")

    def __init__(self, kernel, grid: tuple, rest: tuple, consts: dict, *, num_warps: int, num_stages: int,
                 interpret: bool, device: int | None = None, maxnreg: Caps = None, ints: int = 0):
        self.kernel, self.grid, self.rest, self.consts = kernel, tuple(grid), tuple(rest), consts
        self.grid3 = self.grid + (1,) * (3 - len(self.grid))  # a compiled kernel's runner reads all three axes
        names = kernel.arg_names[len(kernel.arg_names) - len(consts):]  # the constexprs, in parameter order
        self.tail = self.rest + tuple(consts[n] for n in names)
        self.n_ints = ints
        self.num_warps, self.num_stages, self.maxnreg, self.interpret = num_warps, num_stages, maxnreg, interpret
        self.device = device  # the CUDA device index (None: the interpreter)
        self._compiled: dict[tuple, Any] = {}

    def __call__(self, *tensors: Tensor, ints: tuple = ()) -> None:
        if len(ints) != self.n_ints:
            raise TypeError(f"Launch of {self.kernel.__name__}: expected {self.n_ints} ints per call, "
                            f"got {len(ints)}")
        if self.interpret:
            self.kernel[self.grid](*tensors, *ints, *self.rest, **self.consts, num_warps=self.num_warps,
                                   num_stages=self.num_stages)
            return
        ptrs = [t.data_ptr() for t in tensors]
        spec = (*[t.dtype for t in tensors], *[not p & 15 for p in ptrs], *map(int_spec, ints))
        hit = self._compiled.get(spec)
        if hit is None:
            compiled = _compile(self.kernel, self.grid, tensors + ints + self.rest, self.consts, self.num_warps,
                                self.num_stages, self.maxnreg)
            self._compiled[spec] = (compiled, *_direct(compiled))
            return
        # pointers as ints for the launcher: it then neither calls data_ptr() nor queries the driver per tensor
        _run(hit, self.grid3, driver.active.get_current_stream(self.device), (*tensors, *ints, *self.tail),
             direct_args=(*ptrs, *ints, *self.tail))


_I32 = 1 << 31


def int_spec(x: int) -> int:
    """What Triton (3.6) specialises an int argument on, as a small int: 1 becomes a constant (-1);
    otherwise its width (i32 or i64: + 2) and whether it is a multiple of 16 (+ 1)."""
    if x == 1:
        return -1
    return (not x & 15) + (0 if -_I32 <= x < _I32 else 2)


def _run(hit: tuple, grid3: tuple, stream, args: tuple, direct_args: tuple | None = None) -> None:
    """Launch a cached (compiled, fn, lead) entry (see _direct) with all its arguments, constexprs
    included: through the launcher directly (with direct_args, if given) when no launch hook (a
    profiler) is registered, else through the compiled kernel's runner."""
    compiled, fn, lead = hit
    if fn is not None and not (knobs.runtime.launch_enter_hook.calls or knobs.runtime.launch_exit_hook.calls):
        fn(*grid3, stream, *lead, *(args if direct_args is None else direct_args))
    else:
        compiled[grid3](*args, stream=stream)


def _direct(compiled) -> tuple:
    """(fn, lead): `fn(gx, gy, gz, stream, *lead, *args)` launches `compiled` as its runner
    (CompiledKernel.__getitem__, Triton 3.6) does with no launch hook: the launcher's C entry point
    itself when the kernel needs no scratch memory (CudaLauncher.__call__ would only pass None for
    it), else the launcher. (None, None) off Triton 3.6."""
    if not _DIRECT:
        return None, None
    runner = compiled.run
    if type(runner).__name__ == "CudaLauncher" and not runner.global_scratch_size and not runner.profile_scratch_size:
        return runner.launch, (compiled.function, runner.launch_cooperative_grid, runner.launch_pdl, None, None,
                               compiled.packed_metadata, None, None, None)
    return runner, (compiled.function, compiled.packed_metadata, None, None, None)


# Triton 3.6's `compiled[grid](*args, stream=)` builds a closure and a launch-metadata dict and
# calls the launch hooks (empty HookChains unless a profiler is attached) around every launch:
# microseconds per launch (a decode step; the three launches of a training step's attention).
# With no hook registered, _run calls the kernel's launcher with what that path would pass
# (triton/compiler/compiler.py CompiledKernel.__getitem__ and backends/nvidia/driver.py
# CudaLauncher.__call__, 3.6). Launch passes pointers as ints (which its getPointer takes as they
# are), `launch` the tensors themselves. Other Triton versions keep the public path.
_DIRECT = triton is not None and triton.__version__.startswith("3.6.")
if _DIRECT:
    from triton import knobs
