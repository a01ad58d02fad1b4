"""CuPy launchers for three LLM-prefill scoring ops (backend ``"cupy"`` of the registry).

Registered ops, each with the signature, outputs and semantics of its NumPy reference:

* ``bsfa_score(q, k, block_q, block_k, scale, causal=False, *, out=None)`` -> ``(block_max,)``
  ``[B, Hq, ceil(Sq/block_q), ceil(Sk/block_k)]`` (``refattn.methods.bsfa``): the max of
  ``scale * q . k`` over each tile's real tokens; with ``causal`` the tiles that hold no
  visible (query, key) pair (:func:`refattn.core.blockmask.legal_blocks`, bottom-right
  aligned) are ``-inf`` and are not computed, legal tiles keep the unmasked maximum;
* ``minference_score(q, k, last_q=64, scale=None, *, out=None)`` -> ``(vertical, slash)``
  ``[B, Hq, Sk]`` (``refattn.methods.minference``);
* ``flexprefill_score(q, k, block_size=128, scale=None, *, out=None)`` -> ``(vertical,
  slash [B, Hq, L], pooled_attn [B, Hq, n], block_attn [B, Hq, n, n])``
  (``refattn.methods.flexprefill``, ``Sq == Sk == L``, ``n = ceil(L / block_size)``).

Inputs are canonical ``bhsd`` (q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, GQA: query head
``h`` reads kv head ``h // (Hq/Hkv)``), NumPy or CuPy (or DLPack / ``__cuda_array_interface__``
arrays), bf16, fp16, fp32 or fp64, q and k of one dtype. NumPy inputs give NumPy results,
device inputs CuPy results; ``out=`` is a tuple of preallocated float32/float64 arrays
(NumPy or CuPy) that is filled completely and returned.

Precision (as ``gpu/scoring.py``): fp32/fp64 inputs are computed in float64 and returned
as float64; bf16/fp16 inputs use tensor cores (mma.sync, fp32 accumulation) for every
q.k product, fp32 softmax arithmetic, and return float32. FlexPrefill's pooled estimates
(block means, the ``n x n`` pooled logits and their softmaxes) are float64 for every dtype.

Kernels (``gpu/score_bsfa.cu``, ``gpu/score_vslash.cu``, ``gpu/score_flexprefill_pool.cu``;
see ``docs/gpu.md``, "Estimate scoring kernels"):

* BSFA: ``bsfa_mma`` (bf16/fp16, ``D % 16 == 0``, ``D <= 128``, ``block_q % 16 == 0``,
  ``block_k % 8 == 0``) is a tensor-core tile GEMM with a max epilogue and atomic-max
  output; ``bsfa_exact`` (float64) covers every other case.
* Vertical / slash (MInference, FlexPrefill): ``vs_stats`` -> ``vs_combine`` ->
  ``vs_accum`` on tensor cores (bf16/fp16, ``D % 16 == 0``, ``D <= 128``): a two-pass
  softmax over key chunks with no ``[rows x Sk]`` array in global memory; column sums
  and diagonal sums by atomics. ``vs_exact_rows`` / ``vs_exact_cols`` (float64) otherwise.
* FlexPrefill pooling: ``est_block_mean`` (float64 means), cuBLAS float64 GEMMs for the
  pooled logits, ``est_softmax`` for the (block-causal) softmaxes.
"""
from __future__ import annotations

import math
from typing import Any

import cupy as cp
import numpy as np

from refattn.core.errors import InputError
from refattn.core.registry import register

from ._build import get_kernel, launch, tensor_cores_available
from ._scoring_common import _CT, _acc, _cdiv, _deliver, _positive, _qk

_SRC_BSFA = "score_bsfa.cu"
_SRC_VS = "score_vslash.cu"
_SRC_POOL = "score_flexprefill_pool.cu"
_I32, _I64, _F32, _F64 = np.int32, np.int64, np.float32, np.float64
_LOG2E = 1.4426950408889634

BSFA_BM = 128        # query rows per CTA of bsfa_mma
#: CTAs per SM that bsfa_mma's register budget is compiled for (3: <= 168 registers; 2: more
#: registers, fewer warps). A benchmark switch; 3 is the default.
BSFA_MIN_CTAS = 3
VS_BN = 64           # keys per tile of the vertical/slash kernels
#: Target number of CTAs of one vertical/slash pass (sets the key-chunk length).
VS_TARGET_CTAS = 2048


# ----------------------------------------------------------------------------- helpers
def _aligned(x: Any) -> Any:
    """``x`` itself when its base address is 16-byte aligned (cp.async, vector loads), else a
    fresh contiguous copy."""
    return x if x.data.ptr % 16 == 0 else x.copy()


def _scale(scale: Any, D: int) -> float:
    sc = 1.0 / math.sqrt(D) if scale is None else scale
    try:
        sc = float(sc)
    except (TypeError, ValueError):
        raise InputError(f"scale: expected a number or None, got {scale!r}") from None
    if not math.isfinite(sc):
        raise InputError(f"scale: expected a finite number, got {scale!r}")
    return sc


def _tc_geometry(kind: str, D: int) -> bool:
    return (kind in ("bfloat16", "float16") and D % 16 == 0 and 16 <= D <= 128
            and tensor_cores_available())


def bsfa_fast_path(kind: str, D: int, block_q: int, block_k: int) -> bool:
    """True when ``bsfa_score`` runs on tensor cores (``bsfa_mma``): bf16/fp16, ``D % 16 ==
    0`` and ``D <= 128``, ``block_q % 16 == 0``, ``block_k % 8 == 0``, device sm_80+."""
    return _tc_geometry(kind, D) and block_q % 16 == 0 and block_k % 8 == 0


def vs_fast_path(kind: str, D: int) -> bool:
    """True when the vertical/slash estimates (MInference, FlexPrefill) run on tensor cores:
    bf16/fp16, ``D % 16 == 0`` and ``D <= 128``, device sm_80+."""
    return _tc_geometry(kind, D)


def _pick_path(path: str | None, fast_ok: bool, what: str) -> bool:
    """``True`` for the tensor-core kernels. ``path`` (tests): None (automatic), "fast"
    or "exact"."""
    if path is None:
        return fast_ok
    if path == "exact":
        return False
    if path == "fast":
        if not fast_ok:
            raise InputError(f"{what}: the tensor-core path does not cover this input")
        return True
    raise InputError(f"path: expected None, 'fast' or 'exact', got {path!r}")


# ----------------------------------------------------------------------------- BSFA
@register("bsfa_score", "cupy")
def bsfa_score(q: Any, k: Any, block_q: int, block_k: int, scale: float, causal: bool = False,
               *, out: Any = None) -> tuple[Any]:
    """BSFA tile maxima ``Mx [B, Hq, ceil(Sq/block_q), ceil(Sk/block_k)]`` of the raw scaled
    logits ``scale * q . k`` over each tile's real tokens (no causal mask inside a tile).

    With ``causal`` (bottom-right aligned) the tiles that hold no visible (query, key) pair
    are ``-inf`` and are not computed. bf16/fp16 with :func:`bsfa_fast_path` run the
    tensor-core kernel (fp32 products, float32 result); everything else the float64 kernel.
    """
    return bsfa_impl(q, k, block_q, block_k, scale, causal, out=out)


def bsfa_impl(q: Any, k: Any, block_q: int, block_k: int, scale: float, causal: bool = False,
              *, out: Any = None, path: str | None = None) -> tuple[Any]:
    """:func:`bsfa_score` with a kernel choice for tests (``path``: None, "fast", "exact")."""
    qd, kd, kind, host, (B, Hq, Hkv, Sq, Sk, D) = _qk(q, k, "bsfa_score")
    bq, bk = _positive("block_q", block_q), _positive("block_k", block_k)
    sc = _scale(scale, D)
    causal = bool(causal)
    Qb, Kb = _cdiv(Sq, bq), _cdiv(Sk, bk)
    G = Hq // Hkv
    ct = _CT[kind]
    if _pick_path(path, bsfa_fast_path(kind, D, bq, bk), "bsfa_score"):
        qd, kd = _aligned(qd), _aligned(kd)
        mx = cp.full((B, Hq, Qb, Kb), -cp.inf, cp.float32)
        fn = get_kernel(_SRC_BSFA, f"bsfa_mma<{ct}, {D}, {'true' if sc < 0 else 'false'}, "
                              f"{int(BSFA_MIN_CTAS)}>")
        launch(fn, (_cdiv(Sq, BSFA_BM), Hq, B), (128,),
               (qd, kd, mx, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(bq), _I32(bk),
                _I32(Qb), _I32(Kb), _F32(abs(sc)), _I32(causal)),
               shared_mem=(BSFA_BM + 2 * 64) * (D + 8) * 2)
    else:
        mx = cp.full((B, Hq, Qb, Kb), -cp.inf, cp.float64)
        fn = get_kernel(_SRC_BSFA, f"bsfa_exact<{ct}>")
        launch(fn, (_cdiv(Sk, 64), _cdiv(Sq, 64), B * Hq), (256,),
               (qd, kd, mx, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(D), _I32(bq),
                _I32(bk), _I32(Qb), _I32(Kb), _F64(sc), _I32(causal)))
        acc_dt = _acc(kind)[1]
        if acc_dt != cp.float64:
            mx = mx.astype(acc_dt)
    return _deliver((mx,), out, host, ("block_max",))


# ----------------------------------------------------------------------------- vertical / slash
def vs_chunk_tiles(Sk: int, rows_tiles: int, heads: int) -> int:
    """64-key tiles per chunk of the vertical/slash passes: about VS_TARGET_CTAS CTAs per
    pass, 8 to 32 tiles per chunk, never more than the keys need."""
    nt = _cdiv(Sk, VS_BN)
    t = min(32, max(8, _cdiv(nt * rows_tiles * heads, VS_TARGET_CTAS)))
    return max(1, min(t, nt))


def vs_accum_smem(D: int, BM: int, chunk: int) -> int:
    """Dynamic shared memory (bytes) of ``vs_accum<T, D, BM>`` for a 16-bit T."""
    u = max(BM * (D + 8) * 2, BM * (VS_BN + 8) * 4)
    u = _cdiv(u, 16) * 16
    return u + 2 * VS_BN * (D + 8) * 2 + (chunk + BM - 1) * 4


def vertical_slash(qd: Any, kd: Any, kind: str, dims: tuple[int, ...], ell: int, scale: float,
                   div: float, *, path: str | None = None,
                   chunk_tiles: int | None = None) -> tuple[Any, Any]:
    """Column sums ``vertical[j] = sum_e P[e, j] / div`` and diagonal sums ``slash[o] =
    sum_e P[e, p_e - o] / div`` of the causal softmax ``P`` of the last ``ell`` query rows
    (row ``e`` at key position ``p_e = Sk - ell + e``), CuPy ``[B, Hq, Sk]`` each (float32
    for bf16/fp16, float64 otherwise). ``qd``/``kd`` as returned by ``_qk``. ``path`` and
    ``chunk_tiles`` (keys per chunk / 64) are for tests and benchmarks."""
    B, Hq, Hkv, Sq, Sk, D = dims
    BH, G = B * Hq, Hq // Hkv
    ct = _CT[kind]
    if _pick_path(path, vs_fast_path(kind, D), "vertical/slash"):
        qd, kd = _aligned(qd), _aligned(kd)
        BM = 64 if ell <= 64 else 128
        nrt = _cdiv(ell, BM)
        ctl = vs_chunk_tiles(Sk, nrt, BH) if chunk_tiles is None else int(chunk_tiles)
        if ctl < 1:
            raise InputError(f"chunk_tiles: expected a positive integer, got {chunk_tiles!r}")
        chunk = VS_BN * ctl
        nch = _cdiv(Sk, chunk)
        sl2 = _F32(scale * _LOG2E)
        st_m = cp.empty((BH, ell, nch), cp.float32)
        st_l = cp.empty((BH, ell, nch), cp.float32)
        launch(get_kernel(_SRC_VS, f"vs_stats<{ct}, {D}, {BM}>"), (nch, nrt, BH), (128,),
               (qd, kd, st_m, st_l, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(ell),
                _I32(chunk), _I32(nch), sl2),
               shared_mem=(BM + 2 * VS_BN) * (D + 8) * 2)
        row_m = cp.empty((BH, ell), cp.float32)
        row_inv = cp.empty((BH, ell), cp.float32)
        rows = BH * ell
        launch(get_kernel(_SRC_VS, "vs_combine"), (_cdiv(rows, 256),), (256,),
               (st_m, st_l, row_m, row_inv, _I64(rows), _I32(nch), _F32(div)))
        vert = cp.zeros((B, Hq, Sk), cp.float32)
        sl = cp.zeros((B, Hq, Sk), cp.float32)
        launch(get_kernel(_SRC_VS, f"vs_accum<{ct}, {D}, {BM}>"), (nch, nrt, BH), (128,),
               (qd, kd, row_m, row_inv, vert, sl, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk),
                _I32(ell), _I32(chunk), sl2),
               shared_mem=vs_accum_smem(D, BM, chunk))
        return vert, sl
    row_m = cp.empty((BH, ell), cp.float64)
    row_inv = cp.empty((BH, ell), cp.float64)
    launch(get_kernel(_SRC_VS, f"vs_exact_rows<{ct}>"), (_cdiv(ell, 4), BH), (128,),
           (qd, kd, row_m, row_inv, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(D), _I32(ell),
            _F64(scale), _F64(div)))
    vert = cp.empty((B, Hq, Sk), cp.float64)
    sl = cp.empty((B, Hq, Sk), cp.float64)
    launch(get_kernel(_SRC_VS, f"vs_exact_cols<{ct}>"), (_cdiv(Sk, 128), BH, 2), (128,),
           (qd, kd, row_m, row_inv, vert, sl, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(D),
            _I32(ell), _F64(scale)))
    acc_dt = _acc(kind)[1]
    if acc_dt != cp.float64:
        vert, sl = vert.astype(acc_dt), sl.astype(acc_dt)
    return vert, sl


# ----------------------------------------------------------------------------- MInference
@register("minference_score", "cupy")
def minference_score(q: Any, k: Any, last_q: int = 64, scale: float | None = None, *,
                     out: Any = None) -> tuple[Any, Any]:
    """MInference vertical and slash scores (reference
    ``refattn.methods.minference.minference_score``): ``(vertical, slash)`` ``[B, Hq, Sk]``,
    the column sums and the diagonal sums (``slash[o]``, ``o = query - key``) of the causal
    softmax of the last ``min(last_q, Sq)`` queries; ``scale`` defaults to ``1/sqrt(D)``."""
    return minference_impl(q, k, last_q, scale, out=out)


def minference_impl(q: Any, k: Any, last_q: int = 64, scale: float | None = None, *,
                    out: Any = None, path: str | None = None,
                    chunk_tiles: int | None = None) -> tuple[Any, Any]:
    """:func:`minference_score` with the kernel choice of :func:`vertical_slash`."""
    qd, kd, kind, host, dims = _qk(q, k, "minference_score")
    ell = min(_positive("last_q", last_q), dims[3])
    sc = _scale(scale, dims[5])
    vert, sl = vertical_slash(qd, kd, kind, dims, ell, sc, 1.0, path=path,
                              chunk_tiles=chunk_tiles)
    return _deliver((vert, sl), out, host, ("vertical", "slash"))


# ----------------------------------------------------------------------------- FlexPrefill
def block_means(xd: Any, kind: str, BH: int, S: int, D: int, t_begin: int, blk: int,
                nblk: int, mul: float) -> Any:
    """float64 ``[BH, nblk, D]``: ``mul`` times the mean of rows ``[t_begin + j*blk,
    min(S, t_begin + (j+1)*blk))`` of ``xd [BH, S, D]`` (true length)."""
    out = cp.empty((BH, nblk, D), cp.float64)
    launch(get_kernel(_SRC_POOL, f"est_block_mean<{_CT[kind]}>"), (nblk, BH), (256,),
           (_aligned(xd), out, _I32(S), _I32(D), _I32(t_begin), _I32(blk), _I32(nblk),
            _F64(mul)))
    return out


@register("flexprefill_score", "cupy")
def flexprefill_score(q: Any, k: Any, block_size: int = 128, scale: float | None = None, *,
                      out: Any = None) -> tuple[Any, ...]:
    """FlexPrefill's estimates (reference ``refattn.methods.flexprefill.flexprefill_score``),
    ``Sq == Sk == L``: ``vertical, slash [B, Hq, L]`` (means over the last ``ell = min(b,
    L)`` queries of their causal softmax), ``pooled_attn [B, Hq, n]`` (``softmax_J(mean of
    the last ell scaled queries . kbar_J)``) and ``block_attn [B, Hq, n, n]`` (block-causal
    ``softmax_J(qbar_I . kbar_J * scale)``, 0 above the diagonal); ``scale`` defaults to
    ``1/sqrt(D)``."""
    return flexprefill_impl(q, k, block_size, scale, out=out)


def flexprefill_impl(q: Any, k: Any, block_size: int = 128, scale: float | None = None, *,
                     out: Any = None, path: str | None = None,
                     chunk_tiles: int | None = None) -> tuple[Any, ...]:
    """:func:`flexprefill_score` with the kernel choice of :func:`vertical_slash`."""
    qd, kd, kind, host, dims = _qk(q, k, "flexprefill_score")
    B, Hq, Hkv, L, Lk, D = dims
    if Lk != L:
        raise InputError(f"flexprefill_score: q_len and k_len must be equal, got {L} and {Lk}")
    b = _positive("block_size", block_size)
    n, ell, G = _cdiv(L, b), min(b, L), Hq // Hkv
    sc = _scale(scale, D)
    vert, sl = vertical_slash(qd, kd, kind, dims, ell, sc, float(ell), path=path,
                              chunk_tiles=chunk_tiles)
    acc_t, acc_dt = _acc(kind)
    kbar = block_means(kd, kind, B * Hkv, L, D, 0, b, n, 1.0).reshape(B, Hkv, n, D)
    qbar = block_means(qd, kind, B * Hq, L, D, 0, b, n, sc).reshape(B, Hkv, G * n, D)
    qlast = block_means(qd, kind, B * Hq, L, D, L - ell, ell, 1, sc).reshape(B, Hkv, G, D)
    kT = cp.ascontiguousarray(kbar.transpose(0, 1, 3, 2))                 # [B, Hkv, D, n]
    zb = cp.ascontiguousarray(cp.matmul(qbar, kT))                       # [B, Hkv, G*n, n]
    zp = cp.ascontiguousarray(cp.matmul(qlast, kT))                      # [B, Hkv, G, n]
    del qbar, kT
    blk = cp.empty((B, Hq, n, n), acc_dt)
    pooled = cp.empty((B, Hq, n), acc_dt)
    sm = get_kernel(_SRC_POOL, f"est_softmax<{acc_t}>")
    launch(sm, (B * Hq * n,), (256,), (zb, blk, _I32(n), _I32(n), _I32(1)))
    launch(sm, (B * Hq,), (256,), (zp, pooled, _I32(n), _I32(1), _I32(0)))
    return _deliver((vert, sl, pooled, blk), out, host,
                    ("vertical", "slash", "pooled_attn", "block_attn"))


__all__ = ["bsfa_score", "minference_score", "flexprefill_score", "bsfa_fast_path",
           "vs_fast_path", "bsfa_impl", "minference_impl", "flexprefill_impl",
           "vertical_slash", "block_means"]
