# SPDX-License-Identifier: Apache-2.0
"""STUB: Triton launcher for decode_attention (being written)."""


def decode_attention_triton(q, k_cache, v_cache, lengths, log_w=None, sm_scale=None,
                            num_splits=0, block_n=0, num_warps=0, num_stages=0):
    raise NotImplementedError("decode_attention_triton is being written")
