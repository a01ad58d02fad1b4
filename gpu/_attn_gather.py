"""Per-token routing (``block_q == 1``, MoBA): the FlashMoBA-style gather kernels of
``attn_fwd.cu`` / ``attn_bwd.cu`` (bf16/fp16, D == Dv in {64, 128}, block_k % 64 == 0).

The query rows that chose a key block are gathered into dense tiles (:func:`_gather_plan`,
cached on the device per mask); the forward computes one partial result per (row, key
block) pair and merges each row's partials (``attn_combine``); the backward walks the same
plan kv-major. The tile height ``BM`` comes from the caller (``attention.GATHER_BM``).

On Hopper, :func:`fwd_gather_wgmma` (``attn_gather_wgmma.cu``: wgmma + TMA, the key block
held in shared memory for up to ``MOBA_WGMMA_CONFIG["rows"]`` gathered rows, 16-bit
partials) replaces the forward where :func:`moba_wgmma_enabled` and
:func:`_moba_wgmma_fits` say so (``attention.attention_fwd`` chooses).
"""
from __future__ import annotations

import os
from typing import Any

import cupy as cp
import numpy as np

from refattn.core.blockmask import BlockMask
from refattn.core.layout import AttnShape

from ._attn_common import _CT, _NULL, _cached, _Dev, _strides
from ._attn_wgmma import _tensor_maps_boxes
from ._build import device_cc, get_kernel, launch


def _gather_plan(mask: BlockMask, shape: AttnShape, BM: int = 64) -> dict[str, Any]:
    """Per-token routing (block_q = 1) regrouped by key block, on the device.

    Pairs (b, h, row, kb) are numbered in row-major order (``row_ptr [B*Hq*Sq + 1]`` gives
    each row's pairs, for the combine). ``g_rows``/``g_pair`` list the pairs again grouped by
    segment (b, h, kb), rows ascending; ``seg_off``/``seg_cnt`` delimit the segments and
    ``tile_seg``/``tile_start`` cut them into ``BM``-row tiles.
    """
    def build() -> dict[str, Any]:
        B, Hq, Sq = shape.batch, shape.q_heads, shape.q_len
        Kb = mask.num_k_blocks
        m = cp.asarray(mask.mask)
        m = cp.ascontiguousarray(cp.broadcast_to(m, (B, Hq, Sq, Kb)))
        counts = m.sum(axis=-1, dtype=cp.int64).ravel()
        row_ptr = cp.zeros(counts.size + 1, cp.int64)
        cp.cumsum(counts, out=row_ptr[1:])
        flat = cp.flatnonzero(m.ravel())                      # (b, h, row, kb) row-major
        kb = flat % Kb
        bhr = flat // Kb
        row = bhr % Sq
        bh = bhr // Sq
        seg = bh * Kb + kb
        order = cp.argsort(seg * Sq + row)
        nseg = B * Hq * Kb
        seg_cnt = cp.bincount(seg, minlength=nseg).astype(cp.int64)
        seg_off = cp.zeros(nseg, cp.int64)
        if nseg > 1:
            cp.cumsum(seg_cnt[:-1], out=seg_off[1:])
        ntiles = (seg_cnt + BM - 1) // BM
        tile_end = cp.cumsum(ntiles)
        total = int(tile_end[-1]) if nseg else 0
        tid = cp.arange(total, dtype=cp.int64)
        tile_seg = cp.searchsorted(tile_end, tid, side="right")
        tile_start = (tid - (tile_end[tile_seg] - ntiles[tile_seg])) * BM
        return {"row_ptr": row_ptr, "g_rows": row[order].astype(cp.int32),
                "g_pair": order.astype(cp.int64), "seg_off": seg_off,
                "seg_cnt": seg_cnt.astype(cp.int32), "tile_seg": tile_seg.astype(cp.int32),
                "tile_start": tile_start.astype(cp.int32), "nnz": int(flat.size),
                "ntiles": total, "Kb": Kb}
    return _cached(("G", shape.batch, shape.q_heads, BM), mask, build)

def fwd_gather(qd: _Dev, kd: _Dev, vd: _Dev, shape: AttnShape, m: BlockMask, o: Any, lse: Any,
               sl2: Any, cz: Any, BM: int) -> None:
    """Forward: ``attn_fwd_gather`` over the plan's ``BM``-row tiles (partial out / LSE per
    pair), then ``attn_combine`` into ``o`` ``[B, Hq, Sq, Dv]`` and ``lse`` ``[B, Hq, Sq]``."""
    B, Hq, Hkv, Sq, Sk, D = (shape.batch, shape.q_heads, shape.kv_heads, shape.q_len,
                             shape.k_len, shape.head_dim)
    T = _CT.get(qd.kind)
    strides = _strides(qd, kd, vd)
    elem = 2
    BN = 64
    plan = _gather_plan(m, shape, BM)
    nnz = plan["nnz"]
    part_o = cp.empty((max(nnz, 1), D), cp.float32)
    part_lse = cp.empty((max(nnz, 1),), cp.float32)
    fn = get_kernel("attn_fwd.cu", f"attn_fwd_gather<{T}, {D}, {BM}>")
    smem = (BM * (D + 8) + 4 * BN * (D + 8)) * elem + BM * 4
    launch(fn, (plan["ntiles"],), (128,),
           (qd.raw, kd.raw, vd.raw, part_o, part_lse) + strides +
           (np.int32(Hq), np.int32(Hkv), np.int32(Sq), np.int32(Sk), sl2, cz,
            _NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int32(0),
            np.int32(1), np.int32(m.block_k), plan["tile_seg"], plan["tile_start"],
            plan["seg_off"], plan["seg_cnt"], plan["g_rows"], plan["g_pair"],
            np.int32(plan["Kb"])), smem)
    rows = B * Hq * Sq
    comb = get_kernel("attn_fwd.cu", f"attn_combine<{D}>")
    launch(comb, (-(-rows // 4),), (128,),
           (part_o, part_lse, plan["row_ptr"], o, lse, np.int64(rows)))


def bwd_gather(m: BlockMask, shape: AttnShape, T: str, BN: int, grid: tuple[int, ...],
               block: tuple[int, ...], common: tuple[Any, ...], smem: int, BM: int) -> None:
    """Backward: ``attn_bwd_gather<T, D, BN>`` over the forward's plan (cached; ``BM`` the
    forward's tile height), with the launch geometry and the leading arguments (``common``)
    that it shares with ``attn_bwd_block``."""
    D = shape.head_dim
    plan = _gather_plan(m, shape, BM)  # the forward's plan (cached)
    fn = get_kernel("attn_bwd.cu", f"attn_bwd_gather<{T}, {D}, {BN}>")
    launch(fn, grid, block, common +
           (_NULL, _NULL, np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int32(0),
            np.int32(1), np.int32(m.block_k), plan["seg_off"], plan["seg_cnt"],
            plan["g_rows"], np.int32(plan["Kb"])), smem)


# ----------------------------------------------------------------------------- wgmma (sm_90a)
#: Value of ``REFATTN_MOBA_WGMMA`` when unset: "1" runs ``attn_gather_wgmma.cu`` (Hopper,
#: key-block-stationary wgmma gather) where it fits; "0" keeps per-token routing on the
#: mma.sync gather kernels. On since the H200 probe passed every case (1.3-1.4x the mma.sync
#: gather; docs/gpu_notes.md, "v-wgmma-moba").
MOBA_WGMMA_DEFAULT = "1"
#: Tunables of the wgmma gather: ``rows`` gathered query rows per CTA (a multiple of 128: the
#: CTA keeps its key block in shared memory for rows / 128 query tiles), ``stages`` depth of
#: the gathered-Q ring, ``partial`` the type of the per-(row, block) partial outputs: "t" (the
#: input's 16-bit type: half the bytes, 1.43x; its error was 3x the mma.sync path's) or "f32"
#: (1.32-1.34x, the same error as mma.sync: the default, exactness first).
MOBA_WGMMA_CONFIG: dict[str, Any] = {"rows": 512, "stages": 2, "partial": "f32"}
_MOBA_WGMMA_BROKEN: list[str] = []  # a build failure, remembered: the path then stays off


def moba_wgmma_enabled() -> bool:
    """``REFATTN_MOBA_WGMMA`` (default :data:`MOBA_WGMMA_DEFAULT`) is not "0", the device is
    sm_90 and no earlier build of the kernel failed."""
    if (os.environ.get("REFATTN_MOBA_WGMMA", MOBA_WGMMA_DEFAULT).strip() == "0"
            or _MOBA_WGMMA_BROKEN):
        return False
    try:
        return device_cc() == 90
    except Exception:  # pragma: no cover - no device
        return False


def _moba_wgmma_fits(q: _Dev, shape: AttnShape, mask: BlockMask) -> bool:
    """16-bit q, D == Dv in {64, 128}, block_k in {64, 128} (one key tile per pair)."""
    return (q.kind in ("float16", "bfloat16") and shape.head_dim == shape.v_dim
            and shape.head_dim in (64, 128) and mask.block_q == 1 and mask.block_k in (64, 128))


def moba_wgmma_kernel(T: str, PT: str, D: int, BN: int, stages: int) -> tuple[Any, str]:
    """The wgmma gather kernel and its template name (``T``, ``PT`` C++ type names)."""
    name = f"attn_fwd_gather_wgmma<{T}, {PT}, {D}, {BN}, {stages}>"
    return get_kernel("attn_gather_wgmma.cu", name), name


def moba_wgmma_smem(D: int, BN: int, stages: int) -> int:
    return 1024 + 2 * BN * D * 2 + stages * 128 * D * 2


def fwd_gather_wgmma(qd: _Dev, kd: _Dev, vd: _Dev, shape: AttnShape, m: BlockMask, o: Any,
                     lse: Any, sl2: Any, cz: Any, *, rows: int | None = None,
                     stages: int | None = None, partial: str | None = None,
                     combine: bool = True) -> Any:
    """Per-token routing on Hopper: ``attn_fwd_gather_wgmma`` over chunks of ``rows`` gathered
    rows per (b, h, key block) segment (partial out in ``PT`` and log2-sum-exp per pair), then
    ``attn_combine_part`` into ``o`` and ``lse``. The caller checked :func:`_moba_wgmma_fits`;
    a geometry TMA cannot describe raises ValueError (fall back for this call). Returns
    ``(part_o, part_lse2, plan)``; ``combine=False`` (probes, timing) skips the merge."""
    B, Hq, Hkv, Sq, Sk, D = (shape.batch, shape.q_heads, shape.kv_heads, shape.q_len,
                             shape.k_len, shape.head_dim)
    rows = int(MOBA_WGMMA_CONFIG["rows"] if rows is None else rows)
    st = int(MOBA_WGMMA_CONFIG["stages"] if stages is None else stages)
    pk = MOBA_WGMMA_CONFIG["partial"] if partial is None else partial
    if rows <= 0 or rows % 128:
        raise ValueError(f"MOBA_WGMMA_CONFIG rows must be a positive multiple of 128, got {rows}")
    BN = m.block_k
    T = _CT[qd.kind]
    PT = "float" if pk == "f32" else T
    try:
        maps = _tensor_maps_boxes(((kd, BN), (vd, BN)))
    except RuntimeError as e:  # the driver refused this geometry: fall back for this call only
        raise ValueError(str(e)) from e
    fn, _ = moba_wgmma_kernel(T, PT, D, BN, st)
    plan = _gather_plan(m, shape, rows)
    nnz = plan["nnz"]
    part_o = cp.empty((max(nnz, 1), D), cp.float32 if PT == "float" else cp.uint16)
    part_lse = cp.empty((max(nnz, 1),), cp.float32)
    qs = qd.strides()
    launch(fn, (plan["ntiles"],), (384,),
           (maps, qd.raw, np.int64(qs[0]), np.int64(qs[1]), np.int64(qs[2]), part_o, part_lse,
            np.int32(Hq), np.int32(Hkv), np.int32(Sq), np.int32(Sk), sl2, cz, np.int32(rows),
            plan["tile_seg"], plan["tile_start"], plan["seg_off"], plan["seg_cnt"],
            plan["g_rows"], plan["g_pair"], np.int32(plan["Kb"])), moba_wgmma_smem(D, BN, st))
    if not combine:
        return part_o, part_lse, plan
    R = B * Hq * Sq
    comb = get_kernel("attn_gather_wgmma.cu", f"attn_combine_part<{PT}, {D}>")
    launch(comb, (-(-R // 8),), (256,), (part_o, part_lse, plan["row_ptr"], o, lse, np.int64(R)))
    return part_o, part_lse, plan
