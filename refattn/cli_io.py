"""Array-file helpers of the ``refattn`` command line: ``@sample`` paths, loading with
warnings echoed on stderr, block-mask files and output-path checks."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

import click

from .core.blockmask import BlockMask
from .core.errors import InputError
from .io import load, load_mask

SAMPLE_ALIAS = "@sample"


def _path(path: str) -> str:
    """``path``, with ``@sample`` resolved to the real sample shipped with refattn."""
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


def _check_out_path(out: str) -> None:
    """Refuse an ``-o/--output`` path that is neither ``.npz`` nor ``.safetensors``."""
    if not out.lower().endswith((".npz", ".safetensors")):
        raise InputError(f"-o/--output: expected a path ending in .npz or .safetensors, got {out!r}")
