"""Quest: the page selection against a line-by-line NumPy transliteration of the official
``evaluation/quest_attention.py`` decode step, several decode rows, partial pages, the
kernel-path option, structure and parameter errors."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods.quest import quest_bound
from refattn.testing import op_cases

# The kernel cases of this op live in refattn/cases/llm_scoring.py.


def test_op_cases_run_on_the_reference():
    for case in op_cases("quest_score", np.random.default_rng(0)):
        (U,) = quest_bound(*case["args"])
        assert U.shape[:3] == case["args"][0].shape[:3]

MIN = np.finfo(np.float64).min


def official_decode_step(q: np.ndarray, k: np.ndarray, token_budget: int, chunk_size: int
                         ) -> np.ndarray:
    """``forward`` + ``local_heavy_hitter_mask`` of mit-han-lab/Quest
    evaluation/quest_attention.py for one decode token, in NumPy float64.

    q ``[H, 1, D]``; k ``[H, S, D]`` (kv heads already repeated, the cache of this step).
    Returns the token mask ``mask_bottom`` bool ``[H, 1, S]``."""
    H, _, D = q.shape
    S = k.shape[1]
    sign = (q > 0) + (~(q > 0)) * -1                                  # sign(0) = -1
    max_key = k * sign
    postive_query = q * sign
    padding_length = chunk_size - ((S - 1) % chunk_size + 1)
    max_key = np.concatenate([max_key, np.full((H, padding_length, D), MIN)], axis=1)
    chunk_max_key = max_key.reshape(H, -1, chunk_size, D).max(axis=2)
    chunk_max_key = np.repeat(chunk_max_key, chunk_size, axis=1)[:, :S]
    quantized_weight = postive_query @ chunk_max_key.transpose(0, 2, 1)   # [H, 1, S]
    token_budget = min(S, token_budget)
    w = np.concatenate([quantized_weight, np.full((H, 1, padding_length), MIN)], axis=-1)
    chunk_w = w.reshape(H, 1, -1, chunk_size).max(axis=-1)
    kk = min(max(3, token_budget // chunk_size), chunk_w.shape[-1])
    topk = np.argsort(-chunk_w, axis=-1, kind="stable")[..., :kk]
    tok = (topk[..., None] * chunk_size + np.arange(chunk_size)).reshape(H, 1, -1)
    mask = np.zeros((H, 1, w.shape[-1]), bool)
    np.put_along_axis(mask, tok, True, axis=-1)
    return mask[..., :S]


def check_against_official(q, k, token_budget, page_size):
    """Every query row is one decode step with the keys up to its position."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    sel = refattn.select(q, k, "quest", token_budget=token_budget, page_size=page_size)
    tok = sel.mask.to_token_mask(causal=True)
    kr = np.repeat(k.astype(np.float64), Hq // Hkv, axis=1)
    for r in range(Sq):
        t = r + Sk - Sq
        if t < 0:
            assert not tok[:, :, r].any()
            continue
        for b in range(B):
            ref = official_decode_step(q[b, :, r:r + 1].astype(np.float64), kr[b, :, :t + 1],
                                       token_budget, page_size)
            np.testing.assert_array_equal(tok[b, :, r, :t + 1], ref[:, 0])
    return sel


@pytest.mark.parametrize("sk, sq, budget, page", [(1000, 1, 1024, 16), (1000, 1, 128, 16),
                                                  (1003, 4, 96, 16), (777, 3, 200, 32),
                                                  (40, 40, 16, 8), (5, 1, 64, 16)])
def test_matches_official_decode(sk, sq, budget, page):
    q, k, _ = synthetic(1, 4, 2, sk, 32, q_len=sq, seed=sk)
    check_against_official(q, k, budget, page)


@given(sk=st.integers(1, 80), sq=st.integers(1, 6), page=st.integers(1, 12),
       budget=st.integers(1, 60), hkv=st.integers(1, 2), grp=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_random_shapes_match_official(sk, sq, page, budget, hkv, grp, seed):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, hkv * grp, sq, 8)).astype(np.float32)
    k = rng.standard_normal((1, hkv, sk, 8)).astype(np.float32)
    v = rng.standard_normal((1, hkv, sk, 8)).astype(np.float32)
    sel = check_against_official(q, k, budget, page)
    sel.mask.check()
    assert np.isfinite(refattn.attention(q, k, v, mask=sel, causal=True)).all()


def test_bound_is_an_upper_bound_and_tight_for_one_key_pages():
    q, k, _ = synthetic(1, 2, 1, 500, 32, q_len=2, seed=9)
    sel = refattn.select(q, k, "quest", page_size=16)
    U = sel.scores.scores[0]                                      # [2, 2, 32]
    s = np.einsum("hrd,kd->hrk", q[0].astype(np.float64), k[0, 0].astype(np.float64))
    pos = np.arange(2) + 498
    for r in range(2):
        for p in range(32):
            keys = np.arange(p * 16, min(p * 16 + 16, pos[r] + 1))
            if keys.size == 0:
                assert np.isneginf(U[:, r, p]).all()
                continue
            assert (U[:, r, p] >= s[:, r, keys].max(-1) - 1e-9).all()
    one = refattn.select(q, k, "quest", page_size=1, token_budget=8)
    np.testing.assert_allclose(one.scores.scores[0, :, :, :499][:, 0], s[:, 0, :499], rtol=1e-12)


def test_structured_sink_and_stripes_found():
    q, k, _ = synthetic(1, 4, 2, 2000, 64, q_len=1, seed=5, stripes=3)
    from refattn.data.synthetic import structure_of
    stripes = structure_of(2000, seed=5, stripes=3)["stripes"]
    sel = refattn.select(q, k, "quest", token_budget=256)         # 16 of the 125 pages
    m = sel.mask.mask[0, :, 0]
    assert m[0, 0]                                                # sink-heavy head keeps page 0
    assert m[3, stripes // 16].all()                              # striped head keeps the stripes
    assert (m.sum(-1) == 16).all()


def test_force_recent_kernel_path_and_page_floor():
    q, k, _ = synthetic(1, 2, 1, 300, 32, q_len=1, seed=1)
    sel = refattn.select(q, k, "quest", token_budget=32, page_size=16, force_recent=True,
                         min_pages=1)
    m = sel.mask.mask[0, :, 0]
    assert m[:, 18].all() and (m.sum(-1) == 2).all()              # last page + 1 best older page
    assert sel.forced[0, :, 0, 18].all()
    floor = refattn.select(q, k, "quest", token_budget=16, page_size=16)
    assert (floor.mask.mask.sum(-1) == 3).all()                   # official max(3, budget // P)
    np.testing.assert_array_equal(floor.extras["pages"], [3])


def test_kernel_path_keeps_every_page_of_a_cache_within_the_budget():
    """controller.py: page_budget = token_budget // page_size, dense while the cache has at
    most that many pages (a partial last page included); the evaluation path counts
    min(kv_seq_len, token_budget) // P pages instead."""
    from refattn.methods.quest import QuestParams, pages_to_keep
    kern = QuestParams(token_budget=1024, page_size=16, force_recent=True, min_pages=1)
    evl = QuestParams(token_budget=1024, page_size=16)
    nk = np.array([1, 17, 1023, 1024, 1025, 5000])
    np.testing.assert_array_equal(pages_to_keep(nk, kern), [1, 2, 64, 64, 64, 64])
    np.testing.assert_array_equal(pages_to_keep(nk, evl), [1, 2, 63, 64, 64, 64])
    q, k, _ = synthetic(1, 2, 1, 1023, 32, q_len=1, seed=2)
    sel = refattn.select(q, k, "quest", token_budget=1024, page_size=16, force_recent=True,
                         min_pages=1)
    assert sel.mask.mask.all()                                    # all 64 pages: dense


def test_non_causal_sees_every_page():
    q, k, _ = synthetic(1, 2, 1, 96, 16, q_len=3, seed=2)
    sel = refattn.select(q, k, "quest", token_budget=1000, page_size=16, causal=False)
    assert sel.mask.mask.all() and np.isfinite(sel.scores.scores).all()
    # 100 keys: budget min(100, 1000) // 16 = 6 of the 7 pages; the lowest bound is dropped
    q, k, _ = synthetic(1, 2, 1, 100, 16, q_len=3, seed=2)
    sel = refattn.select(q, k, "quest", token_budget=1000, page_size=16, causal=False)
    assert (sel.mask.mask.sum(-1) == 6).all()
    dropped = np.argmin(sel.scores.scores, axis=-1)
    assert not np.take_along_axis(sel.mask.mask, dropped[..., None], -1).any()


@pytest.mark.parametrize("kw, name", [({"page_size": 0}, "page_size"),
                                      ({"token_budget": 0}, "token_budget"),
                                      ({"min_pages": 0}, "min_pages"),
                                      ({"force_recent": "yes"}, "force_recent"),
                                      ({"tie": 1}, "tie")])
def test_bad_parameters(kw, name):
    q = np.zeros((1, 1, 8, 4), np.float32)
    with pytest.raises(InputError, match=name):
        refattn.select(q, q, "quest", **kw)
