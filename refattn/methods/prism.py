"""Prism: spectral-aware block-sparse attention (NumPy reference).

Paper: Wang, Wang, Liu, Liu, Chu, Song, Qiu, "Prism: Spectral-Aware Block-Sparse
Attention", arXiv 2602.08426.
Official code: xinghaow99/prism @ d5a425260c9012ae9610832586e14d302ddf3b8a
(``prism/prism.py:prism_block_estimate``, its torch fallback, and ``top_p_select``).

Scoring (spec ``llm-prefill.md`` §4c). Q and K are zero-padded along the sequence to a
multiple of ``b = block_size`` and mean-pooled per block, the zeros included (a partial last
block's mean shrinks by ``len/b``): ``q̄_I``, ``k̄_J``. Two overlapping RoPE bands (NeoX
rotate-half layout: dims ``i`` and ``i + D/2`` form pair ``i``; a smaller ``i`` is a higher
frequency), taken literally as the official Python slices::

    high = x[:h/2]            ++ x[D/2 : D/2 + h/2]     (h = high_freq_dim)
    low  = x[D/2 - l/2 : D/2] ++ x[D - l/2 : D]          (l = low_freq_dim)

Energy calibration (``calibrate=True``), per (batch, head), RMS over all blocks x dims::

    t_band = sqrt(band_dim / D) * (RMS(q̄_band) / max(RMS(q̄), 1e-6)) * (RMS(k̄_band) / max(RMS(k̄), 1e-6))

(``calibrate=False``: ``t_band`` = the band's temperature). Scale ``σ_band = sqrt(band_dim) *
t_band``; logits ``z[I, J] = <q̄_I[band], k̄_J[band]> / σ_band`` for ``J <= I + (n_k - n_q)``,
``-inf`` otherwise; ``p = softmax_J(z)`` per band and row.

Selection (§4d), per band and row: sort ``p`` descending; keep sorted position ``r`` iff
``cumsum_r - p_(r) < τ_band`` (the crossing block is kept), over *all* key blocks -- there is
no causal re-mask, so when the cumulative mass stays below τ (τ = 1 and rounding) the zero
probability future blocks are kept too. The mask is the union of the bands; then the sink
column (``force_sink``) and the diagonal ``J = I + n_k - n_q`` (``force_recent``) are set,
outside the mass.

Device arrays (``device=True``): the selection is array-module generic. With CuPy q and k
and ``backend="cupy"``, the six outputs of the CUDA ``prism_score`` kernel (float64) stay on
the GPU, and the top-p (stable sort, float32 rounding, float64 cumulative sum), boundaries,
union score and mask run there, and the ``[n_q, n_k]`` geometry (causal validity, sink and
diagonal) is built there: nothing is copied between host and device. CuPy's ``cumsum`` adds in
another order than NumPy's sequential one; its float64 partial sums of float32 values are
rounded to float32 before the comparison with tau, so on the same probabilities the masks
can differ only where a float64 partial sum lies within a few ulps of a float32 rounding
midpoint next to tau (a near-tie). Host inputs run exactly the NumPy code as before.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask, num_blocks
from ..core.errors import InputError
from ..core.layout import array_module
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..reference.memory import rows_per_chunk
from .base import check_range, register_method

CODE = "xinghaow99/prism@d5a425260c9012ae9610832586e14d302ddf3b8a"
CALIBRATION_EPS = 1e-6  # clamp of the full-band RMS in the calibration (official eps)


class PrismBandWarning(UserWarning):
    """A band's dims, sliced as the official code slices them, are not ``band_dim`` dims."""


@dataclass(frozen=True)
class PrismParams:
    """Parameters of Prism (official environment variables / keyword names in brackets).

    * ``block_size`` [BLOCK_SIZE / block_size]: block edge in tokens (128).
    * ``high_freq_dim`` [HIGH_FREQ_DIM / high_freq_dim]: dims of the high band (64).
    * ``low_freq_dim`` [LOW_FREQ_DIM / low_freq_dim]: dims of the low band (96).
    * ``high_threshold`` [HIGH_FREQ_THRESHOLD / high_freq_threshold]: top-p mass of the
      high band (0.95; the scripts use 0.95 RULER, 0.93 LongBench, 0.92 PG19).
    * ``low_threshold`` [LOW_FREQ_THRESHOLD / low_freq_threshold]: likewise (0.95).
    * ``high_temp``, ``low_temp`` [HIGH_FREQ_TEMP, LOW_FREQ_TEMP]: temperatures used in place
      of the calibration when ``calibrate=False`` (1.0).
    * ``calibrate`` [CALIBRATE]: energy-ratio temperature calibration (True).
    * ``force_sink`` [FORCE_SINK]: set key block 0 in every row after selection (True).
    * ``force_recent`` [FORCE_RECENT]: set the diagonal block after selection (True).
    """

    block_size: int = 128
    high_freq_dim: int = 64
    low_freq_dim: int = 96
    high_threshold: float = 0.95
    low_threshold: float = 0.95
    high_temp: float = 1.0
    low_temp: float = 1.0
    calibrate: bool = True
    force_sink: bool = True
    force_recent: bool = True

    def validate(self) -> None:
        check_range("block_size", self.block_size, 1, integer=True)
        for name in ("high_freq_dim", "low_freq_dim"):
            val = getattr(self, name)
            check_range(name, val, 2, integer=True)
            if int(val) % 2:
                raise InputError(f"{name}: expected an even number (rotary pairs), got {val!r}")
        check_range("high_threshold", self.high_threshold, 0.0, 1.0)
        check_range("low_threshold", self.low_threshold, 0.0, 1.0)
        check_range("high_temp", self.high_temp, 0.0, lo_open=True)
        check_range("low_temp", self.low_temp, 0.0, lo_open=True)
        for name in ("calibrate", "force_sink", "force_recent"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name}: expected True or False, got {getattr(self, name)!r}")


# ------------------------------------------------------------------------------- bands
def high_band(head_dim: int, high_freq_dim: int) -> np.ndarray:
    """Dims of the high band, as ``get_high_freq_components`` slices them: int ``[n]``."""
    d, half, hh = np.arange(head_dim), head_dim // 2, high_freq_dim // 2
    return np.concatenate([d[:hh], d[half:half + hh]])


def low_band(head_dim: int, low_freq_dim: int) -> np.ndarray:
    """Dims of the low band, as ``get_low_freq_components`` slices them: int ``[n]``.

    Python slice semantics are kept on purpose: with ``low_freq_dim > head_dim`` the start
    ``D/2 - l/2`` is negative and wraps (D = 64, l = 96: ``[-16:32]`` is empty), which is
    what the official code silently does.
    """
    d, half, hl = np.arange(head_dim), head_dim // 2, low_freq_dim // 2
    return np.concatenate([d[half - hl:half], d[head_dim - hl:head_dim]])


def _warn_bands(head_dim: int, high: np.ndarray, low: np.ndarray, h: int, l: int) -> None:
    for name, dims, want in (("high_freq_dim", high, h), ("low_freq_dim", low, l)):
        if dims.size != want:
            warnings.warn(
                f"prism: {name}={want} with head_dim={head_dim} selects {dims.size} dims "
                f"{dims.min()}..{dims.max()} (the official slicing), while the scale still uses "
                f"sqrt({want}); the official code does the same silently. Pass {name} <= "
                f"head_dim (e.g. high 32 / low 48 for D = 64) for the intended bands.",
                PrismBandWarning, stacklevel=4)


# ----------------------------------------------------------------------------- scoring
def _pool(x: np.ndarray, b: int) -> np.ndarray:
    """Zero-pad ``[S, D]`` to a multiple of ``b`` and mean-pool blocks (zeros included)."""
    n = num_blocks(x.shape[0], b)
    xp = np.zeros((n * b, x.shape[1]))
    xp[:x.shape[0]] = x
    return xp.reshape(n, b, x.shape[1]).mean(axis=1)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x)))


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    """Row softmax; a row with no finite logit (a query block that sees no key block when
    ``n_q > n_k``) gets probabilities 0, as the official ``nan_to_num`` of torch's NaN row."""
    m = z.max(axis=-1, keepdims=True)
    live = np.isfinite(m)
    e = np.exp(z - np.where(live, m, 0.0))
    return np.where(live, e / np.where(live, e.sum(axis=-1, keepdims=True), 1.0), 0.0)


def prism_score(q: np.ndarray, k: np.ndarray, block_size: int, high_freq_dim: int,
                low_freq_dim: int, calibrate: bool, high_temp: float, low_temp: float, *,
                out: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, ...]:
    """Dual-band pooled block logits and probabilities (official torch fallback, float64).

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]`` (GQA: query head ``h`` reads kv head
    ``h // (Hq/Hkv)``). With ``n_q = ceil(Sq/b)``, ``n_k = ceil(Sk/b)`` returns
    ``(logits_high, logits_low, probs_high, probs_low)`` float64 ``[B, Hq, n_q, n_k]``
    (future blocks ``-inf`` / 0) and ``(scale_high, scale_low)`` float64 ``[B, Hq]``.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    b = int(block_size)
    nq, nk = num_blocks(Sq, b), num_blocks(Sk, b)
    hi, lo = high_band(D, high_freq_dim), low_band(D, low_freq_dim)
    shape4, shape2 = (B, Hq, nq, nk), (B, Hq)
    # four [B, Hq, n_q, n_k] outputs, and per head the padded copies and one temporary
    rows_per_chunk(1, 4 * B * Hq * nq * nk * 8, ((nq + nk) * b * D + 2 * nq * nk) * 8, "prism_score")
    res = out if out is not None else tuple(np.empty(shape4) for _ in range(4)) + tuple(
        np.empty(shape2) for _ in range(2))
    zh, zl, ph, pl, sh, sl = res
    # block-level causality with the official offset: J <= I + (n_k - n_q)
    future = np.arange(nk)[None, :] > np.arange(nq)[:, None] + (nk - nq)
    for bi in range(B):
        for g in range(Hkv):
            kb = _pool(k[bi, g], b)                                   # [n_k, D]
            for h in range(g * (Hq // Hkv), (g + 1) * (Hq // Hkv)):
                qb = _pool(q[bi, h], b)                               # [n_q, D]
                if calibrate:
                    rq = max(_rms(qb), CALIBRATION_EPS)
                    rk = max(_rms(kb), CALIBRATION_EPS)
                    t_h = math.sqrt(high_freq_dim / D) * (_rms(qb[:, hi]) / rq) * (_rms(kb[:, hi]) / rk)
                    t_l = math.sqrt(low_freq_dim / D) * (_rms(qb[:, lo]) / rq) * (_rms(kb[:, lo]) / rk)
                else:
                    t_h, t_l = float(high_temp), float(low_temp)
                sh[bi, h] = math.sqrt(high_freq_dim) * t_h
                sl[bi, h] = math.sqrt(low_freq_dim) * t_l
                for z, p, dims, s in ((zh, ph, hi, sh[bi, h]), (zl, pl, lo, sl[bi, h])):
                    z[bi, h] = (qb[:, dims] @ kb[:, dims].T) / s
                    z[bi, h][future] = -np.inf
                    p[bi, h] = _softmax_rows(z[bi, h])
    return res


define_op("prism_score", prism_score,
          outputs=("logits_high", "logits_low", "probs_high", "probs_low", "scale_high",
                   "scale_low"), kind="array")


# --------------------------------------------------------------------------- selection
def _argsort_stable(x: Any) -> Any:
    """Stable argsort along the last axis in ``x``'s array module (CuPy's sorts are always
    stable and take no ``kind``)."""
    if isinstance(x, np.ndarray):
        return np.argsort(x, axis=-1, kind="stable")
    return array_module(x).argsort(x, axis=-1)


def _scatter_last(order: Any, values: Any) -> Any:
    """``out`` with ``out[..., order[..., r]] = values[..., r]`` (``order`` a permutation of
    the last axis): ``np.put_along_axis`` by fancy indexing, which CuPy has too."""
    xp = array_module(values)
    lead = values.shape[:-1]
    idx = tuple(xp.arange(d).reshape((1,) * a + (d,) + (1,) * (len(lead) - a))
                for a, d in enumerate(lead))
    out = xp.zeros(values.shape, dtype=values.dtype)
    out[idx + (order,)] = values
    return out


def top_p_select(probs: np.ndarray, tau: float) -> np.ndarray:
    """The official torch ``top_p_select`` (CPU path): bool like ``probs [..., N]``.

    Sorted position ``r`` (descending, ties to the lower block index) is kept iff
    ``cumsum_r - p_(r) < τ``. The arithmetic follows the official CPU run, where it decides
    the τ = 1 case: probabilities are float32 (the softmax output), ``torch.cumsum`` on a
    CPU float32 tensor accumulates in double and stores float32, the subtraction is float32,
    and τ is compared as float32. Every block is a candidate, future ones included (p = 0):
    they are kept when the float32 total stays below τ.

    Array-module generic: CuPy ``probs`` give a CuPy mask (see the module docstring).
    """
    xp = array_module(probs)
    p64 = np.asarray(probs, dtype=np.float64) if xp is np else probs.astype(np.float64,
                                                                              copy=False)
    p32 = p64.astype(np.float32)
    order = _argsort_stable(-p32)
    srt = xp.take_along_axis(p32, order, axis=-1)
    cum = xp.cumsum(srt.astype(np.float64), axis=-1).astype(np.float32)
    keep = (cum - srt) < np.float32(tau)
    return _scatter_last(order, keep)


def _band_boundary(probs: np.ndarray, sel: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row, the smallest probability kept among valid (causal) blocks: the crossing
    block's probability. ``nan`` where the band kept nothing."""
    xp = array_module(probs)
    kept = sel & valid
    with np.errstate(invalid="ignore"):
        b = xp.where(kept, probs, np.inf).min(axis=-1)
    return xp.where(kept.any(axis=-1), b, np.nan)


def _ratio(probs: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """``p / boundary`` per row: >= 1 exactly for the blocks a band keeps by mass. A row that
    kept nothing (``nan``) gives 0; a zero boundary (probabilities underflowed) gives
    ``inf`` for positive ``p`` and 1 for ``p = 0``."""
    xp = array_module(probs)
    bnd = boundary[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = xp.where(bnd > 0, probs / xp.where(bnd > 0, bnd, 1.0),
                     xp.where(probs > 0, np.inf, 1.0))
    return xp.where(xp.isnan(bnd), 0.0, r)


@register_method(
    "prism", PrismParams, kind="llm-prefill",
    summary="128-block mean-pooled q.k in two RoPE frequency bands with energy-calibrated "
            "temperatures; per-band top-p, union, sink + diagonal forced after selection",
    paper="arXiv:2602.08426", code=CODE, device=True)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: PrismParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """Prism selection on canonical ``bhsd`` arrays (q ``[B,Hq,Sq,D]``, k ``[B,Hkv,Sk,D]``).

    Returns a :class:`Selection` on the ``block_size`` grid: ``mask [B, Hq, n_q, n_k]``;
    ``scores`` = the union score ``max(p_high / boundary_high, p_low / boundary_low)`` with
    ``boundary`` = 1 (a block is selected by score iff its union score is >= 1, so the
    distance to 1 is its relative distance to the nearer band boundary); ``forced`` (sink
    and diagonal); ``extras``: ``logits_high``, ``logits_low``, ``probs_high``,
    ``probs_low``, ``scale_high``, ``scale_low``, ``mask_high``, ``mask_low`` (per band,
    before forcing), ``boundary_high``, ``boundary_low`` ``[B, Hq, n_q]``, ``high_dims``,
    ``low_dims`` (the band dims used).
    """
    if not causal:
        raise InputError("prism: causal must be True (the official estimator and "
                         "top_p_select are causal only)")
    p = params
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    b = int(p.block_size)
    hi, lo = high_band(D, int(p.high_freq_dim)), low_band(D, int(p.low_freq_dim))
    _warn_bands(D, hi, lo, int(p.high_freq_dim), int(p.low_freq_dim))
    score = dispatch("prism_score", backend, (q, k))
    res = score(q, k, b, int(p.high_freq_dim), int(p.low_freq_dim), bool(p.calibrate),
                float(p.high_temp), float(p.low_temp))
    xp = array_module(res[0])       # device inputs (backend "cupy") stay on the device
    zh, zl, ph, pl, sh, sl = (np.asarray(x, dtype=np.float64) if xp is np
                              else x.astype(np.float64, copy=False) for x in res)
    nq, nk = ph.shape[-2:]
    # [n_q, n_k] geometry, built where the scores live: block-causal validity with the
    # official offset, the sink column and the diagonal J = I + n_k - n_q
    rows, cols = xp.arange(nq)[:, None], xp.arange(nk)[None, :]
    valid = ~(cols > rows + (nk - nq))
    forced2 = xp.zeros((nq, nk), dtype=bool)
    if p.force_sink:
        forced2 = forced2 | (cols == 0)
    if p.force_recent:
        forced2 = forced2 | (cols == rows + (nk - nq))
    m_high = top_p_select(ph, float(p.high_threshold))
    m_low = top_p_select(pl, float(p.low_threshold))
    b_high, b_low = _band_boundary(ph, m_high, valid), _band_boundary(pl, m_low, valid)
    forced = xp.zeros((B, Hq, nq, nk), dtype=bool) | forced2
    mask = m_high | m_low | forced
    union = xp.maximum(_ratio(ph, b_high), _ratio(pl, b_low))
    return Selection(
        mask=BlockMask(mask, block_q=b, block_k=b, q_len=Sq, k_len=Sk),
        scores=BlockScores(union, block_q=b, block_k=b, q_len=Sq, k_len=Sk),
        boundary=xp.ones((B, Hq, nq)),
        forced=forced,
        extras={"logits_high": zh, "logits_low": zl, "probs_high": ph, "probs_low": pl,
                "scale_high": sh, "scale_low": sl, "mask_high": m_high, "mask_low": m_low,
                "boundary_high": b_high, "boundary_low": b_low, "high_dims": hi, "low_dims": lo})
