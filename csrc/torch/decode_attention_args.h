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
  check_rank(op, "lengths", lengths, 2, "[B, Hkv]");

  const ScalarType dt = q.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Half || dt == ScalarType::BFloat16,
                  op, ": q: expected dtype float16, bfloat16 or float32, got ", dtype_name(dt));
  check_dtype(op, "k_cache", k_cache, dt);
  check_dtype(op, "v_cache", v_cache, dt);
  check_dtype(op, "lengths", lengths, ScalarType::Int);

  check_same_device(op, "k_cache", k_cache, q, "q");
  check_same_device(op, "v_cache", v_cache, q, "q");
  check_same_device(op, "lengths", lengths, q, "q");

  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), C = k_cache.size(2);
  STD_TORCH_CHECK(is_supported_head_dim(D), op, ": q: expected head dim D in {64, 128, 256}, got ",
                  D, " (shape ", shape_str(q), ")");
  STD_TORCH_CHECK(Hkv > 0, op, ": k_cache: expected at least one kv head, got shape ",
                  shape_str(k_cache));
  STD_TORCH_CHECK(Hq > 0 && Hq % Hkv == 0, op, ": q: expected the number of query heads (", Hq,
                  ") to be a positive multiple of the number of kv heads (", Hkv, ")");
  check_dim_size(op, "k_cache", k_cache, 0, B, "batch B of q");
  check_dim_size(op, "k_cache", k_cache, 3, D, "head dim D of q");
  STD_TORCH_CHECK(v_cache.size(0) == B && v_cache.size(1) == Hkv && v_cache.size(2) == C &&
                      v_cache.size(3) == D,
                  op, ": v_cache: expected the shape of k_cache ", shape_str(k_cache), ", got ",
                  shape_str(v_cache));
  STD_TORCH_CHECK(lengths.size(0) == B && lengths.size(1) == Hkv, op,
                  ": lengths: expected shape [B, Hkv] = [", B, ", ", Hkv, "], got ",
                  shape_str(lengths));
  check_last_dim_contiguous(op, "q", q);
  check_last_dim_contiguous(op, "k_cache", k_cache);
  check_last_dim_contiguous(op, "v_cache", v_cache);

  if (log_w.has_value()) {
    const Tensor& w = *log_w;
    check_rank(op, "log_w", w, 3, "[B, Hkv, C]");
    check_dtype(op, "log_w", w, ScalarType::Float);
    check_same_device(op, "log_w", w, q, "q");
    STD_TORCH_CHECK(w.size(0) == B && w.size(1) == Hkv && w.size(2) == C, op,
                    ": log_w: expected shape [B, Hkv, C] = [", B, ", ", Hkv, ", ", C, "], got ",
                    shape_str(w));
    check_last_dim_contiguous(op, "log_w", w);
  }

  double scale = sm_scale.has_value() ? *sm_scale : 1.0 / std::sqrt(static_cast<double>(D));
  STD_TORCH_CHECK(std::isfinite(scale), op, ": sm_scale: expected a finite number, got ", scale);
  STD_TORCH_CHECK(num_splits >= 0 && block_n >= 0 && num_warps >= 0 && num_stages >= 0, op,
                  ": num_splits, block_n, num_warps, num_stages: expected >= 0 (0 = heuristic), got ",
                  num_splits, ", ", block_n, ", ", num_warps, ", ", num_stages);

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
