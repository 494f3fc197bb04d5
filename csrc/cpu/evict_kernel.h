// SPDX-License-Identifier: Apache-2.0
// CPU kernels of select_keep, compact_ and allocate_head_budgets, framework-free.
// kvkern/reference.py states the exact semantics; this file says how.
//
// Ranking. Every slot gets a 64-bit rank key: the order-preserving uint32 image of
// its fp32 score in the high half and the slot index in the low half. Distinct
// slots have distinct keys, and "higher score first, ties toward the later slot"
// is plain descending key order, so a top-n is one std::nth_element: O(L) per
// head, no sort, and exactly the reference's set whatever the ties.
#pragma once

#include <kvkern/eviction_params.h>
#include <kvkern/head_budget_params.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

namespace kvkern::cpu {

// a > b as floats <=> order_key(a) > order_key(b); -0 maps to the key of +0 (they
// compare equal as floats) and every NaN to the key of -inf: NaN ranks as -inf,
// and the tie goes to the later slot like any other.
constexpr uint32_t kKeyNegInf = 0x007fffffu;  // order_key(-inf)
inline uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return kKeyNegInf;
  if (u == 0x80000000u) u = 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// allocate_head_budgets' pinned slots rank as +inf (the reference pins with +inf;
// a +inf score ties with them and the tie goes by slot, then head).
constexpr uint32_t kKeyPinned = 0xff800000u;  // order_key(+inf)

inline uint64_t rank_key(uint32_t key, int64_t slot) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(slot);
}

// Marks the n best candidates (rank keys; the low half is the slot) in `kept`.
inline void keep_best(std::vector<uint64_t>& cand, int64_t n, std::vector<uint8_t>& kept) {
  if (n <= 0) return;
  if (n < static_cast<int64_t>(cand.size()))
    std::nth_element(cand.begin(), cand.begin() + n, cand.end(), std::greater<uint64_t>());
  else
    n = static_cast<int64_t>(cand.size());
  for (int64_t t = 0; t < n; ++t) kept[static_cast<uint32_t>(cand[t])] = 1;
}

// The Pitfalls proportional quotas, literally as the reference (budget < sum(counts)).
inline std::vector<int64_t> segment_quotas(int64_t budget, const std::vector<int64_t>& counts) {
  int64_t total = 0;
  for (int64_t c : counts) total += c;
  std::vector<int64_t> q(counts.size());
  int64_t left = budget;
  for (size_t s = 0; s < counts.size(); ++s) {
    q[s] = budget * counts[s] / total;
    left -= q[s];
  }
  size_t s = counts.size() - 1;
  while (left > 0) {
    if (q[s] < counts[s]) {
      ++q[s];
      --left;
    }
    s = s > 0 ? s - 1 : counts.size() - 1;
  }
  return q;
}

enum class SelectStatus : int {
  kOk = 0,
  kProtected = 1,     // protected slots (need) exceed the budget
  kSegmentQuota = 2,  // segment `segment` has `need` protected slots, quota `budget`
  kMinima = 3,        // protected slots plus minima need `need` slots, budget `budget`
};

struct HeadStatus {
  SelectStatus code = SelectStatus::kOk;
  int64_t segment = 0, need = 0, budget = 0;
};

// One thread's working memory, reused across heads.
struct SelectScratch {
  std::vector<uint8_t> kept;      // [L] protected or chosen
  std::vector<int32_t> seg;       // [L] segment of each slot
  std::vector<int64_t> count;     // [S] valid slots per segment
  std::vector<int64_t> prot;      // [S] protected slots per segment
  std::vector<int64_t> need;      // [S] unprotected slots each segment must add first
  std::vector<uint64_t> cand;
};

inline int64_t head_length(const int32_t* lengths, int64_t sb, int64_t sh, int64_t b, int64_t j) {
  return lengths[b * sb + j * sh];
}

inline int64_t head_budget(const SelectParams& p, int64_t b, int64_t j) {
  return p.budgets ? p.budgets[b * p.budgets_stride_b + j * p.budgets_stride_h] : p.budget;
}

// For a head with L > K: protection and segments of every valid slot, and what
// each stage of the selection must add (s.need per segment, then *fill from any
// segment). Returns why the head is infeasible, if it is; writes nothing shared.
inline HeadStatus plan_head(const SelectParams& p, int64_t b, int64_t j, int64_t L, int64_t K,
                            SelectScratch& s, int64_t* fill) {
  const int64_t S = p.num_segments;
  s.kept.assign(L, 0);
  s.seg.assign(L, 0);
  s.count.assign(S, 0);
  s.prot.assign(S, 0);
  s.need.assign(S, 0);
  const int32_t* pos_row =
      p.positions ? p.positions + b * p.positions_stride_b + j * p.positions_stride_h : nullptr;
  const int32_t* ranges = p.protect_ranges ? p.protect_ranges + b * p.ranges_stride_b : nullptr;
  const bool* km = p.keep_mask ? p.keep_mask + b * p.keep_mask_stride_b + j * p.keep_mask_stride_h
                               : nullptr;
  const int32_t* cuts = p.segment_cuts;
  int64_t total_prot = 0;
  for (int64_t i = 0; i < L; ++i) {
    const int64_t pos = pos_row ? pos_row[i] : i;
    bool pr = i < p.n_sink || i >= L - p.n_recent || (km && km[i]);
    for (int64_t r = 0; !pr && r < p.num_ranges; ++r)
      pr = pos >= ranges[2 * r] && pos < ranges[2 * r + 1];
    // The segment is the number of cuts <= pos (cuts are increasing).
    const int32_t sg =
        cuts ? static_cast<int32_t>(std::upper_bound(cuts, cuts + (S - 1), pos,
                                                     [](int64_t v, int32_t c) { return v < c; }) -
                                    cuts)
             : 0;
    s.kept[i] = pr;
    s.seg[i] = sg;
    ++s.count[sg];
    s.prot[sg] += pr;
    total_prot += pr;
  }
  HeadStatus st;
  if (total_prot > K) {
    st.code = SelectStatus::kProtected;
    st.need = total_prot;
    st.budget = K;
    return st;
  }
  if (cuts && !p.segment_min) {
    const std::vector<int64_t> quota = segment_quotas(K, s.count);
    for (int64_t g = 0; g < S; ++g) {
      if (s.prot[g] > quota[g]) {
        st.code = SelectStatus::kSegmentQuota;
        st.segment = g;
        st.need = s.prot[g];
        st.budget = quota[g];
        return st;
      }
      s.need[g] = quota[g] - s.prot[g];
    }
    *fill = 0;
    return st;
  }
  int64_t total = total_prot;
  if (cuts) {
    for (int64_t g = 0; g < S; ++g) {
      const int64_t want = std::min<int64_t>(p.segment_min[g], s.count[g]);
      s.need[g] = std::max<int64_t>(want - s.prot[g], 0);
      total += s.need[g];
    }
    if (total > K) {
      st.code = SelectStatus::kMinima;
      st.need = total;
      st.budget = K;
      return st;
    }
  }
  *fill = K - total;
  return st;
}

// Feasibility of head (b, j) alone (L <= K is always feasible).
inline HeadStatus check_select_head(const SelectParams& p, int64_t b, int64_t j, SelectScratch& s) {
  const int64_t L = head_length(p.lengths, p.lengths_stride_b, p.lengths_stride_h, b, j);
  const int64_t K = head_budget(p, b, j);
  if (L <= K) return {};
  int64_t fill = 0;
  return plan_head(p, b, j, L, K, s, &fill);
}

// Writes head (b, j)'s keep row (all C slots) and returns its new length. The
// caller has checked feasibility; an infeasible head is kept whole (as on GPU).
inline int64_t select_head(const SelectParams& p, int64_t b, int64_t j, SelectScratch& s) {
  const int64_t C = p.capacity;
  const int64_t L = head_length(p.lengths, p.lengths_stride_b, p.lengths_stride_h, b, j);
  const int64_t K = head_budget(p, b, j);
  bool* keep = p.keep + (b * p.num_kv_heads + j) * C;
  int64_t fill = 0;
  if (L <= K || plan_head(p, b, j, L, K, s, &fill).code != SelectStatus::kOk) {
    for (int64_t i = 0; i < C; ++i) keep[i] = i < L;
    return L;
  }
  const float* sc = p.scores + b * p.scores_stride_b + j * p.scores_stride_h;
  for (int64_t g = 0; g < p.num_segments; ++g) {
    if (s.need[g] <= 0) continue;
    s.cand.clear();
    for (int64_t i = 0; i < L; ++i)
      if (!s.kept[i] && s.seg[i] == g) s.cand.push_back(rank_key(order_key(sc[i]), i));
    keep_best(s.cand, s.need[g], s.kept);
  }
  if (fill > 0) {
    s.cand.clear();
    for (int64_t i = 0; i < L; ++i)
      if (!s.kept[i]) s.cand.push_back(rank_key(order_key(sc[i]), i));
    keep_best(s.cand, fill, s.kept);
  }
  for (int64_t i = 0; i < L; ++i) keep[i] = s.kept[i] != 0;
  for (int64_t i = L; i < C; ++i) keep[i] = false;
  return K;
}

// Moves head (b, j)'s kept valid slots to the front, in order, and sets its
// length. Slot i goes to d <= i, so one forward pass never overwrites a slot it
// has yet to read. k and v rows move as raw bytes (elem_size per element).
inline void compact_head(const CompactParams& p, int64_t elem_size, int64_t b, int64_t j) {
  int32_t& len = p.lengths[b * p.lengths_stride_b + j * p.lengths_stride_h];
  const int64_t L = len;
  const bool* keep = p.keep + b * p.keep_stride_b + j * p.keep_stride_h;
  char* k = static_cast<char*>(p.k) + (b * p.k_stride_b + j * p.k_stride_h) * elem_size;
  char* v = static_cast<char*>(p.v) + (b * p.v_stride_b + j * p.v_stride_h) * elem_size;
  int32_t* pos = p.positions ? p.positions + b * p.positions_stride_b + j * p.positions_stride_h
                             : nullptr;
  float* hist = p.hist ? p.hist + b * p.hist_stride_b + j * p.hist_stride_h : nullptr;
  float* log_w = p.log_w ? p.log_w + b * p.log_w_stride_b + j * p.log_w_stride_h : nullptr;
  const int64_t row_bytes = p.head_dim * elem_size;
  int64_t n = 0;
  for (int64_t i = 0; i < L; ++i) {
    if (!keep[i]) continue;
    if (n != i) {
      std::memmove(k + n * p.k_stride_c * elem_size, k + i * p.k_stride_c * elem_size, row_bytes);
      std::memmove(v + n * p.v_stride_c * elem_size, v + i * p.v_stride_c * elem_size, row_bytes);
      if (pos) pos[n] = pos[i];
      if (hist) hist[n] = hist[i];
      if (log_w) log_w[n] = log_w[i];
    }
    ++n;
  }
  len = static_cast<int32_t>(n);
}

// One entry of the AdaKV global ranking: (rank key, head), compared lexicographically,
// which is the reference's (score, slot, head) order.
using HeadEntry = std::pair<uint64_t, uint32_t>;

struct BudgetScratch {
  std::vector<uint32_t> key;
  std::vector<uint64_t> cand;
  std::vector<uint8_t> safe;
  std::vector<HeadEntry> entries;
};

// Fills out[b, :] for batch element b.
inline void allocate_batch(const HeadBudgetParams& p, int64_t b, BudgetScratch& s) {
  const int64_t H = p.num_kv_heads;
  int64_t total = 0;
  s.entries.clear();
  for (int64_t j = 0; j < H; ++j) {
    const int64_t L = head_length(p.lengths, p.lengths_stride_b, p.lengths_stride_h, b, j);
    total += std::min<int64_t>(p.budget, L);
    const float* sc = p.scores + b * p.scores_stride_b + j * p.scores_stride_h;
    s.key.resize(L);
    for (int64_t i = 0; i < L; ++i) s.key[i] = order_key(sc[i]);
    // The head's own best min(n_safe, L) slots rank as +inf.
    s.safe.assign(L, 0);
    s.cand.clear();
    for (int64_t i = 0; i < L; ++i) s.cand.push_back(rank_key(s.key[i], i));
    keep_best(s.cand, std::min<int64_t>(p.n_safe, L), s.safe);
    for (int64_t i = 0; i < L; ++i) {
      const bool pinned = s.safe[i] || i < p.n_sink || (p.n_recent > 0 && i >= L - p.n_recent);
      s.entries.emplace_back(rank_key(pinned ? kKeyPinned : s.key[i], i),
                             static_cast<uint32_t>(j));
    }
  }
  int32_t* out = p.out + b * H;
  for (int64_t j = 0; j < H; ++j) out[j] = 0;
  int64_t n = std::min<int64_t>(total, static_cast<int64_t>(s.entries.size()));
  if (n <= 0) return;
  if (n < static_cast<int64_t>(s.entries.size()))
    std::nth_element(s.entries.begin(), s.entries.begin() + n, s.entries.end(),
                     std::greater<HeadEntry>());
  for (int64_t t = 0; t < n; ++t) ++out[s.entries[t].second];
}

}  // namespace kvkern::cpu
