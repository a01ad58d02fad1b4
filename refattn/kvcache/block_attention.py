"""Block-Attention (RAG prefill): passages attend within themselves, the last block globally.

Ma et al., "Block-Attention for Efficient Prefilling" (earlier "Block-Attention for
Efficient RAG"), arXiv 2409.15355. Official code
``TemporaryLoRA/Block-Attention@c84e38b86997a25d007149478bf0c730a922561d``:
``src/data/block.py`` (``build_attention_mask``) and ``server/block_generate_server.py``
(KV reuse with position re-encoding).

Blocks ``b = 0..n-1`` cover ``[o_b, o_b + n_b)``; the last block (instruction + question,
then the response) is the only global one::

    M[i, j] = (j <= i) and (blk(i) == blk(j) or blk(i) == n - 1)

Inference: each block ``b < n-1`` is prefilled alone with positions ``0..n_b-1``; its keys are
un-rotated and re-rotated to the global positions ``o_b + u`` (net rotation ``R(o_b)``), so
the reused cache equals the training-time cache; values are untouched. The official code
does both rotations in fp32 with a bf16 cast after each (two roundings), with the model's
own rotary embedding (``LlamaRotaryEmbedding(config)``: Llama-3.1 models carry the
``"llama3"`` ``rope_scaling``); the reference rotates once in float64
(:func:`reencode_block_keys`, ``rope_base`` and HF ``rope_scaling``).

Segmenting text into blocks is data processing (``src/data``) and is out of scope: the
caller gives ``block_sizes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.blockmask import BlockMask
from ..core.errors import InputError
from ..core.keepset import TokenMask
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..methods.base import check_range, register_method
from ._common import check_rope_scaling, freeze_rope_scaling, rerotate


@dataclass(frozen=True)
class BlockAttentionParams:
    """``block_sizes``: tokens per block in order, the last one global (required; they
    must add up to the sequence length). ``rope_base`` (the model's ``rope_theta``) and
    ``rope_scaling`` (HF ``config.rope_scaling``, e.g. ``{"rope_type": "llama3", ...}``;
    ``None`` = plain RoPE; see :func:`refattn.kvcache._common.rope_inv_freq`) for
    :func:`reencode_block_keys`. A ``rope_scaling`` dict is stored as its sorted
    ``(key, value)`` pairs (the dataclass is frozen)."""

    block_sizes: tuple[int, ...] = ()
    rope_base: float = 10000.0
    rope_scaling: dict | tuple | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope_scaling", freeze_rope_scaling(self.rope_scaling))

    def validate(self) -> None:
        if not isinstance(self.block_sizes, (tuple, list)) or not self.block_sizes:
            raise InputError(
                "block_sizes: expected a non-empty sequence of block lengths (the last block "
                f"is global), got {self.block_sizes!r}"
            )
        for i, n in enumerate(self.block_sizes):
            check_range(f"block_sizes[{i}]", n, 1, integer=True)
        check_range("rope_base", self.rope_base, 0.0, lo_open=True)
        check_rope_scaling(self.rope_scaling)


def block_ids(block_sizes: tuple[int, ...]) -> np.ndarray:
    """Block index of every token, int64 ``[sum(block_sizes)]``."""
    return np.repeat(np.arange(len(block_sizes)), np.asarray(block_sizes, dtype=np.int64))


def block_attention_mask(block_sizes: tuple[int, ...], length: int) -> np.ndarray:
    """The training mask bool ``[L, L]`` (see the module docstring)."""
    if int(np.sum(block_sizes)) != length:
        raise InputError(
            f"block_sizes: they add up to {int(np.sum(block_sizes))} tokens, "
            f"but the sequence has {length}"
        )
    blk = block_ids(tuple(block_sizes))
    i, j = np.arange(length)[:, None], np.arange(length)[None, :]
    last = len(block_sizes) - 1
    return (j <= i) & ((blk[:, None] == blk[None, :]) | (blk[:, None] == last))


define_op("block_attention_mask", block_attention_mask, outputs=("mask",), kind="exact",
          host_only="a boolean pattern of the block sizes: no arithmetic on the inputs")


def local_positions(block_sizes: tuple[int, ...]) -> np.ndarray:
    """Positions used when each block is prefilled alone: ``0..n_b-1`` per block."""
    return np.concatenate([np.arange(n) for n in block_sizes])


def reencode_block_keys(
    k_local: np.ndarray,
    block_sizes: tuple[int, ...],
    base: float = 10000.0,
    scaling: dict | None = None,
) -> np.ndarray:
    """Keys ``[..., L, D]`` post-RoPE at block-local positions -> keys at global positions
    ``o_b + u`` (rotate-half RoPE, ``R(global - local)``), float64. ``base`` and
    ``scaling`` (HF ``rope_scaling``, e.g. ``"llama3"``) are the model's RoPE
    (:func:`refattn.kvcache._common.rope_inv_freq`); take them from
    :class:`BlockAttentionParams` (``rope_base``, ``rope_scaling``)."""
    if k_local.shape[-2] != int(np.sum(block_sizes)):
        raise InputError(
            f"k_local: {k_local.shape[-2]} tokens, block_sizes cover {int(np.sum(block_sizes))}"
        )
    return rerotate(
        k_local, local_positions(block_sizes), np.arange(k_local.shape[-2]), base, scaling
    )


@register_method(
    "block_attention",
    BlockAttentionParams,
    kind="static",
    summary="RAG blocks attend within themselves, the last block globally (+ RoPE re-encoding)",
    paper="Ma et al., Block-Attention for Efficient Prefilling (arXiv 2409.15355)",
    code="TemporaryLoRA/Block-Attention@c84e38b86997a25d007149478bf0c730a922561d",
)
def select(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
    params: BlockAttentionParams,
    *,
    causal: bool = True,
    backend: str = "numpy",
) -> Selection:
    """The static mask as a per-token :class:`TokenMask` (``extras["token_mask"]``) and a
    ``BlockMask`` with ``block_q = block_k = 1``; it already contains the causal rule."""
    L = k.shape[2]
    if q.shape[2] != L:
        raise InputError(f"q: Block-Attention's mask is square, got Sq = {q.shape[2]}, Sk = {L}")
    m = dispatch("block_attention_mask", backend)(tuple(params.block_sizes), L)
    tm = TokenMask(m)
    bm = BlockMask(m, block_q=1, block_k=1, q_len=L, k_len=L)
    return Selection(mask=bm, extras={"token_mask": tm, "block_ids": block_ids(params.block_sizes)})
