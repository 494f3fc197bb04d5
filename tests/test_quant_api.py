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
