"""Numba kernels of ProxyAttn's scoring ops: ``proxyattn_score`` (strided, max-pooled proxy
head attention, Eq. 1-2) and ``proxyattn_budget_score`` (Algorithm 1's pooled attention of
the last query block); references in :mod:`refattn.methods.proxyattn`.

Both are float64 throughout (head means, dgemm tiles, ``exp``, block statistics), as their
references: ``proxyattn_score`` is a max of probabilities, where a float32 logit's error
would show relative to the value itself. Per key block they keep the max logit and the sum
of ``exp(logit - max)`` (:func:`block_stats`), from which :func:`row_max_sum` gives the row's
softmax max and sum. Outputs are float32 unless the caller preallocates float64.
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
from .fastexp import exp_f64
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS
from .numba_scoring_common import f32, kv_group, outputs

PROXY_ROWS = 64           # kept query rows per task (about; whole query blocks)
PROXY_KEYS = 512          # kept keys per product (about; whole key blocks)
BUDGET_KEYS = 512         # budget: keys per product (about; whole key blocks)


# -------------------------------------------------------------------------- ProxyAttention
@njit(**NJIT_OPTIONS)
def _proxy_heads(x: np.ndarray, group: int, stride: int) -> np.ndarray:
    """float64 ``[B, H // group, ceil(S / stride), D]``: the mean over each run of ``group``
    consecutive heads of ``x [B, H, S, D]`` (float32) at the rows ``0, stride, 2 stride,
    ...`` (float64 sums, divided by ``group``, as the reference's ``mean``)."""
    B, H, S, D = x.shape
    C = H // group
    n = (S + stride - 1) // stride
    y = np.zeros((B, C, n, D))
    for task in prange(B * C * n):
        b = task // (C * n)
        c = (task // n) % C
        i = task % n
        row = y[b, c, i]
        for h in range(c * group, (c + 1) * group):
            src = x[b, h, i * stride]
            for e in range(D):
                row[e] += src[e]
        for e in range(D):
            row[e] /= group
    return y


@njit(**NJIT_HELPER_OPTIONS)
def block_stats(z: np.ndarray, jn: np.ndarray, j0: int, J0: int, J1: int, bs: int,
                stride: int, Sk: int, scale: float, bm: np.ndarray, bsum: np.ndarray) -> None:
    """Softmax statistics per key block of a tile of logits (shared with
    ``proxyattn_budget_score``). ``z [R, nk]`` float64: unscaled logits of ``R`` rows
    against the kept keys ``j0 .. j0 + nk - 1`` (kept key ``j`` is token ``j * stride``,
    ``Sk`` tokens in all); row ``r`` sees its first ``jn[r]`` kept keys. For each key block
    ``J0 <= J < J1`` (all its kept keys up to ``jn`` lie in the tile): ``bm[r, J]`` = the
    max of ``scale * z`` over the kept keys of ``J`` that row ``r`` sees and ``bsum[r, J]``
    = the sum of ``exp(scale * z - bm)`` over them (``>= 1``); ``-inf`` and ``0`` where the
    row sees none (every ``-inf`` case is this explicit branch)."""
    for r in range(z.shape[0]):
        for J in range(J0, J1):
            lo = (J * bs + stride - 1) // stride - j0
            hi = min((min(Sk, (J + 1) * bs) + stride - 1) // stride, jn[r]) - j0
            if hi <= lo:
                bm[r, J] = -np.inf
                bsum[r, J] = 0.0
                continue
            m = z[r, lo]
            for t in range(lo + 1, hi):
                m = max(m, z[r, t])
            m *= scale                                 # = max of the scaled logits
            tot = 0.0
            for t in range(lo, hi):
                tot += exp_f64(z[r, t] * scale - m)
            bm[r, J] = m
            bsum[r, J] = tot


@njit(**NJIT_HELPER_OPTIONS)
def row_max_sum(bm: np.ndarray, bsum: np.ndarray, nJ: int) -> tuple[float, float]:
    """``(m, l)`` of one row's softmax from its block statistics (:func:`block_stats`) over
    the blocks ``J < nJ``: ``m = max bm``, ``l = sum bsum * exp(bm - m)`` over the blocks
    the row sees; ``(-inf, 0)`` when it sees none (the caller skips ``l == 0``)."""
    m = -np.inf
    for J in range(nJ):
        if bsum[J] > 0.0:
            m = max(m, bm[J])
    tot = 0.0
    for J in range(nJ):
        if bsum[J] > 0.0:
            tot += bsum[J] * exp_f64(bm[J] - m)
    return m, tot


@njit(**NJIT_OPTIONS)
def _proxy(qt: np.ndarray, kt: np.ndarray, Sq: int, Sk: int, bs: int, stride: int,
           causal: bool, scale: float, S: np.ndarray) -> None:
    """``S[b, c, I, J]`` = max over the kept rows of query block ``I`` and the kept keys of
    key block ``J`` of the proxy softmax ``P`` (0 where the tile holds no visible kept pair).
    ``qt [B, C, R, D]``, ``kt [B, C, T, D]``: float64 proxy heads at the kept rows / keys.

    ``P[r, t] = exp(z - m_r) / l_r`` is increasing in the logit ``z`` within a row, so its
    max over a block is ``exp(bm - m_r) / l_r`` with ``bm`` the block's max logit: per kept
    row, :func:`block_stats` over key chunks gives ``bm`` and the block sums, from which
    :func:`row_max_sum` gives ``m_r, l_r``; no ``[R, T]`` map is formed. One task per
    (batch, proxy head, tile of whole query blocks with about ``PROXY_ROWS`` kept rows);
    float64 products (dgemm) on chunks of whole key blocks (about ``PROXY_KEYS`` kept keys)
    up to the tile's last visible key. Tiles run in zigzag order (first, last, second, ...)
    so that the static split of ``prange`` gives each thread a share of the long causal
    rows."""
    B, C, R, D = qt.shape
    T = kt.shape[2]
    qb, kb = S.shape[2], S.shape[3]
    off = Sk - Sq
    nbq = max(1, (PROXY_ROWS * stride) // bs)       # query blocks per task
    nbk = max(1, (PROXY_KEYS * stride) // bs)       # key blocks per product
    ntile = (qb + nbq - 1) // nbq
    for task in prange(B * C * ntile):
        b = task // (C * ntile)
        c = (task // ntile) % C
        u = task % ntile
        tile = u // 2 if u % 2 == 0 else ntile - 1 - u // 2
        I0 = tile * nbq
        I1 = min(qb, I0 + nbq)
        i0 = (I0 * bs + stride - 1) // stride        # kept rows of the tile: i0 .. i1 - 1
        i1 = min(R, (min(Sq, I1 * bs) + stride - 1) // stride)
        nr = i1 - i0
        acc = np.zeros((I1 - I0, kb))
        if nr > 0:
            jn = np.empty(nr, np.int64)              # kept keys each row sees (a prefix)
            for r in range(nr):
                pos = (i0 + r) * stride + off
                if not causal:
                    jn[r] = T
                elif pos < 0:
                    jn[r] = 0
                else:
                    jn[r] = min(T, pos // stride + 1)
            kn = jn[nr - 1]
            if kn > 0:
                nJ = ((kn - 1) * stride) // bs + 1   # key blocks up to the last seen kept key
                bm = np.empty((nr, nJ))
                bsum = np.empty((nr, nJ))
                for J0 in range(0, nJ, nbk):
                    J1 = min(nJ, J0 + nbk)
                    j0 = (J0 * bs + stride - 1) // stride
                    j1 = min(kn, (J1 * bs + stride - 1) // stride)
                    z = np.empty((nr, j1 - j0))
                    np.dot(qt[b, c, i0:i1], kt[b, c, j0:j1].T, z)
                    block_stats(z, jn, j0, J0, J1, bs, stride, Sk, scale, bm, bsum)
                for r in range(nr):
                    m, tot = row_max_sum(bm[r], bsum[r], nJ)
                    if tot <= 0.0:
                        continue
                    arow = acc[((i0 + r) * stride) // bs - I0]
                    for J in range(nJ):
                        if bsum[r, J] > 0.0:
                            arow[J] = max(arow[J], exp_f64(bm[r, J] - m) / tot)
        for I in range(I1 - I0):
            for J in range(kb):
                S[b, c, I0 + I, J] = acc[I, J]


@register("proxyattn_score", "numba")
def proxyattn_score(q: Any, k: Any, block_size: int, group_size: int, stride: int,
                    causal: bool, *, out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """ProxyAttn proxy block scores (reference
    :func:`refattn.methods.proxyattn.proxyattn_proxy_scores`): ``(S,)`` ``[B, Hq/group_size,
    Qb, Kb]``, ``S[c, I, J]`` = the max of the proxy head's softmax over the kept rows of
    block ``I`` and the kept keys of block ``J`` (rows and keys ``0, stride, 2 stride,
    ...``; 0 where the tile holds no visible kept pair). Proxy q = mean of the group's query
    heads, proxy k = mean of its kv heads (``group_size`` a multiple of the GQA group
    dividing ``Hq``); means, products (dgemm), softmax statistics and the max in float64,
    stored as float32 (or the ``out=`` dtype)."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    B, Hq, Sq, D = qf.shape
    Sk = kf.shape[2]
    gs, bs, st = int(group_size), int(block_size), int(stride)
    if gs < 1 or Hq % gs or gs % G:
        raise InputError(f"proxyattn_score: group_size must be a multiple of the GQA group "
                         f"({G}) dividing Hq={Hq}, got {gs}")
    if bs < 1 or st < 1:
        raise InputError(f"proxyattn_score: block_size and stride must be >= 1, got "
                         f"{bs} and {st}")
    C = Hq // gs
    (S,) = outputs(out, [(B, C, num_blocks(Sq, bs), num_blocks(Sk, bs))], "proxyattn_score")
    qt = _proxy_heads(qf, gs, st)                    # [B, C, ceil(Sq/st), D] float64
    kt = _proxy_heads(kf, gs // G, st)               # the group's kv heads h0//G .. h1//G-1
    with single_threaded_blas():
        _proxy(qt, kt, Sq, Sk, bs, st, bool(causal), 1.0 / math.sqrt(D), S)
    return (S,)



# ------------------------------------------------------------------ ProxyAttention budget
@njit(**NJIT_OPTIONS)
def _last_block_mass(q: np.ndarray, k: np.ndarray, group: int, r0: int, bs: int,
                     causal: bool, scale: float, a: np.ndarray) -> None:
    """``a[b, h, J]`` = the sum over the rows ``r >= r0`` (the last query block ``L``) and
    the keys ``t`` of block ``J`` of ``softmax_t(scale * q_{h,r} . k_{h // group, t})``
    (causal), divided by ``|L| |J|`` (true lengths); 0 where no row sees a key of ``J``.

    One task per (batch, query head): ``q``'s rows of ``L`` in float64, then per chunk of
    whole key blocks (about ``BUDGET_KEYS`` keys, up to the last row's last visible key) one
    float64 product ``[|L|, chunk]`` (dgemm on the float64 copy of the chunk) and
    :func:`block_stats`: each row's block max and block sum. Pass two, per row:
    :func:`row_max_sum` gives its softmax max and sum, and the block's mass is
    ``bsum * exp(bm - m) / l``. No ``[|L|, Sk]`` matrix is formed."""
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    Kb = a.shape[2]
    off = Sk - Sq
    nL = Sq - r0
    nbk = max(1, BUDGET_KEYS // bs)                  # key blocks per product
    for task in prange(B * Hq):
        b = task // Hq
        h = task % Hq
        g = h // group
        ql = np.empty((nL, D))
        for r in range(nL):
            for e in range(D):
                ql[r, e] = q[b, h, r0 + r, e]
        jn = np.empty(nL, np.int64)                  # keys each row sees (a prefix)
        for r in range(nL):
            pos = r0 + r + off
            if not causal:
                jn[r] = Sk
            elif pos < 0:
                jn[r] = 0
            else:
                jn[r] = min(Sk, pos + 1)
        kn = jn[nL - 1]
        acc = np.zeros(Kb)
        if kn > 0:
            nJ = (kn - 1) // bs + 1
            bm = np.empty((nL, nJ))
            bsum = np.empty((nL, nJ))
            kc = np.empty((min(kn, nbk * bs), D))
            for J0 in range(0, nJ, nbk):
                J1 = min(nJ, J0 + nbk)
                j0, j1 = J0 * bs, min(kn, J1 * bs)
                kk = kc[:j1 - j0]
                for t in range(j1 - j0):
                    for e in range(D):
                        kk[t, e] = k[b, g, j0 + t, e]
                z = np.empty((nL, j1 - j0))
                np.dot(ql, kk.T, z)
                block_stats(z, jn, j0, J0, J1, bs, 1, Sk, scale, bm, bsum)
            for r in range(nL):
                m, tot = row_max_sum(bm[r], bsum[r], nJ)
                if tot <= 0.0:
                    continue
                for J in range(nJ):
                    if bsum[r, J] > 0.0:
                        acc[J] += bsum[r, J] * exp_f64(bm[r, J] - m) / tot
        for J in range(Kb):
            a[b, h, J] = acc[J] / (nL * min(bs, Sk - J * bs))


@register("proxyattn_budget_score", "numba")
def proxyattn_budget_score(q: Any, k: Any, block_size: int, causal: bool, *,
                           out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """ProxyAttn's per-head block attention of the last query block (reference
    :func:`refattn.methods.proxyattn.proxyattn_budget_scores`): ``(a,)`` ``[B, Hq, Kb]``,
    ``a[h, J]`` = the token-level causal softmax of the rows ``L`` of the last query block
    summed over ``L`` and the keys of block ``J``, divided by ``|L| |J|`` (true lengths);
    all 0 when ``Sq == 0``. Float64 products (dgemm) and softmax, stored as float32 (or the
    ``out=`` dtype)."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    bs = int(block_size)
    if bs < 1:
        raise InputError(f"proxyattn_budget_score: block_size must be >= 1, got {bs}")
    B, Hq, Sq, D = qf.shape
    Sk = kf.shape[2]
    (a,) = outputs(out, [(B, Hq, num_blocks(Sk, bs))], "proxyattn_budget_score")
    if Sq == 0 or Sk == 0:
        a[...] = 0.0
        return (a,)
    r0 = (num_blocks(Sq, bs) - 1) * bs
    with single_threaded_blas():
        _last_block_mass(qf, kf, G, r0, bs, bool(causal), 1.0 / math.sqrt(D), a)
    return (a,)
