"""BlockRank: official vectors (mask, position ids, logits, document scores, ranking),
properties of the relevance score, the method through refattn.select/attention, errors."""
from __future__ import annotations

import numpy as np
import pytest
from conformance import load, vector_params

import refattn
from refattn.core.errors import InputError
from refattn.importance import blockrank as br
from refattn.kvcache._common import attention_probs


@pytest.mark.parametrize("path", vector_params("blockrank"))
def test_official_vectors(path):
    z = load(path)
    valid = z["collate_attention_mask"]
    B, M, Hb = valid.shape
    vq = valid.reshape(B, -1).astype(bool)
    # structured mask: flex mask_mod on real query rows; eager 5-D mask on each block
    tm = br.BlockRankMask(valid).to_token_mask()[:, 0]
    flex = z["flex_dense_mask"].astype(bool)
    for b in range(B):
        np.testing.assert_array_equal(tm[b][vq[b]], flex[b][vq[b]])
        for m in range(M):
            own = tm[b, m * Hb:(m + 1) * Hb, m * Hb:(m + 1) * Hb]
            np.testing.assert_array_equal(own[vq[b, m * Hb:(m + 1) * Hb]],
                                          (z["mask5d"][b, 0, m] == 0)[valid[b, m].astype(bool)])
    np.testing.assert_array_equal(br.position_ids(valid), z["collate_position_ids"])
    # logits of the last 16 rows (s_last): allowed entries equal, masked ones at finfo.min
    S = M * Hb
    last = np.tile(np.arange(S - 16, S), (B, 1))
    lg = br.query_logits(z["q"], z["k"], valid, last)
    fin = np.isfinite(lg)
    np.testing.assert_allclose(lg[fin], z["s_last"][fin], rtol=1e-5, atol=1e-5)
    assert (z["s_last"][~fin] < -1e38).all()
    # relevance logits and ranking
    rows = br.bracket_rows(z["collate_labels"])
    for backend in ("numpy", "numba"):
        res = br.blockrank_rank(z["q"], z["k"], valid, rows, temperature=0.05, backend=backend)
        np.testing.assert_allclose(res["logits"], z["doc_logits"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(res["ranking"], z["topk_indices"])
        np.testing.assert_allclose(res["score"].sum(-1), 1.0, rtol=1e-12)
    # accuracy 1: every item's best document is an answer document
    ans = z["collate_answer_ids"]
    assert all(res["ranking"][b, 0] in ans[b] for b in range(B)) == bool(z["aux_accuracy"][0])


def _prompt(rng, segs, H=2, Hk=1, D=16, boost=None):
    S = int(sum(segs))
    q = rng.standard_normal((1, H, S, D)) * 0.5
    k = rng.standard_normal((1, Hk, S, D)) * 0.5
    if boost is not None:
        u = rng.standard_normal(D)
        start = int(sum(segs[:boost + 1]))
        k[:, :, start:start + segs[boost + 1]] += u
        q[:, :, S - segs[-1]:] += u
    return q, k


def test_document_permutation_moves_scores():
    """Every document starts at position L0 and the softmax is joint: permuting the
    documents (with their keys) permutes the scores."""
    rng = np.random.default_rng(0)
    segs = [6, 5, 9, 4, 7]
    q, k = _prompt(rng, segs)
    a = refattn.select(q, k, "blockrank", segments=segs)
    perm = [2, 0, 1]
    starts = np.cumsum([0] + segs)
    order = list(range(starts[1])) + [t for p in perm for t in range(starts[1 + p], starts[2 + p])] \
        + list(range(starts[-2], starts[-1]))
    segs2 = [segs[0]] + [segs[1 + p] for p in perm] + [segs[-1]]
    b = refattn.select(q[:, :, order], k[:, :, order], "blockrank", segments=segs2)
    np.testing.assert_allclose(b.extras["score"][0], a.extras["score"][0][perm], rtol=1e-12)


def test_relevant_document_ranks_first_and_scale_variant():
    rng = np.random.default_rng(1)
    segs = [8, 10, 10, 10, 10, 6]
    q, k = _prompt(rng, segs, D=32, boost=2)
    sel = refattn.select(q, k, "blockrank", segments=segs, top_k=2)
    assert sel.extras["ranking"][0, 0] == 2 and sel.extras["ranking"].shape == (1, 2)
    sdpa = refattn.select(q, k, "blockrank", segments=segs, scale=1.0)
    # no 1/sqrt(d): a sharper distribution with the same winner
    assert sdpa.extras["score"][0, 2] > sel.extras["score"][0, 2]
    np.testing.assert_allclose(sel.extras["logits"], sel.extras["score"] / 0.05)


def test_select_runs_as_attention_mask():
    rng = np.random.default_rng(2)
    segs = [5, 7, 3, 6, 4]
    S = sum(segs)
    q, k = _prompt(rng, segs)
    v = rng.standard_normal((1, 1, S, 16))
    sel = refattn.select(q, k, "blockrank", segments=segs)
    allowed = sel.extras["token_mask"].to_token_mask()[0, 0]
    blk = np.repeat(np.arange(len(segs)), segs)
    # hand-written rule on the contiguous sequence
    i, j = np.meshgrid(np.arange(S), np.arange(S), indexing="ij")
    bi, bj = blk[i], blk[j]
    want = ((bi == bj) & (j <= i)) | ((bi >= 1) & (bi <= len(segs) - 2) & (bj == 0)) \
        | ((bi == len(segs) - 1) & (bj < bi))
    np.testing.assert_array_equal(allowed, want)
    np.testing.assert_array_equal(sel.extras["position_ids"][:5], np.arange(5))
    assert sel.extras["position_ids"][5] == 5 and sel.extras["position_ids"][12] == 5
    assert sel.extras["position_ids"][-4] == br.QUERY_POSITION_START
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    p = attention_probs(q, k, scale=16 ** -0.5, causal=False)[0]
    p = np.where(want, p, 0)
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0], p @ v[0, 0], atol=1e-10)
    # the covering block mask contains every allowed pair
    tok = sel.mask.to_token_mask()[0, 0]
    assert tok.shape == (S, S) and (tok | ~want).all()
    small = refattn.select(q, k, "blockrank", segments=segs, block_size=4).mask
    assert (small.to_token_mask()[0, 0] | ~want).all() and small.density() < 1.0


def test_errors():
    rng = np.random.default_rng(3)
    q, k = _prompt(rng, [4, 4, 4])
    with pytest.raises(InputError, match="segments"):
        refattn.select(q, k, "blockrank")
    with pytest.raises(InputError, match="segments"):
        refattn.select(q, k, "blockrank", segments=[4, 4, 5])
    with pytest.raises(InputError, match="segments"):
        refattn.select(q, k, "blockrank", segments=[6, 6])
    with pytest.raises(InputError, match="temperature"):
        refattn.select(q, k, "blockrank", segments=[4, 4, 4], temperature=0)
    with pytest.raises(InputError, match="completion_len"):
        refattn.select(q, k, "blockrank", segments=[4, 4, 4], completion_len=4)
    with pytest.raises(InputError, match="labels"):
        br.bracket_rows(np.full((1, 32), -100))
    with pytest.raises(InputError, match="valid"):
        br.BlockRankMask(np.ones((1, 2, 4)))
