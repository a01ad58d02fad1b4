"""SnapKV: keep the prefix tokens that an observation window of recent queries attends to.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024.
Official code: ``FasterDecoding/SnapKV@e216ddc84c5bd210378cbdbbba12ba02102aa640``,
``snapkv/monkeypatch/snapkv_utils.py`` (``SnapKVCluster.update_kv``). Applied once, at prefill.

With ``L`` prompt tokens, window ``W`` and capacity ``C = max_capacity_prompt``
(nothing is evicted when ``L < C``)::

    A     = softmax(Q[L-W:] K^T / sqrt(D))          window query i (position L-W+i) sees j <= L-W+i
    vote_j = sum_{i < W} A[i, j]                     for prefix keys j < L - W
    pool   = avg_pool1d(vote, k, pad k//2, stride 1) (zero padding counted: edges divided by k)
             or max_pool1d(vote, k, pad k//2, stride 1)
    keep   = topk(pool, C - W)  (descending score order)  ++  [L-W, ..., L-1]

``head_mode="query"`` (official): the hijacked forwards call ``repeat_kv`` before
``update_kv``, so every query head selects its own tokens (``"q"`` keep-set).
``head_mode="kv"`` (kvpress's ``SnapKVPress`` and SnapKV issue #22): the pooled scores are
averaged over the query heads of each GQA group, one selection per kv head.

Ties: ``torch.topk`` leaves the order of equal scores unspecified (max pooling makes
plateaus); the reference takes the lower position first.
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
from ._common import group_mean, keep_top, keepset_selection, window_attention

POOLINGS = ("avgpool", "maxpool")
HEAD_MODES = ("query", "kv")


@dataclass(frozen=True)
class SnapKVParams:
    """SnapKV parameters; defaults are the model-config defaults of ``init_snapkv``
    (the class defaults are ``W = 64, C = 256 + 64``; LongBench configs ``W = 32, k = 7,
    maxpool``, ``C`` in {1024, 2048, 4096})."""

    window_size: int = 32
    max_capacity_prompt: int = 2048
    kernel_size: int = 5
    pooling: str = "avgpool"
    head_mode: str = "query"

    def validate(self) -> None:
        check_range("window_size", self.window_size, 1, integer=True)
        check_range(
            "max_capacity_prompt",
            self.max_capacity_prompt,
            self.window_size,
            integer=True,
            lo_open=True,
        )  # official: assert max_capacity_prompt - window_size > 0
        check_range("kernel_size", self.kernel_size, 1, integer=True)
        if int(self.kernel_size) % 2 == 0:
            # pad k//2 with an even k gives L-W+1 pooled values: the official gather then fails
            raise InputError(
                f"kernel_size: must be odd (pooling pads k//2 on each side), got {self.kernel_size}"
            )
        check_choice("pooling", self.pooling, POOLINGS)
        check_choice("head_mode", self.head_mode, HEAD_MODES)


def pool1d(x: np.ndarray, kernel_size: int, pooling: str) -> np.ndarray:
    """``torch.nn.functional.{avg,max}_pool1d(x, k, padding=k//2, stride=1)`` on the last axis
    (odd ``k``; avg counts the zero padding, max pads with ``-inf``)."""
    p = kernel_size // 2
    fill = 0.0 if pooling == "avgpool" else -np.inf
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(p, p)], constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(xp, kernel_size, axis=-1)
    return win.sum(-1) / kernel_size if pooling == "avgpool" else win.max(-1)


def snapkv_score(
    q: np.ndarray,
    k: np.ndarray,
    window_size: int,
    kernel_size: int,
    pooling: str = "avgpool",
    head_mode: str = "query",
    scale: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SnapKV scores of the prefix tokens (reference, float64).

    q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]`` (post-RoPE, prefill so ``Sq == Sk``).
    Returns ``vote [B, Hq, L-W]`` (summed window attention) and ``pooled [B, H, L-W]``
    (``H = Hq`` for ``head_mode="query"``, ``Hkv`` for ``"kv"``: group mean of the pooled
    per-query-head scores).
    """
    scale = default_scale(q.shape[-1], scale)
    W = int(window_size)
    if W >= k.shape[2]:
        raise InputError(
            f"window_size: must be smaller than the sequence length {k.shape[2]}, got {W}"
        )
    A = window_attention(q, k, W, scale=scale)  # [B, Hq, W, L]
    vote = A[..., : k.shape[2] - W].sum(axis=-2)  # [B, Hq, L-W]
    pooled = pool1d(vote, int(kernel_size), pooling)
    if head_mode == "kv":
        pooled = group_mean(pooled, k.shape[1])
    return vote, pooled


define_op("snapkv_score", snapkv_score, outputs=("vote", "pooled"), kind="array")


def snapkv_keep(
    q: np.ndarray, k: np.ndarray, params: SnapKVParams, *, backend: str = "numpy"
) -> tuple[KeepSet, np.ndarray | None]:
    """The kept tokens in official cache order (top-k order, then the window), and the
    pooled scores (``None`` when ``L < max_capacity_prompt``: nothing is evicted)."""
    B, Hq, L, _ = q.shape
    H = Hq if params.head_mode == "query" else k.shape[1]
    kind = "q" if params.head_mode == "query" else "kv"
    if L < params.max_capacity_prompt:
        return KeepSet.full(B, H, q_len=L, k_len=L, head_kind=kind), None
    W = int(params.window_size)
    _, pooled = dispatch("snapkv_score", backend, (q, k))(
        q, k, W, int(params.kernel_size), params.pooling, params.head_mode
    )
    top = keep_top(pooled, int(params.max_capacity_prompt) - W, backend)
    win = np.broadcast_to(np.arange(L - W, L), (B, H, W))
    return KeepSet(np.concatenate([top, win], axis=-1), q_len=L, k_len=L, head_kind=kind), pooled


@register_method(
    "snapkv",
    SnapKVParams,
    kind="kv-cache",
    summary="observation-window attention, 1-D pooled, top-k prefix + window",
    paper="Li et al., SnapKV, NeurIPS 2024 (arXiv 2404.14469)",
    code="FasterDecoding/SnapKV@e216ddc84c5bd210378cbdbbba12ba02102aa640",
)
def select(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
    params: SnapKVParams,
    *,
    causal: bool = True,
    backend: str = "numpy",
) -> Selection:
    """SnapKV selection on prefill inputs; ``extras["keepset"]`` holds the kept cache."""
    keep, pooled = snapkv_keep(q, k, params, backend=backend)
    L, W = q.shape[2], int(params.window_size)
    scores = boundary = forced = None
    if pooled is not None:
        scores = np.concatenate([pooled, np.full(pooled.shape[:2] + (W,), np.nan)], axis=-1)
        n = int(params.max_capacity_prompt) - W
        boundary = (
            np.take_along_axis(pooled, keep.indices[..., n - 1 : n], axis=-1)[..., 0] if n else None
        )
        forced = np.zeros(pooled.shape[:2] + (L,), bool)
        forced[..., L - W :] = True
    return keepset_selection(keep, q.shape[1], scores=scores, boundary=boundary, forced=forced)
