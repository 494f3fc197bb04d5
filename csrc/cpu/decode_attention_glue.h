// SPDX-License-Identifier: Apache-2.0
// CPU glue shared by the split-K attention ops (decode_attention,
// quant_decode_attention, fp8_decode_attention): the default split count and
// the merge of the splits. The ops differ in how a split reads the cache, not
// in how work is split or merged.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <cstdint>

#include "cpu/decode_attention_kernel.h"
#include "cpu/parallel.h"

namespace kvkern::torch_glue {

// Enough (batch, head, split) items for every thread to get two, without
// splitting a head into pieces shorter than four tiles.
inline int64_t cpu_default_num_splits(int64_t items, int64_t capacity, int64_t block_n) {
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  if (items == 0 || items >= 2 * threads) return 1;
  const int64_t want = (2 * threads + items - 1) / items;
  int64_t most = capacity / (4 * block_n);
  if (most < 1) most = 1;
  return want < most ? want : most;
}

// Runs fn(begin, end) over the (batch, kv head, split) items. A split reads up to ceil(C / S) rows
// of k and v for the G query heads of its kv head: that bounds its work for the grain.
template <class Params, class F>
void for_each_split_item(const Params& p, const F& fn) {
  const int64_t items = p.batch * p.num_kv_heads * p.num_splits;
  if (items == 0) return;
  const int64_t group = p.num_q_heads / p.num_kv_heads;
  const int64_t rows = (p.capacity + p.num_splits - 1) / p.num_splits;
  torch::stable::parallel_for(0, items, cpu::grain_for(2 * rows * p.head_dim * group), fn);
}

// Merges p's partials into out / lse (rows of [B, Hq]); nothing with one split.
template <typename T, class Params>
void merge_split_partials(const Params& p) {
  if (p.num_splits <= 1) return;
  const int64_t grain = cpu::grain_for(p.num_splits * p.head_dim);
  torch::stable::parallel_for(0, p.batch * p.num_q_heads, grain, [&](int64_t r0, int64_t r1) {
    cpu::merge_states_rows<T>(p.partial_out, p.partial_lse, static_cast<T*>(p.out), p.lse, p.num_splits,
                              p.head_dim, r0, r1);
  });
}

}  // namespace kvkern::torch_glue
