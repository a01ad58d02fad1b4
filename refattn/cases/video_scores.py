"""Registry cases for the video scoring ops (AdaSpa, Sparse VideoGen, SpargeAttn).

Each generator yields ``{"label", "args", "dtype"}`` with the positional arguments of the
reference op; ``tests/test_registry.py`` runs every registered kernel of the op on them with
NaN-poisoned outputs. Inputs are structured (sinks, local diagonal, stripes, RoPE) so that
the masses, errors and similarities are far from uniform, plus adversarial edges: partial
blocks, rows that see no key (``lse = -inf``; SVG: NaN MSE), stale cached LSE, empty mask
rows, zero rows, GQA, bf16 and fp16 inputs.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..data.synthetic import synthetic
from ..testing import register_cases, round_to_dtype
from ..video.adaspa import exact_lse
from ..video.spargeattn import spargeattn_pool
from ..video.svg import svg_masked_row_mse  # noqa: F401  (defines the op)


def _qkv(rng: np.random.Generator, B: int, Hq: int, Hkv: int, Sq: int, Sk: int, D: int,
         dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q, k, v = synthetic(B, Hq, Hkv, max(Sq, Sk), D, q_len=Sq, seed=int(rng.integers(1 << 16)))
    k, v = np.ascontiguousarray(k[:, :, :Sk]), np.ascontiguousarray(v[:, :, :Sk])
    return tuple(round_to_dtype(x, dtype) for x in (q, k, v))  # type: ignore[return-value]


def _adaspa_cases(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, (B, Hq, Hkv, Sq, Sk, D, bs), causal, dt, stale in [
            ("gqa_partial", (1, 4, 2, 203, 203, 32, 64), False, "float32", False),
            ("causal_sq_gt_sk", (1, 2, 1, 130, 97, 32, 32), True, "float32", False),
            ("causal_square", (2, 2, 2, 96, 96, 16, 16), True, "float32", False),
            ("one_block", (1, 2, 1, 17, 17, 16, 64), False, "float32", False),
            ("stale_lse", (1, 2, 2, 150, 150, 32, 32), False, "float32", True),
            ("bf16", (1, 2, 1, 130, 130, 64, 64), False, "bfloat16", False)]:
        q, k, _ = _qkv(rng, B, Hq, Hkv, Sq, Sk, D, dt)
        scale = 1.0 / np.sqrt(D)
        lse = exact_lse(q, k, causal, scale)
        if stale:  # LSE cached from another step: rows no longer sum to 1
            lse = lse + rng.normal(0.0, 0.3, lse.shape)
        yield {"label": label, "args": (q, k, lse, bs, scale, causal), "dtype": dt}


def _svg_cases(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, (B, Hq, Hkv, L, D, R), dt in [
            ("mha", (1, 2, 2, 160, 32, 12), "float32"),
            ("gqa", (2, 4, 2, 97, 16, 7), "float32"),
            ("fp16", (1, 2, 1, 128, 64, 9), "float16"),
            ("bf16", (1, 2, 1, 130, 64, 16), "bfloat16")]:
        q, k, v = _qkv(rng, B, Hq, Hkv, L, L, D, dt)
        rows = rng.integers(0, L, size=R).astype(np.int64)
        band = np.abs(rows[:, None] - np.arange(L)[None, :]) < L // 5
        masks = np.stack([band, rng.random((R, L)) < 0.3, np.ones((R, L), bool)])
        # a sampled row that sees no key: mask 1's MSE is NaN (first or last sampled row)
        masks[1, R - 1 if label == "gqa" else 0] = False
        yield {"label": label, "args": (q, k, v, rows, masks, 1.0 / np.sqrt(D)), "dtype": dt}


def _pool_cases(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, (B, H, S, D, bs), center, dt in [
            ("partial_center", (1, 2, 203, 32, 64), True, "float32"),
            ("exact_blocks", (2, 2, 128, 16, 32), False, "float32"),
            ("zero_rows", (1, 1, 96, 16, 32), False, "float32"),
            ("one_block", (1, 2, 17, 16, 64), True, "float32"),
            ("bf16", (1, 2, 130, 64, 64), True, "bfloat16")]:
        _, x, _ = _qkv(rng, B, H, H, S, S, D, dt)
        if label == "zero_rows":
            x = np.array(x)
            x[:, :, 40] = 0.0                      # one zero row in block 1: not self-similar
            x[:, :, 64:96] = x[:, :, 64:65]        # identical rows in block 2: sim = 1
        yield {"label": label, "args": (x, bs, center), "dtype": dt}


def _map_cases(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, (B, Hq, Hkv, S, D, bq, bk), dt in [
            ("gqa", (1, 4, 2, 203, 32, 32, 16), "float32"),
            ("mha", (2, 2, 2, 256, 64, 64, 32), "float32"),
            ("bf16", (1, 2, 1, 130, 64, 32, 64), "bfloat16")]:
        q, k, _ = _qkv(rng, B, Hq, Hkv, S, S, D, dt)
        pq, _ = spargeattn_pool(q, bq, False)
        pk, _ = spargeattn_pool(k, bk, True)
        allowed = rng.random((B, Hq, pq.shape[2], pk.shape[2])) < 0.7
        allowed[..., 0, :] = False                 # a row with no allowed block: P = 0
        allowed[..., 1, :] = True
        yield {"label": label, "args": (pq, pk, allowed, 1.0 / np.sqrt(D)), "dtype": dt}


register_cases("adaspa_block_mass", _adaspa_cases)
register_cases("svg_masked_row_mse", _svg_cases)
register_cases("spargeattn_pool", _pool_cases)
register_cases("spargeattn_map", _map_cases)

