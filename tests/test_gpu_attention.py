"""GPU (CuPy) attention kernels against the float64 NumPy reference.

Skipped, with the reason, when CuPy or a CUDA device is missing. Every check follows the
DESIGN tolerance rule: the reference runs in float64 on the *same rounded inputs*; an
emulated low-precision baseline (fp32 with probabilities rounded to the input dtype) sets
the bound ``max|out - ref| <= 2 max|base - ref| + atol``; the relative norm is also bounded
(bf16 1e-2, fp16 2e-3, fp32 1e-5). Outputs are poisoned with NaN before each call.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="CuPy is not installed")
try:
    _NDEV = cp.cuda.runtime.getDeviceCount()
except Exception as e:  # pragma: no cover - no driver
    pytest.skip(f"no CUDA device: {e}", allow_module_level=True)
if _NDEV < 1:  # pragma: no cover
    pytest.skip("no CUDA device", allow_module_level=True)

import ml_dtypes  # noqa: E402

from refattn.core.blockmask import BlockMask, num_blocks  # noqa: E402
from refattn.core.errors import InputError  # noqa: E402
from refattn.core.registry import dispatch, load_backend  # noqa: E402
from refattn.reference.attention import attention_backward, attention_forward  # noqa: E402

_why = load_backend("cupy")
if _why is not None:  # pragma: no cover
    pytest.skip(f"cupy backend unavailable: {_why}", allow_module_level=True)

fwd = dispatch("attention_fwd", "cupy")
bwd = dispatch("attention_bwd", "cupy")

DT = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "fp32": np.float32}
EPS = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11, "fp32": 2.0 ** -23}
RELNORM = {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-5}
LSE_ATOL = {"bf16": 2e-3, "fp16": 2e-3, "fp32": 1e-5}
GRAD_RELNORM = {"bf16": 3e-2, "fp16": 5e-3, "fp32": 1e-4}


# ------------------------------------------------------------------------------ helpers
def qkv(rng, B, Hq, Hkv, Sq, Sk, D, dt, Dv=None):
    Dv = D if Dv is None else Dv
    q = rng.standard_normal((B, Hq, Sq, D)).astype(np.float32).astype(DT[dt])
    k = rng.standard_normal((B, Hkv, Sk, D)).astype(np.float32).astype(DT[dt])
    v = rng.standard_normal((B, Hkv, Sk, Dv)).astype(np.float32).astype(DT[dt])
    return q, k, v


def token_visible(mask, causal, B, Hq, Sq, Sk):
    vis = np.ones((B, Hq, Sq, Sk), bool)
    if mask is not None:
        vis &= np.broadcast_to(mask.expand_heads(Hq).to_token_mask(False), vis.shape)
    if causal:
        vis &= np.arange(Sk)[None, :] <= np.arange(Sq)[:, None] + (Sk - Sq)
    return vis


def baseline(q, k, v, mask, causal, scale, dt):
    """fp32 attention with probabilities rounded to the input dtype (the emulated
    low-precision baseline of the tolerance rule)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    k32 = np.repeat(k.astype(np.float32), G, axis=1)
    v32 = np.repeat(v.astype(np.float32), G, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float32), k32) * np.float32(scale)
    vis = token_visible(mask, causal, B, Hq, Sq, Sk)
    s = np.where(vis, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    l = p.sum(-1, keepdims=True)
    p = p.astype(DT[dt]).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(l > 0, np.einsum("bhqk,bhkd->bhqd", p, v32) / np.where(l > 0, l, 1), 0)


def check_fwd(q, k, v, mask, causal, dt, *, device=False, poison=True):
    scale = 1.0 / math.sqrt(q.shape[-1])
    ref_o, ref_l = attention_forward(q, k, v, mask, causal, scale)
    B, Hq, Sq = q.shape[:3]
    Dv = v.shape[-1]
    if device:
        args = [cp.asarray(x) for x in (q, k, v)]
        out = (cp.full((B, Hq, Sq, Dv), cp.nan, cp.float32), cp.full((B, Hq, Sq), cp.nan, cp.float32))
    else:
        args = [q, k, v]
        out = (np.full((B, Hq, Sq, Dv), np.nan, np.float32), np.full((B, Hq, Sq), np.nan, np.float32))
    res = fwd(*args, mask, causal, scale, out=out if poison else None)
    o, l = res
    if poison:
        assert o is out[0] and l is out[1]
    if device:
        assert isinstance(o, cp.ndarray)
        o, l = o.get(), l.get()
    else:
        assert isinstance(o, np.ndarray)
    assert o.dtype == np.float32 and l.dtype == np.float32
    assert not np.isnan(o).any(), "NaN in out (unwritten or 0/0)"
    assert not np.isnan(l).any(), "NaN in lse"
    # empty rows: exactly 0 and -inf
    empty = ~np.isfinite(ref_l)
    assert np.array_equal(~np.isfinite(l), empty), "rows with no visible key differ"
    assert (l[empty] == -np.inf).all() and (o[empty] == 0).all()
    base = baseline(q, k, v, mask, causal, scale, dt)
    err = np.abs(o - ref_o).max(initial=0.0)
    bound = 2 * np.abs(base - ref_o).max(initial=0.0) + EPS[dt] * max(1.0, np.abs(ref_o).max(initial=0.0))
    rel = np.linalg.norm(o - ref_o) / max(np.linalg.norm(ref_o), 1e-30)
    assert err <= bound, f"max|out-ref| = {err:.3g} > bound {bound:.3g} (rel norm {rel:.3g})"
    assert rel <= RELNORM[dt], f"relative norm {rel:.3g} > {RELNORM[dt]}"
    fin = ~empty
    lerr = np.abs(l[fin] - ref_l[fin]).max(initial=0.0)
    assert lerr <= LSE_ATOL[dt], f"max|lse-ref| = {lerr:.3g}"
    return o, l


def check_bwd(q, k, v, mask, causal, dt, rng, *, device=False):
    scale = 1.0 / math.sqrt(q.shape[-1])
    o, lse = attention_forward(q, k, v, mask, causal, scale)
    do = rng.standard_normal(o.shape).astype(np.float32).astype(DT[dt])
    ref = attention_backward(q, k, v, o, do, lse, mask, causal, scale)
    o32, lse32 = o.astype(np.float32), lse.astype(np.float32)
    shapes = (q.shape, k.shape, v.shape)
    if device:
        args = [cp.asarray(x) for x in (q, k, v, o32, do, lse32)]
        out = tuple(cp.full(s, cp.nan, cp.float32) for s in shapes)
    else:
        args = [q, k, v, o32, do, lse32]
        out = tuple(np.full(s, np.nan, np.float32) for s in shapes)
    got = bwd(*args, mask, causal, scale, out=out)
    for name, g, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
        g = g.get() if device else g
        assert not np.isnan(g).any(), f"NaN in {name}"
        rel = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
        if np.linalg.norm(r) == 0:
            assert np.abs(g).max(initial=0.0) == 0, f"{name} should be 0"
            continue
        assert rel <= GRAD_RELNORM[dt], f"{name}: relative norm {rel:.3g} > {GRAD_RELNORM[dt]}"


def random_mask(rng, B, H, Sq, Sk, bq, bk, density, *, empty_rows=True):
    qb, kb = num_blocks(Sq, bq), num_blocks(Sk, bk)
    m = rng.random((B, H, qb, kb)) < density
    if empty_rows and qb > 1:
        m[:, :, rng.integers(qb)] = False
    return BlockMask(m, block_q=bq, block_k=bk, q_len=Sq, k_len=Sk)


def moba_mask(rng, B, H, Sq, Sk, bk, topk, causal):
    """Per-token routing (block_q = 1): each row takes its own key block plus topk - 1
    random earlier (visible) ones."""
    kb = num_blocks(Sk, bk)
    off = Sk - Sq
    m = np.zeros((B, H, Sq, kb), bool)
    for i in range(Sq):
        last = (i + off) // bk if causal else kb - 1
        if last < 0:
            continue
        own = min(last, kb - 1)
        m[:, :, i, own] = True
        cand = rng.random((B, H, own + 1)) if own > 0 else None
        if cand is not None:
            cand[:, :, own] = -1
            top = np.argsort(-cand, axis=-1)[..., : topk - 1]
            np.put_along_axis(m[:, :, i, : own + 1], top, True, axis=-1)
    return BlockMask(m, block_q=1, block_k=bk, q_len=Sq, k_len=Sk)


# ------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("dt", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_dense(dt, D, causal):
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 2, 4, 2, 203, 333, D, dt)  # GQA, Sq != Sk, partial tiles
    check_fwd(q, k, v, None, causal, dt, device=(dt != "fp16"))


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_causal_more_queries_than_keys(dt):
    """Sq > Sk, bottom-right causal: the first Sq - Sk rows see no key (0, -inf)."""
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 1, 2, 1, 300, 130, 64, dt)
    _, l = check_fwd(q, k, v, None, True, dt)
    assert (l[:, :, :170] == -np.inf).all()


@pytest.mark.parametrize("dt", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("bq,bk", [(64, 64), (128, 128), (64, 128), (128, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_random(dt, bq, bk, causal):
    rng = np.random.default_rng(bq + bk + causal)
    Sq, Sk = 700, 900
    q, k, v = qkv(rng, 2, 4, 2, Sq, Sk, 128 if bq == bk else 64, dt)
    mask = random_mask(rng, 2, 4, Sq, Sk, bq, bk, 0.3)
    check_fwd(q, k, v, mask, causal, dt, device=True)


@pytest.mark.parametrize("kind", ["empty", "full", "single", "diagonal", "kv_heads", "broadcast"])
@pytest.mark.parametrize("causal", [False, True])
def test_block_structured(kind, causal):
    rng = np.random.default_rng(3)
    B, Hq, Hkv, Sq, Sk, bq, bk = 2, 4, 2, 512, 640, 128, 64
    q, k, v = qkv(rng, B, Hq, Hkv, Sq, Sk, 128, "bf16")
    qb, kb = num_blocks(Sq, bq), num_blocks(Sk, bk)
    head_kind, H = "q", Hq
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
        head_kind, H = "kv", Hkv
    else:  # one mask for every batch and head
        m = rng.random((1, 1, qb, kb)) < 0.4
    mask = BlockMask(m, block_q=bq, block_k=bk, q_len=Sq, k_len=Sk, head_kind=head_kind)
    assert H
    check_fwd(q, k, v, mask, causal, "bf16", device=True)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("bk", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_per_token_routing(dt, bk, causal):
    """block_q = 1 (MoBA): the gather kernels."""
    rng = np.random.default_rng(bk + causal)
    Sq, Sk = 300, 1000
    q, k, v = qkv(rng, 1, 4, 2, Sq, Sk, 128 if bk == 128 else 64, dt)
    mask = moba_mask(rng, 1, 4, Sq, Sk, bk, 3, causal)
    check_fwd(q, k, v, mask, causal, dt, device=True)


@pytest.mark.parametrize("dt", ["fp16", "fp32"])
def test_fallback_geometry(dt):
    """Block sizes that are not multiples of 64, D not in {64, 128}, D != Dv: row kernel."""
    rng = np.random.default_rng(5)
    Sq, Sk = 150, 170
    q, k, v = qkv(rng, 1, 2, 1, Sq, Sk, 96, dt, Dv=40)
    mask = random_mask(rng, 1, 2, Sq, Sk, 32, 16, 0.5)
    check_fwd(q, k, v, mask, True, dt)
    check_fwd(q, k, v, mask, False, dt, device=True)


def test_api_layout_and_registry():
    """refattn.attention(..., backend='cupy') with a bshd layout (strided views)."""
    import refattn.api as api

    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, 1, 4, 4, 256, 256, 64, "bf16")
    ref = attention_forward(q, k, v, None, True, None)[0]
    qs, ks, vs = (cp.asarray(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (q, k, v))
    out = api.attention(qs, ks, vs, causal=True, layout="bshd", backend="cupy")
    assert isinstance(out, cp.ndarray)
    got = cp.asnumpy(out).transpose(0, 2, 1, 3)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-2


def test_errors():
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, 1, 2, 1, 64, 64, 64, "bf16")
    with pytest.raises(InputError, match="one dtype"):
        fwd(q, k.astype(np.float32), v, None, False, None)
    with pytest.raises(InputError, match="GQA"):
        fwd(q, np.repeat(k, 3, axis=1)[:, :3], np.repeat(v, 3, axis=1)[:, :3], None, False, None)
    with pytest.raises(InputError, match="BlockMask"):
        fwd(q, k, v, object(), False, None)
    bad = BlockMask(np.ones((1, 2), bool), block_q=64, block_k=64, q_len=64, k_len=128)
    with pytest.raises(InputError):
        fwd(q, k, v, bad, False, None)


def test_register_spills_small():
    """The default forward tiles run at the 255-register limit; guard against heavy spills
    (NVRTC has been seen to spill 16 B where nvcc spills none)."""
    from refattn.gpu import attention as ga
    from refattn.gpu._build import get_kernel

    for D, (BM, BN) in ga.FWD_TILES.items():
        fn = get_kernel("attn_fwd.cu", f"attn_fwd_block<__nv_bfloat16, {D}, {BM}, {BN}>")
        assert fn.local_size_bytes <= 64, f"fwd D={D} tile {BM}x{BN} spills {fn.local_size_bytes} B"


# ------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("dt", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_dense(dt, D, causal):
    rng = np.random.default_rng(10 + D)
    q, k, v = qkv(rng, 1, 4, 2, 203, 250, D, dt)
    check_bwd(q, k, v, None, causal, dt, rng, device=(dt == "bf16"))


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("bq,bk", [(64, 64), (128, 128), (128, 64), (64, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_block(dt, bq, bk, causal):
    rng = np.random.default_rng(20 + bq + bk)
    Sq, Sk = 500, 600
    q, k, v = qkv(rng, 2, 4, 2, Sq, Sk, 128, dt)
    mask = random_mask(rng, 2, 4, Sq, Sk, bq, bk, 0.35)
    check_bwd(q, k, v, mask, causal, dt, rng, device=True)


@pytest.mark.parametrize("bk", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_per_token_routing(bk, causal):
    rng = np.random.default_rng(30 + bk)
    Sq, Sk = 260, 700
    q, k, v = qkv(rng, 1, 4, 2, Sq, Sk, 64, "bf16")
    mask = moba_mask(rng, 1, 4, Sq, Sk, bk, 3, causal)
    check_bwd(q, k, v, mask, causal, "bf16", rng, device=True)


def test_backward_fallback():
    rng = np.random.default_rng(40)
    q, k, v = qkv(rng, 1, 4, 2, 130, 150, 48, "fp32")
    mask = random_mask(rng, 1, 4, 130, 150, 16, 32, 0.5)
    check_bwd(q, k, v, mask, True, "fp32", rng)
