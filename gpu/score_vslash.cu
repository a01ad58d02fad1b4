// Vertical / slash scoring kernels of MInference and FlexPrefill (ops `minference_score`,
// `flexprefill_score`), see gpu/scoring_estimate.py. Arrays are contiguous bhsd: q
// [B, Hq, Sq, D], k [B, Hkv, Sk, D]; query head h reads kv head h / G (G = Hq / Hkv).
//
// Vertical / slash estimates (MInference; FlexPrefill with div = ell): the last `ell`
// query rows e = 0..ell-1 (query row Sq - ell + e, key position p_e = Sk - ell + e) take a
// causal softmax of scale * q . k over keys j <= p_e; vertical[j] = sum_e P[e, j] / div,
// slash[o] = sum_e P[e, p_e - o] / div. No [ell x Sk] array is stored:
//   * vs_stats<T, D, BM>  (tensor cores) CTA = (key chunk, row tile of BM rows, b*h): per
//     row the chunk maximum and the chunk sum of exp2 (online over the 64-key tiles);
//   * vs_combine          per row: maximum and 1 / (sum * div) over the chunks;
//   * vs_accum<T, D, BM>  recomputes the logits, P = exp2(s - m) * inv, writes the 64-key
//     tile of P to shared memory; column sums go to `vertical` (one fp32 atomic add per
//     column and row half), diagonal sums accumulate in a per-chunk shared array (plain
//     adds, each diagonal owned by one thread) flushed with one atomic add per offset.
//   * vs_exact_rows<T> / vs_exact_cols<T> (any dtype or geometry): float64, one warp per
//     row for the statistics, one thread per column / offset for the sums (recomputing the
//     dot products); slow, for exactness.
//
// FlexPrefill's pooled kernels are in gpu/score_flexprefill_pool.cu.
#include "common.cuh"
#include "estimate_common.cuh"

using namespace refattn;
using namespace refattn::est;

// ===================================================================== vertical / slash
enum : int { VS_BN = 64,           // keys per tile
             VS_LDP = VS_BN + 8 };  // row stride (floats) of the P tile in shared memory

// Statistics pass. Grid (nch, ceil(ell/BM), B*Hq), 128 threads. Chunk `ch` holds keys
// [ch*chunk, (ch+1)*chunk) (chunk % 64 == 0). st_m / st_l float [B*Hq, ell, nch]: the
// chunk maximum of s = scale*log2(e)*q.k over the visible keys (-inf if none) and the
// chunk sum of exp2(s - max). Dynamic shared memory: (BM + 128) * (D + 8) * sizeof(T).
template <typename T, int D, int BM>
__global__ void __launch_bounds__(128, (BM == 64 ? 4 : 2)) vs_stats(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ st_m,
    float* __restrict__ st_l, int Hq, int G, int Sq, int Sk, int ell, int chunk, int nch,
    float scale_log2) {
  constexpr int LD = D + 8, KS = D / 16, MR = BM / 64;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* sK = sQ + BM * LD;                    // [2][64][LD]
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int ch = blockIdx.x, bh = blockIdx.z, b = bh / Hq, h = bh % Hq;
  const int e0 = blockIdx.y * BM;                    // first estimate row of the tile
  const int p0 = Sk - ell + e0;                      // key position of tile row 0
  const int p_last = Sk - ell + min(ell, e0 + BM) - 1;
  const int k_begin = ch * chunk;
  const int k_end = min(min(Sk, k_begin + chunk), p_last + 1);
  const int n_tiles = k_end > k_begin ? (k_end - k_begin + VS_BN - 1) / VS_BN : 0;

  float m_run[MR][2], l_run[MR][2];
  int plim[MR][2];
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      m_run[mt][hf] = -REFATTN_INF;
      l_run[mt][hf] = 0.f;
      const int rr = warp * 16 * MR + mt * 16 + (lane >> 2) + 8 * hf;
      plim[mt][hf] = e0 + rr < ell ? p0 + rr : -1;  // last visible key (-1: none)
    }

  if (n_tiles > 0) {
    const T* qb = q + ((long long)b * Hq + h) * Sq * D;
    const T* kb = k + ((long long)b * (Hq / G) + h / G) * Sk * D;
    load_rows<T, D, LD>(sQ, qb, BM, Sq - ell + e0, ell - e0, tid);
    auto load_k = [&](int t, int st) {
      const int c0 = k_begin + t * VS_BN;
      load_rows<T, D, LD>(sK + st * VS_BN * LD, kb, VS_BN, c0, Sk - c0, tid);
    };
    load_k(0, 0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned qa[MR][KS][4];
#pragma unroll
    for (int mt = 0; mt < MR; ++mt)
#pragma unroll
      for (int kk = 0; kk < KS; ++kk)
        load_a<false>(qa[mt][kk], sQ + (warp * 16 * MR + mt * 16) * LD, LD, kk * 16, lane);
    const bool rows_partial = e0 + BM > ell;

#pragma unroll 1
    for (int it = 0; it < n_tiles; ++it) {
      if (it > 0) {
        cp_async_wait<0>();
        __syncthreads();
      }
      if (it + 1 < n_tiles) load_k(it + 1, (it + 1) & 1);
      cp_async_commit();
      float acc[MR][8][4];
      tile_qk<T, KS, MR>(acc, qa, sK + (it & 1) * VS_BN * LD, LD, lane);
      const int c0 = k_begin + it * VS_BN;
      const bool need_mask = rows_partial || (c0 + VS_BN - 1 > p0);
#pragma unroll
      for (int mt = 0; mt < MR; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float mx = -REFATTN_INF;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = acc[mt][nt][2 * hf + e] * scale_log2;
              if (need_mask && c0 + nt * 8 + 2 * (lane & 3) + e > plim[mt][hf]) x = -REFATTN_INF;
              acc[mt][nt][2 * hf + e] = x;
              mx = fmaxf(mx, x);
            }
          }
          const float m_new = fmaxf(m_run[mt][hf], mx);
          const float m_use = m_new == -REFATTN_INF ? 0.f : m_new;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
            sum += fast_exp2(acc[mt][nt][2 * hf] - m_use) + fast_exp2(acc[mt][nt][2 * hf + 1] - m_use);
          l_run[mt][hf] = l_run[mt][hf] * fast_exp2(m_run[mt][hf] - m_use) + sum;
          m_run[mt][hf] = m_new;
        }
      }
    }
  }
  // combine the four lanes of each row, write
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float mq = quad_max(m_run[mt][hf]);
      const float mu = mq == -REFATTN_INF ? 0.f : mq;
      const float l = quad_sum(l_run[mt][hf] * exp2f(m_run[mt][hf] - mu));
      const int e = e0 + warp * 16 * MR + mt * 16 + (lane >> 2) + 8 * hf;
      if ((lane & 3) == 0 && e < ell) {
        const long long o = ((long long)bh * ell + e) * nch + ch;
        st_m[o] = mq;
        st_l[o] = l;
      }
    }
}

// Per row: m = max over chunks (0 if the row sees no key), inv = 1 / (sum * div) (0 if none).
__global__ void __launch_bounds__(256) vs_combine(const float* __restrict__ st_m,
                                                  const float* __restrict__ st_l,
                                                  float* __restrict__ row_m,
                                                  float* __restrict__ row_inv, long long rows,
                                                  int nch, float div) {
  const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const float* pm = st_m + r * nch;
  const float* pl = st_l + r * nch;
  float m = -REFATTN_INF;
  for (int c = 0; c < nch; ++c) m = fmaxf(m, pm[c]);
  const float mu = m == -REFATTN_INF ? 0.f : m;
  float l = 0.f;
  for (int c = 0; c < nch; ++c) l += pl[c] * exp2f(pm[c] - mu);
  row_m[r] = mu;
  row_inv[r] = l > 0.f ? 1.f / (l * div) : 0.f;
}

// Accumulation pass: same grid and chunks as vs_stats. vert / slash float [B*Hq, Sk],
// zeroed by the caller. Dynamic shared memory: max(BM*(D+8)*sizeof(T), BM*72*4)
// + 2*64*(D+8)*sizeof(T) + (chunk + BM - 1)*4 bytes (vs_accum_smem in the launcher).
template <typename T, int D, int BM>
__global__ void __launch_bounds__(128, (BM == 64 ? 4 : 2)) vs_accum(
    const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ row_m,
    const float* __restrict__ row_inv, float* __restrict__ vert, float* __restrict__ slash,
    int Hq, int G, int Sq, int Sk, int ell, int chunk, float scale_log2) {
  constexpr int LD = D + 8, KS = D / 16, MR = BM / 64;
  constexpr int QBYTES = BM * LD * (int)sizeof(T), PBYTES = BM * VS_LDP * 4;
  constexpr int UBYTES = ((QBYTES > PBYTES ? QBYTES : PBYTES) + 15) / 16 * 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);                              // [BM][LD] (first)
  float* sP = reinterpret_cast<float*>(smem_raw);                      // [BM][72] (then)
  T* sK = reinterpret_cast<T*>(smem_raw + UBYTES);                     // [2][64][LD]
  float* sSl = reinterpret_cast<float*>(smem_raw + UBYTES + 2 * VS_BN * LD * (int)sizeof(T));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int ch = blockIdx.x, bh = blockIdx.z, b = bh / Hq, h = bh % Hq;
  const int e0 = blockIdx.y * BM;
  const int p0 = Sk - ell + e0;
  const int p_last = Sk - ell + min(ell, e0 + BM) - 1;
  const int k_begin = ch * chunk;
  const int k_end = min(min(Sk, k_begin + chunk), p_last + 1);
  if (k_end <= k_begin) return;  // nothing visible in this chunk
  const int n_tiles = (k_end - k_begin + VS_BN - 1) / VS_BN;
  const int ntc = chunk / VS_BN;
  const int nsl = chunk + BM - 1;

  const T* qb = q + ((long long)b * Hq + h) * Sq * D;
  const T* kb = k + ((long long)b * (Hq / G) + h / G) * Sk * D;
  load_rows<T, D, LD>(sQ, qb, BM, Sq - ell + e0, ell - e0, tid);
  auto load_k = [&](int t, int st) {
    const int c0 = k_begin + t * VS_BN;
    load_rows<T, D, LD>(sK + st * VS_BN * LD, kb, VS_BN, c0, Sk - c0, tid);
  };
  load_k(0, 0);
  cp_async_commit();
  for (int i = tid; i < nsl; i += 128) sSl[i] = 0.f;

  float rm[MR][2], rinv[MR][2];
  int plim[MR][2];
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int rr = warp * 16 * MR + mt * 16 + (lane >> 2) + 8 * hf;
      const bool ok = e0 + rr < ell;
      plim[mt][hf] = ok ? p0 + rr : -1;
      rm[mt][hf] = ok ? row_m[(long long)bh * ell + e0 + rr] : 0.f;
      rinv[mt][hf] = ok ? row_inv[(long long)bh * ell + e0 + rr] : 0.f;
    }

  cp_async_wait<0>();
  __syncthreads();
  unsigned qa[MR][KS][4];
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int kk = 0; kk < KS; ++kk)
      load_a<false>(qa[mt][kk], sQ + (warp * 16 * MR + mt * 16) * LD, LD, kk * 16, lane);
  __syncthreads();  // sQ is reused as sP below
  const bool rows_partial = e0 + BM > ell;

#pragma unroll 1
  for (int it = 0; it < n_tiles; ++it) {
    if (it > 0) {
      cp_async_wait<0>();
      __syncthreads();
    }
    if (it + 1 < n_tiles) load_k(it + 1, (it + 1) & 1);
    cp_async_commit();
    float acc[MR][8][4];
    tile_qk<T, KS, MR>(acc, qa, sK + (it & 1) * VS_BN * LD, LD, lane);
    const int c0 = k_begin + it * VS_BN;
    const bool need_mask = rows_partial || (c0 + VS_BN - 1 > p0);
#pragma unroll
    for (int mt = 0; mt < MR; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int rr = warp * 16 * MR + mt * 16 + (lane >> 2) + 8 * hf;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
          float pv[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float p = fast_exp2(fmaf(acc[mt][nt][2 * hf + e], scale_log2, -rm[mt][hf])) * rinv[mt][hf];
            if (need_mask && c0 + nt * 8 + 2 * (lane & 3) + e > plim[mt][hf]) p = 0.f;
            pv[e] = p;
          }
          *reinterpret_cast<float2*>(sP + rr * VS_LDP + nt * 8 + 2 * (lane & 3)) =
              make_float2(pv[0], pv[1]);
        }
      }
    }
    __syncthreads();
    // column sums: thread -> (column, half of the rows)
    {
      const int col = tid & (VS_BN - 1), half = tid >> 6;
      float v = 0.f;
#pragma unroll 8
      for (int r = half * (BM / 2); r < (half + 1) * (BM / 2); ++r) v += sP[r * VS_LDP + col];
      if (c0 + col < Sk && v != 0.f) atomicAdd(vert + (long long)bh * Sk + c0 + col, v);
    }
    // diagonal sums: local diagonal dl = r - col + 63 in [0, BM + 62], one thread each;
    // the rows are walked warp-uniformly so that a warp reads consecutive addresses.
    for (int dl = tid; dl < BM + VS_BN - 1; dl += 128) {
      const int dw = dl - lane;  // first diagonal of the warp
      const int rlo = max(0, dw - (VS_BN - 1)), rhi = min(BM - 1, dw + 31);
      float s = 0.f;
      for (int r = rlo; r <= rhi; ++r) {
        const int cc = r - dl + (VS_BN - 1);
        if (cc >= 0 && cc < VS_BN) s += sP[r * VS_LDP + cc];
      }
      sSl[VS_BN * (ntc - it - 1) + dl] += s;
    }
  }
  __syncthreads();
  // slash offset of sSl[idx]: o = p0 - k_begin - chunk + 1 + idx
  const int o_base = p0 - k_begin - chunk + 1;
  for (int i = tid; i < nsl; i += 128) {
    const int o = o_base + i;
    const float v = sSl[i];
    if (o >= 0 && o < Sk && v != 0.f) atomicAdd(slash + (long long)bh * Sk + o, v);
  }
}

// ----------------------------------------------------------------- vertical / slash, exact
// One warp per estimate row: row_m = max_j s_j, row_inv = 1 / (div * sum_j exp(s_j - m))
// over the visible keys j <= p_e (s = scale * q.k in float64); 0 / 0 for a row that sees
// no key. Grid (ceil(ell/4), B*Hq), 128 threads.
template <typename T>
__global__ void __launch_bounds__(128) vs_exact_rows(
    const T* __restrict__ q, const T* __restrict__ k, double* __restrict__ row_m,
    double* __restrict__ row_inv, int Hq, int G, int Sq, int Sk, int D, int ell, double scale,
    double div) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int e = blockIdx.x * 4 + warp, bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
  if (e >= ell) return;
  const int p = Sk - ell + e;
  const T* qr = q + (((long long)b * Hq + h) * Sq + (Sq - ell + e)) * D;
  const T* kb = k + ((long long)b * (Hq / G) + h / G) * Sk * D;
  double m = neg_inf_d(), l = 0.0;
  for (int j = lane; j <= p; j += 32) {
    const T* kr = kb + (long long)j * D;
    double s = 0.0;
    for (int d = 0; d < D; ++d) s = fma(dbl(qr[d]), dbl(kr[d]), s);
    s *= scale;
    if (s > m) {
      l = l * exp(m - s) + 1.0;
      m = s;
    } else {
      l += exp(s - m);
    }
  }
  const double M = warp_max_d(m);
  const double L = warp_sum_d(m == neg_inf_d() ? 0.0 : l * exp(m - M));
  if (lane == 0) {
    const long long o = (long long)bh * ell + e;
    const bool any = p >= 0 && L > 0.0;
    row_m[o] = any ? M : 0.0;
    row_inv[o] = any ? 1.0 / (L * div) : 0.0;
  }
}

// blockIdx.z == 0: vert[j] = sum_e P(e, j); == 1: slash[o] = sum_e P(e, p_e - o), float64,
// one thread per column / offset. Grid (ceil(Sk/128), B*Hq, 2), 128 threads.
template <typename T>
__global__ void __launch_bounds__(128) vs_exact_cols(
    const T* __restrict__ q, const T* __restrict__ k, const double* __restrict__ row_m,
    const double* __restrict__ row_inv, double* __restrict__ vert, double* __restrict__ slash,
    int Hq, int G, int Sq, int Sk, int D, int ell, double scale) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x, bh = blockIdx.y, mode = blockIdx.z;
  const int b = bh / Hq, h = bh % Hq;
  if (x >= Sk) return;
  const T* qb = q + (((long long)b * Hq + h) * Sq + (Sq - ell)) * D;
  const T* kb = k + ((long long)b * (Hq / G) + h / G) * Sk * D;
  double acc = 0.0;
  for (int e = 0; e < ell; ++e) {
    const int p = Sk - ell + e;
    const int j = mode == 0 ? x : p - x;
    if (j < 0 || j > p) continue;
    const double inv = row_inv[(long long)bh * ell + e];
    if (inv == 0.0) continue;
    const T* qr = qb + (long long)e * D;
    const T* kr = kb + (long long)j * D;
    double s = 0.0;
    for (int d = 0; d < D; ++d) s = fma(dbl(qr[d]), dbl(kr[d]), s);
    acc += exp(s * scale - row_m[(long long)bh * ell + e]) * inv;
  }
  (mode == 0 ? vert : slash)[(long long)bh * Sk + x] = acc;
}

#ifdef REFATTN_COMPILE_CHECK
// nvcc -DREFATTN_COMPILE_CHECK: instantiate every template the launchers use.
void* const* refattn_vslash_instances() {
  static void* const kInstances[] = {
    (void*)&vs_stats<__nv_bfloat16, 128, 64>, (void*)&vs_stats<__half, 64, 128>,
    (void*)&vs_stats<__nv_bfloat16, 16, 64>, (void*)&vs_accum<__nv_bfloat16, 128, 64>,
    (void*)&vs_accum<__half, 64, 128>, (void*)&vs_accum<__nv_bfloat16, 128, 128>,
    (void*)&vs_accum<__nv_bfloat16, 16, 64>, (void*)&vs_combine, (void*)&vs_exact_rows<float>,
    (void*)&vs_exact_rows<double>, (void*)&vs_exact_rows<__half>,
    (void*)&vs_exact_cols<float>, (void*)&vs_exact_cols<__nv_bfloat16>,
  };
  return kInstances;
}
#endif
