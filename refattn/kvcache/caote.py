"""CAOTE / FastCAOTE: the attention-output error of evicting one token, in closed form.

Goel et al. (Qualcomm), "CAOTE: KV Caching through Attention Output Error based Token
Eviction", arXiv 2504.14051. **No official code was found**: this module follows the paper
(spec ``video-kv.md`` section 8.3); the multi-query aggregation of the paper is unverified.

For one query and one head with attention weights ``alpha`` over the cache and output
``o = sum_i alpha_i v_i``, evicting token ``j`` and renormalising gives
``o' = (o - alpha_j v_j) / (1 - alpha_j)``, so ``o - o' = alpha_j (v_j - o) / (1 - alpha_j)`` and

    c_j = alpha_j / (1 - alpha_j) * || o - v_j ||_2          (CAOTE; evict the smallest)
    c_j = alpha_j / (1 - alpha_j) * || mean_i v_i - v_j ||_2  (FastCAOTE)

``alpha`` is the base method's score normalised to sum to 1 per head (the paper's
meta-heuristic use): ``base="last_query"`` the attention of the last query (exact CAOTE,
TOVA-like), ``"h2o"`` the accumulated causal attention, ``"snapkv"`` the summed window
attention (unpooled). ``alpha_j = 1`` (all mass on one token) gives ``+inf``.
GQA: each query head scores with the values of its kv head (``"q"`` keep-set).
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
from ._common import attention_probs, keep_top, keepset_selection, repeat_kv, window_attention

BASES = ("last_query", "h2o", "snapkv")


@dataclass(frozen=True)
class CAOTEParams:
    """CAOTE parameters (paper-level; no official defaults exist). ``n_kept`` overrides
    ``compression_ratio`` (``n_kept = int(L (1 - r))``)."""

    base: str = "last_query"
    fast: bool = False
    compression_ratio: float = 0.5
    n_kept: int | None = None
    window_size: int = 32  # base "snapkv"

    def validate(self) -> None:
        check_choice("base", self.base, BASES)
        check_choice("fast", self.fast, (True, False))
        check_range("compression_ratio", self.compression_ratio, 0.0, 1.0)
        if self.compression_ratio >= 1.0:
            raise InputError(f"compression_ratio: must be < 1, got {self.compression_ratio}")
        if self.n_kept is not None:
            check_range("n_kept", self.n_kept, 0, integer=True)
        check_range("window_size", self.window_size, 1, integer=True)


def caote_score(alpha: np.ndarray, v: np.ndarray, fast: bool = False) -> np.ndarray:
    """CAOTE scores float64 ``[B, H, N]``.

    ``alpha [B, H, N]`` non-negative base scores (normalised here to sum 1 per head; a head of
    zero mass scores 0 everywhere); ``v [B, Hkv, N, Dv]`` with ``H % Hkv == 0``.
    """
    a = np.asarray(alpha, dtype=np.float64)
    if (a < 0).any() or not np.isfinite(a).all():
        raise InputError("alpha: CAOTE needs finite, non-negative base scores")
    tot = a.sum(axis=-1, keepdims=True)
    a = np.where(tot > 0, a / np.where(tot > 0, tot, 1.0), 0.0)
    vv = repeat_kv(v.astype(np.float64), a.shape[1])  # [B, H, N, Dv]
    o = vv.mean(axis=-2, keepdims=True) if fast else np.einsum("bhn,bhnd->bhd", a, vv)[:, :, None]
    dist = np.linalg.norm(o - vv, axis=-1)
    # alpha_j = 1: every other weight is 0, the output after eviction is undefined: +inf
    w = a / np.where(a < 1.0, 1.0 - a, 1.0)
    return np.where(a >= 1.0, np.inf, np.where(a > 0, w * dist, 0.0))


define_op("caote_score", caote_score, outputs=("scores",), kind="array")


def base_alpha(q: np.ndarray, k: np.ndarray, base: str, window_size: int = 32) -> np.ndarray:
    """The base scores ``[B, Hq, L]`` that CAOTE turns into output errors."""
    scale = default_scale(q.shape[-1])
    if base == "last_query":
        return attention_probs(q[:, :, -1:], k, scale=scale, causal=True)[:, :, 0]
    if q.shape[2] != k.shape[2]:
        raise InputError(
            f"q: base {base!r} needs prefill inputs with Sq == Sk, "
            f"got {q.shape[2]} and {k.shape[2]}"
        )
    if base == "h2o":
        return attention_probs(q, k, scale=scale, causal=True).sum(axis=-2)
    return window_attention(q, k, min(int(window_size), q.shape[2]), scale=scale).sum(axis=-2)


@register_method(
    "caote",
    CAOTEParams,
    kind="kv-cache",
    needs_v=True,
    summary="closed-form attention-output error of evicting each token (on a base score)",
    paper="Goel et al., CAOTE, arXiv 2504.14051 (paper-level; no official code)",
    code="none (paper)",
)
def select(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
    params: CAOTEParams,
    *,
    causal: bool = True,
    backend: str = "numpy",
) -> Selection:
    """Keep the ``n_kept`` tokens of largest CAOTE score per query head (score order)."""
    if v is None:
        raise InputError("v: CAOTE needs the values")
    L = k.shape[2]
    alpha = base_alpha(q, k, params.base, params.window_size)
    scores = dispatch("caote_score", backend, (alpha, v))(alpha, v, params.fast)
    n = (
        min(int(params.n_kept), L)
        if params.n_kept is not None
        else int(L * (1 - params.compression_ratio))
    )
    keep = KeepSet(keep_top(scores, n, backend), q_len=q.shape[2], k_len=L, head_kind="q")
    boundary = (
        np.take_along_axis(scores, keep.indices[..., n - 1 : n], axis=-1)[..., 0] if n else None
    )
    return keepset_selection(keep, q.shape[1], scores=scores, boundary=boundary)
