# SPDX-License-Identifier: Apache-2.0
"""Triton launchers of the FP8 KV ops (``kvkern::quantize_fp8_kv_triton_``,
``append_fp8_kv_triton_``, ``fp8_decode_attention_triton``); layout and semantics:
kvkern/reference.py ("FP8 KV").

Each launcher checks its arguments (shapes, dtypes, devices; values of CPU tensors
only) and raises one clear error before anything runs. Nothing reads a CUDA tensor's
values, so every op is graph-capturable and opaque under ``torch.compile``. The fp8
tensors are handed to the kernels as uint8 views (same bytes).
"""

from __future__ import annotations

import torch
import triton

from .. import _validate
from .decode_attention import merge_split_buffers, pipeline_stages, split_buffers, split_count
from .kernels.fp8 import append_fp8_kernel, fp8_attention_split_kernel, quantize_fp8_kernel
from .quant import _EXACT, INTERPRET, _attention_start, _check_query, _guard

__all__ = ["KERNELS", "quantize_fp8_kv_triton_", "append_fp8_kv_triton_", "fp8_decode_attention_triton"]

# _EXACT (quant.py): the encode divides with div_rn and rounds on the bits; no FMA may sneak in.

def _check_cache(op, k_fp8, v_fp8, k_scale, v_scale, lengths):
    """Returns (B, H, C, D)."""
    _validate.require_tensor(op, "k_fp8", k_fp8, 4, "[B, Hkv, C, D]")
    _validate.require_dtype(op, "k_fp8", k_fp8, (torch.float8_e4m3fn,))
    B, H, C, D = k_fp8.shape
    if H < 1 or D < 1:
        raise ValueError(f"{op}: k_fp8: expected at least one kv head and a positive head dim, got shape "
                         f"{list(k_fp8.shape)}")
    _validate.require_last_dim_contiguous(op, "k_fp8", k_fp8)
    _validate.require_tensor(op, "v_fp8", v_fp8, 4, "[B, Hkv, C, D]")
    _validate.require_dtype(op, "v_fp8", v_fp8, (torch.float8_e4m3fn,))
    _validate.require_same_device(op, "v_fp8", v_fp8, k_fp8, "k_fp8")
    _validate.require_shape(op, "v_fp8", v_fp8, (B, H, C, D), "[B, Hkv, C, D]")
    _validate.require_last_dim_contiguous(op, "v_fp8", v_fp8)
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        _validate.require_tensor(op, name, s, 1, "[Hkv]")
        _validate.require_dtype(op, name, s, (torch.float32,))
        _validate.require_same_device(op, name, s, k_fp8, "k_fp8")
        _validate.require_shape(op, name, s, (H,), "[Hkv]")
    _validate.require_tensor(op, "lengths", lengths, 2, "[B, Hkv]")
    _validate.require_dtype(op, "lengths", lengths, (torch.int32,))
    _validate.require_same_device(op, "lengths", lengths, k_fp8, "k_fp8")
    _validate.require_shape(op, "lengths", lengths, (B, H), "[B, Hkv]")
    if _validate.should_check_values(k_scale):
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            ok = torch.isfinite(s) & (s > 0)
            if not bool(ok.all()):
                bad = int((~ok).nonzero()[0, 0])
                raise ValueError(f"{op}: {name}: expected positive finite scales, got {float(s[bad])} at [{bad}]")
    return B, H, C, D


def _check_dense(op, names, k, v, shape, layout, k_fp8):
    for name, t in zip(names, (k, v)):
        _validate.require_tensor(op, name, t, len(shape), layout)
        _validate.require_dtype(op, name, t, _validate.FLOAT_DTYPES)
        _validate.require_same_device(op, name, t, k_fp8, "k_fp8")
        _validate.require_last_dim_contiguous(op, name, t)
    if v.dtype != k.dtype:
        raise ValueError(f"{op}: {names[1]}: expected dtype {k.dtype} (as {names[0]}), got {v.dtype}")
    for name, t in zip(names, (k, v)):
        _validate.require_shape(op, name, t, shape, layout)


def _block(n, cap):
    return min(triton.next_power_of_2(max(n, 1)), cap)


def _u8(t):
    return t.view(torch.uint8)


def quantize_fp8_kv_triton_(k, v, lengths, k_scale, v_scale, k_fp8, v_fp8):
    """Triton kernel of ``kvkern::quantize_fp8_kv_triton_``: a prefill into fp8.

    Args:
        k, v: ``[B, Hkv, T, D]`` fp32 / fp16 / bf16 (T <= C), last dim contiguous.
        lengths: ``[B, Hkv]`` int32 in [0, T] (tokens to quantize per head).
        k_scale, v_scale: ``[Hkv]`` fp32, positive.
        k_fp8, v_fp8: ``[B, Hkv, C, D]`` float8_e4m3fn. Mutated: slots below lengths.
    """
    op = "kvkern::quantize_fp8_kv_triton_"
    B, H, C, D = _check_cache(op, k_fp8, v_fp8, k_scale, v_scale, lengths)
    _validate.require_tensor(op, "k", k, 4, "[B, Hkv, T, D]")
    T = k.shape[2]
    if T > C:
        raise ValueError(f"{op}: k: expected at most C = {C} tokens, got shape {list(k.shape)}")
    _check_dense(op, ("k", "v"), k, v, (B, H, T, D), "[B, Hkv, T, D]", k_fp8)
    if _validate.should_check_values(lengths):
        _validate.require_lengths_in_range(op, lengths, T, "T = k.size(2)")
    if B * H == 0 or T == 0:
        return
    kq, vq = _u8(k_fp8), _u8(v_fp8)
    block_t = 16
    with _guard(k_fp8):
        quantize_fp8_kernel[(B * H, triton.cdiv(T, block_t))](
            k, v, lengths, k_scale, v_scale, kq, vq, H, T, D,
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            kq.stride(0), kq.stride(1), kq.stride(2), vq.stride(0), vq.stride(1), vq.stride(2),
            lengths.stride(0), lengths.stride(1), k_scale.stride(0), v_scale.stride(0),
            BLOCK_T=block_t, BLOCK_D=_block(D, 128), **_EXACT)


def append_fp8_kv_triton_(k_new, v_new, lengths, k_scale, v_scale, k_fp8, v_fp8):
    """Triton kernel of ``kvkern::append_fp8_kv_triton_``: one decode step.

    Args:
        k_new, v_new: ``[B, Hkv, D]`` fp32 / fp16 / bf16, last dim contiguous.
        lengths: ``[B, Hkv]`` int32, each < C. Mutated (+= 1).
        k_fp8, v_fp8: mutated at slot lengths[b, h].
    One launch, no host sync. On CUDA a head with a length outside [0, C) (full) is
    left untouched, lengths included; on CPU that raises.
    """
    op = "kvkern::append_fp8_kv_triton_"
    B, H, C, D = _check_cache(op, k_fp8, v_fp8, k_scale, v_scale, lengths)
    _check_dense(op, ("k_new", "v_new"), k_new, v_new, (B, H, D), "[B, Hkv, D]", k_fp8)
    if _validate.should_check_values(lengths) and lengths.numel():
        lo, hi = (int(x) for x in torch.aminmax(lengths))
        if lo < 0 or hi >= C:
            raise ValueError(f"{op}: lengths: expected every value in [0, C - 1] = [0, {C - 1}] (room for one "
                             f"more token), got {lo if lo < 0 else hi}" + (" (that head is full)" if hi == C else ""))
    if B * H == 0:
        return
    kq, vq = _u8(k_fp8), _u8(v_fp8)
    with _guard(k_fp8):
        append_fp8_kernel[(B * H,)](
            k_new, v_new, lengths, k_scale, v_scale, kq, vq, H, C, D,
            k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
            kq.stride(0), kq.stride(1), kq.stride(2), vq.stride(0), vq.stride(1), vq.stride(2),
            lengths.stride(0), lengths.stride(1), k_scale.stride(0), v_scale.stride(0),
            BLOCK_D=_block(D, 256), **_EXACT)


def fp8_decode_attention_triton(q, k_fp8, v_fp8, k_scale, v_scale, lengths, sm_scale=None, num_splits=0, block_n=0,
                                num_warps=0, num_stages=0):
    """Triton kernel of ``kvkern::fp8_decode_attention_triton``.

    Args:
        q: ``[B, Hq, D]`` fp32 / fp16 / bf16, D in {64, 128, 256}, Hq a multiple of Hkv.
        k_fp8, v_fp8, k_scale, v_scale, lengths: the layout (kvkern/reference.py).
        sm_scale: logit scale, default D ** -0.5. num_splits / block_n / num_warps /
            num_stages: launch config, 0 = heuristic.

    Returns ``out [B, Hq, D]`` (q's dtype) and ``lse [B, Hq]`` fp32; nothing is mutated.
    On CUDA a length outside [0, C] gives NaN for that head.
    """
    op = "kvkern::fp8_decode_attention_triton"
    B, H, C, D = _check_cache(op, k_fp8, v_fp8, k_scale, v_scale, lengths)
    Hq = _check_query(op, q, B, H, D, _validate.FLOAT_DTYPES, k_fp8, "k_fp8",
                      f"k_fp8: expected head dim D in {{64, 128, 256}} (as decode_attention), got {D}")
    sm_scale = _validate.check_sm_scale(op, sm_scale)
    _validate.check_launch_config(op, {"num_splits": num_splits, "block_n": block_n, "num_warps": num_warps,
                                       "num_stages": num_stages})
    if block_n and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"{op}: block_n: expected 0 or a power of two >= 16, got {block_n}")
    scale, out, lse = _attention_start(op, q, lengths, C, D, sm_scale)
    if out.numel() == 0:
        return out, lse
    G = Hq // H
    # 64-token tiles, 32 at D = 256: a [TILE, D] tile's decoded copies dominate shared memory.
    tile = block_n or (32 if INTERPRET or D > 128 else 64)
    splits = num_splits or split_count(q.device, B * H, C, tile)
    block_h = max(16, triton.next_power_of_2(G))
    dst_out, dst_lse = split_buffers(out, lse, splits)
    kq, vq = _u8(k_fp8), _u8(v_fp8)
    grid = (B * H, splits)
    args = (q, kq, vq, k_scale, v_scale, lengths, dst_out, dst_lse,
            scale, H, G, C, splits, q.stride(0), q.stride(1),
            kq.stride(0), kq.stride(1), kq.stride(2), vq.stride(0), vq.stride(1), vq.stride(2),
            lengths.stride(0), lengths.stride(1), k_scale.stride(0), v_scale.stride(0))
    constexprs = dict(HEAD_DIM=D, BLOCK_H=block_h, TILE=tile, WRITE_PARTIAL=splits > 1,
                      num_warps=num_warps or (4 if D <= 128 else 8))
    with _guard(q):
        stages = num_stages or pipeline_stages(fp8_attention_split_kernel, grid, args, constexprs, q.device)
        fp8_attention_split_kernel[grid](*args, num_stages=stages, **constexprs)
    merge_split_buffers(dst_out, dst_lse, out, lse)
    return out, lse


KERNELS = {
    "quantize_fp8_kv_triton_": quantize_fp8_kv_triton_,
    "append_fp8_kv_triton_": append_fp8_kv_triton_,
    "fp8_decode_attention_triton": fp8_decode_attention_triton,
}
