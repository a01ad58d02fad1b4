"""The reference attention against an independent naive implementation and finite
differences."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn.core import BlockMask
from refattn.reference.attention import attention_backward, attention_forward
from refattn.testing import AWKWARD_SHAPES, random_block_mask, random_qkv, structured_qkv


def naive(q, k, v, token_mask=None, causal=False, scale=None):
    """Independent, unchunked float64 attention with explicit loops over heads."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(D) if scale is None else scale
    out = np.zeros((B, Hq, Sq, v.shape[-1]))
    lse = np.full((B, Hq, Sq), -np.inf)
    for b in range(B):
        for h in range(Hq):
            g = h * Hkv // Hq
            s = q[b, h].astype(np.float64) @ k[b, g].astype(np.float64).T * scale
            allow = np.ones((Sq, Sk), bool)
            if token_mask is not None:
                allow &= token_mask[b if token_mask.shape[0] > 1 else 0, h if token_mask.shape[1] > 1 else 0]
            if causal:
                for i in range(Sq):
                    for j in range(Sk):
                        if j > i + Sk - Sq:
                            allow[i, j] = False
            for i in range(Sq):
                row = s[i][allow[i]]
                if row.size == 0:
                    continue
                mx = row.max()
                e = np.exp(s[i] - mx) * allow[i]
                out[b, h, i] = e @ v[b, g].astype(np.float64) / e.sum()
                lse[b, h, i] = mx + np.log(e.sum())
    return out, lse


@pytest.mark.parametrize("sq,sk", AWKWARD_SHAPES[:6])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_matches_naive(sq, sk, causal):
    rng = np.random.default_rng(sq * 1000 + sk)
    q, k, v = random_qkv(rng, 1, 4, 2, sq, sk, 16)
    o, l = refattn.attention(q, k, v, causal=causal, return_lse=True)
    no, nl = naive(q, k, v, causal=causal)
    np.testing.assert_allclose(o, no, atol=1e-12)
    np.testing.assert_array_equal(np.isinf(l), np.isinf(nl))
    np.testing.assert_allclose(l[np.isfinite(l)], nl[np.isfinite(nl)], atol=1e-12)
    assert not np.isnan(o).any()


def test_empty_rows_give_zero_and_minus_inf():
    rng = np.random.default_rng(0)
    q, k, v = random_qkv(rng, 1, 2, 1, 10, 4, 8)
    o, l = refattn.attention(q, k, v, causal=True, return_lse=True)   # Sq > Sk: rows 0..5 see nothing
    assert (o[:, :, :6] == 0).all() and np.isneginf(l[:, :, :6]).all()
    assert np.isfinite(l[:, :, 6:]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_full_mask_equals_dense(causal):
    rng = np.random.default_rng(1)
    q, k, v = structured_qkv(rng, 2, 4, 2, 113, 203, 32)
    full = BlockMask.full(2, 4, q_len=113, k_len=203, block_q=32, block_k=64)
    a = refattn.attention(q, k, v, causal=causal)
    b = refattn.attention(q, k, v, mask=full, causal=causal)
    np.testing.assert_array_equal(a, b)


@given(sq=st.integers(1, 70), sk=st.integers(1, 70), bq=st.sampled_from([1, 4, 16, 64]),
       bk=st.sampled_from([1, 8, 16, 64]), causal=st.booleans(), gqa=st.sampled_from([(2, 2), (4, 1), (4, 2)]),
       seed=st.integers(0, 2**16))
def test_block_sparse_equals_token_masked_dense(sq, sk, bq, bk, causal, gqa, seed):
    rng = np.random.default_rng(seed)
    hq, hkv = gqa
    q, k, v = random_qkv(rng, 2, hq, hkv, sq, sk, 8)
    m = random_block_mask(rng, 2, hq, sq, sk, bq, bk, 0.5, causal=causal)
    o, l = refattn.attention(q, k, v, mask=m, causal=causal, return_lse=True)
    no, nl = naive(q, k, v, token_mask=m.to_token_mask(), causal=causal)
    np.testing.assert_allclose(o, no, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(l), np.isneginf(nl))
    assert not np.isnan(o).any()


def test_kv_head_mask_is_expanded_over_groups():
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, 1, 4, 2, 40, 40, 8)
    mk = random_block_mask(rng, 1, 2, 40, 40, 8, 8, 0.5, head_kind="kv")
    mq = BlockMask(np.repeat(mk.mask, 2, axis=1), block_q=8, block_k=8, q_len=40, k_len=40)
    np.testing.assert_array_equal(refattn.attention(q, k, v, mask=mk), refattn.attention(q, k, v, mask=mq))


@pytest.mark.parametrize("layout", ["bshd", "hsd"])
def test_layouts_round_trip(layout):
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 1, 4, 2, 20, 30, 8)
    ref, lse = refattn.attention(q, k, v, causal=True, return_lse=True)
    if layout == "bshd":
        t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        o, l = refattn.attention(t(q), t(k), t(v), causal=True, layout="bshd", return_lse=True)
        np.testing.assert_allclose(t(o), ref, atol=1e-14)
        np.testing.assert_allclose(l, lse)
    else:
        o, l = refattn.attention(q[0], k[0], v[0], causal=True, layout="hsd", return_lse=True)
        np.testing.assert_allclose(o, ref[0], atol=1e-14)
        np.testing.assert_allclose(l, lse[0])


def _loss(q, k, v, w, mask, causal):
    o, _ = attention_forward(q, k, v, mask, causal)
    return float((o * w).sum())


@pytest.mark.parametrize("causal,with_mask", [(False, False), (True, False), (True, True)])
def test_backward_matches_finite_differences(causal, with_mask):
    rng = np.random.default_rng(4)
    q, k, v = (x.astype(np.float64) for x in random_qkv(rng, 1, 4, 2, 9, 13, 4, v_dim=3))
    mask = random_block_mask(rng, 1, 4, 9, 13, 4, 4, 0.6, causal=causal) if with_mask else None
    o, lse = attention_forward(q, k, v, mask, causal)
    w = rng.standard_normal(o.shape)
    dq, dk, dv = attention_backward(q, k, v, o, w, lse, mask, causal)
    eps = 1e-6
    for x, g in ((q, dq), (k, dk), (v, dv)):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + eps
            fp = _loss(q, k, v, w, mask, causal)
            x[idx] = old - eps
            fm = _loss(q, k, v, w, mask, causal)
            x[idx] = old
            num[idx] = (fp - fm) / (2 * eps)
        np.testing.assert_allclose(g, num, atol=1e-7, rtol=1e-6)


def test_backward_public_api_layouts_and_empty_rows():
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 1, 2, 1, 10, 4, 8)
    o, l = refattn.attention(q, k, v, causal=True, return_lse=True)
    dq, dk, dv = refattn.attention_backward(q, k, v, o, np.ones_like(o), l, causal=True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert not np.isnan(dq).any() and (dq[:, :, :6] == 0).all()


def test_memory_limit_refuses_clearly():
    rng = np.random.default_rng(6)
    q, k, v = random_qkv(rng, 1, 2, 1, 64, 4096, 8)
    refattn.set_memory_limit(1 << 16)
    try:
        with pytest.raises(refattn.MemoryLimitError, match="memory limit"):
            refattn.attention(q, k, v)
    finally:
        refattn.set_memory_limit(None)


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(rng, 1, 2, 1, 300, 300, 8)
    full = refattn.attention(q, k, v, causal=True)
    refattn.set_memory_limit(300 * 8 * 2 * 8 * 2 + 8 * 300 * 16 + 40 * 2 * 300 * 7)
    try:
        chunked = refattn.attention(q, k, v, causal=True)
    finally:
        refattn.set_memory_limit(None)
    np.testing.assert_allclose(chunked, full, atol=1e-15)
