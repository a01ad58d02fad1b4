from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refattn.core import InputError
from refattn.reference import selection as sel

scores = arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 12)),
                elements=st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]))


@given(s=scores, k=st.integers(0, 13), tie=st.sampled_from(["low", "high"]))
def test_topk_per_row_is_the_sorted_prefix(s, k, tie):
    m, b = sel.topk_per_row(s, k, tie=tie)
    n = s.shape[1]
    for r in range(s.shape[0]):
        key = [(-s[r, j], j if tie == "low" else -j) for j in range(n)]
        want = sorted(range(n), key=lambda j: key[j])[:k]
        assert set(np.nonzero(m[r])[0]) == set(want)
        if k:
            assert b[r] == min(s[r, want])
        else:
            assert np.isnan(b[r])


def test_topk_respects_valid_and_budget_arrays():
    s = np.array([[5.0, 4, 3, 2], [1, 2, 3, 4]])
    valid = np.array([[False, True, True, True], [True, True, True, False]])
    m, b = sel.topk_per_row(s, np.array([2, 1]), valid=valid)
    np.testing.assert_array_equal(m, [[0, 1, 1, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(b, [3, 3])


def test_topk_global_per_head():
    s = np.arange(12, dtype=float).reshape(1, 3, 4)
    m, b = sel.topk_global(s, 5)
    assert m.sum() == 5 and m[0, 2].all() and m[0, 1, 3] and b[0] == 7


@given(s=scores, tau=st.floats(0.0, 1.0))
def test_cumulative_threshold_smallest_prefix(s, tau):
    m, b = sel.cumulative_threshold(s, tau)
    for r in range(s.shape[0]):
        tot = s[r].sum()
        kept = s[r][m[r]].sum()
        if tau <= 0 or tot == 0:
            assert not m[r].any()
            continue
        assert kept / tot >= tau - 1e-12
        # dropping the smallest kept block falls below tau (minimality)
        smallest = s[r][m[r]].min()
        assert (kept - smallest) / tot < tau + 1e-12


def test_cumulative_threshold_per_head_tau_and_ties():
    s = np.array([[[1.0, 1.0, 1.0, 1.0]], [[1.0, 1.0, 1.0, 1.0]]])
    m, _ = sel.cumulative_threshold(s, np.array([[0.5], [1.0]]))
    np.testing.assert_array_equal(m[0, 0], [1, 1, 0, 0])
    np.testing.assert_array_equal(m[1, 0], [1, 1, 1, 1])
    m, _ = sel.cumulative_threshold(s[:1], 0.5, tie="high")
    np.testing.assert_array_equal(m[0, 0], [0, 0, 1, 1])
    with pytest.raises(InputError, match="non-negative"):
        sel.cumulative_threshold(-s, 0.5)


def test_fixed_threshold_and_forcing():
    s = np.array([[0.1, 0.5, 0.9]])
    m, b = sel.fixed_threshold(s, 0.5)
    np.testing.assert_array_equal(m, [[0, 1, 1]])
    assert b[0] == 0.5
    mask = np.zeros((1, 3, 3), bool)
    f = sel.force_local(sel.force_sink(mask), 12, 12, 4, 4, width=1)
    np.testing.assert_array_equal(f[0], [[1, 0, 0], [1, 1, 0], [1, 0, 1]])
    np.testing.assert_array_equal(sel.diagonal_blocks(4, 12, 4, 4), [2])
    np.testing.assert_array_equal(sel.causal_exclude(np.ones((2, 3), bool), 8, 12, 4, 4),
                                  [[1, 1, 0], [1, 1, 1]])


def test_tie_argument_validated():
    with pytest.raises(InputError, match="tie"):
        sel.topk_per_row(np.ones((1, 3)), 1, tie="middle")
