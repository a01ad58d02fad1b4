"""FlexPrefill: per-head choice between a vertical-slash and a query-aware block pattern.

Idea (Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient
Long-Sequence Inference", ICLR 2025, arXiv 2502.20766, Sec. 3, Alg. 1-3): estimate each
head's attention from its last block of queries. When the block-pooled estimate
``softmax(mean(q_last) . mean_J(k))`` agrees with the true column distribution (small
Jensen-Shannon distance) the head is *query-aware*: select blocks of the pooled block map
until a fraction ``gamma`` of its mass is covered. Otherwise it is *vertical-slash*: keep
enough column blocks and diagonal blocks to cover ``gamma`` of the column / diagonal mass.

Official code: bytedance-seed/FlexPrefill@a4662d13cd4544402c795e2f917e2e8a7e80add7,
``flex_prefill/ops/flex_prefill_attention.py`` (``get_active_blocks``), read through the
fork kengchiawu/FlexPrefill, which keeps the upstream history unchanged; checked line by
line against this module. The same code is copied verbatim in
microsoft/MInference@fb56c917f618e8645f1cfc37535afd7424d78f0d
(``minference/modules/flexprefill.py``) and mit-han-lab/x-attention
``xattn/src/Flexprefill.py``.

Rule, per query head (kv head ``h // (Hq/Hkv)``), ``L = Sq = Sk``, ``b = block_size``,
``n = ceil(L/b)``, ``Qh = q[L-b:] / sqrt(D)``::

    P        = softmax(Qh K^T), causal inside the last b x b corner
    vert[t]  = mean_i P[i, t];   slash[o] = mean_i P[i, p_i - o]          (token level)
    cover(x) = #{sorted-desc cumsum(x) <= gamma} + 1
    n_v = clamp(cover(vert) // 128 + 1),  n_s = clamp(cover(slash) // 128 + 1)   (128 hard-coded)
    V_J = sum_{t in block J} vert[t];  S_s = slash summed over offset chunk s (see below)
    a   = softmax_J( mean_i(Qh_i) . mean_J(k) )      (true-length block means)
    d   = sqrt(JS(a, V))  (natural log);  query-aware iff d < tau  ->  n_v = n_s = min_budget
    V_0 = S_0 = +inf;  keep top-n_v column blocks c (rows r >= c) and top-n_s block offsets s
    ((r + s, r));  query-aware heads add the blocks of
    alpha = softmax_J(mean_I(q) . mean_J(k) / sqrt(D)) (block-causal) whose global
    descending cumulative sum is <= gamma * n.

Slash chunks: the official diagonal sum is indexed ``idx = L-1-o`` and pooled in chunks of
``b`` from ``idx = 0``; chunk ``k`` is used as block offset ``s = n-1-k``. So block offset
``s`` holds token offsets ``o in [L - (n-s) b, L - (n-1-s) b - 1]`` (clipped at 0): when
``b`` does not divide ``L`` the chunks are not aligned to the block diagonals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask
from ..core.errors import InputError
from ..core.layout import array_module
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..reference.memory import rows_per_chunk
from ..reference.selection import TIES
from ..reference.selection_backend import cumulative_threshold, topk_per_row
from .base import check_choice, check_range, register_method

BUDGET_UNIT = 128  # official: score_cover_topk(...) // 128 + 1, independent of block_size


@dataclass(frozen=True)
class FlexPrefillParams:
    """FlexPrefill parameters (official names in brackets).

    * ``gamma`` [gamma]: attention coverage, in (0, 1]; default 0.9 (MInference's default).
    * ``tau`` [tau]: JS-distance threshold for query-aware heads, in [0, 1]; default 0.1.
    * ``block_size`` [block_size]: default 128.
    * ``min_budget`` / ``max_budget`` [same]: budgets in tokens (``None``: 1 token /
      unlimited), turned into blocks by ``ceil(tokens / block_size)``.
    * ``tie``: ``"low"`` keeps the lower block index (lower offset) at exact ties.
    """

    gamma: float = 0.9
    tau: float = 0.1
    block_size: int = 128
    min_budget: Any = None
    max_budget: Any = None
    tie: str = "low"

    def validate(self) -> None:
        check_range("gamma", self.gamma, 0.0, 1.0, lo_open=True)
        check_range("tau", self.tau, 0.0, 1.0)
        check_range("block_size", self.block_size, 1, integer=True)
        for name in ("min_budget", "max_budget"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1, integer=True)
        check_choice("tie", self.tie, TIES)


def _block_mean(x: np.ndarray, block: int) -> np.ndarray:
    """True-length means of consecutive ``block``-row chunks: ``[S, D] -> [ceil(S/b), D]``."""
    n = -(-x.shape[0] // block)
    pad = np.zeros((n * block - x.shape[0],) + x.shape[1:])
    s = np.concatenate([x, pad]).reshape(n, block, *x.shape[1:]).sum(axis=1)
    counts = np.minimum(block, x.shape[0] - np.arange(n) * block)
    return s / counts[:, None]


def _softmax(s: np.ndarray) -> np.ndarray:
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    return e / e.sum(axis=-1, keepdims=True)


def flexprefill_score(q: np.ndarray, k: np.ndarray, block_size: int = 128,
                      scale: float | None = None, *,
                      out: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, ...]:
    """FlexPrefill's estimates (reference), square prefill ``Sq == Sk == L``.

    q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]``. Returns, float64:
    ``vertical [B,Hq,L]`` (mean over the last ``min(b, L)`` queries of their causal softmax),
    ``slash [B,Hq,L]`` (``slash[o]``: mean along the diagonal at offset ``o``),
    ``pooled_attn [B,Hq,n]`` (``softmax_J(mean_i(Qh_i) . mean_J(k))``) and
    ``block_attn [B,Hq,n,n]`` (block-causal ``softmax_J(mean_I(q) . mean_J(k) * scale)``,
    0 above the diagonal). ``scale`` defaults to ``1/sqrt(D)``.
    """
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    b = int(block_size)
    n = -(-L // b)
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    ell = min(b, L)
    rows_per_chunk(1, ell * L * 48 + n * n * 16, 8 * L * D, "flexprefill estimate")
    off = (np.arange(L - ell, L))[:, None] - np.arange(L)[None, :]   # offset of (row, key)
    vis = off >= 0
    tril = np.tril(np.ones((n, n), dtype=bool))
    if out is None:
        out = (np.empty((B, Hq, L)), np.empty((B, Hq, L)), np.empty((B, Hq, n)),
               np.empty((B, Hq, n, n)))
    vert, sl, pooled, blk = out
    for bb in range(B):
        for g in range(k.shape[1]):
            kk = k[bb, g].astype(np.float64)
            avg_k = _block_mean(kk, b)                                # [n, D]
            for h in range(g * G, (g + 1) * G):
                qq = q[bb, h].astype(np.float64)
                qh = qq[L - ell:] * scale                             # [l, D]
                P = _softmax(np.where(vis, qh @ kk.T, -np.inf))      # [l, L]
                vert[bb, h] = P.mean(axis=0)
                sl[bb, h] = np.bincount(off[vis], weights=P[vis], minlength=L) / ell
                pooled[bb, h] = _softmax(qh.mean(axis=0) @ avg_k.T)
                s = np.where(tril, (_block_mean(qq, b) * scale) @ avg_k.T, -np.inf)
                blk[bb, h] = _softmax(s)
    return vert, sl, pooled, blk


define_op("flexprefill_score", flexprefill_score,
          outputs=("vertical", "slash", "pooled_attn", "block_attn"), kind="array")


def cover_count(x: Any, gamma: float) -> Any:
    """Official ``score_cover_topk``: ``#{sorted-desc cumsum(x) <= gamma} + 1`` over the
    last axis (the entry that crosses ``gamma`` is counted). NumPy or CuPy ``x``."""
    xp = array_module(x)
    c = xp.cumsum(-xp.sort(-x, axis=-1), axis=-1)
    return (c <= gamma).sum(axis=-1) + 1


def js_distance(p: Any, r: Any) -> Any:
    """Square root of the Jensen-Shannon divergence (natural log) over the last axis, as the
    official ``js_divergence`` computes it: ``sqrt(0.5 KL(p||m) + 0.5 KL(r||m))``,
    ``m = (p + r) / 2``, with ``p log(p/m)`` taken literally. So a row with an entry that is
    zero *at float32* (the official computes these probabilities in fp32, where ``|x| <
    2**-150`` underflows; ``0 * log 0`` is NaN there) gives NaN, and so does a divergence
    that rounds below 0; ``NaN < tau`` is false, so such heads are vertical-slash
    (official ``flex_prefill_attention.py``, ``js_divergence`` and its caller). NumPy or
    CuPy arrays."""
    xp = array_module(p)
    m = (p + r) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kp = (p * xp.log(p / m)).sum(axis=-1)
        kr = (r * xp.log(r / m)).sum(axis=-1)
        d = xp.sqrt(0.5 * kp + 0.5 * kr)
    zero32 = ((p.astype(np.float32) == 0) | (r.astype(np.float32) == 0)).any(axis=-1)
    return xp.where(zero32, np.nan, d)


def _pool(x: Any, b: int) -> Any:
    """Sums of consecutive ``b``-chunks of the last axis from index 0, zero-padded."""
    xp = array_module(x)
    n = -(-x.shape[-1] // b)
    pad = xp.zeros(x.shape[:-1] + (n * b - x.shape[-1],))
    return xp.concatenate([x, pad], axis=-1).reshape(x.shape[:-1] + (n, b)).sum(axis=-1)


@register_method(
    "flexprefill", FlexPrefillParams, kind="llm-prefill",
    summary="FlexPrefill: JS-divergence choice per head between vertical-slash blocks "
            "(gamma-coverage budgets) and query-aware blocks (global cumulative gamma)",
    paper="Lai et al., FlexPrefill, ICLR 2025, arXiv:2502.20766",
    code="bytedance-seed/FlexPrefill@a4662d13cd4544402c795e2f917e2e8a7e80add7 "
         "(flex_prefill/ops/flex_prefill_attention.py; copied in microsoft/MInference)",
    device=True)
def select(q: np.ndarray, k: np.ndarray, v: Any, params: FlexPrefillParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """FlexPrefill selection on canonical arrays (q ``[B,Hq,L,D]``, k ``[B,Hkv,L,D]``).

    Returns a :class:`Selection` on the ``block_size`` grid: ``scores`` the block map
    ``alpha``, ``boundary [B,Hq]`` the smallest ``alpha`` a query-aware head selected by
    coverage (``nan`` for other heads), ``forced`` the first column block and the diagonal;
    ``extras``: ``pattern [B,Hq]`` (``"vertical_slash"``, ``"query_aware"`` or ``"dense"``
    when the official code falls back to dense attention), ``js [B,Hq]``,
    ``vertical_budget`` / ``slash_budget [B,Hq]`` (blocks), ``vertical_scores`` /
    ``slash_scores [B,Hq,n]`` (pooled, indexed by column block / block offset),
    ``vertical_blocks`` / ``slash_offsets`` (bool ``[B,Hq,n]``, selected),
    ``vertical_boundary`` / ``slash_boundary [B,Hq]``, ``pooled_attn [B,Hq,n]`` and
    ``query_aware`` (bool ``[B,Hq]``).

    Device inputs (backend ``"cupy"``) keep every array on the device; ``pattern`` (a
    string array) is then left out, ``query_aware`` says the same (``"dense"`` falls back
    on shapes alone and keeps its host ``pattern``).
    """
    if not causal:
        raise InputError("causal: flexprefill is defined for causal prefill only; got causal=False")
    B, Hq, L, _ = q.shape
    if k.shape[2] != L:
        raise InputError(f"k: flexprefill needs q_len == k_len (the official code asserts it), "
                         f"got {L} and {k.shape[2]}")
    b = int(params.block_size)
    n = -(-L // b)
    min_b = -(-int(params.min_budget or 1) // b)
    max_b = n if params.max_budget is None else min(-(-int(params.max_budget) // b), n)
    xp = array_module(q)        # device inputs (backend "cupy"): everything stays there
    tril = np.tril(np.ones((n, n), dtype=bool))                   # geometry, on the host
    rows = np.arange(n)

    def per_head(x: np.ndarray) -> Any:   # [n, n] geometry -> [B, Hq, n, n] in xp
        return xp.broadcast_to(xp.asarray(x), (B, Hq, n, n)).copy()

    forced = per_head(((rows[None, :] == 0) | np.eye(n, dtype=bool)) & tril)
    if L <= max(2 * b, min_b * b):  # official: too short, run dense causal attention
        return Selection(
            mask=BlockMask(per_head(tril), block_q=b, block_k=b, q_len=L, k_len=L),
            forced=forced, boundary=xp.full((B, Hq), np.nan),
            extras={"pattern": np.full((B, Hq), "dense"),
                    "query_aware": xp.zeros((B, Hq), bool),
                    "js": xp.full((B, Hq), np.nan)})

    vert, sl, pooled, alpha = dispatch("flexprefill_score", backend, (q, k))(q, k, b, None)
    vert, sl = vert.astype(np.float64, copy=False), sl.astype(np.float64, copy=False)
    pooled, alpha = pooled.astype(np.float64, copy=False), alpha.astype(np.float64, copy=False)
    g = float(params.gamma)

    # Budgets (in blocks) from token-level coverage; the //128 is hard-coded officially.
    def clamp(x: Any) -> Any:
        return xp.minimum(xp.maximum(x, min_b), max_b)

    n_v = clamp(cover_count(vert, g) // BUDGET_UNIT + 1)
    n_s = clamp(cover_count(sl, g) // BUDGET_UNIT + 1)
    V = _pool(vert, b)                              # column block J
    S = _pool(sl[..., ::-1], b)[..., ::-1]          # official chunk k -> block offset n-1-k
    js = js_distance(pooled, V)
    qa = js < float(params.tau)
    n_v = xp.where(qa, min(min_b, n), n_v)
    n_s = xp.where(qa, min(min_b, n), n_s)

    # Vertical-slash blocks (every head): forced first column block and diagonal.
    inf_first = xp.asarray(np.arange(n) == 0)
    vsel, vb = topk_per_row(xp.where(inf_first, np.inf, V), n_v, tie=params.tie, backend=backend)
    ssel, sb = topk_per_row(xp.where(inf_first, np.inf, S), n_s, tie=params.tie, backend=backend)
    diag_off = xp.asarray(np.clip(rows[:, None] - rows[None, :], 0, n - 1))  # offset r - c
    tril_x = xp.asarray(tril)
    mask = (vsel[..., None, :] | xp.take(ssel, diag_off, axis=-1)) & tril_x

    # Query-aware heads: global cumulative selection over the block map, blocks kept while
    # the descending cumulative sum is <= gamma * n. That is the cumulative-threshold
    # primitive without normalisation or the crossing block, at the next double above
    # gamma * n (cum < nextafter(t) iff cum <= t); its boundary is the smallest kept alpha.
    qsel, qb = cumulative_threshold(
        alpha.reshape(B, Hq, n * n), float(np.nextafter(g * n, np.inf)),
        valid=xp.asarray(tril.reshape(-1)), normalize=False, tie=params.tie,
        include_crossing=False, backend=backend)
    qsel = qsel.reshape(B, Hq, n, n) & qa[..., None, None]
    mask |= qsel
    bnd = xp.where(qa, qb, np.nan)

    def fin(x: Any) -> Any:
        return xp.where(xp.isfinite(x), x, np.nan)

    # "pattern" names each head's choice: host selections only (CuPy holds no strings;
    # a device selection carries the same information as the boolean "query_aware")
    extras = {"pattern": np.where(qa, "query_aware", "vertical_slash")} if xp is np else {}
    extras.update({
        "query_aware": qa, "js": js, "vertical_budget": n_v, "slash_budget": n_s,
        "vertical_scores": V, "slash_scores": S, "vertical_blocks": vsel,
        "slash_offsets": ssel, "vertical_boundary": fin(vb),
        "slash_boundary": fin(sb), "pooled_attn": pooled})
    return Selection(
        mask=BlockMask(mask, block_q=b, block_k=b, q_len=L, k_len=L),
        scores=BlockScores(alpha, block_q=b, block_k=b, q_len=L, k_len=L),
        boundary=bnd, forced=forced, extras=extras)
