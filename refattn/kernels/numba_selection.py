"""Numba CPU kernels of the generic selection primitives (``refattn.reference.selection``).

Registered (backend ``"numba"``) against the 2-D canonical ops of the reference:

* ``selection_topk_rows``: ``scores [R, N]``, ``k [R]``, ``valid [R, N]``, ``tie``;
* ``selection_topk_global``: ``scores [H, Qb, Kb]``, ``k [H]`` (one budget per head; the
  candidates of a head are its ``Qb * Kb`` blocks in flat order);
* ``selection_cumulative_threshold``: ``scores [R, N]``, ``tau [R]``, ``normalize``,
  ``tie``, ``include_crossing``;
* ``selection_fixed_threshold``: ``scores [R, N]``, ``threshold [R]``, ``inclusive``.

Every kernel returns ``(mask bool, boundary float64)`` exactly as the reference: the same
selection, the same tie order (rank by score descending, ties to the lower index, or the
higher one with ``tie="high"``), NaN scores and invalid entries never selected, and the
same boundary (the score of the last selected entry; ``nan`` where nothing was selected).

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

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numba
import numpy as np
from numba import njit, prange

from ..core.errors import InputError
from ..core.registry import register
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS

_UNIT = 2.0 ** -53  # unit roundoff of float64

# status codes of the cumulative-count kernel, per row
_CERTAIN, _RECHECK, _NEGATIVE = 0, 1, 2


# ------------------------------------------------------------------------------ host side
def _ro(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a``: every input reaches the kernels with the same Numba type
    (read-only C-contiguous array), whatever the caller's flags, so each kernel compiles
    once per score dtype."""
    v = a.view()
    v.flags.writeable = False
    return v


def _as_scores(scores: Any, ndim: int, name: str) -> np.ndarray:
    """``scores`` as a C-contiguous float32 or float64 array of ``ndim`` axes: float64 and
    float32 kept, float16/bfloat16 widened to float32, integers to float64 (all exact)."""
    s = np.asarray(scores)
    if s.dtype.kind not in "fiu" and str(s.dtype) != "bfloat16":
        raise InputError(f"{name}: scores must be a real array, got dtype {s.dtype}")
    if s.ndim != ndim:
        axes = "[R, N]" if ndim == 2 else "[H, Qb, Kb]"
        raise InputError(f"{name}: scores must be {ndim}-d {axes}, got shape {s.shape}")
    if s.shape[-1] == 0:
        raise InputError(f"{name}: scores has no candidates (last axis of length 0), shape {s.shape}")
    if s.dtype == np.float64 or s.dtype.kind in "iu":
        return _ro(np.ascontiguousarray(s, dtype=np.float64))
    return _ro(np.ascontiguousarray(s, dtype=np.float32))


def _as_valid(valid: Any, shape: tuple[int, ...], name: str) -> tuple[np.ndarray, bool]:
    """(``valid`` as C-contiguous bool of ``shape``, True) or (a 1x1 dummy, False)."""
    if valid is None:
        return _ro(np.ones((1,) * len(shape), np.bool_)), False
    v = np.asarray(valid)
    if v.dtype != np.bool_:
        raise InputError(f"{name}: valid must be a bool array, got dtype {v.dtype}")
    try:
        v = np.broadcast_to(v, shape)
    except ValueError:
        raise InputError(f"{name}: valid of shape {v.shape} does not broadcast to scores "
                         f"{shape}") from None
    return _ro(np.ascontiguousarray(v)), True


def _per_row(x: Any, n: int, name: str, what: str) -> np.ndarray:
    a = np.asarray(x)
    try:
        return np.broadcast_to(a, (n,))
    except ValueError:
        raise InputError(f"{name}: {what} must be a scalar or have shape ({n},), got shape "
                         f"{a.shape}") from None


def _budgets(k: Any, n: int, name: str) -> np.ndarray:
    """Per-row budgets as int64 ``[n]`` (integers >= 0, as the reference demands)."""
    kk = _per_row(k, n, name, "k")
    if kk.dtype.kind not in "iu":
        if kk.dtype.kind != "f" or not np.all(np.equal(np.mod(kk, 1), 0)):
            raise InputError(f"topk: k must be an integer, got {k!r}")
    if (kk < 0).any():
        raise InputError(f"topk: k must be >= 0, got {k!r}")
    return _ro(np.ascontiguousarray(kk, dtype=np.int64))


def _tie_high(tie: str) -> bool:
    if tie not in ("low", "high"):
        raise InputError(f"tie: expected 'low' or 'high', got {tie!r}")
    return tie == "high"


def _outputs(out: Sequence[np.ndarray] | None, mask_shape: tuple[int, ...], n_bound: int,
             name: str) -> tuple[np.ndarray, np.ndarray]:
    """``out`` checked (a bool mask of ``mask_shape`` and a float boundary ``[n_bound]``)
    or new arrays (bool, float64)."""
    if out is None:
        return np.empty(mask_shape, np.bool_), np.empty(n_bound, np.float64)
    out = tuple(out)
    if len(out) != 2:
        raise InputError(f"{name}: out= must hold 2 arrays (mask, boundary), got {len(out)}")
    m, b = out
    if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.shape != tuple(mask_shape):
        raise InputError(f"{name}: out[0] must be a bool array of shape {tuple(mask_shape)}, "
                         f"got {getattr(m, 'dtype', type(m))} {getattr(m, 'shape', '')}")
    if not isinstance(b, np.ndarray) or b.dtype.kind != "f" or b.shape != (n_bound,):
        raise InputError(f"{name}: out[1] must be a float array of shape ({n_bound},), "
                         f"got {getattr(b, 'dtype', type(b))} {getattr(b, 'shape', '')}")
    return m, b


def _finish(mask_rows: np.ndarray, bound: np.ndarray, out_mask: np.ndarray,
            out_bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copy the kernel's results into the caller's outputs unless they were written in
    place (``mask_rows`` a reshaped view of ``out_mask``, ``bound`` the same array)."""
    if not np.may_share_memory(mask_rows, out_mask):
        out_mask[...] = mask_rows.reshape(out_mask.shape)
    if bound is not out_bound:
        out_bound[...] = bound
    return out_mask, out_bound


def _mask_buffer(out_mask: np.ndarray, rows: int, n: int) -> np.ndarray:
    """A C-contiguous bool ``[rows, n]`` view of ``out_mask`` if it has one, else new."""
    if out_mask.flags.c_contiguous:
        return out_mask.reshape(rows, n)
    return np.empty((rows, n), np.bool_)


_SERIAL_BELOW = 1 << 15  # inputs with fewer elements run on the calling thread alone


def _per_task(rows: int) -> int:
    """Rows per parallel task of the kernels: about 8 tasks per Numba thread, so that the
    per-task scratch buffers are reused across rows."""
    return max(1, rows // (8 * numba.get_num_threads()))


@contextmanager
def _threads_for(elements: int) -> Iterator[None]:
    """Run the enclosed kernel call on one thread when the input is small (decode-time
    selections, a few rows): waking the pool costs more than the work, and far more on a
    loaded machine."""
    if elements >= _SERIAL_BELOW:
        yield
        return
    n = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(n)


def _bound_buffer(out_bound: np.ndarray) -> np.ndarray:
    if out_bound.dtype == np.float64 and out_bound.flags.c_contiguous:
        return out_bound
    return np.empty(out_bound.shape, np.float64)


# ---------------------------------------------------------------------------- device side
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
