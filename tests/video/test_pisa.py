"""PISA: the piecewise attention reference against a per-query transliteration of spec 3(e),
exactness limits, the selection rule (top-n, log-norm bias, ties), the Numba kernel, errors.

No official PISA vectors exist (the official code is Triton-only, Hopper TMA); the
transliteration below follows the kernel's three phases literally."""
from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.check import compare_arrays
from refattn.core.errors import InputError
from refattn.reference.attention import attention_forward
from refattn.reference.piecewise import piecewise_attention, piecewise_attention_forward
from refattn.testing import random_qkv, structured_qkv
from refattn.video import pisa


def brute_piecewise(q, k, v, sel, bs, correction):
    """Per query token: exact phase, zeroth-order phase, first-order phase (spec 3(e))."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    s = D ** -0.5
    out = np.zeros((B, Hq, Sq, v.shape[3]))
    nkb = -(-Sk // bs)
    for b in range(B):
        for h in range(Hq):
            g = h // (Hq // Hkv)
            kk, vv = k[b, g].astype(np.float64), v[b, g].astype(np.float64)
            blocks = [np.arange(j * bs, min((j + 1) * bs, Sk)) for j in range(nkb)]
            kbar = [kk[t].mean(0) for t in blocks]
            hc = [(kk[t] - kbar[j]).T @ vv[t] for j, t in enumerate(blocks)]
            for i in range(Sq):
                x = q[b, h, i].astype(np.float64)
                row = sel[b, h, i // bs]
                A, Z, Gw, first = 0.0, 0.0, 0.0, 0.0
                for j, t in enumerate(blocks):
                    if row[j]:
                        w = np.exp(s * kk[t] @ x)
                        A, Z = A + w @ vv[t], Z + w.sum()
                    else:
                        w = np.exp(s * kbar[j] @ x)
                        A, Gw = A + w * vv[t].sum(0), Gw + w * len(t)
                        first = first + w * s * (x @ hc[j])
                if correction == "global":
                    A = A + Gw / Sk * s * (x @ sum(hc))
                elif correction == "per_block":
                    A = A + first
                out[b, h, i] = A / (Z + Gw)
    return out


@pytest.mark.parametrize("correction", ["global", "per_block", "none"])
def test_reference_matches_transliteration(correction):
    rng = np.random.default_rng(0)
    q, k, _ = structured_qkv(rng, 1, 4, 2, 45, 75, 8)
    v = rng.standard_normal((1, 2, 75, 6)).astype(np.float32)
    sel = rng.random((1, 4, 3, 5)) < 0.4
    sel[0, 0, 0] = False
    o, lse = piecewise_attention_forward(q, k, v, sel, 16, None, correction)
    np.testing.assert_allclose(o, brute_piecewise(q, k, v, sel, 16, correction), atol=1e-12)
    assert np.isfinite(lse).all()


def test_all_selected_is_dense_attention_and_unit_blocks_are_exact():
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, 2, 2, 1, 40, 70, 16)
    o, l = piecewise_attention_forward(q, k, v, np.ones((3, 5), bool), 16)
    o2, l2 = attention_forward(q, k, v, None, False)
    np.testing.assert_allclose(o, o2, atol=1e-12)
    np.testing.assert_allclose(l, l2, atol=1e-12)
    for corr in ("global", "per_block", "none"):     # blocks of one token: mean key = key, Hc = 0
        o1, l1 = piecewise_attention_forward(q, k, v, np.zeros((40, 70), bool), 1, None, corr)
        np.testing.assert_allclose(o1, o2, atol=1e-12)
        np.testing.assert_allclose(l1, l2, atol=1e-12)


def test_per_block_taylor_is_closer_than_global_and_the_rule_tells_them_apart():
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, 1, 2, 2, 128, 128, 32)
    k = (k * 0.2).astype(np.float32)                  # small spread: Taylor regime
    sel = rng.random((1, 2, 4, 4)) < 0.3
    dense, _ = attention_forward(q, k, v, None, False)
    err = {c: np.abs(piecewise_attention_forward(q, k, v, sel, 32, None, c)[0] - dense).max()
           for c in ("global", "per_block", "none")}
    assert err["per_block"] < err["global"] and err["per_block"] < err["none"]
    g = piecewise_attention_forward(q, k, v, sel, 32, None, "global")[0]
    p = piecewise_attention_forward(q, k, v, sel, 32, None, "per_block")[0]
    assert not compare_arrays(g, p.astype(np.float32), "float32").ok


# -------------------------------------------------------------------- selection
def test_selection_topn_ranking_and_bias():
    rng = np.random.default_rng(3)
    q, k, v = structured_qkv(rng, 1, 4, 2, 300, 300, 32)
    for use_bias in (False, True):
        sel = refattn.select(q, k, "pisa", v=v, causal=False, block_size=32, density=0.25,
                             use_bias=use_bias)
        n = max(1, int(0.25 * 10))
        assert sel.extras["n_selected"] == n
        assert (sel.mask.to_dense().sum(-1) == n).all()
        # independent scores: block means, optional log-norm bias (monotone softmax omitted)
        qb = np.stack([q[0, :, i * 32:(i + 1) * 32].astype(np.float64).mean(1) for i in range(10)], 1)
        kb = np.stack([k[0, :, j * 32:(j + 1) * 32].astype(np.float64).mean(1) for j in range(10)], 1)
        sc = np.einsum("hid,hjd->hij", qb, np.repeat(kb, 2, axis=0)) / np.sqrt(32)
        if use_bias:
            nrm = []
            for g in range(2):
                row = []
                for j in range(10):
                    kk, vv = k[0, g, j * 32:(j + 1) * 32].astype(np.float64), v[0, g, j * 32:(j + 1) * 32]
                    row.append(np.linalg.norm((kk - kk.mean(0)).T @ vv))
                nrm.append(row)
            sc = sc + np.log(np.repeat(np.array(nrm), 2, axis=0) + 1e-5)[:, None, :]
        top = np.argsort(-sc, axis=-1, kind="stable")[..., :n]
        want = np.zeros_like(sel.mask.to_dense()[0])
        np.put_along_axis(want, top, True, axis=-1)
        np.testing.assert_array_equal(sel.mask.to_dense()[0], want)


def test_density_floor_and_ties_go_low():
    rng = np.random.default_rng(4)
    q, k, v = random_qkv(rng, 1, 1, 1, 64, 64, 8)
    k[:] = 1.0                                        # every block mean ties
    sel = refattn.select(q, k, "pisa", v=v, causal=False, block_size=16, density=0.01)
    np.testing.assert_array_equal(sel.mask.to_dense()[0, 0], np.eye(4, dtype=bool)[[0] * 4])


# ------------------------------------------------------------------ kernel, API
@pytest.mark.parametrize("correction", ["global", "per_block"])
def test_numba_backend_through_method_attention(correction):
    rng = np.random.default_rng(5)
    q, k, v = structured_qkv(rng, 1, 4, 2, 160, 160, 32)
    sel = refattn.select(q, k, "pisa", v=v, causal=False, block_size=32, density=0.2,
                         correction=correction)
    a, la = pisa.attention(q, k, v, sel, return_lse=True)
    b, lb = pisa.attention(q, k, v, sel, return_lse=True, backend="numba")
    np.testing.assert_allclose(b, a, atol=2e-6)
    np.testing.assert_allclose(lb, la, atol=2e-6)
    mod, fn = sel.extras["attention"].rsplit(".", 1)
    assert getattr(__import__(mod, fromlist=[fn]), fn) is pisa.attention
    c = piecewise_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                            sel, correction=correction, layout="bshd")
    np.testing.assert_allclose(c.transpose(0, 2, 1, 3), a, atol=1e-12)


def test_errors():
    q, k, v = random_qkv(np.random.default_rng(0), 1, 2, 1, 64, 64, 8)
    with pytest.raises(InputError, match="causal"):
        refattn.select(q, k, "pisa", v=v)
    with pytest.raises(InputError, match="density"):
        refattn.select(q, k, "pisa", v=v, causal=False, density=0.0)
    with pytest.raises(InputError, match="correction"):
        refattn.select(q, k, "pisa", v=v, causal=False, correction="second")
    with pytest.raises(InputError, match="needs v"):
        refattn.select(q, k, "pisa", causal=False)
    with pytest.raises(InputError, match="selected"):
        piecewise_attention_forward(q, k, v, np.ones((2, 2), bool), 16)
    with pytest.raises(InputError, match="correction"):
        piecewise_attention_forward(q, k, v, np.ones((4, 4), bool), 16, None, "x")
    with pytest.raises(InputError, match="grid"):
        refattn.select(q, k, "pisa", v=v, causal=False, grid=(2, 2))
