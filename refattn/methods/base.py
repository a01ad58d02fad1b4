"""The method registry: one module per published method, each registering itself here.

A method module defines

* a frozen dataclass of its parameters with the official defaults and a ``validate()``
  method that raises :class:`~refattn.core.errors.InputError` on out-of-range values;
* a ``select(q, k, v, params, *, causal, backend) -> Selection`` function on canonical
  ``bhsd`` arrays (q ``[B,Hq,Sq,D]``, k/v ``[B,Hkv,Sk,D]``), built from the shared
  primitives, reaching kernels only through :func:`refattn.core.registry.dispatch`;

and registers them with :func:`register_method`. ``refattn.select`` and the CLI find every
method through :func:`get_method` / :func:`list_methods`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from ..core.errors import InputError

KINDS = ("llm-prefill", "video", "kv-cache", "importance", "static")


@dataclass(frozen=True)
class MethodInfo:
    name: str
    kind: str
    params: type
    select: Callable[..., Any]
    summary: str
    paper: str
    code: str  # "owner/repo@commit" of the official code the reference follows
    needs_v: bool = False
    #: ``select`` keeps CuPy inputs on the GPU end to end (scores, selection, mask) when the
    #: backend is ``"cupy"``; other methods take host arrays (see :func:`refattn.api.select`).
    device: bool = False

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default if f.default is not dataclasses.MISSING else None
                for f in dataclasses.fields(self.params)}

    def make_params(self, **overrides: Any) -> Any:
        known = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise InputError(f"method {self.name!r}: unknown parameter(s) {unknown}; "
                             f"known: {sorted(known)}")
        p = self.params(**overrides)
        if hasattr(p, "validate"):
            p.validate()
        return p

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "summary": self.summary,
                "paper": self.paper, "code": self.code, "needs_v": self.needs_v,
                "device": self.device, "params": {k: _jsonable(v) for k, v in self.defaults().items()}}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return repr(v)


_METHODS: dict[str, MethodInfo] = {}


def register_method(name: str, params: type, *, kind: str, summary: str, paper: str, code: str,
                    needs_v: bool = False, device: bool = False
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a method's ``select`` function (``device``: see :class:`MethodInfo`)."""
    if kind not in KINDS:
        raise ValueError(f"register_method: kind {kind!r} not in {KINDS}")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _METHODS[name] = MethodInfo(name, kind, params, fn, summary, paper, code, needs_v,
                                    device)
        return fn

    return deco


def get_method(name: str) -> MethodInfo:
    from . import load_all

    load_all()
    if name not in _METHODS:
        raise InputError(f"unknown method {name!r}; known: {sorted(_METHODS)}")
    return _METHODS[name]


def list_methods(kind: str | None = None) -> dict[str, MethodInfo]:
    from . import load_all

    load_all()
    return {n: m for n, m in sorted(_METHODS.items()) if kind is None or m.kind == kind}


def import_submodules(package: str, path: Any, skip: tuple[str, ...] = ()) -> None:
    """Import every module of ``package`` (at ``path``) whose name does not start with an
    underscore and is not in ``skip``: method modules register themselves on import."""
    import importlib
    import pkgutil

    for mod in sorted(m.name for m in pkgutil.iter_modules(path)):
        if not mod.startswith("_") and mod not in skip:
            importlib.import_module(f"{package}.{mod}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name}: expected one of {choices}, got {value!r}")


def check_range(name: str, value: Any, lo: float | None = None, hi: float | None = None,
                *, integer: bool = False, lo_open: bool = False) -> None:
    """Raise InputError unless ``lo <= value <= hi`` (``lo < value`` with ``lo_open``)."""
    import numpy as np

    arr = np.asarray(value)
    if arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise InputError(f"{name}: expected a number, got {value!r}")
    if integer and (arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0)):
        raise InputError(f"{name}: expected an integer, got {value!r}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: expected a finite value, got {value!r}")
    if lo is not None and (np.any(arr <= lo) if lo_open else np.any(arr < lo)):
        raise InputError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and np.any(arr > hi):
        raise InputError(f"{name}: must be <= {hi}, got {value!r}")
