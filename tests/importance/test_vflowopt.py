"""VFlowOpt: official vectors (patch entropy in fp16/fp32, relevance and combined maps with
the official NaN), selection with recycling, progressive pruning, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conformance import load, vector_params

from refattn.core.errors import InputError
from refattn.core.registry import dispatch
from refattn.importance import vflowopt as vf


@pytest.mark.parametrize("path", vector_params("vflowopt"))
def test_official_vectors(path):
    z = load(path)
    P = json.loads(str(z["params"][0]))
    if "entropy__float16" in z:
        for dt in ("float16", "float32"):
            e = vf.patch_entropy(z["pixel_values_fp32"], dtype=dt)
            np.testing.assert_allclose(e, z[f"entropy__{dt}"], atol=5e-6, rtol=0)
        # the fp16 product differs from fp32 (the official 8-bit conversion is dtype-sensitive)
        assert not np.allclose(z["entropy__float16"], z["entropy__float32"])
        return
    np.testing.assert_allclose(vf.patch_entropy(z["pixel_values_fp32"], dtype="float32"),
                               z["entropy"], atol=5e-6, rtol=0)
    for run in P["runs"]:
        want = z[run["array"]]
        for backend in ("numpy", "numba"):
            got = vf.importance_map(z["attn_probs"], z["entropy"], t=run["t"],
                                    alpha_v=run["alpha_v"], backend=backend)
            assert np.array_equal(np.isnan(got), np.isnan(want)), run["array"]
            assert np.isnan(want).all() == run["has_nan"]
            ok = ~np.isnan(want)
            np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-7, err_msg=run["array"])


def _scores(rng, n):
    s = rng.random(n) ** 3 * 0.01
    return s


@pytest.mark.parametrize("vit_r,vit_m", [(0.11662, 17.387), (0.5, 3.0), (0.25, 2.5)])
def test_recycling_preserves_score_weighted_sum(vit_r, vit_m):
    rng = np.random.default_rng(0)
    N, C = 729, 8
    s = _scores(rng, N)
    f = rng.standard_normal((N, C))
    res = vf.select_recycle(s, f, vit_r=vit_r, vit_m=vit_m)
    R, nm = int(round(N * (1 - vit_r))), int(N / vit_m ** 2)
    assert res["R"] == R and res["n_merge"] == nm
    low = np.argsort(s, kind="stable")[:R + nm]
    assert sorted(np.concatenate(res["groups"]).tolist()) == sorted(low.tolist())
    assert res["kept"].size == N - (R + nm) + len(res["groups"])
    kept_map = {int(i): n for n, i in enumerate(res["kept"])}
    total = np.zeros(C)
    for grp in res["groups"]:
        rep = int(grp[np.argmax(s[grp])])
        assert rep in res["representatives"]
        merged = res["features"][kept_map[rep]]
        total += s[grp].sum() * merged
        cells = {(int(i // 27 // vit_m), int(i % 27 // vit_m)) for i in grp}
        assert len(cells) == 1                               # one grid cell per group
    np.testing.assert_allclose(total, (s[low, None] * f[low]).sum(0), rtol=1e-10)
    untouched = np.setdiff1d(res["kept"], res["representatives"])
    np.testing.assert_array_equal(res["features"][[kept_map[i] for i in untouched]], f[untouched])
    assert (np.diff(res["kept"]) > 0).all()


def test_anyres_regions_and_newline_tokens():
    rng = np.random.default_rng(1)
    w = 6                                          # hires row width incl. the newline column
    hires = rng.random((4, w)) * 0.01
    hires[:, -1] = 1.0                             # newline tokens score 1.0 -> always kept
    s = np.concatenate([rng.random(9) * 0.01, hires.reshape(-1)])
    res = vf.select_recycle(s, rng.standard_normal((s.size, 3)), vit_r=0.7, vit_m=2.0,
                            regions=[(9, 3), (24, w)])
    nl = 9 + np.arange(4) * w + (w - 1)
    assert np.isin(nl, res["kept"]).all()
    for grp in res["groups"]:
        assert (grp < 9).all() or (grp >= 9).all()           # never across regions
    with pytest.raises(InputError, match="regions"):
        vf.select_recycle(s, np.zeros((s.size, 3)), regions=[(9, 3)])


def test_progressive_prune_and_masks():
    rng = np.random.default_rng(2)
    s = rng.random(100)
    st = vf.progressive_prune(s, [1.0, 0.6011, 0.5])
    assert [x.size for x in st] == [100, 100 - round(100 * 0.3989), 60 - round(60 * 0.5)]
    for a, b in zip(st, st[1:], strict=False):
        assert np.isin(b, a).all()
        assert s[np.setdiff1d(a, b)].max() <= s[b].min()
    m = vf.sequence_keep_masks(130, 14, 100, st)
    assert m.shape == (3, 130) and m[:, :14].all() and m[:, 114:].all()
    assert m[2].sum() == 30 + 30
    with pytest.raises(InputError, match="image_start"):
        vf.sequence_keep_masks(50, 14, 100, st)


def test_pipeline_and_kernel_nan():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 81, 81)) * 2
    p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    out = vf.run(p, rng.standard_normal((2, 81, 4)),
                 params=vf.VFlowOptParams(t=1.0, vit_r=0.5, vit_m=3.0))
    assert out["keepset"].shape == (2, 1)
    assert out["keepset"].counts[0, 0] == out["images"][0]["kept"].size
    assert len(out["llm_stages"][0]) == 2
    (rel,) = dispatch("vflowopt_relevance", "numba")(p, 1e9)
    assert np.isnan(rel).all()
    with pytest.raises(InputError, match="NaN"):
        vf.run(p, np.zeros((2, 81, 4)), params=vf.VFlowOptParams(t=1e9))


def test_errors():
    with pytest.raises(InputError, match="pixel_values"):
        vf.patch_entropy(np.zeros((1, 1, 28, 28)))
    with pytest.raises(InputError, match="pixel_values"):
        vf.patch_entropy(np.zeros((1, 3, 10, 10)))
    with pytest.raises(InputError, match="attn"):
        vf.importance_map(np.zeros((2, 3, 4)))
    with pytest.raises(InputError, match="entropy"):
        vf.importance_map(np.full((1, 1, 4, 4), 0.25), alpha_v=0.5)
    with pytest.raises(InputError, match="vit_r"):
        vf.select_recycle(np.ones(9), np.zeros((9, 2)), vit_r=1.5)


def test_select_method():
    import refattn

    rng = np.random.default_rng(4)
    q = rng.standard_normal((1, 2, 81, 16))
    k = rng.standard_normal((1, 1, 81, 16))
    sel = refattn.select(q, k, "vflowopt", t=1.0, vit_r=0.5, vit_m=3.0)
    p = vf.vit_attention(q, k)
    np.testing.assert_allclose(p.sum(-1), 1.0)
    want = vf.select_recycle(vf.importance_map(p, t=1.0)[0], np.zeros((81, 0)), vit_r=0.5,
                             vit_m=3.0)["kept"]
    np.testing.assert_array_equal(sel.extras["keepset"].kept(0, 0), want)
    out = refattn.attention(q, k, rng.standard_normal((1, 1, 81, 16)), mask=sel)
    assert np.isfinite(out).all()
    with pytest.raises(InputError, match="alpha_v"):
        refattn.select(q, k, "vflowopt", alpha_v=0.5)
    with pytest.raises(InputError, match="vit_r"):
        refattn.select(q, k, "vflowopt", vit_r=2.0)
