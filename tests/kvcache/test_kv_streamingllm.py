import json

import numpy as np
import pytest
from conformance import load, vector_params

from refattn.core.errors import InputError
from refattn.kvcache import streamingllm
from refattn.kvcache._common import apply_rope, rerotate
from refattn.kvcache.streamingllm import (
    StartRecentCache,
    StreamingLLMParams,
    shifted_attention,
    shifted_qk,
)


def _vectors(prefix):
    return [
        p
        for p in vector_params("streamingllm")
        if p.values[0] is None or p.values[0].name.startswith(prefix)
    ]


@pytest.mark.parametrize("path", _vectors("call_per_token"))
def test_call_per_token(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    c = StartRecentCache(p["start_size"], p["recent_size"])
    for t in range(p["n_tokens"]):
        c.append([t])
        c()
        np.testing.assert_array_equal(c.positions, z["kept_positions"][t][: z["kept_len"][t]])


@pytest.mark.parametrize("path", _vectors("evict_for_space"))
def test_evict_for_space(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    c, pos = StartRecentCache(p["start_size"], p["recent_size"]), 0
    for i, n in enumerate(z["prompt_len"]):
        before = z["cache_before"][i]
        np.testing.assert_array_equal(c.positions, before[before >= 0])
        c.evict_for_space(int(n) + p["max_gen_len"])
        np.testing.assert_array_equal(
            c.positions, z["kept_after_evict"][i][: z["kept_len_after_evict"][i]]
        )
        c.append(np.arange(pos, pos + n + p["max_gen_len"]))
        pos += n + p["max_gen_len"]
        assert c.positions.size == z["len_after_append"][i]


@pytest.mark.parametrize("path", _vectors("evict_range"))
def test_evict_range(path):
    z = load(path)
    for (a, b), ref in zip(z["ranges"], z["kept_positions"], strict=True):
        c = StartRecentCache(4, 64)
        c.append(np.arange(30))
        c.evict_range(int(a), int(b))
        np.testing.assert_array_equal(c.positions, ref[ref >= 0])
    with pytest.raises(InputError, match="evict_range"):
        c.evict_range(5, 2)


def test_rope_helpers_invert_and_compose():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 8))
    pos = np.arange(7) * 3
    y = apply_rope(x, pos)
    np.testing.assert_allclose(apply_rope(y, -pos), x, atol=1e-12)
    np.testing.assert_allclose(rerotate(y, pos, pos + 5), apply_rope(x, pos + 5), atol=1e-12)
    # relative position: <R(a) q, R(b) k> depends only on a - b
    q, k = x[0, 0], x[0, 1]
    d1 = apply_rope(q, 10) @ apply_rope(k, 4)
    d2 = apply_rope(q, 106) @ apply_rope(k, 100)
    assert abs(d1 - d2) < 1e-10


def test_pos_shift_equals_attention_at_cache_positions():
    """Re-encoded attention = attention of pre-RoPE q/k rotated to their cache indices."""
    rng = np.random.default_rng(1)
    B, Hq, Hkv, L, D = 1, 2, 1, 30, 8
    qp, kp, v = (
        rng.standard_normal((B, Hq, L, D)),
        rng.standard_normal((B, Hkv, L, D)),
        rng.standard_normal((B, Hkv, L, D)),
    )
    q, k = apply_rope(qp, np.arange(L)), apply_rope(kp, np.arange(L))
    kept = np.array([0, 1, 2, 3, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29])
    q2, k2 = shifted_qk(q[:, :, -1:], np.array([29]), k, kept)
    np.testing.assert_allclose(k2, apply_rope(kp[:, :, kept], np.arange(kept.size)), atol=1e-12)
    np.testing.assert_allclose(q2, apply_rope(qp[:, :, -1:], [kept.size - 1]), atol=1e-12)
    out, p = shifted_attention(q[:, :, -1:], np.array([29]), k, v, kept)
    assert p.shape == (1, 2, 1, kept.size) and np.allclose(p.sum(-1), 1)
    with pytest.raises(InputError, match="own token"):
        shifted_qk(q[:, :, 10:11], np.array([10]), k, kept)


def test_select():
    rng = np.random.default_rng(2)
    q, k, v = (
        rng.standard_normal((1, 4, 40, 8)),
        rng.standard_normal((1, 2, 40, 8)),
        rng.standard_normal((1, 2, 40, 8)),
    )
    sel = streamingllm.select(q, k, v, StreamingLLMParams(start_size=2, recent_size=10))
    ks = sel.extras["keepset"]
    assert ks.head_kind == "kv" and ks.kept(0, 1).tolist() == [0, 1] + list(range(30, 40))
    assert sel.extras["shifted_k"].shape == (1, 2, 12, 8)
    assert sel.extras["token_mask"].shape == (1, 4)
    with pytest.raises(InputError, match="rope_base"):
        StreamingLLMParams(rope_base=0).validate()
