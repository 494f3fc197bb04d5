# SPDX-License-Identifier: Apache-2.0
"""decode_attention: every backend against the fp64 reference."""

from __future__ import annotations

import pytest
import torch

import kvkern
import kvkern.cuda_variants
from kvkern import reference
from kvkern.ops import available_backends

from utils import (INTERPRET, LSE_TOLERANCES, TOLERANCES, assert_verbose_allclose, make_decode_inputs,
                   poison_past_lengths, randn)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = available_backends("decode_attention", DEVICE)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUPS = [1, 3, 4, 8]
HEAD_DIMS = [64, 128, 256]
C_ODD = 131  # capacity: odd, not a multiple of any tile


def run(backend, q, k, v, lengths, log_w=None, sm_scale=None, config=None):
    return kvkern.decode_attention(q, k, v, lengths, log_w, sm_scale, return_lse=True, backend=backend,
                                   config=config)


def check(backend, q, k, v, lengths, log_w=None, sm_scale=None, config=None, what=""):
    out, lse = run(backend, q, k, v, lengths, log_w, sm_scale, config)
    ref_out, ref_lse = reference.decode_attention(q, k, v, lengths, log_w, sm_scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    atol, rtol = TOLERANCES[q.dtype]
    assert_verbose_allclose(out, ref_out, atol, rtol, what=f"{backend} out {what}")
    atol, rtol = LSE_TOLERANCES[q.dtype]
    assert_verbose_allclose(lse, ref_lse, atol, rtol, what=f"{backend} lse {what}")
    assert not torch.isnan(out).any(), "NaN from a poisoned slot reached the output"
    return out, lse


def test_backends_found():
    # The C++ kernel always exists for this device; the Triton one wherever Triton runs.
    assert DEVICE in BACKENDS
    if DEVICE == "cuda" or INTERPRET:
        assert "triton" in BACKENDS or not kvkern._triton_backend.AVAILABLE


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_log_w", [False, True], ids=["plain", "log_w"])
@pytest.mark.parametrize("length", [1, 17, 97, C_ODD, "mixed"])
def test_lengths(backend, dtype, with_log_w, length):
    B, Hkv, G, D = 2, 2, 4, 128
    if length == "mixed":  # every listed length at once, a zero-length head included
        length = torch.tensor([[0, 17], [97, C_ODD]], dtype=torch.int32)
    q, k, v, lengths, log_w = make_decode_inputs(B, G * Hkv, Hkv, C_ODD, D, dtype, DEVICE, lengths=length,
                                                 with_log_w=with_log_w)
    check(backend, q, k, v, lengths, log_w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_shapes(backend, dtype, group, head_dim):
    B, Hkv = (2, 2) if backend == "triton" and INTERPRET else (3, 3)
    q, k, v, lengths, log_w = make_decode_inputs(B, group * Hkv, Hkv, 97, head_dim, dtype, DEVICE,
                                                 with_log_w=True)
    check(backend, q, k, v, lengths, log_w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", [
    {"num_splits": 1}, {"num_splits": 2}, {"num_splits": 3}, {"num_splits": 7},
    {"num_splits": 1, "block_n": 16}, {"num_splits": 4, "block_n": 32}, {"num_splits": 2, "block_n": 128},
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_split_k_configs(backend, config):
    if backend == "cuda" and config.get("block_n", 32) not in kvkern.cuda_variants.SUPPORTED_BLOCK_N:
        pytest.skip("not a compiled CUDA variant (tests/test_cuda_kernels.py runs every compiled one)")
    q, k, v, lengths, log_w = make_decode_inputs(2, 6, 2, 301, 64, torch.float32, DEVICE,
                                                 lengths=torch.tensor([[301, 0], [250, 3]]), with_log_w=True)
    check(backend, q, k, v, lengths, log_w, config=config, what=str(config))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_heads_empty(backend):
    q, k, v, lengths, _ = make_decode_inputs(2, 4, 2, 33, 64, torch.float16, DEVICE, lengths=0)
    out, lse = run(backend, q, k, v, lengths)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sm_scale_and_large_logits(backend):
    # Logits of several hundred: the online softmax must rescale, not overflow.
    q, k, v, lengths, log_w = make_decode_inputs(2, 4, 2, 64, 64, torch.float32, DEVICE, with_log_w=True)
    q, log_w = q * 30, log_w * 50
    out, lse = run(backend, q, k, v, lengths, log_w, sm_scale=0.7)
    ref_out, ref_lse = reference.decode_attention(q, k, v, lengths, log_w, 0.7)
    # Ill-conditioned on purpose: each fp32 logit carries an error of about
    # |logit| * 2^-24, which moves the softmax weights by as much, so the
    # tolerance scales with the largest logit instead of being the fp32 default.
    logit_scale = float(ref_lse.abs().max())
    tol = 2e-5 + 4 * logit_scale * 2.0**-24
    assert_verbose_allclose(out, ref_out, tol, tol, what="large logits out")
    assert_verbose_allclose(lse, ref_lse, tol, tol, what="large logits lse")
    check(backend, q / 30, k, v, lengths, log_w / 50, sm_scale=-0.25)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_log_w(backend):
    # log(votes) is -inf for a slot with no votes; a head whose every slot has -inf gives lse -inf.
    q, k, v, lengths, log_w = make_decode_inputs(2, 4, 2, 40, 64, torch.float32, DEVICE, lengths=40,
                                                 with_log_w=True)
    log_w[0, 0, ::2] = float("-inf")
    log_w[1, 1, :] = float("-inf")
    out, lse = run(backend, q, k, v, lengths, log_w)
    ref_out, ref_lse = reference.decode_attention(q, k, v, lengths, log_w)
    keep = ~torch.isinf(ref_lse)
    assert_verbose_allclose(out[keep], ref_out[keep], *TOLERANCES[torch.float32])
    assert torch.isneginf(lse[~keep]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views(backend, dtype):
    # K and V as views into one [B, C, 2, Hkv, D] buffer (a token-major layout), and a
    # query that is a slice of a wider projection: only the last dim is contiguous.
    B, Hkv, G, C, D = 2, 2, 3, 50, 64
    kv = randn(B, C, 2, Hkv, D, dtype=dtype, device=DEVICE)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    q = randn(B, G * Hkv * 2, D, dtype=dtype, device=DEVICE)[:, ::2]
    lengths = torch.randint(1, C + 1, (B, Hkv), dtype=torch.int32, device=DEVICE)
    assert not k.is_contiguous() and not q.is_contiguous()
    poison_past_lengths(k, lengths)
    poison_past_lengths(v, lengths)
    check(backend, q, k, v, lengths)


@pytest.mark.parametrize("backend", BACKENDS)
def test_does_not_mutate_inputs(backend):
    q, k, v, lengths, log_w = make_decode_inputs(2, 4, 2, 40, 64, torch.float16, DEVICE, with_log_w=True)
    before = [t.clone() for t in (q, k, v, lengths, log_w)]
    run(backend, q, k, v, lengths, log_w)
    for a, b in zip(before, (q, k, v, lengths, log_w)):
        assert torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))


def test_backends_agree_with_each_other():
    q, k, v, lengths, log_w = make_decode_inputs(2, 8, 2, 77, 128, torch.float32, DEVICE, with_log_w=True)
    outs = [run(b, q, k, v, lengths, log_w)[0] for b in BACKENDS]
    for o in outs[1:]:
        assert_verbose_allclose(o, outs[0], 1e-5, 1e-5, what="backend vs backend")


def test_default_returns_out_only():
    q, k, v, lengths, _ = make_decode_inputs(1, 2, 1, 8, 64, torch.float32, DEVICE)
    out = kvkern.decode_attention(q, k, v, lengths)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def test_empty_batch():
    q, k, v, lengths, _ = make_decode_inputs(0, 4, 2, 8, 64, torch.float32, DEVICE)
    out, lse = kvkern.decode_attention(q, k, v, lengths, return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    q, k, v, lengths, log_w = make_decode_inputs(2, 6, 2, 40, 64, torch.float32, DEVICE, with_log_w=True)

    def step(q, k, v, lengths, log_w):
        return kvkern.decode_attention(q * 2, k, v, lengths, log_w, backend=backend) + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    assert_verbose_allclose(compiled(q, k, v, lengths, log_w), step(q, k, v, lengths, log_w), 1e-5, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replay(backend):
    q, k, v, lengths, log_w = make_decode_inputs(4, 16, 4, 1000, 128, torch.bfloat16, "cuda", with_log_w=True)
    kvkern.decode_attention(q, k, v, lengths, log_w, backend=backend)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kvkern.decode_attention(q, k, v, lengths, log_w, backend=backend)
    # New data in the same buffers: the replay must see it.
    q.copy_(randn(*q.shape, dtype=q.dtype, device="cuda"))
    lengths.copy_(torch.randint(0, 1001, lengths.shape, device="cuda", dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    ref_out, _ = reference.decode_attention(q, k, v, lengths, log_w)
    assert_verbose_allclose(out, ref_out, *TOLERANCES[q.dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_out_of_range_lengths_give_nan(backend):
    # On CUDA a value check would need a host sync: bad heads come back NaN, others intact.
    q, k, v, lengths, _ = make_decode_inputs(2, 4, 2, 32, 64, torch.float32, "cuda", lengths=20)
    lengths[0, 1] = 33
    lengths[1, 0] = -1
    out, lse = torch.ops.kvkern.decode_attention(q, k, v, lengths) if backend == "cuda" else \
        torch.ops.kvkern.decode_attention_triton(q, k, v, lengths)
    torch.cuda.synchronize()
    bad = torch.zeros(2, 4, dtype=torch.bool, device="cuda")
    bad[0, 2:] = True
    bad[1, :2] = True
    assert torch.isnan(out[bad]).all() and torch.isnan(lse[bad]).all()
    assert not torch.isnan(out[~bad]).any()
