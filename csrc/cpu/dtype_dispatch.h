// SPDX-License-Identifier: Apache-2.0
// The one switch from a cache dtype (fp32 / fp16 / bf16) to the CPU kernels'
// element type, shared by the CPU glue files.
#pragma once

#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "cpu/float_convert.h"

namespace kvkern::torch_glue {

// Calls fn(T{}) with T = float, cpu::Half or cpu::BFloat16 for dt; the
// argument checks have already rejected every other dtype.
template <class F>
void dispatch_cache_dtype(const char* op, torch::headeronly::ScalarType dt, F&& fn) {
  using torch::headeronly::ScalarType;
  switch (dt) {
    case ScalarType::Float: fn(float{}); break;
    case ScalarType::Half: fn(cpu::Half{}); break;
    case ScalarType::BFloat16: fn(cpu::BFloat16{}); break;
    default: STD_TORCH_CHECK(false, op, ": unreachable dtype");
  }
}

}  // namespace kvkern::torch_glue
