"""Helpers shared by the CuPy scoring launchers (gpu/scoring.py, gpu/scoring_estimate.py,
gpu/scoring_compressed.py): input validation and upload of q / k, accumulator types, output
delivery, device attributes. Re-exported by gpu/scoring.py under the same names."""
from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from refattn.core.errors import InputError
from refattn.core.layout import as_array

_CT = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
_DEV_ATTR: dict[tuple[int, str], int] = {}


def _device_attr(name: str) -> int:
    """``"sm_count"`` or ``"smem_optin"`` (bytes of dynamic shared memory a block may opt
    into) of the current device, cached."""
    dev = cp.cuda.Device()
    key = (dev.id, name)
    if key not in _DEV_ATTR:
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        if name == "sm_count":
            val = props.get("multiProcessorCount", 0)
        else:
            val = props.get("sharedMemPerBlockOptin", 0)
            if not val:
                try:
                    val = dev.attributes["MaxSharedMemoryPerBlockOptin"]
                except Exception:  # pragma: no cover - old CuPy
                    cc = int(dev.compute_capability)
                    val = 227 * 1024 if cc >= 90 else 163 * 1024 if cc == 80 else 99 * 1024
        _DEV_ATTR[key] = int(val) or 1
    return _DEV_ATTR[key]


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
