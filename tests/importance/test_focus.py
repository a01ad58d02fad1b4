"""FOCUS (no official CPU vectors: the official scoring is Triton-only): hand-computed
importance, properties of the score, and the keep rule on constructed inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from refattn.core.errors import InputError
from refattn.core.registry import dispatch
from refattn.importance import focus as fc


def _imp(q, k, scale=1.0, backend="numpy"):
    return np.asarray(dispatch("focus_importance", backend)(q, k, scale)[0])[0]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_max_pool_hand_example(backend):
    # logits of every row are k itself: [0, 2, 0] pools to [2, 2, 2] -> uniform rows
    q = np.ones((1, 1, 3, 1))
    k = np.array([0.0, 2.0, 0.0]).reshape(1, 1, 3, 1)
    np.testing.assert_allclose(_imp(q, k, backend=backend), [1.0, 1.0, 1.0], rtol=1e-12)
    # [0, 0, 3, 0] pools to [0, 3, 3, 3]: each of 4 rows gives (1, e^3, e^3, e^3) / (1 + 3 e^3)
    k = np.array([0.0, 0.0, 3.0, 0.0]).reshape(1, 1, 4, 1)
    e = math.exp(3.0)
    want = 4 * np.array([1, e, e, e]) / (1 + 3 * e)
    np.testing.assert_allclose(_imp(np.ones((1, 1, 4, 1)), k, backend=backend), want, rtol=1e-12)


def test_properties():
    rng = np.random.default_rng(0)
    H, Hk, L = 4, 2, 19
    q = rng.standard_normal((1, H, L, 16))
    k = rng.standard_normal((1, Hk, L, 16))
    I = _imp(q, k, 0.25)
    assert I.sum() == pytest.approx(H * L)                       # each row's softmax sums to 1
    # reversing T-order reverses the importance (width-3 pooling is symmetric)
    np.testing.assert_allclose(_imp(q[:, :, ::-1], k[:, :, ::-1], 0.25), I[::-1], rtol=1e-12)
    # GQA: kv head g serves query heads 2g, 2g+1 -- same as repeating k explicitly
    np.testing.assert_allclose(_imp(q, np.repeat(k, 2, axis=1), 0.25), I, rtol=1e-12)
    # single token: importance = H
    assert _imp(q[:, :, :1], k[:, :, :1]) == pytest.approx([H])


def test_target_count():
    assert fc.target_count(10, 2.4, 1.5) == 4                     # ceil(3.6)
    assert fc.target_count(10, 0.2, 1.0) == 1                     # avg_dec clamped to >= 1
    assert fc.target_count(3, 9.0, 1.5) == 3                      # at most L
    assert fc.target_count(0, 1.0, 1.5) == 0


POS = np.array([0, 1, 2, 3, 5, 6, 7, 9, 10, 11])


def test_keep_rule_topk_neighbour_gap_fill():
    d = np.zeros(10)
    d[8] = 5.0                                   # threshold set {8} is smaller than K = 2
    r = fc.focus_keep(d, POS, avg_dec=1.0, alpha=1.5)
    assert r["K"] == 2 and r["evict"] and not r["used_threshold"]
    assert r["threshold"] == pytest.approx(0.5 + 1.5)
    # top-2: index 8, then the lowest-index zero (0); pos 9 (index 7) joins as left
    # neighbour of pos 10; the gap fill keeps every position below 10 (progress -1)
    np.testing.assert_array_equal(r["keep"], [1, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    r = fc.focus_keep(d, POS, avg_dec=1.0, alpha=1.5, progress=6)
    np.testing.assert_array_equal(np.nonzero(r["keep"])[0], [0, 6, 7, 8])


def test_keep_rule_threshold_may_exceed_k():
    d = np.zeros(10)
    d[[3, 9]] = 5.0                             # mean 1, std 2: threshold 3 -> {3, 9}
    r = fc.focus_keep(d, POS, avg_dec=1.0, alpha=1.0, progress=11)
    assert r["K"] == 1 and r["used_threshold"]
    # left-neighbour fill uses the step-3 set only once: pos 2 joins (before pos 3), pos 10
    # joins (before pos 11); no gap fill beyond progress 11
    np.testing.assert_array_equal(np.nonzero(r["keep"])[0], [2, 3, 8, 9])


def test_no_eviction_and_validation():
    r = fc.focus_keep(np.arange(2.0), [4, 5], avg_dec=1.0, alpha=1.5)
    assert not r["evict"] and r["keep"].all()
    with pytest.raises(InputError, match="positions"):
        fc.focus_keep(np.zeros(3), [0, 2, 1])


def test_step_bf16_ties_and_backends():
    rng = np.random.default_rng(1)
    L = 12
    pos = np.sort(rng.choice(32, L, replace=False))
    qk = [rng.standard_normal(s) for s in ((4, L, 32), (2, L, 32)) * 2]
    a = fc.focus_step(*qk, pos, avg_dec=2.0)
    b = fc.focus_step(*qk, pos, avg_dec=2.0, backend="numba")
    np.testing.assert_array_equal(a["keep"], b["keep"])
    assert a["I0"].sum() == pytest.approx(4 * L, rel=1e-2)
    np.testing.assert_array_equal(a["I0"], fc.round_bf16(a["I0"]))      # bf16-rounded
    assert set(a["kept_positions"]) == set(a["keepset"].kept(0, 0))
    assert a["K"] == 3
    with pytest.raises(InputError, match="positions"):
        fc.focus_step(*qk, pos[:-1])
    with pytest.raises(InputError, match="alpha"):
        fc.focus_step(*qk, pos, params=fc.FocusParams(alpha=0.5))


def test_running_average():
    assert fc.running_avg_decoded([]) == 1.0
    assert fc.running_avg_decoded([0, 2, 3, 0]) == 2.5


def test_step_input_errors_and_empty():
    rng = np.random.default_rng(4)
    q = rng.standard_normal((3, 5, 8))
    k = rng.standard_normal((2, 5, 8))
    with pytest.raises(InputError, match="GQA"):
        fc.focus_step(q, k, q, k, np.arange(5))
    bad = q.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN|finite"):
        fc.focus_step(bad, q, q, q, np.arange(5))
    e = np.zeros((2, 0, 8))
    r = fc.focus_step(e, e, e, e, np.zeros(0, np.int64))
    assert r["K"] == 0 and r["keep"].size == 0 and r["keepset"].counts[0, 0] == 0


def test_registered_method_matches_focus_step():
    import refattn
    from refattn.importance.focus import focus_step

    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 4, 20, 16)).astype(np.float32)
    k = rng.standard_normal((2, 2, 20, 16)).astype(np.float32)
    pos = tuple(range(3, 23))
    sel = refattn.select(q, k, "focus", causal=False, avg_dec=2.0, positions=pos)
    ref = focus_step(q[0], k[0], q[1], k[1], np.array(pos), avg_dec=2.0)
    np.testing.assert_array_equal(sel.mask.mask[0, 0, 0], ref["keep"])
    np.testing.assert_array_equal(sel.extras["kept_positions"], ref["kept_positions"])
    assert "focus" in refattn.methods(kind="importance")
    with pytest.raises(refattn.InputError, match="two layers"):
        refattn.select(q[:1], k[:1], "focus", causal=False)
    with pytest.raises(refattn.InputError, match="causal"):
        refattn.select(q, k, "focus", causal=True)
