"""PBS-Attn: official conformance vectors (xinghaow99/pbs-attn @ 8ce8e024), an independent
loop-based re-derivation of spec §7 on structured inputs, properties, shapes and errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
from conformance import load, vector_params
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic


def _sel(q, k, **kw):
    return refattn.select(q, k, "pbs", **kw)


def _brute(q, k, b, s, tau, force=True):
    """Loop-based re-derivation of spec §7 for one (batch, head) with Hq == Hkv, float64.

    Returns perm, p (NaN rows), block_mask (selection + forced token-0 block)."""
    q = q.astype(np.float64)
    k = k.astype(np.float64)
    L, D = q.shape
    n_seg = L // s
    perm = np.arange(L)
    if L > s and n_seg > 0:
        T = n_seg * s
        w = np.zeros(T)
        for i in range(max(0, L - b), L):
            z = np.array([q[i] @ k[t] for t in range(T)]) / math.sqrt(D)
            e = np.exp(z - z.max())
            w += e / e.sum()
        w /= min(b, L)
        for g in range(n_seg):
            idx = list(range(g * s, (g + 1) * s))
            idx.sort(key=lambda t: (-w[t], t))
            perm[g * s:(g + 1) * s] = idx
    n = -(-L // b)
    m = s // b
    qm, km = np.zeros((n, D)), np.zeros((n, D))
    for t in range(L):
        qm[t // b] += q[t] / b
    for u in range(L):
        km[u // b] += k[perm[u]] / b
    p = np.full((n, n), np.nan)
    mask = np.zeros((n, n), bool)
    for I in range(n):
        allowed = [J for J in range(n) if J // m != I // m and J <= I]
        if allowed:
            z = np.array([qm[I] @ km[J] for J in allowed]) / math.sqrt(D)
            e = np.exp(z - z.max())
            p[I] = 0.0
            p[I, allowed] = e / e.sum()
            order = sorted(allowed, key=lambda J: (-p[I, J], J))
            acc, total = 0.0, sum(p[I, J] for J in order)
            for J in order:
                acc += p[I, J]
                if acc >= tau * total:
                    mask[I, order[:order.index(J) + 1]] = True
                    break
    if force:
        mask[:, int(np.nonzero(perm == 0)[0][0]) // b] = True
    return perm, p, mask


def _token_rule(mask_full, perm, b, L):
    """bool [L, L] in original key coordinates: mask[I(t), J(u)] and perm[u] <= t."""
    tok = np.zeros((L, L), bool)
    for t in range(L):
        for u in range(L):
            if mask_full[t // b, u // b] and perm[u] <= t:
                tok[t, perm[u]] = True
    return tok


def _masked_attention(q, k, v, tok):
    s = (q.astype(np.float64) @ k.astype(np.float64).T) / math.sqrt(q.shape[-1])
    s = np.where(tok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("path", vector_params("pbs"))
def test_conformance(path):
    z = load(path)
    sel = _sel(z["q"], z["k"], block_size=int(z["param_block_size"]),
               segment_size=int(z["param_segment_size"]), tau=float(z["param_threshold"]),
               force_sink=bool(z["param_force_select_first_block"]))
    np.testing.assert_array_equal(sel.extras["perm"], z["perm_idx"])
    np.testing.assert_allclose(sel.extras["key_importance"], z["key_importance"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sel.scores.scores, z["block_scores"], rtol=1e-5, atol=1e-7,
                               equal_nan=True)
    np.testing.assert_array_equal(sel.extras["block_mask"], z["block_mask"])
    np.testing.assert_array_equal(sel.extras["segment_mask"], z["segment_mask"])
    if "attn_block_mask" in z:
        np.testing.assert_array_equal(sel.mask.mask, z["attn_block_mask"])
    if "out" in z:
        out = refattn.attention(z["q"], z["k"], z["v"], mask=sel, causal=True)
        np.testing.assert_allclose(out, z["out"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ re-derivation
@pytest.mark.parametrize("L,b,s,tau", [(300, 32, 64, 0.9), (257, 32, 96, 0.6),
                                       (200, 16, 64, 1.0), (150, 16, 32, 0.0)])
def test_matches_loop_rederivation(L, b, s, tau):
    q, k, v = synthetic(1, 2, 2, L, 32, seed=L)
    sel = _sel(q, k, block_size=b, segment_size=s, tau=tau)
    for h in range(2):
        perm, p, bm = _brute(q[0, h], k[0, h], b, s, tau)
        np.testing.assert_array_equal(sel.extras["perm"][0, h], perm)
        np.testing.assert_allclose(sel.scores.scores[0, h], p, rtol=1e-9, atol=1e-12,
                                   equal_nan=True)
        np.testing.assert_array_equal(sel.extras["block_mask"][0, h], bm)
        tok = _token_rule(sel.mask.mask[0, h], perm, b, L)
        np.testing.assert_array_equal(sel.extras["token_mask"].to_token_mask()[0, h], tok)
        out = refattn.attention(q, k, v, mask=sel, causal=True)[0, h]
        np.testing.assert_allclose(out, _masked_attention(q[0, h], k[0, h], v[0, h], tok),
                                   atol=1e-10)


# ------------------------------------------------------------------ properties
def test_properties_structured():
    L, b, s, tau = 640, 32, 128, 0.8
    q, k, v = synthetic(2, 4, 2, L, 32, seed=3)
    sel = _sel(q, k, block_size=b, segment_size=s, tau=tau)
    perm, w = sel.extras["perm"], sel.extras["key_importance"]
    n, m = -(-L // b), s // b
    for g in range(L // s):                       # a permutation inside every segment
        seg = perm[..., g * s:(g + 1) * s]
        np.testing.assert_array_equal(np.sort(seg, -1), np.broadcast_to(np.arange(g * s, (g + 1) * s), seg.shape))
        ws = np.take_along_axis(w, seg, -1)       # importance non-increasing in permuted order
        assert (np.diff(ws, axis=-1) <= 0).all()
    np.testing.assert_array_equal(perm[..., (L // s) * s:], np.broadcast_to(np.arange((L // s) * s, L), perm[..., (L // s) * s:].shape))
    p = sel.scores.scores
    assert np.isnan(p[:, :, :m]).all() and not np.isnan(p[:, :, m:]).any()
    np.testing.assert_allclose(np.nansum(p[:, :, m:], -1), 1.0, atol=1e-12)
    valid = (np.arange(n)[:, None] // m != np.arange(n)[None] // m) & (np.arange(n)[None] <= np.arange(n)[:, None])
    bnd = sel.boundary[..., None]
    by_score = valid & (p >= bnd)                  # the score prefix: blocks >= the crossing
    assert not np.isnan(sel.boundary[:, :, m:]).any() and np.isnan(sel.boundary[:, :, :m]).all()
    mass = np.where(by_score, p, 0).sum(-1)[:, :, m:]
    assert (mass >= tau - 1e-12).all()             # reaches tau ...
    assert (mass - sel.boundary[:, :, m:] < tau).all()   # ... and not without its last block
    sink = np.zeros_like(by_score)
    tok0 = np.argmax(perm == 0, -1) // b           # the block of original token 0 is forced
    for bb in range(2):
        for h in range(4):
            assert sel.mask.mask[bb, h, :, tok0[bb, h]].all()
            sink[bb, h, :, tok0[bb, h]] = True
    np.testing.assert_array_equal(sel.extras["block_mask"], by_score | sink)
    assert sel.mask.mask[:, :, np.arange(n)[:, None] // m == np.arange(n)[None] // m].all()
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    dense = refattn.attention(q, k, v, causal=True)
    assert np.isfinite(out).all()
    assert np.linalg.norm(out - dense) / np.linalg.norm(dense) < 0.5


def test_gqa_equals_repeated_kv():
    q, k, v = synthetic(1, 4, 2, 300, 32, seed=9)
    a = _sel(q, k, block_size=32, segment_size=64)
    r = _sel(q, np.repeat(k, 2, axis=1), block_size=32, segment_size=64)
    np.testing.assert_array_equal(a.mask.mask, r.mask.mask)
    np.testing.assert_array_equal(a.extras["perm"], r.extras["perm"])


def test_tau_monotone_and_limits():
    q, k, _ = synthetic(1, 2, 1, 400, 32, seed=4)
    counts = [_sel(q, k, block_size=32, segment_size=64, tau=t).extras["block_mask"].sum()
              for t in (0.0, 0.3, 0.6, 0.9, 1.0)]
    assert counts == sorted(counts)
    zero = _sel(q, k, block_size=32, segment_size=64, tau=0.0, force_sink=False)
    # tau = 0: the first sorted block already reaches it, one block per scored row
    assert (zero.extras["block_mask"].sum(-1)[..., 2:] == 1).all()


def test_short_sequence_is_dense():
    q, k, v = synthetic(1, 2, 1, 200, 32, seed=1)
    sel = _sel(q, k, block_size=64, segment_size=256)
    assert sel.extras["dense_fallback"]
    np.testing.assert_array_equal(sel.extras["perm"][0, 0], np.arange(200))
    np.testing.assert_allclose(refattn.attention(q, k, v, mask=sel, causal=True),
                               refattn.attention(q, k, v, causal=True), atol=1e-12)


def test_tie_rule_in_permutation():
    # identical keys in one segment: equal importance, stable lower-index-first order
    q, k, _ = synthetic(1, 1, 1, 160, 16, seed=2)
    k = k.copy()
    k[0, 0, 8:16] = k[0, 0, 8]
    lo = _sel(q, k, block_size=16, segment_size=32).extras["perm"][0, 0]
    hi = _sel(q, k, block_size=16, segment_size=32, tie="high").extras["perm"][0, 0]
    pos_lo = [int(np.nonzero(lo == t)[0][0]) for t in range(8, 16)]
    pos_hi = [int(np.nonzero(hi == t)[0][0]) for t in range(8, 16)]
    assert pos_lo == sorted(pos_lo) and pos_hi == sorted(pos_hi, reverse=True)


# ------------------------------------------------------------------ shapes
@settings(max_examples=20, deadline=None)
@given(L=st.integers(1, 330), b=st.sampled_from([8, 16, 32]), mult=st.integers(1, 3),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]), B=st.integers(1, 2),
       tau=st.floats(0.0, 1.0), seed=st.integers(0, 1000))
def test_shapes(L, b, mult, heads, B, tau, seed):
    Hq, Hkv = heads
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, L, 16)).astype(np.float32)
    k = rng.standard_normal((B, Hkv, L, 16)).astype(np.float32)
    v = rng.standard_normal((B, Hkv, L, 16)).astype(np.float32)
    sel = _sel(q, k, block_size=b, segment_size=b * mult, tau=tau)
    n = -(-L // b)
    assert sel.mask.shape == (B, Hq, n, n)
    assert sel.extras["perm"].shape == (B, Hq, L) and sel.extras["perm"].dtype == np.int64
    assert (np.sort(sel.extras["perm"], -1) == np.arange(L)).all()
    sel.mask.check()
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    assert np.isfinite(out).all()
    # every query sees at least itself (diagonal segment is dense)
    tm = sel.extras["token_mask"].token_rows(0, 0, Hq, 0, L)
    assert tm[:, np.arange(L), np.arange(L)].all()


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,word", [({"segment_size": 100}, "segment_size"),
                                     ({"tau": 1.5}, "tau"), ({"tau": -0.1}, "tau"),
                                     ({"block_size": 0}, "block_size"),
                                     ({"tie": "mid"}, "tie"), ({"threshold": 0.9}, "threshold")])
def test_bad_params(kw, word):
    q, k, _ = synthetic(1, 1, 1, 64, 16, seed=0)
    with pytest.raises(InputError, match=word):
        _sel(q, k, **kw)


def test_causal_and_prefill_required():
    q, k, _ = synthetic(1, 1, 1, 64, 16, seed=0)
    with pytest.raises(InputError, match="causal"):
        refattn.select(q, k, "pbs", causal=False)
    with pytest.raises(InputError, match="q_len == k_len"):
        refattn.select(q[:, :, :32], k, "pbs")
