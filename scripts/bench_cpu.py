#!/usr/bin/env python
"""CPU benchmark of the Numba attention kernels (refattn.kernels), one run, ratios only
against baselines measured in the same run.

Rows (B = 1, ``--heads`` heads, D = 128, float32 inputs):

* dense forward, causal and not: Numba vs float32 NumPy BLAS dense attention
  (``q @ k.T``, softmax, ``@ v``, one head at a time) and vs the float64 reference
  (at ``--ref-seq``, smaller when S is large because the reference is slow);
* block-sparse forward, random causal block mask of density ``--density`` with 128 key
  blocks (block = S / 128): Numba vs the same float32 BLAS dense causal attention;
* backward (dense causal and block-sparse) vs the forward on the same problem;
* first-call compile time (fresh cache directory, in a subprocess) and cached load time;
* peak resident memory added by the Numba dense forward vs the BLAS dense baseline.

Usage::

    python scripts/bench_cpu.py                 # S = 8192, 8 heads (a few minutes)
    python scripts/bench_cpu.py --quick         # S = 2048, for iteration
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import refattn.kernels  # noqa: E402,F401  (registers the Numba kernels)
from refattn.core.blockmask import BlockMask, legal_blocks  # noqa: E402
from refattn.kernels.numba_attention import attention_forward as nb_fwd  # noqa: E402
from refattn.kernels.numba_attention_bwd import attention_backward as nb_bwd  # noqa: E402
from refattn.reference.attention import attention_forward as ref_fwd  # noqa: E402


def timeit(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """(min, median) wall time over ``repeat`` calls."""
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts), float(np.median(ts))


def blas_dense(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool) -> np.ndarray:
    """Float32 dense attention with NumPy BLAS, one head at a time (S x S per head)."""
    B, H, S, D = q.shape
    scale = np.float32(1.0 / np.sqrt(D))
    out = np.empty((B, H, S, v.shape[-1]), np.float32)
    upper = np.triu(np.ones((S, k.shape[2]), bool), k.shape[2] - S + 1) if causal else None
    for b in range(B):
        for h in range(H):
            s = q[b, h] @ k[b, h * k.shape[1] // H].T
            s *= scale
            if upper is not None:
                np.copyto(s, np.float32(-np.inf), where=upper)
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            out[b, h] = s @ v[b, h * k.shape[1] // H]
    return out


def sparse_mask(rng: np.random.Generator, heads: int, S: int, nblocks: int,
                density: float) -> BlockMask:
    """Random causal block mask per head: the diagonal block of every row plus random
    earlier blocks, so that the density over causally legal blocks is about ``density``."""
    blk = S // nblocks
    legal = legal_blocks(S, S, blk, blk, True)
    n_legal, n_diag = int(legal.sum()), nblocks
    p = max(0.0, (density * n_legal - n_diag) / (n_legal - n_diag))
    m = (rng.random((1, heads, nblocks, nblocks)) < p) & legal
    m |= np.eye(nblocks, dtype=bool)
    return BlockMask(m, block_q=blk, block_k=blk, q_len=S, k_len=S)


def token_mask(rng: np.random.Generator, heads: int, S: int, nblocks: int,
               density: float) -> BlockMask:
    """Per-token routing (MoBA-like, ``block_q = 1``): every query token keeps its own key
    block plus random earlier blocks, drawn independently per token (no sharing between
    neighbours: the hardest case for grouping rows), about ``density`` of legal blocks."""
    blk = S // nblocks
    legal = legal_blocks(S, S, 1, blk, True)                        # [S, nblocks]
    own = np.zeros_like(legal)
    own[np.arange(S), np.arange(S) // blk] = True
    p = max(0.0, (density * legal.sum() - S) / (legal.sum() - S))
    m = ((rng.random((1, heads, S, nblocks)) < p) & legal) | own
    return BlockMask(m, block_q=1, block_k=blk, q_len=S, k_len=S)


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_COMPILE_SNIPPET = """
import time, numpy as np, sys
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
import refattn.kernels.numba_attention as f, refattn.kernels.numba_attention_bwd as b
from refattn.core.blockmask import BlockMask
t1 = time.perf_counter()
q = np.ones((1, 1, 64, 16), np.float32)
o, l = f.attention_forward(q, q, q, None, True)
t2 = time.perf_counter()
m = BlockMask(np.ones((1, 1, 1, 1), bool), block_q=64, block_k=64, q_len=64, k_len=64)
f.attention_forward(q, q, q, m, True)
t3 = time.perf_counter()
b.attention_backward(q, q, q, o, q, l, None, True)
t4 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3)
"""


def first_call_times(cache_dir: str | None) -> list[float]:
    """(import, first dense fwd, first sparse fwd, first bwd) seconds in a new process."""
    env = dict(os.environ)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SNIPPET.format(root=root)], env=env,
                         capture_output=True, text=True, check=True)
    return [float(x) for x in res.stdout.split()]


def machine() -> str:
    import numba

    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"CPU: {model}; nproc {os.cpu_count()}; Python {platform.python_version()}; "
            f"NumPy {np.__version__}; Numba {numba.__version__}; "
            f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', '(unset)')} "
            f"-> numba.get_num_threads()={numba.get_num_threads()}; "
            f"threading layer {numba.threading_layer()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--blocks", type=int, default=128, help="key blocks of the sparse mask")
    ap.add_argument("--ref-seq", type=int, default=2048, help="S for the float64 reference row")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="S=2048, ref S=1024, 2 repeats")
    a = ap.parse_args()
    if a.quick:
        a.seq, a.ref_seq, a.repeat = 2048, 1024, 2
    S, H, D, R = a.seq, a.heads, a.dim, a.repeat
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, H, S, D)).astype(np.float32) for _ in range(3))

    print(machine())
    print(f"problem: B=1, H={H}, S={S}, D={D}, float32; {R} interleaved repetitions "
          "(min and median)\n")

    # compile / load times (before anything else runs in this process)
    # (the cached load reads the cache the first process just wrote: the default cache
    # beside the modules may be stale after an edit, and would then measure a compile)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = first_call_times(tmp)
        cached = first_call_times(tmp)
    small = (q[:, :, :128], k[:, :, :128], v[:, :, :128])
    o_w, l_w = nb_fwd(*small, None, True)
    nb_bwd(*small, o_w, o_w, l_w, None, True)

    # peak memory added by one call of each dense forward (Numba first: BLAS allocates S x S)
    rss0 = maxrss_mb()
    nb_fwd(q, k, v, None, True)
    rss_numba = maxrss_mb() - rss0
    rss1 = maxrss_mb()
    blas_dense(q, k, v, True)
    rss_blas = maxrss_mb() - rss1

    mask = sparse_mask(rng, H, S, a.blocks, a.density)
    dens = mask.density(causal=True)
    o_d, lse_d = nb_fwd(q, k, v, None, True)
    o_s, lse_s = nb_fwd(q, k, v, mask, True)
    tmask = token_mask(rng, H, S, a.blocks, a.density)
    tdens = tmask.density(causal=True)
    o_t, lse_t = nb_fwd(q, k, v, tmask, True)
    do = rng.standard_normal(o_d.shape).astype(np.float32)
    cases: dict[str, Callable[[], Any]] = {
        "blas": lambda: blas_dense(q, k, v, False),
        "blas_c": lambda: blas_dense(q, k, v, True),
        "nd": lambda: nb_fwd(q, k, v, None, False),
        "nd_c": lambda: nb_fwd(q, k, v, None, True),
        "sp": lambda: nb_fwd(q, k, v, mask, True),
        "bwd_d": lambda: nb_bwd(q, k, v, o_d, do, lse_d, None, True),
        "bwd_s": lambda: nb_bwd(q, k, v, o_s, do, lse_s, mask, True),
        "tok": lambda: nb_fwd(q, k, v, tmask, True),
        "bwd_t": lambda: nb_bwd(q, k, v, o_t, do, lse_t, tmask, True),
    }
    # interleaved repetitions, so that every case sees the same background load
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(R):
        for c, fn in cases.items():
            times[c].append(timeit(fn, 1)[0])
    t = {c: (min(ts), float(np.median(ts))) for c, ts in times.items()}

    Sr = min(a.ref_seq, S)
    qr, kr, vr = q[:, :, :Sr], k[:, :, :Sr], v[:, :, :Sr]
    t_ref = timeit(lambda: ref_fwd(qr, kr, vr, None, True), 1)
    t_ndr = timeit(lambda: nb_fwd(qr, kr, vr, None, True), R)

    rows: list[tuple[str, float, float, str]] = []

    def row(name: str, tt: tuple[float, float], ratio: str = "") -> None:
        rows.append((name, tt[0], tt[1], ratio))

    def faster(a_: tuple[float, float], b_: tuple[float, float], what: str) -> str:
        return f"{b_[0] / a_[0]:.2f}x faster than {what}"

    row("float32 BLAS dense, non-causal", t["blas"])
    row("float32 BLAS dense, causal", t["blas_c"])
    row("Numba dense fwd, non-causal", t["nd"], faster(t["nd"], t["blas"], "BLAS non-causal"))
    row("Numba dense fwd, causal", t["nd_c"], faster(t["nd_c"], t["blas_c"], "BLAS causal"))
    row(f"float64 reference, causal, S={Sr} (1 run)", t_ref)
    row(f"Numba dense fwd, causal, S={Sr}", t_ndr, faster(t_ndr, t_ref, "float64 reference"))
    row(f"Numba block-sparse fwd, density {dens:.3f}, block {S // a.blocks}", t["sp"],
        faster(t["sp"], t["blas_c"], "BLAS dense causal"))
    row("  (same, vs Numba dense causal)", t["sp"], faster(t["sp"], t["nd_c"], "Numba dense causal"))
    row("Numba dense bwd, causal", t["bwd_d"], f"{t['bwd_d'][0] / t['nd_c'][0]:.2f}x the dense causal fwd")
    row("Numba block-sparse bwd", t["bwd_s"], f"{t['bwd_s'][0] / t['sp'][0]:.2f}x the block-sparse fwd")
    row(f"Numba per-token routing fwd (block_q=1), density {tdens:.3f}", t["tok"],
        f"{t['tok'][0] / t['sp'][0]:.2f}x the block-sparse fwd; "
        + faster(t["tok"], t["blas_c"], "BLAS dense causal"))
    row("Numba per-token routing bwd", t["bwd_t"], f"{t['bwd_t'][0] / t['tok'][0]:.2f}x its fwd")
    t_nd, t_nd_c = t["nd"], t["nd_c"]

    print("| case | min (s) | median (s) | ratio (from min) |\n|---|---|---|---|")
    for name, tmin, tmed, ratio in rows:
        print(f"| {name} | {tmin:.3f} | {tmed:.3f} | {ratio} |")
    fl = 4.0 * H * S * S * D
    print(f"\nNumba dense fwd: {fl / t_nd[0] / 1e9:.1f} GFLOP/s non-causal, "
          f"{fl / 2 / t_nd_c[0] / 1e9:.1f} GFLOP/s causal (counting S^2/2 pairs)")
    print(f"peak RSS added: Numba dense causal fwd {rss_numba:.1f} MiB, BLAS dense causal "
          f"{rss_blas:.1f} MiB (q, k, v are {3 * q.nbytes / 2**20:.0f} MiB)")
    print(f"first call in a new process, fresh cache (compile): dense fwd {fresh[1]:.1f} s, "
          f"sparse fwd {fresh[2]:.1f} s, bwd {fresh[3]:.1f} s (import {fresh[0]:.1f} s)")
    print(f"first call in a new process, warm cache (load): dense fwd {cached[1]:.2f} s, "
          f"sparse fwd {cached[2]:.2f} s, bwd {cached[3]:.2f} s (import {cached[0]:.2f} s)")


if __name__ == "__main__":
    main()
