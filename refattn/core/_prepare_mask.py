"""``prepare_mask``: check a mask against a problem's shape before attention runs.

Re-exported by :mod:`refattn.core.blockmask`; import it from there.
"""
from __future__ import annotations

from typing import Any

from .errors import InputError


def prepare_mask(mask: Any, shape: Any) -> Any:
    """Validate a mask against the problem and expand a ``"kv"`` BlockMask to query heads.

    Accepts ``None``, a :class:`BlockMask`, or any object with ``q_len``, ``k_len``,
    ``batch_heads() -> (B, H)`` optional, and ``token_rows(b, h0, h1, r0, r1)``.
    """
    from .blockmask import BlockMask  # here, not at the top: blockmask re-exports this

    if mask is None:
        return None
    if not hasattr(mask, "token_rows"):
        raise InputError(f"mask: expected a BlockMask (or token-mask object), got {type(mask).__name__}")
    if (mask.q_len, mask.k_len) != (shape.q_len, shape.k_len):
        raise InputError(f"mask: built for (q_len, k_len) = ({mask.q_len}, {mask.k_len}) but the "
                         f"inputs have ({shape.q_len}, {shape.k_len})")
    if isinstance(mask, BlockMask):
        if mask.head_kind == "kv" and mask.shape[1] not in (1, shape.kv_heads):
            raise InputError(f"mask: {mask.shape[1]} kv-head masks for {shape.kv_heads} kv heads")
        mask = mask.expand_heads(shape.q_heads)
        B, H = mask.shape[:2]
        if B not in (1, shape.batch):
            raise InputError(f"mask: batch {B} does not match the inputs' {shape.batch}")
        if H not in (1, shape.q_heads):
            raise InputError(f"mask: {H} head masks do not match {shape.q_heads} query heads")
    elif hasattr(mask, "batch_heads"):
        B, H = mask.batch_heads()
        if B not in (1, shape.batch) or H not in (1, shape.q_heads):
            raise InputError(f"mask: token mask for (B, H) = ({B}, {H}) does not match the "
                             f"inputs' ({shape.batch}, {shape.q_heads})")
    return mask
