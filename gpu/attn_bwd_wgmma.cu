// refattn: block-sparse flash-attention backward for Hopper (sm_90a): wgmma + TMA + mbarriers,
// warp-specialised (FlashAttention-3's backward, with the S / dP products "swapped": keys are
// the M dimension, so that P^T and dS^T stay in registers as the A operands of dV and dK).
// docs/gpu_notes.md "v-wgmma-bwd" has the design notes and the budget.
//
// One CTA = 3 warpgroups (384 threads) = one BN = 128-key tile of one (batch, kv head); it
// visits every 64-row query tile that selected the tile (transposed index form
// BlockMask.transpose(): q_num[b, h, kb], q_idx[b, h, kb, :], each selected query block cut
// into block_q / 64 tiles), for every query head of the GQA group (dK, dV summed over the group
// in registers):
//   * warpgroup 0, the producer (setmaxnreg.dec 24): its warp 0 walks the step list (h, row0);
//     lane 0 TMA-loads K and V once, then Q and dO of every step into a STAGES-deep ring; the
//     32 lanes write the step's 64 LSE (x log2 e; +inf for empty rows and rows >= Sq) and Delta
//     values and the step's (h, row0) into the stage's static shared memory. A "full"
//     mbarrier per stage (TMA transaction count + the lane-0 arrival), an "empty" one (one
//     arrival per consumer warp). After the last step a sentinel (h = -1) ends the consumers.
//   * warpgroups 1 and 2, the consumers (setmaxnreg.inc 240), own keys 64c .. 64c + 63 of the
//     tile (c = 0, 1), per step:
//       S^T  = K_c Q^T        SS wgmma m64n64k16 x 8 (A = K rows, B = Q rows, both K-major)
//       dP^T = V_c dO^T       SS wgmma m64n64k16 x 8
//       P^T  = exp2(S^T scale log2 e - lse2[query]) (masked: causal, keys >= Sk)
//       dS^T = P^T (dP^T - Delta[query])
//       dV  += P^T dO         RS wgmma m64n128k16 x 4 (P^T packed from the accumulator, dO
//                             MN-major: trans-b)
//       dK  += dS^T Q         RS wgmma m64n128k16 x 4
//       dS^T -> shared memory (16-bit, [key][query], 128-byte swizzle; double-buffered), named
//       barrier of the two consumer warpgroups, then
//       dQ[:, 64c .. 64c+63] = dS K[:, 64c ..]   SS wgmma m64n64k16 x 8, A = dS^T read MN-major
//                             (trans-a), B = K read MN-major (trans-b); added to the fp32 dQ
//                             buffer with 16-byte vector atomics (scaled).
//     At the end dK (scaled) and dV are written (fp32 [B, Hkv, Sk, D]).
//
// Tensor maps (CUtensorMap, 128 bytes each, in global memory): q (box 64 x 64 rows), k
// (box 64 x 128), v (box 64 x 128), dO (box 64 x 64), built by the host over [B, H, S, D] with
// CU_TENSOR_MAP_SWIZZLE_128B (attention.py). Out-of-bounds rows arrive as zeros. Only D = 128
// (two 64-wide halves per row). block_q % 64 == 0 and block_k % 128 == 0 (or q_num == nullptr:
// dense, pass block_q = 64, block_k = 128).
//
// Under a target other than sm_90a (e.g. the CI compile with -arch=sm_90) every kernel of this
// file compiles to a trap.
#include "common.cuh"
#include "wgmma.cuh"

namespace refattn {
namespace wg {

__device__ __forceinline__ void st_shared_u32(unsigned addr, unsigned v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

}  // namespace wg
}  // namespace refattn

// out[0] = 1 when this compile had the sm_90a feature set (wgmma), out[1] = __CUDA_ARCH__.
__global__ void wgmma_bwd_feature_probe(int* out) {
#if defined(__CUDA_ARCH__)
  if (threadIdx.x == 0) {
    out[0] = REFATTN_SM90A;
    out[1] = __CUDA_ARCH__;
  }
#endif
}

// One warpgroup: C [64 x 64] fp32 = A [64 x K] * B [K x 64], exactly as the backward forms
// dQ = dS K: A given as its transpose At [K][64] (row-major, m contiguous) and B as [K][64]
// (n contiguous), both written to shared memory with the 128-byte swizzle ([K][64], one
// 128-byte row per k) and read MN-major (trans-a, trans-b) by K / 16 SS wgmmas.
// Dynamic shared memory: 2 * K * 128 + 1024 bytes.
template <typename T, int K>
__global__ void __launch_bounds__(128) wgmma_probe_tt(const T* __restrict__ At, const T* __restrict__ B,
                                                      float* __restrict__ C) {
#if REFATTN_SM90A
  using namespace refattn;
  using namespace refattn::wg;
  extern __shared__ unsigned char smem_raw[];
  const unsigned raw = smem_addr(smem_raw);
  const unsigned base = (raw + 1023u) & ~1023u;
  unsigned char* gb = smem_raw + (base - raw);
  const unsigned sA = base, sB = base + K * 128;
  for (int i = threadIdx.x; i < K * 64; i += 128) {
    const int r = i / 64, c = i % 64;
    *reinterpret_cast<T*>(gb + swz128(r, c)) = At[i];
    *reinterpret_cast<T*>(gb + K * 128 + swz128(r, c)) = B[i];
  }
  fence_proxy_async();
  __syncthreads();
  float d[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) reg_fence(d[i]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk)
    wgmma_ss_t<T, 64, 1, 1>(d, make_desc(sA + kk * 16 * 128, K * 128, 1024),
                            make_desc(sB + kk * 16 * 128, K * 128, 1024), kk > 0);
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 32; ++i) reg_fence(d[i]);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31, g = l >> 2, q = l & 3;
#pragma unroll
  for (int j = 0; j < 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) C[(16 * w + g + 8 * (e >> 1)) * 64 + 8 * j + 2 * q + (e & 1)] = d[4 * j + e];
#else
  __trap();
#endif
}

// Grid (ceil(Sk / 128), Hkv, B), 384 threads, dynamic shared memory
// 1024 + 2 * 128 * D * 2 + STAGES * 2 * 64 * D * 2 + 2 * 128 * 64 * 2 bytes.
template <typename T, int D, int STAGES>
__global__ void __launch_bounds__(384, 1) attn_bwd_wgmma(
    const unsigned char* __restrict__ maps, const float* __restrict__ lse,
    const float* __restrict__ delta, float* __restrict__ dq, float* __restrict__ dk,
    float* __restrict__ dv, int Hq, int Hkv, int Sq, int Sk, float scale, float scale_log2,
    int causal, const int* __restrict__ q_num, const int* __restrict__ q_idx, long long tn_sb,
    long long tn_sh, long long ti_sb, long long ti_sh, int q_width, int block_q, int block_k) {
#if REFATTN_SM90A
  using namespace refattn;
  using namespace refattn::wg;
  static_assert(D == 128, "the wgmma backward takes D = 128");
  constexpr int BN = 128, BM = 64, NH = D / 64;
  constexpr unsigned KV_BYTES = BN * D * 2, QT_BYTES = BM * D * 2, DS_BYTES = BN * BM * 2;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 bars[1 + 2 * STAGES];
  __shared__ __align__(16) float sLse[STAGES][BM];
  __shared__ __align__(16) float sDel[STAGES][BM];
  __shared__ int sMeta[STAGES][2];
  const unsigned base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  // K [NH][BN][64], V [NH][BN][64], then per stage Q [NH][BM][64] and dO [NH][BM][64], then
  // two dS^T buffers [BN][64]
  const unsigned sK = base, sV = sK + KV_BYTES, sQ = sV + KV_BYTES;
  const unsigned sDS = sQ + STAGES * 2 * QT_BYTES;
  const unsigned bkv = smem_addr(bars);
  auto full = [&](int s) { return bkv + 8u * (1 + s); };
  auto empty = [&](int s) { return bkv + 8u * (1 + STAGES + s); };

  const int tid = threadIdx.x;
  const int t = blockIdx.x, g = blockIdx.y, b = blockIdx.z;  // causal: tile 0 has the most work
  const int n0 = t * BN;
  const int G = Hq / Hkv, off = Sk - Sq;
  if (tid == 0) {
    mbar_init(bkv, 1);
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 8);  // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int wg_idx = __shfl_sync(0xffffffffu, tid / 128, 0);
  if (wg_idx == 0) {
    // ------------------------------------------------------------ producer
    setmaxnreg_dec<24>();
    if (tid < 32) {
      const int lane = tid;
      const unsigned char* mq = maps;
      const unsigned char* mdo = maps + 384;
      if (lane == 0) {
        const unsigned char* mk = maps + 128;
        const unsigned char* mv = maps + 256;
        tensormap_acquire(mq);
        tensormap_acquire(mk);
        tensormap_acquire(mv);
        tensormap_acquire(mdo);
        mbar_expect_tx(bkv, 2 * KV_BYTES);
#pragma unroll
        for (int hh = 0; hh < NH; ++hh) {
          tma_load_4d(sK + hh * BN * 128, mk, bkv, hh * 64, n0, g, b);
          tma_load_4d(sV + hh * BN * 128, mv, bkv, hh * 64, n0, g, b);
        }
      }
      const int kbm = n0 / block_k;
      const int SPB = block_q / BM;
      int it = 0;
#pragma unroll 1
      for (int h = g * G; h < (g + 1) * G; ++h) {
        const long long bh = (long long)b * Hq + h;
        const int* qi = nullptr;
        int nq = (Sq + BM - 1) / BM;
        if (q_num != nullptr) {
          nq = q_num[b * tn_sb + h * tn_sh + kbm] * SPB;
          qi = q_idx + b * ti_sb + h * ti_sh + (long long)kbm * q_width;
        }
#pragma unroll 1
        for (int p = 0; p < nq; ++p) {
          const int row0 = qi == nullptr ? p * BM : qi[p / SPB] * block_q + (p % SPB) * BM;
          if (row0 >= Sq) continue;
          if (causal && min(row0 + BM - 1, Sq - 1) + off < n0) continue;  // sees no key of the tile
          const int s = it % STAGES;
          const unsigned ph = (it / STAGES) & 1;
          mbar_wait(empty(s), ph ^ 1);
#pragma unroll
          for (int i = lane; i < BM; i += 32) {
            const int row = row0 + i;
            float l2 = REFATTN_INF, dl = 0.f;
            if (row < Sq) {
              const float l = lse[bh * Sq + row];
              l2 = l == -REFATTN_INF ? REFATTN_INF : l * kLog2e;
              dl = delta[bh * Sq + row];
            }
            sLse[s][i] = l2;
            sDel[s][i] = dl;
          }
          if (lane == 0) {
            sMeta[s][0] = h;
            sMeta[s][1] = row0;
          }
          __threadfence_block();
          __syncwarp();
          if (lane == 0) {
            mbar_expect_tx(full(s), 2 * QT_BYTES);
            const unsigned qd = sQ + s * 2 * QT_BYTES;
#pragma unroll
            for (int hh = 0; hh < NH; ++hh) {
              tma_load_4d(qd + hh * BM * 128, mq, full(s), hh * 64, row0, h, b);
              tma_load_4d(qd + QT_BYTES + hh * BM * 128, mdo, full(s), hh * 64, row0, h, b);
            }
          }
          ++it;
        }
      }
      // sentinel: h = -1 ends the consumers
      const int s = it % STAGES;
      mbar_wait(empty(s), ((it / STAGES) & 1) ^ 1);
      if (lane == 0) {
        sMeta[s][0] = -1;
        __threadfence_block();
        mbar_arrive(full(s));
      }
    }
  } else {
    // -------------------------------------------------------------- consumers
    setmaxnreg_inc<240>();
    const int cw = wg_idx - 1;  // keys 64 cw .. 64 cw + 63 of the tile
    const int kw = cw * 64;
    const int warp = (tid >> 5) & 3, lane = tid & 31, gr = lane >> 2, q4 = lane & 3;
    const int key_lo = n0 + kw + warp * 16 + gr;  // this thread's keys: key_lo, key_lo + 8
    const bool odd = lane & 1;

    float acc_dk[D / 2], acc_dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) acc_dk[i] = acc_dv[i] = 0.f;

    mbar_wait(bkv, 0);
#pragma unroll 1
    for (int it = 0;; ++it) {
      const int s = it % STAGES;
      mbar_wait(full(s), (it / STAGES) & 1);
      const int h = sMeta[s][0];
      if (h < 0) break;
      const int row0 = sMeta[s][1];
      const unsigned sq = sQ + s * 2 * QT_BYTES, sdo = sq + QT_BYTES;
      const unsigned ds = sDS + (it & 1) * DS_BYTES;

      // ---- S^T = K_c Q^T, dP^T = V_c dO^T (two groups)
      float sc[BM / 2], dp[BM / 2];
#pragma unroll
      for (int i = 0; i < BM / 2; ++i) {
        reg_fence(sc[i]);
        reg_fence(dp[i]);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned ko = (kk & 3) * 32, hh = kk >> 2;
        wgmma_ss<T, BM>(sc, make_desc(sK + hh * BN * 128 + kw * 128 + ko, 16, 1024),
                        make_desc(sq + hh * BM * 128 + ko, 16, 1024), kk > 0);
      }
      wgmma_commit();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned ko = (kk & 3) * 32, hh = kk >> 2;
        wgmma_ss<T, BM>(dp, make_desc(sV + hh * BN * 128 + kw * 128 + ko, 16, 1024),
                        make_desc(sdo + hh * BM * 128 + ko, 16, 1024), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<1>();
#pragma unroll
      for (int i = 0; i < BM / 2; ++i) reg_fence(sc[i]);

      // ---- P^T = exp2(S^T * scale log2 e - lse2), masked
      const bool need_mask = (n0 + kw + 64 > Sk) || (causal && n0 + kw + 63 > row0 + off);
#pragma unroll
      for (int j = 0; j < BM / 8; ++j) {
        const float2 l2 = *reinterpret_cast<const float2*>(&sLse[s][8 * j + 2 * q4]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float p = fast_exp2(fmaf(sc[4 * j + e], scale_log2, -((e & 1) ? l2.y : l2.x)));
          if (need_mask) {
            const int key = key_lo + 8 * (e >> 1);
            const int row = row0 + 8 * j + 2 * q4 + (e & 1);
            if (key >= Sk || (causal && key > row + off)) p = 0.f;
          }
          sc[4 * j + e] = p;
        }
      }
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < BM / 2; ++i) reg_fence(dp[i]);
      // ---- dS^T = P^T (dP^T - Delta)
#pragma unroll
      for (int j = 0; j < BM / 8; ++j) {
        const float2 d2 = *reinterpret_cast<const float2*>(&sDel[s][8 * j + 2 * q4]);
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[4 * j + e] = sc[4 * j + e] * (dp[4 * j + e] - ((e & 1) ? d2.y : d2.x));
      }
      unsigned aP[BM / 16][4], aS[BM / 16][4];
      acc_to_afrag<T, BM>(aP, sc);
      acc_to_afrag<T, BM>(aS, dp);
      // dS^T (16-bit) -> shared memory, [key][query], 128-byte swizzle
      {
        const int r = kw + warp * 16 + gr;
#pragma unroll
        for (int j = 0; j < BM / 8; ++j) {
          const int col = 8 * j + 2 * q4;
          st_shared_u32(ds + swz128(r, col), aS[j >> 1][2 * (j & 1)]);
          st_shared_u32(ds + swz128(r + 8, col), aS[j >> 1][2 * (j & 1) + 1]);
        }
      }
      fence_proxy_async();

      // ---- dV += P^T dO, dK += dS^T Q (RS, B MN-major)
#pragma unroll
      for (int i = 0; i < D / 2; ++i) {
        reg_fence(acc_dv[i]);
        reg_fence(acc_dk[i]);
      }
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          reg_fence(aP[kk][i]);
          reg_fence(aS[kk][i]);
        }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
        wgmma_rs<T, D>(acc_dv, aP[kk], make_desc(sdo + kk * 16 * 128, BM * 128, 1024), 1);
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk)
        wgmma_rs<T, D>(acc_dk, aS[kk], make_desc(sq + kk * 16 * 128, BM * 128, 1024), 1);
      wgmma_commit();

      // ---- dQ[:, 64 cw ..] = dS K[:, 64 cw ..] once both halves of dS^T are in shared memory
      named_sync(1, 256);
      float dqa[32];
#pragma unroll
      for (int i = 0; i < 32; ++i) reg_fence(dqa[i]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        wgmma_ss_t<T, 64, 1, 1>(dqa, make_desc(ds + kk * 16 * 128, BN * 128, 1024),
                                make_desc(sK + cw * BN * 128 + kk * 16 * 128, BN * 128, 1024), kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < 32; ++i) reg_fence(dqa[i]);
#pragma unroll
      for (int i = 0; i < D / 2; ++i) {
        reg_fence(acc_dv[i]);
        reg_fence(acc_dk[i]);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(s));  // Q, dO, LSE, Delta of stage s no longer needed

      // ---- dQ atomics: lanes 2u and 2u+1 pool their pairs into 16-byte vector atomics
      {
        const long long bh = (long long)b * Hq + h;
        const int ra = row0 + warp * 16 + gr, rb = ra + 8;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float* a = dqa + 4 * j;
          const float s0 = odd ? a[0] : a[2];
          const float s1 = odd ? a[1] : a[3];
          const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1);
          const float r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
          const int col = cw * 64 + 8 * j + 4 * (q4 >> 1);  // this warpgroup's d half
          if (!odd) {
            if (ra < Sq)
              atomic_add4(dq + (bh * Sq + ra) * D + col, a[0] * scale, a[1] * scale, r0 * scale,
                          r1 * scale);
          } else {
            if (rb < Sq)
              atomic_add4(dq + (bh * Sq + rb) * D + col, r0 * scale, r1 * scale, a[2] * scale,
                          a[3] * scale);
          }
        }
      }
    }

    // ---- dK (scaled), dV of this warpgroup's 64 keys (fp32 [B, Hkv, Sk, D])
    const long long kv_row0 = ((long long)b * Hkv + g) * Sk;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int key = key_lo + 8 * hf;
      if (key >= Sk) continue;
      float* pk = dk + (kv_row0 + key) * D;
      float* pv = dv + (kv_row0 + key) * D;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int col = 8 * j + 2 * q4;
        *reinterpret_cast<float2*>(pk + col) =
            make_float2(acc_dk[4 * j + 2 * hf] * scale, acc_dk[4 * j + 2 * hf + 1] * scale);
        *reinterpret_cast<float2*>(pv + col) = make_float2(acc_dv[4 * j + 2 * hf], acc_dv[4 * j + 2 * hf + 1]);
      }
    }
  }  // consumers
#else
  __trap();
#endif
}
