"""MoBA: conformance with the official naive code, the routing rule on structured and random
inputs, ties, dtypes, parameter errors."""
from __future__ import annotations

import numpy as np
import pytest
from conformance import load, vector_params
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods.moba import moba_gate, pooled_keys
from refattn.testing import op_cases

# The kernel cases of this op live in refattn/cases/llm_scoring.py.


def brute_moba(q: np.ndarray, k: np.ndarray, block: int, topk: int, tie: str = "low") -> np.ndarray:
    """Row-by-row transliteration of the rule (spec section 1): bool [B, Hq, Sq, Kb]."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kb = -(-Sk // block)
    out = np.zeros((B, Hq, Sq, kb), bool)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            means = [k[b, g, j * block:(j + 1) * block].astype(np.float64).mean(0)
                     .astype(k.dtype).astype(np.float64) for j in range(kb)]
            for t in range(Sq):
                p = t + Sk - Sq
                if p < 0:
                    continue
                c = p // block
                out[b, h, t, c] = True
                past = [(float(q[b, h, t].astype(np.float64) @ means[j]), j) for j in range(c)]
                key = (lambda s: (-s[0], s[1])) if tie == "low" else (lambda s: (-s[0], -s[1]))
                for _, j in sorted(past, key=key)[:topk - 1]:
                    out[b, h, t, j] = True
    return out


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("path", vector_params("moba"))
def test_conformance_official_naive(path):
    z = load(path)
    B, K = int(z["param_moba_chunk_size"]), int(z["param_moba_topk"])
    sel = refattn.select(z["q"], z["k"], "moba", block_size=B, topk=K)
    L, n = z["q"].shape[2], z["need_attend"].shape[-1]
    causal = np.arange(n)[None, :] <= (np.arange(L) // B)[:, None]
    # the official selection is need_attend intersected with the token-level tril
    np.testing.assert_array_equal(sel.mask.mask, z["need_attend"] & causal)
    gate = sel.extras["gate"]
    scale = np.abs(z["gate_raw"]).max()
    np.testing.assert_allclose(gate, z["gate_raw"], rtol=0, atol=1e-5 * scale)
    # raw need_attend: identical on own/past blocks; same number of (arbitrary) future picks
    na = sel.extras["need_attend"]
    np.testing.assert_array_equal(na & causal, z["need_attend"] & causal)
    np.testing.assert_array_equal((na & ~causal).sum(-1), (z["need_attend"] & ~causal).sum(-1))
    out = refattn.attention(z["q"], z["k"], z["v"], mask=sel, causal=True)
    np.testing.assert_allclose(out, z["out"], rtol=0, atol=2e-5)


def test_op_cases_run_on_the_reference():
    for case in op_cases("moba_score", np.random.default_rng(0)):
        q, k, blk = case["args"]
        (gate,) = moba_gate(q, k, blk)
        assert gate.shape == q.shape[:3] + (-(-k.shape[2] // blk),) and np.isfinite(gate).all()


# ------------------------------------------------------------- structured inputs
def test_structured_rule_properties():
    q, k, _ = synthetic(1, 4, 2, 700, 32, seed=3)
    B, K = 64, 3
    sel = refattn.select(q, k, "moba", block_size=B, topk=K)
    m = sel.mask.mask
    own = np.arange(700) // B
    kb = m.shape[-1]
    j = np.arange(kb)
    assert m[..., np.arange(700), own].all()                      # own block always
    assert not (m & (j[None, :] > own[:, None])).any()            # never a future block
    np.testing.assert_array_equal(m.sum(-1), np.minimum(K, own + 1)[None, None].repeat(4, 1))
    # every selected past block scores >= every unselected past block (boundary)
    past = j[None, :] < own[:, None]
    s = sel.scores.scores
    sel_past = m & past
    lo = np.where(sel_past, s, np.inf).min(-1)
    hi = np.where(past & ~m, s, -np.inf).max(-1)
    assert (lo >= hi).all()
    np.testing.assert_array_equal(np.where(sel_past.any(-1), lo, np.nan), sel.boundary)
    assert sel.mask.block_q == 1 and sel.mask.block_k == B

    # a retrieval cluster planted in block 3 is routed to by the queries that look for it
    u = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    k2 = k.copy()
    k2[:, :, 3 * B:4 * B] += 3 * u
    q2 = q.copy()
    q2[:, :, 600:] += 3 * u
    m2 = refattn.select(q2, k2, "moba", block_size=B, topk=K).mask.mask
    assert m2[:, :, 600:, 3].all()


def test_sample_real_data_matches_brute_force():
    from refattn.data import sample

    s = sample()
    q, k = s.q[:, :, :600], s.k[:, :, :600]
    sel = refattn.select(q, k, "moba", block_size=100, topk=3)
    np.testing.assert_array_equal(sel.mask.mask, brute_moba(q, k, 100, 3))


# ---------------------------------------------------------------- random shapes
@given(sk=st.integers(1, 60), dq=st.integers(-5, 59), block=st.integers(1, 17),
       topk=st.integers(1, 5), hkv=st.integers(1, 2), grp=st.integers(1, 2),
       seed=st.integers(0, 2**16), tie=st.sampled_from(["low", "high"]))
def test_random_shapes_match_brute_force(sk, dq, block, topk, hkv, grp, seed, tie):
    sq = max(1, sk - dq)                       # Sq <= Sk mostly, Sq > Sk for dq < 0
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, hkv * grp, sq, 8)).astype(np.float32)
    k = rng.standard_normal((1, hkv, sk, 8)).astype(np.float32)
    v = rng.standard_normal((1, hkv, sk, 8)).astype(np.float32)
    sel = refattn.select(q, k, "moba", block_size=block, topk=topk, tie=tie, impl="naive")
    np.testing.assert_array_equal(sel.mask.mask, brute_moba(q, k, block, topk, tie))
    if topk > 1:                               # the two official paths select the same
        eff = refattn.select(q, k, "moba", block_size=block, topk=topk, tie=tie)
        np.testing.assert_array_equal(eff.mask.mask, sel.mask.mask)
    sel.mask.check()
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    assert np.isfinite(out).all()


def test_topk_one_is_dense_causal_on_the_efficient_path():
    """moba_efficient.py: moba_topk = min(1 - 1, n) = 0 -> flash_attn_varlen_func(causal)."""
    q, k, v = synthetic(1, 2, 1, 300, 16, seed=6)
    eff = refattn.select(q, k, "moba", block_size=50, topk=1)
    naive = refattn.select(q, k, "moba", block_size=50, topk=1, impl="naive")
    own = np.arange(300) // 50
    np.testing.assert_array_equal(eff.mask.mask[0, 0], np.arange(6)[None, :] <= own[:, None])
    np.testing.assert_array_equal(naive.mask.mask[0, 0], np.arange(6)[None, :] == own[:, None])
    np.testing.assert_allclose(refattn.attention(q, k, v, mask=eff, causal=True),
                               refattn.attention(q, k, v, causal=True), atol=1e-12)


def test_attention_equals_dense_on_token_mask():
    q, k, v = synthetic(1, 2, 1, 300, 16, seed=5)
    sel = refattn.select(q, k, "moba", block_size=50, topk=2)
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    tok = sel.mask.to_token_mask(causal=True)                     # [1, 2, 300, 300]
    s = np.einsum("bhqd,bkd->bhqk", q.astype(np.float64), k[:, 0].astype(np.float64)) / 4.0
    s = np.where(tok, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v[:, 0].astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_exact_ties_follow_tie_rule():
    rng = np.random.default_rng(0)
    u = rng.standard_normal(8).astype(np.float32)
    k = rng.standard_normal((1, 1, 400, 8)).astype(np.float32)
    k[:, :, 50:100] += 4 * u                                      # block 1 stands out ...
    k[:, :, 200:250] = k[:, :, 50:100]                            # ... and block 4 == block 1
    q = rng.standard_normal((1, 1, 400, 8)).astype(np.float32)
    q[..., 350:, :] += 4 * u                                      # rows that look for it
    low = refattn.select(q, k, "moba", block_size=50, topk=2, tie="low").mask.mask
    high = refattn.select(q, k, "moba", block_size=50, topk=2, tie="high").mask.mask
    assert low[0, 0, 350:, 1].all() and not low[0, 0, 350:, 4].any()
    assert high[0, 0, 350:, 4].all() and not high[0, 0, 350:, 1].any()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_pooled_key_rounded_to_input_dtype(dtype):
    import ml_dtypes  # noqa: F401
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(1)
    k = rng.standard_normal((1, 1, 70, 8)).astype(dt)
    kbar = pooled_keys(k, 32)
    exact = np.stack([k[0, 0, j * 32:(j + 1) * 32].astype(np.float64).mean(0) for j in range(3)])
    np.testing.assert_array_equal(kbar[0, 0], exact.astype(dt).astype(np.float64))


def test_one_block_and_query_before_keys():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 1, 5, 4)).astype(np.float32)
    k = rng.standard_normal((1, 1, 3, 4)).astype(np.float32)
    sel = refattn.select(q, k, "moba", block_size=8, topk=3)      # Sq > Sk: 2 rows see nothing
    np.testing.assert_array_equal(sel.mask.mask[0, 0, :, 0], [False, False, True, True, True])
    assert np.isnan(sel.boundary).all()


# ------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw, name", [({"block_size": 0}, "block_size"), ({"topk": 0}, "topk"),
                                      ({"topk": 2.5}, "topk"), ({"tie": "mid"}, "tie"),
                                      ({"chunk": 3}, "chunk")])
def test_bad_parameters(kw, name):
    q = np.zeros((1, 1, 8, 4), np.float32)
    with pytest.raises(InputError, match=name):
        refattn.select(q, q, "moba", **kw)


def test_non_causal_refused():
    q = np.zeros((1, 1, 8, 4), np.float32)
    with pytest.raises(InputError, match="causal"):
        refattn.select(q, q, "moba", causal=False)
