"""Numba CPU kernels of the attention-based KV-cache token scores (:mod:`refattn.kvcache`).

Every score below is a column sum of a causal softmax over some rows of the prompt, so
one kernel, :func:`attention_colsum`, does the work and each op is a thin wrapper around it
that takes exactly its reference's arguments plus ``out=``:

* ``h2o_score`` (:func:`refattn.kvcache.h2o.h2o_score`): all rows, all columns, per query
  head ``[B, Hq, Sk]``;
* ``vatp_score`` (:func:`refattn.kvcache.vatp.vatp_score`): all rows (``mode="h2o"``) or the
  last 400 rows divided by 400 (``"scissorhands"``), times ``||v_j||_1``, sinks forced;
* ``snapkv_score`` (:func:`refattn.kvcache.snapkv.snapkv_score`): the last ``W`` rows over the
  prefix ``j < L - W`` (``vote``), then 1-D avg/max pooling (and the GQA mean for
  ``head_mode="kv"``);
* ``kvpress_snapkv_score``, ``kvpress_tova_score``, ``kvpress_observed_attention_score``
  (:mod:`refattn.kvcache.presses`): window mean + avg pooling + GQA mean + ``max + 1`` pad;
  the last row averaged over all query heads; all rows divided by ``L - j`` + GQA mean.

Shapes: q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]`` (query head ``h`` reads kv head
``h // (Hq // Hkv)``), causal bottom-right aligned (row ``i`` sees key ``j`` iff
``j <= i + Sk - Sq``; a row that sees no key contributes nothing, as the reference's zero row).

Algorithm of :func:`attention_colsum`: one ``prange`` task per (batch, query head, chunk);
a chunk owns the row tiles ``c, c + nchunk, c + 2 nchunk, ...`` (interleaved, so that the
causal work is balanced) and its own float64 row ``partial[b, h, c, :]`` of column sums (no
write races); the host adds the chunks. Per tile of up to 64 rows the logits of every key
the tile can see are one ``np.dot`` (BLAS, single-threaded while the kernel runs) into a
task-local ``[R, nk]`` buffer; then per row: maximum, ``exp``, sum, and the normalised
probabilities are added to the column sums. No ``Sq x Sk`` array is allocated: a worker
holds ``R * Sk`` logits plus, on the full-prompt path, a float64 copy of its keys
(``8 Sk D`` bytes). Small problems (below :data:`SERIAL_WORK`) run a serial twin of each
kernel, because waking the worker threads costs more than they take.

Numerics (inputs: fp32 and fp64 used as they are, fp16/bf16 converted to fp32 once):

* full-prompt ops (H2O, VATP, observed attention): the keys and query rows are converted
  to float64 inside the kernel and the logits are a float64 dgemm;
* window ops (SnapKV, kvpress SnapKV, TOVA: ``W`` rows): the logits are one gemm in the
  inputs' precision (fp32 sgemm, fp32 accumulation, for fp32/fp16/bf16 inputs), straight
  from k: a float64 copy of every key would cost more memory traffic than the whole op;
* everything after the logits is float64: ``exp`` by :func:`exp_f64` (a vectorisable
  polynomial of about 1 ulp; there is no SVML here), row sums, column sums, pooling.

On the registry cases (``refattn/cases/kvcache.py``, two seeds) the largest error is 0.22
of the bound of ``refattn.check.compare_arrays`` (``8 eps32 max|ref|``: no emulated
baseline) for SnapKV's votes (fp32 logits) and below 0.06 of it for the other ops.
Without ``out=`` the kernels return float64 arrays (as the references), so rankings built
on them agree with the reference's except at near-ties; with ``out=`` the result is cast
into the caller's arrays. ``-inf`` never enters the arithmetic: masked keys are skipped by
index.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import get_num_threads, njit, prange

from ..core.errors import InputError
from ..core.layout import default_scale
from ..core.registry import register
from ._blas import single_threaded_blas
from .fastexp import exp_f64
from .flags import NJIT_HELPER_OPTIONS, NJIT_OPTIONS

TILE_ROWS = 64            # query rows per tile (one gemm each)
TILE_ELEMS = 1 << 22      # cap of the per-worker logit buffer (float64 elements, 32 MiB)
TASKS_PER_THREAD = 4      # chunks per (batch, head) aim at this many tasks per worker
# Below this much work (multiply-adds, or elements for the light kernels) the serial twin
# of a kernel runs: waking the worker threads of a parallel region costs ~1-8 ms on a
# shared 2-core machine (OpenMP layer; measured here), more than such calls take serially.
SERIAL_WORK = 1 << 24
SCISSORHANDS_ROWS = 400   # VATP scissorhands: the prefill score uses the last 400 rows
# float32 max, the official finfo(dtype).max of VATP's sink tokens; must equal
# refattn.kvcache.h2o.SINK_SCORE (tests/kvcache/test_kv_kernels.py pins it).
SINK_SCORE = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------- host side
def _inputs(x: Any, name: str, ndim: int) -> np.ndarray:
    """``x`` C-contiguous as float64 when it is float64 (or integer), else float32 (exact for
    fp16, bf16 and fp32): no copy for contiguous fp32/fp64 arrays; the kernels convert the rows they use
    to float64 themselves (converting a whole fp32 q and k up front costs more than TOVA's
    or SnapKV's entire kernel)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" and str(a.dtype) != "bfloat16":
        raise InputError(f"{name}: expected a float array (fp16, bf16, fp32, fp64), got {a.dtype}")
    if a.ndim != ndim:
        raise InputError(f"{name}: expected a {ndim}-d array, got shape {a.shape}")
    exact64 = a.dtype == np.float64 or a.dtype.kind in "iu"
    return np.ascontiguousarray(a, dtype=np.float64 if exact64 else np.float32)


def _check_qk(q: Any, k: Any) -> tuple[np.ndarray, np.ndarray]:
    """q ``[B, Hq, Sq, D]`` and k ``[B, Hkv, Sk, D]`` (both float32 or both float64, see
    :func:`_inputs`) with the GQA checks."""
    q64, k64 = _inputs(q, "q", 4), _inputs(k, "k", 4)
    if q64.dtype != k64.dtype:
        q64, k64 = q64.astype(np.float64), k64.astype(np.float64)
    B, Hq, Sq, D = q64.shape
    if k64.shape[0] != B or k64.shape[3] != D:
        raise InputError(f"k: expected [B={B}, Hkv, Sk, D={D}], got {k64.shape}")
    if min(q64.shape) < 1 or min(k64.shape) < 1:
        raise InputError(f"empty dimension in q {q64.shape} or k {k64.shape}")
    if Hq % k64.shape[1]:
        raise InputError(f"GQA: {Hq} query heads are not a multiple of {k64.shape[1]} kv heads")
    return q64, k64


def _check_window(q: np.ndarray, k: np.ndarray, window: int) -> None:
    """The checks of ``refattn.kvcache._common.window_attention``."""
    if q.shape[2] != k.shape[2]:
        raise InputError(f"q: the observation window needs prefill inputs with Sq == Sk, got "
                         f"Sq = {q.shape[2]}, Sk = {k.shape[2]}")
    if not 1 <= window <= q.shape[2]:
        raise InputError(f"window_size: must lie in [1, {q.shape[2]}] (the sequence length), "
                         f"got {window}")


def _group_mean(x: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """``[B, Hq, N] -> [B, Hkv, N]``: mean over the query heads of each GQA group."""
    B, H = x.shape[:2]
    return x.reshape((B, num_kv_heads, H // num_kv_heads) + x.shape[2:]).mean(axis=2)


def _pad_max(scores: np.ndarray, before: int, after: int) -> np.ndarray:
    """``F.pad(scores, (before, after), value=scores.max() + 1)`` (global maximum)."""
    fill = float(scores.max()) + 1.0
    return np.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(before, after)], constant_values=fill)


def _write(out: Any, values: tuple[np.ndarray, ...], names: tuple[str, ...]
           ) -> tuple[np.ndarray, ...]:
    """The op's outputs: ``values`` themselves (float64) without ``out=``, else cast into the
    caller's preallocated arrays (every element written)."""
    if out is None:
        return values
    if not isinstance(out, (tuple, list)) or len(out) != len(values):
        raise InputError(f"out: expected a tuple of {len(values)} arrays {names}, "
                         f"got {type(out).__name__}")
    for o, v, name in zip(out, values, names, strict=True):
        if not isinstance(o, np.ndarray) or o.shape != v.shape:
            raise InputError(f"out[{name}]: expected an array of shape {v.shape}, got "
                             f"{getattr(o, 'shape', type(o).__name__)}")
        with np.errstate(over="ignore"):      # VATP's sink score is inf in a float32 output
            o[...] = v
    return tuple(out)


# ----------------------------------------------------------------------- kernel helpers


@njit(**NJIT_HELPER_OPTIONS)
def _row_softmax_add(row: np.ndarray, lim: int, ncol: int, scale: float, e: np.ndarray,
                     acc: np.ndarray) -> None:
    """``acc[:min(lim, ncol)] += softmax(scale * row[:lim])`` in float64 (``row`` float32
    or float64 logits; ``e`` a float64 scratch row of at least ``lim``)."""
    mx = np.float64(row[0]) * scale
    for j in range(1, lim):
        x = np.float64(row[j]) * scale
        if x > mx:
            mx = x
    tot = 0.0
    for j in range(lim):
        v = exp_f64(np.float64(row[j]) * scale - mx)
        e[j] = v
        tot += v
    inv = 1.0 / tot
    for j in range(min(lim, ncol)):
        acc[j] += e[j] * inv


@njit(**NJIT_OPTIONS)
def _colsum_kernel(q: np.ndarray, k: np.ndarray, scale: float, row0: int, ncol: int,
                   rows: int, nchunk: int, window: bool,
                   partial: np.ndarray) -> None:  # pragma: no cover
    """``partial[b, h, c, j]`` (float64 ``[B, Hq, nchunk, ncol]``) = sum over the rows
    ``i >= row0`` of the tiles of chunk ``c`` of ``softmax_causal(scale q_i K^T)[j]``.

    q, k both float32 or both float64. ``window=False``: each task converts the keys it
    needs and each tile's query rows to float64 once, logits by dgemm. ``window=True`` (a
    few rows): logits by gemm in the inputs' precision, straight from k (a float64 copy of
    all keys would cost more memory traffic than the whole op)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    off = Sk - Sq
    ntile = (Sq - row0 + rows - 1) // rows
    for task in prange(B * Hq * nchunk):
        c = task % nchunk
        h = (task // nchunk) % Hq
        b = task // (nchunk * Hq)
        g = h // G
        acc = partial[b, h, c]
        for j in range(ncol):
            acc[j] = 0.0
        # keys seen by the last tile of this chunk (the most of any of its tiles)
        tl = c + ((ntile - 1 - c) // nchunk) * nchunk
        nkmax = min(Sk, min(row0 + (tl + 1) * rows, Sq) + off)
        if c >= ntile or nkmax <= 0:
            continue
        nrmax = min(rows, Sq - row0)
        e = np.empty(nkmax, np.float64)
        if window:
            sw = np.empty(nrmax * nkmax, k.dtype)
            for t in range(c, ntile, nchunk):
                r0 = row0 + t * rows
                r1 = min(r0 + rows, Sq)
                n = r1 - r0
                nk = min(Sk, r1 + off)      # keys seen by the tile's last row
                if nk <= 0:
                    continue
                s = sw[:n * nk].reshape((n, nk))
                np.dot(q[b, h, r0:r1], k[b, g, :nk].T, s)
                for r in range(n):
                    lim = min(nk, r0 + r + off + 1)
                    if lim > 0:             # else the row sees no key: a zero row
                        _row_softmax_add(s[r], lim, ncol, scale, e, acc)
        else:
            kb = np.empty((nkmax, D), np.float64)
            kb[:, :] = k[b, g, :nkmax]
            qb = np.empty((nrmax, D), np.float64)
            sb = np.empty(nrmax * nkmax, np.float64)
            for t in range(c, ntile, nchunk):
                r0 = row0 + t * rows
                r1 = min(r0 + rows, Sq)
                n = r1 - r0
                nk = min(Sk, r1 + off)
                if nk <= 0:
                    continue
                qb[:n, :] = q[b, h, r0:r1]
                s = sb[:n * nk].reshape((n, nk))
                np.dot(qb[:n], kb[:nk].T, s)
                for r in range(n):
                    lim = min(nk, r0 + r + off + 1)
                    if lim > 0:
                        _row_softmax_add(s[r], lim, ncol, scale, e, acc)


_colsum_serial = njit(**NJIT_HELPER_OPTIONS)(_colsum_kernel.py_func)


def attention_colsum(q64: np.ndarray, k64: np.ndarray, scale: float, row0: int = 0,
                     ncol: int | None = None, window: bool = False) -> np.ndarray:
    """Column sums of the causal softmax rows ``row0 .. Sq-1``, float64 ``[B, Hq, ncol]``.

    q64 ``[B, Hq, Sq, D]``, k64 ``[B, Hkv, Sk, D]`` C-contiguous float32 or float64 (see
    :func:`_inputs`; converted to float64 inside the kernel); ``ncol <= Sk``
    (default ``Sk``) limits the columns returned, not the keys that normalise each row.
    ``window``: logits in the inputs' precision (fp32 sgemm for fp32/fp16/bf16 inputs)
    instead of float64 (see the module docstring).
    """
    B, Hq, Sq, _ = q64.shape
    Sk = k64.shape[2]
    ncol = Sk if ncol is None else int(ncol)
    row0 = int(row0)
    if ncol <= 0 or row0 >= Sq:
        return np.zeros((B, Hq, max(ncol, 0)))
    rows = max(1, min(TILE_ROWS, TILE_ELEMS // Sk))
    ntile = -(-(Sq - row0) // rows)
    want = -(-TASKS_PER_THREAD * get_num_threads() // (B * Hq))
    nchunk = max(1, min(ntile, want))
    work = B * Hq * (Sq - row0) * Sk * q64.shape[3]     # multiply-adds, causal: about half
    if work < SERIAL_WORK:
        nchunk = 1
    partial = np.empty((B, Hq, nchunk, ncol))
    kern = _colsum_serial if work < SERIAL_WORK else _colsum_kernel
    with single_threaded_blas():
        kern(q64, k64, float(scale), row0, ncol, rows, nchunk, bool(window), partial)
    return partial.sum(axis=2) if nchunk > 1 else partial[:, :, 0]


@njit(**NJIT_OPTIONS)
def _pool_kernel(x: np.ndarray, ksize: int, use_max: bool, out: np.ndarray) -> None:  # pragma: no cover
    """1-D pooling of the rows of ``x [R, N]`` into ``out [R, N + 2 (ksize//2) - ksize + 1]``,
    stride 1, padding ``ksize // 2``: average counting the zero padding, or maximum with
    ``-inf`` padding (compared, never used in arithmetic)."""
    R, N = x.shape
    p = ksize // 2
    M = out.shape[1]
    for r in prange(R):
        for o in range(M):
            lo = max(0, o - p)
            hi = min(N, o - p + ksize)
            if use_max:
                m = -np.inf
                for j in range(lo, hi):
                    if x[r, j] > m:
                        m = x[r, j]
                out[r, o] = m
            else:
                acc = 0.0
                for j in range(lo, hi):
                    acc += x[r, j]
                out[r, o] = acc / ksize


_pool_serial = njit(**NJIT_HELPER_OPTIONS)(_pool_kernel.py_func)


def pool1d(x: np.ndarray, kernel_size: int, pooling: str) -> np.ndarray:
    """``torch.nn.functional.{avg,max}_pool1d(x, k, padding=k//2, stride=1)`` on the last axis
    of float64 ``x [..., N]`` (as :func:`refattn.kvcache.snapkv.pool1d`: ``"avgpool"``
    averages, anything else takes the maximum)."""
    ks = int(kernel_size)
    if ks < 1:
        raise InputError(f"kernel_size: must be >= 1, got {kernel_size}")
    N = x.shape[-1]
    M = N + 2 * (ks // 2) - ks + 1
    x2 = np.ascontiguousarray(x.reshape(-1, N), dtype=np.float64)
    out = np.empty((x2.shape[0], max(M, 0)))
    if M > 0:
        kern = _pool_serial if x2.shape[0] * M * ks < SERIAL_WORK else _pool_kernel
        kern(x2, ks, pooling != "avgpool", out)
    return out.reshape(x.shape[:-1] + (max(M, 0),))


# ------------------------------------------------------------------------ registrations
@register("h2o_score", "numba")
def h2o_score_numba(q: np.ndarray, k: np.ndarray, scale: float | None = None, *,
                    out: tuple[np.ndarray] | None = None) -> np.ndarray:
    """H2O accumulated attention of a causal prefill, ``scores [B, Hq, Sk]`` (float64 without
    ``out=``). q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``."""
    q64, k64 = _check_qk(q, k)
    acc = attention_colsum(q64, k64, default_scale(q64.shape[-1], scale))
    return _write(out, (acc,), ("scores",))[0]


@register("kvpress_observed_attention_score", "numba")
def observed_attention_score_numba(q: np.ndarray, k: np.ndarray, *,
                                   out: tuple[np.ndarray] | None = None) -> np.ndarray:
    """kvpress ObservedAttention: ``sum_i A[i, j] / (L - j)`` (``L = Sk``), GQA mean,
    ``scores [B, Hkv, Sk]``."""
    q64, k64 = _check_qk(q, k)
    L = k64.shape[2]
    acc = attention_colsum(q64, k64, default_scale(q64.shape[-1]))
    return _write(out, (_group_mean(acc / np.arange(L, 0, -1), k64.shape[1]),), ("scores",))[0]


@register("vatp_score", "numba")
def vatp_score_numba(q: np.ndarray, k: np.ndarray, v: np.ndarray, mode: str = "scissorhands",
                     sink_len: int = 20, scale: float | None = None, *,
                     out: tuple[np.ndarray] | None = None) -> np.ndarray:
    """VATP prefill scores ``[B, Hq, Sk]``: column sums of all rows (``mode="h2o"``) or of the
    last 400 rows / 400 (any other mode, as the reference), times ``||v_j||_1`` of the kv
    head; ``[..., :sink_len]`` set to :data:`SINK_SCORE` (float32 max, exact in a
    float32 ``out``)."""
    q64, k64 = _check_qk(q, k)
    v32 = _inputs(v, "v", 4)
    if v32.shape[:3] != k64.shape[:3]:
        raise InputError(f"v: expected [B, Hkv, Sk] = {k64.shape[:3]} leading dims, got {v32.shape}")
    scale = default_scale(q64.shape[-1], scale)
    Sq = q64.shape[2]
    if mode == "h2o":
        acc = attention_colsum(q64, k64, scale)
    else:
        acc = attention_colsum(q64, k64, scale, row0=max(0, Sq - SCISSORHANDS_ROWS))
        acc /= float(SCISSORHANDS_ROWS)   # divided by 400 even with fewer rows (official)
    G = q64.shape[1] // k64.shape[1]
    s = acc * np.repeat(np.abs(v32).sum(axis=-1, dtype=np.float64), G, axis=1)
    s[..., :sink_len] = SINK_SCORE
    return _write(out, (s,), ("scores",))[0]


@register("snapkv_score", "numba")
def snapkv_score_numba(q: np.ndarray, k: np.ndarray, window_size: int, kernel_size: int,
                       pooling: str = "avgpool", head_mode: str = "query",
                       scale: float | None = None, *,
                       out: tuple[np.ndarray, np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """SnapKV ``vote [B, Hq, L-W]`` (window attention summed over the window, prefix
    columns) and ``pooled [B, H, L-W]`` (pooled; ``H = Hkv`` with the GQA mean for
    ``head_mode="kv"``). Prefill inputs, ``1 <= W < L``."""
    q64, k64 = _check_qk(q, k)
    scale = default_scale(q64.shape[-1], scale)
    W, L = int(window_size), k64.shape[2]
    if W >= L:
        raise InputError(f"window_size: must be smaller than the sequence length {L}, got {W}")
    _check_window(q64, k64, W)
    vote = attention_colsum(q64, k64, scale, row0=L - W, ncol=L - W, window=True)
    pooled = pool1d(vote, int(kernel_size), pooling)
    if head_mode == "kv":
        pooled = _group_mean(pooled, k64.shape[1])
    return _write(out, (vote, pooled), ("vote", "pooled"))  # type: ignore[return-value]


@register("kvpress_snapkv_score", "numba")
def snapkv_press_score_numba(q: np.ndarray, k: np.ndarray, window_size: int, kernel_size: int,
                             *, out: tuple[np.ndarray] | None = None) -> np.ndarray:
    """kvpress SnapKV ``[B, Hkv, L]``: window mean attention over the prefix, avg-pooled,
    GQA mean, the ``W`` window tokens padded with ``max + 1``."""
    q64, k64 = _check_qk(q, k)
    W, L = int(window_size), k64.shape[2]
    if L <= W:
        raise InputError(f"window_size: the sequence ({L}) must be longer than the window ({W})")
    _check_window(q64, k64, W)
    vote = attention_colsum(q64, k64, default_scale(q64.shape[-1]), row0=L - W, ncol=L - W,
                            window=True)
    s = _group_mean(pool1d(vote / W, int(kernel_size), "avgpool"), k64.shape[1])
    return _write(out, (_pad_max(s, 0, W),), ("scores",))[0]


@register("kvpress_tova_score", "numba")
def tova_score_numba(q: np.ndarray, k: np.ndarray, *,
                     out: tuple[np.ndarray] | None = None) -> np.ndarray:
    """TOVA ``[B, Hkv, L]``: the last query's attention over ``j < L - 1`` averaged over all
    query heads (the same for every kv head), the last token padded with ``max + 1``.
    ``L >= 2`` (the reference fails on the empty maximum of ``L = 1``)."""
    q64, k64 = _check_qk(q, k)
    L = k64.shape[2]
    _check_window(q64, k64, 1)
    if L < 2:
        raise InputError(f"q: TOVA scores the tokens before the last one; needs L >= 2, got {L}")
    a = attention_colsum(q64, k64, default_scale(q64.shape[-1]), row0=L - 1, ncol=L - 1,
                         window=True)
    s = np.repeat(a.mean(axis=1, keepdims=True), k64.shape[1], axis=1)
    return _write(out, (_pad_max(s, 0, 1),), ("scores",))[0]


__all__ = ["attention_colsum", "exp_f64", "pool1d", "SINK_SCORE", "h2o_score_numba",
           "observed_attention_score_numba", "vatp_score_numba", "snapkv_score_numba",
           "snapkv_press_score_numba", "tova_score_numba"]
