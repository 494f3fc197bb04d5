# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for ``window_scores`` and ``key_redundancy`` (the launchers are in
``kvkern/triton/window_scores.py``; ``kvkern/reference.py`` states the math).

window_scores never stores the W x C attention matrix:

1. ``window_lse_kernel``: per (batch, kv head, block of rows, split of the slots),
   the online max and sum of exps of each row's visible logits (row r = g * W + t:
   query head g of the group, window query t) -> partial (max, sum) pairs;
2. ``window_scores_kernel``: per (batch, kv head, slot tile), one K tile load
   shared by every row of the group: the partials merge into each row's
   log-sum-exp, the probabilities are recomputed and summed over t per query
   head, then reduced over the group straight into a [B, Hkv, C] row
   (max_per_query: the max over the group per window query, then the sum over t);
3. ``window_combine_kernel`` (group_reduce mean_all): the sum over kv heads;
4. ``window_finish_kernel``: normalize by the max over the candidate slots (from
   per-tile maxima) and pool them.

key_redundancy never stores the L x L Gram matrix: ``redundancy_rows_kernel`` keeps
per row its sum of cosines and its latest near-duplicate, ``redundancy_corr_kernel``
applies the global "latest near-duplicate is spared" rule, ``redundancy_finish_kernel``
takes the softmax-then-max-normalised scores.

Written for the Triton interpreter as well as the GPU: with ``DOT_FP32`` (fp32
caches, and bf16 under the interpreter, which cannot do bf16 arithmetic) the
dots run in fp32 over chunks of D; 16-bit dots accumulate in fp32.
"""

import triton
import triton.language as tl

from ._heads import head_length as _head_length


@triton.jit
def _tile_logits(q_rows, mask_r, k_tile, stride_kc, mask_n, head_dim,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_FP32: tl.constexpr, DOT_CHUNK: tl.constexpr):
    """``<q_row, k_slot>`` for BLOCK_R row pointers and BLOCK_N slots from ``k_tile``: [BLOCK_R, BLOCK_N] fp32.

    Masked rows / slots / channels past ``head_dim`` read as 0 (never the memory)."""
    offs_n = tl.arange(0, BLOCK_N)
    if DOT_FP32:
        # Exact ("ieee") fp32 dots, summed over chunks of D so that each chunk's
        # sequential accumulation stays short.
        s = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        offs_c = tl.arange(0, DOT_CHUNK)
        for c in tl.static_range(0, BLOCK_D, DOT_CHUNK):
            mask_d = (c + offs_c) < head_dim
            qc = tl.load(q_rows[:, None] + c + offs_c[None, :], mask=mask_r[:, None] & mask_d[None, :],
                         other=0.0).to(tl.float32)
            kc = tl.load(k_tile + offs_n[:, None] * stride_kc + c + offs_c[None, :],
                         mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
            s += tl.dot(qc, tl.trans(kc), input_precision="ieee", out_dtype=tl.float32)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < head_dim
        q = tl.load(q_rows[:, None] + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        k = tl.load(k_tile + offs_n[:, None] * stride_kc + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), out_dtype=tl.float32)
    return s


@triton.jit
def window_lse_kernel(
    q_ptr, k_ptr, lengths_ptr, pm_ptr, pl_ptr,
    sm_scale,
    num_kv_heads, group, window, capacity, head_dim, num_splits,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kc,
    stride_lb, stride_lh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_CHUNK: tl.constexpr,
):
    """Pass 1. Grid (B * Hkv * cdiv(G * W, BLOCK_M), num_splits).

    Row r = g * W + t sees slots i < L with i <= L - W + t. Split s covers whole
    BLOCK_N tiles of [0, L) (as decode attention splits). Writes the split's
    running max and sum of exp(logit - max) of each row to pm / pl
    [B * Hkv, G * W, num_splits] (-inf / 0 when it saw no visible slot).
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    R = group * window
    num_rblocks = tl.cdiv(R, BLOCK_M)
    rb = pid % num_rblocks
    bj = pid // num_rblocks
    j = (bj % num_kv_heads).to(tl.int64)
    b = (bj // num_kv_heads).to(tl.int64)

    length, _ = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    chunk = tl.cdiv(tl.cdiv(length, num_splits), BLOCK_N) * BLOCK_N
    lo = tl.minimum(split * chunk, length)
    hi = tl.minimum(lo + chunk, length)

    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_r = rows < R
    g = rows // window
    t = rows % window
    q_rows = q_ptr + b * stride_qb + (j * group + g).to(tl.int64) * stride_qh + t.to(tl.int64) * stride_qt
    vis = length - window + t + 1  # row r sees slots < vis (<= 0: none)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    k_tile = k_ptr + b * stride_kb + j * stride_kh + lo.to(tl.int64) * stride_kc
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        slots = start + offs_n
        mask_n = slots < hi
        s = _tile_logits(q_rows, mask_r, k_tile, stride_kc, mask_n, head_dim,
                         BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, DOT_CHUNK) * sm_scale
        s = tl.where(mask_n[None, :] & (slots[None, :] < vis[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_ref) + tl.sum(tl.exp(s - m_ref[:, None]), 1)
        m_i = m_new
        k_tile += BLOCK_N * stride_kc

    prow = (bj * R + rows).to(tl.int64) * num_splits + split
    tl.store(pm_ptr + prow, m_i, mask=mask_r)
    tl.store(pl_ptr + prow, l_i, mask=mask_r)


@triton.jit
def _tile_probs(q_ptr, pm_ptr, pl_ptr, k_tile, slots, mask_n, ridx, offs_s, mask_s, b, j, bj,
                g0, t0, length, sm_scale, group, window, head_dim, num_splits,
                stride_qb, stride_qh, stride_qt, stride_kc,
                HG: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_FP32: tl.constexpr, DOT_CHUNK: tl.constexpr):
    """Probabilities [HG * BW, BLOCK_N] of rows (heads g0.., window queries t0..) over the
    tile's slots (row-major over (head, query); 0 for padding rows and hidden slots)."""
    R = group * window
    g = g0 + ridx // BW
    t = t0 + ridx % BW
    mask_r = (g < group) & (t < window)
    # This row's log-sum-exp from the splits' (max, sum) pairs.
    prow = (bj * R + g * window + t).to(tl.int64) * num_splits
    pm = tl.load(pm_ptr + prow[:, None] + offs_s[None, :], mask=mask_r[:, None] & mask_s[None, :],
                 other=float("-inf"))
    pl = tl.load(pl_ptr + prow[:, None] + offs_s[None, :], mask=mask_r[:, None] & mask_s[None, :], other=0.0)
    mx = tl.max(pm, 1)
    m_ref = tl.where(mx == float("-inf"), 0.0, mx)
    lsum = tl.sum(pl * tl.exp(pm - m_ref[:, None]), 1)
    lse = tl.where(lsum > 0.0, m_ref + tl.log(tl.where(lsum > 0.0, lsum, 1.0)), float("inf"))

    q_rows = q_ptr + b * stride_qb + (j * group + g).to(tl.int64) * stride_qh + t.to(tl.int64) * stride_qt
    s = _tile_logits(q_rows, mask_r, k_tile, stride_kc, mask_n, head_dim,
                     HG * BW, BLOCK_N, BLOCK_D, DOT_FP32, DOT_CHUNK) * sm_scale
    vis = length - window + t + 1
    visible = mask_r[:, None] & mask_n[None, :] & (slots[None, :] < vis[:, None])
    return tl.where(visible, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def window_scores_kernel(
    q_ptr, k_ptr, lengths_ptr, pm_ptr, pl_ptr, dst_ptr, tmax_ptr,
    sm_scale, factor,
    num_kv_heads, group, window, capacity, head_dim, num_splits, num_tiles,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kc,
    stride_lb, stride_lh,
    stride_db, stride_dh,
    HG: tl.constexpr, BW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    GROUP_MAX: tl.constexpr, QUERY_MAX: tl.constexpr, TILE_MAX: tl.constexpr, WRITE_NAN: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_CHUNK: tl.constexpr,
):
    """Pass 2. Grid (B * Hkv, cdiv(C, BLOCK_N)).

    Writes ``factor * reduce_g sum_t p[g, t, i]`` for the tile's slots to dst
    [B, Hkv, C] (0 past L; NaN for a length outside [0, C] with WRITE_NAN), with
    reduce = max (GROUP_MAX) or sum; with QUERY_MAX ``factor * sum_t max_g p[g, t, i]``
    instead. Rows go HG heads x BW window queries per dot. With TILE_MAX, also the tile's
    max over the candidate slots i < L - W (-inf if none) to tmax [B * Hkv, num_tiles].
    """
    bj = tl.program_id(0)
    tile = tl.program_id(1)
    j = (bj % num_kv_heads).to(tl.int64)
    b = (bj // num_kv_heads).to(tl.int64)

    length, bad = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    slots = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = slots < length

    grp = tl.zeros([BLOCK_N], tl.float32)
    if tile * BLOCK_N < length:
        k_tile = k_ptr + b * stride_kb + j * stride_kh + (tile * BLOCK_N).to(tl.int64) * stride_kc
        ridx = tl.arange(0, HG * BW)
        offs_s = tl.arange(0, BLOCK_S)
        mask_s = offs_s < num_splits
        if QUERY_MAX:
            # The group max needs every head of a window query: heads inner.
            for t0 in range(0, window, BW):
                q_acc = tl.zeros([BW, BLOCK_N], tl.float32)
                for g0 in range(0, group, HG):
                    p = _tile_probs(q_ptr, pm_ptr, pl_ptr, k_tile, slots, mask_n, ridx, offs_s, mask_s, b, j, bj,
                                    g0, t0, length, sm_scale, group, window, head_dim, num_splits,
                                    stride_qb, stride_qh, stride_qt, stride_kc,
                                    HG, BW, BLOCK_N, BLOCK_D, DOT_FP32, DOT_CHUNK)
                    q_acc = tl.maximum(q_acc, tl.max(tl.reshape(p, [HG, BW, BLOCK_N]), 0))  # p >= 0
                grp += tl.sum(q_acc, 0)
        else:
            for g0 in range(0, group, HG):
                head_acc = tl.zeros([HG, BLOCK_N], tl.float32)
                for t0 in range(0, window, BW):
                    p = _tile_probs(q_ptr, pm_ptr, pl_ptr, k_tile, slots, mask_n, ridx, offs_s, mask_s, b, j, bj,
                                    g0, t0, length, sm_scale, group, window, head_dim, num_splits,
                                    stride_qb, stride_qh, stride_qt, stride_kc,
                                    HG, BW, BLOCK_N, BLOCK_D, DOT_FP32, DOT_CHUNK)
                    head_acc += tl.sum(tl.reshape(p, [HG, BW, BLOCK_N]), 1)
                if GROUP_MAX:
                    grp = tl.maximum(grp, tl.max(head_acc, 0))  # probabilities are >= 0: padding heads add nothing
                else:
                    grp += tl.sum(head_acc, 0)
    val = grp * factor
    if WRITE_NAN:
        val = tl.where(bad, float("nan"), val)
    tl.store(dst_ptr + b * stride_db + j * stride_dh + slots, val, mask=slots < capacity)
    if TILE_MAX:
        cand = slots < tl.maximum(length - window, 0)
        tl.store(tmax_ptr + bj.to(tl.int64) * num_tiles + tile, tl.max(tl.where(cand, val, float("-inf")), 0))


@triton.jit
def window_combine_kernel(
    raw_ptr, lengths_ptr, tmax_ptr,
    num_kv_heads, window, capacity, num_tiles,
    stride_rb, stride_rh, stride_lb, stride_lh,
    BLOCK_N: tl.constexpr, TILE_MAX: tl.constexpr,
):
    """mean_all. Grid (B, num_tiles). Sums each kv head's share raw[b, j, tile]
    into raw[b, 0, tile] (only this program touches those elements); with
    TILE_MAX, the sum's max over each head's candidate slots to tmax."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    slots = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = slots < capacity
    acc = tl.zeros([BLOCK_N], tl.float32)
    for j in range(0, num_kv_heads):
        acc += tl.load(raw_ptr + b * stride_rb + j * stride_rh + slots, mask=mask, other=0.0)
    tl.store(raw_ptr + b * stride_rb + slots, acc, mask=mask)
    if TILE_MAX:
        for j in range(0, num_kv_heads):
            length, _ = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
            cand = slots < tl.maximum(length - window, 0)
            tl.store(tmax_ptr + (b * num_kv_heads + j) * num_tiles + tile,
                     tl.max(tl.where(cand, acc, float("-inf")), 0))


@triton.jit
def window_finish_kernel(
    raw_ptr, lengths_ptr, tmax_ptr, out_ptr,
    num_kv_heads, window, capacity, num_tiles, pool_radius, inv_kernel,
    stride_rb, stride_rh, stride_lb, stride_lh, stride_ob, stride_oh,
    BLOCK_F: tl.constexpr, BLOCK_T: tl.constexpr,
    MEAN_ALL: tl.constexpr, NORMALIZE: tl.constexpr, POOL: tl.constexpr,
):
    """Grid (B * Hkv, cdiv(C, BLOCK_F)). out = raw row (kv head 0's for MEAN_ALL)
    with slots i < M = max(L - W, 0) divided by their max when it is positive
    (NORMALIZE) and pooled over [0, M) (POOL 1: sum / kernel, 2: max; radius
    pool_radius); window slots [M, L) as they are; 0 past L; NaN for a length
    outside [0, C]."""
    bj = tl.program_id(0)
    tile = tl.program_id(1)
    j = (bj % num_kv_heads).to(tl.int64)
    b = (bj // num_kv_heads).to(tl.int64)
    length, bad = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    M = tl.maximum(length - window, 0)
    if MEAN_ALL:
        src = raw_ptr + b * stride_rb
    else:
        src = raw_ptr + b * stride_rb + j * stride_rh
    slots = tile * BLOCK_F + tl.arange(0, BLOCK_F)

    x = tl.load(src + slots, mask=slots < length, other=0.0)
    if POOL == 0:
        pooled = x
    else:
        if POOL == 1:
            acc = tl.zeros([BLOCK_F], tl.float32)
        else:
            acc = tl.full([BLOCK_F], float("-inf"), tl.float32)
        for o in range(0, 2 * pool_radius + 1):
            idx = slots + (o - pool_radius)
            inside = (idx >= 0) & (idx < M)
            if POOL == 1:
                acc += tl.load(src + idx, mask=inside, other=0.0)
            else:
                acc = tl.maximum(acc, tl.load(src + idx, mask=inside, other=float("-inf")))
        if POOL == 1:
            pooled = acc * inv_kernel
        else:
            pooled = acc
    if NORMALIZE:
        offs_t = tl.arange(0, BLOCK_T)
        top = tl.full([], float("-inf"), tl.float32)
        for t0 in range(0, num_tiles, BLOCK_T):
            tm = tl.load(tmax_ptr + bj.to(tl.int64) * num_tiles + t0 + offs_t, mask=(t0 + offs_t) < num_tiles,
                         other=float("-inf"))
            top = tl.maximum(top, tl.max(tm, 0))
        # Pooling commutes with dividing by a positive top (up to rounding).
        pooled = tl.where(top > 0.0, pooled / tl.where(top > 0.0, top, 1.0), pooled)
    val = tl.where(slots < M, pooled, x)
    val = tl.where(bad, float("nan"), val)
    tl.store(out_ptr + b * stride_ob + j * stride_oh + slots, val, mask=slots < capacity)


@triton.jit
def _rows_inv_norm(rows_ptr, mask_rows, head_dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_CHUNK: tl.constexpr):
    """1 / (|k| + 1e-8) of BLOCK_R rows (fp32 sum of squares)."""
    ss = tl.zeros([BLOCK_R], tl.float32)
    offs_c = tl.arange(0, DOT_CHUNK)
    for c in tl.static_range(0, BLOCK_D, DOT_CHUNK):
        mask_d = (c + offs_c) < head_dim
        x = tl.load(rows_ptr[:, None] + c + offs_c[None, :], mask=mask_rows[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)
        ss += tl.sum(x * x, 1)
    return 1.0 / (tl.sqrt(ss) + 1e-8)


@triton.jit
def redundancy_rows_kernel(
    k_ptr, lengths_ptr, rowsum_ptr, latest_ptr, val_ptr,
    threshold,
    num_kv_heads, capacity, head_dim,
    stride_kb, stride_kh, stride_kc, stride_lb, stride_lh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr, DOT_CHUNK: tl.constexpr,
):
    """Grid (B * Hkv, cdiv(C, BLOCK_M)). For rows m < L of the block, over every
    column n < L, n != m, with c = <k_m, k_n> / ((|k_m| + 1e-8)(|k_n| + 1e-8)):
    rowsum[m] = sum_n c, latest[m] = the largest n with c > threshold (-1 if
    none) and val[m] = that c; all [B * Hkv, C]."""
    bj = tl.program_id(0)
    blk = tl.program_id(1)
    j = (bj % num_kv_heads).to(tl.int64)
    b = (bj // num_kv_heads).to(tl.int64)
    length, _ = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    if blk * BLOCK_M < length:
        k_head = k_ptr + b * stride_kb + j * stride_kh
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < length
        m_ptrs = k_head + rows.to(tl.int64) * stride_kc
        inv_m = _rows_inv_norm(m_ptrs, mask_m, head_dim, BLOCK_M, BLOCK_D, DOT_CHUNK)
        rowsum = tl.zeros([BLOCK_M], tl.float32)
        latest = tl.full([BLOCK_M], -1, tl.int32)
        val = tl.zeros([BLOCK_M], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        n_tile = k_head
        for n0 in range(0, length, BLOCK_N):
            cols = n0 + offs_n
            mask_n = cols < length
            inv_n = _rows_inv_norm(n_tile + offs_n.to(tl.int64) * stride_kc, mask_n, head_dim, BLOCK_N, BLOCK_D,
                                   DOT_CHUNK)
            s = _tile_logits(m_ptrs, mask_m, n_tile, stride_kc, mask_n, head_dim,
                             BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32, DOT_CHUNK)
            c = s * inv_m[:, None] * inv_n[None, :]
            pair = mask_m[:, None] & mask_n[None, :] & (rows[:, None] != cols[None, :])
            rowsum += tl.sum(tl.where(pair, c, 0.0), 1)
            over = pair & (c > threshold)
            tile_latest = tl.max(tl.where(over, cols[None, :], -1), 1)
            tile_val = tl.sum(tl.where(over & (cols[None, :] == tile_latest[:, None]), c, 0.0), 1)
            newer = tile_latest > latest
            latest = tl.where(newer, tile_latest, latest)
            val = tl.where(newer, tile_val, val)
            n_tile += BLOCK_N * stride_kc
        out = bj.to(tl.int64) * capacity + rows
        tl.store(rowsum_ptr + out, rowsum, mask=mask_m)
        tl.store(latest_ptr + out, latest, mask=mask_m)
        tl.store(val_ptr + out, val, mask=mask_m)


@triton.jit
def redundancy_corr_kernel(
    rowsum_ptr, latest_ptr, val_ptr, lengths_ptr,
    num_kv_heads, capacity,
    stride_lb, stride_lh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (B * Hkv, cdiv(C, BLOCK_M)). red[m] = (rowsum[m] - sum of val[n] over
    the keys n whose latest near-duplicate is m) / L, in place of rowsum. A gather
    over every n (O(L^2) compares, no D) rather than a scatter: no atomics, so the
    sum's order is fixed."""
    bj = tl.program_id(0)
    blk = tl.program_id(1)
    j = (bj % num_kv_heads).to(tl.int64)
    b = (bj // num_kv_heads).to(tl.int64)
    length, _ = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    if blk * BLOCK_M < length:
        base = bj.to(tl.int64) * capacity
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = rows < length
        corr = tl.zeros([BLOCK_M], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(0, length, BLOCK_N):
            cols = n0 + offs_n
            mask_n = cols < length
            lat = tl.load(latest_ptr + base + cols, mask=mask_n, other=-1)
            v = tl.load(val_ptr + base + cols, mask=mask_n, other=0.0)
            corr += tl.sum(tl.where(lat[None, :] == rows[:, None], v[None, :], 0.0), 1)
        rs = tl.load(rowsum_ptr + base + rows, mask=mask_m, other=0.0)
        tl.store(rowsum_ptr + base + rows, (rs - corr) / tl.maximum(length, 1).to(tl.float32), mask=mask_m)


@triton.jit
def redundancy_finish_kernel(
    red_ptr, lengths_ptr, out_ptr,
    num_kv_heads, capacity, n_window,
    stride_lb, stride_lh, stride_ob, stride_oh,
    BLOCK: tl.constexpr,
):
    """Grid (B * Hkv,). out[m] = exp(red[m] - max over candidates) for the
    candidates m < L - n_window (the softmax's normaliser cancels in the max
    normalisation), 0 elsewhere; NaN for a length outside [0, C]."""
    bj = tl.program_id(0)
    j = (bj % num_kv_heads).to(tl.int64)
    b = (bj // num_kv_heads).to(tl.int64)
    length, bad = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    M = tl.maximum(length - n_window, 0)
    base = bj.to(tl.int64) * capacity
    offs = tl.arange(0, BLOCK)
    top = tl.full([], float("-inf"), tl.float32)
    for i0 in range(0, M, BLOCK):
        r = tl.load(red_ptr + base + i0 + offs, mask=(i0 + offs) < M, other=float("-inf"))
        top = tl.maximum(top, tl.max(r, 0))
    top = tl.where(top == float("-inf"), 0.0, top)
    for i0 in range(0, capacity, BLOCK):
        idx = i0 + offs
        cand = idx < M
        r = tl.load(red_ptr + base + idx, mask=cand, other=0.0)
        val = tl.where(cand, tl.exp(r - top), 0.0)
        val = tl.where(bad, float("nan"), val)
        tl.store(out_ptr + b * stride_ob + j * stride_oh + idx, val, mask=idx < capacity)
