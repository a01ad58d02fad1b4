// Float64 helpers shared by the pooled-key scoring kernels (gpu/score_pool.cu,
// gpu/score_rowcol.cu, gpu/score_prism.cu). Include after common.cuh.
#pragma once

namespace refattn {

__device__ __forceinline__ double to_dbl(float x) { return (double)x; }
__device__ __forceinline__ double to_dbl(double x) { return x; }
__device__ __forceinline__ double to_dbl(__half x) { return (double)__half2float(x); }
__device__ __forceinline__ double to_dbl(__nv_bfloat16 x) { return (double)__bfloat162float(x); }

// Round a float64 value to T and back (NumPy's astype): fp16 directly, bf16 through fp32
// (ml_dtypes converts float64 -> float32 -> bfloat16).
template <typename T> __device__ __forceinline__ double round_to(double x);
template <> __device__ __forceinline__ double round_to<double>(double x) { return x; }
template <> __device__ __forceinline__ double round_to<float>(double x) { return (double)(float)x; }
template <> __device__ __forceinline__ double round_to<__half>(double x) {
  return (double)__half2float(__double2half(x));
}
template <> __device__ __forceinline__ double round_to<__nv_bfloat16>(double x) {
  return (double)__bfloat162float(__float2bfloat16_rn((float)x));
}

// Store a float64 value as OUT (exact when the value is representable in OUT).
template <typename OUT> __device__ __forceinline__ OUT cast_out(double x);
template <> __device__ __forceinline__ double cast_out<double>(double x) { return x; }
template <> __device__ __forceinline__ float cast_out<float>(double x) { return (float)x; }
template <> __device__ __forceinline__ __half cast_out<__half>(double x) { return __double2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 cast_out<__nv_bfloat16>(double x) {
  return __float2bfloat16_rn((float)x);
}

template <typename ACC> __device__ __forceinline__ ACC neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -REFATTN_INF; }
template <> __device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(0xfff0000000000000ULL);
}
__device__ __forceinline__ double dbl_neg_inf() { return __longlong_as_double(0xfff0000000000000ULL); }

// V consecutive elements of T as doubles; one 16-byte load when V * sizeof(T) == 16.
template <typename T, int V>
__device__ __forceinline__ void load_dbl(const T* __restrict__ p, double (&o)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = to_dbl(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = to_dbl(p[i]);
  }
}

// Sum of a double over the CTA in a fixed order (deterministic); every thread gets it.
template <int NT>
__device__ __forceinline__ double cta_sum(double x, double* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  __syncthreads();
  if (lane == 0) red[warp] = x;
  __syncthreads();
  double y = 0.0;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) y += red[w];
  return y;
}

}  // namespace refattn
