"""MoBA -- Mixture of Block Attention (Moonshot AI): per-token routing to key blocks.

Paper: Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", arXiv 2502.13189
(tech report in the repository). Official code: ``MoonshotAI/MoBA@61e456bc`` --
``moba/moba_naive.py:moba_attn_varlen_naive`` (reference semantics, mirrored here) and
``moba/moba_efficient.py:moba_attn_varlen`` (same selection, except ``topk = 1``: dense
causal there; parameter ``impl``).

Rule, for one sequence and one query head ``h`` reading kv head ``g = h // (Hq/Hkv)``
(spec ``llm-prefill.md`` section 1):

* key blocks ``I_j = [jB, min((j+1)B, Sk))``; the last block may be partial;
* pooled key ``kbar_j = mean_{t in I_j} K_t`` over the block's *true* length, stored in the
  input dtype (the official code takes the mean on the input tensor), then upcast;
* gate ``s_j(t) = <q_t, kbar_j>`` -- no ``1/sqrt(D)``, no softmax (official: fp32; here float64);
* query ``t`` sits at key position ``p = t + Sk - Sq`` (bottom-right; the official code runs
  only ``Sq == Sk``) in its own block ``c = floor(p / B)``;
* selected: ``{c} U top_(k-1){ s_j(t) : j < c }`` -- ``k`` (``topk``) counts the own block;
  future blocks ``j > c`` are never selected. Ties: lower block index first (``tie="low"``;
  the official ``torch.topk(sorted=False)`` leaves ties implementation-defined).

The result is a :class:`BlockMask` with ``block_q = 1`` (one row per query token) and
``block_k = B``. Attention on it must be causal: inside the own block query ``t`` sees keys
``[cB, p]`` only, exactly as the official code's token-level ``tril``.
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

PAPER = "Lu et al., MoBA: Mixture of Block Attention for Long-Context LLMs, arXiv 2502.13189"
CODE = "MoonshotAI/MoBA@61e456bc956c5a25fd9c84e5496b661329cb1b72"


@dataclass(frozen=True)
class MobaParams:
    """MoBA parameters (official names in brackets).

    * ``block_size`` [``moba_chunk_size``]: key block (chunk) length ``B``. Default 512, the
      tech report's scaling-law setting (``examples/llama.py`` defaults to 4096 with k = 12
      for the 1M-context model).
    * ``topk`` [``moba_topk``]: blocks per query token, *including* the own block.
    * ``tie``: ``"low"`` (lower block index wins) or ``"high"`` among equal gate scores.
    * ``impl``: ``"efficient"`` (``moba_attn_varlen``, the production path the wrapper's
      ``attn="moba"`` runs) or ``"naive"`` (``moba_attn_varlen_naive``). They select the same
      blocks except at ``topk = 1``: the efficient path computes ``min(moba_topk - 1,
      num_filtered_chunk) = 0`` and falls back to dense causal attention
      (``moba_efficient.py``, "corner case"), the naive one keeps the own block only.
    """

    block_size: int = 512
    topk: int = 3
    tie: str = "low"
    impl: str = "efficient"

    def validate(self) -> None:
        check_range("block_size", self.block_size, 1, integer=True)
        check_range("topk", self.topk, 1, integer=True)
        check_choice("tie", self.tie, TIES)
        check_choice("impl", self.impl, ("efficient", "naive"))


# ----------------------------------------------------------------------- scoring
def pooled_keys(k: np.ndarray, block_size: int) -> np.ndarray:
    """Block means of the keys: float64 ``[B, Hkv, Kb, D]`` from k ``[B, Hkv, Sk, D]``.

    ``kbar_j = (1/|I_j|) sum_{t in I_j} K_t`` with ``|I_j|`` the true length of block ``j``
    (the last block may be partial). The mean is rounded to k's dtype before it is upcast,
    as the official code stores it in the input dtype (spec section 1(g)-3); float64 inputs
    are not rounded.
    """
    B, H, S, D = k.shape
    kb = num_blocks(S, block_size)
    pad = kb * block_size - S
    kk = k.astype(np.float64)
    if pad:
        kk = np.concatenate([kk, np.zeros((B, H, pad, D))], axis=2)
    sums = kk.reshape(B, H, kb, block_size, D).sum(axis=3)
    counts = np.minimum(block_size, S - np.arange(kb) * block_size).astype(np.float64)
    mean = sums / counts[:, None]
    if k.dtype != np.float64:
        mean = mean.astype(k.dtype).astype(np.float64)
    return mean


def moba_gate(q: np.ndarray, k: np.ndarray, block_size: int, *,
              out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """MoBA/FlashMoBA gate ``s[b, h, t, j] = <q_t, kbar_j>`` (no scale, no softmax).

    q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]`` (any float dtype); returns ``(gate,)`` with
    gate float64 ``[B, Hq, Sq, Kb]``, ``Kb = ceil(Sk / block_size)``, for *every* block
    (future blocks included; the selection masks them). GQA: query head ``h`` reads the
    pooled keys of kv head ``h // (Hq/Hkv)``.
    """
    Bn, Hq, Sq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kbar = pooled_keys(k, int(block_size))
    kb = kbar.shape[2]
    gate = np.empty((Bn, Hq, Sq, kb), np.float64) if out is None else out[0]
    R = rows_per_chunk(Sq, 8 * G * (D + kb), 8 * (gate.size + kbar.size), "moba gate")
    for b in range(Bn):
        for g in range(Hkv):
            for r0 in range(0, Sq, R):
                r1 = min(r0 + R, Sq)
                qq = q[b, g * G:(g + 1) * G, r0:r1].astype(np.float64)    # [G, R, D]
                gate[b, g * G:(g + 1) * G, r0:r1] = qq @ kbar[b, g].T     # [G, R, Kb]
    return (gate,)


MOBA_SCORE = define_op("moba_score", moba_gate, outputs=("gate",), kind="array")


# -------------------------------------------------------------------- selection
def own_blocks(q_len: int, k_len: int, block_size: int) -> np.ndarray:
    """Own (current) key block of every query row, int64 ``[Sq]``: ``floor(p / B)`` at the
    bottom-right aligned position ``p = t + Sk - Sq``; ``-1`` for rows that see no key."""
    p = np.arange(q_len, dtype=np.int64) + (k_len - q_len)
    return np.where(p >= 0, p // int(block_size), -1)


def route_blocks(gate: np.ndarray, own: np.ndarray, topk: int, tie: str,
                 backend: str = "numpy") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MoBA rule on a gate ``[..., Sq, Kb]``: own block plus top-(k-1) past blocks.

    Returns ``mask`` bool like ``gate``, ``boundary [..., Sq]`` (the (k-1)-th past score,
    ``nan`` where no past block was selected) and ``past`` bool ``[Sq, Kb]`` (candidates).
    The top-(k-1) runs op ``selection_topk_rows`` on ``backend``.
    """
    xp = array_module(gate)                               # NumPy, or CuPy for a device gate
    j = xp.arange(gate.shape[-1])
    own = xp.asarray(own)
    past = j[None, :] < own[:, None]                      # strictly past blocks j < c(t)
    mine = j[None, :] == own[:, None]                     # the own block (none if c = -1)
    sel, boundary = topk_per_row(gate, int(topk) - 1, valid=past, tie=tie, backend=backend)
    return sel | mine, boundary, past


def official_need_attend(gate: np.ndarray, own: np.ndarray, topk: int, tie: str,
                         backend: str = "numpy") -> np.ndarray:
    """``need_attend`` exactly as ``moba_attn_varlen_naive`` builds it, before its ``tril``.

    The naive code sets the gate to ``+inf`` on the own block and ``-inf`` on future blocks,
    then keeps ``topk(gate, min(k, n))``. Rows whose own block index is ``< k - 1`` have too
    few finite candidates, so the top-k also takes ``-inf`` *future* blocks; the official
    token-level ``tril`` removes them afterwards. Which future blocks ``torch.topk`` takes is
    implementation-defined; here they follow ``tie`` (so only the per-row *count* of future
    picks, not their positions, matches the official array). The top-k runs op
    ``selection_topk_rows`` on ``backend``.
    """
    xp = array_module(gate)
    j = xp.arange(gate.shape[-1])
    own = xp.asarray(own)
    masked = xp.where(j[None, :] < own[:, None], gate, -np.inf)
    masked = xp.where(j[None, :] == own[:, None], np.inf, masked)
    need, _ = topk_per_row(masked, min(int(topk), gate.shape[-1]), tie=tie, backend=backend)
    return need


@register_method("moba", MobaParams, kind="llm-prefill",
                 summary="per-token gate q.mean(K_block); own block + top-(k-1) past blocks",
                 paper=PAPER, code=CODE, device=True)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: MobaParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """MoBA routing on canonical arrays q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``.

    Returns a :class:`Selection`: ``mask`` ``[B, Hq, Sq, Kb]`` with ``block_q = 1``,
    ``block_k = block_size``; ``scores`` the gate on candidate and own blocks (``-inf`` on
    future blocks); ``boundary [B, Hq, Sq]``; ``forced`` the own block; ``extras``:
    ``gate`` (raw gate on every block, as the official ``gate_raw``) and ``need_attend``
    (the official pre-``tril`` selection, see :func:`official_need_attend`).
    """
    if not causal:
        raise InputError("causal: MoBA's router is causal by construction (the official code "
                         "has no non-causal mode); use method 'flashmoba' for causal=False")
    B = int(params.block_size)
    Sq, Sk = q.shape[2], k.shape[2]
    (gate,) = dispatch(MOBA_SCORE.name, backend, (q, k))(q, k, B)
    own = own_blocks(Sq, Sk, B)
    mask, boundary, past = route_blocks(gate, own, int(params.topk), params.tie, backend)
    xp = array_module(gate)             # device inputs (backend "cupy") stay on the device
    if params.impl == "efficient" and int(params.topk) == 1:
        # moba_efficient.py: moba_topk - 1 = 0 -> flash_attn_varlen_func(causal=True)
        mask = xp.broadcast_to(xp.arange(gate.shape[-1])[None, :] <= xp.asarray(own)[:, None],
                               mask.shape).copy()
    mine = xp.arange(gate.shape[-1])[None, :] == xp.asarray(own)[:, None]
    scores = xp.where(past | mine, gate, -np.inf)
    geo = dict(block_q=1, block_k=B, q_len=Sq, k_len=Sk)
    return Selection(
        mask=BlockMask(mask, **geo),
        scores=BlockScores(scores, **geo),
        boundary=boundary,
        forced=xp.broadcast_to(mine, mask.shape),
        extras={"gate": gate,
                "need_attend": official_need_attend(gate, own, int(params.topk), params.tie,
                                                    backend),
                "own_block": own},
    )
