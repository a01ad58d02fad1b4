// Threshold selection kernels (ops `selection_cumulative_threshold`,
// `selection_fixed_threshold`), see gpu/select.py; the cumulative rule's mask and boundary
// are a top-m (gpu/select_topk.cu). Score formats, keys and the bit-exactness rules:
// gpu/select_keys.cuh.
//
//   sel_cum_group<FMT, NT>   cumulative threshold: per row, the keys are bitonic-sorted in
//                            shared memory (descending; ties are equal values, so the order
//                            of equal entries does not matter for the sums), widened to
//                            float64, and one thread runs the reference's cumsum: the
//                            sequential float64 sum in that order (__dadd_rn), each partial
//                            sum kept; the group then compares cum_i / total (__ddiv_rn)
//                            with tau, as the reference does, and counts the kept entries m.
//                            The mask and boundary are the top-m of the row
//                            (sel_topk_group or the sel_g_* kernels).
//   sel_cum_keys / sel_cum_serial
//                            the same for rows too long for shared memory: keys written to
//                            global memory, sorted by CuPy, then one thread per row.
//   sel_fixed<FMT>           fixed threshold: elementwise float64 comparison.
#include "common.cuh"
#include "select_keys.cuh"
#include "select_group.cuh"

namespace refattn {
namespace sel {

// The reference's cumulative rule on one row, given its nv candidate masses in descending
// order, x(0) >= x(1) >= ... (x(i) a float64): the number of ranked entries kept.
//   cum_i = x(0) + ... + x(i), summed left to right (NumPy's cumsum); total = cum_{nv-1}
//   (the reference's trailing zeros of invalid entries add nothing);
//   normalize: c_i = cum_i / total (nothing kept unless total > 0), else c_i = cum_i;
//   include_crossing: entry i kept iff c_{i-1} < tau (c_{-1} = 0); else iff c_i < tau.
// c_i never decreases (cum_i does not, masses being >= 0; the division is monotone; once
// total = inf, c is NaN from the first inf on), so the kept entries are a prefix and the
// first failing comparison ends the count. Requires tau > 0 and nv >= 1.
template <typename Get>
__device__ __forceinline__ long long serial_count(Get x, long long nv, double tau, int normalize,
                                                  int incl) {
  double tot = x(0);
#pragma unroll 4
  for (long long i = 1; i < nv; ++i) tot = __dadd_rn(tot, x(i));
  if (normalize && !(tot > 0.0)) return 0;
  long long m = 0;
  double cum = x(0);
  if (incl) {
    m = 1;
    for (long long i = 1; i < nv; ++i) {
      const double c = normalize ? __ddiv_rn(cum, tot) : cum;
      if (!(c < tau)) break;
      ++m;
      cum = __dadd_rn(cum, x(i));
    }
  } else {
    for (long long i = 0; i < nv; ++i) {
      if (i > 0) cum = __dadd_rn(cum, x(i));
      const double c = normalize ? __ddiv_rn(cum, tot) : cum;
      if (!(c < tau)) break;
      ++m;
    }
  }
  return m;
}

}  // namespace sel
}  // namespace refattn

using namespace refattn;
using namespace refattn::sel;

// ============================================================================ cumulative
// One group of NT threads per row; dynamic shared memory per group:
// align16(align16(P2 * sizeof(K)) + 8 * P2 + 256), P2 = N rounded up to a power of two.
// Writes m_out[r] (the kept count); flags[0] |= 1 if a candidate mass is negative.
template <int FMT, int NT>
__global__ void __launch_bounds__(NT == 32 ? 128 : NT)
sel_cum_group(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
              long long vsr, long long vsc, const double* __restrict__ tau, int R, int N, int P2,
              int normalize, int incl, long long* __restrict__ m_out, int* __restrict__ flags) {
  using K = typename Fmt<FMT>::K;
  extern __shared__ __align__(16) unsigned char smem[];
  const int groups = blockDim.x / NT;
  const int g = threadIdx.x / NT, t = threadIdx.x % NT;
  const long long r = (long long)blockIdx.x * groups + g;
  if (r >= R) return;
  const long long keys_bytes = align16((long long)P2 * sizeof(K));
  const long long group_bytes = align16(keys_bytes + 8ll * P2 + 4 * MISC_WORDS);
  unsigned char* base = smem + (size_t)g * (size_t)group_bytes;
  K* keys = reinterpret_cast<K*>(base);
  double* vals = reinterpret_cast<double*>(base + keys_bytes);
  unsigned* misc = reinterpret_cast<unsigned*>(base + keys_bytes + 8ll * P2);

  unsigned nv = 0;
  bool neg = false;
  for (int j = t; j < P2; j += NT) {
    const K key = j < N ? entry_key<FMT>(s, valid, r, N, j, vsr, vsc) : K(0);
    keys[j] = key;
    nv += key != K(0);
    neg |= key_negative(key);
  }
  if (neg) atomicOr(flags, 1);
  nv = group_sum<NT>(nv, misc, t);
  const double tr = tau[r];
  if (!(tr > 0.0) || nv == 0u) {
    if (t == 0) m_out[r] = 0;
    return;
  }
  bitonic_desc<NT, K>(keys, P2, t);
  for (int i = t; i < (int)nv; i += NT) vals[i] = key_value(keys[i]);
  gsync<NT>();
  // The reference's cumsum, left to right on one thread (the only serial part): vals[i]
  // becomes cum_i; the total is cum_{nv-1}.
  if (t == 0) {
    double cum = vals[0];
#pragma unroll 8
    for (int i = 1; i < (int)nv; ++i) {
      cum = __dadd_rn(cum, vals[i]);
      vals[i] = cum;
    }
  }
  gsync<NT>();
  const double tot = vals[nv - 1];
  if (normalize && !(tot > 0.0)) {
    if (t == 0) m_out[r] = 0;
    return;
  }
  // Kept: include_crossing: entry 0 (tau > 0) and entry i + 1 for each i < nv - 1 with
  // c_i < tau; otherwise entry i for each i < nv with c_i < tau (c_i = cum_i / total when
  // normalising, as the reference divides, else cum_i).
  const int lim = incl ? (int)nv - 1 : (int)nv;
  unsigned cnt = 0;
  for (int i = t; i < lim; i += NT) {
    const double c = normalize ? __ddiv_rn(vals[i], tot) : vals[i];
    cnt += c < tr;
  }
  cnt = group_sum<NT>(cnt, misc, t);
  if (t == 0) m_out[r] = (long long)cnt + (incl ? 1 : 0);
}

// Long rows: the key of every entry (0 for invalid / NaN) into keys [R, N]; flags as above.
template <int FMT>
__global__ void __launch_bounds__(256)
sel_cum_keys(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
             long long vsr, long long vsc, long long R, int N,
             typename Fmt<FMT>::K* __restrict__ keys, int* __restrict__ flags) {
  using K = typename Fmt<FMT>::K;
  bool neg = false;
  const long long total = R * (long long)N;
  for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
       e += (long long)gridDim.x * blockDim.x) {
    const long long r = e / N, j = e - r * N;
    const K key = entry_key<FMT>(s, valid, r, N, j, vsr, vsc);
    keys[e] = key;
    neg |= key_negative(key);
  }
  if (neg) atomicOr(flags, 1);
}

// Long rows, after an ascending sort of each row of keys: one thread per row runs the
// reference's arithmetic over the nv[r] candidates from the largest down.
template <typename K>
__global__ void __launch_bounds__(128)
sel_cum_serial(const K* __restrict__ sorted, const long long* __restrict__ nv,
               const double* __restrict__ tau, int R, int N, int normalize, int incl,
               long long* __restrict__ m_out) {
  const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= R) return;
  const double tr = tau[r];
  const long long n = nv[r];
  if (!(tr > 0.0) || n <= 0) {
    m_out[r] = 0;
    return;
  }
  const K* top = sorted + r * N + (N - 1);
  m_out[r] = serial_count([&](long long i) { return key_value(top[-i]); }, n, tr, normalize, incl);
}

// ============================================================================ fixed threshold
// mask[r, j] = valid && float64(s[r, j]) >= thr[r] (> unless inclusive). A CTA covers `rpb`
// whole rows (short rows) or one column chunk of width `cw` of one row (cpr chunks per row).
template <int FMT>
__global__ void __launch_bounds__(256)
sel_fixed(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
          long long vsr, long long vsc, const double* __restrict__ thr, int R, int N, int rpb,
          int cw, int cpr, int inclusive, unsigned char* __restrict__ mask) {
  const long long b = blockIdx.x;
  const long long r0 = (b / cpr) * rpb;
  const int c0 = (int)(b % cpr) * cw;
  const int w = min(cw, N - c0);
  const int rows = (int)min((long long)rpb, (long long)R - r0);
  const int n = rows * w;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int rl = e / w;
    const long long r = r0 + rl, j = c0 + (e - rl * w);
    const double x = bits_value(canon<FMT>(s[r * N + j]));
    const double t = thr[r];
    bool keep = inclusive ? (x >= t) : (x > t);
    keep = keep && valid_at(valid, r, j, vsr, vsc);
    mask[r * N + j] = keep ? 1 : 0;
  }
}

#ifdef REFATTN_NVCC_CHECK
// nvcc compile check of every instantiation gpu/select.py uses:
//   nvcc -arch=sm_90 -std=c++17 -Igpu -DREFATTN_NVCC_CHECK -c gpu/select_threshold.cu -o /dev/null
#define REFATTN_SEL_FMT(F) \
  (void*)&sel_cum_group<F, 32>, (void*)&sel_cum_group<F, 512>, (void*)&sel_cum_keys<F>, (void*)&sel_fixed<F>
void* refattn_select_threshold_check() {
  static void* ptrs[] = {REFATTN_SEL_FMT(0), REFATTN_SEL_FMT(1), REFATTN_SEL_FMT(2),
                         REFATTN_SEL_FMT(3), (void*)&sel_cum_serial<unsigned>, (void*)&sel_cum_serial<unsigned long long>};
  return ptrs;
}
#endif
