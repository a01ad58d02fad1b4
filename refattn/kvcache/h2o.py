"""H2O: Heavy-Hitter Oracle -- keep the tokens with the largest accumulated attention plus a
recent window.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023. Official code ``FMInference/H2O@ac75c2a8a9e76832b2a4139b9363373b56336bfb``,
which holds three implementations (four rules: the lm-eval LLaMA file differs from its OPT
and GPT-NeoX siblings) that are **not** equivalent (``variant``):

``"real_drop"`` -- ``h2o_hf/utils_real_drop/modify_llama.py``, ``H2OKVCache_LayerWise``.
    After every forward, with ``A [q, n]`` the attention of the forward's queries over the
    cache (new tokens last): ``acc <- [acc, 0] + sum_q A``. When the cache holds more than
    ``hh_size + recent_size`` tokens, keep its last ``recent_size`` entries plus the top
    ``hh_size`` of ``acc`` among the earlier ones; the cache stays in position order and
    evicted scores are dropped.
``"mask_sim"`` -- ``h2o_hf/utils_hh/modify_llama.py``, ``LlamaAttention_heavy_hitter``.
    Nothing is dropped; the next step's logits are masked. At prefill ``heavy = int(r_h L0)``,
    ``recent = int(r_r L0)`` (fixed afterwards). After each forward, over the ``L`` tokens:
    ``acc <- [acc, 0] + sum_q A``; if ``L > heavy + recent`` the next step (``L + 1`` keys)
    allows positions ``L+1-recent .. L`` and the top ``heavy`` of ``acc[0 : L-recent]``; then
    ``acc`` is multiplied by that mask with ``acc[L-recent : L]`` forced on. Position
    ``L - recent`` is therefore neither recent nor eligible at the next step (official quirk).
``"single_forward"`` -- ``h2o_hf/utils_lm_eval/modify_opt.py`` (``local_heavy_hitter_mask``
    l. 23-59, called l. 191-205) and ``modify_gptneox.py`` (l. 21-54, called l. 228-241).
    One causal forward over the prompt, rows simulated one by one: rows ``< heavy`` see the
    first ``heavy`` keys; row ``t >= heavy`` sees the top ``heavy - 1`` keys of ``acc`` and
    itself, then ``acc <- (acc + P_t) * mask_t`` (``P_t`` the row's unmasked causal softmax,
    ``acc`` starts as the column sums of rows ``< heavy``); every row also sees the band
    ``i - recent <= j <= i``. A per-row :class:`~refattn.core.keepset.TokenMask`.
``"single_forward_llama"`` -- ``h2o_hf/utils_lm_eval/modify_llama.py``,
    ``LlamaAttention_heavy_hitter.forward`` l. 152-166 (the file's ``local_heavy_hitter_mask``
    call, l. 135-148, is commented out). A global rule: ``heavy = int(r_h L)``, ``recent =
    int(r_r L)``; ``acc_j = sum_i P[i, j]`` over all rows of the causal softmax; every row
    sees the top ``heavy`` of ``acc`` (no forced self, no ``- 1``) and the band ``|i - j| <=
    recent``; the causal part comes from the model's additive mask (l. 122-128), so row
    ``i`` sees ``(heavy | band) & (j <= i)``. The same per-row ``TokenMask``.

Scores are float64 here (the official code accumulates in the model dtype). GQA: the
official classes are MHA; the reference gives each query head its own copy of its kv head
(``repeat_kv``, as SnapKV). The ``real_drop`` / ``mask_sim`` code sums over the batch and
asserts ``B = 1`` (the lm-eval files work per batch element; their driver runs ``B = 1``);
the reference runs every batch element independently. Ties: lower position first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.blockmask import BlockMask
from ..core.errors import InputError
from ..core.keepset import KeepSet, TokenMask
from ..core.layout import default_scale
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..methods.base import check_choice, check_range, register_method
from ._common import attention_probs, keepset_selection, topk_keep

VARIANTS = ("real_drop", "mask_sim", "single_forward", "single_forward_llama")
# The variants that are one masked forward (a per-row TokenMask), with no cache to carry on.
SINGLE_FORWARD_VARIANTS = ("single_forward", "single_forward_llama")
# The official ``finfo(dtype).max`` given to VATP's sink tokens, taken at float32 (the dtype of
# the official runs in ../shared/conformance): exact in a float32 output (float64 max
# overflowed to inf there) and far above any attention score.
SINK_SCORE = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class H2OParams:
    """H2O parameters. ``hh_size``/``recent_size`` (counts) drive ``real_drop`` (class
    defaults 4 + 512); ``heavy_ratio``/``recent_ratio`` (of the prompt length) drive
    ``mask_sim`` and the ``single_forward*`` variants (paper default 10% + 10%)."""

    variant: str = "real_drop"
    hh_size: int = 4
    recent_size: int = 512
    heavy_ratio: float = 0.1
    recent_ratio: float = 0.1

    def validate(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        check_range("hh_size", self.hh_size, 0, integer=True)
        check_range("recent_size", self.recent_size, 0, integer=True)
        check_range("heavy_ratio", self.heavy_ratio, 0.0, 1.0)
        check_range("recent_ratio", self.recent_ratio, 0.0, 1.0)


def h2o_score(q: np.ndarray, k: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Accumulated attention of a causal prefill: ``acc_j = sum_i A[i, j]`` (no
    normalisation), float64 ``[B, Hq, Sk]``. q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]``."""
    return attention_probs(q, k, scale=default_scale(q.shape[-1], scale), causal=True).sum(axis=-2)


define_op("h2o_score", h2o_score, outputs=("scores",), kind="array")


class RealDropCache:
    """``H2OKVCache_LayerWise`` on positions: ``positions int64 [B, H, n]`` (cache order =
    ascending) and ``scores float64 [B, H, n]``; every head holds the same count."""

    def __init__(self, hh_size: int, recent_size: int) -> None:
        self.hh_size, self.recent_size = int(hh_size), int(recent_size)
        self.cache_size = self.hh_size + self.recent_size
        self.positions: np.ndarray | None = None
        self.scores: np.ndarray | None = None

    def update(self, attn: np.ndarray, new_positions: np.ndarray) -> None:
        """One forward: ``attn [B, H, q, n]`` over the cache with its ``q`` new tokens (at
        ``new_positions [q]``) appended last; accumulate, then evict if over budget."""
        B, H, nq, n = attn.shape
        new = np.broadcast_to(np.asarray(new_positions, np.int64), (B, H, nq))
        col = attn.sum(axis=-2)
        if self.positions is None:
            if n != nq:
                raise InputError(f"attn: the first call needs a square prefill, got {nq} x {n}")
            self.positions, self.scores = np.array(new), col
        else:
            if n != self.positions.shape[-1] + nq:
                raise InputError(f"attn: expected {self.positions.shape[-1] + nq} columns, got {n}")
            col[..., : n - nq] += self.scores
            self.positions = np.concatenate([self.positions, new], axis=-1)
            self.scores = col
        self._evict()

    def _evict(self) -> None:
        n = self.positions.shape[-1]
        if n <= self.cache_size:
            return
        top = np.sort(topk_keep(self.scores[..., : n - self.recent_size], self.hh_size), axis=-1)
        recent = np.broadcast_to(
            np.arange(n - self.recent_size, n), top.shape[:2] + (self.recent_size,)
        )
        keep = np.concatenate([top, recent], axis=-1)
        self.positions = np.take_along_axis(self.positions, keep, axis=-1)
        self.scores = np.take_along_axis(self.scores, keep, axis=-1)

    def allowed(self, length: int) -> np.ndarray:
        """bool ``[B, H, length]``: kept positions (the cache of the next forward)."""
        m = np.zeros(self.positions.shape[:2] + (length,), bool)
        np.put_along_axis(m, self.positions, True, axis=-1)
        return m


class MaskSimCache:
    """The masking simulation of ``LlamaAttention_heavy_hitter`` (H2O ``utils_hh`` and its
    VATP copy), on float64 scores ``[B, H, L]`` (evicted entries 0) and the next step's
    allowed mask ``mask_next [B, H, L+1]``.

    VATP options: ``value_weighted`` (multiply each step's column sums by ``||v_j||_1``),
    ``scissorhands`` (prefill score = sum of the last 400 rows / 400, ``heavy = 2 int(r L)
    - 10``, ``recent = 10``), ``sink_len`` (prefill scores of the first tokens set to the
    maximum), ``clone_mask=False`` (VATP stores the next-step mask without ``.clone()``, so
    forcing ``acc[L-recent:]`` on also re-allows position ``L - recent``: ``recent + 1``
    recent tokens).
    """

    def __init__(
        self,
        heavy_ratio: float,
        recent_ratio: float,
        *,
        value_weighted: bool = False,
        scissorhands: bool = False,
        sink_len: int = 0,
        clone_mask: bool = True,
    ) -> None:
        self.heavy_ratio, self.recent_ratio = float(heavy_ratio), float(recent_ratio)
        self.value_weighted, self.scissorhands = bool(value_weighted), bool(scissorhands)
        self.sink_len, self.clone_mask = int(sink_len), bool(clone_mask)
        self.scores: np.ndarray | None = None
        self.mask_next: np.ndarray | None = None
        self.heavy = self.recent = 0

    def update(self, attn: np.ndarray, vnorm: np.ndarray | None = None) -> None:
        """One forward: ``attn [B, H, q, L]`` (post-mask softmax over all ``L`` tokens);
        ``vnorm [B, H, L]`` = ``||v_j||_1`` when ``value_weighted``."""
        L = attn.shape[-1]
        if self.value_weighted and (vnorm is None or vnorm.shape[-1] != L):
            raise InputError("vnorm: value-weighted scores need ||v||_1 of every token")
        cur = attn.sum(axis=-2)
        if self.value_weighted:
            cur = cur * vnorm
        if self.scores is not None:
            cur[..., :-1] += self.scores
        else:
            if self.scissorhands:
                cur = attn[..., -400:, :].sum(axis=-2) / 400.0  # divided by 400 even if fewer rows
                self.heavy, self.recent = int(self.heavy_ratio * L) * 2 - 10, 10
                if self.value_weighted:
                    cur = cur * vnorm
            else:
                self.heavy, self.recent = int(self.heavy_ratio * L), int(self.recent_ratio * L)
            if self.heavy < 0:
                raise InputError(
                    f"heavy_ratio: gives a negative heavy budget ({self.heavy}) for L = {L}"
                )
            if self.sink_len:
                cur[..., : self.sink_len] = SINK_SCORE
        self._select(cur)

    def _select(self, scores: np.ndarray) -> None:
        L = scores.shape[-1]
        mask = np.ones(scores.shape[:2] + (L + 1,), dtype=bool)
        if L > self.heavy + self.recent:
            if self.recent:
                mask[..., : L + 1 - self.recent] = False
                cand = scores[..., : L - self.recent]
            else:
                if self.clone_mask:  # H2O clears the mask; VATP's copy does not
                    mask[:] = False
                cand = scores
            if self.heavy:
                np.put_along_axis(mask, topk_keep(cand, self.heavy), True, axis=-1)
        nxt = mask.copy() if self.clone_mask else mask
        score_mask = mask[..., :-1]  # a view, as in the official code
        score_mask[..., L - self.recent if self.recent else 0 :] = True  # x[:, -0:] is all of x
        self.scores = scores * score_mask
        self.mask_next = nxt

    def allowed(self, length: int) -> np.ndarray:
        if length != self.mask_next.shape[-1]:
            raise InputError(
                f"mask_sim: the next step has {self.mask_next.shape[-1]} keys, asked {length}"
            )
        return self.mask_next.copy()


def single_forward_mask(
    q: np.ndarray,
    k: np.ndarray,
    heavy_ratio: float,
    recent_ratio: float,
    scale: float | None = None,
) -> np.ndarray:
    """H2O's lm-eval single-forward mask of the OPT / GPT-NeoX files (greedy row by row),
    bool ``[B, Hq, L, L]`` (see the module docstring)."""
    L = q.shape[2]
    if k.shape[2] != L:
        raise InputError(f"q: single_forward needs Sq == Sk, got {L} and {k.shape[2]}")
    P = attention_probs(q, k, scale=default_scale(q.shape[-1], scale), causal=True)
    heavy, recent = int(heavy_ratio * L), int(recent_ratio * L)
    mask = np.zeros(P.shape, dtype=bool)
    if heavy > 0:
        acc = P[..., :heavy, :].sum(axis=-2)
        acc[..., heavy:] = 0.0
        mask[..., :heavy, :heavy] = True
        for t in range(heavy, L):
            row = np.zeros(acc.shape, dtype=bool)
            np.put_along_axis(row, topk_keep(acc, heavy - 1), True, axis=-1)
            row[..., t] = True
            mask[..., t, :] = row
            acc = (acc + P[..., t, :]) * row
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    return (mask | (j >= i - recent)) & (j <= i)


def single_forward_llama_mask(
    q: np.ndarray,
    k: np.ndarray,
    heavy_ratio: float,
    recent_ratio: float,
    scale: float | None = None,
    *,
    scores: np.ndarray | None = None,
    backend: str = "numpy",
) -> np.ndarray:
    """H2O's lm-eval single-forward mask of the LLaMA file (global heavy hitters), bool
    ``[B, Hq, L, L]``: ``(top-heavy of acc | |i - j| <= recent) & (j <= i)``.

    ``acc [B, Hq, L]`` is the op ``h2o_score`` (column sums of the causal softmax, as
    ``tmp_sum`` of l. 153-154; pass ``scores`` if already computed). Top-k per batch element
    and head over the keys; ties go to the lower position (``torch.topk`` leaves them
    unspecified, and the official ``acc`` is fp16, where ties are not rare)."""
    L = q.shape[2]
    if k.shape[2] != L:
        raise InputError(f"q: single_forward_llama needs Sq == Sk, got {L} and {k.shape[2]}")
    if scores is None:
        scores = dispatch("h2o_score", backend, (q, k))(q, k, scale)
    acc = np.asarray(scores, np.float64)
    if acc.shape != q.shape[:2] + (L,):
        raise InputError(f"scores: expected shape {q.shape[:2] + (L,)}, got {acc.shape}")
    heavy, recent = int(heavy_ratio * L), int(recent_ratio * L)
    hh = np.zeros(acc.shape, dtype=bool)
    np.put_along_axis(hh, topk_keep(acc, heavy), True, axis=-1)
    i, j = np.arange(L)[:, None], np.arange(L)[None, :]
    return (hh[..., None, :] | (np.abs(i - j) <= recent)) & (j <= i)


def h2o_prefill(q: np.ndarray, k: np.ndarray, params: H2OParams, *, backend: str = "numpy",
                scores: np.ndarray | None = None):
    """Run the prefill of ``params.variant``; returns the cache object (real_drop /
    mask_sim) after the prompt.

    ``real_drop`` needs only the column sums of the causal softmax (the op ``h2o_score``,
    a kernel through ``backend``; pass ``scores`` if already computed): no ``[L, L]``
    matrix is formed. ``mask_sim`` walks the rows of the probabilities as the official
    simulation does (NumPy reference). The ``single_forward*`` variants have no cache
    (InputError)."""
    L = q.shape[2]
    if params.variant in SINGLE_FORWARD_VARIANTS:
        raise InputError(
            f"variant: {params.variant!r} is one masked forward with no cache; use select()"
        )
    if q.shape[2] != k.shape[2]:
        raise InputError(f"q: H2O's prefill needs Sq == Sk, got {q.shape[2]} and {k.shape[2]}")
    if params.variant == "real_drop":
        col = dispatch("h2o_score", backend, (q, k))(q, k) if scores is None else scores
        col = np.asarray(col, np.float64)
        cache = RealDropCache(params.hh_size, params.recent_size)
        cache.positions = np.broadcast_to(np.arange(L, dtype=np.int64), col.shape).copy()
        cache.scores = col.copy()
        cache._evict()
        return cache
    cache = MaskSimCache(params.heavy_ratio, params.recent_ratio)
    cache.update(attention_probs(q, k, scale=default_scale(q.shape[-1]), causal=True))
    return cache


@register_method(
    "h2o",
    H2OParams,
    kind="kv-cache",
    summary="accumulated attention heavy hitters + recent window (4 official variants)",
    paper="Zhang et al., H2O, NeurIPS 2023 (arXiv 2306.14048)",
    code="FMInference/H2O@ac75c2a8a9e76832b2a4139b9363373b56336bfb",
)
def select(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
    params: H2OParams,
    *,
    causal: bool = True,
    backend: str = "numpy",
) -> Selection:
    """H2O on prefill inputs. ``real_drop``: the cache kept after the prompt (ascending).
    ``mask_sim``: the prompt tokens the next step may attend to. ``single_forward`` and
    ``single_forward_llama``: the per-row mask of the forward (``extras["keepset"]`` is
    ``None``)."""
    B, Hq, L, _ = q.shape
    if params.variant in SINGLE_FORWARD_VARIANTS:
        if params.variant == "single_forward":
            m = single_forward_mask(q, k, params.heavy_ratio, params.recent_ratio)
        else:
            m = single_forward_llama_mask(
                q, k, params.heavy_ratio, params.recent_ratio, backend=backend
            )
        tm = TokenMask(m)
        bm = BlockMask(tm.mask, block_q=1, block_k=1, q_len=L, k_len=L)
        return Selection(mask=bm, extras={"keepset": None, "token_mask": tm})
    scores = dispatch("h2o_score", backend, (q, k))(q, k)
    cache = h2o_prefill(q, k, params, backend=backend, scores=scores)
    if params.variant == "real_drop":
        keep = KeepSet(cache.positions, q_len=L, k_len=L)
    else:
        keep = KeepSet.from_key_mask(cache.mask_next[..., :L], q_len=L)
    return keepset_selection(keep, Hq, scores=scores, extras={"cache": cache})
