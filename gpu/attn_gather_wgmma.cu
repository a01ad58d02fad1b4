// refattn: per-token-routing (block_q = 1, MoBA) forward for Hopper (sm_90a): wgmma + TMA,
// warp-specialised, key-block-stationary. docs/gpu_notes.md "v-wgmma-moba" has the design
// notes and the budget.
//
// The plan of _attn_gather.py (_gather_plan) groups the (row, key block) pairs of the mask by
// segment (b, h, kb), rows ascending, and cuts every segment into chunks of CH rows
// (CH = the plan's BM, a multiple of 128). One CTA = one chunk = up to CH / 128 query tiles
// of 128 gathered rows, all against the same key block kb (block_k = BN = 64 or 128 keys):
//   * warpgroup 0, the producer (setmaxnreg.dec 40: the gather needs address registers):
//     thread 0 TMA-loads K and V of the block once (they stay in shared memory for every
//     tile of the chunk); the 128 threads gather the Q rows of each tile with cp.async
//     (16-byte chunks written at their 128-byte-swizzled positions, zero-filled past the
//     chunk's end; all row indices of a tile loaded before the copies) into a STAGES-deep
//     ring, then each waits for its copies, fences them to the async proxy and arrives on
//     the stage's "full" mbarrier (128 arrivals); "empty" mbarriers take one arrival per
//     consumer warp (8).
//   * warpgroups 1 and 2, the consumers (setmaxnreg.inc 232), own rows 64c .. 64c + 63 of
//     every tile: S = Q K^T (SS wgmma m64nBNk16), the softmax of the one block (no running
//     state: max, exp2, sum; causal / Sk masking per gathered row), O = P V (RS wgmma
//     m64nDk16, V MN-major), then the pair's partial result: O / l rounded to PT (T or fp32)
//     at part_o[pair] and its log2-sum-exp at part_lse2[pair] (-inf, O = 0 when the row sees
//     no key of the block).
// attn_combine_part<PT, D> merges the partials of each row (pairs of row r are
// [row_ptr[r], row_ptr[r + 1]) in the plan's row-major pair order) into fp32 out and the
// natural-log LSE, as attn_fwd.cu's attn_combine does for its fp32 partials.
//
// Tensor maps (k, v, 128 bytes each, box 64 x BN rows, 128-byte swizzle) live in global
// memory (_attn_wgmma.tensor_map). Under a target other than sm_90a (e.g. the CI compile with
// -arch=sm_90) the wgmma kernel compiles to a trap; the combine kernel compiles everywhere.
#include "common.cuh"
#include "wgmma.cuh"

namespace refattn {
namespace wg {

// Two adjacent values of a partial row: fp32 (8 bytes) or 16-bit (4 bytes).
template <typename PT> __device__ __forceinline__ void store_pair(PT* p, float x, float y);
template <> __device__ __forceinline__ void store_pair<float>(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}
template <> __device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<unsigned*>(p) = pack2<__nv_bfloat16>(x, y);
}
template <> __device__ __forceinline__ void store_pair<__half>(__half* p, float x, float y) {
  *reinterpret_cast<unsigned*>(p) = pack2<__half>(x, y);
}

// EPL (2 or 4) consecutive values of a partial row, one vector load, as fp32.
template <typename PT, int EPL> struct LoadPart;
template <> struct LoadPart<float, 4> {
  static __device__ __forceinline__ void run(float* x, const float* p) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(p));
    x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
  }
};
template <> struct LoadPart<float, 2> {
  static __device__ __forceinline__ void run(float* x, const float* p) {
    const float2 v = __ldg(reinterpret_cast<const float2*>(p));
    x[0] = v.x; x[1] = v.y;
  }
};
template <typename T> __device__ __forceinline__ void unpack2(float* x, unsigned u) {
  T lo, hi;
  unsigned short a = (unsigned short)(u & 0xFFFFu), b = (unsigned short)(u >> 16);
  lo = *reinterpret_cast<const T*>(&a);
  hi = *reinterpret_cast<const T*>(&b);
  x[0] = to_float<T>(lo);
  x[1] = to_float<T>(hi);
}
template <typename T> struct LoadPart16_4 {
  static __device__ __forceinline__ void run(float* x, const T* p) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    unpack2<T>(x, v.x);
    unpack2<T>(x + 2, v.y);
  }
};
template <typename T> struct LoadPart16_2 {
  static __device__ __forceinline__ void run(float* x, const T* p) {
    unpack2<T>(x, __ldg(reinterpret_cast<const unsigned*>(p)));
  }
};
template <> struct LoadPart<__nv_bfloat16, 4> : LoadPart16_4<__nv_bfloat16> {};
template <> struct LoadPart<__nv_bfloat16, 2> : LoadPart16_2<__nv_bfloat16> {};
template <> struct LoadPart<__half, 4> : LoadPart16_4<__half> {};
template <> struct LoadPart<__half, 2> : LoadPart16_2<__half> {};
template <typename PT, int EPL>
__device__ __forceinline__ void load_part(float* x, const PT* p) { LoadPart<PT, EPL>::run(x, p); }

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

}  // namespace wg
}  // namespace refattn

// out[0] = 1 when this compile had the sm_90a feature set (wgmma), out[1] = __CUDA_ARCH__.
__global__ void moba_wgmma_feature_probe(int* out) {
#if defined(__CUDA_ARCH__)
  if (threadIdx.x == 0) {
    out[0] = REFATTN_SM90A;
    out[1] = __CUDA_ARCH__;
  }
#endif
}

// Grid (number of chunks), 384 threads, dynamic shared memory
// 1024 + 2 * BN * D * 2 + STAGES * 128 * D * 2 bytes.
template <typename T, typename PT, int D, int BN, int STAGES>
__global__ void __launch_bounds__(384, 1) attn_fwd_gather_wgmma(
    const unsigned char* __restrict__ maps, const T* __restrict__ q, long long q_sb, long long q_sh,
    long long q_ss, PT* __restrict__ part_o, float* __restrict__ part_lse2, int Hq, int Hkv, int Sq,
    int Sk, float scale_log2, int causal, int CH, const int* __restrict__ tile_seg,
    const int* __restrict__ tile_start, const long long* __restrict__ seg_off,
    const int* __restrict__ seg_cnt, const int* __restrict__ g_rows,
    const long long* __restrict__ g_pair, int Kb) {
#if REFATTN_SM90A
  using namespace refattn;
  using namespace refattn::wg;
  static_assert(D == 64 || D == 128, "D must be 64 or 128");
  static_assert(BN == 64 || BN == 128, "BN must be 64 or 128");
  constexpr int BM = 128, NH = D / 64, CPR = D / 8;  // CPR: 16-byte chunks per row
  constexpr unsigned KV_BYTES = BN * D * 2, Q_BYTES = BM * D * 2;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 bars[1 + 2 * STAGES];
  const unsigned base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  unsigned char* gbase = smem_raw + (base - smem_addr(smem_raw));
  const unsigned sK = base, sV = base + KV_BYTES, sQ = base + 2 * KV_BYTES;
  const unsigned bkv = smem_addr(bars);
  auto full = [&](int s) { return bkv + 8u * (1 + s); };
  auto empty = [&](int s) { return bkv + 8u * (1 + STAGES + s); };

  const int tid = threadIdx.x;
  const int seg = tile_seg[blockIdx.x];
  const int start = tile_start[blockIdx.x];
  const int kb = seg % Kb;
  const int h = (seg / Kb) % Hq;
  const int b = seg / (Kb * Hq);
  const int hk = h / (Hq / Hkv);
  const long long pbase = seg_off[seg] + start;    // first pair (in segment order) of the chunk
  const int cnt = min(CH, seg_cnt[seg] - start);   // rows of the chunk
  const int ntile = (cnt + BM - 1) / BM;
  const int k0 = kb * BN;
  const int off = Sk - Sq;

  if (tid == 0) {
    mbar_init(bkv, 1);
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full(s), 128);  // every producer thread arrives once its copies landed
      mbar_init(empty(s), 8);   // one arrival per consumer warp
    }
    mbar_init_fence();
  }
  __syncthreads();

  const int wg_idx = __shfl_sync(0xffffffffu, tid / 128, 0);
  if (wg_idx == 0) {
    // ------------------------------------------------------------ producer
    setmaxnreg_dec<40>();  // 40 x 128 + 232 x 256 = 168 x 384: the launch's registers
    if (tid == 0) {
      const unsigned char* mk = maps;
      const unsigned char* mv = maps + 128;
      tensormap_acquire(mk);
      tensormap_acquire(mv);
      mbar_expect_tx(bkv, 2 * KV_BYTES);
#pragma unroll
      for (int hh = 0; hh < NH; ++hh) {
        tma_load_4d(sK + hh * BN * 128, mk, bkv, hh * 64, k0, hk, b);
        tma_load_4d(sV + hh * BN * 128, mv, bkv, hh * 64, k0, hk, b);
      }
    }
    const T* qb = q + b * q_sb + h * q_sh;
    const int c = tid % CPR;               // this thread's 16-byte chunk of every row it copies
    const unsigned hoff = (c / 8) * BM * 128;
    const int cc = c % 8;
#pragma unroll 1
    for (int t = 0; t < ntile; ++t) {
      const int s = t % STAGES;
      mbar_wait(empty(s), ((t / STAGES) & 1) ^ 1);
      unsigned char* dst = gbase + (sQ - base) + s * Q_BYTES + hoff;
      const int r0 = t * BM + tid / CPR;
      // rows r0 + i * RS, i < CPR: all row indices first (independent loads), then the copies
      constexpr int RS = 128 / CPR;
      int rws[CPR];
#pragma unroll
      for (int i = 0; i < CPR; ++i) rws[i] = r0 + i * RS < cnt ? g_rows[pbase + r0 + i * RS] : -1;
#pragma unroll
      for (int i = 0; i < CPR; ++i) {
        const int r = tid / CPR + i * RS;  // row of the tile
        cp_async16(dst + r * 128 + ((cc ^ (r & 7)) << 4), qb + (rws[i] < 0 ? 0 : rws[i]) * q_ss + c * 8,
                   rws[i] >= 0);
      }
      cp_async_wait_all();
      fence_proxy_async();  // the generic-proxy copies, before wgmma (async proxy) reads them
      mbar_arrive(full(s));
    }
  } else {
    // -------------------------------------------------------------- consumers
    setmaxnreg_inc<232>();
    const int cw = wg_idx - 1;  // rows 64 cw .. 64 cw + 63 of every tile
    const int warp = (tid >> 5) & 3, lane = tid & 31, gq = lane >> 2, q4 = lane & 3;
    const int rl0 = cw * 64 + warp * 16 + gq;  // this thread's rows of the tile: rl0, rl0 + 8

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    mbar_wait(bkv, 0);
#pragma unroll 1
    for (int t = 0; t < ntile; ++t) {
      const int s = t % STAGES;
      const int e0 = t * BM + rl0, e1 = e0 + 8;  // entries of the chunk
      const bool v0 = e0 < cnt, v1 = e1 < cnt;
      const int row0 = v0 ? g_rows[pbase + e0] : 0;
      const int row1 = v1 ? g_rows[pbase + e1] : 0;
      const long long pr0 = v0 ? g_pair[pbase + e0] : 0;
      const long long pr1 = v1 ? g_pair[pbase + e1] : 0;
      mbar_wait(full(s), (t / STAGES) & 1);

      // ---- S = Q K^T
      float sc[BN / 2];
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) reg_fence(sc[i]);
      wgmma_fence();
      const unsigned qA = sQ + s * Q_BYTES + cw * 64 * 128;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const unsigned ko = (kk & 3) * 32, hh = kk >> 2;
        wgmma_ss<T, BN>(sc, make_desc(qA + hh * BM * 128 + ko, 16, 1024),
                        make_desc(sK + hh * BN * 128 + ko, 16, 1024), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) reg_fence(sc[i]);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(s));  // Q of stage s no longer needed

      // ---- mask, softmax of the block (base 2, one FFMA + ex2 per score)
      const bool need_mask = (k0 + BN > Sk) || (causal && k0 + BN - 1 > min(row0, row1) + off);
      if (need_mask) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = k0 + 8 * j + 2 * q4 + (e & 1);
            const int row = (e >> 1) ? row1 : row0;
            if (col >= Sk || (causal && col > row + off)) sc[4 * j + e] = -REFATTN_INF;
          }
      }
      float mrow[2], lrow[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -REFATTN_INF;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(sc[4 * j + 2 * hf], sc[4 * j + 2 * hf + 1]));
        mx = quad_max(mx) * scale_log2;  // scale > 0: max commutes with scaling
        const float m_use = mx == -REFATTN_INF ? 0.f : mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = fast_exp2(fmaf(sc[4 * j + 2 * hf + e], scale_log2, -m_use));
            sc[4 * j + 2 * hf + e] = p;
            sum += p;
          }
        mrow[hf] = mx;
        lrow[hf] = quad_sum(sum);
      }

      // ---- O = P V
      unsigned a[BN / 16][4];
      acc_to_afrag<T, BN>(a, sc);
#pragma unroll
      for (int i = 0; i < D / 2; ++i) reg_fence(o[i]);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) reg_fence(a[kk][i]);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk)
        wgmma_rs<T, D>(o, a[kk], make_desc(sV + kk * 16 * 128, BN * 128, 1024), kk > 0);
      wgmma_commit();
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < D / 2; ++i) reg_fence(o[i]);

      // ---- partial result of the (row, block) pairs: O / l in PT, log2-sum-exp
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        if (!(hf ? v1 : v0)) continue;
        const float l = lrow[hf];
        const bool emp = !(l > 0.f) || mrow[hf] == -REFATTN_INF;
        const float inv = emp ? 0.f : 1.f / l;
        const long long pr = hf ? pr1 : pr0;
        PT* op = part_o + pr * D;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
          store_pair<PT>(op + 8 * j + 2 * q4, o[4 * j + 2 * hf] * inv, o[4 * j + 2 * hf + 1] * inv);
        if (q4 == 0) part_lse2[pr] = emp ? -REFATTN_INF : mrow[hf] + log2f(l);
      }
    }
  }  // consumers
#else
  __trap();
#endif
}

// Merge the per-(row, key block) partials: one warp per output row, each lane D / 32
// consecutive columns. Partials of row r are [row_ptr[r], row_ptr[r + 1]): part_o [P, D] in
// PT (each normalised by its own sum), part_lse2 [P] their log2-sum-exp (-inf: empty). out
// [R, D] fp32, lse [R] natural log; rows with no finite partial get 0 and -inf.
template <typename PT, int D>
__global__ void __launch_bounds__(256) attn_combine_part(const PT* __restrict__ part_o,
                                                         const float* __restrict__ part_lse2,
                                                         const long long* __restrict__ row_ptr,
                                                         float* __restrict__ out, float* __restrict__ lse,
                                                         long long R) {
  using namespace refattn;
  constexpr int EPL = D / 32;  // 4 (D = 128) or 2 (D = 64)
  const long long r = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= R) return;
  const long long p0 = row_ptr[r], p1 = row_ptr[r + 1];
  float m = -REFATTN_INF;
  for (long long p = p0 + lane; p < p1; p += 32) m = fmaxf(m, part_lse2[p]);
  m = warp_max(m);
  float acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
  float wsum = 0.f;
  if (m != -REFATTN_INF) {
    for (long long pb = p0; pb < p1; pb += 32) {
      const int n = (int)min(32ll, p1 - pb);
      const float wl = lane < n ? fast_exp2(part_lse2[pb + lane] - m) : 0.f;
      wsum += warp_sum(wl);
#pragma unroll 4
      for (int j = 0; j < n; ++j) {
        const float w = __shfl_sync(0xffffffffu, wl, j);
        float x[EPL];
        wg::load_part<PT, EPL>(x, part_o + (pb + j) * D + lane * EPL);
#pragma unroll
        for (int e = 0; e < EPL; ++e) acc[e] = fmaf(w, x[e], acc[e]);
      }
    }
  }
  const bool emp = !(wsum > 0.f);
  const float inv = emp ? 0.f : 1.f / wsum;
  float* dst = out + r * D + lane * EPL;
  if constexpr (EPL == 4)
    *reinterpret_cast<float4*>(dst) = make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
  else
    *reinterpret_cast<float2*>(dst) = make_float2(acc[0] * inv, acc[1] * inv);
  if (lane == 0) lse[r] = emp ? -REFATTN_INF : (m + log2f(wsum)) * kLn2;
}
