"""Memory bound of the reference: work in chunks, refuse what would not fit.

The limit is ``REFATTN_MAX_MEMORY`` (bytes, or with a K/M/G suffix) or
:func:`set_memory_limit`; default 4 GiB.
"""
from __future__ import annotations

import os

from ..core.errors import InputError, MemoryLimitError

_DEFAULT = 4 << 30
_limit: int | None = None


def _parse(text: str) -> int:
    t = text.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise InputError(f"REFATTN_MAX_MEMORY: cannot read {text!r} as a size") from None


def get_memory_limit() -> int:
    """Bytes the reference may allocate for one call."""
    if _limit is not None:
        return _limit
    env = os.environ.get("REFATTN_MAX_MEMORY")
    return _parse(env) if env else _DEFAULT


def set_memory_limit(nbytes: int | str | None) -> None:
    """Set the limit (``None`` restores the default / environment value)."""
    global _limit
    _limit = None if nbytes is None else (_parse(nbytes) if isinstance(nbytes, str) else int(nbytes))


def rows_per_chunk(total_rows: int, bytes_per_row: int, fixed_bytes: int, what: str) -> int:
    """How many rows fit beside ``fixed_bytes`` within the limit (at least 1, else refuse)."""
    limit = get_memory_limit()
    free = limit - fixed_bytes
    if free < bytes_per_row:
        need = fixed_bytes + bytes_per_row
        raise MemoryLimitError(
            f"{what}: needs at least {need / 2**30:.2f} GiB but the memory limit is "
            f"{limit / 2**30:.2f} GiB; raise REFATTN_MAX_MEMORY or use a kernel backend")
    return int(max(1, min(total_rows, free // max(bytes_per_row, 1))))
