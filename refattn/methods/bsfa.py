"""BSFA: Block-Sparse FlashAttention (exact tile max of the logits vs calibrated thresholds).

Paper: Ohayon et al., "Block Sparse Flash Attention", arXiv 2512.07011.
Official code: Danielohayon/Block-Sparse-Flash-Attention @ c3ee81e15c0a0609fe1dfc298d3c29b0f3f2a8a9
(``kernel_src/csrc/flash_attn/src/flash_fwd_kernel.h:compute_attn_1rowblock``,
``kernel_src/block_sparse_flash_attn/flash_attn_interface.py``, ``thresholds/calibrate.py``).

Idea: inside a FlashAttention-2 kernel the logits of every tile are computed anyway; a tile
whose largest scaled logit is below a calibrated threshold contributes little after the
softmax, so its P·V work is skipped. The grid is asymmetric: ``block_q = 128`` query rows
(``kBlockM``) by ``block_k = 64`` keys (``kBlockN``).

Rule, per query head ``h`` (kv head ``h // (Hq/Hkv)``), query tile ``m``, key tile ``n``:

* score ``Mx[m, n] = max_{i in tile m, j in tile n} scale * q_i . k_j`` (raw scaled logits,
  no softmax, no causal mask inside the max); op ``bsfa_score(..., causal=True)`` computes
  only the causally reachable tiles (the others are ``-inf``), as the kernel does;
* ``n_max(m)`` = number of key tiles the kernel walks for query tile ``m`` (``2m + 2`` in
  prefill). Its last ``n_masking_steps`` tiles are always computed (dense with the token
  causal mask): ``ceil(block_q / block_k) = 2`` (the 128x128 diagonal square) when
  FlashAttention-2's ``Is_even_MN`` holds (padded ``Sk`` a multiple of ``block_k`` and
  ``D`` in {32, 64, 96, 128}), 3 otherwise, 1 (the last key tile) without ``causal``;
* every earlier tile is kept iff ``Mx[m, n] >= tau[h, min(m, maxb - 1)]`` (the kernel skips
  on strict ``<``); tiles ``n >= n_max(m)`` are causally illegal.

Partial last tile: the official interface pads q, k, v by ``-Sq % 128`` copies of their last
token (the same amount for both, so ``Sk - Sq`` is kept). Repeated rows/keys never change a
maximum over tiles that hold a real row and a real key, so scoring the real tokens only (as
done here) gives the same maxima on the ``ceil(Sq/128) x ceil(Sk/64)`` grid; but ``n_max``
counts the padded tiles, so when ``Sq % 128`` is in 1..64 the last query tile's forced pair
is its real diagonal tile and a padding-only tile (:func:`tile_layout`).

Thresholds: ``bsfa_calibrate`` reproduces ``thresholds/calibrate.py``: per example, head and
query tile, the midpoint between the k-th and (k+1)-th largest off-diagonal tile maxima
(``-inf`` where at most k tiles exist), averaged over examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ..core.blockmask import BlockMask, legal_blocks, num_blocks
from ..core.errors import InputError
from ..core.layout import array_module, normalize_qkv
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..reference.memory import rows_per_chunk
from .base import check_range, register_method

CODE = "Danielohayon/Block-Sparse-Flash-Attention@c3ee81e15c0a0609fe1dfc298d3c29b0f3f2a8a9"
KEY_CHUNK = 1024  # keys per matmul of the reference tile maxima (rounded to block_k)


@dataclass(frozen=True)
class BSFAParams:
    """BSFA parameters.

    * ``block_q`` / ``block_k`` (official ``kBlockM`` / ``kBlockN``): tile sizes, 128 x 64.
    * ``threshold`` (official per-layer slice of the calibrated thresholds tensor
      ``[num_k, layers, heads, max_q_tiles]``): a scalar, per head ``[Hq]``, or per head and
      query tile ``[Hq, maxb]`` (tile ``m`` uses column ``min(m, maxb - 1)``). ``-inf`` keeps
      every tile. ``None`` (default): calibrate on the input itself with ``topk``.
    * ``topk`` (calibration ``k``): off-diagonal tiles per query tile that self-calibration
      targets when ``threshold`` is None (the official code always loads calibrated files;
      the paper recommends k = 64..96 for general tasks, 32 for retrieval).
    """

    block_q: int = 128
    block_k: int = 64
    threshold: Any = None
    topk: int = 64

    def validate(self) -> None:
        check_range("block_q", self.block_q, 1, integer=True)
        check_range("block_k", self.block_k, 1, integer=True)
        check_range("topk", self.topk, 0, integer=True)
        if self.threshold is not None:
            t = _threshold_array(self.threshold)
            if t.ndim > 2:
                raise InputError(f"threshold: expected a scalar, [H] or [H, Qb] array, got "
                                 f"shape {t.shape}")


def _threshold_array(threshold: Any) -> np.ndarray:
    try:
        t = np.asarray(threshold, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"threshold: expected a number or an array of numbers, got "
                         f"{threshold!r}") from None
    if t.size == 0 or np.isnan(t).any():
        raise InputError(f"threshold: expected non-empty values without NaN, got {threshold!r}")
    return t


# ------------------------------------------------------------------ scoring op
def bsfa_block_max(q: np.ndarray, k: np.ndarray, block_q: int, block_k: int, scale: float,
                   causal: bool = False, *, out: tuple[np.ndarray] | None = None
                   ) -> tuple[np.ndarray]:
    """Tile maxima ``Mx [B, Hq, ceil(Sq/block_q), ceil(Sk/block_k)]`` (float64) of the raw
    scaled logits ``scale * q . k`` over the real tokens of each tile.

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``; GQA: head ``h`` reads kv head ``h // G``.
    ``causal=False``: every tile. ``causal=True``: tiles that hold no visible (query, key)
    pair under bottom-right causality (:func:`refattn.core.blockmask.legal_blocks`) are
    ``-inf`` and are not computed; every other tile keeps the unmasked max over the whole
    tile (no causal mask inside it: the official kernel compares the tile's raw maximum,
    see the module docstring), so its value does not depend on ``causal``.
    """
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    G = Hq // k.shape[1]
    qb, kb = num_blocks(Sq, block_q), num_blocks(Sk, block_k)
    mx = np.empty((B, Hq, qb, kb), np.float64) if out is None else out[0]
    legal = legal_blocks(Sq, Sk, block_q, block_k, bool(causal))          # [Qb, Kb]
    # legal tiles of a row are a prefix (key tile starts <= the row's last visible key),
    # non-decreasing with the row: a chunk of rows m0..m1-1 needs key tiles < n_legal[m1-1]
    n_legal = legal.sum(axis=1)
    # Logits by matmuls of fixed shape: query tiles in chunks of at most qb/16 (so that
    # causal chunks follow the staircase, about 1/32 of the work wasted) times key tiles in
    # chunks of KEY_CHUNK keys. Both modes use the same chunks (causal stops after the
    # last chunk it needs), so a tile gets the same value, bit for bit, in both.
    kc = max(1, KEY_CHUNK // block_k)                                     # key tiles per matmul
    tiles = min(rows_per_chunk(qb, G * block_q * kc * block_k * 16, 8 * Sk * D,
                               "bsfa block max"), max(1, qb // 16))
    for b in range(B):
        for g in range(k.shape[1]):
            kk = k[b, g].astype(np.float64)
            for m0 in range(0, qb, tiles):
                m1 = min(qb, m0 + tiles)
                r0, r1 = m0 * block_q, min(Sq, m1 * block_q)
                qq = q[b, g * G:(g + 1) * G, r0:r1].astype(np.float64)     # [G, R, D]
                rows = mx[b, g * G:(g + 1) * G, m0:m1]                    # [G, m1-m0, Kb]
                rows[...] = -np.inf
                for n0 in range(0, int(n_legal[m1 - 1]), kc):
                    n1 = min(kb, n0 + kc)
                    j0, j1 = n0 * block_k, min(Sk, n1 * block_k)
                    s = (qq @ kk[j0:j1].T) * scale
                    pad_r, pad_k = (m1 - m0) * block_q - (r1 - r0), (n1 - n0) * block_k - (j1 - j0)
                    if pad_r or pad_k:   # -inf never wins a max (= repeating the last token,
                        s = np.pad(s, ((0, 0), (0, pad_r), (0, pad_k)),  # see the docstring)
                                   constant_values=-np.inf)
                    s = s.reshape(G, m1 - m0, block_q, n1 - n0, block_k)
                    rows[..., n0:n1] = s.max(axis=(2, 4))
                rows[...] = np.where(legal[m0:m1], rows, -np.inf)
    return (mx,)


SCORE_OP = define_op("bsfa_score", bsfa_block_max, outputs=("block_max",), kind="array")


# ------------------------------------------------------------------ geometry
def tile_layout(q_len: int, k_len: int, block_q: int, block_k: int, causal: bool,
                head_dim: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """``(gated, forced)``, bool ``[Qb, Kb]`` each, as the official kernel decides them.

    The official interface pads q, k and v with copies of their last token by
    ``pad = -q_len % block_q`` each (``flash_attn_interface.py``), so ``Sk - Sq`` is kept,
    and FlashAttention-2's loop (``flash_fwd_kernel.h``) walks the padded key tiles
    ``n < n_max(m)``, ``n_max(m) = min(ceil(kp / block_k), ceil(((m + 1) block_q + kp - qp)
    / block_k))`` causal, ``ceil(kp / block_k)`` otherwise (``qp, kp`` the padded lengths).
    Its last ``n_masking_steps`` tiles are computed without the threshold test (forced):
    ``ceil(block_q / block_k)`` causal when ``Is_even_MN`` (``kp % block_k == 0`` and
    ``head_dim`` in {32, 64, 96, 128}), one more otherwise; 1 (the last key tile) when not
    causal. Earlier tiles are gated. Padding-only tiles do not exist here, and only
    causally legal tiles are kept in either set.
    """
    qb, kb = num_blocks(q_len, block_q), num_blocks(k_len, block_k)
    pad = -q_len % block_q
    qp, kp = q_len + pad, k_len + pad
    nk_pad = -(-kp // block_k)
    if causal:
        even = kp % block_k == 0 and head_dim in (32, 64, 96, 128)
        steps = -(-block_q // block_k) + (0 if even else 1)
        m = np.arange(qb)
        n_max = np.minimum(nk_pad, -(-((m + 1) * block_q + kp - qp) // block_k))     # [Qb]
    else:
        steps = 1
        n_max = np.full(qb, nk_pad)
    n = np.arange(kb)[None, :]
    legal = legal_blocks(q_len, k_len, block_q, block_k, causal)
    forced = (n < n_max[:, None]) & (n >= n_max[:, None] - steps) & legal
    gated = (n < n_max[:, None] - steps) & legal
    return gated, forced


def calibration_tiles(length: int, block_q: int, block_k: int) -> np.ndarray:
    """The tiles ``thresholds/calibrate.py`` ranks, bool ``[Qb, Kb]`` (prefill,
    ``Sq == Sk == length``): ``V_m = {n < (m block_q) // block_k}``, the key tiles before
    query tile ``m``'s first row (``n < 2m`` at 128 x 64), whatever the kernel forces."""
    qb, kb = num_blocks(length, block_q), num_blocks(length, block_k)
    first = (np.arange(qb) * block_q) // block_k
    return np.arange(kb)[None, :] < first[:, None]


def _expand_threshold(t: np.ndarray, heads: int, qb: int) -> np.ndarray:
    """Threshold per (head, query tile) ``[Hq, Qb]``; tile ``m`` reads ``min(m, maxb-1)``."""
    if t.ndim == 0:
        return np.full((heads, qb), float(t))
    if t.shape[0] != heads:
        raise InputError(f"threshold: expected {heads} per-head values (one per query head), "
                         f"got shape {t.shape}")
    if t.ndim == 1:
        return np.repeat(t[:, None], qb, axis=1)
    return t[:, np.minimum(np.arange(qb), t.shape[1] - 1)]


# ------------------------------------------------------------------ calibration
def example_thresholds(mx: Any, gated: np.ndarray, k: int) -> Any:
    """Per-example thresholds ``[B, H, Qb]`` from tile maxima ``mx [B, H, Qb, Kb]``.

    Row ``m``: ``-inf`` if it has at most ``k`` gated tiles, else the midpoint of the k-th
    and (k+1)-th largest gated maxima (``calibrate.py``: ``(sorted[k-1] + sorted[k]) / 2``,
    descending; for ``k = 0`` that index ``-1`` is the smallest, so the midpoint of the
    largest and smallest). ``gated`` is the host ``[Qb, Kb]`` geometry
    (:func:`calibration_tiles`); ``mx`` may be a device array, and so is the result then
    (one sort of the rows, no loop over the query tiles).
    """
    xp = array_module(mx)
    k = int(k)
    n_gated = gated.sum(axis=-1)                                             # [Qb] host
    have = xp.asarray(n_gated > k)
    if k >= mx.shape[-1]:             # no row has more than k tiles
        return xp.broadcast_to(xp.asarray(-np.inf), mx.shape[:3]).copy()
    # gated maxima of every row, descending; non-gated tiles become -inf and come last
    srt = -xp.sort(-xp.where(xp.asarray(gated), mx, -np.inf), axis=-1)
    if k == 0:                        # sorted[-1] of the gated values: the row's smallest
        last = xp.asarray(np.maximum(n_gated - 1, 0))[None, None, :, None]
        low = xp.take_along_axis(srt, xp.broadcast_to(last, srt.shape[:3] + (1,)), -1)[..., 0]
        mid = (0.5 * (srt[..., 0] + low)).astype(np.float64)
    else:
        mid = (0.5 * (srt[..., k - 1] + srt[..., k])).astype(np.float64)   # in mx's dtype
    return xp.where(have, mid, -np.inf)


def bsfa_calibrate(samples: Iterable[Any], k: int, *, block_q: int = 128, block_k: int = 64,
                   softmax_scale: float | None = None, layout: str = "bhsd") -> np.ndarray:
    """Thresholds ``[Hq, maxb]`` (float64) as ``thresholds/calibrate.py`` computes them.

    ``samples``: an iterable of ``(q, k)`` pairs (or ``(q, k, v)``), q ``[B, Hq, S, D]`` in
    ``layout``; every batch element is one calibration example (causal prefill,
    ``Sq == Sk``). For each example, head and query tile ``m`` with
    ``V_m = {n < (m block_q) // block_k}`` (``n < 2m`` at 128 x 64;
    :func:`calibration_tiles`): threshold ``= -inf`` if ``|V_m| <= k``, else the midpoint
    ``(v_(k) + v_(k+1)) / 2`` of the k-th and (k+1)-th largest maxima (``k = 0``: of the
    largest and the smallest, as ``sorted[k-1]`` reads index -1). Thresholds are averaged over the examples that reach tile ``m``;
    ``maxb`` is the number of query tiles of the longest example.
    """
    check_range("k", k, 0, integer=True)
    per_example: list[np.ndarray] = []                                     # [H, Qb_e] each
    for i, sample in enumerate(samples):
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise InputError(f"samples[{i}]: expected a (q, k) pair, got {type(sample).__name__}")
        q4, k4, _, shape = normalize_qkv(sample[0], sample[1], layout=layout)
        if shape.q_len != shape.k_len:
            raise InputError(f"samples[{i}]: calibration needs q_len == k_len, got "
                             f"{shape.q_len} and {shape.k_len}")
        if per_example and shape.q_heads != per_example[0].shape[0]:
            raise InputError(f"samples[{i}]: {shape.q_heads} query heads, earlier samples "
                             f"had {per_example[0].shape[0]}")
        scale = 1.0 / np.sqrt(shape.head_dim) if softmax_scale is None else float(softmax_scale)
        # only off-diagonal causal tiles are read: the causal op skips the others
        (mx,) = dispatch(SCORE_OP.name, "numpy")(q4, k4, block_q, block_k, scale, True)
        cal = calibration_tiles(shape.q_len, block_q, block_k)
        per_example.extend(example_thresholds(mx, cal, int(k)))
    if not per_example:
        raise InputError("samples: expected at least one (q, k) example, got none")
    heads, maxb = per_example[0].shape[0], max(t.shape[1] for t in per_example)
    total, count = np.zeros((heads, maxb)), np.zeros(maxb)
    for t in per_example:             # mean over the examples that reach each query tile
        total[:, :t.shape[1]] += t
        count[:t.shape[1]] += 1
    return total / count


# ------------------------------------------------------------------ method
@register_method(
    "bsfa", BSFAParams, kind="llm-prefill",
    summary="Block-Sparse FlashAttention: exact max of scaled logits per 128x64 tile kept "
            "iff >= a calibrated per-(head, q-tile) threshold; 128x128 diagonal forced",
    paper="arXiv 2512.07011", code=CODE, device=True)
def select(q: np.ndarray, k: np.ndarray, v: Any, params: BSFAParams, *, causal: bool = True,
           backend: str = "numpy") -> Selection:
    """BSFA selection on the (block_q, block_k) grid. q ``[B,Hq,Sq,D]``, k ``[B,Hkv,Sk,D]``.

    Returns a :class:`Selection`: ``mask`` = forced diagonal tiles ∪ gated tiles with
    ``Mx >= threshold``; ``scores`` = the tile maxima ``Mx`` (op ``bsfa_score`` with
    ``causal``: ``-inf`` on causally unreachable tiles, which are not computed; every other
    tile holds the max over its real tokens); ``boundary [B, Hq, Qb]`` = the threshold of each row;
    ``forced``; extras ``thresholds [B, Hq, Qb]`` (= boundary) and ``calibrated`` (True when
    each batch element's thresholds came from self-calibration on itself).
    """
    p = params
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    bq, bk = int(p.block_q), int(p.block_k)
    (mx,) = dispatch(SCORE_OP.name, backend)(q, k, bq, bk, 1.0 / np.sqrt(D), bool(causal))
    qb = mx.shape[2]
    calibrated = p.threshold is None
    if calibrated:
        if not causal or Sq != Sk:
            raise InputError("threshold: self-calibration (threshold=None) needs causal prefill "
                             "(q_len == k_len); pass explicit thresholds")
    gated, forced = tile_layout(Sq, Sk, bq, bk, causal, D)
    xp = array_module(mx)     # device scores (backend "cupy"): everything stays there
    if calibrated:                    # each batch element calibrated on itself
        thr = example_thresholds(mx, calibration_tiles(Sq, bq, bk), int(p.topk))  # [B,Hq,Qb]
    else:                             # the parameter goes where the scores live
        thr = xp.asarray(np.broadcast_to(
            _expand_threshold(_threshold_array(p.threshold), Hq, qb), (B, Hq, qb)).copy())
    forced_x = xp.asarray(forced)
    keep = xp.asarray(gated) & ~(mx < thr[..., None])     # the kernel skips iff Mx < tau
    mask = keep | forced_x
    geom = dict(block_q=bq, block_k=bk, q_len=Sq, k_len=Sk)
    return Selection(
        mask=BlockMask(mask, **geom),
        scores=BlockScores(mx, **geom),
        boundary=thr,
        forced=xp.broadcast_to(forced_x, mask.shape).copy(),
        extras={"thresholds": thr.copy(), "calibrated": calibrated},
    )
