# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the quantized KV cache (layout and quantizer: the "Quantized KV"
block of kvkern/reference.py). Launchers and checks live in ``kvkern/triton/quant.py``.

Exactness: codes, scales, minima and means must equal the reference bit for bit, so
every fp32 division is a correctly rounded ``div_rn`` (Triton's ``/`` is approximate
on the GPU), round-half-even is built from ``floor`` (libdevice's ``rint`` is missing
under the interpreter), directed rounding to fp16 / bf16 is round-to-nearest plus one
ulp step on the bit pattern, and the launchers of the exact kernels turn FMA
contraction off (the reference multiplies and adds separately).

Every cache tensor the kernels touch is contiguous (the launcher checks it); the
dense inputs (k, v, k_new, v_new, q) may have any strides but the last.
DT (constexpr) names the storage dtype: 0 fp32, 1 fp16, 2 bf16.
"""

import triton
import triton.language as tl

from .decode_attention import head_split, initial_state, online_softmax_step, store_split_state


@triton.jit
def _to_storage(x, DT: tl.constexpr):
    if DT == 1:
        return x.to(tl.float16)
    elif DT == 2:
        # Round to nearest even on the fp32 bits: the interpreter's own fp32 -> bf16
        # conversion truncates. The result is a bf16 value, so the cast is exact.
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(tl.float32)


@triton.jit
def _round_to(x, DT: tl.constexpr, DIR: tl.constexpr):
    """x (fp32) rounded to the storage dtype, returned as fp32: DIR -1 toward -inf,
    0 to nearest even, +1 toward +inf."""
    if DT == 0:
        return x
    else:
        r16 = _to_storage(x, DT)
        r = r16.to(tl.float32)
        if DIR == 0:
            return r
        else:
            bits = r16.to(tl.int16, bitcast=True)
            neg = bits < 0
            # Moving away from zero is +1 on the magnitude bits, toward zero -1. A
            # result of +-0 only needs a step toward the sign of x, which is away.
            if DIR > 0:
                need = r < x
                step = tl.where(neg, bits - 1, bits + 1)
            else:
                need = r > x
                step = tl.where(neg, bits + 1, bits - 1)
            stepped = step.to(r16.dtype, bitcast=True).to(tl.float32)
            return tl.where(need, stepped, r)


@triton.jit
def _rint(y):
    """Round half to even (y >= 0 and small here, so y - floor(y) is exact)."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _quantize(x, lo_raw, hi, BITS: tl.constexpr, DT: tl.constexpr):
    """Codes (int32, x's shape) plus (scale, lo) in fp32 for lo_raw = min, hi = max of
    each group (broadcastable against x)."""
    QMAX: tl.constexpr = (1 << BITS) - 1
    lo = _round_to(lo_raw, DT, -1)
    scale = _round_to(tl.math.div_rn(hi - lo, tl.full(hi.shape, QMAX, tl.float32)), DT, 1)
    pos = scale > 0.0
    safe = tl.where(pos, scale, 1.0)
    y = tl.math.div_rn(x - lo, safe)
    q = tl.where(pos, _rint(y), 0.0)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX * 1.0)
    return q.to(tl.int32), scale, lo


@triton.jit
def _pack_rows(q, N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr):
    """[N, M] codes -> [N / P, M] int32 words; row P*w + j sits at bits [BITS*j, +BITS) of row w."""
    P: tl.constexpr = 32 // BITS
    q3 = tl.reshape(q.to(tl.uint32), [N // P, P, M])
    shifts = (tl.arange(0, P) * BITS).to(tl.uint32)
    w = tl.sum(q3 << shifts[None, :, None], 1)  # disjoint bit fields: the sum is an OR
    return w.to(tl.uint32).to(tl.int32, bitcast=True)


@triton.jit
def _pack_cols(q, N: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr):
    """[N, M] codes -> [N, M / P] int32 words; column P*w + j at bits [BITS*j, +BITS) of column w."""
    P: tl.constexpr = 32 // BITS
    q3 = tl.reshape(q.to(tl.uint32), [N, M // P, P])
    shifts = (tl.arange(0, P) * BITS).to(tl.uint32)
    w = tl.sum(q3 << shifts[None, None, :], 2)
    return w.to(tl.uint32).to(tl.int32, bitcast=True)


@triton.jit
def _unpack_rows(words, NW: tl.constexpr, M: tl.constexpr, BITS: tl.constexpr):
    """[NW, M] int32 words -> [NW * P, M] fp32 codes (inverse of _pack_rows)."""
    P: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    shifts = (tl.arange(0, P) * BITS).to(tl.uint32)
    c = (words.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None]) & MASK
    return tl.reshape(c, [NW * P, M]).to(tl.float32)


@triton.jit
def _unpack_cols(words, N: tl.constexpr, MW: tl.constexpr, BITS: tl.constexpr):
    """[N, MW] int32 words -> [N, MW * P] fp32 codes (inverse of _pack_cols)."""
    P: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    shifts = (tl.arange(0, P) * BITS).to(tl.uint32)
    c = (words.to(tl.uint32, bitcast=True)[:, :, None] >> shifts[None, None, :]) & MASK
    return tl.reshape(c, [N, MW * P]).to(tl.float32)


@triton.jit
def _expand_rows(x, NG: tl.constexpr, GROUP: tl.constexpr, M: tl.constexpr):
    """[NG, M] -> [NG * GROUP, M], each row repeated GROUP times."""
    return tl.reshape(tl.broadcast_to(x[:, None, :], [NG, GROUP, M]), [NG * GROUP, M])


@triton.jit
def _expand_cols(x, N: tl.constexpr, MG: tl.constexpr, GROUP: tl.constexpr):
    """[N, MG] -> [N, MG * GROUP], each column repeated GROUP times."""
    return tl.reshape(tl.broadcast_to(x[:, :, None], [N, MG, GROUP]), [N, MG * GROUP])


@triton.jit
def _quantize_key_block(x, kc_ptr, ks_ptr, km_ptr, word0, group_row, offs_d, mask_d, D,
                        GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr):
    """Quantizes one group of GROUP tokens x [GROUP, BLOCK_D] (fp32) per channel and stores
    its codes at word rows word0.. and its scale / min at group row group_row of one head
    (pointers at that head's [0, 0])."""
    P: tl.constexpr = 32 // BITS
    lo = tl.min(x, 0)
    hi = tl.max(x, 0)
    q, scale, lo = _quantize(x, lo[None, :], hi[None, :], BITS, DT)
    words = _pack_rows(q, GROUP, BLOCK_D, BITS)
    offs_w = tl.arange(0, GROUP // P)
    tl.store(kc_ptr + (word0 + offs_w)[:, None] * D + offs_d[None, :], words, mask=mask_d[None, :])
    meta = group_row * D + offs_d[None, :]
    tl.store(ks_ptr + meta, _to_storage(scale, DT), mask=mask_d[None, :])
    tl.store(km_ptr + meta, _to_storage(lo, DT), mask=mask_d[None, :])


@triton.jit
def _quantize_value_rows(x, rows, row_mask, vc_ptr, vs_ptr, vm_ptr, D,
                         N: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr,
                         DT: tl.constexpr):
    """Quantizes x [N, BLOCK_D] (fp32; token rows ``rows`` of one head, pointers at its
    [0, 0]) in groups of GROUP channels and stores the rows where row_mask holds."""
    P: tl.constexpr = 32 // BITS
    NG: tl.constexpr = BLOCK_D // GROUP
    x3 = tl.reshape(x, [N, NG, GROUP])
    lo = tl.min(x3, 2)
    hi = tl.max(x3, 2)
    q, scale, lo = _quantize(x3, lo[:, :, None], hi[:, :, None], BITS, DT)
    words = _pack_cols(tl.reshape(q, [N, BLOCK_D]), N, BLOCK_D, BITS)
    offs_w = tl.arange(0, BLOCK_D // P)
    tl.store(vc_ptr + rows[:, None] * (D // P) + offs_w[None, :], words,
             mask=row_mask[:, None] & (offs_w < D // P)[None, :])
    offs_g = tl.arange(0, NG)
    meta = rows[:, None] * (D // GROUP) + offs_g[None, :]
    mmask = row_mask[:, None] & (offs_g < D // GROUP)[None, :]
    tl.store(vs_ptr + meta, _to_storage(tl.reshape(scale, [N, NG]), DT), mask=mmask)
    tl.store(vm_ptr + meta, _to_storage(tl.reshape(lo, [N, NG]), DT), mask=mmask)


@triton.jit
def quantize_keys_kernel(
    k_ptr, lengths_ptr, kc_ptr, ks_ptr, km_ptr, kmean_ptr,
    H, T, C, R, D,
    stride_kb, stride_kh, stride_kt, stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, CENTRED: tl.constexpr,
):
    """Keys of quantize_kv_. Grid (B * H, cdiv(T, GROUP), cdiv(D, BLOCK_D)): one group of
    GROUP tokens x BLOCK_D channels of one head; the group is quantized when it lies in
    [0, L - L % R). Mean-centred: the mean over heads is recomputed by every head's
    program (in head order); head 0 stores it."""
    P: tl.constexpr = 32 // BITS
    bh = tl.program_id(0)
    g = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    length = tl.load(lengths_ptr + b * stride_lb + h * stride_lh)
    length = tl.where((length < 0) | (length > T), 0, length)
    nk = length - length % R
    if (g + 1) * GROUP <= nk:
        offs_t = g * GROUP + tl.arange(0, GROUP)
        offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        tile = offs_t[:, None] * stride_kt + offs_d[None, :]
        x = tl.load(k_ptr + b * stride_kb + h * stride_kh + tile, mask=mask_d[None, :], other=0.0).to(tl.float32)
        if CENTRED:
            acc = tl.zeros([GROUP, BLOCK_D], tl.float32)
            for hh in range(0, H):
                acc += tl.load(k_ptr + b * stride_kb + hh * stride_kh + tile, mask=mask_d[None, :],
                               other=0.0).to(tl.float32)
            m = _round_to(tl.math.div_rn(acc, tl.full(acc.shape, H, tl.float32)), DT, 0)
            x = x - m
            if h == 0:
                tl.store(kmean_ptr + b * C * D + offs_t[:, None] * D + offs_d[None, :], _to_storage(m, DT),
                         mask=mask_d[None, :])
        head = (b * H + h) * C * D
        _quantize_key_block(x, kc_ptr + head // P, ks_ptr + head // GROUP, km_ptr + head // GROUP,
                            g * (GROUP // P), g, offs_d, mask_d, D, GROUP, BLOCK_D, BITS, DT)


@triton.jit
def quantize_values_kernel(
    k_ptr, v_ptr, lengths_ptr, vc_ptr, vs_ptr, vm_ptr, vmean_ptr, kres_ptr, vres_ptr,
    H, T, C, R, D,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt, stride_lb, stride_lh,
    BLOCK_T: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
    CENTRED: tl.constexpr,
):
    """Values of quantize_kv_ and both rings. Grid (B * H, cdiv(T, BLOCK_T)): BLOCK_T
    tokens of one head, all channels. Tokens [0, max(L - R, 0)) are quantized per
    (token, group of GROUP channels); keys of [L - L % R, L) and values of
    [max(L - R, 0), L) are copied to ring slot t % R."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    length = tl.load(lengths_ptr + b * stride_lb + h * stride_lh)
    length = tl.where((length < 0) | (length > T), 0, length)
    nk = length - length % R
    nv = tl.maximum(length - R, 0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    quant = offs_t < nv
    v_rows = v_ptr + b * stride_vb + offs_t[:, None] * stride_vt + offs_d[None, :]
    if tl.program_id(1) * BLOCK_T < nv:
        x = tl.load(v_rows + h * stride_vh, mask=quant[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        if CENTRED:
            acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
            for hh in range(0, H):
                acc += tl.load(v_rows + hh * stride_vh, mask=quant[:, None] & mask_d[None, :],
                               other=0.0).to(tl.float32)
            m = _round_to(tl.math.div_rn(acc, tl.full(acc.shape, H, tl.float32)), DT, 0)
            x = x - m
            if h == 0:
                tl.store(vmean_ptr + b * C * D + offs_t[:, None] * D + offs_d[None, :], _to_storage(m, DT),
                         mask=quant[:, None] & mask_d[None, :])
        head = (b * H + h) * C * D
        _quantize_value_rows(x, offs_t, quant, vc_ptr + head // (32 // BITS), vs_ptr + head // GROUP,
                             vm_ptr + head // GROUP, D, BLOCK_T, GROUP, BLOCK_D, BITS, DT)
    # Rings: raw copies in the storage dtype.
    ring = ((b * H + h) * R + (offs_t % R))[:, None] * D + offs_d[None, :]
    live = offs_t < length
    kr = (offs_t >= nk) & live
    vr = (offs_t >= nv) & live
    kx = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :],
                 mask=kr[:, None] & mask_d[None, :])
    tl.store(kres_ptr + ring, kx, mask=kr[:, None] & mask_d[None, :])
    vx = tl.load(v_rows + h * stride_vh, mask=vr[:, None] & mask_d[None, :])
    tl.store(vres_ptr + ring, vx, mask=vr[:, None] & mask_d[None, :])


@triton.jit
def _dequant_keys(kc_ptr, ks_ptr, km_ptr, kmean_ptr, b, head, t0, offs_d, mask_d, nk, C, D,
                  TILE: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr,
                  CENTRED: tl.constexpr):
    """Dequantized keys of tokens [t0, t0 + TILE) of one head, [TILE, BLOCK_D] fp32; rows at
    or past nk read nothing and hold 0. t0 is a multiple of TILE; TILE and GROUP are powers of
    two, so a tile holds whole groups (TILE >= GROUP) or lies inside one (TILE < GROUP)."""
    P: tl.constexpr = 32 // BITS
    NG: tl.constexpr = TILE // GROUP if TILE >= GROUP else 1  # groups the tile touches
    SPAN: tl.constexpr = GROUP if TILE >= GROUP else TILE  # its tokens in each
    offs_w = t0 // P + tl.arange(0, TILE // P)
    words = tl.load(kc_ptr + head * (C // P) * D + offs_w[:, None] * D + offs_d[None, :],
                    mask=(offs_w * P < nk)[:, None] & mask_d[None, :], other=0)
    codes = _unpack_rows(words, TILE // P, BLOCK_D, BITS)
    offs_g = t0 // GROUP + tl.arange(0, NG)
    gmask = (offs_g * GROUP < nk)[:, None] & mask_d[None, :]
    meta = head * (C // GROUP) * D + offs_g[:, None] * D + offs_d[None, :]
    scale = tl.load(ks_ptr + meta, mask=gmask, other=0.0).to(tl.float32)
    lo = tl.load(km_ptr + meta, mask=gmask, other=0.0).to(tl.float32)
    x = codes * _expand_rows(scale, NG, SPAN, BLOCK_D) + _expand_rows(lo, NG, SPAN, BLOCK_D)
    if CENTRED:
        offs_t = t0 + tl.arange(0, TILE)
        x += tl.load(kmean_ptr + b * C * D + offs_t[:, None] * D + offs_d[None, :],
                     mask=(offs_t < nk)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    return x


@triton.jit
def _dequant_values(vc_ptr, vs_ptr, vm_ptr, vmean_ptr, b, head, offs_t, nv, C, D,
                    TILE: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr,
                    CENTRED: tl.constexpr):
    """Dequantized values of tokens offs_t of one head, [TILE, BLOCK_D] fp32; rows at or
    past nv read nothing and hold 0."""
    P: tl.constexpr = 32 // BITS
    NG: tl.constexpr = BLOCK_D // GROUP
    rows = offs_t < nv
    offs_w = tl.arange(0, BLOCK_D // P)
    words = tl.load(vc_ptr + head * C * (D // P) + offs_t[:, None] * (D // P) + offs_w[None, :],
                    mask=rows[:, None] & (offs_w < D // P)[None, :], other=0)
    codes = _unpack_cols(words, TILE, BLOCK_D // P, BITS)
    offs_g = tl.arange(0, NG)
    meta = head * C * (D // GROUP) + offs_t[:, None] * (D // GROUP) + offs_g[None, :]
    gmask = rows[:, None] & (offs_g < D // GROUP)[None, :]
    scale = tl.load(vs_ptr + meta, mask=gmask, other=0.0).to(tl.float32)
    lo = tl.load(vm_ptr + meta, mask=gmask, other=0.0).to(tl.float32)
    x = codes * _expand_cols(scale, TILE, NG, GROUP) + _expand_cols(lo, TILE, NG, GROUP)
    if CENTRED:
        offs_d = tl.arange(0, BLOCK_D)
        x += tl.load(vmean_ptr + b * C * D + offs_t[:, None] * D + offs_d[None, :],
                     mask=rows[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
    return x


@triton.jit
def _ring_rows(res_ptr, head, offs_t, sel, offs_d, mask_d, R, D):
    """Ring rows of tokens offs_t (slot t % R) where sel holds, fp32, 0 elsewhere."""
    return tl.load(res_ptr + (head * R + offs_t % R)[:, None] * D + offs_d[None, :],
                   mask=sel[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def dequantize_kernel(
    kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kres_ptr, vres_ptr, kmean_ptr, vmean_ptr, lengths_ptr,
    k_out_ptr, v_out_ptr,
    H, C, R, D, stride_lb, stride_lh,
    TILE: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr, CENTRED: tl.constexpr,
    DT: tl.constexpr,
):
    """dequantize_kv. Grid (B * H, C / TILE): TILE tokens of one head, all channels;
    writes dense k, v [B, H, C, D] (contiguous, storage dtype), 0 at and past L."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    head = bh.to(tl.int64)
    h = head % H
    length = tl.load(lengths_ptr + b * stride_lb + h * stride_lh)
    length = tl.where((length < 0) | (length > C), 0, length)
    nk = length - length % R
    nv = tl.maximum(length - R, 0)
    t0 = tl.program_id(1) * TILE
    offs_t = t0 + tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    live = offs_t < length
    k = _dequant_keys(kc_ptr, ks_ptr, km_ptr, kmean_ptr, b, head, t0, offs_d, mask_d, nk, C, D,
                      TILE, GROUP, BLOCK_D, BITS, CENTRED)
    k = tl.where((offs_t < nk)[:, None], k, _ring_rows(kres_ptr, head, offs_t, live & (offs_t >= nk), offs_d,
                                                       mask_d, R, D))
    v = _dequant_values(vc_ptr, vs_ptr, vm_ptr, vmean_ptr, b, head, offs_t, nv, C, D,
                        TILE, GROUP, BLOCK_D, BITS, CENTRED)
    v = tl.where((offs_t < nv)[:, None], v, _ring_rows(vres_ptr, head, offs_t, live & (offs_t >= nv), offs_d,
                                                       mask_d, R, D))
    out = (head * C + offs_t)[:, None] * D + offs_d[None, :]
    tl.store(k_out_ptr + out, _to_storage(k, DT), mask=mask_d[None, :])
    tl.store(v_out_ptr + out, _to_storage(v, DT), mask=mask_d[None, :])


@triton.jit
def quant_attention_split_kernel(
    q_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kres_ptr, vres_ptr, kmean_ptr, vmean_ptr, lengths_ptr,
    out_ptr, lse_ptr,
    sm_scale,
    H, group_q, C, R, num_splits,
    stride_qb, stride_qh, stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, TILE: tl.constexpr, GROUP: tl.constexpr,
    BITS: tl.constexpr, CENTRED: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
):
    """One program: batch b, kv head j, all group_q query heads of j (padded to BLOCK_H
    rows), split s of j's tokens. Grid (B * H, num_splits).

    Each head splits its own length into num_splits chunks of whole TILEs. A tile's keys
    come from the codes below nk = L - L % R and from ring slot t % R above; its values
    from the codes below nv = max(L - R, 0) and from the ring above; both dequantized in
    registers. Writes final (out, lse) or fp32 partials for merge_states_kernel; a length
    outside [0, C] reads nothing and writes NaN."""
    bj = tl.program_id(0)
    split = tl.program_id(1)
    b = (bj // H).to(tl.int64)
    head = bj.to(tl.int64)
    j = head % H
    length, bad_length, lo, hi = head_split(lengths_ptr, b, j, stride_lb, stride_lh, C, split, num_splits, TILE)
    nk = length - length % R
    nv = tl.maximum(length - R, 0)

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < group_q
    qheads = j * group_q + offs_h
    offs_d = tl.arange(0, HEAD_DIM)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + qheads[:, None] * stride_qh + offs_d[None, :], mask=mask_h[:, None],
                other=0.0).to(tl.float32) * sm_scale

    m_i, l_i, acc = initial_state(BLOCK_H, HEAD_DIM)
    for t0 in range(lo, hi, TILE):
        offs_t = t0 + tl.arange(0, TILE)
        live = offs_t < hi
        k = _dequant_keys(kc_ptr, ks_ptr, km_ptr, kmean_ptr, b, head, t0, offs_d, mask_d, nk, C, HEAD_DIM,
                          TILE, GROUP, HEAD_DIM, BITS, CENTRED)
        k = tl.where((offs_t < nk)[:, None], k,
                     _ring_rows(kres_ptr, head, offs_t, live & (offs_t >= nk), offs_d, mask_d, R, HEAD_DIM))
        v = _dequant_values(vc_ptr, vs_ptr, vm_ptr, vmean_ptr, b, head, offs_t, nv, C, HEAD_DIM,
                            TILE, GROUP, HEAD_DIM, BITS, CENTRED)
        v = tl.where((offs_t < nv)[:, None], v,
                     _ring_rows(vres_ptr, head, offs_t, live & (offs_t >= nv), offs_d, mask_d, R, HEAD_DIM))
        s = tl.dot(q, tl.trans(k), input_precision="ieee", out_dtype=tl.float32)
        s = tl.where(live[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee", out_dtype=tl.float32)

    rows = b * H * group_q + qheads
    store_split_state(out_ptr, lse_ptr, acc, m_i, l_i, bad_length, rows, mask_h, offs_d, split, num_splits,
                      HEAD_DIM, WRITE_PARTIAL)


@triton.jit
def _append_step(lengths_ptr, b, hh, stride_lb, stride_lh, t_all, CENTRED: tl.constexpr):
    # The step t head hh appends at: a mean-centred cache moves every head of a token together
    # (t_all = lengths[b, 0], read once before any head's length is bumped); otherwise each head
    # has its own length.
    if CENTRED:
        return t_all
    else:
        return tl.load(lengths_ptr + b * stride_lb + hh * stride_lh)


@triton.jit
def append_kernel(
    knew_ptr, vnew_ptr, lengths_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kres_ptr, vres_ptr,
    kmean_ptr, vmean_ptr,
    H, C, R, D,
    stride_kb, stride_kh, stride_vb, stride_vh, stride_lb, stride_lh,
    HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
    CENTRED: tl.constexpr,
):
    """append_quantized_kv_. Grid (B, H / HEADS): heads [h0, h0 + HEADS) of batch b.
    Mean-centred caches take HEADS = H (the mean needs every head of the token) and the
    step t from lengths[b, 0]; otherwise each head uses its own length. A step t outside
    [0, C) changes nothing.

    Order per head: quantize the value leaving the ring (token t - R at slot t % R) when
    t >= R, then (after a barrier: other threads may still be reading that slot) store
    the new token at slot t % R, then, when (t + 1) % R == 0, quantize the ring's R keys
    (slot R - 1 is the new key, taken from registers rather than re-read), then lengths
    += 1."""
    P: tl.constexpr = 32 // BITS
    b = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * HEADS
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    t_all = tl.load(lengths_ptr + b * stride_lb)
    # --- the value leaving the ring ---
    if CENTRED:
        t = t_all
        if (t >= R) & (t < C):
            s = t - R
            slot = t % R
            acc = tl.zeros([BLOCK_D], tl.float32)
            for hh in range(0, H):
                acc += tl.load(vres_ptr + ((b * H + hh) * R + slot) * D + offs_d, mask=mask_d,
                               other=0.0).to(tl.float32)
            m = _round_to(tl.math.div_rn(acc, tl.full(acc.shape, H, tl.float32)), DT, 0)
            tl.store(vmean_ptr + (b * C + s) * D + offs_d, _to_storage(m, DT), mask=mask_d)
            for hh in range(0, H):
                head = b * H + hh
                x = tl.load(vres_ptr + (head * R + slot) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32) - m
                _quantize_value_rows(x[None, :], s + tl.zeros([1], tl.int64), tl.zeros([1], tl.int32) == 0,
                                     vc_ptr + head * C * (D // P), vs_ptr + head * C * (D // GROUP),
                                     vm_ptr + head * C * (D // GROUP), D, 1, GROUP, BLOCK_D, BITS, DT)
    else:
        for i in range(0, HEADS):
            hh = h0 + i
            head = b * H + hh
            t = _append_step(lengths_ptr, b, hh, stride_lb, stride_lh, t_all, CENTRED)
            if (t >= R) & (t < C):
                s = t - R
                x = tl.load(vres_ptr + (head * R + t % R) * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                _quantize_value_rows(x[None, :], s + tl.zeros([1], tl.int64), tl.zeros([1], tl.int32) == 0,
                                     vc_ptr + head * C * (D // P), vs_ptr + head * C * (D // GROUP),
                                     vm_ptr + head * C * (D // GROUP), D, 1, GROUP, BLOCK_D, BITS, DT)
    tl.debug_barrier()
    # --- the new token into the ring ---
    for i in range(0, HEADS):
        hh = h0 + i
        head = b * H + hh
        t = _append_step(lengths_ptr, b, hh, stride_lb, stride_lh, t_all, CENTRED)
        if (t >= 0) & (t < C):
            kn = tl.load(knew_ptr + b * stride_kb + hh * stride_kh + offs_d, mask=mask_d)
            vn = tl.load(vnew_ptr + b * stride_vb + hh * stride_vh + offs_d, mask=mask_d)
            tl.store(kres_ptr + (head * R + t % R) * D + offs_d, _to_storage(kn, DT), mask=mask_d)
            tl.store(vres_ptr + (head * R + t % R) * D + offs_d, _to_storage(vn, DT), mask=mask_d)
    # --- key flush: tokens t + 1 - R .. t, one group of GROUP tokens at a time ---
    offs_g = tl.arange(0, GROUP)
    for i in range(0, HEADS):
        hh = h0 + i
        head = b * H + hh
        t = _append_step(lengths_ptr, b, hh, stride_lb, stride_lh, t_all, CENTRED)
        # Centred: head 0's pass (i == 0) also computes and stores the means.
        if (t >= 0) & (t < C) & ((t + 1) % R == 0):
            s0 = t + 1 - R
            for g in range(0, R // GROUP):
                slots = g * GROUP + offs_g
                old = (slots < R - 1)[:, None] & mask_d[None, :]
                newrow = (slots == R - 1)[:, None]
                x = tl.load(kres_ptr + (head * R + slots)[:, None] * D + offs_d[None, :], mask=old,
                            other=0.0).to(tl.float32)
                kn = _to_storage(tl.load(knew_ptr + b * stride_kb + hh * stride_kh + offs_d, mask=mask_d,
                                         other=0.0), DT).to(tl.float32)
                x = tl.where(newrow, kn[None, :], x)
                if CENTRED:
                    acc = tl.zeros([GROUP, BLOCK_D], tl.float32)
                    for h2 in range(0, H):
                        y = tl.load(kres_ptr + ((b * H + h2) * R + slots)[:, None] * D + offs_d[None, :],
                                    mask=old, other=0.0).to(tl.float32)
                        kn2 = _to_storage(tl.load(knew_ptr + b * stride_kb + h2 * stride_kh + offs_d, mask=mask_d,
                                                  other=0.0), DT).to(tl.float32)
                        acc += tl.where(newrow, kn2[None, :], y)
                    m = _round_to(tl.math.div_rn(acc, tl.full(acc.shape, H, tl.float32)), DT, 0)
                    x = x - m
                    if i == 0:
                        tl.store(kmean_ptr + (b * C + s0 + slots)[:, None] * D + offs_d[None, :], _to_storage(m, DT),
                                 mask=mask_d[None, :])
                _quantize_key_block(x, kc_ptr + head * (C // P) * D, ks_ptr + head * (C // GROUP) * D,
                                    km_ptr + head * (C // GROUP) * D, s0 // P + g * (GROUP // P),
                                    s0 // GROUP + g, offs_d, mask_d, D, GROUP, BLOCK_D, BITS, DT)
    # --- lengths ---
    for i in range(0, HEADS):
        hh = h0 + i
        t = _append_step(lengths_ptr, b, hh, stride_lb, stride_lh, t_all, CENTRED)
        if (t >= 0) & (t < C):
            tl.store(lengths_ptr + b * stride_lb + hh * stride_lh, t + 1)
