from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn import testing
from refattn.check import compare_arrays, compare_attention, compare_masks
from refattn.core import BlockMask, BlockScores, Selection
from refattn.reference import selection as sel
from refattn.reference.metrics import evaluate, visible_pairs


def _selection(rng, ties=False):
    s = rng.random((1, 2, 4, 6))
    if ties:
        s[..., 1] = s[..., 2]
    m, b = sel.topk_per_row(s, 2)
    return Selection(mask=BlockMask(m, block_q=8, block_k=8, q_len=32, k_len=48),
                     scores=BlockScores(s, 8, 8, 32, 48), boundary=b)


def test_compare_masks_identical_and_real_mismatch():
    rng = np.random.default_rng(0)
    ref = _selection(rng)
    assert compare_masks(ref, ref.mask).ok
    bad = ref.mask.mask.copy()
    bad[0, 1, 2] = ~bad[0, 1, 2]
    rep = compare_masks(ref, bad)
    assert not rep.ok and rep.stats["mismatches"] >= 1
    assert rep.first[0]["h"] == 1 and rep.first[0]["row"] == 2
    assert "MISMATCH" in rep.summary()


def test_compare_masks_near_tie_is_not_a_mismatch():
    s = np.array([[[[0.9, 0.5, 0.5 - 1e-9, 0.1]]]])
    m, b = sel.topk_per_row(s, 2)
    ref = Selection(mask=BlockMask(m, block_q=4, block_k=4, q_len=4, k_len=16),
                    scores=BlockScores(s, 4, 4, 4, 16), boundary=b)
    flipped = np.array([[[[True, False, True, False]]]])
    rep = compare_masks(ref, flipped, tol=1e-6)
    assert rep.ok and rep.stats["near_ties"] == 2
    assert not compare_masks(ref, flipped, tol=1e-12).ok
    forced = Selection(mask=ref.mask, scores=ref.scores, boundary=b,
                       forced=np.array([[[[False, True, False, False]]]]))
    assert not compare_masks(forced, flipped, tol=1e-6).ok


def test_compare_arrays_rule_and_nan():
    ref = np.linspace(-1, 1, 100)
    assert compare_arrays(ref, ref.astype(np.float32), "float32").ok
    assert not compare_arrays(ref, ref + 1e-3, "float32").ok
    c = ref.copy()
    c[3] = np.nan
    rep = compare_arrays(ref, c, "float32")
    assert not rep.ok and rep.stats["nan"] == 1
    lse = np.array([-np.inf, 1.0])
    assert compare_arrays(lse, np.array([-np.inf, 1.0]), "float32").ok
    assert not compare_arrays(lse, np.array([0.0, 1.0]), "float32").ok
    assert compare_arrays(lse, lse / np.log(2.0), "float32", lse_base="2").ok


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_compare_attention_accepts_lowp_and_rejects_wrong(dtype):
    rng = np.random.default_rng(1)
    q, k, v = testing.structured_qkv(rng, 1, 4, 2, 70, 90, 32, dtype=dtype)
    m = testing.random_block_mask(rng, 1, 4, 70, 90, 16, 16, 0.5, causal=True)
    base_o, base_l = testing.emulate_lowp_attention(q, k, v, m, True, 32 ** -0.5, dtype)
    rep = compare_attention(q, k, v, base_o.astype(np.float32), mask=m, causal=True,
                            candidate_lse=base_l.astype(np.float32))
    assert rep.ok, rep.summary()
    wrong = refattn.attention(q, k, v, causal=True)   # ignores the mask
    assert not compare_attention(q, k, v, wrong, mask=m, causal=True).ok
    testing.assert_attention_matches(base_o, q, k, v, mask=m, causal=True)
    with pytest.raises(AssertionError, match="MISMATCH"):
        testing.assert_attention_matches(wrong, q, k, v, mask=m, causal=True)


def test_metrics_full_mask_and_random_mask():
    rng = np.random.default_rng(2)
    q, k, v = testing.structured_qkv(rng, 1, 2, 1, 64, 64, 16)
    full = BlockMask.full(1, 2, q_len=64, k_len=64, block_q=16, block_k=16, causal=True)
    ev = evaluate(q, k, v, full, causal=True)
    np.testing.assert_allclose(ev.recall, 1.0)
    np.testing.assert_allclose(ev.output_error, 0.0, atol=1e-15)
    assert ev.overall["flops_saved"] == pytest.approx(0.0)
    assert ev.dense_flops == 2 * 32 * visible_pairs(64, 64, True)
    diag = testing.structured_masks(1, 2, 64, 64, 16, 16)["diagonal"]
    ev2 = evaluate(q, k, v, diag, causal=True)
    assert (ev2.recall < 1).all() and (ev2.recall > 0).all()
    assert 0 < ev2.overall["flops_saved"] < 1
    # recall equals the kept softmax mass computed directly
    s = q[0, 0].astype(np.float64) @ k[0, 0].astype(np.float64).T / 4
    s = np.where(np.tril(np.ones((64, 64), bool)), s, -np.inf)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    tm = diag.to_token_mask(causal=True)[0, 0]
    assert ev2.recall[0, 0] == pytest.approx((p * tm).sum(1).mean())
