"""XAttention: scoring and selection against an independent token-level re-derivation, the
official first-chunk rule, properties on structured inputs, shapes, parameter errors, and the
official conformance vectors (mit-han-lab/x-attention @ e3798877)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conformance import load, vector_params
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods import xattention as X


def _qkv(seed, L, Hq=2, Hkv=1, D=32, B=1):
    """Structured inputs: a sink key, a local diagonal and a retrieval cluster."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, L, D)) * 0.6
    k = rng.standard_normal((B, Hkv, L, D))
    u = rng.standard_normal(D)
    u /= np.linalg.norm(u)
    k[:, :, 0] += 4.0 * u * math.sqrt(D)
    q += 0.8 * u
    for h in range(Hq):  # local: key j resembles query j of the head's group
        k[:, h // (Hq // Hkv)] += 0.4 * q[:, h] / (Hq // Hkv)
    if L > 40:
        c = L // 3
        cluster = k[:, :, c:c + 8].mean(axis=2, keepdims=True)
        q[:, :, L - L // 4:] += 1.5 * np.repeat(cluster, Hq // Hkv, axis=1)
    v = rng.standard_normal((B, Hkv, L, D))
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


def _W_bruteforce(q, k, block, S, C, causal=True, norm=1.0):
    """Token-level, loop-based re-derivation of spec §3c for one (b, h) with Hq == Hkv."""
    L, D = q.shape
    Lp = -(-L // C) * C
    qp, kp = np.zeros((Lp, D)), np.zeros((Lp, D))
    qp[:L], kp[:L] = q, k
    T, T_real, bt = Lp // S, -(-L // S), block // S
    A = np.zeros((T, T))
    for i in range(T):
        for j in range(T):
            A[i, j] = sum(qp[i * S + S - 1 - u] @ kp[j * S + u] for u in range(S))
    A /= math.sqrt(D) * S * norm
    W = np.zeros((Lp // block, Lp // block))
    for i in range(T_real):
        cols = np.arange(T) <= i if causal else np.ones(T, bool)
        p = np.zeros(T)
        e = np.exp(A[i, cols] - A[i, cols].max())
        p[cols] = e / e.sum()
        for j in range(T):
            W[i // bt, j // bt] += p[j]
    return W


def _first_chunk_rule(W, tau):
    """The conformance README's statement of the official first-chunk rule, row by row."""
    n = W.shape[-1]
    out = np.zeros_like(W, dtype=bool)
    for I in range(W.shape[0]):
        out[I, 0] = True
        if I == 0:
            continue
        out[I, I] = True
        req = tau * W[I].sum()
        cand = [J for J in range(n) if J != I]
        cand.sort(key=lambda J: (-W[I, J], J))
        acc = W[I, I]
        for m, J in enumerate(cand, start=1):
            ok = req > 0 if m == 1 else acc < req
            if m >= 2:
                acc += W[I, cand[m - 2]]
            if ok and J <= I:
                out[I, J] = True
    return out


def _clean_rule(W, tau, I):
    """Spec §3d's clean rule for one row I > 0 (forced sink + diagonal counted first)."""
    n = W.shape[-1]
    sel = {0, I}
    acc = W[I, 0] + W[I, I]
    req = tau * W[I].sum()
    for J in sorted((J for J in range(n) if J not in sel), key=lambda J: (-W[I, J], J)):
        if acc >= req:
            break
        sel.add(J)
        acc += W[I, J]
    row = np.zeros(n, bool)
    row[[J for J in sel if J <= I]] = True
    return row


# ------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("L,S,C,causal", [(200, 8, 128, True), (130, 4, 256, True),
                                          (96, 8, 64, False), (64, 16, 64, True)])
def test_W_matches_token_level_bruteforce(L, S, C, causal):
    q, k, _ = _qkv(1, L, Hq=1, Hkv=1, D=16)
    (W,) = X.xattention_score(q, k, 32, S, C, 1.0, causal)
    ref = _W_bruteforce(q[0, 0].astype(np.float64), k[0, 0].astype(np.float64), 32, S, C, causal)
    np.testing.assert_allclose(W[0, 0], ref, rtol=1e-12, atol=1e-13)


def test_W_row_sums_count_real_query_tiles():
    L, S, b, C = 300, 8, 64, 128
    q, k, _ = _qkv(2, L, Hq=4, Hkv=2)
    for causal in (True, False):
        (W,) = X.xattention_score(q, k, b, S, C, 1.0, causal)
        real_tiles = np.clip(-(-L // S) - np.arange(W.shape[-1]) * (b // S), 0, b // S)
        np.testing.assert_allclose(W.sum(-1), np.broadcast_to(real_tiles, W.shape[:-1]), rtol=1e-12)
        assert (W >= 0).all()
        if causal:
            assert (W[..., np.triu_indices(W.shape[-1], 1)[0], np.triu_indices(W.shape[-1], 1)[1]] == 0).all()


def test_W_on_real_blocks_does_not_depend_on_chunk_size_when_causal():
    q, k, _ = _qkv(3, 700, Hq=2, Hkv=1)
    n = -(-700 // 64)
    Ws = [X.xattention_score(q, k, 64, 8, C, 1.0, True)[0][..., :n, :n] for C in (64, 256, 1024)]
    np.testing.assert_allclose(Ws[0], Ws[1], rtol=1e-12)
    np.testing.assert_allclose(Ws[0], Ws[2], rtol=1e-12)


def test_gqa_equals_expanded_kv():
    q, k, _ = _qkv(4, 400, Hq=4, Hkv=2)
    a = refattn.select(q, k, "xattention", block_size=64, stride=8, chunk_size=128)
    b = refattn.select(q, np.repeat(k, 2, axis=1), "xattention", block_size=64, stride=8, chunk_size=128)
    np.testing.assert_array_equal(a.mask.mask, b.mask.mask)
    np.testing.assert_allclose(a.scores.scores, b.scores.scores, rtol=1e-13)


# ---------------------------------------------------------------------------- selection
def test_first_chunk_follows_official_rule_and_later_chunks_the_clean_rule():
    rng = np.random.default_rng(5)
    n, R = 12, 6
    for _ in range(30):
        W = np.tril(rng.random((n, n)) ** 3)
        tau = rng.choice([0.3, 0.7, 0.9, 0.95])
        first = X.find_blocks_chunked(W[None, None, :R], 0, np.array([tau]))[0, 0]
        np.testing.assert_array_equal(first & np.tril(np.ones((R, n), bool)),
                                      _first_chunk_rule(W[:R], tau)[:, :] & np.tril(np.ones((R, n), bool)))
        assert first[:, 0].all()
        second = X.find_blocks_chunked(W[None, None, R:], R, np.array([tau]))[0, 0]
        for r in range(R):
            np.testing.assert_array_equal(second[r] & (np.arange(n) <= R + r), _clean_rule(W, tau, R + r))


def test_clean_rule_is_minimal_and_reaches_tau():
    rng = np.random.default_rng(6)
    n, R = 10, 5
    W = np.tril(rng.random((n, n)) ** 2)
    tau = 0.8
    m = X.find_blocks_chunked(W[None, None, R:], R, np.array([tau]))[0, 0]
    for r in range(R):
        I = R + r
        row = m[r] & (np.arange(n) <= I)
        assert W[I, row].sum() >= tau * W[I].sum()
        others = [J for J in np.flatnonzero(row) if J not in (0, I)]
        if others:
            smallest = min(others, key=lambda J: W[I, J])
            assert W[I, row].sum() - W[I, smallest] < tau * W[I].sum()


def test_tau_extremes_and_monotonicity():
    q, k, _ = _qkv(7, 640)
    kw = dict(block_size=64, stride=8, chunk_size=256)
    n = 10
    legal = np.tril(np.ones((n, n), bool))
    zero = refattn.select(q, k, "xattention", threshold=0.0, **kw)
    one = refattn.select(q, k, "xattention", threshold=1.0, **kw)
    np.testing.assert_array_equal(zero.mask.mask, np.broadcast_to(zero.forced, zero.mask.shape))
    np.testing.assert_array_equal(one.mask.mask, np.broadcast_to(legal, one.mask.shape))
    assert np.isnan(zero.boundary).all()
    prev = zero.mask.mask
    for tau in (0.5, 0.8, 0.9, 0.99, 1.0):
        cur = refattn.select(q, k, "xattention", threshold=tau, **kw).mask.mask
        assert (prev <= cur).all(), tau
        prev = cur


def test_structured_inputs_properties():
    q, k, v = synthetic(1, 4, 2, 1000, 64, seed=8)
    sel = refattn.select(q, k, "xattention", stride=8, threshold=0.9, chunk_size=512)
    m, n = sel.mask.mask, 8
    assert m.shape == (1, 4, n, n) and sel.scores.scores.shape == (1, 4, n, n)
    assert not (m & ~np.tril(np.ones((n, n), bool))).any()
    assert m[..., 0].all() and m[..., np.arange(n), np.arange(n)].all()
    assert sel.forced[..., 0].all() and (sel.forced <= m).all()
    dens = sel.mask.density(causal=True, per_head=True)
    assert dens.min() < 0.9 and (dens > sel.mask.like(sel.forced).density(causal=True)).all()
    # the boundary is the smallest W kept by score
    for h in range(4):
        for I in range(1, n):
            extra = m[0, h, I] & ~sel.forced[0, h, I]
            if extra.any():
                assert sel.boundary[0, h, I] == sel.scores.scores[0, h, I][extra].min()
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    assert out.shape == q.shape and np.isfinite(out).all()
    assert sel.extras["chunk_size"] == 512 and sel.extras["W_padded"].shape == (1, 4, 8, 8)


def test_per_head_threshold_is_float32_rounded():
    t = X.head_thresholds((0.0, 0.5, 0.9, 1.0), 4)
    assert t[2] == float(np.float32(0.9)) and t[2] != 0.9
    assert X.head_thresholds(0.9, 3).tolist() == [0.9] * 3
    q, k, _ = _qkv(9, 300, Hq=2, Hkv=1)
    per = refattn.select(q, k, "xattention", block_size=64, chunk_size=128, threshold=[0.0, 1.0])
    n = 5
    legal = np.tril(np.ones((n, n), bool))
    np.testing.assert_array_equal(per.mask.mask[0, 1], legal)
    np.testing.assert_array_equal(per.mask.mask[0, 0], per.forced[0, 0])
    with pytest.raises(InputError, match="threshold"):
        refattn.select(q, k, "xattention", block_size=64, threshold=[0.5, 0.5, 0.5])


@pytest.mark.parametrize("L,expected", [(1, 2048), (2048, 2048), (2049, 4096), (4096, 4096),
                                        (16384, 16384), (32768, 8192), (65536, 4096),
                                        (131072, 2048), (1 << 20, 2048)])
def test_default_chunk_size_table(L, expected):
    assert X.default_chunk_size(L) == expected


def test_non_causal_has_no_forced_blocks_and_full_rows():
    q, k, _ = _qkv(10, 200, Hq=2, Hkv=2)
    sel = refattn.select(q, k, "xattention", causal=False, block_size=64, chunk_size=512, threshold=1.0)
    assert sel.mask.mask.all() and not sel.forced.any()
    # padded key tiles take softmax mass (official kernel): rows do not sum to the real tiles
    W = sel.extras["W_padded"]
    assert W[..., :, 4:].sum() > 0


# ------------------------------------------------------------------------------- shapes
@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 520), heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]),
       block=st.sampled_from([16, 32, 64]), S=st.sampled_from([2, 4, 8, 16]),
       mult=st.integers(1, 4), tau=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_shapes(L, heads, block, S, mult, tau, seed):
    Hq, Hkv = heads
    q, k, v = _qkv(seed, L, Hq=Hq, Hkv=Hkv, D=8)
    sel = refattn.select(q, k, "xattention", block_size=block, stride=S,
                         chunk_size=block * mult, threshold=tau)
    n = -(-L // block)
    assert sel.mask.mask.shape == (1, Hq, n, n)
    assert sel.boundary.shape == (1, Hq, n)
    m = sel.mask.mask
    assert not (m & ~np.tril(np.ones((n, n), bool))).any()
    assert m[..., 0].all() and m[..., np.arange(n), np.arange(n)].all()
    W = sel.scores.scores
    assert np.isfinite(W).all() and (W >= 0).all()
    np.testing.assert_allclose(W.sum(-1)[..., -1], (-(-L // S) - (n - 1) * (block // S)), rtol=1e-9)
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    assert np.isfinite(out).all()


# ---------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("kw,name", [
    (dict(stride=3), "stride"), (dict(stride=0), "stride"), (dict(block_size=0), "block_size"),
    (dict(chunk_size=100), "chunk_size"), (dict(chunk_size=-128), "chunk_size"),
    (dict(threshold=1.5), "threshold"), (dict(threshold=-0.1), "threshold"),
    (dict(threshold=[0.5, float("nan")]), "threshold"), (dict(threshold=[]), "threshold"),
    (dict(norm=0.0), "norm"), (dict(block=128), "unknown parameter"),
])
def test_bad_parameters(kw, name):
    q, k, _ = _qkv(11, 64)
    with pytest.raises(InputError, match=name):
        refattn.select(q, k, "xattention", **kw)


def test_unequal_lengths_refused():
    q, k, _ = _qkv(12, 64)
    with pytest.raises(InputError, match="q_len"):
        refattn.select(q[:, :, :32], k, "xattention")


# --------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("path", vector_params("xattn"))
def test_conformance(path):
    z = load(path)
    P = json.loads(str(z["params"]))
    tau = P.get("threshold_per_head_float32", P.get("threshold"))
    C, bs = int(z["param_chunk_size"]), int(z["param_block_size"])
    sel = refattn.select(z["q"], z["k"], "xattention", block_size=bs, stride=int(z["param_stride"]),
                         threshold=tau, chunk_size=C, norm=float(z["param_norm"]))
    W = sel.extras["W_padded"]
    assert W.shape == z["W"].shape
    np.testing.assert_allclose(W, z["W"], rtol=1e-6, atol=1e-6 * np.abs(z["W"]).max())
    np.testing.assert_array_equal(sel.extras["mask_padded"], z["mask"])
    n = int(z["param_n_blocks_real"])
    np.testing.assert_array_equal(sel.mask.mask, z["mask"][:, :, :n, :n])
    np.testing.assert_allclose(sel.scores.scores, z["W"][:, :, :n, :n], rtol=1e-6, atol=1e-9)
    if "threshold_per_head_as_float64" in P:
        assert sel.extras["threshold"].tolist() == P["threshold_per_head_as_float64"]
    # raw chunk masks agree on every causal block (future zero-mass picks follow torch's
    # unstable sort among equal zeros and are removed by the tril post-step)
    legal = np.tril(np.ones(z["mask"].shape[-2:], bool))
    np.testing.assert_array_equal(sel.extras["mask_chunks"] & legal, z["mask_chunks"] & legal)
    # the selector alone on the official W (and on the Triton-interpreter W)
    R = C // bs
    tau64 = X.head_thresholds(tau, z["q"].shape[1])
    for Wsrc, ref in ((z["W"], z["mask"]), (z["W_triton_interp"].astype(np.float64),
                                           z["mask_from_W_triton_interp"])):
        chunks = np.concatenate([X.find_blocks_chunked(Wsrc[:, :, c * R:(c + 1) * R], c * R, tau64)
                                 for c in range(Wsrc.shape[2] // R)], axis=2)
        np.testing.assert_array_equal(chunks & legal, ref)


def test_refuses_work_over_the_memory_limit():
    q, k, _ = _qkv(13, 1024, D=16)
    refattn.set_memory_limit(50_000)
    try:
        with pytest.raises(refattn.MemoryLimitError, match="xattention_score"):
            refattn.select(q, k, "xattention")
    finally:
        refattn.set_memory_limit(None)
