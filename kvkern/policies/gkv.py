# SPDX-License-Identifier: Apache-2.0
"""G-KV: decoding-time eviction with a global (decayed-max) score (spec §2)."""

from __future__ import annotations

import torch

from .base import EvictionPolicy, _check_window, ops
from .cache import LayerCache

__all__ = ["GKV"]


class GKV(EvictionPolicy):
    """G-KV (``microsoft/G-KV``'s recipe): every ``divide_length`` decoding steps, and at the
    prefill if the prompt is longer than the budget, one fused ``score_evict_``:

    window attention of the last ``window`` queries (for each window query the max over its GQA
    group, then the mean over the window: ``mean_t max_h``, spec §2(b) step 1; max-normalised
    per head when the score cache is on), merged into the per-slot global score
    ``hist = max(alpha * hist, s)`` (``hist_mode``), mixed with the key-redundancy penalty
    ``mix_lambda * g - (1 - mix_lambda) * redundancy``; the window is always kept, then exactly
    ``budget`` slots survive. With the defaults the cache length oscillates between ``budget``
    and ``budget + divide_length - 1``. No sinks are protected (G-KV's choice).

    Args:
        budget: 2048 (G-KV's recipe); or ``ratio``. ``budget`` must exceed ``window``.
        window: 16; divide_length: 128; alpha: 0.8 (the decay per compression event);
        hist_mode: "max" (G-KV), "ema" or "sum"; mix_lambda: 0.5 (1 disables redundancy);
        use_history: False scores each round alone (SnapKV-style, the paper's "no score cache"
        ablation); normalize: None = the same as ``use_history`` (spec §2(b) step 2 divides the
        local score by its per-head max only with the score cache), or an explicit bool;
        group_reduce: "max_per_query" (G-KV's ``mean_t max_h``); "max" is ``max_h mean_t``
        (AdaKV / SnapKV's order), "mean" the group mean; pool / pool_kernel: "none" / 1
        (SnapKV and R-KV baselines use "max" / 5).
    State: ``cache.hist`` / ``cache.hist_lengths`` (allocated on first use).
    Observes: ``q_win`` ``[B, Hq, >= window, D]`` post-RoPE queries (last one = newest slot).
    """

    def __init__(self, budget: int | None = 2048, ratio: float | None = None, *, window: int = 16,
                 divide_length: int = 128, alpha: float = 0.8, hist_mode: str = "max", mix_lambda: float = 0.5,
                 normalize: bool | None = None, group_reduce: str = "max_per_query", use_history: bool = True,
                 redundancy_threshold: float = 0.5, pool: str = "none", pool_kernel: int = 1, n_sink: int = 0,
                 **kw):
        if ratio is not None and budget == 2048:
            budget = None  # the class default yields to an explicit ratio
        super().__init__(budget, ratio, every=divide_length, **kw)
        if budget is not None and budget <= window:
            raise ValueError(f"GKV: budget: expected more than window={window} slots, got {budget}")
        self.window = window
        self.divide_length = divide_length
        self.alpha = alpha
        self.hist_mode = hist_mode
        self.mix_lambda = mix_lambda
        self.normalize = bool(use_history) if normalize is None else bool(normalize)
        self.group_reduce = group_reduce
        self.use_history = use_history
        self.redundancy_threshold = redundancy_threshold
        self.pool = pool
        self.pool_kernel = pool_kernel
        self.n_sink = n_sink
        self.n_recent = window

    def compress(self, cache: LayerCache, q_win: torch.Tensor | None = None, **obs):
        """One G-KV round (heads within budget untouched). Returns the keep mask or None."""
        if not self.needs_compression(cache):
            return None
        q = _check_window(type(self).__name__, q_win, self.window)
        self._check_budget(self.target(cache))
        if self.use_history:
            cache.ensure_hist()
        kw = self.selection_kwargs(cache)
        if kw["segment_cuts"] is not None:
            raise ValueError("GKV: segment_cuts are not supported by score_evict_; use a scorer policy")
        return ops().score_evict_(
            q.to(cache.k.dtype), cache.k, cache.v, cache.lengths, self.target(cache), positions=cache.positions,
            n_sink=self.n_sink, n_recent=0, group_reduce=self.group_reduce, normalize=self.normalize,
            pool=self.pool, pool_kernel=self.pool_kernel, hist=cache.hist if self.use_history else None,
            hist_lengths=cache.hist_lengths if self.use_history else None, decay=self.alpha,
            hist_mode=self.hist_mode, mix_lambda=self.mix_lambda, redundancy_threshold=self.redundancy_threshold,
            protect_ranges=kw["protect_ranges"], keep_mask=kw["keep_mask"], log_w=cache.log_w,
            backend=self.backend)

    def scores(self, cache: LayerCache, q_win: torch.Tensor | None = None, **obs) -> torch.Tensor:
        """The local score of this round (normalised when ``self.normalize``) (no history, no redundancy): what G-KV's
        global score merges in. For inspection; :meth:`compress` runs the fused op."""
        q = _check_window(type(self).__name__, q_win, self.window)
        return ops().window_scores(q.to(cache.k.dtype), cache.k, cache.lengths, query_reduce="mean",
                                   group_reduce=self.group_reduce, normalize=self.normalize, backend=self.backend)
