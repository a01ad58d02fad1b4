"""H2O's two lm-eval single-forward rules against loop transliterations of the official code
(FMInference/H2O@ac75c2a, ``h2o_hf/utils_lm_eval``):

* ``single_forward_llama``: ``modify_llama.py`` ``LlamaAttention_heavy_hitter.forward``,
  the active l. 152-166 (global top-``heavy`` of the causal softmax's column sums, band
  ``|i - j| <= recent``), with the causal part from transformers' additive mask (l. 122-128);
* ``single_forward``: ``modify_gptneox.py`` l. 21-54 (``local_heavy_hitter_mask``) called at
  l. 228-241 (``modify_opt.py`` l. 23-59 / 191-205 is the same rule on ``[B*H, L, L]``).

The transliterations use plain loops and float64 (the official runs fp16), and share no code
with the reference; ``torch.topk`` ties are taken lower index first, as the reference does.
"""

import math

import numpy as np
import pytest
from kv_util import random_qkv

from refattn.core.errors import InputError
from refattn.core.registry import load_backend
from refattn.kvcache import h2o
from refattn.kvcache.h2o import (
    H2OParams,
    single_forward_llama_mask,
    single_forward_mask,
)

MIN = np.finfo(np.float64).min


def _topk(row, k):
    """torch.topk(k).indices with ties to the lower index."""
    return sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]


def _softmax_row(x):
    m = max(x)
    e = [math.exp(v - m) for v in x]
    s = sum(e)
    return [v / s for v in e]


def _logits(q, k):
    """``matmul(q, k^T) / sqrt(head_dim)`` per (b, h, i, j); MHA (k has q's heads)."""
    B, H, L, D = q.shape
    out = np.empty((B, H, L, L))
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(L):
                    out[b, h, i, j] = sum(q[b, h, i, d] * k[b, h, j, d] for d in range(D))
    return out / math.sqrt(D)


def official_llama(q, k, heavy_ratio, recent_ratio):
    """modify_llama.py forward l. 114-170 -> (mask_bottom, causal, final attention)."""
    w = _logits(q, k)
    B, H, L, _ = w.shape
    # transformers' _make_causal_mask: 0 on j <= i, finfo.min above; l. 127-128
    causal = np.array([[j <= i for j in range(L)] for i in range(L)])
    amask = np.where(causal, 0.0, MIN)
    w = np.maximum(w + amask, MIN)
    heavy = int(heavy_ratio * w.shape[-1])  # l. 131-132
    recent = int(recent_ratio * w.shape[-1])
    mask_bottom = np.zeros((B, H, L, L), dtype=bool)
    for b in range(B):
        for h in range(H):
            tmp_attn = [_softmax_row(list(w[b, h, i])) for i in range(L)]  # l. 153
            tmp_sum = [sum(tmp_attn[i][j] for i in range(L)) for j in range(L)]  # l. 154
            top = _topk(tmp_sum, heavy)  # l. 155
            for i in range(L):  # l. 157-159: the same keys on every row
                for j in top:
                    mask_bottom[b, h, i, j] = True
    for i in range(L):  # l. 161-164: tril(diagonal=recent) & triu(diagonal=-recent)
        for j in range(L):
            if j - i <= recent and j - i >= -recent:
                mask_bottom[:, :, i, j] = True
    w = np.where(mask_bottom, w, MIN)  # l. 166
    att = np.empty_like(w)  # l. 170
    for b in range(B):
        for h in range(H):
            for i in range(L):
                att[b, h, i] = _softmax_row(list(w[b, h, i]))
    return mask_bottom, causal, att


def official_gptneox(q, k, heavy_ratio, recent_ratio):
    """modify_gptneox.py: causal ``where`` (l. 213-217), local_heavy_hitter_mask (l. 21-54),
    band and tril (l. 225-238)."""
    w = _logits(q, k)
    B, H, L, _ = w.shape
    for i in range(L):
        for j in range(i + 1, L):
            w[:, :, i, j] = MIN
    heavy = int(heavy_ratio * L)
    recent = int(recent_ratio * L)
    mask = np.zeros((B, H, L, L), dtype=bool)
    if heavy > 0:
        for b in range(B):
            for h in range(H):
                P = [_softmax_row(list(w[b, h, i])) for i in range(L)]
                acc = [sum(P[i][j] for i in range(heavy)) for j in range(L)]  # l. 34
                for j in range(heavy, L):  # l. 35
                    acc[j] = 0.0
                for i in range(heavy):  # l. 40
                    for j in range(heavy):
                        mask[b, h, i, j] = True
                for t in range(heavy, L):  # l. 42-52
                    row = [False] * L
                    for j in _topk(acc, heavy - 1):
                        row[j] = True
                    row[t] = True
                    mask[b, h, t] = row
                    acc = [(acc[j] + P[t][j]) * row[j] for j in range(L)]
    for i in range(L):
        for j in range(L):
            mask[:, :, i, j] = (mask[:, :, i, j] | (j - i >= -recent)) & (j <= i)
    return mask


def _mha(q, k):
    """The official classes are MHA: query head h reads a copy of kv head h // G."""
    G = q.shape[1] // k.shape[1]
    kk = np.empty(q.shape[:2] + k.shape[2:])
    for h in range(q.shape[1]):
        kk[:, h] = k[:, h // G]
    return kk


def _structured(name, L=36, D=8, H=2):
    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, H, L, D))
    k = rng.standard_normal((1, H, L, D))
    if name == "uniform":  # q = 0: every causal row uniform
        q[:] = 0.0
    elif name == "sinks":  # keys 0 and 17 attract every query
        k[:, :, [0, 17], 0] += 8.0
        q[..., 0] = np.abs(q[..., 0]) + 1.0
    elif name == "periodic":  # identical keys every 6 positions
        k = np.tile(k[:, :, :6], (1, 1, L // 6, 1))
    elif name == "diagonal":  # peaked on the diagonal
        q = 4.0 * k
    return q, k


RATIOS = [(0.1, 0.1), (0.2, 0.05), (0.0, 0.1), (0.3, 0.0), (1.0, 0.0), (0.05, 1.0), (0.5, 0.5)]


@pytest.mark.parametrize("L", [1, 7, 37, 40])
@pytest.mark.parametrize("ratios", RATIOS)
def test_llama_matches_official_random(L, ratios):
    q, k, _ = random_qkv(L + 100 * RATIOS.index(ratios), B=2, Hq=3, Hkv=3, L=L, D=6)
    mb, causal, att = official_llama(q, k, *ratios)
    ours = single_forward_llama_mask(q, k, *ratios)
    np.testing.assert_array_equal(ours, mb & causal)
    # the official final attention is the causal softmax restricted to our mask
    s = np.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    s = np.where(ours, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(p / p.sum(-1, keepdims=True), att, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["uniform", "sinks", "periodic", "diagonal"])
@pytest.mark.parametrize("ratios", [(0.1, 0.1), (0.25, 0.05), (0.4, 0.0)])
def test_llama_matches_official_structured(name, ratios):
    q, k = _structured(name)
    mb, causal, _ = official_llama(q, k, *ratios)
    np.testing.assert_array_equal(single_forward_llama_mask(q, k, *ratios), mb & causal)


def test_llama_gqa_is_repeat_kv():
    q, k, v = random_qkv(11, B=1, Hq=4, Hkv=2, L=30, D=8)
    mb, causal, _ = official_llama(q, _mha(q, k), 0.2, 0.1)
    ours = single_forward_llama_mask(q, k, 0.2, 0.1)
    np.testing.assert_array_equal(ours, mb & causal)
    sel = h2o.select(
        q, k, v, H2OParams(variant="single_forward_llama", heavy_ratio=0.2, recent_ratio=0.1)
    )
    np.testing.assert_array_equal(sel.extras["token_mask"].mask, ours)


def test_llama_rule_shape():
    """Global heavy set (k = heavy, self not forced) | band |i-j| <= recent, then causal."""
    q, k, _ = random_qkv(3, Hq=2, Hkv=2, L=50)
    m = single_forward_llama_mask(q, k, 0.2, 0.1)  # heavy 10, recent 5
    acc = h2o.h2o_score(q, k)
    i, j = np.indices((50, 50))
    assert not (m & (j > i)).any()
    assert (m | ~((j >= i - 5) & (j <= i))).all()
    for h in range(2):
        heavy = np.sort(np.argsort(-acc[0, h], kind="stable")[:10])
        outside = m[0, h] & (j < i - 5)  # only heavy hitters lie outside the band
        assert set(np.nonzero(outside.any(0))[0]) <= set(heavy.tolist())
        np.testing.assert_array_equal(m[0, h, -1, heavy], True)  # the last row sees all 10
        assert m[0, h, -1].sum() == len(set(heavy.tolist()) | set(range(44, 50)))


def test_llama_ties_lower_index():
    q, k, _ = random_qkv(4, Hq=1, Hkv=1, L=20)
    scores = np.zeros((1, 1, 20))
    scores[..., [3, 9, 15]] = 1.0  # top 1 is a three-way tie; then a 17-way tie at 0
    m = single_forward_llama_mask(q, k, 0.25, 0.0, scores=scores)  # heavy 5, recent 0
    heavy = np.nonzero(m[0, 0, -1] & (np.arange(20) != 19))[0]
    np.testing.assert_array_equal(heavy, [0, 1, 3, 9, 15])


def test_llama_differs_from_greedy_rule():
    q, k, _ = random_qkv(6, Hq=2, Hkv=2, L=40)
    a = single_forward_llama_mask(q, k, 0.2, 0.1)
    b = single_forward_mask(q, k, 0.2, 0.1)
    assert (a != b).any()


@pytest.mark.parametrize("ratios", [(0.2, 0.1), (0.0, 0.1), (0.05, 0.0), (1.0, 0.0)])
@pytest.mark.parametrize("name", ["random", "sinks", "periodic"])
def test_greedy_matches_official_gptneox(ratios, name):
    if name == "random":
        q, k, _ = random_qkv(8, B=2, Hq=2, Hkv=2, L=33, D=6)
    else:
        q, k = _structured(name, L=30)
    np.testing.assert_array_equal(
        single_forward_mask(q, k, *ratios), official_gptneox(q, k, *ratios)
    )


def test_single_forward_llama_selection_and_validation():
    q, k, v = random_qkv(9, L=24)
    p = H2OParams(variant="single_forward_llama", heavy_ratio=0.25, recent_ratio=0.125)
    p.validate()
    assert "single_forward_llama" in h2o.VARIANTS and "single_forward" in h2o.VARIANTS
    sel = h2o.select(q, k, v, p)
    other = h2o.select(
        q, k, v, H2OParams(variant="single_forward", heavy_ratio=0.25, recent_ratio=0.125)
    )
    assert set(sel.extras) == set(other.extras) == {"keepset", "token_mask"}
    assert sel.extras["keepset"] is None
    assert sel.mask.mask.shape == other.mask.mask.shape == (1, 4, 24, 24)
    np.testing.assert_array_equal(sel.mask.mask, sel.extras["token_mask"].mask)
    np.testing.assert_array_equal(sel.mask.mask, single_forward_llama_mask(q, k, 0.25, 0.125))
    with pytest.raises(InputError, match="heavy_ratio"):
        H2OParams(variant="single_forward_llama", heavy_ratio=1.5).validate()
    with pytest.raises(InputError, match="recent_ratio"):
        H2OParams(variant="single_forward_llama", recent_ratio=-0.1).validate()
    with pytest.raises(InputError, match="variant"):
        H2OParams(variant="single_forward_opt").validate()
    with pytest.raises(InputError, match="Sq == Sk"):
        single_forward_llama_mask(q[:, :, :10], k, 0.1, 0.1)
    with pytest.raises(InputError, match="scores"):
        single_forward_llama_mask(q, k, 0.1, 0.1, scores=np.zeros((1, 4, 23)))
    for variant in h2o.SINGLE_FORWARD_VARIANTS:  # no cache: refuse rather than mask_sim
        with pytest.raises(InputError, match=variant):
            h2o.h2o_prefill(q, k, H2OParams(variant=variant))


@pytest.mark.skipif(load_backend("numba") is not None, reason="numba backend unavailable")
def test_single_forward_llama_numba_backend():
    q, k, v = random_qkv(10, L=48)
    p = H2OParams(variant="single_forward_llama", heavy_ratio=0.2, recent_ratio=0.1)
    a = h2o.select(q, k, v, p, backend="numpy")
    b = h2o.select(q, k, v, p, backend="numba")
    np.testing.assert_array_equal(a.mask.mask, b.mask.mask)
