# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of expected_attention_scores, slot_scores and update_scores_.
Kernels only; launchers and argument checks are in ``kvkern/triton/scorers.py``
and the exact math in ``kvkern/reference.py``.

Expected attention runs in three steps so the costly part, the per-head
quadratic form ``k^T Sigma k`` (a small GEMM per tile of slots), is spread
over a grid of (slot tile, query head) programs:

1. ``expected_attention_logits_kernel``: ``z`` of every scored slot into an fp32
   scratch ``[B * Hq, C]``;
2. ``softmax_stats_kernel``: per query head, the max and the sum of
   ``exp(z - max)`` over its scored slots;
3. ``expected_attention_finish_kernel``: per (kv head, slot tile), the group mean
   of the probabilities, the value-norm weighting, ``+inf`` on sinks, 0 past L.

Every value is loaded as stored and converted to fp32 at once (the interpreter
has no bf16 arithmetic); the fp32 dots use exact ("ieee") products. A length
outside ``[0, C]`` (only possible on CUDA, where values are not checked) reads
nothing: the scorers write NaN for that head and the update leaves it alone.
"""

import triton
import triton.language as tl

from ._heads import head_length as _head_length


# ---------------------------------------------------------------------------
# expected_attention_scores
# ---------------------------------------------------------------------------


@triton.jit
def expected_attention_logits_kernel(
    mean_ptr, cov_ptr, k_ptr, lengths_ptr, z_ptr,
    sm_scale, half_s2,
    n_sink, num_q_heads, group, capacity, head_dim,
    stride_mb, stride_mh,
    stride_sb, stride_sh, stride_sr,
    stride_kb, stride_kh, stride_kc,
    stride_lb, stride_lh,
    HAS_COV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_K: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_N), B * Hq): slots [t * BLOCK_N, (t + 1) * BLOCK_N) of query head
    (b, h). Writes ``z = <s * mean, k> + s^2 / 2 * k^T cov k`` to z [B * Hq, C] for the scored
    slots ``[min(n_sink, L), L)`` of the tile; writes nothing else.

    The quadratic form is one small GEMM per tile, (K_tile @ cov), reduced over slices
    of DOT_K channels, then summed against K_tile row by row.
    """
    tile = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)  # b * Hq + h
    h = row % num_q_heads
    b = row // num_q_heads
    j = h // group
    length, bad = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    lo = tl.minimum(n_sink, length)
    start = tile * BLOCK_N
    if (start + BLOCK_N > lo) & (start < length):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = (offs_n >= lo) & (offs_n < length)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < head_dim
        mu = tl.load(mean_ptr + b * stride_mb + h * stride_mh + offs_d, mask=mask_d, other=0.0) * sm_scale
        k_rows = k_ptr + b * stride_kb + j * stride_kh + offs_n.to(tl.int64)[:, None] * stride_kc
        k = tl.load(k_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        z = tl.sum(k * mu[None, :], 1)
        if HAS_COV:
            # (K_tile @ cov) accumulated over DOT_K-wide slices of the reduction dim in a
            # loop that is not unrolled: a whole-D fp32 dot would unroll into register
            # spills. Then the row-wise dot with K_tile.
            cov_head = cov_ptr + b * stride_sb + h * stride_sh
            ks = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            for c in range(0, BLOCK_D, DOT_K):
                offs_c = c + tl.arange(0, DOT_K)
                mask_c = offs_c < head_dim
                kc = tl.load(k_rows + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                sig = tl.load(cov_head + offs_c[:, None] * stride_sr + offs_d[None, :],
                              mask=mask_c[:, None] & mask_d[None, :], other=0.0)
                ks = tl.dot(kc, sig, ks, input_precision="ieee", out_dtype=tl.float32)
            z += half_s2 * tl.sum(ks * k, 1)
        tl.store(z_ptr + row * capacity + offs_n, z, mask=mask_n)


@triton.jit
def softmax_stats_kernel(
    z_ptr, lengths_ptr, max_ptr, sum_ptr,
    n_sink, num_q_heads, group, capacity,
    stride_lb, stride_lh,
    BLOCK: tl.constexpr,
):
    """Grid (B * Hq,): ``max`` and ``sum exp(z - max)`` over the head's scored slots
    (-inf and 0 when there are none). Two passes over the row of z."""
    row = tl.program_id(0).to(tl.int64)
    h = row % num_q_heads
    b = row // num_q_heads
    j = h // group
    length, bad = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    lo = tl.minimum(n_sink, length)
    z_row = z_ptr + row * capacity
    offs = tl.arange(0, BLOCK)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(lo, length, BLOCK):
        z = tl.load(z_row + start + offs, mask=start + offs < length, other=float("-inf"))
        m = tl.maximum(m, z)  # a NaN z is skipped here but still makes the sum NaN
    zmax = tl.max(m, 0)
    ref = tl.where(zmax == float("-inf"), 0.0, zmax)
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(lo, length, BLOCK):
        z = tl.load(z_row + start + offs, mask=start + offs < length, other=float("-inf"))
        acc += tl.exp(z - ref)
    tl.store(max_ptr + row, zmax)
    tl.store(sum_ptr + row, tl.sum(acc, 0))


@triton.jit
def expected_attention_finish_kernel(
    z_ptr, max_ptr, sum_ptr, v_ptr, lengths_ptr, out_ptr,
    epsilon,
    n_sink, num_kv_heads, group, capacity, head_dim,
    stride_vb, stride_vh, stride_vc,
    stride_lb, stride_lh,
    HAS_V: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C), B * Hkv): out [B, Hkv, C] for one slot tile of kv head (b, j):
    ``mean_g exp(z - max) / sum`` on scored slots, then ``(a + epsilon) * ||v||`` with v,
    ``+inf`` on ``[0, min(n_sink, L))``, 0 on ``[L, C)``; NaN everywhere for a bad length."""
    tile = tl.program_id(0)
    bj = tl.program_id(1).to(tl.int64)
    j = bj % num_kv_heads
    b = bj // num_kv_heads
    length, bad = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    lo = tl.minimum(n_sink, length)
    offs = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    scored = (offs >= lo) & (offs < length)

    acc = tl.zeros([BLOCK_C], tl.float32)
    for g in range(0, group):
        row = (b * num_kv_heads + j) * group + g
        zmax = tl.load(max_ptr + row)
        den = tl.load(sum_ptr + row)
        ref = tl.where(zmax == float("-inf"), 0.0, zmax)
        z = tl.load(z_ptr + row * capacity + offs, mask=scored, other=float("-inf"))
        acc += tl.exp(z - ref) / tl.where(den == 0.0, 1.0, den)
    a = acc / group

    if HAS_V:
        v_rows = v_ptr + b * stride_vb + j * stride_vh + offs.to(tl.int64)[:, None] * stride_vc
        sq = tl.zeros([BLOCK_C], tl.float32)
        for c in tl.static_range(0, BLOCK_D, D_CHUNK):
            offs_d = c + tl.arange(0, D_CHUNK)
            v = tl.load(v_rows + offs_d[None, :], mask=scored[:, None] & (offs_d < head_dim)[None, :],
                        other=0.0).to(tl.float32)
            sq += tl.sum(v * v, 1)
        a = (a + epsilon) * tl.sqrt(sq)

    a = tl.where(offs < lo, float("inf"), a)
    a = tl.where(offs < length, a, 0.0)
    a = tl.where(bad, float("nan"), a)
    tl.store(out_ptr + bj * capacity + offs, a, mask=offs < capacity)


# ---------------------------------------------------------------------------
# slot_scores
# ---------------------------------------------------------------------------

KEY_NORM: tl.constexpr = tl.constexpr(0)
VALUE_NORM: tl.constexpr = tl.constexpr(1)
KEYDIFF: tl.constexpr = tl.constexpr(2)
RECENCY: tl.constexpr = tl.constexpr(3)
RANDOM: tl.constexpr = tl.constexpr(4)


@triton.jit
def lowbias32(x):
    """Chris Wellons' lowbias32 on uint32 (multiplications wrap modulo 2^32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _row_sq_norms(rows, valid, head_dim, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNK: tl.constexpr):
    """Squared norms of BLOCK_C rows (row pointers ``rows`` [BLOCK_C, 1]); 0 where not valid."""
    sq = tl.zeros([BLOCK_C], tl.float32)
    for c in tl.static_range(0, BLOCK_D, D_CHUNK):
        offs_d = c + tl.arange(0, D_CHUNK)
        x = tl.load(rows + offs_d[None, :], mask=valid[:, None] & (offs_d < head_dim)[None, :],
                    other=0.0).to(tl.float32)
        sq += tl.sum(x * x, 1)
    return sq


@triton.jit
def keydiff_anchor_kernel(
    k_ptr, lengths_ptr, anchor_ptr,
    num_kv_heads, capacity, head_dim,
    stride_kb, stride_kh, stride_kc,
    stride_lb, stride_lh,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (B * Hkv,): anchor [B * Hkv, BLOCK_D] = sum_{i<L} k_i / max(||k_i||, 1e-30) / max(L, 1)
    (0 on the padding columns)."""
    bj = tl.program_id(0).to(tl.int64)
    j = bj % num_kv_heads
    b = bj // num_kv_heads
    length, bad = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    k_head = k_ptr + b * stride_kb + j * stride_kh
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < length
        k = tl.load(k_head + offs_n.to(tl.int64)[:, None] * stride_kc + offs_d[None, :],
                    mask=valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        nk = tl.maximum(tl.sqrt(tl.sum(k * k, 1)), 1e-30)
        acc += tl.sum(k / nk[:, None], 0)
    acc = acc / tl.maximum(length, 1).to(tl.float32)
    tl.store(anchor_ptr + bj * BLOCK_D + offs_d, acc)


@triton.jit(do_not_specialize=["key"])
def slot_scores_kernel(
    k_ptr, v_ptr, lengths_ptr, anchor_ptr, out_ptr,
    key,
    num_kv_heads, capacity, head_dim,
    stride_kb, stride_kh, stride_kc,
    stride_vb, stride_vh, stride_vc,
    stride_lb, stride_lh,
    KIND: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C), B * Hkv): out [B, Hkv, C] for one slot tile of kv head (b, j)
    (see reference.slot_scores); 0 past L; NaN for a bad length. ``key`` is the random kind's
    ``lowbias32(seed + 0x9E3779B9)`` as int32 bits; ``anchor`` [B * Hkv, BLOCK_D] is keydiff's."""
    tile = tl.program_id(0)
    bj = tl.program_id(1).to(tl.int64)
    j = bj % num_kv_heads
    b = bj // num_kv_heads
    length, bad = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    offs = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    valid = offs < length
    if KIND == KEY_NORM:
        rows = k_ptr + b * stride_kb + j * stride_kh + offs.to(tl.int64)[:, None] * stride_kc
        s = -tl.sqrt(_row_sq_norms(rows, valid, head_dim, BLOCK_C, BLOCK_D, D_CHUNK))
    elif KIND == VALUE_NORM:
        rows = v_ptr + b * stride_vb + j * stride_vh + offs.to(tl.int64)[:, None] * stride_vc
        s = tl.sqrt(_row_sq_norms(rows, valid, head_dim, BLOCK_C, BLOCK_D, D_CHUNK))
    elif KIND == KEYDIFF:
        offs_d = tl.arange(0, BLOCK_D)
        anchor = tl.load(anchor_ptr + bj * BLOCK_D + offs_d)
        an = tl.sqrt(tl.sum(anchor * anchor, 0))
        k = tl.load(k_ptr + b * stride_kb + j * stride_kh + offs.to(tl.int64)[:, None] * stride_kc
                    + offs_d[None, :], mask=valid[:, None] & (offs_d < head_dim)[None, :], other=0.0).to(tl.float32)
        nk = tl.maximum(tl.sqrt(tl.sum(k * k, 1)), 1e-30)
        cos = tl.sum(k * anchor[None, :], 1) / nk / tl.where(an > 0.0, an, 1.0)
        s = tl.where(an > 0.0, -cos, 0.0)
    elif KIND == RECENCY:
        s = offs.to(tl.float32)
    else:
        # flat = (b * Hkv + j) * C + i, wrapped to uint32 like the reference's mask.
        flat = (bj * capacity + offs).to(tl.uint32)
        u = lowbias32(flat ^ key.to(tl.uint32, bitcast=True)) >> 8
        s = u.to(tl.float32) * (1.0 / 16777216.0)  # exact: u < 2^24
    s = tl.where(valid, s, 0.0)
    s = tl.where(bad, float("nan"), s)
    tl.store(out_ptr + bj * capacity + offs, s, mask=offs < capacity)


# ---------------------------------------------------------------------------
# update_scores_
# ---------------------------------------------------------------------------

MODE_MAX: tl.constexpr = tl.constexpr(0)
MODE_EMA: tl.constexpr = tl.constexpr(1)
MODE_SUM: tl.constexpr = tl.constexpr(2)


@triton.jit
def update_scores_kernel(
    hist_ptr, new_ptr, lengths_ptr, hist_lengths_ptr,
    decay: tl.float64, keep: tl.float64,
    num_kv_heads, capacity,
    stride_hb, stride_hh,
    stride_nb, stride_nh,
    stride_lb, stride_lh,
    stride_gb, stride_gh,
    MODE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(C, BLOCK_C), B * Hkv): hist[b, j, i] for i < L updated in place (see
    reference.update_scores_), in fp64 rounded once to fp32 as the reference does; slots
    at or past L, and every slot of a head with a bad length, are not written."""
    tile = tl.program_id(0)
    bj = tl.program_id(1).to(tl.int64)
    j = bj % num_kv_heads
    b = bj // num_kv_heads
    length, bad = _head_length(lengths_ptr, b, j, stride_lb, stride_lh, capacity)
    hist_length = tl.load(hist_lengths_ptr + b * stride_gb + j * stride_gh)
    offs = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    upd = offs < length
    has = upd & (offs < hist_length)
    h_row = hist_ptr + b * stride_hb + j * stride_hh
    old = tl.load(h_row + offs, mask=upd, other=0.0).to(tl.float64)
    nw = tl.load(new_ptr + b * stride_nb + j * stride_nh + offs, mask=upd, other=0.0).to(tl.float64)
    a = decay * old
    if MODE == MODE_MAX:
        # torch.maximum: NaN from either side propagates; otherwise (a < nw) ? nw : a.
        comb = tl.where((a != a) | (nw != nw), a + nw, tl.where(a < nw, nw, a))
    elif MODE == MODE_EMA:
        comb = a + keep * nw
    else:
        comb = a + nw
    res = tl.where(has, comb, nw)
    tl.store(h_row + offs, res.to(tl.float32), mask=upd)
