"""BlockRank: structured in-context ranking -- block-sparse mask and attention relevance.

Paper: Gupta et al., "Scalable In-context Ranking with Generative Models", arXiv 2510.05396.
Official code: ``nilesh2797/BlockRank@c6ddbf93c015174fdf67c1055a06ef90cd4ec72b`` --
``src/blockrank/blockrank_std_attention.py`` (``blockrank_mask_fn``, eager mask),
``src/blockrank/dataset.py:block_icr_collate_fn`` (padding, position ids),
``src/blockrank/losses.py:compute_auxiliary_attention_loss`` (the inference scorer).

The prompt is ``M`` segments: block 0 the instruction, blocks ``1..M-2`` one document each,
block ``M-1`` the query (with the completion's first token ``[``). The official collate
left-pads every block to ``Hb`` tokens (``valid [B, M, Hb]``). Query token ``(qb, qp)`` sees
key ``(kb, kp)`` iff both are real tokens and

* ``qb == 0``: ``kb == 0 and kp <= qp`` (causal instruction);
* ``1 <= qb <= M-2``: ``kb == 0`` or (``kb == qb and kp <= qp``) -- documents never see
  each other;
* ``qb == M-1``: ``kb < qb`` or (``kb == qb and kp <= qp``).

Position ids (``permutation_invariant_pos=True``): ``c = cumsum(valid)`` per block; block 0
``c - 1``; every document ``c + L0 - 1`` (all start at ``L0``, the instruction length); the
query block ``c + 16384 - 1``; padding 0.

Relevance (spec section 1(d)): with ``i*`` the first completion token (``[``) and the rows
``{i*-1, i*}``, per head ``h`` and row ``r`` a softmax over the logits of *all document
tokens jointly*, ``P = softmax_j(q_r . k_j * scale)``, ``j`` in blocks ``1..M-2``; then
``score[n] = 1/(2H) sum_h sum_r sum_{t in doc n} P[h, r, t]`` (sums to 1), ``logits =
score / tau`` and the ranking is the top ``min(10, N_doc)`` documents by score. Ties: lower
document index first (``torch.topk`` leaves them unspecified). The official eager/Triton
paths use ``scale = d^-1/2``; the SDPA path scores without it (``scale=1.0`` here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..core.blockmask import BlockMask, num_blocks
from ..core.errors import InputError
from ..core.layout import default_scale, normalize_qkv
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..methods.base import check_range, register_method
from ..reference.selection import rank_order

PAPER = "Gupta et al., Scalable In-context Ranking with Generative Models, arXiv 2510.05396"
CODE = "nilesh2797/BlockRank@c6ddbf93c015174fdf67c1055a06ef90cd4ec72b"
QUERY_POSITION_START = 16384  # first position id of the query block (official constant)


# ------------------------------------------------------------------- layout
def valid_from_segments(segments: Sequence[int]) -> np.ndarray:
    """``valid bool [1, M, Hb]`` of an unpadded prompt given its segment lengths
    ``(instruction, doc_1, ..., doc_N, query)``: each block left-padded to the longest,
    exactly as the official collate pads (without the rounding of ``Hb`` to 16)."""
    seg = np.asarray(segments)
    if seg.ndim != 1 or seg.size < 3 or seg.dtype.kind not in "iu" or (seg < 1).any():
        raise InputError(f"segments: expected >= 3 positive integer lengths (instruction, "
                         f"documents..., query), got {segments!r}")
    hb = int(seg.max())
    return (np.arange(hb)[None, :] >= (hb - seg)[:, None])[None]


def _check_valid(valid: Any) -> np.ndarray:
    v = np.asarray(valid)
    if v.ndim != 3 or v.shape[1] < 3 or v.dtype.kind not in "biu":
        raise InputError(f"valid: expected an integer/bool [B, M, Hb] array with M >= 3, got "
                         f"shape {v.shape}, dtype {v.dtype}")
    return v.astype(bool)


class BlockRankMask:
    """The BlockRank attention mask on the padded block grid (token-mask protocol).

    ``valid bool [B, M, Hb]``; the sequence is ``S = M * Hb`` slots, slot ``m * Hb + p`` is
    position ``p`` of block ``m``. :meth:`token_rows` gives bool ``[1, R, S]`` (one mask for
    every head), :meth:`to_token_mask` the dense ``[B, 1, S, S]`` mask.
    """

    def __init__(self, valid: Any) -> None:
        self.valid = _check_valid(valid)
        B, self.num_blocks, self.block_len = self.valid.shape
        self.q_len = self.k_len = self.num_blocks * self.block_len
        self.head_kind = "q"
        self._blk = np.repeat(np.arange(self.num_blocks), self.block_len)
        self._pos = np.tile(np.arange(self.block_len), self.num_blocks)

    def batch_heads(self) -> tuple[int, int]:
        return self.valid.shape[0], 1

    def token_rows(self, b: int, h0: int, h1: int, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of batch ``b``: bool ``[1, R, S]`` (``blockrank_mask_fn``)."""
        M, vb = self.num_blocks, self.valid[b].reshape(-1)
        qb, qp = self._blk[r0:r1, None], self._pos[r0:r1, None]
        kb, kp = self._blk[None, :], self._pos[None, :]
        own = (kb == qb) & (kp <= qp)
        doc = (qb >= 1) & (qb <= M - 2) & (kb == 0)
        query = (qb == M - 1) & (kb < qb)
        allowed = (own | doc | query) & vb[r0:r1, None] & vb[None, :]
        return allowed[None]

    def to_token_mask(self, causal: bool = False) -> np.ndarray:
        """bool ``[B, 1, S, S]`` (the mask already implies causality)."""
        return np.stack([self.token_rows(b, 0, 1, 0, self.q_len) for b in
                         range(self.valid.shape[0])])

    def covering_blockmask(self, block: int) -> BlockMask:
        """The :class:`BlockMask` ``[B, 1, Qb, Kb]`` of ``block x block`` tiles holding at
        least one allowed pair (a superset; the token mask is exact)."""
        S, nb = self.q_len, num_blocks(self.q_len, block)
        out = np.zeros((self.valid.shape[0], 1, nb, nb), bool)
        for b in range(self.valid.shape[0]):
            for i in range(nb):
                rows = self.token_rows(b, 0, 1, i * block, min((i + 1) * block, S))[0].any(0)
                pad = np.zeros(nb * block, bool)
                pad[:S] = rows
                out[b, 0, i] = pad.reshape(nb, block).any(-1)
        return BlockMask(out, block_q=block, block_k=block, q_len=S, k_len=S)


def position_ids(valid: Any, query_start: int = QUERY_POSITION_START) -> np.ndarray:
    """Permutation-invariant position ids int64 ``[B, M * Hb]`` (``block_icr_collate_fn``):
    block 0 ``c-1``, documents ``c + L0 - 1``, query block ``c + query_start - 1``, pads 0,
    with ``c`` the running count of real tokens in the block."""
    v = _check_valid(valid)
    c = np.cumsum(v, axis=-1)
    L0 = v[:, 0].sum(-1)[:, None, None]
    pos = np.empty(v.shape, np.int64)
    pos[:, 0] = c[:, 0] - 1
    pos[:, 1:-1] = c[:, 1:-1] + L0 - 1
    pos[:, -1] = c[:, -1] + int(query_start) - 1
    return np.where(v, pos, 0).reshape(v.shape[0], -1)


def bracket_rows(labels: Any, num_last_queries: int = 16) -> np.ndarray:
    """Absolute query rows int64 ``[B, 2]`` = ``{i*-1, i*}`` with ``i*`` the first label
    ``!= -100`` among the last ``num_last_queries`` slots (``compute_auxiliary_attention_loss``)."""
    lab = np.asarray(labels)
    if lab.ndim != 2 or lab.shape[1] < num_last_queries:
        raise InputError(f"labels: expected [B, S] with S >= {num_last_queries}, got {lab.shape}")
    last = lab[:, -num_last_queries:] > -100
    if not last.any(-1).all():
        raise InputError("labels: no completion token (label > -100) among the last "
                         f"{num_last_queries} positions")
    i = last.argmax(-1)
    if (i < 1).any():
        raise InputError("labels: the bracket token must not be the first of the last "
                         f"{num_last_queries} positions (official assert bracket_indices >= 0)")
    base = lab.shape[1] - num_last_queries
    return np.stack([base + i - 1, base + i], axis=-1).astype(np.int64)


# ------------------------------------------------------------------ scoring
def blockrank_doc_scores(q: np.ndarray, k: np.ndarray, valid: np.ndarray, rows: np.ndarray,
                         scale: float, *, out: tuple[np.ndarray] | None = None
                         ) -> tuple[np.ndarray]:
    """Document relevance ``score [B, N_doc]`` float64 (sums to 1 per batch item).

    q ``[B, H, M*Hb, D]``, k ``[B, Hk, M*Hb, D]`` (post-RoPE, GQA ``h -> h // (H/Hk)``),
    ``valid [B, M, Hb]``, ``rows int [B, R]`` query rows in the last block. For every head
    and row, ``P = softmax over the document slots (blocks 1..M-2) of q.k * scale``; padding
    slots get 0 (the official additive ``0.7 * finfo.min``). A row that is itself padding
    sees no key: all its logits equal the mask constant and the official softmax is uniform
    over all ``(M-2) * Hb`` document slots; that is reproduced. Then
    ``score[n] = mean_{h, r} sum_{t in doc n} P[h, r, t]``.
    """
    v = np.asarray(valid).astype(bool)
    B, H, S, D = q.shape
    M, Hb = v.shape[1:]
    G = H // k.shape[1]
    nd = M - 2
    res = np.zeros((B, nd)) if out is None else out[0]
    for b in range(B):
        dv = v[b, 1:-1].reshape(-1)                                     # [nd*Hb]
        kd = np.repeat(k[b, :, Hb:S - Hb].astype(np.float64), G, axis=0)  # [H, nd*Hb, D]
        acc = np.zeros(nd * Hb)
        for r in np.asarray(rows[b]).tolist():
            if not v.reshape(B, -1)[b, r]:
                acc += H / (nd * Hb)                                    # uniform (see above)
                continue
            qq = q[b, :, r].astype(np.float64)                          # [H, D]
            s = np.einsum("hd,hjd->hj", qq, kd) * scale
            s = np.where(dv[None], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            acc += (p / p.sum(-1, keepdims=True)).sum(0)
        res[b] = acc.reshape(nd, Hb).sum(-1) / (H * len(rows[b]))
    return (res,)


def query_logits(q: np.ndarray, k: np.ndarray, valid: Any, rows: Any,
                 scale: float | None = None) -> np.ndarray:
    """Masked logits float64 ``[B, H, R, S]`` of the query ``rows [B, R]`` over every key
    (``s_last`` of ``eager_blockrank_attention_forward`` for the last 16 rows): ``q.k *
    scale`` where :class:`BlockRankMask` allows, ``-inf`` elsewhere (the official additive
    ``0.7 * finfo.min``)."""
    m = BlockRankMask(valid)
    B, H, S, D = q.shape
    G = H // k.shape[1]
    sc = default_scale(D, scale)
    rows = np.asarray(rows, np.int64).reshape(B, -1)
    out = np.empty((B, H, rows.shape[1], S))
    for b in range(B):
        kk = np.repeat(np.asarray(k[b], np.float64), G, axis=0)           # [H, S, D]
        s = np.einsum("hrd,hsd->hrs", np.asarray(q[b][:, rows[b]], np.float64), kk) * sc
        allowed = np.concatenate([m.token_rows(b, 0, 1, r, r + 1)[0] for r in rows[b]])
        out[b] = np.where(allowed[None], s, -np.inf)
    return out


BLOCKRANK_SCORE = define_op("blockrank_doc_scores", blockrank_doc_scores,
                            outputs=("score",), kind="array")


def rank_documents(score: np.ndarray, top_k: int = 10) -> np.ndarray:
    """Top ``min(top_k, N_doc)`` document indices int64 ``[B, k]``, score descending, ties to
    the lower index (``torch.topk`` in ``scripts/eval_attn.py``)."""
    return rank_order(score)[..., : min(int(top_k), score.shape[-1])].astype(np.int64)


def blockrank_rank(q: np.ndarray, k: np.ndarray, valid: Any, rows: Any, *,
                   scale: float | None = None, temperature: float = 0.05, top_k: int = 10,
                   backend: str = "numpy") -> dict[str, np.ndarray]:
    """Scores, logits (``score / temperature``) and the ranking of every batch item."""
    v = _check_valid(valid)
    q, k, _, _ = normalize_qkv(q, k)
    B, H, S, D = q.shape
    if S != v.shape[1] * v.shape[2] or k.shape[2] != S or k.shape[0] != B or v.shape[0] != B:
        raise InputError(f"valid: [B, M, Hb] = {v.shape} does not match q {q.shape} / k {k.shape} "
                         "(need S = M * Hb)")
    rows = np.asarray(rows, np.int64).reshape(B, -1)
    Hb = v.shape[2]
    if ((rows < S - Hb) | (rows >= S)).any():
        raise InputError(f"rows: query rows must lie in the last block [{S - Hb}, {S}), got {rows}")
    check_range("temperature", temperature, 0, lo_open=True)
    sc = default_scale(D, scale)
    (score,) = dispatch(BLOCKRANK_SCORE.name, backend, (q, k))(q, k, v, rows, sc)
    score = np.asarray(score, np.float64)
    return {"score": score, "logits": score / temperature, "ranking": rank_documents(score, top_k),
            "rows": rows}


# ------------------------------------------------------------------- method
@dataclass(frozen=True)
class BlockRankParams:
    """BlockRank parameters (official names in brackets).

    * ``segments``: real-token lengths ``(instruction, doc_1, ..., doc_N, query)`` of the
      input sequence laid out contiguously (``S = sum``); the query segment includes the
      completion. Each block is left-padded internally as the official collate does.
      Required (no default layout exists).
    * ``completion_len``: tokens of the completion at the end of the query segment; the
      bracket ``[`` is its first token, rows ``{i*-1, i*}``. 1 at inference.
    * ``temperature`` [``temperature``] 0.05, ``top_k`` 10 (``eval_attn.py``).
    * ``scale``: logit scale; ``None`` = ``d^-1/2`` (eager/Triton); ``1.0`` = SDPA path.
    * ``block_size``: tile of the covering :class:`BlockMask` (the token mask is exact).
    """

    segments: tuple[int, ...] | None = None
    completion_len: int = 1
    temperature: float = 0.05
    top_k: int = 10
    scale: float | None = None
    block_size: int = 64

    def validate(self) -> None:
        if self.segments is None:
            raise InputError("segments: required, the lengths (instruction, doc_1, ..., doc_N, "
                             "query) of the prompt, e.g. segments=[20, 12, 30, 10]")
        valid_from_segments(list(self.segments))
        check_range("completion_len", self.completion_len, 1, integer=True)
        check_range("temperature", self.temperature, 0, lo_open=True)
        check_range("top_k", self.top_k, 1, integer=True)
        check_range("block_size", self.block_size, 1, integer=True)
        if self.scale is not None:
            check_range("scale", self.scale, 0, lo_open=True)


def scatter_to_grid(x: np.ndarray, valid: np.ndarray, axis: int = 2) -> np.ndarray:
    """Place the contiguous tokens of ``x`` (axis ``axis``) into the padded grid slots of
    ``valid [1, M, Hb]`` (zeros in padding slots)."""
    flat = valid.reshape(-1)
    shape = list(x.shape)
    shape[axis] = flat.size
    g = np.zeros(shape, np.float64)
    idx = [slice(None)] * x.ndim
    idx[axis] = np.nonzero(flat)[0]
    g[tuple(idx)] = x
    return g


@register_method("blockrank", BlockRankParams, kind="importance",
                 summary="structured inter-document mask; query->document attention relevance",
                 paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: BlockRankParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """BlockRank on contiguous prompts q ``[B, H, S, D]``, k ``[B, Hk, S, D]`` with
    ``S = sum(segments)``.

    Returns a :class:`Selection`: ``mask`` the covering ``block_size`` BlockMask on the
    contiguous sequence; ``extras``: ``token_mask`` (exact, contiguous order),
    ``position_ids [S]``, ``score``/``logits [B, N_doc]``, ``ranking [B, k]``, ``rows``.
    """
    seg = np.asarray(params.segments, np.int64)
    S = q.shape[2]
    if int(seg.sum()) != S or k.shape[2] != S:
        raise InputError(f"segments: lengths sum to {int(seg.sum())}, but the sequence has "
                         f"{S} query and {k.shape[2]} key tokens")
    if params.completion_len >= seg[-1]:
        raise InputError(f"completion_len: must be < the query segment length {seg[-1]}, got "
                         f"{params.completion_len}")
    valid = valid_from_segments(seg)
    slots = np.nonzero(valid.reshape(-1))[0]                  # grid slot of each token
    B = q.shape[0]
    vB = np.broadcast_to(valid, (B,) + valid.shape[1:])
    bracket = slots[S - params.completion_len]
    rows = np.broadcast_to(np.array([slots[S - params.completion_len - 1], bracket]), (B, 2))
    res = blockrank_rank(scatter_to_grid(q, valid), scatter_to_grid(k, valid), vB, rows,
                         scale=params.scale, temperature=params.temperature,
                         top_k=params.top_k, backend=backend)
    tm = ContiguousBlockRankMask(seg)
    return Selection(mask=tm.covering_blockmask(int(params.block_size)), extras={
        "token_mask": tm, "position_ids": position_ids(valid).reshape(-1)[slots],
        "score": res["score"], "logits": res["logits"], "ranking": res["ranking"],
        "rows": np.array([S - params.completion_len - 1, S - params.completion_len])})


class ContiguousBlockRankMask(BlockRankMask):
    """:class:`BlockRankMask` of an unpadded prompt (segments laid out contiguously): the
    same rule, in the token order of the input (``S = sum(segments)``)."""

    def __init__(self, segments: Sequence[int]) -> None:
        super().__init__(valid_from_segments(segments))
        self._slots = np.nonzero(self.valid.reshape(-1))[0]
        self.q_len = self.k_len = self._slots.size
        self._blk, self._pos = self._blk[self._slots], self._pos[self._slots]

    def token_rows(self, b: int, h0: int, h1: int, r0: int, r1: int) -> np.ndarray:
        M = self.num_blocks
        qb, qp = self._blk[r0:r1, None], self._pos[r0:r1, None]
        kb, kp = self._blk[None, :], self._pos[None, :]
        own = (kb == qb) & (kp <= qp)
        allowed = own | ((qb >= 1) & (qb <= M - 2) & (kb == 0)) | ((qb == M - 1) & (kb < qb))
        return allowed[None]

    def to_token_mask(self, causal: bool = False) -> np.ndarray:
        return self.token_rows(0, 0, 1, 0, self.q_len)[None]
