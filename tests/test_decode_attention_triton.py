# SPDX-License-Identifier: Apache-2.0
"""decode_attention's Triton backend: config checks, every search-space config,
head-group tiling, NaN for out-of-range lengths, and the combine kernel alone."""

from __future__ import annotations

import math

import pytest
import torch

import kvkern
from kvkern import reference
from kvkern.ops import available_backends

from utils import LSE_TOLERANCES, TOLERANCES, assert_verbose_allclose, make_decode_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in available_backends("decode_attention", DEVICE),
                                reason="Triton backend not available here")

if "triton" in available_backends("decode_attention", DEVICE):
    from kvkern.triton import decode_attention as T
else:  # pragma: no cover
    T = None

OP = torch.ops.kvkern.decode_attention_triton.default


def check(q, k, v, lengths, log_w=None, sm_scale=None, what="", **config):
    out, lse = OP(q, k, v, lengths, log_w, sm_scale, **config)
    ref_out, ref_lse = reference.decode_attention(q, k, v, lengths, log_w, sm_scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:2]
    assert_verbose_allclose(out, ref_out, *TOLERANCES[q.dtype], what=f"out {what}")
    assert_verbose_allclose(lse, ref_lse, *LSE_TOLERANCES[q.dtype], what=f"lse {what}")
    return out, lse


@pytest.mark.parametrize("name,value,match", [
    ("num_splits", -1, r"num_splits: expected 0 \(heuristic\) or a value in \[1, 65535\], got -1"),
    ("num_splits", 70000, r"num_splits: expected 0 \(heuristic\) or a value in \[1, 65535\], got 70000"),
    ("block_n", -16, r"block_n: expected 0 \(heuristic\) or a value in \[1, 4096\], got -16"),
    ("block_n", 48, "block_n: expected 0 .* power of two"),
    ("block_n", 8, "block_n: expected 0 .* power of two"),
    ("block_n", 512, "block_n: expected 0 .* power of two"),
    ("num_warps", 3, "num_warps: expected 0"),
    ("num_warps", -4, r"num_warps: expected 0 \(heuristic\) or a value in \[1, 32\], got -4"),
    ("num_stages", -1, r"num_stages: expected 0 \(heuristic\) or a value in \[1, 16\], got -1"),
    ("num_stages", 9, "num_stages: expected 0"),
])
def test_bad_config_is_a_clear_error(name, value, match):
    q, k, v, lengths, _ = make_decode_inputs(1, 2, 1, 16, 64, torch.float32, DEVICE)
    with pytest.raises(ValueError, match=match):
        OP(q, k, v, lengths, **{name: value})


def test_bad_inputs_rejected_when_called_directly():
    q, k, v, lengths, _ = make_decode_inputs(1, 2, 1, 16, 64, torch.float32, DEVICE)
    with pytest.raises(ValueError, match="kvkern::decode_attention_triton: k_cache: expected dtype float32"):
        OP(q, k.half(), v, lengths)
    with pytest.raises(ValueError, match="decode_attention_triton: lengths: expected dtype int32"):
        OP(q, k, v, lengths.long())
    with pytest.raises(ValueError, match="decode_attention_triton: q: expected head dim"):
        OP(q[..., :32], k[..., :32], v[..., :32], lengths)
    if DEVICE == "cpu":  # a value check costs nothing on CPU
        with pytest.raises(ValueError, match=r"lengths: expected every value in \[0, C\]"):
            OP(q, k, v, lengths + 100)


def _distinct_configs(space):
    # num_warps / num_stages do not change results (nor anything under the interpreter).
    seen, out = set(), []
    for c in space:
        key = (c["num_splits"], c["block_n"])
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


@pytest.mark.parametrize("dtype,head_dim,group", [
    (torch.float32, 64, 3), (torch.float16, 128, 4), (torch.bfloat16, 256, 1)], ids=str)
def test_every_search_space_config_runs(dtype, head_dim, group):
    B, Hkv, C = 2, 2, 150
    space = T.search_space(head_dim, dtype, group, B * Hkv, C)
    assert space, "empty search space"
    keys = {"num_splits", "block_n", "num_warps", "num_stages"}
    for c in space:
        assert set(c) == keys and all(isinstance(x, int) and x > 0 for x in c.values()), c
        assert c["block_n"] in T.BLOCK_N_CHOICES and c["num_warps"] in T.NUM_WARPS_CHOICES
    lengths = torch.tensor([[C, 0], [37, 1]], dtype=torch.int32)
    q, k, v, lengths, log_w = make_decode_inputs(B, group * Hkv, Hkv, C, head_dim, dtype, DEVICE, lengths=lengths,
                                                 with_log_w=True)
    configs = _distinct_configs(space)
    if DEVICE == "cuda":
        configs = space
    for c in configs:
        check(q, k, v, lengths, log_w, what=str(c), **c)


@pytest.mark.parametrize("head_dim,group,dtype,programs", [
    (256, 40, torch.float16, 2), (128, 72, torch.float16, 2), (256, 40, torch.float32, 3), (64, 3, torch.float32, 1)],
    ids=str)
def test_group_tiled_over_several_programs(head_dim, group, dtype, programs):
    # Groups larger than one program's head tile are split over several programs,
    # the last one partly masked.
    block_h = T.head_block(group, head_dim, dtype)
    assert block_h >= 16 and -(-group // block_h) == programs
    q, k, v, lengths, log_w = make_decode_inputs(1, group, 1, 45, head_dim, dtype, DEVICE, with_log_w=True)
    check(q, k, v, lengths, log_w)
    check(q, k, v, lengths, log_w, num_splits=3, block_n=16)


def test_strided_lengths_and_log_w():
    B, Hkv, G, C, D = 3, 2, 2, 40, 64
    q, k, v, _, _ = make_decode_inputs(B, G * Hkv, Hkv, C, D, torch.float16, DEVICE, lengths=C, poison=False)
    lengths = torch.randint(0, C + 1, (Hkv, B), dtype=torch.int32, device=DEVICE).t()  # strides (1, B)
    log_w = torch.randn(Hkv, B, C, device=DEVICE).transpose(0, 1)  # strides (C, B*C, 1)
    assert not lengths.is_contiguous() and not log_w.is_contiguous()
    for config in ({}, {"num_splits": 2, "block_n": 16}):
        check(q, k, v, lengths, log_w, what=str(config), **config)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_all_neg_inf_log_w_gives_zero_not_nan(num_splits):
    q, k, v, lengths, log_w = make_decode_inputs(2, 4, 2, 40, 64, torch.float32, DEVICE, lengths=40,
                                                 with_log_w=True)
    log_w[1, 1] = float("-inf")           # a whole head
    log_w[0, 0, :20] = float("-inf")      # the first splits of a head
    out, lse = OP(q, k, v, lengths, log_w, num_splits=num_splits, block_n=16)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[1, 2:], torch.zeros_like(out[1, 2:])) and torch.isneginf(lse[1, 2:]).all()
    ref_out, ref_lse = reference.decode_attention(q, k, v, lengths, log_w)
    assert_verbose_allclose(out, ref_out, *TOLERANCES[torch.float32])
    assert_verbose_allclose(lse, ref_lse, *LSE_TOLERANCES[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 4])
def test_out_of_range_lengths_give_nan_without_reading(num_splits):
    # What a CUDA caller gets (no host sync to raise): NaN for the bad heads only,
    # the others intact. Called below the argument checks, which reject these
    # values on CPU.
    q, k, v, lengths, _ = make_decode_inputs(2, 4, 2, 32, 64, torch.float32, DEVICE, lengths=20)
    lengths[0, 1] = 33
    lengths[1, 0] = -1
    out, lse = T._launch(q, k, v, lengths, None, None, num_splits, 16, 0, 0)
    bad = torch.zeros(2, 4, dtype=torch.bool, device=DEVICE)
    bad[0, 2:] = True
    bad[1, :2] = True
    assert torch.isnan(out[bad]).all() and torch.isnan(lse[bad]).all()
    ok_lengths = lengths.clamp(0, 32)
    ref_out, ref_lse = reference.decode_attention(q, k, v, ok_lengths)
    assert_verbose_allclose(out[~bad], ref_out[~bad], *TOLERANCES[torch.float32])
    assert_verbose_allclose(lse[~bad], ref_lse[~bad], *LSE_TOLERANCES[torch.float32])


def test_zero_capacity_and_empty_batch():
    q, k, v, lengths, _ = make_decode_inputs(2, 4, 2, 0, 64, torch.float16, DEVICE, lengths=0)
    out, lse = OP(q, k, v, lengths, num_splits=2)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    q, k, v, lengths, _ = make_decode_inputs(0, 4, 2, 8, 64, torch.float16, DEVICE)
    out, lse = OP(q, k, v, lengths)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def test_forced_splits_over_extreme_lengths():
    # More splits than a short head has tiles: the empty splits must merge away (a head of
    # length 0 gives zeros and lse -inf), whatever mix of lengths shares the launch.
    q, k, v, lengths, _ = make_decode_inputs(2, 4, 2, 64, 64, torch.float32, DEVICE,
                                             lengths=torch.tensor([[0, 1], [64, 17]]))
    out, lse = check(q, k, v, lengths, what="splits 4, block_n 16", num_splits=4, block_n=16)
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2])) and torch.isneginf(lse[0, :2]).all()


def test_defaults_and_search_space_are_sane():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for D in (64, 128, 256):
            for G in (1, 4, 8, 32, 128):
                for batch_heads, capacity in ((1, 16), (8, 4096), (1024, 100_000)):
                    cfg = T.default_config(D, dtype, G, batch_heads, capacity, device="cpu")
                    assert cfg["num_splits"] == 1 and cfg["block_n"] in T.BLOCK_N_CHOICES
                    space = T.search_space(D, dtype, G, batch_heads, capacity)
                    assert space and len(space) == len({tuple(sorted(c.items())) for c in space})
                    assert all(c["block_n"] * D * T._ELEMENT_SIZE[dtype] <= 32 * 1024 for c in space)
    # The GPU split heuristic: about two waves of programs, splits of at least two tiles.
    assert T._default_num_splits(programs=8, capacity=8192, block_n=64, target=264) == 33
    assert T._default_num_splits(programs=8, capacity=256, block_n=64, target=264) == 2
    assert T._default_num_splits(programs=512, capacity=8192, block_n=64, target=264) == 1
    assert T._default_num_splits(programs=1, capacity=10**6, block_n=64, target=264) == 64


def test_gpu_defaults_lie_in_the_search_space(monkeypatch):
    # default_config for a CUDA device, with a stand-in SM count (no GPU needed).
    monkeypatch.setattr(T, "_sm_count", lambda index: 132)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for D in (64, 128, 256):
            for G in (1, 4, 8, 16, 32, 64):
                for batch_heads, capacity in ((1, 256), (8, 4096), (64, 32768), (1024, 100_000)):
                    cfg = T.default_config(D, dtype, G, batch_heads, capacity, device="cuda:0")
                    space = T.search_space(D, dtype, G, batch_heads, capacity)
                    tile = {k: cfg[k] for k in ("block_n", "num_warps", "num_stages")}
                    assert any(tile == {k: c[k] for k in tile} for c in space), (dtype, D, G, cfg)
                    assert 1 <= cfg["num_splits"] <= 64
                    programs = batch_heads * -(-G // T.head_block(G, D, dtype)) * cfg["num_splits"]
                    assert cfg["num_splits"] == 1 or programs >= 264 or \
                        cfg["num_splits"] == max(1, capacity // (2 * cfg["block_n"])), cfg


def test_opcheck():
    q, k, v, lengths, log_w = make_decode_inputs(2, 6, 2, 40, 64, torch.float32, DEVICE, with_log_w=True,
                                                 poison=False)
    torch.library.opcheck(OP, (q, k, v, lengths, log_w, 0.3, 2, 16, 0, 0))
    torch.library.opcheck(OP, (q.half(), k.half(), v.half(), lengths, None, None, 0, 0, 0, 0))


def _merge_reference(partial_out, partial_lse):
    po, pl = partial_out.double(), partial_lse.double()
    lse = torch.logsumexp(pl, dim=1)
    w = torch.exp(pl - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(1))
    out = (w.unsqueeze(-1) * torch.where(torch.isinf(pl).unsqueeze(-1), 0.0, po)).sum(1)
    nan_rows = torch.isnan(pl).any(1)
    out[nan_rows] = float("nan")
    lse[nan_rows] = float("nan")
    return out, lse


@pytest.mark.parametrize("rows,splits,head_dim,dtype", [
    (5, 3, 64, torch.float32), (4, 40, 256, torch.float16), (3, 7, 80, torch.bfloat16), (2, 1, 128, torch.float32)],
    ids=str)
def test_merge_states_kernel_alone(rows, splits, head_dim, dtype):
    partial_out = torch.randn(rows, splits, head_dim, device=DEVICE)
    partial_lse = torch.randn(rows, splits, device=DEVICE) * 5
    partial_lse[0, 0] = float("-inf")                 # an empty split: its out is garbage, never read
    partial_out[0, 0] = float("nan")
    if rows > 2:
        partial_lse[1] = float("-inf")                # a row of empty splits
        partial_lse[2, -1] = float("nan")             # a bad split poisons its row
    out = torch.empty(rows, head_dim, dtype=dtype, device=DEVICE)
    lse = torch.empty(rows, device=DEVICE)
    T.merge_states_triton(partial_out, partial_lse, out, lse)
    ref_out, ref_lse = _merge_reference(partial_out, partial_lse)
    assert_verbose_allclose(out, ref_out, *TOLERANCES[dtype], what="merged out")
    assert_verbose_allclose(lse, ref_lse, 2e-5, 2e-5, what="merged lse")
    if rows > 2:
        assert torch.equal(out[1].float(), torch.zeros(head_dim, device=DEVICE)) and math.isinf(lse[1].item())


def test_merge_states_kernel_strided_views():
    # The combine kernel takes strided rows: a slice of a wider partial buffer.
    rows, splits, D = 4, 5, 64
    big = torch.randn(rows, splits + 3, D, device=DEVICE)
    big_lse = torch.randn(rows, splits + 3, device=DEVICE)
    po, pl = big[:, 1:1 + splits], big_lse[:, 1:1 + splits]
    out_big = torch.zeros(rows, 2 * D, device=DEVICE)
    lse_big = torch.zeros(rows, 2, device=DEVICE)
    T.merge_states_triton(po, pl, out_big[:, D:], lse_big[:, 1])
    ref_out, ref_lse = _merge_reference(po, pl)
    assert_verbose_allclose(out_big[:, D:], ref_out, 2e-5, 2e-5)
    assert_verbose_allclose(lse_big[:, 1], ref_lse, 2e-5, 2e-5)
    assert torch.equal(out_big[:, :D], torch.zeros(rows, D, device=DEVICE))
    assert torch.equal(lse_big[:, 0], torch.zeros(rows, device=DEVICE))


def test_pipeline_stages_takes_the_deepest_that_fits(monkeypatch):
    # On a GPU the launcher compiles (without launching) each candidate depth until one fits
    # the device's shared memory per block, remembers it per specialization, and refuses
    # clearly when none fits. A stand-in kernel reports what each depth would need.
    import types

    compiled = []

    class Kernel:
        fn = types.SimpleNamespace(__name__="fake_kernel")

        def warmup(self, *args, grid, num_stages, **constexprs):
            compiled.append(num_stages)
            return types.SimpleNamespace(metadata=types.SimpleNamespace(shared=40_000 * num_stages))

    monkeypatch.setattr(T, "interpreted", lambda device: False)
    monkeypatch.setattr(T, "_max_shared", lambda index: 99 * 1024)
    monkeypatch.setattr(T, "_STAGES_CHOSEN", {})
    gpu = torch.device("cuda", 0)
    args = (torch.empty(1, dtype=torch.float16), 3)
    assert T.pipeline_stages(Kernel(), (1,), args, {"TILE": 64}, gpu) == 2 and compiled == [3, 2]
    assert T.pipeline_stages(Kernel(), (1,), args, {"TILE": 64}, gpu) == 2 and compiled == [3, 2]  # remembered
    assert T.pipeline_stages(Kernel(), (1,), args, {"TILE": 32}, gpu) == 2 and compiled == [3, 2, 3, 2]
    monkeypatch.setattr(T, "_max_shared", lambda index: 30_000)
    with pytest.raises(RuntimeError, match="fake_kernel: needs more shared memory per block than the device's 30000"):
        T.pipeline_stages(Kernel(), (1,), args, {"TILE": 64}, gpu)
    monkeypatch.setattr(T, "interpreted", lambda device: True)
    assert T.pipeline_stages(Kernel(), (1,), args, {"TILE": 64}, torch.device("cpu")) == 3
