"""Shared pieces of the KV-cache methods: attention probabilities, top-k in keep order,
RoPE (rotate-half) helpers, and ``Selection`` packaging.

All arrays are canonical ``bhsd`` and computed in float64: q ``[B, Hq, Sq, D]``,
k/v ``[B, Hkv, Sk, D]``. GQA: query head ``h`` reads kv head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

from collections.abc import Mapping
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


# The eviction step as a registry op, so its kernels are checked by the registry suite
# (cases in refattn/cases/kvcache.py; ``valid`` is keyword-only and not part of the cases).
TOPK_KEEP = define_op("kvcache_topk_keep", topk_keep, outputs=("indices",), kind="exact")


def keep_top(scores: np.ndarray, k: int, backend: str = "numpy") -> np.ndarray:
    """:func:`topk_keep` through the registry (op ``kvcache_topk_keep``), so that a
    method's ``backend`` reaches the eviction kernel; the same indices, in the same order."""
    return np.asarray(dispatch(TOPK_KEEP.name, backend, (scores,))(scores, int(k)))


# ------------------------------------------------------------------- RoPE
# HF ``rope_scaling`` types whose cos/sin are plain RoPE of rescaled frequencies (transformers'
# ``attention_factor`` is 1 for them): the keys each one takes besides ``rope_type``.
ROPE_SCALING_KEYS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}


def _rope_scaling_spec(scaling: Any) -> tuple[str, dict[str, float]]:
    """``(rope_type, {key: float})`` of an HF ``rope_scaling`` (a mapping, or the sorted
    ``(key, value)`` pairs the method parameters store), validated; ``("default", {})``
    for ``None``. Raises :class:`InputError` naming ``rope_scaling``."""
    if scaling is None:
        return "default", {}
    if isinstance(scaling, Mapping):
        items = dict(scaling)
    else:
        try:
            items = dict(scaling)
        except (TypeError, ValueError):
            raise InputError(
                "rope_scaling: expected None or a dict like HF config.rope_scaling, e.g. "
                "{'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, "
                f"'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}}, "
                f"got {scaling!r}"
            ) from None
    if any(not isinstance(key, str) for key in items):
        raise InputError(f"rope_scaling: keys must be strings, got {sorted(map(repr, items))}")
    # "type" is transformers' old name of "rope_type" (both may be present and agree)
    kinds = [items.pop(key) for key in ("rope_type", "type") if key in items]
    if not kinds:
        raise InputError(
            f"rope_scaling: missing 'rope_type' (or its alias 'type'); supported: "
            f"{sorted(ROPE_SCALING_KEYS)}, got {scaling!r}"
        )
    if len(kinds) > 1 and kinds[0] != kinds[1]:
        raise InputError(f"rope_scaling: 'rope_type' and 'type' disagree: {kinds!r}")
    kind = kinds[0]
    if not isinstance(kind, str) or kind not in ROPE_SCALING_KEYS:
        raise InputError(
            f"rope_scaling: rope_type {kind!r} is not supported; supported: "
            f"{sorted(ROPE_SCALING_KEYS)} (plain RoPE of rescaled frequencies). 'dynamic' "
            "depends on the sequence length, 'yarn' and 'longrope' also scale cos/sin "
            "(attention_factor)"
        )
    need = ROPE_SCALING_KEYS[kind]
    missing = [key for key in need if key not in items]
    if missing:
        raise InputError(f"rope_scaling: rope_type {kind!r} needs {list(need)}; missing {missing}")
    extra = sorted(set(items) - set(need))
    if extra:
        hint = " (give the base as rope_base)" if "rope_theta" in extra else ""
        raise InputError(
            f"rope_scaling: rope_type {kind!r} takes {list(need)}; unknown key(s) {extra}{hint}"
        )
    vals: dict[str, float] = {}
    for key in need:
        v = items[key]
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise InputError(f"rope_scaling: {key} must be a number, got {v!r}")
        if not (np.isfinite(v) and v > 0):
            raise InputError(f"rope_scaling: {key} must be finite and > 0, got {v!r}")
        vals[key] = float(v)
    if kind == "llama3" and not vals["high_freq_factor"] > vals["low_freq_factor"]:
        raise InputError(
            "rope_scaling: high_freq_factor must be > low_freq_factor (the smoothing divides "
            f"by their difference), got {vals['high_freq_factor']} and {vals['low_freq_factor']}"
        )
    return kind, vals


def check_rope_scaling(scaling: Any) -> None:
    """Raise :class:`InputError` unless ``scaling`` is ``None`` or a supported HF
    ``rope_scaling`` (see :func:`rope_inv_freq`); the parameters' ``validate()`` call it."""
    _rope_scaling_spec(scaling)


def freeze_rope_scaling(scaling: Any) -> Any:
    """The form a frozen parameter dataclass stores: a mapping becomes its ``(key, value)``
    pairs sorted by key (hashable, immutable); anything else is returned as given (checked
    later by :func:`check_rope_scaling`). The RoPE helpers accept both forms."""
    if isinstance(scaling, Mapping):
        return tuple(sorted(scaling.items(), key=lambda kv: str(kv[0])))
    if isinstance(scaling, list):
        return tuple(tuple(x) if isinstance(x, list) else x for x in scaling)
    return scaling


def rope_inv_freq(dim: int, base: float = 10000.0, scaling: Any = None) -> np.ndarray:
    """RoPE inverse frequencies float64 ``[dim/2]`` as transformers'
    ``ROPE_INIT_FUNCTIONS[rope_type](config)`` (``src/transformers/modeling_rope_utils.py``,
    checked at ``huggingface/transformers@0044e3b3facff1a1ad60b235c69d5b45beae75a4``).

    ``scaling`` is HF ``config.rope_scaling`` (a dict; ``"type"`` is accepted as the old name
    of ``"rope_type"``; ``None`` = no scaling):

    * ``None`` / ``"default"`` (``_compute_default_rope_parameters``)::

          inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    * ``"linear"`` (``_compute_linear_scaling_rope_parameters``): ``inv_freq /= factor``;
    * ``"llama3"`` (``_compute_llama3_parameters``; Llama 3.1-3.3 use ``factor=8``,
      ``low_freq_factor=1``, ``high_freq_factor=4``,
      ``original_max_position_embeddings=8192``)::

          low_freq_wavelen = old_context_len / low_freq_factor
          high_freq_wavelen = old_context_len / high_freq_factor
          wavelen = 2 * math.pi / inv_freq
          # wavelen < high_freq_wavelen: do nothing
          # wavelen > low_freq_wavelen: divide by factor
          inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
          # otherwise: interpolate between the two, using a smooth factor
          smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
          smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
          is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
          inv_freq_llama = torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)

      with ``old_context_len = original_max_position_embeddings``.

    These three leave transformers' ``attention_factor`` at 1 (cos/sin unscaled), so the
    rotation stays ``angle = pos * inv_freq``. ``"dynamic"`` (depends on the sequence
    length), ``"yarn"`` and ``"longrope"`` (``attention_factor != 1``) are refused with
    :class:`InputError`, as are missing or unknown keys (transformers raises on missing
    keys and only warns on unknown ones) and ``high_freq_factor <= low_freq_factor``.
    transformers computes in float32; this is float64.
    """
    if dim % 2:
        raise InputError(f"RoPE: head dim must be even, got {dim}")
    if not base > 0:
        raise InputError(f"rope_base: must be > 0, got {base}")
    kind, p = _rope_scaling_spec(scaling)
    inv_freq = 1.0 / (float(base) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if kind == "linear":
        return inv_freq / p["factor"]
    if kind == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old / lo, old / hi
        wavelen = 2 * np.pi / inv_freq
        inv_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return np.where(is_medium, smoothed, inv_llama)
    return inv_freq


def rope_cos_sin(
    positions: Any, dim: int, base: float = 10000.0, scaling: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Rotate-half RoPE tables float64 ``[..., dim]`` for integer ``positions [...]``:
    ``angle = pos * inv_freq`` with :func:`rope_inv_freq` (``theta_i = base^(-2i/dim)``,
    rescaled by the HF ``scaling``), ``cos``/``sin`` repeated over the two halves
    (transformers' ``LlamaRotaryEmbedding``)."""
    inv = rope_inv_freq(dim, base, scaling)
    ang = np.asarray(positions, dtype=np.float64)[..., None] * inv
    ang = np.concatenate([ang, ang], axis=-1)
    return np.cos(ang), np.sin(ang)


def rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(
    x: np.ndarray, positions: Any, base: float = 10000.0, scaling: Any = None
) -> np.ndarray:
    """``x * cos + rotate_half(x) * sin`` with the tables of ``positions``; ``positions``
    broadcasts against ``x.shape[:-1]`` (e.g. ``[S]`` for ``[..., S, D]``). Negative
    positions rotate backwards (the inverse rotation). ``scaling``: HF ``rope_scaling``
    (:func:`rope_inv_freq`)."""
    cos, sin = rope_cos_sin(positions, x.shape[-1], base, scaling)
    x = np.asarray(x, dtype=np.float64)
    return x * cos + rotate_half(x) * sin


def rerotate(
    x: np.ndarray,
    old_positions: Any,
    new_positions: Any,
    base: float = 10000.0,
    scaling: Any = None,
) -> np.ndarray:
    """Move post-RoPE vectors from ``old_positions`` to ``new_positions``: ``R(new - old) x``
    (RoPE rotations compose, with any frequencies since ``angle = pos * inv_freq``, so this
    equals un-rotating then rotating; exact in float64)."""
    return apply_rope(x, np.asarray(new_positions) - np.asarray(old_positions), base, scaling)


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
