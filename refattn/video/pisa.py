"""PISA -- Piecewise Sparse Attention: exact attention on the top blocks, a Taylor
approximation around the mean key for every other block.

Paper: Li, Shao, Zhong, Zhou, Bai, Xiong, Xie, "Piecewise Sparse Attention Is Wiser for
Efficient Diffusion Transformers", arXiv 2602.01077. Official code:
``xie-lab-ml/piecewise-sparse-attention@8604494f6660045d6f477f9dcb56b334d06b932c``,
``piecewise_attn/kernels/piecewise_sparse_attn_tma.py`` (``piecewise_sparse_attention``,
``fused_chunk_reduce``) and ``piecewise_attn/models/flux/flux_processor.py`` (FLUX
integration, ``use_bias=True``, density 0.15). Spec ``video-kv.md`` section 3.

Scoring and selection (spec 3(c, d)), per query block ``i`` and key block ``j`` of
``block_size`` tokens (the last may be shorter; means divide by the true length)::

    Sc[i, j] = qbar_i . (s * kbar_j)                   s = softmax scale, means in the input dtype
    use_bias: Sc[i, :] = softmax_j(Sc[i, j] + ln(||Hc_j||_F + 1e-5)),  Hc_j = sum_{u in j} (k_u - kbar_j) v_u^T
    Sel(i)   = top-n of Sc[i, :],   n = max(1, floor(density * Kb))

(the softmax is monotone: it changes the reported scores, not the ranking). No block is
forced (no diagonal, sink or text block). Ties go to the lower block index (``torch.topk``
leaves them unspecified). Attention: :func:`refattn.reference.piecewise.piecewise_attention`
(op ``piecewise_attention_fwd``), by default with the official **global** first-order
correction; ``correction="per_block"`` gives the textbook per-block Taylor term instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.blockmask import BlockMask, num_blocks
from ..core.errors import InputError
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..core.video_grid import VideoGrid
from ..methods.base import check_choice, check_range, register_method
from ..reference.piecewise import CORRECTIONS, block_means, block_statistics, piecewise_attention
from ..reference.selection_backend import topk_per_row

PAPER = ("Li et al., Piecewise Sparse Attention Is Wiser for Efficient Diffusion Transformers, "
         "arXiv 2602.01077")
CODE = "xie-lab-ml/piecewise-sparse-attention@8604494f6660045d6f477f9dcb56b334d06b932c"


@dataclass(frozen=True)
class PisaParams:
    """PISA parameters (official names in brackets; defaults of ``piecewise_sparse_attention``).

    * ``block_size`` [block_size] 64: query and key block length.
    * ``density`` [density] 0.1: fraction of key blocks computed exactly, ``n = max(1,
      floor(density * Kb))`` per query block (FLUX demo: 0.15).
    * ``use_bias`` [use_bias] False: add ``ln(||Hc_j||_F + 1e-5)`` to the block scores (the
      FLUX processor passes True).
    * ``correction``: first-order term of the attention, ``"global"`` (official kernel),
      ``"per_block"`` (Taylor term per approximated block) or ``"none"`` (zeroth order).
    * ``grid``, ``text_tokens``, ``text_position``: the token layout, checked against the
      sequence length only (PISA does not reorder video tokens; its FLUX integration lays
      8x8 patches out before the call, text in front).
    """

    block_size: int = 64
    density: float = 0.1
    use_bias: bool = False
    correction: str = "global"
    grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    text_position: str = "first"

    def validate(self) -> None:
        check_range("block_size", self.block_size, 1, integer=True)
        check_range("density", self.density, 0.0, 1.0, lo_open=True)
        if not isinstance(self.use_bias, (bool, np.bool_)):
            raise InputError(f"use_bias: expected a bool, got {self.use_bias!r}")
        check_choice("correction", self.correction, CORRECTIONS)
        check_range("text_tokens", self.text_tokens, 0, integer=True)
        check_choice("text_position", self.text_position, ("first", "last"))
        if self.grid is not None:
            VideoGrid.from_params(self.grid, self.text_tokens, self.text_position)


def _in_dtype(x: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Round float64 ``x`` to ``like``'s dtype (the official means are stored in it)."""
    return x if like.dtype == np.float64 else x.astype(like.dtype).astype(np.float64)


def pisa_block_scores(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, block_size: int,
                      use_bias: bool = False, scale: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Op ``pisa_block_scores``: PISA block scores float64 ``[B, Hq, Qb, Kb]`` and the bias
    norms ``||Hc_j||_F`` float64 ``[B, Hkv, Kb]`` (``[B, Hkv, 0]`` without ``use_bias``).
    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D|Dv]``; GQA: query head ``h`` reads kv head
    ``h // (Hq/Hkv)``. :func:`block_scores` is the public form (``None`` norms)."""
    B, Hq, Hkv, D = q.shape[0], q.shape[1], k.shape[1], q.shape[3]
    scale = D ** -0.5 if scale is None else float(scale)
    qbar = _in_dtype(block_means(q, block_size), q)                  # [B, Hq, Qb, D]
    kbar = _in_dtype(block_means(k, block_size), k)                  # [B, Hkv, Kb, D]
    kbar = np.repeat(kbar, Hq // Hkv, axis=1)
    sc = qbar @ (scale * kbar).swapaxes(-1, -2)
    norms = np.zeros((B, Hkv, 0))
    if use_bias:
        if v is None:
            raise InputError("v: PISA with use_bias=True needs v (the bias uses K^T V moments)")
        _, _, hc = block_statistics(k, v, block_size)                # [B, Hkv, Kb, D, Dv]
        norms = np.sqrt((hc ** 2).sum(axis=(-2, -1)))
        z = sc + np.log(np.repeat(norms, Hq // Hkv, axis=1) + 1e-5)[:, :, None, :]
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        sc = z / z.sum(axis=-1, keepdims=True)
    return sc, norms


PISA_SCORES = define_op("pisa_block_scores", pisa_block_scores, outputs=("scores", "bias_norm"),
                        kind="array")


def block_scores(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, block_size: int,
                 use_bias: bool = False, scale: float | None = None, *, backend: str = "numpy"
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """PISA block scores float64 ``[B, Hq, Qb, Kb]`` and the bias norms ``||Hc_j||_F``
    (``[B, Hkv, Kb]``, or None without ``use_bias``). q ``[B, Hq, Sq, D]``, k/v
    ``[B, Hkv, Sk, D|Dv]``; GQA: query head ``h`` reads kv head ``h // (Hq/Hkv)``. Runs op
    ``pisa_block_scores`` on ``backend``."""
    if use_bias and v is None:
        raise InputError("v: PISA with use_bias=True needs v (the bias uses K^T V moments)")
    sc, norms = dispatch(PISA_SCORES.name, backend, (q, k))(q, k, v, block_size, bool(use_bias), scale)
    return (np.asarray(sc, np.float64),
            np.asarray(norms, np.float64) if use_bias else None)


@register_method("pisa", PisaParams, kind="video",
                 summary="block mean q.k scores (+ optional log-norm bias), top-floor(density*Kb) "
                         "blocks exact, the rest by a mean-key Taylor term (global correction)",
                 paper=PAPER, code=CODE, needs_v=True)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: PisaParams, *,
           causal: bool = False, backend: str = "numpy") -> Selection:
    """PISA selection on canonical arrays (q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]``).

    Returns a :class:`Selection`: ``mask`` = the exactly computed blocks (``block_size``
    grid on both axes), ``scores`` = ``Sc``, ``boundary [B, Hq, Qb]`` = the n-th score,
    ``extras``: ``correction``, ``n_selected``, ``bias_norm`` (``use_bias``), ``attention``
    (the dotted name of :func:`attention`). The blocks
    outside the mask are *not* skipped: run the selection with :func:`attention`.
    """
    if causal:
        raise InputError("causal: PISA is bidirectional (diffusion transformers); the official "
                         "kernel has no causal mode; pass causal=False")
    p = params
    bs = int(p.block_size)
    Sq, Sk = q.shape[2], k.shape[2]
    if p.grid is not None:
        VideoGrid.from_params(p.grid, p.text_tokens, p.text_position).check_seq_len(Sk, "k_len")
    sc, norms = block_scores(q, k, v, bs, bool(p.use_bias), backend=backend)
    kb = num_blocks(Sk, bs)
    n = max(1, int(float(p.density) * kb))
    mask, boundary = topk_per_row(sc, n, tie="low", backend=backend)
    geo = dict(block_q=bs, block_k=bs, q_len=Sq, k_len=Sk)
    return Selection(mask=BlockMask(mask, **geo), scores=BlockScores(sc, **geo), boundary=boundary,
                     extras={"correction": p.correction, "n_selected": n, "bias_norm": norms,
                             "attention": f"{__name__}.attention"})


def attention(q: Any, k: Any, v: Any, selection: Selection, *, correction: str | None = None,
              softmax_scale: float | None = None, layout: str = "bhsd", return_lse: bool = False,
              backend: str = "numpy") -> Any:
    """PISA's piecewise attention of q/k/v for a PISA ``selection`` (``correction``
    defaults to the selection's). See :func:`refattn.reference.piecewise.piecewise_attention`."""
    corr = correction or selection.extras.get("correction", "global")
    return piecewise_attention(q, k, v, selection, correction=corr, softmax_scale=softmax_scale,
                               layout=layout, return_lse=return_lse, backend=backend)


__all__ = ["PisaParams", "select", "attention", "block_scores", "pisa_block_scores",
           "piecewise_attention"]
