"""FlashMoBA: conformance with ``moba_fused_topk_ref`` (slot layout, ties), the rule in causal
and non-causal mode on structured and random inputs, parameter errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conformance import BUNDLED, load, vector_params
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic


def brute_flashmoba(q, k, block, topk, causal, tie="high"):
    """Row-by-row transliteration of spec section 2(d): (mask, slot indices)."""
    B, Hq, Sq, _ = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    kb = -(-Sk // block)
    R = -(-topk // 16) * 16
    mask = np.zeros((B, Hq, Sq, kb), bool)
    slots = np.full((B, Hq, Sq, R), -1, np.int32)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            means = [k[b, g, j * block:(j + 1) * block].astype(np.float64).mean(0)
                     .astype(k.dtype).astype(np.float64) for j in range(kb)]
            for t in range(Sq):
                p = t + Sk - Sq
                row = []
                if causal:
                    if p < 0:
                        continue
                    row.append(p // block)
                    cands = range(p // block)
                else:
                    cands = range(kb)
                scored = [(float(q[b, h, t].astype(np.float64) @ means[j]), j) for j in cands]
                sign = -1 if tie == "high" else 1
                scored.sort(key=lambda s: (-s[0], sign * s[1]))
                row += [j for _, j in scored[:topk - len(row)]]
                mask[b, h, t, row] = True
                slots[b, h, t, :len(row)] = row
    return mask, slots


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("path", vector_params("flashmoba"))
def test_conformance_fused_topk_ref(path):
    z = load(path)
    sel = refattn.select(z["q"], z["k"], "flashmoba", causal=bool(z["param_causal"]),
                         block_size=int(z["param_moba_chunk_size"]),
                         topk=int(z["param_moba_topk"]))
    idx, val = sel.extras["topk_idx"], sel.extras["topk_val"]
    assert idx.shape == z["topk_idx"].shape and idx.dtype == np.int32
    np.testing.assert_array_equal(idx, z["topk_idx"])            # ties included (ties_* case)
    fin = np.isfinite(z["topk_val"])
    np.testing.assert_array_equal(val[~fin], z["topk_val"][~fin])
    scale = np.abs(z["topk_val"][fin]).max()
    np.testing.assert_allclose(val[fin], z["topk_val"][fin], rtol=0, atol=1e-5 * scale)
    # the mask is exactly the set of slot indices
    m = np.zeros(sel.mask.shape, bool)
    b, h, t, s = np.nonzero(z["topk_idx"] >= 0)
    m[b, h, t, z["topk_idx"][b, h, t, s]] = True
    np.testing.assert_array_equal(sel.mask.mask, m)


def test_bundled_vectors_present():
    names = {p.name for p in (BUNDLED / "flashmoba").glob("*.npz")}
    assert "ties_L1024_H2_D64_chunk64_top6_causal.npz" in names


def test_ties_vector_needs_high_tie_rule():
    path = BUNDLED / "flashmoba" / "ties_L1024_H2_D64_chunk64_top6_causal.npz"
    z = load(Path(path))
    low = refattn.select(z["q"], z["k"], "flashmoba", block_size=64, topk=6, tie="low")
    high = refattn.select(z["q"], z["k"], "flashmoba", block_size=64, topk=6)
    np.testing.assert_array_equal(high.extras["topk_idx"], z["topk_idx"])
    # with the lower index first the copies (blocks 7, 9, 11, 13) lose to their sources
    assert (low.extras["topk_idx"] != z["topk_idx"]).any()
    row_hi, row_lo = high.extras["topk_idx"][0, 0, 1000], low.extras["topk_idx"][0, 0, 1000]
    assert list(row_hi).index(9) < list(row_hi).index(5)
    assert list(row_lo).index(5) < list(row_lo).index(9)


# ------------------------------------------------------------- structured inputs
def test_structured_causal_and_non_causal():
    q, k, v = synthetic(1, 4, 2, 900, 32, seed=7)
    c = refattn.select(q, k, "flashmoba", block_size=128, topk=3)
    n = refattn.select(q, k, "flashmoba", block_size=128, topk=3, causal=False)
    own = np.arange(900) // 128
    assert c.mask.mask[..., np.arange(900), own].all()
    assert (c.extras["topk_idx"][..., 0] == own).all()
    assert np.isposinf(c.extras["topk_val"][..., 0]).all()
    assert not (c.mask.mask & (np.arange(8)[None, :] > own[:, None])).any()
    assert (n.mask.mask.sum(-1) == 3).all()                       # every row takes 3 blocks
    assert n.forced is None and np.isfinite(n.extras["topk_val"][..., :3]).all()
    # non-causal values are sorted descending and beat every block left out
    vals = n.extras["topk_val"][..., :3]
    assert (np.diff(vals, axis=-1) <= 0).all()
    left = np.where(n.mask.mask, -np.inf, n.extras["gate"]).max(-1)
    assert (vals[..., -1] >= left).all()
    for causal, sel in ((True, c), (False, n)):
        out = refattn.attention(q, k, v, mask=sel, causal=causal)
        assert np.isfinite(out).all()


def test_partial_last_block_is_a_candidate_when_non_causal():
    rng = np.random.default_rng(4)
    k = rng.standard_normal((1, 1, 130, 8)).astype(np.float32)
    u = rng.standard_normal(8).astype(np.float32)
    k[:, :, 128:] += 6 * u                                        # 2-token last block
    q = (rng.standard_normal((1, 1, 130, 8)) + 6 * u).astype(np.float32)
    sel = refattn.select(q, k, "flashmoba", block_size=64, topk=1, causal=False)
    assert sel.mask.mask[..., 2].all()
    kbar = k[0, 0, 128:].astype(np.float64).mean(0).astype(np.float32)   # true length 2
    np.testing.assert_allclose(sel.extras["gate"][0, 0, :, 2],
                               q[0, 0].astype(np.float64) @ kbar.astype(np.float64), rtol=1e-13)


# ---------------------------------------------------------------- random shapes
@given(sk=st.integers(1, 60), dq=st.integers(-4, 59), block=st.integers(1, 17),
       topk=st.integers(1, 18), hkv=st.integers(1, 2), grp=st.integers(1, 2),
       causal=st.booleans(), tie=st.sampled_from(["low", "high"]), seed=st.integers(0, 2**16))
def test_random_shapes_match_brute_force(sk, dq, block, topk, hkv, grp, causal, tie, seed):
    sq = max(1, sk - dq)
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, hkv * grp, sq, 8)).astype(np.float32)
    k = rng.standard_normal((1, hkv, sk, 8)).astype(np.float32)
    sel = refattn.select(q, k, "flashmoba", block_size=block, topk=topk, causal=causal, tie=tie)
    mask, slots = brute_flashmoba(q, k, block, topk, causal, tie)
    np.testing.assert_array_equal(sel.mask.mask, mask)
    np.testing.assert_array_equal(sel.extras["topk_idx"], slots)
    assert np.array_equal(np.isneginf(sel.extras["topk_val"]), slots < 0)


# ------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw, name", [({"block_size": -1}, "block_size"), ({"topk": 65}, "topk"),
                                      ({"topk": 0}, "topk"), ({"tie": None}, "tie")])
def test_bad_parameters(kw, name):
    q = np.zeros((1, 1, 8, 4), np.float32)
    with pytest.raises(InputError, match=name):
        refattn.select(q, q, "flashmoba", **kw)
