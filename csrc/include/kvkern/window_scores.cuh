// SPDX-License-Identifier: Apache-2.0
// CUDA window scores (reference.window_scores): the attention the last W
// queries of each head pay to every cached slot, reduced over the window and
// the GQA group, then normalized and pooled per head. Torch-free: only the
// CUDA runtime, cuda_fp16 / cuda_bf16 and kvkern headers. EVICTION_CUDA.md
// has the design and the numbers; this file also holds the device helpers
// select_compact.cuh shares (block scans, score keys, the finalize math).
//
// For head (b, j) with L = lengths[b, j], window row t (0 <= t < W) of query
// head h sees slots i < L - W + t + 1 (causal inside the window). The W x L
// probabilities are never stored:
//  * pass A, one block per (b, j, row group, slot chunk): the logits of a
//    chunk for all rows of the block (whole query heads), and per row the max
//    and the sum of exp2 over the chunk -> stats (per block, chunk, row);
//  * pass B, the same blocks (launched in reverse, so the tail of pass A is
//    still in L2): every block first merges the chunks' stats of its rows into
//    lse (a warp per row), recomputes the logits tile by tile and reduces
//    exp2(x - lse) over the window rows (in registers and warp shuffles) and
//    over the block's query heads (shared memory) -> part [B, Hkv, groups, C];
//    group_reduce max_per_query (G-KV: the group max of each window query,
//    then the window reduce) lays a block's rows out query-major instead: row
//    x = t * Gp + h (Gp = G rounded up to a power of two, rows h >= G are
//    padding), so a query's Gp rows sit in one strip (Gp <= 16) or in Gp / 16
//    consecutive strips; row groups then split the window, not the group;
//  * finalize, one block per head: the row groups (and, for mean_all, every
//    kv head of the batch) are combined, scaled, normalized by the max over
//    the candidate slots [0, L - W) and pooled there -> out.
// Logits of a 16-row strip x 8-slot tile come from mma.sync m16n8k16 (fp16 /
// bf16 in, fp32 accumulate) on the tensor-core path: the block's query rows
// stay in registers for the whole chunk, K tiles stream through a cp.async
// ring in shared memory and every warp reads each K tile once for all of its
// strips. Other shapes and fp32 take a CUDA-core path with the same epilogues.
#pragma once

#include <math_constants.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "decode_attention_launch.h"
#include "eviction_params.h"

namespace kvkern {
namespace eviction_detail {

constexpr float kInf = __builtin_huge_valf();
constexpr float kNegInf = -__builtin_huge_valf();

// ---------------------------------------------------------------------------
// Small device helpers shared with select_compact.cuh.
// ---------------------------------------------------------------------------

// Order-preserving 32-bit key of an fp32 score for a descending selection:
// a > b (as reals) <=> key(a) > key(b). NaN ranks as -inf and -0 as +0 (the
// reference compares values, so they tie). The smallest key a score can get
// is key(-inf) = 0x007fffff, so 0 is free to mean "not a candidate".
__device__ __forceinline__ uint32_t score_key(float s) {
  if (s != s) s = kNegInf;
  if (s == 0.f) s = 0.f;
  const uint32_t u = __float_as_uint(s);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inclusive prefix sum over the lanes of a warp (every lane must call it).
__device__ __forceinline__ uint32_t warp_inclusive_sum(uint32_t x, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, x, off);
    if (lane >= off) x += y;
  }
  return x;
}

// Block-wide exclusive prefix sum over threadIdx order (NT threads, a multiple
// of 32, <= 1024). scratch: >= 33 words of shared memory. Every thread must
// call it; it synchronizes the block (twice) and leaves scratch reusable.
template <int NT>
__device__ __forceinline__ uint32_t block_exclusive_sum(uint32_t v, uint32_t* scratch, uint32_t* total) {
  static_assert(NT % 32 == 0 && NT <= 1024, "NT: a multiple of 32, at most 1024");
  constexpr int kWarps = NT / 32;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const uint32_t x = warp_inclusive_sum(v, lane);
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const uint32_t w = warp_inclusive_sum(lane < kWarps ? scratch[lane] : 0u, lane);
    if (lane < kWarps) scratch[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const uint32_t before = warp == 0 ? 0u : scratch[warp - 1];
  *total = scratch[kWarps - 1];
  __syncthreads();  // scratch is free again
  return before + x - v;
}

template <int NT>
__device__ __forceinline__ float block_max(float v, float* scratch) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  v = group_max<32>(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < NT / 32; ++w) r = fmaxf(r, scratch[w]);
  __syncthreads();
  return r;
}

template <int NT>
__device__ __forceinline__ uint32_t block_sum_u32(uint32_t v, uint32_t* scratch) {
  uint32_t total;
  block_exclusive_sum<NT>(v, scratch, &total);
  return total;
}

// ---------------------------------------------------------------------------
// Window passes.
// ---------------------------------------------------------------------------
struct WindowPassParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const int32_t* lengths = nullptr;
  int64_t batch = 0, num_q_heads = 0, num_kv_heads = 0, window = 0, capacity = 0, head_dim = 0, group = 0;
  int64_t q_sb = 0, q_sh = 0, q_st = 0, k_sb = 0, k_sh = 0, k_sc = 0, len_sb = 0, len_sh = 0;
  float scale2 = 0.f;  // sm_scale * log2(e): logits in base 2
  int heads_per_cta = 1, strips_per_head = 1, num_row_groups = 1, num_chunks = 1;
  int group_max = 0;        // 1: max over the block's query heads, 0: sum
  // max_per_query: query-major rows (see the top of the file). gp_shift =
  // log2(Gp); a block holds strips_per_cta strips of 16 rows, num_strips in all.
  int per_query = 0, gp_shift = 0, strips_per_cta = 0;
  int64_t num_strips = 0;
  int64_t stats_rows = 0;   // stats rows of a block (per chunk)
  // [B, Hkv, num_row_groups, num_chunks, heads_per_cta * W]: (max, sum of exp2)
  // of each row of a block over each chunk (chunk-major, so pass B's
  // thread-per-row merge reads coalesced).
  float2* stats = nullptr;
  float* part = nullptr;    // [B, Hkv, num_row_groups, C]
  float* cmax = nullptr;    // [B, Hkv, num_row_groups, num_chunks]: max of part over the chunk's slots < L - W
  int32_t* len_snap = nullptr;  // [B, Hkv]: lengths as pass A saw them (score_evict rewrites lengths)
  // Fused score_evict: heads with L <= budget need no scores (never with mean_all).
  bool skip_small = false;
  const int32_t* budgets = nullptr;
  int64_t budgets_sb = 0, budgets_sh = 0, budget = 0;
};

// The head (b, j, row group, chunk) a block of pass A / B works on.
struct PassBlock {
  int64_t b, j, rg, chunk;
};

__device__ __forceinline__ PassBlock decode_pass_block(const WindowPassParams& p, bool reverse) {
  const int64_t total = p.batch * p.num_kv_heads * p.num_row_groups * p.num_chunks;
  int64_t idx = static_cast<int64_t>(blockIdx.x);
  if (reverse) idx = total - 1 - idx;
  PassBlock r;
  r.chunk = idx % p.num_chunks;
  idx /= p.num_chunks;
  r.rg = idx % p.num_row_groups;
  idx /= p.num_row_groups;
  r.j = idx % p.num_kv_heads;
  r.b = idx / p.num_kv_heads;
  return r;
}

// mma_16816<T> (the m16n8k16 tensor-core step) is in common.cuh.

// Where a block's strips (16 query rows of one head: rows t = 16 * sh .. +15,
// rows >= W are padding) come from: strip s -> head s / SH, rows 16 * (s % SH).
struct StripInfo {
  int nstrips;  // strips of this block (whole heads; max_per_query: whole queries)
  int64_t h0;   // first query head of the block (within the group)
  int64_t row0;  // max_per_query: the block's first query-major row
};

// Window query of row rho (0..15) of strip s.
__device__ __forceinline__ int64_t strip_row_t(const WindowPassParams& p, const StripInfo& si, int s, int rho) {
  if (p.per_query) return (si.row0 + 16 * s + rho) >> p.gp_shift;
  return 16 * (s % p.strips_per_head) + rho;
}

// Block-local stats row of row rho of strip s, or -1 for a padding row.
__device__ __forceinline__ int64_t strip_stats_row(const WindowPassParams& p, const StripInfo& si, int s, int rho) {
  if (s >= si.nstrips) return -1;
  const int64_t t = strip_row_t(p, si, s, rho);
  if (t >= p.window) return -1;
  if (p.per_query) return ((si.row0 + 16 * s + rho) & ((int64_t{1} << p.gp_shift) - 1)) < p.group ? 16 * s + rho : -1;
  return (s / p.strips_per_head) * p.window + t;
}

// The q row of strip s that lane group g holds as fragment row g (half 0) or
// g + 8 (half 1); nullptr past the block's strips or the window (padding).
template <typename T>
__device__ __forceinline__ const T* strip_q_row(const WindowPassParams& p, const PassBlock& pb, const StripInfo& si,
                                                int s, int g, int half) {
  const int rho = g + 8 * half;
  if (strip_stats_row(p, si, s, rho) < 0) return nullptr;
  const int64_t t = strip_row_t(p, si, s, rho);
  const int64_t h = p.per_query ? ((si.row0 + 16 * s + rho) & ((int64_t{1} << p.gp_shift) - 1))
                                : si.h0 + s / p.strips_per_head;
  return static_cast<const T*>(p.q) + pb.b * p.q_sb + (pb.j * p.group + h) * p.q_sh + t * p.q_st;
}

// Slot 0 of the block's K head.
template <typename T>
__device__ __forceinline__ const T* head_k(const WindowPassParams& p, const PassBlock& pb) {
  return static_cast<const T*>(p.k) + pb.b * p.k_sb + pb.j * p.k_sh;
}

// Tensor-core tile policy: fp16 / bf16, D in {64, 128, 256}, q / k 16-byte
// aligned. A thread keeps, per strip and 32-element block of D, the 16-byte
// vectors of q rows g and g+8 at elements 32 * blk + 8 * q .. +7; K tiles hold
// row n's 16-byte chunk c at chunk c ^ (4 * (n & 1)) (no bank conflicts for
// the reads below). The dot product runs over a permutation of D shared by
// both operands: mma k-step 2 * blk + s takes words 2s, 2s + 1 of those
// vectors, i.e. logical k {2q, 2q+1, 2q+8, 2q+9} = physical
// 32 * blk + 8q + {4s, 4s+1, 4s+2, 4s+3}, so every operand is one 16-byte load.
template <typename T, int D, int NW>
struct TcPolicy {
  static_assert(D == 64 || D == 128 || D == 256, "D: 64, 128 or 256");
  static constexpr int kWarps = NW;
  static constexpr int kThreads = NW * 32;
  static constexpr int kStripsPerWarp = 256 / D;  // q fragments: 64 registers per thread
  static constexpr int kBlockN = 64;
  static constexpr int kStages = D >= 256 ? 2 : 3;  // <= 99 KB of shared memory on every sm_80+
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int kBlocks32 = D / 32;
  static constexpr size_t stage_bytes(int64_t /*head_dim*/) {
    return static_cast<size_t>(kBlockN) * D * sizeof(T);
  }

  uint4 qf[kStripsPerWarp][kBlocks32][2];
  const T* kbase;
  int64_t k_sc;

  __device__ __forceinline__ void load_q(const WindowPassParams& p, const PassBlock& pb, const StripInfo& si) {
    const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
    const int g = lane >> 2, qd = lane & 3;
#pragma unroll
    for (int sl = 0; sl < kStripsPerWarp; ++sl) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const T* row = strip_q_row<T>(p, pb, si, warp * kStripsPerWarp + sl, g, half);
#pragma unroll
        for (int blk = 0; blk < kBlocks32; ++blk)
          qf[sl][blk][half] = row != nullptr ? __ldg(reinterpret_cast<const uint4*>(row + 32 * blk + 8 * qd))
                                             : make_uint4(0, 0, 0, 0);
      }
    }
    kbase = head_k<T>(p, pb);
    k_sc = p.k_sc;
  }

  // Starts copying slots [i0, i0 + kBlockN) of K into a stage; slots >= c1 are
  // zero-filled, never read.
  __device__ __forceinline__ void issue(unsigned char* stage, int64_t i0, int64_t c1) const {
    for (int e = static_cast<int>(threadIdx.x); e < kBlockN * kChunksPerRow; e += kThreads) {
      const int n = e / kChunksPerRow, c = e % kChunksPerRow;
      void* dst = stage + (static_cast<size_t>(n) * kChunksPerRow + (c ^ ((n & 1) << 2))) * 16;
      if (i0 + n < c1) cp_async_16(dst, kbase + (i0 + n) * k_sc + 8 * c);
      else *static_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
  }

  // acc[sl] = logits (unscaled) of strip sl x slots 8 nt .. 8 nt + 7 of the
  // tile (C fragment layout). Each K vector feeds every strip of the warp.
  __device__ __forceinline__ void compute(const unsigned char* stage, int nt, int nactive,
                                          float (&acc)[kStripsPerWarp][4]) const {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int g = lane >> 2, qd = lane & 3;
#pragma unroll
    for (int sl = 0; sl < kStripsPerWarp; ++sl)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[sl][e] = 0.f;
    const int n = nt * 8 + g;
#pragma unroll
    for (int blk = 0; blk < kBlocks32; ++blk) {
      const uint4 kb = *reinterpret_cast<const uint4*>(
          stage + (static_cast<size_t>(n) * kChunksPerRow + ((4 * blk + qd) ^ ((n & 1) << 2))) * 16);
#pragma unroll
      for (int sl = 0; sl < kStripsPerWarp; ++sl) {
        if (sl < nactive) {
          const uint4& lo = qf[sl][blk][0];
          const uint4& hi = qf[sl][blk][1];
          mma_16816<T>(acc[sl], lo.x, hi.x, lo.y, hi.y, kb.x, kb.y);
          mma_16816<T>(acc[sl], lo.z, hi.z, lo.w, hi.w, kb.z, kb.w);
        }
      }
    }
  }
};

// CUDA-core tile policy: any dtype and head dim (<= 512), any alignment. K
// tiles are converted to fp32 in shared memory (rows padded to D + 1 words);
// q rows are read from global memory (L1) once per tile. Used for fp32 and
// for views the tensor-core path cannot take; not tuned for speed.
template <typename T, int NW>
struct SimtPolicy {
  static constexpr int kWarps = NW;
  static constexpr int kThreads = NW * 32;
  static constexpr int kStripsPerWarp = 2;
  static constexpr int kBlockN = 32;
  static constexpr int kStages = 1;
  static constexpr size_t stage_bytes(int64_t head_dim) {
    return static_cast<size_t>(kBlockN) * static_cast<size_t>(head_dim + 1) * sizeof(float);
  }

  const T* qrow[kStripsPerWarp][2];
  const T* kbase;
  int64_t k_sc, D;

  __device__ __forceinline__ void load_q(const WindowPassParams& p, const PassBlock& pb, const StripInfo& si) {
    const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
    const int g = lane >> 2;
#pragma unroll
    for (int sl = 0; sl < kStripsPerWarp; ++sl)
#pragma unroll
      for (int half = 0; half < 2; ++half) qrow[sl][half] = strip_q_row<T>(p, pb, si, warp * kStripsPerWarp + sl, g, half);
    kbase = head_k<T>(p, pb);
    k_sc = p.k_sc;
    D = p.head_dim;
  }

  // Synchronous: the caller's barrier publishes the tile.
  __device__ __forceinline__ void issue(unsigned char* stage, int64_t i0, int64_t c1) const {
    float* ks = reinterpret_cast<float*>(stage);
    const int64_t n_elems = static_cast<int64_t>(kBlockN) * D;
    for (int64_t e = threadIdx.x; e < n_elems; e += kThreads) {
      const int64_t n = e / D, d = e % D;
      ks[n * (D + 1) + d] = i0 + n < c1 ? DtypeTraits<T>::to_float(kbase[(i0 + n) * k_sc + d]) : 0.f;
    }
  }

  // Same contract as TcPolicy::compute.
  __device__ __forceinline__ void compute(const unsigned char* stage, int nt, int nactive,
                                          float (&acc)[kStripsPerWarp][4]) const {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int qd = lane & 3;
    const float* k0 = reinterpret_cast<const float*>(stage) + (nt * 8 + 2 * qd) * (D + 1);
    const float* k1 = k0 + (D + 1);
#pragma unroll
    for (int sl = 0; sl < kStripsPerWarp; ++sl) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[sl][e] = 0.f;
      if (sl >= nactive) continue;
      const T* ra = qrow[sl][0];
      const T* rb = qrow[sl][1];
      for (int64_t d = 0; d < D; ++d) {
        const float qa = ra ? DtypeTraits<T>::to_float(ra[d]) : 0.f;
        const float qb = rb ? DtypeTraits<T>::to_float(rb[d]) : 0.f;
        acc[sl][0] = fmaf(qa, k0[d], acc[sl][0]);
        acc[sl][1] = fmaf(qa, k1[d], acc[sl][1]);
        acc[sl][2] = fmaf(qb, k0[d], acc[sl][2]);
        acc[sl][3] = fmaf(qb, k1[d], acc[sl][3]);
      }
    }
  }
};

// Shared memory of a pass block: the K stages, then (pass B) the per-strip
// column sums of one tile and the lse of every row of the block.
template <class Pol>
constexpr size_t window_pass_smem_bytes(int64_t head_dim) {
  return Pol::kStages * Pol::stage_bytes(head_dim) +
         static_cast<size_t>(Pol::kWarps) * Pol::kStripsPerWarp * Pol::kBlockN * sizeof(float) +
         static_cast<size_t>(Pol::kWarps) * Pol::kStripsPerWarp * 16 * sizeof(float);
}

__device__ __forceinline__ int64_t head_length(const int32_t* lengths, int64_t sb, int64_t sh, int64_t b, int64_t j,
                                               int64_t capacity, bool* ok) {
  const int32_t len = lengths[b * sb + j * sh];
  *ok = len >= 0 && len <= capacity;
  return *ok ? len : 0;
}

// The body of pass A (PASS_B false) and pass B.
template <class Pol, bool PASS_B>
__device__ __forceinline__ void window_pass(const WindowPassParams& p) {
  constexpr int NW = Pol::kWarps, SPW = Pol::kStripsPerWarp, BN = Pol::kBlockN, NT8 = BN / 8;
  constexpr int NTH = Pol::kThreads;
  constexpr int S = Pol::kStages;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5, g = lane >> 2, qd = lane & 3;
  const PassBlock pb = decode_pass_block(p, PASS_B);
  bool len_ok;
  const int64_t L = head_length(p.lengths, p.len_sb, p.len_sh, pb.b, pb.j, p.capacity, &len_ok);
  if (!PASS_B && pb.rg == 0 && pb.chunk == 0 && tid == 0)
    p.len_snap[pb.b * p.num_kv_heads + pb.j] = p.lengths[pb.b * p.len_sb + pb.j * p.len_sh];
  const int64_t W = p.window;
  bool skip = false;
  if (p.skip_small) {
    const int64_t K = p.budgets ? p.budgets[pb.b * p.budgets_sb + pb.j * p.budgets_sh] : p.budget;
    skip = L <= K;
  }
  int64_t cs = (L + p.num_chunks - 1) / p.num_chunks;
  cs = (cs + BN - 1) / BN * BN;
  const int64_t c0 = pb.chunk * cs;
  const int64_t c1 = c0 + cs < L ? c0 + cs : L;
  StripInfo si;
  int64_t nheads, block_rows;  // block_rows: the stats rows this block writes
  if (p.per_query) {
    si.h0 = 0;
    si.row0 = static_cast<int64_t>(pb.rg) * p.strips_per_cta * 16;
    const int64_t left = p.num_strips - static_cast<int64_t>(pb.rg) * p.strips_per_cta;
    si.nstrips = static_cast<int>(left < p.strips_per_cta ? left : p.strips_per_cta);
    nheads = 0;
    block_rows = 16 * static_cast<int64_t>(si.nstrips);
  } else {
    si.h0 = pb.rg * p.heads_per_cta;
    si.row0 = 0;
    nheads = p.group - si.h0 < p.heads_per_cta ? p.group - si.h0 : p.heads_per_cta;
    si.nstrips = static_cast<int>(nheads * p.strips_per_head);
    block_rows = nheads * W;
  }
  // This block's (max, sum) of each stats row (strip_stats_row), for chunk c.
  const int64_t stats_rows = p.stats_rows;
  float2* stats = p.stats + (((pb.b * p.num_kv_heads + pb.j) * p.num_row_groups + pb.rg) * p.num_chunks) * stats_rows;

  const int64_t cmax_at = ((pb.b * p.num_kv_heads + pb.j) * p.num_row_groups + pb.rg) * p.num_chunks + pb.chunk;
  if (skip || c0 >= c1) {
    if (!PASS_B) {  // the merge in pass B reads every chunk's stats: neutral ones
      for (int64_t r = tid; r < block_rows; r += NTH) stats[pb.chunk * stats_rows + r] = make_float2(kNegInf, 0.f);
    } else if (tid == 0) {
      p.cmax[cmax_at] = 0.f;
    }
    return;
  }

  unsigned char* stages = smem;
  float* colpart = reinterpret_cast<float*>(smem + S * Pol::stage_bytes(p.head_dim));  // [NW * SPW][BN]
  float* lse_s = colpart + NW * SPW * BN;                                               // [NW * SPW * 16]

  Pol pol;
  pol.load_q(p, pb, si);
  const int ntiles = static_cast<int>((c1 - c0 + BN - 1) / BN);
  if constexpr (S > 1) {
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
      if (s < ntiles) pol.issue(stages + s * Pol::stage_bytes(p.head_dim), c0 + static_cast<int64_t>(s) * BN, c1);
      cp_async_commit();
    }
  }

  int nactive = si.nstrips - warp * SPW;  // strips of this warp that hold rows
  nactive = nactive < 0 ? 0 : nactive > SPW ? SPW : nactive;

  // Per thread and strip: rows g (half 0) and g + 8 (half 1).
  float lse2[SPW][2];
  float run_m[SPW][2], run_l[SPW][2];
#pragma unroll
  for (int sl = 0; sl < SPW; ++sl)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      lse2[sl][h] = kInf;
      run_m[sl][h] = kNegInf;
      run_l[sl][h] = 0.f;
    }

  if constexpr (PASS_B) {
    // lse of every row, a thread per row: the max over the chunks, then the
    // sum (loads unrolled: they are independent L2 hits). Rows without a
    // visible slot and padding rows get +inf, so exp2(x - lse) is 0.
    for (int r = tid; r < si.nstrips * 16; r += NTH) lse_s[r] = kInf;
    __syncthreads();
    for (int64_t r = tid; r < block_rows; r += NTH) {
      // Query-major padding rows keep +inf (pass A left their stats unset).
      if (p.per_query && strip_stats_row(p, si, static_cast<int>(r >> 4), static_cast<int>(r & 15)) < 0)
        continue;
      const float2* st = stats + r;
      float m = kNegInf;
#pragma unroll 8
      for (int c = 0; c < p.num_chunks; ++c) {
        const float2 v = st[c * stats_rows];
        if (v.y > 0.f) m = fmaxf(m, v.x);
      }
      float l = 0.f;
#pragma unroll 8
      for (int c = 0; c < p.num_chunks; ++c) {
        const float2 v = st[c * stats_rows];
        if (v.y > 0.f) l += v.y * exp2f(v.x - m);
      }
      const int64_t at = p.per_query ? r : r / W * 16 * p.strips_per_head + r % W;
      if (l > 0.f) lse_s[at] = m + log2f(l);
    }
    __syncthreads();
#pragma unroll
    for (int sl = 0; sl < SPW; ++sl) {
      const int s = warp * SPW + sl;
      if (sl < nactive) {
        lse2[sl][0] = lse_s[s * 16 + g];
        lse2[sl][1] = lse_s[s * 16 + g + 8];
      }
    }
  }

  float cmax = 0.f;  // pass B: max of this thread's outputs on candidate slots (scores are >= 0)
  for (int it = 0; it < ntiles; ++it) {
    const int64_t i0 = c0 + static_cast<int64_t>(it) * BN;
    const unsigned char* cur;
    if constexpr (S > 1) {
      cp_async_wait<S - 2>();
      __syncthreads();  // tile it landed for everyone; stage (it - 1) % S is free
      const int nxt = it + S - 1;
      if (nxt < ntiles)
        pol.issue(stages + (nxt % S) * Pol::stage_bytes(p.head_dim), c0 + static_cast<int64_t>(nxt) * BN, c1);
      cp_async_commit();
      cur = stages + (it % S) * Pol::stage_bytes(p.head_dim);
    } else {
      __syncthreads();  // the previous tile is consumed
      pol.issue(stages, i0, c1);
      __syncthreads();
      cur = stages;
    }
    // Every row sees every slot of the tile when it ends before both the
    // chunk and the window's first slot L - W.
    const bool full = i0 + BN <= c1 && i0 + BN <= L - W;
#pragma unroll 2
    for (int nt = 0; nt < NT8; ++nt) {
      if (nactive == 0) break;
      float acc[SPW][4];
      pol.compute(cur, nt, nactive, acc);
#pragma unroll
      for (int sl = 0; sl < SPW; ++sl) {
        if (sl >= nactive) continue;
        const int s = warp * SPW + sl;
        float pr[4];
        float x[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t t = strip_row_t(p, si, s, g + (e >= 2 ? 8 : 0));
          const int64_t i = i0 + nt * 8 + 2 * qd + (e & 1);
          const bool vis = full || (i < c1 && i <= L - W + t);
          x[e] = vis ? acc[sl][e] * p.scale2 : kNegInf;
          if constexpr (PASS_B) pr[e] = exp2f(x[e] - lse2[sl][e >> 1]);  // exp2(-inf) = 0
        }
        if constexpr (!PASS_B) {
          // Online max / sum per row over this thread's two columns: one
          // rescale when the max grows (rare after the first tiles).
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float mx = fmaxf(x[2 * h], x[2 * h + 1]);
            if (mx > kNegInf) {
              float& m = run_m[sl][h];
              float& l = run_l[sl][h];
              if (mx > m) {
                l *= exp2f(m - mx);  // 0 * exp2(-inf) = 0 the first time
                m = mx;
              }
              l += exp2f(x[2 * h] - m) + exp2f(x[2 * h + 1] - m);
            }
          }
        }
        if constexpr (PASS_B) {
          // Column sums over the strip's 16 rows: rows g, g + 8 here, then over g.
          // max_per_query: the max over each query's min(Gp, 16) rows first (the
          // low bits of g, then the halves when Gp >= 16), the sum over queries after.
          const int qbits = p.per_query ? (p.gp_shift < 3 ? p.gp_shift : 3) : 0;
          float a0 = pr[0], a1 = pr[1], b0 = pr[2], b1 = pr[3];
#pragma unroll
          for (int k = 0; k < 3; ++k) {
            if (k < qbits) {
              a0 = fmaxf(a0, __shfl_xor_sync(0xffffffffu, a0, 4 << k));
              a1 = fmaxf(a1, __shfl_xor_sync(0xffffffffu, a1, 4 << k));
              b0 = fmaxf(b0, __shfl_xor_sync(0xffffffffu, b0, 4 << k));
              b1 = fmaxf(b1, __shfl_xor_sync(0xffffffffu, b1, 4 << k));
            }
          }
          const bool halves_max = p.per_query && p.gp_shift >= 4;
          float v0 = halves_max ? fmaxf(a0, b0) : a0 + b0, v1 = halves_max ? fmaxf(a1, b1) : a1 + b1;
#pragma unroll
          for (int k = 0; k < 3; ++k) {
            if (k >= qbits) {
              v0 += __shfl_xor_sync(0xffffffffu, v0, 4 << k);
              v1 += __shfl_xor_sync(0xffffffffu, v1, 4 << k);
            }
          }
          if (g == 0) {
            colpart[s * BN + nt * 8 + 2 * qd] = v0;
            colpart[s * BN + nt * 8 + 2 * qd + 1] = v1;
          }
        }
      }
    }
    if constexpr (PASS_B) {
      __syncthreads();
      // Sum over each head's strips (the window), then over the block's heads.
      float* out = p.part + ((pb.b * p.num_kv_heads + pb.j) * p.num_row_groups + pb.rg) * p.capacity;
      for (int col = tid; col < BN; col += NTH) {
        const int64_t i = i0 + col;
        if (i >= c1) continue;
        float r = 0.f;
        if (p.per_query) {  // the max over each query's strips, the sum over queries
          const int spq = p.gp_shift > 4 ? 1 << (p.gp_shift - 4) : 1;
          for (int s0 = 0; s0 < si.nstrips; s0 += spq) {
            float qm = 0.f;  // probabilities are >= 0
            for (int s = s0; s < s0 + spq && s < si.nstrips; ++s) qm = fmaxf(qm, colpart[s * BN + col]);
            r += qm;
          }
        }
        for (int64_t hh = 0; hh < nheads; ++hh) {
          float qs = 0.f;
          for (int sh = 0; sh < p.strips_per_head; ++sh) qs += colpart[(hh * p.strips_per_head + sh) * BN + col];
          r = hh == 0 ? qs : (p.group_max ? fmaxf(r, qs) : r + qs);
        }
        out[i] = r;
        if (i < L - W) cmax = fmaxf(cmax, r);
      }
    }
  }
  if constexpr (S > 1) cp_async_wait<0>();
  if constexpr (PASS_B) {
    cmax = block_max<NTH>(cmax, lse_s);  // lse_s is free: every thread holds its rows' lse
    if (tid == 0) p.cmax[cmax_at] = cmax;
  }

  if constexpr (!PASS_B) {
    // Merge the four lanes that share each row, then one lane per row writes.
#pragma unroll
    for (int sl = 0; sl < SPW; ++sl) {
      if (sl >= nactive) continue;
      const int s = warp * SPW + sl;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m = run_m[sl][h], l = run_l[sl][h];
#pragma unroll
        for (int off = 1; off < 4; off *= 2) {
          const float mo = __shfl_xor_sync(0xffffffffu, m, off);
          const float lo = __shfl_xor_sync(0xffffffffu, l, off);
          const float mn = fmaxf(m, mo);
          l = (l > 0.f ? l * exp2f(m - mn) : 0.f) + (lo > 0.f ? lo * exp2f(mo - mn) : 0.f);
          m = mn;
        }
        const int64_t sr = strip_stats_row(p, si, s, g + 8 * h);
        if (qd == 0 && sr >= 0) stats[pb.chunk * stats_rows + sr] = make_float2(l > 0.f ? m : kNegInf, l);
      }
    }
  }
}

template <typename T, int D, int NW, bool PASS_B>
__global__ void __launch_bounds__(NW * 32) window_pass_tc_kernel(const WindowPassParams p) {
  window_pass<TcPolicy<T, D, NW>, PASS_B>(p);
}

template <typename T, int NW, bool PASS_B>
__global__ void __launch_bounds__(NW * 32) window_pass_simt_kernel(const WindowPassParams p) {
  window_pass<SimtPolicy<T, NW>, PASS_B>(p);
}

// ---------------------------------------------------------------------------
// Finalize: the per-slot score of a head from the pass-B partials, and the
// normalize / pool math (also used by the fused select kernel).
// ---------------------------------------------------------------------------
struct ScoreSource {
  const float* part = nullptr;  // [B, Hkv, num_row_groups, C]
  const int32_t* lengths = nullptr;
  int64_t len_sb = 0, len_sh = 0;
  int64_t num_kv_heads = 0, capacity = 0, window = 0;
  int num_row_groups = 1;
  int group_max = 0;   // combine the row groups by max (else sum; max_per_query's row groups split the window)
  int mean_all = 0;    // sum over every kv head of the batch
  float scale = 1.f;   // 1/W (query mean) x 1/G (group mean) or 1/Hq (mean_all)
  const float* cmax = nullptr;  // pass B's per-chunk maxima when they are the head's (one row group, not mean_all)
  int num_chunks = 0;
  bool normalize = false;
  Pool pool = Pool::kNone;
  int pool_kernel = 1;
};

// Score of slot i (< L) of head (b, j) before normalizing. lens: the batch's
// kv-head lengths (mean_all only; 0 for out-of-range ones).
__device__ __forceinline__ float raw_score(const ScoreSource& s, int64_t b, int64_t j, int64_t i,
                                           const int32_t* lens) {
  float r;
  if (s.mean_all) {
    r = 0.f;
    for (int64_t jj = 0; jj < s.num_kv_heads; ++jj) {
      if (i >= lens[jj]) continue;
      const float* pp = s.part + (b * s.num_kv_heads + jj) * s.num_row_groups * s.capacity + i;
      for (int rg = 0; rg < s.num_row_groups; ++rg) r += pp[rg * s.capacity];
    }
  } else {
    const float* pp = s.part + (b * s.num_kv_heads + j) * s.num_row_groups * s.capacity + i;
    r = pp[0];
    for (int rg = 1; rg < s.num_row_groups; ++rg) r = s.group_max ? fmaxf(r, pp[rg * s.capacity]) : r + pp[rg * s.capacity];
  }
  return r * s.scale;
}

// Normalized score (step 3 of reference.window_scores) of slot i < L.
__device__ __forceinline__ float norm_score(const ScoreSource& s, int64_t b, int64_t j, int64_t i, int64_t M,
                                            float top, const int32_t* lens) {
  const float r = raw_score(s, b, j, i, lens);
  return s.normalize && i < M && top > 0.f ? r / top : r;
}

// Pooling over the candidate slots [0, M) (reference.pool_scores) of f(n).
template <class F>
__device__ __forceinline__ float pool_at(const ScoreSource& s, int64_t i, int64_t M, F&& f) {
  if (s.pool == Pool::kNone || s.pool_kernel <= 1 || i >= M) return f(i);
  const int64_t r = s.pool_kernel / 2;
  const int64_t lo = i - r < 0 ? 0 : i - r, hi = i + r < M - 1 ? i + r : M - 1;
  if (s.pool == Pool::kAvg) {
    float sum = 0.f;
    for (int64_t n = lo; n <= hi; ++n) sum += f(n);
    return sum / static_cast<float>(s.pool_kernel);
  }
  float mx = kNegInf;
  for (int64_t n = lo; n <= hi; ++n) mx = fmaxf(mx, f(n));
  return mx;
}

struct FinalizeParams {
  ScoreSource src;
  float* out = nullptr;  // [B, Hkv, C] contiguous
  int64_t batch = 0;
  int blocks_per_head = 1;
};

constexpr int kFinalizeThreads = 256;
constexpr int kFinalizeSlots = 8;  // slots per thread: independent loads in flight
constexpr int64_t kFinalizeSpan = static_cast<int64_t>(kFinalizeThreads) * kFinalizeSlots;

// Dynamic shared memory: scratch + the batch's kv-head lengths (mean_all).
inline size_t finalize_smem_bytes(int64_t num_kv_heads) {
  return (static_cast<size_t>(num_kv_heads) * sizeof(int32_t) + 64 * sizeof(float) + 15) / 16 * 16;
}

// The batch's kv-head lengths (mean_all: 0 for out-of-range ones) into lens,
// from pass A's snapshot (later kernels may rewrite the lengths tensor). The
// caller's barrier publishes them.
template <int NT>
__device__ __forceinline__ void load_batch_lengths(const ScoreSource& s, int64_t b, int32_t* lens) {
  for (int64_t jj = threadIdx.x; jj < s.num_kv_heads; jj += NT) {
    bool okj;
    lens[jj] = static_cast<int32_t>(head_length(s.lengths, s.len_sb, s.len_sh, b, jj, s.capacity, &okj));
  }
}

// reference: max of where(cand, s, 0) over the candidates [0, M): from pass
// B's per-chunk maxima when they apply, else a pass (every thread calls).
template <int NT>
__device__ __forceinline__ float normalizing_max(const ScoreSource& s, int64_t b, int64_t j, int64_t M,
                                                 const int32_t* lens, float* scratch) {
  if (!s.normalize) return 0.f;
  float top = 0.f;
  if (s.cmax != nullptr) {
    const float* cm = s.cmax + (b * s.num_kv_heads + j) * s.num_chunks;
    for (int c = 0; c < s.num_chunks; ++c) top = fmaxf(top, cm[c]);
    return top * s.scale;  // scale > 0: the max of the scaled values, exactly
  }
  for (int64_t i = threadIdx.x; i < M; i += NT) top = fmaxf(top, raw_score(s, b, j, i, lens));
  return block_max<NT>(top, scratch);
}

// blocks_per_head blocks per head, each kFinalizeSpan slots (kFinalizeSlots
// per thread, loaded before use).
__global__ void __launch_bounds__(kFinalizeThreads) window_finalize_kernel(const FinalizeParams p) {
  constexpr int NT = kFinalizeThreads, V = kFinalizeSlots;
  extern __shared__ __align__(16) unsigned char smem[];
  float* scratch = reinterpret_cast<float*>(smem);
  int32_t* lens = reinterpret_cast<int32_t*>(smem + 64 * sizeof(float));
  const ScoreSource& s = p.src;
  const int64_t hd = static_cast<int64_t>(blockIdx.x) / p.blocks_per_head;
  const int64_t span0 = static_cast<int64_t>(blockIdx.x) % p.blocks_per_head * kFinalizeSpan;
  const int64_t b = hd / s.num_kv_heads, j = hd % s.num_kv_heads;
  const int tid = static_cast<int>(threadIdx.x);
  float* out = p.out + hd * s.capacity;
  bool ok;
  const int64_t L = head_length(s.lengths, s.len_sb, s.len_sh, b, j, s.capacity, &ok);
  if (!ok) {
    for (int k = 0; k < V; ++k) {
      const int64_t i = span0 + k * NT + tid;
      if (i < s.capacity) out[i] = CUDART_NAN_F;
    }
    return;
  }
  if (s.mean_all) {
    load_batch_lengths<NT>(s, b, lens);
    __syncthreads();
  }
  const int64_t M = L - s.window > 0 ? L - s.window : 0;
  const float top = normalizing_max<NT>(s, b, j, M, lens, scratch);
  auto g = [&](int64_t n) { return norm_score(s, b, j, n, M, top, lens); };
  float v[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t i = span0 + k * NT + tid;
    v[k] = i < L ? g(i) : 0.f;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const int64_t i = span0 + k * NT + tid;
    if (i < M && s.pool != Pool::kNone && s.pool_kernel > 1) v[k] = pool_at(s, i, M, g);
    if (i < s.capacity) out[i] = v[k];
  }
}

// ---------------------------------------------------------------------------
// Host-side planning (shared by the CUDA launchers and the CPU emulator).
// ---------------------------------------------------------------------------

// Knobs the tests and the emulator turn; the launchers use the defaults.
struct EvictionTuning {
  bool force_simt = false;     // CUDA-core window path even where tensor cores apply
  int window_target_blocks = 256;  // pass A / B blocks to aim for (~2 per SM on an H100; all resident)
  int window_chunk_tiles = 4;  // at least this many tiles per chunk (at full capacity)
  size_t max_smem = 0;         // select: keys cached in shared memory up to this (0: the device's opt-in max)
  int select_list_cap = -1;    // select: candidate-list capacity (-1: as much as fits)
};

struct WindowShape {
  KvDtype dtype;
  int64_t batch, num_q_heads, num_kv_heads, window, capacity, head_dim;
  bool tc_aligned;  // q / k bases and strides are multiples of 16 bytes
  bool per_query = false;  // group_reduce max_per_query: query-major rows
};

struct WindowPlan {
  bool ok = false;
  bool tc = false;
  int num_warps = 4, strips_per_warp = 1, block_n = 32;
  int heads_per_cta = 1, strips_per_head = 1, num_row_groups = 1, num_chunks = 1;
  int gp_shift = 0, strips_per_cta = 0;  // max_per_query only
  int64_t num_strips = 0, stats_rows = 0;
  int64_t blocks = 0;
  size_t smem = 0;
  size_t stats_bytes = 0, part_bytes = 0, cmax_bytes = 0, snap_bytes = 0;
};

constexpr size_t kWsAlign = 256;
inline size_t ws_round(size_t n) { return (n + kWsAlign - 1) / kWsAlign * kWsAlign; }

// Dynamic shared memory of the pass kernels the plan picks (the element size
// of the tensor-core tiles is 2 bytes for both 16-bit types).
inline size_t window_pass_smem(bool tc, int64_t head_dim, int num_warps) {
  const bool w4 = num_warps == 4;
  if (tc) {
    switch (head_dim) {
      case 64:
        return w4 ? window_pass_smem_bytes<TcPolicy<__half, 64, 4>>(64) : window_pass_smem_bytes<TcPolicy<__half, 64, 8>>(64);
      case 128:
        return w4 ? window_pass_smem_bytes<TcPolicy<__half, 128, 4>>(128)
                  : window_pass_smem_bytes<TcPolicy<__half, 128, 8>>(128);
      default:
        return w4 ? window_pass_smem_bytes<TcPolicy<__half, 256, 4>>(256)
                  : window_pass_smem_bytes<TcPolicy<__half, 256, 8>>(256);
    }
  }
  return w4 ? window_pass_smem_bytes<SimtPolicy<float, 4>>(head_dim)
            : window_pass_smem_bytes<SimtPolicy<float, 8>>(head_dim);
}

inline WindowPlan plan_window(const WindowShape& s, const EvictionTuning& tune) {
  WindowPlan pl;
  if (s.batch < 0 || s.num_kv_heads < 1 || s.num_q_heads < 1 || s.num_q_heads % s.num_kv_heads != 0 ||
      s.window < 1 || s.capacity < 0 || s.head_dim < 1 || s.head_dim > 512)
    return pl;
  const int64_t G = s.num_q_heads / s.num_kv_heads;
  pl.tc = !tune.force_simt && s.dtype != KvDtype::kFloat32 &&
          (s.head_dim == 64 || s.head_dim == 128 || s.head_dim == 256) && s.tc_aligned;
  pl.strips_per_warp = pl.tc ? static_cast<int>(256 / s.head_dim) : 2;
  pl.block_n = pl.tc ? 64 : 32;
  if (s.per_query) {
    // Query-major rows: a block takes whole queries (Gp rows each) of every head of the group.
    while ((int64_t{1} << pl.gp_shift) < G) ++pl.gp_shift;
    if (pl.gp_shift > 20 || s.window > (int64_t{1} << 40)) return pl;
    pl.num_strips = (s.window * (int64_t{1} << pl.gp_shift) + 15) / 16;
    pl.num_warps = pl.num_strips <= 4 * pl.strips_per_warp ? 4 : 8;
    pl.strips_per_cta = pl.num_warps * pl.strips_per_warp;
    // A query's rows must not span blocks.
    if (pl.gp_shift > 4 && (int64_t{1} << (pl.gp_shift - 4)) > pl.strips_per_cta) return pl;
    const int64_t groups = (pl.num_strips + pl.strips_per_cta - 1) / pl.strips_per_cta;
    if (groups > INT_MAX) return pl;
    pl.num_row_groups = static_cast<int>(groups);
    pl.heads_per_cta = static_cast<int>(G);
    pl.stats_rows = 16 * static_cast<int64_t>(pl.strips_per_cta);
  } else {
    const int64_t sh = (s.window + 15) / 16;
    pl.strips_per_head = static_cast<int>(sh < INT_MAX ? sh : INT_MAX);
    pl.num_warps = G * sh <= 4 * pl.strips_per_warp ? 4 : 8;
    const int64_t hpc = static_cast<int64_t>(pl.num_warps) * pl.strips_per_warp / sh;
    if (hpc < 1) return pl;  // one head's window does not fit a block
    pl.heads_per_cta = static_cast<int>(hpc < G ? hpc : G);
    pl.num_row_groups = static_cast<int>((G + pl.heads_per_cta - 1) / pl.heads_per_cta);
    pl.stats_rows = static_cast<int64_t>(pl.heads_per_cta) * s.window;
  }
  const int64_t heads = s.batch * s.num_kv_heads * pl.num_row_groups;
  int64_t nch = heads > 0 ? (tune.window_target_blocks + heads - 1) / heads : 1;
  const int64_t cap = (s.capacity + static_cast<int64_t>(tune.window_chunk_tiles) * pl.block_n - 1) /
                      (static_cast<int64_t>(tune.window_chunk_tiles) * pl.block_n);
  if (nch > cap) nch = cap;
  if (nch < 1) nch = 1;
  pl.num_chunks = static_cast<int>(nch);
  pl.blocks = heads * nch;
  if (pl.blocks > INT_MAX) return pl;
  pl.smem = window_pass_smem(pl.tc, s.head_dim, pl.num_warps);
  pl.stats_bytes = ws_round(static_cast<size_t>(heads * nch * pl.stats_rows) * sizeof(float2));
  pl.part_bytes = ws_round(static_cast<size_t>(heads * s.capacity) * sizeof(float));
  pl.cmax_bytes = ws_round(static_cast<size_t>(heads * nch) * sizeof(float));
  pl.snap_bytes = ws_round(static_cast<size_t>(s.batch * s.num_kv_heads) * sizeof(int32_t));
  pl.ok = true;
  return pl;
}

inline bool is_aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// P: WindowScoresParams or ScoreEvictParams (the same names for q_win, k and their shape).
template <class P>
WindowShape window_shape(KvDtype dt, const P& p) {
  WindowShape s{dt, p.batch, p.num_q_heads, p.num_kv_heads, p.window, p.capacity, p.head_dim, false};
  s.per_query = p.group_reduce == GroupReduce::kMaxPerQuery;
  const int64_t vec = dt == KvDtype::kFloat32 ? 4 : 8;
  s.tc_aligned = is_aligned16(p.q_win) && is_aligned16(p.k) && p.q_stride_b % vec == 0 &&
                 p.q_stride_h % vec == 0 && p.q_stride_t % vec == 0 && p.k_stride_b % vec == 0 &&
                 p.k_stride_h % vec == 0 && p.k_stride_c % vec == 0;
  return s;
}

inline float score_scale(QueryReduce qr, GroupReduce gr, int64_t W, int64_t G, int64_t Hq) {
  double s = qr == QueryReduce::kMean ? 1.0 / static_cast<double>(W) : 1.0;
  if (gr == GroupReduce::kMean) s /= static_cast<double>(G);
  if (gr == GroupReduce::kMeanAll) s /= static_cast<double>(Hq);
  return static_cast<float>(s);
}

// Launches pass A and pass B. Launcher: see eviction_inst.cu (CUDA) and
// tools/cuda_emu/eviction_emu.cpp (CPU); launch(kernel, blocks, threads,
// dynamic smem, params) -> cudaError_t.
template <int NW, class Launcher>
cudaError_t launch_pass_pair(void (*pass_a)(WindowPassParams), void (*pass_b)(WindowPassParams),
                             const WindowPassParams& wp, const WindowPlan& pl, Launcher& launch) {
  KVKERN_CUDA_TRY(launch(pass_a, pl.blocks, NW * 32, pl.smem, wp));
  return launch(pass_b, pl.blocks, NW * 32, pl.smem, wp);
}

template <typename T, int NW, class Launcher>
cudaError_t launch_window_passes_nw(const WindowPassParams& wp, const WindowPlan& pl, Launcher& launch) {
  if (pl.tc) {
    if constexpr (sizeof(T) == 2) {
      switch (wp.head_dim) {
        case 64:
          return launch_pass_pair<NW>(window_pass_tc_kernel<T, 64, NW, false>, window_pass_tc_kernel<T, 64, NW, true>,
                                      wp, pl, launch);
        case 128:
          return launch_pass_pair<NW>(window_pass_tc_kernel<T, 128, NW, false>,
                                      window_pass_tc_kernel<T, 128, NW, true>, wp, pl, launch);
        case 256:
          return launch_pass_pair<NW>(window_pass_tc_kernel<T, 256, NW, false>,
                                      window_pass_tc_kernel<T, 256, NW, true>, wp, pl, launch);
        default:
          return cudaErrorInvalidValue;
      }
    }
    return cudaErrorInvalidValue;
  }
  return launch_pass_pair<NW>(window_pass_simt_kernel<T, NW, false>, window_pass_simt_kernel<T, NW, true>, wp, pl,
                              launch);
}

template <class Launcher>
cudaError_t launch_window_passes(KvDtype dt, const WindowPassParams& wp, const WindowPlan& pl, Launcher& launch) {
  if (pl.blocks == 0) return cudaSuccess;
  switch (dt) {
    case KvDtype::kFloat32:
      return pl.num_warps == 4 ? launch_window_passes_nw<float, 4>(wp, pl, launch)
                               : launch_window_passes_nw<float, 8>(wp, pl, launch);
    case KvDtype::kFloat16:
      return pl.num_warps == 4 ? launch_window_passes_nw<__half, 4>(wp, pl, launch)
                               : launch_window_passes_nw<__half, 8>(wp, pl, launch);
    case KvDtype::kBFloat16:
      return pl.num_warps == 4 ? launch_window_passes_nw<__nv_bfloat16, 4>(wp, pl, launch)
                               : launch_window_passes_nw<__nv_bfloat16, 8>(wp, pl, launch);
  }
  return cudaErrorInvalidValue;
}

// Fills the pass parameters common to window_scores and score_evict (P: their
// Params, which name the window's inputs alike).
template <class P>
WindowPassParams window_pass_params(const WindowPlan& pl, const P& p, void* workspace) {
  WindowPassParams wp;
  wp.q = p.q_win;
  wp.k = p.k;
  wp.lengths = p.lengths;
  wp.batch = p.batch;
  wp.num_q_heads = p.num_q_heads;
  wp.num_kv_heads = p.num_kv_heads;
  wp.window = p.window;
  wp.capacity = p.capacity;
  wp.head_dim = p.head_dim;
  wp.group = p.num_q_heads / p.num_kv_heads;
  wp.q_sb = p.q_stride_b;
  wp.q_sh = p.q_stride_h;
  wp.q_st = p.q_stride_t;
  wp.k_sb = p.k_stride_b;
  wp.k_sh = p.k_stride_h;
  wp.k_sc = p.k_stride_c;
  wp.len_sb = p.lengths_stride_b;
  wp.len_sh = p.lengths_stride_h;
  wp.scale2 = p.sm_scale * kLog2e;
  wp.heads_per_cta = pl.heads_per_cta;
  wp.strips_per_head = pl.strips_per_head;
  wp.num_row_groups = pl.num_row_groups;
  wp.num_chunks = pl.num_chunks;
  wp.group_max = p.group_reduce == GroupReduce::kMax ? 1 : 0;
  wp.per_query = p.group_reduce == GroupReduce::kMaxPerQuery ? 1 : 0;
  wp.gp_shift = pl.gp_shift;
  wp.strips_per_cta = pl.strips_per_cta;
  wp.num_strips = pl.num_strips;
  wp.stats_rows = pl.stats_rows;
  wp.stats = static_cast<float2*>(workspace);
  wp.part = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + pl.stats_bytes);
  wp.cmax = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + pl.stats_bytes + pl.part_bytes);
  wp.len_snap = reinterpret_cast<int32_t*>(static_cast<unsigned char*>(workspace) + pl.stats_bytes + pl.part_bytes +
                                           pl.cmax_bytes);
  return wp;
}

inline ScoreSource score_source(const WindowPlan& pl, const WindowPassParams& wp, QueryReduce qr, GroupReduce gr,
                                bool normalize, Pool pool, int pool_kernel) {
  ScoreSource s;
  s.part = wp.part;
  s.lengths = wp.len_snap;  // the kernels after pass A may rewrite the lengths tensor
  s.len_sb = wp.num_kv_heads;
  s.len_sh = 1;
  s.num_kv_heads = wp.num_kv_heads;
  s.capacity = wp.capacity;
  s.window = wp.window;
  s.num_row_groups = pl.num_row_groups;
  s.group_max = gr == GroupReduce::kMax ? 1 : 0;
  s.mean_all = gr == GroupReduce::kMeanAll ? 1 : 0;
  s.scale = score_scale(qr, gr, wp.window, wp.group, wp.num_q_heads);
  s.normalize = normalize;
  s.pool = pool;
  s.pool_kernel = pool_kernel;
  if (pl.num_row_groups == 1 && !s.mean_all) {
    s.cmax = wp.cmax;
    s.num_chunks = pl.num_chunks;
  }
  return s;
}

inline bool pool_ok(Pool pool, int kernel) {
  if (pool == Pool::kNone) return kernel >= 1;
  return kernel >= 1 && kernel % 2 == 1 && kernel <= 2049;
}

inline WindowPlan plan_window_scores(const WindowScoresParams& p, KvDtype dt, const EvictionTuning& tune) {
  if (!pool_ok(p.pool, p.pool_kernel) || p.out == nullptr || p.q_win == nullptr || p.k == nullptr ||
      p.lengths == nullptr)
    return WindowPlan{};
  return plan_window(window_shape(dt, p), tune);
}

inline size_t window_ws_bytes(const WindowPlan& pl) {
  return pl.stats_bytes + pl.part_bytes + pl.cmax_bytes + pl.snap_bytes;
}
inline size_t window_scores_ws_bytes(const WindowPlan& pl) { return window_ws_bytes(pl); }

template <class Launcher>
cudaError_t run_window_scores(const WindowScoresParams& p, KvDtype dt, void* workspace, Launcher& launch,
                              const EvictionTuning& tune = EvictionTuning{}) {
  const WindowPlan pl = plan_window_scores(p, dt, tune);
  if (!pl.ok || (workspace == nullptr && window_scores_ws_bytes(pl) > 0)) return cudaErrorInvalidValue;
  if (p.batch * p.num_kv_heads == 0) return cudaSuccess;
  const WindowPassParams wp = window_pass_params(pl, p, workspace);
  KVKERN_CUDA_TRY(launch_window_passes(dt, wp, pl, launch));
  FinalizeParams fp;
  fp.src = score_source(pl, wp, p.query_reduce, p.group_reduce, p.normalize, p.pool, p.pool_kernel);
  fp.out = p.out;
  fp.batch = p.batch;
  const int64_t per_head = p.capacity > 0 ? (p.capacity + kFinalizeSpan - 1) / kFinalizeSpan : 1;
  if (per_head > INT_MAX) return cudaErrorInvalidValue;
  fp.blocks_per_head = static_cast<int>(per_head);
  return launch(window_finalize_kernel, p.batch * p.num_kv_heads * per_head, kFinalizeThreads,
                finalize_smem_bytes(p.num_kv_heads), fp);
}

}  // namespace eviction_detail
}  // namespace kvkern
