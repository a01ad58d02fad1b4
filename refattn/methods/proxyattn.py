"""ProxyAttn: block importance from pooled representative ("proxy") heads, per-head budgets.

Paper: Wang, He, Bao, Wu, Wang, Zhu, Che, "ProxyAttn: Guided Sparse Attention via
Representative Heads", arXiv 2509.24745 (ICLR 2026), Sec. 3 (Eq. 1-3, Algorithm 1).
Official code: wyxstriker/ProxyAttn.

**The official code was not read** (no copy of the repository is reachable here). The rule
below follows the paper's equations and Algorithm 1 as reproduced by two detailed secondary
sources (listed in ``docs/methods/proxyattn.md``); every detail they leave open is an
explicit, documented choice. This is a paper-level reference.

Rule, per batch element, block size ``b``, ``scale = 1/sqrt(D)``, causal bottom-right
(query ``r`` sees key ``t`` iff ``t <= r + Sk - Sq``):

1. Proxy head of group ``c`` (``group_size`` consecutive query heads, a multiple of the GQA
   group: "the group granularity is aligned with the keys"), Eq. 2:
   ``q~ = mean_{h in c} q_h``, ``k~ = mean_{h in c} k_{kv(h)}``.
2. Strided proxy attention (Sec. 3.1 "stride"): only the first token of every
   ``stride``-token window is kept, on both axes: rows ``r = 0, s, 2s, ...`` and keys
   ``t = 0, s, 2s, ...``. ``P[r, t] = softmax_t(q~_r . k~_t * scale)`` over the kept keys
   the row may see.
3. Proxy block score, Eq. 1: ``S_c[I, J] = max_{r in I, t in J} P[r, t]`` (max-pooling of
   the strided map into blocks; 0 where the tile holds no visible kept pair).
4. Budget of head ``h``, Algorithm 1 (one per head, from the last query block ``L``):
   ``A^[r, t] = softmax_t(q_{h,r} . k_{kv(h),t} * scale)`` at token level for ``r in L``;
   ``a_h[J] = mean_{r in L, t in J} A^[r, t]`` (avg-pool, true block lengths);
   sorted descending and divided by its sum, ``n_h`` = the fewest top blocks whose
   cumulative share reaches ``gamma`` (the crossing block counts). The budget is
   ``n_h`` blocks (``b_h N`` with ``b_h = n_h / N``), at least ``min_budget`` (default
   2048 tokens), at most ``max_budget``.
5. Selection, Eq. 3: head ``h`` keeps, in every query block row, the ``budget_h`` best
   causally legal blocks of ``S_{c(h)}[I, :]`` (fewer if fewer are legal; ties ``tie``).
   ``force_sink`` / ``force_recent`` (off by default; not in the paper) OR in block 0 / the
   diagonal block.
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
PAPER_MIN_BUDGET_TOKENS = 2048   # "the minimum budget is fixed at 2048 tokens"


@dataclass(frozen=True)
class ProxyAttnParams:
    """ProxyAttn parameters (paper-level; the official names are unverified).

    * ``block_size``: query and key block, tokens.
    * ``group_size``: query heads pooled into one proxy head; ``None`` = the GQA group
      (``Hq // Hkv``, one proxy per kv head, the paper's Qwen setting); ``Hq`` = one proxy
      for all heads (the paper's Llama setting). Must be a multiple of the GQA group and
      divide ``Hq``.
    * ``stride``: keep the first token of every ``stride`` window of queries and keys in
      the proxy map (paper: fixed at 4).
    * ``gamma``: cumulative share of the last query block's pooled attention that sets each
      head's budget (paper: 0.95 or 0.90).
    * ``min_budget`` / ``max_budget``: clamp of the budget in blocks; ``min_budget=None`` is
      the paper's 2048 tokens, ``ceil(2048 / block_size)`` blocks; ``max_budget=None`` no cap.
    * ``force_sink`` / ``force_recent``: also keep block 0 / the diagonal block (not in the
      paper; off by default).
    * ``tie``: ``"low"`` (lower block index first at equal scores) or ``"high"``.
    """

    block_size: int = 128
    group_size: Any = None
    stride: int = 4
    gamma: float = 0.95
    min_budget: Any = None
    max_budget: Any = None
    force_sink: bool = False
    force_recent: bool = False
    tie: str = "low"

    def validate(self) -> None:
        check_range("block_size", self.block_size, 1, integer=True)
        if self.group_size is not None:
            check_range("group_size", self.group_size, 1, integer=True)
        check_range("stride", self.stride, 1, integer=True)
        check_range("gamma", self.gamma, 0.0, 1.0)
        if self.min_budget is not None:
            check_range("min_budget", self.min_budget, 0, integer=True)
        if self.max_budget is not None:
            check_range("max_budget", self.max_budget, self.resolved_min_budget(), integer=True)
        check_choice("force_sink", self.force_sink, (True, False))
        check_choice("force_recent", self.force_recent, (True, False))
        check_choice("tie", self.tie, ("low", "high"))

    def resolved_min_budget(self) -> int:
        """``min_budget`` in blocks (``None``: the paper's 2048 tokens)."""
        if self.min_budget is not None:
            return int(self.min_budget)
        return -(-PAPER_MIN_BUDGET_TOKENS // int(self.block_size))


# ------------------------------------------------------------------ scoring ops
def proxyattn_proxy_scores(q: np.ndarray, k: np.ndarray, block_size: int, group_size: int,
                           stride: int, causal: bool,
                           *, out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Proxy block scores ``S [B, C, Qb, Kb]`` (float64), ``C = Hq / group_size``.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``; ``group_size`` a multiple of ``Hq // Hkv``
    dividing ``Hq``. ``S[c, I, J] = max P[r, t]`` over kept rows ``r`` of block ``I`` and
    kept keys ``t`` of block ``J`` (``r, t`` multiples of ``stride``), where ``P`` is the
    proxy head's softmax over the kept keys each row sees (Eq. 1-2); 0 where the tile holds
    no visible kept pair.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if group_size < 1 or Hq % group_size or group_size % G:
        raise InputError(f"group_size: expected a multiple of the GQA group ({G}) dividing "
                         f"Hq={Hq}, got {group_size}")
    C = Hq // group_size
    qb, kb = num_blocks(Sq, block_size), num_blocks(Sk, block_size)
    S = np.empty((B, C, qb, kb), np.float64) if out is None else out[0]
    S[...] = 0.0
    if Sq == 0 or Sk == 0:
        return (S,)
    scale = 1.0 / np.sqrt(D)
    off = causal_offset(Sq, Sk)
    rows = np.arange(0, Sq, stride)                        # first token of each window
    keys = np.arange(0, Sk, stride)
    for b in range(B):
        for c in range(C):
            h0, h1 = c * group_size, (c + 1) * group_size
            qt = q[b, h0:h1][:, rows].astype(np.float64).mean(axis=0)          # [R, D]
            # mean over the group's heads of their kv head = mean over its distinct kv heads
            kt = k[b, h0 // G:h1 // G][:, keys].astype(np.float64).mean(axis=0) # [T, D]
            z = (qt @ kt.T) * scale                                             # [R, T]
            if causal:
                z = np.where(keys[None, :] <= rows[:, None] + off, z, -np.inf)
            mx = z.max(axis=-1, keepdims=True)
            seen = np.isfinite(mx)                                              # row sees a key
            p = np.exp(z - np.where(seen, mx, 0.0))
            p = np.where(seen, p / np.where(seen, p.sum(-1, keepdims=True), 1.0), 0.0)
            tile = np.zeros((qb, kb))                                           # max-pool
            np.maximum.at(tile, (rows[:, None] // block_size, keys[None, :] // block_size), p)
            S[b, c] = tile
    return (S,)


def proxyattn_budget_scores(q: np.ndarray, k: np.ndarray, block_size: int, causal: bool,
                            *, out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Per-head block attention of the last query block ``a [B, Hq, Kb]`` (float64), the
    input of Algorithm 1's budget.

    ``a[h, J] = sum_{r in L, t in J} softmax_t(q_{h,r} . k_{kv(h),t} / sqrt(D)) / (|L| |J|)``
    with ``L`` the rows of the last query block and true lengths ``|L|``, ``|J|``; causal
    masking as everywhere; a row that sees no key adds 0. ``Sq == 0`` gives all 0.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kb = num_blocks(Sk, block_size)
    a = np.zeros((B, Hq, kb)) if out is None else out[0]
    a[...] = 0.0
    if Sq == 0 or Sk == 0:
        return (a,)
    r0 = (num_blocks(Sq, block_size) - 1) * block_size
    rows = np.arange(r0, Sq)
    qL = q[:, :, r0:].astype(np.float64)                                        # [B,Hq,|L|,D]
    kk = np.repeat(k.astype(np.float64), Hq // Hkv, axis=1)                     # [B,Hq,Sk,D]
    z = (qL @ np.swapaxes(kk, -1, -2)) / np.sqrt(D)                             # [B,Hq,|L|,Sk]
    if causal:
        z = np.where(np.arange(Sk)[None, :] <= rows[:, None] + causal_offset(Sq, Sk), z, -np.inf)
    mx = z.max(axis=-1, keepdims=True)
    seen = np.isfinite(mx)
    p = np.exp(z - np.where(seen, mx, 0.0))
    p = np.where(seen, p / np.where(seen, p.sum(-1, keepdims=True), 1.0), 0.0)
    p = np.pad(p.sum(axis=-2), ((0, 0), (0, 0), (0, kb * block_size - Sk)))    # [B,Hq,kb*b]
    cnt = np.minimum(block_size, Sk - np.arange(kb) * block_size)               # true |J|
    a[...] = p.reshape(B, Hq, kb, block_size).sum(axis=-1) / (len(rows) * cnt)
    return (a,)


PROXY_OP = define_op("proxyattn_score", proxyattn_proxy_scores, outputs=("proxy_scores",),
                     kind="array")
BUDGET_OP = define_op("proxyattn_budget_score", proxyattn_budget_scores,
                      outputs=("budget_scores",), kind="array")


def budgets_from_mass(a: Any, gamma: float, valid: np.ndarray, min_budget: int,
                      max_budget: int | None) -> Any:
    """int64 ``[...]``: Algorithm 1's block count. The valid entries of ``a [..., N]`` are
    sorted descending and divided by their sum; the count is the fewest top blocks whose
    cumulative share reaches ``gamma`` (crossing included; all valid blocks if never
    reached, 0 if ``gamma <= 0`` or the mass is 0), then clamped to
    ``[min_budget, max_budget]``.

    ``a`` may be a device array (the result is then one too); ``valid`` is host geometry
    broadcastable to ``a``. Only the sorted values matter, so one descending sort replaces
    the ranking.
    """
    xp = array_module(a)
    ok = xp.broadcast_to(xp.asarray(valid), a.shape)
    n_valid = ok.sum(axis=-1)
    # valid masses descending, then the invalid slots as 0.0 (they come last)
    srt = -xp.sort(-xp.where(ok, a, -np.inf), axis=-1)
    slot = xp.arange(a.shape[-1])
    live = slot < n_valid[..., None]
    srt = xp.where(live, srt, 0.0)
    tot = srt.sum(axis=-1, keepdims=True)
    srt = srt / xp.where(tot > 0, tot, 1.0)                   # sort(a) / sum(a)
    before = xp.cumsum(srt, axis=-1) - srt                    # share strictly before each slot
    need = ((before < gamma) & live).sum(axis=-1)
    need = xp.where(tot[..., 0] > 0, need, 0)
    if gamma <= 0:
        need = xp.zeros_like(need)
    need = xp.maximum(need, min_budget)
    if max_budget is not None:
        need = xp.minimum(need, max_budget)
    return need.astype(np.int64)


def _group_size(params: ProxyAttnParams, hq: int, hkv: int) -> int:
    """Query heads per proxy (``None``: the GQA group). The scoring op of every backend
    checks that it is a multiple of the GQA group dividing ``Hq`` (groups aligned with the
    keys)."""
    return hq // hkv if params.group_size is None else int(params.group_size)


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
    by the budget (NaN where none), ``forced`` (sink and diagonal, when asked for), and
    extras ``budgets int64 [B,Hq]`` (blocks per query block row, before the per-row clamp
    to the legal blocks), ``budget_scores [B,Hq,Kb]`` (Algorithm 1's pooled attention of
    the last query block), ``group_size``.
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
    last_row = legal[-1] if legal.shape[0] else np.zeros(legal.shape[1], bool)
    budgets = budgets_from_mass(a, float(p.gamma), last_row, p.resolved_min_budget(),
                                None if p.max_budget is None else int(p.max_budget))
    n_legal = xp.asarray(legal.sum(axis=-1))                                      # [Qb]
    per_row = xp.minimum(budgets[..., None], n_legal)                             # [B,Hq,Qb]
    scores = xp.repeat(S, g, axis=1)                                             # per q head
    scores = xp.where(legal_x, scores, -np.inf)
    chosen, boundary = topk_per_row(scores, per_row, valid=legal_x, tie=p.tie, backend=backend)
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
