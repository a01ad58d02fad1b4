// Scoring kernels of NSA (op `nsa_score`), see gpu/scoring_compressed.py.
//
// Every array is contiguous bhsd. The tensor-core kernels (bf16/fp16, D in {64, 128}) run
// on the QK^T engine of gpu/qk_engine.cuh (its layout and the hi + lo operand pairs are
// described there); the float64 kernels take every dtype and geometry (fp32/fp64 inputs
// always take them).
//
//       nsa_tc      NSA: pass 1 softmax statistics per (row, head), pass 2 recomputes the
//                   logits, writes p_cmp and spreads it to selection blocks through a ring
//                   of per-row block bins in shared memory (eq. 9), summing the GQA group.
//       nsa_tc2     NSA v2 for l = 2d, l' = 4d: the same two passes, eq. 9 formed in
//                   registers by quad shuffles (no bins, no atomics); see docs/gpu_notes.md.
//       nsa_exact   float64, one warp per query row.
//   Pooled keys: win_mean of gpu/score_compressed_pool.cu.
//
// Softmax in the tensor-core kernels runs in base 2 (scores times scale*log2e, ex2.approx);
// a row that sees nothing keeps m = -inf and contributes 0, never NaN.
#include "common.cuh"
#include "exact_f64.cuh"
#include "qk_engine.cuh"

namespace refattn {

// NSA eq. 9 weight: stride pieces of compression block i (pieces i .. i+pc-1) that lie in
// selection block j (pieces j*ps .. j*ps+ps-1).
__device__ __forceinline__ int nsa_wgt(int i, int j, int pc, int ps) {
  const int lo = max(i, j * ps), hi = min(i + pc, (j + 1) * ps);
  return max(0, hi - lo);
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

#ifdef REFATTN_INSTANTIATE_ALL
// Compile check of every template the launchers use (nvcc -DREFATTN_INSTANTIATE_ALL ...).
#define NSA_I(T, D, KS, W) template __global__ void nsa_tc<T, D, KS, W>(const T*, const T*, float*, float*, int, int, int, int, int, int, int, int, int, int, int, float, int);
#define NSA_T(T, D) NSA_I(T, D, 0, 32) NSA_I(T, D, 0, 64) NSA_I(T, D, 0, 128) NSA_I(T, D, 1, 32) NSA_I(T, D, 1, 64) NSA_I(T, D, 1, 128)
NSA_T(__nv_bfloat16, 64) NSA_T(__nv_bfloat16, 128) NSA_T(__half, 64) NSA_T(__half, 128)
#define NSA2_I(T, D, KS) template __global__ void nsa_tc2<T, D, KS>(const T*, const T*, float*, float*, int, int, int, int, int, int, int, int, int, float, int);
NSA2_I(__nv_bfloat16, 64, 0) NSA2_I(__nv_bfloat16, 64, 1) NSA2_I(__nv_bfloat16, 128, 0) NSA2_I(__nv_bfloat16, 128, 1)
NSA2_I(__half, 64, 0) NSA2_I(__half, 64, 1) NSA2_I(__half, 128, 0) NSA2_I(__half, 128, 1)
#define EX_T(T) \
  template __global__ void nsa_exact<T>(const T*, const double*, double*, double*, int, int, int, int, int, int, int, int, int, int, int, double, int);
EX_T(float) EX_T(double) EX_T(__half) EX_T(__nv_bfloat16)
#endif
