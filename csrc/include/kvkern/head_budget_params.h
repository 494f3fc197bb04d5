// SPDX-License-Identifier: Apache-2.0
// Plain description of an allocate_head_budgets call (AdaKV head-wise budgets),
// filled by csrc/torch/evict_args.h. kvkern/reference.py states the math.
#pragma once

#include <cstdint>

namespace kvkern {

struct HeadBudgetParams {
  const float* scores = nullptr;     // [B, Hkv, C]
  const int32_t* lengths = nullptr;  // [B, Hkv]
  int32_t* out = nullptr;            // [B, Hkv], contiguous

  int64_t batch = 0, num_kv_heads = 0, capacity = 0;
  int64_t scores_stride_b = 0, scores_stride_h = 0;
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;

  int64_t budget = 0;  // per-head average budget, >= 0
  int64_t n_safe = 0;  // floor(budget * safeguard): each head's best slots that count as +inf
  int64_t n_sink = 0, n_recent = 0;
};

}  // namespace kvkern
