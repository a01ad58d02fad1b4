"""Generic selection primitives shared by every method (NumPy reference).

All rules are deterministic: rank by score descending; ties go to the lower block index
(``tie="low"``, the library default) or the higher one (``tie="high"``, FlashMoBA).
Entries that are not candidates (``valid=False``: future blocks, padding, forced blocks
handled apart) are never ranked. Every rule returns ``(mask, boundary)``: the boolean
selection and the score at its boundary (the k-th selected score, or the score of the block
at which the threshold was crossed; ``nan`` where nothing was selected by score).

Shapes: scores ``[..., N]`` where ``N`` is the candidate axis (key blocks); rules per row
act on the last axis, global rules on the last two (``[..., Qb, Kb]`` per head).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.blockmask import legal_blocks
from ..core.errors import InputError

TIES = ("low", "high")


def _check_tie(tie: str) -> None:
    if tie not in TIES:
        raise InputError(f"tie: expected 'low' or 'high', got {tie!r}")


def rank_order(scores: np.ndarray, valid: np.ndarray | None = None, tie: str = "low") -> np.ndarray:
    """Indices that sort the last axis by score descending, ties by index (``tie``), invalid
    entries (and NaN scores) last. int64 ``[..., N]``."""
    _check_tie(tie)
    s = np.asarray(scores, dtype=np.float64)
    ok = ~np.isnan(s) if valid is None else (np.asarray(valid, bool) & ~np.isnan(s))
    n = s.shape[-1]
    idx = np.broadcast_to(np.arange(n), s.shape)
    key_idx = idx if tie == "low" else (n - 1 - idx)
    # lexsort: last key is primary. Primary: invalid last; then score descending; then index.
    neg = np.where(ok, -s, 0.0)
    order = np.lexsort((key_idx, neg, ~ok), axis=-1)
    return order


def topk_per_row(scores: np.ndarray, k: Any, *, valid: np.ndarray | None = None,
                 tie: str = "low") -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` best valid entries of every row (fewer if fewer are valid).

    ``k``: an int, or an int array broadcastable to ``scores.shape[:-1]`` (per-head or
    per-row budgets). Returns ``mask`` bool like ``scores`` and ``boundary [...]``.
    """
    s = np.asarray(scores, dtype=np.float64)
    kk = np.broadcast_to(np.asarray(k), s.shape[:-1])
    if kk.dtype.kind not in "iu" and not np.all(np.equal(np.mod(kk, 1), 0)):
        raise InputError(f"topk: k must be an integer, got {k!r}")
    if (kk < 0).any():
        raise InputError(f"topk: k must be >= 0, got {k!r}")
    ok = ~np.isnan(s) if valid is None else (np.asarray(valid, bool) & ~np.isnan(s))
    order = rank_order(s, ok, tie)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(s.shape[-1]), s.shape), axis=-1)
    mask = (rank < kk[..., None].astype(np.int64)) & ok
    return mask, _min_selected(s, mask)


def _min_selected(s: np.ndarray, mask: np.ndarray, axis: Any = -1) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        b = np.where(mask, s, np.inf).min(axis=axis)
    return np.where(mask.any(axis=axis), b, np.nan)


def topk_global(scores: np.ndarray, k: Any, *, valid: np.ndarray | None = None,
                tie: str = "low") -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` best valid entries over the last two axes (one budget per head).

    Ties go by flat index ``row * Kb + col`` (``tie`` as above). Returns ``mask`` like
    ``scores`` and ``boundary [...]`` (per head).
    """
    s = np.asarray(scores, dtype=np.float64)
    flat = s.reshape(s.shape[:-2] + (-1,))
    v = None if valid is None else np.broadcast_to(valid, s.shape).reshape(flat.shape)
    m, b = topk_per_row(flat, k, valid=v, tie=tie)
    return m.reshape(s.shape), b


def cumulative_threshold(scores: np.ndarray, tau: Any, *, valid: np.ndarray | None = None,
                         normalize: bool = True, tie: str = "low",
                         include_crossing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per row, keep the smallest prefix of the descending ranking whose mass reaches ``tau``.

    mass = cumulative sum of the (non-negative) scores, divided by the row's valid total when
    ``normalize``. With ``include_crossing`` the block at which ``cum >= tau`` first holds is
    kept (most methods); otherwise only the blocks strictly before it. ``tau``: scalar or an
    array broadcastable to the rows (e.g. ``[H, 1]`` per head). A row that never reaches
    ``tau`` keeps all its valid blocks; a row of total mass 0 keeps nothing when
    ``normalize``; ``tau <= 0`` keeps nothing. Methods whose official code differs
    (no block when never reached, forced mass counted first, ...) say so and build on
    :func:`rank_order`.
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.broadcast_to(np.asarray(tau, dtype=np.float64), s.shape[:-1])[..., None]
    ok = ~np.isnan(s) if valid is None else (np.asarray(valid, bool) & ~np.isnan(s))
    if (np.where(ok, s, 0.0) < 0).any():
        raise InputError("cumulative_threshold: scores must be non-negative masses")
    order = rank_order(s, ok, tie)
    srt = np.take_along_axis(np.where(ok, s, 0.0), order, axis=-1)
    sok = np.take_along_axis(ok, order, axis=-1)
    cum = np.cumsum(srt, axis=-1)
    has_mass = np.ones(cum.shape[:-1] + (1,), bool)
    if normalize:
        tot = cum[..., -1:]
        has_mass = tot > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            cum = np.where(has_mass, cum / np.where(has_mass, tot, 1.0), 0.0)
    # blocks strictly before the crossing: cum_before < tau
    before = np.concatenate([np.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
    keep_sorted = (before < t) if include_crossing else (cum < t)
    keep_sorted &= sok & (t > 0) & has_mass
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    return mask, _min_selected(s, mask)


def fixed_threshold(scores: np.ndarray, threshold: Any, *, valid: np.ndarray | None = None,
                    inclusive: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Keep entries with ``score >= threshold`` (``>`` when not ``inclusive``).

    ``threshold`` broadcasts against ``scores`` (scalar, per head ``[H,1,1]``, per row
    ``[...,1]``). The boundary is the threshold itself, per row.
    """
    s = np.asarray(scores, dtype=np.float64)
    thr = np.asarray(threshold, dtype=np.float64)
    mask = (s >= thr) if inclusive else (s > thr)
    if valid is not None:
        mask &= np.asarray(valid, bool)
    b = np.broadcast_to(thr, s.shape)[..., 0] if thr.ndim else np.full(s.shape[:-1], float(thr))
    return mask, np.array(b, dtype=np.float64)


def diagonal_blocks(q_len: int, k_len: int, block_q: int, block_k: int) -> np.ndarray:
    """For each query block, the key block holding the last key its last query may see
    (bottom-right causal alignment): int64 ``[Qb]``; ``-1`` where that query sees no key.
    In square prefill this is ``J = I``."""
    qb = -(-q_len // block_q)
    last_q = np.minimum((np.arange(qb) + 1) * block_q, q_len) - 1
    last_k = np.minimum(last_q + (k_len - q_len), k_len - 1)
    return np.where(last_k >= 0, last_k // block_k, -1)


def force_sink(mask: np.ndarray, num_blocks: int = 1) -> np.ndarray:
    """Set the first ``num_blocks`` key blocks of every row (``[..., Qb, Kb]``)."""
    m = np.array(mask, dtype=bool, copy=True)
    m[..., :num_blocks] = True
    return m


def force_local(mask: np.ndarray, q_len: int, k_len: int, block_q: int, block_k: int,
                width: int = 1) -> np.ndarray:
    """Set the diagonal key block and the ``width - 1`` blocks before it in every row."""
    m = np.array(mask, dtype=bool, copy=True)
    diag = diagonal_blocks(q_len, k_len, block_q, block_k)
    kb = m.shape[-1]
    for I, J in enumerate(diag):
        if J >= 0:
            m[..., I, max(0, J - width + 1): min(kb, J + 1)] = True
    return m


def causal_exclude(mask: np.ndarray, q_len: int, k_len: int, block_q: int, block_k: int) -> np.ndarray:
    """Drop blocks that hold no causally visible (query, key) pair."""
    return np.asarray(mask, bool) & legal_blocks(q_len, k_len, block_q, block_k, True)


# ----------------------------------------------------------------- registry ops (2-D canonical)
# The primitives above broadcast over any leading axes; the ops below fix one canonical
# signature per rule so that kernels (``refattn/kernels/numba_selection_*.py``) can be
# registered against them. Each op only checks shapes and calls the primitive, so the
# specification stays the code above. Outputs: ``mask`` bool like ``scores`` and
# ``boundary`` float64 (one per row, or per head for the global rule; ``nan`` where nothing
# was selected by score).


def _rows_of(scores: Any, ndim: int, name: str) -> np.ndarray:
    s = np.asarray(scores)
    if s.dtype.kind not in "fiu" and str(s.dtype) != "bfloat16":
        raise InputError(f"{name}: scores must be a real array, got dtype {s.dtype}")
    if s.ndim != ndim:
        axes = "[R, N]" if ndim == 2 else "[H, Qb, Kb]"
        raise InputError(f"{name}: scores must be {ndim}-d {axes}, got shape {s.shape}")
    if s.shape[-1] == 0:
        raise InputError(f"{name}: scores has no candidates (last axis of length 0), shape {s.shape}")
    return np.asarray(s, dtype=np.float64)


def _valid_of(valid: Any, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    if valid is None:
        return None
    v = np.asarray(valid)
    if v.dtype != np.bool_:
        raise InputError(f"{name}: valid must be a bool array, got dtype {v.dtype}")
    try:
        return np.broadcast_to(v, shape)
    except ValueError:
        raise InputError(f"{name}: valid of shape {v.shape} does not broadcast to scores "
                         f"{shape}") from None


def _per_row(x: Any, n: int, name: str, what: str) -> np.ndarray:
    a = np.asarray(x)
    try:
        return np.broadcast_to(a, (n,))
    except ValueError:
        raise InputError(f"{name}: {what} must be a scalar or have shape ({n},), got shape "
                         f"{a.shape}") from None


def topk_rows(scores: Any, k: Any, valid: Any = None, tie: str = "low"
              ) -> tuple[np.ndarray, np.ndarray]:
    """Op ``selection_topk_rows``: :func:`topk_per_row` on rows.

    ``scores [R, N]`` (any real dtype; NaN is never selected), ``k``: int scalar or int
    ``[R]`` (``0`` keeps nothing, ``k > N`` keeps every valid entry), ``valid``: bool
    broadcastable to ``[R, N]`` or ``None``, ``tie``: ``"low"`` | ``"high"``.
    Returns ``mask`` bool ``[R, N]`` and ``boundary`` float64 ``[R]``.
    """
    s = _rows_of(scores, 2, "topk_rows")
    kk = _per_row(k, s.shape[0], "topk_rows", "k")
    return topk_per_row(s, kk, valid=_valid_of(valid, s.shape, "topk_rows"), tie=tie)


def topk_heads(scores: Any, k: Any, valid: Any = None, tie: str = "low"
               ) -> tuple[np.ndarray, np.ndarray]:
    """Op ``selection_topk_global``: :func:`topk_global` per head.

    ``scores [H, Qb, Kb]``, ``k``: int scalar or int ``[H]`` (one budget per head),
    ``valid``: bool broadcastable to ``[H, Qb, Kb]`` (e.g. the causal ``[Qb, Kb]``) or
    ``None``. Ties go by flat index ``row * Kb + col``. Returns ``mask`` bool
    ``[H, Qb, Kb]`` and ``boundary`` float64 ``[H]``.
    """
    s = _rows_of(scores, 3, "topk_heads")
    kk = _per_row(k, s.shape[0], "topk_heads", "k")
    return topk_global(s, kk, valid=_valid_of(valid, s.shape, "topk_heads"), tie=tie)


def cumulative_rows(scores: Any, tau: Any, valid: Any = None, normalize: bool = True,
                    tie: str = "low", include_crossing: bool = True
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Op ``selection_cumulative_threshold``: :func:`cumulative_threshold` on rows.

    ``scores [R, N]`` non-negative masses (NaN entries are never selected), ``tau``:
    scalar or ``[R]`` (per-head ``tau`` repeated over each head's rows). Returns ``mask``
    bool ``[R, N]`` and ``boundary`` float64 ``[R]``.
    """
    s = _rows_of(scores, 2, "cumulative_rows")
    t = _per_row(np.asarray(tau, dtype=np.float64), s.shape[0], "cumulative_rows", "tau")
    return cumulative_threshold(s, t, valid=_valid_of(valid, s.shape, "cumulative_rows"),
                                normalize=normalize, tie=tie, include_crossing=include_crossing)


def fixed_rows(scores: Any, threshold: Any, valid: Any = None, inclusive: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """Op ``selection_fixed_threshold``: :func:`fixed_threshold` on rows.

    ``scores [R, N]``, ``threshold``: scalar or ``[R]``. Returns ``mask`` bool ``[R, N]``
    and ``boundary`` float64 ``[R]`` (the threshold of each row).
    """
    s = _rows_of(scores, 2, "fixed_rows")
    t = _per_row(np.asarray(threshold, dtype=np.float64), s.shape[0], "fixed_rows", "threshold")
    return fixed_threshold(s, t[:, None], valid=_valid_of(valid, s.shape, "fixed_rows"),
                           inclusive=inclusive)


from ..core.registry import define_op  # noqa: E402  (registrations of the ops above)

TOPK_ROWS_OP = define_op("selection_topk_rows", topk_rows, outputs=("mask", "boundary"),
                         kind="exact")
TOPK_GLOBAL_OP = define_op("selection_topk_global", topk_heads, outputs=("mask", "boundary"),
                           kind="exact")
CUMULATIVE_OP = define_op("selection_cumulative_threshold", cumulative_rows,
                          outputs=("mask", "boundary"), kind="exact")
FIXED_OP = define_op("selection_fixed_threshold", fixed_rows, outputs=("mask", "boundary"),
                     kind="exact")
