// refattn: block-sparse flash-attention forward for Hopper (sm_90a): wgmma + TMA + mbarriers,
// warp-specialised (the FlashAttention-3 scheme). docs/gpu_notes.md "v-wgmma" has the design
// notes and the budget.
//
// One CTA = 3 warpgroups (384 threads) = BM = 128 query rows of one (batch, head):
//   * warpgroup 0, the producer, gives its registers away (setmaxnreg.dec 24) and one thread
//     issues the TMA loads: Q once, then for every tile of the CTA's kv list K and V into a
//     STAGES-deep ring of shared-memory buffers, each guarded by a "full" mbarrier (TMA
//     transaction count) and an "empty" mbarrier (one arrival per consumer warp);
//   * warpgroups 1 and 2, the consumers (setmaxnreg.inc 240), own 64 query rows each:
//     S = Q K^T by wgmma m64nBNk16 with both operands in shared memory (128-byte swizzle,
//     as TMA writes it), the online softmax in registers (base 2, one FFMA + ex2 per score),
//     and O += P V by wgmma m64nDk16 with P from registers (the fp32 accumulator fragment
//     packed to the 16-bit A-fragment layout) and V from shared memory (MN-major, trans-b).
//   * OVL = true overlaps, inside each consumer warpgroup, the softmax of tile j with the
//     P V product of tile j - 1 (FlashAttention-3's intra-warpgroup pipelining); OVL = false
//     waits for every product before going on (simplest; kept as a reference and fallback).
//
// The tensor maps (CUtensorMap, 128 bytes each: q, k, v in that order) live in global memory;
// the host builds them with cuTensorMapEncodeTiled over [B, H, S, D] (4-d, innermost first:
// D, S, H, B) with a box of 64 x rows and CU_TENSOR_MAP_SWIZZLE_128B; a D = 128 row is loaded
// as two 64-wide halves. Out-of-bounds rows (partial last blocks) arrive as zeros and are
// masked. Masking, scheduling (longest causal rows first), GQA, the canonical index form and
// the outputs (fp32 out [B, Hq, Sq, D], natural-log LSE, 0 / -inf for rows that see no key)
// follow attn_fwd.cu's block mode exactly. block_q % 128 == 0 and block_k % BN == 0 (or
// kv_num == nullptr: dense).
//
// Under a target other than sm_90a (e.g. the CI compile with -arch=sm_90) every kernel of this
// file compiles to a trap.
#include "common.cuh"
#include "wgmma.cuh"

// ------------------------------------------------------------------------------ probes
// out[0] = 1 when this compile had the sm_90a feature set (wgmma), out[1] = __CUDA_ARCH__.
__global__ void wgmma_feature_probe(int* out) {
#if defined(__CUDA_ARCH__)
  if (threadIdx.x == 0) {
    out[0] = REFATTN_SM90A;
    out[1] = __CUDA_ARCH__;
  }
#endif
}

// One warpgroup: C [64 x N] fp32 = A [64 x K] * B [N x K]^T (both row-major, K contiguous),
// written to shared memory with the 128-byte swizzle by ordinary stores ([K/64][rows][64]),
// multiplied by K / 16 SS wgmmas exactly as the attention kernel forms S = Q K^T.
// Dynamic shared memory: (K / 64) * (64 + N) * 128 + 1024 bytes.
template <typename T, int N, int K>
__global__ void __launch_bounds__(128) wgmma_probe_ss(const T* __restrict__ A, const T* __restrict__ B,
                                                      float* __restrict__ C) {
#if REFATTN_SM90A
  using namespace refattn;
  using namespace refattn::wg;
  extern __shared__ unsigned char smem_raw[];
  const unsigned raw = smem_addr(smem_raw);
  const unsigned base = (raw + 1023u) & ~1023u;
  unsigned char* gb = smem_raw + (base - raw);
  constexpr int NH = K / 64;
  const unsigned sA = base, sB = base + NH * 64 * 128;
  for (int i = threadIdx.x; i < 64 * K; i += 128) {
    const int r = i / K, c = i % K;
    *reinterpret_cast<T*>(gb + (c / 64) * 64 * 128 + swz128(r, c % 64)) = A[i];
  }
  for (int i = threadIdx.x; i < N * K; i += 128) {
    const int r = i / K, c = i % K;
    *reinterpret_cast<T*>(gb + NH * 64 * 128 + (c / 64) * N * 128 + swz128(r, c % 64)) = B[i];
  }
  fence_proxy_async();
  __syncthreads();
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) reg_fence(d[i]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    const unsigned ko = (kk & 3) * 32, hh = kk >> 2;
    wgmma_ss<T, N>(d, make_desc(sA + hh * 64 * 128 + ko, 16, 1024),
                   make_desc(sB + hh * N * 128 + ko, 16, 1024), kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < N / 2; ++i) reg_fence(d[i]);
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31, g = l >> 2, q = l & 3;
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      C[(16 * w + g + 8 * (e >> 1)) * N + 8 * j + 2 * q + (e & 1)] = d[4 * j + e];
#else
  __trap();
#endif
}

// One warpgroup: C [64 x N] fp32 = round16(P) [64 x KK] * V [KK x N] (V row-major, N
// contiguous), P taken in the m64nKK accumulator layout and packed to A fragments by the
// attention kernel's acc_to_afrag, V stored MN-major with the 128-byte swizzle
// ([N/64][KK][64]) and multiplied by KK / 16 RS wgmmas with trans-b, as O += P V.
// Dynamic shared memory: (N / 64) * KK * 128 + 1024 bytes.
template <typename T, int N, int KK>
__global__ void __launch_bounds__(128) wgmma_probe_rs(const float* __restrict__ P, const T* __restrict__ V,
                                                      float* __restrict__ C) {
#if REFATTN_SM90A
  using namespace refattn;
  using namespace refattn::wg;
  extern __shared__ unsigned char smem_raw[];
  const unsigned raw = smem_addr(smem_raw);
  const unsigned base = (raw + 1023u) & ~1023u;
  unsigned char* gb = smem_raw + (base - raw);
  for (int i = threadIdx.x; i < KK * N; i += 128) {
    const int r = i / N, c = i % N;
    *reinterpret_cast<T*>(gb + (c / 64) * KK * 128 + swz128(r, c % 64)) = V[i];
  }
  fence_proxy_async();
  __syncthreads();
  const int w = threadIdx.x >> 5, l = threadIdx.x & 31, g = l >> 2, q = l & 3;
  float s[KK / 2];
#pragma unroll
  for (int j = 0; j < KK / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[4 * j + e] = P[(16 * w + g + 8 * (e >> 1)) * KK + 8 * j + 2 * q + (e & 1)];
  unsigned a[KK / 16][4];
  acc_to_afrag<T, KK>(a, s);
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) d[i] = 0.f;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) reg_fence(d[i]);
#pragma unroll
  for (int kk = 0; kk < KK / 16; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) reg_fence(a[kk][i]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < KK / 16; ++kk)
    wgmma_rs<T, N>(d, a[kk], make_desc(base + kk * 16 * 128, KK * 128, 1024), 1);
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < N / 2; ++i) reg_fence(d[i]);
#pragma unroll
  for (int j = 0; j < N / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      C[(16 * w + g + 8 * (e >> 1)) * N + 8 * j + 2 * q + (e & 1)] = d[4 * j + e];
#else
  __trap();
#endif
}

// One TMA box load (the tensor map at `map`, coordinates innermost first) of `rows` x 64
// 16-bit elements into shared memory; the raw shared-memory bytes are copied to `out`
// (rows * 64 elements), so the host can check the swizzle and the zero fill.
template <typename T>
__global__ void __launch_bounds__(128) tma_probe(const unsigned char* __restrict__ map, T* __restrict__ out,
                                                 int rows, int c0, int c1, int c2, int c3) {
#if REFATTN_SM90A
  using namespace refattn;
  using namespace refattn::wg;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 bar;
  const unsigned raw = smem_addr(smem_raw);
  const unsigned base = (raw + 1023u) & ~1023u;
  const T* gb = reinterpret_cast<const T*>(smem_raw + (base - raw));
  const unsigned b = smem_addr(&bar);
  if (threadIdx.x == 0) {
    mbar_init(b, 1);
    mbar_init_fence();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    tensormap_acquire(map);
    mbar_expect_tx(b, rows * 128);
    tma_load_4d(base, map, b, c0, c1, c2, c3);
  }
  mbar_wait(b, 0);
  for (int i = threadIdx.x; i < rows * 64; i += 128) out[i] = gb[i];
#else
  __trap();
#endif
}

// ------------------------------------------------------------------------------ forward
// Grid (ceil(Sq / 128), Hq, B), 384 threads, dynamic shared memory
// 1024 + 128 * D * 2 + 2 * STAGES * BN * D * 2 bytes.
template <typename T, int D, int BN, int STAGES, bool OVL>
__global__ void __launch_bounds__(384, 1) attn_fwd_wgmma(
    const unsigned char* __restrict__ maps, float* __restrict__ out, float* __restrict__ lse, int Hq,
    int Hkv, int Sq, int Sk, float scale_log2, int causal, const int* __restrict__ kv_num,
    const int* __restrict__ kv_idx, long long mn_sb, long long mn_sh, long long mi_sb, long long mi_sh,
    int kv_width, int block_q, int block_k) {
#if REFATTN_SM90A
  using namespace refattn;
  using namespace refattn::wg;
  static_assert(D == 64 || D == 128, "D must be 64 or 128");
  static_assert(BN == 64 || BN == 128, "BN must be 64 or 128");
  constexpr int BM = 128, NH = D / 64;
  constexpr unsigned Q_BYTES = BM * D * 2, KV_BYTES = BN * D * 2;
  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) u64 bars[1 + 4 * STAGES];
  __shared__ int sNT;
  const unsigned base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  const unsigned sQ = base, sK = base + Q_BYTES, sV = sK + STAGES * KV_BYTES;
  const unsigned bq = smem_addr(bars);
  // barriers: [0] Q full; [1 + s] K full; [1 + S + s] V full; [1 + 2S + s] K empty; [1 + 3S + s] V empty
  auto kfull = [&](int s) { return bq + 8u * (1 + s); };
  auto vfull = [&](int s) { return bq + 8u * (1 + STAGES + s); };
  auto kempty = [&](int s) { return bq + 8u * (1 + 2 * STAGES + s); };
  auto vempty = [&](int s) { return bq + 8u * (1 + 3 * STAGES + s); };

  const int tid = threadIdx.x;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // longest (causal) row blocks first
  const int h = blockIdx.y, b = blockIdx.z, hk = h / (Hq / Hkv);
  const int TPB = block_k / BN;
  const int nkt = (Sk + BN - 1) / BN;
  const int off = Sk - Sq;
  const int qb = m0 / block_q;
  const int row_max = min(m0 + BM, Sq) - 1;
  int lim = nkt;
  if (causal) {
    const int last = row_max + off;  // last visible key of the CTA
    lim = last < 0 ? 0 : min(nkt, last / BN + 1);
  }
  const int* idx_row = nullptr;
  int nblk = 0;
  if (kv_num != nullptr) {
    nblk = kv_num[b * mn_sb + h * mn_sh + qb];
    idx_row = kv_idx + b * mi_sb + h * mi_sh + (long long)qb * kv_width;
  }
  if (tid == 0) {
    mbar_init(bq, 1);
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(kfull(s), 1);
      mbar_init(vfull(s), 1);
      mbar_init(kempty(s), 8);  // one arrival per consumer warp
      mbar_init(vempty(s), 8);
    }
    mbar_init_fence();
    sNT = kv_num == nullptr ? lim : 0;
  }
  __syncthreads();
  if (kv_num != nullptr) {
    int part = 0;
    for (int s = tid; s < nblk; s += 384) part += max(0, min(TPB, lim - idx_row[s] * TPB));
    if (part) atomicAdd(&sNT, part);
  }
  __syncthreads();
  const int n_tiles = sNT;  // the visible tiles form a prefix of the ascending tile list
  auto tile_of = [&](int p) -> int {
    if (idx_row == nullptr) return p;
    return idx_row[p / TPB] * TPB + p % TPB;
  };

  // warpgroup index, provably warp-uniform (ptxas needs that to apply setmaxnreg per branch)
  const int wg_idx = __shfl_sync(0xffffffffu, tid / 128, 0);
  if (wg_idx == 0) {
    // ------------------------------------------------------------ producer
    setmaxnreg_dec<24>();
    if (tid == 0 && n_tiles > 0) {
      const unsigned char* mq = maps;
      const unsigned char* mk = maps + 128;
      const unsigned char* mv = maps + 256;
      tensormap_acquire(mq);
      tensormap_acquire(mk);
      tensormap_acquire(mv);
      mbar_expect_tx(bq, Q_BYTES);
#pragma unroll
      for (int hh = 0; hh < NH; ++hh) tma_load_4d(sQ + hh * BM * 128, mq, bq, hh * 64, m0, h, b);
      int t_nxt = tile_of(0);
#pragma unroll 1
      for (int it = 0; it < n_tiles; ++it) {
        const int s = it % STAGES;
        const unsigned ph = (it / STAGES) & 1;
        const int t = t_nxt;
        if (it + 1 < n_tiles) t_nxt = tile_of(it + 1);
        mbar_wait(kempty(s), ph ^ 1);
        mbar_expect_tx(kfull(s), KV_BYTES);
#pragma unroll
        for (int hh = 0; hh < NH; ++hh)
          tma_load_4d(sK + s * KV_BYTES + hh * BN * 128, mk, kfull(s), hh * 64, t * BN, hk, b);
        mbar_wait(vempty(s), ph ^ 1);
        mbar_expect_tx(vfull(s), KV_BYTES);
#pragma unroll
        for (int hh = 0; hh < NH; ++hh)
          tma_load_4d(sV + s * KV_BYTES + hh * BN * 128, mv, vfull(s), hh * 64, t * BN, hk, b);
      }
    }
  } else {
  // -------------------------------------------------------------- consumers
  setmaxnreg_inc<240>();
  const int cw = wg_idx - 1;  // consumer warpgroup 0 / 1: rows 64 cw .. 64 cw + 63
  const int warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, q4 = lane & 3;
  const int r_lo = m0 + cw * 64 + warp * 16;  // first row of this warp
  const int row0 = r_lo + g, row1 = row0 + 8;
  const unsigned qA = sQ + cw * 64 * 128;

  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m_run[2] = {-REFATTN_INF, -REFATTN_INF}, l_run[2] = {0.f, 0.f};

  // S = Q K^T of stage s into sc (issued and committed, not waited for)
  auto issue_s = [&](float* sc, int s) {
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) reg_fence(sc[i]);
    wgmma_fence();
    const unsigned kb = sK + s * KV_BYTES;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const unsigned ko = (kk & 3) * 32, hh = kk >> 2;
      wgmma_ss<T, BN>(sc, make_desc(qA + hh * BM * 128 + ko, 16, 1024),
                      make_desc(kb + hh * BN * 128 + ko, 16, 1024), kk > 0);
    }
    wgmma_commit();
  };
  // O += P V of stage s (issued and committed, not waited for)
  auto issue_pv = [&](unsigned (*a)[4], int s) {
#pragma unroll
    for (int i = 0; i < D / 2; ++i) reg_fence(o[i]);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) reg_fence(a[kk][i]);
    wgmma_fence();
    const unsigned vb = sV + s * KV_BYTES;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_rs<T, D>(o, a[kk], make_desc(vb + kk * 16 * 128, BN * 128, 1024), 1);
    wgmma_commit();
  };
  // mask + online softmax of one tile (sc becomes P, unnormalised); returns the rescale
  // factors of the two rows in alpha (O is not touched)
  auto softmax = [&](float* sc, int t, float* alpha) {
    const int k0 = t * BN;
    const bool need_mask = (k0 + BN > Sk) || (causal && k0 + BN - 1 > r_lo + off);
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
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = -REFATTN_INF;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(sc[4 * j + 2 * hf], sc[4 * j + 2 * hf + 1]));
      mx = quad_max(mx) * scale_log2;  // scale > 0: max commutes with scaling
      const float m_new = fmaxf(m_run[hf], mx);
      const float m_use = m_new == -REFATTN_INF ? 0.f : m_new;
      alpha[hf] = fast_exp2(m_run[hf] - m_use);
      m_run[hf] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = fast_exp2(fmaf(sc[4 * j + 2 * hf + e], scale_log2, -m_use));
          sc[4 * j + 2 * hf + e] = p;
          sum += p;
        }
      l_run[hf] = l_run[hf] * alpha[hf] + sum;
    }
  };
  auto rescale = [&](const float* alpha) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[4 * j + 0] *= alpha[0];
      o[4 * j + 1] *= alpha[0];
      o[4 * j + 2] *= alpha[1];
      o[4 * j + 3] *= alpha[1];
    }
  };
  auto release = [&](unsigned bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };

  if (n_tiles > 0) {
    mbar_wait(bq, 0);
    int t_cur = tile_of(0);
    int t_nxt = n_tiles > 1 ? tile_of(1) : 0;
    float sc[BN / 2];
    unsigned a[BN / 16][4];
    float alpha[2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) sc[i] = 0.f;
    if constexpr (!OVL) {
#pragma unroll 1
      for (int it = 0; it < n_tiles; ++it) {
        const int s = it % STAGES;
        const unsigned ph = (it / STAGES) & 1;
        const int t = t_cur;
        t_cur = t_nxt;
        if (it + 2 < n_tiles) t_nxt = tile_of(it + 2);
        mbar_wait(kfull(s), ph);
        issue_s(sc, s);
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) reg_fence(sc[i]);
        release(kempty(s));
        softmax(sc, t, alpha);
        rescale(alpha);
        acc_to_afrag<T, BN>(a, sc);
        mbar_wait(vfull(s), ph);
        issue_pv(a, s);
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < D / 2; ++i) reg_fence(o[i]);
        release(vempty(s));
      }
    } else {
      // prologue: S_0, P_0
      mbar_wait(kfull(0), 0);
      issue_s(sc, 0);
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) reg_fence(sc[i]);
      release(kempty(0));
      softmax(sc, t_cur, alpha);  // O == 0: no rescale needed
      acc_to_afrag<T, BN>(a, sc);
      t_cur = t_nxt;
      if (n_tiles > 2) t_nxt = tile_of(2);
#pragma unroll 1
      for (int it = 1; it < n_tiles; ++it) {
        const int s = it % STAGES, sp = (it - 1) % STAGES;
        const unsigned ph = (it / STAGES) & 1, php = ((it - 1) / STAGES) & 1;
        const int t = t_cur;
        t_cur = t_nxt;
        if (it + 2 < n_tiles) t_nxt = tile_of(it + 2);
        mbar_wait(kfull(s), ph);
        issue_s(sc, s);            // S_it
        mbar_wait(vfull(sp), php);
        issue_pv(a, sp);           // O += P_{it-1} V_{it-1}
        wgmma_wait<1>();           // S_it done (P V may still run)
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) reg_fence(sc[i]);
        release(kempty(s));
        softmax(sc, t, alpha);
        wgmma_wait<0>();           // P V done
#pragma unroll
        for (int i = 0; i < D / 2; ++i) reg_fence(o[i]);
        release(vempty(sp));
        rescale(alpha);
        acc_to_afrag<T, BN>(a, sc);
      }
      const int sl = (n_tiles - 1) % STAGES;
      mbar_wait(vfull(sl), ((n_tiles - 1) / STAGES) & 1);
      issue_pv(a, sl);
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < D / 2; ++i) reg_fence(o[i]);
      release(vempty(sl));
    }
  }

  // ---- epilogue: normalise, write out (fp32) and LSE (natural log)
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float l = quad_sum(l_run[hf]);
    const int row = hf ? row1 : row0;
    if (row >= Sq) continue;
    const bool empty = !(l > 0.f) || m_run[hf] == -REFATTN_INF;
    const float inv = empty ? 0.f : 1.f / l;
    const long long orow = (long long)(b * Hq + h) * Sq + row;
    float* op = out + orow * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<float2*>(op + 8 * j + 2 * q4) =
          make_float2(o[4 * j + 2 * hf] * inv, o[4 * j + 2 * hf + 1] * inv);
    if (q4 == 0) lse[orow] = empty ? -REFATTN_INF : (m_run[hf] + log2f(l)) * kLn2;
  }
  }  // consumers
#else
  __trap();
#endif
}
