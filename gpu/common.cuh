// refattn GPU kernels: shared device helpers.
//
// Everything here is header-only and compiles under NVRTC (CuPy RawModule) and nvcc alike:
// no <mma.h>, tensor-core work goes through inline PTX (mma.sync m16n8k16, ldmatrix,
// cp.async), which is what FlashAttention-2-class kernels use on sm_80..sm_90.
//
// Conventions used by every kernel of the package:
//   * 16-bit element types are `__half` (fp16) and `__nv_bfloat16` (bf16); accumulation,
//     softmax and every output are fp32.
//   * Softmax runs in base 2: scores are multiplied by `scale * log2(e)` and exponentiated
//     with exp2f; the log-sum-exp written out is converted back to natural log.
//   * A row that sees no key keeps m = -inf; exponent offsets use 0 in that case
//     ("Check_inf"), so no NaN is ever produced; output 0, LSE -inf.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace refattn {

#define REFATTN_INF __int_as_float(0x7f800000)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------ conversions
template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats -> one 32-bit register of two 16-bit values (`lo` in the low half, i.e. the
// element with the smaller column index in an mma fragment).
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi);
template <> __device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// ------------------------------------------------------------------ PTX wrappers
// D = A * B + D, m16n8k16, A row-major 16x16, B column-major 16x8, fp32 accumulate.
template <typename T> __device__ __forceinline__ void mma16816(float c[4], const unsigned a[4],
                                                               unsigned b0, unsigned b1);
template <> __device__ __forceinline__ void mma16816<__half>(float c[4], const unsigned a[4],
                                                             unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const unsigned a[4],
                                                                    unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 b16 matrices; lane i gives the row address of matrix i/8, row i%8.
__device__ __forceinline__ void ldsm_x4(unsigned r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16-byte global -> shared copy; when !pred the destination is zero-filled (src-size 0).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ------------------------------------------------------------------ fragment loads
// Operand tiles live in shared memory with a padded leading dimension (row stride of
// LD elements, LD*2 bytes = 16 mod 128) so that ldmatrix is free of bank conflicts.
//
// A operand (16 x 16 at m0 = 0, k0 = k):
//   stored [m][k] (row-major):           load_a(..., trans=false)
//   stored [k][m] (the transpose, e.g. a tile we hold as [key][query]): trans=true
template <bool TRANS, typename T>
__device__ __forceinline__ void load_a(unsigned a[4], const T* s, int ld, int k0, int lane) {
  if (!TRANS) {
    ldsm_x4(a, s + (lane & 15) * ld + k0 + (lane >> 4) * 8);
  } else {
    const int mi = lane >> 3, r = lane & 7;
    ldsm_x4_t(a, s + (k0 + (mi >> 1) * 8 + r) * ld + (mi & 1) * 8);
  }
}

// B operand, two n8 blocks (n0, n0 + 8) x k16 at k0:
//   stored [n][k] ("K-contiguous", e.g. K[key][d] for Q K^T):      trans=false
//   stored [k][n] ("N-contiguous", e.g. V[key][d] for P V):         trans=true
// b[0], b[1] feed n-block n0; b[2], b[3] feed n-block n0 + 8.
template <bool TRANS, typename T>
__device__ __forceinline__ void load_b(unsigned b[4], const T* s, int ld, int n0, int k0, int lane) {
  const int mi = lane >> 3, r = lane & 7;
  if (!TRANS) {
    ldsm_x4(b, s + (n0 + (mi >> 1) * 8 + r) * ld + k0 + (mi & 1) * 8);
  } else {
    ldsm_x4_t(b, s + (k0 + (mi & 1) * 8 + r) * ld + n0 + (mi >> 1) * 8);
  }
}

// Accumulator fragments of a 16 x 16 slab (two n8 blocks) reused as an A operand
// (FlashAttention-2's register reuse of P): c0 holds n-block 2j, c1 n-block 2j + 1.
template <typename T>
__device__ __forceinline__ void acc_to_a(unsigned a[4], const float c0[4], const float c1[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// 2^x with the SFU (ex2.approx.ftz: 2 ulp; -inf -> +0, as the softmax needs).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two adjacent fp32 atomic adds (8-byte aligned address): one vector atomic on sm_90+.
__device__ __forceinline__ void atomic_add2(float* p, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(x, y));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
#endif
}

// Four adjacent fp32 atomic adds (16-byte aligned address): one vector atomic on sm_90+.
__device__ __forceinline__ void atomic_add4(float* p, float x, float y, float z, float w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float4*>(p), make_float4(x, y, z, w));
#else
  atomicAdd(p, x);
  atomicAdd(p + 1, y);
  atomicAdd(p + 2, z);
  atomicAdd(p + 3, w);
#endif
}

// ------------------------------------------------------------------ warp reductions
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

}  // namespace refattn
