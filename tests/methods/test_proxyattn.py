"""ProxyAttn (paper-level reference, Eq. 1-3 and Algorithm 1; the official code
wyxstriker/ProxyAttn was not read): strided max-pooled proxy scores against loop
re-derivations, per-head budgets, group sharing, forced blocks, shapes and parameter errors.
There are no official conformance vectors."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.core.blockmask import legal_blocks
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods.proxyattn import (
    budgets_from_mass,
    proxyattn_budget_scores,
    proxyattn_proxy_scores,
)


def _proxy_loop(q, k, b, group, stride, causal=True):
    """Loop re-derivation of the proxy block scores (Eq. 1-2 with the stride) for batch 0.
    q [Hq,Sq,D], k [Hkv,Sk,D]."""
    Hq, Sq, D = q.shape
    Hkv, Sk, _ = k.shape
    G = Hq // Hkv
    qb, kb = -(-Sq // b), -(-Sk // b)
    out = np.zeros((Hq // group, qb, kb))
    for c in range(Hq // group):
        heads = range(c * group, (c + 1) * group)
        qt = np.mean([q[h].astype(np.float64) for h in heads], axis=0)
        kt = np.mean([k[h // G].astype(np.float64) for h in heads], axis=0)   # per q head
        for r in range(0, Sq, stride):                      # first token of each window
            vis = [t for t in range(0, Sk, stride) if not causal or t <= r + Sk - Sq]
            if not vis:
                continue
            z = np.array([qt[r] @ kt[t] for t in vis]) / math.sqrt(D)
            e = np.exp(z - z.max())
            e /= e.sum()
            for t, a in zip(vis, e, strict=True):
                out[c, r // b, t // b] = max(out[c, r // b, t // b], a)
    return out


@pytest.mark.parametrize("Sq,Sk,b,group,stride", [(200, 200, 32, 2, 1), (130, 130, 32, 4, 5),
                                                  (70, 150, 16, 2, 3), (150, 70, 16, 2, 3),
                                                  (100, 100, 32, 2, 40), (100, 100, 8, 4, 12)])
def test_proxy_scores_match_loops(Sq, Sk, b, group, stride):
    rng = np.random.default_rng(Sq + Sk)
    q = rng.standard_normal((1, 4, Sq, 16)).astype(np.float32) * 2
    k = rng.standard_normal((1, 2, Sk, 16)).astype(np.float32)
    (S,) = proxyattn_proxy_scores(q, k, b, group, stride, True)
    np.testing.assert_allclose(S[0], _proxy_loop(q[0], k[0], b, group, stride), atol=1e-12)
    (S,) = proxyattn_proxy_scores(q, k, b, group, stride, False)
    np.testing.assert_allclose(S[0], _proxy_loop(q[0], k[0], b, group, stride, False), atol=1e-12)


def test_stride_one_single_head_is_the_block_max_of_exact_attention():
    """MHA, group_size=1, stride=1: the proxy score is the max of the head's own exact
    attention probabilities over each tile (Eq. 1 without any approximation)."""
    q, k, _ = synthetic(1, 2, 2, 256, 32, seed=1)
    (S,) = proxyattn_proxy_scores(q, k, 32, 1, 1, True)
    s = (q[0].astype(np.float64) @ np.swapaxes(k[0], -1, -2)) / math.sqrt(32)
    s = np.where(np.tril(np.ones((256, 256), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(S[0], p.reshape(2, 8, 32, 8, 32).max(axis=(2, 4)), atol=1e-12)


def test_budget_scores_and_budgets():
    """Algorithm 1: avg-pooled token attention of the last query block, then the fewest top
    blocks whose normalised cumulative share reaches gamma."""
    q, k, _ = synthetic(1, 2, 1, 300, 32, seed=2)
    (a,) = proxyattn_budget_scores(q, k, 64, True)
    assert a.shape == (1, 2, 5)
    s = (q[0, :, 256:].astype(np.float64) @ k[0, 0].astype(np.float64).T) / math.sqrt(32)
    s = np.where(np.arange(300)[None, :] <= np.arange(256, 300)[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)                                     # [2, 44, 300]
    lens = np.array([64, 64, 64, 64, 44])
    want = np.stack([p[..., 64 * j:64 * j + lens[j]].sum((-1, -2)) for j in range(5)], -1)
    np.testing.assert_allclose(a[0], want / (44 * lens), atol=1e-12)
    valid = np.ones(5, bool)
    for gamma in (0.0, 0.5, 0.9, 1.0):
        bud = budgets_from_mass(a, gamma, valid, 0, None)
        for h in range(2):
            srt = np.sort(a[0, h])[::-1] / a[0, h].sum()
            need = 0 if gamma == 0 else next(
                (i + 1 for i in range(5) if srt[:i + 1].sum() >= gamma), 5)
            assert bud[0, h] == need
    assert (budgets_from_mass(a, 0.0, valid, 2, None) == 2).all()
    assert (budgets_from_mass(a, 1.0, valid, 1, 2) <= 2).all()
    assert (budgets_from_mass(np.zeros((1, 2, 5)), 0.5, valid, 0, None) == 0).all()


def test_default_min_budget_is_2048_tokens():
    from refattn.methods.proxyattn import ProxyAttnParams
    assert ProxyAttnParams().resolved_min_budget() == 16
    assert ProxyAttnParams(block_size=64).resolved_min_budget() == 32
    assert ProxyAttnParams(block_size=100).resolved_min_budget() == 21
    assert ProxyAttnParams(min_budget=3).resolved_min_budget() == 3


def test_selection_follows_budgets_and_shared_ranking():
    q, k, v = synthetic(1, 4, 2, 640, 32, seed=4)
    sel = refattn.select(q, k, "proxyattn", block_size=64, gamma=0.9, min_budget=1)
    bud = sel.extras["budgets"]                                           # [B, Hq]
    assert bud.shape == (1, 4)
    legal = legal_blocks(640, 640, 64, 64, True)
    np.testing.assert_array_equal(sel.mask.mask.sum(-1),                 # exactly the budget
                                  np.minimum(bud[..., None], legal.sum(-1)))
    assert len(np.unique(bud)) > 1                                       # heads differ
    S = sel.scores.scores
    for h in range(4):                                                   # top-budget of S
        for I in range(10):
            row = S[0, h, I]
            kept = np.nonzero(sel.mask.mask[0, h, I])[0]
            if len(kept):
                assert row[kept].min() >= np.max(np.where(sel.mask.mask[0, h, I], -np.inf, row))
    # heads of one group share the ranking: the smaller budget's set is inside the larger's
    for g in range(2):
        m0, m1 = sel.mask.mask[0, 2 * g], sel.mask.mask[0, 2 * g + 1]
        small, large = (m0, m1) if bud[0, 2 * g] <= bud[0, 2 * g + 1] else (m1, m0)
        assert not (small & ~large).any()
    np.testing.assert_array_equal(S[0, 0], S[0, 1])
    # the budget is Algorithm 1 on the head's own last-block attention
    (a,) = proxyattn_budget_scores(q, k, 64, True)
    np.testing.assert_array_equal(bud, budgets_from_mass(a, 0.9, legal[-1], 1, None))


def test_forced_blocks_and_gamma_limits():
    q, k, v = synthetic(1, 2, 1, 400, 32, seed=5)
    sel = refattn.select(q, k, "proxyattn", block_size=64, gamma=0.0, min_budget=0,
                         force_sink=True, force_recent=True)
    n = 7
    assert sel.mask.mask[..., 0].all()
    assert sel.mask.mask[..., np.arange(n), np.arange(n)].all()
    assert sel.mask.mask.sum() == sel.forced.sum()                       # gamma 0: only forced
    plain = refattn.select(q, k, "proxyattn", block_size=64, gamma=0.0, min_budget=0)
    assert not plain.mask.mask.any() and not plain.forced.any()          # paper: no forcing
    full = refattn.select(q, k, "proxyattn", block_size=64, gamma=1.0, min_budget=0)
    np.testing.assert_allclose(refattn.attention(q, k, v, mask=full, causal=True),
                               refattn.attention(q, k, v, causal=True), atol=1e-12)
    counts = [refattn.select(q, k, "proxyattn", block_size=64, gamma=g, min_budget=0)
              .mask.mask.sum() for g in (0.5, 0.8, 0.95)]
    assert counts == sorted(counts)
    # the default minimum (2048 tokens = 32 blocks of 64) covers this whole prompt
    dflt = refattn.select(q, k, "proxyattn", block_size=64, gamma=0.0)
    assert (dflt.mask.mask == legal_blocks(400, 400, 64, 64, True)).all()


def test_group_size_across_kv_heads_pools_keys():
    q, k, _ = synthetic(1, 4, 2, 160, 16, seed=7)
    sel = refattn.select(q, k, "proxyattn", block_size=32, group_size=4)
    np.testing.assert_array_equal(sel.scores.scores[0, 0], sel.scores.scores[0, 3])
    assert sel.extras["group_size"] == 4
    (S,) = proxyattn_proxy_scores(q, k, 32, 4, 4, True)
    np.testing.assert_allclose(S[0], _proxy_loop(q[0], k[0], 32, 4, 4), atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(Sq=st.integers(1, 150), extra=st.integers(0, 60), b=st.sampled_from([8, 16, 32]),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 1)]), B=st.integers(1, 2),
       stride=st.integers(1, 9), causal=st.booleans(), gamma=st.floats(0, 1),
       seed=st.integers(0, 500))
def test_shapes(Sq, extra, b, heads, B, stride, causal, gamma, seed):
    Hq, Hkv = heads
    Sk = Sq + extra
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, Sq, 16)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, Sk, 16)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, Sk, 16)).astype(np.float32)
    sel = refattn.select(q, k, "proxyattn", block_size=b, stride=stride, gamma=gamma,
                         causal=causal, min_budget=1)
    qb, kb = -(-Sq // b), -(-Sk // b)
    assert sel.mask.shape == (B, Hq, qb, kb)
    assert sel.extras["budgets"].shape == (B, Hq)
    sel.mask.check()
    legal = legal_blocks(Sq, Sk, b, b, causal)
    assert not (sel.mask.mask & ~legal).any()
    assert sel.mask.mask[..., legal.any(-1), :].any(-1).all()            # every live row keeps one
    out = refattn.attention(q, k, v, mask=sel, causal=causal)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("kw,word", [({"block_size": 0}, "block_size"), ({"gamma": 1.2}, "gamma"),
                                     ({"stride": 0}, "stride"), ({"group_size": 3}, "group_size"),
                                     ({"group_size": 1}, "group_size"),
                                     ({"min_budget": -1}, "min_budget"),
                                     ({"min_budget": 3, "max_budget": 2}, "max_budget"),
                                     ({"tie": "x"}, "tie"), ({"topk": 4}, "topk")])
def test_bad_params(kw, word):
    q, k, _ = synthetic(1, 4, 2, 64, 16, seed=0)
    with pytest.raises(InputError, match=word):
        refattn.select(q, k, "proxyattn", **kw)
