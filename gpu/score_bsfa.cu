// Scoring kernels of BSFA (op `bsfa_score`), see gpu/scoring_estimate.py. Arrays are
// contiguous bhsd: q
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
#include "common.cuh"
#include "estimate_common.cuh"

namespace refattn {
namespace est {

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

#ifdef REFATTN_COMPILE_CHECK
// nvcc -DREFATTN_COMPILE_CHECK: instantiate every template the launchers use.
void* const* refattn_bsfa_instances() {
  static void* const kInstances[] = {
    (void*)&bsfa_mma<__nv_bfloat16, 128, false, 3>, (void*)&bsfa_mma<__half, 64, true, 3>,
    (void*)&bsfa_mma<__nv_bfloat16, 32, false, 3>, (void*)&bsfa_mma<__half, 16, false, 3>,
    (void*)&bsfa_mma<__nv_bfloat16, 128, false, 2>, (void*)&bsfa_exact<float>,
    (void*)&bsfa_exact<double>, (void*)&bsfa_exact<__nv_bfloat16>,
  };
  return kInstances;
}
#endif
