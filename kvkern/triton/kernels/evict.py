# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for select_keep, compact_, evict_ and allocate_head_budgets.
Kernels only; the launchers live in ``kvkern/triton/evict.py``.

Ranking. A slot's score becomes an order-preserving 32-bit key (fp32 bits with the
magnitude bits of negatives flipped; -0 maps to the key of +0 and NaN to the key
of -inf, as the reference's ranking), and the reference's order "higher score
first, ties toward the later slot" is descending order of the pair (key, slot).
The n best candidates of a head are found by a radix select on that pair: one
256-bin histogram per 8-bit digit (four for the key, then as many as the slot
index needs), each narrowing the prefix of the n-th best pair. That gives a
threshold (T, P): the picks are exactly the candidates with key > T, or key == T
and slot >= P. O(L) work per digit, no sort, and exact whatever the ties.

Working state. ``select_prep_kernel`` writes per slot its key (int32, ordered as a
signed integer) and a class ``cls``: -1 for a slot at or past the length, else
``2 * segment + protected``. A selection marks its picks by setting the low bit of
``cls``, so after all stages a head keeps exactly its slots with an odd class.
One program owns one head's rows: between a marking pass and the next read it
issues a barrier so that every thread sees the other threads' writes.
"""

import triton
import triton.language as tl

from ._heads import head_length as _head_length

NUM_BINS: tl.constexpr = tl.constexpr(256)
# The key of allocate_head_budgets' pinned slots: +inf's (the reference pins with +inf).
KEY_PINNED: tl.constexpr = tl.constexpr(0x7F800000)
# The key of -inf, which every NaN gets too (NaN ranks as -inf).
KEY_NEG_INF: tl.constexpr = tl.constexpr(-2139095041)


@triton.jit
def _order_key(bits):
    """fp32 bits (int32) -> int32 key, ordered as signed integers like the scores. -0
    gets the key of +0 and every NaN the key of -inf (NaN ranks as -inf; the tie goes
    to the later slot like any other)."""
    bits = tl.where(bits == -2147483648, 0, bits)  # -0 -> +0
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return tl.where((bits & 0x7FFFFFFF) > 0x7F800000, KEY_NEG_INF, key)


@triton.jit
def _take_digit(hist, need, thr, pos, d: tl.constexpr):
    """One radix pass's outcome: from the histogram of digit ``d`` of the candidates
    that match the prefix so far, the digit where the ``need``-th best lies, appended
    to the key prefix ``thr`` (digits 0-3) or the slot prefix ``pos``; ``need``
    becomes the rank within that digit."""
    # above[b]: candidates with a larger digit (non-increasing in b). The need-th
    # best has the first digit with above < need; those above it are picked.
    above = tl.cumsum(hist, 0, reverse=True) - hist
    digit = tl.minimum(tl.sum((above >= need).to(tl.int32), 0), NUM_BINS - 1)
    need -= tl.max(tl.where(above < need, above, 0), 0)
    if d < 4:
        thr = thr * 256 + digit
    else:
        pos = pos * 256 + digit
    return need, thr, pos


@triton.jit
def _row_threshold(key_row, cls_row, n_slots, need, cls_lo, cls_hi,
                   ANY_PROTECTION: tl.constexpr, BLOCK: tl.constexpr, SLOT_DIGITS: tl.constexpr):
    """Threshold (T, P) of the ``need`` best candidates among slots [0, n_slots) of one
    row: the picks are key > T, or key == T and slot >= P (T is the key's unsigned
    image, int64). Needs 1 <= need <= number of candidates; n_slots = 0 runs nothing.

    Candidates: with ANY_PROTECTION every valid slot (allocate_head_budgets'
    safeguard), else the unprotected, unpicked slots with a class in [cls_lo, cls_hi].
    Digits 0-3 are the key's bytes from the top, then the slot index's; each pass
    histograms the current digit of the candidates that match the prefix so far
    and keeps the digit where the need-th best lies. (The helpers are inlined: the
    Triton interpreter pays for every device-function call.)"""
    thr = tl.zeros((), tl.int64)
    pos = tl.zeros((), tl.int32)
    for d in tl.static_range(4 + SLOT_DIGITS):
        hist = tl.zeros((NUM_BINS,), tl.int32)
        for start in range(0, n_slots, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n_slots
            c = tl.load(cls_row + offs, mask=m, other=-1)
            u = tl.load(key_row + offs, mask=m, other=0).to(tl.int64) + 2147483648
            if ANY_PROTECTION:
                sel = m & (c >= 0)
            else:
                sel = m & (c >= cls_lo) & (c <= cls_hi) & ((c & 1) == 0)
            if d < 4:
                if d > 0:
                    sel = sel & ((u >> (32 - 8 * d)) == thr)
                digit_of = ((u >> (24 - 8 * d)) & 255).to(tl.int32)
            else:
                sel = sel & (u == thr)
                if d > 4:
                    sel = sel & ((offs >> (8 * (4 + SLOT_DIGITS - d))) == pos)
                digit_of = (offs >> (8 * (3 + SLOT_DIGITS - d))) & 255
            hist += tl.histogram(digit_of, NUM_BINS, mask=sel)
        need, thr, pos = _take_digit(hist, need, thr, pos, d)
    return thr, pos


@triton.jit
def select_prep_kernel(
    scores_ptr, lengths_ptr, pos_ptr, ranges_ptr, keep_mask_ptr, cuts_ptr,
    key_ptr, cls_ptr,
    num_heads, capacity, n_sink, n_recent, num_ranges, num_cuts,
    stride_sb, stride_sh, stride_lb, stride_lh, stride_pb, stride_ph,
    stride_rb, stride_rr, stride_re, stride_mb, stride_mh, stride_cut,
    HAS_POS: tl.constexpr, HAS_RANGES: tl.constexpr, HAS_KEEP_MASK: tl.constexpr,
    HAS_CUTS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: a tile of one head's slots. Writes key and cls ([B*Hkv, C], int32).

    Grid: (B * Hkv, cdiv(C, BLOCK)). ``scores_ptr`` is the fp32 scores viewed as int32.
    Protected: slot < n_sink, slot >= L - n_recent, position in a [start, end) of
    protect_ranges, keep_mask. Segment: how many cuts are <= the position. A length
    outside [0, C] is clamped here (the selection leaves such a head alone)."""
    row = tl.program_id(0)
    tile = tl.program_id(1)
    b = (row // num_heads).to(tl.int64)
    j = (row % num_heads).to(tl.int64)
    length = tl.load(lengths_ptr + b * stride_lb + j * stride_lh)
    length = tl.minimum(tl.maximum(length, 0), capacity)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < capacity
    valid = offs < length
    bits = tl.load(scores_ptr + b * stride_sb + j * stride_sh + offs, mask=valid, other=0)
    key = _order_key(bits)
    if HAS_POS:
        pos = tl.load(pos_ptr + b * stride_pb + j * stride_ph + offs, mask=valid, other=0)
    else:
        pos = offs
    prot = (offs < n_sink) | (offs >= length - n_recent)
    if HAS_KEEP_MASK:
        prot = prot | (tl.load(keep_mask_ptr + b * stride_mb + j * stride_mh + offs, mask=valid, other=0) != 0)
    if HAS_RANGES:
        rrow = ranges_ptr + b * stride_rb
        for r in range(num_ranges):
            start = tl.load(rrow + r * stride_rr)
            end = tl.load(rrow + r * stride_rr + stride_re)
            prot = prot | ((pos >= start) & (pos < end))
    seg = tl.zeros((BLOCK,), tl.int32)
    if HAS_CUTS:
        for c in range(num_cuts):
            seg += (pos >= tl.load(cuts_ptr + c * stride_cut)).to(tl.int32)
    cls = tl.where(valid, 2 * seg + prot.to(tl.int32), -1)
    tl.store(key_ptr + row.to(tl.int64) * capacity + offs, key, mask=in_row)
    tl.store(cls_ptr + row.to(tl.int64) * capacity + offs, cls, mask=in_row)


@triton.jit
def _mark_picks(key_row, cls_row, n_slots, thr, pos, cls_lo, cls_hi, BLOCK: tl.constexpr):
    for start in range(0, n_slots, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n_slots
        c = tl.load(cls_row + offs, mask=m, other=-1)
        u = tl.load(key_row + offs, mask=m, other=0).to(tl.int64) + 2147483648
        pick = m & (c >= cls_lo) & (c <= cls_hi) & ((c & 1) == 0) & ((u > thr) | ((u == thr) & (offs >= pos)))
        tl.store(cls_row + offs, c | 1, mask=pick)
    # The next stage reads classes other threads of this program wrote.
    tl.debug_barrier()


@triton.jit
def select_kernel(
    key_ptr, cls_ptr, lengths_ptr, budgets_ptr, seg_min_ptr,
    keep_ptr, new_lengths_ptr, status_ptr,
    budget, num_heads, capacity, num_segments,
    stride_lb, stride_lh, stride_bb, stride_bh, stride_min,
    HAS_BUDGETS: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr,
    SLOT_DIGITS: tl.constexpr,
):
    """One program: one head (b, j). Grid: (B * Hkv,).

    MODE 0: one pool (protected + the best K - P others). 1: proportional segment
    quotas. 2: segment minima, then the best of any segment. Writes keep (uint8,
    [B*Hkv, C], every slot), new_lengths ([B*Hkv]) and status ([B*Hkv, 4] int32:
    code, segment, needed, allowed; code 0 ok, 1 protected > budget, 2 a segment's
    protected > its quota, 3 protected + minima > budget).

    A head with L <= K, a length outside [0, C] or an infeasible plan keeps every
    slot below its (clamped) length and its length: the cache is left as it was.
    """
    row = tl.program_id(0)
    b = (row // num_heads).to(tl.int64)
    j = (row % num_heads).to(tl.int64)
    length = tl.load(lengths_ptr + b * stride_lb + j * stride_lh)
    if HAS_BUDGETS:
        k = tl.load(budgets_ptr + b * stride_bb + j * stride_bh).to(tl.int64)
    else:
        k = tl.zeros((), tl.int64) + budget
    bad_length = (length < 0) | (length > capacity)
    clamped = tl.minimum(tl.maximum(length, 0), capacity)
    active = (~bad_length) & (length.to(tl.int64) > k)
    n_act = tl.where(active, clamped, 0)
    key_row = key_ptr + row.to(tl.int64) * capacity
    cls_row = cls_ptr + row.to(tl.int64) * capacity

    # Valid slots per (segment, protected): bin 2 s + p.
    counts = tl.zeros((2 * BLOCK_S,), tl.int32)
    for start in range(0, n_act, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < n_act
        c = tl.load(cls_row + offs, mask=m, other=-1)
        counts += tl.histogram(tl.maximum(c, 0), 2 * BLOCK_S, mask=m & (c >= 0))
    free, prot = tl.split(tl.reshape(counts, (BLOCK_S, 2)))
    n_seg = (free + prot).to(tl.int64)
    prot = prot.to(tl.int64)
    total_prot = tl.sum(prot, 0)
    sid = tl.arange(0, BLOCK_S)
    k_safe = tl.minimum(k, capacity)  # k < L <= C for active heads; keeps the math in range
    code = tl.where(total_prot > k, 1, 0)
    seg_bad = tl.zeros((), tl.int32)
    needed = total_prot
    allowed = k
    if MODE == 1:
        # floor(K n_s / L), then one more to each non-empty segment from the last
        # backwards while some remains (the reference's loop needs one round: what
        # remains is below the number of non-empty segments).
        quota = k_safe * n_seg // tl.maximum(n_act, 1).to(tl.int64)
        left = k_safe - tl.sum(quota, 0)
        nonempty = (n_seg > 0).to(tl.int64)
        later = tl.sum(nonempty, 0) - tl.cumsum(nonempty, 0)
        quota += tl.where((nonempty > 0) & (later < left), 1, 0)
        need = quota - prot
        over = prot > quota
        first_over = tl.min(tl.where(over, sid, BLOCK_S), 0)
        seg_code = (code == 0) & (first_over < BLOCK_S)
        code = tl.where(seg_code, 2, code)
        seg_bad = tl.where(seg_code, first_over, 0)
        needed = tl.where(seg_code, tl.sum(tl.where(sid == first_over, prot, 0), 0), needed)
        allowed = tl.where(seg_code, tl.sum(tl.where(sid == first_over, quota, 0), 0), allowed)
        fill = tl.zeros((), tl.int64)
    elif MODE == 2:
        seg_min = tl.load(seg_min_ptr + sid * stride_min, mask=sid < num_segments, other=0).to(tl.int64)
        need = tl.maximum(tl.minimum(seg_min, n_seg) - prot, 0)
        total = total_prot + tl.sum(need, 0)
        min_code = (code == 0) & (total > k)
        code = tl.where(min_code, 3, code)
        needed = tl.where(min_code, total, needed)
        fill = k - total
    else:
        need = tl.zeros((BLOCK_S,), tl.int64)
        fill = k - total_prot
    active = active & (code == 0)
    n_go = tl.where(active, clamped, 0)

    if MODE != 0:
        for s in range(num_segments):
            n = tl.sum(tl.where(sid == s, need, 0), 0)
            n_run = tl.where(n > 0, n_go, 0)
            thr, pos = _row_threshold(key_row, cls_row, n_run, n, 2 * s, 2 * s, False, BLOCK, SLOT_DIGITS)
            _mark_picks(key_row, cls_row, n_run, thr, pos, 2 * s, 2 * s, BLOCK)
    n_run = tl.where(fill > 0, n_go, 0)
    top = 2 * num_segments - 2
    thr, pos = _row_threshold(key_row, cls_row, n_run, fill, 0, top, False, BLOCK, SLOT_DIGITS)
    _mark_picks(key_row, cls_row, n_run, thr, pos, 0, top, BLOCK)

    keep_row = keep_ptr + row.to(tl.int64) * capacity
    for start in range(0, capacity, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < capacity
        c = tl.load(cls_row + offs, mask=m, other=-1)
        keep = tl.where(active, (c >= 0) & ((c & 1) == 1), offs < clamped)
        tl.store(keep_row + offs, keep.to(tl.uint8), mask=m)
    tl.store(new_lengths_ptr + row, tl.where(active, k, length.to(tl.int64)).to(tl.int32))
    # Only heads that needed a selection report a problem.
    code = tl.where(bad_length | (length.to(tl.int64) <= k), 0, code)
    srow = status_ptr + row.to(tl.int64) * 4
    tl.store(srow, code)
    tl.store(srow + 1, seg_bad.to(tl.int32))
    tl.store(srow + 2, needed.to(tl.int32))
    tl.store(srow + 3, tl.minimum(allowed, 2147483647).to(tl.int32))


@triton.jit
def compact_kernel(
    k_ptr, v_ptr, len_in_ptr, len_out_ptr, keep_ptr, pos_ptr, hist_ptr, log_w_ptr,
    num_heads, capacity, head_dim,
    stride_kb, stride_kh, stride_kc, stride_vb, stride_vh, stride_vc,
    stride_lb, stride_lh, stride_keb, stride_keh,
    stride_pb, stride_ph, stride_hb, stride_hh, stride_wb, stride_wh,
    HAS_POS: tl.constexpr, HAS_HIST: tl.constexpr, HAS_LOG_W: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: one head (b, j) and one chunk of BLOCK_D channels. Grid:
    (B * Hkv, cdiv(D, BLOCK_D)). Chunk 0 also moves positions / hist / log_w and
    writes the new length to ``len_out`` (the old one is read from ``len_in``, a
    copy, since the other chunks' programs still read it). A length outside [0, C]
    leaves the head alone.

    In place and race-free: slot i moves to d(i) <= i, and the program walks the
    slots in increasing order, a tile at a time. A tile's stores land below the end
    of the tile, so they never reach a slot a later tile will read; within the
    tile, a barrier between its loads and its stores keeps one thread from
    overwriting a row that another has yet to load."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    b = (row // num_heads).to(tl.int64)
    j = (row % num_heads).to(tl.int64)
    n_slots, bad_length = _head_length(len_in_ptr, b, j, stride_lb, stride_lh, capacity)
    first = chunk == 0
    d_offs = chunk * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = d_offs < head_dim
    k_row = k_ptr + b * stride_kb + j * stride_kh
    v_row = v_ptr + b * stride_vb + j * stride_vh
    keep_row = keep_ptr + b * stride_keb + j * stride_keh
    done = tl.zeros((), tl.int32)
    for start in range(0, n_slots, BLOCK_S):
        offs = start + tl.arange(0, BLOCK_S)
        m = offs < n_slots
        kept = m & (tl.load(keep_row + offs, mask=m, other=0) != 0)
        kept_i = kept.to(tl.int32)
        dest = done + tl.cumsum(kept_i, 0) - kept_i
        move = kept & (dest != offs)  # a slot already in place needs no copy
        mm = move[:, None] & d_mask[None, :]
        src64 = offs.to(tl.int64)
        dst64 = dest.to(tl.int64)
        k_tile = tl.load(k_row + src64[:, None] * stride_kc + d_offs[None, :], mask=mm)
        v_tile = tl.load(v_row + src64[:, None] * stride_vc + d_offs[None, :], mask=mm)
        # (A block-shaped test: the interpreter rejects a mask made with a scalar bool.)
        side = move & ((offs * 0 + chunk) == 0)
        if HAS_POS:
            pos = tl.load(pos_ptr + b * stride_pb + j * stride_ph + offs, mask=side)
        if HAS_HIST:
            hist = tl.load(hist_ptr + b * stride_hb + j * stride_hh + offs, mask=side)
        if HAS_LOG_W:
            log_w = tl.load(log_w_ptr + b * stride_wb + j * stride_wh + offs, mask=side)
        tl.debug_barrier()
        tl.store(k_row + dst64[:, None] * stride_kc + d_offs[None, :], k_tile, mask=mm)
        tl.store(v_row + dst64[:, None] * stride_vc + d_offs[None, :], v_tile, mask=mm)
        if HAS_POS:
            tl.store(pos_ptr + b * stride_pb + j * stride_ph + dest, pos, mask=side)
        if HAS_HIST:
            tl.store(hist_ptr + b * stride_hb + j * stride_hh + dest, hist, mask=side)
        if HAS_LOG_W:
            tl.store(log_w_ptr + b * stride_wb + j * stride_wh + dest, log_w, mask=side)
        done += tl.sum(kept_i, 0)
    tl.store(len_out_ptr + b * stride_lb + j * stride_lh, done, mask=first & (~bad_length))


@triton.jit
def safeguard_kernel(
    key_ptr, cls_ptr, lengths_ptr, num_heads, capacity, n_safe, stride_lb, stride_lh,
    BLOCK: tl.constexpr, SLOT_DIGITS: tl.constexpr,
):
    """allocate_head_budgets, step 1. One program: one head. Grid: (B * Hkv,).

    Pins the head's best min(n_safe, L) slots and its protected (sink / recent)
    slots: their key becomes KEY_PINNED."""
    row = tl.program_id(0)
    b = (row // num_heads).to(tl.int64)
    j = (row % num_heads).to(tl.int64)
    length = tl.load(lengths_ptr + b * stride_lb + j * stride_lh)
    length = tl.minimum(tl.maximum(length, 0), capacity)
    key_row = key_ptr + row.to(tl.int64) * capacity
    cls_row = cls_ptr + row.to(tl.int64) * capacity
    n = tl.minimum(length, n_safe)
    n_run = tl.where(n > 0, length, 0)
    thr, pos = _row_threshold(key_row, cls_row, n_run, n, 0, 0, True, BLOCK, SLOT_DIGITS)
    # With n == 0 nothing is picked: no key lies above 2^32.
    thr = tl.where(n > 0, thr, 1 << 33)
    for start in range(0, length, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < length
        c = tl.load(cls_row + offs, mask=m, other=-1)
        u = tl.load(key_row + offs, mask=m, other=0).to(tl.int64) + 2147483648
        pin = m & (((c & 1) == 1) | (u > thr) | ((u == thr) & (offs >= pos)))
        tl.store(key_row + offs, tl.full((BLOCK,), KEY_PINNED, tl.int32), mask=pin)


@triton.jit
def head_budget_kernel(
    key_ptr, lengths_ptr, out_ptr, budget, num_heads, capacity, stride_lb, stride_lh,
    BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, SLOT_DIGITS: tl.constexpr,
):
    """allocate_head_budgets, step 2. One program: one batch element. Grid: (B,).

    Keeps the T = sum_j min(budget, L_j) best (key, slot, head) triples of all heads
    (radix select over key and slot digits across the heads; the last tie, equal key
    and slot, goes to the higher heads) and writes each head's count to out [B, Hkv]."""
    b = tl.program_id(0).to(tl.int64)
    hids = tl.arange(0, BLOCK_H)
    lens = tl.load(lengths_ptr + b * stride_lb + hids * stride_lh, mask=hids < num_heads, other=0)
    lens = tl.minimum(tl.maximum(lens, 0), capacity)
    total = tl.sum(tl.minimum(lens.to(tl.int64), budget), 0)
    need = total
    go = total > 0
    thr = tl.zeros((), tl.int64)
    pos = tl.zeros((), tl.int32)
    for d in tl.static_range(4 + SLOT_DIGITS):
        hist = tl.zeros((NUM_BINS,), tl.int32)
        for j in range(num_heads):
            n_slots = tl.where(go, tl.sum(tl.where(hids == j, lens, 0), 0), 0)
            key_row = key_ptr + (b * num_heads + j) * capacity
            for start in range(0, n_slots, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                sel = offs < n_slots
                u = tl.load(key_row + offs, mask=sel, other=0).to(tl.int64) + 2147483648
                if d < 4:
                    if d > 0:
                        sel = sel & ((u >> (32 - 8 * d)) == thr)
                    digit_of = ((u >> (24 - 8 * d)) & 255).to(tl.int32)
                else:
                    sel = sel & (u == thr)
                    if d > 4:
                        sel = sel & ((offs >> (8 * (4 + SLOT_DIGITS - d))) == pos)
                    digit_of = (offs >> (8 * (3 + SLOT_DIGITS - d))) & 255
                hist += tl.histogram(digit_of, NUM_BINS, mask=sel)
        need, thr, pos = _take_digit(hist, need, thr, pos, d)
    # Heads whose slot `pos` holds the key `thr`: the highest `need` of them win the tie.
    at = tl.load(key_ptr + (b * num_heads + hids) * capacity + pos, mask=(hids < num_heads) & (pos < lens),
                 other=0).to(tl.int64) + 2147483648
    tied = ((hids < num_heads) & (pos < lens) & (at == thr)).to(tl.int64)
    higher = tl.sum(tied, 0) - tl.cumsum(tied, 0)
    wins = go & (tied > 0) & (higher < need)
    for j in range(num_heads):
        n_slots = tl.where(go, tl.sum(tl.where(hids == j, lens, 0), 0), 0)
        key_row = key_ptr + (b * num_heads + j) * capacity
        count = tl.zeros((), tl.int32)
        for start in range(0, n_slots, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < n_slots
            u = tl.load(key_row + offs, mask=m, other=0).to(tl.int64) + 2147483648
            count += tl.sum((m & ((u > thr) | ((u == thr) & (offs > pos)))).to(tl.int32), 0)
        count += tl.sum(tl.where((hids == j) & wins, 1, 0), 0)
        tl.store(out_ptr + b * num_heads + j, count)
