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


def require_head_ints(op: str, name: str, x, B: int, H: int, ref: torch.Tensor, ref_name: str) -> None:
    """A per-head int32 tensor [B, Hkv] (lengths, budgets) on ``ref``'s device."""
    require_tensor(op, name, x, 2, "[B, Hkv]")
    require_dtype(op, name, x, (torch.int32,))
    require_same_device(op, name, x, ref, ref_name)
    require_shape(op, name, x, (B, H), "[B, Hkv]")


def require_last_dim_contiguous(op: str, name: str, x: torch.Tensor) -> None:
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{op}: {name}: expected the last dimension to be contiguous (stride 1), got stride {x.stride(-1)}; "
            f"call .contiguous() first"
        )


# Bounds of launch-config values (0 = the kernel's heuristic); mirrors kMaxNumSplits, kMaxBlockN,
# kMaxNumWarps and kMaxNumStages in csrc/torch/checks.h. A backend may accept fewer values.
LAUNCH_LIMITS = {"num_splits": 65535, "block_n": 4096, "num_warps": 32, "num_stages": 16}


def check_launch_config(op: str, config) -> None:
    """Raises TypeError / ValueError unless every ``{name: value}`` of ``config`` is an int in
    ``[0, LAUNCH_LIMITS[name]]``."""
    for name, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{op}: {name}: expected an int (0 = heuristic), got {type(value).__name__}")
        most = LAUNCH_LIMITS[name]
        if not 0 <= value <= most:
            raise ValueError(f"{op}: {name}: expected 0 (heuristic) or a value in [1, {most}], got {value}")


_FLOAT32_MAX = torch.finfo(torch.float32).max


def check_sm_scale(op: str, sm_scale) -> float | None:
    """``sm_scale`` as a float, or None (the default ``D ** -0.5``). The kernels take it as a
    float32, so a double beyond float32's range (it would become inf there, and the softmax
    NaN) is refused with NaN and the infinities."""
    if sm_scale is None:
        return None
    sm_scale = float(sm_scale)
    if not abs(sm_scale) <= _FLOAT32_MAX:
        raise ValueError(f"{op}: sm_scale: expected a finite float32 number, got {sm_scale}")
    return sm_scale


def should_check_values(x: torch.Tensor) -> bool:
    """True where reading ``x``'s values is free: a CPU tensor, in eager mode."""
    if torch.compiler.is_compiling():
        return False
    return x.device.type == "cpu"


def require_lengths_in_range(op: str, lengths: torch.Tensor, capacity: int, bound: str = "C") -> None:
    """Every length in ``[0, capacity]``; ``bound`` names the limit in the message (``"C"``, or
    ``"T = k.size(2)"`` for a prefill of T tokens)."""
    if lengths.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(lengths))
    if lo < 0 or hi > capacity:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{op}: lengths: expected every value in [0, {bound}] = [0, {capacity}], got {bad}")


def check_decode_attention_args(op, q, k_cache, v_cache, lengths, log_w, sm_scale):
    """Checks decode_attention's arguments; returns sm_scale as a float or None.

    Shapes: q [B, Hq, D], k_cache / v_cache [B, Hkv, C, D], lengths [B, Hkv] int32,
    log_w [B, Hkv, C] float32 or None. Values of ``lengths`` are checked only where
    that costs no host sync.
    """
    require_tensor(op, "q", q, 3, "[B, Hq, D]")
    require_tensor(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    require_tensor(op, "v_cache", v_cache, 4, "[B, Hkv, C, D]")
    require_tensor(op, "lengths", lengths, 2, "[B, Hkv]")
    require_dtype(op, "q", q, FLOAT_DTYPES)
    require_dtype(op, "k_cache", k_cache, (q.dtype,))
    require_dtype(op, "v_cache", v_cache, (q.dtype,))
    require_dtype(op, "lengths", lengths, (torch.int32,))
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("lengths", lengths)):
        require_same_device(op, name, t, q, "q")
    B, Hq, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    if D not in HEAD_DIMS:
        raise ValueError(f"{op}: q: expected head dim D in {{64, 128, 256}}, got {D} (shape {list(q.shape)})")
    if Hkv < 1:
        raise ValueError(f"{op}: k_cache: expected at least one kv head, got shape {list(k_cache.shape)}")
    if Hq < 1 or Hq % Hkv != 0:
        raise ValueError(
            f"{op}: q: expected the number of query heads ({Hq}) to be a positive multiple of "
            f"the number of kv heads ({Hkv})"
        )
    require_shape(op, "k_cache", k_cache, (B, Hkv, C, D), "[B, Hkv, C, D]")
    require_shape(op, "v_cache", v_cache, (B, Hkv, C, D), "[B, Hkv, C, D]")
    require_shape(op, "lengths", lengths, (B, Hkv), "[B, Hkv]")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        require_last_dim_contiguous(op, name, t)
    if log_w is not None:
        require_tensor(op, "log_w", log_w, 3, "[B, Hkv, C]")
        require_dtype(op, "log_w", log_w, (torch.float32,))
        require_same_device(op, "log_w", log_w, q, "q")
        require_shape(op, "log_w", log_w, (B, Hkv, C), "[B, Hkv, C]")
        require_last_dim_contiguous(op, "log_w", log_w)
    sm_scale = check_sm_scale(op, sm_scale)
    if should_check_values(lengths):
        require_lengths_in_range(op, lengths, C)
    return sm_scale
