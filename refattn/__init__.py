"""refattn: the reference for sparse attention.

Readable NumPy (float64) implementations of block-sparse attention and of the scoring and
selection rules of published sparse-attention methods, with Numba and CUDA kernels tested
against them, and a command line (``refattn``).
"""
from .core import (
    BlockMask,
    BlockScores,
    InputError,
    KeepSet,
    VerticalSlash,
    MemoryLimitError,
    Selection,
    apply_permutation,
    invert_permutation,
    make_permutation,
    unpermute,
)
from .core.registry import available_backends
from . import methods as _methods_package  # noqa: F401  (bind the subpackage first ...)
from .api import attention, attention_backward, methods, select  # ... so `methods` stays the function
from .reference.memory import get_memory_limit, set_memory_limit
from .reference.metrics import evaluate
from . import data, io  # noqa: E402  (refattn.io.load, refattn.data.sample)

__version__ = "0.1.0"

__all__ = [
    "BlockMask", "BlockScores", "Selection", "VerticalSlash", "KeepSet", "InputError", "MemoryLimitError",
    "apply_permutation", "invert_permutation", "make_permutation", "unpermute",
    "attention", "attention_backward", "select", "methods", "evaluate", "get_memory_limit", "set_memory_limit",
    "available_backends", "__version__",
]
