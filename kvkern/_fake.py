# SPDX-License-Identifier: Apache-2.0
"""Fake (meta) implementations of every kvkern op, in one place.

They describe output shapes and dtypes for torch.compile and FakeTensor tracing
and never touch data. Shape rules are stated with torch._check.
"""

from __future__ import annotations

import torch


def _decode_attention_fake(q, k_cache, v_cache, lengths, log_w=None, sm_scale=None,
                           num_splits=0, block_n=0, num_warps=0, num_stages=0):
    torch._check(q.dim() == 3, lambda: "decode_attention: q must be [B, Hq, D]")
    torch._check(k_cache.dim() == 4, lambda: "decode_attention: k_cache must be [B, Hkv, C, D]")
    B, Hq, D = q.shape
    out = q.new_empty((B, Hq, D))
    lse = q.new_empty((B, Hq), dtype=torch.float32)
    return out, lse


for _name in ("kvkern::decode_attention", "kvkern::decode_attention_triton"):
    torch.library.register_fake(_name)(_decode_attention_fake)
