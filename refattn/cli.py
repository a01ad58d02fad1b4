"""The ``refattn`` command line: inspect, attend, check, select, evaluate, demo.

Exit status: 0 success (``check``: match), 1 ``check`` mismatch, 2 bad input (a clear
one-line error on stderr; no output file is written: files are written atomically).
Array files are ``.npz`` / ``.safetensors`` (see :mod:`refattn.io`); ``@sample`` names the
real sample shipped with refattn. ``--layout`` defaults to the layout the file states
(``meta_layout``), else ``bhsd``.

This module holds the click group and the entry point; the commands live in
:mod:`refattn.cli_arrays` (info, attend, check), :mod:`refattn.cli_methods` (methods,
select, eval), :mod:`refattn.cli_demo`, :mod:`refattn.cli_kv` and
:mod:`refattn.cli_importance`; their shared helpers in :mod:`refattn.cli_io`,
:mod:`refattn.cli_options` and :mod:`refattn.cli_format`.
"""
from __future__ import annotations

from typing import Any

import click

from . import __version__
from .cli_arrays import attend, check, info
from .cli_format import _echo_json, _fmt_table, _print_rows, _shape
from .cli_io import SAMPLE_ALIAS, _check_out_path, _load, _mask_file, _path, _warn
from .cli_methods import eval_cmd, methods_cmd, select_cmd
from .cli_options import (
    _add_options,
    _default_causal,
    _grid,
    _inputs,
    _parse_params,
    _parse_value,
    _resolve,
    _video_params,
    layout_opt,
    video_opts,
)
from .core.errors import InputError

# The helpers stay importable from here: the sub-command registrars (cli_demo, cli_kv,
# cli_importance) take this module as their ``helpers``.
__all__ = [
    "BadInput", "SAMPLE_ALIAS", "cli", "main", "layout_opt", "video_opts",
    "_add_options", "_check_out_path", "_default_causal", "_echo_json", "_fmt_table", "_grid",
    "_inputs", "_load", "_mask_file", "_parse_params", "_parse_value", "_path", "_print_rows",
    "_resolve", "_shape", "_video_params", "_warn",
]


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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="refattn")
def cli() -> None:
    """refattn: the reference for block-sparse attention (NumPy float64 oracle)."""


cli.add_command(info)
cli.add_command(attend)
cli.add_command(check)
cli.add_command(methods_cmd)
cli.add_command(select_cmd)
cli.add_command(eval_cmd)


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
