// SPDX-License-Identifier: Apache-2.0
// CPU glue for decode_attention: checks, output allocation, the launch
// configuration, and the parallel loop over (batch, kv head, split).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <optional>
#include <tuple>

#include "cpu/decode_attention_kernel.h"
#include "cpu/dtype_dispatch.h"
#include "torch/decode_attention_args.h"

namespace kvkern::torch_glue {
namespace {

constexpr int kCpuDefaultBlockN = 64;

// Enough (batch, head, split) items for every thread to get two, without
// splitting a head into pieces shorter than four tiles.
int64_t cpu_default_num_splits(int64_t items, int64_t capacity, int64_t block_n) {
  const int64_t threads = static_cast<int64_t>(torch::stable::get_num_threads());
  if (items == 0 || items >= 2 * threads) return 1;
  int64_t want = (2 * threads + items - 1) / items;
  int64_t most = capacity / (4 * block_n);
  if (most < 1) most = 1;
  return want < most ? want : most;
}

template <typename T>
void run(const DecodeAttentionParams& p) {
  const int64_t items = p.batch * p.num_kv_heads * p.num_splits;
  torch::stable::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    cpu::decode_attention_items<T>(p, begin, end);
  });
  if (p.num_splits > 1) {
    torch::stable::parallel_for(0, p.batch * p.num_q_heads, 16, [&](int64_t begin, int64_t end) {
      cpu::merge_states_rows<T>(p.partial_out, p.partial_lse, static_cast<T*>(p.out), p.lse,
                                p.num_splits, p.head_dim, begin, end);
    });
  }
}

std::tuple<Tensor, Tensor> decode_attention_cpu(const Tensor& q, const Tensor& k_cache,
                                                const Tensor& v_cache, const Tensor& lengths,
                                                const std::optional<Tensor>& log_w,
                                                std::optional<double> sm_scale, int64_t num_splits,
                                                int64_t block_n, int64_t num_warps,
                                                int64_t num_stages) {
  const char* op = "kvkern::decode_attention";
  DecodeAttentionParams p = make_decode_attention_params(
      op, q, k_cache, v_cache, lengths, log_w, sm_scale, num_splits, block_n, num_warps, num_stages);
  STD_TORCH_CHECK(q.is_cpu(), op, ": expected CPU tensors here");

  // On CPU, reading lengths costs nothing, so out-of-range values are an error.
  check_host_lengths(op, p);

  p.block_n = block_n > 0 ? static_cast<int>(block_n) : kCpuDefaultBlockN;
  p.num_splits = num_splits > 0 ? static_cast<int>(num_splits)
                                : static_cast<int>(cpu_default_num_splits(
                                      p.batch * p.num_kv_heads, p.capacity, p.block_n));

  Tensor out = torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.head_dim});
  Tensor lse = torch::stable::new_empty(q, {p.batch, p.num_q_heads}, ScalarType::Float);
  p.out = out.mutable_data_ptr();
  p.lse = static_cast<float*>(lse.mutable_data_ptr());
  if (out.numel() == 0) return {out, lse};

  Tensor partial_out = out, partial_lse = lse;  // placeholders when there is one split
  if (p.num_splits > 1) {
    partial_out = torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.num_splits, p.head_dim},
                                           ScalarType::Float);
    partial_lse = torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.num_splits},
                                           ScalarType::Float);
    p.partial_out = static_cast<float*>(partial_out.mutable_data_ptr());
    p.partial_lse = static_cast<float*>(partial_lse.mutable_data_ptr());
  }

  dispatch_cache_dtype(op, q.scalar_type(), [&](auto tag) { run<decltype(tag)>(p); });
  return {out, lse};
}

}  // namespace
}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("decode_attention", TORCH_BOX(&kvkern::torch_glue::decode_attention_cpu));
}
