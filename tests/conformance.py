"""Locate the official-code conformance vectors.

Search order: ``$REFATTN_CONFORMANCE``, ``../shared/conformance`` (beside the checkout),
then the small copies in ``tests/data/conformance`` that ship with the repository.
A test asks for the vectors of one method folder and is skipped, with the reason, when
none is found.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
BUNDLED = HERE / "data" / "conformance"


def conformance_roots() -> list[Path]:
    roots = []
    env = os.environ.get("REFATTN_CONFORMANCE")
    if env:
        roots.append(Path(env))
    roots.append(HERE.parent.parent / "shared" / "conformance")
    roots.append(BUNDLED)
    return [r for r in roots if r.is_dir()]


def vector_paths(folder: str) -> list[Path]:
    """All ``.npz`` vectors of ``folder`` from the first root that has the folder; the
    bundled copies are used only when no full set is present."""
    for root in conformance_roots():
        d = root / folder
        if d.is_dir():
            files = sorted(d.glob("*.npz"))
            if files:
                return files
    return []


def vector_params(folder: str) -> list:
    """``pytest.param`` list for parametrizing over a folder's vectors (a single skipped
    param with the reason when there are none)."""
    paths = vector_paths(folder)
    if not paths:
        return [pytest.param(None, marks=pytest.mark.skip(
            reason=f"no conformance vectors for {folder!r}: set REFATTN_CONFORMANCE or "
                   "place shared/conformance beside the checkout"))]
    return [pytest.param(p, id=p.stem) for p in paths]


def load(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
