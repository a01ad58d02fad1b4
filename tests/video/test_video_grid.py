"""VideoGrid: row-major flattening, text placement, 1D/2D/3D partitions and STA tiles as exact
permutations (checked coordinate by coordinate against the spec's definitions), the VMoBA
layer cycle, the partition token mask, and parameter errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from conformance import load, vector_params

from refattn.core.errors import InputError
from refattn.core.permutation import apply_permutation, unpermute
from refattn.core.video_grid import PartitionTokenMask, VideoGrid, layer_partition_kind


def test_flattening_and_text_segments():
    g = VideoGrid(3, 4, 5, text_tokens=7)
    assert g.seq_len == 67 and g.video_tokens == 60 and g.frame_tokens == 20
    assert g.token_index(2, 3, 4) == 2 * 20 + 3 * 5 + 4
    assert g.text_slice == slice(60, 67) and g.video_slice == slice(0, 60)
    f = VideoGrid(3, 4, 5, text_tokens=7, text_position="first")
    assert f.token_index(0, 0, 0) == 7 and f.text_slice == slice(0, 7)
    t, h, w = f.coords(f.token_index([0, 2], [1, 3], [2, 4]))
    assert t.tolist() == [0, 2] and h.tolist() == [1, 3] and w.tolist() == [2, 4]
    assert (f.frame_of()[:7] == -1).all() and f.frame_of()[7 + 20] == 1
    with pytest.raises(InputError, match="text or out-of-range"):
        f.coords(3)


def _brute_order(grid: VideoGrid, kind: str, chunk) -> list[int]:
    """Reordered token list from the spec's definition (row-major over the stated axes)."""
    T, H, W = grid.shape
    idx = lambda t, h, w: grid.token_index(t, h, w).item()  # noqa: E731
    if kind == "2d":
        ch, cw = chunk
        return [idx(t, ih * ch + rh, iw * cw + rw)
                for ih, iw, t, rh, rw in itertools.product(range(H // ch), range(W // cw), range(T),
                                                          range(ch), range(cw))]
    ct, ch, cw = chunk
    return [idx(it * ct + rt, ih * ch + rh, iw * cw + rw)
            for it, ih, iw, rt, rh, rw in itertools.product(range(T // ct), range(H // ch), range(W // cw),
                                                            range(ct), range(ch), range(cw))]


@pytest.mark.parametrize("text,pos", [(0, "last"), (5, "last"), (5, "first")])
@pytest.mark.parametrize("kind,chunk", [("2d", (2, 3)), ("3d", (2, 2, 3)), ("3d", (1, 1, 1))])
def test_2d_3d_partitions_match_definition(kind, chunk, text, pos):
    g = VideoGrid(4, 4, 6, text, pos)
    p = g.partition(kind, chunk)
    vid = p.perm[g.video_slice]
    assert vid.tolist() == _brute_order(g, kind, chunk)
    # text stays in place; blocks are contiguous and equal
    assert (p.perm[g.text_slice] == np.arange(g.seq_len)[g.text_slice]).all()
    size = int(np.prod(chunk)) * (g.T if kind == "2d" else 1)
    assert (p.block_lengths == size).all() and p.bounds[0] == g.video_offset
    # every block is one tube / cube: constant block coordinates
    t, h, w = g.coords(vid)
    blk = p.block_of_position()[g.video_slice]
    if kind == "2d":
        key = (h // chunk[0]) * (g.W // chunk[1]) + w // chunk[1]
    else:
        key = ((t // chunk[0]) * (g.H // chunk[1]) + h // chunk[1]) * (g.W // chunk[2]) + w // chunk[2]
    assert (key == blk).all()
    assert (p.block_of_token()[p.perm] == p.block_of_position()).all()


def test_1d_partition_ragged_and_float():
    g = VideoGrid(5, 2, 3)
    p = g.partition_1d(2)
    assert (p.perm == np.arange(30)).all()
    assert p.bounds.tolist() == [0, 12, 24, 30]             # last block 1 frame (ragged kept)
    q = g.partition_1d(1.5)                                   # int(1.5 * 6) = 9 tokens
    assert q.bounds.tolist() == [0, 9, 18, 27, 30]
    with pytest.raises(InputError, match="less than one token"):
        g.partition_1d(0.1)
    # the official int(chunk_size * H * W) multiplies left to right: (1.15 * 30) * 52 =
    # 1794.0 -> 1794, where 1.15 * (30 * 52) = 1793.9999999999998 -> 1793
    assert VideoGrid(4, 30, 52).partition_1d(1.15).bounds[1] == 1794
    assert VideoGrid(2, 6, 30).partition_1d(0.15).bounds[1] == int(0.15 * 6 * 30)


@pytest.mark.parametrize("kind,chunk,axis", [("2d", (3, 2), "H"), ("2d", (2, 4), "W"),
                                              ("3d", (2, 2, 3), "T"), ("3d", (1, 3, 3), "H")])
def test_ragged_2d_3d_rejected(kind, chunk, axis):
    with pytest.raises(InputError, match=f"grid.{axis}"):
        VideoGrid(3, 4, 6).partition(kind, chunk)


def test_round_trip_exact():
    rng = np.random.default_rng(0)
    g = VideoGrid(4, 6, 6, text_tokens=3)
    x = rng.standard_normal((2, 3, g.seq_len, 5))
    for p in (g.partition("1d", 1), g.partition("2d", (3, 2)), g.partition("3d", (2, 3, 3)),
              g.sta_tiles((2, 3, 2))):
        y = p.permute(x, axis=2)
        assert np.array_equal(y, apply_permutation(x, p.perm, axis=2))
        assert np.array_equal(p.unpermute(y, axis=2), x)
        assert np.array_equal(unpermute(y, p.perm, axis=2), x)
        assert (p.perm[p.inv_perm] == np.arange(g.seq_len)).all()


def test_sta_tiles_equal_3d_order():
    g = VideoGrid(6, 8, 8)
    assert np.array_equal(g.sta_tiles((3, 4, 4)).perm, g.partition_3d(3, 4, 4).perm)
    assert g.sta_tiles((3, 4, 4)).block_grid == (2, 2, 2)


@pytest.mark.parametrize("path", vector_params("vmoba"))
def test_partitions_match_official(path):
    """``process_moba_input`` permutation and ``calc_chunks`` boundaries."""
    import json
    z = load(path)
    p = json.loads(str(z["params"][0]))
    for b, grid in enumerate(p["grids"]):
        sfx = f"_b{b}" if "perm_b0" in z else ""
        part = VideoGrid(*grid).partition(p["partition"], p["chunk_size"])
        assert np.array_equal(part.perm, z["perm" + sfx])
        assert np.array_equal(part.inv_perm, z["inv_perm" + sfx])
    if "perm_b0" not in z:
        assert np.array_equal(part.bounds, z["cu_chunk"])


def test_layer_cycle():
    assert [layer_partition_kind(i) for i in range(7)] == ["1d", "2d", "3d"] * 2 + ["1d"]
    assert [layer_partition_kind(i, 2, 1, 1) for i in range(5)] == ["1d", "1d", "2d", "3d", "1d"]
    # first_full_layer shifts the cycle (Python modulo stays non-negative)
    assert [layer_partition_kind(i, first_full_layer=1) for i in range(4)] == ["3d", "1d", "2d", "3d"]
    with pytest.raises(InputError, match="cycle length"):
        layer_partition_kind(0, 0, 0, 0)


def test_partition_token_mask_brute():
    rng = np.random.default_rng(1)
    g = VideoGrid(2, 4, 4, text_tokens=3)
    p = g.partition_3d(1, 2, 2)
    rows = rng.random((1, 2, g.seq_len, p.num_blocks)) < 0.3
    tm = PartitionTokenMask(p, rows, "token", text_dense=True)
    full = tm.to_token_mask()
    blk_tok = p.block_of_token()
    for h in range(2):
        for i in range(g.seq_len):
            for j in range(g.seq_len):
                if blk_tok[i] < 0 or blk_tok[j] < 0:
                    want = True
                else:
                    want = rows[0, h, p.inv_perm[i], blk_tok[j]]
                assert full[0, h, i, j] == want
    # chunked rows agree with the whole
    assert np.array_equal(tm.token_rows(0, 1, 2, 5, 20), full[0, 1:2, 5:20])
    tb = PartitionTokenMask(p, rows[:, :, :p.num_blocks], "block", text_dense=False)
    fb = tb.to_token_mask()
    assert not fb[:, :, g.text_slice].any() and not fb[:, :, :, g.text_slice].any()


def test_bad_grid_parameters():
    for bad in [(0, 2, 2), (2, -1, 2), (2.5, 2, 2)]:
        with pytest.raises(InputError, match="grid"):
            VideoGrid(*bad)
    with pytest.raises(InputError, match="text_position"):
        VideoGrid(1, 1, 1, 2, "middle")
    with pytest.raises(InputError, match="3 integers"):
        VideoGrid.from_params((1, 2))
    with pytest.raises(InputError, match="needs 60 tokens"):
        VideoGrid(3, 4, 5).check_seq_len(61)
