"""STA: the clamp window rule per axis (including windows wider than the canvas and even
windows), per-head token masks against a coordinate-by-coordinate reading of the rule with
text, the permuted block mask against the token mask, the offline window search, errors."""
from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.core.errors import InputError
from refattn.core.video_grid import VideoGrid
from refattn.reference.attention import attention_forward
from refattn.testing import structured_qkv
from refattn.video.sta import axis_window, search_windows


def test_axis_window_clamp():
    # n = 6 tiles, k = 3: interior tiles see +-1, edge tiles see the 3 nearest
    w = axis_window(6, 3)
    assert w[0].nonzero()[0].tolist() == [0, 1, 2] and w[3].nonzero()[0].tolist() == [2, 3, 4]
    assert w[5].nonzero()[0].tolist() == [3, 4, 5]
    # even k behaves as k + 1
    np.testing.assert_array_equal(axis_window(6, 2), axis_window(6, 3))
    # window wider than the canvas: the whole axis (torch.clamp and Triton clamp_int agree)
    assert axis_window(3, 7).all() and axis_window(1, 1).all()
    # the Triton lower-bound convention gives the same mask
    n, k = 4, 6
    r = k // 2
    a = np.arange(n)
    lower = np.where(r > n - 1 - r, r, np.clip(a, r, n - 1 - r))
    np.testing.assert_array_equal(np.abs(lower[:, None] - a[None]) <= r, axis_window(n, k))


def brute_sta(grid: VideoGrid, tile, window) -> np.ndarray:
    """bool [L, L] from token coordinates: tile centres clamped per axis; text dense."""
    L = grid.seq_len
    out = np.ones((L, L), bool)
    vid = np.arange(grid.video_offset, grid.video_offset + grid.video_tokens)
    t, h, w = grid.coords(vid)
    coords = np.stack([t // tile[0], h // tile[1], w // tile[2]], 1)
    n = np.array(grid.shape) // np.array(tile)
    for qi, a in zip(vid, coords, strict=True):
        ok = np.ones(len(vid), bool)
        for ax in range(3):
            r = window[ax] // 2
            lo, hi = r, n[ax] - 1 - r
            c = hi if lo > hi else min(max(a[ax], lo), hi)
            ok &= np.abs(c - coords[:, ax]) <= r
        out[qi, vid] = ok
    return out


@pytest.mark.parametrize("text", [0, 7])
def test_token_mask_matches_rule(text):
    grid = VideoGrid(4, 6, 8, text_tokens=text)
    tile = (2, 2, 2)
    rng = np.random.default_rng(0)
    q, k, v = structured_qkv(rng, 1, 3, 1, grid.seq_len, grid.seq_len, 8)
    windows = [(1, 1, 1), (2, 3, 3), (3, 9, 2)]
    sel = refattn.select(q, k, "sta", causal=False, grid=grid.shape, text_tokens=text, tile=tile,
                         window=windows)
    tm = sel.extras["token_mask"].to_token_mask()[0]
    for h, w in enumerate(windows):
        np.testing.assert_array_equal(tm[h], brute_sta(grid, tile, w), err_msg=str(w))
    # the tile-major block mask is the same selection: permute, block-sparse, unpermute
    perm = sel.extras["perm"]
    o_perm = refattn.attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], mask=sel.mask)
    o = refattn.attention(q, k, v, mask=sel)
    np.testing.assert_allclose(o[:, :, perm], o_perm, rtol=0, atol=1e-12)
    # one window for all heads broadcasts
    one = refattn.select(q, k, "sta", causal=False, grid=grid.shape, text_tokens=text, tile=tile,
                         window=(2, 3, 3))
    np.testing.assert_array_equal(one.extras["token_mask"].to_token_mask()[0, 0], tm[1])


def test_window_search():
    grid, tile = VideoGrid(4, 4, 6, text_tokens=5), (2, 2, 2)
    rng = np.random.default_rng(1)
    q, k, v = structured_qkv(rng, 2, 2, 1, grid.seq_len, grid.seq_len, 16)
    cands = [(1, 1, 1), (2, 1, 3), (1, 3, 1), (3, 3, 5), (2, 2, 3)]   # last two cover everything
    r = search_windows(q, k, v, cands, grid.shape, text_tokens=5, tile=tile)
    dense, _ = attention_forward(q, k, v, None, False, None)
    for c, w in enumerate(cands):
        sel = refattn.select(q, k, "sta", causal=False, grid=grid.shape, text_tokens=5, tile=tile, window=w)
        o = refattn.attention(q, k, v, mask=sel)
        # per prompt and head rounded to 6 decimals (official), then the mean over prompts
        want = np.round(((o - dense) ** 2).mean(axis=(2, 3)), 6).mean(axis=0)
        np.testing.assert_allclose(r["errors"][:, c], want, rtol=1e-12)
        np.testing.assert_allclose(r["errors"][:, c], ((o - dense) ** 2).mean(axis=(0, 2, 3)),
                                   atol=1e-6)
    assert (r["errors"][:, 3] == 0).all() and (r["errors"][:, 4] == 0).all()
    assert (r["choice"] == 3).all()                                # first minimum on ties
    # without full-coverage candidates the lowest error wins, per head
    r2 = search_windows(q, k, v, cands[:3], grid.shape, text_tokens=5, tile=tile,
                        full_window=(3, 3, 5))
    np.testing.assert_array_equal(r2["choice"], np.argmin(r["errors"][:, :3], axis=1))
    np.testing.assert_array_equal(r2["windows"], np.asarray(cands)[r2["choice"]])
    sel = refattn.select(q, k, "sta", causal=False, grid=grid.shape, text_tokens=5, tile=tile,
                         window=r2["windows"])
    assert sel.extras["windows"].shape == (2, 3)


def test_parameter_errors():
    q = np.zeros((1, 2, 96, 4))
    ok = dict(grid=(4, 4, 6), tile=(2, 2, 2))
    with pytest.raises(InputError, match="causal"):
        refattn.select(q, q, "sta", causal=True, **ok)
    with pytest.raises(InputError, match="grid.W"):
        refattn.select(q, q, "sta", causal=False, grid=(4, 4, 6), tile=(2, 2, 4))
    with pytest.raises(InputError, match="window"):
        refattn.select(q, q, "sta", causal=False, window=(1, 0, 1), **ok)
    with pytest.raises(InputError, match="3 per-head windows for 2"):
        refattn.select(q, q, "sta", causal=False, window=[(1, 1, 1)] * 3, **ok)
    with pytest.raises(InputError, match="text_position"):
        refattn.select(q, q, "sta", causal=False, grid=(4, 4, 5), text_tokens=16,
                       text_position="first", tile=(2, 2, 5))
    with pytest.raises(InputError, match="candidates"):
        search_windows(q, q, q, [], (4, 4, 6), tile=(2, 2, 2))
