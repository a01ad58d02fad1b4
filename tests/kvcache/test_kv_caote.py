import numpy as np
import pytest
from kv_util import random_qkv

from refattn.core.errors import InputError
from refattn.kvcache import caote
from refattn.kvcache._common import attention_probs
from refattn.kvcache.caote import CAOTEParams, caote_score


def test_closed_form_equals_eviction_error():
    """For one query, c_j is exactly ||o - o_without_j|| (the paper's derivation)."""
    q, k, v = random_qkv(31, Hq=2, Hkv=1, L=20)
    qt = q[:, :, -1:]
    alpha = attention_probs(qt, k, scale=16**-0.5)[:, :, 0]
    c = caote_score(alpha, v)
    vv = np.repeat(v, 2, axis=1)
    o = np.einsum("bhn,bhnd->bhd", alpha, vv)
    for j in range(20):
        keep = np.ones(20, bool)
        keep[j] = False
        a2 = attention_probs(qt, k, scale=16**-0.5, key_mask=np.broadcast_to(keep, (1, 2, 20)))[
            :, :, 0
        ]
        o2 = np.einsum("bhn,bhnd->bhd", a2, vv)
        np.testing.assert_allclose(c[..., j], np.linalg.norm(o - o2, axis=-1), rtol=1e-9)


def test_fast_uses_value_mean_and_normalises_alpha():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((1, 1, 6, 4))
    raw = rng.random((1, 1, 6)) * 5
    a = raw / raw.sum()
    c = caote_score(raw, v, fast=True)
    ref = a / (1 - a) * np.linalg.norm(v.mean(2, keepdims=True) - v, axis=-1)[:, :, :]
    np.testing.assert_allclose(c, ref)
    assert np.isinf(caote_score(np.array([[[0.0, 1.0]]]), v[:, :, :2])[0, 0, 1])
    with pytest.raises(InputError, match="alpha"):
        caote_score(-raw, v)


def test_select_keeps_largest_errors():
    q, k, v = random_qkv(32, L=40)
    sel = caote.select(q, k, v, CAOTEParams(n_kept=10))
    ks = sel.extras["keepset"]
    s = sel.scores.scores[:, :, 0]
    for h in range(4):
        dropped = np.setdiff1d(np.arange(40), ks.kept(0, h))
        assert s[0, h, ks.kept(0, h)].min() >= s[0, h, dropped].max()
    with pytest.raises(InputError, match="base"):
        CAOTEParams(base="tova").validate()
