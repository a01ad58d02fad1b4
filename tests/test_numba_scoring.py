"""Numba scoring kernels (refattn/kernels/numba_scoring_*.py): the same selections as the
reference after each method's selection step, on structured synthetic inputs and on real
Q/K slices (``../shared/data``, skipped where absent); plus the error paths of the kernels.

Exactness of the scoring outputs themselves is tests/test_registry.py's job (cases in
refattn/cases/llm_scoring.py, outputs poisoned with NaN), except for ProxyAttn's two
kernels on inputs larger than those cases (several row tiles and key chunks)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import refattn
from refattn.check import compare_masks
from refattn.core import registry
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods import load_all

# Define every method's ops before tests/test_registry.py enumerates the registry.
load_all()

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
REAL = os.path.join(DATA, "sample_qwen_s2048_L12.npz")

# method -> parameters that give a non-trivial selection at L = 1024 (D = 64)
METHODS: dict[str, dict] = {
    "moba": dict(block_size=64, topk=3),
    "flashmoba": dict(block_size=64, topk=3),
    "xattention": dict(block_size=64, stride=8, threshold=0.9, chunk_size=256),
    "prism": dict(block_size=64, high_freq_dim=32, low_freq_dim=48),
    "bsfa": dict(block_q=128, block_k=64, topk=4),
    "minference": dict(vertical_size=64, slash_size=96, last_q=64),
    "flexprefill": dict(block_size=64),
    "quest": dict(page_size=16, token_budget=256),
    "nsa": dict(topk=6),
    "proxyattn": dict(block_size=64, gamma=0.9, min_budget=1),   # 2048 tokens = everything here
}
# scoring ops each method dispatches (all must have a numba kernel for backend="numba")
OPS = {"moba": ("moba_score",), "flashmoba": ("moba_score",), "xattention": ("xattention_score",),
       "prism": ("prism_score",), "bsfa": ("bsfa_score",), "minference": ("minference_score",),
       "flexprefill": ("flexprefill_score",), "quest": ("quest_score",), "nsa": ("nsa_score",),
       "proxyattn": ("proxyattn_score", "proxyattn_budget_score")}
TOL = 1e-4   # near-tie tolerance of the mask comparison (float32 scores vs float64)


def _inputs(source: str) -> tuple[np.ndarray, np.ndarray]:
    if source == "structured":
        q, k, _ = synthetic(1, 4, 2, 1024, 64, seed=11)
        return q, k
    if not os.path.exists(REAL):
        pytest.skip(f"real data not found at {REAL}")
    z = np.load(REAL)
    # heads 0-1 of the saved GQA group, tokens 512..1535 (a slice that starts past the sink)
    q = np.ascontiguousarray(z["q"][None, :2, 512:1536])
    k = np.ascontiguousarray(z["k"][None, :, 512:1536])
    return q, k


def test_every_op_has_a_numba_kernel():
    for ops in OPS.values():
        for name in ops:
            assert "numba" in registry.implementations(name), name


@pytest.mark.parametrize("source", ["structured", "real"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_selection_matches_reference(method, source):
    q, k = _inputs(source)
    params = METHODS[method]
    ref = refattn.select(q, k, method, backend="numpy", **params)
    got = refattn.select(q, k, method, backend="numba", **params)
    rep = compare_masks(ref, got.mask, TOL)
    assert rep.ok, rep.summary()
    # a selection that keeps everything or nothing would make this test vacuous
    frac = float(np.mean(ref.mask.density()))            # of the causally legal blocks
    assert 0.0 < frac < 0.95, f"{method}: degenerate selection ({frac:.2f} of legal blocks)"
    # the near-tie escape must stay an exception, not the rule
    assert rep.stats["near_ties"] <= max(2, 1e-3 * ref.mask.mask.size), rep.summary()


@pytest.mark.parametrize("source", ["structured", "real"])
def test_pbs_selection_with_numba_kernels(source):
    """PBS: backend="auto" runs the Numba kernels of both pbs_key_importance (the key
    ordering) and pbs_score (the permuted block scores, NaN rows included)."""
    q, k = _inputs(source)
    assert registry.resolve_backend("pbs_key_importance", "auto") == "numba"
    assert registry.resolve_backend("pbs_score", "auto") == "numba"
    params = dict(block_size=64, segment_size=256, tau=0.9)
    ref = refattn.select(q, k, "pbs", backend="numpy", **params)
    got = refattn.select(q, k, "pbs", backend="auto", **params)
    np.testing.assert_array_equal(ref.extras["perm"], got.extras["perm"])
    rep = compare_masks(ref, got.mask, TOL)
    assert rep.ok, rep.summary()


def test_selection_matches_on_gqa_partial_bf16():
    """Partial last blocks, GQA and bf16 inputs through MoBA and Quest."""
    import ml_dtypes

    q, k, _ = synthetic(1, 4, 2, 1000, 64, seed=5)
    q, k = q.astype(ml_dtypes.bfloat16), k.astype(ml_dtypes.bfloat16)
    for method in ("moba", "quest"):
        ref = refattn.select(q, k, method, backend="numpy", **METHODS[method])
        got = refattn.select(q, k, method, backend="numba", **METHODS[method])
        rep = compare_masks(ref, got.mask, TOL)
        assert rep.ok, rep.summary()


def test_outputs_default_to_float32_and_out_is_checked():
    q, k, _ = synthetic(1, 2, 1, 100, 32, seed=1)
    moba = registry.implementations("moba_score")["numba"]
    (gate,) = moba(q, k, 32)
    assert gate.dtype == np.float32 and gate.shape == (1, 2, 100, 4)
    g64 = np.full((1, 2, 100, 4), np.nan)
    (same,) = moba(q, k, 32, out=(g64,))
    assert same is g64 and np.isfinite(g64).all()
    np.testing.assert_allclose(g64, gate, rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="out"):
        moba(q, k, 32, out=(np.empty((1, 2, 100, 3), np.float32),))
    with pytest.raises(InputError, match="multiple"):
        moba(q, k[:, :1].repeat(3, axis=1), 32)
    with pytest.raises(InputError, match="float"):
        moba(q.astype(np.int32), k, 32)
    xatt = registry.implementations("xattention_score")["numba"]
    with pytest.raises(InputError, match="equal"):
        xatt(q, k[:, :, :90], 32, 8, 64, 1.0, True)


@pytest.mark.parametrize("Sq,Sk,bs,gs,stride,causal", [
    (1100, 1100, 32, 2, 1, True),     # several row tiles and key chunks (512 keys each)
    (700, 1500, 64, 4, 3, True),      # Sq < Sk, stride not dividing the block
    (1300, 600, 16, 2, 2, True),      # Sq > Sk: leading rows see no key
    (900, 900, 100, 4, 4, False)])
def test_proxyattn_kernels_match_reference_in_float64(Sq, Sk, bs, gs, stride, causal):
    """ProxyAttn's two ops (strided proxy max map, last-block budget mass): output shapes,
    float32 by default, and with a float64 ``out=`` the reference to float64 rounding, on
    inputs large enough for several row tiles and key chunks (the registry cases fit in
    one chunk)."""
    from refattn.methods.proxyattn import proxyattn_budget_scores, proxyattn_proxy_scores

    rng = np.random.default_rng(Sq + Sk)
    q = (2 * rng.standard_normal((1, 4, Sq, 32))).astype(np.float32)
    k = (2 * rng.standard_normal((1, 2, Sk, 32))).astype(np.float32)
    proxy = registry.implementations("proxyattn_score")["numba"]
    budget = registry.implementations("proxyattn_budget_score")["numba"]
    qb, kb = -(-Sq // bs), -(-Sk // bs)
    (S32,) = proxy(q, k, bs, gs, stride, causal)
    (a32,) = budget(q, k, bs, causal)
    assert S32.dtype == np.float32 and S32.shape == (1, 4 // gs, qb, kb)
    assert a32.dtype == np.float32 and a32.shape == (1, 4, kb)
    (S,) = proxyattn_proxy_scores(q, k, bs, gs, stride, causal)
    (a,) = proxyattn_budget_scores(q, k, bs, causal)
    (S64,) = proxy(q, k, bs, gs, stride, causal, out=(np.full(S.shape, np.nan),))
    (a64,) = budget(q, k, bs, causal, out=(np.full(a.shape, np.nan),))
    np.testing.assert_allclose(S64, S, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(a64, a, rtol=1e-11, atol=1e-16)
    np.testing.assert_allclose(S32, S, rtol=1e-6, atol=1e-7)
    # each row of the last query block sees a key here, so its token softmax sums to 1:
    # the true-length block means, times the block lengths, sum to 1 per head
    cnt = np.minimum(bs, Sk - np.arange(kb) * bs)
    np.testing.assert_allclose((a64 * cnt).sum(axis=-1), 1.0, rtol=1e-12)
    # the diagonal tile of a causal Sq == Sk map holds row 0 / key 0 of block 0: P = 1
    if causal and Sq == Sk:
        np.testing.assert_allclose(S64[:, :, 0, 0], 1.0, rtol=1e-12)


def test_proxyattn_kernel_errors_and_empty_queries():
    q, k, _ = synthetic(1, 4, 2, 100, 32, seed=2)
    proxy = registry.implementations("proxyattn_score")["numba"]
    budget = registry.implementations("proxyattn_budget_score")["numba"]
    for gs in (1, 3, 8):                  # not a multiple of the GQA group (2) dividing Hq
        with pytest.raises(InputError, match="group_size"):
            proxy(q, k, 32, gs, 1, True)
    with pytest.raises(InputError, match="stride"):
        proxy(q, k, 32, 2, 0, True)
    with pytest.raises(InputError, match="block_size"):
        budget(q, k, 0, True)
    with pytest.raises(InputError, match="out"):
        budget(q, k, 32, True, out=(np.empty((1, 4, 4, 4), np.float32),))   # the old shape
    (a,) = budget(q[:, :, :0], k, 32, True, out=(np.full((1, 4, 4), np.nan, np.float32),))
    assert (a == 0).all()
