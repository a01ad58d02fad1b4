"""The Hopper (sm_90a) attention paths: wgmma + TMA, warp-specialised, forward
(``attn_fwd_wgmma.cu``) and backward (``attn_bwd_wgmma.cu``).

* switches: :func:`wgmma_enabled` / :func:`wgmma_bwd_enabled` (``REFATTN_WGMMA`` /
  ``REFATTN_WGMMA_BWD``, defaults :data:`WGMMA_DEFAULT` / :data:`WGMMA_BWD_DEFAULT`, read at
  each call; off after a build failure recorded in :data:`_WGMMA_BROKEN` /
  :data:`_WGMMA_BWD_BROKEN`), and :func:`_wgmma_fits` / :func:`_wgmma_bwd_fits` (the shapes,
  dtypes and masks each kernel takes);
* tunables: :data:`WGMMA_CONFIG` (forward pipeline depth, softmax / P V overlap) and
  :data:`WGMMA_BWD_CONFIG` (backward Q / dO ring depth), dicts changed in place;
* tensor maps: :func:`tensor_map` (one ``CUtensorMap`` through the driver's
  ``cuTensorMapEncodeTiled``), :func:`_tensor_maps` / :func:`_tensor_maps_boxes` (device
  buffers of maps, an LRU :data:`_TMAPS` keyed by geometry);
* kernels and launchers: :func:`wgmma_kernel`, :func:`wgmma_smem`, :func:`_fwd_wgmma`,
  :func:`wgmma_bwd_kernel`, :func:`wgmma_bwd_smem`, :func:`_bwd_wgmma`.

The choice of path and the fall back to the mma.sync kernels (a ``ValueError`` for one call,
any other failure recorded in the ``_BROKEN`` lists) are in :mod:`attention`, which calls
``_fwd_wgmma`` / ``_bwd_wgmma`` through its own module globals (tests and probes wrap them
with ``monkeypatch.setattr(attention, ...)``).
"""
from __future__ import annotations

import ctypes
import os
from collections import OrderedDict
from typing import Any

import cupy as cp
import numpy as np

from refattn.core.blockmask import BlockMask
from refattn.core.layout import AttnShape

from ._attn_common import _CT, _NULL, LOG2E, _Dev, _index_args
from ._build import device_cc, get_kernel, launch

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
