"""Numba CPU kernels: dense and block-sparse attention forward (op ``attention_fwd``).

Implements :func:`refattn.reference.attention.attention_forward` (same signature, same
conventions): q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]``; query head
``h`` reads kv head ``h // (Hq // Hkv)``; causal is bottom-right aligned (query ``i`` sees
key ``j`` iff ``j <= i + Sk - Sq``); a row that sees no key gives output 0 and LSE ``-inf``.

Algorithm (FlashAttention-style, no ``Sq x Sk`` array is ever allocated):

* One ``prange`` task per (batch, query head, query tile); each task owns the output rows
  of its tile, so there are no write races. Dense tiles are ``TILE_Q`` rows; block-sparse
  tiles hold ``ceil(GROUP_ROWS / block_q)`` query blocks of the mask, so that per-token
  routing (``block_q = 1``, MoBA) still gives matrix-sized work.
* A task walks the union of the key blocks selected by its query blocks, ascending (a merge
  of the canonical index lists). For each key block it gathers the query rows that
  selected it and that see at least one of its keys under causality (with bottom-right
  alignment the visible keys of a row in a block are a prefix, the visible rows a suffix),
  computes ``S = Q K^T`` with ``np.dot`` on contiguous float32 tiles, and updates a running
  max ``m``, sum ``l`` and accumulator per row (online softmax). Dense attention is the same
  walk over all key blocks up to the causal diagonal; key tiles that no row of the task
  can see are never loaded.
* Numerics: inputs are converted once to float32 (fp16, bf16 and fp64 too); scores,
  probabilities, the running max/sum and the ``P V`` accumulator are float32 (``exp`` by
  :func:`exp_f32`, a vectorizable float32 polynomial of ~2 ulp). ``np.dot``
  (BLAS sgemm) accumulates each tile in float32; tiles are combined in float32 by the
  online-softmax rescaling. ``-inf`` never enters the arithmetic: masked keys are skipped
  by index, and "no key seen yet" is the branch ``l == 0``.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import njit, prange

from ..core.blockmask import BlockMask, prepare_mask
from ..core.errors import InputError
from ..core.layout import AttnShape
from ..core.registry import register
from ._blas import single_threaded_blas
from ._fmath import exp_f32  # noqa: F401  (shared float32 exp, re-exported)
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS

TILE_Q = 128      # dense: query rows per task
TILE_K = 64       # dense: keys per tile
GROUP_ROWS = 64   # block-sparse: a task holds at least this many query rows (if Sq allows)


# ----------------------------------------------------------------------------- host side
class Problem(NamedTuple):
    """Float32 C-contiguous inputs and the tiling of one attention call."""

    q: np.ndarray            # float32 [B, Hq, Sq, D]
    k: np.ndarray            # float32 [B, Hkv, Sk, D]
    v: np.ndarray            # float32 [B, Hkv, Sk, Dv]
    shape: AttnShape
    scale: float
    causal: bool
    dense: bool
    block_q: int             # query rows per query block (TILE_Q when dense)
    block_k: int             # keys per key block (TILE_K when dense)
    group: int               # query blocks per forward/dq task
    mask: BlockMask | None   # expanded to query heads ("q" kind), or None when dense
    kv_num: np.ndarray       # int32 [Bm, Hm, Qb]     (dummy [1,1,1] when dense)
    kv_idx: np.ndarray       # int32 [Bm, Hm, Qb, Kb] (dummy [1,1,1,1] when dense)


def to_f32(x: Any, name: str) -> np.ndarray:
    """``x`` as a C-contiguous float32 array (one conversion; bf16/fp16/fp64 upcast or cast)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fV" or (a.dtype.kind == "V" and str(a.dtype) != "bfloat16"):
        raise InputError(f"{name}: expected a float array (fp16, bf16, fp32, fp64), got {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> AttnShape:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise InputError(f"{name}: expected a 4-d array [B, H, S, D], got shape {x.shape}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise InputError(f"k: expected [B={B}, Hkv, Sk, D={D}], got {k.shape}")
    if v.shape[:3] != k.shape[:3]:
        raise InputError(f"v: expected [B, Hkv, Sk] = {k.shape[:3]} leading dims, got {v.shape}")
    if min(q.shape) < 1 or min(k.shape) < 1 or v.shape[3] < 1:
        raise InputError(f"empty dimension in q {q.shape}, k {k.shape} or v {v.shape}")
    if Hq % k.shape[1]:
        raise InputError(f"GQA: number of query heads ({Hq}) must be a multiple of the number "
                         f"of kv heads ({k.shape[1]})")
    return AttnShape(B, Hq, k.shape[1], Sq, k.shape[2], D, v.shape[3])


def prepare(q: Any, k: Any, v: Any, mask: Any, causal: bool, scale: float | None,
            op: str) -> Problem:
    """Validate, convert to float32 once, and choose the tiling (shared with backward)."""
    q32, k32, v32 = to_f32(q, "q"), to_f32(k, "k"), to_f32(v, "v")
    shape = _check_shapes(q32, k32, v32)
    scale = 1.0 / math.sqrt(shape.head_dim) if scale is None else float(scale)
    if mask is not None and not isinstance(mask, BlockMask):
        if hasattr(mask, "token_rows"):
            raise InputError(f"{op}: the numba backend runs block masks only; a token-level "
                             f"mask ({type(mask).__name__}) needs backend='numpy'")
        raise InputError(f"mask: expected a BlockMask or None, got {type(mask).__name__}")
    if mask is None:
        return Problem(q32, k32, v32, shape, scale, bool(causal), True, TILE_Q, TILE_K, 1, None,
                       np.zeros((1, 1, 1), np.int32), np.full((1, 1, 1, 1), -1, np.int32))
    m = prepare_mask(mask, shape)
    num, idx = m.to_indices()
    group = max(1, GROUP_ROWS // m.block_q)
    return Problem(q32, k32, v32, shape, scale, bool(causal), False, m.block_q, m.block_k, group,
                   m, np.ascontiguousarray(num, np.int32), np.ascontiguousarray(idx, np.int32))


def out_buffers(out: tuple[np.ndarray, ...] | None, shapes: tuple[tuple[int, ...], ...],
                names: tuple[str, ...]) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Kernel targets for ``out=``: the given arrays when float32 C-contiguous, else fresh
    scratch arrays that are copied into them afterwards (see :func:`finish_out`)."""
    if out is None:
        return [np.empty(s, np.float32) for s in shapes], [None] * len(shapes)
    if not isinstance(out, (tuple, list)) or len(out) != len(shapes):
        raise InputError(f"out: expected a tuple of {len(shapes)} arrays {names}")
    targets, user = [], []
    for a, s, name in zip(out, shapes, names, strict=True):
        if not isinstance(a, np.ndarray) or a.shape != s:
            raise InputError(f"out[{name}]: expected an array of shape {s}, got "
                             f"{getattr(a, 'shape', type(a).__name__)}")
        direct = a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
        targets.append(a if direct else np.empty(s, np.float32))
        user.append(a)
    return targets, user


def finish_out(targets: list[np.ndarray], user: list[np.ndarray | None]) -> tuple[np.ndarray, ...]:
    """Copy scratch targets into the caller's ``out=`` arrays; return what the op returns."""
    res = []
    for t, u in zip(targets, user, strict=True):
        if u is not None and u is not t:
            u[...] = t
        res.append(t if u is None else u)
    return tuple(res)


# ----------------------------------------------------------------------- kernel helpers
@njit(**NJIT_HELPER_OPTIONS)
def task_plan(dense: bool, causal: bool, kv_num: np.ndarray, kv_idx: np.ndarray, bm: int,
              hm: int, qb0: int, qb1: int, nkb: int, block_q: int, block_k: int, Sq: int,
              off: int, kbs: np.ndarray, sel: np.ndarray) -> int:
    """Key blocks to visit for query blocks ``[qb0, qb1)``: writes them ascending into
    ``kbs[:nu]`` and, in ``sel[u, gi]``, whether query block ``qb0 + gi`` selected block
    ``kbs[u]``. Dense: every key block up to the causal diagonal of the last row. Returns nu."""
    ng = qb1 - qb0
    if dense:
        nk = nkb
        if causal:
            last = min(qb1 * block_q, Sq) - 1 + off
            nk = 0 if last < 0 else min(nkb, last // block_k + 1)
        for u in range(nk):
            kbs[u] = u
            for gi in range(ng):
                sel[u, gi] = True
        return nk
    ptr = np.zeros(ng, np.int64)
    nu = 0
    while True:
        best = nkb
        for gi in range(ng):
            if ptr[gi] < kv_num[bm, hm, qb0 + gi]:
                c = kv_idx[bm, hm, qb0 + gi, ptr[gi]]
                if c < best:
                    best = c
        if best == nkb:
            return nu
        kbs[nu] = best
        for gi in range(ng):
            hit = ptr[gi] < kv_num[bm, hm, qb0 + gi] and kv_idx[bm, hm, qb0 + gi, ptr[gi]] == best
            sel[nu, gi] = hit
            if hit:
                ptr[gi] += 1
        nu += 1


@njit(**NJIT_HELPER_OPTIONS)
def rows_for(sel: np.ndarray, u: int, ng: int, qb0: int, block_q: int, Sq: int, k0: int,
             causal: bool, off: int, rows: np.ndarray) -> int:
    """Global query rows of the selecting query blocks that see key ``k0`` or later (all
    rows when not causal), ascending into ``rows``; returns their count."""
    n = 0
    for gi in range(ng):
        if sel[u, gi]:
            rs = (qb0 + gi) * block_q
            re = min(rs + block_q, Sq)
            if causal:
                rs = max(rs, k0 - off)
            for i in range(rs, re):
                rows[n] = i
                n += 1
    return n


@njit(**NJIT_HELPER_OPTIONS)
def load_rows(src: np.ndarray, rows: np.ndarray, n: int, buf: np.ndarray) -> np.ndarray:
    """Rows ``rows[:n]`` of the 2-d ``src`` as a contiguous ``[n, cols]`` array: a view when
    they are consecutive, else a copy into ``buf``."""
    if rows[n - 1] - rows[0] == n - 1:
        return src[rows[0]:rows[0] + n]
    out = buf[:n]
    for r in range(n):
        out[r, :] = src[rows[r], :]
    return out


@njit(**NJIT_HELPER_OPTIONS)
def visible_keys(i: int, k0: int, kn: int, causal: bool, off: int) -> int:
    """How many keys of the block ``[k0, k0+kn)`` query ``i`` sees (a prefix of the block)."""
    if causal:
        return max(0, min(kn, i + off - k0 + 1))
    return kn


@njit(**NJIT_HELPER_OPTIONS)
def _softmax_update(s: np.ndarray, p: np.ndarray, n: int, kn: int, rows: np.ndarray, r0: int,
                    k0: int, causal: bool, off: int, scale: float, m: np.ndarray,
                    l: np.ndarray, acc: np.ndarray) -> None:
    """Online softmax for one key tile: ``p[r, j] = exp(scale*s[r, j] - m_new)`` on visible
    keys (0 elsewhere); rescale ``l`` and ``acc`` of task-local row ``rows[r] - r0``."""
    for r in range(n):
        t = rows[r] - r0
        lim = visible_keys(rows[r], k0, kn, causal, off)
        mx = np.float32(s[r, 0] * scale)
        for j in range(1, lim):
            x = np.float32(s[r, j] * scale)
            if x > mx:
                mx = x
        if l[t] == 0.0:          # first visible key of this row: nothing to rescale
            mnew = mx
            alpha = np.float32(0.0)
        else:
            mnew = max(m[t], mx)
            alpha = exp_f32(m[t] - mnew)
        tot = np.float32(0.0)
        for j in range(lim):
            e = exp_f32(np.float32(s[r, j] * scale) - mnew)
            p[r, j] = e
            tot += e
        for j in range(lim, kn):
            p[r, j] = 0.0
        l[t] = l[t] * alpha + tot
        m[t] = mnew
        if alpha != 1.0:
            for d in range(acc.shape[1]):
                acc[t, d] *= alpha


@njit(**NJIT_HELPER_OPTIONS)
def tile_task(task: int, ntile: int, Hq: int, group: int, nqb: int, block_q: int, Sq: int,
              Bm: int, Hm: int) -> tuple[int, int, int, int, int, int, int, int]:
    """Decode a flattened (batch, head, tile of ``group`` query blocks) task index of the
    forward and dq kernels: ``b, h``, the mask's broadcast indices ``bm, hm``, the tile's
    query blocks ``[qb0, qb1)`` and rows ``[r0, r0 + nr)``."""
    tile = task % ntile
    h = (task // ntile) % Hq
    b = task // (ntile * Hq)
    qb0 = tile * group
    qb1 = min(qb0 + group, nqb)
    r0 = qb0 * block_q
    return (b, h, b if Bm > 1 else 0, h if Hm > 1 else 0, qb0, qb1, r0,
            min(qb1 * block_q, Sq) - r0)


# ------------------------------------------------------------------------------ kernel
@njit(**NJIT_OPTIONS)
def _fwd_kernel(q: np.ndarray, k: np.ndarray, v: np.ndarray, kv_num: np.ndarray,
                kv_idx: np.ndarray, dense: bool, causal: bool, scale: float, block_q: int,
                block_k: int, group: int, out: np.ndarray, lse: np.ndarray) -> None:
    """Fill ``out [B,Hq,Sq,Dv]`` and ``lse [B,Hq,Sq]`` (float32); see the module docstring."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    off = Sk - Sq
    nqb = (Sq + block_q - 1) // block_q
    nkb = (Sk + block_k - 1) // block_k
    ntile = (nqb + group - 1) // group
    Bm, Hm = kv_num.shape[0], kv_num.shape[1]
    for task in prange(B * Hq * ntile):
        b, h, bm, hm, qb0, qb1, r0, nr = tile_task(task, ntile, Hq, group, nqb, block_q, Sq,
                                                   Bm, Hm)
        g = h // G
        ng = qb1 - qb0
        kbs = np.empty(nkb, np.int64)
        sel = np.empty((nkb, ng), np.bool_)
        nu = task_plan(dense, causal, kv_num, kv_idx, bm, hm, qb0, qb1, nkb, block_q, block_k,
                       Sq, off, kbs, sel)
        m = np.zeros(nr, np.float32)
        l = np.zeros(nr, np.float32)
        acc = np.zeros((nr, Dv), np.float32)
        rows = np.empty(nr, np.int64)
        qbuf = np.empty((nr, D), np.float32)
        sbuf = np.empty(nr * block_k, np.float32)
        pbuf = np.empty(nr * block_k, np.float32)
        pvbuf = np.empty(nr * Dv, np.float32)
        qbh = q[b, h]
        for u in range(nu):
            k0 = kbs[u] * block_k
            kn = min(block_k, Sk - k0)
            n = rows_for(sel, u, ng, qb0, block_q, Sq, k0, causal, off, rows)
            if n == 0:
                continue
            qs = load_rows(qbh, rows, n, qbuf)
            s = sbuf[:n * kn].reshape((n, kn))
            np.dot(qs, k[b, g, k0:k0 + kn].T, s)
            p = pbuf[:n * kn].reshape((n, kn))
            _softmax_update(s, p, n, kn, rows, r0, k0, causal, off, scale, m, l, acc)
            pv = pvbuf[:n * Dv].reshape((n, Dv))
            np.dot(p, v[b, g, k0:k0 + kn], pv)
            for r in range(n):
                t = rows[r] - r0
                for d in range(Dv):
                    acc[t, d] += pv[r, d]
        for t in range(nr):
            i = r0 + t
            if l[t] == 0.0:      # the row sees no key: out 0, lse -inf (explicit branch)
                for d in range(Dv):
                    out[b, h, i, d] = 0.0
                lse[b, h, i] = -np.inf
            else:
                inv = np.float32(1.0) / l[t]
                for d in range(Dv):
                    out[b, h, i, d] = acc[t, d] * inv
                lse[b, h, i] = m[t] + np.log(l[t])


# ------------------------------------------------------------------------ registration
@register("attention_fwd", "numba")
def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any = None,
                      causal: bool = False, scale: float | None = None, *,
                      out: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Numba attention forward; arguments as the reference ``attention_forward``.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]`` (fp16, bf16, fp32 or
    fp64); ``mask`` None (dense) or a :class:`BlockMask`. Returns ``out float32
    [B, Hq, Sq, Dv]`` and ``lse float32 [B, Hq, Sq]``, written into ``out=`` when given.
    """
    pb = prepare(q, k, v, mask, causal, scale, "attention_fwd")
    sh = pb.shape
    targets, user = out_buffers(out, ((sh.batch, sh.q_heads, sh.q_len, sh.v_dim),
                                      (sh.batch, sh.q_heads, sh.q_len)), ("out", "lse"))
    with single_threaded_blas():
        _fwd_kernel(pb.q, pb.k, pb.v, pb.kv_num, pb.kv_idx, pb.dense, pb.causal,
                    np.float32(pb.scale), pb.block_q, pb.block_k, pb.group, targets[0], targets[1])
    o, l = finish_out(targets, user)
    return o, l


__all__ = ["attention_forward", "prepare", "Problem", "to_f32", "out_buffers", "finish_out"]
