"""Token permutations along the sequence axis: build, apply, invert (exact round trip).

A permutation is an ``int64`` index array ``perm`` of shape ``[S]`` (shared) or
``[..., S]`` (one per batch/head), where position ``p`` of the permuted sequence holds the
token at original index ``perm[..., p]``, i.e. ``x_perm = take(x, perm, axis=seq)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError


def make_permutation(order: Any, length: int | None = None) -> np.ndarray:
    """Validate ``order`` as a permutation of ``range(S)`` along its last axis; int64 copy."""
    p = np.asarray(order)
    if p.dtype.kind not in "iu":
        raise InputError(f"perm: expected integer indices, got {p.dtype}")
    if p.ndim == 0:
        raise InputError("perm: expected at least a 1-d index array")
    S = p.shape[-1]
    if length is not None and S != length:
        raise InputError(f"perm: length {S} does not match the sequence length {length}")
    srt = np.sort(p, axis=-1)
    if not np.array_equal(srt, np.broadcast_to(np.arange(S), p.shape)):
        raise InputError("perm: not a permutation of range(S) (repeated or out-of-range index)")
    return p.astype(np.int64, copy=True)


def invert_permutation(perm: Any) -> np.ndarray:
    """``inv`` with ``inv[..., perm[..., p]] = p``."""
    p = make_permutation(perm)
    inv = np.empty_like(p)
    np.put_along_axis(inv, p, np.broadcast_to(np.arange(p.shape[-1]), p.shape), axis=-1)
    return inv


def _take(x: np.ndarray, perm: np.ndarray, axis: int) -> np.ndarray:
    if perm.ndim == 1:
        return np.take(x, perm, axis=axis)
    # perm has the shape x.shape[:axis + 1]; broadcast it over the trailing axes.
    idx = perm.reshape(perm.shape + (1,) * (x.ndim - axis - 1))
    return np.take_along_axis(x, np.broadcast_to(idx, x.shape), axis=axis)


def apply_permutation(x: Any, perm: Any, axis: int = -2) -> np.ndarray:
    """Reorder ``x`` along ``axis`` (default: the sequence axis of ``[..., S, D]``).

    ``perm`` is ``[S]`` or has the leading shape of ``x`` up to and including ``axis``
    (e.g. ``[B, H, S]`` for ``x [B, H, S, D]``).
    """
    x = np.asarray(x)
    ax = axis % x.ndim
    p = make_permutation(perm, x.shape[ax])
    if p.ndim > 1 and p.shape != x.shape[:ax + 1]:
        raise InputError(f"perm: shape {p.shape} must be [S] or {x.shape[:ax + 1]}")
    return _take(x, p, ax)


def unpermute(x: Any, perm: Any, axis: int = -2) -> np.ndarray:
    """Inverse of :func:`apply_permutation`: ``unpermute(apply_permutation(x, p), p) == x``."""
    return apply_permutation(x, invert_permutation(perm), axis=axis)
