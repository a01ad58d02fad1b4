// Block pooling kernels of the pooled-key scoring ops (MoBA, Quest, Prism), see
// gpu/scoring.py. Arrays are contiguous bhsd.
//
//   pool_blocks<T, V, OUT>  block means of up to two inputs x [BH, S, D] in one launch ->
//                    out OUT [BH, nblk, D] (double, or T for the tensor-core paths), summed in
//                    float64 with V-wide (16-byte) loads; divided by the block's true length
//                    (MoBA) or by the full block (Prism's zero pad); optionally rounded to T
//                    (MoBA stores the mean in the input dtype). Optionally (Prism) per block the
//                    three sums of squares of the means: all dims, and weighted by the high /
//                    low band multiplicities -> stats double [BH, nblk, 3].
//   page_minmax<T, OUT>  Quest's per-page channel max/min over the page's real keys, one warp
//                    per page (OUT = T is exact: a max/min of T values is a T value).
#include "common.cuh"
#include "pooled_common.cuh"

using namespace refattn;

// ------------------------------------------------------------------ pooling
// Grid (max(nblk0, nblk1), nbh0 + nbh1), 256 threads, dynamic shared memory RG * D doubles
// with nv = D / V, RG = max(1, 256 / nv). CTAs with blockIdx.y < nbh0 pool x0, the others
// x1 (nbh1 may be 0). With `stats`: st0 / st1 double [BH, nblk, 3] and the band
// multiplicities w_hi, w_lo double [D] (else those pointers are not read).
template <typename T, int V, typename OUT>
__global__ void __launch_bounds__(256) pool_blocks(
    const T* __restrict__ x0, OUT* __restrict__ out0, double* __restrict__ st0, int nbh0, int S0,
    int nblk0, const T* __restrict__ x1, OUT* __restrict__ out1, double* __restrict__ st1,
    int S1, int nblk1, int D, int blk, int divide_true, int round, int stats,
    const double* __restrict__ w_hi, const double* __restrict__ w_lo) {
  extern __shared__ double pool_red[];  // [RG][D]
  __shared__ double red[8];
  const bool second = (int)blockIdx.y >= nbh0;
  const T* x = second ? x1 : x0;
  OUT* out = second ? out1 : out0;
  double* st = second ? st1 : st0;
  const int bh = second ? (int)blockIdx.y - nbh0 : (int)blockIdx.y;
  const int S = second ? S1 : S0, nblk = second ? nblk1 : nblk0;
  const int j = blockIdx.x, tid = threadIdx.x;
  if (j >= nblk) return;
  const int t0 = j * blk, t1 = min(S, t0 + blk);
  const T* xb = x + (size_t)bh * S * D;
  const int nv = D / V, RG = nv >= 256 ? 1 : 256 / nv;
  for (int w = tid; w < RG * nv; w += 256) {
    const int rg = w / nv, cv = w % nv;
    double acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.0;
#pragma unroll 4
    for (int t = t0 + rg; t < t1; t += RG) {
      double v[V];
      load_dbl<T, V>(xb + (size_t)t * D + cv * V, v);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] += v[e];
    }
#pragma unroll
    for (int e = 0; e < V; ++e) pool_red[rg * D + cv * V + e] = acc[e];
  }
  __syncthreads();
  const double cnt = divide_true ? (double)(t1 - t0) : (double)blk;
  double sa = 0.0, sh = 0.0, sl = 0.0;
  for (int d = tid; d < D; d += 256) {
    double s = 0.0;
    for (int g = 0; g < RG; ++g) s += pool_red[g * D + d];
    double m = s / cnt;
    if (round) m = round_to<T>(m);
    out[((size_t)bh * nblk + j) * D + d] = cast_out<OUT>(m);
    if (stats) {
      const double m2 = m * m;
      sa += m2;
      sh += w_hi[d] * m2;
      sl += w_lo[d] * m2;
    }
  }
  if (stats) {  // CTA-uniform
    sa = cta_sum<256>(sa, red);
    sh = cta_sum<256>(sh, red);
    sl = cta_sum<256>(sl, red);
    if (tid == 0) {
      double* o = st + ((size_t)bh * nblk + j) * 3;
      o[0] = sa;
      o[1] = sh;
      o[2] = sl;
    }
  }
}

// Grid (ceil(np / 8), BH), 256 threads: one warp per page.
template <typename T, typename OUT>
__global__ void __launch_bounds__(256) page_minmax(const T* __restrict__ k, OUT* __restrict__ M,
                                                   OUT* __restrict__ m, int S, int D, int P,
                                                   int np) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int p = blockIdx.x * 8 + warp, bh = blockIdx.y;
  if (p >= np) return;
  const int t0 = p * P, t1 = min(S, t0 + P);
  const T* kb = k + (size_t)bh * S * D;
  for (int d = lane; d < D; d += 32) {
    double hi = to_dbl(kb[(size_t)t0 * D + d]), lo = hi;
#pragma unroll 8
    for (int t = t0 + 1; t < t1; ++t) {
      const double v = to_dbl(kb[(size_t)t * D + d]);
      hi = fmax(hi, v);
      lo = fmin(lo, v);
    }
    M[((size_t)bh * np + p) * D + d] = cast_out<OUT>(hi);
    m[((size_t)bh * np + p) * D + d] = cast_out<OUT>(lo);
  }
}

#ifdef REFATTN_INSTANTIATE
// Compile-time check of every instantiation the launchers use (nvcc -DREFATTN_INSTANTIATE
// --resource-usage); NVRTC instantiates them by name instead.
template __global__ void pool_blocks<__nv_bfloat16, 8, double>(const __nv_bfloat16*, double*, double*, int, int, int, const __nv_bfloat16*, double*, double*, int, int, int, int, int, int, int, const double*, const double*);
template __global__ void pool_blocks<__nv_bfloat16, 8, __nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, double*, int, int, int, const __nv_bfloat16*, __nv_bfloat16*, double*, int, int, int, int, int, int, int, const double*, const double*);
template __global__ void pool_blocks<__half, 8, __half>(const __half*, __half*, double*, int, int, int, const __half*, __half*, double*, int, int, int, int, int, int, int, const double*, const double*);
template __global__ void pool_blocks<float, 4, double>(const float*, double*, double*, int, int, int, const float*, double*, double*, int, int, int, int, int, int, int, const double*, const double*);
template __global__ void pool_blocks<double, 1, double>(const double*, double*, double*, int, int, int, const double*, double*, double*, int, int, int, int, int, int, int, const double*, const double*);
template __global__ void page_minmax<__nv_bfloat16, __nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, int, int, int, int);
template __global__ void page_minmax<float, double>(const float*, double*, double*, int, int, int, int);
#endif
