// SPDX-License-Identifier: Apache-2.0
// CPU glue for decode_attention: checks, output allocation, the launch
// configuration, and the parallel loop over (batch, kv head, split).

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <optional>
#include <tuple>

#include "cpu/decode_attention_glue.h"
#include "cpu/decode_attention_kernel.h"
#include "cpu/dtype_dispatch.h"
#include "torch/attention_outputs.h"
#include "torch/decode_attention_args.h"

namespace kvkern::torch_glue {
namespace {

constexpr int kCpuDefaultBlockN = 64;

template <typename T>
void run(const DecodeAttentionParams& p) {
  for_each_split_item(p, [&](int64_t begin, int64_t end) { cpu::decode_attention_items<T>(p, begin, end); });
  merge_split_partials<T>(p);
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

  auto [out, lse] = new_attention_outputs(q, p);
  if (out.numel() == 0) return {out, lse};
  const auto partials = new_split_partials(q, p, out, lse);  // alive until the kernels are done

  dispatch_cache_dtype(op, q.scalar_type(), [&](auto tag) { run<decltype(tag)>(p); });
  return {out, lse};
}

}  // namespace
}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("decode_attention", TORCH_BOX(&kvkern::torch_glue::decode_attention_cpu));
}
