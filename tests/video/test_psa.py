"""PSA: official vectors (levels, new-format masks, key similarity), the spec's worked
examples, the sampled importance estimate against a brute-force transliteration, the
pyramid attention reference against independent constructions, the Numba kernel, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conformance import load, vector_params

import refattn
from refattn.core.errors import InputError
from refattn.reference.attention import attention_forward
from refattn.reference.pyramid import pooled_kv, pyramid_attention, pyramid_attention_forward
from refattn.testing import random_qkv, structured_qkv
from refattn.video import psa

VECTORS = vector_params("psa")
TRANSFER = [p for p in VECTORS if p.id is None or p.id.startswith("transfer")]
KSIM = [p for p in VECTORS if p.id is None or p.id.startswith("ksim")]
if not KSIM:
    KSIM = [pytest.param(None, marks=pytest.mark.skip(reason="ksim_* vectors (490 KB each) are "
                                                             "not bundled; set REFATTN_CONFORMANCE"))]


# --------------------------------------------------------------------- conformance
@pytest.mark.parametrize("path", TRANSFER)
def test_official_transfer_attn_to_mask(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    dtype = "bfloat16" if p["P_dtype_in_call"] == "bfloat16" else "float32"
    kw = dict(block_k=p["block_n"], tile_n=p["compute_tile"],
              min_full_attn_ratio=p["min_full_attn_ratio"], dtype=dtype)
    for run in p["runs"]:
        ratios = [tuple(r) for r in run["mask_ratios"]]
        mode = run["mode"]
        if mode.endswith("_newtype"):
            got = psa.newtype_mask(z["P"], ratios, mode[:-len("_newtype")], **kw)
        else:
            got = psa.transfer_levels(z["P"], ratios, mode, text_tokens=p["text_length"], **kw)
        np.testing.assert_array_equal(got, z[run["array"]], err_msg=f"{path.name}: {run['array']}")


def test_bf16_emulation_matters_for_thresholdbound():
    path = [p.values[0] for p in TRANSFER if p.id == "transfer_bn128_bf16"]
    if not path:
        pytest.skip("transfer_bn128_bf16 vector not found")
    z = load(path[0])
    ratios = json.loads(str(z["params"][0]))["runs"][1]["mask_ratios"]
    got32 = psa.transfer_levels(z["P"], [tuple(r) for r in ratios], "thresholdbound", block_k=128,
                                tile_n=32, dtype="float32")
    assert (got32 != z["mask_thresholdbound"]).sum() > 0   # README quirk 4: 6 levels differ


@pytest.mark.parametrize("path", KSIM)
def test_official_key_similarity(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    s = psa.key_similarity(z["k"], p["blocksize"])
    for i, n in enumerate((2, 4, 8)):
        np.testing.assert_allclose(s[i], z[f"similarity_{n}"], rtol=1e-5, atol=1e-6)
    for run in p["runs"]:
        thr = (run["sim_2x_threshold"], run["sim_4x_threshold"], run["sim_8x_threshold"])
        np.testing.assert_array_equal(psa.key_similarity_cap(z["k"], p["blocksize"], thr), z[run["array"]])


# ------------------------------------------------------------- spec worked examples
def _row_from_energy(cum: list[float], rest: list[float], rng: np.random.Generator) -> tuple:
    vals = np.diff(np.concatenate([[0.0], cum])).tolist() + rest
    perm = rng.permutation(len(vals))                    # block id of each rank
    P = np.empty(len(vals))
    P[perm] = vals
    return P, perm


def test_spec_example_thresholdbound_nk20():
    cum = [.104, .197, .287, .368, .442, .515, .576, .633, .690, .743, .790]
    rest = [.04, .035, .03, .026, .022, .018, .015, .013, .011]
    P, perm = _row_from_energy(cum, rest, np.random.default_rng(3))
    ratios = ((1, 0, .4), (2, .4, .5), (4, .5, .6), (8, .6, .8), (0, .8, 1.0))
    lv = psa.transfer_levels(P[None], ratios, "thresholdbound", block_k=128, tile_n=32)[0]
    want = [1] * 5 + [2] + [4] * 2 + [8] * 4 + [0] * 8
    np.testing.assert_array_equal(lv[perm], want)


def test_spec_example_topk_alignment_inflation():
    P, perm = _row_from_energy(list(np.cumsum(np.linspace(.09, .01, 20)) / 1.0), [],
                               np.random.default_rng(4))
    ratios = {1: (0, .1), 2: (.1, .15), 4: (.15, .15), 8: (.15, .35), 0: (.35, 1.0)}
    lv = psa.transfer_levels(P[None], ratios, "topk", block_k=32, tile_n=32)[0]
    np.testing.assert_array_equal(lv[perm], [1, 1, 2, 2] + [8] * 8 + [0] * 8)


def test_thresholdbound_full_attention_floor():
    P = np.array([[0.9] + [0.1 / 49] * 49])              # one block holds 90 %
    lv = psa.transfer_levels(P, ((1, 0, .5), (0, .5, 1.0)), "thresholdbound", block_k=64, tile_n=32)
    assert (lv == 1).sum() == int(50 * 0.06) + 1         # floor(0.06 nk) + 1 full blocks


# ------------------------------------------------------------------- importance
def _replicate(x, n):
    """``x [S, D]`` with its last row repeated up to ``n`` rows."""
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)])


def brute_importance(q, k, bq, bk, oq, ok):
    """Row-by-row transliteration of spec 2(c), unnormalised (P[i, j] / P[i, 0] is compared)."""
    B, H, S, D = q.shape
    G = H // k.shape[1]
    nq, nk = -(-S // bq), -(-k.shape[2] // bk)
    out = np.zeros((B, H, nq, nk))
    for b in range(B):
        for h in range(H):
            qq = _replicate(q[b, h], nq * bq).astype(np.float64)
            kk = _replicate(k[b, h // G], nk * bk).astype(np.float64)
            for i in range(nq):
                for j in range(nk):
                    best = 0.0
                    for r in oq[b, h]:
                        x = [qq[i * bq + r] @ kk[jj * bk + c] / np.sqrt(D) for jj in range(nk) for c in ok[b, h]]
                        xj = [qq[i * bq + r] @ kk[j * bk + c] / np.sqrt(D) for c in ok[b, h]]
                        best = max(best, np.exp(max(xj) - max(x)))
                    out[b, h, i, j] = best
    return out


def test_sampled_importance_matches_brute_force():
    rng = np.random.default_rng(0)
    q, k, _ = structured_qkv(rng, 1, 2, 1, 70, 70, 16)
    oq = psa.default_offsets(rng, 1, 2, 16, 4)
    ok = psa.default_offsets(rng, 1, 2, 32, 8)
    P = psa.sampled_importance(q, k, 16, 32, oq, ok)
    ref = brute_importance(q, k, 16, 32, oq, ok)
    np.testing.assert_allclose(P / P[..., :1], ref / ref[..., :1], rtol=1e-12)
    assert (P.sum(-1) <= 1 + 1e-12).all()


def test_bf16_score_emulation():
    rng = np.random.default_rng(7)
    q, k, _ = structured_qkv(rng, 1, 2, 1, 256, 256, 32)
    oq, ok = psa.default_offsets(rng, 1, 2, 32, 8), psa.default_offsets(rng, 1, 2, 32, 8)
    P64 = psa.sampled_importance(q, k, 32, 32, oq, ok)
    P16 = psa.sampled_importance(q, k, 32, 32, oq, ok, "bfloat16")
    import ml_dtypes
    np.testing.assert_array_equal(P16, P16.astype(ml_dtypes.bfloat16).astype(np.float64))
    # bf16 maxima in log2 units: spacing 2^-8 |b| -> a few % on small P
    np.testing.assert_allclose(P16, P64, rtol=0.1, atol=1e-30)
    assert not np.array_equal(P16, P64)


def test_default_offsets_are_a_seeded_subset():
    a = psa.default_offsets(np.random.default_rng(5), 2, 3, 64, 16)
    b = psa.default_offsets(np.random.default_rng(5), 2, 3, 64, 16)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 3, 16) and all(len(set(r)) == 16 for r in a.reshape(-1, 16))


# ----------------------------------------------------------------------- method
def test_select_gilbert_text_cap_and_attention_round_trip():
    rng = np.random.default_rng(1)
    T, H, W, txt = 2, 4, 8, 20
    q, k, v = random_qkv(rng, 1, 2, 1, T * H * W + txt, T * H * W + txt, 16)
    common = dict(v=v, causal=False, grid=(T, H, W), text_tokens=txt, rearrange="gilbert",
                  block_q=16, block_k=16, tile_n=16, mask_type="old")
    sel = refattn.select(q, k, "psa", **common, use_sim_mask=True, sim_thresholds=(2, 2, 2))
    lv = sel.extras["levels"]
    assert set(np.unique(lv)) <= {0, 1}                  # cap 1 everywhere (cos never > 2)
    n_text = -(-txt // 16)
    assert (lv[..., -n_text:] == 1).all() and sel.forced[..., -n_text:].all()
    np.testing.assert_array_equal(sel.mask.to_dense(), lv > 0)
    full = refattn.select(q, k, "psa", **common, ratios=((1, 0.0, 1.0),))
    assert (full.extras["levels"] == 1).all()
    mod, fn = full.extras["attention"].rsplit(".", 1)
    assert getattr(__import__(mod, fromlist=[fn]), fn) is psa.attention
    o = psa.attention(q, k, v, full)                      # reorder, attend, restore
    o_ref, _ = attention_forward(q, k, v, None, False)
    np.testing.assert_allclose(o, o_ref, atol=1e-12)


def test_select_newtype_extras_and_boundary():
    rng = np.random.default_rng(2)
    q, k, v = structured_qkv(rng, 1, 2, 2, 256, 256, 32)
    sel = refattn.select(q, k, "psa", v=v, causal=False, block_q=32, block_k=32, seed=3)
    nt = sel.extras["newtype"]
    assert nt.shape == (1, 2, 8, 8 + 5) and ((nt == -1).sum(-1) >= 4).all()
    kept = sel.extras["levels"] > 0
    P = sel.scores.scores
    assert (np.where(kept, P, np.inf).min(-1) == sel.boundary).all()
    sel2 = refattn.select(q, k, "psa", v=v, causal=False, block_q=32, block_k=32, seed=3)
    np.testing.assert_array_equal(sel.extras["levels"], sel2.extras["levels"])


# ------------------------------------------------------------- pyramid attention
@pytest.mark.parametrize("causal", [False, True])
def test_pyramid_level1_is_block_sparse_attention(causal):
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 2, 4, 2, 70, 100, 16)
    lv = (rng.random((2, 4, 5, 4)) < 0.6).astype(int)
    o, l = pyramid_attention_forward(q, k, v, lv, 16, 32, causal)
    m = refattn.BlockMask(lv > 0, block_q=16, block_k=32, q_len=70, k_len=100)
    o2, l2 = attention_forward(q, k, v, m, causal)
    np.testing.assert_allclose(o, o2, atol=1e-12)
    np.testing.assert_array_equal(np.isfinite(l), np.isfinite(l2))
    np.testing.assert_allclose(l[np.isfinite(l)], l2[np.isfinite(l2)], atol=1e-12)


@pytest.mark.parametrize("level", [2, 4, 8])
def test_pyramid_pooled_level_is_attention_to_repeated_means(level):
    rng = np.random.default_rng(4)
    q, k, v = random_qkv(rng, 1, 2, 1, 40, 100, 16)       # 100 keys: padded to 128
    o, l = pyramid_attention_forward(q, k, v, np.full((3, 4), level), 16, 32, False)
    kp = np.repeat(pooled_kv(k, 32, level), level, axis=2)
    vp = np.repeat(pooled_kv(v, 32, level), level, axis=2)
    o2, l2 = attention_forward(q, kp, vp, None, False, 0.25)
    np.testing.assert_allclose(o, o2, atol=1e-12)
    np.testing.assert_allclose(l, l2, atol=1e-12)


def test_pyramid_causal_group_visibility_and_empty_rows():
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 1, 1, 1, 8, 8, 4)
    o, l = pyramid_attention_forward(q, k, v, np.full((1, 1), 4), 8, 8, True)
    # query i sees group [0,4) iff 3 <= i, group [4,8) iff 7 <= i; rows 0..2 see nothing
    assert np.isneginf(l[0, 0, :3]).all() and (o[0, 0, :3] == 0).all()
    kb, vb = pooled_kv(k, 8, 4)[0, 0], pooled_kv(v, 8, 4)[0, 0]
    np.testing.assert_allclose(o[0, 0, 3:7], np.repeat(vb[:1], 4, 0), atol=1e-12)
    z = q[0, 0, 7].astype(np.float64) @ kb.T / 2 + np.log(4)
    np.testing.assert_allclose(l[0, 0, 7], np.log(np.exp(z).sum()), atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_numba_backend_through_public_function(causal):
    rng = np.random.default_rng(6)
    q, k, v = structured_qkv(rng, 1, 4, 2, 96, 96, 32)
    lv = rng.choice([0, 1, 2, 4, 8], size=(1, 4, 3, 3))
    a = pyramid_attention(q, k, v, lv, block_q=32, block_k=32, causal=causal, return_lse=True)
    b = pyramid_attention(q, k, v, lv, block_q=32, block_k=32, causal=causal, return_lse=True,
                          backend="numba")
    np.testing.assert_allclose(b[0], a[0], atol=2e-6)
    np.testing.assert_allclose(b[1], a[1], atol=2e-6)


def test_errors():
    q, k, v = random_qkv(np.random.default_rng(0), 1, 2, 1, 32, 32, 8)
    with pytest.raises(InputError, match="divisor of block_k"):
        pyramid_attention_forward(q, k, v, np.full((2, 3), 8), 16, 12)
    with pytest.raises(InputError, match="levels"):
        pyramid_attention_forward(q, k, v, np.ones((3, 2), int), 16, 16)
    with pytest.raises(InputError, match="use_sim_mask"):
        refattn.select(q, k, "psa", use_sim_mask=True)
    with pytest.raises(InputError, match="mode"):
        refattn.select(q, k, "psa", mode="energy")
    with pytest.raises(InputError, match="grid"):
        refattn.select(q, k, "psa", rearrange="gilbert")
    with pytest.raises(InputError, match="offsets_q"):
        refattn.select(q, k, "psa", block_q=16, block_k=16, tile_n=16, offsets_q=np.array([0, 99, 1, 2]))
    with pytest.raises(InputError, match="ratios"):
        refattn.select(q, k, "psa", ratios=((1, 0.0, 1.5),))
