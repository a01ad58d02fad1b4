"""CUDA scoring kernels of NSA, ProxyAttn and PBS-Attn (gpu/scoring_compressed.py, backend
"cupy") against the NumPy references.

The registry test (tests/test_registry.py) runs the cupy ops on the fp32 cases of
refattn/cases/llm_scoring.py (the float64 kernels). This module adds the tensor-core paths
(bf16/fp16, D = 64/128): every geometry branch of the kernels (split and unsplit pooled
operands, key blocks smaller than, equal to and larger than a key tile, sampled rows
spanning CTAs, several key splits and row tiles, rows that see nothing, Sq != Sk, GQA,
partial blocks, non-causal), structured and real inputs, selections through
``refattn.select`` compared tie-aware, CuPy in / CuPy out, ``out=`` and errors.

Every check states the op, output, case and the measured error. Fast paths are checked
twice: the repository's tolerance rule (``compare_arrays`` at the input dtype) and a tight
bound (``TIGHT`` x max|ref|) that the float64-split design should meet. Skips without CuPy
or a CUDA device.
"""
from __future__ import annotations

import numpy as np
import pytest

import refattn
from refattn.check import compare_arrays, compare_masks
from refattn.core import registry
from refattn.core.errors import InputError
from refattn.data.synthetic import synthetic
from refattn.methods import nsa, pbs, proxyattn  # noqa: F401  (define the ops)

_WHY = registry.load_backend("cupy")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_WHY is not None, reason=f"cupy backend unavailable: {_WHY}")]

#: tight relative bound (max|err| / max|ref|) of the tensor-core paths and the float64 paths
TIGHT = {"tc": 5e-4, "f64": 1e-9, "f64_to_f32": 1e-6}


def _mod():
    from refattn.gpu import scoring_compressed
    return scoring_compressed


def _cast(x, dtype):
    if dtype == "bfloat16":
        import ml_dtypes
        return x.astype(ml_dtypes.bfloat16)
    return x.astype(dtype)


def _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=0, kind="structured"):
    """q [B, Hq, Sq, D], k [B, Hkv, Sk, D] in dtype: structured (refattn.data.synthetic) or
    Gaussian."""
    if kind == "random":
        rng = np.random.default_rng(seed)
        q = rng.standard_normal((B, Hq, Sq, D))
        k = rng.standard_normal((B, Hkv, Sk, D))
    else:
        q, k, _ = synthetic(B, Hq, Hkv, max(Sq, Sk), D, q_len=Sq, seed=seed)
        k = np.ascontiguousarray(k[:, :, :Sk])
    return _cast(q, dtype), _cast(k, dtype)


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _check(name, args, dtype, tight, label=""):
    """Run op ``name`` on the cupy backend and compare every output with the reference:
    NaN positions identical, the tolerance rule at ``dtype``, and max|err| <= tight *
    max|ref| on the finite part."""
    op = registry.ops()[name]
    ref = op.reference(*args)
    got = registry.dispatch(name, "cupy")(*args)
    assert len(got) == len(ref), f"{name}: {len(got)} outputs, reference has {len(ref)}"
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        what = f"{name}[{label}] output {op.outputs[i]}"
        g = _host(g)
        r = np.asarray(r, np.float64)
        assert isinstance(g, np.ndarray), f"{what}: NumPy in must give NumPy out, got {type(g)}"
        assert g.shape == r.shape, f"{what}: shape {g.shape}, reference {r.shape}"
        want = np.float32 if dtype in ("bfloat16", "float16") else np.float64
        assert g.dtype == want, f"{what}: dtype {g.dtype}, expected {np.dtype(want).name}"
        gn, rn = np.isnan(g), np.isnan(r)
        assert np.array_equal(gn, rn), (f"{what}: NaN positions differ: {int(gn.sum())} NaN in "
                                        f"candidate, {int(rn.sum())} in reference; first "
                                        f"difference at {np.argwhere(gn != rn)[:3].tolist()}")
        if r.size == 0:
            continue
        fin = ~rn
        rep = compare_arrays(r[fin], g[fin].astype(np.float64),
                             "float32" if dtype == "float64" else dtype, name=what)
        assert rep.ok, rep.summary()
        err = np.where(fin, np.abs(np.where(fin, g, 0.0).astype(np.float64) - np.where(fin, r, 0.0)), 0.0)
        scale = np.abs(r[fin]).max() if fin.any() else 0.0
        if scale > 0:
            worst = np.unravel_index(np.argmax(err), r.shape)
            assert err.max() <= tight * scale, (
                f"{what}: max|err| = {err.max():.3e} > {tight:g} * max|ref| = {tight * scale:.3e} "
                f"at {tuple(int(x) for x in worst)} (ref {r[worst]:.6g}, got {g[worst]:.6g}); "
                f"relative norm {np.linalg.norm(err) / max(np.linalg.norm(r[fin]), 1e-300):.3e}")
    return ref, got


def _tight(dtype, fast):
    if dtype in ("float32", "float64"):
        return TIGHT["f64"]
    return TIGHT["tc"] if fast else TIGHT["f64_to_f32"]


# ---------------------------------------------------------------------------------- NSA
NSA_CASES = [
    # label, (B, Hq, Hkv, Sq, Sk, D), (l, d, l'), causal, kind
    ("default_gqa_d128", (1, 4, 2, 700, 700, 128), (32, 16, 64), True, "structured"),
    ("default_d64_partial", (1, 2, 1, 517, 517, 64), (32, 16, 64), True, "structured"),
    ("sq_lt_sk", (1, 2, 1, 70, 1100, 64), (32, 16, 64), True, "structured"),
    ("sq_gt_sk_empty_rows", (1, 2, 1, 300, 200, 64), (32, 16, 64), True, "random"),
    ("non_causal", (2, 2, 2, 200, 333, 64), (32, 16, 64), False, "random"),
    ("odd_params", (1, 3, 1, 300, 290, 64), (24, 8, 40), True, "structured"),
    ("stride1_wide_ring", (1, 1, 1, 150, 400, 64), (8, 1, 1), True, "random"),
    ("no_window", (1, 2, 1, 20, 20, 64), (32, 16, 64), True, "random"),
    ("multi_tile_rows", (1, 2, 2, 1200, 1500, 128), (32, 16, 64), True, "structured"),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("label,shape,geo,causal,kind", NSA_CASES, ids=[c[0] for c in NSA_CASES])
def test_nsa_score(dtype, label, shape, geo, causal, kind):
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k = _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=len(label), kind=kind)
    fast = _mod().nsa_fast_path(dtype, D, *geo)
    assert fast == (dtype == "bfloat16"), f"nsa fast path for {dtype}, D={D}, {geo}: {fast}"
    _check("nsa_score", (q, k) + geo + (causal,), dtype, _tight(dtype, fast), label)


def test_nsa_fp16_and_unsplit(monkeypatch):
    """fp16 on the split path; with NSA_SPLIT off the pooled keys are rounded to the input
    dtype (only the repository's bf16 rule applies then)."""
    q, k = _inputs(1, 4, 1, 600, 640, 128, "float16", seed=3)
    _check("nsa_score", (q, k, 32, 16, 64, True), "float16", TIGHT["tc"], "fp16")
    mod = _mod()
    monkeypatch.setattr(mod, "NSA_SPLIT", False)
    qb, kb = _inputs(1, 4, 1, 600, 640, 128, "bfloat16", seed=3)
    assert mod.nsa_fast_path("bfloat16", 128, 32, 16, 64)
    _check("nsa_score", (qb, kb, 32, 16, 64, True), "bfloat16", 2e-2, "unsplit")


def test_nsa_block_scores_equals_op():
    """The p_slc-only entry point writes the same p_slc (same kernel without p_cmp)."""
    mod = _mod()
    q, k = _inputs(1, 4, 2, 900, 900, 128, "bfloat16", seed=4)
    p_slc, _ = registry.dispatch("nsa_score", "cupy")(q, k, 32, 16, 64, True)
    only = mod.nsa_block_scores(q, k, 32, 16, 64, True)
    assert isinstance(only, np.ndarray) and only.shape == p_slc.shape
    # the block bins add in shared-memory atomics: equal up to the summation order
    np.testing.assert_allclose(only, p_slc, rtol=1e-5, atol=1e-7,
                               err_msg="nsa_block_scores differs from nsa_score's p_slc")


@pytest.mark.parametrize("label,shape,geo,causal,kind", NSA_CASES, ids=[c[0] for c in NSA_CASES])
def test_nsa_score_v2(monkeypatch, label, shape, geo, causal, kind):
    """The v2 kernel (eq. 9 in registers; taken when l = 2d, l' = 4d, v1 otherwise) on every
    NSA case, bf16, against the reference and against v1."""
    mod = _mod()
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k = _inputs(B, Hq, Hkv, Sq, Sk, D, "bfloat16", seed=len(label), kind=kind)
    monkeypatch.setattr(mod, "NSA_KERNEL", "v2")
    used = mod.nsa_kernel_used("bfloat16", D, *geo)
    want = "v2" if (geo[0] == 2 * geo[1] and geo[2] == 4 * geo[1]) else "v1"
    assert used == want, f"nsa kernel for {geo}: {used}, expected {want}"
    _, got = _check("nsa_score", (q, k) + geo + (causal,), "bfloat16", TIGHT["tc"], f"v2 {label}")
    monkeypatch.setattr(mod, "NSA_KERNEL", "v1")
    old = registry.dispatch("nsa_score", "cupy")(q, k, *geo, causal)
    for name, a, b_ in zip(("p_slc", "p_cmp"), got, old, strict=True):
        a, b_ = _host(a), _host(b_)
        tol = 2e-5 * max(float(np.abs(b_).max()) if b_.size else 0.0, 1e-30)
        assert np.abs(a - b_).max(initial=0.0) <= tol, (
            f"nsa v2 vs v1 [{label}] {name}: max|diff| {np.abs(a - b_).max():.3e} > {tol:.3e}")


def test_nsa_v2_fp16_unsplit_and_block_scores(monkeypatch):
    """v2 in fp16, with bf16-rounded pooled keys (NSA_SPLIT off: 64-key tiles, 16 blocks per
    tile), and the p_slc-only entry point (same kernel without p_cmp), with GQA."""
    mod = _mod()
    monkeypatch.setattr(mod, "NSA_KERNEL", "v2")
    q, k = _inputs(1, 4, 1, 600, 640, 128, "float16", seed=3)
    _check("nsa_score", (q, k, 32, 16, 64, True), "float16", TIGHT["tc"], "v2 fp16")
    qb, kb = _inputs(1, 4, 2, 900, 900, 128, "bfloat16", seed=4)
    p_slc, _ = registry.dispatch("nsa_score", "cupy")(qb, kb, 32, 16, 64, True)
    only = mod.nsa_block_scores(qb, kb, 32, 16, 64, True)
    np.testing.assert_allclose(only, p_slc, rtol=1e-6, atol=1e-8,
                               err_msg="v2 nsa_block_scores differs from nsa_score's p_slc")
    monkeypatch.setattr(mod, "NSA_SPLIT", False)
    qb, kb = _inputs(1, 4, 1, 600, 640, 128, "bfloat16", seed=3)
    _check("nsa_score", (qb, kb, 32, 16, 64, True), "bfloat16", 2e-2, "v2 unsplit")
    qb, kb = _inputs(1, 2, 1, 1300, 1333, 64, "bfloat16", seed=5, kind="random")
    _check("nsa_score", (qb, kb, 64, 32, 128, True), "bfloat16", 2e-2, "v2 unsplit 64/32/128")
    monkeypatch.setattr(mod, "NSA_KERNEL", "v3")
    with pytest.raises(InputError, match="NSA_KERNEL"):
        mod.nsa_block_scores(qb, kb, 32, 16, 64, True)


# ----------------------------------------------------------------------------- ProxyAttn
PROXY_CASES = [
    # label, (B, Hq, Hkv, Sq, Sk, D), (block, group, stride, causal), kind, tensor cores (bf16)
    # group: a multiple of the GQA group Hq // Hkv. Tensor cores need stride | block and
    # block/stride kept keys per block a multiple of the key tile (64, 32 when the proxy keys
    # pool several kv heads) or 8/16/32 dividing it.
    ("mha_b128_tiles_per_block", (1, 2, 2, 700, 700, 128), (128, 1, 1, True), "structured", True),
    ("mha_b128_stride4", (1, 2, 2, 700, 700, 128), (128, 1, 4, True), "structured", True),
    ("gqa_default_group_b64", (1, 4, 2, 500, 500, 64), (64, 2, 1, True), "structured", True),
    ("group_over_kv_heads_b32", (1, 4, 2, 300, 300, 64), (32, 4, 1, True), "structured", True),
    ("group_over_kv_heads_b128_s4", (1, 4, 2, 600, 600, 64), (128, 4, 4, True), "structured",
     True),
    ("group_over_kv_heads_s16", (1, 4, 2, 900, 900, 64), (128, 4, 16, True), "random", True),
    ("b16_stride2", (1, 4, 2, 260, 260, 64), (16, 2, 2, True), "random", True),
    ("b8_noncausal", (1, 2, 1, 100, 180, 64), (8, 2, 1, False), "random", True),
    ("b64_stride8", (1, 2, 2, 700, 650, 64), (64, 1, 8, True), "random", True),
    ("stride4_rows_span_ctas", (1, 2, 1, 600, 600, 128), (64, 2, 4, True), "structured", True),
    ("sq_lt_sk", (1, 2, 1, 150, 700, 64), (64, 2, 1, True), "random", True),
    ("sq_lt_sk_stride4", (1, 2, 1, 150, 701, 64), (64, 2, 4, True), "random", True),
    ("sq_gt_sk_empty_rows", (1, 2, 2, 400, 150, 64), (128, 1, 1, True), "random", True),
    ("sq_gt_sk_empty_rows_s4", (1, 2, 2, 403, 150, 64), (128, 1, 4, True), "random", True),
    ("mixed_batch_group3", (2, 6, 2, 200, 260, 64), (64, 3, 2, True), "random", True),
    ("stride3_exact_path", (1, 2, 1, 600, 600, 128), (64, 2, 3, True), "structured", False),
    ("stride_over_block_exact_path", (1, 2, 1, 300, 310, 64), (32, 2, 50, True), "random", False),
    ("stride_over_sk_exact_path", (1, 2, 1, 90, 100, 64), (32, 2, 200, True), "random", False),
    ("odd_block_exact_path", (1, 2, 1, 200, 200, 64), (96, 2, 5, True), "random", False),
    ("four_keys_per_block_exact_path", (1, 2, 2, 300, 300, 64), (16, 1, 4, True), "random", False),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("label,shape,rest,kind,tc", PROXY_CASES, ids=[c[0] for c in PROXY_CASES])
def test_proxyattn_score(dtype, label, shape, rest, kind, tc):
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k = _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=len(label) + 7, kind=kind)
    bs, gs, st, _ = rest
    fast = _mod().proxyattn_fast_path(dtype, D, bs, gs, st, Hq, Hkv)
    assert fast == (dtype == "bfloat16" and tc), f"proxyattn fast path for {dtype}, {label}: {fast}"
    _check("proxyattn_score", (q, k) + rest, dtype, _tight(dtype, fast), label)


def test_proxyattn_fp16_and_scratch_groups(monkeypatch):
    """fp16; and the result does not depend on how proxy heads are grouped for the scratch."""
    mod = _mod()
    q, k = _inputs(2, 4, 2, 640, 640, 128, "float16", seed=11)
    args = (q, k, 128, 2, 4, True)
    assert mod.proxyattn_fast_path("float16", 128, 128, 2, 4, 4, 2)
    _, (S,) = _check("proxyattn_score", args, "float16", TIGHT["tc"], "fp16")
    monkeypatch.setattr(mod, "PROXY_SCRATCH_BYTES", 1)     # one proxy head per launch
    (S1,) = registry.dispatch("proxyattn_score", "cupy")(*args)
    assert np.array_equal(S, S1), f"proxyattn_score changes with the scratch grouping: max " \
                                  f"{np.abs(S - S1).max():.3e}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape,bs,causal,tps", [
    ((1, 4, 2, 300, 300, 64), 64, True, 16),
    ((1, 2, 1, 70, 150, 32), 32, True, 16),
    ((1, 2, 1, 150, 70, 32), 32, True, 16),      # rows that see no key
    ((2, 2, 2, 96, 130, 16), 32, False, 16),
    ((1, 4, 1, 1000, 1000, 128), 128, True, 16),
    ((1, 4, 1, 1000, 1000, 128), 128, True, 3),  # several key splits
    ((1, 2, 1, 500, 520, 64), 256, True, 2),     # 244 rows: two row tiles (atomics)
    ((1, 2, 1, 700, 300, 64), 256, True, 2),     # Sq > Sk: some last-block rows see nothing
    ((1, 2, 2, 129, 2000, 128), 100, False, 4),  # one row, blocks straddling key tiles
])
def test_proxyattn_budget_score(monkeypatch, dtype, shape, bs, causal, tps):
    mod = _mod()
    monkeypatch.setattr(mod, "PROXY_BUDGET_TILES_PER_SPLIT", tps)
    B, Hq, Hkv, Sq, Sk, D = shape
    q, k = _inputs(B, Hq, Hkv, Sq, Sk, D, dtype, seed=Sq + Sk)
    fast = mod.proxyattn_budget_fast_path(dtype, D)
    assert fast == (dtype == "bfloat16" and D in (64, 128))
    _check("proxyattn_budget_score", (q, k, bs, causal), dtype, _tight(dtype, fast),
           f"{shape} b{bs} c{int(causal)}")


# ----------------------------------------------------------------------------------- PBS
PBS_KI_CASES = [
    # label, (B, Hq, Hkv, L, D), (block, segment), tiles per split
    ("default_gqa", (1, 4, 2, 1000, 128), (128, 256), 16),
    ("partial_segment_many_splits", (1, 2, 1, 1300, 64), (128, 256), 2),
    ("ell_over_128_atomic", (2, 2, 2, 900, 64), (200, 128), 3),
    ("short_query_block", (1, 2, 1, 300, 64), (64, 96), 16),
    ("L_below_block", (1, 2, 1, 90, 64), (128, 32), 1),
    ("no_complete_segment", (1, 2, 1, 50, 64), (32, 64), 16),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("label,shape,geo,tps", PBS_KI_CASES, ids=[c[0] for c in PBS_KI_CASES])
def test_pbs_key_importance(monkeypatch, dtype, label, shape, geo, tps):
    mod = _mod()
    monkeypatch.setattr(mod, "PBS_KI_TILES_PER_SPLIT", tps)
    B, Hq, Hkv, L, D = shape
    q, k = _inputs(B, Hq, Hkv, L, L, D, dtype, seed=L)
    fast = mod.pbs_key_importance_fast_path(dtype, D)
    assert fast == (dtype == "bfloat16")
    _check("pbs_key_importance", (q, k) + geo, dtype, _tight(dtype, fast), label)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("shape,geo", [
    ((1, 4, 1000, 64), (128, 256)),
    ((2, 2, 777, 32), (64, 128)),        # partial block (zero padding in the means)
    ((1, 2, 300, 64), (32, 80)),         # segment not a multiple of the block (m = s // b)
    ((1, 2, 200, 64), (128, 256)),       # one segment: every row NaN
])
def test_pbs_score(dtype, shape, geo):
    B, H, L, D = shape
    q, kp = _inputs(B, H, H, L, L, D, dtype, seed=L + D)
    ref, _ = _check("pbs_score", (q, kp) + geo, dtype, _tight(dtype, False), f"{shape} {geo}")
    m = geo[1] // geo[0]
    n = ref[0].shape[-1]
    expect_nan_rows = np.arange(n) < m
    assert np.array_equal(np.isnan(ref[0]).all(-1)[0, 0], expect_nan_rows)


# ----------------------------------------------------------------------- real data
def test_real_sample_all_ops():
    """refattn.data.sample() (Qwen layer 12, 2048 tokens, 3 query heads on 1 kv head, D = 64)
    in bf16 through every op, and in fp32 through the cheaper ones."""
    from refattn.data import sample
    s = sample()
    q32, k32 = np.ascontiguousarray(s[0]), np.ascontiguousarray(s[1])
    for dtype in ("bfloat16", "float32"):
        q, k = _cast(q32, dtype), _cast(k32, dtype)
        fast = dtype == "bfloat16"
        _check("nsa_score", (q, k, 32, 16, 64, True), dtype, _tight(dtype, fast), "sample")
        _check("proxyattn_score", (q, k, 128, 3, 4, True), dtype, _tight(dtype, fast), "sample")
        _check("proxyattn_budget_score", (q, k, 128, True), dtype, _tight(dtype, fast), "sample")
        _check("pbs_key_importance", (q, k, 128, 256), dtype, _tight(dtype, fast), "sample")
        kp = np.ascontiguousarray(np.repeat(k, 3, axis=1)[:, :, ::-1])
        _check("pbs_score", (q, kp, 128, 256), dtype, _tight(dtype, False), "sample")


# ----------------------------------------------------------------------- selections
def _select_pair(method, q, k, **params):
    return (refattn.select(q, k, method, backend="numpy", **params),
            refattn.select(q, k, method, backend="cupy", **params))


def test_nsa_select_bf16():
    q, k = _inputs(1, 4, 2, 3000, 3000, 128, "bfloat16", seed=21)
    ref, got = _select_pair("nsa", q, k)
    rep = compare_masks(ref, got.mask, tol=1e-3)
    assert rep.ok, rep.summary()


def test_proxyattn_select_bf16():
    q, k = _inputs(1, 4, 2, 2500, 2500, 128, "bfloat16", seed=22)
    ref, got = _select_pair("proxyattn", q, k, gamma=0.9)
    budgets_ref, budgets_got = ref.extras["budgets"], got.extras["budgets"]
    diff = int((budgets_ref != budgets_got).sum())
    assert diff <= max(1, budgets_ref.size // 500), f"proxyattn budgets differ in {diff} of " \
                                                    f"{budgets_ref.size} rows"
    rep = compare_masks(ref, got.mask, tol=1e-3)
    frac = rep.stats["mismatches"] / max(1, rep.stats["blocks"])
    assert frac <= 2e-3, rep.summary()


def test_pbs_select_bf16():
    """Key importance close; permutations equal except at near-tied keys; masks equal
    (tie-aware) when the permutations are."""
    q, k = _inputs(1, 2, 1, 2100, 2100, 128, "bfloat16", seed=23)
    ref, got = _select_pair("pbs", q, k, tau=0.9)
    w_ref, w_got = ref.extras["key_importance"], got.extras["key_importance"]
    assert np.abs(w_ref - w_got).max() <= TIGHT["tc"] * np.abs(w_ref).max()
    pr, pg = ref.extras["perm"], got.extras["perm"]
    bad = np.argwhere(pr != pg)
    for b_, h_, u in bad[:50]:
        a, c = pr[b_, h_, u], pg[b_, h_, u]
        gap = abs(w_ref[b_, h_, a] - w_ref[b_, h_, c])
        assert gap <= 2 * TIGHT["tc"] * np.abs(w_ref[b_, h_]).max(), \
            f"pbs permutation differs at slot {u} (keys {a} vs {c}) without a near tie: |dw| = {gap:.3e}"
    if bad.size == 0:
        rep = compare_masks(ref, got.mask, tol=1e-3)
        assert rep.ok, rep.summary()


# ----------------------------------------------------------------------- arrays, out=, errors
def test_cupy_in_cupy_out_and_out_argument():
    import cupy as cp
    mod = _mod()
    q, k = _inputs(1, 4, 2, 400, 400, 128, "float16", seed=31)
    qd, kd = cp.asarray(q), cp.asarray(k)
    runs = [("nsa_score", (32, 16, 64, True)), ("proxyattn_score", (64, 2, 1, True)),
            ("proxyattn_budget_score", (64, True)), ("pbs_key_importance", (128, 128)),
            ("pbs_score", (64, 128))]
    for name, rest in runs:
        fn = registry.dispatch(name, "cupy")
        kk = (cp.repeat(kd, 2, axis=1), np.repeat(k, 2, axis=1)) if name == "pbs_score" else (kd, k)
        dev = fn(qd, kk[0], *rest)
        assert all(isinstance(x, cp.ndarray) for x in dev), f"{name}: CuPy in must give CuPy out"
        hostres = fn(q, kk[1], *rest)
        assert all(isinstance(x, np.ndarray) for x in hostres), f"{name}: NumPy in, NumPy out"
        for d, h in zip(dev, hostres, strict=True):   # NSA's bins: atomics, order may vary
            np.testing.assert_allclose(d.get(), h, rtol=1e-5, atol=1e-7, equal_nan=True,
                                       err_msg=f"{name}: device and host results differ")
        outs = tuple(np.full(h.shape, np.nan, np.float64) for h in hostres)
        res = fn(q, kk[1], *rest, out=outs)
        assert all(r is o for r, o in zip(res, outs, strict=True)), f"{name}: out= not returned"
        for o, h in zip(outs, hostres, strict=True):
            assert np.array_equal(np.isnan(o), np.isnan(h)), f"{name}: out= left unwritten elements"
            np.testing.assert_allclose(o[~np.isnan(o)], h[~np.isnan(h)].astype(np.float64),
                                       rtol=1e-5, atol=1e-7, err_msg=f"{name}: out= values")
        douts = tuple(cp.full(h.shape, cp.nan, cp.float32) for h in hostres)
        fn(qd, kk[0], *rest, out=douts)
        for o, h in zip(douts, hostres, strict=True):
            assert np.array_equal(np.isnan(o.get()), np.isnan(h)), f"{name}: CuPy out= unwritten"
    assert mod.nsa_block_scores(qd, kd, 32, 16, 64, True).__class__ is cp.ndarray


def test_errors():
    q, k = _inputs(1, 2, 1, 64, 64, 64, "float32")
    with pytest.raises(InputError, match="stride"):
        registry.dispatch("nsa_score", "cupy")(q, k, 32, 12, 64, True)
    with pytest.raises(InputError, match="group_size"):
        registry.dispatch("proxyattn_score", "cupy")(q, k, 32, 3, 1, True)
    with pytest.raises(InputError, match="group_size"):    # not a multiple of the GQA group
        registry.dispatch("proxyattn_score", "cupy")(q, k, 32, 1, 4, True)
    with pytest.raises(InputError, match="k_perm"):
        registry.dispatch("pbs_score", "cupy")(q, k, 16, 32)
    with pytest.raises(InputError, match="equal"):
        registry.dispatch("pbs_key_importance", "cupy")(q, k[:, :, :50], 16, 32)
    with pytest.raises(InputError, match="out"):
        registry.dispatch("proxyattn_budget_score", "cupy")(q, k, 16, True,
                                                            out=(np.empty((1, 2, 4, 4)),))
