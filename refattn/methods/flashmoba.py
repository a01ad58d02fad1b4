"""FlashMoBA -- "Optimizing Mixture of Block Attention" (MIT Han Lab): MoBA's router as one
fused top-k kernel, with a deterministic tie rule and a non-causal mode.

Paper: Xiao, Guo, Mazaheri, Han, arXiv 2511.11571. Official code:
``mit-han-lab/flash-moba@39d9ac04`` -- ``flash_moba/flash_moba_interface.py``
(``flash_topk_varlen_func``), ``csrc/flash_topk/src/flash_topk_kernel.h`` (CUDA top-k) and
its pure-torch mirror ``tests/test_fused_topk.py:moba_fused_topk_ref``, which this module
reproduces (spec ``llm-prefill.md`` section 2).

Scoring is MoBA's gate (op ``moba_score``): ``s_j(t) = <q_t, kbar_j>``, ``kbar_j`` the mean of
key block ``j`` over its true length, stored in the input dtype; no scale, no softmax.

Selection per query row ``t`` at key position ``p = t + Sk - Sq`` (bottom-right):

* ``causal=True``: slot 0 holds the own block ``floor(p/B)`` (value ``+inf``, only when
  ``p >= 0``); the other ``k - 1`` slots take the best strictly past blocks ``j < floor(p/B)``;
* ``causal=False``: every block is a candidate (the partial last block too, its mean over its
  true length); the best ``k`` blocks are taken;
* ties: the **higher** block index wins (the kernel scans blocks from the highest index down
  and admits a candidate only if strictly greater; the torch mirror takes the last ``k`` of a
  stable ascending sort) -- ``tie="high"`` by default.

Besides the :class:`BlockMask` (``block_q = 1``, ``block_k = B``), ``extras`` hold the
kernel's own slot layout, ``topk_idx int32 [B, Hq, Sq, R]`` and ``topk_val float64
[B, Hq, Sq, R]`` with ``R = round_up(topk, 16)``: slots by value descending, ``-1`` / ``-inf``
in unused slots, so they compare directly with ``moba_fused_topk_ref`` (transposed to bhsd).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask
from ..core.layout import array_module
from ..core.registry import dispatch
from ..core.scores import BlockScores, Selection
from ..reference.selection import TIES, rank_order
from ..reference.selection_backend import topk_per_row
from .base import check_choice, check_range, register_method
from .moba import MOBA_SCORE, own_blocks

PAPER = "Xiao, Guo, Mazaheri, Han, Optimizing Mixture of Block Attention, arXiv 2511.11571"
CODE = "mit-han-lab/flash-moba@39d9ac043b271d046a2181a9991e99a26b67bca1"
MAX_TOPK = 64  # the CUDA top-k kernel's limit (moba_topk <= 64)


@dataclass(frozen=True)
class FlashMobaParams:
    """FlashMoBA parameters (official names in brackets).

    * ``block_size`` [``moba_chunk_size``]: key block length ``B``. Default 128 with
      ``topk = 8``: the paper's recommended small-block setting.
    * ``topk`` [``moba_topk``]: blocks per query token, own block included (causal);
      at most 64, the kernel's limit.
    * ``tie``: ``"high"`` (official: the higher block index wins) or ``"low"``.
    """

    block_size: int = 128
    topk: int = 8
    tie: str = "high"

    def validate(self) -> None:
        check_range("block_size", self.block_size, 1, integer=True)
        check_range("topk", self.topk, 1, MAX_TOPK, integer=True)
        check_choice("tie", self.tie, TIES)


def _stable_argsort(x: Any) -> Any:
    """Stable ascending argsort along the last axis (NumPy or CuPy, whose sort is stable)."""
    if isinstance(x, np.ndarray):
        return np.argsort(x, axis=-1, kind="stable")
    return array_module(x).argsort(x, axis=-1)


def rank_order_xp(scores: Any, valid: Any, tie: str, *, argsorts: bool | None = None) -> Any:
    """:func:`refattn.reference.selection.rank_order` for NumPy or CuPy ``scores``: the
    same permutation (score descending, ties by index per ``tie``, invalid entries and NaN
    last), int64 ``[..., N]``. ``valid`` (bool, broadcastable) may be host geometry.

    Host scores run the reference (one ``lexsort``); device scores, or ``argsorts=True``,
    two stable argsorts (score, then validity): the order is total, so the permutation is
    the lexsort's, element for element (CuPy's ``lexsort`` takes no ``axis``).
    """
    check_choice("tie", tie, TIES)
    xp = array_module(scores)
    if not ((xp is not np) if argsorts is None else argsorts):
        return rank_order(scores, np.broadcast_to(valid, scores.shape), tie)
    s = scores.astype(np.float64, copy=False)
    ok = xp.asarray(valid) & ~xp.isnan(s)
    neg = xp.where(ok, -s, 0.0)
    bad = xp.broadcast_to(~ok, neg.shape).astype(np.int8)
    if tie == "high":                  # higher index first: sort the reversed rows
        neg, bad = neg[..., ::-1], bad[..., ::-1]
    order = _stable_argsort(neg)                                   # score descending, index
    order = xp.take_along_axis(order, _stable_argsort(xp.take_along_axis(bad, order, -1)), -1)
    return order if tie == "low" else (s.shape[-1] - 1) - order


def slot_layout(scores: Any, selected: Any, valid: Any, own: np.ndarray,
                topk: int, tie: str, causal: bool) -> tuple[Any, Any]:
    """The kernel's per-token slots: ``topk_idx int32`` and ``topk_val float64``, both
    ``[..., Sq, R]``, ``R = round_up(topk, 16)``.

    Causal: slot 0 = own block with ``+inf`` (rows with ``p >= 0``), then the selected past
    blocks by value descending (ties per ``tie``). Non-causal: the selected blocks in that
    order. Every further slot is ``-1`` / ``-inf``. ``scores`` and ``selected`` may be
    device arrays (the slots are then built there); ``own`` is host geometry.
    """
    xp = array_module(scores)
    R = -(-int(topk) // 16) * 16
    lead = scores.shape[:-1]
    idx = xp.full(lead + (R,), -1, np.int32)
    val = xp.full(lead + (R,), -np.inf, np.float64)
    first = 1 if causal else 0
    if causal:
        own_x = xp.asarray(own)
        has_own = xp.broadcast_to(own_x >= 0, lead)
        idx[..., 0] = xp.where(has_own, own_x, -1)
        val[..., 0] = xp.where(has_own, np.inf, -np.inf)
    width = min(R - first, scores.shape[-1])
    top = rank_order_xp(scores, valid, tie)[..., :width]          # selected blocks come first
    live = xp.arange(width) < selected.sum(axis=-1)[..., None]
    idx[..., first:first + width] = xp.where(live, top, -1)
    val[..., first:first + width] = xp.where(live, xp.take_along_axis(scores, top, -1), -np.inf)
    return idx, val


@register_method("flashmoba", FlashMobaParams, kind="llm-prefill",
                 summary="MoBA gate with FlashMoBA's fused top-k (ties to the higher block; "
                         "causal and non-causal)",
                 paper=PAPER, code=CODE, device=True)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: FlashMobaParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """FlashMoBA routing on canonical arrays q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``.

    Returns a :class:`Selection` with ``mask`` ``[B, Hq, Sq, Kb]`` (``block_q = 1``,
    ``block_k = block_size``), ``scores`` the gate (causal: ``-inf`` on future blocks),
    ``boundary [B, Hq, Sq]`` (the lowest score selected by ranking, ``nan`` if none),
    ``forced`` (the own block when causal, else None) and ``extras`` ``topk_idx``,
    ``topk_val`` (official slot layout), ``gate`` (raw, every block) and ``own_block``.
    Device inputs (backend ``"cupy"``) keep every array on the device except
    ``own_block``, which depends on the shapes only.
    """
    Bsz = int(params.block_size)
    K = int(params.topk)
    Sq, Sk = q.shape[2], k.shape[2]
    (gate,) = dispatch(MOBA_SCORE.name, backend, (q, k))(q, k, Bsz)
    kb = gate.shape[-1]
    xp = array_module(gate)          # the [Sq, Kb] geometry masks go where the gate lives
    j = np.arange(kb)
    own = own_blocks(Sq, Sk, Bsz)
    if causal:
        valid = xp.asarray(j[None, :] < own[:, None])       # strictly past blocks
        mine = xp.asarray(j[None, :] == own[:, None])
        k_rank = K - 1
        scores = xp.where(valid | mine, gate, -np.inf)
    else:
        valid = xp.asarray(np.ones((Sq, kb), bool))
        mine = None
        k_rank = K
        scores = gate
    sel, boundary = topk_per_row(gate, k_rank, valid=valid, tie=params.tie, backend=backend)
    idx, val = slot_layout(gate, sel, valid, own, K, params.tie, causal)
    mask = sel if mine is None else (sel | mine)
    geo = dict(block_q=1, block_k=Bsz, q_len=Sq, k_len=Sk)
    return Selection(
        mask=BlockMask(mask, **geo),
        scores=BlockScores(scores, **geo),
        boundary=boundary,
        forced=None if mine is None else xp.broadcast_to(mine, mask.shape),
        extras={"topk_idx": idx, "topk_val": val, "gate": gate, "own_block": own},
    )
