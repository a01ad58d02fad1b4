from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn.core import InputError, apply_permutation, invert_permutation, unpermute
from refattn.core.layout import normalize_qkv


@given(seed=st.integers(0, 2**16), s=st.integers(1, 40), per_head=st.booleans())
def test_permutation_round_trip_exact(seed, s, per_head):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, s, 4)).astype(np.float32)
    perm = (np.stack([[rng.permutation(s) for _ in range(3)] for _ in range(2)]) if per_head
            else rng.permutation(s))
    y = apply_permutation(x, perm)
    assert np.array_equal(unpermute(y, perm), x)
    inv = invert_permutation(perm)
    assert np.array_equal(np.take_along_axis(np.broadcast_to(perm, inv.shape), inv, -1),
                          np.broadcast_to(np.arange(s), inv.shape))


def test_permuted_attention_round_trip():
    """Attention is equivariant: permuting queries permutes outputs; permuting k and v together
    changes nothing (non-causal)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 30, 8)) for _ in range(3))
    p = rng.permutation(30)
    base = refattn.attention(q, k, v)
    np.testing.assert_allclose(unpermute(refattn.attention(apply_permutation(q, p), k, v), p), base, atol=1e-14)
    np.testing.assert_allclose(refattn.attention(q, apply_permutation(k, p), apply_permutation(v, p)), base, atol=1e-14)


def test_permutation_errors():
    with pytest.raises(InputError, match="not a permutation"):
        apply_permutation(np.zeros((1, 3, 2)), np.array([0, 0, 1]))
    with pytest.raises(InputError, match="length"):
        apply_permutation(np.zeros((1, 3, 2)), np.array([0, 1]))


Q = np.zeros((1, 4, 8, 16), np.float32)
K = np.zeros((1, 2, 8, 16), np.float32)


@pytest.mark.parametrize("args,kwargs,match", [
    ((Q[0], K, K), {}, "layout 'bhsd' needs a 4-d"),
    ((Q, K, K), {"layout": "sbhd"}, "layout: expected one of"),
    ((Q, np.zeros((1, 3, 8, 16), np.float32), np.zeros((1, 3, 8, 16), np.float32)), {}, "GQA"),
    ((Q, np.zeros((1, 2, 8, 8), np.float32), K), {}, "head dim"),
    ((Q, K, np.zeros((1, 2, 7, 16), np.float32)), {}, "v: shape"),
    ((Q.astype(np.int32), K, K), {}, "float dtype"),
    ((np.zeros((1, 4, 0, 16), np.float32), K, K), {}, "empty sequence"),
    ((np.full((1, 4, 8, 16), np.nan, np.float32), K, K), {}, "q: contains NaN"),
    ((Q, np.full((1, 2, 8, 16), np.inf, np.float32), K), {}, "k: contains NaN or Inf"),
    ((Q, np.zeros((2, 2, 8, 16), np.float32), K), {}, "batch"),
])
def test_bad_inputs_raise_clear_errors(args, kwargs, match):
    with pytest.raises(InputError, match=match):
        normalize_qkv(*args, **kwargs)
    with pytest.raises(InputError, match=match):
        refattn.attention(*args, **kwargs)


def test_bad_scale_backend_and_mask():
    with pytest.raises(InputError, match="softmax_scale"):
        refattn.attention(Q, K, K, softmax_scale=-1.0)
    with pytest.raises(InputError, match="backend"):
        refattn.attention(Q, K, K, backend="tpu")
    m = refattn.BlockMask(np.ones((1, 1), bool), block_q=16, block_k=16, q_len=16, k_len=16)
    with pytest.raises(InputError, match="q_len, k_len"):
        refattn.attention(Q, K, K, mask=m)
    with pytest.raises(InputError, match="BlockMask"):
        refattn.attention(Q, K, K, mask=np.ones((1, 1), bool))


def test_bf16_and_fp16_inputs_are_accepted():
    import ml_dtypes

    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 5, 8))
    qb = q.astype(ml_dtypes.bfloat16)
    o = refattn.attention(qb, qb, qb)
    np.testing.assert_allclose(o, refattn.attention(qb.astype(np.float64), qb.astype(np.float64),
                                                    qb.astype(np.float64)))
    assert refattn.attention(q.astype(np.float16), q.astype(np.float16), q.astype(np.float16)).dtype == np.float64
