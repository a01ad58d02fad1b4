"""Metrics of a mask against dense attention: density, recall, output error, FLOPs.

* density: selected legal blocks / legal blocks (:meth:`BlockMask.density`).
* recall: share of the exact softmax mass the mask keeps, per query row:
  ``recall_i = sum_{j kept} p_ij = exp(lse_masked_i - lse_dense_i)`` (both LSEs from the
  same logits), 0 for a row the mask empties; rows with no visible key at all are excluded.
* output error: ``||O_masked - O_dense||_F / ||O_dense||_F`` per head and overall.
* FLOPs: ``2 (D + Dv)`` per visible (query, key) pair (QK^T and PV); dense counts every
  visible pair, masked the visible pairs inside selected blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask, prepare_mask
from ..core.layout import AttnShape, causal_offset
from .attention import attention_forward


def visible_pairs(q_len: int, k_len: int, causal: bool) -> int:
    """Number of (query, key) pairs visible without a mask."""
    if not causal:
        return q_len * k_len
    off = causal_offset(q_len, k_len)
    per_row = np.clip(np.arange(q_len) + off + 1, 0, k_len)
    return int(per_row.sum())


def masked_pairs(mask: Any, causal: bool, shape: AttnShape) -> np.ndarray:
    """Visible pairs inside the mask, per (b, h): int64 ``[B, Hq]``."""
    mask = prepare_mask(mask, shape)
    out = np.zeros((shape.batch, shape.q_heads), np.int64)
    if isinstance(mask, BlockMask):
        # pairs per block (I, J): rows of I times keys of J, less the causally hidden ones
        qs = np.arange(mask.num_q_blocks) * mask.block_q
        qe = np.minimum(qs + mask.block_q, shape.q_len)
        ks = np.arange(mask.num_k_blocks) * mask.block_k
        ke = np.minimum(ks + mask.block_k, shape.k_len)
        if causal:
            off = causal_offset(shape.q_len, shape.k_len)
            rows = np.arange(shape.q_len)
            lim = np.clip(rows + off + 1, 0, shape.k_len)                       # keys < lim visible
            pair = np.zeros((mask.num_q_blocks, mask.num_k_blocks), np.int64)
            for I in range(mask.num_q_blocks):
                l = lim[qs[I]:qe[I]][:, None]
                pair[I] = np.clip(np.minimum(l, ke[None, :]) - ks[None, :], 0, None).sum(0)
        else:
            pair = (qe - qs)[:, None] * (ke - ks)[None, :]
        m = np.broadcast_to(mask.mask, (shape.batch, shape.q_heads) + mask.mask.shape[2:])
        out[:] = np.einsum("bhij,ij->bh", m.astype(np.int64), pair)
        return out
    for b in range(shape.batch):
        for h in range(shape.q_heads):
            for r0 in range(0, shape.q_len, 1024):
                r1 = min(r0 + 1024, shape.q_len)
                t = mask.token_rows(b, h, h + 1, r0, r1)
                if causal:
                    t = t & (np.arange(shape.k_len)[None, None, :]
                             <= np.arange(r0, r1)[None, :, None] + causal_offset(shape.q_len, shape.k_len))
                out[b, h] += int(t.sum())
    return out


@dataclass
class Evaluation:
    """Per-head ``[B, Hq]`` arrays and overall scalars of one mask against dense attention."""

    density: np.ndarray
    recall: np.ndarray
    output_error: np.ndarray
    dense_flops: int
    masked_flops: np.ndarray
    overall: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"density": self.density.tolist(), "recall": self.recall.tolist(),
                "output_error": self.output_error.tolist(), "dense_flops": self.dense_flops,
                "masked_flops": self.masked_flops.tolist(), "overall": dict(self.overall)}


def evaluate(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any, causal: bool = True,
             scale: float | None = None, dense: tuple[np.ndarray, np.ndarray] | None = None,
             out: np.ndarray | None = None) -> Evaluation:
    """Density, recall, output error and FLOPs of ``mask`` on canonical q/k/v.

    ``dense`` may pass a precomputed dense ``(out, lse)`` to share across masks. ``out``:
    the output of a method that computes attention its own way (PSA's pyramid, PISA's
    piecewise attention); the output error is then that of ``out``, while recall, density
    and FLOPs are those of the exact blocks ``mask`` selects.
    """
    shape = AttnShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                      v.shape[3])
    if dense is None:
        dense = attention_forward(q, k, v, None, causal, scale)
    o_d, l_d = dense
    o_m, l_m = attention_forward(q, k, v, mask, causal, scale)
    has = np.isfinite(l_d)
    with np.errstate(invalid="ignore", over="ignore"):
        rec_rows = np.where(np.isfinite(l_m), np.exp(np.minimum(l_m - l_d, 0.0)), 0.0)
    nrows = np.maximum(has.sum(-1), 1)
    recall = np.where(has, rec_rows, 0.0).sum(-1) / nrows
    if out is not None:
        o_m = np.asarray(out, np.float64)
    num = np.sqrt(((o_m - o_d) ** 2).sum(axis=(-1, -2)))
    den = np.sqrt((o_d ** 2).sum(axis=(-1, -2)))
    err = num / np.where(den > 0, den, 1.0)
    vp = visible_pairs(shape.q_len, shape.k_len, causal)
    mp = masked_pairs(mask, causal, shape)
    per_pair = 2 * (shape.head_dim + shape.v_dim)
    dens = mp / max(vp, 1)
    overall = {
        "density": float(dens.mean()),
        "recall": float(np.where(has, rec_rows, 0.0).sum() / max(has.sum(), 1)),
        "output_error": float(np.sqrt((num ** 2).sum()) / max(np.sqrt((den ** 2).sum()), 1e-300)),
        "flops_saved": float(1.0 - mp.sum() / max(vp * mp.size, 1)),
    }
    if isinstance(mask, BlockMask):
        overall["block_density"] = mask.density(causal=causal)
    return Evaluation(dens, recall, err, per_pair * vp, per_pair * mp, overall)
