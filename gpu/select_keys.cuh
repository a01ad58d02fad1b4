// Score formats and order-preserving keys of the selection kernels (gpu/select_topk.cu,
// gpu/select_threshold.cu). Include after common.cuh.
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
#pragma once

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

}  // namespace sel
}  // namespace refattn
