"""The video latent token grid ``(T, H, W)`` and its partitions into blocks.

Flattening (spec ``video-kv.md`` section 0; Wan / HunyuanVideo / CogVideoX DiTs before any
method-specific reordering): video token ``(t, h, w)`` has index ``n = t*H*W + h*W + w``
within the video segment. Text tokens (``text_tokens``, may be 0) form one contiguous
segment either after the video (``text_position="last"``: HunyuanVideo, Wan self-attention
with joint text, SVG, STA, Radial) or before it (``"first"``: CogVideoX, the PSA Gilbert
rearranger's input). So the sequence index of ``(t, h, w)`` is ``video_offset + n``.

A :class:`GridPartition` is an exact ``int64`` token permutation of the **whole** sequence
(text tokens stay where they are) plus the boundaries of the video blocks in permuted order:
``x_perm = x[perm]`` (``refattn.core.permutation`` convention: position ``p`` of the permuted
sequence holds original token ``perm[p]``), block ``c`` = permuted positions
``bounds[c] : bounds[c+1]``. The partitions are those of VMoBA (KwaiVGI/VMoBA@4da72ff,
``src/vmoba.py`` ``process_moba_input``) and STA's tiles (hao-ai-lab/FastVideo@2f3d407):

* ``1d`` (frame groups, no reordering): block length ``int(c_t*H*W)`` tokens; the last block
  may be shorter (VMoBA keeps it; a float ``c_t`` is accepted, as the official code does).
* ``2d`` (spatial tubes over all frames): ``(c_h, c_w)``; order row-major over
  ``(i_h, i_w, t, r_h, r_w)`` with ``h = i_h*c_h + r_h``, ``w = i_w*c_w + r_w``; requires
  ``H % c_h == 0`` and ``W % c_w == 0`` (official assert).
* ``3d`` (cubes) and STA tiles: ``(c_t, c_h, c_w)``; order row-major over
  ``(i_t, i_h, i_w, r_t, r_h, r_w)``; requires divisibility on all three axes (VMoBA's
  assert; STA's supported canvases are tile multiples).

Nothing here imports refattn outside ``refattn.core``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import InputError
from .permutation import apply_permutation, invert_permutation, unpermute

TEXT_POSITIONS = ("last", "first")
PARTITION_KINDS = ("1d", "2d", "3d")


def _pos_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True)
class VideoGrid:
    """A ``(T, H, W)`` latent token grid (frames, height, width in tokens after patchify).

    ``text_tokens`` text tokens sit in one segment after (``"last"``) or before (``"first"``)
    the ``T*H*W`` video tokens; ``seq_len = T*H*W + text_tokens``.
    """

    T: int
    H: int
    W: int
    text_tokens: int = 0
    text_position: str = "last"

    def __post_init__(self) -> None:
        for name in ("T", "H", "W"):
            object.__setattr__(self, name, _pos_int(f"grid.{name}", getattr(self, name)))
        object.__setattr__(self, "text_tokens", _pos_int("text_tokens", self.text_tokens, 0))
        if self.text_position not in TEXT_POSITIONS:
            raise InputError(f"text_position: expected one of {TEXT_POSITIONS}, got {self.text_position!r}")

    @classmethod
    def from_params(cls, grid: Any, text_tokens: int = 0, text_position: str = "last") -> "VideoGrid":
        """Build from the method parameters ``grid`` (``(T, H, W)``), ``text_tokens``, ``text_position``."""
        if isinstance(grid, VideoGrid):
            return grid
        if grid is None:
            raise InputError("grid: expected (T, H, W) of the video token grid, got None")
        g = tuple(np.asarray(grid).reshape(-1).tolist()) if not isinstance(grid, (tuple, list)) else tuple(grid)
        if len(g) != 3:
            raise InputError(f"grid: expected 3 integers (T, H, W), got {grid!r}")
        return cls(g[0], g[1], g[2], text_tokens, text_position)

    # -- sizes and segments ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.T, self.H, self.W)

    @property
    def frame_tokens(self) -> int:
        """Tokens per frame, ``H*W``."""
        return self.H * self.W

    @property
    def video_tokens(self) -> int:
        return self.T * self.H * self.W

    @property
    def seq_len(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def video_offset(self) -> int:
        """Sequence index of video token ``(0, 0, 0)``."""
        return self.text_tokens if self.text_position == "first" else 0

    @property
    def text_offset(self) -> int:
        """Sequence index of the first text token."""
        return 0 if self.text_position == "first" else self.video_tokens

    @property
    def video_slice(self) -> slice:
        return slice(self.video_offset, self.video_offset + self.video_tokens)

    @property
    def text_slice(self) -> slice:
        return slice(self.text_offset, self.text_offset + self.text_tokens)

    def check_seq_len(self, length: int, name: str = "sequence length") -> None:
        """Raise unless ``length == seq_len``."""
        if int(length) != self.seq_len:
            raise InputError(f"{name}: grid {self.shape} with {self.text_tokens} text tokens needs "
                             f"{self.seq_len} tokens, got {length}")

    # -- coordinates ---------------------------------------------------------------------------
    def token_index(self, t: Any, h: Any, w: Any) -> np.ndarray:
        """Sequence index (int64) of video token ``(t, h, w)`` (broadcasting)."""
        t, h, w = (np.asarray(a, dtype=np.int64) for a in (t, h, w))
        for name, a, n in (("t", t, self.T), ("h", h, self.H), ("w", w, self.W)):
            if a.size and (a.min() < 0 or a.max() >= n):
                raise InputError(f"{name}: expected 0 <= {name} < {n}, got values in [{a.min()}, {a.max()}]")
        return self.video_offset + (t * self.H + h) * self.W + w

    def coords(self, index: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(t, h, w)`` (int64 each) of sequence indices that are video tokens."""
        n = np.asarray(index, dtype=np.int64) - self.video_offset
        if n.size and (n.min() < 0 or n.max() >= self.video_tokens):
            raise InputError(f"index: expected video token indices in [{self.video_offset}, "
                             f"{self.video_offset + self.video_tokens}), got a text or out-of-range index")
        return n // self.frame_tokens, (n // self.W) % self.H, n % self.W

    def frame_of(self) -> np.ndarray:
        """Frame index of every sequence position, int64 ``[seq_len]``; ``-1`` on text tokens."""
        f = np.full(self.seq_len, -1, np.int64)
        f[self.video_slice] = np.arange(self.video_tokens) // self.frame_tokens
        return f

    # -- partitions ------------------------------------------------------------------------------
    def _embed(self, video_perm: np.ndarray, bounds: np.ndarray, kind: str, chunk: tuple,
               block_grid: tuple[int, ...]) -> "GridPartition":
        perm = np.arange(self.seq_len, dtype=np.int64)
        perm[self.video_slice] = self.video_offset + video_perm
        return GridPartition(grid=self, kind=kind, chunk=chunk, perm=perm,
                             bounds=(self.video_offset + bounds).astype(np.int64),
                             block_grid=block_grid)

    def partition_1d(self, frames_per_block: float) -> "GridPartition":
        """Frame groups: blocks of ``int(frames_per_block*H*W)`` consecutive tokens, no reorder.

        The last block is shorter when the length does not divide (VMoBA keeps it).
        """
        c = frames_per_block
        if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, float, np.integer, np.floating)) or not c > 0:
            raise InputError(f"chunk: expected a positive number of frames for a 1D partition, got {c!r}")
        size = int(c * self.H * self.W)             # official: int(chunk_size * H * W), left to
        # right: (c * H) * W rounds differently from c * (H * W) for fractional c
        if size < 1:
            raise InputError(f"chunk: {c} frames of {self.frame_tokens} tokens is less than one token")
        L = self.video_tokens
        bounds = np.append(np.arange(0, L, size, dtype=np.int64), L)
        return self._embed(np.arange(L, dtype=np.int64), bounds, "1d", (c,), (bounds.size - 1,))

    def _tile(self, c_t: int, c_h: int, c_w: int, kind: str, chunk: tuple) -> "GridPartition":
        T, H, W = self.shape
        for name, n, c in (("T", T, c_t), ("H", H, c_h), ("W", W, c_w)):
            if n % c:
                raise InputError(f"chunk: a {kind} partition needs grid.{name}={n} divisible by "
                                 f"its block size {c} (no ragged edge in the official code)")
        nt, nh, nw = T // c_t, H // c_h, W // c_w
        n = np.arange(self.video_tokens, dtype=np.int64).reshape(nt, c_t, nh, c_h, nw, c_w)
        video_perm = n.transpose(0, 2, 4, 1, 3, 5).reshape(-1)    # (i_t,i_h,i_w,r_t,r_h,r_w)
        size = c_t * c_h * c_w
        bounds = np.arange(0, self.video_tokens + 1, size, dtype=np.int64)
        return self._embed(video_perm, bounds, kind, chunk, (nt, nh, nw))

    def partition_2d(self, c_h: int, c_w: int) -> "GridPartition":
        """Spatial tubes: ``c_h x c_w`` patches spanning all frames; order ``(i_h,i_w,t,r_h,r_w)``."""
        c_h, c_w = _pos_int("chunk[0]", c_h), _pos_int("chunk[1]", c_w)
        p = self._tile(self.T, c_h, c_w, "2d", (c_h, c_w))
        p.block_grid = p.block_grid[1:]
        return p

    def partition_3d(self, c_t: int, c_h: int, c_w: int) -> "GridPartition":
        """Cubes ``c_t x c_h x c_w``; order ``(i_t,i_h,i_w,r_t,r_h,r_w)``."""
        c = (_pos_int("chunk[0]", c_t), _pos_int("chunk[1]", c_h), _pos_int("chunk[2]", c_w))
        return self._tile(*c, "3d", c)

    def sta_tiles(self, tile: Sequence[int] = (6, 8, 8)) -> "GridPartition":
        """STA's tile-major layout ``(n_t n_h n_w ts_t ts_h ts_w)`` (same order as ``3d``).

        Tiles are enumerated row-major over ``(tile_t, tile_h, tile_w)``; ``block_grid`` is
        ``(n_t, n_h, n_w)``.
        """
        t = tuple(tile)
        if len(t) != 3:
            raise InputError(f"tile: expected 3 integers (t, h, w), got {tile!r}")
        c = tuple(_pos_int(f"tile[{i}]", x) for i, x in enumerate(t))
        p = self._tile(*c, "tile", c)
        return p

    def partition(self, kind: str, chunk: Any) -> "GridPartition":
        """Dispatch on ``kind`` in ``("1d", "2d", "3d")`` with VMoBA's ``chunk`` argument."""
        if kind == "1d":
            c = chunk[0] if isinstance(chunk, (tuple, list)) and len(chunk) == 1 else chunk
            return self.partition_1d(c)
        need = {"2d": 2, "3d": 3}.get(kind)
        if need is None:
            raise InputError(f"partition: expected one of {PARTITION_KINDS}, got {kind!r}")
        if not isinstance(chunk, (tuple, list, np.ndarray)) or len(chunk) != need:
            raise InputError(f"chunk: a {kind} partition needs {need} block sizes, got {chunk!r}")
        return self.partition_2d(*chunk) if kind == "2d" else self.partition_3d(*chunk)


@dataclass(eq=False)
class GridPartition:
    """A partition of a :class:`VideoGrid`'s video tokens into contiguous blocks after a permutation.

    * ``perm`` int64 ``[seq_len]``: permuted position ``p`` holds original token ``perm[p]``.
    * ``bounds`` int64 ``[C+1]``: block ``c`` = permuted positions ``bounds[c]:bounds[c+1]``
      (video only; text positions belong to no block).
    * ``block_grid``: blocks per axis (``(C,)`` for 1d, ``(n_h, n_w)`` for 2d,
      ``(n_t, n_h, n_w)`` for 3d / tiles); block ids are row-major over it.
    """

    grid: VideoGrid
    kind: str
    chunk: tuple
    perm: np.ndarray
    bounds: np.ndarray
    block_grid: tuple[int, ...]
    _inv: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_blocks(self) -> int:
        return int(self.bounds.size - 1)

    @property
    def block_lengths(self) -> np.ndarray:
        """Tokens per block, int64 ``[C]``."""
        return np.diff(self.bounds)

    @property
    def inv_perm(self) -> np.ndarray:
        """``inv[perm[p]] = p``: permuted position of every original token."""
        if self._inv is None:
            self._inv = invert_permutation(self.perm)
        return self._inv

    def block_of_position(self) -> np.ndarray:
        """Block id of every permuted position, int64 ``[seq_len]`` (``-1`` for text)."""
        out = np.full(self.grid.seq_len, -1, np.int64)
        out[self.bounds[0]:self.bounds[-1]] = np.repeat(np.arange(self.num_blocks), self.block_lengths)
        return out

    def block_of_token(self) -> np.ndarray:
        """Block id of every original token, int64 ``[seq_len]`` (``-1`` for text)."""
        return self.block_of_position()[self.inv_perm]

    def block_tokens(self, c: int) -> np.ndarray:
        """Original token indices of block ``c`` in permuted order, int64."""
        if not 0 <= int(c) < self.num_blocks:
            raise InputError(f"block: expected 0 <= c < {self.num_blocks}, got {c}")
        return self.perm[self.bounds[c]:self.bounds[c + 1]]

    def permute(self, x: Any, axis: int = -2) -> np.ndarray:
        """``x`` reordered along the sequence ``axis`` (default ``[..., S, D]``)."""
        return apply_permutation(x, self.perm, axis=axis)

    def unpermute(self, x: Any, axis: int = -2) -> np.ndarray:
        """Inverse of :meth:`permute` (exact)."""
        return unpermute(x, self.perm, axis=axis)


def layer_partition_kind(layer_idx: int, temporal_layer: int = 1, spatial_layer: int = 1,
                         st_layer: int = 1, first_full_layer: int = 0) -> str:
    """VMoBA's layer-wise recurrent 1D-2D-3D cycle (FastVideo@2f3d407 ``backends/vmoba.py``).

    ``m = layer_idx - first_full_layer``, ``P = temporal + spatial + st``, ``r = m mod P``
    (non-negative); ``r < temporal`` -> ``"1d"``, ``r < temporal + spatial`` -> ``"2d"``,
    else ``"3d"``. Defaults: layers 0,3,6,.. 1d; 1,4,7,.. 2d; 2,5,8,.. 3d.
    """
    layer_idx = _pos_int("layer_idx", layer_idx, 0)
    tl, sl, stl = (_pos_int(n, v, 0) for n, v in (("temporal_layer", temporal_layer),
                                                   ("spatial_layer", spatial_layer),
                                                   ("st_layer", st_layer)))
    P = tl + sl + stl
    if P == 0:
        raise InputError("temporal_layer + spatial_layer + st_layer: expected a positive cycle length, got 0")
    r = (layer_idx - int(first_full_layer)) % P
    return "1d" if r < tl else ("2d" if r < tl + sl else "3d")


class PartitionTokenMask:
    """Token-level mask of block selections made in a partition's permuted order.

    ``rows`` bool ``[B, H, P, C]`` says which blocks (of ``partition``) each query row may
    attend, with rows either per permuted query position (``P = seq_len``,
    ``row_unit="token"``) or per query block (``P = C``, ``row_unit="block"``). Query token
    ``i`` (original order) sits at permuted position ``inv_perm[i]``; key ``j`` is visible iff
    its block is selected. With ``text_dense`` every text query sees every key and every
    video query sees every text key (else text rows and columns are off). ``B``/``H`` may
    be 1 (broadcast). Implements the ``token_rows`` protocol of :func:`refattn.attention`,
    in the **original** token order, so attention needs no explicit permutation.
    """

    def __init__(self, partition: GridPartition, rows: Any, row_unit: str = "token",
                 text_dense: bool = True) -> None:
        r = np.asarray(rows, dtype=bool)
        if r.ndim != 4:
            raise InputError(f"rows: expected bool [B, H, P, C], got shape {r.shape}")
        C = partition.num_blocks
        P = partition.grid.seq_len if row_unit == "token" else C
        if row_unit not in ("token", "block"):
            raise InputError(f"row_unit: expected 'token' or 'block', got {row_unit!r}")
        if r.shape[2:] != (P, C):
            raise InputError(f"rows: expected [B, H, {P}, {C}] for row_unit={row_unit!r}, got {r.shape}")
        self.partition = partition
        self.rows = r
        self.row_unit = row_unit
        self.text_dense = bool(text_dense)
        self.q_len = self.k_len = partition.grid.seq_len
        pos = partition.block_of_position()
        self._key_block = pos[partition.inv_perm]              # block of original key j
        self._row_of = partition.inv_perm if row_unit == "token" else self._key_block

    def batch_heads(self) -> tuple[int, int]:
        return int(self.rows.shape[0]), int(self.rows.shape[1])

    def token_rows(self, b: int, h0: int, h1: int, r0: int, r1: int) -> np.ndarray:
        """bool ``[Hm, r1-r0, seq_len]`` for original query rows ``[r0, r1)``."""
        rb = self.rows[b if self.rows.shape[0] > 1 else 0]
        rh = rb[h0:h1] if rb.shape[0] > 1 else rb
        qi = np.arange(r0, r1)
        is_text_q = self._key_block[qi] < 0
        row = np.where(is_text_q, 0, self._row_of[qi])
        sel = rh[:, row, :]                                     # [Hm, R, C]
        kb = self._key_block
        vis = sel[:, :, np.maximum(kb, 0)] & (kb >= 0)[None, None, :]
        if self.text_dense:
            vis |= (kb < 0)[None, None, :]
            vis[:, is_text_q, :] = True
        else:
            vis[:, is_text_q, :] = False
        return vis

    def to_token_mask(self) -> np.ndarray:
        """The whole mask, bool ``[B, H, seq_len, seq_len]`` (small problems only)."""
        B, H = self.batch_heads()
        return np.stack([self.token_rows(b, 0, H, 0, self.q_len) for b in range(B)])
