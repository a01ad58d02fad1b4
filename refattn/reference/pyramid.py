"""Pyramid attention (PSA): every (query block, key block) pair attends at its own KV
resolution. The float64 NumPy reference of op ``pyramid_attention_fwd``.

Source: PSA, ``ziplab/Pyramid-Sparse-Attention@be122cfb7f32010682b1d70534670e5ef150a93d``,
``src/psa_triton/kernels/psa_kernel_legacy.py`` (the "old mask type" kernel, forward with
optional causal mask), whose semantics spec ``video-kv.md`` section 2(e) takes as the
reference.

Each pair ``(query block I, key block J)`` has a level ``l = levels[b, h, I, J]``:
``0`` skips the block; ``l >= 1`` replaces its ``block_k`` keys and values by
``block_k / l`` means of ``l`` consecutive tokens (``l = 1``: the tokens themselves).
With ``kbar_g, vbar_g`` the mean of group ``g`` and ``s`` the softmax scale, query ``x``
of block ``I`` gets one softmax over everything kept::

    z_g    = s * x . kbar_g + ln(l_J)        (the +ln l makes a mean count as l tokens)
    out(x) = sum_g e^{z_g} vbar_g / sum_g e^{z_g},     lse(x) = ln sum_g e^{z_g}

i.e. exactly attention to ``l`` copies of each mean key/value. Official details kept:

* keys/values are replicate-padded (the last token repeated) to ``Kb * block_k`` tokens;
  at levels ``l >= 2`` the padding tokens enter the last groups' means and the groups that
  hold only padding are attended too (the official kernel masks nothing at pooled levels);
  at level 1 keys ``>= Sk`` are masked;
* groups never straddle a block (``l`` must divide ``block_k``; the official code uses
  ``l in {1, 2, 4, 8}`` with ``block_k`` a multiple of 8);
* causal: group ``g`` (keys ``[g*l, (g+1)*l)`` of the padded sequence) is visible to query
  ``i`` iff its **last** key ``(g+1)*l - 1 <= i + Sk - Sq`` (the official condition
  ``key_upper <= query``, aligned bottom-right as refattn does for ``Sq != Sk``);
* a row that keeps nothing gives output 0 (the legacy kernel clamps the denominator to
  1e-8) and ``lse = -inf``.

GQA (refattn extension; the official generation path has none): query head ``h`` reads kv
head ``h // (Hq / Hkv)``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.blockmask import num_blocks
from ..core.errors import InputError
from ..core.layout import AttnShape, causal_offset
from ..core.registry import define_op
from .memory import rows_per_chunk

OFFICIAL_LEVELS = (0, 1, 2, 4, 8)


def check_levels(levels: Any, shape: AttnShape, block_q: int, block_k: int) -> np.ndarray:
    """Validate ``levels`` (int ``[B|1, Hq|1, Qb, Kb]``, or 2-d ``[Qb, Kb]``); int64 copy.

    Every level must be 0 or a positive divisor of ``block_k``."""
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise InputError(f"{name}: expected an integer >= 1, got {val!r}")
    lv = np.asarray(levels)
    if lv.dtype.kind not in "iu":
        if lv.dtype.kind == "f" and np.all(np.isfinite(lv)) and np.all(lv == np.round(lv)):
            lv = lv.astype(np.int64)
        else:
            raise InputError(f"levels: expected integer levels, got dtype {lv.dtype}")
    while lv.ndim < 4:
        lv = lv[None]
    qb, kb = num_blocks(shape.q_len, block_q), num_blocks(shape.k_len, block_k)
    if lv.ndim != 4 or lv.shape[2:] != (qb, kb):
        raise InputError(f"levels: expected [B, H, Qb={qb}, Kb={kb}] for q_len {shape.q_len}, "
                         f"k_len {shape.k_len}, block_q {block_q}, block_k {block_k}; got {lv.shape}")
    if lv.shape[0] not in (1, shape.batch) or lv.shape[1] not in (1, shape.q_heads):
        raise InputError(f"levels: leading dims {lv.shape[:2]} must be 1 or (B={shape.batch}, "
                         f"Hq={shape.q_heads})")
    lv = lv.astype(np.int64)
    used = np.unique(lv)
    bad = [int(x) for x in used if x < 0 or (x > 0 and block_k % x)]
    if bad:
        raise InputError(f"levels: every level must be 0 or a positive divisor of block_k={block_k}; "
                         f"got {bad}")
    return lv


def pooled_kv(x: np.ndarray, block_k: int, level: int) -> np.ndarray:
    """Replicate-pad ``x [..., Sk, D]`` to a multiple of ``block_k`` and mean-pool groups of
    ``level`` consecutive tokens: float64 ``[..., Kb*block_k/level, D]``."""
    S = x.shape[-2]
    pad = num_blocks(S, block_k) * block_k - S
    xx = x.astype(np.float64)
    if pad:
        xx = np.concatenate([xx, np.repeat(xx[..., -1:, :], pad, axis=-2)], axis=-2)
    n = xx.shape[-2] // level
    return xx.reshape(xx.shape[:-2] + (n, level, xx.shape[-1])).mean(axis=-2)


def _block_tokens(lv_row: np.ndarray, block_k: int, k_len: int
                  ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """For one query block's levels ``[Kb]``: ``(level, pooled indices, last key index)``
    per level present, the pooled indices into that level's pooled array."""
    out = []
    for lvl in np.unique(lv_row[lv_row > 0]):
        lvl = int(lvl)
        per = block_k // lvl
        js = np.nonzero(lv_row == lvl)[0]
        idx = (js[:, None] * per + np.arange(per)[None, :]).reshape(-1)
        last = (idx + 1) * lvl - 1
        if lvl == 1:
            keep = idx < k_len
            idx, last = idx[keep], last[keep]
        out.append((lvl, idx, last))
    return out


def pyramid_attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, levels: Any,
                              block_q: int, block_k: int, causal: bool = False,
                              scale: float | None = None, *,
                              out: tuple[np.ndarray, np.ndarray] | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Reference pyramid attention on canonical arrays.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]`` (any float dtype);
    ``levels`` int ``[B|1, Hq|1, Qb, Kb]`` (``Qb = ceil(Sq/block_q)``, ``Kb = ceil(Sk/block_k)``)
    in ``{0} U divisors(block_k)``. Returns ``out float64 [B, Hq, Sq, Dv]`` and
    ``lse float64 [B, Hq, Sq]`` (natural log), written into ``out=`` when given.
    """
    shape = AttnShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                      v.shape[3])
    block_q, block_k = int(block_q), int(block_k)
    lv = check_levels(levels, shape, block_q, block_k)
    scale = 1.0 / np.sqrt(shape.head_dim) if scale is None else float(scale)
    if out is None:
        o = np.empty((shape.batch, shape.q_heads, shape.q_len, shape.v_dim), np.float64)
        lse = np.empty((shape.batch, shape.q_heads, shape.q_len), np.float64)
    else:
        o, lse = out
    kpad = num_blocks(shape.k_len, block_k) * block_k
    G = shape.group
    off = causal_offset(shape.q_len, shape.k_len)
    used = [int(x) for x in np.unique(lv) if x > 0]
    fixed = 8 * 2 * kpad * (shape.head_dim + shape.v_dim) * max(1, len(used))
    R = rows_per_chunk(block_q, 8 * 4 * kpad, fixed, "pyramid attention reference")
    for b in range(shape.batch):
        for g in range(shape.kv_heads):
            kp = {l: pooled_kv(k[b, g], block_k, l) for l in used}     # [Kpad/l, D]
            vp = {l: pooled_kv(v[b, g], block_k, l) for l in used}     # [Kpad/l, Dv]
            for h in range(g * G, (g + 1) * G):
                lh = lv[min(b, lv.shape[0] - 1), min(h, lv.shape[1] - 1)]
                for I in range(lh.shape[0]):
                    parts = _block_tokens(lh[I], block_k, shape.k_len)
                    kk = np.concatenate([kp[l][i] for l, i, _ in parts] or [np.zeros((0, shape.head_dim))])
                    vv = np.concatenate([vp[l][i] for l, i, _ in parts] or [np.zeros((0, shape.v_dim))])
                    bias = np.concatenate([np.full(i.size, np.log(l)) for l, i, _ in parts] or [np.zeros(0)])
                    last = np.concatenate([e for _, _, e in parts] or [np.zeros(0, np.int64)])
                    for r0 in range(I * block_q, min((I + 1) * block_q, shape.q_len), R):
                        r1 = min(r0 + R, (I + 1) * block_q, shape.q_len)
                        s = scale * (q[b, h, r0:r1].astype(np.float64) @ kk.T) + bias[None, :]
                        if causal:
                            vis = last[None, :] <= np.arange(r0, r1)[:, None] + off
                            s = np.where(vis, s, -np.inf)
                        m = s.max(axis=-1, initial=-np.inf)[:, None]
                        empty = ~np.isfinite(m)
                        m = np.where(empty, 0.0, m)
                        p = np.exp(s - m)
                        l_ = p.sum(axis=-1, keepdims=True)
                        with np.errstate(divide="ignore", invalid="ignore"):
                            o[b, h, r0:r1] = np.where(empty, 0.0, (p @ vv) / np.where(empty, 1.0, l_))
                            lse[b, h, r0:r1] = np.where(empty, -np.inf, m + np.log(l_))[:, 0]
    return o, lse


PYRAMID_FWD = define_op("pyramid_attention_fwd", pyramid_attention_forward, outputs=("out", "lse"),
                        kind="array")


def pyramid_attention(q: Any, k: Any, v: Any, levels: Any = None, *, block_q: int | None = None,
                      block_k: int | None = None, causal: bool = False,
                      softmax_scale: float | None = None, layout: str = "bhsd",
                      return_lse: bool = False, backend: str = "numpy") -> Any:
    """Pyramid attention of q/k/v at the per-block ``levels`` (public entry point).

    ``levels``: int ``[B|1, Hq|1, Qb, Kb]`` with ``block_q``/``block_k`` given, or a PSA
    :class:`~refattn.core.scores.Selection` (its ``extras["levels"]`` and its mask's block
    sizes are used; a selection made on a token-reordered sequence carries the permutation in
    ``extras["perm"]``, which is applied to q/k/v here and undone on the output). Shapes and
    layouts as :func:`refattn.attention`. ``backend``: ``"numpy"`` (this reference),
    ``"numba"``, or ``"auto"`` (Numba where available). Returns ``out`` (and ``lse
    [B, Hq, Sq]`` with ``return_lse``) in the input layout and token order.
    """
    from ..core.layout import default_scale, from_bhsd, normalize_qkv
    from ..core.permutation import apply_permutation, unpermute
    from ..core.registry import dispatch, resolve_backend
    from ..core.scores import Selection

    perm = None
    if isinstance(levels, Selection):
        sel = levels
        if "levels" not in sel.extras:
            raise InputError("levels: this Selection carries no extras['levels'] (not a PSA selection)")
        levels = sel.extras["levels"]
        block_q, block_k = sel.mask.block_q, sel.mask.block_k
        perm = sel.extras.get("perm")
    if levels is None or block_q is None or block_k is None:
        raise InputError("pyramid_attention: give levels with block_q and block_k, or a PSA Selection")
    chosen = resolve_backend(PYRAMID_FWD.name, backend, (q, k, v))
    q4, k4, v4, shape = normalize_qkv(q, k, v, layout=layout)
    if perm is not None:
        q4, k4, v4 = (apply_permutation(x, perm, axis=2) for x in (q4, k4, v4))
    lv = check_levels(levels, shape, block_q, block_k)
    scale = default_scale(shape.head_dim, softmax_scale)
    o, lse = dispatch(PYRAMID_FWD.name, chosen)(q4, k4, v4, lv, int(block_q), int(block_k),
                                                bool(causal), scale)
    if perm is not None:
        o, lse = unpermute(o, perm, axis=2), unpermute(lse, perm, axis=2)
    o = from_bhsd(o, layout)
    if layout == "hsd":
        lse = lse[0]
    return (o, lse) if return_lse else o
