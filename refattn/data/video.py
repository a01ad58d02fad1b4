"""Structured synthetic video-DiT inputs: q/k/v over a ``(T, H, W)`` token grid with
spatio-temporal locality, for tests and the demo of the video methods.

Token ``(t, y, x)`` sits at flat index ``(t * H + y) * W + x`` (row-major, as
:class:`refattn.core.video_grid.VideoGrid`), text tokens (if any) before or after the video.
Each head attends by a Gaussian kernel of the grid distance, built from random Fourier
features of the coordinates, so that ``q_i . k_j ~ gain * exp(-|(x_i - x_j) / l|^2 / 2)``:

* ``"spatial"`` heads: short length in time, longer in space (attend within nearby frames);
* ``"temporal"`` heads: short length in space, long in time (same place across frames);
* ``"local"`` heads: short in all three axes (a 3-D window).

Noise is added so that no head is exactly one pattern; text tokens get Gaussian features
plus a shared "global" direction that every video query likes a little.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import InputError

PROFILES = ("spatial", "temporal", "local")
# length scales (t, y, x) in tokens for each profile
_SCALES = {"spatial": (0.6, 4.0, 4.0), "temporal": (6.0, 0.8, 0.8), "local": (1.0, 1.5, 1.5)}


def synthetic_video(grid: tuple[int, int, int] = (4, 16, 16), *, heads: int = 3,
                    kv_heads: int | None = None, head_dim: int = 64, text_tokens: int = 0,
                    text_position: str = "last", gain: float = 6.0, noise: float = 0.5,
                    seed: int = 0, dtype: Any = np.float32
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q ``[1, heads, S, D]``, k, v ``[1, kv_heads, S, D]`` (bhsd), ``S = T*H*W + text``.

    Query head ``h`` has profile ``PROFILES[h % 3]``; with GQA the kv head of a group uses
    the profile of its first query head. Seeded and deterministic.
    """
    if len(grid) != 3 or min(int(g) for g in grid) < 1:
        raise InputError(f"grid: expected (T, H, W) of positive integers, got {grid!r}")
    if text_position not in ("first", "last"):
        raise InputError(f"text_position: expected 'first' or 'last', got {text_position!r}")
    kv_heads = heads if kv_heads is None else int(kv_heads)
    if heads % kv_heads:
        raise InputError(f"GQA: heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if head_dim < 8 or head_dim % 2:
        raise InputError(f"head_dim: expected an even number >= 8, got {head_dim}")
    T, H, W = (int(g) for g in grid)
    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(np.arange(T), np.arange(H), np.arange(W), indexing="ij")
    coords = np.stack([t.ravel(), y.ravel(), x.ravel()], axis=1).astype(np.float64)  # [N, 3]
    n_vid, n_txt = coords.shape[0], int(text_tokens)
    S = n_vid + n_txt
    vid = slice(n_txt, S) if text_position == "first" else slice(0, n_vid)
    txt = slice(0, n_txt) if text_position == "first" else slice(n_vid, S)
    group = heads // kv_heads
    glob = rng.standard_normal(head_dim) / np.sqrt(head_dim)

    def features(profile: str) -> np.ndarray:
        m = head_dim // 2
        scales = np.asarray(_SCALES[profile])
        w = rng.standard_normal((m, 3)) / scales                  # RFF frequencies
        b = rng.uniform(0, 2 * np.pi, m)
        ang = coords @ w.T + b
        f = np.concatenate([np.cos(ang), np.sin(ang)], axis=1) / np.sqrt(m)  # ~ unit norm
        return f

    q = np.empty((1, heads, S, head_dim))
    k = np.empty((1, kv_heads, S, head_dim))
    v = rng.standard_normal((1, kv_heads, S, head_dim))
    for g in range(kv_heads):
        prof = PROFILES[(g * group) % 3]
        f = features(prof)
        rot = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))[0]
        base = f @ rot                                             # [N, D], q.k ~ RBF kernel
        k[0, g, vid] = base * np.sqrt(gain) + noise * rng.standard_normal(base.shape) / np.sqrt(head_dim)
        k[0, g, txt] = rng.standard_normal((n_txt, head_dim)) / np.sqrt(head_dim) + glob
        for h in range(g * group, (g + 1) * group):
            q[0, h, vid] = base * np.sqrt(gain) * np.sqrt(head_dim) + \
                noise * rng.standard_normal(base.shape) + glob
            q[0, h, txt] = rng.standard_normal((n_txt, head_dim))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)
