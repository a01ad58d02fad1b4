"""Registry cases of the VMoBA gate op ``vmoba_gate``: q/k already permuted by a video-grid
partition (1D with a ragged last block, 2D tubes, 3D cubes, a float 1D chunk), GQA, a
single block, bf16 and fp64 inputs, and structured (sink / stripe) keys. Each case yields
``{"label", "args", "dtype"}`` with ``args = (q, k, bounds)``."""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..core.video_grid import VideoGrid
from ..testing import random_qkv, register_cases, round_to_dtype, structured_qkv
from ..video.vmoba import VMOBA_GATE

Case = Iterator[dict[str, Any]]


def vmoba_gate_cases(rng: np.random.Generator) -> Case:
    """(q, k, bounds) on partitions of small grids."""
    configs = [
        # label, grid, kind, chunk, (B, Hq, Hkv, D), dtype, structured
        ("1d_ragged", (5, 4, 6), "1d", 2, (1, 2, 2, 32), "float32", False),
        ("1d_float", (6, 4, 4), "1d", 1.5, (2, 2, 1, 16), "float32", True),
        ("2d_gqa", (3, 8, 12), "2d", (4, 4), (1, 4, 2, 64), "float32", True),
        ("3d", (4, 4, 6), "3d", (2, 2, 3), (1, 2, 1, 32), "float32", False),
        ("one_block", (2, 3, 3), "3d", (2, 3, 3), (1, 2, 2, 16), "float32", False),
        ("bf16", (4, 6, 8), "2d", (3, 4), (1, 2, 1, 64), "bfloat16", True),
        ("fp64", (3, 5, 7), "1d", 1, (1, 3, 1, 24), "float64", False),
    ]
    for label, grid, kind, chunk, (B, Hq, Hkv, D), dt, structured in configs:
        part = VideoGrid(*grid).partition(kind, chunk)
        S = part.grid.seq_len
        maker = structured_qkv if structured else random_qkv
        q, k, _ = maker(rng, B, Hq, Hkv, S, S, D, dtype="float32")
        q, k = part.permute(q, axis=2), part.permute(k, axis=2)
        q, k = round_to_dtype(q, dt), round_to_dtype(k, dt)
        yield {"label": label, "args": (q, k, part.bounds.copy()), "dtype": dt}


register_cases(VMOBA_GATE.name, vmoba_gate_cases)
