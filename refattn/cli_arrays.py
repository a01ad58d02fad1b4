"""``refattn info``, ``attend`` and ``check``: commands on saved array files (q/k/v,
out/lse, block masks)."""
from __future__ import annotations

import json
import sys
from typing import Any

import click
import numpy as np

from . import __version__
from .api import attention
from .cli_format import _echo_json, _fmt_table, _shape
from .cli_io import _check_out_path, _load, _mask_file, _path, _warn
from .cli_options import _resolve, layout_opt
from .core.blockmask import BlockMask
from .core.errors import InputError
from .core.layout import LAYOUTS, default_scale
from .io import (
    MASK_GEOMETRY,
    SEQ_ARRAYS,
    from_raw,
    has_mask,
    load_mask,
    load_selection,
    read_raw,
    save,
)


@click.command()
@click.argument("file")
@layout_opt
def info(file: str, layout: str | None) -> None:
    """Shapes, dtypes, layout, NaN/Inf and GQA ratio of an array file."""
    d = _load(file, layout)
    meta = d["meta"]
    stated = meta.get("layout")
    if layout is not None:
        how = "given with --layout"
    elif stated is not None:
        how = f"stated by the file (meta layout = {stated!r})"
    else:
        how = "default; the file states no layout, pass --layout if this is wrong"
        if any(n in d for n in SEQ_ARRAYS):
            click.echo("refattn: warning: layout not stated by the file; assuming bhsd", err=True)
    click.echo(f"file:   {_path(file)}")
    click.echo(f"layout: {d['layout']} ({how}); q/k/v/out/lse shown in bhsd")
    rows = []
    for name, a in d.items():
        if not isinstance(a, np.ndarray):
            continue
        finite = "-"
        if a.dtype.kind == "f" or str(a.dtype) == "bfloat16":
            af = a.astype(np.float32) if a.dtype.kind != "f" else a
            nan, inf = int(np.isnan(af).sum()), int(np.isinf(af).sum())
            finite = "ok" if nan == inf == 0 else f"{nan} NaN, {inf} Inf"
        rows.append([name, str(a.dtype), _shape(a), finite])
    click.echo(_fmt_table(["array", "dtype", "shape", "finite"], rows))
    if all(n in d for n in ("q", "k")):
        (B, Hq, Sq, D), (_, Hkv, Sk, Dk) = d["q"].shape, d["k"].shape
        ratio = (f"{Hq // Hkv} (query head h reads kv head h // {Hq // Hkv})" if Hkv and
                 Hq % Hkv == 0 else f"INVALID: Hq={Hq} is not a multiple of Hkv={Hkv}")
        click.echo(f"attention: B={B} Hq={Hq} Hkv={Hkv} Sq={Sq} Sk={Sk} D={D}; GQA group {ratio}")
        if Dk != D:
            click.echo(f"  note: k head dim {Dk} differs from q's {D}")
    if has_mask(d):
        try:
            m = load_mask(d)
            click.echo(f"mask: {m!r}; density {m.density():.4f}")
        except InputError as e:
            click.echo(f"mask: unreadable ({e})")
    for key, val in meta.items():
        text = json.dumps(val) if not isinstance(val, str) else val
        click.echo(f"meta {key}: {text if len(text) <= 100 else text[:97] + '...'}")


@click.command()
@click.argument("file")
@click.option("--mask", "mask_path", default=None, help="Block mask file (.npz/.safetensors).")
@click.option("--causal/--no-causal", default=None,
              help="Bottom-right causal masking (default: the file's meta_causal, else off).")
@layout_opt
@click.option("--scale", type=float, default=None,
              help="Softmax scale (default: the file's meta_softmax_scale, else 1/sqrt(D)).")
@click.option("--backend", type=click.Choice(["numpy", "numba", "cupy", "auto"]), default="numpy",
              show_default=True)
@click.option("-o", "--output", required=True, help="Output file (.npz or .safetensors).")
def attend(file: str, mask_path: str | None, causal: bool | None, layout: str | None,
           scale: float | None, backend: str, output: str) -> None:
    """Attention of FILE's q/k/v (dense, or block-sparse with --mask); writes out and lse
    (bhsd: out [B,Hq,Sq,Dv], lse [B,Hq,Sq] natural log)."""
    _check_out_path(output)
    d = _load(file, layout, ("q", "k", "v"))
    causal_v, _ = _resolve(causal, d["meta"], "causal", False)
    scale_v, _ = _resolve(scale, d["meta"], "softmax_scale", None)
    mask = _mask_file(mask_path) if mask_path else None
    out, lse = attention(d["q"], d["k"], d["v"], mask=mask, causal=bool(causal_v),
                         softmax_scale=scale_v, return_lse=True, backend=backend)
    used_scale = default_scale(d["q"].shape[-1], scale_v)
    save(output, {"out": out, "lse": lse},
         {"layout": "bhsd", "causal": bool(causal_v), "softmax_scale": used_scale,
          "backend": backend, "source": file, "mask": mask_path or "", "refattn": __version__})
    click.echo(f"wrote {output}: out {_shape(out)} {out.dtype}, lse {_shape(lse)} "
               f"(causal={bool(causal_v)}, scale={used_scale:.6g}, backend={backend})")


@click.command()
@click.argument("ref")
@click.argument("candidate")
@click.option("--json", "as_json", is_flag=True, help="Print the reports as JSON.")
@click.option("--tol", type=float, default=1e-6, show_default=True,
              help="Mask near-tie tolerance relative to the selection boundary.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32", "float64"]),
              default=None, help="Precision the candidate computed in (default: q's dtype).")
@click.option("--mask", "mask_path", default=None,
              help="Block mask the candidate's out used (default: REF's mask, if any).")
@click.option("--causal/--no-causal", default=None,
              help="Causal (default: REF's, then CANDIDATE's meta_causal, else off).")
@click.option("--scale", type=float, default=None, help="Softmax scale (default as attend).")
@click.option("--lse-base", type=click.Choice(["e", "2"]), default="e", show_default=True,
              help="Base of CANDIDATE's lse (2: converted to natural log first).")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None,
              help="Layout of REF (default: its meta_layout, else bhsd).")
@click.option("--candidate-layout", type=click.Choice(LAYOUTS), default=None,
              help="Layout of CANDIDATE (default: its meta_layout, else REF's layout).")
def check(ref: str, candidate: str, as_json: bool, tol: float, dtype: str | None,
          mask_path: str | None, causal: bool | None, scale: float | None, lse_base: str,
          layout: str | None, candidate_layout: str | None) -> None:
    """Compare CANDIDATE (a mask, and/or out [+ lse]) with the reference from REF.

    Masks are compared tie-aware (REF's scores and boundary, when saved, excuse near-ties);
    out/lse are checked against the reference attention of REF's q/k/v with the tolerance
    rule. Exit 0 on match, 1 on mismatch, 2 on bad input."""
    from .check import compare_attention, compare_masks

    r = _load(ref, layout)
    arrays, cmeta = read_raw(_path(candidate))
    if candidate_layout is None and "layout" not in cmeta:
        candidate_layout = r["layout"]  # a bare candidate is read in REF's layout
    c = _warn(lambda: from_raw(arrays, cmeta, candidate_layout, require=(), where=candidate))
    reports = []
    if has_mask(c):
        if not has_mask(r):
            raise InputError(f"{ref}: holds no block mask to compare CANDIDATE's mask with")
        ref_sel = load_selection(r) if "scores" in r and "boundary" in r else load_mask(r)
        ref_mask = ref_sel if isinstance(ref_sel, BlockMask) else ref_sel.mask
        geo = dict(zip(MASK_GEOMETRY, ref_mask.geometry(), strict=True))
        reports.append(compare_masks(ref_sel, load_mask(c, geometry=geo), tol))
    settings: dict[str, Any] = {}
    if "out" in c:
        missing = [n for n in ("q", "k", "v") if n not in r]
        if missing:
            raise InputError(f"{ref}: CANDIDATE holds 'out' but REF lacks {missing} to compute "
                             "the reference attention from")
        meta = {**c["meta"], **r["meta"]}  # REF's statements win
        causal_v, how_c = _resolve(causal, meta, "causal", False)
        scale_v, how_s = _resolve(scale, r["meta"], "softmax_scale", None)
        mask = _mask_file(mask_path) if mask_path else (
            load_mask(r) if has_mask(r) else None)
        settings = {"causal": bool(causal_v), "causal_from": how_c,
                    "softmax_scale": default_scale(r["q"].shape[-1], scale_v),
                    "scale_from": how_s, "mask": mask_path or ("REF's" if mask else None)}
        reports.append(compare_attention(r["q"], r["k"], r["v"], c["out"], mask=mask,
                                         causal=bool(causal_v), softmax_scale=scale_v,
                                         dtype=dtype, candidate_lse=c.get("lse"),
                                         lse_base=lse_base))
    if not reports:
        raise InputError(f"{candidate}: holds neither 'out' nor a block mask ('mask' or "
                         "'kv_num_blocks' + 'kv_indices'); nothing to compare")
    ok = all(rep.ok for rep in reports)
    if as_json:
        _echo_json({"ok": ok, "settings": settings, "reports": [rep.to_dict() for rep in reports]})
    else:
        if settings:
            click.echo("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        for rep in reports:
            click.echo(rep.summary())
        click.echo("OK" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)
