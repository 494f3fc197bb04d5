# SPDX-License-Identifier: Apache-2.0
"""slot_scores (every backend, every kind) against the fp64 reference; the random kind
bit for bit; keydiff's zero-norm guards; argument errors, opcheck, torch.compile."""

from __future__ import annotations

import pytest
import torch

from kvkern import reference
from kvkern.triton import scorers as triton_scorers

from eviction_utils import (DEVICE, SCORE_TOLERANCES, call, make_cache, op_backends, out_of_range_cases,
                            ragged_lengths, valid_mask, with_changes)
from utils import assert_verbose_allclose, randn

OP = "slot_scores"
BACKENDS = op_backends(OP)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = reference.SLOT_SCORE_KINDS

pytestmark = pytest.mark.skipif(not BACKENDS, reason="no slot_scores kernel on this device")


def _inverse_lowbias32(y: int) -> int:
    m = 0xFFFFFFFF
    y ^= y >> 16
    y = (y * pow(0x846CA68B, -1, 2**32)) & m
    y ^= (y >> 15) ^ (y >> 30)
    y = (y * pow(0x7FEB352D, -1, 2**32)) & m
    y ^= y >> 16
    return y


def seed_with_key(key: int) -> int:
    """A seed whose random key lowbias32(seed + 0x9E3779B9) is ``key``."""
    return (_inverse_lowbias32(key) - 0x9E3779B9) % 2**32


def check(backend, k, v, lengths, kind, seed=0, what=""):
    out = call(OP, backend, k, v, lengths, kind, seed)
    ref = reference.slot_scores(k, v, lengths, kind, seed)
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.is_contiguous()
    what = what or f"{backend} {kind} {k.dtype}"
    if kind in ("recency", "random"):
        # Exactly representable in fp32: bit for bit.
        assert torch.equal(out, ref.float()), what
    else:
        atol, rtol = SCORE_TOLERANCES[k.dtype]
        assert_verbose_allclose(out, ref, atol, rtol, what=what)
    assert (out[~valid_mask(lengths, k.shape[2])] == 0).all(), what
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, kind):
    B, Hkv, C, D = 2, 3, 37, 64
    k, v, lengths, _ = make_cache(B, Hkv, C, D, dtype, lengths=ragged_lengths(B, Hkv, C))
    seed = int(torch.randint(-2**40, 2**40, ()))
    check(backend, k, v, lengths, kind, seed, what=f"{backend} {kind} {dtype} seed={seed}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [1, 24, 128])
def test_head_dims_and_long_caches(backend, kind, D):
    B, Hkv, C = 1, 2, 131
    k, v, lengths, _ = make_cache(B, Hkv, C, D, torch.bfloat16, lengths=torch.tensor([[131, 77]]))
    check(backend, k, v, lengths, kind, 5)


@pytest.mark.parametrize("kind", ["key_norm", "keydiff", "recency", "random"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_v_cache(backend, kind):
    k, _, lengths, _ = make_cache(2, 2, 23, 64, torch.float16)
    check(backend, k, None, lengths, kind, 11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_is_bit_exact_for_many_seeds(backend):
    # uint32 arithmetic wraps identically everywhere: seeds around 0, 2^31 and 2^32 and
    # negative ones, and a key whose int32 bit pattern is 1 (a value Triton would specialize).
    B, Hkv, C = 3, 4, 257
    k, _, lengths, _ = make_cache(B, Hkv, C, 8, lengths=C)
    seeds = [0, 1, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 7, -2**63, 2**63 - 1,
             seed_with_key(0), seed_with_key(1), seed_with_key(2**31), int(torch.randint(0, 2**62, ()))]
    for seed in seeds:
        out = call(OP, backend, k, None, lengths, "random", seed)
        assert torch.equal(out, reference.random_uniform(seed, B, Hkv, C, device=DEVICE).float()), seed
        assert ((out >= 0) & (out < 1)).all()
    # Seeds equal modulo 2^32 give the same scores; others differ.
    a = call(OP, backend, k, None, lengths, "random", 3)
    assert torch.equal(a, call(OP, backend, k, None, lengths, "random", 3 + 2**32))
    assert not torch.equal(a, call(OP, backend, k, None, lengths, "random", 4))


def test_random_key_helper_matches_reference():
    assert triton_scorers.random_key(seed_with_key(1)) == 1
    assert triton_scorers.random_key(seed_with_key(2**31)) == -2**31
    for seed in (0, 1, -1, 2**31, 2**32 + 5, -2**40, 123456789):
        ref = int(reference._lowbias32(torch.tensor((seed + 0x9E3779B9) & 0xFFFFFFFF, dtype=torch.int64)))
        assert triton_scorers.random_key(seed) % 2**32 == ref


def test_random_is_uniform():
    u = reference.random_uniform(7, 4, 8, 4096).flatten()
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    hist = torch.histc(u.float(), bins=16, min=0, max=1)
    assert (hist / u.numel() - 1 / 16).abs().max() < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_keydiff_zero_norm_guards(backend, dtype):
    B, Hkv, C, D = 1, 5, 12, 64
    lengths = torch.tensor([[12, 6, 2, 0, 9]], dtype=torch.int32)
    k, v, lengths, _ = make_cache(B, Hkv, C, D, dtype, lengths=lengths)
    k[0, 0, [1, 5, 7]] = 0  # zero keys inside a normal head: unit vector 0, score 0
    k[0, 1, :6] = 0  # every key zero: anchor 0, every score 0
    k[0, 2, 1] = -k[0, 2, 0]  # two opposite keys: the anchor cancels exactly
    k[0, 4, 3] = k[0, 4, 3] * 1e-3  # a tiny key: cosine is scale-free
    out = check(backend, k, v, lengths, "keydiff")
    assert (out[0, 0, [1, 5, 7]] == 0).all()
    assert (out[0, 1] == 0).all() and (out[0, 2] == 0).all() and (out[0, 3] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_keydiff_is_invariant_to_positive_rescaling(backend):
    k, _, lengths, _ = make_cache(2, 2, 30, 64, torch.float32)
    scale = torch.rand(2, 2, 30, 1, device=DEVICE) * 10 + 0.1
    a = call(OP, backend, k, None, lengths, "keydiff")
    b = call(OP, backend, k * scale, None, lengths, "keydiff")
    assert_verbose_allclose(b, a, 1e-6, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, kind):
    B, Hkv, C, D = 2, 3, 29, 64
    k_store = randn(B, C + 6, Hkv, D + 8, dtype=torch.float16, device=DEVICE)
    v_store = randn(Hkv, B, C, D, dtype=torch.float16, device=DEVICE)
    k = k_store[:, 3:C + 3].transpose(1, 2)[..., :D]
    v = v_store.transpose(0, 1)
    lengths = ragged_lengths(B, 2 * Hkv, C)[:, ::2]
    assert not (k.is_contiguous() or v.is_contiguous() or lengths.is_contiguous())
    out = check(backend, k, v, lengths, kind, 9)
    assert torch.equal(out, call(OP, backend, k.contiguous(), v.contiguous(), lengths.contiguous(), kind, 9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_tails_never_leak(backend):
    B, Hkv, C, D = 2, 2, 21, 64
    k, v, lengths, _ = make_cache(B, Hkv, C, D, torch.bfloat16, lengths=ragged_lengths(B, Hkv, C))
    tail = ~valid_mask(lengths, C)
    k[tail] = float("inf")
    v[tail] = float("-inf")
    for kind in KINDS:
        out = check(backend, k, v, lengths, kind, 2)
        assert torch.isfinite(out).all(), kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_shapes(backend):
    for B, Hkv, C in ((0, 2, 5), (2, 2, 0), (2, 0, 5)):
        k, v, lengths, _ = make_cache(B, Hkv, C, 64, lengths=0)
        for kind in KINDS:
            assert call(OP, backend, k, v, lengths, kind, 0).shape == (B, Hkv, C)


# ---------------------------------------------------------------------------
# Argument errors, opcheck, torch.compile
# ---------------------------------------------------------------------------


def good():
    k, v, lengths, _ = make_cache(2, 2, 20, 64, torch.float32)
    return dict(k_cache=k, v_cache=v, lengths=lengths, kind="key_norm", seed=0)


def _with(**changes):
    return with_changes(good, **changes)


BAD = [
    ("kind_unknown", "kind", "one of", _with(kind=lambda a: "l2")),
    ("value_norm_without_v", "v_cache", "value_norm", _with(kind=lambda a: "value_norm", v_cache=lambda a: None)),
    ("k_rank", "k_cache", "4-D", _with(k_cache=lambda a: a["k_cache"][0])),
    ("k_dtype", "k_cache", "dtype", _with(k_cache=lambda a: a["k_cache"].to(torch.int32))),
    ("k_last_dim_strided", "k_cache", "contiguous",
     _with(k_cache=lambda a: a["k_cache"].repeat_interleave(2, -1)[..., ::2])),
    ("v_dtype_mismatch", "v_cache", "dtype", _with(v_cache=lambda a: a["v_cache"].bfloat16())),
    ("v_shape", "v_cache", "shape", _with(v_cache=lambda a: a["v_cache"][..., :32])),
    ("lengths_rank", "lengths", "2-D", _with(lengths=lambda a: a["lengths"].flatten())),
    ("lengths_dtype", "lengths", "int32", _with(lengths=lambda a: a["lengths"].long())),
    ("lengths_shape", "lengths", "shape", _with(lengths=lambda a: a["lengths"][:1])),
] + out_of_range_cases(_with)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id,arg,words,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(backend, case_id, arg, words, make):
    a = make()
    with pytest.raises((RuntimeError, ValueError)) as info:
        call(OP, backend, a["k_cache"], a["v_cache"], a["lengths"], a["kind"], a["seed"])
    msg = str(info.value)
    assert OP in msg and f" {arg}: " in msg and words in msg, msg


def test_device_mismatch_is_named():
    a = good()
    with pytest.raises(ValueError, match="v_cache: expected the device of k_cache"):
        triton_scorers.check_slot_scores_args("op", a["k_cache"], a["v_cache"].to("meta"), a["lengths"], "keydiff")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    a = good()
    op = getattr(torch.ops.kvkern, OP if backend == "cpp" else OP + "_triton").default
    for kind in KINDS:
        torch.library.opcheck(op, (a["k_cache"], a["v_cache"], a["lengths"], kind, 3))
    torch.library.opcheck(op, (a["k_cache"], None, a["lengths"], "keydiff", 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    a = good()

    def step(k, v, lengths):
        return call(OP, backend, k * 2, v, lengths, "keydiff", 0) + call(OP, backend, k, None, lengths, "random", 5)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    args = (a["k_cache"], a["v_cache"], a["lengths"])
    assert_verbose_allclose(compiled(*args), step(*args), 1e-6, 1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
def test_triton_unchecked_bad_lengths_give_nan():
    # On CUDA lengths values are never read on the host: a bad length gives NaN for that head.
    B, Hkv, C, D = 2, 2, 21, 64
    lengths = torch.tensor([[C, -1], [C + 5, 7]], dtype=torch.int32, device=DEVICE)
    k, v, _, _ = make_cache(B, Hkv, C, D, torch.float32, lengths=lengths.clamp(0, C))
    bad = (lengths < 0) | (lengths > C)
    for kind in KINDS:
        out = triton_scorers.launch_slot_scores(k, v, lengths, kind, triton_scorers.SLOT_SCORE_KINDS[kind], 3)
        assert out[bad].isnan().all(), kind
        ref = reference.slot_scores(k, v, lengths.clamp(0, C), kind, 3)
        assert_verbose_allclose(out[~bad], ref[~bad], *SCORE_TOLERANCES[torch.float32], what=kind)
