// SPDX-License-Identifier: Apache-2.0
// Plain descriptions of the query-free and statistical scorers and of the
// history update, shared by the CPU kernels (and CUDA ones later) and filled by
// csrc/torch/scorer_args.h. No framework types: pointers, sizes and strides in
// elements; every tensor's last dimension is contiguous. kvkern/reference.py
// states the exact math (expected_attention_scores, slot_scores, update_scores_).
#pragma once

#include <cstdint>

#include "eviction_params.h"

namespace kvkern {

// expected_attention_scores: softmax over slots [n_sink, L) of
//   z = sm_scale * <mean_h, k_i> + sm_scale^2 / 2 * k_i^T cov_h k_i,
// averaged over the G query heads of each kv head, times ||v_i|| (after adding
// epsilon) when v is given; +inf on slots [0, min(n_sink, L)), 0 past L.
struct ExpectedAttentionParams {
  const float* mean = nullptr;       // [B, Hq, D] fp32
  const float* cov = nullptr;        // [B, Hq, D, D] fp32, or nullptr (no quadratic term)
  const void* k = nullptr;           // [B, Hkv, C, D], T
  const void* v = nullptr;           // [B, Hkv, C, D], T, or nullptr (no value-norm weighting)
  const int32_t* lengths = nullptr;  // [B, Hkv]
  float* out = nullptr;              // [B, Hkv, C] fp32, contiguous

  int64_t batch = 0, num_q_heads = 0, num_kv_heads = 0, capacity = 0, head_dim = 0;
  int64_t mean_stride_b = 0, mean_stride_h = 0;
  int64_t cov_stride_b = 0, cov_stride_h = 0, cov_stride_r = 0;  // r: the row (first D) dim
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_c = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_c = 0;
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;

  int64_t n_sink = 0;  // >= 0; may exceed C
  float epsilon = 0.f;
  float sm_scale = 1.f;

  int64_t group_size() const { return num_q_heads / num_kv_heads; }
};

// slot_scores: one query-free score per valid slot, 0 past L (see SlotScoreKind).
struct SlotScoresParams {
  const void* k = nullptr;           // [B, Hkv, C, D], T
  const void* v = nullptr;           // [B, Hkv, C, D], T; required by kValueNorm only
  const int32_t* lengths = nullptr;  // [B, Hkv]
  float* out = nullptr;              // [B, Hkv, C] fp32, contiguous

  int64_t batch = 0, num_kv_heads = 0, capacity = 0, head_dim = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_c = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_c = 0;
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;

  SlotScoreKind kind = SlotScoreKind::kKeyNorm;
  uint32_t seed = 0;  // kRandom: the op's int64 seed modulo 2^32
};

// update_scores_: in place on hist for slots i < lengths; slots at or past
// lengths are never written.
struct UpdateScoresParams {
  float* hist = nullptr;                  // [B, Hkv, C] fp32, read and written
  const float* fresh = nullptr;           // [B, Hkv, C] fp32 (the op's `new`)
  const int32_t* lengths = nullptr;       // [B, Hkv]
  const int32_t* hist_lengths = nullptr;  // [B, Hkv]

  int64_t batch = 0, num_kv_heads = 0, capacity = 0;
  int64_t hist_stride_b = 0, hist_stride_h = 0;
  int64_t fresh_stride_b = 0, fresh_stride_h = 0;
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;
  int64_t hist_lengths_stride_b = 0, hist_lengths_stride_h = 0;

  double decay = 0.0;  // finite; kept in double so the update matches the reference exactly
  UpdateMode mode = UpdateMode::kMax;
};

}  // namespace kvkern
