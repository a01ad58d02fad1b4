import numpy as np
import pytest
from kv_util import random_qkv

import refattn
from refattn.core.errors import InputError
from refattn.core.keepset import KeepSet
from refattn.kvcache import run_kv
from refattn.kvcache.simulate import COLUMNS, budget_params, parse_budget

T = 6


def _inputs(seed=41, L=48):
    q, k, v = random_qkv(seed, L=L + T)
    pre = (q[:, :, :L], k[:, :, :L], v[:, :, :L])
    dec = {"q": q[:, :, L:], "k": k[:, :, L:], "v": v[:, :, L:]}
    return pre, dec


@pytest.mark.parametrize(
    "method, params",
    [
        ("snapkv", {"window_size": 8, "max_capacity_prompt": 48}),
        ("kvpress", {"press": "knorm", "n_kept": 48}),
        ("caote", {"n_kept": 48}),
        ("h2o", {"hh_size": 100, "recent_size": 100}),
        ("h2o", {"variant": "mask_sim", "heavy_ratio": 1.0, "recent_ratio": 1.0}),
        ("vatp", {"mode": "h2o", "heavy_ratio": 1.0, "sink_len": 2}),
        ("streamingllm", {"start_size": 4, "recent_size": 1000}),
    ],
)
def test_no_eviction_is_exact(method, params):
    (q, k, v), dec = _inputs()
    r = run_kv(method, q, k, v, None, dec, **params)
    assert r["columns"] == list(COLUMNS) and len(r["rows"]) == T
    for row in r["rows"]:
        assert row["out_err_max"] < 1e-12 and abs(row["mass_recall"] - 1) < 1e-12
        assert row["kept_min"] == row["cache_len"]


def test_prefill_only_error_matches_attention_on_keepset():
    (q, k, v), dec = _inputs(42)
    r = run_kv("snapkv", q, k, v, 20, dec, window_size=8)
    assert [len(x) for x in r["kept"][0]] == [20] * 4
    for t, row in enumerate(r["rows"]):
        L = 48 + t + 1
        kept = [[np.concatenate([np.asarray(r["kept"][0][h]), np.arange(48, L)]) for h in range(4)]]
        ks = KeepSet.from_lists(kept, q_len=1, k_len=L)
        K = np.concatenate([k, dec["k"]], 2)[:, :, :L]
        V = np.concatenate([v, dec["v"]], 2)[:, :, :L]
        qt = dec["q"][:, :, t : t + 1]
        full = refattn.attention(qt, K, V, causal=True)
        part = refattn.attention(qt, K, V, mask=ks, causal=True)
        assert np.isclose(row["out_err_rel"], np.linalg.norm(part - full) / np.linalg.norm(full))
        assert row["kept_mean"] == 20 + t + 1


def test_streaming_methods_stay_within_budget():
    (q, k, v), dec = _inputs(43)
    r1 = run_kv("streamingllm", q, k, v, 16, dec, start_size=4)
    assert all(row["kept_max"] == 16 + 1 for row in r1["rows"])  # budget + the new token
    assert r1["kept_final"][0][0] == [0, 1, 2, 3] + list(range(54 - 12, 54))
    r = run_kv("h2o", q, k, v, 16, dec)
    assert all(row["kept_max"] == 17 for row in r["rows"])
    assert all(0 < row["mass_recall"] < 1 for row in r["rows"])
    r2 = run_kv("streamingllm", q, k, v, 16, dec, start_size=4, pos_shift=False)
    # same kept set, different positions: re-encoding changes the output
    assert r2["kept_final"] == r1["kept_final"]
    assert r2["rows"][-1]["mass_recall"] == r1["rows"][-1]["mass_recall"]
    assert abs(r2["rows"][-1]["out_err_rel"] - r1["rows"][-1]["out_err_rel"]) > 1e-6


def test_budget_mapping():
    assert budget_params("snapkv", 100, 1000, {})["max_capacity_prompt"] == 100
    p = budget_params("h2o", 0.2, 1000, {})
    assert int(p["heavy_ratio"] * 1000) == 100 and p["hh_size"] == 100
    p = budget_params("h2o", 31, 97, {"recent_size": 3})
    assert p["hh_size"] == 15 and p["recent_size"] == 3 and int(p["recent_ratio"] * 97) == 16
    assert budget_params("kvpress", 7, 50, {})["n_kept"] == 7


def test_errors():
    (q, k, v), dec = _inputs(44)
    with pytest.raises(InputError, match="unknown method"):
        run_kv("nope", q, k, v, 10)
    with pytest.raises(InputError, match="Sq == Sk"):
        run_kv("h2o", q[:, :, :10], k, v, 10)
    with pytest.raises(InputError, match="decode"):
        run_kv("h2o", q, k, v, 10, {"q": dec["q"], "k": dec["k"]})
    with pytest.raises(InputError, match="decode"):
        run_kv("h2o", q, k, v, 10, {"q": dec["q"][:, :2], "k": dec["k"], "v": dec["v"]})
    with pytest.raises(InputError, match="single_forward"):
        run_kv("h2o", q, k, v, 10, dec, variant="single_forward")
    with pytest.raises(InputError, match="budget"):
        run_kv("h2o", q, k, v, -3, dec)


def test_parse_budget():
    assert parse_budget("256") == 256 and isinstance(parse_budget("256"), int)
    assert parse_budget(" 0.25 ") == 0.25
    with pytest.raises(InputError, match="budget"):
        parse_budget("lots")
