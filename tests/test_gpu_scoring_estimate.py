"""CUDA kernels of bsfa_score, minference_score and flexprefill_score
(gpu/scoring_estimate.py, backend "cupy") against the NumPy references.

The registry test (tests/test_registry.py) runs the cupy kernels on the fp32 cases of
refattn/cases/llm_scoring.py (float64 path) and the bf16 BSFA case. This module adds what
those cases do not reach: the tensor-core paths (bf16/fp16, D = 64/128, partial blocks and
rows, GQA, Sq != Sk, causal and not, several key chunks, several row tiles), structured
(refattn.data.synthetic), random and real (refattn.data.sample) inputs, the float64 path on
fp32/fp64 and on geometries the tensor-core kernels do not take, selections through
``refattn.select`` (tie-aware ``compare_masks``), CuPy in / CuPy out, ``out=`` and errors.

Every comparison states its case, kernel path and the failing statistics in the assertion
message, so that one run tells everything. Skips without CuPy or a CUDA device.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import refattn
from refattn.check import compare_arrays, compare_masks
from refattn.core import registry
from refattn.core.blockmask import legal_blocks
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods import bsfa, flexprefill, minference  # noqa: F401  (define the ops)

_WHY = registry.load_backend("cupy")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_WHY is not None, reason=f"cupy backend unavailable: {_WHY}")]


def _se():
    from refattn.gpu import scoring_estimate
    return scoring_estimate


def _cast(x, dtype):
    if dtype == "bfloat16":
        import ml_dtypes
        return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)
    return np.asarray(x).astype(dtype)


def _inputs(kind, B, Hq, Hkv, Sq, Sk, D, dtype, seed=0):
    """q [B, Hq, Sq, D], k [B, Hkv, Sk, D]: "structured" (synthetic, queries at the last Sq
    positions; Sq > Sk takes the first Sk keys) or "random" Gaussian; rounded to dtype."""
    if kind == "structured":
        q, k, _ = synthetic(B, Hq, Hkv, max(Sq, Sk), D, q_len=Sq, seed=seed)
        k = np.ascontiguousarray(k[:, :, :Sk])
    else:
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((B, Hq, Sq, D))
        k = rng.standard_normal((B, Hkv, Sk, D))
    return _cast(q, dtype), _cast(k, dtype)


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _f64(x):
    return np.asarray(x).astype(np.float64)


def _check(ref, got, dtype, what, *, tight=None):
    """The DESIGN tolerance rule (compare_arrays at the input precision; fp32/fp64 inputs
    at float32), plus a tighter bound ``tight * max|ref|`` on the finite entries that the
    kernels meet by construction (float64 path: 1e-9; fp32 accumulation: 1e-3)."""
    ref, got = _f64(ref), _f64(_host(got))
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, reference {ref.shape}"
    cdt = "float32" if dtype in ("float32", "float64") else dtype
    rep = compare_arrays(ref, got, cdt, name=what)
    assert rep.ok, f"{what}: tolerance rule failed\n{rep.summary()}"
    if tight is None:
        tight = 1e-9 if dtype in ("float32", "float64") else 1e-3
    fin = np.isfinite(ref)
    assert np.array_equal(fin, np.isfinite(got)), (
        f"{what}: finite pattern differs at {np.argwhere(fin != np.isfinite(got))[:5].tolist()}")
    if fin.any():
        scale = max(np.abs(ref[fin]).max(), 1e-30)
        err = np.abs(got[fin] - ref[fin]).max()
        assert err <= tight * scale, (
            f"{what}: max abs error {err:.3e} > {tight:g} * max|ref| ({scale:.3e}); "
            f"worst at {np.argwhere(np.abs(np.where(fin, got - ref, 0)) == err)[:3].tolist()}")


# ============================================================================== BSFA
def _bsfa_expected(q, k, bq, bk, scale, causal):
    """Reference tile maxima; causal: -inf on the tiles legal_blocks calls illegal. When the
    reference op itself takes ``causal`` (its new signature), it is checked to agree."""
    (mx,) = bsfa.bsfa_block_max(q, k, bq, bk, scale)
    if not causal:
        return mx
    exp = np.where(legal_blocks(q.shape[2], k.shape[2], bq, bk, True), mx, -np.inf)
    ref_fn = registry.ops()["bsfa_score"].reference
    if "causal" in inspect.signature(ref_fn).parameters:
        (rc,) = ref_fn(q, k, bq, bk, scale, True)
        assert np.array_equal(np.isinf(rc), np.isinf(exp)) and np.allclose(
            np.where(np.isinf(exp), 0, rc), np.where(np.isinf(exp), 0, exp)), \
            "the reference bsfa_score(causal=True) disagrees with legal_blocks + the unmasked max"
    return exp


BSFA_GEOMETRIES = [
    # (label, kind, B, Hq, Hkv, Sq, Sk, bq, bk)
    ("default_128x64_gqa", "structured", 1, 4, 2, 1000, 1000, 128, 64),
    ("sq_lt_sk_64x64", "structured", 1, 2, 1, 777, 1200, 64, 64),
    ("sq_gt_sk_128x128", "random", 2, 2, 2, 1200, 700, 128, 128),
    ("small_blocks_32x16", "structured", 1, 2, 1, 500, 530, 32, 16),
    ("bq_gt_cta_256x64", "random", 1, 2, 1, 600, 650, 256, 64),
    ("odd_blocks_48x24", "structured", 1, 1, 1, 300, 333, 48, 24),
    ("bk_not_dividing_64_96x40", "random", 1, 2, 2, 410, 300, 96, 40),
    ("tiny", "random", 1, 2, 1, 5, 9, 16, 8),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("geo", BSFA_GEOMETRIES, ids=[g[0] for g in BSFA_GEOMETRIES])
def test_bsfa_tensor_core_path(geo, D, dtype):
    label, kind, B, Hq, Hkv, Sq, Sk, bq, bk = geo
    se = _se()
    assert se.bsfa_fast_path(dtype, D, bq, bk), f"{label}: expected the tensor-core path"
    q, k = _inputs(kind, B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + D)
    scale = 1.0 / np.sqrt(D)
    got = {}
    for causal in (False, True):
        (mx,) = se.bsfa_impl(q, k, bq, bk, scale, causal, path="fast")
        got[causal] = _host(mx)
        assert got[causal].dtype == np.float32, f"{label}: bf16/fp16 result must be float32"
        _check(_bsfa_expected(q, k, bq, bk, scale, causal), got[causal], dtype,
               f"bsfa fast {label} D={D} {dtype} causal={causal}")
    legal = np.broadcast_to(legal_blocks(Sq, Sk, bq, bk, True), got[True].shape)
    assert np.array_equal(got[True][legal], got[False][legal]), \
        f"{label}: causal legal tiles must equal the non-causal maxima bit for bit"
    assert np.all(got[True][~legal] == -np.inf), f"{label}: illegal tiles must be -inf"


def test_bsfa_negative_scale_and_registry_signature():
    q, k = _inputs("random", 1, 2, 1, 300, 260, 64, "bfloat16", seed=1)
    fn = registry.dispatch("bsfa_score", "cupy")
    (m1,) = fn(q, k, 64, 64, -0.125)                      # NEG instantiation
    _check(_bsfa_expected(q, k, 64, 64, -0.125, False), m1, "bfloat16", "bsfa scale<0")
    (m2,) = fn(q, k, 64, 64, -0.125, True)                # causal positionally
    (m3,) = fn(q, k, 64, 64, scale=-0.125, causal=True)   # and by keyword
    np.testing.assert_array_equal(_host(m2), _host(m3))
    _check(_bsfa_expected(q, k, 64, 64, -0.125, True), m2, "bfloat16", "bsfa scale<0 causal")


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_bsfa_float64_path(dtype, causal):
    se = _se()
    for label, (B, Hq, Hkv, Sq, Sk, D, bq, bk) in [
            ("gqa_partial", (1, 4, 2, 213, 303, 64, 32, 16)),
            ("sq_gt_sk", (2, 2, 1, 203, 113, 40, 20, 12)),      # D, bq, bk off the fast grid
            ("bq_1", (1, 2, 2, 70, 90, 16, 1, 7)),
            ("big_blocks", (1, 2, 1, 300, 300, 32, 128, 64))]:
        q, k = _inputs("structured" if Sq <= Sk else "random", B, Hq, Hkv, Sq, Sk, D, dtype,
                       seed=Sk)
        (mx,) = se.bsfa_impl(q, k, bq, bk, 0.17, causal, path="exact")
        want = np.float64 if dtype != "bfloat16" else np.float32
        assert _host(mx).dtype == want, f"{label}: result dtype {_host(mx).dtype}, expected {want}"
        _check(_bsfa_expected(q, k, bq, bk, 0.17, causal), mx, dtype,
               f"bsfa exact {label} {dtype} causal={causal}",
               tight=1e-9 if dtype != "bfloat16" else 1e-6)


def test_bsfa_fast_equals_exact_path_bf16():
    se = _se()
    q, k = _inputs("structured", 1, 4, 1, 1030, 1100, 128, "bfloat16", seed=5)
    for causal in (False, True):
        (a,) = se.bsfa_impl(q, k, 128, 64, 0.0884, causal, path="fast")
        (b,) = se.bsfa_impl(q, k, 128, 64, 0.0884, causal, path="exact")
        _check(_host(b), a, "bfloat16", f"bsfa fast vs float64 path causal={causal}", tight=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bsfa_select(dtype):
    q, k = _inputs("structured", 1, 4, 2, 2048, 2048, 128, dtype, seed=7)
    ref = refattn.select(q, k, "bsfa", backend="numpy", topk=8)
    got = refattn.select(q, k, "bsfa", backend="cupy", topk=8)
    rep = compare_masks(ref, got.mask, tol=1e-3 if dtype == "bfloat16" else 1e-9)
    assert rep.ok, f"bsfa select {dtype}:\n{rep.summary()}"


# ============================================================================== MInference
MINF_CASES = [
    # (label, kind, B, Hq, Hkv, Sq, Sk, last_q, chunk_tiles)
    ("default_gqa", "structured", 1, 4, 2, 2048, 2048, 64, None),
    ("gqa_chunks_1", "structured", 1, 4, 2, 1500, 1500, 64, 1),
    ("sq_lt_sk", "structured", 1, 2, 1, 300, 1000, 64, 3),
    ("sq_gt_sk_empty_rows", "random", 2, 2, 2, 500, 100, 200, 1),
    ("last_q_100_partial_rows", "structured", 1, 2, 1, 900, 900, 100, 2),
    ("last_q_300_three_row_tiles", "random", 1, 2, 1, 700, 800, 300, None),
    ("last_q_gt_sq", "random", 1, 2, 1, 40, 230, 64, 1),
    ("tiny", "random", 1, 2, 1, 9, 9, 64, None),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", MINF_CASES, ids=[c[0] for c in MINF_CASES])
def test_minference_tensor_core_path(case, D, dtype):
    label, kind, B, Hq, Hkv, Sq, Sk, last_q, ct = case
    se = _se()
    assert se.vs_fast_path(dtype, D)
    q, k = _inputs(kind, B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sk + last_q)
    rv, rs = minference.minference_score(q, k, last_q, None)
    gv, gs = se.minference_impl(q, k, last_q, None, path="fast", chunk_tiles=ct)
    _check(rv, gv, dtype, f"minference fast {label} D={D} {dtype} vertical")
    _check(rs, gs, dtype, f"minference fast {label} D={D} {dtype} slash")
    ell = min(last_q, Sq)
    rows_seeing = np.clip(np.arange(Sk - ell, Sk) + 1, 0, None).astype(bool).sum()
    np.testing.assert_allclose(_host(gv).sum(-1), rows_seeing, rtol=1e-4,
                               err_msg=f"{label}: vertical must sum to the rows that see a key")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_minference_float64_path(dtype):
    se = _se()
    for label, kind, B, Hq, Hkv, Sq, Sk, last_q, _ in MINF_CASES[1:6]:
        q, k = _inputs(kind, B, Hq, Hkv, Sq, Sk, 32, dtype, seed=Sq)
        rv, rs = minference.minference_score(q, k, last_q, 0.2)
        gv, gs = se.minference_impl(q, k, last_q, 0.2, path="exact")
        _check(rv, gv, dtype, f"minference exact {label} {dtype} vertical")
        _check(rs, gs, dtype, f"minference exact {label} {dtype} slash")


def test_minference_fast_equals_exact_path_bf16():
    se = _se()
    q, k = _inputs("structured", 1, 2, 1, 3000, 3000, 128, "bfloat16", seed=3)
    for name, a, b in zip(("vertical", "slash"),
                          se.minference_impl(q, k, 64, None, path="fast"),
                          se.minference_impl(q, k, 64, None, path="exact"), strict=True):
        _check(_host(b), a, "bfloat16", f"minference fast vs float64 path {name}", tight=2e-4)


def test_minference_select():
    q, k = _inputs("structured", 1, 4, 2, 4096, 4096, 64, "float32", seed=11)
    params = dict(vertical_size=300, slash_size=500)
    ref = refattn.select(q, k, "minference", backend="numpy", **params)
    got = refattn.select(q, k, "minference", backend="cupy", **params)
    rep = compare_masks(ref, got.mask)
    assert rep.ok, f"minference select fp32:\n{rep.summary()}"
    for key in ("vertical", "slash"):
        np.testing.assert_array_equal(ref.extras[key], got.extras[key],
                                      err_msg=f"minference select fp32: {key} indices differ")
    qb, kb = _cast(q, "bfloat16"), _cast(k, "bfloat16")
    ref = refattn.select(qb, kb, "minference", backend="numpy", **params)
    got = refattn.select(qb, kb, "minference", backend="cupy", **params)
    agree = (ref.mask.mask == got.mask.mask).mean()
    assert agree >= 0.98, f"minference select bf16: block masks agree on {agree:.4f} < 0.98"


# ============================================================================== FlexPrefill
FLEX_CASES = [
    # (label, kind, B, Hq, Hkv, L, block, chunk_tiles)
    ("default_gqa", "structured", 1, 4, 2, 4096, 128, None),
    ("partial_block", "structured", 1, 2, 1, 4000, 128, 3),
    ("block64_chunks_1", "random", 2, 2, 2, 1000, 64, 1),
    ("block96", "structured", 1, 3, 1, 1111, 96, 2),
    ("short", "random", 1, 2, 1, 50, 64, None),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", FLEX_CASES, ids=[c[0] for c in FLEX_CASES])
def test_flexprefill_tensor_core_path(case, D, dtype):
    label, kind, B, Hq, Hkv, L, b, ct = case
    se = _se()
    q, k = _inputs(kind, B, Hq, Hkv, L, L, D, dtype, seed=L + b)
    ref = flexprefill.flexprefill_score(q, k, b, None)
    got = se.flexprefill_impl(q, k, b, None, path="fast", chunk_tiles=ct)
    for name, r, g in zip(("vertical", "slash", "pooled_attn", "block_attn"), ref, got,
                          strict=True):
        assert _host(g).dtype == np.float32, f"{label}: {name} must be float32 for {dtype}"
        _check(r, g, dtype, f"flexprefill fast {label} D={D} {dtype} {name}",
               tight=1e-3 if name in ("vertical", "slash") else 1e-6)   # float64, stored f32


def test_flexprefill_float64_path():
    se = _se()
    for label, kind, B, Hq, Hkv, L, b, _ in FLEX_CASES[1:]:
        for dtype in ("float32", "float64"):
            q, k = _inputs(kind, B, Hq, Hkv, L, L, 48, dtype, seed=L)
            ref = flexprefill.flexprefill_score(q, k, b, 0.15)
            got = se.flexprefill_impl(q, k, b, 0.15, path="exact")
            for name, r, g in zip(("vertical", "slash", "pooled_attn", "block_attn"), ref, got,
                                  strict=True):
                assert _host(g).dtype == np.float64
                _check(r, g, dtype, f"flexprefill exact {label} {dtype} {name}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flexprefill_select(dtype):
    q, k = _inputs("structured", 1, 8, 2, 4096, 4096, 128, dtype, seed=13)
    ref = refattn.select(q, k, "flexprefill", backend="numpy")
    got = refattn.select(q, k, "flexprefill", backend="cupy")
    rep = compare_masks(ref, got.mask, tol=1e-6 if dtype == "float32" else 1e-3)
    frac = rep.stats["mismatches"] / max(1, rep.stats["blocks"])
    assert (rep.ok if dtype == "float32" else frac <= 0.02), \
        f"flexprefill select {dtype}: mismatch fraction {frac:.4f}\n{rep.summary()}"
    assert list(ref.extras["pattern"].ravel()) == list(got.extras["pattern"].ravel()) or \
        dtype == "bfloat16", f"flexprefill select {dtype}: per-head patterns differ"


# ============================================================================== real sample
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_real_sample(dtype):
    """refattn.data.sample(): Qwen2.5 q [1, 3, 2048, 64], k [1, 1, 2048, 64] (GQA 3:1)."""
    from refattn.data import sample
    s = sample()
    q, k = _cast(s.q, dtype), _cast(s.k, dtype)
    (mx,) = registry.dispatch("bsfa_score", "cupy")(q, k, 128, 64, 0.125, True)
    _check(_bsfa_expected(q, k, 128, 64, 0.125, True), mx, dtype, f"sample bsfa {dtype}")
    for name, r, g in zip(("vertical", "slash"), minference.minference_score(q, k, 64, None),
                          registry.dispatch("minference_score", "cupy")(q, k, 64, None),
                          strict=True):
        _check(r, g, dtype, f"sample minference {dtype} {name}")
    for name, r, g in zip(("vertical", "slash", "pooled_attn", "block_attn"),
                          flexprefill.flexprefill_score(q, k, 128, None),
                          registry.dispatch("flexprefill_score", "cupy")(q, k, 128, None),
                          strict=True):
        _check(r, g, dtype, f"sample flexprefill {dtype} {name}")


# ============================================================================== arrays, out=
def test_device_in_device_out_and_out_argument():
    import cupy as cp
    q, k = _inputs("structured", 1, 4, 2, 700, 700, 64, "float16", seed=17)
    qd, kd = cp.asarray(q), cp.asarray(k)
    calls = [("bsfa_score", (128, 64, 0.125, True), 1),
             ("minference_score", (64, None), 2),
             ("flexprefill_score", (128, None), 4)]
    for name, rest, nout in calls:
        fn = registry.dispatch(name, "cupy")
        dev = fn(qd, kd, *rest)
        assert len(dev) == nout and all(isinstance(x, cp.ndarray) for x in dev), \
            f"{name}: CuPy inputs must give CuPy outputs, got {[type(x).__name__ for x in dev]}"
        host = fn(q, k, *rest)
        assert all(isinstance(x, np.ndarray) for x in host), f"{name}: NumPy in, NumPy out"
        for i, (a, b) in enumerate(zip(dev, host, strict=True)):  # atomics: last-bit order
            np.testing.assert_allclose(a.get(), b, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{name} output {i}: device vs host call")
        for kind_ in ("numpy32", "numpy64", "cupy32"):
            if kind_ == "cupy32":
                bufs = tuple(cp.full(x.shape, cp.nan, cp.float32) for x in host)
            else:
                dt = np.float32 if kind_ == "numpy32" else np.float64
                bufs = tuple(np.full(x.shape, np.nan, dt) for x in host)
            res = fn(q, k, *rest, out=bufs)
            assert all(r is b for r, b in zip(res, bufs, strict=True)), f"{name}: out= not returned"
            for i, (b, h) in enumerate(zip(bufs, host, strict=True)):
                bh = _host(b)
                assert not np.isnan(bh).any(), f"{name} out[{i}] ({kind_}): unwritten (NaN) entries"
                np.testing.assert_allclose(bh, h, rtol=1e-5, atol=1e-7,
                                           err_msg=f"{name} out[{i}] ({kind_})")


def test_errors():
    q = np.zeros((1, 3, 64, 64), np.float32)
    k = np.zeros((1, 2, 64, 64), np.float32)
    with pytest.raises(InputError, match="GQA"):
        registry.dispatch("bsfa_score", "cupy")(q, k, 64, 64, 0.1)
    q, k = _inputs("random", 1, 2, 1, 64, 80, 32, "float32")
    with pytest.raises(InputError, match="equal"):
        registry.dispatch("flexprefill_score", "cupy")(q, k, 32, None)
    with pytest.raises(InputError, match="block_q"):
        registry.dispatch("bsfa_score", "cupy")(q, k, 0, 64, 0.1)
    with pytest.raises(InputError, match="last_q"):
        registry.dispatch("minference_score", "cupy")(q, k, 0, None)
    with pytest.raises(InputError, match="scale"):
        registry.dispatch("minference_score", "cupy")(q, k, 16, float("inf"))
    with pytest.raises(InputError, match="out"):
        registry.dispatch("minference_score", "cupy")(q, k, 16, None, out=(np.empty((1, 2, 80)),))
    with pytest.raises(InputError, match="tensor-core"):
        _se().bsfa_impl(q, k, 64, 64, 0.1, path="fast")     # fp32 has no tensor-core path
