"""XAttention: antidiagonal block scoring with a cumulative threshold (NumPy reference).

Paper: Xu, Xiao, Huang, Guo, Han, "XAttention: Block Sparse Attention with Antidiagonal
Scoring", arXiv 2503.16428 (ICML 2025).
Official code: mit-han-lab/x-attention @ e37988770b9d1bebd489eba011d615f35587ba08
(``xattn/src/Xattention.py:xattn_estimate`` / ``Xattention_prefill``, the Triton kernels of
``xattn/src/kernels.py``, the selector ``xattn/src/utils.py:find_blocks_chunked``).

Scoring (the Triton path, spec ``llm-prefill.md`` §3c). Q and K are zero-padded along the
sequence to ``Lp = ceil(L / C) * C`` (``C = chunk_size``) and cut into ``T = Lp / S`` tiles
of ``S = stride`` tokens. For query tile ``i`` and key tile ``j`` the logit is the mean of the
tile's antidiagonal (bottom-left to top-right)::

    A[i, j] = 1 / (sqrt(D) * S * norm) * sum_{u=0}^{S-1} < Q[i*S + S-1-u], K[j*S + u] >

Causal: the tile softmax runs over ``j <= i``; the diagonal tile is kept whole (it also
pairs queries with later keys). Query tiles holding no real token (``i >= ceil(L/S)``) get
probability 0. Block scores sum the probabilities over the ``b' x b'`` tiles of a block
(``b' = block_size / S``)::

    W[I, J] = sum_{i in I} sum_{j in J} softmax_j(A[i, :])[j]

Non-causal: the softmax runs over every padded key tile (padded keys have logit 0 and so
take mass, as in the official kernel); the selector has no forced blocks.

The torch path (``path="torch"``): ``xattn_estimate`` switches ``use_triton`` off unless the
GPU name contains "100" and then scores with plain torch ops, whose causal mask has a
``[-0:]`` slice quirk and whose steps round to the input dtype; emulated on the host by
:func:`refattn.methods._xattn_torch.xattention_score_torch` for every backend, then the same
selection below.

Selection (``find_blocks_chunked(mode="prefill")``, spec §3d with the corrections of the
conformance README §3): per query chunk of ``C / block_size`` block rows, the literal
official algorithm, see :func:`find_blocks_chunked`; then the lower-triangular post-step
of ``xattn_estimate`` and the slice to the real blocks of ``Xattention_prefill``.

Device arrays (``device=True``): the selection is array-module generic. With CuPy q and k
and ``backend="cupy"``, ``W`` comes from the CUDA scoring kernel and stays on the GPU; the
sorts, cumulative sums and the scatter of :func:`find_blocks_chunked` run there (CuPy's
sorts are stable, like the reference's), and the mask, scores, boundary and extras are CuPy
arrays. The shape-derived masks (forced blocks, the ``tril`` post-step, causal legality)
are built there too: the only host-to-device copy is the per-head tau (``[Hq]``). The
arithmetic is the reference's, but CuPy's reductions and scans (``sum``, ``cumsum``) add in
another order than NumPy's pairwise sum and sequential cumsum, so on the same ``W`` a block
can differ only where a cumulative sum lies within a few float64 ulps of ``tau * row sum``
(a near-tie, far below the scoring kernels' own rounding). Host inputs run exactly the
NumPy code as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask, num_blocks
from ..core.errors import InputError
from ..core.layout import array_module, to_host
from ..core.registry import BACKENDS, define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..reference.memory import rows_per_chunk
from ._xattn_torch import xattention_score_torch
from .base import check_choice, check_range, register_method

CODE = "mit-han-lab/x-attention@e37988770b9d1bebd489eba011d615f35587ba08"


def default_chunk_size(k_len: int) -> int:
    """``Xattention_prefill``'s chunk size when ``chunk_size=None``.

    With ``P = next_pow2(k_len)`` (``1 << (k_len - 1).bit_length()``):
    ``C = max(min(max(2048, P), 2**28 // P), 2048)``; e.g. ``k_len <= 2048 -> 2048``,
    4K -> 4096, 16K -> 16384, 32K -> 8192, 64K -> 4096, >= 128K -> 2048.
    """
    p = 1 << (int(k_len) - 1).bit_length()
    return int(max(min(max(2048, p), 128 * 1024 * 2048 // p), 2048))


@dataclass(frozen=True)
class XAttentionParams:
    """Parameters of XAttention (official names in brackets).

    * ``block_size`` [block_size]: block edge in tokens (``Xattention_prefill`` asserts 128).
    * ``stride`` [stride]: antidiagonal tile size S; must divide ``block_size`` (8 and 16 in
      the paper's LLM runs; ``FastPrefillConfig`` defaults to 16, the LongBench eval to 8).
    * ``threshold`` [threshold]: tau, the fraction of each block row's mass to keep; a
      scalar, or one value per query head (rounded to float32 as the official per-head
      tensors are, e.g. 0.9 -> 0.8999999761581421). ``xattn_estimate`` defaults to 0.9.
    * ``chunk_size`` [chunk_size]: query chunk C in tokens (a multiple of ``block_size``);
      ``None`` = ``Xattention_prefill``'s table (:func:`default_chunk_size`). It changes
      the mask: the first query chunk follows a different rule (see
      :func:`find_blocks_chunked`).
    * ``norm`` [norm]: extra logit divisor (1).
    * ``path`` [use_triton]: which official scoring branch of ``xattn_estimate``:
      ``"triton"`` (the kernels, run where the GPU name contains "100") or ``"torch"`` (the
      fallback taken on every other GPU: its ``[-0:]`` causal-mask slice and its arithmetic
      in the input dtype, see :mod:`refattn.methods._xattn_torch`). The Numba and CUDA
      kernels implement the Triton path; ``"torch"`` runs on the host for every backend.
    """

    block_size: int = 128
    stride: int = 8
    threshold: float | tuple[float, ...] = 0.9
    chunk_size: int | None = None
    norm: float = 1.0
    path: str = "triton"

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, (list, tuple, np.ndarray)):
            object.__setattr__(self, "threshold", tuple(np.asarray(t).reshape(-1).tolist()))

    def validate(self) -> None:
        check_range("block_size", self.block_size, 1, integer=True)
        check_range("stride", self.stride, 1, integer=True)
        if int(self.block_size) % int(self.stride):
            raise InputError(f"stride: must divide block_size={self.block_size}, "
                             f"got {self.stride}")
        if self.chunk_size is not None:
            check_range("chunk_size", self.chunk_size, 1, integer=True)
            if int(self.chunk_size) % int(self.block_size):
                raise InputError(f"chunk_size: must be a multiple of block_size="
                                 f"{self.block_size}, got {self.chunk_size}")
        if isinstance(self.threshold, tuple) and len(self.threshold) == 0:
            raise InputError("threshold: expected a number or one value per head, got ()")
        check_range("threshold", self.threshold, 0.0, 1.0)
        check_range("norm", self.norm, 0.0, lo_open=True)
        check_choice("path", self.path, ("triton", "torch"))


def head_thresholds(threshold: Any, num_heads: int) -> np.ndarray:
    """tau per query head, float64 ``[H]``.

    A scalar stays exact (the official code multiplies by the Python float). A sequence is
    one value per head and is rounded to float32 first: the official loaders build it with
    ``torch.tensor(...)`` (float32) and ``find_blocks_chunked`` upcasts it to float64.
    """
    if isinstance(threshold, (tuple, list, np.ndarray)):
        t = np.asarray(threshold, dtype=np.float32).reshape(-1)
        if t.size != num_heads:
            raise InputError(f"threshold: expected a scalar or {num_heads} values (one per "
                             f"query head), got {t.size}")
        return t.astype(np.float64)
    return np.full(num_heads, float(threshold), dtype=np.float64)


# ------------------------------------------------------------------------------- scoring
def xattention_score(q: np.ndarray, k: np.ndarray, block_size: int, stride: int,
                     chunk_size: int, norm: float, causal: bool, *,
                     out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Antidiagonal block scores ``W`` on the chunk-padded grid (Triton-path semantics).

    q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]`` (equal lengths; GQA: query head ``h`` reads kv
    head ``h // (Hq/Hkv)``). Returns ``(W,)``, float64 ``[B, Hq, nbp, nbp]`` with
    ``nbp = ceil(L / chunk_size) * chunk_size / block_size``; rows of query blocks holding
    no real token are 0; causal future blocks are 0.
    """
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    S, bt = int(stride), int(block_size) // int(stride)
    Lp = num_blocks(L, chunk_size) * chunk_size
    T, T_real = Lp // S, num_blocks(L, S)      # tiles; tiles that hold a real token
    nbp, n_real = Lp // block_size, num_blocks(L, block_size)
    scale = 1.0 / (math.sqrt(D) * S * norm)
    W = out[0] if out is not None else np.empty((B, Hq, nbp, nbp), dtype=np.float64)
    W[...] = 0.0
    # logits, probabilities and temporaries for one block row of b' query tiles
    rows = rows_per_chunk(n_real, bt * T * 8 * 4, 2 * Lp * D * 8 + W.nbytes, "xattention_score")
    tile_i = np.arange(T)
    for b in range(B):
        for h in range(Hq):
            qp = np.zeros((Lp, D))
            kp = np.zeros((Lp, D))
            qp[:L] = q[b, h]
            kp[:L] = k[b, h // (Hq // Hkv)]
            # row j of Kr: K[jS], ..., K[jS+S-1]; row i of Qr: Q[iS+S-1], ..., Q[iS]
            # (so Qr[i] . Kr[j] sums the antidiagonal of tile (i, j)).
            Kr = kp.reshape(T, S * D)
            Qr = qp.reshape(T, S, D)[:, ::-1, :].reshape(T, S * D)
            for I0 in range(0, n_real, rows):
                I1 = min(n_real, I0 + rows)
                i0, i1 = I0 * bt, I1 * bt
                kend = i1 if causal else T       # causal: later key tiles get 0
                A = (Qr[i0:i1] @ Kr[:kend].T) * scale
                if causal:                       # tile-causal, diagonal tile kept whole
                    A[tile_i[:kend][None, :] > tile_i[i0:i1, None]] = -np.inf
                A -= A.max(axis=1, keepdims=True)
                P = np.exp(A)
                P /= P.sum(axis=1, keepdims=True)
                P[tile_i[i0:i1] >= T_real] = 0.0  # padded query tiles
                nJ = kend // bt
                W[b, h, I0:I1, :nJ] = P.reshape(I1 - I0, bt, nJ, bt).sum(axis=(1, 3))
    return (W,)


define_op("xattention_score", xattention_score, outputs=("W",), kind="array")


# ----------------------------------------------------------------------------- selection
def _argsort_stable(x: Any) -> Any:
    """Stable argsort along the last axis in ``x``'s array module (CuPy's sorts are always
    stable and take no ``kind``)."""
    if isinstance(x, np.ndarray):
        return np.argsort(x, axis=-1, kind="stable")
    return array_module(x).argsort(x, axis=-1)


def _put_true(mask: Any, index: Any) -> None:
    """``np.put_along_axis(mask, index, True, axis=-1)`` by fancy indexing, which NumPy and
    CuPy both have (repeated indices write the same value)."""
    xp = array_module(mask)
    lead = mask.shape[:-1]
    idx = tuple(xp.arange(d).reshape((1,) * a + (d,) + (1,) * (len(lead) - a))
                for a, d in enumerate(lead))
    mask[idx + (index,)] = True


def find_blocks_chunked(W: np.ndarray, current_index: int, tau: np.ndarray,
                        causal: bool = True) -> np.ndarray:
    """The official ``find_blocks_chunked(mode="prefill", decoding=False)``, literally.

    ``W`` float64 ``[B, H, R, N]`` (the block rows of one query chunk), ``current_index`` the
    key block of the chunk's first diagonal, ``tau`` float64 ``[H]``. Returns bool
    ``[B, H, R, N]``. Ties in the sorts go to the lower block index (``torch.sort`` is
    unstable; the vectors hold no ties).

    Causal, per row ``r`` with diagonal ``d = current_index + r`` and ``req = tau * sum_J W``:
    the code marks the forced set (``mask[..., 0] = 1``, then the chunk's diagonal slice
    ``mask[..., ci:ci+R] = eye(R)``), lays out the cumulative sums as if two blocks were
    forced (``[0, forced_sum, sorted others[:-2]]``), walks the blocks in the order forced
    first then others by ``W`` descending, and keeps the one at position ``p`` iff the sum
    before it is ``< req``; slots not kept are redirected to block 0.

    * Chunks with ``current_index > 0``: forced = {0, d}; others are taken while forced mass
      plus the others taken so far is ``< req`` (the crossing block is included).
    * First chunk (``current_index == 0``): the eye slice covers column 0 and overwrites the
      sink for rows ``r > 0``, so only ``d`` is forced, and the two-slot layout shifts the
      sums by one: the best other block ``c1`` is kept iff ``req > 0``, and ``c_m`` (m >= 2)
      iff ``W[d] + c_1 + ... + c_{m-2} < req`` -- one block more than the clean rule. Column
      0 is always set (by the redirect). Row 0 is {0} plus a zero-mass future block.

    Non-causal: no forced blocks; blocks by ``W`` descending while the sum before is
    ``< req``. Finally, causal blocks past the chunk (``J >= ci + R``) are cleared.

    Array-module generic: a CuPy ``W`` (``tau`` NumPy or CuPy) runs on the GPU and gives a
    CuPy mask (see the module docstring for the summation order there).
    """
    xp = array_module(W)
    B, H, R, N = W.shape
    tau = xp.asarray(tau)
    req = W.sum(axis=-1, keepdims=True) * tau[None, :, None, None]
    zero = xp.zeros((B, H, R, 1))
    if causal:
        # [R, N], broadcast over B and H: column 0, then the slice [ci, ci + R) set to eye(R)
        r, j = xp.arange(R)[:, None], xp.arange(N)[None, :]
        eye_cols = (j >= current_index) & (j < current_index + R)
        forced = xp.where(eye_cols, j - current_index == r, j == 0)
        others = xp.sort(xp.where(forced, 0.0, W), axis=-1)[..., ::-1]
        forced_sum = xp.where(forced, W, 0.0).sum(axis=-1, keepdims=True)
        sorted_values = xp.concatenate([zero, forced_sum, others[..., :-2]], axis=-1)
        key = xp.where(forced, 100000.0 * (1.0 + W), W)
        mask = xp.zeros((B, H, R, N), dtype=bool) | forced
    else:
        key = W
        sorted_values = xp.sort(W, axis=-1)[..., ::-1]
        mask = xp.zeros((B, H, R, N), dtype=bool)
    order = _argsort_stable(-key)
    cum_before = xp.cumsum(xp.concatenate([zero, sorted_values[..., :-1]], axis=-1), axis=-1)
    index = xp.where(cum_before < req, order, 0)
    _put_true(mask, index)
    if causal:
        mask[..., current_index + R:] = False
    return mask


def _boundary(W: np.ndarray, mask: np.ndarray, forced: np.ndarray) -> np.ndarray:
    """Per row, the smallest ``W`` among blocks kept by score (not forced): the block at
    which the cumulative sum crossed ``req``. ``nan`` where none was kept."""
    xp = array_module(W)
    by_score = mask & ~forced
    with np.errstate(invalid="ignore"):
        b = xp.where(by_score, W, np.inf).min(axis=-1)
    return xp.where(by_score.any(axis=-1), b, np.nan)


@register_method(
    "xattention", XAttentionParams, kind="llm-prefill",
    summary="antidiagonal S x S tile scores, tile-causal softmax summed into 128-blocks; "
            "per-row cumulative threshold with sink + diagonal forced (official first-chunk rule)",
    paper="arXiv:2503.16428", code=CODE, device=True)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: XAttentionParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """XAttention selection on canonical ``bhsd`` arrays (q ``[B,Hq,L,D]``, k ``[B,Hkv,L,D]``).

    Returns a :class:`Selection` on the ``block_size`` grid of the real length: ``mask``
    ``[B, Hq, n, n]`` (``n = ceil(L/block_size)``), ``scores`` = ``W`` sliced likewise,
    ``boundary [B, Hq, n]``, ``forced`` (sink and diagonal, causal only), and ``extras``:
    ``W_padded`` and ``mask_padded`` (the chunk-padded ``[B, Hq, nbp, nbp]`` arrays that
    ``xattn_estimate`` returns), ``mask_chunks`` (before the tril post-step),
    ``chunk_size``, ``threshold`` (float64 ``[Hq]`` as used).
    """
    p = params
    B, Hq, L, _ = q.shape
    if k.shape[2] != L:
        raise InputError(f"xattention: q_len and k_len must be equal (prefill), got "
                         f"q_len={L}, k_len={k.shape[2]}; the official estimator aligns "
                         f"q_len < k_len at chunk granularity, which is not reproduced")
    bs, C = int(p.block_size), int(p.chunk_size or default_chunk_size(L))
    tau = head_thresholds(p.threshold, Hq)
    if p.path == "torch":           # host reference for every backend (no kernels)
        if backend != "auto" and backend not in BACKENDS:
            raise InputError(f"backend: expected one of {BACKENDS + ('auto',)}, got {backend!r}")
        (W,) = xattention_score_torch(to_host(q), to_host(k), bs, int(p.stride), C, float(p.norm),
                                      bool(causal))
        W = array_module(q).asarray(W)   # device inputs: the selection stays on the device
    else:
        score = dispatch("xattention_score", backend, (q, k))
        (W,) = score(q, k, bs, int(p.stride), C, float(p.norm), bool(causal))
    xp = array_module(W)            # device inputs (backend "cupy") stay on the device
    W = np.asarray(W, dtype=np.float64) if xp is np else W.astype(np.float64, copy=False)
    nbp, n, R = W.shape[-1], num_blocks(L, bs), C // bs
    tau_x = xp.asarray(tau)
    # xattn_estimate: one find_blocks_chunked call per query chunk (q_len == k_len, so the
    # chunk's first diagonal is at key block c*R), concatenated along rows.
    chunks = xp.concatenate([find_blocks_chunked(W[:, :, c * R:(c + 1) * R], c * R, tau_x,
                                                 causal)
                             for c in range(nbp // R)], axis=2)
    if causal:                                     # xattn_estimate's tril post-step
        t = xp.arange(nbp)
        padded = chunks & (t[None, :] <= t[:, None])
    else:
        padded = chunks.copy()
    mask = padded[:, :, :n, :n]                    # Xattention_prefill's slice
    Wn = W[:, :, :n, :n]
    # legal_blocks(L, L, bs, bs, causal), built where W lives: with q_len == k_len and one
    # block size a block is causal-legal iff J <= I; forced: the sink column and the diagonal
    j = xp.arange(n)
    if causal:
        legal = j[None, :] <= j[:, None]
        forced2 = ((j[None, :] == 0) | (j[None, :] == j[:, None])) & legal
    else:
        legal = xp.ones((n, n), dtype=bool)
        forced2 = xp.zeros((n, n), dtype=bool)
    forced = xp.zeros(mask.shape, dtype=bool) | forced2
    return Selection(
        mask=BlockMask(mask, block_q=bs, block_k=bs, q_len=L, k_len=L),
        scores=BlockScores(Wn, block_q=bs, block_k=bs, q_len=L, k_len=L),
        boundary=_boundary(Wn, mask & legal, forced),
        forced=forced,
        extras={"W_padded": W, "mask_padded": padded, "mask_chunks": chunks,
                "chunk_size": C, "threshold": tau})
