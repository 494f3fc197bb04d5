// SPDX-License-Identifier: Apache-2.0
// Input checks shared by the CPU and CUDA glue. Each failure is one error that
// names the op, the argument, what was expected and what came.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <optional>
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

// A cache dtype: float32, float16 or bfloat16.
inline void check_cache_dtype(const char* op, const char* name, const Tensor& t) {
  const ScalarType dt = t.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::Float || dt == ScalarType::Half || dt == ScalarType::BFloat16,
                  op, ": ", name, ": expected dtype float16, bfloat16 or float32, got ",
                  dtype_name(dt));
}

// `t` has the shape of `ref` (e.g. v_cache of k_cache).
inline void check_same_shape(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                             const char* ref_name) {
  bool same = t.dim() == ref.dim();
  for (int64_t d = 0; same && d < t.dim(); ++d) same = t.size(d) == ref.size(d);
  STD_TORCH_CHECK(same, op, ": ", name, ": expected the shape of ", ref_name, " ", shape_str(ref),
                  ", got ", shape_str(t));
}

// Grouped-query attention: Hq query heads share Hkv >= 1 kv heads in equal groups.
inline void check_head_groups(const char* op, const char* q_name, int64_t Hq, const char* k_name,
                              const Tensor& k_cache) {
  const int64_t Hkv = k_cache.size(1);
  STD_TORCH_CHECK(Hkv > 0, op, ": ", k_name, ": expected at least one kv head, got shape ",
                  shape_str(k_cache));
  STD_TORCH_CHECK(Hq > 0 && Hq % Hkv == 0, op, ": ", q_name,
                  ": expected the number of query heads (", Hq,
                  ") to be a positive multiple of the number of kv heads (", Hkv, ")");
}

// The softmax scale: sm_scale, by default 1 / sqrt(D); finite either way.
inline double resolve_sm_scale(const char* op, std::optional<double> sm_scale, int64_t D) {
  const double scale = sm_scale.has_value() ? *sm_scale : 1.0 / std::sqrt(static_cast<double>(D));
  // The kernels take it as a float: a double beyond FLT_MAX would become inf there and the
  // softmax NaN, so finiteness is checked on the float.
  STD_TORCH_CHECK(std::isfinite(static_cast<float>(scale)), op,
                  ": sm_scale: expected a finite float32 number, got ", scale);
  return scale;
}

// Launch-config bounds. The schema's ints are int64 and the kernels' are int: without a bound
// a value like 2**32 wraps to 0 (a division by zero) or a negative count (no work, garbage
// out). The split limit is CUDA's grid y/z limit, which the Triton launchers share.
constexpr int64_t kMaxNumSplits = 65535;
constexpr int64_t kMaxBlockN = 4096;
constexpr int64_t kMaxNumWarps = 32;
constexpr int64_t kMaxNumStages = 16;

// One launch-config value: 0 (= the heuristic) or in [1, most].
inline void check_launch_value(const char* op, const char* name, int64_t value, int64_t most) {
  STD_TORCH_CHECK(value >= 0 && value <= most, op, ": ", name, ": expected 0 (heuristic) or a value in [1, ",
                  most, "], got ", value);
}

inline void check_launch_config(const char* op, int64_t num_splits, int64_t block_n, int64_t num_warps,
                                int64_t num_stages) {
  check_launch_value(op, "num_splits", num_splits, kMaxNumSplits);
  check_launch_value(op, "block_n", block_n, kMaxBlockN);
  check_launch_value(op, "num_warps", num_warps, kMaxNumWarps);
  check_launch_value(op, "num_stages", num_stages, kMaxNumStages);
}

// "[2, 4]": sizes for a message.
inline std::string dims_str(std::initializer_list<int64_t> dims) {
  std::ostringstream os;
  os << "[";
  bool first = true;
  for (int64_t d : dims) {
    os << (first ? "" : ", ") << d;
    first = false;
  }
  os << "]";
  return os.str();
}

// `t` (of the right rank) has exactly the sizes `want`; `layout` names them,
// e.g. "[B, Hkv]" for "lengths: expected shape [B, Hkv] = [2, 4], got [2, 3]".
inline void check_shape(const char* op, const char* name, const Tensor& t, const char* layout,
                        std::initializer_list<int64_t> want) {
  bool same = t.dim() == static_cast<int64_t>(want.size());
  std::ostringstream os;
  os << "[";
  int64_t d = 0;
  for (int64_t w : want) {
    same = same && t.size(d) == w;
    os << (d++ ? ", " : "") << w;
  }
  os << "]";
  STD_TORCH_CHECK(same, op, ": ", name, ": expected shape ", layout, " = ", os.str(), ", got ",
                  shape_str(t));
}

// A per-head int32 tensor [B, Hkv] (lengths, budgets) on `ref`'s device.
inline void check_head_ints(const char* op, const char* name, const Tensor& t, int64_t B,
                            int64_t H, const Tensor& ref, const char* ref_name) {
  check_rank(op, name, t, 2, "[B, Hkv]");
  check_dtype(op, name, t, ScalarType::Int);
  check_same_device(op, name, t, ref, ref_name);
  check_shape(op, name, t, "[B, Hkv]", {B, H});
}

// A per-slot [B, Hkv, C] tensor of `dtype` on `ref`'s device, last dim contiguous.
inline void check_slot_tensor(const char* op, const char* name, const Tensor& t, ScalarType dtype,
                              int64_t B, int64_t H, int64_t C, const Tensor& ref,
                              const char* ref_name) {
  check_rank(op, name, t, 3, "[B, Hkv, C]");
  check_dtype(op, name, t, dtype);
  check_same_device(op, name, t, ref, ref_name);
  check_shape(op, name, t, "[B, Hkv, C]", {B, H, C});
  check_last_dim_contiguous(op, name, t);
}

// Every value of a per-head int32 array (host memory, strides in elements) in
// [0, C]: only where reading is free, i.e. on CPU (on CUDA it needs a host sync).
inline void check_host_lengths(const char* op, const char* name, const int32_t* v,
                               int64_t stride_b, int64_t stride_h, int64_t B, int64_t H,
                               int64_t C) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < H; ++j) {
      const int32_t len = v[b * stride_b + j * stride_h];
      STD_TORCH_CHECK(len >= 0 && len <= C, op, ": ", name,
                      ": expected every value in [0, C] = [0, ", C, "], got ", len, " at [", b,
                      ", ", j, "]");
    }
}

// The same for the lengths of a Params struct (lengths, lengths_stride_b/h,
// batch, num_kv_heads, capacity).
template <class Params>
void check_host_lengths(const char* op, const Params& p) {
  check_host_lengths(op, "lengths", p.lengths, p.lengths_stride_b, p.lengths_stride_h, p.batch,
                     p.num_kv_heads, p.capacity);
}

}  // namespace kvkern::torch_glue
