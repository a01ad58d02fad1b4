"""Numba CPU kernels of the video scoring rules: AdaSpa, Sparse VideoGen, SpargeAttn.

Each function takes exactly its reference op's arguments plus ``out=`` (a tuple of
preallocated outputs that it fills completely) and is registered against that op:

* ``adaspa_block_mass`` (:func:`refattn.video.adaspa.adaspa_block_mass`): blockified attention
  mass ``W[p, c] = sum_{i in p, j in c} exp(s q_i.k_j - lse_i)``. One ``prange`` task per
  (batch, head, query block): the block's logits ``Q_p K^T`` by one ``np.dot`` (float64 BLAS,
  single-threaded while the kernel runs), then the exponentials summed per key block.
* ``svg_masked_row_mse`` (:func:`refattn.video.svg.svg_masked_row_mse`): one task per
  (batch, head); the sampled rows' logits by ``np.dot``, then the golden and every masked
  softmax output (each with its own row maximum) and their squared error. A sampled row with
  no visible key under a mask makes that mask's MSE NaN, as the reference (the official
  all-``-inf`` softmax; the op is defined with ``equal_nan=True``).
* ``spargeattn_pool`` (:func:`refattn.video.spargeattn.spargeattn_pool`): one task per
  (batch, head, block); the mean pairwise cosine uses the identity
  ``(1/n^2) sum_{a,b} cos(x_a, x_b) = |sum_a x_a/|x_a||^2 / n^2`` (O(n D) instead of the
  reference's literal Gram matrix).
* ``spargeattn_map`` (:func:`refattn.video.spargeattn.spargeattn_map`): one task per
  (batch, head, query block); softmax of the pooled logits over the allowed key blocks.

Numerics: inputs are converted once to float64 and all arithmetic is float64 (these are
scoring passes whose outputs feed rankings and argmins; float64 keeps the kernels within the
tolerance rule of ``refattn.check`` even for small MSEs). ``-inf`` never enters the
arithmetic: masked entries are skipped by branch, a row with no allowed entry is written 0
(SVG: its mask's MSE is written NaN), and the "unmeasurable" similarity is written as
``-inf`` by assignment. Shapes, GQA mapping and edge cases are those of the references.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from ..core.blockmask import num_blocks
from ..core.errors import InputError
from ..core.layout import causal_offset
from ..core.registry import register
from ._blas import single_threaded_blas
from .flags import NJIT_OPTIONS


# ----------------------------------------------------------------------------- host side
def _f64(x: Any, name: str, ndim: int = 4) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind != "f" and str(a.dtype) != "bfloat16":
        raise InputError(f"{name}: expected a float array (fp16, bf16, fp32, fp64), got {a.dtype}")
    if a.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-d array, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float64)


def _targets(out: Any, shapes: tuple[tuple[int, ...], ...]) -> tuple[list[np.ndarray], list[Any]]:
    """float64 C-contiguous kernel targets: the caller's arrays where they already are, else
    scratch arrays copied into them by :func:`_finish`."""
    if out is None:
        return [np.empty(s, np.float64) for s in shapes], [None] * len(shapes)
    if not isinstance(out, (tuple, list)) or len(out) != len(shapes):
        raise InputError(f"out: expected a tuple of {len(shapes)} arrays, got {type(out).__name__}")
    tg = []
    for o, s in zip(out, shapes, strict=True):
        if tuple(o.shape) != s:
            raise InputError(f"out: expected an array of shape {s}, got {tuple(o.shape)}")
        ok = isinstance(o, np.ndarray) and o.dtype == np.float64 and o.flags.c_contiguous
        tg.append(o if ok else np.empty(s, np.float64))
    return tg, list(out)


def _finish(tg: list[np.ndarray], user: list[Any]) -> tuple[np.ndarray, ...]:
    res = []
    for t, u in zip(tg, user, strict=True):
        if u is not None and u is not t:
            u[...] = t
        res.append(t if u is None else u)
    return tuple(res)


def _gqa(Hq: int, Hkv: int) -> int:
    if Hq % Hkv:
        raise InputError(f"GQA: number of query heads ({Hq}) must be a multiple of the number "
                         f"of kv heads ({Hkv})")
    return Hq // Hkv


# ------------------------------------------------------------------------ AdaSpa: block mass
@njit(**NJIT_OPTIONS)
def _adaspa_kernel(q, kT, lse, bs, scale, causal, off, W):
    Bn, Hq, Sq, _ = q.shape
    Hkv, Sk = kT.shape[1], kT.shape[3]
    G = Hq // Hkv
    Qb, Kb = W.shape[2], W.shape[3]
    for task in prange(Bn * Hq * Qb):
        b = task // (Hq * Qb)
        h = (task // Qb) % Hq
        I = task % Qb
        r0 = I * bs
        r1 = min(Sq, r0 + bs)
        s = np.dot(q[b, h, r0:r1], kT[b, h // G])                 # [R, Sk] float64
        acc = np.zeros(Kb)
        for r in range(r1 - r0):
            l = lse[b, h, r0 + r]
            if not (l > -np.inf):                                  # row sees no key
                continue
            jmax = Sk
            if causal:
                jmax = max(0, min(Sk, r0 + r + off + 1))
            for J in range((jmax + bs - 1) // bs):
                part = 0.0                                         # vectorizable reduction
                for j in range(J * bs, min(jmax, (J + 1) * bs)):
                    part += math.exp(s[r, j] * scale - l)
                acc[J] += part
        for J in range(Kb):
            W[b, h, I, J] = acc[J]


@register("adaspa_block_mass", "numba")
def adaspa_block_mass_numba(q: Any, k: Any, lse: Any, block_size: int, scale: float,
                            causal: bool, *, out: Any = None) -> tuple[np.ndarray]:
    """Numba :func:`refattn.video.adaspa.adaspa_block_mass` (same arguments, ``out=``)."""
    q64, k64 = _f64(q, "q"), _f64(k, "k")
    l64 = _f64(lse, "lse", 3)
    Bn, Hq, Sq, D = q64.shape
    _gqa(Hq, k64.shape[1])
    if l64.shape != (Bn, Hq, Sq):
        raise InputError(f"lse: expected shape {(Bn, Hq, Sq)}, got {l64.shape}")
    Sk, bs = k64.shape[2], int(block_size)
    tg, user = _targets(out, ((Bn, Hq, num_blocks(Sq, bs), num_blocks(Sk, bs)),))
    kT = np.ascontiguousarray(k64.transpose(0, 1, 3, 2))
    with single_threaded_blas():
        _adaspa_kernel(q64, kT, l64, bs, float(scale), bool(causal), causal_offset(Sq, Sk), tg[0])
    return _finish(tg, user)  # type: ignore[return-value]


# ------------------------------------------------------------------- SVG: sampled-row MSE
@njit(**NJIT_OPTIONS)
def _svg_kernel(q, kT, v, rows, masks, scale, mse):
    Bn, Hq = q.shape[0], q.shape[1]
    D = q.shape[3]
    Hkv, L, Dv = v.shape[1], v.shape[2], v.shape[3]
    G = Hq // Hkv
    M, R = masks.shape[0], rows.shape[0]
    for task in prange(Bn * Hq):
        b = task // Hq
        h = task % Hq
        g = h // G
        qr = np.empty((R, D))
        for r in range(R):
            qr[r] = q[b, h, rows[r]]
        s = np.dot(qr, kT[b, g])                                   # [R, L]
        gold = np.zeros(Dv)
        o = np.zeros(Dv)
        err = np.zeros(M)
        for r in range(R):
            mx = -np.inf
            for j in range(L):
                mx = max(mx, s[r, j])
            gold[:] = 0.0
            den = 0.0
            for j in range(L):
                e = math.exp((s[r, j] - mx) * scale)
                den += e
                for d in range(Dv):
                    gold[d] += e * v[b, g, j, d]
            for d in range(Dv):
                gold[d] /= den
            for m in range(M):
                mm = -np.inf
                for j in range(L):
                    if masks[m, r, j] and s[r, j] > mm:
                        mm = s[r, j]
                if mm == -np.inf:                 # no visible key: NaN output -> NaN MSE
                    err[m] = np.nan
                    continue
                o[:] = 0.0
                dm = 0.0
                for j in range(L):
                    if masks[m, r, j]:
                        e = math.exp((s[r, j] - mm) * scale)
                        dm += e
                        for d in range(Dv):
                            o[d] += e * v[b, g, j, d]
                for d in range(Dv):
                    o[d] /= dm
                acc = 0.0
                for d in range(Dv):
                    acc += (o[d] - gold[d]) ** 2
                err[m] += acc
        for m in range(M):
            mse[b, h, m] = err[m] / (R * Dv)


@register("svg_masked_row_mse", "numba")
def svg_masked_row_mse_numba(q: Any, k: Any, v: Any, rows: Any, masks: Any, scale: float, *,
                             out: Any = None) -> tuple[np.ndarray]:
    """Numba :func:`refattn.video.svg.svg_masked_row_mse` (same arguments, ``out=``)."""
    q64, k64, v64 = _f64(q, "q"), _f64(k, "k"), _f64(v, "v")
    Bn, Hq, L, _ = q64.shape
    _gqa(Hq, k64.shape[1])
    r = np.ascontiguousarray(rows, dtype=np.int64)
    m = np.ascontiguousarray(masks, dtype=np.bool_)
    if r.ndim != 1 or r.size == 0 or r.min() < 0 or r.max() >= L:
        raise InputError(f"rows: expected a non-empty 1-d array of indices in [0, {L}), got {rows!r}")
    if m.ndim != 3 or m.shape[1:] != (r.size, k64.shape[2]):
        raise InputError(f"masks: expected shape [M, {r.size}, {k64.shape[2]}], got {m.shape}")
    tg, user = _targets(out, ((Bn, Hq, m.shape[0]),))
    kT = np.ascontiguousarray(k64.transpose(0, 1, 3, 2))
    with single_threaded_blas():
        _svg_kernel(q64, kT, v64, r, m, float(scale), tg[0])
    return _finish(tg, user)  # type: ignore[return-value]


# ------------------------------------------------------------- SpargeAttn: pool, similarity
@njit(**NJIT_OPTIONS)
def _row_means(x, mean):
    Bn, H, S, D = x.shape
    for task in prange(Bn * H):
        b = task // H
        h = task % H
        for d in range(D):
            mean[b, h, d] = 0.0
        for i in range(S):
            for d in range(D):
                mean[b, h, d] += x[b, h, i, d]
        for d in range(D):
            mean[b, h, d] /= S


@njit(**NJIT_OPTIONS)
def _pool_kernel(x, mean, center, bs, pool, sim):
    Bn, H, S, D = x.shape
    nb = pool.shape[2]
    for task in prange(Bn * H * nb):
        b = task // (H * nb)
        h = (task // nb) % H
        c = task % nb
        r0 = c * bs
        r1 = min(S, r0 + bs)
        n = r1 - r0
        tot = np.zeros(D)
        usum = np.zeros(D)
        zero_row = False
        for i in range(r0, r1):
            nrm = 0.0
            for d in range(D):
                xv = x[b, h, i, d] - mean[b, h, d] if center else x[b, h, i, d]
                tot[d] += xv
                nrm += xv * xv
            if nrm == 0.0:
                zero_row = True
                continue
            inv = 1.0 / math.sqrt(nrm)
            for d in range(D):
                xv = x[b, h, i, d] - mean[b, h, d] if center else x[b, h, i, d]
                usum[d] += xv * inv
        for d in range(D):
            pool[b, h, c, d] = tot[d] / n
        if n < bs or zero_row:
            sim[b, h, c] = -np.inf
        else:
            acc = 0.0
            for d in range(D):
                acc += usum[d] * usum[d]
            sim[b, h, c] = acc / (n * n)


@register("spargeattn_pool", "numba")
def spargeattn_pool_numba(x: Any, block_size: int, center: bool, *,
                          out: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Numba :func:`refattn.video.spargeattn.spargeattn_pool` (same arguments, ``out=``)."""
    x64 = _f64(x, "x")
    Bn, H, S, D = x64.shape
    bs = int(block_size)
    nb = num_blocks(S, bs)
    tg, user = _targets(out, ((Bn, H, nb, D), (Bn, H, nb)))
    mean = np.zeros((Bn, H, D))
    if center:
        _row_means(x64, mean)
    _pool_kernel(x64, mean, bool(center), bs, tg[0], tg[1])
    return _finish(tg, user)  # type: ignore[return-value]


@njit(**NJIT_OPTIONS)
def _map_kernel(pq, pk, allowed, scale, P):
    Bn, Hq, Qb, D = pq.shape
    Hkv, Kb = pk.shape[1], pk.shape[2]
    G = Hq // Hkv
    for task in prange(Bn * Hq * Qb):
        b = task // (Hq * Qb)
        h = (task // Qb) % Hq
        I = task % Qb
        g = h // G
        s = np.empty(Kb)
        mx = -np.inf
        for J in range(Kb):
            if allowed[b, h, I, J]:
                acc = 0.0
                for d in range(D):
                    acc += pq[b, h, I, d] * pk[b, g, J, d]
                s[J] = acc * scale
                mx = max(mx, s[J])
        if not (mx > -np.inf):
            for J in range(Kb):
                P[b, h, I, J] = 0.0
            continue
        den = 0.0
        for J in range(Kb):
            if allowed[b, h, I, J]:
                s[J] = math.exp(s[J] - mx)
                den += s[J]
        for J in range(Kb):
            P[b, h, I, J] = s[J] / den if allowed[b, h, I, J] else 0.0


@register("spargeattn_map", "numba")
def spargeattn_map_numba(pq: Any, pk: Any, allowed: Any, scale: float, *,
                         out: Any = None) -> tuple[np.ndarray]:
    """Numba :func:`refattn.video.spargeattn.spargeattn_map` (same arguments, ``out=``)."""
    q64, k64 = _f64(pq, "pq"), _f64(pk, "pk")
    _gqa(q64.shape[1], k64.shape[1])
    a = np.ascontiguousarray(allowed, dtype=np.bool_)
    want = q64.shape[:3] + (k64.shape[2],)
    if a.shape != want:
        raise InputError(f"allowed: expected shape {want}, got {a.shape}")
    tg, user = _targets(out, (want,))
    _map_kernel(q64, k64, a, float(scale), tg[0])
    return _finish(tg, user)  # type: ignore[return-value]
