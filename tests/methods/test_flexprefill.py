"""FlexPrefill: official GPU vectors, estimator against brute force, the pattern decision,
vertical-slash budgets, query-aware coverage, dense fallback, shapes and parameter errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conformance import load, vector_params
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods.flexprefill import cover_count, flexprefill_score, js_distance


def brute_estimate(q, k, b):
    """Loops over rows/keys; slash pooled as the official array does it: index idx = L-1-o,
    chunks of b from idx 0, chunk c used as block offset n-1-c."""
    B, H, L, D = q.shape
    G = H // k.shape[1]
    n = -(-L // b)
    ell = min(b, L)
    out = {x: [] for x in ("vert", "slash", "V", "S", "pooled", "alpha")}
    for h in range(H):
        qq, kk = q[0, h].astype(np.float64), k[0, h // G].astype(np.float64)
        P = np.zeros((ell, L))
        for r, i in enumerate(range(L - ell, L)):
            s = kk[: i + 1] @ qq[i] / math.sqrt(D)
            P[r, : i + 1] = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        vert = P.mean(0)
        slash_idx = np.zeros(L)
        for r, i in enumerate(range(L - ell, L)):
            for j in range(i + 1):
                slash_idx[L - 1 - (i - j)] += P[r, j] / ell
        V = [vert[J * b:(J + 1) * b].sum() for J in range(n)]
        S = [slash_idx[(n - 1 - s) * b:(n - s) * b].sum() for s in range(n)]
        mk = np.array([kk[J * b:(J + 1) * b].mean(0) for J in range(n)])
        mq = np.array([qq[J * b:(J + 1) * b].mean(0) for J in range(n)])
        a = qq[L - ell:].mean(0) @ mk.T / math.sqrt(D)
        alpha = np.zeros((n, n))
        for I in range(n):
            z = mq[I] @ mk[: I + 1].T / math.sqrt(D)
            alpha[I, : I + 1] = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        for name, val in (("vert", vert), ("slash", slash_idx[::-1]), ("V", V), ("S", S),
                          ("pooled", np.exp(a - a.max()) / np.exp(a - a.max()).sum()),
                          ("alpha", alpha)):
            out[name].append(np.asarray(val))
    return {x: np.stack(v)[None] for x, v in out.items()}


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("path", vector_params("flexprefill"))
def test_conformance_official_gpu(path):
    """Official get_active_blocks (fp32, H200) against the reference."""
    z = load(path)
    p = json.loads(str(z["params"]))
    sel = refattn.select(z["q"], z["k"], "flexprefill", gamma=p["gamma"], tau=p["tau"],
                         block_size=p["block_size"])
    np.testing.assert_array_equal(sel.mask.mask, z["block_mask"])
    np.testing.assert_allclose(sel.extras["js"], z["js"], rtol=0, atol=1e-5)


# -------------------------------------------------------------------- helpers
def test_cover_count_and_js_distance():
    # sorted 0.5, 0.3, 0.2: cumsum 0.5, 0.8, 1.0; two are <= 0.9, plus the crossing one
    assert cover_count(np.array([0.2, 0.5, 0.3]), 0.9) == 3
    assert cover_count(np.array([0.2, 0.5, 0.3]), 0.5) == 2
    assert cover_count(np.array([0.2, 0.5, 0.3]), 0.4) == 1
    p = np.array([0.25, 0.25, 0.5])
    assert js_distance(p, p) == 0.0
    # official semantics: a zero entry (here, or one that underflows at float32) -> NaN,
    # and NaN < tau is false, so the head is vertical-slash
    assert np.isnan(js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])))
    assert np.isnan(js_distance(np.array([1.0, 1e-60]), np.array([0.5, 0.5])))
    assert np.isfinite(js_distance(np.array([1.0, 1e-40]), np.array([0.5, 0.5])))
    r = np.array([0.1, 0.6, 0.3])
    m = (p + r) / 2
    want = math.sqrt(0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(r * np.log(r / m)))
    np.testing.assert_allclose(js_distance(p, r), want)


@pytest.mark.parametrize("L, b", [(300, 64), (257, 32), (200, 64)])
def test_estimate_matches_brute_force(L, b):
    q, k, _ = synthetic(1, 4, 2, L, 32, seed=L)
    vert, sl, pooled, alpha = flexprefill_score(q, k, b)
    want = brute_estimate(q, k, b)
    np.testing.assert_allclose(vert, want["vert"], atol=1e-13)
    np.testing.assert_allclose(sl, want["slash"], atol=1e-13)
    np.testing.assert_allclose(pooled, want["pooled"], atol=1e-13)
    np.testing.assert_allclose(alpha, want["alpha"], atol=1e-13)
    sel = refattn.select(q, k, "flexprefill", block_size=b)
    np.testing.assert_allclose(sel.extras["vertical_scores"], want["V"], atol=1e-13)
    np.testing.assert_allclose(sel.extras["slash_scores"], want["S"], atol=1e-13)
    np.testing.assert_allclose(sel.extras["js"], js_distance(want["pooled"], want["V"]), atol=1e-12)


# ----------------------------------------------------------------- the rule
def rebuild(sel, gamma):
    """The mask from the extras: VS blocks for every head, plus coverage for query-aware."""
    vs_cols, vs_offs = sel.extras["vertical_blocks"], sel.extras["slash_offsets"]
    B, H, n = vs_cols.shape
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    m = (vs_cols[..., None, :] | np.take(vs_offs, np.clip(r - c, 0, n - 1), -1)) & (r >= c)
    alpha = sel.scores.scores
    for b in range(B):
        for h in range(H):
            if sel.extras["pattern"][b, h] == "query_aware":
                flat = alpha[b, h].ravel()
                order = sorted((i for i in range(n * n) if r.ravel()[i] >= c.ravel()[i]),
                               key=lambda i: (-flat[i], i))
                total = 0.0
                for i in order:
                    total += flat[i]
                    if total > gamma * n:
                        break
                    m[b, h].flat[i] = True
    return m


@pytest.mark.parametrize("tau", [0.0, 0.15, 1.0])
def test_pattern_decision_budgets_and_mask(tau):
    q, k, _ = synthetic(1, 8, 2, 700, 32, seed=7)
    sel = refattn.select(q, k, "flexprefill", gamma=0.9, tau=tau, block_size=64)
    pat, js = sel.extras["pattern"], sel.extras["js"]
    np.testing.assert_array_equal(pat == "query_aware", js < tau)
    if tau == 0.0:
        assert (pat == "vertical_slash").all()
    if tau == 1.0:  # sqrt(JS) <= sqrt(ln 2) < 1
        assert (pat == "query_aware").all()
    vert, sl, _, _ = flexprefill_score(q, k, 64)
    n = -(-700 // 64)
    nv = np.minimum(cover_count(vert, 0.9) // 128 + 1, n)
    ns = np.minimum(cover_count(sl, 0.9) // 128 + 1, n)
    qa = pat == "query_aware"
    np.testing.assert_array_equal(sel.extras["vertical_budget"], np.where(qa, 1, nv))
    np.testing.assert_array_equal(sel.extras["slash_budget"], np.where(qa, 1, ns))
    np.testing.assert_array_equal(sel.extras["vertical_blocks"].sum(-1),
                                  sel.extras["vertical_budget"])
    np.testing.assert_array_equal(sel.mask.mask, rebuild(sel, 0.9))
    # forced: first column block in every row and the block diagonal
    assert sel.mask.mask[..., :, 0].all()
    assert np.diagonal(sel.mask.mask, axis1=-2, axis2=-1).all()
    assert (sel.forced <= sel.mask.mask).all()


def test_structured_heads_and_attention():
    L = 1024
    q, k, v = synthetic(1, 4, 2, L, 32, seed=11)
    sel = refattn.select(q, k, "flexprefill", gamma=0.95, tau=0.1)
    assert sel.mask.block_q == sel.mask.block_k == 128
    assert not (sel.mask.mask & ~np.tril(np.ones((8, 8), bool))).any()
    assert set(sel.extras["pattern"].ravel()) == {"vertical_slash", "query_aware"}
    assert sel.mask.density(causal=True) < 0.9
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    assert np.isfinite(out).all()
    # the selected blocks hold most of the true attention mass (gamma-coverage rule)
    tok = sel.mask.to_token_mask(causal=True)[0]
    kk = np.repeat(k[0], 2, 0).astype(float)
    s = np.einsum("hid,hjd->hij", q[0].astype(float), kk) / np.sqrt(32)
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert (p * tok).sum(-1).mean() > 0.8


def test_budget_limits_and_dense_fallback():
    q, k, _ = synthetic(1, 4, 2, 600, 32, seed=5)
    capped = refattn.select(q, k, "flexprefill", tau=0.0, block_size=64, max_budget=64)
    assert (capped.extras["vertical_budget"] == 1).all()
    assert (capped.extras["slash_budget"] == 1).all()
    lifted = refattn.select(q, k, "flexprefill", tau=1.0, block_size=64, min_budget=200)
    assert (lifted.extras["vertical_budget"] == 4).all()        # ceil(200 / 64) blocks
    short = refattn.select(q[:, :, :256], k[:, :, :256], "flexprefill")   # L <= 2 * 128
    assert (short.extras["pattern"] == "dense").all()
    np.testing.assert_array_equal(short.mask.mask[0, 0], np.tril(np.ones((2, 2), bool)))
    big_min = refattn.select(q, k, "flexprefill", block_size=64, min_budget=600)
    assert (big_min.extras["pattern"] == "dense").all()


@given(L=st.integers(1, 500), b=st.sampled_from([16, 32, 64]), hkv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_shapes(L, b, hkv, group, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, hkv * group, L, 16)).astype(np.float32)
    k = rng.standard_normal((1, hkv, L, 16)).astype(np.float32)
    sel = refattn.select(q, k, "flexprefill", block_size=b, tau=0.1)
    n = -(-L // b)
    assert sel.mask.shape == (1, hkv * group, n, n)
    assert not (sel.mask.mask & ~np.tril(np.ones((n, n), bool))).any()
    assert (sel.forced <= sel.mask.mask).all()
    assert np.isfinite(refattn.attention(q, k, k, mask=sel, causal=True)).all()


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize("params, match", [
    (dict(gamma=0.0), "gamma"), (dict(gamma=1.5), "gamma"), (dict(tau=-0.1), "tau"),
    (dict(tau=2.0), "tau"), (dict(block_size=0), "block_size"), (dict(min_budget=0), "min_budget"),
    (dict(max_budget=-5), "max_budget"), (dict(tie="middle"), "tie"), (dict(gamma="x"), "gamma"),
])
def test_parameter_errors(params, match):
    q = np.zeros((1, 1, 8, 4), np.float32)
    with pytest.raises(InputError, match=match):
        refattn.select(q, q, "flexprefill", **params)


def test_causal_and_shape_errors():
    q = np.random.default_rng(0).standard_normal((1, 1, 300, 4)).astype(np.float32)
    with pytest.raises(InputError, match="causal"):
        refattn.select(q, q, "flexprefill", causal=False)
    with pytest.raises(InputError, match="q_len == k_len"):
        refattn.select(q[:, :, :200], q, "flexprefill")
