// SPDX-License-Identifier: Apache-2.0
// Checks the quantized-KV ops' arguments and turns them into QuantKVParams.
// Device-agnostic (shapes, dtypes, devices, strides, never tensor values: on
// CUDA that would need a host sync), so the CPU and CUDA glue reject the same
// inputs the same way. Value checks (lengths) are in check_quant_lengths, which
// only CPU glue calls.
#pragma once

#include <kvkern/quant_params.h>

#include <initializer_list>
#include <optional>

#include "checks.h"

namespace kvkern::torch_glue {

inline QuantDType to_quant_dtype(ScalarType s) {
  return s == ScalarType::Half ? QuantDType::kFloat16
         : s == ScalarType::BFloat16 ? QuantDType::kBFloat16
                                     : QuantDType::kFloat32;
}

// One argument: exact shape, dtype, device of `ref`, last dim contiguous.
inline QuantTensorRef check_quant_tensor(const char* op, const char* name, const Tensor& t,
                                         std::initializer_list<int64_t> shape, const char* layout,
                                         ScalarType dtype, const Tensor& ref, const char* ref_name) {
  STD_TORCH_CHECK(t.dim() == static_cast<int64_t>(shape.size()), op, ": ", name, ": expected a ",
                  shape.size(), "-D tensor ", layout, " = ", dims_str(shape), ", got shape ",
                  shape_str(t));
  check_shape(op, name, t, layout, shape);
  check_dtype(op, name, t, dtype);
  check_same_device(op, name, t, ref, ref_name);
  check_last_dim_contiguous(op, name, t);
  QuantTensorRef r;
  r.data = const_cast<void*>(t.const_data_ptr());
  for (int64_t d = 0; d < t.dim() && d < 4; ++d) r.stride[d] = t.stride(d);
  return r;
}

// lengths [B, Hkv] int32 on the device of `ref` (the tensor that fixed the
// sizes) and the cache sizes, into p (QuantKVParams, Fp8KVParams).
template <class Params>
void set_cache_sizes(const char* op, Params& p, const Tensor& lengths, int64_t B, int64_t H, int64_t C, int64_t D,
                     const Tensor& ref, const char* ref_name) {
  check_quant_tensor(op, "lengths", lengths, {B, H}, "[B, Hkv]", ScalarType::Int, ref, ref_name);
  p.lengths = static_cast<int32_t*>(const_cast<void*>(lengths.const_data_ptr()));
  p.lengths_stride_b = lengths.stride(0);
  p.lengths_stride_h = lengths.stride(1);
  p.batch = B;
  p.num_kv_heads = H;
  p.capacity = C;
  p.head_dim = D;
}

// The ten cache tensors and lengths, common to all four ops. k_res fixes B,
// Hkv, R, D, the dtype and the device; k_scale fixes C.
inline QuantKVParams make_quant_cache_params(
    const char* op, const Tensor& k_codes, const Tensor& k_scale, const Tensor& k_min,
    const Tensor& v_codes, const Tensor& v_scale, const Tensor& v_min, const Tensor& k_res,
    const Tensor& v_res, const std::optional<Tensor>& k_mean, const std::optional<Tensor>& v_mean,
    const Tensor& lengths, int64_t bits, int64_t group) {
  STD_TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, op, ": bits: expected 2, 4 or 8, got ", bits);
  STD_TORCH_CHECK(group == 32 || group == 64 || group == 128, op,
                  ": group: expected 32, 64 or 128, got ", group);
  check_rank(op, "k_res", k_res, 4, "[B, Hkv, R, D]");
  check_rank(op, "k_scale", k_scale, 4, "[B, Hkv, C / group, D]");
  check_cache_dtype(op, "k_res", k_res);
  const ScalarType dt = k_res.scalar_type();
  const int64_t B = k_res.size(0), H = k_res.size(1), R = k_res.size(2), D = k_res.size(3);
  const int64_t G = group, P = 32 / bits, C = k_scale.size(2) * G;
  STD_TORCH_CHECK(H > 0, op, ": k_res: expected at least one kv head, got shape ", shape_str(k_res));
  STD_TORCH_CHECK(R > 0 && R % G == 0, op, ": k_res: expected the ring size R = k_res.size(2) to be a "
                  "positive multiple of group = ", G, ", got R = ", R);
  STD_TORCH_CHECK(D > 0 && D % G == 0, op, ": k_res: expected the head dim D = k_res.size(3) to be a "
                  "positive multiple of group = ", G, ", got D = ", D);
  STD_TORCH_CHECK(C % R == 0, op, ": k_scale: expected the capacity C = k_scale.size(2) * group = ", C,
                  " to be a multiple of the ring size R = ", R);

  QuantKVParams p;
  p.k_res = check_quant_tensor(op, "k_res", k_res, {B, H, R, D}, "[B, Hkv, R, D]", dt, k_res, "k_res");
  p.v_res = check_quant_tensor(op, "v_res", v_res, {B, H, R, D}, "[B, Hkv, R, D]", dt, k_res, "k_res");
  p.k_codes = check_quant_tensor(op, "k_codes", k_codes, {B, H, C / P, D}, "[B, Hkv, C / (32 / bits), D]",
                                 ScalarType::Int, k_res, "k_res");
  p.k_scale = check_quant_tensor(op, "k_scale", k_scale, {B, H, C / G, D}, "[B, Hkv, C / group, D]", dt,
                                 k_res, "k_res");
  p.k_min = check_quant_tensor(op, "k_min", k_min, {B, H, C / G, D}, "[B, Hkv, C / group, D]", dt, k_res,
                               "k_res");
  p.v_codes = check_quant_tensor(op, "v_codes", v_codes, {B, H, C, D / P}, "[B, Hkv, C, D / (32 / bits)]",
                                 ScalarType::Int, k_res, "k_res");
  p.v_scale = check_quant_tensor(op, "v_scale", v_scale, {B, H, C, D / G}, "[B, Hkv, C, D / group]", dt,
                                 k_res, "k_res");
  p.v_min = check_quant_tensor(op, "v_min", v_min, {B, H, C, D / G}, "[B, Hkv, C, D / group]", dt, k_res,
                               "k_res");
  STD_TORCH_CHECK(k_mean.has_value() == v_mean.has_value(), op,
                  ": k_mean, v_mean: expected both (mean-centred cache) or neither, got ",
                  k_mean.has_value() ? "k_mean only" : "v_mean only");
  if (k_mean.has_value()) {
    p.k_mean = check_quant_tensor(op, "k_mean", *k_mean, {B, C, D}, "[B, C, D]", dt, k_res, "k_res");
    p.v_mean = check_quant_tensor(op, "v_mean", *v_mean, {B, C, D}, "[B, C, D]", dt, k_res, "k_res");
  }
  set_cache_sizes(op, p, lengths, B, H, C, D, k_res, "k_res");
  p.residual = R;
  p.bits = static_cast<int>(bits);
  p.group = static_cast<int>(group);
  p.dtype = to_quant_dtype(dt);
  return p;
}

// The dense source of quantize_kv_: k, v [B, Hkv, T_in, D] with T_in <= C.
inline void add_quantize_inputs(const char* op, QuantKVParams& p, const Tensor& k, const Tensor& v,
                                const Tensor& k_res) {
  check_rank(op, "k", k, 4, "[B, Hkv, T, D]");
  const ScalarType dt = k_res.scalar_type();
  const int64_t B = p.batch, H = p.num_kv_heads, T = k.size(2), D = p.head_dim;
  STD_TORCH_CHECK(T <= p.capacity, op, ": k: expected at most C = ", p.capacity, " tokens, got shape ",
                  shape_str(k));
  p.k_in = check_quant_tensor(op, "k", k, {B, H, T, D}, "[B, Hkv, T, D]", dt, k_res, "k_res");
  p.v_in = check_quant_tensor(op, "v", v, {B, H, T, D}, "[B, Hkv, T, D]", dt, k_res, "k_res");
  p.in_tokens = T;
}

// The new token of append_quantized_kv_: k_new, v_new [B, Hkv, D].
inline void add_append_inputs(const char* op, QuantKVParams& p, const Tensor& k_new, const Tensor& v_new,
                              const Tensor& k_res) {
  const ScalarType dt = k_res.scalar_type();
  const int64_t B = p.batch, H = p.num_kv_heads, D = p.head_dim;
  p.k_in = check_quant_tensor(op, "k_new", k_new, {B, H, D}, "[B, Hkv, D]", dt, k_res, "k_res");
  p.v_in = check_quant_tensor(op, "v_new", v_new, {B, H, D}, "[B, Hkv, D]", dt, k_res, "k_res");
}

// The query (rank already checked) of an attention op over a compressed cache
// (QuantKVParams, Fp8KVParams): q [B, Hq, D] of dtype `dt` on the device of
// `cache` (the cache tensor that fixed Hkv), Hq a multiple of Hkv; then the
// softmax scale and the split count. Fills the query fields of p.
template <class Params>
void add_compressed_query(const char* op, Params& p, const Tensor& q, ScalarType dt, const Tensor& cache,
                          const char* cache_name, std::optional<double> sm_scale, int64_t num_splits) {
  const int64_t Hq = q.size(1);
  check_head_groups(op, "q", Hq, cache_name, cache);
  check_quant_tensor(op, "q", q, {p.batch, Hq, p.head_dim}, "[B, Hq, D]", dt, cache, cache_name);
  const double scale = resolve_sm_scale(op, sm_scale, p.head_dim);
  check_launch_value(op, "num_splits", num_splits, kMaxNumSplits);
  p.q = q.const_data_ptr();
  p.q_stride_b = q.stride(0);
  p.q_stride_h = q.stride(1);
  p.num_q_heads = Hq;
  p.sm_scale = static_cast<float>(scale);
  p.num_splits = static_cast<int>(num_splits);
}

// The query of quant_decode_attention: q [B, Hq, D] in the cache's dtype.
inline void add_attention_inputs(const char* op, QuantKVParams& p, const Tensor& q, const Tensor& k_res,
                                 std::optional<double> sm_scale, int64_t num_splits) {
  check_rank(op, "q", q, 3, "[B, Hq, D]");
  add_compressed_query(op, p, q, k_res.scalar_type(), k_res, "k_res", sm_scale, num_splits);
}

// Value checks of lengths (host-readable memory only): every length in
// [0, max_len], and equal within each batch element of a mean-centred cache.
inline void check_quant_lengths(const char* op, const QuantKVParams& p, int64_t max_len,
                                const char* max_what) {
  for (int64_t b = 0; b < p.batch; ++b) {
    const int32_t first = p.length(b, 0);
    for (int64_t j = 0; j < p.num_kv_heads; ++j) {
      const int32_t len = p.length(b, j);
      STD_TORCH_CHECK(len >= 0 && len <= max_len, op, ": lengths: expected every value in [0, ", max_what,
                      "] = [0, ", max_len, "], got ", len, " at [", b, ", ", j, "]");
      STD_TORCH_CHECK(!p.mean_centred() || len == first, op,
                      ": lengths: a mean-centred cache (k_mean / v_mean given) needs every kv head of a batch "
                      "element to hold the same number of tokens, got ", first, " at [", b, ", 0] and ", len,
                      " at [", b, ", ", j, "]");
    }
  }
}

}  // namespace kvkern::torch_glue
