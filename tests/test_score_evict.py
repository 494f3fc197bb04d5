# SPDX-License-Identifier: Apache-2.0
"""score_evict_ (the fused decode-time path) on every backend against the reference."""

from __future__ import annotations

import pytest
import torch

import kvkern
from kvkern import reference

from eviction_utils import DEVICE, call, make_cache, op_backends, valid_mask
from utils import randn

BACKENDS = op_backends("score_evict_")


def _clone(*ts):
    return [None if t is None else t.clone() for t in ts]


def _assert_same_cache(got, want, lengths, what):
    k, v, pos, hist, log_w = got
    rk, rv, rpos, rhist, rlog_w = want
    C = k.shape[2]
    valid = valid_mask(lengths, C)
    for name, a, b in (("k", k, rk), ("v", v, rv)):
        assert torch.equal(torch.where(valid.unsqueeze(-1), a, 0), torch.where(valid.unsqueeze(-1), b, 0)), \
            f"{what}: {name} differs after compaction"
    assert torch.equal(torch.where(valid, pos, 0), torch.where(valid, rpos, 0)), f"{what}: positions differ"
    if log_w is not None:
        assert torch.equal(torch.where(valid, log_w, 0), torch.where(valid, rlog_w, 0)), f"{what}: log_w differs"


CONFIGS = {
    "gkv": dict(group_reduce="max_per_query", normalize=True, hist_mode="max", decay=0.8, with_hist=True),
    "gkv_redundancy": dict(group_reduce="max_per_query", normalize=True, hist_mode="max", decay=0.8, with_hist=True,
                           mix_lambda=0.5),
    "adakv_group_max": dict(group_reduce="max", normalize=True, with_hist=False),  # max_h mean_t
    "snapkv": dict(group_reduce="mean", normalize=False, pool="avg", pool_kernel=5, with_hist=False),
    "h2o_sum": dict(group_reduce="mean", normalize=False, hist_mode="sum", decay=1.0, with_hist=True, pool="max",
                    pool_kernel=3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config,G", [(c, G) for c in sorted(CONFIGS) for G in (1, 3, 4)] + [("gkv", 8)])
def test_matches_reference(backend, config, G):
    cfg = dict(CONFIGS[config])
    with_hist = cfg.pop("with_hist")
    B, Hkv, C, D, W, budget = 2, 2, 53, 32 if backend == "triton" else 64, 5, 20
    lengths = torch.tensor([[53, 30], [12, 41]], dtype=torch.int32)  # one head within budget
    k, v, lengths, positions = make_cache(B, Hkv, C, D, lengths=lengths)
    q_win = randn(B, G * Hkv, W, D, device=DEVICE)
    log_w = randn(B, Hkv, C, device=DEVICE)
    hist = torch.rand(B, Hkv, C, device=DEVICE) if with_hist else None
    hist_lengths = torch.tensor([[30, 10], [5, 0]], dtype=torch.int32, device=DEVICE) if with_hist else None
    ref = _clone(k, v, lengths, positions, hist, hist_lengths, log_w)
    keep_ref = reference.score_evict_(q_win, ref[0], ref[1], ref[2], ref[3], budget, n_sink=2, hist=ref[4],
                                      hist_lengths=ref[5], log_w=ref[6], **cfg)
    keep = kvkern.score_evict_(q_win, k, v, lengths, budget, positions=positions, n_sink=2, hist=hist,
                               hist_lengths=hist_lengths, log_w=log_w, backend={"cpp": DEVICE}.get(backend, backend),
                               **cfg)
    assert torch.equal(keep.cpu(), keep_ref.cpu()), f"{backend}/{config}: kept sets differ"
    assert torch.equal(lengths.cpu(), ref[2].cpu())
    _assert_same_cache((k, v, positions, hist, log_w), (ref[0], ref[1], ref[3], ref[4], ref[6]), lengths, config)
    if with_hist:
        assert torch.equal(hist_lengths.cpu(), ref[5].cpu())
        valid = valid_mask(hist_lengths, C)
        torch.testing.assert_close(torch.where(valid, hist, 0), torch.where(valid, ref[4].to(hist.dtype), 0),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_always_kept_and_budget_exact(backend):
    B, Hkv, G, C, D, W, budget = 1, 3, 4, 97, 64, 8, 24
    k, v, lengths, positions = make_cache(B, Hkv, C, D, lengths=C)
    q_win = randn(B, G * Hkv, W, D, device=DEVICE)
    keep = call("score_evict_", backend, q_win, k, v, lengths, positions, None, budget)
    assert keep[..., C - W:].all()
    assert (lengths == budget).all()
    assert (positions[..., :budget].diff(dim=-1) > 0).all(), "order is not preserved"
    assert (positions[..., budget - W:budget] == torch.arange(C - W, C, device=DEVICE, dtype=torch.int32)).all()


def test_compiles_fullgraph():
    B, Hkv, G, C, D, W, budget = 1, 2, 2, 40, 64, 4, 16
    k, v, lengths, positions = make_cache(B, Hkv, C, D, lengths=C)
    q_win = randn(B, G * Hkv, W, D, device=DEVICE)
    hist = torch.rand(B, Hkv, C, device=DEVICE)
    hist_lengths = torch.zeros(B, Hkv, dtype=torch.int32, device=DEVICE)

    def step(q_win, k, v, lengths, positions, hist, hist_lengths):
        return kvkern.score_evict_(q_win, k, v, lengths, budget, positions=positions, hist=hist,
                                   hist_lengths=hist_lengths)

    ref = _clone(k, v, lengths, positions, hist, hist_lengths)
    keep = torch.compile(step, fullgraph=True, backend="aot_eager")(q_win, k, v, lengths, positions, hist,
                                                                      hist_lengths)
    keep_ref = step(q_win, *ref)
    assert torch.equal(keep, keep_ref)
    assert torch.equal(lengths, ref[2]) and torch.equal(hist_lengths, ref[5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replay_matches_eager(backend):
    # The decode loop's use: capture one G-KV eviction, replay it on fresh data.
    B, Hkv, G, C, D, W, budget = 2, 2, 4, 512, 128, 16, 128
    k, v, lengths, positions = make_cache(B, Hkv, C, D, torch.bfloat16, lengths=C)
    q_win = randn(B, G * Hkv, W, D, dtype=torch.bfloat16, device=DEVICE)
    hist = torch.rand(B, Hkv, C, device=DEVICE)
    hist_lengths = torch.full((B, Hkv), budget - W, dtype=torch.int32, device=DEVICE)
    fresh = _clone(k, v, lengths, positions, hist, hist_lengths)

    def step():
        return call("score_evict_", backend, q_win, k, v, lengths, positions, None, budget, 0, 0, None, "mean",
                    "max", True, "none", 1, hist, hist_lengths)

    for t, f in zip((k, v, lengths, positions, hist, hist_lengths), fresh):  # warm-up compiles kernels
        t.copy_(f)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    for t, f in zip((k, v, lengths, positions, hist, hist_lengths), fresh):
        t.copy_(f)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keep_graph = step()
    for t, f in zip((k, v, lengths, positions, hist, hist_lengths), fresh):
        t.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    got = _clone(k, v, lengths, positions, hist, hist_lengths, keep_graph)
    for t, f in zip((k, v, lengths, positions, hist, hist_lengths), fresh):
        t.copy_(f)
    keep_eager = step()
    assert torch.equal(got[6], keep_eager)
    for a, b in zip(got[:6], (k, v, lengths, positions, hist, hist_lengths)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_hist", [False, True], ids=["snapkv", "gkv"])
def test_opcheck(backend, with_hist):
    B, Hkv, G, C, D, W = 1, 2, 3, 29, 32, 4
    k, v, lengths, positions = make_cache(B, Hkv, C, D, lengths=torch.tensor([[29, 11]], dtype=torch.int32))
    q_win = randn(B, G * Hkv, W, D, device=DEVICE)
    hist = torch.rand(B, Hkv, C, device=DEVICE) if with_hist else None
    hist_lengths = torch.full((B, Hkv), 5, dtype=torch.int32, device=DEVICE) if with_hist else None
    from kvkern._fake import triton_twin

    op = getattr(torch.ops.kvkern, "score_evict_" if backend == "cpp" else triton_twin("score_evict_")).default
    args = (q_win, k, v, lengths, positions, None, 12, 1, 0, None, "mean", "max", True, "max", 3, hist,
            hist_lengths, 0.8, "max", 1.0, 0.5, None, None, None)
    # The test_schema utility reruns the op on copies; NaN-poisoned tails compare unequal to
    # themselves, so give it a cache without poison.
    torch.nan_to_num_(k)
    torch.nan_to_num_(v)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("pool_kernel,err", [(3.7, TypeError), (5.0, TypeError), (True, TypeError), (0, ValueError)],
                         ids=["float", "integral_float", "bool", "zero"])
def test_pool_kernel_checked_like_window_scores(pool_kernel, err):
    # Never truncated: the same error as window_scores, before anything is written.
    B, Hkv, G, C, D, W = 1, 2, 2, 24, 16, 4
    k, v, lengths, positions = make_cache(B, Hkv, C, D)
    q_win = randn(B, G * Hkv, W, D, device=DEVICE)
    before = _clone(k, v, lengths, positions)
    with pytest.raises(err, match="kvkern.window_scores: pool_kernel: expected an int"):
        kvkern.window_scores(q_win, k, lengths, pool="max", pool_kernel=pool_kernel)
    with pytest.raises(err, match="kvkern.score_evict_: pool_kernel: expected an int"):
        kvkern.score_evict_(q_win, k, v, lengths, 8, positions=positions, pool="max", pool_kernel=pool_kernel)
    valid = valid_mask(before[2], C)
    assert torch.equal(lengths, before[2]) and torch.equal(positions, before[3])
    for a, b in ((k, before[0]), (v, before[1])):
        assert torch.equal(torch.where(valid.unsqueeze(-1), a, 0), torch.where(valid.unsqueeze(-1), b, 0))
