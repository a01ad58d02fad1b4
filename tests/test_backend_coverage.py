"""backend="numba" (and "auto") works for every public method and gives the reference's
selection; every registry op has a Numba kernel or is declared host-only (issue #4).

* ``test_select_backends_agree``: ``refattn.select`` with ``backend="numba"`` and ``"auto"``
  on a small suitable input of each method's kind (LLM prefill, video with a grid, KV-cache,
  static masks, token importance) keeps the same blocks as ``backend="numpy"`` (mask
  equality; for KV-cache methods also the same kept token set per head; every integer,
  boolean or string array in ``extras``, e.g. PBS's key permutation, identical). Every
  kvpress press runs.
* ``test_every_op_has_numba_kernel_or_is_host_only``: one case per registered op, so a new
  op without a kernel (and without a stated reason to have none) fails the suite.
* ``test_host_only_routing``: host-only ops run their reference for every backend; other
  ops never fall back silently.
* ``test_cli_select_numba``: ``refattn select METHOD @sample --backend numba``.

Inputs are small (L <= 512) so the file runs in well under a minute once Numba's caches are
warm. Exactness of each kernel's raw outputs is tests/test_registry.py's job.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import refattn
from refattn import cli, io
from refattn.core import registry
from refattn.core.errors import InputError
from refattn.data import sample
from refattn.data.synthetic import synthetic
from refattn.kvcache import presses
from refattn.methods import list_methods, load_all

load_all()
NUMBA = registry.load_backend("numba")

VIDEO_GRID = (6, 8, 8)            # 384 tokens; T divisible by STA's default tile (6, 8, 8)

# method -> (input kind, parameters giving a non-trivial selection on the inputs below)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # LLM prefill: L = 512, Hq = 4, Hkv = 2, D = 64, causal
    "moba": ("llm", dict(block_size=64, topk=3)),
    "flashmoba": ("llm", dict(block_size=64, topk=3)),
    "xattention": ("llm", dict(block_size=64, stride=8, chunk_size=256)),
    "prism": ("llm", dict(block_size=64, high_freq_dim=32, low_freq_dim=48)),
    "bsfa": ("llm", dict(block_q=64, block_k=32, topk=4)),
    "minference": ("llm", dict(vertical_size=64, slash_size=96, last_q=64)),
    "flexprefill": ("llm", dict(block_size=64)),
    "quest": ("llm", dict(page_size=16, token_budget=128)),
    "nsa": ("llm", dict(topk=4)),
    "proxyattn": ("llm", dict(block_size=64, gamma=0.9, min_budget=1)),
    "pbs": ("llm", dict(block_size=32, segment_size=128, tau=0.8)),
    # video: grid (6, 8, 8), Hq = 2, Hkv = 1, D = 32, non-causal
    "adaspa": ("video", dict(block_size=32)),
    "pisa": ("video", dict(block_size=32, density=0.25)),
    "psa": ("video", dict(block_q=64, block_k=32)),
    "radial": ("video", {}),
    "spargeattn": ("video", dict(block_q=64, block_k=32, simthreshd1=0.25, cdfthreshd=0.9)),
    "sta": ("video", dict(tile=(3, 4, 4), window=(1, 1, 1))),
    "svg": ("video", dict(num_sampled_rows=32, sparsity=0.5, block_size=32, profile_block=32,
                          band_round=32)),
    "vmoba": ("video", dict(temporal_chunk=1, spatial_chunk=(2, 2))),
    # KV cache (L = 512 prefill)
    "h2o": ("llm", dict(hh_size=24, recent_size=32)),
    "snapkv": ("llm", dict(window_size=16, max_capacity_prompt=96)),
    "vatp": ("llm", dict(mode="h2o", heavy_ratio=0.2, sink_len=4)),
    "caote": ("llm", dict(base="h2o", compression_ratio=0.6)),
    "streamingllm": ("llm", dict(start_size=4, recent_size=100)),
    # static masks
    "block_attention": ("llm", dict(block_sizes=(200, 200, 112))),
    "blockbert": ("llm", dict(num_blocks=4)),
    # token importance
    "blockrank": ("llm", dict(segments=(100, 150, 150, 112))),
    "focus": ("focus", dict(positions=tuple(range(3, 27)))),
    "rsq": ("llm", dict(keep_ratio=0.25)),
    "vflowopt": ("square", dict(t=1.0, vit_r=0.5, vit_m=3.0)),
}
PRESSES = ("knorm", "keydiff", "streaming_llm", "snapkv", "tova", "observed_attention",
           "expected_attention", "random")
for _p in PRESSES:
    CONFIGS[f"kvpress:{_p}"] = ("llm", dict(press=_p, compression_ratio=0.5, window_size=16))


def _inputs(kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """(q, k, v, causal) of an input kind (cached: every method of a kind sees the same)."""
    if kind not in _CACHE:
        if kind == "llm":
            q, k, v = synthetic(1, 4, 2, 512, 64, seed=1)
            _CACHE[kind] = (q, k, v, True)
        elif kind == "video":
            q, k, v = synthetic(1, 2, 1, int(np.prod(VIDEO_GRID)), 32, seed=2)
            _CACHE[kind] = (q, k, v, False)
        elif kind == "focus":                     # two layers (batch = 2), bidirectional
            q, k, v = synthetic(2, 4, 2, 24, 16, seed=3)
            _CACHE[kind] = (q, k, v, False)
        else:                                     # "square": a 16 x 16 image of tokens
            q, k, v = synthetic(1, 2, 1, 256, 16, seed=4)
            _CACHE[kind] = (q, k, v, True)
    return _CACHE[kind]


_CACHE: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, bool]] = {}


def _select(key: str, backend: str) -> refattn.Selection:
    method = key.split(":")[0]
    kind, params = CONFIGS[key]
    q, k, v, causal = _inputs(kind)
    if kind == "video":
        params = dict(params, grid=VIDEO_GRID)
    return refattn.select(q, k, method, v=v, causal=causal, backend=backend, **params)


def _assert_same(ref: refattn.Selection, got: refattn.Selection, what: str) -> None:
    assert ref.mask.geometry() == got.mask.geometry(), what
    diff = int((ref.mask.mask != got.mask.mask).sum())
    assert diff == 0, f"{what}: {diff} of {ref.mask.mask.size} blocks differ from numpy"
    if "keepset" in ref.extras:
        kr, kg = ref.extras["keepset"], got.extras["keepset"]
        assert kr.head_kind == kg.head_kind and np.array_equal(kr.counts, kg.counts), what
        B, H = kr.counts.shape
        for b in range(B):
            for h in range(H):
                assert np.array_equal(np.sort(kr.kept(b, h)), np.sort(kg.kept(b, h))), \
                    f"{what}: kept tokens of (b={b}, h={h}) differ"
    for name, x in ref.extras.items():      # integer/bool/str extras: perm, pattern, ...
        if isinstance(x, np.ndarray) and x.dtype.kind in "biuUS":
            assert np.array_equal(x, got.extras[name]), f"{what}: extras[{name!r}] differ"


def test_configs_cover_every_method():
    """A new method must get a configuration here (and so a numba check)."""
    configured = {key.split(":")[0] for key in CONFIGS}
    assert set(list_methods()) <= configured, sorted(set(list_methods()) - configured)
    assert set(PRESSES) == set(presses.PRESSES)


@pytest.mark.skipif(NUMBA is not None, reason=f"numba unavailable: {NUMBA}")
@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_select_backends_agree(key):
    ref = _select(key, "numpy")
    frac = ref.mask.mask.mean()
    if key.split(":")[0] not in ("blockbert", "block_attention", "radial", "sta"):
        # a method that keeps all or nothing here would make the comparison vacuous
        # (static and fixed-pattern masks are what they are)
        assert 0.0 < frac < 1.0, f"{key}: degenerate selection ({frac:.3f} of blocks)"
    for backend in ("numba", "auto"):
        _assert_same(ref, _select(key, backend), f"{key} backend={backend}")


def _all_ops() -> list[str]:
    registry.load_backend("numba")
    return sorted(registry.ops())


@pytest.mark.parametrize("name", _all_ops())
def test_every_op_has_numba_kernel_or_is_host_only(name):
    op = registry.ops()[name]
    impls = registry.implementations(name)
    if op.host_only:
        assert set(impls) == {"numpy"}, f"host-only op {name!r} has kernels {sorted(impls)}"
        assert len(op.host_only) > 10, f"{name}: state why the op is host-only"
    else:
        assert NUMBA is None, f"numba unavailable: {NUMBA}"
        assert "numba" in impls, (f"op {name!r} has no numba kernel: write one, or declare "
                                  f"define_op(..., host_only='why') if it needs none")


def test_host_only_routing():
    """A host-only op runs its reference for every backend; an op without a kernel that is
    not host-only is still an error for an explicit backend (no silent fallback)."""
    def ref(x):
        return x

    probe, plain = "_coverage_probe_host_only", "_coverage_probe_plain"
    try:
        registry.define_op(probe, ref, outputs=("x",), host_only="a test probe, no arithmetic")
        registry.define_op(plain, ref, outputs=("x",))
        for backend in ("numpy", "numba", "cupy", "auto"):
            assert registry.resolve_backend(probe, backend) == "numpy"
            assert registry.dispatch(probe, backend) is ref
        with pytest.raises(InputError, match="backend"):
            registry.resolve_backend(probe, "tpu")
        with pytest.raises(ValueError, match="host-only"):
            registry.register(probe, "numba")(ref)
        assert registry.resolve_backend(plain, "auto") == "numpy"
        with pytest.raises(InputError):
            registry.resolve_backend(plain, "numba")
    finally:
        for name in (probe, plain):
            registry._OPS.pop(name, None)
            registry._IMPLS.pop((name, "numpy"), None)


@pytest.fixture(scope="module")
def sample_sel():
    """The reference selections on the bundled sample (``@sample``: hsd, causal)."""
    q, k, v, _ = sample()
    return lambda method, **p: refattn.select(q, k, method, v=v, backend="numpy", **p)


@pytest.mark.skipif(NUMBA is not None, reason=f"numba unavailable: {NUMBA}")
@pytest.mark.parametrize("method,params", [
    ("pbs", {}),
    ("pbs", {"block_size": 64, "segment_size": 256, "tau": 0.95}),
    ("kvpress", {"press": "expected_attention", "compression_ratio": 0.5}),
    ("kvpress", {"press": "keydiff", "compression_ratio": 0.5}),
    ("blockbert", {"num_blocks": 4}),
])
def test_cli_select_numba(tmp_path, sample_sel, method, params):
    out = str(tmp_path / "sel.npz")
    args = ["select", method, "@sample", "--backend", "numba", "-o", out]
    for name, val in params.items():
        args += ["-p", f"{name}={val}"]
    r = CliRunner().invoke(cli.cli, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got = io.load_selection(out)
    ref = sample_sel(method, **params)
    assert np.array_equal(got.mask.mask, ref.mask.mask), f"{method} {params}"
