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

#include <optional>
#include <string>

#include "cpu/dtype_dispatch.h"
#include "cpu/window_scores_kernel.h"
#include "torch/window_scores_args.h"

namespace kvkern::torch_glue {
namespace {

namespace wk = kvkern::cpu::window;

template <typename T>
void run(const WindowScoresParams& p) {
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  wk::window_scores_run<T>(p, threads, [](int64_t begin, int64_t end, int64_t grain, const auto& fn) {
    torch::stable::parallel_for(begin, end, grain, fn);
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
  check_host_lengths(op, p);
  Tensor out = torch::stable::new_empty(k_cache, {p.batch, p.num_kv_heads, p.capacity}, ScalarType::Float);
  p.out = static_cast<float*>(out.mutable_data_ptr());
  if (out.numel() == 0) return out;
  dispatch_cache_dtype(op, q_win.scalar_type(), [&](auto tag) { run<decltype(tag)>(p); });
  return out;
}

}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("window_scores", TORCH_BOX(&kvkern::torch_glue::window_scores_cpu));
}
