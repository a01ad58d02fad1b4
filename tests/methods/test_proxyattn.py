"""ProxyAttn (paper-level reference; the official code wyxstriker/ProxyAttn was not read):
proxy scores against loop re-derivations, budgets, group sharing, forced blocks, shapes
and parameter errors. There are no official conformance vectors."""
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
    """Loop re-derivation of the proxy block scores for batch 0. q [Hq,Sq,D], k [Hkv,Sk,D]."""
    Hq, Sq, D = q.shape
    Hkv, Sk, _ = k.shape
    G = Hq // Hkv
    qb, kb = -(-Sq // b), -(-Sk // b)
    out = np.zeros((Hq // group, qb, kb))
    for c in range(Hq // group):
        heads = range(c * group, (c + 1) * group)
        qt = np.mean([q[h].astype(np.float64) for h in heads], axis=0)
        kt = np.mean([k[g].astype(np.float64) for g in sorted({h // G for h in heads})], axis=0)
        for I in range(qb):
            last = min(Sq, (I + 1) * b) - 1
            rows = [r for r in range(I * b, last + 1) if (last - r) % stride == 0]
            for r in rows:
                vis = [t for t in range(Sk) if not causal or t <= r + Sk - Sq]
                if not vis:
                    continue
                z = np.array([qt[r] @ kt[t] for t in vis]) / math.sqrt(D)
                e = np.exp(z - z.max())
                e /= e.sum()
                for t, a in zip(vis, e, strict=True):
                    out[c, I, t // b] += a / len(rows)
    return out


@pytest.mark.parametrize("Sq,Sk,b,group,stride", [(200, 200, 32, 2, 1), (130, 130, 32, 4, 5),
                                                  (70, 150, 16, 1, 3), (100, 100, 32, 2, 40)])
def test_proxy_scores_match_loops(Sq, Sk, b, group, stride):
    q, k, _ = synthetic(1, 4, 2, Sk, 16, q_len=Sq, seed=Sq)
    (S,) = proxyattn_proxy_scores(q, k, b, group, stride, True)
    np.testing.assert_allclose(S[0], _proxy_loop(q[0], k[0], b, group, stride), atol=1e-12)


def test_single_head_groups_give_exact_block_mass():
    """group_size=1, stride=1: the proxy score is the head's own exact attention mass."""
    q, k, _ = synthetic(1, 2, 2, 256, 32, seed=1)
    (S,) = proxyattn_proxy_scores(q, k, 32, 1, 1, True)
    s = (q[0].astype(np.float64) @ np.swapaxes(k[0], -1, -2)) / math.sqrt(32)
    s = np.where(np.tril(np.ones((256, 256), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    mass = p.reshape(2, 8, 32, 8, 32).sum(axis=4).mean(axis=2)
    np.testing.assert_allclose(S[0], mass, atol=1e-12)


def test_budget_scores_and_budgets():
    q, k, _ = synthetic(1, 2, 1, 300, 32, seed=2)
    (a,) = proxyattn_budget_scores(q, k, 64, True)
    legal = legal_blocks(300, 300, 64, 64, True)
    np.testing.assert_allclose(a.sum(-1), 1.0, atol=1e-12)
    assert (a[..., ~legal] == 0).all()
    qm = np.stack([q[0, :, i * 64:(i + 1) * 64].astype(np.float64).mean(1) for i in range(5)], 1)
    km = np.stack([k[0, 0, i * 64:(i + 1) * 64].astype(np.float64).mean(0) for i in range(5)])
    z = np.where(legal, qm @ km.T / math.sqrt(32), -np.inf)       # true-length means
    e = np.exp(z - z.max(-1, keepdims=True))
    np.testing.assert_allclose(a[0], e / e.sum(-1, keepdims=True), atol=1e-12)
    for gamma in (0.0, 0.5, 0.9, 1.0):
        bud = budgets_from_mass(a, gamma, legal, 0, None)
        for h in range(2):
            for I in range(5):
                srt = np.sort(a[0, h, I][legal[I]])[::-1]
                need = 0 if gamma == 0 else next(
                    (i + 1 for i in range(len(srt)) if srt[:i + 1].sum() >= gamma), len(srt))
                assert bud[0, h, I] == need
    assert (budgets_from_mass(a, 0.0, legal, 2, None) == np.minimum(2, legal.sum(-1))).all()
    assert (budgets_from_mass(a, 1.0, legal, 1, 2) <= 2).all()


def test_selection_follows_budgets_and_shared_ranking():
    q, k, v = synthetic(1, 4, 2, 640, 32, seed=4)
    sel = refattn.select(q, k, "proxyattn", block_size=64, gamma=0.9, force_sink=False,
                         force_recent=False)
    bud = sel.extras["budgets"]
    np.testing.assert_array_equal(sel.mask.mask.sum(-1), bud)           # exactly the budget
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
        small = np.where((bud[0, 2 * g] <= bud[0, 2 * g + 1])[:, None], m0, m1)
        large = np.where((bud[0, 2 * g] <= bud[0, 2 * g + 1])[:, None], m1, m0)
        assert not (small & ~large).any()
    np.testing.assert_array_equal(S[0, 0], S[0, 1])


def test_forced_blocks_and_gamma_limits():
    q, k, v = synthetic(1, 2, 1, 400, 32, seed=5)
    sel = refattn.select(q, k, "proxyattn", block_size=64, gamma=0.0, min_budget=0)
    n = 7
    assert sel.mask.mask[..., 0].all()
    assert sel.mask.mask[..., np.arange(n), np.arange(n)].all()
    assert sel.mask.mask.sum() == sel.forced.sum()                       # gamma 0: only forced
    full = refattn.select(q, k, "proxyattn", block_size=64, gamma=1.0)
    np.testing.assert_allclose(refattn.attention(q, k, v, mask=full, causal=True),
                               refattn.attention(q, k, v, causal=True), atol=1e-12)
    counts = [refattn.select(q, k, "proxyattn", block_size=64, gamma=g).mask.mask.sum()
              for g in (0.5, 0.8, 0.95)]
    assert counts == sorted(counts)


def test_group_size_across_kv_heads_pools_keys():
    q, k, _ = synthetic(1, 4, 2, 160, 16, seed=7)
    sel = refattn.select(q, k, "proxyattn", block_size=32, group_size=4)
    np.testing.assert_array_equal(sel.scores.scores[0, 0], sel.scores.scores[0, 3])
    assert sel.extras["group_size"] == 4
    (S,) = proxyattn_proxy_scores(q, k, 32, 4, 1, True)
    np.testing.assert_allclose(S[0], _proxy_loop(q[0], k[0], 32, 4, 1), atol=1e-12)


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
                         causal=causal)
    qb, kb = -(-Sq // b), -(-Sk // b)
    assert sel.mask.shape == (B, Hq, qb, kb)
    assert sel.extras["budgets"].shape == (B, Hq, qb)
    sel.mask.check()
    legal = legal_blocks(Sq, Sk, b, b, causal)
    assert not (sel.mask.mask & ~legal).any()
    assert sel.mask.mask[..., legal.any(-1), :].any(-1).all()            # every live row keeps one
    out = refattn.attention(q, k, v, mask=sel, causal=causal)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("kw,word", [({"block_size": 0}, "block_size"), ({"gamma": 1.2}, "gamma"),
                                     ({"stride": 0}, "stride"), ({"group_size": 3}, "group_size"),
                                     ({"min_budget": -1}, "min_budget"),
                                     ({"min_budget": 3, "max_budget": 2}, "max_budget"),
                                     ({"tie": "x"}, "tie"), ({"topk": 4}, "topk")])
def test_bad_params(kw, word):
    q, k, _ = synthetic(1, 4, 2, 64, 16, seed=0)
    with pytest.raises(InputError, match=word):
        refattn.select(q, k, "proxyattn", **kw)
