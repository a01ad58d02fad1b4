// XAttention antidiagonal block scoring on Hopper (sm_90a): the product of xatt_gemm
// (gpu/score_xattn.cu) with wgmma + TMA + warp specialisation, the same scratch format and
// the same epilogue, so that xatt_reduce<BT> finishes it unchanged. gpu/scoring.py selects it
// with XA_CONFIG = "wgmma" (docs/gpu_notes.md, "v-wgmma-xattn").
//
// Notation as score_xattn.cu: stride S, T_tiles tiles on the chunk-padded length, the logit
// of tile pair (i, j) is  A[i, j] = scale * sum_{u < S} < Q[iS + S-1-u], K[jS + u] >.
// Both strided operands are read by TMA through 5-d tensor maps over the contiguous
// [B, H, L, D] arrays viewed as [B, H, L/S, S, D] (innermost first: D, S, L/S, H, B;
// requires L % S == 0): the box {64, 1, R, 1, 1} at (d0, u, t0, h, b) is the R rows
// X[(t0 + r) S + u][d0 .. d0 + 64) -- exactly one k-slice of R rows of Qr (u -> S-1-u) or
// Kr, written with the 128-byte swizzle that wgmma's K-major descriptors read. Tiles past
// L/S (chunk padding, rows of the last CTA) arrive as zeros: the official zero padding.
//
// One CTA = 3 warpgroups (384 threads) = BM = 128 query tiles of one (batch, head):
//   * warpgroup 0 (producer, setmaxnreg.dec 24): one thread walks the k-slices (key chunk
//     ct of BN = 256 key tiles, token offset u, 64-wide half of D) and TMA-loads the Q slice
//     (128 x 64) and the K slice (256 x 64) of each into a STAGES-deep ring of 48 KB stages
//     ("full" mbarrier with the transaction count, "empty" mbarrier: one arrival per
//     consumer warp);
//   * warpgroups 1, 2 (consumers, setmaxnreg.inc 240) own 64 query tiles each: per slice 4
//     SS wgmma m64nNk16 (N = 256; under causal masking the key chunk that crosses the
//     warpgroup's diagonal uses N = 64 or 128 when only its first one or two 64-key chunks
//     hold a visible key), accumulators in registers (128 fp32 per thread), one wgmma group
//     in flight while the next slice is waited for;
//   * after the last slice of a key chunk, each consumer runs xatt_gemm's epilogue on each of
//     its four 64-key scratch chunks: mask (j >= T_tiles, causal j > i), chunk max (base 2),
//     exp2, block sums -> part, max -> mc; chunks after the diagonal (causal) or past nch
//     are skipped (xatt_reduce never reads them).
// Grid (rows_alloc / 128, heads of the group), longest causal rows first; dynamic shared
// memory 1024 + STAGES * 48 KB. Under a target other than sm_90a the kernel is a trap.
#include "common.cuh"
#include "wgmma.cuh"

// out[0] = 1 when this compile had the sm_90a feature set (wgmma), out[1] = __CUDA_ARCH__.
__global__ void xatt_wgmma_feature_probe(int* out) {
#if defined(__CUDA_ARCH__)
  if (threadIdx.x == 0) {
    out[0] = REFATTN_SM90A;
    out[1] = __CUDA_ARCH__;
  }
#endif
}

// maps: two CUtensorMaps (q, k; 128 bytes each), see above. part / mc / arguments as
// xatt_gemm (score_xattn.cu); D % 64 == 0.
template <typename T, int BT, int STAGES>
__global__ void __launch_bounds__(384, 1) xatt_wgmma(
    const unsigned char* __restrict__ maps, float* __restrict__ part, float* __restrict__ mc,
    int Hq, int G, int S, int D, int T_tiles, int rows_alloc, int nch, int nbc, float scale_log2,
    int causal, int bh0) {
#if REFATTN_SM90A
  using namespace refattn;
  using namespace refattn::wg;
  constexpr int BM = 128, BN = 256;
  constexpr unsigned Q_BYTES = BM * 128, K_BYTES = BN * 128, ST_BYTES = Q_BYTES + K_BYTES;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 bars[2 * STAGES];
  const unsigned base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const unsigned bq = smem_addr(bars);
  auto full = [&](int s) { return bq + 8u * s; };
  auto empty = [&](int s) { return bq + 8u * (STAGES + s); };

  const int tid = threadIdx.x;
  const int bh = blockIdx.y, b = (bh0 + bh) / Hq, h = (bh0 + bh) % Hq;  // bh: scratch slot
  const int r0 = (gridDim.x - 1 - blockIdx.x) * BM;  // longest causal rows first
  const int nhalf = D / 64;
  const int ksteps = S * nhalf;
  const int nct = (nch + 3) / 4;  // 256-key chunks
  const int last = causal ? min((r0 + BM - 1) / BN, nct - 1) : nct - 1;
  const int n_it = (last + 1) * ksteps;
  if (tid == 0) {
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
    if (tid == 0) {
      const unsigned char* mq = maps;
      const unsigned char* mk = maps + 128;
      tensormap_acquire(mq);
      tensormap_acquire(mk);
      const int hk = h / G;
      int ct = 0, u = 0, hh = 0;
#pragma unroll 1
      for (int it = 0; it < n_it; ++it) {
        const int s = it % STAGES;
        const unsigned ph = (it / STAGES) & 1;
        mbar_wait(empty(s), ph ^ 1);
        mbar_expect_tx(full(s), ST_BYTES);
        const unsigned dst = base + s * ST_BYTES;
        tma_load_5d(dst, mq, full(s), hh * 64, S - 1 - u, r0, h, b);
        tma_load_5d(dst + Q_BYTES, mk, full(s), hh * 64, u, ct * BN, hk, b);
        if (++hh == nhalf) {
          hh = 0;
          if (++u == S) {
            u = 0;
            ++ct;
          }
        }
      }
    }
  } else {
    // ------------------------------------------------------------ consumers
    setmaxnreg_inc<240>();
    const int cw = wg_idx - 1;  // rows 64 cw .. 64 cw + 63 of the CTA
    const int warp = (tid >> 5) & 3, lane = tid & 31;
    const int wr0 = r0 + cw * 64;  // this warpgroup's first query tile
    const unsigned a_off = cw * 64 * 128;
    float d[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) d[i] = 0.f;
    auto release = [&](int s) {
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(s));
    };
    int it = 0;
#pragma unroll 1
    for (int ct = 0; ct <= last; ++ct) {
      // live 64-key chunks of this key chunk for this warpgroup (a prefix)
      int nlive = min(4, nch - 4 * ct);
      if (causal) nlive = min(nlive, wr0 / 64 - 4 * ct + 1);
      nlive = max(nlive, 0);
      int pend = -1;  // stage whose wgmma group may still run
#pragma unroll 1
      for (int ks = 0; ks < ksteps; ++ks, ++it) {
        const int s = it % STAGES;
        mbar_wait(full(s), (it / STAGES) & 1);
        if (nlive > 0) {
#pragma unroll
          for (int i = 0; i < 128; ++i) reg_fence(d[i]);
          wgmma_fence();
          const unsigned qa = base + s * ST_BYTES + a_off, kb = base + s * ST_BYTES + Q_BYTES;
          const int acc0 = ks > 0 ? 1 : 0;
          if (nlive == 1) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
              wgmma_ss<T, 64>(d, make_desc(qa + kk * 32, 16, 1024), make_desc(kb + kk * 32, 16, 1024),
                              kk > 0 ? 1 : acc0);
          } else if (nlive == 2) {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
              wgmma_ss<T, 128>(d, make_desc(qa + kk * 32, 16, 1024), make_desc(kb + kk * 32, 16, 1024),
                               kk > 0 ? 1 : acc0);
          } else {
#pragma unroll
            for (int kk = 0; kk < 4; ++kk)
              wgmma_ss<T, 256>(d, make_desc(qa + kk * 32, 16, 1024), make_desc(kb + kk * 32, 16, 1024),
                               kk > 0 ? 1 : acc0);
          }
          wgmma_commit();
          wgmma_wait<1>();
#pragma unroll
          for (int i = 0; i < 128; ++i) reg_fence(d[i]);
        }
        if (pend >= 0) release(pend);
        pend = s;
      }
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < 128; ++i) reg_fence(d[i]);
      if (pend >= 0) release(pend);

      // ---- epilogue (xatt_gemm's): per 64-key chunk cc: mask, chunk max, exp, block sums
#pragma unroll
      for (int ch = 0; ch < 4; ++ch) {
        if (ch >= nlive) continue;
        const int cc = ct * 4 + ch;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = wr0 + warp * 16 + (lane >> 2) + 8 * hf;
          float v[8][2];
          float mx = -REFATTN_INF;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int j = cc * 64 + nt * 8 + (lane & 3) * 2 + e;
              float x = d[4 * (8 * ch + nt) + 2 * hf + e] * scale_log2;
              const bool dead = (j >= T_tiles) || (causal && j > i);
              x = dead ? -REFATTN_INF : x;
              v[nt][e] = x;
              mx = fmaxf(mx, x);
            }
          }
          mx = quad_max(mx);
          const float off = (mx == -REFATTN_INF) ? 0.f : mx;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            v[nt][0] = fast_exp2(v[nt][0] - off);
            v[nt][1] = fast_exp2(v[nt][1] - off);
          }
          float* prow = part + ((size_t)bh * rows_alloc + i) * nbc + (size_t)cc * (64 / BT);
          if constexpr (BT == 1) {
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
              *reinterpret_cast<float2*>(prow + nt * 8 + (lane & 3) * 2) = make_float2(v[nt][0], v[nt][1]);
          } else if constexpr (BT == 2) {
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) prow[nt * 4 + (lane & 3)] = v[nt][0] + v[nt][1];
          } else if constexpr (BT == 4) {
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
              float sm4 = v[nt][0] + v[nt][1];
              sm4 += __shfl_xor_sync(0xffffffffu, sm4, 1);
              if (!(lane & 1)) prow[nt * 2 + ((lane & 3) >> 1)] = sm4;
            }
          } else {
            constexpr int NPB = BT / 8;  // n8 tiles per block
#pragma unroll
            for (int blk = 0; blk < 8 / NPB; ++blk) {
              float sb = 0.f;
#pragma unroll
              for (int t = 0; t < NPB; ++t) sb += v[blk * NPB + t][0] + v[blk * NPB + t][1];
              sb = quad_sum(sb);
              if ((lane & 3) == 0) prow[blk] = sb;
            }
          }
          if ((lane & 3) == 0) mc[((size_t)bh * rows_alloc + i) * nch + cc] = mx;
        }
      }
    }
  }
#else
  __trap();
#endif
}

#ifdef REFATTN_INSTANTIATE
// Compile-time check of the instantiations the launcher uses (nvcc -DREFATTN_INSTANTIATE
// --resource-usage); NVRTC instantiates them by name instead.
#define XA_WG(T, BT, ST)                                                                       \
  template __global__ void xatt_wgmma<T, BT, ST>(const unsigned char*, float*, float*, int, int, \
                                                 int, int, int, int, int, int, float, int, int);
XA_WG(__nv_bfloat16, 16, 4)
XA_WG(__nv_bfloat16, 8, 4)
XA_WG(__half, 16, 4)
XA_WG(__half, 1, 4)
XA_WG(__half, 2, 4)
XA_WG(__half, 4, 4)
XA_WG(__nv_bfloat16, 64, 4)
XA_WG(__nv_bfloat16, 16, 3)
#undef XA_WG
#endif
