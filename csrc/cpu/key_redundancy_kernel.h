// SPDX-License-Identifier: Apache-2.0
// CPU key_redundancy, framework-free (kvkern/reference.py key_redundancy states the math).
//
// Per head of L valid keys: c[m, n] = <k_m, k_n> / ((|k_m| + 1e-8)(|k_n| + 1e-8)).
// Work items are (batch, kv head, block of kRows rows m); each runs over every
// column tile n < L with the tile GEMM of window_scores (rows along SIMD lanes)
// and keeps, per row m: the sum of c[m, n] over n != m, and the largest n != m
// with c[m, n] > threshold (with that c). c is symmetric, so that n is also the
// "latest near-duplicate" m* of column m in the reference's words: the
// reference zeroes c[m*, m], which the finish step subtracts from row m*'s
// sum. That rule is global over all rows, which is why it is applied only after
// every row block is done. The Gram matrix is never stored.
#pragma once

#include <kvkern/key_redundancy_params.h>

#include "window_scores_kernel.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace kvkern::cpu::redundancy {

using window::kLanes;
using window::kTile;

constexpr int64_t kRows = 64;  // rows per work item: four SIMD vectors

// 1 / (|k_i| + 1e-8) of the valid keys of heads [begin, end), into inv [B * Hkv][C].
template <typename T>
void inverse_norms(const KeyRedundancyParams& p, float* inv, int64_t begin, int64_t end) {
  const T* k_base = static_cast<const T*>(p.k);
  const int64_t D = p.head_dim;
  for (int64_t bj = begin; bj < end; ++bj) {
    const int64_t b = bj / p.num_kv_heads, j = bj % p.num_kv_heads;
    const int64_t len = p.lengths[b * p.lengths_stride_b + j * p.lengths_stride_h];
    const T* k_head = k_base + b * p.k_stride_b + j * p.k_stride_h;
    for (int64_t i = 0; i < len; ++i) {
      const T* row = k_head + i * p.k_stride_c;
      double ss = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double x = to_float(row[d]);
        ss += x * x;
      }
      inv[bj * p.capacity + i] = static_cast<float>(1.0 / (std::sqrt(ss) + 1e-8));
    }
  }
}

// One S tile (S[s][r] = <k_{n0+s}, k_{m0+r}>, rows r < kRows) folded into the row state.
struct FoldTile {
  template <typename V>
  static KVKERN_WS_INLINE void run(const float* S, int64_t n, int64_t n0, const float* inv_col, const float* inv_row,
                                   const int32_t* m_idx, float threshold, float* rowsum, int32_t* latest, float* val) {
    using O = window::VecOps<V>;
    using I = typename O::I;
    const V thr = O::splat(threshold), ninf = O::splat(-std::numeric_limits<float>::infinity());
    for (int64_t r = 0; r < kRows; r += O::kN) {
      const V im = O::load(inv_row + r);
      const I mi = O::iload(m_idx + r);
      V sum = O::load(rowsum + r), v = O::load(val + r);
      I lat = O::iload(latest + r);
      for (int64_t s = 0; s < n; ++s) {
        // Written so that GCC keeps it in vectors in every clone: it scalarizes
        // (mask & float-compare) and ?: with a scalar arm.
        const I col = O::isplat(static_cast<int32_t>(n0 + s));
        const V c = O::load(S + s * kRows + r) * im * O::splat(inv_col[s]);
        const I off_diag = mi != col;
        sum += off_diag ? c : V{};
        const V cand = off_diag ? c : ninf;
        // Columns come in increasing order: the last one over the threshold is the largest.
        lat = cand > thr ? col : lat;
        v = cand > thr ? c : v;
      }
      O::store(rowsum + r, sum);
      O::store(val + r, v);
      O::istore(latest + r, lat);
    }
  }
};
KVKERN_WS_MULTIVERSION inline void fold_tile(const float* S, int64_t n, int64_t n0, const float* inv_col,
                                             const float* inv_row, const int32_t* m_idx, float threshold,
                                             float* rowsum, int32_t* latest, float* val) {
  window::with_simd<FoldTile>(S, n, n0, inv_col, inv_row, m_idx, threshold, rowsum, latest, val);
}

// Row-block items [begin, end) of the (b, j, block) grid: for rows m < L,
// rowsum[m] (over n != m, n < L), latest[m] (-1 if none) and val[m] = c[m, latest[m]],
// all [B * Hkv][C].
template <typename T>
void row_items(const KeyRedundancyParams& p, const float* inv, float* rowsum, int32_t* latest, float* val,
               int64_t begin, int64_t end) {
  const int64_t C = p.capacity, blocks = (C + kRows - 1) / kRows;
  window::TileGemm<T> gm(p.head_dim, kRows);
  std::vector<float> S(kTile * kRows), inv_row(kRows), sum(kRows), v(kRows);
  std::vector<int32_t> m_idx(kRows), lat(kRows);
  const T* k_base = static_cast<const T*>(p.k);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t blk = item % blocks, bj = item / blocks;
    const int64_t b = bj / p.num_kv_heads, j = bj % p.num_kv_heads;
    const int64_t len = p.lengths[b * p.lengths_stride_b + j * p.lengths_stride_h];
    const int64_t m0 = blk * kRows;
    if (m0 >= len) continue;
    const int64_t rows = std::min(kRows, len - m0);
    const T* k_head = k_base + b * p.k_stride_b + j * p.k_stride_h;
    for (int64_t r = 0; r < kRows; ++r) {
      if (r < rows) {
        gm.set_row(r, k_head + (m0 + r) * p.k_stride_c);
        inv_row[r] = inv[bj * C + m0 + r];
      } else {
        gm.zero_row(r);
        inv_row[r] = 0.f;  // padding rows (never read back)
      }
      m_idx[r] = static_cast<int32_t>(m0 + r);
      sum[r] = 0.f;
      v[r] = 0.f;
      lat[r] = -1;
    }
    for (int64_t n0 = 0; n0 < len; n0 += kTile) {
      const int64_t n = std::min(kTile, len - n0);
      gm.tile(k_head + n0 * p.k_stride_c, p.k_stride_c, n, S.data());
      fold_tile(S.data(), n, n0, inv + bj * C + n0, inv_row.data(), m_idx.data(), p.threshold, sum.data(),
                lat.data(), v.data());
    }
    for (int64_t r = 0; r < rows; ++r) {
      rowsum[bj * C + m0 + r] = sum[r];
      latest[bj * C + m0 + r] = lat[r];
      val[bj * C + m0 + r] = v[r];
    }
  }
}

// Heads [begin, end): removes each key's latest near-duplicate entry from that
// duplicate's row, then out = softmax-then-max-normalised red over the
// candidates m < L - n_window, which is exp(red[m] - max over candidates).
inline void finish_heads(const KeyRedundancyParams& p, float* rowsum, const int32_t* latest, const float* val,
                         int64_t begin, int64_t end) {
  const int64_t C = p.capacity;
  for (int64_t bj = begin; bj < end; ++bj) {
    const int64_t b = bj / p.num_kv_heads, j = bj % p.num_kv_heads;
    const int64_t len = p.lengths[b * p.lengths_stride_b + j * p.lengths_stride_h];
    const int64_t M = std::max<int64_t>(len - p.n_window, 0);
    float* red = rowsum + bj * C;
    float* out = p.out + bj * C;
    for (int64_t n = 0; n < len; ++n) {
      const int32_t m = latest[bj * C + n];
      if (m >= 0) red[m] -= val[bj * C + n];
    }
    const float inv_len = 1.f / static_cast<float>(std::max<int64_t>(len, 1));
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t m = 0; m < M; ++m) top = std::max(top, red[m] * inv_len);
    for (int64_t m = 0; m < M; ++m) out[m] = std::exp(red[m] * inv_len - top);
    for (int64_t m = M; m < C; ++m) out[m] = 0.f;
  }
}

// The whole op (p.out set, lengths in [0, C]); parallel_for as for window_scores_run.
template <typename T, typename ParallelFor>
void key_redundancy_run(const KeyRedundancyParams& p, ParallelFor&& parallel_for) {
  const int64_t heads = p.batch * p.num_kv_heads, C = p.capacity;
  if (heads * C == 0) return;
  std::vector<float> inv(heads * C), rowsum(heads * C), val(heads * C);
  std::vector<int32_t> latest(heads * C);
  parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) { inverse_norms<T>(p, inv.data(), begin, end); });
  const int64_t blocks = (C + kRows - 1) / kRows;
  parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    row_items<T>(p, inv.data(), rowsum.data(), latest.data(), val.data(), begin, end);
  });
  parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    finish_heads(p, rowsum.data(), latest.data(), val.data(), begin, end);
  });
}

}  // namespace kvkern::cpu::redundancy

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
