"""PBS-Attn: permuted block-sparse attention (key permutation within segments).

Paper: Wang et al., "Sparser Block-Sparse Attention via Token Permutation", arXiv 2510.21270.
Official code: xinghaow99/pbs-attn @ 8ce8e024b03ea1c0f135644c4838f60129091e12
(``pbs_attn/src/permute_states.py:last_block_attn_sorting``, ``pbs_attn/src/pbs.py:
permuted_block_selection``, ``pbs_attn/src/utils.py:block_pooled_attn / select_blocks``,
``kernels/permuted_block_sparse_attention.py:_permuted_block_sparse_attn_fwd_torch_naive``).

Idea: keys that the last queries attend to strongly are gathered at the front of their
segment, so that a block mask on the *permuted* keys covers the mass with fewer blocks.
Queries are not permuted; the attention output is already in the original order.

Rule, per query head ``h`` (kv head ``h // (Hq/Hkv)``), length ``L``, block ``b``,
segment ``s`` (a multiple of ``b``), ``m = s / b`` blocks per segment:

1. Permutation (``last_block_attn_sorting``). ``n_seg = floor(L/s)`` complete segments;
   ``P = softmax_t(Q[L-b:L] K[0:n_seg*s]^T / sqrt(D))`` over the complete-segment keys,
   **no causal mask**; ``w[t] = mean_rows P[:, t]``; inside each segment keys are sorted by
   ``w`` descending (stable: lower index first at ties; official ``argsort`` is unstable).
   The tail ``L mod s`` keeps its order. ``perm[u]`` = original index at permuted slot ``u``.
2. Scores (``block_pooled_attn``). Q and ``K' = K[perm]`` zero-padded to ``ceil(L/b)*b``;
   ``q_I``, ``k'_J`` = block means *including* the zero padding (sum / b);
   ``z[I,J] = q_I . k'_J / sqrt(D)`` where ``floor(I/m) != floor(J/m)`` and ``J <= I``,
   else ``-inf``; ``p[I,:] = softmax_J z[I,:]``. Rows with no allowed block are NaN (part
   of the op's output: ``pbs_score`` is defined with ``equal_nan=True``).
3. Selection (``select_blocks``). Sort ``p`` descending; keep the prefix up to and including
   the first position whose cumulative sum reaches ``tau``; keep **nothing** if ``tau`` is
   never reached (NaN rows). Force the block holding original token 0 in every row.
4. Attention: the diagonal *segment* (``floor(I/m) == floor(J/m)``) is dense; query ``t``
   sees permuted key ``u`` iff ``mask[I(t), J(u)]`` and ``perm[u] <= t`` (token causality on
   original indices).

``L <= s``: the official code falls back to dense causal SDPA; here the permutation is the
identity and the whole grid is one segment, which is the same attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask, num_blocks
from ..core.errors import InputError
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..reference.selection import rank_order
from .base import check_choice, check_range, register_method

CODE = "xinghaow99/pbs-attn@8ce8e024b03ea1c0f135644c4838f60129091e12"


@dataclass(frozen=True)
class PBSParams:
    """PBS-Attn parameters (official defaults of ``permuted_block_sparse_attn_fwd``).

    * ``block_size`` (official ``block_size``): query and key block, tokens.
    * ``segment_size`` (``segment_size``): permutation segment; a multiple of ``block_size``.
    * ``tau`` (``threshold``): cumulative block-probability mass to reach, in [0, 1].
    * ``force_sink`` (``force_select_first_block``): force the block holding token 0.
    * ``tie``: order of equal scores, ``"low"`` (lower index first) or ``"high"``.
    """

    block_size: int = 128
    segment_size: int = 256
    tau: float = 0.9
    force_sink: bool = True
    tie: str = "low"

    def validate(self) -> None:
        check_range("block_size", self.block_size, 1, integer=True)
        check_range("segment_size", self.segment_size, 1, integer=True)
        if int(self.segment_size) % int(self.block_size):
            raise InputError(f"segment_size: expected a multiple of block_size="
                             f"{self.block_size}, got {self.segment_size}")
        check_range("tau", self.tau, 0.0, 1.0)
        check_choice("force_sink", self.force_sink, (True, False))
        check_choice("tie", self.tie, ("low", "high"))


# ------------------------------------------------------------------ scoring ops
def _kv(k: np.ndarray, h: int, q_heads: int) -> int:
    return h // (q_heads // k.shape[1])


def pbs_key_importance(q: np.ndarray, k: np.ndarray, block_size: int, segment_size: int,
                       *, out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Key importance ``w [B, Hq, n_seg*s]`` (float64) that orders keys within segments.

    ``w[t] = mean_{i in last b queries} softmax_t(q_i . k_t / sqrt(D))`` over the keys of the
    complete segments only, without a causal mask (``last_block_attn_sorting``).
    q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]``.
    """
    B, Hq, L, D = q.shape
    T = (L // segment_size) * segment_size
    w = np.empty((B, Hq, T), np.float64) if out is None else out[0]
    if T == 0:
        return (w,)
    scale = 1.0 / np.sqrt(D)
    for b in range(B):
        for h in range(Hq):
            ql = q[b, h, max(0, L - block_size):].astype(np.float64)          # [b, D]
            kk = k[b, _kv(k, h, Hq), :T].astype(np.float64)                    # [T, D]
            z = (ql @ kk.T) * scale
            z -= z.max(axis=-1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=-1, keepdims=True)
            w[b, h] = p.mean(axis=0)
    return (w,)


def pbs_block_scores(q: np.ndarray, k_perm: np.ndarray, block_size: int, segment_size: int,
                     *, out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Block probabilities ``p [B, Hq, n, n]`` on permuted keys (``block_pooled_attn``).

    q ``[B, Hq, L, D]``; ``k_perm [B, Hq, L, D]`` (keys of each query head, permuted).
    ``z = mean-pooled q_I . mean-pooled k'_J / sqrt(D)`` (zero padding counted in the means),
    allowed only off the diagonal segment and block-causal; softmax over J; rows without an
    allowed block are NaN, as the official code returns them.
    """
    B, H, L, D = q.shape
    n = num_blocks(L, block_size)
    pad = n * block_size - L
    m = segment_size // block_size

    def pooled(x: np.ndarray) -> np.ndarray:
        x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (0, pad), (0, 0)))
        return x.reshape(B, H, n, block_size, D).sum(axis=3) / block_size

    z = (pooled(q) @ np.swapaxes(pooled(k_perm), -1, -2)) / np.sqrt(D)        # [B, H, n, n]
    I, J = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = (I // m != J // m) & (J <= I)
    z = np.where(allowed, z, -np.inf)
    p = np.full(z.shape, np.nan) if out is None else out[0]
    rows = allowed.any(axis=1)
    zr = z[:, :, rows]
    zr = np.exp(zr - zr.max(axis=-1, keepdims=True))
    p[:, :, rows] = zr / zr.sum(axis=-1, keepdims=True)
    p[:, :, ~rows] = np.nan
    return (p,)


KEY_IMPORTANCE_OP = define_op("pbs_key_importance", pbs_key_importance,
                              outputs=("key_importance",), kind="array")
# NaN rows are part of the op's output (segment-0 query blocks have no allowed block):
# kernels must reproduce them exactly (equal_nan, see refattn.core.registry.Op).
SCORE_OP = define_op("pbs_score", pbs_block_scores, outputs=("block_scores",), kind="array",
                     equal_nan=True)


# -------------------------------------------------------------- permutation
def permutation_from_importance(w: np.ndarray, length: int, segment_size: int,
                                tie: str = "low") -> np.ndarray:
    """``perm int64 [B, H, L]``: keys sorted by ``w`` descending within each complete segment
    (ties: lower original index first for ``tie="low"``); tail keys keep their order."""
    B, H, T = w.shape
    perm = np.broadcast_to(np.arange(length, dtype=np.int64), (B, H, length)).copy()
    for g in range(T // segment_size):
        lo = g * segment_size
        seg = w[..., lo:lo + segment_size]
        if tie == "low":
            order = np.argsort(-seg, axis=-1, kind="stable")
        else:
            order = segment_size - 1 - np.argsort(-seg[..., ::-1], axis=-1, kind="stable")
        perm[..., lo:lo + segment_size] = lo + order
    return perm


def select_cumulative_no_fallback(p: np.ndarray, tau: float, valid: np.ndarray,
                                  tie: str = "low") -> tuple[np.ndarray, np.ndarray]:
    """``select_blocks``: per row, the descending prefix up to and including the first
    position whose cumulative sum is ``>= tau`` (times the row total, 1 up to rounding);
    nothing where ``tau`` is never reached (rows without an allowed block).
    Returns ``(mask, boundary)``; boundary = score of the crossing block (NaN if none)."""
    ok = valid & ~np.isnan(p)
    order = rank_order(p, ok, tie)
    srt = np.take_along_axis(np.where(ok, p, 0.0), order, axis=-1)
    cum = np.cumsum(srt, axis=-1)
    # The row total is 1 up to rounding; comparing against tau * total (same summation
    # order) makes tau = 1 select every block of positive mass instead of depending on
    # whether float rounding lands the sum at 1.0 (official: ``cumsum >= threshold``).
    sok = np.take_along_axis(ok, order, axis=-1)
    reached = (cum >= tau * cum[..., -1:]) & sok
    first = np.where(reached.any(axis=-1), reached.argmax(axis=-1), -1)           # [..]
    keep_sorted = (np.arange(p.shape[-1]) <= first[..., None]) & sok
    mask = np.zeros_like(keep_sorted)
    np.put_along_axis(mask, order, keep_sorted, axis=-1)
    cross = np.take_along_axis(srt, np.maximum(first, 0)[..., None], axis=-1)[..., 0]
    return mask, np.where(first >= 0, cross, np.nan)


def segment_mask(length: int, block_size: int, segment_size: int) -> np.ndarray:
    """bool ``[n, n]``: blocks in the same segment (``floor(I/m) == floor(J/m)``)."""
    n, m = num_blocks(length, block_size), segment_size // block_size
    I = np.arange(n)
    return (I[:, None] // m) == (I[None, :] // m)


# ------------------------------------------------------------- token mask
class PermutedTokenMask:
    """Token-level mask of PBS in *original* key coordinates (the token-mask protocol).

    ``mask bool [B, H, n, n]`` is on (query block, permuted key block); ``perm int64 [B, H, L]``.
    Query ``t`` may see original key ``j`` iff ``mask[I(t), J(inv[j])]``; causality by
    original index (``j <= t``) is the attention's ``causal`` flag.
    """

    def __init__(self, mask: np.ndarray, perm: np.ndarray, block_size: int) -> None:
        self.mask = np.asarray(mask, bool)
        self.perm = np.asarray(perm, np.int64)
        self.block_size = int(block_size)
        self.q_len = self.k_len = int(self.perm.shape[-1])
        inv = np.empty_like(self.perm)
        np.put_along_axis(inv, self.perm, np.broadcast_to(np.arange(self.k_len), inv.shape), -1)
        self.key_block = inv // self.block_size              # [B, H, L]: J of original key j

    def batch_heads(self) -> tuple[int, int]:
        return self.mask.shape[0], self.mask.shape[1]

    def token_rows(self, b: int, h0: int, h1: int, r0: int, r1: int) -> np.ndarray:
        """bool ``[h1-h0, r1-r0, L]`` for query rows ``[r0, r1)`` (no causal mask)."""
        rows = self.mask[b, h0:h1][:, np.arange(r0, r1) // self.block_size]       # [H, R, n]
        cols = self.key_block[b, h0:h1][:, None, :]                               # [H, 1, L]
        return np.take_along_axis(rows, np.broadcast_to(cols, rows.shape[:2] + cols.shape[2:]),
                                  axis=-1)

    def to_token_mask(self, causal: bool = True) -> np.ndarray:
        """bool ``[B, H, L, L]`` (original coordinates)."""
        B, H = self.batch_heads()
        t = np.stack([self.token_rows(b, 0, H, 0, self.q_len) for b in range(B)])
        if causal:
            t &= np.tril(np.ones((self.q_len, self.k_len), bool))
        return t


# ------------------------------------------------------------------ method
@register_method(
    "pbs", PBSParams, kind="llm-prefill",
    summary="PBS-Attn: keys sorted within segments by last-block attention, then "
            "mean-pooled block softmax on permuted keys with cumulative tau; diagonal "
            "segment dense",
    paper="arXiv 2510.21270", code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: Any, params: PBSParams, *, causal: bool = True,
           backend: str = "numpy") -> Selection:
    """PBS selection. q ``[B,Hq,L,D]``, k ``[B,Hkv,L,D]`` (bhsd, any float dtype).

    Returns a :class:`Selection` whose ``mask`` is ``block_mask | segment_mask`` in
    (query block, permuted key block) coordinates, ``scores`` the block probabilities
    (NaN rows for segment 0), and extras ``perm [B,Hq,L]``, ``key_importance``,
    ``block_mask`` (the official selection incl. the forced token-0 block),
    ``segment_mask [n,n]``, ``token_mask`` (original coordinates, for attention) and
    ``dense_fallback``.
    """
    p = params
    if not causal:
        raise InputError("causal: PBS-Attn's official code supports causal prefill only "
                         "(causal=True), got causal=False")
    B, Hq, L, D = q.shape
    if k.shape[2] != L:
        raise InputError(f"k: PBS-Attn needs q_len == k_len (prefill), got q_len={L}, "
                         f"k_len={k.shape[2]}")
    b, s = int(p.block_size), int(p.segment_size)
    n = num_blocks(L, b)
    dense = L <= s
    if dense:                      # official: dense causal SDPA; same attention, identity perm
        w = np.zeros((B, Hq, 0))
        perm = np.broadcast_to(np.arange(L, dtype=np.int64), (B, Hq, L)).copy()
    else:
        (w,) = dispatch(KEY_IMPORTANCE_OP.name, backend)(q, k, b, s)
        perm = permutation_from_importance(w, L, s, p.tie)
    G = Hq // k.shape[1]
    k_rep = np.repeat(k, G, axis=1) if G > 1 else k
    k_perm = np.take_along_axis(k_rep, perm[..., None], axis=2)
    (scores,) = dispatch(SCORE_OP.name, backend)(q, k_perm, b, s)

    seg = segment_mask(L, b, s)
    I, J = np.arange(n)[:, None], np.arange(n)[None, :]
    valid = ~seg & (J <= I)
    chosen, boundary = select_cumulative_no_fallback(scores, float(p.tau), valid, p.tie)
    forced = np.broadcast_to(seg, chosen.shape).copy()
    block_mask = chosen.copy()
    if p.force_sink:
        sink_block = np.argmax(perm == 0, axis=-1) // b                           # [B, H]
        sink = np.arange(n)[None, None, :] == sink_block[..., None]               # [B, H, n]
        block_mask |= sink[:, :, None, :]
        forced |= sink[:, :, None, :]
    full = block_mask | seg
    geom = dict(block_q=b, block_k=b, q_len=L, k_len=L)
    return Selection(
        mask=BlockMask(full, **geom),
        scores=BlockScores(scores, **geom),
        boundary=boundary,
        forced=forced,
        extras={"perm": perm, "key_importance": w, "block_mask": block_mask,
                "segment_mask": seg, "dense_fallback": dense,
                "token_mask": PermutedTokenMask(full, perm, b)},
    )
