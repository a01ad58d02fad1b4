"""Free functions behind :class:`refattn.core.blockmask.BlockMask`: block geometry and index forms.

Block geometry: :func:`num_blocks`, :func:`legal_blocks` and :func:`full_blocks` (bool
``[Qb, Kb]``, causal bottom-right aligned). Array intake: ``_as_bool4`` turns a boolean
``[Qb, Kb]``, ``[H, Qb, Kb]`` or ``[B, H, Qb, Kb]`` array into ``[B, H, Qb, Kb]``. Index forms:
``_ordered`` builds the row-wise ordered form (canonical ``-1`` tail or FlexAttention's tail
fill) and :func:`check_index_form` validates ``kv_num_blocks int32 [B, H, Qb]`` /
``kv_indices int32 [B, H, Qb, Kb]``; ``_flex_form``, ``_bsr_form`` and ``_token_mask`` are the
host bodies of ``BlockMask.to_flex`` / ``to_bsr`` / ``to_token_mask``. Device (CuPy) arrays go
to :mod:`._device_mask`.

Everything here is re-exported by :mod:`refattn.core.blockmask`; import it from there.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ._device_mask import _as_bool4_device, _ordered_device
from .errors import InputError
from .layout import causal_offset
from .layout import is_device_array as _is_device


def num_blocks(length: int, block: int) -> int:
    """``ceil(length / block)``."""
    return -(-int(length) // int(block))


def _block_bounds(length: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last (inclusive) token index of every block, ``[nb]`` each."""
    n = num_blocks(length, block)
    start = np.arange(n, dtype=np.int64) * block
    stop = np.minimum(start + block, length) - 1
    return start, stop


def legal_blocks(q_len: int, k_len: int, block_q: int, block_k: int, causal: bool) -> np.ndarray:
    """Blocks that hold at least one visible (query, key) pair: bool ``[Qb, Kb]``.

    Causal is bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + k_len - q_len``.
    Without causality every block is legal.
    """
    qs, qe = _block_bounds(q_len, block_q)
    ks, _ = _block_bounds(k_len, block_k)
    if not causal:
        return np.ones((qs.size, ks.size), dtype=bool)
    off = causal_offset(q_len, k_len)
    return ks[None, :] <= (qe[:, None] + off)


def full_blocks(q_len: int, k_len: int, block_q: int, block_k: int, causal: bool) -> np.ndarray:
    """Blocks that no token-level mask cuts: bool ``[Qb, Kb]``.

    A block is *full* when it has ``block_q x block_k`` tokens (not a ragged last block) and,
    under causality, every key of it is visible to every query of it. Other legal blocks are
    *partial* (FlexAttention applies ``mask_mod`` only to partial blocks).
    """
    qs, qe = _block_bounds(q_len, block_q)
    ks, ke = _block_bounds(k_len, block_k)
    whole = ((qe - qs + 1) == block_q)[:, None] & ((ke - ks + 1) == block_k)[None, :]
    if not causal:
        return whole
    off = causal_offset(q_len, k_len)
    return whole & (ke[None, :] <= qs[:, None] + off)


def _as_bool4(mask: Any) -> np.ndarray:
    if _is_device(mask):
        return _as_bool4_device(mask)
    m = np.asarray(mask)
    if m.dtype != bool:
        if m.dtype.kind in "iu" and m.size and not np.isin(m, (0, 1)).all():
            raise InputError(f"mask: expected booleans (or 0/1), got values {np.unique(m)[:5]}")
        if m.dtype.kind not in "biu":
            raise InputError(f"mask: expected a boolean array, got dtype {m.dtype}")
        m = m.astype(bool)
    if not 2 <= m.ndim <= 4:
        raise InputError(f"mask: expected [Qb, Kb], [H, Qb, Kb] or [B, H, Qb, Kb], "
                         f"got shape {m.shape}")
    while m.ndim < 4:
        m = m[None]
    return np.ascontiguousarray(m)


def _ordered(dense: np.ndarray, fill: str) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise ordered index form of a boolean ``[..., n]`` array.

    ``fill="canonical"``: slots past the count are -1. ``fill="flex"``: they hold the
    unselected indices, ascending (a stable descending argsort of the mask).
    Device arrays give device results (the same values).
    """
    if _is_device(dense):
        return _ordered_device(dense, fill)
    counts = dense.sum(axis=-1, dtype=np.int32)
    order = np.argsort(~dense, axis=-1, kind="stable").astype(np.int32)
    if fill == "canonical":
        slot = np.arange(dense.shape[-1], dtype=np.int32)
        order = np.where(slot < counts[..., None], order, np.int32(-1))
    return counts, order


def check_index_form(kv_num_blocks: Any, kv_indices: Any, num_k_blocks: int,
                     *, canonical: bool = True) -> None:
    """Validate an index form; raise :class:`InputError` naming the first problem.

    ``canonical=True`` also requires ascending indices and ``-1`` past every count.
    """
    num = np.asarray(kv_num_blocks)
    idx = np.asarray(kv_indices)
    if num.dtype.kind not in "iu" or idx.dtype.kind not in "iu":
        raise InputError(f"index form: expected integer arrays, got {num.dtype} and {idx.dtype}")
    if idx.shape[:-1] != num.shape:
        raise InputError(f"kv_indices: leading shape {idx.shape[:-1]} does not match "
                         f"kv_num_blocks {num.shape}")
    if num.size and (num.min() < 0 or num.max() > min(num_k_blocks, idx.shape[-1])):
        raise InputError(f"kv_num_blocks: counts must lie in [0, {min(num_k_blocks, idx.shape[-1])}], "
                         f"got range [{num.min()}, {num.max()}]")
    slot = np.arange(idx.shape[-1])
    live = slot < num[..., None]
    vals = np.where(live, idx, 0)
    if live.any() and (vals[live].min() < 0 or vals[live].max() >= num_k_blocks):
        raise InputError(f"kv_indices: selected block indices must lie in [0, {num_k_blocks}), "
                         f"got range [{vals[live].min()}, {vals[live].max()}]")
    srt = np.sort(np.where(live, idx.astype(np.int64), np.int64(np.iinfo(np.int64).max)), axis=-1)
    dup = (srt[..., 1:] == srt[..., :-1]) & (slot[1:] < num[..., None])
    if dup.any():
        pos = tuple(int(i) for i in np.argwhere(dup)[0][:-1])
        raise InputError(f"kv_indices: a block index repeats within row {pos}")
    if canonical:
        if (np.diff(vals, axis=-1)[live[..., 1:]] <= 0).any():
            raise InputError("kv_indices: canonical form needs ascending indices within each row")
        if (idx[~live] != -1).any():
            raise InputError("kv_indices: canonical form needs -1 in every slot past the count")


# ------------------------------------------------------- host converters (BlockMask.to_*)
def _flex_form(part: np.ndarray, full: np.ndarray | None) -> dict[str, np.ndarray]:
    """FlexAttention's arrays of host masks bool ``[B, H, Qb, Kb]`` (tail fill, see ``_ordered``).

    ``kv_num_blocks int32 [B,H,Qb]``, ``kv_indices int32 [B,H,Qb,Kb]`` and their transpose
    ``q_num_blocks int32 [B,H,Kb]``, ``q_indices int32 [B,H,Kb,Qb]`` of ``part``; with ``full``
    given, the same four of it as ``full_kv_*`` / ``full_q_*``.
    """
    out: dict[str, np.ndarray] = {}
    out["kv_num_blocks"], out["kv_indices"] = _ordered(part, "flex")
    out["q_num_blocks"], out["q_indices"] = _ordered(np.swapaxes(part, -1, -2), "flex")
    if full is not None:
        out["full_kv_num_blocks"], out["full_kv_indices"] = _ordered(full, "flex")
        out["full_q_num_blocks"], out["full_q_indices"] = _ordered(
            np.swapaxes(full, -1, -2), "flex")
    return out


def _bsr_form(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block-CSR per (b, h) of a host mask bool ``[B, H, Qb, Kb]``: ``indptr int32 [B,H,Qb+1]``
    and ``indices int32 [B,H,nnz_max]`` (ascending per row, rows concatenated; ``-1`` past
    each head's nnz)."""
    counts = mask.sum(-1, dtype=np.int32)
    indptr = np.zeros(counts.shape[:2] + (counts.shape[2] + 1,), dtype=np.int32)
    np.cumsum(counts, axis=-1, out=indptr[..., 1:])
    nnz = indptr[..., -1]
    width = int(nnz.max()) if nnz.size else 0
    indices = np.full(counts.shape[:2] + (width,), -1, dtype=np.int32)
    for b in range(counts.shape[0]):
        for h in range(counts.shape[1]):
            indices[b, h, : nnz[b, h]] = np.nonzero(mask[b, h])[1]
    return indptr, indices


def _token_mask(mask: np.ndarray, block_q: int, block_k: int, q_len: int, k_len: int,
                causal: bool) -> np.ndarray:
    """Token-level mask bool ``[B, H, q_len, k_len]`` of a host block mask bool
    ``[B, H, Qb, Kb]`` (causal bottom-right when asked)."""
    t = np.repeat(np.repeat(mask, block_q, axis=2)[:, :, : q_len],
                  block_k, axis=3)[:, :, :, : k_len]
    if causal:
        off = causal_offset(q_len, k_len)
        t = t & (np.arange(k_len)[None, :] <= np.arange(q_len)[:, None] + off)
    return t
