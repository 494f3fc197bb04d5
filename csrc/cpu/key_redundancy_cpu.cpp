// SPDX-License-Identifier: Apache-2.0
// CPU glue for key_redundancy: checks and the parallel loops of the kernel's
// stages (csrc/cpu/key_redundancy_kernel.h).

// 64-byte vector helpers are always inlined into ISA-specific clones.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <torch/csrc/stable/library.h>

#include "cpu/eviction_cpu_ops.h"
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include "cpu/dtype_dispatch.h"
#include "cpu/key_redundancy_kernel.h"
#include "torch/key_redundancy_args.h"

namespace kvkern::torch_glue {
namespace {

namespace rk = kvkern::cpu::redundancy;

template <typename T>
void run(const KeyRedundancyParams& p) {
  rk::key_redundancy_run<T>(p, [](int64_t begin, int64_t end, int64_t grain, const auto& fn) {
    torch::stable::parallel_for(begin, end, grain, fn);
  });
}

}  // namespace

// The op implementations: external linkage, declared in cpu/eviction_cpu_ops.h.
Tensor key_redundancy_cpu(const Tensor& k_cache, const Tensor& lengths, int64_t n_window, double threshold) {
  const char* op = "kvkern::key_redundancy";
  KeyRedundancyParams p = make_key_redundancy_params(op, k_cache, lengths, n_window, threshold);
  STD_TORCH_CHECK(k_cache.is_cpu(), op, ": k_cache: expected a CPU tensor here");
  check_host_lengths(op, p);
  Tensor out = torch::stable::new_empty(k_cache, {p.batch, p.num_kv_heads, p.capacity}, ScalarType::Float);
  p.out = static_cast<float*>(out.mutable_data_ptr());
  if (out.numel() == 0) return out;
  dispatch_cache_dtype(op, k_cache.scalar_type(), [&](auto tag) { run<decltype(tag)>(p); });
  return out;
}

}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CPU, m) {
  m.impl("key_redundancy", TORCH_BOX(&kvkern::torch_glue::key_redundancy_cpu));
}
