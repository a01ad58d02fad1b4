"""Helpers shared by the GPU benchmark scripts (``scripts/bench_gpu_*.py``): CUDA-event
timing, bf16 Gaussian inputs on the device, a temporary module switch."""
from __future__ import annotations

import contextlib
import statistics
from typing import Any, Callable, Iterator

import cupy as cp

try:  # torch work (SDPA baselines) must be synchronised around each timed call
    import torch
except Exception:  # pragma: no cover - depends on the machine
    torch = None


def log(msg: str) -> None:
    print(msg, flush=True)


def timeit(fn: Callable[[], Any], iters: int, warmup: int, *, sync_torch: bool = True) -> float:
    """Median ms of ``fn()`` by CUDA events; with ``sync_torch`` (and torch present), torch
    work is synchronised around each call."""
    sync = sync_torch and torch is not None
    for _ in range(warmup):
        fn()
    cp.cuda.get_current_stream().synchronize()
    if sync:
        torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        if sync:
            torch.cuda.synchronize()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return statistics.median(times)


def bf16_normal(shape: tuple[int, ...]) -> Any:
    """Gaussian bf16 on the device (fp32 rounded to nearest even)."""
    import ml_dtypes
    bits = cp.random.standard_normal(shape, dtype=cp.float32).view(cp.uint32)
    bf = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(cp.uint16)
    try:
        return bf.view(ml_dtypes.bfloat16)
    except Exception:  # CuPy without bf16 views: through the host
        return cp.asarray(bf.get().view(ml_dtypes.bfloat16))


@contextlib.contextmanager
def switch(mod: Any, name: str, value: Any) -> Iterator[None]:
    """Set module attribute ``name`` for the duration of the block."""
    old = getattr(mod, name)
    setattr(mod, name, value)
    try:
        yield
    finally:
        setattr(mod, name, old)
