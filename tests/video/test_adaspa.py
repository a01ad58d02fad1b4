"""AdaSpa (paper only): blockified attention mass, row-wise top-k, text sink, head-adaptive
sparsity, LSE-cached search, kernels, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.testing import assert_mask_matches
from refattn.video.adaspa import adapt_sparsity, adaspa_block_mass, row_budget, text_blocks


def _qkv(B=1, Hq=4, Hkv=2, L=200, D=32, seed=0):
    return synthetic(B, Hq, Hkv, L, D, seed=seed)


def brute_mass(q, k, lse, bs, causal):
    """Pair-by-pair transliteration of W[p,c] = sum exp(s q_i.k_j - lse_i)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    W = np.zeros((B, Hq, -(-Sq // bs), -(-Sk // bs)))
    for b in range(B):
        for h in range(Hq):
            for i in range(Sq):
                if not np.isfinite(lse[b, h, i]):
                    continue
                for j in range(Sk):
                    if causal and j > i + Sk - Sq:
                        continue
                    s = float(q[b, h, i].astype(np.float64) @ k[b, h // (Hq // Hkv), j].astype(np.float64))
                    W[b, h, i // bs, j // bs] += math.exp(s / math.sqrt(D) - lse[b, h, i])
    return W


@pytest.mark.parametrize("causal,Sq,Sk", [(False, 45, 45), (True, 45, 45), (True, 50, 31)])
def test_block_mass_matches_brute_force(causal, Sq, Sk):
    q, k, _ = synthetic(1, 2, 1, max(Sq, Sk), 16, q_len=Sq, seed=3)
    k = k[:, :, :Sk]
    from refattn.video.adaspa import exact_lse
    lse = exact_lse(q, k, causal, 0.25)
    (W,) = adaspa_block_mass(q, k, lse, 8, 0.25, causal)
    np.testing.assert_allclose(W, brute_mass(q, k, lse, 8, causal), rtol=1e-12, atol=1e-12)
    # exact LSE: every query row has mass 1, so a block row sums to its real rows that see a key
    rows = np.isfinite(lse[0, 0]).astype(float)
    want = np.add.reduceat(rows, np.arange(0, Sq, 8))
    np.testing.assert_allclose(W[0, 0].sum(-1), want, rtol=1e-12)


def test_row_topk_without_adaptation():
    q, k, _ = _qkv()
    sel = refattn.select(q, k, "adaspa", causal=False, block_size=16, sparsity=0.75,
                         head_adaptive=False)
    W, m = sel.scores.scores, sel.mask.mask
    kb = W.shape[-1]
    want = math.ceil(0.25 * kb)
    assert (m.sum(-1) == want).all()
    for b, h, r in np.ndindex(*W.shape[:3]):   # the selected blocks are the top ones
        order = sorted(range(kb), key=lambda j: (-W[b, h, r, j], j))[:want]
        assert set(np.flatnonzero(m[b, h, r])) == set(order)
        assert sel.boundary[b, h, r] == W[b, h, r, order[-1]]
    np.testing.assert_allclose(sel.extras["head_sparsity"], 0.75)


def test_rounding_ignores_binary_noise():
    assert row_budget(0.8, np.array([10]), "ceil")[0] == 2          # 0.2*10 = 2.0000000000000004
    assert row_budget(0.85, np.array([10]), "ceil")[0] == 2
    assert row_budget(0.85, np.array([10]), "floor")[0] == 1
    assert row_budget(0.75, np.array([10]), "round")[0] == 2        # 2.5 -> 2 (half to even)


@pytest.mark.parametrize("position", ["last", "first"])
def test_text_sink_blocks_forced_and_outside_budget(position):
    grid, T = (3, 4, 5), 17
    L = 60 + T
    q, k, _ = _qkv(L=L, seed=5)
    sel = refattn.select(q, k, "adaspa", causal=False, grid=grid, text_tokens=T,
                         text_position=position, block_size=8, head_adaptive=False)
    tb = text_blocks(L, 8, T, position)
    assert tb.sum() == 3  # tokens 60..76 (last) or 0..16 (first) touch 3 blocks of 8
    m, forced = sel.mask.mask, sel.forced
    assert m[:, :, tb].all() and m[:, :, :, tb].all()
    assert forced[:, :, tb].all() and forced[:, :, :, tb].all()
    # video rows: text columns plus exactly ceil(0.2 * Kb) blocks by score
    by_score = (m & ~forced)[:, :, ~tb]
    assert (by_score.sum(-1) == math.ceil(0.2 * tb.size)).all()
    off = refattn.select(q, k, "adaspa", causal=False, grid=grid, text_tokens=T,
                         text_position=position, block_size=8, head_adaptive=False, text_sink=False)
    assert not off.forced.any()


def test_head_adaptive_rule():
    rec = np.array([[0.9, 0.5, 0.85, 0.6, 0.2, 0.95]])            # 3 heads above 0.8
    s = adapt_sparsity(rec, 0.8, 0.8)
    np.testing.assert_allclose(s, [[0.9, 0.7, 0.9, 0.7, 0.7, 0.9]])
    np.testing.assert_allclose(s.mean(), 0.8)
    s = adapt_sparsity(np.array([[0.9, 0.95, 0.99]]), 0.8, 0.8)    # n = 3 capped at H // 2 = 1
    np.testing.assert_allclose(s, [[0.7, 0.8, 0.9]])
    s = adapt_sparsity(np.array([[0.9, 0.1]]), 0.2, 0.8)           # (3*0.2 - 1)/2 < 0 -> 0
    np.testing.assert_allclose(s, [[0.6, 0.0]])


def test_head_adaptive_selection_uses_per_head_budgets():
    q, k, _ = _qkv(Hq=4, seed=7)
    sel = refattn.select(q, k, "adaspa", causal=False, block_size=16, sparsity=0.8)
    rho = sel.extras["head_sparsity"]
    np.testing.assert_allclose(rho, adapt_sparsity(sel.extras["recall_base"], 0.8, 0.8))
    kb = sel.mask.shape[-1]
    for h in range(4):
        assert (sel.mask.mask[0, h].sum(-1) == row_budget(rho[0, h], np.array([kb]), "ceil")[0]).all()
    assert (sel.extras["recall"] <= 1 + 1e-12).all()


def test_cached_lse():
    q, k, v = _qkv(seed=11)
    base = refattn.select(q, k, "adaspa", causal=False, block_size=16)
    _, lse = refattn.attention(q, k, v, return_lse=True)
    same = refattn.select(q, k, "adaspa", causal=False, block_size=16, lse=lse)
    np.testing.assert_allclose(same.scores.scores, base.scores.scores, rtol=1e-12)
    assert same.mask == base.mask
    stale = refattn.select(q, k, "adaspa", causal=False, block_size=16, lse=lse + 0.5)
    np.testing.assert_allclose(stale.scores.scores, base.scores.scores * np.exp(-0.5), rtol=1e-12)


def test_numba_backend_and_attention():
    q, k, v = _qkv(seed=13, L=190)
    ref = refattn.select(q, k, "adaspa", causal=False, block_size=32, text_tokens=20)
    nb = refattn.select(q, k, "adaspa", causal=False, block_size=32, text_tokens=20, backend="numba")
    # the numba LSE comes from the float32 attention kernel
    np.testing.assert_allclose(nb.scores.scores, ref.scores.scores, rtol=2e-5, atol=1e-9)
    assert_mask_matches(ref, nb.mask, tol=1e-4)
    out = refattn.attention(q, k, v, mask=ref)
    assert np.isfinite(out).all()
    with pytest.raises(InputError):
        refattn.select(q, k, "adaspa")                        # causal by default: refused


@pytest.mark.parametrize("kw", [dict(sparsity=1.5), dict(rounding="up"), dict(block_size=0),
                                dict(grid=(2, 3, 4)), dict(lse=np.zeros((1, 4, 5))),
                                dict(text_position="middle"), dict(head_adaptive=1)])
def test_errors(kw):
    q, k, _ = _qkv(L=64)
    with pytest.raises(InputError):
        refattn.select(q, k, "adaspa", causal=False, **kw)


def test_kernel_registry_check():
    """The registry-driven kernel check (tests/test_registry.py) on this method's op; run
    here too because that module only sees ops whose modules are imported at collection."""
    from test_registry import test_kernel_matches_reference

    import refattn.cases.video_scores  # noqa: F401

    test_kernel_matches_reference("adaspa_block_mass", "numba")
