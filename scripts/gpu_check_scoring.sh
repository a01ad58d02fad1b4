#!/usr/bin/env bash
# GPU check of the scoring kernels (gpu/scoring.py): tests, registry cases, benchmark.
#
#   scripts/gpu_check_scoring.sh [all|tests|bench] [extra bench_gpu_scoring.py arguments...]
#
# Logs go to $OUT when set (the device tool's result folder), else /tmp/refattn_gpu_scoring:
# scoring_nvcc.log (registers/spills of the explicit instantiations, when nvcc is present),
# scoring_tests.log, scoring_bench.log, scoring_bench.json; a summary is printed last.
# Time limits: TEST_TIMEOUT (default 300 s) and BENCH_TIMEOUT (default 270 s), so that `all`
# fits in one 600 s device command.
set -u
cd "$(dirname "$0")/.."
MODE=${1:-all}
[ $# -gt 0 ] && shift
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/refattn_cupy_cache}
LOG=${OUT:-/tmp/refattn_gpu_scoring}
mkdir -p "$LOG"
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1 | head -2

NVCC=${NVCC:-$(command -v nvcc || true)}
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
if [ -n "$NVCC" ]; then
  # ptxas' view of the kernels the launchers instantiate (NVRTC's numbers are printed by the
  # benchmark); a spill here is worth knowing before reading the timings.
  for f in score_xattn score_pool score_rowcol score_prism; do
    "$NVCC" -arch=sm_90 -std=c++17 -Igpu -DREFATTN_INSTANTIATE --resource-usage -cubin \
      -o /dev/null "gpu/$f.cu" 2>&1 | grep -E "Compiling entry|registers|spill" \
      | sed -e 's/ptxas info *: //' | paste - - -
  done > "$LOG/scoring_nvcc.log" 2>&1
fi

TEST_RC=skipped
if [ "$MODE" = all ] || [ "$MODE" = tests ]; then
  echo "== tests (tests/test_gpu_scoring.py, registry cases of the cupy scoring ops)"
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rfs --durations=8 \
    tests/test_gpu_scoring.py tests/test_registry.py \
    -k "test_gpu_scoring or (cupy and (xattention_score or moba_score or quest_score or prism_score))" \
    2>&1 | tee "$LOG/scoring_tests.log"
  TEST_RC=${PIPESTATUS[0]}
fi

BENCH_RC=skipped
if [ "$MODE" = all ] || [ "$MODE" = bench ]; then
  echo "== benchmark (scripts/bench_gpu_scoring.py $*)"
  timeout "${BENCH_TIMEOUT:-270}" python3 scripts/bench_gpu_scoring.py \
    --json "$LOG/scoring_bench.json" "$@" 2>&1 | tee "$LOG/scoring_bench.log"
  BENCH_RC=${PIPESTATUS[0]}
fi

echo
echo "================ summary ($(( $(date +%s) - T0 )) s)"
[ -s "$LOG/scoring_nvcc.log" ] && echo "nvcc spills: $(grep -c ' [1-9][0-9]* bytes spill' "$LOG/scoring_nvcc.log") kernels with spills (of $(wc -l < "$LOG/scoring_nvcc.log"))"
[ "$TEST_RC" != skipped ] && echo "tests (rc=$TEST_RC): $(grep -E '(passed|failed|error)' "$LOG/scoring_tests.log" | tail -1)"
[ "$TEST_RC" != skipped ] && grep -E '^FAILED|^ERROR' "$LOG/scoring_tests.log" | head -20
[ "$BENCH_RC" != skipped ] && echo "benchmark (rc=$BENCH_RC)" && grep -E '^  \|' "$LOG/scoring_bench.log"
[ "$BENCH_RC" != skipped ] && grep -E 'local [1-9]' "$LOG/scoring_bench.log" | sed 's/^/  SPILL (NVRTC): /'
exit 0
