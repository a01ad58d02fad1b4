"""CuPy launchers for the LLM-prefill scoring ops (backend ``"cupy"`` of the registry).

Registered ops, each with the signature, outputs and semantics of its NumPy reference:

* ``xattention_score(q, k, block_size, stride, chunk_size, norm, causal, *, out=None)``
  -> ``(W,)`` ``[B, Hq, nbp, nbp]`` (reference ``refattn.methods.xattention``);
* ``moba_score(q, k, block_size, *, out=None)`` -> ``(gate,)`` ``[B, Hq, Sq, Kb]``
  (``refattn.methods.moba.moba_gate``);
* ``quest_score(q, k, page_size, causal, *, out=None)`` -> ``(bound,)`` ``[B, Hq, Sq, Np]``
  (``refattn.methods.quest.quest_bound``);
* ``prism_score(q, k, block_size, high_freq_dim, low_freq_dim, calibrate, high_temp,
  low_temp, *, out=None)`` -> ``(logits_high, logits_low, probs_high, probs_low)``
  ``[B, Hq, n_q, n_k]`` and ``(scale_high, scale_low)`` ``[B, Hq]``
  (``refattn.methods.prism.prism_score``).

Inputs are canonical ``bhsd`` (q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, ``Hq % Hkv == 0``,
query head ``h`` reads kv head ``h // (Hq/Hkv)``), NumPy or CuPy (or anything that
:func:`refattn.core.layout.as_array` turns into CuPy: DLPack / ``__cuda_array_interface__``),
bf16, fp16, fp32 or fp64, q and k of one dtype. NumPy inputs give NumPy results, device inputs
CuPy results. ``out=`` is a tuple of preallocated arrays (NumPy or CuPy, float32 or float64)
of the output shapes; every element is written and ``out`` is returned.

Precision: fp32/fp64 inputs are computed in float64 throughout and returned as float64;
bf16/fp16 inputs use fp32 arithmetic (tensor cores for XAttention) and return float32.
See ``docs/gpu.md`` ("Scoring kernels") for the kernels and their speed.
"""
from __future__ import annotations

import math
from typing import Any

import cupy as cp
import numpy as np

from refattn.core.errors import InputError
from refattn.core.layout import as_array
from refattn.core.registry import register

from ._build import get_kernel, launch, tensor_cores_available

_CT = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
_XA_SMEM = 2 * (128 + 64) * (64 + 8) * 2       # xatt_tiles: double-buffered Q/K slices
#: Bound on the XAttention scratch (per-row chunk block sums) of one launch; heads are
#: processed in groups that fit.
XA_SCRATCH_BYTES = 1 << 30
_I32, _I64, _F32, _F64 = np.int32, np.int64, np.float32, np.float64


# ----------------------------------------------------------------------------- arrays
def _dev(x: Any, name: str) -> tuple[Any, str, bool]:
    """``(contiguous CuPy array, dtype name, came from host)``; bf16 travels as uint16 bits."""
    x = as_array(x, name)
    host = isinstance(x, np.ndarray)
    kind = str(x.dtype)
    if kind not in _CT:
        raise InputError(f"{name}: expected float16, bfloat16, float32 or float64, got {kind}")
    if x.ndim != 4:
        raise InputError(f"{name}: expected a 4-d bhsd array, got shape {tuple(x.shape)}")
    if host:
        x = np.ascontiguousarray(x)
        d = cp.asarray(x.view(np.uint16) if kind == "bfloat16" else x)
    else:
        d = cp.ascontiguousarray(x.view(cp.uint16) if kind == "bfloat16" else x)
    return d, kind, host


def _qk(q: Any, k: Any, op: str) -> tuple[Any, Any, str, bool, tuple[int, ...]]:
    """Validate and upload q, k; returns ``(q, k, dtype, host, (B, Hq, Hkv, Sq, Sk, D))``."""
    qd, qkind, host = _dev(q, "q")
    kd, kkind, _ = _dev(k, "k")
    if qkind != kkind:
        raise InputError(f"{op}: q and k must have one dtype, got {qkind} and {kkind}")
    B, Hq, Sq, D = qd.shape
    Bk, Hkv, Sk, Dk = kd.shape
    if Bk != B or Dk != D:
        raise InputError(f"{op}: q {tuple(qd.shape)} and k {tuple(kd.shape)} differ in batch "
                         f"or head dim")
    if Hkv == 0 or Hq % Hkv:
        raise InputError(f"{op}: GQA needs Hq % Hkv == 0, got Hq={Hq}, Hkv={Hkv}")
    if min(B, Hq, Sq, Sk, D) == 0:
        raise InputError(f"{op}: empty input, q {tuple(qd.shape)}, k {tuple(kd.shape)}")
    return qd, kd, qkind, host, (B, Hq, Hkv, Sq, Sk, D)


def _acc(kind: str) -> tuple[str, Any]:
    """Accumulator C++ type and CuPy dtype: float64 for fp32/fp64 inputs, else float32."""
    return ("double", cp.float64) if kind in ("float32", "float64") else ("float", cp.float32)


def _deliver(results: tuple[Any, ...], out: Any, host: bool, names: tuple[str, ...]) -> tuple[Any, ...]:
    """Return ``results`` (NumPy when ``host``), or copy them into ``out``."""
    if out is None:
        return tuple(r.get() if host else r for r in results)
    if not isinstance(out, (tuple, list)) or len(out) != len(results):
        raise InputError(f"out: expected a tuple of {len(results)} arrays {names}")
    for r, o, nm in zip(results, out, names, strict=True):
        if not isinstance(o, (np.ndarray, cp.ndarray)):
            raise InputError(f"out[{nm}]: expected a NumPy or CuPy array, got {type(o).__name__}")
        if tuple(o.shape) != tuple(r.shape) or str(o.dtype) not in ("float32", "float64"):
            raise InputError(f"out[{nm}]: expected float32 or float64 of shape {tuple(r.shape)}, "
                             f"got {o.dtype} {tuple(o.shape)}")
        if isinstance(o, np.ndarray):
            o[...] = r.get()
        else:
            o[...] = r
    return tuple(out)


def _positive(name: str, v: Any) -> int:
    try:
        iv = int(v)
    except (TypeError, ValueError):
        raise InputError(f"{name}: expected a positive integer, got {v!r}") from None
    if iv != v or iv < 1:
        raise InputError(f"{name}: expected a positive integer, got {v!r}")
    return iv


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- XAttention
def xattention_fast_path(kind: str, D: int, block_size: int, stride: int) -> bool:
    """True when ``xattention_score`` runs on tensor cores: bf16/fp16, ``D % 64 == 0``,
    ``block_size / stride`` a power of two <= 64, device sm_80+."""
    bt = block_size // stride
    return (kind in ("bfloat16", "float16") and D % 64 == 0 and bt in (1, 2, 4, 8, 16, 32, 64)
            and tensor_cores_available())


@register("xattention_score", "cupy")
def xattention_score(q: Any, k: Any, block_size: int, stride: int, chunk_size: int,
                     norm: float, causal: bool, *, out: Any = None) -> tuple[Any]:
    """Antidiagonal block scores ``W`` on the chunk-padded grid (see the reference
    ``refattn.methods.xattention.xattention_score``).

    q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]``. Returns ``(W,)`` ``[B, Hq, nbp, nbp]``,
    ``nbp = ceil(L / chunk_size) * chunk_size / block_size``; rows of query blocks holding no
    real token and causal future blocks are 0. bf16/fp16 with ``D % 64 == 0`` and
    ``block_size / stride`` a power of two <= 64 run the fused tensor-core kernel (fp32);
    everything else the float64 kernel (one warp per query tile; slow, for exactness).
    """
    qd, kd, kind, host, (B, Hq, Hkv, L, Lk, D) = _qk(q, k, "xattention_score")
    if Lk != L:
        raise InputError(f"xattention_score: q_len and k_len must be equal, got {L} and {Lk}")
    bs, S, C = (_positive("block_size", block_size), _positive("stride", stride),
                _positive("chunk_size", chunk_size))
    if bs % S:
        raise InputError(f"stride: must divide block_size={bs}, got {S}")
    if C % bs:
        raise InputError(f"chunk_size: must be a multiple of block_size={bs}, got {C}")
    if not float(norm) > 0:
        raise InputError(f"norm: expected a positive number, got {norm!r}")
    Lp = _cdiv(L, C) * C
    T, T_real, BT = Lp // S, _cdiv(L, S), bs // S
    nbp, n_real = Lp // bs, _cdiv(L, bs)
    BH, G = B * Hq, Hq // Hkv
    scale = 1.0 / (math.sqrt(D) * S * float(norm))
    strides = (_I64(Hq * L * D), _I64(L * D), _I64(Hkv * L * D), _I64(L * D))
    nch = _cdiv(T, 64)
    nbc = nch * 64 // BT
    if xattention_fast_path(kind, D, bs, S) and nbc * 4 <= 160 * 1024:
        ct = _CT[kind]
        rows_alloc = _cdiv(n_real * BT, 128) * 128
        per_head = rows_alloc * (nbc + nch) * 4
        group = max(1, min(BH, XA_SCRATCH_BYTES // per_head))
        part = cp.empty((group, rows_alloc, nbc), cp.float32)
        mc = cp.empty((group, rows_alloc, nch), cp.float32)
        W = cp.zeros((B, Hq, nbp, nbp), cp.float32)
        k_tiles = get_kernel("score_xattn.cu", f"xatt_tiles<{ct}, {BT}>")
        k_red = get_kernel("score_xattn.cu", f"xatt_reduce<{BT}>")
        for bh0 in range(0, BH, group):
            g = min(group, BH - bh0)
            launch(k_tiles, (rows_alloc // 128, g), (128,),
                   (qd, kd, part, mc, _I32(Hq), _I32(G), _I32(L), _I32(S), _I32(D), _I32(T),
                    _I32(rows_alloc), _I32(nch), _I32(nbc), *strides,
                    _F32(scale * 1.4426950408889634), _I32(bool(causal)), _I32(bh0)),
                   shared_mem=_XA_SMEM)
            launch(k_red, (n_real, g), (256,),
                   (part, mc, W, _I32(rows_alloc), _I32(nch), _I32(nbc), _I32(nbp),
                    _I32(T_real), _I32(bool(causal)), _I32(bh0)), shared_mem=nbc * 4)
    else:
        W = cp.zeros((B, Hq, nbp, nbp), cp.float64)
        fn = get_kernel("score_xattn.cu", f"xatt_exact<{_CT[kind]}>")
        launch(fn, (_cdiv(T_real, 4), BH), (128,),
               (qd, kd, W, _I32(Hq), _I32(G), _I32(L), _I32(S), _I32(D), _I32(T),
                _I32(T_real), _I32(BT), _I32(nbp), *strides, _F64(scale), _I32(bool(causal))))
    return _deliver((W,), out, host, ("W",))


# ----------------------------------------------------------------------------- MoBA
@register("moba_score", "cupy")
def moba_score(q: Any, k: Any, block_size: int, *, out: Any = None) -> tuple[Any]:
    """MoBA gate ``s[b, h, t, j] = <q_t, kbar_j>`` (no scale, no softmax) for every key block.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``; returns ``(gate,)`` ``[B, Hq, Sq, Kb]``,
    ``Kb = ceil(Sk / block_size)``. ``kbar_j`` is the mean over the block's true length,
    summed in float64 and rounded to k's dtype, as the reference (``pooled_keys``).
    """
    qd, kd, kind, host, (B, Hq, Hkv, Sq, Sk, D) = _qk(q, k, "moba_score")
    bs = _positive("block_size", block_size)
    kb = _cdiv(Sk, bs)
    ct, (acc_t, acc_dt) = _CT[kind], _acc(kind)
    kbar = cp.empty((B, Hkv, kb, D), cp.float64)
    launch(get_kernel("score_pooled.cu", f"pool_mean<{ct}>"), (kb, B * Hkv), (128,),
           (kd, kbar, _I32(Sk), _I32(D), _I32(bs), _I32(kb), _I32(1), _I32(kind != "float64")))
    gate = cp.empty((B, Hq, Sq, kb), acc_dt)
    launch(get_kernel("score_pooled.cu", f"rowcol<{ct}, {acc_t}, 0>"),
           (_cdiv(kb, 64), _cdiv(Sq, 64), B * Hq), (256,),
           (qd, kbar, kbar, gate, _I32(Hq), _I32(Hq // Hkv), _I32(Sq), _I32(Sk), _I32(kb),
            _I32(D), _I32(1), _I32(0)))
    return _deliver((gate,), out, host, ("gate",))


# ----------------------------------------------------------------------------- Quest
@register("quest_score", "cupy")
def quest_score(q: Any, k: Any, page_size: int, causal: bool, *, out: Any = None) -> tuple[Any]:
    """Quest's upper bound ``U[b, h, r, p] = sum_i max(q_i M_pi, q_i m_pi)``.

    q ``[B, Hq, Sq, D]`` (row ``r`` at key position ``t = r + Sk - Sq``), k
    ``[B, Hkv, Sk, D]``; returns ``(bound,)`` ``[B, Hq, Sq, Np]``, ``Np = ceil(Sk / P)``. With
    ``causal`` each row's own page is bounded over keys ``[cP, t]`` only and later pages
    (all pages when ``t < 0``) are ``-inf``, as the reference ``quest_bound``.
    """
    qd, kd, kind, host, (B, Hq, Hkv, Sq, Sk, D) = _qk(q, k, "quest_score")
    P = _positive("page_size", page_size)
    n = _cdiv(Sk, P)
    ct, (acc_t, acc_dt) = _CT[kind], _acc(kind)
    M = cp.empty((B, Hkv, n, D), cp.float64)
    m = cp.empty((B, Hkv, n, D), cp.float64)
    launch(get_kernel("score_pooled.cu", f"page_minmax<{ct}>"), (n, B * Hkv), (128,),
           (kd, M, m, _I32(Sk), _I32(D), _I32(P), _I32(n)))
    U = cp.empty((B, Hq, Sq, n), acc_dt)
    G = Hq // Hkv
    launch(get_kernel("score_pooled.cu", f"rowcol<{ct}, {acc_t}, 1>"),
           (_cdiv(n, 64), _cdiv(Sq, 64), B * Hq), (256,),
           (qd, M, m, U, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(n), _I32(D), _I32(P),
            _I32(bool(causal))))
    if causal:
        launch(get_kernel("score_pooled.cu", f"quest_own<{ct}, {acc_t}>"),
               (_cdiv(Sq, 4), B * Hq), (128,),
               (qd, kd, U, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(D), _I32(P), _I32(n)))
    return _deliver((U,), out, host, ("bound",))


# ----------------------------------------------------------------------------- Prism
def _high_band(D: int, h: int) -> np.ndarray:
    d, half, hh = np.arange(D), D // 2, h // 2
    return np.concatenate([d[:hh], d[half:half + hh]])


def _low_band(D: int, l_: int) -> np.ndarray:
    # Python slice semantics on purpose (a negative start wraps), as the reference.
    d, half, hl = np.arange(D), D // 2, l_ // 2
    return np.concatenate([d[half - hl:half], d[D - hl:D]])


def _rms(x: Any) -> Any:
    """RMS over the last two axes (blocks x dims), per (batch, head)."""
    return cp.sqrt(cp.mean(x * x, axis=(-2, -1)))


@register("prism_score", "cupy")
def prism_score(q: Any, k: Any, block_size: int, high_freq_dim: int, low_freq_dim: int,
                calibrate: bool, high_temp: float, low_temp: float, *,
                out: Any = None) -> tuple[Any, ...]:
    """Prism's dual-band pooled block logits and probabilities, float64 (see the reference
    ``refattn.methods.prism.prism_score``).

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``; with ``n_q = ceil(Sq/b)``, ``n_k =
    ceil(Sk/b)`` returns ``(logits_high, logits_low, probs_high, probs_low)``
    ``[B, Hq, n_q, n_k]`` (future blocks ``-inf`` / 0) and ``(scale_high, scale_low)``
    ``[B, Hq]``. The block means (zero padding included) are one pass over Q and K in a
    CUDA kernel; the small pooled products and softmaxes run as CuPy float64 array ops.
    """
    qd, kd, kind, host, (B, Hq, Hkv, Sq, Sk, D) = _qk(q, k, "prism_score")
    b = _positive("block_size", block_size)
    h_dim, l_dim = int(high_freq_dim), int(low_freq_dim)
    nq, nk = _cdiv(Sq, b), _cdiv(Sk, b)
    ct = _CT[kind]
    pool = get_kernel("score_pooled.cu", f"pool_mean<{ct}>")
    qb = cp.empty((B, Hq, nq, D), cp.float64)
    kb = cp.empty((B, Hkv, nk, D), cp.float64)
    launch(pool, (nq, B * Hq), (128,), (qd, qb, _I32(Sq), _I32(D), _I32(b), _I32(nq), _I32(0), _I32(0)))
    launch(pool, (nk, B * Hkv), (128,), (kd, kb, _I32(Sk), _I32(D), _I32(b), _I32(nk), _I32(0), _I32(0)))
    kb = cp.repeat(kb, Hq // Hkv, axis=1)                              # [B, Hq, nk, D]
    hi = cp.asarray(_high_band(D, h_dim))
    lo = cp.asarray(_low_band(D, l_dim))
    if calibrate:
        rq = cp.maximum(_rms(qb), 1e-6)
        rk = cp.maximum(_rms(kb), 1e-6)
        t_h = math.sqrt(h_dim / D) * (_rms(qb[..., hi]) / rq) * (_rms(kb[..., hi]) / rk)
        t_l = math.sqrt(l_dim / D) * (_rms(qb[..., lo]) / rq) * (_rms(kb[..., lo]) / rk)
    else:
        t_h = cp.full((B, Hq), float(high_temp))
        t_l = cp.full((B, Hq), float(low_temp))
    sh = math.sqrt(h_dim) * t_h
    sl = math.sqrt(l_dim) * t_l
    future = cp.asarray(np.arange(nk)[None, :] > np.arange(nq)[:, None] + (nk - nq))
    res = []
    for dims, s in ((hi, sh), (lo, sl)):
        z = cp.matmul(qb[..., dims], cp.swapaxes(kb[..., dims], -1, -2)) / s[..., None, None]
        z = cp.where(future, -cp.inf, z)
        mx = z.max(axis=-1, keepdims=True)
        live = cp.isfinite(mx)
        e = cp.exp(z - cp.where(live, mx, 0.0))
        p = cp.where(live, e / cp.where(live, e.sum(axis=-1, keepdims=True), 1.0), 0.0)
        res.append((z, p))
    (zh, ph), (zl, pl) = res
    return _deliver((zh, zl, ph, pl, sh, sl), out, host,
                    ("logits_high", "logits_low", "probs_high", "probs_low", "scale_high",
                     "scale_low"))


__all__ = ["xattention_score", "moba_score", "quest_score", "prism_score",
           "xattention_fast_path"]
