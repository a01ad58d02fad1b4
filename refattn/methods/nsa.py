"""NSA -- Native Sparse Attention (DeepSeek): the selection branch's block choice.

Paper: Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse
Attention", arXiv 2502.11089, section 3.3 (spec ``llm-prefill.md`` section 8.3). DeepSeek
released no code; this module follows the paper, with the assumptions below stated.

NSA is a *trainable* architecture with three gated branches (compressed, selected, sliding
window). This module reproduces how the **selection branch picks its blocks**; the
compressed and sliding-window attentions are separate branches and are not part of the mask.

Per query token at key position ``p = t + Sk - Sq`` (bottom-right), kv head ``g``:

1. Compression (paper eq. 7, learned MLP ``phi`` **replaced by mean pooling**): compression
   block ``i`` covers keys ``[i d, i d + l)``, ``i = 0 .. floor((Sk - l)/d)`` (complete
   windows only); ``kc_i = mean(K[i d : i d + l])``.
2. Compressed attention (eq. 8): ``p_cmp = softmax(scale * q_t . kc_i)`` over the
   compression blocks the token has fully seen (``i d + l - 1 <= p``); ``scale = 1/sqrt(D)``.
   A token that has seen no complete compression block has ``p_cmp = 0``.
3. Selection-block importance (eq. 9): selection block ``j`` covers ``[j l', (j+1) l')``
   (the last one may be partial) and ``p_slc[j] = sum_i p_cmp[i] * |[i d, i d + l) n
   [j l', (j+1) l')| / d`` -- each compression block counts once per stride of overlap.
   For ``l = 32, d = 16, l' = 64`` that is ``i = 4j-1 .. 4j+3`` with weights ``1,2,2,2,1``:
   the multiplicities of the paper's double sum, placed on the blocks that geometrically
   overlap ``j`` (the printed index ``(l'/d) j - m - n`` runs backwards; reimplementations
   differ, spec 8.3).
4. GQA (eq. 10): ``p_slc`` is summed over the query heads of the group, so the heads of a
   group share one selection (the mask's heads are kv heads, ``head_kind="kv"``).
5. Selection (eq. 11): ``n = topk`` blocks in all, **including** ``force_sink`` initial
   blocks and ``force_recent`` local blocks (the token's own block and the ones before it);
   the rest are the best remaining visible blocks by ``p_slc`` (ties: ``tie``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.blockmask import BlockMask, num_blocks
from ..core.errors import InputError
from ..core.layout import array_module
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..reference.memory import rows_per_chunk
from ..reference.selection import TIES
from ..reference.selection_backend import topk_per_row
from .base import check_choice, check_range, register_method

PAPER = ("Yuan et al., Native Sparse Attention: Hardware-Aligned and Natively Trainable "
         "Sparse Attention, arXiv 2502.11089")
CODE = "none (paper only; DeepSeek released no official code)"


@dataclass(frozen=True)
class NsaParams:
    """NSA selection-branch parameters (paper symbols in brackets; defaults from section 4).

    * ``compress_size`` [``l``]: compression block length, 32.
    * ``stride`` [``d``]: compression stride, 16 (``d`` divides ``l`` and ``l'``).
    * ``block_size`` [``l'``]: selection block length, 64.
    * ``topk`` [``n``]: selected blocks per query token, 16, forced blocks included.
    * ``force_sink``: initial blocks always selected, 1.
    * ``force_recent``: local blocks (own block and those before it) always selected, 2.
    * ``tie``: ``"low"`` or ``"high"`` block index first among equal scores.
    """

    compress_size: int = 32
    stride: int = 16
    block_size: int = 64
    topk: int = 16
    force_sink: int = 1
    force_recent: int = 2
    tie: str = "low"

    def validate(self) -> None:
        check_range("compress_size", self.compress_size, 1, integer=True)
        check_range("stride", self.stride, 1, integer=True)
        check_range("block_size", self.block_size, 1, integer=True)
        check_range("topk", self.topk, 1, integer=True)
        check_range("force_sink", self.force_sink, 0, integer=True)
        check_range("force_recent", self.force_recent, 0, integer=True)
        check_choice("tie", self.tie, TIES)
        if self.compress_size % self.stride:
            raise InputError(f"compress_size: must be a multiple of stride = {self.stride} "
                             f"(paper: d | l), got {self.compress_size}")
        if self.block_size % self.stride:
            raise InputError(f"block_size: must be a multiple of stride = {self.stride} "
                             f"(paper: d | l'), got {self.block_size}")
        if self.force_sink + self.force_recent > self.topk:
            raise InputError(f"topk: must be >= force_sink + force_recent = "
                             f"{self.force_sink + self.force_recent} (forced blocks count "
                             f"inside the top n), got {self.topk}")


# ----------------------------------------------------------------------- scoring
def compressed_keys(k: np.ndarray, compress_size: int, stride: int) -> np.ndarray:
    """Mean-pooled compression tokens, float64 ``[B, Hkv, Nc, D]``,
    ``Nc = floor((Sk - l)/d) + 1`` (0 when ``Sk < l``): ``kc_i = mean(K[i d : i d + l])``."""
    B, H, S, D = k.shape
    if S < compress_size:
        return np.zeros((B, H, 0, D))
    windows = np.lib.stride_tricks.sliding_window_view(k, compress_size, axis=2)  # [B,H,S-l+1,D,l]
    return windows[:, :, ::stride].astype(np.float64).mean(axis=-1)


def overlap_weights(k_len: int, compress_size: int, stride: int, block_size: int) -> np.ndarray:
    """``W[i, j] = |[i d, i d + l) n [j l', (j+1) l')| / d``: float64 ``[Nc, Kb]``."""
    nc = (k_len - compress_size) // stride + 1 if k_len >= compress_size else 0
    cs = np.arange(nc) * stride
    bs = np.arange(num_blocks(k_len, block_size)) * block_size
    lo = np.maximum(cs[:, None], bs[None, :])
    hi = np.minimum(cs[:, None] + compress_size, np.minimum(bs + block_size, k_len)[None, :])
    return np.clip(hi - lo, 0, None) / stride


def spread_to_blocks(p_cmp: np.ndarray, k_len: int, compress_size: int, stride: int,
                     block_size: int) -> np.ndarray:
    """Equation 9: ``p_slc[..., j] = sum_i p_cmp[..., i] * W[i, j]`` with ``W`` of
    :func:`overlap_weights`, computed without the dense ``W``.

    Compression block ``i`` is cut into its ``l/d`` stride-long pieces ``s = i .. i+l/d-1``
    (piece ``s`` covers keys ``[s d, (s+1) d)``); each piece lies inside selection block
    ``s d // l'`` because ``d`` divides ``l'``. ``p_cmp [..., Nc]`` -> ``[..., Kb]``.
    """
    nc = p_cmp.shape[-1]
    per_c, per_s = compress_size // stride, block_size // stride
    kb = num_blocks(k_len, block_size)
    pieces = np.zeros(p_cmp.shape[:-1] + (kb * per_s,), np.float64)
    for m in range(per_c):                                  # piece m of every block i
        pieces[..., m:m + nc] += p_cmp
    return pieces.reshape(p_cmp.shape[:-1] + (kb, per_s)).sum(axis=-1)


def nsa_scores(q: np.ndarray, k: np.ndarray, compress_size: int, stride: int, block_size: int,
               causal: bool, *, out: tuple[np.ndarray, np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Selection-block importance of NSA with mean-pooled compression.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``. Returns ``p_slc float64 [B, Hkv, Sq, Kb]``
    (summed over each GQA group, ``Kb = ceil(Sk / block_size)``) and ``p_cmp float64
    [B, Hq, Sq, Nc]`` (compressed attention probabilities; 0 on compression blocks a token
    has not fully seen when ``causal``).
    """
    Bn, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kc = compressed_keys(k, compress_size, stride)                       # [B, Hkv, Nc, D]
    nc, kb = kc.shape[2], num_blocks(Sk, block_size)
    if out is None:
        p_slc = np.empty((Bn, Hkv, Sq, kb), np.float64)
        p_cmp = np.empty((Bn, Hq, Sq, nc), np.float64)
    else:
        p_slc, p_cmp = out
    scale = 1.0 / np.sqrt(D)
    pos = np.arange(Sq) + (Sk - Sq)
    ends = np.arange(nc) * stride + compress_size - 1                    # last key of block i
    R = rows_per_chunk(Sq, 8 * G * (D + 3 * nc + 2 * kb + Sk // stride),
                       8 * (p_slc.size + p_cmp.size + kc.size),
                       "nsa scores")
    for b in range(Bn):
        for g in range(Hkv):
            h0, h1 = g * G, (g + 1) * G
            for r0 in range(0, Sq, R):
                r1 = min(r0 + R, Sq)
                logits = scale * (q[b, h0:h1, r0:r1].astype(np.float64) @ kc[b, g].T)
                if causal:
                    seen = ends[None, :] <= pos[r0:r1, None]              # [R, Nc]
                    logits = np.where(seen, logits, -np.inf)
                m = logits.max(axis=-1, keepdims=True) if nc else np.zeros(logits.shape[:-1] + (1,))
                none = ~np.isfinite(m)                                    # nothing seen yet
                e = np.exp(logits - np.where(none, 0.0, m))
                tot = e.sum(axis=-1, keepdims=True)
                p = np.where(none, 0.0, e / np.where(none, 1.0, tot))     # [G, R, Nc]
                p_cmp[b, h0:h1, r0:r1] = p
                p_slc[b, g, r0:r1] = spread_to_blocks(                  # eq. 9, then eq. 10:
                    p, Sk, compress_size, stride, block_size).sum(axis=0)  # sum over the group
    return p_slc, p_cmp


NSA_SCORE = define_op("nsa_score", nsa_scores, outputs=("p_slc", "p_cmp"), kind="array")


# -------------------------------------------------------------------- selection
@register_method("nsa", NsaParams, kind="llm-prefill",
                 summary="NSA selection branch: compressed-attention mass on 64-token blocks, "
                         "GQA-summed; top-16 incl. 1 initial + 2 local (mean-pool compressor)",
                 paper=PAPER, code=CODE, device=True)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: NsaParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """NSA block selection on canonical arrays q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``.

    Returns a :class:`Selection` whose ``mask`` is ``[B, Hkv, Sq, Kb]`` with
    ``head_kind="kv"`` (shared by a GQA group), ``block_q = 1``, ``block_k = block_size``;
    ``scores`` the group-summed ``p_slc`` (``-inf`` on blocks the token cannot see);
    ``boundary [B, Hkv, Sq]``; ``forced`` the initial and local blocks; ``extras["p_cmp"]``.
    """
    L = int(params.block_size)
    Sq, Sk = q.shape[2], k.shape[2]
    p_slc, p_cmp = dispatch(NSA_SCORE.name, backend, (q, k))(
        q, k, int(params.compress_size), int(params.stride), L, bool(causal))
    kb = p_slc.shape[-1]
    j = np.arange(kb)
    pos = np.arange(Sq) + (Sk - Sq)
    own = np.where(pos >= 0, pos // L, -1)                                # [Sq]
    if causal:
        visible = j[None, :] <= own[:, None]                              # [Sq, Kb]
    else:
        visible = np.ones((Sq, kb), bool)
    forced = np.broadcast_to(j[None, :] < int(params.force_sink), (Sq, kb)).copy()
    forced |= (j[None, :] <= own[:, None]) & (j[None, :] > own[:, None] - int(params.force_recent))
    forced &= visible
    k_rank = np.maximum(int(params.topk) - forced.sum(axis=-1), 0)        # [Sq]
    xp = array_module(p_slc)    # the [Sq, Kb] geometry masks go where the scores live
    forced_x, visible_x = xp.asarray(forced), xp.asarray(visible)
    sel, boundary = topk_per_row(p_slc, xp.asarray(k_rank), valid=visible_x & ~forced_x,
                                 tie=params.tie, backend=backend)
    mask = sel | forced_x
    geo = dict(block_q=1, block_k=L, q_len=Sq, k_len=Sk, head_kind="kv")
    return Selection(
        mask=BlockMask(mask, **geo),
        scores=BlockScores(xp.where(visible_x, p_slc, -np.inf), **geo),
        boundary=boundary,
        forced=xp.broadcast_to(forced_x, mask.shape),
        extras={"p_cmp": p_cmp},
    )
