"""Sparse VideoGen (SVG v1): per-head spatial / temporal classification from sampled rows.

Paper: Xi et al., "Sparse VideoGen: Accelerating Video Diffusion Transformers with
Spatial-Temporal Sparsity", arXiv 2502.01776 (ICML 2025). Official code:
svg-project/Sparse-VideoGen @ 5ce7b0127c0d44383ee8b9e5512431feb625f621 --
``svg/models/hyvideo/attention.py`` (``Hunyuan_SVGAttn_Processor2_0.sample_mse``,
``attention_core_logic``, ``prepare_flexattention``), ``svg/models/hyvideo/utils.py``
(``get_attention_mask``, ``generate_temporal_head_mask_mod``, ``sparsity_to_width``),
``svg/models/hyvideo/placement.py``; the CogVideoX variant ``svg/models/cog/`` (text first)
and the Wan variant ``svg/models/wan/`` (no text: ``context_length = 0``).

Sequence: ``N_v = F * fs`` video tokens in frame-major order (``fs`` = tokens per frame,
:class:`~refattn.core.video_grid.VideoGrid`), plus ``ctx`` text tokens last (HunyuanVideo,
of which the first ``prompt_length`` are real and the rest padding) or first (CogVideoX), or
none (Wan). The *temporal* reorder maps video token ``f*fs + p`` to position ``p*F + f``
(token-major); text tokens stay in place. ``variant`` picks the official rule set:
``"hunyuan"`` (text last), ``"cog"`` (text first), ``"wan"`` (``ctx = 0``); by default
``"wan"`` when ``text_tokens == 0``, else ``"cog"``/``"hunyuan"`` from ``text_position``.

1. Profiling (``sample_mse``). Rows ``r`` (sampled, an input; default: ``num_sampled_rows``
   uniform draws with replacement from ``[0, min(sample_max_row, L))``, seeded). With
   ``o = softmax(s q_r K^T) V`` over all keys (golden) and ``o_m`` the same with keys outside
   profiling mask ``m`` removed, ``MSE[b,h,m] = mean_{r,d} (o_m - o)^2``; a sampled row that
   sees no key under ``m`` makes ``MSE[b,h,m]`` NaN (the official all-``-inf`` softmax).
   Head class ``torch.argmin`` over ``m``: the first NaN if any, else the first minimum
   (ties: spatial).
2. Profiling masks (``get_attention_mask``, independent of the sparsity setting): a band of
   ``pb = 128``-token blocks, ``|i_blk - j_blk| < (pw fs) // pb`` over frame-major video
   indices (spatial) or over token-major indices mapped back (temporal), ``pw = 1.5``
   (hunyuan, cog) or ``2`` (wan). Hunyuan: all text rows and columns (padding included) on in
   both. CogVideoX: the spatial mask has all text rows and columns on and lays its band on
   *absolute* positions ``[0, ceil(N_v/pb) * pb)``, so the last ``ctx`` video tokens get no
   band there; the temporal mask is the video-video band only (text rows see no key: NaN
   MSE). Wan: key columns ``< fs`` on, applied before the permute, i.e. key ``c`` with
   (frame-major, spatial) ``c < fs`` or (temporal) token-major position ``tm(c) < fs``.
3. Execution (``generate_temporal_head_mask_mod`` in the head's own order, temporal heads
   permuted): ``w = sparsity_to_width(sparsity)`` = ``N (1 - sqrt(1 - s')) / fs``,
   ``s' = (s N^2 - 2 N ctx) / N^2``, ``N = N_v + ctx`` (``sparsity`` is the kept fraction).
   Hunyuan / cog: ``|q - kv| < W``, ``W = floor(w fs / 128) * 128``, OR key in real text OR
   query in real text (text last: padded text queries see only padded text keys and real
   queries never see padding; text first: all ``ctx`` tokens are text). Wan:
   ``|q - kv| <= W``, ``W = ceil(w fs / 128) * 128``, OR ``kv < fs`` (positions in the
   head's own order).

The result is a token-level :class:`SVGTokenMask` (``extras["token_mask"]``), which
``refattn.attention`` runs exactly as FlexAttention's ``mask_mod`` does; ``mask`` is the
covering :class:`BlockMask` on ``block_size`` blocks (FlexAttention's 128).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.blockmask import BlockMask, num_blocks
from ..core.errors import InputError
from ..core.registry import define_op, dispatch
from ..core.scores import Selection
from ..core.video_grid import TEXT_POSITIONS, VideoGrid
from ..methods.base import check_choice, check_range, register_method
from ..reference.memory import rows_per_chunk

PAPER = ("Xi et al., Sparse VideoGen: Accelerating Video Diffusion Transformers with "
         "Spatial-Temporal Sparsity, arXiv 2502.01776")
CODE = "svg-project/Sparse-VideoGen@5ce7b0127c0d44383ee8b9e5512431feb625f621"
PATTERNS = ("spatial", "temporal")
VARIANTS = ("hunyuan", "cog", "wan")
PROFILE_WIDTH = {"hunyuan": 1.5, "cog": 1.5, "wan": 2.0}   # frames: fs * 1.5 / fs * 2


@dataclass(frozen=True)
class SVGParams:
    """Sparse VideoGen parameters (official names in brackets).

    * ``grid`` (required): ``(T, H, W)``; ``num_frame = T``, ``frame_size = H*W``.
    * ``text_tokens`` [context_length], ``text_position`` (``"last"``: HunyuanVideo,
      ``"first"``: CogVideoX), ``prompt_length`` [prompt_length]: real text tokens (text
      last only; ``None`` = all text tokens are real).
    * ``sparsity`` [--sparsity]: kept fraction of the execution band mask (0.25).
    * ``num_sampled_rows`` [num_sampled_rows] (64, the CLI default; class default 32),
      ``sample_max_row`` [sample_mse_max_row] (10000; ``None`` = whole sequence, CogVideoX),
      ``seed``: the seeded default draw; ``rows``: explicit sampled rows (overrides the draw).
    * ``variant``: official rule set, ``"hunyuan"`` (text last), ``"cog"`` (text first) or
      ``"wan"`` (no text, first-frame key sink); ``None`` = ``"wan"`` when
      ``text_tokens == 0``, else ``"cog"`` / ``"hunyuan"`` by ``text_position``.
    * ``profile_width`` (``None`` = the variant's: 1.5 frames, Wan 2), ``profile_block``
      (128), ``band_round`` (128): the official hard-coded profiling band and execution
      rounding constants.
    * ``block_size``: block of the covering :class:`BlockMask` (128, FlexAttention's).
    """

    grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    text_position: str = "last"
    prompt_length: int | None = None
    sparsity: float = 0.25
    num_sampled_rows: int = 64
    sample_max_row: int | None = 10000
    seed: int = 0
    rows: tuple[int, ...] | None = None
    variant: str | None = None
    profile_width: float | None = None
    profile_block: int = 128
    band_round: int = 128
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.rows is not None and not isinstance(self.rows, tuple):
            object.__setattr__(self, "rows", tuple(np.asarray(self.rows).reshape(-1).tolist()))

    def validate(self) -> None:
        if self.grid is None:
            raise InputError("grid: Sparse VideoGen needs the (T, H, W) video token grid, got None")
        check_range("text_tokens", self.text_tokens, 0, integer=True)
        check_choice("text_position", self.text_position, TEXT_POSITIONS)
        g = VideoGrid.from_params(self.grid, int(self.text_tokens), self.text_position)
        if self.prompt_length is not None:
            check_range("prompt_length", self.prompt_length, 0, g.text_tokens, integer=True)
            if self.text_position == "first" and int(self.prompt_length) != g.text_tokens:
                raise InputError(f"prompt_length: text padding exists only with text_position='last'"
                                 f" (CogVideoX treats all text tokens as real); got "
                                 f"{self.prompt_length} of {g.text_tokens}")
        check_range("sparsity", self.sparsity, 0.0, 1.0)
        check_range("num_sampled_rows", self.num_sampled_rows, 1, integer=True)
        if self.sample_max_row is not None:
            check_range("sample_max_row", self.sample_max_row, 1, integer=True)
        check_range("seed", self.seed, 0, integer=True)
        if self.rows is not None:
            if len(self.rows) == 0:
                raise InputError("rows: expected at least one sampled row, got ()")
            check_range("rows", self.rows, 0, g.seq_len - 1, integer=True)
        if self.variant is not None:
            check_choice("variant", self.variant, VARIANTS)
            if self.variant == "wan" and g.text_tokens != 0:
                raise InputError(f"variant: 'wan' has no text tokens (official context_length = 0),"
                                 f" got text_tokens={g.text_tokens}")
            want = {"hunyuan": "last", "cog": "first"}.get(self.variant)
            if want is not None and g.text_tokens > 0 and self.text_position != want:
                raise InputError(f"variant: {self.variant!r} puts the text {want}, got "
                                 f"text_position={self.text_position!r}")
        if self.profile_width is not None:
            check_range("profile_width", self.profile_width, 0.0)
        for name in ("profile_block", "band_round", "block_size"):
            check_range(name, getattr(self, name), 1, integer=True)


# ------------------------------------------------------------------------- geometry
def temporal_positions(g: VideoGrid) -> np.ndarray:
    """Position of every token in the temporal (token-major) order, int64 ``[L]``:
    video ``f*fs + p`` -> ``p*F + f`` (offset by the text segment when text is first)."""
    pos = np.arange(g.seq_len, dtype=np.int64)
    n = np.arange(g.video_tokens, dtype=np.int64)
    pos[g.video_slice] = g.video_offset + (n % g.frame_tokens) * g.T + n // g.frame_tokens
    return pos


def resolve_variant(p: SVGParams, g: VideoGrid) -> str:
    """Official rule set: ``p.variant``, or ``"wan"`` without text (``text_tokens == 0``,
    wan/inference.py ``context_length = 0``), else ``"cog"`` (text first) / ``"hunyuan"``."""
    if p.variant is not None:
        return str(p.variant)
    if g.text_tokens == 0:
        return "wan"
    return "cog" if g.text_position == "first" else "hunyuan"


def sparsity_to_width(sparsity: float, g: VideoGrid) -> float:
    """Official ``sparsity_to_width``: band half-width in frames for a kept fraction."""
    N = g.seq_len
    total = N ** 2
    s = (sparsity * total - 2 * N * g.text_tokens) / total
    return N * (1.0 - math.sqrt(1.0 - s)) / g.frame_tokens


def band_tokens(p: SVGParams, g: VideoGrid) -> int:
    """Execution band ``W`` (``round_to_multiple``): ``floor(w * fs / 128) * 128`` (hunyuan,
    cog; the mask is ``|q - kv| < W``) or ``ceil(w * fs / 128) * 128`` (wan; ``<= W``)."""
    w = sparsity_to_width(float(p.sparsity), g)
    rnd = math.ceil if resolve_variant(p, g) == "wan" else math.floor
    return int(rnd(w * g.frame_tokens / p.band_round) * p.band_round)


def execution_rows(pattern: int, rows: np.ndarray, p: SVGParams, g: VideoGrid) -> np.ndarray:
    """Rows ``rows`` (original token indices) of the execution mask: bool ``[R, L]``."""
    L = g.seq_len
    perm = temporal_positions(g) if pattern == 1 else np.arange(L, dtype=np.int64)
    pq, pk = perm[rows][:, None], perm[None, :]
    W = band_tokens(p, g)
    if resolve_variant(p, g) == "wan":      # wan/utils.py: abs(q - kv) <= W | kv < fs
        return (np.abs(pq - pk) <= W) | (pk < g.frame_tokens)
    band = np.abs(pq - pk) < W
    if g.text_position == "first":
        return band | (pq < g.text_tokens) | (pk < g.text_tokens)
    real = g.video_tokens + (g.text_tokens if p.prompt_length is None else int(p.prompt_length))
    text_col = (pk >= g.video_tokens) & (pk < real)
    text_row = (pq >= g.video_tokens) & (pq < real)
    both_real = (pq < real) & (pk < real)
    both_fake = (pq >= real) & (pk >= real)
    return (both_real & (band | text_col | text_row)) | both_fake


def profile_rows(pattern: int, rows: np.ndarray, p: SVGParams, g: VideoGrid) -> np.ndarray:
    """Rows ``rows`` of the profiling mask ``pattern`` (0 spatial, 1 temporal): bool ``[R, L]``."""
    L, pb = g.seq_len, int(p.profile_block)
    variant = resolve_variant(p, g)
    pw = PROFILE_WIDTH[variant] if p.profile_width is None else float(p.profile_width)
    wp = int((pw * g.frame_tokens) // pb)                # block_thres // block_size
    a, c = rows[:, None], np.arange(L, dtype=np.int64)[None, :]
    is_text = np.zeros(L, bool)
    is_text[g.text_slice] = True
    text = is_text[a] | is_text[c]
    if pattern == 0 and variant == "cog":
        # CogVideoX: band on absolute positions over ceil(N_v / pb) blocks
        lim = num_blocks(g.video_tokens, pb) * pb
        band = (a < lim) & (c < lim) & (np.abs(a // pb - c // pb) < wp)
        return text | band
    vid = (~is_text[a]) & (~is_text[c])
    pos = temporal_positions(g) if pattern == 1 else np.arange(L, dtype=np.int64)
    pa, pc = pos[a] - g.video_offset, pos[c] - g.video_offset
    band = vid & (np.abs(pa // pb - pc // pb) < wp)
    if variant == "wan":
        # first-frame sink [:, :frame_size] set before the permute: key position < fs
        return band | (pc < g.frame_tokens)
    if variant == "cog":
        # cog/utils.py: attention_mask[ctx:, ctx:] = pixel_attn_mask, no text row or column
        return band
    return text | band


def default_rows(p: SVGParams, g: VideoGrid) -> np.ndarray:
    """Sampled rows: ``p.rows``, or ``min(num_sampled_rows, L)`` uniform draws with replacement
    from ``[0, min(sample_max_row, L))`` with ``numpy.random.default_rng(seed)`` (the official
    ``torch.randint`` draw from ``[0, sample_mse_max_row)`` fails when that exceeds ``L``)."""
    if p.rows is not None:
        return np.asarray(p.rows, np.int64)
    L = g.seq_len
    hi = L if p.sample_max_row is None else min(int(p.sample_max_row), L)
    n = min(int(p.num_sampled_rows), L)
    return np.random.default_rng(int(p.seed)).integers(0, hi, size=n).astype(np.int64)


# ------------------------------------------------------------------------------- scoring
def svg_masked_row_mse(q: np.ndarray, k: np.ndarray, v: np.ndarray, rows: np.ndarray,
                       masks: np.ndarray, scale: float, *,
                       out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """Sampled-row output error of each candidate mask (``sample_mse``).

    q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]``, v ``[B, Hkv, L, Dv]``, ``rows`` int ``[R]``
    (query rows), ``masks`` bool ``[M, R, L]`` (row ``r`` of mask ``m`` over all keys). With
    ``o_r = softmax(s q_r K^T) V`` (all keys) and ``o_{m,r}`` the softmax over the keys of
    mask ``m``::

        mse[b, h, m] = 1/(R Dv) sum_r sum_d (o_{m,r,d} - o_{r,d})^2

    A sampled row with no key in mask ``m`` has ``o_{m,r} = NaN`` (the official softmax of an
    all-``-inf`` row), so ``mse[b, h, m]`` is NaN for every head (part of the specification:
    the op is defined with ``equal_nan=True``). Returns ``(mse,)`` float64 ``[B, Hq, M]``.
    """
    Bn, Hq = q.shape[:2]
    Hkv, Dv = k.shape[1], v.shape[3]
    G, M, R = Hq // Hkv, masks.shape[0], rows.shape[0]
    mse = np.empty((Bn, Hq, M), np.float64) if out is None else out[0]
    for b in range(Bn):
        for h in range(Hq):
            kk, vv = k[b, h // G].astype(np.float64), v[b, h // G].astype(np.float64)
            s = (q[b, h][rows].astype(np.float64) @ kk.T) * scale              # [R, L]
            e = np.exp(s - s.max(axis=1, keepdims=True))
            gold = (e @ vv) / e.sum(axis=1, keepdims=True)                      # [R, Dv]
            for m in range(M):
                # masked softmax with its own row maximum (exact even where every visible
                # logit is far below the row's global maximum)
                sm = np.where(masks[m], s, -np.inf).max(axis=1, keepdims=True)
                ok = np.isfinite(sm)
                em = np.where(masks[m], np.exp(s - np.where(ok, sm, 0.0)), 0.0)
                den = em.sum(axis=1, keepdims=True)
                o = np.where(ok, (em @ vv) / np.where(ok, den, 1.0), np.nan)   # NaN: no key
                mse[b, h, m] = ((o - gold) ** 2).sum() / (R * Dv)
    return (mse,)


# NaN (a sampled row without a visible key) is part of the output: kernels must reproduce it.
SVG_SCORE = define_op("svg_masked_row_mse", svg_masked_row_mse, outputs=("mse",), kind="array",
                      equal_nan=True)


def choose_heads(mse: np.ndarray) -> np.ndarray:
    """``torch.argmin(mse, -1)`` with PyTorch's NaN rule (``LessOrNan``): the index of the
    first NaN if there is one, else of the first minimum (ties: spatial). int64 ``[B, Hq]``."""
    nan = np.isnan(mse)
    return np.where(nan.any(-1), np.argmax(nan, -1), np.argmin(mse, -1)).astype(np.int64)


# -------------------------------------------------------------------------- token mask
class SVGTokenMask:
    """Token-level SVG execution mask: one pattern per (batch, query head).

    ``pattern`` int ``[B, H]`` (0 spatial, 1 temporal); rows are built on demand from the
    geometry (two distinct matrices at most), so nothing ``L x L`` is stored. Implements the
    token-mask protocol of ``refattn.attention``: ``q_len``, ``k_len``, ``batch_heads()``,
    ``token_rows(b, h0, h1, r0, r1) -> bool [h1-h0, r1-r0, L]``, plus ``to_token_mask()``.
    """

    def __init__(self, pattern: np.ndarray, params: SVGParams, grid: VideoGrid) -> None:
        self.pattern = np.array(pattern, dtype=np.int64)
        self.pattern.setflags(write=False)
        self.params, self.grid = params, grid
        self.q_len = self.k_len = grid.seq_len

    def batch_heads(self) -> tuple[int, int]:
        return tuple(self.pattern.shape)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (f"SVGTokenMask(grid={self.grid.shape}, text={self.grid.text_tokens}, "
                f"temporal_heads={int(self.pattern.sum())}/{self.pattern.size})")

    def token_rows(self, b: int, h0: int, h1: int, r0: int, r1: int) -> np.ndarray:
        pat = self.pattern[b if self.pattern.shape[0] > 1 else 0, h0:h1]
        rows = np.arange(r0, r1, dtype=np.int64)
        built = {int(t): execution_rows(int(t), rows, self.params, self.grid) for t in np.unique(pat)}
        return np.stack([built[int(t)] for t in pat])

    def to_token_mask(self, causal: bool = False) -> np.ndarray:
        """Dense bool ``[B, H, L, L]`` (small problems only)."""
        if causal:
            raise InputError("causal: Sparse VideoGen masks are bidirectional")
        Bn, H = self.pattern.shape
        return np.stack([self.token_rows(b, 0, H, 0, self.q_len) for b in range(Bn)])

    def covering_blockmask(self, block: int) -> BlockMask:
        """Smallest :class:`BlockMask` on ``block x block`` tiles holding every allowed pair."""
        L, nb = self.q_len, num_blocks(self.q_len, block)
        starts = np.arange(nb) * block
        cover = {}
        R = max(block, rows_per_chunk(L, 2 * L, 0, "SVG covering mask") // block * block)
        for t in np.unique(self.pattern):
            m = np.zeros((nb, nb), bool)
            for r0 in range(0, L, R):
                r1 = min(L, r0 + R)
                rows = execution_rows(int(t), np.arange(r0, r1), self.params, self.grid)
                cols = np.logical_or.reduceat(rows, starts, axis=1)
                m[r0 // block: num_blocks(r1, block)] = np.logical_or.reduceat(
                    cols, np.arange(0, r1 - r0, block), axis=0)
            cover[int(t)] = m
        dense = np.stack([np.stack([cover[int(t)] for t in row]) for row in self.pattern])
        return BlockMask(dense, block_q=block, block_k=block, q_len=L, k_len=L)


# ----------------------------------------------------------------------------- selection
@register_method(
    "svg", SVGParams, kind="video", needs_v=True,
    summary="per-head spatial/temporal classification by sampled-row output MSE of two "
            "profiling masks; band mask in frame-major (spatial) or token-major (temporal) order",
    paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: SVGParams, *,
           causal: bool = False, backend: str = "numpy") -> Selection:
    """Sparse VideoGen on canonical arrays q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]``.

    Returns a :class:`Selection` whose ``extras["token_mask"]`` (:class:`SVGTokenMask`) is
    what ``refattn.attention`` runs; ``mask`` is its covering block mask (``block_size``);
    ``scores``/``boundary`` are ``None`` (the rule ranks heads, not blocks). ``extras``:
    ``pattern`` (str ``[B, Hq]``, ``"spatial"``/``"temporal"``), ``best_mask_idx`` (int,
    0/1 as the official code), ``mse`` ``[B, Hq, 2]`` (NaN where a sampled row sees no key
    under that profiling mask), ``rows`` (sampled), ``band`` (execution band in tokens),
    ``width_frames``, ``variant`` (the rule set used), ``profile_masks`` ``[2, R, L]``.
    """
    if causal:
        raise InputError("causal: Sparse VideoGen is bidirectional (video DiT); pass causal=False "
                         "(CLI: --no-causal)")
    if v is None:
        raise InputError("v: Sparse VideoGen profiles attention outputs and needs v")
    p = params
    g = VideoGrid.from_params(p.grid, int(p.text_tokens), p.text_position)
    g.check_seq_len(q.shape[2], "q_len")
    g.check_seq_len(k.shape[2], "k_len")
    rows = default_rows(p, g)
    masks = np.stack([profile_rows(0, rows, p, g), profile_rows(1, rows, p, g)])
    scale = 1.0 / math.sqrt(q.shape[3])
    (mse,) = dispatch(SVG_SCORE.name, backend, (q, k, v))(q, k, v, rows, masks, scale)
    mse = np.asarray(mse, np.float64)
    best = choose_heads(mse)                  # first NaN, else first minimum (spatial on ties)
    tm = SVGTokenMask(best, p, g)
    return Selection(
        mask=tm.covering_blockmask(int(p.block_size)),
        extras={"token_mask": tm, "pattern": np.array(PATTERNS)[best], "best_mask_idx": best,
                "mse": mse, "rows": rows, "band": band_tokens(p, g),
                "variant": resolve_variant(p, g),
                "width_frames": sparsity_to_width(float(p.sparsity), g), "profile_masks": masks})
