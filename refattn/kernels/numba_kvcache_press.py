"""Numba CPU kernels of the kvpress scorer presses that compute on their inputs
(:mod:`refattn.kvcache.presses`; official ``NVIDIA/kvpress@8bb29b9`` v0.5.4,
``kvpress/presses/{knorm,keydiff,expected_attention}_press.py``):

* ``kvpress_knorm_score``: ``s_j = -||k_j||_2`` (``KnormPress.score``), ``[B, Hkv, L]``;
* ``kvpress_keydiff_score``: ``s_j = -cos(k_j, a)`` with the anchor
  ``a = mean_i k_i / max(||k_i||, 1e-12)`` and ``cos = k_j . a / max(||k_j|| ||a||, 1e-8)``
  (``KeyDiffPress.score``, ``F.normalize`` / ``F.cosine_similarity`` eps);
* ``kvpress_expected_attention_score`` (``ExpectedAttentionPress``, arXiv 2510.00636):
  pre-RoPE queries ``q~_t = R(-t) q_t`` over ``t >= n_sink``, their mean ``mu`` and
  covariance ``S = (1/n) sum_t (q~_t - mu)(q~_t - mu)^T``; the averaged future rotation
  ``Rbar = mean_{p in [L, L+F)} R(p)`` (RoPE of ``rope_base`` and HF ``rope_scaling``: the
  frequencies come from :func:`refattn.kvcache._common.rope_inv_freq`); per query head
  ``z_j = (Rbar mu) . k_j / sqrt(d) + k_j^T (Rbar S Rbar^T) k_j / (2d)`` over ``j >= n_sink``,
  ``softmax_j``, mean over the GQA group, ``(. + eps) ||v_j||_2`` (``use_vnorm``), and the
  sinks padded with ``max + 1`` (global maximum).

The other presses' ops need no kernel here: ``snapkv``, ``tova`` and
``observed_attention`` are in :mod:`.numba_kvcache`; ``streaming_llm`` and ``random`` do
no arithmetic on the inputs (a fixed pattern; NumPy's random stream) and are declared
``host_only`` in the registry, so every backend runs their reference.

Shapes: q ``[B, Hq, L, d]``, k and v ``[B, Hkv, L, d]``, query head ``h`` reads kv head
``h // (Hq // Hkv)``. Numerics: fp32 and fp64 inputs are read as they are (fp16/bf16
converted to fp32 once, exactly) and every sum, norm, dot product, gemm (dgemm on float64
copies of the rows a task uses), ``exp`` and softmax is float64, as the references; the
outputs are float64 without ``out=`` (rankings then equal the reference's up to
near-ties) and cast into the caller's arrays with ``out=``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from ..core.errors import InputError
from ..core.registry import register
from ..kvcache._common import rope_inv_freq
from ._blas import single_threaded_blas
from .fastexp import exp_f64
from .flags import NJIT_OPTIONS
from .numba_kvcache import _inputs, _pad_max, _write

ROWS = 256               # token rows per prange task of the row-wise kernels
NORM_EPS = 1e-12         # F.normalize eps (keydiff anchor)
COS_EPS = 1e-8           # F.cosine_similarity eps (keydiff)


# ----------------------------------------------------------------------------- kernels
@njit(**NJIT_OPTIONS)
def _row_norms(x: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out[r] = ||x[r]||_2`` in float64 for ``x [R, D]`` (float32 or float64), ``out [R]``;
    one task per ``ROWS`` rows."""
    R, D = x.shape
    for task in prange((R + ROWS - 1) // ROWS):
        for r in range(task * ROWS, min(R, (task + 1) * ROWS)):
            acc = 0.0
            for d in range(D):
                v = np.float64(x[r, d])
                acc += v * v
            out[r] = math.sqrt(acc)


@njit(**NJIT_OPTIONS)
def _anchor_partials(x: np.ndarray, norms: np.ndarray, partial: np.ndarray
                     ) -> None:  # pragma: no cover (compiled)
    """``partial[bh, c] = sum_{t in chunk c} x[bh, t] / max(norms[bh, t], 1e-12)`` (float64)
    for ``x [BH, L, D]``, ``norms [BH, L]``, ``partial [BH, nchunk, D]``; chunks of ``ROWS``."""
    BH, L, D = x.shape
    nc = partial.shape[1]
    for task in prange(BH * nc):
        bh = task // nc
        c = task % nc
        acc = partial[bh, c]
        for d in range(D):
            acc[d] = 0.0
        for t in range(c * ROWS, min(L, (c + 1) * ROWS)):
            inv = 1.0 / max(norms[bh, t], NORM_EPS)
            for d in range(D):
                acc[d] += np.float64(x[bh, t, d]) * inv


@njit(**NJIT_OPTIONS)
def _neg_cosine(x: np.ndarray, norms: np.ndarray, anchor: np.ndarray, anorm: np.ndarray,
                out: np.ndarray) -> None:  # pragma: no cover (compiled)
    """``out[bh, t] = -(x[bh, t] . anchor[bh]) / max(norms[bh, t] * anorm[bh], 1e-8)``."""
    BH, L, D = x.shape
    nc = (L + ROWS - 1) // ROWS
    for task in prange(BH * nc):
        bh = task // nc
        c = task % nc
        a = anchor[bh]
        for t in range(c * ROWS, min(L, (c + 1) * ROWS)):
            acc = 0.0
            for d in range(D):
                acc += np.float64(x[bh, t, d]) * a[d]
            out[bh, t] = -acc / max(norms[bh, t] * anorm[bh], COS_EPS)


@njit(**NJIT_OPTIONS)
def _expected_probs(q: np.ndarray, k: np.ndarray, cos: np.ndarray, sin: np.ndarray,
                    R: np.ndarray, n_sink: int, use_cov: bool,
                    probs: np.ndarray) -> None:  # pragma: no cover (compiled)
    """Per (batch, query head): the softmax over ``j >= n_sink`` of the expected logits
    ``z_j`` (module docstring) into ``probs [B, Hq, L - n_sink]`` (float64).

    ``cos, sin [L, d/2]``: RoPE tables of positions ``0..L-1`` (rotate-half pairs ``i`` and
    ``i + d/2`` share an angle); ``R [d, d]``: the averaged future rotation ``Rbar``."""
    B, Hq, L, d = q.shape
    G = Hq // k.shape[1]
    n = L - n_sink
    half = d // 2
    inv_sqrt_d = 1.0 / math.sqrt(d)
    for task in prange(B * Hq):
        b = task // Hq
        h = task % Hq
        g = h // G
        # pre-RoPE queries, q~ = x cos(t) - rotate_half(x) sin(t) (inverse rotation R(-t))
        qc = np.empty((n, d))
        mu = np.zeros(d)
        for r in range(n):
            t = n_sink + r
            for i in range(half):
                x1 = np.float64(q[b, h, t, i])
                x2 = np.float64(q[b, h, t, i + half])
                qc[r, i] = x1 * cos[t, i] + x2 * sin[t, i]
                qc[r, i + half] = x2 * cos[t, i] - x1 * sin[t, i]
            for i in range(d):
                mu[i] += qc[r, i]
        for i in range(d):
            mu[i] /= n
        mur = np.dot(R, mu)                                  # Rbar mu
        kk = np.empty((n, d))
        kk[:, :] = k[b, g, n_sink:]
        z = np.dot(kk, mur)
        for j in range(n):
            z[j] *= inv_sqrt_d
        if use_cov:
            for r in range(n):
                for i in range(d):
                    qc[r, i] -= mu[i]
            cov = np.dot(qc.T, qc)
            cov /= n
            covr = np.dot(np.dot(R, cov), R.T)              # Rbar S Rbar^T
            y = np.dot(kk, covr)
            for j in range(n):
                acc = 0.0
                for i in range(d):
                    acc += y[j, i] * kk[j, i]
                z[j] += acc / d / 2.0
        mx = z[0]
        for j in range(1, n):
            mx = max(mx, z[j])
        tot = 0.0
        for j in range(n):
            z[j] = exp_f64(z[j] - mx)
            tot += z[j]
        inv = 1.0 / tot
        for j in range(n):
            probs[b, h, j] = z[j] * inv


# -------------------------------------------------------------------------- host side
def _norms(x: np.ndarray) -> np.ndarray:
    """float64 ``||x[..., :]||_2`` of a C-contiguous float32/float64 array ``[..., D]``."""
    flat = x.reshape(-1, x.shape[-1])
    out = np.empty(flat.shape[0])
    if flat.shape[0]:
        _row_norms(flat, out)
    return out.reshape(x.shape[:-1])


@register("kvpress_knorm_score", "numba")
def knorm_score_numba(k: Any, *, out: tuple[np.ndarray] | None = None) -> np.ndarray:
    """``-||k_j||_2`` ``[B, Hkv, L]`` (reference :func:`refattn.kvcache.presses.knorm_score`);
    k ``[B, Hkv, L, D]``. Float64 without ``out=``."""
    kk = _inputs(k, "k", 4)
    return _write(out, (-_norms(kk),), ("scores",))[0]


@register("kvpress_keydiff_score", "numba")
def keydiff_score_numba(k: Any, *, out: tuple[np.ndarray] | None = None) -> np.ndarray:
    """``-cos(k_j, anchor)`` ``[B, Hkv, L]`` (reference
    :func:`refattn.kvcache.presses.keydiff_score`); k ``[B, Hkv, L, D]``. Three row passes:
    norms, chunked anchor sums (added on the host in chunk order), cosines."""
    kk = _inputs(k, "k", 4)
    B, H, L, D = kk.shape
    x = kk.reshape(B * H, L, D)
    norms = _norms(x)
    nc = max(1, -(-L // ROWS))
    partial = np.empty((B * H, nc, D))
    s = np.empty((B * H, L))
    if L:
        _anchor_partials(x, norms, partial)
        anchor = np.ascontiguousarray(partial.sum(axis=1) / L)
        anorm = np.sqrt((anchor * anchor).sum(axis=-1))
        _neg_cosine(x, norms, anchor, anorm, s)
    return _write(out, (s.reshape(B, H, L),), ("scores",))[0]


def _rope_tables(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin [P, dim/2]`` of ``angle = pos * inv_freq`` with ``inv_freq`` from
    :func:`refattn.kvcache._common.rope_inv_freq` (transformers' rotate-half RoPE, as
    :func:`refattn.kvcache._common.rope_cos_sin` without the repeat)."""
    ang = positions.astype(np.float64)[:, None] * inv_freq
    return np.cos(ang), np.sin(ang)


@register("kvpress_expected_attention_score", "numba")
def expected_attention_score_numba(q: Any, k: Any, v: Any, n_future_positions: int = 512,
                                   n_sink: int = 4, use_covariance: bool = True,
                                   use_vnorm: bool = True, epsilon: float = 0.0,
                                   rope_base: float = 10000.0,
                                   rope_scaling: dict | None = None, *,
                                   out: tuple[np.ndarray] | None = None) -> np.ndarray:
    """Expected attention of future queries ``[B, Hkv, L]`` (reference
    :func:`refattn.kvcache.presses.expected_attention_score`); q ``[B, Hq, L, d]``,
    k, v ``[B, Hkv, L, d]``; ``rope_scaling``: HF ``config.rope_scaling`` or ``None``.
    Float64 without ``out=``."""
    qq, kk = _inputs(q, "q", 4), _inputs(k, "k", 4)
    if qq.dtype != kk.dtype:
        qq, kk = qq.astype(np.float64), kk.astype(np.float64)
    B, Hq, L, d = qq.shape
    Hkv = kk.shape[1]
    if kk.shape[0] != B or kk.shape[3] != d or kk.shape[2] != L or Hkv == 0 or Hq % Hkv:
        raise InputError(f"k: expected [B={B}, Hkv | Hq={Hq}, L={L}, d={d}], got {kk.shape}")
    ns, F = int(n_sink), int(n_future_positions)
    if L <= ns:
        raise InputError(f"n_sink: the input must hold more than n_sink = {ns} tokens, got {L}")
    inv_freq = rope_inv_freq(d, rope_base, rope_scaling)   # validates d, base and scaling
    cos, sin = _rope_tables(np.arange(L), inv_freq)
    # Rbar = mean_p R(p): R(p)[i, j] = cos_j(p) delta_ij + sin_j(p) P_ij with the rotate-half
    # matrix P (P[d/2:, :d/2] = I, P[:d/2, d/2:] = -I), so Rbar = diag(cbar) + P * sbar[None].
    fc, fs = _rope_tables(np.arange(L, L + F), inv_freq)
    cbar = np.concatenate([fc, fc], axis=1).mean(axis=0)
    sbar = np.concatenate([fs, fs], axis=1).mean(axis=0)
    P = np.zeros((d, d))
    P[d // 2:, :d // 2], P[:d // 2, d // 2:] = np.eye(d // 2), -np.eye(d // 2)
    R = np.ascontiguousarray(np.diag(cbar) + P * sbar[None, :])
    probs = np.empty((B, Hq, L - ns))
    with single_threaded_blas():
        _expected_probs(qq, kk, np.ascontiguousarray(cos), np.ascontiguousarray(sin), R, ns,
                        bool(use_covariance), probs)
    s = probs.reshape(B, Hkv, Hq // Hkv, L - ns).mean(axis=2)
    if use_vnorm:
        if v is None:
            raise InputError("v: the expected_attention press needs the values")
        vv = _inputs(v, "v", 4)
        if vv.shape[:3] != (B, Hkv, L):
            raise InputError(f"v: expected [B={B}, Hkv={Hkv}, L={L}, dv], got {vv.shape}")
        s = (s + float(epsilon)) * _norms(np.ascontiguousarray(vv[:, :, ns:]))
    return _write(out, (_pad_max(s, ns, 0),), ("scores",))[0]
