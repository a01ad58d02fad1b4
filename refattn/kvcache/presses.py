"""NVIDIA kvpress scorer presses: one score per (kv head, token), keep the top ``n_kept``.

Official code ``NVIDIA/kvpress@8bb29b9c3078452a86d692f29123fa6c793e2b05`` (v0.5.4),
``kvpress/presses/*_press.py``, ``scorer_press.py``. Common mechanics (``ScorerPress``):
compression at prefill only; ``scores [B, Hkv, L]`` (higher = keep);
``n_kept = int(L (1 - compression_ratio))``; ``indices = topk(scores, n_kept)`` gathered in
**top-k order**; per-query-head scores are averaged over each GQA group; forced tokens
(window, sinks, last token) get ``scores.max() + 1`` (the maximum over the whole tensor).

Scores (q post-RoPE ``[B, Hq, L, D]``, k post-RoPE and v ``[B, Hkv, L, D]``):

* ``knorm``: ``-||k_j||_2``;
* ``keydiff``: ``-cos(k_j, mean_i k_i / ||k_i||)``;
* ``streaming_llm``: 1 on the first ``n_sink`` and the last ``n_kept - n_sink`` tokens, else 0;
* ``snapkv``: window attention ``A`` of the last ``W`` queries, **mean** over the window,
  ``avg_pool1d(k, pad k//2)``, GQA mean, window tokens ``max + 1``;
* ``tova``: attention of the last query over ``j < L-1``, mean over **all** query heads
  (same for every kv head), last token ``max + 1``;
* ``observed_attention``: ``sum_i A[i, j] / (L - j)`` (mean over the queries that see ``j``),
  GQA mean;
* ``expected_attention``: pre-RoPE query mean ``mu`` and covariance ``S`` over tokens
  ``>= n_sink``; averaged future rotation ``Rbar = mean_{p in [L, L+n_future)} R(p)``;
  ``z_j = (Rbar mu) . k_j / sqrt(d) + k_j^T (Rbar S Rbar^T) k_j / (2d)`` over ``j >= n_sink``;
  ``softmax_j``, GQA mean, ``(. + eps) ||v_j||_2``; sinks ``max + 1``. Pre-RoPE queries are
  recovered by the inverse rotation (positions ``0..L-1``); ``R`` is the model's RoPE
  (the official press uses ``module.rotary_emb``): ``rope_base`` and HF ``rope_scaling``
  (e.g. Llama-3.1's ``"llama3"``; :func:`refattn.kvcache._common.rope_inv_freq`);
* ``random``: ``U(0, 1)`` from NumPy's generator (``seed``); it cannot match torch's stream.

Ties: lower position first (``torch.topk`` is unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError
from ..core.keepset import KeepSet
from ..core.layout import default_scale
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..methods.base import check_choice, check_range, register_method
from ._common import (
    apply_rope,
    attention_probs,
    check_rope_scaling,
    freeze_rope_scaling,
    group_mean,
    keep_top,
    keepset_selection,
    repeat_kv,
    rope_cos_sin,
    window_attention,
)
from .snapkv import pool1d

PRESSES = (
    "knorm",
    "keydiff",
    "streaming_llm",
    "snapkv",
    "tova",
    "observed_attention",
    "expected_attention",
    "random",
)


@dataclass(frozen=True)
class PressParams:
    """One kvpress scorer press. ``compression_ratio`` official default 0.0 (no eviction);
    ``n_kept`` (optional) overrides it with a token count. Other fields are used by the
    presses named in their comment, with the official defaults. ``rope_scaling`` is HF
    ``config.rope_scaling`` (``None`` = plain RoPE), stored as its sorted ``(key, value)``
    pairs (the dataclass is frozen)."""

    press: str = "knorm"
    compression_ratio: float = 0.0
    n_kept: int | None = None
    window_size: int = 64  # snapkv
    kernel_size: int = 5  # snapkv
    n_sink: int = 4  # streaming_llm, expected_attention
    n_future_positions: int = 512  # expected_attention
    use_covariance: bool = True  # expected_attention
    use_vnorm: bool = True  # expected_attention
    epsilon: float = 0.0  # expected_attention
    rope_base: float = 10000.0  # expected_attention (un-rotating q)
    seed: int = 0  # random
    rope_scaling: dict | tuple | None = None  # expected_attention (HF rope_scaling, e.g. llama3)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_scaling", freeze_rope_scaling(self.rope_scaling))

    def validate(self) -> None:
        check_choice("press", self.press, PRESSES)
        check_range("compression_ratio", self.compression_ratio, 0.0, 1.0)
        if self.compression_ratio >= 1.0:
            raise InputError(f"compression_ratio: must be < 1, got {self.compression_ratio}")
        if self.n_kept is not None:
            check_range("n_kept", self.n_kept, 0, integer=True)
        check_range("window_size", self.window_size, 1, integer=True)
        check_range("kernel_size", self.kernel_size, 1, integer=True)
        if int(self.kernel_size) % 2 == 0:
            raise InputError(f"kernel_size: must be odd, got {self.kernel_size}")
        check_range("n_sink", self.n_sink, 0, integer=True)
        check_range("n_future_positions", self.n_future_positions, 1, integer=True)
        check_choice("use_covariance", self.use_covariance, (True, False))
        check_choice("use_vnorm", self.use_vnorm, (True, False))
        check_range("epsilon", self.epsilon, 0.0)
        check_range("rope_base", self.rope_base, 0.0, lo_open=True)
        check_range("seed", self.seed, 0, integer=True)
        check_rope_scaling(self.rope_scaling)

    def kept_count(self, length: int) -> int:
        """``n_kept`` or ``int(L (1 - compression_ratio))``."""
        if self.n_kept is not None:
            return min(int(self.n_kept), length)
        return int(length * (1.0 - self.compression_ratio))


def _pad_max(scores: np.ndarray, before: int, after: int) -> np.ndarray:
    """``F.pad(scores, (before, after), value=scores.max() + 1)`` (global maximum)."""
    fill = float(scores.max()) + 1.0
    return np.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(before, after)], constant_values=fill)


def knorm_score(k: np.ndarray) -> np.ndarray:
    """``-||k_j||_2``, float64 ``[B, Hkv, L]``."""
    return -np.linalg.norm(k.astype(np.float64), axis=-1)


def keydiff_score(k: np.ndarray) -> np.ndarray:
    """``-cos(k_j, anchor)``, ``anchor = mean_i k_i/||k_i||``, float64 ``[B, Hkv, L]``."""
    kk = k.astype(np.float64)
    n = np.linalg.norm(kk, axis=-1, keepdims=True)
    anchor = (kk / np.maximum(n, 1e-12)).mean(axis=-2, keepdims=True)
    cos = (kk * anchor).sum(-1) / np.maximum(n[..., 0] * np.linalg.norm(anchor, axis=-1), 1e-8)
    return -cos


def streaming_llm_score(k: np.ndarray, n_kept: int, n_sink: int) -> np.ndarray:
    """1 on the first ``n_sink`` and the last ``n_kept - n_sink`` tokens, 0 between."""
    L = k.shape[2]
    if n_kept < n_sink:
        raise InputError(
            f"n_kept: the streaming_llm press keeps at least n_sink = {n_sink} tokens, got {n_kept}"
        )
    s = np.ones(k.shape[:3])
    s[..., n_sink : n_sink + (L - n_kept)] = 0.0
    return s


def snapkv_press_score(
    q: np.ndarray, k: np.ndarray, window_size: int, kernel_size: int
) -> np.ndarray:
    """kvpress SnapKV: window mean attention, avg-pooled, GQA mean, window ``max + 1``."""
    W, L = int(window_size), k.shape[2]
    if L <= W:
        raise InputError(f"window_size: the sequence ({L}) must be longer than the window ({W})")
    A = window_attention(q, k, W, scale=default_scale(q.shape[-1]))[..., : L - W]
    s = group_mean(pool1d(A.mean(axis=-2), int(kernel_size), "avgpool"), k.shape[1])
    return _pad_max(s, 0, W)


def tova_score(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """TOVA: last query's attention over ``j < L-1``, mean over all query heads, last ``max+1``."""
    A = window_attention(q, k, 1, scale=default_scale(q.shape[-1]))[..., 0, :-1]  # [B, Hq, L-1]
    s = np.repeat(A.mean(axis=1, keepdims=True), k.shape[1], axis=1)
    return _pad_max(s, 0, 1)


def observed_attention_score(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``sum_i A[i, j] / (L - j)`` over the causal prefill attention, GQA mean."""
    A = attention_probs(q, k, scale=default_scale(q.shape[-1]), causal=True)
    L = k.shape[2]
    return group_mean(A.sum(axis=-2) / np.arange(L, 0, -1), k.shape[1])


def expected_attention_score(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    n_future_positions: int = 512,
    n_sink: int = 4,
    use_covariance: bool = True,
    use_vnorm: bool = True,
    epsilon: float = 0.0,
    rope_base: float = 10000.0,
    rope_scaling: dict | None = None,
) -> np.ndarray:
    """Expected attention of future queries (see the module docstring), ``[B, Hkv, L]``.
    ``rope_base`` / ``rope_scaling`` (HF ``config.rope_scaling``) define the rotations."""
    B, Hq, L, d = q.shape
    if L <= n_sink:
        raise InputError(f"n_sink: the input must hold more than n_sink = {n_sink} tokens, got {L}")
    qpre = apply_rope(q, -np.arange(L), rope_base, rope_scaling)[:, :, n_sink:]  # pre-RoPE
    mu = qpre.mean(axis=2)  # [B, Hq, d]
    cos, sin = rope_cos_sin(
        np.arange(L, L + n_future_positions), d, rope_base, rope_scaling
    )  # [F, d]
    P = np.zeros((d, d))
    P[d // 2 :, : d // 2], P[: d // 2, d // 2 :] = np.eye(d // 2), -np.eye(d // 2)
    R = (cos[:, None, :] * np.eye(d) + sin[:, None, :] * P).mean(
        axis=0
    )  # R[i,j] = c_j d_ij + s_j P_ij
    mu = mu @ R.T
    kk = repeat_kv(k[:, :, n_sink:].astype(np.float64), Hq)  # [B, Hq, n, d]
    z = np.einsum("bhd,bhnd->bhn", mu, kk) / np.sqrt(d)
    if use_covariance:
        c = qpre - qpre.mean(axis=2, keepdims=True)
        cov = np.einsum("bhni,bhnj->bhij", c, c) / c.shape[2]
        cov = R @ cov @ R.T
        z = z + np.einsum("bhni,bhij,bhnj->bhn", kk, cov, kk) / d / 2
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    s = group_mean(z / z.sum(axis=-1, keepdims=True), k.shape[1])
    if use_vnorm:
        s = (s + epsilon) * np.linalg.norm(v[:, :, n_sink:].astype(np.float64), axis=-1)
    return _pad_max(s, n_sink, 0)


def random_score(k: np.ndarray, seed: int = 0) -> np.ndarray:
    """``U(0, 1)`` per (b, kv head, token) from ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).random(k.shape[:3])


# Ops without kernels by design (refattn.core.registry: every backend runs the reference).
HOST_ONLY = {
    "streaming_llm": "a fixed 0/1 pattern of the sequence length: no arithmetic on the inputs",
    "random": "NumPy's default_rng(seed) stream, which a kernel cannot reproduce",
}

for _name, _fn in (
    ("knorm", knorm_score),
    ("keydiff", keydiff_score),
    ("streaming_llm", streaming_llm_score),
    ("snapkv", snapkv_press_score),
    ("tova", tova_score),
    ("observed_attention", observed_attention_score),
    ("expected_attention", expected_attention_score),
    ("random", random_score),
):
    define_op(f"kvpress_{_name}_score", _fn, outputs=("scores",), kind="array",
              host_only=HOST_ONLY.get(_name, ""))


def press_score(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
    params: PressParams,
    *,
    backend: str = "numpy",
) -> np.ndarray:
    """The press's scores float64 ``[B, Hkv, L]`` on prefill inputs."""
    p, L = params.press, k.shape[2]
    fn = dispatch(f"kvpress_{p}_score", backend, (q, k))
    if p in ("knorm", "keydiff"):
        return fn(k)
    if p == "random":
        return fn(k, params.seed)
    if p == "streaming_llm":
        return fn(k, params.kept_count(L), params.n_sink)
    if q.shape[2] != L:
        raise InputError(
            f"q: the {p} press needs prefill inputs with Sq == Sk, got {q.shape[2]} and {L}"
        )
    if p == "snapkv":
        return fn(q, k, params.window_size, params.kernel_size)
    if p in ("tova", "observed_attention"):
        return fn(q, k)
    if v is None:
        raise InputError("v: the expected_attention press needs the values")
    return fn(
        q,
        k,
        v,
        params.n_future_positions,
        params.n_sink,
        params.use_covariance,
        params.use_vnorm,
        params.epsilon,
        params.rope_base,
        params.rope_scaling,
    )


def press_keep(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
    params: PressParams,
    *,
    backend: str = "numpy",
) -> tuple[KeepSet, np.ndarray]:
    """``ScorerPress.compress``: ``topk(scores, n_kept)`` per kv head, in top-k order; with
    ``compression_ratio == 0`` (and no ``n_kept``) the official press returns the cache
    unchanged, so every token is kept in position order (the scores are still computed)."""
    scores = press_score(q, k, v, params, backend=backend)
    L = k.shape[2]
    if params.n_kept is None and params.compression_ratio == 0:
        idx = np.broadcast_to(np.arange(L), scores.shape).copy()
    else:
        idx = keep_top(scores, params.kept_count(L), backend)
    keep = KeepSet(idx, q_len=q.shape[2], k_len=L, head_kind="kv")
    return keep, scores


@register_method(
    "kvpress",
    PressParams,
    kind="kv-cache",
    summary="NVIDIA kvpress scorer presses (knorm, keydiff, streaming_llm, snapkv, "
    "tova, observed/expected attention, random)",
    paper="Devoto et al., kvpress (NVIDIA), expected attention arXiv 2510.00636",
    code="NVIDIA/kvpress@8bb29b9c3078452a86d692f29123fa6c793e2b05",
)
def select(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
    params: PressParams,
    *,
    causal: bool = True,
    backend: str = "numpy",
) -> Selection:
    """A press on prefill inputs; one keep-set per kv head (``head_kind="kv"``)."""
    keep, scores = press_keep(q, k, v, params, backend=backend)
    n = keep.counts.max()
    boundary = (
        np.take_along_axis(scores, keep.indices[..., n - 1 : n], axis=-1)[..., 0] if n else None
    )
    return keepset_selection(keep, q.shape[1], scores=scores, boundary=boundary)
