# SPDX-License-Identifier: Apache-2.0
"""The compiled variants of the CUDA C++ decode-attention kernel, for the autotuner.

NOTE: this file mirrors C++ and must match it:
  * ``SUPPORTED_VARIANTS`` is ``KVKERN_DECODE_ATTENTION_VARIANTS`` in
    csrc/include/kvkern/decode_attention_launch.h, the list that
    csrc/kernels/decode_attention_inst.cu instantiates;
  * ``SUPPORTED_NUM_STAGES`` is ``[kDecodeAttentionMinStages, kDecodeAttentionMaxStages]``;
  * :func:`heads_tile` is ``decode_attention_heads_tile`` and :func:`smem_bytes`
    is ``decode_attention_smem_bytes`` (same header).
The CUDA glue (csrc/cuda/decode_attention_cuda.cpp) rejects any other
(block_n, num_warps) pair or num_stages with an error, so a config from
:func:`decode_attention_search_space` always runs (on a device whose shared
memory per block is at least ``max_smem_bytes``).
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_VARIANTS", "SUPPORTED_BLOCK_N", "SUPPORTED_NUM_WARPS", "SUPPORTED_NUM_STAGES",
    "DEFAULT_MAX_SMEM_BYTES", "heads_tile", "smem_bytes", "is_supported", "check_config",
    "decode_attention_search_space",
]

# (block_n, num_warps) pairs with a compiled kernel. Not every block_n pairs with
# every num_warps: a pair needs block_n % (4 * num_warps) == 0.
SUPPORTED_VARIANTS: tuple[tuple[int, int], ...] = ((16, 4), (32, 4), (64, 4), (32, 8), (64, 8))
SUPPORTED_BLOCK_N: tuple[int, ...] = tuple(sorted({bn for bn, _ in SUPPORTED_VARIANTS}))
SUPPORTED_NUM_WARPS: tuple[int, ...] = tuple(sorted({nw for _, nw in SUPPORTED_VARIANTS}))
SUPPORTED_NUM_STAGES: tuple[int, ...] = (2, 3, 4)
HEAD_DIMS: tuple[int, ...] = (64, 128, 256)

# The smallest opt-in shared memory per block among the architectures the wheels
# target (sm_86 / sm_89: 99 KiB; sm_80: 163 KiB; sm_90: 227 KiB).
DEFAULT_MAX_SMEM_BYTES = 99 * 1024

_ELEMENT_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
# num_splits candidates; filtered per shape below.
_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_MAX_BLOCKS = 8192             # grid blocks: ~16 waves of 4 resident blocks on 132 SMs
_MAX_IN_FLIGHT = 96 * 1024     # (num_stages - 1) K + V tiles per block beyond this buy nothing


def heads_tile(group: int) -> int:
    """Query heads per block: 1, 2, 4 or 8 (groups above 8 use ceil(group / 8) blocks)."""
    return 1 if group <= 1 else 2 if group <= 2 else 4 if group <= 4 else 8


def smem_bytes(head_dim: int, dtype: torch.dtype, group: int, block_n: int, num_warps: int,
               num_stages: int) -> int:
    """Dynamic shared memory per block of the split kernel (bytes)."""
    stage = 2 * block_n * head_dim * _ELEMENT_SIZE[dtype] + 4 * block_n
    merge = num_warps * heads_tile(group) * (head_dim + 2) * 4
    return max(num_stages * stage, merge)


def is_supported(block_n: int, num_warps: int, num_stages: int = 2) -> bool:
    """Whether the CUDA glue accepts this (block_n, num_warps, num_stages)."""
    return (block_n, num_warps) in SUPPORTED_VARIANTS and num_stages in SUPPORTED_NUM_STAGES


def check_config(num_splits: int, block_n: int, num_warps: int, num_stages: int) -> None:
    """Raises ValueError unless the CUDA glue accepts this launch config (0 = its heuristic;
    a 0 block_n or num_warps is resolved per shape, so only the given values are checked)."""
    if block_n and num_warps and (block_n, num_warps) not in SUPPORTED_VARIANTS:
        raise ValueError(f"block_n, num_warps: ({block_n}, {num_warps}) is not a compiled CUDA variant; "
                         f"supported: {list(SUPPORTED_VARIANTS)}")
    if block_n and block_n not in SUPPORTED_BLOCK_N:
        raise ValueError(f"block_n: expected 0 or one of {list(SUPPORTED_BLOCK_N)}, got {block_n}")
    if num_warps and num_warps not in SUPPORTED_NUM_WARPS:
        raise ValueError(f"num_warps: expected 0 or one of {list(SUPPORTED_NUM_WARPS)}, got {num_warps}")
    if num_stages and num_stages not in SUPPORTED_NUM_STAGES:
        raise ValueError(f"num_stages: expected 0 or one of {list(SUPPORTED_NUM_STAGES)}, got {num_stages}")


def decode_attention_search_space(head_dim: int, dtype: torch.dtype, group: int, batch_heads: int,
                                  capacity: int, *, max_smem_bytes: int = DEFAULT_MAX_SMEM_BYTES) -> list[dict]:
    """Every configuration the tuner should time for this shape (all of them run).

    Args:
        head_dim: D, one of 64, 128, 256.
        dtype: torch.float16, torch.bfloat16 or torch.float32 (the cache dtype).
        group: G = Hq / Hkv.
        batch_heads: B * Hkv.
        capacity: C, the cache capacity in slots.
        max_smem_bytes: the device's opt-in shared memory per block; configs
            needing more are left out (default: the smallest of the targeted GPUs).

    Returns:
        dicts with keys num_splits, block_n, num_warps, num_stages: every
        compiled (block_n, num_warps) variant, num_stages in {2, 3, 4} while the
        pipeline fits (and holds at most ~96 KiB in flight), and num_splits from
        {1, 2, 3, 4, 6, 8, ..., 128} while a split covers at least one tile of
        the capacity and the grid stays within 8192 blocks.
    """
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"decode_attention_search_space: head_dim: expected one of {list(HEAD_DIMS)}, got {head_dim}")
    if dtype not in _ELEMENT_SIZE:
        raise ValueError(f"decode_attention_search_space: dtype: expected float16, bfloat16 or float32, got {dtype}")
    if group < 1:
        raise ValueError(f"decode_attention_search_space: group: expected >= 1, got {group}")
    esize = _ELEMENT_SIZE[dtype]
    base_blocks = max(1, batch_heads) * -(-group // heads_tile(group))
    configs = []
    for block_n, num_warps in SUPPORTED_VARIANTS:
        tile = 2 * block_n * head_dim * esize  # K + V slots of one stage
        max_splits = max(1, capacity // block_n)
        splits = [s for s in _SPLITS if s == 1 or (s <= max_splits and base_blocks * s <= _MAX_BLOCKS)]
        for num_stages in SUPPORTED_NUM_STAGES:
            if num_stages > 2 and (num_stages - 1) * tile > _MAX_IN_FLIGHT:
                continue
            if smem_bytes(head_dim, dtype, group, block_n, num_warps, num_stages) > max_smem_bytes:
                continue
            for num_splits in splits:
                configs.append({"num_splits": num_splits, "block_n": block_n, "num_warps": num_warps,
                                "num_stages": num_stages})
    return configs
