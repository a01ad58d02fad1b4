import json

import numpy as np
import pytest
from conformance import load, vector_params
from kv_util import random_qkv

from refattn.core.errors import InputError
from refattn.kvcache import vatp
from refattn.kvcache._common import attention_probs
from refattn.kvcache.h2o import SINK_SCORE
from refattn.kvcache.vatp import VATPParams, value_l1norm, vatp_score


@pytest.mark.parametrize("path", vector_params("vatp"))
def test_official_vectors(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    L0, H = p["prefill_len"], z["q"].shape[0]
    q, k, v = z["q"][None], z["k"][None], z["v"][None]
    prm = VATPParams(
        mode="h2o" if p["h2o"] else "scissorhands",
        heavy_ratio=p["heavy_ratio"],
        sink_len=p["sink_len"],
        apply_value=p["applyval"],
    )
    vn = value_l1norm(v, H)
    np.testing.assert_allclose(vn[0], z["value_l1norm"], rtol=1e-6)
    cache = prm.cache()
    cache.update(
        attention_probs(q[:, :, :L0], k[:, :, :L0], scale=q.shape[-1] ** -0.5), vn[..., :L0]
    )
    assert (cache.heavy, cache.recent) == (p["heavy_budget"], p["recent_budget"])
    for t in range(p["decode_steps"] + 1):
        L = L0 + t
        np.testing.assert_array_equal(cache.mask_next[0], z["mask_next"][t][:, : L + 1])
        ref = z["scores"][t][:, :L]
        finite = ref < np.finfo(np.float32).max / 2  # official sinks hold finfo.max
        np.testing.assert_allclose(cache.scores[0][finite], ref[finite], rtol=1e-5, atol=1e-5)
        assert (cache.scores[0][~finite] >= SINK_SCORE).all()
        if t == p["decode_steps"]:
            break
        cache.update(
            z["decode_attn"][t][None, :, None, : L + 1].astype(np.float64), vn[..., : L + 1]
        )
    # VATP quirk: one more recent token than H2O stays visible
    assert cache.mask_next[0].sum(-1).max() == p["heavy_budget"] + p["recent_budget"] + 1


def test_score_is_attention_times_value_norm():
    q, k, v = random_qkv(11, L=32)
    s = vatp_score(q, k, v, "h2o", sink_len=2)
    acc = attention_probs(q, k, scale=q.shape[-1] ** -0.5).sum(-2)
    np.testing.assert_allclose(s[..., 2:], (acc * value_l1norm(v, 4))[..., 2:])
    assert (s[..., :2] == SINK_SCORE).all()
    sc = vatp_score(q, k, v, "scissorhands", sink_len=0)
    np.testing.assert_allclose(sc, acc / 400 * value_l1norm(v, 4))  # all 32 rows, still / 400


def test_select_keeps_sinks_and_budget():
    q, k, v = random_qkv(12, L=64)
    sel = vatp.select(q, k, v, VATPParams(mode="h2o", heavy_ratio=0.125, sink_len=4))
    ks = sel.extras["keepset"]
    assert ks.key_mask()[..., :4].all()
    # heavy 8 + the 7 recent prompt tokens (the 8th recent slot is the incoming token)
    # + position L - 8, re-allowed by the un-cloned mask (official quirk)
    assert (ks.counts == 8 + 7 + 1).all()
    with pytest.raises(InputError, match="v"):
        vatp.select(q, k, None, VATPParams())
    with pytest.raises(InputError, match="mode"):
        VATPParams(mode="x").validate()
