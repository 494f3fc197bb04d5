// SPDX-License-Identifier: Apache-2.0
// Framework-free fp16 / bf16 <-> fp32 conversion for the CPU kernels. Branchless
// where it matters so the compiler can vectorize whole-row conversions.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define KVKERN_HAVE_F16C_PATH 1
#endif

namespace kvkern::cpu {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float to_float(float x) { return x; }

inline float to_float(BFloat16 x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

// Shifts exponent and mantissa into fp32 position, then rebiases (15 -> 127) with
// one multiply by 2^112, which also normalizes subnormals exactly; inf/NaN keep
// an all-ones exponent.
inline float to_float(Half x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t em = x.bits & 0x7fffu;
  const float finite = bits_to_float(em << 13) * 0x1p112f;
  const float special = bits_to_float((em << 13) | 0x7f800000u);
  const float mag = em >= 0x7c00u ? special : finite;
  return bits_to_float(float_to_bits(mag) | sign);
}

template <typename T>
T from_float(float x);

template <>
inline float from_float<float>(float x) { return x; }

// Round to nearest even; NaN stays a (quiet) NaN.
template <>
inline BFloat16 from_float<BFloat16>(float x) {
  const uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(rounded >> 16)};
}

// Round to nearest even, with overflow to inf and gradual underflow.
template <>
inline Half from_float<Half>(float x) {
  const uint32_t u = float_to_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (abs >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    // Scale so the subnormal step 2^-24 becomes 1, then round to nearest even in fp32.
    const float scaled = bits_to_float(abs) * 0x1p24f;
    const float r = scaled + 0x1p23f;  // fp32 add rounds to nearest even at integer precision
    const uint32_t mant = float_to_bits(r) - float_to_bits(0x1p23f);
    return Half{static_cast<uint16_t>(sign | mant)};
  }
  const uint32_t rebased = abs - ((127u - 15u) << 23);  // rebias the exponent
  const uint32_t rounded = rebased + 0xfffu + ((rebased >> 13) & 1u);
  return Half{static_cast<uint16_t>(sign | (rounded >> 13))};
}

#ifdef KVKERN_HAVE_F16C_PATH
__attribute__((target("avx,f16c"))) inline void halves_to_floats_f16c(const uint16_t* src, float* dst,
                                                                     int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = to_float(Half{src[i]});
}
#endif

// Converts n fp16 values with the CPU's own instruction (exact, like the
// portable path) and returns true, or returns false where there is none.
inline bool halves_to_floats_native(const uint16_t* src, float* dst, int64_t n) {
#ifdef KVKERN_HAVE_F16C_PATH
  static const bool has_f16c = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
  if (has_f16c) {
    halves_to_floats_f16c(src, dst, n);
    return true;
  }
#endif
  (void)src, (void)dst, (void)n;
  return false;
}

}  // namespace kvkern::cpu
