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

#include "cpu/dtype_dispatch.h"
#include "cpu/parallel.h"
#include "cpu/scorers_kernel.h"
#include "torch/scorer_args.h"

namespace kvkern::torch_glue {
namespace {

template <typename F>
void for_each_head(int64_t heads, int64_t grain, const F& fn) {
  if (heads > 0) torch::stable::parallel_for(0, heads, grain, fn);
}

// The per-slot scorers after their argument checks: CPU tensors, lengths in
// [0, C], a new [B, Hkv, C] fp32 output, then items(T{}, begin, end) over the
// (batch, kv head) items, T the cache's element type.
template <class P, class Items>
Tensor score_slots(const char* op, const Tensor& k_cache, P& p, const Items& items) {
  STD_TORCH_CHECK(k_cache.is_cpu(), op, ": expected CPU tensors here");
  check_host_lengths(op, p);
  Tensor out = torch::stable::new_empty(k_cache, {p.batch, p.num_kv_heads, p.capacity}, ScalarType::Float);
  p.out = static_cast<float*>(out.mutable_data_ptr());
  if (p.capacity == 0) return out;
  dispatch_cache_dtype(op, k_cache.scalar_type(), [&](auto tag) {
    for_each_head(p.batch * p.num_kv_heads, cpu::grain_for(p.capacity * p.head_dim),
                  [&](int64_t begin, int64_t end) { items(tag, begin, end); });
  });
  return out;
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
  return score_slots(op, k_cache, p, [&](auto tag, int64_t begin, int64_t end) {
    cpu::scorer::expected_attention_items<decltype(tag)>(p, begin, end);
  });
}

Tensor slot_scores_cpu(const Tensor& k_cache, const std::optional<Tensor>& v_cache,
                       const Tensor& lengths, std::string kind, int64_t seed) {
  const char* op = "kvkern::slot_scores";
  SlotScoresParams p = make_slot_scores_params(op, k_cache, v_cache, lengths, kind, seed);
  return score_slots(op, k_cache, p, [&](auto tag, int64_t begin, int64_t end) {
    cpu::scorer::slot_scores_items<decltype(tag)>(p, begin, end);
  });
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
  for_each_head(p.batch * p.num_kv_heads, cpu::grain_for(p.capacity), [&](int64_t begin, int64_t end) {
    cpu::scorer::update_scores_items(p, begin, end);
  });
}

}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("expected_attention_scores", TORCH_BOX(&kvkern::torch_glue::expected_attention_scores_cpu));
  m.impl("slot_scores", TORCH_BOX(&kvkern::torch_glue::slot_scores_cpu));
  m.impl("update_scores_", TORCH_BOX(&kvkern::torch_glue::update_scores_cpu));
}
