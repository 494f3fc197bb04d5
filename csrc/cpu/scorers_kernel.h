// SPDX-License-Identifier: Apache-2.0
// CPU kernels of expected_attention_scores, slot_scores and update_scores_,
// framework-free. One work item is one (batch b, kv head j); the glue runs
// items in parallel and has already checked every length to be in [0, C].
//
// Every output slot of a scorer is written (0 past the length), and nothing at
// or past a length is ever read, so garbage (NaN) there cannot leak in.
// Reductions use fixed lanes so results do not depend on the ISA clone, and no
// fast-math: the compiler may vectorize only what keeps IEEE results.
#pragma once

#include <kvkern/scorer_params.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "float_convert.h"

// The expected-attention tiles (a D x D matrix product per tile) are
// compute-bound: one clone per x86-64 level, picked at load time.
#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define KVKERN_SCORER_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define KVKERN_SCORER_MULTIVERSION
#endif

namespace kvkern::cpu::scorer {

constexpr int kLanes = 16;
constexpr int64_t kTile = 32;  // slots per expected-attention tile

// Sum of a[i] * b[i] over 16 interleaved partial sums (vectorizable, fixed order).
inline float dot(const float* a, const float* b, int64_t n) {
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  for (int l = 0; i + l < n; ++l) part[l] += a[i + l] * b[i + l];
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

inline float norm(const float* a, int64_t n) { return std::sqrt(dot(a, a, n)); }

template <typename T>
inline const float* load_row(const T* row, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = to_float(row[i]);
  return buf;
}

inline const float* load_row(const Half* row, float* buf, int64_t n) {
  if (halves_to_floats_native(reinterpret_cast<const uint16_t*>(row), buf, n)) return buf;
  for (int64_t i = 0; i < n; ++i) buf[i] = to_float(row[i]);
  return buf;
}

inline const float* load_row(const float* row, float*, int64_t) { return row; }

inline int64_t head_length(const int32_t* lengths, int64_t sb, int64_t sh, int64_t b, int64_t j) {
  return lengths[b * sb + j * sh];
}

// ---------------------------------------------------------------------------
// expected_attention_scores
// ---------------------------------------------------------------------------

// quad[r] = k_r^T Sigma k_r for rows [0, rows) of k: k has row stride dp, sigma is [d, dp]
// with zero columns past d, and dp is a multiple of kLanes. Rows are independent, so the
// padding rows a caller adds are harmless.
//
// Portable form: (K Sigma) as axpys over Sigma's rows, then a dot per row.
inline void quadratic_forms_portable(const float* k, int64_t rows, const float* sigma, int64_t d,
                                     int64_t dp, float* ks, float* quad) {
  std::fill(ks, ks + rows * dp, 0.f);
  for (int64_t i = 0; i < d; ++i) {
    const float* srow = sigma + i * dp;
    for (int64_t r = 0; r < rows; ++r) {
      const float ki = k[r * dp + i];
      float* kr = ks + r * dp;
      for (int64_t e = 0; e < dp; ++e) kr[e] += ki * srow[e];
    }
  }
  for (int64_t r = 0; r < rows; ++r) quad[r] = dot(ks + r * dp, k + r * dp, dp);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVKERN_HAVE_AVX2_QUAD 1
constexpr int kQuadRows = 4;  // slots per register block

typedef float Float8 __attribute__((vector_size(32)));

__attribute__((target("avx2,fma"))) inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Register-blocked form: for each block of kQuadRows slots and 16 columns, (K Sigma)
// accumulates over all of d in 8 vector registers (each Sigma load feeds kQuadRows
// multiply-adds), then folds into the rows' dots with K. About 3x the portable form.
__attribute__((target("avx2,fma"))) inline void quadratic_forms_avx2(const float* k, int64_t rows,
                                                                   const float* sigma, int64_t d,
                                                                   int64_t dp, float* quad) {
  int64_t r0 = 0;
  for (; r0 + kQuadRows <= rows; r0 += kQuadRows) {
    Float8 q[kQuadRows] = {};
    for (int64_t e0 = 0; e0 < dp; e0 += 16) {
      Float8 lo[kQuadRows] = {}, hi[kQuadRows] = {};
      for (int64_t i = 0; i < d; ++i) {
        const Float8 s0 = load8(sigma + i * dp + e0), s1 = load8(sigma + i * dp + e0 + 8);
        for (int rr = 0; rr < kQuadRows; ++rr) {
          const float ki = k[(r0 + rr) * dp + i];
          lo[rr] += ki * s0;
          hi[rr] += ki * s1;
        }
      }
      for (int rr = 0; rr < kQuadRows; ++rr) {
        const float* kr = k + (r0 + rr) * dp + e0;
        q[rr] += lo[rr] * load8(kr) + hi[rr] * load8(kr + 8);
      }
    }
    for (int rr = 0; rr < kQuadRows; ++rr) {
      float t = 0.f;
      for (int l = 0; l < 8; ++l) t += q[rr][l];
      quad[r0 + rr] = t;
    }
  }
  for (; r0 < rows; ++r0) {  // the last rows one at a time
    Float8 q = {};
    for (int64_t e0 = 0; e0 < dp; e0 += 16) {
      Float8 lo = {}, hi = {};
      for (int64_t i = 0; i < d; ++i) {
        const float ki = k[r0 * dp + i];
        lo += ki * load8(sigma + i * dp + e0);
        hi += ki * load8(sigma + i * dp + e0 + 8);
      }
      q += lo * load8(k + r0 * dp + e0) + hi * load8(k + r0 * dp + e0 + 8);
    }
    float t = 0.f;
    for (int l = 0; l < 8; ++l) t += q[l];
    quad[r0] = t;
  }
}
#endif

inline void quadratic_forms(const float* k, int64_t rows, const float* sigma, int64_t d, int64_t dp,
                            float* ks, float* quad) {
#ifdef KVKERN_HAVE_AVX2_QUAD
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) return quadratic_forms_avx2(k, rows, sigma, d, dp, quad);
#endif
  quadratic_forms_portable(k, rows, sigma, d, dp, ks, quad);
}

struct ExpectedAttentionScratch {
  int64_t dp;  // D rounded up to whole lanes: the padded row length of k_tile and sigma
  std::vector<float> k_tile, ks, sigma, quad, mu, z, row;
  ExpectedAttentionScratch(int64_t G, int64_t C, int64_t D, bool cov)
      : dp((D + kLanes - 1) / kLanes * kLanes),
        k_tile(kTile * dp, 0.f),
        ks(cov ? kTile * dp : 0),
        sigma(cov ? G * D * dp : 0, 0.f),
        quad(kTile),
        mu(G * D),
        z(G * C),
        row(D) {}
};

// Items [begin, end) of the flattened (b, j) grid.
template <typename T>
KVKERN_SCORER_MULTIVERSION void expected_attention_items(const ExpectedAttentionParams& p,
                                                         int64_t begin, int64_t end) {
  const int64_t G = p.group_size(), C = p.capacity, D = p.head_dim;
  const float s = p.sm_scale, half_s2 = 0.5f * p.sm_scale * p.sm_scale;
  const float inf = std::numeric_limits<float>::infinity();
  ExpectedAttentionScratch w(G, C, D, p.cov != nullptr);
  const int64_t dp = w.dp;
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);

  for (int64_t item = begin; item < end; ++item) {
    const int64_t j = item % p.num_kv_heads, b = item / p.num_kv_heads;
    const int64_t len = head_length(p.lengths, p.lengths_stride_b, p.lengths_stride_h, b, j);
    const int64_t lo = std::min(p.n_sink, len);  // scored slots: [lo, len)
    const int64_t n = len - lo;
    float* out = p.out + item * C;
    std::fill(out, out + lo, inf);
    std::fill(out + lo, out + C, 0.f);
    if (n == 0) continue;

    // The scale folds into the mean once: z = <s * mu, k> + s^2/2 * k^T Sigma k.
    for (int64_t g = 0; g < G; ++g) {
      const float* m = p.mean + b * p.mean_stride_b + (j * G + g) * p.mean_stride_h;
      for (int64_t d = 0; d < D; ++d) w.mu[g * D + d] = s * m[d];
    }
    // The group's Sigma rows, copied once per head into zero-padded rows of dp.
    if (p.cov) {
      for (int64_t g = 0; g < G; ++g) {
        const float* src = p.cov + b * p.cov_stride_b + (j * G + g) * p.cov_stride_h;
        for (int64_t d = 0; d < D; ++d)
          std::copy(src + d * p.cov_stride_r, src + d * p.cov_stride_r + D, &w.sigma[(g * D + d) * dp]);
      }
    }

    const T* k_head = k_base + b * p.k_stride_b + j * p.k_stride_h;
    for (int64_t t0 = lo; t0 < len; t0 += kTile) {
      const int64_t rows = std::min(kTile, len - t0);
      for (int64_t r = 0; r < rows; ++r) {
        float* dst = &w.k_tile[r * dp];
        const float* got = load_row(k_head + (t0 + r) * p.k_stride_c, dst, D);
        if (got != dst) std::copy(got, got + D, dst);
      }
      for (int64_t g = 0; g < G; ++g) {
        float* z = &w.z[g * C];
        for (int64_t r = 0; r < rows; ++r) z[t0 + r] = dot(&w.mu[g * D], &w.k_tile[r * dp], D);
        if (!p.cov) continue;
        quadratic_forms(w.k_tile.data(), rows, &w.sigma[g * D * dp], D, dp, w.ks.data(), w.quad.data());
        for (int64_t r = 0; r < rows; ++r) z[t0 + r] += half_s2 * w.quad[r];
      }
    }

    // Max-subtracted softmax over [lo, len) per query head, averaged into out.
    const float inv_g = 1.f / static_cast<float>(G);
    for (int64_t g = 0; g < G; ++g) {
      float* z = &w.z[g * C];
      float zmax = -inf;
      for (int64_t i = lo; i < len; ++i) zmax = z[i] > zmax ? z[i] : zmax;
      const float ref = zmax == -inf ? 0.f : zmax;
      float den = 0.f;
      for (int64_t i = lo; i < len; ++i) {
        z[i] = std::exp(z[i] - ref);
        den += z[i];
      }
      if (den == 0.f) continue;  // every z was -inf: the reference gives 0 (NaN propagates)
      const float scale = inv_g / den;
      for (int64_t i = lo; i < len; ++i) out[i] += z[i] * scale;
    }

    if (v_base) {
      const T* v_head = v_base + b * p.v_stride_b + j * p.v_stride_h;
      for (int64_t i = lo; i < len; ++i) {
        const float* vrow = load_row(v_head + i * p.v_stride_c, w.row.data(), D);
        out[i] = (out[i] + p.epsilon) * norm(vrow, D);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// slot_scores
// ---------------------------------------------------------------------------

// Chris Wellons' lowbias32; uint32 arithmetic wraps as the reference's masks do.
inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The reference's random_uniform for flat index (b * H + h) * C + i.
inline float random_uniform(uint32_t key, int64_t flat) {
  const uint32_t u = lowbias32(static_cast<uint32_t>(static_cast<uint64_t>(flat)) ^ key) >> 8;
  return static_cast<float>(u) * 0x1p-24f;  // exact: u < 2^24
}

inline uint32_t random_key(uint32_t seed) { return lowbias32(seed + 0x9E3779B9u); }

template <typename T>
void slot_scores_items(const SlotScoresParams& p, int64_t begin, int64_t end) {
  const int64_t C = p.capacity, D = p.head_dim;
  std::vector<float> row(D), anchor(D);
  const T* k_base = static_cast<const T*>(p.k);
  const T* v_base = static_cast<const T*>(p.v);
  const uint32_t key = random_key(p.seed);

  for (int64_t item = begin; item < end; ++item) {
    const int64_t j = item % p.num_kv_heads, b = item / p.num_kv_heads;
    const int64_t len = head_length(p.lengths, p.lengths_stride_b, p.lengths_stride_h, b, j);
    float* out = p.out + item * C;
    std::fill(out + len, out + C, 0.f);
    const T* k_head = k_base + b * p.k_stride_b + j * p.k_stride_h;
    switch (p.kind) {
      case SlotScoreKind::kKeyNorm:
        for (int64_t i = 0; i < len; ++i) out[i] = -norm(load_row(k_head + i * p.k_stride_c, row.data(), D), D);
        break;
      case SlotScoreKind::kValueNorm: {
        const T* v_head = v_base + b * p.v_stride_b + j * p.v_stride_h;
        for (int64_t i = 0; i < len; ++i) out[i] = norm(load_row(v_head + i * p.v_stride_c, row.data(), D), D);
        break;
      }
      case SlotScoreKind::kKeyDiff: {
        // Anchor: the mean of the unit keys over all valid slots (a zero key adds 0).
        // out[] holds each key's norm between the two passes.
        std::fill(anchor.begin(), anchor.end(), 0.f);
        for (int64_t i = 0; i < len; ++i) {
          const float* k = load_row(k_head + i * p.k_stride_c, row.data(), D);
          const float nk = std::max(norm(k, D), 1e-30f);
          out[i] = nk;
          for (int64_t d = 0; d < D; ++d) anchor[d] += k[d] / nk;
        }
        const float cnt = static_cast<float>(std::max<int64_t>(len, 1));
        for (int64_t d = 0; d < D; ++d) anchor[d] /= cnt;
        const float an = norm(anchor.data(), D);
        if (!(an > 0.f)) {
          std::fill(out, out + len, 0.f);
          break;
        }
        for (int64_t i = 0; i < len; ++i) {
          const float* k = load_row(k_head + i * p.k_stride_c, row.data(), D);
          out[i] = -(dot(k, anchor.data(), D) / out[i]) / an;
        }
        break;
      }
      case SlotScoreKind::kRecency:
        for (int64_t i = 0; i < len; ++i) out[i] = static_cast<float>(i);
        break;
      case SlotScoreKind::kRandom:
        for (int64_t i = 0; i < len; ++i) out[i] = random_uniform(key, item * C + i);
        break;
    }
  }
}

// ---------------------------------------------------------------------------
// update_scores_
// ---------------------------------------------------------------------------

// In double, rounded once to fp32, with the reference's operation order: the
// result is the reference's bit for bit. (Not multiversioned on purpose: the
// baseline ISA has no FMA, so no product can be fused into an add.)
inline void update_scores_items(const UpdateScoresParams& p, int64_t begin, int64_t end) {
  const double decay = p.decay, keep = 1.0 - p.decay;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t j = item % p.num_kv_heads, b = item / p.num_kv_heads;
    const int64_t len = head_length(p.lengths, p.lengths_stride_b, p.lengths_stride_h, b, j);
    const int64_t hl = head_length(p.hist_lengths, p.hist_lengths_stride_b, p.hist_lengths_stride_h, b, j);
    const int64_t has = std::max<int64_t>(std::min(len, hl), 0);
    float* h = p.hist + b * p.hist_stride_b + j * p.hist_stride_h;
    const float* f = p.fresh + b * p.fresh_stride_b + j * p.fresh_stride_h;
    for (int64_t i = 0; i < has; ++i) {
      const double old = h[i], nw = f[i];
      double r;
      switch (p.mode) {
        case UpdateMode::kMax: {
          const double a = decay * old;
          // torch.maximum propagates NaN from either side.
          r = (a != a || nw != nw) ? a + nw : (a < nw ? nw : a);
          break;
        }
        case UpdateMode::kEma: r = decay * old + keep * nw; break;
        default: r = decay * old + nw; break;
      }
      h[i] = static_cast<float>(r);
    }
    for (int64_t i = has; i < len; ++i) h[i] = f[i];
  }
}

}  // namespace kvkern::cpu::scorer
