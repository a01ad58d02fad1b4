"""ProxyAttn: block importance from pooled representative ("proxy") heads, per-head budgets.

Paper: Wang, He, Bao, Wu, Wang, Zhu, Che, "ProxyAttn: Guided Sparse Attention via
Representative Heads", arXiv 2509.24745 (ICLR 2026). Official code: wyxstriker/ProxyAttn.

**The official code was not read** (no copy of the repository was reachable when this module
was written) and the paper's method section was only available through the abstract and
secondary summaries. This module implements the rule those sources state, with every
unstated detail chosen explicitly and listed in ``docs/methods/proxyattn.md``; it is a
paper-level reference, not a reproduce-the-official-code reference.

Known from the paper: heads attend to largely the same tokens and differ mainly in how
sparse they are. So (i) the head axis, not the sequence axis, is compressed: query heads
are partitioned into groups, each represented by a pooled proxy head whose *token-level*
attention scores are aggregated into block scores shared by the whole group; (ii) each head
gets its own block budget from a cheap block-level estimate ("block-aware dynamic budget")
and keeps its top-budget blocks ranked by the shared proxy scores.

Rule here, per batch element, block size ``b``, scale ``1/sqrt(D)``, causal bottom-right:

1. Proxy head of group ``c`` (``group_size`` consecutive query heads): ``q~ = mean_h q_h``,
   ``k~`` = mean of the distinct kv heads the group reads (one kv head when the group lies
   inside a GQA group).
2. Proxy token attention ``A[r, t] = softmax_t(q~_r . k~_t * scale)`` (causal), for sampled
   rows ``r`` of query block ``I``: its last row and every ``stride``-th row before it.
3. Proxy block score ``S_c[I, J] = mean_{r in rows(I)} sum_{t in J} A[r, t]`` (rows sum to 1).
4. Budget of head ``h`` in row ``I``: pooled block attention
   ``a_h[I, :] = softmax_J(mean_{I} q_h . mean_{J} k_h * scale)`` over causally legal blocks
   (true-length means); ``budget = #`` of top blocks whose cumulative ``a_h`` first reaches
   ``gamma`` (crossing included), clamped to ``[min_budget, max_budget]``.
5. Selection: the ``budget_h[I]`` best legal blocks of ``S_{c(h)}[I, :]`` (ties: ``tie``),
   then the sink block ``J = 0`` and the diagonal block are OR'ed in (``force_sink``,
   ``force_recent``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask, legal_blocks, num_blocks
from ..core.errors import InputError
from ..core.layout import array_module, causal_offset
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..reference.selection import force_local, force_sink
from ..reference.selection_backend import topk_per_row
from .base import check_choice, check_range, register_method

CODE = "wyxstriker/ProxyAttn@unread"


@dataclass(frozen=True)
class ProxyAttnParams:
    """ProxyAttn parameters (paper-level; the official names and defaults are unverified).

    * ``block_size``: query and key block, tokens.
    * ``group_size``: query heads pooled into one proxy head; ``None`` = the GQA group
      (``Hq // Hkv``). Must divide the GQA group or be a multiple of it.
    * ``stride``: sampling stride of the proxy query rows inside each block (1 = all rows).
    * ``gamma``: cumulative block mass that sets each head's budget.
    * ``min_budget`` / ``max_budget``: clamp of the budget in blocks (``None`` = no cap).
    * ``force_sink`` / ``force_recent``: always keep block 0 / the diagonal block.
    * ``tie``: ``"low"`` (lower block index first at equal scores) or ``"high"``.
    """

    block_size: int = 128
    group_size: Any = None
    stride: int = 1
    gamma: float = 0.95
    min_budget: int = 1
    max_budget: Any = None
    force_sink: bool = True
    force_recent: bool = True
    tie: str = "low"

    def validate(self) -> None:
        check_range("block_size", self.block_size, 1, integer=True)
        if self.group_size is not None:
            check_range("group_size", self.group_size, 1, integer=True)
        check_range("stride", self.stride, 1, integer=True)
        check_range("gamma", self.gamma, 0.0, 1.0)
        check_range("min_budget", self.min_budget, 0, integer=True)
        if self.max_budget is not None:
            check_range("max_budget", self.max_budget, self.min_budget, integer=True)
        check_choice("force_sink", self.force_sink, (True, False))
        check_choice("force_recent", self.force_recent, (True, False))
        check_choice("tie", self.tie, ("low", "high"))


# ------------------------------------------------------------------ scoring ops
def _sampled_rows(start: int, stop: int, stride: int) -> np.ndarray:
    """Rows ``stop-1, stop-1-stride, ...`` down to ``start`` (ascending)."""
    return np.arange(stop - 1, start - 1, -stride)[::-1]


def proxyattn_proxy_scores(q: np.ndarray, k: np.ndarray, block_size: int, group_size: int,
                           stride: int, causal: bool,
                           *, out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Proxy block scores ``S [B, C, Qb, Kb]`` (float64), ``C = Hq / group_size``.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``. ``S[c, I, J]`` = mean over the sampled rows
    of block ``I`` of the proxy head's causal token attention mass on key block ``J``.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    C = Hq // group_size
    qb, kb = num_blocks(Sq, block_size), num_blocks(Sk, block_size)
    S = np.empty((B, C, qb, kb), np.float64) if out is None else out[0]
    scale = 1.0 / np.sqrt(D)
    off = causal_offset(Sq, Sk)
    kpad = kb * block_size - Sk
    for b in range(B):
        for c in range(C):
            h0, h1 = c * group_size, (c + 1) * group_size
            kvs = np.unique(np.arange(h0, h1) // G)
            qt = q[b, h0:h1].astype(np.float64).mean(axis=0)                    # [Sq, D]
            kt = k[b, kvs].astype(np.float64).mean(axis=0)                      # [Sk, D]
            for I in range(qb):
                rows = _sampled_rows(I * block_size, min(Sq, (I + 1) * block_size), stride)
                z = (qt[rows] @ kt.T) * scale                                   # [R, Sk]
                if causal:
                    z = np.where(np.arange(Sk)[None, :] <= rows[:, None] + off, z, -np.inf)
                mx = z.max(axis=-1, keepdims=True)
                seen = np.isfinite(mx)                                          # row sees a key
                a = np.exp(z - np.where(seen, mx, 0.0))
                a = np.where(seen, a / np.where(seen, a.sum(-1, keepdims=True), 1.0), 0.0)
                a = np.pad(a, ((0, 0), (0, kpad))).reshape(len(rows), kb, block_size)
                S[b, c, I] = a.sum(axis=-1).mean(axis=0)
    return (S,)


def proxyattn_budget_scores(q: np.ndarray, k: np.ndarray, block_size: int, causal: bool,
                            *, out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Per-head pooled block attention ``a [B, Hq, Qb, Kb]`` (float64) for the budgets.

    ``a[h, I, :] = softmax_J(mean_{i in I} q_i . mean_{j in J} k_j / sqrt(D))`` over the
    causally legal blocks (true-length means; illegal blocks 0; a row without a legal
    block is all 0).
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    qb, kb = num_blocks(Sq, block_size), num_blocks(Sk, block_size)

    def means(x: np.ndarray, n: int, length: int) -> np.ndarray:
        x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (0, n * block_size - length), (0, 0)))
        cnt = np.minimum(block_size, length - np.arange(n) * block_size)[:, None]
        return x.reshape(x.shape[0], x.shape[1], n, block_size, D).sum(axis=3) / cnt

    qm = means(q, qb, Sq)                                                        # [B,Hq,Qb,D]
    km = np.repeat(means(k, kb, Sk), Hq // Hkv, axis=1)                          # [B,Hq,Kb,D]
    z = (qm @ np.swapaxes(km, -1, -2)) / np.sqrt(D)
    legal = legal_blocks(Sq, Sk, block_size, block_size, causal)
    z = np.where(legal, z, -np.inf)
    mx = z.max(axis=-1, keepdims=True)
    seen = np.isfinite(mx)
    a = np.exp(z - np.where(seen, mx, 0.0))
    a = np.where(seen, a / np.where(seen, a.sum(-1, keepdims=True), 1.0), 0.0)
    if out is not None:
        out[0][...] = a
        a = out[0]
    return (a,)


PROXY_OP = define_op("proxyattn_score", proxyattn_proxy_scores, outputs=("proxy_scores",),
                     kind="array")
BUDGET_OP = define_op("proxyattn_budget_score", proxyattn_budget_scores,
                      outputs=("budget_scores",), kind="array")


def budgets_from_mass(a: Any, gamma: float, valid: np.ndarray, min_budget: int,
                      max_budget: int | None) -> Any:
    """int64 ``[...]``: blocks needed for the descending cumulative mass of ``a`` to reach
    ``gamma`` (crossing included; all valid blocks if never reached), clamped to
    ``[min_budget, max_budget]`` and to the number of valid blocks.

    ``a`` may be a device array (the result is then one too); ``valid`` is host geometry.
    Only the sorted values matter (not which of two equal blocks comes first), so one
    descending sort of the valid masses replaces the ranking.
    """
    xp = array_module(a)
    ok = xp.broadcast_to(xp.asarray(valid), a.shape)
    n_valid = ok.sum(axis=-1)
    # valid masses descending, then the invalid slots as 0.0 (they come last)
    srt = -xp.sort(-xp.where(ok, a, -np.inf), axis=-1)
    slot = xp.arange(a.shape[-1])
    live = slot < n_valid[..., None]
    srt = xp.where(live, srt, 0.0)
    before = xp.cumsum(srt, axis=-1) - srt                    # mass strictly before each slot
    need = ((before < gamma) & live).sum(axis=-1)
    if gamma <= 0:
        need = xp.zeros_like(need)
    need = xp.maximum(need, min_budget)
    if max_budget is not None:
        need = xp.minimum(need, max_budget)
    return xp.minimum(need, n_valid).astype(np.int64)


def _group_size(params: ProxyAttnParams, hq: int, hkv: int) -> int:
    G = hq // hkv
    g = G if params.group_size is None else int(params.group_size)
    if hq % g or (G % g and g % G):
        raise InputError(f"group_size: expected a divisor of the GQA group ({G}) or a multiple "
                         f"of it dividing Hq={hq}, got {params.group_size}")
    return g


# ------------------------------------------------------------------ method
@register_method(
    "proxyattn", ProxyAttnParams, kind="llm-prefill",
    summary="ProxyAttn (paper-level; official code not read): token-level attention of "
            "pooled proxy heads ranks blocks for their group; per-head gamma budgets",
    paper="arXiv 2509.24745", code=CODE, device=True)
def select(q: np.ndarray, k: np.ndarray, v: Any, params: ProxyAttnParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """ProxyAttn selection. q ``[B,Hq,Sq,D]``, k ``[B,Hkv,Sk,D]`` (bhsd, any float dtype).

    Returns a :class:`Selection` with ``mask [B,Hq,Qb,Kb]``, ``scores`` = each head's proxy
    block scores (illegal blocks ``-inf``), ``boundary`` = the score of the last block kept
    by the budget (NaN where none), ``forced`` (sink and diagonal), and extras ``budgets
    int64 [B,Hq,Qb]``, ``budget_scores`` (per-head pooled block attention), ``group_size``.
    """
    p = params
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    bs = int(p.block_size)
    g = _group_size(p, Hq, Hkv)
    (S,) = dispatch(PROXY_OP.name, backend)(q, k, bs, g, int(p.stride), bool(causal))
    (a,) = dispatch(BUDGET_OP.name, backend)(q, k, bs, bool(causal))
    legal = legal_blocks(Sq, Sk, bs, bs, causal)                                  # host
    xp = array_module(S)        # device scores (backend "cupy") keep everything there
    legal_x = xp.asarray(legal)
    budgets = budgets_from_mass(a, float(p.gamma), legal, int(p.min_budget),
                                None if p.max_budget is None else int(p.max_budget))
    scores = xp.repeat(S, g, axis=1)                                             # per q head
    scores = xp.where(legal_x, scores, -np.inf)
    chosen, boundary = topk_per_row(scores, budgets, valid=legal_x, tie=p.tie, backend=backend)
    forced = np.zeros(legal.shape, bool)                  # geometry only: built on the host
    if p.force_sink:
        forced = force_sink(forced, 1)
    if p.force_recent:
        forced = force_local(forced, Sq, Sk, bs, bs, 1)
    forced = xp.broadcast_to(xp.asarray(forced & legal), chosen.shape).copy()
    mask = chosen | forced
    geom = dict(block_q=bs, block_k=bs, q_len=Sq, k_len=Sk)
    return Selection(
        mask=BlockMask(mask, **geom),
        scores=BlockScores(scores, **geom),
        boundary=boundary,
        forced=forced,
        extras={"budgets": budgets, "budget_scores": a, "group_size": g},
    )
