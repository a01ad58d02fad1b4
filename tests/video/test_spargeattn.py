"""SpargeAttn stage one against a transliteration of the official
``get_block_map_meansim_fuse_quant`` (thu-ml/SpargeAttn@bfd980b), the CDF rule (crossing block
excluded), self-similarity gating, partial blocks, sink, causal, top-k, kernels, errors."""
from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.testing import assert_mask_matches
from refattn.video.spargeattn import cdf_count, spargeattn_pool


def official_pool_sim(x, bs, km):
    """``triton_bmm_pool_sim_simmean_fuse_quant`` per block: masked rows load as 0, are not
    re-centred (``tl.where(xmask, x, 0)``), and give 0/0 = NaN in the normalisation."""
    B, H, N, D = x.shape
    nb = -(-N // bs)
    pool, sim = np.zeros((B, H, nb, D)), np.zeros((B, H, nb))
    for b in range(B):
        for h in range(H):
            for c in range(nb):
                blk = np.zeros((bs, D))
                real = x[b, h, c * bs:(c + 1) * bs].astype(np.float64)
                blk[:len(real)] = real - (km[b, h] if km is not None else 0.0)
                n = len(real)
                pool[b, h, c] = blk.sum(0) / n
                with np.errstate(invalid="ignore", divide="ignore"):
                    u = blk / np.sqrt((blk * blk).sum(1, keepdims=True))
                    sim[b, h, c] = (u @ u.T).sum() / (n * n)
    return pool, sim


def official_map(q, k, bq, bk, thr, tau, topk, causal, sink, smooth_k=True):
    """``get_block_map_meansim_fuse_quant`` in NumPy (stable sorts, float64)."""
    B, H, Sq, D = q.shape
    km = k.astype(np.float64).mean(2) if smooth_k else None
    pq, sq = official_pool_sim(q, bq, None)
    pk, sk = official_pool_sim(k, bk, km)
    pq, pk = pq.astype(q.dtype).astype(np.float64), pk.astype(k.dtype).astype(np.float64)
    thr = np.float32(thr)
    sim_k, sim_q = sk > thr, sq > thr                       # NaN > thr is False
    nq, nk = pq.shape[2], pk.shape[2]
    S = pq @ np.swapaxes(pk, -1, -2) * D ** -0.5
    S = np.where(sim_k[:, :, None, :], S, -np.inf)
    cm = np.array([[kk < (qq + 1) * (bq / bk) for kk in range(nk)] for qq in range(nq)])
    if causal:
        S = np.where(cm, S, -np.inf)
    with np.errstate(invalid="ignore"):
        P = np.exp(S - S.max(-1, keepdims=True))
        P = P / P.sum(-1, keepdims=True)
    final = np.zeros(P.shape, bool)
    final |= ~sim_k[:, :, None, :]
    final |= ~sim_q[..., None]
    for b, h, i in np.ndindex(B, H, nq):
        row = np.nan_to_num(P[b, h, i])
        idx = np.argsort(-row, kind="stable")
        cdf = np.cumsum(row[idx])
        n = int(np.float32(topk) * nk) if tau is None else int(np.searchsorted(cdf, np.float32(tau), side="right"))
        n = n + 1 if n == 0 else n
        final[b, h, i, idx[:n]] = True
    if causal:
        final &= cm
    if sink:
        final[..., 0] = True
    return final


@pytest.mark.parametrize("case", [
    dict(L=203, bq=32, bk=16, thr=0.3, tau=0.9, topk=None, causal=False, sink=False),
    dict(L=256, bq=64, bk=32, thr=0.2, tau=0.98, topk=None, causal=True, sink=True),
    dict(L=190, bq=32, bk=32, thr=-0.1, tau=None, topk=0.3, causal=False, sink=False),
    dict(L=160, bq=16, bk=32, thr=0.25, tau=0.5, topk=None, causal=True, sink=False),
])
def test_matches_official_transliteration(case):
    q, k, _ = synthetic(1, 2, 2, case["L"], 32, seed=4)
    sel = refattn.select(q, k, "spargeattn", causal=case["causal"], block_q=case["bq"],
                         block_k=case["bk"], simthreshd1=case["thr"], cdfthreshd=case["tau"],
                         topk=case["topk"], attention_sink=case["sink"])
    want = official_map(q, k, case["bq"], case["bk"], case["thr"], case["tau"], case["topk"],
                        case["causal"], case["sink"])
    np.testing.assert_array_equal(sel.mask.mask, want)
    assert 0 < sel.mask.mask.mean() < 1                      # the case is not trivially dense


def test_pool_similarity_against_official_kernel_semantics():
    _, k, _ = synthetic(1, 2, 2, 100, 16, seed=1)
    for center in (True, False):
        pool, sim = spargeattn_pool(k, 32, center)
        op, osim = official_pool_sim(k, 32, k.astype(np.float64).mean(2) if center else None)
        np.testing.assert_allclose(pool, op, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sim[:, :, :3], osim[:, :, :3], rtol=1e-12)
    k = np.array(k)
    k[0, 0, 5] = 0.0                                         # a zero row: 0/0 in the official kernel
    pool, sim = spargeattn_pool(k, 32, False)
    op, osim = official_pool_sim(k, 32, None)
    np.testing.assert_allclose(pool, op, rtol=1e-12, atol=1e-12)
    fin = np.isfinite(osim)
    np.testing.assert_allclose(sim[fin], osim[fin], rtol=1e-12)
    assert np.all(np.isneginf(sim[~fin]))                   # official NaN <-> -inf here
    assert np.isneginf(sim[:, :, 3]).all()                   # partial last block (4 rows)
    assert np.isneginf(sim[0, 0, 0]) and np.isfinite(sim[0, 1, 0])
    same = np.repeat(k[:, :, :1], 32, axis=2)
    assert spargeattn_pool(same, 32, False)[1] == pytest.approx(1.0)


def test_cdf_rule_excludes_crossing_block():
    P = np.array([[[[0.5, 0.25, 0.125, 0.125], [0.25, 0.5, 0.125, 0.125]]]])
    tau = np.array([0.75])
    np.testing.assert_array_equal(cdf_count(P, tau, None), [[[2, 2]]])        # cdf 0.75 <= 0.75
    np.testing.assert_array_equal(cdf_count(P, np.array([0.7]), None), [[[1, 1]]])
    np.testing.assert_array_equal(cdf_count(P, np.array([0.4]), None), [[[0, 0]]])  # then max(., 1)
    np.testing.assert_array_equal(cdf_count(P, None, np.array([0.6])), [[[2, 2]]])   # int(0.6*4)


def test_non_self_similar_blocks_dense_and_per_head_thresholds():
    q, k, _ = synthetic(1, 2, 1, 200, 32, seed=9)
    sel = refattn.select(q, k, "spargeattn", causal=False, block_q=32, block_k=32,
                         simthreshd1=(0.2, 0.99), cdfthreshd=0.5)
    m, ex = sel.mask.mask, sel.extras
    assert not ex["k_similar"][0, 1].any() and not ex["q_similar"][0, 1].any()
    assert m[0, 1].all()                                     # head 1: nothing similar -> dense
    assert not ex["k_similar"][0, 0, -1]                     # partial last key block
    assert m[0, 0][:, ~ex["k_similar"][0, 0]].all()
    assert m[0, 0][~ex["q_similar"][0, 0]].all()
    assert not m[0, 0].all()


def test_gqa_and_numba_backend():
    q, k, _ = synthetic(2, 4, 2, 230, 32, seed=6)
    kw = dict(causal=True, block_q=64, block_k=32, simthreshd1=0.25, cdfthreshd=0.9)
    ref = refattn.select(q, k, "spargeattn", **kw)
    nb = refattn.select(q, k, "spargeattn", backend="numba", **kw)
    np.testing.assert_allclose(nb.scores.scores, ref.scores.scores, rtol=1e-6, atol=1e-9)
    assert_mask_matches(ref, nb.mask, tol=1e-6)
    out = refattn.attention(q, k, np.ones_like(k), mask=ref, causal=True)
    np.testing.assert_allclose(out, 1.0, rtol=1e-12)         # every row sees at least one key


@pytest.mark.parametrize("kw", [dict(cdfthreshd=None), dict(topk=0.5), dict(cdfthreshd=1.5),
                                dict(simthreshd1=(0.1, 0.2, 0.3)), dict(block_q=0),
                                dict(smooth_k="yes"), dict(grid=(2, 4, 4)),
                                dict(grid=(2, 4, 4), text_tokens=32, text_position="mid")])
def test_errors(kw):
    q, k, _ = synthetic(1, 2, 1, 64, 16, seed=0)
    with pytest.raises(InputError):
        refattn.select(q, k, "spargeattn", causal=False, **kw)
    with pytest.raises(InputError):
        refattn.select(q[:, :, :50], k, "spargeattn", causal=True)


@pytest.mark.parametrize("op", ["spargeattn_pool", "spargeattn_map"])
def test_kernel_registry_check(op):
    """The registry-driven kernel check (tests/test_registry.py) on this method's ops; run
    here too because that module only sees ops whose modules are imported at collection."""
    from test_registry import test_kernel_matches_reference

    import refattn.cases.video_scores  # noqa: F401

    test_kernel_matches_reference(op, "numba")


def test_grid_only_checks_length():
    q, k, _ = synthetic(1, 2, 1, 64, 16, seed=0)
    a = refattn.select(q, k, "spargeattn", causal=False, block_q=16, block_k=16, simthreshd1=0.1)
    b = refattn.select(q, k, "spargeattn", causal=False, block_q=16, block_k=16, simthreshd1=0.1,
                       grid=(2, 4, 4), text_tokens=32)
    assert a.mask == b.mask


def test_float32_inputs_run_in_fp16_as_the_official_entry_point():
    """core.py casts fp32 q/k to fp16 before pooling: a float32 input selects exactly what
    its fp16 rounding selects, and the pooled means are fp16 values."""
    rng = np.random.default_rng(7)
    q = (rng.standard_normal((1, 2, 512, 64)) * 3).astype(np.float32)
    k = (rng.standard_normal((1, 2, 512, 64)) * 3).astype(np.float32)
    sel = refattn.select(q, k, "spargeattn", simthreshd1=-1.0, cdfthreshd=0.9)
    half = refattn.select(q.astype(np.float16), k.astype(np.float16), "spargeattn",
                          simthreshd1=-1.0, cdfthreshd=0.9)
    np.testing.assert_array_equal(sel.mask.mask, half.mask.mask)
    pq = np.asarray(sel.extras["pooled_q"])
    np.testing.assert_array_equal(pq, pq.astype(np.float16).astype(np.float64))
