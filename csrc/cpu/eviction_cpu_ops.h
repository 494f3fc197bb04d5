// SPDX-License-Identifier: Apache-2.0
// The CPU implementations of the score-and-evict ops, as plain C++ functions, so
// the fused score_evict_ composes them without a trip through the dispatcher
// (which would turn their errors into an anonymous "API call failed").
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace kvkern::torch_glue {

using torch::stable::Tensor;

Tensor window_scores_cpu(const Tensor& q_win, const Tensor& k_cache, const Tensor& lengths,
                         std::optional<double> sm_scale, std::string query_reduce, std::string group_reduce,
                         bool normalize, std::string pool, int64_t pool_kernel);
Tensor key_redundancy_cpu(const Tensor& k_cache, const Tensor& lengths, int64_t n_window, double threshold);
void update_scores_cpu(Tensor hist, const Tensor& fresh, const Tensor& lengths, const Tensor& hist_lengths,
                       double decay, std::string mode);
Tensor evict_cpu(const Tensor& k_cache, const Tensor& v_cache, const Tensor& lengths,
                 const std::optional<Tensor>& positions, const Tensor& scores, const std::optional<Tensor>& budgets,
                 int64_t budget, int64_t n_sink, int64_t n_recent, const std::optional<Tensor>& protect_ranges,
                 const std::optional<Tensor>& keep_mask, const std::optional<Tensor>& segment_cuts,
                 const std::optional<Tensor>& segment_min, const std::optional<Tensor>& hist,
                 const std::optional<Tensor>& log_w);

}  // namespace kvkern::torch_glue
