#!/usr/bin/env bash
# One call on the GPU machine: `bash benchmarks/device_run.sh tests|bench|all`.
# tests: the CUDA-marked tests and the demo; bench: the benchmarks. Logs and results go to $OUT.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attnkit-out}
mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -m cuda -p no:cacheprovider tests/ > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -25
  python3 -m attnkit demo > "$OUT/demo.txt" 2>&1; echo "demo rc=$?"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/bench_attention.py --out "$OUT/bench" > "$OUT/bench_console.txt" 2>&1; echo "bench rc=$?"
  python3 benchmarks/bench_modules.py --out "$OUT/modules" > "$OUT/modules_console.txt" 2>&1; echo "modules rc=$?"
  python3 benchmarks/bench_mixed.py --out "$OUT/mixed" > "$OUT/mixed_console.txt" 2>&1; echo "mixed rc=$?"
  tail -14 "$OUT/modules_console.txt"
fi
