"""BlockBERT: blockwise self-attention with one block permutation per head.

Qiu, Ma, Levy, Yih, Wang, Tang, "Blockwise Self-Attention for Long Document Understanding",
Findings of EMNLP 2020 (arXiv 1911.02972). The official repository
``xptree/BlockBERT@c1117102c184764ff215248523aa315d0b7594a9`` holds only a README, with no
code: this module is paper-level.

The sequence of ``N`` tokens is split into ``n`` contiguous blocks of ``ceil(N / n)`` tokens
(the paper uses equal blocks; a ragged last block is allowed here). Head ``h`` has a
permutation ``pi_h`` of the blocks; query block ``p`` attends only to key block ``pi_h(p)``::

    M_h[i, j] = 1  iff  pi_h(block(i)) == block(j)

The paper's permutations are cyclic shifts, ``pi(p) = (p + s) mod n``. Heads are split among
the shifts with more heads on the identity; the paper's 12-head ratios (``n = 2``: 10:2,
``n = 3``: 8:2:2) are unverified (spec section 7), so ``head_shifts`` is a parameter.
The default ``None`` assigns shifts round robin (``s_h = h mod n``), which is **not** the
paper's split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.blockmask import BlockMask
from ..core.errors import InputError
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..methods.base import check_range, register_method


@dataclass(frozen=True)
class BlockBERTParams:
    """``num_blocks`` (paper: 2 or 3); ``head_shifts``: cyclic shift per query head, or
    ``None`` for round robin."""

    num_blocks: int = 2
    head_shifts: tuple[int, ...] | None = None

    def validate(self) -> None:
        check_range("num_blocks", self.num_blocks, 1, integer=True)
        if self.head_shifts is not None:
            if not isinstance(self.head_shifts, (tuple, list)) or not self.head_shifts:
                raise InputError(
                    f"head_shifts: expected a sequence of shifts, got {self.head_shifts!r}"
                )
            for i, s in enumerate(self.head_shifts):
                check_range(f"head_shifts[{i}]", s, 0, self.num_blocks - 1, integer=True)


def blockbert_mask(num_q_heads: int, num_blocks: int, head_shifts: tuple[int, ...] | None = None):
    """Block-level mask bool ``[Hq, n, n]``: ``mask[h, p, (p + s_h) mod n] = True``."""
    shifts = (
        np.arange(num_q_heads) % num_blocks
        if head_shifts is None
        else np.asarray(head_shifts, dtype=np.int64)
    )
    if shifts.size != num_q_heads:
        raise InputError(
            f"head_shifts: expected {num_q_heads} shifts (one per query head), got {shifts.size}"
        )
    p = np.arange(num_blocks)
    m = np.zeros((num_q_heads, num_blocks, num_blocks), dtype=bool)
    m[np.arange(num_q_heads)[:, None], p[None, :], (p[None, :] + shifts[:, None]) % num_blocks] = (
        True
    )
    return m


define_op("blockbert_mask", blockbert_mask, outputs=("mask",), kind="exact",
          host_only="a boolean pattern of the head shifts: no arithmetic on the inputs")


@register_method(
    "blockbert",
    BlockBERTParams,
    kind="static",
    summary="blockwise self-attention, one cyclic block permutation per head",
    paper="Qiu et al., BlockBERT, Findings of EMNLP 2020 (arXiv 1911.02972)",
    code="xptree/BlockBERT@c1117102c184764ff215248523aa315d0b7594a9 (README only)",
)
def select(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
    params: BlockBERTParams,
    *,
    causal: bool = False,
    backend: str = "numpy",
) -> Selection:
    """A ``BlockMask [1, Hq, n, n]`` with ``block = ceil(N / n)`` (BERT is bidirectional:
    pass ``causal=False`` to :func:`refattn.attention`)."""
    L = k.shape[2]
    if q.shape[2] != L:
        raise InputError(f"q: BlockBERT's mask is square, got Sq = {q.shape[2]}, Sk = {L}")
    n = int(params.num_blocks)
    if n > L:
        raise InputError(f"num_blocks: {n} blocks for {L} tokens")
    block = -(-L // n)
    if -(-L // block) != n:
        raise InputError(
            f"num_blocks: {L} tokens cannot be cut into {n} blocks of ceil(L/n) = {block}"
        )
    m = dispatch("blockbert_mask", backend)(q.shape[1], n, params.head_shifts)
    return Selection(mask=BlockMask(m[None], block_q=block, block_k=block, q_len=L, k_len=L))
