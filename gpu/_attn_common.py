"""What every attention launcher of ``gpu/`` shares (see :mod:`attention` for the paths).

* arrays: :class:`_Dev` (a device array as the kernels see it), :func:`_to_device` (upload or
  wrap; bf16 as its uint16 bits, float64 as float32), :func:`_kernel_ready` (contiguous,
  16-byte aligned rows), :func:`_cast` / :func:`_f32`, :func:`_strides`;
* shapes and outputs: :func:`_shape` (checks q, k, v; an ``AttnShape``), :func:`_check_out`
  (the ``out=`` tuple), :func:`_deliver` (results into ``out=`` or back to the host),
  :func:`_epl` (elements per lane of the rowwise kernels);
* masks: :func:`_prepare` (a ``BlockMask`` checked against the shape), :func:`_cached` (a
  small LRU of device-side mask structures, :data:`_CACHE`) and :func:`_index_args` (the
  canonical or transposed index form as kernel arguments);
* constants: :data:`LOG2E`, :data:`_CT` (dtype -> C++ type name), :data:`_NULL`.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import cupy as cp
import numpy as np

from refattn.core.blockmask import BlockMask, prepare_mask
from refattn.core.errors import InputError
from refattn.core.layout import AttnShape, as_array

from ._build import get_kernel, launch

LOG2E = 1.4426950408889634
_CT = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}

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


def _prepare(mask: Any, shape: AttnShape) -> BlockMask | None:
    if mask is not None and not isinstance(mask, BlockMask):
        raise InputError(f"mask: the cupy backend takes a BlockMask (or None), got "
                         f"{type(mask).__name__}; token-level masks run on the reference")
    m = prepare_mask(mask, shape)
    return m


def _strides(*ds: _Dev) -> tuple[np.int64, ...]:
    out: list[np.int64] = []
    for d in ds:
        s = d.strides()
        out += [np.int64(s[0]), np.int64(s[1]), np.int64(s[2])]
    return tuple(out)


def _epl(shape: AttnShape) -> int:
    n = -(-max(shape.head_dim, shape.v_dim) // 32)
    return 2 if n <= 2 else 4 if n <= 4 else 8
