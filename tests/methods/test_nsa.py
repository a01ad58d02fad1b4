"""NSA selection branch (mean-pooled compressor): the rule against a transliteration of the
paper's equations 7-11, GQA sharing, forced blocks, structure, parameter errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods.nsa import overlap_weights, spread_to_blocks
from refattn.testing import op_cases

# The kernel cases of this op live in refattn/cases/llm_scoring.py.


def test_op_cases_run_on_the_reference():
    from refattn.methods.nsa import nsa_scores
    for case in op_cases("nsa_score", np.random.default_rng(0)):
        p_slc, p_cmp = nsa_scores(*case["args"])
        assert np.isfinite(p_slc).all() and np.isfinite(p_cmp).all()


def brute_nsa(q, k, l, d, lp, n, sink, recent, causal=True):
    """Token-by-token transliteration of the paper's equations with mean pooling:
    (mask [B, Hkv, Sq, Kb], p_slc [B, Hkv, Sq, Kb])."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kb = -(-Sk // lp)
    nc = (Sk - l) // d + 1 if Sk >= l else 0
    mask = np.zeros((B, Hkv, Sq, kb), bool)
    pslc = np.zeros((B, Hkv, Sq, kb))
    for b in range(B):
        for g in range(Hkv):
            kc = [k[b, g, i * d:i * d + l].astype(np.float64).mean(0) for i in range(nc)]
            for t in range(Sq):
                p = t + Sk - Sq
                for h in range(g * G, (g + 1) * G):
                    seen = [i for i in range(nc) if (not causal) or i * d + l - 1 <= p]
                    if not seen:
                        continue
                    lg = np.array([q[b, h, t].astype(np.float64) @ kc[i] / np.sqrt(D) for i in seen])
                    pc = np.exp(lg - lg.max())
                    pc /= pc.sum()
                    for i, pi in zip(seen, pc, strict=True):
                        # eq. 9: each stride-long piece of compression block i lands in one
                        # selection block (d divides l and l')
                        for m in range(l // d):
                            start = i * d + m * d
                            pslc[b, g, t, start // lp] += pi
                if p < 0 and causal:
                    continue
                c = p // lp
                vis = list(range(c + 1)) if causal else list(range(kb))
                forced = {j for j in vis if j < sink or c - recent < j <= c}
                rest = sorted((j for j in vis if j not in forced),
                              key=lambda j: (-pslc[b, g, t, j], j))
                chosen = list(forced) + rest[:max(n - len(forced), 0)]
                mask[b, g, t, chosen] = True
    return mask, pslc


def test_default_geometry_matches_paper():
    W = overlap_weights(1024, 32, 16, 64)
    j = 5
    rows = np.nonzero(W[:, j])[0]
    np.testing.assert_array_equal(rows, np.arange(4 * j - 1, 4 * j + 4))
    np.testing.assert_array_equal(W[rows, j], [1, 2, 2, 2, 1])
    # every compression block distributes l/d = 2 units over the selection blocks
    np.testing.assert_array_equal(W.sum(1), 2.0)
    # the piecewise computation used by the reference equals the dense weights
    for sk, l, d, lp in ((1024, 32, 16, 64), (1000, 32, 16, 64), (77, 6, 3, 9), (40, 8, 8, 8)):
        W = overlap_weights(sk, l, d, lp)
        p = np.random.default_rng(sk).random((3, W.shape[0]))
        np.testing.assert_allclose(spread_to_blocks(p, sk, l, d, lp), p @ W, rtol=1e-13)


def test_matches_transliteration_default_params():
    q, k, _ = synthetic(1, 4, 2, 520, 32, seed=11)
    sel = refattn.select(q, k, "nsa", topk=4)
    mask, pslc = brute_nsa(q, k, 32, 16, 64, 4, 1, 2)
    np.testing.assert_array_equal(sel.mask.mask, mask)
    vis = np.isfinite(sel.scores.scores)
    np.testing.assert_allclose(sel.scores.scores[vis], pslc[vis], rtol=1e-12, atol=1e-14)
    assert sel.mask.head_kind == "kv" and sel.mask.shape[1] == 2


@given(sk=st.integers(1, 90), dq=st.integers(-3, 89), d=st.sampled_from([1, 2, 4]),
       lm=st.integers(1, 3), lpm=st.integers(1, 4), n=st.integers(1, 6),
       sink=st.integers(0, 2), recent=st.integers(0, 2), hkv=st.integers(1, 2),
       grp=st.integers(1, 3), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes_match_transliteration(sk, dq, d, lm, lpm, n, sink, recent, hkv, grp,
                                             causal, seed):
    if sink + recent > n:
        n = sink + recent
    sq = max(1, sk - dq)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, hkv * grp, sq, 8)).astype(np.float32)
    k = rng.standard_normal((1, hkv, sk, 8)).astype(np.float32)
    v = rng.standard_normal((1, hkv, sk, 8)).astype(np.float32)
    kw = dict(compress_size=lm * d, stride=d, block_size=lpm * d, topk=n, force_sink=sink,
              force_recent=recent)
    sel = refattn.select(q, k, "nsa", causal=causal, **kw)
    mask, _ = brute_nsa(q, k, lm * d, d, lpm * d, n, sink, recent, causal)
    np.testing.assert_array_equal(sel.mask.mask, mask)
    assert np.isfinite(refattn.attention(q, k, v, mask=sel, causal=causal)).all()


def test_probabilities_group_sum_and_forced_blocks():
    q, k, _ = synthetic(1, 4, 1, 1200, 32, seed=2)
    sel = refattn.select(q, k, "nsa")
    p_cmp = sel.extras["p_cmp"]                                   # [1, 4, 1200, Nc]
    seen_any = np.arange(1200) >= 31
    np.testing.assert_allclose(p_cmp.sum(-1)[..., seen_any], 1.0, rtol=1e-12)
    assert (p_cmp[..., ~seen_any, :] == 0).all()
    # group-summed selection scores: 4 heads, each distributing l/d = 2 units of mass
    s = sel.scores.scores[0, 0]
    np.testing.assert_allclose(np.where(np.isfinite(s), s, 0).sum(-1)[seen_any], 8.0, rtol=1e-9)
    m = sel.mask.mask[0, 0]
    own = np.arange(1200) // 64
    assert m[:, 0].all() and m[np.arange(1200), own].all()
    assert m[np.arange(64, 1200), own[64:] - 1].all()
    np.testing.assert_array_equal(m.sum(-1), np.minimum(16, own + 1))
    assert sel.forced[0, 0].sum(-1).max() == 3


def test_structured_retrieval_block_is_selected():
    q, k, v = synthetic(1, 2, 1, 2048, 64, seed=4)
    u = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    k = k.copy()
    k[:, :, 640:704] += 2 * u                                     # selection block 10
    q = q.copy()
    q[:, :, 1900:] += 2 * u
    sel = refattn.select(q, k, "nsa")
    assert sel.mask.mask[0, 0, 1900:, 10].all()
    assert sel.mask.mask[0, 0, 1000:1500, 10].mean() < 0.9
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    assert out.shape == q.shape and np.isfinite(out).all()


@pytest.mark.parametrize("kw, name", [({"compress_size": 24}, "compress_size"),
                                      ({"block_size": 40}, "block_size"),
                                      ({"stride": 0}, "stride"),
                                      ({"topk": 2}, "topk"),
                                      ({"force_sink": -1}, "force_sink"),
                                      ({"tie": "x"}, "tie")])
def test_bad_parameters(kw, name):
    q = np.zeros((1, 1, 8, 4), np.float32)
    with pytest.raises(InputError, match=name):
        refattn.select(q, q, "nsa", **kw)
