"""refattn: the reference for sparse attention.

Readable NumPy (float64) implementations of block-sparse attention and of the scoring and
selection rules of published sparse-attention methods, with Numba and CUDA kernels tested
against them, and a command line (``refattn``).
"""
# The subpackage refattn.methods is imported before the function `methods` is bound, so
# that the name refattn.methods stays the function (a submodule import binds its parent's
# attribute only the first time).
from . import data, io
from . import methods as _methods_package  # noqa: F401
from .api import (
    attention,
    attention_backward,
    methods,
    select,
)
from .core import (
    BlockMask,
    BlockScores,
    InputError,
    KeepSet,
    MemoryLimitError,
    Selection,
    VerticalSlash,
    apply_permutation,
    invert_permutation,
    make_permutation,
    unpermute,
)
from .core.registry import available_backends
from .reference.memory import get_memory_limit, set_memory_limit
from .reference.metrics import evaluate

__version__ = "0.1.0"

__all__ = [
    "BlockMask", "BlockScores", "Selection", "VerticalSlash", "KeepSet", "InputError", "MemoryLimitError",
    "apply_permutation", "invert_permutation", "make_permutation", "unpermute",
    "attention", "attention_backward", "select", "methods", "evaluate", "get_memory_limit", "set_memory_limit",
    "available_backends", "data", "io", "__version__",
]
