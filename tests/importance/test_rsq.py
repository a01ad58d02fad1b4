"""RSQ: official vectors (attention received, every AttnCon variant, heuristics), feature
scaling, the method through refattn.select, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conformance import load, vector_params

import refattn
from refattn.core.errors import InputError
from refattn.importance import rsq


def _params(run):
    r, cls = run["resolved"], run["class"]
    if cls == "OriginalAttentionWeighting":
        return rsq.RSQParams(min_value=r["min_value"], max_value=r["max_value"],
                             normalize=r["normalize"], masking=r["masking"],
                             truncate=r["truncate"])
    if cls == "MagnitudeWeighting":
        return rsq.RSQParams(strategy="actnorm", min_value=r["min_value"], max_value=r["max_value"])
    if cls == "MaxDistWeighting":
        return rsq.RSQParams(strategy="tokensim", min_value=r["min_value"], max_value=r["max_value"])
    assert cls == "AdhocMaskingWeighting"
    return rsq.RSQParams(strategy="adhoc", method_type=r["method_type"])


@pytest.mark.parametrize("path", vector_params("rsq"))
def test_official_vectors(path):
    z = load(path)
    P = json.loads(str(z["params"][0]))
    q, k = z["q"][None], z["k"][None]
    for backend in ("numpy", "numba"):
        (a,) = refattn.core.registry.dispatch("rsq_attention_received", backend)(
            q, k, q.shape[-1] ** -0.5)
        np.testing.assert_allclose(np.asarray(a)[0], z["attn_received"], rtol=2e-6, atol=1e-5)
    assert int(np.argmax(z["attn_received"])) == 0          # the sink takes the max
    for run in P["runs"]:
        p = _params(run)
        w = rsq.rsq_weights(p, q=q, k=k, x=z["X"])[0]
        want = z[run["array"]]
        if p.masking is not None or p.strategy == "adhoc":
            np.testing.assert_array_equal(w, want, err_msg=run["array"])
        else:
            np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6, err_msg=run["array"])


def test_weights_range_and_order():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 2, 40, 16))
    k = rng.standard_normal((1, 1, 40, 16))
    w = rsq.rsq_weights(rsq.RSQParams(), q=q, k=k)[0]
    (a,) = rsq.rsq_attention_received(q, k, 0.25)
    assert w.min() == pytest.approx(0.005) and w.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(np.argsort(w, kind="stable"), np.argsort(a[0], kind="stable"))
    assert a.sum() == pytest.approx(2 * 40)                  # every row's probabilities sum to 1
    # binning: num_bins levels; quantile bounds clip the extremes
    b = rsq.rsq_weights(rsq.RSQParams(num_bins=4), q=q, k=k)[0]
    np.testing.assert_allclose(np.unique(b), np.linspace(0.005, 1, 4))
    qv = rsq.rsq_weights(rsq.RSQParams(quantile_value=0.9), q=q, k=k)[0]
    assert (qv == 1.0).sum() >= 4 and (qv == 0.005).sum() >= 4


def test_scale_features_is_weighted_hessian():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 8))
    w = rng.uniform(0.005, 1, 30)
    xs = rsq.scale_features(x, w)
    wn = w / w.sum() * 30
    np.testing.assert_allclose(xs.T @ xs, (x * wn[:, None]).T @ x, rtol=1e-12)
    np.testing.assert_allclose(rsq.scale_features(x, w, renormalize=False), np.sqrt(w)[:, None] * x)


def test_heuristics():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((20, 6))
    y = x.copy()
    y[3] += 5.0
    d = rsq.rsq_weights(rsq.RSQParams(strategy="actdiff"), x=x, x_out=y)[0]
    assert int(np.argmin(d)) == 3                            # changed most -> lowest weight
    ids = np.array([1, 2, 2, 3, 3, 3] * 3 + [4, 5])
    f = rsq.rsq_weights(rsq.RSQParams(strategy="tokenfreq"), token_ids=ids,
                        counts=np.bincount(ids, minlength=6))[0]
    assert f[ids == 3].max() < f[ids == 1].min()            # rarer tokens weigh more
    dd = rsq.dot(x)
    np.testing.assert_allclose(dd, x @ x.sum(0))
    np.testing.assert_array_equal(rsq.adhoc_mask(10, "first_half"), [0] * 5 + [1] * 5)


def test_select_keepset():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 32, 16))
    k = rng.standard_normal((1, 1, 32, 16))
    k[0, 0, 0] += 4 * q[0, :, 1:].mean((0, 1))               # a sink
    sel = refattn.select(q, k, "rsq", keep_ratio=0.25)
    keep = sel.extras["keepset"]
    assert keep.counts[0, 0] == 8 and 0 in keep.kept(0, 0)
    w = sel.extras["weights"][0]
    assert w[keep.kept(0, 0)].min() >= np.delete(w, keep.kept(0, 0)).max()
    out = refattn.attention(q, k, rng.standard_normal((1, 1, 32, 16)), mask=sel, causal=True)
    assert np.isfinite(out).all()


def test_errors():
    q = np.zeros((1, 1, 4, 8))
    with pytest.raises(InputError, match="strategy"):
        refattn.select(q, q, "rsq", strategy="magic")
    with pytest.raises(InputError, match="max_value"):
        refattn.select(q, q, "rsq", min_value=1.0, max_value=0.5)
    with pytest.raises(InputError, match="masking"):
        refattn.select(q, q, "rsq", masking=1.5)
    with pytest.raises(InputError, match="x"):
        rsq.rsq_weights(rsq.RSQParams(strategy="actnorm"))
    with pytest.raises(InputError, match="method_type"):
        rsq.adhoc_mask(8, "a_b")


def test_qk_validation():
    with pytest.raises(InputError, match="GQA"):
        rsq.rsq_weights(rsq.RSQParams(), q=np.zeros((1, 3, 4, 8)), k=np.zeros((1, 2, 4, 8)))
    with pytest.raises(InputError, match="Sq"):
        rsq.rsq_weights(rsq.RSQParams(), q=np.zeros((1, 2, 4, 8)), k=np.zeros((1, 2, 5, 8)))
