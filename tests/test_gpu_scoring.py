"""CUDA scoring kernels (gpu/scoring.py, backend "cupy") against the NumPy reference.

The registry test (tests/test_registry.py) already runs every cupy scoring op on the cases of
refattn/cases/llm_scoring.py (fp32 and bf16, NaN-poisoned outputs). This module adds what
those cases do not reach:

* XAttention: the tensor-core kernels (every configuration of ``XA_CONFIGS``, bf16/fp16,
  D = 64/128, strides 4/8/16, partial lengths, GQA, non-causal, the benchmark's geometry at
  S = 32k), each against the reference and against the first kernel (``"v1"``);
* MoBA and Quest: the tensor-core ``rowcol_tc`` path (bf16/fp16, D = 64/128, odd column
  counts, several column tiles per CTA, split column ranges, Sq > Sk and Sq < Sk, decode
  rows) against the reference and against the FFMA ``rowcol`` path, and the fallbacks
  (D = 96, D = 320, fp32);
* Prism: the fused float64 kernels against the reference to ~1e-9 (GQA, Sq != Sk, partial
  blocks, fixed temperatures, overlapping band slices, scalar loads), and its selection;
* selections through ``refattn.select`` compared tie-aware with ``compare_masks``;
* CuPy in / CuPy out, ``out=``, the module switches and errors.

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


def _scoring():
    from refattn.gpu import scoring
    return scoring


def _inputs(B, Hq, Hkv, S, D, dtype, seed=0, q_len=None):
    q, k, _ = synthetic(B, Hq, Hkv, S, D, q_len=q_len, seed=seed)
    return _cast(q, dtype), _cast(k, dtype)


def _cast(x, dtype):
    if dtype == "bfloat16":
        import ml_dtypes
        return x.astype(ml_dtypes.bfloat16)
    return x.astype(dtype)


def _gauss(shape, dtype, seed):
    return _cast(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32), dtype)


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _check_op(name, args, dtype, tol_dtype=None):
    """The op on the cupy backend against its reference, with the tolerance rule at
    ``tol_dtype`` (default: the input dtype, float32 for float64). Returns the outputs."""
    ref = registry.ops()[name].reference(*args)
    got = tuple(_host(g) for g in registry.dispatch(name, "cupy")(*args))
    tdt = tol_dtype or ("float32" if dtype == "float64" else dtype)
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        rep = compare_arrays(r, g, tdt, name=registry.ops()[name].outputs[i])
        assert rep.ok, rep.summary()
    return ref, got


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


_XA_GEOS = [
    # several CTAs of every tile shape, several key tiles per CTA, partial last block
    (5000, 128, 2, 1, 128, 8, 1024, True),
    # non-causal, D 64 (a 128-element k-slice falls back to 64), GQA, stride 4
    (1500, 64, 4, 2, 64, 4, 512, False),
]


@pytest.mark.parametrize("config", ["256x128", "128x128", "128x128k128", "128x256", "v1"])
@pytest.mark.parametrize("geo", range(len(_XA_GEOS)))
def test_xattention_kernel_configs(monkeypatch, config, geo):
    """Every selectable kernel against the reference, and against v1 to fp32 rounding: both
    accumulate the same mma products in the same k order."""
    sc = _scoring()
    assert config in sc.XA_CONFIGS
    L, D, Hq, Hkv, bs, S, C, causal = _XA_GEOS[geo]
    q, k = _inputs(1, Hq, Hkv, L, D, "bfloat16", seed=17 + geo)
    args = (q, k, bs, S, C, 1.0, causal)
    monkeypatch.setattr(sc, "XA_CONFIG", config)
    _, (W,) = _check_op("xattention_score", args, "bfloat16")
    monkeypatch.setattr(sc, "XA_CONFIG", "v1")
    (W1,) = registry.dispatch("xattention_score", "cupy")(*args)
    np.testing.assert_allclose(W, W1, rtol=0, atol=1e-5 * max(1.0, float(np.abs(W1).max())))


@pytest.mark.parametrize("stride", [8, 16])
def test_xattention_benchmark_geometry(stride):
    """The benchmark's geometry (S = 32k, D = 128, block 128, default chunk 8192), one head."""
    L = 32768
    q, k = _gauss((1, 1, L, 128), "bfloat16", 1), _gauss((1, 1, L, 128), "bfloat16", 2)
    C = xattention.default_chunk_size(L)
    _check_op("xattention_score", (q, k, 128, stride, C, 1.0, True), "bfloat16")


@pytest.mark.parametrize("stride", [8, 16])
def test_xattention_select_bf16(stride):
    q, k = _inputs(1, 4, 2, 4096, 128, "bfloat16", seed=stride)
    _check_select("xattention", q, k, stride=stride, threshold=0.9)


def test_xattention_select_fp32_exact_path():
    q, k = _inputs(1, 2, 1, 700, 64, "float32", seed=3)
    _check_select("xattention", q, k, tol=1e-6, stride=8, threshold=0.9)


def test_xattention_config_errors(monkeypatch):
    sc = _scoring()
    monkeypatch.setattr(sc, "XA_CONFIG", "nope")
    q, k = _inputs(1, 2, 1, 256, 128, "bfloat16")
    with pytest.raises(ValueError, match="XA_CONFIG"):
        registry.dispatch("xattention_score", "cupy")(q, k, 128, 8, 256, 1.0, True)


# ----------------------------------------------------------------------- MoBA
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,bs", [
    (2, 4, 2, 1000, 1100, 128, 16),   # Kb 69: odd, two column tiles; partial row tile
    (1, 2, 1, 300, 300, 64, 64),      # D 64
    (1, 2, 2, 70, 50, 128, 16),       # Sq > Sk
    (1, 8, 8, 8192, 8192, 64, 16),    # Kb 512: four column tiles per CTA, two column splits
])
def test_moba_tensor_core_scores(monkeypatch, dtype, B, Hq, Hkv, Sq, Sk, D, bs):
    sc = _scoring()
    assert sc._pooled_tc(dtype, D)
    q, k = _inputs(B, Hq, Hkv, max(Sq, Sk), D, dtype, seed=Sq + D, q_len=Sq)
    k = np.ascontiguousarray(k[:, :, :Sk])
    _, (gate,) = _check_op("moba_score", (q, k, bs), dtype)
    monkeypatch.setattr(sc, "POOLED_TENSOR_CORES", False)
    (g2,) = registry.dispatch("moba_score", "cupy")(q, k, bs)
    np.testing.assert_allclose(gate, g2, rtol=0, atol=2e-5 * float(np.abs(g2).max()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_moba_select(dtype):
    q, k = _inputs(1, 4, 2, 3000, 128, dtype, seed=5)
    _check_select("moba", q, k, tol=1e-3 if dtype == "bfloat16" else 1e-6, block_size=256, topk=3)


def test_moba_bf16_scores():
    q, k = _inputs(2, 4, 1, 1100, 128, "bfloat16", seed=10)
    _check_op("moba_score", (q, k, 128), "bfloat16")


@pytest.mark.parametrize("D", [96, 40])
def test_moba_fallback_scores(D):
    q, k = _inputs(1, 2, 1, 700, D, "bfloat16", seed=D)
    _check_op("moba_score", (q, k, 64), "bfloat16")


# ----------------------------------------------------------------------- Quest
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("B,Hq,Hkv,Sq,Sk,D,P", [
    (1, 4, 2, 300, 1000, 64, 16),     # Sq < Sk, partial page
    (1, 2, 1, 400, 300, 128, 16),     # Sq > Sk: rows that see no key
    (2, 2, 2, 1000, 1000, 128, 8),    # prefill, N 125: odd, two column tiles, -inf tiles
    (1, 16, 2, 4, 70000, 64, 16),     # decode rows, GQA 8: 3 column tiles per CTA, 23 splits
])
def test_quest_tensor_core_scores(monkeypatch, dtype, causal, B, Hq, Hkv, Sq, Sk, D, P):
    sc = _scoring()
    assert sc._pooled_tc(dtype, D)
    q, k = _inputs(B, Hq, Hkv, max(Sq, Sk), D, dtype, seed=Sq + P, q_len=Sq)
    k = np.ascontiguousarray(k[:, :, :Sk])
    _, (U,) = _check_op("quest_score", (q, k, P, causal), dtype)
    monkeypatch.setattr(sc, "POOLED_TENSOR_CORES", False)
    (U2,) = registry.dispatch("quest_score", "cupy")(q, k, P, causal)
    fin = np.isfinite(U2)
    assert np.array_equal(fin, np.isfinite(U)) and np.array_equal(U[~fin], U2[~fin])
    np.testing.assert_allclose(U[fin], U2[fin], rtol=0, atol=2e-5 * float(np.abs(U2[fin]).max()))


@pytest.mark.parametrize("dtype,D", [("float32", 96), ("bfloat16", 96), ("float32", 320)])
def test_quest_fallback_scores(dtype, D):
    q, k = _inputs(1, 2, 1, 200, D, dtype, seed=D, q_len=150)
    _check_op("quest_score", (q, k, 16, True), dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("causal", [True, False])
def test_quest_select(dtype, causal):
    q, k = _inputs(1, 4, 2, 1500, 64, dtype, seed=7, q_len=5)
    _check_select("quest", q, k, tol=1e-3 if dtype == "bfloat16" else 1e-6, causal=causal,
                  page_size=16, token_budget=256)


def test_quest_prefill_bf16_scores():
    q, k = _inputs(1, 2, 1, 500, 128, "bfloat16", seed=8)
    _check_op("quest_score", (q, k, 16, True), "bfloat16")


# ----------------------------------------------------------------------- MoBA / Quest at size
def test_pooled_tensor_cores_at_benchmark_size(monkeypatch):
    """S = 32k, D = 128, 2 heads, fp16 device arrays (the indexing is the bf16 one): the
    tensor-core MoBA gate and Quest bound (every row and one decode row) against the FFMA
    kernels, on the device."""
    import cupy as cp
    sc = _scoring()
    S = 32768
    q = cp.asarray(_gauss((1, 2, S, 128), "float16", 3))
    k = cp.asarray(_gauss((1, 2, S, 128), "float16", 4))
    calls = [("moba_score", (q, k, 512)), ("quest_score", (q, k, 16, True)),
             ("quest_score", (q[:, :, -1:], k, 16, True))]
    for name, args in calls:
        monkeypatch.setattr(sc, "POOLED_TENSOR_CORES", True)
        (a,) = registry.dispatch(name, "cupy")(*args)
        monkeypatch.setattr(sc, "POOLED_TENSOR_CORES", False)
        (b,) = registry.dispatch(name, "cupy")(*args)
        fin = cp.isfinite(b)
        assert bool(cp.all(fin == cp.isfinite(a))), name
        scale = float(cp.abs(cp.where(fin, b, 0)).max())
        err = float(cp.abs(cp.where(fin, a - b, 0)).max())
        assert err <= 2e-5 * scale, (name, err, scale)


# ----------------------------------------------------------------------- Prism
_PRISM = [
    # B, Hq, Hkv, Sq, Sk, D, (block, high, low, calibrate, high_temp, low_temp)
    (1, 4, 2, 3000, 3000, 128, (128, 64, 96, True, 1.0, 1.0)),     # defaults, GQA, partial
    (1, 2, 1, 1000, 3000, 64, (32, 32, 48, True, 1.0, 1.0)),       # Sq < Sk
    (1, 2, 2, 3000, 1300, 64, (16, 32, 48, True, 1.0, 1.0)),       # Sq > Sk: empty rows
    (2, 2, 1, 2500, 2500, 64, (32, 96, 96, True, 1.0, 1.0)),       # overlapping band slices
    (1, 2, 1, 20000, 20000, 128, (128, 64, 96, False, 1.0, 0.7)),  # fixed temps, 3 x 3 tiles
    (1, 2, 1, 900, 900, 36, (64, 16, 24, True, 1.0, 1.0)),         # D 36: scalar loads
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("case", range(len(_PRISM)))
def test_prism_scores(dtype, case):
    """All six outputs against the float64 reference: the tolerance rule at float32, and to
    1e-9 (the kernels are float64 end to end)."""
    B, Hq, Hkv, Sq, Sk, D, rest = _PRISM[case]
    q, k = _inputs(B, Hq, Hkv, max(Sq, Sk), D, dtype, seed=case, q_len=Sq)
    k = np.ascontiguousarray(k[:, :, :Sk])
    ref, got = _check_op("prism_score", (q, k) + rest, dtype, tol_dtype="float32")
    for r, g in zip(ref, got, strict=True):
        assert np.array_equal(np.isfinite(r), np.isfinite(g))
        fin = np.isfinite(r)
        np.testing.assert_allclose(g[fin], r[fin], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_prism_select(dtype):
    q, k = _inputs(1, 4, 2, 2000, 128, dtype, seed=9)
    _check_select("prism", q, k, tol=1e-6)


def test_prism_select_long_bf16():
    q, k = _inputs(1, 4, 2, 16384, 128, "bfloat16", seed=12)
    _check_select("prism", q, k, tol=1e-6)


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
    # prism and moba: device in, device out; out= on the device
    outs = registry.dispatch("prism_score", "cupy")(cp.asarray(q), cp.asarray(k), 128, 64, 96,
                                                    True, 1.0, 1.0)
    assert all(isinstance(o, cp.ndarray) for o in outs)
    gbuf = cp.full((1, 2, 512, 4), cp.nan, cp.float32)
    res = registry.dispatch("moba_score", "cupy")(cp.asarray(q), cp.asarray(k), 128, out=(gbuf,))
    assert res[0] is gbuf and not bool(cp.isnan(gbuf).any())


def test_trace_hook(monkeypatch):
    sc = _scoring()
    trace = []
    monkeypatch.setattr(sc, "TRACE", trace)
    q, k = _inputs(1, 2, 1, 512, 128, "bfloat16", seed=13)
    registry.dispatch("prism_score", "cupy")(q, k, 128, 64, 96, True, 1.0, 1.0)
    names = [t[0] for t in trace]
    assert names[0].startswith("pool_blocks<") and names[1] == "prism_scales<double>"
    assert names[2:] == ["prism_band<double>", "prism_band<double>"]
    for _, a, b in trace:
        b.synchronize()
        assert a.done and b.done


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


_XA_WGMMA_GEOS = [
    # L, D, Hq, Hkv, bs, S, C, causal, dtype  (L % S == 0: the wgmma path's TMA view)
    (1000, 128, 2, 1, 128, 8, 256, True, "bfloat16"),    # BT 16, partial block
    (2048, 128, 4, 2, 128, 16, 2048, True, "bfloat16"),  # BT 8, GQA, one chunk
    (5000, 128, 2, 1, 128, 8, 1024, True, "float16"),    # several CTAs and key chunks
    (768, 64, 2, 2, 64, 16, 128, True, "bfloat16"),      # BT 4, D 64
    (608, 64, 2, 1, 32, 16, 128, False, "float16"),      # BT 2, non-causal, nch % 4 != 0
    (1504, 64, 4, 2, 64, 4, 512, False, "bfloat16"),     # stride 4, non-causal, GQA
    (304, 128, 1, 1, 16, 16, 64, True, "float16"),       # BT 1
]


@pytest.mark.parametrize("geo", range(len(_XA_WGMMA_GEOS)))
def test_xattention_wgmma_config(monkeypatch, geo):
    """XA_CONFIG = "wgmma" (gpu/score_xattn_wgmma.cu, sm_90a) against the reference and
    against the 128x256 mma.sync kernel (same epilogue, fp32 products in another order);
    asserts that xatt_wgmma really ran. Skipped without an sm_90 device."""
    import cupy as cp
    if int(cp.cuda.Device().compute_capability) != 90:
        pytest.skip("the wgmma XAttention kernel needs an sm_90 device")
    sc = _scoring()
    L, D, Hq, Hkv, bs, S, C, causal, dtype = _XA_WGMMA_GEOS[geo]
    assert sc.xattention_wgmma_fits(dtype, L, S, D)
    q, k = _inputs(1, Hq, Hkv, L, D, dtype, seed=31 + geo)
    args = (q, k, bs, S, C, 1.0, causal)
    trace: list = []
    monkeypatch.setattr(sc, "XA_CONFIG", "wgmma")
    monkeypatch.setattr(sc, "TRACE", trace)
    _, (W,) = _check_op("xattention_score", args, dtype)
    assert any(name.startswith("xatt_wgmma<") for name, _, _ in trace), \
        f"xatt_wgmma did not run: {[n for n, _, _ in trace]} {sc._XA_WGMMA_BROKEN}"
    monkeypatch.setattr(sc, "TRACE", None)
    monkeypatch.setattr(sc, "XA_CONFIG", "128x256")
    (W1,) = registry.dispatch("xattention_score", "cupy")(*args)
    np.testing.assert_allclose(W, W1, rtol=0, atol=1e-5 * max(1.0, float(np.abs(W1).max())))
