"""HF ``rope_scaling`` in the KV-cache RoPE helpers (``refattn.kvcache._common.rope_inv_freq``)
and the methods that rotate (Block-Attention re-encoding, kvpress expected attention,
StreamingLLM ``pos_shift``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from kv_util import random_qkv

import refattn
from refattn.cli_options import _parse_value
from refattn.core.errors import InputError
from refattn.kernels.numba_kvcache_press import expected_attention_score_numba
from refattn.kvcache import run_kv, streamingllm
from refattn.kvcache._common import (
    apply_rope,
    rerotate,
    rope_cos_sin,
    rope_inv_freq,
    rotate_half,
)
from refattn.kvcache.block_attention import (
    BlockAttentionParams,
    local_positions,
    reencode_block_keys,
)
from refattn.kvcache.presses import PressParams, expected_attention_score, press_score
from refattn.kvcache.streamingllm import StreamingLLMParams, shifted_qk
from refattn.methods import get_method

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# every band (high / medium / low frequency) inside a head dim of 16 with base 10000
SMALL = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
         "high_freq_factor": 2.0, "original_max_position_embeddings": 64}


def _llama3_scalar(dim, base, factor, low, high, old):
    """Independent transliteration of transformers' ``_compute_llama3_parameters``, one
    frequency at a time with ``math`` (branches instead of ``where``)."""
    out = []
    for i in range(0, dim, 2):
        f = 1.0 / base ** (i / dim)
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            s = (old / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


# ----------------------------------------------------------------------- rope_inv_freq
@pytest.mark.parametrize("dim,base,sc", [(128, 500000.0, LLAMA31), (64, 500000.0, LLAMA31),
                                         (16, 10000.0, SMALL), (32, 10000.0, SMALL)])
def test_llama3_matches_transliteration(dim, base, sc):
    got = rope_inv_freq(dim, base, sc)
    want = _llama3_scalar(dim, base, sc["factor"], sc["low_freq_factor"],
                          sc["high_freq_factor"], sc["original_max_position_embeddings"])
    assert got.dtype == np.float64 and got.shape == (dim // 2,)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)


def test_llama3_bands():
    """High frequencies unchanged, low ones divided by ``factor``, medium ones strictly
    between (the smooth blend, monotone in the wavelength)."""
    for dim, base, sc in ((128, 500000.0, LLAMA31), (16, 10000.0, SMALL)):
        plain = rope_inv_freq(dim, base)
        got = rope_inv_freq(dim, base, sc)
        old, fac = sc["original_max_position_embeddings"], sc["factor"]
        wl = 2 * np.pi / plain
        hi = wl < old / sc["high_freq_factor"]
        lo = wl > old / sc["low_freq_factor"]
        med = ~hi & ~lo
        assert hi.any() and lo.any() and med.any()
        np.testing.assert_array_equal(got[hi], plain[hi])
        np.testing.assert_allclose(got[lo], plain[lo] / fac, rtol=1e-15)
        ratio = got[med] / plain[med]
        assert np.all((ratio > 1 / fac) & (ratio < 1)) and np.all(np.diff(ratio) < 0)
    # Llama 3.1 (head dim 128, rope_theta 500000): the known split of its 64 frequencies
    r = rope_inv_freq(128, 500000.0, LLAMA31) / rope_inv_freq(128, 500000.0)
    assert (r == 1).sum() == 29 and np.isclose(r, 1 / 8, rtol=1e-14).sum() == 29


def test_default_linear_and_aliases():
    plain = rope_inv_freq(32, 10000.0)
    np.testing.assert_array_equal(plain, 1.0 / 10000.0 ** (np.arange(0, 32, 2) / 32))
    np.testing.assert_array_equal(rope_inv_freq(32, 10000.0, {"rope_type": "default"}), plain)
    np.testing.assert_array_equal(rope_inv_freq(32, 10000.0, {"type": "linear", "factor": 4.0}),
                                  plain / 4.0)
    alias = dict(SMALL, type="llama3")
    del alias["rope_type"]
    both = dict(SMALL, type="llama3")
    ref = rope_inv_freq(16, 10000.0, SMALL)
    for sc in (alias, both, tuple(sorted(SMALL.items()))):   # the params' stored form too
        np.testing.assert_array_equal(rope_inv_freq(16, 10000.0, sc), ref)


@pytest.mark.parametrize("sc,match", [
    ({"rope_type": "yarn", "factor": 4.0}, "not supported.*default.*linear.*llama3"),
    ({"rope_type": "dynamic", "factor": 2.0}, "not supported"),
    ({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "not supported"),
    ({"factor": 8.0}, "missing 'rope_type'"),
    ({"rope_type": "llama3", "factor": 8.0}, "missing"),
    (dict(LLAMA31, rope_theta=500000.0), "unknown key.*rope_base"),
    (dict(LLAMA31, typo=1), "unknown key"),
    ({"rope_type": "linear", "factor": 0.0}, "factor"),
    ({"rope_type": "linear", "factor": "8"}, "factor must be a number"),
    ({"rope_type": "linear", "factor": True}, "factor must be a number"),
    ({"rope_type": "linear", "factor": float("inf")}, "finite"),
    (dict(LLAMA31, high_freq_factor=1.0), "high_freq_factor must be > low_freq_factor"),
    (dict(LLAMA31, type="linear"), "disagree"),
    ("llama3", "expected None or a dict"),
    (8.0, "expected None or a dict"),
])
def test_rejects(sc, match):
    with pytest.raises(InputError, match=match):
        rope_inv_freq(16, 10000.0, sc)
    for params in (BlockAttentionParams(block_sizes=(4,), rope_scaling=sc), PressParams(rope_scaling=sc),
                   StreamingLLMParams(rope_scaling=sc)):
        with pytest.raises(InputError, match="rope_scaling"):
            params.validate()


def test_rejects_bad_dim_and_base():
    with pytest.raises(InputError, match="even"):
        rope_inv_freq(7, 10000.0, LLAMA31)
    with pytest.raises(InputError, match="rope_base"):
        rope_inv_freq(8, 0.0, LLAMA31)


# --------------------------------------------------------------------- rotation helpers
def test_scaled_rope_is_a_rotation():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, 16))
    pos = np.arange(9) * 37 + 5
    for sc in (SMALL, LLAMA31, {"rope_type": "linear", "factor": 3.0}):
        y = apply_rope(x, pos, 10000.0, sc)
        np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                                   rtol=1e-13)
        np.testing.assert_allclose(apply_rope(y, -pos, 10000.0, sc), x, atol=1e-12)
        np.testing.assert_allclose(rerotate(y, pos, pos + 11, 10000.0, sc),
                                   apply_rope(x, pos + 11, 10000.0, sc), atol=1e-12)
        # relative position: <R(a) q, R(b) k> depends only on a - b
        q, k = x[0, 0], x[0, 1]
        d1 = apply_rope(q, 10, 10000.0, sc) @ apply_rope(k, 4, 10000.0, sc)
        d2 = apply_rope(q, 906, 10000.0, sc) @ apply_rope(k, 900, 10000.0, sc)
        assert abs(d1 - d2) < 1e-10
    # the tables use the scaled frequencies (and scaling changes them)
    cos, sin = rope_cos_sin(np.array([3, 100]), 16, 10000.0, SMALL)
    ang = np.array([3, 100])[:, None] * rope_inv_freq(16, 10000.0, SMALL)
    np.testing.assert_array_equal(cos, np.cos(np.concatenate([ang, ang], -1)))
    np.testing.assert_array_equal(sin, np.sin(np.concatenate([ang, ang], -1)))
    assert not np.allclose(apply_rope(x, pos, 10000.0, SMALL), apply_rope(x, pos))


# ------------------------------------------------------------------------ Block-Attention
def test_block_reencoding_with_scaling():
    """Re-encoding = un-rotate with the local tables, re-rotate with the global ones (the
    official server's two steps), both with the same scaled frequencies."""
    rng = np.random.default_rng(4)
    sizes = (40, 70, 25)
    L, D = sum(sizes), 16
    kp = rng.standard_normal((1, 2, L, D))
    loc, glob = local_positions(sizes), np.arange(L)
    c_l, s_l = rope_cos_sin(loc, D, 10000.0, SMALL)
    c_g, s_g = rope_cos_sin(glob, D, 10000.0, SMALL)
    k_local = kp * c_l + rotate_half(kp) * s_l
    unrot = k_local * c_l - rotate_half(k_local) * s_l
    want = unrot * c_g + rotate_half(unrot) * s_g
    np.testing.assert_allclose(unrot, kp, atol=1e-12)
    p = get_method("block_attention").make_params(block_sizes=sizes, rope_scaling=SMALL)
    got = reencode_block_keys(k_local, sizes, p.rope_base, p.rope_scaling)
    np.testing.assert_allclose(got, want, atol=1e-12)
    # plain RoPE would give other keys
    assert np.abs(reencode_block_keys(k_local, sizes) - want).max() > 1e-3


# ------------------------------------------------------------------- expected attention
def _exp_args(seed, sc, base=10000.0, cov=True):
    q, k, v = random_qkv(seed, Hq=4, Hkv=2, L=90, D=16)
    return (q, k, v, 128, 4, cov, True, 0.0, base, sc)


@pytest.mark.parametrize("sc,base", [(SMALL, 10000.0), (LLAMA31, 500000.0),
                                     ({"rope_type": "linear", "factor": 2.0}, 10000.0)])
@pytest.mark.parametrize("cov", [True, False])
def test_expected_attention_numba_matches_reference(sc, base, cov):
    args = _exp_args(5, sc, base, cov)
    ref = expected_attention_score(*args)
    got = expected_attention_score_numba(*args)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14)
    plain = expected_attention_score(*args[:-1])
    assert np.abs(plain - ref).max() > 1e-6 * np.abs(ref).max()   # scaling matters


def test_expected_attention_scaled_queries_unrotate():
    """Queries rotated with scaled RoPE: the reference un-rotates them with the same
    frequencies, so its score equals a direct computation from the pre-RoPE queries (mean,
    covariance, ``Rbar`` of the scaled tables)."""
    rng = np.random.default_rng(6)
    B, Hq, Hkv, L, D = 1, 2, 1, 60, 16
    qp = rng.standard_normal((B, Hq, L, D))
    k, v = rng.standard_normal((B, Hkv, L, D)), rng.standard_normal((B, Hkv, L, D))
    q = apply_rope(qp, np.arange(L), 10000.0, SMALL)
    a = expected_attention_score(q, k, v, 32, 2, True, True, 0.0, 10000.0, SMALL)
    qpre = qp[:, :, 2:]
    mu = qpre.mean(axis=2)
    c = qpre - mu[:, :, None]
    cov = np.einsum("bhni,bhnj->bhij", c, c) / c.shape[2]
    cs, sn = rope_cos_sin(np.arange(L, L + 32), D, 10000.0, SMALL)
    P = np.zeros((D, D))
    P[D // 2:, :D // 2], P[:D // 2, D // 2:] = np.eye(D // 2), -np.eye(D // 2)
    R = np.mean([np.diag(cs[i]) + P * sn[i][None, :] for i in range(32)], axis=0)
    kk = np.repeat(k[:, :, 2:], Hq, axis=1)
    z = (np.einsum("bhd,bhnd->bhn", mu @ R.T, kk) / np.sqrt(D)
         + np.einsum("bhni,bhij,bhnj->bhn", kk, R @ cov @ R.T, kk) / D / 2)
    z = np.exp(z - z.max(-1, keepdims=True))
    s = (z / z.sum(-1, keepdims=True)).mean(axis=1, keepdims=True)
    s = s * np.linalg.norm(v[:, :, 2:], axis=-1)
    np.testing.assert_allclose(a[..., 2:], s, rtol=1e-10)


def test_kernel_refuses_like_reference():
    args = _exp_args(7, {"rope_type": "yarn", "factor": 4.0})
    for fn in (expected_attention_score, expected_attention_score_numba):
        with pytest.raises(InputError, match="rope_scaling"):
            fn(*args)


def test_press_params_thread_scaling_to_both_backends():
    q, k, v = random_qkv(8, Hq=4, Hkv=2, L=80, D=16)
    p = PressParams(press="expected_attention", n_sink=2, n_future_positions=64,
                    rope_scaling=SMALL, compression_ratio=0.5)
    p.validate()
    want = expected_attention_score(q, k, v, 64, 2, True, True, 0.0, 10000.0, SMALL)
    for backend in ("numpy", "numba"):
        np.testing.assert_allclose(press_score(q, k, v, p, backend=backend), want, rtol=1e-10)
    a = refattn.select(q, k, "kvpress", v=v, backend="numpy", press="expected_attention",
                       n_sink=2, n_future_positions=64, rope_scaling=SMALL, compression_ratio=0.5)
    b = refattn.select(q, k, "kvpress", v=v, backend="numba", press="expected_attention",
                       n_sink=2, n_future_positions=64, rope_scaling=SMALL, compression_ratio=0.5)
    for h in range(2):
        assert set(a.extras["keepset"].kept(0, h).tolist()) == set(
            b.extras["keepset"].kept(0, h).tolist())


# ---------------------------------------------------------------------------- StreamingLLM
def test_pos_shift_with_scaling():
    rng = np.random.default_rng(9)
    B, Hq, Hkv, L, D = 1, 2, 1, 120, 16
    qp, kp = rng.standard_normal((B, Hq, L, D)), rng.standard_normal((B, Hkv, L, D))
    q, k = apply_rope(qp, np.arange(L), 10000.0, SMALL), apply_rope(kp, np.arange(L), 10000.0, SMALL)
    kept = np.r_[0:4, 90:120]
    q2, k2 = shifted_qk(q[:, :, -1:], np.array([L - 1]), k, kept, 10000.0, SMALL)
    np.testing.assert_allclose(k2, apply_rope(kp[:, :, kept], np.arange(kept.size), 10000.0, SMALL),
                               atol=1e-12)
    np.testing.assert_allclose(q2, apply_rope(qp[:, :, -1:], [kept.size - 1], 10000.0, SMALL),
                               atol=1e-12)
    v = rng.standard_normal((B, Hkv, L, D))
    sel = streamingllm.select(q, k, v, StreamingLLMParams(start_size=4, recent_size=30,
                                                          rope_scaling=SMALL))
    np.testing.assert_allclose(sel.extras["shifted_k"], k2, atol=1e-12)


def test_run_kv_threads_scaling():
    rng = np.random.default_rng(10)
    L, T = 100, 4
    q, k, v = (rng.standard_normal((1, 2, L + T, 16)), rng.standard_normal((1, 1, L + T, 16)),
               rng.standard_normal((1, 1, L + T, 16)))
    pre = (q[:, :, :L], k[:, :, :L], v[:, :, :L])
    dec = {"q": q[:, :, L:], "k": k[:, :, L:], "v": v[:, :, L:]}
    base = run_kv("streamingllm", *pre, 20, dec, start_size=4)
    same = run_kv("streamingllm", *pre, 20, dec, start_size=4,
                  rope_scaling={"rope_type": "linear", "factor": 1.0})
    scaled = run_kv("streamingllm", *pre, 20, dec, start_size=4, rope_scaling=SMALL)
    assert [r["out_err_rel"] for r in same["rows"]] == [r["out_err_rel"] for r in base["rows"]]
    assert abs(scaled["rows"][-1]["out_err_rel"] - base["rows"][-1]["out_err_rel"]) > 1e-6


# ------------------------------------------------------------------------------ params
def test_params_store_scaling_frozen_and_cli_json():
    text = ('{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, '
            '"high_freq_factor": 4.0, "original_max_position_embeddings": 8192}')
    sc = _parse_value(text)
    assert sc == LLAMA31
    for name in ("block_attention", "kvpress", "streamingllm"):
        extra = {"block_sizes": (3, 4)} if name == "block_attention" else {}
        p = get_method(name).make_params(rope_scaling=sc, **extra)
        assert p.rope_scaling == tuple(sorted(LLAMA31.items()))
        hash(p)                               # frozen and hashable
        assert get_method(name).make_params(**extra).rope_scaling is None
        np.testing.assert_array_equal(rope_inv_freq(128, 500000.0, p.rope_scaling),
                                      rope_inv_freq(128, 500000.0, LLAMA31))
    with pytest.raises(InputError, match="rope_scaling"):
        get_method("kvpress").make_params(rope_scaling={"rope_type": "yarn", "factor": 2.0})
