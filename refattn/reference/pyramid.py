"""Pyramid attention (PSA): every (query block, key block) pair attends at its own KV
resolution. The float64 NumPy reference of op ``pyramid_attention_fwd``.

Source: PSA, ``ziplab/Pyramid-Sparse-Attention@be122cfb7f32010682b1d70534670e5ef150a93d``:
two official kernels, chosen by ``kernel``:

* ``"legacy"`` (the op's default): ``src/psa_triton/kernels/psa_kernel_legacy.py`` (the
  "old mask type" kernel, forward with optional causal mask), whose semantics spec
  ``video-kv.md`` section 2(e) takes as the reference;
* ``"new"``: ``src/psa_triton/kernels/psa_kernel.py`` (the "new mask type" kernel, the one
  ``PSAConfig``'s defaults run: ``attention.py:254-259``, ``pyramid_sparse_attention.py:304``
  call ``sparse_attention_factory(block_m, tile_n, block_n)``, i.e. ``BLOCK_N = tile_n``,
  ``POOLING_BLOCK_N = block_k``), reproduced with its tile walk (below).

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

New kernel (``kernel="new"``, ``psa_kernel.py`` lines 206-302). It walks, per query block,
the new-format mask row (each level's block ids in rank order, then ``-1``; levels 1, 2, 4,
8 by position) in tiles of ``tile_n`` lanes over the level's pooled array (``P = block_k /
l`` pooled rows per block, row ``r`` has last key ``(r + 1) l - 1``), bias ``ln l``, lanes
masked only by ``row < len(pooled array)`` (level 1: ``row < Sk``):

* ``P >= tile_n`` (lines 261-264, 280-302): ``P // tile_n`` tiles ``j P + [0, tile_n)``,
  ``j P + [tile_n, 2 tile_n)``, ...: block ``j``'s rows ``j P + [0, (P // tile_n) tile_n)``
  (all of them when ``tile_n`` divides ``P``);
* ``P < tile_n`` (lines 265-278): one tile per **two** consecutive blocks ``a, b`` of the
  level (``for i in range(2)``): lanes ``[0, P)`` read rows ``a P + t``, lanes ``[P, 2P)``
  rows ``b P + t - P``, and lanes ``[2P, tile_n)`` keep ``offs = offs_n``: rows
  ``2P .. tile_n - 1`` of the level's pooled array, attended once more per pair (official
  behaviour, reproduced; e.g. ``block_k=64, tile_n=32``: level 8 adds pooled rows 16..31,
  key blocks 2 and 3, per pair; ``block_k=32``: level 4 rows 16..31, level 8 rows 8..31).

The result does not depend on the order in which a level's blocks are paired (the extra
rows are the same for every pair), so the op walks them in ascending block order. Refused
(``InputError``) where the official kernel has no defined result: levels other than
``{0, 1, 2, 4, 8}`` (its loop stops after level 8), a non-power-of-two ``tile_n``
(``tl.arange``), an odd number of blocks at a level with ``P < tile_n`` (the second lane
group would read the ``-1`` separator as a block id, i.e. rows ``-P .. -1`` before the
array, and the walk would swallow the separator), and ``P < tile_n < 2P`` (the tile holds
block ``b`` only in part, which depends on the rank order the levels do not carry).
The official new kernel has no causal mask and divides by zero on a row that keeps
nothing; here ``causal`` applies the legacy rule to every lane (extension) and an empty
row gives 0 / ``-inf`` as with the legacy kernel.

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
KERNELS = ("legacy", "new")
NEW_KERNEL_LEVELS = (1, 2, 4, 8)       # psa_kernel.py: MASK_MODE 1, 2, 4, 8 (``<= 8``)


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


def check_kernel(kernel: Any, tile_n: Any) -> tuple[str, int]:
    """Validate ``kernel`` (``"legacy"`` | ``"new"``) and ``tile_n`` (integer >= 1; a power of
    two for the new kernel, whose tile is ``tl.arange(0, tile_n)``)."""
    if kernel not in KERNELS:
        raise InputError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if isinstance(tile_n, bool) or not isinstance(tile_n, (int, np.integer)) or tile_n < 1:
        raise InputError(f"tile_n: expected an integer >= 1, got {tile_n!r}")
    tile_n = int(tile_n)
    if kernel == "new" and tile_n & (tile_n - 1):
        raise InputError(f"tile_n: the new kernel's tile (tl.arange(0, tile_n)) needs a power of "
                         f"two, got {tile_n}")
    return kernel, tile_n


def check_new_kernel_levels(lv: np.ndarray, block_k: int, tile_n: int) -> None:
    """Refuse levels the official new kernel (``psa_kernel.py``) has no defined result for:
    a level outside ``{0, 1, 2, 4, 8}``; ``P = block_k / l`` with ``P < tile_n < 2P``; an odd
    number of blocks of a level with ``P < tile_n`` in some row (``lv`` int ``[..., Kb]``)."""
    bad = sorted({int(x) for x in np.unique(lv) if x > 0 and x not in NEW_KERNEL_LEVELS})
    if bad:
        raise InputError(f"levels: the new kernel attends levels {NEW_KERNEL_LEVELS} only (its "
                         f"walk stops after level 8); got {bad} (use kernel='legacy')")
    for lvl in NEW_KERNEL_LEVELS:
        per = block_k // lvl
        if per >= tile_n or not (lv == lvl).any():
            continue
        if 2 * per > tile_n:
            raise InputError(f"levels: level {lvl} has {per} pooled rows per block, between "
                             f"tile_n/2 and tile_n={tile_n}: the new kernel's tile holds the "
                             f"second block of a pair only in part, which depends on the rank "
                             f"order (not defined by levels); use kernel='legacy'")
        odd = np.argwhere((lv == lvl).sum(axis=-1) % 2 == 1)
        if odd.size:
            raise InputError(f"levels: {len(odd)} row(s) (first at index {tuple(int(i) for i in odd[0])}) "
                             f"have an odd number of level-{lvl} blocks; with {per} pooled rows "
                             f"per block < tile_n={tile_n} the new kernel merges blocks in pairs "
                             f"and reads the -1 separator as the last block's partner "
                             f"(undefined); use kernel='legacy'")


def new_kernel_rows(lvl: int, js: np.ndarray, block_k: int, n_blocks: int, k_len: int,
                    tile_n: int) -> np.ndarray:
    """Pooled rows (indices into the level-``lvl`` pooled array, repeats kept) the new
    kernel attends for the level-``lvl`` blocks ``js`` of one query block (their count even
    when ``P = block_k / lvl < tile_n``); ``n_blocks`` = ``Kb``."""
    per = block_k // lvl
    if per >= tile_n:                       # P // tile_n whole tiles per block
        idx = (js[:, None] * per + np.arange(per // tile_n * tile_n)[None, :]).reshape(-1)
        return idx[idx < k_len] if lvl == 1 else idx
    blocks = (js[:, None] * per + np.arange(per)[None, :]).reshape(-1)
    stale = np.arange(2 * per, min(tile_n, n_blocks * per))   # lanes [2P, tile_n), per pair
    return np.concatenate([blocks, np.tile(stale, js.size // 2)])


def _block_tokens_new(lv_row: np.ndarray, block_k: int, k_len: int, tile_n: int
                      ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """:func:`_block_tokens` for the new kernel (levels checked by
    :func:`check_new_kernel_levels`)."""
    out = []
    for lvl in NEW_KERNEL_LEVELS:
        js = np.nonzero(lv_row == lvl)[0]
        if js.size:
            idx = new_kernel_rows(lvl, js, block_k, lv_row.size, k_len, tile_n)
            out.append((lvl, idx, (idx + 1) * lvl - 1))
    return out


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
                              scale: float | None = None, kernel: str = "legacy",
                              tile_n: int = 32, *,
                              out: tuple[np.ndarray, np.ndarray] | None = None
                              ) -> tuple[np.ndarray, np.ndarray]:
    """Reference pyramid attention on canonical arrays.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``, v ``[B, Hkv, Sk, Dv]`` (any float dtype);
    ``levels`` int ``[B|1, Hq|1, Qb, Kb]`` (``Qb = ceil(Sq/block_q)``, ``Kb = ceil(Sk/block_k)``)
    in ``{0} U divisors(block_k)``. ``kernel``: ``"legacy"`` (``psa_kernel_legacy.py``) or
    ``"new"`` (``psa_kernel.py``'s tile walk with tiles of ``tile_n`` lanes, see the module
    docstring; ``tile_n`` is ignored by the legacy kernel). Returns ``out float64
    [B, Hq, Sq, Dv]`` and ``lse float64 [B, Hq, Sq]`` (natural log), written into ``out=``
    when given.
    """
    shape = AttnShape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3],
                      v.shape[3])
    block_q, block_k = int(block_q), int(block_k)
    kernel, tile_n = check_kernel(kernel, tile_n)
    lv = check_levels(levels, shape, block_q, block_k)
    new = kernel == "new"
    if new:
        check_new_kernel_levels(lv, block_k, tile_n)
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
    ncol = kpad + (kpad // block_k // 2) * tile_n if new else kpad      # + repeated lanes
    R = rows_per_chunk(block_q, 8 * 4 * ncol, fixed, "pyramid attention reference")
    for b in range(shape.batch):
        for g in range(shape.kv_heads):
            kp = {l: pooled_kv(k[b, g], block_k, l) for l in used}     # [Kpad/l, D]
            vp = {l: pooled_kv(v[b, g], block_k, l) for l in used}     # [Kpad/l, Dv]
            for h in range(g * G, (g + 1) * G):
                lh = lv[min(b, lv.shape[0] - 1), min(h, lv.shape[1] - 1)]
                for I in range(lh.shape[0]):
                    parts = (_block_tokens_new(lh[I], block_k, shape.k_len, tile_n) if new
                             else _block_tokens(lh[I], block_k, shape.k_len))
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
                      return_lse: bool = False, backend: str = "numpy", kernel: str = "auto",
                      tile_n: int | None = None) -> Any:
    """Pyramid attention of q/k/v at the per-block ``levels`` (public entry point).

    ``levels``: int ``[B|1, Hq|1, Qb, Kb]`` with ``block_q``/``block_k`` given, or a PSA
    :class:`~refattn.core.scores.Selection` (its ``extras["levels"]`` and its mask's block
    sizes are used; a selection made on a token-reordered sequence carries the permutation in
    ``extras["perm"]``, which is applied to q/k/v here and undone on the output). Shapes and
    layouts as :func:`refattn.attention`. ``kernel``: ``"legacy"`` | ``"new"`` (see
    :func:`pyramid_attention_forward`) or ``"auto"``: the selection's ``extras["kernel"]``
    (PSA's ``kernel`` parameter, ``"new"`` for the default ``mask_type="new"``), else
    ``"legacy"``; ``tile_n`` (new kernel): default the selection's ``extras["tile_n"]``, else
    32. ``backend``: ``"numpy"`` (this reference), ``"numba"``, or ``"auto"`` (Numba where
    available). Returns ``out`` (and ``lse [B, Hq, Sq]`` with ``return_lse``) in the input
    layout and token order.
    """
    from ..core.layout import default_scale, from_bhsd, normalize_qkv
    from ..core.permutation import apply_permutation, unpermute
    from ..core.registry import dispatch, resolve_backend
    from ..core.scores import Selection

    perm = None
    sel_kernel, sel_tile = "legacy", 32
    if isinstance(levels, Selection):
        sel = levels
        if "levels" not in sel.extras:
            raise InputError("levels: this Selection carries no extras['levels'] (not a PSA selection)")
        levels = sel.extras["levels"]
        block_q, block_k = sel.mask.block_q, sel.mask.block_k
        perm = sel.extras.get("perm")
        sel_kernel = sel.extras.get("kernel") or "legacy"
        sel_tile = sel.extras.get("tile_n") or 32
    if kernel == "auto":
        kernel = sel_kernel
    kernel, tile_n = check_kernel(kernel, sel_tile if tile_n is None else tile_n)
    if levels is None or block_q is None or block_k is None:
        raise InputError("pyramid_attention: give levels with block_q and block_k, or a PSA Selection")
    chosen = resolve_backend(PYRAMID_FWD.name, backend, (q, k, v))
    q4, k4, v4, shape = normalize_qkv(q, k, v, layout=layout)
    if perm is not None:
        q4, k4, v4 = (apply_permutation(x, perm, axis=2) for x in (q4, k4, v4))
    lv = check_levels(levels, shape, block_q, block_k)
    scale = default_scale(shape.head_dim, softmax_scale)
    o, lse = dispatch(PYRAMID_FWD.name, chosen)(q4, k4, v4, lv, int(block_q), int(block_k),
                                                bool(causal), scale, kernel, tile_n)
    if perm is not None:
        o, lse = unpermute(o, perm, axis=2), unpermute(lse, perm, axis=2)
    o = from_bhsd(o, layout)
    if layout == "hsd":
        lse = lse[0]
    return (o, lse) if return_lse else o
