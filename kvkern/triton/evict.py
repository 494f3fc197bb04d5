# SPDX-License-Identifier: Apache-2.0
"""Triton launchers of ``select_keep_triton``, ``compact_triton_``, ``evict_triton_`` and
``allocate_head_budgets_triton`` (kernels in ``kvkern/triton/kernels/evict.py``;
semantics in ``kvkern/reference.py``).

Every allocation depends on shapes only and nothing reads a tensor value on a GPU,
so the ops run inside CUDA graphs and as opaque ops under
``torch.compile(fullgraph=True)``. The price: on CUDA, checks that need values
cannot raise. There a head whose protected slots (or segment quotas / minima) do
not fit its budget, or whose length lies outside [0, C], is left completely
untouched (keep = its valid slots, new length = its length, nothing moved);
a negative budget makes a head infeasible, a protect range with start > end
protects nothing, and segments are "how many cuts are <= the position" whatever
the cuts' order. On CPU tensors (the Triton interpreter) in eager mode the values
are free to read, so the launchers raise the C++ backend's errors instead, before
anything is written.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton

from .. import _validate as V
from .kernels.evict import (compact_kernel, head_budget_kernel, safeguard_kernel, select_kernel,
                            select_prep_kernel)

__all__ = ["select_keep_triton", "compact_triton_", "evict_triton_", "allocate_head_budgets_triton", "KERNELS"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _device_guard(t: torch.Tensor):
    # Triton launches on the *current* device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _slot_block(capacity: int) -> int:
    # One program walks a head's slots many times (a radix pass per digit), a tile
    # at a time: 1024 slots of 4-byte keys per tile on a GPU; the interpreter runs
    # one numpy op per tile, so it gets the same.
    return max(16, min(1024, triton.next_power_of_2(max(capacity, 1))))


def _slot_digits(capacity: int) -> int:
    """8-bit digits of the largest slot index."""
    return max(1, -(-(max(capacity - 1, 0).bit_length()) // 8))


# ---- argument checks: shapes, dtypes, devices; values only where free ----------

def _check_slot_tensor(op, name, t, dtypes, shape, ref, ref_name):
    V.require_tensor(op, name, t, 3, "[B, Hkv, C]")
    V.require_dtype(op, name, t, dtypes)
    V.require_same_device(op, name, t, ref, ref_name)
    V.require_shape(op, name, t, shape, "[B, Hkv, C]")
    V.require_last_dim_contiguous(op, name, t)


def _check_count(op, name, value):
    if value < 0:
        raise ValueError(f"{op}: {name}: expected a value >= 0, got {value}")


def _check_int_vector(op, name, t, ref, layout):
    V.require_tensor(op, name, t, 1, layout)
    V.require_dtype(op, name, t, (torch.int32,))
    V.require_same_device(op, name, t, ref, "scores")


def _check_scores_lengths_counts(op, scores, lengths, budget, n_sink, n_recent):
    """scores [B, Hkv, C] float32, lengths [B, Hkv] int32 on its device, the counts >= 0;
    returns (B, Hkv, C)."""
    V.require_tensor(op, "scores", scores, 3, "[B, Hkv, C]")
    V.require_dtype(op, "scores", scores, (torch.float32,))
    V.require_last_dim_contiguous(op, "scores", scores)
    B, H, C = scores.shape
    V.require_head_ints(op, "lengths", lengths, B, H, scores, "scores")
    _check_count(op, "budget", budget)
    _check_count(op, "n_sink", n_sink)
    _check_count(op, "n_recent", n_recent)
    return B, H, C


def _check_select_args(op, scores, lengths, positions, budgets, budget, n_sink, n_recent, protect_ranges,
                       keep_mask, segment_cuts, segment_min):
    B, H, C = _check_scores_lengths_counts(op, scores, lengths, budget, n_sink, n_recent)
    if positions is not None:
        _check_slot_tensor(op, "positions", positions, (torch.int32,), (B, H, C), scores, "scores")
    if budgets is not None:
        V.require_head_ints(op, "budgets", budgets, B, H, scores, "scores")
    if protect_ranges is not None:
        t = protect_ranges
        if not isinstance(t, torch.Tensor) or t.dim() not in (2, 3):
            got = f"a {t.dim()}-D tensor of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: protect_ranges: expected a 2-D tensor [R, 2] or a 3-D tensor [B, R, 2], got {got}")
        V.require_dtype(op, "protect_ranges", t, (torch.int32,))
        V.require_same_device(op, "protect_ranges", t, scores, "scores")
        if t.shape[-1] != 2 or (t.dim() == 3 and t.shape[0] != B):
            raise ValueError(f"{op}: protect_ranges: expected shape [R, 2] or [B, R, 2] with B = {B}, "
                             f"got {list(t.shape)}")
    if keep_mask is not None:
        _check_slot_tensor(op, "keep_mask", keep_mask, (torch.bool,), (B, H, C), scores, "scores")
    if segment_cuts is not None:
        _check_int_vector(op, "segment_cuts", segment_cuts, scores, "[S - 1]")
    if segment_min is not None:
        if segment_cuts is None:
            raise ValueError(f"{op}: segment_min: expected segment_cuts as well (minima are per segment), "
                             f"got segment_cuts=None")
        _check_int_vector(op, "segment_min", segment_min, scores, "[S]")
        S = segment_cuts.numel() + 1
        if segment_min.shape[0] != S:
            raise ValueError(f"{op}: segment_min: expected shape [S] = [{S}] (one more than segment_cuts), "
                             f"got {list(segment_min.shape)}")


def _check_lengths_values(op, lengths, C):
    bad = ((lengths < 0) | (lengths > C)).nonzero()
    if bad.numel():
        b, j = bad[0].tolist()
        raise ValueError(f"{op}: lengths: expected every value in [0, C] = [0, {C}], got "
                         f"{int(lengths[b, j])} at [{b}, {j}]")


def _check_select_values(op, lengths, C, budgets, protect_ranges, segment_cuts):
    _check_lengths_values(op, lengths, C)
    if budgets is not None:
        bad = (budgets < 0).nonzero()
        if bad.numel():
            b, j = bad[0].tolist()
            raise ValueError(f"{op}: budgets: expected every value >= 0, got {int(budgets[b, j])} at [{b}, {j}]")
    if protect_ranges is not None and protect_ranges.numel():
        pr = protect_ranges.reshape(-1, 2)
        bad = (pr[:, 0] > pr[:, 1]).nonzero()
        if bad.numel():
            start, end = pr[int(bad[0])].tolist()
            raise ValueError(f"{op}: protect_ranges: expected start <= end in every [start, end) range, "
                             f"got [{start}, {end})")
    if segment_cuts is not None and segment_cuts.numel() > 1:
        bad = (segment_cuts[:-1] >= segment_cuts[1:]).nonzero()
        if bad.numel():
            s = int(bad[0]) + 1
            raise ValueError(f"{op}: segment_cuts: expected strictly increasing positions, got "
                             f"{int(segment_cuts[s - 1])} then {int(segment_cuts[s])} at index {s}")


def _check_compact_args(op, k_cache, v_cache, lengths, keep, positions, hist, log_w):
    V.require_tensor(op, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    V.require_tensor(op, "v_cache", v_cache, 4, "[B, Hkv, C, D]")
    V.require_dtype(op, "k_cache", k_cache, _FLOAT_DTYPES)
    V.require_dtype(op, "v_cache", v_cache, (k_cache.dtype,))
    V.require_same_device(op, "v_cache", v_cache, k_cache, "k_cache")
    B, H, C, D = k_cache.shape
    V.require_shape(op, "v_cache", v_cache, (B, H, C, D), "[B, Hkv, C, D]")
    V.require_last_dim_contiguous(op, "k_cache", k_cache)
    V.require_last_dim_contiguous(op, "v_cache", v_cache)
    V.require_head_ints(op, "lengths", lengths, B, H, k_cache, "k_cache")
    if keep is not None:
        _check_slot_tensor(op, "keep", keep, (torch.bool,), (B, H, C), k_cache, "k_cache")
    for name, t, dtype in (("positions", positions, torch.int32), ("hist", hist, torch.float32),
                           ("log_w", log_w, torch.float32)):
        if t is not None:
            _check_slot_tensor(op, name, t, (dtype,), (B, H, C), k_cache, "k_cache")


_STATUS_TEXT = {
    1: "{need} protected slots exceed the budget {allowed}",
    2: "segment {segment} has {need} protected slots but a quota of {allowed}",
    3: "protected slots and segment minima need {need} slots, more than the budget {allowed}",
}


def _raise_status(op, status, num_heads):
    """Raises for the first infeasible head in (b, j) order, as the C++ backend."""
    bad = status[:, 0].nonzero()
    if bad.numel():
        row = int(bad[0])
        code, segment, need, allowed = status[row].tolist()
        text = _STATUS_TEXT[code].format(segment=segment, need=need, allowed=allowed)
        raise ValueError(f"{op}: head [{row // num_heads}, {row % num_heads}]: {text}")


# ---- launches ------------------------------------------------------------------

def _prep(scores, lengths, positions, n_sink, n_recent, protect_ranges, keep_mask, segment_cuts):
    """Per-slot key and class ([B*Hkv, C] int32 each)."""
    B, H, C = scores.shape
    key = torch.empty((B * H, C), dtype=torch.int32, device=scores.device)
    cls = torch.empty((B * H, C), dtype=torch.int32, device=scores.device)
    block = _slot_block(C)
    has_ranges = protect_ranges is not None and protect_ranges.shape[-2] > 0
    pr = protect_ranges if has_ranges else lengths
    batched = has_ranges and protect_ranges.dim() == 3
    has_cuts = segment_cuts is not None and segment_cuts.numel() > 0
    dummy = lengths
    select_prep_kernel[(B * H, triton.cdiv(C, block))](
        scores.view(torch.int32), lengths,
        positions if positions is not None else dummy, pr,
        keep_mask.view(torch.uint8) if keep_mask is not None else dummy,
        segment_cuts if has_cuts else dummy,
        key, cls,
        H, C, min(n_sink, C), min(n_recent, C),
        protect_ranges.shape[-2] if has_ranges else 0, segment_cuts.numel() if has_cuts else 0,
        scores.stride(0), scores.stride(1), lengths.stride(0), lengths.stride(1),
        positions.stride(0) if positions is not None else 0, positions.stride(1) if positions is not None else 0,
        pr.stride(0) if batched else 0, pr.stride(-2) if has_ranges else 0, pr.stride(-1) if has_ranges else 0,
        keep_mask.stride(0) if keep_mask is not None else 0, keep_mask.stride(1) if keep_mask is not None else 0,
        segment_cuts.stride(0) if has_cuts else 0,
        HAS_POS=positions is not None, HAS_RANGES=has_ranges, HAS_KEEP_MASK=keep_mask is not None,
        HAS_CUTS=has_cuts, BLOCK=block, num_warps=4,
    )
    return key, cls


def _run_select(scores, lengths, positions, budgets, budget, n_sink, n_recent, protect_ranges, keep_mask,
                segment_cuts, segment_min):
    """keep (bool [B, Hkv, C]), new_lengths (int32 [B, Hkv]) and the per-head status [B*Hkv, 4]."""
    B, H, C = scores.shape
    device = scores.device
    keep = torch.empty((B, H, C), dtype=torch.bool, device=device)
    new_lengths = torch.empty((B, H), dtype=torch.int32, device=device)
    status = torch.zeros((B * H, 4), dtype=torch.int32, device=device)
    if B * H == 0:
        return keep, new_lengths, status
    if C == 0:
        new_lengths.copy_(lengths)
        return keep, new_lengths, status
    key, cls = _prep(scores, lengths, positions, n_sink, n_recent, protect_ranges, keep_mask, segment_cuts)
    S = 1 if segment_cuts is None else segment_cuts.numel() + 1
    mode = 0 if segment_cuts is None else (1 if segment_min is None else 2)
    select_kernel[(B * H,)](
        key, cls, lengths, budgets if budgets is not None else lengths,
        segment_min if segment_min is not None else lengths,
        keep.view(torch.uint8), new_lengths, status,
        budget, H, C, S,
        lengths.stride(0), lengths.stride(1),
        budgets.stride(0) if budgets is not None else 0, budgets.stride(1) if budgets is not None else 0,
        segment_min.stride(0) if segment_min is not None else 0,
        HAS_BUDGETS=budgets is not None, MODE=mode, BLOCK=_slot_block(C),
        BLOCK_S=max(2, triton.next_power_of_2(S)), SLOT_DIGITS=_slot_digits(C), num_warps=4,
    )
    return keep, new_lengths, status


def _run_compact(k_cache, v_cache, lengths_in, lengths_out, keep, positions, hist, log_w):
    B, H, C, D = k_cache.shape
    if B * H == 0 or C == 0:
        return
    block_d = triton.next_power_of_2(max(D, 1))
    block_d = block_d if INTERPRET else min(64, block_d)
    block_s = 64 if INTERPRET else 32
    dummy = lengths_in
    compact_kernel[(B * H, max(1, triton.cdiv(D, block_d)))](  # D = 0: still move the side arrays
        k_cache, v_cache, lengths_in, lengths_out, keep.view(torch.uint8),
        positions if positions is not None else dummy, hist if hist is not None else dummy,
        log_w if log_w is not None else dummy,
        H, C, D,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        lengths_in.stride(0), lengths_in.stride(1), keep.stride(0), keep.stride(1),
        *(t.stride(i) if t is not None else 0 for t in (positions, hist, log_w) for i in (0, 1)),
        HAS_POS=positions is not None, HAS_HIST=hist is not None, HAS_LOG_W=log_w is not None,
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
    )


# ---- the ops ---------------------------------------------------------------------

def _checked_select(op, scores, lengths, positions, budgets, budget, n_sink, n_recent, protect_ranges, keep_mask,
                    segment_cuts, segment_min):
    """The selection of checked arguments; where values are free to read (CPU, eager),
    their value checks first and the infeasible heads' errors after. Returns
    ``(keep, new_lengths)``."""
    check = V.should_check_values(scores)
    if check:
        _check_select_values(op, lengths, scores.shape[2], budgets, protect_ranges, segment_cuts)
    keep, new_lengths, status = _run_select(scores, lengths, positions, budgets, budget, n_sink, n_recent,
                                            protect_ranges, keep_mask, segment_cuts, segment_min)
    if check:
        _raise_status(op, status, scores.shape[1])
    return keep, new_lengths


def select_keep_triton(scores, lengths, positions, budgets, budget, n_sink=0, n_recent=0, protect_ranges=None,
                       keep_mask=None, segment_cuts=None, segment_min=None):
    """Triton kernel of ``kvkern::select_keep_triton`` (semantics: ``kvkern.reference.select_keep``).

    Args:
        scores: ``[B, Hkv, C]`` float32 (last dim contiguous); higher = keep; NaN ranks as -inf (as the reference).
        lengths: ``[B, Hkv]`` int32.   positions: ``[B, Hkv, C]`` int32 or None (= slot index).
        budgets: ``[B, Hkv]`` int32 or None (then ``budget`` for every head).
        n_sink, n_recent: the first / last slots always kept.
        protect_ranges: ``[R, 2]`` or ``[B, R, 2]`` int32 position ranges [start, end) always kept.
        keep_mask: ``[B, Hkv, C]`` bool, slots always kept.
        segment_cuts: ``[S - 1]`` int32 increasing positions; segment_min: ``[S]`` int32 minima.

    Returns:
        ``keep [B, Hkv, C]`` bool and ``new_lengths [B, Hkv]`` int32. Nothing is mutated.
        Infeasible heads: see the module docstring.
    """
    op = "kvkern::select_keep_triton"
    _check_select_args(op, scores, lengths, positions, budgets, budget, n_sink, n_recent, protect_ranges,
                       keep_mask, segment_cuts, segment_min)
    with _device_guard(scores):
        return _checked_select(op, scores, lengths, positions, budgets, budget, n_sink, n_recent, protect_ranges,
                               keep_mask, segment_cuts, segment_min)


def compact_triton_(k_cache, v_cache, lengths, keep, positions=None, hist=None, log_w=None):
    """Triton kernel of ``kvkern::compact_triton_`` (semantics: ``kvkern.reference.compact_``).

    Moves each head's kept valid slots (``keep [B, Hkv, C]`` bool) to the front in slot
    order, in place in ``k_cache`` / ``v_cache`` (``[B, Hkv, C, D]``, float16 / bfloat16 /
    float32) and the optional ``positions`` (int32), ``hist`` and ``log_w`` (float32)
    ``[B, Hkv, C]``; writes their count to ``lengths`` ([B, Hkv] int32). Slots past the
    new length keep whatever they held. A head whose length lies outside [0, C] is left
    alone on CUDA (raises on CPU).
    """
    op = "kvkern::compact_triton_"
    _check_compact_args(op, k_cache, v_cache, lengths, keep, positions, hist, log_w)
    if V.should_check_values(lengths):
        _check_lengths_values(op, lengths, k_cache.shape[2])
    with _device_guard(k_cache):
        _run_compact(k_cache, v_cache, lengths.clone(), lengths, keep, positions, hist, log_w)


def evict_triton_(k_cache, v_cache, lengths, positions, scores, budgets, budget, n_sink=0, n_recent=0,
                  protect_ranges=None, keep_mask=None, segment_cuts=None, segment_min=None, hist=None, log_w=None):
    """Triton kernel of ``kvkern::evict_triton_``: :func:`select_keep_triton` then
    :func:`compact_triton_` (semantics: ``kvkern.reference.evict_``). Mutates k_cache,
    v_cache, lengths and the optional positions / hist / log_w; returns the keep mask
    ``[B, Hkv, C]`` bool taken before compaction."""
    op = "kvkern::evict_triton_"
    _check_compact_args(op, k_cache, v_cache, lengths, None, positions, hist, log_w)
    V.require_tensor(op, "scores", scores, 3, "[B, Hkv, C]")
    V.require_shape(op, "scores", scores, tuple(k_cache.shape[:3]), "[B, Hkv, C] (from k_cache)")
    V.require_same_device(op, "scores", scores, k_cache, "k_cache")
    _check_select_args(op, scores, lengths, positions, budgets, budget, n_sink, n_recent, protect_ranges,
                       keep_mask, segment_cuts, segment_min)
    with _device_guard(k_cache):
        # Raises (where values are free to read) before anything is written.
        keep, _ = _checked_select(op, scores, lengths, positions, budgets, budget, n_sink, n_recent,
                                  protect_ranges, keep_mask, segment_cuts, segment_min)
        _run_compact(k_cache, v_cache, lengths.clone(), lengths, keep, positions, hist, log_w)
    return keep


def allocate_head_budgets_triton(scores, lengths, budget, safeguard=0.2, n_sink=0, n_recent=0):
    """Triton kernel of ``kvkern::allocate_head_budgets_triton`` (semantics:
    ``kvkern.reference.allocate_head_budgets``): AdaKV head budgets ``[B, Hkv]`` int32
    from ``scores [B, Hkv, C]`` float32 and ``lengths [B, Hkv]`` int32. Nothing is mutated."""
    op = "kvkern::allocate_head_budgets_triton"
    B, H, C = _check_scores_lengths_counts(op, scores, lengths, budget, n_sink, n_recent)
    safeguard = float(safeguard)
    if not 0.0 <= safeguard <= 1.0:  # false for NaN
        raise ValueError(f"{op}: safeguard: expected a fraction in [0, 1], got {safeguard}")
    if V.should_check_values(lengths):
        _check_lengths_values(op, lengths, C)
    out = torch.zeros((B, H), dtype=torch.int32, device=scores.device)
    if B * H == 0 or C == 0:
        return out
    n_safe = budget * safeguard  # int(budget * safeguard) as the reference, capped at C
    n_safe = C if n_safe >= C else int(n_safe)
    block = _slot_block(C)
    with _device_guard(scores):
        key, cls = _prep(scores, lengths, None, n_sink, n_recent, None, None, None)
        safeguard_kernel[(B * H,)](key, cls, lengths, H, C, n_safe, lengths.stride(0), lengths.stride(1),
                                   BLOCK=block, SLOT_DIGITS=_slot_digits(C), num_warps=4)
        head_budget_kernel[(B,)](key, lengths, out, budget, H, C, lengths.stride(0), lengths.stride(1),
                                 BLOCK=block, BLOCK_H=max(2, triton.next_power_of_2(H)),
                                 SLOT_DIGITS=_slot_digits(C), num_warps=4)
    return out


KERNELS = {
    "select_keep_triton": select_keep_triton,
    "compact_triton_": compact_triton_,
    "evict_triton_": evict_triton_,
    "allocate_head_budgets_triton": allocate_head_budgets_triton,
}
