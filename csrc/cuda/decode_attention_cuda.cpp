// SPDX-License-Identifier: Apache-2.0
// CUDA glue for decode_attention (LibTorch stable ABI; compiled by the host
// compiler with -DUSE_CUDA -DKVKERN_WITH_CUDA): the shared argument checks,
// the CUDA-only checks (device, 16-byte alignment), the launch configuration
// (the caller's, else heuristics), output and workspace allocation, and one
// call into the torch-free launcher (decode_attention_launch.h).
//
// No host sync and no allocation that depends on tensor values: every size
// comes from shapes, so the op runs inside CUDA-graph capture.

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cuda_runtime_api.h>
#include <kvkern/decode_attention_launch.h>

#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>

#include "torch/attention_outputs.h"
#include "torch/decode_attention_args.h"

namespace kvkern::torch_glue {
namespace {

constexpr const char* kOp = "kvkern::decode_attention";

// Heuristic defaults.
constexpr int kDefaultNumWarps = 4;
constexpr int kDefaultNumStages = 3;
constexpr int64_t kStageTargetBytes = 16 * 1024;  // K + V bytes of one tile
constexpr int64_t kTargetWaves = 2;               // blocks >= waves * resident blocks
constexpr int64_t kMinTilesPerSplit = 2;          // at full capacity
constexpr int64_t kMaxHeuristicSplits = 128;

void check_cuda(cudaError_t err, const char* what) {
  STD_TORCH_CHECK(err == cudaSuccess, kOp, ": ", what, " failed: ", cudaGetErrorName(err), ": ",
                  cudaGetErrorString(err));
}

struct DeviceInfo {
  int sm_count = 0;
  int max_smem_per_block = 0;  // opt-in limit for dynamic shared memory
};

// Per-device attributes, queried once per device (no sync: attribute queries).
DeviceInfo device_info(int device) {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  check_cuda(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute(MultiProcessorCount)");
  check_cuda(cudaDeviceGetAttribute(&info.max_smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  cache.emplace(device, info);
  return info;
}

// Resident blocks per SM of the kernel variant p would launch, cached per
// (device, dtype, head dim, heads tile, block_n, num_warps, num_stages).
int blocks_per_sm(int device, const DecodeAttentionParams& p, KvDtype dt) {
  using Key = std::tuple<int, int, int64_t, int, int, int, int>;
  static std::mutex mu;
  static std::map<Key, int> cache;
  const Key key{device, static_cast<int>(dt), p.head_dim, decode_attention_heads_tile(p.group_size()),
                p.block_n, p.num_warps, p.num_stages};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  check_cuda(decode_attention_blocks_per_sm(p, dt, &n),
             "the occupancy query of the decode-attention kernel (is this GPU in TORCH_CUDA_ARCH_LIST "
             "of the build?)");
  if (n < 1) n = 1;
  cache.emplace(key, n);
  return n;
}

std::string variants_str() {
  std::ostringstream os;
  for (int i = 0; i < kNumDecodeAttentionVariants; ++i)
    os << (i ? ", " : "") << "(" << kDecodeAttentionVariants[i].block_n << ", "
       << kDecodeAttentionVariants[i].num_warps << ")";
  return os.str();
}

// The block_n the heuristic wants: a K + V tile of about kStageTargetBytes,
// taken from the compiled variants with num_warps (the nearest in log2).
int64_t default_block_n(int64_t head_dim, KvDtype dt, int64_t num_warps) {
  const int64_t row_bytes = 2 * head_dim * kv_dtype_size(dt);  // one K row + one V row
  int64_t want = kStageTargetBytes / row_bytes;
  if (want < 1) want = 1;
  int64_t best = 0;
  double best_dist = 0.0;
  for (const DecodeAttentionVariant& v : kDecodeAttentionVariants) {
    if (v.num_warps != num_warps) continue;
    double ratio = static_cast<double>(v.block_n) / static_cast<double>(want);
    double dist = ratio >= 1.0 ? ratio : 1.0 / ratio;
    // Ties go to the larger tile (fewer barriers per slot).
    if (best == 0 || dist < best_dist || (dist == best_dist && v.block_n > best)) {
      best = v.block_n;
      best_dist = dist;
    }
  }
  return best != 0 ? best : want;  // no variant with num_warps: the check below names it
}

// Splits per head so the grid has about kTargetWaves waves of resident blocks,
// but at least kMinTilesPerSplit tiles per split at full capacity. Near that
// count, the one whose last wave is fullest wins (equal lengths make equal
// blocks, so a nearly empty last wave would idle most SMs); ties go to fewer
// splits (less workspace traffic).
int64_t default_num_splits(int device, const DecodeAttentionParams& p, KvDtype dt) {
  const int64_t base = p.batch * p.num_kv_heads * decode_attention_head_chunks(p.group_size());
  if (base <= 0) return 1;
  const int64_t slots = static_cast<int64_t>(device_info(device).sm_count) * blocks_per_sm(device, p, dt);
  const int64_t target = kTargetWaves * slots;
  if (base >= target) return 1;
  int64_t most = p.capacity / (kMinTilesPerSplit * p.block_n);
  if (most > kMaxHeuristicSplits) most = kMaxHeuristicSplits;
  if (most < 1) most = 1;
  const int64_t want = (target + base - 1) / base;
  if (want >= most) return most;
  auto fill = [&](int64_t s) {  // fraction of the last wave's slots in use, 1 = full
    const int64_t blocks = base * s;
    const int64_t rem = blocks % slots;
    return rem == 0 ? 1.0 : static_cast<double>(rem) / static_cast<double>(slots);
  };
  int64_t best = want;
  double best_eff = 0.0;
  const int64_t lo = 3 * want / 4 > 1 ? 3 * want / 4 : 1;
  const int64_t hi = want + want / 2 < most ? want + want / 2 : most;
  for (int64_t s = lo; s <= hi; ++s) {
    // Efficiency of the whole grid: waves / ceil(waves).
    const double waves = static_cast<double>(base * s) / static_cast<double>(slots);
    const double eff = waves / (waves - fill(s) + 1.0);
    if (eff > best_eff + 1e-9) {
      best = s;
      best_eff = eff;
    }
  }
  return best;
}

// The kernels read q, k, v rows as 16-byte vectors: the data pointer and every
// stride but the last (of dims with more than one element) must be multiples
// of 16 bytes.
void check_vector_aligned(const char* name, const Tensor& t, int64_t elem_size) {
  if (t.numel() == 0) return;
  const auto addr = reinterpret_cast<std::uintptr_t>(t.const_data_ptr());
  STD_TORCH_CHECK(addr % 16 == 0, kOp, ": ", name,
                  ": the CUDA kernel reads 16-byte vectors, so the data pointer must be 16-byte aligned; "
                  "got an address that is ",
                  addr % 16, " bytes past a multiple of 16 (a view with a storage offset? call .clone())");
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) <= 1) continue;
    STD_TORCH_CHECK((t.stride(d) * elem_size) % 16 == 0, kOp, ": ", name,
                    ": the CUDA kernel reads 16-byte vectors, so the stride of every dim but the last must be "
                    "a multiple of 16 bytes (",
                    16 / elem_size, " elements); got stride ", t.stride(d), " in dim ", d, " (shape ",
                    shape_str(t), "; call .contiguous())");
  }
}

KvDtype kv_dtype(ScalarType s) {
  switch (s) {
    case ScalarType::Float: return KvDtype::kFloat32;
    case ScalarType::Half: return KvDtype::kFloat16;
    case ScalarType::BFloat16: return KvDtype::kBFloat16;
    default: STD_TORCH_CHECK(false, kOp, ": unreachable dtype"); return KvDtype::kFloat32;
  }
}

std::tuple<Tensor, Tensor> decode_attention_cuda(const Tensor& q, const Tensor& k_cache,
                                                 const Tensor& v_cache, const Tensor& lengths,
                                                 const std::optional<Tensor>& log_w,
                                                 std::optional<double> sm_scale, int64_t num_splits,
                                                 int64_t block_n, int64_t num_warps, int64_t num_stages) {
  DecodeAttentionParams p = make_decode_attention_params(kOp, q, k_cache, v_cache, lengths, log_w, sm_scale,
                                                         num_splits, block_n, num_warps, num_stages);
  STD_TORCH_CHECK(q.is_cuda(), kOp, ": q: expected a CUDA tensor here, got a tensor on cpu");
  const int32_t device = q.get_device_index();
  torch::stable::accelerator::DeviceGuard guard(device);
  const KvDtype dt = kv_dtype(q.scalar_type());
  const int64_t elem = kv_dtype_size(dt);

  // Launch configuration: the caller's values (bounded by make_decode_attention_params), 0 = heuristic.
  const int64_t nw = num_warps > 0 ? num_warps : kDefaultNumWarps;
  const int64_t bn = block_n > 0 ? block_n : default_block_n(p.head_dim, dt, nw);
  STD_TORCH_CHECK(decode_attention_variant_supported(static_cast<int>(bn), static_cast<int>(nw)),
                  kOp, ": block_n, num_warps: (", bn, ", ", nw, ")",
                  block_n == 0 || num_warps == 0 ? " (0 replaced by the default)" : "",
                  " is not a compiled CUDA variant; supported (block_n, num_warps): ", variants_str());
  STD_TORCH_CHECK(num_stages == 0 ||
                      (num_stages >= kDecodeAttentionMinStages && num_stages <= kDecodeAttentionMaxStages),
                  kOp, ": num_stages: expected 0 (heuristic) or a value in [", kDecodeAttentionMinStages, ", ",
                  kDecodeAttentionMaxStages, "] for the CUDA kernel, got ", num_stages);
  p.block_n = static_cast<int>(bn);
  p.num_warps = static_cast<int>(nw);

  const DeviceInfo info = device_info(device);
  const int64_t G = p.group_size();
  auto smem_for = [&](int64_t stages) {
    return static_cast<int64_t>(
        decode_attention_smem_bytes(p.head_dim, dt, G, p.block_n, p.num_warps, static_cast<int>(stages)));
  };
  int64_t stages = num_stages;
  if (stages == 0) {
    stages = kDefaultNumStages;
    while (stages > kDecodeAttentionMinStages && smem_for(stages) > info.max_smem_per_block) --stages;
  }
  STD_TORCH_CHECK(smem_for(stages) <= info.max_smem_per_block, kOp, ": block_n = ", bn, ", num_stages = ",
                  stages, ": the kernel needs ", smem_for(stages),
                  " bytes of shared memory per block; this device allows ", info.max_smem_per_block,
                  " (lower block_n or num_stages)");
  p.num_stages = static_cast<int>(stages);

  check_vector_aligned("q", q, elem);
  check_vector_aligned("k_cache", k_cache, elem);
  check_vector_aligned("v_cache", v_cache, elem);
  if (log_w.has_value() && log_w->numel() > 0)
    STD_TORCH_CHECK(reinterpret_cast<std::uintptr_t>(log_w->const_data_ptr()) % 4 == 0, kOp,
                    ": log_w: expected a 4-byte aligned data pointer");

  auto [out, lse] = new_attention_outputs(q, p);
  if (out.numel() == 0) return {out, lse};  // never launch an empty grid

  p.num_splits = static_cast<int>(num_splits > 0 ? num_splits : default_num_splits(device, p, dt));
  const int64_t blocks = decode_attention_num_blocks(p);
  STD_TORCH_CHECK(blocks <= INT_MAX, kOp, ": num_splits: ", p.num_splits, " splits need ", blocks,
                  " blocks, more than a 1-D grid holds (", INT_MAX, "); use fewer splits");

  const auto partials = new_split_partials(q, p, out, lse);  // alive until the kernels are done

  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  const cudaError_t err = launch_decode_attention(p, dt, static_cast<cudaStream_t>(stream));
  STD_TORCH_CHECK(err == cudaSuccess, kOp, ": launching the CUDA kernel (block_n = ", p.block_n,
                  ", num_warps = ", p.num_warps, ", num_stages = ", p.num_stages, ", num_splits = ", p.num_splits,
                  ") failed: ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
  return {out, lse};
}

}  // namespace
}  // namespace kvkern::torch_glue

STABLE_TORCH_LIBRARY_IMPL(kvkern, CUDA, m) {
  m.impl("decode_attention", TORCH_BOX(&kvkern::torch_glue::decode_attention_cuda));
}
