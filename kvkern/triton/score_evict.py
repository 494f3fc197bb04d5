# SPDX-License-Identifier: Apache-2.0
"""score_evict_triton_: the fused decode-time eviction as a chain of the Triton ops.

Each stage is one of the Triton kernels (window scores, global-score update, key
redundancy, selection + compaction); the glue between them is a handful of
element-wise tensor ops on [B, Hkv, C] scores, no host sync and no data-dependent
shape, so the chain is capturable in a CUDA graph. The semantics are
kvkern.reference.score_evict_: heads with ``L <= budget`` are left completely
untouched (their update region is empty and selection keeps them whole).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MODES = ("max", "ema", "sum")


def _pool(scores: torch.Tensor, region: torch.Tensor, pool: str, kernel: int) -> torch.Tensor:
    # Pooling over the candidate slots [0, region) only, as reference.pool_scores.
    if pool == "none" or kernel == 1:
        return scores
    B, H, C = scores.shape
    inside = torch.arange(C, device=scores.device).view(1, 1, C) < region.unsqueeze(-1)
    fill = 0.0 if pool == "avg" else float("-inf")
    x = torch.where(inside, scores, torch.full_like(scores, fill)).view(B * H, 1, C)
    r = kernel // 2
    if pool == "avg":
        pooled = F.avg_pool1d(F.pad(x, (r, r)), kernel, stride=1)
    else:
        pooled = F.max_pool1d(F.pad(x, (r, r), value=float("-inf")), kernel, stride=1)
    return torch.where(inside, pooled.view(B, H, C), scores)


def score_evict_triton_(q_win, k_cache, v_cache, lengths, positions, budgets, budget, n_sink=0, n_recent=0,
                        sm_scale=None, query_reduce="mean", group_reduce="max_per_query", normalize=True, pool="none",
                        pool_kernel=1, hist=None, hist_lengths=None, decay=0.8, hist_mode="max", mix_lambda=1.0,
                        redundancy_threshold=0.5, protect_ranges=None, keep_mask=None, log_w=None):
    op = "kvkern::score_evict_triton_"
    if q_win.dim() != 4:
        raise ValueError(f"{op}: q_win: expected a 4-D tensor [B, Hq, W, D], got shape {list(q_win.shape)}")
    if (hist is None) != (hist_lengths is None):
        raise ValueError(f"{op}: hist and hist_lengths: expected both or neither")
    if hist_mode not in _MODES:
        raise ValueError(f"{op}: hist_mode: expected one of {list(_MODES)}, got {hist_mode!r}")
    if not 0.0 <= mix_lambda <= 1.0:
        raise ValueError(f"{op}: mix_lambda: expected a value in [0, 1], got {mix_lambda}")
    W = q_win.shape[2]
    ops = torch.ops.kvkern
    L = lengths.to(torch.int64)
    limit = budgets.to(torch.int64) if budgets is not None else torch.full_like(L, budget)
    active = L > limit
    region = torch.where(active, (L - W).clamp(min=0), torch.zeros_like(L))
    scores = ops.window_scores_triton(q_win, k_cache, lengths, sm_scale, query_reduce, group_reduce, normalize,
                                      pool if hist is None else "none", pool_kernel if hist is None else 1)
    if hist is not None:
        ops.update_scores_triton_(hist, scores, region.to(torch.int32), hist_lengths, decay, hist_mode)
        C = scores.shape[-1]
        cand = torch.arange(C, device=scores.device).view(1, 1, C) < region.unsqueeze(-1)
        scores = _pool(torch.where(cand, hist, scores), region, pool, pool_kernel)
    if mix_lambda < 1.0:
        red = ops.key_redundancy_triton(k_cache, lengths, W, redundancy_threshold)
        scores = mix_lambda * scores - (1.0 - mix_lambda) * red
    keep = ops.evict_triton_(k_cache, v_cache, lengths, positions, scores, budgets, budget, n_sink, max(n_recent, W),
                             protect_ranges, keep_mask, None, None, hist, log_w)
    if hist_lengths is not None:
        new_hist = (lengths.to(torch.int64) - W).clamp(min=0)
        hist_lengths.copy_(torch.where(active, new_hist, hist_lengths.to(torch.int64)).to(hist_lengths.dtype))
    return keep


KERNELS = {"score_evict_triton_": score_evict_triton_}
