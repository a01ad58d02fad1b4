"""The methods' selection step runs on their backend (refattn/reference/selection_backend.py).

* Each method whose rule is a generic primitive, selected with ``backend="numba"``, calls
  the Numba kernel of the selection op (a spy wraps the registered implementation) and
  returns exactly the NumPy selection: with the scoring ops pinned to their references
  (so that only the selection step differs), every array of the Selection is identical;
  with the Numba scoring kernels, every selection call equals the op's reference on the
  same arguments.
* The fronts against the primitives (hypothesis): broadcast shapes of ``k`` / ``tau`` /
  ``threshold`` / ``valid``, ``N = 1``, all-invalid rows, ties, NaN and infinities,
  float32 and float64 scores; the canonical form passed to the op; GPU-array errors.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import refattn
from refattn.core import registry
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods import load_all
from refattn.reference import selection as ref
from refattn.reference import selection_backend as front

if registry.load_backend("numba") is not None:
    pytest.skip(f"numba backend unavailable: {registry.load_backend('numba')}",
                allow_module_level=True)
load_all()

SEL_OPS = ("selection_topk_rows", "selection_topk_global", "selection_cumulative_threshold",
           "selection_fixed_threshold")
REAL = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                    "sample_qwen_s2048_L12.npz")

# method -> (parameters giving a non-trivial selection at L = 1024, D = 64; causal)
METHODS: dict[str, tuple[dict, bool]] = {
    "moba": (dict(block_size=64, topk=3), True),
    "flashmoba": (dict(block_size=64, topk=3), True),
    "flashmoba-noncausal": (dict(block_size=64, topk=3), False),
    "minference": (dict(vertical_size=64, slash_size=96, last_q=64), True),
    "flexprefill": (dict(block_size=64), True),
    "quest": (dict(page_size=16, token_budget=256), True),
    "nsa": (dict(topk=6), True),
    "proxyattn": (dict(block_size=64, gamma=0.9, min_budget=1), True),
    "adaspa": (dict(block_size=64, sparsity=0.8), False),
    "pisa": (dict(block_size=64, density=0.2), False),
}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Wrap the Numba implementation of every selection op; record ``(args, kw, result)``."""
    calls: dict[str, list] = {op: [] for op in SEL_OPS}
    for op in SEL_OPS:
        fn = registry.implementations(op)["numba"]

        def wrapped(*args, _fn=fn, _op=op, **kw):
            res = _fn(*args, **kw)
            calls[_op].append((args, kw, res))
            return res

        monkeypatch.setitem(registry._IMPLS, (op, "numba"), wrapped)
    return calls


@pytest.fixture
def reference_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every other op's ``"numba"`` entry runs its reference: the scores are the NumPy
    path's own, so only the selection step differs between the backends."""
    for name, op in registry.ops().items():
        if name not in SEL_OPS and (name, "numba") in registry._IMPLS:
            monkeypatch.setitem(registry._IMPLS, (name, "numba"), op.reference)


def _inputs(source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if source == "structured":
        return synthetic(1, 4, 2, 1024, 64, seed=11)
    if not os.path.exists(REAL):
        pytest.skip(f"real data not found at {REAL}")
    z = np.load(REAL)
    q = np.ascontiguousarray(z["q"][None, :2, 512:1536])
    k = np.ascontiguousarray(z["k"][None, :, 512:1536])
    v = np.ascontiguousarray(z["v"][None, :, 512:1536]) if "v" in z else k.copy()
    return q, k, v


def _select(method: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, backend: str):
    params, causal = METHODS[method]
    name = method.split("-")[0]
    return refattn.select(q, k, name, v=v, causal=causal, backend=backend, **params)


def _same(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return (a.shape == b.shape and a.dtype == b.dtype
            and np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def _check_calls(calls: dict[str, list]) -> int:
    """Every recorded kernel call returned exactly its op's reference on the same args."""
    n = 0
    for op, recs in calls.items():
        for args, kw, (mask, bound) in recs:
            r_mask, r_bound = registry.ops()[op].reference(*args, **kw)
            assert _same(r_mask, mask) and _same(r_bound, bound), op
            n += 1
    return n


# --------------------------------------------------------------------- the methods route
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_selection_runs_numba_kernel_and_matches_numpy(method, spy, reference_scoring):
    q, k, v = _inputs("structured")
    want = _select(method, q, k, v, "numpy")
    assert not any(spy.values()), "backend='numpy' must not dispatch the selection op"
    got = _select(method, q, k, v, "numba")
    assert spy["selection_topk_rows"], f"{method}: the numba selection kernel was not called"
    _check_calls(spy)
    assert _same(want.mask.mask, got.mask.mask)
    frac = want.mask.mask.mean()
    assert 0.0 < frac < 1.0, f"{method}: degenerate selection ({frac:.2f})"
    for name in ("boundary", "forced"):
        a, b = getattr(want, name), getattr(got, name)
        assert (a is None) == (b is None) and (a is None or _same(a, b)), name
    if want.scores is not None:
        assert _same(want.scores.scores, got.scores.scores)
    for key, val in want.extras.items():
        if isinstance(val, np.ndarray):
            assert _same(val, got.extras[key]), key


@pytest.mark.parametrize("source", ["structured", "real"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_with_numba_scoring_selects_exactly_on_its_scores(method, source, spy):
    """Full Numba path (float32 scoring kernels): the selection kernel's answers are the
    reference op's answers on the same scores, bit for bit."""
    q, k, v = _inputs(source)
    _select(method, q, k, v, "numba")
    assert _check_calls(spy) >= 1


# ---------------------------------------------------------------- the fronts (hypothesis)
def _bshape(draw, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts to ``shape``: some leading axes dropped, some axes 1."""
    drop = draw(st.integers(0, len(shape)))
    return tuple(d if draw(st.booleans()) else 1 for d in shape[drop:])


def _scores(draw, shape: tuple[int, ...], nonneg: bool = False) -> np.ndarray:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):       # ties, NaN and infinities from a small pool
        pool = ([0.0, 0.25, 0.5, 1.0, 2.0, np.nan] if nonneg
                else [-np.inf, -1.0, 0.0, 0.5, 1.0, np.inf, np.nan])
        s = rng.choice(pool, size=shape)
    else:
        s = rng.random(shape) if nonneg else rng.standard_normal(shape)
    return s.astype(draw(st.sampled_from([np.float64, np.float32])))


def _valid(draw, shape: tuple[int, ...], rows_axes: int):
    """None, a broadcastable bool array (some leading rows all False), or a stride-0 view."""
    kind = draw(st.sampled_from(["none", "bcast", "view"]))
    if kind == "none":
        return None
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    vs = _bshape(draw, shape) if kind == "bcast" else shape[rows_axes:]
    v = rng.random(vs) < 0.7
    if v.ndim > len(shape) - rows_axes and v.shape[0] > 1:
        v[0] = False                                       # all-invalid rows
    return np.broadcast_to(v, shape) if kind == "view" else v


def _per_lead(draw, lead: tuple[int, ...], values: list):
    if not lead or draw(st.booleans()):
        return draw(st.sampled_from(values))
    bs = _bshape(draw, lead)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return np.asarray(rng.choice(values, size=bs)).reshape(bs)


def _lead(draw) -> tuple[int, ...]:
    return tuple(draw(st.lists(st.integers(1, 4) | st.just(0), min_size=0, max_size=3)))


def _assert_same(got, want) -> None:
    assert _same(want[0], got[0]), (want[0], got[0])
    assert _same(want[1], got[1]), (want[1], got[1])


def _compare(primitive, front_call) -> None:
    """The front's results are the primitive's; where the primitive raises (e.g. a global
    top-k over zero heads), the front raises the same exception type."""
    try:
        want = primitive()
    except Exception as e:  # noqa: BLE001 - any error of the primitive
        with pytest.raises(type(e)):
            front_call()
        return
    _assert_same(front_call(), want)


SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(data=st.data())
def test_front_topk_per_row(data):
    draw = data.draw
    lead, n = _lead(draw), draw(st.integers(1, 9))
    shape = lead + (n,)
    s = _scores(draw, shape)
    k = _per_lead(draw, lead, [0, 1, 2, 3, n, n + 2])
    valid = _valid(draw, shape, len(lead))
    tie = draw(st.sampled_from(["low", "high"]))
    _compare(lambda: ref.topk_per_row(s, k, valid=valid, tie=tie),
             lambda: front.topk_per_row(s, k, valid=valid, tie=tie, backend="numba"))


@SETTINGS
@given(data=st.data())
def test_front_topk_global(data):
    draw = data.draw
    lead = _lead(draw)
    grid = (draw(st.integers(1, 5)), draw(st.integers(1, 6)))
    shape = lead + grid
    s = _scores(draw, shape)
    k = _per_lead(draw, lead, [0, 1, 3, 7, grid[0] * grid[1] + 1])
    valid = _valid(draw, shape, len(lead))
    if draw(st.booleans()):
        valid = np.tril(np.ones(grid, bool))              # the causal [Qb, Kb] pattern
    tie = draw(st.sampled_from(["low", "high"]))
    _compare(lambda: ref.topk_global(s, k, valid=valid, tie=tie),
             lambda: front.topk_global(s, k, valid=valid, tie=tie, backend="numba"))


@SETTINGS
@given(data=st.data())
def test_front_cumulative_threshold(data):
    draw = data.draw
    lead, n = _lead(draw), draw(st.integers(1, 9))
    shape = lead + (n,)
    s = _scores(draw, shape, nonneg=True)
    tau = _per_lead(draw, lead, [0.0, 0.3, 0.5, 0.9, 1.0, 1.5])
    valid = _valid(draw, shape, len(lead))
    kw = dict(normalize=draw(st.booleans()), tie=draw(st.sampled_from(["low", "high"])),
              include_crossing=draw(st.booleans()))
    _compare(lambda: ref.cumulative_threshold(s, tau, valid=valid, **kw),
             lambda: front.cumulative_threshold(s, tau, valid=valid, backend="numba", **kw))


@SETTINGS
@given(data=st.data())
def test_front_fixed_threshold(data):
    draw = data.draw
    lead, n = _lead(draw), draw(st.integers(1, 9))
    shape = lead + (n,)
    s = _scores(draw, shape)
    thr = _per_lead(draw, lead, [-1.0, 0.0, 0.5, np.inf, -np.inf])
    if isinstance(thr, np.ndarray):
        thr = thr[..., None]                               # per row: [..., 1]
    valid = _valid(draw, shape, len(lead))
    inclusive = draw(st.booleans())
    _compare(lambda: ref.fixed_threshold(s, thr, valid=valid, inclusive=inclusive),
             lambda: front.fixed_threshold(s, thr, valid=valid, inclusive=inclusive,
                                           backend="numba"))


# ---------------------------------------------------------------- the fronts (examples)
def test_per_head_budget_and_row_valid_broadcast(spy):
    """k per head [H, 1] over [B, H, Q, N]; valid [Q, N]; N = 1; an all-invalid row."""
    rng = np.random.default_rng(0)
    s = rng.standard_normal((2, 3, 4, 6))
    k = np.array([[1], [2], [6]])
    valid = np.tril(np.ones((4, 6), bool))
    valid[2] = False
    _assert_same(front.topk_per_row(s, k, valid=valid, backend="numba"),
                 ref.topk_per_row(s, k, valid=valid))
    (args, _, _), = spy["selection_topk_rows"]
    assert args[0].shape == (24, 6) and args[1].shape == (24,) and args[2].shape == (24, 6)
    one = rng.standard_normal((3, 1))
    _assert_same(front.topk_per_row(one, 1, backend="numba"), ref.topk_per_row(one, 1))
    _assert_same(front.topk_global(s[0, 0, 0], 2, backend="numba"), ref.topk_global(s[0, 0, 0], 2))


def test_constant_valid_is_passed_as_one_row(spy):
    """valid constant over the rows (a [N] mask or a stride-0 view of one) reaches the op
    as [1, N]: no [R, N] copy in the front."""
    s = np.random.default_rng(1).standard_normal((5, 7, 8))
    cand = np.arange(8) % 3 != 0
    for valid in (cand, np.broadcast_to(cand, s.shape)):
        _assert_same(front.topk_per_row(s, 2, valid=valid, backend="numba"),
                     ref.topk_per_row(s, 2, valid=valid))
    assert [c[0][2].shape for c in spy["selection_topk_rows"]] == [(1, 8), (1, 8)]
    grid = np.tril(np.ones((7, 8), bool))
    _assert_same(front.topk_global(s, np.array([1, 2, 3, 4, 5]), valid=grid, backend="numba"),
                 ref.topk_global(s, np.array([1, 2, 3, 4, 5]), valid=grid))
    assert spy["selection_topk_global"][0][0][2].shape == (1, 7, 8)


def test_numpy_and_auto_backends(spy):
    s = np.random.default_rng(2).standard_normal((3, 5))
    want = ref.topk_per_row(s, 2)
    _assert_same(front.topk_per_row(s, 2), want)           # default: the primitive
    assert not spy["selection_topk_rows"]
    _assert_same(front.topk_per_row(s, 2, backend="auto"), want)
    assert len(spy["selection_topk_rows"]) == 1            # auto -> numba here


def test_per_entry_threshold_and_errors():
    s = np.random.default_rng(3).standard_normal((2, 4))
    thr = np.array([0.0, 0.1, 0.2, 0.3])                   # varies along the candidates
    _assert_same(front.fixed_threshold(s, thr, backend="auto"), ref.fixed_threshold(s, thr))
    with pytest.raises(InputError, match="threshold"):
        front.fixed_threshold(s, thr, backend="numba")
    with pytest.raises(InputError, match="k must be"):
        front.topk_per_row(s, -1, backend="numba")
    with pytest.raises(InputError, match="backend"):
        front.topk_per_row(s, 1, backend="torch")
    with pytest.raises(InputError, match="non-negative"):
        front.cumulative_threshold(-np.abs(s) - 1, 0.5, backend="numba")


class _FakeDeviceArray:
    """Stands for a GPU array (has ``__cuda_array_interface__``)."""
    __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f8", "data": (0, False),
                                "version": 3}
    shape = (2, 3)
    ndim = 2


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_gpu_scores_need_the_cupy_backend(backend):
    with pytest.raises(InputError, match="GPU"):
        front.topk_per_row(_FakeDeviceArray(), 1, backend=backend)


def test_cupy_results_stay_on_device():
    cp = pytest.importorskip("cupy")
    if registry.load_backend("cupy") is not None or \
            ("selection_topk_rows", "cupy") not in registry._IMPLS:
        pytest.skip("no cupy selection kernels here")
    s = np.random.default_rng(4).standard_normal((2, 3, 9)).astype(np.float32)
    k = np.array([[1], [4]])
    m, b = front.topk_per_row(cp.asarray(s), k, valid=s > -1, backend="auto")
    assert isinstance(m, cp.ndarray) and isinstance(b, cp.ndarray)
    _assert_same((m.get(), b.get()), ref.topk_per_row(s, k, valid=s > -1))
    mh, bh = front.topk_per_row(s, k, backend="cupy")        # host in, host out
    _assert_same((mh, bh), ref.topk_per_row(s, k))
