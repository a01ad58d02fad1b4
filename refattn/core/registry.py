"""Kernel registry: each reference function (an *op*) and its implementations per backend.

* :func:`define_op` declares an op with its NumPy reference (backend ``"numpy"``).
* :func:`register` adds an implementation for another backend (``"numba"``, ``"cupy"``).
  Kernels take the same arguments as the reference and accept ``out=`` (a tuple of
  preallocated output arrays, which the test harness poisons before each call: NaN, or a
  finite sentinel for ``equal_nan`` and ``"exact"`` ops).
* :func:`dispatch` picks the implementation; ``backend="auto"`` takes CuPy for GPU inputs,
  else Numba where a kernel is registered, else the reference. An explicit backend without
  a kernel is an error, never a silent fallback, with one declared exception:
* ``host_only``: an op defined with ``define_op(..., host_only="reason")`` has no kernels by
  design (a pure shape/pattern constructor that does no arithmetic on the inputs, or a
  reference whose exact output cannot be reproduced elsewhere, such as NumPy's random
  stream). Every backend, explicit or ``"auto"``, runs its reference; registering a kernel
  for it is an error. The reason is kept on the op (``Op.host_only``).
* ``equal_nan``: an op whose reference output has NaN by design (e.g. rows without any
  allowed block). A kernel must produce NaN at exactly the reference's NaN positions and
  nowhere else; the registry suite compares with ``compare_arrays(..., equal_nan=True)``
  and poisons such outputs with a finite sentinel instead of NaN.

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
    """One registry op.

    * ``kind``: ``"array"`` (tolerance rule) | ``"mask"`` (tie-aware) | ``"exact"``
      (bit-identical).
    * ``equal_nan``: NaN in the reference output is part of the specification: a kernel's
      output must be NaN at the same positions, and only there.
    * ``host_only``: empty for ordinary ops; else the reason why the op has no kernel (every
      backend then runs the reference, see :func:`resolve_backend`).
    """

    name: str
    reference: Callable[..., Any]
    outputs: tuple[str, ...]
    kind: str
    doc: str = ""
    equal_nan: bool = False
    host_only: str = ""


_OPS: dict[str, Op] = {}
_IMPLS: dict[tuple[str, str], Callable[..., Any]] = {}
_LOADED: dict[str, str | None] = {}


def define_op(name: str, reference: Callable[..., Any], *, outputs: tuple[str, ...],
              kind: str = "array", doc: str = "", equal_nan: bool = False,
              host_only: str = "") -> Op:
    """Declare op ``name`` with its NumPy ``reference`` (see :class:`Op` for the fields).
    ``host_only`` is the reason (a non-empty sentence) why the op has no kernels."""
    if kind not in ("array", "mask", "exact"):
        raise ValueError(f"define_op: kind {kind!r}")
    if not isinstance(host_only, str):
        raise ValueError(f"define_op({name!r}): host_only must be the reason, a string")
    if host_only and any(n == name and b != "numpy" for (n, b) in _IMPLS):
        raise ValueError(f"define_op({name!r}): host_only op already has a kernel")
    op = Op(name, reference, tuple(outputs), kind, doc or (reference.__doc__ or "").strip(),
            bool(equal_nan), host_only.strip())
    _OPS[name] = op
    _IMPLS[(name, "numpy")] = reference
    return op


def register(name: str, backend: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as the ``backend`` implementation of op ``name``."""
    if backend not in BACKENDS or backend == "numpy":
        raise ValueError(f"register: backend must be 'numba' or 'cupy', got {backend!r}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _OPS and _OPS[name].host_only:
            raise ValueError(f"register: op {name!r} is host-only "
                             f"({_OPS[name].host_only}); it takes no {backend} kernel")
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
    kernel is registered, else numpy. An explicit backend without a kernel is an error,
    except for a ``host_only`` op: it runs its reference (``"numpy"``) for every valid
    backend, without loading any backend package."""
    if name not in _OPS:
        raise InputError(f"unknown op {name!r}")
    if _OPS[name].host_only:
        if backend != "auto" and backend not in BACKENDS:
            raise InputError(f"backend: expected one of {BACKENDS + ('auto',)}, got {backend!r}")
        return "numpy"
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
