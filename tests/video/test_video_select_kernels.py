"""Numba kernels of PSA's and PISA's selection scores (refattn/kernels/numba_video_select.py).

The registry suite (tests/test_registry.py) checks each kernel against its reference op on
the cases of refattn/cases/video_select.py. Here: the methods' selections with
``backend="numba"`` equal ``backend="numpy"`` on structured video inputs (levels, masks,
caps, official new-format masks), the in-kernel dtype rounding is bit-exact against
ml_dtypes/NumPy, ``out=`` handling, and errors.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import refattn
from refattn.check import compare_masks
from refattn.core.errors import InputError
from refattn.core.registry import dispatch
from refattn.data.video import synthetic_video
from refattn.video import pisa, psa

numba_select = pytest.importorskip("refattn.kernels.numba_video_select")

GRID = (6, 16, 16)


def _same_selection(a, b) -> None:
    assert compare_masks(a, b.mask).ok
    assert np.array_equal(a.mask.mask, b.mask.mask)
    np.testing.assert_allclose(b.scores.scores, a.scores.scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.isnan(a.boundary), np.isnan(b.boundary))


@pytest.mark.parametrize("label,video,params", [
    ("topk_defaults", dict(heads=3), dict(grid=GRID)),
    ("thresholdbound_gilbert_text_sim", dict(heads=2, text_tokens=40),
     dict(grid=GRID, text_tokens=40, text_position="last", rearrange="gilbert", mode="thresholdbound",
          mask_type="old", block_k=128, use_sim_mask=True, sim_thresholds=(0.7, 0.65, 0.6),
          ratios=((1, 0.0, 0.5), (2, 0.5, 0.6), (4, 0.6, 0.7), (8, 0.7, 0.8), (0, 0.8, 1.0)))),
    ("gqa_bf16_scores_partial", dict(heads=4, kv_heads=2, text_tokens=30),
     dict(block_q=64, block_k=64, mode="thresholdbound", score_dtype="bfloat16", seed=5)),
])
def test_psa_numba_selection_equals_numpy(label, video, params):
    q, k, v = synthetic_video(GRID, seed=11, **video)
    ref = refattn.select(q, k, "psa", v=v, causal=False, backend="numpy", **params)
    got = refattn.select(q, k, "psa", v=v, causal=False, backend="numba", **params)
    _same_selection(ref, got)
    np.testing.assert_array_equal(got.extras["levels"], ref.extras["levels"])
    assert len(np.unique(ref.extras["levels"])) >= 3, "input too uniform to test the levels"
    for key in ("cap", "newtype", "perm"):
        if ref.extras[key] is None:
            assert got.extras[key] is None
        else:
            np.testing.assert_array_equal(got.extras[key], ref.extras[key])


@pytest.mark.parametrize("use_bias,video,density", [
    (False, dict(heads=3), 0.1),
    (True, dict(heads=4, kv_heads=2, text_tokens=77, text_position="first"), 0.15),
])
def test_pisa_numba_selection_equals_numpy(use_bias, video, density):
    q, k, v = synthetic_video(GRID, seed=4, **video)
    kw = dict(v=v, causal=False, block_size=64, density=density, use_bias=use_bias)
    ref = refattn.select(q, k, "pisa", backend="numpy", **kw)
    got = refattn.select(q, k, "pisa", backend="numba", **kw)
    _same_selection(ref, got)
    if use_bias:
        np.testing.assert_allclose(got.extras["bias_norm"], ref.extras["bias_norm"], rtol=1e-6)
    else:
        assert got.extras["bias_norm"] is None


def test_key_similarity_cap_numba_equals_numpy():
    _, k, _ = synthetic_video((4, 16, 16), heads=2, kv_heads=2, seed=2)
    s = psa.key_similarity(k, 64)
    t = tuple(float(np.quantile(s[i], 0.5)) for i in range(3))   # thresholds that split the blocks
    ref = psa.key_similarity_cap(k, 64, t)
    np.testing.assert_array_equal(psa.key_similarity_cap(k, 64, t, backend="numba"), ref)
    assert len(np.unique(ref)) >= 2


def test_device_rounding_is_bit_exact():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 9, 2000),
        1 + np.arange(-40, 40) * 2.0 ** -9,                    # bf16 ties (even and odd)
        1 + np.arange(-40, 40) * 2.0 ** -12,                   # fp16 ties
        1 + 2.0 ** -8 + 2.0 ** -30 * np.arange(-3, 4),         # bf16 double-rounding cases
        np.array([0.0, -0.0, 2.0 ** -20, 3e-8, -6e-8, 65519.0, 65520.0, -7e4, 3.4e38, 3.39e38]),
    ])
    rnd = numba_select._round_to
    with np.errstate(over="ignore"):                           # fp16 overflow to inf is tested
        wants = ((1, x.astype(np.float32).astype(np.float64)),
                 (2, x.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)),
                 (3, x.astype(np.float16).astype(np.float64)))
    for code, want in wants:
        got = np.array([rnd(float(v), code) for v in x])
        np.testing.assert_array_equal(got, want, err_msg=f"rounding code {code}")


def test_out_arguments_and_return_values():
    q, k, v = synthetic_video((2, 8, 8), heads=2, kv_heads=1, head_dim=32, seed=1)
    off = np.array([0, 5, 9, 31])
    offq = np.broadcast_to(off, (1, 2, 4))
    ref = psa.sampled_importance(q, k, 32, 32, offq, offq)
    out = np.full(ref.shape, np.nan)                                   # float64 target
    got = dispatch("psa_sampled_importance", "numba")(q, k, 32, 32, off, off, out=(out,))
    assert got is out and out.dtype == np.float64
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-15)
    sc, nrm = dispatch("pisa_block_scores", "numba")(q, k, v, 32, True, None)
    rsc, rn = pisa.pisa_block_scores(q, k, v, 32, True, None)
    assert sc.dtype == np.float32 and nrm.shape == rn.shape == (1, 1, 4)
    np.testing.assert_allclose(sc, rsc, rtol=1e-6)
    with pytest.raises(InputError, match="out"):
        dispatch("psa_key_similarity", "numba")(k, 32, out=(np.empty((3, 1, 1, 5), np.float32),))


def test_errors():
    q, k, v = synthetic_video((2, 8, 8), heads=2, kv_heads=1, head_dim=32, seed=1)
    imp = dispatch("psa_sampled_importance", "numba")
    with pytest.raises(InputError, match="offsets_q"):
        imp(q, k, 32, 32, np.array([0, 32]), np.array([0, 1]))
    with pytest.raises(InputError, match="dtype"):
        imp(q, k, 32, 32, np.array([0]), np.array([0]), "int8")
    with pytest.raises(InputError, match="multiple of 8"):
        dispatch("psa_key_similarity", "numba")(k, 12)
    with pytest.raises(InputError, match="v:"):
        dispatch("pisa_block_scores", "numba")(q, k, None, 32, True, None)
    with pytest.raises(InputError, match="v:"):
        pisa.block_scores(q, k, None, 32, True, backend="numba")
    with pytest.raises(InputError, match="multiple"):
        dispatch("pisa_block_scores", "numba")(q[:, :1].repeat(3, 1), k.repeat(2, 1), v, 32)
