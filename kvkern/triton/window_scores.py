# SPDX-License-Identifier: Apache-2.0
"""Triton launchers for ``kvkern::window_scores_triton`` and ``kvkern::key_redundancy_triton``
(kernels in ``kvkern/triton/kernels/window_scores.py``; the math in ``kvkern/reference.py``).

Nothing here reads tensor values on CUDA or synchronizes with the device, and
every allocation depends on shapes only, so both ops run inside CUDA graphs and
as opaque ops under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
import triton

from .. import _validate
from .decode_attention import _sm_count, interpreted
from .kernels.window_scores import (
    redundancy_corr_kernel,
    redundancy_finish_kernel,
    redundancy_rows_kernel,
    window_combine_kernel,
    window_finish_kernel,
    window_lse_kernel,
    window_scores_kernel,
)

__all__ = ["window_scores_triton", "key_redundancy_triton", "KERNELS"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
WINDOW_OP = "kvkern::window_scores_triton"
REDUNDANCY_OP = "kvkern::key_redundancy_triton"

QUERY_REDUCE = ("mean", "sum")
GROUP_REDUCE = ("mean", "max", "mean_all", "max_per_query")
POOL = ("none", "avg", "max")
_MAX_SPLITS = 64


def _device_guard(t: torch.Tensor):
    # Triton launches on the *current* device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _choice(op: str, name: str, value, allowed) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{op}: {name}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _require_int(op: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name}: expected an int, got {type(value).__name__}")
    return value


def _check_cache(op: str, k_cache) -> None:
    _validate.require_tensor(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    if k_cache.dtype not in _validate.FLOAT_DTYPES:
        raise ValueError(f"{op}: k_cache: expected dtype float16, bfloat16 or float32, "
                         f"got {str(k_cache.dtype).replace('torch.', '')}")


def check_window_scores_args(op, q_win, k_cache, lengths, sm_scale, query_reduce, group_reduce, normalize, pool,
                             pool_kernel) -> float:
    """The checks of csrc/torch/window_scores_args.h, with the same words; returns the scale."""
    _validate.require_tensor(op, "q_win", q_win, 4, "[B, Hq, W, D]")
    _validate.require_tensor(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    if q_win.dtype not in _validate.FLOAT_DTYPES:
        raise ValueError(f"{op}: q_win: expected dtype float16, bfloat16 or float32, "
                         f"got {str(q_win.dtype).replace('torch.', '')}")
    _validate.require_dtype(op, "k_cache", k_cache, (q_win.dtype,))
    _validate.require_same_device(op, "k_cache", k_cache, q_win, "q_win")
    B, Hq, W, D = q_win.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    if D < 1:
        raise ValueError(f"{op}: q_win: expected head dim D >= 1, got shape {list(q_win.shape)}")
    if Hkv < 1:
        raise ValueError(f"{op}: k_cache: expected at least one kv head, got shape {list(k_cache.shape)}")
    if Hq < 1 or Hq % Hkv != 0:
        raise ValueError(f"{op}: q_win: expected the number of query heads ({Hq}) to be a positive multiple of "
                         f"the number of kv heads ({Hkv})")
    _validate.require_shape(op, "k_cache", k_cache, (B, Hkv, C, D), "[B, Hkv, C, D]")
    _validate.require_head_ints(op, "lengths", lengths, B, Hkv, q_win, "q_win")
    if W < 1:
        raise ValueError(f"{op}: q_win: expected a window of W >= 1 queries, got shape {list(q_win.shape)}")
    if W > C:
        raise ValueError(f"{op}: q_win: expected a window W ({W}) no larger than the cache capacity C ({C})")
    _validate.require_last_dim_contiguous(op, "q_win", q_win)
    _validate.require_last_dim_contiguous(op, "k_cache", k_cache)
    _choice(op, "query_reduce", query_reduce, QUERY_REDUCE)
    _choice(op, "group_reduce", group_reduce, GROUP_REDUCE)
    _choice(op, "pool", pool, POOL)
    pool_kernel = _require_int(op, "pool_kernel", pool_kernel)
    if pool_kernel < 1 or pool_kernel % 2 == 0 or pool_kernel > 2**30:
        raise ValueError(f"{op}: pool_kernel: expected an odd number >= 1, got {pool_kernel}")
    scale = _validate.check_sm_scale(op, sm_scale)
    scale = D ** -0.5 if scale is None else scale
    if _validate.should_check_values(lengths):
        _validate.require_lengths_in_range(op, lengths, C)
    return scale


def threshold_round_down(t: float) -> float:
    """The largest float32 <= t: an fp32 cosine c is > it exactly when c > t in float64."""
    f = np.float32(t)
    if float(f) > t:
        f = np.nextafter(f, np.float32(-np.inf), dtype=np.float32)
    return float(f)


def check_key_redundancy_args(op, k_cache, lengths, n_window, threshold) -> float:
    """The checks of csrc/torch/key_redundancy_args.h; returns the fp32 threshold."""
    _check_cache(op, k_cache)
    B, Hkv, C, D = k_cache.shape
    if D < 1:
        raise ValueError(f"{op}: k_cache: expected head dim D >= 1, got shape {list(k_cache.shape)}")
    _validate.require_head_ints(op, "lengths", lengths, B, Hkv, k_cache, "k_cache")
    _validate.require_last_dim_contiguous(op, "k_cache", k_cache)
    n_window = _require_int(op, "n_window", n_window)
    if n_window < 0:
        raise ValueError(f"{op}: n_window: expected a value >= 0, got {n_window}")
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError(f"{op}: threshold: expected a number, got nan")
    if _validate.should_check_values(lengths):
        _validate.require_lengths_in_range(op, lengths, C)
    return threshold_round_down(threshold)


def _dot_config(dtype: torch.dtype, head_dim: int):
    """(BLOCK_D, DOT_FP32, DOT_CHUNK). The interpreter cannot do bf16 arithmetic:
    there bf16 tiles widen to fp32 before the dots, in one chunk."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    dot_fp32 = dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)
    chunk = 16 if dtype == torch.float32 else block_d
    return block_d, dot_fp32, chunk


def _row_blocks(group: int, window: int, target: int):
    """(HG, BW): HG heads x BW window queries per dot, powers of two, >= 16 rows,
    about ``target`` rows (BW at most 64, HG at most the group)."""
    bw = min(64, triton.next_power_of_2(window))
    hg = max(1, min(triton.next_power_of_2(group), target // bw))
    if hg * bw < 16:
        bw = 16 // hg
    return hg, bw


def window_scores_triton(q_win, k_cache, lengths, sm_scale=None, query_reduce="mean", group_reduce="mean",
                         normalize=False, pool="none", pool_kernel=1):
    """Triton kernel of ``kvkern::window_scores_triton`` (semantics: ``kvkern.reference.window_scores``).

    Args:
        q_win: ``[B, Hq, W, D]`` float16 / bfloat16 / float32, any strides but the last (1); 1 <= W <= C.
        k_cache: ``[B, Hkv, C, D]``, q_win's dtype, any strides but the last; Hq % Hkv == 0; any D >= 1.
        lengths: ``[B, Hkv]`` int32 in [0, C] (on CUDA not checked: a bad value gives NaN for that head).
        sm_scale: logit scale, default ``D ** -0.5``.
        query_reduce: ``mean`` | ``sum`` over the window queries.
        group_reduce: ``mean`` | ``max`` over a kv head's query heads of the window-reduced rows,
            ``mean_all`` over all Hq, or ``max_per_query``: the max over the group for each window
            query before the window reduce (G-KV's ``mean_t max_h``).
        normalize: divide the candidate slots ``[0, L - W)`` by their max when it is positive.
        pool, pool_kernel: ``none`` | ``avg`` | ``max`` over the candidate slots, odd kernel.

    Returns:
        ``[B, Hkv, C]`` float32 (0 past lengths). Nothing is mutated.
    """
    op = WINDOW_OP
    scale = check_window_scores_args(op, q_win, k_cache, lengths, sm_scale, query_reduce, group_reduce,
                                     normalize, pool, pool_kernel)
    B, Hq, W, D = q_win.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    R = G * W
    dev = q_win.device
    out = torch.empty((B, Hkv, C), dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out

    mean_all = group_reduce == "mean_all"
    pool_code = 0 if pool == "none" or pool_kernel == 1 else (1 if pool == "avg" else 2)
    finish = mean_all or normalize or pool_code != 0
    block_d, dot_fp32, chunk = _dot_config(q_win.dtype, D)
    if not interpreted(dev):
        wide = q_win.dtype != torch.float32
        block_m = 64 if wide else 32
        block_n = 64 if wide else 32
        rows_target = 64 if wide else 32
        num_warps = 4
        programs = B * Hkv * triton.cdiv(R, block_m)
        target = 2 * _sm_count(dev.index)
        splits = 1 if programs >= target else min(-(-target // programs), max(1, C // (4 * block_n)), _MAX_SPLITS)
        block_f = 1024
    else:
        # The interpreter runs programs one after another: few programs, large tiles.
        block_m = min(128, max(16, triton.next_power_of_2(R)))
        block_n = 128
        rows_target = 128
        num_warps = 4
        splits = 1
        block_f = min(4096, triton.next_power_of_2(C))
    hg, bw = _row_blocks(G, W, rows_target)
    num_tiles = triton.cdiv(C, block_n)

    pm = torch.empty((B * Hkv * R * splits,), dtype=torch.float32, device=dev)
    pl = torch.empty_like(pm)
    raw = torch.empty((B, Hkv, C), dtype=torch.float32, device=dev) if finish else out
    need_tmax = normalize
    tmax = torch.empty((B * Hkv * num_tiles,), dtype=torch.float32, device=dev) if need_tmax else pm
    factor = 1.0 / W if query_reduce == "mean" else 1.0
    if group_reduce == "mean":
        factor /= G
    elif mean_all:
        factor /= Hq

    with _device_guard(q_win):
        window_lse_kernel[(B * Hkv * triton.cdiv(R, block_m), splits)](
            q_win, k_cache, lengths, pm, pl, scale,
            Hkv, G, W, C, D, splits,
            q_win.stride(0), q_win.stride(1), q_win.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            lengths.stride(0), lengths.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_FP32=dot_fp32, DOT_CHUNK=chunk,
            num_warps=num_warps,
        )
        window_scores_kernel[(B * Hkv, num_tiles)](
            q_win, k_cache, lengths, pm, pl, raw, tmax, scale, factor,
            Hkv, G, W, C, D, splits, num_tiles,
            q_win.stride(0), q_win.stride(1), q_win.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            lengths.stride(0), lengths.stride(1),
            raw.stride(0), raw.stride(1),
            HG=hg, BW=bw, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            GROUP_MAX=group_reduce == "max", QUERY_MAX=group_reduce == "max_per_query",
            TILE_MAX=need_tmax and not mean_all, WRITE_NAN=not finish,
            DOT_FP32=dot_fp32, DOT_CHUNK=chunk, num_warps=num_warps,
        )
        if mean_all:
            window_combine_kernel[(B, num_tiles)](
                raw, lengths, tmax, Hkv, W, C, num_tiles,
                raw.stride(0), raw.stride(1), lengths.stride(0), lengths.stride(1),
                BLOCK_N=block_n, TILE_MAX=need_tmax, num_warps=num_warps,
            )
        if finish:
            window_finish_kernel[(B * Hkv, triton.cdiv(C, block_f))](
                raw, lengths, tmax, out, Hkv, W, C, num_tiles, min(pool_kernel // 2, C), 1.0 / pool_kernel,
                raw.stride(0), raw.stride(1), lengths.stride(0), lengths.stride(1), out.stride(0), out.stride(1),
                BLOCK_F=block_f, BLOCK_T=min(1024, max(2, triton.next_power_of_2(num_tiles))),
                MEAN_ALL=mean_all, NORMALIZE=normalize, POOL=pool_code, num_warps=num_warps,
            )
    return out


def key_redundancy_triton(k_cache, lengths, n_window, threshold=0.5):
    """Triton kernel of ``kvkern::key_redundancy_triton`` (semantics: ``kvkern.reference.key_redundancy``).

    Args:
        k_cache: ``[B, Hkv, C, D]`` float16 / bfloat16 / float32, any strides but the last (1); any D >= 1.
        lengths: ``[B, Hkv]`` int32 in [0, C] (on CUDA not checked: a bad value gives NaN for that head).
        n_window: >= 0; the last n_window valid slots score 0.
        threshold: cosine above which a pair counts as near-duplicates (not NaN).

    Returns:
        ``[B, Hkv, C]`` float32 in [0, 1] (1 at each head's most redundant candidate; 0 for
        slots >= L - n_window). Nothing is mutated. O(L^2 D) work per head, O(C) memory.
    """
    op = REDUNDANCY_OP
    thr = check_key_redundancy_args(op, k_cache, lengths, n_window, threshold)
    B, Hkv, C, D = k_cache.shape
    dev = k_cache.device
    out = torch.empty((B, Hkv, C), dtype=torch.float32, device=dev)
    if out.numel() == 0:
        return out
    block_d, dot_fp32, chunk = _dot_config(k_cache.dtype, D)
    if not interpreted(dev):
        block_m, block_n = (64, 64) if k_cache.dtype != torch.float32 else (32, 32)
    else:
        block_m, block_n = 128, 128
    rowsum = torch.empty((B * Hkv * C,), dtype=torch.float32, device=dev)
    latest = torch.empty((B * Hkv * C,), dtype=torch.int32, device=dev)
    val = torch.empty_like(rowsum)
    with _device_guard(k_cache):
        redundancy_rows_kernel[(B * Hkv, triton.cdiv(C, block_m))](
            k_cache, lengths, rowsum, latest, val, thr,
            Hkv, C, D,
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), lengths.stride(0), lengths.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_FP32=dot_fp32, DOT_CHUNK=chunk,
            num_warps=4,
        )
        redundancy_corr_kernel[(B * Hkv, triton.cdiv(C, block_m))](
            rowsum, latest, val, lengths, Hkv, C, lengths.stride(0), lengths.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )
        redundancy_finish_kernel[(B * Hkv,)](
            rowsum, lengths, out, Hkv, C, n_window,
            lengths.stride(0), lengths.stride(1), out.stride(0), out.stride(1),
            BLOCK=min(1024, triton.next_power_of_2(C)), num_warps=4,
        )
    return out


KERNELS = {"window_scores_triton": window_scores_triton, "key_redundancy_triton": key_redundancy_triton}
