"""The ``refattn`` command line, through click's CliRunner."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from refattn import BlockMask, cli, io
from refattn.core.blockmask import legal_blocks
from refattn.data import synthetic


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def qkv_file(tmp_path):
    q, k, v = synthetic(q_heads=2, kv_heads=1, seq_len=256, head_dim=32, seed=0)
    return str(io.save(tmp_path / "in.npz", {"q": q, "k": k, "v": v},
                       {"layout": "bhsd", "causal": True}))


def _run(runner: CliRunner, *args: str):
    return runner.invoke(cli.cli, list(args), catch_exceptions=False)


def test_info(runner, tmp_path, qkv_file):
    r = _run(runner, "info", "@sample")
    assert r.exit_code == 0, r.output
    assert "hsd (stated by the file" in r.output
    assert "[1, 3, 2048, 64]" in r.output and "GQA group 3" in r.output
    x = np.zeros((1, 2, 4, 8), np.float32)
    x[0, 1, 2, 3] = np.nan
    io.save(tmp_path / "nan.npz", {"q": x, "k": x[:, :1], "v": x[:, :1]})
    r = _run(runner, "info", str(tmp_path / "nan.npz"))
    assert r.exit_code == 0
    assert "1 NaN, 0 Inf" in r.output
    assert "layout not stated by the file; assuming bhsd" in r.output


def test_attend_then_check(runner, tmp_path, qkv_file):
    out = str(tmp_path / "out.npz")
    r = _run(runner, "attend", qkv_file, "-o", out)
    assert r.exit_code == 0, r.output
    d = io.load(out, layout=None, require=("out", "lse"))
    assert d["out"].shape == (1, 2, 256, 32) and d["lse"].shape == (1, 2, 256)
    assert d["meta"]["causal"] is True                  # taken from the input's metadata
    r = _run(runner, "check", qkv_file, out)
    assert r.exit_code == 0, r.output
    assert r.output.rstrip().endswith("OK")
    # the candidate computed in float32 precision passes; a perturbed one fails
    o = d["out"].astype(np.float32)
    io.save(tmp_path / "f32.npz", {"out": o, "lse": d["lse"]}, d["meta"])
    assert _run(runner, "check", qkv_file, str(tmp_path / "f32.npz")).exit_code == 0
    o = o.copy()
    o[0, 1, 100, 3] += 1e-3
    io.save(tmp_path / "bad.npz", {"out": o}, d["meta"])
    r = _run(runner, "check", qkv_file, str(tmp_path / "bad.npz"), "--json")
    assert r.exit_code == 1
    rep = json.loads(r.stdout)
    assert rep["ok"] is False and rep["settings"]["causal"] is True
    # checked against the non-causal reference, the causal output is wrong
    assert _run(runner, "check", qkv_file, out, "--no-causal").exit_code == 1


def test_attend_with_mask(runner, tmp_path, qkv_file):
    m = BlockMask(np.tril(np.ones((4, 4), bool)) & ~np.eye(4, k=-2, dtype=bool), block_q=64,
                  block_k=64, q_len=256, k_len=256)
    io.save_mask(tmp_path / "m.npz", m)
    out = str(tmp_path / "out.safetensors")
    r = _run(runner, "attend", qkv_file, "--mask", str(tmp_path / "m.npz"), "-o", out)
    assert r.exit_code == 0, r.output
    assert _run(runner, "check", qkv_file, out, "--mask", str(tmp_path / "m.npz")).exit_code == 0
    assert _run(runner, "check", qkv_file, out).exit_code == 1   # dense reference differs


@pytest.mark.parametrize("args", [
    ("attend", "{dir}/missing.npz", "-o", "{dir}/o.npz"),
    ("attend", "{qk}", "-o", "{dir}/o.npz"),                       # v missing
    ("attend", "{in}", "-o", "{dir}/o.txt"),                       # bad suffix
    ("attend", "{in}", "--layout", "hsd", "-o", "{dir}/o.npz"),    # wrong rank for hsd
    ("attend", "{in}", "--scale", "-1", "-o", "{dir}/o.npz"),
    ("select", "no-such-method", "{in}", "-o", "{dir}/o.npz"),
    ("select", "moba", "{in}", "-p", "topk", "-o", "{dir}/o.npz"),  # not NAME=VALUE
    ("select", "moba", "{in}", "-p", "nope=1", "-o", "{dir}/o.npz"),
    ("check", "{in}", "{in}"),                                     # nothing to compare
    ("eval", "{in}", "--methods", "moba", "-p", "xattention.stride=4"),
])
def test_bad_input_exit_2_and_no_output(runner, tmp_path, qkv_file, args):
    x = np.zeros((1, 1, 4, 8), np.float32)
    qk = str(io.save(tmp_path / "qk.npz", {"q": x, "k": x}))
    sub = {"dir": str(tmp_path), "in": qkv_file, "qk": qk}
    before = set(os.listdir(tmp_path))
    r = _run(runner, *[a.format(**sub) for a in args])
    assert r.exit_code == 2, r.output
    assert "error" in r.output.lower()
    assert set(os.listdir(tmp_path)) == before          # nothing written, no temp files


def test_methods_json(runner):
    r = _run(runner, "methods", "--json")
    assert r.exit_code == 0
    found = json.loads(r.stdout)
    assert "moba" in found
    assert found["moba"]["kind"] == "llm-prefill" and "topk" in found["moba"]["params"]
    r = _run(runner, "methods", "--kind", "llm-prefill")
    assert r.exit_code == 0 and "moba" in r.output


def test_select_and_check_masks(runner, tmp_path, qkv_file):
    sel = str(tmp_path / "sel.npz")
    r = _run(runner, "select", "moba", qkv_file, "-p", "block_size=64", "-p", "topk=2", "-o", sel)
    assert r.exit_code == 0, r.output
    s = io.load_selection(sel)
    assert s.method == "moba" and s.params["topk"] == 2 and s.mask.block_k == 64
    assert _run(runner, "check", sel, sel).exit_code == 0
    # a candidate as a bare boolean array (geometry from REF) that drops every block
    io.save(tmp_path / "empty.npz", {"mask": np.zeros_like(s.mask.mask)})
    r = _run(runner, "check", sel, str(tmp_path / "empty.npz"), "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout)["reports"][0]["stats"]["missing_in_candidate"] > 0


def test_baseline_masks_match_budget():
    rng = np.random.default_rng(0)
    legal = legal_blocks(100, 100, 10, 10, True)
    m = BlockMask(rng.random((1, 2, 10, 10)) < 0.4, block_q=10, block_k=10, q_len=100, k_len=100)
    from refattn.evaluation import baseline_masks

    base = baseline_masks(m, 2, 1, causal=True, seed=1)
    want = (m.mask & legal).sum(-1)
    for name, b in base.items():
        assert np.array_equal((b.mask & legal).sum(-1), want), name
        assert not (b.mask & ~legal).any()
    win = base["causal-window"].mask
    for h in range(2):
        for i in range(10):
            n = want[0, h, i]
            assert np.array_equal(np.nonzero(win[0, h, i])[0], np.arange(i - n + 1, i + 1))


def test_eval_json(runner, qkv_file):
    r = _run(runner, "eval", qkv_file, "--methods", "moba", "-p", "moba.block_size=64",
             "-p", "moba.topk=2", "--per-head", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["causal"] is True and not res["skipped"]
    rows = {(x["method"], x["head"]): x for x in res["results"]}
    assert set(rows) == {(m, h) for m in ("moba", "random@moba", "causal-window@moba")
                         for h in ("all", 0, 1)}
    for key, row in rows.items():
        assert 0 < row["density"] <= 1 and 0 <= row["recall"] <= 1, key
    # the window baseline has the same block budget, hence the same FLOPs
    assert rows[("causal-window@moba", "all")]["flops_saved"] == pytest.approx(
        rows[("moba", "all")]["flops_saved"])


def test_demo(runner, monkeypatch):
    import refattn.cli_demo

    monkeypatch.setattr(refattn.cli_demo, "DEMO_BUDGET_S", 0.0)   # simple masks only: keep the test fast
    r = _run(runner, "demo", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["sample"]["q"] == [1, 3, 2048, 64]
    rows = {x["method"]: x for x in res["results"]}
    assert rows["dense-causal"]["recall"] == pytest.approx(1.0)
    assert rows["dense-causal"]["output_error"] == pytest.approx(0.0, abs=1e-12)
    sl, rnd = rows["sink+local(1+3 blocks)"], rows["random@sink+local"]
    assert sl["recall"] > rnd["recall"] + 0.2          # real attention has structure
    assert all("time budget" in s["reason"] for s in res["skipped"])
