"""One module per published method; each registers itself in :mod:`refattn.methods.base`."""
from __future__ import annotations

import importlib
import pkgutil

from .base import MethodInfo, get_method, list_methods, register_method

_loaded = False


def load_all() -> None:
    """Import every method module of this package (each registers itself)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "base" and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    # KV-cache and static-pattern methods live in their own subpackage.
    importlib.import_module("refattn.kvcache").load_all()


__all__ = ["MethodInfo", "get_method", "list_methods", "register_method", "load_all"]
