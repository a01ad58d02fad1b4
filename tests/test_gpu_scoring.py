"""CUDA scoring kernels (gpu/scoring.py, backend "cupy") against the NumPy reference.

The registry test (tests/test_registry.py) already runs every cupy scoring op on the cases of
refattn/cases/llm_scoring.py (fp32 and bf16, NaN-poisoned outputs). This module adds what
those cases do not reach: the tensor-core XAttention path (bf16/fp16, D = 64/128, strides
4/8/16, partial lengths, GQA, non-causal), selections through ``refattn.select`` compared
tie-aware with ``refattn.check.compare_masks``, CuPy in / CuPy out, ``out=`` and errors.
Skips without CuPy or a CUDA device.
"""
from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.check import compare_arrays, compare_masks
from refattn.core import registry
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods import moba, prism, quest, xattention  # noqa: F401  (define the ops)

_WHY = registry.load_backend("cupy")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_WHY is not None, reason=f"cupy backend unavailable: {_WHY}")]


def _inputs(B, Hq, Hkv, S, D, dtype, seed=0, q_len=None):
    q, k, _ = synthetic(B, Hq, Hkv, S, D, q_len=q_len, seed=seed)
    if dtype == "bfloat16":
        import ml_dtypes
        return q.astype(ml_dtypes.bfloat16), k.astype(ml_dtypes.bfloat16)
    return q.astype(dtype), k.astype(dtype)


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _check_op(name, args, dtype):
    ref = registry.ops()[name].reference(*args)
    got = registry.dispatch(name, "cupy")(*args)
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        rep = compare_arrays(r, _host(g), "float32" if dtype == "float64" else dtype,
                             name=registry.ops()[name].outputs[i])
        assert rep.ok, rep.summary()


def _check_select(method, q, k, tol=1e-3, max_frac=0.0, **params):
    ref = refattn.select(q, k, method, backend="numpy", **params)
    got = refattn.select(q, k, method, backend="cupy", **params)
    rep = compare_masks(ref, got.mask, tol=tol)
    frac = rep.stats["mismatches"] / max(1, rep.stats["blocks"])
    assert frac <= max_frac, rep.summary()
    return rep


# ----------------------------------------------------------------------- XAttention
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("L,D,Hq,Hkv,bs,S,C,causal", [
    (1000, 128, 2, 1, 128, 8, 256, True),     # BT 16, partial tile and block
    (2048, 128, 4, 2, 128, 16, 2048, True),   # BT 8, GQA, one chunk
    (777, 64, 2, 2, 64, 16, 128, True),       # BT 4, D 64
    (600, 64, 2, 1, 32, 16, 128, False),      # BT 2, non-causal (padded key tiles count)
    (300, 128, 1, 1, 16, 16, 64, True),       # BT 1
])
def test_xattention_fast_path_scores(dtype, L, D, Hq, Hkv, bs, S, C, causal):
    from refattn.gpu.scoring import xattention_fast_path
    assert xattention_fast_path(dtype, D, bs, S)
    q, k = _inputs(1, Hq, Hkv, L, D, dtype, seed=L)
    _check_op("xattention_score", (q, k, bs, S, C, 1.0, causal), dtype)


@pytest.mark.parametrize("stride", [8, 16])
def test_xattention_select_bf16(stride):
    q, k = _inputs(1, 4, 2, 4096, 128, "bfloat16", seed=stride)
    _check_select("xattention", q, k, stride=stride, threshold=0.9)


def test_xattention_select_fp32_exact_path():
    q, k = _inputs(1, 2, 1, 700, 64, "float32", seed=3)
    _check_select("xattention", q, k, tol=1e-6, stride=8, threshold=0.9)


# ----------------------------------------------------------------------- MoBA / Quest / Prism
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_moba_select(dtype):
    q, k = _inputs(1, 4, 2, 3000, 128, dtype, seed=5)
    _check_select("moba", q, k, tol=1e-3 if dtype == "bfloat16" else 1e-6, block_size=256, topk=3)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("causal", [True, False])
def test_quest_select(dtype, causal):
    q, k = _inputs(1, 4, 2, 1500, 64, dtype, seed=7, q_len=5)
    _check_select("quest", q, k, tol=1e-3 if dtype == "bfloat16" else 1e-6, causal=causal,
                  page_size=16, token_budget=256)


def test_quest_prefill_bf16_scores():
    q, k = _inputs(1, 2, 1, 500, 128, "bfloat16", seed=8)
    _check_op("quest_score", (q, k, 16, True), "bfloat16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_prism_select(dtype):
    q, k = _inputs(1, 4, 2, 2000, 128, dtype, seed=9)
    _check_select("prism", q, k, tol=1e-6)


def test_moba_bf16_scores():
    q, k = _inputs(2, 4, 1, 1100, 128, "bfloat16", seed=10)
    _check_op("moba_score", (q, k, 128), "bfloat16")


# ----------------------------------------------------------------------- array kinds, out=
def test_cupy_in_cupy_out_and_out_argument():
    import cupy as cp
    q, k = _inputs(1, 2, 1, 512, 128, "float16", seed=11)
    fn = registry.dispatch("xattention_score", "cupy")
    (W,) = fn(cp.asarray(q), cp.asarray(k), 128, 8, 512, 1.0, True)
    assert isinstance(W, cp.ndarray) and W.shape == (1, 2, 4, 4)
    (Wn,) = fn(q, k, 128, 8, 512, 1.0, True)
    assert isinstance(Wn, np.ndarray)
    np.testing.assert_array_equal(Wn, W.get())
    buf = np.full(Wn.shape, np.nan, np.float64)
    res = fn(q, k, 128, 8, 512, 1.0, True, out=(buf,))
    assert res[0] is buf and np.array_equal(buf, Wn)
    # the rows of each query block sum to its number of real query tiles
    assert np.allclose(Wn.sum(-1)[0, :, :], [[16, 16, 16, 16]] * 2, atol=1e-3)


def test_errors():
    q, k = np.zeros((1, 3, 64, 64), np.float32), np.zeros((1, 2, 64, 64), np.float32)
    with pytest.raises(InputError, match="GQA"):
        registry.dispatch("moba_score", "cupy")(q, k, 16)
    q, k = _inputs(1, 2, 1, 64, 64, "float32")
    with pytest.raises(InputError, match="stride"):
        registry.dispatch("xattention_score", "cupy")(q, k, 64, 48, 64, 1.0, True)
    with pytest.raises(InputError, match="4-d"):
        registry.dispatch("quest_score", "cupy")(q[0], k[0], 16, True)
    with pytest.raises(InputError, match="out"):
        registry.dispatch("moba_score", "cupy")(q, k, 16, out=(np.empty((1, 2, 64, 3)),))
