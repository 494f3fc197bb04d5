// SPDX-License-Identifier: Apache-2.0
// CUDA kernels of the FP8 KV cache (kvkern/reference.py "FP8 KV"): prefill
// quantize, one-token append, and split-K decode attention straight over the
// e4m3 bytes. Torch-free: the CUDA runtime, cuda_fp8 / fp16 / bf16 and kvkern
// headers. Host API: fp8_launch.h.
//
// Conversions use cuda_fp8.h: encode __nv_cvt_float_to_fp8(x / scale,
// __NV_SATFINITE, __NV_E4M3) after a correctly rounded __fdiv_rn (round to
// nearest even, saturating at +-448, NaN kept: the reference's quantizer);
// decode two codes at a time to half2 (exact: e4m3 is a subset of fp16; one
// instruction on sm_89+), then to fp32.
//
// Attention, one block of kFp8Warps warps per (b, kv head j, split s, chunk of
// HT query heads):
//  * A row of D codes is read by D / 8 lanes, 8 bytes (one uint2) each, so a
//    warp covers 32 / (D / 8) rows at once and the block kGroups "row groups".
//    Each iteration a thread issues the loads of kUnroll rows of K and V before
//    it decodes any (kUnroll * 16 bytes in flight per thread).
//  * q is pre-scaled by sm_scale * k_scale[j] * log2(e): the logit of a row is
//    the dot with the decoded codes, in base 2, without a per-element scale.
//  * Every row group runs its own online softmax over its rows; the groups
//    merge by warp shuffles, the warps through shared memory; v_scale[j]
//    multiplies the merged output once. Block mapping, split bounds, update and
//    merges are decode_attention.cuh's (attention_common.cuh).
//  * One split writes out / lse; several write fp32 partials merged by the
//    quantized cache's merge kernel (quant_kv.cuh quant_merge_kernel, the same
//    combine as decode_attention's).
//
// Host side: run_* templates over a launcher (the <<<>>> one in
// csrc/kernels/fp8_inst.cu, a CPU one in tools/cuda_emu/quant_emu.cpp), so the
// emulator runs these exact launch sequences.
#pragma once

#include <cuda_fp8.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "attention_common.cuh"
#include "common.cuh"
#include "decode_attention_launch.h"
#include "fp8_launch.h"
#include "quant_kv.cuh"  // quant_detail::quant_merge_kernel

namespace kvkern {
namespace fp8_detail {

using split_attn::kNegInf;
constexpr int kFp8Warps = 4;
constexpr int kFp8Threads = kFp8Warps * 32;
constexpr int kFp8MaxHeadsTile = 8;
constexpr int kFp8SplitTile = 64;  // split boundaries are multiples of this many slots
constexpr int kFp8QuantThreads = 256;

template <typename T>
__device__ __forceinline__ float load_f(const T* p) {
  return DtypeTraits<T>::to_float(*p);
}

__device__ __forceinline__ uint8_t encode(float x, float scale) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3));
}

// 8 codes (one uint2) -> 8 floats, exact.
__device__ __forceinline__ void decode8(const uint2& raw, float* out) {
  const uint32_t w[2] = {raw.x, raw.y};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>((w[i] >> (16 * k)) & 0xffffu);
      const __half2 h = __half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3));
      const float2 f = __half22float2(h);
      out[4 * i + 2 * k] = f.x;
      out[4 * i + 2 * k + 1] = f.y;
    }
  }
}

// ---- prefill: one thread per element of the live part ----------------------
template <typename T>
__global__ void __launch_bounds__(kFp8QuantThreads) fp8_quantize_kernel(const Fp8KVParams p) {
  const int64_t H = p.num_kv_heads, D = p.head_dim, Tn = p.in_tokens;
  const int64_t total = p.batch * H * Tn * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % D, t = (i / D) % Tn, h = (i / (D * Tn)) % H, b = i / (D * Tn * H);
    const int64_t L = p.lengths[b * p.lengths_stride_b + h * p.lengths_stride_h];
    if (t >= L) continue;  // L <= T_in <= C is the caller's contract (the glue cannot read it)
    const T* k = static_cast<const T*>(p.k_in.data) + b * p.k_in.stride[0] + h * p.k_in.stride[1] + t * p.k_in.stride[2];
    const T* v = static_cast<const T*>(p.v_in.data) + b * p.v_in.stride[0] + h * p.v_in.stride[1] + t * p.v_in.stride[2];
    uint8_t* kq = static_cast<uint8_t*>(p.k_fp8.data) + b * p.k_fp8.stride[0] + h * p.k_fp8.stride[1] + t * p.k_fp8.stride[2];
    uint8_t* vq = static_cast<uint8_t*>(p.v_fp8.data) + b * p.v_fp8.stride[0] + h * p.v_fp8.stride[1] + t * p.v_fp8.stride[2];
    kq[d] = encode(load_f(k + d), p.k_scale[h * p.k_scale_stride]);
    vq[d] = encode(load_f(v + d), p.v_scale[h * p.v_scale_stride]);
  }
}

// ---- append: one block per (b, h) ------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kFp8QuantThreads) fp8_append_kernel(const Fp8KVParams p) {
  const int64_t b = blockIdx.x / p.num_kv_heads, h = blockIdx.x % p.num_kv_heads;
  int32_t* len = p.lengths + b * p.lengths_stride_b + h * p.lengths_stride_h;
  const int64_t t = *len;
  __syncthreads();  // every thread has read the length before thread 0 rewrites it
  if (t < 0 || t >= p.capacity) return;  // full (or corrupt): untouched, never out of bounds
  const T* k = static_cast<const T*>(p.k_in.data) + b * p.k_in.stride[0] + h * p.k_in.stride[1];
  const T* v = static_cast<const T*>(p.v_in.data) + b * p.v_in.stride[0] + h * p.v_in.stride[1];
  uint8_t* kq = static_cast<uint8_t*>(p.k_fp8.data) + b * p.k_fp8.stride[0] + h * p.k_fp8.stride[1] + t * p.k_fp8.stride[2];
  uint8_t* vq = static_cast<uint8_t*>(p.v_fp8.data) + b * p.v_fp8.stride[0] + h * p.v_fp8.stride[1] + t * p.v_fp8.stride[2];
  const float ks = p.k_scale[h * p.k_scale_stride], vs = p.v_scale[h * p.v_scale_stride];
  for (int64_t d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
    kq[d] = encode(load_f(k + d), ks);
    vq[d] = encode(load_f(v + d), vs);
  }
  if (threadIdx.x == 0) *len = static_cast<int32_t>(t + 1);
}

// ---- attention -----------------------------------------------------------------
template <int HEAD_DIM>
struct Fp8AttnConfig {
  static constexpr int kElems = 8;                          // codes of a row per thread (one uint2)
  static constexpr int kRowThreads = HEAD_DIM / kElems;     // 8, 16, 32
  static constexpr int kRowsPerWarp = 32 / kRowThreads;     // 4, 2, 1
  static constexpr int kGroups = kFp8Warps * kRowsPerWarp;  // row groups per block
  static constexpr int kUnroll = 4;                         // rows per group per iteration
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "HEAD_DIM: 64, 128 or 256");
};

template <typename T, int HEAD_DIM, int HT>
__global__ void __launch_bounds__(kFp8Threads) fp8_decode_kernel(const Fp8KVParams p) {
  using Cfg = Fp8AttnConfig<HEAD_DIM>;
  using Tr = DtypeTraits<T>;
  constexpr int kE = Cfg::kElems;
  constexpr int kRT = Cfg::kRowThreads;
  constexpr int kU = Cfg::kUnroll;
  // Only the final cross-warp merge uses shared memory (fp8_smem_bytes).
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int group = warp * Cfg::kRowsPerWarp + lane / kRT;
  const int r = lane % kRT;
  const int e0 = r * kE;  // this thread's codes [e0, e0 + 8) of every row

  const split_attn::SplitWork work = split_attn::split_work(p, HT, kFp8SplitTile);
  const int64_t b = work.b, j = work.j, s = work.s, c = work.c, lo = work.lo, hi = work.hi;
  const bool bad_len = work.bad_len;
  const int64_t G = p.num_q_heads / p.num_kv_heads;
  const int64_t S = p.num_splits;
  const int64_t hq0 = j * G + c * HT;
  const int n_heads = static_cast<int>(G - c * HT < HT ? G - c * HT : HT);

  float qf[HT][kE];
  {
    const float qscale = p.sm_scale * p.k_scale[j * p.k_scale_stride] * kLog2e;
    const T* q = static_cast<const T*>(p.q);
#pragma unroll
    for (int t = 0; t < HT; ++t) {
      const T* qrow = q + b * p.q_stride_b + (hq0 + t) * p.q_stride_h + e0;
#pragma unroll
      for (int e = 0; e < kE; ++e) qf[t][e] = t < n_heads ? Tr::to_float(qrow[e]) * qscale : 0.f;
    }
  }

  const uint8_t* k_head = static_cast<const uint8_t*>(p.k_fp8.data) + b * p.k_fp8.stride[0] + j * p.k_fp8.stride[1] + e0;
  const uint8_t* v_head = static_cast<const uint8_t*>(p.v_fp8.data) + b * p.v_fp8.stride[0] + j * p.v_fp8.stride[1] + e0;
  const int64_t ksc = p.k_fp8.stride[2], vsc = p.v_fp8.stride[2];

  float m[HT], l[HT], acc[HT][kE];
  split_attn::init_states(m, l, acc);

  // Uniform trip count over the block (every lane reaches the shuffles).
  const int64_t step = static_cast<int64_t>(Cfg::kGroups) * kU;
  const int64_t iters = ceil_div<int64_t>(hi - lo, step);
  for (int64_t it = 0; it < iters; ++it) {
    uint2 kraw[kU], vraw[kU];
    bool valid[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t slot = lo + it * step + u * Cfg::kGroups + group;
      valid[u] = slot < hi;
      kraw[u] = valid[u] ? __ldg(reinterpret_cast<const uint2*>(k_head + slot * ksc)) : make_uint2(0u, 0u);
      vraw[u] = valid[u] ? __ldg(reinterpret_cast<const uint2*>(v_head + slot * vsc)) : make_uint2(0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float kf[kE], vf[kE];
      decode8(kraw[u], kf);
      decode8(vraw[u], vf);
      float dot[HT];
      split_attn::row_logits<kRT>(qf, kf, dot);
#pragma unroll
      for (int t = 0; t < HT; ++t) split_attn::online_update(valid[u] ? dot[t] : kNegInf, m[t], l[t], acc[t], vf);
    }
  }

  split_attn::merge_row_groups<kRT>(m, l, acc);
  const split_attn::SplitOut<T> dst{static_cast<T*>(p.out), p.lse, p.partial_out, p.partial_lse,
                                    b * p.num_q_heads + hq0, s, S};
  split_attn::merge_warps_and_store<T, HEAD_DIM, HT, kE, kFp8Warps, kRT>(
      reinterpret_cast<float*>(smem), m, l, acc, [&](int e) { return e0 + e; }, n_heads, bad_len,
      p.v_scale[j * p.v_scale_stride], dst);
}

inline int heads_tile(int64_t G) { return G >= 8 ? 8 : G >= 4 ? 4 : G >= 2 ? 2 : 1; }

inline bool attention_ok(const Fp8KVParams& p) {
  auto al8 = [](const QuantTensorRef& t) {
    return reinterpret_cast<uintptr_t>(t.data) % 8 == 0 && t.stride[0] % 8 == 0 && t.stride[1] % 8 == 0 &&
           t.stride[2] % 8 == 0;
  };
  return (p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256) && p.num_kv_heads > 0 && p.batch >= 0 &&
         p.num_q_heads > 0 && p.num_q_heads % p.num_kv_heads == 0 && al8(p.k_fp8) && al8(p.v_fp8);
}

// About 16 CTAs per SM: several waves of the ~4 resident ones (register-bound),
// so the last wave's tail is small; each split keeps >= 4 x 64 slots.
inline int default_splits(const Fp8KVParams& p, int num_sms) {
  const int64_t blocks = p.batch * p.num_kv_heads * ceil_div<int64_t>(p.group_size(), heads_tile(p.group_size()));
  if (blocks <= 0) return 1;
  int64_t s = ceil_div<int64_t>(16 * static_cast<int64_t>(num_sms > 0 ? num_sms : 132), blocks);
  const int64_t most = ceil_div<int64_t>(p.capacity, 4 * kFp8SplitTile);
  if (s > most) s = most;
  if (s > 256) s = 256;
  return static_cast<int>(s < 1 ? 1 : s);
}

constexpr size_t fp8_smem_bytes(int head_dim, int ht) {
  return static_cast<size_t>(kFp8Warps) * static_cast<size_t>(ht) * static_cast<size_t>(head_dim + 2) * 4;
}

template <typename T, int HEAD_DIM, typename L>
cudaError_t run_attention_dim(const Fp8KVParams& p, L& launch) {
  const int64_t G = p.group_size();
  const int ht = heads_tile(G);
  const int64_t blocks = p.batch * p.num_kv_heads * p.num_splits * ceil_div<int64_t>(G, ht);
  const size_t smem = fp8_smem_bytes(HEAD_DIM, ht);
  switch (ht) {
    case 1: KVKERN_CUDA_TRY(launch(fp8_decode_kernel<T, HEAD_DIM, 1>, blocks, kFp8Threads, smem, p)); break;
    case 2: KVKERN_CUDA_TRY(launch(fp8_decode_kernel<T, HEAD_DIM, 2>, blocks, kFp8Threads, smem, p)); break;
    case 4: KVKERN_CUDA_TRY(launch(fp8_decode_kernel<T, HEAD_DIM, 4>, blocks, kFp8Threads, smem, p)); break;
    default: KVKERN_CUDA_TRY(launch(fp8_decode_kernel<T, HEAD_DIM, 8>, blocks, kFp8Threads, smem, p)); break;
  }
  return quant_detail::launch_split_merge<T>(p, p.num_splits, launch);
}

template <typename T, typename L>
cudaError_t run_attention_typed(const Fp8KVParams& p, L& launch) {
  switch (p.head_dim) {
    case 64: return run_attention_dim<T, 64>(p, launch);
    case 128: return run_attention_dim<T, 128>(p, launch);
    default: return run_attention_dim<T, 256>(p, launch);
  }
}

template <typename L, typename F>
cudaError_t by_dtype(KvDtype dtype, F&& f) {
  switch (dtype) {
    case KvDtype::kFloat32: return f(float{});
    case KvDtype::kFloat16: return f(__half{});
    case KvDtype::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

inline bool cache_ok(const Fp8KVParams& p) {
  return p.batch >= 0 && p.num_kv_heads > 0 && p.head_dim > 0 && p.capacity >= 0 && p.k_fp8.data && p.v_fp8.data &&
         p.k_scale && p.v_scale && p.lengths && p.k_in.data && p.v_in.data;
}

inline int64_t grid_for(int64_t work) {
  const int64_t blocks = ceil_div<int64_t>(work, kFp8QuantThreads);
  return blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks);
}

// The launch sequences (fp8_launch.h states the contracts).
template <typename L>
cudaError_t run_fp8_decode_attention(const Fp8KVParams& p, KvDtype dtype, L& launch) {
  if (!attention_ok(p) || p.num_splits < 1) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  if (!p.k_fp8.data || !p.v_fp8.data || !p.k_scale || !p.v_scale || !p.lengths || !p.q || !p.out || !p.lse ||
      (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)))
    return cudaErrorInvalidValue;
  return by_dtype<L>(dtype, [&](auto tag) { return run_attention_typed<decltype(tag)>(p, launch); });
}

template <typename L>
cudaError_t run_quantize_fp8_kv(const Fp8KVParams& p, KvDtype dtype, L& launch) {
  if (!cache_ok(p) || p.in_tokens < 0 || p.in_tokens > p.capacity) return cudaErrorInvalidValue;
  const int64_t work = p.batch * p.num_kv_heads * p.in_tokens * p.head_dim;
  if (work == 0) return cudaSuccess;
  return by_dtype<L>(dtype, [&](auto tag) {
    return launch(fp8_quantize_kernel<decltype(tag)>, grid_for(work), kFp8QuantThreads, 0, p);
  });
}

template <typename L>
cudaError_t run_append_fp8_kv(const Fp8KVParams& p, KvDtype dtype, L& launch) {
  if (!cache_ok(p)) return cudaErrorInvalidValue;
  const int threads = p.head_dim >= kFp8QuantThreads ? kFp8QuantThreads : static_cast<int>((p.head_dim + 31) / 32 * 32);
  return by_dtype<L>(dtype, [&](auto tag) {
    return launch(fp8_append_kernel<decltype(tag)>, p.batch * p.num_kv_heads, threads, 0, p);
  });
}

}  // namespace fp8_detail
}  // namespace kvkern
