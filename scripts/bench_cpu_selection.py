#!/usr/bin/env python
"""CPU benchmark of the Numba selection kernels (``refattn/kernels/numba_selection_*.py``)
against their NumPy references (``refattn/reference/selection.py``).

Two problem sizes, float32 scores, ``--heads`` heads, causal validity:

* ``blocks``: block selection at S = 8192 with 64-token blocks, ``Qb = Kb = 128`` per
  head: rows ``[H * 128, 128]`` (the global rule: ``[H, 128, 128]``);
* ``tokens``: per-token routing (``block_q = 1``), 8192 query rows x 64 key blocks of
  128 tokens per head: rows ``[H * 8192, 64]`` (the global rule: ``[H, 8192, 64]``).

Scores are Gaussian; the cumulative rule gets each row's softmax over its valid blocks
(masses), ``tau = 0.9``. Budgets: top-k per row ``k = 16`` (blocks) / ``k = 8`` (tokens),
global top-k 10 % of each head's legal blocks, fixed threshold 1.0.

Each case runs the kernel and the reference in interleaved order (kernel, reference,
kernel, ...) after one warm-up call of each, so both see the same background load; the
table reports the medians (``--repeat`` kernel calls, ``--ref-repeat`` reference calls)
and their ratio. Every kernel result is checked equal to the reference (mask and
boundary, NaN where the reference has NaN) before timing.

Usage::

    python scripts/bench_cpu_selection.py               # 32 heads (about 2 minutes)
    python scripts/bench_cpu_selection.py --heads 4     # quick
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Any, Callable

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from refattn.core import registry  # noqa: E402
from refattn.reference import selection  # noqa: E402,F401  (defines the ops)


def problems(heads: int, seed: int = 0) -> dict[str, dict[str, tuple]]:
    """Each size's op arguments: ``{size: {op: args}}``."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, tuple]] = {}
    for size, (Q, K, k_row) in {"blocks": (128, 128, 16), "tokens": (8192, 64, 8)}.items():
        # causal: query row i (block or token) sees key blocks up to its diagonal
        diag = (np.arange(Q) * K) // Q
        causal = np.arange(K)[None, :] <= diag[:, None]
        x = rng.standard_normal((heads, Q, K)).astype(np.float32)
        rows = x.reshape(heads * Q, K)
        valid = np.ascontiguousarray(np.broadcast_to(causal, (heads, Q, K)).reshape(heads * Q, K))
        e = np.where(valid, np.exp(rows - np.where(valid, rows, -np.inf).max(-1, keepdims=True)), 0.0)
        p = (e / e.sum(-1, keepdims=True)).astype(np.float32)
        k_glob = max(1, int(0.1 * causal.sum()))
        out[size] = {
            "selection_topk_rows": (rows, k_row, valid, "low"),
            "selection_topk_global": (x, k_glob, causal, "low"),
            "selection_cumulative_threshold": (p, 0.9, valid, True, "low", True),
            "selection_fixed_threshold": (rows, 1.0, valid, True),
        }
    return out


def _same(r: np.ndarray, g: np.ndarray) -> bool:
    r, g = np.asarray(r), np.asarray(g)
    return r.shape == g.shape and np.array_equal(r, g, equal_nan=r.dtype.kind == "f")


def _timed(fn: Callable[..., Any], args: tuple) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def bench(heads: int, repeat: int, ref_repeat: int) -> list[tuple[str, str, float, float]]:
    rows = []
    for size, ops in problems(heads).items():
        for name, args in ops.items():
            op = registry.ops()[name]
            kernel = registry.dispatch(name, "numba")
            r, g = op.reference(*args), kernel(*args)
            if not (_same(r[0], g[0]) and _same(r[1], g[1])):
                raise SystemExit(f"{size} {name}: kernel differs from the reference")
            tk, tr = [], []
            for i in range(max(repeat, ref_repeat)):
                if i < repeat:
                    tk.append(_timed(kernel, args))
                if i < ref_repeat:
                    tr.append(_timed(op.reference, args))
            rows.append((size, name, float(np.median(tk)), float(np.median(tr))))
            print(f"  {size:6s} {name:32s} numba {1e3 * rows[-1][2]:.3f} ms  reference {1e3 * rows[-1][3]:.3f} ms",
                  file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=15, help="kernel calls per case")
    ap.add_argument("--ref-repeat", type=int, default=5, help="reference calls per case")
    a = ap.parse_args()
    import numba

    why = registry.load_backend("numba")
    if why is not None:
        raise SystemExit(f"numba backend unavailable: {why}")
    print(f"machine: {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, "
          f"numba threads {numba.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print(f"Python {platform.python_version()}, NumPy {np.__version__}, Numba {numba.__version__}; "
          f"heads {a.heads}, kernel repeats {a.repeat}, reference repeats {a.ref_repeat}")
    rows = bench(a.heads, a.repeat, a.ref_repeat)
    shapes = {"blocks": f"{a.heads}x128 rows x 128 blocks", "tokens": f"{a.heads}x8192 rows x 64 blocks"}
    print()
    print("| size | op | numba median (ms) | reference median (ms) | reference / numba |")
    print("|---|---|---|---|---|")
    for size, name, tk, tr in rows:
        print(f"| {size} ({shapes[size]}) | `{name}` | {1e3 * tk:.3f} | {1e3 * tr:.3f} | {tr / tk:.1f}x |")
    print(f"\nthreading layer {numba.threading_layer()}; load average after the run: "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
