// SPDX-License-Identifier: Apache-2.0
// CPU emulator for kvkern's CUDA score-and-evict kernels
// (csrc/include/kvkern/window_scores.cuh, select_compact.cuh), built as a
// shared library that tests/test_cuda_eviction_kernels.py drives through
// ctypes (tools/cuda_emu/eviction_emu.py), so the results are compared with
// kvkern.reference directly. No GPU needed.
//
// What runs is the real code: the launch sequences (run_window_scores,
// run_select_keep, run_compact, run_evict, run_score_evict: planning,
// workspace layout, kernel dispatch) and every kernel they launch, compiled
// for the host by g++ from the emulation copy of the headers that
// tools/cuda_emu/gen.py makes, on the shared runtime (emu_runtime.h: fibers,
// barriers, warp collectives, the emulated mma.sync, cp.async, read checks,
// shared-memory poisoning and guard pages, random block order; what it does
// and does not emulate is described there). Only eviction_inst.cu's
// CudaLauncher (the <<<>>> line, the shared-memory opt-in) is replaced by
// kvkern_emu::EmuLauncher. This file holds the C API: the parameter structs'
// fields by name and one entry point per launch sequence.
#include "emu_runtime.h"

#include <kvkern/select_compact.cuh>
#include <kvkern/window_scores.cuh>

#include "emu_capi.h"

namespace {
using namespace kvkern;
using kvkern::eviction_detail::EvictionTuning;
using kvkern_emu::Field;

const std::vector<Field> kWindowFields = {KVKERN_EMU_FIELDS(
    WindowScoresParams, q_win, k, lengths, out, batch, num_q_heads, num_kv_heads, window, capacity, head_dim,
    q_stride_b, q_stride_h, q_stride_t, k_stride_b, k_stride_h, k_stride_c, lengths_stride_b, lengths_stride_h,
    sm_scale, query_reduce, group_reduce, normalize, pool, pool_kernel)};

const std::vector<Field> kSelectFields = {KVKERN_EMU_FIELDS(
    SelectParams, scores, lengths, positions, budgets, protect_ranges, keep_mask, segment_cuts, segment_min, keep,
    new_lengths, batch, num_kv_heads, capacity, scores_stride_b, scores_stride_h, lengths_stride_b,
    lengths_stride_h, positions_stride_b, positions_stride_h, budgets_stride_b, budgets_stride_h,
    keep_mask_stride_b, keep_mask_stride_h, num_ranges, ranges_stride_b, num_segments, budget, n_sink, n_recent)};

const std::vector<Field> kCompactFields = {KVKERN_EMU_FIELDS(
    CompactParams, k, v, lengths, keep, positions, hist, log_w, batch, num_kv_heads, capacity, head_dim, k_stride_b,
    k_stride_h, k_stride_c, v_stride_b, v_stride_h, v_stride_c, lengths_stride_b, lengths_stride_h, keep_stride_b,
    keep_stride_h, positions_stride_b, positions_stride_h, hist_stride_b, hist_stride_h, log_w_stride_b,
    log_w_stride_h)};

const std::vector<Field> kScoreEvictFields = {KVKERN_EMU_FIELDS(
    ScoreEvictParams, q_win, k, v, lengths, positions, budgets, protect_ranges, keep_mask, hist, hist_lengths,
    log_w, redundancy, keep, batch, num_q_heads, num_kv_heads, window, capacity, head_dim, q_stride_b, q_stride_h,
    q_stride_t, k_stride_b, k_stride_h, k_stride_c, v_stride_b, v_stride_h, v_stride_c, lengths_stride_b,
    lengths_stride_h, positions_stride_b, positions_stride_h, budgets_stride_b, budgets_stride_h,
    keep_mask_stride_b, keep_mask_stride_h, hist_stride_b, hist_stride_h, hist_lengths_stride_b,
    hist_lengths_stride_h, log_w_stride_b, log_w_stride_h, redundancy_stride_b, redundancy_stride_h, num_ranges,
    ranges_stride_b, sm_scale, query_reduce, group_reduce, normalize, pool, pool_kernel, budget, n_sink, n_recent,
    decay, hist_mode, mix_lambda)};

const std::vector<Field> kTuningFields = {KVKERN_EMU_FIELDS(
    EvictionTuning, force_simt, window_target_blocks, select_list_cap, window_chunk_tiles, max_smem)};

struct Handle {
  std::string kind;
  WindowScoresParams window;
  SelectParams select;
  CompactParams compact;
  ScoreEvictParams score_evict;
  EvictionTuning tuning;
  kvkern_emu::Options options;

  int set(const char* name, double value, void* ptr, bool is_ptr) {
    const std::vector<Field>* fields = &kScoreEvictFields;
    void* params = &score_evict;
    if (kind == "window_scores") fields = &kWindowFields, params = &window;
    else if (kind == "select") fields = &kSelectFields, params = &select;
    else if (kind == "compact") fields = &kCompactFields, params = &compact;
    return kvkern_emu::set_field({{fields, params}, {&kTuningFields, &tuning}, {&kvkern_emu::kOptionFields, &options}},
                                 name, value, ptr, is_ptr, kind);
  }
};

KvDtype dtype_of(int d) { return static_cast<KvDtype>(d); }
}  // namespace

KVKERN_EXPORT void* emu_new(const char* kind) {
  const std::string k = kind;
  if (k != "window_scores" && k != "select" && k != "compact" && k != "score_evict") return nullptr;
  auto* h = new Handle;
  h->kind = k;
  return h;
}
KVKERN_EXPORT void emu_free(void* h) { delete static_cast<Handle*>(h); }
KVKERN_EXPORT int emu_set(void* h, const char* name, double value) {
  return static_cast<Handle*>(h)->set(name, value, nullptr, false);
}
KVKERN_EXPORT int emu_set_ptr(void* h, const char* name, void* ptr) {
  return static_cast<Handle*>(h)->set(name, 0, ptr, true);
}

KVKERN_EXPORT long long emu_workspace_bytes(void* hp, int dtype) {
  auto* h = static_cast<Handle*>(hp);
  using namespace kvkern::eviction_detail;
  if (h->kind == "window_scores") {
    const WindowPlan pl = plan_window_scores(h->window, dtype_of(dtype), h->tuning);
    return pl.ok ? static_cast<long long>(window_scores_ws_bytes(pl)) : -1;
  }
  if (h->kind == "select") return static_cast<long long>(select_ws_bytes(h->select, true));
  if (h->kind == "compact") return static_cast<long long>(plan_ws_bytes(h->compact.batch * h->compact.num_kv_heads,
                                                                        h->compact.capacity));
  const WindowPlan pl = plan_score_evict_window(h->score_evict, dtype_of(dtype), h->tuning);
  return pl.ok ? static_cast<long long>(score_evict_ws_bytes(h->score_evict, pl)) : -1;
}

// op: "window_scores", "select_keep", "compact", "evict" (needs a compact
// handle too), "score_evict". Returns 0 (ok), 1 (violations or a failed
// launch; see emu_error), 2 (refused: cudaErrorInvalidValue before a launch).
KVKERN_EXPORT int emu_run(void* hp, const char* op, int dtype, void* workspace, void* compact_handle) {
  auto* h = static_cast<Handle*>(hp);
  kvkern_emu::begin_run(h->options);
  kvkern_emu::EmuLauncher launch{h->options};
  using namespace kvkern::eviction_detail;
  const std::string o = op;
  cudaError_t err = cudaErrorInvalidValue;
  if (o == "window_scores") err = run_window_scores(h->window, dtype_of(dtype), workspace, launch, h->tuning);
  else if (o == "select_keep") err = run_select_keep(h->select, workspace, launch, h->tuning);
  else if (o == "compact") err = run_compact(h->compact, dtype_of(dtype), workspace, launch, h->tuning);
  else if (o == "evict")
    err = run_evict(h->select, static_cast<Handle*>(compact_handle)->compact, dtype_of(dtype), workspace, launch,
                    h->tuning);
  else if (o == "score_evict") err = run_score_evict(h->score_evict, dtype_of(dtype), workspace, launch, h->tuning);
  return kvkern_emu::finish(err);
}
