# SPDX-License-Identifier: Apache-2.0
"""``@triton.jit`` helpers shared by the score-and-evict kernels."""

import triton
import triton.language as tl


@triton.jit
def head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity):
    """Head (b, j)'s length, 0 when outside [0, capacity] (such a head is never
    indexed by it), and whether it was outside."""
    length = tl.load(lengths_ptr + b * stride_lb + j * stride_lh)
    bad = (length < 0) | (length > capacity)
    return tl.where(bad, 0, length), bad
