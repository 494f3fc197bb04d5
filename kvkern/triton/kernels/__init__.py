# SPDX-License-Identifier: Apache-2.0
"""``@triton.jit`` kernels only: no launchers, no torch. Launchers live one level up."""

from .decode_attention import decode_attention_split_kernel, merge_states_kernel

__all__ = ["decode_attention_split_kernel", "merge_states_kernel"]
