# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the FP8 (e4m3fn) KV cache (layout and quantizer: the "FP8 KV"
block of kvkern/reference.py). Launchers and checks live in ``kvkern/triton/fp8.py``.

The codes travel as uint8 and are converted by bit manipulation, not by Triton's
fp8 casts: the interpreter's cast does not round like the hardware (nor like
torch), and the integer path is exact on both, so the interpreter checks the same
bits the GPU writes. Encode: y = div_rn(x, scale) (correctly rounded), then round
to nearest even into e4m3fn, saturating at +-448, NaN kept. Decode: exact.
"""

import triton
import triton.language as tl

from .decode_attention import head_split, initial_state, online_softmax_step, store_split_state



@triton.jit
def fp8_encode(y):
    """fp32 -> e4m3fn code (int32 in [0, 255])."""
    u = y.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    # normal range [2^-6, 448): keep 3 mantissa bits, ties to even; the carry may
    # step the exponent, never past 448
    an = a + 0x7FFFF + ((a >> 20) & 1)
    normal = (an >> 20) - (120 << 3)
    # below 2^-6: |y| * 2^9 rounded to an integer on the significand (exact)
    e = a >> 23
    mant = (a & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0)
    shift = tl.minimum(tl.maximum(tl.where(e > 0, 141 - e, 140), 1), 31)
    q = mant >> shift
    rem = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    sub = tl.where(e < 100, 0, q)
    code = tl.where(a >= 0x3C800000, normal, sub)
    code = tl.where(a >= 0x43E00000, 0x7E, code)  # saturate (inf too)
    code = tl.where(a > 0x7F800000, 0x7F, code)  # NaN
    return code | sign


@triton.jit
def fp8_decode(c):
    """e4m3fn code (any integer type holding [0, 255]) -> fp32, exact."""
    c = c.to(tl.int32) & 0xFF
    em = c & 0x7F
    normal = ((em + (120 << 3)) << 20).to(tl.float32, bitcast=True)
    sub = em.to(tl.float32) * 0.001953125  # m * 2^-9
    mag = tl.where(em < 8, sub, normal)
    mag = tl.where(em == 0x7F, float("nan"), mag)
    return tl.where(c >= 128, -mag, mag)


@triton.jit
def quantize_fp8_kernel(
    k_ptr, v_ptr, lengths_ptr, ks_ptr, vs_ptr, kq_ptr, vq_ptr,
    H, T_in, D,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_qb, stride_qh, stride_qt, stride_wb, stride_wh, stride_wt,
    stride_lb, stride_lh, stride_ks, stride_vs,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """quantize_fp8_kv_. Grid (B * H, cdiv(T_in, BLOCK_T)): tokens [t0, t0 + BLOCK_T) of
    head (b, h), those below min(lengths[b, h], T_in) only."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    L = tl.minimum(tl.load(lengths_ptr + b * stride_lb + h * stride_lh), T_in)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = (offs_t < L)[:, None] & (offs_d < D)[None, :]
        ks = tl.load(ks_ptr + h * stride_ks)
        vs = tl.load(vs_ptr + h * stride_vs)
        x = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        code = fp8_encode(tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * ks))
        tl.store(kq_ptr + b * stride_qb + h * stride_qh + offs_t[:, None] * stride_qt + offs_d[None, :],
                 code.to(tl.uint8), mask=mask)
        x = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_t[:, None] * stride_vt + offs_d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        code = fp8_encode(tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * vs))
        tl.store(vq_ptr + b * stride_wb + h * stride_wh + offs_t[:, None] * stride_wt + offs_d[None, :],
                 code.to(tl.uint8), mask=mask)


@triton.jit
def append_fp8_kernel(
    knew_ptr, vnew_ptr, lengths_ptr, ks_ptr, vs_ptr, kq_ptr, vq_ptr,
    H, C, D,
    stride_kb, stride_kh, stride_vb, stride_vh,
    stride_qb, stride_qh, stride_qt, stride_wb, stride_wh, stride_wt,
    stride_lb, stride_lh, stride_ks, stride_vs,
    BLOCK_D: tl.constexpr,
):
    """append_fp8_kv_. Grid (B * H,): the new token of head (b, h) into slot
    t = lengths[b, h], then lengths += 1. A t outside [0, C) changes nothing (the
    CPU ops raise instead; here that would need a host sync)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    t = tl.load(lengths_ptr + b * stride_lb + h * stride_lh)
    ok = (t >= 0) & (t < C)
    ks = tl.load(ks_ptr + h * stride_ks)
    vs = tl.load(vs_ptr + h * stride_vs)
    slot = tl.where(ok, t, 0).to(tl.int64)
    d_live = tl.where(ok, D, 0)  # a full head writes nothing
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = offs_d < d_live
        x = tl.load(knew_ptr + b * stride_kb + h * stride_kh + offs_d, mask=mask, other=0.0).to(tl.float32)
        code = fp8_encode(tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * ks))
        tl.store(kq_ptr + b * stride_qb + h * stride_qh + slot * stride_qt + offs_d, code.to(tl.uint8), mask=mask)
        x = tl.load(vnew_ptr + b * stride_vb + h * stride_vh + offs_d, mask=mask, other=0.0).to(tl.float32)
        code = fp8_encode(tl.math.div_rn(x, tl.full(x.shape, 1.0, tl.float32) * vs))
        tl.store(vq_ptr + b * stride_wb + h * stride_wh + slot * stride_wt + offs_d, code.to(tl.uint8), mask=mask)
    tl.store(lengths_ptr + b * stride_lb + h * stride_lh, tl.where(ok, t + 1, t))


@triton.jit
def fp8_attention_split_kernel(
    q_ptr, kq_ptr, vq_ptr, ks_ptr, vs_ptr, lengths_ptr, out_ptr, lse_ptr,
    sm_scale,
    H, group_q, C, num_splits,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_lb, stride_lh, stride_ks, stride_vs,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, TILE: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
):
    """One program: batch b, kv head j, all group_q query heads of j (padded to BLOCK_H
    rows), split s of j's tokens. Grid (B * H, num_splits). The codes are decoded in
    registers; k_scale is folded into the logit scale and v_scale into the output.
    Writes final (out, lse) or fp32 partials for merge_states_kernel; a length outside
    [0, C] reads nothing and writes NaN."""
    bj = tl.program_id(0)
    split = tl.program_id(1)
    b = (bj // H).to(tl.int64)
    j = (bj % H).to(tl.int64)
    _, bad_length, lo, hi = head_split(lengths_ptr, b, j, stride_lb, stride_lh, C, split, num_splits, TILE)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < group_q
    qheads = j * group_q + offs_h
    offs_d = tl.arange(0, HEAD_DIM)
    ks = tl.load(ks_ptr + j * stride_ks)
    vs = tl.load(vs_ptr + j * stride_vs)
    q = tl.load(q_ptr + b * stride_qb + qheads[:, None] * stride_qh + offs_d[None, :], mask=mask_h[:, None],
                other=0.0).to(tl.float32) * (sm_scale * ks)
    k_base = kq_ptr + b * stride_kb + j * stride_kh
    v_base = vq_ptr + b * stride_vb + j * stride_vh

    m_i, l_i, acc = initial_state(BLOCK_H, HEAD_DIM)
    for t0 in range(lo, hi, TILE):
        offs_t = t0 + tl.arange(0, TILE)
        live = offs_t < hi
        k = fp8_decode(tl.load(k_base + offs_t[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                               mask=live[:, None], other=0))
        v = fp8_decode(tl.load(v_base + offs_t[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
                               mask=live[:, None], other=0))
        s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32)
        s = tl.where(live[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee", out_dtype=tl.float32)

    rows = b * H * group_q + qheads
    store_split_state(out_ptr, lse_ptr, acc * vs, m_i, l_i, bad_length, rows, mask_h, offs_d, split, num_splits,
                      HEAD_DIM, WRITE_PARTIAL)
