// SPDX-License-Identifier: Apache-2.0
// CUDA glue helpers of the compressed-cache ops (quant_cuda.cpp, fp8_cuda.cpp):
// the launchers' dtype tag, the current stream, the SM count and the one error
// a failed launch raises. Stable ABI only, like the rest of the glue.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/macros.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime_api.h>
#include <kvkern/decode_attention_launch.h>  // KvDtype
#include <kvkern/quant_params.h>             // QuantDType

#include <cstdint>

namespace kvkern::torch_glue {

inline KvDtype kv_dtype_of(QuantDType d) {
  return d == QuantDType::kFloat16 ? KvDtype::kFloat16 : d == QuantDType::kBFloat16 ? KvDtype::kBFloat16
                                                                                      : KvDtype::kFloat32;
}

inline void check_launch(const char* op, cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, op, ": ", what, " failed: ", cudaGetErrorName(err), ": ",
                  cudaGetErrorString(err));
}

inline cudaStream_t current_stream(int32_t device) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return static_cast<cudaStream_t>(stream);
}

inline int sm_count(const char* op, int32_t device) {
  int n = 0;
  check_launch(op, cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "querying the SM count");
  return n;
}

}  // namespace kvkern::torch_glue
