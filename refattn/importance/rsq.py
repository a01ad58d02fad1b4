"""RSQ: token importance for quantization -- attention concentration and feature scaling.

Paper: Sung et al., "RSQ: Learning from Important Tokens Leads to Better Quantized LLMs",
arXiv 2503.01820. Official code: ``ylsung/rsq@1a7cf31d09ff69ac2c3c4c5e9da48d70aabd7996``,
``fake_quant/input_weighting_module.py`` (every strategy), ``fake_quant/gptq_utils.py``
(``GPTQ.add_batch``: the weights scale the features), ``scripts/run_rsq.sh`` (defaults).

AttnCon (``OriginalAttentionWeighting``), per calibration sequence of ``L`` tokens and the
layer's causal attention ``A [H, L, L]``::

    a[j] = sum_h sum_i A[h, i, j]                       attention received (i >= j only)
    a   <- a**2 | sqrt(a)                               optional ``scale``
    a   <- a / (L - j) | a / sqrt(L - j)                ``normalize`` = linear | sqrt
    w   = clamp((a - lo)/(hi - lo) * (max - min) + min, min, max)
          lo, hi = min/max of a (or its 1-q / q quantiles with ``quantile_value``)
    then one of: masking f  -> 0 for the int(L f) smallest w, 1 elsewhere
                 truncate f -> w = 0 for the int(L f) smallest
                 num_bins n -> quantile bins mapped to linspace(min, max, n)

GPTQ then rescales ``w <- w / sum(w) * L`` and multiplies every token's features by
``sqrt(w_t)`` (:func:`scale_features`), so the Hessian is ``sum_t w_t x_t x_t^T``.

Alternative heuristics (same normalisation): ``actnorm`` ``||x_t||``, ``actdiff``
``||x_in - x_out||``, ``tokenfreq`` ``count(id)``, ``tokensim`` mean squared distance to the
sequence's tokens, ``dot`` row sums of ``X X^T``, and the 0/1 ``firstn`` / ``firstlastn``
masks (``AdhocMaskingWeighting``, not normalised). Each follows its official class's step
order (:data:`OFFICIAL`): ``reverse`` (negation; on by default for actdiff/tokenfreq, as
their YAMLs) comes *after* ``scale`` in MaxDiff/MaxDist/TokenFreq but *before* it in
Magnitude/Dot, and only Original (attncon) and Magnitude (actnorm) have a ``truncate``
branch (the others swallow it in ``**kwargs``: masking, then num_bins). Ties among equal
weights at a ``masking``/``truncate`` cut go to the lower index (``torch.topk`` leaves them
unspecified).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..core.errors import InputError
from ..core.keepset import KeepSet
from ..core.layout import default_scale, normalize_qkv
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..methods.base import check_choice, check_range, register_method
from ..reference.selection import rank_order

PAPER = "Sung et al., RSQ: Learning from Important Tokens Leads to Better Quantized LLMs, arXiv 2503.01820"
CODE = "ylsung/rsq@1a7cf31d09ff69ac2c3c4c5e9da48d70aabd7996"
NORMALIZE = ("default", "linear", "sqrt", "none")
SCALES = ("none", "square", "sqrt")
STRATEGIES = ("attncon", "actnorm", "actdiff", "tokensim", "tokenfreq", "dot", "adhoc")


class Official(NamedTuple):
    """How a strategy's official class (``fake_quant/input_weighting_module.py``) runs the
    shared tail: ``reverse`` its YAML default (None: the class has no ``reverse``),
    ``scale_first`` whether ``scale`` precedes the negation, ``truncate`` whether it has a
    ``truncate`` branch."""

    cls: str
    reverse: bool | None
    scale_first: bool
    truncate: bool


OFFICIAL = {
    "attncon": Official("OriginalAttentionWeighting", None, True, True),   # scale :184, truncate :206
    "actnorm": Official("MagnitudeWeighting", False, False, True),         # reverse :271, scale :274, truncate :296
    "tokensim": Official("MaxDistWeighting", False, True, False),          # scale :417, reverse :422, no truncate
    "actdiff": Official("MaxDiffWeighting", True, True, False),            # scale :473, reverse :478, no truncate
    "tokenfreq": Official("TokenFreqWeighting", True, True, False),        # scale :525, reverse :530, no truncate
    "dot": Official("DotWeighting", False, False, False),                  # reverse :582, scale :585, no truncate
}


# ----------------------------------------------------------------- scoring op
def rsq_attention_received(q: np.ndarray, k: np.ndarray, scale: float, *,
                           out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Attention received ``a [B, L]`` float64: ``a[j] = sum_h sum_{i >= j} A[h, i, j]``.

    q ``[B, H, L, D]``, k ``[B, Hk, L, D]`` (post-RoPE, query head ``h`` reads kv head
    ``h // (H/Hk)``, ``repeat_kv``); ``A = softmax(q k^T * scale + causal)`` (the explicit
    causal mask of ``llama_original_attention``). Chunked over query rows.
    """
    B, H, L, _ = q.shape
    G = H // k.shape[1]
    res = np.zeros((B, L)) if out is None else out[0]
    R = max(1, (1 << 22) // max(1, L * G))
    for b in range(B):
        acc = np.zeros(L)
        for g in range(k.shape[1]):
            kk = k[b, g].astype(np.float64)
            for r0 in range(0, L, R):
                r1 = min(L, r0 + R)
                s = q[b, g * G:(g + 1) * G, r0:r1].astype(np.float64) @ kk.T * scale
                vis = np.arange(L)[None, :] <= np.arange(r0, r1)[:, None]
                s = np.where(vis, s, -np.inf)
                p = np.exp(s - s.max(-1, keepdims=True))
                acc += (p / p.sum(-1, keepdims=True)).sum(axis=(0, 1))
        res[b] = acc
    return (res,)


RSQ_SCORE = define_op("rsq_attention_received", rsq_attention_received,
                      outputs=("received",), kind="array")


# ------------------------------------------------------------ normalisation
def normalize_weight(x: np.ndarray, min_value: float, max_value: float,
                     quantile_value: float | None = None) -> np.ndarray:
    """``InputWeightingModule.normalize_weight``: min-max to ``[min_value, max_value]``
    (quantile bounds with ``quantile_value``, linear interpolation as ``torch.quantile``),
    then clamp. A constant input gives NaN (0/0), as the official code does."""
    x = np.asarray(x, np.float64)
    if quantile_value is not None:
        lo, hi = np.quantile(x, sorted([1 - quantile_value, quantile_value]))
    else:
        lo, hi = x.min(), x.max()
    with np.errstate(invalid="ignore", divide="ignore"):
        y = (x - lo) / (hi - lo) * (max_value - min_value) + min_value
    return np.clip(y, min_value, max_value)


def bin_values(x: np.ndarray, min_value: float, max_value: float, num_bins: int) -> np.ndarray:
    """``bin_the_values``: quantile bins (thresholds at ``linspace(0,1,n+1)[1:-1]``) mapped
    to ``linspace(min_value, max_value, n)``; bins are right-closed. NaN as the code's
    masks leave it: a NaN value matches no bin and stays NaN, and NaN thresholds (any NaN
    input) match nothing, so the input comes back unchanged."""
    x = np.asarray(x, np.float64)
    th = np.quantile(x, np.linspace(0, 1, num_bins + 1)[1:-1])
    if np.isnan(th).any():
        return x.copy()
    out = np.linspace(min_value, max_value, num_bins)[np.searchsorted(th, x, side="left")]
    return np.where(np.isnan(x), x, out)


def finish_weights(raw: np.ndarray, *, min_value: float, max_value: float,
                   normalize: str = "default", scale: str = "none",
                   quantile_value: float | None = None, masking: float | None = None,
                   truncate: float | None = None, num_bins: int | None = None,
                   reverse: bool = False, scale_first: bool = True) -> np.ndarray:
    """The shared tail of every normalised strategy: negate (``reverse``) and ``scale`` in
    the class's order (``scale_first``: scale then negate, else negate then scale, so a
    negated ``sqrt`` is NaN and a negated ``square`` undoes the negation, as officially),
    per-position normalise, min-max, then masking / truncate / binning (first one set wins,
    as in the code). :func:`rsq_weights` passes ``truncate`` only to the classes that have
    it (:data:`OFFICIAL`)."""
    w = np.asarray(raw, np.float64)
    if reverse and not scale_first:
        w = -w
    if scale == "square":
        w = w ** 2
    elif scale == "sqrt":
        with np.errstate(invalid="ignore"):
            w = np.sqrt(w)
    if reverse and scale_first:
        w = -w
    L = w.shape[-1]
    if normalize == "linear":
        w = w / np.arange(L, 0, -1)                  # queries that can see token j: L - j
    elif normalize == "sqrt":
        w = w / np.sqrt(np.arange(L, 0, -1))
    if normalize != "none":
        w = normalize_weight(w, min_value, max_value, quantile_value)
    if masking is not None:
        low = rank_order(-w)[: int(L * masking)]
        w = np.ones(L)
        w[low] = 0.0
    elif truncate is not None:
        w = w.copy()
        w[rank_order(-w)[: int(L * truncate)]] = 0.0
    elif num_bins is not None:
        w = bin_values(w, min_value, max_value, int(num_bins))
    return w


# ------------------------------------------------------------- heuristics
def actnorm(x: np.ndarray) -> np.ndarray:
    """``MagnitudeWeighting``: ``||x_t||_2`` of the layer input ``x [L, D]``."""
    return np.linalg.norm(np.asarray(x, np.float64), axis=-1)


def actdiff(x_in: np.ndarray, x_out: np.ndarray) -> np.ndarray:
    """``MaxDiffWeighting``'s raw score ``||x_in,t - x_out,t||_2`` (unsigned: the YAML's
    ``reverse=True`` negates it after ``scale``, in :func:`finish_weights`)."""
    return np.linalg.norm(np.asarray(x_in, np.float64) - np.asarray(x_out, np.float64), axis=-1)


def tokensim(x: np.ndarray) -> np.ndarray:
    """``MaxDistWeighting``: ``mean_s ||x_t - x_s||^2`` over the sequence."""
    x = np.asarray(x, np.float64)
    n = (x * x).sum(-1)
    return (n[:, None] + n[None, :] - 2 * x @ x.T).mean(1)


def dot(x: np.ndarray) -> np.ndarray:
    """``DotWeighting``: row sums of ``X X^T``."""
    x = np.asarray(x, np.float64)
    return (x @ x.T).sum(-1)


def tokenfreq(token_ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``TokenFreqWeighting``'s raw score ``count(id)`` over the calibration set
    (``counts[v]`` = occurrences of vocabulary id ``v``; unsigned: the YAML's
    ``reverse=True`` negates it after ``scale``, in :func:`finish_weights`). The frequencies
    are those of ``token_ids`` themselves; the official loop pairs them with another
    (shuffled) sequence, see ``docs/methods/rsq.md``."""
    return np.asarray(counts, np.float64)[np.asarray(token_ids)]


def adhoc_mask(length: int, method_type: str) -> np.ndarray:
    """``AdhocMaskingWeighting``: ``"p1_..._pk_T"`` -> 1 on parts ``p_i`` of ``T`` equal parts
    (``L // T`` tokens each), else 0; ``first_half`` / ``second_half`` as the code (note:
    ``first_half`` sets the *second* half to 1, as officially written)."""
    w = np.zeros(int(length))
    if method_type == "first_half":
        w[length // 2:] = 1
    elif method_type == "second_half":
        w[: length // 2] = 1
    else:
        try:
            parts = [int(p) for p in method_type.split("_")]
        except ValueError:
            raise InputError(f"method_type: expected 'p1_..._T', got {method_type!r}") from None
        if len(parts) < 2 or parts[-1] < 1:
            raise InputError(f"method_type: expected 'p1_..._T', got {method_type!r}")
        per = length // parts[-1]
        for p in parts[:-1]:
            w[p * per:(p + 1) * per] = 1
    return w


def scale_features(x: np.ndarray, w: np.ndarray, *, renormalize: bool = True) -> np.ndarray:
    """GPTQ's use of the weights (``GPTQ.add_batch``): ``w <- w / sum(w) * L`` when
    ``renormalize`` (mean 1), then ``x_t <- sqrt(w_t) x_t``. x ``[L, D]``, w ``[L]``."""
    w = np.asarray(w, np.float64)
    if renormalize:
        w = w / w.sum() * w.size
    return np.sqrt(w)[:, None] * np.asarray(x, np.float64)


# ----------------------------------------------------------------- method
@dataclass(frozen=True)
class RSQParams:
    """RSQ parameters (official names; defaults of ``scripts/run_rsq.sh``: the YAML range
    ``[1, 3]`` is overridden to ``[0.005, 1]``). ``strategy="attncon"`` is RSQ; the others
    need their inputs through :func:`rsq_weights`. ``reverse`` (negate the score) ``None``
    takes the strategy's YAML value (True for actdiff/tokenfreq, False otherwise); it is
    ignored by attncon/adhoc, and ``truncate`` by tokensim/actdiff/tokenfreq/dot, whose
    official classes lack it (:data:`OFFICIAL`). ``keep_ratio`` only shapes the
    ``Selection`` (tokens with the highest weights kept), RSQ itself is soft weighting."""

    strategy: str = "attncon"
    min_value: float = 0.005
    max_value: float = 1.0
    normalize: str = "default"
    scale: str = "none"
    quantile_value: float | None = None
    masking: float | None = None
    truncate: float | None = None
    num_bins: int | None = None
    method_type: str = "0_8"
    reverse: bool | None = None
    keep_ratio: float = 1.0

    def validate(self) -> None:
        check_choice("strategy", self.strategy, STRATEGIES)
        check_range("min_value", self.min_value)
        check_range("max_value", self.max_value)
        if not self.max_value > self.min_value:
            raise InputError(f"max_value: must exceed min_value {self.min_value}, got {self.max_value}")
        check_choice("normalize", self.normalize, NORMALIZE)
        check_choice("scale", self.scale, SCALES)
        for n in ("quantile_value", "masking", "truncate"):
            if getattr(self, n) is not None:
                check_range(n, getattr(self, n), 0, 1)
        if self.num_bins is not None:
            check_range("num_bins", self.num_bins, 2, integer=True)
        if self.reverse not in (None, True, False):
            raise InputError(f"reverse: expected None, True or False, got {self.reverse!r}")
        check_range("keep_ratio", self.keep_ratio, 0, 1, lo_open=True)


def rsq_weights(params: RSQParams, *, q: Any = None, k: Any = None, x: Any = None,
                x_out: Any = None, token_ids: Any = None, counts: Any = None,
                softmax_scale: float | None = None, backend: str = "numpy") -> np.ndarray:
    """Token weights float64 ``[B, L]`` (``[1, L]`` for the feature heuristics) of
    ``params.strategy``: attncon needs q ``[B,H,L,D]``/k ``[B,Hk,L,D]``; actnorm/tokensim/dot
    ``x [L, D]``; actdiff ``x`` and ``x_out``; tokenfreq ``token_ids [L]`` and ``counts``;
    adhoc only a length (from whichever input is given). Each strategy runs its official
    class's order of ``reverse``/``scale`` and ``truncate`` only where that class has it
    (:data:`OFFICIAL`)."""
    s = params.strategy
    off = OFFICIAL.get(s)
    tail = dict(min_value=params.min_value, max_value=params.max_value,
                normalize=params.normalize, scale=params.scale, masking=params.masking,
                num_bins=params.num_bins)
    if off is not None:
        tail["truncate"] = params.truncate if off.truncate else None
        if off.reverse is not None:
            tail["reverse"] = off.reverse if params.reverse is None else bool(params.reverse)
            tail["scale_first"] = off.scale_first

    def need(name: str, val: Any) -> np.ndarray:
        if val is None:
            raise InputError(f"{name}: strategy {s!r} needs it")
        return np.asarray(val)

    if s == "attncon":
        q, k, _, shape = normalize_qkv(need("q", q), need("k", k))
        if shape.q_len != shape.k_len:
            raise InputError(f"k: AttnCon needs prefill q/k of one length, got Sq = "
                             f"{shape.q_len}, Sk = {shape.k_len}")
        (a,) = dispatch(RSQ_SCORE.name, backend, (q, k))(q, k, default_scale(q.shape[-1], softmax_scale))
        return np.stack([finish_weights(r, quantile_value=params.quantile_value, **tail)
                         for r in np.asarray(a, np.float64)])
    if s == "adhoc":
        if x is not None:
            length = np.asarray(x).shape[-2]
        elif token_ids is not None:
            length = np.asarray(token_ids).shape[-1]
        else:
            length = need("x", q).shape[-2]
        return adhoc_mask(length, params.method_type)[None]
    raw = {"actnorm": lambda: actnorm(need("x", x)),
           "actdiff": lambda: actdiff(need("x", x), need("x_out", x_out)),
           "tokensim": lambda: tokensim(need("x", x)), "dot": lambda: dot(need("x", x)),
           "tokenfreq": lambda: tokenfreq(need("token_ids", token_ids), need("counts", counts)),
           }[s]()
    return finish_weights(raw, **tail)[None]


@register_method("rsq", RSQParams, kind="importance",
                 summary="attention received (sum over heads and queries), min-max to [0.005, 1]",
                 paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: RSQParams, *,
           causal: bool = True, backend: str = "numpy") -> Selection:
    """RSQ AttnCon on prefill q ``[B,H,L,D]``, k ``[B,Hk,L,D]``: ``extras["weights"]
    [B, L]``, ``extras["keepset"]`` the ``ceil(keep_ratio * L)`` highest-weight tokens
    (ascending positions; all tokens by default) and ``token_mask`` it."""
    if params.strategy != "attncon":
        raise InputError(f"strategy: select() runs 'attncon' on q/k; got {params.strategy!r} "
                         "(use refattn.importance.rsq.rsq_weights)")
    if not causal or q.shape[2] != k.shape[2]:
        raise InputError("rsq: AttnCon is defined on causal prefill (Sq == Sk, causal=True)")
    w = rsq_weights(params, q=q, k=k, backend=backend)
    B, L = w.shape
    n = int(np.ceil(params.keep_ratio * L))
    km = np.zeros((B, 1, L), bool)
    for b in range(B):
        km[b, 0, rank_order(w[b])[:n]] = True
    keep = KeepSet.from_key_mask(km, q_len=L)
    return Selection(mask=keep.to_block_mask(), extras={
        "weights": w, "keepset": keep, "token_mask": keep})
