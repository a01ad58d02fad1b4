"""VerticalSlash: index forms, exact token masks, the PIT kernel rendering, covering block
masks, density and attention on the pattern, each checked against a brute-force oracle."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.core.vertical_slash import VerticalSlash, pit_key_set


# ----------------------------------------------------------------------- oracles
def brute_token_mask(vert: np.ndarray, sl: np.ndarray, q_len: int, k_len: int,
                     causal: bool) -> np.ndarray:
    """Cell-by-cell definition: (i, j) is selected iff j is a column or i+Sk-Sq-j an offset."""
    B, H = vert.shape[:2]
    out = np.zeros((B, H, q_len, k_len), bool)
    for b in range(B):
        for h in range(H):
            for i in range(q_len):
                p = i + k_len - q_len
                for j in range(k_len):
                    if causal and j > p:
                        continue
                    o = p - j
                    out[b, h, i, j] = vert[b, h, j] or (0 <= o < k_len and sl[b, h, o])
    return out


def pit_literal(vidx: list[int], sidx: list[int], end: int, k_len: int, B: int = 64) -> np.ndarray:
    """Step-by-step port of one query block of MInference's convert_vertical_slash_indexes
    loop (csrc/vertical_slash_index.cu), written out as the loop walks, for cross-checking."""
    v_list, s_list = sorted(vidx), sorted(sidx, reverse=True)
    cols, ranges = [], []
    v = 0
    v_idx = v_list[0] if v_list else end + B
    v += 1
    s = 0
    s_idx = s_list[s]
    s += 1
    while s_idx >= end:
        s_idx = s_list[s]
        s += 1
    s_idx = max(end - s_idx, B)
    rs, re_ = s_idx - B, s_idx
    while True:
        if v_idx < re_:
            if v_idx < rs:
                cols.append(v_idx)
            if v < len(v_list):
                v_idx = v_list[v]
                v += 1
            else:
                v_idx = end + B
        else:
            if s < len(s_list):
                s_idx = max(end - s_list[s], B)
                s += 1
            else:
                ranges.append((rs, re_))
                break
            if s_idx > re_ + B:
                ranges.append((rs, re_))
                rs, re_ = s_idx - B, s_idx
            elif s_idx > re_:
                re_ += B
    keys = np.zeros(k_len, bool)
    for a, e in ranges:
        keys[max(a, 0): min(e, k_len)] = True
    keys[cols] = True
    return keys


def random_pattern(rng: np.random.Generator, B: int, H: int, k_len: int, pv: float = 0.1,
                   ps: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    return rng.random((B, H, k_len)) < pv, rng.random((B, H, k_len)) < ps


def blocks_of(tok: np.ndarray, bq: int, bk: int) -> np.ndarray:
    B, H, Sq, Sk = tok.shape
    qb, kb = -(-Sq // bq), -(-Sk // bk)
    t = np.zeros((B, H, qb * bq, kb * bk), bool)
    t[:, :, :Sq, :Sk] = tok
    return t.reshape(B, H, qb, bq, kb, bk).any(axis=(3, 5))


# ------------------------------------------------------------------ index forms
def test_from_indices_round_trip_orders_and_pads():
    vs = VerticalSlash.from_indices(np.array([[[5, 0, 3, 3], [2, 9, -7, -7]]]),
                                    np.array([[[0, 4, 2], [7, 1, 1]]]), q_len=10, k_len=10,
                                    vertical_count=np.array([[4, 2]]), slash_count=[[3, 2]])
    v, vc, s, sc = vs.to_indices()
    np.testing.assert_array_equal(vc, [[3, 2]])
    np.testing.assert_array_equal(v, [[[0, 3, 5], [2, 9, -1]]])
    np.testing.assert_array_equal(sc, [[3, 2]])
    np.testing.assert_array_equal(s, [[[4, 2, 0], [7, 1, -1]]])
    assert v.dtype == s.dtype == np.int32
    again = VerticalSlash.from_indices(v, s, q_len=10, k_len=10, vertical_count=vc, slash_count=sc)
    assert again == vs


@pytest.mark.parametrize("shape", [(7, 7), (5, 12), (12, 5), (1, 9), (9, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_token_mask_matches_cell_definition(shape, causal):
    rng = np.random.default_rng(sum(shape) + causal)
    Sq, Sk = shape
    v, s = random_pattern(rng, 2, 3, Sk, 0.2, 0.3)
    vs = VerticalSlash(v, s, q_len=Sq, k_len=Sk)
    np.testing.assert_array_equal(vs.to_token_mask(causal=causal),
                                  brute_token_mask(v, s, Sq, Sk, causal))
    r0 = min(2, Sq - 1)
    rows = vs.token_rows(1, 1, 3, r0, Sq)
    np.testing.assert_array_equal(rows, vs.to_token_mask(causal=False)[1, 1:3, r0:])


def test_slash_offset_convention_bottom_right():
    # offset 0 is the causal diagonal j = i + Sk - Sq, offset o sits o keys before it
    vs = VerticalSlash(np.zeros(8, bool), np.eye(8, dtype=bool)[2], q_len=4, k_len=8)
    t = vs.to_token_mask(causal=True)[0, 0]
    assert [int(np.nonzero(r)[0][0]) for r in t] == [2, 3, 4, 5]     # j = i + 4 - 2
    assert t.sum() == 4


def test_broadcast_heads_and_batch():
    v, s = random_pattern(np.random.default_rng(1), 1, 1, 20)
    vs = VerticalSlash(v[0, 0], s[0, 0], q_len=20, k_len=20)
    assert vs.batch_heads() == (1, 1)
    assert vs.token_rows(3, 0, 4, 0, 20).shape == (1, 20, 20)
    q = np.random.default_rng(2).standard_normal((2, 4, 20, 8))
    out = refattn.attention(q, q[:, :2], q[:, :2], mask=vs, causal=True)
    assert np.isfinite(out).all()


# ----------------------------------------------------------- PIT kernel rendering
def test_pit_key_set_matches_literal_kernel_loop():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(150):
        L = int(rng.integers(1, 600))
        V = rng.choice(L, int(rng.integers(0, min(L, 40) + 1)), replace=False)
        S = rng.choice(L, int(rng.integers(1, min(L, 60) + 1)), replace=False)
        if rng.random() < 0.5:
            S = np.union1d(S, [0])
        vb, sb = np.zeros(L, bool), np.zeros(L, bool)
        vb[V], sb[S] = True, True
        for end in range(64, -(-L // 64) * 64 + 1, 64):
            if S.min() < end:  # the official loop reads out of bounds otherwise
                np.testing.assert_array_equal(pit_key_set(vb, sb, end, L),
                                              pit_literal(list(V), list(S), end, L))
                checked += 1
    assert checked > 300


def test_kernel_rendering_contains_exact_pattern_when_diagonal_selected():
    rng = np.random.default_rng(3)
    v, s = random_pattern(rng, 1, 3, 300, 0.05, 0.05)
    s[..., 0] = True
    tok = VerticalSlash(v, s, q_len=300, k_len=300).to_token_mask(causal=True)
    ker = VerticalSlash(v, s, q_len=300, k_len=300, granularity="kernel").to_token_mask(causal=True)
    assert (ker | tok).sum() == ker.sum() and ker.sum() > tok.sum()


# --------------------------------------------------------- blocks and density
@given(sq=st.integers(1, 90), sk=st.integers(1, 90), bq=st.integers(1, 40),
       bk=st.integers(1, 40), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_covering_blockmask_is_block_or_of_tokens(sq, sk, bq, bk, causal, seed):
    v, s = random_pattern(np.random.default_rng(seed), 1, 2, sk, 0.1, 0.15)
    vs = VerticalSlash(v, s, q_len=sq, k_len=sk)
    bm = vs.covering_blockmask(bq, bk, causal=causal)
    np.testing.assert_array_equal(bm.mask, blocks_of(vs.to_token_mask(causal=causal), bq, bk))
    dens = vs.density(causal=causal, per_head=True)
    tok = vs.to_token_mask(causal=causal)
    vis = np.arange(sk)[None] <= np.arange(sq)[:, None] + sk - sq
    if not causal:
        vis = np.ones((sq, sk), bool)
    np.testing.assert_allclose(dens, tok.sum((-1, -2)) / max(vis.sum(), 1))


@given(L=st.integers(1, 200), bq=st.sampled_from([16, 37, 64, 128]),
       bk=st.sampled_from([16, 50, 64]), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_covering_and_density(L, bq, bk, causal, seed):
    v, s = random_pattern(np.random.default_rng(seed), 1, 2, L, 0.05, 0.05)
    s[..., 0] = True
    vs = VerticalSlash(v, s, q_len=L, k_len=L, granularity="kernel")
    tok = vs.to_token_mask(causal=causal)
    np.testing.assert_array_equal(vs.covering_blockmask(bq, bk, causal=causal).mask,
                                  blocks_of(tok, bq, bk))
    total = L * (L + 1) // 2 if causal else L * L
    np.testing.assert_allclose(vs.density(causal=causal, per_head=True), tok.sum((-1, -2)) / total)


def test_attention_on_pattern_equals_masked_softmax():
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 40, 8)) for _ in range(3))
    pv, ps = random_pattern(rng, 1, 2, 40, 0.1, 0.2)
    vs = VerticalSlash(pv, ps, q_len=40, k_len=40)
    m = vs.to_token_mask(causal=True)
    s = np.where(m, q @ np.swapaxes(k, -1, -2) / np.sqrt(8), -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        want = np.nan_to_num((p / p.sum(-1, keepdims=True)) @ v)
    got = refattn.attention(q, k, v, mask=vs, causal=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# -------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(vertical=np.zeros(5, int), slash=np.zeros(5, bool)), "boolean"),
    (dict(vertical=np.zeros(4, bool), slash=np.zeros(5, bool)), "k_len=5"),
    (dict(vertical=np.zeros((2, 5), bool), slash=np.zeros((3, 5), bool)), "differ"),
    (dict(vertical=np.zeros(5, bool), slash=np.zeros(5, bool), granularity="block"), "granularity"),
])
def test_constructor_errors(kwargs, match):
    kwargs.setdefault("q_len", 5)
    with pytest.raises(InputError, match=match):
        VerticalSlash(k_len=5, **kwargs)


def test_other_errors():
    with pytest.raises(InputError, match="q_len == k_len"):
        VerticalSlash(np.zeros(5, bool), np.zeros(5, bool), q_len=4, k_len=5, granularity="kernel")
    with pytest.raises(InputError, match="q_len"):
        VerticalSlash(np.zeros(5, bool), np.zeros(5, bool), q_len=0, k_len=5)
    with pytest.raises(InputError, match=r"\[0, 5\)"):
        VerticalSlash.from_indices([1, 5], [0], q_len=5, k_len=5)
    with pytest.raises(InputError, match="counts"):
        VerticalSlash.from_indices([[[1, 2]]], [[[0]]], q_len=5, k_len=5, vertical_count=[[3]])
    with pytest.raises(InputError, match="integer"):
        VerticalSlash.from_indices([1.0], [0], q_len=5, k_len=5)
    vs = VerticalSlash(np.zeros(5, bool), np.zeros(5, bool), q_len=5, k_len=5)
    with pytest.raises(InputError, match="block_k"):
        vs.covering_blockmask(4, 0)
