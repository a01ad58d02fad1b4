"""StreamingLLM: keep the first tokens (attention sinks) and a window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024.
Official code ``mit-han-lab/streaming-llm@2e5042606d69933d88fbf909bd77907456b9b4dd``:
``streaming_llm/kv_cache.py`` (``StartRecentKVCache``) and ``streaming_llm/pos_shift/``.

Cache of ``n`` tokens (cache order = position order), ``S = start_size``, ``R = recent_size``:

* ``__call__`` (after appending): if ``n > S + R`` keep entries ``[0, S)`` and ``[n-R, n)``;
* ``evict_for_space(m)`` (before ``m`` tokens come): if ``n + m > S + R`` keep ``[0, S)`` and
  ``[n - R + m, n)`` -- empty when ``m >= R``, so the cache then exceeds ``S + R`` (official);
* ``evict_range(a, b)``: drop entries ``[a, b)``.

Positions (``pos_shift=True``, the official ``pos_shift`` attention): keys are cached without
RoPE and rotated at every step to their *cache index* ``0 .. n-1``; the query gets the cache
index of the incoming token. On post-RoPE inputs the reference rotates by the difference,
``R(new - old)`` (exact) with the model's RoPE: ``rope_base`` and HF ``rope_scaling``
(e.g. Llama-3.1's ``"llama3"``; :func:`refattn.kvcache._common.rope_inv_freq`). kvpress's ``StreamingLLMPress`` keeps the same set without
re-encoding (``pos_shift=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError
from ..core.keepset import KeepSet
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..methods.base import check_choice, check_range, register_method
from ._common import (
    check_rope_scaling,
    freeze_rope_scaling,
    keepset_selection,
    repeat_kv,
    rerotate,
)


@dataclass(frozen=True)
class StreamingLLMParams:
    """Defaults of the official example script (``start_size=4``, ``recent_size=2000``).
    ``rope_base`` / ``rope_scaling`` (HF ``config.rope_scaling``, ``None`` = plain RoPE)
    are the model's RoPE, used by the ``pos_shift`` re-encoding; a ``rope_scaling`` dict is
    stored as its sorted ``(key, value)`` pairs (the dataclass is frozen)."""

    start_size: int = 4
    recent_size: int = 2000
    pos_shift: bool = True
    rope_base: float = 10000.0
    rope_scaling: dict | tuple | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_scaling", freeze_rope_scaling(self.rope_scaling))

    def validate(self) -> None:
        check_range("start_size", self.start_size, 0, integer=True)
        check_range("recent_size", self.recent_size, 0, integer=True)
        check_choice("pos_shift", self.pos_shift, (True, False))
        check_range("rope_base", self.rope_base, 0.0, lo_open=True)
        check_rope_scaling(self.rope_scaling)


class StartRecentCache:
    """``StartRecentKVCache`` on token positions (one cache shared by every head)."""

    def __init__(self, start_size: int, recent_size: int) -> None:
        self.start_size, self.recent_size = int(start_size), int(recent_size)
        self.cache_size = self.start_size + self.recent_size
        self.positions = np.zeros(0, dtype=np.int64)

    def append(self, positions: np.ndarray) -> None:
        self.positions = np.concatenate(
            [self.positions, np.asarray(positions, np.int64).reshape(-1)]
        )

    def __call__(self) -> None:
        """Evict after appending: keep ``[0, S)`` and the last ``R`` entries."""
        n = self.positions.size
        if n <= self.cache_size:
            return
        self.positions = np.concatenate(
            [self.positions[: self.start_size], self.positions[n - self.recent_size :]]
        )

    def evict_for_space(self, num_coming: int) -> None:
        """Make room for ``num_coming`` tokens: keep ``[0, S)`` and ``[n - R + m, n)``."""
        n = self.positions.size
        if n + num_coming <= self.cache_size:
            return
        # the second range is empty when num_coming >= recent_size (official behaviour)
        self.positions = np.concatenate(
            [
                self.positions[: self.start_size],
                self.positions[n - self.recent_size + num_coming : n],
            ]
        )

    def evict_range(self, start: int, end: int) -> None:
        """Drop cache entries ``[start, end)`` (``start <= end <= n`` as the official asserts)."""
        n = self.positions.size
        if not 0 <= start <= end <= n:
            raise InputError(
                f"evict_range: expected 0 <= start <= end <= {n}, got ({start}, {end})"
            )
        self.positions = np.concatenate([self.positions[:start], self.positions[end:]])


def streamingllm_score(k_len: int, start_size: int, recent_size: int) -> np.ndarray:
    """Keep indicator float64 ``[k_len]``: 1 on ``[0, S)`` and the last ``R`` tokens, else 0
    (kvpress's ``StreamingLLMPress`` score); all ones when ``k_len <= S + R``."""
    s = np.zeros(k_len)
    if k_len <= start_size + recent_size:
        s[:] = 1.0
    else:
        s[:start_size] = 1.0
        s[k_len - recent_size :] = 1.0
    return s


define_op("streamingllm_score", streamingllm_score, outputs=("scores",), kind="exact",
          host_only="a 0/1 pattern of the cache geometry (k_len, start, recent): no input arrays")


def shifted_qk(
    q: np.ndarray,
    q_positions: np.ndarray,
    k: np.ndarray,
    kept: np.ndarray,
    base: float = 10000.0,
    scaling: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Position re-encoding of ``pos_shift``. q ``[B, Hq, Sq, D]`` post-RoPE at original
    ``q_positions [Sq]``; k ``[B, Hkv, Sk, D]`` post-RoPE at positions ``0..Sk-1``;
    ``kept [n]`` ascending cache positions (the queries' own tokens included). Returns
    ``q'`` rotated to the cache index of each query's token and the gathered keys
    ``k' [B, Hkv, n, D]`` rotated to cache indices ``0..n-1``. ``base``/``scaling``: the
    model's RoPE (HF ``rope_scaling``)."""
    kept = np.asarray(kept, np.int64)
    idx = np.searchsorted(kept, q_positions)
    if (idx >= kept.size).any() or (kept[np.minimum(idx, kept.size - 1)] != q_positions).any():
        raise InputError("q_positions: each query's own token must be in the kept cache")
    k2 = rerotate(k[:, :, kept], kept, np.arange(kept.size), base, scaling)
    q2 = rerotate(q, np.asarray(q_positions), idx, base, scaling)
    return q2, k2


def shifted_attention(
    q: np.ndarray,
    q_positions: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    kept: np.ndarray,
    base: float = 10000.0,
    scale: float | None = None,
    scaling: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Causal attention of ``q`` over the kept cache with re-encoded positions: returns
    ``out float64 [B, Hq, Sq, Dv]`` and ``probs [B, Hq, Sq, n]`` (columns = ``kept``)."""
    q2, k2 = shifted_qk(q, q_positions, k, kept, base, scaling)
    scale = (1.0 / np.sqrt(q.shape[-1])) if scale is None else scale
    kk = repeat_kv(k2, q.shape[1])
    vv = repeat_kv(v[:, :, np.asarray(kept)].astype(np.float64), q.shape[1])
    s = np.einsum("bhqd,bhkd->bhqk", q2, kk) * scale
    vis = np.asarray(kept)[None, :] <= np.asarray(q_positions)[:, None]
    s = np.where(vis, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, vv), p


@register_method(
    "streamingllm",
    StreamingLLMParams,
    kind="kv-cache",
    summary="attention sinks + recent window (optional position re-encoding)",
    paper="Xiao et al., ICLR 2024 (arXiv 2309.17453)",
    code="mit-han-lab/streaming-llm@2e5042606d69933d88fbf909bd77907456b9b4dd",
)
def select(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
    params: StreamingLLMParams,
    *,
    causal: bool = True,
    backend: str = "numpy",
) -> Selection:
    """The cache kept after the prompt (``__call__`` once), one set shared by every kv head.
    With ``pos_shift`` the re-encoded kept keys are in ``extras["shifted_k"]`` (the masked
    attention of ``refattn.attention`` itself keeps the original positions)."""
    B, _, L, _ = k.shape
    s = dispatch("streamingllm_score", backend)(L, params.start_size, params.recent_size)
    cache = StartRecentCache(params.start_size, params.recent_size)
    cache.append(np.arange(L))
    cache()
    Hkv = k.shape[1]
    keep = KeepSet(
        np.broadcast_to(cache.positions, (B, Hkv, cache.positions.size)),
        q_len=q.shape[2],
        k_len=L,
        head_kind="kv",
    )
    extras = {}
    if params.pos_shift:
        extras["shifted_k"] = rerotate(
            k[:, :, cache.positions],
            cache.positions,
            np.arange(cache.positions.size),
            params.rope_base,
            params.rope_scaling,
        )
    return keepset_selection(
        keep, q.shape[1], scores=np.broadcast_to(s, (B, Hkv, L)), extras=extras
    )
