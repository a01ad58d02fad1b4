"""Data for tests and demos: structured synthetic inputs and a real sample.

* :func:`synthetic`: Q/K/V with sinks, local diagonals, stripes and slashes, RoPE applied.
* :func:`sample`: real post-RoPE Q/K/V of Qwen2.5-Coder-0.5B-Instruct (layer 12, query heads
  0, 1, 4 and their kv head 0, 2048 tokens of English text), shipped in the package.
  Provenance and licence: ``SAMPLE_README.md`` beside it (Apache-2.0 model).
"""
from __future__ import annotations

import os
from importlib import resources
from typing import Any, NamedTuple

import numpy as np

from .synthetic import HEAD_PROFILES, head_profile, rope, structure_of, synthetic, unrope

SAMPLE_FILE = "sample_qwen_s2048_L12.npz"


class Sample(NamedTuple):
    """The shipped sample in ``bhsd``: q float32 ``[1, 3, 2048, 64]``, k and v float32
    ``[1, 1, 2048, 64]``; ``meta`` holds the file's ``meta_*`` entries (model, layer,
    ``softmax_scale`` 0.125, ``causal`` True, ``rope_theta``, ...) plus the arrays
    ``token_ids [2048]``, ``q_head_index [3]`` and ``kv_head_index [1]``."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    meta: dict[str, Any]


def sample_path() -> str:
    """Filesystem path of the shipped sample ``.npz`` (layout ``hsd``, see ``meta_layout``)."""
    ref = resources.files(__name__).joinpath(SAMPLE_FILE)
    path = os.fspath(ref)  # the package is installed as files, never zipped
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the refattn sample {SAMPLE_FILE} is missing from {path}; "
                                "reinstall refattn")
    return path


def sample() -> Sample:
    """The shipped real sample as a :class:`Sample` ``(q, k, v, meta)`` in ``bhsd``.

    Attention over it is causal with ``softmax_scale = 0.125`` (= 1/sqrt(64), the default);
    query head ``h`` reads kv head ``h // 3`` = 0. Head 0 is local, head 1 diffuse with
    stripes, head 2 (model head 4) sink-heavy.
    """
    from ..io import load

    d = load(sample_path(), layout="hsd")
    meta = dict(d["meta"])
    for key in ("token_ids", "q_head_index", "kv_head_index"):
        if key in d:
            meta[key] = d[key]
    return Sample(d["q"], d["k"], d["v"], meta)


__all__ = ["synthetic", "rope", "unrope", "structure_of", "head_profile", "HEAD_PROFILES",
           "sample", "sample_path", "Sample", "SAMPLE_FILE"]
