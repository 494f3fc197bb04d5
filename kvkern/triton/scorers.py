# SPDX-License-Identifier: Apache-2.0
"""Triton launchers of ``kvkern::expected_attention_scores_triton``,
``kvkern::slot_scores_triton`` and ``kvkern::update_scores_triton_`` (see KERNELS).

Each checks its arguments as the C++ glue does (one error naming the op, the
argument, what was expected and what came), then launches the kernels in
``kvkern/triton/kernels/scorers.py``. Nothing here reads a tensor value off a
GPU or synchronizes with it, and every allocation depends on shapes only, so the
ops work inside CUDA graphs and as opaque ops under ``torch.compile``. Lengths
values are checked where that is free (CPU tensors, i.e. the interpreter, in
eager mode); on CUDA a length outside ``[0, C]`` makes a scorer write NaN for
that head and the update leave that head alone.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton

from .. import _validate
from .kernels.scorers import (
    expected_attention_finish_kernel,
    expected_attention_logits_kernel,
    keydiff_anchor_kernel,
    slot_scores_kernel,
    softmax_stats_kernel,
    update_scores_kernel,
)

__all__ = ["expected_attention_scores_triton", "slot_scores_triton", "update_scores_triton_", "KERNELS"]

EA_OP = "kvkern::expected_attention_scores_triton"
SLOT_OP = "kvkern::slot_scores_triton"
UPDATE_OP = "kvkern::update_scores_triton_"

SLOT_SCORE_KINDS = {"key_norm": 0, "value_norm": 1, "keydiff": 2, "recency": 3, "random": 4}
UPDATE_MODES = {"max": 0, "ema": 1, "sum": 2}

_FLOAT_DTYPES = _validate.FLOAT_DTYPES
_U32 = 0xFFFFFFFF
# Register budget of a [slots, head dim] fp32 tile: 4096 values (32 per thread at 4 warps).
_TILE_VALUES = 4096
_STATS_BLOCK = 1024
_UPDATE_BLOCK = 1024


def _device_guard(t: torch.Tensor):
    # Triton launches on the *current* device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _slot_block(block_d: int) -> int:
    """Slots per tile so that a [slots, block_d] fp32 tile stays within _TILE_VALUES (16..128)."""
    return max(16, min(128, _TILE_VALUES // block_d))


# NOTE: these launch shapes keep every kernel free of register spills on sm_80 and
# sm_90 for D in {64, 128, 256} (checked by compiling for both targets with Triton
# 3.9 and reading ptxas' resource usage): the logits kernel's [slots, D] GEMM
# accumulator takes 64-128 registers a thread; row norms read 32 channels at a time.
_NORM_SLOTS = 64
_NORM_CHUNK = 32


def _logits_config(block_d: int) -> tuple[int, int]:
    """(slots per tile, warps) of the expected-attention logits kernel."""
    return max(16, min(32, _TILE_VALUES // block_d)), 4 if block_d <= 64 else 8


def _head_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _check_finite(op: str, name: str, value) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name}: expected a finite number, got {value}")
    return value


def _check_values_in_range(op: str, name: str, t: torch.Tensor, capacity: int) -> None:
    if t.numel() == 0 or not _validate.should_check_values(t):
        return
    lo, hi = (int(x) for x in torch.aminmax(t))
    if lo < 0 or hi > capacity:
        raise ValueError(f"{op}: {name}: expected every value in [0, C] = [0, {capacity}], got {lo if lo < 0 else hi}")


def _check_cache_and_lengths(op: str, k_cache, lengths) -> None:
    _validate.require_tensor(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    _validate.require_dtype(op, "k_cache", k_cache, _FLOAT_DTYPES)
    _validate.require_last_dim_contiguous(op, "k_cache", k_cache)
    _validate.require_head_ints(op, "lengths", lengths, k_cache.shape[0], k_cache.shape[1], k_cache, "k_cache")


def _check_like_k(op: str, v_cache, k_cache) -> None:
    _validate.require_tensor(op, "v_cache", v_cache, 4, "[B, Hkv, C, D]")
    if v_cache.dtype != k_cache.dtype:
        raise ValueError(f"{op}: v_cache: expected the dtype of k_cache ({_validate._name(k_cache.dtype)}), "
                         f"got {_validate._name(v_cache.dtype)}")
    _validate.require_same_device(op, "v_cache", v_cache, k_cache, "k_cache")
    _validate.require_shape(op, "v_cache", v_cache, tuple(k_cache.shape), "of k_cache [B, Hkv, C, D]")
    _validate.require_last_dim_contiguous(op, "v_cache", v_cache)


# ---------------------------------------------------------------------------
# expected_attention_scores
# ---------------------------------------------------------------------------


def check_expected_attention_args(op, mean, cov, k_cache, v_cache, lengths, n_sink, epsilon, sm_scale):
    """Checks the arguments; returns ``(sm_scale, epsilon)`` as floats (the default scale filled in)."""
    _validate.require_tensor(op, "mean", mean, 3, "[B, Hq, D]")
    _validate.require_dtype(op, "mean", mean, (torch.float32,))
    _check_cache_and_lengths(op, k_cache, lengths)
    _validate.require_same_device(op, "mean", mean, k_cache, "k_cache")
    B, Hkv, C, D = k_cache.shape
    Hq = mean.shape[1]
    if Hkv < 1:
        raise ValueError(f"{op}: k_cache: expected at least one kv head, got shape {list(k_cache.shape)}")
    if D < 1:
        raise ValueError(f"{op}: k_cache: expected a head dim D >= 1, got shape {list(k_cache.shape)}")
    if mean.shape[0] != B or mean.shape[2] != D:
        raise ValueError(f"{op}: mean: expected shape [B, Hq, D] with B = {B} and D = {D} of k_cache, "
                         f"got {list(mean.shape)}")
    if Hq < 1 or Hq % Hkv != 0:
        raise ValueError(f"{op}: mean: expected the number of query heads ({Hq}) to be a positive multiple of "
                         f"the number of kv heads ({Hkv})")
    _validate.require_last_dim_contiguous(op, "mean", mean)
    if cov is not None:
        _validate.require_tensor(op, "cov", cov, 4, "[B, Hq, D, D]")
        _validate.require_dtype(op, "cov", cov, (torch.float32,))
        _validate.require_same_device(op, "cov", cov, k_cache, "k_cache")
        _validate.require_shape(op, "cov", cov, (B, Hq, D, D), "[B, Hq, D, D]")
        _validate.require_last_dim_contiguous(op, "cov", cov)
    if v_cache is not None:
        _check_like_k(op, v_cache, k_cache)
    if n_sink < 0:
        raise ValueError(f"{op}: n_sink: expected a value >= 0, got {n_sink}")
    epsilon = _check_finite(op, "epsilon", epsilon)
    sm_scale = _validate.check_sm_scale(op, sm_scale)
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    _check_values_in_range(op, "lengths", lengths, C)
    return sm_scale, epsilon


def expected_attention_scores_triton(mean, cov, k_cache, v_cache, lengths, n_sink=4, epsilon=0.0, sm_scale=None):
    """Triton kernel of ``kvkern::expected_attention_scores_triton`` (semantics:
    ``kvkern.reference.expected_attention_scores``).

    Args:
        mean: ``[B, Hq, D]`` float32, the RoPE-averaged query mean.
        cov: ``[B, Hq, D, D]`` float32 or None (no quadratic term).
        k_cache: ``[B, Hkv, C, D]`` float16 / bfloat16 / float32, Hq a multiple of Hkv.
        v_cache: like k_cache, or None (no value-norm weighting).
        lengths: ``[B, Hkv]`` int32.
        n_sink, epsilon, sm_scale: sinks (+inf), value-norm offset, logit scale (default D**-0.5).
        All tensors: any strides with the last dim contiguous.

    Returns:
        ``[B, Hkv, C]`` float32 scores, contiguous; 0 past lengths. Nothing is mutated.
    """
    sm_scale, epsilon = check_expected_attention_args(EA_OP, mean, cov, k_cache, v_cache, lengths, n_sink,
                                                      epsilon, sm_scale)
    return launch_expected_attention(mean, cov, k_cache, v_cache, lengths, n_sink, epsilon, sm_scale)


def launch_expected_attention(mean, cov, k_cache, v_cache, lengths, n_sink: int, epsilon: float,
                              sm_scale: float) -> torch.Tensor:
    """The kernels on checked arguments (``sm_scale`` filled in). Reads no tensor value: a
    length outside [0, C] gives NaN scores for that head."""
    B, Hkv, C, D = k_cache.shape
    Hq = mean.shape[1]
    G = Hq // Hkv
    out = torch.empty((B, Hkv, C), dtype=torch.float32, device=k_cache.device)
    if out.numel() == 0:
        return out
    n_sink = min(int(n_sink), C)  # keeps it an int32 for the kernels
    z = torch.empty((B * Hq, C), dtype=torch.float32, device=k_cache.device)
    zmax = torch.empty((B * Hq,), dtype=torch.float32, device=k_cache.device)
    zsum = torch.empty((B * Hq,), dtype=torch.float32, device=k_cache.device)
    block_d = _head_block(D)
    block_n, logits_warps = _logits_config(block_d)
    has_cov, has_v = cov is not None, v_cache is not None
    cov_arg = cov if has_cov else mean  # a dummy, never read
    v_arg = v_cache if has_v else k_cache
    cov_strides = (cov.stride(0), cov.stride(1), cov.stride(2)) if has_cov else (0, 0, 0)
    v_strides = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)) if has_v else (0, 0, 0)
    with _device_guard(k_cache):
        expected_attention_logits_kernel[(triton.cdiv(C, block_n), B * Hq)](
            mean, cov_arg, k_cache, lengths, z,
            sm_scale, 0.5 * sm_scale * sm_scale,
            n_sink, Hq, G, C, D,
            mean.stride(0), mean.stride(1),
            *cov_strides,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            lengths.stride(0), lengths.stride(1),
            HAS_COV=has_cov, BLOCK_N=block_n, BLOCK_D=block_d, DOT_K=16,
            num_warps=logits_warps,
        )
        softmax_stats_kernel[(B * Hq,)](
            z, lengths, zmax, zsum,
            n_sink, Hq, G, C,
            lengths.stride(0), lengths.stride(1),
            BLOCK=_STATS_BLOCK, num_warps=4,
        )
        expected_attention_finish_kernel[(triton.cdiv(C, _NORM_SLOTS), B * Hkv)](
            z, zmax, zsum, v_arg, lengths, out,
            epsilon,
            n_sink, Hkv, G, C, D,
            *v_strides,
            lengths.stride(0), lengths.stride(1),
            HAS_V=has_v, BLOCK_C=_NORM_SLOTS, BLOCK_D=block_d, D_CHUNK=min(block_d, _NORM_CHUNK),
            num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------
# slot_scores
# ---------------------------------------------------------------------------


def _lowbias32(x: int) -> int:
    x &= _U32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _U32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _U32
    x ^= x >> 16
    return x


def random_key(seed: int) -> int:
    """``lowbias32(seed + 0x9E3779B9)`` (uint32 wrapping), as the int32 with the same bits."""
    key = _lowbias32((int(seed) + 0x9E3779B9) & _U32)
    return key - (1 << 32) if key >= (1 << 31) else key


def check_slot_scores_args(op, k_cache, v_cache, lengths, kind):
    """Checks the arguments; returns the kind's code."""
    if kind not in SLOT_SCORE_KINDS:
        raise ValueError(f"{op}: kind: expected one of {list(SLOT_SCORE_KINDS)}, got {kind!r}")
    _check_cache_and_lengths(op, k_cache, lengths)
    if v_cache is None and kind == "value_norm":
        raise ValueError(f"{op}: v_cache: kind 'value_norm' needs v_cache, got None")
    if v_cache is not None:
        _check_like_k(op, v_cache, k_cache)
    _check_values_in_range(op, "lengths", lengths, k_cache.shape[2])
    return SLOT_SCORE_KINDS[kind]


def slot_scores_triton(k_cache, v_cache, lengths, kind, seed=0):
    """Triton kernel of ``kvkern::slot_scores_triton`` (semantics: ``kvkern.reference.slot_scores``).

    Args:
        k_cache: ``[B, Hkv, C, D]`` float16 / bfloat16 / float32, last dim contiguous.
        v_cache: like k_cache, or None (required by ``value_norm``).
        lengths: ``[B, Hkv]`` int32.
        kind: key_norm | value_norm | keydiff | recency | random.
        seed: ``random``'s seed (any int; used modulo 2^32), reproduced bit for bit.

    Returns:
        ``[B, Hkv, C]`` float32 scores, contiguous; 0 past lengths. Nothing is mutated.
    """
    code = check_slot_scores_args(SLOT_OP, k_cache, v_cache, lengths, kind)
    return launch_slot_scores(k_cache, v_cache, lengths, kind, code, seed)


def launch_slot_scores(k_cache, v_cache, lengths, kind: str, code: int, seed: int) -> torch.Tensor:
    """The kernels on checked arguments. Reads no tensor value: a length outside [0, C]
    gives NaN scores for that head."""
    B, Hkv, C, D = k_cache.shape
    out = torch.empty((B, Hkv, C), dtype=torch.float32, device=k_cache.device)
    if out.numel() == 0:
        return out
    block_d = _head_block(D)
    # keydiff holds whole [slots, D] rows; the norms read 32 channels at a time; the
    # rest read no cache at all.
    block_c = {"keydiff": _slot_block(block_d), "key_norm": _NORM_SLOTS, "value_norm": _NORM_SLOTS}.get(kind, 1024)
    anchor = out  # a dummy, never read, unless keydiff
    v_arg = v_cache if v_cache is not None else k_cache
    with _device_guard(k_cache):
        if kind == "keydiff":
            anchor = torch.empty((B * Hkv, block_d), dtype=torch.float32, device=k_cache.device)
            keydiff_anchor_kernel[(B * Hkv,)](
                k_cache, lengths, anchor,
                Hkv, C, D,
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                lengths.stride(0), lengths.stride(1),
                BLOCK_N=_slot_block(block_d), BLOCK_D=block_d, num_warps=4,
            )
        slot_scores_kernel[(triton.cdiv(C, block_c), B * Hkv)](
            k_cache, v_arg, lengths, anchor, out,
            random_key(seed),
            Hkv, C, D,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_arg.stride(0), v_arg.stride(1), v_arg.stride(2),
            lengths.stride(0), lengths.stride(1),
            KIND=code, BLOCK_C=block_c, BLOCK_D=block_d, D_CHUNK=min(block_d, _NORM_CHUNK), num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------
# update_scores_
# ---------------------------------------------------------------------------


def check_update_scores_args(op, hist, new, lengths, hist_lengths, decay, hist_mode):
    """Checks the arguments; returns ``(decay as a float, the mode's code)``."""
    if hist_mode not in UPDATE_MODES:
        raise ValueError(f"{op}: hist_mode: expected one of {list(UPDATE_MODES)}, got {hist_mode!r}")
    _validate.require_tensor(op, "hist", hist, 3, "[B, Hkv, C]")
    _validate.require_dtype(op, "hist", hist, (torch.float32,))
    _validate.require_last_dim_contiguous(op, "hist", hist)
    B, Hkv, C = hist.shape
    _validate.require_tensor(op, "new", new, 3, "[B, Hkv, C]")
    _validate.require_dtype(op, "new", new, (torch.float32,))
    _validate.require_same_device(op, "new", new, hist, "hist")
    _validate.require_shape(op, "new", new, (B, Hkv, C), "of hist [B, Hkv, C]")
    _validate.require_last_dim_contiguous(op, "new", new)
    _validate.require_head_ints(op, "lengths", lengths, B, Hkv, hist, "hist")
    _validate.require_head_ints(op, "hist_lengths", hist_lengths, B, Hkv, hist, "hist")
    decay = _check_finite(op, "decay", decay)
    # Both before anything is written: a bad call leaves hist as it was.
    _check_values_in_range(op, "lengths", lengths, C)
    _check_values_in_range(op, "hist_lengths", hist_lengths, C)
    return decay, UPDATE_MODES[hist_mode]


def update_scores_triton_(hist, new, lengths, hist_lengths, decay, hist_mode="max"):
    """Triton kernel of ``kvkern::update_scores_triton_`` (semantics: ``kvkern.reference.update_scores_``).

    Args:
        hist: ``[B, Hkv, C]`` float32, last dim contiguous. **Mutated** on slots ``i < lengths``.
        new: ``[B, Hkv, C]`` float32, last dim contiguous (may be hist itself).
        lengths, hist_lengths: ``[B, Hkv]`` int32.
        decay: finite float.   hist_mode: max | ema | sum (the reference's ``mode``).

    The combination is computed in fp64 and rounded once, as the reference does, so
    results match it bit for bit. Returns None.
    """
    decay, code = check_update_scores_args(UPDATE_OP, hist, new, lengths, hist_lengths, decay, hist_mode)
    launch_update_scores(hist, new, lengths, hist_lengths, decay, code)


def launch_update_scores(hist, new, lengths, hist_lengths, decay: float, code: int) -> None:
    """The kernel on checked arguments. Reads no tensor value: a head whose length is
    outside [0, C] is left alone; hist_lengths outside [0, C] act as clamped."""
    B, Hkv, C = hist.shape
    if hist.numel() == 0:
        return None
    block_c = min(_UPDATE_BLOCK, max(16, triton.next_power_of_2(C)))
    with _device_guard(hist):
        update_scores_kernel[(triton.cdiv(C, block_c), B * Hkv)](
            hist, new, lengths, hist_lengths,
            decay, 1.0 - decay,
            Hkv, C,
            hist.stride(0), hist.stride(1),
            new.stride(0), new.stride(1),
            lengths.stride(0), lengths.stride(1),
            hist_lengths.stride(0), hist_lengths.stride(1),
            MODE=code, BLOCK_C=block_c, num_warps=4,
            # Separate roundings of the products, as the reference has (no FMA).
            enable_fp_fusion=False,
        )
    return None


KERNELS = {
    "expected_attention_scores_triton": expected_attention_scores_triton,
    "slot_scores_triton": slot_scores_triton,
    "update_scores_triton_": update_scores_triton_,
}
