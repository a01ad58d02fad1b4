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
from refattn.testing import op_error_floor

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


# per-method parameters of the end-to-end test where the defaults give a trivial selection
# (BSFA's self-calibration with topk=64 keeps every causal tile at S = 2048: at most 30
# off-diagonal tiles per row)
PARAMS: dict[str, dict] = {"bsfa": dict(topk=8)}


def test_some_methods_are_device_capable():
    assert _device_methods(), "no LLM method is registered with device=True"


@pytest.mark.parametrize("method", _device_methods() if _WHY is None else [])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_select_then_attention_stays_on_device(method, dtype):
    q, k, v = _qkv()
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    params = PARAMS.get(method, {})
    ref = refattn.select(q, k, method, v=v, backend="numpy", **params)
    qd, kd, vd = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    sel = refattn.select(qd, kd, method, v=vd, backend="cupy", **params)
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
    if dtype == "float32" and rep.stats["mismatches"] == 0:
        # the registry's rule for float32 attention kernels: the float64 reference, with the
        # sqrt(K) * eps32 floor for a float32 sum of K terms in the kernel's own order
        want = refattn.attention(q, k, v, mask=ref, causal=True, backend="numpy")
        floor = op_error_floor("attention_fwd", (q, k), "float32", want)
        r = compare_arrays(want, out.get(), "float32", atol=floor, name="out")
        assert r.ok, r.summary()


# ------------------------------------ XAttention and Prism: extras on the device; PBS host-only
# non-default parameters: several query chunks (XAttention's later-chunk rule as well as the
# first-chunk one) and per-head thresholds; Prism below its near-dense default thresholds
DEVICE_EXTRAS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "xattention": (dict(threshold=(0.8, 0.9, 0.85, 0.95), chunk_size=512),
                   ("W_padded", "mask_padded", "mask_chunks")),
    "prism": (dict(high_threshold=0.8, low_threshold=0.85),
              ("logits_high", "logits_low", "probs_high", "probs_low", "scale_high",
               "scale_low", "mask_high", "mask_low", "boundary_high", "boundary_low")),
}


@pytest.mark.parametrize("method", sorted(DEVICE_EXTRAS) if _WHY is None else [])
def test_selection_and_its_extras_stay_on_device(method):
    params, names = DEVICE_EXTRAS[method]
    q, k, v = _qkv(seed=1)
    ref = refattn.select(q, k, method, backend="numpy", **params)
    qd, kd, vd = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    sel = refattn.select(qd, kd, method, backend="cupy", **params)
    assert sel.on_device and isinstance(sel.forced, cp.ndarray)
    for name in names:
        assert isinstance(sel.extras[name], cp.ndarray), f"{method}: extras[{name!r}] on the host"
    host = sel.to_host()
    # float32 inputs: both scoring kernels compute in float64
    raw = "W_padded" if method == "xattention" else "probs_high"
    np.testing.assert_allclose(host.extras[raw], ref.extras[raw], rtol=1e-9, atol=1e-12)
    rep = compare_masks(ref, host.mask, tol=1e-6)
    assert rep.ok, rep.summary()
    out = refattn.attention(qd, kd, vd, mask=sel, causal=True, backend="cupy")
    assert isinstance(out, cp.ndarray)
    out_h = refattn.attention(qd, kd, vd, mask=host, causal=True, backend="cupy")
    assert np.array_equal(out.get(), out_h.get())


def test_pbs_stays_host_only():
    """PBS's selection is a token-level mask on permuted keys (``PermutedTokenMask``), which
    the GPU attention does not take (it runs on the reference): PBS is not ``device=True``,
    its selection comes back on the host (its scoring kernels still run on the GPU)."""
    from refattn.core.errors import InputError

    assert not refattn.methods()["pbs"]["device"]
    q, k, v = _qkv(S=1024)
    qd, kd, vd = cp.asarray(q), cp.asarray(k), cp.asarray(v)
    sel = refattn.select(qd, kd, "pbs", backend="cupy")
    assert not sel.on_device and sel.extras["token_mask"] is not None
    with pytest.raises(InputError, match="token-level"):
        refattn.attention(qd, kd, vd, mask=sel, causal=True, backend="cupy")
