"""refattn.io: round trips (npz, safetensors, bf16), atomic writes, errors, layouts."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from refattn import BlockMask, InputError, io
from refattn.core.scores import BlockScores, Selection
from refattn.data import sample_path

SHARED_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "sample_qwen_s2048_L12.npz"


def _qkv(rng: np.random.Generator, dtype=np.float32):
    q = rng.standard_normal((2, 4, 9, 8)).astype(dtype)
    k = rng.standard_normal((2, 2, 11, 8)).astype(dtype)
    v = rng.standard_normal((2, 2, 11, 8)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_round_trip(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, dtype)
    lse = rng.standard_normal((2, 4, 9))
    meta = {"layout": "bhsd", "causal": True, "softmax_scale": 0.25, "note": "x",
            "blocks": [64, 128], "nested": {"a": 1}}
    path = io.save(tmp_path / f"a{suffix}", {"q": q, "k": k, "v": v, "lse": lse}, meta)
    d = io.load(path)
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert d[name].dtype == np.dtype(dtype)
        assert d[name].shape == x.shape
        # bit-exact, bf16 included
        assert np.array_equal(d[name].view(np.uint8), np.ascontiguousarray(x).view(np.uint8))
    assert np.array_equal(d["lse"], lse)
    assert d["meta"] == meta
    assert d["layout"] == "bhsd"


def test_bf16_npz_stored_as_uint16_with_tag(tmp_path):
    x = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3).astype(ml_dtypes.bfloat16)
    io.save(tmp_path / "b.npz", {"q": x, "k": x, "v": x})
    with np.load(tmp_path / "b.npz", allow_pickle=False) as z:  # what other tools see
        assert z["q"].dtype == np.uint16
        assert str(z["q__dtype"]) == "bfloat16"
    assert io.load(tmp_path / "b.npz")["q"].dtype == ml_dtypes.bfloat16


def test_bf16_safetensors_in_a_fresh_interpreter(tmp_path):
    # safetensors resolves "bfloat16" by name; io must make that work without the caller
    # having imported ml_dtypes first
    x = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4).astype(ml_dtypes.bfloat16)
    io.save(tmp_path / "b.safetensors", {"q": x, "k": x, "v": x})
    code = ("import sys; from refattn import io; "
            "d = io.load(sys.argv[1]); print(d['q'].dtype, float(d['q'].astype('float32').sum()))")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b.safetensors")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["bfloat16", "28.0"]


def test_npy_single_array(tmp_path):
    x = np.ones((3, 4), np.float32)
    io.save(tmp_path / "x.npy", {"x": x})
    d = io.load(tmp_path / "x.npy", require=())
    assert np.array_equal(d["array"], x)
    with pytest.raises(InputError, match="holds one array"):
        io.load(tmp_path / "x.npy")
    with pytest.raises(InputError, match="exactly one array"):
        io.save(tmp_path / "y.npy", {"a": x, "b": x})


def test_layouts(tmp_path):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng)
    io.save(tmp_path / "bshd.npz", {"q": q.transpose(0, 2, 1, 3), "k": k.transpose(0, 2, 1, 3),
                                    "v": v.transpose(0, 2, 1, 3)})
    d = io.load(tmp_path / "bshd.npz", layout="bshd")
    assert np.array_equal(d["q"], q) and np.array_equal(d["k"], k)
    io.save(tmp_path / "hsd.npz", {"q": q[0], "k": k[0], "v": v[0], "lse": q[0, :, :, 0]},
            {"layout": "HSD"})
    d = io.load(tmp_path / "hsd.npz", layout=None)  # the stated layout is used
    assert d["layout"] == "hsd" and d["q"].shape == (1,) + q.shape[1:]
    assert d["lse"].shape == (1, 4, 9)
    # a given layout that disagrees with the file's statement warns, then fails on rank
    with pytest.warns(io.LayoutWarning, match="states layout 'HSD'"):
        with pytest.raises(InputError, match="4-d"):
            io.load(tmp_path / "hsd.npz", layout="bhsd")
    with pytest.raises(InputError, match="layout"):
        io.load(tmp_path / "hsd.npz", layout="sbhd")


def test_no_meta_layout_means_bhsd_without_warning(tmp_path):
    q, k, v = _qkv(np.random.default_rng(2))
    io.save(tmp_path / "a.npz", {"q": q, "k": k, "v": v})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert io.load(tmp_path / "a.npz", layout=None)["layout"] == "bhsd"


@pytest.mark.parametrize("path", [SHARED_SAMPLE, None], ids=["shared", "packaged"])
def test_shared_hsd_sample(path):
    if path is None:
        path = Path(sample_path())
    elif not path.exists():
        pytest.skip(f"{path} not present")
    d = io.load(path, layout="hsd")
    assert d["q"].shape == (1, 3, 2048, 64) and d["q"].dtype == np.float32
    assert d["k"].shape == d["v"].shape == (1, 1, 2048, 64)
    assert d["meta"]["layout"] == "HSD" and d["meta"]["softmax_scale"] == 0.125
    assert d["token_ids"].shape == (2048,)
    with pytest.warns(io.LayoutWarning):
        with pytest.raises(InputError, match="states layout 'HSD'"):
            io.load(path)  # default "bhsd" is wrong for this file, and says so


def test_packaged_sample_equals_shared():
    if not SHARED_SAMPLE.exists():
        pytest.skip("shared data not present")
    a, b = io.load(sample_path(), layout="hsd"), io.load(SHARED_SAMPLE, layout="hsd")
    for n in ("q", "k", "v", "token_ids"):
        assert np.array_equal(a[n], b[n])


def test_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        io.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip file")
    with pytest.raises(InputError, match="not a readable .npz"):
        io.load(tmp_path / "junk.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(InputError, match="not a readable .safetensors"):
        io.load(tmp_path / "junk.safetensors")
    np.save(tmp_path / "arr.npy", np.zeros(3))
    os.replace(tmp_path / "arr.npy", tmp_path / "arr.npz")
    with pytest.raises(InputError, match="found a single .npy array"):
        io.load(tmp_path / "arr.npz", require=())
    with pytest.raises(InputError, match="ending in one of"):
        io.load(tmp_path / "a.txt")
    np.savez(tmp_path / "obj.npz", q=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="not a readable"):
        io.load(tmp_path / "obj.npz", require=())
    x = np.zeros((1, 1, 2, 4), np.float32)
    io.save(tmp_path / "qk.npz", {"q": x, "k": x})
    with pytest.raises(InputError, match=r"missing required array\(s\) \['v'\]"):
        io.load(tmp_path / "qk.npz")
    assert "v" not in io.load(tmp_path / "qk.npz", require=("q", "k"))
    io.save(tmp_path / "rank.npz", {"q": x[0], "k": x, "v": x})
    with pytest.raises(InputError, match="q: layout 'bhsd' needs a 4-d array"):
        io.load(tmp_path / "rank.npz")
    with pytest.raises(InputError, match="reserved"):
        io.save(tmp_path / "r.npz", {"meta": x})


def test_atomic_save_leaves_nothing_on_error(tmp_path, monkeypatch):
    target = tmp_path / "out.npz"
    with pytest.raises(InputError):
        io.save(target, {"x": np.array([object()], dtype=object)})
    with pytest.raises(InputError):
        io.save(tmp_path / "out.safetensors", {"x": np.array(["text"])})
    assert os.listdir(tmp_path) == []
    io.save(target, {"x": np.ones(3)})

    def failing_savez(f, **arrays):  # dies half-way through writing
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(io.np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        io.save(target, {"x": np.zeros(3)})
    monkeypatch.undo()
    # the old file is intact and no temporary file is left behind
    assert os.listdir(tmp_path) == ["out.npz"]
    assert np.array_equal(io.load(target, require=())["x"], np.ones(3))
    with pytest.raises(InputError, match="directory does not exist"):
        io.save(tmp_path / "nodir" / "a.npz", {"x": np.ones(3)})


def _selection(rng: np.random.Generator) -> Selection:
    scores = rng.random((1, 2, 3, 4))
    mask = BlockMask(scores > 0.5, block_q=4, block_k=4, q_len=10, k_len=13)
    return Selection(mask=mask, scores=BlockScores(scores, 4, 4, 10, 13),
                     boundary=np.full((1, 2, 3), 0.5), forced=np.zeros((1, 2, 3, 4), bool),
                     method="toy", params={"topk": 2, "tie": "low"},
                     extras={"perm": np.arange(10), "budgets": [1, 2], "obj": object()})


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_selection_round_trip(tmp_path, suffix):
    sel = _selection(np.random.default_rng(3))
    io.save_selection(tmp_path / f"s{suffix}", sel, {"source": "x"})
    back = io.load_selection(tmp_path / f"s{suffix}")
    assert back.mask == sel.mask
    assert np.array_equal(back.scores.scores, sel.scores.scores)
    assert np.array_equal(back.boundary, sel.boundary)
    assert np.array_equal(back.forced, sel.forced)
    assert back.method == "toy" and back.params == {"topk": 2, "tie": "low"}
    assert np.array_equal(back.extras["perm"], np.arange(10))
    assert back.extras["budgets"] == [1, 2]
    assert back.extras["obj"].startswith("<object")
    assert io.load_mask(tmp_path / f"s{suffix}") == sel.mask


def test_load_mask_from_foreign_files(tmp_path):
    m = BlockMask(np.tril(np.ones((3, 3), bool)), block_q=2, block_k=2, q_len=6, k_len=5)
    num, idx = m.to_indices()
    np.savez(tmp_path / "idx.npz", kv_num_blocks=num, kv_indices=idx, block_q=2, block_k=2,
             q_len=6, k_len=5, head_kind="q")
    assert io.load_mask(tmp_path / "idx.npz") == m
    np.savez(tmp_path / "bare.npz", mask=m.mask)
    with pytest.raises(InputError, match="geometry"):
        io.load_mask(tmp_path / "bare.npz")
    geo = dict(zip(io.MASK_GEOMETRY, m.geometry(), strict=True))
    assert io.load_mask(tmp_path / "bare.npz", geometry=geo) == m
    np.savez(tmp_path / "none.npz", x=np.zeros(3))
    with pytest.raises(InputError, match="no block mask"):
        io.load_mask(tmp_path / "none.npz")
    io.save_mask(tmp_path / "m.safetensors", m)
    assert io.load_mask(tmp_path / "m.safetensors") == m
