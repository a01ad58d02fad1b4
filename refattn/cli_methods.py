"""``refattn methods``, ``select`` and ``eval``: commands that list, run and evaluate the
registered sparse-attention methods."""
from __future__ import annotations

import textwrap
from typing import Any

import click

from .api import select
from .cli_format import _echo_json, _fmt_table, _print_rows, _shape
from .cli_io import _check_out_path, _load, _warn
from .cli_options import (
    _add_options,
    _default_causal,
    _inputs,
    _parse_params,
    _resolve,
    _video_params,
    layout_opt,
    video_opts,
)
from .core.errors import InputError
from .evaluation import evaluate_methods
from .io import save_selection


@click.command("methods")
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


@click.command("select")
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


@click.command("eval")
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
