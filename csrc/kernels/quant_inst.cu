// SPDX-License-Identifier: Apache-2.0
// The CUDA launchers of quant_launch.h: the run_* sequences of quant_kv.cuh
// over the real <<<>>> launch. tools/cuda_emu/quant_emu.cpp runs the same
// sequences with a CPU launcher, so only CudaLauncher is not emulated.
//
// Instantiated through the dispatch: quant_decode_kernel (v1) for {fp32,
// fp16, bf16} x bits {2, 4, 8} x head_dim {64, 128, 256}, quant_decode_tc_kernel
// (v2, quant_decode_tc.cuh) for {fp16, bf16} x bits x head_dim, the merge, and
// the prefill / append kernels for {fp32, fp16, bf16} x bits {2, 4, 8}.

#include <climits>

#include <kvkern/quant_kv.cuh>
#include <kvkern/quant_launch.h>

namespace kvkern {
namespace {

size_t quant_device_max_smem() {
  int dev = 0, v = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return 99 * 1024;
  }
  return static_cast<size_t>(v);
}

struct QuantCudaLauncher {
  cudaStream_t stream;
  size_t smem_limit;

  size_t max_smem() const { return smem_limit; }

  template <typename P>
  cudaError_t operator()(void (*kernel)(P), int64_t blocks, int threads, size_t smem, const P& params) const {
    if (blocks <= 0) return cudaSuccess;
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    if (smem > smem_limit) return cudaErrorInvalidValue;
    if (smem > 48 * 1024)
      KVKERN_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(params);
    return cudaGetLastError();
  }
};

}  // namespace

bool quant_layout_supported(const QuantKVParams& p) { return quant_detail::layout_ok(p); }

bool quant_decode_attention_supported(const QuantKVParams& p) { return quant_detail::attention_ok(p); }

int quant_decode_resolve_kernel(const QuantKVParams& p) {
  return quant_detail::resolve_kernel_variant(p, quant_device_max_smem());
}

size_t quant_decode_tc_smem_bytes(const QuantKVParams& p) { return quant_detail::tc_smem_bytes(p.bits, p.head_dim); }

size_t quant_decode_device_max_smem() { return quant_device_max_smem(); }

int quant_decode_default_splits(const QuantKVParams& p, int num_sms) {
  return quant_detail::default_splits(p, num_sms);
}

size_t quant_decode_attention_workspace_bytes(const QuantKVParams& p, int num_splits) {
  return quant_detail::attention_ws_bytes(p, num_splits);
}

void quant_decode_attention_set_workspace(QuantKVParams& p, int num_splits, void* workspace) {
  quant_detail::set_attention_ws(p, num_splits, workspace);
}

cudaError_t launch_quant_decode_attention(const QuantKVParams& p, KvDtype dtype, cudaStream_t stream) {
  QuantCudaLauncher l{stream, quant_device_max_smem()};
  return quant_detail::run_quant_decode_attention(p, dtype, l);
}

cudaError_t launch_quantize_kv(const QuantKVParams& p, KvDtype dtype, cudaStream_t stream) {
  QuantCudaLauncher l{stream, quant_device_max_smem()};
  return quant_detail::run_quantize_kv(p, dtype, l);
}

cudaError_t launch_append_quantized_kv(const QuantKVParams& p, KvDtype dtype, cudaStream_t stream) {
  QuantCudaLauncher l{stream, quant_device_max_smem()};
  return quant_detail::run_append_quantized_kv(p, dtype, l);
}

}  // namespace kvkern
