"""A float64 ``exp`` that Numba vectorises (the scalar libm call does not vectorise here:
no SVML), shared by the kernels whose references use float64 softmax."""
from __future__ import annotations

import numpy as np
from numba import njit

from .flags import NJIT_HELPER_OPTIONS


@njit(**NJIT_HELPER_OPTIONS)
def exp_f64(x: float) -> float:
    """``exp(x)`` in float64 for finite ``x``: Cody-Waite reduction by ``ln 2`` (fdlibm's
    split), Taylor polynomial of degree 12 on ``|r| <= ln(2)/2`` (truncation < 2e-16
    relative), exponent by bit arithmetic. It vectorises, unlike the scalar libm call (no
    SVML here). ``x`` is clamped to ``[-708, 709]``: below, ~3e-308 instead of a subnormal
    or 0 (only ever added to row sums >= 1: the kernels' arguments are ``<= 0``, and the
    row maximum contributes 1)."""
    x = min(max(x, -708.0), 709.0)
    z = np.floor(x * 1.4426950408889634 + 0.5)
    r = x - z * 6.93147180369123816490e-01
    r = r - z * 1.90821492927058770002e-10
    p = 2.08767569878680989792e-09          # 1/12!
    p = p * r + 2.50521083854417187751e-08  # 1/11!
    p = p * r + 2.75573192239858906526e-07  # 1/10!
    p = p * r + 2.75573192239858906526e-06  # 1/9!
    p = p * r + 2.48015873015873015873e-05  # 1/8!
    p = p * r + 1.98412698412698412698e-04  # 1/7!
    p = p * r + 1.38888888888888888889e-03  # 1/6!
    p = p * r + 8.33333333333333333333e-03  # 1/5!
    p = p * r + 4.16666666666666666667e-02  # 1/4!
    p = p * r + 1.66666666666666666667e-01  # 1/3!
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    bits = (np.int64(z) + np.int64(1023)) << np.int64(52)
    return p * np.int64(bits).view(np.float64)
