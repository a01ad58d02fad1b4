"""Registry-driven exactness: every registered kernel against its reference.

For each op with a non-reference implementation, each case of refattn.testing.op_cases is
run through the reference and the kernel; the kernel's outputs are preallocated and
poisoned (NaN for floats, a sentinel for integers) so unwritten elements are caught.
Ops whose reference has NaN by design (``Op.equal_nan``) and ``"exact"`` ops, for which
NaN would compare equal to a NaN of the reference, get a finite float sentinel instead, so
that an unwritten NaN position still fails.
"""
from __future__ import annotations

import importlib
import os
import zlib

import numpy as np
import pytest

from refattn import testing
from refattn.check import add_noise_atol, compare_arrays
from refattn.core import registry


def _case_seed(name: str, backend: str) -> int:
    """Stable per (op, backend) seed: ``hash()`` of a str changes with PYTHONHASHSEED, which
    made failures unreproducible. ``REFATTN_TEST_SEED`` shifts every seed (for sweeps)."""
    return (zlib.crc32(f"{name}/{backend}".encode()) + int(os.environ.get("REFATTN_TEST_SEED", 0))) % 2**32


def _kernel_params():
    # Ops are defined by the reference and by method modules, and cases by refattn.cases:
    # import them all before enumerating.
    importlib.import_module("refattn.methods").load_all()
    testing.has_cases("attention_fwd")
    params = []
    for backend in ("numba", "cupy"):
        why = registry.load_backend(backend)
        for name in sorted(registry.ops()):
            impls = registry.implementations(name)
            if backend in impls:
                params.append(pytest.param(name, backend, id=f"{name}-{backend}"))
        if why is not None:
            params.append(pytest.param(None, backend, id=f"unavailable-{backend}",
                                       marks=pytest.mark.skip(reason=f"{backend}: {why}")))
    return params or [pytest.param(None, None, marks=pytest.mark.skip(reason="no kernels registered"))]


# Float poison where NaN cannot be the poison (see the module docstring): finite, far from
# any score, and not a value a kernel computes by accident.
FLOAT_SENTINEL = np.float32(-1.2345e30)


def _poisoned(ref_out, nan_is_valid=False):
    """Preallocated outputs for the kernel, poisoned. The cases' inputs are NumPy arrays,
    so the outputs are NumPy too (a CuPy kernel given NumPy returns NumPy; the GPU test
    files check CuPy-in/CuPy-out separately). ``nan_is_valid``: NaN may be a correct
    output, so floats are poisoned with :data:`FLOAT_SENTINEL` instead of NaN."""
    outs = []
    fill = FLOAT_SENTINEL if nan_is_valid else np.nan
    for r in ref_out:
        r = np.asarray(r)
        if r.dtype.kind == "f":
            outs.append(np.full(r.shape, fill, np.float32))
        elif r.dtype.kind in "iu":
            outs.append(np.full(r.shape, -12345, r.dtype))
        else:
            outs.append(np.zeros(r.shape, r.dtype))
    return tuple(outs)


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


@pytest.mark.parametrize("name,backend", _kernel_params())
def test_kernel_matches_reference(name, backend):
    op = registry.ops()[name]
    assert testing.has_cases(name), f"op {name!r} has a {backend} kernel but no cases in refattn.testing"
    impl = registry.implementations(name)[backend]
    rng = np.random.default_rng(_case_seed(name, backend))
    failures = []
    n = 0
    for case in testing.op_cases(name, rng):
        args, dt = case["args"], case["dtype"]
        ref = op.reference(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        out = _poisoned(ref, nan_is_valid=op.equal_nan or op.kind == "exact")
        got = impl(*args, out=out)
        got = got if isinstance(got, tuple) else (got,)
        base = testing.op_baseline(name, args, dt)
        for i, (r, g) in enumerate(zip(ref, got, strict=True)):
            g = _host(g)
            if op.kind == "exact" or np.asarray(r).dtype.kind in "biu":
                ok = np.array_equal(np.asarray(r), g, equal_nan=np.asarray(r).dtype.kind == "f")
                if not ok:
                    failures.append(f"{case['label']}: output {op.outputs[i]} differs")
                continue
            cdt = "float32" if dt == "float64" else dt
            atol = add_noise_atol(r, cdt) + testing.op_error_floor(name, args, cdt, r)
            rep = compare_arrays(r, g, cdt, base=None if base is None else base[i], atol=atol,
                                 name=op.outputs[i], equal_nan=op.equal_nan)
            if not rep.ok:
                failures.append(f"{case['label']}:\n{rep.summary()}")
        n += 1
    assert n > 0
    assert not failures, "\n".join(failures[:5])
