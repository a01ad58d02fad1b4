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
bf16/fp16 inputs use fp32 arithmetic (tensor cores for XAttention, and for MoBA and Quest
with D in {64, 128}) and return float32. Prism is float64 for every dtype (its selection is
a top-p over float32-rounded probabilities, decided in the last bits).
See ``docs/gpu.md`` ("Scoring kernels") for the kernels and their speed.

Module switches (for the benchmark's comparisons; the defaults are the fast kernels):
``XA_CONFIG`` picks the XAttention tensor-core kernel (a key of ``XA_CONFIGS``; ``"v1"`` is
the first 128 x 64 version); ``POOLED_TENSOR_CORES = False`` sends MoBA and Quest to the
FFMA ``rowcol`` kernel; ``TRACE``, when a list, receives ``(kernel, start, end)`` CUDA events
of every launch.
"""
from __future__ import annotations

import math
from typing import Any

import cupy as cp
import numpy as np

from refattn.core.errors import InputError
from refattn.core.registry import register

from ._build import get_kernel, launch, tensor_cores_available
from ._scoring_common import (  # noqa: F401  (re-exported: imported from here elsewhere)
    _CT,
    _DEV_ATTR,
    _acc,
    _cdiv,
    _deliver,
    _dev,
    _device_attr,
    _positive,
    _qk,
)

_XA_SMEM = 2 * (128 + 64) * (64 + 8) * 2       # xatt_tiles: double-buffered Q/K slices
#: Bound on the XAttention scratch (per-row chunk block sums) of one launch; heads are
#: processed in groups that fit.
XA_SCRATCH_BYTES = 1 << 30
#: XAttention tensor-core kernels: name -> (WM, WN, KC, STAGES) of ``xatt_gemm`` (a CTA of
#: WM x WN warps with 64 x 64 warp tiles, i.e. 64 WM query tiles x 64 WN key tiles; KC-element
#: k-slices in a STAGES-deep cp.async ring), or None for the first kernel ``xatt_tiles``
#: (128 x 64, 64-element slices, double-buffered).
XA_CONFIGS: dict[str, tuple[int, int, int, int] | None] = {
    "256x128": (4, 2, 64, 3),       # 8 warps, 166 KB shared memory
    "128x128": (2, 2, 64, 4),       # 4 warps, 147 KB
    "128x128k128": (2, 2, 128, 3),  # 4 warps, 209 KB
    "128x256": (2, 4, 64, 3),       # 8 warps, 166 KB
    "v1": None,                     # 4 warps, 55 KB
    # Hopper only (score_xattn_wgmma.cu, sm_90a): CTA 128 x 256 = 2 consumer warpgroups of
    # wgmma m64n256k16 + 1 TMA producer warpgroup, 64-element k-slices, a ring of
    # STAGES = 4 48 KB stages (193 KB). Taken on sm_90 devices for bf16/fp16, D % 64 == 0
    # and L % stride == 0 (the TMA view [L/S, S, D]); elsewhere "128x256" runs instead.
    "wgmma": (2, 4, 64, 4),
}
#: The XAttention kernel used (a key of XA_CONFIGS): "wgmma" (Hopper, sm_90a) measured
#: 1.7-2.0x "128x256" on the H200 with bit-identical outputs, and falls back to "128x256"
#: where it does not apply (other GPUs, L % stride != 0, fp32 inputs); see
#: docs/benchmarks.md, "GPU scoring and selection kernels".
XA_CONFIG = "wgmma"
#: MoBA and Quest on tensor cores for bf16/fp16 with D in {64, 128} (False: FFMA rowcol).
POOLED_TENSOR_CORES = True
#: Benchmark hook: when a list, every launch appends ``(kernel name, start, end)`` events.
TRACE: list | None = None
_I32, _I64, _F32, _F64 = np.int32, np.int64, np.float32, np.float64
_XA_WGMMA_BROKEN: list[str] = []  # a build failure of xatt_wgmma, remembered: "wgmma" then
                                  # runs "128x256"
_XA_TMAPS: dict[tuple[Any, ...], Any] = {}
_BANDS: dict[tuple[int, ...], tuple[Any, ...]] = {}


def _run(filename: str, name: str, grid: tuple[int, ...], block: tuple[int, ...],
         args: tuple[Any, ...], shared_mem: int = 0) -> None:
    """Compile (once) and launch kernel ``name`` of ``filename``; traced when TRACE is a list."""
    fn = get_kernel(filename, name)
    if TRACE is None:
        launch(fn, grid, block, args, shared_mem=shared_mem)
        return
    a, b = cp.cuda.Event(), cp.cuda.Event()
    a.record()
    launch(fn, grid, block, args, shared_mem=shared_mem)
    b.record()
    TRACE.append((name, a, b))


def _vec(kind: str, D: int) -> int:
    """Elements per 16-byte load in ``pool_blocks`` (1 when D is not a multiple)."""
    v = 16 // np.dtype(np.float32 if kind == "float32" else np.float64 if kind == "float64"
                       else np.float16).itemsize
    return v if D % v == 0 else 1


def _pool_smem(D: int, V: int) -> int:
    nv = D // V
    return (1 if nv >= 256 else 256 // nv) * D * 8


def _tdtype(kind: str) -> Any:
    """CuPy dtype holding T's bits (bf16 as uint16)."""
    return cp.uint16 if kind == "bfloat16" else cp.dtype(kind)


def _pooled_tc(kind: str, D: int) -> bool:
    """True when MoBA / Quest run ``rowcol_tc`` (bf16/fp16, D in {64, 128}, sm_80+)."""
    return (POOLED_TENSOR_CORES and kind in ("bfloat16", "float16") and D in (64, 128)
            and tensor_cores_available())


def _rowcol_tc(kind: str, mode: int, qd: Any, A: Any, Bm: Any, out: Any, Hq: int, G: int,
               Sq: int, Sk: int, N: int, D: int, P: int, causal: bool) -> None:
    """Launch ``rowcol_tc<T, mode, D>``: 128-row CTAs; the column tiles of a row block are
    split over grid.y only as far as needed to fill the device (Q is read once per split)."""
    BH = out.shape[0] * out.shape[1]
    rows, ntile = _cdiv(Sq, 128), _cdiv(N, 64)
    target = 4 * _device_attr("sm_count")
    splits = min(ntile, max(1, _cdiv(target, rows * BH)))
    tpc = _cdiv(ntile, splits)
    nb = 2 if mode == 1 else 1
    smem = (128 + 2 * nb * 64) * (D + 8) * 2
    _run("score_rowcol.cu", f"rowcol_tc<{_CT[kind]}, {mode}, {D}>", (rows, _cdiv(ntile, tpc), BH),
         (128,), (qd, A, Bm, out, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(N), _I32(P),
                  _I32(bool(causal)), _I32(tpc)), shared_mem=smem)


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
        wg = _xa_wgmma(qd, kd, kind, BT, L, S, D)
        if wg is not None:
            fname, (name, BM, nthreads, smem), maps = "score_xattn_wgmma.cu", wg[0], wg[1]
        else:
            fname, maps = "score_xattn.cu", None
            name, BM, nthreads, smem = _xa_kernel(ct, BT, D)
        rows_alloc = _cdiv(n_real * BT, BM) * BM
        per_head = rows_alloc * (nbc + nch) * 4
        group = max(1, min(BH, XA_SCRATCH_BYTES // per_head))
        part = cp.empty((group, rows_alloc, nbc), cp.float32)
        mc = cp.empty((group, rows_alloc, nch), cp.float32)
        W = cp.zeros((B, Hq, nbp, nbp), cp.float32)
        for bh0 in range(0, BH, group):
            g = min(group, BH - bh0)
            if maps is not None:
                _run(fname, name, (rows_alloc // BM, g), (nthreads,),
                     (maps, part, mc, _I32(Hq), _I32(G), _I32(S), _I32(D), _I32(T),
                      _I32(rows_alloc), _I32(nch), _I32(nbc), _F32(scale * 1.4426950408889634),
                      _I32(bool(causal)), _I32(bh0)), shared_mem=smem)
            else:
                _run(fname, name, (rows_alloc // BM, g), (nthreads,),
                     (qd, kd, part, mc, _I32(Hq), _I32(G), _I32(L), _I32(S), _I32(D), _I32(T),
                      _I32(rows_alloc), _I32(nch), _I32(nbc), *strides,
                      _F32(scale * 1.4426950408889634), _I32(bool(causal)), _I32(bh0)),
                     shared_mem=smem)
            _run("score_xattn.cu", f"xatt_reduce<{BT}>", (n_real, g), (256,),
                 (part, mc, W, _I32(rows_alloc), _I32(nch), _I32(nbc), _I32(nbp),
                  _I32(T_real), _I32(bool(causal)), _I32(bh0)), shared_mem=nbc * 4)
    else:
        W = cp.zeros((B, Hq, nbp, nbp), cp.float64)
        _run("score_xattn.cu", f"xatt_exact<{_CT[kind]}>", (_cdiv(T_real, 4), BH), (128,),
             (qd, kd, W, _I32(Hq), _I32(G), _I32(L), _I32(S), _I32(D), _I32(T),
              _I32(T_real), _I32(BT), _I32(nbp), *strides, _F64(scale), _I32(bool(causal))))
    return _deliver((W,), out, host, ("W",))


def xattention_wgmma_fits(kind: str, L: int, stride: int, D: int) -> bool:
    """True when ``XA_CONFIG == "wgmma"`` would run ``xatt_wgmma`` (sm_90a) for this call:
    an sm_90 device, bf16/fp16, ``D % 64 == 0``, ``L % stride == 0`` and no earlier build
    failure (the caller also checked :func:`xattention_fast_path`)."""
    if _XA_WGMMA_BROKEN or kind not in ("bfloat16", "float16") or D % 64 or L % stride:
        return False
    try:
        from ._build import device_cc
        if device_cc() != 90:
            return False
    except Exception:  # pragma: no cover - no device
        return False
    return _device_attr("smem_optin") >= _xa_wgmma_smem(XA_CONFIGS["wgmma"][3])


def _xa_wgmma_smem(stages: int) -> int:
    return 1024 + stages * (128 + 256) * 128


def _xa_tensor_map(x: Any, kind: str, S: int, rows: int) -> bytes:
    """CUtensorMap of the contiguous 16-bit ``[B, H, L, D]`` array ``x`` viewed as
    ``[B, H, L/S, S, D]`` (5-d, innermost first D, S, L/S, H, B), box ``{64, 1, rows, 1, 1}``:
    one 64-element k-slice of ``rows`` tiles at token offset u; 128-byte swizzle, zero fill."""
    import ctypes

    from ._attn_wgmma import _TMAP_DTYPE, _encode_fn
    B, H, L, D = x.shape
    dims = [D, S, L // S, H, B]
    strides = [D * 2, S * D * 2, L * D * 2, H * L * D * 2]
    buf = ctypes.create_string_buffer(256)
    addr = (ctypes.addressof(buf) + 127) // 128 * 128
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    rc = _encode_fn()(ctypes.c_void_p(addr), _TMAP_DTYPE[kind], 5, ctypes.c_void_p(x.data.ptr),
                      (u64 * 5)(*dims), (u64 * 4)(*strides), (u32 * 5)(64, 1, rows, 1, 1),
                      (u32 * 5)(1, 1, 1, 1, 1), 0, 3, 3, 0)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {rc} (dims {dims}, "
                           f"strides {strides}, box 64 x 1 x {rows})")
    return ctypes.string_at(addr, 128)


def _xa_wgmma(qd: Any, kd: Any, kind: str, BT: int, L: int, S: int, D: int
              ) -> tuple[tuple[str, int, int, int], Any] | None:
    """``((kernel name, 128, 384, shared memory), tensor maps)`` of ``xatt_wgmma`` when
    XA_CONFIG is ``"wgmma"`` and it applies (:func:`xattention_wgmma_fits`), else None. A
    build failure is remembered in ``_XA_WGMMA_BROKEN`` (the config then runs "128x256"); a
    tensor map the driver refuses falls back for this call only."""
    if XA_CONFIG != "wgmma" or not xattention_wgmma_fits(kind, L, S, D):
        return None
    st = XA_CONFIGS["wgmma"][3]
    name = f"xatt_wgmma<{_CT[kind]}, {BT}, {st}>"
    try:
        get_kernel("score_xattn_wgmma.cu", name)
    except Exception as e:  # compile error: off for the rest of the process
        _XA_WGMMA_BROKEN.append(f"{name}: {type(e).__name__}: {e}")
        return None
    key = (cp.cuda.Device().id, qd.data.ptr, kd.data.ptr, qd.shape, kd.shape, kind, S)
    maps = _XA_TMAPS.get(key)
    if maps is None:
        try:
            host = _xa_tensor_map(qd, kind, S, 128) + _xa_tensor_map(kd, kind, S, 256)
        except RuntimeError:
            return None
        maps = cp.asarray(np.frombuffer(host, dtype=np.uint8))
        while len(_XA_TMAPS) >= 16:
            _XA_TMAPS.pop(next(iter(_XA_TMAPS)))
        _XA_TMAPS[key] = maps
    return (name, 128, 384, _xa_wgmma_smem(st)), maps


def _xa_kernel(ct: str, BT: int, D: int) -> tuple[str, int, int, int]:
    """``(kernel name, query tiles per CTA, threads, shared memory)`` of the XAttention
    tensor-core kernel selected by XA_CONFIG: KC drops to 64 when D % KC != 0, and a
    configuration whose shared memory exceeds the device's opt-in limit falls back to v1.
    ``"wgmma"`` (when :func:`_xa_wgmma` declined it) runs ``"128x256"``."""
    if XA_CONFIG not in XA_CONFIGS:
        raise ValueError(f"XA_CONFIG: expected one of {sorted(XA_CONFIGS)}, got {XA_CONFIG!r}")
    cfg = XA_CONFIGS["128x256" if XA_CONFIG == "wgmma" else XA_CONFIG]
    if cfg is not None:
        WM, WN, KC, ST = cfg
        if D % KC:
            KC = 64
        smem = ST * 64 * (WM + WN) * (KC + 8) * 2
        if smem <= _device_attr("smem_optin"):
            return f"xatt_gemm<{ct}, {BT}, {WM}, {WN}, {KC}, {ST}>", 64 * WM, 32 * WM * WN, smem
    return f"xatt_tiles<{ct}, {BT}>", 128, 128, _XA_SMEM


# ----------------------------------------------------------------------------- MoBA
@register("moba_score", "cupy")
def moba_score(q: Any, k: Any, block_size: int, *, out: Any = None) -> tuple[Any]:
    """MoBA gate ``s[b, h, t, j] = <q_t, kbar_j>`` (no scale, no softmax) for every key block.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``; returns ``(gate,)`` ``[B, Hq, Sq, Kb]``,
    ``Kb = ceil(Sk / block_size)``. ``kbar_j`` is the mean over the block's true length,
    summed in float64 and rounded to k's dtype, as the reference (``pooled_keys``). bf16/fp16
    with D in {64, 128}: the means are stored in k's dtype (exactly the rounded values) and
    the gate runs on tensor cores with fp32 accumulation (products exact); else FFMA.
    """
    qd, kd, kind, host, (B, Hq, Hkv, Sq, Sk, D) = _qk(q, k, "moba_score")
    bs = _positive("block_size", block_size)
    kb = _cdiv(Sk, bs)
    ct, (acc_t, acc_dt) = _CT[kind], _acc(kind)
    V = _vec(kind, D)
    tc = _pooled_tc(kind, D)
    kbar = cp.empty((B, Hkv, kb, D), _tdtype(kind) if tc else cp.float64)
    _run("score_pool.cu", f"pool_blocks<{ct}, {V}, {ct if tc else 'double'}>",
         (kb, B * Hkv), (256,),
         (kd, kbar, kbar, _I32(B * Hkv), _I32(Sk), _I32(kb), kd, kbar, kbar, _I32(Sk), _I32(kb),
          _I32(D), _I32(bs), _I32(1), _I32(kind != "float64"), _I32(0), kbar, kbar),
         shared_mem=_pool_smem(D, V))
    gate = cp.empty((B, Hq, Sq, kb), acc_dt)
    if tc:
        _rowcol_tc(kind, 0, qd, kbar, kbar, gate, Hq, Hq // Hkv, Sq, Sk, kb, D, 1, False)
    else:
        _run("score_rowcol.cu", f"rowcol<{ct}, {acc_t}, 0>",
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
    (all pages when ``t < 0``) are ``-inf``, as the reference ``quest_bound``. bf16/fp16 with
    D in {64, 128}: the page bounds stay in k's dtype (exact) and the bound is
    ``q+ . M + q- . m`` on tensor cores (fp32 accumulation); else FFMA.
    """
    qd, kd, kind, host, (B, Hq, Hkv, Sq, Sk, D) = _qk(q, k, "quest_score")
    P = _positive("page_size", page_size)
    n = _cdiv(Sk, P)
    ct, (acc_t, acc_dt) = _CT[kind], _acc(kind)
    G = Hq // Hkv
    tc = _pooled_tc(kind, D)
    bdt = _tdtype(kind) if tc else cp.float64
    M = cp.empty((B, Hkv, n, D), bdt)
    m = cp.empty((B, Hkv, n, D), bdt)
    _run("score_pool.cu", f"page_minmax<{ct}, {ct if tc else 'double'}>",
         (_cdiv(n, 8), B * Hkv), (256,), (kd, M, m, _I32(Sk), _I32(D), _I32(P), _I32(n)))
    U = cp.empty((B, Hq, Sq, n), acc_dt)
    if tc:
        _rowcol_tc(kind, 1, qd, M, m, U, Hq, G, Sq, Sk, n, D, P, causal)
    else:
        _run("score_rowcol.cu", f"rowcol<{ct}, {acc_t}, 1>",
             (_cdiv(n, 64), _cdiv(Sq, 64), B * Hq), (256,),
             (qd, M, m, U, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(n), _I32(D), _I32(P),
              _I32(bool(causal))))
    if causal:
        if D <= 256:   # one warp per (page, query head) over the pages that hold a row
            p_lo, p_hi = max(0, Sk - Sq) // P, (Sk - 1) // P
            _run("score_rowcol.cu", f"quest_own_page<{ct}, {acc_t}>",
                 (_cdiv(p_hi - p_lo + 1, 4), B * Hq), (128,),
                 (qd, kd, U, _I32(Hq), _I32(G), _I32(Sq), _I32(Sk), _I32(D), _I32(P), _I32(n),
                  _I32(p_lo), _I32(p_hi)))
        else:
            _run("score_rowcol.cu", f"quest_own<{ct}, {acc_t}>", (_cdiv(Sq, 4), B * Hq), (128,),
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


def _bands(D: int, h_dim: int, l_dim: int) -> tuple[Any, ...]:
    """Device copies of the band dims and their multiplicities, cached:
    ``(w_hi, w_lo double [D], dims_hi, dims_lo int32, n_hi, n_lo)``."""
    key = (cp.cuda.Device().id, D, h_dim, l_dim)
    got = _BANDS.get(key)
    if got is None:
        hi, lo = _high_band(D, h_dim), _low_band(D, l_dim)
        got = (cp.asarray(np.bincount(hi, minlength=D).astype(np.float64)),
               cp.asarray(np.bincount(lo, minlength=D).astype(np.float64)),
               cp.asarray(np.concatenate([hi, [0]]).astype(np.int32)),  # never empty
               cp.asarray(np.concatenate([lo, [0]]).astype(np.int32)), len(hi), len(lo))
        _BANDS[key] = got
    return got


@register("prism_score", "cupy")
def prism_score(q: Any, k: Any, block_size: int, high_freq_dim: int, low_freq_dim: int,
                calibrate: bool, high_temp: float, low_temp: float, *,
                out: Any = None) -> tuple[Any, ...]:
    """Prism's dual-band pooled block logits and probabilities, float64 (see the reference
    ``refattn.methods.prism.prism_score``).

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``; with ``n_q = ceil(Sq/b)``, ``n_k =
    ceil(Sk/b)`` returns ``(logits_high, logits_low, probs_high, probs_low)``
    ``[B, Hq, n_q, n_k]`` (future blocks ``-inf`` / 0) and ``(scale_high, scale_low)``
    ``[B, Hq]``. Four launches, all float64: ``pool_blocks`` (the zero-padded block means of
    Q and K in one pass, with each block's sums of squares for the calibration),
    ``prism_scales`` (the band scales per head), then ``prism_band`` once per band (the
    causal logits over the band's dims and the row softmax).
    """
    qd, kd, kind, host, (B, Hq, Hkv, Sq, Sk, D) = _qk(q, k, "prism_score")
    b = _positive("block_size", block_size)
    h_dim, l_dim = int(high_freq_dim), int(low_freq_dim)
    nq, nk = _cdiv(Sq, b), _cdiv(Sk, b)
    G = Hq // Hkv
    V = _vec(kind, D)
    w_hi, w_lo, dims_hi, dims_lo, n_hi, n_lo = _bands(D, h_dim, l_dim)
    qb = cp.empty((B * Hq, nq, D), cp.float64)
    kb = cp.empty((B * Hkv, nk, D), cp.float64)
    stq = cp.empty((B * Hq, nq, 3), cp.float64)
    stk = cp.empty((B * Hkv, nk, 3), cp.float64)
    _run("score_pool.cu", f"pool_blocks<{_CT[kind]}, {V}, double>",
         (max(nq, nk), B * Hq + B * Hkv), (256,),
         (qd, qb, stq, _I32(B * Hq), _I32(Sq), _I32(nq), kd, kb, stk, _I32(Sk), _I32(nk),
          _I32(D), _I32(b), _I32(0), _I32(0), _I32(1), w_hi, w_lo),
         shared_mem=_pool_smem(D, V))
    sh = cp.empty((B, Hq), cp.float64)
    sl = cp.empty((B, Hq), cp.float64)
    _run("score_prism.cu", "prism_scales<double>", (B * Hq,), (256,),
         (stq, stk, sh, sl, _I32(Hq), _I32(G), _I32(nq), _I32(nk), _I32(D), _I32(n_hi),
          _I32(n_lo), _I32(h_dim), _I32(l_dim), _I32(bool(calibrate)), _F64(float(high_temp)),
          _F64(float(low_temp))))
    zh, zl, ph, pl = (cp.empty((B, Hq, nq, nk), cp.float64) for _ in range(4))
    for dims, nd, sig, z, p in ((dims_hi, n_hi, sh, zh, ph), (dims_lo, n_lo, sl, zl, pl)):
        _run("score_prism.cu", "prism_band<double>", (_cdiv(nq, 64), B * Hq), (256,),
             (qb, kb, dims, _I32(nd), sig, z, p, _I32(Hq), _I32(G), _I32(nq), _I32(nk), _I32(D)))
    return _deliver((zh, zl, ph, pl, sh, sl), out, host,
                    ("logits_high", "logits_low", "probs_high", "probs_low", "scale_high",
                     "scale_low"))


__all__ = ["xattention_score", "moba_score", "quest_score", "prism_score",
           "xattention_fast_path", "xattention_wgmma_fits", "XA_CONFIGS"]
