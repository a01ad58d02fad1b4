"""Quest -- query-aware page selection for decoding (MIT Han Lab).

Paper: Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
ICML 2024, arXiv 2406.10774, section 3. Official code: ``mit-han-lab/Quest@24c9c6fc`` --
``evaluation/quest_attention.py`` (the accuracy-evaluation path, mirrored here; the same
rule is ported in ``microsoft/MInference:minference/modules/quest.py``) and the CUDA path
``quest/utils/controller.py`` + ``quest/ops`` (see ``force_recent``). Spec: ``llm-prefill.md``
section 8.4.

Rule, per query head ``h`` (reading kv head ``h // (Hq/Hkv)``) and decode query ``q``:

* pages ``P_p = [p P, min((p+1) P, Sk))`` aligned at key 0; the last page may be partial and
  its bounds use only its real keys (official: padding with ``finfo.min`` before the max);
* per page and channel ``i``: ``M_i = max_{t in P_p} K_ti``, ``m_i = min_{t in P_p} K_ti``;
* upper bound of ``q . k`` over the page: ``U_p = sum_i max(q_i M_i, q_i m_i)``. Since
  ``m_i <= M_i`` this is ``sum_i max(q_i, 0) M_i + min(q_i, 0) m_i`` (the official
  ``|q_i| * max_t(sign(q_i) K_ti)`` with ``sign(0) = -1`` is the same number); no
  ``1/sqrt(D)``, which would not change the ranking;
* pages selected: the top ``min(max(min_pages, min(Sk, token_budget) // P), n_pages)`` by
  ``U`` (official: ``min(max(3, token_budget // chunk_size), n_chunks)``), among the pages the
  query may see. Ties: ``tie`` (official ``torch.topk``: implementation-defined).

Queries are the last ``Sq`` positions (bottom-right): query row ``r`` sits at key position
``t = r + Sk - Sq``. The official code runs Quest only for single-token decode
(``q_len == 1``, past the first two layers; dense attention otherwise), where the cache holds
keys ``0..t``. With ``causal`` every row is treated as that decode step: its cache has
``t + 1`` keys, so the page holding ``t`` is bounded over keys ``[cP, t]`` only, later pages
are not candidates, and the page count uses ``min(t + 1, token_budget)`` and
``ceil((t + 1)/P)``. For ``Sq = 1`` (and ``Sq = Sk`` too) this is exactly the official
computation. Without ``causal`` every row sees all ``Sk`` keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.blockmask import BlockMask, num_blocks
from ..core.layout import array_module
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..reference.memory import rows_per_chunk
from ..reference.selection import TIES
from ..reference.selection_backend import topk_per_row
from .base import check_choice, check_range, register_method

PAPER = ("Tang et al., Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference, "
         "ICML 2024, arXiv 2406.10774")
CODE = "mit-han-lab/Quest@24c9c6fcac9f9e936847f511da414f1150cc9fb4"


@dataclass(frozen=True)
class QuestParams:
    """Quest parameters (official names in brackets; defaults of ``evaluation/passkey``).

    * ``page_size`` [``chunk_size``]: tokens per page ``P``, 16.
    * ``token_budget`` [``token_budget``]: keys to attend, 1024; pages = ``budget // P``.
    * ``min_pages``: floor on the page count, 3 (the evaluation code's ``max(3, ...)``).
    * ``force_recent``: always keep the page holding the query's last visible key, counted
      inside the budget. ``False`` = evaluation path; ``True`` with ``min_pages=1`` = the
      CUDA path (``controller.py``: top ``page_budget - 1`` of the older pages + the last).
    * ``tie``: ``"low"`` or ``"high"`` page index first among equal bounds.
    """

    page_size: int = 16
    token_budget: int = 1024
    min_pages: int = 3
    force_recent: bool = False
    tie: str = "low"

    def validate(self) -> None:
        check_range("page_size", self.page_size, 1, integer=True)
        check_range("token_budget", self.token_budget, 1, integer=True)
        check_range("min_pages", self.min_pages, 1, integer=True)
        check_choice("force_recent", self.force_recent, (False, True))
        check_choice("tie", self.tie, TIES)


# ----------------------------------------------------------------------- scoring
def page_bounds(k: np.ndarray, page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-page channel maxima and minima of the keys: ``(M, m)``, float64
    ``[B, Hkv, Np, D]`` each, ``Np = ceil(Sk / P)``, over each page's real keys only."""
    B, H, S, D = k.shape
    n = num_blocks(S, page_size)
    pad = n * page_size - S
    kk = k.astype(np.float64)
    hi = np.concatenate([kk, np.full((B, H, pad, D), -np.inf)], axis=2) if pad else kk
    lo = np.concatenate([kk, np.full((B, H, pad, D), np.inf)], axis=2) if pad else kk
    M = hi.reshape(B, H, n, page_size, D).max(axis=3)
    m = lo.reshape(B, H, n, page_size, D).min(axis=3)
    return M, m


def quest_bound(q: np.ndarray, k: np.ndarray, page_size: int, causal: bool, *,
                out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Quest's upper bound ``U[b, h, r, p] = sum_i max(q_i M_pi, q_i m_pi)``.

    q ``[B, Hq, Sq, D]`` (rows at key positions ``t = r + Sk - Sq``), k ``[B, Hkv, Sk, D]``;
    returns ``(U,)``, float64 ``[B, Hq, Sq, Np]``. With ``causal`` each row is one decode
    step whose cache holds keys ``0..t`` only: its own page's bounds use keys ``[cP, t]``
    (the official code never sees later keys), later pages are ``-inf``. Without ``causal``
    every page uses all its keys.
    """
    Bn, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    P = int(page_size)
    M, m = page_bounds(k, P)
    n = M.shape[2]
    U = np.empty((Bn, Hq, Sq, n), np.float64) if out is None else out[0]
    pos = np.arange(Sq) + (Sk - Sq)
    if causal:
        # running max/min of the keys from the start of their page: the bounds of a page
        # truncated after key t are Mrun[t], mrun[t]
        pad = n * P - Sk
        kk = k.astype(np.float64)
        if pad:
            kk = np.concatenate([kk, np.zeros((Bn, Hkv, pad, D))], axis=2)
        paged = kk.reshape(Bn, Hkv, n, P, D)
        Mrun = np.maximum.accumulate(paged, axis=3).reshape(Bn, Hkv, n * P, D)
        mrun = np.minimum.accumulate(paged, axis=3).reshape(Bn, Hkv, n * P, D)
        later = np.arange(n)[None, :] > (pos // P)[:, None]            # [Sq, Np]
        rows = np.nonzero(pos >= 0)[0]
    R = rows_per_chunk(Sq, 8 * G * (3 * D + n), 8 * (U.size + 4 * M.size), "quest bound")
    for b in range(Bn):
        for g in range(Hkv):
            h0, h1 = g * G, (g + 1) * G
            for r0 in range(0, Sq, R):
                r1 = min(r0 + R, Sq)
                qq = q[b, h0:h1, r0:r1].astype(np.float64)                     # [G, R, D]
                qp, qn = np.maximum(qq, 0.0), np.minimum(qq, 0.0)
                # max(q M, q m) = q M for q > 0, q m for q < 0, 0 for q = 0
                U[b, h0:h1, r0:r1] = qp @ M[b, g].T + qn @ m[b, g].T
            if causal:
                t = pos[rows]
                qr = q[b][h0:h1][:, rows].astype(np.float64)               # [G, rows, D]
                own = (np.einsum("grd,rd->gr", np.maximum(qr, 0.0), Mrun[b, g, t])
                       + np.einsum("grd,rd->gr", np.minimum(qr, 0.0), mrun[b, g, t]))
                Ub = U[b]                                   # view; keeps [G, rows] order below
                Ub[h0:h1, rows, t // P] = own
                Ub[h0:h1] = np.where(later, -np.inf, Ub[h0:h1])
    return (U,)


QUEST_SCORE = define_op("quest_score", quest_bound, outputs=("bound",), kind="array")


def pages_to_keep(visible_keys: np.ndarray, params: QuestParams) -> np.ndarray:
    """Pages per query row for a cache of ``n_keys`` keys (``n_pages = ceil(n_keys / P)``).

    * Evaluation path (``force_recent=False``): ``min(max(min_pages, min(n_keys,
      token_budget) // P), n_pages)`` (``evaluation/quest_attention.py``: ``token_budget =
      min(kv_seq_len, token_budget)``, ``k = min(max(3, token_budget // chunk_size),
      n_chunks)``).
    * Kernel path (``force_recent=True``): ``min(max(min_pages, token_budget // P),
      n_pages)`` (``quest/models/llama.py``: ``page_budget = token_budget // page_size``;
      ``utils/controller.py``: ``min(page_budget, cur_page_nums)``, dense when the cache
      has no more pages than that), so a cache of up to ``token_budget`` keys keeps every
      page, its partial last page included.
    """
    nk = np.asarray(visible_keys, dtype=np.int64)
    P = int(params.page_size)
    pages = -(-nk // P)
    tb = int(params.token_budget)
    budget = np.full_like(nk, tb) if params.force_recent else np.minimum(nk, tb)
    return np.where(nk > 0, np.minimum(np.maximum(int(params.min_pages), budget // P), pages), 0)


# -------------------------------------------------------------------- selection
@register_method("quest", QuestParams, kind="llm-prefill",
                 summary="decode-time page selection by the channel min/max upper bound of q.k",
                 paper=PAPER, code=CODE, device=True)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: QuestParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """Quest page selection on canonical arrays q ``[B, Hq, Sq, D]`` (the last ``Sq``
    positions, usually 1 to a few decode queries) and k ``[B, Hkv, Sk, D]``.

    Returns a :class:`Selection`: ``mask [B, Hq, Sq, Np]`` with ``block_q = 1``,
    ``block_k = page_size``; ``scores`` the bound ``U`` (``-inf`` on pages the query cannot
    see); ``boundary [B, Hq, Sq]``; ``forced`` the recent page when ``force_recent``;
    ``extras["pages"]`` int ``[Sq]``, the number of pages each row keeps.
    """
    P = int(params.page_size)
    Sq, Sk = q.shape[2], k.shape[2]
    (U,) = dispatch(QUEST_SCORE.name, backend, (q, k))(q, k, P, bool(causal))
    n = U.shape[-1]
    j = np.arange(n)
    pos = np.arange(Sq) + (Sk - Sq)                                  # key position of each row
    if causal:
        visible = (j[None, :] * P) <= pos[:, None]                   # page starts at or before
        cache = np.clip(pos + 1, 0, Sk)                              # keys in this step's cache
        last = pos
    else:
        visible = np.ones((Sq, n), bool)
        cache = np.full(Sq, Sk)
        last = np.full(Sq, Sk - 1)
    keep = pages_to_keep(cache, params)                              # [Sq]
    forced = np.zeros((Sq, n), bool)
    if params.force_recent:
        forced = (j[None, :] == (last // P)[:, None]) & (last[:, None] >= 0) & visible
    k_rank = np.maximum(keep - forced.sum(axis=-1), 0)
    xp = array_module(U)        # the [Sq, n] geometry masks go where the bound lives
    forced_x = xp.asarray(forced)
    sel, boundary = topk_per_row(U, xp.asarray(k_rank), valid=xp.asarray(visible & ~forced),
                                 tie=params.tie, backend=backend)
    mask = sel | forced_x
    geo = dict(block_q=1, block_k=P, q_len=Sq, k_len=Sk)
    return Selection(
        mask=BlockMask(mask, **geo),
        scores=BlockScores(U, **geo),
        boundary=boundary,
        forced=xp.broadcast_to(forced_x, mask.shape) if params.force_recent else None,
        extras={"pages": keep},
    )
