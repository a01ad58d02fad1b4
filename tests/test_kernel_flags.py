"""The Numba fastmath flag set is pinned, and no kernel uses plain ``fastmath=True``."""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest

pytest.importorskip("numba")

import refattn.kernels  # noqa: E402
from refattn.kernels.flags import FASTMATH, NJIT_HELPER_OPTIONS, NJIT_OPTIONS  # noqa: E402

KERNEL_DIR = Path(refattn.kernels.__file__).parent


def test_flag_set_is_pinned():
    # nnan/ninf (what fastmath=True adds) would break -inf masking and empty rows.
    assert FASTMATH == frozenset({"reassoc", "contract", "nsz", "arcp", "afn"})
    assert "nnan" not in FASTMATH and "ninf" not in FASTMATH and "fast" not in FASTMATH
    assert NJIT_OPTIONS["fastmath"] == set(FASTMATH)
    assert NJIT_HELPER_OPTIONS["fastmath"] == set(FASTMATH)
    assert NJIT_OPTIONS["parallel"] and NJIT_OPTIONS["cache"] and NJIT_OPTIONS["nogil"]
    assert NJIT_OPTIONS["error_model"] == "numpy"


def test_no_plain_fastmath_in_kernel_sources():
    pattern = re.compile(r"fastmath\s*=\s*(True|1\b|\{|\[|set\(|\"|')")
    offenders = []
    for path in sorted(KERNEL_DIR.rglob("*.py")):
        if path.name == "flags.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, "use refattn.kernels.flags (FASTMATH / NJIT_OPTIONS):\n" + "\n".join(offenders)


def test_every_compiled_kernel_uses_the_flag_set():
    from numba.core.registry import CPUDispatcher

    seen = 0
    for info in pkgutil.iter_modules([str(KERNEL_DIR)]):
        mod = importlib.import_module(f"refattn.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, CPUDispatcher) and obj.__module__ == mod.__name__:
                fm = obj.targetoptions.get("fastmath")
                if info.name == "ieee":             # the correctly rounded helpers
                    assert not fm, f"ieee.{name}: must compile without fastmath, got {fm!r}"
                    continue
                assert fm is not True, f"{info.name}.{name}: plain fastmath=True"
                assert set(fm or ()) == set(FASTMATH), f"{info.name}.{name}: fastmath={fm!r}"
                seen += 1
    assert seen > 0
