// SPDX-License-Identifier: Apache-2.0
// Host interface of the CUDA kernels of the FP8 KV cache (kvkern/reference.py
// "FP8 KV"). No torch and no device types: the g++-built glue fills one
// Fp8KVParams (fp8_params.h, the struct the CPU kernels read) and calls a
// launch_* function. Kernels: fp8_kv.cuh; instantiations: csrc/kernels/fp8_inst.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "decode_attention_launch.h"  // KvDtype
#include "fp8_params.h"

namespace kvkern {

// What the attention kernel serves: D in {64, 128, 256}, Hq a multiple of Hkv,
// the fp8 rows 8-byte aligned (base pointers and the b / h / slot strides of
// k_fp8 and v_fp8 multiples of 8 bytes). The glue checks first and points
// elsewhere (the Triton twin) otherwise; launch_* return cudaErrorInvalidValue.
bool fp8_decode_attention_supported(const Fp8KVParams& p);

// Splits when p.num_splits == 0: about 16 CTAs per SM, at least 256 slots per split.
int fp8_decode_default_splits(const Fp8KVParams& p, int num_sms);

// out, lse = attention of q over the fp8 cache, codes decoded in registers
// (k_scale folded into the logit scale, v_scale into the output). With
// p.num_splits > 1, p.partial_out [B, Hq, S, D] and p.partial_lse [B, Hq, S]
// (fp32, contiguous) are the split-K workspace, merged by the quantized cache's
// merge kernel (decode_attention's combine). A length outside [0, C] writes NaN to that head group.
cudaError_t launch_fp8_decode_attention(const Fp8KVParams& p, KvDtype dtype, cudaStream_t stream);

// Prefill: codes of tokens t < min(lengths[b, h], T_in) of every head; nothing else
// is written. A negative length writes nothing for that head.
cudaError_t launch_quantize_fp8_kv(const Fp8KVParams& p, KvDtype dtype, cudaStream_t stream);

// One decode step, ONE launch, no host sync (graph-capturable): each head's new
// token into slot t = lengths[b, h], then lengths[b, h] = t + 1. A t outside
// [0, C) (a full head) leaves that head untouched, lengths included: never an
// out-of-bounds write (the CPU op raises instead).
cudaError_t launch_append_fp8_kv(const Fp8KVParams& p, KvDtype dtype, cudaStream_t stream);

}  // namespace kvkern
