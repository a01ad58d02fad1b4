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

The kernels live in :mod:`.numba_selection_topk` (per-row and global top-k, and the top-m
row kernel the other rules reuse), :mod:`.numba_selection_threshold` (cumulative and fixed
thresholds) and :mod:`.numba_selection_rank` (the m-th largest value of a row, without a
sort). This module holds their shared host side: input checks and conversion, output
buffers, and the threading policy of a call. It registers nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numba
import numpy as np

from ..core.errors import InputError


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
