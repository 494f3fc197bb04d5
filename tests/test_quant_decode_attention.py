# SPDX-License-Identifier: Apache-2.0
"""quant_decode_attention against kvkern.reference.quant_decode_attention, every backend.

The caches come from quantize_kv_ of the backend under test over garbage-filled buffers
(NaN scales / mins / rings, random code words), so every unused part is poisoned."""

from __future__ import annotations

import pytest
import torch

from eviction_utils import DEVICE, op_backends
from kvkern import reference as ref
from quant_utils import as_args, call, empty_cache
from utils import LSE_TOLERANCES, TOLERANCES, assert_verbose_allclose

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = op_backends("quant_decode_attention")


def small(backend: str) -> bool:
    return backend == "triton" and DEVICE == "cpu"


def build(backend, B, H, C, D, bits, group, R, mean_centred, dtype, lengths):
    """A quantized cache holding random k / v of ``lengths`` (quantized by the backend) and the
    reference's own quantization of the same data (zeros where unused)."""
    k = torch.randn(B, H, C, D).to(dtype)
    v = (torch.randn(B, H, C, D) * 2 + 0.5).to(dtype)
    want = ref.quantize_kv(k, v, lengths, C, bits, group, R, mean_centred)
    cache = empty_cache(B, H, C, D, bits, group, R, mean_centred, dtype, DEVICE)
    call("quantize_kv_", backend if backend in op_backends("quantize_kv_") else "cpp", k.to(DEVICE), v.to(DEVICE),
         lengths.to(DEVICE), *as_args(cache), bits, group)
    return cache, want


def check(backend, q, cache, want, lengths, bits, group, num_splits=0, sm_scale=None):
    out, lse = call("quant_decode_attention", backend, q.to(DEVICE), *as_args(cache), lengths.to(DEVICE), bits,
                    group, sm_scale, num_splits)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    r_out, r_lse = ref.quant_decode_attention(q.cpu(), want, lengths.cpu(), bits, group, sm_scale)
    atol, rtol = TOLERANCES[q.dtype]
    assert_verbose_allclose(out.cpu().double(), r_out, atol, rtol)
    atol, rtol = LSE_TOLERANCES[q.dtype]
    assert_verbose_allclose(lse.cpu().double(), r_lse.double(), atol, rtol)


def test_backends_found():
    assert "cpp" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("gqa", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ragged_lengths(backend, dtype, gqa, head_dim):
    bits, group = 4, 32
    R = 32 if small(backend) else 64
    B, H, C = 2, 3, 4 * R
    # Lengths below R, exact multiples of R, 0, C, and off-by-one around a flush.
    choices = [0, 1, R // 2, R - 1, R, R + 1, 2 * R, 2 * R + 7, C - 1, C]
    lengths = torch.tensor(choices, dtype=torch.int32)[torch.randint(0, len(choices), (B, H))]
    lengths[0, 0], lengths[-1, -1] = 0, C
    cache, want = build(backend, B, H, C, head_dim, bits, group, R, False, dtype, lengths)
    q = torch.randn(B, gqa * H, head_dim).to(dtype)
    check(backend, q, cache, want, lengths, bits, group)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mean_centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("group", ref.QUANT_GROUPS)
@pytest.mark.parametrize("bits", ref.QUANT_BITS)
def test_bits_and_groups(backend, bits, group, mean_centred):
    dtype = torch.bfloat16 if mean_centred else torch.float16
    R, D = group, max(64, group)
    B, H, C = 2, 2, 3 * R
    if mean_centred:
        lengths = torch.randint(0, C + 1, (B, 1), dtype=torch.int32).expand(B, H).contiguous()
    else:
        lengths = torch.randint(0, C + 1, (B, H), dtype=torch.int32)
    cache, want = build(backend, B, H, C, D, bits, group, R, mean_centred, dtype, lengths)
    q = torch.randn(B, 4 * H, D).to(dtype)
    check(backend, q, cache, want, lengths, bits, group)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
@pytest.mark.parametrize("tile", [32, 64])
@pytest.mark.parametrize("bits", ref.QUANT_BITS)
def test_triton_tiles_inside_a_key_group(monkeypatch, bits, tile):
    # On a GPU the Triton kernel steps through 32 or 64 tokens at a time, inside the 128-token
    # key groups (the interpreter takes whole groups): each step then reads one group's scales.
    from kvkern.triton import quant as triton_quant

    monkeypatch.setattr(triton_quant, "attention_tile", lambda group, head_dim, device: tile)
    group, R, D = 128, 128, 128
    B, H, C = 1, 2, 3 * R
    lengths = torch.tensor([[C, 2 * R + 37]], dtype=torch.int32)
    cache, want = build("triton", B, H, C, D, bits, group, R, False, torch.float16, lengths)
    check("triton", torch.randn(B, 3 * H, D).half(), cache, want, lengths, bits, group, num_splits=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_split_k(backend, num_splits):
    bits, group, R, D = 2, 32, 32, 64
    B, H, C = 2, 2, 8 * R
    lengths = torch.tensor([[C, 3 * R + 5], [0, 40]], dtype=torch.int32)
    cache, want = build(backend, B, H, C, D, bits, group, R, False, torch.float32, lengths)
    q = torch.randn(B, 3 * H, D)
    check(backend, q, cache, want, lengths, bits, group, num_splits=num_splits, sm_scale=0.3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_query(backend):
    bits, group, R, D, B, H, C = 8, 32, 32, 64, 2, 2, 96
    lengths = torch.tensor([[96, 50], [31, 64]], dtype=torch.int32)
    cache, want = build(backend, B, H, C, D, bits, group, R, False, torch.float32, lengths)
    q = torch.randn(B, D, 2 * H, 2 * D)[:, 0, :, D:]  # last dim contiguous, others strided
    check(backend, q, cache, want, lengths, bits, group)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_heads_empty(backend):
    bits, group, R, D, B, H, C = 4, 32, 32, 64, 1, 2, 64
    lengths = torch.zeros(B, H, dtype=torch.int32)
    cache, want = build(backend, B, H, C, D, bits, group, R, False, torch.float32, lengths)
    out, lse = call("quant_decode_attention", backend, torch.randn(B, 2 * H, D, device=DEVICE), *as_args(cache),
                    lengths.to(DEVICE), bits, group, None, 0)
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_bad_input():
    bits, group, R, D, B, H, C = 4, 32, 32, 64, 2, 2, 96
    lengths = torch.full((B, H), 40, dtype=torch.int32, device=DEVICE)
    cache = empty_cache(B, H, C, D, bits, group, R, True, torch.float32, DEVICE)
    q = torch.randn(B, 2 * H, D, device=DEVICE)
    op = torch.ops.kvkern.quant_decode_attention
    with pytest.raises(RuntimeError, match=r"quant_decode_attention: q: expected the number of query heads"):
        op(q[:, :3], *as_args(cache), lengths, bits, group, None, 0)
    with pytest.raises(RuntimeError, match=r"quant_decode_attention: q: expected dtype"):
        op(q.half(), *as_args(cache), lengths, bits, group, None, 0)
    with pytest.raises(RuntimeError, match=r"quant_decode_attention: q: expected shape"):
        op(q[..., :32], *as_args(cache), lengths, bits, group, None, 0)
    with pytest.raises(RuntimeError, match=r"quant_decode_attention: bits"):
        op(q, *as_args(cache), lengths, 5, group, None, 0)
    with pytest.raises(RuntimeError, match=r"quant_decode_attention: sm_scale"):
        op(q, *as_args(cache), lengths, bits, group, float("inf"), 0)
    with pytest.raises(RuntimeError, match=r"quant_decode_attention: num_splits"):
        op(q, *as_args(cache), lengths, bits, group, None, -1)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match=r"quant_decode_attention: lengths.*\[0, C\]"):
            op(q, *as_args(cache), torch.full_like(lengths, C + 1), bits, group, None, 0)
        bad = lengths.clone()
        bad[0, 1] = 41
        with pytest.raises(RuntimeError, match=r"quant_decode_attention: lengths.*same number of tokens"):
            op(q, *as_args(cache), bad, bits, group, None, 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mean_centred", [False, True], ids=["plain", "centred"])
def test_opcheck(backend, mean_centred):
    from kvkern._fake import triton_twin

    bits, group, R, D, B, H, C = 4, 32, 32, 64, 1, 2, 96
    lengths = torch.tensor([[70, 70 if mean_centred else 20]], dtype=torch.int32)
    k, v = torch.randn(B, H, C, D), torch.randn(B, H, C, D)
    cache = ref.quantize_kv(k, v, lengths, C, bits, group, R, mean_centred)  # zeros where unused
    cache = {n: (None if t is None else t.to(DEVICE)) for n, t in cache.items()}
    q = torch.randn(B, 3 * H, D, device=DEVICE)
    name = "quant_decode_attention" if backend == "cpp" else triton_twin("quant_decode_attention")
    torch.library.opcheck(getattr(torch.ops.kvkern, name).default,
                          (q, *as_args(cache), lengths.to(DEVICE), bits, group, None, 2))


CUDA_KERNELS = ["scalar", "tc"]  # QUANT_CUDA.md: v1 (CUDA cores) and v2 (tensor cores, the 16-bit default)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="no CUDA kernel in this build / no GPU")
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("mean_centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("bits", ref.QUANT_BITS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_both_cuda_kernels(monkeypatch, kernel, dtype, bits, mean_centred):
    monkeypatch.setenv("KVKERN_QUANT_DECODE_KERNEL", kernel)
    group, R, D = 64, 128, 128
    B, H, C = 3, 2, 4 * R
    lengths = torch.tensor([C, 2 * R + 37, 0], dtype=torch.int32).view(B, 1).expand(B, H).contiguous()
    if not mean_centred:
        lengths[1, 1] = 5
    cache, want = build("cuda", B, H, C, D, bits, group, R, mean_centred, dtype, lengths)
    for gqa, splits in ((1, 0), (4, 3), (8, 1)):
        q = torch.randn(B, gqa * H, D).to(dtype)
        check("cuda", q, cache, want, lengths, bits, group, num_splits=splits)


@pytest.mark.skipif("cuda" not in BACKENDS, reason="no CUDA kernel in this build / no GPU")
def test_cuda_kernel_switch_errors(monkeypatch):
    lengths = torch.full((1, 1), 40, dtype=torch.int32)
    q = torch.randn(1, 1, 64)
    cache, want = build("cuda", 1, 1, 128, 64, 4, 32, 32, False, torch.float32, lengths)
    monkeypatch.setenv("KVKERN_QUANT_DECODE_KERNEL", "tc")
    with pytest.raises(RuntimeError, match="KVKERN_QUANT_DECODE_KERNEL=tc.*fp16 or bf16"):
        check("cuda", q, cache, want, lengths, 4, 32)
    monkeypatch.setenv("KVKERN_QUANT_DECODE_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="KVKERN_QUANT_DECODE_KERNEL: expected auto, scalar or tc"):
        check("cuda", q, cache, want, lengths, 4, 32)
