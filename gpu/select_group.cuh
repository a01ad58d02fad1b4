// Group primitives of the selection kernels (gpu/select_topk.cu, gpu/select_threshold.cu):
// group sums / minima, the radix select of the m-th largest key, the ordered tie pass and
// the bitonic sort. Include after common.cuh and select_keys.cuh.
#pragma once

namespace refattn {
namespace sel {

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

__host__ __device__ constexpr long long align16(long long b) { return (b + 15) & ~15ll; }

}  // namespace sel
}  // namespace refattn
