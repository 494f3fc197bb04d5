// SPDX-License-Identifier: Apache-2.0
// CPU window_scores, framework-free (kvkern/reference.py window_scores states the math).
//
// The W x C attention matrix of the window queries is never stored. Per kv head
// the G*W rows (query head g, window query t; row r = g*W + t) run in two passes
// over the head's valid slots, in tiles of kTile slots:
//   pass 1 (items: batch, kv head, split of the slots): the logits of every row
//     against the tile, then each row's online max and sum of exps; the splits'
//     partial (max, sum) pairs merge into one log-sum-exp per row;
//   pass 2 (items: batch, kv head, chunk of slots): the same logits again,
//     p = exp(logit - lse), summed over t per query head and reduced over the
//     group straight into out[b, j, slot];
//   finish (items: kv heads): mean_all's sum over every kv head, normalize, pool.
// A tile's logits are one small GEMM, S[slot][row] = k_slot . q_row: the G*W
// rows of a kv head share every K row loaded, and rows run along SIMD lanes, so
// the softmax steps are plain vertical vector ops. bf16 caches use AVX512-BF16
// dot products where the CPU has them (products of bf16 are exact in fp32, so
// the sums equal the fp32 path's up to their order); other caches convert K
// rows to fp32 once per tile.
#pragma once

#include <kvkern/eviction_params.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "float_convert.h"

// Functions doing per-element work are compiled once per x86-64 level and
// picked at load time; their helpers are always inlined so they take the ISA
// of the clone they land in. KVKERN_CPU_NO_MULTIVERSION (a test hook) builds
// for the compiler's target only (e.g. -march=x86-64-v3 checks the AVX2 paths).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVKERN_WS_HAVE_AVX512BF16 1  // the AVX512-BF16 GEMM exists (run only where the CPU has it)
#if defined(__linux__) && !defined(KVKERN_CPU_NO_MULTIVERSION)
#define KVKERN_WS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define KVKERN_WS_RUNTIME_ISA 1
#endif
#endif
#ifndef KVKERN_WS_MULTIVERSION
#define KVKERN_WS_MULTIVERSION
#endif
#define KVKERN_WS_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only live inside inlined helpers
#endif

namespace kvkern::cpu::window {

// Rows are padded to multiples of 16 fp32 lanes (one AVX-512 register). Each
// vector step is a template over the vector type and runs with the type that
// fills one register of the clone's ISA: 16 lanes (AVX-512), 8 (AVX2), 4
// (baseline). A wider GCC vector than the ISA's registers compiles to spills.
constexpr int kLanes = 16;
constexpr int64_t kTile = 64;  // slots per tile: the S tile is kTile x (rows padded to 16)

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef int32_t vi4 __attribute__((vector_size(16)));

// Loads, stores and broadcasts of vector type V (unaligned; int lanes VecOps<V>::I).
template <typename V>
struct VecOps;
#define KVKERN_WS_VEC_OPS(VF, VI)                                                                        \
  template <>                                                                                          \
  struct VecOps<VF> {                                                                                  \
    static constexpr int kN = sizeof(VF) / sizeof(float);                                              \
    using I = VI;                                                                                      \
    static KVKERN_WS_INLINE VF load(const float* p) { VF v; std::memcpy(&v, p, sizeof(v)); return v; } \
    static KVKERN_WS_INLINE void store(float* p, VF v) { std::memcpy(p, &v, sizeof(v)); }              \
    static KVKERN_WS_INLINE VI iload(const int32_t* p) { VI v; std::memcpy(&v, p, sizeof(v)); return v; } \
    static KVKERN_WS_INLINE void istore(int32_t* p, VI v) { std::memcpy(p, &v, sizeof(v)); }          \
    /* A shuffle of lane 0 is one broadcast (VF{} + x adds +0, not a no-op for -0; */                  \
    /* an initializer list is built lane by lane). */                                                  \
    static KVKERN_WS_INLINE VF splat(float x) { return __builtin_shuffle(VF{x}, VI{}); }               \
    static KVKERN_WS_INLINE VI isplat(int32_t x) { return __builtin_shuffle(VI{x}, VI{}); }            \
  };
KVKERN_WS_VEC_OPS(vf, vi)
KVKERN_WS_VEC_OPS(vf8, vi8)
KVKERN_WS_VEC_OPS(vf4, vi4)
#undef KVKERN_WS_VEC_OPS

template <typename V>
KVKERN_WS_INLINE V vmax(V a, V b) { return a > b ? a : b; }

// exp for fp32 lanes: Cody-Waite range reduction and cephes' degree-6
// polynomial (about 1 ulp). Inputs below -87.3 (including -inf) give 0; NaN
// stays NaN. libm's expf does not vectorize without -ffast-math.
template <typename V>
KVKERN_WS_INLINE V vexp(V x) {
  using O = VecOps<V>;
  using I = typename O::I;
  const V lo = O::splat(-87.33654f), hi = O::splat(88.37626f);
  const I under = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = O::splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V t = x * O::splat(1.44269504088896341f) + magic;
  const V n = t - magic;
  const I ni = (I)t - O::isplat(0x4B400000);  // vector casts reinterpret the bits
  V r = x - n * O::splat(0.693359375f);
  r = r - n * O::splat(-2.12194440e-4f);
  const V z = r * r;
  V y = O::splat(1.9875691500e-4f);
  y = y * r + O::splat(1.3981999507e-3f);
  y = y * r + O::splat(8.3334519073e-3f);
  y = y * r + O::splat(4.1665795894e-2f);
  y = y * r + O::splat(1.6666665459e-1f);
  y = y * r + O::splat(5.0000001201e-1f);
  y = y * z + r + O::splat(1.0f);
  const I e = (ni + O::isplat(127)) << 23;
  y = y * (V)e;
  return under ? V{} : y;
}

// 0: baseline, 1: AVX2 + FMA, 2: AVX-512 (the clone that runs has at least this).
KVKERN_WS_INLINE int cpu_simd_level() {
#if defined(KVKERN_WS_RUNTIME_ISA)
  static const int level = __builtin_cpu_supports("avx512f")                                   ? 2
                           : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1
                                                                                              : 0;
  return level;
#elif defined(__AVX512F__)
  return 2;
#elif defined(__AVX2__) && defined(__FMA__)
  return 1;
#else
  return 0;
#endif
}

// Calls F::template run<V>(args...) with the vector type of the CPU's level.
template <typename F, typename... Args>
KVKERN_WS_INLINE void with_simd(Args&&... args) {
  switch (cpu_simd_level()) {
    case 2: F::template run<vf>(args...); break;
    case 1: F::template run<vf8>(args...); break;
    default: F::template run<vf4>(args...); break;
  }
}

// Sum of n floats with 8 independent partial sums (vectorizes without reassociation flags).
KVKERN_WS_INLINE float sum_floats(const float* x, int64_t n) {
  float part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) part[l] += x[i + l];
  float s = 0.f;
  for (; i < n; ++i) s += x[i];
  for (int l = 0; l < 8; ++l) s += part[l];
  return s;
}

// ---------------------------------------------------------------------------
// The tile GEMM: S[s][r] = sum_d K[s][d] * QT[d][r] for slots s < n and rows
// r < Rp (a multiple of 16). QT is the row operand transposed ([D][ldq]), K the
// slot rows (fp32, row stride ldk), S has row stride lds.

// SB slots x NV vectors V of rows per block, accumulators in registers.
template <typename V, int SB, int NV>
KVKERN_WS_INLINE void gemm_block(const float* QT, int64_t ldq, const float* K, int64_t ldk, int64_t D,
                                 float* S, int64_t lds) {
  using O = VecOps<V>;
  V acc[SB][NV];
#pragma GCC unroll 8
  for (int s = 0; s < SB; ++s)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[s][v] = V{};
  for (int64_t d = 0; d < D; ++d) {
    V a[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) a[v] = O::load(QT + d * ldq + v * O::kN);
#pragma GCC unroll 8
    for (int s = 0; s < SB; ++s) {
      const V kb = O::splat(K[s * ldk + d]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[s][v] += kb * a[v];
    }
  }
#pragma GCC unroll 8
  for (int s = 0; s < SB; ++s)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) O::store(S + s * lds + v * O::kN, acc[s][v]);
}

// Rows [0, Rp) (Rp a multiple of 16) in blocks of 32 then 16 (AVX-512), or of 16.
template <typename V, int SB>
KVKERN_WS_INLINE void gemm_slots(const float* QT, int64_t ldq, int64_t Rp, const float* K, int64_t ldk,
                                 int64_t D, float* S, int64_t lds) {
  constexpr int kPer16 = kLanes / VecOps<V>::kN;
  int64_t r = 0;
  if constexpr (kPer16 == 1)
    for (; r + 2 * kLanes <= Rp; r += 2 * kLanes) gemm_block<V, SB, 2>(QT + r, ldq, K, ldk, D, S + r, lds);
  for (; r < Rp; r += kLanes) gemm_block<V, SB, kPer16>(QT + r, ldq, K, ldk, D, S + r, lds);
}

template <typename V, int SB>
KVKERN_WS_INLINE void gemm_tile_with(const float* QT, int64_t ldq, int64_t Rp, const float* K, int64_t ldk,
                                     int64_t n, int64_t D, float* S, int64_t lds) {
  int64_t s = 0;
  for (; s + SB <= n; s += SB) gemm_slots<V, SB>(QT, ldq, Rp, K + s * ldk, ldk, D, S + s * lds, lds);
  for (; s < n; ++s) gemm_slots<V, 1>(QT, ldq, Rp, K + s * ldk, ldk, D, S + s * lds, lds);
}

// Accumulators per ISA: AVX-512 8 slots x 2 zmm (16 of 32 registers); AVX2
// 4 slots x 2 ymm (8 of 16); baseline 2 slots x 4 xmm (8 of 16).
KVKERN_WS_MULTIVERSION inline void gemm_tile_f32(const float* QT, int64_t ldq, int64_t Rp, const float* K,
                                                 int64_t ldk, int64_t n, int64_t D, float* S, int64_t lds) {
  switch (cpu_simd_level()) {
    case 2: gemm_tile_with<vf, 8>(QT, ldq, Rp, K, ldk, n, D, S, lds); break;
    case 1: gemm_tile_with<vf8, 4>(QT, ldq, Rp, K, ldk, n, D, S, lds); break;
    default: gemm_tile_with<vf4, 2>(QT, ldq, Rp, K, ldk, n, D, S, lds); break;
  }
}

#if defined(KVKERN_WS_HAVE_AVX512BF16)
#define KVKERN_WS_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// bf16 row operand in pairs: QV[dd][r] holds (q[r][2dd], q[r][2dd+1]); K rows are
// bf16 with an even D, read in place as pairs.
template <int SB, int NV>
KVKERN_WS_BF16_TARGET inline void gemm_block_bf16(const uint32_t* QV, int64_t ldq, const uint16_t* K, int64_t ldk,
                                                  int64_t D2, float* S, int64_t lds) {
  __m512 acc[SB][NV];
  for (int s = 0; s < SB; ++s)
    for (int v = 0; v < NV; ++v) acc[s][v] = _mm512_setzero_ps();
  for (int64_t dd = 0; dd < D2; ++dd) {
    __m512i a[NV];
    for (int v = 0; v < NV; ++v) a[v] = _mm512_loadu_si512(QV + dd * ldq + v * kLanes);
    for (int s = 0; s < SB; ++s) {
      int32_t pair;
      std::memcpy(&pair, K + s * ldk + 2 * dd, sizeof(pair));
      const __m512i kb = _mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[s][v] = _mm512_dpbf16_ps(acc[s][v], (__m512bh)a[v], (__m512bh)kb);
    }
  }
  for (int s = 0; s < SB; ++s)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(S + s * lds + v * kLanes, acc[s][v]);
}

template <int SB>
KVKERN_WS_BF16_TARGET inline void gemm_slots_bf16(const uint32_t* QV, int64_t ldq, int64_t Rp, const uint16_t* K,
                                                  int64_t ldk, int64_t D2, float* S, int64_t lds) {
  int64_t r = 0;
  for (; r + 2 * kLanes <= Rp; r += 2 * kLanes) gemm_block_bf16<SB, 2>(QV + r, ldq, K, ldk, D2, S + r, lds);
  if (r < Rp) gemm_block_bf16<SB, 1>(QV + r, ldq, K, ldk, D2, S + r, lds);
}

KVKERN_WS_BF16_TARGET inline void gemm_tile_bf16(const uint32_t* QV, int64_t ldq, int64_t Rp, const uint16_t* K,
                                                 int64_t ldk, int64_t n, int64_t D2, float* S, int64_t lds) {
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) gemm_slots_bf16<8>(QV, ldq, Rp, K + s * ldk, ldk, D2, S + s * lds, lds);
  for (; s < n; ++s) gemm_slots_bf16<1>(QV, ldq, Rp, K + s * ldk, ldk, D2, S + s * lds, lds);
}
#endif

inline bool cpu_has_avx512bf16() {
#if defined(KVKERN_WS_HAVE_AVX512BF16) && (defined(KVKERN_WS_RUNTIME_ISA) || defined(__AVX512BF16__))
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return yes;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------
// Row operands and K tiles by cache type.

template <typename T>
inline float* row_to_float(const T* row, float* buf, int64_t d) {
  for (int64_t i = 0; i < d; ++i) buf[i] = to_float(row[i]);
  return buf;
}
inline float* row_to_float(const Half* row, float* buf, int64_t d) {
  if (!halves_to_floats_native(reinterpret_cast<const uint16_t*>(row), buf, d))
    for (int64_t i = 0; i < d; ++i) buf[i] = to_float(row[i]);
  return buf;
}

// How one work item computes S tiles: owns the transposed row operand and the
// K conversion buffer. `native_bf16` uses the AVX512-BF16 path (T = BFloat16, even D).
template <typename T>
struct TileGemm {
  int64_t D = 0, Rp = 0;
  bool native_bf16 = false;
  std::vector<float> qt;      // [D][Rp] fp32
  std::vector<uint32_t> qv;   // [D/2][Rp] bf16 pairs
  std::vector<float> kbuf;    // [kTile][D] fp32 (16-bit caches on the fp32 path)
  std::vector<float> rowbuf;  // [D]

  TileGemm(int64_t d, int64_t rp) : D(d), Rp(rp) {
    native_bf16 = std::is_same_v<T, BFloat16> && D % 2 == 0 && cpu_has_avx512bf16();
    if (native_bf16) {
      qv.assign((D / 2) * Rp, 0u);
    } else {
      qt.assign(D * Rp, 0.f);
      if (!std::is_same_v<T, float>) kbuf.resize(kTile * D);
    }
    rowbuf.resize(D);
  }

  // Row r of the operand (r < Rp); rows never set stay 0.
  void set_row(int64_t r, const T* src) {
    if (native_bf16) {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
      for (int64_t dd = 0; dd < D / 2; ++dd)
        qv[dd * Rp + r] = static_cast<uint32_t>(s[2 * dd]) | (static_cast<uint32_t>(s[2 * dd + 1]) << 16);
    } else {
      const float* f;
      if constexpr (std::is_same_v<T, float>) {
        f = src;
      } else {
        f = row_to_float(src, rowbuf.data(), D);
      }
      for (int64_t d = 0; d < D; ++d) qt[d * Rp + r] = f[d];
    }
  }

  void zero_row(int64_t r) {
    if (native_bf16) {
      for (int64_t dd = 0; dd < D / 2; ++dd) qv[dd * Rp + r] = 0u;
    } else {
      for (int64_t d = 0; d < D; ++d) qt[d * Rp + r] = 0.f;
    }
  }

  // S[s][r] for the n <= kTile slot rows starting at k (row stride ldk elements).
  void tile(const T* k, int64_t ldk, int64_t n, float* S) {
#if defined(KVKERN_WS_HAVE_AVX512BF16)
    if (native_bf16) {
      gemm_tile_bf16(qv.data(), Rp, Rp, reinterpret_cast<const uint16_t*>(k), ldk, n, D / 2, S, Rp);
      return;
    }
#endif
    if constexpr (std::is_same_v<T, float>) {
      gemm_tile_f32(qt.data(), Rp, Rp, k, ldk, n, D, S, Rp);
    } else {
      for (int64_t s = 0; s < n; ++s) row_to_float(k + s * ldk, kbuf.data() + s * D, D);
      gemm_tile_f32(qt.data(), Rp, Rp, kbuf.data(), D, n, D, S, Rp);
    }
  }
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------
// Vector steps on an S tile [n][Rp] (rows along lanes).

// Scales the logits and hides slot (t0 + s) from rows whose window query comes
// before it: row r sees slot i iff i <= L - W + t_of[r] (rows >= R have a huge t).
struct ScaleAndMask {
  template <typename V>
  static KVKERN_WS_INLINE void run(float* S, int64_t n, int64_t Rp, float scale, int64_t first_slot,
                                   int64_t causal_from, const int32_t* t_of) {
    using O = VecOps<V>;
    const V sc = O::splat(scale), ninf = O::splat(-std::numeric_limits<float>::infinity());
    for (int64_t s = 0; s < n; ++s) {
      float* row = S + s * Rp;
      const int64_t u = first_slot + s - causal_from;  // rows with t < u are masked
      if (u <= 0) {
        for (int64_t r = 0; r < Rp; r += O::kN) O::store(row + r, O::load(row + r) * sc);
      } else {
        const auto uu = O::isplat(static_cast<int32_t>(std::min<int64_t>(u, std::numeric_limits<int32_t>::max())));
        for (int64_t r = 0; r < Rp; r += O::kN) {
          const V x = O::load(row + r) * sc;
          O::store(row + r, O::iload(t_of + r) < uu ? ninf : x);
        }
      }
    }
  }
};
KVKERN_WS_MULTIVERSION inline void scale_and_mask(float* S, int64_t n, int64_t Rp, float scale, int64_t first_slot,
                                                  int64_t causal_from, const int32_t* t_of) {
  with_simd<ScaleAndMask>(S, n, Rp, scale, first_slot, causal_from, t_of);
}

// Online max / sum-of-exp update of rows [0, Rp) with one tile.
struct OnlineLse {
  template <typename V>
  static KVKERN_WS_INLINE void run(const float* S, int64_t n, int64_t Rp, float* m, float* l) {
    using O = VecOps<V>;
    const V ninf = O::splat(-std::numeric_limits<float>::infinity());
    for (int64_t r = 0; r < Rp; r += O::kN) {
      const V m_old = O::load(m + r);
      V tmax = ninf;
      for (int64_t s = 0; s < n; ++s) tmax = vmax(tmax, O::load(S + s * Rp + r));
      const V m_new = vmax(m_old, tmax);
      const V ref = m_new == ninf ? V{} : m_new;  // all -inf so far: exp(-inf - 0) = 0, not NaN
      V sum = V{};
      for (int64_t s = 0; s < n; ++s) sum += vexp(O::load(S + s * Rp + r) - ref);
      O::store(l + r, O::load(l + r) * vexp(m_old - ref) + sum);
      O::store(m + r, m_new);
    }
  }
};
KVKERN_WS_MULTIVERSION inline void online_lse(const float* S, int64_t n, int64_t Rp, float* m, float* l) {
  with_simd<OnlineLse>(S, n, Rp, m, l);
}

// p = exp(S - lse) in place (lse = +inf for rows without a visible slot).
struct Probs {
  template <typename V>
  static KVKERN_WS_INLINE void run(float* S, int64_t n, int64_t Rp, const float* lse) {
    using O = VecOps<V>;
    for (int64_t s = 0; s < n; ++s)
      for (int64_t r = 0; r < Rp; r += O::kN)
        O::store(S + s * Rp + r, vexp(O::load(S + s * Rp + r) - O::load(lse + r)));
  }
};
KVKERN_WS_MULTIVERSION inline void probs(float* S, int64_t n, int64_t Rp, const float* lse) {
  with_simd<Probs>(S, n, Rp, lse);
}

// ---------------------------------------------------------------------------
// Pass 1 and pass 2 work items.

// Slots [begin, end) of a head of `len` valid slots for split s of S (whole tiles).
inline void split_slots(int64_t len, int64_t s, int64_t S, int64_t* begin, int64_t* end) {
  int64_t chunk = round_up((len + S - 1) / S, kTile);
  *begin = std::min(s * chunk, len);
  *end = std::min((s + 1) * chunk, len);
}

inline int64_t padded_rows(const WindowScoresParams& p) { return round_up(p.group_size() * p.window, kLanes); }

template <typename T>
void load_rows(const WindowScoresParams& p, int64_t b, int64_t j, TileGemm<T>& gm, std::vector<int32_t>& t_of) {
  const int64_t G = p.group_size(), W = p.window, R = G * W;
  const T* q = static_cast<const T*>(p.q_win);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < W; ++t)
      gm.set_row(g * W + t, q + b * p.q_stride_b + (j * G + g) * p.q_stride_h + t * p.q_stride_t);
  for (int64_t r = 0; r < static_cast<int64_t>(t_of.size()); ++r)
    t_of[r] = r < R ? static_cast<int32_t>(r % W) : std::numeric_limits<int32_t>::max();
}

// Pass 1 over items [begin, end) of the (b, j, split) grid: partial row max and
// sum of exps into pm / pl, [B * Hkv][S][R].
template <typename T>
void window_pass1_items(const WindowScoresParams& p, int64_t num_splits, float* pm, float* pl, int64_t begin,
                        int64_t end) {
  const int64_t R = p.group_size() * p.window, Rp = padded_rows(p), D = p.head_dim;
  TileGemm<T> gm(D, Rp);
  std::vector<int32_t> t_of(Rp);
  std::vector<float> S(kTile * Rp), m(Rp), l(Rp);
  const T* k_base = static_cast<const T*>(p.k);
  int64_t loaded = -1;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t s = item % num_splits, bj = item / num_splits;
    const int64_t j = bj % p.num_kv_heads, b = bj / p.num_kv_heads;
    const int64_t len = p.lengths[b * p.lengths_stride_b + j * p.lengths_stride_h];
    int64_t lo, hi;
    split_slots(len, s, num_splits, &lo, &hi);
    std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
    std::fill(l.begin(), l.end(), 0.f);
    if (lo < hi && loaded != bj) {
      load_rows(p, b, j, gm, t_of);
      loaded = bj;
    }
    const T* k_head = k_base + b * p.k_stride_b + j * p.k_stride_h;
    for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
      const int64_t n = std::min(kTile, hi - t0);
      gm.tile(k_head + t0 * p.k_stride_c, p.k_stride_c, n, S.data());
      scale_and_mask(S.data(), n, Rp, p.sm_scale, t0, len - p.window, t_of.data());
      online_lse(S.data(), n, Rp, m.data(), l.data());
    }
    std::memcpy(pm + (bj * num_splits + s) * R, m.data(), R * sizeof(float));
    std::memcpy(pl + (bj * num_splits + s) * R, l.data(), R * sizeof(float));
  }
}

// Pass 2 over items [begin, end) of the (b, j, chunk) grid: writes the group-
// reduced scores of slots [chunk * chunk_size, ...) into out (0 past lengths).
// mean_all writes each kv head's share (its heads' sum / Hq); finish adds them.
template <typename T>
void window_pass2_items(const WindowScoresParams& p, int64_t num_splits, const float* pm, const float* pl,
                        int64_t chunk_size, int64_t begin, int64_t end) {
  const int64_t G = p.group_size(), W = p.window, R = G * W, Rp = padded_rows(p), D = p.head_dim, C = p.capacity;
  const int64_t num_chunks = (C + chunk_size - 1) / chunk_size;
  const float inf = std::numeric_limits<float>::infinity();
  TileGemm<T> gm(D, Rp);
  std::vector<int32_t> t_of(Rp);
  std::vector<float> S(kTile * Rp), lse(Rp, inf);
  const T* k_base = static_cast<const T*>(p.k);
  const bool group_max = p.group_reduce == GroupReduce::kMax;
  const bool query_max = p.group_reduce == GroupReduce::kMaxPerQuery;
  float factor = p.query_reduce == QueryReduce::kMean ? 1.f / static_cast<float>(W) : 1.f;
  if (p.group_reduce == GroupReduce::kMean) factor /= static_cast<float>(G);
  if (p.group_reduce == GroupReduce::kMeanAll) factor /= static_cast<float>(p.num_q_heads);
  int64_t loaded = -1;

  for (int64_t item = begin; item < end; ++item) {
    const int64_t c = item % num_chunks, bj = item / num_chunks;
    const int64_t j = bj % p.num_kv_heads, b = bj / p.num_kv_heads;
    const int64_t len = p.lengths[b * p.lengths_stride_b + j * p.lengths_stride_h];
    const int64_t c0 = c * chunk_size, c1 = std::min(C, c0 + chunk_size);
    float* out = p.out + bj * C;
    const int64_t hi = std::min(c1, len);
    for (int64_t i = std::max(c0, hi); i < c1; ++i) out[i] = 0.f;
    if (c0 >= hi) continue;

    if (loaded != bj) {
      load_rows(p, b, j, gm, t_of);
      for (int64_t r = 0; r < R; ++r) {  // merge the splits' (max, sum) pairs
        const float* ms = pm + bj * num_splits * R + r;
        const float* ls = pl + bj * num_splits * R + r;
        float mx = -inf;
        for (int64_t s = 0; s < num_splits; ++s) mx = std::max(mx, ms[s * R]);
        float sum = 0.f;
        if (mx != -inf)
          for (int64_t s = 0; s < num_splits; ++s) sum += ls[s * R] * std::exp(ms[s * R] - mx);
        lse[r] = sum > 0.f ? mx + std::log(sum) : inf;
      }
      loaded = bj;
    }
    const T* k_head = k_base + b * p.k_stride_b + j * p.k_stride_h;
    for (int64_t t0 = c0; t0 < hi; t0 += kTile) {
      const int64_t n = std::min(kTile, hi - t0);
      gm.tile(k_head + t0 * p.k_stride_c, p.k_stride_c, n, S.data());
      scale_and_mask(S.data(), n, Rp, p.sm_scale, t0, len - W, t_of.data());
      probs(S.data(), n, Rp, lse.data());
      for (int64_t s = 0; s < n; ++s) {
        const float* ps = S.data() + s * Rp;
        float v;
        if (group_max) {
          v = 0.f;  // probabilities are >= 0
          for (int64_t g = 0; g < G; ++g) v = std::max(v, sum_floats(ps + g * W, W));
        } else if (query_max) {
          v = 0.f;
          for (int64_t t = 0; t < W; ++t) {
            float mx = 0.f;
            for (int64_t g = 0; g < G; ++g) mx = std::max(mx, ps[g * W + t]);
            v += mx;
          }
        } else {
          v = sum_floats(ps, R);
        }
        out[t0 + s] = v * factor;
      }
    }
  }
}

// mean_all: comb[b][i] = sum over kv heads of their shares, for flat (b, i) in [begin, end).
inline void window_combine_mean_all(const WindowScoresParams& p, float* comb, int64_t begin, int64_t end) {
  const int64_t C = p.capacity;
  for (int64_t x = begin; x < end; ++x) {
    const int64_t b = x / C, i = x % C;
    float s = 0.f;
    for (int64_t j = 0; j < p.num_kv_heads; ++j) s += p.out[(b * p.num_kv_heads + j) * C + i];
    comb[x] = s;
  }
}

// Scratch of pool_candidates, reused across calls.
struct PoolScratch {
  std::vector<double> prefix;
  std::vector<int64_t> deque;
};

// out[i] for i < M: the pool of in over [i - kernel/2, i + kernel/2] inside [0, M)
// (kvkern.reference.pool_scores): avg = the in-region sum / kernel (padding counts
// as 0), max = the in-region max. Pool::kNone or kernel 1 copies. No overlap of in and out.
inline void pool_candidates(const float* in, float* out, int64_t M, Pool pool, int64_t kernel, PoolScratch& scratch) {
  const int64_t reach = pool == Pool::kNone ? 0 : std::min(kernel / 2, M);  // padding past the region adds nothing
  if (reach == 0) {
    std::copy(in, in + M, out);
    return;
  }
  if (pool == Pool::kAvg) {
    // Prefix sums in double: the differences of nearby prefixes stay exact to fp32.
    std::vector<double>& prefix = scratch.prefix;
    prefix.assign(M + 1, 0.0);
    for (int64_t i = 0; i < M; ++i) prefix[i + 1] = prefix[i] + in[i];
    const double inv_k = 1.0 / static_cast<double>(kernel);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t a = std::max<int64_t>(0, i - reach), z = std::min(M, i + reach + 1);
      out[i] = static_cast<float>((prefix[z] - prefix[a]) * inv_k);
    }
    return;
  }
  // Windows [i - r, i + r] slide right by one: a deque of slot indices with decreasing values.
  std::vector<int64_t>& dq = scratch.deque;
  dq.assign(M, 0);
  int64_t head = 0, tail = 0, next = 0;
  for (int64_t i = 0; i < M; ++i) {
    for (const int64_t z = std::min(M, i + reach + 1); next < z; ++next) {
      while (tail > head && !(in[dq[tail - 1]] > in[next])) --tail;
      dq[tail++] = next;
    }
    while (dq[head] < i - reach) ++head;
    out[i] = in[dq[head]];
  }
}

// Normalize and pool the heads [begin, end) of the (b, j) grid, in place in out
// (or from comb for mean_all). Pooling covers the candidate slots [0, M).
inline void window_finish_heads(const WindowScoresParams& p, const float* comb, int64_t begin, int64_t end) {
  const int64_t C = p.capacity, W = p.window;
  std::vector<float> row(C);
  PoolScratch scratch;
  for (int64_t bj = begin; bj < end; ++bj) {
    const int64_t b = bj / p.num_kv_heads, j = bj % p.num_kv_heads;
    const int64_t len = p.lengths[b * p.lengths_stride_b + j * p.lengths_stride_h];
    const int64_t M = std::max<int64_t>(len - W, 0);
    float* out = p.out + bj * C;
    const float* src = p.group_reduce == GroupReduce::kMeanAll ? comb + b * C : out;
    for (int64_t i = 0; i < C; ++i) row[i] = i < len ? src[i] : 0.f;
    if (p.normalize && M > 0) {
      const float top = *std::max_element(row.begin(), row.begin() + M);
      if (top > 0.f)
        for (int64_t i = 0; i < M; ++i) row[i] /= top;
    }
    std::copy(row.begin() + M, row.end(), out + M);
    pool_candidates(row.data(), out, M, p.pool, p.pool_kernel, scratch);
  }
}

// Pass 1 splits each head's slots when there are fewer heads than twice the
// threads, keeping at least four tiles per split.
inline int64_t pass1_splits(int64_t heads, int64_t capacity, int64_t threads) {
  if (heads == 0 || heads >= 2 * threads) return 1;
  const int64_t want = (2 * threads + heads - 1) / heads;
  const int64_t most = std::max<int64_t>(1, capacity / (4 * kTile));
  return std::min(want, most);
}

// Pass 2 chunks: whole tiles, at most 16 per chunk, and enough chunks for four
// items per thread.
inline int64_t pass2_chunk(int64_t heads, int64_t capacity, int64_t threads) {
  const int64_t per_head = std::max<int64_t>(1, (4 * threads + heads - 1) / std::max<int64_t>(heads, 1));
  const int64_t chunk = round_up((capacity + per_head - 1) / per_head, kTile);
  return std::clamp<int64_t>(chunk, kTile, 16 * kTile);
}

// The whole op (p.out set, lengths in [0, C]). `parallel_for(begin, end, grain, fn)`
// runs fn(b, e) over chunks [b, e) of [begin, end) on `threads` threads.
template <typename T, typename ParallelFor>
void window_scores_run(const WindowScoresParams& p, int64_t threads, ParallelFor&& parallel_for) {
  const int64_t heads = p.batch * p.num_kv_heads, C = p.capacity, R = p.group_size() * p.window;
  if (heads * C == 0) return;
  const int64_t splits = pass1_splits(heads, C, threads);
  std::vector<float> pm(heads * splits * R), pl(heads * splits * R);
  parallel_for(0, heads * splits, 1, [&](int64_t begin, int64_t end) {
    window_pass1_items<T>(p, splits, pm.data(), pl.data(), begin, end);
  });
  const int64_t chunk = pass2_chunk(heads, C, threads);
  const int64_t chunks = (C + chunk - 1) / chunk;
  parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    window_pass2_items<T>(p, splits, pm.data(), pl.data(), chunk, begin, end);
  });

  const bool mean_all = p.group_reduce == GroupReduce::kMeanAll;
  const bool pooled = p.pool != Pool::kNone && p.pool_kernel > 1;
  if (!mean_all && !pooled && !p.normalize) return;
  std::vector<float> comb;
  if (mean_all) {
    comb.resize(p.batch * C);
    parallel_for(0, p.batch * C, 4096, [&](int64_t begin, int64_t end) {
      window_combine_mean_all(p, comb.data(), begin, end);
    });
  }
  parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) { window_finish_heads(p, comb.data(), begin, end); });
}

}  // namespace kvkern::cpu::window

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
