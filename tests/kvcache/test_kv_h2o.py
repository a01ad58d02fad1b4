import json

import numpy as np
import pytest
from conformance import load, vector_params
from kv_util import random_qkv

from refattn.core.errors import InputError
from refattn.kvcache import h2o
from refattn.kvcache._common import attention_probs
from refattn.kvcache.h2o import H2OParams, MaskSimCache, RealDropCache, single_forward_mask

LAYERWISE = [
    p for p in vector_params("h2o") if p.values[0] is None or "layerwise" in p.values[0].name
]
MASKING = [p for p in vector_params("h2o") if p.values[0] is None or "masking" in p.values[0].name]


@pytest.mark.parametrize("path", LAYERWISE)
def test_real_drop_official(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    L0, H = p["prefill_len"], z["q"].shape[0]
    q, k = z["q"][None], z["k"][None]
    P = attention_probs(q[:, :, :L0], k[:, :, :L0], scale=q.shape[-1] ** -0.5)
    np.testing.assert_allclose(P[0], z["prefill_attn"], atol=1e-6)
    cache = RealDropCache(p["hh_size"], p["recent_size"])
    cache.update(P, np.arange(L0))
    for t in range(p["decode_steps"] + 1):
        n = z["kept_len"][t]
        np.testing.assert_array_equal(cache.positions[0], z["kept_positions"][t][:, :n])
        np.testing.assert_allclose(cache.scores[0], z["hh_score"][t][:, :n], rtol=2e-6, atol=1e-5)
        if t == p["decode_steps"]:
            break
        m, pos = z["decode_len"][t], L0 + t
        cols = z["decode_cols"][t][:, :m]
        np.testing.assert_array_equal(cols[:, :-1], cache.positions[0])
        # our attention of the new token over the kept cache reproduces the given row
        mine = attention_probs(
            q[:, :, pos : pos + 1],
            k[:, :, : pos + 1],
            scale=q.shape[-1] ** -0.5,
            key_mask=RealDropCache.allowed(cache, pos + 1) | (np.arange(pos + 1) == pos),
        )
        np.testing.assert_allclose(
            np.take_along_axis(mine[0, :, 0], cols, -1), z["decode_attn"][t][:, :m], atol=1e-6
        )
        cache.update(z["decode_attn"][t][None, :, None, :m].astype(np.float64), np.array([pos]))
    assert H == cache.positions.shape[1]


@pytest.mark.parametrize("path", MASKING)
def test_mask_sim_official(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    L0 = p["prefill_len"]
    q, k = z["q"][None], z["k"][None]
    cache = MaskSimCache(p["heavy_ratio"], p["recent_ratio"])
    cache.update(attention_probs(q[:, :, :L0], k[:, :, :L0], scale=q.shape[-1] ** -0.5))
    assert (cache.heavy, cache.recent) == (p["heavy_budget"], p["recent_budget"])
    for t in range(p["decode_steps"] + 1):
        L = L0 + t
        np.testing.assert_array_equal(cache.mask_next[0], z["mask_next"][t][:, : L + 1])
        np.testing.assert_allclose(cache.scores[0], z["scores"][t][:, :L], rtol=1e-5, atol=2e-5)
        if t == p["decode_steps"]:
            break
        mine = attention_probs(
            q[:, :, L : L + 1],
            k[:, :, : L + 1],
            scale=q.shape[-1] ** -0.5,
            key_mask=cache.allowed(L + 1),
        )
        np.testing.assert_allclose(mine[0, :, 0], z["decode_attn"][t][:, : L + 1], atol=1e-6)
        cache.update(z["decode_attn"][t][None, :, None, : L + 1].astype(np.float64))
    # the official off-by-one: position L - recent is neither recent nor a heavy candidate
    assert cache.mask_next[0].sum(-1).max() == p["heavy_budget"] + p["recent_budget"]


def test_real_drop_rule_on_random_inputs():
    q, k, v = random_qkv(7, L=50)
    sel = h2o.select(q, k, v, H2OParams(hh_size=6, recent_size=10))
    ks = sel.extras["keepset"]
    acc = h2o.h2o_score(q, k)
    for h in range(4):
        kept = ks.kept(0, h)
        assert kept.size == 16 and (np.diff(kept) > 0).all()
        assert (kept[-10:] == np.arange(40, 50)).all()
        heavy, rest = kept[:6], np.setdiff1d(np.arange(40), kept[:6])
        assert acc[0, h, heavy].min() >= acc[0, h, rest].max()


def test_single_forward_mask_properties():
    q, k, v = random_qkv(8, L=40)
    m = single_forward_mask(q, k, 0.2, 0.1)  # heavy 8, recent 4
    i, j = np.indices((40, 40))
    assert not (m & (j > i)).any()  # causal
    assert (m | ~((j >= i - 4) & (j <= i))).all()  # band always on
    assert (m[..., :8, :8] | (j[:8, :8] > i[:8, :8])).all()
    # after the first heavy rows: at most heavy - 1 heavy hitters + the token + the band
    assert m[..., 8:, :].sum(-1).max() <= 7 + 1 + 4
    sel = h2o.select(
        q, k, v, H2OParams(variant="single_forward", heavy_ratio=0.2, recent_ratio=0.1)
    )
    assert sel.extras["keepset"] is None and np.array_equal(sel.extras["token_mask"].mask, m)


def test_bad_params():
    with pytest.raises(InputError, match="variant"):
        H2OParams(variant="oracle").validate()
    with pytest.raises(InputError, match="hh_size"):
        H2OParams(hh_size=-1).validate()
