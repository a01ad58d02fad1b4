// refattn: block-sparse flash-attention backward on tensor cores (mma.sync m16n8k16).
//
// FlashAttention-2's backward (Dao 2023, Alg. 2), key-tile parallel: one CTA = BN/16 warps
// owns a BN-key tile (BN = 64 or 128) of one kv head, keeps K and V in shared memory and dK, dV in registers
// (warp w: keys 16w..16w+15), and visits every 64-row query tile that selected the tile,
// for each query head of the GQA group (so dK, dV are summed over the group in registers).
// The query tiles come from the transposed index form (BlockMask.transpose():
// q_num[b, h, kb], q_idx[b, h, kb, :]) in block mode, or, for per-token routing
// (block_q = 1, GATHER), from the gathered row lists of each (b, h, key block) segment.
// Per query tile, with P = exp(S - lse) recomputed:
//     S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - Delta),
//     dK += dS^T Q, dQ += dS K   (dQ by fp32 atomics into a zeroed buffer)
// Delta_i = sum_d dO_id O_id is precomputed by the launcher. scale is applied to dK, dQ.
#include "common.cuh"

namespace refattn {

template <typename T, int D, int BN, bool GATHER>
__device__ __forceinline__ void bwd_mma_body(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ dO, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv, long long q_sb,
    long long q_sh, long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb,
    long long v_sh, long long v_ss, int Hq, int Hkv, int Sq, int Sk, float scale, float scale_log2,
    int causal, const int* __restrict__ q_num, const int* __restrict__ q_idx, long long tn_sb,
    long long tn_sh, long long ti_sb, long long ti_sh, int q_width, int block_q, int block_k,
    const long long* __restrict__ seg_off, const int* __restrict__ seg_cnt,
    const int* __restrict__ g_rows, int Kb) {
  constexpr int BM = 64;               // query rows per step
  constexpr int NW = BN / 16;          // warps: warp w owns keys 16w..16w+15 of the tile
  constexpr int NT = NW * 32;          // threads (the launcher uses exactly this many)
  constexpr int QG = BM / 16;          // dQ: query groups of 16 rows ...
  constexpr int CS = NW / QG;          // ... times column slices of D / CS
  constexpr int LDS = D + 8, LDP = BM + 8, CH = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * LDS;
  T* sQ = sV + BN * LDS;
  T* sdO = sQ + BM * LDS;
  T* sDS = sdO + BM * LDS;  // dS^T as [key][query]
  int* sRowB = reinterpret_cast<int*>(sDS + BN * LDP);       // [2][BM] rows (-1: none)
  float* sLseB = reinterpret_cast<float*>(sRowB + 2 * BM);   // [2][BM] lse*log2(e); +inf: none
  float* sDelB = sLseB + 2 * BM;                              // [2][BM] Delta

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int t = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int n0 = t * BN;
  const int kbm = n0 / block_k;  // mask block of this key tile
  const int G = Hq / Hkv, off = Sk - Sq;
  const T* kbase = k + b * k_sb + g * k_sh;
  const T* vbase = v + b * v_sb + g * v_sh;

  #pragma unroll 1
  for (int i = tid; i < BN * CH; i += NT) {
    const int r = i / CH, c = (i % CH) * 8;
    const int key = n0 + r;
    const bool ok = key < Sk;
    cp_async16(sK + r * LDS + c, ok ? kbase + key * k_ss + c : kbase, ok);
    cp_async16(sV + r * LDS + c, ok ? vbase + key * v_ss + c : vbase, ok);
  }
  cp_async_commit();

  float acc_dk[D / 8][4], acc_dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[j][e] = acc_dv[j][e] = 0.f;

  const int key_a = n0 + warp * 16 + (lane >> 2);  // this thread's keys: key_a, key_a + 8
  const int SPB = block_q >= BM ? block_q / BM : 1;

  // ---- the query tiles of this key tile: steps (h, p) over the heads of the group, p-th
  // 64-row tile of head h; steps whose rows all lie before the key tile (causal) are skipped.
  const int h_end = (g + 1) * G;
  auto head_steps = [&](int h) -> int {
    if (GATHER) return (seg_cnt[((long long)b * Hq + h) * Kb + kbm] + BM - 1) / BM;
    if (q_num == nullptr) return (Sq + BM - 1) / BM;
    return q_num[b * tn_sb + h * tn_sh + kbm] * SPB;
  };
  // row i of step (h, p), or -1
  auto row_of = [&](int h, int p, int i) -> int {
    if (GATHER) {
      const long long s = ((long long)b * Hq + h) * Kb + kbm;
      const int idx = p * BM + i;
      return idx < seg_cnt[s] ? g_rows[seg_off[s] + idx] : -1;
    }
    int start = p * BM;
    if (q_num != nullptr) {
      if ((p % SPB) * BM + i >= block_q) return -1;
      start = q_idx[b * ti_sb + h * ti_sh + (long long)kbm * q_width + p / SPB] * block_q +
              (p % SPB) * BM;
    }
    return start + i < Sq ? start + i : -1;
  };
  auto visible = [&](int h, int p) -> bool {
    if (!causal) return true;
    int last;
    if (GATHER) {
      const long long s = ((long long)b * Hq + h) * Kb + kbm;
      last = g_rows[seg_off[s] + min(seg_cnt[s], (p + 1) * BM) - 1];
    } else {
      const int r0 = row_of(h, p, 0);
      last = r0 < 0 ? -1 : min(r0 + BM - 1, Sq - 1);
      if (q_num != nullptr) last = min(last, (r0 / block_q + 1) * block_q - 1);
      if (r0 < 0) return false;
    }
    return n0 <= last + off;
  };
  auto advance = [&](int& h, int& p) {  // (h, p) -> next visible step; h == h_end: none
    ++p;
    while (h < h_end) {
      const int n = head_steps(h);
      while (p < n && !visible(h, p)) ++p;
      if (p < n) return;
      ++h;
      p = 0;
    }
  };
  auto fill_rows = [&](int h, int p, int buf) {  // threads 0..BM-1
    if (tid < BM) {
      const long long bh = (long long)b * Hq + h;
      const int row = row_of(h, p, tid);
      float l2 = REFATTN_INF, dl = 0.f;
      if (row >= 0) {
        const float l = lse[bh * Sq + row];
        l2 = l == -REFATTN_INF ? REFATTN_INF : l * kLog2e;
        dl = delta[bh * Sq + row];
      }
      sRowB[buf * BM + tid] = row;
      sLseB[buf * BM + tid] = l2;
      sDelB[buf * BM + tid] = dl;
    }
  };
  auto load_qdo = [&](int h, int buf) {  // Q and dO rows of the step whose rows are in buf
    const T* qbase = q + b * q_sb + h * q_sh;
    const long long bh = (long long)b * Hq + h;
    #pragma unroll 1
    for (int i = tid; i < BM * CH; i += NT) {
      const int r = i / CH, c = (i % CH) * 8;
      const int row = sRowB[buf * BM + r];
      cp_async16(sQ + r * LDS + c, row >= 0 ? qbase + row * q_ss + c : qbase, row >= 0);
      cp_async16(sdO + r * LDS + c, row >= 0 ? dO + (bh * Sq + row) * D + c : dO, row >= 0);
    }
    cp_async_commit();
  };

  int ch = g * G, cpi = -1;
  advance(ch, cpi);
  int buf = 0;
  if (ch < h_end) {
    fill_rows(ch, cpi, 0);
    __syncthreads();
    load_qdo(ch, 0);
  }
  while (ch < h_end) {
    const int h = ch;
    const long long bh = (long long)b * Hq + h;
    const int* sRow = sRowB + buf * BM;
    const float* sLse = sLseB + buf * BM;
    const float* sDel = sDelB + buf * BM;
    cp_async_wait<0>();
    __syncthreads();  // Q, dO (and K, V) of this step are in shared memory
    int nh = ch, np_ = cpi;
    advance(nh, np_);
    if (nh < h_end) fill_rows(nh, np_, buf ^ 1);  // overlaps with the GEMMs below
    {
      // ---- S^T = K Q^T (warp: 16 keys x 64 queries)
      float acc_s[BM / 8][4];
#pragma unroll
      for (int j = 0; j < BM / 8; ++j) acc_s[j][0] = acc_s[j][1] = acc_s[j][2] = acc_s[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        unsigned a[4];
        load_a<false>(a, sK + warp * 16 * LDS, LDS, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BM / 16; ++np) {
          unsigned bb[4];
          load_b<false>(bb, sQ, LDS, np * 16, kk * 16, lane);
          mma16816<T>(acc_s[2 * np], a, bb[0], bb[1]);
          mma16816<T>(acc_s[2 * np + 1], a, bb[2], bb[3]);
        }
      }
      // P^T = exp2(S^T * scale*log2e - lse2[query]), masked
#pragma unroll
      for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + 2 * (lane & 3) + (e & 1);
          const int key = key_a + 8 * (e >> 1);
          const int row = sRow[qi];
          const bool vis = row >= 0 && key < Sk && (!causal || key <= row + off);
          acc_s[j][e] = vis ? exp2f(acc_s[j][e] * scale_log2 - sLse[qi]) : 0.f;
        }
      }
      // ---- dV += P^T dO
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        unsigned a[4];
        acc_to_a<T>(a, acc_s[2 * kk], acc_s[2 * kk + 1]);
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          unsigned bb[4];
          load_b<true>(bb, sdO, LDS, np * 16, kk * 16, lane);
          mma16816<T>(acc_dv[2 * np], a, bb[0], bb[1]);
          mma16816<T>(acc_dv[2 * np + 1], a, bb[2], bb[3]);
        }
      }
      // ---- dP^T = V dO^T, dS^T = P^T (dP^T - Delta)
      float acc_p[BM / 8][4];
#pragma unroll
      for (int j = 0; j < BM / 8; ++j) acc_p[j][0] = acc_p[j][1] = acc_p[j][2] = acc_p[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        unsigned a[4];
        load_a<false>(a, sV + warp * 16 * LDS, LDS, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < BM / 16; ++np) {
          unsigned bb[4];
          load_b<false>(bb, sdO, LDS, np * 16, kk * 16, lane);
          mma16816<T>(acc_p[2 * np], a, bb[0], bb[1]);
          mma16816<T>(acc_p[2 * np + 1], a, bb[2], bb[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qi = j * 8 + 2 * (lane & 3) + (e & 1);
          acc_p[j][e] = acc_s[j][e] * (acc_p[j][e] - sDel[qi]);
        }
      }
      // ---- dK += dS^T Q ; stash dS^T (16-bit) for dQ
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        unsigned a[4];
        acc_to_a<T>(a, acc_p[2 * kk], acc_p[2 * kk + 1]);
        const int kr = warp * 16 + (lane >> 2);
        const int qc = kk * 16 + 2 * (lane & 3);
        *reinterpret_cast<unsigned*>(sDS + kr * LDP + qc) = a[0];
        *reinterpret_cast<unsigned*>(sDS + (kr + 8) * LDP + qc) = a[1];
        *reinterpret_cast<unsigned*>(sDS + kr * LDP + qc + 8) = a[2];
        *reinterpret_cast<unsigned*>(sDS + (kr + 8) * LDP + qc + 8) = a[3];
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          unsigned bb[4];
          load_b<true>(bb, sQ, LDS, np * 16, kk * 16, lane);
          mma16816<T>(acc_dk[2 * np], a, bb[0], bb[1]);
          mma16816<T>(acc_dk[2 * np + 1], a, bb[2], bb[3]);
        }
      }
      __syncthreads();  // sQ, sdO free; dS^T and the next step's rows visible
      if (nh < h_end) load_qdo(nh, buf ^ 1);  // next step's Q, dO load during dQ
      // ---- dQ += dS K  (warp: queries 16w..16w+15, in 32-column chunks)
      {
        const int qg = warp % QG, cs = warp / QG;
        const int qa = qg * 16 + (lane >> 2);
        const int row_a = sRow[qa], row_b = sRow[qa + 8];
#pragma unroll
        for (int c = 0; c < D / 32 / CS; ++c) {
          const int col0 = cs * (D / CS) + c * 32;
          float acc_q[4][4];
#pragma unroll
          for (int j = 0; j < 4; ++j) acc_q[j][0] = acc_q[j][1] = acc_q[j][2] = acc_q[j][3] = 0.f;
#pragma unroll
          for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned a[4];
            load_a<true>(a, sDS + qg * 16, LDP, kk * 16, lane);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
              unsigned bb[4];
              load_b<true>(bb, sK, LDS, col0 + np * 16, kk * 16, lane);
              mma16816<T>(acc_q[2 * np], a, bb[0], bb[1]);
              mma16816<T>(acc_q[2 * np + 1], a, bb[2], bb[3]);
            }
          }
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            // lanes 2u and 2u+1 pool their pairs: the even lane adds 4 columns of row a,
            // the odd lane 4 columns of row b (one 16-byte vector atomic each)
            const bool odd = lane & 1;
            const float s0 = odd ? acc_q[j][0] : acc_q[j][2];  // what the partner needs
            const float s1 = odd ? acc_q[j][1] : acc_q[j][3];
            const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1);
            const float r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
            const int col = col0 + j * 8 + 4 * ((lane & 3) >> 1);
            if (!odd) {
              if (row_a >= 0)
                atomic_add4(dq + (bh * Sq + row_a) * D + col, acc_q[j][0] * scale,
                            acc_q[j][1] * scale, r0 * scale, r1 * scale);
            } else {
              if (row_b >= 0)
                atomic_add4(dq + (bh * Sq + row_b) * D + col, r0 * scale, r1 * scale,
                            acc_q[j][2] * scale, acc_q[j][3] * scale);
            }
          }
        }
      }
    }
    ch = nh;
    cpi = np_;
    buf ^= 1;
  }
  cp_async_wait<0>();

  // ---- write dK (scaled) and dV for this key tile (fp32, [B, Hkv, Sk, D])
  const long long kv_row0 = ((long long)b * Hkv + g) * Sk;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int key = key_a + 8 * hf;
    if (key >= Sk) continue;
    float* pk = dk + (kv_row0 + key) * D;
    float* pv = dv + (kv_row0 + key) * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int col = j * 8 + 2 * (lane & 3);
      *reinterpret_cast<float2*>(pk + col) =
          make_float2(acc_dk[j][2 * hf] * scale, acc_dk[j][2 * hf + 1] * scale);
      *reinterpret_cast<float2*>(pv + col) = make_float2(acc_dv[j][2 * hf], acc_dv[j][2 * hf + 1]);
    }
  }
}

}  // namespace refattn

#define REFATTN_BWD_ARGS                                                                        \
  const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,                    \
      const T *__restrict__ dO, const float *__restrict__ lse, const float *__restrict__ delta, \
      float *__restrict__ dq, float *__restrict__ dk, float *__restrict__ dv, long long q_sb,   \
      long long q_sh, long long q_ss, long long k_sb, long long k_sh, long long k_ss,           \
      long long v_sb, long long v_sh, long long v_ss, int Hq, int Hkv, int Sq, int Sk,          \
      float scale, float scale_log2, int causal, const int *__restrict__ q_num,                 \
      const int *__restrict__ q_idx, long long tn_sb, long long tn_sh, long long ti_sb,         \
      long long ti_sh, int q_width, int block_q, int block_k,                                   \
      const long long *__restrict__ seg_off, const int *__restrict__ seg_cnt,                   \
      const int *__restrict__ g_rows, int Kb
#define REFATTN_BWD_PASS                                                                        \
  q, k, v, dO, lse, delta, dq, dk, dv, q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss,    \
      Hq, Hkv, Sq, Sk, scale, scale_log2, causal, q_num, q_idx, tn_sb, tn_sh, ti_sb, ti_sh,     \
      q_width, block_q, block_k, seg_off, seg_cnt, g_rows, Kb

// BN = 64 (4 warps, 2 CTAs per SM) or 128 (8 warps, 1 CTA per SM; halves the dQ atomics per
// FLOP); BN must divide the mask's block_k.
template <typename T, int D, int BN>
__global__ void __launch_bounds__(BN * 2, 128 / BN) attn_bwd_block(REFATTN_BWD_ARGS) {
  refattn::bwd_mma_body<T, D, BN, false>(REFATTN_BWD_PASS);
}

template <typename T, int D, int BN>
__global__ void __launch_bounds__(BN * 2, 128 / BN) attn_bwd_gather(REFATTN_BWD_ARGS) {
  refattn::bwd_mma_body<T, D, BN, true>(REFATTN_BWD_PASS);
}
