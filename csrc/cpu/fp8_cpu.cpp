// SPDX-License-Identifier: Apache-2.0
// CPU glue for the FP8-KV ops: checks (csrc/torch/fp8_args.h plus the value
// checks that are free on CPU), outputs, and the parallel loops. Every check
// runs before the first write, so bad input never half-writes a cache.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <optional>
#include <tuple>

#include "cpu/decode_attention_glue.h"
#include "cpu/fp8_kernel.h"
#include "torch/attention_outputs.h"
#include "torch/fp8_args.h"

namespace kvkern::torch_glue {
namespace {

constexpr int kCpuFp8BlockN = 64;

template <typename F>
void dispatch_fp8_dtype(QuantDType dt, F&& f) {
  switch (dt) {
    case QuantDType::kFloat16: f(cpu::Half{}); break;
    case QuantDType::kBFloat16: f(cpu::BFloat16{}); break;
    default: f(float{}); break;
  }
}

void quantize_fp8_kv_cpu(const Tensor& k, const Tensor& v, const Tensor& lengths, const Tensor& k_scale,
                         const Tensor& v_scale, const Tensor& k_fp8, const Tensor& v_fp8) {
  const char* op = "kvkern::quantize_fp8_kv_";
  Fp8KVParams p = make_fp8_cache_params(op, k_fp8, v_fp8, k_scale, v_scale, lengths);
  add_fp8_inputs(op, p, k, v, /*prefill=*/true, k_fp8);
  STD_TORCH_CHECK(k_fp8.is_cpu(), op, ": expected CPU tensors here");
  check_fp8_values(op, p, p.in_tokens, "T = k.size(2)");
  dispatch_fp8_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    torch::stable::parallel_for(0, p.batch * p.num_kv_heads, 1, [&](int64_t i0, int64_t i1) {
      cpu::quantize_fp8_kv_heads<T>(p, i0, i1);
    });
  });
}

void append_fp8_kv_cpu(const Tensor& k_new, const Tensor& v_new, const Tensor& lengths, const Tensor& k_scale,
                       const Tensor& v_scale, const Tensor& k_fp8, const Tensor& v_fp8) {
  const char* op = "kvkern::append_fp8_kv_";
  Fp8KVParams p = make_fp8_cache_params(op, k_fp8, v_fp8, k_scale, v_scale, lengths);
  add_fp8_inputs(op, p, k_new, v_new, /*prefill=*/false, k_fp8);
  STD_TORCH_CHECK(k_fp8.is_cpu(), op, ": expected CPU tensors here");
  // A full head has no slot for the new token.
  check_fp8_values(op, p, p.capacity - 1, "C - 1");
  dispatch_fp8_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    torch::stable::parallel_for(0, p.batch * p.num_kv_heads, 16, [&](int64_t i0, int64_t i1) {
      cpu::append_fp8_kv_heads<T>(p, i0, i1);
    });
  });
}

std::tuple<Tensor, Tensor> fp8_decode_attention_cpu(const Tensor& q, const Tensor& k_fp8, const Tensor& v_fp8,
                                                    const Tensor& k_scale, const Tensor& v_scale,
                                                    const Tensor& lengths, std::optional<double> sm_scale,
                                                    int64_t num_splits, int64_t block_n, int64_t num_warps,
                                                    int64_t num_stages) {
  const char* op = "kvkern::fp8_decode_attention";
  Fp8KVParams p = make_fp8_cache_params(op, k_fp8, v_fp8, k_scale, v_scale, lengths);
  add_fp8_attention_inputs(op, p, q, k_fp8, sm_scale, num_splits);
  check_launch_config(op, num_splits, block_n, num_warps, num_stages);
  STD_TORCH_CHECK(q.is_cpu(), op, ": expected CPU tensors here");
  check_fp8_values(op, p, p.capacity, "C");
  p.block_n = block_n > 0 ? static_cast<int>(block_n) : kCpuFp8BlockN;
  p.num_splits = num_splits > 0 ? static_cast<int>(num_splits)
                                : static_cast<int>(cpu_default_num_splits(p.batch * p.num_kv_heads, p.capacity,
                                                                          p.block_n));
  auto [out, lse] = new_attention_outputs(q, p);
  if (out.numel() == 0) return {out, lse};
  const auto partials = new_split_partials(q, p, out, lse);  // alive until the kernels are done
  dispatch_fp8_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_split_item(p, [&](int64_t i0, int64_t i1) { cpu::fp8_decode_attention_items<T>(p, i0, i1); });
    merge_split_partials<T>(p);
  });
  return {out, lse};
}

}  // namespace
}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("quantize_fp8_kv_", TORCH_BOX(&kvkern::torch_glue::quantize_fp8_kv_cpu));
  m.impl("append_fp8_kv_", TORCH_BOX(&kvkern::torch_glue::append_fp8_kv_cpu));
  m.impl("fp8_decode_attention", TORCH_BOX(&kvkern::torch_glue::fp8_decode_attention_cpu));
}
