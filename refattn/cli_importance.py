"""``refattn importance``: attention-derived token importance (BlockRank, FOCUS, VFlowOpt,
RSQ) on saved arrays; writes scores, kept indices and recycled features.

Arrays each method reads from FILE (``.npz`` / ``.safetensors``):

* ``blockrank``: ``q``, ``k`` (``--layout``); ``--param segments=[...]`` required.
* ``rsq``: ``q``, ``k`` (``--layout``), AttnCon weights.
* ``focus``: ``q0``, ``k0``, ``q1``, ``k1`` ``[H, L, D]`` (layer 0 / 1 of the scored tokens)
  and ``positions [L]`` (or ``--param positions=[...]``); ``avg_dec``, ``progress`` params.
* ``vflowopt``: ``attn`` (or ``attn_probs``) ``[B, H, n, n]``; optional ``entropy`` or
  ``pixel_values`` (``[B, 3, S, S]``, normalised) for ``alpha_v != 0``; optional
  ``features`` (or ``hidden_states``) ``[B, n, C]`` to recycle.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import click
import numpy as np

from .core.errors import InputError

METHODS = ("blockrank", "focus", "rsq", "vflowopt")


def _make(cls: type, params: dict[str, Any], method: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise InputError(f"--param: method {method!r} has no parameter(s) {unknown}; "
                         f"known: {sorted(known)}")
    p = cls(**params)
    p.validate()
    return p


def _need(arrays: dict[str, np.ndarray], *names: str) -> np.ndarray:
    for n in names:
        if n in arrays:
            return arrays[n]
    raise InputError(f"FILE: lacks the array {' or '.join(repr(n) for n in names)}")


def _padded(rows: list[np.ndarray], fill: float = -1) -> np.ndarray:
    width = max((r.shape[0] for r in rows), default=0)
    out = np.full((len(rows), width) + rows[0].shape[1:], fill,
                  np.int64 if fill == -1 else np.float64)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def run_importance(method: str, file: str, params: dict[str, Any], layout: str | None,
                   helpers: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run ``method`` on ``file``: (arrays to write, JSON summary)."""
    from .io import read_raw

    if method not in METHODS:
        raise InputError(f"METHOD: expected one of {METHODS}, got {method!r}")
    if method in ("blockrank", "rsq"):
        from .api import select

        d = helpers._load(file, layout, ("q", "k"))
        sel = select(d["q"], d["k"], method, **params)
        ex = sel.extras
        if method == "blockrank":
            arrays = {k: np.asarray(ex[k]) for k in ("score", "logits", "ranking", "position_ids")}
            return arrays, {"method": method, "ranking": ex["ranking"].tolist(),
                            "score": ex["score"].tolist()}
        keep = ex["keepset"]
        arrays = {"weights": ex["weights"], "kept": keep.indices[:, 0]}
        return arrays, {"method": method, "weights": ex["weights"].tolist(),
                        "kept": [keep.kept(b, 0).tolist() for b in range(keep.shape[0])]}
    arrays_in = helpers._warn(lambda: read_raw(helpers._path(file)))[0]
    if method == "focus":
        from .importance.focus import FocusParams, focus_step

        run = {k: params.pop(k) for k in ("avg_dec", "progress", "positions") if k in params}
        p = _make(FocusParams, params, method)
        pos = np.asarray(run.get("positions", arrays_in.get("positions")))
        if pos.ndim != 1:
            raise InputError("positions: give the block-local positions of the scored tokens "
                             "(array 'positions' in FILE or --param positions=[...])")
        r = focus_step(*(_need(arrays_in, n) for n in ("q0", "k0", "q1", "k1")), pos,
                       avg_dec=float(run.get("avg_dec", 1.0)),
                       progress=int(run.get("progress", -1)), params=p)
        arrays = {k: np.asarray(r[k]) for k in ("I0", "I1", "delta", "keep", "kept_positions")}
        return arrays, {"method": method, "K": r["K"], "evict": r["evict"],
                        "used_threshold": r["used_threshold"],
                        "kept_positions": r["kept_positions"].tolist()}
    from .importance.vflowopt import VFlowOptParams, patch_entropy
    from .importance.vflowopt import run as vrun

    p = _make(VFlowOptParams, params, method)
    attn = _need(arrays_in, "attn", "attn_probs")
    ent = arrays_in.get("entropy")
    if ent is None and "pixel_values" in arrays_in:
        ent = patch_entropy(arrays_in["pixel_values"])
    if attn.ndim != 4:
        raise InputError(f"attn: expected [B, H, n, n], got shape {attn.shape}")
    feats = arrays_in.get("features", arrays_in.get("hidden_states"))
    if feats is None:
        feats = np.zeros(attn.shape[:1] + attn.shape[2:3] + (0,))
    r = vrun(attn, feats, ent, p)
    imgs = r["images"]
    arrays = {"score": r["score"], "kept": _padded([im["kept"] for im in imgs]),
              "features": _padded([im["features"] for im in imgs], fill=0.0),
              "representatives": _padded([im["representatives"] for im in imgs]),
              "llm_kept": _padded([st[-1] for st in r["llm_stages"]]) if p.llm_r else
              np.zeros((attn.shape[0], 0), np.int64)}
    return arrays, {"method": method, "kept": [im["kept"].tolist() for im in imgs],
                    "recycled_groups": [len(im["groups"]) for im in imgs],
                    "llm_stage_sizes": [[int(s.size) for s in st] for st in r["llm_stages"]]}


def add_importance_command(group: click.Group, helpers: Any) -> None:
    """Register ``importance`` on the ``refattn`` group (``helpers``: the cli module, for
    its loading, parameter parsing and JSON helpers)."""

    @group.command("importance")
    @click.argument("method")
    @click.argument("file")
    @click.option("--param", "-p", "params", multiple=True, help="NAME=VALUE (JSON or string).")
    @helpers.layout_opt
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @click.option("-o", "--output", default=None,
                  help="Write scores, kept indices and recycled features (.npz/.safetensors).")
    def importance(method: str, file: str, params: tuple[str, ...], layout: str | None,
                   as_json: bool, output: str | None) -> None:
        """Token importance of METHOD (blockrank, focus, rsq, vflowopt) on FILE's arrays."""
        from .io import save

        if output is not None:
            helpers._check_out_path(output)
        p = helpers._parse_params(params, "--param")
        arrays, summary = run_importance(method, file, dict(p), layout, helpers)
        if output is not None:
            save(output, arrays, {"method": method, "params": json.dumps(p, default=str)})
        if as_json:
            helpers._echo_json(summary)
            return
        for key, val in summary.items():
            if key != "method":
                click.echo(f"{key}: {val}")
        if output is not None:
            click.echo(f"wrote {output}")
