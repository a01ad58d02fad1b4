"""Registry cases of the LLM-prefill scoring ops (MoBA, XAttention, Prism, BSFA, MInference,
FlexPrefill, Quest, NSA, ProxyAttention): random and structured inputs, partial blocks,
GQA, ``Sq != Sk`` where the op allows it, a bf16 input. Each generator yields
``{"label", "args", "dtype"}`` with ``args`` the reference's positional arguments."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..data.synthetic import synthetic
from ..testing import random_qkv, register_cases

Case = Iterator[dict[str, Any]]


def _qk(rng: np.random.Generator, kind: str, B: int, Hq: int, Hkv: int, Sq: int, Sk: int,
        D: int, dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``: ``"random"`` Gaussian or ``"structured"``
    (refattn.data.synthetic: sinks, local band, stripes, slashes, RoPE); rounded to dtype."""
    if kind == "random":
        q, k, _ = random_qkv(rng, B, Hq, Hkv, Sq, Sk, D)
    else:
        q, k, _ = synthetic(B, Hq, Hkv, max(Sq, Sk), D, q_len=Sq, seed=int(rng.integers(1 << 16)))
        k = np.ascontiguousarray(k[:, :, :Sk])
    if dtype == "bfloat16":
        import ml_dtypes
        return q.astype(ml_dtypes.bfloat16), k.astype(ml_dtypes.bfloat16)
    return q.astype(dtype), k.astype(dtype)


def moba_score_cases(rng: np.random.Generator) -> Case:
    """(q, k, block_size)."""
    for label, kind, (B, Hq, Hkv, Sq, Sk, D, blk), dt in [
            ("gqa_partial", "structured", (1, 4, 2, 113, 203, 64, 32), "float32"),
            ("sq_gt_sk", "structured", (1, 2, 1, 70, 50, 32, 16), "float32"),
            ("one_block", "structured", (2, 2, 2, 17, 17, 16, 64), "float32"),
            ("bf16", "structured", (1, 2, 1, 130, 257, 64, 64), "bfloat16"),
            ("random_fp64", "random", (1, 2, 1, 96, 200, 32, 24), "float64")]:
        q, k = _qk(rng, kind, B, Hq, Hkv, Sq, Sk, D, dt)
        yield {"label": label, "args": (q, k, blk), "dtype": dt}


def xattention_score_cases(rng: np.random.Generator) -> Case:
    """(q, k, block_size, stride, chunk_size, norm, causal); Sq == Sk."""
    for label, kind, (B, Hq, Hkv, L, D), geo, causal in [
            ("gqa_partial", "structured", (1, 4, 2, 300, 64), (64, 8, 128, 1.0), True),
            ("stride16_pad", "structured", (1, 2, 1, 513, 32), (128, 16, 256, 1.0), True),
            ("random_multi_chunk", "random", (2, 2, 2, 200, 32), (32, 4, 64, 1.0), True),
            ("non_causal", "structured", (1, 2, 1, 150, 32), (32, 8, 64, 2.0), False),
            ("tiny", "random", (1, 2, 1, 5, 16), (16, 4, 32, 1.0), True),
            ("chunk_aligned_gqa", "structured", (1, 4, 1, 256, 32), (32, 4, 128, 1.0), True),
            ("chunk_aligned_non_causal", "random", (1, 2, 2, 128, 16), (32, 8, 64, 1.0), False)]:
        q, k = _qk(rng, kind, B, Hq, Hkv, L, L, D)
        yield {"label": label, "args": (q, k) + geo + (causal,), "dtype": "float32"}


def prism_score_cases(rng: np.random.Generator) -> Case:
    """(q, k, block_size, high_freq_dim, low_freq_dim, calibrate, high_temp, low_temp)."""
    for label, kind, (B, Hq, Hkv, Sq, Sk, D), rest in [
            ("gqa_partial", "structured", (1, 4, 2, 300, 300, 64), (64, 32, 48, True, 1.0, 1.0)),
            ("sq_lt_sk", "structured", (1, 2, 1, 100, 300, 64), (32, 32, 48, True, 1.0, 1.0)),
            ("sq_gt_sk", "random", (1, 2, 2, 200, 130, 32), (32, 16, 24, True, 1.0, 1.0)),
            ("fixed_temps", "structured", (2, 2, 1, 256, 256, 128), (64, 64, 96, False, 1.0, 0.7))]:
        q, k = _qk(rng, kind, B, Hq, Hkv, Sq, Sk, D)
        yield {"label": label, "args": (q, k) + rest, "dtype": "float32"}


def bsfa_score_cases(rng: np.random.Generator) -> Case:
    """(q, k, block_q, block_k, scale, causal): both modes, Sq < Sk and Sq > Sk (causal
    rows that see no key: whole rows of ``-inf``), partial tiles, GQA, bf16."""
    for label, kind, (B, Hq, Hkv, Sq, Sk, D), (bq, bk), dt, causal in [
            ("gqa_partial", "structured", (1, 4, 2, 113, 203, 64), (32, 16), "float32", False),
            ("gqa_partial_causal", "structured", (1, 4, 2, 113, 203, 64), (32, 16), "float32",
             True),
            ("square", "structured", (1, 2, 1, 256, 256, 64), (128, 64), "float32", False),
            ("square_causal", "structured", (1, 2, 1, 300, 300, 64), (128, 64), "float32", True),
            ("sq_gt_sk", "random", (2, 2, 2, 203, 113, 32), (64, 32), "float32", False),
            ("sq_gt_sk_causal", "random", (2, 2, 2, 203, 113, 32), (64, 32), "float32", True),
            ("sq_lt_sk_causal_tiles", "random", (1, 2, 1, 70, 150, 16), (16, 48), "float32", True),
            ("bf16", "structured", (1, 2, 1, 130, 257, 64), (64, 64), "bfloat16", False),
            ("bf16_causal", "structured", (1, 2, 1, 257, 257, 64), (64, 32), "bfloat16", True)]:
        q, k = _qk(rng, kind, B, Hq, Hkv, Sq, Sk, D, dt)
        yield {"label": label, "args": (q, k, bq, bk, 1.0 / np.sqrt(D), causal), "dtype": dt}


def quest_score_cases(rng: np.random.Generator) -> Case:
    """(q, k, page_size, causal)."""
    for label, kind, (B, Hq, Hkv, Sq, Sk, D), page, causal in [
            ("decode_one", "structured", (1, 4, 2, 1, 1000, 64), 16, True),
            ("decode_rows_partial", "structured", (2, 2, 1, 4, 1003, 32), 16, True),
            ("prefill_small", "structured", (1, 2, 2, 40, 40, 16), 8, True),
            ("prefill_random", "random", (1, 2, 1, 150, 150, 32), 16, True),
            ("sq_gt_sk", "random", (1, 2, 1, 90, 60, 16), 16, True),
            ("non_causal", "structured", (1, 2, 1, 3, 77, 16), 32, False)]:
        q, k = _qk(rng, kind, B, Hq, Hkv, Sq, Sk, D)
        yield {"label": label, "args": (q, k, page, causal), "dtype": "float32"}


def nsa_score_cases(rng: np.random.Generator) -> Case:
    """(q, k, compress_size, stride, block_size, causal)."""
    for label, kind, (B, Hq, Hkv, Sq, Sk, D), geo, causal in [
            ("default_gqa", "structured", (1, 4, 2, 300, 300, 64), (32, 16, 64), True),
            ("decode_rows", "structured", (1, 2, 1, 5, 517, 32), (32, 16, 64), True),
            ("short", "structured", (1, 2, 2, 20, 20, 16), (32, 16, 64), True),
            ("random_partial", "random", (1, 2, 1, 150, 230, 32), (16, 8, 32), True),
            ("non_causal_small", "structured", (2, 2, 1, 90, 90, 16), (8, 4, 12), False)]:
        q, k = _qk(rng, kind, B, Hq, Hkv, Sq, Sk, D)
        yield {"label": label, "args": (q, k) + geo + (causal,), "dtype": "float32"}


def minference_score_cases(rng: np.random.Generator) -> Case:
    """(q, k, last_q, scale)."""
    for label, kind, (B, Hq, Hkv, Sq, Sk, D), last_q in [
            ("gqa", "structured", (1, 4, 2, 300, 300, 64), 64),
            ("sq_lt_sk", "structured", (1, 2, 1, 40, 230, 32), 64),
            ("sq_gt_sk", "random", (2, 2, 2, 130, 70, 32), 32),
            ("short", "random", (1, 2, 1, 9, 9, 16), 64)]:
        q, k = _qk(rng, kind, B, Hq, Hkv, Sq, Sk, D)
        yield {"label": label, "args": (q, k, last_q, None), "dtype": "float32"}


def flexprefill_score_cases(rng: np.random.Generator) -> Case:
    """(q, k, block_size, scale); Sq == Sk."""
    for label, kind, (B, Hq, Hkv, L, D), b in [
            ("gqa_partial", "structured", (1, 4, 2, 300, 64), 64),
            ("random", "random", (2, 2, 2, 130, 32), 32),
            ("one_block", "structured", (1, 2, 1, 50, 32), 64)]:
        q, k = _qk(rng, kind, B, Hq, Hkv, L, L, D)
        yield {"label": label, "args": (q, k, b, None), "dtype": "float32"}


def proxyattn_score_cases(rng: np.random.Generator) -> Case:
    """(q, k, block_size, group_size, stride, causal)."""
    for label, kind, (B, Hq, Hkv, Sq, Sk, D), rest in [
            ("gqa_group2", "structured", (1, 4, 2, 300, 300, 64), (64, 2, 1, True)),
            ("stride4_all_heads", "structured", (1, 4, 2, 200, 200, 32), (32, 4, 4, True)),
            ("sq_lt_sk", "random", (1, 2, 1, 70, 150, 32), (32, 2, 3, True)),
            ("sq_gt_sk", "random", (1, 2, 1, 150, 70, 32), (32, 2, 1, True)),
            ("non_causal", "structured", (2, 2, 2, 96, 96, 16), (32, 1, 2, False)),
            ("stride_not_dividing", "structured", (1, 2, 2, 171, 171, 32), (32, 1, 5, True)),
            ("stride_over_block", "random", (1, 4, 1, 90, 120, 16), (16, 4, 24, True))]:
        q, k = _qk(rng, kind, B, Hq, Hkv, Sq, Sk, D)
        yield {"label": label, "args": (q, k) + rest, "dtype": "float32"}


def proxyattn_budget_score_cases(rng: np.random.Generator) -> Case:
    """(q, k, block_size, causal)."""
    for label, kind, (B, Hq, Hkv, Sq, Sk, D), bs, causal in [
            ("gqa_partial", "structured", (1, 4, 2, 300, 300, 64), 64, True),
            ("sq_lt_sk", "random", (1, 2, 1, 70, 150, 32), 32, True),
            ("sq_gt_sk", "random", (1, 2, 1, 150, 70, 32), 32, True),
            ("non_causal", "structured", (2, 2, 2, 96, 96, 16), 32, False)]:
        q, k = _qk(rng, kind, B, Hq, Hkv, Sq, Sk, D)
        yield {"label": label, "args": (q, k, bs, causal), "dtype": "float32"}


for _op, _gen in [("moba_score", moba_score_cases), ("xattention_score", xattention_score_cases),
                  ("prism_score", prism_score_cases), ("bsfa_score", bsfa_score_cases),
                  ("quest_score", quest_score_cases), ("nsa_score", nsa_score_cases),
                  ("minference_score", minference_score_cases),
                  ("flexprefill_score", flexprefill_score_cases),
                  ("proxyattn_score", proxyattn_score_cases),
                  ("proxyattn_budget_score", proxyattn_budget_score_cases)]:
    register_cases(_op, _gen)


def pbs_key_importance_cases(rng: np.random.Generator) -> Case:
    """(q, k, block_size, segment_size); Sq == Sk."""
    for label, kind, (B, Hq, Hkv, L, D), (b, s) in [
            ("gqa_partial_segment", "structured", (1, 4, 2, 300, 64), (64, 128)),
            ("random", "random", (2, 2, 2, 256, 32), (32, 64)),
            ("short_query_block", "structured", (1, 2, 1, 40, 32), (64, 32)),
            ("no_complete_segment", "random", (1, 2, 1, 50, 16), (32, 64))]:
        q, k = _qk(rng, kind, B, Hq, Hkv, L, L, D)
        yield {"label": label, "args": (q, k, b, s), "dtype": "float32"}


register_cases("pbs_key_importance", pbs_key_importance_cases)
