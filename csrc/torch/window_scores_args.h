// SPDX-License-Identifier: Apache-2.0
// Checks window_scores' arguments and turns them into WindowScoresParams.
// Device-agnostic: shared by the CPU glue and the CUDA glue, so both reject the
// same inputs with the same words. The device *type* is the caller's business;
// tensor values (lengths) are never read here (on CUDA that needs a host sync).
#pragma once

#include <kvkern/eviction_params.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "checks.h"

namespace kvkern::torch_glue {
namespace window_args {

// Parses a string option against `names` (in enum order); the error lists them.
template <typename Enum, size_t N>
Enum parse_choice(const char* op, const char* arg, std::string_view got, const char* const (&names)[N]) {
  for (size_t i = 0; i < N; ++i)
    if (got == names[i]) return static_cast<Enum>(i);
  std::string list;
  for (size_t i = 0; i < N; ++i) list += (i ? ", " : "") + std::string(names[i]);
  STD_TORCH_CHECK(false, op, ": ", arg, ": expected one of ", list, ", got '", std::string(got), "'");
  return static_cast<Enum>(0);
}

}  // namespace window_args

// Everything but the output: shapes, dtypes, same device, strides, options.
// Any head dim D >= 1 is accepted (the math has no tile constraint on D).
inline WindowScoresParams make_window_scores_params(
    const char* op, const Tensor& q_win, const Tensor& k_cache, const Tensor& lengths,
    std::optional<double> sm_scale, std::string_view query_reduce, std::string_view group_reduce,
    bool normalize, std::string_view pool, int64_t pool_kernel) {
  check_rank(op, "q_win", q_win, 4, "[B, Hq, W, D]");
  check_rank(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]");
  check_cache_dtype(op, "q_win", q_win);
  check_dtype(op, "k_cache", k_cache, q_win.scalar_type());
  check_same_device(op, "k_cache", k_cache, q_win, "q_win");

  const int64_t B = q_win.size(0), Hq = q_win.size(1), W = q_win.size(2), D = q_win.size(3);
  const int64_t Hkv = k_cache.size(1), C = k_cache.size(2);
  STD_TORCH_CHECK(D >= 1, op, ": q_win: expected head dim D >= 1, got shape ", shape_str(q_win));
  check_head_groups(op, "q_win", Hq, "k_cache", k_cache);
  check_dim_size(op, "k_cache", k_cache, 0, B, "batch B of q_win");
  check_dim_size(op, "k_cache", k_cache, 3, D, "head dim D of q_win");
  check_head_ints(op, "lengths", lengths, B, Hkv, q_win, "q_win");
  STD_TORCH_CHECK(W >= 1, op, ": q_win: expected a window of W >= 1 queries, got shape ",
                  shape_str(q_win));
  STD_TORCH_CHECK(W <= C, op, ": q_win: expected a window W (", W,
                  ") no larger than the cache capacity C (", C, ")");
  check_last_dim_contiguous(op, "q_win", q_win);
  check_last_dim_contiguous(op, "k_cache", k_cache);

  static const char* const kQueryReduce[] = {"mean", "sum"};
  static const char* const kGroupReduce[] = {"mean", "max", "mean_all", "max_per_query"};
  static const char* const kPool[] = {"none", "avg", "max"};
  WindowScoresParams p;
  p.query_reduce = window_args::parse_choice<QueryReduce>(op, "query_reduce", query_reduce, kQueryReduce);
  p.group_reduce = window_args::parse_choice<GroupReduce>(op, "group_reduce", group_reduce, kGroupReduce);
  p.pool = window_args::parse_choice<Pool>(op, "pool", pool, kPool);
  STD_TORCH_CHECK(pool_kernel >= 1 && pool_kernel % 2 == 1 && pool_kernel <= (int64_t{1} << 30), op,
                  ": pool_kernel: expected an odd number >= 1, got ", pool_kernel);

  const double scale = resolve_sm_scale(op, sm_scale, D);

  p.q_win = q_win.const_data_ptr();
  p.k = k_cache.const_data_ptr();
  p.lengths = static_cast<const int32_t*>(lengths.const_data_ptr());
  p.batch = B;
  p.num_q_heads = Hq;
  p.num_kv_heads = Hkv;
  p.window = W;
  p.capacity = C;
  p.head_dim = D;
  p.q_stride_b = q_win.stride(0);
  p.q_stride_h = q_win.stride(1);
  p.q_stride_t = q_win.stride(2);
  p.k_stride_b = k_cache.stride(0);
  p.k_stride_h = k_cache.stride(1);
  p.k_stride_c = k_cache.stride(2);
  p.lengths_stride_b = lengths.stride(0);
  p.lengths_stride_h = lengths.stride(1);
  p.sm_scale = static_cast<float>(scale);
  p.normalize = normalize;
  p.pool_kernel = static_cast<int>(pool_kernel);
  return p;
}

// The same, plus the output: out [B, Hkv, C] float32, contiguous, on q_win's device.
inline WindowScoresParams make_window_scores_params(
    const char* op, const Tensor& q_win, const Tensor& k_cache, const Tensor& lengths,
    std::optional<double> sm_scale, std::string_view query_reduce, std::string_view group_reduce,
    bool normalize, std::string_view pool, int64_t pool_kernel, Tensor& out) {
  WindowScoresParams p = make_window_scores_params(op, q_win, k_cache, lengths, sm_scale, query_reduce,
                                                   group_reduce, normalize, pool, pool_kernel);
  check_rank(op, "out", out, 3, "[B, Hkv, C]");
  check_dtype(op, "out", out, ScalarType::Float);
  check_same_device(op, "out", out, q_win, "q_win");
  check_shape(op, "out", out, "[B, Hkv, C]", {p.batch, p.num_kv_heads, p.capacity});
  STD_TORCH_CHECK(out.is_contiguous(), op, ": out: expected a contiguous tensor");
  p.out = static_cast<float*>(out.mutable_data_ptr());
  return p;
}
}  // namespace kvkern::torch_glue
