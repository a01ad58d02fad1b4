"""``refattn demo``: sparse attention on the real sample shipped with refattn, plus a video
example on structured synthetic inputs."""
from __future__ import annotations

from typing import Any

import click
import numpy as np

from . import __version__
from .core.blockmask import BlockMask
from .data.video import synthetic_video
from .evaluation import baseline_masks, evaluate_methods
from .reference.selection import force_local, force_sink

DEMO_BUDGET_S = 40.0  # the demo skips remaining methods after this much time
DEMO_VIDEO_GRID = (6, 16, 16)  # divisible by every video method's official tiles
# Defaults sized for long contexts or D = 128 select everything (or warn) on the 2048-token,
# D = 64 sample, which shows nothing; these overrides are printed with the results.
DEMO_PARAMS: dict[str, dict[str, Any]] = {
    "bsfa": {"topk": 6},                                   # 64 tiles per row by default
    "minference": {"vertical_size": 200, "slash_size": 300},   # 1000 + 6096, for 128k
    "prism": {"high_freq_dim": 32, "low_freq_dim": 48},    # bands 64 / 96 are for D = 128
    "proxyattn": {"min_budget": 1},                        # 2048-token minimum budget
    "quest": {"token_budget": 512},                        # 1024 tokens by default
}


def add_demo_command(group: click.Group, helpers: Any) -> None:
    """Register ``demo`` on the ``refattn`` group (``helpers``: the cli module)."""
    _inputs, _warn, _print_rows, _echo_json, _shape = (
        helpers._inputs, helpers._warn, helpers._print_rows, helpers._echo_json, helpers._shape)

    @group.command()
    @click.option("--json", "as_json", is_flag=True)
    def demo(as_json: bool) -> None:
        """Sparse attention on the real sample shipped with refattn (Qwen2.5-Coder-0.5B, layer
        12): simple masks and every llm-prefill method (at its defaults, except the few
        sized for long contexts, which are printed), against dense."""
        from .data import sample
        from .methods import list_methods

        s = sample()
        meta = s.meta
        q, k, v, causal, scale = _inputs({"q": s.q, "k": s.k, "v": s.v, "meta": meta}, None, True)
        S, bs = q.shape[2], 64
        full = BlockMask.full(1, 1, q_len=S, k_len=k.shape[2], block_q=bs, block_k=bs, causal=causal)
        local = force_local(force_sink(np.zeros(full.shape, bool), 1), S, k.shape[2], bs, bs, width=3)
        sink_local = full.like(local & full.mask)
        extra = {"dense-causal": full, "sink+local(1+3 blocks)": sink_local,
                 "random@sink+local": baseline_masks(sink_local, q.shape[1], 1, causal, seed=0)["random"]}
        names = list(list_methods("llm-prefill"))
        rows, skipped = evaluate_methods(q, k, v, names, DEMO_PARAMS, causal, scale,
                                          per_head=False, seed=0,
                                          baselines=False, budget_s=DEMO_BUDGET_S,
                                          catch=(Exception,), extra=extra, wrap=_warn)
        info_ = {"model": meta.get("model"), "licence": meta.get("model_licence"),
                 "layer": meta.get("layer"), "q_heads_of_model": meta["q_head_index"].tolist(),
                 "text": meta.get("text_source"), "q": list(q.shape), "k": list(k.shape),
                 "causal": causal, "softmax_scale": scale}
        vgrid = DEMO_VIDEO_GRID
        vq, vk, vv = synthetic_video(vgrid, heads=3, head_dim=64, seed=0)
        vnames = list(list_methods("video"))
        vrows, vskipped = evaluate_methods(vq, vk, vv, vnames, {n: {"grid": vgrid} for n in vnames},
                                           False, 0.125, per_head=False, seed=0, baselines=True,
                                           budget_s=DEMO_BUDGET_S, catch=(Exception,), wrap=_warn)
        vrows = [r for r in vrows if not r["method"].startswith("causal-window@")]
        if as_json:
            _echo_json({"sample": info_, "params": DEMO_PARAMS, "results": rows,
                        "skipped": skipped,
                        "video": {"grid": list(vgrid), "results": vrows, "skipped": vskipped}})
            return
        click.echo(f"refattn {__version__} demo: real attention inputs shipped with the package")
        click.echo(f"  model  {info_['model']}, layer {info_['layer']}, query heads "
                   f"{info_['q_heads_of_model']} and their kv head")
        click.echo(f"  licence {info_['licence']}")
        click.echo(f"  text   {info_['text']}")
        click.echo(f"  q {_shape(q)}  k/v {_shape(k)} (bhsd), causal, scale {scale:g}")
        click.echo("  recall = share of the exact softmax mass kept; rel.err = ||O - O_dense|| / "
                   "||O_dense||; random@X = random blocks with X's per-row budget")
        over = "; ".join(f"{m} " + ", ".join(f"{n}={x}" for n, x in p.items())
                         for m, p in DEMO_PARAMS.items())
        click.echo(f"  methods at their defaults, except (sized for long contexts): {over}\n")
        _print_rows(rows, skipped, by_head=True)
        click.echo(f"\nvideo example: synthetic q/k/v on a {vgrid[0]}x{vgrid[1]}x{vgrid[2]} token grid "
                   "(refattn.data.video.synthetic_video: spatial, temporal and 3-D local heads), "
                   "non-causal; every video method at its defaults, random@X = random blocks with "
                   "X's budget\n")
        _print_rows(vrows, vskipped)
