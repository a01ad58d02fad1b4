#!/usr/bin/env bash
# Every GPU benchmark in one run (H200, from the source tree): attention (forward, backward,
# per-token routing, against SDPA and FlexAttention), the scoring estimators, and the
# selection primitives. Logs and JSON go to $OUT (else /tmp/refattn_gpu_bench); each
# script's table is printed as it runs. Time limits per script: BENCH_TIMEOUT (default 200 s).
#
#   bash scripts/gpu_bench_all.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/refattn_cupy_cache}
LOG=${OUT:-/tmp/refattn_gpu_bench}
mkdir -p "$LOG"
T=${BENCH_TIMEOUT:-200}
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv 2>&1 | head -2
run() {  # name, script, args...
  local name=$1; shift
  echo "== $name: $*"
  timeout "$T" python3 "$@" --json "$LOG/$name.json" > "$LOG/$name.log" 2>&1
  echo "   rc=$?"
}
run attention scripts/bench_gpu.py --iters 5
run scoring scripts/bench_gpu_scoring.py
run estimate scripts/bench_gpu_scoring_estimate.py
run compressed scripts/bench_gpu_scoring_compressed.py
run select scripts/bench_gpu_select.py
echo "================ summary"
grep -hE 'TFLOP/s|^== S|^\| ' "$LOG"/attention.log | head -60
