#!/usr/bin/env python3
"""Benchmark refattn's CUDA attention kernels (CuPy backend) on one GPU.

Default problem: bf16, D = 128, B = 1, H = 32, S in {8192, 32768}, causal, random
"causal-ish" block masks of 128 x 128 blocks (every diagonal block plus a random share of
the legal blocks below it) at density 0.1, 0.3 and 1.0 of the legal blocks. In the same run,
when PyTorch is importable: SDPA (flash and cuDNN backends, dense causal) and FlexAttention
(``torch.compile``d, the same block mask through ``BlockMask.from_kv_blocks`` on
``refattn.BlockMask.to_flex(causal=True)``, causal ``mask_mod`` on the partial blocks).
Then the backward, and MoBA per-token routing (block_q = 1, top-k = 8 of 128-token key
blocks, own block always chosen) against a block mask of the same density.

Rates are TFLOP/s on computed work: 4 * D * (visible query-key pairs) for the forward,
2.5x that for the backward (FlashAttention's convention). Timing: CUDA events, warm-up,
median of ``--iters``.

Usage: PYTHONPATH=. python3 scripts/bench_gpu.py [--seq 8192 32768] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy as cp  # noqa: E402

from refattn.core.blockmask import BlockMask  # noqa: E402
from refattn.core.registry import dispatch  # noqa: E402

try:
    import torch
except Exception:  # pragma: no cover
    torch = None

RESULTS: list[dict] = []


def log(msg: str) -> None:
    print(msg, flush=True)


def timeit(fn, iters: int, *args, warmup: int = 2, **kwargs) -> float:
    """Median milliseconds of ``fn(*args, **kwargs)`` over ``iters`` runs, by CUDA events on
    CuPy's current stream (PyTorch work is synchronized around each run)."""
    for _ in range(warmup):
        fn(*args, **kwargs)
    cp.cuda.get_current_stream().synchronize()
    if torch is not None:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if torch is not None:
            torch.cuda.synchronize()
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn(*args, **kwargs)
        if torch is not None:
            torch.cuda.synchronize()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def causalish_mask(rng, H, S, block, density) -> BlockMask:
    """Diagonal blocks always, others among the legal (lower-triangle) blocks at random so
    that the selected share of legal blocks is ``density``."""
    nb = -(-S // block)
    legal = np.tril(np.ones((nb, nb), bool))
    diag = np.eye(nb, dtype=bool)
    n_legal = legal.sum()
    want = density * n_legal - nb  # off-diagonal blocks to add
    p = max(0.0, min(1.0, want / max(n_legal - nb, 1)))
    m = (rng.random((1, H, nb, nb)) < p) & legal & ~diag
    m |= diag
    return BlockMask(m, block_q=block, block_k=block, q_len=S, k_len=S)


def visible_pairs_blockmask(mask: BlockMask, causal: bool) -> int:
    """Number of (query, key) pairs the mask and causality leave visible, all heads."""
    m = mask.mask
    bq, bk, S = mask.block_q, mask.block_k, mask.q_len
    nb = m.shape[-1]
    assert bq == bk and mask.q_len == mask.k_len
    per = np.full((nb, nb), bq * bk, np.int64)
    if causal:
        per = np.tril(per)
        per[np.arange(nb), np.arange(nb)] = bq * (bq + 1) // 2
    # ragged last block ignored (S is a multiple of the block here)
    assert S % bq == 0
    return int((m * per).sum())


def moba_mask_device(H, S, block, topk, seed=0):
    """Per-token routing mask [1, H, S, Kb] (block_q = 1): own block plus the top-(k-1) of
    random scores among earlier blocks. Built on the GPU, returned as NumPy."""
    kb = S // block
    rs = cp.random.RandomState(seed)
    r = rs.random_sample((H, S, kb), dtype=cp.float32)
    own = (cp.arange(S) // block)[None, :, None]
    kbi = cp.arange(kb)[None, None, :]
    r = cp.where(kbi < own, r, cp.float32(-1.0))
    r = cp.where(kbi == own, cp.float32(2.0), r)
    top = cp.argsort(-r, axis=-1)[..., :topk]
    m = cp.zeros((H, S, kb), bool)
    hi = cp.arange(H)[:, None, None]
    si = cp.arange(S)[None, :, None]
    m[hi, si, top] = True
    m &= kbi <= own
    # visible pairs: full blocks before the own block, i % block + 1 keys of the own block
    full_before = (m & (kbi < own)).sum(dtype=cp.int64) * block
    own_pairs = H * int(((cp.arange(S) % block) + 1).sum())
    pairs = int(full_before) + own_pairs
    return m.get()[None], pairs


def rec(**kw) -> None:
    RESULTS.append(kw)
    extra = " ".join(f"{k}={v}" for k, v in kw.items() if k not in ("what", "ms", "tflops"))
    log(f"  {kw['what']:<44s} {kw['ms']:9.3f} ms  {kw['tflops']:7.1f} TFLOP/s  {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--density", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--no-moba", action="store_true")
    ap.add_argument("--tiles", action="store_true", help="also time other forward tile shapes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    global torch
    if args.no_torch:
        torch = None
    fwd = dispatch("attention_fwd", "cupy")
    bwd = dispatch("attention_bwd", "cupy")
    from refattn.gpu import attention as ga

    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    machine = {"gpu": dev["name"].decode() if isinstance(dev["name"], bytes) else dev["name"],
               "sms": dev["multiProcessorCount"], "cupy": cp.__version__,
               "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
               "driver": cp.cuda.runtime.driverGetVersion(),
               "torch": getattr(torch, "__version__", None), "python": platform.python_version(),
               "command": " ".join(sys.argv)}
    log(f"machine: {machine}")
    H, D, B = args.heads, args.dim, 1
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
        # bf16 inputs: fp32 normals rounded to bf16 (round to nearest even) on the device
        qf = cp.random.standard_normal((3, B, H, S, D), dtype=cp.float32)
        bits = qf.view(cp.uint32)
        bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
        del qf, bits
        import ml_dtypes
        try:
            bf = bf.view(ml_dtypes.bfloat16)
        except Exception:  # CuPy without bf16 views: go through the host
            bf = cp.asarray(bf.get().view(ml_dtypes.bfloat16))
        q, k, v = bf[0], bf[1], bf[2]
        dense_flops = 4.0 * B * H * D * (S * (S + 1) // 2)
        tq = tk = tv = None
        if torch is not None:
            tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
            from torch.nn.attention import SDPBackend, sdpa_kernel
            for name, be in (("SDPA flash (FA2)", SDPBackend.FLASH_ATTENTION),
                             ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
                try:
                    with sdpa_kernel([be]):
                        ms = timeit(torch.nn.functional.scaled_dot_product_attention,
                                    args.iters, tq, tk, tv, is_causal=True)
                    rec(what=f"{name} dense causal fwd", S=S, density=1.0, ms=ms,
                        tflops=dense_flops / ms / 1e9)
                except Exception as e:
                    log(f"  {name}: failed: {type(e).__name__}: {e}")
            if not args.no_backward:
                for name, be in (("SDPA flash (FA2)", SDPBackend.FLASH_ATTENTION),
                                 ("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION)):
                    try:
                        tq2, tk2, tv2 = (x.detach().clone().requires_grad_(True) for x in (tq, tk, tv))
                        with sdpa_kernel([be]):
                            o = torch.nn.functional.scaled_dot_product_attention(tq2, tk2, tv2, is_causal=True)
                            go = torch.randn_like(o)
                            ms = timeit(torch.autograd.grad, max(3, args.iters // 2), o,
                                        (tq2, tk2, tv2), go, retain_graph=True)
                        rec(what=f"{name} dense causal bwd", S=S, density=1.0, ms=ms,
                            tflops=2.5 * dense_flops / ms / 1e9)
                        del tq2, tk2, tv2, o, go
                    except Exception as e:
                        log(f"  {name} bwd: failed: {type(e).__name__}: {e}")

        for dens in args.density:
            mask = causalish_mask(rng, H, S, 128, dens)
            real = mask.density(causal=True)
            pairs = visible_pairs_blockmask(mask, True)
            flops = 4.0 * D * pairs
            fwd(q, k, v, mask, True, None)  # compile + mask upload (cached)
            ms = timeit(fwd, args.iters, q, k, v, mask, True, None)
            rec(what="refattn cupy block-sparse fwd", S=S, density=round(real, 3), ms=ms,
                tflops=flops / ms / 1e9)
            if dens >= 1.0:
                fwd(q, k, v, None, True, None)
                ms_d = timeit(fwd, args.iters, q, k, v, None, True, None)
                rec(what="refattn cupy dense causal fwd (mask=None)", S=S, density=1.0, ms=ms_d,
                    tflops=dense_flops / ms_d / 1e9)
            if args.tiles:
                saved = dict(ga.FWD_TILES)
                for tile in ((128, 64), (64, 64), (128, 32)):
                    if tile == saved[D]:
                        continue
                    ga.FWD_TILES[D] = tile
                    try:
                        fwd(q, k, v, mask, True, None)
                        ms_t = timeit(fwd, args.iters, q, k, v, mask, True, None)
                        rec(what=f"  tile BM={tile[0]} BN={tile[1]}", S=S, density=round(real, 3),
                            ms=ms_t, tflops=flops / ms_t / 1e9)
                    finally:
                        ga.FWD_TILES.update(saved)
            if flex is not None:
                try:
                    fl, FlexBM = flex
                    fx = mask.to_flex(causal=True)

                    def t32(a):
                        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int32,
                                               device="cuda")

                    def causal_mod(b, h, qi, ki):
                        return qi >= ki

                    bm = FlexBM.from_kv_blocks(
                        t32(fx["kv_num_blocks"]), t32(fx["kv_indices"]),
                        t32(fx["full_kv_num_blocks"]), t32(fx["full_kv_indices"]),
                        BLOCK_SIZE=128, mask_mod=causal_mod)
                    fl(tq, tk, tv, block_mask=bm)
                    ms_f = timeit(fl, args.iters, tq, tk, tv, block_mask=bm)
                    rec(what="FlexAttention block-sparse fwd", S=S, density=round(real, 3),
                        ms=ms_f, tflops=flops / ms_f / 1e9)
                except Exception as e:
                    log(f"  FlexAttention: failed: {type(e).__name__}: {e}")
            if not args.no_backward:
                o, lse = fwd(q, k, v, mask, True, None)
                do = q  # any bf16 array of o's shape
                bwd(q, k, v, o, do, lse, mask, True, None)
                ms_b = timeit(bwd, max(3, args.iters // 2), q, k, v, o, do, lse, mask, True, None)
                rec(what="refattn cupy block-sparse bwd", S=S, density=round(real, 3), ms=ms_b,
                    tflops=2.5 * flops / ms_b / 1e9)
                if args.tiles:
                    saved_bn = ga.BWD_BN
                    try:
                        ga.BWD_BN = 64
                        bwd(q, k, v, o, do, lse, mask, True, None)
                        ms_b2 = timeit(bwd, max(3, args.iters // 2), q, k, v, o, do, lse, mask, True, None)
                        rec(what="  bwd BN=64 (4 warps)", S=S, density=round(real, 3), ms=ms_b2,
                            tflops=2.5 * flops / ms_b2 / 1e9)
                    finally:
                        ga.BWD_BN = saved_bn
                del o, lse

        if not args.no_moba:
            try:
                t0 = time.time()
                mm, pairs = moba_mask_device(H, S, 128, 8)
                mmask = BlockMask(mm, block_q=1, block_k=128, q_len=S, k_len=S)
                del mm
                dens = pairs / (H * S * (S + 1) / 2)
                log(f"  (MoBA mask built in {time.time() - t0:.1f} s; density of visible pairs "
                    f"{dens:.4f})")
                a, b_ = cp.cuda.Event(), cp.cuda.Event()
                a.record()
                fwd(q, k, v, mmask, True, None)  # includes building the gather plan
                b_.record()
                b_.synchronize()
                log(f"  MoBA first call (gather plan + kernels): {cp.cuda.get_elapsed_time(a, b_):.1f} ms")
                flops = 4.0 * D * pairs
                ms = timeit(fwd, args.iters, q, k, v, mmask, True, None)
                rec(what="refattn cupy MoBA k=8 fwd (gather)", S=S, density=round(dens, 4),
                    ms=ms, tflops=flops / ms / 1e9)
                if args.tiles:
                    saved_bm = ga.GATHER_BM
                    try:
                        ga.GATHER_BM = 64 if saved_bm != 64 else 128
                        fwd(q, k, v, mmask, True, None)
                        ms_g = timeit(fwd, args.iters, q, k, v, mmask, True, None)
                        rec(what=f"  gather BM={ga.GATHER_BM}", S=S, density=round(dens, 4),
                            ms=ms_g, tflops=flops / ms_g / 1e9)
                    finally:
                        ga.GATHER_BM = saved_bm
                # block mask of the same density
                bmask = causalish_mask(rng, H, S, 128, dens)
                bp = visible_pairs_blockmask(bmask, True)
                fwd(q, k, v, bmask, True, None)
                ms2 = timeit(fwd, args.iters, q, k, v, bmask, True, None)
                rec(what="refattn cupy block mask, same density", S=S,
                    density=round(bmask.density(causal=True), 4), ms=ms2,
                    tflops=4.0 * D * bp / ms2 / 1e9)
                if not args.no_backward:
                    o, lse = fwd(q, k, v, mmask, True, None)
                    bwd(q, k, v, o, q, lse, mmask, True, None)
                    ms3 = timeit(bwd, 3, q, k, v, o, q, lse, mmask, True, None)
                    rec(what="refattn cupy MoBA k=8 bwd (gather)", S=S, density=round(dens, 4),
                        ms=ms3, tflops=2.5 * flops / ms3 / 1e9)
                    del o, lse
                del mmask
                ga._CACHE.clear()
                cp.get_default_memory_pool().free_all_blocks()
            except Exception as e:
                log(f"  MoBA: failed: {type(e).__name__}: {e}")
                traceback.print_exc()
        ga._CACHE.clear()
        cp.get_default_memory_pool().free_all_blocks()

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": RESULTS}, f, indent=1)
        log(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
