// SPDX-License-Identifier: Apache-2.0
// CUDA kernels of the quantized KV layout (kvkern/reference.py, "Quantized
// KV"): quant_decode_attention (split-K, dequantization in registers), the
// prefill quantizer and the one-launch decode-step append. Torch-free. The
// launch sequences are run_* templates over a launcher (quant_inst.cu: the
// real <<<>>>; tools/cuda_emu/quant_emu.cpp: a CPU emulator), as in
// window_scores.cuh. Design: QUANT_CUDA.md.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "quant_decode_tc.cuh"
#include "quant_launch.h"

namespace kvkern {
namespace quant_detail {

constexpr float kQNegInf = -__builtin_huge_valf();
constexpr int kMaxGroupHeads = 8;  // query heads per kv head
constexpr int kTile = 64;          // slots per attention tile
constexpr int kAttnThreads = 128;
constexpr int kQuantThreads = 256;

template <typename T>
__device__ __forceinline__ float ld(const T* p) {
  return DtypeTraits<T>::to_float(*p);
}
template <typename T>
__device__ __forceinline__ float ldg(const T* p) {
  return DtypeTraits<T>::to_float(__ldg(p));
}
template <typename T>
__device__ __forceinline__ void st(T* p, float x) {
  *p = DtypeTraits<T>::from_float(x);
}

// The value of T nearest x, as fp32 (the mean's rounding).
template <typename T>
__device__ __forceinline__ float round_t(float x) {
  return DtypeTraits<T>::to_float(DtypeTraits<T>::from_float(x));
}

// r (a value of the 16-bit T, as fp32) moved one ulp toward +inf or -inf by a
// step on its bit pattern (the smallest subnormal of the wanted sign from 0).
template <typename T>
__device__ __forceinline__ float step16(float r, bool toward_pos) {
  T h = DtypeTraits<T>::from_float(r);
  uint16_t u;
  __builtin_memcpy(&u, &h, 2);
  const bool zero = (u & 0x7fffu) == 0;
  if (zero) u = toward_pos ? 0x0001u : 0x8001u;
  else if ((r > 0.f) == toward_pos) u = static_cast<uint16_t>(u + 1);
  else u = static_cast<uint16_t>(u - 1);
  __builtin_memcpy(&h, &u, 2);
  return DtypeTraits<T>::to_float(h);
}

// Directed rounding to T, exactly as reference.round_down_to / round_up_to:
// round to nearest, then one ulp toward the wanted side if it went the wrong
// way (fp32 is the identity).
template <typename T>
struct Directed {
  __device__ __forceinline__ static float down(float x) {
    if constexpr (std::is_same<T, float>::value) {
      return x;
    } else {
      const float r = round_t<T>(x);
      return r > x ? step16<T>(r, false) : r;
    }
  }
  __device__ __forceinline__ static float up(float x) {
    if constexpr (std::is_same<T, float>::value) {
      return x;
    } else {
      const float r = round_t<T>(x);
      return r < x ? step16<T>(r, true) : r;
    }
  }
};

// lo / scale of one group from its fp32 min and max (reference.quantize_group).
template <typename T, int BITS>
__device__ __forceinline__ void group_params(float mn, float mx, float& lo, float& scale) {
  lo = Directed<T>::down(mn);
  scale = Directed<T>::up(__fdiv_rn(mx - lo, static_cast<float>((1 << BITS) - 1)));
}

// rint((x - lo) / scale) clamped; the division correctly rounded, round half even.
template <int BITS>
__device__ __forceinline__ uint32_t encode(float x, float lo, float scale) {
  if (!(scale > 0.f)) return 0u;
  const float q = rintf(__fdiv_rn(x - lo, scale));
  return static_cast<uint32_t>(fminf(fmaxf(q, 0.f), static_cast<float>((1 << BITS) - 1)));
}

// ===========================================================================
// quant_decode_attention: one CTA per (b, kv head, split), 128 threads, the
// split's slots in tiles of 64. Per tile: stage the key / value code words
// (16-byte loads) and the tile's metadata in shared memory; scores with one
// thread per (slot, half of the channels), all G query heads at once (each
// dequantized key element feeds G FMAs); online softmax per head (one warp
// per head); P·V with one thread per (4 channels, slot slice), each
// dequantized value element again feeding G FMAs. Ring slots read T directly.
// ===========================================================================
template <int BITS, int D>
struct AttnCfg {
  static constexpr int P = 32 / BITS;
  static constexpr int KROWS = kTile / P;    // key code rows per tile
  static constexpr int KSTRIDE = D + 4;      // padded: rows hit different banks
  static constexpr int VW = D / P;           // value code words per slot
  static constexpr int NCH = D / 4;          // 4-channel chunks (P·V)
  static constexpr int NS = kAttnThreads / NCH;  // slot slices (P·V)
  static constexpr int MAXVG = D / 32;       // value groups per slot, at most
  // shared memory, in 4-byte words
  static constexpr int OFF_Q = 0;                                  // [D][8]
  static constexpr int OFF_KW = OFF_Q + D * kMaxGroupHeads;        // [KROWS][KSTRIDE]
  static constexpr int OFF_KS = OFF_KW + KROWS * KSTRIDE;          // [2][D]
  static constexpr int OFF_KM = OFF_KS + 2 * D;                    // [2][D]
  static constexpr int OFF_VW = OFF_KM + 2 * D;                    // [kTile][VW]
  static constexpr int OFF_VS = OFF_VW + kTile * VW;               // [kTile][MAXVG]
  static constexpr int OFF_VM = OFF_VS + kTile * MAXVG;            // [kTile][MAXVG]
  static constexpr int OFF_S = OFF_VM + kTile * MAXVG;             // [8][kTile]
  static constexpr int OFF_RED = OFF_S + kMaxGroupHeads * kTile;   // [8][kTile]
  static constexpr int OFF_STAT = OFF_RED + kMaxGroupHeads * kTile;  // m, l, alpha [3][8]
  static constexpr int OFF_FIN = OFF_STAT + 3 * kMaxGroupHeads + 8;  // [NS][8][D]
  static constexpr int WORDS = OFF_FIN + NS * kMaxGroupHeads * D;
  static constexpr size_t SMEM = static_cast<size_t>(WORDS) * 4;
  static_assert(D % 64 == 0 && kAttnThreads % NCH == 0 && VW % 4 == 0 && D % 4 == 0, "tile shape");
  static_assert(OFF_KW % 4 == 0 && OFF_VW % 4 == 0 && OFF_FIN % 4 == 0, "16-byte aligned staging");
};

struct AttnArgs {
  QuantKVParams p;
  int num_splits;
  int tiles_per_split;
  bool vec_k, vec_v;  // 16-byte loads of the code words are aligned
};

template <typename T, int BITS, int D>
__global__ void __launch_bounds__(kAttnThreads) quant_decode_kernel(AttnArgs a) {
  using Cfg = AttnCfg<BITS, D>;
  constexpr int P = Cfg::P;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  extern __shared__ __align__(16) unsigned char smem[];
  float* sq = reinterpret_cast<float*>(smem) + Cfg::OFF_Q;
  uint32_t* skw = reinterpret_cast<uint32_t*>(smem) + Cfg::OFF_KW;
  float* sks = reinterpret_cast<float*>(smem) + Cfg::OFF_KS;
  float* skm = reinterpret_cast<float*>(smem) + Cfg::OFF_KM;
  uint32_t* svw = reinterpret_cast<uint32_t*>(smem) + Cfg::OFF_VW;
  float* svs = reinterpret_cast<float*>(smem) + Cfg::OFF_VS;
  float* svm = reinterpret_cast<float*>(smem) + Cfg::OFF_VM;
  float* sS = reinterpret_cast<float*>(smem) + Cfg::OFF_S;
  float* sred = reinterpret_cast<float*>(smem) + Cfg::OFF_RED;
  float* sm_ = reinterpret_cast<float*>(smem) + Cfg::OFF_STAT;
  float* sl_ = sm_ + kMaxGroupHeads;
  float* salpha = sl_ + kMaxGroupHeads;
  float* sfin = reinterpret_cast<float*>(smem) + Cfg::OFF_FIN;

  const QuantKVParams& p = a.p;
  const int tid = static_cast<int>(threadIdx.x);
  const int S = a.num_splits;
  const SplitHead at = locate_split_head(p, S);
  const int split = at.split;
  const int64_t b = at.b, h = at.h;
  const int Gq = static_cast<int>(p.num_q_heads / p.num_kv_heads);
  const int64_t C = p.capacity, R = p.residual;
  const int G = p.group;
  const int L = static_cast<int>(at.L);  // lengths are int32
  const bool bad = at.bad;
  const int64_t nk = at.nk, nv = at.nv;
  const int64_t n_tiles = bad ? 0 : ceil_div<int64_t>(L, kTile);
  const int64_t tile_begin = static_cast<int64_t>(split) * a.tiles_per_split;
  const int64_t tile_end = tile_begin + a.tiles_per_split < n_tiles ? tile_begin + a.tiles_per_split : n_tiles;

  const T* qb = static_cast<const T*>(p.q) + b * p.q_stride_b;
  const float qscale = p.sm_scale * kLog2e;  // base-2 logits
  for (int i = tid; i < D * kMaxGroupHeads; i += kAttnThreads) {
    const int d = i / kMaxGroupHeads, g = i % kMaxGroupHeads;
    sq[i] = g < Gq ? ldg(qb + (h * Gq + g) * p.q_stride_h + d) * qscale : 0.f;
  }
  if (tid < kMaxGroupHeads) {
    sm_[tid] = kQNegInf;
    sl_[tid] = 0.f;
  }

  const HeadViews<T> hv = head_views<T>(p, b, h);
  const int32_t *kc = hv.kc, *vc = hv.vc;
  const T *ksc = hv.ksc, *kmn = hv.kmn, *vsc = hv.vsc, *vmn = hv.vmn, *kr = hv.kr, *vr = hv.vr;
  const T *kmean = hv.kmean, *vmean = hv.vmean;
  const int nvg = D / G;  // value groups per slot

  // P·V role: channels 4c .. 4c + 3, slots slice, slice + NS, ...
  const int pc = tid % Cfg::NCH, pslice = tid / Cfg::NCH;
  float acc[kMaxGroupHeads][4];
#pragma unroll
  for (int g = 0; g < kMaxGroupHeads; ++g)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[g][e] = 0.f;

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t t0 = tile * kTile;
    // ---- stage the tile's code words and metadata ----
    const int64_t krow0 = t0 / P;
    if (a.vec_k) {
      for (int i = tid; i < Cfg::KROWS * (D / 4); i += kAttnThreads) {
        const int r = i / (D / 4), c4 = i % (D / 4);
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (krow0 + r < C / P) w = __ldg(reinterpret_cast<const uint4*>(kc + (krow0 + r) * p.k_codes.stride[2]) + c4);
        *reinterpret_cast<uint4*>(skw + r * Cfg::KSTRIDE + c4 * 4) = w;
      }
    } else {
      for (int i = tid; i < Cfg::KROWS * D; i += kAttnThreads) {
        const int r = i / D, d = i % D;
        skw[r * Cfg::KSTRIDE + d] =
            krow0 + r < C / P ? static_cast<uint32_t>(__ldg(kc + (krow0 + r) * p.k_codes.stride[2] + d)) : 0u;
      }
    }
    const int64_t kg0 = t0 / G;
    const int nkg = G >= kTile ? 1 : kTile / G;
    for (int i = tid; i < nkg * D; i += kAttnThreads) {
      const int j = i / D, d = i % D;
      const bool in = kg0 + j < C / G;
      sks[i] = in ? ldg(ksc + (kg0 + j) * p.k_scale.stride[2] + d) : 0.f;
      skm[i] = in ? ldg(kmn + (kg0 + j) * p.k_min.stride[2] + d) : 0.f;
    }
    if (a.vec_v) {
      for (int i = tid; i < kTile * (Cfg::VW / 4); i += kAttnThreads) {
        const int r = i / (Cfg::VW / 4), c4 = i % (Cfg::VW / 4);
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (t0 + r < C) w = __ldg(reinterpret_cast<const uint4*>(vc + (t0 + r) * p.v_codes.stride[2]) + c4);
        *reinterpret_cast<uint4*>(svw + r * Cfg::VW + c4 * 4) = w;
      }
    } else {
      for (int i = tid; i < kTile * Cfg::VW; i += kAttnThreads) {
        const int r = i / Cfg::VW, c = i % Cfg::VW;
        svw[i] = t0 + r < C ? static_cast<uint32_t>(__ldg(vc + (t0 + r) * p.v_codes.stride[2] + c)) : 0u;
      }
    }
    for (int i = tid; i < kTile * nvg; i += kAttnThreads) {
      const int r = i / nvg, j = i % nvg;
      const bool in = t0 + r < nv;  // only quantized values have metadata
      svs[r * Cfg::MAXVG + j] = in ? ldg(vsc + (t0 + r) * p.v_scale.stride[2] + j) : 0.f;
      svm[r * Cfg::MAXVG + j] = in ? ldg(vmn + (t0 + r) * p.v_min.stride[2] + j) : 0.f;
    }
    __syncthreads();

    // ---- scores: thread (slot st, half hf of the channels), all heads ----
    {
      const int st = tid % kTile, hf = tid / kTile;
      const int64_t t = t0 + st;
      float s[kMaxGroupHeads];
#pragma unroll
      for (int g = 0; g < kMaxGroupHeads; ++g) s[g] = 0.f;
      if (t < L) {
        const int d0 = hf * (D / 2);
        if (t < nk) {
          const uint32_t* wrow = skw + (st / P) * Cfg::KSTRIDE;
          const int shift = (st % P) * BITS;
          const int kgl = G >= kTile ? 0 : st / G;
          const float* sc = sks + kgl * D;
          const float* mn = skm + kgl * D;
#pragma unroll 4
          for (int d = d0; d < d0 + D / 2; ++d) {
            float k = fmaf(static_cast<float>((wrow[d] >> shift) & MASK), sc[d], mn[d]);
            if (kmean) k += ldg(kmean + t * p.k_mean.stride[1] + d);
            const float4 qa = *reinterpret_cast<const float4*>(sq + d * kMaxGroupHeads);
            const float4 qb4 = *reinterpret_cast<const float4*>(sq + d * kMaxGroupHeads + 4);
            s[0] = fmaf(qa.x, k, s[0]);
            s[1] = fmaf(qa.y, k, s[1]);
            s[2] = fmaf(qa.z, k, s[2]);
            s[3] = fmaf(qa.w, k, s[3]);
            s[4] = fmaf(qb4.x, k, s[4]);
            s[5] = fmaf(qb4.y, k, s[5]);
            s[6] = fmaf(qb4.z, k, s[6]);
            s[7] = fmaf(qb4.w, k, s[7]);
          }
        } else {
          const T* row = kr + (t % R) * p.k_res.stride[2];
          for (int d = d0; d < d0 + D / 2; ++d) {
            const float k = ldg(row + d);
#pragma unroll
            for (int g = 0; g < kMaxGroupHeads; ++g) s[g] = fmaf(sq[d * kMaxGroupHeads + g], k, s[g]);
          }
        }
      }
      if (hf == 1)
#pragma unroll
        for (int g = 0; g < kMaxGroupHeads; ++g) sred[g * kTile + st] = s[g];
      __syncthreads();
      if (hf == 0)
#pragma unroll
        for (int g = 0; g < kMaxGroupHeads; ++g) sS[g * kTile + st] = t < L ? s[g] + sred[g * kTile + st] : kQNegInf;
      __syncthreads();
    }

    // ---- online softmax, one warp per head ----
    {
      const int warp = tid / 32, lane = tid % 32;
      for (int g = warp; g < Gq; g += kAttnThreads / 32) {
        const float x0 = sS[g * kTile + lane], x1 = sS[g * kTile + lane + 32];
        const float tmax = group_max<32>(fmaxf(x0, x1));
        const float mo = sm_[g];
        const float mn = fmaxf(mo, tmax);
        const float p0 = mn == kQNegInf ? 0.f : exp2f(x0 - mn);
        const float p1 = mn == kQNegInf ? 0.f : exp2f(x1 - mn);
        const float tsum = group_sum<32>(p0 + p1);
        const float alpha = mo == kQNegInf ? 0.f : exp2f(mo - mn);
        sS[g * kTile + lane] = p0;
        sS[g * kTile + lane + 32] = p1;
        __syncwarp();
        if (lane == 0) {
          sl_[g] = sl_[g] * alpha + tsum;
          sm_[g] = mn;
          salpha[g] = alpha;
        }
      }
      __syncthreads();
    }

    // ---- P·V: channels 4pc .. 4pc + 3 over this thread's slot slice ----
    {
#pragma unroll
      for (int g = 0; g < kMaxGroupHeads; ++g) {
        const float al = g < Gq ? salpha[g] : 0.f;
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[g][e] *= al;
      }
      const int ch = pc * 4;
      const int wi = ch / P, shift = (ch % P) * BITS;
      const int vg = ch / G;
      for (int st = pslice; st < kTile; st += Cfg::NS) {
        const int64_t t = t0 + st;
        if (t >= L) break;
        float v[4];
        if (t < nv) {
          const uint32_t w = svw[st * Cfg::VW + wi] >> shift;
          const float sc = svs[st * Cfg::MAXVG + vg], mn = svm[st * Cfg::MAXVG + vg];
#pragma unroll
          for (int e = 0; e < 4; ++e) v[e] = fmaf(static_cast<float>((w >> (e * BITS)) & MASK), sc, mn);
          if (vmean) {
#pragma unroll
            for (int e = 0; e < 4; ++e) v[e] += ldg(vmean + t * p.v_mean.stride[1] + ch + e);
          }
        } else {
          const T* row = vr + (t % R) * p.v_res.stride[2] + ch;
#pragma unroll
          for (int e = 0; e < 4; ++e) v[e] = ldg(row + e);
        }
#pragma unroll
        for (int g = 0; g < kMaxGroupHeads; ++g) {
          const float pg = sS[g * kTile + st];
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[g][e] = fmaf(pg, v[e], acc[g][e]);
        }
      }
      __syncthreads();  // the next tile overwrites the staging buffers
    }
  }

  // ---- combine the slot slices, normalize, write ----
#pragma unroll
  for (int g = 0; g < kMaxGroupHeads; ++g)
#pragma unroll
    for (int e = 0; e < 4; ++e) sfin[(pslice * kMaxGroupHeads + g) * D + pc * 4 + e] = acc[g][e];
  __syncthreads();
  const float nan = __int_as_float(0x7fffffff);
  for (int i = tid; i < Gq * D; i += kAttnThreads) {
    const int g = i / D, d = i % D;
    float o = 0.f;
    for (int sl = 0; sl < Cfg::NS; ++sl) o += sfin[(sl * kMaxGroupHeads + g) * D + d];
    const float l = sl_[g];
    o = bad ? nan : (l > 0.f ? o / l : 0.f);
    const float lse = bad ? nan : (l > 0.f ? (sm_[g] + log2f(l)) * kLn2 : kQNegInf);
    const int64_t row = b * p.num_q_heads + h * Gq + g;
    if (S == 1) {
      st(static_cast<T*>(p.out) + row * D + d, o);
      if (d == 0 && p.lse) p.lse[row] = lse;
    } else {
      p.partial_out[(row * S + split) * D + d] = o;
      if (d == 0) p.partial_lse[row * S + split] = lse;
    }
  }
}

// Merges the splits (as decode_attention's merge: weights exp(lse_s - max)).
struct MergeArgs {
  const float* partial_out;
  const float* partial_lse;
  void* out;
  float* lse;
  int64_t rows;
  int num_splits;
  int head_dim;
};

template <typename T>
__global__ void __launch_bounds__(kAttnThreads) quant_merge_kernel(MergeArgs a) {
  const int64_t row = blockIdx.x;
  const int S = a.num_splits;
  const float* ls = a.partial_lse + row * S;
  float mx = kQNegInf;
  bool has_nan = false;
  for (int s = 0; s < S; ++s) {
    has_nan |= ls[s] != ls[s];  // NaN
    mx = fmaxf(mx, ls[s]);
  }
  float total = 0.f;
  for (int s = 0; s < S; ++s) total += (mx == kQNegInf || has_nan) ? 0.f : expf(ls[s] - mx);
  const float nan = __int_as_float(0x7fffffff);
  for (int d = static_cast<int>(threadIdx.x); d < a.head_dim; d += kAttnThreads) {
    float o = 0.f;
    if (!has_nan && mx != kQNegInf)
      for (int s = 0; s < S; ++s) o = fmaf(expf(ls[s] - mx), a.partial_out[(row * S + s) * a.head_dim + d], o);
    o = has_nan ? nan : (total > 0.f ? o / total : 0.f);
    st(static_cast<T*>(a.out) + row * a.head_dim + d, o);
  }
  if (threadIdx.x == 0 && a.lse) a.lse[row] = has_nan ? nan : (total > 0.f ? mx + logf(total) : kQNegInf);
}

// The merge launch after split attention (nothing when there is one split), for
// any params struct with the attention output fields (QuantKVParams, Fp8KVParams).
template <typename T, typename Params, typename L>
cudaError_t launch_split_merge(const Params& p, int num_splits, L& launch) {
  if (num_splits <= 1) return cudaSuccess;
  MergeArgs m{p.partial_out, p.partial_lse, p.out, p.lse, p.batch * p.num_q_heads, num_splits,
              static_cast<int>(p.head_dim)};
  return launch(quant_merge_kernel<T>, m.rows, kAttnThreads, 0, m);
}

// ===========================================================================
// Prefill quantizer: four grid-stride launches (means, key groups, value
// groups, rings). Lengths are clamped to [0, min(T_in, C)] so a bad length is
// never an out-of-bounds access (the glue rejects it first).
// ===========================================================================
struct QuantArgs {
  QuantKVParams p;
};

__device__ __forceinline__ int64_t clamp_len(const QuantKVParams& p, int64_t b, int64_t h, int64_t limit) {
  int64_t L = p.lengths[b * p.lengths_stride_b + h * p.lengths_stride_h];
  return L < 0 ? 0 : (L > limit ? limit : L);
}

// means over kv heads: fp32 sum in head order / Hkv, rounded to T.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quant_mean_kernel(QuantArgs a) {
  const QuantKVParams& p = a.p;
  const int64_t D = p.head_dim, C = p.capacity, R = p.residual, H = p.num_kv_heads;
  const int64_t lim = p.in_tokens < C ? p.in_tokens : C;
  const int64_t total = p.batch * C * D * 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % D, t = (i / D) % C, which = (i / (D * C)) % 2, b = i / (D * C * 2);
    const int64_t L = clamp_len(p, b, 0, lim);
    const int64_t n = which == 0 ? L - L % R : (L > R ? L - R : 0);
    if (t >= n) continue;
    const T* x = static_cast<const T*>(which == 0 ? p.k_in.data : p.v_in.data);
    const int64_t sb = which == 0 ? p.k_in.stride[0] : p.v_in.stride[0], sh = which == 0 ? p.k_in.stride[1] : p.v_in.stride[1],
                  sr = which == 0 ? p.k_in.stride[2] : p.v_in.stride[2];
    float s = 0.f;
    for (int64_t hh = 0; hh < H; ++hh) s += ldg(x + b * sb + hh * sh + t * sr + d);
    T* m = static_cast<T*>(which == 0 ? p.k_mean.data : p.v_mean.data);
    st(m + b * (which == 0 ? p.k_mean.stride[0] : p.v_mean.stride[0]) + t * (which == 0 ? p.k_mean.stride[1] : p.v_mean.stride[1]) + d,
       __fdiv_rn(s, static_cast<float>(H)));
  }
}

// One thread per (b, h, key group, channel): G tokens of one channel.
template <typename T, int BITS>
__global__ void __launch_bounds__(kQuantThreads) quant_keys_kernel(QuantArgs a) {
  constexpr int P = 32 / BITS;
  const QuantKVParams& p = a.p;
  const int64_t D = p.head_dim, C = p.capacity, R = p.residual, H = p.num_kv_heads;
  const int G = p.group;
  const int64_t lim = p.in_tokens < C ? p.in_tokens : C;
  const int64_t total = p.batch * H * (C / G) * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % D, gi = (i / D) % (C / G), h = (i / (D * (C / G))) % H, b = i / (D * (C / G) * H);
    const int64_t L = clamp_len(p, b, h, lim);
    if ((gi + 1) * G > L - L % R) continue;
    const T* x = static_cast<const T*>(p.k_in.data) + b * p.k_in.stride[0] + h * p.k_in.stride[1] + gi * G * p.k_in.stride[2] + d;
    const T* m = p.k_mean.data ? static_cast<const T*>(p.k_mean.data) + b * p.k_mean.stride[0] + gi * G * p.k_mean.stride[1] + d : nullptr;
    float mn = __int_as_float(0x7f800000), mx = -mn;
    for (int j = 0; j < G; ++j) {
      const float v = ldg(x + j * p.k_in.stride[2]) - (m ? ldg(m + j * p.k_mean.stride[1]) : 0.f);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
    }
    float lo, scale;
    group_params<T, BITS>(mn, mx, lo, scale);
    int32_t* out = static_cast<int32_t*>(p.k_codes.data) + b * p.k_codes.stride[0] + h * p.k_codes.stride[1] + (gi * G / P) * p.k_codes.stride[2] + d;
    for (int w = 0; w < G / P; ++w) {
      uint32_t word = 0;
      for (int j = 0; j < P; ++j) {
        const int tt = w * P + j;
        const float v = ldg(x + tt * p.k_in.stride[2]) - (m ? ldg(m + tt * p.k_mean.stride[1]) : 0.f);
        word |= encode<BITS>(v, lo, scale) << (j * BITS);
      }
      out[w * p.k_codes.stride[2]] = static_cast<int32_t>(word);
    }
    st(static_cast<T*>(p.k_scale.data) + b * p.k_scale.stride[0] + h * p.k_scale.stride[1] + gi * p.k_scale.stride[2] + d, scale);
    st(static_cast<T*>(p.k_min.data) + b * p.k_min.stride[0] + h * p.k_min.stride[1] + gi * p.k_min.stride[2] + d, lo);
  }
}

// One thread per (b, h, slot, value group): G channels of one token.
template <typename T, int BITS>
__global__ void __launch_bounds__(kQuantThreads) quant_values_kernel(QuantArgs a) {
  constexpr int P = 32 / BITS;
  const QuantKVParams& p = a.p;
  const int64_t D = p.head_dim, C = p.capacity, R = p.residual, H = p.num_kv_heads;
  const int G = p.group;
  const int64_t nvg = D / G;
  const int64_t lim = p.in_tokens < C ? p.in_tokens : C;
  const int64_t total = p.batch * H * C * nvg;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t gj = i % nvg, t = (i / nvg) % C, h = (i / (nvg * C)) % H, b = i / (nvg * C * H);
    const int64_t L = clamp_len(p, b, h, lim);
    if (t >= (L > R ? L - R : 0)) continue;
    const T* x = static_cast<const T*>(p.v_in.data) + b * p.v_in.stride[0] + h * p.v_in.stride[1] + t * p.v_in.stride[2] + gj * G;
    const T* m = p.v_mean.data ? static_cast<const T*>(p.v_mean.data) + b * p.v_mean.stride[0] + t * p.v_mean.stride[1] + gj * G : nullptr;
    float mn = __int_as_float(0x7f800000), mx = -mn;
    for (int j = 0; j < G; ++j) {
      const float v = ldg(x + j) - (m ? ldg(m + j) : 0.f);
      mn = fminf(mn, v);
      mx = fmaxf(mx, v);
    }
    float lo, scale;
    group_params<T, BITS>(mn, mx, lo, scale);
    int32_t* out = static_cast<int32_t*>(p.v_codes.data) + b * p.v_codes.stride[0] + h * p.v_codes.stride[1] + t * p.v_codes.stride[2] + gj * (G / P);
    for (int w = 0; w < G / P; ++w) {
      uint32_t word = 0;
      for (int j = 0; j < P; ++j) {
        const int c = w * P + j;
        word |= encode<BITS>(ldg(x + c) - (m ? ldg(m + c) : 0.f), lo, scale) << (j * BITS);
      }
      out[w] = static_cast<int32_t>(word);
    }
    st(static_cast<T*>(p.v_scale.data) + b * p.v_scale.stride[0] + h * p.v_scale.stride[1] + t * p.v_scale.stride[2] + gj, scale);
    st(static_cast<T*>(p.v_min.data) + b * p.v_min.stride[0] + h * p.v_min.stride[1] + t * p.v_min.stride[2] + gj, lo);
  }
}

// The rings: keys of [L - L % R, L), values of [max(L - R, 0), L), raw.
template <typename T>
__global__ void __launch_bounds__(kQuantThreads) quant_rings_kernel(QuantArgs a) {
  const QuantKVParams& p = a.p;
  const int64_t D = p.head_dim, C = p.capacity, R = p.residual, H = p.num_kv_heads;
  const int64_t lim = p.in_tokens < C ? p.in_tokens : C;
  const int64_t total = p.batch * H * R * D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = i % D, j = (i / D) % R, h = (i / (D * R)) % H, b = i / (D * R * H);
    const int64_t L = clamp_len(p, b, h, lim);
    const int64_t tk = L - L % R + j, tv = (L > R ? L - R : 0) + j;
    if (tk < L)
      static_cast<T*>(p.k_res.data)[b * p.k_res.stride[0] + h * p.k_res.stride[1] + (tk % R) * p.k_res.stride[2] + d] =
          __ldg(static_cast<const T*>(p.k_in.data) + b * p.k_in.stride[0] + h * p.k_in.stride[1] + tk * p.k_in.stride[2] + d);
    if (tv < L)
      static_cast<T*>(p.v_res.data)[b * p.v_res.stride[0] + h * p.v_res.stride[1] + (tv % R) * p.v_res.stride[2] + d] =
          __ldg(static_cast<const T*>(p.v_in.data) + b * p.v_in.stride[0] + h * p.v_in.stride[1] + tv * p.v_in.stride[2] + d);
  }
}

// ===========================================================================
// Append: ONE launch. A CTA owns heads [h0, h0 + nh) of batch element b: all
// of them when mean-centred (the means couple the heads and the value leaving
// the ring is overwritten by the new token, so no other CTA may touch them),
// else one head per CTA. Everything is decided from lengths on the device.
// Shared memory: nh * D floats (the deviations of the value leaving the ring).
// ===========================================================================
struct AppendArgs {
  QuantKVParams p;
  int heads_per_cta;
};

template <typename T, int BITS>
__global__ void __launch_bounds__(kQuantThreads) quant_append_kernel(AppendArgs a) {
  constexpr int P = 32 / BITS;
  extern __shared__ __align__(16) unsigned char smem[];
  float* xs = reinterpret_cast<float*>(smem);
  const QuantKVParams& p = a.p;
  const int nh = a.heads_per_cta;
  const int64_t H = p.num_kv_heads, D = p.head_dim, C = p.capacity, R = p.residual;
  const int G = p.group;
  const int64_t ctas_per_b = H / nh;
  const int64_t b = blockIdx.x / ctas_per_b, h0 = (blockIdx.x % ctas_per_b) * nh;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t t = p.lengths[b * p.lengths_stride_b + h0 * p.lengths_stride_h];
  const bool centred = p.k_mean.data != nullptr;
  if (t < 0 || t >= C) return;  // uniform over the CTA: no barrier is skipped by some threads only
  const int64_t slot = t % R;
  T* kres = static_cast<T*>(p.k_res.data) + b * p.k_res.stride[0];
  T* vres = static_cast<T*>(p.v_res.data) + b * p.v_res.stride[0];

  // ---- 1. the value leaving the ring (token t - R) becomes codes ----
  if (t >= R) {
    const int64_t s = t - R;
    for (int64_t i = tid; i < nh * D; i += kQuantThreads) {
      const int64_t hh = i / D, d = i % D;
      float x = ld(vres + (h0 + hh) * p.v_res.stride[1] + slot * p.v_res.stride[2] + d);
      if (centred) {
        float m = 0.f;
        for (int64_t k = 0; k < H; ++k) m += ld(vres + k * p.v_res.stride[1] + slot * p.v_res.stride[2] + d);
        m = round_t<T>(__fdiv_rn(m, static_cast<float>(H)));
        if (hh == 0) st(static_cast<T*>(p.v_mean.data) + b * p.v_mean.stride[0] + s * p.v_mean.stride[1] + d, m);
        x -= m;
      }
      xs[i] = x;
    }
    __syncthreads();
    const int64_t nvg = D / G;
    for (int64_t i = tid; i < nh * nvg; i += kQuantThreads) {
      const int64_t hh = i / nvg, gj = i % nvg, h = h0 + hh;
      const float* x = xs + hh * D + gj * G;
      float mn = __int_as_float(0x7f800000), mx = -mn;
      for (int j = 0; j < G; ++j) {
        mn = fminf(mn, x[j]);
        mx = fmaxf(mx, x[j]);
      }
      float lo, scale;
      group_params<T, BITS>(mn, mx, lo, scale);
      int32_t* out = static_cast<int32_t*>(p.v_codes.data) + b * p.v_codes.stride[0] + h * p.v_codes.stride[1] + s * p.v_codes.stride[2] + gj * (G / P);
      for (int w = 0; w < G / P; ++w) {
        uint32_t word = 0;
        for (int j = 0; j < P; ++j) word |= encode<BITS>(x[w * P + j], lo, scale) << (j * BITS);
        out[w] = static_cast<int32_t>(word);
      }
      st(static_cast<T*>(p.v_scale.data) + b * p.v_scale.stride[0] + h * p.v_scale.stride[1] + s * p.v_scale.stride[2] + gj, scale);
      st(static_cast<T*>(p.v_min.data) + b * p.v_min.stride[0] + h * p.v_min.stride[1] + s * p.v_min.stride[2] + gj, lo);
    }
    __syncthreads();  // every read of the old ring slot is done
  }

  // ---- 2. the new token into ring slot t % R ----
  for (int64_t i = tid; i < nh * D; i += kQuantThreads) {
    const int64_t h = h0 + i / D, d = i % D;
    kres[h * p.k_res.stride[1] + slot * p.k_res.stride[2] + d] =
        __ldg(static_cast<const T*>(p.k_in.data) + b * p.k_in.stride[0] + h * p.k_in.stride[1] + d);
    vres[h * p.v_res.stride[1] + slot * p.v_res.stride[2] + d] =
        __ldg(static_cast<const T*>(p.v_in.data) + b * p.v_in.stride[0] + h * p.v_in.stride[1] + d);
  }
  __syncthreads();

  // ---- 3. a full ring: its R keys (tokens t + 1 - R .. t) become codes ----
  if ((t + 1) % R == 0) {
    const int64_t s0 = t + 1 - R;
    if (centred) {
      T* km = static_cast<T*>(p.k_mean.data) + b * p.k_mean.stride[0];
      for (int64_t i = tid; i < R * D; i += kQuantThreads) {
        const int64_t j = i / D, d = i % D;
        float m = 0.f;
        for (int64_t k = 0; k < H; ++k) m += ld(kres + k * p.k_res.stride[1] + j * p.k_res.stride[2] + d);
        st(km + (s0 + j) * p.k_mean.stride[1] + d, __fdiv_rn(m, static_cast<float>(H)));
      }
      __syncthreads();  // the block's own global writes are visible to it after the barrier
    }
    const T* km = centred ? static_cast<const T*>(p.k_mean.data) + b * p.k_mean.stride[0] + s0 * p.k_mean.stride[1] : nullptr;
    const int64_t ng = R / G;
    for (int64_t i = tid; i < nh * ng * D; i += kQuantThreads) {
      const int64_t d = i % D, gi = (i / D) % ng, h = h0 + i / (D * ng);
      const T* x = kres + h * p.k_res.stride[1] + gi * G * p.k_res.stride[2] + d;  // ring slot j = token s0 + j
      const T* m = km ? km + gi * G * p.k_mean.stride[1] + d : nullptr;
      float mn = __int_as_float(0x7f800000), mx = -mn;
      for (int j = 0; j < G; ++j) {
        const float v = ld(x + j * p.k_res.stride[2]) - (m ? ld(m + j * p.k_mean.stride[1]) : 0.f);
        mn = fminf(mn, v);
        mx = fmaxf(mx, v);
      }
      float lo, scale;
      group_params<T, BITS>(mn, mx, lo, scale);
      int32_t* out = static_cast<int32_t*>(p.k_codes.data) + b * p.k_codes.stride[0] + h * p.k_codes.stride[1] + ((s0 + gi * G) / P) * p.k_codes.stride[2] + d;
      for (int w = 0; w < G / P; ++w) {
        uint32_t word = 0;
        for (int j = 0; j < P; ++j) {
          const int tt = w * P + j;
          word |= encode<BITS>(ld(x + tt * p.k_res.stride[2]) - (m ? ld(m + tt * p.k_mean.stride[1]) : 0.f), lo, scale)
                  << (j * BITS);
        }
        out[w * p.k_codes.stride[2]] = static_cast<int32_t>(word);
      }
      const int64_t kg = s0 / G + gi;
      st(static_cast<T*>(p.k_scale.data) + b * p.k_scale.stride[0] + h * p.k_scale.stride[1] + kg * p.k_scale.stride[2] + d, scale);
      st(static_cast<T*>(p.k_min.data) + b * p.k_min.stride[0] + h * p.k_min.stride[1] + kg * p.k_min.stride[2] + d, lo);
    }
  }
  __syncthreads();  // every thread read lengths before it changes
  if (tid < nh) p.lengths[b * p.lengths_stride_b + (h0 + tid) * p.lengths_stride_h] = static_cast<int32_t>(t + 1);
}

// ===========================================================================
// Launch sequences over a launcher L: cudaError_t L(kernel, blocks, threads,
// smem, args); it refuses shared memory above the device limit.
// ===========================================================================
inline bool layout_ok(const QuantKVParams& p) {
  const int b = p.bits, G = p.group;
  if (b != 2 && b != 4 && b != 8) return false;
  if (G != 32 && G != 64 && G != 128) return false;
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256) return false;
  if (p.head_dim % G != 0 || p.residual <= 0 || p.residual % G != 0 || p.capacity <= 0 ||
      p.capacity % p.residual != 0)
    return false;
  if (p.batch < 0 || p.num_kv_heads <= 0) return false;
  if ((p.k_mean.data == nullptr) != (p.v_mean.data == nullptr)) return false;
  return p.k_codes.data && p.k_scale.data && p.k_min.data && p.v_codes.data && p.v_scale.data && p.v_min.data && p.k_res.data && p.v_res.data && p.lengths;
}

inline bool attention_ok(const QuantKVParams& p) {
  return layout_ok(p) && p.q && p.out && p.num_q_heads > 0 && p.num_q_heads % p.num_kv_heads == 0 &&
         p.num_q_heads / p.num_kv_heads <= kMaxGroupHeads;
}

// Whether run_quant_decode_attention takes the tensor-core kernel for p.
inline bool uses_tc(const QuantKVParams& p) {
  return p.kernel_variant == 2 || (p.kernel_variant == 0 && p.dtype != QuantDType::kFloat32);
}

// Shared memory per CTA of the tensor-core kernel for a format (0 for an unknown one).
inline size_t tc_smem_bytes(int bits, int64_t D) {
  size_t smem = 0;
#define KVKERN_TC_SMEM(B_, D_) \
  if (bits == B_ && D == D_) smem = TcCfg<B_, D_>::SMEM;
  KVKERN_TC_SMEM(2, 64) KVKERN_TC_SMEM(4, 64) KVKERN_TC_SMEM(8, 64)
  KVKERN_TC_SMEM(2, 128) KVKERN_TC_SMEM(4, 128) KVKERN_TC_SMEM(8, 128)
  KVKERN_TC_SMEM(2, 256) KVKERN_TC_SMEM(4, 256) KVKERN_TC_SMEM(8, 256)
#undef KVKERN_TC_SMEM
  return smem;
}

// What kernel_variant 0 (auto) stands for on a device with max_smem bytes of opt-in shared
// memory per block: the tensor-core kernel (2) for fp16 / bf16 caches where it fits, else the
// scalar one (1). 8-bit D=256 needs ~162 KB, which A100 and H100 have and sm_86 / sm_89 /
// sm_120 (99 KB) do not. An explicit variant comes back as it is.
inline int resolve_kernel_variant(const QuantKVParams& p, size_t max_smem) {
  if (p.kernel_variant != 0) return p.kernel_variant;
  return p.dtype != QuantDType::kFloat32 && tc_smem_bytes(p.bits, p.head_dim) <= max_smem ? 2 : 1;
}

// Resident CTAs per SM of the tensor-core kernel: ptxas gives it up to 255
// registers (2 CTAs of 128 threads), fewer where shared memory binds (D = 256).
inline int tc_ctas_per_sm(int bits, int64_t D) {
  const size_t smem = tc_smem_bytes(bits, D);
  const size_t fit = smem > 0 ? (227u * 1024u) / (smem + 1024u) : 1;
  return fit >= 2 ? 2 : 1;
}

// The tensor-core kernel: CTAs of 4 warps that each want >= 1 block of 32
// slots, ~2 resident per SM. S minimizes the time in waves, ceil(B Hkv S /
// slots) / S, the smallest S within 5 % of the best (fewer splits, less merge).
inline int default_splits_tc(const QuantKVParams& p, int num_sms) {
  const int64_t heads = p.batch * p.num_kv_heads;
  if (heads <= 0) return 1;
  const int64_t slots = static_cast<int64_t>(num_sms > 0 ? num_sms : 132) * tc_ctas_per_sm(p.bits, p.head_dim);
  int64_t max_s = ceil_div<int64_t>(p.capacity, kTcBlock * kTcWarps);
  if (max_s > 256) max_s = 256;
  if (max_s < 1) max_s = 1;
  double best = 0.0;
  for (int64_t s = 1; s <= max_s; ++s) {
    const double t = static_cast<double>(ceil_div<int64_t>(heads * s, slots)) / static_cast<double>(s);
    if (s == 1 || t < best) best = t;
  }
  for (int64_t s = 1; s <= max_s; ++s) {
    const double t = static_cast<double>(ceil_div<int64_t>(heads * s, slots)) / static_cast<double>(s);
    if (t <= best * 1.05) return static_cast<int>(s);
  }
  return 1;
}

inline int default_splits(const QuantKVParams& p, int num_sms) {
  if (uses_tc(p) && p.kernel_variant >= 0 && p.kernel_variant <= 2) return default_splits_tc(p, num_sms);
  const int64_t tiles = ceil_div<int64_t>(p.capacity, kTile);
  const int64_t heads = p.batch * p.num_kv_heads;
  if (heads <= 0) return 1;
  int64_t s = ceil_div<int64_t>(4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 132), heads);
  if (s > tiles) s = tiles;
  if (s > 256) s = 256;
  return static_cast<int>(s < 1 ? 1 : s);
}

inline size_t attention_ws_bytes(const QuantKVParams& p, int S) {
  if (S <= 1) return 0;
  const size_t n = static_cast<size_t>(p.batch * p.num_q_heads) * static_cast<size_t>(S) *
                   static_cast<size_t>(p.head_dim + 1) * 4;
  return (n + 255) / 256 * 256;
}

inline void set_attention_ws(QuantKVParams& p, int S, void* ws) {
  if (S <= 1) {
    p.partial_out = p.partial_lse = nullptr;
    return;
  }
  p.partial_out = static_cast<float*>(ws);
  p.partial_lse = p.partial_out + p.batch * p.num_q_heads * S * p.head_dim;
}

inline bool aligned16(const void* ptr, int64_t sb, int64_t sh, int64_t sr) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && sb % 4 == 0 && sh % 4 == 0 && sr % 4 == 0;
}

// The tensor-core kernel (quant_decode_tc.cuh): 16-bit caches only.
template <typename T, int BITS, int D, typename L>
cudaError_t run_attention_tc(const QuantKVParams& p, L& launch) {
  if constexpr (sizeof(T) != 2) {
    return cudaErrorInvalidValue;
  } else {
    TcArgs a{p, p.num_splits, 0};
    const int64_t blocks32 = ceil_div<int64_t>(p.capacity, kTcBlock);
    a.blocks_per_split = static_cast<int>(ceil_div<int64_t>(blocks32, a.num_splits));
    const int64_t blocks = p.batch * p.num_kv_heads * a.num_splits;
    KVKERN_CUDA_TRY(launch(quant_decode_tc_kernel<T, BITS, D>, blocks, kTcThreads, TcCfg<BITS, D>::SMEM, a));
    return launch_split_merge<T>(p, a.num_splits, launch);
  }
}

// kernel_variant: 0 = auto (resolve_kernel_variant), 1 = scalar (v1), 2 = tensor
// core (fp16 / bf16 only: refused for fp32, or where its shared memory does not fit).
template <typename T, int BITS, int D, typename L>
cudaError_t run_attention_typed(const QuantKVParams& p, L& launch) {
  if (resolve_kernel_variant(p, launch.max_smem()) == 2) return run_attention_tc<T, BITS, D>(p, launch);
  AttnArgs a{p, p.num_splits, 0, false, false};
  const int64_t tiles = ceil_div<int64_t>(p.capacity, kTile);
  a.tiles_per_split = static_cast<int>(ceil_div<int64_t>(tiles, a.num_splits));
  a.vec_k = aligned16(p.k_codes.data, p.k_codes.stride[0], p.k_codes.stride[1], p.k_codes.stride[2]);
  a.vec_v = aligned16(p.v_codes.data, p.v_codes.stride[0], p.v_codes.stride[1], p.v_codes.stride[2]);
  const int64_t blocks = p.batch * p.num_kv_heads * a.num_splits;
  KVKERN_CUDA_TRY(launch(quant_decode_kernel<T, BITS, D>, blocks, kAttnThreads, AttnCfg<BITS, D>::SMEM, a));
  return launch_split_merge<T>(p, a.num_splits, launch);
}

template <typename T, int BITS, typename L>
cudaError_t run_attention_bits(const QuantKVParams& p, L& launch) {
  switch (p.head_dim) {
    case 64: return run_attention_typed<T, BITS, 64>(p, launch);
    case 128: return run_attention_typed<T, BITS, 128>(p, launch);
    case 256: return run_attention_typed<T, BITS, 256>(p, launch);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T, typename L>
cudaError_t run_attention_t(const QuantKVParams& p, L& launch) {
  switch (p.bits) {
    case 2: return run_attention_bits<T, 2>(p, launch);
    case 4: return run_attention_bits<T, 4>(p, launch);
    case 8: return run_attention_bits<T, 8>(p, launch);
    default: return cudaErrorInvalidValue;
  }
}

// p.num_splits must be resolved (>= 1); with S > 1 the partial buffers set.
template <typename L>
cudaError_t run_quant_decode_attention(const QuantKVParams& p, KvDtype dt, L& launch) {
  if (!attention_ok(p) || p.num_splits < 1) return cudaErrorInvalidValue;
  if (p.kernel_variant < 0 || p.kernel_variant > 2) return cudaErrorInvalidValue;
  if (p.kernel_variant == 2 && dt == KvDtype::kFloat32) return cudaErrorInvalidValue;
  if (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  switch (dt) {
    case KvDtype::kFloat32: return run_attention_t<float>(p, launch);
    case KvDtype::kFloat16: return run_attention_t<__half>(p, launch);
    case KvDtype::kBFloat16: return run_attention_t<__nv_bfloat16>(p, launch);
  }
  return cudaErrorInvalidValue;
}

inline int64_t grid_for(int64_t work) {
  const int64_t blocks = ceil_div<int64_t>(work, kQuantThreads);
  return blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks);
}

template <typename T, int BITS, typename L>
cudaError_t run_quantize_typed(const QuantKVParams& p, L& launch) {
  QuantArgs a{p};
  const int64_t B = p.batch, H = p.num_kv_heads, C = p.capacity, D = p.head_dim;
  if (p.k_mean.data) KVKERN_CUDA_TRY(launch(quant_mean_kernel<T>, grid_for(B * C * D * 2), kQuantThreads, 0, a));
  KVKERN_CUDA_TRY(launch(quant_keys_kernel<T, BITS>, grid_for(B * H * (C / p.group) * D), kQuantThreads, 0, a));
  KVKERN_CUDA_TRY(launch(quant_values_kernel<T, BITS>, grid_for(B * H * C * (D / p.group)), kQuantThreads, 0, a));
  return launch(quant_rings_kernel<T>, grid_for(B * H * p.residual * D), kQuantThreads, 0, a);
}

template <typename T, int BITS, typename L>
cudaError_t run_append_typed(const QuantKVParams& p, L& launch) {
  AppendArgs a{p, p.k_mean.data ? static_cast<int>(p.num_kv_heads) : 1};
  const size_t smem = static_cast<size_t>(a.heads_per_cta) * static_cast<size_t>(p.head_dim) * 4;
  return launch(quant_append_kernel<T, BITS>, p.batch * (p.num_kv_heads / a.heads_per_cta), kQuantThreads, smem, a);
}


template <typename L>
cudaError_t dispatch_quantize(const QuantKVParams& p, KvDtype dt, L& launch, bool append) {
#define KVKERN_Q_CASE(TYPE)                                                                   \
  switch (p.bits) {                                                                           \
    case 2: return append ? run_append_typed<TYPE, 2>(p, launch) : run_quantize_typed<TYPE, 2>(p, launch); \
    case 4: return append ? run_append_typed<TYPE, 4>(p, launch) : run_quantize_typed<TYPE, 4>(p, launch); \
    case 8: return append ? run_append_typed<TYPE, 8>(p, launch) : run_quantize_typed<TYPE, 8>(p, launch); \
    default: return cudaErrorInvalidValue;                                                    \
  }
  switch (dt) {
    case KvDtype::kFloat32: KVKERN_Q_CASE(float)
    case KvDtype::kFloat16: KVKERN_Q_CASE(__half)
    case KvDtype::kBFloat16: KVKERN_Q_CASE(__nv_bfloat16)
  }
#undef KVKERN_Q_CASE
  return cudaErrorInvalidValue;
}

template <typename L>
cudaError_t run_quantize_kv(const QuantKVParams& p, KvDtype dt, L& launch) {
  if (!layout_ok(p) || !p.k_in.data || !p.v_in.data || p.in_tokens < 0) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  return dispatch_quantize(p, dt, launch, false);
}

template <typename L>
cudaError_t run_append_quantized_kv(const QuantKVParams& p, KvDtype dt, L& launch) {
  if (!layout_ok(p) || !p.k_in.data || !p.v_in.data) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  return dispatch_quantize(p, dt, launch, true);
}

}  // namespace quant_detail
}  // namespace kvkern
