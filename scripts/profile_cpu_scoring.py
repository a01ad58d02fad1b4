#!/usr/bin/env python
"""Profile of the Numba scoring kernels against their floors: is 10x over the reference
reachable?

For every scoring op of ``scripts/bench_cpu_scoring.py`` (same inputs, same geometry: its
``op_args``), one interleaved run times four things:

(a) ``kernel``:  the Numba kernel (``registry.implementations(op)["numba"]``);
(b) ``floor32``: the kernel's floor: the float32 matrix products that the kernel itself
    must do (float64 for the two ProxyAttn ops, whose kernels multiply in float64), with
    the kernel's own shapes, task order and regime (``np.dot`` = sgemm, or dgemm, on the
    real q/k tiles, one per ``prange`` task, OpenBLAS pinned to one thread per task by
    ``single_threaded_blas``), plus the memory traffic no kernel can avoid: one streaming
    read of every input byte the products do not already read (a 2-thread Numba sum), and
    one write of the float32 outputs (a 2-thread fill of a preallocated buffer);
(c) ``ref``:     the float64 NumPy reference;
(d) ``floor64``: the reference's floor: the float64 products the reference does, with its
    own shapes (its chunking via ``rows_per_chunk``), as float64 ``@`` on contiguous
    operands into preallocated outputs (NumPy's OpenBLAS, both cores), plus the same
    streaming read and one write of the float64 outputs.

Printed per op: ``kernel / floor32`` (how far the kernel is from its floor; what is left is
the softmax/max/reduction epilogue, packing, allocation and threading overhead),
``ref / floor64`` (how much of the reference is its products), the measured
``ref / kernel`` and the best ratio any float32 kernel could reach against this reference,
``ref / floor32``. If ``ref / floor32 < 10`` the 10x target is out of reach for a kernel
that must do these products in float32, whatever its epilogue.

Floor model per op (B = 1, Hq = Hkv = H; ``T_x`` = the products, ``R`` = streamed reads,
``W`` = output writes):

* ``moba_score`` (block 512): T: per head, tiles of 256 rows ``[256, D] x [D, Kb]`` with
  the pooled keys; R: k (pooling); W: gate ``[H, S, Kb]``. Reference: ``[R, D] @ [D, Kb]``
  per head and row chunk, float64.
* ``xattention_score`` (block 128, stride 8, causal): T: per head, groups of 8 block rows,
  ``[128 tiles, 8 D] x [8 D, kend]`` with ``kend`` up to the group's diagonal (the causal
  half); W: ``[H, nbp, nbp]``. Reference: the full ``[T, 8 D] @ [8 D, T]`` per head (it
  masks afterwards), ``T = S / 8``.
* ``prism_score``: products ``nq x nk x (64 + 96)`` per head (negligible); R: q and k
  (pooling); W: 4 ``[H, nq, nk]``. Reference: the same small products in float64.
* ``bsfa_score`` (tiles 128 x 64, keys in sgemm chunks of 512): T: per head and query tile
  ``[128, D] x [D, 512]`` chunks up to the tile's last reachable key tile (causal) or over
  all keys (non-causal); W: ``[H, Qb, Kb]``. Reference: ``[512, D] @ [D, 1024]`` chunks
  over the reachable key tiles of each 4-tile row chunk.
* ``minference_score`` (last 64 queries): T: per head ``[64, D] x [D, S]``; W: 2 ``[H, S]``.
  Reference: the same product in float64.
* ``flexprefill_score`` (block 128): T: per head ``[128, D] x [D, S]``; R: q (block means;
  k is read by the product); W: 2 ``[H, S]``, ``[H, n]``, ``[H, n, n]``. Reference: the same
  product plus the small pooled products, float64.
* ``quest_score`` (page 16, causal): T: per head, tiles of 128 rows ``[128, 2D] x [2D,
  npg]`` (``[q+, q-]`` against ``[max, min]`` page bounds, pages up to the tile's last
  own page); R: k (page bounds); W: ``U [H, S, S/16]`` (134 MB at S = 8192). Reference: two
  full ``[R, D] @ [D, S/16]`` products (``q+ M``, ``q- m``) per head and row chunk.
* ``nsa_score`` (l 32, d 16, l' 64, causal): T: per head, tiles of 64 rows ``[64, D] x [D,
  nmax]`` with the compressed keys up to the tile's last complete one; R: k (compression);
  W: ``p_slc [H, S, S/64]`` and ``p_cmp [H, S, Nc]`` (166 MB). Reference: ``[R, D] @ [D,
  Nc]`` per row chunk, every compressed key.
* ``proxyattn_score`` (block 128, group 1, stride 4 (the method default), causal): the proxy map is
  ``(S/s) x (S/s)`` dot products per group (``s`` the stride), the causal half of them.
  T: **float64** (the kernel's products are dgemm), per head and query block
  ``[128/s, D] x [D, kend]`` on the kept rows and keys, in chunks of 512 keys up to the
  block's diagonal; W: ``[H, Qb, Kb]``. Reference: the whole ``[S/s, D] @ [D, S/s]`` per
  head (it masks afterwards).
* ``proxyattn_budget_score`` (block 128): ``|L| x S`` dot products per head, ``L`` the last
  query block. T: **float64**, per head ``[|L|, D] x [D, S]`` in chunks of 512 keys; W:
  ``[H, Kb]``. Reference: the same product in float64.
* ``pbs_key_importance`` (block 128, segment 256): T: per head ``[128, D] x [D, S]``;
  W: ``[H, S]``. Reference: the same product in float64.
* ``pbs_score``: products ``n x n x D`` per head (negligible); R: q and k_perm (block
  sums); W: ``[H, n, n]`` float64 (the kernel's output is float64 without ``out=``).
  Reference: ``[n, D] @ [D, n]`` per head in float64.

The floors leave out work the kernels must do but that is neither a product nor a byte
of input/output: the exponentials, maxima and reductions over the logits, and allocating
fresh output arrays (first-touch page faults; the floor writes a warm buffer). The table
reports ``(kernel - floor32)`` per logit to size that epilogue.

Usage::

    PYTHONPATH=. python3 scripts/profile_cpu_scoring.py            # S = 8192 (3-6 minutes)
    PYTHONPATH=. python3 scripts/profile_cpu_scoring.py --quick    # S = 2048
    PYTHONPATH=. python3 scripts/profile_cpu_scoring.py --ops quest_score,nsa_score
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from numba import njit, prange

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cpu_scoring import cpu_model, loadavg, op_args, op_name, timed  # noqa: E402

from refattn.core import registry  # noqa: E402
from refattn.core.blockmask import legal_blocks, num_blocks  # noqa: E402
from refattn.data.synthetic import synthetic  # noqa: E402
from refattn.kernels._blas import single_threaded_blas  # noqa: E402
from refattn.kernels.flags import NJIT_OPTIONS  # noqa: E402
from refattn.methods import load_all  # noqa: E402
from refattn.reference.memory import rows_per_chunk  # noqa: E402

STREAM_CHUNK = 1 << 16    # elements per prange task of the streaming read / write


# ------------------------------------------------------------------------ floor kernels
@njit(**NJIT_OPTIONS)
def _gemm_tasks(A: np.ndarray, B: np.ndarray, tasks: np.ndarray) -> None:
    """For each task ``(h, a0, an, b0, bn, chunk)``: ``A[h, a0:a0+an] @ B[h, b0:b0+bn].T``
    as sgemm calls of at most ``chunk`` columns into a task-local buffer (as the kernels
    do), one ``prange`` task each. The products are discarded."""
    for t in prange(tasks.shape[0]):
        h, a0, an, b0, bn, chunk = (tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3],
                                    tasks[t, 4], tasks[t, 5])
        full = np.empty((an, chunk), A.dtype)
        for c0 in range(b0, b0 + bn, chunk):
            cn = min(b0 + bn, c0 + chunk) - c0
            c = full if cn == chunk else np.empty((an, cn), A.dtype)
            np.dot(A[h, a0:a0 + an], B[h, c0:c0 + cn].T, c)


@njit(**NJIT_OPTIONS)
def _stream_read(x: np.ndarray) -> float:
    """Sum of a 1-d array, read once by both threads (chunks of ``STREAM_CHUNK``)."""
    n = x.size
    nc = (n + STREAM_CHUNK - 1) // STREAM_CHUNK
    part = np.zeros(nc)
    for c in prange(nc):
        acc = np.float32(0.0)
        for i in range(c * STREAM_CHUNK, min(n, (c + 1) * STREAM_CHUNK)):
            acc += x[i]
        part[c] = acc
    return part.sum()


@njit(**NJIT_OPTIONS)
def _stream_write(y: np.ndarray, v: float) -> None:
    """Fill a 1-d array, written once by both threads."""
    n = y.size
    for c in prange((n + STREAM_CHUNK - 1) // STREAM_CHUNK):
        for i in range(c * STREAM_CHUNK, min(n, (c + 1) * STREAM_CHUNK)):
            y[i] = v


# --------------------------------------------------------------------------- the plans
@dataclass
class Plan:
    """One op's floor model.

    * ``k_gemm``: (A, B, tasks) groups for :func:`_gemm_tasks` (the kernel's shapes and
      dtype: float32, float64 for ProxyAttn); ``k_logits``: the logits the kernel's
      epilogue touches.
    * ``r_gemm``: (A, B) float64 contiguous 2-d pairs: ``A @ B.T``, the reference's products.
    * ``reads``: float32 arrays streamed once (inputs the products do not read);
      ``writes``: output element count (float32 in the kernel floor, float64 in the
      reference floor, unless ``k_out64``).
    """

    k_gemm: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)
    k_logits: int = 0
    r_gemm: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    reads: list[np.ndarray] = field(default_factory=list)
    writes: int = 0
    k_out64: bool = False

    def k_flop(self) -> float:
        return float(sum(2 * int(t[:, 2] @ t[:, 4]) * A.shape[2] for A, _, t in self.k_gemm))

    def r_flop(self) -> float:
        return float(sum(2 * a.shape[0] * a.shape[1] * b.shape[0] for a, b in self.r_gemm))


def _tasks(rows: list[tuple[int, int, int, int, int, int]]) -> np.ndarray:
    return np.array(rows, np.int64).reshape(-1, 6)


class Planner:
    """Builds every op's :class:`Plan` from the bench's q, k (B = 1, Hq = Hkv), sharing the
    float64 copies between ops."""

    def __init__(self, q: np.ndarray, k: np.ndarray):
        assert q.shape[0] == 1 and q.shape[1] == k.shape[1], "B = 1, Hq = Hkv only"
        self.q, self.k = q[0], k[0]                      # [H, S, D] float32
        self.H, self.S, self.D = self.q.shape
        self._q64: np.ndarray | None = None
        self._k64: np.ndarray | None = None

    @property
    def q64(self) -> np.ndarray:
        if self._q64 is None:
            self._q64 = self.q.astype(np.float64)
        return self._q64

    @property
    def k64(self) -> np.ndarray:
        if self._k64 is None:
            self._k64 = self.k.astype(np.float64)
        return self._k64

    def plan(self, label: str, args: tuple) -> Plan:
        return getattr(self, "_" + op_name(label))(*args)

    # -- pooled ops
    def _moba_score(self, q, k, bs) -> Plan:
        H, S, D = self.H, self.S, self.D
        Kb = num_blocks(S, bs)
        kbar = np.ascontiguousarray(np.pad(self.k, ((0, 0), (0, Kb * bs - S), (0, 0)))
                                    .reshape(H, Kb, bs, D).mean(axis=2), dtype=np.float32)
        rows = [(h, r0, min(S, r0 + 256) - r0, 0, Kb, Kb) for h in range(H)
                for r0 in range(0, S, 256)]
        kbar64 = kbar.astype(np.float64)
        R = rows_per_chunk(S, 8 * (D + Kb), 8 * (H * S * Kb + kbar64.size), "moba")
        rg = [(self.q64[h, r0:r0 + R], kbar64[h]) for h in range(H) for r0 in range(0, S, R)]
        return Plan([(self.q, kbar, _tasks(rows))], H * S * Kb, rg, [self.k], H * S * Kb)

    def _prism_score(self, q, k, bs, hd, ld, *_) -> Plan:
        H, S = self.H, self.S
        n = num_blocks(S, bs)
        rng = np.random.default_rng(0)          # stand-ins of the pooled bands (shape only)
        rg = [(rng.standard_normal((n, w)), rng.standard_normal((n, w)))
              for _ in range(H) for w in (hd, ld)]
        return Plan([], 0, rg, [self.q, self.k], 4 * H * n * n + 2 * H)

    def _proxyattn_budget_score(self, q, k, bs, causal) -> Plan:
        H, S = self.H, self.S
        n = num_blocks(S, bs)
        r0 = (n - 1) * bs                            # the last query block: rows r0 .. S-1
        rows = [(h, r0, S - r0, 0, S, min(S, 512)) for h in range(H)]
        rg = [(self.q64[h, r0:], self.k64[h]) for h in range(H)]
        return Plan([(self.q64, self.k64, _tasks(rows))], H * (S - r0) * S, rg, [], H * n)

    def _pbs_score(self, q, kp, bs, seg) -> Plan:
        H, S, D = self.H, self.S, self.D
        n = num_blocks(S, bs)
        rng = np.random.default_rng(0)
        rg = [(rng.standard_normal((n, D)), rng.standard_normal((n, D))) for _ in range(H)]
        return Plan([], 0, rg, [self.q, np.ascontiguousarray(kp[0])], H * n * n, k_out64=True)

    # -- tile-product ops
    def _xattention_score(self, q, k, bs, st, C, norm, causal) -> Plan:
        H, L, D = self.H, self.S, self.D
        bt = bs // st
        Lp = num_blocks(L, C) * C
        T, t_real = Lp // st, num_blocks(L, st)
        nbp, n_real = Lp // bs, num_blocks(L, bs)
        qp = np.zeros((H, Lp, D), np.float32)
        qp[:, :L] = self.q
        kp = np.zeros((H, Lp, D), np.float32)
        kp[:, :L] = self.k
        qr, kr = qp.reshape(H, T, st * D), kp.reshape(H, T, st * D)
        rows, logits = [], 0
        for h in range(H):
            for I0 in range(0, nbp, 8):
                I1 = min(nbp, I0 + 8)
                Ir = min(I1, n_real)
                if Ir > I0:
                    i0 = I0 * bt
                    nr = min(Ir * bt, t_real) - i0
                    kend = Ir * bt if causal else T
                    rows.append((h, i0, nr, 0, kend, kend))
                    logits += nr * kend
        qr64, kr64 = qr.astype(np.float64), kr.astype(np.float64)
        Rr = rows_per_chunk(n_real, bt * T * 8 * 4, 2 * Lp * D * 8 + H * nbp * nbp * 8, "xattn")
        rg = []
        for h in range(H):
            for I0 in range(0, n_real, Rr):
                I1 = min(n_real, I0 + Rr)
                kend = I1 * bt if causal else T
                rg.append((qr64[h, I0 * bt:I1 * bt], kr64[h, :kend]))
        return Plan([(qr, kr, _tasks(rows))], logits, rg, [], H * nbp * nbp)

    def _bsfa_score(self, q, k, bq, bk, scale, causal) -> Plan:
        H, S, D = self.H, self.S, self.D
        qb, kb = num_blocks(S, bq), num_blocks(S, bk)
        chunk = max(1, 512 // bk) * bk
        rows, logits = [], 0
        for h in range(H):
            for t in range(qb):
                mi = t // 2 if t % 2 == 0 else qb - 1 - t // 2
                r0 = mi * bq
                rn = min(S, r0 + bq) - r0
                nt = min(kb, (r0 + rn - 1) // bk + 1) if causal else kb
                keys = min(S, nt * bk)
                keys = min(S, -(-keys // chunk) * chunk)
                rows.append((h, r0, rn, 0, keys, chunk))
                logits += rn * keys
        kc = max(1, 1024 // bk)
        tiles = min(rows_per_chunk(qb, bq * kc * bk * 16, 8 * S * D, "bsfa"), max(1, qb // 16))
        n_legal = legal_blocks(S, S, bq, bk, bool(causal)).sum(axis=1)
        rg = []
        for h in range(H):
            for m0 in range(0, qb, tiles):
                m1 = min(qb, m0 + tiles)
                r0, r1 = m0 * bq, min(S, m1 * bq)
                for n0 in range(0, int(n_legal[m1 - 1]), kc):
                    n1 = min(kb, n0 + kc)
                    rg.append((self.q64[h, r0:r1], self.k64[h, n0 * bk:min(S, n1 * bk)]))
        return Plan([(self.q, self.k, _tasks(rows))], logits, rg, [], H * qb * kb)

    def _quest_score(self, q, k, P, causal) -> Plan:
        H, S, D = self.H, self.S, self.D
        n = num_blocks(S, P)
        kpad = np.pad(self.k, ((0, 0), (0, n * P - S), (0, 0)), mode="edge")
        pages = kpad.reshape(H, n, P, D)
        M, m = pages.max(axis=2), pages.min(axis=2)
        Mm = np.ascontiguousarray(np.concatenate([M, m], axis=2))          # [H, n, 2D]
        qs = np.ascontiguousarray(np.concatenate([np.maximum(self.q, 0), np.minimum(self.q, 0)],
                                                 axis=2))                  # [H, S, 2D]
        rows, logits = [], 0
        for h in range(H):
            for r0 in range(0, S, 128):
                rn = min(S, r0 + 128) - r0
                npg = min(n, (r0 + rn - 1) // P + 1) if causal else n
                rows.append((h, r0, rn, 0, npg, npg))
                logits += rn * npg
        qp64, qn64 = np.maximum(self.q64, 0.0), np.minimum(self.q64, 0.0)
        M64, m64 = M.astype(np.float64), m.astype(np.float64)
        R = rows_per_chunk(S, 8 * (3 * D + n), 8 * (H * S * n + 4 * M64.size), "quest")
        rg = []
        for h in range(H):
            for r0 in range(0, S, R):
                rg += [(qp64[h, r0:r0 + R], M64[h]), (qn64[h, r0:r0 + R], m64[h])]
        return Plan([(qs, Mm, _tasks(rows))], logits, rg, [self.k], H * S * n)

    # -- softmax-estimate ops
    def _last_rows(self, ell: int, T: int) -> tuple[np.ndarray, list]:
        H, S = self.H, self.S
        rows = _tasks([(h, S - ell, ell, 0, T, T) for h in range(H)])
        rg = [(self.q64[h, S - ell:], self.k64[h, :T]) for h in range(H)]
        return rows, rg

    def _minference_score(self, q, k, last_q, scale) -> Plan:
        ell = min(int(last_q), self.S)
        rows, rg = self._last_rows(ell, self.S)
        return Plan([(self.q, self.k, rows)], self.H * ell * self.S, rg, [], 2 * self.H * self.S)

    def _flexprefill_score(self, q, k, bs, scale) -> Plan:
        H, S, D = self.H, self.S, self.D
        ell, n = min(bs, S), num_blocks(S, bs)
        rows, rg = self._last_rows(ell, S)
        rng = np.random.default_rng(0)
        for _ in range(H):                        # pooled query row and block rows
            km = rng.standard_normal((n, D))
            rg += [(rng.standard_normal((1, D)), km), (rng.standard_normal((n, D)), km)]
        return Plan([(self.q, self.k, rows)], H * ell * S, rg, [self.q],
                    2 * H * S + H * n + H * n * n)

    def _pbs_key_importance(self, q, k, bs, seg) -> Plan:
        H, S = self.H, self.S
        T, ell = (S // seg) * seg, min(bs, S)
        rows, rg = self._last_rows(ell, T)
        return Plan([(self.q, self.k, rows)], H * ell * T, rg, [], H * T)

    def _nsa_score(self, q, k, l, d, lp, causal) -> Plan:
        H, S, D = self.H, self.S, self.D
        nc, kb = (S - l) // d + 1, num_blocks(S, lp)
        win = np.lib.stride_tricks.sliding_window_view(self.k, l, axis=1)[:, ::d]
        kc = np.ascontiguousarray(win.mean(axis=-1), dtype=np.float32)      # [H, nc, D]
        rows, logits = [], 0
        for h in range(H):
            for r0 in range(0, S, 64):
                rn = min(S, r0 + 64) - r0
                last = r0 + rn - 1
                nmax = (min(nc, (last - l + 1) // d + 1) if last >= l - 1 else 0) if causal else nc
                if nmax > 0:
                    rows.append((h, r0, rn, 0, nmax, nmax))
                    logits += rn * nmax
        kc64 = kc.astype(np.float64)
        R = rows_per_chunk(S, 8 * (D + 3 * nc + 2 * kb + S // d),
                           8 * (H * S * kb + H * S * nc + kc64.size), "nsa")
        rg = [(self.q64[h, r0:r0 + R], kc64[h]) for h in range(H) for r0 in range(0, S, R)]
        return Plan([(self.q, kc, _tasks(rows))], logits, rg, [self.k], H * S * (kb + nc))

    def _proxyattn_score(self, q, k, bs, gs, stride, causal) -> Plan:
        H, S = self.H, self.S
        assert gs == 1 and bs % stride == 0, "the floor model covers group 1, stride | block"
        qs = np.ascontiguousarray(self.q64[:, ::stride])         # the kept rows and keys
        ks = np.ascontiguousarray(self.k64[:, ::stride])
        T, bt = qs.shape[1], bs // stride
        qb, kb = num_blocks(S, bs), num_blocks(S, bs)
        rows, logits = [], 0
        for c in range(H):
            for I in range(qb):
                start, stop = I * bt, min(T, (I + 1) * bt)
                kn = min(T, stop) if causal else T
                rows.append((c, start, stop - start, 0, kn, min(kn, 512)))
                logits += (stop - start) * kn
        rg = [(qs[c], ks[c]) for c in range(H)]
        return Plan([(qs, ks, _tasks(rows))], logits, rg, [], H * qb * kb)


# ---------------------------------------------------------------------------- the floors
class Floors:
    """Callables for the two floors of a :class:`Plan`; each returns (products, memory)
    seconds."""

    def __init__(self, p: Plan):
        self.p = p
        self.buf32 = np.empty(p.writes, np.float64 if p.k_out64 else np.float32)
        self.buf64 = np.empty(p.writes, np.float64)
        self.out64 = {}
        for a, b in p.r_gemm:
            self.out64.setdefault((a.shape[0], b.shape[0]), np.zeros((a.shape[0], b.shape[0])))
        self.buf32.fill(0)                        # touched: the floors write warm buffers
        self.buf64.fill(0)
        self.reads = [x.reshape(-1) for x in p.reads]

    def _mem(self, buf: np.ndarray) -> float:
        t0 = time.perf_counter()
        for x in self.reads:
            _stream_read(x)
        if buf.size:
            _stream_write(buf, 0.0)
        return time.perf_counter() - t0

    def f32(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        with single_threaded_blas():
            for A, B, tasks in self.p.k_gemm:
                _gemm_tasks(A, B, tasks)
        return time.perf_counter() - t0, self._mem(self.buf32)

    def f64(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        for a, b in self.p.r_gemm:
            np.matmul(a, b.T, out=self.out64[(a.shape[0], b.shape[0])])
        return time.perf_counter() - t0, self._mem(self.buf64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="S = 2048")
    ap.add_argument("--repeat", type=int, default=2,
                    help="interleaved rounds; each times the reference and floor64 at least once")
    ap.add_argument("--kernel-repeat", type=int, default=3,
                    help="kernel and floor32 calls per round (interleaved; at least)")
    ap.add_argument("--threads", type=int, default=0,
                    help="Numba threads for the kernels and floor32 (default: Numba's)")
    ap.add_argument("--ops", default="",
                    help="comma-separated subset of ops (an op selects all its rows)")
    ap.add_argument("--extra", action="store_true",
                    help="also the bench's extra rows (bsfa_score non-causal: +2 minutes)")
    a = ap.parse_args()
    S = 2048 if a.quick else a.seq
    H, D = a.heads, 128
    load_all()
    registry.load_backend("numba")
    import numba

    if a.threads:
        numba.set_num_threads(a.threads)
    q, k, _ = synthetic(1, H, H, S, D, seed=0)
    args = op_args(q, k)
    names = [n for n in args if (not a.ops or op_name(n) in a.ops.split(","))
             and (a.extra or n == op_name(n))]
    kern = {n: registry.implementations(op_name(n))["numba"] for n in names}
    refs = {n: registry.ops()[op_name(n)].reference for n in names}
    planner = Planner(q, k)
    plans = {n: planner.plan(n, args[n]) for n in names}
    floors = {n: Floors(plans[n]) for n in names}
    print(f"# {cpu_model()}, nproc {os.cpu_count()}, numba threads {numba.get_num_threads()}, "
          f"numpy {np.__version__}, numba {numba.__version__}; B=1 H={H} S={S} D={D} float32")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, load average at start: {loadavg()}; "
          f"{a.repeat} rounds x [(kernel, floor32) x >= {a.kernel_repeat} + (ref, floor64) x >= 1]")
    for n in names:                                       # warm-up: compilation
        kern[n](*args[n])
        floors[n].f32()
    tk: dict[str, list[float]] = {n: [] for n in names}
    tr: dict[str, list[float]] = {n: [] for n in names}
    f32: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    f64: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for _ in range(a.repeat):
        for n in names:
            # small ops get more calls (better minimums): at least the given count, then
            # more until 0.5 s (kernel side, at most 30) / 1 s (reference side, at most 5)
            t0, i = time.perf_counter(), 0
            while i < a.kernel_repeat or (time.perf_counter() - t0 < 0.5 and i < 30):
                tk[n].append(timed(lambda n=n: kern[n](*args[n])))
                f32[n].append(floors[n].f32())
                i += 1
            t0, i = time.perf_counter(), 0
            while i < 1 or (time.perf_counter() - t0 < 1.0 and i < 5):
                tr[n].append(timed(lambda n=n: refs[n](*args[n])))
                f64[n].append(floors[n].f64())
                i += 1
    print(f"# load average at the end: {loadavg()}\n")

    med = lambda x: float(np.median(x))  # noqa: E731
    print("Times in seconds and ratios: median (min). floor = products + memory, the parts' "
          "mins; GF = GFLOP of the products.\n")
    print("| op | kernel | floor32 (products + mem) | kernel / floor32 | ref | floor64 "
          "(products + mem) | ref / floor64 | ref / kernel | best: ref / floor32 |")
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    for n in names:
        p = plans[n]
        fk = [g + m for g, m in f32[n]]
        fr = [g + m for g, m in f64[n]]
        g32, m32 = min(g for g, _ in f32[n]), min(m for _, m in f32[n])
        g64, m64 = min(g for g, _ in f64[n]), min(m for _, m in f64[n])
        r = lambda x, y: f"{med(x) / med(y):.1f} ({min(x) / min(y):.1f})"  # noqa: E731
        print(f"| {n} | {med(tk[n]):.4f} ({min(tk[n]):.4f}) | {med(fk):.4f} ({min(fk):.4f}) "
              f"= {g32:.4f} + {m32:.4f} | {r(tk[n], fk)} | "
              f"{med(tr[n]):.3f} ({min(tr[n]):.3f}) | {med(fr):.3f} ({min(fr):.3f}) = "
              f"{g64:.3f} + {m64:.3f} | {r(tr[n], fr)} | {r(tr[n], tk[n])} | {r(tr[n], fk)} |")
        gk, gr = g32, g64
        line = (f"{n}: kernel products {p.k_flop() / 1e9:.3f} GF"
                + (f" (best {p.k_flop() / 1e9 / gk:.0f} GFLOP/s)" if p.k_flop() > 1e8 else "")
                + f", reference products {p.r_flop() / 1e9:.3f} GF"
                + (f" (best {p.r_flop() / 1e9 / gr:.0f} GFLOP/s)" if p.r_flop() > 1e8 else "")
                + f"; reads {sum(x.nbytes for x in p.reads) / 2**20:.0f} MiB, writes "
                  f"{p.writes * (8 if p.k_out64 else 4) / 2**20:.1f} MiB (f32 floor) / "
                  f"{p.writes * 8 / 2**20:.1f} MiB (f64 floor)")
        if p.k_logits:
            line += (f"; {p.k_logits / 1e6:.1f} M logits, kernel - floor32 = "
                     f"{1e9 * (min(tk[n]) - min(fk)) / p.k_logits:.2f} ns per logit (mins)")
        notes.append(line)
    print()
    for line in notes:
        print(line)


if __name__ == "__main__":
    main()
