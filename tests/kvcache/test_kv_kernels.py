"""Numba kernels of the KV-cache token scores and the eviction step.

* ``refattn.select(..., backend="numba")`` keeps the same tokens as ``backend="numpy"`` and
  really runs the Numba kernel (a spy on the registry counts the calls);
* the kernels' float64 outputs (no ``out=``) agree with the float64 references: to 1e-12
  (relative to the largest score) where the logits are float64 (full-prompt ops, fp64
  inputs), to 1e-6 where they are an fp32 sgemm (window ops on fp32 inputs); the registry's
  float32 tolerance is applied by ``tests/test_registry.py``;
* the top-k eviction kernel is index-for-index the reference ``topk_keep`` (ties, NaN,
  ``valid``, ``-inf``, edge budgets);
* the kernels refuse what the references refuse.
"""
from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn import testing
from refattn.core import registry
from refattn.core.errors import InputError
from refattn.kernels import numba_kvcache as nk
from refattn.kernels import numba_kvcache_select as ns
from refattn.kvcache import caote, h2o, presses, snapkv, vatp
from refattn.kvcache._common import topk_keep

OPS = ("h2o_score", "vatp_score", "snapkv_score", "kvpress_snapkv_score", "kvpress_tova_score",
       "kvpress_observed_attention_score", "caote_score")


@pytest.fixture(scope="module")
def qkv():
    rng = np.random.default_rng(20261128)
    return testing.structured_qkv(rng, 1, 4, 2, 203, 203, 32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    assert np.array_equal(fin, np.isfinite(a)) and np.array_equal(a[~fin], b[~fin])
    return float(np.abs(a[fin] - b[fin]).max() / max(np.abs(b[fin]).max(), 1e-300))


def test_kernels_registered_with_cases():
    for op in OPS:
        assert "numba" in registry.implementations(op), op
        assert testing.has_cases(op), op
    assert "numba" in registry.implementations(ns.TOPK_OP)
    assert nk.SINK_SCORE == h2o.SINK_SCORE


# ----------------------------------------------------------- float64 outputs vs reference
def test_scores_float64(qkv):
    q, k, v = qkv
    L = k.shape[2]
    cases = [
        (nk.h2o_score_numba, h2o.h2o_score, (q, k)),
        (nk.h2o_score_numba, h2o.h2o_score, (q[:, :, :70], k, 0.3)),          # Sq < Sk
        (nk.h2o_score_numba, h2o.h2o_score, (q, k[:, :, :90])),               # Sq > Sk
        (nk.observed_attention_score_numba, presses.observed_attention_score, (q, k)),
        (nk.vatp_score_numba, vatp.vatp_score, (q, k, v, "h2o", 0)),
        (nk.vatp_score_numba, vatp.vatp_score, (q, k, v, "scissorhands", 0)),
        (nk.snapkv_press_score_numba, presses.snapkv_press_score, (q, k, 32, 5)),
        (nk.tova_score_numba, presses.tova_score, (q, k)),
        # float64 inputs are used as they are (a second compiled specialisation), mixed too
        (nk.h2o_score_numba, h2o.h2o_score, (q.astype(np.float64), k.astype(np.float64))),
        (nk.tova_score_numba, presses.tova_score, (q.astype(np.float64), k)),
        (nk.h2o_score_numba, h2o.h2o_score, (q.astype(np.float16), k.astype(np.float16))),
    ]
    window_ops = (nk.snapkv_press_score_numba, nk.tova_score_numba)
    for kern, ref, args in cases:
        tol = 1e-6 if kern in window_ops and args[1].dtype != np.float64 else 1e-12
        assert _rel(kern(*args), ref(*args)) < tol, (kern.__name__, len(args))
    for pooling in ("avgpool", "maxpool"):
        for mode in ("query", "kv"):
            for x, y, tol in ((q, k, 1e-6), (q.astype(np.float64), k.astype(np.float64), 1e-12)):
                got = nk.snapkv_score_numba(x, y, L - 1, 7, pooling, mode)
                want = snapkv.snapkv_score(x, y, L - 1, 7, pooling, mode)
                assert _rel(got[0], want[0]) < tol and _rel(got[1], want[1]) < tol


def test_vatp_sinks_exact(qkv):
    q, k, v = qkv
    for mode, sink in (("h2o", 20), ("scissorhands", 3), ("h2o", 500)):
        got = nk.vatp_score_numba(q, k, v, mode, sink)
        want = vatp.vatp_score(q, k, v, mode, sink)
        n = min(sink, k.shape[2])
        assert np.array_equal(got[..., :n], want[..., :n])          # SINK_SCORE itself
        if n < k.shape[2]:
            assert _rel(got[..., n:], want[..., n:]) < 1e-12
        out32 = (np.empty(want.shape, np.float32),)                 # float32 out: still finite
        got32 = nk.vatp_score_numba(q, k, v, mode, sink, out=out32)
        assert (got32[..., :n] == np.float32(h2o.SINK_SCORE)).all() and np.isfinite(got32).all()


def test_caote_float64():
    rng = np.random.default_rng(3)
    a = rng.gamma(0.5, 1.0, (2, 4, 150))
    a[0, 0] = 0.0                      # zero-mass head
    a[1, 1] = 0.0
    a[1, 1, 7] = 4.0                   # one-hot: +inf at 7, 0 elsewhere
    v = rng.standard_normal((2, 2, 150, 48)).astype(np.float32)
    for fast in (False, True):
        got, want = ns.caote_score_numba(a, v, fast), caote.caote_score(a, v, fast)
        assert np.isposinf(got[1, 1, 7]) and not got[0, 0].any()
        assert _rel(got, want) < 1e-12


def test_out_is_written_in_place(qkv):
    q, k, v = qkv
    o32 = np.full((1, 4, k.shape[2]), np.nan, np.float32)
    res = nk.h2o_score_numba(q, k, out=(o32,))
    assert res is o32 and np.isfinite(o32).all()
    o64 = np.full((1, 4, k.shape[2]), np.nan)
    nk.vatp_score_numba(q, k, v, "h2o", 5, out=(o64,))
    assert np.array_equal(o64, nk.vatp_score_numba(q, k, v, "h2o", 5))
    with pytest.raises(InputError, match="out"):
        nk.h2o_score_numba(q, k, out=(np.empty((1, 4, 3)),))


# ------------------------------------------------------------------- eviction (top-k)
def test_topk_matches_reference():
    rng = np.random.default_rng(11)
    s = rng.integers(0, 6, (3, 5, 300)).astype(np.float64)     # many exact ties
    s[0, 0, rng.integers(300, size=20)] = np.nan
    s[1, 2, :40] = -np.inf
    s[2, 3, :] = np.inf
    valid = rng.random(s.shape) > 0.5
    for kk in (0, 1, 17, 150, 299, 300):
        assert np.array_equal(ns.topk_keep_numba(s, kk), topk_keep(s, kk)), kk
        assert np.array_equal(ns.topk_keep_numba(s, kk, valid=valid),
                              topk_keep(s, kk, valid=valid)), kk
    head_valid = rng.random((5, 1)) > 0.5                      # broadcast valid
    assert np.array_equal(ns.topk_keep_numba(s, 40, valid=head_valid),
                          topk_keep(s, 40, valid=head_valid))
    r = rng.standard_normal(1000).astype(np.float32)           # 1-d, float32 scores
    assert np.array_equal(ns.topk_keep_numba(r, 333), topk_keep(r, 333))
    e = np.empty((2, 0))
    assert ns.topk_keep_numba(e, 0).shape == (2, 0)
    for bad in (-1, 301):
        with pytest.raises(InputError, match="top-k"):
            ns.topk_keep_numba(s, bad)


# --------------------------------------------------------------------------- refusals
def test_refuses_like_reference(qkv):
    q, k, v = qkv
    L = k.shape[2]
    for fn, args in ((snapkv.snapkv_score, (q, k, L, 5)), (nk.snapkv_score_numba, (q, k, L, 5)),
                     (nk.snapkv_score_numba, (q[:, :, 1:], k, 8, 5)),
                     (nk.snapkv_press_score_numba, (q, k, L, 5)),
                     (nk.tova_score_numba, (q[:, :, :1], k[:, :, :1])),
                     (nk.h2o_score_numba, (q[:, :3], k)),
                     (ns.caote_score_numba, (-np.ones((1, 4, L)), v)),
                     (ns.caote_score_numba, (np.full((1, 4, L), np.inf), v))):
        with pytest.raises(InputError):
            fn(*args)


# ------------------------------------------------ refattn.select: numba vs numpy keep sets
SELECTS = [
    ("snapkv", dict(window_size=16, max_capacity_prompt=96, kernel_size=5, pooling="avgpool"),
     "snapkv_score"),
    ("snapkv", dict(window_size=8, max_capacity_prompt=64, kernel_size=7, pooling="maxpool",
                    head_mode="kv"), "snapkv_score"),
    ("h2o", dict(variant="real_drop", hh_size=24, recent_size=32), "h2o_score"),
    ("h2o", dict(variant="mask_sim", heavy_ratio=0.2, recent_ratio=0.1), "h2o_score"),
    ("vatp", dict(mode="h2o", heavy_ratio=0.2, sink_len=4), "vatp_score"),
    ("vatp", dict(mode="scissorhands", heavy_ratio=0.25), "vatp_score"),
    ("caote", dict(base="h2o", compression_ratio=0.6), "caote_score"),
    ("caote", dict(base="snapkv", fast=True, n_kept=50, window_size=16), "caote_score"),
    ("kvpress", dict(press="snapkv", compression_ratio=0.5, window_size=16), "kvpress_snapkv_score"),
    ("kvpress", dict(press="tova", compression_ratio=0.7), "kvpress_tova_score"),
    ("kvpress", dict(press="observed_attention", n_kept=60), "kvpress_observed_attention_score"),
]


@pytest.mark.parametrize("method,params,op", SELECTS,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(SELECTS)])
def test_select_numba_keeps_same_tokens(qkv, monkeypatch, method, params, op):
    q, k, v = qkv
    kernel = registry.implementations(op)["numba"]
    calls = []

    def spy(*args, **kw):
        calls.append(op)
        return kernel(*args, **kw)

    monkeypatch.setitem(registry._IMPLS, (op, "numba"), spy)
    ref = refattn.select(q, k, method, v=v, backend="numpy", **params)
    assert not calls
    got = refattn.select(q, k, method, v=v, backend="numba", **params)
    assert calls, f"{method}: backend='numba' did not reach the {op} kernel"
    kr, kg = ref.extras["keepset"], got.extras["keepset"]
    assert kr.head_kind == kg.head_kind
    assert np.array_equal(kr.indices, kg.indices)              # same tokens, same keep order
    assert np.array_equal(ref.mask.mask, got.mask.mask)
    sr, sg = ref.scores.scores, got.scores.scores
    assert np.array_equal(np.isnan(sr), np.isnan(sg))
    tol = 1e-6 if op in ("snapkv_score", "kvpress_snapkv_score", "kvpress_tova_score") else 1e-12
    assert _rel(np.nan_to_num(sg), np.nan_to_num(sr)) < tol


TOPK_SELECTS = [s for s in SELECTS if s[0] in ("snapkv", "caote", "kvpress")]


@pytest.mark.parametrize("method,params,op", TOPK_SELECTS,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(TOPK_SELECTS)])
def test_select_numba_runs_the_eviction_kernel(qkv, monkeypatch, method, params, op):
    """SnapKV, CAOTE and the kvpress presses evict through op ``kvcache_topk_keep``, so
    backend="numba" reaches its kernel (and keeps the same tokens, checked above)."""
    q, k, v = qkv
    kernel = registry.implementations("kvcache_topk_keep")["numba"]
    calls = []

    def spy(*args, **kw):
        calls.append(1)
        return kernel(*args, **kw)

    monkeypatch.setitem(registry._IMPLS, ("kvcache_topk_keep", "numba"), spy)
    refattn.select(q, k, method, v=v, backend="numpy", **params)
    assert not calls
    got = refattn.select(q, k, method, v=v, backend="numba", **params)
    assert calls, f"{method}: backend='numba' did not reach the top-k eviction kernel"
    ref = refattn.select(q, k, method, v=v, backend="numpy", **params)
    assert np.array_equal(ref.extras["keepset"].indices, got.extras["keepset"].indices)
