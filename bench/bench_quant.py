# SPDX-License-Identifier: Apache-2.0
"""Quantized KV: quant_decode_attention at 2 / 4 / 8 bits beside bf16 decode_attention and eager
attention at the same shape; quantize_kv_ of a 32K-token prefill and one append step on CUDA.

Written against torch.ops.kvkern.* and skipped, case by case, where an op has no kernel for the
device in this build yet. The bytes of each quantized case are what the op must read at that bit
width (live codes, scales, mins, means and ring rows, plus q, out, lse, lengths), so the fraction
of copy bandwidth compares formats fairly.

    python -m pytest bench/bench_quant.py -q
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import kvkern
from kvkern import reference
from kvkern.ops import available_backends
from kvkern.policies.tada import quantized_cache_bytes

from bench_decode_attention import eager_composite
from conftest import record, time_call

G, R = 128, 128  # the "plain G = 128 format"; R = G keeps the ring small


@dataclass(frozen=True)
class Case:
    name: str
    device: str
    B: int
    Hq: int
    Hkv: int
    D: int
    L: int
    dtype: torch.dtype = torch.bfloat16


CASES = [Case("cpu_bf16_B4_L4096", "cpu", 4, 32, 8, 128, 4096),
         Case("cuda_bf16_B8_L32768", "cuda", 8, 32, 8, 128, 32768)]


def _skip_unless_device(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def _op(name: str, backend: str):
    """torch.ops.kvkern.<name> (backend "cpu"/"cuda") or its Triton twin, or skip."""
    from kvkern._fake import triton_twin
    return getattr(torch.ops.kvkern, name if backend != "triton" else triton_twin(name))


def _backends(op: str, device: str):
    found = [b for b in available_backends(op, device) if not (b == "triton" and device == "cpu")]
    return found  # the Triton interpreter is a correctness tool, not a peer


FIELDS = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_res", "v_res", "k_mean", "v_mean")

_INPUTS: dict = {}


def dense_inputs(case: Case):
    if case.name not in _INPUTS:
        _INPUTS.clear()
        gen = torch.Generator(device=case.device).manual_seed(1234)
        mk = lambda *s: torch.randn(*s, device=case.device, dtype=case.dtype, generator=gen)  # noqa: E731
        q = mk(case.B, case.Hq, case.D)
        k, v = mk(case.B, case.Hkv, case.L, case.D), mk(case.B, case.Hkv, case.L, case.D)
        lengths = torch.full((case.B, case.Hkv), case.L, dtype=torch.int32, device=case.device)
        _INPUTS[case.name] = (q, k, v, lengths)
    return _INPUTS[case.name]


def empty_layout(case: Case, bits: int, mean_centred: bool, C: int | None = None) -> dict:
    shapes = reference.quantized_cache_shapes(case.B, case.Hkv, C or case.L, case.D, bits, G, R, mean_centred)
    return {n: None if s is None else torch.empty(s, device=case.device,
                                                   dtype=torch.int32 if "codes" in n else case.dtype)
            for n, s in shapes.items()}


def quantized_cache(case: Case, bits: int, mean_centred: bool) -> dict:
    """Built by the device's quantize_kv_ kernel, else by the reference on CPU (then moved)."""
    q, k, v, lengths = dense_inputs(case)
    backends = available_backends("quantize_kv_", case.device)
    if backends:
        cache = empty_layout(case, bits, mean_centred)
        _op("quantize_kv_", backends[0])(k, v, lengths, *(cache[f] for f in FIELDS), bits, G)
        return cache
    if case.device != "cpu":
        pytest.skip("no quantize_kv_ kernel on this device to build the cache")
    return reference.quantize_kv(k, v, lengths, case.L, bits, G, R, mean_centred)


def live_read_bytes(case: Case, bits: int, mean_centred: bool) -> int:
    """What quant_decode_attention must read with every head at L = C: all key codes (L % R == 0
    leaves the key ring empty), value codes of the first L - R tokens and the R value ring rows,
    their metadata and means, plus q, out (q's dtype), lse (fp32) and lengths."""
    assert case.L % R == 0
    full = quantized_cache_bytes(case.B, case.Hkv, case.L, case.D, bits, G, R, mean_centred, case.dtype)
    elem = torch.empty((), dtype=case.dtype).element_size()
    frac_v = (case.L - R) / case.L
    v_quant = round((full["v_codes"] + full["v_scale"] + full["v_min"] + full["v_mean"]) * frac_v)
    k_quant = full["k_codes"] + full["k_scale"] + full["k_min"] + full["k_mean"]
    qo = 2 * case.B * case.Hq * case.D * elem + case.B * case.Hq * 4 + case.B * case.Hkv * 4
    return k_quant + v_quant + full["v_res"] + qo


def dense_read_bytes(case: Case) -> int:
    elem = torch.empty((), dtype=case.dtype).element_size()
    return 2 * case.B * case.Hkv * case.L * case.D * elem + 2 * case.B * case.Hq * case.D * elem \
        + case.B * case.Hq * 4 + case.B * case.Hkv * 4


QUANT_IMPLS = ["cpu", "cuda", "triton"]
# The CUDA attention has two kernels (QUANT_CUDA.md): "cuda" runs the default (the tensor-core
# kernel for 16-bit caches), "cuda-scalar" the first, CUDA-core one, side by side in one run.
ATTENTION_IMPLS = [*QUANT_IMPLS, "cuda-scalar"]


@pytest.mark.parametrize("mean_centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def bench_quant_decode_attention(benchmark, case, impl, bits, mean_centred, monkeypatch):
    _skip_unless_device(case.device)
    backend, _, variant = impl.partition("-")
    if backend not in _backends("quant_decode_attention", case.device):
        pytest.skip(f"quant_decode_attention has no {backend} kernel on {case.device} in this build")
    if variant:  # read by the CUDA glue at every call
        monkeypatch.setenv("KVKERN_QUANT_DECODE_KERNEL", variant)
    q, _, _, lengths = dense_inputs(case)
    cache = quantized_cache(case, bits, mean_centred)
    op = _op("quant_decode_attention", backend)
    fn = lambda: op(q, *(cache[f] for f in FIELDS), lengths, bits, G)  # noqa: E731
    deq = available_backends("dequantize_kv", case.device)
    if deq:  # the fused op must equal dense attention over the dequantized cache
        kd, vd = _op("dequantize_kv", deq[0])(*(cache[f] for f in FIELDS), lengths, bits, G)
        expected = kvkern.decode_attention(q, kd.to(case.dtype), vd.to(case.dtype), lengths)
        torch.testing.assert_close(fn()[0].float(), expected.float(), atol=2e-2, rtol=2e-2)
    label = f"{'centred' if mean_centred else 'plain'}-{bits}b"
    record(benchmark, case=case.name, impl=f"kvkern/{impl}/{label}", device=case.device, fn=fn,
           nbytes=live_read_bytes(case, bits, mean_centred), note=f"G={G} R={R}")


@pytest.mark.parametrize("impl", ["kvkern-cpu", "kvkern-cuda", "eager"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def bench_quant_dense_peers(benchmark, case, impl):
    """The yardsticks at the same shape: bf16 decode_attention and the eager composite."""
    _skip_unless_device(case.device)
    q, k, v, lengths = dense_inputs(case)
    if impl == "eager":
        fn = lambda: eager_composite(q, k, v, lengths, None)  # noqa: E731
    else:
        backend = impl[len("kvkern-"):]
        if backend != case.device or backend not in available_backends("decode_attention", case.device):
            pytest.skip(f"{impl} does not run on {case.device}")
        fn = lambda: kvkern.decode_attention(q, k, v, lengths, backend=backend)  # noqa: E731
    record(benchmark, case=case.name, impl=impl.replace("kvkern-", "kvkern/") + "/bf16-dense", device=case.device,
           fn=fn, nbytes=dense_read_bytes(case))


PREFILL = Case("cuda_bf16_B8_L32768_prefill", "cuda", 8, 32, 8, 128, 32768)


@pytest.mark.parametrize("mean_centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def bench_quantize_kv_prefill(benchmark, impl, bits, mean_centred):
    case = PREFILL
    _skip_unless_device(case.device)
    if impl not in available_backends("quantize_kv_", case.device):
        pytest.skip(f"quantize_kv_ has no {impl} kernel on cuda in this build")
    _, k, v, lengths = dense_inputs(case)
    cache = empty_layout(case, bits, mean_centred)
    op = _op("quantize_kv_", impl)
    fn = lambda: op(k, v, lengths, *(cache[f] for f in FIELDS), bits, G)  # noqa: E731
    full = quantized_cache_bytes(case.B, case.Hkv, case.L, case.D, bits, G, R, mean_centred, case.dtype)
    dense = 2 * k.numel() * k.element_size()
    record(benchmark, case=f"{case.name}_{bits}b", impl=f"kvkern/{impl}/{'centred' if mean_centred else 'plain'}",
           device=case.device, fn=fn, nbytes=dense + full["total"], note="read dense K,V + write the layout")


def _append_setup(impl: str, bits: int, mean_centred: bool):
    """(case, zeroed 32K layout, k_new, v_new, op) of the append benchmarks (skips off CUDA)."""
    case = Case("cuda_bf16_B8_C32768_append", "cuda", 8, 32, 8, 128, 32768)
    _skip_unless_device(case.device)
    if impl not in available_backends("append_quantized_kv_", case.device):
        pytest.skip(f"append_quantized_kv_ has no {impl} kernel on cuda in this build")
    cache = empty_layout(case, bits, mean_centred)
    for t in cache.values():
        if t is not None:
            t.zero_()
    k_new = torch.randn(case.B, case.Hkv, case.D, device="cuda", dtype=case.dtype)
    return case, cache, k_new, torch.randn_like(k_new), _op("append_quantized_kv_", impl)


@pytest.mark.parametrize("mean_centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def bench_append_step(benchmark, impl, bits, mean_centred):
    """One decode step on a half-full 32K cache. Every call appends (lengths grow by one, 16K slots
    of room); one step in R flushes a key block, so the median is the plain step."""
    case, cache, k_new, v_new, op = _append_setup(impl, bits, mean_centred)
    lengths = torch.full((case.B, case.Hkv), case.L // 2 + 1, dtype=torch.int32, device="cuda")
    fn = lambda: op(k_new, v_new, lengths, *(cache[f] for f in FIELDS), bits, G)  # noqa: E731
    elem = k_new.element_size()
    # read k_new, v_new, the ring row of the value leaving it; write two ring rows, its codes and metadata
    row = case.B * case.Hkv * case.D * elem
    nbytes = 5 * row + case.B * case.Hkv * (case.D * bits // 8 + 2 * (case.D // G) * elem) + 2 * lengths.numel() * 4
    record(benchmark, case=f"{case.name}_{bits}b", impl=f"kvkern/{impl}/{'centred' if mean_centred else 'plain'}",
           device=case.device, fn=fn, nbytes=nbytes, note="one launch; target < 5 us")


@pytest.mark.parametrize("mean_centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("impl", ["cuda", "triton"])
def bench_append_flush_step(benchmark, impl, bits, mean_centred):
    """The slowest decode step: every head flushes its R ring keys into codes ((t + 1) % R == 0).
    Each call first resets lengths (a 256-byte device copy, also timed alone as "reset only"), so
    every call is a flush step; the append is the difference."""
    case, cache, k_new, v_new, op = _append_setup(impl, bits, mean_centred)
    R = cache["k_res"].shape[2]
    start = torch.full((case.B, case.Hkv), case.L // 2 + R - 1 - (case.L // 2) % R, dtype=torch.int32,
                       device="cuda")
    lengths = start.clone()

    def fn():
        lengths.copy_(start)
        op(k_new, v_new, lengths, *(cache[f] for f in FIELDS), bits, G)

    reset_us = time_call(lambda: lengths.copy_(start), case.device) * 1e6
    elem = k_new.element_size()
    # the plain step's bytes plus the flush: read R ring keys, write their codes and metadata
    heads = case.B * case.Hkv
    nbytes = heads * (5 * case.D * elem + R * case.D * elem + R * case.D * bits // 8 + 2 * (R // G) * case.D * elem)
    record(benchmark, case=f"{case.name}_{bits}b_flush", impl=f"kvkern/{impl}/{'centred' if mean_centred else 'plain'}",
           device=case.device, fn=fn, nbytes=nbytes,
           note=f"reset + flush step, one launch each; reset only {reset_us:.1f} us")


# ---- FP8 (e4m3fn, per-head scales) ------------------------------------------------------------

def fp8_cache(case: Case):
    """(k_fp8, v_fp8, k_scale, v_scale) of the dense inputs, calibrated per head, built by the
    device's quantize_fp8_kv_ kernel."""
    _, k, v, lengths = dense_inputs(case)
    backends = available_backends("quantize_fp8_kv_", case.device)
    if not backends:
        pytest.skip("no quantize_fp8_kv_ kernel on this device")
    ks, vs = kvkern.fp8_scales(k, lengths), kvkern.fp8_scales(v, lengths)
    kf = torch.empty(case.B, case.Hkv, case.L, case.D, dtype=torch.float8_e4m3fn, device=case.device)
    vf = torch.empty_like(kf)
    _op("quantize_fp8_kv_", backends[0])(k, v, lengths, ks, vs, kf, vf)
    return kf, vf, ks, vs


def fp8_read_bytes(case: Case) -> int:
    """What fp8_decode_attention must read with every head full: 1 byte per K and V element, the
    scales, q, out (q's dtype), lse (fp32) and lengths."""
    elem = torch.empty((), dtype=case.dtype).element_size()
    return 2 * case.B * case.Hkv * case.L * case.D + 2 * case.Hkv * 4 + 2 * case.B * case.Hq * case.D * elem \
        + case.B * case.Hq * 4 + case.B * case.Hkv * 4


@pytest.mark.parametrize("impl", QUANT_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def bench_fp8_decode_attention(benchmark, case, impl):
    """Issue target (H100, the CUDA case): faster than bf16 decode_attention (bench_quant_dense_peers
    kvkern/cuda/bf16-dense) by >= 1.8x; it reads half the bytes, so ~2x is the bandwidth limit."""
    _skip_unless_device(case.device)
    if impl not in _backends("fp8_decode_attention", case.device):
        pytest.skip(f"fp8_decode_attention has no {impl} kernel on {case.device} in this build")
    q, _, _, lengths = dense_inputs(case)
    kf, vf, ks, vs = fp8_cache(case)
    op = _op("fp8_decode_attention", impl)
    fn = lambda: op(q, kf, vf, ks, vs, lengths)  # noqa: E731
    # the fused op must equal dense attention over the dequantized cache
    kd = (kf.float() * ks.view(1, -1, 1, 1)).to(case.dtype)
    vd = (vf.float() * vs.view(1, -1, 1, 1)).to(case.dtype)
    expected = kvkern.decode_attention(q, kd, vd, lengths)
    torch.testing.assert_close(fn()[0].float(), expected.float(), atol=2e-2, rtol=2e-2)
    record(benchmark, case=case.name, impl=f"kvkern/{impl}/fp8-e4m3", device=case.device, fn=fn,
           nbytes=fp8_read_bytes(case), note="per-head scales")


@pytest.mark.parametrize("impl", ["cuda", "triton"])
def bench_fp8_quantize_prefill(benchmark, impl):
    case = PREFILL
    _skip_unless_device(case.device)
    if impl not in available_backends("quantize_fp8_kv_", case.device):
        pytest.skip(f"quantize_fp8_kv_ has no {impl} kernel on cuda in this build")
    _, k, v, lengths = dense_inputs(case)
    ks, vs = kvkern.fp8_scales(k, lengths), kvkern.fp8_scales(v, lengths)
    kf = torch.empty(case.B, case.Hkv, case.L, case.D, dtype=torch.float8_e4m3fn, device="cuda")
    vf = torch.empty_like(kf)
    op = _op("quantize_fp8_kv_", impl)
    fn = lambda: op(k, v, lengths, ks, vs, kf, vf)  # noqa: E731
    dense = 2 * k.numel() * k.element_size()
    record(benchmark, case=f"{case.name}_fp8", impl=f"kvkern/{impl}/fp8-e4m3", device="cuda", fn=fn,
           nbytes=dense + 2 * kf.numel(), note="read dense K,V + write the codes")


@pytest.mark.parametrize("impl", ["cuda", "triton"])
def bench_fp8_append_step(benchmark, impl):
    case = Case("cuda_bf16_B8_C32768_append", "cuda", 8, 32, 8, 128, 32768)
    _skip_unless_device(case.device)
    if impl not in available_backends("append_fp8_kv_", case.device):
        pytest.skip(f"append_fp8_kv_ has no {impl} kernel on cuda in this build")
    kf = torch.zeros(case.B, case.Hkv, case.L, case.D, dtype=torch.float8_e4m3fn, device="cuda")
    vf = torch.zeros_like(kf)
    ks = torch.ones(case.Hkv, device="cuda")
    lengths = torch.full((case.B, case.Hkv), case.L // 2 + 1, dtype=torch.int32, device="cuda")
    k_new = torch.randn(case.B, case.Hkv, case.D, device="cuda", dtype=case.dtype)
    v_new = torch.randn_like(k_new)
    op = _op("append_fp8_kv_", impl)
    fn = lambda: op(k_new, v_new, lengths, ks, ks, kf, vf)  # noqa: E731
    row = case.B * case.Hkv * case.D
    record(benchmark, case=f"{case.name}_fp8", impl=f"kvkern/{impl}/fp8-e4m3", device="cuda", fn=fn,
           nbytes=2 * row * k_new.element_size() + 2 * row + 2 * lengths.numel() * 4, note="one launch; target < 5 us")
