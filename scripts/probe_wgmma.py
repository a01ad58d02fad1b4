#!/usr/bin/env python3
"""Device probe of the Hopper wgmma forward (``gpu/attn_fwd_wgmma.cu``), in stages that
localise a failure:

  feature  NVRTC builds the file for sm_90a (``__CUDA_ARCH_FEAT_SM90_ALL`` seen), and the
           registers / spills / shared memory of every forward variant
  ss       one warpgroup, S = A B^T by SS wgmma from hand-swizzled shared memory: checks the
           descriptors, the 128-byte swizzle and the accumulator layout
  rs       one warpgroup, C = round(P) V by RS wgmma, P from the accumulator layout packed to
           A fragments, V MN-major (trans-b): checks the P-from-registers product
  tma      one TMA box load through a host-encoded tensor map: checks cuTensorMapEncodeTiled
           via ctypes, the swizzle TMA writes (must equal the hand swizzle above) and the
           zero fill of out-of-bounds rows
  fwd      the whole kernel against the float64 reference (dense, causal, block masks,
           partial blocks, GQA, Sq != Sk, empty rows, D = 64, fp16) for every variant
           (stages 2 / 3, overlap on / off); the mma.sync kernel's error on the same case
           is printed beside it
  bwd      the wgmma backward (``gpu/attn_bwd_wgmma.cu``): its build (registers, spills), a
           unit probe of the dQ product (SS wgmma with both operands MN-major: trans-a and
           trans-b), then dq, dk, dv against the float64 reference on the fwd stage's D = 128
           cases (and backward-specific ones: block_q 64, block_k 256, Sq > Sk, GQA) for ring
           depths 2 and 3, with the mma.sync backward's error beside each, and localised
           diagnostics (which keys of the 128-key tile / which query rows and d columns)
  bwdbench S = 8192 and 32768 (as bench): mma.sync backward, wgmma backward (st 2 / 3, whole
           call and kernel only), its max |diff| to mma.sync, the wgmma forward (for the
           bwd / fwd ratio) and SDPA flash / cuDNN dense causal backward when torch exists
  moba     the wgmma per-token-routing (MoBA, block_q = 1) gather (``gpu/attn_gather_wgmma.cu``):
           build (registers, spills), then the partials of the gather kernel alone against
           float64 per-(row, block) partials (localised: entry of the 128-row tile -> consumer
           warpgroup / warp / row-in-16, d columns, key-block position), then the whole
           forward (gather + combine) against the float64 reference under check_fwd's rule
           (bf16 / fp16, D 64 / 128, block_k 64 / 128, causal or not, GQA, Sq != Sk, partial
           blocks, empty rows, segments longer than one CTA's rows) for every variant (rows
           per CTA, ring depth, 16-bit or fp32 partials), the mma.sync gather's error beside it
  mobabench S = 8192 and 32768 (as bench_gpu.py's MoBA table: top-8 of 128-key blocks, own
           block always chosen, random scores): the mma.sync gather (current default), every
           wgmma variant (whole call; gather kernel alone; combine = difference; max |diff| to
           mma.sync), and the yardstick: the default block-mask forward at the same density
  bench    S = 8192 and 32768, H = 32, D = 128, bf16, causal, causal-ish 128x128 block masks
           at density 0.1 / 0.3 / 1.0 (and mask=None): the mma.sync kernel, every wgmma
           variant (with its max |diff| to mma.sync), FlexAttention and SDPA cuDNN when torch
           is importable

Each stage runs in its own subprocess with a timeout, so a hang (a pipeline deadlock) or a
sticky CUDA error in one stage cannot take down the others; a stage never stops at a wrong
result, it prints it and goes on. Lines starting with ``RESULT`` are the summary.

Usage: PYTHONPATH=. python3 scripts/probe_wgmma.py [--only fwd,bwd,...] [--stage NAME] [--no-torch]
       [--seq ...] [--density ...]
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

STAGES = {"feature": 150, "ss": 90, "rs": 90, "tma": 90, "fwd": 200, "bench": 300, "bwd": 180,
          "bwdbench": 240, "moba": 140, "mobabench": 95}
# variants of the wgmma per-token-routing gather: (rows per CTA, Q ring depth, partial type)
MOBA_VARIANTS = [(512, 2, "t"), (128, 2, "t"), (512, 3, "t"), (512, 2, "f32")]
BWD_STAGES = (2, 3)  # depths of the Q / dO ring of the wgmma backward
VARIANTS = [(2, True), (2, False), (3, True), (3, False)]  # (stages, overlap)


def log(msg: str = "") -> None:
    print(msg, flush=True)


def result(stage: str, what: str, ok: bool | None, detail: str = "") -> None:
    tag = "PASS" if ok else ("FAIL" if ok is not None else "INFO")
    log(f"RESULT {stage:<7s} {tag} {what:<52s} {detail}")


# ----------------------------------------------------------------------------- helpers
def _setup():
    import cupy as cp
    import ml_dtypes

    from refattn.core.registry import load_backend
    why = load_backend("cupy")     # in a source tree this loads gpu/ as refattn.gpu
    if why is not None:
        raise RuntimeError(f"cupy backend unavailable: {why}")
    from refattn.gpu import _build
    from refattn.gpu import attention as ga
    return cp, ml_dtypes, _build, ga


def _to16(x, kind, ml_dtypes):
    """fp32 NumPy -> (host array of the 16-bit dtype, raw device-ready NumPy of uint16/f16)."""
    if kind == "bf16":
        h = x.astype(np.float32).astype(ml_dtypes.bfloat16)
        return h, h.view(np.uint16)
    h = x.astype(np.float16)
    return h, h


CT = {"bf16": "__nv_bfloat16", "fp16": "__half"}


# ----------------------------------------------------------------------------- stages
def stage_feature(args) -> None:
    cp, _, _build, ga = _setup()
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = dev["name"].decode() if isinstance(dev["name"], bytes) else dev["name"]
    log(f"device {name}, cc {_build.device_cc()}, CuPy {cp.__version__}, "
        f"runtime {cp.cuda.runtime.runtimeGetVersion()}, driver {cp.cuda.runtime.driverGetVersion()}")
    log(f"options for attn_fwd_wgmma.cu: {_build.compile_options('attn_fwd_wgmma.cu')}")
    try:
        fn = _build.get_kernel("attn_fwd_wgmma.cu", "wgmma_feature_probe")
        out = cp.zeros(2, cp.int32)
        fn((1,), (32,), (out,))
        o = out.get()
        result("feature", "sm_90a feature macro in the NVRTC build", bool(o[0] == 1),
               f"REFATTN_SM90A={o[0]} __CUDA_ARCH__={o[1]}")
    except Exception as e:
        result("feature", "build wgmma_feature_probe", False, f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return
    combos = [("__nv_bfloat16", 128, 128, st, ov) for st, ov in VARIANTS]
    combos += [("__half", 128, 128, 2, True), ("__nv_bfloat16", 64, 128, 2, True),
               ("__nv_bfloat16", 128, 64, 2, True)]
    for T, D, BN, st, ov in combos:
        t0 = time.time()
        try:
            fn, nm = ga.wgmma_kernel(T, D, BN, st, ov)
            smem = ga.wgmma_smem(D, BN, st)
            spill = fn.local_size_bytes
            result("feature", f"build {nm}", spill == 0,
                   f"regs {fn.num_regs} local {spill} B static smem {fn.shared_size_bytes} "
                   f"dyn smem {smem} ({time.time() - t0:.1f} s)")
        except Exception as e:
            result("feature", f"build {T} D={D} BN={BN} st={st} ovl={ov}", False,
                   f"{type(e).__name__}: {str(e)[:2000]}")


def stage_ss(args) -> None:
    cp, ml_dtypes, _build, _ = _setup()
    rng = np.random.default_rng(0)
    for kind in ("bf16", "fp16"):
        for N, K in ((128, 128), (64, 128), (128, 64), (64, 64)):
            for pattern in ("random", "onehot"):
                if pattern == "random":
                    A = rng.standard_normal((64, K)).astype(np.float32)
                    B = rng.standard_normal((N, K)).astype(np.float32)
                else:  # A[i, k] = (k == i % K): C[i, n] = B[n, i % K]; B[n, k] = n + k/256
                    A = np.zeros((64, K), np.float32)
                    A[np.arange(64), np.arange(64) % K] = 1
                    B = (np.arange(N)[:, None] + np.arange(K)[None, :] / 256.0).astype(np.float32)
                Ah, Ar = _to16(A, kind, ml_dtypes)
                Bh, Br = _to16(B, kind, ml_dtypes)
                ref = Ah.astype(np.float64) @ Bh.astype(np.float64).T
                what = f"SS {kind} m64n{N} K={K} {pattern}"
                try:
                    fn = _build.get_kernel("attn_fwd_wgmma.cu", f"wgmma_probe_ss<{CT[kind]}, {N}, {K}>")
                    C = cp.full((64, N), cp.nan, cp.float32)
                    _build.launch(fn, (1,), (128,), (cp.asarray(Ar), cp.asarray(Br), C),
                                  (K // 64) * (64 + N) * 128 + 1024)
                    got = C.get()
                    err = np.abs(got - ref).max()
                    ok = bool(np.isfinite(got).all() and err <= 1e-3 * max(1.0, np.abs(ref).max()))
                    result("ss", what, ok, f"max err {err:.3g}")
                    if not ok:
                        _explain(got, ref, pattern, "row i of C (query), column n (key)")
                except Exception as e:
                    result("ss", what, False, f"{type(e).__name__}: {str(e)[:500]}")


def _explain(got, ref, pattern, axes) -> None:
    bad = ~np.isclose(got, ref, rtol=1e-2, atol=1e-2)
    log(f"      {bad.sum()} of {bad.size} wrong ({axes}); wrong rows {np.unique(np.nonzero(bad)[0])[:16]}, "
        f"wrong cols {np.unique(np.nonzero(bad)[1])[:16]}")
    idx = np.argwhere(bad)[:6]
    for i, n in idx:
        hint = ""
        if pattern == "onehot":
            g = got[i, n]
            hint = f" (got ~ B[{int(math.floor(g))}, {round((g - math.floor(g)) * 256)}])" if np.isfinite(g) else ""
        log(f"      C[{i},{n}] got {got[i, n]:.5g} want {ref[i, n]:.5g}{hint}")


def stage_rs(args) -> None:
    cp, ml_dtypes, _build, _ = _setup()
    rng = np.random.default_rng(1)
    for kind in ("bf16", "fp16"):
        for N, KK in ((128, 128), (64, 128), (128, 64), (64, 64)):
            for pattern in ("random", "onehot"):
                if pattern == "random":
                    P = rng.random((64, KK)).astype(np.float32)
                    V = rng.standard_normal((KK, N)).astype(np.float32)
                else:  # P[i, k] = (k == i % KK): C[i, n] = V[i % KK, n]; V[k, n] = k + n/256
                    P = np.zeros((64, KK), np.float32)
                    P[np.arange(64), np.arange(64) % KK] = 1
                    V = (np.arange(KK)[:, None] + np.arange(N)[None, :] / 256.0).astype(np.float32)
                Ph, _ = _to16(P, kind, ml_dtypes)
                Vh, Vr = _to16(V, kind, ml_dtypes)
                ref = Ph.astype(np.float64) @ Vh.astype(np.float64)
                what = f"RS {kind} m64n{N} K={KK} {pattern}"
                try:
                    fn = _build.get_kernel("attn_fwd_wgmma.cu", f"wgmma_probe_rs<{CT[kind]}, {N}, {KK}>")
                    C = cp.full((64, N), cp.nan, cp.float32)
                    _build.launch(fn, (1,), (128,), (cp.asarray(P), cp.asarray(Vr), C),
                                  (N // 64) * KK * 128 + 1024)
                    got = C.get()
                    err = np.abs(got - ref).max()
                    ok = bool(np.isfinite(got).all() and err <= 1e-3 * max(1.0, np.abs(ref).max()))
                    result("rs", what, ok, f"max err {err:.3g}")
                    if not ok:
                        _explain(got, ref, "rs-" + pattern, "row i of C, column n (d)")
                        if pattern == "onehot":
                            idx = np.argwhere(~np.isclose(got, ref, rtol=1e-2, atol=1e-2))[:6]
                            for i, n in idx:
                                g = got[i, n]
                                if np.isfinite(g):
                                    log(f"      C[{i},{n}] ~ V[{int(math.floor(g))}, "
                                        f"{round((g - math.floor(g)) * 256)}]")
                except Exception as e:
                    result("rs", what, False, f"{type(e).__name__}: {str(e)[:500]}")


def stage_tma(args) -> None:
    cp, ml_dtypes, _build, ga = _setup()
    B, H, S, D = 2, 3, 200, 128
    bits = (np.arange(B * H * S * D, dtype=np.int64) * 2654435761 % 65521).astype(np.uint16)
    bits = bits.reshape(B, H, S, D)
    bits[..., :] &= 0x3FFF  # finite bf16 patterns (irrelevant to TMA, nicer to print)
    arr = cp.asarray(bits)
    d = ga._Dev(arr, "bfloat16")
    rows = 64
    try:
        m = ga.tensor_map(d, rows)
        result("tma", "cuTensorMapEncodeTiled (ctypes)", True, f"{len(m)} bytes")
    except Exception as e:
        result("tma", "cuTensorMapEncodeTiled (ctypes)", False, f"{type(e).__name__}: {e}")
        return
    mdev = cp.asarray(np.frombuffer(m, np.uint8))
    fn = _build.get_kernel("attn_fwd_wgmma.cu", "tma_probe<__nv_bfloat16>")
    r = np.arange(rows)[:, None]
    c = np.arange(64)[None, :]
    pos = r * 64 + (((c // 8) ^ (r % 8)) * 8) + c % 8  # element index of (r, c) in smem
    for c0, c1, c2, c3 in ((0, 0, 0, 0), (64, 10, 2, 1), (0, 160, 1, 0), (64, 192, 2, 1)):
        what = f"TMA box 64x{rows} at d={c0} row={c1} h={c2} b={c3}"
        try:
            out = cp.full(rows * 64, 0xFFFF, cp.uint16)
            _build.launch(fn, (1,), (128,), (mdev, out, np.int32(rows), np.int32(c0), np.int32(c1),
                                             np.int32(c2), np.int32(c3)), rows * 128 + 1024)
            got = out.get()
            want = np.zeros(rows * 64, np.uint16)
            src = np.zeros((rows, 64), np.uint16)
            valid = min(rows, max(0, S - c1))
            src[:valid] = bits[c3, c2, c1:c1 + valid, c0:c0 + 64]
            want[pos.ravel()] = src.ravel()
            ok = bool(np.array_equal(got, want))
            plain = np.array_equal(got.reshape(rows, 64), src)
            result("tma", what, ok, f"{(got != want).sum()} elements differ"
                   + (" (data is UNSWIZZLED row-major)" if plain and not ok else ""))
            if not ok:
                bad = np.nonzero(got != want)[0][:8]
                for i in bad:
                    log(f"      smem elem {i} (row {i // 64}, chunk {(i % 64) // 8}) got {got[i]:#06x} "
                        f"want {want[i]:#06x}")
        except Exception as e:
            result("tma", what, False, f"{type(e).__name__}: {str(e)[:500]}")
            return


def _fwd_cases():
    from refattn.core.blockmask import BlockMask, num_blocks

    def rmask(rng, B, H, Sq, Sk, bq, bk, dens, empty_rows=True):
        qb, kb = num_blocks(Sq, bq), num_blocks(Sk, bk)
        m = rng.random((B, H, qb, kb)) < dens
        if empty_rows and qb > 1:
            m[:, :, rng.integers(qb)] = False
        return BlockMask(m, block_q=bq, block_k=bk, q_len=Sq, k_len=Sk)

    # (name, dtype, B, Hq, Hkv, Sq, Sk, D, causal, mask builder or None)
    return [
        ("dense 256x256 exact tiles", "bf16", 1, 2, 2, 256, 256, 128, False, None),
        ("dense causal 256x256", "bf16", 1, 2, 2, 256, 256, 128, True, None),
        ("dense GQA partial 203x333", "bf16", 2, 4, 2, 203, 333, 128, False, None),
        ("dense causal GQA partial 203x333", "bf16", 2, 4, 2, 203, 333, 128, True, None),
        ("dense causal fp16 203x333", "fp16", 2, 4, 2, 203, 333, 128, True, None),
        ("dense causal D=64 203x333", "bf16", 2, 4, 2, 203, 333, 64, True, None),
        ("causal Sq>Sk 300x130 (empty rows)", "bf16", 1, 2, 1, 300, 130, 128, True, None),
        ("long dense causal 1000x1000", "bf16", 1, 2, 1, 1000, 1000, 128, True, None),
        ("block 128x128 700x900", "bf16", 2, 4, 2, 700, 900, 128, False,
         lambda r: rmask(r, 2, 4, 700, 900, 128, 128, 0.3)),
        ("block 128x128 causal 700x900", "bf16", 2, 4, 2, 700, 900, 128, True,
         lambda r: rmask(r, 2, 4, 700, 900, 128, 128, 0.3)),
        ("block 128x64 causal 700x900 (BN 64)", "bf16", 2, 4, 2, 700, 900, 128, True,
         lambda r: rmask(r, 2, 4, 700, 900, 128, 64, 0.3)),
        ("block 256x256 causal 700x900", "fp16", 2, 4, 2, 700, 900, 128, True,
         lambda r: rmask(r, 2, 4, 700, 900, 256, 256, 0.4)),
        ("block 128x128 D=64 causal 700x900", "fp16", 2, 4, 2, 700, 900, 64, True,
         lambda r: rmask(r, 2, 4, 700, 900, 128, 128, 0.3)),
        ("block kv-head mask 512x640", "bf16", 2, 4, 2, 512, 640, 128, True,
         lambda r: BlockMask(r.random((2, 2, 4, 5)) < 0.5, block_q=128, block_k=128, q_len=512,
                             k_len=640, head_kind="kv")),
        ("block broadcast mask 512x640", "bf16", 2, 4, 2, 512, 640, 128, False,
         lambda r: BlockMask(r.random((1, 1, 4, 5)) < 0.5, block_q=128, block_k=128, q_len=512,
                             k_len=640)),
        ("block empty mask", "bf16", 1, 2, 1, 256, 256, 128, False,
         lambda r: BlockMask(np.zeros((1, 2, 2, 2), bool), block_q=128, block_k=128, q_len=256,
                             k_len=256)),
    ]


def stage_fwd(args) -> None:
    cp, ml_dtypes, _build, ga = _setup()
    from refattn.core.registry import dispatch
    from refattn.reference.attention import attention_forward

    fwd = dispatch("attention_fwd", "cupy")
    calls = {"n": 0}
    real = ga._fwd_wgmma

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    ga._fwd_wgmma = counting
    tol = {"bf16": 1e-2, "fp16": 2e-3}
    for ci, (name, kind, B, Hq, Hkv, Sq, Sk, D, causal, mk) in enumerate(_fwd_cases()):
        rng = np.random.default_rng(100 + ci)
        q, k, v = (rng.standard_normal(s).astype(np.float32)
                   for s in ((B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D)))
        q, k, v = (_to16(x, kind, ml_dtypes)[0] for x in (q, k, v))
        mask = mk(rng) if mk else None
        scale = 1 / math.sqrt(D)
        ref_o, ref_l = attention_forward(q, k, v, mask, causal, scale)
        empty = ~np.isfinite(ref_l)
        dq, dk, dv = (cp.asarray(x) for x in (q, k, v))

        def run(env, call=(fwd, dq, dk, dv, mask, causal, scale)):
            f, a, b_, c, m_, cz, sc = call
            os.environ["REFATTN_WGMMA"] = env
            o = cp.full(a.shape[:3] + (c.shape[-1],), cp.nan, cp.float32)
            l_ = cp.full(a.shape[:3], cp.nan, cp.float32)
            f(a, b_, c, m_, cz, sc, out=(o, l_))
            return o.get(), l_.get()

        try:
            o0, _ = run("0")
            base_err = np.abs(o0 - ref_o).max(initial=0.0)
        except Exception as e:
            base_err = float("nan")
            log(f"      mma.sync failed: {e}")
        for st, ov in VARIANTS:
            ga.WGMMA_CONFIG.update(stages=st, ovl=ov)
            what = f"{name} [{kind} st={st} ovl={int(ov)}]"
            try:
                n0 = calls["n"]
                t0 = time.time()
                o, l_ = run("1")
                took = time.time() - t0
                used = calls["n"] > n0 and not ga._WGMMA_BROKEN
                err = np.abs(o - ref_o).max(initial=0.0)
                rel = np.linalg.norm(o - ref_o) / max(np.linalg.norm(ref_o), 1e-30)
                fin = ~empty
                lerr = np.abs(l_[fin] - ref_l[fin]).max(initial=0.0)
                nan = bool(np.isnan(o).any() or np.isnan(l_).any())
                emp_ok = bool(np.array_equal(~np.isfinite(l_), empty) and (o[empty] == 0).all())
                ok = (used and not nan and emp_ok and rel <= tol[kind] and lerr <= 2e-3
                      and err <= 2 * base_err + 2e-2)
                result("fwd", what, ok,
                       f"max err {err:.3g} (mma.sync {base_err:.3g}) rel {rel:.2g} lse {lerr:.2g}"
                       + ("" if used else " NOT-ON-WGMMA-PATH " + "; ".join(ga._WGMMA_BROKEN))
                       + (" NaN" if nan else "") + ("" if emp_ok else " EMPTY-ROWS-WRONG")
                       + (" SLOW(>1.5s: barrier timeout?)" if took > 1.5 else ""))
                if not ok and not nan and used:
                    _where(o, ref_o, Sq)
            except Exception as e:
                result("fwd", what, False, f"{type(e).__name__}: {str(e)[:500]}")
            if ga._WGMMA_BROKEN:
                log("      (path marked broken; stopping this stage)")
                return
    ga.WGMMA_CONFIG.update(stages=2, ovl=True)


def _where(o, ref, Sq) -> None:
    """Which rows (consumer warpgroup / warp / row in warp) and columns are wrong."""
    bad = np.abs(o - ref) > 0.05 * max(1.0, np.abs(ref).max())
    rows = np.nonzero(bad.any(axis=(0, 1, 3)))[0]
    if rows.size == 0:
        log("      (no element off by > 5%: a small systematic error)")
        return
    r = rows % 128
    log(f"      {bad.sum()} bad elements; bad rows (first 12) {rows[:12]}; by consumer wg "
        f"{np.bincount(r // 64, minlength=2)}, by warp {np.bincount((r // 16) % 4, minlength=4)}, "
        f"by row-in-16 {np.bincount(r % 16, minlength=16)}")
    cols = np.nonzero(bad.any(axis=(0, 1, 2)))[0]
    log(f"      bad columns (d) {cols[:32]} (of {bad.shape[-1]}); by query tile "
        f"{np.bincount(rows // 128)}")


def stage_bench(args) -> None:
    cp, ml_dtypes, _build, ga = _setup()
    import bench_gpu as bg

    from refattn.core.registry import dispatch

    torch = None if args.no_torch else bg.torch
    bg.torch = torch
    fwd = dispatch("attention_fwd", "cupy")
    H, D, B = 32, 128, 1
    rng = np.random.default_rng(0)
    flex = None
    if torch is not None:
        try:
            from torch.nn.attention.flex_attention import BlockMask as FlexBM
            from torch.nn.attention.flex_attention import flex_attention
            flex = (torch.compile(flex_attention), FlexBM)
        except Exception as e:
            log(f"FlexAttention unavailable: {e}")
    for S in args.seq:
        log(f"\n== S = {S}, H = {H}, D = {D}, bf16, causal, block 128 ==")
        qf = cp.random.standard_normal((3, B, H, S, D), dtype=cp.float32)
        bits = qf.view(cp.uint32)
        bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
        del qf, bits
        try:
            bf = bf.view(ml_dtypes.bfloat16)
        except Exception:
            bf = cp.asarray(bf.get().view(ml_dtypes.bfloat16))
        q, k, v = bf[0], bf[1], bf[2]
        dense_flops = 4.0 * B * H * D * (S * (S + 1) // 2)
        if torch is not None:
            tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
            from torch.nn.attention import SDPBackend, sdpa_kernel
            try:
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    ms = bg.timeit(torch.nn.functional.scaled_dot_product_attention, args.iters,
                                   tq, tk, tv, is_causal=True)
                result("bench", f"S={S} SDPA cuDNN dense causal", None,
                       f"{ms:8.3f} ms {dense_flops / ms / 1e9:6.1f} TFLOP/s")
            except Exception as e:
                log(f"  cuDNN failed: {e}")
        for dens in list(args.density) + ["none"]:
            if dens == "none":
                mask, flops, label = None, dense_flops, "mask=None"
            else:
                mask = bg.causalish_mask(rng, H, S, 128, dens)
                flops = 4.0 * D * bg.visible_pairs_blockmask(mask, True)
                label = f"density {mask.density(causal=True):.3f}"
            os.environ["REFATTN_WGMMA"] = "0"
            ref_o = fwd(q, k, v, mask, True, None)[0]
            ms = bg.timeit(fwd, args.iters, q, k, v, mask, True, None)
            result("bench", f"S={S} {label} mma.sync", None,
                   f"{ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s")
            for st, ov in VARIANTS:
                ga.WGMMA_CONFIG.update(stages=st, ovl=ov)
                os.environ["REFATTN_WGMMA"] = "1"
                try:
                    o = fwd(q, k, v, mask, True, None)[0]
                    diff = float(cp.abs(o - ref_o).max())
                    ms = bg.timeit(fwd, args.iters, q, k, v, mask, True, None)
                    ok = diff < 2e-2 and not ga._WGMMA_BROKEN
                    result("bench", f"S={S} {label} wgmma st={st} ovl={int(ov)}", ok,
                           f"{ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s  max|diff| {diff:.3g}")
                    del o
                except Exception as e:
                    result("bench", f"S={S} {label} wgmma st={st} ovl={int(ov)}", False,
                           f"{type(e).__name__}: {str(e)[:300]}")
            os.environ["REFATTN_WGMMA"] = "0"
            ga.WGMMA_CONFIG.update(stages=2, ovl=True)
            del ref_o
            if flex is not None and mask is not None:
                try:
                    fl, FlexBM = flex
                    fx = mask.to_flex(causal=True)

                    def t32(a):
                        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int32, device="cuda")

                    def causal_mod(b, h, qi, ki):
                        return qi >= ki

                    bm = FlexBM.from_kv_blocks(t32(fx["kv_num_blocks"]), t32(fx["kv_indices"]),
                                               t32(fx["full_kv_num_blocks"]), t32(fx["full_kv_indices"]),
                                               BLOCK_SIZE=128, mask_mod=causal_mod)
                    fl(tq, tk, tv, block_mask=bm)
                    ms = bg.timeit(fl, args.iters, tq, tk, tv, block_mask=bm)
                    result("bench", f"S={S} {label} FlexAttention", None,
                           f"{ms:8.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s")
                except Exception as e:
                    log(f"  FlexAttention failed: {type(e).__name__}: {e}")
        del q, k, v, bf
        ga._CACHE.clear()
        ga._TMAPS.clear()
        cp.get_default_memory_pool().free_all_blocks()


# ----------------------------------------------------------------------------- backward
def _bwd_cases():
    """(name, dtype, B, Hq, Hkv, Sq, Sk, causal, mask builder or None); D = 128."""
    from refattn.core.blockmask import BlockMask, num_blocks

    def rmask(rng, B, H, Sq, Sk, bq, bk, dens, empty_rows=True):
        qb, kb = num_blocks(Sq, bq), num_blocks(Sk, bk)
        m = rng.random((B, H, qb, kb)) < dens
        if empty_rows and qb > 1:
            m[:, :, rng.integers(qb)] = False
        return BlockMask(m, block_q=bq, block_k=bk, q_len=Sq, k_len=Sk)

    return [
        ("dense 256x256 exact tiles", "bf16", 1, 2, 2, 256, 256, False, None),
        ("dense causal 256x256", "bf16", 1, 2, 2, 256, 256, True, None),
        ("dense GQA partial 203x333", "bf16", 2, 4, 2, 203, 333, False, None),
        ("dense causal GQA partial 203x333", "bf16", 2, 4, 2, 203, 333, True, None),
        ("dense causal fp16 203x333", "fp16", 2, 4, 2, 203, 333, True, None),
        ("causal Sq>Sk 300x130 (empty rows)", "bf16", 1, 2, 1, 300, 130, True, None),
        ("causal Sq<Sk 130x300", "bf16", 1, 2, 1, 130, 300, True, None),
        ("long dense causal 1000x1000 GQA 4:1", "bf16", 1, 4, 1, 1000, 1000, True, None),
        ("block 128x128 700x900", "bf16", 2, 4, 2, 700, 900, False,
         lambda r: rmask(r, 2, 4, 700, 900, 128, 128, 0.3)),
        ("block 128x128 causal 700x900", "bf16", 2, 4, 2, 700, 900, True,
         lambda r: rmask(r, 2, 4, 700, 900, 128, 128, 0.3)),
        ("block 64x128 causal 700x900 (block_q 64)", "bf16", 2, 4, 2, 700, 900, True,
         lambda r: rmask(r, 2, 4, 700, 900, 64, 128, 0.3)),
        ("block 128x256 causal 700x900 (block_k 256)", "fp16", 2, 4, 2, 700, 900, True,
         lambda r: rmask(r, 2, 4, 700, 900, 128, 256, 0.4)),
        ("block 256x128 fp16 700x900", "fp16", 2, 4, 2, 700, 900, False,
         lambda r: rmask(r, 2, 4, 700, 900, 256, 128, 0.4)),
        ("block kv-head mask causal 512x640", "bf16", 2, 4, 2, 512, 640, True,
         lambda r: BlockMask(r.random((2, 2, 4, 5)) < 0.5, block_q=128, block_k=128, q_len=512,
                             k_len=640, head_kind="kv")),
        ("block broadcast mask 512x640", "bf16", 2, 4, 2, 512, 640, False,
         lambda r: BlockMask(r.random((1, 1, 4, 5)) < 0.5, block_q=128, block_k=128, q_len=512,
                             k_len=640)),
        ("block empty mask", "bf16", 1, 2, 1, 256, 256, False,
         lambda r: BlockMask(np.zeros((1, 2, 2, 2), bool), block_q=128, block_k=128, q_len=256,
                             k_len=256)),
    ]


def _bwd_where(name, got, ref) -> None:
    """Localise the wrong elements of dq [B,H,Sq,D] or dk / dv [B,Hkv,Sk,D]."""
    scale = max(np.abs(ref).max(initial=0.0), 1e-30)
    bad = np.abs(got - ref) > 0.05 * scale
    if not bad.any():
        log(f"      {name}: no element off by > 5% of max|ref| (a small systematic error)")
        return
    rows = np.nonzero(bad.any(axis=(0, 1, 3)))[0]
    cols = np.nonzero(bad.any(axis=(0, 1, 2)))[0]
    if name == "dq":
        r = rows % 64
        log(f"      dq: {bad.sum()} bad; rows (first 12) {rows[:12]}; by warp-of-64 "
            f"{np.bincount(r // 16, minlength=4)}, by row-in-16 {np.bincount(r % 16, minlength=16)}; "
            f"by d half (consumer wg) {np.bincount(cols // 64, minlength=2)}; cols {cols[:16]}")
    else:
        r = rows % 128
        log(f"      {name}: {bad.sum()} bad; keys (first 12) {rows[:12]}; by consumer wg "
            f"{np.bincount(r // 64, minlength=2)}, by warp {np.bincount((r // 16) % 4, minlength=4)}, "
            f"by key-in-16 {np.bincount(r % 16, minlength=16)}; by key tile {np.bincount(rows // 128)}; "
            f"cols {cols[:16]}")
    bh = np.nonzero(bad.any(axis=(2, 3)))
    log(f"      {name}: bad (b, h) pairs {list(zip(bh[0].tolist(), bh[1].tolist(), strict=True))[:8]}")
    i = tuple(np.argwhere(bad)[0])
    log(f"      {name}{list(i)} got {got[i]:.5g} want {ref[i]:.5g}")


def stage_bwd(args) -> None:
    cp, ml_dtypes, _build, ga = _setup()
    from refattn.core.registry import dispatch
    from refattn.reference.attention import attention_backward, attention_forward

    log(f"options for attn_bwd_wgmma.cu: {_build.compile_options('attn_bwd_wgmma.cu')}")
    # ---- build
    try:
        fn = _build.get_kernel("attn_bwd_wgmma.cu", "wgmma_bwd_feature_probe")
        out = cp.zeros(2, cp.int32)
        fn((1,), (32,), (out,))
        o = out.get()
        result("bwd", "sm_90a feature macro (attn_bwd_wgmma.cu)", bool(o[0] == 1),
               f"REFATTN_SM90A={o[0]} __CUDA_ARCH__={o[1]}")
    except Exception as e:
        result("bwd", "build wgmma_bwd_feature_probe", False, f"{type(e).__name__}: {str(e)[:2000]}")
        return
    for T, st in (("__nv_bfloat16", 2), ("__half", 2), ("__nv_bfloat16", 3)):
        t0 = time.time()
        try:
            fn, nm = ga.wgmma_bwd_kernel(T, 128, st)
            result("bwd", f"build {nm}", fn.local_size_bytes == 0,
                   f"regs {fn.num_regs} local {fn.local_size_bytes} B static smem "
                   f"{fn.shared_size_bytes} dyn smem {ga.wgmma_bwd_smem(128, st)} ({time.time() - t0:.1f} s)")
        except Exception as e:
            result("bwd", f"build {T} st={st}", False, f"{type(e).__name__}: {str(e)[:2000]}")
            return
    # ---- unit probe of the dQ product: C = A B, A given as At [K][64], B [K][64], both MN-major
    rng = np.random.default_rng(7)
    K = 128
    for kind in ("bf16", "fp16"):
        for pattern in ("random", "onehot"):
            if pattern == "random":
                At = rng.standard_normal((K, 64)).astype(np.float32)
                Bm = rng.standard_normal((K, 64)).astype(np.float32)
            else:  # A[i, k] = (k == i): C[i, n] = B[i, n]; B[k, n] = k + n / 256
                At = np.zeros((K, 64), np.float32)
                At[np.arange(64), np.arange(64)] = 1
                Bm = (np.arange(K)[:, None] + np.arange(64)[None, :] / 256.0).astype(np.float32)
            Ah, Ar = _to16(At, kind, ml_dtypes)
            Bh, Br = _to16(Bm, kind, ml_dtypes)
            ref = Ah.astype(np.float64).T @ Bh.astype(np.float64)
            what = f"TT (trans-a, trans-b) {kind} m64n64 K={K} {pattern}"
            try:
                fn = _build.get_kernel("attn_bwd_wgmma.cu", f"wgmma_probe_tt<{CT[kind]}, {K}>")
                C = cp.full((64, 64), cp.nan, cp.float32)
                _build.launch(fn, (1,), (128,), (cp.asarray(Ar), cp.asarray(Br), C), 2 * K * 128 + 1024)
                got = C.get()
                err = np.abs(got - ref).max()
                ok = bool(np.isfinite(got).all() and err <= 1e-3 * max(1.0, np.abs(ref).max()))
                result("bwd", what, ok, f"max err {err:.3g}")
                if not ok:
                    _explain(got, ref, "rs-" + pattern, "row i of C (query), column n (d)")
                    if pattern == "onehot":
                        for i, n in np.argwhere(~np.isclose(got, ref, rtol=1e-2, atol=1e-2))[:6]:
                            g = got[i, n]
                            if np.isfinite(g):
                                log(f"      C[{i},{n}] ~ B[{int(math.floor(g))}, "
                                    f"{round((g - math.floor(g)) * 256)}]")
            except Exception as e:
                result("bwd", what, False, f"{type(e).__name__}: {str(e)[:500]}")
    # ---- whole backward against the float64 reference
    bwd = dispatch("attention_bwd", "cupy")
    calls = {"n": 0}
    real = ga._bwd_wgmma

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    ga._bwd_wgmma = counting
    tol = {"bf16": 3e-2, "fp16": 5e-3}
    D = 128
    for ci, (name, kind, B, Hq, Hkv, Sq, Sk, causal, mk) in enumerate(_bwd_cases()):
        rng = np.random.default_rng(300 + ci)
        q, k, v = (rng.standard_normal(s_).astype(np.float32)
                   for s_ in ((B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D)))
        q, k, v = (_to16(x, kind, ml_dtypes)[0] for x in (q, k, v))
        mask = mk(rng) if mk else None
        scale = 1 / math.sqrt(D)
        o, lse = attention_forward(q, k, v, mask, causal, scale)
        do = _to16(rng.standard_normal(o.shape).astype(np.float32), kind, ml_dtypes)[0]
        refs = attention_backward(q, k, v, o, do, lse, mask, causal, scale)
        dargs = [cp.asarray(x) for x in (q, k, v, o.astype(np.float32), do, lse.astype(np.float32))]

        def run(env, dargs=dargs, mask=mask, causal=causal, scale=scale):
            os.environ["REFATTN_WGMMA_BWD"] = env
            outs = tuple(cp.full(x.shape, cp.nan, cp.float32) for x in dargs[:3])
            bwd(*dargs, mask, causal, scale, out=outs)
            return [x.get() for x in outs]

        def rels(got, refs=refs):
            out = []
            for g_, r_ in zip(got, refs, strict=True):
                nr = np.linalg.norm(r_)
                out.append(float(np.linalg.norm(g_ - r_) / nr) if nr > 0 else
                           (0.0 if np.abs(g_).max(initial=0.0) == 0 else float("inf")))
            return out

        try:
            base = rels(run("0"))
        except Exception as e:
            base = [float("nan")] * 3
            log(f"      mma.sync backward failed: {e}")
        for st in BWD_STAGES:
            ga.WGMMA_BWD_CONFIG["stages"] = st
            what = f"{name} [{kind} st={st}]"
            try:
                n0 = calls["n"]
                t0 = time.time()
                got = run("1")
                took = time.time() - t0
                used = calls["n"] > n0 and not ga._WGMMA_BWD_BROKEN
                nan = any(bool(np.isnan(g_).any()) for g_ in got)
                rr = rels(got)
                ok = used and not nan and all(
                    r_ <= tol[kind] and r_ <= 2 * b_ + 1e-3 for r_, b_ in zip(rr, base, strict=True))
                result("bwd", what, ok,
                       "rel " + " ".join(f"{nm} {r_:.2g} ({b_:.2g})" for nm, r_, b_ in
                                         zip(("dq", "dk", "dv"), rr, base, strict=True))
                       + ("" if used else " NOT-ON-WGMMA-PATH " + "; ".join(ga._WGMMA_BWD_BROKEN))
                       + (" NaN" if nan else "")
                       + (" SLOW(>1.5s: barrier timeout?)" if took > 1.5 else ""))
                if not ok and used:
                    for nm, g_, r_ in zip(("dq", "dk", "dv"), got, refs, strict=True):
                        _bwd_where(nm, np.nan_to_num(g_, nan=1e30), r_)
            except Exception as e:
                result("bwd", what, False, f"{type(e).__name__}: {str(e)[:500]}")
            if ga._WGMMA_BWD_BROKEN:
                log("      (path marked broken; stopping this stage)")
                return
    ga.WGMMA_BWD_CONFIG["stages"] = 2
    log("(rel = relative L2 error against float64; in parentheses the mma.sync backward's)")


def stage_bwdbench(args) -> None:
    cp, ml_dtypes, _build, ga = _setup()
    import bench_gpu as bg

    from refattn.core.registry import dispatch

    torch = None if args.no_torch else bg.torch
    bg.torch = torch
    fwd = dispatch("attention_fwd", "cupy")
    bwd = dispatch("attention_bwd", "cupy")
    H, D, B = 32, 128, 1
    rng = np.random.default_rng(0)
    it = max(3, args.iters)
    for S in args.seq:
        log(f"\n== backward: S = {S}, H = {H}, D = {D}, bf16, causal, block 128 ==")
        qf = cp.random.standard_normal((4, B, H, S, D), dtype=cp.float32)
        bits = qf.view(cp.uint32)
        bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
        del qf, bits
        try:
            bf = bf.view(ml_dtypes.bfloat16)
        except Exception:
            bf = cp.asarray(bf.get().view(ml_dtypes.bfloat16))
        q, k, v, do = bf[0], bf[1], bf[2], bf[3]
        dense_flops = 4.0 * B * H * D * (S * (S + 1) // 2)
        if torch is not None:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
            for nm, be in (("SDPA flash (FA2)", SDPBackend.FLASH_ATTENTION),
                           ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
                try:
                    tq2, tk2, tv2 = (x.detach().clone().requires_grad_(True) for x in (tq, tk, tv))
                    with sdpa_kernel([be]):
                        o_t = torch.nn.functional.scaled_dot_product_attention(tq2, tk2, tv2, is_causal=True)
                        go = torch.randn_like(o_t)
                        ms = bg.timeit(torch.autograd.grad, it, o_t, (tq2, tk2, tv2), go,
                                       retain_graph=True)
                    result("bwdbench", f"S={S} {nm} dense causal bwd", None,
                           f"{ms:8.3f} ms {2.5 * dense_flops / ms / 1e9:6.1f} TFLOP/s")
                    del tq2, tk2, tv2, o_t, go
                except Exception as e:
                    log(f"  {nm} bwd failed: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
        for dens in list(args.density) + ["none"]:
            if dens == "none":
                mask, flops, label = None, dense_flops, "mask=None"
            else:
                mask = bg.causalish_mask(rng, H, S, 128, dens)
                flops = 4.0 * D * bg.visible_pairs_blockmask(mask, True)
                label = f"density {mask.density(causal=True):.3f}"
            os.environ["REFATTN_WGMMA"] = "1"
            o, lse = fwd(q, k, v, mask, True, None)
            ms_f = bg.timeit(fwd, it, q, k, v, mask, True, None)
            result("bwdbench", f"S={S} {label} wgmma fwd (reference point)", None,
                   f"{ms_f:8.3f} ms {flops / ms_f / 1e9:6.1f} TFLOP/s")
            os.environ["REFATTN_WGMMA_BWD"] = "0"
            ref = bwd(q, k, v, o, do, lse, mask, True, None)
            ms = bg.timeit(bwd, it, q, k, v, o, do, lse, mask, True, None)
            result("bwdbench", f"S={S} {label} mma.sync bwd", None,
                   f"{ms:8.3f} ms {2.5 * flops / ms / 1e9:6.1f} TFLOP/s")
            for st in BWD_STAGES:
                ga.WGMMA_BWD_CONFIG["stages"] = st
                os.environ["REFATTN_WGMMA_BWD"] = "1"
                what = f"S={S} {label} wgmma bwd st={st}"
                try:
                    got = bwd(q, k, v, o, do, lse, mask, True, None)
                    diffs = [float(cp.abs(g_ - r_).max() / max(float(cp.abs(r_).max()), 1e-30))
                             for g_, r_ in zip(got, ref, strict=True)]
                    del got
                    ms = bg.timeit(bwd, it, q, k, v, o, do, lse, mask, True, None)
                    ok = max(diffs) < 2e-2 and not ga._WGMMA_BWD_BROKEN
                    result("bwdbench", what, ok,
                           f"{ms:8.3f} ms {2.5 * flops / ms / 1e9:6.1f} TFLOP/s  "
                           f"bwd/fwd {ms_f * 2.5 / ms:5.2f}  max|diff|/max|ref| dq {diffs[0]:.2g} "
                           f"dk {diffs[1]:.2g} dv {diffs[2]:.2g}")
                    # the kernel alone (no Delta, casts, dq zeroing)
                    qd, kd, vd = (ga._kernel_ready(ga._to_device(x, n)) for x, n in
                                  ((q, "q"), (k, "k"), (v, "v")))
                    dod = ga._cast(ga._to_device(do, "do"), qd.kind)
                    shape = ga._shape(qd, kd, vd)
                    m = ga._prepare(mask, shape)
                    lse32 = ga._f32(lse, "lse")
                    delta = cp.zeros_like(lse32)
                    dq = cp.zeros(q.shape, cp.float32)
                    dk = cp.empty(k.shape, cp.float32)
                    dv = cp.empty(v.shape, cp.float32)
                    ms_k = bg.timeit(ga._bwd_wgmma, it, qd, kd, vd, dod, shape, m, lse32, delta, dq,
                                     dk, dv, 1 / math.sqrt(D), np.int32(1))
                    result("bwdbench", what + " kernel only", None,
                           f"{ms_k:8.3f} ms {2.5 * flops / ms_k / 1e9:6.1f} TFLOP/s")
                    del dq, dk, dv, dod, delta
                except Exception as e:
                    result("bwdbench", what, False, f"{type(e).__name__}: {str(e)[:300]}")
            ga.WGMMA_BWD_CONFIG["stages"] = 2
            os.environ["REFATTN_WGMMA_BWD"] = "0"
            del ref, o, lse
            cp.get_default_memory_pool().free_all_blocks()
        del q, k, v, do, bf
        ga._CACHE.clear()
        ga._TMAPS.clear()
        cp.get_default_memory_pool().free_all_blocks()



# ----------------------------------------------------------------------------- MoBA (per-token routing)
def _moba_cases():
    """(name, dtype, B, Hq, Hkv, Sq, Sk, D, causal, block_k, topk)"""
    return [
        ("moba bk128 causal 1000x1000 GQA 2:1", "bf16", 1, 4, 2, 1000, 1000, 128, True, 128, 3),
        ("moba bk128 causal 1500x1500 (long segments)", "bf16", 1, 2, 1, 1500, 1500, 128, True, 128, 8),
        ("moba bk128 non-causal 700x900", "bf16", 2, 4, 2, 700, 900, 128, False, 128, 3),
        ("moba bk64 causal 700x900 fp16", "fp16", 2, 4, 2, 700, 900, 128, True, 64, 4),
        ("moba bk128 D=64 causal 700x900", "bf16", 2, 4, 2, 700, 900, 64, True, 128, 3),
        ("moba bk64 D=64 causal fp16 600x600", "fp16", 1, 4, 1, 600, 600, 64, True, 64, 4),
        ("moba causal Sq>Sk 300x130 (empty rows)", "bf16", 1, 2, 1, 300, 130, 128, True, 64, 2),
        ("moba bk128 causal partial 333x333", "fp16", 1, 2, 2, 333, 333, 128, True, 128, 2),
    ]


def _moba_ref_partials(q, k, v, mask, causal, scale, plan_rows, plan_kb, plan_bh, Hq, Hkv):
    """float64 per-pair partials: O / l over the pair's key block, log2-sum-exp."""
    bk = mask.block_k
    Sq, Sk = q.shape[2], k.shape[2]
    off = Sk - Sq
    G = Hq // Hkv
    n = plan_rows.size
    D = q.shape[-1]
    po = np.zeros((n, D))
    pl = np.full(n, -np.inf)
    qf, kf, vf = (x.astype(np.float64) for x in (q, k, v))
    for i in range(n):
        b, h = divmod(int(plan_bh[i]), Hq)
        r, kb = int(plan_rows[i]), int(plan_kb[i])
        keys = np.arange(kb * bk, min(Sk, kb * bk + bk))
        if causal:
            keys = keys[keys <= r + off]
        if keys.size == 0:
            continue
        s_ = kf[b, h // G, keys] @ qf[b, h, r] * scale
        mx = s_.max()
        p = np.exp(s_ - mx)
        po[i] = p @ vf[b, h // G, keys] / p.sum()
        pl[i] = (mx + np.log(p.sum())) / math.log(2)
    return po, pl


def stage_moba(args) -> None:
    cp, ml_dtypes, _build, ga = _setup()
    from refattn.core.registry import dispatch
    from refattn.reference.attention import attention_forward

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    try:
        from test_gpu_attention import EPS, LSE_ATOL, RELNORM, baseline, moba_mask
    except BaseException as e:  # pytest missing, or its module-level skip
        result("moba", "import tests/test_gpu_attention.py helpers", False, f"{type(e).__name__}: {e}")
        return

    log(f"options for attn_gather_wgmma.cu: {_build.compile_options('attn_gather_wgmma.cu')}")
    try:
        fn = _build.get_kernel("attn_gather_wgmma.cu", "moba_wgmma_feature_probe")
        out = cp.zeros(2, cp.int32)
        fn((1,), (32,), (out,))
        o_ = out.get()
        result("moba", "sm_90a feature macro (attn_gather_wgmma.cu)", bool(o_[0] == 1),
               f"REFATTN_SM90A={o_[0]} __CUDA_ARCH__={o_[1]}")
    except Exception as e:
        result("moba", "build moba_wgmma_feature_probe", False, f"{type(e).__name__}: {str(e)[:2000]}")
        return
    for T, PT, D, BN, st in (("__nv_bfloat16", "__nv_bfloat16", 128, 128, 2),
                             ("__nv_bfloat16", "float", 128, 128, 2),
                             ("__nv_bfloat16", "__nv_bfloat16", 128, 128, 3),
                             ("__half", "__half", 128, 64, 2)):
        t0 = time.time()
        try:
            fn, nm = ga.moba_wgmma_kernel(T, PT, D, BN, st)
            result("moba", f"build {nm}", fn.local_size_bytes == 0,
                   f"regs {fn.num_regs} local {fn.local_size_bytes} B static smem "
                   f"{fn.shared_size_bytes} dyn smem {ga.moba_wgmma_smem(D, BN, st)} "
                   f"({time.time() - t0:.1f} s)")
        except Exception as e:
            result("moba", f"build {T} {PT} D={D} BN={BN} st={st}", False,
                   f"{type(e).__name__}: {str(e)[:2000]}")
            return

    # ---- the gather kernel's partials alone, against float64 partials (small case)
    for kind, D, bk, causal in (("bf16", 128, 128, True), ("fp16", 64, 64, True),
                                ("bf16", 128, 64, False)):
        rng = np.random.default_rng(500 + D + bk)
        B, Hq, Hkv, Sq, Sk = 1, 2, 1, 400, 400
        q, k, v = (rng.standard_normal(s_).astype(np.float32)
                   for s_ in ((B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D)))
        q, k, v = (_to16(x, kind, ml_dtypes)[0] for x in (q, k, v))
        mask = moba_mask(rng, B, Hq, Sq, Sk, bk, 3, causal)
        scale = 1 / math.sqrt(D)
        for rows, st, pk in ((128, 2, "f32"), (256, 2, "t")):
            what = f"partials {kind} D={D} bk={bk} causal={int(causal)} rows={rows} st={st} {pk}"
            try:
                qd, kd, vd = (ga._kernel_ready(ga._to_device(x, n)) for x, n in
                              ((q, "q"), (k, "k"), (v, "v")))
                shape = ga._shape(qd, kd, vd)
                m = ga._prepare(mask, shape)
                po, pl, plan = ga._fwd_gather_wgmma(
                    qd, kd, vd, shape, m, None, None, np.float32(scale * ga.LOG2E),
                    np.int32(causal), rows=rows, stages=st, partial=pk, combine=False)
                cp.cuda.runtime.deviceSynchronize()
                nnz = plan["nnz"]
                # pair p (row-major order) -> (b, h, row, kb)
                flat = np.flatnonzero(np.broadcast_to(m.mask, (B, Hq, Sq, m.num_k_blocks)).ravel())
                Kb = m.num_k_blocks
                kbs, bhr = flat % Kb, flat // Kb
                rws, bhs = bhr % Sq, bhr // Sq
                ref_o, ref_l = _moba_ref_partials(q, k, v, m, causal, scale, rws, kbs, bhs, Hq, Hkv)
                got_o = po.get()[:nnz]
                if pk == "t":
                    got_o = (got_o.view(ml_dtypes.bfloat16) if kind == "bf16"
                             else got_o.view(np.float16)).astype(np.float64)
                got_l = pl.get()[:nnz].astype(np.float64)
                fin = np.isfinite(ref_l)
                emp_ok = bool(np.array_equal(np.isfinite(got_l), fin) and (got_o[~fin] == 0).all())
                oerr = np.abs(got_o - ref_o)
                err = float(oerr.max(initial=0.0))
                lerr = float(np.abs(got_l[fin] - ref_l[fin]).max(initial=0.0))
                tol_o = (2 ** -7 if kind == "bf16" else 2 ** -9) * max(1.0, np.abs(ref_o).max())
                ok = bool(emp_ok and err <= tol_o and lerr <= 5e-3 and not np.isnan(got_o).any())
                result("moba", what, ok, f"max err o {err:.3g} (tol {tol_o:.2g}) lse2 {lerr:.2g} "
                       f"pairs {nnz} chunks {plan['ntiles']}" + ("" if emp_ok else " EMPTY-WRONG"))
                if not ok:
                    # entry of each pair inside its chunk's 128-row tiles
                    g_pair = plan["g_pair"].get()
                    seg_off = plan["seg_off"].get()
                    tseg, tstart = plan["tile_seg"].get(), plan["tile_start"].get()
                    entry = np.empty(nnz, np.int64)
                    for ci in range(tseg.size):
                        a0 = seg_off[tseg[ci]] + tstart[ci]
                        n_ = min(rows, int(plan["seg_cnt"].get()[tseg[ci]]) - int(tstart[ci]))
                        entry[g_pair[a0:a0 + n_]] = np.arange(n_)
                    bad = (oerr > 0.05 * max(1.0, np.abs(ref_o).max())).any(axis=1) | (
                        np.abs(np.nan_to_num(got_l, nan=1e30) - ref_l) > 5e-3) & fin
                    e = entry[bad] % 128
                    cols = np.nonzero((oerr > 0.05 * max(1.0, np.abs(ref_o).max())).any(axis=0))[0]
                    log(f"      {bad.sum()} bad pairs of {nnz}; by consumer wg {np.bincount(e // 64, minlength=2)}, "
                        f"by warp {np.bincount((e // 16) % 4, minlength=4)}, by row-in-16 "
                        f"{np.bincount(e % 16, minlength=16)}; by tile-of-chunk "
                        f"{np.bincount(entry[bad] // 128)}; bad d cols {cols[:24]}")
                    own = (rws[bad] + Sk - Sq) // bk == kbs[bad]
                    log(f"      bad pairs on the own (diagonal) block {own.sum()}, others {(~own).sum()}; "
                        f"first bad: row {rws[bad][:4]} kb {kbs[bad][:4]} got lse2 {got_l[bad][:4]} "
                        f"want {ref_l[bad][:4]}")
            except Exception as e:
                result("moba", what, False, f"{type(e).__name__}: {str(e)[:500]}")
                traceback.print_exc()
            if ga._MOBA_WGMMA_BROKEN:
                return

    # ---- the whole forward against the float64 reference
    fwd = dispatch("attention_fwd", "cupy")
    calls = {"n": 0}
    real = ga._fwd_gather_wgmma

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    ga._fwd_gather_wgmma = counting
    saved = dict(ga.MOBA_WGMMA_CONFIG)
    for ci, (name, kind, B, Hq, Hkv, Sq, Sk, D, causal, bk, topk) in enumerate(_moba_cases()):
        rng = np.random.default_rng(600 + ci)
        q, k, v = (rng.standard_normal(s_).astype(np.float32)
                   for s_ in ((B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D)))
        q, k, v = (_to16(x, kind, ml_dtypes)[0] for x in (q, k, v))
        mask = moba_mask(rng, B, Hq, Sq, Sk, bk, topk, causal)
        scale = 1 / math.sqrt(D)
        ref_o, ref_l = attention_forward(q, k, v, mask, causal, scale)
        empty = ~np.isfinite(ref_l)
        base = baseline(q, k, v, mask, causal, scale, kind)
        bound = 2 * np.abs(base - ref_o).max(initial=0.0) + EPS[kind] * max(1.0, np.abs(ref_o).max(initial=0.0))
        dq, dk, dv = (cp.asarray(x) for x in (q, k, v))

        def run(env, dq=dq, dk=dk, dv=dv, mask=mask, causal=causal, scale=scale):
            os.environ["REFATTN_MOBA_WGMMA"] = env
            o = cp.full(dq.shape[:3] + (dv.shape[-1],), cp.nan, cp.float32)
            l_ = cp.full(dq.shape[:3], cp.nan, cp.float32)
            fwd(dq, dk, dv, mask, causal, scale, out=(o, l_))
            return o.get(), l_.get()

        try:
            o0, _ = run("0")
            base_err = np.abs(o0 - ref_o).max(initial=0.0)
        except Exception as e:
            base_err = float("nan")
            log(f"      mma.sync gather failed: {e}")
        # every variant on the bf16 D = 128 block_k = 128 cases, the default one elsewhere
        # (each (dtype, D, block_k, partial, depth) is one more NVRTC build)
        for rows, st, pk in (MOBA_VARIANTS if ci < 3 else MOBA_VARIANTS[:1]):
            ga.MOBA_WGMMA_CONFIG.update(rows=rows, stages=st, partial=pk)
            what = f"{name} [{kind} rows={rows} st={st} {pk}]"
            try:
                n0 = calls["n"]
                t0 = time.time()
                o, l_ = run("1")
                took = time.time() - t0
                used = calls["n"] > n0 and not ga._MOBA_WGMMA_BROKEN
                err = np.abs(o - ref_o).max(initial=0.0)
                rel = np.linalg.norm(o - ref_o) / max(np.linalg.norm(ref_o), 1e-30)
                fin = ~empty
                lerr = np.abs(l_[fin] - ref_l[fin]).max(initial=0.0)
                nan = bool(np.isnan(o).any() or np.isnan(l_).any())
                emp_ok = bool(np.array_equal(~np.isfinite(l_), empty) and (o[empty] == 0).all())
                ok = (used and not nan and emp_ok and rel <= RELNORM[kind] and lerr <= LSE_ATOL[kind]
                      and err <= bound)
                result("moba", what, ok,
                       f"max err {err:.3g} (bound {bound:.3g}, mma.sync {base_err:.3g}) rel {rel:.2g} "
                       f"lse {lerr:.2g}"
                       + ("" if used else " NOT-ON-WGMMA-PATH " + "; ".join(ga._MOBA_WGMMA_BROKEN))
                       + (" NaN" if nan else "") + ("" if emp_ok else " EMPTY-ROWS-WRONG")
                       + (" SLOW(>1.5s: barrier timeout?)" if took > 1.5 else ""))
                if not ok and used and not nan:
                    bad = np.abs(o - ref_o) > 0.05 * max(1.0, np.abs(ref_o).max())
                    rows_bad = np.nonzero(bad.any(axis=(0, 1, 3)))[0]
                    log(f"      {bad.sum()} bad elements, rows (first 12) {rows_bad[:12]}, "
                        f"d cols {np.nonzero(bad.any(axis=(0, 1, 2)))[0][:16]}")
            except Exception as e:
                result("moba", what, False, f"{type(e).__name__}: {str(e)[:500]}")
            if ga._MOBA_WGMMA_BROKEN:
                log("      (path marked broken; stopping this stage)")
                ga.MOBA_WGMMA_CONFIG.update(saved)
                return
    ga.MOBA_WGMMA_CONFIG.update(saved)
    os.environ["REFATTN_MOBA_WGMMA"] = "0"
    log("(max err against float64; bound = check_fwd's rule: 2 x the emulated bf16/fp16 baseline's "
        "error + eps; mma.sync = the current gather kernels' error)")


def stage_mobabench(args) -> None:
    cp, ml_dtypes, _build, ga = _setup()
    import bench_gpu as bg

    from refattn.core.blockmask import BlockMask
    from refattn.core.registry import dispatch

    bg.torch = None  # no torch work in this stage: plain CUDA-event timing
    fwd = dispatch("attention_fwd", "cupy")
    H, D, B = 32, 128, 1
    rng = np.random.default_rng(0)
    it = max(3, args.iters)
    saved = dict(ga.MOBA_WGMMA_CONFIG)
    for S in args.seq:
        log(f"\n== MoBA forward: S = {S}, H = {H}, D = {D}, bf16, causal, top-8 of 128-key blocks ==")
        qf = cp.random.standard_normal((3, B, H, S, D), dtype=cp.float32)
        bits = qf.view(cp.uint32)
        bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
        del qf, bits
        try:
            bf = bf.view(ml_dtypes.bfloat16)
        except Exception:
            bf = cp.asarray(bf.get().view(ml_dtypes.bfloat16))
        q, k, v = bf[0], bf[1], bf[2]
        t0 = time.time()
        mm, pairs = bg.moba_mask_device(H, S, 128, 8)
        mmask = BlockMask(mm, block_q=1, block_k=128, q_len=S, k_len=S)
        del mm
        dens = pairs / (H * S * (S + 1) / 2)
        flops = 4.0 * D * pairs
        log(f"  (mask built in {time.time() - t0:.1f} s; density of visible pairs {dens:.4f})")
        # yardstick: the default block-mask forward at the same density
        bmask = bg.causalish_mask(rng, H, S, 128, dens)
        bflops = 4.0 * D * bg.visible_pairs_blockmask(bmask, True)
        os.environ.pop("REFATTN_MOBA_WGMMA", None)
        fwd(q, k, v, bmask, True, None)
        ms_b = bg.timeit(fwd, it, q, k, v, bmask, True, None)
        block_rate = bflops / ms_b / 1e9
        result("mobabench", f"S={S} block mask same density {bmask.density(causal=True):.4f} (yardstick)",
               None, f"{ms_b:8.3f} ms {block_rate:6.1f} TFLOP/s")
        del bmask
        os.environ["REFATTN_MOBA_WGMMA"] = "0"
        t0 = time.time()
        ref_o = fwd(q, k, v, mmask, True, None)[0]
        cp.cuda.runtime.deviceSynchronize()
        log(f"  (mma.sync gather first call incl. plan: {time.time() - t0:.1f} s)")
        ms0 = bg.timeit(fwd, it, q, k, v, mmask, True, None)
        r0 = flops / ms0 / 1e9
        result("mobabench", f"S={S} mma.sync gather (current default)", None,
               f"{ms0:8.3f} ms {r0:6.1f} TFLOP/s  {r0 / block_rate:5.2f} of block rate")
        qd, kd, vd = (ga._kernel_ready(ga._to_device(x, n)) for x, n in ((q, "q"), (k, "k"), (v, "v")))
        shape = ga._shape(qd, kd, vd)
        m = ga._prepare(mmask, shape)
        sl2 = np.float32(ga.LOG2E / math.sqrt(D))
        for rows, st, pk in MOBA_VARIANTS:
            ga.MOBA_WGMMA_CONFIG.update(rows=rows, stages=st, partial=pk)
            os.environ["REFATTN_MOBA_WGMMA"] = "1"
            what = f"S={S} wgmma gather rows={rows} st={st} {pk}"
            try:
                o = fwd(q, k, v, mmask, True, None)[0]
                diff = float(cp.abs(o - ref_o).max())
                del o
                ms = bg.timeit(fwd, it, q, k, v, mmask, True, None)
                rate = flops / ms / 1e9
                ok = diff < 2e-2 and not ga._MOBA_WGMMA_BROKEN
                o2 = cp.empty((B, H, S, D), cp.float32)
                l2 = cp.empty((B, H, S), cp.float32)
                ms_g = bg.timeit(ga._fwd_gather_wgmma, it, qd, kd, vd, shape, m, o2, l2, sl2,
                                 np.int32(1), combine=False)
                del o2, l2
                result("mobabench", what, ok,
                       f"{ms:8.3f} ms {rate:6.1f} TFLOP/s  {rate / block_rate:5.2f} of block rate  "
                       f"x{ms0 / ms:4.2f} vs mma.sync  gather kernel {ms_g:.3f} ms, combine+rest "
                       f"{ms - ms_g:.3f} ms  max|diff| {diff:.3g}")
            except Exception as e:
                result("mobabench", what, False, f"{type(e).__name__}: {str(e)[:300]}")
            if ga._MOBA_WGMMA_BROKEN:
                break
            cp.get_default_memory_pool().free_all_blocks()
        ga.MOBA_WGMMA_CONFIG.update(saved)
        os.environ["REFATTN_MOBA_WGMMA"] = "0"
        del q, k, v, bf, ref_o, mmask, m, qd, kd, vd
        ga._CACHE.clear()
        ga._TMAPS.clear()
        cp.get_default_memory_pool().free_all_blocks()

# ----------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", choices=["all"] + list(STAGES), default="all")
    ap.add_argument("--skip", nargs="*", default=[], help="stages to leave out (with --stage all)")
    ap.add_argument("--only", default="", help="comma-separated stages to run (with --stage all), "
                    "e.g. --only bwd,bwdbench")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--density", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    if args.stage != "all":
        t0 = time.time()
        try:
            globals()[f"stage_{args.stage}"](args)
        except Exception as e:
            result(args.stage, "stage crashed", False, f"{type(e).__name__}: {e}")
            traceback.print_exc()
        log(f"(stage {args.stage}: {time.time() - t0:.1f} s)")
        return
    env = dict(os.environ)
    env.setdefault("CUPY_CACHE_DIR", os.path.join(tempfile.gettempdir(), "refattn-probe-cupy-cache"))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    summary: list[str] = []
    t_all = time.time()
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    for x in only:
        if x not in STAGES:
            ap.error(f"--only: unknown stage {x!r} (stages: {', '.join(STAGES)})")
    for st, limit in STAGES.items():
        if st in args.skip or (only and st not in only):
            continue
        log(f"\n######## stage {st} (timeout {limit} s)")
        cmd = [sys.executable, os.path.abspath(__file__), "--stage", st, "--iters", str(args.iters),
               "--seq", *map(str, args.seq), "--density", *map(str, args.density)]
        if args.no_torch:
            cmd.append("--no-torch")
        try:
            p = subprocess.run(cmd, env=env, timeout=limit, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
            out = p.stdout
            status = f"exit {p.returncode}"
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            status = f"TIMEOUT after {limit} s (a hang: deadlocked pipeline?)"
        log(out.rstrip())
        log(f"######## stage {st}: {status}")
        summary += [ln for ln in out.splitlines() if ln.startswith("RESULT")]
        summary.append(f"RESULT {st:<7s} ---- stage {status}")
    log(f"\n================ summary ({time.time() - t_all:.0f} s)")
    for ln in summary:
        log(ln)


if __name__ == "__main__":
    main()
