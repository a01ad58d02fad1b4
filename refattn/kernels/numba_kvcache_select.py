"""Numba CPU kernels of the KV-cache eviction step: CAOTE output-error scores and the
top-budget kept indices.

* ``caote_score`` (:func:`refattn.kvcache.caote.caote_score`): per (batch, head) the base
  scores normalised to sum 1, the output ``o = sum_n a_n v_n`` (FastCAOTE: ``mean_n v_n``) and
  ``c_j = a_j / (1 - a_j) * ||o - v_j||_2`` (``+inf`` where ``a_j >= 1``, 0 where ``a_j = 0``).
  One ``prange`` task per (batch, head); float64 arithmetic (fp32 values upcast as read).
* ``kvcache_topk_keep``: :func:`refattn.kvcache._common.topk_keep`, the ``k`` best entries of
  each row **in descending score order**, ties to the lower index, invalid and NaN entries
  last (in index order): exactly the reference's ``rank_order(...)[..., :k]``. One task per
  row: a quickselect (``np.partition``) finds the ``k``-th largest valid score ``t``; the
  entries ``> t`` and the first ``k - #(> t)`` entries ``== t`` (lowest positions) form the
  kept set in position order, which a stable sort (mergesort) by descending score puts in
  rank order. ``O(N + k log k)`` per row instead of the reference's three-key lexsort.
  The op is defined in :mod:`refattn.kvcache._common` (``TOPK_KEEP``).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..core.errors import InputError
from ..core.registry import register
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS
from .ieee import ieee_div
from .numba_kvcache import SERIAL_WORK, _inputs, _write

TOPK_OP = "kvcache_topk_keep"


# ----------------------------------------------------------------------------- CAOTE
@njit(**NJIT_OPTIONS)
def _caote_kernel(a: np.ndarray, v: np.ndarray, fast: bool, out: np.ndarray) -> None:  # pragma: no cover
    """``out [B, H, N]`` from normalised-here ``a [B, H, N]`` and ``v [B, Hkv, N, Dv]``."""
    B, H, N = a.shape
    Hkv, Dv = v.shape[1], v.shape[3]
    G = H // Hkv
    for task in prange(B * H):
        b = task // H
        h = task % H
        g = h // G
        tot = 0.0
        for n in range(N):
            tot += a[b, h, n]
        w = np.empty(N)
        for n in range(N):                  # correctly rounded: w >= 1 below decides +inf
            w[n] = ieee_div(a[b, h, n], tot) if tot > 0 else 0.0
        o = np.zeros(Dv)
        for n in range(N):
            c = 1.0 / N if fast else w[n]
            if c != 0.0:
                for d in range(Dv):
                    o[d] += c * v[b, g, n, d]
        for n in range(N):
            an = w[n]
            if an >= 1.0:                   # all mass on one token: +inf (explicit branch)
                out[b, h, n] = np.inf
            elif an > 0.0:
                ss = 0.0
                for d in range(Dv):
                    t = o[d] - v[b, g, n, d]
                    ss += t * t
                out[b, h, n] = an / (1.0 - an) * math.sqrt(ss)
            else:
                out[b, h, n] = 0.0


_caote_serial = njit(**NJIT_HELPER_OPTIONS)(_caote_kernel.py_func)


@register("caote_score", "numba")
def caote_score_numba(alpha: np.ndarray, v: np.ndarray, fast: bool = False, *,
                      out: tuple[np.ndarray] | None = None) -> np.ndarray:
    """CAOTE scores ``[B, H, N]`` from non-negative finite ``alpha [B, H, N]`` and
    ``v [B, Hkv, N, Dv]`` (``H % Hkv == 0``); float64 without ``out=``."""
    a = np.ascontiguousarray(_inputs(alpha, "alpha", 3), dtype=np.float64)
    if (a < 0).any() or not np.isfinite(a).all():
        raise InputError("alpha: CAOTE needs finite, non-negative base scores")
    v64 = _inputs(v, "v", 4)                  # fp32 read as is, upcast element by element
    B, H, N = a.shape
    if v64.shape[0] != B or v64.shape[2] != N:
        raise InputError(f"v: expected [B={B}, Hkv, N={N}, Dv], got {v64.shape}")
    if H % v64.shape[1]:
        raise InputError(f"GQA: {H} query heads are not a multiple of {v64.shape[1]} kv heads")
    res = np.empty((B, H, N))
    if res.size:
        kern = _caote_serial if a.size * v64.shape[3] < SERIAL_WORK else _caote_kernel
        kern(a, v64, bool(fast), res)
    return _write(out, (res,), ("scores",))[0]


# ------------------------------------------------------------------------------ top-k
@njit(**NJIT_OPTIONS)
def _topk_kernel(s: np.ndarray, ok: np.ndarray, k: int, out: np.ndarray) -> None:  # pragma: no cover
    """Row ``r`` of ``out [R, k]`` (int64): the rank order of ``s [R, N]`` cut at ``k``
    (valid entries by descending score, ties by position, then invalid ones by position)."""
    R, N = s.shape
    for r in prange(R):
        nv = 0
        for j in range(N):
            if ok[r, j]:
                nv += 1
        kk = min(k, nv)
        if kk > 0:
            vals = np.empty(nv)
            t = 0
            for j in range(N):
                if ok[r, j]:
                    vals[t] = s[r, j]
                    t += 1
            thr = np.partition(vals, nv - kk)[nv - kk]     # the kk-th largest valid score
            ngt = 0
            for j in range(N):
                if ok[r, j] and s[r, j] > thr:
                    ngt += 1
            need_eq = kk - ngt
            idx = np.empty(kk, np.int64)
            key = np.empty(kk)
            t = 0
            for j in range(N):
                if ok[r, j]:
                    x = s[r, j]
                    if x > thr or (x == thr and need_eq > 0):
                        if not x > thr:
                            need_eq -= 1
                        idx[t] = j
                        key[t] = -x
                        t += 1
            order = np.argsort(key, kind="mergesort")    # stable: ties keep position order
            for t in range(kk):
                out[r, t] = idx[order[t]]
        t = kk
        if t < k:                                         # fewer valid than k: invalid ones
            for j in range(N):
                if not ok[r, j]:
                    out[r, t] = j
                    t += 1
                    if t == k:
                        break


_topk_serial = njit(**NJIT_HELPER_OPTIONS)(_topk_kernel.py_func)


@register(TOPK_OP, "numba")
def topk_keep_numba(scores: np.ndarray, k: int, *, valid: np.ndarray | None = None,
                    out: tuple[np.ndarray] | None = None) -> np.ndarray:
    """Indices of the ``k`` best entries of the last axis of ``scores [..., N]`` in
    descending score order, int64 ``[..., k]``; ties to the lower index; entries that are
    NaN or not ``valid`` (bool, broadcastable to ``scores``) come last, in index order."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim < 1:
        raise InputError(f"scores: expected at least one axis, got shape {s.shape}")
    N = s.shape[-1]
    if isinstance(k, bool) or not float(k).is_integer():
        raise InputError(f"top-k: k must be an integer, got {k!r}")
    k = int(k)
    if k < 0 or k > N:
        raise InputError(f"top-k: k must lie in [0, {N}], got {k}")
    ok = ~np.isnan(s)
    if valid is not None:
        ok &= np.broadcast_to(np.asarray(valid, bool), s.shape)
    R = math.prod(s.shape[:-1])
    s2 = np.ascontiguousarray(s.reshape(R, N))
    ok2 = np.ascontiguousarray(ok.reshape(R, N))
    res = np.empty((s2.shape[0], k), np.int64)
    if res.size:
        kern = _topk_serial if s2.size * 16 < SERIAL_WORK else _topk_kernel
        kern(s2, ok2, k, res)
    return _write(out, (res.reshape(s.shape[:-1] + (k,)),), ("indices",))[0]


__all__ = ["caote_score_numba", "topk_keep_numba", "TOPK_OP"]
