from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import refattn
from refattn.cli import cli
from refattn.core import InputError
from refattn.data.video import synthetic_video


def _probs(q, k, h, g):
    s = q[0, h].astype(np.float64) @ k[0, g].astype(np.float64).T / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_profiles_have_their_locality():
    T, H, W = 6, 8, 8
    q, k, v = synthetic_video((T, H, W), heads=3, head_dim=64, seed=1)
    t = np.repeat(np.arange(T), H * W)
    pos = np.tile(np.arange(H * W), T)
    same_frame = t[:, None] == t[None, :]
    same_place = pos[:, None] == pos[None, :]
    spatial, temporal = _probs(q, k, 0, 0), _probs(q, k, 1, 1)
    # spatial head: mass within the query's own frame far above the uniform 1/T
    assert (spatial * same_frame).sum(1).mean() > 3.0 / T
    # temporal head: mass on the same spatial place in other frames far above uniform
    assert (temporal * same_place).sum(1).mean() > 5.0 * T / (T * H * W)
    assert (temporal * same_place).sum(1).mean() > (spatial * same_place).sum(1).mean()


def test_text_tokens_gqa_and_determinism():
    a = synthetic_video((2, 4, 4), heads=4, kv_heads=2, head_dim=32, text_tokens=5,
                        text_position="first", seed=3)
    b = synthetic_video((2, 4, 4), heads=4, kv_heads=2, head_dim=32, text_tokens=5,
                        text_position="first", seed=3)
    assert a[0].shape == (1, 4, 37, 32) and a[1].shape == (1, 2, 37, 32)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(InputError, match="grid"):
        synthetic_video((2, 0, 4))
    with pytest.raises(InputError, match="GQA"):
        synthetic_video((2, 4, 4), heads=3, kv_heads=2)


def test_video_methods_beat_random_on_structured_video():
    grid = (6, 16, 16)
    q, k, v = synthetic_video(grid, heads=3, head_dim=64, seed=0)
    for name in ("vmoba", "adaspa", "pisa"):
        sel = refattn.select(q, k, name, v=v, causal=False, grid=grid)
        ev = refattn.evaluate(q, k, v, refattn.api.attention_mask_of(sel), causal=False)
        rng = np.random.default_rng(0)
        m = sel.mask.expand_heads(3)
        rand = m.like(rng.permuted(m.mask, axis=-1))   # same blocks per row, random places
        evr = refattn.evaluate(q, k, v, rand, causal=False)
        assert ev.overall["recall"] > evr.overall["recall"] + 0.05, name


def test_demo_json_includes_the_video_example():
    r = CliRunner().invoke(cli, ["demo", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["video"]["grid"] == [6, 16, 16]
    names = {row["method"] for row in d["video"]["results"]}
    assert {"vmoba", "psa", "pisa", "adaspa", "sta", "svg", "radial", "spargeattn"} <= names
