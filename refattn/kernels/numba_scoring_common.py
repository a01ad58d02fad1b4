"""Shared pieces of the Numba scoring kernels (``numba_scoring_*.py``); registers nothing.

* Host side: :func:`f32` (one conversion of an input to C-contiguous float32),
  :func:`outputs` (the caller's ``out=`` tuple checked against the reference's shapes, or
  fresh float32 arrays), :func:`kv_group`.
* Device side (``@njit`` helpers, inlined into the parallel kernels): :func:`exp_f32`,
  :func:`block_sums` (float64 sums of consecutive key rows: the pooled keys/queries of
  MoBA, Prism, PBS, FlexPrefill, ProxyAttention, NSA).

Outputs are float32 unless the caller preallocates another float dtype; every kernel
writes every element of its outputs (the test harness poisons them with NaN).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from numba import njit, prange

from ..core.errors import InputError
from ._fmath import exp_f32  # noqa: F401  (shared float32 exp, re-exported)
from .flags import NJIT_OPTIONS


def f32(x: Any, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 array (fp16, bf16, fp32, fp64 accepted)."""
    a = np.asarray(x)
    if a.dtype.kind != "f" and str(a.dtype) != "bfloat16":
        raise InputError(f"{name}: expected a float array (fp16, bf16, fp32, fp64), got {a.dtype}")
    if a.ndim != 4:
        raise InputError(f"{name}: expected a 4-d array [B, H, S, D], got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float32)


def kv_group(q: np.ndarray, k: np.ndarray) -> int:
    """GQA group size ``Hq // Hkv`` (checked)."""
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise InputError(f"q, k: batch and head_dim must match, got q {q.shape}, k {k.shape}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise InputError(f"q, k: Hq={q.shape[1]} must be a multiple of Hkv={k.shape[1]}")
    return q.shape[1] // k.shape[1]


def outputs(out: Sequence[np.ndarray] | None, shapes: Sequence[tuple[int, ...]],
            name: str) -> tuple[np.ndarray, ...]:
    """``out`` checked (count, shape, C-contiguous float) or new float32 arrays."""
    if out is None:
        return tuple(np.empty(s, np.float32) for s in shapes)
    out = tuple(out)
    if len(out) != len(shapes):
        raise InputError(f"{name}: out= must hold {len(shapes)} arrays, got {len(out)}")
    for i, (o, s) in enumerate(zip(out, shapes, strict=True)):
        if not isinstance(o, np.ndarray) or o.shape != tuple(s) or o.dtype.kind != "f" \
                or not o.flags.c_contiguous or o.dtype.itemsize < 4:
            raise InputError(f"{name}: out[{i}] must be a C-contiguous float32/float64 array of "
                             f"shape {tuple(s)}, got {getattr(o, 'dtype', type(o))} "
                             f"{getattr(o, 'shape', '')}")
    return out


def round_like(x: np.ndarray, dtype: Any) -> np.ndarray:
    """float64 ``x`` rounded to ``dtype`` (fp16/bf16/fp32) and back to float64; fp64 unchanged."""
    if np.dtype(dtype) == np.float64:
        return x
    return np.asarray(x).astype(dtype).astype(np.float64)


# --------------------------------------------------------------------------- device side
@njit(**NJIT_OPTIONS)
def block_sums(x: np.ndarray, block: int) -> np.ndarray:
    """float64 ``[B, H, ceil(S/block), D]``: sums of consecutive ``block`` rows of
    ``x [B, H, S, D]`` (float32), the last block over its true length. Divide by the
    true count (MoBA, FlexPrefill) or by ``block`` (Prism, PBS: zero padding counted)."""
    B, H, S, D = x.shape
    n = (S + block - 1) // block
    s = np.zeros((B, H, n, D), np.float64)
    for task in prange(B * H * n):
        b = task // (H * n)
        h = (task // n) % H
        j = task % n
        acc = s[b, h, j]
        for t in range(j * block, min(S, (j + 1) * block)):
            row = x[b, h, t]
            for d in range(D):
                acc[d] += row[d]
    return s


def block_counts(length: int, block: int) -> np.ndarray:
    """True length of each of the ``ceil(length/block)`` blocks, float64."""
    n = -(-length // block)
    return np.minimum(block, length - np.arange(n) * block).astype(np.float64)
