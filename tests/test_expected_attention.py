# SPDX-License-Identifier: Apache-2.0
"""expected_attention_scores (every backend) against the fp64 reference, the spec's
§3(e) oracles, argument errors, opcheck, torch.compile, and a check on real activations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kvkern import reference
from kvkern.triton import scorers as triton_scorers

from eviction_utils import (DEVICE, SCORE_TOLERANCES, call, make_cache, op_backends, out_of_range_cases,
                            ragged_lengths, valid_mask, with_changes)
from utils import assert_verbose_allclose, randn

OP = "expected_attention_scores"
BACKENDS = op_backends(OP)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUPS = (1, 3, 4, 8)

pytestmark = pytest.mark.skipif(not BACKENDS, reason="no expected_attention_scores kernel on this device")


def make_stats(B, Hq, D, cov=True, device=DEVICE, mean_scale=2.0):
    """Random fp32 ``mean [B, Hq, D]`` and a PSD ``cov [B, Hq, D, D]`` (eigenvalues around 1)."""
    mean = randn(B, Hq, D, device=device, scale=mean_scale)
    if not cov:
        return mean, None
    a = randn(B, Hq, D, D, device=device)
    return mean, (a @ a.transpose(-1, -2) / D).contiguous()


def check(backend, mean, cov, k, v, lengths, n_sink=4, epsilon=0.0, sm_scale=None, what=""):
    out = call(OP, backend, mean, cov, k, v, lengths, n_sink, epsilon, sm_scale)
    ref = reference.expected_attention_scores(mean, cov, k, v, lengths, n_sink, epsilon, sm_scale)
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.is_contiguous()
    atol, rtol = SCORE_TOLERANCES[k.dtype]
    assert_verbose_allclose(out, ref, atol, rtol, what=what or f"{backend} {k.dtype}")
    return out


# ---------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, G):
    B, Hkv, C, D = 2, 2, 37, 64
    k, v, lengths, _ = make_cache(B, Hkv, C, D, dtype, lengths=ragged_lengths(B, Hkv, C))
    mean, cov = make_stats(B, Hkv * G, D)
    n_sink = int(torch.randint(0, 6, ()))
    epsilon = float(torch.rand(())) * 1e-2
    check(backend, mean, cov, k, v, lengths, n_sink, epsilon, what=f"{backend} {dtype} G={G} n_sink={n_sink}")


@pytest.mark.parametrize("variant", ["no_cov", "no_v", "neither"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_terms(backend, dtype, variant):
    # cov=None drops the quadratic term; v_cache=None the value-norm weighting.
    B, Hkv, G, C, D = 2, 2, 3, 37, 64
    k, v, lengths, _ = make_cache(B, Hkv, C, D, dtype, lengths=ragged_lengths(B, Hkv, C))
    mean, cov = make_stats(B, Hkv * G, D, cov=variant == "no_v")
    check(backend, mean, cov, k, None if variant != "no_cov" else v, lengths, 4, 1e-3,
          what=f"{backend} {dtype} {variant}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [1, 24, 80, 128])
def test_head_dims(backend, D):
    # Not only powers of two: the kernels mask the padding of the head dim.
    B, Hkv, G, C = 1, 2, 3, 45
    k, v, lengths, _ = make_cache(B, Hkv, C, D, torch.float32, lengths=ragged_lengths(B, Hkv, C))
    mean, cov = make_stats(B, Hkv * G, D)
    check(backend, mean, cov, k, v, lengths, n_sink=2, epsilon=1e-3, what=f"{backend} D={D}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_cache_and_sm_scale(backend):
    # Several slot tiles per head on every backend.
    B, Hkv, G, C, D = 1, 2, 2, 301, 64
    k, v, lengths, _ = make_cache(B, Hkv, C, D, torch.bfloat16, lengths=torch.tensor([[301, 170]]))
    mean, cov = make_stats(B, Hkv * G, D)
    check(backend, mean, cov, k, v, lengths, n_sink=4, sm_scale=0.05)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinks_and_edges(backend):
    B, Hkv, G, C, D = 1, 4, 2, 19, 64
    lengths = torch.tensor([[0, 3, 4, 19]], dtype=torch.int32, device=DEVICE)
    k, v, lengths, _ = make_cache(B, Hkv, C, D, torch.float32, lengths=lengths)
    mean, cov = make_stats(B, Hkv * G, D)
    valid = valid_mask(lengths, C)
    slot = torch.arange(C, device=DEVICE).view(1, 1, C)
    for n_sink in (0, 4, C, C + 1000, 2**40):
        out = check(backend, mean, cov, k, v, lengths, n_sink, 0.0, what=f"{backend} n_sink={n_sink}")
        assert torch.equal(torch.isposinf(out), valid & (slot < n_sink))
        assert (out[~valid] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_poisoned_tails_never_leak(backend):
    # Inf as well as NaN past lengths, in K and V: every score stays finite (bar sinks).
    B, Hkv, G, C, D = 2, 3, 3, 33, 64
    lengths = ragged_lengths(B, Hkv, C)
    k, v, lengths, _ = make_cache(B, Hkv, C, D, torch.float16, lengths=lengths)
    tail = ~valid_mask(lengths, C)
    k[tail] = float("inf")
    v[tail] = float("-inf")
    mean, cov = make_stats(B, Hkv * G, D)
    out = check(backend, mean, cov, k, v, lengths, 2, 1e-3)
    assert not out.isnan().any() and (out[tail] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    B, Hkv, G, C, D = 2, 3, 2, 29, 64
    Hq = Hkv * G
    k_store = randn(B, C + 6, Hkv, D + 8, dtype=torch.bfloat16, device=DEVICE)
    v_store = randn(Hkv, B, C, D, dtype=torch.bfloat16, device=DEVICE)
    k = k_store[:, 3:C + 3].transpose(1, 2)[..., :D]  # [B, Hkv, C, D], slots and heads swapped
    v = v_store.transpose(0, 1)
    mean = randn(B, Hq, D + 5, device=DEVICE, scale=2.0)[..., 2:D + 2]
    a = randn(B, Hq, D, D, device=DEVICE)
    cov_store = torch.zeros(Hq, B, D, D + 4, device=DEVICE)
    cov_store[..., :D] = (a @ a.transpose(-1, -2) / D).transpose(0, 1)
    cov = cov_store.transpose(0, 1)[..., :D]
    lengths = ragged_lengths(B, 2 * Hkv, C)[:, ::2]
    assert not (k.is_contiguous() or v.is_contiguous() or mean.is_contiguous() or cov.is_contiguous()
                or lengths.is_contiguous())
    out = check(backend, mean, cov, k, v, lengths, 3, 1e-2)
    dense = call(OP, backend, mean.contiguous(), cov.contiguous(), k.contiguous(), v.contiguous(),
                 lengths.contiguous(), 3, 1e-2, None)
    assert torch.equal(out, dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_shapes(backend):
    mean, cov = make_stats(0, 4, 64)
    k, v, lengths, _ = make_cache(0, 2, 7, 64)
    assert call(OP, backend, mean, cov, k, v, lengths).shape == (0, 2, 7)
    mean, cov = make_stats(2, 4, 64)
    k, v, lengths, _ = make_cache(2, 2, 0, 64, lengths=0)
    assert call(OP, backend, mean, cov, k, v, lengths).shape == (2, 2, 0)


# ---------------------------------------------------------------------------
# §3(e) oracles
# ---------------------------------------------------------------------------


def test_mgf_identity_monte_carlo():
    # E[exp(s q.k)] for q ~ N(mu, Sigma) is exp(s mu.k + s^2/2 k^T Sigma k); so the reference's
    # softmax over slots equals the normalised Monte-Carlo expectations.
    d, n_keys, samples = 8, 5, 400_000
    s = d ** -0.5
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    mu = torch.randn(d, dtype=torch.float64, generator=gen) * 0.5
    a = torch.randn(d, d, dtype=torch.float64, generator=gen) * 0.3
    sigma = a @ a.T
    keys = torch.randn(n_keys, d, dtype=torch.float64, generator=gen)
    q = mu + torch.randn(samples, d, dtype=torch.float64, generator=gen) @ torch.linalg.cholesky(sigma).T
    e = torch.exp(s * q @ keys.T)  # [samples, n_keys]
    mc, se = e.mean(0), e.std(0) / math.sqrt(samples)
    closed = torch.exp(s * keys @ mu + 0.5 * s * s * torch.einsum("nd,de,ne->n", keys, sigma, keys))
    assert ((mc - closed).abs() < 5 * se).all(), (mc, closed, se)

    scores = reference.expected_attention_scores(mu.view(1, 1, d), sigma.view(1, 1, d, d), keys.view(1, 1, n_keys, d),
                                                 None, torch.tensor([[n_keys]]), n_sink=0)
    torch.testing.assert_close(scores.view(-1), closed / closed.sum(), rtol=1e-12, atol=0)
    # The Monte-Carlo weights agree within their (propagated) sampling error.
    assert ((scores.view(-1) - mc / mc.sum()).abs() < 10 * se / mc.sum()).all()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def _rope(x, position, inv_freq, rotary_dim):
    """HF's rotate-half RoPE at one position on the first ``rotary_dim`` channels."""
    ang = position * inv_freq
    cos = torch.cat((torch.cos(ang), torch.cos(ang)))
    sin = torch.cat((torch.sin(ang), torch.sin(ang)))
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), -1)


@pytest.mark.parametrize("rotary_dim", [16, 10])  # full and partial rotary
def test_average_rotation_is_mean_of_ropes(rotary_dim):
    D, start, F = 16, 37, 64
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    x = torch.randn(2, 3, D, dtype=torch.float64)
    mu, sig = reference.average_rope(x, None, inv_freq, start, F)
    assert sig is None
    expected = torch.stack([_rope(x, p, inv_freq, rotary_dim) for p in range(start, start + F)]).mean(0)
    torch.testing.assert_close(mu, expected, rtol=0, atol=1e-13)
    # The covariance is the same R̄ on both sides: R̄ Σ R̄ᵀ from R̄'s columns.
    cov = torch.randn(2, 3, D, D, dtype=torch.float64)
    _, sig = reference.average_rope(x, cov, inv_freq, start, F)
    eye = torch.eye(D, dtype=torch.float64)
    r_bar = torch.stack([_rope(eye, p, inv_freq, rotary_dim) for p in range(start, start + F)]).mean(0).T
    torch.testing.assert_close(sig, r_bar @ cov @ r_bar.T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_covariance_is_plain_softmax(backend):
    B, Hkv, C, D, n_sink = 2, 2, 31, 64, 3
    k, _, lengths, _ = make_cache(B, Hkv, C, D, torch.float32, lengths=torch.tensor([[31, 12], [5, 20]]))
    mean, _ = make_stats(B, Hkv, D)
    zero = torch.zeros(B, Hkv, D, D, device=DEVICE)
    with_zero = call(OP, backend, mean, zero, k, None, lengths, n_sink)
    without = call(OP, backend, mean, None, k, None, lengths, n_sink)
    torch.testing.assert_close(with_zero, without, rtol=1e-6, atol=1e-7)
    for b in range(B):
        for j in range(Hkv):
            L = int(lengths[b, j])
            logits = D ** -0.5 * k[b, j, n_sink:L].double() @ mean[b, j].double()
            torch.testing.assert_close(without[b, j, n_sink:L].double(), torch.softmax(logits, 0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("G", GROUPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_sink_scores_sum_to_one(backend, G):
    B, Hkv, C, D, n_sink = 2, 2, 41, 64, 4
    lengths = torch.tensor([[41, 5], [4, 17]], dtype=torch.int32)
    k, _, lengths, _ = make_cache(B, Hkv, C, D, torch.bfloat16, lengths=lengths)
    mean, cov = make_stats(B, Hkv * G, D)
    out = call(OP, backend, mean, cov, k, None, lengths, n_sink)
    total = out[..., n_sink:].double().sum(-1)
    expected = (lengths > n_sink).double()  # heads with no scored slot sum to 0
    torch.testing.assert_close(total, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_norm_scale_invariance(backend):
    B, Hkv, G, C, D = 1, 2, 3, 50, 64
    k, v, lengths, _ = make_cache(B, Hkv, C, D, torch.float32, lengths=C)
    mean, cov = make_stats(B, Hkv * G, D)
    base = call(OP, backend, mean, cov, k, v, lengths, 4, 1e-3)
    scaled = call(OP, backend, mean, cov, k, v * 3.5, lengths, 4, 1e-3)
    keep = C // 3
    assert torch.equal(base.topk(keep, -1).indices.sort(-1).values, scaled.topk(keep, -1).indices.sort(-1).values)
    # Scaling one token's V up never lowers its rank.
    i = 20
    v2 = v.clone()
    v2[:, :, i] *= 4.0
    bumped = call(OP, backend, mean, cov, k, v2, lengths, 4, 1e-3)
    rank = lambda s: (s > s[..., i:i + 1]).sum(-1)  # noqa: E731
    assert (rank(bumped) <= rank(base)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_permutation_equivariance(backend):
    B, Hkv, G, C, D, n_sink = 1, 2, 4, 40, 64, 4
    k, v, lengths, _ = make_cache(B, Hkv, C, D, torch.float16, lengths=torch.tensor([[40, 33]]))
    mean, cov = make_stats(B, Hkv * G, D)
    out = call(OP, backend, mean, cov, k, v, lengths, n_sink, 1e-3)
    kp, vp = k.clone(), v.clone()
    perms = []
    for j in range(Hkv):
        L = int(lengths[0, j])
        perm = torch.arange(C)
        perm[n_sink:L] = n_sink + torch.randperm(L - n_sink)
        perms.append(perm)
        kp[0, j] = k[0, j, perm]
        vp[0, j] = v[0, j, perm]
    outp = call(OP, backend, mean, cov, kp, vp, lengths, n_sink, 1e-3)
    for j in range(Hkv):
        torch.testing.assert_close(outp[0, j], out[0, j, perms[j]], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# Real activations (SmolLM2-135M, layer 15)
# ---------------------------------------------------------------------------

DATA_NAME = "smollm2_wiki_T1024.safetensors"


def _find_shared_data():
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / DATA_NAME
        if candidate.exists():
            return candidate
    return None


DATA = _find_shared_data()


@pytest.mark.skipif(DATA is None, reason=f"shared/data/{DATA_NAME} is not beside this checkout")
def test_real_activations():
    from safetensors import safe_open

    T0, n_sink, n_future = 960, 4, 512
    with safe_open(str(DATA), "pt") as f:
        meta = f.metadata()
        q_pre = f.get_tensor("layer15.q_pre_rope")  # [1, 9, 1024, 64]
        q = f.get_tensor("layer15.q")
        k_all = f.get_tensor("layer15.k")  # [1, 3, 1024, 64], post-RoPE (what the model caches)
        v_all = f.get_tensor("layer15.v")
    assert "rotate_half" in meta["rope_convention"]
    D, Hkv, G = q.shape[-1], k_all.shape[1], q.shape[1] // k_all.shape[1]
    inv_freq = 1.0 / (float(meta["rope_theta"]) ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    mu, cov = reference.query_statistics(q_pre[:, :, :T0], n_sink=n_sink)
    mu, cov = reference.average_rope(mu, cov, inv_freq, T0, n_future)
    mean, cov = mu.float().to(DEVICE), cov.float().to(DEVICE)

    # A cache of capacity 1024 holding the first 960 tokens; the rest is garbage.
    lengths = torch.full((1, Hkv), T0, dtype=torch.int32, device=DEVICE)
    for dtype in DTYPES:
        k = k_all.to(DEVICE, dtype).clone()
        v = v_all.to(DEVICE, dtype).clone()
        k[:, :, T0:] = float("nan")
        v[:, :, T0:] = float("nan")
        for backend in BACKENDS:
            if backend == "triton" and DEVICE == "cpu" and dtype != torch.bfloat16:
                continue  # the interpreter is slow: one dtype is enough there
            check(backend, mean, cov, k, v, lengths, n_sink, what=f"real {backend} {dtype}")

    # The scores predict where the next 64 queries attend: the best quarter of the
    # cache (sinks included) holds most of their attention, more than key norms find.
    kf = k_all[:, :, :T0].double().repeat_interleave(G, 1)
    att = torch.softmax(torch.einsum("bhtd,bhcd->bhtc", q[:, :, T0:].double(), kf) / D ** 0.5, -1)
    att = att.mean(2).view(1, Hkv, G, T0).mean(2)
    keep = T0 // 4
    ea = reference.expected_attention_scores(mean, cov, k_all.to(DEVICE), v_all.to(DEVICE), lengths, n_sink)
    ea_mass = att.gather(-1, ea[..., :T0].cpu().topk(keep, -1).indices).sum(-1)
    knorm = reference.slot_scores(k_all[:, :, :T0], None, lengths.cpu(), "key_norm")
    knorm_mass = att.gather(-1, knorm.topk(keep, -1).indices).sum(-1)
    assert (ea_mass > 0.9).all() and (ea_mass > knorm_mass).all(), (ea_mass, knorm_mass)


# ---------------------------------------------------------------------------
# Argument errors, opcheck, torch.compile
# ---------------------------------------------------------------------------


def good():
    B, Hkv, G, C, D = 2, 2, 3, 20, 64
    k, v, lengths, _ = make_cache(B, Hkv, C, D, torch.float32)
    mean, cov = make_stats(B, Hkv * G, D)
    return dict(mean=mean, cov=cov, k_cache=k, v_cache=v, lengths=lengths, n_sink=4, epsilon=0.0, sm_scale=None)


def _with(**changes):
    return with_changes(good, **changes)


# (id, argument named in the error, words the message must contain, builder of bad arguments)
BAD = [
    ("mean_rank", "mean", "3-D", _with(mean=lambda a: a["mean"][0])),
    ("mean_dtype", "mean", "float32", _with(mean=lambda a: a["mean"].double())),
    ("mean_batch", "mean", "shape", _with(mean=lambda a: a["mean"][:1])),
    ("mean_head_dim", "mean", "shape", _with(mean=lambda a: a["mean"][..., :32])),
    ("group_not_multiple", "mean", "multiple", _with(mean=lambda a: a["mean"][:, :5], cov=lambda a: a["cov"][:, :5])),
    ("mean_last_dim_strided", "mean", "contiguous",
     _with(mean=lambda a: a["mean"].repeat_interleave(2, -1)[..., ::2])),
    ("cov_rank", "cov", "4-D", _with(cov=lambda a: a["cov"][0])),
    ("cov_dtype", "cov", "float32", _with(cov=lambda a: a["cov"].half())),
    ("cov_shape", "cov", "shape", _with(cov=lambda a: a["cov"][..., :32])),
    ("k_rank", "k_cache", "4-D", _with(k_cache=lambda a: a["k_cache"][0])),
    ("k_dtype", "k_cache", "dtype", _with(k_cache=lambda a: a["k_cache"].double())),
    ("k_last_dim_strided", "k_cache", "contiguous",
     _with(k_cache=lambda a: a["k_cache"].repeat_interleave(2, -1)[..., ::2])),
    ("v_dtype_mismatch", "v_cache", "dtype", _with(v_cache=lambda a: a["v_cache"].half())),
    ("v_shape", "v_cache", "shape", _with(v_cache=lambda a: a["v_cache"][:, :, :10])),
    ("lengths_dtype", "lengths", "int32", _with(lengths=lambda a: a["lengths"].long())),
    ("lengths_shape", "lengths", "shape", _with(lengths=lambda a: a["lengths"][:, :1])),
    ("n_sink_negative", "n_sink", ">= 0", _with(n_sink=lambda a: -1)),
    ("epsilon_nan", "epsilon", "finite", _with(epsilon=lambda a: float("nan"))),
    ("sm_scale_inf", "sm_scale", "finite", _with(sm_scale=lambda a: float("inf"))),
] + out_of_range_cases(_with)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id,arg,words,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(backend, case_id, arg, words, make):
    a = make()
    with pytest.raises((RuntimeError, ValueError)) as info:
        call(OP, backend, a["mean"], a["cov"], a["k_cache"], a["v_cache"], a["lengths"], a["n_sink"],
             a["epsilon"], a["sm_scale"])
    msg = str(info.value)
    assert f"{OP}" in msg and f" {arg}: " in msg and words in msg, msg


def test_device_mismatch_is_named():
    # Checked in Python with a meta tensor: one device type is enough.
    a = good()
    with pytest.raises(ValueError, match="cov: expected the device of k_cache"):
        triton_scorers.check_expected_attention_args("op", a["mean"], a["cov"].to("meta"), a["k_cache"], None,
                                                     a["lengths"], 4, 0.0, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    a = good()
    op = getattr(torch.ops.kvkern, OP if backend == "cpp" else OP + "_triton").default
    for args in ((a["mean"], a["cov"], a["k_cache"], a["v_cache"], a["lengths"], 4, 1e-3, None),
                 (a["mean"], None, a["k_cache"], None, a["lengths"], 0, 0.0, 0.2)):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    a = good()

    def step(mean, cov, k, v, lengths):
        return call(OP, backend, mean * 0.5, cov, k, v, lengths, 4, 1e-3, None) + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    args = (a["mean"], a["cov"], a["k_cache"], a["v_cache"], a["lengths"])
    assert_verbose_allclose(compiled(*args), step(*args), 1e-6, 1e-6)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
def test_triton_unchecked_bad_lengths_give_nan():
    # On CUDA lengths values are never read on the host: a length outside [0, C] makes the
    # kernels write NaN for that head (and read nothing of it) instead of raising.
    B, Hkv, G, C, D = 2, 2, 2, 21, 64
    lengths = torch.tensor([[C, -1], [C + 5, 7]], dtype=torch.int32, device=DEVICE)
    k, v, _, _ = make_cache(B, Hkv, C, D, torch.float32, lengths=lengths.clamp(0, C))
    mean, cov = make_stats(B, Hkv * G, D)
    out = triton_scorers.launch_expected_attention(mean, cov, k, v, lengths, 4, 1e-3, D ** -0.5)
    bad = (lengths < 0) | (lengths > C)
    assert out[bad].isnan().all()
    ref = reference.expected_attention_scores(mean, cov, k, v, lengths.clamp(0, C), 4, 1e-3)
    assert_verbose_allclose(out[~bad], ref[~bad], *SCORE_TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits(backend):
    # Logits in the hundreds: the max-subtracted softmax keeps full fp32 accuracy.
    B, Hkv, G, C, D = 1, 2, 3, 150, 128
    k, v, lengths, _ = make_cache(B, Hkv, C, D, torch.float32, lengths=torch.tensor([[150, 97]]))
    mean, cov = make_stats(B, Hkv * G, D, mean_scale=20.0)
    check(backend, mean, cov * 30, k, v, lengths, 4, 0.0, what=f"{backend} large logits")
