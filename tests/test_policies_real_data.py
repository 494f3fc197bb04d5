# SPDX-License-Identifier: Apache-2.0
"""Eviction quality on real activations (SmolLM2-135M, 9 query / 3 kv heads, D = 64,
1024 tokens of Wikipedia; layers 8, 15, 22).

Setup: the cache holds the first 1008 tokens; each method scores it with what it would see at
that point (SnapKV: the 64 queries 944..1007; G-KV: the 16 queries 992..1007, one
``score_evict_`` round with normalisation, no history, mix_lambda 0.5; Expected Attention: the
pre-RoPE queries 0..1007, future positions from 1008; random: seeded ``slot_scores``) and keeps
25 % (252 slots per kv head).

Error: the 16 later queries (positions 1008..1023) then attend, causally, to the compacted
cache plus the later tokens they see (1008..p for the query at p, never evicted: they arrive
after the compression). For each query and query head, ``||o_compressed - o_full|| /
||o_full||`` against full causal attention over 0..p, averaged over queries and heads, in fp64.
Each informed method must beat random (mean of three seeds) by a wide margin (error < 0.5x).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kvkern import policies as P
from policy_utils import select_backend

DATA = Path(__file__).parent / "data"
QFILE = DATA / "smollm2_wiki_T1024_eviction.safetensors"
KVFILE = DATA / "smollm2_wiki_T1024_decode.safetensors"
_SHARED = [Path(__file__).resolve().parents[i] / "shared" / "data" / "smollm2_wiki_T1024.safetensors" for i in (2, 3)]
SOURCE = next((p for p in _SHARED if p.exists()), None)
LAYERS = (8, 15, 22)
N_CACHE, BUDGET, MARGIN = 1008, 252, 0.5


@pytest.fixture(params=["reference", "kernels"])
def backend(request, monkeypatch):
    return select_backend(request.param, monkeypatch)


def load(layer):
    with safe_open(str(QFILE), "pt") as f:
        meta = f.metadata()
        tail_start = int(meta["tail_start"])
        q_tail = f.get_tensor(f"layer{layer}.q_tail")
        q_pre = f.get_tensor(f"layer{layer}.q_pre_rope").float()
    with safe_open(str(KVFILE), "pt") as f:
        k, v = f.get_tensor(f"layer{layer}.k"), f.get_tensor(f"layer{layer}.v")
    theta = float(meta["rope_theta"])
    D = k.shape[-1]
    invf = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    return q_tail, tail_start, q_pre, k, v, invf


def output_error(kept_pos, q_tail, tail_start, k, v):
    """Mean relative attention-output error of the queries N_CACHE..T-1 (see module docstring).
    ``kept_pos``: per kv head, the kept positions (< N_CACHE)."""
    _, Hq, _, D = q_tail.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    kept = torch.zeros(Hkv, T, dtype=torch.bool)
    for j in range(Hkv):
        kept[j, kept_pos[j]] = True
    kept[:, N_CACHE:] = True
    kq = k[0].double().repeat_interleave(G, 0)  # [Hq, T, D]
    vq = v[0].double().repeat_interleave(G, 0)
    q = q_tail[0, :, N_CACHE - tail_start:].double()  # [Hq, T - N_CACHE, D]
    logits = torch.einsum("hpd,htd->hpt", q, kq) / math.sqrt(D)
    causal = torch.arange(T).view(1, T) <= torch.arange(N_CACHE, T).view(-1, 1)  # [P, T]
    full = torch.softmax(logits.masked_fill(~causal, -math.inf), -1) @ vq
    mask = causal.unsqueeze(0) & kept.repeat_interleave(G, 0).unsqueeze(1)
    comp = torch.softmax(logits.masked_fill(~mask, -math.inf), -1) @ vq
    return float(((comp - full).norm(dim=-1) / full.norm(dim=-1)).mean())


def compress(method, layer_data, seed=0):
    q_tail, tail_start, q_pre, k, v, invf = layer_data
    cache = P.LayerCache.from_prefill(k[:, :, :N_CACHE].clone(), v[:, :, :N_CACHE].clone())
    end = N_CACHE - tail_start  # window queries end at position N_CACHE - 1
    if method == "snapkv":
        P.SnapKV(budget=BUDGET).compress(cache, q_win=q_tail[:, :, end - 64: end])
    elif method == "gkv":
        P.GKV(budget=BUDGET, window=16, use_history=False, mix_lambda=0.5).compress(
            cache, q_win=q_tail[:, :, end - 16: end])
    elif method == "expected_attention":
        P.ExpectedAttention(budget=BUDGET, inv_freq=invf).compress(cache, q_prerope=q_pre[:, :, :N_CACHE])
    elif method == "random":
        P.RandomEviction(budget=BUDGET, seed=seed).compress(cache)
    assert cache.lengths.eq(BUDGET).all()
    return [cache.positions[0, j, :BUDGET].long() for j in range(k.shape[1])]


@pytest.mark.skipif(not QFILE.exists(), reason="run tools/extract_eviction_data.py")
@pytest.mark.parametrize("layer", LAYERS)
def test_informed_methods_beat_random(backend, layer):
    data = load(layer)
    q_tail, tail_start, _, k, v, _ = data
    rand = sum(output_error(compress("random", data, s), q_tail, tail_start, k, v) for s in range(3)) / 3
    line = [f"layer {layer:2d} [{backend}]: random {rand:.4f}"]
    errors = {}
    for method in ("snapkv", "gkv", "expected_attention"):
        errors[method] = output_error(compress(method, data), q_tail, tail_start, k, v)
        line.append(f"{method} {errors[method]:.4f} ({errors[method] / rand:.2f}x)")
    print("\n" + "; ".join(line))
    for method, err in errors.items():
        assert err < MARGIN * rand, f"layer {layer}: {method} error {err:.4f} is not below {MARGIN} x random {rand:.4f}"


@pytest.mark.skipif(SOURCE is None, reason="the shared data folder is not beside this checkout")
def test_extract_matches_source():
    with safe_open(str(SOURCE), "pt") as src, safe_open(str(QFILE), "pt") as ext:
        meta = ext.metadata()
        assert json.loads(meta["layers"]) == list(LAYERS)
        t0 = int(meta["tail_start"])
        for layer in LAYERS:
            assert torch.equal(ext.get_tensor(f"layer{layer}.q_tail"), src.get_tensor(f"layer{layer}.q")[:, :, t0:])
            assert torch.equal(ext.get_tensor(f"layer{layer}.q_pre_rope"),
                               src.get_tensor(f"layer{layer}.q_pre_rope").half())
    with safe_open(str(SOURCE), "pt") as src, safe_open(str(KVFILE), "pt") as kv:
        for layer in LAYERS:
            for name in ("k", "v"):
                assert torch.equal(kv.get_tensor(f"layer{layer}.{name}"), src.get_tensor(f"layer{layer}.{name}"))
