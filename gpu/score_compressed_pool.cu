// Pooling kernels of NSA, ProxyAttn and PBS-Attn (float64 sums), see
// gpu/scoring_compressed.py: win_mean (window / block means: NSA's pooled keys, the pooled
// q/k of `pbs_score`), head_mean (means over query or kv heads of every step-th row:
// ProxyAttn's proxy heads at the kept rows / keys), pooled_softmax (masked row softmax of
// pooled logits: pbs_score).
#include "common.cuh"
#include "exact_f64.cuh"

namespace refattn {

// A float64 mean stored as the output type: float64 as is; 16-bit types as hi (rounded)
// and, with `split`, lo = rounded remainder at o[D + d].
__device__ __forceinline__ void store_mean(double* o, int d, int, double m, int) { o[d] = m; }
template <typename T>
__device__ __forceinline__ void store_split(T* o, int d, int D, double m, int split) {
  const T hi = from_float<T>((float)m);
  o[d] = hi;
  if (split) o[D + d] = from_float<T>((float)(m - (double)to_float<T>(hi)));
}
__device__ __forceinline__ void store_mean(__half* o, int d, int D, double m, int split) {
  store_split<__half>(o, d, D, m, split);
}
__device__ __forceinline__ void store_mean(__nv_bfloat16* o, int d, int D, double m, int split) {
  store_split<__nv_bfloat16>(o, d, D, m, split);
}

}  // namespace refattn

using namespace refattn;

// =================================================================== pooling
// out[bh, j] = sum_{t in [j*step, min(S, j*step + win))} x[bh, t] / (true length or win),
// summed in float64; O = double, or the 16-bit input type (hi, and lo at column D + d
// when `split`; row stride 2D then). Grid (n, B*H).
template <typename T, typename O>
__global__ void win_mean(const T* __restrict__ x, O* __restrict__ out, int S, int D, int win,
                         int step, int n, int div_true, int split) {
  const int j = blockIdx.x;
  const size_t bh = blockIdx.y;
  const int t0 = j * step, t1 = min(S, t0 + win);
  const T* xb = x + bh * S * D;
  const double cnt = div_true ? (double)(t1 - t0) : (double)win;
  O* ob = out + (bh * n + j) * (size_t)(split ? 2 * D : D);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    double s = 0.0;
    for (int t = t0; t < t1; ++t) s += to_dbl(xb[(size_t)t * D + d]);
    store_mean(ob, d, D, s / cnt, split);
  }
}

// out[b, c, j] (j < n) = mean over heads h0..h1 of x[b, h, j*step], h0 = c*mul/dv,
// h1 = ((c+1)*mul - 1)/dv (query heads: mul = group_size, dv = 1; kv heads: dv = Hq/Hkv);
// x [B, H, S, D], (n - 1)*step < S. Grid (ceil(n*D/256), C, B).
template <typename T, typename O>
__global__ void __launch_bounds__(256) head_mean(const T* __restrict__ x, O* __restrict__ out,
                                                 int H, int S, int D, int C, int mul, int dv,
                                                 int split, int step, int n) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long long)n * D) return;
  const int c = blockIdx.y, b = blockIdx.z;
  const int h0 = c * mul / dv, h1 = ((c + 1) * mul - 1) / dv;
  const long long j = idx / D;
  const int d = (int)(idx - j * D);
  const size_t src = (size_t)j * step * D + d;
  double s = 0.0;
  for (int h = h0; h <= h1; ++h) s += to_dbl(x[((size_t)b * H + h) * (size_t)S * D + src]);
  O* ob = out + (((size_t)b * C + c) * n + j) * (size_t)(split ? 2 * D : D);
  store_mean(ob, d, D, s / (double)(h1 - h0 + 1), split);
}

// Masked row softmax of pooled logits z double [rows = B*H*nq, nk] (times `scale`), float64.
// MODE 0: legal blocks (causal: J*bs <= last row of I + Sk - Sq); a row without one is 0
//   (no caller since ProxyAttn's budget became token-level). MODE 1 (pbs_score): allowed iff
//   I/mseg != J/mseg and J <= I; a row without one is NaN. One warp per row.
template <int MODE>
__global__ void __launch_bounds__(128) pooled_softmax(
    const double* __restrict__ z, double* __restrict__ out, int nq, int nk, int Sq, int Sk, int bs,
    int mseg, int causal, double scale, long long nrows) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long r = (long long)blockIdx.x * 4 + warp;
  if (r >= nrows) return;
  const int I = (int)(r % nq);
  const double* zr = z + r * nk;
  double* o = out + r * nk;
  const long long qe = (long long)min(Sq, (I + 1) * bs) - 1 + (Sk - Sq);
  auto ok = [&](int J) -> bool {
    if (MODE == 0) return !causal || (long long)J * bs <= qe;
    return (I / mseg != J / mseg) && J <= I;
  };
  double m = neg_inf_d();
  for (int J = lane; J < nk; J += 32)
    if (ok(J)) m = fmax(m, zr[J] * scale);
  m = warp_max_d(m);
  if (m == neg_inf_d()) {
    const double fill = MODE == 0 ? 0.0 : __longlong_as_double(0x7ff8000000000000ULL);
    for (int J = lane; J < nk; J += 32) o[J] = fill;
    return;
  }
  double s = 0.0;
  for (int J = lane; J < nk; J += 32)
    if (ok(J)) s += exp(zr[J] * scale - m);
  s = warp_sum_d(s);
  for (int J = lane; J < nk; J += 32) o[J] = ok(J) ? exp(zr[J] * scale - m) / s : 0.0;
}

#ifdef REFATTN_INSTANTIATE_ALL
// Compile check of every template the launchers use (nvcc -DREFATTN_INSTANTIATE_ALL ...).
#define EX_T(T) \
  template __global__ void win_mean<T, double>(const T*, double*, int, int, int, int, int, int, int); \
  template __global__ void head_mean<T, double>(const T*, double*, int, int, int, int, int, int, int, int, int);
EX_T(float) EX_T(double) EX_T(__half) EX_T(__nv_bfloat16)
template __global__ void win_mean<__half, __half>(const __half*, __half*, int, int, int, int, int, int, int);
template __global__ void win_mean<__nv_bfloat16, __nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, int, int, int);
template __global__ void head_mean<__half, __half>(const __half*, __half*, int, int, int, int, int, int, int, int, int);
template __global__ void head_mean<__nv_bfloat16, __nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, int, int, int, int, int);
template __global__ void pooled_softmax<0>(const double*, double*, int, int, int, int, int, int, int, double, long long);
template __global__ void pooled_softmax<1>(const double*, double*, int, int, int, int, int, int, int, double, long long);
#endif
