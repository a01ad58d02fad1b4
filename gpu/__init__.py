"""refattn.gpu: CUDA kernels (CuPy RawModule, NVRTC) registered as the ``"cupy"`` backend.

Installed as the package ``refattn.gpu``; in a source tree (``PYTHONPATH=.``) the registry
loads this folder by path (:func:`refattn.core.registry._load_gpu_package`). Importing it
needs CuPy and at least one CUDA device: otherwise it raises :class:`ImportError` (no CuPy)
or :class:`RuntimeError` (no usable device), and the registry reports that reason for the
``"cupy"`` backend. Kernels compile lazily, on first use.

Registered ops (same arguments as the reference, ``refattn.reference.attention``):

* ``attention_fwd``: ``fwd(q, k, v, mask=None, causal=False, scale=None, *, out=None)``
  -> ``(out fp32 [B, Hq, Sq, Dv], lse fp32 [B, Hq, Sq])``;
* ``attention_bwd``: ``bwd(q, k, v, o, do, lse, mask=None, causal=False, scale=None, *,
  out=None)`` -> ``(dq, dk, dv)`` fp32;
* every other public module of this folder is imported here and registers its ops (the
  scoring ops of the LLM-prefill methods, the selection primitives, ...).

See ``docs/gpu.md`` for the kernels, their coverage and measured speed.
"""
from __future__ import annotations

try:
    import cupy as _cp
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"refattn.gpu needs CuPy (pip install cupy-cuda13x or cupy-cuda12x): {e}") from e

try:
    _ndev = _cp.cuda.runtime.getDeviceCount()
except Exception as e:  # CUDARuntimeError: no driver, no device
    raise RuntimeError(f"refattn.gpu: no usable CUDA device ({type(e).__name__}: {e})") from e
if _ndev < 1:
    raise RuntimeError("refattn.gpu: CuPy found no CUDA device")

import importlib as _importlib  # noqa: E402
import pkgutil as _pkgutil  # noqa: E402

from refattn.core.registry import register  # noqa: E402

from . import attention as _attention  # noqa: E402
from ._build import device_cc, tensor_cores_available  # noqa: E402,F401

# Every public module of this folder registers its ops when imported (scoring.py, select.py,
# ...); private modules (``_build``) are helpers. Kernels themselves compile lazily.
for _m in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_") and _m.name != "attention":
        _importlib.import_module(f"{__name__}.{_m.name}")

attention_fwd = register("attention_fwd", "cupy")(_attention.attention_fwd)
attention_bwd = register("attention_bwd", "cupy")(_attention.attention_bwd)

__all__ = ["attention_fwd", "attention_bwd", "device_cc", "tensor_cores_available"]
