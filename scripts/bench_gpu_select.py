#!/usr/bin/env python3
"""Benchmark refattn's CUDA selection kernels (gpu/select.py, backend "cupy").

Problems (32 heads, 128-token blocks, causal validity, float32 scores made on the device):

* S = 32768 (Kb = 256) and S = 131072 (Kb = 1024):
  - per-row top-k, k = 8, over the block rows ``[32 * Kb, Kb]``;
  - global top-k per head over ``[32, Kb, Kb]``, 10 % of each head's legal blocks;
  - cumulative threshold, tau = 0.9, on each block row's softmax over its legal blocks;
  - fixed threshold 1.0 on the block rows;
* per-token rows ``[32 * 32768, 64]`` (S = 32768 with 512-token key blocks): top-k, k = 8,
  and the cumulative threshold, tau = 0.9, row r seeing the key blocks up to its own.

Scores are Gaussian (softmax masses for the cumulative rule); validity is the causal
pattern, materialised for the row ops and broadcast from ``[Kb, Kb]`` for the global one.
Each op is timed with CUDA events around the call on device arrays (inputs already on the
GPU, results left there): ``--warmup`` calls, then the median of ``--iters``. The cumulative
rule reads back one flag (negative masses), so its time includes that synchronisation.
Before timing, each op is checked once against the NumPy reference on the first rows
(``--check-rows``, 0 to skip).

Usage: PYTHONPATH=. python3 scripts/bench_gpu_select.py [--seq 32768 131072] [--iters 20]
       [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
from _gpu_bench import log, timeit  # noqa: E402  (scripts/_gpu_bench.py)

from refattn.core import registry  # noqa: E402
from refattn.reference import selection as ref  # noqa: E402

RESULTS: list[dict] = []


def causal_block_rows(H: int, Kb: int) -> cp.ndarray:
    """Causal validity of the block rows ``[H * Kb, Kb]`` (row i of a head sees blocks <= i)."""
    tile = cp.tril(cp.ones((Kb, Kb), cp.bool_))
    return cp.ascontiguousarray(cp.tile(tile, (H, 1)))


def causal_token_rows(H: int, S: int, Kb: int) -> cp.ndarray:
    """Per-token causal validity ``[H * S, Kb]``: token t sees key blocks <= t // (S / Kb)."""
    own = (cp.arange(S) * Kb) // S
    v = cp.arange(Kb)[None, :] <= own[:, None]
    return cp.ascontiguousarray(cp.tile(v, (H, 1)))


def softmax_rows(x: cp.ndarray, valid: cp.ndarray) -> cp.ndarray:
    z = cp.where(valid, x, -cp.inf)
    e = cp.exp(z - z.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(cp.float32)


def check(name: str, got, exp) -> None:
    for g, e in zip(got, exp, strict=True):
        if not np.array_equal(np.asarray(e), cp.asnumpy(g), equal_nan=True):
            raise AssertionError(f"{name}: differs from the reference")


def rec(what: str, shape: str, fn, args: argparse.Namespace, check_fn=None) -> None:
    try:
        if check_fn is not None and args.check_rows > 0:
            check_fn()
        ms = timeit(fn, args.iters, args.warmup, sync_torch=False)
    except Exception as e:
        log(f"  {what:44s} failed: {type(e).__name__}: {e}")
        traceback.print_exc()
        RESULTS.append({"op": what, "shape": shape, "error": f"{type(e).__name__}: {e}"})
        return
    RESULTS.append({"op": what, "shape": shape, "ms": ms})
    log(f"  {what:44s} {shape:>18s} {ms:9.3f} ms")


def run_blocks(S: int, args: argparse.Namespace) -> None:
    H, bs = args.heads, 128
    Kb = S // bs
    topk = registry.dispatch("selection_topk_rows", "cupy")
    glob = registry.dispatch("selection_topk_global", "cupy")
    cum = registry.dispatch("selection_cumulative_threshold", "cupy")
    fixed = registry.dispatch("selection_fixed_threshold", "cupy")
    log(f"\n== S = {S}, {H} heads, 128-token blocks: Kb = {Kb}, rows [{H * Kb}, {Kb}]")
    x = cp.random.standard_normal((H * Kb, Kb), dtype=cp.float32)
    v = causal_block_rows(H, Kb)
    p = softmax_rows(x, v)
    c = args.check_rows
    shape = f"[{H * Kb}, {Kb}]"

    def chk_rows(op, fn, s, *a):
        check(op, fn(s[:c], *a[:1], v[:c], *a[1:]), getattr(ref, op)(cp.asnumpy(s[:c]), *a[:1],
                                                                    cp.asnumpy(v[:c]), *a[1:]))

    rec("topk_rows k=8", shape, lambda: topk(x, 8, v), args,
        lambda: chk_rows("topk_rows", topk, x, 8))
    rec("cumulative tau=0.9", shape, lambda: cum(p, 0.9, v), args,
        lambda: chk_rows("cumulative_rows", cum, p, 0.9))
    rec("fixed threshold 1.0", shape, lambda: fixed(x, 1.0, v), args,
        lambda: chk_rows("fixed_rows", fixed, x, 1.0))
    x3 = x.reshape(H, Kb, Kb)
    causal = cp.tril(cp.ones((Kb, Kb), cp.bool_))
    k10 = int(causal.sum()) // 10
    hc = max(1, min(H, c // Kb)) if c else 0

    def chk_glob():
        check("topk_heads", glob(x3[:hc], k10, causal),
              ref.topk_heads(cp.asnumpy(x3[:hc]), k10, cp.asnumpy(causal)))

    rec("topk_global 10% of legal", f"[{H}, {Kb}, {Kb}]", lambda: glob(x3, k10, causal), args,
        chk_glob if hc else None)


def run_tokens(args: argparse.Namespace) -> None:
    H, S, Kb = args.heads, 32768, 64
    topk = registry.dispatch("selection_topk_rows", "cupy")
    cum = registry.dispatch("selection_cumulative_threshold", "cupy")
    log(f"\n== per-token rows: S = {S}, {H} heads, {Kb} key blocks: rows [{H * S}, {Kb}]")
    x = cp.random.standard_normal((H * S, Kb), dtype=cp.float32)
    v = causal_token_rows(H, S, Kb)
    p = softmax_rows(x, v)
    c = args.check_rows
    shape = f"[{H * S}, {Kb}]"
    rec("topk_rows k=8 (per token)", shape, lambda: topk(x, 8, v), args,
        lambda: check("topk", topk(x[:c], 8, v[:c]),
                      ref.topk_rows(cp.asnumpy(x[:c]), 8, cp.asnumpy(v[:c]))))
    rec("cumulative tau=0.9 (per token)", shape, lambda: cum(p, 0.9, v), args,
        lambda: check("cumulative", cum(p[:c], 0.9, v[:c]),
                      ref.cumulative_rows(cp.asnumpy(p[:c]), 0.9, cp.asnumpy(v[:c]))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--check-rows", type=int, default=2048,
                    help="rows checked against the NumPy reference before timing (0: none)")
    ap.add_argument("--no-tokens", action="store_true", help="skip the per-token rows")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    why = registry.load_backend("cupy")
    if why is not None:
        log(f"cupy backend unavailable: {why}")
        return 1
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = dev["name"].decode() if isinstance(dev["name"], bytes) else str(dev["name"])
    log(f"device: {name}; CuPy {cp.__version__}; NumPy {np.__version__}; "
        f"Python {platform.python_version()}")
    cp.random.seed(0)
    for S in args.seq:
        run_blocks(S, args)
    if not args.no_tokens:
        run_tokens(args)
    log("\n| op | shape | ms |\n|---|---|---|")
    for r in RESULTS:
        log(f"| {r['op']} | {r['shape']} | {r.get('ms', float('nan')):.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "heads": args.heads, "iters": args.iters,
                       "results": RESULTS}, f, indent=1)
    return 0 if all("ms" in r for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
