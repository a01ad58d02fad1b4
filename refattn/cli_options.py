"""Shared options of the ``refattn`` command line and the parsing of their values:
``--layout``, ``--grid``/``--text``, ``--param NAME=VALUE``, and settings that fall back to
the file's metadata."""
from __future__ import annotations

import json
from typing import Any, Callable, Iterable

import click
import numpy as np

from .core.errors import InputError
from .core.layout import LAYOUTS, default_scale, normalize_qkv


def _default_causal(method: str) -> bool:
    """Causal by default, except for video (DiT) methods, which attend bidirectionally."""
    from .methods import get_method

    return get_method(method).kind != "video"


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
    """``NAME=VALUE`` items of ``option`` as a dict (values parsed by :func:`_parse_value`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{option}: expected NAME=VALUE, got {item!r}")
        out[key.strip()] = _parse_value(val.strip())
    return out


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


def _inputs(d: dict[str, Any], causal: bool | None, default_causal: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool, float]:
    """Loaded ``d``'s q/k/v in bhsd, with its causal flag and softmax scale resolved."""
    q, k, v, shape = normalize_qkv(d["q"], d["k"], d["v"])
    causal_v, _ = _resolve(causal, d["meta"], "causal", default_causal)
    scale = default_scale(shape.head_dim, d["meta"].get("softmax_scale"))
    return q, k, v, bool(causal_v), scale


video_opts = [
    click.option("--grid", default=None, help="Video token grid T,H,W (video methods)."),
    click.option("--text", "text", type=int, default=None,
                 help="Number of text tokens beside the video tokens (video methods)."),
]


def _add_options(opts: list[Any]) -> Callable[[Any], Any]:
    """A decorator applying the click options ``opts`` in the order listed."""
    def deco(fn: Any) -> Any:
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return deco


layout_opt = click.option("--layout", type=click.Choice(LAYOUTS), default=None,
                          help="Layout of q/k/v in the file (default: the file's meta_layout, "
                               "else bhsd).")
