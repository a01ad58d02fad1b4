// refattn: block-sparse flash-attention forward on tensor cores (mma.sync m16n8k16).
//
// One CTA = 4 warps = BM query rows (BM = 64: 16 rows per warp; BM = 128: 32 rows per warp,
// so every K/V fragment read from shared memory feeds two m16 tiles, as FlashAttention-2
// does) against a list of BN-key tiles (BN = 64 by default; 32 is kept as a tuning option).
// K/V tiles are double-buffered with cp.async (tile indices read one iteration ahead); the
// probabilities stay in registers (accumulator -> A-operand reuse); the softmax runs in base
// 2 with one FFMA per score. CTAs take query tiles from the last one down, so that under
// causal masking the longest ones start first.
//
// Two modes, chosen at compile time:
//   GATHER = false  block mask in canonical index form: CTA (m-tile, h, b) takes the kv
//                   blocks of its query block, kv_idx[b, h, qb, :kv_num[b, h, qb]]
//                   (kv_num == nullptr: dense, every tile). block_q % BM == 0 and
//                   block_k % BN == 0 are required (the launcher checks).
//   GATHER = true   per-token routing (block_q = 1, MoBA), FlashMoBA-style: the query rows
//                   that selected one key block are gathered into dense BM-row tiles; the
//                   CTA writes, for every (row, key block) pair, a normalised partial output
//                   and its LSE; attn_combine merges the partials of each row.
//
// Causal masking is bottom-right aligned (key j visible to row i iff j <= i + Sk - Sq) and
// applied inside tiles; tiles wholly invisible are skipped. Partial last blocks on both
// axes are zero-filled on load and masked. Rows that see no key get 0 and LSE -inf.
#include "common.cuh"

namespace refattn {

constexpr int kThreads = 128;  // 4 warps: every launch of these kernels uses 128 threads

template <typename T, int D, int BM, int BN, bool GATHER>
__device__ __forceinline__ void fwd_mma_body(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    float* __restrict__ out, float* __restrict__ lse,
    long long q_sb, long long q_sh, long long q_ss, long long k_sb, long long k_sh, long long k_ss,
    long long v_sb, long long v_sh, long long v_ss, int Hq, int Hkv, int Sq, int Sk,
    float scale_log2, int causal, const int* __restrict__ kv_num, const int* __restrict__ kv_idx,
    long long mn_sb, long long mn_sh, long long mi_sb, long long mi_sh, int kv_width, int block_q,
    int block_k, const int* __restrict__ tile_seg, const int* __restrict__ tile_start,
    const long long* __restrict__ seg_off, const int* __restrict__ seg_cnt,
    const int* __restrict__ g_rows, const long long* __restrict__ g_pair, int Kb) {
  constexpr int LDS = D + 8;  // padded row (elements): conflict-free ldmatrix
  constexpr int MR = BM / 64;  // m16 tiles per warp
  constexpr int CH = D / 8;    // 16-byte chunks per row

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * LDS;
  T* sV = sK + 2 * BN * LDS;
  int* sRow = reinterpret_cast<int*>(sV + 2 * BN * LDS);
  __shared__ int sNT;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int TPB = block_k / BN;  // BN-key tiles per mask block
  const int nkt = (Sk + BN - 1) / BN;
  const int off = Sk - Sq;

  int b, h, qb = 0, kb = 0, m0 = 0, cnt = BM;
  long long base = 0;
  if (GATHER) {
    const int s = tile_seg[blockIdx.x];
    const int start = tile_start[blockIdx.x];
    kb = s % Kb;
    h = (s / Kb) % Hq;
    b = s / (Kb * Hq);
    base = seg_off[s] + start;
    cnt = min(BM, seg_cnt[s] - start);
  } else {
    m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // longest (causal) row blocks first
    h = blockIdx.y;
    b = blockIdx.z;
    qb = m0 / block_q;
  }
  const int hk = h / (Hq / Hkv);
  const T* qbase = q + b * q_sb + h * q_sh;
  const T* kbase = k + b * k_sb + hk * k_sh;
  const T* vbase = v + b * v_sb + hk * v_sh;

  // ---- rows of this CTA
  for (int i = tid; i < BM; i += kThreads) {
    int r;
    if (GATHER) r = i < cnt ? g_rows[base + i] : -1;
    else r = (m0 + i < Sq) ? m0 + i : -1;
    sRow[i] = r;
  }
  if (tid == 0) sNT = 0;
  __syncthreads();
  // first and last valid row (ascending in both modes)
  const int row_min = sRow[0];
  const int row_max = GATHER ? sRow[cnt - 1] : min(m0 + BM, Sq) - 1;
  int lim = nkt;
  if (causal) {
    const int last = row_max + off;  // last visible key of the CTA
    lim = last < 0 ? 0 : min(nkt, last / BN + 1);
  }

  // ---- number of tiles (the visible ones form a prefix of the ascending tile sequence)
  const int* idx_row = nullptr;
  int nblk = 0;
  if (GATHER) {
    if (tid == 0) sNT = max(0, min(TPB, lim - kb * TPB));
  } else if (kv_num == nullptr) {
    if (tid == 0) sNT = lim;
  } else {
    nblk = kv_num[b * mn_sb + h * mn_sh + qb];
    idx_row = kv_idx + b * mi_sb + h * mi_sh + (long long)qb * kv_width;
    int part = 0;
    for (int s = tid; s < nblk; s += kThreads) part += max(0, min(TPB, lim - idx_row[s] * TPB));
    if (part) atomicAdd(&sNT, part);
  }
  __syncthreads();
  const int n_tiles = sNT;
  auto tile_of = [&](int p) -> int {
    if (GATHER) return kb * TPB + p;
    if (idx_row == nullptr) return p;
    return idx_row[p / TPB] * TPB + p % TPB;
  };

  // ---- async loads
#pragma unroll 1
  for (int i = tid; i < BM * CH; i += kThreads) {
    const int r = i / CH, c = (i % CH) * 8;
    const int row = sRow[r];
    cp_async16(sQ + r * LDS + c, row >= 0 ? qbase + row * q_ss + c : qbase, row >= 0);
  }
  auto load_kv = [&](int t, int st) {
    T* dk = sK + st * BN * LDS;
    T* dv = sV + st * BN * LDS;
#pragma unroll 1
    for (int i = tid; i < BN * CH; i += kThreads) {
      const int r = i / CH, c = (i % CH) * 8;
      const int key = t * BN + r;
      const bool ok = key < Sk;
      cp_async16(dk + r * LDS + c, ok ? kbase + key * k_ss + c : kbase, ok);
      cp_async16(dv + r * LDS + c, ok ? vbase + key * v_ss + c : vbase, ok);
    }
  };
  if (n_tiles > 0) load_kv(tile_of(0), 0);  // (t_cur below re-reads the same index)
  cp_async_commit();

  float acc_o[MR][D / 8][4];
  float m_run[MR][2], l_run[MR][2];
#pragma unroll
  for (int mr = 0; mr < MR; ++mr) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) acc_o[mr][j][0] = acc_o[mr][j][1] = acc_o[mr][j][2] = acc_o[mr][j][3] = 0.f;
    m_run[mr][0] = m_run[mr][1] = -REFATTN_INF;
    l_run[mr][0] = l_run[mr][1] = 0.f;
  }
  // this thread's rows: warp*16*MR + mr*16 + (lane>>2) + 8*half (read from sRow when needed)
  const T* sQw = sQ + warp * 16 * MR * LDS;
  // tile indices run one iteration ahead so that the (global) index load never stalls issue
  int t_cur = n_tiles > 0 ? tile_of(0) : 0;
  int t_nxt = n_tiles > 1 ? tile_of(1) : 0;
  for (int it = 0; it < n_tiles; ++it) {
    const int t = t_cur;
    cp_async_wait<0>();
    __syncthreads();
    if (it + 1 < n_tiles) load_kv(t_nxt, (it + 1) & 1);
    cp_async_commit();
    t_cur = t_nxt;
    if (it + 2 < n_tiles) t_nxt = tile_of(it + 2);
    const T* sKs = sK + (it & 1) * BN * LDS;
    const T* sVs = sV + (it & 1) * BN * LDS;

    // S = Q K^T  (per warp: 16*MR rows x 64 keys)
    float acc_s[MR][BN / 8][4];
#pragma unroll
    for (int mr = 0; mr < MR; ++mr)
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) acc_s[mr][j][0] = acc_s[mr][j][1] = acc_s[mr][j][2] = acc_s[mr][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      unsigned a[MR][4];
#pragma unroll
      for (int mr = 0; mr < MR; ++mr) load_a<false>(a[mr], sQw + mr * 16 * LDS, LDS, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        unsigned bb[4];
        load_b<false>(bb, sKs, LDS, np * 16, kk * 16, lane);
#pragma unroll
        for (int mr = 0; mr < MR; ++mr) {
          mma16816<T>(acc_s[mr][2 * np], a[mr], bb[0], bb[1]);
          mma16816<T>(acc_s[mr][2 * np + 1], a[mr], bb[2], bb[3]);
        }
      }
    }

    // mask, online softmax (base 2; m_run is in scaled units, p = 2^(s*c - m): one FFMA)
    const int k0 = t * BN;
    const bool need_mask = (k0 + BN > Sk) || (causal && (GATHER || k0 + BN - 1 > row_min + off));
#pragma unroll
    for (int mr = 0; mr < MR; ++mr) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = -REFATTN_INF;
        if (need_mask) {
          const int row = sRow[warp * 16 * MR + mr * 16 + (lane >> 2) + 8 * hf];
#pragma unroll
          for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = k0 + j * 8 + 2 * (lane & 3) + e;
              if (col >= Sk || (causal && col > row + off)) acc_s[mr][j][2 * hf + e] = -REFATTN_INF;
            }
          }
        }
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
          mx = fmaxf(mx, fmaxf(acc_s[mr][j][2 * hf], acc_s[mr][j][2 * hf + 1]));
        mx = quad_max(mx) * scale_log2;  // scale > 0: max commutes with scaling
        const float m_new = fmaxf(m_run[mr][hf], mx);
        const float m_use = m_new == -REFATTN_INF ? 0.f : m_new;
        const float alpha = fast_exp2(m_run[mr][hf] - m_use);
        m_run[mr][hf] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = fast_exp2(fmaf(acc_s[mr][j][2 * hf + e], scale_log2, -m_use));
            acc_s[mr][j][2 * hf + e] = p;
            sum += p;
          }
        }
        l_run[mr][hf] = l_run[mr][hf] * alpha + sum;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          acc_o[mr][j][2 * hf] *= alpha;
          acc_o[mr][j][2 * hf + 1] *= alpha;
        }
      }
    }

    // O += P V
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      unsigned a[MR][4];
#pragma unroll
      for (int mr = 0; mr < MR; ++mr) acc_to_a<T>(a[mr], acc_s[mr][2 * kk], acc_s[mr][2 * kk + 1]);
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        unsigned bb[4];
        load_b<true>(bb, sVs, LDS, np * 16, kk * 16, lane);
#pragma unroll
        for (int mr = 0; mr < MR; ++mr) {
          mma16816<T>(acc_o[mr][2 * np], a[mr], bb[0], bb[1]);
          mma16816<T>(acc_o[mr][2 * np + 1], a[mr], bb[2], bb[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: normalise, write out (fp32) and LSE (natural log)
#pragma unroll
  for (int mr = 0; mr < MR; ++mr) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int rloc = warp * 16 * MR + mr * 16 + (lane >> 2) + 8 * hf;
      const int row = sRow[rloc];
      if (row < 0) continue;
      const float l = quad_sum(l_run[mr][hf]);
      const bool empty = !(l > 0.f) || m_run[mr][hf] == -REFATTN_INF;
      const float inv = empty ? 0.f : 1.f / l;
      long long orow;
      if (GATHER) orow = g_pair[base + rloc];
      else orow = ((long long)(b * Hq + h) * Sq + row);
      float* o = out + orow * D;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        float2 val = make_float2(acc_o[mr][j][2 * hf] * inv, acc_o[mr][j][2 * hf + 1] * inv);
        *reinterpret_cast<float2*>(o + j * 8 + 2 * (lane & 3)) = val;
      }
      if ((lane & 3) == 0) lse[orow] = empty ? -REFATTN_INF : (m_run[mr][hf] + log2f(l)) * kLn2;
    }
  }
}

#define REFATTN_FWD_ARGS                                                                        \
  const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v,                    \
      float *__restrict__ out, float *__restrict__ lse, long long q_sb, long long q_sh,         \
      long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb,           \
      long long v_sh, long long v_ss, int Hq, int Hkv, int Sq, int Sk, float scale_log2,        \
      int causal, const int *__restrict__ kv_num, const int *__restrict__ kv_idx,               \
      long long mn_sb, long long mn_sh, long long mi_sb, long long mi_sh, int kv_width,         \
      int block_q, int block_k, const int *__restrict__ tile_seg,                               \
      const int *__restrict__ tile_start, const long long *__restrict__ seg_off,                \
      const int *__restrict__ seg_cnt, const int *__restrict__ g_rows,                          \
      const long long *__restrict__ g_pair, int Kb
#define REFATTN_FWD_PASS                                                                        \
  q, k, v, out, lse, q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, Hq, Hkv, Sq, Sk,     \
      scale_log2, causal, kv_num, kv_idx, mn_sb, mn_sh, mi_sb, mi_sh, kv_width, block_q,        \
      block_k, tile_seg, tile_start, seg_off, seg_cnt, g_rows, g_pair, Kb

}  // namespace refattn

// Kernel entry points (extern "C"-free templates instantiated through name_expressions).
template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(128, 2) attn_fwd_block(REFATTN_FWD_ARGS) {
  refattn::fwd_mma_body<T, D, BM, BN, false>(REFATTN_FWD_PASS);
}

template <typename T, int D, int BM>
__global__ void __launch_bounds__(128, 2) attn_fwd_gather(REFATTN_FWD_ARGS) {
  refattn::fwd_mma_body<T, D, BM, 64, true>(REFATTN_FWD_PASS);
}

// Merge the per-(row, key block) partials of the gather mode. One warp per output row;
// partials of row r are part_o[row_ptr[r] : row_ptr[r+1]] (each normalised, with its LSE).
// out [R, D] fp32 and lse [R] (natural log); rows with no finite partial get 0 and -inf.
template <int D>
__global__ void attn_combine(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                             const long long* __restrict__ row_ptr, float* __restrict__ out,
                             float* __restrict__ lse, long long R) {
  constexpr int EPL = (D + 31) / 32;
  const long long r = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= R) return;
  const long long p0 = row_ptr[r], p1 = row_ptr[r + 1];
  float m = -REFATTN_INF;
  for (long long p = p0 + lane; p < p1; p += 32) m = fmaxf(m, part_lse[p]);
  m = refattn::warp_max(m);
  float acc[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) acc[e] = 0.f;
  float wsum = 0.f;
  if (m != -REFATTN_INF) {
    for (long long p = p0; p < p1; ++p) {
      const float w = expf(part_lse[p] - m);
      wsum += w;
#pragma unroll
      for (int e = 0; e < EPL; ++e) {
        const int d = lane + 32 * e;
        if (d < D) acc[e] += w * part_o[p * D + d];
      }
    }
  }
  const bool empty = !(wsum > 0.f);
  const float inv = empty ? 0.f : 1.f / wsum;
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    const int d = lane + 32 * e;
    if (d < D) out[r * D + d] = acc[e] * inv;
  }
  if (lane == 0) lse[r] = empty ? -REFATTN_INF : m + logf(wsum);
}
