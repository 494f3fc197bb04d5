# SPDX-License-Identifier: Apache-2.0
"""The CUDA C++ quantized-KV kernels (csrc/include/kvkern/quant_kv.cuh), run on
the CPU by the fiber emulator (tools/cuda_emu/quant_emu.cpp) against
kvkern.reference.

What runs is the real launch sequence (run_quant_decode_attention /
run_quantize_kv / run_append_quantized_kv: checks, split planning, dispatch)
and every kernel it launches, thread by thread, blocks in a random order,
shared memory poisoned; only the <<<>>> line is replaced. Codes and metadata
of the live parts must equal the reference exactly; attention within an fp32
tolerance. Needs g++ and the CUDA headers, no GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kvkern import reference
from tests.quant_utils import empty_cache, live_equal

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("kvkern_quant_emu", ROOT / "tools" / "cuda_emu" / "quant_emu.py")
E = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(E)

pytestmark = pytest.mark.skipif(E.available() is not None, reason=f"quant emulator: {E.available()}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def _built():
    E.build()


def _seed():
    return int(torch.randint(0, 2**30, ()))


def _lengths(B, H, C, T, centred, R):
    if centred:  # equal lengths across the heads of a batch element
        choices = torch.tensor([0, R - 1, R, R + 5, 2 * R + 7, T])
        per_b = choices[torch.randint(0, len(choices), (B,))].clamp(max=T)
        per_b[0] = T
        return per_b.view(B, 1).expand(B, H).contiguous().to(torch.int32)
    L = torch.randint(0, T + 1, (B, H), dtype=torch.int32)
    L.view(-1)[0] = T
    if L.numel() > 1:
        L.view(-1)[1] = 0
    if L.numel() > 2:
        L.view(-1)[2] = R
    return L


def _dense(B, H, T, D, dtype, lengths):
    k = (torch.randn(B, H, T, D) * 2 + 0.5).to(dtype)
    v = torch.randn(B, H, T, D).to(dtype)
    valid = torch.arange(T).view(1, 1, T) < lengths.unsqueeze(-1)
    k[~valid] = float("nan")
    v[~valid] = float("nan")
    return k, v


CASES = [  # (B, H, C, D, bits, group, R, centred)
    (2, 2, 128, 64, 4, 32, 32, False),
    (2, 3, 192, 64, 2, 64, 64, False),
    (2, 2, 256, 128, 8, 32, 64, False),
    (2, 2, 128, 64, 4, 32, 64, True),
    (1, 3, 128, 64, 2, 32, 32, True),
    (1, 2, 256, 128, 4, 128, 128, False),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference(case, dtype):
    B, H, C, D, bits, G, R, centred = case
    T = C - R // 2 if not centred else C
    lengths = _lengths(B, H, C, T, centred, R)
    k, v = _dense(B, H, T, D, dtype, lengths)
    want = reference.quantize_kv(k, v, lengths, C, bits, G, R, centred)
    got = empty_cache(B, H, C, D, bits, G, R, centred, dtype, "cpu")
    launches = E.run("quantize", got, lengths, bits, G, k=k, v=v, seed=_seed())
    assert len(launches) == (4 if centred else 3)
    assert live_equal(got, want, lengths, bits, G) == []


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_append_matches_reference(case, dtype):
    B, H, C, D, bits, G, R, centred = case
    # start just before a ring boundary so a few steps cover: value quantization,
    # a key flush, and plain ring writes (never past the capacity)
    start = torch.tensor([R - 2, min(2 * R - 1, C - 4)][:B] + [R - 1] * max(B - 2, 0), dtype=torch.int32)
    lengths = start.view(B, 1).expand(B, H).contiguous()
    T = int(lengths.max())
    k, v = _dense(B, H, T, D, dtype, lengths)
    want = reference.quantize_kv(k, v, lengths, C, bits, G, R, centred)
    got = empty_cache(B, H, C, D, bits, G, R, centred, dtype, "cpu")
    E.run("quantize", got, lengths, bits, G, k=k, v=v, seed=_seed())
    want_len, got_len = lengths.clone(), lengths.clone()
    for step in range(4):
        k_new = torch.randn(B, H, D).to(dtype)
        v_new = torch.randn(B, H, D).to(dtype)
        reference.append_quantized_kv_(want, want_len, k_new, v_new, bits, G)
        launches = E.run("append", got, got_len, bits, G, k_new=k_new, v_new=v_new, seed=_seed())
        assert len(launches) == 1  # one launch per decode step
        assert torch.equal(got_len, want_len)
        assert live_equal(got, want, got_len, bits, G) == [], f"step {step}"


# (dtype, kernel_variant): 1 = the scalar kernel (v1), 2 = the tensor-core kernel (fp16 / bf16).
KERNELS = [(torch.float32, 1), (torch.float16, 1), (torch.bfloat16, 1), (torch.float16, 2), (torch.bfloat16, 2)]
KERNEL_NAME = {1: "quant_decode_kernel<", 2: "quant_decode_tc_kernel<"}


def _attention_case(case, dtype, G_q, T=None):
    B, H, C, D, bits, G, R, centred = case
    T = C if T is None else T
    lengths = _lengths(B, H, C, T, centred, R)
    k, v = _dense(B, H, T, D, dtype, lengths)
    cache = empty_cache(B, H, C, D, bits, G, R, centred, dtype, "cpu")
    E.run("quantize", cache, lengths, bits, G, k=k, v=v, seed=_seed())
    q = torch.randn(B, H * G_q, D).to(dtype)
    return cache, lengths, q


def _check_attention(cache, lengths, q, bits, G, want, variant, splits=(1, 3, 0), expect=None, **kw):
    want_out, want_lse = want
    dtype = q.dtype
    for S in splits:
        out, lse, launches = E.run("attention", cache, lengths, bits, G, q=q, num_splits=S, seed=_seed(),
                                   kernel_variant=variant, **kw)
        assert (expect or KERNEL_NAME[variant]) in launches[0], launches
        assert len(launches) == (1 if S == 1 else 2) or (S == 0 and len(launches) == 1)
        # The tensor-core kernel feeds q * k_scale and p * v_scale to bf16 MMAs as hi + lo pairs
        # (x - hi - lo <= 2^-18 |x|), so a logit is off by <= 2^-18 * sum_d |code_d q_d k_scale_d|,
        # ~1e-5 on these shapes (rms far less): inside the lse tolerance below, which is v1's. Codes,
        # means and ring rows enter exactly (codes <= 255 are exact in bf16; q . mean and q . ring
        # run in T's own MMA), and out's 1e-2 is T's rounding of the result.
        tol = 1e-4 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), want_out.to(dtype).double(), atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), want_lse.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{str(k[0]).split('.')[-1]}-v{k[1]}")
@pytest.mark.parametrize("G_q", [1, 3, 4, 8])
def test_attention_matches_reference(case, kernel, G_q):
    dtype, variant = kernel
    if G_q == 8 and variant == 1 and dtype != torch.bfloat16:
        pytest.skip("v1 at G_q = 8 is covered by bf16")
    B, H, C, D, bits, G, R, centred = case
    cache, lengths, q = _attention_case(case, dtype, G_q)
    want = reference.quant_decode_attention(q, cache, lengths, bits, G)
    _check_attention(cache, lengths, q, bits, G, want, variant)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_tc_head_dim_256_and_emulator_modes(dtype):
    """D = 256 (the 2-stage ring), and the other emulator schedules: cp.async landing at issue,
    blocks in order and reversed."""
    case = (1, 2, 128, 256, 4, 64, 64, False)
    cache, lengths, q = _attention_case(case, dtype, 3)
    want = reference.quant_decode_attention(q, cache, lengths, 4, 64)
    _check_attention(cache, lengths, q, 4, 64, want, 2, splits=(1,))
    _check_attention(cache, lengths, q, 4, 64, want, 2, splits=(2,), deferred=False, block_order=1)
    case = (1, 2, 128, 128, 8, 32, 32, True)
    cache, lengths, q = _attention_case(case, dtype, 5)
    want = reference.quant_decode_attention(q, cache, lengths, 8, 32)
    _check_attention(cache, lengths, q, 8, 32, want, 2, splits=(3,), deferred=False, block_order=0)


def _restride(t, elem_offset):
    """t's values in a fresh buffer at an element offset, rows padded by one element (so no
    16-byte, and with an odd offset no 4-byte, alignment of rows or base)."""
    if t is None:
        return None
    shape = list(t.shape)
    padded = shape[:-1] + [shape[-1] + 1]
    n = 1
    for x in padded:
        n *= x
    buf = torch.empty(n + elem_offset, dtype=t.dtype)
    view = buf[elem_offset:].view(padded)[..., : shape[-1]]
    view.copy_(t)
    return view


@pytest.mark.parametrize("centred", [False, True])
def test_attention_tc_unaligned_views(centred):
    """Views whose rows are not 16-byte (codes) or 4-byte (16-bit tensors) aligned take the 4-byte
    cp.async and the synchronous 2-byte staging paths; the result is the same."""
    dtype = torch.bfloat16
    case = (1, 2, 128, 64, 4, 32, 32, centred)
    cache, lengths, q = _attention_case(case, dtype, 4)
    want = reference.quant_decode_attention(q, cache, lengths, 4, 32)
    odd = {name: _restride(t, 1) for name, t in cache.items()}
    _check_attention(odd, lengths, q, 4, 32, want, 2, splits=(1,))
    _check_attention(odd, lengths, q, 4, 32, want, 1, splits=(1,))


def test_attention_kernel_choice():
    """auto (0): the tensor-core kernel for fp16 / bf16, the scalar one for fp32; the tensor-core
    kernel asked for fp32, or an unknown variant, is refused."""
    case = (1, 2, 128, 64, 2, 32, 32, False)
    for dtype, name in [(torch.float32, KERNEL_NAME[1]), (torch.float16, KERNEL_NAME[2]),
                        (torch.bfloat16, KERNEL_NAME[2])]:
        cache, lengths, q = _attention_case(case, dtype, 2)
        _, _, launches = E.run("attention", cache, lengths, 2, 32, q=q, num_splits=1, kernel_variant=0)
        assert name in launches[0], launches
    cache, lengths, q = _attention_case(case, torch.float32, 2)
    with pytest.raises(E.Refused):
        E.run("attention", cache, lengths, 2, 32, q=q, num_splits=1, kernel_variant=2)
    with pytest.raises(E.Refused):
        E.run("attention", cache, lengths, 2, 32, q=q, num_splits=1, kernel_variant=3)


def test_attention_auto_falls_back_where_the_tc_kernel_does_not_fit():
    """8-bit D = 256 needs 165 KB of shared memory per CTA in the tensor-core kernel: on a GPU
    with 99 KB (sm_86 / sm_89 / sm_120) auto runs the scalar kernel, forcing v2 is refused;
    4-bit D = 256 (98 KB) still takes v2 there."""
    sm89 = 99 * 1024
    case = (1, 2, 64, 256, 8, 32, 32, False)
    cache, lengths, q = _attention_case(case, torch.bfloat16, 2)
    want = reference.quant_decode_attention(q, cache, lengths, 8, 32)
    _check_attention(cache, lengths, q, 8, 32, want, 0, splits=(1,), smem_limit=sm89, expect=KERNEL_NAME[1])
    _check_attention(cache, lengths, q, 8, 32, want, 0, splits=(1,), expect=KERNEL_NAME[2])  # an H100
    with pytest.raises(E.Refused):
        E.run("attention", cache, lengths, 8, 32, q=q, num_splits=1, kernel_variant=2, smem_limit=sm89)
    case = (1, 2, 64, 256, 4, 32, 32, False)
    cache, lengths, q = _attention_case(case, torch.float16, 2)
    want = reference.quant_decode_attention(q, cache, lengths, 4, 32)
    _check_attention(cache, lengths, q, 4, 32, want, 0, splits=(1,), smem_limit=sm89, expect=KERNEL_NAME[2])


@pytest.mark.parametrize("kernel", [(torch.float32, 1), (torch.bfloat16, 2)], ids=["fp32-v1", "bf16-v2"])
def test_attention_bad_length_gives_nan_not_a_crash(kernel):
    dtype, variant = kernel
    B, H, C, D, bits, G, R = 1, 2, 128, 64, 4, 32, 32
    lengths = torch.tensor([[C, 0]], dtype=torch.int32)
    k, v = _dense(B, H, C, D, dtype, lengths)
    cache = empty_cache(B, H, C, D, bits, G, R, False, dtype, "cpu")
    E.run("quantize", cache, lengths, bits, G, k=k, v=v)
    lengths[0, 0] = C + 5
    out, lse, _ = E.run("attention", cache, lengths, bits, G, q=torch.randn(B, H, D).to(dtype), num_splits=2,
                        kernel_variant=variant)
    assert torch.isnan(out[0, 0]).all() and torch.isnan(lse[0, 0])
    assert (out[0, 1] == 0).all() and lse[0, 1] == float("-inf")


@pytest.mark.parametrize("bad", [dict(bits=3), dict(group=16), dict(head_dim_q=9)])
def test_refuses_unsupported(bad):
    B, H, C, D, G, R = 1, 1, 64, 64, 32, 32
    bits = bad.get("bits", 4)
    cache = empty_cache(B, H, C, D, 4, G, R, False, torch.float32, "cpu")
    lengths = torch.zeros(B, H, dtype=torch.int32)
    q = torch.randn(B, 9 if "head_dim_q" in bad else 1, D)
    with pytest.raises(E.Refused):
        E.run("attention", cache, lengths, bits, bad.get("group", G), q=q, num_splits=1)


# ---- the FP8 cache's CUDA kernels (csrc/include/kvkern/fp8_kv.cuh) -------------------------------
# cuda_fp8.h's conversions run their host (software) paths in the emulator, so these check the
# kernels' indexing, the split / merge plan and the scale folding; the hardware cvt instructions
# themselves are checked on a GPU only (tests/test_fp8_kv.py there).

def _fp8_cache(B, H, C, D, dtype, lengths, T):
    k = (torch.randn(B, H, T, D) * 3).to(dtype)
    v = torch.randn(B, H, T, D).to(dtype)
    ks, vs = reference.fp8_scales(k, lengths), reference.fp8_scales(v, lengths)
    kf = torch.full((B, H, C, D), 0x7F, dtype=torch.uint8)
    return k, v, ks, vs, kf, kf.clone()


def _live_codes_equal(got, want, lengths):
    B, H = lengths.shape
    return all(torch.equal(got[b, h, :lengths[b, h]], want.view(torch.uint8)[b, h, :lengths[b, h]])
               and bool((got[b, h, lengths[b, h]:] == 0x7F).all()) for b in range(B) for h in range(H))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_quantize_and_append_exact(dtype):
    B, H, C, D, T = 2, 3, 40, 48, 33
    lengths = torch.tensor([[33, 0, 7], [1, 32, 20]], dtype=torch.int32)
    k, v, ks, vs, kf, vf = _fp8_cache(B, H, C, D, dtype, lengths, T)
    k[:, :, :, 0] = torch.tensor([float("inf"), 1e6, -1e6, 2.0 ** -12])[torch.arange(T) % 4].to(dtype)
    want = reference.quantize_fp8_kv(k, v, lengths, C, ks, vs)
    E.run_fp8("quantize", kf, vf, ks, vs, lengths, k=k, v=v, seed=_seed())
    assert _live_codes_equal(kf, want["k_fp8"], lengths) and _live_codes_equal(vf, want["v_fp8"], lengths)
    want_len = lengths.clone()
    for _ in range(7):  # the 33-token head ends full
        kn, vn = torch.randn(B, H, D).to(dtype), torch.randn(B, H, D).to(dtype)
        reference.append_fp8_kv_(want, want_len, kn, vn)
        E.run_fp8("append", kf, vf, ks, vs, lengths, k=kn, v=vn, seed=_seed())
        assert torch.equal(lengths, want_len)
    assert _live_codes_equal(kf, want["k_fp8"], lengths) and _live_codes_equal(vf, want["v_fp8"], lengths)


def test_fp8_append_full_head_is_a_noop():
    B, H, C, D = 1, 2, 4, 64
    lengths = torch.tensor([[4, 2]], dtype=torch.int32)
    k, v, ks, vs, kf, vf = _fp8_cache(B, H, C, D, torch.float32, lengths, C)
    E.run_fp8("append", kf, vf, ks, vs, lengths, k=torch.randn(B, H, D), v=torch.randn(B, H, D))
    assert lengths.tolist() == [[4, 3]]
    assert bool((kf[0, 0] == 0x7F).all()) and bool((kf[0, 1, 3] == 0x7F).all()) and not bool((kf[0, 1, 2] == 0x7F).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("G", [1, 3, 8, 12])
def test_fp8_attention(dtype, D, G):
    B, H, C = 2, 2, 150
    lengths = torch.tensor([[150, 0], [1, 97]], dtype=torch.int32)
    k, v, ks, vs, kf, vf = _fp8_cache(B, H, C, D, dtype, lengths, C)
    E.run_fp8("quantize", kf, vf, ks, vs, lengths, k=k, v=v)
    cache = {"k_fp8": kf.view(torch.float8_e4m3fn), "v_fp8": vf.view(torch.float8_e4m3fn), "k_scale": ks,
             "v_scale": vs}
    q = torch.randn(B, H * G, D).to(dtype)
    r_out, r_lse = reference.fp8_decode_attention(q, cache, lengths)
    for S in (0, 1, 3):
        out, lse, launches = E.run_fp8("attention", kf, vf, ks, vs, lengths, q=q, num_splits=S, seed=_seed())
        tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(out.double(), r_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.double(), r_lse.double(), atol=2e-5, rtol=2e-5)
        assert ("quant_merge_kernel" in "".join(launches)) == (S != 1 and len(launches) > 1)


def test_fp8_attention_refuses_misaligned_rows():
    B, H, C, D = 1, 1, 8, 64
    lengths = torch.tensor([[8]], dtype=torch.int32)
    k, v, ks, vs, kf, vf = _fp8_cache(B, H, C, D, torch.float32, lengths, C)
    base = torch.zeros(B * H * C * D + 4, dtype=torch.uint8)
    odd = base[4:].view(B, H, C, D)  # 4-byte offset: uint2 loads would be misaligned
    with pytest.raises(E.Refused):
        E.run_fp8("attention", odd, vf, ks, vs, lengths, q=torch.randn(B, H, D), num_splits=1)
