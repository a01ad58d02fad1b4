"""GPU end to end: ``refattn.select(..., backend="cupy")`` then ``refattn.attention(...,
backend="cupy")`` with everything on the device (issue "CUDA scoring and selection").

* Device :class:`BlockMask` (a CuPy mask): its index form, transpose, head expansion,
  algebra and density equal the host mask's.
* Every method registered with ``device=True`` returns, for CuPy inputs, a selection whose
  mask, scores and boundary are CuPy arrays and whose mask equals the NumPy selection
  (tie-aware); the GPU attention consumes it directly.

Skips without CuPy or a CUDA device.
"""
from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.check import compare_arrays, compare_masks
from refattn.core import registry
from refattn.core.blockmask import BlockMask, legal_blocks
from refattn.data.synthetic import synthetic
from refattn.methods import list_methods

_WHY = registry.load_backend("cupy")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_WHY is not None, reason=f"cupy backend unavailable: {_WHY}")]

if _WHY is None:
    import cupy as cp


def _device_methods() -> list[str]:
    return sorted(n for n, m in list_methods("llm-prefill").items() if m.device)


def _random_mask(rng, B, H, Qb, Kb, p=0.3):
    return rng.random((B, H, Qb, Kb)) < p


# ------------------------------------------------------------------ device BlockMask
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (1, 4, 16, 16), (1, 2, 300, 9)])
def test_device_blockmask_matches_host(shape):
    rng = np.random.default_rng(sum(shape))
    B, H, Qb, Kb = shape
    host = BlockMask(_random_mask(rng, *shape), block_q=64, block_k=64, q_len=Qb * 64 - 3,
                     k_len=Kb * 64 - 5)
    dev = host.to_device()
    assert dev.on_device and not host.on_device
    assert isinstance(dev.mask, cp.ndarray)
    for a, b in zip(dev.to_indices(), host.to_indices(), strict=True):
        assert isinstance(a, cp.ndarray) and np.array_equal(a.get(), b)
    for a, b in zip(dev.transpose(), host.transpose(), strict=True):
        assert np.array_equal(a.get(), b)
    assert dev == host and dev.to_host() == host
    for causal in (False, True):
        assert dev.density(causal) == pytest.approx(host.density(causal), abs=0)
        assert np.array_equal(dev.density(causal, per_head=True).get(),
                              host.density(causal, per_head=True))
    other = BlockMask(_random_mask(rng, *shape), block_q=64, block_k=64, q_len=host.q_len,
                      k_len=host.k_len)
    assert (dev | other).on_device and (dev | other) == (host | other)
    assert (dev & other) == (host & other)
    assert dev.with_causal() == host.with_causal()
    assert np.array_equal(dev.to_token_mask(True), host.to_token_mask(True))
    dev.check()


def test_device_kv_mask_expands_on_device():
    rng = np.random.default_rng(1)
    host = BlockMask(_random_mask(rng, 1, 2, 4, 4), block_q=64, block_k=64, q_len=256,
                     k_len=256, head_kind="kv")
    dev = host.to_device().expand_heads(6)
    assert dev.on_device and dev == host.expand_heads(6)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_device_mask_equals_host_mask(causal):
    rng = np.random.default_rng(2)
    q, k, v = synthetic(1, 4, 2, 1000, 128, seed=3)
    q, k, v = (cp.asarray(x.astype(np.float16)) for x in (q, k, v))
    Qb = Kb = -(-1000 // 128)
    m = _random_mask(rng, 1, 4, Qb, Kb) | np.eye(Qb, Kb, dtype=bool)
    if causal:
        m &= legal_blocks(1000, 1000, 128, 128, True)
    host = BlockMask(m, block_q=128, block_k=128, q_len=1000, k_len=1000)
    o_h = refattn.attention(q, k, v, mask=host, causal=causal, backend="cupy")
    o_d = refattn.attention(q, k, v, mask=host.to_device(), causal=causal, backend="cupy")
    assert isinstance(o_d, cp.ndarray)
    assert np.array_equal(o_h.get(), o_d.get())
    # "auto" follows the device mask to the GPU
    o_a = refattn.attention(q, k, v, mask=host.to_device(), causal=causal, backend="auto")
    assert isinstance(o_a, cp.ndarray)


# ----------------------------------------------------------------- methods end to end
def _qkv(S=2048, Hq=4, Hkv=2, D=128, seed=0):
    q, k, v = synthetic(1, Hq, Hkv, S, D, seed=seed)
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


def test_some_methods_are_device_capable():
    assert _device_methods(), "no LLM method is registered with device=True"


@pytest.mark.parametrize("method", _device_methods() if _WHY is None else [])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_select_then_attention_stays_on_device(method, dtype):
    q, k, v = _qkv()
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    ref = refattn.select(q, k, method, v=v, backend="numpy")
    qd, kd, vd = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    sel = refattn.select(qd, kd, method, v=vd, backend="cupy")
    assert sel.on_device, f"{method}: the mask came back on the host"
    if sel.scores is not None:
        assert isinstance(sel.scores.scores, cp.ndarray), f"{method}: host scores"
    if sel.boundary is not None:
        assert isinstance(sel.boundary, cp.ndarray), f"{method}: host boundary"
    rep = compare_masks(ref, sel.to_host().mask, tol=1e-2 if dtype == "float16" else 1e-4)
    frac = rep.stats["mismatches"] / max(1, rep.stats["blocks"])
    assert frac <= (0.01 if dtype == "float16" else 0.0), rep.summary()
    out = refattn.attention(qd, kd, vd, mask=sel, causal=True, backend="cupy")
    assert isinstance(out, cp.ndarray)
    # the same selection moved to the host gives the same attention
    out_h = refattn.attention(qd, kd, vd, mask=sel.to_host(), causal=True, backend="cupy")
    assert np.array_equal(out.get(), out_h.get())
    if dtype == "float32":
        want = refattn.attention(q, k, v, mask=ref, causal=True, backend="numpy")
        if rep.stats["mismatches"] == 0:
            r = compare_arrays(want, out.get(), "float32", name="out")
            assert r.ok, r.summary()
