"""VMoBA -- Mixture-of-Block Attention for video diffusion models.

Paper: Wu et al., "VMoBA: Mixture-of-Block Attention for Video Diffusion Models", arXiv
2506.23858. Official code: ``KwaiVGI/VMoBA@4da72ff2e17f2e0e87bd79b31e30f16d8ead3e70``
(``src/vmoba.py``: ``process_moba_input``, ``calc_chunks``, ``moba_attn_varlen``,
``_select_threshold_*``); layer -> partition cycle and configs from
``hao-ai-lab/FastVideo@2f3d4074064e4d86f99dc784ebbaa296e6f5925f``
(``fastvideo/attention/backends/vmoba.py``). Spec: ``video-kv.md`` section 1.

Rule, per batch of videos packed as the official varlen call packs them:

1. Partition (:mod:`refattn.core.video_grid`): layer ``l`` uses 1D frame groups, 2D spatial
   tubes or 3D cubes (cycle 1D, 2D, 3D); q, k, v are permuted so blocks are contiguous.
2. Gate (fp32 in the official code, float64 here): ``kbar_c = mean_{j in c} K_j`` over the
   true block length, ``g[c, h, s] = <kbar_c, Q_s>`` -- no ``1/sqrt(D)``, no softmax.
   Cells pairing a query with a block of another batch element are invalid (``-inf``).
3. Selection, ``threshold`` mode, over a group ``G`` (``query_head``: the blocks of one
   (head, query); ``head_global``: all (block, query) cells of a head -- the paper's "global
   block selection"; ``block``: all (head, query) cells of a block; ``overall``: everything)::

       gn = (g - min_G g) / (max_G g - min_G g)   (denominator 1 if <= 1e-6), 0 on invalid
       r  = max(0, tau - sum_self gn / (sum_G gn + 1e-6))
       sort the non-self cells by gn descending (self cells enter as 0; ``overall`` sorts
       only valid non-self cells); keep the first k with cumsum/(sum_G gn + 1e-6) >= r
       (all if none) -- so at least one extra cell per group; final = valid & (kept | self)

   ``topk`` mode: self cells get ``+1e9``, then top-``min(topk, C)`` blocks per (head,
   query) / top-``topk*S`` cells per head / top-``topk*H*S`` cells overall.
4. Attention of query ``s`` over the union of its self block and its selected blocks
   (softmax scale ``D^-1/2``, bidirectional). If no non-self cell is selected anywhere the
   official code runs plain full attention.

Ties: lower flattened cell index first (the official ``torch.sort``/``topk`` is unstable).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.blockmask import BlockMask
from ..core.errors import InputError
from ..core.registry import define_op, dispatch
from ..core.scores import BlockScores, Selection
from ..core.video_grid import GridPartition, PartitionTokenMask, VideoGrid, layer_partition_kind
from ..methods.base import check_choice, check_range, register_method
from ..reference.memory import rows_per_chunk

PAPER = "Wu et al., VMoBA: Mixture-of-Block Attention for Video Diffusion Models, arXiv 2506.23858"
CODE = "KwaiVGI/VMoBA@4da72ff2e17f2e0e87bd79b31e30f16d8ead3e70"
SELECT_MODES = ("threshold", "topk")
THRESHOLD_TYPES = ("query_head", "head_global", "block", "overall")
EPS = 1e-6             # official eps of the min-max denominator and of the mass ratio
SELF_BOOST = 1e9       # official amplification of self cells in topk mode


@dataclass(frozen=True)
class VmobaParams:
    """VMoBA parameters (official names in brackets). Defaults: FastVideo's Wan2.1-1.3B
    480p config (``wan_1.3B_77_480_832.json``) and ``moba_attn_varlen``'s defaults.

    * ``grid`` (T, H, W) latent token grid; ``text_tokens`` must be 0 (VMoBA's sequence is
      video only: Wan's text enters through cross-attention).
    * ``layer_idx``: selects the partition through the 1D-2D-3D cycle
      (``temporal_layer``, ``spatial_layer``, ``st_layer``, ``first_full_layer``);
      ``partition`` ("1d"/"2d"/"3d") overrides the cycle when set.
    * ``temporal_chunk`` [1D ``moba_chunk_size``, frames, float accepted],
      ``spatial_chunk`` [2D (c_h, c_w)], ``st_chunk`` [3D (c_t, c_h, c_w)].
    * ``temporal_topk``, ``spatial_topk``, ``st_topk`` [``moba_topk``], used in ``topk`` mode.
    * ``select_mode``, ``threshold_type``, ``simsum_threshold`` (tau).
    """

    grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    layer_idx: int = 0
    partition: str | None = None
    temporal_chunk: float = 2
    spatial_chunk: tuple[int, int] = (3, 4)
    st_chunk: tuple[int, int, int] = (4, 6, 4)
    temporal_topk: int = 3
    spatial_topk: int = 20
    st_topk: int = 15
    select_mode: str = "threshold"
    threshold_type: str = "query_head"
    simsum_threshold: float = 0.25
    temporal_layer: int = 1
    spatial_layer: int = 1
    st_layer: int = 1
    first_full_layer: int = 0

    def validate(self) -> None:
        VideoGrid.from_params(self.grid, self.text_tokens)
        if self.text_tokens != 0:
            raise InputError(f"text_tokens: VMoBA attends video tokens only (official code has no "
                             f"text segment); expected 0, got {self.text_tokens}")
        check_range("layer_idx", self.layer_idx, 0, integer=True)
        if self.partition is not None:
            check_choice("partition", self.partition, ("1d", "2d", "3d"))
        check_range("temporal_chunk", self.temporal_chunk, 0, lo_open=True)
        for name, val, n in (("spatial_chunk", self.spatial_chunk, 2), ("st_chunk", self.st_chunk, 3)):
            if np.asarray(val).shape != (n,):
                raise InputError(f"{name}: expected {n} integers, got {val!r}")
            check_range(name, val, 1, integer=True)
        for name in ("temporal_topk", "spatial_topk", "st_topk"):
            check_range(name, getattr(self, name), 1, integer=True)
        check_choice("select_mode", self.select_mode, SELECT_MODES)
        check_choice("threshold_type", self.threshold_type,
                     THRESHOLD_TYPES if self.select_mode == "threshold" else ("query_head", "head_global", "overall"))
        check_range("simsum_threshold", self.simsum_threshold, 0.0, 1.0)
        for name in ("temporal_layer", "spatial_layer", "st_layer", "first_full_layer"):
            check_range(name, getattr(self, name), 0, integer=True)
        if self.temporal_layer + self.spatial_layer + self.st_layer < 1:
            raise InputError("temporal_layer + spatial_layer + st_layer: expected >= 1, got 0")

    def partition_kind(self) -> str:
        if self.partition is not None:
            return self.partition
        return layer_partition_kind(self.layer_idx, self.temporal_layer, self.spatial_layer,
                                    self.st_layer, self.first_full_layer)

    def make_partition(self, grid: VideoGrid) -> tuple[GridPartition, int]:
        """The partition of this layer and its ``moba_topk``."""
        kind = self.partition_kind()
        chunk, topk = {"1d": (self.temporal_chunk, self.temporal_topk),
                       "2d": (tuple(self.spatial_chunk), self.spatial_topk),
                       "3d": (tuple(self.st_chunk), self.st_topk)}[kind]
        return grid.partition(kind, chunk), int(topk)


# ----------------------------------------------------------------------------- gate
def vmoba_gate(q: np.ndarray, k: np.ndarray, bounds: np.ndarray, *,
               out: tuple[np.ndarray] | None = None) -> tuple[np.ndarray]:
    """VMoBA gate ``g[b, h, s, c] = <Q[b,h,s], kbar[b,g,c]>``, float64 ``[B, Hq, S, C]``.

    q ``[B, Hq, S, D]`` and k ``[B, Hkv, S, D]`` already in the partition's order; ``bounds``
    int64 ``[C+1]``, block ``c`` = positions ``bounds[c]:bounds[c+1]`` (``bounds[0] = 0``,
    ``bounds[-1] = S``). ``kbar_c = (1/|c|) sum_{j in c} K_j`` over the true block length
    (official: fp32 sums of fp32-cast keys; here float64). GQA: head ``h`` reads kv head
    ``h // (Hq/Hkv)`` (the official code has no GQA).
    """
    Bn, Hq, S, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    bnd = np.asarray(bounds, dtype=np.int64)
    C = bnd.size - 1
    lengths = np.diff(bnd).astype(np.float64)
    kk = k.astype(np.float64)
    kbar = np.add.reduceat(kk, bnd[:-1], axis=2) / lengths[:, None]        # [B, Hkv, C, D]
    gate = np.empty((Bn, Hq, S, C), np.float64) if out is None else out[0]
    R = rows_per_chunk(S, 8 * G * (D + C), 8 * (gate.size + kbar.size), "vmoba gate")
    for b in range(Bn):
        for g in range(Hkv):
            for r0 in range(0, S, R):
                r1 = min(r0 + R, S)
                qq = q[b, g * G:(g + 1) * G, r0:r1].astype(np.float64)     # [G, R, D]
                gate[b, g * G:(g + 1) * G, r0:r1] = qq @ kbar[b, g].T       # [G, R, C]
    return (gate,)


VMOBA_GATE = define_op("vmoba_gate", vmoba_gate, outputs=("gate",), kind="array")


# ------------------------------------------------------------------------ selection
def _groups(x: np.ndarray, threshold_type: str) -> np.ndarray:
    """View ``[C, H, S]`` cells as ``[groups, cells]`` in the official flattening order."""
    C, H, S = x.shape
    if threshold_type == "query_head":
        return x.transpose(1, 2, 0).reshape(H * S, C)       # group (h, s), cell c
    if threshold_type == "head_global":
        return x.transpose(1, 0, 2).reshape(H, C * S)       # group h, cell c*S + s
    if threshold_type == "block":
        return x.reshape(C, H * S)                          # group c, cell h*S + s
    return x.reshape(1, C * H * S)                          # overall


def _ungroup(y: np.ndarray, shape: tuple[int, int, int], threshold_type: str) -> np.ndarray:
    C, H, S = shape
    if threshold_type == "query_head":
        return y.reshape(H, S, C).transpose(2, 0, 1)
    if threshold_type == "head_global":
        return y.reshape(H, C, S).transpose(1, 0, 2)
    return y.reshape(C, H, S)


def _threshold(g: np.ndarray, valid: np.ndarray, selfm: np.ndarray, tau: float,
               only_candidates: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative min-max-normalised mass rule on groups ``[G, N]``; returns kept, boundary."""
    mn = np.where(valid, g, np.inf).min(axis=1, keepdims=True)
    mx = np.where(valid, g, -np.inf).max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        den = mx - mn
        den = np.where(den <= EPS, 1.0, den)                   # also catches an all-invalid group
        gn = np.where(valid, (np.where(valid, g, 0.0) - np.where(np.isfinite(mn), mn, 0.0)) / den, 0.0)
    tot = gn.sum(axis=1, keepdims=True)
    self_sum = np.where(selfm, gn, 0.0).sum(axis=1, keepdims=True)
    r = np.maximum(0.0, tau - self_sum / (tot + EPS))
    others = np.where(selfm, 0.0, gn)
    cand = (valid & ~selfm) if only_candidates else np.ones_like(valid)
    key = np.where(cand, others, -np.inf)
    order = np.argsort(-key, axis=1, kind="stable")            # descending, lower index first
    srt = np.take_along_axis(others * cand, order, axis=1)
    n_cand = cand.sum(axis=1)
    ratio = np.cumsum(srt, axis=1) / (tot + EPS)
    cond = (ratio >= r) & (np.arange(g.shape[1])[None, :] < n_cand[:, None])
    cutoff = np.where(cond.any(axis=1), cond.argmax(axis=1), n_cand - 1)   # -1: nothing
    in_sorted = np.arange(g.shape[1])[None, :] <= cutoff[:, None]
    kept = np.zeros_like(valid)
    np.put_along_axis(kept, order, in_sorted, axis=1)
    crossing = np.take_along_axis(order, np.maximum(cutoff, 0)[:, None], axis=1)
    at_self = np.take_along_axis(selfm, crossing, axis=1)[:, 0]
    # a crossing on a (zeroed) self cell has no score of its own to report
    boundary = np.where((cutoff >= 0) & ~at_self, np.take_along_axis(g, crossing, axis=1)[:, 0], np.nan)
    return kept, boundary


def _topk(g: np.ndarray, k: int, selfm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` per group of ``g`` (self boosted, invalid ``-inf``); kept, boundary."""
    key = np.where(selfm, g + SELF_BOOST, g)
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    kept = np.zeros(g.shape, bool)
    np.put_along_axis(kept, order, True, axis=1)
    last = order[:, -1:]
    bval = np.take_along_axis(g, last, axis=1)[:, 0]
    boundary = np.where(np.take_along_axis(selfm, last, axis=1)[:, 0], np.nan, bval)
    return kept, boundary


def select_cells(gate: np.ndarray, valid: np.ndarray, self_mask: np.ndarray, *,
                 select_mode: str = "threshold", threshold_type: str = "query_head",
                 simsum_threshold: float = 0.25, topk: int = 3
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The official selection on the official layout ``[C, H, S]`` (packed sequence).

    ``gate`` raw gate, ``valid`` (query and block in the same batch element), ``self_mask``
    (query inside the block). Returns ``final`` bool ``[C, H, S]`` (selection *including*
    the self cells; the MoBA-branch mask is ``final & ~self_mask``) and ``boundary`` float64
    ``[C, H, S]``: the raw gate of the group's crossing (threshold) or k-th (topk) cell for
    every cell of the group (``nan`` where that cell is a self cell or nothing was kept).
    """
    check_choice("select_mode", select_mode, SELECT_MODES)
    shape = gate.shape
    C, H, S = shape
    g = np.asarray(gate, dtype=np.float64)
    valid = np.asarray(valid, bool)
    selfm = np.asarray(self_mask, bool)
    if select_mode == "threshold":
        check_choice("threshold_type", threshold_type, THRESHOLD_TYPES)
        kept, bnd = _threshold(_groups(g, threshold_type), _groups(valid, threshold_type),
                               _groups(selfm, threshold_type), float(simsum_threshold),
                               threshold_type == "overall")
        kept = _ungroup(kept, shape, threshold_type)
        final = valid & (kept | selfm)
    else:
        check_choice("threshold_type", threshold_type, ("query_head", "head_global", "overall"))
        k = min(int(topk), C)                                   # official: min(moba_topk, C)
        per = {"query_head": k, "head_global": k * S, "overall": k * H * S}[threshold_type]
        gv = np.where(valid, g, -np.inf)
        kept, bnd = _topk(_groups(gv, threshold_type), per, _groups(selfm, threshold_type))
        kept = _ungroup(kept, shape, threshold_type)
        # official quirk: head_global topk does not AND with the valid mask
        final = kept if threshold_type == "head_global" else (valid & kept)
    n_groups = bnd.shape[0]
    per_group = np.broadcast_to(bnd[:, None], (n_groups, _groups(g, threshold_type).shape[1]))
    return final, _ungroup(np.ascontiguousarray(per_group), shape, threshold_type)


def packed_cells(bounds: np.ndarray, S: int, batch: int, H: int) -> tuple[np.ndarray, np.ndarray]:
    """``valid`` and ``self_mask`` bool ``[B*C, H, B*S]`` of ``batch`` equal sequences packed
    as the official varlen call packs them (block ``b*C + c`` belongs to sequence ``b``)."""
    C = bounds.size - 1
    pos = np.arange(batch * S)
    seq_of_pos, p = pos // S, pos % S
    blk = np.searchsorted(bounds, p, side="right") - 1
    cb = np.arange(batch * C)
    valid = (cb // C)[:, None] == seq_of_pos[None, :]
    selfm = valid & ((cb % C)[:, None] == blk[None, :])
    return (np.broadcast_to(valid[:, None, :], (batch * C, H, batch * S)),
            np.broadcast_to(selfm[:, None, :], (batch * C, H, batch * S)))


@register_method("vmoba", VmobaParams, kind="video",
                 summary="mean-key gate on 1D/2D/3D video blocks (cycled per layer); "
                         "min-max-normalised cumulative threshold or top-k; self block always",
                 paper=PAPER, code=CODE)
def select(q: np.ndarray, k: np.ndarray, v: np.ndarray | None, params: VmobaParams, *,
           causal: bool = False, backend: str = "numpy") -> Selection:
    """VMoBA on canonical arrays q ``[B, Hq, L, D]``, k ``[B, Hkv, L, D]`` in the grid's
    row-major token order (``L = T*H*W``).

    Returns a :class:`Selection` whose ``mask`` is in the **permuted** order (``block_q=1``:
    one row per permuted query position, ``block_k`` = block length, ``[B, Hq, L, C]``),
    ``scores`` the gate there, ``forced`` the self blocks, and ``extras``:
    ``token_mask`` (the same selection in the original order, what ``refattn.attention``
    runs), ``perm``/``bounds`` (the partition), ``partition`` ("1d"/"2d"/"3d"), ``gate``,
    ``dense_fallback`` (True when no extra block was selected anywhere: full attention).
    Batch elements are packed as in the official varlen call, so ``head_global``/``overall``
    normalise and rank across the whole batch.
    """
    if causal:
        raise InputError("causal: VMoBA is bidirectional (video DiT self-attention); pass "
                         "causal=False (CLI: --no-causal)")
    grid = VideoGrid.from_params(params.grid, params.text_tokens)
    if q.shape[2] != k.shape[2]:
        raise InputError(f"q/k: VMoBA is self-attention; q_len {q.shape[2]} != k_len {k.shape[2]}")
    grid.check_seq_len(q.shape[2], "q/k sequence length")
    part, topk = params.make_partition(grid)
    qp, kp = part.permute(q, axis=2), part.permute(k, axis=2)
    bounds = part.bounds
    (gate,) = dispatch(VMOBA_GATE.name, backend, (qp, kp))(qp, kp, bounds)   # [B, H, S, C]
    Bn, H, S, C = gate.shape
    # the selection holds ~12 float64/int64 arrays of the packed [B*C, H, B*S] cells at once
    rows_per_chunk(1, 96 * (Bn * C) * H * (Bn * S), 8 * gate.size, "vmoba selection")
    # official layout [C_total, H, S_total]: sequence b owns blocks b*C.. and positions b*S..
    packed = np.full((Bn * C, H, Bn * S), -np.inf)
    for b in range(Bn):
        packed[b * C:(b + 1) * C, :, b * S:(b + 1) * S] = gate[b].transpose(2, 0, 1)
    valid, selfm = packed_cells(bounds, S, Bn, H)
    final, bnd = select_cells(packed, valid, selfm, select_mode=params.select_mode,
                              threshold_type=params.threshold_type,
                              simsum_threshold=params.simsum_threshold, topk=topk)
    dense = not bool((final & ~selfm).any())
    sel = np.empty((Bn, H, S, C), bool)
    boundary = np.empty((Bn, H, S, C), np.float64)
    for b in range(Bn):
        blk = (slice(b * C, (b + 1) * C), slice(None), slice(b * S, (b + 1) * S))
        sel[b] = final[blk].transpose(1, 2, 0)
        boundary[b] = bnd[blk].transpose(1, 2, 0)
    own = selfm[:C, 0, :S].T                                                # [S, C]
    if dense:
        sel[:] = True
    geo = dict(block_q=1, block_k=int(np.max(np.diff(bounds))), q_len=S, k_len=S)
    return Selection(
        mask=BlockMask(sel, **geo),
        scores=BlockScores(gate, **geo),
        boundary=boundary,
        forced=np.broadcast_to(own, sel.shape),
        extras={"token_mask": None if dense else PartitionTokenMask(part, sel, "token", text_dense=False),
                "perm": part.perm, "bounds": bounds, "partition": part.kind, "topk": topk,
                "gate": gate, "dense_fallback": dense},
    )

