"""Layouts, head mapping, causal alignment and the softmax scale.

Canonical layout is ``bhsd``: q ``[B, Hq, Sq, D]``, k and v ``[B, Hkv, Sk, D]``.
Other layouts are accepted only through an explicit ``layout=`` argument:

* ``bshd`` -- flash-attn's ``[B, S, H, D]``;
* ``hsd``  -- a single sequence ``[H, S, D]`` (B = 1).

A layout is never guessed from shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

LAYOUTS = ("bhsd", "bshd", "hsd")
FLOAT_DTYPES = ("float16", "float32", "float64", "bfloat16")


def _check_layout(layout: str) -> str:
    if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
        raise InputError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return layout.lower()


def is_device_array(x: Any) -> bool:
    """True for GPU arrays (CuPy, or anything exposing ``__cuda_array_interface__`` or a
    CUDA DLPack device)."""
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dev = getattr(x, "__dlpack_device__", None)
    if dev is not None and not isinstance(x, np.ndarray):
        try:
            return int(dev()[0]) != 1  # kDLCPU == 1
        except Exception:
            return False
    return False


def array_module(x: Any) -> Any:
    """The array module of ``x``: CuPy for device arrays, else NumPy. Lets one selection code
    path run on host and device arrays alike (methods registered with ``device=True``)."""
    if is_device_array(x) and not isinstance(x, np.ndarray):
        import cupy  # only device inputs need it

        return cupy
    return np


def to_host(x: Any) -> Any:
    """``x`` copied to a NumPy array when it is a device array, else ``x`` itself (``None``,
    scalars and host arrays pass through)."""
    if is_device_array(x) and not isinstance(x, np.ndarray):
        import cupy

        return cupy.asnumpy(x)
    return x


def as_array(x: Any, name: str) -> Any:
    """Return ``x`` as a NumPy array (host inputs) or a CuPy array (device inputs).

    Host arrays of other frameworks come in by DLPack; device arrays by DLPack first, then
    ``__cuda_array_interface__``. Nothing is ever copied between host and device here.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_device_array(x):
        import cupy  # only device inputs need it

        if isinstance(x, cupy.ndarray):
            return x
        if hasattr(x, "__dlpack__"):
            return cupy.from_dlpack(x)
        return cupy.asarray(x)
    return as_numpy(x, name)


def as_numpy(x: Any, name: str) -> np.ndarray:
    """Return ``x`` as a NumPy array without copying across devices.

    NumPy arrays pass through; CPU arrays of other frameworks come in by DLPack.
    GPU arrays are refused: the NumPy/Numba backends never copy silently from a device.
    """
    if isinstance(x, np.ndarray):
        return x
    if is_device_array(x):
        raise InputError(f"{name}: a GPU array was given to a CPU backend; use backend='cupy' "
                         "or copy it to the host yourself")
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (TypeError, RuntimeError, BufferError, ValueError) as e:
            raise InputError(f"{name}: could not import the array through DLPack ({e}); "
                             "for bf16 CPU tensors pass x.view(int16) and view it as "
                             "ml_dtypes.bfloat16") from None
    try:
        return np.asarray(x)
    except Exception as e:  # pragma: no cover - exotic objects
        raise InputError(f"{name}: not an array ({type(x).__name__}): {e}") from None


def dtype_name(x: np.ndarray) -> str:
    return str(x.dtype)


def check_float(x: np.ndarray, name: str, *, finite: bool = True) -> None:
    """Require a floating dtype (fp16/fp32/fp64/bf16) and, optionally, finite values."""
    if dtype_name(x) not in FLOAT_DTYPES:
        raise InputError(f"{name}: expected a float dtype in {FLOAT_DTYPES}, got {x.dtype}")
    if finite and x.size:
        xp = np if isinstance(x, np.ndarray) else __import__("cupy")
        xf = x if x.dtype.kind == "f" else x.astype(np.float32)
        if not bool(xp.isfinite(xf).all()):
            bad = xp.argwhere(~xp.isfinite(xf))[0]
            raise InputError(f"{name}: contains NaN or Inf (first at index {tuple(int(i) for i in bad)})")


def to_bhsd(x: Any, layout: str, name: str = "array", *, device: bool = False) -> Any:
    """View ``x`` (given in ``layout``) as ``[B, H, S, D]``; no copy.

    Host arrays become NumPy; with ``device=True`` GPU arrays are accepted (as CuPy)."""
    layout = _check_layout(layout)
    x = as_array(x, name) if device else as_numpy(x, name)
    want = 3 if layout == "hsd" else 4
    if x.ndim != want:
        raise InputError(f"{name}: layout {layout!r} needs a {want}-d array "
                         f"({layout.upper()}), got shape {tuple(x.shape)}")
    if layout == "hsd":
        return x[None]
    if layout == "bshd":
        return x.transpose(0, 2, 1, 3)
    return x


def from_bhsd(x: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of :func:`to_bhsd` for arrays ``[B, H, S, ...]`` (out) or ``[B, H, S]`` (lse).

    For ``bshd`` the LSE keeps flash-attn's ``[B, H, S]`` layout.
    """
    layout = _check_layout(layout)
    if layout == "hsd":
        if x.shape[0] != 1:
            raise InputError(f"layout 'hsd' holds one sequence, but the result has B = {x.shape[0]}")
        return x[0]
    if layout == "bshd" and x.ndim == 4:
        return x.transpose(0, 2, 1, 3)
    return x


def default_scale(head_dim: int, softmax_scale: float | None = None) -> float:
    """``softmax_scale`` or ``1/sqrt(D)``."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    s = float(softmax_scale)
    if not math.isfinite(s) or s <= 0:
        raise InputError(f"softmax_scale: expected a finite positive number, got {softmax_scale!r}")
    return s


def causal_offset(q_len: int, k_len: int) -> int:
    """Bottom-right causal alignment: query ``i`` sees key ``j`` iff ``j <= i + (Sk - Sq)``."""
    return k_len - q_len


def kv_head_of(h: int | np.ndarray, num_q_heads: int, num_kv_heads: int):
    """GQA/MQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``."""
    if num_q_heads % num_kv_heads:
        raise InputError(f"GQA: number of query heads ({num_q_heads}) must be a multiple of "
                         f"the number of kv heads ({num_kv_heads})")
    return h // (num_q_heads // num_kv_heads)


@dataclass(frozen=True)
class AttnShape:
    """Sizes of one attention problem in canonical ``bhsd`` terms."""

    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    v_dim: int

    @property
    def group(self) -> int:
        """Query heads per kv head."""
        return self.q_heads // self.kv_heads

    @property
    def offset(self) -> int:
        return causal_offset(self.q_len, self.k_len)


def normalize_qkv(q: Any, k: Any, v: Any | None = None, *, layout: str = "bhsd",
                  check_finite: bool = True, device: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, AttnShape]:
    """Validate q, k (and v) and return ``bhsd`` views plus their :class:`AttnShape`.

    Shapes: q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]`` in ``bhsd``
    terms. Dtypes are kept (the reference upcasts per chunk); NaN/Inf are refused.
    ``device=True`` (the cupy backend) also accepts GPU arrays and returns CuPy views.
    """
    q4 = to_bhsd(q, layout, "q", device=device)
    k4 = to_bhsd(k, layout, "k", device=device)
    v4 = None if v is None else to_bhsd(v, layout, "v", device=device)
    for name, x in (("q", q4), ("k", k4), ("v", v4)):
        if x is not None:
            check_float(x, name, finite=check_finite)
    B, Hq, Sq, D = q4.shape
    Bk, Hkv, Sk, Dk = k4.shape
    if Bk != B:
        raise InputError(f"k: batch size {Bk} does not match q's {B}")
    if Dk != D:
        raise InputError(f"k: head dim {Dk} does not match q's {D}")
    if Sq == 0 or Sk == 0:
        raise InputError(f"empty sequence: Sq = {Sq}, Sk = {Sk} (both must be >= 1)")
    if Hq == 0 or Hkv == 0 or D == 0 or B == 0:
        raise InputError(f"empty dimension in q {tuple(q4.shape)} or k {tuple(k4.shape)}")
    if Hq % Hkv:
        raise InputError(f"GQA: number of query heads ({Hq}) must be a multiple of the number "
                         f"of kv heads ({Hkv})")
    Dv = D
    if v4 is not None:
        if v4.shape[:3] != k4.shape[:3]:
            raise InputError(f"v: shape {tuple(v4.shape)} must match k's [B, Hkv, Sk] = "
                             f"{tuple(k4.shape[:3])} (in bhsd terms)")
        Dv = v4.shape[3]
    return q4, k4, v4, AttnShape(B, Hq, Hkv, Sq, Sk, D, Dv)
