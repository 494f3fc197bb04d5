// SPDX-License-Identifier: Apache-2.0
// CPU glue for score_evict_, the fused decode-time eviction (kvkern/reference.py
// score_evict_): window scores -> global-score update -> pooling -> redundancy mix
// -> protect / select / compact, one head's work never leaving the CPU kernels.
//
// The global-score update runs on a copy of hist that replaces hist only after
// evict_ succeeded, so a rejected call (evict_ validates everything before it
// writes) leaves every argument as it was. Heads with L <= budget are left
// completely untouched: their update region is empty and selection keeps them.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "cpu/eviction_cpu_ops.h"
#include "torch/evict_args.h"

namespace kvkern::torch_glue {
namespace {

// Pooling over the candidate slots [0, region) of one head, as reference.pool_scores:
// avg counts the zero padding (KVPress's count_include_pad), max ignores it.
void pool_row(const float* in, float* out, int64_t region, bool avg, int64_t kernel) {
  const int64_t r = kernel / 2;
  for (int64_t i = 0; i < region; ++i) {
    const int64_t lo = std::max<int64_t>(0, i - r), hi = std::min<int64_t>(region - 1, i + r);
    if (avg) {
      double sum = 0.0;
      for (int64_t t = lo; t <= hi; ++t) sum += in[t];
      out[i] = static_cast<float>(sum / static_cast<double>(kernel));
    } else {
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t t = lo; t <= hi; ++t) best = std::max(best, in[t]);
      out[i] = best;
    }
  }
}

Tensor score_evict_cpu(const Tensor& q_win, const Tensor& k_cache, const Tensor& v_cache, const Tensor& lengths,
                       const std::optional<Tensor>& positions, const std::optional<Tensor>& budgets, int64_t budget,
                       int64_t n_sink, int64_t n_recent, std::optional<double> sm_scale, std::string query_reduce,
                       std::string group_reduce, bool normalize, std::string pool, int64_t pool_kernel,
                       const std::optional<Tensor>& hist, const std::optional<Tensor>& hist_lengths, double decay,
                       std::string hist_mode, double mix_lambda, double redundancy_threshold,
                       const std::optional<Tensor>& protect_ranges, const std::optional<Tensor>& keep_mask,
                       const std::optional<Tensor>& log_w) {
  const char* op = "kvkern::score_evict_";
  check_rank(op, "q_win", q_win, 4, "[B, Hq, W, D]");
  check_rank(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]");
  check_score_evict_options(op, hist, hist_lengths, mix_lambda);
  STD_TORCH_CHECK(budget >= 0, op, ": budget: expected an int >= 0, got ", budget);
  // Read below (before the pieces check them): lengths and budgets [B, Hkv] int32 on the CPU.
  check_head_ints(op, "lengths", lengths, k_cache.size(0), k_cache.size(1), k_cache, "k_cache");
  if (budgets) check_head_ints(op, "budgets", *budgets, k_cache.size(0), k_cache.size(1), k_cache, "k_cache");
  STD_TORCH_CHECK(q_win.is_cpu() && lengths.is_cpu(), op, ": expected CPU tensors here");
  check_host_lengths(op, "lengths", static_cast<const int32_t*>(lengths.const_data_ptr()), lengths.stride(0),
                     lengths.stride(1), k_cache.size(0), k_cache.size(1), k_cache.size(2));
  const int64_t W = q_win.size(2);
  const bool pooled = pool != "none" && pool_kernel != 1;

  // Scores of the window (pooling inside the kernel when there is no history to merge first).
  Tensor scores = window_scores_cpu(q_win, k_cache, lengths, sm_scale, query_reduce, group_reduce, normalize,
                                    hist ? std::string("none") : pool, hist ? 1 : pool_kernel);
  const int64_t B = scores.size(0), H = scores.size(1), C = scores.size(2);

  // Per head: the candidate region [0, L - W), and whether the head is over budget at all.
  std::vector<int64_t> region(B * H, 0);
  std::vector<uint8_t> active(B * H, 0);
  Tensor region_t = torch::stable::new_empty(lengths, {B, H}, ScalarType::Int);
  int32_t* region_p = static_cast<int32_t*>(region_t.mutable_data_ptr());
  {
    const int32_t* L = static_cast<const int32_t*>(lengths.data_ptr());
    const int32_t* K = budgets ? static_cast<const int32_t*>(budgets->data_ptr()) : nullptr;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < H; ++j) {
        const int64_t len = L[b * lengths.stride(0) + j * lengths.stride(1)];
        const int64_t lim = K ? K[b * budgets->stride(0) + j * budgets->stride(1)] : budget;
        active[b * H + j] = len > lim;
        region[b * H + j] = std::max<int64_t>(len - W, 0);
        region_p[b * H + j] = active[b * H + j] ? static_cast<int32_t>(region[b * H + j]) : 0;
      }
  }

  std::optional<Tensor> new_hist;
  float* s = static_cast<float*>(scores.mutable_data_ptr());
  if (hist) {
    new_hist = torch::stable::clone(*hist);
    update_scores_cpu(*new_hist, scores, region_t, *hist_lengths, decay, hist_mode);
    // The merged global score replaces the window score on the candidate slots, then pools.
    const float* g = static_cast<const float*>(new_hist->data_ptr());
    const int64_t gb = new_hist->stride(0), gh = new_hist->stride(1), gc = new_hist->stride(2);
    std::vector<float> row(C);
    for (int64_t h = 0; h < B * H; ++h) {
      if (!active[h]) continue;
      float* sh = s + h * C;
      const float* gh_row = g + (h / H) * gb + (h % H) * gh;
      for (int64_t i = 0; i < region[h]; ++i) sh[i] = gh_row[i * gc];
      if (pooled) {
        std::copy(sh, sh + region[h], row.begin());
        pool_row(row.data(), sh, region[h], pool == "avg", pool_kernel);
      }
    }
  }
  if (mix_lambda < 1.0) {
    Tensor red = key_redundancy_cpu(k_cache, lengths, W, redundancy_threshold);
    const float* r = static_cast<const float*>(red.data_ptr());
    const float a = static_cast<float>(mix_lambda), c = static_cast<float>(1.0 - mix_lambda);
    for (int64_t i = 0; i < B * H * C; ++i) s[i] = a * s[i] - c * r[i];
  }

  Tensor keep = evict_cpu(k_cache, v_cache, lengths, positions, scores, budgets, budget, n_sink,
                          std::max<int64_t>(n_recent, W), protect_ranges, keep_mask, std::nullopt, std::nullopt,
                          new_hist, log_w);
  if (hist) {
    torch::stable::copy_(const_cast<Tensor&>(*hist), *new_hist);
    const int32_t* L = static_cast<const int32_t*>(lengths.data_ptr());
    int32_t* hl = static_cast<int32_t*>(hist_lengths->mutable_data_ptr());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < H; ++j)
        if (active[b * H + j])
          hl[b * hist_lengths->stride(0) + j * hist_lengths->stride(1)] = static_cast<int32_t>(
              std::max<int64_t>(L[b * lengths.stride(0) + j * lengths.stride(1)] - W, 0));
  }
  return keep;
}

}  // namespace
}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("score_evict_", TORCH_BOX(&kvkern::torch_glue::score_evict_cpu));
}
