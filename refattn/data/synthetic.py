"""Structured synthetic Q/K/V with RoPE: sinks, local diagonals, vertical stripes, slashes.

Gaussian Q/K give diffuse attention on which every sparse method looks alike. Real
attention has structure; :func:`synthetic` builds it in explicitly, pre-RoPE, from the way
rotary embeddings act on each frequency pair (NeoX "rotate half": dimension ``p`` and
``p + D/2`` form pair ``p``, rotated by ``position * theta^(-2p/D)``):

* **sink** (key 0): key 0 and every query share a vector ``u`` in the *lowest*-frequency
  pairs, which RoPE barely rotates over the sequence, so every query scores key 0 high.
* **vertical stripes**: a few keys share another low-frequency vector ``s`` that every
  query carries, so all queries like those keys wherever they are.
* **local diagonal**: every key carries a vector ``w`` in the *high*-frequency pairs and every
  query carries ``w`` too. After RoPE, ``q_i . k_j`` holds
  ``sum_p |w_p|^2 cos((i - j) f_p)``, which peaks at ``j = i`` and falls off with distance
  (RoPE's long-range decay).
* **slash lines** at offsets ``d``: as the local term, but the query carries ``w_d`` rotated
  by ``-d`` (``R_{-d} w_d``), so the cosine sum peaks at ``j = i - d``; i.e. after RoPE the
  key ``k_j`` resembles the query ``q_{j+d}``. The local term and each slash use disjoint,
  interleaved subsets of the high-frequency pairs: vectors on disjoint pairs stay
  orthogonal under any rotation, so one's RoPE side lobes cannot cancel another's peak.

Base Gaussian noise lives mainly in the middle frequency pairs (std 1; std 0.2 in the pairs
that carry structure). Gains are stated as logits added at the peak (after the
``1/sqrt(D)`` softmax scale) and vary per query head through :data:`HEAD_PROFILES`, cycled
over the query heads: sink-heavy, local, diffuse, striped.

The design keeps the structure for sequences up to a few thousand tokens at
``rope_theta = 1e4`` (beyond that even the lowest-frequency pair turns by more than about a
radian and the sink/stripes fade); raise ``rope_theta`` for longer ones.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..core.errors import InputError

#: Query-head profiles: logits (after the 1/sqrt(D) scale) that each structure adds at
#: its peak. Query head ``h`` uses ``HEAD_PROFILES[h % len(HEAD_PROFILES)]``.
HEAD_PROFILES: tuple[tuple[str, dict[str, float]], ...] = (
    ("sink", {"sink": 9.0, "stripe": 2.0, "local": 2.0, "slash": 1.5}),
    ("local", {"sink": 2.0, "stripe": 1.0, "local": 9.0, "slash": 1.0}),
    ("diffuse", {"sink": 0.5, "stripe": 0.5, "local": 1.0, "slash": 0.5}),
    ("striped", {"sink": 3.0, "stripe": 6.0, "local": 3.0, "slash": 6.0}),
)
NOISE_STRUCT = 0.2  # std of the base noise in the pairs that carry structure


def head_profile(h: int) -> str:
    """Name of the profile of query head ``h`` ("sink", "local", "diffuse", "striped")."""
    return HEAD_PROFILES[h % len(HEAD_PROFILES)][0]


def _angles(positions: Any, dim: int, theta: float, n: int) -> np.ndarray:
    if dim % 2:
        raise InputError(f"rope: head dim must be even, got {dim}")
    if not np.isfinite(theta) or theta <= 0:
        raise InputError(f"rope: theta must be a finite positive number, got {theta!r}")
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 1 or pos.shape[0] != n:
        raise InputError(f"positions: expected a 1-d array of {n} positions (the sequence axis), "
                         f"got shape {pos.shape}")
    inv_freq = float(theta) ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)   # [D/2]
    return pos[:, None] * inv_freq[None, :]                                        # [S, D/2]


def rope(x: Any, positions: Any, theta: float = 10000.0) -> np.ndarray:
    """NeoX rotate-half RoPE: ``x [..., S, D]`` at ``positions [S]``; float64 result.

    ``out = x * cos(a) + rotate_half(x) * sin(a)`` with ``rotate_half([x1, x2]) = [-x2, x1]``
    and ``a[s, p] = positions[s] * theta^(-2p/D)`` repeated over both halves (as
    ``transformers``' ``apply_rotary_pos_emb``). Consequence used throughout:
    ``rope(a, i) . rope(b, j)`` depends on ``i - j`` only.
    """
    xf = np.asarray(x, dtype=np.float64)
    if xf.ndim < 2:
        raise InputError(f"x: expected [..., S, D], got shape {xf.shape}")
    ang = _angles(positions, xf.shape[-1], theta, xf.shape[-2])
    c, s = np.cos(ang), np.sin(ang)
    h = xf.shape[-1] // 2
    x1, x2 = xf[..., :h], xf[..., h:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def unrope(x: Any, positions: Any, theta: float = 10000.0) -> np.ndarray:
    """Inverse of :func:`rope` (rotation by the opposite angles); float64 result."""
    xf = np.asarray(x, dtype=np.float64)
    if xf.ndim < 2:
        raise InputError(f"x: expected [..., S, D], got shape {xf.shape}")
    ang = _angles(positions, xf.shape[-1], theta, xf.shape[-2])
    c, s = np.cos(ang), np.sin(ang)
    h = xf.shape[-1] // 2
    x1, x2 = xf[..., :h], xf[..., h:]
    return np.concatenate([x1 * c + x2 * s, x2 * c - x1 * s], axis=-1)


def _pair_vector(rng: np.random.Generator, pairs: np.ndarray, half: int) -> np.ndarray:
    """Unit vector ``[2*half]`` with equal weight on each pair of ``pairs``, random phases."""
    v = np.zeros(2 * half)
    phase = rng.uniform(0.0, 2 * np.pi, size=pairs.size)
    v[pairs] = np.cos(phase)
    v[pairs + half] = np.sin(phase)
    return v / np.sqrt(pairs.size)


def _rotate_pairs(v: np.ndarray, offset: float, dim: int, theta: float) -> np.ndarray:
    """``R_offset v`` for one vector ``v [D]`` (RoPE rotation by ``offset`` positions)."""
    return rope(v[None], np.array([offset]), theta)[0]


def _draw_positions(rng: np.random.Generator, seq_len: int, stripes: int,
                    slashes: int) -> tuple[np.ndarray, np.ndarray]:
    """Stripe key positions (from ``1..seq_len-1``) and slash offsets (from about
    ``seq_len/32 .. seq_len/2``): the first draws of the generator, sorted, int64."""
    if seq_len > 1:
        stripe_pos = np.sort(rng.choice(np.arange(1, seq_len), size=min(stripes, seq_len - 1),
                                        replace=False))
    else:
        stripe_pos = np.zeros(0, np.int64)
    lo, hi = max(1, seq_len // 32), max(2, seq_len // 2)
    offsets = np.sort(rng.choice(np.arange(lo, hi), size=min(slashes, hi - lo), replace=False))
    return stripe_pos.astype(np.int64), offsets.astype(np.int64)


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise InputError(f"{name}: expected an integer >= {lo}, got {value!r}")
    return int(value)


def synthetic(batch: int = 1, q_heads: int = 4, kv_heads: int = 2, seq_len: int = 1024,
              head_dim: int = 64, *, q_len: int | None = None, seed: int = 0,
              sinks: bool = True, local: bool = True, stripes: int = 4, slashes: int = 2,
              rope_theta: float = 10000.0, dtype: Any = np.float32
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Structured post-RoPE ``(q, k, v)`` in ``bhsd``; deterministic for a given ``seed``.

    Shapes: q ``[batch, q_heads, q_len, head_dim]``, k and v
    ``[batch, kv_heads, seq_len, head_dim]``. Keys sit at positions ``0..seq_len-1``; queries
    at the last ``q_len`` positions (``seq_len - q_len .. seq_len - 1``; default
    ``q_len = seq_len``), as in chunked prefill, so use bottom-right causal masking.

    Structure (see the module docstring): an attention sink at key 0 (``sinks``), a local
    diagonal (``local``), ``stripes`` vertical stripes at keys drawn at random from
    ``1..seq_len-1``, and ``slashes`` slash lines at offsets drawn from about
    ``seq_len/32 .. seq_len/2``; their strength per query head follows
    :data:`HEAD_PROFILES`. The same stripe keys and offsets are used for every batch entry.
    ``dtype``: any float dtype, including ``ml_dtypes.bfloat16``.
    """
    batch = _check_int("batch", batch, 1)
    q_heads = _check_int("q_heads", q_heads, 1)
    kv_heads = _check_int("kv_heads", kv_heads, 1)
    seq_len = _check_int("seq_len", seq_len, 1)
    head_dim = _check_int("head_dim", head_dim, 8)
    stripes = _check_int("stripes", stripes, 0)
    slashes = _check_int("slashes", slashes, 0)
    seed = _check_int("seed", seed, 0)
    if head_dim % 2:
        raise InputError(f"head_dim: RoPE needs an even head dim, got {head_dim}")
    if q_heads % kv_heads:
        raise InputError(f"q_heads: must be a multiple of kv_heads ({kv_heads}), got {q_heads}")
    q_len = seq_len if q_len is None else _check_int("q_len", q_len, 1)
    if q_len > seq_len:
        raise InputError(f"q_len: must be <= seq_len ({seq_len}), got {q_len}")
    theta = float(rope_theta)
    if not np.isfinite(theta) or theta <= 1.0:
        raise InputError(f"rope_theta: expected a finite number > 1, got {rope_theta!r}")
    try:
        out_dtype = np.dtype(dtype)
    except TypeError:
        raise InputError(f"dtype: not a NumPy dtype: {dtype!r}") from None
    if out_dtype.kind not in "fV":
        raise InputError(f"dtype: expected a float dtype, got {out_dtype}")

    rng = np.random.default_rng(seed)
    D, half = head_dim, head_dim // 2
    n_low = max(2, half // 8)
    local_pairs = np.arange(0, max(1, half // 2))           # high frequency
    sink_pairs = np.arange(half - n_low // 2, half)          # lowest frequency
    stripe_pairs = np.arange(half - n_low, half - n_low // 2)
    std = np.ones(D)
    for pairs in (local_pairs, sink_pairs, stripe_pairs):
        std[pairs] = std[pairs + half] = NOISE_STRUCT
    c = 2.0 * D ** 0.25                                      # key-side norm of a structure
    qgain = np.sqrt(D) / c                                   # query-side norm per unit logit

    stripe_pos, offsets = _draw_positions(rng, seq_len, stripes, slashes)
    # The diagonal structures (local, then one per slash) share the high-frequency band;
    # each takes an interleaved subset of its pairs so that they cannot interfere (vectors on
    # disjoint pairs stay orthogonal under any rotation). Too few pairs: they share the band.
    n_diag = int(bool(local)) + offsets.size
    if n_diag and local_pairs.size >= n_diag:
        bands = [local_pairs[i::n_diag] for i in range(n_diag)]
    else:
        bands = [local_pairs] * n_diag
    local_band, slash_bands = (bands[0] if local else None), bands[int(bool(local)):]
    k_pos = np.arange(seq_len)
    q_pos = np.arange(seq_len - q_len, seq_len)
    group = q_heads // kv_heads
    q = np.empty((batch, q_heads, q_len, D))
    k = np.empty((batch, kv_heads, seq_len, D))
    v = np.empty((batch, kv_heads, seq_len, D))
    for b in range(batch):
        for g in range(kv_heads):
            u = _pair_vector(rng, sink_pairs, half)
            s = _pair_vector(rng, stripe_pairs, half)
            w = _pair_vector(rng, local_band, half) if local else np.zeros(D)
            w_sl = [_pair_vector(rng, band, half) for band in slash_bands]
            kk = rng.standard_normal((seq_len, D)) * std
            if local:
                kk += c * w
            for wd in w_sl:
                kk += c * wd
            if sinks:
                kk[0] += c * u
            kk[stripe_pos] += c * s
            k[b, g] = rope(kk, k_pos, theta)
            v[b, g] = rng.standard_normal((seq_len, D))
            for h in range(g * group, (g + 1) * group):
                gains = HEAD_PROFILES[h % len(HEAD_PROFILES)][1]
                qq = rng.standard_normal((q_len, D)) * std
                if local:
                    qq += gains["local"] * qgain * w
                if sinks:
                    qq += gains["sink"] * qgain * u
                if stripe_pos.size:
                    qq += gains["stripe"] * qgain * s
                for d, wd in zip(offsets, w_sl, strict=True):
                    qq += gains["slash"] * qgain * _rotate_pairs(wd, -float(d), D, theta)
                q[b, h] = rope(qq, q_pos, theta)
    return q.astype(out_dtype), k.astype(out_dtype), v.astype(out_dtype)


def structure_of(seq_len: int = 1024, *, seed: int = 0, stripes: int = 4,
                 slashes: int = 2) -> dict[str, np.ndarray]:
    """Where :func:`synthetic` put the stripes and slashes for these arguments:
    ``{"stripes": key positions, "slashes": offsets}`` (the first draws of its generator)."""
    rng = np.random.default_rng(_check_int("seed", seed, 0))
    stripe_pos, offsets = _draw_positions(rng, _check_int("seq_len", seq_len, 1),
                                          _check_int("stripes", stripes, 0),
                                          _check_int("slashes", slashes, 0))
    return {"stripes": stripe_pos, "slashes": offsets}


__all__ = ["synthetic", "rope", "unrope", "structure_of", "head_profile", "HEAD_PROFILES"]
