"""Numba kernels of the softmax-estimate scoring ops: ``minference_score``,
``flexprefill_score``, ``nsa_score`` (ProxyAttn's are in ``numba_scoring_proxy``).

Each estimates attention probabilities from a subset of queries (the last rows,
sampled rows, or compressed keys): logits by ``np.dot`` on float32 tiles (BLAS sgemm,
float32 accumulation, single-threaded inside ``prange``), softmax with a float32 ``exp``
and float64 row sums, and the reductions (column sums, diagonal sums, block sums) in
float64. Outputs are float32 unless the
caller preallocates float64.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from ..core.blockmask import num_blocks
from ..core.errors import InputError
from ..core.registry import register
from ._blas import single_threaded_blas
from .flags import NJIT_OPTIONS
from .numba_scoring_common import block_counts, block_sums, exp_f32, f32, kv_group, outputs

NSA_ROWS = 64             # query rows per NSA task


# ----------------------------------------------------------- vertical / slash (last rows)
@njit(**NJIT_OPTIONS)
def _vertical_slash(q: np.ndarray, k: np.ndarray, group: int, ell: int, scale: float,
                    div: float, vert: np.ndarray, sl: np.ndarray) -> None:
    """For the last ``ell`` query rows (at key positions ``p = i + Sk - Sq``): causal row
    softmax of ``scale * q . k``; ``vert[j]`` = column sums / ``div``, ``sl[o]`` = sums along
    the diagonal ``o = p - j`` / ``div``. One task per (batch, head)."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    off = Sk - Sq
    for task in prange(B * Hq):
        b = task // Hq
        h = task % Hq
        g = h // group
        pmax = min(Sk - 1, Sq - 1 + off)
        v = np.zeros(Sk)
        s_ = np.zeros(Sk)
        if pmax >= 0:
            kn = pmax + 1
            s = np.empty((ell, kn), np.float32)
            np.dot(q[b, h, Sq - ell:], k[b, g, :kn].T, s)
            for r in range(ell):
                p = Sq - ell + r + off
                if p < 0:
                    continue
                m = np.float32(-np.inf)
                for j in range(p + 1):
                    m = max(m, s[r, j])
                tot = 0.0
                for j in range(p + 1):
                    e = exp_f32((s[r, j] - m) * np.float32(scale))
                    s[r, j] = e
                    tot += e
                inv = 1.0 / (tot * div)
                for j in range(p + 1):
                    x = s[r, j] * inv
                    v[j] += x
                    s_[p - j] += x
        for j in range(Sk):
            vert[b, h, j] = v[j]
            sl[b, h, j] = s_[j]


@register("minference_score", "numba")
def minference_score(q: Any, k: Any, last_q: int = 64, scale: float | None = None, *,
                     out: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """MInference vertical and slash scores (reference
    :func:`refattn.methods.minference.minference_score`): ``(vertical, slash)``
    ``[B, Hq, Sk]`` each, from the last ``min(last_q, Sq)`` queries."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    B, Hq, Sq, D = qf.shape
    Sk = kf.shape[2]
    vert, sl = outputs(out, [(B, Hq, Sk)] * 2, "minference_score")
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    with single_threaded_blas():
        _vertical_slash(qf, kf, G, min(int(last_q), Sq), sc, 1.0, vert, sl)
    return vert, sl


# ----------------------------------------------------------------------------- FlexPrefill
@njit(**NJIT_OPTIONS)
def _flex_pooled(q: np.ndarray, qm: np.ndarray, km: np.ndarray, group: int, ell: int,
                 scale: float, pooled: np.ndarray, blk: np.ndarray) -> None:
    """pooled[b,h] = softmax_J(mean of the last ``ell`` scaled queries . km[J]);
    blk[b,h,I] = softmax over J <= I of scale * qm[I] . km[J] (0 above the diagonal).
    qm, km float64 true-length block means."""
    B, Hq, L, D = q.shape
    n = km.shape[2]
    for task in prange(B * Hq):
        b = task // Hq
        h = task % Hq
        g = h // group
        qbar = np.zeros(D)
        for i in range(L - ell, L):
            for d in range(D):
                qbar[d] += q[b, h, i, d]
        for d in range(D):
            qbar[d] *= scale / ell
        z = np.empty(n)
        for I in range(-1, n):                # I = -1: the pooled row, then block rows
            last = n - 1 if I < 0 else I
            m = -np.inf
            for j in range(last + 1):
                acc = 0.0
                if I < 0:
                    for d in range(D):
                        acc += qbar[d] * km[b, g, j, d]
                else:
                    for d in range(D):
                        acc += qm[b, h, I, d] * km[b, g, j, d]
                    acc *= scale
                z[j] = acc
                m = max(m, acc)
            tot = 0.0
            for j in range(last + 1):
                z[j] = math.exp(z[j] - m)
                tot += z[j]
            for j in range(n):
                x = z[j] / tot if j <= last else 0.0
                if I < 0:
                    pooled[b, h, j] = x
                else:
                    blk[b, h, I, j] = x


@register("flexprefill_score", "numba")
def flexprefill_score(q: Any, k: Any, block_size: int = 128, scale: float | None = None, *,
                      out: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, ...]:
    """FlexPrefill estimates (reference :func:`refattn.methods.flexprefill.flexprefill_score`),
    ``Sq == Sk == L``: ``vertical, slash [B,Hq,L]`` (means over the last ``min(b, L)``
    queries), ``pooled_attn [B,Hq,n]``, ``block_attn [B,Hq,n,n]``."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    B, Hq, L, D = qf.shape
    if kf.shape[2] != L:
        raise InputError(f"flexprefill_score: q_len and k_len must be equal, got {L} and {kf.shape[2]}")
    b = int(block_size)
    n = num_blocks(L, b)
    vert, sl, pooled, blk = outputs(out, [(B, Hq, L), (B, Hq, L), (B, Hq, n), (B, Hq, n, n)],
                                    "flexprefill_score")
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    ell = min(b, L)
    cnt = block_counts(L, b)[:, None]
    with single_threaded_blas():
        _vertical_slash(qf, kf, G, ell, sc, float(ell), vert, sl)
    _flex_pooled(qf, block_sums(qf, b) / cnt, block_sums(kf, b) / cnt, G, ell, sc, pooled, blk)
    return vert, sl, pooled, blk


# ------------------------------------------------------------------------------------ NSA
@njit(**NJIT_OPTIONS)
def _compress(k: np.ndarray, l: int, d: int, nc: int) -> np.ndarray:
    """Mean-pooled compression keys ``kc[i] = mean(K[i d : i d + l])``, float32
    ``[B, Hkv, nc, D]`` (sums in float64)."""
    B, H, S, D = k.shape
    kc = np.empty((B, H, nc, D), np.float32)
    for task in prange(B * H * nc):
        b = task // (H * nc)
        g = (task // nc) % H
        i = task % nc
        acc = np.zeros(D)
        for t in range(i * d, i * d + l):
            for e in range(D):
                acc[e] += k[b, g, t, e]
        for e in range(D):
            kc[b, g, i, e] = acc[e] / l
    return kc


@njit(**NJIT_OPTIONS)
def _nsa(q: np.ndarray, kc: np.ndarray, group: int, Sk: int, l: int, d: int, lp: int,
         causal: bool, scale: float, p_slc: np.ndarray, p_cmp: np.ndarray) -> None:
    """Compressed attention ``p_cmp`` (softmax over fully seen compression blocks) and its
    spread to selection blocks summed over the GQA group ``p_slc`` (eq. 9-10). One task per
    (batch, kv head, tile of ``NSA_ROWS`` rows); it owns those rows of both outputs."""
    B, Hq, Sq, D = q.shape
    nc = kc.shape[2]
    kb = p_slc.shape[3]
    per_c = l // d
    off = Sk - Sq
    Hkv = Hq // group
    ntile = (Sq + NSA_ROWS - 1) // NSA_ROWS
    for task in prange(B * Hkv * ntile):
        b = task // (Hkv * ntile)
        g = (task // ntile) % Hkv
        r0 = (task % ntile) * NSA_ROWS
        rn = min(Sq, r0 + NSA_ROWS) - r0
        last = r0 + rn - 1 + off
        nmax = nc
        if causal:
            nmax = min(nc, (last - l + 1) // d + 1) if last >= l - 1 else 0
        acc = np.zeros((rn, kb))
        blk = np.empty(nc + per_c, np.int64)   # selection block of each stride piece
        for u in range(nc + per_c):
            blk[u] = min(kb - 1, (u * d) // lp)
        s = np.empty((rn, nmax), np.float32)
        for h in range(g * group, (g + 1) * group):
            if nmax > 0:
                np.dot(q[b, h, r0:r0 + rn], kc[b, g, :nmax].T, s)
            for r in range(rn):
                pos = r0 + r + off
                ns = nmax
                if causal:
                    ns = min(nc, (pos - l + 1) // d + 1) if pos >= l - 1 else 0
                m = np.float32(-np.inf)
                for i in range(ns):
                    m = max(m, s[r, i])
                tot = 0.0
                for i in range(ns):
                    e = exp_f32((s[r, i] - m) * np.float32(scale))
                    s[r, i] = e
                    tot += e
                inv = 1.0 / tot
                arow = acc[r]
                prow = p_cmp[b, h, r0 + r]
                for i in range(ns):
                    x = s[r, i] * inv
                    prow[i] = x
                    for mm in range(per_c):
                        arow[blk[i + mm]] += x
                for i in range(ns, nc):
                    prow[i] = 0.0
        for r in range(rn):
            for j in range(kb):
                p_slc[b, g, r0 + r, j] = acc[r, j]


@register("nsa_score", "numba")
def nsa_score(q: Any, k: Any, compress_size: int, stride: int, block_size: int, causal: bool,
              *, out: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """NSA selection-block importance (reference :func:`refattn.methods.nsa.nsa_scores`):
    ``p_slc [B, Hkv, Sq, ceil(Sk/block_size)]`` (group sums) and ``p_cmp [B, Hq, Sq, Nc]``,
    ``Nc = floor((Sk - l)/d) + 1`` (0 when ``Sk < l``)."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    l, d, lp = int(compress_size), int(stride), int(block_size)
    if l % d or lp % d:
        raise InputError(f"nsa_score: stride {d} must divide compress_size {l} and block_size {lp}")
    B, Hq, Sq, D = qf.shape
    Hkv, Sk = kf.shape[1], kf.shape[2]
    nc = (Sk - l) // d + 1 if Sk >= l else 0
    p_slc, p_cmp = outputs(out, [(B, Hkv, Sq, num_blocks(Sk, lp)), (B, Hq, Sq, nc)], "nsa_score")
    kc = _compress(kf, l, d, nc)
    with single_threaded_blas():
        _nsa(qf, kc, G, Sk, l, d, lp, bool(causal), 1.0 / math.sqrt(D), p_slc, p_cmp)
    return p_slc, p_cmp


# ------------------------------------------------------------------------------------ PBS
@njit(**NJIT_OPTIONS)
def _key_importance(q: np.ndarray, k: np.ndarray, group: int, ell: int, T: int,
                    scale: float, w: np.ndarray) -> None:
    """w[b,h,t] = mean over the last ``ell`` queries of softmax_t(scale * q . k_t) over the
    keys ``t < T`` (no causal mask). One task per (batch, head)."""
    B, Hq, L, D = q.shape
    for task in prange(B * Hq):
        b = task // Hq
        h = task % Hq
        g = h // group
        s = np.empty((ell, T), np.float32)
        np.dot(q[b, h, L - ell:], k[b, g, :T].T, s)
        acc = np.zeros(T)
        for r in range(ell):
            m = np.float32(-np.inf)
            for j in range(T):
                m = max(m, s[r, j])
            tot = 0.0
            for j in range(T):
                e = exp_f32((s[r, j] - m) * np.float32(scale))
                s[r, j] = e
                tot += e
            inv = 1.0 / (tot * ell)
            for j in range(T):
                acc[j] += s[r, j] * inv
        for j in range(T):
            w[b, h, j] = acc[j]


@register("pbs_key_importance", "numba")
def pbs_key_importance(q: Any, k: Any, block_size: int, segment_size: int, *,
                       out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """PBS key importance (reference :func:`refattn.methods.pbs.pbs_key_importance`):
    ``(w,)`` ``[B, Hq, floor(L/s)*s]``, the mean softmax of the last ``block_size`` queries
    over the keys of the complete segments, no causal mask."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    B, Hq, L, D = qf.shape
    T = (L // int(segment_size)) * int(segment_size)
    (w,) = outputs(out, [(B, Hq, T)], "pbs_key_importance")
    if T > 0:
        with single_threaded_blas():
            _key_importance(qf, kf, G, min(int(block_size), L), T, 1.0 / math.sqrt(D), w)
    return (w,)
