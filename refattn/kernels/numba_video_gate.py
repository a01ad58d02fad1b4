"""Numba CPU kernel of the VMoBA gate (op ``vmoba_gate``).

Implements :func:`refattn.video.vmoba.vmoba_gate` (same arguments plus ``out=``): q
``[B, Hq, S, D]`` and k ``[B, Hkv, S, D]`` in the partition's (permuted) order, ``bounds``
int64 ``[C+1]`` block boundaries; output ``gate`` ``[B, Hq, S, C]`` with
``gate[b,h,s,c] = <q[b,h,s], kbar[b,g,c]>``, ``kbar[b,g,c] = mean_{j in c} k[b,g,j]`` (true
block length), ``g = h // (Hq/Hkv)``. No scale, no softmax.

Two parallel passes, each a ``prange`` over a flattened task index with disjoint outputs:

1. block means: one task per ``(b, g, c)``, float64 sums of the block's keys, divided by its
   length (float64 ``kbar`` scratch);
2. gate: one task per ``(b, h, row tile)`` of ``TILE`` query rows; each row's dot products
   with the ``C`` block means are accumulated in float64 and stored as float32 (the
   official gate is fp32).

Inputs of any float dtype (fp16, bf16, fp32, fp64) are converted once to float32, as the
official code casts keys and queries to fp32 before the gate.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from ..core.errors import InputError
from ..core.registry import register
from .flags import NJIT_OPTIONS

TILE = 64    # query rows per gate task


def _f32(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "fV" or (a.dtype.kind == "V" and str(a.dtype) != "bfloat16"):
        raise InputError(f"{name}: expected a float array (fp16, bf16, fp32, fp64), got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


@njit(**NJIT_OPTIONS)
def _block_means(k: np.ndarray, bounds: np.ndarray, kbar: np.ndarray) -> None:
    B, Hkv, S, D = k.shape
    C = bounds.shape[0] - 1
    for task in prange(B * Hkv * C):
        c = task % C
        g = (task // C) % Hkv
        b = task // (C * Hkv)
        j0, j1 = bounds[c], bounds[c + 1]
        for d in range(D):
            kbar[b, g, c, d] = 0.0
        for j in range(j0, j1):
            for d in range(D):
                kbar[b, g, c, d] += k[b, g, j, d]
        inv = 1.0 / (j1 - j0)
        for d in range(D):
            kbar[b, g, c, d] *= inv


@njit(**NJIT_OPTIONS)
def _gate(q: np.ndarray, kbar: np.ndarray, gate: np.ndarray) -> None:
    B, Hq, S, D = q.shape
    Hkv, C = kbar.shape[1], kbar.shape[2]
    G = Hq // Hkv
    nt = (S + TILE - 1) // TILE
    for task in prange(B * Hq * nt):
        t = task % nt
        h = (task // nt) % Hq
        b = task // (nt * Hq)
        g = h // G
        for s in range(t * TILE, min(S, (t + 1) * TILE)):
            for c in range(C):
                acc = 0.0
                for d in range(D):
                    acc += np.float64(q[b, h, s, d]) * kbar[b, g, c, d]
                gate[b, h, s, c] = acc


@register("vmoba_gate", "numba")
def vmoba_gate(q: np.ndarray, k: np.ndarray, bounds: np.ndarray, *,
               out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """VMoBA gate ``[B, Hq, S, C]`` (float32); see the module docstring."""
    qf, kf = _f32(q, "q"), _f32(k, "k")
    if qf.ndim != 4 or kf.ndim != 4 or qf.shape[2] != kf.shape[2] or qf.shape[3] != kf.shape[3]:
        raise InputError(f"q/k: expected [B, Hq, S, D] and [B, Hkv, S, D], got {qf.shape}, {kf.shape}")
    if qf.shape[1] % kf.shape[1]:
        raise InputError(f"q/k: query heads {qf.shape[1]} not a multiple of kv heads {kf.shape[1]}")
    bnd = np.ascontiguousarray(bounds, dtype=np.int64)
    S = qf.shape[2]
    if bnd.ndim != 1 or bnd.size < 2 or bnd[0] != 0 or bnd[-1] != S or np.any(np.diff(bnd) <= 0):
        raise InputError(f"bounds: expected increasing block boundaries from 0 to {S}, got {bnd[:8]}...")
    B, Hq = qf.shape[:2]
    C = bnd.size - 1
    shape = (B, Hq, S, C)
    if out is None:
        target, user = np.empty(shape, np.float32), None
    else:
        if not isinstance(out, (tuple, list)) or len(out) != 1 or getattr(out[0], "shape", None) != shape:
            raise InputError(f"out: expected a tuple of one array of shape {shape}")
        user = out[0]
        direct = user.dtype == np.float32 and user.flags.c_contiguous and user.flags.writeable
        target = user if direct else np.empty(shape, np.float32)
    kbar = np.empty((B, kf.shape[1], C, kf.shape[3]), np.float64)
    _block_means(kf, bnd, kbar)
    _gate(qf, kbar, target)
    if user is not None and user is not target:
        user[...] = target
    return (target if user is None else user,)
