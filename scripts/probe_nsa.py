#!/usr/bin/env python3
"""Probe of the NSA scoring kernels v1 (`nsa_tc`) and v2 (`nsa_tc2`), see docs/gpu_notes.md
("NSA scoring").

1. Correctness (bf16): every NSA case of tests/test_gpu_scoring_compressed.py plus a
   4096-row GQA case: v2 and v1 against the float64 reference (max|err| / max|ref| of p_slc
   and p_cmp, bound 5e-4) and v2 against v1; at S = 32768 v2 against v1 on the timed inputs.
2. Timing (B = 1, H = 32, MHA, D = 128, bf16, causal, l/d/l' = 32/16/64): v1 and v2 at
   S = 32768 (p_slc with hi+lo keys, p_slc with bf16 keys, p_slc + p_cmp) and S = 131072
   (p_slc only), SDPA cuDNN dense causal when PyTorch is present.

Prints ``RESULT key=value ...`` lines, one per measurement, and a summary last.
Usage: PYTHONPATH=. python3 scripts/probe_nsa.py [--seq 32768 131072] [--json FILE]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

RES: list[dict] = []
T0 = time.time()


def log(msg: str) -> None:
    print(msg, flush=True)


def result(**kw) -> None:
    RES.append(kw)
    log("RESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in kw.items()))


@contextlib.contextmanager
def switch(mod, **kw):
    old = {k: getattr(mod, k) for k in kw}
    for k, v in kw.items():
        setattr(mod, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(mod, k, v)


CASES = [  # label, (B, Hq, Hkv, Sq, Sk, D), (l, d, l'), causal, kind (the test module's NSA_CASES)
    ("default_gqa_d128", (1, 4, 2, 700, 700, 128), (32, 16, 64), True, "structured"),
    ("default_d64_partial", (1, 2, 1, 517, 517, 64), (32, 16, 64), True, "structured"),
    ("sq_lt_sk", (1, 2, 1, 70, 1100, 64), (32, 16, 64), True, "structured"),
    ("sq_gt_sk_empty_rows", (1, 2, 1, 300, 200, 64), (32, 16, 64), True, "random"),
    ("non_causal", (2, 2, 2, 200, 333, 64), (32, 16, 64), False, "random"),
    ("no_window", (1, 2, 1, 20, 20, 64), (32, 16, 64), True, "random"),
    ("multi_tile_rows", (1, 2, 2, 1200, 1500, 128), (32, 16, 64), True, "structured"),
    ("gqa_4096", (1, 4, 2, 4096, 4096, 128), (32, 16, 64), True, "structured"),
    ("geo_64_32_128", (1, 2, 1, 1300, 1333, 64), (64, 32, 128), True, "random"),
]


def inputs(B, Hq, Hkv, Sq, Sk, D, seed, kind):
    import ml_dtypes

    from refattn.data.synthetic import synthetic
    if kind == "random":
        rng = np.random.default_rng(seed)
        q, k = rng.standard_normal((B, Hq, Sq, D)), rng.standard_normal((B, Hkv, Sk, D))
    else:
        q, k, _ = synthetic(B, Hq, Hkv, max(Sq, Sk), D, q_len=Sq, seed=seed)
        k = np.ascontiguousarray(k[:, :, :Sk])
    return q.astype(ml_dtypes.bfloat16), k.astype(ml_dtypes.bfloat16)


def correctness(sc) -> bool:
    from refattn.core import registry
    from refattn.methods import nsa  # noqa: F401
    ok_all = True
    op = registry.ops()["nsa_score"]
    fn = registry.dispatch("nsa_score", "cupy")
    for label, shape, geo, causal, kind in CASES:
        try:
            q, k = inputs(*shape, seed=len(label), kind=kind)
            ref = [np.asarray(r, np.float64) for r in op.reference(q, k, *geo, causal)]
            outs = {}
            for ver in ("v1", "v2"):
                with switch(sc, NSA_KERNEL=ver):
                    used = sc.nsa_kernel_used("bfloat16", shape[5], *geo)
                    outs[ver] = [np.asarray(x, np.float64) for x in fn(q, k, *geo, causal)]
            row = {"case": label, "kernel_v2": used}
            ok = True
            for i, name in enumerate(("p_slc", "p_cmp")):
                r = ref[i]
                sc_ = max(float(np.abs(r).max()) if r.size else 0.0, 1e-30)
                for ver in ("v1", "v2"):
                    e = float(np.abs(outs[ver][i] - r).max(initial=0.0)) / sc_
                    row[f"{name}_{ver}_vs_ref"] = e
                    ok &= e <= 5e-4
                d = float(np.abs(outs["v2"][i] - outs["v1"][i]).max(initial=0.0)) / sc_
                row[f"{name}_v2_vs_v1"] = d
                ok &= d <= 2e-5
            row["ok"] = ok
            result(kind="correct", **row)
            ok_all &= ok
        except Exception as e:
            ok_all = False
            result(kind="correct", case=label, ok=False, error=f"{type(e).__name__}:{e}"[:200])
            traceback.print_exc()
    return ok_all


def timeit(fn, iters, warmup):
    import cupy as cp
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    ts = []
    for _ in range(iters):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(ts)


def bf16_normal(shape):
    import cupy as cp
    import ml_dtypes
    bits = cp.random.standard_normal(shape, dtype=cp.float32).view(cp.uint32)
    bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
    try:
        return bf.view(ml_dtypes.bfloat16)
    except Exception:
        return cp.asarray(bf.get().view(ml_dtypes.bfloat16))


def timing(sc, S, H, D, summary):
    import cupy as cp

    from refattn.core.registry import dispatch
    pool = cp.get_default_memory_pool()
    q, k = bf16_normal((1, H, S, D)), bf16_normal((1, H, S, D))
    nc, kb = (S - 32) // 16 + 1, -(-S // 64)
    big = S > 65536
    it, wu = (2, 1) if big else (5, 2)
    dense = None
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        tq, tk = torch.from_dlpack(q), torch.from_dlpack(k)
        tv = torch.randn_like(tk)

        def cudnn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
            torch.cuda.synchronize()
        dense = timeit(cudnn, 3, 1)
        result(kind="time", S=S, what="sdpa_cudnn", ms=dense,
               tflops=2.0 * S * S * D * H / dense / 1e9)
        tq = tk = tv = None  # noqa: F841  (free before the NSA runs)
        torch.cuda.empty_cache()
    except Exception as e:
        log(f"  SDPA cuDNN unavailable: {type(e).__name__}: {e}")
    summary[f"cudnn_{S}"] = dense
    op = dispatch("nsa_score", "cupy")
    runs = [("p_slc_hilo", True, False)]
    if not big:
        runs += [("p_slc_bf16keys", False, False), ("p_slc_p_cmp_hilo", True, True)]
    else:
        runs += [("p_slc_bf16keys", False, False)]
    ref_slc = {}
    for what, split, cmp_ in runs:
        for ver in ("v1", "v2"):
            if big and ver == "v1" and what != "p_slc_hilo":
                continue
            with switch(sc, NSA_KERNEL=ver, NSA_SPLIT=split):
                fn = ((lambda: op(q, k, 32, 16, 64, True)) if cmp_
                      else (lambda: sc.nsa_block_scores(q, k, 32, 16, 64, True)))
                try:
                    ms = timeit(fn, it, wu)
                except Exception as e:
                    result(kind="time", S=S, what=what, ver=ver, error=f"{type(e).__name__}:{e}"[:200])
                    traceback.print_exc()
                    pool.free_all_blocks()
                    continue
                fl = 2 * (2 if split else 1) * (S * nc / 2) * D * 2 * H
                share = ms / dense if dense else float("nan")
                result(kind="time", S=S, what=what, ver=ver, ms=ms,
                       tflops_2pass=fl / ms / 1e9, share_cudnn=share,
                       slc_GBps=4.0 * H * S * kb / ms / 1e6)
                summary[f"{what}_{ver}_{S}"] = ms
                if what == "p_slc_hilo":       # v2 against v1 on the timed inputs
                    out = fn()
                    if ver == "v1":
                        ref_slc["v1"] = out
                    else:
                        try:
                            a = ref_slc.get("v1")
                            if a is not None:
                                num = den = 0.0           # per head: bounded temporaries
                                for h in range(H):
                                    num = max(num, float(cp.abs(out[0, h] - a[0, h]).max()))
                                    den = max(den, float(cp.abs(a[0, h]).max()))
                                d = num / max(den, 1e-30)
                                result(kind="correct_big", S=S, p_slc_v2_vs_v1=d, ok=d <= 2e-5)
                                summary[f"big_ok_{S}"] = d <= 2e-5
                        except Exception as e:
                            log(f"  big comparison failed: {e}")
                    del out
                pool.free_all_blocks()
        ref_slc.clear()
        pool.free_all_blocks()
    q = k = None  # noqa: F841
    pool.free_all_blocks()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-correct", action="store_true")
    args = ap.parse_args()
    from refattn.core.registry import load_backend
    why = load_backend("cupy")
    if why is not None:
        log(f"RESULT kind=fatal error=cupy_unavailable:{why}")
        return 1
    import cupy as cp
    from refattn.gpu import scoring_compressed as sc
    p = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    log(f"device {p['name']}, {p['multiProcessorCount']} SMs, cupy {cp.__version__}, "
        f"NSA_KERNEL default {sc.NSA_KERNEL}")
    summary: dict = {}
    if not args.skip_correct:
        summary["correct_all"] = correctness(sc)
        log(f"  correctness done at {time.time() - T0:.0f} s")
    for S in args.seq:
        try:
            timing(sc, S, args.heads, args.dim, summary)
        except Exception as e:
            result(kind="time", S=S, error=f"{type(e).__name__}:{e}"[:200])
            traceback.print_exc()
        log(f"  S={S} done at {time.time() - T0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": RES, "summary": summary}, f, indent=1, default=str)
    parts = [f"correct_all={summary.get('correct_all')}"]
    for S in args.seq:
        d = summary.get(f"cudnn_{S}")
        for key in ("p_slc_hilo", "p_slc_bf16keys", "p_slc_p_cmp_hilo"):
            a, b = summary.get(f"{key}_v1_{S}"), summary.get(f"{key}_v2_{S}")
            if b is None:
                continue
            sp = f"{a / b:.2f}x" if a else "n/a"
            sh = f"{100 * b / d:.1f}%" if d else "n/a"
            parts.append(f"S{S}:{key}:v1={a if a is None else round(a, 3)}ms,"
                         f"v2={b:.3f}ms,speedup={sp},v2_share_cudnn={sh}")
        if f"big_ok_{S}" in summary:
            parts.append(f"S{S}:v2_matches_v1={summary[f'big_ok_{S}']}")
    parts.append(f"wall={time.time() - T0:.0f}s")
    log("SUMMARY " + " ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
