"""Registry cases for the attention-derived importance ops (BlockRank, FOCUS, VFlowOpt, RSQ):
random, structured (sinks, GQA, padding, partial blocks) and adversarial (ties, a single
token, fully padded rows) inputs."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..testing import random_qkv, register_cases, sink_qkv, structured_qkv


def _blockrank_valid(rng: np.random.Generator, B: int, M: int, hb: int) -> np.ndarray:
    lens = rng.integers(1, hb + 1, size=(B, M))
    lens[:, -1] = np.maximum(lens[:, -1], 3)                 # query block holds the 2 rows
    return np.arange(hb)[None, None, :] >= (hb - lens)[..., None]


def _cases_blockrank(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    # (label, B, H, Hk, M, Hb, D, dtype)
    for label, B, H, Hk, M, hb, D, dt in [("mha", 1, 2, 2, 5, 16, 16, "float32"),
                                          ("gqa_b2", 2, 4, 2, 7, 32, 32, "float32"),
                                          ("one_doc", 1, 2, 1, 3, 8, 8, "float32"),
                                          ("bf16", 1, 4, 1, 6, 16, 64, "bfloat16")]:
        q, k, _ = structured_qkv(rng, B, H, Hk, M * hb, M * hb, D, dtype=dt)
        valid = _blockrank_valid(rng, B, M, hb)
        S = M * hb
        rows = np.tile(np.array([S - 2, S - 1]), (B, 1))
        yield {"label": label, "args": (q, k, valid, rows, D ** -0.5), "dtype": dt}
    # a padded query row (uniform fallback) and an unscaled (SDPA) variant
    q, k, _ = random_qkv(rng, 1, 2, 1, 64, 64, 16)
    valid = _blockrank_valid(rng, 1, 4, 16)
    valid[0, -1, :8] = False
    yield {"label": "pad_row_sdpa", "args": (q, k, valid, np.array([[48, 63]]), 1.0),
           "dtype": "float32"}


def _cases_focus(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, B, H, Hk, L, D, maker in [("mha", 1, 4, 4, 32, 32, random_qkv),
                                         ("gqa", 2, 8, 2, 17, 64, structured_qkv),
                                         ("single", 1, 2, 1, 1, 16, random_qkv),
                                         ("two", 1, 2, 1, 2, 16, random_qkv),
                                         ("sink", 1, 2, 1, 40, 32, sink_qkv)]:
        if maker is sink_qkv:
            q, k, _ = sink_qkv(rng, batch=B, q_heads=H, kv_heads=Hk, q_len=L, k_len=L,
                               head_dim=D)
        else:
            q, k, _ = maker(rng, B, H, Hk, L, L, D)
        yield {"label": label, "args": (q, k, D ** -0.5), "dtype": "float32"}
    q, k, _ = random_qkv(rng, 1, 2, 1, 12, 12, 16)
    k[:, :, 4:8] = k[:, :, 4:5]                              # tied logits
    yield {"label": "ties", "args": (q, k, 0.25), "dtype": "float32"}


def _softmax_probs(rng: np.random.Generator, B: int, H: int, n: int, sink: bool) -> np.ndarray:
    s = rng.standard_normal((B, H, n, n)) * 2.0
    if sink:
        s[..., rng.integers(n)] += 6.0
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def _cases_vflowopt(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, B, H, n, sink, t in [("t0", 1, 4, 81, False, 0.0), ("t1", 2, 4, 81, True, 1.0),
                                    ("t_high", 1, 2, 144, True, 3.0),
                                    ("single", 1, 1, 1, False, 0.5)]:
        yield {"label": label, "args": (_softmax_probs(rng, B, H, n, sink), t),
               "dtype": "float32"}


def _cases_rsq(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, B, H, Hk, L, D, maker in [("mha", 1, 2, 2, 64, 32, random_qkv),
                                         ("gqa_partial", 2, 4, 2, 113, 32, structured_qkv),
                                         ("one", 1, 2, 1, 1, 16, random_qkv),
                                         ("bf16", 1, 4, 1, 130, 64, structured_qkv)]:
        dt = "bfloat16" if label == "bf16" else "float32"
        q, k, _ = maker(rng, B, H, Hk, L, L, D, dtype=dt)
        yield {"label": label, "args": (q, k, D ** -0.5), "dtype": dt}
    q, k, _ = sink_qkv(rng, batch=1, q_heads=2, kv_heads=1, q_len=70, k_len=70, head_dim=32)
    yield {"label": "sink", "args": (q, k, 32 ** -0.5), "dtype": "float32"}


register_cases("blockrank_doc_scores", _cases_blockrank)
register_cases("focus_importance", _cases_focus)
register_cases("vflowopt_relevance", _cases_vflowopt)
register_cases("rsq_attention_received", _cases_rsq)
