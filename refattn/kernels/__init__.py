"""Numba CPU kernels. Importing this package registers every kernel with
:mod:`refattn.core.registry` (backend ``"numba"``); add one import per kernel module."""
from . import numba_attention  # noqa: F401  (attention_fwd)
