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
from refattn.video import _half_scan
from refattn.video.spargeattn import cdf_count, cdf_count_half, spargeattn_pool


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
                         topk=case["topk"], attention_sink=case["sink"], cdf_precision="exact")
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


# ------------------------------------------------ cdf_precision="official": the half pipeline
HALVES = [np.dtype(np.float16), "bf16"]


def _half(dt):
    return np.dtype(pytest.importorskip("ml_dtypes").bfloat16) if dt == "bf16" else dt


def scan_loop(x, dtype):
    """``torch.cumsum(x, -1)`` on CUDA thread by thread as ScanUtils.cuh writes it (one row:
    CUB, here sequential; else ``tensor_kernel_scan_innermost_dim_impl``)."""
    def add(a, b):                                     # c10 Half/BFloat16 operator+
        return float(np.array(np.float32(a) + np.float32(b)).astype(dtype).astype(np.float32))

    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    R = rows.shape[0]
    out = np.empty_like(rows)
    if R == 1:
        for j in range(n):
            out[0, j] = add(out[0, j - 1], rows[0, j]) if j else rows[0, 0]
        return out.reshape(x.shape)
    lx = (n - 1).bit_length()                              # while ((1 << lx) < row_size) ++lx
    ly = (R - 1).bit_length()
    diff = (lx - ly) & 0xFFFFFFFF
    lx = min(max(4, ((9 + diff) & 0xFFFFFFFF) // 2), 9)
    nx = 1 << lx
    for r in range(R):
        block_total = 0.0
        for block_col in range(0, n, 2 * nx):
            buf = [0.0] * (2 * nx)
            for t in range(nx):
                c1, c2 = block_col + t, block_col + nx + t
                buf[t] = float(rows[r, c1]) if c1 < n else 0.0
                buf[nx + t] = float(rows[r, c2]) if c2 < n else 0.0
            buf[0] = add(buf[0], block_total)
            for m in range(lx + 1):
                s = 1 << m
                for t in range(nx):
                    a = (t // s) * (2 * s) + s
                    buf[a + t % s] = add(buf[a + t % s], buf[a - 1])   # ti += si
            for c in range(block_col, min(block_col + 2 * nx, n)):   # col1, col2 write back
                out[r, c] = buf[c - block_col]
            block_total = buf[2 * nx - 1]
    return out.reshape(x.shape)


def upper_bound_loop(seq, val):
    """Bucketization.cu ``upper_bound`` for one row (float32 comparisons)."""
    start, end = 0, len(seq)
    while start < end:
        mid = start + ((end - start) >> 1)
        if not (np.float32(seq[mid]) > np.float32(val)):
            start = mid + 1
        else:
            end = mid
    return start


@pytest.mark.parametrize("rows,row_size,want", [
    (2, 512, 8), (128, 512, 5), (512, 1024, 5), (32, 2048, 7), (1024, 2, 4),   # PR #103435
    (2, 2, 4), (4, 4096, 9), (2048, 512, 4),
    (2 ** 16, 64, 9),        # uint32: diff = 6 - 16 wraps, (9 + diff) / 2 ~ 2^31 -> 9 (not 4)
])
def test_log_num_threads_x_inner_scan(rows, row_size, want):
    assert _half_scan.log_num_threads_x_inner_scan(rows, row_size) == want


def test_scan_hand_derived_sklansky_order():
    """fp16 ulp(1) = 2^-10. Sequential: 1 + 2^-11 ties to 1, three times -> 1. Sklansky (one
    chunk): cdf[3] = (x2 + x3) + (x0 + x1) = 2^-10 + 1, exactly representable."""
    t = 2.0 ** -11
    x = np.array([[1.0, t, t, t], [0.0, 0.0, 0.0, 0.0]], np.float32)   # 2 rows: not the CUB path
    got = _half_scan.cumsum_cuda(x, np.float16)
    np.testing.assert_array_equal(got[0], [1.0, 1.0, 1.0, 1.0 + 2.0 ** -10])
    np.testing.assert_array_equal(got, scan_loop(x, np.float16))
    np.testing.assert_array_equal(got[1], 0.0)
    seq = _half_scan.cumsum_cuda(x[:1], np.float16)                   # one row: sequential
    np.testing.assert_array_equal(seq[0], [1.0, 1.0, 1.0, 1.0])
    # rows of <= 3 elements: the tree is the sequential order
    y = np.random.default_rng(3).random((5, 3)).astype(np.float16).astype(np.float32)
    want = np.empty_like(y)
    want[:, 0] = y[:, 0]
    for j in (1, 2):
        want[:, j] = (want[:, j - 1] + y[:, j]).astype(np.float16)
    np.testing.assert_array_equal(_half_scan.cumsum_cuda(y, np.float16), want)


@pytest.mark.parametrize("dt", HALVES)
def test_scan_exact_integers_cover_every_element_once(dt):
    """Small integers add exactly in the half dtype, so any summation tree gives np.cumsum:
    checks the chunking, padding and carry of every row length (chunks of 32..1024)."""
    dtype = _half(dt)
    cap = 2048 if dtype == np.float16 else 256
    rng = np.random.default_rng(0)
    for rows, n in ((3, 1), (2, 31), (4, 33), (7, 100), (2, 513), (300, 70), (1, 9)):
        x = rng.integers(0, max(1, cap // n), (rows, n)).astype(np.float32)
        np.testing.assert_array_equal(_half_scan.cumsum_cuda(x, dtype), np.cumsum(x, -1))


@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 6, 40), (64, 100), (256, 70), (2, 2, 129),
                                   (1, 200)])
def test_scan_matches_thread_loop(dt, shape):
    """Against the thread loop; (64, 100) and (256, 70) span 2 and 3 chunks (carry)."""
    dtype = _half(dt)
    rng = np.random.default_rng(sum(shape))
    x = rng.random(shape) ** 4
    x = _half_scan.to_half(x / x.sum(-1, keepdims=True), dtype)
    np.testing.assert_array_equal(_half_scan.cumsum_cuda(x, dtype), scan_loop(x, dtype))


def test_searchsorted_follows_the_binary_search():
    """A rounded cdf need not be monotone; torch's upper_bound answers by its probes:
    [0.5, 0.9, 0.8, 0.99] at 0.85 probes index 2 (0.8 <= 0.85 -> right), then 3 -> 3
    (a count of elements <= 0.85 would say 2). Half cdf vs float32 tau: compared in float32."""
    seq = np.array([[0.5, 0.9, 0.8, 0.99]], np.float32)
    assert _half_scan.searchsorted_right(seq, np.array([0.85], np.float32))[0] == 3
    assert upper_bound_loop(seq[0], 0.85) == 3
    tau = np.array([0.98], np.float32)                       # 0.98000001907...
    cdf = np.array([[np.float16(0.98), 0.99, 1.0]], np.float32)   # fp16 0.98 = 0.97998...
    assert _half_scan.searchsorted_right(cdf, tau)[0] == 1
    assert _half_scan.searchsorted_right(np.full((1, 4), np.nan), tau)[0] == 4   # NaN row


@pytest.mark.parametrize("dt", HALVES)
def test_official_count_typically_exceeds_exact_near_098(dt):
    """Near tau = 0.98 small tail masses stop moving a half running sum: on peaked rows of 512
    blocks the official count is larger on average (bf16, step 2^-8: in most rows)."""
    dtype = _half(dt)
    rng = np.random.default_rng(0)
    S = rng.standard_normal((1, 4, 64, 512)) * 2.0
    P = np.exp(S - S.max(-1, keepdims=True))
    P = _half_scan.to_half(P / P.sum(-1, keepdims=True), dtype).astype(np.float64)
    tau = np.full(4, np.float32(0.98), np.float64)
    d = cdf_count_half(P, tau, None, dtype) - cdf_count(P, tau, None)
    assert d.mean() > 0.5 and (d >= 0).mean() > 0.6
    if dt == "bf16":
        assert (d != 0).mean() > 0.9 and d.max() > 50


def official_map_half(q, k, bq, bk, thr, tau, causal, dtype):
    """The official block map with the torch half ops in plain loops (inputs of ``dtype``)."""
    B, H, Sq, D = q.shape
    km = k.astype(np.float64).mean(2)
    pq, sq = official_pool_sim(q, bq, None)
    pk, sk = official_pool_sim(k, bk, km)
    pq, pk = pq.astype(dtype).astype(np.float64), pk.astype(dtype).astype(np.float64)
    thr = np.float32(thr)
    sim_k, sim_q = sk > thr, sq > thr
    nq, nk = pq.shape[2], pk.shape[2]
    S = (pq @ np.swapaxes(pk, -1, -2)).astype(dtype).astype(np.float32)       # half GEMM
    S = (S * np.float32(D ** -0.5)).astype(dtype).astype(np.float64)         # * scale
    S = np.where(sim_k[:, :, None, :], S, -np.inf)
    cm = np.array([[kk < (qq + 1) * (bq / bk) for kk in range(nk)] for qq in range(nq)])
    if causal:
        S = np.where(cm, S, -np.inf)
    with np.errstate(invalid="ignore"):
        P = np.exp(S - S.max(-1, keepdims=True))
        P = (P / P.sum(-1, keepdims=True)).astype(dtype).astype(np.float32)  # half softmax
    order = np.argsort(-P, axis=-1, kind="stable")                         # stable sort
    cdf = scan_loop(np.take_along_axis(P, order, -1), dtype)
    final = ~sim_k[:, :, None, :] | ~sim_q[..., None]
    for b, h, i in np.ndindex(B, H, nq):
        n = max(upper_bound_loop(cdf[b, h, i], np.float32(tau)), 1)
        final[b, h, i, order[b, h, i, :n]] = True
    return final & cm if causal else final


@pytest.mark.parametrize("dt", HALVES)
@pytest.mark.parametrize("case", [
    dict(L=1024, bq=32, bk=16, thr=-1.0, tau=0.99, causal=False),
    dict(L=1024, bq=32, bk=16, thr=0.1, tau=0.98, causal=True),
])
def test_official_half_pipeline_matches_loop_transliteration(dt, case):
    dtype = _half(dt)
    q, k, _ = synthetic(1, 2, 2, case["L"], 32, seed=5, dtype=dtype)
    kw = dict(causal=case["causal"], block_q=case["bq"], block_k=case["bk"],
              simthreshd1=case["thr"], cdfthreshd=case["tau"])
    sel = refattn.select(q, k, "spargeattn", **kw)
    want = official_map_half(q, k, case["bq"], case["bk"], case["thr"], case["tau"],
                             case["causal"], dtype)
    np.testing.assert_array_equal(sel.mask.mask, want)
    np.testing.assert_array_equal(sel.scores.scores, sel.scores.scores.astype(dtype))  # half
    exact = refattn.select(q, k, "spargeattn", cdf_precision="exact", **kw)
    assert 0 < sel.mask.mask.mean() < 1
    assert (sel.mask.mask != exact.mask.mask).any()            # the half rule matters here


def test_float64_inputs_and_exact_mode():
    """Float64 inputs have no half dtype: "official" is the float64 rule there. "exact" on
    float32 inputs is the float64 rule of the map op (the previous behaviour)."""
    q, k, _ = synthetic(1, 2, 2, 300, 32, seed=8, dtype=np.float64)
    kw = dict(causal=False, block_q=32, block_k=16, simthreshd1=0.1, cdfthreshd=0.95)
    a = refattn.select(q, k, "spargeattn", **kw)
    b = refattn.select(q, k, "spargeattn", cdf_precision="exact", **kw)
    assert a.mask == b.mask
    np.testing.assert_array_equal(a.scores.scores, b.scores.scores)
    np.testing.assert_array_equal(a.extras["num_selected"], b.extras["num_selected"])
    with pytest.raises(InputError):
        refattn.select(q, k, "spargeattn", cdf_precision="fp16", **kw)


@pytest.mark.parametrize("precision", ["official", "exact"])
def test_numba_backend_same_selection_both_precisions(precision):
    q, k, _ = synthetic(1, 4, 2, 400, 32, seed=11)
    kw = dict(causal=True, block_q=32, block_k=16, simthreshd1=0.1, cdfthreshd=0.98,
              cdf_precision=precision)
    ref, nb = (refattn.select(q, k, "spargeattn", backend=b, **kw) for b in ("numpy", "numba"))
    assert ref.mask == nb.mask
    np.testing.assert_array_equal(ref.extras["num_selected"], nb.extras["num_selected"])
