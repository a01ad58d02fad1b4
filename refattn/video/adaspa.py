"""AdaSpa: blockified exact attention mass, per-row top-k, head-adaptive sparsity (NumPy reference).

Paper: Xia, Ling, Fu, Wang, Li, Xiao, Cui, "Training-free and Adaptive Sparse Attention for
Efficient Long Video Generation", arXiv 2502.21079 (ICCV 2025), Sec. 4 / Alg. 1-2 / Eq. 9, 13, 14.
**No official code is public** (the paper names an ``adaspa_attention_handler`` built on
``mit-han-lab/Block-Sparse-Attention``; no repository is linked). Everything here follows the
paper (spec ``video-kv.md`` section 4); every point the paper leaves open is a documented
choice below and in ``docs/methods/adaspa.md``.

Scoring (Sec. 4.2, "blockified pattern" with cached LSE). For query block ``p`` and key block
``c`` (``B``-token blocks of the joint video+text sequence)::

    LSE_i  = log sum_j exp(s * q_i . k_j)                       (s = D^-1/2)
    W[p,c] = sum_{i in p} sum_{j in c} exp(s * q_i . k_j - LSE_i)

(the paper's Alg. 1-2 write ``p <- Log(qk - LSE)``; ``exp`` is the only reading consistent with
Eq. 13). The *fused search* computes ``LSE`` exactly (a dense FlashAttention pass) and then
``W``; the *LSE-cached search* of later search steps reuses an ``LSE`` from an earlier step
(``lse`` parameter), so rows no longer sum to exactly 1 (ranking only).

Selection:

* "Row wise" (Eq. 14 with the implementation note): every query-block row keeps its top
  ``k = R((1 - rho) * Kb)`` key blocks by ``W``, ``R`` = ``rounding`` (open; default
  ``ceil``). Ties: lower key-block index first. The method is bidirectional (video DiT) and
  refuses ``causal=True``; the scoring op also supports causal masking.
* "Text sink": blocks of the video->text, text->video and text->text regions (every block row
  or column that holds a text token) are always selected and do not count against ``k``
  (open: the paper does not say whether they count).
* Head-adaptive sparsity (Sec. 4.3, Eq. 9): with the base ``rho`` mask compute each head's
  recall ``R_h = sum_{selected} W / sum_{all} W``; ``n = #{h : R_h > recall_threshold}``;
  the ``n`` highest-recall heads get sparsity ``(1 + rho)/2``, the ``n`` lowest-recall heads
  ``(3 rho - 1)/2`` (clamped at 0), the rest keep ``rho``. Open choices: ``n`` is capped at
  ``H // 2`` so the two groups never overlap (the mean sparsity stays ``rho``); recall is
  taken over the final mask including the text-sink blocks; heads are ranked by recall
  descending, ties to the lower head index; each batch element is adapted on its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask, legal_blocks, num_blocks
from ..core.errors import InputError
from ..core.layout import causal_offset
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..core.video_grid import TEXT_POSITIONS, VideoGrid
from ..methods.base import check_choice, check_range, register_method
from ..reference import attention as _attention  # noqa: F401  (defines "attention_fwd")
from ..reference.memory import rows_per_chunk
from ..reference.selection_backend import topk_per_row

PAPER = ("Xia et al., Training-free and Adaptive Sparse Attention for Efficient Long Video "
         "Generation (AdaSpa), arXiv 2502.21079")
CODE = "no official code (paper only)"
ROUNDINGS = ("ceil", "floor", "round")


@dataclass(frozen=True)
class AdaSpaParams:
    """AdaSpa parameters (paper symbols in brackets).

    * ``grid``: ``(T, H, W)`` video token grid; optional (only used to check the sequence
      length). ``text_tokens`` / ``text_position``: the text segment of the joint sequence
      (HunyuanVideo: ``"last"``; CogVideoX: ``"first"``); 0 text tokens = video only.
    * ``block_size`` [B]: block edge in tokens (64).
    * ``sparsity`` [rho]: target fraction of key blocks *not* computed per row (0.8).
    * ``head_adaptive``: apply the hierarchical head-adaptive adjustment (True).
    * ``recall_threshold``: recall above which a head counts as "sparse-friendly" (0.8).
    * ``rounding``: per-row count ``R((1-rho) * Kb)``: ``ceil`` (default), ``floor`` or
      ``round`` (half to even). The product is rounded to 9 decimals first so that binary
      noise (``0.2 * 10 = 2.0000000000000004``) does not move ``ceil``.
    * ``text_sink``: force every text block row and column (True).
    * ``lse``: cached log-sum-exp ``[B, Hq, Sq]`` (natural log) of an earlier fused search
      (the LSE-cached search); ``None`` computes it exactly (fused search).
    """

    grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    text_position: str = "last"
    block_size: int = 64
    sparsity: float = 0.8
    head_adaptive: bool = True
    recall_threshold: float = 0.8
    rounding: str = "ceil"
    text_sink: bool = True
    lse: Any = None

    def validate(self) -> None:
        check_range("block_size", self.block_size, 1, integer=True)
        check_range("sparsity", self.sparsity, 0.0, 1.0)
        check_range("recall_threshold", self.recall_threshold, 0.0, 1.0)
        check_range("text_tokens", self.text_tokens, 0, integer=True)
        check_choice("text_position", self.text_position, TEXT_POSITIONS)
        check_choice("rounding", self.rounding, ROUNDINGS)
        for name in ("head_adaptive", "text_sink"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.grid is not None:
            VideoGrid.from_params(self.grid, int(self.text_tokens), self.text_position)


# ------------------------------------------------------------------------------- scoring
def adaspa_block_mass(q: np.ndarray, k: np.ndarray, lse: np.ndarray, block_size: int,
                      scale: float, causal: bool, *,
                      out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Blockified attention mass ``W[b,h,p,c] = sum_{i in p, j in c} exp(s q_i.k_j - lse_i)``.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]`` (any float dtype; GQA: head ``h`` reads kv
    head ``h // (Hq/Hkv)``), ``lse`` ``[B, Hq, Sq]`` (natural log; ``-inf`` rows contribute
    nothing), ``scale`` = ``s``. Square blocks of ``block_size`` on both axes (the last may be
    partial: it sums over its real tokens). ``causal``: only keys ``j <= i + Sk - Sq`` count.
    Returns ``(W,)``, float64 ``[B, Hq, ceil(Sq/bs), ceil(Sk/bs)]``.
    """
    Bn, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G, bs = Hq // Hkv, int(block_size)
    Qb, Kb = num_blocks(Sq, bs), num_blocks(Sk, bs)
    W = np.empty((Bn, Hq, Qb, Kb), np.float64) if out is None else out[0]
    kstart = np.arange(Kb) * bs                       # first key of every key block
    off = causal_offset(Sq, Sk)
    nI = max(1, rows_per_chunk(Qb, bs * Sk * 8 * 3, 8 * Sk * D, "adaspa_block_mass"))
    for b in range(Bn):
        for h in range(Hq):
            kk = k[b, h // G].astype(np.float64)
            for I0 in range(0, Qb, nI):
                I1 = min(Qb, I0 + nI)
                r0, r1 = I0 * bs, min(Sq, I1 * bs)
                s = (q[b, h, r0:r1].astype(np.float64) @ kk.T) * scale          # [R, Sk]
                l = lse[b, h, r0:r1].astype(np.float64)
                live = np.isfinite(l)
                with np.errstate(over="ignore"):
                    p = np.exp(s - np.where(live, l, 0.0)[:, None])
                p[~live] = 0.0
                if causal:
                    p[np.arange(Sk)[None, :] > (np.arange(r0, r1) + off)[:, None]] = 0.0
                cols = np.add.reduceat(p, kstart, axis=1)                        # [R, Kb]
                W[b, h, I0:I1] = np.add.reduceat(cols, np.arange(I1 - I0) * bs, axis=0)
    return (W,)


ADASPA_SCORE = define_op("adaspa_block_mass", adaspa_block_mass, outputs=("W",), kind="array")


def exact_lse(q: np.ndarray, k: np.ndarray, causal: bool, scale: float,
              backend: str = "numpy") -> np.ndarray:
    """Exact LSE ``[B, Hq, Sq]`` (float64) of the fused search's dense pass (any backend
    of ``attention_fwd``; the values are irrelevant to the LSE, so a 1-wide zero v is used)."""
    v0 = np.zeros(k.shape[:3] + (1,), np.float32)
    _, lse = dispatch("attention_fwd", backend, (q, k))(q, k, v0, None, bool(causal), float(scale))
    return np.asarray(lse, np.float64)


# ----------------------------------------------------------------------------- selection
def row_budget(sparsity: Any, n_row: np.ndarray, rounding: str) -> np.ndarray:
    """``R((1 - rho) * n_row)`` as int64 (``rho`` broadcasts against ``n_row``)."""
    x = np.round((1.0 - np.asarray(sparsity, np.float64)) * n_row, 9)
    f = {"ceil": np.ceil, "floor": np.floor, "round": np.round}[rounding]
    return f(x).astype(np.int64)


def text_blocks(seq_len: int, block_size: int, text_tokens: int, text_position: str) -> np.ndarray:
    """bool ``[ceil(seq_len / bs)]``: blocks holding at least one text token."""
    n = num_blocks(seq_len, block_size)
    if text_tokens == 0:
        return np.zeros(n, bool)
    t0, t1 = (0, text_tokens) if text_position == "first" else (seq_len - text_tokens, seq_len)
    first = np.arange(n) * block_size
    last = np.minimum(first + block_size, seq_len) - 1
    return (last >= t0) & (first < t1)


def adapt_sparsity(recall: np.ndarray, rho: float, threshold: float) -> np.ndarray:
    """Per-head sparsity ``[B, H]`` from the base-mask recall ``[B, H]`` (Sec. 4.3).

    ``n = #{R_h > threshold}``, capped at ``H // 2``; heads ranked by recall descending (ties:
    lower head index first); the first ``n`` get ``(1+rho)/2``, the last ``n`` get
    ``max(0, (3 rho - 1)/2)``, the others ``rho``.
    """
    Bn, H = recall.shape
    out = np.full((Bn, H), float(rho))
    for b in range(Bn):
        n = min(int((recall[b] > threshold).sum()), H // 2)
        if n == 0:
            continue
        order = np.argsort(-recall[b], kind="stable")
        out[b, order[:n]] = (1.0 + rho) / 2.0
        out[b, order[H - n:]] = max(0.0, (3.0 * rho - 1.0) / 2.0)
    return out


def _select_rows(W: np.ndarray, cand: np.ndarray, forced: np.ndarray, budget: np.ndarray,
                 backend: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-``budget`` candidate blocks per row of ``W [B, H, Qb, Kb]`` (``cand [Qb, Kb]``,
    ``budget`` broadcastable to ``[B, H, Qb]``) plus the forced blocks; the top-k runs op
    ``selection_topk_rows`` on ``backend``. Returns ``(mask, boundary [B, H, Qb])``."""
    sel, boundary = topk_per_row(W, budget, valid=cand, backend=backend)
    return sel | forced, boundary


def _recall(W: np.ndarray, mask: np.ndarray, legal: np.ndarray) -> np.ndarray:
    tot = np.where(legal, W, 0.0).sum(axis=(-1, -2))
    got = np.where(mask & legal, W, 0.0).sum(axis=(-1, -2))
    return np.where(tot > 0, got / np.where(tot > 0, tot, 1.0), 1.0)


@register_method(
    "adaspa", AdaSpaParams, kind="video",
    summary="exact blockified attention mass (LSE-normalised), per-row top-(1-rho) key blocks, "
            "text-sink blocks forced, head-adaptive sparsity by recall (paper only)",
    paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: AdaSpaParams, *,
           causal: bool = False, backend: str = "numpy") -> Selection:
    """AdaSpa search on canonical arrays q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``.

    Returns a :class:`Selection` on the ``block_size`` grid: ``mask [B, Hq, Qb, Kb]``,
    ``scores`` = ``W``, ``boundary [B, Hq, Qb]`` (the k-th selected ``W`` of each row, ``nan``
    where the row selected nothing by score), ``forced`` (text-sink blocks); ``extras``:
    ``lse`` (used), ``recall_base`` ``[B, Hq]`` (recall of the base-``rho`` mask),
    ``recall`` (of the final mask), ``head_sparsity`` ``[B, Hq]``, ``budget`` ``[B, Hq, Qb]``
    (blocks selected by score per row), ``text_q_blocks`` / ``text_k_blocks``.
    v is not used.
    """
    if causal:
        raise InputError("causal: AdaSpa is bidirectional (video DiT); pass causal=False "
                         "(CLI: --no-causal)")
    p = params
    Bn, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    T, pos = int(p.text_tokens), p.text_position
    if p.grid is not None:
        g = VideoGrid.from_params(p.grid, T, pos)
        g.check_seq_len(Sk, "k_len")
        g.check_seq_len(Sq, "q_len")
    elif T > min(Sq, Sk):
        raise InputError(f"text_tokens: {T} exceeds the sequence length min(Sq, Sk) = {min(Sq, Sk)}")
    bs = int(p.block_size)
    scale = 1.0 / math.sqrt(D)
    if p.lse is None:
        lse = exact_lse(q, k, causal, scale, backend)
    else:
        lse = np.asarray(p.lse, np.float64)
        if lse.shape != (Bn, Hq, Sq):
            raise InputError(f"lse: expected the cached LSE of shape [B, Hq, Sq] = {(Bn, Hq, Sq)}, "
                             f"got {lse.shape}")
        if np.isnan(lse).any() or (lse == np.inf).any():
            raise InputError("lse: contains NaN or +inf")
    (W,) = dispatch(ADASPA_SCORE.name, backend, (q, k))(q, k, lse, bs, scale, bool(causal))
    W = np.asarray(W, np.float64)
    legal = legal_blocks(Sq, Sk, bs, bs, causal)
    tq = text_blocks(Sq, bs, T, pos)
    tk = text_blocks(Sk, bs, T, pos)
    forced = ((tq[:, None] | tk[None, :]) & legal) if p.text_sink else np.zeros_like(legal)
    cand = legal & ~forced
    n_row = legal.sum(axis=1)                                        # [Qb]
    rho = float(p.sparsity)
    base = np.broadcast_to(row_budget(rho, n_row, p.rounding), W.shape[:3])
    mask, boundary = _select_rows(W, cand, forced, base, backend)
    recall_base = _recall(W, mask, legal)
    head_rho = np.full((Bn, Hq), rho)
    budget = base
    if p.head_adaptive:
        head_rho = adapt_sparsity(recall_base, rho, float(p.recall_threshold))
        budget = row_budget(head_rho[..., None], n_row[None, None, :], p.rounding)
        mask, boundary = _select_rows(W, cand, forced, budget, backend)
    geo = dict(block_q=bs, block_k=bs, q_len=Sq, k_len=Sk)
    return Selection(
        mask=BlockMask(mask, **geo),
        scores=BlockScores(W, **geo),
        boundary=boundary,
        forced=np.array(np.broadcast_to(forced, mask.shape)),
        extras={"lse": lse, "recall_base": recall_base, "recall": _recall(W, mask, legal),
                "head_sparsity": head_rho, "budget": np.array(budget),
                "text_q_blocks": tq, "text_k_blocks": tk})
