"""Registry cases of PBS-Attn's block-score op ``pbs_score`` (:mod:`refattn.methods.pbs`).

``pbs_score(q, k_perm, block_size, segment_size)`` takes q ``[B, Hq, L, D]`` and the keys
of every query head already permuted, ``k_perm [B, Hq, L, D]``; ``Sq == Sk`` by the op's
definition (prefill). The cases build ``k_perm`` the way the method does (GQA keys repeated
to the query heads, then sorted inside segments by the reference key importance) or as a
random permutation, and cover: partial last blocks (zero padding in the means), both
segment geometries (``segment_size == block_size``, ``m = 1``; and ``m > 1`` with a partial
last segment), a sequence no longer than one segment (every row NaN: the dense fallback),
a single token, random and structured (sinks, bands, stripes; RoPE) inputs, bf16, fp16
and fp64 inputs. Rows of segment 0 are NaN in every case (``Op.equal_nan``).
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..data.synthetic import synthetic
from ..methods.pbs import pbs_key_importance, permutation_from_importance
from ..testing import random_qkv, register_cases, round_to_dtype

Case = Iterator[dict[str, Any]]


def _qk(rng: np.random.Generator, kind: str, B: int, Hq: int, Hkv: int, L: int, D: int
        ) -> tuple[np.ndarray, np.ndarray]:
    """float32 q ``[B, Hq, L, D]`` and k ``[B, Hkv, L, D]``: Gaussian or structured."""
    if kind == "random":
        q, k, _ = random_qkv(rng, B, Hq, Hkv, L, L, D)
    else:
        q, k, _ = synthetic(B, Hq, Hkv, L, D, seed=int(rng.integers(1 << 16)))
    return q.astype(np.float32), k.astype(np.float32)


def _permuted_keys(rng: np.random.Generator, q: np.ndarray, k: np.ndarray, b: int, s: int,
                   how: str) -> np.ndarray:
    """``k_perm [B, Hq, L, D]``: kv heads repeated to the query heads (GQA), then permuted
    as PBS does (``how="pbs"``: key importance, sort inside complete segments), by a random
    permutation per head (``"random"``) or not at all (``"identity"``)."""
    B, Hq, L, _ = q.shape
    G = Hq // k.shape[1]
    k_rep = np.repeat(k, G, axis=1)
    if how == "identity":
        return np.ascontiguousarray(k_rep)
    if how == "pbs":
        (w,) = pbs_key_importance(q, k, b, s)
        perm = permutation_from_importance(w, L, s)
    else:
        perm = np.argsort(rng.random((B, Hq, L)), axis=-1)
    return np.ascontiguousarray(np.take_along_axis(k_rep, perm[..., None], axis=2))


def pbs_score_cases(rng: np.random.Generator) -> Case:
    """(q, k_perm, block_size, segment_size); ``Sq == Sk`` (the op has one length)."""
    # (label, kind, (B, Hq, Hkv, L, D), (block, segment), permutation, dtype)
    for label, kind, (B, Hq, Hkv, L, D), (b, s), how, dt in [
            ("gqa_partial_m2", "structured", (1, 4, 2, 300, 64), (32, 64), "pbs", "float32"),
            ("mha_aligned_m2", "random", (2, 2, 2, 256, 32), (32, 64), "pbs", "float32"),
            ("segment_eq_block", "structured", (1, 4, 1, 200, 32), (16, 16), "pbs", "float32"),
            ("m4_partial_segment", "structured", (1, 2, 1, 333, 64), (16, 64), "random",
             "float32"),
            ("one_segment_all_nan", "random", (1, 2, 1, 100, 32), (32, 128), "identity",
             "float32"),
            ("two_blocks_m1", "random", (1, 2, 2, 40, 16), (32, 32), "identity", "float32"),
            ("single_token", "random", (1, 2, 1, 1, 16), (8, 16), "identity", "float32"),
            ("bf16_mqa", "structured", (1, 4, 1, 260, 64), (32, 64), "pbs", "bfloat16"),
            ("fp16", "random", (1, 2, 2, 130, 128), (16, 32), "pbs", "float16"),
            ("fp64", "structured", (1, 2, 1, 190, 32), (16, 48), "random", "float64")]:
        q, k = _qk(rng, kind, B, Hq, Hkv, L, D)
        q, k = round_to_dtype(q, dt), round_to_dtype(k, dt)
        kp = _permuted_keys(rng, q.astype(np.float32), k.astype(np.float32), b, s, how)
        yield {"label": label, "args": (q, round_to_dtype(kp, dt), b, s), "dtype": dt}


register_cases("pbs_score", pbs_score_cases)
