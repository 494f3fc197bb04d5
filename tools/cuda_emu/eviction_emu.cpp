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
#define FLD(S, n) KVKERN_EMU_FIELD(S, n)

const std::vector<Field> kWindowFields = {
    FLD(WindowScoresParams, q_win), FLD(WindowScoresParams, k), FLD(WindowScoresParams, lengths),
    FLD(WindowScoresParams, out), FLD(WindowScoresParams, batch), FLD(WindowScoresParams, num_q_heads),
    FLD(WindowScoresParams, num_kv_heads), FLD(WindowScoresParams, window), FLD(WindowScoresParams, capacity),
    FLD(WindowScoresParams, head_dim), FLD(WindowScoresParams, q_stride_b), FLD(WindowScoresParams, q_stride_h),
    FLD(WindowScoresParams, q_stride_t), FLD(WindowScoresParams, k_stride_b), FLD(WindowScoresParams, k_stride_h),
    FLD(WindowScoresParams, k_stride_c), FLD(WindowScoresParams, lengths_stride_b),
    FLD(WindowScoresParams, lengths_stride_h), FLD(WindowScoresParams, sm_scale),
    FLD(WindowScoresParams, query_reduce), FLD(WindowScoresParams, group_reduce), FLD(WindowScoresParams, normalize),
    FLD(WindowScoresParams, pool), FLD(WindowScoresParams, pool_kernel)};

const std::vector<Field> kSelectFields = {
    FLD(SelectParams, scores), FLD(SelectParams, lengths), FLD(SelectParams, positions), FLD(SelectParams, budgets),
    FLD(SelectParams, protect_ranges), FLD(SelectParams, keep_mask), FLD(SelectParams, segment_cuts),
    FLD(SelectParams, segment_min), FLD(SelectParams, keep), FLD(SelectParams, new_lengths), FLD(SelectParams, batch),
    FLD(SelectParams, num_kv_heads), FLD(SelectParams, capacity), FLD(SelectParams, scores_stride_b),
    FLD(SelectParams, scores_stride_h), FLD(SelectParams, lengths_stride_b), FLD(SelectParams, lengths_stride_h),
    FLD(SelectParams, positions_stride_b), FLD(SelectParams, positions_stride_h),
    FLD(SelectParams, budgets_stride_b), FLD(SelectParams, budgets_stride_h), FLD(SelectParams, keep_mask_stride_b),
    FLD(SelectParams, keep_mask_stride_h), FLD(SelectParams, num_ranges), FLD(SelectParams, ranges_stride_b),
    FLD(SelectParams, num_segments), FLD(SelectParams, budget), FLD(SelectParams, n_sink),
    FLD(SelectParams, n_recent)};

const std::vector<Field> kCompactFields = {
    FLD(CompactParams, k), FLD(CompactParams, v), FLD(CompactParams, lengths), FLD(CompactParams, keep),
    FLD(CompactParams, positions), FLD(CompactParams, hist), FLD(CompactParams, log_w), FLD(CompactParams, batch),
    FLD(CompactParams, num_kv_heads), FLD(CompactParams, capacity), FLD(CompactParams, head_dim),
    FLD(CompactParams, k_stride_b), FLD(CompactParams, k_stride_h), FLD(CompactParams, k_stride_c),
    FLD(CompactParams, v_stride_b), FLD(CompactParams, v_stride_h), FLD(CompactParams, v_stride_c),
    FLD(CompactParams, lengths_stride_b), FLD(CompactParams, lengths_stride_h), FLD(CompactParams, keep_stride_b),
    FLD(CompactParams, keep_stride_h), FLD(CompactParams, positions_stride_b),
    FLD(CompactParams, positions_stride_h), FLD(CompactParams, hist_stride_b), FLD(CompactParams, hist_stride_h),
    FLD(CompactParams, log_w_stride_b), FLD(CompactParams, log_w_stride_h)};

const std::vector<Field> kScoreEvictFields = {
    FLD(ScoreEvictParams, q_win), FLD(ScoreEvictParams, k), FLD(ScoreEvictParams, v),
    FLD(ScoreEvictParams, lengths), FLD(ScoreEvictParams, positions), FLD(ScoreEvictParams, budgets),
    FLD(ScoreEvictParams, protect_ranges), FLD(ScoreEvictParams, keep_mask), FLD(ScoreEvictParams, hist),
    FLD(ScoreEvictParams, hist_lengths), FLD(ScoreEvictParams, log_w), FLD(ScoreEvictParams, redundancy),
    FLD(ScoreEvictParams, keep), FLD(ScoreEvictParams, batch), FLD(ScoreEvictParams, num_q_heads),
    FLD(ScoreEvictParams, num_kv_heads), FLD(ScoreEvictParams, window), FLD(ScoreEvictParams, capacity),
    FLD(ScoreEvictParams, head_dim), FLD(ScoreEvictParams, q_stride_b), FLD(ScoreEvictParams, q_stride_h),
    FLD(ScoreEvictParams, q_stride_t), FLD(ScoreEvictParams, k_stride_b), FLD(ScoreEvictParams, k_stride_h),
    FLD(ScoreEvictParams, k_stride_c), FLD(ScoreEvictParams, v_stride_b), FLD(ScoreEvictParams, v_stride_h),
    FLD(ScoreEvictParams, v_stride_c), FLD(ScoreEvictParams, lengths_stride_b),
    FLD(ScoreEvictParams, lengths_stride_h), FLD(ScoreEvictParams, positions_stride_b),
    FLD(ScoreEvictParams, positions_stride_h), FLD(ScoreEvictParams, budgets_stride_b),
    FLD(ScoreEvictParams, budgets_stride_h), FLD(ScoreEvictParams, keep_mask_stride_b),
    FLD(ScoreEvictParams, keep_mask_stride_h), FLD(ScoreEvictParams, hist_stride_b),
    FLD(ScoreEvictParams, hist_stride_h), FLD(ScoreEvictParams, hist_lengths_stride_b),
    FLD(ScoreEvictParams, hist_lengths_stride_h), FLD(ScoreEvictParams, log_w_stride_b),
    FLD(ScoreEvictParams, log_w_stride_h), FLD(ScoreEvictParams, redundancy_stride_b),
    FLD(ScoreEvictParams, redundancy_stride_h), FLD(ScoreEvictParams, num_ranges),
    FLD(ScoreEvictParams, ranges_stride_b), FLD(ScoreEvictParams, sm_scale), FLD(ScoreEvictParams, query_reduce),
    FLD(ScoreEvictParams, group_reduce), FLD(ScoreEvictParams, normalize), FLD(ScoreEvictParams, pool),
    FLD(ScoreEvictParams, pool_kernel), FLD(ScoreEvictParams, budget), FLD(ScoreEvictParams, n_sink),
    FLD(ScoreEvictParams, n_recent), FLD(ScoreEvictParams, decay), FLD(ScoreEvictParams, hist_mode),
    FLD(ScoreEvictParams, mix_lambda)};

const std::vector<Field> kTuningFields = {
    FLD(EvictionTuning, force_simt), FLD(EvictionTuning, window_target_blocks), FLD(EvictionTuning, select_list_cap),
    FLD(EvictionTuning, window_chunk_tiles), FLD(EvictionTuning, max_smem)};
#undef FLD

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
