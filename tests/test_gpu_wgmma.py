"""The Hopper wgmma forward (``gpu/attn_fwd_wgmma.cu``), backward (``gpu/attn_bwd_wgmma.cu``)
and per-token-routing gather forward (``gpu/attn_gather_wgmma.cu``), sm_90a, against the
float64 reference.

Runs the forward cases of ``test_gpu_attention.py`` that the wgmma path takes (16-bit
inputs, D = Dv in {64, 128}, dense or block_q % 128 == 0 and block_k % 64 == 0) with
``REFATTN_WGMMA=1``, under the same tolerance rule (its ``check_fwd``), and asserts that the
wgmma kernel really ran; then the backward cases the wgmma backward takes (D = 128, dense or
block_q % 64 == 0 and block_k % 128 == 0) with ``REFATTN_WGMMA_BWD=1`` under ``check_bwd``.
Skipped unless CuPy and a compute-capability 9.0 device are present.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="CuPy is not installed")
try:
    _CC = int(cp.cuda.Device().compute_capability) if cp.cuda.runtime.getDeviceCount() else 0
except Exception as e:  # pragma: no cover - no driver
    pytest.skip(f"no CUDA device: {e}", allow_module_level=True)
if _CC != 90:  # pragma: no cover
    pytest.skip(f"the wgmma forward needs an sm_90 device (found cc {_CC})", allow_module_level=True)

import test_gpu_attention as tga  # noqa: E402  (tests/ is on sys.path, conftest.py)
from refattn.gpu import attention as ga  # noqa: E402

from refattn.core.blockmask import BlockMask, num_blocks  # noqa: E402


@pytest.fixture
def wgmma(monkeypatch):
    """REFATTN_WGMMA=1 and a counter of wgmma launches; fails if the path was not taken."""
    monkeypatch.setenv("REFATTN_WGMMA", "1")
    calls = {"n": 0}
    real = ga._fwd_wgmma

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ga, "_fwd_wgmma", counting)
    yield calls
    assert not ga._WGMMA_BROKEN, f"wgmma path failed: {ga._WGMMA_BROKEN}"
    assert calls["n"] > 0, "the wgmma kernel did not run"


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_dense(wgmma, dt, D, causal):
    rng = np.random.default_rng(1)
    q, k, v = tga.qkv(rng, 2, 4, 2, 203, 333, D, dt)  # GQA, Sq != Sk, partial tiles
    tga.check_fwd(q, k, v, None, causal, dt, device=True)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_causal_more_queries_than_keys(wgmma, dt):
    rng = np.random.default_rng(2)
    q, k, v = tga.qkv(rng, 1, 2, 1, 300, 130, 64, dt)
    _, l = tga.check_fwd(q, k, v, None, True, dt)
    assert (l[:, :, :170] == -np.inf).all()


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("bq,bk", [(128, 128), (128, 64), (256, 128), (256, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_random(wgmma, dt, bq, bk, causal):
    rng = np.random.default_rng(bq + bk + causal)
    Sq, Sk = 700, 900
    q, k, v = tga.qkv(rng, 2, 4, 2, Sq, Sk, 128 if bk >= 128 else 64, dt)
    mask = tga.random_mask(rng, 2, 4, Sq, Sk, bq, bk, 0.3)
    tga.check_fwd(q, k, v, mask, causal, dt, device=True)


@pytest.mark.parametrize("kind", ["empty", "full", "single", "diagonal", "kv_heads", "broadcast"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_structured(wgmma, kind, causal):
    rng = np.random.default_rng(3)
    B, Hq, Hkv, Sq, Sk, bq, bk = 2, 4, 2, 512, 640, 128, 64
    q, k, v = tga.qkv(rng, B, Hq, Hkv, Sq, Sk, 128, "bf16")
    qb, kb = num_blocks(Sq, bq), num_blocks(Sk, bk)
    head_kind = "q"
    if kind == "empty":
        m = np.zeros((B, Hq, qb, kb), bool)
    elif kind == "full":
        m = np.ones((B, Hq, qb, kb), bool)
    elif kind == "single":
        m = np.zeros((B, Hq, qb, kb), bool)
        m[:, :, :, kb - 1] = True
    elif kind == "diagonal":
        m = np.zeros((B, Hq, qb, kb), bool)
        for i in range(qb):
            m[:, :, i, min(kb - 1, (i * bq + Sk - Sq) // bk)] = True
    elif kind == "kv_heads":
        m = rng.random((B, Hkv, qb, kb)) < 0.4
        head_kind = "kv"
    else:
        m = rng.random((1, 1, qb, kb)) < 0.4
    mask = BlockMask(m, block_q=bq, block_k=bk, q_len=Sq, k_len=Sk, head_kind=head_kind)
    tga.check_fwd(q, k, v, mask, causal, "bf16", device=True)


@pytest.mark.parametrize("stages,ovl", [(2, False), (2, True), (3, False), (3, True)])
def test_variants(wgmma, monkeypatch, stages, ovl):
    """Every pipeline variant on a causal block mask with partial blocks and GQA."""
    monkeypatch.setitem(ga.WGMMA_CONFIG, "stages", stages)
    monkeypatch.setitem(ga.WGMMA_CONFIG, "ovl", ovl)
    rng = np.random.default_rng(50 + stages + ovl)
    q, k, v = tga.qkv(rng, 1, 4, 1, 1000, 1100, 128, "bf16")
    mask = tga.random_mask(rng, 1, 4, 1000, 1100, 128, 128, 0.5)
    tga.check_fwd(q, k, v, mask, True, "bf16", device=True)


def test_strided_bshd_views(wgmma):
    """bshd views (strided heads) go through the tensor maps in place."""
    import refattn.api as api
    from refattn.reference.attention import attention_forward

    rng = np.random.default_rng(6)
    q, k, v = tga.qkv(rng, 1, 4, 2, 256, 384, 128, "bf16")
    ref = attention_forward(q, k, v, None, True, None)[0]
    qs, ks, vs = (cp.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (q, k, v))
    out = api.attention(qs, ks, vs, causal=True, layout="bshd", backend="cupy")
    got = cp.asnumpy(out).transpose(0, 2, 1, 3)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2


def test_no_spills():
    for D, BN in ((128, 128), (128, 64), (64, 128)):
        fn, name = ga.wgmma_kernel("__nv_bfloat16", D, BN)
        assert fn.local_size_bytes == 0, f"{name} spills {fn.local_size_bytes} B"


# ------------------------------------------------------------------------------ backward
@pytest.fixture
def wgmma_bwd(monkeypatch):
    """REFATTN_WGMMA_BWD=1 and a counter of wgmma backward launches; fails if the path was
    not taken."""
    monkeypatch.setenv("REFATTN_WGMMA_BWD", "1")
    calls = {"n": 0}
    real = ga._bwd_wgmma

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ga, "_bwd_wgmma", counting)
    yield calls
    assert not ga._WGMMA_BWD_BROKEN, f"wgmma backward failed: {ga._WGMMA_BWD_BROKEN}"
    assert calls["n"] > 0, "the wgmma backward kernel did not run"


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_dense(wgmma_bwd, dt, causal):
    rng = np.random.default_rng(11)
    q, k, v = tga.qkv(rng, 2, 4, 2, 203, 333, 128, dt)  # GQA, Sq != Sk, partial tiles
    tga.check_bwd(q, k, v, None, causal, dt, rng, device=True)


@pytest.mark.parametrize("Sq,Sk", [(300, 130), (130, 300)])
def test_backward_causal_unequal_lengths(wgmma_bwd, Sq, Sk):
    rng = np.random.default_rng(12)
    q, k, v = tga.qkv(rng, 1, 2, 1, Sq, Sk, 128, "bf16")
    tga.check_bwd(q, k, v, None, True, "bf16", rng, device=True)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("bq,bk", [(64, 128), (128, 128), (128, 256), (256, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_block_random(wgmma_bwd, dt, bq, bk, causal):
    rng = np.random.default_rng(20 + bq + bk + causal)
    Sq, Sk = 500, 600
    q, k, v = tga.qkv(rng, 2, 4, 2, Sq, Sk, 128, dt)
    mask = tga.random_mask(rng, 2, 4, Sq, Sk, bq, bk, 0.35)
    tga.check_bwd(q, k, v, mask, causal, dt, rng, device=True)


@pytest.mark.parametrize("kind", ["empty", "full", "diagonal", "kv_heads", "broadcast"])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_block_structured(wgmma_bwd, kind, causal):
    rng = np.random.default_rng(13)
    B, Hq, Hkv, Sq, Sk, bq, bk = 2, 4, 2, 512, 640, 128, 128
    q, k, v = tga.qkv(rng, B, Hq, Hkv, Sq, Sk, 128, "bf16")
    qb, kb = num_blocks(Sq, bq), num_blocks(Sk, bk)
    head_kind = "q"
    if kind == "empty":
        m = np.zeros((B, Hq, qb, kb), bool)
    elif kind == "full":
        m = np.ones((B, Hq, qb, kb), bool)
    elif kind == "diagonal":
        m = np.zeros((B, Hq, qb, kb), bool)
        for i in range(qb):
            m[:, :, i, min(kb - 1, (i * bq + Sk - Sq) // bk)] = True
    elif kind == "kv_heads":
        m = rng.random((B, Hkv, qb, kb)) < 0.4
        head_kind = "kv"
    else:
        m = rng.random((1, 1, qb, kb)) < 0.4
    mask = BlockMask(m, block_q=bq, block_k=bk, q_len=Sq, k_len=Sk, head_kind=head_kind)
    tga.check_bwd(q, k, v, mask, causal, "bf16", rng, device=True)


@pytest.mark.parametrize("stages", [2, 3])
def test_backward_stages(wgmma_bwd, monkeypatch, stages):
    """Both ring depths on a causal block mask with partial blocks and 4:1 GQA."""
    monkeypatch.setitem(ga.WGMMA_BWD_CONFIG, "stages", stages)
    rng = np.random.default_rng(60 + stages)
    q, k, v = tga.qkv(rng, 1, 4, 1, 1000, 1100, 128, "bf16")
    mask = tga.random_mask(rng, 1, 4, 1000, 1100, 128, 128, 0.5)
    tga.check_bwd(q, k, v, mask, True, "bf16", rng, device=True)


def test_backward_matches_mma_sync(monkeypatch):
    """The wgmma and mma.sync backwards agree closely on the same inputs (same Delta, same
    rounding of dO), on device arrays."""
    from refattn.core.registry import dispatch

    bwd = dispatch("attention_bwd", "cupy")
    fwd = dispatch("attention_fwd", "cupy")
    rng = np.random.default_rng(70)
    q, k, v = (cp.asarray(x) for x in tga.qkv(rng, 1, 4, 2, 640, 640, 128, "bf16"))
    mask = tga.random_mask(rng, 1, 4, 640, 640, 128, 128, 0.6)
    o, lse = fwd(q, k, v, mask, True, None)
    do = q.copy()
    monkeypatch.setenv("REFATTN_WGMMA_BWD", "0")
    ref = bwd(q, k, v, o, do, lse, mask, True, None)
    monkeypatch.setenv("REFATTN_WGMMA_BWD", "1")
    got = bwd(q, k, v, o, do, lse, mask, True, None)
    assert not ga._WGMMA_BWD_BROKEN, ga._WGMMA_BWD_BROKEN
    for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        g, r = g.get(), r.get()
        rel = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
        assert rel < 1e-2, f"{name}: wgmma vs mma.sync relative norm {rel:.3g}"


def test_backward_no_spills():
    for st in (2, 3):
        fn, name = ga.wgmma_bwd_kernel("__nv_bfloat16", 128, st)
        assert fn.local_size_bytes == 0, f"{name} spills {fn.local_size_bytes} B"


# ------------------------------------------------------------------------------ per-token routing
@pytest.fixture
def moba_wgmma(monkeypatch):
    """REFATTN_MOBA_WGMMA=1 and a counter of wgmma gather launches; fails if the path was
    not taken."""
    monkeypatch.setenv("REFATTN_MOBA_WGMMA", "1")
    calls = {"n": 0}
    real = ga._fwd_gather_wgmma

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(ga, "_fwd_gather_wgmma", counting)
    yield calls
    assert not ga._MOBA_WGMMA_BROKEN, f"wgmma gather failed: {ga._MOBA_WGMMA_BROKEN}"
    assert calls["n"] > 0, "the wgmma gather kernel did not run"


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("D,bk", [(128, 128), (128, 64), (64, 128), (64, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_moba_wgmma(moba_wgmma, dt, D, bk, causal):
    rng = np.random.default_rng(80 + D + bk + causal)
    Sq, Sk = 700, 900
    q, k, v = tga.qkv(rng, 2, 4, 2, Sq, Sk, D, dt)  # GQA, Sq != Sk, partial blocks
    mask = tga.moba_mask(rng, 2, 4, Sq, Sk, bk, 3, causal)
    tga.check_fwd(q, k, v, mask, causal, dt, device=True)


@pytest.mark.parametrize("rows,stages,partial", [(128, 2, "t"), (512, 3, "t"), (256, 2, "f32")])
def test_moba_wgmma_variants(moba_wgmma, monkeypatch, rows, stages, partial):
    """Segments longer than one CTA's rows (several chunks and tiles per segment), every ring
    depth and partial type."""
    monkeypatch.setitem(ga.MOBA_WGMMA_CONFIG, "rows", rows)
    monkeypatch.setitem(ga.MOBA_WGMMA_CONFIG, "stages", stages)
    monkeypatch.setitem(ga.MOBA_WGMMA_CONFIG, "partial", partial)
    rng = np.random.default_rng(90 + rows + stages)
    q, k, v = tga.qkv(rng, 1, 2, 1, 1500, 1500, 128, "bf16")
    mask = tga.moba_mask(rng, 1, 2, 1500, 1500, 128, 8, True)
    tga.check_fwd(q, k, v, mask, True, "bf16", device=True)


def test_moba_wgmma_empty_rows(moba_wgmma):
    """Sq > Sk, causal: the first rows choose no block (0, -inf)."""
    rng = np.random.default_rng(95)
    q, k, v = tga.qkv(rng, 1, 2, 1, 300, 130, 128, "bf16")
    mask = tga.moba_mask(rng, 1, 2, 300, 130, 64, 2, True)
    _, l = tga.check_fwd(q, k, v, mask, True, "bf16", device=True)
    assert (l[:, :, :170] == -np.inf).all()


def test_moba_wgmma_matches_mma_sync(monkeypatch):
    """The wgmma and mma.sync gathers agree on the same device inputs."""
    from refattn.core.registry import dispatch

    fwd = dispatch("attention_fwd", "cupy")
    rng = np.random.default_rng(97)
    q, k, v = (cp.asarray(x) for x in tga.qkv(rng, 1, 4, 2, 1024, 1024, 128, "bf16"))
    mask = tga.moba_mask(rng, 1, 4, 1024, 1024, 128, 4, True)
    monkeypatch.setenv("REFATTN_MOBA_WGMMA", "0")
    ref_o, ref_l = (x.get() for x in fwd(q, k, v, mask, True, None))
    monkeypatch.setenv("REFATTN_MOBA_WGMMA", "1")
    o, l = (x.get() for x in fwd(q, k, v, mask, True, None))
    assert not ga._MOBA_WGMMA_BROKEN, ga._MOBA_WGMMA_BROKEN
    assert np.abs(o - ref_o).max() < 1e-2
    assert np.abs(l - ref_l).max() < 2e-3


def test_moba_wgmma_no_spills():
    for T, PT, D, BN in (("__nv_bfloat16", "__nv_bfloat16", 128, 128),
                         ("__half", "float", 64, 64)):
        fn, name = ga.moba_wgmma_kernel(T, PT, D, BN, 2)
        assert fn.local_size_bytes == 0, f"{name} spills {fn.local_size_bytes} B"
