"""Text output of the ``refattn`` command line: plain tables, shapes, JSON and the
evaluation table."""
from __future__ import annotations

import json
from typing import Any

import click
import numpy as np


def _fmt_table(header: list[str], rows: list[list[str]]) -> str:
    """``rows`` under ``header`` as a left-aligned plain-text table with a rule line."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _shape(a: np.ndarray) -> str:
    """``a``'s shape as ``[d0, d1, ...]``."""
    return "[" + ", ".join(str(n) for n in a.shape) + "]"


def _echo_json(obj: Any) -> None:
    """Echo ``obj`` as indented JSON (NumPy scalars as Python numbers, the rest as str)."""
    click.echo(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _print_rows(rows: list[dict[str, Any]], skipped: list[dict[str, str]], *,
                by_head: bool = False) -> None:
    """Echo evaluation ``rows`` as a table (``by_head``: recall per head instead of the
    head column), then one line per skipped method."""
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
