from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refattn.core import BlockMask, InputError, legal_blocks
from refattn.core.blockmask import check_index_form, full_blocks

geom = st.tuples(st.integers(1, 90), st.integers(1, 90), st.sampled_from([1, 3, 16, 32]),
                 st.sampled_from([1, 5, 16, 64]))


def _mask(rng, sq, sk, bq, bk, b=2, h=3, p=0.5):
    qb, kb = -(-sq // bq), -(-sk // bk)
    return BlockMask(rng.random((b, h, qb, kb)) < p, block_q=bq, block_k=bk, q_len=sq, k_len=sk)


@given(g=geom, seed=st.integers(0, 2**16))
def test_index_round_trip_and_canonical_form(g, seed):
    sq, sk, bq, bk = g
    m = _mask(np.random.default_rng(seed), sq, sk, bq, bk)
    num, idx = m.to_indices()
    assert num.dtype == np.int32 and idx.dtype == np.int32
    check_index_form(num, idx, m.num_k_blocks, canonical=True)
    assert BlockMask.from_indices(num, idx, block_q=bq, block_k=bk, q_len=sq, k_len=sk) == m
    flex = m.to_flex()
    assert BlockMask.from_indices(flex["kv_num_blocks"], flex["kv_indices"], block_q=bq,
                                  block_k=bk, q_len=sq, k_len=sk) == m
    # FlexAttention's tail: unselected blocks ascending after the selected ones
    row_sel = idx[0, 0, 0][: num[0, 0, 0]]
    rest = np.setdiff1d(np.arange(m.num_k_blocks), row_sel)
    np.testing.assert_array_equal(flex["kv_indices"][0, 0, 0], np.concatenate([row_sel, rest]))


@given(g=geom, seed=st.integers(0, 2**16))
def test_transpose_is_the_transposed_mask(g, seed):
    sq, sk, bq, bk = g
    m = _mask(np.random.default_rng(seed), sq, sk, bq, bk)
    qn, qi = m.transpose()
    back = np.zeros(m.shape, bool)
    for b, h, j in np.ndindex(qn.shape):
        back[b, h, qi[b, h, j, : qn[b, h, j]], j] = True
    np.testing.assert_array_equal(back, m.mask)


@given(g=geom, causal=st.booleans(), seed=st.integers(0, 2**16))
def test_token_mask_and_partial_full_split(g, causal, seed):
    sq, sk, bq, bk = g
    m = _mask(np.random.default_rng(seed), sq, sk, bq, bk)
    t = m.to_token_mask(causal=causal)
    assert t.shape == (2, 3, sq, sk)
    i, j = np.meshgrid(np.arange(sq), np.arange(sk), indexing="ij")
    expect = m.mask[:, :, i // bq, j // bk]
    if causal:
        expect &= j <= i + sk - sq
    np.testing.assert_array_equal(t, expect)
    part, full = m.split_full(causal)
    assert (part | full) == m and not (part.mask & full.mask).any()
    # a full block is uncut: every token pair visible and full-sized
    fb = full_blocks(sq, sk, bq, bk, causal)
    for I, J in zip(*np.nonzero(fb), strict=True):
        rows = np.arange(I * bq, (I + 1) * bq)
        cols = np.arange(J * bk, (J + 1) * bk)
        assert rows[-1] < sq and cols[-1] < sk
        if causal:
            assert (cols[None, :] <= rows[:, None] + sk - sq).all()


@given(g=geom)
def test_legal_blocks_match_token_level_visibility(g):
    sq, sk, bq, bk = g
    full = BlockMask.full(1, 1, q_len=sq, k_len=sk, block_q=bq, block_k=bk)
    t = full.to_token_mask(causal=True)[0, 0]
    qb, kb = full.num_q_blocks, full.num_k_blocks
    expect = np.zeros((qb, kb), bool)
    for I in range(qb):
        for J in range(kb):
            expect[I, J] = t[I * bq:(I + 1) * bq, J * bk:(J + 1) * bk].any()
    np.testing.assert_array_equal(legal_blocks(sq, sk, bq, bk, True), expect)


def test_density_counts_only_legal_blocks():
    m = BlockMask.full(1, 2, q_len=64, k_len=64, block_q=16, block_k=16, causal=True)
    assert m.density(causal=True) == 1.0
    assert m.density(causal=False) == pytest.approx(10 / 16)
    assert m.density(causal=True, per_head=True).shape == (1, 2)


def test_union_intersection_and_geometry_errors():
    rng = np.random.default_rng(0)
    a, b = _mask(rng, 40, 40, 8, 8), _mask(rng, 40, 40, 8, 8)
    np.testing.assert_array_equal((a | b).mask, a.mask | b.mask)
    np.testing.assert_array_equal((a & b).mask, a.mask & b.mask)
    with pytest.raises(InputError, match="geometry"):
        a | _mask(rng, 40, 40, 8, 4)


def test_expand_heads_and_bsr():
    m = BlockMask(np.eye(3, dtype=bool)[None, None].repeat(2, 1), block_q=4, block_k=4, q_len=12,
                  k_len=12, head_kind="kv")
    e = m.expand_heads(4)
    assert e.head_kind == "q" and e.shape == (1, 4, 3, 3)
    indptr, indices = e.to_bsr()
    np.testing.assert_array_equal(indptr[0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(indices[0, 0], [0, 1, 2])


@pytest.mark.parametrize("kwargs,match", [
    ({"mask": np.ones((2, 2), bool), "block_q": 0, "block_k": 4, "q_len": 8, "k_len": 8}, "block_q"),
    ({"mask": np.ones((2, 3), bool), "block_q": 4, "block_k": 4, "q_len": 8, "k_len": 8}, "blocks"),
    ({"mask": np.ones((2, 2), float) * 0.5, "block_q": 4, "block_k": 4, "q_len": 8, "k_len": 8}, "boolean"),
    ({"mask": np.ones((2, 2), bool), "block_q": 4, "block_k": 4, "q_len": 8, "k_len": 8,
      "head_kind": "x"}, "head_kind"),
])
def test_constructor_errors(kwargs, match):
    mask = kwargs.pop("mask")
    with pytest.raises(InputError, match=match):
        BlockMask(mask, **kwargs)


def test_from_indices_rejects_bad_forms():
    with pytest.raises(InputError, match="repeats"):
        BlockMask.from_indices(np.array([[[2]]]), np.array([[[[1, 1]]]]), block_q=4, block_k=4, q_len=4, k_len=8)
    with pytest.raises(InputError, match="range"):
        BlockMask.from_indices(np.array([[[1]]]), np.array([[[[5, -1]]]]), block_q=4, block_k=4, q_len=4, k_len=8)
    with pytest.raises(InputError, match="ascending"):
        check_index_form(np.array([2]), np.array([[1, 0]]), 2, canonical=True)


def test_mask_is_immutable():
    m = BlockMask(np.ones((1, 1), bool), block_q=4, block_k=4, q_len=4, k_len=4)
    with pytest.raises(ValueError):
        m.mask[0, 0, 0, 0] = False
