"""Piecewise attention (PISA): exact attention on the selected key blocks, a Taylor
approximation around the block mean key for all the others. The float64 NumPy reference of
op ``piecewise_attention_fwd``.

Source: PISA, ``xie-lab-ml/piecewise-sparse-attention@8604494f6660045d6f477f9dcb56b334d06b932c``,
``piecewise_attn/kernels/piecewise_sparse_attn_tma.py`` (``fused_chunk_reduce`` for the block
statistics, ``piecewise_sparse_attention_fwd_kernel`` for the three phases); spec
``video-kv.md`` section 3(c, e).

Blocks of ``block_size`` tokens (the last may be shorter, length ``len_j``); for key block
``j`` (of the query head's kv head)::

    kbar_j = (1/len_j) sum_{u in j} k_u,   vsum_j = sum_{u in j} v_u   (a sum, not a mean)
    Hc_j   = sum_{u in j} (k_u - kbar_j) v_u^T          [D, Dv],   Hglob = sum_{all j} Hc_j

For query ``x`` in query block ``I`` with selected key blocks ``Sel(I)`` and ``s`` the
softmax scale, ``T = Sk``::

    exact:   A  = sum_{j in Sel} sum_{u in j} e^{s x.k_u} v_u,    Z1 = sum_{j in Sel} sum_u e^{s x.k_u}
    zeroth:  A += sum_{j not in Sel} e^{s x.kbar_j} vsum_j,       G  = sum_{j not in Sel} e^{s x.kbar_j} len_j
    first:   "global"    (the official kernel): A += (G / T) * s * x^T Hglob
             "per_block" (the Taylor term):    A += sum_{j not in Sel} e^{s x.kbar_j} * s * x^T Hc_j
             "none":                           nothing
    out(x) = A / (Z1 + G),    lse(x) = ln(Z1 + G)

The per-block term is the first-order Taylor expansion of ``e^{s x.k_u}`` around ``kbar_j``
(its contribution to the denominator vanishes since ``sum_u (k_u - kbar_j) = 0``). The
official kernel does **not** apply it: it replaces it by the average weight ``G/T`` times the
global moment ``Hglob``, which also sums the selected blocks and the query's own block; the
default ``correction="global"`` reproduces that.

Differences from the official kernel (which runs bf16/fp16 on a GPU): everything here is
float64 (the official block statistics are stored in the input dtype); the official kernel
accumulates ``G`` without rescaling it when the running max grows between its groups of mean
keys (only for more than ``GROUP_SIZE`` >= 32 blocks, and only when a mean-key logit exceeds
every logit seen before); the reference uses one consistent max. GQA (query head ``h`` reads
kv head ``h // (Hq/Hkv)``) and ``Sq != Sk`` are refattn extensions; attention is
non-causal, as in the official code.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.blockmask import num_blocks
from ..core.errors import InputError
from ..core.layout import AttnShape
from ..core.registry import define_op
from .memory import rows_per_chunk

CORRECTIONS = ("global", "per_block", "none")


def block_lengths(length: int, block_size: int) -> np.ndarray:
    """int64 ``[N]``: ``len_j = min(block_size, length - j*block_size)``."""
    n = num_blocks(length, block_size)
    return np.minimum(block_size, length - np.arange(n, dtype=np.int64) * block_size)


def _block_view(x: np.ndarray, block_size: int) -> np.ndarray:
    """``x [..., S, D]`` zero-padded to ``[..., N, block_size, D]`` (float64)."""
    S = x.shape[-2]
    n = num_blocks(S, block_size)
    xx = x.astype(np.float64)
    pad = n * block_size - S
    if pad:
        xx = np.concatenate([xx, np.zeros(xx.shape[:-2] + (pad, xx.shape[-1]))], axis=-2)
    return xx.reshape(xx.shape[:-2] + (n, block_size, xx.shape[-1]))


def block_means(x: np.ndarray, block_size: int) -> np.ndarray:
    """``(1/len_j) sum_{t in j} x_t``: float64 ``[..., N, D]`` from ``x [..., S, D]``."""
    lens = block_lengths(x.shape[-2], block_size).astype(np.float64)
    return _block_view(x, block_size).sum(axis=-2) / lens[:, None]


def block_statistics(k: np.ndarray, v: np.ndarray, block_size: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``kbar [..., N, D]``, ``vsum [..., N, Dv]``, ``Hc [..., N, D, Dv]`` (float64) of
    ``k [..., S, D]``, ``v [..., S, Dv]`` (see the module docstring)."""
    kb, vb = _block_view(k, block_size), _block_view(v, block_size)
    lens = block_lengths(k.shape[-2], block_size)
    kbar = kb.sum(axis=-2) / lens[:, None].astype(np.float64)
    real = (np.arange(block_size)[None, :] < lens[:, None])[..., None]      # [N, bs, 1]
    centred = np.where(real, kb - kbar[..., None, :], 0.0)                  # padding rows out
    hc = np.einsum("...nbd,...nbe->...nde", centred, vb)
    return kbar, vb.sum(axis=-2), hc


def check_selected(selected: Any, shape: AttnShape, block_size: int) -> np.ndarray:
    """Validate ``selected`` (bool ``[B|1, Hq|1, Qb, Kb]`` or ``[Qb, Kb]``); bool copy."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise InputError(f"block_size: expected an integer >= 1, got {block_size!r}")
    sel = np.asarray(selected)
    if sel.dtype != bool:
        raise InputError(f"selected: expected a boolean block mask, got dtype {sel.dtype}")
    while sel.ndim < 4:
        sel = sel[None]
    qb, kb = num_blocks(shape.q_len, block_size), num_blocks(shape.k_len, block_size)
    if sel.ndim != 4 or sel.shape[2:] != (qb, kb):
        raise InputError(f"selected: expected [B, H, Qb={qb}, Kb={kb}] for q_len {shape.q_len}, "
                         f"k_len {shape.k_len}, block_size {block_size}; got {sel.shape}")
    if sel.shape[0] not in (1, shape.batch) or sel.shape[1] not in (1, shape.q_heads):
        raise InputError(f"selected: leading dims {sel.shape[:2]} must be 1 or (B={shape.batch}, "
                         f"Hq={shape.q_heads})")
    return sel.copy()


def piecewise_attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, selected: Any,
                                block_size: int, scale: float | None = None,
                                correction: str = "global", *,
                                out: tuple[np.ndarray, np.ndarray] | None = None
                                ) -> tuple[np.ndarray, np.ndarray]:
    """Reference piecewise attention on canonical arrays.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]``; ``selected`` bool
    ``[B|1, Hq|1, Qb, Kb]`` (blocks of ``block_size`` tokens on both axes) marks the blocks
    computed exactly; ``correction`` in :data:`CORRECTIONS`. Returns ``out float64
    [B, Hq, Sq, Dv]`` and ``lse float64 [B, Hq, Sq]`` (``ln(Z1 + G)``).
    """
    if correction not in CORRECTIONS:
        raise InputError(f"correction: expected one of {CORRECTIONS}, got {correction!r}")
    shape = AttnShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                      v.shape[3])
    bs = int(block_size)
    sel = check_selected(selected, shape, bs)
    scale = 1.0 / np.sqrt(shape.head_dim) if scale is None else float(scale)
    if out is None:
        o = np.empty((shape.batch, shape.q_heads, shape.q_len, shape.v_dim), np.float64)
        lse = np.empty((shape.batch, shape.q_heads, shape.q_len), np.float64)
    else:
        o, lse = out
    lens = block_lengths(shape.k_len, bs).astype(np.float64)
    G = shape.group
    R = rows_per_chunk(bs, 8 * 4 * (shape.k_len + len(lens) * (1 + shape.v_dim)),
                       8 * len(lens) * shape.head_dim * shape.v_dim * 2, "piecewise attention reference")
    tok_block = np.arange(shape.k_len) // bs
    for b in range(shape.batch):
        for g in range(shape.kv_heads):
            kk, vv = k[b, g].astype(np.float64), v[b, g].astype(np.float64)
            kbar, vsum, hc = block_statistics(kk, vv, bs)
            hglob = hc.sum(axis=0)                                             # [D, Dv]
            for h in range(g * G, (g + 1) * G):
                sh = sel[min(b, sel.shape[0] - 1), min(h, sel.shape[1] - 1)]
                for I in range(sh.shape[0]):
                    chosen = sh[I]
                    toks = chosen[tok_block]                                   # exact keys
                    for r0 in range(I * bs, min((I + 1) * bs, shape.q_len), R):
                        r1 = min(r0 + R, (I + 1) * bs, shape.q_len)
                        x = q[b, h, r0:r1].astype(np.float64)                  # [R, D]
                        s_ex = scale * (x @ kk[toks].T)                        # [R, n_exact]
                        s_mn = scale * (x @ kbar[~chosen].T)                   # [R, n_approx]
                        m = np.maximum(s_ex.max(axis=1, initial=-np.inf),
                                       s_mn.max(axis=1, initial=-np.inf))[:, None]
                        p_ex, p_mn = np.exp(s_ex - m), np.exp(s_mn - m)
                        num = p_ex @ vv[toks] + p_mn @ vsum[~chosen]
                        gl = p_mn @ lens[~chosen]                              # [R]
                        if correction == "global":
                            num += (gl / shape.k_len * scale)[:, None] * (x @ hglob)
                        elif correction == "per_block":
                            xh = np.einsum("rd,nde->rne", x, hc[~chosen])      # [R, n, Dv]
                            num += scale * np.einsum("rn,rne->re", p_mn, xh)
                        den = p_ex.sum(axis=1) + gl
                        o[b, h, r0:r1] = num / den[:, None]
                        lse[b, h, r0:r1] = m[:, 0] + np.log(den)
    return o, lse


PIECEWISE_FWD = define_op("piecewise_attention_fwd", piecewise_attention_forward,
                          outputs=("out", "lse"), kind="array")


def piecewise_attention(q: Any, k: Any, v: Any, selected: Any = None, *,
                        block_size: int | None = None, correction: str = "global",
                        softmax_scale: float | None = None, layout: str = "bhsd",
                        return_lse: bool = False, backend: str = "numpy") -> Any:
    """Piecewise attention of q/k/v (public entry point).

    ``selected``: bool ``[B|1, Hq|1, Qb, Kb]`` with ``block_size``, or a PISA
    :class:`~refattn.core.scores.Selection` (its mask and block size). Shapes and layouts as
    :func:`refattn.attention`; ``backend`` ``"numpy"``, ``"numba"`` or ``"auto"``. Returns
    ``out`` (and ``lse`` with ``return_lse``) in the input layout.
    """
    from ..core.layout import default_scale, from_bhsd, normalize_qkv
    from ..core.registry import dispatch, resolve_backend
    from ..core.scores import Selection

    if isinstance(selected, Selection):
        block_size = selected.mask.block_q
        if selected.mask.block_k != block_size:
            raise InputError("selected: a PISA selection has equal query and key blocks")
        selected = selected.mask.to_dense()
    if selected is None or block_size is None:
        raise InputError("piecewise_attention: give selected with block_size, or a PISA Selection")
    chosen = resolve_backend(PIECEWISE_FWD.name, backend, (q, k, v))
    q4, k4, v4, shape = normalize_qkv(q, k, v, layout=layout)
    sel = check_selected(selected, shape, block_size)
    scale = default_scale(shape.head_dim, softmax_scale)
    o, lse = dispatch(PIECEWISE_FWD.name, chosen)(q4, k4, v4, sel, int(block_size), scale,
                                                  correction)
    o = from_bhsd(o, layout)
    if layout == "hsd":
        lse = lse[0]
    return (o, lse) if return_lse else o
