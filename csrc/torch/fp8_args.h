// SPDX-License-Identifier: Apache-2.0
// Checks the FP8-KV ops' arguments and turns them into Fp8KVParams. Device-
// agnostic (shapes, dtypes, devices, strides; never values), so the CPU and
// CUDA glue reject the same inputs the same way. Value checks (lengths,
// scales) are in check_fp8_values, which only the CPU glue calls.
#pragma once

#include <kvkern/fp8_params.h>

#include <cmath>
#include <optional>
#include <utility>

#include "quant_args.h"

namespace kvkern::torch_glue {

inline const char* fp8_dtype_name(ScalarType s) {
  return s == ScalarType::Float8_e4m3fn ? "float8_e4m3fn" : s == ScalarType::Float8_e5m2 ? "float8_e5m2"
                                                                                         : dtype_name(s);
}

// The cache: k_fp8 fixes B, Hkv, C, D and the device.
inline Fp8KVParams make_fp8_cache_params(const char* op, const Tensor& k_fp8, const Tensor& v_fp8,
                                         const Tensor& k_scale, const Tensor& v_scale, const Tensor& lengths) {
  check_rank(op, "k_fp8", k_fp8, 4, "[B, Hkv, C, D]");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"k_fp8", &k_fp8}, {"v_fp8", &v_fp8}})
    STD_TORCH_CHECK(t->scalar_type() == ScalarType::Float8_e4m3fn, op, ": ", name,
                    ": expected dtype float8_e4m3fn, got ", fp8_dtype_name(t->scalar_type()));
  const int64_t B = k_fp8.size(0), H = k_fp8.size(1), C = k_fp8.size(2), D = k_fp8.size(3);
  STD_TORCH_CHECK(H > 0 && D > 0, op, ": k_fp8: expected at least one kv head and a positive head dim, got shape ",
                  shape_str(k_fp8));
  Fp8KVParams p;
  p.k_fp8 = check_quant_tensor(op, "k_fp8", k_fp8, {B, H, C, D}, "[B, Hkv, C, D]", ScalarType::Float8_e4m3fn,
                               k_fp8, "k_fp8");
  p.v_fp8 = check_quant_tensor(op, "v_fp8", v_fp8, {B, H, C, D}, "[B, Hkv, C, D]", ScalarType::Float8_e4m3fn,
                               k_fp8, "k_fp8");
  check_quant_tensor(op, "k_scale", k_scale, {H}, "[Hkv]", ScalarType::Float, k_fp8, "k_fp8");
  check_quant_tensor(op, "v_scale", v_scale, {H}, "[Hkv]", ScalarType::Float, k_fp8, "k_fp8");
  p.k_scale = static_cast<const float*>(k_scale.const_data_ptr());
  p.v_scale = static_cast<const float*>(v_scale.const_data_ptr());
  p.k_scale_stride = k_scale.stride(0);
  p.v_scale_stride = v_scale.stride(0);
  set_cache_sizes(op, p, lengths, B, H, C, D, k_fp8, "k_fp8");
  return p;
}

// Dense k, v of quantize_fp8_kv_ ([B, Hkv, T, D], T <= C) or k_new, v_new of
// append_fp8_kv_ ([B, Hkv, D]); they fix the dtype T.
inline void add_fp8_inputs(const char* op, Fp8KVParams& p, const Tensor& k, const Tensor& v, bool prefill,
                           const Tensor& k_fp8) {
  const char* kn = prefill ? "k" : "k_new";
  const char* vn = prefill ? "v" : "v_new";
  check_rank(op, kn, k, prefill ? 4 : 3, prefill ? "[B, Hkv, T, D]" : "[B, Hkv, D]");
  check_cache_dtype(op, kn, k);
  const ScalarType dt = k.scalar_type();
  const int64_t B = p.batch, H = p.num_kv_heads, D = p.head_dim;
  if (prefill) {
    const int64_t T = k.size(2);
    STD_TORCH_CHECK(T <= p.capacity, op, ": k: expected at most C = ", p.capacity, " tokens, got shape ",
                    shape_str(k));
    p.k_in = check_quant_tensor(op, kn, k, {B, H, T, D}, "[B, Hkv, T, D]", dt, k_fp8, "k_fp8");
    p.v_in = check_quant_tensor(op, vn, v, {B, H, T, D}, "[B, Hkv, T, D]", dt, k_fp8, "k_fp8");
    p.in_tokens = T;
  } else {
    p.k_in = check_quant_tensor(op, kn, k, {B, H, D}, "[B, Hkv, D]", dt, k_fp8, "k_fp8");
    p.v_in = check_quant_tensor(op, vn, v, {B, H, D}, "[B, Hkv, D]", dt, k_fp8, "k_fp8");
  }
  p.dtype = to_quant_dtype(dt);
}

// The query of fp8_decode_attention: q [B, Hq, D], Hq a multiple of Hkv; fixes T.
inline void add_fp8_attention_inputs(const char* op, Fp8KVParams& p, const Tensor& q, const Tensor& k_fp8,
                                     std::optional<double> sm_scale, int64_t num_splits) {
  check_rank(op, "q", q, 3, "[B, Hq, D]");
  check_cache_dtype(op, "q", q);
  STD_TORCH_CHECK(p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256, op,
                  ": k_fp8: expected head dim D in {64, 128, 256} (as decode_attention), got ", p.head_dim);
  add_compressed_query(op, p, q, q.scalar_type(), k_fp8, "k_fp8", sm_scale, num_splits);
  p.dtype = to_quant_dtype(q.scalar_type());
}

// Value checks (host memory only): lengths in [0, max_len], scales positive and finite.
inline void check_fp8_values(const char* op, const Fp8KVParams& p, int64_t max_len, const char* max_what) {
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t j = 0; j < p.num_kv_heads; ++j) {
      const int32_t len = p.length(b, j);
      STD_TORCH_CHECK(len >= 0 && len <= max_len, op, ": lengths: expected every value in [0, ", max_what,
                      "] = [0, ", max_len, "], got ", len, " at [", b, ", ", j, "]",
                      max_len < p.capacity && len == p.capacity ? " (that head is full)" : "");
    }
  for (int64_t j = 0; j < p.num_kv_heads; ++j) {
    const float ks = p.k_scale[j * p.k_scale_stride], vs = p.v_scale[j * p.v_scale_stride];
    STD_TORCH_CHECK(std::isfinite(ks) && ks > 0.f, op, ": k_scale: expected positive finite scales, got ", ks,
                    " at [", j, "]");
    STD_TORCH_CHECK(std::isfinite(vs) && vs > 0.f, op, ": v_scale: expected positive finite scales, got ", vs,
                    " at [", j, "]");
  }
}

}  // namespace kvkern::torch_glue
