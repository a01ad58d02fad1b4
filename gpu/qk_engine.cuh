// The tensor-core QK^T engine shared by the NSA, ProxyAttn and PBS-Attn scoring kernels
// (gpu/score_nsa.cu, gpu/score_proxy_pbs.cu). Include after common.cuh.
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
#pragma once

namespace refattn {

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
