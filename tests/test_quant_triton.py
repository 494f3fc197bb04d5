# SPDX-License-Identifier: Apache-2.0
"""The Triton twins of the quantized-KV ops against kvkern.reference: codes, metadata,
means and rings bit-exact on the live parts, dequantized caches exact, attention within
tolerance. Small shapes: under TRITON_INTERPRET=1 every program runs in numpy."""

from __future__ import annotations

import pytest
import torch

import kvkern  # noqa: F401
from kvkern import reference
from kvkern.ops import available_backends

from quant_utils import as_args, empty_cache, live_equal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in available_backends("quantize_kv_", DEVICE),
                                reason="Triton backend not available here")
OPS = torch.ops.kvkern
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# (bits, group, dtype, mean_centred): every value of each axis, not the full product.
CASES = [(2, 32, torch.float32, False), (4, 64, torch.bfloat16, True), (8, 32, torch.float16, False),
         (4, 32, torch.float32, True), (2, 64, torch.float16, True), (8, 64, torch.bfloat16, False)]


def _lengths(B, H, T, centred):
    if centred:
        lengths = torch.randint(0, T + 1, (B, 1), dtype=torch.int32).expand(B, H).contiguous()
    else:
        lengths = torch.randint(0, T + 1, (B, H), dtype=torch.int32)
        lengths.view(-1)[0] = T     # full, and (below) empty
        if lengths.numel() > 1:
            lengths.view(-1)[1] = 0
    return lengths


def _quantized(B, H, C, R, D, bits, group, dtype, centred, T=None):
    T = C if T is None else T
    k = torch.randn(B, H, T, D, dtype=dtype) * 2 + 0.5
    v = torch.randn(B, H, T, D, dtype=dtype)
    lengths = _lengths(B, H, T, centred)
    # Poison tokens past lengths: they must not reach any result.
    mask = torch.arange(T)[None, None, :, None] >= lengths[:, :, None, None].to(torch.int64)
    k = k.masked_fill(mask, float("nan"))
    v = v.masked_fill(mask, float("nan"))
    want = reference.quantize_kv(k.nan_to_num(), v.nan_to_num(), lengths, C, bits, group, R, centred)
    got = empty_cache(B, H, C, D, bits, group, R, centred, dtype, "cpu")
    got = {n: (None if t is None else t.to(DEVICE)) for n, t in got.items()}
    OPS.quantize_kv_triton_(k.to(DEVICE), v.to(DEVICE), lengths.to(DEVICE), *as_args(got), bits, group)
    return got, want, lengths


@pytest.mark.parametrize("bits,group,dtype,centred", CASES, ids=str)
def test_quantize_dequantize_attention(bits, group, dtype, centred):
    B, H, R, D = 2, 2, 2 * group, 64
    C = 2 * R
    got, want, lengths = _quantized(B, H, C, R, D, bits, group, dtype, centred, T=C - 3)
    assert live_equal(got, want, lengths, bits, group) == []

    k, v = OPS.dequantize_kv_triton(*as_args(got), lengths.to(DEVICE), bits, group)
    rk, rv = reference.dequantize_kv(want, lengths, bits, group, dtype=dtype)
    assert torch.equal(k.cpu(), rk) and torch.equal(v.cpu(), rv)

    for Gq, splits in ((1, 1), (4, 3)):
        q = torch.randn(B, H * Gq, D, dtype=dtype)
        out, lse = OPS.quant_decode_attention_triton(q.to(DEVICE), *as_args(got), lengths.to(DEVICE), bits, group,
                                                     None, splits)
        ro, rl = reference.quant_decode_attention(q, want, lengths, bits, group)
        empty = (lengths == 0).repeat_interleave(Gq, 1)
        assert torch.equal(torch.isinf(lse.cpu()), empty)
        torch.testing.assert_close(out.cpu().double(), ro, atol=ATOL[dtype], rtol=0)
        torch.testing.assert_close(lse.cpu().double()[~empty], rl[~empty], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bits,group,dtype,centred", CASES[:4], ids=str)
def test_append_matches_quantize(bits, group, dtype, centred):
    """Appending token by token gives the quantized cache of the longer dense cache,
    across value quantization and key flushes."""
    B, H, R, D = 2, 2, group, 64
    C = 3 * R
    k = torch.randn(B, H, C, D, dtype=dtype)
    v = torch.randn(B, H, C, D, dtype=dtype)
    start = torch.tensor([[R - 2], [0]], dtype=torch.int32).expand(B, H).contiguous()
    steps = R + 4
    got = empty_cache(B, H, C, D, bits, group, R, centred, dtype, "cpu")
    got = {n: (None if t is None else t.to(DEVICE)) for n, t in got.items()}
    lengths = start.clone().to(DEVICE)
    OPS.quantize_kv_triton_(k.to(DEVICE), v.to(DEVICE), lengths, *as_args(got), bits, group)
    idx = torch.arange(B)
    for _ in range(steps):
        t = lengths[:, 0].cpu().long()
        k_new = k[idx, :, t].to(DEVICE)  # [B, H, D]
        v_new = v[idx, :, t].to(DEVICE)
        OPS.append_quantized_kv_triton_(k_new, v_new, lengths, *as_args(got), bits, group)
    assert torch.equal(lengths.cpu(), start + steps)
    want = reference.quantize_kv(k, v, lengths.cpu(), C, bits, group, R, centred)
    assert live_equal(got, want, lengths.cpu(), bits, group) == []


def test_append_ragged_heads():
    """Without mean-centring each head steps from its own length."""
    bits, group, dtype = 4, 32, torch.float32
    B, H, R, D, C = 1, 3, 32, 64, 96
    k = torch.randn(B, H, C, D, dtype=dtype)
    v = torch.randn(B, H, C, D, dtype=dtype)
    lengths = torch.tensor([[30, 31, 33]], dtype=torch.int32)
    got = empty_cache(B, H, C, D, bits, group, R, False, dtype, "cpu")
    OPS.quantize_kv_triton_(k, v, lengths, *as_args(got), bits, group)
    for _ in range(3):
        t = lengths[0].long()
        OPS.append_quantized_kv_triton_(k[0, torch.arange(H), t][None], v[0, torch.arange(H), t][None], lengths,
                                        *as_args(got), bits, group)
    assert lengths.tolist() == [[33, 34, 36]]
    want = reference.quantize_kv(k, v, lengths, C, bits, group, R, False)
    assert live_equal(got, want, lengths, bits, group) == []


def test_bad_input():
    bits, group, dtype = 4, 32, torch.float32
    B, H, R, D, C = 1, 2, 32, 64, 64
    cache = empty_cache(B, H, C, D, bits, group, R, True, dtype, DEVICE)
    args = as_args(cache)
    lengths = torch.full((B, H), 5, dtype=torch.int32, device=DEVICE)
    q = torch.randn(B, H, D, device=DEVICE)
    with pytest.raises(Exception, match="bits"):
        OPS.quant_decode_attention_triton(q, *args, lengths, 3, group)
    with pytest.raises(Exception, match="group"):
        OPS.dequantize_kv_triton(*args, lengths, bits, 16)
    with pytest.raises(Exception, match="q: expected dtype"):
        OPS.quant_decode_attention_triton(q.half(), *args, lengths, bits, group)
    with pytest.raises(Exception, match="k_new"):
        OPS.append_quantized_kv_triton_(q[:, :1], q, lengths, *args, bits, group)
    bad = list(args)
    bad[1] = bad[1][:, :, :1]
    with pytest.raises(Exception, match="k_scale|k_codes"):
        OPS.dequantize_kv_triton(*bad, lengths, bits, group)
    if DEVICE == "cpu":
        with pytest.raises(Exception, match="lengths"):
            OPS.append_quantized_kv_triton_(q, q, torch.tensor([[5, 6]], dtype=torch.int32), *args, bits, group)
        with pytest.raises(Exception, match="lengths"):
            OPS.append_quantized_kv_triton_(q, q, torch.full((B, H), C, dtype=torch.int32), *args, bits, group)


def test_opcheck():
    bits, group, dtype = 4, 32, torch.float32
    B, H, R, D, C = 1, 2, 32, 64, 64
    got, _, lengths = _quantized(B, H, C, R, D, bits, group, dtype, True)
    lengths = lengths.to(DEVICE)
    k = torch.randn(B, H, C, D, device=DEVICE)
    q = torch.randn(B, 2 * H, D, device=DEVICE)
    tests = ("test_schema", "test_faketensor")  # the mutating ops' autograd checks need no extra coverage
    torch.library.opcheck(OPS.quantize_kv_triton_.default, (k, k, lengths, *as_args(got), bits, group),
                          test_utils=tests)
    torch.library.opcheck(OPS.dequantize_kv_triton.default, (*as_args(got), lengths, bits, group))
    small = torch.full_like(lengths, 40)
    torch.library.opcheck(OPS.append_quantized_kv_triton_.default,
                          (q[:, :H], q[:, :H], small, *as_args(got), bits, group), test_utils=tests)
    torch.library.opcheck(OPS.quant_decode_attention_triton.default,
                          (q, *as_args(got), lengths, bits, group, 0.2, 2))


def test_compile_fullgraph():
    bits, group, dtype = 8, 32, torch.float32
    B, H, R, D, C = 1, 2, 32, 64, 64
    got, want, lengths = _quantized(B, H, C, R, D, bits, group, dtype, False)
    lengths = lengths.to(DEVICE)
    q = torch.randn(B, H, D, device=DEVICE)

    @torch.compile(fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    def step(q, lengths, *cache):
        return OPS.quant_decode_attention_triton(q, *cache, lengths, bits, group)

    out, lse = step(q, lengths, *as_args(got))
    ro, rl = reference.quant_decode_attention(q.cpu(), want, lengths.cpu(), bits, group)
    torch.testing.assert_close(out.cpu().double(), ro, atol=ATOL[dtype], rtol=0)


def test_strided_inputs():
    """k, v and q may be views whose only contiguous dimension is the last."""
    B, H, C, R, D, bits, group = 1, 2, 64, 32, 64, 4, 32
    big = torch.randn(B, C, H, 2 * D, device=DEVICE)
    k, v = big[..., :D].transpose(1, 2), big[..., D:].transpose(1, 2)
    lengths = torch.tensor([[50, 61]], dtype=torch.int32, device=DEVICE)
    got = empty_cache(B, H, C, D, bits, group, R, False, torch.float32, DEVICE)
    OPS.quantize_kv_triton_(k, v, lengths, *as_args(got), bits, group)
    want = reference.quantize_kv(k.cpu(), v.cpu(), lengths.cpu(), C, bits, group, R, False)
    assert live_equal(got, want, lengths.cpu(), bits, group) == []
    q = torch.randn(B, 2 * H, 2 * D, device=DEVICE)[..., :D]
    out, _ = OPS.quant_decode_attention_triton(q, *as_args(got), lengths, bits, group)
    ro, _ = reference.quant_decode_attention(q.cpu(), want, lengths.cpu(), bits, group)
    torch.testing.assert_close(out.cpu().double(), ro, atol=ATOL[torch.float32], rtol=0)
