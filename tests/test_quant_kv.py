# SPDX-License-Identifier: Apache-2.0
"""quantize_kv_, dequantize_kv and append_quantized_kv_ against kvkern.reference, every backend.

Codes, metadata and means must equal the reference exactly on the live parts; the rest of
every buffer starts as garbage (NaN / random words) so nothing may rely on it."""

from __future__ import annotations

import pytest
import torch

from eviction_utils import DEVICE, op_backends
from kvkern import reference as ref
from quant_utils import as_args, call, empty_cache, live_equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_BACKENDS = op_backends("quantize_kv_")
DEQUANT_BACKENDS = op_backends("dequantize_kv")
APPEND_BACKENDS = op_backends("append_quantized_kv_")


def small(backend: str) -> bool:
    return backend == "triton" and DEVICE == "cpu"  # the Triton interpreter is slow


def sizes(group: int, backend: str):
    """(B, Hkv, D, R, C) with D and R multiples of the group, C a multiple of R."""
    D = max(64, group)
    R = group if small(backend) else 2 * group
    return 2, 3, D, R, 3 * R


def ragged_lengths(B, H, T, mean_centred):
    """Random lengths in [0, T] incl. 0 and T; equal across a batch element's heads when mean-centred."""
    if mean_centred:
        lengths = torch.randint(0, T + 1, (B, 1), dtype=torch.int32).expand(B, H).contiguous()
        lengths[0] = T
        return lengths
    lengths = torch.randint(0, T + 1, (B, H), dtype=torch.int32)
    lengths[0, 0], lengths[-1, -1] = 0, T
    return lengths


def quantize(backend, k, v, lengths, C, bits, group, R, mean_centred):
    B, H, _, D = k.shape
    cache = empty_cache(B, H, C, D, bits, group, R, mean_centred, k.dtype, k.device)
    call("quantize_kv_", backend, k, v, lengths, *as_args(cache), bits, group)
    return cache


def stored_dequant_fp32(cache, lengths, bits, group):
    # x̂ = q * scale + lo (+ mean) in fp32 from the backend's own codes, for error bounds.
    cpu = {n: (None if t is None else t.cpu()) for n, t in cache.items()}
    return ref.dequantize_kv(cpu, lengths.cpu(), bits, group, dtype=torch.float32)


def test_backends_found():
    for op in ("quantize_kv_", "dequantize_kv", "append_quantized_kv_"):
        assert "cpp" in op_backends(op), op


@pytest.mark.parametrize("backend", QUANT_BACKENDS)
@pytest.mark.parametrize("mean_centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("group", ref.QUANT_GROUPS)
@pytest.mark.parametrize("bits", ref.QUANT_BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_match_reference(backend, dtype, bits, group, mean_centred):
    B, H, D, R, C = sizes(group, backend)
    T = C - 3
    k = torch.randn(B, H, T, D).to(dtype)
    v = (torch.randn(B, H, T, D) * 3 + 1).to(dtype)
    lengths = ragged_lengths(B, H, T, mean_centred)
    want = ref.quantize_kv(k, v, lengths, C, bits, group, R, mean_centred)
    got = quantize(backend, k.to(DEVICE), v.to(DEVICE), lengths.to(DEVICE), C, bits, group, R, mean_centred)
    assert live_equal(got, want, lengths, bits, group) == []

    kd, vd = call("dequantize_kv", backend, *as_args(got), lengths.to(DEVICE), bits, group)
    assert kd.dtype == dtype and kd.shape == (B, H, C, D)
    rk, rv = ref.dequantize_kv(want, lengths, bits, group, dtype=dtype)
    live = ref.valid_slot_mask(lengths, C).unsqueeze(-1)
    assert torch.equal(torch.where(live, kd.cpu(), 0), torch.where(live, rk, 0))
    assert torch.equal(torch.where(live, vd.cpu(), 0), torch.where(live, rv, 0))

    # Round trip: |x - x̂| <= scale / 2 with the stored scale, plus the fp32 rounding of x - lo and
    # of q * scale + lo: a few ulps of |x| + |lo| + |x̂| (|lo| matters where x is near 0).
    hk, hv = stored_dequant_fp32(got, lengths, bits, group)
    eps = torch.finfo(torch.float32).eps
    for b in range(B):
        for h in range(H):
            L = int(lengths[b, h])
            nk, nv = L - L % R, max(L - R, 0)
            x, xh = k[b, h, :nk].float(), hk[b, h, :nk]
            s = want["k_scale"][b, h, : nk // group].float().repeat_interleave(group, 0)
            lo = want["k_min"][b, h, : nk // group].float().repeat_interleave(group, 0)
            assert ((x - xh).abs() <= s / 2 + 4 * eps * (x.abs() + xh.abs() + lo.abs())).all()
            x, xh = v[b, h, :nv].float(), hv[b, h, :nv]
            s = want["v_scale"][b, h, :nv].float().repeat_interleave(group, 1)
            lo = want["v_min"][b, h, :nv].float().repeat_interleave(group, 1)
            assert ((x - xh).abs() <= s / 2 + 4 * eps * (x.abs() + xh.abs() + lo.abs())).all()


@pytest.mark.parametrize("backend", QUANT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(backend, dtype):
    bits, group = 4, 32
    B, H, D, R, C = sizes(group, backend)
    T = C
    k = torch.randn(B, T, H, 2 * D).to(dtype).to(DEVICE)[..., :D].transpose(1, 2)  # non-contiguous views
    v = torch.randn(B, T, H, 2 * D).to(dtype).to(DEVICE)[..., D:].transpose(1, 2)
    lengths = ragged_lengths(B, H, T, False)
    want = ref.quantize_kv(k.cpu(), v.cpu(), lengths, C, bits, group, R, False)
    got = quantize(backend, k, v, lengths.to(DEVICE), C, bits, group, R, False)
    assert live_equal(got, want, lengths, bits, group) == []


@pytest.mark.parametrize("backend", QUANT_BACKENDS)
@pytest.mark.parametrize("bits", ref.QUANT_BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_groups_are_exact(backend, dtype, bits):
    group = 32
    B, H, D, R, C = sizes(group, backend)
    # Keys constant along tokens within each group of G (per channel); values constant
    # within each group of G channels (per token): every group has scale 0.
    kc = torch.randn(B, H, C // group, 1, D).expand(B, H, C // group, group, D).reshape(B, H, C, D).to(dtype)
    vc = torch.randn(B, H, C, D // group, 1).expand(B, H, C, D // group, group).reshape(B, H, C, D).to(dtype)
    lengths = ragged_lengths(B, H, C, False)
    got = quantize(backend, kc.to(DEVICE), vc.to(DEVICE), lengths.to(DEVICE), C, bits, group, R, False)
    kd, vd = call("dequantize_kv", backend, *as_args(got), lengths.to(DEVICE), bits, group)
    live = ref.valid_slot_mask(lengths, C).unsqueeze(-1)
    assert torch.equal(torch.where(live, kd.cpu(), 0), torch.where(live, kc, 0))
    assert torch.equal(torch.where(live, vd.cpu(), 0), torch.where(live, vc, 0))


@pytest.mark.parametrize("backend", QUANT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_single_kv_head_mean_centred_is_exact(backend, dtype):
    bits, group = 2, 32
    _, _, D, R, C = sizes(group, backend)
    B, H = 2, 1
    k, v = torch.randn(B, H, C, D).to(dtype), torch.randn(B, H, C, D).to(dtype)
    lengths = ragged_lengths(B, H, C, True)
    got = quantize(backend, k.to(DEVICE), v.to(DEVICE), lengths.to(DEVICE), C, bits, group, R, True)
    for b in range(B):
        L = int(lengths[b, 0])
        nk, nv = L - L % R, max(L - R, 0)
        assert (got["k_scale"][b, 0, : nk // group] == 0).all()  # the deviations are all 0
        assert (got["v_scale"][b, 0, :nv] == 0).all()
    kd, vd = call("dequantize_kv", backend, *as_args(got), lengths.to(DEVICE), bits, group)
    live = ref.valid_slot_mask(lengths, C).unsqueeze(-1)
    assert torch.equal(torch.where(live, kd.cpu(), 0), torch.where(live, k, 0))
    assert torch.equal(torch.where(live, vd.cpu(), 0), torch.where(live, v, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_deviations_sum_to_zero_over_heads(dtype):
    x = torch.randn(2, 5, 40, 64).to(dtype).float()
    m = ref._head_mean(x, dtype)
    dev_sum = (x - m.unsqueeze(1)).sum(1)
    # Only the rounding of the mean to the storage dtype remains: |sum| <= H * ulp(m) / 2.
    ulp = torch.finfo(dtype).eps * m.abs().clamp(min=torch.finfo(dtype).tiny)
    assert (dev_sum.abs() <= 5 * ulp / 2 + 1e-5).all()


def append_run(backend, dtype, bits, group, mean_centred, ragged=False):
    B, H, D, R, C = sizes(group, backend)
    k = torch.randn(B, H, C, D).to(dtype)
    v = (torch.randn(B, H, C, D) * 2 - 1).to(dtype)
    L0 = torch.randint(0, C // 2, (B, H if ragged else 1), dtype=torch.int32).expand(B, H).contiguous()
    L0[0] = 0  # one batch element starts empty
    n = C - 1 - int(L0.max())  # many steps: several key flushes and the value FIFO
    cache = quantize(backend, k.to(DEVICE), v.to(DEVICE), L0.to(DEVICE), C, bits, group, R, mean_centred)
    lengths = L0.to(DEVICE, copy=True)
    kdev, vdev = k.to(DEVICE), v.to(DEVICE)
    for _ in range(n):
        idx = lengths.long()[:, :, None, None].expand(B, H, 1, D)
        call("append_quantized_kv_", backend, kdev.gather(2, idx).squeeze(2), vdev.gather(2, idx).squeeze(2),
             lengths, *as_args(cache), bits, group)
    assert torch.equal(lengths.cpu(), L0 + n)
    lengths = lengths.cpu()
    want = ref.quantize_kv(k, v, lengths, C, bits, group, R, mean_centred)
    assert live_equal(cache, want, lengths, bits, group) == []
    kd, vd = call("dequantize_kv", backend, *as_args(cache), lengths.to(DEVICE), bits, group)
    rk, rv = ref.dequantize_kv(want, lengths, bits, group, dtype=dtype)
    live = ref.valid_slot_mask(lengths, C).unsqueeze(-1)
    assert torch.equal(torch.where(live, kd.cpu(), 0), torch.where(live, rk, 0))
    assert torch.equal(torch.where(live, vd.cpu(), 0), torch.where(live, rv, 0))


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
@pytest.mark.parametrize("mean_centred", [False, True], ids=["plain", "centred"])
@pytest.mark.parametrize("bits", ref.QUANT_BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_append_equals_quantize_of_longer_cache(backend, dtype, bits, mean_centred):
    append_run(backend, dtype, bits, 32, mean_centred)


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
@pytest.mark.parametrize("group", [64, 128])
def test_append_larger_groups(backend, group):
    append_run(backend, torch.bfloat16, 4, group, True)


@pytest.mark.parametrize("backend", [b for b in APPEND_BACKENDS if b == "cpp"])
def test_append_ragged_heads_plain(backend):
    # Without mean-centring each head appends at its own length.
    append_run(backend, torch.float16, 4, 32, False, ragged=True)


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
def test_append_matches_reference_steps(backend):
    bits, group, dtype = 8, 32, torch.float32
    B, H, D, R, C = sizes(group, backend)
    k, v = torch.randn(B, H, C, D), torch.randn(B, H, C, D)
    L0 = torch.full((B, H), R - 2, dtype=torch.int32)
    want = ref.quantize_kv(k, v, L0, C, bits, group, R, True)
    got = quantize(backend, k.to(DEVICE), v.to(DEVICE), L0.to(DEVICE), C, bits, group, R, True)
    lw, lg = L0.clone(), L0.to(DEVICE)
    for i in range(4):  # crosses one key flush and starts the value FIFO
        kn, vn = torch.randn(B, H, D), torch.randn(B, H, D)
        ref.append_quantized_kv_(want, lw, kn, vn, bits, group)
        call("append_quantized_kv_", backend, kn.to(DEVICE), vn.to(DEVICE), lg, *as_args(got), bits, group)
        assert torch.equal(lg.cpu(), lw)
        assert live_equal(got, want, lw, bits, group) == []


@pytest.mark.parametrize("backend", APPEND_BACKENDS)
def test_many_kv_heads_mean_centred(backend):
    # 32 kv heads (an MHA model): the mean over heads is an fp32 sum in head order / Hkv
    # everywhere; a sum in any other order (torch.mean's past 16 heads) changes fp32 means,
    # hence mins, scales and codes.
    bits, group, dtype, B, H, D, R = 4, 32, torch.float32, 1, 32, 64, 32
    C = 2 * R
    k, v = torch.randn(B, H, C, D) * 3, torch.randn(B, H, C, D) * 3
    L0 = torch.full((B, H), R - 2, dtype=torch.int32)
    want = ref.quantize_kv(k, v, L0, C, bits, group, R, True)
    got = quantize(backend, k.to(DEVICE), v.to(DEVICE), L0.to(DEVICE), C, bits, group, R, True)
    assert live_equal(got, want, L0, bits, group) == []
    lw, lg = L0.clone(), L0.to(DEVICE)
    for _ in range(3):  # one key flush (R keys of 32 heads) and the first value leaving the ring
        kn, vn = torch.randn(B, H, D) * 3, torch.randn(B, H, D) * 3
        ref.append_quantized_kv_(want, lw, kn, vn, bits, group)
        call("append_quantized_kv_", backend, kn.to(DEVICE), vn.to(DEVICE), lg, *as_args(got), bits, group)
    assert torch.equal(lg.cpu(), lw) and live_equal(got, want, lw, bits, group) == []


def test_reference_append_refuses_a_full_cache():
    bits, group, B, H, D, R, C = 4, 32, 1, 2, 64, 32, 64
    k, v = torch.randn(B, H, C, D), torch.randn(B, H, C, D)
    lengths = torch.tensor([[C - 1, C]], dtype=torch.int32)
    cache = ref.quantize_kv(k, v, lengths, C, bits, group, R, False)
    before = {n: t.clone() for n, t in cache.items() if t is not None}
    with pytest.raises(ValueError, match=r"head \[0, 1\] holds 64 tokens, capacity 64"):
        ref.append_quantized_kv_(cache, lengths, k[:, :, 0], v[:, :, 0], bits, group)
    assert lengths.tolist() == [[C - 1, C]] and all(torch.equal(cache[n], t) for n, t in before.items())


# ---- bad input -------------------------------------------------------------------------

def _valid_case(mean_centred=False, dtype=torch.float32):
    bits, group, B, H, D, R, C = 4, 32, 2, 2, 64, 32, 96
    cache = empty_cache(B, H, C, D, bits, group, R, mean_centred, dtype, DEVICE)
    k, v = torch.randn(B, H, C, D, dtype=dtype, device=DEVICE), torch.randn(B, H, C, D, dtype=dtype, device=DEVICE)
    lengths = torch.full((B, H), 40, dtype=torch.int32, device=DEVICE)
    return bits, group, cache, k, v, lengths


@pytest.mark.parametrize("op", ["quantize_kv_", "dequantize_kv", "append_quantized_kv_"])
def test_bad_input(op):
    fn = getattr(torch.ops.kvkern, op)

    def run(cache, lengths, bits, group, k=None, v=None):
        if op == "quantize_kv_":
            return fn(k, v, lengths, *as_args(cache), bits, group)
        if op == "dequantize_kv":
            return fn(*as_args(cache), lengths, bits, group)
        return fn(k[:, :, 0], v[:, :, 0], lengths, *as_args(cache), bits, group)

    bits, group, cache, k, v, lengths = _valid_case()
    run(cache, lengths.clone(), bits, group, k, v)  # the valid case passes
    with pytest.raises(RuntimeError, match=rf"{op}.*bits"):
        run(cache, lengths, 3, group, k, v)
    with pytest.raises(RuntimeError, match=rf"{op}.*group"):
        run(cache, lengths, bits, 16, k, v)
    with pytest.raises(RuntimeError, match=rf"{op}.*k_res.*multiple of group"):  # R % G != 0
        bad = dict(cache, k_res=cache["k_res"][:, :, :20], v_res=cache["v_res"][:, :, :20])
        run(bad, lengths, bits, group, k, v)
    with pytest.raises(RuntimeError, match=rf"{op}.*k_scale.*multiple of the ring"):  # C % R != 0
        bad = dict(cache, k_res=torch.zeros(2, 2, 64, 64, device=DEVICE), v_res=torch.zeros(2, 2, 64, 64, device=DEVICE))
        run(bad, lengths, bits, group, k, v)
    with pytest.raises(RuntimeError, match=rf"{op}.*head dim"):  # D % G != 0
        _, _, c2, k2, v2, _ = _valid_case()
        c2 = {n: t[..., :48] if n in ("k_res", "v_res") else t for n, t in c2.items()}
        run(c2, lengths, bits, group, k2[..., :48], v2[..., :48])
    with pytest.raises(RuntimeError, match=rf"{op}.*v_scale.*dtype"):
        run(dict(cache, v_scale=cache["v_scale"].half()), lengths, bits, group, k, v)
    with pytest.raises(RuntimeError, match=rf"{op}.*k_codes.*shape"):
        run(dict(cache, k_codes=cache["k_codes"][:, :, :-1]), lengths, bits, group, k, v)
    with pytest.raises(RuntimeError, match=rf"{op}.*lengths.*int32"):
        run(cache, lengths.long(), bits, group, k, v)
    with pytest.raises(RuntimeError, match=rf"{op}.*k_mean, v_mean"):
        run(dict(cache, k_mean=torch.zeros(2, 96, 64, device=DEVICE)), lengths, bits, group, k, v)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match=rf"{op}.*lengths.*\[0, "):
            run(cache, torch.full_like(lengths, 97), bits, group, k, v)
        # Mean-centring needs equal head lengths; a failing call writes nothing.
        bits, group, cache, k, v, lengths = _valid_case(mean_centred=True)
        lengths[1, 1] = 41
        before = {n: t.clone() for n, t in cache.items()}
        before_len = lengths.clone()
        with pytest.raises(RuntimeError, match=rf"{op}.*same number of tokens"):
            run(cache, lengths, bits, group, k, v)
        for n, t in cache.items():
            assert torch.equal(t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16),
                               before[n].view(torch.int32) if t.dtype == torch.float32 else before[n].view(torch.int16))
        assert torch.equal(lengths, before_len)


@pytest.mark.skipif(DEVICE != "cpu", reason="full-cache check reads lengths on the host")
def test_append_to_full_cache_raises():
    bits, group, cache, k, v, lengths = _valid_case()
    with pytest.raises(RuntimeError, match=r"append_quantized_kv_.*lengths.*C - 1"):
        torch.ops.kvkern.append_quantized_kv_(k[:, :, 0], v[:, :, 0], torch.full_like(lengths, 96),
                                              *as_args(cache), bits, group)


def test_quantize_rejects_mismatched_source():
    bits, group, cache, k, v, lengths = _valid_case()
    with pytest.raises(RuntimeError, match=r"quantize_kv_.*v: expected shape"):
        torch.ops.kvkern.quantize_kv_(k, v[:, :, :50], lengths, *as_args(cache), bits, group)
    with pytest.raises(RuntimeError, match=r"quantize_kv_.*k: expected dtype"):
        torch.ops.kvkern.quantize_kv_(k.half(), v, lengths, *as_args(cache), bits, group)


# ---- opcheck and torch.compile ------------------------------------------------------------

def _zero_cache(B, H, C, D, bits, group, R, mean_centred, dtype):
    # opcheck compares repeated runs; zero garbage keeps untouched parts comparable.
    cache = empty_cache(B, H, C, D, bits, group, R, mean_centred, dtype, DEVICE)
    return {n: (None if t is None else torch.zeros_like(t)) for n, t in cache.items()}


@pytest.mark.parametrize("backend", sorted(set(QUANT_BACKENDS) | set(APPEND_BACKENDS)))
@pytest.mark.parametrize("mean_centred", [False, True], ids=["plain", "centred"])
def test_opcheck(backend, mean_centred):
    from kvkern._fake import triton_twin

    name = lambda op: op if backend == "cpp" else triton_twin(op)  # noqa: E731
    bits, group, B, H, D, R, C = 4, 32, 1, 2, 64, 32, 96
    k, v = torch.randn(B, H, C, D, device=DEVICE), torch.randn(B, H, C, D, device=DEVICE)
    lengths = torch.tensor([[70, 70 if mean_centred else 33]], dtype=torch.int32, device=DEVICE)
    cache = _zero_cache(B, H, C, D, bits, group, R, mean_centred, torch.float32)
    torch.library.opcheck(getattr(torch.ops.kvkern, name("quantize_kv_")).default,
                          (k, v, lengths, *as_args(cache), bits, group))
    torch.library.opcheck(getattr(torch.ops.kvkern, name("dequantize_kv")).default,
                          (*as_args(cache), lengths, bits, group))
    # Lengths one short of a flush, so the op quantizes a key block and a value.
    lengths = torch.tensor([[R * 2 - 1] * H], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(getattr(torch.ops.kvkern, name("append_quantized_kv_")).default,
                          (k[:, :, 0], v[:, :, 0], lengths, *as_args(cache), bits, group))


@pytest.mark.parametrize("backend", sorted(set(APPEND_BACKENDS) & set(op_backends("quant_decode_attention"))))
def test_torch_compile_fullgraph_append_and_attend(backend):
    bits, group, B, H, D, R, C = 4, 32, 2, 2, 64, 32, 128
    k, v = torch.randn(B, H, C, D, device=DEVICE), torch.randn(B, H, C, D, device=DEVICE)
    L0 = torch.full((B, H), R - 1, dtype=torch.int32, device=DEVICE)
    caches = [quantize(backend, k, v, L0, C, bits, group, R, False) for _ in range(2)]
    lens = [L0.clone(), L0.clone()]
    q = torch.randn(B, 3 * H, D, device=DEVICE)

    def step(q, k_new, v_new, lengths, cache):
        call("append_quantized_kv_", backend, k_new, v_new, lengths, *as_args(cache), bits, group)
        out, lse = call("quant_decode_attention", backend, q, *as_args(cache), lengths, bits, group, None, 0)
        return out * 2, lse

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    kn, vn = torch.randn(B, H, D, device=DEVICE), torch.randn(B, H, D, device=DEVICE)
    got = compiled(q, kn, vn, lens[0], caches[0])
    want = step(q, kn, vn, lens[1], caches[1])
    assert torch.equal(lens[0], lens[1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
