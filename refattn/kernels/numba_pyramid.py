"""Numba CPU kernel: pyramid attention forward (op ``pyramid_attention_fwd``, PSA).

Implements :func:`refattn.reference.pyramid.pyramid_attention_forward` (same arguments plus
``out=``): q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]``, ``levels``
int ``[B|1, Hq|1, Qb, Kb]`` in ``{0} U divisors(block_k)``. For query block ``I`` and key
block ``J`` at level ``l > 0`` the keys/values are the means of ``l`` consecutive tokens of
the replicate-padded sequence, with logit ``s q.kbar + ln l``; one softmax over all kept
tokens; level-1 keys ``>= Sk`` masked; causal: a group is visible iff its last key
``<= i + Sk - Sq``; a row that keeps nothing gives 0 and LSE ``-inf``.

``kernel="new"`` (``psa_kernel.py``, tiles of ``tile_n`` lanes): per level 1, 2, 4, 8 a
block with ``P = block_k / l >= tile_n`` pooled rows contributes its rows
``[0, (P // tile_n) tile_n)``; with ``P < tile_n`` every block contributes its ``P`` rows and
every pair of blocks the rows ``2P .. min(tile_n, Kb P) - 1`` of the level's pooled array once
more (the tile lanes the official merge loop leaves unmapped); levels are validated on the
host by :func:`refattn.reference.pyramid.check_new_kernel_levels`.

Algorithm: the pooled keys/values of every level in use are built once on the host (NumPy,
float64, one table per level concatenated along the sequence axis). One ``prange`` task per
(batch, query head, query block) gathers the pooled tokens its row of ``levels`` keeps into
contiguous buffers (with their ``ln l`` bias and last key index), computes the logits with
one ``np.dot``, the softmax row by row (masked entries skipped by index, never ``-inf``
arithmetic), and ``P V`` with a second ``np.dot``. Each task owns its output rows, so there
are no write races. Numerics: float64 throughout (the op has no emulated low-precision
baseline, so the tolerance rule compares against ``eps(dtype) * max|ref|``); outputs are
stored as float32 (or into the dtype of the ``out=`` arrays).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange

from ..core.errors import InputError
from ..core.registry import register
from ..reference.pyramid import check_kernel, check_new_kernel_levels
from ._blas import single_threaded_blas
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS


def _as64(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 4:
        raise InputError(f"{name}: expected a 4-d array [B, H, S, D], got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.float64)


def _pooled_tables(x: np.ndarray, block_k: int, used: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Replicate-pad ``x [B, H, Sk, D]`` to a multiple of ``block_k``; concatenate the
    mean-pooled sequences of every level in ``used`` along axis 2. Returns the table and the
    start offset of each level's part (int64, indexed by position in ``used``)."""
    S = x.shape[2]
    nkb = -(-S // block_k)
    pad = nkb * block_k - S
    xp = np.concatenate([x, np.repeat(x[:, :, -1:], pad, axis=2)], axis=2) if pad else x
    parts, offs, at = [], [], 0
    for lvl in used:
        n = nkb * block_k // lvl
        parts.append(xp.reshape(x.shape[0], x.shape[1], n, lvl, x.shape[3]).mean(axis=3))
        offs.append(at)
        at += n
    return np.ascontiguousarray(np.concatenate(parts, axis=2)), np.asarray(offs, np.int64)


@njit(**NJIT_HELPER_OPTIONS)
def _gather_rows(kt: np.ndarray, vt: np.ndarray, b: int, g: int, start: int, row0: int,
                 count: int, lvl: int, stop: int, kbuf: np.ndarray, vbuf: np.ndarray,
                 bias: np.ndarray, last: np.ndarray, n: int) -> int:  # pragma: no cover
    """Append pooled rows ``row0 .. row0 + count - 1`` of level ``lvl`` (its table part
    starts at ``start``) to the buffers at ``n``, with bias ``ln lvl`` and last key index
    ``(row + 1) lvl - 1``; stop at the first row whose first key is ``>= stop``. Returns the
    new fill."""
    lb_ = math.log(lvl)
    for r in range(row0, row0 + count):
        if r * lvl >= stop:
            break
        kbuf[n, :] = kt[b, g, start + r, :]
        vbuf[n, :] = vt[b, g, start + r, :]
        bias[n] = lb_
        last[n] = (r + 1) * lvl - 1
        n += 1
    return n


@njit(**NJIT_OPTIONS)
def _pyramid_kernel(q: np.ndarray, kt: np.ndarray, vt: np.ndarray, levels: np.ndarray,
                    slot: np.ndarray, offs: np.ndarray, Sk: int, block_q: int, block_k: int,
                    causal: bool, scale: float, new: bool, tile_n: int, out: np.ndarray,
                    lse: np.ndarray) -> None:
    B, Hq, Sq, D = q.shape
    Hkv, Dv = kt.shape[1], vt.shape[3]
    G = Hq // Hkv
    nqb = levels.shape[2]
    nkb = levels.shape[3]
    Lm, Hm = levels.shape[0], levels.shape[1]
    off = Sk - Sq
    kpad = nkb * block_k
    cap = kpad + (nkb // 2) * tile_n if new else kpad     # new kernel: + repeated lanes
    for task in prange(B * Hq * nqb):
        I = task % nqb
        h = (task // nqb) % Hq
        b = task // (nqb * Hq)
        g = h // G
        lb = b if Lm > 1 else 0
        lh = h if Hm > 1 else 0
        r0 = I * block_q
        nr = min(block_q, Sq - r0)
        # gather the kept pooled tokens of this query block
        kbuf = np.empty((cap, D), np.float64)
        vbuf = np.empty((cap, Dv), np.float64)
        bias = np.empty(cap, np.float64)
        last = np.empty(cap, np.int64)
        n = 0
        if not new:
            for J in range(nkb):
                lvl = levels[lb, lh, I, J]
                if lvl <= 0:
                    continue
                per = block_k // lvl
                n = _gather_rows(kt, vt, b, g, offs[slot[lvl]], J * per, per, lvl,
                                 Sk if lvl == 1 else kpad, kbuf, vbuf, bias, last, n)
        else:
            for li in range(4):                      # levels 1, 2, 4, 8 (the walk's order)
                lvl = 1 << li
                per = block_k // lvl
                span = per // tile_n * tile_n if per >= tile_n else per
                cnt = 0
                for J in range(nkb):
                    if levels[lb, lh, I, J] != lvl:
                        continue
                    cnt += 1
                    n = _gather_rows(kt, vt, b, g, offs[slot[lvl]], J * per, span, lvl,
                                     Sk if lvl == 1 else kpad, kbuf, vbuf, bias, last, n)
                if cnt > 0 and per < tile_n:         # lanes [2P, tile_n): rows 2P.., per pair
                    for _ in range(cnt // 2):
                        n = _gather_rows(kt, vt, b, g, offs[slot[lvl]], 2 * per,
                                         min(tile_n, nkb * per) - 2 * per, lvl, kpad,
                                         kbuf, vbuf, bias, last, n)
        if n == 0:
            for t in range(nr):
                for d in range(Dv):
                    out[b, h, r0 + t, d] = 0.0
                lse[b, h, r0 + t] = -np.inf
            continue
        qs = np.ascontiguousarray(q[b, h, r0:r0 + nr])
        s = np.empty((nr, n), np.float64)
        np.dot(qs, kbuf[:n].T, s)
        p = np.zeros((nr, n), np.float64)
        msum = np.empty(nr, np.float64)
        lsum = np.zeros(nr, np.float64)
        for t in range(nr):
            lim = r0 + t + off                       # last visible key index when causal
            mx = -np.inf
            seen = False
            for u in range(n):
                if causal and last[u] > lim:
                    continue
                x = s[t, u] * scale + bias[u]
                if not seen or x > mx:
                    mx = x
                    seen = True
            msum[t] = mx
            if not seen:
                continue
            tot = 0.0
            for u in range(n):
                if causal and last[u] > lim:
                    continue
                e = math.exp(s[t, u] * scale + bias[u] - mx)
                p[t, u] = e
                tot += e
            lsum[t] = tot
        pv = np.empty((nr, Dv), np.float64)
        np.dot(p, vbuf[:n], pv)
        for t in range(nr):
            if lsum[t] == 0.0:
                for d in range(Dv):
                    out[b, h, r0 + t, d] = 0.0
                lse[b, h, r0 + t] = -np.inf
            else:
                inv = 1.0 / lsum[t]
                for d in range(Dv):
                    out[b, h, r0 + t, d] = pv[t, d] * inv
                lse[b, h, r0 + t] = msum[t] + math.log(lsum[t])


@register("pyramid_attention_fwd", "numba")
def pyramid_attention_forward(q: Any, k: Any, v: Any, levels: Any, block_q: int, block_k: int,
                              causal: bool = False, scale: float | None = None,
                              kernel: str = "legacy", tile_n: int = 32, *,
                              out: tuple[np.ndarray, np.ndarray] | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Numba pyramid attention forward; arguments as the reference. Returns ``out``
    ``[B, Hq, Sq, Dv]`` and ``lse [B, Hq, Sq]`` (float32 unless ``out=`` is given)."""
    q64, k64, v64 = _as64(q, "q"), _as64(k, "k"), _as64(v, "v")
    B, Hq, Sq, D = q64.shape
    Hkv, Sk, Dv = k64.shape[1], k64.shape[2], v64.shape[3]
    if Hq % Hkv or k64.shape[0] != B or k64.shape[3] != D or v64.shape[:3] != k64.shape[:3]:
        raise InputError(f"q {q64.shape}, k {k64.shape}, v {v64.shape}: inconsistent shapes")
    block_q, block_k = int(block_q), int(block_k)
    kernel, tile_n = check_kernel(kernel, tile_n)
    lv = np.asarray(levels)
    while lv.ndim < 4:
        lv = lv[None]
    nqb, nkb = -(-Sq // block_q), -(-Sk // block_k)
    if lv.shape[2:] != (nqb, nkb) or lv.shape[0] not in (1, B) or lv.shape[1] not in (1, Hq):
        raise InputError(f"levels: expected [B|1, Hq|1, {nqb}, {nkb}], got {lv.shape}")
    lv = np.ascontiguousarray(lv, dtype=np.int64)
    used = sorted(int(x) for x in np.unique(lv) if x > 0)
    if any(x < 0 for x in np.unique(lv)) or any(block_k % x for x in used):
        raise InputError(f"levels: every level must be 0 or a divisor of block_k={block_k}")
    if kernel == "new":
        check_new_kernel_levels(lv, block_k, tile_n)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if used:
        kt, offs = _pooled_tables(k64, block_k, used)
        vt, _ = _pooled_tables(v64, block_k, used)
    else:
        kt, vt, offs = np.zeros((B, Hkv, 1, D)), np.zeros((B, Hkv, 1, Dv)), np.zeros(1, np.int64)
    slot = np.zeros(max(used + [1]) + 1, np.int64)
    for i, lvl in enumerate(used):
        slot[lvl] = i
    if out is None:
        out = (np.empty((B, Hq, Sq, Dv), np.float32), np.empty((B, Hq, Sq), np.float32))
    o, l = out
    if o.shape != (B, Hq, Sq, Dv) or l.shape != (B, Hq, Sq):
        raise InputError(f"out: expected shapes {(B, Hq, Sq, Dv)} and {(B, Hq, Sq)}, got "
                         f"{o.shape} and {l.shape}")
    with single_threaded_blas():
        _pyramid_kernel(q64, kt, vt, lv, slot, offs, Sk, block_q, block_k, bool(causal), scale,
                        kernel == "new", tile_n, o, l)
    return o, l
