"""``refattn importance`` end to end: each method on saved arrays, output files, bad input
exits 2 without writing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import refattn.cli as cli_module
from refattn import io
from refattn.cli import cli
from refattn.cli_importance import add_importance_command
from refattn.importance import vflowopt as vf

if "importance" not in cli.commands:  # until refattn/cli.py wires the sub-command
    add_importance_command(cli, cli_module)


def _invoke(*args):
    return CliRunner().invoke(cli, ["importance", *map(str, args)])


def test_blockrank_and_rsq(tmp_path):
    rng = np.random.default_rng(0)
    segs = [6, 5, 7, 4, 5]
    S = sum(segs)
    q, k = rng.standard_normal((1, 2, S, 16)), rng.standard_normal((1, 1, S, 16))
    u = rng.standard_normal(16) * 2
    k[:, :, 11:18] += u                       # document 1 (segment 2) answers the query
    q[:, :, -5:] += u
    io.save(str(tmp_path / "p.npz"), {"q": q, "k": k})
    out = tmp_path / "br.npz"
    r = _invoke("blockrank", tmp_path / "p.npz", "-p", "segments=[6,5,7,4,5]", "--json", "-o", out)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["ranking"][0][0] == 1 and sum(res["score"][0]) == pytest.approx(1.0)
    z = np.load(out)
    assert z["ranking"][0, 0] == 1 and z["position_ids"].shape == (S,)
    out = tmp_path / "rsq.npz"
    r = _invoke("rsq", tmp_path / "p.npz", "-p", "keep_ratio=0.5", "-o", out)
    assert r.exit_code == 0, r.output
    z = np.load(out)
    assert z["weights"].shape == (1, S) and (z["kept"] >= 0).sum() == int(np.ceil(S / 2))


def test_focus_and_vflowopt(tmp_path):
    rng = np.random.default_rng(1)
    L = 10
    arrs = {n: rng.standard_normal((2, L, 16)) for n in ("q0", "k0", "q1", "k1")}
    arrs["positions"] = np.arange(L) * 2
    io.save(str(tmp_path / "f.npz"), arrs)
    r = _invoke("focus", tmp_path / "f.npz", "-p", "avg_dec=2", "--json", "-o", tmp_path / "fo.npz")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["K"] == 3 and res["evict"]
    assert np.load(tmp_path / "fo.npz")["keep"].dtype == bool

    x = rng.standard_normal((1, 2, 81, 81)) * 2
    p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    feats = rng.standard_normal((1, 81, 4))
    pix = rng.uniform(-1, 1, (1, 3, 126, 126)).astype(np.float32)
    io.save(str(tmp_path / "v.npz"), {"attn": p, "features": feats, "pixel_values": pix})
    out = tmp_path / "vo.npz"
    r = _invoke("vflowopt", tmp_path / "v.npz", "-p", "t=1.0", "-p", "vit_r=0.5", "-p", "vit_m=3",
                "-p", "alpha_v=0.5", "--json", "-o", out)
    assert r.exit_code == 0, r.output
    z = np.load(out)
    # a plain grid (no anyres layout): the official plain top-k, nothing recycled
    kept = vf.select_topk(vf.importance_map(p, vf.patch_entropy(pix), t=1.0, alpha_v=0.5)[0],
                          0.5)
    assert kept.size == 81 - round(81 * 0.5)
    np.testing.assert_array_equal(z["kept"][0], kept)
    np.testing.assert_allclose(z["features"][0], feats[0][kept])
    assert json.loads(r.stdout)["recycled_groups"] == [0]
    assert z["representatives"].size == 0


def test_bad_input_exits_2(tmp_path):
    rng = np.random.default_rng(2)
    io.save(str(tmp_path / "p.npz"), {"q": rng.standard_normal((1, 1, 8, 4)),
                                      "k": rng.standard_normal((1, 1, 8, 4))})
    out = tmp_path / "never.npz"
    for args in (["nope", tmp_path / "p.npz"],
                 ["blockrank", tmp_path / "p.npz"],                       # no segments
                 ["vflowopt", tmp_path / "p.npz"],                        # no attn
                 ["focus", tmp_path / "p.npz"],
                 ["rsq", tmp_path / "p.npz", "-p", "bogus=1"]):
        r = _invoke(*args, "-o", out)
        assert r.exit_code == 2, (args, r.output)
        assert not out.exists()
