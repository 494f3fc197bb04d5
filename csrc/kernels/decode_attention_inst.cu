// SPDX-License-Identifier: Apache-2.0
// Explicit instantiations of the CUDA decode-attention kernels and the
// run-time dispatch (dtype -> head dim -> heads tile -> (block_n, num_warps))
// behind the non-template entry points of decode_attention_launch.h.
//
// Instantiated: dtype {fp32, fp16, bf16} x head_dim {64, 128, 256} x heads tile
// {1, 2, 4, 8} x every KVKERN_DECODE_ATTENTION_VARIANTS pair, and the merge
// kernel for dtype x head_dim. kvkern/cuda_variants.py mirrors the variant list
// for the autotuner: keep the two in step.

#include <kvkern/decode_attention.cuh>
#include <kvkern/decode_attention_launch.h>

namespace kvkern {
namespace decode_attention_detail {

// Every (block_n, num_warps) variant of one (dtype, head_dim, heads tile).
// Explicitly instantiating this class (below) instantiates each member, and so
// each variant's kernel.
template <typename T, int HEAD_DIM, int HEADS_TILE>
struct SplitVariants {
  static cudaError_t launch(const DecodeAttentionParams& p, cudaStream_t stream) {
#define KVKERN_DA_LAUNCH_(BN, NW)                  \
  if (p.block_n == (BN) && p.num_warps == (NW))    \
    return launch_decode_attention_split<T, HEAD_DIM, HEADS_TILE, BN, NW>(p, stream);
    KVKERN_DECODE_ATTENTION_VARIANTS(KVKERN_DA_LAUNCH_)
#undef KVKERN_DA_LAUNCH_
    return cudaErrorInvalidValue;
  }

  static cudaError_t blocks_per_sm(const DecodeAttentionParams& p, int* out) {
#define KVKERN_DA_OCCUPANCY_(BN, NW)               \
  if (p.block_n == (BN) && p.num_warps == (NW))    \
    return decode_attention_split_blocks_per_sm<T, HEAD_DIM, HEADS_TILE, BN, NW>(p, out);
    KVKERN_DECODE_ATTENTION_VARIANTS(KVKERN_DA_OCCUPANCY_)
#undef KVKERN_DA_OCCUPANCY_
    return cudaErrorInvalidValue;
  }
};

}  // namespace decode_attention_detail

#define KVKERN_DA_INST_HEADS_(T, D)                                      \
  template struct decode_attention_detail::SplitVariants<T, D, 1>;       \
  template struct decode_attention_detail::SplitVariants<T, D, 2>;       \
  template struct decode_attention_detail::SplitVariants<T, D, 4>;       \
  template struct decode_attention_detail::SplitVariants<T, D, 8>;       \
  template cudaError_t launch_merge_attention_states_typed<T, D>(const float*, const float*, T*, float*, \
                                                                 int64_t, int, cudaStream_t);
#define KVKERN_DA_INST_DTYPE_(T)   \
  KVKERN_DA_INST_HEADS_(T, 64)     \
  KVKERN_DA_INST_HEADS_(T, 128)    \
  KVKERN_DA_INST_HEADS_(T, 256)

KVKERN_DA_INST_DTYPE_(float)
KVKERN_DA_INST_DTYPE_(__half)
KVKERN_DA_INST_DTYPE_(__nv_bfloat16)

#undef KVKERN_DA_INST_DTYPE_
#undef KVKERN_DA_INST_HEADS_

namespace {

using decode_attention_detail::SplitVariants;

// Calls fn with a SplitVariants<T, D, HT> value, the template arguments picked at run time.
template <typename T, int HEAD_DIM, typename Fn>
cudaError_t dispatch_heads_tile(const DecodeAttentionParams& p, Fn&& fn) {
  switch (decode_attention_heads_tile(p.group_size())) {
    case 1: return fn(SplitVariants<T, HEAD_DIM, 1>{});
    case 2: return fn(SplitVariants<T, HEAD_DIM, 2>{});
    case 4: return fn(SplitVariants<T, HEAD_DIM, 4>{});
    case 8: return fn(SplitVariants<T, HEAD_DIM, 8>{});
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename Fn>
cudaError_t dispatch_head_dim(const DecodeAttentionParams& p, Fn&& fn) {
  switch (p.head_dim) {
    case 64: return dispatch_heads_tile<T, 64>(p, fn);
    case 128: return dispatch_heads_tile<T, 128>(p, fn);
    case 256: return dispatch_heads_tile<T, 256>(p, fn);
    default: return cudaErrorInvalidValue;
  }
}

template <typename Fn>
cudaError_t dispatch_dtype(const DecodeAttentionParams& p, KvDtype dtype, Fn&& fn) {
  switch (dtype) {
    case KvDtype::kFloat32: return dispatch_head_dim<float>(p, fn);
    case KvDtype::kFloat16: return dispatch_head_dim<__half>(p, fn);
    case KvDtype::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(p, fn);
    default: return cudaErrorInvalidValue;
  }
}

bool valid_shape(const DecodeAttentionParams& p) {
  return p.num_kv_heads >= 1 && p.num_q_heads >= 1 && p.num_q_heads % p.num_kv_heads == 0;
}

}  // namespace

cudaError_t launch_decode_attention(const DecodeAttentionParams& p, KvDtype dtype, cudaStream_t stream) {
  if (!valid_shape(p)) return cudaErrorInvalidValue;
  return dispatch_dtype(p, dtype, [&](auto variants) { return decltype(variants)::launch(p, stream); });
}

cudaError_t decode_attention_blocks_per_sm(const DecodeAttentionParams& p, KvDtype dtype, int* blocks_per_sm) {
  if (!valid_shape(p) || blocks_per_sm == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(p, dtype,
                        [&](auto variants) { return decltype(variants)::blocks_per_sm(p, blocks_per_sm); });
}

namespace {

template <typename T>
cudaError_t merge_head_dim(const float* partial_out, const float* partial_lse, void* out, float* lse,
                           int64_t rows, int num_splits, int64_t head_dim, cudaStream_t stream) {
  T* o = static_cast<T*>(out);
  switch (head_dim) {
    case 64:
      return launch_merge_attention_states_typed<T, 64>(partial_out, partial_lse, o, lse, rows, num_splits, stream);
    case 128:
      return launch_merge_attention_states_typed<T, 128>(partial_out, partial_lse, o, lse, rows, num_splits, stream);
    case 256:
      return launch_merge_attention_states_typed<T, 256>(partial_out, partial_lse, o, lse, rows, num_splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_merge_attention_states(const float* partial_out, const float* partial_lse, void* out,
                                          KvDtype out_dtype, float* lse, int64_t rows, int num_splits,
                                          int64_t head_dim, cudaStream_t stream) {
  switch (out_dtype) {
    case KvDtype::kFloat32:
      return merge_head_dim<float>(partial_out, partial_lse, out, lse, rows, num_splits, head_dim, stream);
    case KvDtype::kFloat16:
      return merge_head_dim<__half>(partial_out, partial_lse, out, lse, rows, num_splits, head_dim, stream);
    case KvDtype::kBFloat16:
      return merge_head_dim<__nv_bfloat16>(partial_out, partial_lse, out, lse, rows, num_splits, head_dim,
                                           stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kvkern
