// Band scoring kernels of Prism (op `prism_score`), see gpu/scoring.py; the block means
// and their band statistics come from pool_blocks (gpu/score_pool.cu). Arrays are
// contiguous bhsd.
//
//   prism_scales     the calibrated (or fixed) band scales sigma = sqrt(dim) * t per head.
//   prism_band       one band of Prism: logits z = <q_I, k_J>_band / sigma over the band's
//                    dims and the row softmax, float64; one CTA per 64 query blocks of one
//                    head walks 64 x 64 (I, J) tiles in FFMA (causal tiles only), keeps the
//                    row max/sum online per lane, writes z once and reads it back (the thread
//                    that wrote it) for the probabilities.
#include "common.cuh"
#include "pooled_common.cuh"

using namespace refattn;

// ------------------------------------------------------------------ Prism
// Band scales per query head (grid B * Hq, 256 threads). stq double [B*Hq, nq, 3], stk
// double [B*Hkv, nk, 3] (pool_blocks' sums of squares: all dims, high band, low band, the
// bands with their multiplicities n_hi / n_lo dims). Writes sh, sl double [B*Hq]:
//   calibrate: t = sqrt(dim / D) * (rms(q_band) / max(rms(q), 1e-6)) * (rms(k_band) / max(rms(k), 1e-6))
//   else:      t = temp;                                          sigma = sqrt(dim) * t.
// (A template, instantiated as prism_scales<double>, so that NVRTC compiles it only when
// named: a plain __global__ function is compiled into every program of this file.)
template <typename F>
__global__ void __launch_bounds__(256) prism_scales(
    const F* __restrict__ stq, const F* __restrict__ stk, F* __restrict__ sh,
    F* __restrict__ sl, int Hq, int G, int nq, int nk, int D, int n_hi, int n_lo,
    int h_dim, int l_dim, int calibrate, double high_temp, double low_temp) {
  __shared__ double red[8];
  const int bh = blockIdx.x, b = bh / Hq, h = bh % Hq, Hkv = Hq / G;
  const int bhk = b * Hkv + h / G, tid = threadIdx.x;
  double th = high_temp, tl = low_temp;
  if (calibrate) {
    double s[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
    for (int j = tid; j < nq; j += 256)
      for (int c = 0; c < 3; ++c) s[c] += stq[((size_t)bh * nq + j) * 3 + c];
    for (int j = tid; j < nk; j += 256)
      for (int c = 0; c < 3; ++c) s[3 + c] += stk[((size_t)bhk * nk + j) * 3 + c];
#pragma unroll
    for (int c = 0; c < 6; ++c) s[c] = cta_sum<256>(s[c], red);
    const double rq = fmax(sqrt(s[0] / ((double)nq * D)), 1e-6);
    const double rk = fmax(sqrt(s[3] / ((double)nk * D)), 1e-6);
    const double qh = sqrt(s[1] / ((double)nq * n_hi)), kh = sqrt(s[4] / ((double)nk * n_hi));
    const double ql = sqrt(s[2] / ((double)nq * n_lo)), kl = sqrt(s[5] / ((double)nk * n_lo));
    th = sqrt((double)h_dim / D) * (qh / rq) * (kh / rk);
    tl = sqrt((double)l_dim / D) * (ql / rq) * (kl / rk);
  }
  if (tid == 0) {
    sh[bh] = sqrt((double)h_dim) * th;
    sl[bh] = sqrt((double)l_dim) * tl;
  }
}

constexpr int PR_R = 64;   // query blocks per CTA (8 warps x 8 consecutive rows)
constexpr int PR_C = 64;   // key blocks per tile (2 per lane)
constexpr int PR_DC = 16;  // band dims per shared-memory slice
constexpr int PR_LDQ = PR_R + 2;  // even: a thread's 8 rows load as 4 double2
constexpr int PR_LDK = PR_C + 1;

// Online (max, sum) of exp over one lane's logits of a row; NaN / +inf make the row dead.
__device__ __forceinline__ void online_add(double z, double& m, double& l, bool& bad) {
  if (z != z || z == __longlong_as_double(0x7ff0000000000000ULL)) {  // NaN or +inf
    bad = true;
  } else if (z > m) {
    l = l * exp(m - z) + 1.0;  // m = -inf: exp(-inf) = 0
    m = z;
  } else if (z != dbl_neg_inf()) {
    l += exp(z - m);
  }
}

// One band: z[I, J] = sum_e qb[I, dims[e]] kb[J, dims[e]] / sig for J <= I + nk - nq (-inf
// after), p = row softmax of z (0 for a row whose maximum is not finite).
// qb double [B*Hq, nq, D], kb double [B*Hkv, nk, D]; dims int [nd] (the band, duplicates
// included, as the reference's fancy index); sig double [B*Hq]; z, p double [B*Hq, nq, nk].
// Grid (ceil(nq / 64), B * Hq), 256 threads. Thread (ty = warp, tx = lane) owns rows
// i0 + 8 ty + r (r < 8) and columns j0 + tx + 32 c (c < 2) of every 64 x 64 tile: a row lives
// in one warp, so its softmax statistics need only warp shuffles.
// Instantiated as prism_band<double> (see prism_scales).
template <typename F>
__global__ void __launch_bounds__(256, 2) prism_band(
    const F* __restrict__ qb, const F* __restrict__ kb, const int* __restrict__ dims,
    int nd, const F* __restrict__ sig, F* __restrict__ z, F* __restrict__ p,
    int Hq, int G, int nq, int nk, int D) {
  static_assert(sizeof(F) == sizeof(double), "prism_band is float64");
  __shared__ __align__(16) double sq[PR_DC][PR_LDQ];
  __shared__ double sk[PR_DC][PR_LDK];
  const int tid = threadIdx.x, tx = tid & 31, ty = tid >> 5;
  const int i0 = blockIdx.x * PR_R, bh = blockIdx.y;
  const int b = bh / Hq, h = bh % Hq, Hkv = Hq / G;
  const double* qh = qb + (size_t)bh * nq * D;
  const double* kh = kb + ((size_t)b * Hkv + h / G) * nk * D;
  const double s = sig[bh];
  const double NINF = dbl_neg_inf();
  const int off = nk - nq;  // column J is visible from row I iff J <= I + off
  const int jlast = min(nk - 1, i0 + PR_R - 1 + off);
  const int ncomp = jlast >= 0 ? jlast / PR_C + 1 : 0;
  const int ntile = (nk + PR_C - 1) / PR_C;
  const size_t obase = (size_t)bh * nq * nk;
  const int rb = i0 + ty * 8;  // this warp's first row

  double m[8], l[8];
  bool bad[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    m[r] = NINF;
    l[r] = 0.0;
    bad[r] = false;
  }

  // ---- pass 1: logits, written out, and per-lane online softmax statistics
#pragma unroll 1
  for (int jt = 0; jt < ncomp; ++jt) {
    const int j0 = jt * PR_C;
    double a[8][2];
#pragma unroll
    for (int r = 0; r < 8; ++r) a[r][0] = a[r][1] = 0.0;
#pragma unroll 1
    for (int e0 = 0; e0 < nd; e0 += PR_DC) {
      __syncthreads();
#pragma unroll
      for (int x = tid; x < PR_R * PR_DC; x += 256) {
        const int r = x / PR_DC, dd = x % PR_DC, i = i0 + r, e = e0 + dd;
        sq[dd][r] = (i < nq && e < nd) ? qh[(size_t)i * D + dims[e]] : 0.0;
      }
#pragma unroll
      for (int x = tid; x < PR_C * PR_DC; x += 256) {
        const int c = x / PR_DC, dd = x % PR_DC, j = j0 + c, e = e0 + dd;
        sk[dd][c] = (j < nk && e < nd) ? kh[(size_t)j * D + dims[e]] : 0.0;
      }
      __syncthreads();
#pragma unroll
      for (int dd = 0; dd < PR_DC; ++dd) {
        const double k0 = sk[dd][tx], k1 = sk[dd][tx + 32];
        const double2* qv2 = reinterpret_cast<const double2*>(&sq[dd][ty * 8]);
#pragma unroll
        for (int r2 = 0; r2 < 4; ++r2) {
          const double2 qv = qv2[r2];
          a[2 * r2][0] = fma(qv.x, k0, a[2 * r2][0]);
          a[2 * r2][1] = fma(qv.x, k1, a[2 * r2][1]);
          a[2 * r2 + 1][0] = fma(qv.y, k0, a[2 * r2 + 1][0]);
          a[2 * r2 + 1][1] = fma(qv.y, k1, a[2 * r2 + 1][1]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int i = rb + r;
      if (i >= nq) continue;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int j = j0 + tx + 32 * c;
        if (j >= nk) continue;
        const double v = j <= i + off ? a[r][c] / s : NINF;
        z[obase + (size_t)i * nk + j] = v;
        online_add(v, m[r], l[r], bad[r]);
      }
    }
  }
  // tiles after the last visible column of every row of the CTA
#pragma unroll 1
  for (int jt = ncomp; jt < ntile; ++jt) {
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int i = rb + r;
      if (i >= nq) continue;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int j = jt * PR_C + tx + 32 * c;
        if (j >= nk) continue;
        z[obase + (size_t)i * nk + j] = NINF;
        p[obase + (size_t)i * nk + j] = 0.0;
      }
    }
  }

  // ---- row statistics: merge the 32 lanes of the row's warp
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    double mx = m[r];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmax(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    double part = (m[r] == NINF) ? 0.0 : l[r] * exp(m[r] - mx);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    // live: a finite row maximum (no NaN, no +inf); else probabilities 0 (the reference's
    // `live`, the official nan_to_num)
    bad[r] = __any_sync(0xffffffffu, bad[r]) || mx == NINF;
    m[r] = mx;
    l[r] = part;
  }

  // ---- pass 2: probabilities from the logits this thread wrote
#pragma unroll 1
  for (int jt = 0; jt < ncomp; ++jt) {
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int i = rb + r;
      if (i >= nq) continue;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int j = jt * PR_C + tx + 32 * c;
        if (j >= nk) continue;
        const size_t o = obase + (size_t)i * nk + j;
        p[o] = bad[r] ? 0.0 : exp(z[o] - m[r]) / l[r];
      }
    }
  }
}

#ifdef REFATTN_INSTANTIATE
// Compile-time check of every instantiation the launchers use (nvcc -DREFATTN_INSTANTIATE
// --resource-usage); NVRTC instantiates them by name instead.
template __global__ void prism_scales<double>(const double*, const double*, double*, double*, int, int, int, int, int, int, int, int, int, int, double, double);
template __global__ void prism_band<double>(const double*, const double*, const int*, int, const double*, double*, double*, int, int, int, int, int);
#endif
