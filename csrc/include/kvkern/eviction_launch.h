// SPDX-License-Identifier: Apache-2.0
// Host-side interface of the CUDA score-and-evict kernels (window_scores.cuh,
// select_compact.cuh): what the g++-built torch glue may call. No CUDA device
// types here (only cudaStream_t and cudaError_t), so any C++ compiler can
// include it. kvkern/reference.py states the exact semantics of every op;
// EVICTION_CUDA.md explains the algorithms.
//
// Conventions shared by every launcher:
//  * Pointers and strides are in elements (the params structs of
//    eviction_params.h); the slot dimension of every [B, Hkv, C] side array
//    (scores, positions, keep_mask, keep, hist, log_w) is contiguous.
//  * `workspace` is device memory of at least the matching *_workspace_bytes;
//    256-byte aligned; its contents on entry do not matter (no zeroing needed)
//    and are garbage on exit. The sizes depend only on the shapes.
//  * Nothing synchronizes or allocates; every launcher is safe inside CUDA-graph
//    capture. The return value is the first failing launch's status, or
//    cudaErrorInvalidValue for arguments the kernels cannot handle (listed
//    with each launcher), in which case nothing was launched.
//  * Lengths outside [0, C] are never used to index memory: window scores of
//    such a head are NaN, select / compact leave it untouched (keep all false,
//    lengths unchanged). The torch glue rejects them before launching anyway.
//  * GPU-specific behaviour that differs from the reference: where
//    kvkern.reference raises because a head's protected slots (or its segment
//    quotas / minima) exceed the budget, a kernel cannot raise: that head is
//    left untouched (keep = every valid slot, new length = L, and in
//    score_evict its hist / hist_lengths unchanged). The glue that needs the
//    error checks new_lengths against the budget afterwards.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "decode_attention_launch.h"  // KvDtype
#include "eviction_params.h"

namespace kvkern {

// ---------------------------------------------------------------------------
// window_scores (reference.window_scores): out [B, Hkv, C] fp32 contiguous,
// 0 past each head's length.
//
// Supported: any head_dim in [1, 512]; num_q_heads % num_kv_heads == 0;
// window >= 1; pool_kernel odd in [1, 2049]. Tensor cores (mma.sync,
// fp32 accumulation) for fp16 / bf16 with head_dim in {64, 128, 256} and
// q_win / k base and strides multiples of 8 elements; otherwise a CUDA-core
// fp32 path (fp32 caches, other head dims, unaligned views). The rows of one
// block are whole query heads: window <= 16 * 8 * (256 / head_dim) on the
// tensor-core path (256 at D = 128) and <= 128 on the CUDA-core path; larger
// windows return cudaErrorInvalidValue (window_scores_supported says so
// before any launch).
// ---------------------------------------------------------------------------
bool window_scores_supported(const WindowScoresParams& p, KvDtype dtype);
size_t window_scores_workspace_bytes(const WindowScoresParams& p, KvDtype dtype);
// 3 launches: pass A (row max / sum of exp per split), pass B (probabilities
// reduced over the window and the group), per-head finalize (normalize, pool).
cudaError_t launch_window_scores(const WindowScoresParams& p, KvDtype dtype, void* workspace,
                                 cudaStream_t stream);

// ---------------------------------------------------------------------------
// select_keep (reference.select_keep): keep [B, Hkv, C] bool contiguous (false
// past each length), new_lengths [B, Hkv] int32 contiguous. One block per
// head; exact top-k by radix select (ties toward the later slot, NaN as -inf).
// Supported: num_segments <= 1024; protect_ranges [R, 2] or [B, R, 2] with the
// last two dims contiguous. One launch.
// ---------------------------------------------------------------------------
bool select_keep_supported(const SelectParams& p);
size_t select_keep_workspace_bytes(const SelectParams& p);
cudaError_t launch_select_keep(const SelectParams& p, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------
// compact_ (reference.compact_): in place, order-preserving; lengths set to
// the number of kept valid slots. keep is [B, Hkv, C] with b / h strides.
// Two launches: a per-head plan (prefix sum of keep & valid into a list of
// source slots, new lengths written) and the move (K, V and the side arrays,
// many blocks per head). Any head_dim and alignment (16-byte moves when the
// rows, bases and strides allow, else 8 / 4 / 2 bytes).
// ---------------------------------------------------------------------------
size_t compact_workspace_bytes(const CompactParams& p);
cudaError_t launch_compact(const CompactParams& p, KvDtype dtype, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------
// evict_ (reference.evict_): select then compact. sel.keep receives the keep
// mask (before compaction); sel.new_lengths is ignored (cp.lengths receives
// the new lengths). sel.lengths / cp.lengths and sel.positions /
// cp.positions must describe the same tensors. Two launches.
// ---------------------------------------------------------------------------
bool evict_supported(const SelectParams& sel, const CompactParams& cp);
size_t evict_workspace_bytes(const SelectParams& sel, const CompactParams& cp);
cudaError_t launch_evict(const SelectParams& sel, const CompactParams& cp, KvDtype dtype, void* workspace,
                         cudaStream_t stream);

// ---------------------------------------------------------------------------
// score_evict_ (reference.score_evict_), the fused decode-time path. Heads with
// L <= budget are left completely untouched (their keep row = valid slots).
// Others: window scores (+ normalize), G-KV history update of hist on the
// candidate slots [0, L - W), pooling, optional mix with a precomputed
// redundancy term, select with n_recent = max(n_recent, W), compact (moving
// positions / hist / log_w), hist_lengths = new_length - W.
//
// The redundancy term (reference.key_redundancy, an O(L^2) op) is not computed
// here: with mix_lambda < 1 the caller passes `redundancy` [B, Hkv, C] fp32
// (e.g. from the key_redundancy op) and the kernel mixes
// p = mix_lambda * p - (1 - mix_lambda) * redundancy; redundancy == nullptr
// with mix_lambda < 1 returns cudaErrorInvalidValue.
//
// Four launches: pass A, pass B, per-head finalize + select, move.
// Same head_dim / window limits as window_scores.
// ---------------------------------------------------------------------------
struct ScoreEvictParams {
  const void* q_win = nullptr;              // [B, Hq, W, D], T
  void* k = nullptr;                        // [B, Hkv, C, D], T (compacted)
  void* v = nullptr;                        // [B, Hkv, C, D], T (compacted)
  int32_t* lengths = nullptr;               // [B, Hkv], read then written
  int32_t* positions = nullptr;             // [B, Hkv, C] or nullptr (= slot index); moved
  const int32_t* budgets = nullptr;         // [B, Hkv] or nullptr (= budget)
  const int32_t* protect_ranges = nullptr;  // [R, 2] or [B, R, 2] or nullptr
  const bool* keep_mask = nullptr;          // [B, Hkv, C] or nullptr
  float* hist = nullptr;                    // [B, Hkv, C] fp32 or nullptr; updated and moved
  int32_t* hist_lengths = nullptr;          // [B, Hkv]; required with hist
  float* log_w = nullptr;                   // [B, Hkv, C] or nullptr; moved
  const float* redundancy = nullptr;        // [B, Hkv, C] or nullptr (see above)
  bool* keep = nullptr;                     // [B, Hkv, C] out, contiguous

  int64_t batch = 0, num_q_heads = 0, num_kv_heads = 0, window = 0, capacity = 0, head_dim = 0;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_t = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_c = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_c = 0;
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;
  int64_t positions_stride_b = 0, positions_stride_h = 0;
  int64_t budgets_stride_b = 0, budgets_stride_h = 0;
  int64_t keep_mask_stride_b = 0, keep_mask_stride_h = 0;
  int64_t hist_stride_b = 0, hist_stride_h = 0;
  int64_t hist_lengths_stride_b = 0, hist_lengths_stride_h = 0;
  int64_t log_w_stride_b = 0, log_w_stride_h = 0;
  int64_t redundancy_stride_b = 0, redundancy_stride_h = 0;
  int64_t num_ranges = 0, ranges_stride_b = 0;  // ranges_stride_b == 0: shared by the batch

  float sm_scale = 1.0f;
  QueryReduce query_reduce = QueryReduce::kMean;
  GroupReduce group_reduce = GroupReduce::kMaxPerQuery;
  bool normalize = true;
  Pool pool = Pool::kNone;
  int pool_kernel = 1;
  int64_t budget = 0;
  int64_t n_sink = 0, n_recent = 0;
  float decay = 0.8f;
  UpdateMode hist_mode = UpdateMode::kMax;
  float mix_lambda = 1.0f;

  int64_t group_size() const { return num_q_heads / num_kv_heads; }
};

bool score_evict_supported(const ScoreEvictParams& p, KvDtype dtype);
size_t score_evict_workspace_bytes(const ScoreEvictParams& p, KvDtype dtype);
cudaError_t launch_score_evict(const ScoreEvictParams& p, KvDtype dtype, void* workspace, cudaStream_t stream);

}  // namespace kvkern
