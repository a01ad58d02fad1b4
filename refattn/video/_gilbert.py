"""The generalized Hilbert ("Gilbert") curve in 3-D, as PSA reorders video tokens with it.

Source: PSA, ``ziplab/Pyramid-Sparse-Attention@be122cfb7f32010682b1d70534670e5ef150a93d``,
``src/psa_triton/utils/gilbert3d.py`` (the ``gilbert3d`` generator of Jakub Cerveny,
BSD-2-Clause, 2018) and ``src/psa_triton/utils/rearranger.py`` (``GilbertRearranger``).

The curve visits every cell of a ``width x height x depth`` cuboid once, moving to a
face neighbour at almost every step (odd sizes force a few diagonal steps). It is built by
recursive subdivision of the cuboid, described by an origin and three edge vectors
``a`` (major axis), ``b`` and ``c``:

* a cuboid one cell thick in two directions is walked straight along the third;
* otherwise every edge is halved (``a2 = a // 2`` ...), and a halved edge of odd length
  (> 2 cells) is lengthened by one cell so that the sub-cuboids keep even sizes;
* then, by shape: a *wide* cuboid (``2w > 3h`` and ``2w > 3d``) is cut in two along ``a``;
  a cuboid with ``3h > 4d`` is cut in three without splitting ``d``; one with ``3d > 4h``
  in three without splitting ``h``; otherwise in five (splitting all three axes), each
  piece oriented so that the walk leaves one piece next to where the following one starts.

PSA's raster index of cell ``(x, y, z)`` is ``x + width*(y + height*z)`` with
``(width, height, depth) = (W, H, T)`` of the video grid, i.e. the row-major token index
``t*H*W + h*W + w`` of spec section 0. ``gilbert_order()`` returns, for each curve position
``p``, the raster index of the ``p``-th cell (the array the official code calls
``original_order2gilbert_order``), which is a permutation in refattn's convention
(``x_perm = x[perm]``).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Iterator

import numpy as np

from ..core.errors import InputError

Vec = tuple[int, int, int]


def _sgn(x: int) -> int:
    return (x > 0) - (x < 0)


def _add(*vs: Vec) -> Vec:
    return (sum(v[0] for v in vs), sum(v[1] for v in vs), sum(v[2] for v in vs))


def _neg(v: Vec) -> Vec:
    return (-v[0], -v[1], -v[2])


def _half(v: Vec) -> Vec:
    return (v[0] // 2, v[1] // 2, v[2] // 2)  # floor division, as the official code


def _length(v: Vec) -> int:
    return abs(v[0] + v[1] + v[2])  # edge vectors are axis-aligned: one non-zero entry


def _unit(v: Vec) -> Vec:
    return (_sgn(v[0]), _sgn(v[1]), _sgn(v[2]))


def _walk(o: Vec, a: Vec, b: Vec, c: Vec) -> Iterator[Vec]:
    """Cells of the cuboid at origin ``o`` with edges ``a`` (major), ``b``, ``c``, in curve order."""
    w, h, d = _length(a), _length(b), _length(c)
    da, db, dc = _unit(a), _unit(b), _unit(c)
    # A straight run when the cuboid is one cell thick in two directions.
    for n, step in ((w, da), (h, db), (d, dc)):
        if w * h * d == n:
            p = o
            for _ in range(n):
                yield p
                p = _add(p, step)
            return
    a2, b2, c2 = _half(a), _half(b), _half(c)
    # Prefer even sub-cuboids: lengthen an odd half edge by one cell (edges > 2 only).
    if _length(a2) % 2 and w > 2:
        a2 = _add(a2, da)
    if _length(b2) % 2 and h > 2:
        b2 = _add(b2, db)
    if _length(c2) % 2 and d > 2:
        c2 = _add(c2, dc)
    ra, rb, rc = _add(a, _neg(a2)), _add(b, _neg(b2)), _add(c, _neg(c2))   # remainders
    a_end = _add(a, _neg(da))          # offset of the last cell along a
    if 2 * w > 3 * h and 2 * w > 3 * d:              # wide: two halves along a
        yield from _walk(o, a2, b, c)
        yield from _walk(_add(o, a2), ra, b, c)
    elif 3 * h > 4 * d:                               # three pieces, d not split
        yield from _walk(o, b2, c, a2)
        yield from _walk(_add(o, b2), a, rb, c)
        yield from _walk(_add(o, a_end, b2, _neg(db)), _neg(b2), c, _neg(ra))
    elif 3 * d > 4 * h:                               # three pieces, h not split
        yield from _walk(o, c2, a2, b)
        yield from _walk(_add(o, c2), a, b, rc)
        yield from _walk(_add(o, a_end, c2, _neg(dc)), _neg(c2), _neg(ra), b)
    else:                                             # five pieces, all axes split
        c_end = _add(c, _neg(dc))
        yield from _walk(o, b2, c2, a2)
        yield from _walk(_add(o, b2), c, a2, rb)
        yield from _walk(_add(o, b2, _neg(db), c_end), a, _neg(b2), _neg(rc))
        yield from _walk(_add(o, a_end, b2, c_end), _neg(c), _neg(ra), rb)
        yield from _walk(_add(o, a_end, b2, _neg(db)), _neg(b2), c2, _neg(ra))


def gilbert3d(width: int, height: int, depth: int) -> Iterator[Vec]:
    """Cells ``(x, y, z)`` of a ``width x height x depth`` cuboid in Gilbert-curve order.

    The major axis is the longest one (ties: width, then height), as the official generator.
    """
    for name, n in (("width", width), ("height", height), ("depth", depth)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"gilbert3d: {name} must be an integer >= 1, got {n!r}")
    W, H, D = int(width), int(height), int(depth)
    o = (0, 0, 0)
    if W >= H and W >= D:
        yield from _walk(o, (W, 0, 0), (0, H, 0), (0, 0, D))
    elif H >= W and H >= D:
        yield from _walk(o, (0, H, 0), (W, 0, 0), (0, 0, D))
    else:
        yield from _walk(o, (0, 0, D), (W, 0, 0), (0, H, 0))


@lru_cache(maxsize=16)
def _order(width: int, height: int, depth: int) -> np.ndarray:
    pts = np.fromiter((x + width * (y + height * z) for x, y, z in gilbert3d(width, height, depth)),
                      dtype=np.int64, count=width * height * depth)
    pts.setflags(write=False)
    return pts


def gilbert_coords(width: int, height: int, depth: int) -> np.ndarray:
    """int64 ``[N, 3]``: the ``(x, y, z)`` of each curve position."""
    return np.array(list(gilbert3d(width, height, depth)), dtype=np.int64).reshape(-1, 3)


def gilbert_order(grid: tuple[int, int, int]) -> np.ndarray:
    """Video-token permutation of a ``(T, H, W)`` grid: ``perm[p]`` = row-major index
    ``t*H*W + h*W + w`` of the ``p``-th cell of the curve over ``(W, H, T)``.
    int64 ``[T*H*W]`` (a fresh copy)."""
    T, H, W = (int(x) for x in grid)
    return _order(W, H, T).copy()


def psa_sequence_order(grid: tuple[int, int, int], text_tokens: int = 0,
                       text_position: str = "first") -> np.ndarray:
    """The whole-sequence permutation of PSA's ``GilbertRearranger``: video tokens in
    Gilbert order, then the text tokens (in their order) at the **end**.

    ``text_position`` says where the text sits in the input: ``"first"`` (CogVideoX; the
    only layout the official rearranger handles: it takes ``q[..., :text_length]`` as
    text) or ``"last"`` (refattn extension; the same output order). int64 ``[T*H*W + text]``.
    """
    n = int(np.prod([int(x) for x in grid]))
    text_tokens = int(text_tokens)
    if text_tokens < 0:
        raise InputError(f"text_tokens: expected an integer >= 0, got {text_tokens}")
    if text_position not in ("first", "last"):
        raise InputError(f"text_position: expected 'first' or 'last', got {text_position!r}")
    video_offset = text_tokens if text_position == "first" else 0
    text_offset = 0 if text_position == "first" else n
    return np.concatenate([gilbert_order(grid) + video_offset,
                           np.arange(text_tokens, dtype=np.int64) + text_offset])
