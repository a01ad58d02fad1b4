// Selection kernels (ops `selection_topk_rows`, `selection_topk_global`,
// `selection_cumulative_threshold`, `selection_fixed_threshold`), see gpu/select.py.
//
// Every kernel reproduces the NumPy reference (refattn/reference/selection.py) bit for bit:
// the reference ranks float64 copies of the scores by (score descending, index in tie
// order), never ranks NaN or invalid entries, and reports the smallest selected score.
//
// Scores arrive as raw bits, FMT 0 fp16 / 1 bf16 / 2 fp32 (uint16/uint16/uint32) or 3 fp64
// (uint64); integer scores are converted to float64 on the way in. Nothing is compared in
// fp32 arithmetic (CuPy compiles with -ftz=true, which would flush subnormals):
//   * every value is widened exactly, in integer arithmetic, to fp32 bits (fp16, bf16) and
//     ranked through the order-preserving integer key of those bits (32-bit keys; 64-bit
//     keys for fp64). -0.0 is mapped to +0.0 first (the reference's float comparisons see
//     them equal); NaN and invalid entries get key 0, which no number has (key 0 would be
//     the negative NaN 0xffffffff), so "key > 0" means "a candidate";
//   * values that enter arithmetic or float64 comparisons (the cumulative masses, the fixed
//     threshold, the boundary) are widened exactly to float64 in integer arithmetic, and
//     the cumulative sums use __dadd_rn / __ddiv_rn (never contracted, correctly rounded,
//     like NumPy's float64 `cumsum` and divide).
//
// Top-m of a row (m = min(k, #candidates)): radix select of the m-th largest key v (8-bit
// digits from the top, one 256-bin histogram per pass), which also leaves `need`, the
// number of entries equal to v that are kept; then one ordered pass keeps every key > v and
// the first `need` keys == v in index order (the last ones for tie = "high"). The boundary
// is the value of v. Kernels:
//
//   sel_topk_group<FMT, NT>  one group of NT threads per row, the row's keys in shared
//                            memory: NT = 32 (one warp per row, 4 rows per CTA) for short
//                            rows, NT = 512 (one CTA per row) for rows up to 64 KiB of keys.
//   sel_g_hist / sel_g_pick / sel_g_ties / sel_g_mask
//                            long rows (global top-k per head over Qb*Kb blocks): many CTAs
//                            per row, each over a chunk of G_CHUNK entries; histograms are
//                            summed in global memory, a one-warp kernel picks each digit, the
//                            tie pass offsets each chunk by the ties of the chunks before it.
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

namespace refattn {
namespace sel {

template <int FMT> struct Fmt;
template <> struct Fmt<0> { using S = unsigned short; using K = unsigned; };
template <> struct Fmt<1> { using S = unsigned short; using K = unsigned; };
template <> struct Fmt<2> { using S = unsigned; using K = unsigned; };
template <> struct Fmt<3> { using S = unsigned long long; using K = unsigned long long; };

enum : int {
  G_THREADS = 256,   // threads of the long-row (multi-CTA) kernels
  G_CHUNK = 4096,    // entries of a row per CTA in the long-row kernels
  MISC_WORDS = 64,   // per-group scratch words: [0, 32) sums / min keys, [32, 35) digit
};

// ------------------------------------------------------------------ exact conversions
// fp16 bits -> fp32 bits (exact; subnormal halves become normal floats).
__device__ __forceinline__ unsigned f16_to_f32_bits(unsigned h) {
  const unsigned s = (h & 0x8000u) << 16;
  const unsigned e = (h >> 10) & 0x1fu;
  unsigned m = h & 0x3ffu;
  if (e == 0x1fu) return s | 0x7f800000u | (m << 13);
  if (e == 0u) {
    if (m == 0u) return s;
    const int sh = __clz(m) - 21;                 // moves the leading 1 to bit 10
    m = (m << sh) & 0x3ffu;
    return s | ((unsigned)(113 - sh) << 23) | (m << 13);
  }
  return s | ((e + 112u) << 23) | (m << 13);
}

// fp32 bits -> float64 (exact, subnormals included, without fp32 arithmetic).
__device__ __forceinline__ double f32_bits_to_f64(unsigned u) {
  const unsigned long long s = (unsigned long long)(u >> 31) << 63;
  const unsigned e = (u >> 23) & 0xffu;
  unsigned m = u & 0x7fffffu;
  unsigned long long b;
  if (e == 0xffu) {
    b = s | 0x7ff0000000000000ull | ((unsigned long long)m << 29);
  } else if (e == 0u) {
    if (m == 0u) {
      b = s;
    } else {
      const int sh = __clz(m) - 8;                // moves the leading 1 to bit 23
      m = (m << sh) & 0x7fffffu;
      b = s | ((unsigned long long)(897 - sh) << 52) | ((unsigned long long)m << 29);
    }
  } else {
    b = s | ((unsigned long long)(e + 896u) << 52) | ((unsigned long long)m << 29);
  }
  return __longlong_as_double((long long)b);
}

// Canonical bits of a score: fp32 bits (FMT 0..2) or fp64 bits (FMT 3).
template <int FMT> __device__ __forceinline__ typename Fmt<FMT>::K canon(typename Fmt<FMT>::S x);
template <> __device__ __forceinline__ unsigned canon<0>(unsigned short x) { return f16_to_f32_bits(x); }
template <> __device__ __forceinline__ unsigned canon<1>(unsigned short x) { return (unsigned)x << 16; }
template <> __device__ __forceinline__ unsigned canon<2>(unsigned x) { return x; }
template <> __device__ __forceinline__ unsigned long long canon<3>(unsigned long long x) { return x; }

// Order-preserving key (0 for NaN; -0.0 ranks as +0.0).
__device__ __forceinline__ unsigned key_of(unsigned u) {
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0u;
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ unsigned long long key_of(unsigned long long u) {
  if ((u & 0x7fffffffffffffffull) > 0x7ff0000000000000ull) return 0ull;
  if (u == 0x8000000000000000ull) u = 0ull;
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// Value of a (non-zero) key as float64.
__device__ __forceinline__ double key_value(unsigned k) {
  return f32_bits_to_f64((k & 0x80000000u) ? (k ^ 0x80000000u) : ~k);
}
__device__ __forceinline__ double key_value(unsigned long long k) {
  return __longlong_as_double(
      (long long)((k & 0x8000000000000000ull) ? (k ^ 0x8000000000000000ull) : ~k));
}

// Value of canonical bits as float64.
__device__ __forceinline__ double bits_value(unsigned u) { return f32_bits_to_f64(u); }
__device__ __forceinline__ double bits_value(unsigned long long u) {
  return __longlong_as_double((long long)u);
}

// A candidate with a negative value (-0.0 is not negative: its key is that of +0.0).
template <typename K> __device__ __forceinline__ bool key_negative(K k) {
  return k != K(0) && k < (K(1) << (sizeof(K) * 8 - 1));
}

__device__ __forceinline__ double qnan() { return __longlong_as_double(0x7ff8000000000000ll); }

__device__ __forceinline__ bool valid_at(const unsigned char* __restrict__ v, long long r,
                                         long long j, long long sr, long long sc) {
  return v == nullptr || v[r * sr + j * sc] != 0;
}

// Key of entry j of row r (0 if invalid or NaN).
template <int FMT>
__device__ __forceinline__ typename Fmt<FMT>::K entry_key(const typename Fmt<FMT>::S* __restrict__ s,
                                                          const unsigned char* __restrict__ v,
                                                          long long r, long long N, long long j,
                                                          long long sr, long long sc) {
  using K = typename Fmt<FMT>::K;
  if (!valid_at(v, r, j, sr, sc)) return K(0);
  return key_of(canon<FMT>(s[r * N + j]));
}

// ------------------------------------------------------------------ group helpers
// A "group" is NT threads that own one row: one warp (NT = 32, __syncwarp) or the whole
// CTA (NT = blockDim.x, __syncthreads).
template <int NT> __device__ __forceinline__ void gsync() {
  if constexpr (NT == 32) {
    __syncwarp();
  } else {
    __syncthreads();
  }
}

// Sum over the group (every thread of the group calls it; all get the total).
template <int NT> __device__ __forceinline__ unsigned group_sum(unsigned x, unsigned* red, int t) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  if constexpr (NT == 32) {
    return x;
  } else {
    if ((t & 31) == 0) red[t >> 5] = x;
    __syncthreads();
    unsigned s = 0;
#pragma unroll
    for (int i = 0; i < NT / 32; ++i) s += red[i];
    __syncthreads();
    return s;
  }
}

// Minimum over the group (every thread of the group calls it; all get it). red: NT / 32 keys.
template <int NT, typename K> __device__ __forceinline__ K group_min(K x, K* red, int t) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const K y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y < x ? y : x;
  }
  if constexpr (NT == 32) {
    return x;
  } else {
    if ((t & 31) == 0) red[t >> 5] = x;
    __syncthreads();
    K m = red[0];
#pragma unroll
    for (int i = 1; i < NT / 32; ++i) m = red[i] < m ? red[i] : m;
    __syncthreads();
    return m;
  }
}

// hist[bin] += 1 for the lanes with `hit`, aggregated over the lanes of one bin (many
// scores share their top digit). All 32 lanes of the warp must call it.
__device__ __forceinline__ void hist_add(unsigned* hist, unsigned bin, bool hit) {
  const unsigned b = hit ? bin : 0xffffffffu;
  const unsigned peers = __match_any_sync(0xffffffffu, b);
  if (hit && (int)(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[bin], (unsigned)__popc(peers));
}

// One warp: the digit d holding the rem-th largest counted key (1 <= rem <= sum(hist)):
// out[0] = d, out[1] = rem minus the count of keys in bins above d, out[2] = hist[d].
__device__ __forceinline__ void pick_digit(const unsigned* hist, unsigned rem, int lane,
                                           unsigned* out) {
  unsigned c[8];
  unsigned s = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = hist[lane * 8 + j];
    s += c[j];
  }
  unsigned x = s;                                  // becomes sum of lanes >= lane
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned y = __shfl_down_sync(0xffffffffu, x, o);
    if (lane + o < 32) x += y;
  }
  const unsigned above = x - s;                    // keys in bins of higher lanes
  if (above < rem && x >= rem) {
    unsigned acc = above;
    bool found = false;
#pragma unroll
    for (int j = 7; j >= 0; --j) {
      if (!found) {
        const unsigned nacc = acc + c[j];
        if (nacc >= rem) {
          out[0] = (unsigned)(lane * 8 + j);
          out[1] = rem - acc;
          out[2] = c[j];
          found = true;
        } else {
          acc = nacc;
        }
      }
    }
  }
}

// Radix select over keys[0, n) in shared memory: v = the m-th largest non-zero key
// (1 <= m <= #non-zero), need = how many keys equal to v rank within the top m. bc: 3
// words; kred: NT / 32 keys of scratch. When every key that shares the prefix found so
// far ranks within the top m (typical after two digits for continuous scores), the
// remaining digits are skipped: v is then the smallest of those keys and every key equal
// to v is kept (need = all).
template <int NT, typename K>
__device__ __forceinline__ void radix_select(const K* keys, int n, unsigned m, unsigned* hist,
                                             unsigned* bc, K* kred, int t, K& v, unsigned& need) {
  K prefix = 0, pmask = 0;
  unsigned rem = m;
  const int trips = (n + NT - 1) / NT;
#pragma unroll 1
  for (int shift = (int)sizeof(K) * 8 - 8; shift >= 0; shift -= 8) {
    for (int i = t; i < 256; i += NT) hist[i] = 0u;
    gsync<NT>();
    for (int it = 0; it < trips; ++it) {
      const int j = it * NT + t;
      const K key = j < n ? keys[j] : K(0);
      const bool hit = key != K(0) && (key & pmask) == prefix;
      hist_add(hist, (unsigned)(key >> shift) & 255u, hit);
    }
    gsync<NT>();
    if (t < 32) pick_digit(hist, rem, t, bc);
    gsync<NT>();
    const unsigned d = bc[0], cd = bc[2];
    rem = bc[1];
    prefix |= (K)d << shift;
    pmask |= (K)255u << shift;
    if (shift > 0 && cd == rem) {
      K lo = ~K(0);
      for (int j = t; j < n; j += NT) {
        const K key = keys[j];
        if (key != K(0) && (key & pmask) == prefix && key < lo) lo = key;
      }
      v = group_min<NT, K>(lo, kred, t);
      need = 0xffffffffu;
      return;
    }
  }
  v = prefix;
  need = rem;
}

// The ordered pass over len positions in tie order (index idx = p, or len - 1 - p when
// `reverse`): keeps key > v, and keys == v while fewer than `need` ties (counting `base`
// ties before position 0) were kept. get(idx) -> key; put(idx, keep). Every thread of the
// group calls it; wsum: NT / 32 words.
template <int NT, typename K, typename Get, typename Put>
__device__ __forceinline__ void ordered_select(int len, K v, unsigned need, unsigned base,
                                               bool reverse, int t, unsigned* wsum, Get get,
                                               Put put) {
  const int lane = t & 31, w = t >> 5;
  const unsigned lt_mask = (1u << lane) - 1u;
  for (int p0 = 0; p0 < len; p0 += NT) {
    const int p = p0 + t;
    const bool in = p < len;
    const int idx = reverse ? len - 1 - p : p;
    const K key = in ? get(idx) : K(0);
    const bool tie = in && key == v;
    const unsigned bal = __ballot_sync(0xffffffffu, tie);
    unsigned pos = base + (unsigned)__popc(bal & lt_mask);
    unsigned total = (unsigned)__popc(bal);
    if constexpr (NT > 32) {
      if (lane == 0) wsum[w] = total;
      __syncthreads();
      total = 0u;
#pragma unroll
      for (int i = 0; i < NT / 32; ++i) {
        const unsigned c = wsum[i];
        if (i < w) pos += c;
        total += c;
      }
      __syncthreads();
    }
    if (in) put(idx, key > v || (tie && pos < need));
    base += total;
  }
}

// Bitonic sort of a[0, n) descending (n a power of two), by the group.
template <int NT, typename K>
__device__ __forceinline__ void bitonic_desc(K* a, int n, int t) {
  gsync<NT>();
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = t; i < (n >> 1); i += NT) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const K x = a[lo], y = a[hi];
        const bool desc = (lo & size) == 0;
        if (desc ? (x < y) : (x > y)) {
          a[lo] = y;
          a[hi] = x;
        }
      }
      gsync<NT>();
    }
  }
}

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

__host__ __device__ constexpr long long align16(long long b) { return (b + 15) & ~15ll; }

}  // namespace sel
}  // namespace refattn

using namespace refattn;
using namespace refattn::sel;

// ============================================================================ top-m, groups
// One group of NT threads per row; blockDim.x / NT groups (rows) per CTA. Dynamic shared
// memory per group: align16(N * sizeof(K)) (keys) + 1024 (histogram) + 256 (scratch).
// kk[r] (int64 >= 0): the budget of row r, clamped to the row's candidates.
template <int FMT, int NT>
__global__ void __launch_bounds__(NT == 32 ? 128 : NT)
sel_topk_group(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
               long long vsr, long long vsc, const long long* __restrict__ kk, int R, int N,
               int tie_high, unsigned char* __restrict__ mask, double* __restrict__ bound) {
  using K = typename Fmt<FMT>::K;
  extern __shared__ __align__(16) unsigned char smem[];
  const int groups = blockDim.x / NT;
  const int g = threadIdx.x / NT, t = threadIdx.x % NT;
  const long long r = (long long)blockIdx.x * groups + g;
  if (r >= R) return;
  const long long keys_bytes = align16((long long)N * sizeof(K));
  unsigned char* base = smem + (size_t)g * (size_t)(keys_bytes + 1280);
  K* keys = reinterpret_cast<K*>(base);
  unsigned* hist = reinterpret_cast<unsigned*>(base + keys_bytes);
  unsigned* misc = hist + 256;

  unsigned nv = 0;
  for (int j = t; j < N; j += NT) {
    const K key = entry_key<FMT>(s, valid, r, N, j, vsr, vsc);
    keys[j] = key;
    nv += key != K(0);
  }
  nv = group_sum<NT>(nv, misc, t);
  const long long kr = kk[r];
  const long long m = kr < (long long)nv ? kr : (long long)nv;
  unsigned char* mrow = mask + r * N;
  if (m <= 0) {
    for (int j = t; j < N; j += NT) mrow[j] = 0;
    if (t == 0) bound[r] = qnan();
    return;
  }
  K v;
  unsigned need;
  radix_select<NT, K>(keys, N, (unsigned)m, hist, misc + 32, reinterpret_cast<K*>(misc), t, v,
                      need);
  ordered_select<NT, K>(
      N, v, need, 0u, tie_high != 0, t, misc, [&](int j) { return keys[j]; },
      [&](int j, bool keep) { mrow[j] = keep ? 1 : 0; });
  if (t == 0) bound[r] = key_value(v);
}

// ============================================================================ top-m, long rows
// Row r's state st[4 r ...]: prefix, prefix mask, rem (ties kept once the prefix is
// complete), m. Grid of the chunk kernels: R * nch CTAs of G_THREADS, CTA b = (row b / nch,
// chunk b % nch), chunk c = entries [c G_CHUNK, min(N, (c + 1) G_CHUNK)).

// Histogram of the digit at `shift` of the keys that match the row's prefix (st == nullptr:
// the first pass, every candidate; nvalid != nullptr: also counts the candidates).
template <int FMT>
__global__ void __launch_bounds__(G_THREADS)
sel_g_hist(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
           long long vsr, long long vsc, int N, int nch, const unsigned long long* __restrict__ st,
           unsigned* __restrict__ ghist, unsigned* __restrict__ nvalid, int shift) {
  using K = typename Fmt<FMT>::K;
  __shared__ unsigned hist[256];
  __shared__ unsigned red[G_THREADS / 32];
  const long long r = blockIdx.x / nch;
  const int c = blockIdx.x % nch;
  const int tid = threadIdx.x;
  K prefix = 0, pmask = 0;
  if (st != nullptr) {
    if (st[4 * r + 3] == 0ull) return;
    prefix = (K)st[4 * r];
    pmask = (K)st[4 * r + 1];
  }
  hist[tid] = 0u;
  __syncthreads();
  const int j0 = c * G_CHUNK, j1 = min(N, j0 + G_CHUNK);
  unsigned cnt = 0;
  for (int it = 0; it < G_CHUNK / G_THREADS; ++it) {
    const int j = j0 + it * G_THREADS + tid;
    const K key = j < j1 ? entry_key<FMT>(s, valid, r, N, j, vsr, vsc) : K(0);
    cnt += key != K(0);
    hist_add(hist, (unsigned)(key >> shift) & 255u, key != K(0) && (key & pmask) == prefix);
  }
  __syncthreads();
  if (hist[tid] != 0u) atomicAdd(&ghist[256 * r + tid], hist[tid]);
  if (nvalid != nullptr) {
    cnt = group_sum<G_THREADS>(cnt, red, tid);
    if (tid == 0 && cnt != 0u) atomicAdd(&nvalid[r], cnt);
  }
}

// One warp per row: picks the digit at `shift` from the summed histogram, updates the
// state, clears the histogram for the next pass. `first`: set up the state from the budget
// kk[r] and the candidate count nvalid[r].
__global__ void __launch_bounds__(32)
sel_g_pick(const long long* __restrict__ kk, const unsigned* __restrict__ nvalid,
           unsigned long long* __restrict__ st, unsigned* __restrict__ ghist, int shift, int first) {
  __shared__ unsigned bc[3];
  const long long r = blockIdx.x;
  const int lane = threadIdx.x;
  unsigned long long* sr = st + 4 * r;
  unsigned* h = ghist + 256 * r;
  unsigned long long prefix = 0, pmask = 0, rem, m;
  if (first) {
    const long long kr = kk[r], nv = (long long)nvalid[r];
    const long long mm = kr < nv ? kr : nv;
    m = mm > 0 ? (unsigned long long)mm : 0ull;
    rem = m;
  } else {
    prefix = sr[0];
    pmask = sr[1];
    rem = sr[2];
    m = sr[3];
  }
  if (m > 0ull) {
    pick_digit(h, (unsigned)rem, lane, bc);
    __syncwarp();
    const unsigned d = bc[0];
    rem = bc[1];
    prefix |= (unsigned long long)d << shift;
    pmask |= 255ull << shift;
  }
  if (lane == 0) {
    sr[0] = prefix;
    sr[1] = pmask;
    sr[2] = rem;
    sr[3] = m;
  }
  __syncwarp();
  for (int i = lane; i < 256; i += 32) h[i] = 0u;
}

// Ties (keys equal to the selected value) per chunk: tcnt[r * nch + c].
template <int FMT>
__global__ void __launch_bounds__(G_THREADS)
sel_g_ties(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
           long long vsr, long long vsc, int N, int nch, const unsigned long long* __restrict__ st,
           unsigned* __restrict__ tcnt) {
  using K = typename Fmt<FMT>::K;
  __shared__ unsigned red[G_THREADS / 32];
  const long long r = blockIdx.x / nch;
  const int c = blockIdx.x % nch;
  const int tid = threadIdx.x;
  if (st[4 * r + 3] == 0ull) {
    if (tid == 0) tcnt[r * nch + c] = 0u;
    return;
  }
  const K v = (K)st[4 * r];
  const int j0 = c * G_CHUNK, j1 = min(N, j0 + G_CHUNK);
  unsigned cnt = 0;
  for (int j = j0 + tid; j < j1; j += G_THREADS)
    cnt += entry_key<FMT>(s, valid, r, N, j, vsr, vsc) == v;
  cnt = group_sum<G_THREADS>(cnt, red, tid);
  if (tid == 0) tcnt[r * nch + c] = cnt;
}

// The mask of each chunk (ordered tie pass, offset by the ties of the chunks before it in
// tie order) and the boundary (chunk 0).
template <int FMT>
__global__ void __launch_bounds__(G_THREADS)
sel_g_mask(const typename Fmt<FMT>::S* __restrict__ s, const unsigned char* __restrict__ valid,
           long long vsr, long long vsc, int N, int nch, const unsigned long long* __restrict__ st,
           const unsigned* __restrict__ tcnt, int tie_high, unsigned char* __restrict__ mask,
           double* __restrict__ bound) {
  using K = typename Fmt<FMT>::K;
  __shared__ unsigned red[G_THREADS / 32];
  const long long r = blockIdx.x / nch;
  const int c = blockIdx.x % nch;
  const int tid = threadIdx.x;
  const int j0 = c * G_CHUNK, j1 = min(N, j0 + G_CHUNK);
  unsigned char* mrow = mask + r * N;
  if (st[4 * r + 3] == 0ull) {
    for (int j = j0 + tid; j < j1; j += G_THREADS) mrow[j] = 0;
    if (c == 0 && tid == 0) bound[r] = qnan();
    return;
  }
  const K v = (K)st[4 * r];
  const unsigned need = (unsigned)st[4 * r + 2];
  unsigned off = 0;
  for (int i = tid; i < nch; i += G_THREADS)
    if (tie_high ? i > c : i < c) off += tcnt[r * nch + i];
  off = group_sum<G_THREADS>(off, red, tid);
  ordered_select<G_THREADS, K>(
      j1 - j0, v, need, off, tie_high != 0, tid, red,
      [&](int i) { return entry_key<FMT>(s, valid, r, N, j0 + i, vsr, vsc); },
      [&](int i, bool keep) { mrow[j0 + i] = keep ? 1 : 0; });
  if (c == 0 && tid == 0) bound[r] = key_value(v);
}

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
//   nvcc -arch=sm_90 -std=c++17 -Igpu -DREFATTN_NVCC_CHECK -c gpu/select.cu -o /dev/null
#define REFATTN_SEL_FMT(F)                                                                   \
  (void*)&sel_topk_group<F, 32>, (void*)&sel_topk_group<F, 512>, (void*)&sel_cum_group<F, 32>, \
      (void*)&sel_cum_group<F, 512>, (void*)&sel_g_hist<F>, (void*)&sel_g_ties<F>,           \
      (void*)&sel_g_mask<F>, (void*)&sel_cum_keys<F>, (void*)&sel_fixed<F>
void* refattn_select_check() {
  static void* ptrs[] = {REFATTN_SEL_FMT(0), REFATTN_SEL_FMT(1), REFATTN_SEL_FMT(2),
                         REFATTN_SEL_FMT(3), (void*)&sel_g_pick,
                         (void*)&sel_cum_serial<unsigned>,
                         (void*)&sel_cum_serial<unsigned long long>};
  return ptrs;
}
#endif
