#!/usr/bin/env python
"""CPU benchmark of the Numba scoring kernels (``refattn/kernels/numba_scoring_*.py``).

For each LLM-prefill scoring op, at the method's default block geometry, on B = 1,
``--heads`` query and kv heads, S = ``--seq``, D = 128, float32 structured inputs
(refattn.data.synthetic), one run measures:

* the Numba kernel (median and min of ``--repeat`` interleaved rounds, after a warm-up
  call);
* its NumPy float64 reference (median and min of ``--ref-repeat`` calls, one in each of
  the first rounds, interleaved with the kernels);
* the Numba dense causal attention forward (``dispatch("attention_fwd", "numba")``) on the
  same q/k/v, interleaved with the kernels, so ratios compare work under the same load;
* the first-call time of every kernel in a fresh process with an empty Numba cache
  (compilation + one call on a tiny input), reported separately.

Targets (issue "Numba CPU kernels"): kernel >= 10x faster than its reference, and kernel
<= 10% of the Numba dense forward.

PBS-Attn has two rows: ``pbs_key_importance`` (the permutation's key weights) and
``pbs_score`` (block probabilities on the permuted keys, block 128, segment 256).

BSFA runs with ``causal=True``, as the method calls it in causal prefill (causally
unreachable tiles are skipped); the row ``bsfa_score (non-causal)`` keeps the full
``QK^T`` tile max of the op's ``causal=False`` mode for comparison.

Usage::

    python scripts/bench_cpu_scoring.py            # S = 8192, 8 heads (4-8 minutes)
    python scripts/bench_cpu_scoring.py --quick    # S = 2048
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from refattn.core import registry  # noqa: E402
from refattn.data.synthetic import synthetic  # noqa: E402
from refattn.methods import load_all  # noqa: E402

#: benchmark rows that run an op in another mode than its method does: row label -> op
EXTRA_ROWS = {"bsfa_score (non-causal)": "bsfa_score"}


def op_name(label: str) -> str:
    """The registry op of a benchmark row."""
    return EXTRA_ROWS.get(label, label)


def op_args(q: np.ndarray, k: np.ndarray) -> dict[str, tuple]:
    """Each row's positional arguments: every op at its method's default geometry (and
    mode), plus :data:`EXTRA_ROWS`."""
    from refattn.methods.xattention import default_chunk_size

    D, S, Hq, Hkv = q.shape[3], k.shape[2], q.shape[1], k.shape[1]
    # PBS scores the keys of each query head after its within-segment permutation; the
    # cost does not depend on the key order, so the unpermuted keys (repeated per query
    # head under GQA) stand in for k_perm
    kp = k if Hq == Hkv else np.ascontiguousarray(np.repeat(k, Hq // Hkv, axis=1))
    return {
        "moba_score": (q, k, 512),
        "xattention_score": (q, k, 128, 8, default_chunk_size(S), 1.0, True),
        "prism_score": (q, k, 128, 64, 96, True, 1.0, 1.0),
        "bsfa_score": (q, k, 128, 64, 1.0 / np.sqrt(D), True),
        "bsfa_score (non-causal)": (q, k, 128, 64, 1.0 / np.sqrt(D), False),
        "minference_score": (q, k, 64, None),
        "flexprefill_score": (q, k, 128, None),
        "quest_score": (q, k, 16, True),
        "nsa_score": (q, k, 32, 16, 64, True),
        "proxyattn_score": (q, k, 128, Hq // Hkv, 4, True),      # the method default stride
        "proxyattn_budget_score": (q, k, 128, True),
        "pbs_key_importance": (q, k, 128, 256),
        "pbs_score": (q, kp, 128, 256),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str:
    """The 1-, 5- and 15-minute load averages (``/proc/loadavg``)."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compile_times() -> dict[str, float]:
    """First call of every kernel on a tiny input, in a fresh process with an empty cache."""
    code = f"""
import json, sys, time
sys.path.insert(0, {ROOT!r})
from refattn.methods import load_all
load_all()
from refattn.core import registry
from refattn.data.synthetic import synthetic
sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r})
from bench_cpu_scoring import op_args, op_name
q, k, _ = synthetic(1, 2, 2, 256, 128, seed=0)
t0 = time.perf_counter()
registry.load_backend("numba")
res = {{"import": time.perf_counter() - t0}}
for name, args in op_args(q, k).items():
    fn = registry.implementations(op_name(name))["numba"]
    t0 = time.perf_counter()
    fn(*args)
    res[name] = time.perf_counter() - t0
print(json.dumps(res))
"""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--ref-repeat", type=int, default=2,
                    help="rounds (the first ones) that also time the references")
    ap.add_argument("--quick", action="store_true", help="S = 2048")
    ap.add_argument("--ops", default="",
                    help="comma-separated subset of ops (an op selects all its rows)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compile-time run")
    a = ap.parse_args()
    S = 2048 if a.quick else a.seq
    H, D = a.heads, 128
    load_all()
    registry.load_backend("numba")
    import numba

    print(f"# {cpu_model()}, nproc {os.cpu_count()}, numba threads "
          f"{numba.get_num_threads()}, "
          f"numpy {np.__version__}, numba {numba.__version__}; B=1 H={H} S={S} D={D} "
          f"float32; {a.repeat} interleaved rounds (references in the first {a.ref_repeat})")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, load average at start: {loadavg()}")
    q, k, v = synthetic(1, H, H, S, D, seed=0)
    args = op_args(q, k)
    names = [n for n in args if not a.ops or op_name(n) in a.ops.split(",")]
    kern = {n: registry.implementations(op_name(n))["numba"] for n in names}
    refs = {n: registry.ops()[op_name(n)].reference for n in names}
    dense = registry.dispatch("attention_fwd", "numba")
    scale = 1.0 / np.sqrt(D)
    run_dense = lambda: dense(q, k, v, None, True, scale)  # noqa: E731
    # warm-up (compilation from the on-disk cache or fresh)
    run_dense()
    for n in names:
        kern[n](*args[n])
    print(f"# threading layer {numba.threading_layer()}")
    times: dict[str, list[float]] = {n: [] for n in names + ["dense"]}
    ref_t: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.repeat):                  # interleaved: every case sees the same load
        times["dense"].append(timed(run_dense))
        for n in names:
            times[n].append(timed(lambda n=n: kern[n](*args[n])))
        if r < a.ref_repeat:
            for n in names:
                ref_t[n].append(timed(lambda n=n: refs[n](*args[n])))
    print(f"# load average at the end of the timed rounds: {loadavg()}")
    comp = {} if a.no_compile else compile_times()
    td, td_min = float(np.median(times["dense"])), min(times["dense"])
    print(f"\nNumba dense causal forward: {td:.3f} s median, {td_min:.3f} s min "
          f"(of {a.repeat})\n")
    print("| op | Numba median (min) (s) | reference median (min) (s) | speed-up vs reference "
          "(medians) | % of dense fwd (medians) | first call, fresh cache (s) |")
    print("|---|---|---|---|---|---|")
    for n in names:
        t, tr = float(np.median(times[n])), float(np.median(ref_t[n]))
        c = f"{comp[n]:.1f}" if n in comp else "-"
        print(f"| {n} | {t:.4f} ({min(times[n]):.4f}) | {tr:.3f} ({min(ref_t[n]):.3f}) | "
              f"{tr / t:.1f}x | {100 * t / td:.1f}% | {c} |")
    if comp:
        print(f"\n(backend import in the fresh process: {comp['import']:.1f} s)")
    print(f"# load average at the end: {loadavg()}")


if __name__ == "__main__":
    main()
