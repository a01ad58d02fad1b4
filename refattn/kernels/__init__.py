"""Numba CPU kernels. Importing this package registers every kernel with
:mod:`refattn.core.registry` (backend ``"numba"``): every module named ``numba_*.py`` in
this folder is imported, so a new kernel module needs no edit here."""
from __future__ import annotations

import importlib
import pkgutil

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod.startswith("numba_"):
        importlib.import_module(f"{__name__}.{_mod}")
