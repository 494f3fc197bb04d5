// SPDX-License-Identifier: Apache-2.0
// Plain description of one call of a quantized-KV op (quantize_kv_, dequantize_kv,
// append_quantized_kv_, quant_decode_attention): the ONE struct the torch glue
// fills and both the CPU kernels (csrc/cpu/quant_kernel.h) and the CUDA kernels
// (quant_kv.cuh, passed by value as a kernel argument, so it stays trivially
// copyable) read. No framework types: pointers, sizes and strides in elements.
//
// The layout is kvkern/reference.py's "Quantized KV" block (b = bits, G = group,
// R = residual ring, C = capacity, P = 32 / b codes per int32 word, T = the cache
// dtype fp32 / fp16 / bf16):
//   k_codes [B, Hkv, C / P, D] int32     keys per channel, tokens packed LSB first
//   k_scale, k_min [B, Hkv, C / G, D] T  per (group of G tokens, channel)
//   v_codes [B, Hkv, C, D / P] int32     values per token, channels packed LSB first
//   v_scale, v_min [B, Hkv, C, D / G] T  per (token, group of G channels)
//   k_res, v_res [B, Hkv, R, D] T        full-precision ring, token t at slot t % R
//   k_mean, v_mean [B, C, D] T           TaDA mean over kv heads, or data == nullptr
//   lengths [B, Hkv] int32
// With L = lengths[b, j]: keys [0, L - L % R) are codes, [L - L % R, L) in the ring;
// values [0, max(L - R, 0)) are codes, the newest min(L, R) in the ring.
#pragma once

#include <cstdint>
#include <type_traits>

// Members that device code calls too.
#if defined(__CUDACC__)
#define KVKERN_QUANT_HD __host__ __device__
#else
#define KVKERN_QUANT_HD
#endif

namespace kvkern {

enum class QuantDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One tensor of up to four dims. Only the last dim must be contiguous; the
// strides of the leading dims are free (a 3-D tensor uses stride[0..2]).
struct QuantTensorRef {
  void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};
  KVKERN_QUANT_HD bool present() const { return data != nullptr; }
};

struct QuantKVParams {
  // ---- the quantized cache (all ops) ----
  QuantTensorRef k_codes, k_scale, k_min;  // see the layout above
  QuantTensorRef v_codes, v_scale, v_min;
  QuantTensorRef k_res, v_res;
  QuantTensorRef k_mean, v_mean;  // both present (mean-centred) or both absent
  int32_t* lengths = nullptr;  // [B, Hkv]; append_quantized_kv_ increments it
  int64_t lengths_stride_b = 0, lengths_stride_h = 0;

  int64_t batch = 0;         // B
  int64_t num_kv_heads = 0;  // Hkv
  int64_t capacity = 0;      // C, a multiple of R
  int64_t head_dim = 0;      // D, a multiple of G
  int64_t residual = 0;      // R, a multiple of G
  int bits = 4;              // 2, 4 or 8
  int group = 32;            // G: 32, 64 or 128
  QuantDType dtype = QuantDType::kFloat32;  // T: k/v/q, scales, mins, rings, means, outputs

  // ---- quantize_kv_: the dense source k, v [B, Hkv, T_in, D] (T_in <= C) ----
  // ---- append_quantized_kv_: the new token k_new, v_new [B, Hkv, D] ----
  QuantTensorRef k_in, v_in;
  int64_t in_tokens = 0;  // T_in (quantize_kv_ only)

  // ---- dequantize_kv: dense outputs k, v [B, Hkv, C, D], T, contiguous ----
  void* k_out = nullptr;
  void* v_out = nullptr;

  // ---- quant_decode_attention ----
  const void* q = nullptr;  // [B, Hq, D], T (the CUDA kernel: Hq / Hkv <= 8)
  int64_t q_stride_b = 0, q_stride_h = 0;
  int64_t num_q_heads = 0;   // Hq, a multiple of Hkv
  void* out = nullptr;       // [B, Hq, D], T, contiguous
  float* lse = nullptr;      // [B, Hq] fp32, contiguous
  float sm_scale = 1.0f;
  // Split-K: each (b, kv head) is cut into num_splits chunks of whole tiles;
  // with num_splits > 1 the partial states go to [B, Hq, S, D] / [B, Hq, S]
  // fp32 buffers and are merged like decode_attention's. The CPU glue always
  // resolves it; the CUDA launchers take 0 as quant_decode_default_splits.
  int num_splits = 1;
  int block_n = 64;  // CPU: tokens per tile (a multiple of 32 keeps tiles word-aligned)
  float* partial_out = nullptr;
  float* partial_lse = nullptr;
  // CUDA attention kernel: 0 = auto (tensor cores for fp16 / bf16, scalar for
  // fp32), 1 = the scalar kernel, 2 = the tensor-core kernel (fp16 / bf16
  // only). A benchmarking switch (KVKERN_QUANT_DECODE_KERNEL in the glue);
  // the CPU kernels ignore it.
  int kernel_variant = 0;

  KVKERN_QUANT_HD int codes_per_word() const { return 32 / bits; }
  KVKERN_QUANT_HD int64_t group_size() const { return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0; }  // GQA ratio
  KVKERN_QUANT_HD bool mean_centred() const { return k_mean.present(); }
  KVKERN_QUANT_HD int32_t length(int64_t b, int64_t j) const {
    return lengths[b * lengths_stride_b + j * lengths_stride_h];
  }
};

static_assert(std::is_trivially_copyable<QuantKVParams>::value, "QuantKVParams is a CUDA kernel argument");

}  // namespace kvkern
