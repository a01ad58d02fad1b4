"""Numba kernels of the top-k selection ops: ``selection_topk_rows`` (top-``k`` per row of
``scores [R, N]``) and ``selection_topk_global`` (top-``k`` per head over the ``Qb * Kb``
blocks of ``scores [H, Qb, Kb]``, in flat order), both through :func:`_top_m_rows`, which
:mod:`.numba_selection_threshold` also uses. The contract (mask, boundary, tie order) is
in :mod:`.numba_selection`; the m-th value search in :mod:`.numba_selection_rank`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from numba import njit, prange

from ..core.registry import register
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS
from .numba_selection import (
    _as_scores,
    _as_valid,
    _bound_buffer,
    _budgets,
    _finish,
    _mask_buffer,
    _outputs,
    _per_task,
    _threads_for,
    _tie_high,
)
from .numba_selection_rank import _SMALL, _mth_value


@njit(**NJIT_HELPER_OPTIONS)
def _gather(s: np.ndarray, valid: np.ndarray, has_valid: bool, r: int, buf: np.ndarray) -> int:
    """Copy the valid, non-NaN entries of row ``r`` of ``s`` to ``buf``; return their
    count. (Helpers index the 2-D arrays instead of taking row views: a view would touch
    the parent's reference count, one shared atomic, from every thread.)"""
    N = s.shape[1]
    nv = 0
    if has_valid:
        for j in range(N):
            x = s[r, j]
            buf[nv] = x
            nv += valid[r, j] and not np.isnan(x)
    else:
        for j in range(N):
            x = s[r, j]
            buf[nv] = x
            nv += not np.isnan(x)
    return nv


@njit(**NJIT_HELPER_OPTIONS)
def _write_top(s: np.ndarray, valid: np.ndarray, has_valid: bool, r: int, m: int, nv: int,
               v: Any, tie_high: bool, mask: np.ndarray) -> None:
    """Write row ``r`` of ``mask``: the ``m`` best of the ``nv`` valid entries of row ``r``
    of ``s``, ``v`` being the ``m``-th largest valid score: every valid entry above ``v``,
    then entries equal to ``v`` in tie order until ``m`` are kept."""
    N = s.shape[1]
    if m <= 0:
        for j in range(N):
            mask[r, j] = False
        return
    if m == nv:
        if has_valid:
            for j in range(N):
                mask[r, j] = valid[r, j] and not np.isnan(s[r, j])
        else:
            for j in range(N):
                mask[r, j] = not np.isnan(s[r, j])
        return
    above = 0
    if has_valid:
        for j in range(N):
            sel = (s[r, j] > v) & valid[r, j]
            mask[r, j] = sel
            above += sel
    else:
        for j in range(N):
            sel = s[r, j] > v
            mask[r, j] = sel
            above += sel
    need = m - above                     # >= 1 entries equal to v, in tie order
    j = N - 1 if tie_high else 0
    step = -1 if tie_high else 1
    while need > 0 and 0 <= j < N:       # (the bound only guards memory; v is exact)
        if s[r, j] == v and (not has_valid or valid[r, j]):
            mask[r, j] = True
            need -= 1
        j += step


@njit(**NJIT_OPTIONS)
def _top_m_rows(s: np.ndarray, valid: np.ndarray, has_valid: bool, m_req: np.ndarray,
                tie_high: bool, mask: np.ndarray, bound: np.ndarray, per: int) -> None:
    """Keep the ``min(m_req[r], #valid)`` best valid entries of every row.

    ``s [R, N]`` float32/float64, ``valid [R, N]`` bool (a dummy unless ``has_valid``),
    ``m_req [R]`` int64 >= 0. Writes ``mask [R, N]`` bool and ``bound [R]`` float64 (the
    smallest selected score, ``nan`` for an empty selection)."""
    R, N = s.shape
    for task in prange((R + per - 1) // per):
        buf = np.empty(N, s.dtype)
        cand = np.empty(N, s.dtype)
        tmp = np.empty(N, s.dtype)
        small = np.empty(_SMALL, s.dtype)
        for r in range(task * per, min(R, (task + 1) * per)):
            nv = _gather(s, valid, has_valid, r, buf)
            m = min(m_req[r], nv)
            if m <= 0:
                _write_top(s, valid, has_valid, r, 0, nv, s[r, 0], tie_high, mask)
                bound[r] = np.nan
                continue
            v = _mth_value(buf, nv, m, cand, small, tmp)
            _write_top(s, valid, has_valid, r, m, nv, v, tie_high, mask)
            bound[r] = v


# ------------------------------------------------------------------------------ kernels
@register("selection_topk_rows", "numba")
def topk_rows_numba(scores: Any, k: Any, valid: Any = None, tie: str = "low", *,
                    out: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` per row. ``scores [R, N]``, ``k`` int scalar or ``[R]``, ``valid`` bool
    broadcastable to ``[R, N]`` or None, ``tie`` ``"low"``/``"high"``. Returns
    ``(mask bool [R, N], boundary [R])`` (float64 unless ``out`` says otherwise)."""
    s = _as_scores(scores, 2, "topk_rows")
    R, N = s.shape
    kk = _budgets(k, R, "topk_rows")
    th = _tie_high(tie)
    v, has_v = _as_valid(valid, s.shape, "topk_rows")
    om, ob = _outputs(out, (R, N), R, "topk_rows")
    mb, bb = _mask_buffer(om, R, N), _bound_buffer(ob)
    with _threads_for(s.size):
        _top_m_rows(s, v, has_v, kk, th, mb, bb, _per_task(s.shape[0]))
    return _finish(mb, bb, om, ob)


@register("selection_topk_global", "numba")
def topk_heads_numba(scores: Any, k: Any, valid: Any = None, tie: str = "low", *,
                     out: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` per head over all ``Qb * Kb`` blocks (ties by flat index). ``scores
    [H, Qb, Kb]``, ``k`` int scalar or ``[H]``, ``valid`` bool broadcastable to
    ``[H, Qb, Kb]`` or None. Returns ``(mask bool [H, Qb, Kb], boundary [H])``."""
    s3 = _as_scores(scores, 3, "topk_heads")
    H, Qb, Kb = s3.shape
    kk = _budgets(k, H, "topk_heads")
    th = _tie_high(tie)
    v3, has_v = _as_valid(valid, s3.shape, "topk_heads")
    om, ob = _outputs(out, (H, Qb, Kb), H, "topk_heads")
    s = s3.reshape(H, Qb * Kb)
    v = v3.reshape(H, Qb * Kb) if has_v else v3.reshape(1, 1)
    mb, bb = _mask_buffer(om, H, Qb * Kb), _bound_buffer(ob)
    with _threads_for(s.size):
        _top_m_rows(s, v, has_v, kk, th, mb, bb, _per_task(s.shape[0]))
    return _finish(mb, bb, om, ob)
