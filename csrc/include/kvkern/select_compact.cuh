// SPDX-License-Identifier: Apache-2.0
// CUDA select / compact / evict and the fused score_evict tail
// (reference.select_keep, compact_, evict_, score_evict_). Torch-free.
// EVICTION_CUDA.md has the design; eviction_launch.h the host interface.
//
// select: one block of 1024 threads per (b, kv head). A pass over the slots
// marks the protected ones (they go straight into keep) and turns every other
// valid score into an order-preserving uint32 key (0 = not a candidate), kept
// in shared memory when the head fits (else in the workspace). The threshold
// of the top `need` keys comes from a 3-pass radix select (11 + 11 + 10-bit
// digits, histograms in shared memory); then keys above it are kept, and of
// the keys equal to it the latest ones (a reverse block scan counts equal keys
// after each slot). Segment quotas / minima run the same select per segment.
// When the caller compacts next, the block also writes the ascending list of
// kept slots (the "plan") and the new length.
//
// compact: dest(rank r) = r <= src(r), so moving the kept rows in rank order
// in batches, with every read of a batch done (a barrier) before its writes,
// never overwrites a row that is still to be read: a batch writes slots
// [a, b) while the sources of later ranks r >= b are >= r >= b. The rows are
// split into column slices (and one block for positions / hist / log_w), each
// slice an independent stream, so a head's move is spread over ~17 blocks.
#pragma once

#include "eviction_launch.h"
#include "window_scores.cuh"

namespace kvkern {
namespace eviction_detail {

constexpr int kSelectThreads = 1024;
constexpr int kRadixBins = 2048;
constexpr int kMaxSegments = 1024;
constexpr int kPlanThreads = 1024;
constexpr int kMoveThreads = 256;
constexpr int kMoveUnroll = 8;  // rows in flight per thread and batch

struct SelectKernelParams {
  const float* scores = nullptr;  // plain mode
  int64_t scores_sb = 0, scores_sh = 0;
  const int32_t* lengths = nullptr;
  int64_t len_sb = 0, len_sh = 0;
  const int32_t* positions = nullptr;
  int64_t pos_sb = 0, pos_sh = 0;
  const int32_t* budgets = nullptr;
  int64_t bud_sb = 0, bud_sh = 0, budget = 0;
  const int32_t* ranges = nullptr;
  int64_t num_ranges = 0, ranges_sb = 0;
  const bool* keep_mask = nullptr;
  int64_t km_sb = 0, km_sh = 0;
  const int32_t* seg_cuts = nullptr;
  const int32_t* seg_min = nullptr;
  int64_t num_segments = 1;
  int64_t n_sink = 0, n_recent = 0;
  int64_t batch = 0, num_kv_heads = 0, capacity = 0;
  bool* keep = nullptr;              // [B, Hkv, C] contiguous
  int32_t* new_lengths = nullptr;    // [B, Hkv] contiguous, or nullptr
  int32_t* lengths_out = nullptr;    // the lengths tensor (len strides), or nullptr
  int32_t* plan_idx = nullptr;       // [B, Hkv, C], or nullptr (no compaction follows)
  int32_t* plan_count = nullptr;     // [B, Hkv]: kept rows, -1 = nothing to move
  uint32_t* keys_ws = nullptr;       // [B, Hkv, C] when the keys do not fit in shared memory
  int32_t* seg_ws = nullptr;         // [B, Hkv, C] segment ids (segments only)
  int keys_in_smem = 0;
  uint32_t list_cap = 0;             // shared-memory list of the first digit's candidates (0: none)
  // Fused score_evict only.
  ScoreSource src;
  float* hist = nullptr;
  int64_t hist_sb = 0, hist_sh = 0;
  int32_t* hist_lengths = nullptr;
  int64_t hl_sb = 0, hl_sh = 0;
  float decay = 0.f;
  int hist_mode = 0;
  const float* redundancy = nullptr;
  int64_t red_sb = 0, red_sh = 0;
  float mix_lambda = 1.f;
};

// Shared memory of the select kernel, in 4-byte words: scratch (64), radix
// histogram, results (16), per-segment tables (cuts, counts, protected,
// quotas), the batch's lengths (fused mean_all), the candidate list, then the
// keys if cached.
struct SelectSmem {
  size_t scratch, hist, res, cuts, cnt, prot, quota, lens, list, keys, words;
};

__host__ __device__ inline SelectSmem select_smem(int64_t num_segments, int64_t lens, int64_t capacity,
                                                   bool keys_cached, uint32_t list_cap) {
  SelectSmem s;
  s.scratch = 0;
  s.hist = 64;
  s.res = s.hist + kRadixBins;
  const size_t S = num_segments > 1 ? static_cast<size_t>(num_segments) : 0;
  s.cuts = s.res + 16;
  s.cnt = s.cuts + S;
  s.prot = s.cnt + S;
  s.quota = s.prot + S;
  s.lens = s.quota + S;
  s.list = s.lens + static_cast<size_t>(lens);
  s.keys = (s.list + list_cap + 3) / 4 * 4;
  s.words = s.keys + (keys_cached ? static_cast<size_t>(capacity) : 0);
  return s;
}

__device__ __forceinline__ bool slot_protected(const SelectKernelParams& p, int64_t b, int64_t j, int64_t i,
                                               int64_t L, int64_t n_recent, int64_t pos) {
  if (i < p.n_sink || i >= L - n_recent) return true;
  if (p.ranges != nullptr) {
    const int32_t* r = p.ranges + b * p.ranges_sb;
    for (int64_t k = 0; k < p.num_ranges; ++k)
      if (pos >= r[2 * k] && pos < r[2 * k + 1]) return true;
  }
  return p.keep_mask != nullptr && p.keep_mask[b * p.km_sb + j * p.km_sh + i];
}

// Segment of a position: the number of cuts <= pos (torch.bucketize, right=True).
__device__ __forceinline__ int32_t segment_of(const int32_t* cuts, int64_t ncuts, int64_t pos) {
  int64_t lo = 0, hi = ncuts;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (cuts[mid] <= pos) lo = mid + 1;
    else hi = mid;
  }
  return static_cast<int32_t>(lo);
}

// Radix select state: the digits fixed so far (prefix under mask), how many
// candidates are still to be taken at or below them, and (after the last
// pass) how many candidates equal the threshold.
struct RadixState {
  uint32_t prefix = 0, mask = 0, remaining = 0, eq_total = 0;
};

__host__ __device__ constexpr int radix_shift(int pass) { return pass == 0 ? 21 : pass == 1 ? 10 : 0; }
__host__ __device__ constexpr uint32_t radix_bins(int pass) { return pass == 2 ? 1024u : 2048u; }

// Adds one to hist[d] for every lane of the warp with `want`. Lanes sharing
// the first wanting lane's digit add once (many equal scores would otherwise
// serialize on one bin). Every lane of the warp must call it.
__device__ __forceinline__ void hist_add(uint32_t* hist, bool want, uint32_t d) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const unsigned act = __ballot_sync(0xffffffffu, want);
  if (act == 0) return;
  const uint32_t d0 = __shfl_sync(0xffffffffu, d, __ffs(static_cast<int>(act)) - 1);
  const bool same = want && d == d0;
  const unsigned sm = __ballot_sync(0xffffffffu, same);
  if (same) {
    if (lane == __ffs(static_cast<int>(sm)) - 1) atomicAdd(&hist[d0], static_cast<uint32_t>(__popc(sm)));
  } else if (want) {
    atomicAdd(&hist[d], 1u);
  }
}

// Appends `value` for every lane with `want` to list (order unspecified);
// *count (shared) counts every append, also past cap (then the list is
// incomplete). Every lane of the warp must call it.
__device__ __forceinline__ void list_append(uint32_t* list, uint32_t* count, uint32_t cap, bool want, uint32_t value) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const unsigned act = __ballot_sync(0xffffffffu, want);
  if (act == 0) return;
  const int leader = __ffs(static_cast<int>(act)) - 1;
  uint32_t base = 0;
  if (lane == leader) base = atomicAdd(count, static_cast<uint32_t>(__popc(act)));
  base = __shfl_sync(0xffffffffu, base, leader);
  const uint32_t at = base + static_cast<uint32_t>(__popc(act & ((1u << lane) - 1u)));
  if (want && at < cap) list[at] = value;
}

// Picks the digit of `pass` from a filled histogram: the bin holding the
// st.remaining-th largest candidate (counting from the top bin).
template <int NT>
__device__ void radix_pick(RadixState& st, int pass, const uint32_t* hist, uint32_t* scratch, uint32_t* res) {
  const int tid = static_cast<int>(threadIdx.x);
  const uint32_t nb = radix_bins(pass);
  // Thread tid owns bins nb-1-tid*bpt .. downwards; the scan counts the
  // candidates in the bins above its first one.
  const uint32_t bpt = nb / NT;
  uint32_t local = 0;
  for (uint32_t k = 0; k < bpt; ++k) local += hist[nb - 1 - (tid * bpt + k)];
  if (tid == 0) {  // a bin in range even if the caller broke 1 <= remaining <= candidates
    res[0] = 0;
    res[1] = 0;
  }
  uint32_t tot;
  uint32_t cum = block_exclusive_sum<NT>(local, scratch, &tot);
  for (uint32_t k = 0; k < bpt; ++k) {
    const uint32_t bin = nb - 1 - (tid * bpt + k);
    const uint32_t h = hist[bin];
    if (cum < st.remaining && cum + h >= st.remaining) {
      res[0] = bin;
      res[1] = cum;
    }
    cum += h;
  }
  __syncthreads();
  const uint32_t bin = res[0], above = res[1];
  if (pass == 2) st.eq_total = hist[bin];
  __syncthreads();  // res and hist are reused next
  st.remaining -= above;
  st.prefix |= bin << radix_shift(pass);
  st.mask |= (nb - 1) << radix_shift(pass);
}

// One radix pass over keys[0, n) (key 0 is never a candidate) restricted to
// the prefix so far and `filter`.
template <int NT, class Filter>
__device__ void radix_pass(const uint32_t* keys, int64_t n, RadixState& st, int pass, Filter&& filter, uint32_t* hist,
                           uint32_t* scratch, uint32_t* res) {
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const uint32_t nb = radix_bins(pass);
  const int shift = radix_shift(pass);
  for (uint32_t bb = tid; bb < nb; bb += NT) hist[bb] = 0;
  __syncthreads();
  for (int64_t base = tid - lane; base < n; base += NT) {  // uniform per warp (the ballots)
    const int64_t i = base + lane;
    bool want = false;
    uint32_t d = 0;
    if (i < n) {
      const uint32_t k = keys[i];
      want = k != 0 && (k & st.mask) == st.prefix && filter(i);
      d = (k >> shift) & (nb - 1);
    }
    hist_add(hist, want, d);
  }
  __syncthreads();
  radix_pick<NT>(st, pass, hist, scratch, res);
}

// The need-th largest candidate key among keys[0, n) that pass `filter`
// (1 <= need <= number of candidates): 3 passes over the keys.
template <int NT, class Filter>
__device__ RadixState radix_select(const uint32_t* keys, int64_t n, uint32_t need, Filter&& filter, uint32_t* hist,
                                   uint32_t* scratch, uint32_t* res) {
  RadixState st;
  st.remaining = need;
  for (int pass = 0; pass < 3; ++pass) radix_pass<NT>(keys, n, st, pass, filter, hist, scratch, res);
  return st;
}

// Marks (keep = true) the candidates of `filter` with key > tau and the latest
// st.remaining of those equal to tau; with zero_keys their keys become 0 (no
// longer candidates). Thread tid touches slots tid + k * NT only, like every
// pass, so no barrier is needed between passes over the same slots.
template <int NT, class Filter>
__device__ void mark_selected(uint32_t* keys, int64_t n, bool* keep, const RadixState& st, Filter&& filter,
                              bool zero_keys, uint32_t* scratch) {
  const int tid = static_cast<int>(threadIdx.x);
  const uint32_t tau = st.prefix;
  if (st.remaining == st.eq_total) {
    for (int64_t i = tid; i < n; i += NT) {
      const uint32_t k = keys[i];
      if (k != 0 && k >= tau && filter(i)) {
        keep[i] = true;
        if (zero_keys) keys[i] = 0;
      }
    }
  } else {
    uint32_t carry = 0;  // equal candidates in later tiles
    for (int64_t T = (n + NT - 1) / NT - 1; T >= 0; --T) {
      const int64_t i = T * NT + tid;
      uint32_t k = 0;
      bool cand = false;
      if (i < n) {
        k = keys[i];
        cand = k != 0 && k >= tau && filter(i);
      }
      const uint32_t eq = cand && k == tau ? 1u : 0u;
      uint32_t tot;
      const uint32_t excl = block_exclusive_sum<NT>(eq, scratch, &tot);
      const uint32_t later = carry + (tot - excl - eq);
      if (cand && (k > tau || later < st.remaining)) {
        keep[i] = true;
        if (zero_keys) keys[i] = 0;
      }
      carry += tot;
    }
  }
  __syncthreads();
}

template <int NT, class Filter>
__device__ __forceinline__ void select_and_mark(uint32_t* keys, int64_t n, uint32_t need, bool* keep, Filter&& filter,
                                                bool zero_keys, uint32_t* hist, uint32_t* scratch, uint32_t* res) {
  const RadixState st = radix_select<NT>(keys, n, need, filter, hist, scratch, res);
  mark_selected<NT>(keys, n, keep, st, filter, zero_keys, scratch);
}

// One forward pass over the slots of a head in tiles of NT * V, thread tid
// owning V consecutive slots of each tile: kept_at(i) (i < L) decides; writes
// keep_out[0, C) (when given) and the ascending list of kept slots to idx
// (when given). Returns the number kept. Every thread calls it.
template <int NT, int V, class KeptAt>
__device__ uint32_t forward_plan(int64_t L, int64_t C, bool* keep_out, int32_t* idx, KeptAt&& kept_at,
                                 uint32_t* scratch) {
  static_assert(V <= 32, "V: at most 32 slots per thread");
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t end = keep_out != nullptr && C > L ? C : L;
  uint32_t carry = 0;
  for (int64_t T = 0; T * NT * V < end; ++T) {
    const int64_t i0 = (T * NT + tid) * V;
    uint32_t bits = 0;
#pragma unroll
    for (int k = 0; k < V; ++k)
      if (i0 + k < L && kept_at(i0 + k)) bits |= 1u << k;
    if (keep_out != nullptr) {
#pragma unroll
      for (int k = 0; k < V; ++k)
        if (i0 + k < C) keep_out[i0 + k] = (bits >> k) & 1u;
    }
    if (T * NT * V < L) {  // uniform: the scan needs every thread
      uint32_t tot;
      uint32_t at = carry + block_exclusive_sum<NT>(static_cast<uint32_t>(__popc(bits)), scratch, &tot);
      if (idx != nullptr) {
#pragma unroll
        for (int k = 0; k < V; ++k)
          if ((bits >> k) & 1u) idx[at++] = static_cast<int32_t>(i0 + k);
      }
      carry += tot;
    }
  }
  return carry;
}

// The ascending list of kept valid slots of a head; returns their number.
template <int NT, int V = 8>
__device__ uint32_t build_plan(const bool* keep, int64_t L, int32_t* idx, uint32_t* scratch) {
  return forward_plan<NT, V>(L, L, nullptr, idx, [keep](int64_t i) { return keep[i]; }, scratch);
}

__device__ __forceinline__ float update_hist(int mode, float decay, float old, float now) {
  if (mode == static_cast<int>(UpdateMode::kMax)) return fmaxf(decay * old, now);
  if (mode == static_cast<int>(UpdateMode::kEma)) return decay * old + (1.f - decay) * now;
  return decay * old + now;
}

// Protected slots among [0, L) when protection is only by slot index.
__device__ __forceinline__ int64_t count_index_protected(int64_t L, int64_t n_sink, int64_t n_recent) {
  const int64_t s = n_sink < 0 ? 0 : n_sink > L ? L : n_sink;
  int64_t r = L - n_recent;
  r = r < 0 ? 0 : r > L ? L : r;
  return s + (L - r) - (s > r ? s - r : 0);
}

// The top-`need` selection of one head when the first radix histogram was
// filled while the keys were made (hist holds pass 0): the candidates of the
// chosen first digit are gathered into `list` (when they fit) so the other two
// passes touch only them; then one forward pass marks keep (protected slots
// are already marked) and writes the plan. need == 0 just writes the plan.
template <int NT>
__device__ void select_fast_tail(uint32_t* keys, int64_t L, int64_t C, uint32_t need, bool* keep, int32_t* plan_idx,
                                 uint32_t* hist, uint32_t* scratch, uint32_t* res, uint32_t* list,
                                 uint32_t list_cap) {
  // keys[i] == 0 exactly for the protected slots of [0, L): candidates have
  // keys >= score_key(-inf) > 0.
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  RadixState st;
  bool all_eq = true;  // every candidate equal to the threshold is kept
  if (need == 0) {
    st.prefix = 0xffffffffu;  // above every key: nothing but the protected slots
  } else {
    st.remaining = need;
    auto all = [](int64_t) { return true; };
    radix_pick<NT>(st, 0, hist, scratch, res);
    if (tid == 0) res[4] = 0;
    __syncthreads();
    for (int64_t base = tid - lane; base < L; base += NT) {
      const int64_t i = base + lane;
      const uint32_t k = i < L ? keys[i] : 0u;
      list_append(list, &res[4], list_cap, k != 0 && (k & st.mask) == st.prefix, k);
    }
    __syncthreads();
    const uint32_t n1 = res[4];
    if (n1 <= list_cap) {
      for (int pass = 1; pass < 3; ++pass) radix_pass<NT>(list, n1, st, pass, all, hist, scratch, res);
    } else {
      for (int pass = 1; pass < 3; ++pass) radix_pass<NT>(keys, L, st, pass, all, hist, scratch, res);
    }
    if (st.remaining < st.eq_total) {
      // Not every key equal to the threshold fits: the latest ones win. They
      // are tagged with the largest key (no score maps to it).
      all_eq = false;
      uint32_t carry = 0;
      for (int64_t T = (L + NT - 1) / NT - 1; T >= 0; --T) {
        const int64_t i = T * NT + tid;
        const uint32_t eq = i < L && keys[i] == st.prefix ? 1u : 0u;
        uint32_t tot;
        const uint32_t excl = block_exclusive_sum<NT>(eq, scratch, &tot);
        if (eq && carry + (tot - excl - eq) < st.remaining) keys[i] = 0xffffffffu;
        carry += tot;
      }
      __syncthreads();  // the forward pass reads other threads' tags
    }
  }
  // Kept: protected (key 0), above the threshold (or tagged), or equal to it
  // when all of those fit. Reads only the keys.
  const uint32_t tau = st.prefix;
  forward_plan<NT, 8>(L, C, keep, plan_idx, [&](int64_t i) {
    const uint32_t k = keys[i];
    return k == 0 || k > tau || (all_eq && k == tau);
  }, scratch);
}

// One block per (b, kv head). FUSED: the scores come from the window passes
// (score_evict: normalize, history, pooling, mix), else from p.scores.
template <bool FUSED>
__global__ void __launch_bounds__(kSelectThreads) select_kernel(const SelectKernelParams p) {
  constexpr int NT = kSelectThreads;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int64_t Hkv = p.num_kv_heads, C = p.capacity;
  const int64_t hd = static_cast<int64_t>(blockIdx.x);
  const int64_t b = hd / Hkv, j = hd % Hkv;
  const bool segments = !FUSED && p.num_segments > 1;
  const SelectSmem lay = select_smem(segments ? p.num_segments : 1, FUSED && p.src.mean_all ? Hkv : 0, C,
                                     p.keys_in_smem != 0, p.list_cap);
  uint32_t* words = reinterpret_cast<uint32_t*>(smem);
  uint32_t* scratch = words + lay.scratch;
  uint32_t* hist = words + lay.hist;
  uint32_t* res = words + lay.res;
  int32_t* cuts = reinterpret_cast<int32_t*>(words + lay.cuts);
  uint32_t* cnt = words + lay.cnt;
  uint32_t* prot = words + lay.prot;
  uint32_t* quota = words + lay.quota;
  int32_t* lens = reinterpret_cast<int32_t*>(words + lay.lens);
  uint32_t* list = words + lay.list;
  uint32_t* keys = p.keys_in_smem ? words + lay.keys : p.keys_ws + hd * C;

  bool* keep = p.keep + hd * C;
  const int32_t raw_len = p.lengths[b * p.len_sb + j * p.len_sh];
  bool ok;
  const int64_t L = head_length(p.lengths, p.len_sb, p.len_sh, b, j, C, &ok);
  const int64_t K = p.budgets != nullptr ? p.budgets[b * p.bud_sb + j * p.bud_sh] : p.budget;

  // Nothing selected: keep every valid slot (none for a bad length), lengths
  // unchanged, nothing to move.
  auto untouched = [&]() {
    for (int64_t i = tid; i < C; i += NT) keep[i] = ok && i < L;
    if (tid == 0) {
      if (p.new_lengths != nullptr) p.new_lengths[hd] = raw_len;
      if (p.plan_count != nullptr) p.plan_count[hd] = -1;
    }
  };
  if (!ok || L <= K) {
    untouched();
    return;
  }
  const int64_t W = FUSED ? p.src.window : 0;
  const int64_t n_recent = FUSED && p.n_recent < W ? W : p.n_recent;
  const int64_t M = L - W > 0 ? L - W : 0;
  const int64_t S = p.num_segments;
  // Protected by slot index only: counted without a pass, tested on the fly.
  const bool index_prot = p.ranges == nullptr && p.keep_mask == nullptr;
  auto prot_at = [&](int64_t i) {
    if (index_prot) return i < p.n_sink || i >= L - n_recent;
    const int64_t pos = p.positions != nullptr ? p.positions[b * p.pos_sb + j * p.pos_sh + i] : i;
    return slot_protected(p, b, j, i, L, n_recent, pos);
  };

  for (uint32_t bb = tid; bb < static_cast<uint32_t>(kRadixBins); bb += NT) hist[bb] = 0;
  if (segments) {
    for (int64_t s = tid; s < S; s += NT) {
      if (s < S - 1) cuts[s] = p.seg_cuts[s];
      cnt[s] = 0;
      prot[s] = 0;
    }
  }
  if (FUSED && p.src.mean_all) load_batch_lengths<NT>(p.src, b, lens);
  __syncthreads();

  uint32_t nprot = index_prot ? static_cast<uint32_t>(count_index_protected(L, p.n_sink, n_recent)) : 0u;
  float top = 0.f;
  if constexpr (FUSED) {
    const ScoreSource& src = p.src;
    // Protection that needs a pass is counted first (into keep), so an
    // infeasible head is found before hist is touched.
    if (!index_prot) {
      for (int64_t i = tid; i < L; i += NT) {
        const bool pr = prot_at(i);
        keep[i] = pr;
        nprot += pr ? 1u : 0u;
      }
      nprot = block_sum_u32<NT>(nprot, scratch);
    }
    top = normalizing_max<NT>(src, b, j, M, lens, reinterpret_cast<float*>(scratch));
    if (static_cast<int64_t>(nprot) > K) {  // the reference raises; leave the head alone
      untouched();
      return;
    }
    float* hrow = p.hist != nullptr ? p.hist + b * p.hist_sb + j * p.hist_sh : nullptr;
    const int64_t hl = p.hist != nullptr ? p.hist_lengths[b * p.hl_sb + j * p.hl_sh] : 0;
    const float* rrow = p.redundancy != nullptr ? p.redundancy + b * p.red_sb + j * p.red_sh : nullptr;
    // Pre-pool score: the history-merged one on the candidates, the window's
    // own on the window slots.
    auto g_at = [&](int64_t n) -> float {
      const float s = norm_score(src, b, j, n, M, top, lens);
      if (hrow != nullptr && n < M && n < hl) return update_hist(p.hist_mode, p.decay, hrow[n], s);
      return s;
    };
    // Tiles of NT * V slots, V per thread (slot T * NT * V + k * NT + tid),
    // their loads issued together. hist is updated in place while pooling
    // reads its neighbours, so tile T is written back one tile later, after
    // every thread has pooled tile T + 1 (which reads at most pool_kernel / 2
    // <= NT slots of tile T).
    constexpr int V = 4;
    float gprev[V] = {}, gcur[V];
    const int64_t span = static_cast<int64_t>(NT) * V;
    const int64_t ntiles = (L + span - 1) / span;
    for (int64_t T = 0; T <= ntiles; ++T) {
      const int64_t i0 = T * span + tid;
      if (T < ntiles) {
#pragma unroll
        for (int k = 0; k < V; ++k) gcur[k] = i0 + k * NT < L ? g_at(i0 + k * NT) : 0.f;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const int64_t i = i0 + k * NT;
          bool want = false;
          uint32_t key = 0;
          if (i < L) {
            float v = gcur[k];
            if (i < M && src.pool != Pool::kNone && src.pool_kernel > 1) v = pool_at(src, i, M, g_at);
            if (rrow != nullptr) v = p.mix_lambda * v - (1.f - p.mix_lambda) * rrow[i];
            const bool pr = index_prot ? prot_at(i) : keep[i];
            key = pr ? 0u : score_key(v);
            keys[i] = key;
            want = !pr;
          }
          hist_add(hist, want, key >> radix_shift(0));
        }
      }
      __syncthreads();
      if (hrow != nullptr && T >= 1) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const int64_t ip = i0 - span + k * NT;
          if (ip < M) hrow[ip] = gprev[k];
        }
      }
#pragma unroll
      for (int k = 0; k < V; ++k) gprev[k] = gcur[k];
    }
    select_fast_tail<NT>(keys, L, C, static_cast<uint32_t>(K - static_cast<int64_t>(nprot)), keep,
                         p.plan_idx != nullptr ? p.plan_idx + hd * C : nullptr, hist, scratch, res, list, p.list_cap);
  } else {
    const float* srow = p.scores + b * p.scores_sb + j * p.scores_sh;
    const int32_t* pos_row = p.positions != nullptr ? p.positions + b * p.pos_sb + j * p.pos_sh : nullptr;
    // Keys (protected: 0, straight into keep), the first radix histogram,
    // segment counts.
    // V slots per thread per step (slot base + k * NT + lane), loaded first.
    constexpr int V = 4;
    uint32_t np = 0;
    for (int64_t base = tid - lane; base < L; base += static_cast<int64_t>(NT) * V) {  // uniform per warp
      float sv[V];
#pragma unroll
      for (int k = 0; k < V; ++k) sv[k] = base + lane + k * NT < L ? srow[base + lane + k * NT] : 0.f;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const int64_t i = base + lane + k * NT;
        bool pr = false, want = false;
        uint32_t key = 0;
        if (i < L) {
          pr = prot_at(i);
          key = pr ? 0u : score_key(sv[k]);
          keys[i] = key;
          want = !pr && !segments;
          if (segments) {
            const int32_t s = segment_of(cuts, S - 1, pos_row != nullptr ? pos_row[i] : i);
            p.seg_ws[hd * C + i] = s;
            atomicAdd(&cnt[s], 1u);
            if (pr) atomicAdd(&prot[s], 1u);
            keep[i] = pr;
          }
        }
        np += pr ? 1u : 0u;
        hist_add(hist, want, key >> radix_shift(0));
      }
    }
    if (segments)
      for (int64_t i = L + tid; i < C; i += NT) keep[i] = false;
    if (!index_prot) nprot = block_sum_u32<NT>(np, scratch);
    else __syncthreads();
    if (static_cast<int64_t>(nprot) > K) {
      untouched();
      return;
    }
    if (!segments) {
      select_fast_tail<NT>(keys, L, C, static_cast<uint32_t>(K - static_cast<int64_t>(nprot)), keep,
                           p.plan_idx != nullptr ? p.plan_idx + hd * C : nullptr, hist, scratch, res, list,
                           p.list_cap);
    } else {
      auto all = [](int64_t) { return true; };
      if (p.seg_min == nullptr) {
        // Proportional quotas (reference.segment_quotas), one thread.
        if (tid == 0) {
          uint32_t bad = 0;
          int64_t left = K;
          for (int64_t s = 0; s < S; ++s) {
            quota[s] = static_cast<uint32_t>(K * static_cast<int64_t>(cnt[s]) / L);
            left -= quota[s];
          }
          int64_t s = S - 1;
          while (left > 0) {
            if (quota[s] < cnt[s]) {
              ++quota[s];
              --left;
            }
            s = s > 0 ? s - 1 : S - 1;
          }
          for (int64_t t = 0; t < S; ++t) bad |= prot[t] > quota[t] ? 1u : 0u;
          res[8] = bad;
        }
        __syncthreads();
        if (res[8] != 0) {
          untouched();
          return;
        }
        for (int64_t s = 0; s < S; ++s) {
          const uint32_t need = quota[s] - prot[s];
          if (need == 0) continue;
          const int32_t* seg = p.seg_ws + hd * C;
          auto in_s = [seg, s](int64_t i) { return seg[i] == s; };
          select_and_mark<NT>(keys, L, need, keep, in_s, false, hist, scratch, res);
        }
      } else {
        // Minima per segment first, then the best of what is left.
        int64_t total = nprot;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t smin = p.seg_min[s], ns = cnt[s];  // signed: a negative minimum asks for nothing
          const int64_t want = smin < ns ? smin : ns;
          const int64_t need = want - static_cast<int64_t>(prot[s]);
          if (need <= 0) continue;
          total += need;
          const int32_t* seg = p.seg_ws + hd * C;
          auto in_s = [seg, s](int64_t i) { return seg[i] == s; };
          select_and_mark<NT>(keys, L, static_cast<uint32_t>(need), keep, in_s, true, hist, scratch, res);
        }
        if (total > K) {
          untouched();
          return;
        }
        if (K - total > 0)
          select_and_mark<NT>(keys, L, static_cast<uint32_t>(K - total), keep, all, false, hist, scratch, res);
      }
      if (p.plan_idx != nullptr) build_plan<NT>(keep, L, p.plan_idx + hd * C, scratch);
    }
  }

  if (tid == 0) {
    if (p.new_lengths != nullptr) p.new_lengths[hd] = static_cast<int32_t>(K);
    if (p.lengths_out != nullptr) p.lengths_out[b * p.len_sb + j * p.len_sh] = static_cast<int32_t>(K);
    if (p.plan_count != nullptr) p.plan_count[hd] = static_cast<int32_t>(K);
    if (FUSED && p.hist_lengths != nullptr)
      p.hist_lengths[b * p.hl_sb + j * p.hl_sh] = static_cast<int32_t>(K - W > 0 ? K - W : 0);
  }
}

// ---------------------------------------------------------------------------
// compact: the plan of a keep mask (standalone compact_), then the move.
// ---------------------------------------------------------------------------
struct PlanParams {
  int32_t* lengths = nullptr;  // read, then the new lengths
  int64_t len_sb = 0, len_sh = 0;
  const bool* keep = nullptr;
  int64_t keep_sb = 0, keep_sh = 0;
  int32_t* plan_idx = nullptr;
  int32_t* plan_count = nullptr;
  int64_t num_kv_heads = 0, capacity = 0;
};

__global__ void __launch_bounds__(kPlanThreads) plan_kernel(const PlanParams p) {
  constexpr int NT = kPlanThreads;
  extern __shared__ __align__(16) unsigned char smem[];  // 64 words of scan scratch
  uint32_t* scratch = reinterpret_cast<uint32_t*>(smem);
  const int64_t hd = static_cast<int64_t>(blockIdx.x);
  const int64_t b = hd / p.num_kv_heads, j = hd % p.num_kv_heads;
  bool ok;
  const int64_t L = head_length(p.lengths, p.len_sb, p.len_sh, b, j, p.capacity, &ok);
  if (!ok) {
    if (threadIdx.x == 0) p.plan_count[hd] = -1;
    return;
  }
  const uint32_t n = build_plan<NT, 16>(p.keep + b * p.keep_sb + j * p.keep_sh, L, p.plan_idx + hd * p.capacity, scratch);
  __syncthreads();  // every thread has read the old length
  if (threadIdx.x == 0) {
    p.plan_count[hd] = static_cast<int64_t>(n) == L ? -1 : static_cast<int32_t>(n);  // all kept: nothing moves
    p.lengths[b * p.len_sb + j * p.len_sh] = static_cast<int32_t>(n);
  }
}

struct MoveParams {
  unsigned char* k = nullptr;
  unsigned char* v = nullptr;
  int64_t k_sb = 0, k_sh = 0, k_sc = 0, v_sb = 0, v_sh = 0, v_sc = 0;  // bytes
  int64_t row_units = 0;  // units (of the kernel's U) per K / V row
  int units_per_slice = 1, num_slices = 1;
  int32_t* positions = nullptr;
  int64_t pos_sb = 0, pos_sh = 0;
  float* hist = nullptr;
  int64_t hist_sb = 0, hist_sh = 0;
  float* log_w = nullptr;
  int64_t lw_sb = 0, lw_sh = 0;
  const int32_t* plan_idx = nullptr;
  const int32_t* plan_count = nullptr;
  int64_t num_kv_heads = 0, capacity = 0;
};

// Rows of rank [r0, ...) in batches; reads of a batch complete before its
// writes (see the top of the file for why this is enough).
template <typename U>
__global__ void __launch_bounds__(kMoveThreads) move_kernel(const MoveParams p) {
  constexpr int NT = kMoveThreads, UN = kMoveUnroll;
  const int roles = 2 * p.num_slices + 1;
  const int64_t hd = static_cast<int64_t>(blockIdx.x) / roles;
  const int role = static_cast<int>(static_cast<int64_t>(blockIdx.x) % roles);
  const int64_t b = hd / p.num_kv_heads, j = hd % p.num_kv_heads;
  const int32_t n = p.plan_count[hd];
  if (n <= 0) return;
  const int32_t* idx = p.plan_idx + hd * p.capacity;
  const int tid = static_cast<int>(threadIdx.x);
  if (role < 2 * p.num_slices) {
    const bool is_v = role >= p.num_slices;
    const int slice = role % p.num_slices;
    unsigned char* base = is_v ? p.v + b * p.v_sb + j * p.v_sh : p.k + b * p.k_sb + j * p.k_sh;
    const int64_t sc = is_v ? p.v_sc : p.k_sc;
    const int64_t u0 = static_cast<int64_t>(slice) * p.units_per_slice;
    const int width = static_cast<int>(p.row_units - u0 < p.units_per_slice ? p.row_units - u0 : p.units_per_slice);
    const int rows_per_step = NT / width;
    const bool active = tid < rows_per_step * width;
    const int64_t row_off = tid / width;
    const int64_t unit_off = (u0 + tid % width) * static_cast<int64_t>(sizeof(U));
    for (int64_t r0 = 0; r0 < n; r0 += static_cast<int64_t>(rows_per_step) * UN) {
      U val[UN];
      int64_t src[UN];
#pragma unroll
      for (int u = 0; u < UN; ++u) {
        const int64_t r = r0 + row_off + static_cast<int64_t>(u) * rows_per_step;
        src[u] = active && r < n ? idx[r] : r;
        if (src[u] != r) val[u] = *reinterpret_cast<const U*>(base + src[u] * sc + unit_off);
      }
      __syncthreads();
#pragma unroll
      for (int u = 0; u < UN; ++u) {
        const int64_t r = r0 + row_off + static_cast<int64_t>(u) * rows_per_step;
        if (src[u] != r) *reinterpret_cast<U*>(base + r * sc + unit_off) = val[u];
      }
    }
  } else {
    int32_t* pos = p.positions != nullptr ? p.positions + b * p.pos_sb + j * p.pos_sh : nullptr;
    float* hs = p.hist != nullptr ? p.hist + b * p.hist_sb + j * p.hist_sh : nullptr;
    float* lw = p.log_w != nullptr ? p.log_w + b * p.lw_sb + j * p.lw_sh : nullptr;
    if (pos == nullptr && hs == nullptr && lw == nullptr) return;
    for (int64_t r0 = 0; r0 < n; r0 += static_cast<int64_t>(NT) * UN) {
      int32_t pv[UN];
      float hv[UN], wv[UN];
      int64_t src[UN];
#pragma unroll
      for (int u = 0; u < UN; ++u) {
        const int64_t r = r0 + tid + static_cast<int64_t>(u) * NT;
        src[u] = r < n ? idx[r] : r;
        if (src[u] != r) {
          if (pos) pv[u] = pos[src[u]];
          if (hs) hv[u] = hs[src[u]];
          if (lw) wv[u] = lw[src[u]];
        }
      }
      __syncthreads();
#pragma unroll
      for (int u = 0; u < UN; ++u) {
        const int64_t r = r0 + tid + static_cast<int64_t>(u) * NT;
        if (src[u] != r) {
          if (pos) pos[r] = pv[u];
          if (hs) hs[r] = hv[u];
          if (lw) lw[r] = wv[u];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Host-side planning and the launch sequences (shared with the emulator).
// ---------------------------------------------------------------------------
// The plan in the workspace at `plan`: [idx: heads x capacity][count: heads].
inline size_t plan_idx_bytes(int64_t heads, int64_t capacity) {
  return ws_round(static_cast<size_t>(heads * capacity) * sizeof(int32_t));
}
inline size_t plan_ws_bytes(int64_t heads, int64_t capacity) {
  return plan_idx_bytes(heads, capacity) + ws_round(static_cast<size_t>(heads) * sizeof(int32_t));
}
inline void plan_pointers(unsigned char* plan, int64_t heads, int64_t capacity, int32_t** idx, int32_t** count) {
  *idx = reinterpret_cast<int32_t*>(plan);
  *count = reinterpret_cast<int32_t*>(plan + plan_idx_bytes(heads, capacity));
}

struct SelectPlan {
  bool ok = false;
  bool keys_in_smem = false;
  uint32_t list_cap = 0;
  size_t smem = 0;
  size_t keys_bytes = 0, seg_bytes = 0;
};

constexpr uint32_t kMaxListCap = 8192;

// Keys in shared memory when they fit, then as long a candidate list as fits
// (up to kMaxListCap, at most the capacity; none below 256).
inline SelectPlan plan_select(int64_t heads, int64_t capacity, int64_t num_segments, int64_t lens_words,
                              size_t max_smem, int list_cap_override) {
  SelectPlan pl;
  if (heads < 0 || capacity < 0 || num_segments < 1 || num_segments > kMaxSegments || heads > INT_MAX) return pl;
  const size_t max_words = max_smem / 4;
  const SelectSmem base = select_smem(num_segments, lens_words, capacity, false, 0);
  pl.keys_in_smem = base.words + static_cast<size_t>(capacity) + 4 <= max_words;
  const size_t used = base.words + (pl.keys_in_smem ? static_cast<size_t>(capacity) : 0) + 4;
  size_t cap = max_words > used ? max_words - used : 0;
  if (cap > kMaxListCap) cap = kMaxListCap;
  if (cap > static_cast<size_t>(capacity)) cap = static_cast<size_t>(capacity);
  if (cap < 256 && cap < static_cast<size_t>(capacity)) cap = 0;
  if (list_cap_override >= 0) cap = static_cast<size_t>(list_cap_override);
  pl.list_cap = static_cast<uint32_t>(cap);
  pl.smem = select_smem(num_segments, lens_words, capacity, pl.keys_in_smem, pl.list_cap).words * 4;
  if (pl.smem > 48 * 1024 && pl.smem > max_smem) return pl;
  pl.keys_bytes = ws_round(static_cast<size_t>(heads * capacity) * sizeof(uint32_t));
  pl.seg_bytes = num_segments > 1 ? ws_round(static_cast<size_t>(heads * capacity) * sizeof(int32_t)) : 0;
  pl.ok = true;
  return pl;
}

inline bool select_params_ok(const SelectParams& p) {
  if (p.batch < 0 || p.num_kv_heads < 0 || p.capacity < 0 || p.lengths == nullptr || p.keep == nullptr ||
      p.scores == nullptr || p.num_ranges < 0 || (p.num_ranges > 0 && p.protect_ranges == nullptr) ||
      p.num_segments < 1 || p.num_segments > kMaxSegments || (p.num_segments > 1 && p.segment_cuts == nullptr) ||
      (p.segment_min != nullptr && p.segment_cuts == nullptr))
    return false;
  return true;
}

// What select_keep and score_evict's selection share (P: SelectParams or
// ScoreEvictParams, which name these fields alike).
template <class P>
SelectKernelParams select_kernel_params_common(const P& p) {
  SelectKernelParams k;
  k.lengths = p.lengths;
  k.len_sb = p.lengths_stride_b;
  k.len_sh = p.lengths_stride_h;
  k.positions = p.positions;
  k.pos_sb = p.positions_stride_b;
  k.pos_sh = p.positions_stride_h;
  k.budgets = p.budgets;
  k.bud_sb = p.budgets_stride_b;
  k.bud_sh = p.budgets_stride_h;
  k.budget = p.budget;
  k.ranges = p.num_ranges > 0 ? p.protect_ranges : nullptr;
  k.num_ranges = p.num_ranges;
  k.ranges_sb = p.ranges_stride_b;
  k.keep_mask = p.keep_mask;
  k.km_sb = p.keep_mask_stride_b;
  k.km_sh = p.keep_mask_stride_h;
  k.n_sink = p.n_sink;
  k.n_recent = p.n_recent;
  k.batch = p.batch;
  k.num_kv_heads = p.num_kv_heads;
  k.capacity = p.capacity;
  k.keep = p.keep;
  return k;
}

inline SelectKernelParams select_kernel_params(const SelectParams& p) {
  SelectKernelParams k = select_kernel_params_common(p);
  k.scores = p.scores;
  k.scores_sb = p.scores_stride_b;
  k.scores_sh = p.scores_stride_h;
  k.seg_cuts = p.num_segments > 1 ? p.segment_cuts : nullptr;
  k.seg_min = p.num_segments > 1 ? p.segment_min : nullptr;
  k.num_segments = p.num_segments;
  k.new_lengths = p.new_lengths;
  return k;
}

inline size_t max_smem_of(size_t device_max, const EvictionTuning& tune) {
  return tune.max_smem != 0 ? tune.max_smem : device_max;
}

// Workspace: [keys][segment ids][plan idx][plan count] (the plan for evict only).
inline size_t select_ws_bytes(const SelectParams& p, bool with_plan) {
  const int64_t heads = p.batch * p.num_kv_heads;
  const size_t keys = ws_round(static_cast<size_t>(heads * p.capacity) * sizeof(uint32_t));
  const size_t seg = p.num_segments > 1 ? ws_round(static_cast<size_t>(heads * p.capacity) * sizeof(int32_t)) : 0;
  return keys + seg + (with_plan ? plan_ws_bytes(heads, p.capacity) : 0);
}

template <class Launcher>
cudaError_t launch_select(const SelectParams& p, void* workspace, bool with_plan, int32_t* lengths_out,
                          int32_t** plan_idx, int32_t** plan_count, Launcher& launch, const EvictionTuning& tune) {
  if (!select_params_ok(p)) return cudaErrorInvalidValue;
  const int64_t heads = p.batch * p.num_kv_heads;
  const SelectPlan pl =
      plan_select(heads, p.capacity, p.num_segments, 0, max_smem_of(launch.max_smem(), tune), tune.select_list_cap);
  if (!pl.ok || workspace == nullptr) return cudaErrorInvalidValue;
  SelectKernelParams k = select_kernel_params(p);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  k.keys_ws = reinterpret_cast<uint32_t*>(ws);
  k.keys_in_smem = pl.keys_in_smem ? 1 : 0;
  k.list_cap = pl.list_cap;
  k.seg_ws = pl.seg_bytes ? reinterpret_cast<int32_t*>(ws + pl.keys_bytes) : nullptr;
  if (with_plan) {
    plan_pointers(ws + pl.keys_bytes + pl.seg_bytes, heads, p.capacity, &k.plan_idx, &k.plan_count);
    k.lengths_out = lengths_out;
    *plan_idx = k.plan_idx;
    *plan_count = k.plan_count;
  }
  if (heads == 0) return cudaSuccess;
  return launch(select_kernel<false>, heads, kSelectThreads, pl.smem, k);
}

template <class Launcher>
cudaError_t run_select_keep(const SelectParams& p, void* workspace, Launcher& launch,
                            const EvictionTuning& tune = EvictionTuning{}) {
  if (p.new_lengths == nullptr) return cudaErrorInvalidValue;
  return launch_select(p, workspace, false, nullptr, nullptr, nullptr, launch, tune);
}

struct MovePlan {
  bool ok = false;
  int unit = 16;
  int64_t row_units = 0;
  int units_per_slice = 1, num_slices = 1;
  int64_t blocks = 0;
};

inline MovePlan plan_move(const CompactParams& p, KvDtype dt) {
  MovePlan pl;
  const int64_t es = kv_dtype_size(dt);
  if (p.head_dim < 1 || p.k == nullptr || p.v == nullptr) return pl;
  const int64_t row_bytes = p.head_dim * es;
  const int64_t vals[] = {row_bytes,          p.k_stride_b * es, p.k_stride_h * es, p.k_stride_c * es,
                          p.v_stride_b * es,  p.v_stride_h * es, p.v_stride_c * es,
                          static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.k) % 16),
                          static_cast<int64_t>(reinterpret_cast<uintptr_t>(p.v) % 16)};
  int unit = 16;
  for (; unit > static_cast<int>(es); unit /= 2) {
    bool fits = true;
    for (int64_t x : vals) fits = fits && x % unit == 0;
    if (fits) break;
  }
  pl.unit = unit;
  pl.row_units = row_bytes / unit;
  // ~8 slices per tensor, each at least one 32-byte sector when the row allows.
  int64_t ups = (pl.row_units + 7) / 8;
  const int64_t sector = 32 / unit < pl.row_units ? 32 / unit : pl.row_units;
  if (ups < sector) ups = sector;
  if (ups > kMoveThreads) ups = kMoveThreads;
  pl.units_per_slice = static_cast<int>(ups);
  pl.num_slices = static_cast<int>((pl.row_units + ups - 1) / ups);
  pl.blocks = p.batch * p.num_kv_heads * (2 * static_cast<int64_t>(pl.num_slices) + 1);
  pl.ok = pl.blocks <= INT_MAX;
  return pl;
}

template <class Launcher>
cudaError_t launch_move(const CompactParams& p, const MovePlan& pl, const int32_t* plan_idx,
                        const int32_t* plan_count, Launcher& launch) {
  const int64_t es = pl.row_units * pl.unit / p.head_dim;  // element size
  MoveParams m;
  m.k = static_cast<unsigned char*>(p.k);
  m.v = static_cast<unsigned char*>(p.v);
  m.k_sb = p.k_stride_b * es;
  m.k_sh = p.k_stride_h * es;
  m.k_sc = p.k_stride_c * es;
  m.v_sb = p.v_stride_b * es;
  m.v_sh = p.v_stride_h * es;
  m.v_sc = p.v_stride_c * es;
  m.row_units = pl.row_units;
  m.units_per_slice = pl.units_per_slice;
  m.num_slices = pl.num_slices;
  m.positions = p.positions;
  m.pos_sb = p.positions_stride_b;
  m.pos_sh = p.positions_stride_h;
  m.hist = p.hist;
  m.hist_sb = p.hist_stride_b;
  m.hist_sh = p.hist_stride_h;
  m.log_w = p.log_w;
  m.lw_sb = p.log_w_stride_b;
  m.lw_sh = p.log_w_stride_h;
  m.plan_idx = plan_idx;
  m.plan_count = plan_count;
  m.num_kv_heads = p.num_kv_heads;
  m.capacity = p.capacity;
  if (pl.blocks == 0) return cudaSuccess;
  switch (pl.unit) {
    case 16: return launch(move_kernel<uint4>, pl.blocks, kMoveThreads, 0, m);
    case 8: return launch(move_kernel<uint2>, pl.blocks, kMoveThreads, 0, m);
    case 4: return launch(move_kernel<uint32_t>, pl.blocks, kMoveThreads, 0, m);
    default: return launch(move_kernel<uint16_t>, pl.blocks, kMoveThreads, 0, m);
  }
}

inline bool compact_params_ok(const CompactParams& p) {
  return p.batch >= 0 && p.num_kv_heads >= 0 && p.capacity >= 0 && p.head_dim >= 1 && p.k != nullptr &&
         p.v != nullptr && p.lengths != nullptr && p.keep != nullptr;
}

template <class Launcher>
cudaError_t run_compact(const CompactParams& p, KvDtype dt, void* workspace, Launcher& launch,
                        const EvictionTuning& tune = EvictionTuning{}) {
  (void)tune;
  const MovePlan mp = plan_move(p, dt);
  if (!compact_params_ok(p) || !mp.ok || workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t heads = p.batch * p.num_kv_heads;
  if (heads == 0) return cudaSuccess;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  PlanParams pp;
  pp.lengths = p.lengths;
  pp.len_sb = p.lengths_stride_b;
  pp.len_sh = p.lengths_stride_h;
  pp.keep = p.keep;
  pp.keep_sb = p.keep_stride_b;
  pp.keep_sh = p.keep_stride_h;
  plan_pointers(ws, heads, p.capacity, &pp.plan_idx, &pp.plan_count);
  pp.num_kv_heads = p.num_kv_heads;
  pp.capacity = p.capacity;
  KVKERN_CUDA_TRY(launch(plan_kernel, heads, kPlanThreads, 64 * sizeof(uint32_t), pp));
  return launch_move(p, mp, pp.plan_idx, pp.plan_count, launch);
}

template <class Launcher>
cudaError_t run_evict(const SelectParams& sel, const CompactParams& cp, KvDtype dt, void* workspace,
                      Launcher& launch, const EvictionTuning& tune = EvictionTuning{}) {
  const MovePlan mp = plan_move(cp, dt);
  if (!compact_params_ok(cp) || !mp.ok || sel.batch != cp.batch || sel.num_kv_heads != cp.num_kv_heads ||
      sel.capacity != cp.capacity)
    return cudaErrorInvalidValue;
  SelectParams s = sel;
  s.new_lengths = nullptr;
  int32_t* plan_idx = nullptr;
  int32_t* plan_count = nullptr;
  KVKERN_CUDA_TRY(launch_select(s, workspace, true, cp.lengths, &plan_idx, &plan_count, launch, tune));
  if (sel.batch * sel.num_kv_heads == 0) return cudaSuccess;
  return launch_move(cp, mp, plan_idx, plan_count, launch);
}

// ---------------------------------------------------------------------------
// score_evict: pass A, pass B, finalize + select, move.
// Workspace: [window stats][window part][keys][plan idx][plan count].
// ---------------------------------------------------------------------------
inline WindowPlan plan_score_evict_window(const ScoreEvictParams& p, KvDtype dt, const EvictionTuning& tune) {
  if (!pool_ok(p.pool, p.pool_kernel) || p.q_win == nullptr || p.k == nullptr || p.v == nullptr ||
      p.lengths == nullptr || p.keep == nullptr || (p.hist != nullptr && p.hist_lengths == nullptr) ||
      (p.mix_lambda < 1.f && p.redundancy == nullptr) || p.num_ranges < 0 ||
      (p.num_ranges > 0 && p.protect_ranges == nullptr))
    return WindowPlan{};
  return plan_window(window_shape(dt, p), tune);
}

inline CompactParams score_evict_compact_params(const ScoreEvictParams& p) {
  CompactParams c;
  c.k = p.k;
  c.v = p.v;
  c.lengths = p.lengths;
  c.positions = p.positions;
  c.hist = p.hist;
  c.log_w = p.log_w;
  c.batch = p.batch;
  c.num_kv_heads = p.num_kv_heads;
  c.capacity = p.capacity;
  c.head_dim = p.head_dim;
  c.k_stride_b = p.k_stride_b;
  c.k_stride_h = p.k_stride_h;
  c.k_stride_c = p.k_stride_c;
  c.v_stride_b = p.v_stride_b;
  c.v_stride_h = p.v_stride_h;
  c.v_stride_c = p.v_stride_c;
  c.lengths_stride_b = p.lengths_stride_b;
  c.lengths_stride_h = p.lengths_stride_h;
  c.positions_stride_b = p.positions_stride_b;
  c.positions_stride_h = p.positions_stride_h;
  c.hist_stride_b = p.hist_stride_b;
  c.hist_stride_h = p.hist_stride_h;
  c.log_w_stride_b = p.log_w_stride_b;
  c.log_w_stride_h = p.log_w_stride_h;
  return c;
}

inline size_t score_evict_ws_bytes(const ScoreEvictParams& p, const WindowPlan& pl) {
  const int64_t heads = p.batch * p.num_kv_heads;
  return window_ws_bytes(pl) + ws_round(static_cast<size_t>(heads * p.capacity) * sizeof(uint32_t)) +
         plan_ws_bytes(heads, p.capacity);
}

template <class Launcher>
cudaError_t run_score_evict(const ScoreEvictParams& p, KvDtype dt, void* workspace, Launcher& launch,
                            const EvictionTuning& tune = EvictionTuning{}) {
  const WindowPlan pl = plan_score_evict_window(p, dt, tune);
  const CompactParams cp = score_evict_compact_params(p);
  const MovePlan mp = plan_move(cp, dt);
  if (!pl.ok || !mp.ok || workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t heads = p.batch * p.num_kv_heads;
  const bool mean_all = p.group_reduce == GroupReduce::kMeanAll;
  const SelectPlan sp = plan_select(heads, p.capacity, 1, mean_all ? p.num_kv_heads : 0,
                                    max_smem_of(launch.max_smem(), tune), tune.select_list_cap);
  if (!sp.ok) return cudaErrorInvalidValue;
  if (heads == 0) return cudaSuccess;

  WindowPassParams wp = window_pass_params(pl, p, workspace);
  // mean_all mixes every head of the batch into each: no head can be skipped.
  wp.skip_small = !mean_all;
  wp.budgets = p.budgets;
  wp.budgets_sb = p.budgets_stride_b;
  wp.budgets_sh = p.budgets_stride_h;
  wp.budget = p.budget;
  KVKERN_CUDA_TRY(launch_window_passes(dt, wp, pl, launch));

  unsigned char* ws = static_cast<unsigned char*>(workspace) + window_ws_bytes(pl);
  SelectKernelParams k = select_kernel_params_common(p);
  k.lengths_out = p.lengths;
  k.keys_ws = reinterpret_cast<uint32_t*>(ws);
  k.keys_in_smem = sp.keys_in_smem ? 1 : 0;
  k.list_cap = sp.list_cap;
  plan_pointers(ws + sp.keys_bytes, heads, p.capacity, &k.plan_idx, &k.plan_count);
  k.src = score_source(pl, wp, p.query_reduce, p.group_reduce, p.normalize, p.pool, p.pool_kernel);
  k.hist = p.hist;
  k.hist_sb = p.hist_stride_b;
  k.hist_sh = p.hist_stride_h;
  k.hist_lengths = p.hist != nullptr ? p.hist_lengths : nullptr;
  k.hl_sb = p.hist_lengths_stride_b;
  k.hl_sh = p.hist_lengths_stride_h;
  k.decay = p.decay;
  k.hist_mode = static_cast<int>(p.hist_mode);
  k.redundancy = p.mix_lambda < 1.f ? p.redundancy : nullptr;
  k.red_sb = p.redundancy_stride_b;
  k.red_sh = p.redundancy_stride_h;
  k.mix_lambda = p.mix_lambda;
  KVKERN_CUDA_TRY(launch(select_kernel<true>, heads, kSelectThreads, sp.smem, k));
  return launch_move(cp, mp, k.plan_idx, k.plan_count, launch);
}

}  // namespace eviction_detail
}  // namespace kvkern
