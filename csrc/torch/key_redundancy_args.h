// SPDX-License-Identifier: Apache-2.0
// Checks key_redundancy's arguments and turns them into KeyRedundancyParams.
// Device-agnostic (the caller checks the device type and, on CPU, the lengths values).
#pragma once

#include <kvkern/key_redundancy_params.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"

namespace kvkern::torch_glue {

namespace redundancy_args {

// The largest float <= t: then (float c) > threshold decides exactly as c > t in double.
inline float threshold_round_down(double t) {
  float f = static_cast<float>(t);
  if (static_cast<double>(f) > t) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
  return f;
}

}  // namespace redundancy_args

// Everything but the output.
inline KeyRedundancyParams make_key_redundancy_params(const char* op, const Tensor& k_cache,
                                                      const Tensor& lengths, int64_t n_window,
                                                      double threshold) {
  check_rank(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]");
  check_cache_dtype(op, "k_cache", k_cache);
  const int64_t B = k_cache.size(0), Hkv = k_cache.size(1), C = k_cache.size(2), D = k_cache.size(3);
  STD_TORCH_CHECK(D >= 1, op, ": k_cache: expected head dim D >= 1, got shape ", shape_str(k_cache));
  check_head_ints(op, "lengths", lengths, B, Hkv, k_cache, "k_cache");
  check_last_dim_contiguous(op, "k_cache", k_cache);
  STD_TORCH_CHECK(n_window >= 0, op, ": n_window: expected a value >= 0, got ", n_window);
  STD_TORCH_CHECK(!std::isnan(threshold), op, ": threshold: expected a number, got nan");

  KeyRedundancyParams p;
  p.k = k_cache.const_data_ptr();
  p.lengths = static_cast<const int32_t*>(lengths.const_data_ptr());
  p.batch = B;
  p.num_kv_heads = Hkv;
  p.capacity = C;
  p.head_dim = D;
  p.k_stride_b = k_cache.stride(0);
  p.k_stride_h = k_cache.stride(1);
  p.k_stride_c = k_cache.stride(2);
  p.lengths_stride_b = lengths.stride(0);
  p.lengths_stride_h = lengths.stride(1);
  p.n_window = n_window;
  p.threshold = redundancy_args::threshold_round_down(threshold);
  return p;
}

}  // namespace kvkern::torch_glue
