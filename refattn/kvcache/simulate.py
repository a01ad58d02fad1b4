"""Decode simulator: run a KV-cache method over a prefill and decode steps, and measure it.

Given prefill ``q, k, v`` (``Sq == Sk = L0``) and decode steps (one new token each, with its
own ``q, k, v``), the simulator applies the method as its official code does:

* prefill-only methods (``snapkv``, ``kvpress``, ``caote``) select once after the prompt;
  every later token is kept;
* streaming methods (``h2o``, ``vatp``, ``streamingllm``) update their state after every step
  (H2O's real drop / masking simulation, VATP's masking simulation, StreamingLLM's
  ``__call__``; with ``pos_shift`` the step's attention uses re-encoded positions).

At step ``t`` the new token (position ``L0 + t``) is appended and its query attends to the
kept cache (itself included). Each row of the report compares that with the full cache:

* ``out_err_rel = ||o_kept - o_full||_F / ||o_full||_F`` and ``out_err_max = max |o_kept - o_full|``
  over all query heads (float64);
* ``mass_recall`` = mean over query heads of ``sum_{j kept} p_full_j`` (share of the full
  attention mass on kept tokens);
* ``kept_mean`` / ``kept_min`` / ``kept_max``: kept tokens per query head (the new token included).

:func:`run_kv` is the entry point of the ``refattn kv`` command.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import InputError
from ..core.keepset import KeepSet, resolve_budget
from ..core.layout import normalize_qkv
from ..methods.base import get_method
from . import caote, h2o, presses, snapkv, streamingllm, vatp  # noqa: F401  (register methods)
from ._common import attention_probs, repeat_kv

COLUMNS = (
    "step",
    "position",
    "cache_len",
    "kept_mean",
    "kept_min",
    "kept_max",
    "out_err_rel",
    "out_err_max",
    "mass_recall",
)


class _Policy:
    """State of one method during decoding; ``allowed`` gives the keys the next query sees."""

    pos_shift = False

    def allowed(self, length: int) -> np.ndarray:
        raise NotImplementedError

    def update(self, probs: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """After a step: ``probs [B, Hq, 1, length]`` over all positions (0 where not kept)."""

    def keepset(self, length: int) -> KeepSet:
        """The kept cache over the ``length`` tokens seen so far, in the method's order."""
        raise NotImplementedError


class _PrefillOnly(_Policy):
    def __init__(self, keep: KeepSet, num_q_heads: int) -> None:
        self.keep = keep
        self.mask = keep.expand_heads(num_q_heads).key_mask()

    def allowed(self, length: int) -> np.ndarray:
        pad = np.ones(self.mask.shape[:2] + (length - self.mask.shape[-1],), bool)
        return np.concatenate([self.mask, pad], axis=-1)

    def keepset(self, length: int) -> KeepSet:
        if length == self.keep.k_len:
            return self.keep
        later = np.arange(self.keep.k_len, length)
        live = [
            [np.concatenate([self.keep.kept(b, h), later]) for h in range(self.keep.shape[1])]
            for b in range(self.keep.shape[0])
        ]
        return KeepSet.from_lists(live, q_len=1, k_len=length, head_kind=self.keep.head_kind)


class _RealDrop(_Policy):
    def __init__(self, cache: h2o.RealDropCache) -> None:
        self.cache = cache

    def allowed(self, length: int) -> np.ndarray:
        m = self.cache.allowed(length)
        m[..., length - 1] = True
        return m

    def update(self, probs: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        L = probs.shape[-1]
        cols = np.concatenate(
            [self.cache.positions, np.full(self.cache.positions.shape[:2] + (1,), L - 1)], axis=-1
        )
        self.cache.update(
            np.take_along_axis(probs, cols[:, :, None, :], axis=-1), np.array([L - 1])
        )

    def keepset(self, length: int) -> KeepSet:
        return KeepSet(self.cache.positions, q_len=1, k_len=length)


class _MaskSim(_Policy):
    def __init__(self, cache: h2o.MaskSimCache) -> None:
        self.cache = cache

    def allowed(self, length: int) -> np.ndarray:
        return self.cache.allowed(length)

    def update(self, probs: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        vn = vatp.value_l1norm(v, probs.shape[1]) if self.cache.value_weighted else None
        self.cache.update(probs, vn)

    def keepset(self, length: int) -> KeepSet:
        return KeepSet.from_key_mask(self.cache.mask_next[..., :length], q_len=1)


class _Streaming(_Policy):
    def __init__(
        self,
        cache: streamingllm.StartRecentCache,
        shape: tuple[int, int],
        params: streamingllm.StreamingLLMParams,
    ) -> None:
        self.cache, self.shape, self.params = cache, shape, params
        self.pos_shift = bool(params.pos_shift)

    def allowed(self, length: int) -> np.ndarray:
        m = np.zeros(self.shape + (length,), bool)
        m[..., self.cache.positions] = True
        m[..., length - 1] = True
        return m

    def update(self, probs: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        self.cache.append([probs.shape[-1] - 1])
        self.cache()

    def keepset(self, length: int) -> KeepSet:
        B, H = self.shape
        pos = self.cache.positions
        return KeepSet(np.broadcast_to(pos, (B, H, pos.size)), q_len=1, k_len=length)


def _make_policy(method: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, params: Any) -> _Policy:
    B, Hq, L, _ = q.shape
    if method == "h2o" and params.variant not in h2o.SINGLE_FORWARD_VARIANTS:
        return (_RealDrop if params.variant == "real_drop" else _MaskSim)(
            h2o.h2o_prefill(q, k, params)
        )
    if method == "vatp":
        cache = params.cache()
        P = attention_probs(q, k, scale=1.0 / np.sqrt(q.shape[-1]), causal=True)
        cache.update(P, vatp.value_l1norm(v, Hq))
        return _MaskSim(cache)
    if method == "streamingllm":
        cache = streamingllm.StartRecentCache(params.start_size, params.recent_size)
        cache.append(np.arange(L))
        cache()
        return _Streaming(cache, (B, Hq), params)
    sel = get_method(method).select(q, k, v, params, causal=True, backend="numpy")
    keep = sel.extras.get("keepset")
    if keep is None:  # h2o single_forward: the mask changes per row; the last row is what is kept
        tm = sel.extras["token_mask"].mask
        keep = KeepSet.from_key_mask(tm[:, :, -1, :], q_len=1)
    return _PrefillOnly(keep, Hq)


def budget_params(method: str, budget: Any, length: int, params: dict[str, Any]) -> dict[str, Any]:
    """Map a total budget (tokens kept per head after the prompt: an int count or a float
    ratio of ``length``) to the method's own parameters; explicit ``params`` win."""
    if budget is None:
        return dict(params)
    n = resolve_budget(budget, length)
    ratio = isinstance(budget, float)
    half = (lambda r: r / 2.0) if ratio else (lambda c: (c + 0.5) / length)  # int(ratio * L) = c
    out: dict[str, Any] = {}
    if method == "snapkv":
        out["max_capacity_prompt"] = n
    elif method == "h2o":
        out.update(hh_size=n // 2, recent_size=n - n // 2)
        out.update(
            heavy_ratio=half(budget if ratio else n // 2),
            recent_ratio=half(budget if ratio else n - n // 2),
        )
    elif method == "vatp":
        out["heavy_ratio"] = half(budget if ratio else n // 2)
    elif method == "streamingllm":
        s = params.get("start_size", streamingllm.StreamingLLMParams.start_size)
        out["recent_size"] = max(n - s, 0)
    elif method in ("kvpress", "caote"):
        out["n_kept"] = n
    else:
        raise InputError(f"method: {method!r} is not a KV-cache method")
    out.update(params)
    return out


def parse_budget(text: str) -> int | float:
    """A command-line budget: ``"256"`` is a token count, ``"0.2"`` a ratio of the prompt."""
    t = str(text).strip()
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        raise InputError(
            f"budget: expected a token count (e.g. 256) or a ratio (e.g. 0.2), got {text!r}"
        ) from None


def _step_arrays(decode: Any) -> tuple[Any, Any, Any]:
    if isinstance(decode, dict):
        missing = [x for x in ("q", "k", "v") if x not in decode]
        if missing:
            raise InputError(f"decode: missing array(s) {missing}")
        return decode["q"], decode["k"], decode["v"]
    if isinstance(decode, (tuple, list)) and len(decode) == 3:
        return tuple(decode)  # type: ignore[return-value]
    raise InputError("decode: expected a dict with q, k, v or a (q, k, v) tuple")


def run_kv(
    method: str,
    q: Any,
    k: Any,
    v: Any,
    budget: Any = None,
    decode: Any = None,
    *,
    layout: str = "bhsd",
    **params: Any,
) -> dict[str, Any]:
    """Run KV-cache ``method`` on a prefill and optional decode steps.

    q ``[B, Hq, L0, D]``, k/v ``[B, Hkv, L0, D]`` (``layout`` as :func:`refattn.attention`);
    ``decode``: ``{"q": [B,Hq,T,D], "k": [B,Hkv,T,D], "v": [B,Hkv,T,Dv]}`` (or a tuple), step
    ``t`` at position ``L0 + t``. ``budget``: tokens kept per head after the prompt (int) or a
    ratio of ``L0`` (float), mapped by :func:`budget_params`; ``params`` are the method's own.

    Returns ``{"method", "params", "kept": [[positions of (b, h)]] after the prompt (keep
    order), "head_kind", "kept_final", "columns", "rows"}`` (one row per decode step).
    """
    info = get_method(method)
    if info.kind != "kv-cache":
        raise InputError(f"method: {method!r} is a {info.kind!r} method, not a KV-cache method")
    q4, k4, v4, shape = normalize_qkv(q, k, v, layout=layout)
    if v4 is None:
        raise InputError("v: the decode simulator needs the values")
    if shape.q_len != shape.k_len:
        raise InputError(f"q: the prefill needs Sq == Sk, got {shape.q_len} and {shape.k_len}")
    p = info.make_params(**budget_params(method, budget, shape.k_len, params))
    policy = _make_policy(method, q4, k4, v4, p)
    keep0 = policy.keepset(shape.k_len)
    steps = 0
    if decode is not None:
        dq, dk, dv = _step_arrays(decode)
        dq4, dk4, dv4, dshape = normalize_qkv(dq, dk, dv, layout=layout)
        if (dshape.batch, dshape.q_heads, dshape.kv_heads, dshape.head_dim, dshape.v_dim) != (
            shape.batch,
            shape.q_heads,
            shape.kv_heads,
            shape.head_dim,
            shape.v_dim,
        ):
            raise InputError(f"decode: shapes {dshape} do not match the prefill's {shape}")
        if dshape.q_len != dshape.k_len:
            raise InputError(f"decode: q has {dshape.q_len} steps but k has {dshape.k_len}")
        steps = dshape.q_len
        if method == "h2o" and p.variant in h2o.SINGLE_FORWARD_VARIANTS and steps:
            raise InputError("variant: H2O's single_forward simulation has no decode steps")
        K = np.concatenate([k4, dk4], axis=2).astype(np.float64)
        V = np.concatenate([v4, dv4], axis=2).astype(np.float64)
    rows = []
    scale = 1.0 / np.sqrt(shape.head_dim)
    for t in range(steps):
        pos = shape.k_len + t
        qt = dq4[:, :, t : t + 1].astype(np.float64)
        Kt, Vt = K[:, :, : pos + 1], V[:, :, : pos + 1]
        vv = repeat_kv(Vt, shape.q_heads)
        pf = attention_probs(qt, Kt, scale=scale, causal=True)
        of = np.einsum("bhqk,bhkd->bhqd", pf, vv)
        allowed = policy.allowed(pos + 1)
        if policy.pos_shift:
            kept = np.nonzero(allowed[0, 0])[0]
            ok, pk = streamingllm.shifted_attention(
                qt, np.array([pos]), Kt, Vt, kept, policy.params.rope_base, scale,
                scaling=policy.params.rope_scaling,
            )
            pkept = np.zeros_like(pf)
            pkept[..., kept] = pk
        else:
            pkept = attention_probs(qt, Kt, scale=scale, causal=True, key_mask=allowed)
            ok = np.einsum("bhqk,bhkd->bhqd", pkept, vv)
        cnt = allowed.sum(-1)
        nf = np.linalg.norm(of)
        rows.append(
            {
                "step": t + 1,
                "position": pos,
                "cache_len": pos + 1,
                "kept_mean": float(cnt.mean()),
                "kept_min": int(cnt.min()),
                "kept_max": int(cnt.max()),
                "out_err_rel": float(np.linalg.norm(ok - of) / nf) if nf > 0 else 0.0,
                "out_err_max": float(np.abs(ok - of).max()),
                "mass_recall": float(np.where(allowed[:, :, None], pf, 0.0).sum(-1).mean()),
            }
        )
        policy.update(pkept, Kt, Vt)
    final = policy.keepset(shape.k_len + steps) if steps else keep0
    return {
        "method": method,
        "params": dict(vars(p)),
        "head_kind": keep0.head_kind,
        "kept": _lists(keep0),
        "kept_final": _lists(final),
        "columns": list(COLUMNS),
        "rows": rows,
    }


def _lists(keep: KeepSet) -> list[list[list[int]]]:
    B, H = keep.shape
    return [[keep.kept(b, h).tolist() for h in range(H)] for b in range(B)]


__all__ = ["run_kv", "budget_params", "parse_budget", "COLUMNS"]
