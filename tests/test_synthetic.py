"""refattn.data: structured synthetic inputs show their structure; RoPE; the real sample."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from refattn import InputError
from refattn.data import HEAD_PROFILES, head_profile, rope, sample, structure_of, synthetic, unrope

S = 384
SEED = 2  # puts three stripes in the first half


def _probs(q: np.ndarray, k: np.ndarray, h: int) -> np.ndarray:
    """Causal softmax probabilities ``[Sq, Sk]`` of query head h (bottom-right aligned)."""
    g = h // (q.shape[1] // k.shape[1])
    qq, kk = q[0, h].astype(np.float64), k[0, g].astype(np.float64)
    s = qq @ kk.T / np.sqrt(qq.shape[-1])
    off = kk.shape[0] - qq.shape[0]
    s = np.where(np.arange(kk.shape[0])[None] <= np.arange(qq.shape[0])[:, None] + off, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def structured():
    return synthetic(seq_len=S, q_heads=4, kv_heads=2, seed=SEED)


def test_shapes_dtype_determinism(structured):
    q, k, v = structured
    assert q.shape == (1, 4, S, 64) and k.shape == v.shape == (1, 2, S, 64)
    assert q.dtype == np.float32
    q2, k2, v2 = synthetic(seq_len=S, q_heads=4, kv_heads=2, seed=SEED)
    assert np.array_equal(q, q2) and np.array_equal(k, k2) and np.array_equal(v, v2)
    q3, _, _ = synthetic(seq_len=S, q_heads=4, kv_heads=2, seed=SEED + 1)
    assert not np.array_equal(q, q3)
    qb, kb, _ = synthetic(batch=2, q_heads=2, kv_heads=1, seq_len=40, head_dim=16, q_len=7,
                          dtype=ml_dtypes.bfloat16)
    assert qb.shape == (2, 2, 7, 16) and kb.shape == (2, 1, 40, 16)
    assert qb.dtype == ml_dtypes.bfloat16


def test_sink_head(structured):
    q, k, _ = structured
    assert [head_profile(h) for h in range(4)] == ["sink", "local", "diffuse", "striped"]
    sink_mass = {h: _probs(q, k, h)[64:, 0].mean() for h in range(4)}
    assert sink_mass[0] > 0.5                  # the sink-heavy head
    assert sink_mass[2] < 0.05                 # the diffuse head barely looks at key 0
    q_ns, k_ns, _ = synthetic(seq_len=S, q_heads=4, kv_heads=2, seed=SEED, sinks=False)
    assert _probs(q_ns, k_ns, 0)[64:, 0].mean() < 0.05   # no sink without sinks


def test_local_head(structured):
    q, k, _ = structured
    i, j = np.arange(S)[:, None], np.arange(S)[None, :]
    near = (i - j >= 0) & (i - j < 16)
    local = {h: (_probs(q, k, h) * near).sum(-1)[64:].mean() for h in range(4)}
    assert local[1] > 0.6                      # the local head keeps most mass near the diagonal
    assert local[2] < 0.3                      # uniform over >= 64 keys would give <= 0.25
    q_nl, k_nl, _ = synthetic(seq_len=S, q_heads=4, kv_heads=2, seed=SEED, local=False)
    assert (_probs(q_nl, k_nl, 1) * near).sum(-1)[64:].mean() < 0.3


@pytest.mark.parametrize("seed", range(6))
def test_structure_holds_for_every_seed(seed):
    # the local term and the slashes use disjoint RoPE pairs, so slashes never wash out the
    # local head (with a shared band, RoPE side lobes did for some seeds)
    q, k, _ = synthetic(seq_len=256, q_heads=2, kv_heads=1, seed=seed)
    i, j = np.arange(256)[:, None], np.arange(256)[None, :]
    near = (i - j >= 0) & (i - j < 16)
    assert (_probs(q, k, 1) * near).sum(-1)[64:].mean() > 0.6
    assert _probs(q, k, 0)[64:, 0].mean() > 0.5


def test_stripes_and_slashes(structured):
    q, k, _ = structured
    where = structure_of(S, seed=SEED)
    assert where["stripes"].size == 4 and where["slashes"].size == 2
    p = _probs(q, k, 3)                        # the striped head
    col = p[S // 2:, 1: S // 2].mean(0)        # columns all late queries may see
    stripes = [c - 1 for c in where["stripes"] if c < S // 2]
    assert stripes, "SEED puts a stripe in the first half"
    assert col[stripes].min() > 10 * np.median(col)
    diag = np.array([np.mean(np.diagonal(p, -d)) for d in range(1, S // 2)])
    for d in where["slashes"]:
        assert diag[d - 1] > 10 * np.median(diag)


def test_q_len_positions():
    # queries sit at positions S-Sq..S-1: the local head peaks on the bottom-right diagonal
    q, k, _ = synthetic(seq_len=256, q_len=32, q_heads=2, kv_heads=1, seed=1, sinks=False,
                        stripes=0, slashes=0)
    assert q.shape[2] == 32
    p = _probs(q, k, 1)                        # head 1: the local profile
    peak = p.argmax(-1)
    assert np.mean(np.abs(peak - np.arange(256 - 32, 256)) <= 3) > 0.9


def test_rope_round_trip_and_relative_positions():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 50, 32))
    pos = np.arange(50) * 7 + 3
    y = rope(x, pos, 10000.0)
    assert np.allclose(unrope(y, pos, 10000.0), x, rtol=0, atol=1e-12)
    assert np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1))
    # q_i . k_j depends only on i - j for identical pre-RoPE vectors
    a, b = rng.standard_normal(32), rng.standard_normal(32)
    n = 40
    qa = rope(np.tile(a, (n, 1)), np.arange(n), 500.0)
    kb = rope(np.tile(b, (n, 1)), np.arange(n), 500.0)
    dots = qa @ kb.T
    for delta in (-5, 0, 3, 17):
        diag = np.diagonal(dots, -delta)       # entries with i - j = delta
        assert np.allclose(diag, diag[0], atol=1e-10)
    assert not np.allclose(np.diagonal(dots, 0)[0], np.diagonal(dots, -3)[0])
    # NeoX rotate-half: pair p is (x[p], x[p + D/2]), rotated by pos * theta^(-2p/D)
    e = np.zeros((1, 32))
    e[0, 1] = 1.0
    r = rope(e, np.array([2.0]), 100.0)[0]
    ang = 2.0 * 100.0 ** (-2 / 32)
    assert np.isclose(r[1], np.cos(ang)) and np.isclose(r[17], np.sin(ang))


def test_errors():
    with pytest.raises(InputError, match="q_heads"):
        synthetic(q_heads=3, kv_heads=2)
    with pytest.raises(InputError, match="q_len"):
        synthetic(seq_len=8, q_len=9)
    with pytest.raises(InputError, match="head_dim"):
        synthetic(head_dim=15)
    with pytest.raises(InputError, match="positions"):
        rope(np.zeros((4, 8)), np.arange(5))
    with pytest.raises(InputError, match="even"):
        rope(np.zeros((4, 7)), np.arange(4))
    assert len(HEAD_PROFILES) == 4


def test_sample():
    s = sample()
    q, k, v, meta = s
    assert q.shape == (1, 3, 2048, 64) and k.shape == v.shape == (1, 1, 2048, 64)
    assert q.dtype == k.dtype == v.dtype == np.float32
    assert meta["softmax_scale"] == 0.125 and meta["causal"] is True
    assert meta["q_head_index"].tolist() == [0, 1, 4]
    assert np.isfinite(q).all() and np.isfinite(k).all()
