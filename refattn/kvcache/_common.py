"""Shared pieces of the KV-cache methods: attention probabilities, top-k in keep order,
RoPE (rotate-half) helpers, and ``Selection`` packaging.

All arrays are canonical ``bhsd`` and computed in float64: q ``[B, Hq, Sq, D]``,
k/v ``[B, Hkv, Sk, D]``. GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.keepset import KeepSet
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..reference.memory import rows_per_chunk
from ..reference.selection import rank_order


def repeat_kv(x: np.ndarray, num_q_heads: int) -> np.ndarray:
    """``[B, Hkv, S, D] -> [B, Hq, S, D]``: kv head ``g`` repeated for query heads
    ``g*G .. g*G+G-1`` (transformers' ``repeat_kv``)."""
    hkv = x.shape[1]
    if num_q_heads % hkv:
        raise InputError(f"GQA: {num_q_heads} query heads are not a multiple of {hkv} kv heads")
    return np.repeat(x, num_q_heads // hkv, axis=1)


def group_mean(x: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """``[B, Hq, ...] -> [B, Hkv, ...]``: mean over the query heads of each GQA group
    (kvpress's "average per group")."""
    B, H = x.shape[:2]
    return x.reshape((B, num_kv_heads, H // num_kv_heads) + x.shape[2:]).mean(axis=2)


def attention_probs(
    q: np.ndarray,
    k: np.ndarray,
    *,
    scale: float,
    causal: bool = True,
    key_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Softmax probabilities float64 ``[B, Hq, Sq, Sk]``.

    ``p_ij = exp(s_ij - lse_i)`` with ``s_ij = scale * q_i . k_j`` over visible ``j``:
    bottom-right causal (``j <= i + Sk - Sq``) when ``causal``, and kept by ``key_mask``
    (bool ``[B, Hq, Sk]``) when given. Rows with no visible key are all zero.
    Refuses (MemoryLimitError) problems whose probability matrix exceeds the memory limit.
    """
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    rows_per_chunk(1, 8 * B * Hq * Sq * Sk * 3, 0, "KV-cache attention probabilities")
    kk = repeat_kv(k.astype(np.float64), Hq)
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), kk) * scale
    vis = np.ones((1, 1, Sq, Sk), dtype=bool)
    if causal:
        vis = vis & (np.arange(Sk)[None, :] <= np.arange(Sq)[:, None] + (Sk - Sq))
    if key_mask is not None:
        vis = vis & key_mask[:, :, None, :]
    s = np.where(vis, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    p = np.where(vis, np.exp(s - m), 0.0)
    tot = p.sum(axis=-1, keepdims=True)
    return np.where(tot > 0, p / np.where(tot > 0, tot, 1.0), 0.0)


def window_attention(q: np.ndarray, k: np.ndarray, window: int, *, scale: float) -> np.ndarray:
    """Attention of the last ``window`` queries over all keys, float64 ``[B, Hq, W, Sk]``.

    Query ``i`` of the window sits at position ``Sk - W + i`` and sees keys ``j <= Sk - W + i``
    (SnapKV's ``finfo.min`` mask on the last ``W x W`` block; kvpress's ``triu`` ``-inf``).
    Requires ``Sq == Sk`` (prefill), as both official codes assert.
    """
    if q.shape[2] != k.shape[2]:
        raise InputError(
            f"q: the observation window needs prefill inputs with Sq == Sk, got "
            f"Sq = {q.shape[2]}, Sk = {k.shape[2]}"
        )
    if not 1 <= window <= q.shape[2]:
        raise InputError(
            f"window_size: must lie in [1, {q.shape[2]}] (the sequence length), got {window}"
        )
    return attention_probs(q[:, :, -window:], k, scale=scale, causal=True)


def topk_keep(scores: np.ndarray, k: int, *, valid: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` best entries of the last axis, **in descending score order**
    (the order ``torch.topk`` returns): int64 ``[..., k]``. Ties go to the lower index
    (``torch.topk`` leaves their order unspecified). Invalid / NaN entries come last."""
    if k < 0 or k > scores.shape[-1]:
        raise InputError(f"top-k: k must lie in [0, {scores.shape[-1]}], got {k}")
    return rank_order(scores, valid, "low")[..., :k].astype(np.int64)


# ------------------------------------------------------------------- RoPE


# The eviction step as a registry op, so its kernels are checked by the registry suite
# (cases in refattn/cases/kvcache.py; ``valid`` is keyword-only and not part of the cases).
TOPK_KEEP = define_op("kvcache_topk_keep", topk_keep, outputs=("indices",), kind="exact")


def keep_top(scores: np.ndarray, k: int, backend: str = "numpy") -> np.ndarray:
    """:func:`topk_keep` through the registry (op ``kvcache_topk_keep``), so that a
    method's ``backend`` reaches the eviction kernel; the same indices, in the same order."""
    return np.asarray(dispatch(TOPK_KEEP.name, backend, (scores,))(scores, int(k)))

def rope_cos_sin(positions: Any, dim: int, base: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """Rotate-half RoPE tables float64 ``[..., dim]`` for integer ``positions [...]``:
    ``theta_i = base^(-2i/dim)``, ``angle = pos * theta``, ``cos``/``sin`` repeated over the
    two halves (transformers' ``LlamaRotaryEmbedding``)."""
    if dim % 2:
        raise InputError(f"RoPE: head dim must be even, got {dim}")
    if not base > 0:
        raise InputError(f"rope_base: must be > 0, got {base}")
    inv = 1.0 / (float(base) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    ang = np.asarray(positions, dtype=np.float64)[..., None] * inv
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang), np.sin(ang)


def rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: np.ndarray, positions: Any, base: float = 10000.0) -> np.ndarray:
    """``x * cos + rotate_half(x) * sin`` with the tables of ``positions``; ``positions``
    broadcasts against ``x.shape[:-1]`` (e.g. ``[S]`` for ``[..., S, D]``). Negative
    positions rotate backwards (the inverse rotation)."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], base)
    x = np.asarray(x, dtype=np.float64)
    return x * cos + rotate_half(x) * sin


def rerotate(
    x: np.ndarray, old_positions: Any, new_positions: Any, base: float = 10000.0
) -> np.ndarray:
    """Move post-RoPE vectors from ``old_positions`` to ``new_positions``: ``R(new - old) x``
    (RoPE rotations compose, so this equals un-rotating then rotating; exact in float64)."""
    return apply_rope(x, np.asarray(new_positions) - np.asarray(old_positions), base)


# -------------------------------------------------------------- packaging
def keepset_selection(
    keep: KeepSet,
    num_q_heads: int,
    *,
    scores: np.ndarray | None = None,
    boundary: np.ndarray | None = None,
    forced: np.ndarray | None = None,
    extras: dict[str, Any] | None = None,
) -> Selection:
    """Wrap a keep-set in a :class:`Selection` (``refattn.attention(q, k, v, mask=sel)`` runs
    the evicted cache).

    * ``mask``: :meth:`KeepSet.to_block_mask` (``block_q = q_len``, ``block_k = 1``, head kind
      of the keep-set);
    * ``scores``: the token scores ranked, float64 ``[B, H, Sk]``, as :class:`BlockScores`
      ``[B, H, 1, Sk]`` on the same grid (``nan`` where a token was not ranked);
    * ``boundary``: per head ``[B, H]``, the lowest score kept by rank;
    * ``extras["keepset"]`` the keep-set, ``extras["token_mask"]`` it expanded to query heads.
    """
    bs = None
    if scores is not None:
        bs = BlockScores(
            np.asarray(scores, np.float64)[:, :, None, :],
            block_q=keep.q_len,
            block_k=1,
            q_len=keep.q_len,
            k_len=keep.k_len,
            head_kind=keep.head_kind,
        )
    ex = {"keepset": keep, "token_mask": keep.expand_heads(num_q_heads)}
    ex.update(extras or {})
    fmask = None if forced is None else np.asarray(forced, bool)[:, :, None, :]
    return Selection(
        mask=keep.to_block_mask(), scores=bs, boundary=boundary, forced=fmask, extras=ex
    )
