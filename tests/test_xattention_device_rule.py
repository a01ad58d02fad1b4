"""The array-module-generic selection code of XAttention and Prism (``device=True``), on the CPU.

XAttention's ``find_blocks_chunked`` and Prism's ``top_p_select`` are written once for NumPy
and CuPy arrays (fancy-index scatter instead of ``np.put_along_axis``, the forced pattern of
a chunk built as ``[R, N]``, stable argsort through the array module). Here the generic code
runs on NumPy and must equal, bit for bit, a literal transcription of the NumPy-only code it
replaced (the official algorithms), on inputs full of ties, zeros and exact crossings, on
every chunk position, with per-head and extreme thresholds. The GPU runs the same lines
(``tests/test_gpu_end_to_end.py``).
"""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn.methods import prism as P
from refattn.methods import xattention as X


# --------------------------------------------------------- literal NumPy transcriptions
def _find_blocks_literal(W, current_index, tau, causal=True):
    B, H, R, N = W.shape
    req = W.sum(axis=-1, keepdims=True) * tau[None, :, None, None]
    zero = np.zeros((B, H, R, 1))
    if causal:
        forced = np.zeros((B, H, R, N), dtype=bool)
        forced[..., 0] = True
        forced[..., current_index:current_index + R] = np.eye(R, dtype=bool)
        others = np.sort(np.where(forced, 0.0, W), axis=-1)[..., ::-1]
        forced_sum = np.where(forced, W, 0.0).sum(axis=-1, keepdims=True)
        sorted_values = np.concatenate([zero, forced_sum, others[..., :-2]], axis=-1)
        key = np.where(forced, 100000.0 * (1.0 + W), W)
        mask = forced.copy()
    else:
        key = W
        sorted_values = np.sort(W, axis=-1)[..., ::-1]
        mask = np.zeros((B, H, R, N), dtype=bool)
    order = np.argsort(-key, axis=-1, kind="stable")
    cum_before = np.cumsum(np.concatenate([zero, sorted_values[..., :-1]], axis=-1), axis=-1)
    index = np.where(cum_before < req, order, 0)
    np.put_along_axis(mask, index, True, axis=-1)
    if causal:
        mask[..., current_index + R:] = False
    return mask


def _top_p_literal(probs, tau):
    p32 = np.asarray(probs, dtype=np.float64).astype(np.float32)
    order = np.argsort(-p32, axis=-1, kind="stable")
    srt = np.take_along_axis(p32, order, axis=-1)
    cum = np.cumsum(srt.astype(np.float64), axis=-1).astype(np.float32)
    keep = (cum - srt) < np.float32(tau)
    mask = np.zeros(keep.shape, dtype=bool)
    np.put_along_axis(mask, order, keep, axis=-1)
    return mask


def _tied(rng, shape, levels):
    """Non-negative values on a coarse grid (many exact ties and zeros), lower-triangular
    where the grid is square."""
    W = rng.integers(0, levels, size=shape).astype(np.float64) / levels
    W *= rng.random(shape) < 0.8
    return W


# ------------------------------------------------------------------------ xattention
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 2), H=st.integers(1, 3),
       R=st.integers(1, 6), chunks=st.integers(1, 4), levels=st.sampled_from([2, 3, 8, 1000]),
       causal=st.booleans(), tau=st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.95, 1.0, "per-head"]))
def test_find_blocks_chunked_equals_the_literal_rule(seed, B, H, R, chunks, levels, causal, tau):
    rng = np.random.default_rng(seed)
    N = R * chunks
    W = _tied(rng, (B, H, N, N), levels)
    if causal:
        W = np.tril(W)
    t = (rng.choice([0.5, 0.8, 0.9, 1.0], H) if tau == "per-head"
         else np.full(H, float(tau)))
    for c in range(chunks):
        Wc = W[:, :, c * R:(c + 1) * R]
        got = X.find_blocks_chunked(Wc, c * R, t, causal)
        want = _find_blocks_literal(Wc, c * R, t, causal)
        assert got.dtype == bool and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    # a chunk against a wider key range than the chunks cover (N > ci + R)
    got = X.find_blocks_chunked(W[:, :, :R], 0, t, causal)
    np.testing.assert_array_equal(got, _find_blocks_literal(W[:, :, :R], 0, t, causal))


def test_find_blocks_chunked_on_exact_crossings():
    """Rows whose cumulative sums hit ``tau * total`` exactly (dyadic values)."""
    W = np.zeros((1, 1, 4, 8))
    W[0, 0, :, :] = [[4, 2, 1, 1, 0, 0, 0, 0], [2, 2, 2, 2, 0, 0, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1], [8, 0, 0, 0, 0, 0, 0, 0]]
    for ci in (0, 4):
        for tau in (0.0, 0.25, 0.5, 0.75, 0.875, 1.0):
            t = np.array([tau])
            np.testing.assert_array_equal(X.find_blocks_chunked(W, ci, t),
                                          _find_blocks_literal(W, ci, t))
            np.testing.assert_array_equal(X.find_blocks_chunked(W, ci, t, False),
                                          _find_blocks_literal(W, ci, t, False))


def test_boundary_is_the_smallest_score_kept_by_score():
    rng = np.random.default_rng(3)
    W = np.tril(rng.random((1, 2, 6, 6)))
    mask = rng.random(W.shape) < 0.5
    forced = np.broadcast_to(np.eye(6, dtype=bool), W.shape)
    b = X._boundary(W, mask, forced)
    for idx in np.ndindex(W.shape[:3]):
        kept = mask[idx] & ~forced[idx]
        if kept.any():
            assert b[idx] == W[idx][kept].min()
        else:
            assert np.isnan(b[idx])


# ----------------------------------------------------------------------------- prism
@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(7,), (3, 5), (2, 3, 4, 9), (1, 1, 1, 1)]),
       levels=st.sampled_from([2, 4, 16, 10**6]), tau=st.sampled_from([0.0, 0.5, 0.9, 0.95, 1.0]))
def test_top_p_select_equals_the_literal_rule(seed, shape, levels, tau):
    rng = np.random.default_rng(seed)
    p = _tied(rng, shape, levels)
    p /= np.maximum(p.sum(axis=-1, keepdims=True), 1e-300)
    got = P.top_p_select(p, tau)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, _top_p_literal(p, tau))


def test_top_p_select_takes_lists_and_float32():
    p = [[0.5, 0.25, 0.125, 0.125, 0.0]]
    for tau in (0.5, 0.75, 1.0):
        np.testing.assert_array_equal(P.top_p_select(p, tau), _top_p_literal(p, tau))
        np.testing.assert_array_equal(P.top_p_select(np.asarray(p, np.float32), tau),
                                      _top_p_literal(p, tau))


def test_select_geometry_equals_legal_blocks():
    """``select`` builds the causal-legal blocks as ``J <= I`` (on the device for device
    inputs): that is :func:`legal_blocks` for ``q_len == k_len`` and one block size."""
    from refattn.core.blockmask import legal_blocks

    for L in (1, 63, 64, 65, 127, 128, 129, 1000, 2048):
        for bs in (1, 16, 64, 128):
            n = -(-L // bs)
            J, I = np.arange(n)[None, :], np.arange(n)[:, None]
            np.testing.assert_array_equal(legal_blocks(L, L, bs, bs, True), J <= I)
