// SPDX-License-Identifier: Apache-2.0
// Device pieces shared by the split-K decode-attention kernels that give each
// "row group" of lanes its own online softmax (decode_attention.cuh over the
// fp16 / bf16 / fp32 cache, fp8_kv.cuh over e4m3 codes). They differ only in
// how a K / V row reaches registers; the block-to-work mapping, the split
// bounds, the softmax update and the final merge must stay identical (the CPU
// kernel and the Triton twins follow the same rules), so they live here once.
//
// All logits are base 2 (q pre-scaled by log2(e)); the state of one row group
// for one query head is m = max logit so far (-inf before any finite one),
// l = sum exp2(s - m) and acc = sum exp2(s - m) * v over this thread's N
// elements. Torch-free, like every kernel header.
#pragma once

#include <math_constants.h>

#include <cstdint>

#include "common.cuh"

namespace kvkern {
namespace split_attn {

constexpr float kNegInf = -__builtin_huge_valf();  // -inf, usable in constexpr

// The work of this block (blockIdx.x) of a grid of B * Hkv * S * chunks blocks.
struct SplitWork {
  int64_t b, j, s, c;  // batch, kv head, split, chunk of heads_tile query heads
  int64_t lo, hi;      // the split's slots
  bool bad_len;        // length outside [0, C]: no slots, NaN written
};

// The head chunk is fastest, so blocks reading the same K / V rows are
// adjacent and the second read of a large GQA group hits L2. Split s of S
// covers [lo, hi): chunk = ceil(len / S) rounded up to a multiple of `tile`
// (the CPU kernel's split_range), so splits follow the head's own length.
// Params: DecodeAttentionParams or Fp8KVParams (the same field names).
template <class Params>
__device__ __forceinline__ SplitWork split_work(const Params& p, int heads_tile, int64_t tile) {
  const int64_t chunks = ceil_div<int64_t>(p.num_q_heads / p.num_kv_heads, heads_tile);
  const int64_t S = p.num_splits;
  int64_t id = blockIdx.x;
  SplitWork w;
  w.c = id % chunks;
  id /= chunks;
  w.s = id % S;
  id /= S;
  w.j = id % p.num_kv_heads;
  w.b = id / p.num_kv_heads;
  const int64_t len = p.lengths[w.b * p.lengths_stride_b + w.j * p.lengths_stride_h];
  w.bad_len = len < 0 || len > p.capacity;
  w.lo = w.hi = 0;
  if (!w.bad_len) {
    int64_t chunk = ceil_div<int64_t>(len, S);
    chunk = ceil_div<int64_t>(chunk, tile) * tile;
    w.lo = w.s * chunk < len ? w.s * chunk : len;
    w.hi = (w.s + 1) * chunk < len ? (w.s + 1) * chunk : len;
  }
  return w;
}

template <int HT, int N>
__device__ __forceinline__ void init_states(float (&m)[HT], float (&l)[HT], float (&acc)[HT][N]) {
#pragma unroll
  for (int t = 0; t < HT; ++t) {
    m[t] = kNegInf;
    l[t] = 0.f;
#pragma unroll
    for (int e = 0; e < N; ++e) acc[t][e] = 0.f;
  }
}

// The logits of one row for the HT query heads: each lane's partial dot over
// its N elements, then the sum over the ROW_THREADS lanes holding the row. All
// dots come first so that every lane reaches the shuffles (full mask).
template <int ROW_THREADS, int HT, int N>
__device__ __forceinline__ void row_logits(const float (&q)[HT][N], const float (&k)[N], float (&dot)[HT]) {
#pragma unroll
  for (int t = 0; t < HT; ++t) {
    float d = 0.f;
#pragma unroll
    for (int e = 0; e < N; ++e) d = fmaf(q[t][e], k[e], d);
    dot[t] = d;
  }
#pragma unroll
  for (int t = 0; t < HT; ++t) dot[t] = group_sum<ROW_THREADS>(dot[t]);
}

// One row (logit sc, this thread's value elements v) into one head's state.
template <int N>
__device__ __forceinline__ void online_update(float sc, float& m, float& l, float (&acc)[N], const float (&v)[N]) {
  if (sc > m) {  // new running max: rescale (rare once the max settles)
    const float alpha = exp2f(m - sc);  // 0 when m was -inf
    l *= alpha;
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] *= alpha;
    m = sc;
  }
  // sc == -inf (masked row or a -inf bias): weight 0, also when m is -inf.
  const float pr = sc == kNegInf ? 0.f : exp2f(sc - m);
  l += pr;
#pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = fmaf(pr, v[e], acc[e]);
}

// Merges state (mb, lb, accb) into (m, l, acc). A -inf max contributes
// nothing (also when both are -inf: then everything stays 0).
template <int N>
__device__ __forceinline__ void merge_state(float& m, float& l, float (&acc)[N], float mb, float lb,
                                            const float (&accb)[N]) {
  const float mn = fmaxf(m, mb);
  const float fa = m == kNegInf ? 0.f : exp2f(m - mn);
  const float fb = mb == kNegInf ? 0.f : exp2f(mb - mn);
  l = l * fa + lb * fb;
#pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = acc[e] * fa + accb[e] * fb;
  m = mn;
}

// Merges the row groups of a warp: lanes lane and lane ^ off (off >= ROW_THREADS)
// hold the same elements of different rows. Every lane must call it.
template <int ROW_THREADS, int HT, int N>
__device__ __forceinline__ void merge_row_groups(float (&m)[HT], float (&l)[HT], float (&acc)[HT][N]) {
#pragma unroll
  for (int off = ROW_THREADS; off < 32; off *= 2) {
#pragma unroll
    for (int t = 0; t < HT; ++t) {
      const float mb = __shfl_xor_sync(0xffffffffu, m[t], off);
      const float lb = __shfl_xor_sync(0xffffffffu, l[t], off);
      float accb[N];
#pragma unroll
      for (int e = 0; e < N; ++e) accb[e] = __shfl_xor_sync(0xffffffffu, acc[t][e], off);
      merge_state(m[t], l[t], acc[t], mb, lb, accb);
    }
  }
}

// Where a split's result goes: out / lse directly (one split) or the fp32
// partials [rows, S, D] / [rows, S] that a merge kernel combines.
template <typename T>
struct SplitOut {
  T* out;
  float* lse;
  float* partial_out;
  float* partial_lse;
  int64_t row0;  // (b, first query head of the block) as a row of [B, Hq]
  int64_t s, S;
};

// After merge_row_groups: the warps' states meet in shared memory
// (sm: [NUM_WARPS][HT][HEAD_DIM] accumulators, then [NUM_WARPS][HT] maxima and
// sums; the caller's buffer, free to overwrite), then each (head, element) is
// normalized and written. elem(e) is the row element held in acc[.][e] by lane
// r < ROW_THREADS of the row. out_scale multiplies the merged output (the fp8
// cache's v_scale; 1 otherwise). Heads t >= n_heads are not written; a bad
// length writes NaN. Every thread of the block must call it.
template <typename T, int HEAD_DIM, int HT, int N, int NUM_WARPS, int ROW_THREADS, typename Elem>
__device__ __forceinline__ void merge_warps_and_store(float* sm, const float (&m)[HT], const float (&l)[HT],
                                                      const float (&acc)[HT][N], Elem elem, int n_heads,
                                                      bool bad_len, float out_scale, const SplitOut<T>& o) {
  float* sm_acc = sm;
  float* sm_m = sm_acc + NUM_WARPS * HT * HEAD_DIM;
  float* sm_l = sm_m + NUM_WARPS * HT;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  if (lane < ROW_THREADS) {
#pragma unroll
    for (int t = 0; t < HT; ++t) {
#pragma unroll
      for (int e = 0; e < N; ++e) sm_acc[(warp * HT + t) * HEAD_DIM + elem(e)] = acc[t][e];
      if (lane == 0) {
        sm_m[warp * HT + t] = m[t];
        sm_l[warp * HT + t] = l[t];
      }
    }
  }
  __syncthreads();

  const float nan = CUDART_NAN_F;
  for (int idx = tid; idx < HT * HEAD_DIM; idx += NUM_WARPS * 32) {
    const int t = idx / HEAD_DIM, d = idx % HEAD_DIM;
    if (t >= n_heads) continue;
    float mx = kNegInf;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) mx = fmaxf(mx, sm_m[w * HT + t]);
    float sum = 0.f, a = 0.f;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) {
      const float mw = sm_m[w * HT + t];
      const float f = mw == kNegInf ? 0.f : exp2f(mw - mx);
      sum += sm_l[w * HT + t] * f;
      a += sm_acc[(w * HT + t) * HEAD_DIM + d] * f;
    }
    // As in the CPU kernel: an empty head (sum == 0) gives 0 and -inf; a NaN
    // sum propagates.
    const float out = bad_len ? nan : (sum == 0.f ? 0.f : a * out_scale / sum);
    const float lse = bad_len ? nan : (sum == 0.f ? kNegInf : mx * kLn2 + logf(sum));
    const int64_t row = o.row0 + t;
    if (o.S == 1) {
      o.out[row * HEAD_DIM + d] = DtypeTraits<T>::from_float(out);
      if (d == 0) o.lse[row] = lse;
    } else {
      o.partial_out[(row * o.S + o.s) * HEAD_DIM + d] = out;
      if (d == 0) o.partial_lse[row * o.S + o.s] = lse;
    }
  }
}

}  // namespace split_attn
}  // namespace kvkern
