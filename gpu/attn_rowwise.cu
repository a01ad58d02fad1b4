// refattn: row-per-warp attention (SIMT, fp32 FFMA): the exact fp32 path and the general
// fallback for what the tensor-core kernels do not cover (fp32 inputs, head dims other than
// 64/128 or D != Dv, block sizes that are not multiples of 64).
//
// One warp owns one query row. Keys are taken 32 at a time, one per lane: each lane forms
// the full dot product q.k_j (q broadcast from shared memory), the warp does one online-
// softmax update per chunk, then accumulates o += p_j v_j with lanes split over the value
// dimension (element d = lane + 32 e, e < EPL). Every multiply-add is fp32; nothing is
// rounded to 16 bits, so fp32 inputs match the float64 reference to ~1e-6 relative.
// The mask is read per row: kv blocks of query block row / block_q (block_q = 1 is
// per-token routing); kv_num == nullptr means dense.
#include "common.cuh"

namespace refattn {
constexpr int kRowWarps = 4;
}

template <typename T, int EPL>
__global__ void __launch_bounds__(128) attn_fwd_rowwise(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    float* __restrict__ out, float* __restrict__ lse, long long q_sb, long long q_sh,
    long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb,
    long long v_sh, long long v_ss, int D, int Dv, int Hq, int Hkv, int Sq, int Sk,
    float scale_log2, int causal, const int* __restrict__ kv_num, const int* __restrict__ kv_idx,
    long long mn_sb, long long mn_sh, long long mi_sb, long long mi_sh, int kv_width,
    int block_q, int block_k) {
  using namespace refattn;
  __shared__ float sq[kRowWarps][32 * EPL];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * kRowWarps + warp;
  const int h = blockIdx.y, b = blockIdx.z;
  if (row >= Sq) return;  // whole warp leaves together
  const int hk = h / (Hq / Hkv);
  const T* qrow = q + b * q_sb + h * q_sh + row * q_ss;
  const T* kbase = k + b * k_sb + hk * k_sh;
  const T* vbase = v + b * v_sb + hk * v_sh;
  for (int d = lane; d < D; d += 32) sq[warp][d] = to_float<T>(qrow[d]) * scale_log2;
  __syncwarp();

  const int kmax = causal ? min(Sk, row + (Sk - Sq) + 1) : Sk;  // keys [0, kmax) may be visible
  const int qb = row / block_q;
  int nblk;
  const int* idx = nullptr;
  if (kv_num == nullptr) {
    nblk = (Sk + block_k - 1) / block_k;
  } else {
    nblk = kv_num[b * mn_sb + h * mn_sh + qb];
    idx = kv_idx + b * mi_sb + h * mi_sh + (long long)qb * kv_width;
  }
  float m = -REFATTN_INF, l = 0.f;
  float o[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) o[e] = 0.f;
  for (int s = 0; s < nblk; ++s) {
    const int j = idx ? idx[s] : s;
    const int k0 = j * block_k;
    if (k0 >= kmax) break;  // ascending blocks: the rest are invisible too
    const int k1 = min(k0 + block_k, kmax);
    for (int kc = k0; kc < k1; kc += 32) {
      const int key = kc + lane;
      float sc = -REFATTN_INF;
      if (key < k1) {
        const T* kr = kbase + key * k_ss;
        float acc = 0.f;
        for (int d = 0; d < D; ++d) acc = fmaf(sq[warp][d], to_float<T>(kr[d]), acc);
        sc = acc;
      }
      const float m_new = fmaxf(m, warp_max(sc));
      const float m_use = m_new == -REFATTN_INF ? 0.f : m_new;
      const float alpha = exp2f(m - m_use);
      const float p = exp2f(sc - m_use);
      l = l * alpha + warp_sum(p);
      m = m_new;
#pragma unroll
      for (int e = 0; e < EPL; ++e) o[e] *= alpha;
      const int n = min(32, k1 - kc);
      for (int jj = 0; jj < n; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, p, jj);
        const T* vr = vbase + (kc + jj) * v_ss;
#pragma unroll
        for (int e = 0; e < EPL; ++e) {
          const int d = lane + 32 * e;
          if (d < Dv) o[e] = fmaf(pj, to_float<T>(vr[d]), o[e]);
        }
      }
    }
  }
  const bool empty = !(l > 0.f);
  const float inv = empty ? 0.f : 1.f / l;
  const long long orow = ((long long)b * Hq + h) * Sq + row;
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    const int d = lane + 32 * e;
    if (d < Dv) out[orow * Dv + d] = o[e] * inv;
  }
  if (lane == 0) lse[orow] = empty ? -REFATTN_INF : (m + log2f(l)) * kLn2;
}

// Backward, one warp per query row: recomputes p_j = exp(s_j - lse), dp_j = dO.v_j,
// ds_j = p_j (dp_j - Delta); dq = scale sum_j ds_j k_j is written directly; dk_j += scale
// ds_j q and dv_j += p_j dO go by fp32 atomics into zeroed [B, Hkv, Sk, D] buffers (which
// also sums the GQA group). dO, lse, Delta are fp32 contiguous ([B, Hq, Sq, Dv], [B, Hq, Sq]).
template <typename T, int EPL>
__global__ void __launch_bounds__(128) attn_bwd_rowwise(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const float* __restrict__ dO, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv, long long q_sb,
    long long q_sh, long long q_ss, long long k_sb, long long k_sh, long long k_ss, long long v_sb,
    long long v_sh, long long v_ss, int D, int Dv, int Hq, int Hkv, int Sq, int Sk, float scale,
    int causal, const int* __restrict__ kv_num, const int* __restrict__ kv_idx, long long mn_sb,
    long long mn_sh, long long mi_sb, long long mi_sh, int kv_width, int block_q, int block_k) {
  using namespace refattn;
  __shared__ float sq[kRowWarps][32 * EPL];
  __shared__ float sdo[kRowWarps][32 * EPL];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row = blockIdx.x * kRowWarps + warp;
  const int h = blockIdx.y, b = blockIdx.z;
  if (row >= Sq) return;
  const int hk = h / (Hq / Hkv);
  const long long orow = ((long long)b * Hq + h) * Sq + row;
  const T* qrow = q + b * q_sb + h * q_sh + row * q_ss;
  const T* kbase = k + b * k_sb + hk * k_sh;
  const T* vbase = v + b * v_sb + hk * v_sh;
  float* dkb = dk + ((long long)b * Hkv + hk) * Sk * D;
  float* dvb = dv + ((long long)b * Hkv + hk) * Sk * Dv;
  for (int d = lane; d < D; d += 32) sq[warp][d] = to_float<T>(qrow[d]);
  for (int d = lane; d < Dv; d += 32) sdo[warp][d] = dO[orow * Dv + d];
  __syncwarp();
  const float L = lse[orow], Di = delta[orow];
  float gq[EPL];
#pragma unroll
  for (int e = 0; e < EPL; ++e) gq[e] = 0.f;

  if (L != -REFATTN_INF) {
    const int kmax = causal ? min(Sk, row + (Sk - Sq) + 1) : Sk;
    const int qb = row / block_q;
    int nblk;
    const int* idx = nullptr;
    if (kv_num == nullptr) {
      nblk = (Sk + block_k - 1) / block_k;
    } else {
      nblk = kv_num[b * mn_sb + h * mn_sh + qb];
      idx = kv_idx + b * mi_sb + h * mi_sh + (long long)qb * kv_width;
    }
    for (int s = 0; s < nblk; ++s) {
      const int j = idx ? idx[s] : s;
      const int k0 = j * block_k;
      if (k0 >= kmax) break;
      const int k1 = min(k0 + block_k, kmax);
      for (int kc = k0; kc < k1; kc += 32) {
        const int key = kc + lane;
        float p = 0.f, ds = 0.f;
        if (key < k1) {
          const T* kr = kbase + key * k_ss;
          const T* vr = vbase + key * v_ss;
          float sc = 0.f, dp = 0.f;
          for (int d = 0; d < D; ++d) sc = fmaf(sq[warp][d], to_float<T>(kr[d]), sc);
          for (int d = 0; d < Dv; ++d) dp = fmaf(sdo[warp][d], to_float<T>(vr[d]), dp);
          p = expf(sc * scale - L);
          ds = p * (dp - Di);
        }
        const int n = min(32, k1 - kc);
        for (int jj = 0; jj < n; ++jj) {
          const float pj = __shfl_sync(0xffffffffu, p, jj);
          const float dsj = __shfl_sync(0xffffffffu, ds, jj);
          const int kj = kc + jj;
          const T* kr = kbase + kj * k_ss;
#pragma unroll
          for (int e = 0; e < EPL; ++e) {
            const int d = lane + 32 * e;
            if (d < D) {
              gq[e] = fmaf(dsj, to_float<T>(kr[d]), gq[e]);
              atomicAdd(dkb + (long long)kj * D + d, scale * dsj * sq[warp][d]);
            }
            if (d < Dv) atomicAdd(dvb + (long long)kj * Dv + d, pj * sdo[warp][d]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int e = 0; e < EPL; ++e) {
    const int d = lane + 32 * e;
    if (d < D) dq[orow * D + d] = gq[e] * scale;
  }
}

// Elementwise dtype conversion (round to nearest even), n elements, contiguous.
template <typename Tin, typename Tout>
__global__ void cast_kernel(const Tin* __restrict__ x, Tout* __restrict__ y, long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x)
    y[i] = refattn::from_float<Tout>(refattn::to_float<Tin>(x[i]));
}

// Delta_i = sum_d dO_id * O_id for rows of length Dv (dO, O fp32 contiguous), one warp a row.
__global__ void row_dot(const float* __restrict__ a, const float* __restrict__ b2,
                        float* __restrict__ out, long long rows, int Dv) {
  const long long r = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (r >= rows) return;
  float s = 0.f;
  for (int d = lane; d < Dv; d += 32) s = fmaf(a[r * Dv + d], b2[r * Dv + d], s);
  s = refattn::warp_sum(s);
  if (lane == 0) out[r] = s;
}
