// SPDX-License-Identifier: Apache-2.0
// The outputs of the decode-attention ops (decode_attention, quant_decode_attention,
// fp8_decode_attention), on CPU and CUDA alike: out / lse, and the fp32 split-K
// partials that a merge combines. One definition, so every op's workspace has the
// layout its merge kernel (and the CPU merge_states_rows) reads.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <utility>

#include "checks.h"

namespace kvkern::torch_glue {

// out [B, Hq, D] in q's dtype and lse [B, Hq] fp32, on q's device; their
// pointers go into p (any of the ops' Params: batch, num_q_heads, head_dim,
// out, lse).
template <class Params>
std::pair<Tensor, Tensor> new_attention_outputs(const Tensor& q, Params& p) {
  Tensor out = torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.head_dim});
  Tensor lse = torch::stable::new_empty(q, {p.batch, p.num_q_heads}, ScalarType::Float);
  p.out = out.mutable_data_ptr();
  p.lse = static_cast<float*>(lse.mutable_data_ptr());
  return {out, lse};
}

// With p.num_splits > 1 (resolved): partial_out [B, Hq, S, D] and partial_lse
// [B, Hq, S] fp32, pointers into p; they must outlive the launch, so the caller
// holds the returned tensors. One split needs none: `out` and `lse` come back
// as placeholders and p's partial pointers are left alone.
template <class Params>
std::pair<Tensor, Tensor> new_split_partials(const Tensor& q, Params& p, const Tensor& out, const Tensor& lse) {
  if (p.num_splits <= 1) return {out, lse};
  Tensor partial_out =
      torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.num_splits, p.head_dim}, ScalarType::Float);
  Tensor partial_lse = torch::stable::new_empty(q, {p.batch, p.num_q_heads, p.num_splits}, ScalarType::Float);
  p.partial_out = static_cast<float*>(partial_out.mutable_data_ptr());
  p.partial_lse = static_cast<float*>(partial_lse.mutable_data_ptr());
  return {partial_out, partial_lse};
}

}  // namespace kvkern::torch_glue
