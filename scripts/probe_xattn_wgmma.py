#!/usr/bin/env python3
"""Device probe of the Hopper XAttention scoring kernel (``gpu/score_xattn_wgmma.cu``,
``scoring.XA_CONFIG = "wgmma"``), in two stages, each in its own subprocess with a timeout
(a sticky CUDA error or a pipeline deadlock in one cannot take the other down):

  check  the sm_90a build (feature flag, registers, spills), the 5-d tensor maps, then the
         ``"wgmma"`` config against the float64 NumPy reference (the tolerance rule of
         ``refattn.check.compare_arrays``) and against the ``"128x256"`` mma.sync kernel
         (max |diff|) on strides 4 / 8 / 16, partial blocks, GQA, causal and not, bf16 /
         fp16, D 64 / 128, BT 1..16, one head of the benchmark geometry (32k); each case
         also asserts that ``xatt_wgmma`` really ran (launch trace);
  bench  S = 32768 and 131072, B = 1, H = 32, D = 128, bf16, causal, block 128, default
         chunk: SDPA cuDNN dense causal (the denominator), ``"128x256"`` and ``"wgmma"`` at
         stride 8 and 16 (median of CUDA-event times; GEMM kernel time from the launch
         trace; max |diff| between the two configs).

Every check prints one line; lines starting with ``RESULT`` are repeated at the end with a
summary line. The full log also goes to ``$OUT/probe_xattn_wgmma.log`` when ``$OUT`` is set.

Usage: PYTHONPATH=. python3 scripts/probe_xattn_wgmma.py [--stage check|bench] [--seq ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def log(msg: str) -> None:
    print(msg, flush=True)


def _cast(x, dtype):
    import ml_dtypes
    import numpy as np
    if dtype == "bfloat16":
        return x.astype(ml_dtypes.bfloat16)
    return x.astype(np.float16)


# ----------------------------------------------------------------------------- check
CASES = [
    # name, (B, Hq, Hkv, L, D, bs, S, C, causal, dtype)
    ("bf16_s8_bt16_partial", (1, 2, 1, 1000, 128, 128, 8, 256, True, "bfloat16")),
    ("bf16_s16_bt8_gqa", (1, 4, 2, 2048, 128, 128, 16, 2048, True, "bfloat16")),
    ("fp16_s8_bt16_multi", (1, 2, 1, 5000, 128, 128, 8, 1024, True, "float16")),
    ("bf16_s16_d64_bt4", (2, 2, 2, 768, 64, 64, 16, 128, True, "bfloat16")),
    ("fp16_s16_d64_nc_bt2", (1, 2, 1, 608, 64, 32, 16, 128, False, "float16")),
    ("bf16_s4_d64_nc_gqa", (1, 4, 2, 1504, 64, 64, 4, 512, False, "bfloat16")),
    ("bf16_s8_d128_nc", (1, 2, 2, 3000, 128, 128, 8, 1024, False, "bfloat16")),
    ("fp16_s16_bt1", (1, 1, 1, 304, 128, 16, 16, 64, True, "float16")),
    ("bf16_s8_32k_1head", (1, 1, 1, 32768, 128, 128, 8, 8192, True, "bfloat16")),
    ("bf16_s16_32k_1head", (1, 1, 1, 32768, 128, 128, 16, 8192, True, "bfloat16")),
]


def stage_check(args) -> None:
    import cupy as cp
    import numpy as np

    from refattn.check import compare_arrays
    from refattn.core import registry
    from refattn.data.synthetic import synthetic
    from refattn.methods import xattention  # noqa: F401  (defines the op)

    why = registry.load_backend("cupy")
    if why is not None:
        log(f"RESULT check: cupy backend unavailable: {why}")
        return
    from refattn.gpu import _build
    from refattn.gpu import scoring as sc
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = dev["name"].decode() if isinstance(dev["name"], bytes) else dev["name"]
    log(f"device: {name}, cc {_build.device_cc()}, cupy {cp.__version__}, "
        f"options {_build.compile_options('score_xattn_wgmma.cu')}")
    # build
    try:
        fn = _build.get_kernel("score_xattn_wgmma.cu", "xatt_wgmma_feature_probe")
        out = cp.zeros(2, cp.int32)
        fn((1,), (32,), (out,))
        cp.cuda.get_current_stream().synchronize()
        log(f"RESULT build: sm90a feature={int(out[0])} arch={int(out[1])}")
    except Exception as e:
        log(f"RESULT build: FAILED {type(e).__name__}: {str(e)[:600]}")
        return
    for kname in ("xatt_wgmma<__nv_bfloat16, 16, 4>", "xatt_wgmma<__nv_bfloat16, 8, 4>"):
        try:
            t0 = time.time()
            k = _build.get_kernel("score_xattn_wgmma.cu", kname)
            log(f"RESULT build {kname}: regs {getattr(k, 'num_regs', '?')} local (spills) "
                f"{getattr(k, 'local_size_bytes', '?')} static smem "
                f"{getattr(k, 'shared_size_bytes', '?')} (compile {time.time() - t0:.1f} s)")
        except Exception as e:
            log(f"RESULT build {kname}: FAILED {type(e).__name__}: {str(e)[:600]}")
            return
    # tensor maps (5-d view [B, H, L/S, S, D]) on a tiny array
    try:
        x = cp.zeros((1, 2, 1000, 128), cp.uint16)
        sc._xa_tensor_map(x, "bfloat16", 8, 128)
        sc._xa_tensor_map(x, "float16", 8, 256)
        log("RESULT tmap: 5-d maps encoded (boxes 128 and 256 rows, 125 tiles)")
    except Exception as e:
        log(f"RESULT tmap: FAILED {type(e).__name__}: {e}")

    xa = registry.dispatch("xattention_score", "cupy")
    ref_op = registry.ops()["xattention_score"].reference
    n_ok = n_bad = 0
    for cname, (B, Hq, Hkv, L, D, bs, S, C, causal, dtype) in CASES:
        try:
            q, k, _ = synthetic(B, Hq, Hkv, L, D, seed=L + S)
            q, k = _cast(q, dtype), _cast(k, dtype)
            qa = (q, k, bs, S, C, 1.0, causal)
            t0 = time.time()
            (ref,) = ref_op(*qa)
            t_ref = time.time() - t0
            trace: list = []
            ct = "__nv_bfloat16" if dtype == "bfloat16" else "__half"
            _build.get_kernel("score_xattn_wgmma.cu", f"xatt_wgmma<{ct}, {bs // S}, 4>")
            sc.XA_CONFIG, sc.TRACE = "wgmma", trace
            try:
                log(f"  call wgmma {cname}")  # a timeout right after this line: a hang
                (W,) = xa(*qa)
                cp.cuda.get_current_stream().synchronize()
                log("  returned")
            finally:
                sc.XA_CONFIG, sc.TRACE = "128x256", None
            ran = [n for n, _, _ in trace if n.startswith("xatt_wgmma")]
            rep = compare_arrays(ref, W, dtype, name="W")
            err = float(np.abs(np.asarray(W, np.float64) - ref).max())
            nan = int(np.isnan(W).sum())
            if dtype == "bfloat16" and bs // S in (8, 16):  # kernels the bench compiles anyway
                (W1,) = xa(*qa)
                rep1 = compare_arrays(ref, W1, dtype, name="W")
                err1 = f"{float(np.abs(np.asarray(W1, np.float64) - ref).max()):.2e}, ok={rep1.ok}"
                diff = f"{float(np.abs(np.asarray(W, np.float64) - np.asarray(W1, np.float64)).max()):.2e}"
            else:  # saves an NVRTC build of xatt_gemm (the timeout budget)
                err1, diff = "not run", "-"
            ok = rep.ok and bool(ran) and nan == 0
            n_ok += ok
            n_bad += not ok
            line = (f"RESULT check {cname}: {'PASS' if ok else 'FAIL'} wgmma_ran={bool(ran)} "
                    f"ref_ok={rep.ok} maxerr={err:.2e} (128x256 {err1}) "
                    f"|wgmma-128x256|={diff} nan={nan} ref {t_ref:.1f}s")
            log(line)
            if not ok:
                if not ran:
                    log(f"    launches: {[n for n, _, _ in trace]} broken={sc._XA_WGMMA_BROKEN[:1]}")
                log("    " + rep.summary().replace("\n", " | ")[:700])
                # localise: which query-block rows / key-block columns differ
                dd = np.abs(np.asarray(W, np.float64) - ref) > 1e-3 * max(1.0, np.abs(ref).max())
                if dd.any():
                    b_, h_, I_, J_ = np.nonzero(dd)
                    log(f"    bad entries {int(dd.sum())}/{dd.size}: rows I {sorted(set(I_.tolist()))[:12]} "
                        f"cols J {sorted(set(J_.tolist()))[:12]} heads {sorted(set(h_.tolist()))[:8]}")
        except Exception as e:
            n_bad += 1
            log(f"RESULT check {cname}: ERROR {type(e).__name__}: {str(e)[:400]}")
            traceback.print_exc(limit=3)
            if "cuda" in type(e).__name__.lower() or "cudaError" in str(e)[:300]:
                log("    (CUDA error: the context may be unusable; stopping the check stage)")
                break
    log(f"RESULT check summary: {n_ok} pass, {n_bad} fail of {len(CASES)}")


# ----------------------------------------------------------------------------- bench
def stage_bench(args) -> None:
    import cupy as cp

    from refattn.core import registry
    from refattn.methods import xattention  # noqa: F401
    from refattn.methods.xattention import default_chunk_size
    try:
        import torch
    except Exception:
        torch = None
    why = registry.load_backend("cupy")
    if why is not None:
        log(f"RESULT bench: cupy backend unavailable: {why}")
        return
    from refattn.gpu import scoring as sc
    xa = registry.dispatch("xattention_score", "cupy")
    H, D = 32, 128

    def sync():
        cp.cuda.get_current_stream().synchronize()
        if torch is not None:
            torch.cuda.synchronize()

    def timeit(fn, iters):
        fn()
        sync()
        ts = []
        for _ in range(iters):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record()
            fn()
            if torch is not None:
                torch.cuda.synchronize()
            b.record()
            b.synchronize()
            ts.append(cp.cuda.get_elapsed_time(a, b))
        return statistics.median(ts)

    def kernel_ms(fn):
        trace: list = []
        sc.TRACE = trace
        try:
            fn()
            sync()
        finally:
            sc.TRACE = None
        gemm = sum(cp.cuda.get_elapsed_time(a, b) for n, a, b in trace if not n.startswith("xatt_reduce"))
        red = sum(cp.cuda.get_elapsed_time(a, b) for n, a, b in trace if n.startswith("xatt_reduce"))
        names = sorted({n.split("<")[0] for n, _, _ in trace})
        return gemm, red, names

    def bf16_normal(shape):
        import ml_dtypes
        bits = cp.random.standard_normal(shape, dtype=cp.float32).view(cp.uint32)
        bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
        try:
            return bf.view(ml_dtypes.bfloat16)
        except Exception:  # CuPy without bf16 views: through the host
            return cp.asarray(bf.get().view(ml_dtypes.bfloat16))

    for L in args.seq:
        iters = 5 if L <= 32768 else 3
        q, k = bf16_normal((1, H, L, D)), bf16_normal((1, H, L, D))
        C = default_chunk_size(L)
        dense = None
        if torch is not None:
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                tq, tk = torch.from_dlpack(q), torch.from_dlpack(k)
                tv = torch.randn_like(tq)

                def cudnn(tq=tq, tk=tk, tv=tv):
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
                dense = timeit(cudnn, 3)
                log(f"RESULT bench L={L} cudnn_dense_causal: {dense:.3f} ms")
                del cudnn, tv, tq, tk
                torch.cuda.empty_cache()
            except Exception as e:
                log(f"RESULT bench L={L} cudnn: unavailable {type(e).__name__}: {str(e)[:200]}")
        for S in (8, 16):
            T = L // S
            flop = H * T * (T + 1) / 2 * 2 * S * D
            outs = {}
            for cfg in ("128x256",) if args.skip_wgmma else ("128x256", "wgmma"):
                try:
                    sc.XA_CONFIG = cfg
                    fn = lambda q=q, k=k, S=S, C=C: xa(q, k, 128, S, C, 1.0, True)  # noqa: E731
                    ms = timeit(fn, iters)
                    gemm, red, names = kernel_ms(fn)
                    (W,) = fn()
                    outs[cfg] = W
                    share = f"{100 * ms / dense:.1f}%" if dense else "n/a"
                    log(f"RESULT bench L={L} S={S} {cfg}: {ms:.3f} ms ({share} of cuDNN) "
                        f"{flop / ms / 1e9:.0f} TFLOP/s; gemm kernel {gemm:.3f} ms "
                        f"({flop / max(gemm, 1e-6) / 1e9:.0f} TFLOP/s), reduce {red:.3f} ms; "
                        f"kernels {names}")
                except Exception as e:
                    log(f"RESULT bench L={L} S={S} {cfg}: ERROR {type(e).__name__}: {str(e)[:300]}")
                finally:
                    sc.XA_CONFIG = "128x256"
                    sync()
            if len(outs) == 2:
                a, b = outs["wgmma"], outs["128x256"]
                diff = float(cp.abs(a - b).max())
                log(f"RESULT bench L={L} S={S} |wgmma-128x256| = {diff:.2e} "
                    f"(max W {float(cp.abs(b).max()):.3f}, nan {int(cp.isnan(a).sum())})")
            outs.clear()
            cp.get_default_memory_pool().free_all_blocks()
        del q, k
        cp.get_default_memory_pool().free_all_blocks()


# ----------------------------------------------------------------------------- driver
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", default=None, choices=["check", "bench"])
    ap.add_argument("--seq", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--timeouts", type=int, nargs=2, default=[100, 70],
                    help="seconds for the check and the bench stage")
    ap.add_argument("--skip-wgmma", action="store_true",
                    help="bench: time only 128x256 and cuDNN (set by the driver when the "
                         "check stage timed out: a possible pipeline deadlock)")
    args = ap.parse_args()
    if args.stage == "check":
        stage_check(args)
        return 0
    if args.stage == "bench":
        stage_bench(args)
        return 0

    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    lines: list[str] = []
    full: list[str] = []
    t_all = time.time()
    skip = False
    for stage, tmo in (("check", args.timeouts[0]), ("bench", args.timeouts[1])):
        cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage,
               "--seq", *map(str, args.seq)] + (["--skip-wgmma"] if skip else [])
        t0 = time.time()
        with tempfile.TemporaryFile("w+") as f:
            try:
                p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=tmo)
                status = f"rc {p.returncode}"
            except subprocess.TimeoutExpired:
                status = f"TIMEOUT after {tmo} s"
            f.seek(0)
            out = f.read()
        head = f"===== stage {stage}: {status}, {time.time() - t0:.0f} s" + (
            " (bench without wgmma: the check stage hung in a wgmma call)" if skip and stage == "bench"
            else "")
        full += [head, out]
        other = "\n".join(ln for ln in out.splitlines() if not ln.startswith("RESULT"))
        log(head)
        log(other[-1500:])  # diagnostics; the RESULT lines come last
        lines += [ln for ln in out.splitlines() if ln.startswith("RESULT")]
        if not status.startswith("rc 0"):
            lines.append(f"RESULT stage {stage}: {status}")
            last = [ln for ln in out.splitlines() if ln.strip()][-1:]
            if (stage == "check" and status.startswith("TIMEOUT") and last
                    and last[0].startswith("  call wgmma")):
                skip = True
    # summary
    checks = [ln for ln in lines if ln.startswith("RESULT check ") and "summary" not in ln]
    n_pass = sum(" PASS " in ln for ln in checks)
    speed = {}
    for ln in lines:
        if ln.startswith("RESULT bench L=") and (" 128x256: " in ln or " wgmma: " in ln):
            try:
                hdr, rest = ln[len("RESULT bench "):].split(": ", 1)
                speed[hdr] = float(rest.split(" ms")[0])
            except Exception:
                pass
    ratios = []
    for key, ms in speed.items():
        if key.endswith(" wgmma"):
            base = speed.get(key[:-len(" wgmma")] + " 128x256")
            if base:
                ratios.append(f"{key[:-6]}: {base / ms:.2f}x")
    summary = (f"SUMMARY correctness {n_pass}/{len(checks)} cases pass; "
               f"speed-up wgmma vs 128x256: {', '.join(ratios) or 'n/a'}; total {time.time() - t_all:.0f} s")
    tail = "\n".join(lines + [summary])
    log("\n===== RESULTS")
    log(tail[-7800:])
    out_dir = os.environ.get("OUT")
    if out_dir:
        try:
            with open(os.path.join(out_dir, "probe_xattn_wgmma.log"), "w") as f:
                f.write("\n".join(full) + "\n===== RESULTS\n" + tail + "\n")
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
