// SPDX-License-Identifier: Apache-2.0
// The CUDA launchers of fp8_launch.h: the run_* sequences of fp8_kv.cuh over the
// real <<<>>> launch (tools/cuda_emu/quant_emu.cpp runs the same sequences with
// a CPU launcher). Instantiated through the dispatch: fp8_decode_kernel for
// {fp32, fp16, bf16} x head_dim {64, 128, 256} x heads tile {1, 2, 4, 8}, the
// merge, and quantize / append for {fp32, fp16, bf16}.

#include <climits>

#include <kvkern/fp8_kv.cuh>
#include <kvkern/fp8_launch.h>

namespace kvkern {
namespace {

struct Fp8CudaLauncher {
  cudaStream_t stream;

  template <typename P>
  cudaError_t operator()(void (*kernel)(P), int64_t blocks, int threads, size_t smem, const P& params) const {
    if (blocks <= 0) return cudaSuccess;
    if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
    if (smem > 48 * 1024) return cudaErrorInvalidValue;  // the fp8 kernels stay below (fp8_smem_bytes)
    kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(params);
    return cudaGetLastError();
  }
};

}  // namespace

bool fp8_decode_attention_supported(const Fp8KVParams& p) { return fp8_detail::attention_ok(p); }

int fp8_decode_default_splits(const Fp8KVParams& p, int num_sms) { return fp8_detail::default_splits(p, num_sms); }

cudaError_t launch_fp8_decode_attention(const Fp8KVParams& p, KvDtype dtype, cudaStream_t stream) {
  Fp8CudaLauncher l{stream};
  return fp8_detail::run_fp8_decode_attention(p, dtype, l);
}

cudaError_t launch_quantize_fp8_kv(const Fp8KVParams& p, KvDtype dtype, cudaStream_t stream) {
  Fp8CudaLauncher l{stream};
  return fp8_detail::run_quantize_fp8_kv(p, dtype, l);
}

cudaError_t launch_append_fp8_kv(const Fp8KVParams& p, KvDtype dtype, cudaStream_t stream) {
  Fp8CudaLauncher l{stream};
  return fp8_detail::run_append_fp8_kv(p, dtype, l);
}

}  // namespace kvkern
