"""Numba kernels of the pooled (block-mean) scoring ops: ``moba_score``, ``prism_score``
(ProxyAttn's budget op is in ``numba_scoring_proxy``).

Each takes exactly its reference's arguments plus ``out=`` and fully writes its outputs.
The work is small (``Sq x Kb x D`` or ``Qb x Kb x D``) next to reading q and k once,
so these kernels do what the reference does in one pass: pooling sums in float64 from the
float32-converted inputs (:func:`block_sums`), dot products, softmax and calibration in
float64, outputs stored as float32 (or the dtype of the caller's ``out=``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from ..core.blockmask import num_blocks
from ..core.registry import register
from ._blas import single_threaded_blas
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS
from .numba_scoring_common import block_counts, block_sums, f32, kv_group, outputs, round_like

ROWS_PER_TASK = 256       # MoBA gate: query rows per prange task (one sgemm)
PRISM_EPS = 1e-6          # Prism's clamp of the full-band RMS (official eps)


# --------------------------------------------------------------------------------- MoBA
@njit(**NJIT_OPTIONS)
def _moba_gate(q: np.ndarray, kbar: np.ndarray, group: int, gate: np.ndarray) -> None:
    """gate[b, h, t, j] = <q[b, h, t], kbar[b, h // group, j]> by sgemm (float32
    accumulation) on tiles of ``ROWS_PER_TASK`` rows. q, kbar float32."""
    B, Hq, Sq, D = q.shape
    Kb = kbar.shape[2]
    ntile = (Sq + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    for task in prange(B * Hq * ntile):
        b = task // (Hq * ntile)
        h = (task // ntile) % Hq
        r0 = (task % ntile) * ROWS_PER_TASK
        rn = min(Sq, r0 + ROWS_PER_TASK) - r0
        s = np.empty((rn, Kb), np.float32)
        np.dot(q[b, h, r0:r0 + rn], kbar[b, h // group].T, s)
        for r in range(rn):
            for j in range(Kb):
                gate[b, h, r0 + r, j] = s[r, j]


@register("moba_score", "numba")
def moba_score(q: Any, k: Any, block_size: int, *,
               out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """MoBA gate (reference :func:`refattn.methods.moba.moba_gate`): ``(gate,)``,
    ``[B, Hq, Sq, ceil(Sk/block_size)]``. Pooled keys are true-length means summed in
    float64 and rounded to k's dtype (as the reference), then used in float32 (exact for
    fp32/bf16/fp16 inputs); the gate is an sgemm (float32 accumulation)."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    bs = int(block_size)
    B, Hq, Sq, _ = qf.shape
    Sk = kf.shape[2]
    (gate,) = outputs(out, [(B, Hq, Sq, num_blocks(Sk, bs))], "moba_score")
    kbar = block_sums(kf, bs) / block_counts(Sk, bs)[:, None]
    kbar = np.ascontiguousarray(round_like(kbar, np.asarray(k).dtype), dtype=np.float32)
    with single_threaded_blas():
        _moba_gate(qf, kbar, G, gate)
    return (gate,)


# -------------------------------------------------------------------------------- Prism
def _bands(D: int, high: int, low: int) -> tuple[np.ndarray, np.ndarray]:
    """Band dims as the official slicing takes them (``prism.high_band``/``low_band``)."""
    d, half = np.arange(D), D // 2
    hi = np.concatenate([d[:high // 2], d[half:half + high // 2]])
    lo = np.concatenate([d[half - low // 2:half], d[D - low // 2:D]])
    return hi.astype(np.int64), lo.astype(np.int64)


@njit(**NJIT_HELPER_OPTIONS)
def _sumsq(x: np.ndarray) -> float:
    """Sum of squares of a 2-d float64 array."""
    acc = 0.0
    for i in range(x.shape[0]):
        for d in range(x.shape[1]):
            acc += x[i, d] * x[i, d]
    return acc


@njit(**NJIT_OPTIONS)
def _prism(qb: np.ndarray, kb: np.ndarray, qh: np.ndarray, kh: np.ndarray, ql: np.ndarray,
           kl: np.ndarray, group: int, hdim: int, ldim: int, calibrate: bool, htemp: float,
           ltemp: float, zh: np.ndarray, zl: np.ndarray, ph: np.ndarray, pl: np.ndarray,
           sh: np.ndarray, sl: np.ndarray) -> None:
    """Per (batch, query head): calibration, band logits, block-causal row softmax.
    qb ``[B, Hq, nq, D]``, kb ``[B, Hkv, nk, D]``: float64 pooled (zero-padded means);
    qh/kh, ql/kl: their high/low band dims, contiguous."""
    B, Hq, nq, D = qb.shape
    nk = kb.shape[2]
    for task in prange(B * Hq):
        b = task // Hq
        h = task % Hq
        g = h // group
        th, tl = htemp, ltemp
        if calibrate:
            rq = max(math.sqrt(_sumsq(qb[b, h]) / (nq * D)), PRISM_EPS)
            rk = max(math.sqrt(_sumsq(kb[b, g]) / (nk * D)), PRISM_EPS)
            nh, nl = qh.shape[3], ql.shape[3]
            th = (math.sqrt(hdim / D) * (math.sqrt(_sumsq(qh[b, h]) / (nq * nh)) / rq)
                  * (math.sqrt(_sumsq(kh[b, g]) / (nk * nh)) / rk))
            tl = (math.sqrt(ldim / D) * (math.sqrt(_sumsq(ql[b, h]) / (nq * nl)) / rq)
                  * (math.sqrt(_sumsq(kl[b, g]) / (nk * nl)) / rk))
        sh[b, h] = math.sqrt(hdim) * th
        sl[b, h] = math.sqrt(ldim) * tl
        for w in range(2):
            qq = qh[b, h] if w == 0 else ql[b, h]
            kk = kh[b, g] if w == 0 else kl[b, g]
            z = zh[b, h] if w == 0 else zl[b, h]
            p = ph[b, h] if w == 0 else pl[b, h]
            s = math.sqrt(hdim) * th if w == 0 else math.sqrt(ldim) * tl
            e = np.empty(nk)
            for i in range(nq):
                last = i + nk - nq          # block-causal: J <= I + (nk - nq)
                m = -np.inf
                for j in range(nk):
                    if j > last:
                        z[i, j] = -np.inf
                        continue
                    acc = 0.0
                    for d in range(qq.shape[1]):
                        acc += qq[i, d] * kk[j, d]
                    e[j] = acc / s
                    z[i, j] = e[j]
                    m = max(m, e[j])
                if last < 0:
                    for j in range(nk):
                        p[i, j] = 0.0
                    continue
                tot = 0.0
                for j in range(min(nk, last + 1)):
                    e[j] = math.exp(e[j] - m)
                    tot += e[j]
                for j in range(nk):
                    p[i, j] = e[j] / tot if j <= last else 0.0


@register("prism_score", "numba")
def prism_score(q: Any, k: Any, block_size: int, high_freq_dim: int, low_freq_dim: int,
                calibrate: bool, high_temp: float, low_temp: float, *,
                out: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, ...]:
    """Prism dual-band block logits (reference :func:`refattn.methods.prism.prism_score`):
    ``(logits_high, logits_low, probs_high, probs_low)`` ``[B, Hq, nq, nk]`` and
    ``(scale_high, scale_low)`` ``[B, Hq]``. Pooling (zero padding counted, as the
    official mean of the padded tensor) and everything after it in float64."""
    qf, kf = f32(q, "q"), f32(k, "k")
    G = kv_group(qf, kf)
    b = int(block_size)
    B, Hq, Sq, D = qf.shape
    nq, nk = num_blocks(Sq, b), num_blocks(kf.shape[2], b)
    res = outputs(out, [(B, Hq, nq, nk)] * 4 + [(B, Hq)] * 2, "prism_score")
    hi, lo = _bands(D, int(high_freq_dim), int(low_freq_dim))
    qb = block_sums(qf, b) / b
    kb = block_sums(kf, b) / b
    bands = [np.ascontiguousarray(x[..., dims]) for dims in (hi, lo) for x in (qb, kb)]
    _prism(qb, kb, *bands, G, int(high_freq_dim), int(low_freq_dim), bool(calibrate),
           float(high_temp), float(low_temp), *res)
    return res
