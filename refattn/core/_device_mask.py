"""GPU helpers of :class:`refattn.core.blockmask.BlockMask`: device masks stay CuPy arrays.

CuPy is imported only when a device array is seen, so NumPy-only installs never need it.
"""
from __future__ import annotations

from typing import Any

from .errors import InputError
from .layout import as_array


def _as_bool4_device(mask: Any) -> Any:
    import cupy

    m = as_array(mask, "mask")          # CuPy (by __cuda_array_interface__ or DLPack)
    if m.dtype != bool:
        if m.dtype.kind not in "biu":
            raise InputError(f"mask: expected a boolean array, got dtype {m.dtype}")
        if m.size and bool(((m != 0) & (m != 1)).any()):
            raise InputError("mask: expected booleans (or 0/1)")
        m = m.astype(bool)
    if not 2 <= m.ndim <= 4:
        raise InputError(f"mask: expected [Qb, Kb], [H, Qb, Kb] or [B, H, Qb, Kb], "
                         f"got shape {m.shape}")
    while m.ndim < 4:
        m = m[None]
    return cupy.ascontiguousarray(m)


def _ordered_device(dense: Any, fill: str) -> tuple[Any, Any]:
    """:func:`_ordered` on the GPU. The sort key ``index`` (selected) / ``n + index``
    (unselected) is unique per row, so any sort gives the stable order."""
    import cupy

    n = dense.shape[-1]
    counts = dense.sum(axis=-1, dtype=cupy.int32)
    col = cupy.arange(n, dtype=cupy.int32)
    order = cupy.argsort(cupy.where(dense, col, col + n), axis=-1).astype(cupy.int32)
    if fill == "canonical":
        order = cupy.where(col < counts[..., None], order, cupy.int32(-1))
    return counts, order
