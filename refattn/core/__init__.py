"""Core data model of refattn: layouts, block geometry, masks, scores, permutations.

Nothing in ``refattn.core`` imports any other part of refattn.
"""
from .blockmask import BlockMask, legal_blocks, num_blocks
from .errors import InputError, MemoryLimitError
from .keepset import KeepSet
from .layout import (
    LAYOUTS,
    AttnShape,
    causal_offset,
    default_scale,
    from_bhsd,
    kv_head_of,
    normalize_qkv,
    to_bhsd,
)
from .permutation import (
    apply_permutation,
    invert_permutation,
    make_permutation,
    unpermute,
)
from .scores import BlockScores, Selection
from .vertical_slash import VerticalSlash

__all__ = [
    "InputError", "MemoryLimitError", "LAYOUTS", "AttnShape", "causal_offset", "default_scale",
    "from_bhsd", "kv_head_of", "normalize_qkv", "to_bhsd", "BlockMask", "legal_blocks",
    "num_blocks", "BlockScores", "Selection", "VerticalSlash", "KeepSet", "apply_permutation", "invert_permutation",
    "make_permutation", "unpermute",
]
