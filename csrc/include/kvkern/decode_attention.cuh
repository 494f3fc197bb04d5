// SPDX-License-Identifier: Apache-2.0
// CUDA decode attention (flash-decoding): a split-K kernel over the K/V cache
// and a merge-states kernel that combines the splits. Torch-free: only the CUDA
// runtime, cuda_fp16 / cuda_bf16 and kvkern headers.
//
// Math (decode_attention_params.h): for batch b, query head h, kv head
// j = h / G and valid slots i < len = lengths[b, j]
//   s_i = sm_scale * <q, k_i> + log_w_i,  lse = log sum_i exp(s_i),
//   out = sum_i exp(s_i - lse) v_i.
// The kernels work in base 2: q is pre-scaled by sm_scale * log2(e) and log_w
// by log2(e), so exp2 of a logit is exp of the natural one, and
// lse = ln(2) * m2 + ln(l) converts back at the end (no fast-math).
//
// Split kernel, one block per (b, j, split s, chunk of HEADS_TILE query heads):
//  * Each K/V row of D elements is read by D / 8 threads, 8 elements each
//    (one or two 16-byte vectors), so a warp covers 32 / (D / 8) rows at once;
//    the block's NUM_WARPS * that many "row groups" each own every
//    kGroups-th row of a tile.
//  * Tiles of BLOCK_N rows of K, V (and log_w) stream into shared memory
//    through a num_stages-deep cp.async pipeline, so about
//    (num_stages - 1) * BLOCK_N rows per block are in flight while one tile is
//    consumed. A thread copies exactly the K/V vectors it later reads.
//  * Every row group runs its own online softmax (running max m, sum l and
//    8 accumulators per query head of the tile): the HEADS_TILE query heads of
//    the GQA group share each K/V load, and no block-wide reduction is needed
//    per tile. At the end the row groups are merged (warp shuffles, then
//    shared memory across warps), as the splits are merged later.
//  * Split s covers slots [lo, hi) of the head's own length (split_range, the
//    CPU rule): chunk = ceil(len / S) rounded up to BLOCK_N. Slots >= hi are
//    never read: their shared-memory rows are zero-filled and their logits are
//    -inf. A length outside [0, C] reads nothing and writes NaN.
//  * One split: out / lse written directly. Several: fp32 partial out / lse
//    to the workspace, then merge_attention_states_kernel.
#pragma once

#include <math_constants.h>

#include <climits>
#include <cstddef>
#include <cstdint>

#include "attention_common.cuh"
#include "common.cuh"
#include "decode_attention_launch.h"
#include "decode_attention_params.h"

namespace kvkern {

template <typename T>
struct KvDtypeOf;
template <>
struct KvDtypeOf<float> {
  static constexpr KvDtype value = KvDtype::kFloat32;
};
template <>
struct KvDtypeOf<__half> {
  static constexpr KvDtype value = KvDtype::kFloat16;
};
template <>
struct KvDtypeOf<__nv_bfloat16> {
  static constexpr KvDtype value = KvDtype::kBFloat16;
};

namespace decode_attention_detail {

using split_attn::kNegInf;

// Compile-time shape of one split-kernel variant.
template <typename T, int HEAD_DIM, int HEADS_TILE, int BLOCK_N, int NUM_WARPS>
struct SplitConfig {
  static constexpr int kThreads = NUM_WARPS * 32;
  static constexpr int kVec = DtypeTraits<T>::kVec;          // elements per 16-byte vector
  static constexpr int kElems = 8;                           // elements of a row per thread
  static constexpr int kChunks = kElems / kVec;              // 16-byte vectors per thread per row
  static constexpr int kRowThreads = HEAD_DIM / kElems;      // threads per row: 8, 16, 32
  static constexpr int kRowsPerWarp = 32 / kRowThreads;      // rows a warp handles at once: 4, 2, 1
  static constexpr int kGroups = NUM_WARPS * kRowsPerWarp;   // row groups per block
  static constexpr int kRowsPerGroup = BLOCK_N / kGroups;    // rows per group per tile
  static constexpr int kTileElems = BLOCK_N * HEAD_DIM;      // one K (or V) tile
  // Blocks per SM the register allocation must allow (__launch_bounds__):
  // <= 128 registers per thread up to 4 query heads per tile, no cap for 8
  // (without it ptxas spilled in one variant and overshot 128 in others).
  static constexpr int kMinBlocks = HEADS_TILE <= 4 ? 512 / kThreads : 1;
  // One pipeline stage: K tile, V tile (T), log_w tile (fp32). The host-side
  // decode_attention_smem_bytes uses the same formula.
  static constexpr int kStageBytes =
      2 * kTileElems * static_cast<int>(sizeof(T)) + BLOCK_N * static_cast<int>(sizeof(float));

  static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "HEAD_DIM: 64, 128 or 256");
  static_assert(HEADS_TILE == 1 || HEADS_TILE == 2 || HEADS_TILE == 4 || HEADS_TILE == 8,
                "HEADS_TILE: 1, 2, 4 or 8");
  static_assert(kVec * kChunks == kElems, "8 elements per thread are whole 16-byte vectors");
  static_assert(kRowThreads * kElems == HEAD_DIM && kRowThreads <= 32 && 32 % kRowThreads == 0,
                "a row is covered by a power-of-two number of lanes of one warp");
  static_assert(BLOCK_N % kGroups == 0 && kRowsPerGroup >= 1, "BLOCK_N: a multiple of the row groups");
  static_assert(kStageBytes % 16 == 0, "stages keep 16-byte alignment");
};

// The online-softmax state, its update and the merges: attention_common.cuh.

template <typename T, int HEAD_DIM, int HEADS_TILE, int BLOCK_N, int NUM_WARPS>
__global__ void __launch_bounds__(NUM_WARPS * 32,
                                  (SplitConfig<T, HEAD_DIM, HEADS_TILE, BLOCK_N, NUM_WARPS>::kMinBlocks))
    decode_attention_split_kernel(const DecodeAttentionParams p) {
  using Cfg = SplitConfig<T, HEAD_DIM, HEADS_TILE, BLOCK_N, NUM_WARPS>;
  using Tr = DtypeTraits<T>;
  constexpr int HT = HEADS_TILE;
  constexpr int kE = Cfg::kElems;
  constexpr int kRT = Cfg::kRowThreads;

  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int group = warp * Cfg::kRowsPerWarp + lane / kRT;  // row group, 0 .. kGroups-1
  const int r = lane % kRT;                                 // lane within the row
  // This thread's 16-byte vector cc of a row starts at element vec_elem(cc);
  // the same mapping is used for q, K, V and the accumulators.
  auto vec_elem = [r](int cc) { return (cc * kRT + r) * Cfg::kVec; };

  const split_attn::SplitWork work = split_attn::split_work(p, HT, BLOCK_N);
  const int64_t b = work.b, j = work.j, s = work.s, c = work.c, lo = work.lo, hi = work.hi;
  const bool bad_len = work.bad_len;
  const int64_t G = p.num_q_heads / p.num_kv_heads;
  const int64_t S = p.num_splits;
  const int64_t num_tiles = ceil_div<int64_t>(hi - lo, BLOCK_N);

  const int64_t hq0 = j * G + c * HT;  // first query head of this block
  const int n_heads = static_cast<int>(G - c * HT < HT ? G - c * HT : HT);

  // q rows of the tile, scaled into base-2 logits. Heads past n_heads are 0
  // (computed, never written).
  float qf[HT][kE];
  {
    const float qscale = p.sm_scale * kLog2e;
    const T* q = static_cast<const T*>(p.q);
#pragma unroll
    for (int t = 0; t < HT; ++t) {
      if (t < n_heads) {
        const T* qrow = q + b * p.q_stride_b + (hq0 + t) * p.q_stride_h;
#pragma unroll
        for (int cc = 0; cc < Cfg::kChunks; ++cc) {
          const uint4 raw = __ldg(reinterpret_cast<const uint4*>(qrow + vec_elem(cc)));
          Tr::unpack16(raw, &qf[t][cc * Cfg::kVec]);
        }
#pragma unroll
        for (int e = 0; e < kE; ++e) qf[t][e] *= qscale;
      } else {
#pragma unroll
        for (int e = 0; e < kE; ++e) qf[t][e] = 0.f;
      }
    }
  }

  const T* k_head = static_cast<const T*>(p.k) + b * p.k_stride_b + j * p.k_stride_h;
  const T* v_head = static_cast<const T*>(p.v) + b * p.v_stride_b + j * p.v_stride_h;
  const float* w_head = p.log_w != nullptr ? p.log_w + b * p.log_w_stride_b + j * p.log_w_stride_h : nullptr;

  auto stage_k = [](int st) { return reinterpret_cast<T*>(smem + st * Cfg::kStageBytes); };
  auto stage_v = [](int st) { return reinterpret_cast<T*>(smem + st * Cfg::kStageBytes) + Cfg::kTileElems; };
  auto stage_w = [](int st) {
    return reinterpret_cast<float*>(reinterpret_cast<T*>(smem + st * Cfg::kStageBytes) + 2 * Cfg::kTileElems);
  };

  // Issues the copies of tile `tile` into stage `st`: this thread's vectors of
  // its rows (row = i * kGroups + group), zeros for rows at or past hi. (Not
  // fully unrolled: with 16 rows per group that cost registers, see kMinBlocks.)
  auto load_tile = [&](int64_t tile, int st) {
    const int64_t t0 = lo + tile * BLOCK_N;
    T* ks = stage_k(st);
    T* vs = stage_v(st);
#pragma unroll 4
    for (int i = 0; i < Cfg::kRowsPerGroup; ++i) {
      const int row = i * Cfg::kGroups + group;
      const int64_t slot = t0 + row;
#pragma unroll
      for (int cc = 0; cc < Cfg::kChunks; ++cc) {
        const int e = vec_elem(cc);
        T* kd = ks + row * HEAD_DIM + e;
        T* vd = vs + row * HEAD_DIM + e;
        if (slot < hi) {
          cp_async_16(kd, k_head + slot * p.k_stride_c + e);
          cp_async_16(vd, v_head + slot * p.v_stride_c + e);
        } else {
          *reinterpret_cast<uint4*>(kd) = make_uint4(0u, 0u, 0u, 0u);
          *reinterpret_cast<uint4*>(vd) = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    if (w_head != nullptr) {
      float* ws = stage_w(st);
      for (int row = tid; row < BLOCK_N; row += Cfg::kThreads) {
        const int64_t slot = t0 + row;
        if (slot < hi) {
          cp_async_4(ws + row, w_head + slot);
        } else {
          ws[row] = 0.f;
        }
      }
    }
  };

  float m[HT], l[HT], acc[HT][kE];
  split_attn::init_states(m, l, acc);

  // Consumes tile `tile` from stage `st`: per row, the HT logits (dot product
  // over the row's lanes), one online-softmax step per head, then p * v.
  auto compute_tile = [&](int64_t tile, int st) {
    const int64_t t0 = lo + tile * BLOCK_N;
    const T* ks = stage_k(st);
    const T* vs = stage_v(st);
    const float* ws = stage_w(st);
#pragma unroll
    for (int i = 0; i < Cfg::kRowsPerGroup; ++i) {
      const int row = i * Cfg::kGroups + group;
      const bool valid = t0 + row < hi;  // the same for the row's lanes
      float kf[kE], vf[kE];
#pragma unroll
      for (int cc = 0; cc < Cfg::kChunks; ++cc) {
        const int e = vec_elem(cc);
        Tr::unpack16(*reinterpret_cast<const uint4*>(ks + row * HEAD_DIM + e), &kf[cc * Cfg::kVec]);
        Tr::unpack16(*reinterpret_cast<const uint4*>(vs + row * HEAD_DIM + e), &vf[cc * Cfg::kVec]);
      }
      float dot[HT];
      split_attn::row_logits<kRT>(qf, kf, dot);  // all lanes take part (no divergence before the shuffles)
      const float bias = (w_head != nullptr && valid) ? ws[row] * kLog2e : 0.f;
#pragma unroll
      for (int t = 0; t < HT; ++t) split_attn::online_update(valid ? dot[t] + bias : kNegInf, m[t], l[t], acc[t], vf);
    }
  };

  // The pipeline. Group g holds tile g (possibly empty: every iteration commits
  // one group, so the wait count is fixed). At iteration t, (stages-1)+t groups
  // are committed; waiting for all but stages-2 completes tile t. The barrier
  // makes every thread's copies of tile t (log_w rows are shared) visible and
  // ensures tile t-1 is consumed before its stage is refilled with tile
  // t+stages-1. num_tiles is uniform over the block, so are the barriers.
  const int stages = p.num_stages;
  for (int st = 0; st < stages - 1; ++st) {
    if (st < num_tiles) load_tile(st, st);
    cp_async_commit();
  }
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait_dynamic(stages - 2);
    __syncthreads();
    const int64_t next = tile + stages - 1;
    if (next < num_tiles) load_tile(next, static_cast<int>(next % stages));
    cp_async_commit();
    compute_tile(tile, static_cast<int>(tile % stages));
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers are reused below

  // The row groups of a warp, then the warps through shared memory
  // ([NUM_WARPS][HT][D] accumulators, [NUM_WARPS][HT] maxima and sums).
  split_attn::merge_row_groups<kRT>(m, l, acc);
  const split_attn::SplitOut<T> dst{static_cast<T*>(p.out), p.lse, p.partial_out, p.partial_lse,
                                    b * p.num_q_heads + hq0, s, S};
  split_attn::merge_warps_and_store<T, HEAD_DIM, HT, kE, NUM_WARPS, kRT>(
      reinterpret_cast<float*>(smem), m, l, acc,
      [&](int e) { return vec_elem(e / Cfg::kVec) + e % Cfg::kVec; }, n_heads, bad_len, 1.f, dst);
}

// ---------------------------------------------------------------------------
// Merge states: one row of D / 4 threads, 4 elements (one float4) each.
// ---------------------------------------------------------------------------
constexpr int kMergeThreads = 128;

__device__ __forceinline__ void store4(float* dst, float4 v) { *reinterpret_cast<float4*>(dst) = v; }
template <typename T>  // fp16 / bf16: four values as one 8-byte store
__device__ __forceinline__ void store4(T* dst, float4 v) {
  *reinterpret_cast<uint2*>(dst) = make_uint2(DtypeTraits<T>::pack2(v.x, v.y), DtypeTraits<T>::pack2(v.z, v.w));
}

template <typename OutT, int HEAD_DIM>
__global__ void __launch_bounds__(kMergeThreads)
    merge_attention_states_kernel(const float* __restrict__ partial_out,
                                  const float* __restrict__ partial_lse, OutT* __restrict__ out,
                                  float* __restrict__ lse, int64_t rows, int num_splits) {
  constexpr int kRowThreads = HEAD_DIM / 4;
  constexpr int kRowsPerBlock = kMergeThreads / kRowThreads;
  static_assert(HEAD_DIM % 4 == 0 && kRowThreads <= kMergeThreads && kMergeThreads % kRowThreads == 0,
                "HEAD_DIM / 4 threads per row, whole rows per block");
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads;
  const int c4 = static_cast<int>(threadIdx.x) % kRowThreads;
  if (row >= rows) return;  // no barriers or shuffles below
  const int S = num_splits;
  const float* ls = partial_lse + row * S;

  float mx = kNegInf;
  bool has_nan = false;
  for (int s = 0; s < S; ++s) {
    const float x = ls[s];
    has_nan |= isnan(x);
    mx = fmaxf(mx, x);
  }
  float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
  float total = 0.f;
  if (!has_nan && mx != kNegInf) {
    const float4* po = reinterpret_cast<const float4*>(partial_out + row * S * HEAD_DIM) + c4;
#pragma unroll 4
    for (int s = 0; s < S; ++s) {
      const float w = expf(ls[s] - mx);  // 0 for an empty split (lse -inf)
      const float4 x = __ldg(po + static_cast<int64_t>(s) * kRowThreads);
      total += w;
      a.x = fmaf(w, x.x, a.x);
      a.y = fmaf(w, x.y, a.y);
      a.z = fmaf(w, x.z, a.z);
      a.w = fmaf(w, x.w, a.w);
    }
  }
  const float nan = CUDART_NAN_F;
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const float4 o = has_nan ? make_float4(nan, nan, nan, nan)
                           : make_float4(a.x * inv, a.y * inv, a.z * inv, a.w * inv);
  store4(out + row * HEAD_DIM + c4 * 4, o);
  if (lse != nullptr && c4 == 0) lse[row] = has_nan ? nan : (total > 0.f ? mx + logf(total) : kNegInf);
}

}  // namespace decode_attention_detail

// Launches the merge kernel (see launch_merge_attention_states in
// decode_attention_launch.h for the layout).
template <typename OutT, int HEAD_DIM>
cudaError_t launch_merge_attention_states_typed(const float* partial_out, const float* partial_lse,
                                                OutT* out, float* lse, int64_t rows, int num_splits,
                                                cudaStream_t stream) {
  using namespace decode_attention_detail;
  if (rows < 0 || num_splits < 1 || partial_out == nullptr || partial_lse == nullptr || out == nullptr)
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;  // never launch an empty grid
  constexpr int kRowsPerBlock = kMergeThreads / (HEAD_DIM / 4);
  const int64_t blocks = ceil_div<int64_t>(rows, kRowsPerBlock);
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  merge_attention_states_kernel<OutT, HEAD_DIM><<<static_cast<unsigned>(blocks), kMergeThreads, 0, stream>>>(
      partial_out, partial_lse, out, lse, rows, num_splits);
  return cudaGetLastError();
}

// Dynamic shared memory of the split-kernel variant for p, and the opt-in
// attribute a launch (or an occupancy query) needs above 48 KiB.
template <typename T, int HEAD_DIM, int HEADS_TILE, int BLOCK_N, int NUM_WARPS>
cudaError_t prepare_split_kernel(const DecodeAttentionParams& p, size_t* smem) {
  *smem = decode_attention_smem_bytes(HEAD_DIM, KvDtypeOf<T>::value, p.group_size(), BLOCK_N, NUM_WARPS,
                                      p.num_stages);
  if (*smem <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(decode_attention_detail::decode_attention_split_kernel<T, HEAD_DIM, HEADS_TILE,
                                                                                     BLOCK_N, NUM_WARPS>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(*smem));
}

// Launches one split-kernel variant for p (and the merge when
// p.num_splits > 1). The configuration checks mirror the torch glue's, so a
// direct C++ caller gets cudaErrorInvalidValue rather than a bad launch.
template <typename T, int HEAD_DIM, int HEADS_TILE, int BLOCK_N, int NUM_WARPS>
cudaError_t launch_decode_attention_split(const DecodeAttentionParams& p, cudaStream_t stream) {
  using namespace decode_attention_detail;
  using Cfg = SplitConfig<T, HEAD_DIM, HEADS_TILE, BLOCK_N, NUM_WARPS>;
  if (p.head_dim != HEAD_DIM || p.block_n != BLOCK_N || p.num_warps != NUM_WARPS ||
      p.num_kv_heads < 1 || p.num_q_heads % p.num_kv_heads != 0 ||
      decode_attention_heads_tile(p.group_size()) != HEADS_TILE || p.num_splits < 1 ||
      p.num_stages < kDecodeAttentionMinStages || p.num_stages > kDecodeAttentionMaxStages ||
      (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)))
    return cudaErrorInvalidValue;
  const int64_t blocks = decode_attention_num_blocks(p);
  if (blocks == 0) return cudaSuccess;  // never launch an empty grid
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  size_t smem = 0;
  KVKERN_CUDA_TRY((prepare_split_kernel<T, HEAD_DIM, HEADS_TILE, BLOCK_N, NUM_WARPS>(p, &smem)));
  auto kernel = decode_attention_split_kernel<T, HEAD_DIM, HEADS_TILE, BLOCK_N, NUM_WARPS>;
  kernel<<<static_cast<unsigned>(blocks), Cfg::kThreads, smem, stream>>>(p);
  KVKERN_CUDA_TRY(cudaGetLastError());
  if (p.num_splits > 1)
    return launch_merge_attention_states_typed<T, HEAD_DIM>(p.partial_out, p.partial_lse, static_cast<T*>(p.out),
                                                           p.lse, p.batch * p.num_q_heads, p.num_splits,
                                                           stream);
  return cudaSuccess;
}

// Resident blocks per SM of that variant (occupancy calculator only).
template <typename T, int HEAD_DIM, int HEADS_TILE, int BLOCK_N, int NUM_WARPS>
cudaError_t decode_attention_split_blocks_per_sm(const DecodeAttentionParams& p, int* blocks_per_sm) {
  using namespace decode_attention_detail;
  using Cfg = SplitConfig<T, HEAD_DIM, HEADS_TILE, BLOCK_N, NUM_WARPS>;
  if (p.num_stages < kDecodeAttentionMinStages || p.num_stages > kDecodeAttentionMaxStages)
    return cudaErrorInvalidValue;
  size_t smem = 0;
  KVKERN_CUDA_TRY((prepare_split_kernel<T, HEAD_DIM, HEADS_TILE, BLOCK_N, NUM_WARPS>(p, &smem)));
  auto kernel = decode_attention_split_kernel<T, HEAD_DIM, HEADS_TILE, BLOCK_N, NUM_WARPS>;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, kernel, Cfg::kThreads, smem);
}

}  // namespace kvkern
