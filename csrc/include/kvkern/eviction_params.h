// SPDX-License-Identifier: Apache-2.0
// Plain descriptions of the score-and-evict calls, shared by the CPU and CUDA
// kernels and filled by the glue in csrc/torch/. No framework types: pointers,
// sizes and strides in elements. kvkern/reference.py states the exact math of
// each op; the comments here only say what each field points at.
#pragma once

#include <cstdint>

namespace kvkern {

enum class QueryReduce : int { kMean = 0, kSum = 1 };
// kMax: max over the group of the window-reduced rows (max_h mean_t, AdaKV /
// SnapKV); kMaxPerQuery: max over the group per window query, then the window
// reduce (mean_t max_h, G-KV). kvkern/reference.py window_scores has the math.
enum class GroupReduce : int { kMean = 0, kMax = 1, kMeanAll = 2, kMaxPerQuery = 3 };
enum class Pool : int { kNone = 0, kAvg = 1, kMax = 2 };
enum class SlotScoreKind : int { kKeyNorm = 0, kValueNorm = 1, kKeyDiff = 2, kRecency = 3, kRandom = 4 };
enum class UpdateMode : int { kMax = 0, kEma = 1, kSum = 2 };

// window_scores: the last W queries' attention over each head's valid slots.
struct WindowScoresParams {
  const void* q_win = nullptr;       // [B, Hq, W, D], T
  const void* k = nullptr;           // [B, Hkv, C, D], T
  const int32_t* lengths = nullptr;  // [B, Hkv]
  float* out = nullptr;              // [B, Hkv, C] fp32, contiguous

  int64_t batch = 0, num_q_heads = 0, num_kv_heads = 0, window = 0, capacity = 0, head_dim = 0;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_t = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_c = 0;
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;

  float sm_scale = 1.0f;
  QueryReduce query_reduce = QueryReduce::kMean;
  GroupReduce group_reduce = GroupReduce::kMean;
  bool normalize = false;
  Pool pool = Pool::kNone;
  int pool_kernel = 1;

  int64_t group_size() const { return num_q_heads / num_kv_heads; }
};

// select_keep: which slots of each (batch, kv head) survive.
struct SelectParams {
  const float* scores = nullptr;        // [B, Hkv, C]
  const int32_t* lengths = nullptr;     // [B, Hkv]
  const int32_t* positions = nullptr;   // [B, Hkv, C] or nullptr (= slot index)
  const int32_t* budgets = nullptr;     // [B, Hkv] or nullptr (= budget)
  const int32_t* protect_ranges = nullptr;  // [R, 2] or [B, R, 2] position ranges [start, end), or nullptr
  const bool* keep_mask = nullptr;      // [B, Hkv, C] or nullptr
  const int32_t* segment_cuts = nullptr;  // [S - 1] increasing positions, or nullptr (one segment)
  const int32_t* segment_min = nullptr;   // [S] or nullptr (proportional quotas when cuts are given)
  bool* keep = nullptr;                 // [B, Hkv, C], contiguous
  int32_t* new_lengths = nullptr;       // [B, Hkv], contiguous

  int64_t batch = 0, num_kv_heads = 0, capacity = 0;
  int64_t scores_stride_b = 0, scores_stride_h = 0;
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;
  int64_t positions_stride_b = 0, positions_stride_h = 0;
  int64_t budgets_stride_b = 0, budgets_stride_h = 0;
  int64_t keep_mask_stride_b = 0, keep_mask_stride_h = 0;
  int64_t num_ranges = 0, ranges_stride_b = 0;  // ranges_stride_b == 0: shared by the batch
  int64_t num_segments = 1;

  int64_t budget = 0;
  int64_t n_sink = 0, n_recent = 0;
};

// compact_: move kept valid slots to the front, in order, and set lengths.
struct CompactParams {
  void* k = nullptr;                 // [B, Hkv, C, D], T
  void* v = nullptr;                 // [B, Hkv, C, D], T
  int32_t* lengths = nullptr;        // [B, Hkv], read then written
  const bool* keep = nullptr;        // [B, Hkv, C]
  int32_t* positions = nullptr;      // [B, Hkv, C] or nullptr
  float* hist = nullptr;             // [B, Hkv, C] or nullptr
  float* log_w = nullptr;            // [B, Hkv, C] or nullptr

  int64_t batch = 0, num_kv_heads = 0, capacity = 0, head_dim = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_c = 0;
  int64_t v_stride_b = 0, v_stride_h = 0, v_stride_c = 0;
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;
  int64_t keep_stride_b = 0, keep_stride_h = 0;
  int64_t positions_stride_b = 0, positions_stride_h = 0;
  int64_t hist_stride_b = 0, hist_stride_h = 0;
  int64_t log_w_stride_b = 0, log_w_stride_h = 0;
};

}  // namespace kvkern
