# SPDX-License-Identifier: Apache-2.0
"""Argument checks for the public wrappers: one clear error per bad input, naming
the op, the argument, what was expected and what came, before any kernel runs.

Checks read shapes, dtypes and devices only. Tensor *values* (``lengths``) are
checked only where that costs no host sync (see ``should_check_values``).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 128, 256)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def require_tensor(op: str, name: str, x, rank: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name}: expected a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(
            f"{op}: {name}: expected a {rank}-D tensor {layout}, got a {x.dim()}-D tensor of shape {list(x.shape)}"
        )


def require_dtype(op: str, name: str, x: torch.Tensor, allowed) -> None:
    allowed = tuple(allowed)
    if x.dtype not in allowed:
        want = " or ".join(_name(d) for d in allowed)
        raise ValueError(f"{op}: {name}: expected dtype {want}, got {_name(x.dtype)}")


def require_same_device(op: str, name: str, x: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{op}: {name}: expected the device of {ref_name} ({ref.device}), got {x.device}")


def require_shape(op: str, name: str, x: torch.Tensor, expected: tuple, layout: str) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{op}: {name}: expected shape {layout} = {list(expected)}, got {list(x.shape)}")


def require_last_dim_contiguous(op: str, name: str, x: torch.Tensor) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{op}: {name}: expected the last dimension to be contiguous (stride 1), got stride {x.stride(-1)}; "
            f"call .contiguous() first"
        )


def should_check_values(x: torch.Tensor) -> bool:
    """True where reading ``x``'s values is free: a CPU tensor, in eager mode."""
    if torch.compiler.is_compiling():
        return False
    return x.device.type == "cpu"


def require_lengths_in_range(op: str, lengths: torch.Tensor, capacity: int) -> None:
    if lengths.numel() == 0:
        return
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0 or hi > capacity:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{op}: lengths: expected every value in [0, C] = [0, {capacity}], got {bad}")
