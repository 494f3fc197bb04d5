# SPDX-License-Identifier: Apache-2.0
"""kvkern.QuantizedKVCache: format errors, the MQA fallback, exact byte accounting."""

from __future__ import annotations

import pytest
import torch

import kvkern
from kvkern import reference


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(bits=3), "bits"),
        (dict(group=48), "group"),
        (dict(group=64, residual=96), "residual"),
        (dict(capacity=1000), "capacity"),
        (dict(D=96, group=64), "D"),
        (dict(dtype=torch.float64), "dtype"),
    ],
)
def test_format_errors(kwargs, words):
    args = dict(B=1, Hkv=2, capacity=1024, D=128, bits=4, group=64, residual=128)
    args.update(kwargs)
    with pytest.raises(ValueError, match=words):
        kvkern.QuantizedKVCache.empty(args.pop("B"), args.pop("Hkv"), args.pop("capacity"), args.pop("D"), **args)


def test_single_kv_head_falls_back_with_a_warning():
    with pytest.warns(UserWarning, match="one kv head"):
        cache = kvkern.QuantizedKVCache.empty(1, 1, 256, 64, bits=4, group=32, residual=64, mean_centred=True)
    assert cache.k_mean is None and cache.v_mean is None


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("mean_centred", [False, True])
def test_nbytes_is_exact(bits, mean_centred):
    B, H, C, D, G, R = 2, 8, 4096, 128, 128, 128
    cache = kvkern.QuantizedKVCache.empty(B, H, C, D, bits=bits, group=G, residual=R, mean_centred=mean_centred)
    got = cache.nbytes()
    codes = 2 * B * H * C * D * bits // 8
    meta = 2 * 2 * B * H * C * D // G * 2  # scale + min, keys and values, 2 bytes each
    means = 2 * B * C * D * 2 if mean_centred else 0
    ring = 2 * B * H * R * D * 2
    assert got["total"] == codes + meta + means + ring
    assert got["total"] == sum(t.numel() * t.element_size() for t in cache.tensors if t is not None)
    assert got["ratio"] == pytest.approx(got["total"] / (2 * B * H * C * D * 2))


def test_shapes_follow_the_reference_layout():
    cache = kvkern.QuantizedKVCache.empty(1, 4, 512, 64, bits=2, group=32, residual=64, mean_centred=True)
    shapes = reference.quantized_cache_shapes(1, 4, 512, 64, 2, 32, 64, True)
    for name in shapes:
        assert tuple(getattr(cache, name).shape) == shapes[name]
    assert cache.capacity == 512 and cache.residual == 64


def test_not_a_cache():
    with pytest.raises(TypeError, match="cache"):
        kvkern.quant_decode_attention(torch.randn(1, 4, 64), object())


def _caches():
    quant = kvkern.QuantizedKVCache.empty(1, 2, 64, 64, group=32, residual=32, dtype=torch.float32)
    return quant, kvkern.FP8KVCache.empty(1, 2, 64, 64)


@pytest.mark.parametrize("call,arg,words", [
    (lambda c, f: kvkern.quant_decode_attention(torch.randn(2, 64), c), "q", "expected a 3-D tensor [B, Hq, D]"),
    (lambda c, f: kvkern.fp8_decode_attention(torch.randn(2, 64), f), "q", "expected a 3-D tensor [B, Hq, D]"),
    (lambda c, f: kvkern.append_quantized_kv_(torch.randn(64), torch.randn(1, 2, 64), c), "k_new",
     "expected a 3-D tensor [B, Hkv, D]"),
    (lambda c, f: kvkern.append_fp8_kv_(torch.randn(1, 2, 64), [0.0], f), "v_new", "expected a torch.Tensor"),
    (lambda c, f: kvkern.quantize_kv_([1.0], torch.randn(1, 2, 8, 64), torch.zeros(1, 2, dtype=torch.int32), c),
     "k", "expected a torch.Tensor [B, Hkv, T, D]"),
    (lambda c, f: kvkern.quantize_fp8_kv_(torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64),
                                          torch.zeros(2, dtype=torch.int32), f), "lengths",
     "expected a 2-D tensor [B, Hkv]"),
])
def test_front_doors_check_ranks_first(call, arg, words):
    # The tuning key reads shapes: a wrong rank or a non-tensor must be a named error, not an IndexError.
    quant, fp8 = _caches()
    with pytest.raises((TypeError, ValueError)) as info:
        call(quant, fp8)
    assert f": {arg}: {words}" in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_centred_cache_with_unequal_head_lengths_is_refused_by_every_reader(backend):
    if backend not in kvkern.ops.available_backends("quant_decode_attention", "cpu"):
        pytest.skip(f"no {backend} backend here")
    cache = kvkern.QuantizedKVCache.empty(1, 2, 64, 64, group=32, residual=32, mean_centred=True,
                                          dtype=torch.float32)
    cache.lengths.copy_(torch.tensor([[3, 4]], dtype=torch.int32))
    for call in (lambda: kvkern.dequantize_kv(cache, backend=backend),
                 lambda: kvkern.quant_decode_attention(torch.randn(1, 2, 64), cache, backend=backend)):
        with pytest.raises((RuntimeError, ValueError), match="same number of tokens"):
            call()
