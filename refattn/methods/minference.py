"""MInference vertical-slash (VS) pattern: estimate columns and diagonals from the last queries.

Idea (Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via
Dynamic Sparse Attention", NeurIPS 2024, arXiv 2407.02490, Sec. 3.2 and Alg. 2): many heads
attend to a few fixed key *columns* (vertical lines: sinks, separators) and to fixed
*distances* (slash lines parallel to the diagonal). The last ``last_q`` queries see every
key, so their attention estimates both, per head, at the cost of ``last_q x S`` scores.

Official code: microsoft/MInference@fb56c917f618e8645f1cfc37535afd7424d78f0d,
``minference/modules/minference_forward.py:minference_prefill_kernel`` (inner
``vertical_and_slash_kernel``); the sparse kernel ``minference/ops/
pit_sparse_flash_attention_v2.py`` with ``csrc/vertical_slash_index.cu``.

Rule, per query head ``h`` (kv head ``h // (Hq/Hkv)``), with ``l = min(last_q, Sq)`` and the
estimate rows ``i in [Sq-l, Sq)`` at key positions ``p_i = i + Sk - Sq``::

    P_i = softmax_j( q_i . k_j / sqrt(D) ),  j <= p_i           (causal inside the l x l corner)
    vertical[j] = sum_i P_i[j]                                  (column sums)
    slash[o]    = sum_i P_i[p_i - o],  o = 0 .. Sk-1            (diagonal sums, o = query - key)
    vertical[:force_sink] = +inf;  slash[:force_recent] = +inf  (official: 30 and 100)
    columns   = top-v(vertical), v = min(Sk, max(vertical_size, 30))
    diagonals = top-s(slash),    s = min(Sk, max(slash_size, 50))

The result is a token-level :class:`~refattn.core.vertical_slash.VerticalSlash` (in
``extras["token_mask"]``, which :func:`refattn.attention` runs) and its covering 64x64
:class:`BlockMask` (``mask``). By default the pattern is rendered as the official PIT kernel
computes it (``granularity="kernel"``: each diagonal widened to the 64 keys it crosses in
every 64-row block), which reproduced the official GPU output to fp16 rounding (max abs
error 2e-3, against 0.2-0.4 for the exact pattern); ``granularity="token"`` gives the exact
columns and diagonals.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..core.vertical_slash import GRANULARITIES, VerticalSlash
from ..reference.memory import rows_per_chunk
from ..reference.selection import TIES
from ..reference.selection_backend import topk_per_row
from .base import check_choice, check_range, register_method

MIN_VERTICAL = 30   # official clamp: vertical_size = min(L, max(vertical_size, 30))
MIN_SLASH = 50      # official clamp: slash_size = min(L, max(slash_size, 50))


@dataclass(frozen=True)
class MInferenceParams:
    """MInference VS parameters (official names in brackets).

    * ``vertical_size`` [vertical_size, config entry 2]: columns per head, an int or one per
      query head; default 1000 (the official fallback for heads missing in the config).
    * ``slash_size`` [slash_size, config entry 3]: diagonals per head; default 6096.
    * ``last_q`` [last_q]: estimate queries; default 64.
    * ``force_sink`` [``vertical[..., :30] = inf``]: leading key columns always kept.
    * ``force_recent`` [``slash[..., -100:] = inf``]: nearest diagonals always kept.
    * ``block_size``: grid of the covering ``BlockMask`` (the PIT kernel's 64).
    * ``granularity``: what :func:`refattn.attention` runs. ``"kernel"`` (default): the
      pattern the official PIT kernel computes (diagonals widened to 64-key windows per
      64-row block), which reproduces the official attention output; needs ``Sq == Sk``.
      ``"token"``: exactly the selected columns and diagonals (the paper's pattern).
    * ``tie``: at exact ties ``"low"`` keeps the lower column and, for diagonals, the lower
      index of the official slash array ``idx = Sk-1-o`` (the larger offset), as
      ``torch.topk`` did on CUDA; ``"high"`` the opposite.
    """

    vertical_size: Any = 1000
    slash_size: Any = 6096
    last_q: int = 64
    force_sink: int = 30
    force_recent: int = 100
    block_size: int = 64
    granularity: str = "kernel"
    tie: str = "low"

    def validate(self) -> None:
        check_range("vertical_size", self.vertical_size, 1, integer=True)
        check_range("slash_size", self.slash_size, 1, integer=True)
        for name in ("vertical_size", "slash_size"):
            if np.ndim(getattr(self, name)) > 1:
                raise InputError(f"{name}: expected an int or one int per query head, got "
                                 f"shape {np.shape(getattr(self, name))}")
        check_range("last_q", self.last_q, 1, integer=True)
        check_range("force_sink", self.force_sink, 0, integer=True)
        check_range("force_recent", self.force_recent, 0, integer=True)
        check_range("block_size", self.block_size, 1, integer=True)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("tie", self.tie, TIES)


def minference_score(q: np.ndarray, k: np.ndarray, last_q: int = 64, scale: float | None = None,
                     *, out: tuple[np.ndarray, np.ndarray] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Vertical and slash scores from the last ``last_q`` queries (reference).

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``. Returns ``vertical float64 [B, Hq, Sk]``
    (column sums of the estimate's softmax) and ``slash float64 [B, Hq, Sk]`` (``slash[o]``:
    sum along the diagonal at offset ``o = p_i - j``), written into ``out=`` when given.
    The softmax is over the keys each estimate row may see (bottom-right causal); a row that
    sees no key contributes nothing.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    ell = min(int(last_q), Sq)
    rows_per_chunk(1, ell * Sk * 48, 8 * Sk * D, "minference estimate")
    p = np.arange(Sq - ell, Sq) + (Sk - Sq)                  # key position of each estimate row
    off = p[:, None] - np.arange(Sk)[None, :]                # offset o of (row, key)
    vis = off >= 0                                           # causal inside the last l x l corner
    vert, sl = out if out is not None else (np.empty((B, Hq, Sk)), np.empty((B, Hq, Sk)))
    for b in range(B):
        for h in range(Hq):
            s = (q[b, h, Sq - ell:].astype(np.float64) @ k[b, h // G].astype(np.float64).T) * scale
            s = np.where(vis, s, -np.inf)
            m = s.max(axis=1, keepdims=True)
            e = np.exp(s - np.where(np.isfinite(m), m, 0.0))
            tot = e.sum(axis=1, keepdims=True)
            P = np.where(tot > 0, e / np.where(tot > 0, tot, 1.0), 0.0)   # [l, Sk]
            vert[b, h] = P.sum(axis=0)
            sl[b, h] = np.bincount(off[vis], weights=P[vis], minlength=Sk)
    return vert, sl


define_op("minference_score", minference_score, outputs=("vertical", "slash"), kind="array")


def _per_head(value: Any, heads: int, name: str) -> np.ndarray:
    a = np.asarray(value, dtype=np.int64)
    if a.ndim == 0:
        return np.full(heads, int(a), dtype=np.int64)
    if a.shape != (heads,):
        raise InputError(f"{name}: expected an int or {heads} values (one per query head), "
                         f"got {a.shape[0]} values")
    return a


def _boundary(b: np.ndarray) -> np.ndarray:
    """k-th selected score; ``nan`` where only forced (+inf) entries were selected."""
    return np.where(np.isfinite(b), b, np.nan)


@register_method(
    "minference", MInferenceParams, kind="llm-prefill",
    summary="MInference vertical-slash: top columns and diagonals of the last-64-query "
            "softmax; token-level pattern with a 64x64 covering block mask",
    paper="Jiang et al., MInference 1.0, NeurIPS 2024, arXiv:2407.02490",
    code="microsoft/MInference@fb56c917f618e8645f1cfc37535afd7424d78f0d")
def select(q: np.ndarray, k: np.ndarray, v: Any, params: MInferenceParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """MInference VS selection on canonical arrays (q ``[B,Hq,Sq,D]``, k ``[B,Hkv,Sk,D]``).

    Returns a :class:`Selection`: ``mask`` the covering ``block_size`` BlockMask, ``forced``
    the blocks holding forced columns/diagonals, ``extras``: ``token_mask``
    (:class:`VerticalSlash`), ``vertical`` / ``slash`` (int32 index lists, columns
    ascending, offsets descending, ``-1`` padded) with ``vertical_count`` / ``slash_count``,
    the raw ``vertical_scores`` / ``slash_scores [B,Hq,Sk]``, ``vertical_boundary`` /
    ``slash_boundary [B,Hq]`` (k-th selected score, ``nan`` if only forced entries), and the
    effective ``vertical_size`` / ``slash_size [Hq]``.
    """
    if not causal:
        raise InputError("causal: minference is defined for causal prefill only (its estimate "
                         "and diagonals assume a causal mask); got causal=False")
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    if params.granularity == "kernel" and Sq != Sk:
        raise InputError(f"granularity: 'kernel' (the official PIT kernel) needs q_len == k_len, "
                         f"got {Sq} and {Sk}; use granularity='token'")
    vsz = np.clip(_per_head(params.vertical_size, Hq, "vertical_size"), MIN_VERTICAL, None)
    ssz = np.clip(_per_head(params.slash_size, Hq, "slash_size"), MIN_SLASH, None)
    vsz, ssz = np.minimum(vsz, Sk), np.minimum(ssz, Sk)
    score = dispatch("minference_score", backend, (q, k))
    vert, sl = score(q, k, int(params.last_q), None)
    vert, sl = np.asarray(vert, dtype=np.float64), np.asarray(sl, dtype=np.float64)

    # Forcing as the official code does: +inf before top-k (first columns, nearest diagonals).
    fv = np.zeros(Sk, dtype=bool)
    fv[: params.force_sink] = True
    fs = np.zeros(Sk, dtype=bool)
    fs[: params.force_recent] = True
    vmask, vb = topk_per_row(np.where(fv, np.inf, vert), np.broadcast_to(vsz, (B, Hq)),
                             tie=params.tie, backend=backend)
    # Diagonals are ranked on the official array, index idx = Sk-1-o: ties (e.g. among forced
    # +inf when slash_size < force_recent) go to the lower idx, i.e. the larger offset, as
    # torch.topk did on CUDA for the official code.
    smask, sb = topk_per_row(np.where(fs, np.inf, sl)[..., ::-1], np.broadcast_to(ssz, (B, Hq)),
                             tie=params.tie, backend=backend)
    smask = smask[..., ::-1]

    pattern = VerticalSlash(vmask, smask, q_len=Sq, k_len=Sk, granularity=params.granularity)
    forced = VerticalSlash(vmask & fv, smask & fs, q_len=Sq, k_len=Sk)
    bs = int(params.block_size)
    mask = pattern.covering_blockmask(bs, bs, causal=True)
    vi, vc, si, sc = pattern.to_indices()
    return Selection(
        mask=mask, scores=None, boundary=None,
        forced=forced.covering_blockmask(bs, bs, causal=True).mask & mask.mask,
        extras={"token_mask": pattern, "vertical": vi, "vertical_count": vc, "slash": si,
                "slash_count": sc, "vertical_scores": vert, "slash_scores": sl,
                "vertical_boundary": _boundary(vb), "slash_boundary": _boundary(sb),
                "vertical_size": vsz, "slash_size": ssz})
