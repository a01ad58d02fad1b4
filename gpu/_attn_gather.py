"""Per-token routing (``block_q == 1``, MoBA): the FlashMoBA-style gather kernels of
``attn_fwd.cu`` / ``attn_bwd.cu`` (bf16/fp16, D == Dv in {64, 128}, block_k % 64 == 0).

The query rows that chose a key block are gathered into dense tiles (:func:`_gather_plan`,
cached on the device per mask); the forward computes one partial result per (row, key
block) pair and merges each row's partials (``attn_combine``); the backward walks the same
plan kv-major. The tile height ``BM`` comes from the caller (``attention.GATHER_BM``).
"""
from __future__ import annotations

from typing import Any

import cupy as cp
import numpy as np

from refattn.core.blockmask import BlockMask
from refattn.core.layout import AttnShape

from ._attn_common import _CT, _NULL, _cached, _Dev, _strides
from ._build import get_kernel, launch


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
