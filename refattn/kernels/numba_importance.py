"""Numba CPU kernels of the attention-derived token-importance ops.

* ``blockrank_doc_scores`` (:mod:`refattn.importance.blockrank`): per (batch, head, query
  row) a softmax over the document slots, summed per document;
* ``focus_importance`` (:mod:`refattn.importance.focus`): per (batch, head) the column sums
  of the row softmax of width-3 max-pooled logits;
* ``vflowopt_relevance`` (:mod:`refattn.importance.vflowopt`): received attention, global
  tokens, attention from the global tokens;
* ``rsq_attention_received`` (:mod:`refattn.importance.rsq`): causal attention received,
  summed over heads and query rows.

Each kernel takes its reference's arguments plus ``out=`` and fills ``out`` completely.
Every ``prange`` task owns disjoint rows of a float64 scratch array (no write races); the
host reduces the scratch over the task axis. Arithmetic is float64 (inputs upcast once);
masked logits are skipped by index, never set to ``-inf``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..core.registry import register
from .flags import NJIT_OPTIONS


def _f64(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x), dtype=np.float64)


def _fill(out: tuple[np.ndarray, ...] | None, value: np.ndarray) -> tuple[np.ndarray]:
    if out is None:
        return (value,)
    out[0][...] = value
    return (out[0],)


# ------------------------------------------------------------------- BlockRank
@njit(**NJIT_OPTIONS)
def _blockrank_kernel(q, k, docvalid, rowvalid, rows, scale, hb, partial):  # pragma: no cover
    B, H, S, D = q.shape
    G = H // k.shape[1]
    R = rows.shape[1]
    nd = docvalid.shape[1] // hb
    ntask = B * H * R
    for task in prange(ntask):
        b = task // (H * R)
        h = (task // R) % H
        r = task % R
        g = h // G
        row = rows[b, r]
        nslot = nd * hb
        if not rowvalid[b, row]:
            for n in range(nd):
                partial[b, h, r, n] = hb / nslot          # uniform over every slot
            continue
        s = np.empty(nslot)
        m = -1e300
        for j in range(nslot):
            if docvalid[b, j]:
                acc = 0.0
                for d in range(D):
                    acc += q[b, h, row, d] * k[b, g, hb + j, d]
                s[j] = acc * scale
                if s[j] > m:
                    m = s[j]
        tot = 0.0
        for j in range(nslot):
            if docvalid[b, j]:
                s[j] = math.exp(s[j] - m)
                tot += s[j]
        for n in range(nd):
            acc = 0.0
            for t in range(hb):
                j = n * hb + t
                if docvalid[b, j]:
                    acc += s[j]
            partial[b, h, r, n] = acc / tot


@register("blockrank_doc_scores", "numba")
def blockrank_doc_scores_numba(q, k, valid, rows, scale, *, out=None):
    v = np.asarray(valid).astype(np.bool_)
    B, M, hb = v.shape
    H = q.shape[1]
    rows = np.ascontiguousarray(np.asarray(rows, np.int64).reshape(B, -1))
    docvalid = np.ascontiguousarray(v[:, 1:-1].reshape(B, -1))
    rowvalid = np.ascontiguousarray(v.reshape(B, -1))
    partial = np.empty((B, H, rows.shape[1], M - 2))
    _blockrank_kernel(_f64(q), _f64(k), docvalid, rowvalid, rows, float(scale), hb, partial)
    return _fill(out, partial.mean(axis=(1, 2)))


# ----------------------------------------------------------------------- FOCUS
@njit(**NJIT_OPTIONS)
def _focus_kernel(q, k, scale, partial):  # pragma: no cover
    B, H, L, D = q.shape
    G = H // k.shape[1]
    for task in prange(B * H):
        b = task // H
        h = task % H
        g = h // G
        s = np.empty(L)
        p = np.empty(L)
        for j in range(L):
            partial[b, h, j] = 0.0
        for i in range(L):
            for j in range(L):
                acc = 0.0
                for d in range(D):
                    acc += q[b, h, i, d] * k[b, g, j, d]
                s[j] = acc * scale
            m = -1e300
            for j in range(L):
                v = s[j]
                if j > 0 and s[j - 1] > v:
                    v = s[j - 1]
                if j + 1 < L and s[j + 1] > v:
                    v = s[j + 1]
                p[j] = v
                if v > m:
                    m = v
            tot = 0.0
            for j in range(L):
                p[j] = math.exp(p[j] - m)
                tot += p[j]
            for j in range(L):
                partial[b, h, j] += p[j] / tot


@register("focus_importance", "numba")
def focus_importance_numba(q, k, scale, *, out=None):
    B, H, L, _ = q.shape
    partial = np.empty((B, H, L))
    _focus_kernel(_f64(q), _f64(k), float(scale), partial)
    return _fill(out, partial.sum(axis=1))


# -------------------------------------------------------------------- VFlowOpt
@njit(**NJIT_OPTIONS)
def _received_kernel(a, r):  # pragma: no cover
    B, H, n, _ = a.shape
    for task in prange(B * n):
        b = task // n
        i = task % n
        acc = 0.0
        for h in range(H):
            for j in range(n):
                acc += a[b, h, j, i]
        r[b, i] = acc / (H * n)


@njit(**NJIT_OPTIONS)
def _relevance_kernel(a, glob, rel):  # pragma: no cover
    B, H, n, _ = a.shape
    for task in prange(B * n):
        b = task // n
        j = task % n
        acc = 0.0
        cnt = 0
        for i in range(n):
            if glob[b, i]:
                cnt += 1
                for h in range(H):
                    acc += a[b, h, i, j]
        if cnt == 0:
            rel[b, j] = np.nan                            # official mean of an empty set
        else:
            rel[b, j] = acc / (H * cnt)


@register("vflowopt_relevance", "numba")
def vflowopt_relevance_numba(attn, t, *, out=None):
    a = _f64(attn)
    B, _, n, _ = a.shape
    r = np.empty((B, n))
    _received_kernel(a, r)
    glob = np.ascontiguousarray(r > float(t) * r.mean(axis=-1, keepdims=True))
    rel = np.empty((B, n))
    _relevance_kernel(a, glob, rel)
    return _fill(out, rel)


# ------------------------------------------------------------------------- RSQ
RSQ_ROWS = 64  # query rows per task


@njit(**NJIT_OPTIONS)
def _rsq_kernel(q, k, scale, partial):  # pragma: no cover
    B, H, L, D = q.shape
    G = H // k.shape[1]
    nc = partial.shape[2]
    for task in prange(B * H * nc):
        b = task // (H * nc)
        h = (task // nc) % H
        c = task % nc
        g = h // G
        for j in range(L):
            partial[b, h, c, j] = 0.0
        s = np.empty(L)
        for i in range(c * RSQ_ROWS, min(L, (c + 1) * RSQ_ROWS)):
            m = -1e300
            for j in range(i + 1):                         # causal: keys j <= i
                acc = 0.0
                for d in range(D):
                    acc += q[b, h, i, d] * k[b, g, j, d]
                s[j] = acc * scale
                if s[j] > m:
                    m = s[j]
            tot = 0.0
            for j in range(i + 1):
                s[j] = math.exp(s[j] - m)
                tot += s[j]
            for j in range(i + 1):
                partial[b, h, c, j] += s[j] / tot


@register("rsq_attention_received", "numba")
def rsq_attention_received_numba(q, k, scale, *, out=None):
    B, H, L, _ = q.shape
    partial = np.empty((B, H, (L + RSQ_ROWS - 1) // RSQ_ROWS, L))
    _rsq_kernel(_f64(q), _f64(k), float(scale), partial)
    return _fill(out, partial.sum(axis=(1, 2)))
