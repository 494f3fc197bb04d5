// SPDX-License-Identifier: Apache-2.0
// Host interface of the CUDA kernels for the quantized KV layout of
// kvkern/reference.py ("Quantized KV"). No torch and no device types: the
// g++-built glue fills one QuantCudaParams and calls a launch_* function.
// Kernels: quant_kv.cuh; instantiations: csrc/kernels/quant_inst.cu; design
// and expected performance: QUANT_CUDA.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "decode_attention_launch.h"  // KvDtype

namespace kvkern {

// One layer's quantized cache plus the per-op inputs. All strides in ELEMENTS
// of the tensor's own type; the last dim of every tensor must be contiguous.
// T = the storage dtype (fp32 / fp16 / bf16) of scale / min / res / mean / q /
// out / k / v. b = bits, P = 32 / b, G = group, R = residual, C = capacity.
struct QuantCudaParams {
  // ---- the layout (reference.py) ----
  int32_t* k_codes = nullptr;  // [B, Hkv, C / P, D] int32
  void* k_scale = nullptr;     // [B, Hkv, C / G, D]
  void* k_min = nullptr;       // [B, Hkv, C / G, D]
  int32_t* v_codes = nullptr;  // [B, Hkv, C, D / P] int32
  void* v_scale = nullptr;     // [B, Hkv, C, D / G]
  void* v_min = nullptr;       // [B, Hkv, C, D / G]
  void* k_res = nullptr;       // [B, Hkv, R, D]
  void* v_res = nullptr;       // [B, Hkv, R, D]
  void* k_mean = nullptr;      // [B, C, D] or nullptr (not mean-centred)
  void* v_mean = nullptr;      // [B, C, D] or nullptr (both or neither)
  int32_t* lengths = nullptr;  // [B, Hkv]; append increments it

  // (stride over b, over h, over the row dim) of each [B, Hkv, rows, cols] tensor.
  int64_t k_codes_sb = 0, k_codes_sh = 0, k_codes_sr = 0;
  int64_t k_scale_sb = 0, k_scale_sh = 0, k_scale_sr = 0;
  int64_t k_min_sb = 0, k_min_sh = 0, k_min_sr = 0;
  int64_t v_codes_sb = 0, v_codes_sh = 0, v_codes_sr = 0;
  int64_t v_scale_sb = 0, v_scale_sh = 0, v_scale_sr = 0;
  int64_t v_min_sb = 0, v_min_sh = 0, v_min_sr = 0;
  int64_t k_res_sb = 0, k_res_sh = 0, k_res_sr = 0;
  int64_t v_res_sb = 0, v_res_sh = 0, v_res_sr = 0;
  int64_t k_mean_sb = 0, k_mean_sr = 0;  // [B, C, D]
  int64_t v_mean_sb = 0, v_mean_sr = 0;
  int64_t lengths_sb = 0, lengths_sh = 0;

  int64_t batch = 0, num_kv_heads = 0, capacity = 0, head_dim = 0, residual = 0;
  int bits = 4, group = 32;

  // ---- quant_decode_attention ----
  const void* q = nullptr;  // [B, Hq, D]
  int64_t q_sb = 0, q_sh = 0;
  int64_t num_q_heads = 0;  // Hq, a multiple of Hkv, Hq / Hkv <= 8
  void* out = nullptr;      // [B, Hq, D] T, CONTIGUOUS
  float* lse = nullptr;     // [B, Hq] fp32, CONTIGUOUS (natural log)
  float sm_scale = 1.0f;
  int num_splits = 0;       // 0: quant_decode_default_splits
  // Split-K workspace (num_splits > 1): [B, Hq, S, D] and [B, Hq, S] fp32.
  // quant_decode_attention_set_workspace carves both from one buffer.
  float* partial_out = nullptr;
  float* partial_lse = nullptr;

  // ---- quantize_kv_ (prefill): dense k, v [B, Hkv, T_in, D], T_in <= C ----
  const void* k_in = nullptr;
  const void* v_in = nullptr;
  int64_t k_in_sb = 0, k_in_sh = 0, k_in_sr = 0;
  int64_t v_in_sb = 0, v_in_sh = 0, v_in_sr = 0;
  int64_t seq_len = 0;  // T_in

  // ---- append_quantized_kv_: one token per head, k_new, v_new [B, Hkv, D] ----
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  int64_t k_new_sb = 0, k_new_sh = 0;
  int64_t v_new_sb = 0, v_new_sh = 0;

  int64_t group_size() const { return num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0; }
  bool mean_centred() const { return k_mean != nullptr; }
};

// Shapes / parameters the kernels handle (bits {2,4,8}, group {32,64,128},
// R % G == 0, C % R == 0, D in {64, 128, 256}, D % G == 0, Hq / Hkv <= 8 for
// attention, both means or neither, non-null pointers). The glue validates
// and raises first; launch_* return cudaErrorInvalidValue otherwise.
bool quant_layout_supported(const QuantCudaParams& p);
bool quant_decode_attention_supported(const QuantCudaParams& p);

// Splits for quant_decode_attention when p.num_splits == 0: enough CTAs
// (B * Hkv * S) for about 4 per SM, at most one 64-slot tile per split... fewer
// when the cache is short.
int quant_decode_default_splits(const QuantCudaParams& p, int num_sms);

// Workspace of quant_decode_attention with S = num_splits (resolved): 0 when
// S == 1, else B * Hq * S * (D + 1) * 4 bytes rounded up to 256, laid out as
// partial_out [B, Hq, S, D] then partial_lse [B, Hq, S]. Its contents on
// entry do not matter.
size_t quant_decode_attention_workspace_bytes(const QuantCudaParams& p, int num_splits);
void quant_decode_attention_set_workspace(QuantCudaParams& p, int num_splits, void* workspace);

// out, lse = attention of q over the dequantized cache (never materialized).
// A length outside [0, C] writes NaN to that head group's out and lse.
cudaError_t launch_quant_decode_attention(const QuantCudaParams& p, KvDtype dtype, cudaStream_t stream);

// Prefill: the layout from k_in / v_in and lengths (all of every live part is
// written; nothing else). Mean-centred caches use lengths[b, 0] for the mean
// of batch element b (unequal lengths across its heads: that element's
// contents are undefined, never an out-of-bounds access). Workspace: none.
cudaError_t launch_quantize_kv(const QuantCudaParams& p, KvDtype dtype, cudaStream_t stream);

// One decode step, ONE launch, no host sync (graph-capturable): value
// quantization of the token leaving the ring, the new token into the ring,
// the key flush when the ring fills, lengths += 1: all decided on the device
// from lengths. Every head of a batch element must hold the same length
// (the reference takes head 0's); a length outside [0, C) leaves that batch
// element (or head) untouched. Workspace: none.
cudaError_t launch_append_quantized_kv(const QuantCudaParams& p, KvDtype dtype, cudaStream_t stream);

}  // namespace kvkern
