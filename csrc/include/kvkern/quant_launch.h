// SPDX-License-Identifier: Apache-2.0
// Host interface of the CUDA kernels for the quantized KV layout of
// kvkern/reference.py ("Quantized KV"). No torch and no device types: the
// g++-built glue fills one QuantKVParams and calls a launch_* function.
// Kernels: quant_kv.cuh; instantiations: csrc/kernels/quant_inst.cu; design
// and expected performance: QUANT_CUDA.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "decode_attention_launch.h"  // KvDtype
#include "quant_params.h"

namespace kvkern {

// The parameters are QuantKVParams (quant_params.h), the struct the CPU
// kernels read too; the dtype comes as KvDtype. CUDA-specific use of its
// fields: out and lse CONTIGUOUS, lengths written by append, num_splits 0 =
// quant_decode_default_splits, block_n ignored (the kernels' tile is fixed).

// Shapes / parameters the kernels handle (bits {2,4,8}, group {32,64,128},
// R % G == 0, C % R == 0, D in {64, 128, 256}, D % G == 0, Hq / Hkv <= 8 for
// attention, both means or neither, non-null pointers). The glue validates
// and raises first; launch_* return cudaErrorInvalidValue otherwise.
bool quant_layout_supported(const QuantKVParams& p);
bool quant_decode_attention_supported(const QuantKVParams& p);

// The attention kernel that p.kernel_variant 0 (auto) stands for on the current
// device: 2 (tensor core) for fp16 / bf16 caches whose format's shared memory
// fits the device's opt-in limit per block, else 1 (scalar). An explicit
// variant comes back as it is. The next two give the numbers compared.
int quant_decode_resolve_kernel(const QuantKVParams& p);
size_t quant_decode_tc_smem_bytes(const QuantKVParams& p);
size_t quant_decode_device_max_smem();

// Splits for quant_decode_attention when p.num_splits == 0, for the kernel
// that p.dtype and p.kernel_variant select: the scalar kernel (fp32) wants
// enough CTAs (B * Hkv * S) for about 4 per SM, at most one 64-slot tile per
// split; the tensor-core kernel (fp16 / bf16) the S with the least time in
// waves of its ~2 resident CTAs per SM, at least 128 slots per split. Fewer
// when the cache is short.
int quant_decode_default_splits(const QuantKVParams& p, int num_sms);

// Workspace of quant_decode_attention with S = num_splits (resolved): 0 when
// S == 1, else B * Hq * S * (D + 1) * 4 bytes rounded up to 256, laid out as
// partial_out [B, Hq, S, D] then partial_lse [B, Hq, S]. Its contents on
// entry do not matter.
size_t quant_decode_attention_workspace_bytes(const QuantKVParams& p, int num_splits);
void quant_decode_attention_set_workspace(QuantKVParams& p, int num_splits, void* workspace);

// out, lse = attention of q over the dequantized cache (never materialized).
// A length outside [0, C] writes NaN to that head group's out and lse.
cudaError_t launch_quant_decode_attention(const QuantKVParams& p, KvDtype dtype, cudaStream_t stream);

// Prefill: the layout from k_in / v_in and lengths (all of every live part is
// written; nothing else). Mean-centred caches use lengths[b, 0] for the mean
// of batch element b (unequal lengths across its heads: that element's
// contents are undefined, never an out-of-bounds access). Workspace: none.
cudaError_t launch_quantize_kv(const QuantKVParams& p, KvDtype dtype, cudaStream_t stream);

// One decode step, ONE launch, no host sync (graph-capturable): value
// quantization of the token leaving the ring, the new token into the ring,
// the key flush when the ring fills, lengths += 1: all decided on the device
// from lengths. Every head of a batch element must hold the same length
// (the reference takes head 0's); a length outside [0, C) leaves that batch
// element (or head) untouched. Workspace: none.
cudaError_t launch_append_quantized_kv(const QuantKVParams& p, KvDtype dtype, cudaStream_t stream);

}  // namespace kvkern
