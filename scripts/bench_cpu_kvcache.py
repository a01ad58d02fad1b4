"""CPU benchmark: Numba kernels of the KV-cache token scores vs their NumPy references.

    PYTHONPATH=. python scripts/bench_cpu_kvcache.py              # L = 8192, 8 heads, D = 128
    PYTHONPATH=. python scripts/bench_cpu_kvcache.py --length 2048 --repeat 3

Every op is timed on the same float32 inputs (q, k, v ``[1, H, L, D]``, MHA): after one
untimed warm-up call of the kernel (Numba compilation), ``--repeat`` rounds of (kernel on one
head, kernel on all heads, reference), interleaved so that both sides see the same
background load; the table gives medians (and the minimum of the all-heads kernel and of
the reference). The ratio is reference / kernel on equal work, from the medians.

The full-prompt ops (H2O, VATP, observed attention) build the reference's ``[H, L, L]``
float64 probability matrix and its temporaries (about 13 GB at L = 8192, H = 8), beyond this
machine's share of memory: their reference is timed on ``--ref-heads`` heads (default 1)
and scaled by ``H / ref-heads`` (the reference is per-head independent, its cost linear in
the heads); the kernel column "1 head" gives the like-for-like single-head time as well.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any, Callable

import numpy as np


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side (median)")
    ap.add_argument("--ref-heads", type=int, default=1,
                    help="heads the full-prompt references are timed on (then scaled)")
    ap.add_argument("--ops", default="",
                    help="comma-separated substrings: run only the rows whose name holds one")
    args = ap.parse_args()

    import numba

    from refattn.core import registry
    from refattn.kernels import numba_kvcache as nk
    from refattn.kernels import numba_kvcache_press as npress
    from refattn.kernels import numba_kvcache_select as ns
    from refattn.kvcache import caote, h2o, presses, snapkv, vatp
    from refattn.kvcache._common import topk_keep
    from refattn.reference.memory import set_memory_limit

    registry.load_backend("numba")
    set_memory_limit("16G")
    L, H, D, R = args.length, args.heads, args.dim, args.repeat
    rh = min(args.ref_heads, H)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, H, L, D)).astype(np.float32) for _ in range(3))
    k[:, :, 0] += 4.0 * q[:, :, -1].mean(axis=1, keepdims=True)   # an attention sink
    alpha = np.abs(rng.standard_normal((1, H, L))) ** 3
    scores = rng.standard_normal((1, H, L))
    budget = L // 4

    # (name, reference, kernel, args, full_prompt)
    cases: list[tuple[str, Callable, Callable, Callable[[slice], tuple], bool]] = [
        ("h2o_score", h2o.h2o_score, nk.h2o_score_numba, lambda s: (q[:, s], k[:, s]), True),
        ("kvpress_observed_attention_score", presses.observed_attention_score,
         nk.observed_attention_score_numba, lambda s: (q[:, s], k[:, s]), True),
        ("vatp_score (h2o)", vatp.vatp_score, nk.vatp_score_numba,
         lambda s: (q[:, s], k[:, s], v[:, s], "h2o", 20), True),
        ("vatp_score (scissorhands)", vatp.vatp_score, nk.vatp_score_numba,
         lambda s: (q[:, s], k[:, s], v[:, s], "scissorhands", 20), True),
        ("snapkv_score (W 32, maxpool 7)", snapkv.snapkv_score, nk.snapkv_score_numba,
         lambda s: (q[:, s], k[:, s], 32, 7, "maxpool", "query"), False),
        ("kvpress_snapkv_score (W 64)", presses.snapkv_press_score, nk.snapkv_press_score_numba,
         lambda s: (q[:, s], k[:, s], 64, 5), False),
        ("kvpress_tova_score", presses.tova_score, nk.tova_score_numba,
         lambda s: (q[:, s], k[:, s]), False),
        ("kvpress_knorm_score", presses.knorm_score, npress.knorm_score_numba,
         lambda s: (k[:, s],), False),
        ("kvpress_keydiff_score", presses.keydiff_score, npress.keydiff_score_numba,
         lambda s: (k[:, s],), False),
        ("kvpress_expected_attention_score", presses.expected_attention_score,
         npress.expected_attention_score_numba, lambda s: (q[:, s], k[:, s], v[:, s]), False),
        ("caote_score", caote.caote_score, ns.caote_score_numba,
         lambda s: (alpha[:, s], v[:, s], False), False),
        ("caote_score (fast)", caote.caote_score, ns.caote_score_numba,
         lambda s: (alpha[:, s], v[:, s], True), False),
        (f"topk_keep (k = {budget})", topk_keep, ns.topk_keep_numba,
         lambda s: (scores[:, s], budget), False),
    ]
    print(f"# L = {L}, heads = {H}, D = {D}, float32 inputs; {R} interleaved rounds, medians; "
          f"numba {numba.__version__}, {numba.get_num_threads()} threads, numpy {np.__version__}")
    print(f"# {_cpu_model()}, {os.cpu_count()} CPUs; {time.strftime('%Y-%m-%d %H:%M')}, "
          f"load average at start: {_loadavg()}")
    print("| op | NumPy reference (s) | Numba, 1 head (s) | Numba, all heads (s) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    allh, one, first = slice(0, H), slice(0, 1), slice(0, rh)
    if args.ops:
        cases = [c for c in cases if any(o in c[0] for o in args.ops.split(","))]
    for name, ref, kern, mk, full in cases:
        rs = first if full else allh
        kern(*mk(one))                              # compile / warm up
        kern(*mk(allh))
        t1, tk, tr = [], [], []
        for _ in range(R):                          # interleaved rounds
            t1.append(_timed(lambda kern=kern, mk=mk: kern(*mk(one))))
            tk.append(_timed(lambda kern=kern, mk=mk: kern(*mk(allh))))
            tr.append(_timed(lambda ref=ref, mk=mk, rs=rs: ref(*mk(rs))))
        scale = H / rh if full else 1.0
        note = f" ({rh} head x {H // rh})" if full and rh < H else ""
        t1m, tkm, trm = statistics.median(t1), statistics.median(tk), statistics.median(tr) * scale
        print(f"| {name} | {trm:.3f}{note} (min {min(tr) * scale:.3f}) | {t1m:.4f} | "
              f"{tkm:.4f} (min {min(tk):.4f}) | {trm / tkm:.1f}x |", flush=True)
    print(f"# load average at the end: {_loadavg()}")


if __name__ == "__main__":
    main()
