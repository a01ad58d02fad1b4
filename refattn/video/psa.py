"""PSA -- Pyramid Sparse Attention: every (query block, key block) pair gets a KV resolution.

Paper: Li, Gu, Lin, Wang, Zhuang, "PSA: Pyramid Sparse Attention for Efficient Video
Understanding and Generation", arXiv 2512.04025. Official code:
``ziplab/Pyramid-Sparse-Attention@be122cfb7f32010682b1d70534670e5ef150a93d`` (generation
path, ``src/psa_triton/``): ``pyramid_sparse_attention.py`` (``efficient_attn_with_pooling``,
``random_sample_tokens``, ``adaptive_block_sparse_attn``), ``kernels/attn_pooling_kernel.py``
(importance estimate), ``utils/transfer_attn_to_mask.py`` (importance -> level),
``kernels/calc_ksim_kernel.py`` (``calc_k_similarity_pytorch``, key-similarity cap),
``utils/rearranger.py`` + ``utils/gilbert3d.py`` (Gilbert token order), ``attention.py``
(``PSAConfig`` defaults). Spec ``video-kv.md`` section 2; conformance README ``psa``.

Pipeline (``select``):

1. optional Gilbert reordering of the video tokens (text moved to the end):
   :func:`refattn.video._gilbert.psa_sequence_order`;
2. importance ``P[i, j]`` from sampled tokens (:func:`sampled_importance`): the same ``mq``
   row offsets in every query block and ``mk`` column offsets in every key block
   (``offsets_q``/``offsets_k``, an input; by default drawn from ``seed``),
   ``x_rc = s q_r.k_c``, ``P[i, j] = max_{r in i} exp(max_{c in j} x_rc - max_c x_rc)``,
   rows normalised (op ``psa_sampled_importance``, run on ``select``'s ``backend``);
3. levels per row (:func:`transfer_levels`): rank ``P[i, :]`` descending and cut the ranks
   into chained intervals of levels ``1, 2, 4, 8, 0`` by the ratios' ends (``topk``: fixed
   quota; ``thresholdbound``: cumulative energy), with the alignment rounding and the 6%
   floor of level 1; text key blocks forced to level 1 (``mask_type="old"``); with the new
   mask type and the new kernel (the defaults) the levels the kernel's walk of the
   new-format mask attends (:func:`new_kernel_levels`; the same for the default ratios);
4. optional key-similarity cap (:func:`key_similarity_cap`, ``mask_type="old"`` only; the
   similarities are op ``psa_key_similarity``);
5. pyramid attention (:func:`refattn.reference.pyramid.pyramid_attention`, op
   ``pyramid_attention_fwd``) on the reordered sequence, output un-reordered: :func:`attention`;
   ``kernel`` ``"new"`` (default with ``mask_type="new"``, ``kernels/psa_kernel.py``, the tile
   walk that merges two pooled blocks per tile and re-reads the unmapped lanes) or
   ``"legacy"`` (``kernels/psa_kernel_legacy.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask
from ..core.errors import InputError
from ..core.permutation import apply_permutation
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..core.video_grid import VideoGrid
from ..methods.base import check_choice, check_range, register_method
from ..reference.pyramid import KERNELS, pooled_kv, pyramid_attention
from ._gilbert import psa_sequence_order
from .psa_levels import (  # noqa: F401  (re-exported: the level rules live in psa_levels)
    _round,
    level_intervals,
    new_kernel_levels,
    newtype_mask,
    ratio_items,
    transfer_levels,
)

PAPER = "Li et al., PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation, arXiv 2512.04025"
CODE = "ziplab/Pyramid-Sparse-Attention@be122cfb7f32010682b1d70534670e5ef150a93d"
# PSAConfig's mask_ratios: {level: (start, end)}; only the ends are used.
DEFAULT_RATIOS = ((1, 0.0, 0.1), (2, 0.1, 0.15), (4, 0.15, 0.15), (8, 0.15, 0.35), (0, 0.35, 1.0))
MODES = ("topk", "thresholdbound")
DTYPES = (None, "float32", "bfloat16", "float16")
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class PsaParams:
    """PSA parameters; defaults are the plug-and-play ``PSAConfig`` (official names in brackets).

    * ``grid`` (T, H, W), ``text_tokens`` [text_length], ``text_position`` (``"first"``, the
      layout the official rearranger reads, or ``"last"``): the token layout; ``grid`` is
      needed for ``rearrange="gilbert"`` [rearrange_method].
    * ``block_q`` [block_m] 128, ``block_k`` [block_n] 64, ``tile_n`` 32 (alignment only).
    * ``mode`` [mask_mode] ``"topk"`` | ``"thresholdbound"``; ``ratios`` [mask_ratios]:
      ``(level, start, end)`` triples in the official dict order, or a dict
      ``{level: (start, end)}``; ``min_full_attn_ratio`` 0.06 (thresholdbound's floor).
    * ``mask_type`` [attn_impl] ``"new"`` (default; text not forced, no cap) | ``"old"``.
    * ``kernel``: the attention kernel :func:`attention` reproduces: ``"auto"`` (default: the
      official pairing, ``"new"`` for ``mask_type="new"``, ``"legacy"`` for ``"old"``),
      ``"new"`` (``psa_kernel.py``: tiles of ``tile_n`` lanes, two blocks merged per tile when
      a block has fewer than ``tile_n`` pooled rows) or ``"legacy"`` (``psa_kernel_legacy.py``).
      With ``mask_type="new"`` and the new kernel the levels are the ones the kernel attends:
      the ``i``-th group of the new-format mask at level ``2**i`` (``i < 4``), later groups
      skipped, whatever level the ratio declares (identical for ratios in the order 1, 2, 4,
      8, 0).
    * ``use_sim_mask`` and ``sim_thresholds`` [sim_2x/4x/8x_threshold] (0, 0, -1).
    * ``sample_q``/``sample_k``: sampled rows per block (default ``block/4``, official);
      ``offsets_q``/``offsets_k``: the sampled offsets (int ``[m]`` or ``[B, Hq, m]``), or
      ``None`` to draw them from ``seed`` (the official code draws them on the GPU).
    * ``score_dtype``: round the stored block maxima, ``P`` and the cumulative energy to this
      dtype as the official pipeline does (they have the input dtype, e.g. ``"bfloat16"``);
      ``None`` = float64 throughout.
    """

    grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    text_position: str = "first"
    rearrange: str = "none"
    block_q: int = 128
    block_k: int = 64
    tile_n: int = 32
    mode: str = "topk"
    ratios: Any = DEFAULT_RATIOS
    min_full_attn_ratio: float = 0.06
    mask_type: str = "new"
    kernel: str = "auto"
    use_sim_mask: bool = False
    sim_thresholds: tuple[float, float, float] = (0.0, 0.0, -1.0)
    sample_q: int | None = None
    sample_k: int | None = None
    offsets_q: Any = None
    offsets_k: Any = None
    seed: int = 0
    score_dtype: str | None = None

    def validate(self) -> None:
        for name in ("block_q", "block_k", "tile_n"):
            check_range(name, getattr(self, name), 1, integer=True)
        if self.block_k < self.tile_n:
            raise InputError(f"block_k: must be >= tile_n={self.tile_n} (alignment divides by "
                             f"block_k // tile_n), got {self.block_k}")
        check_range("text_tokens", self.text_tokens, 0, integer=True)
        check_choice("text_position", self.text_position, ("first", "last"))
        check_choice("rearrange", self.rearrange, ("none", "gilbert"))
        check_choice("mode", self.mode, MODES)
        check_choice("mask_type", self.mask_type, ("new", "old"))
        check_choice("kernel", self.kernel, ("auto",) + KERNELS)
        check_choice("score_dtype", self.score_dtype, DTYPES)
        check_range("min_full_attn_ratio", self.min_full_attn_ratio, 0.0, 1.0)
        check_range("seed", self.seed, 0, integer=True)
        ratio_items(self.ratios)
        if self.use_sim_mask and self.mask_type != "old":
            raise InputError("use_sim_mask: the official code supports the similarity cap only "
                             "with mask_type='old' (attn_impl='old_mask_type')")
        if len(tuple(self.sim_thresholds)) != 3:
            raise InputError(f"sim_thresholds: expected 3 numbers (2x, 4x, 8x), got {self.sim_thresholds!r}")
        for name, m, blk in (("sample_q", self.sample_q, self.block_q), ("sample_k", self.sample_k, self.block_k)):
            if m is not None:
                check_range(name, m, 1, blk, integer=True)
        if self.rearrange == "gilbert" and self.grid is None:
            raise InputError("grid: rearrange='gilbert' needs the (T, H, W) video token grid")
        if self.grid is not None:
            VideoGrid.from_params(self.grid, self.text_tokens)


# ------------------------------------------------------------------ importance estimate
def default_offsets(rng: np.random.Generator, batch: int, heads: int, block: int, m: int) -> np.ndarray:
    """int64 ``[B, H, m]``: per (b, h) the top-``m`` of ``block`` i.i.d. uniforms (in top-k
    order), the official ``random_sample_tokens`` draw (there ``torch.rand`` on the GPU)."""
    u = rng.random((batch, heads, block))
    return np.argsort(-u, axis=-1, kind="stable")[..., :m]


def _offsets(off: Any, batch: int, heads: int, block: int, m: int, rng: np.random.Generator,
             name: str) -> np.ndarray:
    if off is None:
        return default_offsets(rng, batch, heads, block, m)
    o = np.asarray(off)
    if o.dtype.kind not in "iu" or o.shape[-1] != m or o.ndim not in (1, 3) or (o < 0).any() or (o >= block).any():
        raise InputError(f"{name}: expected {m} integer offsets in [0, {block}) per block "
                         f"(shape [{m}] or [B, Hq, {m}]), got shape {o.shape}")
    return np.broadcast_to(o.astype(np.int64), (batch, heads, m))


def _replicate_pad(x: np.ndarray, multiple: int) -> np.ndarray:
    pad = -x.shape[-2] % multiple
    return x if not pad else np.concatenate([x, np.repeat(x[..., -1:, :], pad, axis=-2)], axis=-2)


def sampled_importance(q: np.ndarray, k: np.ndarray, block_q: int, block_k: int,
                       offsets_q: np.ndarray, offsets_k: np.ndarray,
                       dtype: str | None = None) -> np.ndarray:
    """PSA's block importance ``P`` float64 ``[B, Hq, Qb, Kb]`` (spec 2(c), steps 1-6).

    q/k replicate-padded to block multiples; sampled rows ``i*block_q + offsets_q[b, h]``,
    columns ``j*block_k + offsets_k[b, h]`` (``[B, Hq, m]``); the sampled key sequence is
    replicate-padded to a multiple of 64 (the kernel's tile), which adds pseudo key blocks
    that enter the row normalisation only. ``x = q.k / sqrt(D)``; ``P[i, j] =
    max_{r in i} exp(max_{c in j} x_rc - m_r)`` with ``m_r`` the row max; ``P[i,:] /= sum``.

    ``dtype`` (e.g. ``"bfloat16"``) emulates the kernel's storage: the block-row maxima (in
    log2 units) are rounded to it before ``exp2``, ``P``, its row sum and the quotient too.
    """
    B, Hq, _, D = q.shape
    G = Hq // k.shape[1]
    qp, kp = _replicate_pad(q, block_q), _replicate_pad(k, block_k)
    nq, nk = qp.shape[2] // block_q, kp.shape[2] // block_k
    mq, mk = offsets_q.shape[-1], offsets_k.shape[-1]
    P = np.empty((B, Hq, nq, nk), np.float64)
    for b in range(B):
        for h in range(Hq):
            rows = (np.arange(nq)[:, None] * block_q + offsets_q[b, h][None, :]).reshape(-1)
            cols = (np.arange(nk)[:, None] * block_k + offsets_k[b, h][None, :]).reshape(-1)
            cols = np.concatenate([cols, np.full(-cols.size % 64, cols[-1])])  # 64-alignment
            x = (qp[b, h, rows].astype(np.float64) @ kp[b, h // G, cols].astype(np.float64).T) / math.sqrt(D)
            m = x.max(axis=1, keepdims=True)
            nb = -(-cols.size // mk)
            xb = np.concatenate([x, np.full((x.shape[0], nb * mk - cols.size), -np.inf)], axis=1)
            bmax = xb.reshape(nq, mq, nb, mk).max(axis=3)                       # [nq, mq, nb]
            if dtype is None:
                pool = np.exp(bmax - m.reshape(nq, mq, 1)).max(axis=1)          # [nq, nb]
                P[b, h] = (pool / pool.sum(axis=1, keepdims=True))[:, :nk]
                continue
            b2 = _round(bmax * LOG2E, dtype)                                    # stored maxima
            pool = _round(np.exp2(b2 - (m * LOG2E).reshape(nq, mq, 1)).max(axis=1), dtype)
            P[b, h] = _round(pool / _round(pool.sum(axis=1, keepdims=True), dtype), dtype)[:, :nk]
    return P


PSA_IMPORTANCE = define_op("psa_sampled_importance", sampled_importance, outputs=("P",), kind="array")


def key_similarity(k: np.ndarray, block_k: int) -> np.ndarray:
    """``calc_k_similarity_pytorch``'s statistics: float64 ``[3, ..., floor(L/block_k)]``,
    the mean cosine similarity of token pairs ``(2t, 2t+1)``, ``(4t, 4t+3)``, ``(8t, 8t+7)``
    within each key block (a ragged tail is dropped, as the official code does)."""
    n = k.shape[-2] // block_k
    kb = k[..., :n * block_k, :].astype(np.float64).reshape(k.shape[:-2] + (n, block_k, k.shape[-1]))
    out = []
    for step in (2, 4, 8):
        a, c = kb[..., 0::step, :], kb[..., step - 1::step, :]
        na, nc = np.linalg.norm(a, axis=-1), np.linalg.norm(c, axis=-1)
        cos = (a * c).sum(-1) / np.maximum(na * nc, 1e-8)                      # torch eps 1e-8
        out.append(cos.mean(axis=-1))
    return np.stack(out)


PSA_KSIM = define_op("psa_key_similarity", key_similarity, outputs=("sim",), kind="array")


def key_similarity_cap(k: np.ndarray, block_k: int, thresholds: tuple[float, float, float], *,
                       backend: str = "numpy") -> np.ndarray:
    """Cap level per key block, int64 ``[..., floor(L/block_k)]``:
    ``max(1, 2[sim2 > t2], 4[sim4 > t4], 8[sim8 > t8])``; the similarities by op
    ``psa_key_similarity`` on ``backend``."""
    s = np.asarray(dispatch(PSA_KSIM.name, backend, (k,))(k, block_k), np.float64)
    caps = [lvl * (s[i] > float(t)) for i, (lvl, t) in enumerate(zip((2, 4, 8), thresholds, strict=True))]
    return np.maximum.reduce([np.ones_like(caps[0])] + caps).astype(np.int64)


# ------------------------------------------------------------------------------ method
@register_method("psa", PsaParams, kind="video",
                 summary="sampled max-pooled block importance -> per-block KV pyramid level "
                         "{1,2,4,8,skip} (topk / thresholdbound), optional Gilbert order",
                 paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: PsaParams, *,
           causal: bool = False, backend: str = "numpy") -> Selection:
    """PSA levels on canonical arrays q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]``.

    Returns a :class:`Selection` on the (reordered, when ``rearrange="gilbert"``) sequence:
    ``mask`` = blocks with a level > 0 (``block_q x block_k`` grid), ``scores`` = ``P``
    (rounded to ``score_dtype``), ``boundary [B, Hq, Qb]`` = the smallest ``P`` kept,
    ``forced`` = text blocks (``mask_type="old"``), ``extras``: ``levels`` int32
    ``[B, Hq, Qb, Kb]``, ``perm`` (or None), ``offsets_q``/``offsets_k``, ``newtype``
    (official new-format mask, ``mask_type="new"``), ``cap`` (similarity cap or None),
    ``kernel`` (``"new"``/``"legacy"``, resolved) and ``tile_n`` (for :func:`attention`),
    ``causal``, ``attention`` (the dotted name of :func:`attention`, for front ends that
    dispatch a selection to its own attention). Run it with :func:`attention` (or
    :func:`refattn.reference.pyramid.pyramid_attention`); plain block-sparse attention on
    ``mask`` ignores the levels. The levels do not depend on ``causal`` (the official
    estimator is non-causal); causal attention skips the future groups.
    """
    p = params
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    perm = None
    if p.grid is not None:
        VideoGrid.from_params(p.grid, p.text_tokens, p.text_position).check_seq_len(Sk, "k_len")
    if p.rearrange == "gilbert":
        if Sq != Sk:
            raise InputError(f"rearrange='gilbert' reorders a self-attention sequence; got q_len {Sq} != k_len {Sk}")
        perm = psa_sequence_order(tuple(p.grid), p.text_tokens, p.text_position)
        q, k = apply_permutation(q, perm, axis=2), apply_permutation(k, perm, axis=2)
    bq, bk = int(p.block_q), int(p.block_k)
    rng = np.random.default_rng(int(p.seed))
    offq = _offsets(p.offsets_q, B, Hq, bq, int(p.sample_q or max(1, bq // 4)), rng, "offsets_q")
    offk = _offsets(p.offsets_k, B, Hq, bk, int(p.sample_k or max(1, bk // 4)), rng, "offsets_k")
    P = np.asarray(dispatch(PSA_IMPORTANCE.name, backend, (q, k))(q, k, bq, bk, offq, offk,
                                                                     p.score_dtype), np.float64)
    kw = dict(block_k=bk, tile_n=int(p.tile_n), min_full_attn_ratio=float(p.min_full_attn_ratio),
              dtype=p.score_dtype)
    old = p.mask_type == "old"
    kernel = p.kernel if p.kernel != "auto" else ("legacy" if old else "new")
    if kernel == "new" and not old:
        levels = new_kernel_levels(P, p.ratios, p.mode, **kw)
    else:
        levels = transfer_levels(P, p.ratios, p.mode, text_tokens=int(p.text_tokens),
                                 force_text=old, **kw)
    cap = None
    if p.use_sim_mask:
        G = Hq // k.shape[1]
        cap = key_similarity_cap(_replicate_pad(k, bk), bk, tuple(p.sim_thresholds),
                                 backend=backend)                                 # [B, Hkv, Kb]
        levels = np.minimum(np.repeat(cap, G, axis=1)[:, :, None, :], levels).astype(np.int32)
    forced = np.zeros(levels.shape, bool)
    if old and p.text_tokens:
        forced[..., levels.shape[-1] - min(levels.shape[-1], -(-int(p.text_tokens) // bk)):] = True
    kept = levels > 0
    with np.errstate(invalid="ignore"):
        boundary = np.where(kept.any(-1), np.where(kept, P, np.inf).min(-1), np.nan)
    geo = dict(block_q=bq, block_k=bk, q_len=Sq, k_len=Sk)
    return Selection(
        mask=BlockMask(kept, **geo), scores=BlockScores(P, **geo), boundary=boundary, forced=forced,
        extras={"levels": levels, "perm": perm, "offsets_q": offq, "offsets_k": offk, "cap": cap,
                "newtype": None if old else newtype_mask(P, p.ratios, p.mode, **kw),
                "kernel": kernel, "tile_n": int(p.tile_n),
                "causal": bool(causal), "attention": f"{__name__}.attention"})


def attention(q: Any, k: Any, v: Any, selection: Selection, *, causal: bool | None = None,
              softmax_scale: float | None = None, layout: str = "bhsd", return_lse: bool = False,
              backend: str = "numpy", kernel: str = "auto") -> Any:
    """PSA's attention: pyramid attention of q/k/v (original token order) at the levels of a
    PSA ``selection`` (reordered and restored when the selection carries a permutation).
    ``causal`` defaults to the flag the selection was made with; ``kernel`` (``"auto"``: the
    selection's, i.e. PSA's ``kernel`` parameter, ``"new"`` by default) and its ``tile_n``
    pick the official kernel reproduced. Returns ``out`` (and ``lse``) in the input layout;
    see :func:`refattn.reference.pyramid.pyramid_attention`."""
    if causal is None:
        causal = bool(selection.extras.get("causal", False))
    return pyramid_attention(q, k, v, selection, causal=causal, softmax_scale=softmax_scale,
                             layout=layout, return_lse=return_lse, backend=backend,
                             kernel=kernel)


__all__ = ["PsaParams", "select", "attention", "pyramid_attention", "sampled_importance",
           "transfer_levels", "newtype_mask", "new_kernel_levels", "level_intervals", "key_similarity",
           "key_similarity_cap", "default_offsets", "pooled_kv"]
