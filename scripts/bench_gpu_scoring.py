#!/usr/bin/env python3
"""Benchmark refattn's CUDA scoring kernels (gpu/scoring.py) against dense cuDNN attention.

Problem (the issue's): B = 1, H = 32 (MHA), D = 128, bf16, causal, S in {32768, 131072}.
For each S, in one process:

* dense causal attention forward with PyTorch SDPA, cuDNN backend (the denominator; skipped
  with a note when PyTorch or its cuDNN attention is unavailable);
* ``xattention_score`` at stride 8 and 16 (block 128, the official default chunk size);
* ``prism_score`` (block 128, high 64 / low 96 dims, calibrated: the official defaults);
* ``moba_score`` (block 512, the MoBA default);
* ``quest_score`` for one decode query (page 16) and, at S <= 32768, for every query row.

Each estimator's time is printed in ms and as a share of the cuDNN dense time, beside the
official figures quoted in the issue. Timing: CUDA events, ``--warmup`` calls, median of
``--iters``. Inputs are Gaussian bf16 made on the device (scoring cost does not depend on
the values). Only the scoring op is timed: the selection that follows runs on the host.

Usage: PYTHONPATH=. python3 scripts/bench_gpu_scoring.py [--seq 32768 131072] [--json f]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy as cp  # noqa: E402

from refattn.core.registry import dispatch  # noqa: E402
from refattn.methods import moba, prism, quest, xattention  # noqa: E402,F401  (define the ops)
from refattn.methods.xattention import default_chunk_size  # noqa: E402

try:
    import torch
except Exception:  # pragma: no cover - depends on the machine
    torch = None

#: Official figures quoted in the issue (ms at S = 32768 / 131072, H = 32, D = 128, bf16).
OFFICIAL = {"xattention S=8": (7.06, 101.5), "xattention S=16": (4.26, 67.7),
            "prism": (1.33, 2.83), "flexprefill": (33.2, 33.4)}
OFFICIAL_CUDNN_32K = 12.9
RESULTS: list[dict] = []


def log(msg: str) -> None:
    print(msg, flush=True)


def timeit(fn, iters: int, warmup: int) -> float:
    """Median ms of ``fn()`` by CUDA events (torch work synchronised around each call)."""
    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    if torch is not None:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        if torch is not None:
            torch.cuda.synchronize()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def bf16_normal(shape):
    """Gaussian bf16 on the device (fp32 rounded to nearest even)."""
    import ml_dtypes
    bits = cp.random.standard_normal(shape, dtype=cp.float32).view(cp.uint32)
    bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
    try:
        return bf.view(ml_dtypes.bfloat16)
    except Exception:  # CuPy without bf16 views: through the host
        return cp.asarray(bf.get().view(ml_dtypes.bfloat16))


def run_size(S: int, args: argparse.Namespace) -> None:
    """Time every estimator and cuDNN dense attention at sequence length ``S``."""
    H, D = args.heads, args.dim
    xa = dispatch("xattention_score", "cupy")
    pr = dispatch("prism_score", "cupy")
    mo = dispatch("moba_score", "cupy")
    qu = dispatch("quest_score", "cupy")
    log(f"\n== S = {S}, B = 1, H = {H}, D = {D}, bf16, causal ==")
    q, k = bf16_normal((1, H, S, D)), bf16_normal((1, H, S, D))
    rows: list[tuple[str, float]] = []

    def rec(what: str, fn, iters: int = args.iters) -> None:
        try:
            ms = timeit(fn, iters, args.warmup)
        except Exception as e:
            log(f"  {what}: failed: {type(e).__name__}: {e}")
            traceback.print_exc()
            return
        rows.append((what, ms))
        log(f"  {what:34s} {ms:9.3f} ms")

    dense = None
    if torch is not None:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            tq, tk = torch.from_dlpack(q), torch.from_dlpack(k)
            tv = torch.randn_like(tq)

            def cudnn():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
            rec("SDPA cuDNN dense causal fwd", cudnn, max(3, args.iters))
            dense = rows[-1][1] if rows and rows[-1][0].startswith("SDPA") else None
            del tv
        except Exception as e:
            log(f"  SDPA cuDNN: unavailable: {type(e).__name__}: {e}")
    else:
        log("  PyTorch unavailable: no cuDNN reference time")

    C = default_chunk_size(S)
    for stride in (8, 16):
        rec(f"xattention S={stride}", lambda s=stride: xa(q, k, 128, s, C, 1.0, True))
    rec("prism", lambda: pr(q, k, 128, 64, 96, True, 1.0, 1.0))
    rec("moba (block 512)", lambda: mo(q, k, 512))
    qd = q[:, :, -1:]
    rec("quest decode (1 query, page 16)", lambda: qu(qd, k, 16, True))
    if S <= 32768:
        rec("quest all rows (page 16)", lambda: qu(q, k, 16, True), max(2, args.iters // 2))

    idx = 0 if S <= 32768 else 1
    log("\n  | estimator | ours (ms) | share of cuDNN | official (ms) | official share |")
    log("  |---|---|---|---|---|")
    for what, ms in rows:
        share = f"{100 * ms / dense:.1f}%" if dense else "n/a"
        off = OFFICIAL.get(what.split(" (")[0])
        offs = f"{off[idx]:g}" if off else "-"
        offshare = (f"{100 * off[idx] / OFFICIAL_CUDNN_32K:.0f}%" if off and idx == 0 else "-")
        log(f"  | {what} | {ms:.3f} | {share} | {offs} | {offshare} |")
        RESULTS.append({"S": S, "what": what, "ms": ms, "share_of_cudnn": ms / dense if dense else None,
                        "official_ms": off[idx] if off else None})
    log(f"  | flexprefill | not implemented | - | {OFFICIAL['flexprefill'][idx]:g} | - |")



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = dev["name"].decode() if isinstance(dev["name"], bytes) else dev["name"]
    log(f"machine: {name}, {dev['multiProcessorCount']} SMs, cupy {cp.__version__}, "
        f"torch {getattr(torch, '__version__', None)}, python {platform.python_version()}")
    log(f"command: {' '.join(sys.argv)}")
    for S in args.seq:
        run_size(S, args)
        cp.get_default_memory_pool().free_all_blocks()

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": name, "command": " ".join(sys.argv), "results": RESULTS}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
