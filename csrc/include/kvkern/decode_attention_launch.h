// SPDX-License-Identifier: Apache-2.0
// Host-side interface of the CUDA decode-attention kernels: what the g++-built
// torch glue may call. No CUDA device types here (only cudaStream_t and
// cudaError_t), so any C++ compiler can include it.
//
// The kernels themselves are in decode_attention.cuh; every variant listed
// below is instantiated in csrc/kernels/decode_attention_inst.cu, and the
// Python mirror kvkern/cuda_variants.py must list the same variants.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "decode_attention_params.h"

namespace kvkern {

// Storage dtype of q / k / v / out.
enum class KvDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int kv_dtype_size(KvDtype dt) { return dt == KvDtype::kFloat32 ? 4 : 2; }

// The compiled (block_n, num_warps) variants of the split kernel, one X(...)
// per variant. block_n = K/V slots per pipeline stage, num_warps = warps per
// block. Every pair must satisfy block_n % (num_warps * 4) == 0 (each warp
// handles up to 4 slots at a time, at head_dim 64).
#define KVKERN_DECODE_ATTENTION_VARIANTS(X) \
  X(16, 4)                                  \
  X(32, 4)                                  \
  X(64, 4)                                  \
  X(32, 8)                                  \
  X(64, 8)

struct DecodeAttentionVariant {
  int block_n;
  int num_warps;
};

#define KVKERN_DA_VARIANT_ENTRY_(BN, NW) DecodeAttentionVariant{BN, NW},
inline constexpr DecodeAttentionVariant kDecodeAttentionVariants[] = {
    KVKERN_DECODE_ATTENTION_VARIANTS(KVKERN_DA_VARIANT_ENTRY_)};
#undef KVKERN_DA_VARIANT_ENTRY_
inline constexpr int kNumDecodeAttentionVariants =
    static_cast<int>(sizeof(kDecodeAttentionVariants) / sizeof(kDecodeAttentionVariants[0]));

inline bool decode_attention_variant_supported(int block_n, int num_warps) {
  for (const DecodeAttentionVariant& v : kDecodeAttentionVariants)
    if (v.block_n == block_n && v.num_warps == num_warps) return true;
  return false;
}

// Pipeline depth (K/V tiles in shared memory) accepted by the split kernel.
inline constexpr int kDecodeAttentionMinStages = 2;
inline constexpr int kDecodeAttentionMaxStages = 4;

inline bool decode_attention_head_dim_supported(int64_t d) { return d == 64 || d == 128 || d == 256; }

// Query heads of one GQA group handled by one block (sharing each K/V load):
// the smallest of 1, 2, 4, 8 that covers the group, 8 for larger groups, which
// are split over ceil(group / 8) blocks.
inline int decode_attention_heads_tile(int64_t group) {
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
}
inline int64_t decode_attention_head_chunks(int64_t group) {
  const int64_t ht = decode_attention_heads_tile(group);
  return (group + ht - 1) / ht;
}

// Blocks of the split kernel: batch * kv heads * head chunks * splits.
inline int64_t decode_attention_num_blocks(const DecodeAttentionParams& p) {
  return p.batch * p.num_kv_heads * decode_attention_head_chunks(p.group_size()) * p.num_splits;
}

// Dynamic shared memory of the split kernel: the larger of the copy pipeline
// (num_stages x (K tile + V tile + log_w tile)) and the cross-warp merge at the
// end (per warp and head: D accumulators, the running max and sum).
inline size_t decode_attention_smem_bytes(int64_t head_dim, KvDtype dt, int64_t group, int block_n,
                                          int num_warps, int num_stages) {
  const size_t stage = 2u * static_cast<size_t>(block_n) * static_cast<size_t>(head_dim) *
                           static_cast<size_t>(kv_dtype_size(dt)) +
                       static_cast<size_t>(block_n) * sizeof(float);
  const size_t pipeline = static_cast<size_t>(num_stages) * stage;
  const size_t merge = static_cast<size_t>(num_warps) * decode_attention_heads_tile(group) *
                       (static_cast<size_t>(head_dim) + 2) * sizeof(float);
  return pipeline > merge ? pipeline : merge;
}

// Runs decode attention as described by p (decode_attention_params.h), whose
// launch configuration must be resolved: a supported (block_n, num_warps),
// num_stages in [kDecodeAttentionMinStages, kDecodeAttentionMaxStages],
// num_splits >= 1 (then partial_out / partial_lse must hold
// [B, Hq, num_splits, D] and [B, Hq, num_splits] fp32). q / k / v and their
// b / h / c strides must be 16-byte aligned; out / lse contiguous. Launches the
// split kernel and, when num_splits > 1, the merge kernel on stream. Returns
// cudaErrorInvalidValue for an unsupported configuration, else the launch
// status. Nothing synchronizes; safe inside CUDA-graph capture.
cudaError_t launch_decode_attention(const DecodeAttentionParams& p, KvDtype dtype, cudaStream_t stream);

// Resident blocks per SM of the split kernel p would launch (occupancy
// calculator; no kernel runs). For the split-K heuristic.
cudaError_t decode_attention_blocks_per_sm(const DecodeAttentionParams& p, KvDtype dtype,
                                           int* blocks_per_sm);

// Merges per-split attention states ("merge states", the split-K combine):
//   lse[r] = log sum_s exp(partial_lse[r, s])
//   out[r] = sum_s exp(partial_lse[r, s] - lse[r]) * partial_out[r, s, :]
// partial_out [rows, num_splits, head_dim] fp32, partial_lse [rows, num_splits]
// fp32, out [rows, head_dim] of out_dtype, lse [rows] fp32 or nullptr; all
// contiguous, 16-byte aligned. A NaN partial lse makes the row NaN; a row whose
// partials are all -inf gives out 0, lse -inf. head_dim in {64, 128, 256}.
cudaError_t launch_merge_attention_states(const float* partial_out, const float* partial_lse,
                                          void* out, KvDtype out_dtype, float* lse, int64_t rows,
                                          int num_splits, int64_t head_dim, cudaStream_t stream);

}  // namespace kvkern
