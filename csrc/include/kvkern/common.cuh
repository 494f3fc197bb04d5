// SPDX-License-Identifier: Apache-2.0
// Torch-free CUDA helpers shared by kvkern's kernels: dtype traits (storage
// type <-> fp32), 16-byte vector unpacking, ceil_div, warp reductions and the
// cp.async primitives of the multi-stage copy pipelines.
//
// Only the CUDA runtime and cuda_fp16.h / cuda_bf16.h are included, so plain
// `nvcc -c` checks every kernel on a machine without torch or a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

// Returns a failing cudaError_t from the enclosing function (launchers return
// cudaError_t; the torch glue turns it into one exception).
#define KVKERN_CUDA_TRY(expr)                           \
  do {                                                  \
    const cudaError_t kvkern_err_ = (expr);             \
    if (kvkern_err_ != cudaSuccess) return kvkern_err_; \
  } while (0)

namespace kvkern {

constexpr float kLog2e = 1.4426950408889634f;  // log2(e)
constexpr float kLn2 = 0.6931471805599453f;    // ln(2)

template <typename I>
__host__ __device__ constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

// ---------------------------------------------------------------------------
// Storage dtype traits. kVec: elements of T in one 16-byte vector (uint4).
// unpack16 widens one uint4 of T to kVec floats, in memory order; pack2 (16-bit
// types) narrows two floats into one 32-bit word.
// ---------------------------------------------------------------------------
template <typename T>
struct DtypeTraits;

template <>
struct DtypeTraits<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
  __device__ __forceinline__ static void unpack16(const uint4& raw, float* out) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
};

template <>
struct DtypeTraits<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
  // Two values rounded to nearest and packed as one 32-bit word (a first, in memory order).
  __device__ __forceinline__ static uint32_t pack2(float a, float b) {
    const __half2 h2 = __floats2half2_rn(a, b);
    uint32_t w;
    __builtin_memcpy(&w, &h2, sizeof(w));
    return w;
  }
  __device__ __forceinline__ static void unpack16(const uint4& raw, float* out) {
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h2;
      static_assert(sizeof(h2) == sizeof(uint32_t), "half2 is 4 bytes");
      __builtin_memcpy(&h2, &w[i], sizeof(h2));
      const float2 f = __half22float2(h2);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
};

template <>
struct DtypeTraits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static uint32_t pack2(float a, float b) {
    const __nv_bfloat162 h2 = __floats2bfloat162_rn(a, b);
    uint32_t w;
    __builtin_memcpy(&w, &h2, sizeof(w));
    return w;
  }
  __device__ __forceinline__ static void unpack16(const uint4& raw, float* out) {
    // bf16 is the high half of an fp32: widening is a shift or a mask (exact).
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

// ---------------------------------------------------------------------------
// Warp reductions over aligned groups of WIDTH lanes (WIDTH a power of two,
// <= 32). Every lane of the warp must call them (full mask). The xor
// butterfly leaves the same bits in every lane of a group: each level adds the
// same two values, and fp32 addition is commutative.
// ---------------------------------------------------------------------------
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
  static_assert(WIDTH >= 1 && WIDTH <= 32 && (WIDTH & (WIDTH - 1)) == 0, "WIDTH: power of two <= 32");
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <int WIDTH>
__device__ __forceinline__ float group_max(float x) {
  static_assert(WIDTH >= 1 && WIDTH <= 32 && (WIDTH & (WIDTH - 1)) == 0, "WIDTH: power of two <= 32");
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// ---------------------------------------------------------------------------
// mma.sync m16n8k16 (sm_80+), fp32 accumulate: c += A(16x16, row) * B(16x8,
// col), T = __half or __nv_bfloat16 for both inputs, with the PTX fragment
// layout (g = lane / 4, q = lane % 4): a0 = A[g][2q..2q+1], a1 = A[g+8][2q..],
// a2 = A[g][2q+8..], a3 = A[g+8][2q+8..]; b0 = B[2q..][g], b1 = B[2q+8..][g];
// c = C[g][2q], C[g][2q+1], C[g+8][2q], C[g+8][2q+1]. Each 32-bit register
// holds two elements, the lower k (or column) in the low half. Shared by the
// window-score and the quantized-attention kernels.
// ---------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "fp16 / bf16 inputs");
#ifdef KVKERN_CUDA_EMULATION
  // tools/cuda_emu (CPU emulator): the same fragment layout, computed by the warp's fibers.
  ::kvkern_emu::mma_16816(std::is_same<T, __nv_bfloat16>::value, c, a0, a1, a2, a3, b0, b1);
#else
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#endif
}

// ---------------------------------------------------------------------------
// cp.async (sm_80+): global -> shared copies that bypass registers, grouped
// into commit groups. On older architectures they fall back to plain copies
// (then every wait is a no-op), so the kernels stay correct everywhere.
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes; both addresses 16-byte aligned. .cg: cache in L2 only (streamed once).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src)
               : "memory");
#else
  *static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gmem_src);
#endif
}

// 4 bytes; both addresses 4-byte aligned (.ca: the only variant for < 16 bytes).
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src)
               : "memory");
#else
  *static_cast<uint32_t*>(smem_dst) = *static_cast<const uint32_t*>(gmem_src);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The same with a run-time N (the pipeline depth is a launch parameter). The
// switch is uniform across the block; N beyond the cases waits for everything,
// which is always correct (only slower).
__device__ __forceinline__ void cp_async_wait_dynamic(int n) {
  switch (n) {
    case 1: cp_async_wait<1>(); break;
    case 2: cp_async_wait<2>(); break;
    case 3: cp_async_wait<3>(); break;
    case 4: cp_async_wait<4>(); break;
    case 5: cp_async_wait<5>(); break;
    case 6: cp_async_wait<6>(); break;
    default: cp_async_wait<0>(); break;
  }
}

}  // namespace kvkern
