# SPDX-License-Identifier: Apache-2.0
"""kvkern::key_redundancy and its Triton twin against kvkern.reference.key_redundancy.

The "latest near-duplicate of each key is spared" rule is global over all rows:
duplicates are planted far apart so that they fall in different tiles of both
backends. Any head dim D >= 1 is supported.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvkern import reference
from eviction_utils import (DEVICE, SCORE_TOLERANCES, assert_error_names, call, make_cache, op_backends,
                            out_of_range_cases, with_changes)
from utils import assert_verbose_allclose, poison_past_lengths

OP = "key_redundancy"
BACKENDS = op_backends(OP)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DATA = Path(__file__).parent / "data" / "smollm2_wiki_T1024_decode.safetensors"


def plant_duplicates(k: torch.Tensor, copies: int = 3, noise: float = 0.2) -> torch.Tensor:
    """Overwrites random far-apart slots of every head with noisy copies of a few keys (fp32 math)."""
    B, H, C, D = k.shape
    x = k.float()
    for b in range(B):
        for h in range(H):
            perm = torch.randperm(C)
            n_src = max(1, C // (4 * copies))
            for s in range(n_src):
                slots = perm[s * copies:(s + 1) * copies]
                base = x[b, h, slots[0]].clone()
                x[b, h, slots] = base + noise * torch.randn(len(slots), D, device=k.device) * base.norm() / D ** 0.5
    return x.to(k.dtype)


def check(backend, k, lengths, n_window, threshold, dtype, what=""):
    out = call(OP, backend, k, lengths, n_window, threshold)
    assert out.dtype == torch.float32 and out.shape == k.shape[:3]
    ref = reference.key_redundancy(k, lengths, n_window, threshold)
    atol, rtol = SCORE_TOLERANCES[dtype]
    assert_verbose_allclose(out, ref, atol, rtol, what=f"{backend} {what}")
    return out


# (B, Hkv, C, D, lengths, n_window, threshold, duplicates)
CASES = [
    (2, 2, 37, 64, [[37, 0], [20, 1]], 5, 0.5, True),
    (1, 3, 131, 128, [[131, 130, 64]], 16, 0.5, True),
    (2, 1, 70, 40, [[70], [33]], 0, 0.3, True),
    (1, 2, 45, 37, [[45, 12]], 3, -0.2, False),
    (1, 2, 29, 64, [[29, 29]], 40, 0.5, True),  # n_window > L: all zero
    (1, 1, 50, 64, [[50]], 2, float("inf"), True),
    (1, 1, 50, 64, [[50]], 2, float("-inf"), True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:4])) + f"-w{c[5]}-t{c[6]}")
def test_matches_reference(backend, dtype, case):
    B, Hkv, C, D, lens, n_window, thr, dup = case
    k, _, lengths, _ = make_cache(B, Hkv, C, D, dtype, torch.tensor(lens), poison=False)
    if dup:
        k = plant_duplicates(k)
    poison_past_lengths(k, lengths)
    out = check(backend, k, lengths, n_window, thr, dtype, what=str(case))
    M = (lengths.long() - n_window).clamp(min=0)
    cand = torch.arange(C, device=DEVICE).view(1, 1, C) < M.unsqueeze(-1)
    assert (out[~cand] == 0).all()
    top = out.amax(-1)
    assert torch.equal(top[M > 0], torch.ones_like(top[M > 0])), "the most redundant candidate scores 1"


@pytest.mark.parametrize("backend", BACKENDS)
def test_latest_duplicate_is_spared_globally(backend):
    # Copies of one key at slots spread over several tiles of both backends; the
    # rest random (cosines near 0). The latest copy has the fewest partners left
    # in its row, so it is the least redundant copy (spec 2(e) oracle 8).
    C, D = 300, 64
    k = torch.randn(1, 1, C, D, device=DEVICE)
    u = torch.randn(D, device=DEVICE)
    copies = [3, 70, 140, 200, 290]
    for s in copies:
        k[0, 0, s] = u + 0.05 * torch.randn(D, device=DEVICE)
    lengths = torch.tensor([[C]], dtype=torch.int32, device=DEVICE)
    out = check(backend, k, lengths, 0, 0.5, torch.float32)
    scores = out[0, 0, copies]
    assert scores[-1] < scores[:-1].min(), scores


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_inputs(backend, dtype):
    B, Hkv, C, D = 2, 2, 41, 64
    kbig, _, _, _ = make_cache(B, Hkv, C + 7, D + 8, dtype, C + 7, poison=False)
    k = kbig[:, :, 3:3 + C, :D]
    k.copy_(plant_duplicates(k.contiguous()))
    lengths = torch.tensor([[41, 0], [17, 40]], dtype=torch.int32, device=DEVICE).t()
    assert not k.is_contiguous() and not lengths.is_contiguous()
    poison_past_lengths(k, lengths)
    check(backend, k, lengths, 4, 0.5, dtype)


@pytest.mark.skipif(not (DEVICE == "cpu" and "cpp" in BACKENDS), reason="CPU C++ kernel")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_many_blocks(dtype):
    k, _, lengths, _ = make_cache(2, 2, 517, 128, dtype, torch.tensor([[517, 300], [129, 64]]), poison=False)
    k = plant_duplicates(k)
    poison_past_lengths(k, lengths)
    check("cpp", k, lengths, 32, 0.5, dtype)


def _gap_threshold(k: torch.Tensor, lengths: torch.Tensor, lo: float = 0.4, hi: float = 0.6) -> float:
    """A threshold in [lo, hi] at the middle of the widest gap between the heads' fp64
    cosines: on real keys many pairs sit near any round value, and an fp32 cosine
    within ~1e-7 of the threshold may fall on the other side than the fp64 one."""
    vals = []
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            L = int(lengths[b, h])
            x = k[b, h, :L].double()
            xh = x / (x.norm(dim=-1, keepdim=True) + 1e-8)
            c = xh @ xh.T
            vals.append(c[(c > lo) & (c < hi)].flatten())
    v = torch.cat(vals).sort().values
    gaps = v[1:] - v[:-1]
    i = int(gaps.argmax())
    assert float(gaps[i]) > 2e-6, "no usable gap"
    return float((v[i] + v[i + 1]) / 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_keys(backend, dtype):
    # SmolLM2 layer 15 keys: highly similar (about 70% of pairs above 0.5).
    safetensors = pytest.importorskip("safetensors.torch")
    k = safetensors.load_file(str(DATA))["layer15.k"].to(DEVICE).to(dtype)  # [1, 3, 1024, 64]
    lengths = torch.tensor([[1024, 700, 333]], dtype=torch.int32, device=DEVICE)
    k = poison_past_lengths(k.clone(), lengths)
    thr = _gap_threshold(k, lengths)
    check(backend, k, lengths, 32, thr, dtype, what=f"threshold {thr}")


def _small_args():
    k, _, lengths, _ = make_cache(2, 2, 23, 64, torch.float32, torch.tensor([[23, 5], [0, 17]]), poison=False)
    k = plant_duplicates(k)
    poison_past_lengths(k, lengths)
    return k, lengths


@pytest.mark.parametrize("twin", ["key_redundancy", "key_redundancy_triton"])
def test_opcheck(twin):
    backend = "cpp" if twin == OP else "triton"
    if backend not in BACKENDS:
        pytest.skip(f"kvkern::{twin} has no kernel here")
    k, lengths = _small_args()
    torch.library.opcheck(getattr(torch.ops.kvkern, twin).default, (k, lengths, 4, 0.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    k, lengths = _small_args()

    def f(k, lengths):
        return 1.0 - call(OP, backend, k, lengths, 4, 0.5)

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(k, lengths), f(k, lengths))


def _good():
    k, lengths = _small_args()
    return dict(k_cache=k, lengths=lengths, n_window=4, threshold=0.5)


def _with(**changes):
    return with_changes(_good, **changes)


BAD = [
    ("k_rank", "k_cache", "4-D", _with(k_cache=lambda a: a["k_cache"][0])),
    ("lengths_rank", "lengths", "2-D", _with(lengths=lambda a: a["lengths"].flatten())),
    ("k_dtype", "k_cache", "dtype", _with(k_cache=lambda a: a["k_cache"].double())),
    ("lengths_dtype", "lengths", "int32", _with(lengths=lambda a: a["lengths"].long())),
    ("lengths_shape", "lengths", "shape", _with(lengths=lambda a: a["lengths"][:, :1])),
    ("k_last_dim_strided", "k_cache", "contiguous",
     _with(k_cache=lambda a: a["k_cache"].repeat_interleave(2, dim=-1)[..., ::2])),
    ("n_window_negative", "n_window", ">= 0", _with(n_window=-1)),
    ("threshold_nan", "threshold", "nan", _with(threshold=float("nan"))),
] + out_of_range_cases(_with)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id,arg,words,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(backend, case_id, arg, words, make):
    assert_error_names(OP, backend, make().values(), arg, words)
