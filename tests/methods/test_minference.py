"""MInference vertical-slash: official GPU vectors, the estimator against a brute-force
transliteration, forcing and ties, per-head sizes, structured inputs, parameter errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conformance import load, vector_params
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.core.vertical_slash import VerticalSlash
from refattn.data.synthetic import structure_of, synthetic
from refattn.methods.minference import minference_score


def brute_scores(q: np.ndarray, k: np.ndarray, last_q: int) -> tuple[np.ndarray, np.ndarray]:
    """Row by row: softmax of each estimate row over the keys it sees, summed per column and
    per offset o = query position - key."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    vert, sl = np.zeros((B, Hq, Sk)), np.zeros((B, Hq, Sk))
    for b in range(B):
        for h in range(Hq):
            kk = k[b, h // (Hq // Hkv)].astype(np.float64)
            for i in range(max(0, Sq - last_q), Sq):
                p = i + Sk - Sq
                if p < 0:
                    continue
                s = kk[: p + 1] @ q[b, h, i].astype(np.float64) / np.sqrt(D)
                w = np.exp(s - s.max())
                w /= w.sum()
                for j in range(p + 1):
                    vert[b, h, j] += w[j]
                    sl[b, h, p - j] += w[j]
    return vert, sl


# ------------------------------------------------------------------ conformance
@pytest.mark.parametrize("path", vector_params("minference"))
def test_conformance_official_gpu(path):
    """Official estimator (fp32) and PIT sparse attention (Triton, fp16) on an H200."""
    z = load(path)
    p = json.loads(str(z["params"]))
    sel = refattn.select(z["q"], z["k"], "minference", vertical_size=p["vertical_size"],
                         slash_size=p["slash_size"])
    np.testing.assert_array_equal(sel.extras["vertical"], z["vertical_idx"])
    np.testing.assert_array_equal(sel.extras["slash"], z["slash_idx"])
    np.testing.assert_array_equal(sel.extras["vertical_count"], z["vertical_count"])
    out = refattn.attention(z["q"], z["k"], z["v"], mask=sel, causal=True)
    # fp16 kernel against the float64 reference on the same (fp16-exact) inputs
    np.testing.assert_allclose(out, z["out"], rtol=0, atol=5e-3)


# -------------------------------------------------------------------- estimator
@pytest.mark.parametrize("shape", [(70, 70), (20, 50), (100, 100), (5, 5)])
def test_score_matches_brute_force(shape):
    Sq, Sk = shape
    rng = np.random.default_rng(Sq * Sk)
    q = rng.standard_normal((1, 4, Sq, 16)).astype(np.float32) * 2
    k = rng.standard_normal((1, 2, Sk, 16)).astype(np.float32)
    vert, sl = minference_score(q, k, 64)
    bv, bs = brute_scores(q, k, 64)
    np.testing.assert_allclose(vert, bv, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(sl, bs, rtol=1e-12, atol=1e-13)
    # every estimate row is a distribution: both scores sum to the number of rows
    np.testing.assert_allclose(vert.sum(-1), min(64, Sq))
    np.testing.assert_allclose(sl.sum(-1), min(64, Sq))


def test_selection_is_topk_of_scores_with_forcing():
    q, k, _ = synthetic(1, 4, 2, 400, 32, seed=2)
    sel = refattn.select(q, k, "minference", vertical_size=50, slash_size=120, granularity="token")
    vs = sel.extras["token_mask"]
    vert, sl = sel.extras["vertical_scores"], sel.extras["slash_scores"]
    for h in range(4):
        cols = np.nonzero(vs.vertical[0, h])[0]
        offs = np.nonzero(vs.slash[0, h])[0]
        assert cols.size == 50 and offs.size == 120
        assert set(range(30)) <= set(cols) and set(range(100)) <= set(offs)
        # the rest are the best non-forced scores
        rest = np.setdiff1d(cols, np.arange(30))
        others = np.setdiff1d(np.arange(30, 400), rest)
        assert vert[0, h, rest].min() >= vert[0, h, others].max()
        assert sel.extras["vertical_boundary"][0, h] == vert[0, h, rest].min()
        rest = np.setdiff1d(offs, np.arange(100))
        others = np.setdiff1d(np.arange(100, 400), rest)
        assert sl[0, h, rest].min() >= sl[0, h, others].max()


def test_structured_input_finds_stripes_and_slashes():
    L = 1024
    q, k, _ = synthetic(1, 4, 2, L, 64, seed=0, stripes=4, slashes=2)
    where = structure_of(L, seed=0, stripes=4, slashes=2)
    sel = refattn.select(q, k, "minference", vertical_size=60, slash_size=150, granularity="token")
    vs = sel.extras["token_mask"]
    # HEAD_PROFILES: head 0 is sink-heavy, head 3 "striped" (strong stripes and slashes).
    # A stripe also shows on the 64 diagonals that cross it in the estimate window, so the
    # slash budget must leave room for those bands.
    for h in (0, 3):
        assert vs.vertical[0, h, where["stripes"]].all()
    assert vs.slash[0, 3, where["slashes"]].all()
    assert vs.vertical[0, :, 0].all() and vs.slash[0, :, 0].all()   # sink, diagonal


def test_ties_among_forced_diagonals_follow_the_official_index():
    """slash_size < force_recent: the official top-k over idx = Sk-1-o keeps the lower idx,
    i.e. the farther forced diagonals (observed with torch.topk on CUDA)."""
    q, k, _ = synthetic(1, 2, 1, 300, 32, seed=1)
    sel = refattn.select(q, k, "minference", vertical_size=30, slash_size=60)
    offs = np.sort(sel.extras["slash"][0, 0, : sel.extras["slash_count"][0, 0]])
    np.testing.assert_array_equal(offs, np.arange(40, 100))
    hi = refattn.select(q, k, "minference", vertical_size=30, slash_size=60, tie="high")
    np.testing.assert_array_equal(np.sort(hi.extras["slash"][0, 0, :60]), np.arange(60))
    assert np.isnan(sel.extras["slash_boundary"]).all()  # only forced (+inf) entries chosen


def test_per_head_sizes_and_clamps():
    q, k, _ = synthetic(1, 4, 2, 256, 32, seed=3)
    sel = refattn.select(q, k, "minference", vertical_size=[5, 40, 100, 1000],
                         slash_size=(10, 60, 200, 6096))
    np.testing.assert_array_equal(sel.extras["vertical_size"], [30, 40, 100, 256])
    np.testing.assert_array_equal(sel.extras["slash_size"], [50, 60, 200, 256])
    np.testing.assert_array_equal(sel.extras["vertical_count"][0], [30, 40, 100, 256])
    with pytest.raises(InputError, match="vertical_size"):
        refattn.select(q, k, "minference", vertical_size=[40, 40])


def test_selection_runs_attention_and_masks_cover_pattern():
    q, k, v = synthetic(1, 4, 2, 320, 32, seed=4)
    for gran in ("kernel", "token"):
        sel = refattn.select(q, k, "minference", vertical_size=40, slash_size=60, granularity=gran)
        vs = sel.extras["token_mask"]
        assert isinstance(vs, VerticalSlash) and vs.granularity == gran
        tok = vs.to_token_mask(causal=True)
        blocks = np.repeat(np.repeat(sel.mask.mask, 64, 2), 64, 3)[:, :, :320, :320]
        assert not (tok & ~blocks).any()
        assert (sel.forced <= sel.mask.mask).all()
        out = refattn.attention(q, k, v, mask=sel, causal=True)
        dense = refattn.attention(q, k, v, causal=True)
        assert np.isfinite(out).all() and not np.allclose(out, dense)
    full = refattn.select(q, k, "minference", vertical_size=320, slash_size=320,
                          granularity="token")
    got = refattn.attention(q, k, v, mask=full, causal=True)
    np.testing.assert_allclose(got, dense, atol=1e-12)


@given(sq=st.integers(1, 150), extra=st.integers(0, 60), hkv=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_shapes_token_granularity(sq, extra, hkv, group, seed):
    sk = sq + extra
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, hkv * group, sq, 16)).astype(np.float32)
    k = rng.standard_normal((1, hkv, sk, 16)).astype(np.float32)
    sel = refattn.select(q, k, "minference", vertical_size=35, slash_size=55, granularity="token")
    assert sel.mask.shape == (1, hkv * group, -(-sq // 64), -(-sk // 64))
    assert (sel.extras["vertical_count"] == min(sk, 35)).all()
    assert (sel.extras["slash_count"] == min(sk, 55)).all()
    assert np.isfinite(refattn.attention(q, k, k, mask=sel, causal=True)).all()


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize("params, match", [
    (dict(vertical_size=0), "vertical_size"), (dict(slash_size=-3), "slash_size"),
    (dict(vertical_size=[[1, 2]]), "vertical_size"), (dict(last_q=0), "last_q"),
    (dict(force_sink=-1), "force_sink"), (dict(block_size=0), "block_size"),
    (dict(granularity="block"), "granularity"), (dict(tie="random"), "tie"),
    (dict(slash_size=2.5), "slash_size"), (dict(bogus=1), "bogus"),
])
def test_parameter_errors(params, match):
    q = np.zeros((1, 1, 8, 4), np.float32)
    with pytest.raises(InputError, match=match):
        refattn.select(q, q, "minference", **params)


def test_causal_and_shape_errors():
    q = np.random.default_rng(0).standard_normal((1, 1, 8, 4)).astype(np.float32)
    with pytest.raises(InputError, match="causal"):
        refattn.select(q, q, "minference", causal=False)
    k = np.random.default_rng(1).standard_normal((1, 1, 12, 4)).astype(np.float32)
    with pytest.raises(InputError, match="granularity"):
        refattn.select(q, k, "minference")
