// SPDX-License-Identifier: Apache-2.0
// Checks decode_attention's arguments and turns them into DecodeAttentionParams.
// Shared by the CPU and CUDA glue, so both reject the same inputs the same way.
#pragma once

#include <kvkern/decode_attention_params.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"

namespace kvkern::torch_glue {

inline bool is_supported_head_dim(int64_t d) { return d == 64 || d == 128 || d == 256; }

// Checks shapes, dtypes, devices and strides (never tensor values: on CUDA that
// would need a host sync) and fills everything but the output pointers and the
// launch configuration.
inline DecodeAttentionParams make_decode_attention_params(
    const char* op, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
    const Tensor& lengths, const std::optional<Tensor>& log_w, std::optional<double> sm_scale,
    int64_t num_splits, int64_t block_n, int64_t num_warps, int64_t num_stages) {
  check_rank(op, "q", q, 3, "[B, Hq, D]");
  check_rank(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]");
  check_rank(op, "v_cache", v_cache, 4, "[B, Hkv, C, D]");

  check_cache_dtype(op, "q", q);
  check_dtype(op, "k_cache", k_cache, q.scalar_type());
  check_dtype(op, "v_cache", v_cache, q.scalar_type());

  check_same_device(op, "k_cache", k_cache, q, "q");
  check_same_device(op, "v_cache", v_cache, q, "q");

  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), C = k_cache.size(2);
  STD_TORCH_CHECK(is_supported_head_dim(D), op, ": q: expected head dim D in {64, 128, 256}, got ",
                  D, " (shape ", shape_str(q), ")");
  check_head_groups(op, "q", Hq, "k_cache", k_cache);
  check_dim_size(op, "k_cache", k_cache, 0, B, "batch B of q");
  check_dim_size(op, "k_cache", k_cache, 3, D, "head dim D of q");
  check_same_shape(op, "v_cache", v_cache, k_cache, "k_cache");
  check_head_ints(op, "lengths", lengths, B, Hkv, q, "q");
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k_cache", k_cache);
  check_last_dim_contiguous(op, "v_cache", v_cache);

  if (log_w.has_value())
    check_slot_tensor(op, "log_w", *log_w, ScalarType::Float, B, Hkv, C, q, "q");

  const double scale = resolve_sm_scale(op, sm_scale, D);
  check_launch_config(op, num_splits, block_n, num_warps, num_stages);

  DecodeAttentionParams p;
  p.q = q.const_data_ptr();
  p.k = k_cache.const_data_ptr();
  p.v = v_cache.const_data_ptr();
  p.lengths = static_cast<const int32_t*>(lengths.const_data_ptr());
  p.log_w = log_w.has_value() ? static_cast<const float*>(log_w->const_data_ptr()) : nullptr;
  p.batch = B;
  p.num_q_heads = Hq;
  p.num_kv_heads = Hkv;
  p.capacity = C;
  p.head_dim = D;
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.k_stride_b = k_cache.stride(0);
  p.k_stride_h = k_cache.stride(1);
  p.k_stride_c = k_cache.stride(2);
  p.v_stride_b = v_cache.stride(0);
  p.v_stride_h = v_cache.stride(1);
  p.v_stride_c = v_cache.stride(2);
  p.lengths_stride_b = lengths.stride(0);
  p.lengths_stride_h = lengths.stride(1);
  if (log_w.has_value()) {
    p.log_w_stride_b = log_w->stride(0);
    p.log_w_stride_h = log_w->stride(1);
  }
  p.sm_scale = static_cast<float>(scale);
  p.num_splits = static_cast<int>(num_splits);
  p.block_n = static_cast<int>(block_n);
  p.num_warps = static_cast<int>(num_warps);
  p.num_stages = static_cast<int>(num_stages);
  return p;
}

}  // namespace kvkern::torch_glue
