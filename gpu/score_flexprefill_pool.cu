// Pooled-estimate kernels of FlexPrefill (op `flexprefill_score`), see
// gpu/scoring_estimate.py; its vertical / slash estimate is in gpu/score_vslash.cu.
//
// FlexPrefill's pooled estimates: est_block_mean<T> (float64 block means over the true
// length, times a multiplier) and est_softmax<OUT> (row softmax of float64 logits, causal
// over the block index when asked); the small pooled products run as cuBLAS float64 GEMMs.
#include "common.cuh"
#include "estimate_common.cuh"

using namespace refattn;
using namespace refattn::est;

// ===================================================================== FlexPrefill pooling
// out[bh, j, :] = mul * mean of x[bh, t, :] over t in [t_begin + j*blk, min(S, t_begin +
// (j+1)*blk)) (true length), float64. Grid (nblk, BH), 256 threads. Vector loads of 16 bytes
// when D * sizeof(T) % 16 == 0 and (D / VEC) divides 256; scalar otherwise.
template <typename T>
__global__ void __launch_bounds__(256) est_block_mean(const T* __restrict__ x,
                                                      double* __restrict__ out, int S, int D,
                                                      int t_begin, int blk, int nblk,
                                                      double mul) {
  constexpr int VEC = 16 / (int)sizeof(T);
  __shared__ double red[256 * VEC];
  const int j = blockIdx.x, bh = blockIdx.y, tid = threadIdx.x;
  const int t0 = t_begin + j * blk, t1 = min(S, t0 + blk);
  const T* xb = x + (long long)bh * S * D;
  double* o = out + ((long long)bh * nblk + j) * D;
  const double f = mul / (double)(t1 - t0);
  const int tpr = D / VEC;  // threads per row
  if (D % VEC == 0 && tpr <= 256 && 256 % tpr == 0) {
    const int rg = 256 / tpr, c = tid % tpr, g = tid / tpr;
    double acc[VEC];
#pragma unroll
    for (int u = 0; u < VEC; ++u) acc[u] = 0.0;
    for (int t = t0 + g; t < t1; t += rg) {
      const uint4 raw = *reinterpret_cast<const uint4*>(xb + (long long)t * D + c * VEC);
      const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u] += dbl(v[u]);
    }
#pragma unroll
    for (int u = 0; u < VEC; ++u) red[g * D + c * VEC + u] = acc[u];
    __syncthreads();
    for (int d = tid; d < D; d += 256) {
      double s = 0.0;
      for (int gg = 0; gg < rg; ++gg) s += red[gg * D + d];
      o[d] = s * f;
    }
  } else {
    for (int d = tid; d < D; d += 256) {
      double s = 0.0;
      for (int t = t0; t < t1; ++t) s += dbl(xb[(long long)t * D + d]);
      o[d] = s * f;
    }
  }
}

template <typename OUT> __device__ __forceinline__ OUT from_dbl(double x);
template <> __device__ __forceinline__ float from_dbl<float>(double x) { return (float)x; }
template <> __device__ __forceinline__ double from_dbl<double>(double x) { return x; }

__device__ __forceinline__ double block_reduce_d(double x, bool is_max, double* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  x = is_max ? warp_max_d(x) : warp_sum_d(x);
  __syncthreads();
  if (lane == 0) red[warp] = x;
  __syncthreads();
  double y = is_max ? neg_inf_d() : 0.0;
  for (int w = 0; w < nw; ++w) y = is_max ? fmax(y, red[w]) : y + red[w];
  return y;
}

// out[r, J] = softmax over J <= last of z[r, J] (float64), 0 for J > last; last = r % rows
// when `causal` (block-causal rows), n - 1 otherwise. One CTA (256 threads) per row.
template <typename OUT>
__global__ void __launch_bounds__(256) est_softmax(const double* __restrict__ z,
                                                   OUT* __restrict__ out, int n, int rows,
                                                   int causal) {
  __shared__ double red[32];
  const long long r = blockIdx.x;
  const int last = causal ? (int)(r % rows) : n - 1;
  const double* zr = z + r * n;
  OUT* orow = out + r * n;
  double m = neg_inf_d();
  for (int j = threadIdx.x; j <= last; j += blockDim.x) m = fmax(m, zr[j]);
  m = block_reduce_d(m, true, red);
  double s = 0.0;
  for (int j = threadIdx.x; j <= last; j += blockDim.x) s += exp(zr[j] - m);
  s = block_reduce_d(s, false, red);
  const double inv = 1.0 / s;
  for (int j = threadIdx.x; j < n; j += blockDim.x)
    orow[j] = from_dbl<OUT>(j <= last ? exp(zr[j] - m) * inv : 0.0);
}

#ifdef REFATTN_COMPILE_CHECK
// nvcc -DREFATTN_COMPILE_CHECK: instantiate every template the launchers use.
void* const* refattn_flexprefill_pool_instances() {
  static void* const kInstances[] = {
    (void*)&est_block_mean<float>, (void*)&est_block_mean<double>,
    (void*)&est_block_mean<__nv_bfloat16>, (void*)&est_softmax<float>,
    (void*)&est_softmax<double>,
  };
  return kInstances;
}
#endif
