"""Compilation flags shared by every Numba kernel of refattn.

``FASTMATH`` is the one fastmath flag set allowed in ``refattn.kernels``: reassociation,
contraction (FMA), no signed zeros, reciprocal approximation and approximate functions.
It deliberately leaves out ``nnan`` and ``ninf`` (which plain ``fastmath=True`` adds):
the kernels rely on ``-inf`` for the log-sum-exp of a row that sees no key, and LLVM
may fold ``inf`` arithmetic away under ``ninf``. Even with this set, ``0 * inf`` patterns
are not safe, so kernels keep every ``-inf`` case in an explicit branch.

``tests/test_kernel_flags.py`` pins the set and checks that no kernel uses
``fastmath=True``.
"""
from __future__ import annotations

from typing import Any

FASTMATH: frozenset[str] = frozenset({"reassoc", "contract", "nsz", "arcp", "afn"})

# Options for parallel kernels: prange over disjoint output rows, on-disk cache next to the
# module (NUMBA_CACHE_DIR redirects it), GIL released, NumPy's error model (division by
# zero gives inf/nan instead of raising, so no exception checks in inner loops).
NJIT_OPTIONS: dict[str, Any] = {
    "parallel": True,
    "cache": True,
    "nogil": True,
    "error_model": "numpy",
    "fastmath": set(FASTMATH),
}

# Options for the small serial helpers that the parallel kernels call (inlined by LLVM).
NJIT_HELPER_OPTIONS: dict[str, Any] = {
    "cache": True,
    "nogil": True,
    "error_model": "numpy",
    "fastmath": set(FASTMATH),
}
