"""CUDA selection kernels (gpu/select.py, backend "cupy") against the NumPy reference.

The ops are kind "exact": the mask and the boundary must equal the reference's bit for bit
(``np.array_equal(..., equal_nan=True)``). tests/test_registry.py already runs the four cupy
ops on the cases of refattn/cases/selection.py (NumPy in, float32 ``out=``); this module adds
random, tied (integer-valued) and NaN scores, causal validity, long rows (N = 4096 and
multi-CTA rows), many rows (100k x 64), per-row budgets and taus, tau edge cases and exact
crossings, every dtype, every kernel family forced on the same rows (``path=``), CuPy in /
CuPy out, ``out=``, the registry's ``auto`` dispatch and the errors.
Skips without CuPy or a CUDA device.
"""
from __future__ import annotations

import numpy as np
import pytest

from refattn.cases.selection import budgets, random_valid, tied_scores
from refattn.core import registry
from refattn.core.errors import InputError
from refattn.reference import selection as ref

_WHY = registry.load_backend("cupy")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_WHY is not None, reason=f"cupy backend unavailable: {_WHY}")]

if _WHY is None:
    import cupy as cp
    from refattn.gpu import select as gsel

TOPK_PATHS = ("warp", "block", "multi")
CUM_PATHS = ("warp", "block", "sort")


# ----------------------------------------------------------------------------- helpers
def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _same(expected, got, what):
    """Assert ``got == expected`` (mask, boundary) exactly, with a message that shows the
    first rows that differ."""
    assert isinstance(got, tuple) and len(got) == 2, f"{what}: expected (mask, boundary), got {type(got)}"
    for name, r, g in zip(("mask", "boundary"), expected, got, strict=True):
        r, g = np.asarray(r), _host(g)
        assert g.shape == r.shape, f"{what}: {name} shape {g.shape}, reference {r.shape}"
        if name == "mask":
            assert g.dtype == np.bool_, f"{what}: mask dtype {g.dtype}"
            if not np.array_equal(r, g):
                rr = r.reshape(r.shape[0], -1) if r.ndim else r.reshape(1, 1)
                gg = g.reshape(rr.shape)
                bad = np.flatnonzero((rr != gg).any(axis=1))
                i = bad[0]
                cols = np.flatnonzero(rr[i] != gg[i])[:12]
                raise AssertionError(
                    f"{what}: mask differs in {bad.size} of {rr.shape[0]} rows (first {bad[:8].tolist()}); "
                    f"row {i}: {int((rr[i] != gg[i]).sum())} entries differ, at {cols.tolist()}; "
                    f"reference keeps {int(rr[i].sum())}, kernel {int(gg[i].sum())}")
        else:
            if not np.array_equal(r, g.astype(np.float64), equal_nan=True):
                neq = ~((r == g) | (np.isnan(r) & np.isnan(g)))
                bad = np.flatnonzero(neq.reshape(-1))
                raise AssertionError(
                    f"{what}: boundary differs in {bad.size} of {r.size} rows (first "
                    f"{bad[:8].tolist()}): reference {r.reshape(-1)[bad[:4]].tolist()}, kernel "
                    f"{g.reshape(-1)[bad[:4]].tolist()}")


def gauss(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def tied_ints(rng, shape, levels=4, dtype=np.float32):
    """Integer-valued scores from ``levels`` values: exact ties everywhere."""
    return rng.integers(0, levels, size=shape).astype(dtype)


def with_nan(rng, s, frac=0.05):
    s = np.array(s, copy=True)
    s[rng.random(s.shape) < frac] = np.nan
    return s


def causal_rows(R, N):
    """Per-token causal validity: row r sees the key blocks up to its own, ``[R, N]``."""
    own = (np.arange(R) * N) // max(R, 1)
    return np.arange(N)[None, :] <= own[:, None]


def masses(rng, R, N, kind):
    if kind == "softmax":
        x = rng.standard_normal((R, N)).astype(np.float32)
        return np.exp(x - x.max(-1, keepdims=True)).astype(np.float32)
    if kind == "tied":
        return rng.integers(0, 4, size=(R, N)).astype(np.float32)
    if kind == "nan":
        s = rng.random((R, N)).astype(np.float32)
        s[rng.random((R, N)) < 0.05] = np.nan
        s[rng.random((R, N)) < 0.05] = 0.0
        return s
    raise ValueError(kind)


def as_dtype(s, dtype):
    if dtype == "bfloat16":
        import ml_dtypes
        return s.astype(ml_dtypes.bfloat16)
    return s.astype(dtype)


# ----------------------------------------------------------------------------- top-k rows
@pytest.mark.parametrize("path", TOPK_PATHS)
@pytest.mark.parametrize("R,N", [(37, 300), (5, 9000), (33, 1)])
@pytest.mark.parametrize("data", ["gauss", "tied", "nan", "signed_tied"])
def test_topk_rows_every_path(path, R, N, data):
    rng = np.random.default_rng(R * N + len(data))
    s = {"gauss": lambda: gauss(rng, (R, N)),
         "tied": lambda: tied_ints(rng, (R, N)),
         "nan": lambda: with_nan(rng, gauss(rng, (R, N)), 0.2),
         "signed_tied": lambda: tied_scores(rng, (R, N))}[data]()
    v = random_valid(rng, R, N)
    k = budgets(rng, R, N)
    for tie in ("low", "high"):
        _same(ref.topk_rows(s, k, v, tie), gsel.topk_rows_impl(s, k, v, tie, path=path),
              f"topk_rows {data} {R}x{N} path={path} tie={tie} valid, per-row k")
    _same(ref.topk_rows(s, 3, None, "low"), gsel.topk_rows_impl(s, 3, None, "low", path=path),
          f"topk_rows {data} {R}x{N} path={path} k=3")
    _same(ref.topk_rows(s, 0, v, "high"), gsel.topk_rows_impl(s, 0, v, "high", path=path),
          f"topk_rows {data} {R}x{N} path={path} k=0")
    _same(ref.topk_rows(s, N + 7, None, "low"), gsel.topk_rows_impl(s, N + 7, None, "low", path=path),
          f"topk_rows {data} {R}x{N} path={path} k>N")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "int32", "int64"])
def test_topk_rows_dtypes(dtype):
    rng = np.random.default_rng(7)
    R, N = 64, 200
    if dtype.startswith("int"):
        s = rng.integers(-5, 6, size=(R, N)).astype(dtype)
    else:
        s = as_dtype(with_nan(rng, tied_scores(rng, (R, N), levels=7) * 3), dtype)
    k = budgets(rng, R, N)
    v = random_valid(rng, R, N)
    for tie in ("low", "high"):
        _same(ref.topk_rows(s, k, v, tie), gsel.topk_rows(s, k, v, tie), f"topk_rows {dtype} tie={tie}")
    if not dtype.startswith("int"):
        gs = as_dtype(gauss(rng, (R, 3000)), dtype)
        _same(ref.topk_rows(gs, 100, None, "low"), gsel.topk_rows(gs, 100), f"topk_rows {dtype} 3000 cols")


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_topk_rows_subnormals(dtype):
    """Subnormal scores must be ranked exactly (no flush to zero), -0.0 ties with +0.0."""
    rng = np.random.default_rng(3)
    tiny = {"float16": np.float16(2.0 ** -24), "float32": np.float32(2.0 ** -149),
            "float64": np.float64(2.0 ** -1074)}[dtype]
    R, N = 40, 70
    s = (rng.integers(-20, 21, size=(R, N)).astype(dtype) * tiny).astype(dtype)
    s[:, ::9] = -0.0
    s[:, 1::9] = 0.0
    k = rng.integers(0, N + 1, size=R)
    for path in TOPK_PATHS:
        for tie in ("low", "high"):
            _same(ref.topk_rows(s, k, None, tie), gsel.topk_rows_impl(s, k, None, tie, path=path),
                  f"subnormal {dtype} path={path} tie={tie}")


def test_topk_rows_long_rows():
    rng = np.random.default_rng(11)
    R, N = 96, 4096
    assert gsel.topk_path(N, 2) == "block"
    s = gauss(rng, (R, N))
    _same(ref.topk_rows(s, 8), gsel.topk_rows(s, 8), "N=4096 gauss k=8")
    t = tied_ints(rng, (R, N), levels=3)
    k = rng.integers(0, N + 10, size=R)
    v = causal_rows(R, N)
    for tie in ("low", "high"):
        _same(ref.topk_rows(t, k, v, tie), gsel.topk_rows(t, k, v, tie), f"N=4096 tied causal tie={tie}")
    d = gauss(rng, (8, 4096), np.float64)
    _same(ref.topk_rows(d, 1000), gsel.topk_rows(d, 1000), "N=4096 float64 k=1000")
    w = gauss(rng, (3, 40000))                             # multi-CTA rows (auto)
    assert gsel.topk_path(40000, 2) == "multi"
    w[:, ::3] = np.round(w[:, ::3])
    for tie in ("low", "high"):
        _same(ref.topk_rows(w, [0, 5000, 39999], None, tie), gsel.topk_rows(w, [0, 5000, 39999], None, tie),
              f"N=40000 tie={tie}")


def test_topk_rows_many_rows():
    rng = np.random.default_rng(5)
    R, N = 100_000, 64
    s = gauss(rng, (R, N))
    _same(ref.topk_rows(s, 8), gsel.topk_rows(s, 8), "100k x 64 gauss k=8")
    t = tied_ints(rng, (R, N), levels=5)
    v = causal_rows(R, N)
    k = rng.integers(0, 12, size=R)
    _same(ref.topk_rows(t, k, v, "high"), gsel.topk_rows(t, k, v, "high"), "100k x 64 tied causal tie=high")


def test_topk_rows_valid_broadcasts():
    rng = np.random.default_rng(9)
    R, N = 20, 50
    s = tied_ints(rng, (R, N))
    for v in (rng.random(N) < 0.5, rng.random((R, 1)) < 0.5, np.bool_(True), np.array(False),
              np.asfortranarray(rng.random((R, N)) < 0.5), (rng.random((N, R)) < 0.5).T):
        _same(ref.topk_rows(s, 6, v), gsel.topk_rows(s, 6, v), f"valid shape {np.shape(v)}")


# ----------------------------------------------------------------------------- global top-k
@pytest.mark.parametrize("H,Qb,Kb", [(2, 8, 8), (4, 64, 64), (3, 200, 300), (2, 1, 5000), (1, 1, 1)])
def test_topk_global(H, Qb, Kb):
    rng = np.random.default_rng(H * Qb * Kb)
    n = Qb * Kb
    causal = np.tril(np.ones((Qb, Kb), bool), k=Kb - Qb)
    legal = int(causal.sum())
    for data in ("gauss", "tied", "nan"):
        s = {"gauss": gauss(rng, (H, Qb, Kb)), "tied": tied_ints(rng, (H, Qb, Kb)),
             "nan": with_nan(rng, tied_ints(rng, (H, Qb, Kb), levels=8), 0.1)}[data]
        k10 = max(1, legal // 10)
        for tie in ("low", "high"):
            _same(ref.topk_heads(s, k10, causal, tie), gsel.topk_global(s, k10, causal, tie),
                  f"global {H}x{Qb}x{Kb} {data} 10% causal tie={tie}")
        kh = np.array([0, 1, n // 3, n + 4] * H)[:H]
        v = rng.random((H, Qb, Kb)) < 0.7
        _same(ref.topk_heads(s, kh, v, "low"), gsel.topk_global(s, kh, v, "low"),
              f"global {H}x{Qb}x{Kb} {data} per-head k, full valid")
        vk = rng.random((H, 1, Kb)) < 0.6                      # materialised broadcast
        _same(ref.topk_heads(s, n // 2, vk, "high"), gsel.topk_global(s, n // 2, vk, "high"),
              f"global {H}x{Qb}x{Kb} {data} valid [H,1,Kb]")
        _same(ref.topk_heads(s, n // 4, None, "high"), gsel.topk_global(s, n // 4, None, "high"),
              f"global {H}x{Qb}x{Kb} {data} no valid")


@pytest.mark.parametrize("path", TOPK_PATHS)
def test_topk_global_every_path(path):
    rng = np.random.default_rng(1)
    H, Qb, Kb = 3, 40, 50
    causal = np.tril(np.ones((Qb, Kb), bool), k=Kb - Qb)
    s = tied_scores(rng, (H, Qb, Kb), levels=6)
    for tie in ("low", "high"):
        _same(ref.topk_heads(s, [0, 100, 2000], causal, tie),
              gsel.topk_global_impl(s, [0, 100, 2000], causal, tie, path=path),
              f"global path={path} tie={tie}")


def test_topk_global_large():
    """A head of 1024 x 1024 blocks (S = 128k with 128-token blocks), 10 % of the legal ones."""
    rng = np.random.default_rng(2)
    H, Qb = 2, 1024
    s = gauss(rng, (H, Qb, Qb))
    s[1] = np.round(s[1] * 4)                               # many ties in head 1
    causal = np.tril(np.ones((Qb, Qb), bool))
    k = int(causal.sum()) // 10
    for tie in ("low", "high"):
        _same(ref.topk_heads(s, k, causal, tie), gsel.topk_global(s, k, causal, tie),
              f"global 2x1024x1024 tie={tie}")


# ----------------------------------------------------------------------------- cumulative
@pytest.mark.parametrize("R,N", [(50, 64), (40, 1000), (8, 4096), (4, 10000), (9, 1)])
@pytest.mark.parametrize("kind", ["softmax", "tied", "nan"])
def test_cumulative(R, N, kind):
    rng = np.random.default_rng(R + N)
    s = masses(rng, R, N, kind)
    taus = np.array([0.0, 0.25, 0.5, 0.9, 1.0, 1.5, -0.5, 0.75, 0.99])
    t = taus[rng.integers(len(taus), size=R)]
    v = random_valid(rng, R, N)
    for normalize in (True, False):
        for incl in (True, False):
            for tie in ("low", "high"):
                tt = t if normalize else t * N / 4
                _same(ref.cumulative_rows(s, tt, v, normalize, tie, incl),
                      gsel.cumulative_threshold(s, tt, v, normalize, tie, incl),
                      f"cumulative {kind} {R}x{N} normalize={normalize} incl={incl} tie={tie}")
    _same(ref.cumulative_rows(s, 0.9), gsel.cumulative_threshold(s, 0.9), f"cumulative {kind} {R}x{N} tau=0.9")


@pytest.mark.parametrize("count_path", CUM_PATHS)
@pytest.mark.parametrize("path", TOPK_PATHS)
def test_cumulative_every_path(count_path, path):
    rng = np.random.default_rng(4)
    R, N = 30, 700
    s = masses(rng, R, N, "tied")
    s[::3] = masses(rng, R, N, "softmax")[::3]
    t = rng.choice([0.1, 0.5, 0.9, 1.0], size=R)
    v = causal_rows(R, N) | (np.arange(N) < 5)[None, :]
    for incl in (True, False):
        _same(ref.cumulative_rows(s, t, v, True, "high", incl),
              gsel.cumulative_impl(s, t, v, True, "high", incl, count_path=count_path, path=path),
              f"cumulative count_path={count_path} path={path} incl={incl}")


@pytest.mark.parametrize("n", [8, 10, 64, 1000, 3000])
def test_cumulative_exact_crossings(n):
    """Equal masses: cum / total lands on tau = j / n up to rounding; only the reference's
    own float64 arithmetic (sequential sum, then divide) decides which side. One row per
    tau (all j for small n, the first, last and some random j otherwise)."""
    rng = np.random.default_rng(n)
    js = np.unique(np.concatenate([np.arange(min(n, 16)), n - 1 - np.arange(min(n, 16)),
                                   rng.integers(0, n, 48)]))
    R = js.size
    for val in (1.0, 0.1, 1.0 / 3.0):
        s = np.full((R, n), val, np.float64)
        for tau in (js / n, (js + 1) / n, js * 0.1, js / (n + 1.0)):
            for incl in (True, False):
                for tie in ("low", "high"):
                    _same(ref.cumulative_rows(s, tau, None, True, tie, incl),
                          gsel.cumulative_threshold(s, tau, None, True, tie, incl),
                          f"equal masses {val} n={n} incl={incl} tie={tie}")
        tau = js * val                                        # unnormalised: cum vs j * val
        for incl in (True, False):
            _same(ref.cumulative_rows(s, tau, None, False, "low", incl),
                  gsel.cumulative_threshold(s, tau, None, False, "low", incl),
                  f"equal masses {val} n={n} unnormalised incl={incl}")
    s32 = np.full((R, n), 0.1, np.float32)
    _same(ref.cumulative_rows(s32, js / n), gsel.cumulative_threshold(s32, js / n),
          f"float32 equal masses n={n}")


def test_cumulative_edges():
    rng = np.random.default_rng(6)
    s = masses(rng, 12, 40, "softmax")
    s[0] = 0.0                                      # zero mass
    s[1] = np.nan                                   # nothing valid
    s[2, :3] = np.inf                               # infinite masses
    s[3, 5] = np.inf
    s[4] = 1.0
    s[5, ::2] = 0.0
    v = random_valid(rng, 12, 40)
    for tau in (0.0, 1.0, 0.5, 1.0 + 1e-12, 1e-300, np.inf, np.nan, -1.0):
        for normalize in (True, False):
            for incl in (True, False):
                _same(ref.cumulative_rows(s, tau, v, normalize, "low", incl),
                      gsel.cumulative_threshold(s, tau, v, normalize, "low", incl),
                      f"edges tau={tau} normalize={normalize} incl={incl}")
    for count_path in CUM_PATHS:
        bad = np.array(s, copy=True)
        bad[7, 3] = -1e-30
        with pytest.raises(InputError, match="non-negative"):
            gsel.cumulative_impl(bad, 0.5, count_path=count_path)
        bad[7, 3] = -np.inf
        with pytest.raises(InputError, match="non-negative"):
            gsel.cumulative_impl(bad, 0.5, count_path=count_path)
        ok = np.array(s, copy=True)
        ok[7, 3] = -0.0                              # -0.0 is not negative
        ok[8, 3] = -1.0                              # negative but invalid: ignored
        vv = np.ones(ok.shape, bool)
        vv[8, 3] = False
        _same(ref.cumulative_rows(ok, 0.5, vv), gsel.cumulative_impl(ok, 0.5, vv, count_path=count_path),
              f"-0.0 and invalid negative count_path={count_path}")


def test_cumulative_dtypes_and_per_head_tau():
    rng = np.random.default_rng(8)
    H, Qb, Kb = 4, 32, 32
    s = masses(rng, H * Qb, Kb, "softmax")
    causal = np.tile(np.tril(np.ones((Qb, Kb), bool)), (H, 1))
    tau = np.repeat(np.array([0.9, 0.5, 1.0, 0.0]), Qb)
    for dtype in ("float16", "bfloat16", "float32", "float64", "int32"):
        x = (s * 8).round().astype(dtype) if dtype == "int32" else as_dtype(s, dtype)
        _same(ref.cumulative_rows(x, tau, causal), gsel.cumulative_threshold(x, tau, causal),
              f"cumulative {dtype} per-head tau")


def test_cumulative_many_rows():
    rng = np.random.default_rng(12)
    R, N = 100_000, 64
    s = masses(rng, R, N, "softmax")
    v = causal_rows(R, N)
    _same(ref.cumulative_rows(s, 0.9, v), gsel.cumulative_threshold(s, 0.9, v), "100k x 64 tau 0.9")


# ----------------------------------------------------------------------------- fixed
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "int16"])
@pytest.mark.parametrize("R,N", [(33, 64), (7, 5000), (1, 1)])
def test_fixed(dtype, R, N):
    rng = np.random.default_rng(R * N)
    if dtype == "int16":
        s = rng.integers(-3, 4, size=(R, N)).astype(dtype)
    else:
        s = as_dtype(tied_scores(rng, (R, N)), dtype)
    t = np.float32(0.25) * rng.integers(-3, 4, size=R).astype(np.float32)
    if R >= 3:
        t[:3] = (np.nan, np.inf, -np.inf)
    v = random_valid(rng, R, N)
    for inclusive in (True, False):
        _same(ref.fixed_rows(s, t, v, inclusive), gsel.fixed_threshold(s, t, v, inclusive),
              f"fixed {dtype} {R}x{N} inclusive={inclusive}")
    _same(ref.fixed_rows(s, 0.0), gsel.fixed_threshold(s, 0.0), f"fixed {dtype} {R}x{N} scalar 0")
    _same(ref.fixed_rows(s, 0.1), gsel.fixed_threshold(s, 0.1), f"fixed {dtype} {R}x{N} scalar 0.1")


def test_fixed_many_rows():
    rng = np.random.default_rng(13)
    s = gauss(rng, (100_000, 64))
    v = causal_rows(100_000, 64)
    _same(ref.fixed_rows(s, 1.0, v), gsel.fixed_threshold(s, 1.0, v), "fixed 100k x 64")


# ----------------------------------------------------------------------------- device, out=
def test_device_in_device_out():
    rng = np.random.default_rng(14)
    R, N = 300, 130
    s = tied_scores(rng, (R, N))
    v = random_valid(rng, R, N)
    k = budgets(rng, R, N)
    m = masses(rng, R, N, "softmax")
    t = rng.choice([0.5, 0.9, 1.0], size=R)
    sd, vd, kd, md, td = cp.asarray(s), cp.asarray(v), cp.asarray(k), cp.asarray(m), cp.asarray(t)
    for what, exp, got in (
            ("topk_rows", ref.topk_rows(s, k, v, "high"), gsel.topk_rows(sd, kd, vd, "high")),
            ("topk_rows host k", ref.topk_rows(s, 5, v), gsel.topk_rows(sd, 5, vd)),
            ("topk_global", ref.topk_heads(s.reshape(3, 100, N), [1, 50, 9999]),
             gsel.topk_global(sd.reshape(3, 100, N), cp.asarray([1, 50, 9999]))),
            ("cumulative", ref.cumulative_rows(m, t, v), gsel.cumulative_threshold(md, td, vd)),
            ("fixed", ref.fixed_rows(s, t, v), gsel.fixed_threshold(sd, td, vd))):
        assert all(isinstance(x, cp.ndarray) for x in got), f"{what}: CuPy in must give CuPy out"
        assert got[0].dtype == cp.bool_ and got[1].dtype == cp.float64, f"{what}: dtypes {got[0].dtype}, {got[1].dtype}"
        _same(exp, got, f"device {what}")
    # strided device scores (a transposed view) are accepted
    st = cp.asarray(np.ascontiguousarray(s.T)).T
    _same(ref.topk_rows(s, 7), gsel.topk_rows(st, 7), "strided device scores")
    # host in, host out
    got = gsel.topk_rows(s, 7)
    assert all(isinstance(x, np.ndarray) for x in got), "NumPy in must give NumPy out"


@pytest.mark.parametrize("kind", ["cupy64", "cupy32", "numpy32", "cupy_strided"])
def test_out(kind):
    rng = np.random.default_rng(15)
    R, N = 70, 90
    s = tied_scores(rng, (R, N))
    m = masses(rng, R, N, "tied")
    ops = (("topk_rows", gsel.topk_rows, ref.topk_rows, (s, 9, None, "high")),
           ("cumulative", gsel.cumulative_threshold, ref.cumulative_rows, (m, 0.7)),
           ("fixed", gsel.fixed_threshold, ref.fixed_rows, (s, 0.25)),
           ("global", gsel.topk_global, ref.topk_heads, (s.reshape(7, 10, N), 40)))
    for name, fn, rf, args in ops:
        exp = rf(*args)
        shape, nb = exp[0].shape, exp[1].shape[0]
        if kind == "cupy64":
            out = (cp.ones(shape, cp.bool_), cp.full((nb,), -7.0, cp.float64))
        elif kind == "cupy32":
            out = (cp.ones(shape, cp.bool_), cp.full((nb,), -7.0, cp.float32))
        elif kind == "numpy32":
            out = (np.ones(shape, bool), np.full((nb,), -7.0, np.float32))
        else:
            big = cp.ones(shape[:-1] + (2 * shape[-1],), cp.bool_)
            out = (big[..., ::2], cp.full((2 * nb,), -7.0, cp.float64)[::2])
        got = fn(*args, out=out)
        assert got[0] is out[0] and got[1] is out[1], f"{name} {kind}: out= must be returned"
        b = exp[1].astype(out[1].dtype).astype(np.float64)     # float32 boundary: rounded
        _same((exp[0], b), (out[0], out[1]), f"{name} out={kind}")


def test_auto_dispatch_picks_cupy():
    sd = cp.asarray(np.zeros((4, 8), np.float32))
    s3 = cp.asarray(np.zeros((2, 4, 8), np.float32))
    for op, fn, arr in (("selection_topk_rows", gsel.topk_rows, sd),
                        ("selection_topk_global", gsel.topk_global, s3),
                        ("selection_cumulative_threshold", gsel.cumulative_threshold, sd),
                        ("selection_fixed_threshold", gsel.fixed_threshold, sd)):
        assert registry.resolve_backend(op, "auto", (arr,)) == "cupy", op
        assert registry.dispatch(op, "auto", (arr,)) is fn, op
        assert registry.dispatch(op, "cupy") is fn, op
        assert registry.implementations(op)["cupy"] is fn, op


def test_empty_rows():
    s = np.zeros((0, 5), np.float32)
    _same(ref.topk_rows(s, 2), gsel.topk_rows(s, 2), "topk 0 rows")
    _same(ref.fixed_rows(s, 0.5), gsel.fixed_threshold(s, 0.5), "fixed 0 rows")
    _same(ref.cumulative_rows(s, 0.5), gsel.cumulative_threshold(s, 0.5), "cumulative 0 rows")


def test_errors():
    s = np.ones((3, 4), np.float32)
    cases = [
        (lambda: gsel.topk_rows(s, 2, None, "middle"), "tie"),
        (lambda: gsel.topk_rows(s, -1), ">= 0"),
        (lambda: gsel.topk_rows(s, 1.5), "integer"),
        (lambda: gsel.topk_rows(s, [1, 2]), "shape"),
        (lambda: gsel.topk_rows(s, cp.asarray([1, -2, 3])), ">= 0"),
        (lambda: gsel.topk_rows(s, 2, np.ones((3, 4), np.int8)), "bool"),
        (lambda: gsel.topk_rows(s, 2, np.ones((2, 4), bool)), "broadcast"),
        (lambda: gsel.topk_rows(np.ones(4, np.float32), 2), "2-d"),
        (lambda: gsel.topk_rows(np.ones((3, 0), np.float32), 2), "no candidates"),
        (lambda: gsel.topk_rows(np.ones((3, 4), bool), 2), "real"),
        (lambda: gsel.topk_global(s, 2), "3-d"),
        (lambda: gsel.cumulative_threshold(-s, 0.5), "non-negative"),
        (lambda: gsel.cumulative_threshold(s, [0.5, 0.5]), "shape"),
        (lambda: gsel.fixed_threshold(s, [0.5, 0.5]), "shape"),
        (lambda: gsel.topk_rows(s, 2, out=(np.ones((3, 4), bool),)), "out"),
        (lambda: gsel.topk_rows(s, 2, out=(np.ones((3, 5), bool), np.ones(3))), "out"),
        (lambda: gsel.topk_rows(s, 2, out=(np.ones((3, 4), bool), np.ones(3, np.int64))), "out"),
    ]
    for fn, match in cases:
        with pytest.raises(InputError, match=match):
            fn()
    # float budgets with integral values are accepted, as in the reference
    _same(ref.topk_rows(s, 2.0), gsel.topk_rows(s, 2.0), "k=2.0")
