"""Numba kernel of PBS-Attn's block scores, op ``pbs_score`` (reference
:func:`refattn.methods.pbs.pbs_block_scores`; official ``pbs_attn/src/utils.py:
block_pooled_attn`` of xinghaow99/pbs-attn @ 8ce8e024, docs/methods/pbs.md step 2).

Per (batch, query head), length ``L``, block ``b``, ``m = segment_size / b`` blocks per
segment and ``n = ceil(L / b)`` blocks::

    q_I  = (1/b) sum_{t in block I} q_t          (zero padding counted: divide by b)
    k'_J = (1/b) sum_{u in block J} k'_u         (k' = keys already permuted per query head)
    allowed(I, J) = floor(I/m) != floor(J/m)  and  J <= I
    p[I, J] = softmax_J (q_I . k'_J / sqrt(D))   over the allowed J, 0 elsewhere
    p[I, :] = NaN                                where no J is allowed (I < m)

The NaN rows are part of the specification (the op is defined with ``equal_nan=True``;
the registry suite checks that they are NaN here and that nothing else is).

Numerics: inputs are read as float32 (exact for fp16/bf16/fp32; float64 inputs are kept
float64). The block sums are float64 (:func:`block_sums`, sequential over the block's rows
as the reference's reduction), and the dot products, the softmax and its sum are float64:
the ``n x n x D`` work is negligible next to reading q and k once, and the cumulative-``tau``
selection downstream compares partial sums of ``p`` with ``tau``, which float32 scores would
move at near-ties. Without ``out=`` the output is float64 (as the reference), so the
selection equals the reference's; a preallocated float32 ``out`` is filled by rounding.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from ..core.blockmask import num_blocks
from ..core.errors import InputError
from ..core.registry import register
from .flags import NJIT_OPTIONS
from .numba_scoring_common import block_sums

OP = "pbs_score"


def _as_float(x: Any, name: str) -> np.ndarray:
    """``x [B, H, L, D]`` C-contiguous: float64 stays float64, other floats become float32
    (exact for fp16, bf16 and fp32)."""
    a = np.asarray(x)
    if a.dtype.kind != "f" and str(a.dtype) != "bfloat16":
        raise InputError(f"{name}: expected a float array (fp16, bf16, fp32, fp64), got {a.dtype}")
    if a.ndim != 4:
        raise InputError(f"{name}: expected a 4-d array [B, H, L, D], got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float64 if a.dtype == np.float64 else np.float32)


@njit(**NJIT_OPTIONS)
def _pbs_rows(qs: np.ndarray, ks: np.ndarray, m: int, inv_b2_sqrt_d: float,
              p: np.ndarray) -> None:  # pragma: no cover (compiled)
    """Fill ``p [B, H, n, n]`` from the float64 block *sums* ``qs, ks [B, H, n, D]``.

    ``z[I, J] = (qs_I / b) . (ks_J / b) / sqrt(D) = qs_I . ks_J * inv_b2_sqrt_d``; one
    ``prange`` task per (batch, head, query block ``I``); the row's disallowed blocks are 0
    and a row without an allowed block (``I < m``) is NaN."""
    B, H, n, D = qs.shape
    for task in prange(B * H * n):
        b = task // (H * n)
        h = (task // n) % H
        i = task % n
        row = p[b, h, i]
        seg0 = (i // m) * m                 # first block of row I's segment
        nj = min(seg0, i + 1)               # allowed J: 0 .. seg0-1 (all <= I)
        if nj == 0:
            for j in range(n):
                row[j] = np.nan
            continue
        z = np.empty(nj)
        qi = qs[b, h, i]
        mx = -np.inf
        for j in range(nj):
            kj = ks[b, h, j]
            acc = 0.0
            for d in range(D):
                acc += qi[d] * kj[d]
            z[j] = acc * inv_b2_sqrt_d
            mx = max(mx, z[j])
        tot = 0.0
        for j in range(nj):
            z[j] = math.exp(z[j] - mx)
            tot += z[j]
        inv = 1.0 / tot
        for j in range(nj):
            row[j] = z[j] * inv
        for j in range(nj, n):
            row[j] = 0.0


@register(OP, "numba")
def pbs_score(q: Any, k_perm: Any, block_size: int, segment_size: int, *,
              out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """PBS block probabilities ``(p,)`` ``[B, Hq, n, n]`` on permuted keys (reference
    :func:`refattn.methods.pbs.pbs_block_scores`). q ``[B, Hq, L, D]``; ``k_perm
    [B, Hq, L, D]`` (the keys of each query head, permuted). NaN rows where no block is
    allowed. Float64 output without ``out=``; ``out`` may hold a float32 or float64 array."""
    qf, kf = _as_float(q, "q"), _as_float(k_perm, "k_perm")
    if qf.shape != kf.shape:
        raise InputError(f"k_perm: expected the shape of q {qf.shape} (one permuted key set "
                         f"per query head, L_k == L_q), got {kf.shape}")
    if qf.dtype != kf.dtype:
        qf, kf = qf.astype(np.float64), kf.astype(np.float64)
    b, s = int(block_size), int(segment_size)
    if b < 1 or s < b or s % b:
        raise InputError(f"segment_size: expected a positive multiple of block_size={b}, "
                         f"got {s}")
    B, H, L, D = qf.shape
    n = num_blocks(L, b)
    shape = (B, H, n, n)
    if out is None:
        p = np.empty(shape, np.float64)
    else:
        out = tuple(out)
        if len(out) != 1:
            raise InputError(f"{OP}: out= must hold 1 array, got {len(out)}")
        p = out[0]
        if not isinstance(p, np.ndarray) or p.shape != shape or p.dtype.kind != "f" \
                or p.dtype.itemsize < 4 or not p.flags.c_contiguous:
            raise InputError(f"{OP}: out[0] must be a C-contiguous float32/float64 array of "
                             f"shape {shape}, got {getattr(p, 'dtype', type(p))} "
                             f"{getattr(p, 'shape', '')}")
    if n == 0:
        return (p,)
    qs, ks = block_sums(qf, b), block_sums(kf, b)
    _pbs_rows(qs, ks, s // b, 1.0 / (b * b * math.sqrt(D)), p)
    return (p,)
