"""Correctly rounded helpers for the places where a kernel's result depends on one IEEE
operation exactly.

The kernels compile with ``FASTMATH`` (see ``flags.py``), whose ``arcp`` lets LLVM turn
``a / b`` into ``a * (1 / b)``: one ulp off, which matters only where the quotient is then
compared with a threshold that the specification states on the correctly rounded value.
Example: CAOTE's ``alpha_j / sum(alpha) >= 1`` (all mass on one token, score ``+inf``):
``x * (1 / x)`` can be ``1 - 2**-53`` and the token would get a finite score.

These helpers compile without fastmath; LLVM keeps the flags per instruction, so once
inlined into a fastmath kernel their operations stay IEEE.
``tests/test_kernel_flags.py`` allows no-fastmath dispatchers in this module only.
"""
from __future__ import annotations

from numba import njit

IEEE_HELPER_OPTIONS = {"cache": True, "nogil": True, "error_model": "numpy", "fastmath": False}


@njit(**IEEE_HELPER_OPTIONS)
def ieee_div(a: float, b: float) -> float:  # pragma: no cover - compiled
    """``a / b`` correctly rounded (no reciprocal approximation)."""
    return a / b
