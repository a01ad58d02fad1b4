"""RSQ heuristics against a line-by-line NumPy transliteration of each official class of
``ylsung/rsq@1a7cf31`` ``fake_quant/input_weighting_module.py``: the order of ``reverse``
and ``scale`` (MaxDist/MaxDiff/TokenFreq scale first, Magnitude/Dot negate first), and the
``truncate`` branch that only Original and Magnitude have (the others take it into
``**kwargs``: masking, then num_bins). Written from the official source, independent of
``refattn.importance.rsq`` (only the attention received is shared, as AttnCon's input)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from refattn.core.errors import InputError
from refattn.importance import rsq


# --------------------------------------------- InputWeightingModule (lines 25-63)
def _normalize_weight(x, min_value, max_value, quantile_value=None):
    if quantile_value is not None:
        q_min, q_max = 1 - quantile_value, quantile_value
        if q_max < q_min:
            q_max, q_min = q_min, q_max
        t_min, t_max = np.quantile(x, [q_min, q_max])
    else:
        t_min, t_max = np.min(x), np.max(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = (x - t_min) / (t_max - t_min)
    y = y * (max_value - min_value) + min_value
    return np.clip(y, min_value, max_value)


def _bin_the_values(x, min_value, max_value, num_bins):
    thresholds = np.quantile(x, np.linspace(0, 1, num_bins + 1)[1:-1])
    result = x.copy()
    vlist = np.linspace(min_value, max_value, num_bins)
    for i in range(len(vlist)):
        if i == 0:
            mask = x <= thresholds[i]
        elif i == len(vlist) - 1:
            mask = x > thresholds[i - 1]
        else:
            mask = (x > thresholds[i - 1]) & (x <= thresholds[i])
        result[mask] = vlist[i]
    return result


def _topk_smallest(w, k):
    # torch.topk(largest=False): NaN counts as largest; ties to the lower index (the
    # reference's documented choice, torch leaves it unspecified)
    return np.argsort(w, kind="stable")[:k]


# ----------------------------------------------------- steps shared by the classes
def _scale(w, c):
    if c["scale"] == "square":
        w = w ** 2
    elif c["scale"] == "sqrt":
        with np.errstate(invalid="ignore"):
            w = w ** 0.5
    return w


def _normalize(w, c, quantile_value=None):
    L = len(w)
    if c["normalize"] == "linear":
        w = w / (np.arange(0, L)[::-1] + 1)
        w = _normalize_weight(w, c["min_value"], c["max_value"], quantile_value)
    elif c["normalize"] == "sqrt":
        w = w / np.sqrt(np.arange(0, L)[::-1] + 1)
        w = _normalize_weight(w, c["min_value"], c["max_value"], quantile_value)
    elif c["normalize"] == "default":
        w = _normalize_weight(w, c["min_value"], c["max_value"], quantile_value)
    return w


def _tail_with_truncate(w, c):          # Original :202-210, Magnitude :292-300
    if c["masking"] is not None:
        idx = _topk_smallest(w, int(len(w) * c["masking"]))
        w = np.ones_like(w)
        w[idx] = 0
    elif c["truncate"] is not None:
        idx = _topk_smallest(w, int(len(w) * c["truncate"]))
        w = w.copy()
        w[idx] = 0
    elif c["num_bins"] is not None:
        w = _bin_the_values(w, c["min_value"], c["max_value"], c["num_bins"])
    return w


def _tail_without_truncate(w, c):       # MaxDist :436-442, MaxDiff :492-498, TokenFreq :544-550, Dot :603-609
    if c["masking"] is not None:
        idx = _topk_smallest(w, int(len(w) * c["masking"]))
        w = np.ones_like(w)
        w[idx] = 0
    elif c["num_bins"] is not None:
        w = _bin_the_values(w, c["min_value"], c["max_value"], c["num_bins"])
    return w


# ------------------------------------------------------------------ the classes
def original(received, c):              # OriginalAttentionWeighting.compute_weight :160-212
    w = _scale(received, c)
    w = _normalize(w, c, c["quantile_value"])
    return _tail_with_truncate(w, c)


def magnitude(x, c):                    # MagnitudeWeighting.compute_weight :259-302
    w = np.linalg.norm(x, axis=-1)
    if c["reverse"]:
        w = -w                          # :271, before scale
    w = _scale(w, c)                    # :274
    w = _normalize(w, c)
    return _tail_with_truncate(w, c)


def max_dist(x, c):                     # MaxDistWeighting.compute_weight :396-444
    dist = -2 * x @ x.T + (x ** 2).sum(-1)[:, None] + (x ** 2).sum(-1)[None, :]
    w = dist.mean(1)
    w = _scale(w, c)                    # :417
    if c["reverse"]:
        w = -w                          # :422, after scale
    w = _normalize(w, c)
    return _tail_without_truncate(w, c)


def max_diff(x, y, c):                  # MaxDiffWeighting.compute_weight :461-500
    w = np.linalg.norm(x - y, axis=-1)
    w = _scale(w, c)                    # :473
    if c["reverse"]:
        w = -w                          # :478, after scale
    w = _normalize(w, c)
    return _tail_without_truncate(w, c)


def token_freq(freq, c):                # TokenFreqWeighting.compute_weight :517-552
    w = freq.astype(np.float64)
    w = _scale(w, c)                    # :525
    if c["reverse"]:
        w = -w                          # :530, after scale
    w = _normalize(w, c)
    return _tail_without_truncate(w, c)


def dot_weighting(x, c):                # DotWeighting.compute_weight :569-611
    w = (x @ x.T).sum(-1)
    if c["reverse"]:
        w = -w                          # :582, before scale
    w = _scale(w, c)                    # :585
    w = _normalize(w, c)
    return _tail_without_truncate(w, c)


YAML_REVERSE = {"actnorm": False, "tokensim": False, "actdiff": True, "tokenfreq": True,
                "dot": False}             # configs/input_weighting/*.yaml (dot: class default)


def _inputs():
    rng = np.random.default_rng(7)
    L = 40
    x = rng.standard_normal((L, 8)) + 0.3 * rng.standard_normal(8)   # mixed-sign dot rows
    y = x + rng.standard_normal((L, 8)) * rng.uniform(0.1, 2, (L, 1))
    corpus = rng.integers(0, 12, (3, L))                               # calibration set
    ids = corpus[1]
    counts = np.bincount(corpus.ravel(), minlength=12)
    q = rng.standard_normal((1, 2, L, 16))
    k = rng.standard_normal((1, 1, L, 16))
    return dict(x=x, y=y, ids=ids, counts=counts, q=q, k=k)


def _official(strategy, d, c):
    if strategy == "attncon":
        (a,) = rsq.rsq_attention_received(d["q"], d["k"], 0.25)
        return original(np.asarray(a)[0], c)
    if strategy == "actnorm":
        return magnitude(d["x"], c)
    if strategy == "tokensim":
        return max_dist(d["x"], c)
    if strategy == "actdiff":
        return max_diff(d["x"], d["y"], c)
    if strategy == "tokenfreq":
        return token_freq(d["counts"][d["ids"]], c)
    return dot_weighting(d["x"], c)


def _ours(strategy, d, p):
    return rsq.rsq_weights(p, q=d["q"], k=d["k"], x=d["x"], x_out=d["y"], token_ids=d["ids"],
                           counts=d["counts"], softmax_scale=0.25)[0]


GRID = list(itertools.product(("default", "linear"), (None, 0.2), (None, 4), (None, 0.25),
                              (None, True, False)))


@pytest.mark.parametrize("scale", rsq.SCALES)
@pytest.mark.parametrize("strategy", ["attncon", "actnorm", "tokensim", "actdiff", "tokenfreq", "dot"])
def test_matches_official_class(strategy, scale):
    d = _inputs()
    for normalize, truncate, num_bins, masking, reverse in GRID:
        p = rsq.RSQParams(strategy=strategy, scale=scale, normalize=normalize, truncate=truncate,
                          num_bins=num_bins, masking=masking, reverse=reverse,
                          quantile_value=0.95 if strategy == "attncon" and num_bins else None)
        c = dict(min_value=p.min_value, max_value=p.max_value, normalize=normalize,
                 scale=None if scale == "none" else scale, num_bins=num_bins, masking=masking,
                 truncate=truncate, quantile_value=p.quantile_value,
                 reverse=YAML_REVERSE.get(strategy) if reverse is None else reverse)
        want = _official(strategy, d, c)
        got = _ours(strategy, d, p)
        msg = f"{strategy} scale={scale} {normalize=} {truncate=} {num_bins=} {masking=} {reverse=}"
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=msg)


@pytest.mark.parametrize("strategy", ["actdiff", "tokenfreq"])
def test_reverse_after_scale_keeps_ranking(strategy):
    """The audit's regression: squaring a negated score inverted the ranking, its root
    was NaN. Scale first, then negate: all scales rank alike and stay finite."""
    d = _inputs()
    ws = {s: _ours(strategy, d, rsq.RSQParams(strategy=strategy, scale=s)) for s in rsq.SCALES}
    order = np.argsort(ws["none"], kind="stable")
    for s, w in ws.items():
        assert np.isfinite(w).all(), s
        assert np.all(np.diff(w[order]) >= 0), s                  # same (weak) ranking
    raw = (np.linalg.norm(d["x"] - d["y"], axis=-1) if strategy == "actdiff"
           else d["counts"][d["ids"]])
    assert ws["square"][np.argmax(raw)] == pytest.approx(0.005)   # largest raw -> min weight
    assert ws["sqrt"][np.argmin(raw)] == pytest.approx(1.0)


@pytest.mark.parametrize("strategy", ["tokensim", "actdiff", "tokenfreq", "dot"])
def test_truncate_ignored_without_official_branch(strategy):
    d = _inputs()
    base = _ours(strategy, d, rsq.RSQParams(strategy=strategy))
    np.testing.assert_array_equal(_ours(strategy, d, rsq.RSQParams(strategy=strategy, truncate=0.3)), base)
    # truncate set: num_bins still applies (it is the next branch after masking)
    b = _ours(strategy, d, rsq.RSQParams(strategy=strategy, truncate=0.3, num_bins=3))
    np.testing.assert_array_equal(b, _ours(strategy, d, rsq.RSQParams(strategy=strategy, num_bins=3)))


@pytest.mark.parametrize("strategy", ["attncon", "actnorm"])
def test_truncate_applies_where_official(strategy):
    d = _inputs()
    w = _ours(strategy, d, rsq.RSQParams(strategy=strategy, truncate=0.25))
    base = _ours(strategy, d, rsq.RSQParams(strategy=strategy))
    assert (w == 0).sum() == 10
    np.testing.assert_array_equal(w[w != 0], base[w != 0])


def test_reverse_param():
    d = _inputs()
    # attncon has no reverse attribute: ignored, as the official **kwargs
    np.testing.assert_array_equal(_ours("attncon", d, rsq.RSQParams(reverse=True)),
                                  _ours("attncon", d, rsq.RSQParams()))
    # actnorm negates before scale: square undoes the negation (official quirk)
    np.testing.assert_allclose(
        _ours("actnorm", d, rsq.RSQParams(strategy="actnorm", reverse=True, scale="square")),
        _ours("actnorm", d, rsq.RSQParams(strategy="actnorm", scale="square")))
    with pytest.raises(InputError, match="reverse"):
        rsq.RSQParams(reverse="yes").validate()


def test_bin_values_nan_as_official():
    x = np.array([0.1, np.nan, 0.5, 0.9])             # NaN thresholds: no bin matches
    np.testing.assert_array_equal(rsq.bin_values(x, 0.0, 1.0, 2), _bin_the_values(x, 0.0, 1.0, 2))
    y = np.array([0.1, 0.3, 0.5, 0.9])
    np.testing.assert_array_equal(rsq.bin_values(y, 0.0, 1.0, 3), _bin_the_values(y, 0.0, 1.0, 3))
