"""Radial Attention -- a static O(n log n) mask with spatio-temporal energy decay.

Paper: Li et al., "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long
Video Generation", arXiv 2506.19852. Official code:
``mit-han-lab/radial-attention@72788d4f0a6d202f1ec5f1c98a6e4c8b2e34fdbc``,
``radial_attn/attn_mask.py`` (``gen_log_mask_shrinked``, ``get_window_width``,
``get_diagonal_split_mask``, ``shrinkMaskStrict``, ``RadialAttention``). Spec:
``video-kv.md`` section 5.3.

The mask is the same for every head and input (no scoring). With ``F`` frames of ``tpf``
tokens (video first, then text), for every frame pair ``(i, j)``, ``d = |i - j|``,
``g = bitlen(d)``, ``P = 2^bitlen(tpf)``:

* sink (Wan only): key frame ``j = 0`` is fully on for every query frame;
* window (token units): ``w = tpf`` if ``d <= 1`` else ``max(P / 2^g * decay_factor, block)``;
  the pair's token mask is ``|col - row| <= w`` (in-frame indices);
* temporal thinning: ``lam = P / 2^g`` (no decay factor); if ``lam < 128`` the pair is kept
  only when ``d mod int(128 / lam) == 0`` (128 is hard-coded, whatever ``block_size``);
* shrink to blocks: the pair mask is placed at offset ``((i*tpf) mod bs, (j*tpf) mod bs)`` of a
  zero canvas ``ceil(tpf/bs)*bs`` (+ offset) wide; in each ``bs x bs`` block, a column is
  *dense* if more than 1/3 of its rows are on; the block is kept iff
  ``#dense cols / (#non-empty cols + 1e-9) > 0.6``; kept blocks are OR-ed into the global
  block mask at ``((i*tpf)//bs, (j*tpf)//bs)``;
* every block row and column from ``video_tokens // bs`` on is on (text, and the block that
  straddles the video/text border).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.blockmask import BlockMask, num_blocks
from ..core.errors import InputError
from ..core.scores import Selection
from ..core.video_grid import VideoGrid
from ..methods.base import check_choice, check_range, register_method

PAPER = ("Li et al., Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long "
         "Video Generation, arXiv 2506.19852")
CODE = "mit-han-lab/radial-attention@72788d4f0a6d202f1ec5f1c98a6e4c8b2e34fdbc"
MODEL_TYPES = ("wan", "hunyuan")
SPLIT_THRESHOLD = 128      # hard-coded in get_diagonal_split_mask


@dataclass(frozen=True)
class RadialParams:
    """Radial parameters. ``grid`` (T, H, W) gives ``num_frame = T`` and ``tpf = H*W``;
    ``text_tokens`` text tokens follow the video (``text_position`` must be "last").

    * ``block_size`` (128), ``decay_factor`` (1.0: the CLIs' value; the function default
      is 0.5), ``model_type`` ("wan": first-frame sink; "hunyuan").
    * ``dense_layers``, ``dense_timesteps`` (0): the mask is all-on for
      ``layer_idx < dense_layers`` or ``timestep_idx < dense_timesteps``.
    """

    grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    text_position: str = "last"
    block_size: int = 128
    decay_factor: float = 1.0
    model_type: str = "wan"
    layer_idx: int = 0
    timestep_idx: int = 0
    dense_layers: int = 0
    dense_timesteps: int = 0

    def validate(self) -> None:
        VideoGrid.from_params(self.grid, self.text_tokens, self.text_position)
        check_choice("text_position", self.text_position, ("last",))
        check_range("block_size", self.block_size, 1, integer=True)
        check_range("decay_factor", self.decay_factor, 0.0, lo_open=True)
        check_choice("model_type", self.model_type, MODEL_TYPES)
        for name in ("layer_idx", "timestep_idx", "dense_layers", "dense_timesteps"):
            check_range(name, getattr(self, name), 0, integer=True)


def window_width(i: int, j: int, tpf: int, decay_factor: float = 1.0, block_size: int = 128,
                 model_type: str = "wan") -> float:
    """Token window of frame pair ``(i, j)`` (``get_window_width``): ``tpf`` for ``d <= 1``,
    else ``max(2^bitlen(tpf) / 2^bitlen(d) * decay_factor, block_size)``."""
    d = abs(int(i) - int(j))
    if d <= 1:
        return float(tpf)
    w = 2 ** int(tpf).bit_length() / 2 ** d.bit_length() * decay_factor
    return float(w) if w >= block_size else float(block_size)


def pair_kept(i: int, j: int, tpf: int) -> bool:
    """Temporal thinning (``get_diagonal_split_mask``): ``lam = 2^bitlen(tpf)/2^bitlen(d)``;
    kept if ``lam >= 128``, else iff ``d mod int(128 / lam) == 0``."""
    d = abs(int(i) - int(j))
    lam = 2 ** int(tpf).bit_length() / 2 ** d.bit_length()
    if lam >= SPLIT_THRESHOLD:
        return True
    return d % int(SPLIT_THRESHOLD / lam) == 0


def shrink_pair(local: np.ndarray, row_off: int, col_off: int, block_size: int) -> np.ndarray:
    """``shrinkMaskStrict`` of a frame-pair token mask placed at ``(row_off, col_off)``."""
    tpf = local.shape[0]
    nb = (tpf - 1) // block_size + 1
    canvas = np.zeros((row_off + nb * block_size, col_off + nb * block_size), bool)
    canvas[row_off:row_off + tpf, col_off:col_off + tpf] = local
    n = canvas.shape[0] // block_size                     # official: floor over the rows
    m = canvas[:n * block_size, :n * block_size].reshape(n, block_size, n, block_size)
    dens = m.sum(axis=1) / block_size                     # [n, n, bs]: column densities
    frac = (dens > 1 / 3).sum(-1) / ((dens > 0).sum(-1) + 1e-9)
    return frac > 0.6


def radial_block_mask(num_frames: int, tokens_per_frame: int, seq_len: int, block_size: int = 128,
                      decay_factor: float = 1.0, model_type: str = "wan"
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The radial block mask (``gen_log_mask_shrinked``, ``sparse_type='radial'``).

    Returns ``mask`` bool ``[nb, nb]`` with ``nb = ceil(seq_len / block_size)`` (the official
    canvas is ``seq_len // block_size``; the extra partial block, if any, is text and on),
    ``window`` float64 ``[F, F]`` (token windows; ``tpf`` on sink pairs is not special-cased,
    as the official helper) and ``kept`` bool ``[F, F]`` (thinning decision).
    """
    check_choice("model_type", model_type, MODEL_TYPES)
    F, tpf, bs = int(num_frames), int(tokens_per_frame), int(block_size)
    video = F * tpf
    if seq_len < video:
        raise InputError(f"seq_len: expected >= {video} video tokens, got {seq_len}")
    nb = num_blocks(seq_len, bs)
    pad = max(nb, (video + 2 * bs) // bs + 1)            # room for the last pair's overrun
    mask = np.zeros((pad, pad), bool)
    border = video // bs
    idx = np.arange(tpf)
    band = np.abs(idx[None, :] - idx[:, None])
    window = np.empty((F, F))
    kept = np.empty((F, F), bool)
    cache: dict[tuple, np.ndarray] = {}
    for i in range(F):
        for j in range(F):
            window[i, j] = window_width(i, j, tpf, decay_factor, bs, model_type)
            kept[i, j] = pair_kept(i, j, tpf)
            if j == 0 and model_type == "wan":              # Wan-only attention sink
                key = ("full",)
            elif kept[i, j]:
                key = ("band", window[i, j])
            else:
                continue                                     # all-zero pair: no block kept
            ro, co = (i * tpf) % bs, (j * tpf) % bs
            ck = key + (ro, co)
            if ck not in cache:
                local = np.ones((tpf, tpf), bool) if key[0] == "full" else band <= key[1]
                cache[ck] = shrink_pair(local, ro, co, bs)
            blk = cache[ck]
            r, c = (i * tpf) // bs, (j * tpf) // bs
            mask[r:r + blk.shape[0], c:c + blk.shape[1]] |= blk
    mask[border:] = True
    mask[:, border:] = True
    return mask[:nb, :nb], window, kept


@register_method("radial", RadialParams, kind="video",
                 summary="static radial mask: window halves per log2 frame distance, "
                         "temporal thinning, 128-block shrink; text dense",
                 paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: RadialParams, *,
           causal: bool = False, backend: str = "numpy") -> Selection:
    """Radial mask for q ``[B, Hq, L, D]`` / k ``[B, Hkv, L, D]`` on the grid (video first).

    Returns a :class:`Selection` with ``mask`` ``[1, 1, nb, nb]`` (same for every batch
    element and head), ``block_q = block_k = block_size``; ``forced`` = the whole mask (no
    score is involved); ``extras``: ``window`` ``[F, F]``, ``pair_kept`` ``[F, F]``,
    ``dense`` (True for a dense layer / timestep).
    """
    if causal:
        raise InputError("causal: Radial Attention is bidirectional (video DiT); pass causal=False "
                         "(CLI: --no-causal)")
    grid = VideoGrid.from_params(params.grid, params.text_tokens, params.text_position)
    L = q.shape[2]
    if k.shape[2] != L:
        raise InputError(f"q/k: Radial is self-attention; q_len {L} != k_len {k.shape[2]}")
    grid.check_seq_len(L, "q/k sequence length")
    bs = int(params.block_size)
    dense = params.layer_idx < params.dense_layers or params.timestep_idx < params.dense_timesteps
    mask, window, kept = radial_block_mask(grid.T, grid.frame_tokens, L, bs,
                                           float(params.decay_factor), params.model_type)
    if dense:
        mask = np.ones_like(mask)
    bm = BlockMask(mask[None, None], block_q=bs, block_k=bs, q_len=L, k_len=L)
    return Selection(mask=bm, forced=mask[None, None].copy(),
                     extras={"window": window, "pair_kept": kept, "dense": dense})
