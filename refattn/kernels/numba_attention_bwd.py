"""Numba CPU kernels: dense and block-sparse attention backward (op ``attention_bwd``).

Implements :func:`refattn.reference.attention.attention_backward` (FlashAttention-2, Dao
2023, Alg. 2) with the forward's ``out`` and ``lse``; with ``P = exp(scale * Q K^T - lse)``
on visible keys::

    D_i = sum_d dO_id O_id,  dS = P * (dO V^T - D),  dQ = scale * dS K,
    dK = scale * dS^T Q,     dV = P^T dO            (dK, dV summed over the GQA group)

Two ``prange`` kernels, each task owning disjoint output rows (no write races):

* ``dq``: one task per (batch, query head, query tile), walking the key blocks selected by
  its query blocks exactly as the forward does (shared helpers of
  :mod:`refattn.kernels.numba_attention`);
* ``dk, dv``: one task per (batch, kv head, key block). It uses the transposed index form
  (:meth:`BlockMask.transpose`: for each key block, the query blocks that selected it),
  loops over the query heads of its GQA group and over those query blocks, gathers their
  rows that see the block under causality into chunks of at least ``CHUNK_ROWS`` rows
  (per-token routing, ``block_q = 1``, still gives matrix-sized work) and accumulates.

Numerics: float32 inputs (converted once), float32 tiles through ``np.dot`` (sgemm,
float32 accumulation), float32 accumulators across tiles; ``D_i`` is a float32 dot product.
A row whose ``lse`` is ``-inf`` (it sees no key) contributes nothing (explicit branch).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from ..core.errors import InputError
from ..core.registry import register
from ._blas import single_threaded_blas
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS
from .numba_attention import (
    exp_f32,
    finish_out,
    load_rows,
    out_buffers,
    prepare,
    rows_for,
    task_plan,
    tile_task,
    to_f32,
    visible_keys,
)

CHUNK_ROWS = 64   # dk/dv: query rows gathered per matrix product


@njit(**NJIT_OPTIONS)
def _row_dot(do: np.ndarray, o: np.ndarray, delta: np.ndarray) -> None:
    """``delta[b, h, i] = sum_d do[b, h, i, d] * o[b, h, i, d]`` (float32)."""
    B, H, S, Dv = do.shape
    for bh in prange(B * H):
        b, h = bh // H, bh % H
        for i in range(S):
            acc = np.float32(0.0)
            for d in range(Dv):
                acc += do[b, h, i, d] * o[b, h, i, d]
            delta[b, h, i] = acc


@njit(**NJIT_HELPER_OPTIONS)
def _probs_and_ds(s: np.ndarray, dp: np.ndarray, n: int, kn: int, rows: np.ndarray, k0: int,
                  causal: bool, off: int, scale: float, lse: np.ndarray,
                  delta: np.ndarray) -> None:
    """In place: ``s <- P = exp(scale*s - lse)`` and ``dp <- dS = P * (dp - delta)`` on the
    visible keys of each row, 0 elsewhere. ``lse``, ``delta``: ``[Sq]`` of one head."""
    for r in range(n):
        i = rows[r]
        lim = visible_keys(i, k0, kn, causal, off)
        L = lse[i]
        if L == -np.inf:         # the row sees no key: it contributes nothing
            lim = 0
        di = delta[i]
        for j in range(lim):
            p = exp_f32(np.float32(s[r, j] * scale) - L)
            s[r, j] = p
            dp[r, j] = p * (dp[r, j] - di)
        for j in range(lim, kn):
            s[r, j] = 0.0
            dp[r, j] = 0.0


@njit(**NJIT_OPTIONS)
def _dq_kernel(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray, lse: np.ndarray,
               delta: np.ndarray, kv_num: np.ndarray, kv_idx: np.ndarray, dense: bool,
               causal: bool, scale: float, block_q: int, block_k: int, group: int,
               dq: np.ndarray) -> None:
    """Fill ``dq [B,Hq,Sq,D]``: tasks and key-block walk as the forward kernel."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    off = Sk - Sq
    nqb = (Sq + block_q - 1) // block_q
    nkb = (Sk + block_k - 1) // block_k
    ntile = (nqb + group - 1) // group
    Bm, Hm = kv_num.shape[0], kv_num.shape[1]
    for task in prange(B * Hq * ntile):
        b, h, bm, hm, qb0, qb1, r0, nr = tile_task(task, ntile, Hq, group, nqb, block_q, Sq,
                                                   Bm, Hm)
        g = h // G
        ng = qb1 - qb0
        kbs = np.empty(nkb, np.int64)
        sel = np.empty((nkb, ng), np.bool_)
        nu = task_plan(dense, causal, kv_num, kv_idx, bm, hm, qb0, qb1, nkb, block_q, block_k,
                       Sq, off, kbs, sel)
        acc = np.zeros((nr, D), np.float32)
        rows = np.empty(nr, np.int64)
        qbuf = np.empty((nr, D), np.float32)
        dobuf = np.empty((nr, Dv), np.float32)
        sbuf = np.empty(nr * block_k, np.float32)
        dpbuf = np.empty(nr * block_k, np.float32)
        tbuf = np.empty(nr * D, np.float32)
        for u in range(nu):
            k0 = kbs[u] * block_k
            kn = min(block_k, Sk - k0)
            n = rows_for(sel, u, ng, qb0, block_q, Sq, k0, causal, off, rows)
            if n == 0:
                continue
            kt = k[b, g, k0:k0 + kn]
            qs = load_rows(q[b, h], rows, n, qbuf)
            dos = load_rows(do[b, h], rows, n, dobuf)
            s = sbuf[:n * kn].reshape((n, kn))
            dp = dpbuf[:n * kn].reshape((n, kn))
            np.dot(qs, kt.T, s)
            np.dot(dos, v[b, g, k0:k0 + kn].T, dp)
            _probs_and_ds(s, dp, n, kn, rows, k0, causal, off, scale, lse[b, h], delta[b, h])
            t = tbuf[:n * D].reshape((n, D))
            np.dot(dp, kt, t)
            for r in range(n):
                a = rows[r] - r0
                for d in range(D):
                    acc[a, d] += t[r, d]
        for a in range(nr):
            for d in range(D):
                dq[b, h, r0 + a, d] = acc[a, d] * scale


@njit(**NJIT_HELPER_OPTIONS)
def _dkdv_chunk(qbh: np.ndarray, dobh: np.ndarray, lse: np.ndarray, delta: np.ndarray,
                kt: np.ndarray, vt: np.ndarray, rows: np.ndarray, n: int, k0: int,
                causal: bool, off: int, scale: float, qbuf: np.ndarray, dobuf: np.ndarray,
                sbuf: np.ndarray, dpbuf: np.ndarray, tk: np.ndarray, tv: np.ndarray,
                dk_acc: np.ndarray, dv_acc: np.ndarray) -> None:
    """Add the contributions of query rows ``rows[:n]`` of one head to ``dk_acc``
    ``[kn, D]`` (unscaled) and ``dv_acc [kn, Dv]`` of the key block ``kt``/``vt``."""
    kn = kt.shape[0]
    qs = load_rows(qbh, rows, n, qbuf)
    dos = load_rows(dobh, rows, n, dobuf)
    s = sbuf[:n * kn].reshape((n, kn))
    dp = dpbuf[:n * kn].reshape((n, kn))
    np.dot(qs, kt.T, s)
    np.dot(dos, vt.T, dp)
    _probs_and_ds(s, dp, n, kn, rows, k0, causal, off, scale, lse, delta)
    np.dot(s.T, dos, tv)
    np.dot(dp.T, qs, tk)
    dv_acc += tv
    dk_acc += tk


@njit(**NJIT_OPTIONS)
def _dkdv_kernel(q: np.ndarray, k: np.ndarray, v: np.ndarray, do: np.ndarray, lse: np.ndarray,
                 delta: np.ndarray, q_num: np.ndarray, q_idx: np.ndarray, dense: bool,
                 causal: bool, scale: float, block_q: int, block_k: int,
                 dk: np.ndarray, dv: np.ndarray) -> None:
    """Fill ``dk [B,Hkv,Sk,D]`` and ``dv [B,Hkv,Sk,Dv]``: one task per (b, kv head, key
    block) over the transposed index form ``q_num [Bm,Hm,Kb]``, ``q_idx [Bm,Hm,Kb,Qb]``."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    off = Sk - Sq
    nqb = (Sq + block_q - 1) // block_q
    nkb = (Sk + block_k - 1) // block_k
    cap = max(block_q, 64)
    Bm, Hm = q_num.shape[0], q_num.shape[1]
    for task in prange(B * Hkv * nkb):
        kb = task % nkb
        g = (task // nkb) % Hkv
        b = task // (nkb * Hkv)
        bm = b if Bm > 1 else 0
        k0 = kb * block_k
        kn = min(block_k, Sk - k0)
        kt = k[b, g, k0:k0 + kn]
        vt = v[b, g, k0:k0 + kn]
        dk_acc = np.zeros((kn, D), np.float32)
        dv_acc = np.zeros((kn, Dv), np.float32)
        rows = np.empty(cap, np.int64)
        qbuf = np.empty((cap, D), np.float32)
        dobuf = np.empty((cap, Dv), np.float32)
        sbuf = np.empty(cap * kn, np.float32)
        dpbuf = np.empty(cap * kn, np.float32)
        tk = np.empty((kn, D), np.float32)
        tv = np.empty((kn, Dv), np.float32)
        first = 0
        if causal:
            first = max(0, k0 - off)          # rows before it see no key of this block
        for h in range(g * G, (g + 1) * G):
            hm = h if Hm > 1 else 0
            nsel = nqb if dense else q_num[bm, hm, kb]
            n = 0
            for c in range(nsel):
                qb = c if dense else q_idx[bm, hm, kb, c]
                rs = max(qb * block_q, first)
                re = min(qb * block_q + block_q, Sq)
                if rs >= re:
                    continue
                if n + re - rs > cap:
                    _dkdv_chunk(q[b, h], do[b, h], lse[b, h], delta[b, h], kt, vt, rows, n, k0,
                                causal, off, scale, qbuf, dobuf, sbuf, dpbuf, tk, tv,
                                dk_acc, dv_acc)
                    n = 0
                for i in range(rs, re):
                    rows[n] = i
                    n += 1
            if n > 0:
                _dkdv_chunk(q[b, h], do[b, h], lse[b, h], delta[b, h], kt, vt, rows, n, k0,
                            causal, off, scale, qbuf, dobuf, sbuf, dpbuf, tk, tv,
                            dk_acc, dv_acc)
        for j in range(kn):
            for d in range(D):
                dk[b, g, k0 + j, d] = dk_acc[j, d] * scale
            for d in range(Dv):
                dv[b, g, k0 + j, d] = dv_acc[j, d]


@register("attention_bwd", "numba")
def attention_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, o: np.ndarray,
                       do: np.ndarray, lse: np.ndarray, mask: Any = None, causal: bool = False,
                       scale: float | None = None, *,
                       out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numba attention backward; arguments as the reference ``attention_backward``.

    ``o``, ``do`` ``[B, Hq, Sq, Dv]`` and ``lse [B, Hq, Sq]`` from the forward. Returns
    ``dq [B,Hq,Sq,D]``, ``dk [B,Hkv,Sk,D]``, ``dv [B,Hkv,Sk,Dv]`` in float32 (dk, dv summed
    over each GQA group), written into ``out=`` when given.
    """
    pb = prepare(q, k, v, mask, causal, scale, "attention_bwd")
    sh = pb.shape
    want = (sh.batch, sh.q_heads, sh.q_len, sh.v_dim)
    o32, do32, lse32 = to_f32(o, "o"), to_f32(do, "do"), to_f32(lse, "lse")
    for name, x, w in (("o", o32, want), ("do", do32, want), ("lse", lse32, want[:3])):
        if x.shape != w:
            raise InputError(f"{name}: expected shape {w}, got {x.shape}")
    targets, user = out_buffers(out, (pb.q.shape, pb.k.shape, pb.v.shape), ("dq", "dk", "dv"))
    if pb.dense:
        q_num, q_idx = pb.kv_num, pb.kv_idx
    else:
        tn, ti = pb.mask.transpose()  # type: ignore[union-attr]
        q_num, q_idx = np.ascontiguousarray(tn, np.int32), np.ascontiguousarray(ti, np.int32)
    sc = np.float32(pb.scale)
    delta = np.empty(want[:3], np.float32)
    with single_threaded_blas():
        _row_dot(do32, o32, delta)
        _dq_kernel(pb.q, pb.k, pb.v, do32, lse32, delta, pb.kv_num, pb.kv_idx, pb.dense,
                   pb.causal, sc, pb.block_q, pb.block_k, pb.group, targets[0])
        _dkdv_kernel(pb.q, pb.k, pb.v, do32, lse32, delta, q_num, q_idx, pb.dense, pb.causal,
                     sc, pb.block_q, pb.block_k, targets[1], targets[2])
    dq, dk, dv = finish_out(targets, user)
    return dq, dk, dv


__all__ = ["attention_backward"]
