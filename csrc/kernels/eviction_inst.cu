// SPDX-License-Identifier: Apache-2.0
// The CUDA score-and-evict launchers of eviction_launch.h. The launch
// sequences (planning, workspace layout, dispatch to the kernel templates)
// live in window_scores.cuh / select_compact.cuh as run_* templates over a
// "launcher": here it is the real <<<>>> launch; tools/cuda_emu runs the same
// sequences with a CPU launcher, so only CudaLauncher itself is not emulated.
//
// Kernels instantiated through the dispatch: window passes A and B for
// {fp16, bf16} x head_dim {64, 128, 256} x {4, 8} warps (tensor cores) and
// {fp32, fp16, bf16} x {4, 8} warps (CUDA cores); the finalize, select
// (plain, fused), plan and move (16 / 8 / 4 / 2-byte units) kernels.

#include <kvkern/eviction_launch.h>
#include <kvkern/select_compact.cuh>
#include <kvkern/window_scores.cuh>

namespace kvkern {
namespace {

using eviction_detail::EvictionTuning;

// The opt-in shared-memory limit per block of the current device.
size_t device_max_smem() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();  // leave no sticky error behind; assume the sm_80+ minimum
    return 99 * 1024;
  }
  return static_cast<size_t>(v);
}

struct CudaLauncher {
  cudaStream_t stream;
  size_t smem_limit;

  size_t max_smem() const { return smem_limit; }

  template <typename P>
  cudaError_t operator()(void (*kernel)(P), int64_t blocks, int threads, size_t smem, const P& params) const {
    if (blocks <= 0) return cudaSuccess;  // never launch an empty grid
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    if (smem > smem_limit) return cudaErrorInvalidValue;
    if (smem > 48 * 1024)
      KVKERN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(params);
    return cudaGetLastError();
  }
};

CudaLauncher launcher(cudaStream_t stream) { return CudaLauncher{stream, device_max_smem()}; }

}  // namespace

bool window_scores_supported(const WindowScoresParams& p, KvDtype dtype) {
  return eviction_detail::plan_window_scores(p, dtype, EvictionTuning{}).ok;
}

size_t window_scores_workspace_bytes(const WindowScoresParams& p, KvDtype dtype) {
  const auto pl = eviction_detail::plan_window_scores(p, dtype, EvictionTuning{});
  return pl.ok ? eviction_detail::window_scores_ws_bytes(pl) : 0;
}

cudaError_t launch_window_scores(const WindowScoresParams& p, KvDtype dtype, void* workspace, cudaStream_t stream) {
  CudaLauncher l = launcher(stream);
  return eviction_detail::run_window_scores(p, dtype, workspace, l);
}

bool select_keep_supported(const SelectParams& p) {
  return eviction_detail::select_params_ok(p) && p.new_lengths != nullptr;
}

size_t select_keep_workspace_bytes(const SelectParams& p) { return eviction_detail::select_ws_bytes(p, false); }

cudaError_t launch_select_keep(const SelectParams& p, void* workspace, cudaStream_t stream) {
  CudaLauncher l = launcher(stream);
  return eviction_detail::run_select_keep(p, workspace, l);
}

size_t compact_workspace_bytes(const CompactParams& p) {
  return eviction_detail::plan_ws_bytes(p.batch * p.num_kv_heads, p.capacity);
}

cudaError_t launch_compact(const CompactParams& p, KvDtype dtype, void* workspace, cudaStream_t stream) {
  CudaLauncher l = launcher(stream);
  return eviction_detail::run_compact(p, dtype, workspace, l);
}

bool evict_supported(const SelectParams& sel, const CompactParams& cp) {
  return eviction_detail::select_params_ok(sel) && eviction_detail::compact_params_ok(cp) &&
         sel.batch == cp.batch && sel.num_kv_heads == cp.num_kv_heads && sel.capacity == cp.capacity;
}

size_t evict_workspace_bytes(const SelectParams& sel, const CompactParams& cp) {
  (void)cp;
  return eviction_detail::select_ws_bytes(sel, true);
}

cudaError_t launch_evict(const SelectParams& sel, const CompactParams& cp, KvDtype dtype, void* workspace,
                         cudaStream_t stream) {
  CudaLauncher l = launcher(stream);
  return eviction_detail::run_evict(sel, cp, dtype, workspace, l);
}

bool score_evict_supported(const ScoreEvictParams& p, KvDtype dtype) {
  return eviction_detail::plan_score_evict_window(p, dtype, EvictionTuning{}).ok;
}

size_t score_evict_workspace_bytes(const ScoreEvictParams& p, KvDtype dtype) {
  const auto pl = eviction_detail::plan_score_evict_window(p, dtype, EvictionTuning{});
  return pl.ok ? eviction_detail::score_evict_ws_bytes(p, pl) : 0;
}

cudaError_t launch_score_evict(const ScoreEvictParams& p, KvDtype dtype, void* workspace, cudaStream_t stream) {
  CudaLauncher l = launcher(stream);
  return eviction_detail::run_score_evict(p, dtype, workspace, l);
}

}  // namespace kvkern
