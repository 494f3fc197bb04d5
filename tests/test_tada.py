# SPDX-License-Identifier: Apache-2.0
"""TaDA policies: exact memory accounting, the issue's memory targets, the precision chooser."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from kvkern.policies import tada

from quant_utils import empty_cache

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def model_ratio(Hkv, C, bits, group, residual, mean_centred, elem):
    """Spec §3(b) memory model, made exact for this layout, against a bf16 K+V of capacity C:
    codes b/16, scale+min per G elements for K and for V (2 * elem bytes per G of 2-byte elements),
    the residual ring R/C of full-precision rows, the 16-bit mean 1/Hkv. With elem = 2 (bf16) this is
    the spec's 1/H + b/16 + 32/(16 G) plus the ring."""
    return bits / 16 + elem / group + elem * residual / (2 * C) + (elem / (2 * Hkv) if mean_centred else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mean_centred", [False, True])
@pytest.mark.parametrize("bits,group,residual,C", [(2, 32, 32, 96), (4, 64, 128, 384), (8, 128, 128, 256),
                                                    (2, 128, 256, 768), (4, 32, 64, 64)])
def test_bytes_equal_tensor_sizes_and_model(bits, group, residual, C, mean_centred, dtype):
    B, Hkv, D = 3, 5, 128
    got = tada.quantized_cache_bytes(B, Hkv, C, D, bits, group, residual, mean_centred, dtype)
    cache = empty_cache(B, Hkv, C, D, bits, group, residual, mean_centred, dtype, "cpu")
    for name, t in cache.items():
        assert got[name] == (0 if t is None else t.numel() * t.element_size()), name
    assert got["total"] == sum(t.numel() * t.element_size() for t in cache.values() if t is not None)
    assert got["total"] == got["codes"] + got["metadata"] + got["means"] + got["residual"]
    assert got["dense_bf16"] == 2 * B * Hkv * C * D * 2
    elem = torch.empty((), dtype=dtype).element_size()
    assert got["ratio"] == pytest.approx(model_ratio(Hkv, C, bits, group, residual, mean_centred, elem), rel=1e-12)


# The targets, metadata included. Context: C = 32768 tokens (the H100 benchmark shape) with a
# residual ring of R = 128: the ring costs R / C = 0.39% there. It is NOT free at short contexts: at
# C = 4096 it costs 3.1% and plain 4-bit G = 128 lands at 29.7% (asserted below, so nobody quotes the
# 27% figure for short contexts).
TARGET = dict(B=8, Hkv=8, C=32768, D=128, residual=128)


def test_memory_target_plain_4bit():
    r = tada.quantized_cache_bytes(bits=4, group=128, mean_centred=False, **TARGET)
    print(f"plain 4-bit G=128 R=128 C=32768: {100 * r['ratio']:.3f}% of bf16")
    assert r["ratio"] <= 0.27
    short = tada.quantized_cache_bytes(bits=4, group=128, mean_centred=False, **{**TARGET, "C": 4096})
    assert short["ratio"] > 0.27


def test_memory_target_plain_2bit():
    r = tada.quantized_cache_bytes(bits=2, group=128, mean_centred=False, **TARGET)
    print(f"plain 2-bit G=128 R=128 C=32768: {100 * r['ratio']:.3f}% of bf16")
    assert r["ratio"] <= 0.15
    # KIVI's own G = 32 does not meet it: fp16 scale + min per 32 elements is 1 bit per element.
    assert tada.quantized_cache_bytes(bits=2, group=32, mean_centred=False, **TARGET)["ratio"] > 0.15


def test_memory_target_tada_mixed():
    """A 30-layer model, Hkv = 8, mean-centred, G = 128, R = 128, C = 32768, and the chooser given a
    bytes budget of 27% of the bf16 cache. The mean alone costs 1/8 = 12.5%, metadata 1.56%, the ring
    0.39%: 12.55% is left for codes, i.e. b_avg <= 2.008 bits. Upgrading one layer of 30 from 2 to
    4 bits costs 2/16/30 = 0.42% of the bf16 cache, more than the 0.05% headroom over all-2-bit, so the
    chooser can only pick 2 bits everywhere: 26.95% of bf16. The paper's
    headline is reachable at Hkv = 8 only as ~2-bit deviations, as spec §3(b) predicts."""
    n = 30
    errors = torch.rand(n, 3).sort(dim=1, descending=True).values  # error falls with bits
    layer_bytes = [[tada.quantized_cache_bytes(bits=b, group=128, mean_centred=True, **TARGET)["total"]
                    for b in (2, 4, 8)] for _ in range(n)]
    dense = n * tada.quantized_cache_bytes(bits=2, group=128, mean_centred=True, **TARGET)["dense_bf16"]
    budget = math.floor(0.27 * dense)
    bits = tada.choose_layer_bits(errors, budget_bytes=budget, bits_options=(2, 4, 8), layer_bytes=layer_bytes)
    mixed = tada.mixed_cache_bytes(bits, group=128, mean_centred=True, **TARGET)
    print(f"TaDA mean-centred Hkv=8 G=128 R=128 C=32768, budget 27%: bits {bits}, "
          f"{100 * mixed['ratio']:.3f}% of bf16 (avg {mixed['avg_bits']:.2f} bits)")
    assert mixed["total"] <= budget and mixed["ratio"] <= 0.27
    # The headroom over all-2-bit (0.05% of bf16) is smaller than one layer's 2 -> 4 upgrade (0.42%).
    assert bits == (2,) * n
    # A looser budget does mix: 30% of bf16 buys some 4-bit layers, and the chooser spends it.
    bits30 = tada.choose_layer_bits(errors, budget_bytes=math.floor(0.30 * dense), bits_options=(2, 4, 8),
                                    layer_bytes=layer_bytes)
    mixed30 = tada.mixed_cache_bytes(bits30, group=128, mean_centred=True, **TARGET)
    assert mixed30["ratio"] <= 0.30 and 4 in bits30


def test_mqa_mean_centring_falls_back_with_warning():
    with pytest.warns(UserWarning, match="no gain"):
        r = tada.quantized_cache_bytes(2, 1, 256, 64, 4, 64, 128, True)
    assert not r["mean_centred"] and r["means"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert r["total"] == tada.quantized_cache_bytes(2, 1, 256, 64, 4, 64, 128, False)["total"]


@pytest.mark.parametrize("args,match", [((1, 2, 128, 64, 3, 32, 32, False), "bits"),
                                        ((1, 2, 128, 64, 4, 16, 32, False), "group"),
                                        ((1, 2, 128, 64, 4, 32, 48, False), "residual"),
                                        ((1, 2, 96, 64, 4, 32, 64, False), "capacity"),
                                        ((1, 2, 128, 48, 4, 32, 32, False), "head dim")])
def test_bytes_bad_format(args, match):
    with pytest.raises(ValueError, match=match):
        tada.quantized_cache_bytes(*args)


# ---- choose_layer_bits ------------------------------------------------------------------------

BITS = (2, 4, 8)


def brute_force(errors, cost, limit):
    """Every assignment, the same order of summation and the same tie rule as the chooser."""
    best = None
    n = len(errors)
    for choice in itertools.product(range(len(BITS)), repeat=n):
        c = sum(cost[i][j] for i, j in enumerate(choice))
        if c > limit:
            continue
        e = 0.0
        for i, j in enumerate(choice):
            e += errors[i][j]
        key = (e, c, tuple(-BITS[j] for j in choice))
        best = key if best is None or key < best else best
    return tuple(-b for b in best[2])


@pytest.mark.parametrize("n", [1, 2, 5])
def test_choose_avg_bits_is_optimal(n):
    for _ in range(20):
        errors = torch.rand(n, 3).double()
        if torch.rand(()) < 0.5:  # coarse values make exact ties common
            errors = (errors * 3).round() / 3
        avg = float(torch.randint(4, 17, ()).item()) / 2  # 2.0 .. 8.0 in halves
        bits = tada.choose_layer_bits(errors, budget_avg_bits=avg, bits_options=BITS)
        assert sum(bits) <= avg * n
        cost = [list(BITS)] * n
        assert bits == brute_force(errors.tolist(), cost, math.floor(avg * n + 1e-9))


def test_choose_bytes_is_optimal_heterogeneous_layers():
    n = 5
    shapes = [(1, int(torch.randint(1, 9, ()).item()), 4096, 128) for _ in range(n)]
    layer_bytes = [[tada.quantized_cache_bytes(B, H, C, D, b, 128, 128, H > 1)["total"] for b in BITS]
                   for B, H, C, D in shapes]
    for _ in range(10):
        errors = torch.rand(n, 3).double()
        lo, hi = sum(min(r) for r in layer_bytes), sum(max(r) for r in layer_bytes)
        budget = int(lo + torch.rand(()).item() * (hi - lo))
        bits = tada.choose_layer_bits(errors, budget_bytes=budget, bits_options=BITS, layer_bytes=layer_bytes)
        assert sum(layer_bytes[i][BITS.index(b)] for i, b in enumerate(bits)) <= budget
        assert bits == brute_force(errors.tolist(), layer_bytes, budget)


def test_choose_ties_and_degenerate_cases():
    # Equal errors everywhere: bits buy nothing, so the fewest bytes win.
    assert tada.choose_layer_bits(torch.ones(4, 3), budget_avg_bits=8, bits_options=BITS) == (2, 2, 2, 2)
    # Two layers, identical curves, room for one upgrade: the earlier layer gets it.
    errs = [[1.0, 0.5, 0.4], [1.0, 0.5, 0.4]]
    assert tada.choose_layer_bits(errs, budget_avg_bits=3, bits_options=BITS) == (4, 2)
    # The exact minimum budget and an unlimited one.
    assert tada.choose_layer_bits(errs, budget_avg_bits=2, bits_options=BITS) == (2, 2)
    assert tada.choose_layer_bits(errs, budget_avg_bits=100, bits_options=BITS) == (8, 8)
    # A non-convex curve (2 -> 4 gains little, 4 -> 8 a lot) where greedy-per-byte would stall.
    errs = [[1.0, 0.99, 0.0], [0.6, 0.3, 0.2]]
    assert tada.choose_layer_bits(errs, budget_avg_bits=5, bits_options=BITS) == (8, 2)
    assert tada.choose_layer_bits(torch.zeros(0, 3), budget_avg_bits=4, bits_options=BITS) == ()
    with pytest.raises(ValueError, match="cheapest"):
        tada.choose_layer_bits(errs, budget_avg_bits=1.5, bits_options=BITS)
    with pytest.raises(ValueError, match="finite"):
        tada.choose_layer_bits([[math.nan, 0.0, 0.0]], budget_avg_bits=4, bits_options=BITS)
    with pytest.raises(ValueError, match="exactly one"):
        tada.choose_layer_bits(errs, bits_options=BITS)
    with pytest.raises(ValueError, match="layer_bytes"):
        tada.choose_layer_bits(errs, budget_bytes=10**9, bits_options=BITS)


# ---- calibrate_layer_errors -------------------------------------------------------------------

def synthetic_layer(Hkv=2, T=100, D=64, dtype=torch.bfloat16, shared=None):
    k = torch.randn(1, Hkv, T, D)
    if shared is not None:  # outlier channels shared by every head (what centring removes)
        k[..., shared] += 20 * torch.randn(1, 1, T, len(shared))
    v = torch.randn(1, Hkv, T, D)
    q = torch.randn(1, 2 * Hkv, 3, D)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def test_calibrate_then_choose():
    layers = [synthetic_layer(), synthetic_layer(shared=[3, 17])]
    res = tada.calibrate_layer_errors(layers, group=32, residual=64, mean_centred=True)
    assert res.errors.shape == (2, 3) and res.shapes == [(1, 2, 128, 64)] * 2
    # Quantization noise falls 4x per extra bit: 2 -> 4 -> 8 bits must order the errors.
    assert bool((res.errors[:, 0] > res.errors[:, 1]).all() and (res.errors[:, 1] > res.errors[:, 2]).all())
    lb = res.layer_bytes()
    budget = int(lb[:, 1].sum())  # room for 4 bits everywhere, or trades between layers
    bits = tada.choose_layer_bits(res, budget_bytes=budget)
    assert sum(int(lb[i, res.bits.index(b)]) for i, b in enumerate(bits)) <= budget
    assert tada.choose_layer_bits(res, budget_avg_bits=4) == bits  # same shapes: bytes are affine in bits


def test_calibrate_identical_heads_are_exact_when_centred():
    q, k, v = synthetic_layer()
    k, v = k[:, :1].expand_as(k).contiguous(), v[:, :1].expand_as(v).contiguous()
    res = tada.calibrate_layer_errors([(q, k, v)], group=32, residual=64, mean_centred=True)
    assert bool((res.errors == 0).all() and (res.key_errors == 0).all())
    assert tada.choose_layer_bits(res, budget_avg_bits=8) == (2,)  # nothing to buy


def test_calibrate_mqa_warns_and_matches_plain():
    q, k, v = synthetic_layer(Hkv=1)
    with pytest.warns(UserWarning, match="no gain"):
        res = tada.calibrate_layer_errors([(q, k, v)], bits_options=(4,), group=32, residual=64)
    plain = tada.calibrate_layer_errors([(q, k, v)], bits_options=(4,), group=32, residual=64, mean_centred=False)
    assert res.mean_centred == [False] and torch.equal(res.errors, plain.errors)
