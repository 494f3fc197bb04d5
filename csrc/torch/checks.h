// SPDX-License-Identifier: Apache-2.0
// Input checks shared by the CPU and CUDA glue. Each failure is one error that
// names the op, the argument, what was expected and what came.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cstdint>
#include <sstream>
#include <string>

namespace kvkern::torch_glue {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

inline std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "[";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << "]";
  return os.str();
}

inline const char* dtype_name(ScalarType s) {
  switch (s) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Double: return "float64";
    case ScalarType::Bool: return "bool";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Char: return "int8";
    default: return "an unsupported dtype";
  }
}

inline void check_rank(const char* op, const char* name, const Tensor& t, int64_t rank,
                       const char* layout) {
  STD_TORCH_CHECK(t.dim() == rank, op, ": ", name, ": expected a ", rank, "-D tensor ", layout,
                  ", got a ", t.dim(), "-D tensor of shape ", shape_str(t));
}

inline void check_dtype(const char* op, const char* name, const Tensor& t, ScalarType want) {
  STD_TORCH_CHECK(t.scalar_type() == want, op, ": ", name, ": expected dtype ", dtype_name(want),
                  ", got ", dtype_name(t.scalar_type()));
}

inline void check_dim_size(const char* op, const char* name, const Tensor& t, int64_t dim,
                           int64_t want, const char* what) {
  STD_TORCH_CHECK(t.size(dim) == want, op, ": ", name, ": expected size ", want, " in dim ", dim,
                  " (", what, "), got shape ", shape_str(t));
}

inline void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                              const char* ref_name) {
  bool same = t.is_cuda() == ref.is_cuda() && t.is_cpu() == ref.is_cpu() &&
              t.get_device_index() == ref.get_device_index();
  STD_TORCH_CHECK(same, op, ": ", name, ": expected the same device as ", ref_name,
                  " (", ref.is_cuda() ? "cuda:" : "cpu:", ref.get_device_index(), "), got ",
                  t.is_cuda() ? "cuda:" : "cpu:", t.get_device_index());
}

// Kernels index rows through strides but read each row as one contiguous vector.
inline void check_last_dim_contiguous(const char* op, const char* name, const Tensor& t) {
  STD_TORCH_CHECK(t.size(t.dim() - 1) <= 1 || t.stride(t.dim() - 1) == 1, op, ": ", name,
                  ": expected the last dimension to be contiguous (stride 1), got stride ",
                  t.stride(t.dim() - 1));
}

}  // namespace kvkern::torch_glue
