"""Compile and cache the CUDA sources of ``gpu/`` with CuPy's NVRTC backend.

Every kernel is a template instantiated by name (``name_expressions``) and compiled
lazily, on first use, into its own :class:`cupy.RawModule`; CuPy's on-disk cache
(``CUPY_CACHE_DIR``) makes later processes start instantly. The shared header is inlined
into the source before compiling (and ``-I gpu/`` is passed as well), so that CuPy's cache
key, a hash of the source text and the options, changes whenever the header changes.

Options: ``-std=c++17`` and ``--gpu-architecture=sm_XY`` for the current device
(``sm_90`` on Hopper: the kernels use ``mma.sync``/``ldmatrix``/``cp.async``, which need
sm_80+, and no sm_90a-only instruction). CuPy appends ``-ftz=true`` to every compile.
Files listed in :data:`ARCH_OVERRIDES` get an arch-specific target instead on the devices
named there (``attn_fwd_wgmma.cu``: ``sm_90a`` on sm_90, for wgmma and setmaxnreg).
"""
from __future__ import annotations

import os
import re
import threading
from typing import Any

import cupy as cp

HERE = os.path.dirname(os.path.abspath(__file__))
_LOCK = threading.Lock()
_MODULES: dict[tuple[str, str, int], Any] = {}
_SOURCES: dict[str, str] = {}

#: Per-file target override: {filename: {compute capability: target}}. The default target is
#: ``sm_XY`` of the device; a file listed here compiles for the given target on that device.
ARCH_OVERRIDES: dict[str, dict[int, str]] = {"attn_fwd_wgmma.cu": {90: "sm_90a"},
                                               "attn_bwd_wgmma.cu": {90: "sm_90a"},
                                               "attn_gather_wgmma.cu": {90: "sm_90a"},
                                               "score_xattn_wgmma.cu": {90: "sm_90a"}}


def device_cc(device: int | None = None) -> int:
    """Compute capability of the current (or given) device as an int, e.g. 90."""
    dev = cp.cuda.Device(device) if device is not None else cp.cuda.Device()
    return int(dev.compute_capability)


def tensor_cores_available() -> bool:
    """True when the mma.sync m16n8k16 bf16/fp16 kernels can run (sm_80 or newer)."""
    return device_cc() >= 80


def compile_options(filename: str | None = None) -> tuple[str, ...]:
    cc = device_cc()
    arch = ARCH_OVERRIDES.get(filename or "", {}).get(cc, f"sm_{cc}")
    return ("-std=c++17", f"--gpu-architecture={arch}", f"-I{HERE}")


def _source(filename: str) -> str:
    src = _SOURCES.get(filename)
    if src is None:
        with open(os.path.join(HERE, filename), encoding="utf-8") as f:
            src = f.read()

        def inline(m: "re.Match[str]") -> str:
            with open(os.path.join(HERE, m.group(1)), encoding="utf-8") as h:
                return h.read().replace("#pragma once", "")

        src = re.sub(r'#include\s+"([A-Za-z0-9_]+\.cuh)"', inline, src)
        _SOURCES[filename] = src
    return src


def get_kernel(filename: str, name: str) -> Any:
    """The :class:`cupy.RawKernel` for template instantiation ``name`` of ``filename``
    (e.g. ``get_kernel("attn_fwd.cu", "attn_fwd_block<__nv_bfloat16, 128, 128, 32>")``)."""
    key = (filename, name, cp.cuda.Device().id)
    fn = _MODULES.get(key)
    if fn is None:
        with _LOCK:
            fn = _MODULES.get(key)
            if fn is None:
                mod = cp.RawModule(code=_source(filename), options=compile_options(filename),
                                   name_expressions=[name])
                fn = mod.get_function(name)
                _MODULES[key] = fn
    return fn


def launch(kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...],
           shared_mem: int = 0) -> None:
    """Launch ``kernel``; raises the dynamic shared-memory limit when ``shared_mem`` > 48 KiB."""
    if any(g <= 0 for g in grid):
        return
    if shared_mem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < shared_mem:
        kernel.max_dynamic_shared_size_bytes = shared_mem
    kernel(grid, block, args, shared_mem=shared_mem)
