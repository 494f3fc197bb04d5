// SPDX-License-Identifier: Apache-2.0
// Checks the arguments of select_keep, compact_, evict_ and allocate_head_budgets
// and turns them into the framework-free parameter structs. Device-agnostic: the
// checks read shapes, dtypes, devices and strides only, never tensor values (on
// CUDA that would need a host sync), so the CPU and CUDA glue share them. The
// value checks that are free on CPU live in the CPU glue.
#pragma once

#include <kvkern/eviction_params.h>
#include <kvkern/head_budget_params.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "checks.h"

namespace kvkern::torch_glue {

inline void check_count(const char* op, const char* name, int64_t value) {
  STD_TORCH_CHECK(value >= 0, op, ": ", name, ": expected a value >= 0, got ", value);
}

inline void check_selection_counts(const char* op, int64_t budget, int64_t n_sink, int64_t n_recent) {
  check_count(op, "budget", budget);
  check_count(op, "n_sink", n_sink);
  check_count(op, "n_recent", n_recent);
}

// scores [B, Hkv, C] float32, last dim contiguous.
inline void check_scores(const char* op, const Tensor& scores) {
  check_rank(op, "scores", scores, 3, "[B, Hkv, C]");
  check_dtype(op, "scores", scores, ScalarType::Float);
  check_last_dim_contiguous(op, "scores", scores);
}

// 1-D int32 tensor read as a plain array (stride 1).
inline void check_int_vector(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                             const char* ref_name, const char* layout) {
  check_rank(op, name, t, 1, layout);
  check_dtype(op, name, t, ScalarType::Int);
  check_same_device(op, name, t, ref, ref_name);
  STD_TORCH_CHECK(t.size(0) <= 1 || t.stride(0) == 1, op, ": ", name,
                  ": expected a contiguous tensor, got stride ", t.stride(0));
}

// Everything of the selection's arguments but the scores (and the outputs keep,
// new_lengths) for a [B, Hkv, C] cache whose shape and device come from `ref`
// (scores, or in score_evict_, where the scores are made inside, k_cache).
inline SelectParams make_select_params(
    const char* op, int64_t B, int64_t H, int64_t C, const Tensor& ref, const char* ref_name,
    const Tensor& lengths, const std::optional<Tensor>& positions,
    const std::optional<Tensor>& budgets, int64_t budget, int64_t n_sink, int64_t n_recent,
    const std::optional<Tensor>& protect_ranges, const std::optional<Tensor>& keep_mask,
    const std::optional<Tensor>& segment_cuts, const std::optional<Tensor>& segment_min) {
  check_head_ints(op, "lengths", lengths, B, H, ref, ref_name);
  check_selection_counts(op, budget, n_sink, n_recent);
  STD_TORCH_CHECK(C <= INT32_MAX, op, ": ", ref_name, ": expected a capacity C below 2^31, got ", C);

  SelectParams p;
  p.lengths = static_cast<const int32_t*>(lengths.const_data_ptr());
  p.batch = B;
  p.num_kv_heads = H;
  p.capacity = C;
  p.lengths_stride_b = lengths.stride(0);
  p.lengths_stride_h = lengths.stride(1);
  p.budget = budget;
  p.n_sink = n_sink;
  p.n_recent = n_recent;

  if (positions.has_value()) {
    check_slot_tensor(op, "positions", *positions, ScalarType::Int, B, H, C, ref, ref_name);
    p.positions = static_cast<const int32_t*>(positions->const_data_ptr());
    p.positions_stride_b = positions->stride(0);
    p.positions_stride_h = positions->stride(1);
  }
  if (budgets.has_value()) {
    const Tensor& t = *budgets;
    check_head_ints(op, "budgets", t, B, H, ref, ref_name);
    p.budgets = static_cast<const int32_t*>(t.const_data_ptr());
    p.budgets_stride_b = t.stride(0);
    p.budgets_stride_h = t.stride(1);
  }
  if (protect_ranges.has_value()) {
    const Tensor& t = *protect_ranges;
    STD_TORCH_CHECK(t.dim() == 2 || t.dim() == 3, op,
                    ": protect_ranges: expected a 2-D tensor [R, 2] or a 3-D tensor [B, R, 2], got a ",
                    t.dim(), "-D tensor of shape ", shape_str(t));
    check_dtype(op, "protect_ranges", t, ScalarType::Int);
    check_same_device(op, "protect_ranges", t, ref, ref_name);
    const bool batched = t.dim() == 3;
    STD_TORCH_CHECK(t.size(t.dim() - 1) == 2 && (!batched || t.size(0) == B), op,
                    ": protect_ranges: expected shape [R, 2] or [B, R, 2] with B = ", B, ", got ",
                    shape_str(t));
    const int64_t R = t.size(t.dim() - 2);
    // Each batch element's [R, 2] block is read as one array of (start, end) pairs.
    STD_TORCH_CHECK(t.stride(t.dim() - 1) == 1 && (R <= 1 || t.stride(t.dim() - 2) == 2), op,
                    ": protect_ranges: expected contiguous [R, 2] rows (strides 2 and 1), got strides ",
                    t.stride(t.dim() - 2), " and ", t.stride(t.dim() - 1));
    p.protect_ranges = static_cast<const int32_t*>(t.const_data_ptr());
    p.num_ranges = R;
    p.ranges_stride_b = batched ? t.stride(0) : 0;
  }
  if (keep_mask.has_value()) {
    check_slot_tensor(op, "keep_mask", *keep_mask, ScalarType::Bool, B, H, C, ref, ref_name);
    p.keep_mask = static_cast<const bool*>(keep_mask->const_data_ptr());
    p.keep_mask_stride_b = keep_mask->stride(0);
    p.keep_mask_stride_h = keep_mask->stride(1);
  }
  if (segment_cuts.has_value()) {
    check_int_vector(op, "segment_cuts", *segment_cuts, ref, ref_name, "[S - 1]");
    // An empty tensor may have no storage; one segment still means "segment mode"
    // (quotas or minima), so point at something that is never read.
    static const int32_t kNoCuts = 0;
    p.segment_cuts = segment_cuts->numel() > 0
                         ? static_cast<const int32_t*>(segment_cuts->const_data_ptr())
                         : &kNoCuts;
    p.num_segments = segment_cuts->size(0) + 1;
  }
  if (segment_min.has_value()) {
    STD_TORCH_CHECK(segment_cuts.has_value(), op,
                    ": segment_min: expected segment_cuts as well (minima are per segment), got "
                    "segment_cuts=None");
    check_int_vector(op, "segment_min", *segment_min, ref, ref_name, "[S]");
    STD_TORCH_CHECK(segment_min->size(0) == p.num_segments, op,
                    ": segment_min: expected shape [S] = [", p.num_segments,
                    "] (one more than segment_cuts), got ", shape_str(*segment_min));
    p.segment_min = static_cast<const int32_t*>(segment_min->const_data_ptr());
  }
  return p;
}

// Fills everything but the outputs (keep, new_lengths).
inline SelectParams make_select_params(
    const char* op, const Tensor& scores, const Tensor& lengths,
    const std::optional<Tensor>& positions, const std::optional<Tensor>& budgets, int64_t budget,
    int64_t n_sink, int64_t n_recent, const std::optional<Tensor>& protect_ranges,
    const std::optional<Tensor>& keep_mask, const std::optional<Tensor>& segment_cuts,
    const std::optional<Tensor>& segment_min) {
  check_scores(op, scores);
  SelectParams p = make_select_params(op, scores.size(0), scores.size(1), scores.size(2), scores,
                                      "scores", lengths, positions, budgets, budget, n_sink,
                                      n_recent, protect_ranges, keep_mask, segment_cuts,
                                      segment_min);
  p.scores = static_cast<const float*>(scores.const_data_ptr());
  p.scores_stride_b = scores.stride(0);
  p.scores_stride_h = scores.stride(1);
  return p;
}

// Fills everything of CompactParams; the kernel moves k and v rows as raw bytes.
inline CompactParams make_compact_params(const char* op, const Tensor& k_cache,
                                         const Tensor& v_cache, const Tensor& lengths,
                                         const Tensor& keep, const std::optional<Tensor>& positions,
                                         const std::optional<Tensor>& hist,
                                         const std::optional<Tensor>& log_w) {
  check_rank(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]");
  check_rank(op, "v_cache", v_cache, 4, "[B, Hkv, C, D]");
  check_cache_dtype(op, "k_cache", k_cache);
  check_dtype(op, "v_cache", v_cache, k_cache.scalar_type());
  check_same_device(op, "v_cache", v_cache, k_cache, "k_cache");
  const int64_t B = k_cache.size(0), H = k_cache.size(1), C = k_cache.size(2),
                D = k_cache.size(3);
  check_same_shape(op, "v_cache", v_cache, k_cache, "k_cache");
  check_last_dim_contiguous(op, "k_cache", k_cache);
  check_last_dim_contiguous(op, "v_cache", v_cache);
  check_head_ints(op, "lengths", lengths, B, H, k_cache, "k_cache");
  check_slot_tensor(op, "keep", keep, ScalarType::Bool, B, H, C, k_cache, "k_cache");

  CompactParams p;
  p.k = k_cache.mutable_data_ptr();
  p.v = v_cache.mutable_data_ptr();
  p.lengths = static_cast<int32_t*>(lengths.mutable_data_ptr());
  p.keep = static_cast<const bool*>(keep.const_data_ptr());
  p.batch = B;
  p.num_kv_heads = H;
  p.capacity = C;
  p.head_dim = D;
  p.k_stride_b = k_cache.stride(0);
  p.k_stride_h = k_cache.stride(1);
  p.k_stride_c = k_cache.stride(2);
  p.v_stride_b = v_cache.stride(0);
  p.v_stride_h = v_cache.stride(1);
  p.v_stride_c = v_cache.stride(2);
  p.lengths_stride_b = lengths.stride(0);
  p.lengths_stride_h = lengths.stride(1);
  p.keep_stride_b = keep.stride(0);
  p.keep_stride_h = keep.stride(1);
  if (positions.has_value()) {
    check_slot_tensor(op, "positions", *positions, ScalarType::Int, B, H, C, k_cache, "k_cache");
    p.positions = static_cast<int32_t*>(positions->mutable_data_ptr());
    p.positions_stride_b = positions->stride(0);
    p.positions_stride_h = positions->stride(1);
  }
  if (hist.has_value()) {
    check_slot_tensor(op, "hist", *hist, ScalarType::Float, B, H, C, k_cache, "k_cache");
    p.hist = static_cast<float*>(hist->mutable_data_ptr());
    p.hist_stride_b = hist->stride(0);
    p.hist_stride_h = hist->stride(1);
  }
  if (log_w.has_value()) {
    check_slot_tensor(op, "log_w", *log_w, ScalarType::Float, B, H, C, k_cache, "k_cache");
    p.log_w = static_cast<float*>(log_w->mutable_data_ptr());
    p.log_w_stride_b = log_w->stride(0);
    p.log_w_stride_h = log_w->stride(1);
  }
  return p;
}

// evict_: the selection reads scores [B, Hkv, C] of the cache's shape.
inline void check_scores_match_cache(const char* op, const Tensor& scores, const Tensor& k_cache) {
  check_rank(op, "scores", scores, 3, "[B, Hkv, C]");
  STD_TORCH_CHECK(scores.size(0) == k_cache.size(0) && scores.size(1) == k_cache.size(1) &&
                      scores.size(2) == k_cache.size(2),
                  op, ": scores: expected shape [B, Hkv, C] = [", k_cache.size(0), ", ",
                  k_cache.size(1), ", ", k_cache.size(2), "] (from k_cache), got ", shape_str(scores));
  check_same_device(op, "scores", scores, k_cache, "k_cache");
}

// score_evict_'s own options (the pieces check the rest).
inline void check_score_evict_options(const char* op, const std::optional<Tensor>& hist,
                                      const std::optional<Tensor>& hist_lengths,
                                      double mix_lambda) {
  STD_TORCH_CHECK(hist.has_value() == hist_lengths.has_value(), op,
                  ": hist and hist_lengths: expected both or neither, got ",
                  hist ? "hist" : "no hist", " and ", hist_lengths ? "hist_lengths" : "no hist_lengths");
  STD_TORCH_CHECK(mix_lambda >= 0.0 && mix_lambda <= 1.0, op,
                  ": mix_lambda: expected a value in [0, 1], got ", mix_lambda);
}

// Fills everything but the output.
inline HeadBudgetParams make_head_budget_params(const char* op, const Tensor& scores,
                                                const Tensor& lengths, int64_t budget,
                                                double safeguard, int64_t n_sink,
                                                int64_t n_recent) {
  check_scores(op, scores);
  const int64_t B = scores.size(0), H = scores.size(1), C = scores.size(2);
  check_head_ints(op, "lengths", lengths, B, H, scores, "scores");
  check_selection_counts(op, budget, n_sink, n_recent);
  STD_TORCH_CHECK(safeguard >= 0.0 && safeguard <= 1.0, op,  // false for NaN
                  ": safeguard: expected a fraction in [0, 1], got ", safeguard);
  STD_TORCH_CHECK(C <= INT32_MAX, op, ": scores: expected a capacity C below 2^31, got ", C);

  HeadBudgetParams p;
  p.scores = static_cast<const float*>(scores.const_data_ptr());
  p.lengths = static_cast<const int32_t*>(lengths.const_data_ptr());
  p.batch = B;
  p.num_kv_heads = H;
  p.capacity = C;
  p.scores_stride_b = scores.stride(0);
  p.scores_stride_h = scores.stride(1);
  p.lengths_stride_b = lengths.stride(0);
  p.lengths_stride_h = lengths.stride(1);
  p.budget = budget;
  // As the reference: int(budget * safeguard), truncated in double precision.
  // Capped at C, which changes nothing (a head keeps at most its length) but keeps
  // the conversion defined.
  const double n_safe = static_cast<double>(budget) * safeguard;
  p.n_safe = n_safe >= static_cast<double>(C) ? C : static_cast<int64_t>(n_safe);
  p.n_sink = n_sink;
  p.n_recent = n_recent;
  return p;
}

}  // namespace kvkern::torch_glue
