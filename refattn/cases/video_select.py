"""Registry cases for the video selection-score ops of PSA and PISA:
``psa_sampled_importance``, ``psa_key_similarity`` and ``pisa_block_scores``.

Each generator yields ``{"label", "args", "dtype"}`` with the positional arguments of the
reference op; ``tests/test_registry.py`` runs every registered kernel of the op on them with
NaN-poisoned outputs. Inputs: structured video tokens (``refattn.data.video.synthetic_video``:
spatio-temporal locality, per-head profiles, text tokens in front or at the end) and random or
structured LLM-style q/k (``refattn.testing``), with partial query and key blocks, GQA,
``Sq != Sk``, bf16/fp16 inputs, PSA's shared and per-head offsets (``[B, Hq, m]``)
and every ``score_dtype`` emulation, zero and identical key rows (cosine eps, similarity 1),
and zero bias norms (PISA's ``ln(0 + 1e-5)``).
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..data.video import synthetic_video
from ..testing import random_qkv, register_cases, round_to_dtype, structured_qkv
from ..video.pisa import pisa_block_scores  # noqa: F401  (defines the op)
from ..video.psa import _replicate_pad, default_offsets, key_similarity  # noqa: F401  (defines the ops)


def _video(rng: np.random.Generator, grid: tuple[int, int, int], heads: int, kv_heads: int,
           D: int, text: int, position: str, dtype: str) -> tuple[np.ndarray, ...]:
    q, k, v = synthetic_video(grid, heads=heads, kv_heads=kv_heads, head_dim=D, text_tokens=text,
                              text_position=position, seed=int(rng.integers(1 << 16)),
                              dtype=np.float64)
    return tuple(round_to_dtype(x, dtype) for x in (q, k, v))


def _psa_cases(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    # (label, inputs, block_q, block_k, m_q, m_k, per-head offsets, score_dtype, input dtype)
    configs = [
        ("video_text_last", "video", ((4, 8, 12), 2, 2, 64, 40, "last"), 64, 32, 16, 8, True, None, "float32"),
        ("video_gqa_partial", "video", ((3, 10, 10), 4, 2, 32, 0, "last"), 64, 64, 16, 16, False, None, "float32"),
        ("video_text_first_bf16emu", "video", ((4, 8, 8), 2, 1, 64, 30, "first"), 32, 32, 8, 8, True, "bfloat16", "float32"),
        ("video_bf16_inputs", "video", ((2, 8, 16), 2, 2, 64, 0, "last"), 128, 64, 32, 16, True, "bfloat16", "bfloat16"),
        ("random_sq_ne_sk", "random", (1, 2, 1, 203, 113, 32), 32, 32, 8, 8, True, None, "float32"),
        ("structured_fp16emu", "structured", (2, 4, 2, 150, 150, 32), 64, 32, 16, 8, True, "float16", "float32"),
        ("structured_f32emu", "structured", (1, 2, 2, 130, 257, 64), 64, 64, 16, 16, False, "float32", "float32"),
        ("tiny_one_block", "random", (1, 2, 1, 17, 9, 16), 64, 64, 4, 3, True, None, "float32"),
        ("fp16_inputs", "random", (1, 2, 1, 96, 96, 64), 32, 16, 8, 4, False, None, "float16"),
    ]
    for label, kind, shape, bq, bk, mq, mk, per_head, sdt, dt in configs:
        if kind == "video":
            grid, H, Hkv, D, text, pos = shape
            q, k, _ = _video(rng, grid, H, Hkv, D, text, pos, dt)
        else:
            B, H, Hkv, Sq, Sk, D = shape
            maker = structured_qkv if kind == "structured" else random_qkv
            q, k, _ = maker(rng, B, H, Hkv, Sq, Sk, D, dtype=dt)
        B, H = q.shape[:2]
        offq = default_offsets(rng, B, H, bq, mq)
        offk = default_offsets(rng, B, H, bk, mk)
        if not per_head:                           # the same offsets in every head (the method's [m])
            offq = np.ascontiguousarray(np.broadcast_to(offq[:1, :1], offq.shape))
            offk = np.ascontiguousarray(np.broadcast_to(offk[:1, :1], offk.shape))
        yield {"label": label, "args": (q, k, bq, bk, offq, offk, sdt), "dtype": dt}


def _ksim_cases(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    # video keys (replicate-padded as the method does), a ragged tail, bf16, a 3-d array
    for label, (grid, Hkv, D, text), bk, dt in [
            ("video_padded", ((4, 8, 12), 2, 64, 40), 64, "float32"),
            ("video_ragged_tail", ((3, 10, 10), 1, 32, 0), 32, "float32"),
            ("video_bf16", ((2, 8, 16), 2, 64, 10), 128, "bfloat16")]:
        _, k, _ = _video(rng, grid, 2 * Hkv, Hkv, D, text, "last", dt)
        if label == "video_padded":
            k = _replicate_pad(k, bk)
        yield {"label": label, "args": (k, bk), "dtype": dt}
    _, k, _ = structured_qkv(rng, 2, 2, 2, 96, 96, 16)
    k = np.array(k)
    k[:, :, 5] = 0.0                               # a zero key: cosine uses the 1e-8 eps
    k[:, :, 32:64] = k[:, :, 40:41]                # identical keys: similarity 1
    yield {"label": "zero_and_identical_keys", "args": (k, 16), "dtype": "float32"}
    yield {"label": "three_dim", "args": (k[0], 8), "dtype": "float32"}


def _pisa_cases(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    # (label, inputs, block size, use_bias, scale, dtype)
    configs = [
        ("video_bias_text_first", "video", ((4, 8, 12), 2, 2, 64, 40, "first"), 64, True, None, "float32"),
        ("video_gqa_partial_bias", "video", ((3, 10, 10), 4, 2, 32, 0, "last"), 64, True, None, "float32"),
        ("video_nobias", "video", ((4, 8, 8), 2, 1, 64, 30, "last"), 32, False, None, "float32"),
        ("video_bf16_bias", "video", ((2, 8, 16), 2, 2, 64, 0, "last"), 64, True, 0.1, "bfloat16"),
        ("random_sq_ne_sk", "random", (1, 2, 1, 203, 113, 32), 32, True, None, "float32"),
        ("structured_fp16", "structured", (2, 4, 2, 150, 150, 32), 64, False, 0.25, "float16"),
        ("tiny_one_block", "random", (1, 2, 1, 17, 9, 16), 64, True, None, "float32"),
        ("zero_norm_block", "random", (1, 2, 2, 64, 96, 16), 16, True, None, "float32"),
    ]
    for label, kind, shape, bs, bias, scale, dt in configs:
        if kind == "video":
            grid, H, Hkv, D, text, pos = shape
            q, k, v = _video(rng, grid, H, Hkv, D, text, pos, dt)
        else:
            B, H, Hkv, Sq, Sk, D = shape
            maker = structured_qkv if kind == "structured" else random_qkv
            q, k, _ = maker(rng, B, H, Hkv, Sq, Sk, D, dtype=dt)
            v = round_to_dtype(rng.standard_normal(k.shape[:3] + (D + 8,)), dt)
        if label == "zero_norm_block":
            k, v = np.array(k), np.array(v)
            k[:, :, 16:32] = k[:, :, 16:17]        # constant keys: Hc = 0, bias ln(1e-5)
        yield {"label": label, "args": (q, k, v, bs, bias, scale), "dtype": dt}


register_cases("psa_sampled_importance", _psa_cases)
register_cases("psa_key_similarity", _ksim_cases)
register_cases("pisa_block_scores", _pisa_cases)
