// SPDX-License-Identifier: Apache-2.0
// Plain description of one call of an FP8-KV op (quantize_fp8_kv_,
// append_fp8_kv_, fp8_decode_attention), read by the CPU kernels
// (csrc/cpu/fp8_kernel.h) and passed by value to the CUDA kernels (fp8_kv.cuh).
// No framework types: pointers, sizes and strides in elements.
//
// Layout (kvkern/reference.py "FP8 KV"), T = fp32 / fp16 / bf16:
//   k_fp8, v_fp8 [B, Hkv, C, D] e4m3fn bytes   slot t = token t
//   k_scale, v_scale [Hkv] fp32                 x ≈ float(code) * scale
//   lengths [B, Hkv] int32
#pragma once

#include <cstdint>
#include <type_traits>

#include "quant_params.h"  // QuantTensorRef, QuantDType

namespace kvkern {

struct Fp8KVParams {
  QuantTensorRef k_fp8, v_fp8;  // strides over (b, h, slot); the last dim contiguous
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  int64_t k_scale_stride = 1, v_scale_stride = 1;
  int32_t* lengths = nullptr;  // [B, Hkv]; append_fp8_kv_ increments it
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;

  int64_t batch = 0, num_kv_heads = 0, capacity = 0, head_dim = 0;
  QuantDType dtype = QuantDType::kFloat32;  // T of k / v / k_new / v_new / q / out

  // ---- quantize_fp8_kv_: k, v [B, Hkv, T_in, D] (strides over b, h, token) ----
  // ---- append_fp8_kv_: k_new, v_new [B, Hkv, D] (strides over b, h) ----
  QuantTensorRef k_in, v_in;
  int64_t in_tokens = 0;  // T_in (quantize only)

  // ---- fp8_decode_attention ----
  const void* q = nullptr;  // [B, Hq, D], T
  int64_t q_stride_b = 0, q_stride_h = 0;
  int64_t num_q_heads = 0;
  void* out = nullptr;   // [B, Hq, D], T, contiguous
  float* lse = nullptr;  // [B, Hq] fp32, contiguous
  float sm_scale = 1.0f;
  int num_splits = 1;  // CPU: resolved by the glue; CUDA: 0 = the launcher's heuristic
  int block_n = 64;    // CPU tile; the CUDA kernel's tile is fixed
  float* partial_out = nullptr;  // [B, Hq, S, D] fp32 when num_splits > 1
  float* partial_lse = nullptr;  // [B, Hq, S]

  KVKERN_QUANT_HD int64_t group_size() const { return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0; }
  KVKERN_QUANT_HD int32_t length(int64_t b, int64_t j) const {
    return lengths[b * lengths_stride_b + j * lengths_stride_h];
  }
};

static_assert(std::is_trivially_copyable<Fp8KVParams>::value, "Fp8KVParams is a CUDA kernel argument");

}  // namespace kvkern
