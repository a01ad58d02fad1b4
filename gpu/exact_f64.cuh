// Float64 helpers of the exact (one warp per row) scoring kernels of NSA, ProxyAttn and
// PBS-Attn and of their pooling kernels (gpu/score_nsa.cu, gpu/score_proxy_pbs.cu,
// gpu/score_compressed_pool.cu). Include after common.cuh.
#pragma once

namespace refattn {

__device__ __forceinline__ double to_dbl(float x) { return (double)x; }
__device__ __forceinline__ double to_dbl(double x) { return x; }
__device__ __forceinline__ double to_dbl(__half x) { return (double)__half2float(x); }
__device__ __forceinline__ double to_dbl(__nv_bfloat16 x) { return (double)__bfloat162float(x); }

__device__ __forceinline__ double warp_max_d(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ double warp_sum_d(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ double neg_inf_d() { return __longlong_as_double(0xfff0000000000000ULL); }

}  // namespace refattn
