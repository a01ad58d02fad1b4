"""VFlowOpt: visual-token importance (context relevance + patch entropy), ViT-stage selection
(plain top-k; recycling for anyres layouts), and progressive pruning in the LLM.

Paper: Yang et al., "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information
Flow-Guided Optimization", ICCV 2025, arXiv 2508.05211. Official code:
``sihany077/VFlowOpt@129eeefb97d057c3507836d79e7e7bafd0bc6076``:
``src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py`` (entropy in
``SigLipVisionEmbeddings.forward``, relevance in ``SigLipEncoderLayer.forward``),
``.../language_model/llava_qwen_training_free.py`` (selection, recycling),
``transformers-4.46.0/.../qwen2/modeling_qwen2.py:Qwen2Model.forward_illava`` (LLM stage).

Importance map of one image (ViT layer ``k_v``, attention ``A [H, n, n]``)::

    Abar = mean_h A[h];  r[j] = mean_i Abar[i, j]
    G    = { i : r[i] > t * mean(r) }                     "global" tokens
    rel[j] = mean_{i in G} Abar[i, j]                     attention *from* G (NaN if G empty)
    E    = patch entropy (bits) of the 8-bit grey patch   see :func:`patch_entropy`
    score = rel + alpha_v * softmax(E)                    released configs: alpha_v = 0

Selection (ViT stage), ``R = round(N (1 - vit_r))``:

* plain square grid (non-anyres image; ``llava_qwen_training_free.py:646-672``): keep the
  ``N - R`` highest scores, no merging (:func:`select_topk`);
* anyres layout (base grid + unpadded hi-res grid with newline column, ``:566-629``): drop
  ``R`` plus ``n_merge = int(N / m^2)`` lowest scores, group them by grid cell
  ``(region, row // m, col // m)`` and merge each group, score-weighted, into its
  highest-score member, which is kept (:func:`select_recycle`).

LLM stage: per ratio ``rho_s`` drop ``round(n (1 - rho_s))`` lowest remaining scores
(:func:`progressive_prune`); positions are not re-indexed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.keepset import KeepSet
from ..core.layout import default_scale
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..methods.base import check_range, register_method

PAPER = ("Yang et al., VFlowOpt: A Token Pruning Framework for LMMs with Visual Information "
         "Flow-Guided Optimization, ICCV 2025, arXiv 2508.05211")
CODE = "sihany077/VFlowOpt@129eeefb97d057c3507836d79e7e7bafd0bc6076"
GREY_WEIGHT = np.float32(0.3333)     # official grey weights (sum 0.9999)
# The released "10 %" budget, the defaults everywhere below (llava_onevision_training_free.py
# 161-165, exact literals).
T_10 = 39.26492840997221
VIT_M_10 = 17.386981849158786
VIT_R_10 = 0.11661529508161146


# ------------------------------------------------------------------ entropy
def patch_entropy(pixel_values: Any, patch: int = 14, dtype: str = "float16") -> np.ndarray:
    """Patch entropy in bits, float64 ``[B, 1, gh, gw]``, exactly as the official code.

    ``pixel_values [B, 3, H, W]`` are the *normalised* pixels (mean/std 0.5, range
    [-1, 1]); ``dtype`` the precision they reach the encoder in (official: float16).

    1. ``u = uint8(pixel * 255)``: the product in ``dtype``, truncated toward zero, wrapped
       mod 256 (torch's float->uint8; negative values wrap: -255 -> 1);
    2. ``gray = 0.3333 u_R + 0.3333 u_G + 0.3333 u_B`` in float32, rounded half-to-even;
    3. 256-bin histogram over each ``patch x patch`` cell (stride = patch; the remainder
       rows/columns are ignored), ``p = hist / patch^2``;
    4. ``E = -sum_b p_b log2(p_b + 1e-10)``.
    """
    x = np.asarray(pixel_values)
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"pixel_values: expected [B, 3, H, W], got shape {x.shape}")
    if dtype not in ("float16", "float32"):
        raise InputError(f"dtype: expected 'float16' or 'float32', got {dtype!r}")
    B, _, Hh, W = x.shape
    gh, gw = (Hh - patch) // patch + 1, (W - patch) // patch + 1
    if gh < 1 or gw < 1:
        raise InputError(f"pixel_values: image {Hh}x{W} is smaller than one {patch}-pixel patch")
    dt = np.dtype(dtype)
    u = (x.astype(dt) * dt.type(255)).astype(np.float64)
    u = (np.trunc(u).astype(np.int64) & 0xFF).astype(np.float32)
    u = u[:, :, : gh * patch, : gw * patch]
    gray = (u[:, 0] * GREY_WEIGHT + u[:, 1] * GREY_WEIGHT) + u[:, 2] * GREY_WEIGHT
    g = np.rint(gray).astype(np.int64)
    g = g.reshape(B, gh, patch, gw, patch).transpose(0, 1, 3, 2, 4).reshape(B, gh, gw, -1)
    cells = np.arange(B * gh * gw)[:, None] * 256 + g.reshape(B * gh * gw, -1)
    hist = np.bincount(cells.reshape(-1), minlength=B * gh * gw * 256).reshape(B, gh, gw, 256)
    p = hist / (patch * patch)
    return -(p * np.log2(p + 1e-10)).sum(-1)[:, None]


# ---------------------------------------------------------------- relevance
def vflowopt_relevance(attn: np.ndarray, t: float, *, out: tuple[np.ndarray] | None = None
                       ) -> tuple[np.ndarray]:
    """Context relevance ``rel [B, n]`` float64 from ViT attention ``attn [B, H, n, n]``.

    ``Abar = mean_h attn``, ``r = mean over rows of Abar``, ``G = {i : r_i > t mean(r)}``,
    ``rel[j] = mean_{i in G} Abar[i, j]``. ``G`` empty (large ``t``) gives NaN, as the
    official mean over an empty index set.
    """
    a = np.asarray(attn, np.float64).mean(1)                       # [B, n, n]
    r = a.mean(1)                                                  # received, [B, n]
    g = r > t * r.mean(-1, keepdims=True)
    cnt = g.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        rel = np.einsum("bi,bij->bj", g.astype(np.float64), a) / cnt
    if out is not None:
        out[0][...] = rel
        return (out[0],)
    return (rel,)


VFLOWOPT_SCORE = define_op("vflowopt_relevance", vflowopt_relevance, outputs=("rel",),
                           kind="array")


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def importance_map(attn: Any, entropy: Any = None, *, t: float = T_10,
                   alpha_v: float = 0.0, backend: str = "numpy") -> np.ndarray:
    """``score [B, n] = rel + alpha_v * softmax(E)`` (the per-image combined maps of
    ``SigLipEncoderLayer.forward``). ``entropy [B, 1, g, g]`` (or ``[B, n]``) with
    ``g * g = n``; may be omitted when ``alpha_v == 0``. Defaults: the released 10 % config."""
    a = np.asarray(attn)
    if a.ndim != 4 or a.shape[2] != a.shape[3]:
        raise InputError(f"attn: expected [B, H, n, n] attention probabilities, got {a.shape}")
    check_range("t", t)
    check_range("alpha_v", alpha_v)
    (rel,) = dispatch(VFLOWOPT_SCORE.name, backend, (a,))(a, float(t))
    rel = np.asarray(rel, np.float64)
    if alpha_v == 0 and entropy is None:
        return rel
    if entropy is None:
        raise InputError("entropy: required when alpha_v != 0")
    e = np.asarray(entropy, np.float64).reshape(a.shape[0], -1)
    if e.shape[1] != a.shape[2]:
        raise InputError(f"entropy: {e.shape[1]} patches for {a.shape[2]} tokens")
    return rel + alpha_v * softmax(e)


# ------------------------------------------------------- selection, recycling
def grid_coords(regions: Sequence[tuple[int, int]], n: int) -> tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]:
    """Region id, row and column of every token. ``regions``: ``(length, row_width)`` of
    consecutive token ranges (anyres: ``[(729, 27), (h * (w + 1), w + 1)]``, the newline
    column included in the width); they must cover all ``n`` tokens."""
    reg, row, col = [], [], []
    for rid, (length, width) in enumerate(regions):
        i = np.arange(int(length))
        reg.append(np.full(i.size, rid))
        row.append(i // int(width))
        col.append(i % int(width))
    if sum(int(x[0]) for x in regions) != n:
        raise InputError(f"regions: lengths sum to {sum(int(x[0]) for x in regions)}, "
                         f"scores have {n} tokens")
    return np.concatenate(reg), np.concatenate(row), np.concatenate(col)


def select_recycle(score: Any, features: Any, *, vit_r: float = VIT_R_10,
                   vit_m: float = VIT_M_10,
                   regions: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """ViT-stage selection with recycling for one anyres image (``prepare_inputs_labels_
    for_multimodal``, ``llava_qwen_training_free.py:566-629``). ``score [N]``, ``features
    [N, C]``; ``regions`` as :func:`grid_coords` (default: one square grid of side
    ``sqrt(N)``, a building block only: the official code never recycles a plain grid, see
    :func:`select_topk`). Defaults: the released 10 % config.

    ``R = round(N (1 - vit_r))`` (half-to-even), ``n_merge = int(N / m^2)``; the
    ``R + n_merge`` lowest scores (stable: ties to the lower index) are removed. Removed
    tokens are grouped by ``(region, floor(row / m), floor(col / m))``; each group's
    score-weighted mean ``sum_i (s_i / sum s) f_i`` replaces the features of its
    highest-score member (ties: lower index), which is kept.

    Returns ``kept int64 [K]`` (ascending), ``features [K, C]`` (merged where recycled),
    ``kept_scores [K]``, ``representatives``, ``groups`` (list of index arrays), ``removed``.
    """
    s = np.asarray(score, np.float64).reshape(-1)
    f = np.asarray(features, np.float64)
    N = s.size
    if f.ndim != 2 or f.shape[0] != N:
        raise InputError(f"features: expected [{N}, C], got shape {f.shape}")
    check_range("vit_r", vit_r, 0, 1)
    check_range("vit_m", vit_m, 0, lo_open=True)
    if np.isnan(s).any():
        raise InputError("score: contains NaN (no global token passed the threshold t?)")
    if regions is None:
        side = int(round(np.sqrt(N)))
        if side * side != N:
            raise InputError(f"regions: required, {N} tokens are not a square grid")
        regions = [(N, side)]
    reg, row, col = grid_coords(regions, N)
    R, n_merge = int(round(N * (1 - vit_r))), int(N / vit_m ** 2)
    low = np.argsort(s, kind="stable")[: min(N, R + n_merge)]
    feats = f.copy()
    key = np.stack([reg[low], np.floor(row[low] / vit_m), np.floor(col[low] / vit_m)], -1)
    groups, reps = [], []
    for kk in np.unique(key, axis=0):
        grp = np.sort(low[(key == kk).all(-1)])
        w = s[grp] / s[grp].sum()
        rep = int(grp[np.argmax(s[grp])])
        feats[rep] = (w[:, None] * f[grp]).sum(0)
        groups.append(grp)
        reps.append(rep)
    keep = np.ones(N, bool)
    keep[low] = False
    keep[reps] = True
    kept = np.nonzero(keep)[0]
    return {"kept": kept, "features": feats[kept], "kept_scores": s[kept],
            "representatives": np.array(sorted(reps), np.int64), "groups": groups,
            "removed": np.setdiff1d(low, reps), "R": R, "n_merge": n_merge}


def select_topk(score: Any, vit_r: float = VIT_R_10) -> np.ndarray:
    """Plain top-``(N - R)`` of one non-anyres image (``llava_qwen_training_free.py:646-672``;
    also video frames, ``:456-467``), no merge tokens, no recycling: kept indices, ascending
    (the official boolean mask keeps the original token order, and its ``VIT_ATTN_MAP`` is
    ``score[kept]`` in that order).

    ``R = round(N (1 - vit_r))`` (half-to-even), keep ``N - R``: the official
    ``729 - round(729 * (1 - vit_r))`` for the 27 x 27 SigLIP grid, with ``N`` in place of
    its hard-coded 729. Ties at the cut: the lower index is dropped first (``torch.topk``
    leaves them unspecified)."""
    s = np.asarray(score, np.float64).reshape(-1)
    check_range("vit_r", vit_r, 0, 1)
    if np.isnan(s).any():
        raise InputError("score: contains NaN (no global token passed the threshold t?)")
    R = int(round(s.size * (1 - vit_r)))
    return np.sort(np.argsort(s, kind="stable")[R:])


def select_plain(score: Any, features: Any, vit_r: float = VIT_R_10
                 ) -> dict[str, Any]:
    """:func:`select_topk` with the result keys of :func:`select_recycle` (no groups, no
    representatives, features of the kept tokens unchanged, ``n_merge = 0``)."""
    s = np.asarray(score, np.float64).reshape(-1)
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] != s.size:
        raise InputError(f"features: expected [{s.size}, C], got shape {f.shape}")
    kept = select_topk(s, vit_r)
    return {"kept": kept, "features": f[kept], "kept_scores": s[kept],
            "representatives": np.zeros(0, np.int64), "groups": [],
            "removed": np.setdiff1d(np.arange(s.size), kept), "R": s.size - kept.size,
            "n_merge": 0}


def progressive_prune(score: Any, ratios: Sequence[float]) -> list[np.ndarray]:
    """LLM-stage pruning (``forward_illava``, KV-cache path): for each keep ratio ``rho_s``
    in order, drop ``round(n (1 - rho_s))`` lowest-scoring remaining image tokens
    (``n`` = tokens remaining). Returns, per stage, the kept indices into ``score``
    (ascending: original order and original position ids are kept)."""
    s = np.asarray(score, np.float64).reshape(-1)
    remaining = np.arange(s.size)
    stages = []
    for i, rho in enumerate(ratios):
        check_range(f"llm_r[{i}]", rho, 0, 1)
        drop = int(round(remaining.size * (1 - rho)))
        order = np.argsort(s[remaining], kind="stable")
        remaining = np.sort(remaining[order[drop:]])
        stages.append(remaining)
    return stages


def sequence_keep_masks(seq_len: int, image_start: int, n_image: int,
                        stages: Sequence[np.ndarray]) -> np.ndarray:
    """Boolean keep masks ``[S_stages, seq_len]`` over the whole sequence: text tokens
    always kept, image tokens ``[image_start, image_start + n_image)`` per stage (official
    ``illava_llm_image_token_start_index = 14``)."""
    if image_start < 0 or image_start + n_image > seq_len:
        raise InputError(f"image_start: image tokens [{image_start}, {image_start + n_image}) "
                         f"do not fit a sequence of {seq_len}")
    m = np.ones((len(stages), seq_len), bool)
    for i, kept in enumerate(stages):
        m[i, image_start:image_start + n_image] = False
        m[i, image_start + np.asarray(kept)] = True
    return m


@dataclass(frozen=True)
class VFlowOptParams:
    """Released "10 %" configuration (``lmms_eval/models/llava_onevision_training_free.py:
    161-165``, the exact literals); the 25 % and 50 % ones are in :data:`PRESETS`."""

    t: float = T_10
    alpha_v: float = 0.0
    vit_m: float = VIT_M_10
    vit_r: float = VIT_R_10
    llm_r: tuple[float, ...] = (1.0, 0.6011)
    image_token_start: int = 14

    def validate(self) -> None:
        check_range("t", self.t)
        check_range("alpha_v", self.alpha_v)
        check_range("vit_m", self.vit_m, 0, lo_open=True)
        check_range("vit_r", self.vit_r, 0, 1)
        for i, r in enumerate(self.llm_r):
            check_range(f"llm_r[{i}]", r, 0, 1)
        check_range("image_token_start", self.image_token_start, 0, integer=True)


# Released budgets (llava_onevision_training_free.py:144-165, exact literals; 50 % and 25 %
# are commented out there, 10 % is active).
PRESETS: dict[str, VFlowOptParams] = {
    "50%": VFlowOptParams(t=28.683047941520474, vit_m=11.756787150848968,
                          vit_r=0.7233201448753168, llm_r=(0.748747637472693, 0.487)),
    "25%": VFlowOptParams(t=34.759552803070484, vit_m=15.580797034937687,
                          vit_r=0.2651026358526424,
                          llm_r=(0.9833433139039235, 0.8773258179532721)),
    "10%": VFlowOptParams(),
}


def run(attn: Any, features: Any, entropy: Any = None, params: VFlowOptParams = VFlowOptParams(),
        *, regions: Sequence[tuple[int, int]] | None = None, backend: str = "numpy"
        ) -> dict[str, Any]:
    """Whole pipeline for a batch of images, each its own sample: map, ViT selection (per
    image), LLM stages over the kept tokens (per image). ``regions is None``: plain token
    grids, plain top-k (:func:`select_plain`, the official non-anyres path); otherwise the
    anyres layout of every image, with recycling (:func:`select_recycle`). ``keepset`` holds
    the ViT-stage kept tokens per image (``[B, 1, K]``)."""
    params.validate()
    score = importance_map(attn, entropy, t=params.t, alpha_v=params.alpha_v, backend=backend)
    f = np.asarray(features, np.float64)
    if regions is None:
        res = [select_plain(score[b], f[b], params.vit_r) for b in range(score.shape[0])]
    else:
        res = [select_recycle(score[b], f[b], vit_r=params.vit_r, vit_m=params.vit_m,
                              regions=regions) for b in range(score.shape[0])]
    n = score.shape[1]
    keep = KeepSet.from_lists([[r["kept"]] for r in res], q_len=n, k_len=n)
    return {"score": score, "images": res, "keepset": keep,
            "llm_stages": [progressive_prune(r["kept_scores"], params.llm_r) for r in res]}


def vit_attention(q: np.ndarray, k: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Bidirectional attention probabilities float64 ``[B, H, n, n]`` of ViT q ``[B, H, n, D]``
    / k ``[B, Hk, n, D]`` (``SigLipAttention``: ``softmax(q k^T * d^-1/2)``, no mask)."""
    G = q.shape[1] // k.shape[1]
    s = np.einsum("bhid,bhjd->bhij", np.asarray(q, np.float64),
                  np.repeat(np.asarray(k, np.float64), G, axis=1)) * default_scale(q.shape[-1], scale)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@register_method("vflowopt", VFlowOptParams, kind="importance",
                 summary="attention from global ViT tokens (+ entropy); top-k of the grid",
                 paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: VFlowOptParams, *,
           causal: bool = False, backend: str = "numpy") -> Selection:
    """ViT-stage selection on one plain (non-anyres) token grid per batch item from the ViT
    layer's q ``[B, H, n, D]`` / k ``[B, Hk, n, D]``: the official plain top-k, no recycling
    (``vit_m`` unused). SigLIP attention is bidirectional, so ``causal`` is not applied.
    Needs ``alpha_v == 0`` (no pixels here; use :func:`importance_map` with an entropy map
    otherwise). ``extras``: ``score [B, n]``, ``keepset`` (ViT-stage kept tokens),
    ``token_mask``, ``representatives`` (empty), ``llm_stages``. Anyres layouts: :func:`run`
    with ``regions``."""
    params.validate()
    if params.alpha_v != 0:
        raise InputError("alpha_v: select() has no pixels for the entropy term; use "
                         "refattn.importance.vflowopt.run with an entropy map")
    res = run(vit_attention(q, k), np.zeros(q.shape[:1] + q.shape[2:3] + (0,)), None, params,
              backend=backend)
    keep = res["keepset"]
    return Selection(mask=keep.to_block_mask(), extras={
        "score": res["score"], "keepset": keep, "token_mask": keep,
        "representatives": [im["representatives"] for im in res["images"]],
        "llm_stages": res["llm_stages"]})
