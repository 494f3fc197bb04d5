# SPDX-License-Identifier: Apache-2.0
"""Helpers for the policy tests: run the policies on the fp64 reference ops or on the kernels.

``install_reference_ops(monkeypatch)`` replaces the front doors of :mod:`kvkern.eviction_ops`
with thin adapters over :mod:`kvkern.reference` (same signatures, fp32 score outputs), so the
policies can be tested before (and independently of) the kernels. The ``backend`` fixture of
each policy test file parametrizes over ``["reference", "kernels"]``; "kernels" is skipped
while the ops have no kernel for this device.
"""

from __future__ import annotations

import pytest
import torch

import kvkern.eviction_ops as E
import kvkern.reference as R
from kvkern._fake import triton_twin

POLICY_OPS = ("window_scores", "expected_attention_scores", "slot_scores", "key_redundancy", "update_scores_",
              "select_keep", "compact_", "evict_", "allocate_head_budgets", "score_evict_")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernels_available(device: str = DEVICE) -> list[str]:
    """The ops that have neither a C++ nor a Triton kernel for ``device`` (empty: all there)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return [op for op in POLICY_OPS
            if not (torch._C._dispatch_has_kernel_for_dispatch_key(f"kvkern::{op}", key)
                    or torch._C._dispatch_has_kernel_for_dispatch_key(f"kvkern::{triton_twin(op)}", key))]


def _f32(x):
    return x.to(torch.float32)


def window_scores(q_win, k_cache, lengths, sm_scale=None, *, query_reduce="mean", group_reduce="mean",
                  normalize=False, pool="none", pool_kernel=1, backend="auto"):
    return _f32(R.window_scores(q_win, k_cache, lengths, sm_scale, query_reduce, group_reduce, normalize, pool,
                                pool_kernel))


def expected_attention_scores(mean, cov, k_cache, lengths, *, v_cache=None, n_sink=4, epsilon=0.0, sm_scale=None,
                              backend="auto"):
    return _f32(R.expected_attention_scores(mean, cov, k_cache, v_cache, lengths, n_sink, epsilon, sm_scale))


def slot_scores(k_cache, lengths, kind, *, v_cache=None, seed=0, backend="auto"):
    return _f32(R.slot_scores(k_cache, v_cache, lengths, kind, seed))


def key_redundancy(k_cache, lengths, n_window, threshold=0.5, *, backend="auto"):
    return _f32(R.key_redundancy(k_cache, lengths, n_window, threshold))


def update_scores_(hist, new, lengths, hist_lengths, decay, mode="max", *, backend="auto"):
    return R.update_scores_(hist, new, lengths, hist_lengths, float(decay), mode)


def select_keep(scores, lengths, budget, *, positions=None, n_sink=0, n_recent=0, protect_ranges=None,
                keep_mask=None, segment_cuts=None, segment_min=None, backend="auto"):
    return R.select_keep(scores, lengths, positions, budget, n_sink, n_recent, protect_ranges, keep_mask,
                         segment_cuts, segment_min)


def compact_(k_cache, v_cache, lengths, keep, *, positions=None, hist=None, log_w=None, backend="auto"):
    return R.compact_(k_cache, v_cache, lengths, keep, positions, hist, log_w)


def evict_(k_cache, v_cache, lengths, scores, budget, *, positions=None, n_sink=0, n_recent=0, protect_ranges=None,
           keep_mask=None, segment_cuts=None, segment_min=None, hist=None, log_w=None, backend="auto"):
    return R.evict_(k_cache, v_cache, lengths, positions, scores, budget, n_sink, n_recent, protect_ranges, keep_mask,
                    segment_cuts, segment_min, hist, log_w)


def allocate_head_budgets(scores, lengths, budget, *, safeguard=0.2, n_sink=0, n_recent=0, backend="auto"):
    return R.allocate_head_budgets(scores, lengths, budget, safeguard, n_sink, n_recent)


def score_evict_(q_win, k_cache, v_cache, lengths, budget, *, positions=None, n_sink=0, n_recent=0, sm_scale=None,
                 query_reduce="mean", group_reduce="max_per_query", normalize=True, pool="none", pool_kernel=1,
                 hist=None, hist_lengths=None, decay=0.8, hist_mode="max", mix_lambda=1.0,
                 redundancy_threshold=0.5, protect_ranges=None, keep_mask=None, log_w=None, backend="auto"):
    return R.score_evict_(q_win, k_cache, v_cache, lengths, positions, budget, n_sink, n_recent, sm_scale,
                          query_reduce, group_reduce, normalize, pool, pool_kernel, hist, hist_lengths, float(decay),
                          hist_mode, float(mix_lambda), float(redundancy_threshold), protect_ranges, keep_mask, log_w)


def install_reference_ops(monkeypatch) -> None:
    """Points every score-and-evict front door of kvkern.eviction_ops at the reference."""
    g = globals()
    for op in POLICY_OPS:
        monkeypatch.setattr(E, op, g[op])


def select_backend(name: str, monkeypatch) -> str:
    """Body of the ``backend`` fixtures: "reference" patches the front doors, "kernels" skips
    unless every op has a kernel here."""
    if name == "reference":
        install_reference_ops(monkeypatch)
    else:
        missing = kernels_available()
        if missing:
            pytest.skip(f"no {DEVICE} kernel yet for: {', '.join(missing)}")
    return name


def inv_freq(D: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
