"""Numba CPU kernel: piecewise attention forward (op ``piecewise_attention_fwd``, PISA).

Implements :func:`refattn.reference.piecewise.piecewise_attention_forward` (same arguments
plus ``out=``): q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]``,
``selected`` bool ``[B|1, Hq|1, Qb, Kb]`` on a ``block_size`` grid, ``correction`` in
``("global", "per_block", "none")``. For query ``x`` of block ``I``::

    A = sum_{j in Sel} sum_{u in j} e^{s x.k_u} v_u + sum_{j not in Sel} e^{s x.kbar_j} vsum_j
    Z = sum_{j in Sel} sum_{u in j} e^{s x.k_u}     + G,   G = sum_{j not in Sel} e^{s x.kbar_j} len_j
    global:    A += (G / Sk) s x^T Hglob            per_block: A += sum_{j not in Sel} e^{s x.kbar_j} s x^T Hc_j
    out = A / Z,  lse = ln Z

Algorithm: block statistics (``kbar``, ``vsum``, ``Hc = sum (k - kbar) v^T``, ``Hglob``) in
one parallel pass over (batch, kv head, key block); then one ``prange`` task per (batch,
query head, query block): the keys/values of the selected blocks and the statistics of the
others are gathered into contiguous buffers, logits by ``np.dot``, one shared row max, and
``P V`` / ``P vsum`` / ``x Hglob`` by ``np.dot``. Each task owns its output rows. Numerics:
float64 throughout (no emulated baseline exists for this op); outputs stored as float32 (or
the dtype of ``out=``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from ..core.errors import InputError
from ..core.registry import register
from ._blas import single_threaded_blas
from .flags import NJIT_OPTIONS

_CORRECTION_CODES = {"global": 0, "per_block": 1, "none": 2}


@njit(**NJIT_OPTIONS)
def _block_stats(k: np.ndarray, v: np.ndarray, bs: int, kbar: np.ndarray, vsum: np.ndarray,
                 hc: np.ndarray) -> None:
    """Fill ``kbar [B,Hkv,N,D]``, ``vsum [B,Hkv,N,Dv]``, ``hc [B,Hkv,N,D,Dv]`` (float64)."""
    B, Hkv, Sk, D = k.shape
    Dv = v.shape[3]
    N = kbar.shape[2]
    for task in prange(B * Hkv * N):
        j = task % N
        g = (task // N) % Hkv
        b = task // (N * Hkv)
        t0 = j * bs
        t1 = min(t0 + bs, Sk)
        for d in range(D):
            acc = 0.0
            for t in range(t0, t1):
                acc += k[b, g, t, d]
            kbar[b, g, j, d] = acc / (t1 - t0)
        for e in range(Dv):
            acc = 0.0
            for t in range(t0, t1):
                acc += v[b, g, t, e]
            vsum[b, g, j, e] = acc
        kc = np.empty((t1 - t0, D), np.float64)
        for t in range(t0, t1):
            for d in range(D):
                kc[t - t0, d] = k[b, g, t, d] - kbar[b, g, j, d]
        hc[b, g, j] = np.dot(kc.T.copy(), v[b, g, t0:t1])


@njit(**NJIT_OPTIONS)
def _piecewise_kernel(q: np.ndarray, k: np.ndarray, v: np.ndarray, sel: np.ndarray,
                      kbar: np.ndarray, vsum: np.ndarray, hc: np.ndarray, hglob: np.ndarray,
                      bs: int, scale: float, corr: int, out: np.ndarray, lse: np.ndarray) -> None:
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    nqb, nkb = sel.shape[2], sel.shape[3]
    Sb, Sh = sel.shape[0], sel.shape[1]
    for task in prange(B * Hq * nqb):
        I = task % nqb
        h = (task // nqb) % Hq
        b = task // (nqb * Hq)
        g = h // G
        sb = b if Sb > 1 else 0
        sh = h if Sh > 1 else 0
        r0 = I * bs
        nr = min(bs, Sq - r0)
        ne = 0
        na = 0
        for J in range(nkb):
            if sel[sb, sh, I, J]:
                ne += min(bs, Sk - J * bs)
            else:
                na += 1
        kx = np.empty((ne, D), np.float64)
        vx = np.empty((ne, Dv), np.float64)
        km = np.empty((na, D), np.float64)
        vm = np.empty((na, Dv), np.float64)
        lens = np.empty(na, np.float64)
        ids = np.empty(na, np.int64)
        e = 0
        a = 0
        for J in range(nkb):
            t0 = J * bs
            t1 = min(t0 + bs, Sk)
            if sel[sb, sh, I, J]:
                for t in range(t0, t1):
                    kx[e, :] = k[b, g, t, :]
                    vx[e, :] = v[b, g, t, :]
                    e += 1
            else:
                km[a, :] = kbar[b, g, J, :]
                vm[a, :] = vsum[b, g, J, :]
                lens[a] = t1 - t0
                ids[a] = J
                a += 1
        qs = np.ascontiguousarray(q[b, h, r0:r0 + nr])
        sx = np.dot(qs, kx.T.copy()) if ne > 0 else np.zeros((nr, 0), np.float64)
        sm = np.dot(qs, km.T.copy()) if na > 0 else np.zeros((nr, 0), np.float64)
        gl = np.zeros(nr, np.float64)
        den = np.zeros(nr, np.float64)
        mrow = np.empty(nr, np.float64)
        for t in range(nr):
            mx = -np.inf
            for u in range(ne):
                mx = max(mx, sx[t, u] * scale)
            for u in range(na):
                mx = max(mx, sm[t, u] * scale)
            mrow[t] = mx
            tot = 0.0
            for u in range(ne):
                sx[t, u] = math.exp(sx[t, u] * scale - mx)
                tot += sx[t, u]
            gsum = 0.0
            for u in range(na):
                sm[t, u] = math.exp(sm[t, u] * scale - mx)
                gsum += sm[t, u] * lens[u]
            gl[t] = gsum
            den[t] = tot + gsum
        num = np.zeros((nr, Dv), np.float64)
        if ne > 0:
            num += np.dot(sx, vx)
        if na > 0:
            num += np.dot(sm, vm)
            if corr == 0:
                xh = np.dot(qs, hglob[b, g])
                for t in range(nr):
                    c = gl[t] / Sk * scale
                    for d in range(Dv):
                        num[t, d] += c * xh[t, d]
            elif corr == 1:
                for u in range(na):
                    xh = np.dot(qs, hc[b, g, ids[u]])
                    for t in range(nr):
                        c = sm[t, u] * scale
                        for d in range(Dv):
                            num[t, d] += c * xh[t, d]
        for t in range(nr):
            inv = 1.0 / den[t]
            for d in range(Dv):
                out[b, h, r0 + t, d] = num[t, d] * inv
            lse[b, h, r0 + t] = mrow[t] + math.log(den[t])


@register("piecewise_attention_fwd", "numba")
def piecewise_attention_forward(q: Any, k: Any, v: Any, selected: Any, block_size: int,
                                scale: float | None = None, correction: str = "global", *,
                                out: tuple[np.ndarray, np.ndarray] | None = None
                                ) -> tuple[np.ndarray, np.ndarray]:
    """Numba piecewise attention forward; arguments as the reference. Returns ``out``
    ``[B, Hq, Sq, Dv]`` and ``lse [B, Hq, Sq]`` (float32 unless ``out=`` is given)."""
    if correction not in _CORRECTION_CODES:
        raise InputError(f"correction: expected one of {tuple(_CORRECTION_CODES)}, got {correction!r}")
    q64, k64, v64 = (np.ascontiguousarray(np.asarray(x), dtype=np.float64) for x in (q, k, v))
    if q64.ndim != 4 or k64.ndim != 4 or v64.ndim != 4:
        raise InputError("q, k, v: expected 4-d arrays [B, H, S, D]")
    B, Hq, Sq, D = q64.shape
    Hkv, Sk, Dv = k64.shape[1], k64.shape[2], v64.shape[3]
    if Hq % Hkv or k64.shape[0] != B or k64.shape[3] != D or v64.shape[:3] != k64.shape[:3]:
        raise InputError(f"q {q64.shape}, k {k64.shape}, v {v64.shape}: inconsistent shapes")
    bs = int(block_size)
    sel = np.asarray(selected)
    while sel.ndim < 4:
        sel = sel[None]
    nqb, nkb = -(-Sq // bs), -(-Sk // bs)
    if sel.dtype != bool or sel.shape[2:] != (nqb, nkb) or sel.shape[0] not in (1, B) \
            or sel.shape[1] not in (1, Hq):
        raise InputError(f"selected: expected bool [B|1, Hq|1, {nqb}, {nkb}], got {sel.dtype} {sel.shape}")
    sel = np.ascontiguousarray(sel)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    kbar = np.empty((B, Hkv, nkb, D))
    vsum = np.empty((B, Hkv, nkb, Dv))
    hc = np.empty((B, Hkv, nkb, D, Dv))
    if out is None:
        out = (np.empty((B, Hq, Sq, Dv), np.float32), np.empty((B, Hq, Sq), np.float32))
    o, l = out
    if o.shape != (B, Hq, Sq, Dv) or l.shape != (B, Hq, Sq):
        raise InputError(f"out: expected shapes {(B, Hq, Sq, Dv)} and {(B, Hq, Sq)}, got "
                         f"{o.shape} and {l.shape}")
    with single_threaded_blas():
        _block_stats(k64, v64, bs, kbar, vsum, hc)
        hglob = np.ascontiguousarray(hc.sum(axis=2))
        _piecewise_kernel(q64, k64, v64, sel, kbar, vsum, hc, hglob, bs, scale,
                          _CORRECTION_CODES[correction], o, l)
    return o, l
