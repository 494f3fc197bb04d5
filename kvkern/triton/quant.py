# SPDX-License-Identifier: Apache-2.0
"""Triton launchers of the quantized KV ops (``kvkern::quantize_kv_triton_``,
``dequantize_kv_triton``, ``append_quantized_kv_triton_``,
``quant_decode_attention_triton``); layout and semantics: kvkern/reference.py.

Each launcher checks its arguments (shapes, dtypes, devices; values of CPU tensors
only) and raises one clear error before anything runs. Nothing here reads a CUDA
tensor's values or sizes anything by them, so every op is graph-capturable and an
opaque op under ``torch.compile(fullgraph=True)``.

The layout tensors (codes, scales, minima, rings, means) must be contiguous; the dense
inputs (k, v, k_new, v_new, q) only need a contiguous last dimension.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from .. import _validate
from .decode_attention import (attention_outputs, interpreted, merge_split_buffers, pipeline_stages, split_buffers,
                               split_count)
from .kernels.quant import (append_kernel, dequantize_kernel, quant_attention_split_kernel, quantize_keys_kernel,
                            quantize_values_kernel)

__all__ = ["KERNELS", "quantize_kv_triton_", "dequantize_kv_triton", "append_quantized_kv_triton_",
           "quant_decode_attention_triton"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BITS = (2, 4, 8)
GROUPS = (32, 64, 128)
_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# The exact kernels must multiply and add as the reference does (no FMA contraction);
# the interpreter has no such option.
_EXACT = {} if INTERPRET else {"enable_fp_fusion": False}


def _guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_query(op, q, B, H, D, dtypes, like, like_name, head_dim_error):
    """Checks the query of an attention twin over a compressed cache (B, H, D from
    the cache, ``like`` the tensor q must share a device with); returns Hq.
    ``head_dim_error``: the message (after the op) for D outside {64, 128, 256}."""
    _validate.require_tensor(op, "q", q, 3, "[B, Hq, D]")
    _validate.require_dtype(op, "q", q, dtypes)
    _validate.require_same_device(op, "q", q, like, like_name)
    if q.shape[0] != B or q.shape[2] != D:
        raise ValueError(f"{op}: q: expected shape [B, Hq, D] with B = {B}, D = {D}, got {list(q.shape)}")
    if D not in _validate.HEAD_DIMS:
        raise ValueError(f"{op}: {head_dim_error}")
    Hq = q.shape[1]
    if Hq < 1 or Hq % H != 0:
        raise ValueError(f"{op}: q: expected the number of query heads ({Hq}) to be a positive multiple of the "
                         f"number of kv heads ({H})")
    _validate.require_last_dim_contiguous(op, "q", q)
    return Hq


def _attention_start(op, q, lengths, C, D, sm_scale):
    """The last check of an attention twin (lengths in [0, C], CPU only: free there)
    and its start: the resolved scale and the empty outputs."""
    if _validate.should_check_values(lengths):
        _validate.require_lengths_in_range(op, lengths, C)
    out, lse = attention_outputs(q)
    return (D ** -0.5 if sm_scale is None else sm_scale), out, lse


def _check_layout(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean, v_mean, lengths,
                  bits, group):
    """Checks the cache tensors; returns (B, H, C, R, D, dtype)."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{op}: bits: expected one of {list(BITS)}, got {bits}")
    if isinstance(group, bool) or group not in GROUPS:
        raise ValueError(f"{op}: group: expected one of {list(GROUPS)}, got {group}")
    _validate.require_tensor(op, "k_res", k_res, 4, "[B, Hkv, R, D]")
    _validate.require_dtype(op, "k_res", k_res, _validate.FLOAT_DTYPES)
    dt = k_res.dtype
    B, H, R, D = k_res.shape
    P = 32 // bits
    _validate.require_tensor(op, "k_scale", k_scale, 4, "[B, Hkv, C / G, D]")
    C = k_scale.shape[2] * group
    if R < 1 or R % group != 0:
        raise ValueError(f"{op}: k_res: expected the ring size R = k_res.size(2) to be a positive multiple of "
                         f"group = {group}, got R = {R}")
    if C % R != 0:
        raise ValueError(f"{op}: k_scale: expected the capacity C = k_scale.size(2) * group = {C} to be a "
                         f"multiple of R = {R}")
    if D < 1 or D % group != 0:
        raise ValueError(f"{op}: k_res: expected the head dim D = {D} to be a positive multiple of group = {group}")
    if H < 1:
        raise ValueError(f"{op}: k_res: expected at least one kv head, got shape {list(k_res.shape)}")
    specs = [("k_codes", k_codes, (B, H, C // P, D), "[B, Hkv, C / P, D]", torch.int32),
             ("k_scale", k_scale, (B, H, C // group, D), "[B, Hkv, C / G, D]", dt),
             ("k_min", k_min, (B, H, C // group, D), "[B, Hkv, C / G, D]", dt),
             ("v_codes", v_codes, (B, H, C, D // P), "[B, Hkv, C, D / P]", torch.int32),
             ("v_scale", v_scale, (B, H, C, D // group), "[B, Hkv, C, D / G]", dt),
             ("v_min", v_min, (B, H, C, D // group), "[B, Hkv, C, D / G]", dt),
             ("v_res", v_res, (B, H, R, D), "[B, Hkv, R, D]", dt)]
    if (k_mean is None) != (v_mean is None):
        raise ValueError(f"{op}: k_mean, v_mean: expected both or neither (mean-centred or not), got "
                         f"k_mean {'None' if k_mean is None else 'a tensor'}, "
                         f"v_mean {'None' if v_mean is None else 'a tensor'}")
    if k_mean is not None:
        specs += [("k_mean", k_mean, (B, C, D), "[B, C, D]", dt), ("v_mean", v_mean, (B, C, D), "[B, C, D]", dt)]
    for name, t, shape, layout, want in specs:
        _validate.require_tensor(op, name, t, len(shape), layout)
        _validate.require_dtype(op, name, t, (want,))
        _validate.require_same_device(op, name, t, k_res, "k_res")
        _validate.require_shape(op, name, t, shape, layout)
    for name, t in [("k_res", k_res)] + [(s[0], s[1]) for s in specs]:
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name}: expected a contiguous tensor (the cache layout), got strides "
                             f"{list(t.stride())}")
    _validate.require_tensor(op, "lengths", lengths, 2, "[B, Hkv]")
    _validate.require_dtype(op, "lengths", lengths, (torch.int32,))
    _validate.require_same_device(op, "lengths", lengths, k_res, "k_res")
    _validate.require_shape(op, "lengths", lengths, (B, H), "[B, Hkv]")
    return B, H, C, R, D, dt


def _check_equal_lengths(op, lengths):
    if lengths.numel() and not bool((lengths == lengths[:, :1]).all()):
        raise ValueError(f"{op}: lengths: a mean-centred cache needs every kv head of a batch element to hold "
                         f"the same number of tokens, got {lengths.tolist()}")


def _block_d(D):
    return triton.next_power_of_2(D)


def quantize_kv_triton_(k, v, lengths, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean,
                        v_mean, bits, group):
    """Triton kernel of ``kvkern::quantize_kv_triton_``: quantizes a dense cache.

    Args:
        k, v: ``[B, Hkv, T, D]`` in the storage dtype, T <= C, last dim contiguous.
        lengths: ``[B, Hkv]`` int32 in [0, T] (equal across heads when mean-centred).
        k_codes ... v_mean: the layout (kvkern/reference.py), contiguous. Mutated: the
            live parts (codes/metadata of tokens [0, L - L % R) for keys and
            [0, max(L - R, 0)) for values, means of those tokens, ring slots of the rest).
    """
    op = "kvkern::quantize_kv_triton_"
    B, H, C, R, D, dt = _check_layout(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean,
                                      v_mean, lengths, bits, group)
    _validate.require_tensor(op, "k", k, 4, "[B, Hkv, T, D]")
    T = k.shape[2]
    for name, t in (("k", k), ("v", v)):
        _validate.require_tensor(op, name, t, 4, "[B, Hkv, T, D]")
        _validate.require_dtype(op, name, t, (dt,))
        _validate.require_same_device(op, name, t, k_res, "k_res")
        _validate.require_shape(op, name, t, (B, H, T, D), "[B, Hkv, T, D]")
        _validate.require_last_dim_contiguous(op, name, t)
    if T > C:
        raise ValueError(f"{op}: k: expected at most C = {C} tokens, got T = {T}")
    centred = k_mean is not None
    if _validate.should_check_values(lengths):
        _validate.require_lengths_in_range(op, lengths, T, "T = k.size(2)")
        if centred:
            _check_equal_lengths(op, lengths)
    if B * H == 0 or T == 0:
        return
    bd = _block_d(D)
    kbd = min(bd, 64)
    dummy = k_res
    with _guard(k_res):
        quantize_keys_kernel[(B * H, triton.cdiv(T, group), triton.cdiv(D, kbd))](
            k, lengths, k_codes, k_scale, k_min, k_mean if centred else dummy,
            H, T, C, R, D, k.stride(0), k.stride(1), k.stride(2), lengths.stride(0), lengths.stride(1),
            GROUP=group, BLOCK_D=kbd, BITS=bits, DT=_DT[dt], CENTRED=centred, **_EXACT)
        block_t = 16
        quantize_values_kernel[(B * H, triton.cdiv(T, block_t))](
            k, v, lengths, v_codes, v_scale, v_min, v_mean if centred else dummy, k_res, v_res,
            H, T, C, R, D, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            lengths.stride(0), lengths.stride(1),
            BLOCK_T=block_t, GROUP=group, BLOCK_D=bd, BITS=bits, DT=_DT[dt], CENTRED=centred, **_EXACT)


def dequantize_kv_triton(k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean, v_mean, lengths,
                         bits, group):
    """Triton kernel of ``kvkern::dequantize_kv_triton``.

    Returns dense ``(k, v) [B, Hkv, C, D]`` in the storage dtype (x̂ = q * scale + min
    (+ mean) in fp32, rounded once; ring tokens as stored; 0 at and past lengths).
    Nothing is mutated. lengths outside [0, C] (CUDA) give zeros for that head.
    """
    op = "kvkern::dequantize_kv_triton"
    B, H, C, R, D, dt = _check_layout(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean,
                                      v_mean, lengths, bits, group)
    if _validate.should_check_values(lengths):
        _validate.require_lengths_in_range(op, lengths, C)
        if k_mean is not None:
            _check_equal_lengths(op, lengths)
    k = torch.empty((B, H, C, D), dtype=dt, device=k_res.device)
    v = torch.empty((B, H, C, D), dtype=dt, device=k_res.device)
    if k.numel() == 0:
        return k, v
    centred = k_mean is not None
    tile = group
    with _guard(k_res):
        dequantize_kernel[(B * H, C // tile)](
            k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
            k_mean if centred else k_res, v_mean if centred else k_res, lengths, k, v,
            H, C, R, D, lengths.stride(0), lengths.stride(1),
            TILE=tile, GROUP=group, BLOCK_D=_block_d(D), BITS=bits, CENTRED=centred, DT=_DT[dt], **_EXACT)
    return k, v


def append_quantized_kv_triton_(k_new, v_new, lengths, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res,
                                v_res, k_mean, v_mean, bits, group):
    """Triton kernel of ``kvkern::append_quantized_kv_triton_``: one decode step.

    Args:
        k_new, v_new: ``[B, Hkv, D]`` in the storage dtype, last dim contiguous.
        lengths: ``[B, Hkv]`` int32, each < C. Mutated (+= 1). Mean-centred caches use
            lengths[b, 0] for every head of b (heads must agree).
        k_codes ... v_mean: the layout. Mutated: the value leaving the ring is quantized,
            the new token enters the ring, a full key ring is flushed to codes.
    Decides everything on the device (one launch, no host sync). On CUDA a length
    outside [0, C) leaves that head untouched.
    """
    op = "kvkern::append_quantized_kv_triton_"
    B, H, C, R, D, dt = _check_layout(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean,
                                      v_mean, lengths, bits, group)
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        _validate.require_tensor(op, name, t, 3, "[B, Hkv, D]")
        _validate.require_dtype(op, name, t, (dt,))
        _validate.require_same_device(op, name, t, k_res, "k_res")
        _validate.require_shape(op, name, t, (B, H, D), "[B, Hkv, D]")
        _validate.require_last_dim_contiguous(op, name, t)
    centred = k_mean is not None
    if _validate.should_check_values(lengths):
        if lengths.numel():
            lo, hi = (int(x) for x in torch.aminmax(lengths))
            if lo < 0 or hi >= C:
                raise ValueError(f"{op}: lengths: expected every value in [0, C) = [0, {C}) (room for one more "
                                 f"token), got {lo if lo < 0 else hi}")
        if centred:
            _check_equal_lengths(op, lengths)
    if B * H == 0:
        return
    heads = H if centred else 1
    with _guard(k_res):
        append_kernel[(B, H // heads)](
            k_new, v_new, lengths, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
            k_mean if centred else k_res, v_mean if centred else k_res,
            H, C, R, D, k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
            lengths.stride(0), lengths.stride(1),
            HEADS=heads, GROUP=group, BLOCK_D=_block_d(D), BITS=bits, DT=_DT[dt], CENTRED=centred, **_EXACT)


def attention_tile(group: int, head_dim: int, device: torch.device) -> int:
    """Tokens per step of the attention loop. The interpreter runs few, large steps (whole key
    groups). A GPU keeps the tile's decoded [TILE, D] fp32 keys and values, and their pipeline
    stages, in shared memory: 64 tokens (32 at D = 256), inside a key group where the group is
    larger, so that the default G = 128 fits 99 KB GPUs."""
    if interpreted(device):
        return max(group, 32)
    return 64 if head_dim <= 128 else 32


def quant_decode_attention_triton(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean, v_mean,
                                  lengths, bits, group, sm_scale=None, num_splits=0):
    """Triton kernel of ``kvkern::quant_decode_attention_triton``.

    Args:
        q: ``[B, Hq, D]``, the storage dtype, D in {64, 128, 256}, Hq a multiple of Hkv;
            last dim contiguous.
        k_codes ... v_mean, lengths, bits, group: the layout (kvkern/reference.py).
        sm_scale: logit scale, default D ** -0.5.   num_splits: split-K count, 0 = heuristic.

    Returns ``out [B, Hq, D]`` (q's dtype) and ``lse [B, Hq]`` fp32; nothing is mutated.
    Keys and values are dequantized in registers. On CUDA a length outside [0, C]
    gives NaN for that head.
    """
    op = "kvkern::quant_decode_attention_triton"
    B, H, C, R, D, dt = _check_layout(op, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean,
                                      v_mean, lengths, bits, group)
    Hq = _check_query(op, q, B, H, D, (dt,), k_res, "k_res", f"q: expected head dim D in {{64, 128, 256}}, got {D}")
    sm_scale = _validate.check_sm_scale(op, sm_scale)
    _validate.check_launch_config(op, {"num_splits": num_splits})
    if k_mean is not None and _validate.should_check_values(lengths):
        _check_equal_lengths(op, lengths)
    scale, out, lse = _attention_start(op, q, lengths, C, D, sm_scale)
    if out.numel() == 0:
        return out, lse
    G = Hq // H
    tile = attention_tile(group, D, q.device)
    splits = num_splits or split_count(q.device, B * H, C, tile)
    block_h = max(16, triton.next_power_of_2(G))
    centred = k_mean is not None
    dst_out, dst_lse = split_buffers(out, lse, splits)
    grid = (B * H, splits)
    args = (q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
            k_mean if centred else k_res, v_mean if centred else k_res, lengths, dst_out, dst_lse,
            scale, H, G, C, R, splits, q.stride(0), q.stride(1), lengths.stride(0), lengths.stride(1))
    constexprs = dict(HEAD_DIM=D, BLOCK_H=block_h, TILE=tile, GROUP=group, BITS=bits, CENTRED=centred,
                      WRITE_PARTIAL=splits > 1, num_warps=4 if D <= 128 else 8)
    with _guard(q):
        stages = pipeline_stages(quant_attention_split_kernel, grid, args, constexprs, q.device)
        quant_attention_split_kernel[grid](*args, num_stages=stages, **constexprs)
    merge_split_buffers(dst_out, dst_lse, out, lse)
    return out, lse


KERNELS = {
    "quant_decode_attention_triton": quant_decode_attention_triton,
    "quantize_kv_triton_": quantize_kv_triton_,
    "dequantize_kv_triton": dequantize_kv_triton,
    "append_quantized_kv_triton_": append_quantized_kv_triton_,
}
