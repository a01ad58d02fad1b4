"""PSA's importance -> pyramid-level rules (official ``utils/transfer_attn_to_mask.py``):
the level intervals per query block, the new-format rank mask, and the levels the official
new kernel actually walks. Split from :mod:`refattn.video.psa`, which re-exports them."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core.errors import InputError


def ratio_items(ratios: Any) -> list[tuple[int, float]]:
    """``[(level, end), ...]`` in the given order from triples or a ``{level: (start, end)}`` dict."""
    items = list(ratios.items()) if isinstance(ratios, dict) else list(ratios)
    out = []
    for it in items:
        lvl, rng = (it[0], it[1]) if isinstance(ratios, dict) else (it[0], it[1:])
        rng = tuple(rng) if isinstance(rng, (tuple, list)) else (rng,)
        end = float(rng[-1])
        if isinstance(lvl, bool) or int(lvl) != lvl or lvl < 0 or not (0.0 <= end <= 1.0):
            raise InputError(f"ratios: expected (level >= 0, start, end in [0, 1]) items, got {it!r}")
        out.append((int(lvl), end))
    if not out or len({lv for lv, _ in out}) != len(out):
        raise InputError(f"ratios: expected distinct levels, got {ratios!r}")
    return out


def _round(x: np.ndarray, dtype: str | None) -> np.ndarray:
    if dtype is None:
        return x
    if dtype == "bfloat16":
        import ml_dtypes
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    return np.asarray(x).astype(dtype).astype(np.float64)


def _aligned_end(start: np.ndarray, end: np.ndarray, a: int, nk: int) -> np.ndarray:
    """Round ``[start, end)`` up to a multiple of ``a`` (clamped at ``nk``, where it rounds down)."""
    length = np.maximum(end - start, 0)
    e = np.minimum(start + -(-length // a) * a, nk)
    return np.where(e == nk, start + (e - start) // a * a, e)


def level_intervals(P: np.ndarray, ratios: Any, mode: str, block_k: int, tile_n: int,
                    min_full_attn_ratio: float = 0.06, dtype: str | None = None
                    ) -> tuple[np.ndarray, list[int], np.ndarray, np.ndarray]:
    """Rank order and level intervals of ``transfer_attn_to_mask`` (spec 2(d)).

    Returns ``order`` int64 ``[..., nk]`` (block ids by ``P`` descending, ties to the lower
    id), the levels in processing order, and ``starts``/``ends`` int64 ``[..., n_levels]``:
    ranks ``[start, end)`` get that level (chained; an empty interval has ``end = start``).
    ``dtype`` emulates the official tensors' dtype (``P``, cumulative sum, energy ratio and
    threshold rounded to it; the CPU cumsum accumulates in float64 for float32 and in float32
    for bf16/fp16 and rounds every prefix).
    """
    P = _round(np.asarray(P, np.float64), dtype)
    nk = P.shape[-1]
    order = np.argsort(-P, axis=-1, kind="stable")
    items = ratio_items(ratios)
    align = {lv: 1 if lv == 0 else math.ceil(lv / (block_k // tile_n)) for lv, _ in items}
    lead = P.shape[:-1]
    if mode == "thresholdbound":
        items = sorted(items, key=lambda it: it[1])                          # stable, by end
        srt = np.take_along_axis(P, order, axis=-1)
        acc = np.cumsum(srt.astype(np.float32) if dtype in ("bfloat16", "float16") else srt, axis=-1)
        csum = _round(acc, dtype)
        energy = csum / csum[..., -1:]
        if dtype in ("bfloat16", "float16"):
            energy = _round(energy.astype(np.float32), dtype)
        elif dtype is not None:
            energy = _round(energy, dtype)
    prev = np.zeros(lead, np.int64)
    starts, ends = [], []
    for lv, end_ratio in items:
        a = align[lv]
        if mode == "topk":
            e0 = np.full(lead, min(nk, int(nk * end_ratio)), np.int64)
            e = _aligned_end(prev, e0, a, nk) if a > 1 else e0
            e = np.where((a > 1) & (e0 - prev <= 0), e0, e)                  # no rounding of empty
        else:
            thr = _round(np.float64(end_ratio + 1e-6), dtype) if dtype else end_ratio + 1e-6
            cnt = (energy <= thr).sum(axis=-1)
            e0 = np.where(cnt > 0, cnt + 1, prev)                            # includes the crossing
            if a > 1:
                e = _aligned_end(prev, e0, a, nk)
            else:
                e = np.maximum(np.minimum(e0, nk), prev)
                if lv == 1:
                    e = np.maximum(e, min(nk, int(nk * min_full_attn_ratio) + 1))
        e = np.maximum(e, prev)                                              # empty: prev kept
        starts.append(prev)
        ends.append(e)
        prev = e
    return order, [lv for lv, _ in items], np.stack(starts, -1), np.stack(ends, -1)


def transfer_levels(P: np.ndarray, ratios: Any, mode: str = "topk", *, block_k: int = 64,
                    tile_n: int = 32, min_full_attn_ratio: float = 0.06, text_tokens: int = 0,
                    force_text: bool = True, dtype: str | None = None) -> np.ndarray:
    """Pyramid levels int32 ``[..., nq, nk]`` in ``{0, 1, 2, 4, 8}`` from importance ``P``
    (``transfer_attn_to_mask`` with ``mode`` ``topk``/``thresholdbound``). With
    ``force_text`` the last ``ceil(text_tokens / block_k)`` key blocks are set to 1."""
    order, levels, starts, ends = level_intervals(P, ratios, mode, block_k, tile_n,
                                                  min_full_attn_ratio, dtype)
    out = _levels_of_ranks(order, levels, starts, ends)
    if force_text and text_tokens > 0:
        n_text = -(-int(text_tokens) // int(block_k))                        # ceil
        out[..., out.shape[-1] - min(n_text, out.shape[-1]):] = 1
    return out


def _levels_of_ranks(order: np.ndarray, levels: list[int], starts: np.ndarray,
                     ends: np.ndarray) -> np.ndarray:
    """Level per key block, int32: ranks ``[starts[i], ends[i])`` of ``order`` get ``levels[i]``."""
    nk = order.shape[-1]
    rank_level = np.zeros(order.shape, np.int32)
    r = np.arange(nk)
    for i, lv in enumerate(levels):
        rank_level = np.where((r >= starts[..., i:i + 1]) & (r < ends[..., i:i + 1]), lv, rank_level)
    out = np.zeros(order.shape, np.int32)
    np.put_along_axis(out, order, rank_level, axis=-1)
    return out


def new_kernel_levels(P: np.ndarray, ratios: Any, mode: str = "topk", *, block_k: int = 64,
                      tile_n: int = 32, min_full_attn_ratio: float = 0.06,
                      dtype: str | None = None) -> np.ndarray:
    """Levels int32 ``[..., nq, nk]`` the official new kernel attends for the new-format mask
    of :func:`newtype_mask`: ``psa_kernel.py`` (lines 207-217) starts at ``MASK_MODE = 1``,
    doubles it at every ``-1`` and stops once it exceeds 8, so the ``i``-th group (ratio
    order; ``thresholdbound``: sorted by end) is attended at level ``2**i`` for ``i < 4`` and
    later groups are skipped, whatever level the ratio declares (the same as
    :func:`transfer_levels` for ratios in the order 1, 2, 4, 8, 0).

    Raises ``InputError`` where the kernel would read past the last group (at most 3 groups
    and ranks left unassigned: the zero-filled tail of the mask row would be attended as
    block 0, again and again, at level ``2**n_groups``).
    """
    order, levels, starts, ends = level_intervals(P, ratios, mode, block_k, tile_n,
                                                  min_full_attn_ratio, dtype)
    nk = order.shape[-1]
    if len(levels) <= 3 and (ends[..., -1] < nk).any():
        raise InputError(f"ratios: with {len(levels)} level group(s) and key blocks left "
                         f"unassigned, the official new kernel reads the unfilled tail of the "
                         f"new-format mask as block 0 at level {2 ** len(levels)}; end the ratios "
                         f"at 1.0 (e.g. a (0, start, 1.0) item) or use kernel='legacy'")
    walk = [2 ** i if i < 4 else 0 for i in range(len(levels))]
    return _levels_of_ranks(order, walk, starts, ends)


def newtype_mask(P: np.ndarray, ratios: Any, mode: str = "topk", *, block_k: int = 64,
                 tile_n: int = 32, min_full_attn_ratio: float = 0.06,
                 dtype: str | None = None) -> np.ndarray:
    """The official "new mask type" int32 ``[..., nq, nk + n_levels]``: per row the block ids
    of each level's interval in rank order, each group followed by ``-1`` (``*_newtype``
    modes; text blocks are not forced there)."""
    order, levels, starts, ends = level_intervals(P, ratios, mode, block_k, tile_n,
                                                  min_full_attn_ratio, dtype)
    nk, L = order.shape[-1], len(levels)
    out = np.zeros(order.shape[:-1] + (nk + L,), np.int32)
    for row in np.ndindex(order.shape[:-1]):
        for i in range(L):
            s0, e0 = int(starts[row + (i,)]), int(ends[row + (i,)])
            out[row + (slice(s0 + i, e0 + i),)] = order[row + (slice(s0, e0),)]
            out[row + (min(e0 + i, nk + L - 1),)] = -1
    return out
