"""VFlowOpt: official vectors (patch entropy in fp16/fp32, relevance and combined maps with
the official NaN), released parameters (exact literals), the official non-anyres path (plain
top-k, transliterated), anyres selection with recycling, progressive pruning, errors."""
from __future__ import annotations

import inspect
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


@pytest.mark.parametrize("vit_r,vit_m", [(0.11661529508161146, 17.386981849158786), (0.5, 3.0),
                                         (0.25, 2.5)])
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
    f = rng.standard_normal((2, 81, 4))
    prm = vf.VFlowOptParams(t=1.0, vit_r=0.5, vit_m=3.0)
    out = vf.run(p, f, params=prm)
    assert out["keepset"].shape == (2, 1)
    assert out["keepset"].counts[0, 0] == out["images"][0]["kept"].size == 81 - round(81 * 0.5)
    assert out["images"][0]["groups"] == [] and out["images"][0]["n_merge"] == 0
    assert len(out["llm_stages"][0]) == 2
    # an anyres layout recycles (here: base 3 x 3 + hi-res 8 x 9 incl. newline column)
    anyres = vf.run(p, f, params=prm, regions=[(9, 3), (72, 9)])
    for b in range(2):
        want = vf.select_recycle(out["score"][b], f[b], vit_r=0.5, vit_m=3.0,
                                 regions=[(9, 3), (72, 9)])
        got = anyres["images"][b]
        assert got["groups"] and got["n_merge"] == int(81 / 9)
        np.testing.assert_array_equal(got["kept"], want["kept"])
        np.testing.assert_array_equal(got["features"], want["features"])
        assert anyres["keepset"].counts[b, 0] == want["kept"].size
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
    score = vf.importance_map(p, t=1.0)
    kept, _, _, _ = _official_plain_vit(score, np.zeros((1, 81, 0)), 0.5, n_grid=81)
    np.testing.assert_array_equal(sel.extras["keepset"].kept(0, 0), kept[0])
    assert sel.extras["representatives"][0].size == 0
    for m in (1.5, 40.0):                        # no recycling: vit_m plays no part
        other = refattn.select(q, k, "vflowopt", t=1.0, vit_r=0.5, vit_m=m)
        np.testing.assert_array_equal(other.extras["keepset"].kept(0, 0), kept[0])
    out = refattn.attention(q, k, rng.standard_normal((1, 1, 81, 16)), mask=sel)
    assert np.isfinite(out).all()
    with pytest.raises(InputError, match="alpha_v"):
        refattn.select(q, k, "vflowopt", alpha_v=0.5)
    with pytest.raises(InputError, match="vit_r"):
        refattn.select(q, k, "vflowopt", vit_r=2.0)


# ------------------------------------------------ released parameters, official plain path
# lmms_eval/models/llava_onevision_training_free.py:144-165 (sihany077/VFlowOpt@129eeef)
OFFICIAL = {
    "50%": dict(t=28.683047941520474, alpha_v=0, vit_m=11.756787150848968,
                vit_r=0.7233201448753168, llm_r=(0.748747637472693, 0.487)),
    "25%": dict(t=34.759552803070484, alpha_v=0, vit_m=15.580797034937687,
                vit_r=0.2651026358526424, llm_r=(0.9833433139039235, 0.8773258179532721)),
    "10%": dict(t=39.26492840997221, alpha_v=0, vit_m=17.386981849158786,
                vit_r=0.11661529508161146, llm_r=(1.0, 0.6011)),
}


def test_defaults_are_the_official_literals():
    ten = OFFICIAL["10%"]
    d = vf.VFlowOptParams()
    assert (d.t, d.alpha_v, d.vit_m, d.vit_r, d.llm_r) == (
        ten["t"], ten["alpha_v"], ten["vit_m"], ten["vit_r"], ten["llm_r"])
    assert d.image_token_start == 14
    for name, want in OFFICIAL.items():
        got = vf.PRESETS[name]
        assert {k: getattr(got, k) for k in want} == want, name
        assert got.image_token_start == 14
        got.validate()
    assert set(vf.PRESETS) == set(OFFICIAL)
    sig = {f: inspect.signature(getattr(vf, f)).parameters
           for f in ("importance_map", "select_recycle", "select_topk", "select_plain")}
    assert sig["importance_map"]["t"].default == ten["t"]
    assert sig["select_recycle"]["vit_r"].default == ten["vit_r"]
    assert sig["select_recycle"]["vit_m"].default == ten["vit_m"]
    assert sig["select_topk"]["vit_r"].default == ten["vit_r"]
    assert sig["select_plain"]["vit_r"].default == ten["vit_r"]


def _official_plain_vit(attn_maps, image_features, vit_r, n_grid=729):
    """llava_qwen_training_free.py:649-672 (non-anyres image tensor), torch -> NumPy;
    ``n_grid`` stands for the hard-coded 729 (SigLIP 27 x 27)."""
    reduce_tokens_per_img = round(n_grid * (1 - vit_r))
    image_tokens_per_img = n_grid - reduce_tokens_per_img
    image_token_length = image_tokens_per_img * len(image_features)
    batch_size, num_tokens = attn_maps.shape
    mask = np.zeros_like(attn_maps, dtype=bool)
    for i in range(batch_size):
        attn_map = attn_maps[i]
        topk_indices = np.argsort(-attn_map)[:image_tokens_per_img]      # torch.topk(k).indices
        mask[i, topk_indices] = True
    selected_features_per_img = []
    for i in range(batch_size):
        selected_features_per_img.append(image_features[i, mask[i]])
    image_features = np.stack(selected_features_per_img, axis=0)
    image_attn_map = attn_maps[mask]                                     # -> VIT_ATTN_MAP
    kept = [np.nonzero(mask[i])[0] for i in range(batch_size)]
    return kept, image_features, image_attn_map, image_token_length


def _official_llm_stages(vit_attn_map, image_token_length, llm_r, start=14, tail=5):
    """transformers-4.46.0/.../modeling_qwen2.py:1030-1054 (forward_illava, KV-cache prefill):
    the del_musks of every LLM stage, composed into kept image-token indices."""
    combined_attn = np.asarray(vit_attn_map)
    len_hidden_states = start + image_token_length + tail
    alive = np.arange(len_hidden_states)                 # original position of each slot
    stages = []
    for r_val in llm_r:
        all_indices = np.argsort(combined_attn, kind="stable")          # torch.sort().indices
        r = round(image_token_length * (1 - r_val))
        low_k = all_indices[:r]
        del_musk = np.ones(len_hidden_states, dtype=bool)
        del_musk[start + low_k] = False
        combined_attn = combined_attn[del_musk[start:start + image_token_length]]
        image_token_length -= r
        len_hidden_states -= r
        alive = alive[del_musk]
        img = alive[(alive >= start) & (alive < start + len(vit_attn_map))] - start
        stages.append(img)
    return stages


def _vit_attention_with_sinks(rng, B, H, n, sinks=(3, 200, 517)):
    """Softmax attention in which a few key tokens draw most of the attention (so the global
    set at the released thresholds t ~ 29..39 is not empty)."""
    x = rng.standard_normal((B, H, n, n))
    x[..., list(sinks)] += 6.0
    x -= x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("preset", sorted(OFFICIAL))
def test_plain_grid_is_the_official_topk(preset):
    """Non-anyres image (``regions=None``): ``run`` equals the transliterated official path,
    ViT stage (kept indices in order, features, VIT_ATTN_MAP) and LLM stages."""
    rng = np.random.default_rng(5)
    B, N, C = 2, 729, 6
    attn = _vit_attention_with_sinks(rng, B, 2, N)
    feats = rng.standard_normal((B, N, C))
    prm = vf.PRESETS[preset]
    out = vf.run(attn, feats, params=prm)
    score = out["score"]
    assert not np.isnan(score).any()
    kept, f_sel, vit_map, length = _official_plain_vit(score, feats, prm.vit_r)
    assert length == B * (729 - round(729 * (1 - prm.vit_r)))
    for b, im in enumerate(out["images"]):
        assert im["kept"].size == 729 - round(729 * (1 - prm.vit_r))
        np.testing.assert_array_equal(im["kept"], kept[b])
        np.testing.assert_array_equal(im["features"], f_sel[b])
        assert im["groups"] == [] and im["representatives"].size == 0 and im["n_merge"] == 0
        np.testing.assert_array_equal(out["keepset"].kept(b, 0), kept[b])
        # one image per sample: VIT_ATTN_MAP is that image's kept scores, in token order
        per_img = vit_map[b * kept[b].size:(b + 1) * kept[b].size]
        np.testing.assert_array_equal(im["kept_scores"], per_img)
        want = _official_llm_stages(per_img, kept[b].size, prm.llm_r)
        got = out["llm_stages"][b]
        assert len(got) == len(want) == len(prm.llm_r)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


def test_plain_topk_counts_and_ties():
    # counts: N - round(N (1 - vit_r)), half-to-even as Python's round / torch
    s = np.arange(10.0)[::-1].copy()
    assert vf.select_topk(s, 0.25).tolist() == [0, 1]                # R = round(7.5) = 8
    assert vf.select_topk(s, 0.75).tolist() == list(range(8))        # R = round(2.5) = 2
    # ties at the cut: the lower index is dropped first (kept ascending)
    assert vf.select_topk(np.array([1.0, 2.0, 1.0, 1.0, 3.0]), 0.6).tolist() == [1, 3, 4]
    with pytest.raises(InputError, match="NaN"):
        vf.select_topk(np.array([np.nan, 1.0]), 0.5)
    with pytest.raises(InputError, match="features"):
        vf.select_plain(np.ones(4), np.zeros((3, 2)))
