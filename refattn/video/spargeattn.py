"""SpargeAttn stage one: self-similarity-gated, CDF-thresholded block selection (NumPy reference).

Paper: Zhang et al., "SpargeAttn: Accurate Sparse Attention Accelerating Any Model Inference",
arXiv 2502.18137 (ICML 2025). Official code: thu-ml/SpargeAttn @
bfd980b781784c04ad6a53e7ee657c0645d99171 -- ``spas_sage_attn/utils.py``
(``get_block_map_meansim_fuse_quant``, ``triton_bmm_pool_sim_simmean_fuse_quant``,
``fill_block_map_triton``, ``fill_causal_mask_triton``) called by ``spas_sage_attn/core.py``
(``spas_sage2_attn_meansim_cuda``, ``spas_sage2_attn_meansim_topk_cuda``); spec
``video-kv.md`` section 5.4.

Per head ``h`` (per-head hyper-parameters), query blocks of ``block_q`` and key blocks of
``block_k`` rows:

1. Keys are mean-centred when ``smooth_k`` (``k - mean_L(k)``, the fused kernel's ``km``);
   queries never are.
2. Per block ``x`` of ``n`` rows: ``pool = (1/n) sum_a x_a`` and the self-similarity
   ``sim = (1/n^2) sum_{a,b} cos(x_a, x_b)``; ``flag = sim > simthreshd1[h]``. The official
   kernel loads the missing rows of a partial last block as zeros, whose norm 0 gives
   ``0/0 = NaN`` and ``NaN > thr == False``: partial blocks and blocks with a zero row are
   never self-similar. Here ``sim = -inf`` stands for that NaN.
3. ``S = pool_q pool_k^T D^-1/2``; ``S[:, j] = -inf`` for non-self-similar key blocks (and
   for causally invisible blocks: key block ``j`` is visible from query block ``i`` iff
   ``j * block_k < (i + 1) * block_q``); ``P = softmax_j(S)``.
4. Sort ``P`` descending; ``cdf = cumsum``; ``n_sel = #{cdf <= cdfthreshd[h]}``
   (``searchsorted(right=True)``: the crossing block is *not* kept); ``n_sel = 1`` if 0.
   Top-k variant: ``n_sel = int(float32(topk[h]) * Kb)``, at least 1.
   ``cdf_precision="official"`` (default) runs steps 3-4 as the official code does for
   fp32/fp16/bf16 inputs: ``S`` and ``P`` in the half dtype (fp16, or bf16 for bf16 inputs)
   and PyTorch's CUDA ``cumsum`` emulated partial sum by partial sum (``_half_scan``);
   ``"exact"`` computes them in float64.
5. ``map = top n_sel blocks | every column of a non-self-similar key block | every row of a
   non-self-similar query block``; causal: ``& visible``; ``attention_sink``: column 0 on.

Stage two (the in-kernel ``P V`` skip with ``pvthreshd``) is not modelled: at the default 50
it only drops blocks whose weights are below ~e^-50, i.e. it does not change the output
beyond rounding (spec 5.4). Ties: the lower block index wins (PyTorch's CUDA sort is stable
for more than 32 key blocks). Pooling and self-similarity are float64 (official: fp16
normalised rows in the Gram MMA, fp32 pooling), the pooled means rounded to the input dtype
as the official ``pool`` tensors are; with ``cdf_precision="exact"`` (or float64 inputs)
steps 3-4 are float64 too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask, legal_blocks, num_blocks
from ..core.errors import InputError
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..core.video_grid import TEXT_POSITIONS, VideoGrid
from ..methods.base import check_choice, check_range, register_method
from ..reference.selection import rank_order
from . import _half_scan

PAPER = ("Zhang et al., SpargeAttn: Accurate Sparse Attention Accelerating Any Model "
         "Inference, arXiv 2502.18137")
CODE = "thu-ml/SpargeAttn@bfd980b781784c04ad6a53e7ee657c0645d99171"
CDF_PRECISIONS = ("official", "exact")


def _tuple(x: Any) -> Any:
    if isinstance(x, (list, tuple, np.ndarray)):
        return tuple(float(v) for v in np.asarray(x).reshape(-1))
    return x


@dataclass(frozen=True)
class SpargeAttnParams:
    """SpargeAttn stage-one parameters (official names).

    * ``block_q``, ``block_k`` [BLKQ, BLKK]: 128 / 64 (every arch but sm90, which uses 64 / 128).
    * ``simthreshd1``: self-similarity threshold, scalar or one per query head (0.6;
      the top-k API defaults to -0.1).
    * ``cdfthreshd``: CDF threshold tau, scalar or per head (0.98); exactly one of
      ``cdfthreshd`` / ``topk`` is set (``topk`` = fraction of key blocks, top-k API 0.5).
    * ``smooth_k``: mean-centre the keys before pooling/similarity (True).
    * ``attention_sink``: force key block 0 (False).
    * ``cdf_precision``: ``"official"`` (default) computes ``S``, ``P = softmax(S)``, the
      sorted cumulative sum and the ``searchsorted`` as the official torch code does for
      fp32/fp16/bf16 inputs, in the half dtype with PyTorch's CUDA scan order; ``"exact"``
      does them in float64 (the paper's rule). Float64 inputs always take ``"exact"``.
    * ``grid``, ``text_tokens``, ``text_position``: the video layout shared by the video
      methods. SpargeAttn is layout-agnostic (the official code knows no grid or text); they
      only check the sequence length when ``grid`` is given.

    Per-head values are rounded to float32, as ``hyperparameter_check`` builds them.
    """

    block_q: int = 128
    block_k: int = 64
    simthreshd1: float | tuple[float, ...] = 0.6
    cdfthreshd: float | tuple[float, ...] | None = 0.98
    topk: float | tuple[float, ...] | None = None
    smooth_k: bool = True
    attention_sink: bool = False
    cdf_precision: str = "official"
    grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    text_position: str = "last"

    def __post_init__(self) -> None:
        for name in ("simthreshd1", "cdfthreshd", "topk"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))

    def validate(self) -> None:
        check_range("block_q", self.block_q, 1, integer=True)
        check_range("block_k", self.block_k, 1, integer=True)
        check_range("simthreshd1", self.simthreshd1)
        if (self.cdfthreshd is None) == (self.topk is None):
            raise InputError(f"cdfthreshd/topk: exactly one must be set (official assert), got "
                             f"cdfthreshd={self.cdfthreshd!r}, topk={self.topk!r} (for top-k pass cdfthreshd=None)")
        if self.cdfthreshd is not None:
            check_range("cdfthreshd", self.cdfthreshd, 0.0, 1.0)
        if self.topk is not None:
            check_range("topk", self.topk, 0.0, 1.0)
        for name in ("smooth_k", "attention_sink"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise InputError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        check_choice("cdf_precision", self.cdf_precision, CDF_PRECISIONS)
        check_range("text_tokens", self.text_tokens, 0, integer=True)
        check_choice("text_position", self.text_position, TEXT_POSITIONS)
        if self.grid is not None:
            VideoGrid.from_params(self.grid, int(self.text_tokens), self.text_position)


def per_head(value: Any, heads: int, name: str) -> np.ndarray:
    """A scalar or one value per query head, as float32 -> float64 ``[H]``."""
    a = np.asarray(value, np.float32).reshape(-1)
    if a.size == 1:
        a = np.repeat(a, heads)
    if a.size != heads:
        raise InputError(f"{name}: expected a scalar or {heads} values (one per query head), "
                         f"got {a.size}")
    return a.astype(np.float64)


# ------------------------------------------------------------------------------- scoring
def spargeattn_pool(x: np.ndarray, block_size: int, center: bool, *,
                    out: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Block means and mean pairwise cosine similarity (``triton_bmm_pool_sim_simmean*``).

    x ``[B, H, S, D]``; with ``center`` rows are ``x - mean_S(x)`` first. For block ``c`` of
    ``n`` real rows (the last block may be partial)::

        pool[c] = (1/n) sum_a x_a
        sim[c]  = (1/n^2) sum_{a,b} <x_a, x_b> / (|x_a| |x_b|)

    ``sim = -inf`` for a partial block or a block with a zero row (the official NaN, never
    above any threshold). Returns ``pool`` float64 ``[B, H, nb, D]`` and ``sim`` float64
    ``[B, H, nb]``.
    """
    Bn, H, S, D = x.shape
    bs = int(block_size)
    nb = num_blocks(S, bs)
    pool, sim = (np.empty((Bn, H, nb, D)), np.empty((Bn, H, nb))) if out is None else out
    for b in range(Bn):
        for h in range(H):
            xx = x[b, h].astype(np.float64)
            if center:
                xx = xx - xx.mean(axis=0)
            for c in range(nb):
                blk = xx[c * bs:(c + 1) * bs]
                n = blk.shape[0]
                pool[b, h, c] = blk.sum(axis=0) / n
                norm = np.sqrt((blk * blk).sum(axis=1))
                if n < bs or (norm == 0).any():
                    sim[b, h, c] = -np.inf
                    continue
                u = blk / norm[:, None]
                sim[b, h, c] = (u @ u.T).sum() / (n * n)               # Gram mean
    return pool, sim


def spargeattn_map(pq: np.ndarray, pk: np.ndarray, allowed: np.ndarray, scale: float, *,
                   out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Compressed attention map ``P = softmax_j(S)`` over the allowed key blocks.

    ``pq [B, Hq, Qb, D]``, ``pk [B, Hkv, Kb, D]`` (GQA: head ``h`` reads ``h // (Hq/Hkv)``),
    ``allowed`` bool ``[B, Hq, Qb, Kb]``; ``S = scale * pq pk^T`` with ``-inf`` where not
    allowed. A row with no allowed block is 0 (the official NaN row; every block of it is
    selected anyway). Returns ``(P,)`` float64 ``[B, Hq, Qb, Kb]``.
    """
    Bn, Hq = pq.shape[:2]
    G = Hq // pk.shape[1]
    P = np.empty(allowed.shape, np.float64) if out is None else out[0]
    for b in range(Bn):
        for h in range(Hq):
            s = (pq[b, h].astype(np.float64) @ pk[b, h // G].astype(np.float64).T) * scale
            s = np.where(allowed[b, h], s, -np.inf)
            m = s.max(axis=1, keepdims=True)
            ok = np.isfinite(m)
            e = np.where(allowed[b, h], np.exp(s - np.where(ok, m, 0.0)), 0.0)
            den = e.sum(axis=1, keepdims=True)
            P[b, h] = np.where(ok, e / np.where(ok, den, 1.0), 0.0)
    return (P,)


SPARGE_POOL = define_op("spargeattn_pool", spargeattn_pool, outputs=("pool", "sim"), kind="array")
SPARGE_MAP = define_op("spargeattn_map", spargeattn_map, outputs=("P",), kind="array")


def _as_input_dtype(x: np.ndarray, dtype: Any) -> np.ndarray:
    """Round float64 ``x`` to ``dtype`` (the official pooled tensors have the input dtype)."""
    return x if dtype == np.float64 else x.astype(dtype).astype(np.float64)


# ----------------------------------------------------------------------------- selection
def cdf_count(P: np.ndarray, tau: np.ndarray, topk: np.ndarray | None) -> np.ndarray:
    """``n_sel`` per row ``[B, H, Qb]`` (before the ``max(., 1)``): ``#{cdf <= tau[h]}`` of the
    descending cumulative sum, or ``int(float32(topk[h]) * Kb)``."""
    Bn, H, Qb, Kb = P.shape
    if topk is not None:
        n = (topk.astype(np.float32) * np.float32(Kb)).astype(np.int64)
        return np.broadcast_to(n[None, :, None], (Bn, H, Qb)).copy()
    order = rank_order(P)
    cdf = np.cumsum(np.take_along_axis(P, order, axis=-1), axis=-1)
    return (cdf <= tau[None, :, None, None]).sum(axis=-1)


def half_map(pq: np.ndarray, pk: np.ndarray, allowed: np.ndarray, head_dim: int,
             dtype: Any) -> np.ndarray:
    """The official ``P`` in the half ``dtype`` (float64 ``[B, Hq, Qb, Kb]`` of its values).

    ``pooled_q @ pooled_k^T`` is a half GEMM (fp32 accumulation, rounded to ``dtype``; here
    the float64 dot product rounded once); ``* D**-0.5`` multiplies in float32 by the scalar
    as float32 and rounds to ``dtype``; ``-inf`` where not allowed; ``softmax(-1)`` computes
    in float32 and rounds its output to ``dtype`` (here float64, rounded once). A row whose
    softmax is NaN officially (nothing allowed, or an overflowed score) is 0: every block of
    it is selected either way.
    """
    G = pq.shape[1] // pk.shape[1]
    kk = np.repeat(pk, G, axis=1) if G > 1 else pk
    s = _half_scan.to_half(pq @ np.swapaxes(kk, -1, -2), dtype)
    s = _half_scan.to_half(s * np.float32(head_dim ** -0.5), dtype).astype(np.float64)
    s = np.where(allowed, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    ok = np.isfinite(m)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.where(allowed, np.exp(s - np.where(ok, m, 0.0)), 0.0)
        P = np.where(ok, e / np.where(ok, e.sum(axis=-1, keepdims=True), 1.0), 0.0)
    return _half_scan.to_half(P, dtype).astype(np.float64)


def cdf_count_half(P: np.ndarray, tau: np.ndarray, topk: np.ndarray | None,
                   dtype: Any) -> np.ndarray:
    """:func:`cdf_count` as the official torch ops run it on a half ``P`` (values of
    ``dtype``): ``torch.sort`` descending, ``torch.cumsum`` on CUDA (every partial sum
    rounded to ``dtype``, PyTorch's summation tree over the whole ``[B, H, Qb, Kb]`` tensor),
    ``torch.searchsorted(cdf, float32 tau, right=True)`` (compared in float32)."""
    if topk is not None:
        return cdf_count(P, None, topk)
    vals = -np.sort(-P, axis=-1)
    cdf = _half_scan.cumsum_cuda(vals.astype(np.float32), dtype)
    t = np.broadcast_to(tau.astype(np.float32)[None, :, None], P.shape[:3])
    return _half_scan.searchsorted_right(cdf, t)


def fill_map(P: np.ndarray, n_sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The top ``max(n_sel, 1)`` blocks of every row by ``P`` (ties: lower index) and the
    boundary (the smallest selected ``P``)."""
    order = rank_order(P)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(P.shape[-1]), P.shape), axis=-1)
    sel = rank < np.maximum(n_sel, 1)[..., None]
    bnd = np.where(sel, P, np.inf).min(axis=-1)
    return sel, bnd


@register_method(
    "spargeattn", SpargeAttnParams, kind="video",
    summary="mean-pooled q.k softmax over self-similar key blocks, per-row CDF <= tau "
            "(crossing block excluded) or top-k; non-self-similar q/k blocks dense",
    paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: SpargeAttnParams, *,
           causal: bool = False, backend: str = "numpy") -> Selection:
    """SpargeAttn stage one on canonical arrays q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``.

    Returns a :class:`Selection`: ``mask [B, Hq, Qb, Kb]`` (``block_q x block_k``),
    ``scores`` = ``P`` (the compressed map), ``boundary [B, Hq, Qb]`` (smallest ``P`` kept by
    the CDF/top-k rule), ``forced`` (non-self-similar rows/columns, sink); ``extras``:
    ``sim_q [B, Hq, Qb]``, ``sim_k [B, Hkv, Kb]``, ``q_similar``, ``k_similar``
    (``[B, Hq, *]`` flags), ``num_selected [B, Hq, Qb]`` (``n_sel`` before ``max(., 1)``),
    ``pooled_q``, ``pooled_k``. With ``cdf_precision="official"`` and fp32/fp16/bf16 inputs
    ``P`` holds the half-precision values the official code sorts (computed on the host
    from the pooled means; the ``spargeattn_map`` op is the float64 ``"exact"`` path).
    """
    p = params
    Bn, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    if causal and Sq != Sk:
        raise InputError(f"causal: the official block-causal mask assumes q_len == k_len, got "
                         f"q_len={Sq}, k_len={Sk}")
    if p.grid is not None:
        g = VideoGrid.from_params(p.grid, int(p.text_tokens), p.text_position)
        g.check_seq_len(Sq, "q_len")
        g.check_seq_len(Sk, "k_len")
    bq, bk = int(p.block_q), int(p.block_k)
    thr = per_head(p.simthreshd1, Hq, "simthreshd1")
    tau = None if p.cdfthreshd is None else per_head(p.cdfthreshd, Hq, "cdfthreshd")
    topk = None if p.topk is None else per_head(p.topk, Hq, "topk")
    # the official entry point casts fp32 (and fp16) q/k to fp16, so everything downstream,
    # the pooled means included, is fp16 for float32 inputs (core.py, spas_sage2_attn_*)
    if q.dtype == np.float32 or k.dtype == np.float32:
        q = q.astype(np.float16).astype(np.float32)          # fp16 values, fp32 storage
        k = k.astype(np.float16).astype(np.float32)
        work_q = work_k = np.float16
    else:
        work_q, work_k = q.dtype, k.dtype
    pool = dispatch(SPARGE_POOL.name, backend, (q, k))
    pq, sim_q = (np.asarray(a, np.float64) for a in pool(q, bq, False))
    pk, sim_k = (np.asarray(a, np.float64) for a in pool(k, bk, bool(p.smooth_k)))
    pq, pk = _as_input_dtype(pq, work_q), _as_input_dtype(pk, work_k)
    G = Hq // k.shape[1]
    q_ok = sim_q > thr[None, :, None]                                   # [B, Hq, Qb]
    k_ok = sim_k[:, np.arange(Hq) // G] > thr[None, :, None]            # [B, Hq, Kb]
    legal = legal_blocks(Sq, Sk, bq, bk, causal)
    allowed = k_ok[:, :, None, :] & legal
    half = _half_scan.half_dtype(work_q) if p.cdf_precision == "official" else None
    if half is None:
        (P,) = dispatch(SPARGE_MAP.name, backend, (q, k))(pq, pk, allowed, 1.0 / math.sqrt(D))
        P = np.asarray(P, np.float64)
        n_sel = cdf_count(P, tau, topk)
    else:                  # the official half pipeline (cheap: Qb x Kb per head, host-side)
        P = half_map(pq, pk, allowed, D, half)
        n_sel = cdf_count_half(P, tau, topk, half)
    sel, _ = fill_map(P, n_sel)
    forced = ((~k_ok[:, :, None, :]) | (~q_ok[..., None])) & legal
    if p.attention_sink:
        forced[..., 0] = True
    mask = (sel & legal) | forced
    with np.errstate(invalid="ignore"):
        boundary = np.where(sel & legal, P, np.inf).min(axis=-1)
    boundary = np.where((sel & legal).any(-1), boundary, np.nan)
    geo = dict(block_q=bq, block_k=bk, q_len=Sq, k_len=Sk)
    return Selection(
        mask=BlockMask(mask, **geo),
        scores=BlockScores(P, **geo),
        boundary=boundary,
        forced=forced,
        extras={"sim_q": sim_q, "sim_k": sim_k, "q_similar": q_ok, "k_similar": k_ok,
                "num_selected": n_sel, "pooled_q": pq, "pooled_k": pk})
