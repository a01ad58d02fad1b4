"""Registry test cases for the video attention ops: ``pyramid_attention_fwd`` (PSA) and
``piecewise_attention_fwd`` (PISA).

Each generator yields ``{"label", "args", "dtype"}`` with ``args`` the positional arguments
of the reference. Inputs are random and structured (sink, diagonal, stripes), with partial
last blocks, GQA, ``Sq != Sk``, rows that keep nothing, and bf16 inputs.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..core.blockmask import num_blocks
from ..reference import piecewise as _piecewise  # noqa: F401  (defines piecewise_attention_fwd)
from ..reference import pyramid as _pyramid  # noqa: F401  (defines pyramid_attention_fwd)
from ..testing import random_qkv, register_cases, structured_qkv

# (label, B, Hq, Hkv, Sq, Sk, D, block_q, block_k, dtype, structured)
_PYRAMID_CONFIGS = (
    ("mha", 1, 2, 2, 96, 96, 32, 32, 32, "float32", False),
    ("gqa_partial", 2, 4, 2, 113, 203, 32, 32, 64, "float32", True),
    ("sq_gt_sk", 1, 2, 1, 150, 70, 16, 16, 16, "float32", False),
    ("bf16", 1, 4, 1, 130, 257, 64, 64, 64, "bfloat16", True),
)


# new kernel (psa_kernel.py): (label, B, Hq, Hkv, Sq, Sk, D, block_q, block_k, tile_n, dtype,
# structured). PSAConfig's 64/32 (level 8: 8 pooled rows per block, pairs + rows 16..31), 32/32
# (levels 2/4/8 merged, rows 16..31 at level 4, 8..31 at level 8), 64/16 and 64/64, 48/16
# (P % tile_n != 0: level 1 and 2 blocks attended in part).
_PYRAMID_NEW_CONFIGS = (
    ("new_bk64_t32", 1, 2, 1, 250, 250, 32, 64, 64, 32, "float32", True),
    ("new_bk32_t32", 2, 4, 2, 113, 203, 16, 32, 32, 32, "float32", False),
    ("new_bk64_t16", 1, 2, 2, 150, 260, 16, 32, 64, 16, "float32", False),
    ("new_bk64_t64", 1, 2, 1, 200, 400, 16, 64, 64, 64, "float32", True),
    ("new_bk48_t16", 1, 2, 1, 120, 290, 16, 32, 48, 16, "float32", False),
    ("new_bf16", 1, 4, 1, 130, 390, 64, 64, 64, 32, "bfloat16", True),
)


def _levels(rng: np.random.Generator, B: int, H: int, qb: int, kb: int,
            block_k: int) -> np.ndarray:
    """Random levels in {0, 1, 2, 4, 8} (those dividing block_k), one all-skip row and one
    all-full row."""
    choices = [x for x in (0, 1, 2, 4, 8) if x == 0 or block_k % x == 0]
    lv = rng.choice(choices, size=(B, H, qb, kb)).astype(np.int64)
    if qb > 2:
        lv[..., rng.integers(qb), :] = 0
        lv[..., rng.integers(qb), :] = 1
    return lv


def _new_kernel_levels(rng: np.random.Generator, B: int, H: int, qb: int, kb: int,
                       block_k: int, tile_n: int) -> np.ndarray:
    """Random levels the new kernel accepts: in {0, 1, 2, 4, 8} dividing block_k, without
    levels of ``tile_n/2 < block_k/l < tile_n`` pooled rows, an even count per row of every
    level with fewer than ``tile_n`` pooled rows per block (an odd one dropped to 0)."""
    ok = [x for x in (1, 2, 4, 8) if block_k % x == 0
          and not (block_k // x < tile_n < 2 * (block_k // x))]
    lv = rng.choice([0] + ok, size=(B, H, qb, kb)).astype(np.int64)
    if qb > 2:
        lv[..., rng.integers(qb), :] = 0
        lv[..., rng.integers(qb), :] = ok[-1]
    for lvl in ok:
        if block_k // lvl >= tile_n:
            continue
        for idx in np.ndindex(lv.shape[:-1]):
            js = np.nonzero(lv[idx] == lvl)[0]
            if js.size % 2:
                lv[idx + (js[rng.integers(js.size)],)] = 0
    return lv


def _cases_pyramid(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, B, Hq, Hkv, Sq, Sk, D, bq, bk, dt, structured in _PYRAMID_CONFIGS:
        maker = structured_qkv if structured else random_qkv
        q, k, v = maker(rng, B, Hq, Hkv, Sq, Sk, D, dtype=dt)
        qb, kb = num_blocks(Sq, bq), num_blocks(Sk, bk)
        scale = 1.0 / np.sqrt(D)
        for causal in (False, True):
            yield {"label": f"{label}-random-c{int(causal)}",
                   "args": (q, k, v, _levels(rng, B, Hq, qb, kb, bk), bq, bk, causal, scale),
                   "dtype": dt}
        # one level everywhere (broadcast over batch and heads): pure pooled attention
        yield {"label": f"{label}-all8-c0",
               "args": (q, k, v, np.full((1, 1, qb, kb), 8 if bk % 8 == 0 else 1), bq, bk, False,
                        scale), "dtype": dt}
    for label, B, Hq, Hkv, Sq, Sk, D, bq, bk, tn, dt, structured in _PYRAMID_NEW_CONFIGS:
        maker = structured_qkv if structured else random_qkv
        q, k, v = maker(rng, B, Hq, Hkv, Sq, Sk, D, dtype=dt)
        qb, kb = num_blocks(Sq, bq), num_blocks(Sk, bk)
        scale = 1.0 / np.sqrt(D)
        for causal in (False, True):
            lv = _new_kernel_levels(rng, B, Hq, qb, kb, bk, tn)
            yield {"label": f"{label}-random-c{int(causal)}",
                   "args": (q, k, v, lv, bq, bk, causal, scale, "new", tn), "dtype": dt}
        if kb % 2 == 0 and bk % 8 == 0:     # level 8 everywhere: every pair re-reads rows
            yield {"label": f"{label}-all8-c0",
                   "args": (q, k, v, np.full((1, 1, qb, kb), 8), bq, bk, False, scale, "new", tn),
                   "dtype": dt}


# (label, B, Hq, Hkv, Sq, Sk, D, Dv, block_size, dtype, structured)
_PIECEWISE_CONFIGS = (
    ("mha", 1, 2, 2, 96, 96, 32, 32, 32, "float32", False),
    ("gqa_partial", 2, 4, 2, 113, 203, 32, 48, 32, "float32", True),
    ("bf16", 1, 4, 1, 130, 130, 64, 64, 64, "bfloat16", True),
)


def _cases_piecewise(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, B, Hq, Hkv, Sq, Sk, D, Dv, bs, dt, structured in _PIECEWISE_CONFIGS:
        maker = structured_qkv if structured else random_qkv
        q, k, _ = maker(rng, B, Hq, Hkv, Sq, Sk, D, dtype=dt)
        v = random_qkv(rng, B, Hkv, Hkv, 1, Sk, Dv, dtype=dt)[1]
        qb, kb = num_blocks(Sq, bs), num_blocks(Sk, bs)
        sel = rng.random((B, Hq, qb, kb)) < 0.35
        if qb > 2:
            sel[..., 0, :] = False           # every block approximated
            sel[..., 1, :] = True            # every block exact
        scale = 1.0 / np.sqrt(D)
        for corr in ("global", "per_block", "none"):
            yield {"label": f"{label}-{corr}", "args": (q, k, v, sel, bs, scale, corr), "dtype": dt}


register_cases("pyramid_attention_fwd", _cases_pyramid)
register_cases("piecewise_attention_fwd", _cases_piecewise)
