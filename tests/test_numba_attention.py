"""Numba attention kernels (forward and backward) against the float64 reference.

Every comparison uses the tolerance rule of DESIGN.md through :func:`refattn.check.
compare_arrays`: ``max|out - ref| <= 2 max|base - ref| + atol`` with ``base`` the emulated
float32 (or low-precision) baseline of :mod:`refattn.testing`; NaN never passes and ``-inf``
LSEs must match exactly. Outputs are preallocated and poisoned with NaN.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")
pytest.importorskip("scipy")

import refattn  # noqa: E402
from refattn import testing  # noqa: E402
from refattn.check import compare_arrays  # noqa: E402
from refattn.core.blockmask import BlockMask  # noqa: E402
from refattn.core.errors import InputError  # noqa: E402
from refattn.kernels import numba_attention as nfwd  # noqa: E402
from refattn.kernels import numba_attention_bwd as nbwd  # noqa: E402
from refattn.reference.attention import attention_backward as ref_bwd  # noqa: E402
from refattn.reference.attention import attention_forward as ref_fwd  # noqa: E402


def _poison(*shapes):
    return tuple(np.full(s, np.nan, np.float32) for s in shapes)


def check_fwd(q, k, v, mask=None, causal=False, dtype="float32"):
    """Run the kernel on poisoned outputs and apply the tolerance rule to out and lse."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    B, Hq, Sq, _ = q.shape
    out = _poison((B, Hq, Sq, v.shape[-1]), (B, Hq, Sq))
    o, lse = nfwd.attention_forward(q, k, v, mask, causal, scale, out=out)
    assert o is out[0] and lse is out[1]
    ro, rl = ref_fwd(q, k, v, mask, causal, scale)
    bo, bl = testing.emulate_lowp_attention(q, k, v, mask, causal, scale, dtype)
    for name, r, g, b in (("out", ro, o, bo), ("lse", rl, lse, bl)):
        rep = compare_arrays(r, g, dtype, base=b, name=name)
        assert rep.ok, rep.summary()
    empty = ~np.isfinite(rl)
    assert np.all(o[empty] == 0.0) and np.all(lse[empty] == -np.inf)
    return o, lse, rl


def check_bwd(q, k, v, mask=None, causal=False, seed=0):
    scale = 1.0 / np.sqrt(q.shape[-1])
    ro, rl = ref_fwd(q, k, v, mask, causal, scale)
    o32, l32 = ro.astype(np.float32), rl.astype(np.float32)
    do = np.random.default_rng(seed).standard_normal(ro.shape).astype(np.float32)
    out = _poison(q.shape, k.shape, v.shape)
    got = nbwd.attention_backward(q, k, v, o32, do, l32, mask, causal, scale, out=out)
    assert all(g is p for g, p in zip(got, out, strict=True))
    ref = ref_bwd(q, k, v, o32, do, l32, mask, causal, scale)
    base = testing.emulate_lowp_backward(q, k, v, o32, do, l32, mask, causal, scale)
    for name, r, g, b in zip(("dq", "dk", "dv"), ref, got, base, strict=True):
        rep = compare_arrays(r, g, "float32", base=b, name=name)
        assert rep.ok, rep.summary()
    return got


# ------------------------------------------------------------------------- forward
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (17, 17), (113, 203), (203, 113), (130, 257), (239, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_forward_shapes(Sq, Sk, causal):
    rng = np.random.default_rng(Sq * 1000 + Sk)
    q, k, v = testing.random_qkv(rng, 1, 4, 2, Sq, Sk, 32)
    _, lse, rl = check_fwd(q, k, v, None, causal)
    if causal and Sq > Sk:      # the first Sq - Sk rows see no key
        assert np.all(np.isneginf(lse[..., : Sq - Sk]))
        assert np.all(np.isfinite(lse[..., Sq - Sk:]))


def test_dense_forward_structured_and_sinks():
    rng = np.random.default_rng(1)
    check_fwd(*testing.structured_qkv(rng, 2, 4, 1, 150, 150, 64), None, True)
    check_fwd(*testing.sink_qkv(rng, batch=1, q_heads=2, kv_heads=1, q_len=70, k_len=200,
                                head_dim=32), None, True)


def test_dense_forward_v_dim_differs():
    rng = np.random.default_rng(2)
    q, k, v = testing.random_qkv(rng, 1, 2, 1, 90, 120, 32, v_dim=48)
    check_fwd(q, k, v, None, True)


@pytest.mark.parametrize("bq,bk", [(16, 32), (64, 64), (7, 5), (1, 16), (1, 64), (128, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_forward_random(bq, bk, causal):
    rng = np.random.default_rng(bq * 100 + bk + causal)
    Sq, Sk = 150, 203
    q, k, v = testing.random_qkv(rng, 2, 4, 2, Sq, Sk, 32)
    m = testing.random_block_mask(rng, 2, 4, Sq, Sk, bq, bk, 0.35, causal=causal)
    check_fwd(q, k, v, m, causal)


@pytest.mark.parametrize("name", ["empty", "full", "single", "diagonal", "sink_diagonal"])
@pytest.mark.parametrize("Sq,Sk", [(130, 130), (200, 90), (70, 257)])
def test_block_sparse_forward_structured(name, Sq, Sk):
    rng = np.random.default_rng(Sq + Sk)
    q, k, v = testing.random_qkv(rng, 1, 2, 1, Sq, Sk, 32)
    m = testing.structured_masks(1, 2, Sq, Sk, 32, 64)[name]
    for causal in (False, True):
        o, lse, rl = check_fwd(q, k, v, m, causal)
        if name == "empty":
            assert np.all(o == 0.0) and np.all(np.isneginf(lse))


def test_block_sparse_full_mask_equals_dense():
    rng = np.random.default_rng(3)
    q, k, v = testing.random_qkv(rng, 1, 2, 2, 100, 180, 32)
    full = BlockMask.full(1, 1, q_len=100, k_len=180, block_q=32, block_k=32)
    od, ld = nfwd.attention_forward(q, k, v, None, True)
    os_, ls = nfwd.attention_forward(q, k, v, full, True)
    np.testing.assert_allclose(os_, od, rtol=0, atol=2e-6)
    np.testing.assert_allclose(ls, ld, rtol=0, atol=2e-6)


def test_mask_broadcast_and_kv_heads():
    rng = np.random.default_rng(4)
    Sq = Sk = 160
    q, k, v = testing.random_qkv(rng, 2, 4, 2, Sq, Sk, 32)
    shared = testing.random_block_mask(rng, 1, 1, Sq, Sk, 32, 32, 0.4, causal=True)
    check_fwd(q, k, v, shared, True)
    per_kv = testing.random_block_mask(rng, 2, 2, Sq, Sk, 32, 32, 0.4, causal=True,
                                       head_kind="kv")
    check_fwd(q, k, v, per_kv, True)


def test_per_token_routing_moba():
    """block_q = 1: every query row has its own selection (MoBA-style top-k + own block)."""
    rng = np.random.default_rng(5)
    Sq = Sk = 256
    bk = 32
    q, k, v = testing.random_qkv(rng, 1, 2, 1, Sq, Sk, 32)
    kb = Sk // bk
    m = np.zeros((1, 2, Sq, kb), bool)
    for h in range(2):
        for i in range(Sq):
            own = i // bk
            m[0, h, i, own] = True
            if own:
                m[0, h, i, rng.choice(own, size=min(2, own), replace=False)] = True
    mask = BlockMask(m, block_q=1, block_k=bk, q_len=Sq, k_len=Sk)
    check_fwd(q, k, v, mask, True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_forward_low_precision_inputs(dtype):
    rng = np.random.default_rng(6)
    q, k, v = testing.structured_qkv(rng, 1, 4, 1, 130, 257, 64, dtype=dtype)
    assert str(q.dtype) == dtype
    check_fwd(q, k, v, None, True, dtype=dtype if dtype != "float64" else "float32")
    m = testing.random_block_mask(rng, 1, 4, 130, 257, 64, 64, 0.5, causal=True)
    check_fwd(q, k, v, m, True, dtype=dtype if dtype != "float64" else "float32")


def test_out_with_other_dtype_is_filled():
    rng = np.random.default_rng(7)
    q, k, v = testing.random_qkv(rng, 1, 2, 1, 40, 40, 16)
    out = (np.full((1, 2, 40, 16), np.nan), np.full((1, 2, 40), np.nan))
    o, lse = nfwd.attention_forward(q, k, v, None, True, out=out)
    assert o is out[0] and np.isfinite(o).all() and np.isfinite(lse).all()
    ro, _ = ref_fwd(q, k, v, None, True)
    assert np.abs(o - ro).max() < 1e-5


# ------------------------------------------------------------------------ backward
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (113, 203), (203, 113), (130, 130)])
@pytest.mark.parametrize("causal", [False, True])
def test_dense_backward(Sq, Sk, causal):
    rng = np.random.default_rng(Sq + 7 * Sk)
    q, k, v = testing.random_qkv(rng, 1, 4, 2, Sq, Sk, 32)
    dq, dk, dv = check_bwd(q, k, v, None, causal)
    if causal and Sq > Sk:      # rows that see nothing get no gradient
        assert np.all(dq[..., : Sq - Sk, :] == 0.0)


@pytest.mark.parametrize("bq,bk", [(32, 32), (7, 5), (1, 32), (128, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_backward(bq, bk, causal):
    rng = np.random.default_rng(bq + 13 * bk + causal)
    Sq, Sk = 150, 203
    q, k, v = testing.random_qkv(rng, 2, 4, 2, Sq, Sk, 32)
    m = testing.random_block_mask(rng, 2, 4, Sq, Sk, bq, bk, 0.35, causal=causal)
    check_bwd(q, k, v, m, causal)


@pytest.mark.parametrize("name", ["empty", "single", "diagonal", "sink_diagonal"])
def test_block_sparse_backward_structured(name):
    rng = np.random.default_rng(8)
    q, k, v = testing.random_qkv(rng, 1, 2, 1, 200, 90, 32)
    m = testing.structured_masks(1, 1, 200, 90, 32, 32)[name]
    dq, dk, dv = check_bwd(q, k, v, m, True)
    if name == "empty":
        assert not dq.any() and not dk.any() and not dv.any()


def test_backward_gqa_broadcast_mask():
    rng = np.random.default_rng(9)
    q, k, v = testing.structured_qkv(rng, 1, 8, 2, 160, 160, 64)
    m = testing.random_block_mask(rng, 1, 1, 160, 160, 32, 32, 0.5, causal=True)
    check_bwd(q, k, v, m, True)


# -------------------------------------------------------------- errors and the API
def test_token_level_mask_is_refused():
    class TokenMask:
        q_len = k_len = 16

        def token_rows(self, b, h0, h1, r0, r1):
            return np.ones((1, r1 - r0, 16), bool)

    q = k = v = np.zeros((1, 1, 16, 8), np.float32)
    with pytest.raises(InputError, match="backend='numpy'"):
        nfwd.attention_forward(q, k, v, TokenMask())
    with pytest.raises(InputError, match="backend='numpy'"):
        nbwd.attention_backward(q, k, v, q, q, np.zeros((1, 1, 16), np.float32), TokenMask())


def test_bad_inputs_raise_input_error():
    q = np.zeros((1, 3, 16, 8), np.float32)
    k = np.zeros((1, 2, 16, 8), np.float32)
    with pytest.raises(InputError, match="GQA"):
        nfwd.attention_forward(q, k, k)
    with pytest.raises(InputError, match="out"):
        nfwd.attention_forward(k, k, k, out=(np.zeros((1, 2, 16, 4), np.float32),
                                             np.zeros((1, 2, 16), np.float32)))
    with pytest.raises(InputError, match="expected a float"):
        nfwd.attention_forward(k.astype(np.int32), k, k)


def test_api_backends_numba_and_auto():
    rng = np.random.default_rng(10)
    q, k, v = testing.random_qkv(rng, 1, 4, 2, 96, 96, 32)
    m = testing.random_block_mask(rng, 1, 4, 96, 96, 32, 32, 0.5, causal=True)
    ref = refattn.attention(q, k, v, mask=m, causal=True, backend="numpy")
    for backend in ("numba", "auto"):
        got = refattn.attention(q, k, v, mask=m, causal=True, backend=backend)
        assert got.dtype == np.float32
        assert np.abs(got - ref).max() < 1e-5
    out, lse = refattn.attention(q, k, v, causal=True, return_lse=True, backend="numba")
    do = rng.standard_normal(out.shape).astype(np.float32)
    got = refattn.attention_backward(q, k, v, out, do, lse, causal=True, backend="numba")
    ref = refattn.attention_backward(q, k, v, out, do, lse, causal=True, backend="numpy")
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == np.float32 and np.abs(g - r).max() < 1e-4


def test_blas_thread_count_is_restored():
    from refattn.kernels._blas import openblas_libraries, single_threaded_blas

    libs = openblas_libraries()
    before = [get() for get, _ in libs]
    with single_threaded_blas():
        assert all(get() == 1 for get, _ in libs)
        with single_threaded_blas():
            assert all(get() == 1 for get, _ in libs)
        assert all(get() == 1 for get, _ in libs)
    assert [get() for get, _ in libs] == before
