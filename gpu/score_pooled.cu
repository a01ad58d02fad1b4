// Pooled-key scoring kernels (ops `moba_score`, `quest_score`, `prism_score`), see
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
//   rowcol_tc<T, MODE, D>  (bf16/fp16, D in {64, 128}) tensor cores, fp32 out [B, Hq, Sq, N]:
//                    MODE 0: <q_r, A_c> (MoBA gate, A = the block means in T);
//                    MODE 1: sum_d max(q_d M_cd, q_d m_cd) = q+ . M_c + q- . m_c (Quest's bound,
//                    q+ / q- the positive / negative parts of q taken bitwise from the
//                    fragments; with `causal` pages after the row's own page get -inf).
//                    CTA: 4 warps, 128 rows (Q held in registers), 64-column tiles of A
//                    (and m) streamed through a cp.async double buffer; a grid column walks
//                    `tiles_per_cta` column tiles.
//   rowcol<T, ACC, MODE>  the same in FFMA for every other dtype/head dim (ACC = double for
//                    fp32/fp64 inputs): 64 x 64 output tile per CTA, 4 x 4 outputs per thread.
//   quest_own_page<T, ACC> (causal Quest, D <= 256) the own page of every row bounded over
//                    keys [cP, t] only: one warp per (page, query head) keeps the running
//                    max/min of the page's keys in registers and emits each row as its key
//                    position t passes. quest_own<T, ACC>: the same, one warp per row, any D.
//   prism_scales     the calibrated (or fixed) band scales sigma = sqrt(dim) * t per head.
//   prism_band       one band of Prism: logits z = <q_I, k_J>_band / sigma over the band's
//                    dims and the row softmax, float64; one CTA per 64 query blocks of one
//                    head walks 64 x 64 (I, J) tiles in FFMA (causal tiles only), keeps the
//                    row max/sum online per lane, writes z once and reads it back (the thread
//                    that wrote it) for the probabilities.
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

// Quest's split of a 16-bit pair register into its non-negative and negative parts
// (bitwise on the sign bits: exact, for fp16 and bf16 alike).
__device__ __forceinline__ unsigned neg_mask16x2(unsigned x) {
  return ((x >> 15) & 0x00010001u) * 0xFFFFu;
}

}  // namespace refattn

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

// ------------------------------------------------------------------ tensor-core row x column
constexpr int RT_BM = 128;  // rows per CTA (4 warps x 32)
constexpr int RT_BN = 64;   // columns per tile

// q [B, Hq, Sq, D] (T); A (and Bm for MODE 1) T [B, Hkv, N, D]; out float [B, Hq, Sq, N].
// Grid (ceil(Sq / 128), ceil(ceil(N / 64) / tiles_per_cta), B * Hq), 128 threads, dynamic
// shared memory (128 + 2 * NB * 64) * (D + 8) * sizeof(T).
template <typename T, int MODE, int D>
__global__ void __launch_bounds__(128) rowcol_tc(
    const T* __restrict__ q, const T* __restrict__ A, const T* __restrict__ Bm,
    float* __restrict__ out, int Hq, int G, int Sq, int Sk, int N, int P, int causal,
    int tiles_per_cta) {
  constexpr int BM = RT_BM, BN = RT_BN, LD = D + 8, NB = MODE == 1 ? 2 : 1, KS = D / 16;
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sB = sQ + BM * LD;                    // [2][NB][BN][LD]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r0 = blockIdx.x * BM, bh = blockIdx.z, b = bh / Hq, h = bh % Hq, Hkv = Hq / G;
  const T* qb = q + (size_t)bh * Sq * D;
  const size_t kvo = ((size_t)b * Hkv + h / G) * (size_t)N * D;
  const T* ab = A + kvo;
  const T* bb = MODE == 1 ? Bm + kvo : A + kvo;
  const int nct = (N + BN - 1) / BN;
  const int ct0 = blockIdx.y * tiles_per_cta, ct1 = min(nct, ct0 + tiles_per_cta);
  if (ct0 >= ct1) return;
  // Column tiles [ct0, ctc) are computed; [ctc, ct1) lie wholly after the own page of every
  // row of the CTA (causal Quest) and are -inf.
  int ctc = ct1;
  if (MODE == 1 && causal) {
    const long long pmax = (long long)min(r0 + BM, Sq) - 1 + Sk - Sq;  // last key position
    const long long last = pmax >= 0 ? pmax / P / BN : -1;
    ctc = (int)max((long long)ct0, min((long long)ct1, last + 1));
  }
  const int ncomp = ctc - ct0;

  if (ncomp > 0) {
#pragma unroll 1
    for (int x = tid; x < BM * CPR; x += 128) {
      const int r = x / CPR, c = (x % CPR) * 8;
      const bool ok = r0 + r < Sq;
      cp_async16(sQ + r * LD + c, ok ? qb + (size_t)(r0 + r) * D + c : qb, ok);
    }
  }
  auto fetch_cols = [&](int ct, int buf) {
    T* dst = sB + buf * NB * BN * LD;
#pragma unroll 1
    for (int x = tid; x < NB * BN * CPR; x += 128) {
      const int mat = x / (BN * CPR), y = x % (BN * CPR);
      const int r = y / CPR, c = (y % CPR) * 8;
      const int col = ct * BN + r;
      const bool ok = col < N;
      const T* src = mat ? bb : ab;
      cp_async16(dst + (mat * BN + r) * LD + c, ok ? src + (size_t)col * D + c : src, ok);
    }
  };
  if (ncomp > 0) fetch_cols(ct0, 0);
  cp_async_commit();

  unsigned qa[2][KS][4];
  float acc[2][8][4];
  const bool even = (N & 1) == 0;
#pragma unroll 1
  for (int it = 0; it < ncomp; ++it) {
    const int buf = it & 1, ct = ct0 + it;
    if (it + 1 < ncomp) {
      fetch_cols(ct + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (it == 0) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
          load_a<false>(qa[mt][ks], sQ + (warp * 32 + mt * 16) * LD, LD, ks * 16, lane);
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
    const T* tA = sB + buf * NB * BN * LD;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
      if constexpr (MODE == 0) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          unsigned bf[4];
          load_b<false>(bf, tA, LD, np * 16, ks * 16, lane);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816<T>(acc[mt][2 * np], qa[mt][ks], bf[0], bf[1]);
            mma16816<T>(acc[mt][2 * np + 1], qa[mt][ks], bf[2], bf[3]);
          }
        }
      } else {
        unsigned ap[2][4], an[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const unsigned x = qa[mt][ks][e], neg = neg_mask16x2(x);
            ap[mt][e] = x & ~neg;
            an[mt][e] = x & neg;
          }
        const T* tB = tA + BN * LD;
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          unsigned bM[4], bm[4];
          load_b<false>(bM, tA, LD, np * 16, ks * 16, lane);
          load_b<false>(bm, tB, LD, np * 16, ks * 16, lane);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma16816<T>(acc[mt][2 * np], ap[mt], bM[0], bM[1]);
            mma16816<T>(acc[mt][2 * np + 1], ap[mt], bM[2], bM[3]);
            mma16816<T>(acc[mt][2 * np], an[mt], bm[0], bm[1]);
            mma16816<T>(acc[mt][2 * np + 1], an[mt], bm[2], bm[3]);
          }
        }
      }
    }
    __syncthreads();  // buffer `buf` is refilled by the next iteration's prefetch

    // ---- store: row = r0 + warp*32 + mt*16 + lane/4 + 8*hf, col = ct*64 + nt*8 + 2*(lane%4) + e
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = r0 + warp * 32 + mt * 16 + (lane >> 2) + 8 * hf;
        if (row >= Sq) continue;
        const long long pos = (long long)row + Sk - Sq;
        const long long own = pos >= 0 ? pos / P : -1;
        float* orow = out + ((size_t)bh * Sq + row) * N;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          const int col = ct * BN + nt * 8 + (lane & 3) * 2;
          if (col >= N) continue;
          float v0 = acc[mt][nt][2 * hf], v1 = acc[mt][nt][2 * hf + 1];
          if (MODE == 1 && causal) {
            if (col > own) v0 = -REFATTN_INF;
            if (col + 1 > own) v1 = -REFATTN_INF;
          }
          if (even) {
            __stcs(reinterpret_cast<float2*>(orow + col), make_float2(v0, v1));
          } else {
            __stcs(orow + col, v0);
            if (col + 1 < N) __stcs(orow + col + 1, v1);
          }
        }
      }
    }
  }
  if (MODE == 1 && ctc < ct1) {  // whole tiles after every row's own page
    const int rows = min(BM, Sq - r0);
#pragma unroll 1
    for (int ct = ctc; ct < ct1; ++ct) {
      const int cols = min(BN, N - ct * BN);
#pragma unroll 4
      for (int x = tid; x < rows * BN; x += 128) {
        const int r = x / BN, c = x % BN;
        if (c < cols) __stcs(out + ((size_t)bh * Sq + r0 + r) * N + ct * BN + c, -REFATTN_INF);
      }
    }
  }
}

// ------------------------------------------------------------------ FFMA row x column
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

// ------------------------------------------------------------------ Quest's own page
// Causal Quest: the own page p of row r (key position t = r + Sk - Sq >= 0) is bounded over
// keys [pP, t]. Grid (ceil((p_hi - p_lo + 1) / 4), B * Hq), 128 threads: one warp per
// (page, query head), D <= 256 (each lane holds dims lane + 32 e, e < 8).
template <typename T, typename ACC>
__global__ void __launch_bounds__(128) quest_own_page(
    const T* __restrict__ q, const T* __restrict__ k, ACC* __restrict__ U, int Hq, int G,
    int Sq, int Sk, int D, int P, int np, int p_lo, int p_hi) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int p = p_lo + blockIdx.x * 4 + warp, bh = blockIdx.y;
  if (p > p_hi) return;
  const int b = bh / Hq, h = bh % Hq, Hkv = Hq / G;
  const T* kb = k + ((size_t)b * Hkv + h / G) * Sk * D;
  const T* qb = q + (size_t)bh * Sq * D;
  const long long off = (long long)Sk - Sq;  // row r sits at key position r + off
  const int u0 = p * P, u1 = min(Sk, u0 + P);
  double hi[8], lo[8];
#pragma unroll 1
  for (int u = u0; u < u1; ++u) {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int d = lane + 32 * e;
      if (d < D) {
        const double v = to_dbl(kb[(size_t)u * D + d]);
        hi[e] = u == u0 ? v : fmax(hi[e], v);
        lo[e] = u == u0 ? v : fmin(lo[e], v);
      }
    }
    const long long r = (long long)u - off;
    if (r < 0 || r >= Sq) continue;  // warp-uniform
    const T* qr = qb + (size_t)r * D;
    double s = 0.0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int d = lane + 32 * e;
      if (d < D) {
        const double qv = to_dbl(qr[d]);
        s += qv > 0.0 ? qv * hi[e] : qv * lo[e];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) U[((size_t)bh * Sq + r) * np + p] = (ACC)s;
  }
}

// The same for any D, one warp per row (grid (ceil(Sq / 4), B * Hq), 128 threads).
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
template __global__ void pool_blocks<__nv_bfloat16, 8, double>(const __nv_bfloat16*, double*, double*, int, int, int, const __nv_bfloat16*, double*, double*, int, int, int, int, int, int, int, const double*, const double*);
template __global__ void pool_blocks<__nv_bfloat16, 8, __nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, double*, int, int, int, const __nv_bfloat16*, __nv_bfloat16*, double*, int, int, int, int, int, int, int, const double*, const double*);
template __global__ void pool_blocks<__half, 8, __half>(const __half*, __half*, double*, int, int, int, const __half*, __half*, double*, int, int, int, int, int, int, int, const double*, const double*);
template __global__ void pool_blocks<float, 4, double>(const float*, double*, double*, int, int, int, const float*, double*, double*, int, int, int, int, int, int, int, const double*, const double*);
template __global__ void pool_blocks<double, 1, double>(const double*, double*, double*, int, int, int, const double*, double*, double*, int, int, int, int, int, int, int, const double*, const double*);
template __global__ void page_minmax<__nv_bfloat16, __nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*, int, int, int, int);
template __global__ void page_minmax<float, double>(const float*, double*, double*, int, int, int, int);
template __global__ void rowcol_tc<__nv_bfloat16, 0, 128>(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, float*, int, int, int, int, int, int, int, int);
template __global__ void rowcol_tc<__nv_bfloat16, 1, 128>(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, float*, int, int, int, int, int, int, int, int);
template __global__ void rowcol_tc<__half, 0, 64>(const __half*, const __half*, const __half*, float*, int, int, int, int, int, int, int, int);
template __global__ void rowcol_tc<__half, 1, 64>(const __half*, const __half*, const __half*, float*, int, int, int, int, int, int, int, int);
template __global__ void rowcol<float, double, 0>(const float*, const double*, const double*, double*, int, int, int, int, int, int, int, int);
template __global__ void rowcol<__nv_bfloat16, float, 1>(const __nv_bfloat16*, const double*, const double*, float*, int, int, int, int, int, int, int, int);
template __global__ void quest_own_page<__nv_bfloat16, float>(const __nv_bfloat16*, const __nv_bfloat16*, float*, int, int, int, int, int, int, int, int, int);
template __global__ void quest_own<float, double>(const float*, const float*, double*, int, int, int, int, int, int, int);
template __global__ void prism_scales<double>(const double*, const double*, double*, double*, int, int, int, int, int, int, int, int, int, int, double, double);
template __global__ void prism_band<double>(const double*, const double*, const int*, int, const double*, double*, double*, int, int, int, int, int);
#endif
