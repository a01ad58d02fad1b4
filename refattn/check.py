"""The oracle: compare another implementation's masks and outputs with the reference.

* :func:`compare_masks` -- tie-aware: a difference at a block whose reference score lies
  within ``tol`` of its row's (or head's) selection boundary is a *near-tie*, not a mismatch.
  Differences at forced blocks are always mismatches.
* :func:`compare_arrays` -- the tolerance rule of DESIGN.md (flash-attention style):
  ``max|cand - ref| <= 2 * max|base - ref| + atol`` where ``ref`` is float64, ``base`` an
  emulated low-precision computation and ``atol = 2 * max|(ref + 0.3 - 0.3) - ref|`` at the
  dtype (the rounding noise of one add). NaN never passes; ``-inf`` must match ``-inf``.
* :func:`compare_attention` -- computes ``ref`` and ``base`` from q/k/v and applies the rule
  to a candidate output (and LSE, natural log or base 2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .core.blockmask import BlockMask
from .core.errors import InputError
from .core.scores import Selection


@dataclass
class Report:
    """Outcome of a comparison: ``ok``, statistics and the first differences."""

    ok: bool
    kind: str
    name: str
    stats: dict[str, Any] = field(default_factory=dict)
    first: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    parts: list["Report"] = field(default_factory=list)

    def summary(self) -> str:
        head = f"{self.name}: {'OK' if self.ok else 'MISMATCH'} ({self.kind})"
        lines = [head]
        for k, v in self.stats.items():
            lines.append(f"  {k}: {_fmt(v)}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.first:
            lines.append(f"  first {len(self.first)} differences:")
            for d in self.first:
                lines.append("    " + ", ".join(f"{k}={_fmt(v)}" for k, v in d.items()))
        for p in self.parts:
            lines.extend("  " + line for line in p.summary().splitlines())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "kind": self.kind, "name": self.name,
                "stats": {k: _json(v) for k, v in self.stats.items()},
                "first": [{k: _json(v) for k, v in d.items()} for d in self.first],
                "notes": list(self.notes), "parts": [p.to_dict() for p in self.parts]}

    def __bool__(self) -> bool:
        return self.ok


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _json(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if np.isfinite(f) else str(f)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, tuple):
        return [_json(x) for x in v]
    return v


# ------------------------------------------------------------------------------ masks
def compare_masks(ref: Selection | BlockMask, candidate: BlockMask | np.ndarray,
                  tol: float = 1e-6, *, max_report: int = 10, name: str = "mask") -> Report:
    """Compare ``candidate`` with the reference selection, tie-aware.

    A differing block ``(b, h, row, col)`` is a near-tie when the reference has scores and a
    boundary and ``|score - boundary| <= tol * max(1, |boundary|)``, and the block is not
    forced. ``candidate`` may be a :class:`BlockMask` or a boolean array broadcastable to
    the reference mask ``[B, H, Qb, Kb]``.
    """
    sel = ref if isinstance(ref, Selection) else Selection(mask=ref)
    rm = sel.mask
    if isinstance(candidate, BlockMask):
        if candidate.geometry()[:4] != rm.geometry()[:4]:
            return Report(False, "mask", name, notes=[
                f"geometry differs: reference (block_q, block_k, q_len, k_len) = "
                f"{rm.geometry()[:4]}, candidate {candidate.geometry()[:4]}"])
        cm = candidate.expand_heads(rm.shape[1]).mask if candidate.head_kind != rm.head_kind else candidate.mask
    else:
        cm = np.asarray(candidate)
        if cm.dtype != bool:
            cm = cm.astype(bool)
    try:
        r, c = np.broadcast_arrays(rm.mask, cm)
    except ValueError:
        return Report(False, "mask", name, notes=[
            f"shape differs: reference {rm.mask.shape}, candidate {cm.shape}"])
    diff = r != c
    near = np.zeros_like(diff)
    bnd = sel.boundary_like_mask()
    if sel.scores is not None and bnd is not None:
        s = np.broadcast_to(sel.scores.scores, r.shape)
        b = np.broadcast_to(bnd, r.shape)
        with np.errstate(invalid="ignore"):
            near = np.isfinite(b) & (np.abs(s - b) <= tol * np.maximum(1.0, np.abs(b)))
    if sel.forced is not None:
        near &= ~np.broadcast_to(np.asarray(sel.forced, bool), r.shape)
    mism = diff & ~near
    stats = {"blocks": int(r.size), "selected_ref": int(r.sum()), "selected_candidate": int(c.sum()),
             "differences": int(diff.sum()), "near_ties": int((diff & near).sum()),
             "mismatches": int(mism.sum()), "extra_in_candidate": int((mism & c).sum()),
             "missing_in_candidate": int((mism & r).sum())}
    first = []
    for pos in np.argwhere(mism)[:max_report]:
        b_, h_, i_, j_ = (int(x) for x in pos)
        d = {"b": b_, "h": h_, "row": i_, "block": j_, "ref": bool(r[b_, h_, i_, j_]),
             "candidate": bool(c[b_, h_, i_, j_])}
        if sel.scores is not None:
            d["score"] = float(np.broadcast_to(sel.scores.scores, r.shape)[b_, h_, i_, j_])
        if bnd is not None:
            d["boundary"] = float(np.broadcast_to(bnd, r.shape)[b_, h_, i_, j_])
        first.append(d)
    return Report(stats["mismatches"] == 0, "mask", name, stats, first)


# ----------------------------------------------------------------------------- arrays
def _round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to ``dtype`` and back (bf16 through ml_dtypes)."""
    if dtype in ("float64", "double"):
        return x
    if dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).astype(np.float64)
    return x.astype(dtype).astype(np.float64)


def dtype_eps(dtype: str) -> float:
    if dtype == "bfloat16":
        return 2.0 ** -7
    return float(np.finfo(np.dtype(dtype)).eps)


def add_noise_atol(ref: np.ndarray, dtype: str) -> float:
    """``2 * max|(ref + 0.3 - 0.3) - ref|`` computed at ``dtype``: one add's rounding noise."""
    r = _round_to(np.asarray(ref, np.float64), dtype)
    fin = np.isfinite(r)
    if not fin.any():
        return 0.0
    t = _round_to(_round_to(r[fin] + 0.3, dtype) - 0.3, dtype)
    return float(2.0 * np.max(np.abs(t - r[fin])))


def compare_arrays(ref: Any, candidate: Any, dtype: str = "float32", *, base: Any = None,
                   atol: float | None = None, lse_base: str = "e", name: str = "out",
                   max_report: int = 5, equal_nan: bool = False) -> Report:
    """Apply the tolerance rule to ``candidate`` against the float64 ``ref``.

    ``base``: the emulated low-precision result (same shape); without it the baseline error
    is taken as ``4 * eps(dtype) * max|ref|`` (stated in the report). ``lse_base="2"``
    converts a base-2 candidate LSE to natural log first. ``-inf`` in ``ref`` (empty rows)
    must be ``-inf`` in the candidate; NaN in the candidate never passes, unless
    ``equal_nan``: then NaN is part of the specification (ops whose reference returns NaN
    rows by design) and must appear at exactly the reference's NaN positions -- NaN in both
    passes, NaN in only one of them fails (reported as ``nan_mismatch``).
    """
    with np.errstate(invalid="ignore", over="ignore"):
        return _compare_arrays(ref, candidate, dtype, base, atol, lse_base, name, max_report,
                               bool(equal_nan))


def _compare_arrays(ref: Any, candidate: Any, dtype: str, base: Any, atol: float | None,
                    lse_base: str, name: str, max_report: int,
                    equal_nan: bool = False) -> Report:
    r = np.asarray(ref, np.float64)
    c = np.asarray(candidate).astype(np.float64)
    if lse_base not in ("e", "2", 2):
        raise InputError(f"lse_base: expected 'e' or '2', got {lse_base!r}")
    if str(lse_base) == "2":
        c = c * np.log(2.0)
    if r.shape != c.shape:
        return Report(False, "array", name, notes=[f"shape differs: reference {r.shape}, candidate {c.shape}"])
    rnan = np.isnan(r)
    # NaN in the candidate is an error; with equal_nan only where the reference is not NaN,
    # and a reference NaN the candidate lacks is an error too (nan_mismatch counts both).
    nan = np.isnan(c) & ~rnan if equal_nan else np.isnan(c)
    nan_missing = rnan & ~np.isnan(c) if equal_nan else np.zeros(r.shape, bool)
    both_nan = rnan & np.isnan(c) if equal_nan else np.zeros(r.shape, bool)
    rinf = ~np.isfinite(r) & ~both_nan & ~nan_missing
    cinf = ~np.isfinite(c) & ~np.isnan(c)
    inf_bad = (rinf != cinf) | (rinf & cinf & (np.sign(r) != np.sign(c)))
    inf_bad &= ~nan_missing
    fin = ~rinf & ~cinf & ~nan & ~both_nan & ~nan_missing
    err = np.where(fin, np.abs(c - r), 0.0)
    max_err = float(err.max()) if err.size else 0.0
    rmax = float(np.abs(np.where(np.isfinite(r), r, 0.0)).max()) if r.size else 0.0
    notes = []
    if base is not None:
        bb = np.asarray(base, np.float64)
        both = np.isfinite(bb) & np.isfinite(r)
        base_err = float(np.abs(np.where(both, bb - r, 0.0)).max()) if r.size else 0.0
    else:
        base_err = 4.0 * dtype_eps(dtype) * rmax
        notes.append("no emulated baseline given: baseline error taken as 4*eps(dtype)*max|ref|")
    a = add_noise_atol(r, dtype) if atol is None else float(atol)
    bound = 2.0 * base_err + a
    num = np.sqrt((np.where(fin, c - r, 0.0) ** 2).sum())
    den = np.sqrt((np.where(np.isfinite(r), r, 0.0) ** 2).sum())
    stats = {"shape": tuple(r.shape), "dtype": dtype, "max_abs_err": max_err, "bound": bound,
             "baseline_err": base_err, "atol": a, "rel_norm": float(num / den) if den > 0 else float(num),
             "nan": int(nan.sum()), "inf_mismatch": int(inf_bad.sum())}
    if equal_nan:
        stats["nan_expected"] = int(rnan.sum())
        stats["nan_mismatch"] = int(nan.sum() + nan_missing.sum())
        if nan.any():
            notes.append(f"{int(nan.sum())} NaN in the candidate where the reference is not NaN")
        if nan_missing.any():
            notes.append(f"{int(nan_missing.sum())} reference NaN not NaN in the candidate")
    bad = nan | inf_bad | nan_missing
    ok = bool(bad.sum() == 0 and max_err <= bound)
    first = []
    if not ok:
        score = err + np.where(bad, np.inf, 0.0)
        flat = np.argsort(score, axis=None)[::-1][:max_report]
        for f in flat:
            idx = np.unravel_index(f, r.shape)
            if score[idx] <= bound and not bad[idx]:
                break
            first.append({"index": tuple(int(i) for i in idx), "ref": float(r[idx]),
                          "candidate": float(c[idx]), "abs_err": float(score[idx])})
    return Report(ok, "array", name, stats, first, notes)


def compare_attention(q: Any, k: Any, v: Any, candidate_out: Any, *, mask: Any = None,
                      causal: bool = False, softmax_scale: float | None = None,
                      dtype: str | None = None, candidate_lse: Any = None, lse_base: str = "e",
                      layout: str = "bhsd") -> Report:
    """Check an attention output (and optionally its LSE) computed by another implementation
    on these q/k/v (in ``layout``). ``dtype``: the precision the candidate computed in
    (default: q's dtype)."""
    from .api import attention_mask_of
    from .core.layout import default_scale, from_bhsd, normalize_qkv
    from .reference.attention import attention_forward
    from .testing import emulate_lowp_attention

    q4, k4, v4, shape = normalize_qkv(q, k, v, layout=layout)
    scale = default_scale(shape.head_dim, softmax_scale)
    dt = dtype or str(q4.dtype)
    m = attention_mask_of(mask)
    ref_o, ref_l = attention_forward(q4, k4, v4, m, causal, scale)
    base_o, base_l = emulate_lowp_attention(q4, k4, v4, m, causal, scale, dt)
    parts = [compare_arrays(from_bhsd(ref_o, layout), candidate_out, dt,
                            base=from_bhsd(base_o, layout), name="out")]
    if candidate_lse is not None:
        rl = ref_l[0] if layout == "hsd" else ref_l
        bl = base_l[0] if layout == "hsd" else base_l
        parts.append(compare_arrays(rl, candidate_lse, "float32" if dt != "float64" else dt,
                                    base=bl, lse_base=lse_base, name="lse"))
    ok = all(p.ok for p in parts)
    return Report(ok, "attention", "attention", {"dtype": dt, "causal": bool(causal)}, parts=parts)
