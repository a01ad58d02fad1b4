// Row x column scoring kernels of MoBA and Quest (ops `moba_score`, `quest_score`), see
// gpu/scoring.py; the block means / page extrema they read come from gpu/score_pool.cu.
// Arrays are contiguous bhsd.
//
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
#include "common.cuh"
#include "pooled_common.cuh"

namespace refattn {

// Quest's split of a 16-bit pair register into its non-negative and negative parts
// (bitwise on the sign bits: exact, for fp16 and bf16 alike).
__device__ __forceinline__ unsigned neg_mask16x2(unsigned x) {
  return ((x >> 15) & 0x00010001u) * 0xFFFFu;
}

}  // namespace refattn

using namespace refattn;

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

#ifdef REFATTN_INSTANTIATE
// Compile-time check of every instantiation the launchers use (nvcc -DREFATTN_INSTANTIATE
// --resource-usage); NVRTC instantiates them by name instead.
template __global__ void rowcol_tc<__nv_bfloat16, 0, 128>(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, float*, int, int, int, int, int, int, int, int);
template __global__ void rowcol_tc<__nv_bfloat16, 1, 128>(const __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, float*, int, int, int, int, int, int, int, int);
template __global__ void rowcol_tc<__half, 0, 64>(const __half*, const __half*, const __half*, float*, int, int, int, int, int, int, int, int);
template __global__ void rowcol_tc<__half, 1, 64>(const __half*, const __half*, const __half*, float*, int, int, int, int, int, int, int, int);
template __global__ void rowcol<float, double, 0>(const float*, const double*, const double*, double*, int, int, int, int, int, int, int, int);
template __global__ void rowcol<__nv_bfloat16, float, 1>(const __nv_bfloat16*, const double*, const double*, float*, int, int, int, int, int, int, int, int);
template __global__ void quest_own_page<__nv_bfloat16, float>(const __nv_bfloat16*, const __nv_bfloat16*, float*, int, int, int, int, int, int, int, int, int);
template __global__ void quest_own<float, double>(const float*, const float*, double*, int, int, int, int, int, int, int);
#endif
