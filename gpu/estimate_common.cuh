// Device helpers shared by the estimate scoring kernels (gpu/score_bsfa.cu,
// gpu/score_vslash.cu, gpu/score_flexprefill_pool.cu): float64 conversions and warp
// reductions, the register-fragment QK^T tile (mma.sync m16n8k16) and the cp.async row
// loader. Include after common.cuh.
#pragma once

namespace refattn {
namespace est {

__device__ __forceinline__ double dbl(float x) { return (double)x; }
__device__ __forceinline__ double dbl(double x) { return x; }
__device__ __forceinline__ double dbl(__half x) { return (double)__half2float(x); }
__device__ __forceinline__ double dbl(__nv_bfloat16 x) { return (double)__bfloat162float(x); }

__device__ __forceinline__ double neg_inf_d() { return __longlong_as_double(0xfff0000000000000ULL); }

__device__ __forceinline__ double warp_max_d(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmax(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ double warp_sum_d(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// S tile (16*MR rows per warp x 64 keys) = Q K^T: Q fragments in registers, K tile
// [64][LD] in shared memory (row = key, K-contiguous).
template <typename T, int KS, int MR>
__device__ __forceinline__ void tile_qk(float (&acc)[MR][8][4], const unsigned (&qa)[MR][KS][4],
                                        const T* sKs, int ld, int lane) {
#pragma unroll
  for (int mt = 0; mt < MR; ++mt)
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) acc[mt][nt][0] = acc[mt][nt][1] = acc[mt][nt][2] = acc[mt][nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      unsigned bb[4];
      load_b<false>(bb, sKs, ld, np * 16, kk * 16, lane);
#pragma unroll
      for (int mt = 0; mt < MR; ++mt) {
        mma16816<T>(acc[mt][2 * np], qa[mt][kk], bb[0], bb[1]);
        mma16816<T>(acc[mt][2 * np + 1], qa[mt][kk], bb[2], bb[3]);
      }
    }
  }
}

// cp.async a [rows][D] slab (rows from `first`, `valid` of them real, the rest zero) into
// shared memory with row stride LD.
template <typename T, int D, int LD>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int rows, int first, int valid,
                                          int tid) {
  constexpr int CH = D / 8;
#pragma unroll 1
  for (int i = tid; i < rows * CH; i += 128) {
    const int r = i / CH, c = (i % CH) * 8;
    const bool ok = r < valid;
    cp_async16(dst + r * LD + c, ok ? src + (long long)(first + r) * D + c : src, ok);
  }
}

}  // namespace est
}  // namespace refattn
