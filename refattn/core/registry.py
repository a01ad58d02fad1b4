"""Kernel registry: each reference function (an *op*) and its implementations per backend.

* :func:`define_op` declares an op with its NumPy reference (backend ``"numpy"``).
* :func:`register` adds an implementation for another backend (``"numba"``, ``"cupy"``).
  Kernels take the same arguments as the reference and accept ``out=`` (a tuple of
  preallocated output arrays, which the test harness poisons with NaN before each call).
* :func:`dispatch` picks the implementation; ``backend="auto"`` takes CuPy for GPU inputs,
  else Numba where a kernel is registered, else the reference.

The test suite enumerates :func:`ops` and :func:`implementations`, so a new kernel is
checked against its reference without new test code.
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .errors import InputError

BACKENDS = ("numpy", "numba", "cupy")
# Modules that register each backend's kernels when imported (loaded lazily, by name).
BACKEND_MODULES = {"numba": "refattn.kernels", "cupy": "refattn.gpu"}


@dataclass(frozen=True)
class Op:
    name: str
    reference: Callable[..., Any]
    outputs: tuple[str, ...]
    kind: str  # "array" (tolerance rule) | "mask" (tie-aware) | "exact" (bit-identical)
    doc: str = ""


_OPS: dict[str, Op] = {}
_IMPLS: dict[tuple[str, str], Callable[..., Any]] = {}
_LOADED: dict[str, str | None] = {}


def define_op(name: str, reference: Callable[..., Any], *, outputs: tuple[str, ...],
              kind: str = "array", doc: str = "") -> Op:
    if kind not in ("array", "mask", "exact"):
        raise ValueError(f"define_op: kind {kind!r}")
    op = Op(name, reference, tuple(outputs), kind, doc or (reference.__doc__ or "").strip())
    _OPS[name] = op
    _IMPLS[(name, "numpy")] = reference
    return op


def register(name: str, backend: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as the ``backend`` implementation of op ``name``."""
    if backend not in BACKENDS or backend == "numpy":
        raise ValueError(f"register: backend must be 'numba' or 'cupy', got {backend!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _IMPLS[(name, backend)] = fn
        return fn

    return deco


def ops() -> dict[str, Op]:
    return dict(_OPS)


def load_backend(backend: str) -> str | None:
    """Import the modules of ``backend``; return ``None`` if usable, else the reason why not."""
    if backend == "numpy":
        return None
    if backend not in BACKEND_MODULES:
        raise InputError(f"backend: expected one of {BACKENDS + ('auto',)}, got {backend!r}")
    if backend not in _LOADED:
        try:
            if backend == "cupy":
                _load_gpu_package()
            else:
                importlib.import_module(BACKEND_MODULES[backend])
            _LOADED[backend] = None
        except Exception as e:  # missing package, no device, compile error of an import
            _LOADED[backend] = f"{type(e).__name__}: {e}"
    return _LOADED[backend]


def _load_gpu_package() -> None:
    """``refattn.gpu`` is installed from the top-level ``gpu/`` folder; in a source tree
    (PYTHONPATH=.) it is loaded from there by path."""
    try:
        importlib.import_module("refattn.gpu")
        return
    except ModuleNotFoundError as e:
        if e.name != "refattn.gpu":
            raise
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    init = os.path.join(here, "gpu", "__init__.py")
    if not os.path.exists(init):
        raise ModuleNotFoundError("refattn.gpu: the gpu/ package is not installed")
    spec = importlib.util.spec_from_file_location(
        "refattn.gpu", init, submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["refattn.gpu"] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]


def implementations(name: str) -> dict[str, Callable[..., Any]]:
    """Implementations of op ``name`` registered so far, by backend (loads backends)."""
    for b in BACKEND_MODULES:
        load_backend(b)
    return {b: fn for (n, b), fn in _IMPLS.items() if n == name}


def _is_gpu_array(x: Any) -> bool:
    return hasattr(x, "__cuda_array_interface__")


def resolve_backend(name: str, backend: str, arrays: tuple[Any, ...] = ()) -> str:
    """The backend that will run op ``name``. ``auto``: cupy for GPU arrays, else numba if a
    kernel is registered, else numpy. An explicit backend without a kernel is an error."""
    if name not in _OPS:
        raise InputError(f"unknown op {name!r}")
    if backend == "auto":
        if any(_is_gpu_array(a) for a in arrays):
            why = load_backend("cupy")
            if why is None and (name, "cupy") in _IMPLS:
                return "cupy"
            raise InputError(f"{name}: GPU inputs need the cupy backend, which is unavailable "
                             f"({why or 'no cupy kernel registered for this op'})")
        if load_backend("numba") is None and (name, "numba") in _IMPLS:
            return "numba"
        return "numpy"
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {BACKENDS + ('auto',)}, got {backend!r}")
    why = load_backend(backend)
    if why is not None:
        raise InputError(f"backend {backend!r} is unavailable: {why}")
    if (name, backend) not in _IMPLS:
        raise InputError(f"backend {backend!r} has no kernel for {name!r} "
                         f"(available: {sorted(b for (n, b) in _IMPLS if n == name)})")
    return backend


def dispatch(name: str, backend: str = "numpy", arrays: tuple[Any, ...] = ()) -> Callable[..., Any]:
    """The implementation of op ``name`` for ``backend`` (see :func:`resolve_backend`)."""
    return _IMPLS[(name, resolve_backend(name, backend, arrays))]


def available_backends() -> dict[str, str | None]:
    """Each backend and ``None`` if usable here, else the reason why not."""
    return {b: load_backend(b) for b in BACKENDS}
