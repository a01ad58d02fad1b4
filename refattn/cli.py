"""The ``refattn`` command line: inspect, attend, check, select, evaluate, demo.

Exit status: 0 success (``check``: match), 1 ``check`` mismatch, 2 bad input (a clear
one-line error on stderr; no output file is written: files are written atomically).
Array files are ``.npz`` / ``.safetensors`` (see :mod:`refattn.io`); ``@sample`` names the
real sample shipped with refattn. ``--layout`` defaults to the layout the file states
(``meta_layout``), else ``bhsd``.
"""
from __future__ import annotations

import json
import sys
import textwrap
import warnings
from typing import Any, Callable, Iterable

import click
import numpy as np

from . import __version__
from .api import attention, select
from .core.blockmask import BlockMask
from .core.errors import InputError
from .core.layout import LAYOUTS, default_scale, normalize_qkv
from .evaluation import evaluate_methods
from .io import (
    MASK_GEOMETRY,
    SEQ_ARRAYS,
    from_raw,
    has_mask,
    load,
    load_mask,
    load_selection,
    read_raw,
    save,
    save_selection,
)

SAMPLE_ALIAS = "@sample"


class BadInput(click.ClickException):
    """Bad input: message on stderr, exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"refattn: error: {self.format_message()}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as e:
            raise BadInput(str(e)) from None


# ------------------------------------------------------------------------------ helpers
def _path(path: str) -> str:
    if path == SAMPLE_ALIAS:
        from .data import sample_path

        return sample_path()
    return path


def _warn(fn: Callable[[], Any]) -> Any:
    """Run ``fn``, echoing its warnings as one line each on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    for w in caught:
        click.echo(f"refattn: warning: {w.message}", err=True)
    return result


def _load(path: str, layout: str | None, require: Iterable[str] = ()) -> dict[str, Any]:
    """:func:`refattn.io.load` (``@sample`` resolved), warnings echoed on stderr."""
    return _warn(lambda: load(_path(path), layout=layout, require=tuple(require)))


def _mask_file(path: str) -> BlockMask:
    """The block mask saved in ``path``. A selection whose attention is token-level (a
    token mask, or blocks in permuted token order) cannot be rebuilt from the file alone:
    refused, rather than running its block mask in the wrong token order."""
    d = _load(path, None)
    extras = d["meta"].get("extras") or {}
    permuted = [k for k in d if k.startswith("extra_") and "perm" in k]
    if "token_mask" in extras or "attention" in extras or permuted:
        what = ("a token-level mask" if "token_mask" in extras else
                f"its own attention ({extras['attention']})" if "attention" in extras else
                f"a permutation ({permuted[0]})")
        raise InputError(f"--mask {path}: the selection ({d['meta'].get('method', '?')}) runs "
                         f"attention through {what}, which a saved block mask does not carry; "
                         "use `refattn eval` or refattn.attention(q, k, v, mask=selection) in Python")
    return load_mask(d)


def _default_causal(method: str) -> bool:
    """Causal by default, except for video (DiT) methods, which attend bidirectionally."""
    from .methods import get_method

    return get_method(method).kind != "video"


def _check_out_path(out: str) -> None:
    if not out.lower().endswith((".npz", ".safetensors")):
        raise InputError(f"-o/--output: expected a path ending in .npz or .safetensors, got {out!r}")


def _resolve(flag: Any, meta: dict[str, Any], key: str, default: Any) -> tuple[Any, str]:
    """The option value if given, else the file's metadata, else ``default``; and whence."""
    if flag is not None:
        return flag, "given"
    if meta.get(key) is not None:
        return meta[key], "from the file"
    return default, "default"


def _parse_value(text: str) -> Any:
    """JSON when possible (ints, floats, lists -> tuples, true/false/null), else the string."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError:
        return text
    return tuple(v) if isinstance(v, list) else v


def _parse_params(items: Iterable[str], option: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{option}: expected NAME=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(val.strip())
    return out


def _fmt_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _shape(a: np.ndarray) -> str:
    return "[" + ", ".join(str(n) for n in a.shape) + "]"


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _grid(text: str | None) -> tuple[int, int, int] | None:
    """``--grid T,H,W`` as a tuple of three positive ints."""
    if text is None:
        return None
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        vals = tuple(int(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise InputError(f"--grid: expected T,H,W (three positive integers), got {text!r}")
    return vals  # type: ignore[return-value]


def _video_params(method: str, params: dict[str, Any], grid: str | None,
                  text: int | None) -> dict[str, Any]:
    """Add ``--grid``/``--text`` to a method's parameters (as ``grid``, ``text_tokens``) when
    the method takes them; an explicit ``--param grid=...`` wins."""
    g = _grid(grid)
    if g is None and text is None:
        return params
    from .methods import get_method

    names = set(get_method(method).defaults())
    out = dict(params)
    for key, val, opt in (("grid", g, "--grid"), ("text_tokens", text, "--text")):
        if val is None or key in out:
            continue
        if key not in names:
            raise InputError(f"{opt}: method {method!r} takes no {key!r} parameter")
        out[key] = val
    return out


video_opts = [
    click.option("--grid", default=None, help="Video token grid T,H,W (video methods)."),
    click.option("--text", "text", type=int, default=None,
                 help="Number of text tokens beside the video tokens (video methods)."),
]


def _add_options(opts: list[Any]) -> Callable[[Any], Any]:
    def deco(fn: Any) -> Any:
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return deco


layout_opt = click.option("--layout", type=click.Choice(LAYOUTS), default=None,
                          help="Layout of q/k/v in the file (default: the file's meta_layout, "
                               "else bhsd).")


# ---------------------------------------------------------------------------------- cli
@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="refattn")
def cli() -> None:
    """refattn: the reference for block-sparse attention (NumPy float64 oracle)."""


@cli.command()
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


@cli.command()
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


@cli.command()
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


@cli.command("methods")
@click.option("--kind", default=None, help="Only methods of this kind (e.g. llm-prefill).")
@click.option("--json", "as_json", is_flag=True)
def methods_cmd(kind: str | None, as_json: bool) -> None:
    """Registered methods: kind, parameters with defaults, official code."""
    from .api import methods

    found = methods(kind)
    if as_json:
        _echo_json(found)
        return
    rows = []
    for n, m in found.items():
        code = m["code"] if "@" not in m["code"] else m["code"][: m["code"].index("@") + 13]
        params = ", ".join(f"{k}={v!r}" for k, v in m["params"].items())
        for i, part in enumerate(textwrap.wrap(params, 56) or [""]):
            rows.append([n, m["kind"], part, code] if i == 0 else ["", "", part, ""])
    click.echo(_fmt_table(["method", "kind", "parameters (defaults)", "official code"], rows))


@cli.command("select")
@click.argument("method")
@click.argument("file")
@click.option("--param", "-p", "params", multiple=True, help="NAME=VALUE (JSON or string).")
@layout_opt
@click.option("--causal/--no-causal", default=None,
              help="Default: the file's meta_causal, else causal.")
@click.option("--backend", type=click.Choice(["numpy", "numba", "cupy", "auto"]), default="numpy",
              show_default=True)
@click.option("-o", "--output", required=True, help="Output file (.npz or .safetensors).")
@_add_options(video_opts)
def select_cmd(method: str, file: str, params: tuple[str, ...], layout: str | None,
               causal: bool | None, backend: str, output: str, grid: str | None,
               text: int | None) -> None:
    """Run METHOD's selection on FILE; save mask, geometry, scores, boundary and extras."""
    _check_out_path(output)
    p = _video_params(method, _parse_params(params, "--param"), grid, text)
    d = _load(file, layout, ("q", "k"))
    causal_v, _ = _resolve(causal, d["meta"], "causal", _default_causal(method))
    sel = _warn(lambda: select(d["q"], d["k"], method, v=d.get("v"), causal=bool(causal_v),
                               backend=backend, **p))
    save_selection(output, sel, {"source": file, "causal": bool(causal_v)})
    click.echo(f"wrote {output}: {method} {sel.mask!r}, density "
               f"{sel.mask.density(causal=bool(causal_v)):.4f}")


# ------------------------------------------------------------------------- evaluation
def _print_rows(rows: list[dict[str, Any]], skipped: list[dict[str, str]], *,
                by_head: bool = False) -> None:
    table = [[r["method"], str(r["head"]), f"{r['density']:.4f}", f"{r['recall']:.4f}",
              f"{r['output_error']:.4f}", f"{100 * r['flops_saved']:.1f}%"] for r in rows]
    header = ["mask", "head", "density", "recall", "rel.err", "FLOPs saved"]
    if by_head:
        header, table = header[:1] + header[2:], [t[:1] + t[2:] for t in table]
        header.append("recall by head")
        for t, r in zip(table, rows, strict=True):
            t.append(" ".join(f"{x:.3f}" for x in r.get("recall_by_head", [])))
    click.echo(_fmt_table(header, table))
    for s in skipped:
        click.echo(f"skipped {s['method']}: {s['reason']}")


def _inputs(d: dict[str, Any], causal: bool | None, default_causal: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, float]:
    q, k, v, shape = normalize_qkv(d["q"], d["k"], d["v"])
    causal_v, _ = _resolve(causal, d["meta"], "causal", default_causal)
    scale = default_scale(shape.head_dim, d["meta"].get("softmax_scale"))
    return q, k, v, bool(causal_v), scale


@cli.command("eval")
@click.argument("file")
@click.option("--methods", "names", default="all", show_default=True,
              help="Comma-separated method names, or 'all' (every llm-prefill method).")
@click.option("--param", "-p", "params", multiple=True, help="METHOD.NAME=VALUE.")
@click.option("--causal/--no-causal", default=None,
              help="Default: the file's meta_causal, else causal.")
@click.option("--per-head/--no-per-head", default=False, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random baseline.")
@layout_opt
@click.option("--kind", default="llm-prefill", show_default=True,
              help="The kind of methods that --methods all means (llm-prefill, video, ...).")
@_add_options(video_opts)
def eval_cmd(file: str, names: str, params: tuple[str, ...], causal: bool | None,
             per_head: bool, as_json: bool, seed: int, layout: str | None, kind: str,
             grid: str | None, text: int | None) -> None:
    """Density, recall, output error and FLOPs saved of methods' masks on FILE, each with a
    random and a causal-window baseline of the same per-row budget."""
    from .methods import get_method, list_methods

    everything = names.strip() == "all"
    wanted = list(list_methods(kind)) if everything else \
        [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise InputError(f"--methods: no method named in {names!r}")
    per: dict[str, dict[str, Any]] = {}
    for key, val in _parse_params(params, "--param").items():
        mname, dot, pname = key.partition(".")
        if not dot or not pname:
            raise InputError(f"--param: expected METHOD.NAME=VALUE, got {key!r}")
        if mname not in wanted:
            raise InputError(f"--param: {key!r} names method {mname!r}, which is not evaluated "
                             f"(evaluating {wanted})")
        per.setdefault(mname, {})[pname] = val
    for n in wanted:
        if grid is not None or text is not None:
            names_n = set(get_method(n).defaults())
            if everything and not ({"grid", "text_tokens"} & names_n):
                continue
            per[n] = _video_params(n, per.get(n, {}), grid, text)
        get_method(n).make_params(**per.get(n, {}))  # unknown method/parameter: exit 2 now
    default_causal = not all(get_method(n).kind == "video" for n in wanted)
    q, k, v, causal_v, scale = _inputs(_load(file, layout, ("q", "k", "v")), causal, default_causal)
    rows, skipped = evaluate_methods(q, k, v, wanted, per, causal_v, scale, per_head=per_head,
                                      seed=seed, progress=not as_json,
                                      catch=(InputError,) if not everything else (Exception,),
                                      wrap=_warn)
    if as_json:
        _echo_json({"file": file, "causal": causal_v, "softmax_scale": scale,
                    "results": rows, "skipped": skipped})
    else:
        click.echo(f"{file}: q {_shape(q)}, k {_shape(k)}, causal={causal_v}, scale={scale:.6g}")
        _print_rows(rows, skipped)


def _add_subcommands() -> None:
    import sys

    from .cli_demo import add_demo_command
    from .cli_importance import add_importance_command
    from .cli_kv import add_kv_command

    here = sys.modules[__name__]
    add_demo_command(cli, here)
    add_kv_command(cli, here)
    add_importance_command(cli, here)


_add_subcommands()


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``refattn``)."""
    cli.main(args=argv, prog_name="refattn")


if __name__ == "__main__":  # pragma: no cover
    main()
