import json

import numpy as np
import pytest
from conformance import load, vector_params
from kv_util import assert_same_keep, random_qkv

import refattn
from refattn.core.errors import InputError
from refattn.kvcache import snapkv
from refattn.kvcache.snapkv import SnapKVParams, pool1d, snapkv_keep, snapkv_score


@pytest.mark.parametrize("path", vector_params("snapkv"))
def test_official_vectors(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    q, k = z["q"][None], z["k"][None]
    for run in p["runs"]:
        W, ks = run["window_size"], run["kernel_size"]
        prm = SnapKVParams(W, run["max_capacity_prompt"], ks, run["pooling"])
        vote, pooled = snapkv_score(q, k, W, ks, run["pooling"])
        np.testing.assert_allclose(vote[0], z[f"vote__w{W}"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            pooled[0], z[f"pooled__{run['pooling']}_k{ks}_w{W}"], rtol=1e-5, atol=1e-6
        )
        keep, _ = snapkv_keep(q, k, prm)
        ref = z["kept_positions__" + run["name"]]
        n = run["max_capacity_prompt"] - W
        np.testing.assert_array_equal(keep.indices[0, :, n:], ref[:, n:])  # the window
        assert_same_keep(
            keep.indices[0, :, :n],
            ref[:, :n],
            pooled[0],
            check_order=run["heads_with_tie_at_cut"] == 0,
        )
        if run["heads_with_tie_at_cut"] == 0:
            np.testing.assert_array_equal(keep.indices[0], ref)  # exact top-k order


def test_pooling_matches_definition():
    x = np.array([[1.0, 5.0, 2.0, 0.0, 3.0]])
    np.testing.assert_allclose(pool1d(x, 3, "avgpool"), [[6 / 3, 8 / 3, 7 / 3, 5 / 3, 3 / 3]])
    np.testing.assert_allclose(pool1d(x, 3, "maxpool"), [[5, 5, 5, 3, 3]])


def test_short_prompt_keeps_everything_and_window_is_kept():
    q, k, v = random_qkv(3, L=40)
    keep, pooled = snapkv_keep(q, k, SnapKVParams(window_size=8, max_capacity_prompt=41))
    assert pooled is None and keep.counts.min() == 40
    keep, pooled = snapkv_keep(q, k, SnapKVParams(window_size=8, max_capacity_prompt=20))
    assert keep.counts.tolist() == [[20] * 4]
    assert (keep.indices[..., 12:] == np.arange(32, 40)).all()
    # every kept prefix token scores at least as high as every dropped one
    for h in range(4):
        kept = keep.indices[0, h, :12]
        dropped = np.setdiff1d(np.arange(32), kept)
        assert pooled[0, h, kept].min() >= pooled[0, h, dropped].max()


def test_kv_head_mode_is_group_mean():
    q, k, v = random_qkv(4, Hq=4, Hkv=2, L=48)
    _, pq = snapkv_score(q, k, 8, 5, "avgpool", "query")
    _, pk = snapkv_score(q, k, 8, 5, "avgpool", "kv")
    np.testing.assert_allclose(pk, pq.reshape(1, 2, 2, -1).mean(2))
    keep, _ = snapkv_keep(q, k, SnapKVParams(8, 24, 5, "avgpool", "kv"))
    assert keep.head_kind == "kv" and keep.shape == (1, 2)


def test_selection_runs_in_attention():
    q, k, v = random_qkv(5, L=48)
    sel = snapkv.select(q, k, v, SnapKVParams(window_size=8, max_capacity_prompt=24), causal=True)
    ks = sel.extras["keepset"]
    out = refattn.attention(q[:, :, -1:], k, v, mask=ks.with_q_len(1).expand_heads(4))
    full = refattn.attention(q[:, :, -1:], k, v)
    assert out.shape == full.shape and not np.allclose(out, full)
    assert sel.boundary.shape == (1, 4) and sel.scores.shape == (1, 4, 1, 48)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"kernel_size": 4}, "odd"),
        ({"pooling": "mean"}, "pooling"),
        ({"window_size": 64, "max_capacity_prompt": 64}, "max_capacity"),
        ({"head_mode": "x"}, "head_mode"),
    ],
)
def test_bad_params(kw, msg):
    with pytest.raises(InputError, match=msg):
        SnapKVParams(**kw).validate()
