"""One module per published method; each registers itself in :mod:`refattn.methods.base`."""
from __future__ import annotations

import importlib

from .base import MethodInfo, get_method, import_submodules, list_methods, register_method

_loaded = False


def load_all() -> None:
    """Import every method module of this package (each registers itself)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import_submodules(__name__, __path__, skip=("base",))
    # KV-cache/static, video and token-importance methods live in their own subpackages.
    for sub in ("refattn.kvcache", "refattn.video", "refattn.importance"):
        importlib.import_module(sub).load_all()


__all__ = ["MethodInfo", "get_method", "list_methods", "register_method", "load_all"]
