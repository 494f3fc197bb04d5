// SPDX-License-Identifier: Apache-2.0
// CUDA glue for the quantized-KV ops (quantize_kv_, append_quantized_kv_,
// quant_decode_attention): the shared checks of csrc/torch/quant_args.h (the
// same as the CPU glue's), CUDA-only checks, outputs and split-K workspace, one
// call into the torch-free launchers of quant_launch.h. dequantize_kv runs on
// CUDA through its Triton twin (it is not a hot path).
//
// No host sync and no allocation that depends on values: the decode loop
// (append + attention) captures in a CUDA graph. Lengths are not read here; the
// kernels never turn an out-of-range length into an address (quant_launch.h).

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cuda_runtime_api.h>
#include <kvkern/quant_launch.h>

#include <optional>
#include <tuple>

#include "torch/quant_args.h"

namespace kvkern::torch_glue {
namespace {

KvDtype kv_dtype_of(QuantDType d) {
  return d == QuantDType::kFloat16 ? KvDtype::kFloat16 : d == QuantDType::kBFloat16 ? KvDtype::kBFloat16
                                                                                      : KvDtype::kFloat32;
}

void check_launch(const char* op, cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, op, ": ", what, " failed: ", cudaGetErrorName(err), ": ",
                  cudaGetErrorString(err));
}

cudaStream_t current_stream(int32_t device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

int sm_count(int32_t device) {
  int n = 0;
  check_launch("kvkern", cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
               "querying the SM count");
  return n;
}

// The checked, framework-free description of the cache -> the CUDA launcher's struct.
QuantCudaParams to_cuda(const QuantKVParams& p) {
  QuantCudaParams c;
  auto rows = [](const QuantTensorRef& t, int64_t& sb, int64_t& sh, int64_t& sr) {
    sb = t.stride[0];
    sh = t.stride[1];
    sr = t.stride[2];
  };
  c.k_codes = static_cast<int32_t*>(p.k_codes.data);
  c.k_scale = p.k_scale.data;
  c.k_min = p.k_min.data;
  c.v_codes = static_cast<int32_t*>(p.v_codes.data);
  c.v_scale = p.v_scale.data;
  c.v_min = p.v_min.data;
  c.k_res = p.k_res.data;
  c.v_res = p.v_res.data;
  c.k_mean = p.k_mean.data;
  c.v_mean = p.v_mean.data;
  c.lengths = const_cast<int32_t*>(p.lengths);
  rows(p.k_codes, c.k_codes_sb, c.k_codes_sh, c.k_codes_sr);
  rows(p.k_scale, c.k_scale_sb, c.k_scale_sh, c.k_scale_sr);
  rows(p.k_min, c.k_min_sb, c.k_min_sh, c.k_min_sr);
  rows(p.v_codes, c.v_codes_sb, c.v_codes_sh, c.v_codes_sr);
  rows(p.v_scale, c.v_scale_sb, c.v_scale_sh, c.v_scale_sr);
  rows(p.v_min, c.v_min_sb, c.v_min_sh, c.v_min_sr);
  rows(p.k_res, c.k_res_sb, c.k_res_sh, c.k_res_sr);
  rows(p.v_res, c.v_res_sb, c.v_res_sh, c.v_res_sr);
  c.k_mean_sb = p.k_mean.stride[0];
  c.k_mean_sr = p.k_mean.stride[1];
  c.v_mean_sb = p.v_mean.stride[0];
  c.v_mean_sr = p.v_mean.stride[1];
  c.lengths_sb = p.lengths_stride_b;
  c.lengths_sh = p.lengths_stride_h;
  c.batch = p.batch;
  c.num_kv_heads = p.num_kv_heads;
  c.capacity = p.capacity;
  c.head_dim = p.head_dim;
  c.residual = p.residual;
  c.bits = p.bits;
  c.group = p.group;
  return c;
}

void quantize_kv_cuda(const Tensor& k, const Tensor& v, const Tensor& lengths, const Tensor& k_codes,
                      const Tensor& k_scale, const Tensor& k_min, const Tensor& v_codes, const Tensor& v_scale,
                      const Tensor& v_min, const Tensor& k_res, const Tensor& v_res,
                      const std::optional<Tensor>& k_mean, const std::optional<Tensor>& v_mean, int64_t bits,
                      int64_t group) {
  const char* op = "kvkern::quantize_kv_";
  QuantKVParams p = make_quant_cache_params(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
                                            k_mean, v_mean, lengths, bits, group);
  add_quantize_inputs(op, p, k, v, k_res);
  STD_TORCH_CHECK(k_res.is_cuda(), op, ": k_res: expected a CUDA tensor here, got a tensor on cpu");
  const int32_t device = k_res.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  QuantCudaParams c = to_cuda(p);
  c.k_in = p.k_in.data;
  c.v_in = p.v_in.data;
  c.k_in_sb = p.k_in.stride[0];
  c.k_in_sh = p.k_in.stride[1];
  c.k_in_sr = p.k_in.stride[2];
  c.v_in_sb = p.v_in.stride[0];
  c.v_in_sh = p.v_in.stride[1];
  c.v_in_sr = p.v_in.stride[2];
  c.seq_len = p.in_tokens;
  STD_TORCH_CHECK(quant_layout_supported(c), op, ": the CUDA kernels do not serve this layout; use backend=\"triton\"");
  if (p.batch * p.num_kv_heads == 0) return;
  check_launch(op, launch_quantize_kv(c, kv_dtype_of(p.dtype), current_stream(device)),
               "launching the quantize kernels");
}

void append_quantized_kv_cuda(const Tensor& k_new, const Tensor& v_new, const Tensor& lengths,
                              const Tensor& k_codes, const Tensor& k_scale, const Tensor& k_min,
                              const Tensor& v_codes, const Tensor& v_scale, const Tensor& v_min,
                              const Tensor& k_res, const Tensor& v_res, const std::optional<Tensor>& k_mean,
                              const std::optional<Tensor>& v_mean, int64_t bits, int64_t group) {
  const char* op = "kvkern::append_quantized_kv_";
  QuantKVParams p = make_quant_cache_params(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
                                            k_mean, v_mean, lengths, bits, group);
  add_append_inputs(op, p, k_new, v_new, k_res);
  STD_TORCH_CHECK(k_res.is_cuda(), op, ": k_res: expected a CUDA tensor here, got a tensor on cpu");
  const int32_t device = k_res.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  QuantCudaParams c = to_cuda(p);
  c.k_new = p.k_in.data;
  c.v_new = p.v_in.data;
  c.k_new_sb = p.k_in.stride[0];
  c.k_new_sh = p.k_in.stride[1];
  c.v_new_sb = p.v_in.stride[0];
  c.v_new_sh = p.v_in.stride[1];
  STD_TORCH_CHECK(quant_layout_supported(c), op, ": the CUDA kernels do not serve this layout; use backend=\"triton\"");
  if (p.batch * p.num_kv_heads == 0) return;
  check_launch(op, launch_append_quantized_kv(c, kv_dtype_of(p.dtype), current_stream(device)),
               "launching the append kernel");
}

std::tuple<Tensor, Tensor> quant_decode_attention_cuda(
    const Tensor& q, const Tensor& k_codes, const Tensor& k_scale, const Tensor& k_min, const Tensor& v_codes,
    const Tensor& v_scale, const Tensor& v_min, const Tensor& k_res, const Tensor& v_res,
    const std::optional<Tensor>& k_mean, const std::optional<Tensor>& v_mean, const Tensor& lengths, int64_t bits,
    int64_t group, std::optional<double> sm_scale, int64_t num_splits) {
  const char* op = "kvkern::quant_decode_attention";
  QuantKVParams p = make_quant_cache_params(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
                                            k_mean, v_mean, lengths, bits, group);
  add_attention_inputs(op, p, q, k_res, sm_scale, num_splits);
  STD_TORCH_CHECK(q.is_cuda(), op, ": q: expected a CUDA tensor here, got a tensor on cpu");
  const int32_t device = q.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  QuantCudaParams c = to_cuda(p);
  c.q = p.q;
  c.q_sb = p.q_stride_b;
  c.q_sh = p.q_stride_h;
  c.num_q_heads = p.num_q_heads;
  c.sm_scale = p.sm_scale;
  STD_TORCH_CHECK(quant_decode_attention_supported(c), op,
                  ": the CUDA kernel does not serve this shape (at most 8 query heads per kv head); "
                  "use backend=\"triton\"");
  Tensor out = torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.head_dim});
  Tensor lse = torch::stable::new_empty(q, {p.batch, p.num_q_heads}, ScalarType::Float);
  c.out = out.mutable_data_ptr();
  c.lse = static_cast<float*>(lse.mutable_data_ptr());
  if (out.numel() == 0) return {out, lse};
  const int splits = num_splits > 0 ? static_cast<int>(num_splits) : quant_decode_default_splits(c, sm_count(device));
  c.num_splits = splits;
  const size_t bytes = quant_decode_attention_workspace_bytes(c, splits);
  Tensor ws = torch::stable::new_empty(q, {static_cast<int64_t>(bytes > 0 ? bytes : 1)}, ScalarType::Byte);
  quant_decode_attention_set_workspace(c, splits, ws.mutable_data_ptr());
  check_launch(op, launch_quant_decode_attention(c, kv_dtype_of(p.dtype), current_stream(device)),
               "launching the quantized attention kernels");
  return {out, lse};
}

}  // namespace
}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CUDA, m) {
  m.impl("quantize_kv_", TORCH_BOX(&kvkern::torch_glue::quantize_kv_cuda));
  m.impl("append_quantized_kv_", TORCH_BOX(&kvkern::torch_glue::append_quantized_kv_cuda));
  m.impl("quant_decode_attention", TORCH_BOX(&kvkern::torch_glue::quant_decode_attention_cuda));
}
