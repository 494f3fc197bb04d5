# SPDX-License-Identifier: Apache-2.0
"""Triton kernels for decode attention: a split-K (flash-decoding) kernel and the
combine step that merges per-split partial states. Kernels only; the launcher,
defaults and search space live in ``kvkern/triton/decode_attention.py``.

Math (batch b, query head h, kv head j = h // G, valid slots i < len = lengths[b, j]):

    s_i = sm_scale * <q[b, h], k[b, j, i]> + log_w[b, j, i]
    lse = log sum_i exp(s_i)                 (-inf when every s_i is -inf or len == 0)
    out = sum_i exp(s_i - lse) * v[b, j, i]  (0 then)

Logits and the running max stay in natural units; only the differences
``s_i - m`` (small near the max, where accuracy matters) are scaled by log2(e)
for ``exp2``. Scaling the logits themselves would add a rounding at 1.44 times
their magnitude, which large logits (hundreds) feel in fp32.

Written for the Triton interpreter as well as the GPU (see the kernel library
practice notes, E6): bf16 values are never used in arithmetic when
``DOT_FP32`` is set, and every store converts to the pointer's element type.
"""

import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# The split rule, the online-softmax step and the split-state store below are
# shared with the quantized and fp8 caches' split kernels (kernels/quant.py,
# kernels/fp8.py): every attention twin splits, accumulates and writes alike, so
# one merge kernel serves them all.
@triton.jit
def head_split(lengths_ptr, b, j, stride_lb, stride_lh, capacity, split, num_splits, TILE: tl.constexpr):
    """Head (b, j)'s length, whether it is bad (outside [0, capacity]: then the length
    counts as 0, nothing is read and NaN is written), and split ``split``'s slots
    [lo, hi): each head divides its *own* valid length into ``num_splits`` chunks of
    whole TILE tiles (the CPU kernel's split_range)."""
    length = tl.load(lengths_ptr + b * stride_lb + j * stride_lh)
    bad_length = (length < 0) | (length > capacity)
    length = tl.where(bad_length, 0, length)
    chunk = tl.cdiv(length, num_splits)
    chunk = tl.cdiv(chunk, TILE) * TILE
    lo = tl.minimum(split * chunk, length)
    hi = tl.minimum(lo + chunk, length)
    return length, bad_length, lo, hi


@triton.jit
def initial_state(BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr):
    """The empty online-softmax state: running max -inf, sum 0, accumulator 0."""
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    return m_i, l_i, acc


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One tile of logits s [BLOCK_H, N] (masked slots -inf) into the running max m_i
    and sum l_i; returns (p, alpha, m_i, l_i): the tile's weights and the factor that
    rescales the accumulator before p @ v is added."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # m_new is -inf only while every logit so far is -inf (log_w may hold -inf):
    # subtract 0 then, so exp2 gives 0 rather than NaN.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_ref) * LOG2E)
    p = tl.exp2((s - m_ref[:, None]) * LOG2E)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def store_split_state(out_ptr, lse_ptr, acc, m_i, l_i, bad_length, rows, mask_h, offs_d, split, num_splits,
                      HEAD_DIM: tl.constexpr, WRITE_PARTIAL: tl.constexpr):
    """Normalizes one split's state and writes it: the final out (out_ptr's dtype)
    and lse at ``rows`` of [B*Hq], or fp32 partials at (row, split) of [B*Hq, S].
    An empty split gives out 0 and lse -inf; a bad length NaN."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)) * LN2)
    out = tl.where(bad_length, float("nan"), out)
    lse = tl.where(bad_length, float("nan"), lse)
    if WRITE_PARTIAL:
        prow = rows * num_splits + split
        tl.store(out_ptr + prow[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_h[:, None])
        tl.store(lse_ptr + prow, lse, mask=mask_h)
    else:
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask_h[:, None])
        tl.store(lse_ptr + rows, lse, mask=mask_h)


@triton.jit
def decode_attention_split_kernel(
    q_ptr, k_ptr, v_ptr, lengths_ptr, log_w_ptr,
    out_ptr, lse_ptr,
    sm_scale,
    num_kv_heads, group, capacity, num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kc,
    stride_vb, stride_vh, stride_vc,
    stride_lb, stride_lh,
    stride_wb, stride_wh,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_LOG_W: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_CHUNK: tl.constexpr = 16,
):
    """One program: batch b, kv head j, a tile of BLOCK_H query heads of j's group, split s.

    Grid: (B * Hkv * cdiv(G, BLOCK_H), num_splits). The program reads its share of
    j's valid slots once, in tiles of BLOCK_N slots, for all its query heads: the
    head tile is the M dimension of both dots (padded to >= 16 rows and masked).

    Split rule (as the CPU kernel's split_range): each head divides its *own* valid
    length into ``num_splits`` chunks of whole BLOCK_N tiles; trailing splits of a
    short head get an empty range and write (out 0, lse -inf).

    Writes either the final out [B*Hq, D] (out_ptr's dtype) and lse [B*Hq]
    (WRITE_PARTIAL=False, num_splits == 1), or fp32 partials [B*Hq, S, D] and
    [B*Hq, S] (WRITE_PARTIAL=True) for merge_states_kernel. A length outside
    [0, capacity] reads nothing and writes NaN.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_gblocks = tl.cdiv(group, BLOCK_H)
    gblock = pid % num_gblocks
    bj = pid // num_gblocks
    j = (bj % num_kv_heads).to(tl.int64)
    b = (bj // num_kv_heads).to(tl.int64)

    _, bad_length, lo, hi = head_split(lengths_ptr, b, j, stride_lb, stride_lh, capacity, split, num_splits, BLOCK_N)

    offs_g = gblock * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_g = offs_g < group
    heads = j * group + offs_g  # int64 [BLOCK_H]
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh
    offs_c = tl.arange(0, DOT_CHUNK)
    if not DOT_FP32:
        q = tl.load(q_rows + offs_d[None, :], mask=mask_g[:, None], other=0.0)  # stays 16-bit for the dot

    # Tile pointers advance by BLOCK_N slots per step from an int64 start; offsets
    # inside one tile stay small (int32).
    lo64 = lo.to(tl.int64)
    k_tile = k_ptr + b * stride_kb + j * stride_kh + lo64 * stride_kc
    v_tile = v_ptr + b * stride_vb + j * stride_vh + lo64 * stride_vc
    w_tile = log_w_ptr + b * stride_wb + j * stride_wh + lo64
    k_tile_offs = offs_n[:, None] * stride_kc + offs_d[None, :]
    v_tile_offs = offs_n[:, None] * stride_vc + offs_d[None, :]

    m_i, l_i, acc = initial_state(BLOCK_H, HEAD_DIM)  # running max, sum of exp(s - m_i), sum of p * v

    for start in range(lo, hi, BLOCK_N):
        mask_n = (start + offs_n) < hi
        if DOT_FP32:
            # NOTE: an fp32 dot accumulates its D products one after another; with
            # logits in the hundreds that loses ~1e-4 of a logit. Summing dots of
            # DOT_CHUNK products each (and scaling q first, as the CPU kernel does)
            # keeps the error near that of a blocked CPU sum.
            s = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
            for c in tl.static_range(0, HEAD_DIM, DOT_CHUNK):
                qc = tl.load(q_rows + c + offs_c[None, :], mask=mask_g[:, None], other=0.0).to(tl.float32) * sm_scale
                kc = tl.load(k_tile + offs_n[:, None] * stride_kc + c + offs_c[None, :], mask=mask_n[:, None],
                             other=0.0).to(tl.float32)
                s += tl.dot(qc, tl.trans(kc), input_precision="ieee", out_dtype=tl.float32)
        else:
            k = tl.load(k_tile + k_tile_offs, mask=mask_n[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * sm_scale
        if HAS_LOG_W:
            w = tl.load(w_tile + offs_n, mask=mask_n, other=0.0)
            s += w[None, :]
        s = tl.where(mask_n[None, :], s, float("-inf"))

        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)

        v = tl.load(v_tile + v_tile_offs, mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None]
        if DOT_FP32:
            acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee", out_dtype=tl.float32)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc, out_dtype=tl.float32)
        k_tile += BLOCK_N * stride_kc
        v_tile += BLOCK_N * stride_vc
        w_tile += BLOCK_N

    rows = b * num_kv_heads * group + heads  # int64 [BLOCK_H]: flattened (b, h)
    store_split_state(out_ptr, lse_ptr, acc, m_i, l_i, bad_length, rows, mask_g, offs_d, split, num_splits,
                      HEAD_DIM, WRITE_PARTIAL)


@triton.jit
def merge_states_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, lse_ptr,
    num_splits,
    stride_po_row, stride_po_split,
    stride_pl_row,
    stride_out_row, stride_lse_row,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Merges S partial attention states per row; one program per row.

        lse = log sum_s exp(lse_s)
        out = sum_s exp(lse_s - lse) * out_s

    partial_out [rows, S, HEAD_DIM] fp32 (last dim contiguous), partial_lse
    [rows, S] fp32 (natural log; -inf marks an empty split, whose out_s is not
    read). out [rows, HEAD_DIM] in out_ptr's dtype, lse [rows] fp32. A NaN
    partial lse makes the row's out and lse NaN; a row of only empty splits
    gives out 0 and lse -inf. BLOCK_D = next power of two >= HEAD_DIM.
    """
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse_row = partial_lse_ptr + row * stride_pl_row
    po_row = partial_out_ptr + row * stride_po_row

    m = tl.full([], float("-inf"), tl.float32)
    nan_count = tl.zeros([], tl.int32)
    for s0 in range(0, num_splits, BLOCK_S):
        ls = tl.load(lse_row + s0 + offs_s, mask=(s0 + offs_s) < num_splits, other=float("-inf"))
        nan_count += tl.sum((ls != ls).to(tl.int32), 0)
        m = tl.maximum(m, tl.max(tl.where(ls != ls, float("-inf"), ls), 0))
    m_ref = tl.where(m == float("-inf"), 0.0, m)

    acc = tl.zeros([BLOCK_D], tl.float32)
    total = tl.zeros([], tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        ls = tl.load(lse_row + s0 + offs_s, mask=(s0 + offs_s) < num_splits, other=float("-inf"))
        live = ls > float("-inf")  # False for NaN and for empty or missing splits
        wgt = tl.where(live, tl.exp2((tl.where(live, ls, m_ref) - m_ref) * LOG2E), 0.0)
        po = tl.load(po_row + (s0 + offs_s)[:, None] * stride_po_split + offs_d[None, :],
                     mask=live[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(wgt[:, None] * po, 0)
        total += tl.sum(wgt, 0)

    has_nan = nan_count > 0
    out = acc / tl.where(total > 0.0, total, 1.0)
    lse = tl.where(total > 0.0, m_ref + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    out = tl.where(has_nan, float("nan"), out)
    lse = tl.where(has_nan, float("nan"), lse)
    tl.store(out_ptr + row * stride_out_row + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(lse_ptr + row * stride_lse_row, lse)
