"""refattn.attention runs a Selection the way its method computes attention."""
from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.data import synthetic
from refattn.video import pisa, psa

GRID = (4, 16, 16)


@pytest.fixture(scope="module")
def qkv():
    return synthetic(1, 2, 2, 4 * 16 * 16, 32, seed=0)


def test_psa_selection_runs_pyramid_attention(qkv):
    q, k, v = qkv
    sel = refattn.select(q, k, "psa", v=v, causal=False, grid=GRID)
    out = refattn.attention(q, k, v, mask=sel)
    assert np.abs(out).max() > 0
    np.testing.assert_array_equal(out, psa.attention(q, k, v, sel))
    # not the plain block-sparse attention of its block mask
    assert not np.allclose(out, refattn.attention(q, k, v, mask=sel.mask))


def test_pisa_selection_runs_piecewise_attention_and_refuses_causal(qkv):
    q, k, v = qkv
    sel = refattn.select(q, k, "pisa", v=v, causal=False, grid=GRID)
    np.testing.assert_array_equal(refattn.attention(q, k, v, mask=sel), pisa.attention(q, k, v, sel))
    with pytest.raises(refattn.InputError, match="not causal"):
        refattn.attention(q, k, v, mask=sel, causal=True)


def test_token_mask_selection_runs_exact_token_pattern():
    q, k, v = synthetic(1, 2, 1, 300, 32, seed=1)
    sel = refattn.select(q, k, "minference", v=v, vertical_size=20, slash_size=30,
                         granularity="token")
    tm = sel.extras["token_mask"].to_token_mask(causal=True)
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    # against dense attention restricted to the exact token pattern
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), np.repeat(k, 2, 1).astype(np.float64)) / np.sqrt(32)
    s = np.where(tm, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, p @ np.repeat(v, 2, 1).astype(np.float64), atol=1e-12)
