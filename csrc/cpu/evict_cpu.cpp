// SPDX-License-Identifier: Apache-2.0
// CPU glue for select_keep, compact_, evict_ and allocate_head_budgets: argument
// checks, value checks (free on CPU), outputs, and the parallel loops over heads.
//
// Nothing is written before every check has passed: the in-place ops check every
// head's feasibility first, then select and compact, so a bad call leaves the
// cache as it was.

#include <torch/csrc/stable/library.h>

#include "cpu/eviction_cpu_ops.h"
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/evict_kernel.h"
#include "cpu/parallel.h"
#include "torch/evict_args.h"

namespace kvkern::torch_glue {
namespace {

// Work per head, for the thread-pool grain: the selection reads a head's scores a few times
// (radix passes), the compaction moves its kept rows of k and v (and the per-slot arrays).
int64_t select_work(const SelectParams& p) { return 4 * p.capacity; }
int64_t compact_work(const CompactParams& p) { return p.capacity * (2 * p.head_dim + 4); }
int64_t select_grain(const SelectParams& p) { return cpu::grain_for(select_work(p)); }
int64_t compact_grain(const CompactParams& p) { return cpu::grain_for(compact_work(p)); }

// The value checks of select_keep's arguments that are free on CPU.
void check_select_values(const char* op, const SelectParams& p) {
  check_host_lengths(op, p);
  if (p.budgets)
    for (int64_t b = 0; b < p.batch; ++b)
      for (int64_t j = 0; j < p.num_kv_heads; ++j) {
        const int32_t k = p.budgets[b * p.budgets_stride_b + j * p.budgets_stride_h];
        STD_TORCH_CHECK(k >= 0, op, ": budgets: expected every value >= 0, got ", k, " at [", b,
                        ", ", j, "]");
      }
  if (p.protect_ranges) {
    const int64_t nb = p.ranges_stride_b ? p.batch : 1;
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t r = 0; r < p.num_ranges; ++r) {
        const int32_t* range = p.protect_ranges + b * p.ranges_stride_b + 2 * r;
        STD_TORCH_CHECK(range[0] <= range[1], op,
                        ": protect_ranges: expected start <= end in every [start, end) range, got [",
                        range[0], ", ", range[1], ") at range ", r,
                        p.ranges_stride_b ? " of batch element " : "",
                        p.ranges_stride_b ? std::to_string(b) : std::string());
      }
  }
  if (p.segment_cuts)
    for (int64_t s = 1; s + 1 < p.num_segments; ++s)
      STD_TORCH_CHECK(p.segment_cuts[s - 1] < p.segment_cuts[s], op,
                      ": segment_cuts: expected strictly increasing positions, got ",
                      p.segment_cuts[s - 1], " then ", p.segment_cuts[s], " at index ", s);
}

// Checks every head's feasibility (in parallel) and raises for the first bad
// head in (b, j) order, the reference's order.
void check_select_feasible(const char* op, const SelectParams& p) {
  const int64_t heads = p.batch * p.num_kv_heads;
  std::vector<cpu::HeadStatus> status(heads);
  torch::stable::parallel_for(0, heads, select_grain(p), [&](int64_t begin, int64_t end) {
    cpu::SelectScratch s;
    for (int64_t h = begin; h < end; ++h)
      status[h] = cpu::check_select_head(p, h / p.num_kv_heads, h % p.num_kv_heads, s);
  });
  for (int64_t h = 0; h < heads; ++h) {
    const cpu::HeadStatus& st = status[h];
    const int64_t b = h / p.num_kv_heads, j = h % p.num_kv_heads;
    switch (st.code) {
      case cpu::SelectStatus::kOk: break;
      case cpu::SelectStatus::kProtected:
        STD_TORCH_CHECK(false, op, ": head [", b, ", ", j, "]: ", st.need,
                        " protected slots exceed the budget ", st.budget);
        break;
      case cpu::SelectStatus::kSegmentQuota:
        STD_TORCH_CHECK(false, op, ": head [", b, ", ", j, "]: segment ", st.segment, " has ",
                        st.need, " protected slots but a quota of ", st.budget);
        break;
      case cpu::SelectStatus::kMinima:
        STD_TORCH_CHECK(false, op, ": head [", b, ", ", j,
                        "]: protected slots and segment minima need ", st.need,
                        " slots, more than the budget ", st.budget);
        break;
    }
  }
}

int64_t element_size(ScalarType dt) { return dt == ScalarType::Float ? 4 : 2; }

}  // namespace

// The op implementations: external linkage, declared in cpu/eviction_cpu_ops.h.
std::tuple<Tensor, Tensor> select_keep_cpu(
    const Tensor& scores, const Tensor& lengths, const std::optional<Tensor>& positions,
    const std::optional<Tensor>& budgets, int64_t budget, int64_t n_sink, int64_t n_recent,
    const std::optional<Tensor>& protect_ranges, const std::optional<Tensor>& keep_mask,
    const std::optional<Tensor>& segment_cuts, const std::optional<Tensor>& segment_min) {
  const char* op = "kvkern::select_keep";
  SelectParams p = make_select_params(op, scores, lengths, positions, budgets, budget, n_sink,
                                      n_recent, protect_ranges, keep_mask, segment_cuts,
                                      segment_min);
  STD_TORCH_CHECK(scores.is_cpu(), op, ": expected CPU tensors here");
  check_select_values(op, p);
  check_select_feasible(op, p);

  Tensor keep = torch::stable::new_empty(scores, {p.batch, p.num_kv_heads, p.capacity},
                                         ScalarType::Bool);
  Tensor new_lengths = torch::stable::new_empty(lengths, {p.batch, p.num_kv_heads},
                                                ScalarType::Int);
  p.keep = static_cast<bool*>(keep.mutable_data_ptr());
  p.new_lengths = static_cast<int32_t*>(new_lengths.mutable_data_ptr());
  const int64_t heads = p.batch * p.num_kv_heads;
  torch::stable::parallel_for(0, heads, select_grain(p), [&](int64_t begin, int64_t end) {
    cpu::SelectScratch s;
    for (int64_t h = begin; h < end; ++h)
      p.new_lengths[h] =
          static_cast<int32_t>(cpu::select_head(p, h / p.num_kv_heads, h % p.num_kv_heads, s));
  });
  return {keep, new_lengths};
}

void compact_cpu(const Tensor& k_cache, const Tensor& v_cache, const Tensor& lengths,
                 const Tensor& keep, const std::optional<Tensor>& positions,
                 const std::optional<Tensor>& hist, const std::optional<Tensor>& log_w) {
  const char* op = "kvkern::compact_";
  CompactParams p = make_compact_params(op, k_cache, v_cache, lengths, keep, positions, hist, log_w);
  STD_TORCH_CHECK(k_cache.is_cpu(), op, ": expected CPU tensors here");
  check_host_lengths(op, p);
  const int64_t es = element_size(k_cache.scalar_type());
  const int64_t heads = p.batch * p.num_kv_heads;
  torch::stable::parallel_for(0, heads, compact_grain(p), [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      cpu::compact_head(p, es, h / p.num_kv_heads, h % p.num_kv_heads);
  });
}

Tensor evict_cpu(const Tensor& k_cache, const Tensor& v_cache, const Tensor& lengths,
                 const std::optional<Tensor>& positions, const Tensor& scores,
                 const std::optional<Tensor>& budgets, int64_t budget, int64_t n_sink,
                 int64_t n_recent, const std::optional<Tensor>& protect_ranges,
                 const std::optional<Tensor>& keep_mask, const std::optional<Tensor>& segment_cuts,
                 const std::optional<Tensor>& segment_min, const std::optional<Tensor>& hist,
                 const std::optional<Tensor>& log_w) {
  const char* op = "kvkern::evict_";
  check_rank(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]");
  check_scores_match_cache(op, scores, k_cache);
  SelectParams sp = make_select_params(op, scores, lengths, positions, budgets, budget, n_sink,
                                       n_recent, protect_ranges, keep_mask, segment_cuts,
                                       segment_min);
  Tensor keep = torch::stable::new_empty(scores, {sp.batch, sp.num_kv_heads, sp.capacity},
                                         ScalarType::Bool);
  CompactParams cp =
      make_compact_params(op, k_cache, v_cache, lengths, keep, positions, hist, log_w);
  STD_TORCH_CHECK(k_cache.is_cpu(), op, ": expected CPU tensors here");
  check_select_values(op, sp);
  check_select_feasible(op, sp);

  sp.keep = static_cast<bool*>(keep.mutable_data_ptr());
  const int64_t es = element_size(k_cache.scalar_type());
  // Per head: select (reads lengths, positions, scores), then compact (rewrites
  // them); heads are independent.
  const int64_t grain = cpu::grain_for(select_work(sp) + compact_work(cp));
  torch::stable::parallel_for(0, sp.batch * sp.num_kv_heads, grain, [&](int64_t begin, int64_t end) {
    cpu::SelectScratch s;
    for (int64_t h = begin; h < end; ++h) {
      const int64_t b = h / sp.num_kv_heads, j = h % sp.num_kv_heads;
      cpu::select_head(sp, b, j, s);
      cpu::compact_head(cp, es, b, j);
    }
  });
  return keep;
}

Tensor allocate_head_budgets_cpu(const Tensor& scores, const Tensor& lengths, int64_t budget,
                                 double safeguard, int64_t n_sink, int64_t n_recent) {
  const char* op = "kvkern::allocate_head_budgets";
  HeadBudgetParams p =
      make_head_budget_params(op, scores, lengths, budget, safeguard, n_sink, n_recent);
  STD_TORCH_CHECK(scores.is_cpu(), op, ": expected CPU tensors here");
  check_host_lengths(op, p);
  Tensor out = torch::stable::new_empty(lengths, {p.batch, p.num_kv_heads}, ScalarType::Int);
  p.out = static_cast<int32_t*>(out.mutable_data_ptr());
  // one item = one batch element: a global top-k over its heads' scores
  const int64_t grain = cpu::grain_for(p.num_kv_heads * p.capacity * 4);
  torch::stable::parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) {
    cpu::BudgetScratch s;
    for (int64_t b = begin; b < end; ++b) cpu::allocate_batch(p, b, s);
  });
  return out;
}

}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("select_keep", TORCH_BOX(&kvkern::torch_glue::select_keep_cpu));
  m.impl("compact_", TORCH_BOX(&kvkern::torch_glue::compact_cpu));
  m.impl("evict_", TORCH_BOX(&kvkern::torch_glue::evict_cpu));
  m.impl("allocate_head_budgets", TORCH_BOX(&kvkern::torch_glue::allocate_head_budgets_cpu));
}
