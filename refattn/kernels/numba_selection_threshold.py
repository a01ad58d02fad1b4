"""Numba kernels of the threshold selection ops: ``selection_cumulative_threshold``
(cumulative-mass threshold per row) and ``selection_fixed_threshold`` (a fixed threshold
per row). The contract (mask, boundary, tie order) is in :mod:`.numba_selection`.

The cumulative threshold needs arithmetic: the reference sums the masses in descending
order (a sequential float64 ``cumsum``, whose last value is the normaliser) and compares
``cum / total`` with ``tau``. The kernel finds the crossing without sorting, by a
quickselect on mass, so its sums run in another order (and under the fastmath flag set
LLVM may reassociate them, or divide through a reciprocal). It therefore certifies each
row: the compared values on both sides of its crossing (the last kept and the first
dropped) must clear ``tau`` by more than a bound on the difference between its arithmetic
and the reference's, ``(8 n + 32) * 2**-53`` (times the total when not normalised), for
``n`` valid entries. A row that fails (a crossing that lands on ``tau`` within rounding,
e.g. ``tau = 0.5`` over equal masses, or a non-finite total) is recomputed on the host with
the reference's own NumPy operations (sort, ``cumsum``, divide: the same float64 values in
the same order, hence the same bits), and its mask written by the top-``m`` kernel. Random
scores almost never take that path.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from numba import njit, prange

from ..core.errors import InputError
from ..core.registry import register
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS
from .numba_selection import (
    _as_scores,
    _as_valid,
    _bound_buffer,
    _finish,
    _mask_buffer,
    _outputs,
    _per_row,
    _per_task,
    _ro,
    _threads_for,
    _tie_high,
)
from .numba_selection_rank import _median3, _partition3
from .numba_selection_topk import _gather, _top_m_rows, _write_top

_UNIT = 2.0 ** -53  # unit roundoff of float64

# status codes of the cumulative-count kernel, per row
_CERTAIN, _RECHECK, _NEGATIVE = 0, 1, 2


@njit(**NJIT_HELPER_OPTIONS)
def _mass_crossing(a: np.ndarray, n: int, T: float, tmp: np.ndarray
                   ) -> tuple[int, float, float, Any, Any]:
    """Where the cumulative mass of ``a[:n]`` (non-negative float64, ranked descending)
    first reaches ``T > 0``, by a quickselect on mass (three-way partitions; reorders
    ``a[:n]``; ``tmp [>= n]`` is scratch).

    With ``Q_j`` the mass of the ``j`` largest entries (``Q_0 = 0 < T``), returns ``J``, the
    smallest ``j`` with ``Q_j >= T`` (``n + 1`` if none), ``Q_{J-1}``, ``Q_J`` (``inf`` if
    none), the ``J``-th largest entry and the ``(J-1)``-th largest (``nan`` where they do
    not exist). The sums are in partition order, not the reference's; callers bound the
    difference."""
    lo = 0
    hi = n - 1
    base = 0.0                           # Q_lo: mass of the entries ranked before a[lo:]
    while lo <= hi:
        p = _median3(a, lo, hi)
        lt, gt, above = _partition3(a, tmp, lo, hi, p)
        if lt > lo and base + above >= T:
            hi = lt - 1                  # the crossing is among the entries above p
            continue
        q_prev = base + above            # Q_lt < T
        for q in range(1, gt - lt + 2):  # entries equal to p, ranks lt .. gt
            q_next = q_prev + p
            if q_next >= T:
                J = lt + q
                if q >= 2:
                    prev = p
                elif lt > 0:             # the smallest of the entries above the group
                    prev = a[0]
                    for k in range(1, lt):
                        if a[k] < prev:
                            prev = a[k]
                else:
                    prev = np.nan
                return J, q_prev, q_next, p, prev
            q_prev = q_next
        base = q_prev
        lo = gt + 1
    smallest = a[0]
    for k in range(1, n):
        if a[k] < smallest:
            smallest = a[k]
    return n + 1, base, np.inf, np.nan, smallest


@njit(**NJIT_OPTIONS)
def _cumulative_rows(s: np.ndarray, valid: np.ndarray, has_valid: bool, tau: np.ndarray,
                     normalize: bool, include_crossing: bool, tie_high: bool,
                     mask: np.ndarray, bound: np.ndarray, status: np.ndarray, per: int) -> None:
    """Cumulative-mass threshold of every row, with a certificate.

    Writes ``mask [R, N]``, ``bound [R]`` and ``status [R]`` int8: 0 the row is done; 1 a
    compared mass lies within this kernel's rounding bound of ``tau`` (or the mass is not
    finite): the host recomputes the row exactly; 2 a negative valid mass (the host
    raises)."""
    R, N = s.shape
    for task in prange((R + per - 1) // per):
        buf = np.empty(N, np.float64)
        tmp = np.empty(N, np.float64)
        for r in range(task * per, min(R, (task + 1) * per)):
            nv = _gather(s, valid, has_valid, r, buf)
            status[r] = _CERTAIN
            bound[r] = np.nan
            v = 0.0
            total = 0.0
            neg = False
            for i in range(nv):
                total += buf[i]
                neg |= buf[i] < 0
            t = tau[r]
            m = 0
            if neg:
                status[r] = _NEGATIVE
            elif t > 0 and nv > 0 and (total > 0 or not normalize):
                if not np.isfinite(total):
                    status[r] = _RECHECK
                else:
                    T = t * total if normalize else t
                    J, q_in, q_out, vJ, vJm1 = _mass_crossing(buf, nv, T, tmp)
                    if include_crossing:
                        m = min(J, nv)
                        v = vJ if J <= nv else vJm1
                        has_in, has_out = True, J < nv
                    else:
                        m = J - 1
                        v = vJm1
                        has_in, has_out = m >= 1, J <= nv
                    # |this kernel's compared value - the reference's| <= tol (sums in
                    # another order, reciprocal for division), with margin.
                    tol = (8.0 * nv + 32.0) * _UNIT
                    if normalize:
                        c_in, c_out = q_in / total, q_out / total
                    else:
                        tol *= total
                        c_in, c_out = q_in, q_out
                    if (has_in and not (c_in < t - tol)) or (has_out and not (c_out > t + tol)):
                        status[r] = _RECHECK
                        m = 0
                    elif m > 0:
                        bound[r] = v
            _write_top(s, valid, has_valid, r, m, nv, v, tie_high, mask)


@njit(**NJIT_OPTIONS)
def _fixed_rows(s: np.ndarray, valid: np.ndarray, has_valid: bool, thr: np.ndarray,
                inclusive: bool, mask: np.ndarray, bound: np.ndarray, per: int) -> None:
    """``mask[r, j] = s[r, j] >= thr[r]`` (``>`` unless ``inclusive``) and valid, compared
    in float64; ``bound[r] = thr[r]``."""
    R, N = s.shape
    for task in prange((R + per - 1) // per):
        for r in range(task * per, min(R, (task + 1) * per)):
            t = thr[r]
            if has_valid:
                if inclusive:
                    for j in range(N):
                        mask[r, j] = (np.float64(s[r, j]) >= t) & valid[r, j]
                else:
                    for j in range(N):
                        mask[r, j] = (np.float64(s[r, j]) > t) & valid[r, j]
            elif inclusive:
                for j in range(N):
                    mask[r, j] = np.float64(s[r, j]) >= t
            else:
                for j in range(N):
                    mask[r, j] = np.float64(s[r, j]) > t
            bound[r] = t


# ---------------------------------------------------------------------- exact host path
def _exact_counts(s: np.ndarray, ok: np.ndarray, tau: np.ndarray, normalize: bool,
                  include_crossing: bool) -> np.ndarray:
    """The reference's arithmetic for the rows ``s [F, N]`` (NumPy, float64): masses sorted
    descending, sequential ``cumsum``, divided by the row total, compared with ``tau [F]``.
    Returns the kept count per row (the kept positions are a prefix of the ranking)."""
    v = np.where(ok, s.astype(np.float64), 0.0)
    srt = np.sort(v, axis=-1)[:, ::-1]
    cum = np.cumsum(srt, axis=-1)
    t = tau[:, None]
    has_mass = np.ones((s.shape[0], 1), bool)
    if normalize:
        tot = cum[:, -1:]
        has_mass = tot > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            cum = np.where(has_mass, cum / np.where(has_mass, tot, 1.0), 0.0)
    before = np.concatenate([np.zeros_like(cum[:, :1]), cum[:, :-1]], axis=-1)
    with np.errstate(invalid="ignore"):
        keep = (before < t) if include_crossing else (cum < t)
    nv = ok.sum(axis=-1)
    keep &= (np.arange(s.shape[1])[None, :] < nv[:, None]) & (t > 0) & has_mass
    return keep.sum(axis=-1).astype(np.int64)


# ------------------------------------------------------------------------------ kernels
@register("selection_cumulative_threshold", "numba")
def cumulative_rows_numba(scores: Any, tau: Any, valid: Any = None, normalize: bool = True,
                          tie: str = "low", include_crossing: bool = True, *,
                          out: Sequence[np.ndarray] | None = None
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative-mass threshold per row. ``scores [R, N]`` non-negative, ``tau`` scalar or
    ``[R]``. Returns ``(mask bool [R, N], boundary [R])``. See the module docstring for the
    exact host recheck of rows whose crossing is within rounding of ``tau``."""
    s = _as_scores(scores, 2, "cumulative_rows")
    R, N = s.shape
    t = _ro(np.ascontiguousarray(_per_row(np.asarray(tau, dtype=np.float64), R,
                                          "cumulative_rows", "tau")))
    th = _tie_high(tie)
    v, has_v = _as_valid(valid, s.shape, "cumulative_rows")
    om, ob = _outputs(out, (R, N), R, "cumulative_rows")
    mb, bb = _mask_buffer(om, R, N), _bound_buffer(ob)
    status = np.empty(R, np.int8)
    with _threads_for(s.size):
        _cumulative_rows(s, v, has_v, t, bool(normalize), bool(include_crossing), th, mb, bb,
                         status, _per_task(R))
    if (status == _NEGATIVE).any():
        raise InputError("cumulative_threshold: scores must be non-negative masses")
    redo = np.flatnonzero(status == _RECHECK)
    if redo.size:   # the reference's arithmetic on these rows, then the top-m kernel
        sr = _ro(np.ascontiguousarray(s[redo]))
        vr = _ro(np.ascontiguousarray(v[redo])) if has_v else v
        ok = (vr & ~np.isnan(sr)) if has_v else ~np.isnan(sr)
        count = _ro(_exact_counts(sr, ok, t[redo], bool(normalize), bool(include_crossing)))
        m_r = np.empty((redo.size, N), np.bool_)
        b_r = np.empty(redo.size, np.float64)
        with _threads_for(sr.size):
            _top_m_rows(sr, vr, has_v, count, th, m_r, b_r, _per_task(redo.size))
        mb[redo] = m_r
        bb[redo] = b_r
    return _finish(mb, bb, om, ob)


@register("selection_fixed_threshold", "numba")
def fixed_rows_numba(scores: Any, threshold: Any, valid: Any = None, inclusive: bool = True, *,
                     out: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fixed threshold per row. ``scores [R, N]``, ``threshold`` scalar or ``[R]``.
    Returns ``(mask bool [R, N], boundary [R])`` (the threshold of each row)."""
    s = _as_scores(scores, 2, "fixed_rows")
    R, N = s.shape
    t = _ro(np.ascontiguousarray(_per_row(np.asarray(threshold, dtype=np.float64), R,
                                          "fixed_rows", "threshold")))
    v, has_v = _as_valid(valid, s.shape, "fixed_rows")
    om, ob = _outputs(out, (R, N), R, "fixed_rows")
    mb, bb = _mask_buffer(om, R, N), _bound_buffer(ob)
    with _threads_for(s.size):
        _fixed_rows(s, v, has_v, t, bool(inclusive), mb, bb, _per_task(R))
    return _finish(mb, bb, om, ob)
