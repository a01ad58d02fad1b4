// Pooled-key scoring kernels (ops `moba_score`, `quest_score`, `prism_score`), see
// gpu/scoring.py. Arrays are contiguous bhsd; pooled statistics are float64.
//
//   pool_mean<T>     block means of x [B, H, S, D] -> out double [B, H, nblk, D]; divided by
//                    the block's true length (MoBA) or by the full block (Prism's zero pad);
//                    optionally rounded to T (MoBA stores the mean in the input dtype).
//   page_minmax<T>   Quest's per-page channel max/min over the page's real keys.
//   rowcol<T, ACC, MODE>  out[b, h, r, c] for every query row r and column c (block/page):
//                    MODE 0: <q_r, A_c> (MoBA gate); MODE 1: sum_d max(q_d A_cd, q_d B_cd)
//                    (Quest's bound; with `causal`, pages after the row's own page get -inf).
//                    64 x 64 output tile per CTA, 256 threads, 4 x 4 outputs per thread,
//                    ACC (float or double) accumulation.
//   quest_own<T, ACC> (causal Quest) the row's own page bounded over keys [cP, t] only.
#include "common.cuh"

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

template <typename ACC> __device__ __forceinline__ ACC neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -REFATTN_INF; }
template <> __device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(0xfff0000000000000ULL);
}

}  // namespace refattn

using namespace refattn;

template <typename T>
__global__ void pool_mean(const T* __restrict__ x, double* __restrict__ out, int S, int D,
                          int blk, int nblk, int divide_true, int round) {
  const int j = blockIdx.x, bh = blockIdx.y;
  const int t0 = j * blk, t1 = min(S, t0 + blk);
  const T* xb = x + (size_t)bh * S * D;
  const double cnt = divide_true ? (double)(t1 - t0) : (double)blk;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    double s = 0.0;
    for (int t = t0; t < t1; ++t) s += to_dbl(xb[(size_t)t * D + d]);
    double m = s / cnt;
    if (round) m = round_to<T>(m);
    out[((size_t)bh * nblk + j) * D + d] = m;
  }
}

template <typename T>
__global__ void page_minmax(const T* __restrict__ k, double* __restrict__ M,
                            double* __restrict__ m, int S, int D, int P, int np) {
  const int p = blockIdx.x, bh = blockIdx.y;
  const int t0 = p * P, t1 = min(S, t0 + P);
  const T* kb = k + (size_t)bh * S * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    double hi = to_dbl(kb[(size_t)t0 * D + d]), lo = hi;
    for (int t = t0 + 1; t < t1; ++t) {
      const double v = to_dbl(kb[(size_t)t * D + d]);
      hi = fmax(hi, v);
      lo = fmin(lo, v);
    }
    M[((size_t)bh * np + p) * D + d] = hi;
    m[((size_t)bh * np + p) * D + d] = lo;
  }
}

constexpr int RC_T = 64;   // output tile edge
constexpr int RC_DC = 16;  // head-dim slice held in shared memory

// q [B, Hq, Sq, D] (T); A, Bm double [B, Hkv, N, D]; out ACC [B, Hq, Sq, N].
template <typename T, typename ACC, int MODE>
__global__ void __launch_bounds__(256) rowcol(
    const T* __restrict__ q, const double* __restrict__ A, const double* __restrict__ Bm,
    ACC* __restrict__ out, int Hq, int G, int Sq, int Sk, int N, int D, int P, int causal) {
  __shared__ ACC sq[RC_T][RC_DC + 1];
  __shared__ ACC sa[RC_T][RC_DC + 1];
  __shared__ ACC sb[MODE == 1 ? RC_T : 1][RC_DC + 1];
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int c0 = blockIdx.x * RC_T, r0 = blockIdx.y * RC_T;
  const int bh = blockIdx.z, b = bh / Hq, h = bh % Hq, g = h / G;
  const int Hkv = Hq / G;
  const T* qb = q + (size_t)bh * Sq * D;
  const double* ab = A + ((size_t)b * Hkv + g) * N * D;
  const double* bb = MODE == 1 ? Bm + ((size_t)b * Hkv + g) * N * D : nullptr;
  ACC acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = ACC(0);
#pragma unroll 1
  for (int d0 = 0; d0 < D; d0 += RC_DC) {
    for (int x = tid; x < RC_T * RC_DC; x += 256) {
      const int r = x / RC_DC, d = x % RC_DC;
      const bool okd = d0 + d < D;
      sq[r][d] = (okd && r0 + r < Sq) ? (ACC)to_dbl(qb[(size_t)(r0 + r) * D + d0 + d]) : ACC(0);
      const bool okc = okd && c0 + r < N;
      sa[r][d] = okc ? (ACC)ab[(size_t)(c0 + r) * D + d0 + d] : ACC(0);
      if (MODE == 1) sb[r][d] = okc ? (ACC)bb[(size_t)(c0 + r) * D + d0 + d] : ACC(0);
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < RC_DC; ++d) {
      ACC qv[4], av[4], bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) qv[r] = sq[ty + 16 * r][d];
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        av[c] = sa[tx + 16 * c][d];
        if (MODE == 1) bv[c] = sb[tx + 16 * c][d];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (MODE == 0) acc[r][c] += qv[r] * av[c];
          else acc[r][c] += qv[r] > ACC(0) ? qv[r] * av[c] : qv[r] * bv[c];
        }
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int row = r0 + ty + 16 * r;
    if (row >= Sq) continue;
    const long long pos = (long long)row + Sk - Sq;
    const long long own = pos >= 0 ? pos / P : -1;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int col = c0 + tx + 16 * c;
      if (col >= N) continue;
      ACC v = acc[r][c];
      if (MODE == 1 && causal && col > own) v = neg_inf<ACC>();
      out[((size_t)bh * Sq + row) * N + col] = v;
    }
  }
}

// Causal Quest: the own page of row r (key position t = r + Sk - Sq >= 0) is bounded over
// keys [cP, t]; one warp per row.
template <typename T, typename ACC>
__global__ void __launch_bounds__(128) quest_own(const T* __restrict__ q, const T* __restrict__ k,
                                                 ACC* __restrict__ U, int Hq, int G, int Sq,
                                                 int Sk, int D, int P, int np) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * 4 + warp, bh = blockIdx.y;
  if (row >= Sq) return;
  const long long t = (long long)row + Sk - Sq;
  if (t < 0) return;
  const int b = bh / Hq, h = bh % Hq, Hkv = Hq / G;
  const long long p = t / P;
  const T* qr = q + ((size_t)bh * Sq + row) * D;
  const T* kb = k + ((size_t)b * Hkv + h / G) * Sk * D;
  double s = 0.0;
  for (int d = lane; d < D; d += 32) {
    double hi = to_dbl(kb[(size_t)(p * P) * D + d]), lo = hi;
    for (long long u = p * P + 1; u <= t; ++u) {
      const double v = to_dbl(kb[(size_t)u * D + d]);
      hi = fmax(hi, v);
      lo = fmin(lo, v);
    }
    const double qv = to_dbl(qr[d]);
    s += qv > 0.0 ? qv * hi : qv * lo;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) U[((size_t)bh * Sq + row) * np + p] = (ACC)s;
}
