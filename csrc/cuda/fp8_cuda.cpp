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

#include "cuda/compressed_cache_glue.h"
#include "torch/attention_outputs.h"
#include "torch/fp8_args.h"

namespace kvkern::torch_glue {
namespace {

// quantize_fp8_kv_ (prefill: k, v [B, Hkv, T, D]) and append_fp8_kv_ (k, v
// [B, Hkv, D]): the same checks and one launch of `launcher`.
void write_fp8_cache_cuda(const char* op, bool prefill, const Tensor& k, const Tensor& v, const Tensor& lengths,
                          const Tensor& k_scale, const Tensor& v_scale, const Tensor& k_fp8, const Tensor& v_fp8,
                          cudaError_t (*launcher)(const Fp8KVParams&, KvDtype, cudaStream_t), const char* what) {
  Fp8KVParams p = make_fp8_cache_params(op, k_fp8, v_fp8, k_scale, v_scale, lengths);
  add_fp8_inputs(op, p, k, v, prefill, k_fp8);
  STD_TORCH_CHECK(k_fp8.is_cuda(), op, ": k_fp8: expected a CUDA tensor here, got a tensor on cpu");
  const int32_t device = k_fp8.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  check_launch(op, launcher(p, kv_dtype_of(p.dtype), current_stream(device)), what);
}

void quantize_fp8_kv_cuda(const Tensor& k, const Tensor& v, const Tensor& lengths, const Tensor& k_scale,
                          const Tensor& v_scale, const Tensor& k_fp8, const Tensor& v_fp8) {
  write_fp8_cache_cuda("kvkern::quantize_fp8_kv_", /*prefill=*/true, k, v, lengths, k_scale, v_scale, k_fp8, v_fp8,
                       launch_quantize_fp8_kv, "launching the fp8 quantize kernel");
}

void append_fp8_kv_cuda(const Tensor& k_new, const Tensor& v_new, const Tensor& lengths, const Tensor& k_scale,
                        const Tensor& v_scale, const Tensor& k_fp8, const Tensor& v_fp8) {
  write_fp8_cache_cuda("kvkern::append_fp8_kv_", /*prefill=*/false, k_new, v_new, lengths, k_scale, v_scale, k_fp8,
                       v_fp8, launch_append_fp8_kv, "launching the fp8 append kernel");
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
  auto [out, lse] = new_attention_outputs(q, p);
  if (out.numel() == 0) return {out, lse};
  if (p.num_splits == 0) p.num_splits = fp8_decode_default_splits(p, sm_count(op, device));
  const auto partials = new_split_partials(q, p, out, lse);  // alive until the kernels are done
  check_launch(op, launch_fp8_decode_attention(p, kv_dtype_of(p.dtype), current_stream(device)),
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
