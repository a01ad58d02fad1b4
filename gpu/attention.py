"""CuPy launchers for block-sparse attention, forward and backward (ops ``attention_fwd``
and ``attention_bwd`` of the registry, backend ``"cupy"``).

Arrays are canonical ``bhsd``: q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``,
v ``[B, Hkv, Sk, Dv]``; NumPy or CuPy (anything exposing ``__cuda_array_interface__`` or a
CUDA DLPack device arrives as CuPy through :func:`refattn.core.layout.as_array`). Results are
fp32 (``out [B, Hq, Sq, Dv]``, ``lse [B, Hq, Sq]`` natural log; ``dq``, ``dk``, ``dv`` in the
shapes of q, k, v), CuPy when q came as CuPy, NumPy when q came as NumPy.

Which kernel runs (all agree with the float64 reference within the DESIGN tolerance rule):

* bf16 / fp16, D == Dv in {64, 128}, device sm_80+:
    - dense, or a BlockMask with block_q and block_k multiples of 64: tensor-core
      flash-attention (``attn_fwd.cu`` / ``attn_bwd.cu``, mma.sync m16n8k16, fp32 accumulate
      and softmax) over the canonical index form (backward over ``BlockMask.transpose()``);
    - block_q == 1 (per-token routing, MoBA), block_k a multiple of 64: the FlashMoBA-style
      gather kernels (query rows that chose a key block are gathered into dense tiles).
* anything else (fp32 inputs, other head dims or block sizes): ``attn_rowwise.cu``, one warp
  per query row, exact fp32 FFMA (no tf32). float64 inputs are computed as float32.
* Hopper (sm_90), forward, unless ``REFATTN_WGMMA=0`` (on by default since it passed the
  GPU tests and measured 1.4-1.6x FlexAttention at S = 32768; docs/gpu_notes.md): dense, or block_q % 128 == 0 and block_k % 64 == 0,
  D == Dv in {64, 128}, 16-bit inputs: ``attn_fwd_wgmma.cu`` (wgmma + TMA, warp-specialised,
  compiled for sm_90a), over the same index form; anything it cannot take, or a failure to
  build it, falls back to the mma.sync kernel.
* Hopper (sm_90), backward, when ``REFATTN_WGMMA_BWD`` (default :data:`WGMMA_BWD_DEFAULT`) is
  not "0": dense, or block_q % 64 == 0 and block_k % 128 == 0, D == Dv == 128, 16-bit inputs:
  ``attn_bwd_wgmma.cu`` (wgmma + TMA, warp-specialised, sm_90a) over the transposed index
  form; anything else, or a failure to build it, falls back to the mma.sync backward.

Causal is bottom-right aligned. A row that sees no key gets output 0 and LSE -inf.
"""
from __future__ import annotations

import ctypes
import math
import os
import warnings
from collections import OrderedDict
from typing import Any

import cupy as cp
import numpy as np

from refattn.core.blockmask import BlockMask, prepare_mask
from refattn.core.errors import InputError
from refattn.core.layout import AttnShape, as_array

from ._build import device_cc, get_kernel, launch, tensor_cores_available

LOG2E = 1.4426950408889634
_CT = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}

#: Forward tile (BM query rows, BN keys) per head dim for masks whose block_q is a multiple
#: of 128 (and for dense); 4 warps, 32 rows each. Masks with block_q % 128 != 0 (but % 64 == 0)
#: use (64, 64). docs/gpu_notes.md has the measurements behind the choice.
FWD_TILES: dict[int, tuple[int, int]] = {64: (128, 64), 128: (128, 64)}

#: Gathered query rows per CTA in the per-token-routing (block_q = 1) forward.
GATHER_BM = 128
#: Keys per CTA in the backward (8 warps); 64 (4 warps) where the mask's block_k is not a
#: multiple of it. Larger tiles halve the dQ atomics per FLOP (docs/gpu_notes.md).
BWD_BN = 128

_NULL = np.uint64(0)


# ----------------------------------------------------------------------------- arrays
class _Dev:
    """A device array as the kernels see it: ``raw`` (CuPy, 16-bit floats viewed as uint16),
    ``kind`` (``"float16" | "bfloat16" | "float32"``) and element strides."""

    __slots__ = ("raw", "kind")

    def __init__(self, raw: Any, kind: str) -> None:
        self.raw, self.kind = raw, kind

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape)

    def strides(self) -> tuple[int, ...]:
        return tuple(s // self.raw.itemsize for s in self.raw.strides)


def _dtype_name(x: Any) -> str:
    return str(x.dtype)


def _to_device(x: Any, name: str) -> _Dev:
    """Upload (NumPy) or wrap (CuPy) ``x``; bf16 travels as its uint16 bit pattern."""
    x = as_array(x, name)
    kind = _dtype_name(x)
    if kind not in ("float16", "bfloat16", "float32", "float64"):
        raise InputError(f"{name}: expected float16, bfloat16, float32 or float64, got {kind}")
    if isinstance(x, np.ndarray):
        if kind == "bfloat16":
            return _Dev(cp.asarray(np.ascontiguousarray(x).view(np.uint16)), "bfloat16")
        if kind == "float64":
            return _Dev(cp.asarray(x, dtype=cp.float32), "float32")
        return _Dev(cp.asarray(x), kind)
    if kind == "bfloat16":
        return _Dev(x.view(cp.uint16), "bfloat16")
    if kind == "float64":
        return _Dev(x.astype(cp.float32), "float32")
    return _Dev(x, kind)


def _kernel_ready(d: _Dev) -> _Dev:
    """Rows must be contiguous and 16-byte aligned (cp.async); otherwise copy once."""
    x = d.raw
    item = x.itemsize
    ok = (x.strides[-1] == item or x.shape[-1] == 1) and x.data.ptr % 16 == 0 and all(
        (s % 16 == 0) for s, n in zip(x.strides[:-1], x.shape[:-1], strict=True) if n > 1)
    return d if ok else _Dev(cp.ascontiguousarray(x), d.kind)


def _cast(d: _Dev, kind: str) -> _Dev:
    """Contiguous copy of ``d`` in ``kind`` (round to nearest even)."""
    if d.kind == kind:
        return _Dev(cp.ascontiguousarray(d.raw), kind)
    src = cp.ascontiguousarray(d.raw)
    if d.kind in ("float32",) and kind == "float16":
        return _Dev(src.astype(cp.float16), kind)
    if d.kind == "float16" and kind == "float32":
        return _Dev(src.astype(cp.float32), kind)
    out = cp.empty(src.shape, cp.float32 if kind == "float32" else cp.uint16)
    fn = get_kernel("attn_rowwise.cu", f"cast_kernel<{_CT[d.kind]}, {_CT[kind]}>")
    n = src.size
    launch(fn, (min(65535, max(1, -(-n // 256))),), (256,), (src, out, np.int64(n)))
    return _Dev(out, kind)


def _f32(x: Any, name: str) -> Any:
    """``x`` (any float array) as a contiguous fp32 CuPy array."""
    return _cast(_to_device(x, name), "float32").raw


def _check_out(out: Any, shapes: tuple[tuple[int, ...], ...], names: tuple[str, ...],
               host: bool) -> tuple[Any, ...] | None:
    if out is None:
        return None
    if not isinstance(out, (tuple, list)) or len(out) != len(shapes):
        raise InputError(f"out: expected a tuple of {len(shapes)} arrays {names}")
    for o, shp, nm in zip(out, shapes, names, strict=True):
        want = np.ndarray if host else cp.ndarray
        if not isinstance(o, want):
            raise InputError(f"out[{nm}]: expected a {'NumPy' if host else 'CuPy'} array "
                             f"(the kind of q), got {type(o).__name__}")
        if tuple(o.shape) != shp or str(o.dtype) not in ("float32", "float64"):
            raise InputError(f"out[{nm}]: expected float32 (or float64) of shape {shp}, got "
                             f"{o.dtype} {tuple(o.shape)}")
    return tuple(out)


def _deliver(results: tuple[Any, ...], out: tuple[Any, ...] | None, host: bool) -> tuple[Any, ...]:
    """Copy fp32 device results into ``out`` (or return them, on the host when ``host``)."""
    if out is None:
        return tuple(r.get() if host else r for r in results)
    for r, o in zip(results, out, strict=True):
        if host:
            o[...] = r.get()
        elif o.dtype == r.dtype and o.flags.c_contiguous and o.data.ptr == r.data.ptr:
            pass
        else:
            o[...] = r
    return out


def _shape(q: _Dev, k: _Dev, v: _Dev) -> AttnShape:
    if len(q.shape) != 4 or len(k.shape) != 4 or len(v.shape) != 4:
        raise InputError(f"q, k, v: expected 4-d bhsd arrays, got {q.shape}, {k.shape}, {v.shape}")
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    if (Bk, Dk) != (B, D) or v.shape[:3] != (B, Hkv, Sk):
        raise InputError(f"q {q.shape}, k {k.shape}, v {v.shape}: batch, heads, lengths or head "
                         "dims do not match")
    if Hq % Hkv:
        raise InputError(f"GQA: {Hq} query heads are not a multiple of {Hkv} kv heads")
    if not (q.kind == k.kind == v.kind):
        raise InputError(f"q, k, v: one dtype expected, got {q.kind}, {k.kind}, {v.kind}")
    if max(D, v.shape[3]) > 256:
        raise InputError(f"head dim: the cupy backend supports D, Dv <= 256, got {D}, {v.shape[3]}")
    return AttnShape(B, Hq, Hkv, Sq, Sk, D, v.shape[3])


# ----------------------------------------------------------------------------- masks
_CACHE: "OrderedDict[tuple, tuple[Any, Any]]" = OrderedDict()
_CACHE_SIZE = 8


def _cached(key: tuple, mask: BlockMask, build: Any) -> Any:
    """Small LRU of device-side mask structures; holds ``mask`` so that its id stays valid."""
    key = (id(mask),) + key
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is mask:
        _CACHE.move_to_end(key)
        return hit[1]
    val = build()
    _CACHE[key] = (mask, val)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return val


def _index_args(mask: BlockMask, transpose: bool) -> tuple[Any, ...]:
    """(num, idx, n_sb, n_sh, i_sb, i_sh, width) of the canonical (or transposed) index form
    on the device; B or H of 1 broadcast through zero strides."""
    def build() -> tuple[Any, ...]:
        num, idx = mask.transpose() if transpose else mask.to_indices()
        Bm, Hm, R, W = idx.shape
        # device masks (BlockMask.on_device) give CuPy index forms: no host round trip
        dnum = cp.ascontiguousarray(cp.asarray(num), dtype=cp.int32)
        didx = cp.ascontiguousarray(cp.asarray(idx), dtype=cp.int32)
        return (dnum, didx, np.int64(Hm * R if Bm > 1 else 0), np.int64(R if Hm > 1 else 0),
                np.int64(Hm * R * W if Bm > 1 else 0), np.int64(R * W if Hm > 1 else 0),
                np.int32(W))
    return _cached(("T" if transpose else "I",), mask, build)


def _gather_plan(mask: BlockMask, shape: AttnShape, BM: int = 64) -> dict[str, Any]:
    """Per-token routing (block_q = 1) regrouped by key block, on the device.

    Pairs (b, h, row, kb) are numbered in row-major order (``row_ptr [B*Hq*Sq + 1]`` gives
    each row's pairs, for the combine). ``g_rows``/``g_pair`` list the pairs again grouped by
    segment (b, h, kb), rows ascending; ``seg_off``/``seg_cnt`` delimit the segments and
    ``tile_seg``/``tile_start`` cut them into ``BM``-row tiles.
    """
    def build() -> dict[str, Any]:
        B, Hq, Sq = shape.batch, shape.q_heads, shape.q_len
        Kb = mask.num_k_blocks
        m = cp.asarray(mask.mask)
        m = cp.ascontiguousarray(cp.broadcast_to(m, (B, Hq, Sq, Kb)))
        counts = m.sum(axis=-1, dtype=cp.int64).ravel()
        row_ptr = cp.zeros(counts.size + 1, cp.int64)
        cp.cumsum(counts, out=row_ptr[1:])
        flat = cp.flatnonzero(m.ravel())                      # (b, h, row, kb) row-major
        kb = flat % Kb
        bhr = flat // Kb
        row = bhr % Sq
        bh = bhr // Sq
        seg = bh * Kb + kb
        order = cp.argsort(seg * Sq + row)
        nseg = B * Hq * Kb
        seg_cnt = cp.bincount(seg, minlength=nseg).astype(cp.int64)
        seg_off = cp.zeros(nseg, cp.int64)
        if nseg > 1:
            cp.cumsum(seg_cnt[:-1], out=seg_off[1:])
        ntiles = (seg_cnt + BM - 1) // BM
        tile_end = cp.cumsum(ntiles)
        total = int(tile_end[-1]) if nseg else 0
        tid = cp.arange(total, dtype=cp.int64)
        tile_seg = cp.searchsorted(tile_end, tid, side="right")
        tile_start = (tid - (tile_end[tile_seg] - ntiles[tile_seg])) * BM
        return {"row_ptr": row_ptr, "g_rows": row[order].astype(cp.int32),
                "g_pair": order.astype(cp.int64), "seg_off": seg_off,
                "seg_cnt": seg_cnt.astype(cp.int32), "tile_seg": tile_seg.astype(cp.int32),
                "tile_start": tile_start.astype(cp.int32), "nnz": int(flat.size),
                "ntiles": total, "Kb": Kb}
    return _cached(("G", shape.batch, shape.q_heads, BM), mask, build)


def _prepare(mask: Any, shape: AttnShape) -> BlockMask | None:
    if mask is not None and not isinstance(mask, BlockMask):
        raise InputError(f"mask: the cupy backend takes a BlockMask (or None), got "
                         f"{type(mask).__name__}; token-level masks run on the reference")
    m = prepare_mask(mask, shape)
    return m


def _path(q: _Dev, shape: AttnShape, mask: BlockMask | None) -> str:
    """``"block"`` (tensor cores, index form), ``"gather"`` (tensor cores, per-token routing)
    or ``"rowwise"`` (SIMT fp32)."""
    tc = (q.kind in ("float16", "bfloat16") and shape.head_dim == shape.v_dim
          and shape.head_dim in (64, 128) and tensor_cores_available())
    if not tc:
        return "rowwise"
    if mask is None:
        return "block"
    if mask.block_k % 64:
        return "rowwise"
    if mask.block_q % 64 == 0:
        return "block"
    if mask.block_q == 1:
        return "gather"
    return "rowwise"


def _strides(*ds: _Dev) -> tuple[np.int64, ...]:
    out: list[np.int64] = []
    for d in ds:
        s = d.strides()
        out += [np.int64(s[0]), np.int64(s[1]), np.int64(s[2])]
    return tuple(out)


def _epl(shape: AttnShape) -> int:
    n = -(-max(shape.head_dim, shape.v_dim) // 32)
    return 2 if n <= 2 else 4 if n <= 4 else 8


# ----------------------------------------------------------------------------- wgmma (sm_90a)
#: Value of ``REFATTN_WGMMA`` when unset: "1" runs the Hopper wgmma forward ("0" turns it off).
WGMMA_DEFAULT = "1"
#: Tunables of the wgmma forward: K/V pipeline depth and the intra-warpgroup overlap of the
#: softmax with the P V product (docs/gpu_notes.md, "v-wgmma").
WGMMA_CONFIG: dict[str, Any] = {"stages": 2, "ovl": False}
_WGMMA_BROKEN: list[str] = []  # a build failure, remembered: the path then stays off
_TMAPS: "OrderedDict[tuple, Any]" = OrderedDict()
_TMAP_FN: Any = None
_TMAP_DTYPE = {"float16": 6, "bfloat16": 9}  # CU_TENSOR_MAP_DATA_TYPE_{FLOAT16,BFLOAT16}


def wgmma_enabled() -> bool:
    """``REFATTN_WGMMA`` (default :data:`WGMMA_DEFAULT`) is not "0", the device is sm_90 and
    no earlier build of the kernel failed."""
    if os.environ.get("REFATTN_WGMMA", WGMMA_DEFAULT).strip() == "0" or _WGMMA_BROKEN:
        return False
    try:
        return device_cc() == 90
    except Exception:  # pragma: no cover - no device
        return False


def _wgmma_fits(q: _Dev, shape: AttnShape, mask: BlockMask | None) -> bool:
    if q.kind not in ("float16", "bfloat16") or shape.head_dim != shape.v_dim:
        return False
    if shape.head_dim not in (64, 128):
        return False
    return mask is None or (mask.block_q % 128 == 0 and mask.block_k % 64 == 0)


def _encode_fn() -> Any:
    global _TMAP_FN
    if _TMAP_FN is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
        fn.restype = ctypes.c_int
        u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p,
                       u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _TMAP_FN = fn
    return _TMAP_FN


def tensor_map(d: _Dev, box_rows: int) -> bytes:
    """The 128-byte ``CUtensorMap`` (driver ``cuTensorMapEncodeTiled``) of a 16-bit
    ``[B, H, S, D]`` array: 4-d, innermost first (D, S, H, B), box 64 x ``box_rows``,
    128-byte swizzle, zero fill out of bounds, L2 promotion 256 B."""
    B, H, S, D = d.shape
    sb, sh, ss, sd = d.strides()
    if sd != 1 and D > 1:
        raise ValueError("tensor_map: the last axis must be contiguous")
    dims = [D, S, H, B]
    strides = [ss * 2, sh * 2, sb * 2]
    # a size-1 axis may carry any stride: give it one TMA accepts
    for i in range(3):
        if dims[i + 1] == 1:
            strides[i] = (strides[i - 1] * dims[i]) if i else D * 2
    if any(s <= 0 or s % 16 or s >= 1 << 40 for s in strides):
        raise ValueError(f"tensor_map: strides {strides} (bytes) not multiples of 16 in (0, 2^40)")
    buf = ctypes.create_string_buffer(256)
    addr = (ctypes.addressof(buf) + 127) // 128 * 128
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    rc = _encode_fn()(ctypes.c_void_p(addr), _TMAP_DTYPE[d.kind], 4, ctypes.c_void_p(d.raw.data.ptr),
                      (u64 * 4)(*dims), (u64 * 3)(*strides), (u32 * 4)(64, box_rows, 1, 1),
                      (u32 * 4)(1, 1, 1, 1), 0, 3, 3, 0)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {rc} (dims {dims}, "
                           f"strides {strides}, box 64 x {box_rows})")
    return ctypes.string_at(addr, 128)


def _tensor_maps(qd: _Dev, kd: _Dev, vd: _Dev, bn: int) -> Any:
    """q, k, v tensor maps (box rows 128, bn, bn) in one device buffer of 384 bytes, cached
    by geometry (the maps depend only on the pointer, shape, strides, dtype and box)."""
    key = tuple((d.raw.data.ptr, d.shape, d.strides(), d.kind) for d in (qd, kd, vd)) + (bn,)
    hit = _TMAPS.get(key)
    if hit is not None:
        _TMAPS.move_to_end(key)
        return hit
    host = tensor_map(qd, 128) + tensor_map(kd, bn) + tensor_map(vd, bn)
    dev = cp.asarray(np.frombuffer(host, dtype=np.uint8))
    _TMAPS[key] = dev
    while len(_TMAPS) > 16:
        _TMAPS.popitem(last=False)
    return dev


def wgmma_kernel(T: str, D: int, BN: int, stages: int | None = None, ovl: bool | None = None
                 ) -> tuple[Any, str]:
    """The wgmma forward kernel and its template name (``T`` a C++ type name)."""
    st = WGMMA_CONFIG["stages"] if stages is None else stages
    ov = WGMMA_CONFIG["ovl"] if ovl is None else ovl
    name = f"attn_fwd_wgmma<{T}, {D}, {BN}, {st}, {'true' if ov else 'false'}>"
    return get_kernel("attn_fwd_wgmma.cu", name), name


def wgmma_smem(D: int, BN: int, stages: int) -> int:
    return 1024 + 128 * D * 2 + 2 * stages * BN * D * 2


def _fwd_wgmma(qd: _Dev, kd: _Dev, vd: _Dev, shape: AttnShape, m: BlockMask | None, o: Any,
               lse: Any, sl2: Any, cz: Any, *, stages: int | None = None,
               ovl: bool | None = None) -> None:
    """Launch ``attn_fwd_wgmma`` (the caller checked :func:`_wgmma_fits`)."""
    B, Hq, Hkv, Sq, Sk, D = (shape.batch, shape.q_heads, shape.kv_heads, shape.q_len,
                             shape.k_len, shape.head_dim)
    BN = 128 if (m is None or m.block_k % 128 == 0) else 64
    st = WGMMA_CONFIG["stages"] if stages is None else stages
    fn, _ = wgmma_kernel(_CT[qd.kind], D, BN, st, ovl)
    maps = _tensor_maps(qd, kd, vd, BN)
    if m is None:
        idx_args = (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int32(0))
        bq, bk = 128, BN
    else:
        idx_args = _index_args(m, transpose=False)
        bq, bk = m.block_q, m.block_k
    launch(fn, (-(-Sq // 128), Hq, B), (384,),
           (maps, o, lse, np.int32(Hq), np.int32(Hkv), np.int32(Sq), np.int32(Sk), sl2, cz)
           + idx_args + (np.int32(bq), np.int32(bk)), wgmma_smem(D, BN, st))


# ----------------------------------------------------------------------------- wgmma backward
#: Value of ``REFATTN_WGMMA_BWD`` when unset: "1" runs the Hopper wgmma backward
#: (``attn_bwd_wgmma.cu``), "0" keeps the mma.sync backward. On since the H200 probe
#: (``scripts/probe_wgmma.py --only bwd,bwdbench``) passed every case and measured 1.5-1.6x
#: the mma.sync backward (docs/gpu_notes.md, "v-wgmma-bwd").
WGMMA_BWD_DEFAULT = "1"
#: Tunables of the wgmma backward: depth of the Q / dO ring (2 or 3).
WGMMA_BWD_CONFIG: dict[str, Any] = {"stages": 3}
_WGMMA_BWD_BROKEN: list[str] = []  # a build failure, remembered: the path then stays off


def wgmma_bwd_enabled() -> bool:
    """``REFATTN_WGMMA_BWD`` (default :data:`WGMMA_BWD_DEFAULT`) is not "0", the device is
    sm_90 and no earlier build of the backward kernel failed."""
    if (os.environ.get("REFATTN_WGMMA_BWD", WGMMA_BWD_DEFAULT).strip() == "0"
            or _WGMMA_BWD_BROKEN):
        return False
    try:
        return device_cc() == 90
    except Exception:  # pragma: no cover - no device
        return False


def _wgmma_bwd_fits(q: _Dev, shape: AttnShape, mask: BlockMask | None) -> bool:
    if q.kind not in ("float16", "bfloat16") or shape.head_dim != shape.v_dim:
        return False
    if shape.head_dim != 128:
        return False
    return mask is None or (mask.block_q % 64 == 0 and mask.block_k % 128 == 0)


def wgmma_bwd_kernel(T: str, D: int, stages: int | None = None) -> tuple[Any, str]:
    """The wgmma backward kernel and its template name (``T`` a C++ type name)."""
    st = WGMMA_BWD_CONFIG["stages"] if stages is None else stages
    name = f"attn_bwd_wgmma<{T}, {D}, {st}>"
    return get_kernel("attn_bwd_wgmma.cu", name), name


def wgmma_bwd_smem(D: int, stages: int) -> int:
    return 1024 + 2 * 128 * D * 2 + stages * 2 * 64 * D * 2 + 2 * 128 * 64 * 2


def _tensor_maps_boxes(pairs: tuple[tuple[_Dev, int], ...]) -> Any:
    """Tensor maps of ``(array, box rows)`` pairs, concatenated in one device buffer (128
    bytes each), cached by geometry as :func:`_tensor_maps`."""
    key = ("boxes",) + tuple((d.raw.data.ptr, d.shape, d.strides(), d.kind, r) for d, r in pairs)
    hit = _TMAPS.get(key)
    if hit is not None:
        _TMAPS.move_to_end(key)
        return hit
    host = b"".join(tensor_map(d, r) for d, r in pairs)
    dev = cp.asarray(np.frombuffer(host, dtype=np.uint8))
    _TMAPS[key] = dev
    while len(_TMAPS) > 16:
        _TMAPS.popitem(last=False)
    return dev


def _bwd_wgmma(qd: _Dev, kd: _Dev, vd: _Dev, dod: _Dev, shape: AttnShape, m: BlockMask | None,
               lse32: Any, delta: Any, dq: Any, dk: Any, dv: Any, scale: float, cz: Any, *,
               stages: int | None = None) -> None:
    """Launch ``attn_bwd_wgmma`` (the caller checked :func:`_wgmma_bwd_fits`; ``dq`` zeroed,
    ``dod`` the 16-bit dO, contiguous)."""
    B, Hq, Hkv, Sq, Sk, D = (shape.batch, shape.q_heads, shape.kv_heads, shape.q_len,
                             shape.k_len, shape.head_dim)
    st = WGMMA_BWD_CONFIG["stages"] if stages is None else stages
    fn, _ = wgmma_bwd_kernel(_CT[qd.kind], D, st)
    try:
        maps = _tensor_maps_boxes(((qd, 64), (kd, 128), (vd, 128), (dod, 64)))
    except RuntimeError as e:  # the driver refused this geometry: fall back for this call only
        raise ValueError(str(e)) from e
    if m is None:
        t_args = (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int32(0),
                  np.int32(64), np.int32(128))
    else:
        t_args = _index_args(m, transpose=True) + (np.int32(m.block_q), np.int32(m.block_k))
    launch(fn, (-(-Sk // 128), Hkv, B), (384,),
           (maps, lse32, delta, dq, dk, dv, np.int32(Hq), np.int32(Hkv), np.int32(Sq),
            np.int32(Sk), np.float32(scale), np.float32(scale * LOG2E), cz) + t_args,
           wgmma_bwd_smem(D, st))


# ----------------------------------------------------------------------------- forward
def attention_fwd(q: Any, k: Any, v: Any, mask: Any = None, causal: bool = False,
                  scale: float | None = None, *, out: tuple[Any, Any] | None = None
                  ) -> tuple[Any, Any]:
    """Block-sparse attention forward on the GPU.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]`` (bf16, fp16, fp32;
    fp64 is computed as fp32); ``mask`` a :class:`BlockMask` or None (dense); ``causal``
    bottom-right aligned; ``scale`` defaults to ``1/sqrt(D)``. Returns ``out fp32
    [B, Hq, Sq, Dv]`` and ``lse fp32 [B, Hq, Sq]`` (natural log), written into ``out=`` when
    given (float32/float64 arrays of the kind of q: NumPy or CuPy).
    """
    host = isinstance(q, np.ndarray)
    qd, kd, vd = (_kernel_ready(_to_device(x, n)) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    shape = _shape(qd, kd, vd)
    B, Hq, Hkv, Sq, Sk, D, Dv = (shape.batch, shape.q_heads, shape.kv_heads, shape.q_len,
                                 shape.k_len, shape.head_dim, shape.v_dim)
    out = _check_out(out, ((B, Hq, Sq, Dv), (B, Hq, Sq)), ("out", "lse"), host)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise InputError(f"scale: expected a finite positive number, got {scale!r}")
    m = _prepare(mask, shape)
    path = _path(qd, shape, m)
    o = cp.empty((B, Hq, Sq, Dv), cp.float32)
    lse = cp.empty((B, Hq, Sq), cp.float32)
    sl2 = np.float32(scale * LOG2E)
    cz = np.int32(bool(causal))
    strides = _strides(qd, kd, vd)
    T = _CT.get(qd.kind)

    if path == "rowwise":
        if m is None:
            idx_args = (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0),
                        np.int32(0))
            bq, bk = 1, 64
        else:
            idx_args = _index_args(m, transpose=False)
            bq, bk = m.block_q, m.block_k
        fn = get_kernel("attn_rowwise.cu", f"attn_fwd_rowwise<{T}, {_epl(shape)}>")
        launch(fn, (-(-Sq // 4), Hq, B), (128,),
               (qd.raw, kd.raw, vd.raw, o, lse) + strides +
               (np.int32(D), np.int32(Dv), np.int32(Hq), np.int32(Hkv), np.int32(Sq),
                np.int32(Sk), sl2, cz) + idx_args + (np.int32(bq), np.int32(bk)))
        return _deliver((o, lse), out, host)

    elem = 2
    if path == "block" and wgmma_enabled() and _wgmma_fits(qd, shape, m):
        try:
            _fwd_wgmma(qd, kd, vd, shape, m, o, lse, sl2, cz)
            return _deliver((o, lse), out, host)
        except ValueError:  # a geometry TMA cannot describe: this call only
            pass
        except Exception as e:  # build or driver failure: stay on the mma.sync kernel
            _WGMMA_BROKEN.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"refattn: the wgmma forward is unavailable ({type(e).__name__}: {e}); "
                          "using the mma.sync kernel", RuntimeWarning, stacklevel=2)
    if path == "block":
        if m is None or m.block_q % 128 == 0:
            BM, BN = FWD_TILES[D]
        else:
            BM, BN = 64, 64
        if m is None:
            idx_args = (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0),
                        np.int32(0))
            bq, bk = BM, 64
        else:
            idx_args = _index_args(m, transpose=False)
            bq, bk = m.block_q, m.block_k
        fn = get_kernel("attn_fwd.cu", f"attn_fwd_block<{T}, {D}, {BM}, {BN}>")
        smem = (BM * (D + 8) + 4 * BN * (D + 8)) * elem + BM * 4
        launch(fn, (-(-Sq // BM), Hq, B), (128,),
               (qd.raw, kd.raw, vd.raw, o, lse) + strides +
               (np.int32(Hq), np.int32(Hkv), np.int32(Sq), np.int32(Sk), sl2, cz) + idx_args +
               (np.int32(bq), np.int32(bk), _NULL, _NULL, _NULL, _NULL, _NULL, _NULL,
                np.int32(0)), smem)
        return _deliver((o, lse), out, host)

    # gather (per-token routing, block_q = 1)
    BM, BN = GATHER_BM, 64
    plan = _gather_plan(m, shape, BM)
    nnz = plan["nnz"]
    part_o = cp.empty((max(nnz, 1), D), cp.float32)
    part_lse = cp.empty((max(nnz, 1),), cp.float32)
    fn = get_kernel("attn_fwd.cu", f"attn_fwd_gather<{T}, {D}, {BM}>")
    smem = (BM * (D + 8) + 4 * BN * (D + 8)) * elem + BM * 4
    launch(fn, (plan["ntiles"],), (128,),
           (qd.raw, kd.raw, vd.raw, part_o, part_lse) + strides +
           (np.int32(Hq), np.int32(Hkv), np.int32(Sq), np.int32(Sk), sl2, cz,
            _NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int32(0),
            np.int32(1), np.int32(m.block_k), plan["tile_seg"], plan["tile_start"],
            plan["seg_off"], plan["seg_cnt"], plan["g_rows"], plan["g_pair"],
            np.int32(plan["Kb"])), smem)
    rows = B * Hq * Sq
    comb = get_kernel("attn_fwd.cu", f"attn_combine<{D}>")
    launch(comb, (-(-rows // 4),), (128,),
           (part_o, part_lse, plan["row_ptr"], o, lse, np.int64(rows)))
    return _deliver((o, lse), out, host)


# ----------------------------------------------------------------------------- backward
def attention_bwd(q: Any, k: Any, v: Any, o: Any, do: Any, lse: Any, mask: Any = None,
                  causal: bool = False, scale: float | None = None, *,
                  out: tuple[Any, Any, Any] | None = None) -> tuple[Any, Any, Any]:
    """Block-sparse attention backward on the GPU.

    q, k, v as :func:`attention_fwd`; ``o`` ``[B, Hq, Sq, Dv]`` and ``lse`` ``[B, Hq, Sq]`` the
    forward's outputs, ``do`` the output gradient ``[B, Hq, Sq, Dv]`` (on the tensor-core path
    it is rounded to q's dtype, as FlashAttention does). Returns fp32 ``dq [B, Hq, Sq, D]``,
    ``dk [B, Hkv, Sk, D]``, ``dv [B, Hkv, Sk, Dv]`` (dk, dv summed over each GQA group); the
    key blocks of each query block come from the mask's transposed index form.
    """
    host = isinstance(q, np.ndarray)
    qd, kd, vd = (_kernel_ready(_to_device(x, n)) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    shape = _shape(qd, kd, vd)
    B, Hq, Hkv, Sq, Sk, D, Dv = (shape.batch, shape.q_heads, shape.kv_heads, shape.q_len,
                                 shape.k_len, shape.head_dim, shape.v_dim)
    out = _check_out(out, ((B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv)),
                     ("dq", "dk", "dv"), host)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise InputError(f"scale: expected a finite positive number, got {scale!r}")
    od = _to_device(o, "o")
    dod = _to_device(do, "do")
    for nm, x in (("o", od), ("do", dod)):
        if x.shape != (B, Hq, Sq, Dv):
            raise InputError(f"{nm}: expected shape {(B, Hq, Sq, Dv)}, got {x.shape}")
    lse32 = _f32(lse, "lse")
    if lse32.shape != (B, Hq, Sq):
        raise InputError(f"lse: expected shape {(B, Hq, Sq)}, got {tuple(lse32.shape)}")
    m = _prepare(mask, shape)
    path = _path(qd, shape, m)
    o32 = _cast(od, "float32").raw
    T = _CT.get(qd.kind)
    strides = _strides(qd, kd, vd)
    cz = np.int32(bool(causal))
    rows = B * Hq * Sq

    if path == "rowwise":
        do32 = _cast(dod, "float32").raw
    else:
        do16 = _cast(dod, qd.kind)
        do32 = _cast(do16, "float32").raw  # Delta from the dO the tensor cores see
    delta = cp.empty((B, Hq, Sq), cp.float32)
    launch(get_kernel("attn_rowwise.cu", "row_dot"), (-(-rows // 8),), (256,),
           (do32, o32, delta, np.int64(rows), np.int32(Dv)))

    if path == "rowwise":
        dq = cp.empty((B, Hq, Sq, D), cp.float32)
        dk = cp.zeros((B, Hkv, Sk, D), cp.float32)
        dv = cp.zeros((B, Hkv, Sk, Dv), cp.float32)
        if m is None:
            idx_args = (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0),
                        np.int32(0))
            bq, bk = 1, 64
        else:
            idx_args = _index_args(m, transpose=False)
            bq, bk = m.block_q, m.block_k
        fn = get_kernel("attn_rowwise.cu", f"attn_bwd_rowwise<{T}, {_epl(shape)}>")
        launch(fn, (-(-Sq // 4), Hq, B), (128,),
               (qd.raw, kd.raw, vd.raw, do32, lse32, delta, dq, dk, dv) + strides +
               (np.int32(D), np.int32(Dv), np.int32(Hq), np.int32(Hkv), np.int32(Sq),
                np.int32(Sk), np.float32(scale), cz) + idx_args + (np.int32(bq), np.int32(bk)))
        return _deliver((dq, dk, dv), out, host)

    dq = cp.zeros((B, Hq, Sq, D), cp.float32)
    dk = cp.empty((B, Hkv, Sk, D), cp.float32)
    dv = cp.empty((B, Hkv, Sk, Dv), cp.float32)
    if path == "block" and wgmma_bwd_enabled() and _wgmma_bwd_fits(qd, shape, m):
        try:
            _bwd_wgmma(qd, kd, vd, do16, shape, m, lse32, delta, dq, dk, dv, scale, cz)
            return _deliver((dq, dk, dv), out, host)
        except ValueError:  # a geometry TMA cannot describe: this call only
            pass
        except Exception as e:  # build or driver failure: stay on the mma.sync kernel
            _WGMMA_BWD_BROKEN.append(f"{type(e).__name__}: {e}")
            warnings.warn(f"refattn: the wgmma backward is unavailable ({type(e).__name__}: "
                          f"{e}); using the mma.sync kernel", RuntimeWarning, stacklevel=2)
        dq.fill(0)
    BN = BWD_BN if (m is None or m.block_k % BWD_BN == 0) else 64
    smem = ((2 * BN + 2 * 64) * (D + 8) + BN * 72) * 2 + 2 * 64 * 12
    common = ((qd.raw, kd.raw, vd.raw, do16.raw, lse32, delta, dq, dk, dv) + strides +
              (np.int32(Hq), np.int32(Hkv), np.int32(Sq), np.int32(Sk), np.float32(scale),
               np.float32(scale * LOG2E), cz))
    grid = (-(-Sk // BN), Hkv, B)
    block = (BN * 2,)
    if path == "block":
        if m is None:
            t_args = (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0),
                      np.int32(0), np.int32(64), np.int32(BN))
        else:
            t_args = _index_args(m, transpose=True) + (np.int32(m.block_q), np.int32(m.block_k))
        fn = get_kernel("attn_bwd.cu", f"attn_bwd_block<{T}, {D}, {BN}>")
        launch(fn, grid, block, common + t_args + (_NULL, _NULL, _NULL, np.int32(0)), smem)
    else:
        plan = _gather_plan(m, shape, GATHER_BM)  # the forward's plan (cached)
        fn = get_kernel("attn_bwd.cu", f"attn_bwd_gather<{T}, {D}, {BN}>")
        launch(fn, grid, block, common +
               (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int32(0),
                np.int32(1), np.int32(m.block_k), plan["seg_off"], plan["seg_cnt"],
                plan["g_rows"], np.int32(plan["Kb"])), smem)
    return _deliver((dq, dk, dv), out, host)
