// SPDX-License-Identifier: Apache-2.0
// quant_decode_attention v2: both dot products on tensor cores (mma.sync
// m16n8k16, fp32 accumulate) for fp16 / bf16 caches. Included by quant_kv.cuh,
// which dispatches to it (QuantKVParams::kernel_variant); the merge, the
// workspace and the output rules are v1's. Design, fragment mapping and the
// precision argument: QUANT_CUDA.md ("v2"). Torch-free.
//
// Shape of the work: one CTA of 4 warps per (b, kv head, split); the split's
// slots in blocks of 32 tokens, warp w taking the w-th quarter of them. Every warp
// runs its own online softmax over its blocks and its own cp.async pipeline
// (a ring of STAGES block buffers in shared memory: key code rows, value code
// rows and the block's scales / mins), so the main loop has no CTA barrier;
// the four warp states meet in shared memory at the end.
//
// One block, one warp, all G_q <= 8 query heads at once (g = lane / 4, qd =
// lane % 4; heads are the MMA rows: row g = head g's "hi" part, row g + 8 the
// "lo" part of the same head, so both land in the same lane):
//  * scores S[16 x 8 tokens] = A[16 x 16 channels] . Kcodes^T, A = q * qscale
//    * k_scale split into bf16 hi + lo (rows g / g + 8), one A per key group
//    kept in registers; B = codes widened to bf16 in registers (exact). Token
//    of n-tile j, column c: 4c + j, so lane g's four tokens are four adjacent
//    codes of one code word. Channels: lane qd of k-step ks takes channels
//    16ks + 4qd .. + 3 (one 16-byte shared load: a permutation of the k index
//    that A uses too). + sum_d q_d k_min_d per group and head (fp32).
//  * centred caches / ring slots ("dense" rows in T): S += (q . row) * qscale
//    by an MMA in T with the raw q (exact products), done first into the same
//    accumulators.
//  * softmax (exp2 domain): lane (g, qd) holds head g's scores of tokens
//    8qd .. 8qd + 7 of the block (two shuffles per reduction).
//  * out[16 x 8 channels] += A[16 x 16 tokens] . Vcodes, A = p * v_scale split
//    into bf16 hi + lo (rows g / g + 8) per channel group, B = value codes
//    widened to bf16; + sum_t p v_min per (head, channel group) in fp32; dense
//    rows (v_mean of quantized tokens, the ring's values) by an MMA in T with p
//    split into T hi + lo. Channel of n-tile n, column c: 32 (n / 4) + 4c + n % 4.
#pragma once

#include <cstdint>

#include "common.cuh"
#include "quant_params.h"

namespace kvkern {
namespace quant_detail {

constexpr int kTcWarps = 4;
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kTcBlock = 32;  // tokens per warp step (G is a multiple of it)

template <int BITS, int D>
struct TcCfg {
  static_assert(D == 64 || D == 128 || D == 256, "D: 64, 128 or 256");
  static constexpr int P = 32 / BITS;
  static constexpr int KROWS = kTcBlock / P;  // key code rows per block
  // Key rows padded to D + 16 words: the two rows an 8-lane phase of a 16-byte
  // load touches (8-bit codes) fall into different bank halves.
  static constexpr int KS = D + 16;
  static constexpr int VWD = D / P;  // value code words per token
  // Value rows r: word offset r * VWD + 8 * (r / 8): the four rows 8qd + e of
  // one load instruction start 8 banks apart.
  static constexpr int VWORDS = kTcBlock * VWD + 4 * 8;
  static constexpr int MAXVG = D / 32;  // value groups per token, at most
  // one stage, in 4-byte words
  static constexpr int OFF_KW = 0;                    // [KROWS][KS] key code words
  static constexpr int OFF_VW = OFF_KW + KROWS * KS;  // value code words
  static constexpr int OFF_KM = OFF_VW + VWORDS;      // k_scale [D] T, k_min [D] T
  static constexpr int OFF_VM = OFF_KM + D;           // v_scale [32][D / G] T, v_min (at + 32 MAXVG T)
  static constexpr int STAGE = OFF_VM + D;
  static constexpr int STAGES = kTcWarps * 3 * STAGE * 4 <= 100 * 1024 ? 3 : 2;
  // the CTA: q * qscale [8][SQS] fp32, q [8][SQTS] T (rows padded so that the
  // eight heads' reads of one instruction hit different banks), then the warps'
  // stage rings (reused by the final merge: m, l [4][8], acc [4][8][D])
  static constexpr int SQS = D + 16;
  static constexpr int SQTS = D + 8;
  static constexpr int OFF_Q = 0;
  static constexpr int OFF_QT = OFF_Q + 8 * SQS;
  static constexpr int OFF_ST = OFF_QT + 8 * SQTS / 2;
  static constexpr int RING = kTcWarps * STAGES * STAGE;
  static constexpr int FIN = 2 * kTcWarps * 8 + kTcWarps * 8 * D;
  static constexpr int WORDS = OFF_ST + (RING > FIN ? RING : FIN);
  static constexpr size_t SMEM = static_cast<size_t>(WORDS) * 4;
  static_assert(OFF_VW % 4 == 0 && OFF_KM % 4 == 0 && OFF_VM % 4 == 0 && STAGE % 4 == 0 && OFF_ST % 4 == 0,
                "16-byte aligned staging");
};

// What a CTA of either attention kernel (v1 in quant_kv.cuh, v2 here) works on:
// blockIdx.x = (b * Hkv + h) * num_splits + split; head (b, h)'s length and how
// much of it is codes (keys of [0, nk), values of [0, nv)). A length outside
// [0, C] is `bad`: nothing is read and the head group's output is NaN.
struct SplitHead {
  int split;
  int64_t b, h;
  int64_t L, nk, nv;
  bool bad;
};

__device__ __forceinline__ SplitHead locate_split_head(const QuantKVParams& p, int num_splits) {
  SplitHead s;
  const int64_t bid = blockIdx.x;
  s.split = static_cast<int>(bid % num_splits);
  const int64_t bh = bid / num_splits;
  s.b = bh / p.num_kv_heads;
  s.h = bh % p.num_kv_heads;
  s.L = p.lengths[s.b * p.lengths_stride_b + s.h * p.lengths_stride_h];
  s.bad = s.L < 0 || s.L > p.capacity;
  s.nk = s.bad ? 0 : s.L - s.L % p.residual;
  s.nv = s.bad ? 0 : (s.L > p.residual ? s.L - p.residual : 0);
  return s;
}

// Head (b, h)'s rows of the layout (means: batch element b's; nullptr when the
// cache is not mean-centred).
template <typename T>
struct HeadViews {
  const int32_t *kc, *vc;
  const T *ksc, *kmn, *vsc, *vmn, *kr, *vr, *kmean, *vmean;
};

template <typename T>
__device__ __forceinline__ HeadViews<T> head_views(const QuantKVParams& p, int64_t b, int64_t h) {
  const auto at = [&](const auto& t) { return b * t.stride[0] + h * t.stride[1]; };
  HeadViews<T> v;
  v.kc = static_cast<const int32_t*>(p.k_codes.data) + at(p.k_codes);
  v.vc = static_cast<const int32_t*>(p.v_codes.data) + at(p.v_codes);
  v.ksc = static_cast<const T*>(p.k_scale.data) + at(p.k_scale);
  v.kmn = static_cast<const T*>(p.k_min.data) + at(p.k_min);
  v.vsc = static_cast<const T*>(p.v_scale.data) + at(p.v_scale);
  v.vmn = static_cast<const T*>(p.v_min.data) + at(p.v_min);
  v.kr = static_cast<const T*>(p.k_res.data) + at(p.k_res);
  v.vr = static_cast<const T*>(p.v_res.data) + at(p.v_res);
  v.kmean = p.k_mean.data ? static_cast<const T*>(p.k_mean.data) + b * p.k_mean.stride[0] : nullptr;
  v.vmean = p.v_mean.data ? static_cast<const T*>(p.v_mean.data) + b * p.v_mean.stride[0] : nullptr;
  return v;
}

struct TcArgs {
  QuantKVParams p;
  int num_splits;
  int blocks_per_split;  // 32-token blocks
};

// Lanes of a warp meet (the cp.async data of every lane is visible after each
// lane's wait). In the emulator __syncwarp does not switch fibers, so a
// shuffle (a real rendezvous there) stands in for it.
__device__ __forceinline__ void tc_warp_sync() {
#ifdef KVKERN_CUDA_EMULATION
  (void)__shfl_sync(0xffffffffu, 0, 0);
#else
  __syncwarp();
#endif
}

// Copies `rows` rows of `row_bytes` bytes (src rows src_stride bytes apart; dst
// row r at dst + dst_off(r)) by the warp's lanes: 16-byte cp.async when the
// source allows it, else 4-byte cp.async, else synchronous 2-byte copies. The
// destination offsets are multiples of the unit chosen (the callers' layouts).
template <typename DstOff>
__device__ __forceinline__ void tc_copy_rows(unsigned char* dst, DstOff dst_off, const void* src_v,
                                             int64_t src_stride, int rows, int row_bytes, int lane) {
  const auto* src = static_cast<const unsigned char*>(src_v);
  const uint64_t al = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(src)) | static_cast<uint64_t>(src_stride) |
                      static_cast<uint64_t>(row_bytes);
  if (al % 16 == 0) {
    const int per = row_bytes / 16;
    for (int i = lane; i < rows * per; i += 32) {
      const int r = i / per, c = i % per;
      cp_async_16(dst + dst_off(r) + 16 * c, src + r * src_stride + 16 * c);
    }
  } else if (al % 4 == 0) {
    const int per = row_bytes / 4;
    for (int i = lane; i < rows * per; i += 32) {
      const int r = i / per, c = i % per;
      cp_async_4(dst + dst_off(r) + 4 * c, src + r * src_stride + 4 * c);
    }
  } else {
    const int per = row_bytes / 2;
    for (int i = lane; i < rows * per; i += 32) {
      const int r = i / per, c = i % per;
      *reinterpret_cast<uint16_t*>(dst + dst_off(r) + 2 * c) =
          __ldg(reinterpret_cast<const unsigned short*>(src + r * src_stride + 2 * c));
    }
  }
}

// The two halves of a packed pair of T, as fp32.
template <typename T>
__device__ __forceinline__ float tc_lo(uint32_t w) {
  const uint16_t u = static_cast<uint16_t>(w & 0xffffu);
  T x;
  __builtin_memcpy(&x, &u, 2);
  return DtypeTraits<T>::to_float(x);
}
template <typename T>
__device__ __forceinline__ float tc_hi(uint32_t w) {
  return tc_lo<T>(w >> 16);
}

// x0, x1 -> hi = (T(x0), T(x1)), lo = (T(x0 - hi0), T(x1 - hi1)): hi + lo is
// x to within 2^-18 |x| (bf16; 2^-22 for fp16 above its normal range).
template <typename T>
__device__ __forceinline__ void tc_split(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  hi = DtypeTraits<T>::pack2(x0, x1);
  lo = DtypeTraits<T>::pack2(x0 - tc_lo<T>(hi), x1 - tc_hi<T>(hi));
}

// Dense rows (means, ring) are read straight from global memory: elements d,
// d + 1 of a row as one packed pair, elements d .. d + 3 as two pairs; 0 for no
// row. `wide`: the rows allow 4-byte (pair) / 8-byte (quad) loads.
template <typename T>
__device__ __forceinline__ uint32_t tc_pair(const T* row, int d, bool wide) {
  if (row == nullptr) return 0u;
  const auto* u = reinterpret_cast<const unsigned short*>(row) + d;
  if (wide) return __ldg(reinterpret_cast<const unsigned int*>(u));
  return static_cast<uint32_t>(__ldg(u)) | static_cast<uint32_t>(__ldg(u + 1)) << 16;
}
template <typename T>
__device__ __forceinline__ uint2 tc_quad(const T* row, int d, bool wide) {
  if (row == nullptr) return make_uint2(0u, 0u);
  if (wide) return __ldg(reinterpret_cast<const uint2*>(reinterpret_cast<const unsigned short*>(row) + d));
  return make_uint2(tc_pair(row, d, false), tc_pair(row, d + 2, false));
}

// Whether every row base + k * stride (elements of 2 bytes) is `bytes`-aligned.
__device__ __forceinline__ bool tc_rows_aligned(const void* base, int64_t stride, int bytes) {
  return ((static_cast<uint64_t>(reinterpret_cast<uintptr_t>(base)) | static_cast<uint64_t>(stride * 2)) %
          static_cast<uint64_t>(bytes)) == 0;
}

// prmt.b32 (default mode): byte i of the result is byte (sel >> 4i) & 7 of
// the pair {b, a} (a = bytes 0-3). The emulator has no __byte_perm.
__device__ __forceinline__ uint32_t tc_prmt(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef KVKERN_CUDA_EMULATION
  const uint64_t x = (static_cast<uint64_t>(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<uint32_t>((x >> (8 * ((sel >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
#else
  return __byte_perm(a, b, sel);
#endif
}

// bf16x2 x * s + c in each half (one fma.rn.bf16x2); s and c are powers of two
// or small integers (exact in bf16: their fp32 bits' top half) and only exact
// results are asked of it.
__device__ __forceinline__ uint32_t tc_bf16x2_fma(uint32_t x, float s, float c) {
#ifdef KVKERN_CUDA_EMULATION
  return DtypeTraits<__nv_bfloat16>::pack2(fmaf(tc_lo<__nv_bfloat16>(x), s, c), fmaf(tc_hi<__nv_bfloat16>(x), s, c));
#else
  const uint32_t sb = (__float_as_uint(s) >> 16) * 0x10001u, cb = (__float_as_uint(c) >> 16) * 0x10001u;
  __nv_bfloat162 v, s2, c2;
  __builtin_memcpy(&v, &x, 4);
  __builtin_memcpy(&s2, &sb, 4);
  __builtin_memcpy(&c2, &cb, 4);
  v = __hfma2(v, s2, c2);
  uint32_t r;
  __builtin_memcpy(&r, &v, 4);
  return r;
#endif
}

// The prmt selector that gathers the byte(s) holding code positions pos ..
// pos + 3 (2 / 4 bits) of w0 into the low half and of w1 into the high half.
template <int BITS>
__device__ __forceinline__ uint32_t tc_widen_sel(int pos) {
  if constexpr (BITS == 4) {
    const uint32_t k = static_cast<uint32_t>(pos / 2);  // 0 or 2
    return k | (k + 1) << 4 | (k + 4) << 8 | (k + 5) << 12;
  } else {
    const uint32_t k = static_cast<uint32_t>(pos / 4);  // 2 bits: 0 .. 3; 8 bits: unused
    return k | k << 4 | (k + 4) << 8 | (k + 4) << 12;
  }
}

// Codes at positions pos .. pos + 3 of words w0 and w1 (sel = tc_widen_sel(pos))
// as four bf16 pairs: out[j] = (code j of w0 in the low half, code j of w1 in the
// high half). 2 / 4 bits: one prmt gathers the codes, then per pair (code |
// 0x4300) is the bf16 128 + code, minus 128 (exact); 8 bits (bf16 has 8
// significant bits): per code one prmt makes the fp32 2^23 + code, minus 2^23.
template <int BITS>
__device__ __forceinline__ void tc_widen4(uint32_t w0, uint32_t w1, uint32_t sel, uint32_t (&out)[4]) {
  if constexpr (BITS == 8) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      constexpr uint32_t kHi = 0x4B000000u;  // bytes: 00 00 00 4B
      const uint32_t js = static_cast<uint32_t>(j) | 4u << 4 | 5u << 8 | 7u << 12;
      const float c0 = __uint_as_float(tc_prmt(w0, kHi, js)) - 8388608.f;
      const float c1 = __uint_as_float(tc_prmt(w1, kHi, js)) - 8388608.f;
      out[j] = DtypeTraits<__nv_bfloat16>::pack2(c0, c1);
    }
  } else {
    constexpr uint32_t M = (1u << BITS) - 1u;
    const uint32_t y = tc_prmt(w0, w1, sel);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (BITS == 2 && (j == 1 || j == 2)) {
        // In place (no shift): bits 2j, 2j + 1 of the mantissa make 128 + 4^j code;
        // * 4^-j - 128 * 4^-j is the code (one exact fma).
        const float f = j == 1 ? 0.25f : 0.0625f;
        out[j] = tc_bf16x2_fma(((y & ((M | M << 16) << (2 * j))) | 0x43004300u), f, -128.f * f);
      } else {
        out[j] = tc_bf16x2_fma(((y >> (BITS * j)) & (M | (M << 16))) | 0x43004300u, 1.f, -128.f);
      }
    }
  }
}

template <typename T, int BITS, int D>
__global__ void __launch_bounds__(kTcThreads, 2) quant_decode_tc_kernel(TcArgs a) {
  static_assert(sizeof(T) == 2, "the tensor-core kernel takes fp16 / bf16 caches");
  using Cfg = TcCfg<BITS, D>;
  using BF = __nv_bfloat16;
  constexpr int P = Cfg::P;
  constexpr int NKS = D / 16;  // k-steps over the channels
  constexpr int NCB = D / 32;  // 32-channel blocks (four 8-channel n-tiles each)
  constexpr int STAGES = Cfg::STAGES;
  constexpr float kNeg = -__builtin_huge_valf();
  extern __shared__ __align__(16) unsigned char smem[];
  uint32_t* sw = reinterpret_cast<uint32_t*>(smem);
  float* sq = reinterpret_cast<float*>(sw + Cfg::OFF_Q);
  T* sqt = reinterpret_cast<T*>(sw + Cfg::OFF_QT);

  const QuantKVParams& p = a.p;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, qd = lane & 3;
  const int S = a.num_splits;
  const SplitHead at = locate_split_head(p, S);
  const int split = at.split;
  const int64_t b = at.b, h = at.h, L = at.L;
  const int Gq = static_cast<int>(p.num_q_heads / p.num_kv_heads);
  const int64_t R = p.residual;
  const int G = p.group;
  const bool bad = at.bad;
  const int64_t nk = at.nk;  // a multiple of R, so of 32: blocks are all codes or all ring
  const int64_t nv = at.nv;
  const int64_t nblk = bad ? 0 : ceil_div<int64_t>(L, kTcBlock);
  const int64_t blk_lo = static_cast<int64_t>(split) * a.blocks_per_split;
  const int64_t blk_hi = blk_lo + a.blocks_per_split < nblk ? blk_lo + a.blocks_per_split : nblk;
  // Warp w takes the w-th quarter of the split's blocks (contiguous, so a key
  // group's A stays in registers across its blocks).
  const int64_t per_warp = blk_hi > blk_lo ? ceil_div<int64_t>(blk_hi - blk_lo, kTcWarps) : 0;
  const int64_t w_lo = blk_lo + warp * per_warp;
  const int64_t w_hi = w_lo + per_warp < blk_hi ? w_lo + per_warp : blk_hi;
  const int nb = w_hi > w_lo ? static_cast<int>(w_hi - w_lo) : 0;

  const float qscale = p.sm_scale * kLog2e;  // base-2 logits
  const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_b + h * Gq * p.q_stride_h;
  for (int i = tid; i < 8 * D; i += kTcThreads) {
    const int gg = i / D, d = i % D;
    const T x = gg < Gq ? qb[gg * p.q_stride_h + d] : DtypeTraits<T>::from_float(0.f);
    sqt[gg * Cfg::SQTS + d] = x;
    sq[gg * Cfg::SQS + d] = DtypeTraits<T>::to_float(x) * qscale;
  }
  __syncthreads();

  const HeadViews<T> hv = head_views<T>(p, b, h);
  const int32_t *kc = hv.kc, *vc = hv.vc;
  const T *ksc = hv.ksc, *kmn = hv.kmn, *vsc = hv.vsc, *vmn = hv.vmn, *kr = hv.kr, *vr = hv.vr;
  const T *kmean = hv.kmean, *vmean = hv.vmean;
  const int nvg = D / G;  // value groups per token
  // Dense rows allow wide loads: key pairs need 4-byte rows, value quads 8-byte ones.
  const bool kmean_wide = kmean && tc_rows_aligned(kmean, p.k_mean.stride[1], 4);
  const bool kres_wide = tc_rows_aligned(kr, p.k_res.stride[2], 4);
  const bool vwide = tc_rows_aligned(vr, p.v_res.stride[2], 8) && (!vmean || tc_rows_aligned(vmean, p.v_mean.stride[1], 8));
  // Lane g's codes sit at positions (4g) % P .. + 3 of its key and value words alike.
  const uint32_t wsel = tc_widen_sel<BITS>((4 * g) % P);

  uint32_t* ring = sw + Cfg::OFF_ST + warp * STAGES * Cfg::STAGE;
  auto block_t0 = [&](int i) -> int64_t { return (w_lo + i) * kTcBlock; };
  // Block i starts a key group for this warp: its k_scale / k_min are staged
  // and its A computed (code blocks are a prefix of the warp's blocks).
  auto new_kgroup = [&](int i, int64_t t0) { return i == 0 || t0 % G == 0; };
  // D <= 128: the A fragments (q * qscale * k_scale, hi / lo) of the current key
  // group stay in registers (32 at D = 128); D = 256 rebuilds them every block
  // from shared memory (its 128 accumulators leave no room for 64 more), so
  // stages every block's k_scale / k_min.
  constexpr bool kCacheA = D <= 128;

  // Stage block i of this warp: key code rows and the group's k_scale / k_min
  // (all-code blocks), value code rows and v_scale / v_min of its quantized tokens.
  auto issue = [&](int i) {
    const int64_t t0 = block_t0(i);
    unsigned char* st = reinterpret_cast<unsigned char*>(ring + (i % STAGES) * Cfg::STAGE);
    if (t0 + kTcBlock <= nk) {
      tc_copy_rows(st + Cfg::OFF_KW * 4, [](int r) { return r * Cfg::KS * 4; },
                   kc + (t0 / P) * p.k_codes.stride[2], p.k_codes.stride[2] * 4, Cfg::KROWS, D * 4, lane);
      if (!kCacheA || new_kgroup(i, t0)) {
        const int64_t kg = t0 / G;
        tc_copy_rows(st + Cfg::OFF_KM * 4, [](int) { return 0; }, ksc + kg * p.k_scale.stride[2], 0, 1, D * 2, lane);
        tc_copy_rows(st + Cfg::OFF_KM * 4 + D * 2, [](int) { return 0; }, kmn + kg * p.k_min.stride[2], 0, 1, D * 2,
                     lane);
      }
    }
    if (t0 < nv) {
      const int rows = nv - t0 < kTcBlock ? static_cast<int>(nv - t0) : kTcBlock;
      tc_copy_rows(st + Cfg::OFF_VW * 4, [](int r) { return (r * Cfg::VWD + 8 * (r / 8)) * 4; },
                   vc + t0 * p.v_codes.stride[2], p.v_codes.stride[2] * 4, rows, Cfg::VWD * 4, lane);
      // [token][nvg] in shared memory; one contiguous run when the tokens' rows are
      // adjacent (the usual layout: with one group per token, a run of 64 bytes
      // instead of 32 two-byte copies).
      auto copy_meta = [&](unsigned char* dst, const T* src, int64_t stride) {
        if (stride == nvg)
          tc_copy_rows(dst, [](int) { return 0; }, src, 0, 1, rows * nvg * 2, lane);
        else
          tc_copy_rows(dst, [nvg](int r) { return r * nvg * 2; }, src, stride * 2, rows, nvg * 2, lane);
      };
      copy_meta(st + Cfg::OFF_VM * 4, vsc + t0 * p.v_scale.stride[2], p.v_scale.stride[2]);
      copy_meta(st + Cfg::OFF_VM * 4 + kTcBlock * Cfg::MAXVG * 2, vmn + t0 * p.v_min.stride[2], p.v_min.stride[2]);
    }
  };

  float m = kNeg, l = 0.f;  // head g's running max (base 2) and this lane's part of the sum
  float acc[D / 8][4];      // out n-tiles: rows g (hi) and g + 8 (lo) of head g
  float macc[NCB];          // this lane's part of sum_t p v_min, per channel group (at its first 32-channel block)
#pragma unroll
  for (int n = 0; n < D / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
#pragma unroll
  for (int cb = 0; cb < NCB; ++cb) macc[cb] = 0.f;
  uint32_t ka[kCacheA ? NKS : 1][4];
  float kmt = 0.f;      // sum_d q_d * qscale * k_min_d of that group, head g

#pragma unroll 1
  for (int i = 0; i < STAGES - 1; ++i) {
    if (i < nb) issue(i);
    cp_async_commit();
  }

#pragma unroll 1
  for (int i = 0; i < nb; ++i) {
    cp_async_wait<STAGES - 2>();
    tc_warp_sync();  // block i landed for every lane; block i - 1's buffer is free
    if (i + STAGES - 1 < nb) issue(i + STAGES - 1);
    cp_async_commit();
    const uint32_t* st = ring + (i % STAGES) * Cfg::STAGE;
    const int64_t t0 = block_t0(i);
    const bool kcode = t0 + kTcBlock <= nk;

    // ---- scores: c[j] = n-tile j (tokens 4c + j), rows g / g + 8 ----
    float c[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[j][e] = 0.f;
    if (!kcode || kmean) {  // dense rows: k_mean of coded tokens, or the ring
      const bool kwide = kcode ? kmean_wide : kres_wide;
      const T* rows[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t t = t0 + 4 * g + j;
        rows[j] = kcode ? kmean + t * p.k_mean.stride[1] : (t < L ? kr + (t % R) * p.k_res.stride[2] : nullptr);
      }
#pragma unroll
      for (int ks = 0; ks < NKS; ++ks) {
        const int d = 16 * ks + 2 * qd;
        const uint32_t a0 = *reinterpret_cast<const uint32_t*>(sqt + g * Cfg::SQTS + d);
        const uint32_t a2 = *reinterpret_cast<const uint32_t*>(sqt + g * Cfg::SQTS + d + 8);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t b0 = tc_pair(rows[j], d, kwide);
          const uint32_t b1 = tc_pair(rows[j], d + 8, kwide);
          mma_16816<T>(c[j], a0, 0u, a2, 0u, b0, b1);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) c[j][e] *= qscale;
    }
    if (kcode) {
      const T* sks = reinterpret_cast<const T*>(st + Cfg::OFF_KM);
      const T* skm = sks + D;
      // A of k-step ks (channels 16ks + 4qd .. + 3) from the staged k_scale / k_min; adds the
      // lane's part of the k_min term to kmt.
      auto make_a = [&](int ks, uint32_t (&a4)[4]) {
        const int d = 16 * ks + 4 * qd;
        const float4 q4 = *reinterpret_cast<const float4*>(sq + g * Cfg::SQS + d);
        const float qv[4] = {q4.x, q4.y, q4.z, q4.w};
        float x[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          x[e] = qv[e] * DtypeTraits<T>::to_float(sks[d + e]);
          kmt = fmaf(qv[e], DtypeTraits<T>::to_float(skm[d + e]), kmt);
        }
        tc_split<BF>(x[0], x[1], a4[0], a4[1]);
        tc_split<BF>(x[2], x[3], a4[2], a4[3]);
      };
      const bool fresh = !kCacheA || new_kgroup(i, t0);  // warp-uniform
      if (fresh) kmt = 0.f;
      if constexpr (kCacheA) {
        if (fresh) {
#pragma unroll
          for (int ks = 0; ks < NKS; ++ks) make_a(ks, ka[ks]);
        }
      }
      const uint32_t* wrow = st + Cfg::OFF_KW + ((4 * g) / P) * Cfg::KS + 4 * qd;
#pragma unroll
      for (int ks = 0; ks < NKS; ++ks) {
        uint32_t a4[4];
        if constexpr (kCacheA) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a4[e] = ka[ks][e];
        } else {
          make_a(ks, a4);
        }
        const uint4 w = *reinterpret_cast<const uint4*>(wrow + 16 * ks);
        uint32_t b0[4], b1[4];
        tc_widen4<BITS>(w.x, w.y, wsel, b0);
        tc_widen4<BITS>(w.z, w.w, wsel, b1);
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16816<BF>(c[j], a4[0], a4[1], a4[2], a4[3], b0[j], b1[j]);
      }
      if (fresh) {
        kmt += __shfl_xor_sync(0xffffffffu, kmt, 1);
        kmt += __shfl_xor_sync(0xffffffffu, kmt, 2);
      }
    }

    // ---- online softmax: s[i] = head g, token t0 + 8qd + i ----
    float s[8];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s[j] = c[j][0] + c[j][2];
      s[4 + j] = c[j][1] + c[j][3];
    }
    float bmax = kNeg;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const bool valid = t0 + 8 * qd + e < L;
      s[e] = valid ? (kcode ? s[e] + kmt : s[e]) : kNeg;
      bmax = fmaxf(bmax, s[e]);
    }
    bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 1));
    bmax = fmaxf(bmax, __shfl_xor_sync(0xffffffffu, bmax, 2));
    const float mn = fmaxf(m, bmax);
    const float alpha = m == kNeg ? 0.f : exp2f(m - mn);
    float pr[8];
    float psum = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      pr[e] = s[e] == kNeg ? 0.f : exp2f(s[e] - mn);
      psum += pr[e];
    }
    l = l * alpha + psum;
    m = mn;
    if (alpha != 1.f) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] *= alpha;
#pragma unroll
      for (int cb = 0; cb < NCB; ++cb) macc[cb] *= alpha;
    }

    // ---- P.V: k-step sv takes tokens 8qd + 4sv + {0, 1} (k 2qd, 2qd + 1) and {2, 3} (k 2qd + 8, + 9) ----
    const bool vcode = t0 < nv;
    const bool vdense = (vcode && vmean) || t0 + kTcBlock > nv;
    const T* svs = reinterpret_cast<const T*>(st + Cfg::OFF_VM);
    const T* svm = svs + kTcBlock * Cfg::MAXVG;
#pragma unroll
    for (int sv = 0; sv < 2; ++sv) {
      const int r0 = 8 * qd + 4 * sv;  // the lane's first token of this k-step, in the block
      if (vcode) {
        uint32_t va[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int cb = 0; cb < NCB; ++cb) {
          if ((32 * cb) % G == 0) {  // a new channel group: its A and its v_min term (kept in macc[cb])
            const int gam = 32 * cb / G;
            float x[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const bool coded = t0 + r0 + e < nv;  // v_scale / v_min past nv were not staged
              const float pe = pr[4 * sv + e];
              x[e] = coded ? pe * DtypeTraits<T>::to_float(svs[(r0 + e) * nvg + gam]) : 0.f;
              if (coded) macc[cb] = fmaf(pe, DtypeTraits<T>::to_float(svm[(r0 + e) * nvg + gam]), macc[cb]);
            }
            tc_split<BF>(x[0], x[1], va[0], va[1]);
            tc_split<BF>(x[2], x[3], va[2], va[3]);
          }
          const uint32_t* vrow = st + Cfg::OFF_VW + r0 * Cfg::VWD + 8 * qd + (32 * cb + 4 * g) / P;
          uint32_t b0[4], b1[4];
          tc_widen4<BITS>(vrow[0], vrow[Cfg::VWD], wsel, b0);
          tc_widen4<BITS>(vrow[2 * Cfg::VWD], vrow[3 * Cfg::VWD], wsel, b1);
#pragma unroll
          for (int nn = 0; nn < 4; ++nn) mma_16816<BF>(acc[4 * cb + nn], va[0], va[1], va[2], va[3], b0[nn], b1[nn]);
        }
      }
      if (vdense) {  // v_mean of quantized tokens (centred), the ring's values
        const T* rows[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t t = t0 + r0 + e;
          rows[e] = t < nv ? (vmean ? vmean + t * p.v_mean.stride[1] : nullptr)
                           : (t < L ? vr + (t % R) * p.v_res.stride[2] : nullptr);
        }
        uint32_t da[4];
        tc_split<T>(pr[4 * sv], pr[4 * sv + 1], da[0], da[1]);
        tc_split<T>(pr[4 * sv + 2], pr[4 * sv + 3], da[2], da[3]);
#pragma unroll
        for (int cb = 0; cb < NCB; ++cb) {
          const int d = 32 * cb + 4 * g;  // the lane's four channels, one per n-tile
          uint2 x[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) x[e] = tc_quad(rows[e], d, vwide);
#pragma unroll
          for (int nn = 0; nn < 4; ++nn) {
            // (token e, channel d + nn) for the token pairs (0, 1) and (2, 3)
            const uint32_t sel = nn % 2 == 0 ? 0x5410u : 0x7632u;
            const uint32_t b0 = tc_prmt(nn < 2 ? x[0].x : x[0].y, nn < 2 ? x[1].x : x[1].y, sel);
            const uint32_t b1 = tc_prmt(nn < 2 ? x[2].x : x[2].y, nn < 2 ? x[3].x : x[3].y, sel);
            mma_16816<T>(acc[4 * cb + nn], da[0], da[1], da[2], da[3], b0, b1);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- the four warps' states meet; normalize; write ----
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
#pragma unroll
  for (int cb = 0; cb < NCB; ++cb) {
    macc[cb] += __shfl_xor_sync(0xffffffffu, macc[cb], 1);
    macc[cb] += __shfl_xor_sync(0xffffffffu, macc[cb], 2);
  }
  __syncthreads();  // every warp is done with its stage ring
  float* wm = reinterpret_cast<float*>(sw + Cfg::OFF_ST);
  float* wl = wm + kTcWarps * 8;
  float* wacc = wl + kTcWarps * 8;
  if (qd == 0) {
    wm[warp * 8 + g] = m;
    wl[warp * 8 + g] = l;
  }
  float mg = 0.f;  // the v_min term of the current channel group
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    if (n % 4 == 0 && (8 * n) % G == 0) mg = macc[n / 4];
    const int ch = 32 * (n / 4) + 8 * qd + n % 4;
    wacc[(warp * 8 + g) * D + ch] = acc[n][0] + acc[n][2] + mg;
    wacc[(warp * 8 + g) * D + ch + 4] = acc[n][1] + acc[n][3] + mg;
  }
  __syncthreads();
  const float nan = __int_as_float(0x7fffffff);
  for (int i = tid; i < Gq * D; i += kTcThreads) {
    const int gg = i / D, d = i % D;
    float mx = kNeg;
#pragma unroll
    for (int w = 0; w < kTcWarps; ++w) mx = fmaxf(mx, wm[w * 8 + gg]);
    float sum = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kTcWarps; ++w) {
      const float mw = wm[w * 8 + gg];
      const float f = mw == kNeg ? 0.f : exp2f(mw - mx);
      sum = fmaf(wl[w * 8 + gg], f, sum);
      o = fmaf(wacc[(w * 8 + gg) * D + d], f, o);
    }
    o = bad ? nan : (sum > 0.f ? o / sum : 0.f);
    const float lse = bad ? nan : (sum > 0.f ? (mx + log2f(sum)) * kLn2 : kNeg);
    const int64_t row = b * p.num_q_heads + h * Gq + gg;
    if (S == 1) {
      static_cast<T*>(p.out)[row * D + d] = DtypeTraits<T>::from_float(o);
      if (d == 0 && p.lse) p.lse[row] = lse;
    } else {
      p.partial_out[(row * S + split) * D + d] = o;
      if (d == 0) p.partial_lse[row * S + split] = lse;
    }
  }
}

}  // namespace quant_detail
}  // namespace kvkern
