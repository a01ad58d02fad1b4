"""Numba kernels of the generic selection primitives (refattn/kernels/numba_selection_*.py)
against the reference ops of refattn/reference/selection.py.

The masks must be identical (bit for bit) and the boundaries equal, NaN where the
reference has NaN: the registry cases (float32 outputs, as the registry suite preallocates
them, and fresh float64 outputs), float64 scores with near-ties one ulp apart, cumulative
thresholds placed exactly on (and one ulp around) the reference's own crossing values,
narrow and integer input dtypes, non-contiguous arrays, and the input errors.
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("numba")

from refattn import testing  # noqa: E402
from refattn.core import registry  # noqa: E402
from refattn.core.errors import InputError  # noqa: E402
from refattn.reference import selection as ref  # noqa: E402

OPS = ("selection_topk_rows", "selection_topk_global", "selection_cumulative_threshold",
       "selection_fixed_threshold")


def _kernel(name: str):
    why = registry.load_backend("numba")
    if why is not None:
        pytest.skip(f"numba backend unavailable: {why}")
    return registry.implementations(name)["numba"]


def _same(r: np.ndarray, g: np.ndarray) -> bool:
    r, g = np.asarray(r), np.asarray(g)
    return r.shape == g.shape and np.array_equal(r, g, equal_nan=r.dtype.kind == "f")


def _check(name: str, args: tuple, label: str = "", out_dtype=None) -> None:
    op = registry.ops()[name]
    r_mask, r_bound = op.reference(*args)
    out = None
    if out_dtype is not None:   # poisoned: an unwritten element shows
        out = (np.ones(r_mask.shape, bool), np.full(r_bound.shape, np.nan, out_dtype))
    g_mask, g_bound = _kernel(name)(*args, out=out)
    if out is not None:
        assert g_mask is out[0] and g_bound is out[1]
    assert g_mask.dtype == np.bool_
    assert _same(r_mask, g_mask), f"{name} {label}: mask differs at {np.argwhere(r_mask != g_mask)[:5]}"
    assert _same(r_bound, g_bound), f"{name} {label}: boundary {r_bound} vs {g_bound}"


def test_registered_and_dispatched():
    for name in OPS:
        _kernel(name)
        assert registry.ops()[name].kind == "exact"
        assert testing.has_cases(name)
        assert registry.resolve_backend(name, "auto") == "numba"


@pytest.mark.parametrize("name", OPS)
def test_registry_cases_exact(name):
    rng = np.random.default_rng(7)
    n = 0
    for case in testing.op_cases(name, rng):
        _check(name, case["args"], case["label"], out_dtype=np.float32)
        _check(name, case["args"], case["label"])
        n += 1
    assert n > 10


def _near_ties(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float64 scores where many pairs differ by one ulp or are equal, with NaN."""
    base = rng.integers(0, 6, size=shape).astype(np.float64) * 0.1
    step = rng.integers(-1, 2, size=shape)
    s = np.where(step > 0, np.nextafter(base, np.inf), np.where(step < 0, np.nextafter(base, -np.inf), base))
    s[rng.random(shape) < 0.03] = np.nan
    return s


def test_topk_float64_near_ties():
    rng = np.random.default_rng(1)
    s = _near_ties(rng, (300, 70))
    v = rng.random(s.shape) < 0.85
    k = rng.integers(0, 75, size=300)
    for tie in ("low", "high"):
        _check("selection_topk_rows", (s, k, v, tie), tie)
        _check("selection_topk_rows", (s, 17, None, tie), tie)
    s3 = _near_ties(rng, (5, 24, 40))
    causal = np.tril(np.ones((24, 40), bool), k=16)
    for tie in ("low", "high"):
        _check("selection_topk_global", (s3, np.array([0, 1, 100, 400, 2000]), causal, tie), tie)


def _crossing_taus(s: np.ndarray, ok: np.ndarray, normalize: bool, rng: np.random.Generator
                   ) -> np.ndarray:
    """Per row, a tau equal to one of the reference's own compared values (the normalised
    or raw cumulative mass at a random ranked position), nudged by -1, 0 or +1 ulp."""
    v = np.where(ok, s, 0.0)
    cum = np.cumsum(np.sort(v, axis=-1)[:, ::-1], axis=-1)
    if normalize:
        tot = cum[:, -1:]
        cum = np.where(tot > 0, cum / np.where(tot > 0, tot, 1.0), 0.0)
    pos = rng.integers(0, s.shape[1], size=s.shape[0])
    t = cum[np.arange(s.shape[0]), pos]
    nudge = rng.integers(-1, 2, size=s.shape[0])
    return np.where(nudge > 0, np.nextafter(t, np.inf), np.where(nudge < 0, np.nextafter(t, -np.inf), t))


@pytest.mark.parametrize("normalize", [True, False])
def test_cumulative_on_exact_crossings(normalize, monkeypatch):
    from refattn.kernels import numba_selection_threshold as nsel

    rechecked = []
    exact = nsel._exact_counts
    monkeypatch.setattr(nsel, "_exact_counts",
                        lambda s, *a: rechecked.append(len(s)) or exact(s, *a))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 64)) * 2.0
    s = np.exp(x - x.max(-1, keepdims=True))
    s[rng.random(s.shape) < 0.02] = np.nan
    v = rng.random(s.shape) < 0.9
    ok = v & ~np.isnan(s)
    t = _crossing_taus(s, ok, normalize, rng)
    for tie in ("low", "high"):
        for inc in (True, False):
            _check("selection_cumulative_threshold", (s, t, v, normalize, tie, inc), f"{tie} {inc}")
    assert sum(rechecked) > 0   # crossings on tau go through the exact host path


def test_cumulative_random_float64():
    rng = np.random.default_rng(4)
    s = rng.random((500, 128)) ** 3
    s[:, ::7] = 0.0
    for tau in (0.3, 0.9, np.linspace(0.0, 1.0, 500)):
        _check("selection_cumulative_threshold", (s, tau, None, True, "low", True))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int32"])
def test_input_dtypes(dtype):
    rng = np.random.default_rng(5)
    s = rng.integers(0, 7, size=(20, 30)).astype(np.float64) / 2
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        s = s.astype(ml_dtypes.bfloat16)
    else:
        s = (s * 2).astype(dtype) if dtype == "int32" else s.astype(dtype)
    _check("selection_topk_rows", (s, 5, None, "high"))
    _check("selection_topk_global", (s[None], 50, None, "low"))
    _check("selection_cumulative_threshold", (s, 0.5, None, True, "low", True))
    _check("selection_fixed_threshold", (s, 1.0, None, False))


def test_non_contiguous_inputs_and_outputs():
    rng = np.random.default_rng(6)
    s = np.asfortranarray(_near_ties(rng, (40, 33)))[:, ::2]
    v = (rng.random((33, 40)) < 0.8).T[:, ::2]
    k = np.arange(80)[::2]
    r_mask, r_bound = ref.topk_rows(s, k, v, "low")
    m = np.ones((17, 80), bool)[:, ::2].T                    # strided bool view
    b = np.full(80, np.nan)[::2]                              # strided float64
    g_mask, g_bound = _kernel("selection_topk_rows")(s, k, v, "low", out=(m, b))
    assert g_mask is m and not m.flags.c_contiguous
    assert _same(r_mask, m) and _same(r_bound, b)


def test_errors():
    topk = _kernel("selection_topk_rows")
    cum = _kernel("selection_cumulative_threshold")
    s = np.ones((3, 4))
    with pytest.raises(InputError, match="non-negative"):
        cum(-s, 0.5)
    with pytest.raises(InputError, match="tie"):
        topk(s, 1, None, "middle")
    with pytest.raises(InputError, match=">= 0"):
        topk(s, -1)
    with pytest.raises(InputError, match="integer"):
        topk(s, 1.5)
    with pytest.raises(InputError, match="2-d"):
        topk(s[0], 1)
    with pytest.raises(InputError, match="broadcast"):
        topk(s, 1, np.ones((2, 4), bool))
    with pytest.raises(InputError, match="shape"):
        topk(s, [1, 2])
    with pytest.raises(InputError, match="out"):
        topk(s, 1, out=(np.zeros((3, 4), bool), np.zeros(2)))
    with pytest.raises(InputError, match="3-d"):
        _kernel("selection_topk_global")(s, 1)
    # the references refuse the same inputs
    with pytest.raises(InputError, match="non-negative"):
        ref.cumulative_rows(-s, 0.5)
    with pytest.raises(InputError, match=">= 0"):
        ref.topk_rows(s, -1)
