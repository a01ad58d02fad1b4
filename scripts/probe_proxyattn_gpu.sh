#!/usr/bin/env bash
# GPU probe of the ProxyAttn CUDA kernels (gpu/scoring_compressed.py, gpu/score_proxy_pbs.cu):
#
#   1. tests/test_gpu_scoring_compressed.py -k proxy (plus test_errors and the CuPy in/out,
#      out= test, which run the proxy ops too): every kernel branch against the reference;
#   2. tests/test_registry.py -k "proxyattn and cupy": the registry cases (float64 kernels);
#   3. proxyattn_score at S = 32768, Hq = 32, Hkv = 8, D = 128, bf16, causal, block 128,
#      stride 4, group 4 and 32 (and proxyattn_budget_score): a spot check of three query
#      blocks of proxy head 0 against a float64 NumPy evaluation, then CUDA-event times (ms).
#
#   scripts/probe_proxyattn_gpu.sh        (about a minute; each part has its own timeout)
#
# Logs go to $OUT when set (the device tool's result folder), else /tmp/refattn_probe_proxy.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/refattn_cupy_cache}
LOG=${OUT:-/tmp/refattn_probe_proxy}
mkdir -p "$LOG"
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1

echo "== 1. tests/test_gpu_scoring_compressed.py (proxy)"
timeout ${PART1_TIMEOUT:-100} python3 -m pytest -q -p no:cacheprovider -rfE --durations=5 \
  tests/test_gpu_scoring_compressed.py -k "proxy or test_errors or cupy_in_cupy_out" \
  > "$LOG/proxy_tests.log" 2>&1
TESTS_RC=$?
tail -n 25 "$LOG/proxy_tests.log"

echo "== 2a. device BlockMask (refattn/core/blockmask.py was split this session)"
timeout 25 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_gpu_end_to_end.py \
  -k "device_blockmask_matches_host or device_kv_mask" > "$LOG/device_mask.log" 2>&1
MASK_RC=$?
tail -n 8 "$LOG/device_mask.log"

echo "== 2. tests/test_registry.py (proxyattn, cupy)"
timeout 20 python3 -m pytest -q -p no:cacheprovider -rfE tests/test_registry.py \
  -k "proxyattn and cupy" > "$LOG/proxy_registry.log" 2>&1
REG_RC=$?
tail -n 15 "$LOG/proxy_registry.log"

echo "== 3. proxyattn_score timing, S = 32768, Hq = 32, Hkv = 8, D = 128, bf16, block 128, stride 4"
timeout 30 python3 - > "$LOG/proxy_timing.log" 2>&1 <<'EOF'
import sys
import time

import cupy as cp
import ml_dtypes
import numpy as np

sys.path.insert(0, "scripts")
from _gpu_bench import bf16_normal, timeit  # noqa: E402

from refattn.core.registry import dispatch, load_backend  # noqa: E402
from refattn.methods import proxyattn  # noqa: E402,F401  (define the ops)

why = load_backend("cupy")
assert why is None, why
from refattn.gpu import scoring_compressed as sc  # noqa: E402

S, H, Hkv, D, bs, st = 32768, 32, 8, 128, 128, 4
G, Qb = H // Hkv, S // bs
q, k = bf16_normal((1, H, S, D)), bf16_normal((1, Hkv, S, D))
px = dispatch("proxyattn_score", "cupy")
bud = dispatch("proxyattn_budget_score", "cupy")


def host(x, sl):
    """float64 NumPy of a slice of a device bf16 array (through its uint16 bits)."""
    return cp.asnumpy(x.view(cp.uint16)[sl]).view(ml_dtypes.bfloat16).astype(np.float64)


def ref_block(qt, kt, I):
    """Reference S[0, 0, I, :] (proxy head 0) in float64 from the proxy head's kept rows qt
    and kept keys kt."""
    rows = np.arange(I * bs, min(S, I * bs + bs), st)
    keys = np.arange(0, S, st)
    z = qt[rows // st] @ kt.T / np.sqrt(D)
    z = np.where(keys[None, :] <= rows[:, None], z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros(Qb)
    np.maximum.at(out, np.broadcast_to(keys // bs, p.shape), p)
    return out


ok = True
for gs in (4, 32):
    t = time.time()
    (Sx,) = px(q, k, bs, gs, st, True)
    cp.cuda.get_current_stream().synchronize()
    first = time.time() - t
    fast = sc.proxyattn_fast_path("bfloat16", D, bs, gs, st, H, Hkv)
    h = Sx.get()
    legal = np.tril(np.ones((Qb, Qb), bool))
    bad = (not np.isfinite(h).all() or h.min() < 0 or h.max() > 1 + 1e-5
           or (h[..., ~legal] != 0).any() or (h[..., legal] <= 0).any())
    errs = []
    qt = host(q, (0, slice(0, gs), slice(None, None, st))).mean(axis=0)       # [S/st, D]
    kt = host(k, (0, slice(0, gs // G), slice(None, None, st))).mean(axis=0)  # [S/st, D]
    for I in (0, Qb // 2, Qb - 1):
        r = ref_block(qt, kt, I)
        errs.append(float(np.abs(h[0, 0, I] - r).max() / max(r.max(), 1e-30)))
    ok &= (not bad) and max(errs) < 5e-4
    ms = timeit(lambda gs=gs: px(q, k, bs, gs, st, True), 5, 1)
    C = H // gs
    fl = C * (S / st) ** 2 / 2 * 2 * D
    print(f"proxyattn_score group {gs:2d} ({C} proxy heads, tensor cores {fast}): "
          f"{ms:8.3f} ms  ({fl / ms / 1e9:.0f} TFLOP/s useful)  first call {first:.1f} s  "
          f"S {tuple(h.shape)} range [{h.min():.3g}, {h.max():.3g}]  "
          f"spot rel err {max(errs):.2e}{'  BAD' if bad or max(errs) >= 5e-4 else ''}",
          flush=True)
    del Sx
ms = timeit(lambda: bud(q, k, bs, True), 5, 1)
(a,) = bud(q, k, bs, True)
a = a.get()
sums = a.sum(-1) * bs           # true lengths all bs: sum_J a*|J| = 1 per head
print(f"proxyattn_budget_score: {ms:8.3f} ms  a {tuple(a.shape)}  "
      f"sum_J a[J]*|J| in [{sums.min():.6f}, {sums.max():.6f}] (expect 1)", flush=True)
ok &= bool(np.abs(sums - 1).max() < 1e-4)
print("TIMING CHECKS", "OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
TIME_RC=$?
cat "$LOG/proxy_timing.log"

echo "== summary ($(( $(date +%s) - T0 )) s): tests rc=$TESTS_RC, device mask rc=$MASK_RC, registry rc=$REG_RC, timing rc=$TIME_RC"
echo "   logs: $LOG/proxy_tests.log, proxy_registry.log, proxy_timing.log"
[ "$TESTS_RC" = 0 ] && [ "$MASK_RC" = 0 ] && [ "$REG_RC" = 0 ] && [ "$TIME_RC" = 0 ]
