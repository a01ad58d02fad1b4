// Scoring kernels of ProxyAttn and PBS-Attn (ops `proxyattn_score`, `proxyattn_budget_score`,
// `pbs_key_importance`; the pooled op `pbs_score` and the head means of ProxyAttn's proxy
// heads run on gpu/score_compressed_pool.cu), see gpu/scoring_compressed.py.
//
// Every array is contiguous bhsd. The tensor-core kernels (bf16/fp16, D in {64, 128}) run
// on the QK^T engine of gpu/qk_engine.cuh (its layout and the hi + lo operand pairs are
// described there); the float64 kernels take every dtype and geometry (fp32/fp64 inputs
// always take them).
//
//       proxy_tc    ProxyAttn proxy scores, single pass over the kept (strided) keys: per
//                   (kept row, key block) the max logit goes to a scratch, per kept row the
//                   running max / sum; proxy_reduce normalises and max-pools the rows.
//       proxy_budget_tc  ProxyAttn budget scores: <MODE 0> partial softmax statistics of the
//                   last query block's rows per key split, <MODE 1> normalised per-key-block
//                   sums (atomics).
//       pbs_ki_tc   PBS key importance: <MODE 0> partial softmax statistics of the last
//                   block's rows per key split, <MODE 1> normalised column sums.
//       proxy_exact, proxy_budget_exact, pbs_ki_exact  float64, one warp per query row.
//
// Softmax in the tensor-core kernels runs in base 2 (scores times scale*log2e, ex2.approx);
// a row that sees nothing keeps m = -inf and contributes 0, never NaN.
#include "common.cuh"
#include "exact_f64.cuh"
#include "qk_engine.cuh"

using namespace refattn;

// =================================================================== ProxyAttn (tensor cores)
// Kept rows u < nrow are query rows u*stride, kept keys v < nkey are keys v*stride (the first
// token of every stride window). On this path stride divides bs: key block J holds the kept
// keys [J*nb, J*nb + nb), nb = bs / stride. One CTA per QPC consecutive kept rows of proxy
// head bc = bc0 + blockIdx.y (scratch slot blockIdx.y), b = bc / C, c = bc % C.
//   q row u:  q + b*q_sb + c*q_sh + u*q_rs  (q_rs = stride*D for the raw rows, 2D for hi/lo)
//   k key v:  k + b*k_sb + c*k_sh + v*k_rs  (k_rs likewise)
// Row u sees the kept keys v <= vlim(u) (causal: v*stride <= u*stride + Sk - Sq).
// zmx float [nh, Kba, nsa]: per (key block J, kept row u) the max of the row's visible
//   scaled logits (base 2) in J; written for every block the CTA's walk reaches.
// rst float [nh, 2, nsa]: per kept row the max M and the sum L (relative to M), base 2.
// BPT = key blocks per tile (nb = KPT / BPT), or 1 with nb = TPB * KPT (TPB tiles per block).
template <typename T, int D, int QS, int KS, int BPT>
__global__ void __launch_bounds__(128) proxy_tc(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ zmx,
    float* __restrict__ rst, long long q_sb, long long q_sh, long long q_rs, long long k_sb,
    long long k_sh, long long k_rs, int C, int Sq, int Sk, int stride, int nrow, int nkey, int nb,
    int nsa, int Kba, float scale_log2, int causal, int bc0) {
  using E = Eng<T, D, QS, KS>;
  constexpr int KPT = E::KPT, NMT = E::NMT, NNT = E::NNT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + CE_BM * E::LD;
  __shared__ int sRow[CE_BM];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int hs = blockIdx.y, bc = bc0 + hs, b = bc / C, c = bc % C;
  const int s0 = (gridDim.x - 1 - blockIdx.x) * E::QPC;  // latest rows first
  const int off = Sk - Sq;
  auto vlim_of = [&](int u) -> int {  // last kept key row u sees; -1: none
    if (!causal) return nkey - 1;
    const int lim = u * stride + off;
    return lim < 0 ? -1 : min(nkey - 1, lim / stride);
  };
  for (int i = tid; i < CE_BM; i += blockDim.x) sRow[i] = (i < E::QPC && s0 + i < nrow) ? s0 + i : -1;
  const int vmax = vlim_of(min(nrow, s0 + E::QPC) - 1);  // vlim grows with u
  const int ntile = vmax < 0 ? 0 : vmax / KPT + 1;
  __syncthreads();
  eng_load_q<E>(sQ, q + b * q_sb + c * q_sh, q_rs, sRow);
  cp_async_commit();

  int vl[NMT][2], us[NMT][2];
  float M[NMT][2], L[NMT][2], mb[NMT][2];
#pragma unroll
  for (int mt = 0; mt < NMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int u = s0 + E::q_of_acc(warp, lane, mt, hf);
      us[mt][hf] = u < nrow ? u : -1;
      vl[mt][hf] = u < nrow ? vlim_of(u) : -1;
      M[mt][hf] = -REFATTN_INF;
      L[mt][hf] = 0.f;
      mb[mt][hf] = -REFATTN_INF;
    }
  const int TPB = BPT == 1 ? nb / KPT : 1;
  float* zH = zmx + (size_t)hs * Kba * nsa;
  const bool leader = (lane & 3) == 0;

  eng_walk<E>(sQ, sK, k + b * k_sb + c * k_sh, k_rs, nkey, 0, ntile, [&](int t, float (&acc)[2][8][4]) {
    const int c0 = t * KPT;
#pragma unroll
    for (int mt = 0; mt < NMT; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float v[NNT][2];
        float tmx = -REFATTN_INF;  // this thread's columns only
#pragma unroll
        for (int nt = 0; nt < NNT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float x = E::val(acc, mt, nt, 2 * hf + e) * scale_log2;
            x = c0 + E::k_of_acc(lane, nt, e) <= vl[mt][hf] ? x : -REFATTN_INF;
            v[nt][e] = x;
            tmx = fmaxf(tmx, x);
          }
        // row max / sum over this thread's columns (merged over the quad at the end)
        const float Mn = fmaxf(M[mt][hf], tmx);
        if (Mn != -REFATTN_INF) {
          float s = L[mt][hf] * fast_exp2(M[mt][hf] - Mn);
#pragma unroll
          for (int nt = 0; nt < NNT; ++nt) s += fast_exp2(v[nt][0] - Mn) + fast_exp2(v[nt][1] - Mn);
          L[mt][hf] = s;
          M[mt][hf] = Mn;
        }
        const int u = us[mt][hf];
        if constexpr (BPT == 1) {
          mb[mt][hf] = fmaxf(mb[mt][hf], tmx);
          if ((t + 1) % TPB == 0 || t + 1 == ntile) {  // end of key block (or of the walk)
            const float m = quad_max(mb[mt][hf]);
            if (leader && u >= 0) zH[(size_t)(t / TPB) * nsa + u] = m;
            mb[mt][hf] = -REFATTN_INF;
          }
        } else {
          constexpr int NPB = NNT / BPT;  // n8 groups per key block
#pragma unroll
          for (int bl = 0; bl < BPT; ++bl) {
            float m = -REFATTN_INF;
#pragma unroll
            for (int nt = bl * NPB; nt < (bl + 1) * NPB; ++nt) m = fmaxf(m, fmaxf(v[nt][0], v[nt][1]));
            m = quad_max(m);
            if (leader && u >= 0) zH[(size_t)(t * BPT + bl) * nsa + u] = m;
          }
        }
      }
  });
#pragma unroll
  for (int mt = 0; mt < NMT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float Mq = quad_max(M[mt][hf]);
      float l = M[mt][hf] == -REFATTN_INF ? 0.f : L[mt][hf] * fast_exp2(M[mt][hf] - Mq);
      l = quad_sum(l);
      const int u = us[mt][hf];
      if (leader && u >= 0) {
        rst[((size_t)hs * 2) * nsa + u] = Mq;
        rst[((size_t)hs * 2 + 1) * nsa + u] = l;
      }
    }
}

// S float [B*C, Qb, Kb]: S[bc, I, J] = max over the kept rows u of query block I (u*stride in
// [I*bs, I*bs + bs)) that see a kept key of J of exp2(zmx[J, u] - M_u) / L_u; 0 if none.
// Row u sees a kept key of J iff J*bs <= vlim(u)*stride (every block has a kept key when
// stride divides bs). Grid (Qb, nh), 256 threads, dynamic shared 3 * rpb * 4 bytes (rpb >=
// kept rows per query block). (U: unused; a template so that every kernel is instantiated
// by name.)
template <int U>
__global__ void __launch_bounds__(256) proxy_reduce(
    const float* __restrict__ zmx, const float* __restrict__ rst, float* __restrict__ S, int Sq,
    int Sk, int bs, int stride, int nrow, int nkey, int rpb, int Qb, int Kb, int nsa, int Kba,
    int causal, int bc0) {
  extern __shared__ float red_sh[];
  float* sM = red_sh;
  float* sI = red_sh + rpb;
  int* sJ = reinterpret_cast<int*>(red_sh + 2 * rpb);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, nw = blockDim.x >> 5;
  const int I = blockIdx.x, hs = blockIdx.y, bc = bc0 + hs, off = Sk - Sq;
  const int ua = (I * bs + stride - 1) / stride;                 // first kept row of block I
  const int ub = min(nrow, (I * bs + bs + stride - 1) / stride);  // past its last
  const int R = max(0, min(rpb, ub - ua));
  int jmax = -1;
  for (int x = tid; x < R; x += blockDim.x) {
    const int u = ua + x;
    int vlim = nkey - 1;
    if (causal) {
      const int lim = u * stride + off;
      vlim = lim < 0 ? -1 : min(nkey - 1, lim / stride);
    }
    const float Mu = rst[((size_t)hs * 2) * nsa + u];
    const float Lu = rst[((size_t)hs * 2 + 1) * nsa + u];
    const bool live = vlim >= 0 && Mu != -REFATTN_INF && Lu > 0.f;
    sM[x] = live ? Mu : 0.f;
    sI[x] = live ? 1.f / Lu : 0.f;
    sJ[x] = live ? min(Kb - 1, (int)(((long long)vlim * stride) / bs)) : -1;
  }
  __syncthreads();
  for (int x = 0; x < R; ++x) jmax = max(jmax, sJ[x]);  // R <= rpb: cheap, uniform
  float* out = S + ((size_t)bc * Qb + I) * Kb;
  const float* zH = zmx + (size_t)hs * Kba * nsa;
  for (int J = warp; J < Kb; J += nw) {
    float m = 0.f;
    if (J <= jmax) {
      for (int x = lane; x < R; x += 32)
        if (J <= sJ[x]) m = fmaxf(m, exp2f(zH[(size_t)J * nsa + ua + x] - sM[x]) * sI[x]);
    }
    m = warp_max(m);
    if (lane == 0) out[J] = m;
  }
}

// =================================================================== ProxyAttn (float64)
// qt double [B*C, nrow, D], kt double [B*C, nkey, D]: head means of the kept rows / keys.
// S double [B*C, Qb, Kb], zeroed by the caller. One warp per kept row u: the row's softmax
// max / sum over its visible kept keys, then per key block the largest probability, combined
// into S by an integer atomicMax (p >= 0: the bit patterns order as the values). Any stride
// and block size. Grid (ceil(nrow / 4), B*C).
template <int U>
__global__ void __launch_bounds__(128) proxy_exact(
    const double* __restrict__ qt, const double* __restrict__ kt, double* __restrict__ S,
    int Sq, int Sk, int D, int bs, int stride, int nrow, int nkey, int Qb, int Kb, double scale,
    int causal) {
  extern __shared__ double sq_all[];  // [4][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long long u = (long long)blockIdx.x * 4 + warp;
  const int bc = blockIdx.y;
  if (u >= nrow) return;
  const int row = (int)u * stride;
  int vlim = nkey - 1;
  if (causal) {
    const int lim = row + Sk - Sq;
    vlim = lim < 0 ? -1 : min(nkey - 1, lim / stride);
  }
  if (vlim < 0) return;
  double* sq = sq_all + warp * D;
  const double* qr = qt + ((size_t)bc * nrow + u) * D;
  for (int d = lane; d < D; d += 32) sq[d] = qr[d];
  __syncwarp();
  const double* kb = kt + (size_t)bc * nkey * D;
  auto dot = [&](int j) -> double {
    const double* kr = kb + (size_t)j * D;
    double z = 0.0;
    for (int d = 0; d < D; ++d) z += sq[d] * kr[d];
    return z * scale;
  };
  double m = neg_inf_d(), l = 0.0;
  for (int j = lane; j <= vlim; j += 32) {
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
  const double inv = 1.0 / l;
  unsigned long long* out =
      reinterpret_cast<unsigned long long*>(S + ((size_t)bc * Qb + row / bs) * Kb);
  const int jl = (int)(((long long)vlim * stride) / bs);
  for (int J = 0; J <= jl; ++J) {
    const int va = (int)(((long long)J * bs + stride - 1) / stride);         // first kept key of J
    const int vb = min(vlim, (int)(((long long)J * bs + bs - 1) / stride));  // last visible one
    if (va > vb) continue;                                                 // (warp-uniform)
    double z = neg_inf_d();
    for (int j = va + lane; j <= vb; j += 32) z = fmax(z, dot(j));
    z = warp_max_d(z);
    if (lane == 0) atomicMax(out + J, (unsigned long long)__double_as_longlong(exp(z - Mx) * inv));
  }
}

// =================================================================== ProxyAttn budget
// Rows r0 + rl (rl < ell: the last query block) of q head h = bh % Hq against the keys
// [0, Sk) of kv head h / G; causal: key t <= row + Sk - Sq. Grid (nsplit, ceil(ell/128),
// B*Hq); split sp covers key tiles [sp*tps, min(nkt, sp*tps + tps)). stM, stL float
// [B*Hq, nsplit, ella]. MODE 0: partial max / sum (base 2) per (row, split). MODE 1:
// a[bh, J] += sum over the rows and the keys of block J of p / (ell * |J|), by atomics
// (a zeroed by the caller).
template <typename T, int D, int MODE>
__global__ void __launch_bounds__(128) proxy_budget_tc(
    const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ stM,
    float* __restrict__ stL, float* __restrict__ a, int Hq, int G, int Sq, int Sk, int r0, int ell,
    int bs, int Kb, int nsplit, int tps, int ella, float scale_log2, int causal) {
  using E = Eng<T, D, 0, 0>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + CE_BM * E::LD;
  __shared__ int sRow[CE_BM];
  __shared__ float sCol[4][64];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int split = blockIdx.x, rt = blockIdx.y, bh = blockIdx.z, b = bh / Hq, h = bh % Hq;
  const int Hkv = Hq / G;
  const T* qb = q + (size_t)bh * Sq * D;
  const T* kb = k + ((size_t)b * Hkv + h / G) * (size_t)Sk * D;
  const int nkt = (Sk + 63) / 64;
  const int t0 = split * tps, t1 = min(nkt, t0 + tps);
  for (int i = tid; i < CE_BM; i += blockDim.x) {
    const int rl = rt * CE_BM + i;
    sRow[i] = rl < ell ? r0 + rl : -1;
  }
  __syncthreads();
  eng_load_q<E>(sQ, qb, D, sRow);
  cp_async_commit();
  int rl[2][2], lim[2][2];  // row in the block; last visible key (< 0: none)
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = rt * CE_BM + E::q_of_acc(warp, lane, mt, hf);
      rl[mt][hf] = r;
      lim[mt][hf] = r >= ell ? -1 : (causal ? min(Sk - 1, r0 + r + Sk - Sq) : Sk - 1);
    }

  if constexpr (MODE == 0) {
    float m[2][2], ls[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) { m[mt][hf] = -REFATTN_INF; ls[mt][hf] = 0.f; }
    eng_walk<E>(sQ, sK, kb, D, Sk, t0, t1, [&](int t, float (&acc)[2][8][4]) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float v[8][2];
          float mx = m[mt][hf];
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = E::val(acc, mt, nt, 2 * hf + e) * scale_log2;
              x = t * 64 + E::k_of_acc(lane, nt, e) <= lim[mt][hf] ? x : -REFATTN_INF;
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
        if (!live) lim[mt][hf] = -1;
      }
    const float inv_ell = 1.f / (float)ell;
    float* aH = a + (size_t)bh * Kb;
    eng_walk<E>(sQ, sK, kb, D, Sk, t0, t1, [&](int t, float (&acc)[2][8][4]) {
      float cs[8][2];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        cs[nt][0] = 0.f;
        cs[nt][1] = 0.f;
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p =
                  fast_exp2(E::val(acc, mt, nt, 2 * hf + e) * scale_log2 - Mo[mt][hf]) * iv[mt][hf];
              cs[nt][e] += t * 64 + E::k_of_acc(lane, nt, e) <= lim[mt][hf] ? p : 0.f;
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
      if (tid < 64) {  // warps 0 and 1: 32 keys each
        const int key = t * 64 + tid;
        const int J = key / bs;
        float x = 0.f;
        if (key < Sk)
          x = (sCol[0][tid] + sCol[1][tid] + sCol[2][tid] + sCol[3][tid]) * inv_ell /
              (float)min(bs, Sk - J * bs);
        const int key0 = __shfl_sync(0xffffffffu, key, 0), J0 = __shfl_sync(0xffffffffu, J, 0);
        if (__all_sync(0xffffffffu, J == J0 || key >= Sk)) {  // the warp's keys in one block
          x = warp_sum(x);
          if (lane == 0 && key0 < Sk) atomicAdd(aH + J0, x);
        } else if (key < Sk) {
          atomicAdd(aH + J, x);
        }
      }
    });
  }
}

// ProxyAttn budget, float64: one warp per row of the last query block; a double [B*Hq, Kb]
// zeroed by the caller. Grid (ceil(ell / 4), B*Hq).
template <typename T>
__global__ void __launch_bounds__(128) proxy_budget_exact(
    const T* __restrict__ q, const T* __restrict__ k, double* __restrict__ a, int Hq, int G,
    int Sq, int Sk, int D, int r0, int ell, int bs, int Kb, double scale, int causal) {
  extern __shared__ double sq_all[];  // [4][D]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rl = blockIdx.x * 4 + warp, bh = blockIdx.y, b = bh / Hq, h = bh % Hq;
  if (rl >= ell) return;
  const int row = r0 + rl;
  const int lim = causal ? min(Sk - 1, row + Sk - Sq) : Sk - 1;
  if (lim < 0) return;
  const int Hkv = Hq / G;
  double* sq = sq_all + warp * D;
  const T* qr = q + ((size_t)bh * Sq + row) * D;
  for (int d = lane; d < D; d += 32) sq[d] = to_dbl(qr[d]);
  __syncwarp();
  const T* kb = k + ((size_t)b * Hkv + h / G) * (size_t)Sk * D;
  auto dot = [&](int j) -> double {
    const T* kr = kb + (size_t)j * D;
    double z = 0.0;
    for (int d = 0; d < D; ++d) z += sq[d] * to_dbl(kr[d]);
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
  const double f = 1.0 / (l * (double)ell);
  double* aH = a + (size_t)bh * Kb;
  for (int J = 0; J <= lim / bs; ++J) {
    double s = 0.0;
    const int jhi = min(lim, J * bs + bs - 1);
    for (int j = J * bs + lane; j <= jhi; j += 32) s += exp(dot(j) - Mx);
    s = warp_sum_d(s);
    if (lane == 0) atomicAdd(aH + J, s * f / (double)min(bs, Sk - J * bs));
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
#define PX_I(T, D, QS, KS, BPT) template __global__ void proxy_tc<T, D, QS, KS, BPT>(const T*, const T*, float*, float*, long long, long long, long long, long long, long long, long long, int, int, int, int, int, int, int, int, int, float, int, int);
#define PX_B(T, D, QS, KS) PX_I(T, D, QS, KS, 1) PX_I(T, D, QS, KS, 2) PX_I(T, D, QS, KS, 4)
#define PX_T(T, D) PX_B(T, D, 0, 0) PX_B(T, D, 1, 0) PX_B(T, D, 0, 1) PX_B(T, D, 1, 1) PX_I(T, D, 0, 0, 8) PX_I(T, D, 1, 0, 8)
PX_T(__nv_bfloat16, 64) PX_T(__nv_bfloat16, 128) PX_T(__half, 64) PX_T(__half, 128)
#define BU_I(T, D, M) template __global__ void proxy_budget_tc<T, D, M>(const T*, const T*, float*, float*, float*, int, int, int, int, int, int, int, int, int, int, int, float, int);
BU_I(__nv_bfloat16, 64, 0) BU_I(__nv_bfloat16, 64, 1) BU_I(__nv_bfloat16, 128, 0) BU_I(__nv_bfloat16, 128, 1)
BU_I(__half, 64, 0) BU_I(__half, 64, 1) BU_I(__half, 128, 0) BU_I(__half, 128, 1)
#define KI_I(T, D, M) template __global__ void pbs_ki_tc<T, D, M>(const T*, const T*, float*, float*, float*, int, int, int, int, int, int, int, int, float, int);
KI_I(__nv_bfloat16, 64, 0) KI_I(__nv_bfloat16, 64, 1) KI_I(__nv_bfloat16, 128, 0) KI_I(__nv_bfloat16, 128, 1)
KI_I(__half, 64, 0) KI_I(__half, 64, 1) KI_I(__half, 128, 0) KI_I(__half, 128, 1)
#define EX_T(T) \
  template __global__ void pbs_ki_exact<T>(const T*, const T*, double*, int, int, int, int, int, int, double); \
  template __global__ void proxy_budget_exact<T>(const T*, const T*, double*, int, int, int, int, int, int, int, int, int, double, int);
EX_T(float) EX_T(double) EX_T(__half) EX_T(__nv_bfloat16)
template __global__ void proxy_reduce<0>(const float*, const float*, float*, int, int, int, int, int, int, int, int, int, int, int, int, int);
template __global__ void proxy_exact<0>(const double*, const double*, double*, int, int, int, int, int, int, int, int, int, double, int);
#endif
