"""Numba kernels of the tile-product scoring ops: ``xattention_score``, ``bsfa_score``,
``quest_score``.

These ops multiply (strided or pooled) queries by keys over the whole sequence, so each
kernel works on float32 tiles with ``np.dot`` (BLAS sgemm, float32 accumulation, kept
single-threaded inside the ``prange`` workers by :func:`single_threaded_blas`) and fuses
what follows (masking, softmax, block sums, maxima) so that no ``Sq x Sk`` array is ever
materialised. One ``prange`` task per (batch, query head, query block); each task owns its
output rows.
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
from .numba_scoring_common import exp_f32, f32, kv_group, outputs

BSFA_KEY_CHUNK = 512      # keys per sgemm in the BSFA block-max kernel (rounded to block_k)
QUEST_ROWS = 128          # query rows per Quest task
XATTN_BLOCK_ROWS = 8      # XAttention: block rows per task (one sgemm of 8 * block/stride rows)


# --------------------------------------------------------------------------- XAttention
@njit(**NJIT_OPTIONS)
def _xattn(qr: np.ndarray, kr: np.ndarray, group: int, bt: int, t_real: int, n_real: int,
           scale: float, causal: bool, W: np.ndarray) -> None:
    """qr ``[B, Hq, >= t_real, S*D]`` (query tiles), kr ``[B, Hkv, T, S*D]`` (key tiles,
    rows reversed inside each tile); W ``[B, Hq, nbp, nbp]``. Task = ``XATTN_BLOCK_ROWS`` block rows of
    ``bt`` tiles each: antidiagonal logits by one sgemm (keys up to the last row's
    diagonal when causal), tile-causal softmax (float32 exp, float64 sums), probabilities
    summed into ``bt x bt`` blocks in float64."""
    B, Hq = qr.shape[0], qr.shape[1]
    T = kr.shape[2]
    nbp = W.shape[2]
    ngrp = (nbp + XATTN_BLOCK_ROWS - 1) // XATTN_BLOCK_ROWS
    for task in prange(B * Hq * ngrp):
        b = task // (Hq * ngrp)
        h = (task // ngrp) % Hq
        I0 = (task % ngrp) * XATTN_BLOCK_ROWS
        I1 = min(nbp, I0 + XATTN_BLOCK_ROWS)
        g = h // group
        acc = np.zeros((I1 - I0, nbp))
        Ir = min(I1, n_real)                 # block rows holding a real token
        if Ir > I0:
            i0 = I0 * bt
            rows = min(Ir * bt, t_real) - i0  # query tiles holding a real token
            kend = Ir * bt if causal else T
            A = np.empty((rows, kend), np.float32)
            np.dot(qr[b, h, i0:i0 + rows], kr[b, g, :kend].T, A)
            for r in range(rows):
                i = i0 + r
                jn = i + 1 if causal else kend
                m = np.float32(-np.inf)
                for j in range(jn):
                    m = max(m, A[r, j])
                tot = 0.0
                for j in range(jn):
                    e = exp_f32((A[r, j] - m) * np.float32(scale))
                    A[r, j] = e
                    tot += e
                inv = 1.0 / tot
                row = acc[i // bt - I0]
                for J in range((jn + bt - 1) // bt):
                    s = 0.0
                    for j in range(J * bt, min(jn, (J + 1) * bt)):
                        s += A[r, j]
                    row[J] += s * inv
        for I in range(I0, I1):
            for J in range(nbp):
                W[b, h, I, J] = acc[I - I0, J]


@register("xattention_score", "numba")
def xattention_score(q: Any, k: Any, block_size: int, stride: int, chunk_size: int,
                     norm: float, causal: bool, *,
                     out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """XAttention antidiagonal block scores (reference
    :func:`refattn.methods.xattention.xattention_score`): ``(W,)`` ``[B, Hq, nbp, nbp]`` on
    the chunk-padded grid. q, k ``[B, H, L, D]`` are zero-padded to ``ceil(L/C)*C`` and cut
    into stride tiles; logits in float32 (sgemm over ``S*D``), softmax and sums as above."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    B, Hq, L, D = qf.shape
    if kf.shape[2] != L:
        raise InputError(f"xattention_score: q_len and k_len must be equal, got {L} and {kf.shape[2]}")
    S, bs, C = int(stride), int(block_size), int(chunk_size)
    if bs % S or C % bs:
        raise InputError(f"xattention_score: stride {S} must divide block_size {bs}, which "
                         f"must divide chunk_size {C}")
    Lp = num_blocks(L, C) * C
    T = Lp // S
    nbp = Lp // bs
    (W,) = outputs(out, [(B, Hq, nbp, nbp)], "xattention_score")
    # A[i, j] = sum_u <Q[iS+u], K[jS+S-1-u]>: query tiles as they are (a free reshape when
    # S divides L; only tiles holding a real token are read), key tiles reversed and
    # zero-padded to T tiles (padded keys have logit 0 and take mass when not causal).
    Tq = num_blocks(L, S)
    if Tq * S == L:
        qr = qf.reshape(B, Hq, Tq, S * D)
    else:
        qp = np.zeros((B, Hq, Tq * S, D), np.float32)
        qp[:, :, :L] = qf
        qr = qp.reshape(B, Hq, Tq, S * D)
    if Lp == L:
        kp = kf
    else:
        kp = np.zeros((B, kf.shape[1], Lp, D), np.float32)
        kp[:, :, :L] = kf
    kr = np.ascontiguousarray(kp.reshape(B, kf.shape[1], T, S, D)[:, :, :, ::-1]).reshape(
        B, kf.shape[1], T, S * D)
    del kp
    scale = 1.0 / (math.sqrt(D) * S * float(norm))
    with single_threaded_blas():
        _xattn(qr, kr, G, bs // S, num_blocks(L, S), num_blocks(L, bs), scale, bool(causal), W)
    return (W,)


# --------------------------------------------------------------------------------- BSFA
@njit(**NJIT_OPTIONS)
def _bsfa(q: np.ndarray, k: np.ndarray, group: int, bq: int, bk: int, chunk: int,
          scale: float, causal: bool, mx: np.ndarray) -> None:
    """mx[b, h, m, n] = max over the real tokens of tile (m, n) of ``scale * q . k``.
    One task per (batch, head, query tile); keys in sgemm chunks of ``chunk`` keys.
    ``causal``: only the key tiles ``n < n_legal(m)`` that hold a visible pair are computed
    (those whose first key ``n * bk <= last query + Sk - Sq``, bottom-right alignment, as
    ``legal_blocks``); the others are ``-inf``. A computed tile's max is unmasked."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    qb, kb = mx.shape[2], mx.shape[3]
    for task in prange(B * Hq * qb):
        b = task // (Hq * qb)
        h = (task // qb) % Hq
        t = task % qb
        # query tiles in the order 0, qb-1, 1, qb-2, ...: causal tasks cost ~ m, so any
        # contiguous range of tasks (a thread's share of the prange) gets its fair share
        mi = t // 2 if t % 2 == 0 else qb - 1 - t // 2
        g = h // group
        r0 = mi * bq
        rn = min(Sq, r0 + bq) - r0
        nt = kb
        if causal:
            last = r0 + rn - 1 + Sk - Sq            # last key visible to the tile's last row
            nt = min(kb, last // bk + 1) if last >= 0 else 0
        for n in range(nt, kb):
            mx[b, h, mi, n] = -np.inf
        full = np.empty((rn, chunk), np.float32)
        # the sgemm chunks are those of causal=False (the last one needed is computed
        # whole), so that a tile's value does not depend on the mode, bit for bit
        for c0 in range(0, min(Sk, nt * bk), chunk):
            cn = min(Sk, c0 + chunk) - c0
            sv = full if cn == chunk else np.empty((rn, cn), np.float32)
            np.dot(q[b, h, r0:r0 + rn], k[b, g, c0:c0 + cn].T, sv)
            for n in range(c0 // bk, min(nt, (c0 + cn + bk - 1) // bk)):
                j0 = n * bk - c0
                j1 = min(cn, j0 + bk)
                if scale >= 0:
                    best = np.float32(-np.inf)
                    for r in range(rn):
                        for j in range(j0, j1):
                            best = max(best, sv[r, j])
                else:
                    best = np.float32(np.inf)
                    for r in range(rn):
                        for j in range(j0, j1):
                            best = min(best, sv[r, j])
                mx[b, h, mi, n] = best * scale


@register("bsfa_score", "numba")
def bsfa_score(q: Any, k: Any, block_q: int, block_k: int, scale: float, causal: bool = False,
               *, out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """BSFA tile maxima (reference :func:`refattn.methods.bsfa.bsfa_block_max`): ``(mx,)``
    ``[B, Hq, ceil(Sq/block_q), ceil(Sk/block_k)]`` of ``scale * q . k`` over every tile's
    real tokens (no causal mask inside a tile), float32 sgemm; the maximum is exact on those
    logits. ``causal=True``: tiles without a visible (query, key) pair are ``-inf`` and are
    skipped (about half the work of ``causal=False`` in prefill)."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    bq, bk = int(block_q), int(block_k)
    B, Hq, Sq, _ = qf.shape
    Sk = kf.shape[2]
    (mx,) = outputs(out, [(B, Hq, num_blocks(Sq, bq), num_blocks(Sk, bk))], "bsfa_score")
    chunk = max(1, BSFA_KEY_CHUNK // bk) * bk
    with single_threaded_blas():
        _bsfa(qf, kf, G, bq, bk, chunk, float(scale), bool(causal), mx)
    return (mx,)


# -------------------------------------------------------------------------------- Quest
@njit(**NJIT_OPTIONS)
def _page_bounds(k: np.ndarray, page: int, Mm: np.ndarray) -> None:
    """Channel max (``Mm[..., :D]``) and min (``Mm[..., D:]``) of each page's real keys,
    ``Mm [B, Hkv, Np, 2D]`` float32 (exact)."""
    B, H, S, D = k.shape
    n = Mm.shape[2]
    for task in prange(B * H * n):
        b = task // (H * n)
        g = (task // n) % H
        p = task % n
        row = Mm[b, g, p]
        for d in range(D):
            row[d] = k[b, g, p * page, d]
            row[D + d] = k[b, g, p * page, d]
        for t in range(p * page + 1, min(S, (p + 1) * page)):
            kt = k[b, g, t]
            for d in range(D):
                row[d] = max(row[d], kt[d])
                row[D + d] = min(row[D + d], kt[d])


@njit(**NJIT_OPTIONS)
def _quest(q: np.ndarray, k: np.ndarray, Mm: np.ndarray, group: int, page: int, causal: bool,
           U: np.ndarray) -> None:
    """U[b,h,r,p] = [q_r+, q_r-] . [M_p, m_p] (one sgemm over 2D) on pages up to the tile's
    last own page; with ``causal`` the row's own page is recomputed from its keys
    ``[cP, t]`` (float64 sum) and later pages are ``-inf``. Mm ``[B, Hkv, Np, 2D]``."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    n = Mm.shape[2]
    off = Sk - Sq
    ntile = (Sq + QUEST_ROWS - 1) // QUEST_ROWS
    for task in prange(B * Hq * ntile):
        b = task // (Hq * ntile)
        h = (task // ntile) % Hq
        r0 = (task % ntile) * QUEST_ROWS
        rn = min(Sq, r0 + QUEST_ROWS) - r0
        g = h // group
        last = r0 + rn - 1 + off
        npg = n if not causal else (last // page + 1 if last >= 0 else 0)
        npg = min(n, npg)
        U1 = np.empty((rn, npg), np.float32)
        if npg > 0:
            qs = np.empty((rn, 2 * D), np.float32)
            for r in range(rn):
                for d in range(D):
                    x = q[b, h, r0 + r, d]
                    qs[r, d] = max(x, np.float32(0.0))
                    qs[r, D + d] = min(x, np.float32(0.0))
            np.dot(qs, Mm[b, g, :npg].T, U1)
        hi = np.empty(D, np.float32)
        lo = np.empty(D, np.float32)
        for r in range(rn):
            t = r0 + r
            pos = t + off
            urow = U[b, h, t]
            if not causal:
                for p in range(n):
                    urow[p] = U1[r, p]
                continue
            own = pos // page if pos >= 0 else -1
            for p in range(min(own, npg)):
                urow[p] = U1[r, p]
            for p in range(max(own, 0), n):
                urow[p] = -np.inf
            if own >= 0:                 # own page truncated after key pos
                for d in range(D):
                    hi[d] = k[b, g, own * page, d]
                    lo[d] = hi[d]
                for j in range(own * page + 1, pos + 1):
                    kj = k[b, g, j]
                    for d in range(D):
                        hi[d] = max(hi[d], kj[d])
                        lo[d] = min(lo[d], kj[d])
                acc = 0.0
                for d in range(D):
                    x = q[b, h, t, d]
                    acc += x * hi[d] if x > 0 else x * lo[d]
                urow[own] = acc


@register("quest_score", "numba")
def quest_score(q: Any, k: Any, page_size: int, causal: bool, *,
                out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Quest's upper bound (reference :func:`refattn.methods.quest.quest_bound`): ``(U,)``
    ``[B, Hq, Sq, ceil(Sk/page_size)]``; rows sit at key positions ``r + Sk - Sq``."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    P = int(page_size)
    B, Hq, Sq, D = qf.shape
    Hkv, Sk = kf.shape[1], kf.shape[2]
    n = num_blocks(Sk, P)
    (U,) = outputs(out, [(B, Hq, Sq, n)], "quest_score")
    Mm = np.empty((B, Hkv, n, 2 * D), np.float32)
    _page_bounds(kf, P, Mm)
    with single_threaded_blas():
        _quest(qf, kf, Mm, G, P, bool(causal), U)
    return (U,)
