"""CPU benchmark: Numba kernels of the KV-cache token scores vs their NumPy references.

    PYTHONPATH=. python scripts/bench_cpu_kvcache.py              # L = 8192, 8 heads, D = 128
    PYTHONPATH=. python scripts/bench_cpu_kvcache.py --length 2048 --repeat 3

Every op is timed on the same float32 inputs (q, k, v ``[1, H, L, D]``, MHA): the median of
``--repeat`` runs of each side, after one untimed warm-up call (Numba compilation). The
ratio is reference / kernel on equal work.

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


def _median_time(fn: Callable[[], Any], repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per side (median)")
    ap.add_argument("--ref-heads", type=int, default=1,
                    help="heads the full-prompt references are timed on (then scaled)")
    args = ap.parse_args()

    import numba

    from refattn.core import registry
    from refattn.kernels import numba_kvcache as nk
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
        ("caote_score", caote.caote_score, ns.caote_score_numba,
         lambda s: (alpha[:, s], v[:, s], False), False),
        ("caote_score (fast)", caote.caote_score, ns.caote_score_numba,
         lambda s: (alpha[:, s], v[:, s], True), False),
        (f"topk_keep (k = {budget})", topk_keep, ns.topk_keep_numba,
         lambda s: (scores[:, s], budget), False),
    ]
    print(f"# L = {L}, heads = {H}, D = {D}, float32 inputs; median of {R}; "
          f"numba {numba.__version__}, {numba.get_num_threads()} threads, numpy {np.__version__}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| op | NumPy reference (s) | Numba, 1 head (s) | Numba, all heads (s) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    allh, one, first = slice(0, H), slice(0, 1), slice(0, rh)
    for name, ref, kern, mk, full in cases:
        kern(*mk(one))                              # compile / warm up
        t1 = _median_time(lambda kern=kern, mk=mk: kern(*mk(one)), R)
        kern(*mk(allh))
        tk = _median_time(lambda kern=kern, mk=mk: kern(*mk(allh)), R)
        if full:
            tr = _median_time(lambda ref=ref, mk=mk: ref(*mk(first)), R) * H / rh
            note = f" ({rh} head x {H // rh})" if rh < H else ""
        else:
            tr = _median_time(lambda ref=ref, mk=mk: ref(*mk(allh)), R)
            note = ""
        print(f"| {name} | {tr:.3f}{note} | {t1:.4f} | {tk:.4f} | {tr / tk:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
