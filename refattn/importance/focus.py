"""FOCUS: decodable-token importance for diffusion LLMs and the per-step eviction rule.

Paper: Liang et al., "FOCUS: DLLMs Know How to Tame Their Compute Bound", ICML 2026,
arXiv 2601.23278. Official code: ``sands-lab/FOCUS@277f1d158b977867425a50ed17a6218466139c9e``
(LMDeploy fork): ``lmdeploy/pytorch/kernels/cuda/focus.py`` (``focus_importance_ragged``,
``focus_compute_targets``, ``focus_select_and_enforce_ragged``), ``lmdeploy/pytorch/models/
sdar.py`` (layers 0 and 1), ``lmdeploy/pytorch/strategies/dllm/sequence.py`` (``avg_dec``).
The official scoring and selection are Triton kernels (GPU only); this is their reading.

Importance of one layer over the scored set ``T`` (still-``[MASK]`` tokens among the
processed positions, ascending, ``L = |T|``), per head ``h``, queries and keys in ``T``::

    s_h[i, j] = q_{h,i} . k_{h//g, j} * d^-1/2
    p_h[i, j] = max(s_h[i, j-1], s_h[i, j], s_h[i, j+1])     width-3 max-pool along T-order
    a_h[i, :] = softmax_j p_h[i, :]
    I[j]      = sum_h sum_i a_h[i, j]                        (sum_j I = H L)

Decision score ``delta = bf16(I1) - bf16(I0)`` (layer 1 minus layer 0). Keep rule
(:func:`focus_keep`): ``K = min(L, max(1, ceil(max(avg_dec, 1) * alpha)))``; evict only if
``L > K``; candidates = ``{delta >= mean + std}`` (population std) when it has ``>= K``
members, else the top-K (ties to the lower T index); then left-neighbour fill, all-kept
fallback, and gap fill up to the rightmost kept position.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..core.blockmask import BlockMask
from ..core.errors import InputError
from ..core.keepset import KeepSet
from ..core.layout import default_scale, normalize_qkv
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..methods.base import check_range, register_method
from ..reference.selection import rank_order

PAPER = "Liang et al., FOCUS: DLLMs Know How to Tame Their Compute Bound, ICML 2026, arXiv 2601.23278"
CODE = "sands-lab/FOCUS@277f1d158b977867425a50ed17a6218466139c9e"


def focus_importance(q: np.ndarray, k: np.ndarray, scale: float, *,
                     out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Importance ``I [B, L]`` float64 of one layer (``_focus_importance_ragged_kernel``).

    q ``[B, H, L, D]``, k ``[B, Hk, L, D]``: queries/keys of the scored tokens only, in
    ``T`` order (``B`` independent sequences of equal ``L``; ragged batches are separate
    calls). Max-pool neighbours are the neighbours in that order; missing ones are ignored.
    """
    B, H, L, _ = q.shape
    G = H // k.shape[1]
    res = np.zeros((B, L)) if out is None else out[0]
    kk = np.repeat(np.asarray(k, np.float64), G, axis=1)
    for b in range(B):
        s = np.einsum("hid,hjd->hij", np.asarray(q[b], np.float64), kk[b]) * scale
        p = s.copy()
        p[..., 1:] = np.maximum(p[..., 1:], s[..., :-1])
        p[..., :-1] = np.maximum(p[..., :-1], s[..., 1:])
        a = np.exp(p - p.max(-1, keepdims=True))
        res[b] = (a / a.sum(-1, keepdims=True)).sum(axis=(0, 1))
    return (res,)


FOCUS_SCORE = define_op("focus_importance", focus_importance, outputs=("importance",),
                        kind="array")


def round_bf16(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to bfloat16 (round to nearest even), back in float64."""
    import ml_dtypes

    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def target_count(L: int, avg_dec: float, alpha: float) -> int:
    """``focus_compute_targets``: ``K = min(L, max(1, ceil(max(avg_dec, 1) * alpha)))``,
    0 when ``L == 0``."""
    if L == 0:
        return 0
    return int(min(L, max(1, math.ceil(max(float(avg_dec), 1.0) * float(alpha)))))


def focus_keep(delta: Any, positions: Any, *, avg_dec: float = 1.0, alpha: float = 1.5,
               progress: int = -1) -> dict[str, Any]:
    """The keep rule (``focus_select_and_enforce_ragged``) for one sequence.

    ``delta [L]`` decision scores in ``T`` order, ``positions [L]`` their block-local
    positions (strictly ascending). Returns ``keep bool [L]``, ``K``, ``evict`` (whether
    eviction ran), ``used_threshold``, ``threshold`` (``mean + std``) and ``boundary`` (the
    lowest candidate score).
    """
    d = np.asarray(delta, np.float64).reshape(-1)
    pos = np.asarray(positions).reshape(-1)
    L = d.size
    if pos.size != L or (L > 1 and (np.diff(pos) <= 0).any()):
        raise InputError(f"positions: expected {L} strictly ascending positions, got {pos}")
    K = target_count(L, avg_dec, alpha)
    info: dict[str, Any] = {"K": K, "evict": bool(K > 0 and L > K), "used_threshold": False,
                            "threshold": float("nan"), "boundary": float("nan")}
    if not info["evict"]:
        info["keep"] = np.ones(L, bool)
        return info
    # mean + population std in float32, as the official Triton kernel (focus.py:
    # ``mean = tl.sum(..) / denom``, ``threshold = mean + std``); only the summation order
    # differs, which matters only for scores tied at the threshold
    d32 = d.astype(np.float32)
    mean = np.float32(d32.sum(dtype=np.float32) / np.float32(L))
    var = np.float32(((d32 - mean) ** 2).sum(dtype=np.float32) / np.float32(L))
    thr = np.float32(mean + np.sqrt(var))
    cand = d32 >= thr
    info["threshold"] = float(thr)
    if cand.sum() >= K:
        keep, info["used_threshold"] = cand, True
    else:
        keep = np.zeros(L, bool)
        keep[rank_order(d)[:K]] = True                     # ties: lower T index first
    info["boundary"] = float(d[keep].min())
    base = keep.copy()
    adj = pos[1:] - pos[:-1] == 1                          # left-neighbour fill (one pass)
    keep[:-1] |= adj & base[1:] & ~base[:-1]
    if not keep.any():
        keep[:] = True
    R = pos[keep].max()
    keep |= (pos > progress) & (pos < R)                   # gap fill
    info["keep"] = keep
    return info


@dataclass(frozen=True)
class FocusParams:
    """``alpha`` [``dllm_focus_alpha``]: engine default 1.0 (asserted >= 1); the benchmark
    script uses 1.5 (the default here). ``round_bf16``: round ``I0``/``I1`` to bf16 before
    the delta (the model dtype; ties follow). ``block_len``: dLLM block length (32)."""

    alpha: float = 1.5
    round_bf16: bool = True
    block_len: int = 32

    def validate(self) -> None:
        check_range("alpha", self.alpha, 1)
        check_range("block_len", self.block_len, 1, integer=True)


def focus_step(q0: Any, k0: Any, q1: Any, k1: Any, positions: Sequence[int], *,
               avg_dec: float = 1.0, progress: int = -1, params: FocusParams = FocusParams(),
               softmax_scale: float | None = None, backend: str = "numpy") -> dict[str, Any]:
    """One denoising step of one sequence: layer-0/1 importance, delta, keep rule.

    ``q0, q1 [H, L, D]`` and ``k0, k1 [Hk, L, D]`` (or with a leading batch of 1) of the
    scored tokens at ``positions`` (block-local). Returns ``I0``, ``I1``, ``delta``,
    ``keep [L]``, the rule's details, ``kept_positions`` and ``keepset`` (a
    :class:`KeepSet` over the ``block_len`` positions: the scored tokens kept).
    """
    params.validate()
    arrs = []
    for name, x in (("q0", q0), ("k0", k0), ("q1", q1), ("k1", k1)):
        x = np.asarray(x)
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[0] != 1:
            raise InputError(f"{name}: expected [H, L, D] (or [1, H, L, D]), got {np.shape(x)}")
        arrs.append(x)
    q0, k0, q1, k1 = arrs
    L = q0.shape[2]
    pos = np.asarray(positions, np.int64)
    if any(x.shape[2] != L for x in arrs) or pos.shape != (L,):
        raise InputError(f"positions: q/k of both layers and positions must have L = {L} tokens")
    if L and (pos.min() < 0 or pos.max() >= params.block_len):
        raise InputError(f"positions: must lie in [0, {params.block_len}), got {pos}")
    if L == 0:                                            # nothing still masked: no step
        empty = np.zeros(0)
        return {"I0": empty, "I1": empty, "delta": empty, "keep": np.zeros(0, bool), "K": 0,
                "evict": False, "used_threshold": False, "threshold": float("nan"),
                "boundary": float("nan"), "kept_positions": pos,
                "keepset": KeepSet(np.full((1, 1, 1), -1), q_len=params.block_len,
                                   k_len=params.block_len)}
    for qq, kk in ((q0, k0), (q1, k1)):
        normalize_qkv(qq, kk)                             # ranks, GQA ratio, head dims, NaN
    fn = dispatch(FOCUS_SCORE.name, backend, (q0, k0))
    sc = default_scale(q0.shape[-1], softmax_scale)
    i0 = np.asarray(fn(q0, k0, sc)[0], np.float64)[0]
    i1 = np.asarray(fn(q1, k1, sc)[0], np.float64)[0]
    if params.round_bf16:
        i0, i1 = round_bf16(i0), round_bf16(i1)
    delta = i1 - i0
    rule = focus_keep(delta, pos, avg_dec=avg_dec, alpha=params.alpha, progress=progress)
    kept = pos[rule["keep"]]
    keepset = KeepSet(kept[None, None] if kept.size else np.full((1, 1, 1), -1),
                      q_len=params.block_len, k_len=params.block_len)
    return {"I0": i0, "I1": i1, "delta": delta, **rule, "kept_positions": kept,
            "keepset": keepset}


def running_avg_decoded(decoded_per_step: Sequence[int]) -> float:
    """``avg_dec``: mean over this block's steps that decoded >= 1 token; 1.0 without
    history (``get_focus_info``)."""
    c = [int(x) for x in decoded_per_step if int(x) >= 1]
    return float(np.mean(c)) if c else 1.0


@dataclass(frozen=True)
class FocusSelectParams(FocusParams):
    """:class:`FocusParams` plus the step's context: ``positions`` (block-local positions of
    the scored tokens, default ``0..L-1``), ``avg_dec`` (decoded tokens per step so far,
    :func:`running_avg_decoded`) and ``progress`` (the official step counter, -1 = none)."""

    positions: tuple[int, ...] | None = None
    avg_dec: float = 1.0
    progress: int = -1

    def validate(self) -> None:
        super().validate()
        check_range("avg_dec", self.avg_dec, 0)


@register_method("focus", FocusSelectParams, kind="importance",
                 summary="dLLM decodable-token importance (layer-1 minus layer-0 attention "
                         "received) and the FOCUS keep rule",
                 paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: FocusSelectParams, *,
           causal: bool = False, backend: str = "numpy") -> Selection:
    """FOCUS through :func:`refattn.select`: the batch axis holds the two layers FOCUS
    compares, q ``[2, H, L, D]`` and k ``[2, Hk, L, D]`` (index 0 = layer 0, 1 = layer 1 of
    the same ``L`` scored tokens). Returns a :class:`Selection` whose ``mask`` marks the kept
    tokens (``BlockMask`` ``[1, 1, 1, L]``, ``block_q = L``, ``block_k = 1``) and whose
    ``extras`` hold ``I0``, ``I1``, ``delta``, ``keep``, ``K``, ``kept_positions`` and
    ``keepset``; ``scores`` are ``delta`` with ``boundary`` the rule's lowest kept score."""
    if causal:
        raise InputError("causal: FOCUS scores a bidirectional dLLM block; use causal=False")
    if q.shape[0] != 2 or k.shape[0] != 2:
        raise InputError(f"q, k: focus needs the two layers on the batch axis ([2, H, L, D]), "
                         f"got q {tuple(q.shape)} and k {tuple(k.shape)}")
    L = q.shape[2]
    pos = np.arange(L) if params.positions is None else np.asarray(params.positions, np.int64)
    base = FocusParams(alpha=params.alpha, round_bf16=params.round_bf16, block_len=params.block_len)
    res = focus_step(q[0], k[0], q[1], k[1], pos, avg_dec=params.avg_dec,
                     progress=params.progress, params=base, backend=backend)
    geo = dict(block_q=L, block_k=1, q_len=L, k_len=L)
    keep = np.asarray(res["keep"], bool).reshape(1, 1, 1, L)
    return Selection(mask=BlockMask(keep, **geo),
                     scores=BlockScores(np.asarray(res["delta"]).reshape(1, 1, 1, L), **geo),
                     boundary=np.full((1, 1, 1), res["boundary"]), extras=res)
