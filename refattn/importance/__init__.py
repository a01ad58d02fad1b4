"""Attention-derived token importance for other ends (BlockRank, FOCUS, VFlowOpt, RSQ): one module
per method, each registering itself with :func:`refattn.methods.base.register_method`.

Every module of this package whose name does not start with an underscore is imported by
:func:`load_all` (called by :func:`refattn.methods.load_all`)."""
from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    """Import every method module of this package (each registers itself)."""
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if not mod.startswith("_"):
            importlib.import_module(f"{__name__}.{mod}")
