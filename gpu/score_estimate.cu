// Scoring kernels of three LLM-prefill estimators (ops `bsfa_score`, `minference_score`,
// `flexprefill_score`), see gpu/scoring_estimate.py. Arrays are contiguous bhsd: q
// [B, Hq, Sq, D], k [B, Hkv, Sk, D]; query head h reads kv head h / G (G = Hq / Hkv).
//
// BSFA: tile maxima Mx[b, h, m, n] = max over the real tokens of the (block_q x block_k)
// tile (m, n) of scale * q . k; with `causal` the tiles holding no visible pair
// (bottom-right aligned: key j visible to row i iff j <= i + Sk - Sq) stay -inf and are
// not computed; legal tiles keep the unmasked maximum over the whole tile.
//   * bsfa_mma<T, D, NEG, MINB> (bf16/fp16, D % 16 == 0 and <= 128, block_q % 16 == 0,
//     block_k % 8 == 0): a tensor-core tile GEMM with a max epilogue. One CTA (4 warps)
//     owns 128 query rows, keeps their Q fragments in registers and walks 64-key tiles of K
//     (cp.async double buffering, mma.sync m16n8k16, fp32 accumulate). Per tile each thread
//     takes the max of its accumulators per n8 column slab, runs of slabs in one key block
//     are merged, and one warp max (5 shuffles) per (row block, key block) goes to global
//     memory with an integer atomic max (the output starts at -inf). NEG (scale < 0) takes
//     the max of -q.k; the result is |scale| * max.
//   * bsfa_exact<T> (any dtype or geometry): 64 x 64 logit tiles in float64 FFMA, segment
//     maxima in shared memory, one float64 atomic max per (tile, block) pair.
//
// Vertical / slash estimates (MInference; FlexPrefill with div = ell): the last `ell`
// query rows e = 0..ell-1 (query row Sq - ell + e, key position p_e = Sk - ell + e) take a
// causal softmax of scale * q . k over keys j <= p_e; vertical[j] = sum_e P[e, j] / div,
// slash[o] = sum_e P[e, p_e - o] / div. No [ell x Sk] array is stored:
//   * vs_stats<T, D, BM>  (tensor cores) CTA = (key chunk, row tile of BM rows, b*h): per
//     row the chunk maximum and the chunk sum of exp2 (online over the 64-key tiles);
//   * vs_combine          per row: maximum and 1 / (sum * div) over the chunks;
//   * vs_accum<T, D, BM>  recomputes the logits, P = exp2(s - m) * inv, writes the 64-key
//     tile of P to shared memory; column sums go to `vertical` (one fp32 atomic add per
//     column and row half), diagonal sums accumulate in a per-chunk shared array (plain
//     adds, each diagonal owned by one thread) flushed with one atomic add per offset.
//   * vs_exact_rows<T> / vs_exact_cols<T> (any dtype or geometry): float64, one warp per
//     row for the statistics, one thread per column / offset for the sums (recomputing the
//     dot products); slow, for exactness.
//
// FlexPrefill's pooled estimates: est_block_mean<T> (float64 block means over the true
// length, times a multiplier) and est_softmax<OUT> (row softmax of float64 logits, causal
// over the block index when asked); the small pooled products run as cuBLAS float64 GEMMs.
#include "common.cuh"

namespace refattn {
namespace est {

__device__ __forceinline__ double dbl(float x) { return (double)x; }
__device__ __forceinline__ double dbl(double x) { return x; }
__device__ __forceinline__ double dbl(__half x) { return (double)__half2float(x); }
__device__ __forceinline__ double dbl(__nv_bfloat16 x) { return (double)__bfloat162float(x); }

__device__ __forceinline__ double neg_inf_d() { return __longlong_as_double(0xfff0000000000000ULL); }

// Atomic max of floats through their ordered integer images. The target starts at -inf and
// no NaN is ever written: a value with the sign bit clear is larger as a signed int, one
// with the sign bit set is larger as a smaller unsigned int (-0.0 included).
__device__ __forceinline__ void atomic_max_f32(float* p, float v) {
  if (__float_as_int(v) >= 0) atomicMax(reinterpret_cast<int*>(p), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned*>(p), __float_as_uint(v));
}
__device__ __forceinline__ void atomic_max_f64(double* p, double v) {
  const long long iv = __double_as_longlong(v);
  if (iv >= 0) atomicMax(reinterpret_cast<long long*>(p), iv);
  else atomicMin(reinterpret_cast<unsigned long long*>(p), (unsigned long long)iv);
}

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

// S tile (16*MR rows per warp x 64 keys) = Q K^T: Q fragments in registers, K tile
// [64][LD] in shared memory (row = key, K-contiguous).
template <typename T, int KS, int MR>
__device__ __forceinline__ void tile_qk(float (&acc)[MR][8][4], const unsigned (&qa)[MR][KS][4],
                                        const T* sKs, int ld, int lane) {
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      unsigned bb[4];
      load_b<false>(bb, sKs, ld, np * 16, kk * 16, lane);
#pragma unroll
      for (int mt = 0; mt < MR; ++mt) {
        mma16816<T>(acc[mt][2 * np], qa[mt][kk], bb[0], bb[1]);
        mma16816<T>(acc[mt][2 * np + 1], qa[mt][kk], bb[2], bb[3]);
      }
    }
  }
}

// cp.async a [rows][D] slab (rows from `first`, `valid` of them real, the rest zero) into
// shared memory with row stride LD.
template <typename T, int D, int LD>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int rows, int first, int valid,
                                          int tid) {
  constexpr int CH = D / 8;
#pragma unroll 1
  for (int i = tid; i < rows * CH; i += 128) {
    const int r = i / CH, c = (i % CH) * 8;
    const bool ok = r < valid;
    cp_async16(dst + r * LD + c, ok ? src + (long long)(first + r) * D + c : src, ok);
  }
}

}  // namespace est
}  // namespace refattn

using namespace refattn;
using namespace refattn::est;

// ===================================================================== BSFA, tensor cores
enum : int { BS_BM = 128,  // query rows per CTA (4 warps x 32)
             BS_BN = 64 };  // keys per tile

// mx float [B, Hq, Qb, Kb], filled with -inf by the caller. Grid (ceil(Sq/128), Hq, B).
// Dynamic shared memory: (128 + 2 * 64) * (D + 8) * sizeof(T) (69.6 KB at D = 128).
// MINB: CTAs per SM asked of the register allocator (3: <= 168 registers, no spill at
// D = 128; 2: up to 255).
template <typename T, int D, bool NEG, int MINB>
__global__ void __launch_bounds__(128, MINB) bsfa_mma(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ mx, int Hq, int G,
    int Sq, int Sk, int bq, int bk, int Qb, int Kb, float ascale, int causal) {
  constexpr int LD = D + 8, KS = D / 16, MR = 2;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sK = sQ + BS_BM * LD;                 // [2][BN][LD]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r0 = (gridDim.x - 1 - blockIdx.x) * BS_BM;  // longest (causal) row tiles first
  const int h = blockIdx.y, b = blockIdx.z;
  const int off = Sk - Sq;
  const int row_last = min(r0 + BS_BM, Sq) - 1;

  // Keys to visit: every key of every tile legal for some row block of this CTA. The row
  // block holding the last row reaches furthest; its legal tiles end at block n_last.
  int key_end = Sk;
  if (causal) {
    const int m_hi = row_last / bq;
    const long long lim = (long long)min((long long)Sq, (long long)(m_hi + 1) * bq) - 1 + off;
    if (lim < 0) return;
    const long long n_last = min((long long)Kb - 1, lim / bk);
    key_end = (int)min((long long)Sk, (n_last + 1) * bk);
  }
  const int n_tiles = (key_end + BS_BN - 1) / BS_BN;
  const T* qb = q + ((long long)b * Hq + h) * Sq * D;
  const T* kb = k + ((long long)b * (Hq / G) + h / G) * Sk * D;

  load_rows<T, D, LD>(sQ, qb, BS_BM, r0, Sq - r0, tid);
  auto load_k = [&](int t, int st) {
    load_rows<T, D, LD>(sK + st * BS_BN * LD, kb, BS_BN, t * BS_BN, Sk - t * BS_BN, tid);
  };
  load_k(0, 0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  unsigned qa[MR][KS][4];
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      load_a<false>(qa[mt][kk], sQ + (warp * 32 + mt * 16) * LD, LD, kk * 16, lane);

  // Row block of each m16 slab of this warp (block_q % 16 == 0: a slab lies in one block)
  // and the last key position its block may see (causal legality of tile (m, n):
  // n * bk <= lim_m).
  int mrow[MR];
  long long lim_m[MR];
#pragma unroll
  for (int mt = 0; mt < MR; ++mt) {
    const int rs = r0 + warp * 32 + mt * 16;
    mrow[mt] = rs / bq;
    lim_m[mt] = min((long long)Sq, (long long)(mrow[mt] + 1) * bq) - 1 + off;
  }
  const bool merged = mrow[0] == mrow[1];
  const bool row_edge = r0 + BS_BM > Sq;
  const long long out_base = ((long long)b * Hq + h) * Qb;

#pragma unroll 1
  for (int it = 0; it < n_tiles; ++it) {
    if (it > 0) {
      cp_async_wait<0>();
      __syncthreads();
    }
    if (it + 1 < n_tiles) load_k(it + 1, (it + 1) & 1);
    cp_async_commit();

    float acc[MR][8][4];
    tile_qk<T, KS, MR>(acc, qa, sK + (it & 1) * BS_BN * LD, LD, lane);

    const int c0 = it * BS_BN;
    const bool edge = row_edge || (c0 + BS_BN > Sk);
    float tv[MR][8];
#pragma unroll
    for (int mt = 0; mt < MR; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        float x[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) x[e] = NEG ? -acc[mt][nt][e] : acc[mt][nt][e];
        if (edge) {
          const int ra = r0 + warp * 32 + mt * 16 + (lane >> 2);
          const int ca = c0 + nt * 8 + 2 * (lane & 3);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = ra + 8 * (e >> 1), c = ca + (e & 1);
            if (r >= Sq || c >= Sk) x[e] = -REFATTN_INF;
          }
        }
        tv[mt][nt] = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
      }
    }
    if (merged) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) tv[0][nt] = fmaxf(tv[0][nt], tv[1][nt]);
    }
    // Runs of n8 slabs in one key block (block_k % 8 == 0: a slab lies in one block).
    const int n0 = c0 / bk, rem0 = c0 - n0 * bk;
#pragma unroll
    for (int mt = 0; mt < MR; ++mt) {
      if (mt > 0 && merged) break;
      const int m = mrow[mt];
      float run = -REFATTN_INF;
      int pos = rem0, n = n0;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        run = fmaxf(run, tv[mt][nt]);
        pos += 8;
        if (pos == bk || nt == 7) {  // warp-uniform
          const float v = warp_max(run);
          if (lane == 0 && v != -REFATTN_INF && m < Qb && n < Kb &&
              (!causal || (long long)n * bk <= lim_m[mt]))
            atomic_max_f32(mx + (out_base + m) * Kb + n, v * ascale);
          run = -REFATTN_INF;
          if (pos == bk) {
            pos = 0;
            ++n;
          }
        }
      }
    }
  }
}

// ===================================================================== BSFA, float64
enum : int { BE_T = 64,    // logit tile edge
             BE_DC = 16 };  // head-dim slice in shared memory

// mx double [B, Hq, Qb, Kb], filled with -inf by the caller. Grid (ceil(Sk/64),
// ceil(Sq/64), B*Hq), 256 threads.
template <typename T>
__global__ void __launch_bounds__(256) bsfa_exact(
    const T* __restrict__ q, const T* __restrict__ k, double* __restrict__ mx, int Hq, int G,
    int Sq, int Sk, int D, int bq, int bk, int Qb, int Kb, double scale, int causal) {
  __shared__ double buf[BE_T * (BE_T + 1)];
  double* sq = buf;                          // [64][DC + 1] during the product
  double* sk = buf + BE_T * (BE_DC + 1);     // [64][DC + 1]
  double* sS = buf;                          // [64][65] logits afterwards
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int c0 = blockIdx.x * BE_T, r0 = blockIdx.y * BE_T, bh = blockIdx.z;
  const int b = bh / Hq, h = bh % Hq;
  const int off = Sk - Sq;
  const int rl = min(r0 + BE_T, Sq) - 1, cl = min(c0 + BE_T, Sk) - 1;
  const int m_lo = r0 / bq, m_hi = rl / bq, n_lo = c0 / bk, n_hi = cl / bk;
  auto lim_of = [&](int m) -> long long {
    return min((long long)Sq, (long long)(m + 1) * bq) - 1 + off;
  };
  if (causal && (long long)n_lo * bk > lim_of(m_hi)) return;  // no legal tile here
  const T* qb = q + ((long long)b * Hq + h) * Sq * D;
  const T* kb = k + ((long long)b * (Hq / G) + h / G) * Sk * D;

  double acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0;
#pragma unroll 1
  for (int d0 = 0; d0 < D; d0 += BE_DC) {
    __syncthreads();
    for (int i = tid; i < BE_T * BE_DC; i += 256) {
      const int r = i / BE_DC, dd = i % BE_DC, d = d0 + dd;
      const int row = r0 + r, col = c0 + r;
      sq[r * (BE_DC + 1) + dd] = (row < Sq && d < D) ? dbl(qb[(long long)row * D + d]) : 0.0;
      sk[r * (BE_DC + 1) + dd] = (col < Sk && d < D) ? dbl(kb[(long long)col * D + d]) : 0.0;
    }
    __syncthreads();
#pragma unroll 4
    for (int dd = 0; dd < BE_DC; ++dd) {
      double a[4], c[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = sq[(ty + 16 * i) * (BE_DC + 1) + dd];
        c[i] = sk[(tx + 16 * i) * (BE_DC + 1) + dd];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(a[i], c[j], acc[i][j]);
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = ty + 16 * i, c = tx + 16 * j;
      const bool ok = r0 + r < Sq && c0 + c < Sk;
      sS[r * (BE_T + 1) + c] = ok ? acc[i][j] * scale : neg_inf_d();
    }
  __syncthreads();
  // Stage 1: per row, the maximum of each key-block segment, written in place at column
  // n - n_lo (never after a column still to be read: segment n starts at >= n - n_lo).
  if (tid < BE_T) {
    double* srow = sS + tid * (BE_T + 1);
    for (int n = n_lo; n <= n_hi; ++n) {
      const int j0 = (int)max(0LL, (long long)n * bk - c0);
      const int j1 = (int)min((long long)BE_T, (long long)(n + 1) * bk - c0);
      double m = neg_inf_d();
      for (int j = j0; j < j1; ++j) m = fmax(m, srow[j]);
      srow[n - n_lo] = m;
    }
  }
  __syncthreads();
  // Stage 2: per (row block, key block), the maximum over the rows, one atomic.
  const int nn = n_hi - n_lo + 1, nm = m_hi - m_lo + 1;
  for (int x = tid; x < nm * nn; x += 256) {
    const int m = m_lo + x / nn, n = n_lo + x % nn;
    if (causal && (long long)n * bk > lim_of(m)) continue;
    const int i0 = (int)max(0LL, (long long)m * bq - r0);
    const int i1 = (int)min((long long)BE_T, (long long)(m + 1) * bq - r0);
    double v = neg_inf_d();
    for (int i = i0; i < i1; ++i) v = fmax(v, sS[i * (BE_T + 1) + (n - n_lo)]);
    if (v != neg_inf_d()) atomic_max_f64(mx + ((long long)bh * Qb + m) * Kb + n, v);
  }
}

// ===================================================================== vertical / slash
enum : int { VS_BN = 64,           // keys per tile
             VS_LDP = VS_BN + 8 };  // row stride (floats) of the P tile in shared memory

// Statistics pass. Grid (nch, ceil(ell/BM), B*Hq), 128 threads. Chunk `ch` holds keys
// [ch*chunk, (ch+1)*chunk) (chunk % 64 == 0). st_m / st_l float [B*Hq, ell, nch]: the
// chunk maximum of s = scale*log2(e)*q.k over the visible keys (-inf if none) and the
// chunk sum of exp2(s - max). Dynamic shared memory: (BM + 128) * (D + 8) * sizeof(T).
template <typename T, int D, int BM>
__global__ void __launch_bounds__(128, (BM == 64 ? 4 : 2)) vs_stats(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ st_m,
    float* __restrict__ st_l, int Hq, int G, int Sq, int Sk, int ell, int chunk, int nch,
    float scale_log2) {
  constexpr int LD = D + 8, KS = D / 16, MR = BM / 64;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sK = sQ + BM * LD;                    // [2][64][LD]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int ch = blockIdx.x, bh = blockIdx.z, b = bh / Hq, h = bh % Hq;
  const int e0 = blockIdx.y * BM;                    // first estimate row of the tile
  const int p0 = Sk - ell + e0;                      // key position of tile row 0
  const int p_last = Sk - ell + min(ell, e0 + BM) - 1;
  const int k_begin = ch * chunk;
  const int k_end = min(min(Sk, k_begin + chunk), p_last + 1);
  const int n_tiles = k_end > k_begin ? (k_end - k_begin + VS_BN - 1) / VS_BN : 0;

  float m_run[MR][2], l_run[MR][2];
  int plim[MR][2];
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      m_run[mt][hf] = -REFATTN_INF;
      l_run[mt][hf] = 0.f;
      const int rr = warp * 16 * MR + mt * 16 + (lane >> 2) + 8 * hf;
      plim[mt][hf] = e0 + rr < ell ? p0 + rr : -1;  // last visible key (-1: none)
    }

  if (n_tiles > 0) {
    const T* qb = q + ((long long)b * Hq + h) * Sq * D;
    const T* kb = k + ((long long)b * (Hq / G) + h / G) * Sk * D;
    load_rows<T, D, LD>(sQ, qb, BM, Sq - ell + e0, ell - e0, tid);
    auto load_k = [&](int t, int st) {
      const int c0 = k_begin + t * VS_BN;
      load_rows<T, D, LD>(sK + st * VS_BN * LD, kb, VS_BN, c0, Sk - c0, tid);
    };
    load_k(0, 0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned qa[MR][KS][4];
#pragma unroll
    for (int mt = 0; mt < MR; ++mt)
#pragma unroll
      for (int kk = 0; kk < KS; ++kk)
        load_a<false>(qa[mt][kk], sQ + (warp * 16 * MR + mt * 16) * LD, LD, kk * 16, lane);
    const bool rows_partial = e0 + BM > ell;

#pragma unroll 1
    for (int it = 0; it < n_tiles; ++it) {
      if (it > 0) {
        cp_async_wait<0>();
        __syncthreads();
      }
      if (it + 1 < n_tiles) load_k(it + 1, (it + 1) & 1);
      cp_async_commit();
      float acc[MR][8][4];
      tile_qk<T, KS, MR>(acc, qa, sK + (it & 1) * VS_BN * LD, LD, lane);
      const int c0 = k_begin + it * VS_BN;
      const bool need_mask = rows_partial || (c0 + VS_BN - 1 > p0);
#pragma unroll
      for (int mt = 0; mt < MR; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float mx = -REFATTN_INF;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = acc[mt][nt][2 * hf + e] * scale_log2;
              if (need_mask && c0 + nt * 8 + 2 * (lane & 3) + e > plim[mt][hf]) x = -REFATTN_INF;
              acc[mt][nt][2 * hf + e] = x;
              mx = fmaxf(mx, x);
            }
          }
          const float m_new = fmaxf(m_run[mt][hf], mx);
          const float m_use = m_new == -REFATTN_INF ? 0.f : m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
            sum += fast_exp2(acc[mt][nt][2 * hf] - m_use) + fast_exp2(acc[mt][nt][2 * hf + 1] - m_use);
          l_run[mt][hf] = l_run[mt][hf] * fast_exp2(m_run[mt][hf] - m_use) + sum;
          m_run[mt][hf] = m_new;
        }
      }
    }
  }
  // combine the four lanes of each row, write
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float mq = quad_max(m_run[mt][hf]);
      const float mu = mq == -REFATTN_INF ? 0.f : mq;
      const float l = quad_sum(l_run[mt][hf] * exp2f(m_run[mt][hf] - mu));
      const int e = e0 + warp * 16 * MR + mt * 16 + (lane >> 2) + 8 * hf;
      if ((lane & 3) == 0 && e < ell) {
        const long long o = ((long long)bh * ell + e) * nch + ch;
        st_m[o] = mq;
        st_l[o] = l;
      }
    }
}

// Per row: m = max over chunks (0 if the row sees no key), inv = 1 / (sum * div) (0 if none).
__global__ void __launch_bounds__(256) vs_combine(const float* __restrict__ st_m,
                                                  const float* __restrict__ st_l,
                                                  float* __restrict__ row_m,
                                                  float* __restrict__ row_inv, long long rows,
                                                  int nch, float div) {
  const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float* pm = st_m + r * nch;
  const float* pl = st_l + r * nch;
  float m = -REFATTN_INF;
  for (int c = 0; c < nch; ++c) m = fmaxf(m, pm[c]);
  const float mu = m == -REFATTN_INF ? 0.f : m;
  float l = 0.f;
  for (int c = 0; c < nch; ++c) l += pl[c] * exp2f(pm[c] - mu);
  row_m[r] = mu;
  row_inv[r] = l > 0.f ? 1.f / (l * div) : 0.f;
}

// Accumulation pass: same grid and chunks as vs_stats. vert / slash float [B*Hq, Sk],
// zeroed by the caller. Dynamic shared memory: max(BM*(D+8)*sizeof(T), BM*72*4)
// + 2*64*(D+8)*sizeof(T) + (chunk + BM - 1)*4 bytes (vs_accum_smem in the launcher).
template <typename T, int D, int BM>
__global__ void __launch_bounds__(128, (BM == 64 ? 4 : 2)) vs_accum(
    const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ row_m,
    const float* __restrict__ row_inv, float* __restrict__ vert, float* __restrict__ slash,
    int Hq, int G, int Sq, int Sk, int ell, int chunk, float scale_log2) {
  constexpr int LD = D + 8, KS = D / 16, MR = BM / 64;
  constexpr int QBYTES = BM * LD * (int)sizeof(T), PBYTES = BM * VS_LDP * 4;
  constexpr int UBYTES = ((QBYTES > PBYTES ? QBYTES : PBYTES) + 15) / 16 * 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);                              // [BM][LD] (first)
  float* sP = reinterpret_cast<float*>(smem_raw);                      // [BM][72] (then)
  T* sK = reinterpret_cast<T*>(smem_raw + UBYTES);                     // [2][64][LD]
  float* sSl = reinterpret_cast<float*>(smem_raw + UBYTES + 2 * VS_BN * LD * (int)sizeof(T));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int ch = blockIdx.x, bh = blockIdx.z, b = bh / Hq, h = bh % Hq;
  const int e0 = blockIdx.y * BM;
  const int p0 = Sk - ell + e0;
  const int p_last = Sk - ell + min(ell, e0 + BM) - 1;
  const int k_begin = ch * chunk;
  const int k_end = min(min(Sk, k_begin + chunk), p_last + 1);
  if (k_end <= k_begin) return;  // nothing visible in this chunk
  const int n_tiles = (k_end - k_begin + VS_BN - 1) / VS_BN;
  const int ntc = chunk / VS_BN;
  const int nsl = chunk + BM - 1;

  const T* qb = q + ((long long)b * Hq + h) * Sq * D;
  const T* kb = k + ((long long)b * (Hq / G) + h / G) * Sk * D;
  load_rows<T, D, LD>(sQ, qb, BM, Sq - ell + e0, ell - e0, tid);
  auto load_k = [&](int t, int st) {
    const int c0 = k_begin + t * VS_BN;
    load_rows<T, D, LD>(sK + st * VS_BN * LD, kb, VS_BN, c0, Sk - c0, tid);
  };
  load_k(0, 0);
  cp_async_commit();
  for (int i = tid; i < nsl; i += 128) sSl[i] = 0.f;

  float rm[MR][2], rinv[MR][2];
  int plim[MR][2];
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int rr = warp * 16 * MR + mt * 16 + (lane >> 2) + 8 * hf;
      const bool ok = e0 + rr < ell;
      plim[mt][hf] = ok ? p0 + rr : -1;
      rm[mt][hf] = ok ? row_m[(long long)bh * ell + e0 + rr] : 0.f;
      rinv[mt][hf] = ok ? row_inv[(long long)bh * ell + e0 + rr] : 0.f;
    }

  cp_async_wait<0>();
  __syncthreads();
  unsigned qa[MR][KS][4];
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      load_a<false>(qa[mt][kk], sQ + (warp * 16 * MR + mt * 16) * LD, LD, kk * 16, lane);
  __syncthreads();  // sQ is reused as sP below
  const bool rows_partial = e0 + BM > ell;

#pragma unroll 1
  for (int it = 0; it < n_tiles; ++it) {
    if (it > 0) {
      cp_async_wait<0>();
      __syncthreads();
    }
    if (it + 1 < n_tiles) load_k(it + 1, (it + 1) & 1);
    cp_async_commit();
    float acc[MR][8][4];
    tile_qk<T, KS, MR>(acc, qa, sK + (it & 1) * VS_BN * LD, LD, lane);
    const int c0 = k_begin + it * VS_BN;
    const bool need_mask = rows_partial || (c0 + VS_BN - 1 > p0);
#pragma unroll
    for (int mt = 0; mt < MR; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int rr = warp * 16 * MR + mt * 16 + (lane >> 2) + 8 * hf;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          float pv[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float p = fast_exp2(fmaf(acc[mt][nt][2 * hf + e], scale_log2, -rm[mt][hf])) * rinv[mt][hf];
            if (need_mask && c0 + nt * 8 + 2 * (lane & 3) + e > plim[mt][hf]) p = 0.f;
            pv[e] = p;
          }
          *reinterpret_cast<float2*>(sP + rr * VS_LDP + nt * 8 + 2 * (lane & 3)) =
              make_float2(pv[0], pv[1]);
        }
      }
    }
    __syncthreads();
    // column sums: thread -> (column, half of the rows)
    {
      const int col = tid & (VS_BN - 1), half = tid >> 6;
      float v = 0.f;
#pragma unroll 8
      for (int r = half * (BM / 2); r < (half + 1) * (BM / 2); ++r) v += sP[r * VS_LDP + col];
      if (c0 + col < Sk && v != 0.f) atomicAdd(vert + (long long)bh * Sk + c0 + col, v);
    }
    // diagonal sums: local diagonal dl = r - col + 63 in [0, BM + 62], one thread each;
    // the rows are walked warp-uniformly so that a warp reads consecutive addresses.
    for (int dl = tid; dl < BM + VS_BN - 1; dl += 128) {
      const int dw = dl - lane;  // first diagonal of the warp
      const int rlo = max(0, dw - (VS_BN - 1)), rhi = min(BM - 1, dw + 31);
      float s = 0.f;
      for (int r = rlo; r <= rhi; ++r) {
        const int cc = r - dl + (VS_BN - 1);
        if (cc >= 0 && cc < VS_BN) s += sP[r * VS_LDP + cc];
      }
      sSl[VS_BN * (ntc - it - 1) + dl] += s;
    }
  }
  __syncthreads();
  // slash offset of sSl[idx]: o = p0 - k_begin - chunk + 1 + idx
  const int o_base = p0 - k_begin - chunk + 1;
  for (int i = tid; i < nsl; i += 128) {
    const int o = o_base + i;
    const float v = sSl[i];
    if (o >= 0 && o < Sk && v != 0.f) atomicAdd(slash + (long long)bh * Sk + o, v);
  }
}

// ----------------------------------------------------------------- vertical / slash, exact
// One warp per estimate row: row_m = max_j s_j, row_inv = 1 / (div * sum_j exp(s_j - m))
// over the visible keys j <= p_e (s = scale * q.k in float64); 0 / 0 for a row that sees
// no key. Grid (ceil(ell/4), B*Hq), 128 threads.
template <typename T>
__global__ void __launch_bounds__(128) vs_exact_rows(
    const T* __restrict__ q, const T* __restrict__ k, double* __restrict__ row_m,
    double* __restrict__ row_inv, int Hq, int G, int Sq, int Sk, int D, int ell, double scale,
    double div) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int e = blockIdx.x * 4 + warp, bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
  if (e >= ell) return;
  const int p = Sk - ell + e;
  const T* qr = q + (((long long)b * Hq + h) * Sq + (Sq - ell + e)) * D;
  const T* kb = k + ((long long)b * (Hq / G) + h / G) * Sk * D;
  double m = neg_inf_d(), l = 0.0;
  for (int j = lane; j <= p; j += 32) {
    const T* kr = kb + (long long)j * D;
    double s = 0.0;
    for (int d = 0; d < D; ++d) s = fma(dbl(qr[d]), dbl(kr[d]), s);
    s *= scale;
    if (s > m) {
      l = l * exp(m - s) + 1.0;
      m = s;
    } else {
      l += exp(s - m);
    }
  }
  const double M = warp_max_d(m);
  const double L = warp_sum_d(m == neg_inf_d() ? 0.0 : l * exp(m - M));
  if (lane == 0) {
    const long long o = (long long)bh * ell + e;
    const bool any = p >= 0 && L > 0.0;
    row_m[o] = any ? M : 0.0;
    row_inv[o] = any ? 1.0 / (L * div) : 0.0;
  }
}

// blockIdx.z == 0: vert[j] = sum_e P(e, j); == 1: slash[o] = sum_e P(e, p_e - o), float64,
// one thread per column / offset. Grid (ceil(Sk/128), B*Hq, 2), 128 threads.
template <typename T>
__global__ void __launch_bounds__(128) vs_exact_cols(
    const T* __restrict__ q, const T* __restrict__ k, const double* __restrict__ row_m,
    const double* __restrict__ row_inv, double* __restrict__ vert, double* __restrict__ slash,
    int Hq, int G, int Sq, int Sk, int D, int ell, double scale) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x, bh = blockIdx.y, mode = blockIdx.z;
  const int b = bh / Hq, h = bh % Hq;
  if (x >= Sk) return;
  const T* qb = q + (((long long)b * Hq + h) * Sq + (Sq - ell)) * D;
  const T* kb = k + ((long long)b * (Hq / G) + h / G) * Sk * D;
  double acc = 0.0;
  for (int e = 0; e < ell; ++e) {
    const int p = Sk - ell + e;
    const int j = mode == 0 ? x : p - x;
    if (j < 0 || j > p) continue;
    const double inv = row_inv[(long long)bh * ell + e];
    if (inv == 0.0) continue;
    const T* qr = qb + (long long)e * D;
    const T* kr = kb + (long long)j * D;
    double s = 0.0;
    for (int d = 0; d < D; ++d) s = fma(dbl(qr[d]), dbl(kr[d]), s);
    acc += exp(s * scale - row_m[(long long)bh * ell + e]) * inv;
  }
  (mode == 0 ? vert : slash)[(long long)bh * Sk + x] = acc;
}

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
void* const* refattn_estimate_instances() {
  static void* const kInstances[] = {
    (void*)&bsfa_mma<__nv_bfloat16, 128, false, 3>, (void*)&bsfa_mma<__half, 64, true, 3>,
    (void*)&bsfa_mma<__nv_bfloat16, 32, false, 3>, (void*)&bsfa_mma<__half, 16, false, 3>,
    (void*)&bsfa_mma<__nv_bfloat16, 128, false, 2>,
    (void*)&bsfa_exact<float>, (void*)&bsfa_exact<double>, (void*)&bsfa_exact<__nv_bfloat16>,
    (void*)&vs_stats<__nv_bfloat16, 128, 64>, (void*)&vs_stats<__half, 64, 128>,
    (void*)&vs_stats<__nv_bfloat16, 16, 64>, (void*)&vs_accum<__nv_bfloat16, 128, 64>,
    (void*)&vs_accum<__half, 64, 128>, (void*)&vs_accum<__nv_bfloat16, 128, 128>,
    (void*)&vs_accum<__nv_bfloat16, 16, 64>, (void*)&vs_combine,
    (void*)&vs_exact_rows<float>, (void*)&vs_exact_rows<double>,
    (void*)&vs_exact_rows<__half>, (void*)&vs_exact_cols<float>,
    (void*)&vs_exact_cols<__nv_bfloat16>, (void*)&est_block_mean<float>,
    (void*)&est_block_mean<double>, (void*)&est_block_mean<__nv_bfloat16>,
    (void*)&est_softmax<float>, (void*)&est_softmax<double>,
  };
  return kInstances;
}
#endif
