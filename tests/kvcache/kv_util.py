"""Helpers of the KV-cache tests: tie-aware comparison of kept sets, random inputs."""

from __future__ import annotations

import numpy as np


def assert_same_keep(
    ours: np.ndarray,
    ref: np.ndarray,
    scores: np.ndarray,
    *,
    rtol: float = 1e-5,
    check_order: bool = True,
) -> None:
    """Kept index arrays ``[H, n]`` agree up to near-ties at the selection cut.

    ``scores [H, N]`` are our scores of every candidate. A position kept by one side only
    must score within ``rtol`` (relative to the head's score range) of the head's boundary
    (the lowest kept score). With ``check_order``, positions whose scores are not tied with
    a neighbour must appear in the same order.
    """
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    for h in range(ours.shape[0]):
        s = scores[h]
        tol = rtol * max(1e-30, float(np.nanmax(np.abs(s))))
        a, b = set(ours[h].tolist()), set(ref[h].tolist())
        if a != b:
            bound = min(s[list(a)])
            diff = sorted(a ^ b)
            assert np.all(np.abs(s[diff] - bound) <= tol), (
                f"head {h}: kept sets differ beyond ties at {diff[:8]}: scores {s[diff][:8]}, "
                f"boundary {bound}"
            )
        if check_order and a == b:
            so, sr = s[ours[h]], s[ref[h]]
            assert np.all(np.diff(so) <= tol), f"head {h}: our order is not descending"
            assert np.all(np.diff(sr) <= tol), (
                f"head {h}: reference order is not descending in our scores"
            )


def random_qkv(
    seed: int, B: int = 1, Hq: int = 4, Hkv: int = 2, L: int = 64, D: int = 16, sink: bool = True
):
    """float64 q ``[B,Hq,L,D]``, k/v ``[B,Hkv,L,D]``; with ``sink`` key 0 attracts attention."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, L, D))
    k = rng.standard_normal((B, Hkv, L, D))
    v = rng.standard_normal((B, Hkv, L, D)) * rng.lognormal(0.0, 0.3, (B, Hkv, L, 1))
    if sink:
        k[:, :, 0, 0] += 6.0
        q[..., 0] += 1.5
    return q, k, v
