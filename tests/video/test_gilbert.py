"""PSA's Gilbert token order: the official vectors, curve properties, text handling, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conformance import load, vector_params

from refattn.core.errors import InputError
from refattn.core.permutation import apply_permutation, make_permutation, unpermute
from refattn.video._gilbert import gilbert3d, gilbert_coords, gilbert_order, psa_sequence_order

GILBERT = [p for p in vector_params("psa") if p.id is None or p.id.startswith("gilbert")]


@pytest.mark.parametrize("path", GILBERT)
def test_official_gilbert_vectors(path):
    z = load(path)
    p = json.loads(str(z["params"][0]))
    W, H, T, txt = p["width"], p["height"], p["depth"], p["text_length"]
    perm = gilbert_order((T, H, W))
    np.testing.assert_array_equal(perm, z["original_order2gilbert_order"])
    np.testing.assert_array_equal(np.argsort(perm), z["gilbert_order2original_order"])
    if "gilbert3d_coords" in z:
        np.testing.assert_array_equal(gilbert_coords(W, H, T), z["gilbert3d_coords"])
    if "rearranged_index" in z:
        seq = psa_sequence_order((T, H, W), txt, "first")
        np.testing.assert_array_equal(seq, z["rearranged_index"])
        # reversed_rearrange of the rearranged index restores arange
        restored = unpermute(seq[:, None], seq, axis=0)[:, 0]
        np.testing.assert_array_equal(restored, z["restored_index"])


@pytest.mark.parametrize("dims", [(4, 4, 4), (8, 6, 2), (16, 2, 2), (2, 2, 16), (6, 10, 4),
                                  (1, 1, 7), (7, 1, 1), (1, 5, 1), (5, 3, 4), (3, 7, 5)])
def test_curve_visits_every_cell_once_with_short_steps(dims):
    W, H, T = dims
    c = gilbert_coords(W, H, T)
    assert c.shape == (W * H * T, 3)
    assert (c.min(0) >= 0).all() and (c.max(0) < np.array([W, H, T])).all()
    raster = c[:, 0] + W * (c[:, 1] + H * c[:, 2])
    make_permutation(raster)                                   # each cell exactly once
    steps = np.abs(np.diff(c, axis=0)).sum(1)
    assert tuple(c[0]) == (0, 0, 0)
    if all(d % 2 == 0 for d in dims):
        assert (steps == 1).all()                              # even sizes: face neighbours
    else:
        assert steps.max() <= 3 and (steps >= 1).all()         # odd sizes: some diagonal steps


def test_order_is_row_major_index_of_curve_cells():
    T, H, W = 3, 4, 6
    perm = gilbert_order((T, H, W))
    t, h, w = np.unravel_index(perm, (T, H, W))
    c = gilbert_coords(W, H, T)
    np.testing.assert_array_equal(np.stack([w, h, t], 1), c)


@pytest.mark.parametrize("position", ["first", "last"])
def test_sequence_order_moves_text_to_the_end_and_round_trips(position):
    T, H, W, txt = 2, 4, 4, 5
    n = T * H * W
    perm = psa_sequence_order((T, H, W), txt, position)
    seq = np.arange(n + txt)
    is_text = (seq < txt) if position == "first" else (seq >= n)
    moved = perm[n:]
    assert is_text[moved].all() and np.array_equal(moved, np.sort(moved))
    x = np.random.default_rng(0).standard_normal((1, 2, n + txt, 3))
    np.testing.assert_array_equal(unpermute(apply_permutation(x, perm), perm), x)
    video = perm[:n] - (txt if position == "first" else 0)
    np.testing.assert_array_equal(video, gilbert_order((T, H, W)))


def test_errors():
    with pytest.raises(InputError, match="width"):
        list(gilbert3d(0, 2, 2))
    with pytest.raises(InputError, match="text_position"):
        psa_sequence_order((1, 2, 2), 3, "middle")
    with pytest.raises(InputError, match="text_tokens"):
        psa_sequence_order((1, 2, 2), -1)
