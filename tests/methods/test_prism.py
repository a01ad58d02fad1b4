"""Prism: dual-band scoring against a loop-based re-derivation, the official top-p selector,
properties on structured inputs, shapes, parameter errors, the D = 64 band quirk, and the
official conformance vectors (xinghaow99/prism @ d5a42526, torch fallback on CPU)."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from conformance import load, vector_params
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods import prism as P


def _random(seed, Sq, Sk=None, Hq=2, Hkv=1, D=32):
    rng = np.random.default_rng(seed)
    Sk = Sq if Sk is None else Sk
    q = rng.standard_normal((1, Hq, Sq, D)).astype(np.float32)
    k = rng.standard_normal((1, Hkv, Sk, D)).astype(np.float32)
    v = rng.standard_normal((1, Hkv, Sk, D)).astype(np.float32)
    return q, k, v


def _bruteforce(q, k, b, h, l, calibrate=True, th=1.0, tl=1.0):
    """Loop-based spec §4c for one head: returns (z_high, z_low, scale_high, scale_low)."""
    Sq, D = q.shape
    Sk = k.shape[0]
    nq, nk = -(-Sq // b), -(-Sk // b)
    qb = np.array([q[I * b:(I + 1) * b].sum(0) / b for I in range(nq)])   # zeros included
    kb = np.array([k[J * b:(J + 1) * b].sum(0) / b for J in range(nk)])
    hi = list(range(h // 2)) + list(range(D // 2, D // 2 + h // 2))
    lo = list(range(D // 2 - l // 2, D // 2)) + list(range(D - l // 2, D))

    def rms(x):
        return math.sqrt((x ** 2).mean())
    if calibrate:
        th = math.sqrt(h / D) * rms(qb[:, hi]) / rms(qb) * rms(kb[:, hi]) / rms(kb)
        tl = math.sqrt(l / D) * rms(qb[:, lo]) / rms(qb) * rms(kb[:, lo]) / rms(kb)
    sh, sl = math.sqrt(h) * th, math.sqrt(l) * tl
    zh = np.full((nq, nk), -np.inf)
    zl = np.full((nq, nk), -np.inf)
    for I in range(nq):
        for J in range(nk):
            if J <= I + nk - nq:
                zh[I, J] = sum(qb[I, d] * kb[J, d] for d in hi) / sh
                zl[I, J] = sum(qb[I, d] * kb[J, d] for d in lo) / sl
    return zh, zl, sh, sl


def _top_p_rows(p, tau):
    """Row-by-row statement of the rule in exact arithmetic (for tau < 1)."""
    out = np.zeros(p.shape, bool)
    for idx in np.ndindex(p.shape[:-1]):
        acc = 0.0
        for J in sorted(range(p.shape[-1]), key=lambda J: (-p[idx][J], J)):
            if acc >= tau:
                break
            out[idx + (J,)] = True
            acc += p[idx][J]
    return out


# ------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("Sq,Sk,calibrate", [(200, 200, True), (130, 300, True), (64, 64, False)])
def test_score_matches_loop_rederivation(Sq, Sk, calibrate):
    q, k, _ = _random(1, Sq, Sk, Hq=1, Hkv=1, D=16)
    zh, zl, ph, pl, sh, sl = P.prism_score(q, k, 32, 8, 12, calibrate, 0.7, 1.3)
    rz = _bruteforce(q[0, 0].astype(np.float64), k[0, 0].astype(np.float64), 32, 8, 12,
                     calibrate, 0.7, 1.3)
    np.testing.assert_allclose(zh[0, 0], rz[0], rtol=1e-12)
    np.testing.assert_allclose(zl[0, 0], rz[1], rtol=1e-12)
    assert sh[0, 0] == pytest.approx(rz[2], rel=1e-13) and sl[0, 0] == pytest.approx(rz[3], rel=1e-13)
    for z, p in ((zh, ph), (zl, pl)):
        fin = np.isfinite(z)
        assert (p[~fin] == 0).all()
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)


def test_calibration_is_invariant_to_input_scale():
    q, k = (x.astype(np.float64) for x in _random(2, 256, D=32)[:2])
    a = P.prism_score(q, k, 64, 16, 24, True, 1.0, 1.0)
    b = P.prism_score(q * 3.0, k * 0.5, 64, 16, 24, True, 1.0, 1.0)
    # t is a ratio of RMS energies: the scales do not move, the logits scale with |q| |k|
    np.testing.assert_allclose(b[4], a[4], rtol=1e-12)
    np.testing.assert_allclose(b[5], a[5], rtol=1e-12)
    fin = np.isfinite(a[0])
    np.testing.assert_allclose(b[0][fin], 1.5 * a[0][fin], rtol=1e-10)


def test_bands_and_default_dims_on_d64_warn():
    assert P.high_band(128, 64).tolist() == list(range(32)) + list(range(64, 96))
    assert P.low_band(128, 96).tolist() == list(range(16, 64)) + list(range(80, 128))
    # D = 64 with the defaults: official slicing gives all 64 dims / dims 16..63 (48 dims)
    assert P.high_band(64, 64).tolist() == list(range(64))
    assert P.low_band(64, 96).tolist() == list(range(16, 64))
    q, k, _ = _random(3, 256, D=64)
    with pytest.warns(P.PrismBandWarning, match="low_freq_dim=96"):
        sel = refattn.select(q, k, "prism")
    # ... and the scale still uses sqrt(96): reproduce it by hand
    zh, zl, sh, sl = _bruteforce(q[0, 0].astype(np.float64), k[0, 0].astype(np.float64), 128, 64, 64)
    lo = list(range(16, 64))
    q64, k64 = q[0, 0].astype(np.float64), k[0, 0].astype(np.float64)
    qb = np.stack([q64[:128].mean(0), q64[128:].mean(0)])
    kb = np.stack([k64[:128].mean(0), k64[128:].mean(0)])
    r = lambda x: np.sqrt((x ** 2).mean())  # noqa: E731
    t_l = math.sqrt(96 / 64) * r(qb[:, lo]) / r(qb) * r(kb[:, lo]) / r(kb)
    assert sel.extras["scale_low"][0, 0] == pytest.approx(math.sqrt(96) * t_l, rel=1e-12)
    assert sel.extras["scale_high"][0, 0] == pytest.approx(sh, rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refattn.select(q, k, "prism", high_freq_dim=32, low_freq_dim=48)
        refattn.select(*_random(3, 256, D=128)[:2], "prism")


def test_gqa_equals_expanded_kv():
    q, k, _ = synthetic(1, 4, 2, 700, 64, seed=4)
    kw = dict(high_freq_dim=32, low_freq_dim=48, block_size=64)
    a = refattn.select(q, k, "prism", **kw)
    b = refattn.select(q, np.repeat(k, 2, axis=1), "prism", **kw)
    np.testing.assert_array_equal(a.mask.mask, b.mask.mask)
    np.testing.assert_allclose(a.extras["probs_low"], b.extras["probs_low"], rtol=1e-13)


# ---------------------------------------------------------------------------- selection
def test_top_p_matches_rowwise_rule():
    rng = np.random.default_rng(5)
    for tau in (0.0, 0.3, 0.8, 0.95):
        z = rng.standard_normal((3, 7, 9)) * 2
        z[..., 6:] = -np.inf
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_array_equal(P.top_p_select(p, tau), _top_p_rows(p, tau))


def test_top_p_keeps_zero_blocks_when_float32_total_is_below_tau():
    p = np.array([[0.5, 0.3, 0.19999993, 0.0, 0.0]])  # float32 total < 1
    assert P.top_p_select(p, 1.0).tolist() == [[True] * 5]
    assert P.top_p_select(p, 0.99).tolist() == [[True, True, True, False, False]]


def test_structured_properties_and_tau_extremes():
    q, k, v = synthetic(1, 4, 2, 1536, 128, seed=3)
    n = 12
    legal = np.tril(np.ones((n, n), bool))
    sel = refattn.select(q, k, "prism")
    m, e = sel.mask.mask, sel.extras
    assert m.shape == (1, 4, n, n)
    assert not (m & ~legal).any()
    assert m[..., 0].all() and m[..., np.arange(n), np.arange(n)].all()
    np.testing.assert_array_equal(m, e["mask_high"] | e["mask_low"] | sel.forced)
    dens = sel.mask.density(causal=True, per_head=True)
    assert dens.min() < 0.9 and (dens > sel.mask.like(sel.forced).density(causal=True)).all()
    # union score >= 1 exactly on blocks kept by mass
    by_mass = (e["mask_high"] | e["mask_low"]) & legal
    np.testing.assert_array_equal(sel.scores.scores >= 1.0, by_mass)
    # each band keeps at least tau of its mass, and minimally
    for band, tau in (("high", 0.95), ("low", 0.95)):
        pb, mb = e[f"probs_{band}"], e[f"mask_{band}"]
        kept = np.where(mb, pb, 0).sum(-1)
        assert (kept >= tau - 1e-6).all()
        smallest = np.where(mb, pb, np.inf).min(-1)
        assert (kept - smallest < tau + 1e-6).all()
    zero = refattn.select(q, k, "prism", high_threshold=0.0, low_threshold=0.0)
    np.testing.assert_array_equal(zero.mask.mask, zero.forced)
    prev = zero.mask.mask
    for tau in (0.5, 0.9, 0.99):
        cur = refattn.select(q, k, "prism", high_threshold=tau, low_threshold=tau).mask.mask
        assert (prev <= cur).all()
        prev = cur
    nof = refattn.select(q, k, "prism", force_sink=False, force_recent=False)
    assert not nof.forced.any()
    np.testing.assert_array_equal(nof.mask.mask, e["mask_high"] | e["mask_low"])
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    assert np.isfinite(out).all()


def test_calibrate_false_uses_temperatures():
    q, k, _ = _random(7, 300, D=32)
    sel = refattn.select(q, k, "prism", calibrate=False, high_freq_dim=16, low_freq_dim=24,
                         high_temp=0.5, low_temp=2.0, block_size=64)
    assert np.allclose(sel.extras["scale_high"], 4.0 * 0.5)
    assert np.allclose(sel.extras["scale_low"], math.sqrt(24) * 2.0)


# ------------------------------------------------------------------------------- shapes
@settings(max_examples=25, deadline=None)
@given(Sq=st.integers(1, 400), extra=st.integers(0, 200),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2), (3, 3)]), block=st.sampled_from([16, 32, 64]),
       tau=st.floats(0.0, 0.999), seed=st.integers(0, 2**16))
def test_shapes(Sq, extra, heads, block, tau, seed):
    Hq, Hkv = heads
    q, k, v = _random(seed, Sq, Sq + extra, Hq=Hq, Hkv=Hkv, D=16)
    sel = refattn.select(q, k, "prism", block_size=block, high_freq_dim=8, low_freq_dim=12,
                         high_threshold=tau, low_threshold=tau)
    nq, nk = -(-Sq // block), -(-(Sq + extra) // block)
    assert sel.mask.mask.shape == (1, Hq, nq, nk)
    off = nk - nq
    legal = np.arange(nk)[None, :] <= np.arange(nq)[:, None] + off
    assert not (sel.mask.mask & ~legal).any()
    assert sel.mask.mask[..., 0].all() and sel.mask.mask[..., np.arange(nq), np.arange(nq) + off].all()
    for band in ("probs_high", "probs_low"):
        np.testing.assert_allclose(sel.extras[band].sum(-1), 1.0, rtol=1e-12)
    out = refattn.attention(q, k, v, mask=sel, causal=True)
    assert np.isfinite(out).all()


# ---------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("kw,name", [
    (dict(block_size=0), "block_size"), (dict(high_freq_dim=7), "high_freq_dim"),
    (dict(low_freq_dim=0), "low_freq_dim"), (dict(high_threshold=1.2), "high_threshold"),
    (dict(low_threshold=-0.5), "low_threshold"), (dict(high_temp=0.0), "high_temp"),
    (dict(low_temp=float("inf")), "low_temp"), (dict(calibrate="yes"), "calibrate"),
    (dict(force_sink=1), "force_sink"), (dict(threshold=0.9), "unknown parameter"),
])
def test_bad_parameters(kw, name):
    q, k, _ = _random(8, 64, D=16)
    with pytest.raises(InputError, match=name):
        refattn.select(q, k, "prism", **kw)


def test_non_causal_refused():
    q, k, _ = _random(9, 64, D=16)
    with pytest.raises(InputError, match="causal"):
        refattn.select(q, k, "prism", causal=False, high_freq_dim=8, low_freq_dim=8)


# --------------------------------------------------------------------------- conformance
def _params(z):
    h = json.loads(str(z["params"]))["effective_hyperparameters"]
    return dict(block_size=h["block_size"], high_freq_dim=h["high_freq_dim"],
                low_freq_dim=h["low_freq_dim"], high_threshold=h["high_freq_threshold"],
                low_threshold=h["low_freq_threshold"], high_temp=h["high_freq_temp"],
                low_temp=h["low_freq_temp"], calibrate=h["calibrate"],
                force_sink=h["force_sink"], force_recent=h["force_recent"])


@pytest.mark.parametrize("path", vector_params("prism"))
def test_conformance(path):
    z = load(path)
    kw = _params(z)
    sel = refattn.select(z["q"], z["k"], "prism", **kw)
    e = sel.extras
    n = z["mask"].shape[-1]
    logits = np.concatenate([e["logits_high"], e["logits_low"]], axis=2)
    probs = np.concatenate([e["probs_high"], e["probs_low"]], axis=2)
    fin = np.isfinite(z["logits"])
    np.testing.assert_array_equal(np.isfinite(logits), fin)
    np.testing.assert_array_equal(logits[~fin], z["logits"][~fin])
    np.testing.assert_allclose(logits[fin], z["logits"][fin], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probs, z["probs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e["scale_high"], z["scale_high"], rtol=1e-5)
    np.testing.assert_allclose(e["scale_low"], z["scale_low"], rtol=1e-5)
    # the selector on the official probabilities reproduces every mask exactly
    mh = P.top_p_select(z["probs"][:, :, :n], kw["high_threshold"])
    ml = P.top_p_select(z["probs"][:, :, n:], kw["low_threshold"])
    np.testing.assert_array_equal(mh, z["mask_high"])
    np.testing.assert_array_equal(ml, z["mask_low"])
    np.testing.assert_array_equal(mh | ml | sel.forced, z["mask"])
    # end to end: exact on every causal block. Future blocks are kept only at tau = 1, where
    # the float32 total of the official softmax falls one ulp short of 1 in some rows; that
    # last ulp is not reproducible from q/k (the attention drops those blocks anyway).
    legal = np.tril(np.ones((n, n), bool))
    for got, ref in ((sel.mask.mask, z["mask"]), (e["mask_high"], z["mask_high"]),
                     (e["mask_low"], z["mask_low"])):
        np.testing.assert_array_equal(got & legal, ref & legal)
        if max(kw["high_threshold"], kw["low_threshold"]) < 1.0:
            np.testing.assert_array_equal(got, ref)
    # the official Triton selector agrees with the torch selector on every causal block
    np.testing.assert_array_equal(z["union_triton_select_interp"] & legal, (mh | ml) & legal)


def test_refuses_work_over_the_memory_limit():
    q, k, _ = _random(10, 4096, D=16)
    refattn.set_memory_limit(50_000)
    try:
        with pytest.raises(refattn.MemoryLimitError, match="prism_score"):
            refattn.select(q, k, "prism", high_freq_dim=8, low_freq_dim=8)
    finally:
        refattn.set_memory_limit(None)
