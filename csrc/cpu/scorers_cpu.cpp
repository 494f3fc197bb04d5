// SPDX-License-Identifier: Apache-2.0
// CPU glue for expected_attention_scores, slot_scores and update_scores_:
// checks (shared with the CUDA glue, plus the lengths values, which are free to
// read here), output allocation, and the parallel loop over (batch, kv head).

#include <torch/csrc/stable/library.h>

#include "cpu/eviction_cpu_ops.h"
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <optional>
#include <string>

#include "cpu/scorers_kernel.h"
#include "torch/scorer_args.h"

namespace kvkern::torch_glue {
namespace {

template <typename F>
void for_each_head(int64_t heads, int64_t grain, const F& fn) {
  if (heads > 0) torch::stable::parallel_for(0, heads, grain, fn);
}

Tensor new_scores(const Tensor& like, int64_t B, int64_t H, int64_t C) {
  return torch::stable::new_empty(like, {B, H, C}, ScalarType::Float);
}

}  // namespace

// The op implementations: external linkage, declared in cpu/eviction_cpu_ops.h.
Tensor expected_attention_scores_cpu(const Tensor& mean, const std::optional<Tensor>& cov,
                                     const Tensor& k_cache, const std::optional<Tensor>& v_cache,
                                     const Tensor& lengths, int64_t n_sink, double epsilon,
                                     std::optional<double> sm_scale) {
  const char* op = "kvkern::expected_attention_scores";
  ExpectedAttentionParams p = make_expected_attention_params(op, mean, cov, k_cache, v_cache, lengths,
                                                             n_sink, epsilon, sm_scale);
  STD_TORCH_CHECK(k_cache.is_cpu(), op, ": expected CPU tensors here");
  check_host_lengths(op, p);
  Tensor out = new_scores(k_cache, p.batch, p.num_kv_heads, p.capacity);
  p.out = static_cast<float*>(out.mutable_data_ptr());
  if (p.capacity == 0) return out;
  auto body = [&](auto tag) {
    using T = decltype(tag);
    for_each_head(p.batch * p.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      cpu::scorer::expected_attention_items<T>(p, begin, end);
    });
  };
  switch (k_cache.scalar_type()) {
    case ScalarType::Float: body(float{}); break;
    case ScalarType::Half: body(cpu::Half{}); break;
    case ScalarType::BFloat16: body(cpu::BFloat16{}); break;
    default: STD_TORCH_CHECK(false, op, ": unreachable dtype");
  }
  return out;
}

Tensor slot_scores_cpu(const Tensor& k_cache, const std::optional<Tensor>& v_cache,
                       const Tensor& lengths, std::string kind, int64_t seed) {
  const char* op = "kvkern::slot_scores";
  SlotScoresParams p = make_slot_scores_params(op, k_cache, v_cache, lengths, kind, seed);
  STD_TORCH_CHECK(k_cache.is_cpu(), op, ": expected CPU tensors here");
  check_host_lengths(op, p);
  Tensor out = new_scores(k_cache, p.batch, p.num_kv_heads, p.capacity);
  p.out = static_cast<float*>(out.mutable_data_ptr());
  if (p.capacity == 0) return out;
  auto body = [&](auto tag) {
    using T = decltype(tag);
    for_each_head(p.batch * p.num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      cpu::scorer::slot_scores_items<T>(p, begin, end);
    });
  };
  switch (k_cache.scalar_type()) {
    case ScalarType::Float: body(float{}); break;
    case ScalarType::Half: body(cpu::Half{}); break;
    case ScalarType::BFloat16: body(cpu::BFloat16{}); break;
    default: STD_TORCH_CHECK(false, op, ": unreachable dtype");
  }
  return out;
}

void update_scores_cpu(Tensor hist, const Tensor& fresh, const Tensor& lengths,
                       const Tensor& hist_lengths, double decay, std::string mode) {
  const char* op = "kvkern::update_scores_";
  UpdateScoresParams p = make_update_scores_params(op, hist, fresh, lengths, hist_lengths, decay, mode);
  STD_TORCH_CHECK(hist.is_cpu(), op, ": expected CPU tensors here");
  // Both checked before anything is written: a bad call leaves hist as it was.
  check_host_lengths(op, p);
  check_host_lengths(op, "hist_lengths", p.hist_lengths, p.hist_lengths_stride_b,
                     p.hist_lengths_stride_h, p.batch, p.num_kv_heads, p.capacity);
  if (p.capacity == 0) return;
  // Rows are short and cheap: several heads per task.
  for_each_head(p.batch * p.num_kv_heads, 16, [&](int64_t begin, int64_t end) {
    cpu::scorer::update_scores_items(p, begin, end);
  });
}

}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("expected_attention_scores", TORCH_BOX(&kvkern::torch_glue::expected_attention_scores_cpu));
  m.impl("slot_scores", TORCH_BOX(&kvkern::torch_glue::slot_scores_cpu));
  m.impl("update_scores_", TORCH_BOX(&kvkern::torch_glue::update_scores_cpu));
}
