// Scoring kernels of ProxyAttn and PBS-Attn (ops `proxyattn_score`, `pbs_key_importance`;
// the pooled ops `proxyattn_budget_score` and `pbs_score` run on
// gpu/score_compressed_pool.cu), see gpu/scoring_compressed.py.
//
// Every array is contiguous bhsd. The tensor-core kernels (bf16/fp16, D in {64, 128}) run
// on the QK^T engine of gpu/qk_engine.cuh (its layout and the hi + lo operand pairs are
// described there); the float64 kernels take every dtype and geometry (fp32/fp64 inputs
// always take them).
//
//       proxy_tc    ProxyAttn proxy scores, single pass: per (sampled row, key block) the
//                   block sum of exp2(s - m) and its max m go to a scratch; per row the
//                   running max / sum; proxy_reduce normalises and averages the rows.
//       pbs_ki_tc   PBS key importance: <MODE 0> partial softmax statistics of the last
//                   block's rows per key split, <MODE 1> normalised column sums.
//       proxy_exact, pbs_ki_exact  float64, one warp per query row.
//
// Softmax in the tensor-core kernels runs in base 2 (scores times scale*log2e, ex2.approx);
// a row that sees nothing keeps m = -inf and contributes 0, never NaN.
#include "common.cuh"
#include "exact_f64.cuh"
#include "qk_engine.cuh"

using namespace refattn;

// =================================================================== ProxyAttn (tensor cores)
// Slots: query block I has R_I = ceil(len_I / stride) sampled rows, slot I*Rmax + u (u < R_I)
// is row I*bs + len_I - 1 - (R_I - 1 - u)*stride. One CTA per QPC consecutive slots of one
// proxy head bc = bc0 + blockIdx.y (scratch slot blockIdx.y); q head bc % C (row stride
// q_rs), k head (bc % C) * k_mul / k_div.
// part, mcs float [nh, Kba, nsa]: per (key block J, slot) sum of exp2(s - m) and m (base 2)
// rst float [nh, 2, nsa]: per slot the row max M and sum L (relative to M).
// BPT = key blocks per tile (bs = KPT / BPT), or 1 with bs = TPB * KPT (TPB tiles per block).
template <typename T, int D, int QS, int KS, int BPT>
__global__ void __launch_bounds__(128) proxy_tc(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ part,
    float* __restrict__ mcs, float* __restrict__ rst, long long q_sb, long long q_sh, int q_rs,
    long long k_sb, long long k_sh, int k_rs, int k_mul, int k_div, int C, int Sq, int Sk, int bs,
    int stride, int Rmax, int Qb, int nsa, int Kba, float scale_log2, int causal, int bc0) {
  using E = Eng<T, D, QS, KS>;
  constexpr int KPT = E::KPT, NMT = E::NMT, NNT = E::NNT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + CE_BM * E::LD;
  __shared__ int sRow[CE_BM];
  __shared__ int sMax;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int hs = blockIdx.y, bc = bc0 + hs, b = bc / C, c = bc % C;
  const int s0 = (gridDim.x - 1 - blockIdx.x) * E::QPC;  // latest rows first
  const int off = Sk - Sq;
  if (tid == 0) sMax = -1;
  __syncthreads();
  for (int i = tid; i < E::QPC; i += blockDim.x) {
    const int slot = s0 + i, I = slot / Rmax, u = slot - I * Rmax;
    int row = -1;
    if (I < Qb) {
      const int len = min(bs, Sq - I * bs), R = (len - 1) / stride + 1;
      if (u < R) row = I * bs + len - 1 - (R - 1 - u) * stride;
    }
    sRow[i] = row;
    if (row >= 0) atomicMax(&sMax, row);
  }
  __syncthreads();
  const int maxrow = sMax;
  const int nkt = (Sk + KPT - 1) / KPT;
  int ntile = nkt;
  if (maxrow < 0) ntile = 0;
  else if (causal) ntile = maxrow + off < 0 ? 0 : min(nkt, (maxrow + off) / KPT + 1);
  const T* qb = q + b * q_sb + c * q_sh;
  const T* kb = k + b * k_sb + (long long)(c * k_mul / k_div) * k_sh;
  eng_load_q<E>(sQ, qb, q_rs, sRow);
  cp_async_commit();

  int lim[NMT][2], slot[NMT][2];
  float M[NMT][2], L[NMT][2], mb[NMT][2], bb[NMT][2];
#pragma unroll
  for (int mt = 0; mt < NMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int qi = E::q_of_acc(warp, lane, mt, hf);
      const int row = sRow[qi];
      lim[mt][hf] = row < 0 ? -1 : (causal ? min(Sk - 1, row + off) : Sk - 1);
      slot[mt][hf] = row < 0 ? -1 : s0 + qi;
      M[mt][hf] = -REFATTN_INF;
      L[mt][hf] = 0.f;
      mb[mt][hf] = -REFATTN_INF;
      bb[mt][hf] = 0.f;
    }
  const int TPB = BPT == 1 ? bs / KPT : 1;
  float* partH = part + (size_t)hs * Kba * nsa;
  float* mcsH = mcs + (size_t)hs * Kba * nsa;
  const bool leader = (lane & 3) == 0;

  eng_walk<E>(sQ, sK, kb, k_rs, Sk, 0, ntile, [&](int t, float (&acc)[2][8][4]) {
    const int c0 = t * KPT;
#pragma unroll
    for (int mt = 0; mt < NMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float v[NNT][2];
        float tmx = -REFATTN_INF;
#pragma unroll
        for (int nt = 0; nt < NNT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = E::val(acc, mt, nt, 2 * hf + e) * scale_log2;
            x = c0 + E::k_of_acc(lane, nt, e) <= lim[mt][hf] ? x : -REFATTN_INF;
            v[nt][e] = x;
            tmx = fmaxf(tmx, x);
          }
        tmx = quad_max(tmx);
        const int sl = slot[mt][hf];
        if constexpr (BPT == 1) {
          const float mn = fmaxf(mb[mt][hf], tmx);
          const float o = mn == -REFATTN_INF ? 0.f : mn;
          float s = 0.f;
#pragma unroll
          for (int nt = 0; nt < NNT; ++nt) s += fast_exp2(v[nt][0] - o) + fast_exp2(v[nt][1] - o);
          s = quad_sum(s);
          bb[mt][hf] = bb[mt][hf] * fast_exp2(mb[mt][hf] - o) + s;
          mb[mt][hf] = mn;
          if ((t + 1) % TPB == 0 || t + 1 == ntile) {  // end of key block (or of the walk)
            const int J = t / TPB;
            if (leader && sl >= 0) {
              partH[(size_t)J * nsa + sl] = bb[mt][hf];
              mcsH[(size_t)J * nsa + sl] = mb[mt][hf];
            }
            const float Mn = fmaxf(M[mt][hf], mb[mt][hf]);
            const float oM = Mn == -REFATTN_INF ? 0.f : Mn;
            L[mt][hf] = L[mt][hf] * fast_exp2(M[mt][hf] - oM) + bb[mt][hf] * fast_exp2(mb[mt][hf] - oM);
            M[mt][hf] = Mn;
            mb[mt][hf] = -REFATTN_INF;
            bb[mt][hf] = 0.f;
          }
        } else {
          constexpr int NPB = NNT / BPT;  // n8 groups per key block
          const float o = tmx == -REFATTN_INF ? 0.f : tmx;
          float tot = 0.f;
#pragma unroll
          for (int bl = 0; bl < BPT; ++bl) {
            float s = 0.f;
#pragma unroll
            for (int nt = bl * NPB; nt < (bl + 1) * NPB; ++nt) s += fast_exp2(v[nt][0] - o) + fast_exp2(v[nt][1] - o);
            s = quad_sum(s);
            tot += s;
            if (leader && sl >= 0) {
              partH[(size_t)(t * BPT + bl) * nsa + sl] = s;
              mcsH[(size_t)(t * BPT + bl) * nsa + sl] = tmx;
            }
          }
          const float Mn = fmaxf(M[mt][hf], tmx);
          const float oM = Mn == -REFATTN_INF ? 0.f : Mn;
          L[mt][hf] = L[mt][hf] * fast_exp2(M[mt][hf] - oM) + tot * fast_exp2(tmx - oM);
          M[mt][hf] = Mn;
        }
      }
  });
#pragma unroll
  for (int mt = 0; mt < NMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      if (leader && slot[mt][hf] >= 0) {
        rst[((size_t)hs * 2) * nsa + slot[mt][hf]] = M[mt][hf];
        rst[((size_t)hs * 2 + 1) * nsa + slot[mt][hf]] = L[mt][hf];
      }
}

// S float [B*C, Qb, Kb]: S[bc, I, J] = (1/R_I) sum_u part * exp2(mcs - M_u) / L_u over the
// rows of query block I; grid (Qb, nh), 256 threads, dynamic shared 3 * Rmax * 4 bytes.
// (U: unused; a template so that every kernel is instantiated by name.)
template <int U>
__global__ void __launch_bounds__(256) proxy_reduce(
    const float* __restrict__ part, const float* __restrict__ mcs, const float* __restrict__ rst,
    float* __restrict__ S, int Sq, int Sk, int bs, int stride, int Rmax, int Qb, int Kb, int nsa,
    int Kba, int causal, int bc0) {
  extern __shared__ float red_sh[];
  float* sM = red_sh;
  float* sI = red_sh + Rmax;
  int* sL = reinterpret_cast<int*>(red_sh + 2 * Rmax);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, nw = blockDim.x >> 5;
  const int I = blockIdx.x, hs = blockIdx.y, bc = bc0 + hs, off = Sk - Sq;
  const int len = min(bs, Sq - I * bs), R = (len - 1) / stride + 1, slot0 = I * Rmax;
  auto jlim = [&](int row) -> int {
    if (!causal) return Kb - 1;
    return row + off < 0 ? -1 : min(Kb - 1, (row + off) / bs);
  };
  for (int u = tid; u < R; u += blockDim.x) {
    const int row = I * bs + len - 1 - (R - 1 - u) * stride;
    const float Mu = rst[((size_t)hs * 2) * nsa + slot0 + u];
    const float Lu = rst[((size_t)hs * 2 + 1) * nsa + slot0 + u];
    const bool live = Mu != -REFATTN_INF && Lu > 0.f;
    sM[u] = live ? Mu : 0.f;
    sI[u] = live ? 1.f / Lu : 0.f;
    sL[u] = live ? jlim(row) : -1;
  }
  __syncthreads();
  const int jmax = jlim(I * bs + len - 1);
  const float invR = 1.f / (float)R;
  float* out = S + ((size_t)bc * Qb + I) * Kb;
  const float* pH = part + (size_t)hs * Kba * nsa;
  const float* mH = mcs + (size_t)hs * Kba * nsa;
  for (int J = warp; J < Kb; J += nw) {
    float s = 0.f;
    if (J <= jmax) {
      for (int u = lane; u < R; u += 32) {
        if (J <= sL[u]) {
          const size_t ix = (size_t)J * nsa + slot0 + u;
          s += pH[ix] * exp2f(mH[ix] - sM[u]) * sI[u];
        }
      }
    }
    s = warp_sum(s);
    if (lane == 0) out[J] = s * invR;
  }
}

// =================================================================== ProxyAttn (float64)
// qt double [B*C, Sq, D], kt double [B*C, Sk, D] (head means); S double [B*C, Qb, Kb],
// zeroed by the caller. One warp per slot; grid (ceil(Qb*Rmax / 4), B*C).
template <int U>
__global__ void __launch_bounds__(128) proxy_exact(
    const double* __restrict__ qt, const double* __restrict__ kt, double* __restrict__ S,
    int Sq, int Sk, int D, int bs, int stride, int Rmax, int Qb, int Kb, double scale, int causal) {
  extern __shared__ double sq_all[];  // [4][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long slot = (long long)blockIdx.x * 4 + warp;
  const int bc = blockIdx.y;
  if (slot >= (long long)Qb * Rmax) return;
  const int I = (int)(slot / Rmax), u = (int)(slot - (long long)I * Rmax);
  const int len = min(bs, Sq - I * bs), R = (len - 1) / stride + 1;
  if (u >= R) return;
  const int row = I * bs + len - 1 - (R - 1 - u) * stride;
  const int lim = causal ? min(Sk - 1, row + Sk - Sq) : Sk - 1;
  if (lim < 0) return;
  double* sq = sq_all + warp * D;
  const double* qr = qt + ((size_t)bc * Sq + row) * D;
  for (int d = lane; d < D; d += 32) sq[d] = qr[d];
  __syncwarp();
  const double* kb = kt + (size_t)bc * Sk * D;
  auto dot = [&](int j) -> double {
    const double* kr = kb + (size_t)j * D;
    double z = 0.0;
    for (int d = 0; d < D; ++d) z += sq[d] * kr[d];
    return z * scale;
  };
  double m = neg_inf_d(), l = 0.0;
  for (int j = lane; j <= lim; j += 32) {
    const double z = dot(j);
    if (z > m) {
      l = l * exp(m - z) + 1.0;
      m = z;
    } else {
      l += exp(z - m);
    }
  }
  const double Mx = warp_max_d(m);
  l = warp_sum_d(m == neg_inf_d() ? 0.0 : l * exp(m - Mx));
  const double f = 1.0 / (l * (double)R);
  double* out = S + ((size_t)bc * Qb + I) * Kb;
  for (int J = 0; J <= lim / bs; ++J) {
    double s = 0.0;
    const int jhi = min(lim, J * bs + bs - 1);
    for (int j = J * bs + lane; j <= jhi; j += 32) s += exp(dot(j) - Mx);
    s = warp_sum_d(s);
    if (lane == 0) atomicAdd(out + J, s * f);
  }
}

// =================================================================== PBS key importance
// Rows: the last ell query rows (row L - ell + rl, rl < ell); keys [0, Tk) of kv head h/G,
// no causal mask. Grid (nsplit, ceil(ell/128), B*Hq); split s covers tiles
// [s*tps, min(nkt, s*tps + tps)). stM, stL float [B*Hq, nsplit, ella].
// MODE 0: partial max / sum (base 2) per (row, split). MODE 1: combined statistics,
// w[bh, key] = (1/ell) sum_rows p (stored, or added when `atomic`: several row tiles).
template <typename T, int D, int MODE>
__global__ void __launch_bounds__(128) pbs_ki_tc(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ stM,
    float* __restrict__ stL, float* __restrict__ w, int Hq, int G, int L, int ell, int Tk,
    int nsplit, int tps, int ella, float scale_log2, int atomic) {
  using E = Eng<T, D, 0, 0>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + CE_BM * E::LD;
  __shared__ int sRow[CE_BM];
  __shared__ float sCol[4][64];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int split = blockIdx.x, rt = blockIdx.y, bh = blockIdx.z, b = bh / Hq, h = bh % Hq;
  const int Hkv = Hq / G;
  const T* qb = q + (size_t)bh * L * D;
  const T* kb = k + ((size_t)b * Hkv + h / G) * (size_t)L * D;
  const int nkt = (Tk + 63) / 64;
  const int t0 = split * tps, t1 = min(nkt, t0 + tps);
  for (int i = tid; i < CE_BM; i += blockDim.x) {
    const int rl = rt * CE_BM + i;
    sRow[i] = rl < ell ? L - ell + rl : -1;
  }
  __syncthreads();
  eng_load_q<E>(sQ, qb, D, sRow);
  cp_async_commit();
  int rl[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) rl[mt][hf] = rt * CE_BM + E::q_of_acc(warp, lane, mt, hf);

  if constexpr (MODE == 0) {
    float m[2][2], ls[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) { m[mt][hf] = -REFATTN_INF; ls[mt][hf] = 0.f; }
    eng_walk<E>(sQ, sK, kb, D, Tk, t0, t1, [&](int t, float (&acc)[2][8][4]) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int lim = rl[mt][hf] < ell ? Tk - t * 64 : 0;
          float v[8][2];
          float mx = m[mt][hf];
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = acc[mt][nt][2 * hf + e] * scale_log2;
              x = E::k_of_acc(lane, nt, e) < lim ? x : -REFATTN_INF;
              v[nt][e] = x;
              mx = fmaxf(mx, x);
            }
          if (mx != -REFATTN_INF) {
            float s = ls[mt][hf] * fast_exp2(m[mt][hf] - mx);
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) s += fast_exp2(v[nt][0] - mx) + fast_exp2(v[nt][1] - mx);
            ls[mt][hf] = s;
            m[mt][hf] = mx;
          }
        }
    });
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float M = quad_max(m[mt][hf]);
        float s = (m[mt][hf] == -REFATTN_INF) ? 0.f : ls[mt][hf] * fast_exp2(m[mt][hf] - M);
        s = quad_sum(s);
        if ((lane & 3) == 0 && rl[mt][hf] < ell) {
          const size_t ix = ((size_t)bh * nsplit + split) * ella + rl[mt][hf];
          stM[ix] = M;
          stL[ix] = s;
        }
      }
  } else {
    float Mo[2][2], iv[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float M = -REFATTN_INF, s = 0.f;
        if (rl[mt][hf] < ell) {
          for (int sp = 0; sp < nsplit; ++sp)
            M = fmaxf(M, stM[((size_t)bh * nsplit + sp) * ella + rl[mt][hf]]);
          for (int sp = 0; sp < nsplit; ++sp) {
            const size_t ix = ((size_t)bh * nsplit + sp) * ella + rl[mt][hf];
            const float ms = stM[ix];
            if (ms != -REFATTN_INF) s += stL[ix] * exp2f(ms - M);
          }
        }
        const bool live = M != -REFATTN_INF && s > 0.f;
        Mo[mt][hf] = live ? M : 0.f;
        iv[mt][hf] = live ? 1.f / s : 0.f;
      }
    const float inv_ell = 1.f / (float)ell;
    eng_walk<E>(sQ, sK, kb, D, Tk, t0, t1, [&](int t, float (&acc)[2][8][4]) {
      float cs[8][2];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        cs[nt][0] = 0.f;
        cs[nt][1] = 0.f;
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int lim = Tk - t * 64;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p = fast_exp2(acc[mt][nt][2 * hf + e] * scale_log2 - Mo[mt][hf]) * iv[mt][hf];
              cs[nt][e] += E::k_of_acc(lane, nt, e) < lim ? p : 0.f;
            }
        }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = cs[nt][e];
          x += __shfl_xor_sync(0xffffffffu, x, 4);
          x += __shfl_xor_sync(0xffffffffu, x, 8);
          x += __shfl_xor_sync(0xffffffffu, x, 16);
          if (lane < 4) sCol[warp][E::k_of_acc(lane, nt, e)] = x;
        }
      __syncthreads();
      if (tid < 64) {
        const int key = t * 64 + tid;
        if (key < Tk) {
          const float x = (sCol[0][tid] + sCol[1][tid] + sCol[2][tid] + sCol[3][tid]) * inv_ell;
          float* o = w + (size_t)bh * Tk + key;
          if (atomic) atomicAdd(o, x);
          else *o = x;
        }
      }
    });
  }
}

// PBS key importance, float64: one warp per row; w double [B*Hq, Tk] zeroed by the caller.
// Grid (ceil(ell / 4), B*Hq).
template <typename T>
__global__ void __launch_bounds__(128) pbs_ki_exact(
    const T* __restrict__ q, const T* __restrict__ k, double* __restrict__ w, int Hq, int G, int L,
    int D, int ell, int Tk, double scale) {
  extern __shared__ double sq_all[];  // [4][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rl = blockIdx.x * 4 + warp, bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
  if (rl >= ell) return;
  const int Hkv = Hq / G;
  double* sq = sq_all + warp * D;
  const T* qr = q + ((size_t)bh * L + (L - ell + rl)) * D;
  for (int d = lane; d < D; d += 32) sq[d] = to_dbl(qr[d]);
  __syncwarp();
  const T* kb = k + ((size_t)b * Hkv + h / G) * (size_t)L * D;
  auto dot = [&](int j) -> double {
    const T* kr = kb + (size_t)j * D;
    double z = 0.0;
    for (int d = 0; d < D; ++d) z += sq[d] * to_dbl(kr[d]);
    return z * scale;
  };
  double m = neg_inf_d(), l = 0.0;
  for (int j = lane; j < Tk; j += 32) {
    const double z = dot(j);
    if (z > m) {
      l = l * exp(m - z) + 1.0;
      m = z;
    } else {
      l += exp(z - m);
    }
  }
  const double Mx = warp_max_d(m);
  l = warp_sum_d(m == neg_inf_d() ? 0.0 : l * exp(m - Mx));
  const double f = 1.0 / (l * (double)ell);
  double* wr = w + (size_t)bh * Tk;
  for (int j = lane; j < Tk; j += 32) atomicAdd(wr + j, exp(dot(j) - Mx) * f);
}

#ifdef REFATTN_INSTANTIATE_ALL
// Compile check of every template the launchers use (nvcc -DREFATTN_INSTANTIATE_ALL ...).
#define PX_I(T, D, QS, KS, BPT) template __global__ void proxy_tc<T, D, QS, KS, BPT>(const T*, const T*, float*, float*, float*, long long, long long, int, long long, long long, int, int, int, int, int, int, int, int, int, int, int, int, float, int, int);
#define PX_B(T, D, QS, KS) PX_I(T, D, QS, KS, 1) PX_I(T, D, QS, KS, 2) PX_I(T, D, QS, KS, 4)
#define PX_T(T, D) PX_B(T, D, 0, 0) PX_B(T, D, 1, 0) PX_B(T, D, 0, 1) PX_B(T, D, 1, 1) PX_I(T, D, 0, 0, 8) PX_I(T, D, 1, 0, 8)
PX_T(__nv_bfloat16, 64) PX_T(__nv_bfloat16, 128) PX_T(__half, 64) PX_T(__half, 128)
#define KI_I(T, D, M) template __global__ void pbs_ki_tc<T, D, M>(const T*, const T*, float*, float*, float*, int, int, int, int, int, int, int, int, float, int);
KI_I(__nv_bfloat16, 64, 0) KI_I(__nv_bfloat16, 64, 1) KI_I(__nv_bfloat16, 128, 0) KI_I(__nv_bfloat16, 128, 1)
KI_I(__half, 64, 0) KI_I(__half, 64, 1) KI_I(__half, 128, 0) KI_I(__half, 128, 1)
#define EX_T(T) \
  template __global__ void pbs_ki_exact<T>(const T*, const T*, double*, int, int, int, int, int, int, double);
EX_T(float) EX_T(double) EX_T(__half) EX_T(__nv_bfloat16)
template __global__ void proxy_reduce<0>(const float*, const float*, const float*, float*, int, int, int, int, int, int, int, int, int, int, int);
template __global__ void proxy_exact<0>(const double*, const double*, double*, int, int, int, int, int, int, int, int, double, int);
#endif
