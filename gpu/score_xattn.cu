// XAttention antidiagonal block scoring (op `xattention_score`), see gpu/scoring.py.
//
// Notation (refattn/methods/xattention.py): stride S, tile index i (query) / j (key), a
// tile holds tokens [iS, iS + S); T = Lp / S tiles on the chunk-padded length Lp, T_real =
// ceil(L / S) tiles hold a real token; BT = block_size / S tiles per block. The logit of
// tile pair (i, j) is the antidiagonal sum
//     A[i, j] = scale * sum_{u < S} < Q[iS + S-1-u], K[jS + u] >,   scale = 1/(sqrt(D) S norm)
// i.e. the product of the row i of Qr = (Q[iS+S-1], ..., Q[iS]) and the row j of
// Kr = (K[jS], ..., K[jS+S-1]), two [T, S*D] matrices read straight from Q and K (no copy).
// Row softmax over j <= i (causal; the diagonal tile whole) or over all j < T, then block
// sums W[I, J] = sum_{i in I, j in J} P[i, j]. Tokens >= L are zero (the official padding).
//
// Three kernels for the scores:
//   * xatt_gemm<T, BT, WM, WN, KC, STAGES> + xatt_reduce<BT> (bf16/fp16, D % 64 == 0,
//     BT | 64): tensor cores, the default (see its comment below): 64 x 64 warp tiles, a CTA
//     of WM x WN warps, KC-element k-slices in a STAGES-deep cp.async ring.
//   * xatt_tiles<T, BT> + xatt_reduce<BT>: the first tensor-core version, kept selectable
//     (gpu/scoring.py XA_CONFIG = "v1") for the benchmark's comparison.
//     One CTA (4 warps) owns 128 query tiles and walks 64-key-tile chunks; the k-loop runs
//     over (u, d) in slices of 64 elements with cp.async double buffering, mma.sync
//     m16n8k16 with fp32 accumulation. Per chunk and row it writes the chunk maximum m_c
//     (base 2) and the block sums of exp2(A - m_c) to a scratch buffer; xatt_reduce then
//     rescales the chunks to the row maximum, normalises and sums the rows of a block.
//     One exp per tile pair; the Q/K traffic is that of a GEMM with 1/S of QK^T's FLOPs.
//   * xatt_exact<T> (any dtype, any geometry): one warp per query tile, float64, three
//     passes (max, sum, scatter with fp64 atomics). Exact to float64 rounding; for tests,
//     fp32/fp64 inputs and unusual geometries.
#include "common.cuh"

namespace refattn {

__device__ __forceinline__ double to_dbl(float x) { return (double)x; }
__device__ __forceinline__ double to_dbl(double x) { return x; }
__device__ __forceinline__ double to_dbl(__half x) { return (double)__half2float(x); }
__device__ __forceinline__ double to_dbl(__nv_bfloat16 x) { return (double)__bfloat162float(x); }

}  // namespace refattn

using namespace refattn;

// ------------------------------------------------------------------ tensor-core path
constexpr int XA_BM = 128;  // query tiles per CTA (4 warps x 32)
constexpr int XA_BN = 64;   // key tiles per chunk
constexpr int XA_KC = 64;   // k-slice (elements of one token's head dim)
constexpr int XA_LD = XA_KC + 8;

// Heads bh0 .. bh0 + gridDim.y - 1 (of the flattened B*Hq) in one launch; scratch slot
// blockIdx.y. The caller bounds the scratch by launching groups of heads.
// part  float [BH, rows_alloc, nbc]  block sums of exp2(A*log2e - m_c) per chunk c
// mc    float [BH, rows_alloc, nch]  chunk maxima (base-2 units, -inf if the chunk is masked)
template <typename T, int BT>
__global__ void __launch_bounds__(128) xatt_tiles(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ part,
    float* __restrict__ mc, int Hq, int G, int L, int S, int D, int T_tiles, int rows_alloc,
    int nch, int nbc, long long q_sb, long long q_sh, long long k_sb, long long k_sh,
    float scale_log2, int causal, int bh0) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);   // [2][BM][LD]
  T* sK = sQ + 2 * XA_BM * XA_LD;           // [2][BN][LD]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int bh = blockIdx.y, b = (bh0 + bh) / Hq, h = (bh0 + bh) % Hq;  // bh: scratch slot
  const int r0 = (gridDim.x - 1 - blockIdx.x) * XA_BM;  // longest causal rows first
  const T* qb = q + b * q_sb + h * q_sh;
  const T* kb = k + b * k_sb + (h / G) * k_sh;
  const int ksteps = (S * D) / XA_KC;
  const int last = causal ? min((r0 + XA_BM - 1) / XA_BN, nch - 1) : nch - 1;
  const int nsteps = (last + 1) * ksteps;

  auto load = [&](int step, int buf) {
    const int c = step / ksteps, kk = (step % ksteps) * XA_KC;
    const int u = kk / D, d0 = kk % D;
    T* dq = sQ + buf * XA_BM * XA_LD;
    T* dk = sK + buf * XA_BN * XA_LD;
#pragma unroll 1
    for (int x = tid; x < XA_BM * (XA_KC / 8); x += 128) {
      const int r = x >> 3, cc = (x & 7) * 8;
      const long long tok = (long long)(r0 + r) * S + (S - 1 - u);
      const bool ok = tok < L;
      cp_async16(dq + r * XA_LD + cc, ok ? qb + tok * D + d0 + cc : qb, ok);
    }
#pragma unroll 1
    for (int x = tid; x < XA_BN * (XA_KC / 8); x += 128) {
      const int r = x >> 3, cc = (x & 7) * 8;
      const long long tok = (long long)(c * XA_BN + r) * S + u;
      const bool ok = tok < L;
      cp_async16(dk + r * XA_LD + cc, ok ? kb + tok * D + d0 + cc : kb, ok);
    }
    cp_async_commit();
  };

  float acc[2][8][4];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][n][e] = 0.f;

  load(0, 0);
#pragma unroll 1
  for (int s = 0; s < nsteps; ++s) {
    const int buf = s & 1;
    if (s + 1 < nsteps) {
      load(s + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* tq = sQ + buf * XA_BM * XA_LD + warp * 32 * XA_LD;
    const T* tk = sK + buf * XA_BN * XA_LD;
#pragma unroll
    for (int k16 = 0; k16 < XA_KC; k16 += 16) {
      unsigned a0[4], a1[4];
      load_a<false>(a0, tq, XA_LD, k16, lane);
      load_a<false>(a1, tq + 16 * XA_LD, XA_LD, k16, lane);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        unsigned bb[4];
        load_b<false>(bb, tk, XA_LD, np * 16, k16, lane);
        mma16816<T>(acc[0][2 * np], a0, bb[0], bb[1]);
        mma16816<T>(acc[0][2 * np + 1], a0, bb[2], bb[3]);
        mma16816<T>(acc[1][2 * np], a1, bb[0], bb[1]);
        mma16816<T>(acc[1][2 * np + 1], a1, bb[2], bb[3]);
      }
    }
    __syncthreads();
    if ((s + 1) % ksteps != 0) continue;

    // ---- epilogue of chunk c: mask, chunk max, exp, block sums
    const int c = s / ksteps;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = r0 + warp * 32 + mt * 16 + (lane >> 2) + 8 * hf;
        float v[8][2];
        float mx = -REFATTN_INF;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = c * XA_BN + nt * 8 + (lane & 3) * 2 + e;
            float x = acc[mt][nt][2 * hf + e] * scale_log2;
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
        float* prow = part + ((size_t)bh * rows_alloc + i) * nbc + (size_t)c * (XA_BN / BT);
        if constexpr (BT == 1) {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            prow[nt * 8 + (lane & 3) * 2] = v[nt][0];
            prow[nt * 8 + (lane & 3) * 2 + 1] = v[nt][1];
          }
        } else if constexpr (BT == 2) {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) prow[nt * 4 + (lane & 3)] = v[nt][0] + v[nt][1];
        } else if constexpr (BT == 4) {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            float sm = v[nt][0] + v[nt][1];
            sm += __shfl_xor_sync(0xffffffffu, sm, 1);
            if (!(lane & 1)) prow[nt * 2 + ((lane & 3) >> 1)] = sm;
          }
        } else {
          constexpr int NPB = BT / 8;  // n8 tiles per block
#pragma unroll
          for (int blk = 0; blk < 8 / NPB; ++blk) {
            float sm = 0.f;
#pragma unroll
            for (int t = 0; t < NPB; ++t) sm += v[blk * NPB + t][0] + v[blk * NPB + t][1];
            sm = quad_sum(sm);
            if ((lane & 3) == 0) prow[blk] = sm;
          }
        }
        if ((lane & 3) == 0) mc[((size_t)bh * rows_alloc + i) * nch + c] = mx;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          acc[mt][nt][2 * hf] = 0.f;
          acc[mt][nt][2 * hf + 1] = 0.f;
        }
      }
    }
  }
}

// ------------------------------------------------------------------ tensor-core path, v2
// xatt_gemm<T, BT, WM, WN, KC, STAGES>: the same product and the same scratch format as
// xatt_tiles (64-key chunks), as a multistage GEMM:
//   * CTA tile BM x BN = 64 WM query tiles x 64 WN key tiles, WM x WN warps, each warp a
//     64 x 64 sub-tile (4 x 8 mma tiles, 128 fp32 accumulators): per k16 step 8 ldmatrix.x4
//     feed 32 mma (xatt_tiles: 6 for 16);
//   * k-slices of KC elements, STAGES-deep cp.async ring, ONE barrier per slice: per slice
//     and warp KC/16 x 32 mma (KC = 64: 128 mma; xatt_tiles: 64 mma between two barriers);
//   * the copies of the next slice (12 x 16 bytes per thread for 256 x 128) are issued after
//     the first k16 step's mma, branch-free, with per-thread bases computed once, so that
//     their address arithmetic overlaps the mma instead of delaying them after the barrier;
//   * each warp's 64 key tiles are one scratch chunk: its epilogue is xatt_tiles' epilogue;
//     under causal masking a warp whose chunk lies wholly after its 64 query tiles skips the
//     mma and the epilogue (xatt_reduce never reads that chunk).
// Requires D % KC == 0 (a slice never straddles two tokens). Dynamic shared memory
// STAGES * (BM + BN) * (KC + 8) * sizeof(T).
template <typename T, int BT, int WM, int WN, int KC, int STAGES>
__global__ void __launch_bounds__(WM * WN * 32, 1) xatt_gemm(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ part,
    float* __restrict__ mc, int Hq, int G, int L, int S, int D, int T_tiles, int rows_alloc,
    int nch, int nbc, long long q_sb, long long q_sh, long long k_sb, long long k_sh,
    float scale_log2, int causal, int bh0) {
  constexpr int NT = WM * WN * 32, BM = 64 * WM, BN = 64 * WN, LD = KC + 8;
  constexpr int CPR = KC / 8;                 // 16-byte chunks per row and slice
  constexpr int STAGE = (BM + BN) * LD;       // elements per stage
  constexpr int RS = NT / CPR;                // rows one sweep of the CTA's threads copies
  constexpr int QSL = BM / RS, KSL = BN / RS; // copies per thread and slice: Q rows, K rows
  static_assert(NT % CPR == 0 && BM % RS == 0 && BN % RS == 0, "xatt_gemm copy layout");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sm = reinterpret_cast<T*>(smem_raw);     // [STAGES][BM + BN][LD]: Q rows, then K rows
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp / WN, wn = warp % WN;
  const int bh = blockIdx.y, b = (bh0 + bh) / Hq, h = (bh0 + bh) % Hq;  // bh: scratch slot
  const int r0 = (gridDim.x - 1 - blockIdx.x) * BM;  // longest causal rows first
  const T* qb = q + b * q_sb + h * q_sh;
  const T* kb = k + b * k_sb + (h / G) * k_sh;
  const int ksteps = (S * D) / KC;
  const int nct = (nch + WN - 1) / WN;
  const int last = causal ? min((r0 + BM - 1) / BN, nct - 1) : nct - 1;
  const int nsteps = (last + 1) * ksteps;
  const int wr0 = r0 + wm * 64;               // this warp's first query tile

  // Copies: thread tid moves the 16 bytes at column cc8 of rows rr + RS i of the slice
  // (Q rows i < QSL, K rows after). Slice (ct, u, d0) of the k-loop: Q row r holds token
  // (r0 + r) S + S-1-u, K row r token (ct BN + r) S + u, elements d0 .. d0 + KC of each.
  const int rr = tid / CPR, cc8 = (tid % CPR) * 8;
  const long long tstride = (long long)RS * S;           // tokens between a thread's rows
  const long long estride = tstride * D;                 // elements between them
  const long long qtok0 = (long long)(r0 + rr) * S + (S - 1);
  const T* qbase = qb + qtok0 * D + cc8;
  const T* kbase = kb + (long long)rr * S * D + cc8;
  T* const sdst = sm + rr * LD + cc8;
  int f_ct = 0, f_u = 0, f_d0 = 0;  // slice of the next fetch (fetches run in step order)
  // `more` false: a slice past the last step; the copies then only zero-fill a free slot
  // (no branch, so that the copies can be scheduled among the mma of the current slice).
  auto fetch = [&](int buf, bool more) {
    T* dst = sdst + buf * STAGE;
    const long long qo = (long long)f_d0 - (long long)f_u * D;
#pragma unroll
    for (int i = 0; i < QSL; ++i) {
      const bool ok = more && qtok0 + i * tstride - f_u < L;
      cp_async16(dst + i * RS * LD, ok ? qbase + i * estride + qo : qb, ok);
    }
    const long long ktok = (long long)rr * S + (long long)f_ct * BN * S + f_u;
    const T* kp = kbase + ((long long)f_ct * BN * S + f_u) * D + f_d0;
#pragma unroll
    for (int i = 0; i < KSL; ++i) {
      const bool ok = more && ktok + i * tstride < L;
      cp_async16(dst + (BM + i * RS) * LD, ok ? kp + i * estride : kb, ok);
    }
    f_d0 += KC;  // advance to the next slice: d0, then the token offset u, then the key tile
    if (f_d0 == D) {
      f_d0 = 0;
      if (++f_u == S) {
        f_u = 0;
        ++f_ct;
      }
    }
  };

  float acc[4][8][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[a][n][e] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nsteps) fetch(s, true);
    cp_async_commit();
  }
  int ct = 0, ks = 0, cbuf = 0, fbuf = STAGES - 1;  // slice of step s; ring slots
#pragma unroll 1
  for (int s = 0; s < nsteps; ++s) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // slice s landed for all threads; slice s-1's buffer is free
    const bool more = s + STAGES - 1 < nsteps;
    const int cc = ct * WN + wn;  // this warp's 64-key scratch chunk
    const bool live = cc < nch && !(causal && cc * 64 > wr0);
    const bool chunk_end = ks == ksteps - 1;
    const T* tq = sm + cbuf * STAGE + wm * 64 * LD;
    const T* tk = sm + cbuf * STAGE + (BM + wn * 64) * LD;
    auto mma_k16 = [&](int k16) {
      unsigned a[4][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) load_a<false>(a[mt], tq + mt * 16 * LD, LD, k16, lane);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        unsigned bb[4];
        load_b<false>(bb, tk, LD, np * 16, k16, lane);
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          mma16816<T>(acc[mt][2 * np], a[mt], bb[0], bb[1]);
          mma16816<T>(acc[mt][2 * np + 1], a[mt], bb[2], bb[3]);
        }
      }
    };
    if (live) {  // the next slice's copies go out after the first k16 step's mma
      mma_k16(0);
      fetch(fbuf, more);
#pragma unroll
      for (int k16 = 16; k16 < KC; k16 += 16) mma_k16(k16);
    } else {
      fetch(fbuf, more);
    }
    cp_async_commit();
    fbuf = fbuf == STAGES - 1 ? 0 : fbuf + 1;
    cbuf = cbuf == STAGES - 1 ? 0 : cbuf + 1;
    if (++ks == ksteps) {
      ks = 0;
      ++ct;
    }
    if (!live || !chunk_end) continue;

    // ---- epilogue of chunk cc (registers and global memory only): mask, chunk max, exp,
    // block sums
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = wr0 + mt * 16 + (lane >> 2) + 8 * hf;
        float v[8][2];
        float mx = -REFATTN_INF;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = cc * 64 + nt * 8 + (lane & 3) * 2 + e;
            float x = acc[mt][nt][2 * hf + e] * scale_log2;
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
          for (int nt = 0; nt < 8; ++nt) {
            prow[nt * 8 + (lane & 3) * 2] = v[nt][0];
            prow[nt * 8 + (lane & 3) * 2 + 1] = v[nt][1];
          }
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
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          acc[mt][nt][2 * hf] = 0.f;
          acc[mt][nt][2 * hf + 1] = 0.f;
        }
      }
    }
  }
  cp_async_wait<0>();  // no copy may outlive the CTA's shared memory
}

__device__ __forceinline__ float block_reduce(float x, bool is_max, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  x = is_max ? warp_max(x) : warp_sum(x);
  __syncthreads();
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float y = is_max ? -REFATTN_INF : 0.f;
  for (int w = 0; w < nw; ++w) y = is_max ? fmaxf(y, red[w]) : y + red[w];
  return y;
}

// W float [BH, nbp, nbp]; one CTA per (real query block I, bh); rows past n_real are left
// to the caller (zero).
template <int BT>
__global__ void __launch_bounds__(256) xatt_reduce(
    const float* __restrict__ part, const float* __restrict__ mc, float* __restrict__ W,
    int rows_alloc, int nch, int nbc, int nbp, int T_real, int causal, int bh0) {
  extern __shared__ float wacc[];  // [nbc]
  __shared__ float red[32];
  const int I = blockIdx.x, bh = blockIdx.y, tid = threadIdx.x;  // bh: scratch slot
  constexpr int PER = XA_BN / BT;  // blocks per chunk
  for (int J = tid; J < nbc; J += blockDim.x) wacc[J] = 0.f;
#pragma unroll 1
  for (int r = 0; r < BT; ++r) {
    const int i = I * BT + r;
    if (i >= T_real) break;
    const int nci = causal ? min(i / XA_BN + 1, nch) : nch;
    const float* mrow = mc + ((size_t)bh * rows_alloc + i) * nch;
    const float* prow = part + ((size_t)bh * rows_alloc + i) * nbc;
    float m = -REFATTN_INF;
    for (int c = tid; c < nci; c += blockDim.x) m = fmaxf(m, mrow[c]);
    m = block_reduce(m, true, red);
    const int nJ = nci * PER;
    float l = 0.f;
    for (int J = tid; J < nJ; J += blockDim.x) l += prow[J] * exp2f(mrow[J / PER] - m);
    l = block_reduce(l, false, red);
    const float inv = 1.f / l;
    for (int J = tid; J < nJ; J += blockDim.x) wacc[J] += prow[J] * exp2f(mrow[J / PER] - m) * inv;
  }
  __syncthreads();
  for (int J = tid; J < nbp; J += blockDim.x) W[((size_t)(bh0 + bh) * nbp + I) * nbp + J] = wacc[J];
}

// ------------------------------------------------------------------ exact path (float64)
// Wd double [BH, nbp, nbp], zeroed by the caller; one warp per real query tile.
template <typename T>
__global__ void __launch_bounds__(128) xatt_exact(
    const T* __restrict__ q, const T* __restrict__ k, double* __restrict__ Wd, int Hq, int G,
    int L, int S, int D, int T_tiles, int T_real, int BT, int nbp, long long q_sb,
    long long q_sh, long long k_sb, long long k_sh, double scale, int causal) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int i = blockIdx.x * 4 + warp;
  const int bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
  if (i >= T_real) return;
  const T* qb = q + b * q_sb + h * q_sh;
  const T* kb = k + b * k_sb + (h / G) * k_sh;
  const int jend = causal ? i + 1 : T_tiles;
  auto dot = [&](int j) -> double {
    double s = 0.0;
    for (int u = 0; u < S; ++u) {
      const long long tq = (long long)i * S + S - 1 - u, tk = (long long)j * S + u;
      if (tq >= L || tk >= L) continue;
      const T* a = qb + tq * D;
      const T* c = kb + tk * D;
      for (int d = 0; d < D; ++d) s += to_dbl(a[d]) * to_dbl(c[d]);
    }
    return s * scale;
  };
  double m = __longlong_as_double(0xfff0000000000000ULL);  // -inf
  for (int j = lane; j < jend; j += 32) m = fmax(m, dot(j));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
  double l = 0.0;
  for (int j = lane; j < jend; j += 32) l += exp(dot(j) - m);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
  const double inv = 1.0 / l;
  double* wrow = Wd + ((size_t)bh * nbp + i / BT) * nbp;
  for (int j = lane; j < jend; j += 32) atomicAdd(wrow + j / BT, exp(dot(j) - m) * inv);
}

#ifdef REFATTN_INSTANTIATE
// Compile-time check of the instantiations the launcher and the benchmark use (nvcc
// -DREFATTN_INSTANTIATE --resource-usage); NVRTC instantiates them by name instead.
#define XA_GEMM(T, BT, WM, WN, KC, ST)                                                           \
  template __global__ void xatt_gemm<T, BT, WM, WN, KC, ST>(                                   \
      const T*, const T*, float*, float*, int, int, int, int, int, int, int, int, int,         \
      long long, long long, long long, long long, float, int, int);
XA_GEMM(__nv_bfloat16, 16, 4, 2, 64, 3)
XA_GEMM(__nv_bfloat16, 8, 4, 2, 64, 3)
XA_GEMM(__half, 1, 4, 2, 64, 3)
XA_GEMM(__half, 64, 4, 2, 64, 3)
XA_GEMM(__nv_bfloat16, 16, 2, 2, 64, 4)
XA_GEMM(__nv_bfloat16, 16, 2, 2, 128, 3)
XA_GEMM(__nv_bfloat16, 16, 2, 4, 64, 3)
XA_GEMM(__nv_bfloat16, 16, 4, 2, 128, 2)
#undef XA_GEMM
template __global__ void xatt_tiles<__nv_bfloat16, 16>(const __nv_bfloat16*, const __nv_bfloat16*, float*, float*, int, int, int, int, int, int, int, int, int, long long, long long, long long, long long, float, int, int);
template __global__ void xatt_reduce<16>(const float*, const float*, float*, int, int, int, int, int, int, int);
template __global__ void xatt_exact<float>(const float*, const float*, double*, int, int, int, int, int, int, int, int, int, long long, long long, long long, long long, double, int);
#endif
