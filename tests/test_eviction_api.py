# SPDX-License-Identifier: Apache-2.0
"""The score-and-evict front doors: argument errors, the statistics helpers, the AdaKV flow."""

from __future__ import annotations

import pytest
import torch

import kvkern
from kvkern import reference

from eviction_utils import DEVICE, make_cache
from utils import randn


def _bits(t: torch.Tensor) -> torch.Tensor:
    # NaN-aware identity: compare the raw bits, so poisoned slots count too.
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).clone()


def _snapshot(*ts):
    return [_bits(t) for t in ts]


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(query_reduce="avg"), ValueError, "query_reduce"),
        (dict(group_reduce="min"), ValueError, "group_reduce"),
        (dict(pool="sum"), ValueError, "pool"),
        (dict(pool_kernel=0), ValueError, "pool_kernel"),
        (dict(backend="fpga"), ValueError, "backend"),
    ],
)
def test_window_scores_bad_options(kwargs, exc, words):
    k, v, lengths, _ = make_cache(1, 2, 16, 64)
    q_win = randn(1, 4, 3, 64, device=DEVICE)
    with pytest.raises(exc, match=words):
        kvkern.window_scores(q_win, k, lengths, **kwargs)


def test_not_a_tensor():
    k, v, lengths, _ = make_cache(1, 2, 16, 64)
    with pytest.raises(TypeError, match="q_win"):
        kvkern.window_scores([1.0], k, lengths)
    with pytest.raises(TypeError, match="budget"):
        kvkern.select_keep(torch.rand(1, 2, 16, device=DEVICE), lengths, 3.5)


def test_infeasible_protection_raises_and_leaves_the_cache_alone():
    k, v, lengths, positions = make_cache(2, 2, 40, 64, lengths=40)
    scores = torch.rand(2, 2, 40, device=DEVICE)
    before = _snapshot(k, v, lengths, positions)
    with pytest.raises(ValueError, match="budget"):
        kvkern.evict_(k, v, lengths, scores, 10, positions=positions, n_sink=4, n_recent=8)
    with pytest.raises(ValueError, match="budget"):
        kvkern.evict_(k, v, lengths, scores, 20, positions=positions,
                      protect_ranges=torch.tensor([[0, 25]], dtype=torch.int32, device=DEVICE))
    after = _snapshot(k, v, lengths, positions)
    for a, b in zip(before, after):
        assert torch.equal(a, b), "a rejected eviction wrote to the cache"


def test_budget_tensor_is_checked():
    k, v, lengths, positions = make_cache(1, 2, 16, 64)
    scores = torch.rand(1, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="budget: expected dtype int32"):
        kvkern.evict_(k, v, lengths, scores, torch.full((1, 2), 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"budget: expected shape \[B, Hkv\]"):
        kvkern.evict_(k, v, lengths, scores, torch.full((2, 2), 4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="budget: expected an int >= 0"):
        kvkern.select_keep(scores, lengths, -1)


def test_score_evict_option_errors():
    k, v, lengths, positions = make_cache(1, 2, 16, 64)
    q_win = randn(1, 2, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="hist and hist_lengths"):
        kvkern.score_evict_(q_win, k, v, lengths, 8, hist=torch.rand(1, 2, 16, device=DEVICE))
    with pytest.raises(ValueError, match="mix_lambda"):
        kvkern.score_evict_(q_win, k, v, lengths, 8, mix_lambda=1.5)
    with pytest.raises(ValueError, match="hist_mode"):
        kvkern.score_evict_(q_win, k, v, lengths, 8, hist_mode="min")
    with pytest.raises(ValueError, match="safeguard"):
        kvkern.allocate_head_budgets(torch.rand(1, 2, 16, device=DEVICE), lengths, 4, safeguard=1.5)
    with pytest.raises(ValueError, match="decay"):
        kvkern.update_scores_(torch.rand(1, 2, 16, device=DEVICE), torch.rand(1, 2, 16, device=DEVICE), lengths,
                              lengths, float("inf"))


def test_statistics_helpers_match_reference():
    B, Hq, T, D = 2, 3, 40, 16
    q = randn(B, Hq, T, D, device=DEVICE)
    mean, cov = kvkern.query_statistics(q, n_sink=4)
    rmean, rcov = reference.query_statistics(q, n_sink=4)
    torch.testing.assert_close(mean.double(), rmean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cov.double(), rcov, atol=1e-5, rtol=1e-5)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 6, 2, dtype=torch.float32) / 6))  # partial rotary: 6 of 16
    m2, c2 = kvkern.average_rope(mean, cov, inv_freq, start_position=1000, n_future=64)
    rm2, rc2 = reference.average_rope(rmean, rcov, inv_freq, 1000, 64)
    torch.testing.assert_close(m2.double(), rm2, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(c2.double(), rc2, atol=1e-4, rtol=1e-4)
    # Channels past the rotary dim pass through.
    torch.testing.assert_close(m2[..., 6:8], mean[..., 6:8])
    with pytest.raises(ValueError, match="n_sink"):
        kvkern.query_statistics(q[:, :, :3], n_sink=4)
    with pytest.raises(ValueError, match="inv_freq"):
        kvkern.average_rope(mean, cov, torch.ones(9), 0)


def test_average_rope_equals_mean_of_rotations():
    # The spec's oracle: R̄ x == mean_p RoPE(x, p) with HF's rotate-half RoPE.
    D, F, start = 8, 37, 123
    inv_freq = 1.0 / (100.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    x = torch.randn(1, 1, D, dtype=torch.float64)
    pos = torch.arange(start, start + F, dtype=torch.float64)
    ang = torch.cat([pos[:, None] * inv_freq[None]] * 2, dim=-1)  # [F, D]
    rot_half = torch.cat([-x[..., D // 2:], x[..., : D // 2]], dim=-1)
    expected = (x * torch.cos(ang) + rot_half * torch.sin(ang)).mean(1, keepdim=True)  # [1, 1, D]
    got, _ = kvkern.average_rope(x.float(), None, inv_freq.float(), start, F)
    torch.testing.assert_close(got.double(), expected.view(1, 1, D), atol=1e-5, rtol=1e-5)


def test_adakv_flow_really_frees_slots():
    # allocate_head_budgets -> evict_ with head-wise budgets: per-head lengths differ, the layer
    # total is exact, and attention over the compacted cache equals masked full attention.
    B, Hkv, G, C, D, budget = 1, 4, 2, 64, 64, 16
    k, v, lengths, positions = make_cache(B, Hkv, C, D, lengths=C)
    scores = torch.rand(B, Hkv, C, device=DEVICE) * torch.tensor([1.0, 3.0, 0.3, 1.0], device=DEVICE).view(1, -1, 1)
    budgets = kvkern.allocate_head_budgets(scores, lengths, budget, safeguard=0.2)
    assert int(budgets.sum()) == Hkv * budget
    assert (budgets >= int(budget * 0.2)).all()
    q = randn(B, G * Hkv, D, device=DEVICE)
    k0, v0 = k.clone(), v.clone()
    keep = kvkern.evict_(k, v, lengths, scores, budgets, positions=positions)
    assert torch.equal(lengths, budgets)
    out = kvkern.decode_attention(q, k, v, lengths)
    log_w = torch.where(keep, 0.0, float("-inf"))
    expected, _ = reference.decode_attention(q, k0, v0, torch.full_like(lengths, C), log_w)
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
