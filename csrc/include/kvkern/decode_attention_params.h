// SPDX-License-Identifier: Apache-2.0
// Plain description of one decode-attention call, shared by the CPU and CUDA
// kernels. No framework types: pointers, sizes and strides (in elements).
#pragma once

#include <cstdint>

namespace kvkern {

// Math (per batch b, query head h, kv head j = h / G, valid slots i < len = lengths[b, j]):
//   s_i   = sm_scale * <q[b,h], k[b,j,i]> + log_w[b,j,i]   (log_w term only when given)
//   lse   = log(sum_i exp(s_i))                            (-inf when len == 0)
//   out   = sum_i exp(s_i - lse) * v[b,j,i]                (0 when len == 0)
// Slots i >= len are never read. A length outside [0, capacity] makes the
// kernel write NaN for that head's out and lse instead of reading out of bounds
// (GPU kernels cannot raise without a host sync; the CPU glue raises first).
struct DecodeAttentionParams {
  const void* q = nullptr;        // [B, Hq, D], T
  const void* k = nullptr;        // [B, Hkv, C, D], T
  const void* v = nullptr;        // [B, Hkv, C, D], T
  const int32_t* lengths = nullptr;  // [B, Hkv]
  const float* log_w = nullptr;   // [B, Hkv, C] or nullptr
  void* out = nullptr;            // [B, Hq, D], T, contiguous
  float* lse = nullptr;           // [B, Hq], contiguous

  // Split-K workspace, used when num_splits > 1: partial results of each split
  // before the combine step. [B, Hq, num_splits, D] and [B, Hq, num_splits].
  float* partial_out = nullptr;
  float* partial_lse = nullptr;

  int64_t batch = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t capacity = 0;
  int64_t head_dim = 0;

  int64_t q_stride_b = 0, q_stride_h = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_c = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_c = 0;
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;
  int64_t log_w_stride_b = 0, log_w_stride_h = 0;

  float sm_scale = 1.0f;

  // Launch configuration, already resolved (no zeros) by the glue.
  int num_splits = 1;
  int block_n = 64;
  int num_warps = 4;
  int num_stages = 2;

  int64_t group_size() const { return num_q_heads / num_kv_heads; }
};

}  // namespace kvkern
