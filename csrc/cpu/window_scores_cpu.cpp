// SPDX-License-Identifier: Apache-2.0
// CPU glue for window_scores: checks, the work split, and the parallel loops of
// the kernel's passes (csrc/cpu/window_scores_kernel.h).

// 64-byte vector helpers are always inlined into ISA-specific clones.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <torch/csrc/stable/library.h>

#include "cpu/eviction_cpu_ops.h"
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "cpu/window_scores_kernel.h"
#include "torch/window_scores_args.h"

namespace kvkern::torch_glue {
namespace {

namespace wk = kvkern::cpu::window;

// Pass 1 splits each head's slots when there are fewer heads than twice the
// threads, keeping at least four tiles per split.
int64_t pass1_splits(int64_t heads, int64_t capacity, int64_t threads) {
  if (heads == 0 || heads >= 2 * threads) return 1;
  const int64_t want = (2 * threads + heads - 1) / heads;
  const int64_t most = std::max<int64_t>(1, capacity / (4 * wk::kTile));
  return std::min(want, most);
}

// Pass 2 chunks: whole tiles, at most 16 per chunk, and enough chunks for four
// items per thread.
int64_t pass2_chunk(int64_t heads, int64_t capacity, int64_t threads) {
  const int64_t want_items = 4 * threads;
  const int64_t per_head = std::max<int64_t>(1, (want_items + heads - 1) / std::max<int64_t>(heads, 1));
  int64_t chunk = wk::round_up((capacity + per_head - 1) / per_head, wk::kTile);
  return std::clamp<int64_t>(chunk, wk::kTile, 16 * wk::kTile);
}

template <typename T>
void run(const WindowScoresParams& p) {
  const int64_t heads = p.batch * p.num_kv_heads, C = p.capacity, R = p.group_size() * p.window;
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  const int64_t splits = pass1_splits(heads, C, threads);
  std::vector<float> pm(heads * splits * R), pl(heads * splits * R);
  torch::stable::parallel_for(0, heads * splits, 1, [&](int64_t begin, int64_t end) {
    wk::window_pass1_items<T>(p, splits, pm.data(), pl.data(), begin, end);
  });
  const int64_t chunk = pass2_chunk(heads, C, threads);
  const int64_t chunks = (C + chunk - 1) / chunk;
  torch::stable::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    wk::window_pass2_items<T>(p, splits, pm.data(), pl.data(), chunk, begin, end);
  });

  const bool mean_all = p.group_reduce == GroupReduce::kMeanAll;
  const bool pooled = p.pool != Pool::kNone && p.pool_kernel > 1;
  if (!mean_all && !pooled && !p.normalize) return;
  std::vector<float> comb;
  if (mean_all) {
    comb.resize(p.batch * C);
    torch::stable::parallel_for(0, p.batch * C, 4096, [&](int64_t begin, int64_t end) {
      wk::window_combine_mean_all(p, comb.data(), begin, end);
    });
  }
  torch::stable::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    wk::window_finish_heads(p, comb.data(), begin, end);
  });
}

}  // namespace

// The op implementations: external linkage, declared in cpu/eviction_cpu_ops.h.
Tensor window_scores_cpu(const Tensor& q_win, const Tensor& k_cache, const Tensor& lengths,
                         std::optional<double> sm_scale, std::string query_reduce, std::string group_reduce,
                         bool normalize, std::string pool, int64_t pool_kernel) {
  const char* op = "kvkern::window_scores";
  WindowScoresParams p = make_window_scores_params(op, q_win, k_cache, lengths, sm_scale, query_reduce,
                                                   group_reduce, normalize, pool, pool_kernel);
  STD_TORCH_CHECK(q_win.is_cpu(), op, ": q_win: expected a CPU tensor here");
  window_args::check_host_lengths(op, p.lengths, p.lengths_stride_b, p.lengths_stride_h, p.batch,
                                  p.num_kv_heads, p.capacity);
  Tensor out = torch::stable::new_empty(k_cache, {p.batch, p.num_kv_heads, p.capacity}, ScalarType::Float);
  p.out = static_cast<float*>(out.mutable_data_ptr());
  if (out.numel() == 0) return out;
  switch (q_win.scalar_type()) {
    case ScalarType::Float: run<float>(p); break;
    case ScalarType::Half: run<cpu::Half>(p); break;
    case ScalarType::BFloat16: run<cpu::BFloat16>(p); break;
    default: STD_TORCH_CHECK(false, op, ": unreachable dtype");
  }
  return out;
}

}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("window_scores", TORCH_BOX(&kvkern::torch_glue::window_scores_cpu));
}
