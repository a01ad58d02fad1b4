"""Registry cases for the KV-cache token-importance ops (:mod:`refattn.kvcache`): H2O,
VATP, SnapKV, kvpress observed attention / SnapKV / TOVA / knorm / keydiff / expected
attention, CAOTE, and the top-budget eviction step (``kvcache_topk_keep``).

Random, structured (sink, diagonal, stripes; ``refattn.testing.structured_qkv``) and
adversarial inputs (one dominant key, tied keys, a single token, rows that see no key when
``Sq > Sk``), with GQA, odd lengths, bf16/fp16 inputs, the smallest and largest windows the
ops allow (``W = 1``, ``W = L - 1``; a window as long as the prompt is refused by the
references), odd and even pooling sizes. VATP cases use ``sink_len = 0``: the registry's
tolerance scales with ``max|ref|``, which the sink score (float32 max) would make vacuous;
``tests/kvcache/test_kv_kernels.py`` checks the sinks exactly and the other tokens apart.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..testing import random_qkv, register_cases, round_to_dtype, sink_qkv, structured_qkv

# (label, B, Hq, Hkv, Sq, Sk, D, maker, dtype)
_SHAPES: list[tuple[str, int, int, int, int, int, int, str, str]] = [
    ("mha", 1, 2, 2, 64, 64, 32, "random", "float32"),
    ("gqa_odd", 2, 4, 2, 113, 113, 64, "structured", "float32"),
    ("mqa_sink", 1, 4, 1, 97, 97, 32, "sink", "float32"),
    ("single", 1, 2, 1, 1, 1, 16, "random", "float32"),
    ("two", 1, 2, 2, 2, 2, 16, "random", "float32"),
    ("bf16", 1, 4, 1, 130, 130, 64, "structured", "bfloat16"),
    ("fp16", 1, 2, 2, 77, 77, 128, "random", "float16"),
]


def _qkv(rng: np.random.Generator, B: int, Hq: int, Hkv: int, Sq: int, Sk: int, D: int,
         maker: str, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if maker == "sink":
        return sink_qkv(rng, batch=B, q_heads=Hq, kv_heads=Hkv, q_len=Sq, k_len=Sk, head_dim=D,
                        dtype=dtype)
    fn = structured_qkv if maker == "structured" else random_qkv
    return fn(rng, B, Hq, Hkv, Sq, Sk, D, dtype=dtype)


def _prefill(rng: np.random.Generator, min_len: int = 1
             ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, str]]:
    """Prefill inputs (``Sq == Sk``) of every shape with at least ``min_len`` tokens, plus
    one with tied keys (copies of a key block)."""
    for label, B, Hq, Hkv, Sq, Sk, D, maker, dt in _SHAPES:
        if Sq >= min_len:
            q, k, v = _qkv(rng, B, Hq, Hkv, Sq, Sk, D, maker, dt)
            yield label, q, k, v, dt
    q, k, v = random_qkv(rng, 1, 2, 1, 48, 48, 16)
    k[:, :, 8:16] = k[:, :, 0:1]
    if 48 >= min_len:
        yield "tied_keys", q, k, v, "float32"


def _cases_h2o(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, q, k, _, dt in _prefill(rng):
        yield {"label": label, "args": (q, k), "dtype": dt}
    # Sq < Sk (decode-like chunk) and Sq > Sk (rows that see no key), explicit scale
    q, k, _ = structured_qkv(rng, 1, 4, 2, 40, 130, 32)
    yield {"label": "sq_lt_sk", "args": (q, k, 0.1), "dtype": "float32"}
    q, k, _ = random_qkv(rng, 1, 2, 1, 130, 57, 32)
    yield {"label": "sq_gt_sk", "args": (q, k), "dtype": "float32"}


def _cases_observed(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, q, k, _, dt in _prefill(rng):
        yield {"label": label, "args": (q, k), "dtype": dt}
    q, k, _ = random_qkv(rng, 2, 4, 2, 33, 90, 32)
    yield {"label": "sq_lt_sk", "args": (q, k), "dtype": "float32"}


def _cases_vatp(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for i, (label, q, k, v, dt) in enumerate(_prefill(rng)):
        mode = ("h2o", "scissorhands")[i % 2]
        yield {"label": f"{label}-{mode}", "args": (q, k, v, mode, 0), "dtype": dt}
    # longer than the scissorhands window (last 400 rows), GQA, both modes
    q, k, v = structured_qkv(rng, 1, 4, 2, 433, 433, 32)
    for mode in ("h2o", "scissorhands"):
        yield {"label": f"long-{mode}", "args": (q, k, v, mode, 0, 0.2), "dtype": "float32"}
    q, k, v = random_qkv(rng, 1, 2, 1, 30, 70, 32)
    yield {"label": "sq_lt_sk-scissorhands", "args": (q, k, v, "scissorhands", 0),
           "dtype": "float32"}


def _cases_snapkv(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    combos = [(1, 1, "avgpool", "query"), (5, 5, "avgpool", "kv"), (7, 3, "maxpool", "query"),
              (-1, 7, "maxpool", "kv"), (3, 4, "avgpool", "query")]   # W = -1: L - 1
    n = 0
    for label, q, k, _, dt in _prefill(rng, min_len=2):
        for W, ks, pool, hm in combos:
            L = k.shape[2]
            w = L - 1 if W < 0 else min(W, L - 1)
            if (n + len(label)) % 2 == 0 or W < 0:
                yield {"label": f"{label}-W{w}-k{ks}-{pool}-{hm}",
                       "args": (q, k, w, ks, pool, hm), "dtype": dt}
            n += 1
    q, k, _ = structured_qkv(rng, 2, 4, 2, 200, 200, 32)
    yield {"label": "scaled-W32-maxpool-kv", "args": (q, k, 32, 7, "maxpool", "kv", 0.3),
           "dtype": "float32"}


def _cases_press_snapkv(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, q, k, _, dt in _prefill(rng, min_len=2):
        L = k.shape[2]
        for W, ks in ((1, 5), (L - 1, 3), (min(16, L - 1), 5)):
            yield {"label": f"{label}-W{W}-k{ks}", "args": (q, k, W, ks), "dtype": dt}


def _cases_tova(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    for label, q, k, _, dt in _prefill(rng, min_len=2):
        yield {"label": label, "args": (q, k), "dtype": dt}


def _alpha(rng: np.random.Generator, B: int, H: int, N: int, kind: str) -> np.ndarray:
    if kind == "softmax":
        s = rng.standard_normal((B, H, N)) * 2.0
        a = np.exp(s - s.max(-1, keepdims=True))
        return a / a.sum(-1, keepdims=True)
    if kind == "counts":        # unnormalised accumulated attention with exact zeros
        a = rng.gamma(0.5, 2.0, (B, H, N))
        a[a < 0.2] = 0.0
        return a
    a = np.zeros((B, H, N))     # adversarial: one-hot heads (+inf), an all-zero head
    a[:, 0, rng.integers(N)] = 2.5
    if H > 1:
        a[:, 1] = 0.0
    if H > 2:
        a[:, 2:] = rng.random((B, H - 2, N))
    return a


def _cases_caote(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    # (label, B, H, Hkv, N, Dv, alpha kind, dtype)
    for label, B, H, Hkv, N, Dv, kind, dt in [
        ("mha", 1, 2, 2, 64, 32, "softmax", "float32"),
        ("gqa_odd", 2, 4, 2, 113, 64, "counts", "float32"),
        ("onehot_zero", 1, 4, 1, 57, 32, "onehot", "float32"),
        ("single", 1, 2, 1, 1, 16, "counts", "float32"),
        ("bf16", 1, 4, 2, 130, 128, "softmax", "bfloat16"),
    ]:
        v = round_to_dtype(rng.standard_normal((B, Hkv, N, Dv)), dt)
        a = _alpha(rng, B, H, N, kind)
        for fast in (False, True):
            yield {"label": f"{label}-fast{int(fast)}", "args": (a, v, fast), "dtype": dt}


def _cases_topk(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    s = rng.standard_normal((2, 4, 97))
    for k in (0, 1, 31, 97):
        yield {"label": f"random-k{k}", "args": (s, k), "dtype": "float64"}
    t = rng.integers(0, 4, (2, 3, 64)).astype(np.float64)    # many exact ties
    t[0, 0, 5] = np.nan
    t[1, 2, :10] = -np.inf
    t[1, 1, :] = 1.0                                          # one plateau
    for k in (7, 40, 64):
        yield {"label": f"ties-k{k}", "args": (t, k), "dtype": "float64"}
    yield {"label": "single", "args": (np.array([[3.0]]), 1), "dtype": "float64"}
    # (``valid=`` is keyword-only in the reference, so the registry cases cannot pass it;
    # tests/kvcache/test_kv_kernels.py covers it)


def _cases_knorm_keydiff(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """(k,): every prefill shape, plus zero keys (norm 0: keydiff's ``1e-12`` / ``1e-8``
    clamps), an all-zero head (anchor 0), a head of one repeated key, and float64 keys."""
    for label, _, k, _, dt in _prefill(rng):
        yield {"label": label, "args": (k,), "dtype": dt}
    k = rng.standard_normal((2, 3, 300, 64)).astype(np.float32)
    k[0, 0, ::7] = 0.0
    k[0, 1] = 0.0
    k[1, 2] = k[1, 2, 5]
    yield {"label": "zeros_repeated", "args": (k,), "dtype": "float32"}
    yield {"label": "fp64_offset", "args": (rng.standard_normal((1, 2, 129, 32)) + 3.0,),
           "dtype": "float64"}


# HF ``rope_scaling`` of Llama 3.1-3.3 (with rope_theta 500000), and a small one whose
# wavelength bands (64 / 2 = 32 .. 64) fall inside short head dims and prompts.
LLAMA31_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SMALL_LLAMA3_SCALING = {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 2.0, "original_max_position_embeddings": 64}


def _cases_expected(rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """(q, k, v, n_future_positions, n_sink, use_covariance, use_vnorm, epsilon, rope_base
    [, rope_scaling]): every prefill shape (``n_sink`` lowered below the length where
    needed), GQA/MQA, both covariance and v-norm switches, ``epsilon > 0``, one future
    position, another RoPE base; HF ``rope_scaling`` ``"llama3"`` (Llama 3.1's, and a small
    one with every band inside the head dim), ``"linear"``."""
    opts = [(512, 4, True, True, 0.0, 10000.0), (64, 0, False, True, 0.0, 10000.0),
            (1, 2, True, False, 0.0, 500000.0), (512, 1, True, True, 0.01, 10000.0)]
    for i, (label, q, k, v, dt) in enumerate(_prefill(rng)):
        F, ns, cov, vn, eps, base = opts[i % len(opts)]
        ns = min(ns, k.shape[2] - 1)
        yield {"label": f"{label}-F{F}-s{ns}-c{int(cov)}-v{int(vn)}",
               "args": (q, k, v, F, ns, cov, vn, eps, base), "dtype": dt}
    q, k, v = structured_qkv(rng, 2, 4, 2, 257, 257, 64)
    for cov in (True, False):
        yield {"label": f"structured_gqa-c{int(cov)}",
               "args": (q, k, v, 512, 4, cov, True, 0.0, 10000.0), "dtype": "float32"}
    for cov in (True, False):
        yield {"label": f"structured_gqa-llama31-c{int(cov)}",
               "args": (q, k, v, 512, 4, cov, True, 0.0, 500000.0, LLAMA31_SCALING),
               "dtype": "float32"}
    q, k, v = random_qkv(rng, 1, 4, 1, 97, 97, 32)
    yield {"label": "mqa-small_llama3", "args": (q, k, v, 64, 2, True, True, 0.0, 10000.0,
                                                 SMALL_LLAMA3_SCALING), "dtype": "float32"}
    yield {"label": "mqa-linear", "args": (q, k, v, 16, 2, True, False, 0.0, 10000.0,
                                           {"rope_type": "linear", "factor": 2.0}),
           "dtype": "float32"}
    q, k, v = structured_qkv(rng, 1, 4, 2, 130, 130, 64, dtype="bfloat16")
    yield {"label": "bf16-llama31", "args": (q, k, v, 512, 4, True, True, 0.01, 500000.0,
                                             LLAMA31_SCALING), "dtype": "bfloat16"}


register_cases("h2o_score", _cases_h2o)
register_cases("kvpress_observed_attention_score", _cases_observed)
register_cases("vatp_score", _cases_vatp)
register_cases("snapkv_score", _cases_snapkv)
register_cases("kvpress_snapkv_score", _cases_press_snapkv)
register_cases("kvpress_tova_score", _cases_tova)
register_cases("caote_score", _cases_caote)
register_cases("kvcache_topk_keep", _cases_topk)
register_cases("kvpress_knorm_score", _cases_knorm_keydiff)
register_cases("kvpress_keydiff_score", _cases_knorm_keydiff)
register_cases("kvpress_expected_attention_score", _cases_expected)
