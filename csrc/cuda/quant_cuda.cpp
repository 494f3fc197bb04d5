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

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>

#include "cuda/compressed_cache_glue.h"
#include "torch/quant_args.h"

namespace kvkern::torch_glue {
namespace {

// The tail quantize_kv_ and append_quantized_kv_ share once their inputs are checked: the CUDA
// device of the cache, the layouts the kernels serve, and one launch on the current stream.
template <class Launch>
void launch_cache_write(const char* op, const QuantKVParams& p, const Tensor& k_res, Launch launch,
                        const char* what) {
  STD_TORCH_CHECK(k_res.is_cuda(), op, ": k_res: expected a CUDA tensor here, got a tensor on cpu");
  const int32_t device = k_res.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  STD_TORCH_CHECK(quant_layout_supported(p), op, ": the CUDA kernels do not serve this layout; use backend=\"triton\"");
  if (p.batch * p.num_kv_heads == 0) return;
  check_launch(op, launch(p, kv_dtype_of(p.dtype), current_stream(device)), what);
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
  launch_cache_write(op, p, k_res, launch_quantize_kv, "launching the quantize kernels");
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
  launch_cache_write(op, p, k_res, launch_append_quantized_kv, "launching the append kernel");
}

// QuantKVParams::kernel_variant from KVKERN_QUANT_DECODE_KERNEL, a benchmarking switch: auto
// (unset or empty: the tensor-core kernel for fp16 / bf16 caches, the scalar one for fp32),
// scalar (v1), tc (the tensor-core kernel; fp16 / bf16 caches only).
int quant_decode_kernel_variant(const char* op, QuantDType dtype) {
  const char* env = std::getenv("KVKERN_QUANT_DECODE_KERNEL");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return 0;
  if (std::strcmp(env, "scalar") == 0) return 1;
  if (std::strcmp(env, "tc") == 0) {
    STD_TORCH_CHECK(dtype != QuantDType::kFloat32, op,
                    ": KVKERN_QUANT_DECODE_KERNEL=tc: the tensor-core kernel takes fp16 or bf16 caches, got float32 "
                    "(unset it or use auto / scalar)");
    return 2;
  }
  STD_TORCH_CHECK(false, op, ": KVKERN_QUANT_DECODE_KERNEL: expected auto, scalar or tc, got \"", env, "\"");
  return 0;
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
  QuantKVParams& c = p;
  c.kernel_variant = quant_decode_kernel_variant(op, p.dtype);
  if (c.kernel_variant == 2) {
    const size_t need = quant_decode_tc_smem_bytes(c), have = quant_decode_device_max_smem();
    STD_TORCH_CHECK(need <= have, op, ": KVKERN_QUANT_DECODE_KERNEL=tc: the tensor-core kernel needs ", need,
                    " bytes of shared memory per block for bits=", bits, ", D=", p.head_dim, "; this GPU allows ",
                    have, " (unset it or use auto / scalar)");
  }
  // Resolved before the split heuristic, which differs between the two kernels.
  c.kernel_variant = quant_decode_resolve_kernel(c);
  STD_TORCH_CHECK(quant_decode_attention_supported(c), op,
                  ": the CUDA kernel does not serve this shape (at most 8 query heads per kv head); "
                  "use backend=\"triton\"");
  Tensor out = torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.head_dim});
  Tensor lse = torch::stable::new_empty(q, {p.batch, p.num_q_heads}, ScalarType::Float);
  c.out = out.mutable_data_ptr();
  c.lse = static_cast<float*>(lse.mutable_data_ptr());
  if (out.numel() == 0) return {out, lse};
  const int splits = num_splits > 0 ? static_cast<int>(num_splits) : quant_decode_default_splits(c, sm_count("kvkern", device));
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
