#!/usr/bin/env bash
# GPU check: refattn's CUDA tests and benchmark, run from the source tree (PYTHONPATH=.).
#
#   scripts/gpu_check.sh [all|tests|bench] [extra bench_gpu.py arguments...]
#
# Logs go to $OUT when set (the device tool's result folder), else /tmp/refattn_gpu_check:
# gpu_tests.log, bench.log, bench.json. A short summary is printed last.
# Time limits: TEST_TIMEOUT (default 300 s) and BENCH_TIMEOUT (default 420 s).
set -u
cd "$(dirname "$0")/.."
MODE=${1:-all}
[ $# -gt 0 ] && shift
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/refattn_cupy_cache}
LOG=${OUT:-/tmp/refattn_gpu_check}
mkdir -p "$LOG"
T0=$(date +%s)

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv 2>&1 | head -3
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" 2>&1
python3 -c "import torch; print('torch', torch.__version__)" 2>&1 | tail -1

TEST_RC=skipped
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  echo "== tests (every tests/test_gpu_*.py, and every cupy kernel through the registry)"
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider -rfs --durations=8 \
    tests/test_gpu_*.py 2>&1 | tee "$LOG/gpu_tests.log"
  TEST_RC=${PIPESTATUS[0]}
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -q -p no:cacheprovider -rfs --durations=5 \
    tests/test_registry.py -k cupy 2>&1 | tee "$LOG/gpu_registry.log"
  REG_RC=${PIPESTATUS[0]}
  [ "$REG_RC" != 0 ] && TEST_RC=$REG_RC
fi

BENCH_RC=skipped
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  echo "== benchmark (scripts/bench_gpu.py $*)"
  timeout "${BENCH_TIMEOUT:-420}" python3 scripts/bench_gpu.py --json "$LOG/bench.json" "$@" \
    2>&1 | tee "$LOG/bench.log"
  BENCH_RC=${PIPESTATUS[0]}
fi

echo
echo "================ summary ($(( $(date +%s) - T0 )) s)"
if [ -f "$LOG/gpu_tests.log" ] && [ "$TEST_RC" != skipped ]; then
  echo "tests (rc=$TEST_RC): $(grep -E '(passed|failed|error)' "$LOG/gpu_tests.log" | tail -1)"
  echo "registry cupy: $(grep -E '(passed|failed|error)' "$LOG/gpu_registry.log" | tail -1)"
  grep -hE '^FAILED|^ERROR' "$LOG/gpu_tests.log" "$LOG/gpu_registry.log" | head -40
fi
if [ -f "$LOG/bench.log" ] && [ "$BENCH_RC" != skipped ]; then
  echo "benchmark (rc=$BENCH_RC):"
  grep -E 'TFLOP/s|^== S' "$LOG/bench.log"
fi
