import numpy as np
import pytest
from kv_util import random_qkv

import refattn
from refattn.core.errors import InputError
from refattn.core.keepset import KeepSet, TokenMask, resolve_budget, resolve_head_budgets


def test_construction_and_views():
    idx = np.array([[[5, 0, 3, -1], [1, 2, -1, -1]]])
    ks = KeepSet(idx, q_len=2, k_len=6, head_kind="q")
    assert ks.counts.tolist() == [[3, 2]]
    assert ks.kept(0, 0).tolist() == [5, 0, 3]  # keep order preserved
    km = ks.key_mask()
    assert km[0, 0].tolist() == [True, False, False, True, False, True]
    tm = ks.to_token_mask()
    assert tm.shape == (1, 2, 2, 6) and np.array_equal(tm[0, :, 1], km[0])
    tc = ks.to_token_mask(causal=True)  # offset 4: row 0 sees j <= 4
    assert not tc[0, 0, 0, 5] and tc[0, 0, 1, 5]
    rows = ks.token_rows(0, 1, 2, 0, 2)
    assert rows.shape == (1, 2, 6) and np.array_equal(rows[0, 0], km[0, 1])
    assert ks.sorted().kept(0, 0).tolist() == [0, 3, 5]
    bm = ks.to_block_mask()
    assert bm.shape == (1, 2, 1, 6) and bm.block_k == 1 and bm.block_q == 2
    assert ks.same_sets(ks.sorted())


@pytest.mark.parametrize(
    "bad, msg",
    [
        (np.array([[[0, 0]]]), "twice"),
        (np.array([[[0, 9]]]), "lie in"),
        (np.array([[[-1, 2]]]), "first"),
        (np.array([[[0.5]]]), "integers"),
    ],
)
def test_invalid_indices(bad, msg):
    with pytest.raises(InputError, match=msg):
        KeepSet(bad, q_len=1, k_len=4)


def test_expand_kv_heads():
    ks = KeepSet(np.array([[[0, 1], [2, 3]]]), q_len=1, k_len=4, head_kind="kv")
    with pytest.raises(InputError):
        ks.token_rows(0, 0, 1, 0, 1)
    e = ks.expand_heads(4)
    assert e.head_kind == "q" and [e.kept(0, h).tolist() for h in range(4)] == [
        [0, 1],
        [0, 1],
        [2, 3],
        [2, 3],
    ]
    with pytest.raises(InputError):
        ks.expand_heads(3)


def test_attention_runs_evicted_cache():
    """attention(q, k, v, mask=keepset) equals dense attention over the gathered keys."""
    q, k, v = random_qkv(1, Hq=4, Hkv=2, L=24)
    qd = q[:, :, -3:]
    rng = np.random.default_rng(2)
    kept = [[np.sort(rng.choice(24, 10, replace=False)) for _ in range(2)]]
    ks = KeepSet.from_lists(kept, q_len=3, k_len=24, head_kind="kv")
    out = refattn.attention(qd, k, v, mask=ks.expand_heads(4))
    for g in range(2):
        kk, vv = k[:, g : g + 1, kept[0][g]], v[:, g : g + 1, kept[0][g]]
        ref = refattn.attention(qd[:, 2 * g : 2 * g + 2], np.repeat(kk, 1, 1), vv)
        np.testing.assert_allclose(out[:, 2 * g : 2 * g + 2], ref, atol=1e-12)


def test_token_mask():
    m = np.tril(np.ones((3, 5), bool), 2)
    tm = TokenMask(m)
    assert (
        tm.q_len == 3 and tm.k_len == 5 and np.array_equal(tm.token_rows(0, 0, 1, 1, 3)[0], m[1:3])
    )
    with pytest.raises(InputError):
        TokenMask(np.ones((2, 2)))


def test_budgets():
    assert resolve_budget(10, 100) == 10
    assert resolve_budget(500, 100) == 100
    assert resolve_budget(0.2, 101) == 20
    for bad in (-1, 0.0, 1.5, True, "3"):
        with pytest.raises(InputError, match="budget"):
            resolve_budget(bad, 10)
    assert resolve_head_budgets(0.5, 3, 10).tolist() == [5, 5, 5]
    assert resolve_head_budgets([1, 0.5, 20], 3, 10).tolist() == [1, 5, 10]
    with pytest.raises(InputError, match="per-head"):
        resolve_head_budgets([1, 2], 3, 10)
