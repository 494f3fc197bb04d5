// SPDX-License-Identifier: Apache-2.0
// CUDA glue for the score-and-evict hot paths (window_scores, select_keep,
// compact_, evict_, score_evict_): the shared argument checks (the same headers
// as the CPU glue), CUDA-only checks, outputs and workspace, one call into the
// torch-free launchers of eviction_launch.h.
//
// No host sync and no allocation whose size depends on tensor values, so every
// op runs inside CUDA-graph capture. Value checks that would need a sync
// (lengths in range, protection feasible) are the Python front door's job in
// eager mode; a kernel leaves a head it cannot serve untouched (see
// eviction_launch.h).

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cuda_runtime_api.h>
#include <kvkern/eviction_launch.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "torch/evict_args.h"
#include "torch/scorer_args.h"
#include "torch/window_scores_args.h"

namespace kvkern::torch_glue {
namespace {

KvDtype cache_dtype(ScalarType s) {
  return s == ScalarType::Half ? KvDtype::kFloat16 : s == ScalarType::BFloat16 ? KvDtype::kBFloat16 : KvDtype::kFloat32;
}

void check_launch(const char* op, cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, op, ": ", what, " failed: ", cudaGetErrorName(err), ": ",
                  cudaGetErrorString(err));
}

cudaStream_t current_stream(int32_t device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

// Device scratch of `bytes` (at least 1), 256-byte aligned by the caching allocator.
Tensor workspace(const Tensor& like, size_t bytes) {
  return torch::stable::new_empty(like, {static_cast<int64_t>(std::max<size_t>(bytes, 1))}, ScalarType::Byte);
}

void require_cuda(const char* op, const char* name, const Tensor& t) {
  STD_TORCH_CHECK(t.is_cuda(), op, ": ", name, ": expected a CUDA tensor here, got a tensor on cpu");
}

Tensor window_scores_cuda(const Tensor& q_win, const Tensor& k_cache, const Tensor& lengths,
                          std::optional<double> sm_scale, std::string query_reduce, std::string group_reduce,
                          bool normalize, std::string pool, int64_t pool_kernel) {
  const char* op = "kvkern::window_scores";
  WindowScoresParams p = make_window_scores_params(op, q_win, k_cache, lengths, sm_scale, query_reduce,
                                                   group_reduce, normalize, pool, pool_kernel);
  require_cuda(op, "q_win", q_win);
  const int32_t device = q_win.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const KvDtype dt = cache_dtype(q_win.scalar_type());
  STD_TORCH_CHECK(window_scores_supported(p, dt), op, ": the CUDA kernel does not serve this shape (window ",
                  p.window, ", head dim ", p.head_dim, "); use backend=\"triton\"");
  Tensor out = torch::stable::new_empty(k_cache, {p.batch, p.num_kv_heads, p.capacity}, ScalarType::Float);
  p.out = static_cast<float*>(out.mutable_data_ptr());
  if (out.numel() == 0) return out;
  Tensor ws = workspace(q_win, window_scores_workspace_bytes(p, dt));
  check_launch(op, launch_window_scores(p, dt, ws.mutable_data_ptr(), current_stream(device)),
               "launching the window-score kernels");
  return out;
}

std::tuple<Tensor, Tensor> select_keep_cuda(const Tensor& scores, const Tensor& lengths,
                                            const std::optional<Tensor>& positions,
                                            const std::optional<Tensor>& budgets, int64_t budget, int64_t n_sink,
                                            int64_t n_recent, const std::optional<Tensor>& protect_ranges,
                                            const std::optional<Tensor>& keep_mask,
                                            const std::optional<Tensor>& segment_cuts,
                                            const std::optional<Tensor>& segment_min) {
  const char* op = "kvkern::select_keep";
  SelectParams p = make_select_params(op, scores, lengths, positions, budgets, budget, n_sink, n_recent,
                                      protect_ranges, keep_mask, segment_cuts, segment_min);
  require_cuda(op, "scores", scores);
  const int32_t device = scores.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  STD_TORCH_CHECK(select_keep_supported(p), op, ": the CUDA kernel does not serve these arguments (at most "
                  "1024 segments; protect_ranges rows contiguous); use backend=\"triton\"");
  Tensor keep = torch::stable::new_empty(scores, {p.batch, p.num_kv_heads, p.capacity}, ScalarType::Bool);
  Tensor new_lengths = torch::stable::new_empty(lengths, {p.batch, p.num_kv_heads}, ScalarType::Int);
  p.keep = static_cast<bool*>(keep.mutable_data_ptr());
  p.new_lengths = static_cast<int32_t*>(new_lengths.mutable_data_ptr());
  if (keep.numel() == 0) {
    if (new_lengths.numel()) torch::stable::copy_(new_lengths, lengths);
    return {keep, new_lengths};
  }
  Tensor ws = workspace(scores, select_keep_workspace_bytes(p));
  check_launch(op, launch_select_keep(p, ws.mutable_data_ptr(), current_stream(device)),
               "launching the selection kernel");
  return {keep, new_lengths};
}

void compact_cuda(const Tensor& k_cache, const Tensor& v_cache, const Tensor& lengths, const Tensor& keep,
                  const std::optional<Tensor>& positions, const std::optional<Tensor>& hist,
                  const std::optional<Tensor>& log_w) {
  const char* op = "kvkern::compact_";
  CompactParams p = make_compact_params(op, k_cache, v_cache, lengths, keep, positions, hist, log_w);
  require_cuda(op, "k_cache", k_cache);
  const int32_t device = k_cache.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  if (p.batch * p.num_kv_heads * p.capacity == 0) return;
  const KvDtype dt = cache_dtype(k_cache.scalar_type());
  Tensor ws = workspace(k_cache, compact_workspace_bytes(p));
  check_launch(op, launch_compact(p, dt, ws.mutable_data_ptr(), current_stream(device)),
               "launching the compaction kernels");
}

Tensor evict_cuda(const Tensor& k_cache, const Tensor& v_cache, const Tensor& lengths,
                  const std::optional<Tensor>& positions, const Tensor& scores, const std::optional<Tensor>& budgets,
                  int64_t budget, int64_t n_sink, int64_t n_recent, const std::optional<Tensor>& protect_ranges,
                  const std::optional<Tensor>& keep_mask, const std::optional<Tensor>& segment_cuts,
                  const std::optional<Tensor>& segment_min, const std::optional<Tensor>& hist,
                  const std::optional<Tensor>& log_w) {
  const char* op = "kvkern::evict_";
  check_rank(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]");
  check_scores_match_cache(op, scores, k_cache);
  SelectParams sp = make_select_params(op, scores, lengths, positions, budgets, budget, n_sink, n_recent,
                                       protect_ranges, keep_mask, segment_cuts, segment_min);
  Tensor keep = torch::stable::new_empty(scores, {sp.batch, sp.num_kv_heads, sp.capacity}, ScalarType::Bool);
  CompactParams cp = make_compact_params(op, k_cache, v_cache, lengths, keep, positions, hist, log_w);
  require_cuda(op, "k_cache", k_cache);
  const int32_t device = k_cache.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  STD_TORCH_CHECK(evict_supported(sp, cp), op, ": the CUDA kernels do not serve these arguments (at most "
                  "1024 segments; protect_ranges rows contiguous); use backend=\"triton\"");
  if (keep.numel() == 0) return keep;
  sp.keep = static_cast<bool*>(keep.mutable_data_ptr());
  const KvDtype dt = cache_dtype(k_cache.scalar_type());
  Tensor ws = workspace(k_cache, evict_workspace_bytes(sp, cp));
  check_launch(op, launch_evict(sp, cp, dt, ws.mutable_data_ptr(), current_stream(device)),
               "launching the eviction kernels");
  return keep;
}

// The redundancy term of score_evict_ is an O(L^2) op with a Triton kernel only:
// reached through the dispatcher (its arguments are already checked here).
Tensor key_redundancy_via_triton(const Tensor& k_cache, const Tensor& lengths, int64_t n_window, double threshold) {
  std::array<StableIValue, 4> stack{torch::stable::detail::from(k_cache), torch::stable::detail::from(lengths),
                                    torch::stable::detail::from(n_window), torch::stable::detail::from(threshold)};
  STABLE_TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher("kvkern::key_redundancy_triton", "", stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

Tensor score_evict_cuda(const Tensor& q_win, const Tensor& k_cache, const Tensor& v_cache, const Tensor& lengths,
                        const std::optional<Tensor>& positions, const std::optional<Tensor>& budgets, int64_t budget,
                        int64_t n_sink, int64_t n_recent, std::optional<double> sm_scale, std::string query_reduce,
                        std::string group_reduce, bool normalize, std::string pool, int64_t pool_kernel,
                        const std::optional<Tensor>& hist, const std::optional<Tensor>& hist_lengths, double decay,
                        std::string hist_mode, double mix_lambda, double redundancy_threshold,
                        const std::optional<Tensor>& protect_ranges, const std::optional<Tensor>& keep_mask,
                        const std::optional<Tensor>& log_w) {
  const char* op = "kvkern::score_evict_";
  // The pieces' checks: window scores (q_win, k_cache, lengths, options), selection (for
  // the cache's [B, Hkv, C]: the scores are made inside) and compaction.
  WindowScoresParams wp = make_window_scores_params(op, q_win, k_cache, lengths, sm_scale, query_reduce,
                                                    group_reduce, normalize, pool, pool_kernel);
  require_cuda(op, "q_win", q_win);
  const int32_t device = q_win.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  SelectParams sp = make_select_params(op, wp.batch, wp.num_kv_heads, wp.capacity, k_cache, "k_cache", lengths,
                                       positions, budgets, budget, n_sink, n_recent, protect_ranges, keep_mask,
                                       std::nullopt, std::nullopt);
  Tensor keep = torch::stable::new_empty(k_cache, {wp.batch, wp.num_kv_heads, wp.capacity}, ScalarType::Bool);
  CompactParams cp = make_compact_params(op, k_cache, v_cache, lengths, keep, positions, hist, log_w);
  check_score_evict_options(op, hist, hist_lengths, mix_lambda);
  const UpdateMode mode = parse_update_mode(op, hist_mode);
  if (hist_lengths) check_head_ints(op, "hist_lengths", *hist_lengths, wp.batch, wp.num_kv_heads, q_win, "q_win");

  std::optional<Tensor> redundancy;
  if (mix_lambda < 1.0) redundancy = key_redundancy_via_triton(k_cache, lengths, wp.window, redundancy_threshold);

  ScoreEvictParams p;
  p.q_win = wp.q_win;
  p.k = k_cache.mutable_data_ptr();
  p.v = v_cache.mutable_data_ptr();
  p.lengths = cp.lengths;
  p.positions = cp.positions;
  p.budgets = sp.budgets;
  p.protect_ranges = sp.protect_ranges;
  p.keep_mask = sp.keep_mask;
  p.hist = cp.hist;
  p.hist_lengths = hist_lengths ? static_cast<int32_t*>(hist_lengths->mutable_data_ptr()) : nullptr;
  p.log_w = cp.log_w;
  p.redundancy = redundancy ? static_cast<const float*>(redundancy->data_ptr()) : nullptr;
  p.keep = static_cast<bool*>(keep.mutable_data_ptr());
  p.batch = wp.batch;
  p.num_q_heads = wp.num_q_heads;
  p.num_kv_heads = wp.num_kv_heads;
  p.window = wp.window;
  p.capacity = wp.capacity;
  p.head_dim = wp.head_dim;
  p.q_stride_b = wp.q_stride_b;
  p.q_stride_h = wp.q_stride_h;
  p.q_stride_t = wp.q_stride_t;
  p.k_stride_b = cp.k_stride_b;
  p.k_stride_h = cp.k_stride_h;
  p.k_stride_c = cp.k_stride_c;
  p.v_stride_b = cp.v_stride_b;
  p.v_stride_h = cp.v_stride_h;
  p.v_stride_c = cp.v_stride_c;
  p.lengths_stride_b = cp.lengths_stride_b;
  p.lengths_stride_h = cp.lengths_stride_h;
  p.positions_stride_b = cp.positions_stride_b;
  p.positions_stride_h = cp.positions_stride_h;
  p.budgets_stride_b = sp.budgets_stride_b;
  p.budgets_stride_h = sp.budgets_stride_h;
  p.keep_mask_stride_b = sp.keep_mask_stride_b;
  p.keep_mask_stride_h = sp.keep_mask_stride_h;
  p.hist_stride_b = cp.hist_stride_b;
  p.hist_stride_h = cp.hist_stride_h;
  p.hist_lengths_stride_b = hist_lengths ? hist_lengths->stride(0) : 0;
  p.hist_lengths_stride_h = hist_lengths ? hist_lengths->stride(1) : 0;
  p.log_w_stride_b = cp.log_w_stride_b;
  p.log_w_stride_h = cp.log_w_stride_h;
  p.redundancy_stride_b = redundancy ? redundancy->stride(0) : 0;
  p.redundancy_stride_h = redundancy ? redundancy->stride(1) : 0;
  p.num_ranges = sp.num_ranges;
  p.ranges_stride_b = sp.ranges_stride_b;
  p.sm_scale = wp.sm_scale;
  p.query_reduce = wp.query_reduce;
  p.group_reduce = wp.group_reduce;
  p.normalize = wp.normalize;
  p.pool = wp.pool;
  p.pool_kernel = wp.pool_kernel;
  p.budget = budget;
  p.n_sink = n_sink;
  p.n_recent = n_recent;
  p.decay = static_cast<float>(decay);
  p.hist_mode = mode;
  p.mix_lambda = static_cast<float>(mix_lambda);

  const KvDtype dt = cache_dtype(k_cache.scalar_type());
  STD_TORCH_CHECK(score_evict_supported(p, dt), op, ": the CUDA kernels do not serve this shape (window ",
                  p.window, ", head dim ", p.head_dim, "); use backend=\"triton\"");
  if (keep.numel() == 0) return keep;
  Tensor ws = workspace(k_cache, score_evict_workspace_bytes(p, dt));
  check_launch(op, launch_score_evict(p, dt, ws.mutable_data_ptr(), current_stream(device)),
               "launching the fused eviction kernels");
  return keep;
}

}  // namespace
}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CUDA, m) {
  m.impl("window_scores", TORCH_BOX(&kvkern::torch_glue::window_scores_cuda));
  m.impl("select_keep", TORCH_BOX(&kvkern::torch_glue::select_keep_cuda));
  m.impl("compact_", TORCH_BOX(&kvkern::torch_glue::compact_cuda));
  m.impl("evict_", TORCH_BOX(&kvkern::torch_glue::evict_cuda));
  m.impl("score_evict_", TORCH_BOX(&kvkern::torch_glue::score_evict_cuda));
}
