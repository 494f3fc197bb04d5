// SPDX-License-Identifier: Apache-2.0
// CPU FP8 KV (kvkern/reference.py "FP8 KV"), framework-free: quantize a
// prefilled cache, append one token, and decode attention straight over the
// e4m3 bytes. Attention folds the per-head scales out of the inner loops:
// k_scale into the logit scale (q * sm_scale * k_scale), v_scale into the
// output (applied once to the accumulator); a tile's codes are decoded into a
// small fp32 row through a 256-entry table (exact), never a dequantized cache.
#pragma once

#include <kvkern/fp8_params.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "decode_attention_kernel.h"
#include "float_convert.h"
#include "fp8_convert.h"

namespace kvkern::cpu {

template <typename T>
inline void fp8_encode_row(const T* x, uint8_t* out, float scale, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = fp8_e4m3_quantize(to_float(x[d]), scale);
}

inline uint8_t* fp8_row(const QuantTensorRef& r, int64_t b, int64_t h, int64_t t) {
  return static_cast<uint8_t*>(r.data) + b * r.stride[0] + h * r.stride[1] + t * r.stride[2];
}

// quantize_fp8_kv_, heads [i0, i1) of the flattened (b, h) grid: the first
// lengths[b, h] tokens (<= T_in, checked by the glue); other slots untouched.
template <typename T>
void quantize_fp8_kv_heads(const Fp8KVParams& p, int64_t i0, int64_t i1) {
  const int64_t H = p.num_kv_heads, D = p.head_dim;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / H, h = i % H, L = p.length(b, h);
    const float ks = p.k_scale[h * p.k_scale_stride], vs = p.v_scale[h * p.v_scale_stride];
    for (int64_t t = 0; t < L; ++t) {
      const T* k = static_cast<const T*>(p.k_in.data) + b * p.k_in.stride[0] + h * p.k_in.stride[1] + t * p.k_in.stride[2];
      const T* v = static_cast<const T*>(p.v_in.data) + b * p.v_in.stride[0] + h * p.v_in.stride[1] + t * p.v_in.stride[2];
      fp8_encode_row(k, fp8_row(p.k_fp8, b, h, t), ks, D);
      fp8_encode_row(v, fp8_row(p.v_fp8, b, h, t), vs, D);
    }
  }
}

// append_fp8_kv_, heads [i0, i1): the new token into slot lengths[b, h] (< C,
// checked by the glue), then lengths += 1.
template <typename T>
void append_fp8_kv_heads(const Fp8KVParams& p, int64_t i0, int64_t i1) {
  const int64_t H = p.num_kv_heads, D = p.head_dim;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / H, h = i % H, t = p.length(b, h);
    const T* k = static_cast<const T*>(p.k_in.data) + b * p.k_in.stride[0] + h * p.k_in.stride[1];
    const T* v = static_cast<const T*>(p.v_in.data) + b * p.v_in.stride[0] + h * p.v_in.stride[1];
    fp8_encode_row(k, fp8_row(p.k_fp8, b, h, t), p.k_scale[h * p.k_scale_stride], D);
    fp8_encode_row(v, fp8_row(p.v_fp8, b, h, t), p.v_scale[h * p.v_scale_stride], D);
    p.lengths[b * p.lengths_stride_b + h * p.lengths_stride_h] += 1;
  }
}

inline void fp8_decode_row(const uint8_t* codes, const float* table, float* out, int64_t D) {
  for (int64_t d = 0; d < D; ++d) out[d] = table[codes[d]];
}

// fp8_decode_attention, work items [item_begin, item_end) of the flattened
// (b, kv head j, split s) grid: decode_attention_items over decoded rows, with
// the same online-softmax update and split-state store.
template <typename T>
KVKERN_CPU_MULTIVERSION void fp8_decode_attention_items(const Fp8KVParams& p, int64_t item_begin,
                                                        int64_t item_end) {
  const int64_t G = p.group_size(), D = p.head_dim, S = p.num_splits, BN = p.block_n;
  const float* table = fp8_e4m3_table();
  Scratch w(G, D, BN);
  const T* q_base = static_cast<const T*>(p.q);
  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t s = item % S, bj = item / S, j = bj % p.num_kv_heads, b = bj / p.num_kv_heads;
    const int64_t len = p.length(b, j);
    const bool bad_len = len < 0 || len > p.capacity;
    int64_t lo = 0, hi = 0;
    if (!bad_len) split_range(len, s, S, BN, &lo, &hi);
    const float qscale = p.sm_scale * p.k_scale[j * p.k_scale_stride];
    const float vscale = p.v_scale[j * p.v_scale_stride];
    start_split(w, q_base + b * p.q_stride_b + j * G * p.q_stride_h, p.q_stride_h, qscale, G, D);
    for (int64_t t0 = lo; t0 < hi; t0 += BN) {
      const int64_t n = hi - t0 < BN ? hi - t0 : BN;
      for (int64_t r = 0; r < n; ++r) {
        fp8_decode_row(fp8_row(p.k_fp8, b, j, t0 + r), table, w.row.data(), D);
        for (int64_t g = 0; g < G; ++g) w.scores[g * BN + r] = dot_lanes(&w.q[g * D], w.row.data(), D);
      }
      for (int64_t g = 0; g < G; ++g) online_softmax_tile(&w.scores[g * BN], n, &w.m[g], &w.l[g], &w.acc[g * D], D);
      for (int64_t r = 0; r < n; ++r) {
        fp8_decode_row(fp8_row(p.v_fp8, b, j, t0 + r), table, w.row.data(), D);
        for (int64_t g = 0; g < G; ++g) axpy_lanes(&w.acc[g * D], w.scores[g * BN + r], w.row.data(), D);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t d = 0; d < D; ++d) w.acc[g * D + d] *= vscale;
      store_split_state<T>(w.m[g], w.l[g], &w.acc[g * D], D, bad_len, b * p.num_q_heads + j * G + g, s, S,
                           static_cast<T*>(p.out), p.lse, p.partial_out, p.partial_lse);
    }
  }
}

}  // namespace kvkern::cpu
