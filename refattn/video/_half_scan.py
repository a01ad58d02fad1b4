"""NumPy emulation of the PyTorch CUDA half-precision ops in SpargeAttn's official block map.

Transliterated from pytorch/pytorch (the versions read for this reference):

* ``aten/src/ATen/native/cuda/CumsumKernel.cu`` (``launch_cumsum_cuda_kernel``: Half and
  BFloat16 dispatch to ``scan_dim<scalar_t>(self, result, dim, init=0, std::plus<scalar_t>())``,
  so every partial sum is stored in the half dtype);
* ``aten/src/ATen/native/cuda/ScanUtils.cuh`` @ 2f838bdf6123e2c600bcd4a5c301a6683acff29a
  (same kernel body at 017b938783611aa1b76ea75f61943c8c61cd825f): ``scan_dim`` (one row in
  the whole tensor -> ``cuda::cub::inclusive_scan``; last dim -> ``scan_innermost_dim``),
  ``get_log_num_threads_x_inner_scan<uint32_t>`` and ``tensor_kernel_scan_innermost_dim_impl``
  (Sklansky scan, PRs #103314 / #103435);
* ``c10/util/Half-inl.h``, ``c10/util/BFloat16-inl.h``: ``operator+(a, b)`` is
  ``static_cast<float>(a) + static_cast<float>(b)`` rounded back (round to nearest even);
* ``aten/src/ATen/native/cuda/Bucketization.cu`` (``upper_bound``) and
  ``aten/src/ATen/native/BucketizationUtils.h`` (``searchsorted_maybe_trim_input_tensors``:
  boundaries and values of different dtypes are both cast to their result type);
* ``aten/src/ATen/native/cuda/BinaryMulKernel.cu`` + ``Loops.cuh``
  (``opmath_symmetric_gpu_kernel_with_scalars``: ``half_tensor * python_float`` multiplies
  in float32 with the scalar read as float32, then rounds to the half dtype).

Half values are carried in float32 arrays (every half/bf16 value is a float32 value).
"""
from __future__ import annotations

from typing import Any

import numpy as np

_U32 = 1 << 32


def half_dtype(dtype: Any) -> Any:
    """The official half dtype for a working dtype: fp16 -> fp16, bf16 -> bf16, else None."""
    if dtype == np.float16:
        return np.dtype(np.float16)
    try:
        import ml_dtypes
    except ImportError:                                   # pragma: no cover
        return None
    if dtype == ml_dtypes.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return None


def to_half(x: Any, dtype: Any) -> np.ndarray:
    """Round ``x`` (float32 or float64) to ``dtype`` (nearest even), returned as float32."""
    return np.asarray(x).astype(dtype).astype(np.float32)


def add_half(a: np.ndarray, b: np.ndarray, dtype: Any) -> np.ndarray:
    """c10 ``Half``/``BFloat16`` ``operator+``: float32 sum, rounded to ``dtype``."""
    return to_half(a.astype(np.float32) + b.astype(np.float32), dtype)


def log_num_threads_x_inner_scan(num_rows: int, row_size: int) -> int:
    """``get_log_num_threads_x_inner_scan<uint32_t>`` (uint32 arithmetic: ``diff`` wraps)."""
    log_x = log_y = 0
    while (1 << log_x) < row_size:
        log_x += 1
    while (1 << log_y) < num_rows:
        log_y += 1
    diff = (log_x - log_y) % _U32                  # integer diff = log_x - log_y (uint32)
    log_x = ((9 + diff) % _U32) // 2               # ((integer)9 + diff) / (integer)2
    return min(max(4, log_x), 9)


def _stage_indices(log_nx: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ti, si) of each Sklansky step ``m = 0..log_nx`` for threadIdx.x = 0..2^log_nx - 1."""
    tid = np.arange(1 << log_nx)
    out = []
    for m in range(log_nx + 1):
        s = 1 << m
        a = ((tid >> m) << (m + 1)) | s            # (threadIdx.x / s) * (2 * s) + s
        out.append((a + (tid % s), a - 1))         # ti, si
    return out


def scan_innermost(x: np.ndarray, dtype: Any, log_nx: int) -> np.ndarray:
    """``tensor_kernel_scan_innermost_dim_impl`` with ``binary_op = std::plus<half>``.

    ``x [R, n]`` half values (float32). Each row is scanned in chunks of ``2 * nx`` columns
    (``nx = 2^log_nx`` x-threads; missing columns load ``init = 0``). Per chunk: element 0
    ``+= block_total`` (the previous chunks' total), then for ``m = 0..log_nx`` every thread
    does ``buf[ti] = buf[ti] + buf[si]`` with ``s = 2^m``, ``a = (tid / s) * 2s + s``,
    ``ti = a + tid % s``, ``si = a - 1``; ``block_total = buf[2 nx - 1]``. Within one step
    the ``ti`` and ``si`` sets are disjoint, so the steps vectorise over threads and rows.
    """
    R, n = x.shape
    width = 2 << log_nx
    chunks = -(-n // width)
    pad = np.zeros((R, chunks * width), np.float32)
    pad[:, :n] = x
    stages = _stage_indices(log_nx)
    total = np.zeros(R, np.float32)                              # block_total = init
    for c in range(chunks):
        buf = pad[:, c * width:(c + 1) * width]                  # a view: written in place
        buf[:, 0] = add_half(buf[:, 0], total, dtype)             # row_buf[0] + block_total
        for ti, si in stages:
            buf[:, ti] = add_half(buf[:, ti], buf[:, si], dtype)  # row_buf[ti] + row_buf[si]
        total = buf[:, width - 1].copy()
    return pad[:, :n]


def cumsum_cuda(x: np.ndarray, dtype: Any) -> np.ndarray:
    """``torch.cumsum(x, dim=-1)`` of a contiguous CUDA ``dtype`` tensor (``scan_dim``).

    All leading dimensions form ``num_rows`` rows of the innermost dimension, as the kernel
    sees the whole tensor: the thread shape depends on ``num_rows``. A tensor with a single
    row takes ``cuda::cub::inclusive_scan`` (CUB's device scan), whose summation tree is not
    transliterated: that case is approximated by a sequential running sum in ``dtype``.
    """
    x = np.asarray(x, np.float32)
    n = x.shape[-1]
    flat = x.reshape(-1, n)
    if n == 0:
        return x.copy()
    if flat.shape[0] == 1:                                        # numel == size(dim): CUB
        out = flat.copy()
        for j in range(1, n):
            out[:, j] = add_half(out[:, j - 1], out[:, j], dtype)
        return out.reshape(x.shape)
    log_nx = log_num_threads_x_inner_scan(flat.shape[0], n)
    return scan_innermost(flat, dtype, log_nx).reshape(x.shape)


def searchsorted_right(seq: np.ndarray, val: np.ndarray) -> np.ndarray:
    """``torch.searchsorted(seq, val[..., None], right=True)[..., 0]`` on CUDA.

    ``seq [..., n]`` (a half cdf) and ``val [...]`` (float32 thresholds) have different
    dtypes, so both are cast to the result type, float32 (exact for half values); then
    Bucketization.cu's ``upper_bound`` binary search runs as written (``start = mid + 1``
    unless ``mid_val > val``), which also fixes the answer where a rounded cdf is not
    monotone and sends NaN rows to ``n``.
    """
    seq = np.asarray(seq, np.float32)
    val = np.asarray(val, np.float32)
    n = seq.shape[-1]
    start = np.zeros(val.shape, np.int64)
    end = np.full(val.shape, n, np.int64)
    while True:
        active = start < end
        if not active.any():
            return start
        mid = start + ((end - start) >> 1)
        mid_val = np.take_along_axis(seq, np.minimum(mid, n - 1)[..., None], axis=-1)[..., 0]
        right = ~(mid_val > val)
        start = np.where(active & right, mid + 1, start)
        end = np.where(active & ~right, mid, end)
