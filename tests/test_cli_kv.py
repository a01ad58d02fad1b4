from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from refattn import io
from refattn.cli import cli
from refattn.data import synthetic


def test_kv_command_runs_the_decode_simulator(tmp_path):
    q, k, v = synthetic(1, 4, 2, 128, 16, seed=0)
    qd, kd, vd = synthetic(1, 4, 2, 4, 16, seed=1)
    io.save(str(tmp_path / "pre.npz"), {"q": q, "k": k, "v": v})
    io.save(str(tmp_path / "dec.npz"), {"q": qd, "k": kd, "v": vd})
    r = CliRunner().invoke(cli, ["kv", "snapkv", str(tmp_path / "pre.npz"), "--budget", "48",
                                 "--decode", str(tmp_path / "dec.npz"), "--json",
                                 "-o", str(tmp_path / "kept.npz")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert len(res["rows"]) == 4
    assert all(len(row) == 48 for row in res["kept"][0])
    kept = np.load(tmp_path / "kept.npz")["kept"]
    assert kept.shape[:2] == (1, 4) and (kept[..., :48] >= 0).all()
    # the same method, a larger budget: recall of attention mass does not fall
    r2 = CliRunner().invoke(cli, ["kv", "snapkv", str(tmp_path / "pre.npz"), "--budget", "96",
                                  "--decode", str(tmp_path / "dec.npz"), "--json"])
    res2 = json.loads(r2.stdout)
    assert np.mean([x["mass_recall"] for x in res2["rows"]]) >= np.mean([x["mass_recall"] for x in res["rows"]])


def test_kv_command_bad_input_exits_2(tmp_path):
    q, k, v = synthetic(1, 2, 1, 32, 8, seed=0)
    io.save(str(tmp_path / "pre.npz"), {"q": q, "k": k, "v": v})
    r = CliRunner().invoke(cli, ["kv", "moba", str(tmp_path / "pre.npz"), "--budget", "8"])
    assert r.exit_code == 2 and "not a KV-cache method" in r.output
    r = CliRunner().invoke(cli, ["kv", "snapkv", str(tmp_path / "pre.npz"), "--budget", "x"])
    assert r.exit_code == 2
    out = tmp_path / "never.npz"
    r = CliRunner().invoke(cli, ["kv", "nope", str(tmp_path / "pre.npz"), "--budget", "8", "-o", str(out)])
    assert r.exit_code == 2 and not out.exists()


def test_kv_decode_last_runs_the_simulator_on_the_shipped_sample():
    r = CliRunner().invoke(cli, ["kv", "streamingllm", "@sample", "--budget", "256",
                                 "--decode-last", "4", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [row["position"] for row in res["rows"]] == [2044, 2045, 2046, 2047]
    assert all(0 < row["mass_recall"] <= 1 for row in res["rows"])
    r = CliRunner().invoke(cli, ["kv", "streamingllm", "@sample", "--budget", "256",
                                 "--decode-last", "0"])
    assert r.exit_code == 2
