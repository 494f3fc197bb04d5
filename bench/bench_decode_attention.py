# SPDX-License-Identifier: Apache-2.0
"""decode_attention side by side with what a user would run instead, in one run.

Peers: the eager composite (repeat K/V over the GQA group, matmul, softmax in fp32,
matmul: what Hugging Face eager attention and KVPress run), PyTorch's
scaled_dot_product_attention, and on CUDA FlashInfer and flash-attn where
importable. Every peer's output is checked against kvkern's before it is timed.

    python -m pytest bench -q                 # this machine's devices
    python -m pytest bench -q --benchmark-json=out.json
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import kvkern
from kvkern.ops import available_backends

from conftest import record


@dataclass(frozen=True)
class Case:
    name: str
    device: str
    dtype: torch.dtype
    B: int
    Hq: int
    Hkv: int
    D: int
    C: int
    lengths: str = "full"  # "full" | "ragged_heads" | "ragged_seqs" (lognormal around 2048)


CASES = [
    Case("cpu_fp32_B4_L4096", "cpu", torch.float32, 4, 32, 8, 128, 4096),
    Case("cpu_bf16_B4_L4096", "cpu", torch.bfloat16, 4, 32, 8, 128, 4096),
    Case("cuda_bf16_B16_L32768", "cuda", torch.bfloat16, 16, 32, 8, 128, 32768),
    Case("cuda_bf16_B32_ragged_heads", "cuda", torch.bfloat16, 32, 32, 8, 128, 16384, "ragged_heads"),
    Case("cuda_bf16_B32_ragged_seqs", "cuda", torch.bfloat16, 32, 32, 8, 128, 16384, "ragged_seqs"),
    Case("cuda_bf16_B1_L65536_mha", "cuda", torch.bfloat16, 1, 32, 32, 128, 65536),
    Case("cuda_fp16_B64_L4096", "cuda", torch.float16, 64, 32, 8, 128, 4096),
]


def make_lengths(case: Case, gen: torch.Generator) -> torch.Tensor:
    if case.lengths == "full":
        return torch.full((case.B, case.Hkv), case.C, dtype=torch.int32)
    shape = (case.B, case.Hkv) if case.lengths == "ragged_heads" else (case.B, 1)
    draw = torch.exp(math.log(2048) + 0.8 * torch.randn(shape, generator=gen))
    lengths = draw.clamp(64, min(16384, case.C)).round().to(torch.int32)
    return lengths.expand(case.B, case.Hkv).contiguous()


_INPUTS: dict[str, tuple] = {}


def inputs(case: Case):
    """Built once per case (big on GPU); random, never zeros."""
    if case.name not in _INPUTS:
        _INPUTS.clear()
        gen = torch.Generator().manual_seed(1234)
        lengths = make_lengths(case, gen).to(case.device)
        dev = case.device
        q = torch.randn(case.B, case.Hq, case.D, device=dev, dtype=case.dtype)
        k = torch.randn(case.B, case.Hkv, case.C, case.D, device=dev, dtype=case.dtype)
        v = torch.randn(case.B, case.Hkv, case.C, case.D, device=dev, dtype=case.dtype)
        _INPUTS[case.name] = (q, k, v, lengths)
    return _INPUTS[case.name]


def min_bytes(case: Case, lengths: torch.Tensor) -> int:
    """Fewest bytes decode attention must move: valid K and V rows, q, out, lse, lengths."""
    elem = torch.finfo(case.dtype).bits // 8
    kv = 2 * int(lengths.sum()) * case.D * elem
    return kv + 2 * case.B * case.Hq * case.D * elem + case.B * case.Hq * 4 + lengths.numel() * 4


def slot_mask(lengths, C, G):
    """[B, Hq, 1, C] bool, True where a slot is valid (for the peers that need a mask)."""
    valid = torch.arange(C, device=lengths.device).view(1, 1, C) < lengths.unsqueeze(-1)
    return valid.repeat_interleave(G, dim=1).unsqueeze(2)


def eager_composite(q, k, v, lengths, masked):
    # Hugging Face eager attention: repeat_kv, matmul, softmax in fp32, matmul.
    G = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = torch.matmul(q.unsqueeze(2), kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if masked is not None:
        scores = scores.masked_fill(~masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, vr).squeeze(2)


def peers(case: Case):
    """name -> (callable factory or None, reason when unavailable)."""
    q, k, v, lengths = inputs(case)
    G = case.Hq // case.Hkv
    masked = None if case.lengths == "full" else slot_mask(lengths, case.C, G)
    found = {}
    for backend in available_backends("decode_attention", case.device):
        if backend == "triton" and case.device == "cpu":
            continue  # the interpreter is a correctness tool, not a peer
        found[f"kvkern-{backend}"] = (lambda b=backend: kvkern.decode_attention(q, k, v, lengths, backend=b), "")
    found["eager"] = (lambda: eager_composite(q, k, v, lengths, masked), "")
    found["sdpa"] = (lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=masked,
                                                            enable_gqa=True).squeeze(2), "")
    if case.device == "cuda":
        found.update(_flashinfer(case, q, k, v, lengths))
        found.update(_flash_attn(case, q, k, v, lengths))
    return found


def _flashinfer(case, q, k, v, lengths):
    try:
        import flashinfer
    except Exception as err:
        return {"flashinfer": (None, f"not importable ({type(err).__name__})")}
    if case.lengths == "ragged_heads":
        return {"flashinfer": (None, "no per-head lengths")}
    # One page per sequence: the cache [B, Hkv, C, D] is the paged layout "HND" with page size C.
    B, C = case.B, case.C
    seq_lens = lengths[:, 0].contiguous()
    indptr = torch.arange(B + 1, dtype=torch.int32, device="cuda")
    indices = torch.arange(B, dtype=torch.int32, device="cuda")
    workspace = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="HND", use_tensor_cores=True)
    wrapper.plan(indptr, indices, seq_lens, case.Hq, case.Hkv, case.D, C, q_data_type=case.dtype,
                 kv_data_type=case.dtype)
    return {"flashinfer": (lambda: wrapper.run(q, (k, v)), "")}


def _flash_attn(case, q, k, v, lengths):
    try:
        from flash_attn import flash_attn_with_kvcache
    except Exception as err:
        return {"flash-attn": (None, f"not importable ({type(err).__name__})")}
    if case.lengths == "ragged_heads":
        return {"flash-attn": (None, "no per-head lengths")}
    # flash-attn reads [B, C, Hkv, D]; a transposed view keeps our buffers (last dim contiguous).
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    seq_lens = lengths[:, 0].contiguous()
    return {"flash-attn": (lambda: flash_attn_with_kvcache(q.unsqueeze(1), kt, vt, cache_seqlens=seq_lens).squeeze(1),
                           "")}


IMPLS = ["kvkern-cpu", "kvkern-cuda", "kvkern-triton", "eager", "sdpa", "flashinfer", "flash-attn"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def bench_decode_attention(benchmark, case, impl):
    if case.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl.startswith("kvkern-") and impl[len("kvkern-"):] not in ("triton", case.device):
        pytest.skip(f"{impl} does not run on {case.device}")
    table = peers(case)
    if impl not in table:
        pytest.skip(f"{impl} is not available here")
    factory, reason = table[impl]
    if factory is None:
        pytest.skip(f"{impl}: {reason}")
    q, k, v, lengths = inputs(case)
    out = factory()
    expected = kvkern.decode_attention(q, k, v, lengths)
    tol = 2e-2 if case.dtype != torch.float32 else 1e-4
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol,
                               msg=lambda m: f"{impl} disagrees with kvkern on {case.name}: {m}")
    record(benchmark, case=case.name, impl=impl.replace("kvkern-", "kvkern/"), device=case.device, fn=factory,
           nbytes=min_bytes(case, lengths))
