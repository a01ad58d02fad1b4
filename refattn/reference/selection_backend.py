"""Backend-aware fronts of the generic selection primitives.

The methods call these instead of :mod:`refattn.reference.selection` directly, so that a
method's ``backend`` also reaches the kernels of the selection ops. Each front has the
signature and the results of its primitive (same mask, same boundary, bit for bit) plus a
``backend`` argument:

* :func:`topk_per_row` -> op ``selection_topk_rows`` (``scores [R, N]``, ``k [R]``);
* :func:`topk_global` -> op ``selection_topk_global`` (``scores [H, Qb, Kb]``, ``k [H]``);
* :func:`cumulative_threshold` -> op ``selection_cumulative_threshold`` (``[R, N]``,
  ``tau [R]``);
* :func:`fixed_threshold` -> op ``selection_fixed_threshold`` (``[R, N]``,
  ``threshold [R]``).

The primitives of :mod:`refattn.reference.selection` remain the specification.

``backend="numpy"`` (and ``"auto"`` where it resolves to NumPy) calls the primitive
directly. Otherwise the ``[..., N]`` problem (``[..., Qb, Kb]`` for the global rule) is
flattened to the op's canonical form: leading axes become rows (heads for the global
rule); ``k`` / ``tau`` / ``threshold`` are broadcast to the leading axes and flattened (a
copy of ``R`` numbers; scalars pass as scalars); ``valid`` is passed as ``[1, N]`` (or
``[1, Qb, Kb]``) when it does not vary over the leading axes (axes of stride 0 count as
not varying), else broadcast once to the rows; results are reshaped back (views).

Device arrays: GPU ``scores`` (anything with ``__cuda_array_interface__``) need the cupy
backend (``"cupy"`` or ``"auto"``); they are reshaped on the device (no ``np.asarray`` of
a device array) and the results come back as CuPy arrays. Host ``scores`` with
``backend="cupy"`` go to the cupy kernels as they are: those take NumPy or CuPy inputs and
answer in kind, so host-array methods get host results. CuPy is imported only for GPU
arrays.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.layout import is_device_array as _on_device
from ..core.layout import to_host as _host
from ..core.registry import dispatch, resolve_backend
from . import selection as _ref

__all__ = ["topk_per_row", "topk_global", "cumulative_threshold", "fixed_threshold"]

_OPS = {"rows": "selection_topk_rows", "global": "selection_topk_global",
        "cumulative": "selection_cumulative_threshold", "fixed": "selection_fixed_threshold"}


# ------------------------------------------------------------------------------ helpers
def _cupy() -> Any:
    import cupy  # only reached with GPU arrays or backend="cupy"
    return cupy


def _route(op: str, backend: str, scores: Any) -> str:
    """The backend that runs ``op`` (:func:`refattn.core.registry.resolve_backend`);
    GPU ``scores`` must resolve to ``"cupy"`` (no silent device-to-host copy)."""
    chosen = "numpy" if backend == "numpy" else resolve_backend(op, backend, (scores,))
    if _on_device(scores) and chosen != "cupy":
        raise InputError(f"scores: a GPU array needs backend 'cupy' or 'auto', got {backend!r}")
    return chosen


def _as_scores(scores: Any, min_ndim: int) -> Any:
    """``scores`` as an array: CuPy for GPU arrays (a view), else NumPy; no
    copy between host and device here (the cupy kernels take either and answer in kind).
    Dtypes the ops refuse (bool, ...) are converted to float64 as the primitives do; real
    dtypes pass as they are."""
    xp = _cupy() if _on_device(scores) else np
    s = xp.asarray(scores)
    if s.ndim < min_ndim:
        raise InputError(f"scores: expected at least {min_ndim} axis(es), got shape "
                         f"{tuple(s.shape)}")
    if s.dtype.kind not in "fiu" and str(s.dtype) != "bfloat16":
        s = s.astype(np.float64)
    return s


def _per_lead(x: Any, lead: tuple[int, ...], dtype: Any = None) -> Any:
    """A per-row parameter (``k``, ``tau``) broadcast to the leading axes and flattened to
    ``[R]`` (in its own array module); a scalar stays a scalar. ``ValueError`` if it does
    not broadcast, as in the primitives."""
    a = x if _on_device(x) else np.asarray(x, dtype=dtype)
    if a.ndim == 0:
        return a.item() if not _on_device(a) else a
    m = _cupy() if _on_device(a) else np
    return m.broadcast_to(a, lead).reshape(-1)


def _unstride(v: Any) -> Any:
    """``v`` with every axis of stride 0 (a broadcast view) cut to length 1."""
    return v[tuple(slice(0, 1) if st == 0 and d > 1 else slice(None)
                   for st, d in zip(v.strides, v.shape, strict=True))]


def _valid_rows(valid: Any, shape: tuple[int, ...], cand: int) -> Any:
    """``valid`` (broadcastable to ``shape``) in the op's form: ``[1, *C]`` when constant
    over the leading axes, else ``[R, *C]``, with ``C`` the ``cand`` candidate axes."""
    if valid is None:
        return None
    v = valid.astype(bool, copy=False) if _on_device(valid) else np.asarray(valid, dtype=bool)
    if v.ndim > len(shape):
        raise InputError(f"valid: shape {tuple(v.shape)} has more axes than scores {shape}")
    m = _cupy() if _on_device(v) else np
    v = _unstride(v.reshape((1,) * (len(shape) - v.ndim) + tuple(v.shape)))
    nl = len(shape) - cand
    tail = shape[nl:]
    if all(d == 1 for d in v.shape[:nl]):
        rows = m.broadcast_to(v.reshape(v.shape[nl:]), tail).reshape((1,) + tail)
    else:
        rows = m.broadcast_to(v, shape).reshape((math.prod(shape[:nl]),) + tail)
    return rows


def _deliver(mask: Any, bound: Any, shape: tuple[int, ...], lead: tuple[int, ...],
             device: bool) -> tuple[Any, Any]:
    """Reshape the op's results back; keep them on the device for GPU ``scores``, bring
    them to the host otherwise."""
    if device:
        cp = _cupy()
        return cp.asarray(mask).reshape(shape), cp.asarray(bound).reshape(lead)
    if _on_device(mask):
        cp = _cupy()
        mask, bound = cp.asnumpy(mask), cp.asnumpy(bound)
    return np.asarray(mask).reshape(shape), np.asarray(bound).reshape(lead)


def _run(op: str, chosen: str, s: Any, shape_in: tuple[int, ...], lead: tuple[int, ...],
         args: tuple[Any, ...], device: bool) -> tuple[Any, Any]:
    """Call the kernel of ``op`` on ``(s, *args)`` and deliver the results."""
    mask, bound = dispatch(op, chosen)(s, *args)
    return _deliver(mask, bound, shape_in, lead, device)


def _empty(primitive: Any, shape: tuple[int, ...], lead: tuple[int, ...], device: bool,
           *args: Any, **kw: Any) -> tuple[Any, Any]:
    """A problem without entries, which the ops refuse: the primitive on host arrays
    (its results, or its error), delivered like a kernel's."""
    mask, bound = primitive(np.empty(shape), *map(_host, args),
                            **{n: _host(v) for n, v in kw.items()})
    return _deliver(mask, bound, shape, lead, device)


# ------------------------------------------------------------------------------- fronts
def topk_per_row(scores: Any, k: Any, *, valid: Any = None, tie: str = "low",
                 backend: str = "numpy") -> tuple[Any, Any]:
    """:func:`refattn.reference.selection.topk_per_row` on ``backend``.

    ``scores [..., N]``; ``k`` int, or broadcastable to ``[...]``; ``valid`` bool
    broadcastable to ``[..., N]``. Returns ``mask`` bool ``[..., N]`` and ``boundary [...]``
    (float64). Runs op ``selection_topk_rows`` on ``[R, N]``, ``R = prod(...)``.
    """
    chosen = _route(_OPS["rows"], backend, scores)
    if chosen == "numpy":
        return _ref.topk_per_row(scores, k, valid=valid, tie=tie)
    s = _as_scores(scores, 1)
    shape, lead = tuple(s.shape), tuple(s.shape[:-1])
    if s.size == 0:
        return _empty(_ref.topk_per_row, shape, lead, _on_device(scores), k, valid=valid,
                      tie=tie)
    kk = _per_lead(k, lead)
    vv = _valid_rows(valid, shape, 1)
    return _run(_OPS["rows"], chosen, s.reshape(math.prod(lead), shape[-1]), shape, lead,
                (kk, vv, tie), _on_device(scores))


def topk_global(scores: Any, k: Any, *, valid: Any = None, tie: str = "low",
                backend: str = "numpy") -> tuple[Any, Any]:
    """:func:`refattn.reference.selection.topk_global` on ``backend``.

    ``scores [..., Qb, Kb]`` (one budget per leading index, e.g. per head); ``k`` int or
    broadcastable to ``[...]``; ``valid`` broadcastable to ``scores`` (e.g. the causal
    ``[Qb, Kb]``). Returns ``mask`` like ``scores`` and ``boundary [...]``. Runs op
    ``selection_topk_global`` on ``[H, Qb, Kb]``, ``H = prod(...)``.
    """
    chosen = _route(_OPS["global"], backend, scores)
    if chosen == "numpy":
        return _ref.topk_global(scores, k, valid=valid, tie=tie)
    s = _as_scores(scores, 1)
    shape = tuple(s.shape)
    # a 1-d input is one head of one row ([1, N]), as the primitive's flattening makes it
    grid = shape if s.ndim >= 2 else (1,) + shape
    lead = grid[:-2]
    if s.size == 0:
        return _empty(_ref.topk_global, shape, lead, _on_device(scores), k, valid=valid, tie=tie)
    kk = _per_lead(k, lead)
    vv = _valid_rows(valid, grid, 2)
    return _run(_OPS["global"], chosen, s.reshape((math.prod(lead),) + grid[-2:]), shape, lead,
                (kk, vv, tie), _on_device(scores))


def cumulative_threshold(scores: Any, tau: Any, *, valid: Any = None, normalize: bool = True,
                         tie: str = "low", include_crossing: bool = True,
                         backend: str = "numpy") -> tuple[Any, Any]:
    """:func:`refattn.reference.selection.cumulative_threshold` on ``backend``.

    ``scores [..., N]`` non-negative masses; ``tau`` scalar or broadcastable to ``[...]``
    (e.g. ``[H, 1]`` per head). Returns ``mask [..., N]`` and ``boundary [...]``. Runs op
    ``selection_cumulative_threshold`` on ``[R, N]``.
    """
    chosen = _route(_OPS["cumulative"], backend, scores)
    if chosen == "numpy":
        return _ref.cumulative_threshold(scores, tau, valid=valid, normalize=normalize, tie=tie,
                                         include_crossing=include_crossing)
    s = _as_scores(scores, 1)
    shape, lead = tuple(s.shape), tuple(s.shape[:-1])
    if s.size == 0:
        return _empty(_ref.cumulative_threshold, shape, lead, _on_device(scores), tau,
                      valid=valid, normalize=normalize, tie=tie,
                      include_crossing=include_crossing)
    tt = _per_lead(tau, lead, np.float64)
    vv = _valid_rows(valid, shape, 1)
    return _run(_OPS["cumulative"], chosen, s.reshape(math.prod(lead), shape[-1]), shape, lead,
                (tt, vv, bool(normalize), tie, bool(include_crossing)), _on_device(scores))


def fixed_threshold(scores: Any, threshold: Any, *, valid: Any = None, inclusive: bool = True,
                    backend: str = "numpy") -> tuple[Any, Any]:
    """:func:`refattn.reference.selection.fixed_threshold` on ``backend``.

    ``scores [..., N]``; ``threshold`` scalar or broadcastable to ``[..., 1]`` (per head
    ``[H, 1, 1]``, per row ``[..., 1]``). Returns ``mask [..., N]`` and ``boundary [...]``
    (the threshold of each row). Runs op ``selection_fixed_threshold`` on ``[R, N]``. A
    threshold that varies along the candidate axis has no per-row form: ``"auto"`` then
    runs the primitive, an explicit kernel backend refuses it.
    """
    chosen = _route(_OPS["fixed"], backend, scores)
    thr = threshold if _on_device(threshold) else np.asarray(threshold, dtype=np.float64)
    sshape = tuple(scores.shape) if hasattr(scores, "shape") else np.shape(scores)
    n = sshape[-1] if sshape else 1
    per_entry = thr.ndim > 0 and thr.shape[-1] != 1 and n != 1
    if per_entry and chosen != "numpy":
        if backend != "auto" or _on_device(scores):
            raise InputError(f"threshold: shape {tuple(thr.shape)} varies along the candidate "
                             f"axis; backend {backend!r} takes one threshold per row ([..., 1])")
        chosen = "numpy"
    if chosen == "numpy":
        return _ref.fixed_threshold(scores, threshold, valid=valid, inclusive=inclusive)
    s = _as_scores(scores, 1)
    shape, lead = tuple(s.shape), tuple(s.shape[:-1])
    if s.size == 0:
        return _empty(_ref.fixed_threshold, shape, lead, _on_device(scores), thr, valid=valid,
                      inclusive=inclusive)
    if thr.ndim == 0:
        tt: Any = thr.item() if not _on_device(thr) else thr
    else:
        m = _cupy() if _on_device(thr) else np
        tt = m.broadcast_to(thr, lead + (1,)).reshape(-1)
    vv = _valid_rows(valid, shape, 1)
    return _run(_OPS["fixed"], chosen, s.reshape(math.prod(lead), shape[-1]), shape, lead,
                (tt, vv, bool(inclusive)), _on_device(scores))
