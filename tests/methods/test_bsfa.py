"""BSFA (Danielohayon/Block-Sparse-Flash-Attention @ c3ee81e1): tile maxima against a loop
re-derivation with the official repeat-last-token padding, the threshold gate, the forced
diagonal, calibration (thresholds/calibrate.py), shapes and parameter errors.
No official conformance vectors exist for BSFA; these are property tests."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods.bsfa import bsfa_block_max, bsfa_calibrate, tile_layout


def _official_padded_max(q, k, bq, bk):
    """Tile maxima the way the official interface sees them: q and k padded to a multiple
    of 128 (here: lcm-style multiple of bq) by repeating the last token, loops over tiles;
    cropped to the real grid. One head, Hq == Hkv."""
    L, D = q.shape
    Lp = -(-L // bq) * bq
    qp = np.concatenate([q, np.repeat(q[-1:], Lp - L, 0)]).astype(np.float64)
    kp = np.concatenate([k, np.repeat(k[-1:], Lp - L, 0)]).astype(np.float64)
    qb, kb = -(-L // bq), -(-L // bk)
    mx = np.empty((qb, kb))
    for m in range(qb):
        for n in range(kb):
            t = qp[m * bq:(m + 1) * bq] @ kp[n * bk:(n + 1) * bk].T
            mx[m, n] = t.max() / math.sqrt(D)
    return mx


@pytest.mark.parametrize("L,bq,bk", [(300, 64, 32), (256, 64, 32), (77, 32, 16), (1000, 128, 64)])
def test_tile_max_matches_padded_loops(L, bq, bk):
    q, k, _ = synthetic(1, 2, 2, L, 32, seed=L)
    (mx,) = bsfa_block_max(q, k, bq, bk, 1 / math.sqrt(32))
    for h in range(2):
        np.testing.assert_allclose(mx[0, h], _official_padded_max(q[0, h], k[0, h], bq, bk),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("Sq,Sk,bq,bk", [(300, 300, 64, 32), (203, 113, 64, 32),
                                          (70, 150, 16, 48), (1, 40, 16, 16)])
def test_causal_op_skips_unreachable_tiles_only(Sq, Sk, bq, bk):
    """bsfa_score(causal=True): -inf exactly on tiles without a visible pair
    (legal_blocks), the unmasked tile max (= the non-causal value) everywhere else; the
    Numba kernel agrees bit for bit with its own non-causal run."""
    from refattn.core import registry
    from refattn.core.blockmask import legal_blocks

    q, k, _ = synthetic(1, 4, 2, max(Sq, Sk), 32, q_len=Sq, seed=Sq + Sk)
    k = np.ascontiguousarray(k[:, :, :Sk])
    legal = legal_blocks(Sq, Sk, bq, bk, True)
    impls = [bsfa_block_max]
    if registry.load_backend("numba") is None:
        impls.append(registry.implementations("bsfa_score")["numba"])
    for fn in impls:
        (full,) = fn(q, k, bq, bk, 0.2, False)
        (causal,) = fn(q, k, bq, bk, 0.2, True)
        np.testing.assert_array_equal(causal, np.where(legal, full, -np.inf))
        assert np.isfinite(full).all()
    sel = refattn.select(q, k, "bsfa", block_q=bq, block_k=bk, threshold=0.0)
    np.testing.assert_array_equal(np.isneginf(sel.scores.scores[0, 0]), ~legal)


def test_geometry_prefill():
    gated, forced = tile_layout(1000, 1000, 128, 64, True)
    assert gated.shape == forced.shape == (8, 16)
    for m in range(8):
        np.testing.assert_array_equal(np.nonzero(forced[m])[0], [2 * m, 2 * m + 1])
        np.testing.assert_array_equal(np.nonzero(gated[m])[0], np.arange(2 * m))


def test_threshold_equal_to_max_keeps_the_tile():
    q, k, _ = synthetic(1, 2, 1, 512, 32, seed=5)
    sel = refattn.select(q, k, "bsfa", block_q=64, block_k=32, threshold=-np.inf)
    mx = sel.scores.scores
    gated, forced = tile_layout(512, 512, 64, 32, True)
    qb = mx.shape[2]
    m, n = 5, 3
    thr = np.full((2, qb), np.inf)
    thr[:, m] = mx[0, :, m, n]
    sel = refattn.select(q, k, "bsfa", block_q=64, block_k=32, threshold=thr)
    kept = sel.mask.mask & gated
    assert kept[0, :, m, n].all()                                   # equality keeps (strict <)
    assert kept[0, :, m].sum(-1).tolist() == [int((mx[0, h, m][gated[m]] >= mx[0, h, m, n]).sum())
                                               for h in range(2)]
    assert not kept[0, :, np.arange(qb) != m].any()                 # +inf keeps nothing else
    thr[:, m] = np.nextafter(mx[0, :, m, n], np.inf)
    sel = refattn.select(q, k, "bsfa", block_q=64, block_k=32, threshold=thr)
    assert not sel.mask.mask[0, :, m, n].any()
    np.testing.assert_array_equal(sel.forced[0, 0], forced)         # diagonal always forced
    assert (sel.mask.mask & forced == forced).all()


def test_minus_inf_keeps_everything_and_attention_is_dense():
    q, k, v = synthetic(1, 2, 1, 300, 32, seed=6)
    sel = refattn.select(q, k, "bsfa", threshold=float("-inf"))
    np.testing.assert_array_equal(sel.mask.mask[0, 0], sel.mask.with_causal().mask[0, 0])
    assert sel.mask.mask[0, 0].sum() == sel.mask.like(np.ones((1, 1, 3, 5), bool)).with_causal().mask.sum()
    np.testing.assert_allclose(refattn.attention(q, k, v, mask=sel, causal=True),
                               refattn.attention(q, k, v, causal=True), atol=1e-12)


def test_calibration_k0_is_the_midpoint_of_max_and_min():
    """calibrate.py: (sorted[k-1] + sorted[k]) / 2 descending; k = 0 reads sorted[-1]."""
    from refattn.methods.bsfa import calibration_tiles
    q, k, _ = synthetic(1, 2, 1, 700, 32, seed=4)
    thr = bsfa_calibrate([(q, k)], 0, block_q=64, block_k=32)
    (mx,) = bsfa_block_max(q, k, 64, 32, 1 / np.sqrt(32), True)
    cal = calibration_tiles(700, 64, 32)
    for h in range(2):
        for m in range(11):
            vals = mx[0, h, m][cal[m]]
            want = 0.5 * (vals.max() + vals.min()) if len(vals) else -np.inf
            assert thr[h, m] == want


@pytest.mark.parametrize("topk", [1, 3])
def test_calibration_keeps_k_per_row_on_its_sample(topk):
    q, k, v = synthetic(1, 3, 1, 700, 32, seed=topk)
    thr = bsfa_calibrate([(q, k)], topk, block_q=64, block_k=32)
    assert thr.shape == (3, 11)
    sel = refattn.select(q, k, "bsfa", block_q=64, block_k=32, threshold=thr)
    gated, _ = tile_layout(700, 700, 64, 32, True)
    kept = (sel.mask.mask & gated).sum(-1)[0]                        # [H, Qb]
    n_gated = gated.sum(-1)
    np.testing.assert_array_equal(kept, np.broadcast_to(np.minimum(n_gated, topk), kept.shape))
    assert np.isneginf(thr[:, n_gated <= topk]).all()
    # self-calibration (threshold=None) is the same rule
    auto = refattn.select(q, k, "bsfa", block_q=64, block_k=32, topk=topk)
    np.testing.assert_array_equal(auto.mask.mask, sel.mask.mask)
    assert auto.extras["calibrated"]


def test_self_calibration_is_per_batch_element():
    q, k, _ = synthetic(2, 2, 1, 600, 32, seed=11)
    sel = refattn.select(q, k, "bsfa", block_q=64, block_k=32, topk=3)
    gated, _ = tile_layout(600, 600, 64, 32, True)
    kept = (sel.mask.mask & gated).sum(-1)
    np.testing.assert_array_equal(kept, np.broadcast_to(np.minimum(gated.sum(-1), 3), kept.shape))
    for b in range(2):
        np.testing.assert_array_equal(sel.extras["thresholds"][b],
                                      bsfa_calibrate([(q[b:b + 1], k[b:b + 1])], 3, block_q=64,
                                                     block_k=32))


def test_calibration_mean_over_examples_and_lengths():
    a = synthetic(2, 2, 1, 400, 32, seed=1)[:2]
    b = synthetic(1, 2, 1, 600, 32, seed=2)[:2]
    thr = bsfa_calibrate([a, b], 2, block_q=64, block_k=32)
    per = [bsfa_calibrate([(a[0][i:i + 1], a[1][i:i + 1])], 2, block_q=64, block_k=32)
           for i in range(2)] + [bsfa_calibrate([b], 2, block_q=64, block_k=32)]
    assert thr.shape == (2, 10)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(thr[:, :7], (per[0] + per[1] + per[2][:, :7]) / 3)
    np.testing.assert_allclose(thr[:, 7:], per[2][:, 7:])           # only the long example
    # midpoint of the 2nd and 3rd largest off-diagonal maxima, by hand, for one tile
    (mx,) = bsfa_block_max(b[0], b[1], 64, 32, 1 / math.sqrt(32))
    vals = np.sort(mx[0, 1, 8, :16])[::-1]
    assert per[2][1, 8] == pytest.approx((vals[1] + vals[2]) / 2, rel=1e-12)


def test_threshold_shapes_and_clamped_tile_index():
    q, k, _ = synthetic(1, 2, 1, 512, 32, seed=8)
    base = refattn.select(q, k, "bsfa", block_q=64, block_k=32, threshold=-np.inf)
    mx = base.scores.scores                      # -inf on causally unreachable tiles
    t_head = np.array([mx[0, h][np.isfinite(mx[0, h])].mean() for h in range(2)])
    assert np.isfinite(t_head).all()
    s1 = refattn.select(q, k, "bsfa", block_q=64, block_k=32, threshold=t_head)
    s2 = refattn.select(q, k, "bsfa", block_q=64, block_k=32,
                        threshold=np.repeat(t_head[:, None], 3, axis=1))   # maxb=3 < Qb=8
    np.testing.assert_array_equal(s1.mask.mask, s2.mask.mask)
    t = np.stack([np.full(3, -np.inf), np.full(3, -np.inf)])
    t[:, 2] = np.inf                                                # tiles m >= 2 read column 2
    s3 = refattn.select(q, k, "bsfa", block_q=64, block_k=32, threshold=t)
    gated, _ = tile_layout(512, 512, 64, 32, True)
    assert not (s3.mask.mask & gated)[..., 2:, :].any()
    assert (s3.mask.mask & gated)[..., :2, :].sum() == 2 * gated[:2].sum()
    np.testing.assert_array_equal(s3.boundary[0, :, 5], [np.inf, np.inf])


def test_gqa_equals_repeated_kv():
    q, k, _ = synthetic(1, 4, 2, 333, 32, seed=3)
    a = refattn.select(q, k, "bsfa", block_q=64, block_k=32, topk=2)
    r = refattn.select(q, np.repeat(k, 2, axis=1), "bsfa", block_q=64, block_k=32, topk=2)
    np.testing.assert_array_equal(a.mask.mask, r.mask.mask)
    np.testing.assert_array_equal(a.scores.scores, r.scores.scores)


@settings(max_examples=20, deadline=None)
@given(Sq=st.integers(1, 200), extra=st.integers(0, 80), bq=st.sampled_from([16, 32]),
       ratio=st.sampled_from([1, 2, 4]), heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       causal=st.booleans(), seed=st.integers(0, 500))
def test_shapes(Sq, extra, bq, ratio, heads, causal, seed):
    Hq, Hkv = heads
    Sk = Sq + extra
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, Hq, Sq, 16)).astype(np.float32)
    k = rng.standard_normal((1, Hkv, Sk, 16)).astype(np.float32)
    v = rng.standard_normal((1, Hkv, Sk, 16)).astype(np.float32)
    sel = refattn.select(q, k, "bsfa", block_q=bq, block_k=bq // ratio, threshold=0.0,
                         causal=causal)
    assert sel.mask.shape == (1, Hq, -(-Sq // bq), -(-Sk // (bq // ratio)))
    sel.mask.check()
    if causal:
        assert not (sel.mask.mask & ~sel.mask.with_causal().mask).any()
        # every query sees its own key (the forced diagonal square)
        tm = sel.mask.token_rows(0, 0, Hq, 0, Sq)
        assert tm[:, np.arange(Sq), np.arange(Sq) + extra].all()
    out = refattn.attention(q, k, v, mask=sel, causal=causal)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("kw,word", [({"block_q": 0}, "block_q"), ({"block_k": 2.5}, "block_k"),
                                     ({"topk": -1}, "topk"), ({"threshold": float("nan")}, "threshold"),
                                     ({"threshold": "high"}, "threshold"),
                                     ({"threshold": np.zeros((2, 2, 2))}, "threshold"),
                                     ({"threshold": [0.0, 0.0, 0.0]}, "threshold"),
                                     ({"tau": 0.5}, "tau")])
def test_bad_params(kw, word):
    q, k, _ = synthetic(1, 2, 1, 128, 16, seed=0)
    with pytest.raises(InputError, match=word):
        refattn.select(q, k, "bsfa", **kw)


def test_bad_calibration_samples():
    q, k, _ = synthetic(1, 2, 1, 128, 16, seed=0)
    with pytest.raises(InputError, match="samples"):
        bsfa_calibrate([], 4)
    with pytest.raises(InputError, match="samples"):
        bsfa_calibrate([q], 4)
    with pytest.raises(InputError, match="k"):
        bsfa_calibrate([(q, k)], -1)


def test_tile_layout_follows_the_padded_fa2_loop():
    """flash_attn_interface.py pads q, k, v by -Sq % 128 copies of the last token and FA2
    walks the padded key tiles; its last n_masking_steps tiles skip the threshold test."""
    # S = 1030: the last query tile's forced pair is (16, 17), and 17 is padding only
    gated, forced = tile_layout(1030, 1030, 128, 64, True)
    assert np.flatnonzero(forced[8]).tolist() == [16] and gated[8, 15]
    for m in range(8):
        assert np.flatnonzero(forced[m]).tolist() == [2 * m, 2 * m + 1]
        assert np.flatnonzero(gated[m]).tolist() == list(range(2 * m))
    # a head dim that is not 32/64/96/128: Is_even_MN is false, one more masking step
    gated, forced = tile_layout(1024, 1024, 128, 64, True, head_dim=80)
    assert forced.sum(-1).tolist() == [2] + [3] * 7 and not (gated & forced).any()
    assert np.flatnonzero(forced[5]).tolist() == [9, 10, 11]
    # not causal: one masking step, the last (padded) key tile
    gated, forced = tile_layout(1000, 1000, 128, 64, False)
    assert forced[:, 15].all() and forced.sum() == 8 and gated[:, :15].all()
    gated, forced = tile_layout(1030, 1030, 128, 64, False)   # that tile is padding only
    assert not forced.any() and gated.all()
    # Sq != Sk keeps the bottom-right offset (q and k get the same padding, 12 here); the
    # padded Sk = 1012 is not a multiple of 64, so Is_even_MN is false: 3 masking steps
    gated, forced = tile_layout(500, 1000, 128, 64, True)
    assert np.flatnonzero(forced[3]).tolist() == [13, 14, 15]
    assert np.flatnonzero(forced[0]).tolist() == [7, 8, 9]
    gated, forced = tile_layout(500, 1012, 128, 64, True)       # padded Sk 1024: even
    assert np.flatnonzero(forced[0]).tolist() == [8, 9]


def test_forced_tiles_depend_on_head_dim_through_select():
    q, k, v = synthetic(1, 2, 1, 512, 80, seed=3)
    sel = refattn.select(q, k, "bsfa", topk=1)
    assert sel.forced[0, 0].sum(-1).tolist() == [2, 3, 3, 3]
