"""The Numba kernels of the importance ops against their references, on the registry cases
(the registry-wide check of tests/test_registry.py, run here with the importance modules
imported so that their ops are defined)."""
from __future__ import annotations

import pytest
from test_registry import test_kernel_matches_reference as _check_kernel

import refattn.importance.blockrank  # noqa: F401  (defines the ops)
import refattn.importance.focus  # noqa: F401
import refattn.importance.rsq  # noqa: F401
import refattn.importance.vflowopt  # noqa: F401
from refattn import testing
from refattn.core import registry

OPS = ("blockrank_doc_scores", "focus_importance", "vflowopt_relevance", "rsq_attention_received")


@pytest.mark.parametrize("name", OPS)
def test_importance_kernel(name):
    why = registry.load_backend("numba")
    if why is not None:
        pytest.skip(f"numba: {why}")
    assert "numba" in registry.implementations(name)
    assert testing.has_cases(name)
    _check_kernel(name, "numba")
