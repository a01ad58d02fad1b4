// Scoring kernels of NSA, ProxyAttn and PBS-Attn (ops `nsa_score`, `proxyattn_score`,
// `proxyattn_budget_score`, `pbs_key_importance`, `pbs_score`), see gpu/scoring_compressed.py.
//
// Every array is contiguous bhsd. Two families:
//
//   * Tensor-core kernels (bf16/fp16, D in {64, 128}) built on one QK^T engine (`Eng`): a
//     CTA of 4 warps holds 128 query rows of Q in shared memory and walks 64-row tiles of K
//     (cp.async double buffering); each warp computes its 32 x 64 slab of scores with
//     mma.sync m16n8k16 (fp32 accumulation) and hands it to an epilogue in registers. The
//     accumulator element acc[mt][nt][c] is query mt*16 + (lane>>2) + 8*(c>>1) of the warp
//     and key column nt*8 + 2*(lane&3) + (c&1) of the tile.
//     Operands that the reference forms in float64 (NSA's pooled keys, ProxyAttn's
//     head-pooled q/k) are carried as hi + lo pairs of the 16-bit type (x = hi + lo to ~16
//     mantissa bits). The pair is laid out *inside* the tiles: with KS = 1 the 64 K rows are
//     32 keys' hi parts then the same 32 keys' lo parts (so a tile holds 32 keys and the
//     score of column n is acc(n) + acc(n + 32)); with QS = 1 each warp's 32 Q rows are 16
//     queries' hi parts then their lo parts (score = acc(m) + acc(m + 16)). The shared
//     memory and the mma count per tile stay those of the plain kernel.
//       nsa_tc      NSA: pass 1 softmax statistics per (row, head), pass 2 recomputes the
//                   logits, writes p_cmp and spreads it to selection blocks through a ring
//                   of per-row block bins in shared memory (eq. 9), summing the GQA group.
//       nsa_tc2     NSA v2 for l = 2d, l' = 4d: the same two passes, eq. 9 formed in
//                   registers by quad shuffles (no bins, no atomics); see docs/gpu_notes.md.
//       proxy_tc    ProxyAttn proxy scores, single pass: per (sampled row, key block) the
//                   block sum of exp2(s - m) and its max m go to a scratch; per row the
//                   running max / sum; proxy_reduce normalises and averages the rows.
//       pbs_ki_tc   PBS key importance: <MODE 0> partial softmax statistics of the last
//                   block's rows per key split, <MODE 1> normalised column sums.
//   * Float64 kernels for every dtype and geometry (fp32/fp64 inputs always take them):
//       nsa_exact, proxy_exact, pbs_ki_exact (one warp per query row), and the pooled ops:
//       win_mean (window / block means), head_mean (means over query or kv heads),
//       pooled_softmax (masked row softmax of the pooled logits of ProxyAttn's budget
//       estimate and of pbs_score).
//
// Softmax in the tensor-core kernels runs in base 2 (scores times scale*log2e, ex2.approx);
// a row that sees nothing keeps m = -inf and contributes 0, never NaN.
#include "common.cuh"

namespace refattn {

__device__ __forceinline__ double to_dbl(float x) { return (double)x; }
__device__ __forceinline__ double to_dbl(double x) { return x; }
__device__ __forceinline__ double to_dbl(__half x) { return (double)__half2float(x); }
__device__ __forceinline__ double to_dbl(__nv_bfloat16 x) { return (double)__bfloat162float(x); }

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

__device__ __forceinline__ double neg_inf_d() { return __longlong_as_double(0xfff0000000000000ULL); }

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

// NSA eq. 9 weight: stride pieces of compression block i (pieces i .. i+pc-1) that lie in
// selection block j (pieces j*ps .. j*ps+ps-1).
__device__ __forceinline__ int nsa_wgt(int i, int j, int pc, int ps) {
  const int lo = max(i, j * ps), hi = min(i + pc, (j + 1) * ps);
  return max(0, hi - lo);
}

// ------------------------------------------------------------------ QK^T engine
constexpr int CE_BM = 128;  // Q rows in shared memory (4 warps x 32)
constexpr int CE_BN = 64;   // K rows per tile

template <typename T, int D_, int QS, int KS>
struct Eng {
  static constexpr int D = D_;
  static constexpr int LD = D + 8;          // padded row: conflict-free ldmatrix
  static constexpr int QPC = CE_BM >> QS;   // queries per CTA
  static constexpr int QPW = 32 >> QS;      // queries per warp
  static constexpr int NMT = 2 >> QS;       // m16 query groups per thread
  static constexpr int KPT = CE_BN >> KS;   // keys per tile
  static constexpr int NNT = 8 >> KS;       // n8 key groups per thread
  static constexpr int SMEM = (CE_BM + 2 * CE_BN) * LD * (int)sizeof(T);

  // shared-memory Q row r -> (CTA query, part); K row r -> (tile key, part)
  static __device__ __forceinline__ int q_of_row(int r) { return QS ? ((r >> 5) * 16 + (r & 15)) : r; }
  static __device__ __forceinline__ int qpart_of_row(int r) { return QS ? ((r >> 4) & 1) : 0; }
  static __device__ __forceinline__ int k_of_row(int r) { return KS ? (r & 31) : r; }
  static __device__ __forceinline__ int kpart_of_row(int r) { return KS ? (r >> 5) : 0; }
  // CTA query of accumulator rows (mt < NMT, hf); tile key of columns (nt < NNT, e)
  static __device__ __forceinline__ int q_of_acc(int warp, int lane, int mt, int hf) {
    return warp * QPW + mt * 16 + (lane >> 2) + 8 * hf;
  }
  static __device__ __forceinline__ int k_of_acc(int lane, int nt, int e) {
    return nt * 8 + 2 * (lane & 3) + e;
  }
  // score of (mt, nt, c): the hi/lo partial products added
  static __device__ __forceinline__ float val(const float (&acc)[2][8][4], int mt, int nt, int c) {
    float v = acc[mt][nt][c];
    if constexpr (QS != 0) v += acc[mt + 1][nt][c];
    if constexpr (KS != 0) {
      v += acc[mt][nt + 4][c];
      if constexpr (QS != 0) v += acc[mt + 1][nt + 4][c];
    }
    return v;
  }
};

// Q rows of the CTA: query i reads global row sRow[i] (< 0: zeros) of qbase (row stride
// q_rs elements; part p at column offset p*D). Caller commits the cp.async group.
template <class E, typename T>
__device__ __forceinline__ void eng_load_q(T* sQ, const T* qbase, long long q_rs, const int* sRow) {
  constexpr int CH = E::D / 8;
#pragma unroll 1
  for (int x = threadIdx.x; x < CE_BM * CH; x += blockDim.x) {
    const int r = x / CH, c = (x % CH) * 8;
    const int row = sRow[E::q_of_row(r)];
    const bool ok = row >= 0;
    const T* src = ok ? qbase + (long long)row * q_rs + E::qpart_of_row(r) * E::D + c : qbase;
    cp_async16(sQ + r * E::LD + c, src, ok);
  }
}

template <class E, typename T>
__device__ __forceinline__ void eng_load_k(T* sKb, const T* kbase, long long k_rs, int key0, int nk) {
  constexpr int CH = E::D / 8;
#pragma unroll 1
  for (int x = threadIdx.x; x < CE_BN * CH; x += blockDim.x) {
    const int r = x / CH, c = (x % CH) * 8;
    const int key = key0 + E::k_of_row(r);
    const bool ok = key < nk;
    const T* src = ok ? kbase + (long long)key * k_rs + E::kpart_of_row(r) * E::D + c : kbase;
    cp_async16(sKb + r * E::LD + c, src, ok);
  }
}

// acc = (this warp's 32 Q rows) x (64 K rows)^T
template <class E, typename T>
__device__ __forceinline__ void eng_mma(float (&acc)[2][8][4], const T* sQw, const T* sKb, int lane) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][n][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < E::D; kk += 16) {
    unsigned a0[4], a1[4];
    load_a<false>(a0, sQw, E::LD, kk, lane);
    load_a<false>(a1, sQw + 16 * E::LD, E::LD, kk, lane);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      unsigned bb[4];
      load_b<false>(bb, sKb, E::LD, np * 16, kk, lane);
      mma16816<T>(acc[0][2 * np], a0, bb[0], bb[1]);
      mma16816<T>(acc[0][2 * np + 1], a0, bb[2], bb[3]);
      mma16816<T>(acc[1][2 * np], a1, bb[0], bb[1]);
      mma16816<T>(acc[1][2 * np + 1], a1, bb[2], bb[3]);
    }
  }
}

// Walk K tiles t0 .. t1-1 (tile t = keys [t*KPT, t*KPT + KPT) of kbase, keys >= nk zero):
// epi(t, acc) per tile, called by every thread (it may use __syncthreads). The Q rows must
// have been issued (cp.async, committed) before; they are waited for with the first tile.
template <class E, typename T, class Epi>
__device__ __forceinline__ void eng_walk(const T* sQ, T* sK, const T* kbase, long long k_rs, int nk,
                                         int t0, int t1, Epi&& epi) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // the previous user of sK is done
  if (t0 < t1) eng_load_k<E>(sK, kbase, k_rs, t0 * E::KPT, nk);
  cp_async_commit();
#pragma unroll 1
  for (int t = t0; t < t1; ++t) {
    const int buf = (t - t0) & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < t1) eng_load_k<E>(sK + (buf ^ 1) * CE_BN * E::LD, kbase, k_rs, (t + 1) * E::KPT, nk);
    cp_async_commit();
    float acc[2][8][4];
    eng_mma<E>(acc, sQ + warp * 32 * E::LD, sK + buf * CE_BN * E::LD, lane);
    epi(t, acc);
  }
  cp_async_wait<0>();
  __syncthreads();
}

}  // namespace refattn

using namespace refattn;

// =================================================================== NSA (tensor cores)
// q [B, Hq, Sq, D]; kc [B, Hkv, Nc, D << KS] (pooled keys: hi, or hi | lo); outputs
// p_slc float [B, Hkv, Sq, Kb] (group sums) and, when want_cmp, p_cmp float [B, Hq, Sq, Nc].
// Grid (ceil(Sq / 128), Hkv, B); the CTA owns 128 rows of its kv head and loops over the
// group's query heads (head 0 stores p_slc, the others add to it).
// Bins: row r's block j accumulates in sBin[r][j % WIN]; after tile t the blocks
// j < (t+1)*KPT / ps are final and are flushed to p_slc (WIN >= (KPT - 2 + pc)/ps + 2
// keeps the live blocks distinct).
template <typename T, int D, int KS, int WIN>
__global__ void __launch_bounds__(128) nsa_tc(
    const T* __restrict__ q, const T* __restrict__ kc, float* __restrict__ p_slc,
    float* __restrict__ p_cmp, int want_cmp, int Hq, int G, int Sq, int Sk, int Nc, int Kb,
    int cl, int cd, int pc, int ps, float scale_log2, int causal) {
  using E = Eng<T, D, 0, KS>;
  constexpr int KPT = E::KPT, BST = WIN + 1;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + CE_BM * E::LD;
  float* sBin = reinterpret_cast<float*>(sK + 2 * CE_BN * E::LD);  // [128][BST]
  __shared__ int sRow[CE_BM];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r0 = (gridDim.x - 1 - blockIdx.x) * CE_BM;  // longest causal rows first
  const int g = blockIdx.y, b = blockIdx.z, Hkv = Hq / G, off = Sk - Sq;

  // compression blocks seen by row: i*cd + cl - 1 <= row + off (all Nc without causal)
  auto ns_of = [&](int row) -> int {
    if (row >= Sq) return 0;
    if (!causal) return Nc;
    const int pos = row + off;
    return pos >= cl - 1 ? min(Nc, (pos - cl + 1) / cd + 1) : 0;
  };
  const int ntile = (ns_of(min(r0 + CE_BM, Sq) - 1) + KPT - 1) / KPT;
  const int jend = ntile > 0 ? min(Kb, (ntile * KPT + pc - 2) / ps + 1) : 0;
  for (int i = tid; i < CE_BM; i += blockDim.x) sRow[i] = r0 + i < Sq ? r0 + i : -1;
  int nsr[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) nsr[mt][hf] = ns_of(r0 + E::q_of_acc(warp, lane, mt, hf));

  const long long k_rs = (long long)D << KS;
  const T* kbase = kc + ((size_t)b * Hkv + g) * (size_t)Nc * k_rs;
  float* slc = p_slc + ((size_t)b * Hkv + g) * (size_t)Sq * Kb;
  float* myBin = sBin + warp * 32 * BST;

  // blocks [j0, j1) of this warp's 32 rows: bins -> p_slc (store or add), bins zeroed
  auto flush = [&](int j0, int j1, bool first) {
    const int nb = j1 - j0;
#pragma unroll 1
    for (int x = lane; x < 32 * nb; x += 32) {
      const int rr = x / nb, j = j0 + x - rr * nb;
      float* cell = myBin + rr * BST + (j & (WIN - 1));
      const float v = *cell;
      *cell = 0.f;
      const int row = r0 + warp * 32 + rr;
      if (row < Sq) {
        float* o = slc + (size_t)row * Kb + j;
        *o = first ? v : *o + v;
      }
    }
    __syncwarp();
  };

#pragma unroll 1
  for (int hi = 0; hi < G; ++hi) {
    const int h = g * G + hi;
    const T* qb = q + ((size_t)b * Hq + h) * (size_t)Sq * D;
    __syncthreads();  // sQ free, sRow visible
    eng_load_q<E>(sQ, qb, D, sRow);
    cp_async_commit();

    // ---- pass 1: per-thread online max / sum, then over the quad
    float m[2][2], ls[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) { m[mt][hf] = -REFATTN_INF; ls[mt][hf] = 0.f; }
    eng_walk<E>(sQ, sK, kbase, k_rs, Nc, 0, ntile, [&](int t, float (&acc)[2][8][4]) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int lim = nsr[mt][hf] - t * KPT;
          float v[E::NNT][2];
          float mx = m[mt][hf];
#pragma unroll
          for (int nt = 0; nt < E::NNT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = E::val(acc, mt, nt, 2 * hf + e) * scale_log2;
              x = E::k_of_acc(lane, nt, e) < lim ? x : -REFATTN_INF;
              v[nt][e] = x;
              mx = fmaxf(mx, x);
            }
          if (mx != -REFATTN_INF) {
            float s = ls[mt][hf] * fast_exp2(m[mt][hf] - mx);
#pragma unroll
            for (int nt = 0; nt < E::NNT; ++nt) s += fast_exp2(v[nt][0] - mx) + fast_exp2(v[nt][1] - mx);
            ls[mt][hf] = s;
            m[mt][hf] = mx;
          }
        }
    });
    float Mo[2][2], iv[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float M = quad_max(m[mt][hf]);
        float s = (m[mt][hf] == -REFATTN_INF) ? 0.f : ls[mt][hf] * fast_exp2(m[mt][hf] - M);
        s = quad_sum(s);
        Mo[mt][hf] = (M == -REFATTN_INF) ? 0.f : M;
        iv[mt][hf] = (M == -REFATTN_INF) ? 0.f : 1.f / s;
      }

    // ---- pass 2: probabilities, p_cmp, block bins
    for (int x = lane; x < 32 * BST; x += 32) myBin[x] = 0.f;
    __syncwarp();
    int jdone = 0;
    float* pcm = want_cmp ? p_cmp + ((size_t)b * Hq + h) * (size_t)Sq * Nc : nullptr;
    eng_walk<E>(sQ, sK, kbase, k_rs, Nc, 0, ntile, [&](int t, float (&acc)[2][8][4]) {
      const int c0 = t * KPT;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int lr = E::q_of_acc(warp, lane, mt, hf);
          const int row = r0 + lr;
          const int lim = nsr[mt][hf] - c0;
          float* bin = sBin + lr * BST;
          float* prow = (pcm != nullptr && row < Sq) ? pcm + (size_t)row * Nc : nullptr;
#pragma unroll
          for (int nt = 0; nt < E::NNT; ++nt) {
            const int cc = E::k_of_acc(lane, nt, 0);
            const float p0 = cc < lim ? fast_exp2(E::val(acc, mt, nt, 2 * hf) * scale_log2 - Mo[mt][hf]) * iv[mt][hf] : 0.f;
            const float p1 = cc + 1 < lim ? fast_exp2(E::val(acc, mt, nt, 2 * hf + 1) * scale_log2 - Mo[mt][hf]) * iv[mt][hf] : 0.f;
            const int i = c0 + cc;
            if (prow != nullptr) {
              if (i < Nc) prow[i] = p0;
              if (i + 1 < Nc) prow[i + 1] = p1;
            }
            if (p0 != 0.f || p1 != 0.f) {
              const int ja = i / ps, jb = (i + pc) / ps;
#pragma unroll 1
              for (int j = ja; j <= jb; ++j) {
                const float w = (float)nsa_wgt(i, j, pc, ps) * p0 + (float)nsa_wgt(i + 1, j, pc, ps) * p1;
                if (w != 0.f) atomicAdd(bin + (j & (WIN - 1)), w);
              }
            }
          }
        }
      __syncwarp();
      const int jfin = min(Kb, (c0 + KPT) / ps);
      flush(jdone, jfin, hi == 0);
      jdone = jfin;
    });
    flush(jdone, jend, hi == 0);
    // ---- the rest of the rows: blocks past the walk (head 0), columns past the walk
#pragma unroll 1
    for (int rr = 0; rr < 32; ++rr) {
      const int row = r0 + warp * 32 + rr;
      if (row >= Sq) break;
      if (hi == 0)
        for (int j = jend + lane; j < Kb; j += 32) slc[(size_t)row * Kb + j] = 0.f;
      if (pcm != nullptr)
        for (int i = ntile * KPT + lane; i < Nc; i += 32) pcm[(size_t)row * Nc + i] = 0.f;
    }
  }
}

// =================================================================== NSA v2 (tensor cores)
// Same contract as nsa_tc, for the geometries with l = 2d and l' = 4d (pc = 2, ps = 4: the
// paper's defaults l = 32, d = 16, l' = 64). Eq. 9 is then a fixed sparse map: selection
// block j = p[4j-1] + 2 p[4j] + 2 p[4j+1] + 2 p[4j+2] + p[4j+3]. A 64-key tile (32 with
// KS = 1) starts at a multiple of 4, so its blocks t*BPT .. t*BPT+BPT-1 are final after it
// except for the one p[4j-1] coming from the previous tile (a per-row carry in a register).
// The quad that holds a row's scores forms the blocks with 2 shuffles per 8 keys, swaps
// halves with 2 more and stores 4 consecutive blocks per lane (16-byte stores when Kb % 4
// == 0): no shared-memory bins, no atomics (v1's fp32 shared atomicAdd is a CAS loop on
// sm_90), no integer divisions, masks only on the tiles that cross a row's causal limit.
// 1/l is applied to the block sums, not to every probability (p_cmp still gets it).
template <typename T, int D, int KS>
__global__ void __launch_bounds__(128) nsa_tc2(
    const T* __restrict__ q, const T* __restrict__ kc, float* __restrict__ p_slc,
    float* __restrict__ p_cmp, int want_cmp, int Hq, int G, int Sq, int Sk, int Nc, int Kb,
    int cl, int cd, float scale_log2, int causal) {
  using E = Eng<T, D, 0, KS>;
  constexpr int KPT = E::KPT, NNT = E::NNT, BPT = KPT / 4;
  static_assert(NNT % 4 == 0, "blocks are stored 4 per lane");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + CE_BM * E::LD;
  __shared__ int sRow[CE_BM];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, qd = lane & 3;
  const int r0 = (gridDim.x - 1 - blockIdx.x) * CE_BM;  // longest causal rows first
  const int g = blockIdx.y, b = blockIdx.z, Hkv = Hq / G, off = Sk - Sq;

  auto ns_of = [&](int row) -> int {
    if (row >= Sq) return 0;
    if (!causal) return Nc;
    const int pos = row + off;
    return pos >= cl - 1 ? min(Nc, (pos - cl + 1) / cd + 1) : 0;
  };
  const int ntile = (ns_of(min(r0 + CE_BM, Sq) - 1) + KPT - 1) / KPT;
  const int jend = ntile > 0 ? min(Kb, ntile * BPT + 1) : 0;
  for (int i = tid; i < CE_BM; i += blockDim.x) sRow[i] = r0 + i < Sq ? r0 + i : -1;
  int nsr[2][2], rowi[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      rowi[mt][hf] = r0 + E::q_of_acc(warp, lane, mt, hf);
      nsr[mt][hf] = ns_of(rowi[mt][hf]);
    }
  const long long k_rs = (long long)D << KS;
  const T* kbase = kc + ((size_t)b * Hkv + g) * (size_t)Nc * k_rs;
  float* slc = p_slc + ((size_t)b * Hkv + g) * (size_t)Sq * Kb;
  const bool vec = (Kb & 3) == 0;
  // quad lane qd: weight of its second key in its own block (odd lanes hold 4j+2, 4j+3)
  const float wb = (qd & 1) ? 1.f : 2.f, wc = (qd & 1) ? 1.f : 0.f;
  const int src = qd < 2 ? (lane | 3) : ((lane & ~3) | 1);

  // 4 consecutive blocks j .. j+3 of one row: store (first head) or add
  auto put4 = [&](float* rp, int j, float x0, float x1, float x2, float x3, bool first) {
    if (vec && j + 3 < Kb) {
      float4* o = reinterpret_cast<float4*>(rp + j);
      if (!first) {
        const float4 a = *o;
        x0 += a.x; x1 += a.y; x2 += a.z; x3 += a.w;
      }
      *o = make_float4(x0, x1, x2, x3);
    } else {
      const float xs[4] = {x0, x1, x2, x3};
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (j + u < Kb) rp[j + u] = first ? xs[u] : rp[j + u] + xs[u];
    }
  };

#pragma unroll 1
  for (int hi = 0; hi < G; ++hi) {
    const int h = g * G + hi;
    const T* qb = q + ((size_t)b * Hq + h) * (size_t)Sq * D;
    __syncthreads();  // sQ free, sRow visible
    eng_load_q<E>(sQ, qb, D, sRow);
    cp_async_commit();

    // ---- pass 1: per-thread online max / sum (max on raw logits, one FFMA per exp)
    float m[2][2], ls[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) { m[mt][hf] = -REFATTN_INF; ls[mt][hf] = 0.f; }
    eng_walk<E>(sQ, sK, kbase, k_rs, Nc, 0, ntile, [&](int t, float (&acc)[2][8][4]) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int lim = nsr[mt][hf] - t * KPT;
          const bool full = lim >= KPT;
          float v[NNT][2];
          float mr = -REFATTN_INF;
#pragma unroll
          for (int nt = 0; nt < NNT; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = E::val(acc, mt, nt, 2 * hf + e);
              if (!full) x = E::k_of_acc(lane, nt, e) < lim ? x : -REFATTN_INF;
              v[nt][e] = x;
              mr = fmaxf(mr, x);
            }
          const float mx = fmaxf(m[mt][hf], mr * scale_log2);
          if (mx != -REFATTN_INF) {
            float s = ls[mt][hf] * fast_exp2(m[mt][hf] - mx);
#pragma unroll
            for (int nt = 0; nt < NNT; ++nt)
              s += fast_exp2(fmaf(v[nt][0], scale_log2, -mx)) + fast_exp2(fmaf(v[nt][1], scale_log2, -mx));
            ls[mt][hf] = s;
            m[mt][hf] = mx;
          }
        }
    });
    float Mo[2][2], iv[2][2], carry[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float M = quad_max(m[mt][hf]);
        float s = (m[mt][hf] == -REFATTN_INF) ? 0.f : ls[mt][hf] * fast_exp2(m[mt][hf] - M);
        s = quad_sum(s);
        Mo[mt][hf] = (M == -REFATTN_INF) ? 0.f : M;
        iv[mt][hf] = (M == -REFATTN_INF) ? 0.f : 1.f / s;
        carry[mt][hf] = 0.f;
      }

    // ---- pass 2: probabilities, p_cmp, blocks in registers
    float* pcm = want_cmp ? p_cmp + ((size_t)b * Hq + h) * (size_t)Sq * Nc : nullptr;
    eng_walk<E>(sQ, sK, kbase, k_rs, Nc, 0, ntile, [&](int t, float (&acc)[2][8][4]) {
      const int c0 = t * KPT;
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = rowi[mt][hf];
          const int lim = nsr[mt][hf] - c0;
          const bool full = lim >= KPT;
          const float mo = Mo[mt][hf];
          float blk[NNT];
          float cprev = carry[mt][hf];
#pragma unroll
          for (int nt = 0; nt < NNT; ++nt) {
            const int cc = E::k_of_acc(lane, nt, 0);
            float pa = fast_exp2(fmaf(E::val(acc, mt, nt, 2 * hf), scale_log2, -mo));
            float pb = fast_exp2(fmaf(E::val(acc, mt, nt, 2 * hf + 1), scale_log2, -mo));
            if (!full) {
              pa = cc < lim ? pa : 0.f;
              pb = cc + 1 < lim ? pb : 0.f;
            }
            if (pcm != nullptr && row < Sq) {
              float* prow = pcm + (size_t)row * Nc;
              const int i = c0 + cc;
              if (i < Nc) prow[i] = pa * iv[mt][hf];
              if (i + 1 < Nc) prow[i + 1] = pb * iv[mt][hf];
            }
            const float v = fmaf(pb, wb, pa + pa);   // own block's share of the pair
            const float c = pb * wc;                 // p[4j+3] of odd lanes: next block
            const float s = v + __shfl_xor_sync(0xffffffffu, v, 1);
            const float got = __shfl_sync(0xffffffffu, qd == 3 ? cprev : c, src);
            blk[nt] = s + got;  // lanes 0,1: block 2nt of the tile; lanes 2,3: 2nt + 1
            cprev = c;
          }
          carry[mt][hf] = cprev;  // meaningful in lane 3: p[c0 + KPT - 1]
          // lanes 0 / 2 store blocks 8u .. 8u+3 / 8u+4 .. 8u+7 of the tile
#pragma unroll
          for (int u = 0; u < NNT / 4; ++u) {
            const float* bq = blk + 4 * u;
            const float x0 = __shfl_xor_sync(0xffffffffu, qd < 2 ? bq[2] : bq[0], 2);
            const float x1 = __shfl_xor_sync(0xffffffffu, qd < 2 ? bq[3] : bq[1], 2);
            if ((qd & 1) == 0 && row < Sq) {
              const float f = iv[mt][hf];
              const int j = t * BPT + 8 * u + 2 * qd;
              if (qd == 0) put4(slc + (size_t)row * Kb, j, bq[0] * f, x0 * f, bq[1] * f, x1 * f, hi == 0);
              else put4(slc + (size_t)row * Kb, j, x0 * f, bq[2] * f, x1 * f, bq[3] * f, hi == 0);
            }
          }
        }
    });
    // block ntile*BPT: only the carry p[ntile*KPT - 1]
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = rowi[mt][hf], j = ntile * BPT;
        if (qd == 3 && row < Sq && ntile > 0 && j < Kb) {
          float* o = slc + (size_t)row * Kb + j;
          const float x = carry[mt][hf] * iv[mt][hf];
          *o = hi == 0 ? x : *o + x;
        }
      }
    // ---- the rest of the rows: blocks past the walk (head 0), columns past the walk
#pragma unroll 1
    for (int rr = 0; rr < 32; ++rr) {
      const int row = r0 + warp * 32 + rr;
      if (row >= Sq) break;
      if (hi == 0)
        for (int j = jend + lane; j < Kb; j += 32) slc[(size_t)row * Kb + j] = 0.f;
      if (pcm != nullptr)
        for (int i = ntile * KPT + lane; i < Nc; i += 32) pcm[(size_t)row * Nc + i] = 0.f;
    }
  }
}

// =================================================================== NSA (float64)
// kc double [B, Hkv, Nc, D]; p_slc double [B, Hkv, Sq, Kb], p_cmp double [B, Hq, Sq, Nc]
// (also the logit scratch). One warp per (row, kv head); grid (ceil(Sq/4), Hkv, B).
template <typename T>
__global__ void __launch_bounds__(128) nsa_exact(
    const T* __restrict__ q, const double* __restrict__ kc, double* __restrict__ p_slc,
    double* __restrict__ p_cmp, int Hq, int G, int Sq, int Sk, int D, int Nc, int Kb, int cl,
    int cd, int pc, int ps, double scale, int causal) {
  extern __shared__ double sq_all[];  // [4][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * 4 + warp, g = blockIdx.y, b = blockIdx.z, Hkv = Hq / G;
  if (row >= Sq) return;
  double* sq = sq_all + warp * D;
  const int pos = row + Sk - Sq;
  const int ns = !causal ? Nc : (pos >= cl - 1 ? min(Nc, (pos - cl + 1) / cd + 1) : 0);
  const double* kcb = kc + ((size_t)b * Hkv + g) * (size_t)Nc * D;
  double* slc = p_slc + (((size_t)b * Hkv + g) * Sq + row) * (size_t)Kb;
#pragma unroll 1
  for (int hi = 0; hi < G; ++hi) {
    const int h = g * G + hi;
    const T* qr = q + (((size_t)b * Hq + h) * Sq + row) * (size_t)D;
    for (int d = lane; d < D; d += 32) sq[d] = to_dbl(qr[d]);
    __syncwarp();
    double* pcr = p_cmp + (((size_t)b * Hq + h) * Sq + row) * (size_t)Nc;
    double m = neg_inf_d();
    for (int i = lane; i < ns; i += 32) {
      const double* kr = kcb + (size_t)i * D;
      double z = 0.0;
      for (int d = 0; d < D; ++d) z += sq[d] * kr[d];
      z *= scale;
      pcr[i] = z;
      m = fmax(m, z);
    }
    m = warp_max_d(m);
    double l = 0.0;
    for (int i = lane; i < ns; i += 32) {
      const double e = exp(pcr[i] - m);
      pcr[i] = e;
      l += e;
    }
    l = warp_sum_d(l);
    const double inv = ns > 0 ? 1.0 / l : 0.0;
    for (int i = lane; i < Nc; i += 32) pcr[i] = i < ns ? pcr[i] * inv : 0.0;
    __syncwarp();
    for (int j = lane; j < Kb; j += 32) {
      double s = 0.0;
      const int ilo = max(0, j * ps - pc + 1), ihi = min(ns - 1, (j + 1) * ps - 1);
      for (int i = ilo; i <= ihi; ++i) s += (double)nsa_wgt(i, j, pc, ps) * pcr[i];
      slc[j] = hi == 0 ? s : slc[j] + s;
    }
    __syncwarp();
  }
}

// =================================================================== ProxyAttn (tensor cores)
// Slots: query block I has R_I = ceil(len_I / stride) sampled rows, slot I*Rmax + u (u < R_I)
// is row I*bs + len_I - 1 - (R_I - 1 - u)*stride. One CTA per QPC consecutive slots of one
// proxy head bc = bc0 + blockIdx.y (scratch slot blockIdx.y); q head bc % C (row stride
// q_rs), k head (bc % C) * k_mul / k_div.
// part, mcs float [nh, Kba, nsa]: per (key block J, slot) sum of exp2(s - m) and m (base 2)
// rst float [nh, 2, nsa]: per slot the row max M and sum L (relative to M).
// BPT = key blocks per tile (bs = KPT / BPT), or 1 with bs = TPB * KPT (TPB tiles per block).
template <typename T, int D, int QS, int KS, int BPT>
__global__ void __launch_bounds__(128) proxy_tc(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ part,
    float* __restrict__ mcs, float* __restrict__ rst, long long q_sb, long long q_sh, int q_rs,
    long long k_sb, long long k_sh, int k_rs, int k_mul, int k_div, int C, int Sq, int Sk, int bs,
    int stride, int Rmax, int Qb, int nsa, int Kba, float scale_log2, int causal, int bc0) {
  using E = Eng<T, D, QS, KS>;
  constexpr int KPT = E::KPT, NMT = E::NMT, NNT = E::NNT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + CE_BM * E::LD;
  __shared__ int sRow[CE_BM];
  __shared__ int sMax;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int hs = blockIdx.y, bc = bc0 + hs, b = bc / C, c = bc % C;
  const int s0 = (gridDim.x - 1 - blockIdx.x) * E::QPC;  // latest rows first
  const int off = Sk - Sq;
  if (tid == 0) sMax = -1;
  __syncthreads();
  for (int i = tid; i < E::QPC; i += blockDim.x) {
    const int slot = s0 + i, I = slot / Rmax, u = slot - I * Rmax;
    int row = -1;
    if (I < Qb) {
      const int len = min(bs, Sq - I * bs), R = (len - 1) / stride + 1;
      if (u < R) row = I * bs + len - 1 - (R - 1 - u) * stride;
    }
    sRow[i] = row;
    if (row >= 0) atomicMax(&sMax, row);
  }
  __syncthreads();
  const int maxrow = sMax;
  const int nkt = (Sk + KPT - 1) / KPT;
  int ntile = nkt;
  if (maxrow < 0) ntile = 0;
  else if (causal) ntile = maxrow + off < 0 ? 0 : min(nkt, (maxrow + off) / KPT + 1);
  const T* qb = q + b * q_sb + c * q_sh;
  const T* kb = k + b * k_sb + (long long)(c * k_mul / k_div) * k_sh;
  eng_load_q<E>(sQ, qb, q_rs, sRow);
  cp_async_commit();

  int lim[NMT][2], slot[NMT][2];
  float M[NMT][2], L[NMT][2], mb[NMT][2], bb[NMT][2];
#pragma unroll
  for (int mt = 0; mt < NMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int qi = E::q_of_acc(warp, lane, mt, hf);
      const int row = sRow[qi];
      lim[mt][hf] = row < 0 ? -1 : (causal ? min(Sk - 1, row + off) : Sk - 1);
      slot[mt][hf] = row < 0 ? -1 : s0 + qi;
      M[mt][hf] = -REFATTN_INF;
      L[mt][hf] = 0.f;
      mb[mt][hf] = -REFATTN_INF;
      bb[mt][hf] = 0.f;
    }
  const int TPB = BPT == 1 ? bs / KPT : 1;
  float* partH = part + (size_t)hs * Kba * nsa;
  float* mcsH = mcs + (size_t)hs * Kba * nsa;
  const bool leader = (lane & 3) == 0;

  eng_walk<E>(sQ, sK, kb, k_rs, Sk, 0, ntile, [&](int t, float (&acc)[2][8][4]) {
    const int c0 = t * KPT;
#pragma unroll
    for (int mt = 0; mt < NMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float v[NNT][2];
        float tmx = -REFATTN_INF;
#pragma unroll
        for (int nt = 0; nt < NNT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = E::val(acc, mt, nt, 2 * hf + e) * scale_log2;
            x = c0 + E::k_of_acc(lane, nt, e) <= lim[mt][hf] ? x : -REFATTN_INF;
            v[nt][e] = x;
            tmx = fmaxf(tmx, x);
          }
        tmx = quad_max(tmx);
        const int sl = slot[mt][hf];
        if constexpr (BPT == 1) {
          const float mn = fmaxf(mb[mt][hf], tmx);
          const float o = mn == -REFATTN_INF ? 0.f : mn;
          float s = 0.f;
#pragma unroll
          for (int nt = 0; nt < NNT; ++nt) s += fast_exp2(v[nt][0] - o) + fast_exp2(v[nt][1] - o);
          s = quad_sum(s);
          bb[mt][hf] = bb[mt][hf] * fast_exp2(mb[mt][hf] - o) + s;
          mb[mt][hf] = mn;
          if ((t + 1) % TPB == 0 || t + 1 == ntile) {  // end of key block (or of the walk)
            const int J = t / TPB;
            if (leader && sl >= 0) {
              partH[(size_t)J * nsa + sl] = bb[mt][hf];
              mcsH[(size_t)J * nsa + sl] = mb[mt][hf];
            }
            const float Mn = fmaxf(M[mt][hf], mb[mt][hf]);
            const float oM = Mn == -REFATTN_INF ? 0.f : Mn;
            L[mt][hf] = L[mt][hf] * fast_exp2(M[mt][hf] - oM) + bb[mt][hf] * fast_exp2(mb[mt][hf] - oM);
            M[mt][hf] = Mn;
            mb[mt][hf] = -REFATTN_INF;
            bb[mt][hf] = 0.f;
          }
        } else {
          constexpr int NPB = NNT / BPT;  // n8 groups per key block
          const float o = tmx == -REFATTN_INF ? 0.f : tmx;
          float tot = 0.f;
#pragma unroll
          for (int bl = 0; bl < BPT; ++bl) {
            float s = 0.f;
#pragma unroll
            for (int nt = bl * NPB; nt < (bl + 1) * NPB; ++nt) s += fast_exp2(v[nt][0] - o) + fast_exp2(v[nt][1] - o);
            s = quad_sum(s);
            tot += s;
            if (leader && sl >= 0) {
              partH[(size_t)(t * BPT + bl) * nsa + sl] = s;
              mcsH[(size_t)(t * BPT + bl) * nsa + sl] = tmx;
            }
          }
          const float Mn = fmaxf(M[mt][hf], tmx);
          const float oM = Mn == -REFATTN_INF ? 0.f : Mn;
          L[mt][hf] = L[mt][hf] * fast_exp2(M[mt][hf] - oM) + tot * fast_exp2(tmx - oM);
          M[mt][hf] = Mn;
        }
      }
  });
#pragma unroll
  for (int mt = 0; mt < NMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      if (leader && slot[mt][hf] >= 0) {
        rst[((size_t)hs * 2) * nsa + slot[mt][hf]] = M[mt][hf];
        rst[((size_t)hs * 2 + 1) * nsa + slot[mt][hf]] = L[mt][hf];
      }
}

// S float [B*C, Qb, Kb]: S[bc, I, J] = (1/R_I) sum_u part * exp2(mcs - M_u) / L_u over the
// rows of query block I; grid (Qb, nh), 256 threads, dynamic shared 3 * Rmax * 4 bytes.
// (U: unused; a template so that every kernel is instantiated by name.)
template <int U>
__global__ void __launch_bounds__(256) proxy_reduce(
    const float* __restrict__ part, const float* __restrict__ mcs, const float* __restrict__ rst,
    float* __restrict__ S, int Sq, int Sk, int bs, int stride, int Rmax, int Qb, int Kb, int nsa,
    int Kba, int causal, int bc0) {
  extern __shared__ float red_sh[];
  float* sM = red_sh;
  float* sI = red_sh + Rmax;
  int* sL = reinterpret_cast<int*>(red_sh + 2 * Rmax);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, nw = blockDim.x >> 5;
  const int I = blockIdx.x, hs = blockIdx.y, bc = bc0 + hs, off = Sk - Sq;
  const int len = min(bs, Sq - I * bs), R = (len - 1) / stride + 1, slot0 = I * Rmax;
  auto jlim = [&](int row) -> int {
    if (!causal) return Kb - 1;
    return row + off < 0 ? -1 : min(Kb - 1, (row + off) / bs);
  };
  for (int u = tid; u < R; u += blockDim.x) {
    const int row = I * bs + len - 1 - (R - 1 - u) * stride;
    const float Mu = rst[((size_t)hs * 2) * nsa + slot0 + u];
    const float Lu = rst[((size_t)hs * 2 + 1) * nsa + slot0 + u];
    const bool live = Mu != -REFATTN_INF && Lu > 0.f;
    sM[u] = live ? Mu : 0.f;
    sI[u] = live ? 1.f / Lu : 0.f;
    sL[u] = live ? jlim(row) : -1;
  }
  __syncthreads();
  const int jmax = jlim(I * bs + len - 1);
  const float invR = 1.f / (float)R;
  float* out = S + ((size_t)bc * Qb + I) * Kb;
  const float* pH = part + (size_t)hs * Kba * nsa;
  const float* mH = mcs + (size_t)hs * Kba * nsa;
  for (int J = warp; J < Kb; J += nw) {
    float s = 0.f;
    if (J <= jmax) {
      for (int u = lane; u < R; u += 32) {
        if (J <= sL[u]) {
          const size_t ix = (size_t)J * nsa + slot0 + u;
          s += pH[ix] * exp2f(mH[ix] - sM[u]) * sI[u];
        }
      }
    }
    s = warp_sum(s);
    if (lane == 0) out[J] = s * invR;
  }
}

// =================================================================== ProxyAttn (float64)
// qt double [B*C, Sq, D], kt double [B*C, Sk, D] (head means); S double [B*C, Qb, Kb],
// zeroed by the caller. One warp per slot; grid (ceil(Qb*Rmax / 4), B*C).
template <int U>
__global__ void __launch_bounds__(128) proxy_exact(
    const double* __restrict__ qt, const double* __restrict__ kt, double* __restrict__ S,
    int Sq, int Sk, int D, int bs, int stride, int Rmax, int Qb, int Kb, double scale, int causal) {
  extern __shared__ double sq_all[];  // [4][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long slot = (long long)blockIdx.x * 4 + warp;
  const int bc = blockIdx.y;
  if (slot >= (long long)Qb * Rmax) return;
  const int I = (int)(slot / Rmax), u = (int)(slot - (long long)I * Rmax);
  const int len = min(bs, Sq - I * bs), R = (len - 1) / stride + 1;
  if (u >= R) return;
  const int row = I * bs + len - 1 - (R - 1 - u) * stride;
  const int lim = causal ? min(Sk - 1, row + Sk - Sq) : Sk - 1;
  if (lim < 0) return;
  double* sq = sq_all + warp * D;
  const double* qr = qt + ((size_t)bc * Sq + row) * D;
  for (int d = lane; d < D; d += 32) sq[d] = qr[d];
  __syncwarp();
  const double* kb = kt + (size_t)bc * Sk * D;
  auto dot = [&](int j) -> double {
    const double* kr = kb + (size_t)j * D;
    double z = 0.0;
    for (int d = 0; d < D; ++d) z += sq[d] * kr[d];
    return z * scale;
  };
  double m = neg_inf_d(), l = 0.0;
  for (int j = lane; j <= lim; j += 32) {
    const double z = dot(j);
    if (z > m) {
      l = l * exp(m - z) + 1.0;
      m = z;
    } else {
      l += exp(z - m);
    }
  }
  const double Mx = warp_max_d(m);
  l = warp_sum_d(m == neg_inf_d() ? 0.0 : l * exp(m - Mx));
  const double f = 1.0 / (l * (double)R);
  double* out = S + ((size_t)bc * Qb + I) * Kb;
  for (int J = 0; J <= lim / bs; ++J) {
    double s = 0.0;
    const int jhi = min(lim, J * bs + bs - 1);
    for (int j = J * bs + lane; j <= jhi; j += 32) s += exp(dot(j) - Mx);
    s = warp_sum_d(s);
    if (lane == 0) atomicAdd(out + J, s * f);
  }
}

// =================================================================== PBS key importance
// Rows: the last ell query rows (row L - ell + rl, rl < ell); keys [0, Tk) of kv head h/G,
// no causal mask. Grid (nsplit, ceil(ell/128), B*Hq); split s covers tiles
// [s*tps, min(nkt, s*tps + tps)). stM, stL float [B*Hq, nsplit, ella].
// MODE 0: partial max / sum (base 2) per (row, split). MODE 1: combined statistics,
// w[bh, key] = (1/ell) sum_rows p (stored, or added when `atomic`: several row tiles).
template <typename T, int D, int MODE>
__global__ void __launch_bounds__(128) pbs_ki_tc(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ stM,
    float* __restrict__ stL, float* __restrict__ w, int Hq, int G, int L, int ell, int Tk,
    int nsplit, int tps, int ella, float scale_log2, int atomic) {
  using E = Eng<T, D, 0, 0>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + CE_BM * E::LD;
  __shared__ int sRow[CE_BM];
  __shared__ float sCol[4][64];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int split = blockIdx.x, rt = blockIdx.y, bh = blockIdx.z, b = bh / Hq, h = bh % Hq;
  const int Hkv = Hq / G;
  const T* qb = q + (size_t)bh * L * D;
  const T* kb = k + ((size_t)b * Hkv + h / G) * (size_t)L * D;
  const int nkt = (Tk + 63) / 64;
  const int t0 = split * tps, t1 = min(nkt, t0 + tps);
  for (int i = tid; i < CE_BM; i += blockDim.x) {
    const int rl = rt * CE_BM + i;
    sRow[i] = rl < ell ? L - ell + rl : -1;
  }
  __syncthreads();
  eng_load_q<E>(sQ, qb, D, sRow);
  cp_async_commit();
  int rl[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) rl[mt][hf] = rt * CE_BM + E::q_of_acc(warp, lane, mt, hf);

  if constexpr (MODE == 0) {
    float m[2][2], ls[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) { m[mt][hf] = -REFATTN_INF; ls[mt][hf] = 0.f; }
    eng_walk<E>(sQ, sK, kb, D, Tk, t0, t1, [&](int t, float (&acc)[2][8][4]) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int lim = rl[mt][hf] < ell ? Tk - t * 64 : 0;
          float v[8][2];
          float mx = m[mt][hf];
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = acc[mt][nt][2 * hf + e] * scale_log2;
              x = E::k_of_acc(lane, nt, e) < lim ? x : -REFATTN_INF;
              v[nt][e] = x;
              mx = fmaxf(mx, x);
            }
          if (mx != -REFATTN_INF) {
            float s = ls[mt][hf] * fast_exp2(m[mt][hf] - mx);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) s += fast_exp2(v[nt][0] - mx) + fast_exp2(v[nt][1] - mx);
            ls[mt][hf] = s;
            m[mt][hf] = mx;
          }
        }
    });
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float M = quad_max(m[mt][hf]);
        float s = (m[mt][hf] == -REFATTN_INF) ? 0.f : ls[mt][hf] * fast_exp2(m[mt][hf] - M);
        s = quad_sum(s);
        if ((lane & 3) == 0 && rl[mt][hf] < ell) {
          const size_t ix = ((size_t)bh * nsplit + split) * ella + rl[mt][hf];
          stM[ix] = M;
          stL[ix] = s;
        }
      }
  } else {
    float Mo[2][2], iv[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float M = -REFATTN_INF, s = 0.f;
        if (rl[mt][hf] < ell) {
          for (int sp = 0; sp < nsplit; ++sp)
            M = fmaxf(M, stM[((size_t)bh * nsplit + sp) * ella + rl[mt][hf]]);
          for (int sp = 0; sp < nsplit; ++sp) {
            const size_t ix = ((size_t)bh * nsplit + sp) * ella + rl[mt][hf];
            const float ms = stM[ix];
            if (ms != -REFATTN_INF) s += stL[ix] * exp2f(ms - M);
          }
        }
        const bool live = M != -REFATTN_INF && s > 0.f;
        Mo[mt][hf] = live ? M : 0.f;
        iv[mt][hf] = live ? 1.f / s : 0.f;
      }
    const float inv_ell = 1.f / (float)ell;
    eng_walk<E>(sQ, sK, kb, D, Tk, t0, t1, [&](int t, float (&acc)[2][8][4]) {
      float cs[8][2];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        cs[nt][0] = 0.f;
        cs[nt][1] = 0.f;
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int lim = Tk - t * 64;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p = fast_exp2(acc[mt][nt][2 * hf + e] * scale_log2 - Mo[mt][hf]) * iv[mt][hf];
              cs[nt][e] += E::k_of_acc(lane, nt, e) < lim ? p : 0.f;
            }
        }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = cs[nt][e];
          x += __shfl_xor_sync(0xffffffffu, x, 4);
          x += __shfl_xor_sync(0xffffffffu, x, 8);
          x += __shfl_xor_sync(0xffffffffu, x, 16);
          if (lane < 4) sCol[warp][E::k_of_acc(lane, nt, e)] = x;
        }
      __syncthreads();
      if (tid < 64) {
        const int key = t * 64 + tid;
        if (key < Tk) {
          const float x = (sCol[0][tid] + sCol[1][tid] + sCol[2][tid] + sCol[3][tid]) * inv_ell;
          float* o = w + (size_t)bh * Tk + key;
          if (atomic) atomicAdd(o, x);
          else *o = x;
        }
      }
    });
  }
}

// PBS key importance, float64: one warp per row; w double [B*Hq, Tk] zeroed by the caller.
// Grid (ceil(ell / 4), B*Hq).
template <typename T>
__global__ void __launch_bounds__(128) pbs_ki_exact(
    const T* __restrict__ q, const T* __restrict__ k, double* __restrict__ w, int Hq, int G, int L,
    int D, int ell, int Tk, double scale) {
  extern __shared__ double sq_all[];  // [4][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rl = blockIdx.x * 4 + warp, bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
  if (rl >= ell) return;
  const int Hkv = Hq / G;
  double* sq = sq_all + warp * D;
  const T* qr = q + ((size_t)bh * L + (L - ell + rl)) * D;
  for (int d = lane; d < D; d += 32) sq[d] = to_dbl(qr[d]);
  __syncwarp();
  const T* kb = k + ((size_t)b * Hkv + h / G) * (size_t)L * D;
  auto dot = [&](int j) -> double {
    const T* kr = kb + (size_t)j * D;
    double z = 0.0;
    for (int d = 0; d < D; ++d) z += sq[d] * to_dbl(kr[d]);
    return z * scale;
  };
  double m = neg_inf_d(), l = 0.0;
  for (int j = lane; j < Tk; j += 32) {
    const double z = dot(j);
    if (z > m) {
      l = l * exp(m - z) + 1.0;
      m = z;
    } else {
      l += exp(z - m);
    }
  }
  const double Mx = warp_max_d(m);
  l = warp_sum_d(m == neg_inf_d() ? 0.0 : l * exp(m - Mx));
  const double f = 1.0 / (l * (double)ell);
  double* wr = w + (size_t)bh * Tk;
  for (int j = lane; j < Tk; j += 32) atomicAdd(wr + j, exp(dot(j) - Mx) * f);
}

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

// out[b, c, t] = mean over heads h0..h1 of x[b, h, t], h0 = c*mul/dv, h1 = ((c+1)*mul - 1)/dv
// (query heads: mul = group_size, dv = 1; kv heads: dv = Hq/Hkv). Grid (ceil(S*D/256), C, B).
template <typename T, typename O>
__global__ void __launch_bounds__(256) head_mean(const T* __restrict__ x, O* __restrict__ out,
                                                 int H, int S, int D, int C, int mul, int dv,
                                                 int split) {
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= (long long)S * D) return;
  const int c = blockIdx.y, b = blockIdx.z;
  const int h0 = c * mul / dv, h1 = ((c + 1) * mul - 1) / dv;
  double s = 0.0;
  for (int h = h0; h <= h1; ++h) s += to_dbl(x[((size_t)b * H + h) * (size_t)S * D + idx]);
  const long long t = idx / D;
  const int d = (int)(idx - t * D);
  O* ob = out + (((size_t)b * C + c) * S + t) * (size_t)(split ? 2 * D : D);
  store_mean(ob, d, D, s / (double)(h1 - h0 + 1), split);
}

// Masked row softmax of pooled logits z double [rows = B*H*nq, nk] (times `scale`), float64.
// MODE 0 (ProxyAttn budget): legal blocks (causal: J*bs <= last row of I + Sk - Sq); a row
//   without one is 0. MODE 1 (pbs_score): allowed iff I/mseg != J/mseg and J <= I; a row
//   without one is NaN. One warp per row.
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
#define NSA_I(T, D, KS, W) template __global__ void nsa_tc<T, D, KS, W>(const T*, const T*, float*, float*, int, int, int, int, int, int, int, int, int, int, int, float, int);
#define NSA_T(T, D) NSA_I(T, D, 0, 32) NSA_I(T, D, 0, 64) NSA_I(T, D, 0, 128) NSA_I(T, D, 1, 32) NSA_I(T, D, 1, 64) NSA_I(T, D, 1, 128)
NSA_T(__nv_bfloat16, 64) NSA_T(__nv_bfloat16, 128) NSA_T(__half, 64) NSA_T(__half, 128)
#define NSA2_I(T, D, KS) template __global__ void nsa_tc2<T, D, KS>(const T*, const T*, float*, float*, int, int, int, int, int, int, int, int, int, float, int);
NSA2_I(__nv_bfloat16, 64, 0) NSA2_I(__nv_bfloat16, 64, 1) NSA2_I(__nv_bfloat16, 128, 0) NSA2_I(__nv_bfloat16, 128, 1)
NSA2_I(__half, 64, 0) NSA2_I(__half, 64, 1) NSA2_I(__half, 128, 0) NSA2_I(__half, 128, 1)
#define PX_I(T, D, QS, KS, BPT) template __global__ void proxy_tc<T, D, QS, KS, BPT>(const T*, const T*, float*, float*, float*, long long, long long, int, long long, long long, int, int, int, int, int, int, int, int, int, int, int, int, float, int, int);
#define PX_B(T, D, QS, KS) PX_I(T, D, QS, KS, 1) PX_I(T, D, QS, KS, 2) PX_I(T, D, QS, KS, 4)
#define PX_T(T, D) PX_B(T, D, 0, 0) PX_B(T, D, 1, 0) PX_B(T, D, 0, 1) PX_B(T, D, 1, 1) PX_I(T, D, 0, 0, 8) PX_I(T, D, 1, 0, 8)
PX_T(__nv_bfloat16, 64) PX_T(__nv_bfloat16, 128) PX_T(__half, 64) PX_T(__half, 128)
#define KI_I(T, D, M) template __global__ void pbs_ki_tc<T, D, M>(const T*, const T*, float*, float*, float*, int, int, int, int, int, int, int, int, float, int);
KI_I(__nv_bfloat16, 64, 0) KI_I(__nv_bfloat16, 64, 1) KI_I(__nv_bfloat16, 128, 0) KI_I(__nv_bfloat16, 128, 1)
KI_I(__half, 64, 0) KI_I(__half, 64, 1) KI_I(__half, 128, 0) KI_I(__half, 128, 1)
#define EX_T(T) \
  template __global__ void nsa_exact<T>(const T*, const double*, double*, double*, int, int, int, int, int, int, int, int, int, int, int, double, int); \
  template __global__ void pbs_ki_exact<T>(const T*, const T*, double*, int, int, int, int, int, int, double); \
  template __global__ void win_mean<T, double>(const T*, double*, int, int, int, int, int, int, int); \
  template __global__ void head_mean<T, double>(const T*, double*, int, int, int, int, int, int, int);
EX_T(float) EX_T(double) EX_T(__half) EX_T(__nv_bfloat16)
template __global__ void win_mean<__half, __half>(const __half*, __half*, int, int, int, int, int, int, int);
template __global__ void win_mean<__nv_bfloat16, __nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, int, int, int);
template __global__ void head_mean<__half, __half>(const __half*, __half*, int, int, int, int, int, int, int);
template __global__ void head_mean<__nv_bfloat16, __nv_bfloat16>(const __nv_bfloat16*, __nv_bfloat16*, int, int, int, int, int, int, int);
template __global__ void proxy_reduce<0>(const float*, const float*, const float*, float*, int, int, int, int, int, int, int, int, int, int, int);
template __global__ void proxy_exact<0>(const double*, const double*, double*, int, int, int, int, int, int, int, int, double, int);
template __global__ void pooled_softmax<0>(const double*, double*, int, int, int, int, int, int, int, double, long long);
template __global__ void pooled_softmax<1>(const double*, double*, int, int, int, int, int, int, int, double, long long);
#endif
