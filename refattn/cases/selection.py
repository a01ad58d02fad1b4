"""Registry cases of the generic selection ops (``refattn.reference.selection``):
``selection_topk_rows``, ``selection_topk_global``, ``selection_cumulative_threshold`` and
``selection_fixed_threshold``.

The ops are compared exactly (mask and boundary), and the registry suite hands kernels
float32 outputs, so every score and threshold here is float32-representable. Inputs:
scores drawn from a small value set (many exact ties, within and across rows), NaN scores,
all-invalid rows, rows with one valid entry, causal validity patterns, per-row budgets with
``k = 0`` and ``k > N``, both tie orders; cumulative masses with ``tau`` in
``{0, 1, > 1, < 0}``, per-head ``tau`` (repeated over the head's rows), crossings that land
exactly on ``tau`` (equal masses), zero-mass rows, unnormalised sums, both crossing rules;
fixed thresholds equal to score values (inclusive vs strict), per-row thresholds, NaN and
infinite thresholds. Each generator yields ``{"label", "args", "dtype"}``.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..reference.selection import CUMULATIVE_OP, FIXED_OP, TOPK_GLOBAL_OP, TOPK_ROWS_OP
from ..testing import register_cases

Case = Iterator[dict[str, Any]]

# (label, R, N): one row, one column, a block-score shape, per-token routing, odd sizes
_SHAPES: tuple[tuple[str, int, int], ...] = (
    ("1x1", 1, 1), ("1x9", 1, 9), ("7x1", 7, 1), ("16x16", 16, 16), ("33x64", 33, 64),
    ("40x130", 40, 130), ("5x257", 5, 257),
)


def tied_scores(rng: np.random.Generator, shape: tuple[int, ...], levels: int = 5,
                nan_frac: float = 0.05, signed: bool = True) -> np.ndarray:
    """float32 scores from ``levels`` values (exact ties everywhere), some NaN; ``signed``
    adds negative values, ``-0.0`` and ``+-inf``."""
    vals = np.arange(levels, dtype=np.float32) * np.float32(0.25)
    s = vals[rng.integers(levels, size=shape)]
    if signed:
        s = s - np.float32(0.25 * (levels // 2))
        extra = np.array([-0.0, np.inf, -np.inf], np.float32)
        pick = rng.random(shape) < 0.03
        s[pick] = extra[rng.integers(3, size=int(pick.sum()))]
    s[rng.random(shape) < nan_frac] = np.nan
    return s.astype(np.float32)


def random_valid(rng: np.random.Generator, R: int, N: int, density: float = 0.8) -> np.ndarray:
    """bool ``[R, N]``: random, with an all-invalid row, a row with one valid entry and a
    fully valid row where there are rows enough."""
    v = rng.random((R, N)) < density
    if R >= 3:
        v[0] = False
        v[1] = False
        v[1, rng.integers(N)] = True
        v[2] = True
    return v


def budgets(rng: np.random.Generator, R: int, N: int) -> np.ndarray:
    """int64 ``[R]`` per-row budgets including ``0``, ``1``, ``N`` and ``k > N``."""
    k = rng.integers(0, N + 3, size=R).astype(np.int64)
    special = np.array([0, 1, N, N + 5], np.int64)
    k[: min(R, 4)] = special[: min(R, 4)]
    return k


def topk_rows_cases(rng: np.random.Generator) -> Case:
    for label, R, N in _SHAPES:
        s = tied_scores(rng, (R, N))
        v = random_valid(rng, R, N)
        k = budgets(rng, R, N)
        yield {"label": f"{label}-valid-low", "args": (s, k, v, "low"), "dtype": "float32"}
        yield {"label": f"{label}-valid-high", "args": (s, k, v, "high"), "dtype": "float32"}
        yield {"label": f"{label}-novalid-k3", "args": (s, 3, None, "low"), "dtype": "float32"}
        yield {"label": f"{label}-k0", "args": (s, 0, v, "high"), "dtype": "float32"}
    # every score equal: the tie order alone decides
    s = np.full((6, 50), 0.5, np.float32)
    for tie in ("low", "high"):
        yield {"label": f"all_equal-{tie}", "args": (s, np.arange(6) * 7, None, tie),
               "dtype": "float32"}
    # all NaN rows and a row of infinities
    s = tied_scores(rng, (4, 20), nan_frac=0.0)
    s[0] = np.nan
    s[1] = np.inf
    s[2, ::2] = -np.inf
    yield {"label": "nan_inf_rows", "args": (s, np.array([3, 5, 15, 20]), None, "low"),
           "dtype": "float32"}
    # continuous float32 scores (no ties), per-token routing shape
    s = rng.standard_normal((512, 64)).astype(np.float32)
    yield {"label": "gauss_routing", "args": (s, rng.integers(0, 9, 512), None, "low"),
           "dtype": "float32"}


def topk_global_cases(rng: np.random.Generator) -> Case:
    for label, H, Qb, Kb in (("1x1x1", 1, 1, 1), ("2x8x8", 2, 8, 8), ("4x17x33", 4, 17, 33),
                             ("3x32x32", 3, 32, 32)):
        s = tied_scores(rng, (H, Qb, Kb))
        causal = np.tril(np.ones((Qb, Kb), bool), k=Kb - Qb)
        n = Qb * Kb
        k = np.array([0, 1, n // 3, n + 4] * H, np.int64)[:H]
        for tie in ("low", "high"):
            yield {"label": f"{label}-causal-{tie}", "args": (s, k, causal, tie),
                   "dtype": "float32"}
        v = rng.random((H, Qb, Kb)) < 0.7
        v[0] = False                                   # a head with no candidate
        yield {"label": f"{label}-valid", "args": (s, max(1, n // 4), v, "low"),
               "dtype": "float32"}
        yield {"label": f"{label}-novalid", "args": (s, n // 2, None, "high"), "dtype": "float32"}


def _masses(rng: np.random.Generator, R: int, N: int) -> np.ndarray:
    """float32 non-negative masses from a small value set (ties, zero masses, NaN), with a
    zero-mass row and a row of equal masses where there are rows enough."""
    s = np.abs(tied_scores(rng, (R, N), levels=4, nan_frac=0.04, signed=False))
    if R >= 5:
        s[3] = 0.0
        s[4] = 0.5
    return s


def cumulative_cases(rng: np.random.Generator) -> Case:
    for label, R, N in _SHAPES:
        s = _masses(rng, R, N)
        v = random_valid(rng, R, N)
        taus = np.array([0.0, 1.0, 0.5, 0.25, 0.9, 1.5, -0.5, 0.75], np.float64)
        t = taus[rng.integers(len(taus), size=R)]
        t[: min(R, 3)] = (0.5, 1.0, 0.0)[: min(R, 3)]
        yield {"label": f"{label}-mixed", "args": (s, t, v, True, "low", True), "dtype": "float32"}
        yield {"label": f"{label}-exclusive-high", "args": (s, t, v, True, "high", False),
               "dtype": "float32"}
        for tau in (0.0, 1.0, 0.5):
            yield {"label": f"{label}-tau{tau}", "args": (s, tau, None, True, "low", True),
                   "dtype": "float32"}
        yield {"label": f"{label}-unnormalized", "args": (s, 2.0, v, False, "low", True),
               "dtype": "float32"}
        yield {"label": f"{label}-unnormalized-excl", "args": (s, 1.0, None, False, "high", False),
               "dtype": "float32"}
    # per-head tau: H heads x Qb rows each, the same tau over a head's rows
    H, Qb, Kb = 4, 16, 16
    s = _masses(rng, H * Qb, Kb)
    causal = np.tile(np.tril(np.ones((Qb, Kb), bool)), (H, 1))
    tau_h = np.array([0.9, 0.5, 1.0, 0.0])
    yield {"label": "per_head_tau", "args": (s, np.repeat(tau_h, Qb), causal, True, "low", True),
           "dtype": "float32"}
    # equal masses: every crossing lands exactly on tau (k/n fractions)
    s = np.ones((8, 8), np.float32)
    yield {"label": "exact_crossings", "args": (s, np.arange(8) / 8.0, None, True, "low", True),
           "dtype": "float32"}
    yield {"label": "exact_crossings_excl",
           "args": (s, np.arange(8) / 8.0, None, True, "high", False), "dtype": "float32"}
    # continuous masses (softmax-like), per-token routing shape
    x = rng.standard_normal((512, 64)).astype(np.float32)
    p = np.exp(x - x.max(-1, keepdims=True)).astype(np.float32)
    yield {"label": "softmax_routing", "args": (p, 0.9, None, True, "low", True),
           "dtype": "float32"}


def fixed_cases(rng: np.random.Generator) -> Case:
    for label, R, N in _SHAPES:
        s = tied_scores(rng, (R, N))
        v = random_valid(rng, R, N)
        t = np.float32(0.25) * rng.integers(-3, 4, size=R).astype(np.float32)
        if R >= 3:
            t[:3] = (np.nan, np.inf, -np.inf)
        yield {"label": f"{label}-rows-incl", "args": (s, t, v, True), "dtype": "float32"}
        yield {"label": f"{label}-rows-strict", "args": (s, t, v, False), "dtype": "float32"}
        yield {"label": f"{label}-scalar", "args": (s, 0.0, None, True), "dtype": "float32"}


register_cases(TOPK_ROWS_OP.name, topk_rows_cases)
register_cases(TOPK_GLOBAL_OP.name, topk_global_cases)
register_cases(CUMULATIVE_OP.name, cumulative_cases)
register_cases(FIXED_OP.name, fixed_cases)
