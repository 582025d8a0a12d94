#!/usr/bin/env python
"""Build attnkit's flash kernels for sm_90a without a GPU: registers, spills, layout conversions.

    python benchmarks/offline_build.py --L 300 --D 32 --bias pair [--mask key] [--causal] [--cfg 64 64 4 3]

For each kernel (forward, dQ, dK/dV) of one problem, compiles it with Triton (its ptxas ships with
the wheel) for an H100 (sm_90a) and prints ptxas's register count and spill stores, the number of
`convert_layout` ops in the TTGIR (each one a trip through shared memory; 5 in the dense biased
forward's clean build), and the size of the innermost tensor-core loops in the SASS (nvdisasm, also in
the wheel): instructions per iteration, and per tile element of a thread (BLOCK_M * BLOCK_N /
threads: "per score"; the dQ kernel's paired rows hold two tiles). The forward's interior loop issued
12.5 per score before the bias widening and the guards were trimmed, 11.2 after (L = 512, D = 32). It runs on a CPU-only machine: device time is scarce, and this is how the
off-grid-length slowdown of issue 5 (255 registers, spills, 13 conversions) was found. The GPU is
never touched: a stand-in for Triton's driver reports an sm_90 target, and the arguments are CPU
tensors built by the same call builders (`_fwd_call`, `_dq_call`, `_dkdv_call`) that launch the
kernels. Timing still needs the device.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class _Hopper:
    """The part of Triton's active driver that compiling (not launching) reads."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def ptxas_stats(ptx: str) -> tuple[int, int]:
    """(registers, spill-store bytes) of a PTX module as ptxas builds it for sm_90a."""
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, "-arch=sm_90a", "-v", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True, check=True)
    out = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", out).group(1)
    return int(regs), int(re.search(r"(\d+) bytes spill stores", out).group(1))


def loop_sizes(cubin: bytes) -> list[int]:
    """Instruction counts of the innermost loops (backward branches) that issue tensor-core MMAs."""
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([exe, "-c", path], capture_output=True, text=True, check=True).stdout
    ins, labels = [], {}
    for line in sass.splitlines():
        m = re.match(r"\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if m:
            ins.append(m.group(1))
    loops = [(labels[m.group(1)], i) for i, text in enumerate(ins)
             if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", text)) and labels.get(m.group(1), i) < i]
    inner = [(a, b) for a, b in loops if not any(a <= c and e <= b and (c, e) != (a, b) for c, e in loops)]
    return [b - a + 1 for a, b in inner if any("GMMA" in t or "HMMA" in t for t in ins[a:b + 1])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=512, help="Lq = Lk")
    ap.add_argument("--D", type=int, default=32)
    ap.add_argument("--bias", choices=["none", "pair", "key"], default="pair",
                    help="pair: [1, H, L, L] with its gradient; key: [B, 1, 1, L]")
    ap.add_argument("--mask", choices=["none", "key", "full"], default="none")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--window", type=int, default=None, help="left window (keys before the diagonal)")
    ap.add_argument("--softcap", type=float, default=None)
    ap.add_argument("--cfg", type=int, nargs=4, default=None, metavar=("BM", "BN", "WARPS", "STAGES"),
                    help="one config for all three kernels (default: each kernel's _config)")
    ap.add_argument("--maxnreg", type=int, default=None,
                    help="register cap for all three kernels (default: each kernel's _maxnreg caps, tried in "
                         "order as _launch does: the first that spills within its allowance is kept)")
    args = ap.parse_args()

    driver.set_active(_Hopper())
    from attnkit.ops import flash_attention as fa  # after the stand-in: the module reads the driver on import

    B, H, L, D = 4, 2, args.L, args.D
    q, k, v, do = (torch.randn(B, H, L, D, dtype=torch.bfloat16) for _ in range(4))
    bias = {"none": None, "pair": torch.randn(1, H, L, L), "key": torch.randn(B, 1, 1, L)}[args.bias]
    bias = fa._aligned(bias.to(torch.bfloat16)) if bias is not None else None
    mask = {"none": None, "key": torch.rand(B, 1, 1, L) > 0.1, "full": torch.rand(B, 1, L, L) > 0.1}[args.mask]
    mask = fa._aligned(mask)
    bounds = (args.window, 0) if args.window is not None else ((None, 0) if args.causal else None)
    layout, scale = fa.dense_layout(L, L), D ** -0.5
    cfgs = fa._config(D, D, False, False, fa._batch_rows(bias, bias is not None, B))
    if args.cfg:
        cfgs = {kind: tuple(args.cfg) for kind in cfgs}
    o, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
    lse, delta = torch.empty(B, H, L), torch.empty(B, H, L)
    m, bt = fa._bits(mask, q), bias if bias is not None else q
    lv = torch.zeros(2, dtype=torch.int32)  # the live table's stand-in (fa._live): built, never read
    dbias = fa._padded(bias.shape, torch.float32, "cpu") if bias is not None else None
    kernels = {
        "fwd": (fa._fwd_kernel, fa._fwd_call(q, k, v, o, mask, bias, None, layout, scale, args.softcap, bounds,
                                                cfgs["fwd"]),
                (q, k, v, o, lse, m, bt, q, lv)),
        "dq": (fa._bwd_dq_kernel, fa._dq_call(q, k, v, do, dq, o, False, mask, bias, dbias, layout, scale, args.softcap, bounds,
                                              cfgs["dq"]),
               (q, k, v, do, dq, lse, delta, m, bt, dbias if dbias is not None else q, o, delta, lv)),
        "dkdv": (fa._bwd_dkdv_kernel, fa._dkdv_call(q, k, v, do, dk, dv, mask, bias, layout, scale, args.softcap, bounds,
                                                    cfgs["dkdv"]),
                 (q, k, v, do, dk, dv, lse, delta, m, bt, lv)),
    }
    print(f"L={L} D={D} bias={args.bias} mask={args.mask} bounds={bounds} softcap={args.softcap} (sm_90a, triton {triton.__version__})")
    for name, (kernel, (tabs, grid, rest, consts, opts, _), tensors) in kernels.items():
        caps = (args.maxnreg,) if args.maxnreg is not None else opts["maxnreg"]
        caps = (caps,) if isinstance(caps, (int, fa._launch.Cap)) else caps or ()
        note = ""
        for cap in (*caps, None):  # as _launch does: the first cap whose build spills within its allowance
            cap_regs, allowed = fa._launch.Cap(cap) if isinstance(cap, int) else cap or (None, 0)
            built = kernel.warmup(*tensors, *tabs, *rest, **consts, grid=grid, num_warps=opts["num_warps"],
                                  num_stages=opts["num_stages"], **({"maxnreg": cap_regs} if cap_regs else {}))
            regs, spills = ptxas_stats(built.asm["ptx"])
            if cap is None or spills <= 4 * allowed or args.maxnreg is not None:  # a command-line cap stays
                note += f"  (cap {cap_regs}{f', {4 * allowed} B of spills allowed' if allowed else ''})" if cap else ""
                break
            note += f"  (cap {cap_regs}: spills, dropped)"
        conv = built.asm["ttgir"].count("ttg.convert_layout")
        cfg = (consts["BLOCK_M"], consts["BLOCK_N"], opts["num_warps"], opts["num_stages"])
        per = cfg[0] * cfg[1] / (32 * cfg[2])  # tile elements per thread
        loops = ", ".join(f"{n} ({n / per:.1f} per score)" for n in loop_sizes(built.asm["cubin"]))
        print(f"  {name:5s} {str(cfg):18s} registers {regs:3d}  spill stores {spills:5d} B  layout conversions {conv}"
              + note + f"\n        innermost MMA loops: {loops}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
