// SPDX-License-Identifier: Apache-2.0
// Checks the arguments of expected_attention_scores, slot_scores and
// update_scores_ and turns them into the Params of <kvkern/scorer_params.h>.
// Device-agnostic: shapes, dtypes, devices, strides and scalars only, never
// tensor values (on CUDA that would need a host sync); the CPU glue checks the
// lengths values itself. Shared by the CPU and CUDA glue, so both reject the
// same inputs the same way.
#pragma once

#include <kvkern/scorer_params.h>

#include <cmath>
#include <optional>
#include <string>

#include "checks.h"

namespace kvkern::torch_glue {

// k_cache [B, Hkv, C, D] and lengths [B, Hkv] int32 on k_cache's device.
inline void check_cache_and_lengths(const char* op, const Tensor& k_cache, const Tensor& lengths) {
  check_rank(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]");
  check_cache_dtype(op, "k_cache", k_cache);
  check_last_dim_contiguous(op, "k_cache", k_cache);
  check_head_ints(op, "lengths", lengths, k_cache.size(0), k_cache.size(1), k_cache, "k_cache");
}

// v_cache: the shape and dtype of k_cache, on its device.
inline void check_like_k(const char* op, const Tensor& v_cache, const Tensor& k_cache) {
  check_rank(op, "v_cache", v_cache, 4, "[B, Hkv, C, D]");
  STD_TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op,
                  ": v_cache: expected the dtype of k_cache (", dtype_name(k_cache.scalar_type()),
                  "), got ", dtype_name(v_cache.scalar_type()));
  check_same_device(op, "v_cache", v_cache, k_cache, "k_cache");
  check_same_shape(op, "v_cache", v_cache, k_cache, "k_cache");
  check_last_dim_contiguous(op, "v_cache", v_cache);
}

// The cache fields, which the scorers' Params name alike: k (and v when given),
// lengths, their strides and [B, Hkv, C, D].
template <class P>
void fill_cache_fields(P& p, const Tensor& k_cache, const std::optional<Tensor>& v_cache,
                       const Tensor& lengths) {
  p.k = k_cache.const_data_ptr();
  p.lengths = static_cast<const int32_t*>(lengths.const_data_ptr());
  p.batch = k_cache.size(0);
  p.num_kv_heads = k_cache.size(1);
  p.capacity = k_cache.size(2);
  p.head_dim = k_cache.size(3);
  p.k_stride_b = k_cache.stride(0);
  p.k_stride_h = k_cache.stride(1);
  p.k_stride_c = k_cache.stride(2);
  if (v_cache.has_value()) {
    p.v = v_cache->const_data_ptr();
    p.v_stride_b = v_cache->stride(0);
    p.v_stride_h = v_cache->stride(1);
    p.v_stride_c = v_cache->stride(2);
  }
  p.lengths_stride_b = lengths.stride(0);
  p.lengths_stride_h = lengths.stride(1);
}

inline ExpectedAttentionParams make_expected_attention_params(
    const char* op, const Tensor& mean, const std::optional<Tensor>& cov, const Tensor& k_cache,
    const std::optional<Tensor>& v_cache, const Tensor& lengths, int64_t n_sink, double epsilon,
    std::optional<double> sm_scale) {
  check_rank(op, "mean", mean, 3, "[B, Hq, D]");
  check_dtype(op, "mean", mean, ScalarType::Float);
  check_cache_and_lengths(op, k_cache, lengths);
  check_same_device(op, "mean", mean, k_cache, "k_cache");
  const int64_t B = k_cache.size(0), D = k_cache.size(3);
  const int64_t Hq = mean.size(1);
  check_head_groups(op, "mean", Hq, "k_cache", k_cache);
  STD_TORCH_CHECK(D > 0, op, ": k_cache: expected a head dim D >= 1, got shape ", shape_str(k_cache));
  STD_TORCH_CHECK(mean.size(0) == B && mean.size(2) == D, op,
                  ": mean: expected shape [B, Hq, D] with B = ", B, " and D = ", D,
                  " of k_cache, got ", shape_str(mean));
  check_last_dim_contiguous(op, "mean", mean);
  if (cov.has_value()) {
    const Tensor& s = *cov;
    check_rank(op, "cov", s, 4, "[B, Hq, D, D]");
    check_dtype(op, "cov", s, ScalarType::Float);
    check_same_device(op, "cov", s, k_cache, "k_cache");
    check_shape(op, "cov", s, "[B, Hq, D, D]", {B, Hq, D, D});
    check_last_dim_contiguous(op, "cov", s);
  }
  if (v_cache.has_value()) check_like_k(op, *v_cache, k_cache);
  STD_TORCH_CHECK(n_sink >= 0, op, ": n_sink: expected a value >= 0, got ", n_sink);
  STD_TORCH_CHECK(std::isfinite(epsilon), op, ": epsilon: expected a finite number, got ", epsilon);
  const double scale = resolve_sm_scale(op, sm_scale, D);

  ExpectedAttentionParams p;
  fill_cache_fields(p, k_cache, v_cache, lengths);
  p.mean = static_cast<const float*>(mean.const_data_ptr());
  p.num_q_heads = Hq;
  p.mean_stride_b = mean.stride(0);
  p.mean_stride_h = mean.stride(1);
  if (cov.has_value()) {
    p.cov = static_cast<const float*>(cov->const_data_ptr());
    p.cov_stride_b = cov->stride(0);
    p.cov_stride_h = cov->stride(1);
    p.cov_stride_r = cov->stride(2);
  }
  p.n_sink = n_sink;
  p.epsilon = static_cast<float>(epsilon);
  p.sm_scale = static_cast<float>(scale);
  return p;
}

inline SlotScoreKind parse_slot_score_kind(const char* op, const std::string& kind) {
  if (kind == "key_norm") return SlotScoreKind::kKeyNorm;
  if (kind == "value_norm") return SlotScoreKind::kValueNorm;
  if (kind == "keydiff") return SlotScoreKind::kKeyDiff;
  if (kind == "recency") return SlotScoreKind::kRecency;
  if (kind == "random") return SlotScoreKind::kRandom;
  STD_TORCH_CHECK(false, op,
                  ": kind: expected one of 'key_norm', 'value_norm', 'keydiff', 'recency', 'random', "
                  "got '", kind, "'");
  return SlotScoreKind::kKeyNorm;
}

inline SlotScoresParams make_slot_scores_params(const char* op, const Tensor& k_cache,
                                                const std::optional<Tensor>& v_cache,
                                                const Tensor& lengths, const std::string& kind,
                                                int64_t seed) {
  const SlotScoreKind k = parse_slot_score_kind(op, kind);
  check_cache_and_lengths(op, k_cache, lengths);
  STD_TORCH_CHECK(v_cache.has_value() || k != SlotScoreKind::kValueNorm, op,
                  ": v_cache: kind 'value_norm' needs v_cache, got None");
  if (v_cache.has_value()) check_like_k(op, *v_cache, k_cache);

  SlotScoresParams p;
  fill_cache_fields(p, k_cache, v_cache, lengths);
  p.kind = k;
  // Two's complement truncation: the reference's (seed + ...) & 0xFFFFFFFF.
  p.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed));
  return p;
}

inline UpdateMode parse_update_mode(const char* op, const std::string& mode) {
  if (mode == "max") return UpdateMode::kMax;
  if (mode == "ema") return UpdateMode::kEma;
  if (mode == "sum") return UpdateMode::kSum;
  STD_TORCH_CHECK(false, op, ": hist_mode: expected one of 'max', 'ema', 'sum', got '", mode, "'");
  return UpdateMode::kMax;
}

inline UpdateScoresParams make_update_scores_params(const char* op, const Tensor& hist,
                                                    const Tensor& fresh, const Tensor& lengths,
                                                    const Tensor& hist_lengths, double decay,
                                                    const std::string& mode) {
  const UpdateMode m = parse_update_mode(op, mode);
  check_rank(op, "hist", hist, 3, "[B, Hkv, C]");
  check_dtype(op, "hist", hist, ScalarType::Float);
  check_last_dim_contiguous(op, "hist", hist);
  const int64_t B = hist.size(0), Hkv = hist.size(1), C = hist.size(2);
  check_rank(op, "new", fresh, 3, "[B, Hkv, C]");
  check_dtype(op, "new", fresh, ScalarType::Float);
  check_same_device(op, "new", fresh, hist, "hist");
  check_same_shape(op, "new", fresh, hist, "hist");
  check_last_dim_contiguous(op, "new", fresh);
  check_head_ints(op, "lengths", lengths, B, Hkv, hist, "hist");
  check_head_ints(op, "hist_lengths", hist_lengths, B, Hkv, hist, "hist");
  STD_TORCH_CHECK(std::isfinite(decay), op, ": decay: expected a finite number, got ", decay);

  UpdateScoresParams p;
  p.hist = static_cast<float*>(hist.mutable_data_ptr());
  p.fresh = static_cast<const float*>(fresh.const_data_ptr());
  p.lengths = static_cast<const int32_t*>(lengths.const_data_ptr());
  p.hist_lengths = static_cast<const int32_t*>(hist_lengths.const_data_ptr());
  p.batch = B;
  p.num_kv_heads = Hkv;
  p.capacity = C;
  p.hist_stride_b = hist.stride(0);
  p.hist_stride_h = hist.stride(1);
  p.fresh_stride_b = fresh.stride(0);
  p.fresh_stride_h = fresh.stride(1);
  p.lengths_stride_b = lengths.stride(0);
  p.lengths_stride_h = lengths.stride(1);
  p.hist_lengths_stride_b = hist_lengths.stride(0);
  p.hist_lengths_stride_h = hist_lengths.stride(1);
  p.decay = decay;
  p.mode = m;
  return p;
}

}  // namespace kvkern::torch_glue
