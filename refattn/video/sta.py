"""STA -- Sliding Tile Attention (static per-head 3-D tile windows + offline window search).

Paper: Zhang et al., "Fast Video Generation with Sliding Tile Attention", arXiv 2502.04507
(ICML 2025). Official code: ``hao-ai-lab/FastVideo@2f3d4074064e4d86f99dc784ebbaa296e6f5925f``
(``fastvideo-kernel/tests/support_flex_sta.py`` ``generate_sta_mask``, Triton
``sliding_tile_attention_triton``) and branch ``sta_do_not_delete@e4de77692fafde5c9c87debcf317ca0cfd77138c``
(``fastvideo/attention/backends/STA_configuration.py``: the window search). Spec:
``video-kv.md`` section 5.1.

Tokens are reordered tile-major (:meth:`VideoGrid.sta_tiles`): tile ``(a_t, a_h, a_w)`` of
``tile`` = ``(6, 8, 8)`` tokens by default, tiles row-major. A head with window
``(k_t, k_h, k_w)`` (in tiles) lets every query of tile ``a`` see key tile ``b`` iff on every
axis ``|c(a) - b| <= floor(k/2)`` with ``c(a) = clamp(a, floor(k/2), n - 1 - floor(k/2))``
(``torch.clamp``: the upper bound wins when the bounds cross; then the window spans the
whole axis, which is also what the Triton kernel's lower-bound clamp gives). An even ``k``
therefore acts as ``k + 1`` unless it spans the axis. Text tokens (after the video): every
query sees every text token, and text queries see everything. Attention is bidirectional.

Window search (offline, per timestep/layer/head): for each candidate window, ``L2[h] =
mean_{batch, tokens, dim} (O_cand - O_full)^2`` against the full-window output; the
candidate with the smallest error wins (first minimum on ties). See :func:`search_windows`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..core.blockmask import BlockMask, num_blocks
from ..core.errors import InputError
from ..core.layout import normalize_qkv
from ..core.scores import Selection
from ..core.video_grid import GridPartition, PartitionTokenMask, VideoGrid
from ..methods.base import register_method
from ..reference.attention import attention_forward

PAPER = "Zhang et al., Fast Video Generation with Sliding Tile Attention, arXiv 2502.04507"
CODE = ("hao-ai-lab/FastVideo@2f3d4074064e4d86f99dc784ebbaa296e6f5925f (+ branch "
        "sta_do_not_delete@e4de77692fafde5c9c87debcf317ca0cfd77138c)")
# Wan 69x768x1280 candidates of STA_configuration (sparse ones) and its full window.
WAN_CANDIDATES = ((3, 1, 10), (1, 5, 7), (3, 3, 3), (1, 6, 5), (1, 3, 10), (3, 6, 1))
WAN_FULL_WINDOW = (3, 6, 10)


def _windows(window: Any, heads: int | None = None) -> np.ndarray:
    """``window`` as int64 ``[H, 3]`` (one ``(k_t, k_h, k_w)`` broadcasts to every head)."""
    w = np.asarray(window)
    if w.dtype.kind not in "iuf" or w.ndim not in (1, 2) or w.shape[-1] != 3:
        raise InputError(f"window: expected (k_t, k_h, k_w) or one triple per head, got {window!r}")
    if not np.all(w == np.round(w)) or np.any(w < 1):
        raise InputError(f"window: expected positive integers (tiles), got {window!r}")
    w = w.astype(np.int64).reshape(-1, 3)
    if heads is not None and w.shape[0] not in (1, heads):
        raise InputError(f"window: {w.shape[0]} per-head windows for {heads} query heads")
    return w


@dataclass(frozen=True)
class StaParams:
    """STA parameters. ``grid`` (T, H, W) must be a multiple of ``tile`` (the official
    kernels support fixed canvases only); ``text_tokens`` follow the video.

    * ``tile`` (6, 8, 8) tokens; ``window``: ``(k_t, k_h, k_w)`` in tiles, one for every
      head or one per query head (the output of :func:`search_windows`). Default (3, 3, 3),
      one of the official Wan candidates (there is no single official default: windows come
      from the search).
    """

    grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    text_position: str = "last"
    tile: tuple[int, int, int] = (6, 8, 8)
    window: Any = (3, 3, 3)

    def validate(self) -> None:
        g = VideoGrid.from_params(self.grid, self.text_tokens, self.text_position)
        if self.text_position != "last":
            raise InputError(f"text_position: STA places text after the video; expected 'last', "
                             f"got {self.text_position!r}")
        g.sta_tiles(self.tile)
        _windows(self.window)


def axis_window(n: int, k: int) -> np.ndarray:
    """bool ``[n, n]``: query tile ``a`` sees key tile ``b`` along one axis of ``n`` tiles."""
    r = int(k) // 2
    a = np.arange(n)
    center = np.minimum(np.maximum(a, r), n - 1 - r)     # torch.clamp(a, r, n-1-r)
    return np.abs(center[:, None] - a[None, :]) <= r


def tile_mask(tile_grid: Sequence[int], window: Sequence[int]) -> np.ndarray:
    """bool ``[N, N]`` over tiles (row-major ``(t, h, w)``), ``N = n_t*n_h*n_w``."""
    nt, nh, nw = (int(x) for x in tile_grid)
    at, ah, aw = (axis_window(n, k) for n, k in zip((nt, nh, nw), window, strict=True))
    m = at[:, None, None, :, None, None] & ah[None, :, None, None, :, None] & aw[None, None, :, None, None, :]
    return m.reshape(nt * nh * nw, nt * nh * nw)


def sta_token_mask(grid: VideoGrid, tile: Sequence[int], windows: Any
                   ) -> tuple[PartitionTokenMask, GridPartition, np.ndarray]:
    """Token mask (original order) of per-head windows, the tile partition, and the tile
    masks bool ``[1, H, N, N]``."""
    part = grid.sta_tiles(tile)
    w = _windows(windows)
    tm = np.stack([tile_mask(part.block_grid, wh) for wh in w])[None]
    return PartitionTokenMask(part, tm, "block", text_dense=True), part, tm


@register_method("sta", StaParams, kind="video",
                 summary="sliding tile attention: per-head 3-D window of tiles (6x8x8 tokens); "
                         "text dense", paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: StaParams, *,
           causal: bool = False, backend: str = "numpy") -> Selection:
    """STA masks for q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]`` (video row-major, then text).

    Returns a :class:`Selection`: ``mask`` on the **tile-major** order (``perm``), blocks of
    one tile (``block_q = block_k = tile volume``; text blocks after the video tiles are on),
    ``[1, H, Nb, Nb]``; ``extras``: ``token_mask`` (original order; what
    ``refattn.attention`` runs), ``perm``, ``tile_mask`` ``[1, H, N, N]``, ``windows`` ``[H, 3]``.
    """
    if causal:
        raise InputError("causal: STA is bidirectional (video DiT); pass causal=False (CLI: --no-causal)")
    grid = VideoGrid.from_params(params.grid, params.text_tokens, params.text_position)
    L, Hq = q.shape[2], q.shape[1]
    if k.shape[2] != L:
        raise InputError(f"q/k: STA is self-attention; q_len {L} != k_len {k.shape[2]}")
    grid.check_seq_len(L, "q/k sequence length")
    w = _windows(params.window, Hq)
    tmask, part, tiles = sta_token_mask(grid, params.tile, w)
    bs = int(np.prod(params.tile))
    nb = num_blocks(L, bs)
    N = part.num_blocks
    full = np.ones((1, tiles.shape[1], nb, nb), bool)
    full[:, :, :N, :N] = tiles
    return Selection(mask=BlockMask(full, block_q=bs, block_k=bs, q_len=L, k_len=L),
                     forced=full.copy(),
                     extras={"token_mask": tmask, "perm": part.perm, "tile_mask": tiles,
                             "windows": w})


def search_windows(q: Any, k: Any, v: Any, candidates: Sequence[Sequence[int]], grid: Any, *,
                   text_tokens: int = 0, tile: Sequence[int] = (6, 8, 8),
                   full_window: Sequence[int] | None = None, layout: str = "bhsd",
                   softmax_scale: float | None = None) -> dict[str, np.ndarray]:
    """STA's offline window search for one (timestep, layer): per query head, the candidate
    window whose output is closest (L2) to the full window's.

    q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]`` (``layout``); the batch axis holds the
    calibration prompts. ``L2[h, c] = mean_{b, tokens, d} (O_c - O_full)^2`` with every head's
    window set to candidate ``c`` (official: fp32; here float64); ``O_full`` uses
    ``full_window`` (default: the whole tile grid, i.e. dense attention). Returns
    ``{"windows": int64 [Hq, 3], "errors": float64 [Hq, C], "choice": int64 [Hq]}``
    (``argmin``, first minimum on ties). The official pipeline forces the full window for
    the first 12 denoising steps; that policy is the caller's.
    """
    q4, k4, v4, shape = normalize_qkv(q, k, v, layout=layout)
    g = VideoGrid.from_params(grid, text_tokens)
    g.check_seq_len(shape.q_len, "q sequence length")
    cands = [_windows(c)[0] for c in candidates]
    if not cands:
        raise InputError("candidates: expected at least one window")
    scale = softmax_scale
    if full_window is None:
        o_full, _ = attention_forward(q4, k4, v4, None, False, scale)
    else:
        m, _, _ = sta_token_mask(g, tile, full_window)
        o_full, _ = attention_forward(q4, k4, v4, m, False, scale)
    err = np.empty((shape.q_heads, len(cands)))
    for c, wc in enumerate(cands):
        m, _, _ = sta_token_mask(g, tile, wc)
        o, _ = attention_forward(q4, k4, v4, m, False, scale)
        # per prompt and head, rounded to 6 decimals as the official search does
        # (``round(float(x), 6)``, sliding_tile_attn.py), then averaged over the prompts
        err[:, c] = np.round(((o - o_full) ** 2).mean(axis=(2, 3)), 6).mean(axis=0)
    choice = np.argmin(err, axis=1)
    return {"windows": np.asarray(cands, np.int64)[choice], "errors": err, "choice": choice}
