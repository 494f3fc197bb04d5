// SPDX-License-Identifier: Apache-2.0
// Framework-free fp32 <-> fp8 e4m3fn conversion (the OCP "E4M3FN" format torch
// calls float8_e4m3fn: bias 7, no infinities, 0x7F / 0xFF the only NaNs, largest
// finite 448, subnormal step 2^-9), by bit manipulation so it is exact on every
// CPU and equals torch's own cast (kvkern/reference.py "FP8 KV").
#pragma once

#include <cstdint>
#include <cstring>

namespace kvkern::cpu {

constexpr float kFp8Max = 448.0f;

// Exact. Normal codes rebias the exponent straight into fp32 bits (e + 120);
// subnormals are m * 2^-9 (small integers times a power of two, exact too).
inline float fp8_e4m3_to_float(uint8_t c) {
  const uint32_t sign = static_cast<uint32_t>(c & 0x80u) << 24;
  const uint32_t em = c & 0x7fu;
  float mag;
  if (em == 0x7fu) {
    const uint32_t qnan = 0x7fc00000u;
    std::memcpy(&mag, &qnan, 4);
  } else if (em < 0x08u) {
    mag = static_cast<float>(em) * 0x1p-9f;
  } else {
    const uint32_t u = (em + (120u << 3)) << 20;
    std::memcpy(&mag, &u, 4);
  }
  uint32_t u;
  std::memcpy(&u, &mag, 4);
  u |= sign;
  std::memcpy(&mag, &u, 4);
  return mag;
}

// Round to nearest even, saturating: |y| > 448 (inf included) becomes +-448,
// NaN becomes the NaN code with y's sign.
inline uint8_t float_to_fp8_e4m3(float y) {
  uint32_t u;
  std::memcpy(&u, &y, 4);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint8_t>(sign | 0x7fu);
  if (a >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // >= 448 (inf too)
  if (a >= 0x3c800000u) {  // >= 2^-6: normal, keep 3 of 23 mantissa bits, ties to even
    a += 0x7ffffu + ((a >> 20) & 1u);
    // The carry may bump the exponent (correct) but never past 448: 448 is the
    // largest value below 0x43e00000 that rounds up to it.
    return static_cast<uint8_t>(sign | ((a >> 20) - (120u << 3)));
  }
  // Subnormal (or zero): the code is |y| / 2^-9 rounded to an integer in [0, 8],
  // 8 being the smallest normal 0x08. Done on the integer significand so the
  // rounding is exact whatever |y| is (fp32 subnormals included).
  const uint32_t e = a >> 23;
  if (e < 100u) return sign;  // |y| < 2^-27: far below half a step
  const uint32_t mant = (a & 0x7fffffu) | (e ? 0x800000u : 0u);
  const uint32_t shift = (e ? 141u - e : 140u);  // |y| * 2^9 = mant * 2^(e - 141)
  if (shift >= 32u) return sign;
  uint32_t q = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
  return static_cast<uint8_t>(sign | q);
}

// The kvkern quantizer: fp32 x / scale (one correctly rounded division), then
// the saturating round above.
inline uint8_t fp8_e4m3_quantize(float x, float scale) { return float_to_fp8_e4m3(x / scale); }

// All 256 codes decoded once (exact): the attention kernels' row decode.
struct Fp8DecodeTable {
  float v[256];
  Fp8DecodeTable() {
    for (int c = 0; c < 256; ++c) v[c] = fp8_e4m3_to_float(static_cast<uint8_t>(c));
  }
};

inline const float* fp8_e4m3_table() {
  static const Fp8DecodeTable table;
  return table.v;
}

}  // namespace kvkern::cpu
