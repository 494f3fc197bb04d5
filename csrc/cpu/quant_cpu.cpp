// SPDX-License-Identifier: Apache-2.0
// CPU glue for the quantized-KV ops: checks (csrc/torch/quant_args.h plus the
// value checks that are free on CPU), outputs, and the parallel loops.
// Every check runs before the first write, so bad input never half-writes a cache.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <optional>
#include <tuple>

#include "cpu/decode_attention_glue.h"
#include "cpu/quant_kernel.h"
#include "torch/attention_outputs.h"
#include "torch/quant_args.h"

namespace kvkern::torch_glue {
namespace {

constexpr int kCpuQuantBlockN = 64;  // a multiple of 32: tiles start on code-word boundaries

template <typename F>
void dispatch_dtype(const char* op, QuantDType dt, F&& f) {
  switch (dt) {
    case QuantDType::kFloat32: f(float{}); break;
    case QuantDType::kFloat16: f(cpu::Half{}); break;
    case QuantDType::kBFloat16: f(cpu::BFloat16{}); break;
    default: STD_TORCH_CHECK(false, op, ": unreachable dtype");
  }
}

template <typename T, typename F>
void dispatch_bits(int bits, F&& f) {
  if (bits == 2) f(std::integral_constant<int, 2>{});
  else if (bits == 4) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

void quantize_kv_cpu(const Tensor& k, const Tensor& v, const Tensor& lengths, const Tensor& k_codes, const Tensor& k_scale,
                     const Tensor& k_min, const Tensor& v_codes, const Tensor& v_scale, const Tensor& v_min, const Tensor& k_res, const Tensor& v_res,
                     const std::optional<Tensor>& k_mean, const std::optional<Tensor>& v_mean, int64_t bits, int64_t group) {
  const char* op = "kvkern::quantize_kv_";
  QuantKVParams p = make_quant_cache_params(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
                                            k_mean, v_mean, lengths, bits, group);
  add_quantize_inputs(op, p, k, v, k_res);
  STD_TORCH_CHECK(k_res.is_cpu(), op, ": expected CPU tensors here");
  check_quant_lengths(op, p, p.in_tokens, "T = k.size(2)");
  dispatch_dtype(op, p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (p.mean_centred())
      torch::stable::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
        cpu::quantize_kv_means<T>(p, b0, b1);
      });
    torch::stable::parallel_for(0, p.batch * p.num_kv_heads, 1, [&](int64_t i0, int64_t i1) {
      cpu::quantize_kv_heads<T>(p, i0, i1);
    });
  });
}

std::tuple<Tensor, Tensor> dequantize_kv_cpu(const Tensor& k_codes, const Tensor& k_scale, const Tensor& k_min,
                                             const Tensor& v_codes, const Tensor& v_scale, const Tensor& v_min,
                                             const Tensor& k_res, const Tensor& v_res,
                                             const std::optional<Tensor>& k_mean,
                                             const std::optional<Tensor>& v_mean, const Tensor& lengths,
                                             int64_t bits, int64_t group) {
  const char* op = "kvkern::dequantize_kv";
  QuantKVParams p = make_quant_cache_params(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
                                            k_mean, v_mean, lengths, bits, group);
  STD_TORCH_CHECK(k_res.is_cpu(), op, ": expected CPU tensors here");
  check_quant_lengths(op, p, p.capacity, "C");
  Tensor k_out = torch::stable::new_empty(k_res, {p.batch, p.num_kv_heads, p.capacity, p.head_dim});
  Tensor v_out = torch::stable::new_empty(k_res, {p.batch, p.num_kv_heads, p.capacity, p.head_dim});
  p.k_out = k_out.mutable_data_ptr();
  p.v_out = v_out.mutable_data_ptr();
  dispatch_dtype(op, p.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bits<T>(p.bits, [&](auto bits_tag) {
      constexpr int BITS = decltype(bits_tag)::value;
      torch::stable::parallel_for(0, p.batch * p.num_kv_heads, 1, [&](int64_t i0, int64_t i1) {
        cpu::dequantize_kv_heads<T, BITS>(p, i0, i1);
      });
    });
  });
  return {k_out, v_out};
}

void append_quantized_kv_cpu(const Tensor& k_new, const Tensor& v_new, const Tensor& lengths, const Tensor& k_codes,
                             const Tensor& k_scale, const Tensor& k_min, const Tensor& v_codes, const Tensor& v_scale, const Tensor& v_min,
                             const Tensor& k_res, const Tensor& v_res, const std::optional<Tensor>& k_mean,
                             const std::optional<Tensor>& v_mean, int64_t bits, int64_t group) {
  const char* op = "kvkern::append_quantized_kv_";
  QuantKVParams p = make_quant_cache_params(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
                                            k_mean, v_mean, lengths, bits, group);
  add_append_inputs(op, p, k_new, v_new, k_res);
  STD_TORCH_CHECK(k_res.is_cpu(), op, ": expected CPU tensors here");
  // A full cache has no slot for the new token.
  check_quant_lengths(op, p, p.capacity - 1, "C - 1");
  dispatch_dtype(op, p.dtype, [&](auto tag) {
    using T = decltype(tag);
    torch::stable::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
      cpu::append_quantized_kv_batches<T>(p, b0, b1);
    });
  });
}

std::tuple<Tensor, Tensor> quant_decode_attention_cpu(
    const Tensor& q, const Tensor& k_codes, const Tensor& k_scale, const Tensor& k_min, const Tensor& v_codes,
    const Tensor& v_scale, const Tensor& v_min, const Tensor& k_res, const Tensor& v_res,
    const std::optional<Tensor>& k_mean, const std::optional<Tensor>& v_mean, const Tensor& lengths, int64_t bits,
    int64_t group, std::optional<double> sm_scale, int64_t num_splits) {
  const char* op = "kvkern::quant_decode_attention";
  QuantKVParams p = make_quant_cache_params(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
                                            k_mean, v_mean, lengths, bits, group);
  add_attention_inputs(op, p, q, k_res, sm_scale, num_splits);
  STD_TORCH_CHECK(q.is_cpu(), op, ": expected CPU tensors here");
  check_quant_lengths(op, p, p.capacity, "C");

  p.block_n = kCpuQuantBlockN;
  p.num_splits = num_splits > 0 ? static_cast<int>(num_splits)
                                : static_cast<int>(cpu_default_num_splits(p.batch * p.num_kv_heads, p.capacity,
                                                                          p.block_n));
  auto [out, lse] = new_attention_outputs(q, p);
  if (out.numel() == 0) return {out, lse};
  const auto partials = new_split_partials(q, p, out, lse);  // alive until the kernels are done
  dispatch_dtype(op, p.dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_bits<T>(p.bits, [&](auto bits_tag) {
      constexpr int BITS = decltype(bits_tag)::value;
      for_each_split_item(p, [&](int64_t i0, int64_t i1) { cpu::quant_decode_attention_items<T, BITS>(p, i0, i1); });
    });
    merge_split_partials<T>(p);
  });
  return {out, lse};
}

}  // namespace
}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("quantize_kv_", TORCH_BOX(&kvkern::torch_glue::quantize_kv_cpu));
  m.impl("dequantize_kv", TORCH_BOX(&kvkern::torch_glue::dequantize_kv_cpu));
  m.impl("append_quantized_kv_", TORCH_BOX(&kvkern::torch_glue::append_quantized_kv_cpu));
  m.impl("quant_decode_attention", TORCH_BOX(&kvkern::torch_glue::quant_decode_attention_cpu));
}
