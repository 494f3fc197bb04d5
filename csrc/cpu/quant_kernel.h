// SPDX-License-Identifier: Apache-2.0
// CPU quantized KV (kvkern/reference.py "Quantized KV"), framework-free: the
// quantizer, packing, quantize / dequantize / append of a cache, and decode
// attention that dequantizes one tile at a time into a small fp32 buffer.
//
// Codes and metadata must equal the reference bit for bit, so the quantizer
// uses exactly its fp32 operations: (x - lo) / scale is one correctly rounded
// division, rounding is rint (half to even under the default rounding mode),
// and the build is ISO C++ (-std=c++17), where GCC does not contract a * b + c
// into an fma behind our back.
#pragma once

#include <kvkern/quant_params.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "decode_attention_kernel.h"
#include "float_convert.h"

namespace kvkern::cpu {

// ---- directed rounding to the storage dtype -----------------------------------

// The next 16-bit float (sign-magnitude bits) toward -inf or +inf.
inline uint16_t step16(uint16_t bits, bool up) {
  const bool neg = bits & 0x8000u;
  if ((bits & 0x7fffu) == 0) return up ? 0x0001u : 0x8001u;  // +-0 -> the smallest subnormal
  return (neg != up) ? static_cast<uint16_t>(bits + 1) : static_cast<uint16_t>(bits - 1);
}

template <typename T>
inline float round_dir(float x, bool up) {
  const T r = from_float<T>(x);
  const float rf = to_float(r);
  if (up ? rf < x : rf > x) return to_float(T{step16(r.bits, up)});
  return rf;
}

template <typename T>
inline float round_down_T(float x) { return round_dir<T>(x, false); }
template <typename T>
inline float round_up_T(float x) { return round_dir<T>(x, true); }
template <>
inline float round_down_T<float>(float x) { return x; }
template <>
inline float round_up_T<float>(float x) { return x; }

// lo rounded down and the scale up (in T): every x of the group then lies in
// the code range, so |x - x̂| <= scale / 2 and a constant group is exact.
template <typename T>
inline void group_params(float mn, float mx, int bits, float* lo, float* scale) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  *lo = round_down_T<T>(mn);
  *scale = round_up_T<T>((mx - *lo) / qmax);
}

inline uint32_t quant_code(float x, float lo, float scale, float qmax) {
  if (!(scale > 0.f)) return 0u;
  float q = std::rint((x - lo) / scale);
  q = q < 0.f ? 0.f : (q > qmax ? qmax : q);
  return static_cast<uint32_t>(q);
}

template <typename T>
inline T* at(const QuantTensorRef& r, int64_t i0, int64_t i1, int64_t i2) {
  return static_cast<T*>(r.data) + i0 * r.stride[0] + i1 * r.stride[1] + i2 * r.stride[2];
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  const float* f = row_as_float(src, dst, n);
  if (f != dst) std::memcpy(dst, f, sizeof(float) * n);
}

// ---- quantizing one key group / one value token --------------------------------

// x: G tokens x D channels (fp32, the values or deviations to quantize), one
// key group. Writes G / P code rows (word row stride `codes_stride`) and one
// scale / min row. tmp: 2 * D floats.
template <typename T>
void quantize_key_group(const float* x, int64_t D, int G, int bits, int32_t* codes, int64_t codes_stride,
                        T* scale_row, T* min_row, float* tmp) {
  float* lo = tmp;
  float* sc = tmp + D;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> mx(D, -inf);
  for (int64_t d = 0; d < D; ++d) lo[d] = inf;
  for (int t = 0; t < G; ++t)
    for (int64_t d = 0; d < D; ++d) {
      const float v = x[t * D + d];
      lo[d] = v < lo[d] ? v : lo[d];
      mx[d] = v > mx[d] ? v : mx[d];
    }
  for (int64_t d = 0; d < D; ++d) {
    group_params<T>(lo[d], mx[d], bits, &lo[d], &sc[d]);
    scale_row[d] = from_float<T>(sc[d]);
    min_row[d] = from_float<T>(lo[d]);
  }
  const int P = 32 / bits;
  const float qmax = static_cast<float>((1 << bits) - 1);
  for (int w = 0; w < G / P; ++w) {
    int32_t* row = codes + w * codes_stride;
    for (int64_t d = 0; d < D; ++d) {
      uint32_t word = 0;
      for (int j = 0; j < P; ++j) word |= quant_code(x[(w * P + j) * D + d], lo[d], sc[d], qmax) << (bits * j);
      row[d] = static_cast<int32_t>(word);
    }
  }
}

// x: one token's D channels (fp32). Writes D / P code words and D / G scales / mins.
template <typename T>
void quantize_value_row(const float* x, int64_t D, int G, int bits, int32_t* codes, T* scale_row,
                        T* min_row) {
  const int P = 32 / bits;
  const float qmax = static_cast<float>((1 << bits) - 1);
  for (int64_t c = 0; c < D / G; ++c) {
    const float* g = x + c * G;
    float mn = g[0], mx = g[0];
    for (int i = 1; i < G; ++i) {
      mn = g[i] < mn ? g[i] : mn;
      mx = g[i] > mx ? g[i] : mx;
    }
    float lo, sc;
    group_params<T>(mn, mx, bits, &lo, &sc);
    scale_row[c] = from_float<T>(sc);
    min_row[c] = from_float<T>(lo);
    for (int w = 0; w < G / P; ++w) {
      uint32_t word = 0;
      for (int j = 0; j < P; ++j) word |= quant_code(g[w * P + j], lo, sc, qmax) << (bits * j);
      codes[(c * G) / P + w] = static_cast<int32_t>(word);
    }
  }
}

// The mean over kv heads of one token's rows (fp32 sum in head order / Hkv),
// rounded to T: stored at mean_row and returned in `m` as fp32.
template <typename T>
void head_mean_row(const T* const* rows, int64_t H, int64_t D, T* mean_row, float* m, float* tmp) {
  for (int64_t d = 0; d < D; ++d) m[d] = 0.f;
  for (int64_t h = 0; h < H; ++h) {
    load_row(rows[h], tmp, D);
    for (int64_t d = 0; d < D; ++d) m[d] += tmp[d];
  }
  const float n = static_cast<float>(H);
  for (int64_t d = 0; d < D; ++d) {
    mean_row[d] = from_float<T>(m[d] / n);
    m[d] = to_float(mean_row[d]);
  }
}

// ---- quantize_kv_ ---------------------------------------------------------------

inline void quant_split_lengths(int64_t L, int64_t R, int64_t* nk, int64_t* nv) {
  *nk = L - L % R;
  *nv = L > R ? L - R : 0;
}

// Phase 1 (mean-centred only), batch elements [b0, b1): the means of every
// token that becomes codes, written to k_mean / v_mean.
template <typename T>
void quantize_kv_means(const QuantKVParams& p, int64_t b0, int64_t b1) {
  const int64_t H = p.num_kv_heads, D = p.head_dim;
  std::vector<const T*> rows(H);
  std::vector<float> m(D), tmp(D);
  for (int64_t b = b0; b < b1; ++b) {
    int64_t nk, nv;
    quant_split_lengths(p.length(b, 0), p.residual, &nk, &nv);
    for (int64_t t = 0; t < nk; ++t) {
      for (int64_t h = 0; h < H; ++h) rows[h] = at<const T>(p.k_in, b, h, t);
      head_mean_row<T>(rows.data(), H, D, static_cast<T*>(p.k_mean.data) + b * p.k_mean.stride[0] +
                                              t * p.k_mean.stride[1], m.data(), tmp.data());
    }
    for (int64_t t = 0; t < nv; ++t) {
      for (int64_t h = 0; h < H; ++h) rows[h] = at<const T>(p.v_in, b, h, t);
      head_mean_row<T>(rows.data(), H, D, static_cast<T*>(p.v_mean.data) + b * p.v_mean.stride[0] +
                                              t * p.v_mean.stride[1], m.data(), tmp.data());
    }
  }
}

// Phase 2, heads [i0, i1) of the flattened (b, h) grid: codes, metadata, rings.
template <typename T>
void quantize_kv_heads(const QuantKVParams& p, int64_t i0, int64_t i1) {
  const int64_t H = p.num_kv_heads, D = p.head_dim, R = p.residual;
  const int G = p.group, bits = p.bits, P = 32 / bits;
  const bool centred = p.mean_centred();
  std::vector<float> x(G * D), tmp(2 * D), mrow(D);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / H, h = i % H;
    const int64_t L = p.length(b, h);
    int64_t nk, nv;
    quant_split_lengths(L, R, &nk, &nv);
    for (int64_t g0 = 0; g0 < nk; g0 += G) {
      for (int t = 0; t < G; ++t) {
        float* xr = &x[t * D];
        load_row(at<const T>(p.k_in, b, h, g0 + t), xr, D);
        if (centred) {
          load_row(static_cast<const T*>(p.k_mean.data) + b * p.k_mean.stride[0] + (g0 + t) * p.k_mean.stride[1],
                   mrow.data(), D);
          for (int64_t d = 0; d < D; ++d) xr[d] -= mrow[d];
        }
      }
      quantize_key_group<T>(x.data(), D, G, bits, at<int32_t>(p.k_codes, b, h, g0 / P), p.k_codes.stride[2],
                            at<T>(p.k_scale, b, h, g0 / G), at<T>(p.k_min, b, h, g0 / G), tmp.data());
    }
    for (int64_t t = 0; t < nv; ++t) {
      load_row(at<const T>(p.v_in, b, h, t), x.data(), D);
      if (centred) {
        load_row(static_cast<const T*>(p.v_mean.data) + b * p.v_mean.stride[0] + t * p.v_mean.stride[1],
                 mrow.data(), D);
        for (int64_t d = 0; d < D; ++d) x[d] -= mrow[d];
      }
      quantize_value_row<T>(x.data(), D, G, bits, at<int32_t>(p.v_codes, b, h, t), at<T>(p.v_scale, b, h, t),
                            at<T>(p.v_min, b, h, t));
    }
    for (int64_t t = nk; t < L; ++t)
      std::memcpy(at<T>(p.k_res, b, h, t % R), at<const T>(p.k_in, b, h, t), sizeof(T) * D);
    for (int64_t t = nv; t < L; ++t)
      std::memcpy(at<T>(p.v_res, b, h, t % R), at<const T>(p.v_in, b, h, t), sizeof(T) * D);
  }
}

// ---- dequantization of one row ---------------------------------------------------

// Key token t of a head (t < nk) into fp32: ((code * scale) + min) (+ mean).
// scale / min: the fp32 rows of t's group.
template <int BITS>
inline void dequant_key_row(const int32_t* words, int64_t t, const float* scale, const float* lo,
                            const float* mean, float* out, int64_t D) {
  constexpr int P = 32 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  const int shift = BITS * static_cast<int>(t % P);
  for (int64_t d = 0; d < D; ++d)
    out[d] = static_cast<float>((static_cast<uint32_t>(words[d]) >> shift) & mask) * scale[d] + lo[d];
  if (mean)
    for (int64_t d = 0; d < D; ++d) out[d] += mean[d];
}

// Value token (t < nv) into fp32. scale / lo: its D / G fp32 group parameters.
template <int BITS>
inline void dequant_value_row(const int32_t* words, const float* scale, const float* lo, const float* mean,
                              float* out, int64_t D, int G) {
  constexpr int P = 32 / BITS;
  constexpr uint32_t mask = (1u << BITS) - 1u;
  for (int64_t w = 0; w < D / P; ++w) {
    const uint32_t u = static_cast<uint32_t>(words[w]);
    for (int j = 0; j < P; ++j) out[w * P + j] = static_cast<float>((u >> (BITS * j)) & mask);
  }
  for (int64_t c = 0; c < D / G; ++c) {
    const float s = scale[c], l = lo[c];
    float* o = out + c * G;
    for (int i = 0; i < G; ++i) o[i] = o[i] * s + l;
  }
  if (mean)
    for (int64_t d = 0; d < D; ++d) out[d] += mean[d];
}

// ---- dequantize_kv ----------------------------------------------------------------

template <typename T, int BITS>
void dequantize_kv_heads(const QuantKVParams& p, int64_t i0, int64_t i1) {
  const int64_t H = p.num_kv_heads, D = p.head_dim, R = p.residual, C = p.capacity;
  const int G = p.group;
  constexpr int P = 32 / BITS;
  const bool centred = p.mean_centred();
  std::vector<float> s(D), l(D), m(D), row(D), vs(D / G), vl(D / G);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t b = i / H, h = i % H;
    const int64_t L = p.length(b, h);
    int64_t nk, nv;
    quant_split_lengths(L, R, &nk, &nv);
    T* ko = static_cast<T*>(p.k_out) + i * C * D;
    T* vo = static_cast<T*>(p.v_out) + i * C * D;
    for (int64_t t = 0; t < nk; ++t) {
      if (t % G == 0) {
        load_row(at<const T>(p.k_scale, b, h, t / G), s.data(), D);
        load_row(at<const T>(p.k_min, b, h, t / G), l.data(), D);
      }
      const float* mp = nullptr;
      if (centred) {
        load_row(static_cast<const T*>(p.k_mean.data) + b * p.k_mean.stride[0] + t * p.k_mean.stride[1], m.data(), D);
        mp = m.data();
      }
      dequant_key_row<BITS>(at<const int32_t>(p.k_codes, b, h, t / P), t, s.data(), l.data(), mp, row.data(), D);
      for (int64_t d = 0; d < D; ++d) ko[t * D + d] = from_float<T>(row[d]);
    }
    for (int64_t t = nk; t < L; ++t) std::memcpy(ko + t * D, at<const T>(p.k_res, b, h, t % R), sizeof(T) * D);
    for (int64_t t = L; t < C; ++t)
      for (int64_t d = 0; d < D; ++d) ko[t * D + d] = from_float<T>(0.f);
    for (int64_t t = 0; t < nv; ++t) {
      load_row(at<const T>(p.v_scale, b, h, t), vs.data(), D / G);
      load_row(at<const T>(p.v_min, b, h, t), vl.data(), D / G);
      const float* mp = nullptr;
      if (centred) {
        load_row(static_cast<const T*>(p.v_mean.data) + b * p.v_mean.stride[0] + t * p.v_mean.stride[1], m.data(), D);
        mp = m.data();
      }
      dequant_value_row<BITS>(at<const int32_t>(p.v_codes, b, h, t), vs.data(), vl.data(), mp, row.data(), D, G);
      for (int64_t d = 0; d < D; ++d) vo[t * D + d] = from_float<T>(row[d]);
    }
    for (int64_t t = nv; t < L; ++t) std::memcpy(vo + t * D, at<const T>(p.v_res, b, h, t % R), sizeof(T) * D);
    for (int64_t t = L; t < C; ++t)
      for (int64_t d = 0; d < D; ++d) vo[t * D + d] = from_float<T>(0.f);
  }
}

// ---- append_quantized_kv_ ----------------------------------------------------------

// Batch elements [b0, b1). Each head uses its own length t (a mean-centred
// cache has equal ones, checked by the glue): the value leaving the ring
// (token t - R) becomes codes, the new token enters slot t % R, a full ring of
// keys becomes codes, then lengths += 1.
template <typename T>
void append_quantized_kv_batches(const QuantKVParams& p, int64_t b0, int64_t b1) {
  const int64_t H = p.num_kv_heads, D = p.head_dim, R = p.residual;
  const int G = p.group, bits = p.bits, P = 32 / bits;
  const bool centred = p.mean_centred();
  int32_t* lengths = p.lengths;
  std::vector<float> x(G * D), tmp(2 * D), m(R * D), mtmp(D);
  std::vector<const T*> rows(H);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t t_c = p.length(b, 0);  // the common length of a mean-centred cache
    // 1. The value of token t - R leaves the ring.
    if (centred && t_c >= R) {
      for (int64_t h = 0; h < H; ++h) rows[h] = at<const T>(p.v_res, b, h, t_c % R);
      head_mean_row<T>(rows.data(), H, D, static_cast<T*>(p.v_mean.data) + b * p.v_mean.stride[0] +
                                              (t_c - R) * p.v_mean.stride[1], m.data(), mtmp.data());
    }
    for (int64_t h = 0; h < H; ++h) {
      const int64_t t = p.length(b, h);
      if (t < R) continue;
      load_row(at<const T>(p.v_res, b, h, t % R), x.data(), D);
      if (centred)
        for (int64_t d = 0; d < D; ++d) x[d] -= m[d];
      quantize_value_row<T>(x.data(), D, G, bits, at<int32_t>(p.v_codes, b, h, t - R),
                            at<T>(p.v_scale, b, h, t - R), at<T>(p.v_min, b, h, t - R));
    }
    // 2. The new token enters the ring.
    for (int64_t h = 0; h < H; ++h) {
      const int64_t t = p.length(b, h);
      std::memcpy(at<T>(p.k_res, b, h, t % R), at<const T>(p.k_in, b, h, 0), sizeof(T) * D);
      std::memcpy(at<T>(p.v_res, b, h, t % R), at<const T>(p.v_in, b, h, 0), sizeof(T) * D);
    }
    // 3. A full ring of keys (tokens s0 .. s0 + R - 1 in slots 0 .. R - 1) becomes codes.
    if (centred && (t_c + 1) % R == 0) {
      const int64_t s0 = t_c + 1 - R;
      for (int64_t j = 0; j < R; ++j) {
        for (int64_t h = 0; h < H; ++h) rows[h] = at<const T>(p.k_res, b, h, j);
        head_mean_row<T>(rows.data(), H, D, static_cast<T*>(p.k_mean.data) + b * p.k_mean.stride[0] +
                                                (s0 + j) * p.k_mean.stride[1], &m[j * D], mtmp.data());
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      const int64_t t = p.length(b, h);
      if ((t + 1) % R != 0) continue;
      const int64_t s0 = t + 1 - R;
      for (int64_t j0 = 0; j0 < R; j0 += G) {
        for (int r = 0; r < G; ++r) {
          float* xr = &x[r * D];
          load_row(at<const T>(p.k_res, b, h, j0 + r), xr, D);
          if (centred)
            for (int64_t d = 0; d < D; ++d) xr[d] -= m[(j0 + r) * D + d];
        }
        quantize_key_group<T>(x.data(), D, G, bits, at<int32_t>(p.k_codes, b, h, (s0 + j0) / P),
                              p.k_codes.stride[2], at<T>(p.k_scale, b, h, (s0 + j0) / G),
                              at<T>(p.k_min, b, h, (s0 + j0) / G), tmp.data());
      }
    }
    for (int64_t h = 0; h < H; ++h) lengths[b * p.lengths_stride_b + h * p.lengths_stride_h] += 1;
  }
}

// ---- quant_decode_attention ----------------------------------------------------------

struct QuantScratch {
  std::vector<float> q, acc, scores, m, l, row, ks, kl, vs, vl, mean;
  QuantScratch(int64_t G, int64_t D, int64_t block_n, int group)
      : q(G * D), acc(G * D), scores(G * block_n), m(G), l(G), row(D), ks(D), kl(D), vs(D / group),
        vl(D / group), mean(D) {}
};

// Work items [item_begin, item_end) of the flattened (b, kv head j, split s)
// grid. Each item reads its share of the head once for all G query heads of
// the group: a tile's keys are dequantized row by row into fp32 and dotted
// with the G queries, then (after one online-softmax rescale) its values.
template <typename T, int BITS>
KVKERN_CPU_MULTIVERSION void quant_decode_attention_items(const QuantKVParams& p, int64_t item_begin,
                                                          int64_t item_end) {
  constexpr int P = 32 / BITS;
  const int64_t G = p.group_size(), D = p.head_dim, S = p.num_splits, BN = p.block_n, R = p.residual;
  const int QG = p.group;
  const bool centred = p.mean_centred();
  QuantScratch w(G, D, BN, QG);
  const T* q_base = static_cast<const T*>(p.q);

  for (int64_t item = item_begin; item < item_end; ++item) {
    const int64_t s = item % S, bj = item / S, j = bj % p.num_kv_heads, b = bj / p.num_kv_heads;
    const int64_t len = p.length(b, j);
    const bool bad_len = len < 0 || len > p.capacity;
    int64_t lo = 0, hi = 0, nk = 0, nv = 0;
    if (!bad_len) {
      split_range(len, s, S, BN, &lo, &hi);
      quant_split_lengths(len, R, &nk, &nv);
    }

    start_split(w, q_base + b * p.q_stride_b + j * G * p.q_stride_h, p.q_stride_h, p.sm_scale, G, D);
    int64_t k_group = -1;  // the key group whose scale / min rows are loaded

    for (int64_t t0 = lo; t0 < hi; t0 += BN) {
      const int64_t n = hi - t0 < BN ? hi - t0 : BN;
      for (int64_t r = 0; r < n; ++r) {
        const int64_t t = t0 + r;
        const float* krow;
        if (t < nk) {
          if (t / QG != k_group) {
            k_group = t / QG;
            load_row(at<const T>(p.k_scale, b, j, k_group), w.ks.data(), D);
            load_row(at<const T>(p.k_min, b, j, k_group), w.kl.data(), D);
          }
          const float* mp = nullptr;
          if (centred) {
            load_row(static_cast<const T*>(p.k_mean.data) + b * p.k_mean.stride[0] + t * p.k_mean.stride[1],
                     w.mean.data(), D);
            mp = w.mean.data();
          }
          dequant_key_row<BITS>(at<const int32_t>(p.k_codes, b, j, t / P), t, w.ks.data(), w.kl.data(), mp,
                                w.row.data(), D);
          krow = w.row.data();
        } else {
          krow = row_as_float(at<const T>(p.k_res, b, j, t % R), w.row.data(), D);
        }
        for (int64_t g = 0; g < G; ++g) w.scores[g * BN + r] = dot_lanes(&w.q[g * D], krow, D);
      }
      for (int64_t g = 0; g < G; ++g) online_softmax_tile(&w.scores[g * BN], n, &w.m[g], &w.l[g], &w.acc[g * D], D);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t t = t0 + r;
        const float* vrow;
        if (t < nv) {
          load_row(at<const T>(p.v_scale, b, j, t), w.vs.data(), D / QG);
          load_row(at<const T>(p.v_min, b, j, t), w.vl.data(), D / QG);
          const float* mp = nullptr;
          if (centred) {
            load_row(static_cast<const T*>(p.v_mean.data) + b * p.v_mean.stride[0] + t * p.v_mean.stride[1],
                     w.mean.data(), D);
            mp = w.mean.data();
          }
          dequant_value_row<BITS>(at<const int32_t>(p.v_codes, b, j, t), w.vs.data(), w.vl.data(), mp,
                                  w.row.data(), D, QG);
          vrow = w.row.data();
        } else {
          vrow = row_as_float(at<const T>(p.v_res, b, j, t % R), w.row.data(), D);
        }
        for (int64_t g = 0; g < G; ++g) axpy_lanes(&w.acc[g * D], w.scores[g * BN + r], vrow, D);
      }
    }

    for (int64_t g = 0; g < G; ++g)
      store_split_state<T>(w.m[g], w.l[g], &w.acc[g * D], D, bad_len, b * p.num_q_heads + j * G + g, s, S,
                           static_cast<T*>(p.out), p.lse, p.partial_out, p.partial_lse);
  }
}

}  // namespace kvkern::cpu
