"""Dense and block-sparse attention, forward and backward: the float64 NumPy reference.

Forward, for query row ``i`` of head ``h`` (kv head ``g = h // (Hq/Hkv)``)::

    s_ij   = scale * q_i . k_j                       for visible j, else -inf
    lse_i  = log sum_j exp(s_ij)                     (natural log; -inf if no j visible)
    o_i    = sum_j exp(s_ij - lse_i) v_j              (0 if no j visible)

"visible" = allowed by the mask (block ``(i // block_q, j // block_k)`` selected, or a
token-level mask) and, when ``causal``, ``j <= i + Sk - Sq`` (bottom-right alignment).

Backward (FlashAttention-2, Dao 2023, Alg. 2), with ``P = exp(S - lse)``::

    dV = P^T dO,   dP = dO V^T,   D_i = sum_d dO_id O_id,   dS = P * (dP - D),
    dQ = scale * dS K,   dK = scale * dS^T Q        (dK, dV summed over a GQA group)

Everything runs in float64 in chunks of query rows so that memory stays under the limit of
:mod:`refattn.reference.memory`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.blockmask import prepare_mask
from ..core.layout import AttnShape, causal_offset
from ..core.registry import define_op
from .memory import rows_per_chunk


def _visible(mask: Any, causal: bool, b: int, h0: int, h1: int, r0: int, r1: int,
             shape: AttnShape) -> np.ndarray | None:
    """bool ``[Hm, R, Sk]`` (``Hm`` 1 or h1-h0) of visible keys, or None when all are."""
    vis = None if mask is None else mask.token_rows(b, h0, h1, r0, r1)
    if causal:
        c = np.arange(shape.k_len)[None, :] <= (np.arange(r0, r1)[:, None]
                                                + causal_offset(shape.q_len, shape.k_len))
        vis = c[None] if vis is None else (vis & c[None])
    return vis


def _row_bytes(shape: AttnShape) -> int:
    # scores, probabilities, visibility and temporaries for one query row of a GQA group
    return shape.group * shape.k_len * 40


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: Any = None,
                      causal: bool = False, scale: float | None = None, *,
                      out: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Reference attention forward on canonical arrays.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]`` (any float dtype,
    already validated); ``mask`` as :func:`prepare_mask`. Returns ``out float64
    [B, Hq, Sq, Dv]`` and ``lse float64 [B, Hq, Sq]`` (natural log), written into ``out=``
    when given.
    """
    shape = AttnShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                      v.shape[3])
    scale = 1.0 / np.sqrt(shape.head_dim) if scale is None else float(scale)
    mask = prepare_mask(mask, shape)
    if out is None:
        o = np.empty((shape.batch, shape.q_heads, shape.q_len, shape.v_dim), np.float64)
        lse = np.empty((shape.batch, shape.q_heads, shape.q_len), np.float64)
    else:
        o, lse = out
    G = shape.group
    fixed = 8 * (o.size + lse.size) * (out is None) + 8 * shape.k_len * (shape.head_dim + shape.v_dim)
    R = rows_per_chunk(shape.q_len, _row_bytes(shape), fixed, "attention reference")
    for b in range(shape.batch):
        for g in range(shape.kv_heads):
            kk = k[b, g].astype(np.float64)
            vv = v[b, g].astype(np.float64)
            h0, h1 = g * G, (g + 1) * G
            for r0 in range(0, shape.q_len, R):
                r1 = min(r0 + R, shape.q_len)
                s = (q[b, h0:h1, r0:r1].astype(np.float64) @ kk.T) * scale      # [G, R, Sk]
                vis = _visible(mask, causal, b, h0, h1, r0, r1, shape)
                if vis is not None:
                    s = np.where(vis, s, -np.inf)
                m = s.max(axis=-1, keepdims=True)
                empty = ~np.isfinite(m)                                           # no visible key
                m = np.where(empty, 0.0, m)
                p = np.exp(s - m)
                l = p.sum(axis=-1, keepdims=True)
                with np.errstate(divide="ignore", invalid="ignore"):
                    o[b, h0:h1, r0:r1] = np.where(empty, 0.0, (p @ vv) / np.where(empty, 1.0, l))
                    lse[b, h0:h1, r0:r1] = np.where(empty, -np.inf, m + np.log(l))[..., 0]
    return o, lse


def attention_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, o: np.ndarray,
                       do: np.ndarray, lse: np.ndarray, mask: Any = None, causal: bool = False,
                       scale: float | None = None, *,
                       out: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference attention backward on canonical arrays.

    ``o`` and ``lse`` are the forward's outputs, ``do`` the gradient of the output
    ``[B, Hq, Sq, Dv]``. Returns ``dq [B,Hq,Sq,D]``, ``dk [B,Hkv,Sk,D]``, ``dv [B,Hkv,Sk,Dv]``
    in float64 (dk, dv summed over the query heads of each GQA group).
    """
    shape = AttnShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                      v.shape[3])
    scale = 1.0 / np.sqrt(shape.head_dim) if scale is None else float(scale)
    mask = prepare_mask(mask, shape)
    if out is None:
        dq = np.empty(q.shape, np.float64)
        dk = np.empty(k.shape, np.float64)
        dv = np.empty(v.shape, np.float64)
    else:
        dq, dk, dv = out
    G = shape.group
    fixed = 8 * 4 * shape.k_len * (shape.head_dim + shape.v_dim)
    R = rows_per_chunk(shape.q_len, _row_bytes(shape) * 2, fixed, "attention backward reference")
    for b in range(shape.batch):
        for g in range(shape.kv_heads):
            kk = k[b, g].astype(np.float64)
            vv = v[b, g].astype(np.float64)
            dk_acc = np.zeros_like(kk)
            dv_acc = np.zeros_like(vv)
            h0, h1 = g * G, (g + 1) * G
            for r0 in range(0, shape.q_len, R):
                r1 = min(r0 + R, shape.q_len)
                qc = q[b, h0:h1, r0:r1].astype(np.float64)                       # [G, R, D]
                doc = do[b, h0:h1, r0:r1].astype(np.float64)                     # [G, R, Dv]
                l = lse[b, h0:h1, r0:r1].astype(np.float64)[..., None]
                s = (qc @ kk.T) * scale
                vis = _visible(mask, causal, b, h0, h1, r0, r1, shape)
                if vis is None:
                    vis = np.ones((1,) + s.shape[1:], bool)
                vis = vis & np.isfinite(l)                                        # empty rows
                p = np.where(vis, np.exp(np.where(vis, s - np.where(np.isfinite(l), l, 0.0), 0.0)), 0.0)
                dv_acc += np.einsum("grs,grd->sd", p, doc)
                dp = doc @ vv.T
                Di = np.sum(doc * o[b, h0:h1, r0:r1].astype(np.float64), axis=-1, keepdims=True)
                ds = p * (dp - Di)
                dq[b, h0:h1, r0:r1] = scale * (ds @ kk)
                dk_acc += scale * np.einsum("grs,grd->sd", ds, qc)
            dk[b, g] = dk_acc
            dv[b, g] = dv_acc
    return dq, dk, dv


define_op("attention_fwd", attention_forward, outputs=("out", "lse"), kind="array")
define_op("attention_bwd", attention_backward, outputs=("dq", "dk", "dv"), kind="array")
