// SPDX-License-Identifier: Apache-2.0
// The framework-free description of a key_redundancy call (kvkern/reference.py
// key_redundancy states the math), filled by csrc/torch/key_redundancy_args.h.
#pragma once

#include <cstdint>

namespace kvkern {

struct KeyRedundancyParams {
  const void* k = nullptr;           // [B, Hkv, C, D], T
  const int32_t* lengths = nullptr;  // [B, Hkv]
  float* out = nullptr;              // [B, Hkv, C] fp32, contiguous

  int64_t batch = 0, num_kv_heads = 0, capacity = 0, head_dim = 0;
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_c = 0;
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;

  int64_t n_window = 0;  // >= 0: the last n_window valid slots score 0
  // c > threshold, decided in fp32: the largest float <= the double threshold,
  // so that the comparison agrees with the exact one for every fp32 c.
  float threshold = 0.5f;
};

}  // namespace kvkern
