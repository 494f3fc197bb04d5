// SPDX-License-Identifier: Apache-2.0
// CUDA glue for the FP8-KV ops: the shared checks of csrc/torch/fp8_args.h
// (the same as the CPU glue's), CUDA-only checks, outputs and the split-K
// workspace, one call into the torch-free launchers of fp8_launch.h.
//
// No host sync and no allocation that depends on values: the decode loop
// (append + attention) captures in a CUDA graph. Lengths and scales are not
// read here; the kernels never turn an out-of-range length into an address
// (a full head's append is a no-op, a bad length gives NaN attention).

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cuda_runtime_api.h>
#include <kvkern/fp8_launch.h>

#include <optional>
#include <tuple>

#include "torch/fp8_args.h"

namespace kvkern::torch_glue {
namespace {

KvDtype fp8_kv_dtype_of(QuantDType d) {
  return d == QuantDType::kFloat16 ? KvDtype::kFloat16 : d == QuantDType::kBFloat16 ? KvDtype::kBFloat16
                                                                                      : KvDtype::kFloat32;
}

void fp8_check_launch(const char* op, cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, op, ": ", what, " failed: ", cudaGetErrorName(err), ": ",
                  cudaGetErrorString(err));
}

cudaStream_t fp8_current_stream(int32_t device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

void quantize_fp8_kv_cuda(const Tensor& k, const Tensor& v, const Tensor& lengths, const Tensor& k_scale,
                          const Tensor& v_scale, const Tensor& k_fp8, const Tensor& v_fp8) {
  const char* op = "kvkern::quantize_fp8_kv_";
  Fp8KVParams p = make_fp8_cache_params(op, k_fp8, v_fp8, k_scale, v_scale, lengths);
  add_fp8_inputs(op, p, k, v, /*prefill=*/true, k_fp8);
  STD_TORCH_CHECK(k_fp8.is_cuda(), op, ": k_fp8: expected a CUDA tensor here, got a tensor on cpu");
  const int32_t device = k_fp8.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  fp8_check_launch(op, launch_quantize_fp8_kv(p, fp8_kv_dtype_of(p.dtype), fp8_current_stream(device)),
                   "launching the fp8 quantize kernel");
}

void append_fp8_kv_cuda(const Tensor& k_new, const Tensor& v_new, const Tensor& lengths, const Tensor& k_scale,
                        const Tensor& v_scale, const Tensor& k_fp8, const Tensor& v_fp8) {
  const char* op = "kvkern::append_fp8_kv_";
  Fp8KVParams p = make_fp8_cache_params(op, k_fp8, v_fp8, k_scale, v_scale, lengths);
  add_fp8_inputs(op, p, k_new, v_new, /*prefill=*/false, k_fp8);
  STD_TORCH_CHECK(k_fp8.is_cuda(), op, ": k_fp8: expected a CUDA tensor here, got a tensor on cpu");
  const int32_t device = k_fp8.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  fp8_check_launch(op, launch_append_fp8_kv(p, fp8_kv_dtype_of(p.dtype), fp8_current_stream(device)),
                   "launching the fp8 append kernel");
}

std::tuple<Tensor, Tensor> fp8_decode_attention_cuda(const Tensor& q, const Tensor& k_fp8, const Tensor& v_fp8,
                                                     const Tensor& k_scale, const Tensor& v_scale,
                                                     const Tensor& lengths, std::optional<double> sm_scale,
                                                     int64_t num_splits, int64_t block_n, int64_t num_warps,
                                                     int64_t num_stages) {
  const char* op = "kvkern::fp8_decode_attention";
  Fp8KVParams p = make_fp8_cache_params(op, k_fp8, v_fp8, k_scale, v_scale, lengths);
  add_fp8_attention_inputs(op, p, q, k_fp8, sm_scale, num_splits);
  // The kernel's tile and warps are fixed; the knobs exist for the schema's sake
  // (decode_attention's launch config) and must be 0 = heuristic here.
  STD_TORCH_CHECK(block_n == 0 && num_warps == 0 && num_stages == 0, op,
                  ": block_n, num_warps, num_stages: the CUDA kernel has a fixed configuration, expected 0 "
                  "(got ", block_n, ", ", num_warps, ", ", num_stages, ")");
  STD_TORCH_CHECK(q.is_cuda(), op, ": q: expected a CUDA tensor here, got a tensor on cpu");
  const int32_t device = q.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  // Shapes and strides only (never values): the same inputs are refused every time.
  STD_TORCH_CHECK(fp8_decode_attention_supported(p), op,
                  ": k_fp8 / v_fp8: the CUDA kernel needs 8-byte aligned rows (strides multiples of 8); "
                  "use backend=\"triton\" or a contiguous cache");
  Tensor out = torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.head_dim});
  Tensor lse = torch::stable::new_empty(q, {p.batch, p.num_q_heads}, ScalarType::Float);
  p.out = out.mutable_data_ptr();
  p.lse = static_cast<float*>(lse.mutable_data_ptr());
  if (out.numel() == 0) return {out, lse};
  if (p.num_splits == 0) {
    int sms = 0;
    fp8_check_launch(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                     "querying the SM count");
    p.num_splits = fp8_decode_default_splits(p, sms);
  }
  Tensor partial_out = out, partial_lse = lse;
  if (p.num_splits > 1) {
    partial_out = torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.num_splits, p.head_dim}, ScalarType::Float);
    partial_lse = torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.num_splits}, ScalarType::Float);
    p.partial_out = static_cast<float*>(partial_out.mutable_data_ptr());
    p.partial_lse = static_cast<float*>(partial_lse.mutable_data_ptr());
  }
  fp8_check_launch(op, launch_fp8_decode_attention(p, fp8_kv_dtype_of(p.dtype), fp8_current_stream(device)),
                   "launching the fp8 attention kernels");
  return {out, lse};
}

}  // namespace
}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CUDA, m) {
  m.impl("quantize_fp8_kv_", TORCH_BOX(&kvkern::torch_glue::quantize_fp8_kv_cuda));
  m.impl("append_fp8_kv_", TORCH_BOX(&kvkern::torch_glue::append_fp8_kv_cuda));
  m.impl("fp8_decode_attention", TORCH_BOX(&kvkern::torch_glue::fp8_decode_attention_cuda));
}
