import json

import numpy as np
import pytest
from conformance import load, vector_params
from kv_util import assert_same_keep, random_qkv

from refattn.core.errors import InputError
from refattn.kvcache import presses
from refattn.kvcache._common import apply_rope
from refattn.kvcache.presses import PressParams, press_keep, press_score

NAMES = {
    "KnormPress": "knorm",
    "KeyDiffPress": "keydiff",
    "StreamingLLMPress": "streaming_llm",
    "SnapKVPress": "snapkv",
    "TOVAPress": "tova",
    "ObservedAttentionPress": "observed_attention",
    "ExpectedAttentionPress": "expected_attention",
}


@pytest.mark.parametrize("path", vector_params("kvpress"))
def test_official_vectors(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    q, k, v = z["q"][None], z["k"][None], z["v"][None]
    # the vectors' pre-RoPE queries are what our inverse rotation recovers
    np.testing.assert_allclose(
        apply_rope(z["q"], -np.arange(q.shape[2]), p["rope_base"]), z["q_prerope"], atol=1e-4
    )
    for run in p["runs"]:
        prm = PressParams(press=NAMES[run["press"]], rope_base=p["rope_base"], **run["fields"])
        keep, s = press_keep(q, k, v, prm)
        ref = z["scores__" + run["name"]]
        np.testing.assert_allclose(
            s[0], ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(), err_msg=run["name"]
        )
        assert keep.counts.max() == run["n_kept"]
        # forced tokens (max + 1) tie with each other: compare orders only where scores differ
        assert_same_keep(keep.indices[0], z["kept__" + run["name"]].astype(np.int64), s[0])


def test_knorm_and_streaming_rules():
    q, k, v = random_qkv(21, L=32)
    keep, s = press_keep(q, k, v, PressParams(press="knorm", compression_ratio=0.25))
    assert keep.counts.tolist() == [[24, 24]] and keep.head_kind == "kv"
    norms = np.linalg.norm(k, axis=-1)
    for g in range(2):
        dropped = np.setdiff1d(np.arange(32), keep.kept(0, g))
        assert norms[0, g, keep.kept(0, g)].max() <= norms[0, g, dropped].min()
    keep, _ = press_keep(q, k, v, PressParams(press="streaming_llm", n_kept=10, n_sink=4))
    assert sorted(keep.kept(0, 0).tolist()) == [0, 1, 2, 3] + list(range(26, 32))


def test_ratio_zero_returns_the_cache_unchanged():
    """scorer_press.py: ``if self.compression_ratio == 0: return keys, values``."""
    q, k, v = random_qkv(5, L=20)
    keep, s = press_keep(q, k, v, PressParams(press="knorm"))
    for g in range(2):
        assert keep.kept(0, g).tolist() == list(range(20))      # position order, not by score
    assert not np.array_equal(np.argsort(-s[0, 0], kind="stable"), np.arange(20))
    keep, _ = press_keep(q, k, v, PressParams(press="knorm", n_kept=20))
    assert keep.kept(0, 0).tolist() != list(range(20))          # n_kept: score order


def test_tova_is_shared_and_last_token_forced():
    q, k, v = random_qkv(22, L=32)
    s = press_score(q, k, v, PressParams(press="tova"))
    np.testing.assert_allclose(s[:, 0], s[:, 1])
    assert s[0, 0, -1] == s.max() and np.isclose(s[0, 0, -1], s[0, 0, :-1].max() + 1)


def test_observed_attention_normalisation():
    q, k, v = random_qkv(23, L=16)
    s = press_score(q, k, v, PressParams(press="observed_attention"))
    assert np.isclose(s[0, :, -1], s[0, :, -1]).all() and (s > 0).all()
    # last key is seen by one query only: its score is that query's attention, group-averaged
    from refattn.kvcache._common import attention_probs

    A = attention_probs(q, k, scale=16**-0.5)
    np.testing.assert_allclose(s[0, :, -1], A[0, :, -1, -1].reshape(2, 2).mean(-1))


def test_random_is_seeded():
    q, k, v = random_qkv(24, L=16)
    a = press_score(q, k, v, PressParams(press="random", seed=3))
    assert np.array_equal(a, press_score(q, k, v, PressParams(press="random", seed=3)))
    assert not np.array_equal(a, press_score(q, k, v, PressParams(press="random", seed=4)))


def test_select_and_errors():
    q, k, v = random_qkv(25, L=32)
    sel = presses.select(q, k, v, PressParams(press="snapkv", window_size=8, compression_ratio=0.5))
    assert sel.extras["keepset"].counts.tolist() == [[16, 16]]
    assert sel.extras["token_mask"].shape == (1, 4)
    with pytest.raises(InputError, match="press"):
        PressParams(press="h2o").validate()
    with pytest.raises(InputError, match="compression_ratio"):
        PressParams(compression_ratio=1.0).validate()
    with pytest.raises(InputError, match="v"):
        press_score(q, k, None, PressParams(press="expected_attention"))
