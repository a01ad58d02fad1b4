"""The m-th largest value of a row without a sort by (score, index): the device-side order
statistics of the Numba selection kernels (:mod:`.numba_selection_topk`,
:mod:`.numba_selection_threshold`). Registers nothing.

How the ranked rules are computed without a sort by (score, index). A rule that keeps the
``m`` best valid entries of a row keeps every entry whose score is strictly above the
``m``-th largest valid score ``v``, plus the first ``m - #{s > v}`` entries equal to ``v``
in index order (the last ones for ``tie="high"``), which is what the reference's
lexicographic ranking keeps. ``v`` is found after pruning (the minimum of ``m`` run maxima
bounds it from below) by counting ranks among the few survivors, or an insertion buffer
when ``m`` (or ``#valid - m``) is small, else by a three-way quickselect (linear with
many exact ties).
Only comparisons are involved, in the input's own precision (float32 or float64;
float16/bfloat16 are widened exactly to float32), so the fastmath flag set of
:mod:`refattn.kernels.flags` cannot change a mask or a top-k boundary.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

from .flags import NJIT_HELPER_OPTIONS

_SMALL = 16  # budgets up to this size (from either end) use an insertion buffer
_COUNT_MAX = 48  # candidate sets up to this size are ranked by counting


@njit(**NJIT_HELPER_OPTIONS)
def _median3(a: np.ndarray, lo: int, hi: int) -> Any:
    """Median of ``a[lo]``, ``a[(lo + hi) // 2]``, ``a[hi]`` (the quickselect pivot)."""
    x, y, z = a[lo], a[(lo + hi) >> 1], a[hi]
    if x < y:
        x, y = y, x
    if y < z:
        y = z
        if x < y:
            y = x
    return y


@njit(**NJIT_HELPER_OPTIONS)
def _partition3(a: np.ndarray, tmp: np.ndarray, lo: int, hi: int, p: Any) -> tuple[int, int, float]:
    """Three-way partition of ``a[lo:hi+1]`` around ``p``, descending, without branches
    on the data: entries ``> p`` go to ``a[lo:lt]``, ``== p`` to ``a[lt:gt+1]``, ``< p`` to
    ``a[gt+1:hi+1]`` (through ``tmp``, same size). Returns ``lt``, ``gt`` and the float64
    sum of the entries ``> p`` (in input order)."""
    ng = 0
    nl = 0
    above = 0.0
    for i in range(lo, hi + 1):
        w = a[i]
        g = w > p
        tmp[lo + ng] = w
        tmp[hi - nl] = w
        above += np.float64(w) if g else 0.0
        ng += g
        nl += w < p
    for i in range(lo, lo + ng):
        a[i] = tmp[i]
    for i in range(lo + ng, hi - nl + 1):
        a[i] = p
    for i in range(hi - nl + 1, hi + 1):
        a[i] = tmp[i]
    return lo + ng, hi - nl, above


@njit(**NJIT_HELPER_OPTIONS)
def _mth_largest(a: np.ndarray, n: int, m: int, tmp: np.ndarray) -> Any:
    """The ``m``-th largest (1-based, ``1 <= m <= n``) of ``a[:n]`` (no NaN), by
    quickselect with a three-way partition (many exact ties stay linear); reorders
    ``a[:n]``, ``tmp [>= n]`` is scratch. Comparisons only, so the result is one of the
    inputs, exactly."""
    target = m - 1                       # position in descending order
    lo = 0
    hi = n - 1
    while lo < hi:
        p = _median3(a, lo, hi)
        lt, gt, _ = _partition3(a, tmp, lo, hi, p)
        if target < lt:
            hi = lt - 1
        elif target > gt:
            lo = gt + 1
        else:
            return p
    return a[lo]


@njit(**NJIT_HELPER_OPTIONS)
def _mth_largest_small(a: np.ndarray, n: int, m: int, top: np.ndarray) -> Any:
    """The ``m``-th largest of ``a[:n]`` for a small ``m``: ``top[:m]`` keeps the ``m``
    largest values seen (descending, with multiplicity); a value enters only if it beats
    the current ``m``-th, which random inputs rarely do after the first few."""
    for i in range(m):
        x = a[i]
        j = i
        while j > 0 and top[j - 1] < x:
            top[j] = top[j - 1]
            j -= 1
        top[j] = x
    last = top[m - 1]
    for i in range(m, n):
        x = a[i]
        if x > last:
            j = m - 1
            while j > 0 and top[j - 1] < x:
                top[j] = top[j - 1]
                j -= 1
            top[j] = x
            last = top[m - 1]
    return last


@njit(**NJIT_HELPER_OPTIONS)
def _mth_smallest_small(a: np.ndarray, n: int, m: int, bot: np.ndarray) -> Any:
    """The ``m``-th smallest of ``a[:n]`` for a small ``m`` (mirror of
    :func:`_mth_largest_small`)."""
    for i in range(m):
        x = a[i]
        j = i
        while j > 0 and bot[j - 1] > x:
            bot[j] = bot[j - 1]
            j -= 1
        bot[j] = x
    last = bot[m - 1]
    for i in range(m, n):
        x = a[i]
        if x < last:
            j = m - 1
            while j > 0 and bot[j - 1] > x:
                bot[j] = bot[j - 1]
                j -= 1
            bot[j] = x
            last = bot[m - 1]
    return last


@njit(**NJIT_HELPER_OPTIONS)
def _prune(a: np.ndarray, n: int, m: int, largest: bool, cand: np.ndarray) -> int:
    """Copy to ``cand`` the entries of ``a[:n]`` that can be among the ``m`` largest
    (``largest``) or smallest, ``1 <= m <= n // 2``; return their count. Split ``a[:n]``
    into ``m`` runs: the ``m`` run maxima are ``m`` entries ``>= L`` (their minimum), so
    the ``m``-th largest is ``>= L`` and every entry ``< L`` can go (mirrored for the
    smallest). On random rows about ``2 m`` entries remain."""
    size = n // m
    if largest:
        bound = np.inf
        for g in range(m):
            hi = n if g == m - 1 else (g + 1) * size
            mx = a[g * size]
            for i in range(g * size + 1, hi):
                mx = max(mx, a[i])
            bound = min(bound, mx)
        c = 0
        for i in range(n):
            x = a[i]
            cand[c] = x
            c += x >= bound
        return c
    bound = -np.inf
    for g in range(m):
        hi = n if g == m - 1 else (g + 1) * size
        mn = a[g * size]
        for i in range(g * size + 1, hi):
            mn = min(mn, a[i])
        bound = max(bound, mn)
    c = 0
    for i in range(n):
        x = a[i]
        cand[c] = x
        c += x <= bound
    return c


@njit(**NJIT_HELPER_OPTIONS)
def _mth_by_count(a: np.ndarray, n: int, m: int) -> Any:
    """The ``m``-th largest of ``a[:n]`` for a short ``a`` (``n`` up to ``_COUNT_MAX``):
    the entry ``x`` with ``#{> x} < m <= #{>= x}``, the counts taken by full passes that
    vectorize (``n**2`` comparisons, no data-dependent branches inside)."""
    for i in range(n):
        x = a[i]
        gt = 0
        ge = 0
        for j in range(n):
            y = a[j]
            gt += y > x
            ge += y >= x
        if gt < m and m <= ge:
            return x
    return a[0]                          # not reached: some entry is the m-th largest


@njit(**NJIT_HELPER_OPTIONS)
def _mth_value(buf: np.ndarray, nv: int, m: int, cand: np.ndarray, small: np.ndarray,
               tmp: np.ndarray) -> Any:
    """The ``m``-th largest of ``buf[:nv]`` (``1 <= m <= nv``), by the cheapest route:
    the minimum when ``m == nv``; else, from the nearer end (``m`` or ``nv - m + 1``,
    when at most half of ``nv``), :func:`_prune` then, on the survivors, counting (up to
    ``_COUNT_MAX`` of them), an insertion buffer (budget up to ``_SMALL``) or quickselect;
    else quickselect. ``buf`` may be
    reordered; ``cand``, ``tmp [>= nv]`` and ``small [_SMALL]`` are scratch."""
    if m == nv:
        v = buf[0]
        for i in range(1, nv):
            v = min(v, buf[i])
        return v
    low = nv - m + 1                     # v is also the low-th smallest
    if 2 * m <= nv:
        c = _prune(buf, nv, m, True, cand)
        if c <= _COUNT_MAX:
            return _mth_by_count(cand, c, m)
        if m <= _SMALL:
            return _mth_largest_small(cand, c, m, small)
        return _mth_largest(cand, c, m, tmp)
    if 2 * low <= nv:
        c = _prune(buf, nv, low, False, cand)
        if c <= _COUNT_MAX:
            return _mth_by_count(cand, c, c - low + 1)
        if low <= _SMALL:
            return _mth_smallest_small(cand, c, low, small)
        return _mth_largest(cand, c, c - low + 1, tmp)
    return _mth_largest(buf, nv, m, tmp)
