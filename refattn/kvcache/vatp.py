"""VATP: value-aware token pruning -- accumulated attention times the value's L1 norm.

Guo, Kamigaito, Watanabe, "Attention Score is not All You Need for Token Importance
Indicator in KV Cache Reduction: Value Also Matters", EMNLP 2024 (arXiv 2406.12335).
Official code ``guozhiyu/vatp@39ea686c9e5d038d9ffbea883218bfdbc9c28807``,
``utils_hh/modify_llama.py`` (``LlamaAttention_heavy_hitter``), ``pred.py``. Built on H2O's
masking simulation (:class:`refattn.kvcache.h2o.MaskSimCache`)::

    s_j = (sum_q A[q, j]) * ||v_j||_1                       prefill, mode "h2o"
    s_j = (sum_{last 400 q} A[q, j] / 400) * ||v_j||_1      prefill, mode "scissorhands"
    s_j <- s_j + A[new, j] * ||v_j||_1                       every decode step
    s_j = max  for j < sink_len                              (prefill, when value-aware)

Budgets: ``heavy = recent = int(r L0)`` (``h2o``; ``pred.py`` sets recent_ratio = heavy_ratio),
or ``heavy = 2 int(r L0) - 10``, ``recent = 10`` (``scissorhands``, the default without
``--h2o``). ``apply_value=False`` is the file's plain H2O (``--apval`` off; no sinks).

Official quirks kept: the next-step mask is stored without ``.clone()``, so one more recent
token than H2O stays visible (``recent + 1``); the scissorhands prefill divides by 400 even
with fewer rows; the first two layers are not excluded (that code is commented out).
The sink score is the float32 maximum (official: ``finfo(dtype).max``, float32 in the
conformance runs; both rank first). GQA: ``||v||_1`` of the kv head is used by each query head of its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError
from ..core.keepset import KeepSet
from ..core.layout import default_scale
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..methods.base import check_choice, check_range, register_method
from ._common import attention_probs, keepset_selection, repeat_kv
from .h2o import SINK_SCORE, MaskSimCache

MODES = ("h2o", "scissorhands")


@dataclass(frozen=True)
class VATPParams:
    """VATP parameters (README run: ``heavy_ratio 0.25``, ``sink_len 20``; ``pred.py``
    default mode without ``--h2o`` is Scissorhands)."""

    mode: str = "scissorhands"
    heavy_ratio: float = 0.25
    recent_ratio: float | None = None  # None: = heavy_ratio, as pred.py
    sink_len: int = 20
    apply_value: bool = True

    def validate(self) -> None:
        check_choice("mode", self.mode, MODES)
        check_range("heavy_ratio", self.heavy_ratio, 0.0, 1.0)
        if self.recent_ratio is not None:
            check_range("recent_ratio", self.recent_ratio, 0.0, 1.0)
        check_range("sink_len", self.sink_len, 0, integer=True)
        check_choice("apply_value", self.apply_value, (True, False))

    def cache(self) -> MaskSimCache:
        """A fresh masking-simulation cache configured as the official forward."""
        rr = self.heavy_ratio if self.recent_ratio is None else self.recent_ratio
        return MaskSimCache(
            self.heavy_ratio,
            rr,
            value_weighted=self.apply_value,
            scissorhands=self.mode == "scissorhands",
            sink_len=self.sink_len if self.apply_value else 0,
            clone_mask=False,
        )


def value_l1norm(v: np.ndarray, num_q_heads: int) -> np.ndarray:
    """``||v_j||_1`` over the head dim, float64 ``[B, Hq, Sk]`` (kv heads repeated)."""
    return repeat_kv(np.abs(v.astype(np.float64)).sum(axis=-1)[..., None], num_q_heads)[..., 0]


def vatp_score(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    mode: str = "scissorhands",
    sink_len: int = 20,
    scale: float | None = None,
) -> np.ndarray:
    """VATP prefill scores float64 ``[B, Hq, L]`` (q ``[B,Hq,L,D]``, k/v ``[B,Hkv,L,D]``):
    accumulated (h2o) or last-400-rows / 400 (scissorhands) causal attention times
    ``||v_j||_1``; the first ``sink_len`` tokens get the sink score."""
    P = attention_probs(q, k, scale=default_scale(q.shape[-1], scale), causal=True)
    acc = P.sum(axis=-2) if mode == "h2o" else P[..., -400:, :].sum(axis=-2) / 400.0
    s = acc * value_l1norm(v, q.shape[1])
    s[..., :sink_len] = SINK_SCORE
    return s


define_op("vatp_score", vatp_score, outputs=("scores",), kind="array")


@register_method(
    "vatp",
    VATPParams,
    kind="kv-cache",
    needs_v=True,
    summary="H2O/Scissorhands accumulated attention x ||v||_1, forced sinks",
    paper="Guo et al., EMNLP 2024 (arXiv 2406.12335)",
    code="guozhiyu/vatp@39ea686c9e5d038d9ffbea883218bfdbc9c28807",
)
def select(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray | None,
    params: VATPParams,
    *,
    causal: bool = True,
    backend: str = "numpy",
) -> Selection:
    """The prompt tokens the first decode step may attend to (VATP's mask after prefill)."""
    if v is None:
        raise InputError("v: VATP needs the values (their L1 norms weight the scores)")
    if q.shape[2] != k.shape[2]:
        raise InputError(f"q: VATP's prefill needs Sq == Sk, got {q.shape[2]} and {k.shape[2]}")
    L = q.shape[2]
    cache = params.cache()
    P = attention_probs(q, k, scale=default_scale(q.shape[-1]), causal=True)
    cache.update(P, value_l1norm(v, q.shape[1]))
    scores = dispatch("vatp_score", backend, (q, k, v))(
        q, k, v, params.mode, params.sink_len if params.apply_value else 0
    )
    keep = KeepSet.from_key_mask(cache.mask_next[..., :L], q_len=L)
    forced = np.zeros(keep.shape + (L,), bool)
    if params.apply_value:
        forced[..., : params.sink_len] = True
    return keepset_selection(
        keep,
        q.shape[1],
        scores=scores,
        forced=forced,
        extras={"cache": cache, "heavy": cache.heavy, "recent": cache.recent},
    )
