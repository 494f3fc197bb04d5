# SPDX-License-Identifier: Apache-2.0
"""kvkern::window_scores and its Triton twin against kvkern.reference.window_scores.

Every backend with a kernel here ("cpp": the C++ CPU or CUDA kernel, "triton")
runs the same cases. Caches are poisoned with NaN past lengths. Any head dim
D >= 1 is supported by both backends (odd D included).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from kvkern import reference
from eviction_utils import (DEVICE, SCORE_TOLERANCES, assert_error_names, call, make_cache, op_backends,
                            out_of_range_cases, with_changes)
from utils import assert_verbose_allclose, randn

OP = "window_scores"
BACKENDS = op_backends(OP)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DATA = Path(__file__).parent / "data" / "smollm2_wiki_T1024_decode.safetensors"


def ragged_lengths(B, Hkv, C, W, device=DEVICE):
    """Lengths covering 0, a partial window (< W), exactly W, C, and random values."""
    special = [0, max(0, W - 1) // 2, W, C, C - 1]
    vals = [special[i] if i < len(special) else int(torch.randint(0, C + 1, ())) for i in range(B * Hkv)]
    perm = torch.randperm(B * Hkv)
    return torch.tensor(vals, dtype=torch.int32)[perm].view(B, Hkv).clamp(0, C).to(device)


def check(backend, q, k, lengths, dtype, sm_scale=None, qr="mean", gr="mean", norm=False, pool="none", pk=1,
          what=""):
    out = call(OP, backend, q, k, lengths, sm_scale, qr, gr, norm, pool, pk)
    assert out.dtype == torch.float32 and out.shape == (k.shape[0], k.shape[1], k.shape[2])
    ref = reference.window_scores(q, k, lengths, sm_scale, qr, gr, norm, pool, pk)
    atol, rtol = SCORE_TOLERANCES[dtype]
    assert_verbose_allclose(out, ref, atol, rtol, what=f"{backend} {what}")
    valid = torch.arange(k.shape[2], device=k.device).view(1, 1, -1) < lengths.to(torch.int64).unsqueeze(-1)
    assert (out[~valid] == 0).all(), "slots past lengths must be 0"
    return out


# (B, Hkv, G, C, D, W, query_reduce, group_reduce, normalize, pool, pool_kernel)
CASES = [
    (2, 2, 1, 37, 64, 1, "mean", "mean", False, "none", 1),
    (1, 2, 3, 50, 64, 7, "sum", "max", True, "avg", 5),
    (2, 1, 4, 70, 128, 32, "mean", "mean_all", True, "max", 7),
    (1, 3, 8, 41, 64, 7, "sum", "mean", False, "max", 5),
    (2, 2, 4, 33, 128, 1, "mean", "max", False, "avg", 7),
    (1, 2, 3, 40, 40, 32, "mean", "mean_all", False, "none", 1),
    (2, 3, 1, 45, 37, 7, "sum", "mean_all", True, "avg", 5),
    # G-KV's order (max over the group per window query, then the window reduce).
    (1, 2, 3, 50, 64, 7, "mean", "max_per_query", True, "none", 1),
    (2, 1, 8, 41, 64, 5, "sum", "max_per_query", False, "avg", 5),
    (2, 2, 1, 37, 40, 4, "mean", "max_per_query", True, "max", 3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_reference(backend, dtype, case):
    B, Hkv, G, C, D, W, qr, gr, norm, pool, pk = case
    lengths = ragged_lengths(B, Hkv, C, W)
    k, _, lengths, _ = make_cache(B, Hkv, C, D, dtype, lengths)
    q = randn(B, Hkv * G, W, D, dtype=dtype, device=DEVICE)
    check(backend, q, k, lengths, dtype, None, qr, gr, norm, pool, pk, what=str(case))


def _dense_gkv_local_score(q, k, lengths, sm_scale):
    """Spec §2(b) step 1 written out densely, independent of kvkern.reference: per head the fp64
    softmax rows of the W window queries (query t sees slots i < L with i <= L - W + t), then
    ``.amax(group).mean(window)``: s_loc[j, i] = mean_t max_{h in group j} a[h, t, i]."""
    B, Hq, W, D = q.shape
    Hkv, C = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hkv, C, dtype=torch.float64)
    for b in range(B):
        for j in range(Hkv):
            n = int(lengths[b, j])
            if n == 0:
                continue
            logits = torch.einsum("gtd,cd->gtc", q[b, j * G:(j + 1) * G].double().cpu(),
                                  k[b, j, :n].double().cpu()) * sm_scale  # [G, W, n]
            seen = torch.arange(n).view(1, n) <= (n - W + torch.arange(W)).view(W, 1)  # [W, n]
            probs = torch.softmax(logits.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)  # empty rows: 0
            out[b, j, :n] = probs.amax(0).mean(0)
    return out


@pytest.mark.parametrize("G", [1, 3, 4, 8])
def test_reference_max_per_query_is_the_dense_gkv_local_score(G):
    B, Hkv, C, D, W = 2, 3, 37, 16, 6
    lengths = torch.tensor([[0, C, 3], [W, 20, C - 1]], dtype=torch.int32)  # 3 < W: a partial window
    k, _, lengths, _ = make_cache(B, Hkv, C, D, torch.float32, lengths)  # NaN past lengths
    q = randn(B, Hkv * G, W, D, device=DEVICE)
    dense = _dense_gkv_local_score(q, k, lengths, 0.3)
    ours = reference.window_scores(q.cpu(), k.cpu(), lengths.cpu(), 0.3, "mean", "max_per_query")
    torch.testing.assert_close(ours, dense, atol=1e-12, rtol=1e-10)
    other = reference.window_scores(q.cpu(), k.cpu(), lengths.cpu(), 0.3, "mean", "max")  # max_h mean_t
    if G > 1:  # the orders differ (the test above could fail), and max_h mean_t <= mean_t max_h
        assert (other - dense).abs().max() > 1e-3
        assert (other <= dense + 1e-12).all()
    else:
        torch.testing.assert_close(other, dense, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_per_query_differs_from_max(backend):
    # The same input through the kernels: the two orders give different scores for G > 1, W > 1.
    B, Hkv, G, C, D, W = 1, 2, 4, 29, 32, 5
    k, _, lengths, _ = make_cache(B, Hkv, C, D, torch.float32, ragged_lengths(B, Hkv, C, W).clamp(min=W + 4))
    q = randn(B, Hkv * G, W, D, device=DEVICE)
    a = check(backend, q, k, lengths, torch.float32, None, "mean", "max_per_query", what="max_per_query")
    b = check(backend, q, k, lengths, torch.float32, None, "mean", "max", what="max")
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_option_combination(backend):
    # cpp: the full product; triton (slow under the interpreter): every
    # (query_reduce, group_reduce, normalize, pool) with the kernel size cycling.
    B, Hkv, G, C, D, W = 2, 2, 3, 29, 64, 5
    k, _, lengths, _ = make_cache(B, Hkv, C, D, torch.float32, ragged_lengths(B, Hkv, C, W))
    q = randn(B, Hkv * G, W, D, device=DEVICE)
    kernels = (1, 5, 7)
    combos = itertools.product(("mean", "sum"), ("mean", "max", "mean_all", "max_per_query"), (False, True),
                               ("none", "avg", "max"))
    for n, (qr, gr, norm, pool) in enumerate(combos):
        for pk in (kernels if backend == "cpp" else (kernels[n % 3],)):
            check(backend, q, k, lengths, torch.float32, 0.2, qr, gr, norm, pool, pk,
                  what=f"{qr} {gr} {norm} {pool} {pk}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(backend, dtype):
    # q_win from a [B, W, Hq, D] buffer, k_cache inside a wider and longer one,
    # lengths transposed: every stride but the last is unusual.
    B, Hkv, G, C, D, W = 2, 2, 4, 43, 64, 7
    q = randn(B, W, Hkv * G, D + 16, dtype=dtype, device=DEVICE).transpose(1, 2)[..., 8:8 + D]
    kbig, _, _, _ = make_cache(B, Hkv, C + 5, D + 8, dtype, C + 5, poison=False)
    k = kbig[:, :, 2:2 + C, :D]
    lengths = ragged_lengths(Hkv, B, C, W).t()
    assert not q.is_contiguous() and not k.is_contiguous() and not lengths.is_contiguous()
    k.masked_fill_((torch.arange(C, device=DEVICE).view(1, 1, C) >= lengths.long().unsqueeze(-1)).unsqueeze(-1),
                   float("nan"))
    check(backend, q, k, lengths, dtype, None, "mean", "max", True, "max", 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_lengths(backend):
    B, Hkv, G, C, D, W = 1, 3, 2, 24, 64, 24  # W == C
    q = randn(B, Hkv * G, W, D, device=DEVICE)
    for lens in ([0, 0, 0], [24, 24, 24], [1, 5, 23]):
        k, _, lengths, _ = make_cache(B, Hkv, C, D, torch.float32, torch.tensor([lens]))
        out = check(backend, q, k, lengths, torch.float32, None, "sum", "max", True, "avg", 5, what=str(lens))
        if lens[0] == 0:
            assert (out == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_and_scale(backend):
    # Large logits (scale 3) stress the online max / log-sum-exp.
    B, Hkv, G, C, D, W = 1, 2, 2, 60, 64, 4
    k, _, lengths, _ = make_cache(B, Hkv, C, D, torch.float32, torch.tensor([[60, 31]]))
    q = randn(B, Hkv * G, W, D, device=DEVICE, scale=3.0)
    check(backend, q, k, lengths, torch.float32, 3.0 / 8, "mean", "mean", False, "none", 1)


@pytest.mark.skipif(not (DEVICE == "cpu" and "cpp" in BACKENDS), reason="CPU C++ kernel")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_cpp_many_tiles(dtype, threads):
    # Several slot tiles, pass-1 splits (one head, several threads) and pass-2
    # chunks, at a benchmark-like group and head dim.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for B, Hkv, G, C, D, W, lens in ((1, 1, 4, 1100, 128, 32, [[1037]]), (2, 2, 8, 700, 64, 16, None)):
            k, _, lengths, _ = make_cache(B, Hkv, C, D, dtype, torch.tensor(lens) if lens else None)
            q = randn(B, Hkv * G, W, D, dtype=dtype, device=DEVICE)
            check("cpp", q, k, lengths, dtype, None, "mean", "mean", False, "avg", 7, what=f"C={C}")
            check("cpp", q, k, lengths, dtype, None, "sum", "max", True, "max", 5, what=f"C={C}")
            check("cpp", q, k, lengths, dtype, None, "mean", "max_per_query", True, "none", 1, what=f"C={C}")
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_activations_tova(backend):
    # SmolLM2 layer 15: the last token's 9 query heads over 3 kv heads (TOVA: W = 1, mean over all heads).
    safetensors = pytest.importorskip("safetensors.torch")
    data = safetensors.load_file(str(DATA))
    k = data["layer15.k"].to(DEVICE)
    q = data["layer15.q_last"].to(DEVICE).unsqueeze(2)  # [1, 9, 1, 64]
    lengths = torch.tensor([[1024, 700, 333]], dtype=torch.int32, device=DEVICE)
    k = k.clone()
    k[torch.arange(1024, device=DEVICE).view(1, 1, -1) >= lengths.long().unsqueeze(-1)] = float("nan")
    for dtype in DTYPES:
        check(backend, q.to(dtype), k.to(dtype), lengths, dtype, None, "mean", "mean_all", False, "none", 1,
              what=str(dtype))


def _small_args(dtype=torch.float32):
    k, _, lengths, _ = make_cache(2, 2, 19, 64, dtype, torch.tensor([[19, 4], [0, 11]]))
    q = randn(2, 6, 5, 64, dtype=dtype, device=DEVICE)
    return q, k, lengths


@pytest.mark.parametrize("twin", ["window_scores", "window_scores_triton"])
def test_opcheck(twin):
    backend = "cpp" if twin == OP else "triton"
    if backend not in BACKENDS:
        pytest.skip(f"kvkern::{twin} has no kernel here")
    q, k, lengths = _small_args()
    fn = getattr(torch.ops.kvkern, twin).default
    torch.library.opcheck(fn, (q, k, lengths, None, "sum", "max", True, "avg", 5))
    torch.library.opcheck(fn, (q, k, lengths, 0.3, "mean", "mean_all", False, "none", 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    q, k, lengths = _small_args()

    def f(q, k, lengths):
        s = call(OP, backend, q, k, lengths, None, "mean", "max", True, "max", 3)
        return s * 2.0

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, lengths), f(q, k, lengths))


# ---- bad input: one clear error naming the op and the argument ----

def _good():
    q, k, lengths = _small_args()
    return dict(q_win=q, k_cache=k, lengths=lengths, sm_scale=None, query_reduce="mean", group_reduce="mean",
                normalize=False, pool="none", pool_kernel=1)


def _with(**changes):
    return with_changes(_good, **changes)


# (id, argument named, words in the message, builder)
BAD = [
    ("q_rank", "q_win", "4-D", _with(q_win=lambda a: a["q_win"][0])),
    ("k_rank", "k_cache", "4-D", _with(k_cache=lambda a: a["k_cache"][0])),
    ("lengths_rank", "lengths", "2-D", _with(lengths=lambda a: a["lengths"].flatten())),
    ("q_dtype", "q_win", "dtype", _with(q_win=lambda a: a["q_win"].double())),
    ("k_dtype_mismatch", "k_cache", "dtype", _with(k_cache=lambda a: a["k_cache"].half())),
    ("lengths_dtype", "lengths", "int32", _with(lengths=lambda a: a["lengths"].long())),
    ("group_not_multiple", "q_win", "multiple", _with(q_win=lambda a: a["q_win"][:, :5])),
    ("batch_mismatch", "k_cache", "shape", _with(k_cache=lambda a: a["k_cache"][:1])),
    ("head_dim_mismatch", "k_cache", "shape", _with(k_cache=lambda a: a["k_cache"][..., :32])),
    ("lengths_shape", "lengths", "shape", _with(lengths=lambda a: a["lengths"][:, :1])),
    ("window_over_capacity", "q_win", "no larger than", _with(q_win=lambda a: randn(2, 6, 20, 64, device=DEVICE))),
    ("empty_window", "q_win", "W >= 1", _with(q_win=lambda a: a["q_win"][:, :, :0])),
    ("k_last_dim_strided", "k_cache", "contiguous",
     _with(k_cache=lambda a: a["k_cache"].repeat_interleave(2, dim=-1)[..., ::2])),
    ("query_reduce", "query_reduce", "expected one of mean, sum, got 'avg'", _with(query_reduce="avg")),
    ("group_reduce", "group_reduce", "expected one of mean, max, mean_all", _with(group_reduce="min")),
    ("pool", "pool", "expected one of none, avg, max", _with(pool="sum")),
    ("pool_kernel_even", "pool_kernel", "odd", _with(pool="avg", pool_kernel=4)),
    ("pool_kernel_zero", "pool_kernel", "odd", _with(pool_kernel=0)),
    ("sm_scale_nan", "sm_scale", "finite", _with(sm_scale=float("nan"))),
    ("sm_scale_inf", "sm_scale", "finite", _with(sm_scale=float("inf"))),
] + out_of_range_cases(_with)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id,arg,words,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(backend, case_id, arg, words, make):
    assert_error_names(OP, backend, make().values(), arg, words)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a second device type")
@pytest.mark.parametrize("backend", BACKENDS)
def test_device_mismatch(backend):
    a = _good()
    a["lengths"] = a["lengths"].cpu()
    with pytest.raises((RuntimeError, ValueError), match="lengths: expected the"):
        call(OP, backend, *a.values())
