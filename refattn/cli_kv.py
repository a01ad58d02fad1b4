"""``refattn kv``: KV-cache token selection and the decode simulator from the command line."""
from __future__ import annotations

import json
from typing import Any

import click
import numpy as np


def add_kv_command(group: click.Group, helpers: Any) -> None:
    """Register ``kv`` on the ``refattn`` group (``helpers``: the cli module, for its
    loading, parameter parsing and table helpers)."""

    @group.command("kv")
    @click.argument("method")
    @click.argument("file")
    @click.option("--budget", required=True,
                  help="Tokens kept per head after the prompt: a count (256) or a ratio (0.2).")
    @click.option("--decode", "decode_path", default=None,
                  help="File with decode-step q/k/v ([B,H,T,D] each, same layout as FILE).")
    @click.option("--decode-last", "decode_last", type=int, default=None,
                  help="Use FILE's last N tokens as the decode steps (the rest is the prompt): "
                       "runs the simulator on a single capture such as @sample.")
    @click.option("--param", "-p", "params", multiple=True, help="NAME=VALUE (JSON or string).")
    @helpers.layout_opt
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @click.option("-o", "--output", default=None, help="Write kept indices (.npz/.safetensors).")
    def kv(method: str, file: str, budget: str, decode_path: str | None, decode_last: int | None,
           params: tuple[str, ...], layout: str | None, as_json: bool, output: str | None) -> None:
        """Run KV-cache METHOD on FILE's prompt (and DECODE's steps): kept tokens and, per
        decode step, output error against the full cache, kept count and attention recall."""
        from .core.errors import InputError
        from .io import save
        from .kvcache.simulate import parse_budget, run_kv

        if output is not None:
            helpers._check_out_path(output)
        p = helpers._parse_params(params, "--param")
        d = helpers._load(file, layout, ("q", "k", "v"))
        dec = None
        if decode_last is not None:
            if decode_path is not None:
                raise InputError("--decode-last: give either --decode or --decode-last, not both")
            S = d["q"].shape[2]
            if not 1 <= decode_last < S or d["k"].shape[2] != S:
                raise InputError(f"--decode-last: expected 1 <= N < {S} (a prefill with Sq == Sk), "
                                 f"got {decode_last}")
            cut = S - decode_last
            dec = {x: d[x][:, :, cut:] for x in ("q", "k", "v")}
            d = {**d, **{x: d[x][:, :, :cut] for x in ("q", "k", "v")}}
        if decode_path is not None:
            dd = helpers._load(decode_path, layout if layout else d.get("layout"), ("q", "k", "v"))
            dec = {"q": dd["q"], "k": dd["k"], "v": dd["v"]}
        res = helpers._warn(lambda: run_kv(method, d["q"], d["k"], d["v"], budget=parse_budget(budget),
                                           decode=dec, **p))
        if output is not None:
            kept = res["kept"]
            width = max((len(r) for b in kept for r in b), default=0)
            arr = np.full((len(kept), len(kept[0]) if kept else 0, width), -1, np.int64)
            for b, heads in enumerate(kept):
                for h, row in enumerate(heads):
                    arr[b, h, :len(row)] = row
            save(output, {"kept": arr}, {"method": method, "head_kind": res.get("head_kind"),
                                          "params": json.dumps(res.get("params"), default=str)})
        if as_json:
            helpers._echo_json(res)
            return
        kept = res["kept"]
        counts = [len(r) for b in kept for r in b]
        click.echo(f"{method}: kept {min(counts)}-{max(counts)} tokens per "
                   f"{res.get('head_kind', 'head')} head after the prompt")
        if res["rows"]:
            cols = res["columns"]
            rows = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
                    for r in res["rows"]]
            click.echo(helpers._fmt_table(list(cols), rows))
        if output is not None:
            click.echo(f"wrote {output}")
