// SPDX-License-Identifier: Apache-2.0
// CPU decode attention: flash-decoding with an online softmax, framework-free.
//
// One work item is (batch b, kv head j, split s). It reads its share of the
// valid slots of K and V exactly once, for all G query heads of the group, in
// tiles of block_n slots: scores for the tile, one online-softmax rescale per
// tile, then the weighted V rows. Inner loops run over fixed-width lanes so the
// compiler vectorizes them without -ffast-math (which would reorder reductions
// and change results from run to run).
#pragma once

#include <kvkern/decode_attention_params.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "float_convert.h"

// The work-item loops are compiled once per x86-64 level (AVX-512, AVX2+FMA,
// baseline SSE2) and picked at load time (GCC/Clang function multiversioning):
// the small inline helpers below are inlined into each clone with its ISA. The
// kernel is compute-bound at the baseline ISA on a few cores.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define KVKERN_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVKERN_CPU_MULTIVERSION
#endif

namespace kvkern::cpu {

constexpr int kLanes = 16;  // fp32 lanes per partial-sum vector (one AVX-512 register)

inline float dot_lanes(const float* a, const float* b, int64_t d) {
  float part[kLanes] = {};
  for (int64_t i = 0; i < d; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

inline void axpy_lanes(float* y, float a, const float* x, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

template <typename T>
inline const float* row_as_float(const T* row, float* buf, int64_t d) {
  for (int64_t i = 0; i < d; ++i) buf[i] = to_float(row[i]);
  return buf;
}

// fp16 rows convert with F16C where the CPU has it (the portable bit-level
// conversion above does not vectorize: x86-64's baseline has no fp16 instruction).
inline const float* row_as_float(const Half* row, float* buf, int64_t d) {
  if (halves_to_floats_native(reinterpret_cast<const uint16_t*>(row), buf, d)) return buf;
  for (int64_t i = 0; i < d; ++i) buf[i] = to_float(row[i]);
  return buf;
}

inline const float* row_as_float(const float* row, float*, int64_t) { return row; }

// Slots [begin, end) of head (b, j) for split s of S: each head divides its own
// valid length into S chunks of whole tiles, so ragged lengths stay balanced.
inline void split_range(int64_t len, int64_t s, int64_t S, int64_t block_n, int64_t* begin,
                        int64_t* end) {
  int64_t chunk = (len + S - 1) / S;
  chunk = (chunk + block_n - 1) / block_n * block_n;
  *begin = s * chunk < len ? s * chunk : len;
  *end = (s + 1) * chunk < len ? (s + 1) * chunk : len;
}

// One tile of the online softmax for one query head: sc[0, n) holds the
// scaled logits and becomes their weights exp(logit - m_new); the running
// max m, sum l and accumulator acc[0, D) are rescaled to the new max. Every
// CPU attention kernel (dense, quantized, fp8) runs this same update, so
// their split states merge identically.
inline void online_softmax_tile(float* sc, int64_t n, float* m, float* l, float* acc, int64_t D) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float tile_max = neg_inf;
  for (int64_t r = 0; r < n; ++r) tile_max = sc[r] > tile_max ? sc[r] : tile_max;
  const float m_new = tile_max > *m ? tile_max : *m;
  // m_new is -inf only if every logit so far is -inf (log_w may hold -inf).
  const float ref = m_new == neg_inf ? 0.f : m_new;
  const float alpha = std::exp(*m - ref);
  float sum = 0.f;
  for (int64_t r = 0; r < n; ++r) {
    sc[r] = std::exp(sc[r] - ref);
    sum += sc[r];
  }
  *l = *l * alpha + sum;
  *m = m_new;
  if (alpha != 1.f)
    for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
}

// The finished state of one query head's split: with S == 1 the final out
// row (T) and lse, else the fp32 partial row and lse that merge_states_rows
// combines. row = b * Hq + h. An empty split has lse -inf and out 0; a bad
// length poisons both with NaN.
template <typename T>
inline void store_split_state(float m, float l, const float* acc, int64_t D, bool bad_len, int64_t row, int64_t s,
                              int64_t S, T* out, float* lse, float* partial_out, float* partial_lse) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const bool empty = l == 0.f;
  const float inv_l = empty ? 0.f : 1.f / l;
  const float state_lse = bad_len ? nan : (empty ? neg_inf : m + std::log(l));
  if (S == 1) {
    T* orow = out + row * D;
    for (int64_t d = 0; d < D; ++d) orow[d] = from_float<T>(bad_len ? nan : acc[d] * inv_l);
    lse[row] = state_lse;
  } else {
    float* orow = partial_out + (row * S + s) * D;
    for (int64_t d = 0; d < D; ++d) orow[d] = bad_len ? nan : acc[d] * inv_l;
    partial_lse[row * S + s] = state_lse;
  }
}

// Starts one split of kv head j: its G query rows (q_group is the first, rows q_stride_h apart)
// scaled by `scale` into w.q, and an empty online-softmax state. Shared by every CPU attention
// kernel's scratch (w.q, w.m, w.l, w.acc).
template <typename T, class Work>
inline void start_split(Work& w, const T* q_group, int64_t q_stride_h, float scale, int64_t G, int64_t D) {
  for (int64_t g = 0; g < G; ++g) {
    const T* qrow = q_group + g * q_stride_h;
    for (int64_t d = 0; d < D; ++d) w.q[g * D + d] = to_float(qrow[d]) * scale;
    w.m[g] = -std::numeric_limits<float>::infinity();
    w.l[g] = 0.f;
  }
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
}

// Scratch owned by one thread, sized once per parallel chunk.
struct Scratch {
  std::vector<float> q, acc, scores, m, l, row;
  Scratch(int64_t G, int64_t D, int64_t block_n)
      : q(G * D), acc(G * D), scores(G * block_n), m(G), l(G), row(D) {}
};

// Processes work items [item_begin, item_end) of the flattened (b, j, s) grid.
template <typename T>
KVKERN_CPU_MULTIVERSION void decode_attention_items(const DecodeAttentionParams& p, int64_t item_begin, int64_t item_end) {
  const int64_t G = p.group_size(), D = p.head_dim, S = p.num_splits, BN = p.block_n;
  Scratch w(G, D, BN);
  const T* q_base = static_cast<const T*>(p.q);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);

  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t s = item % S, bj = item / S, j = bj % p.num_kv_heads, b = bj / p.num_kv_heads;
    const int64_t len = p.lengths[b * p.lengths_stride_b + j * p.lengths_stride_h];
    const bool bad_len = len < 0 || len > p.capacity;
    int64_t lo = 0, hi = 0;
    if (!bad_len) split_range(len, s, S, BN, &lo, &hi);

    start_split(w, q_base + b * p.q_stride_b + j * G * p.q_stride_h, p.q_stride_h, p.sm_scale, G, D);

    const T* k_head = k_base + b * p.k_stride_b + j * p.k_stride_h;
    const T* v_head = v_base + b * p.v_stride_b + j * p.v_stride_h;
    const float* wlog = p.log_w ? p.log_w + b * p.log_w_stride_b + j * p.log_w_stride_h : nullptr;

    for (int64_t t0 = lo; t0 < hi; t0 += BN) {
      const int64_t n = hi - t0 < BN ? hi - t0 : BN;
      for (int64_t r = 0; r < n; ++r) {
        const float* krow = row_as_float(k_head + (t0 + r) * p.k_stride_c, w.row.data(), D);
        const float bias = wlog ? wlog[t0 + r] : 0.f;
        for (int64_t g = 0; g < G; ++g) w.scores[g * BN + r] = dot_lanes(&w.q[g * D], krow, D) + bias;
      }
      for (int64_t g = 0; g < G; ++g) online_softmax_tile(&w.scores[g * BN], n, &w.m[g], &w.l[g], &w.acc[g * D], D);
      for (int64_t r = 0; r < n; ++r) {
        const float* vrow = row_as_float(v_head + (t0 + r) * p.v_stride_c, w.row.data(), D);
        for (int64_t g = 0; g < G; ++g) axpy_lanes(&w.acc[g * D], w.scores[g * BN + r], vrow, D);
      }
    }

    for (int64_t g = 0; g < G; ++g)
      store_split_state<T>(w.m[g], w.l[g], &w.acc[g * D], D, bad_len, b * p.num_q_heads + j * G + g, s, S,
                           static_cast<T*>(p.out), p.lse, p.partial_out, p.partial_lse);
  }
}

// Combines the S partial states of rows [row_begin, row_end) of the flattened
// (b, h) grid: out = sum_s exp(lse_s - lse) * out_s, lse = log sum_s exp(lse_s).
template <typename T>
KVKERN_CPU_MULTIVERSION void merge_states_rows(const float* partial_out, const float* partial_lse, T* out, float* lse,
                       int64_t S, int64_t D, int64_t row_begin, int64_t row_end) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> acc(D);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const float* ls = partial_lse + row * S;
    float m = neg_inf;
    bool has_nan = false;
    for (int64_t s = 0; s < S; ++s) {
      has_nan |= std::isnan(ls[s]);
      m = ls[s] > m ? ls[s] : m;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    float total = 0.f;
    if (m != neg_inf && !has_nan) {
      for (int64_t s = 0; s < S; ++s) {
        const float wgt = std::exp(ls[s] - m);
        total += wgt;
        axpy_lanes(acc.data(), wgt, partial_out + (row * S + s) * D, D);
      }
    }
    const float inv = total > 0.f ? 1.f / total : 0.f;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t d = 0; d < D; ++d) out[row * D + d] = from_float<T>(has_nan ? nan : acc[d] * inv);
    lse[row] = has_nan ? nan : (total > 0.f ? m + std::log(total) : neg_inf);
  }
}

}  // namespace kvkern::cpu
