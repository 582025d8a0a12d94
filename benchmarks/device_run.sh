#!/usr/bin/env bash
# One call on the GPU machine: `bash benchmarks/device_run.sh tests|bench|all [SHARDS]`,
# or `bash benchmarks/device_run.sh ids FILE [SHARDS]` for the CUDA tests whose node ids FILE lists.
# tests: the CUDA-marked tests in SHARDS parallel pytest processes (default 6; node ids dealt out
# round-robin, each shard under a time limit, TEST_LIMIT_S, default 520 s, so that one call stays
# inside a 10-minute lease command) and beside them the demo; bench: the benchmarks. Logs and results go to
# $OUT. On a machine that starts cold, compiling the kernels takes most of the time: a shard that
# hits its limit names the ids it did not reach in $OUT/not_run.txt, for
# `bash benchmarks/device_run.sh ids $OUT/not_run.txt` in the next call.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attnkit-out}
mkdir -p "$OUT"
what=${1:-all}
if [ "$what" = ids ]; then shards=${3:-6}; else shards=${2:-6}; fi
limit=${TEST_LIMIT_S:-520}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

run_ids() {  # run_ids FILE: those node ids in $shards parallel shards
  local i pids=()
  grep '::' "$1" > "$OUT/ids_all.txt"  # a copy: FILE may be a pipe
  rm -f "$OUT/not_run.txt" "$OUT"/ids_[0-9]*.txt "$OUT"/gpu_tests_[0-9]*.log
  for i in $(seq 0 $((shards - 1))); do
    awk -v n="$shards" -v i="$i" 'NR % n == i' "$OUT/ids_all.txt" > "$OUT/ids_$i.txt"
    [ -s "$OUT/ids_$i.txt" ] || continue  # no ids: pytest would run every test
    timeout "$limit" python3 -m pytest -q -rfEs -m cuda -p no:cacheprovider $(cat "$OUT/ids_$i.txt") \
      > "$OUT/gpu_tests_$i.log" 2>&1 &
    pids+=($!)
  done
  [ ${#pids[@]} -eq 0 ] || wait "${pids[@]}"  # the shards only (a demo started beside them is waited for by its caller)
  for i in $(seq 0 $((shards - 1))); do
    local last done_n
    [ -s "$OUT/ids_$i.txt" ] || continue
    last=$(tail -1 "$OUT/gpu_tests_$i.log")
    echo "shard $i: $last"
    grep -E '^(FAILED|ERROR)' "$OUT/gpu_tests_$i.log" | head -20
    if ! echo "$last" | grep -qE ' in [0-9.]+s'; then  # no summary line: cut off after the progress dots
      done_n=$(grep -E '^[.sFEx]+( +\[ *[0-9]+%\])?$' "$OUT/gpu_tests_$i.log" | tr -cd '.sFEx' | wc -c)
      echo "  cut off after $done_n tests, failed or errored among them: $(grep -E '^[.sFEx]+( +\[ *[0-9]+%\])?$' "$OUT/gpu_tests_$i.log" | tr -cd 'FE' | wc -c)"
      tail -n +$((done_n + 1)) "$OUT/ids_$i.txt" >> "$OUT/not_run.txt"
    fi
  done
  [ -f "$OUT/not_run.txt" ] && echo "not run (time limit): $(wc -l < "$OUT/not_run.txt") ids in $OUT/not_run.txt"
}

if [ "$what" = ids ]; then
  run_ids "$2"
  exit 0
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -m cuda -p no:cacheprovider --collect-only tests/ 2>/dev/null | grep '::' > "$OUT/ids.txt"
  echo "collected $(wc -l < "$OUT/ids.txt") CUDA tests"
  # the demo beside the shards, under the same limit: after them it would start past it on a cold machine
  (timeout "$limit" python3 -m attnkit demo > "$OUT/demo.txt" 2>&1; echo "demo rc=$?" > "$OUT/demo_rc.txt") &
  run_ids "$OUT/ids.txt"
  wait
  cat "$OUT/demo_rc.txt"; echo "demo rows marked BAD: $(grep -c 'BAD (over' "$OUT/demo.txt")"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/bench_attention.py --out "$OUT/bench" > "$OUT/bench_console.txt" 2>&1; echo "bench rc=$?"
  python3 benchmarks/bench_modules.py --out "$OUT/modules" > "$OUT/modules_console.txt" 2>&1; echo "modules rc=$?"
  python3 benchmarks/bench_mixed.py --out "$OUT/mixed" > "$OUT/mixed_console.txt" 2>&1; echo "mixed rc=$?"
  tail -14 "$OUT/modules_console.txt"
fi
