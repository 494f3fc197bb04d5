# SPDX-License-Identifier: Apache-2.0
"""Score-based methods with one budget for every head (spec §3, §4): each is a score op
followed by ``evict_`` with the method's protections."""

from __future__ import annotations

import torch

from .base import EvictionPolicy, _check_window, ops
from .cache import LayerCache

__all__ = ["StreamingLLM", "KNorm", "KeyDiff", "RandomEviction", "SnapKV", "TOVA", "H2O", "ExpectedAttention"]


class StreamingLLM(EvictionPolicy):
    """StreamingLLM (KVPress ``StreamingLLMPress``): keeps the first ``n_sink`` tokens and the
    most recent ``budget - n_sink``. Scores are the slot index (``slot_scores`` "recency");
    positions are not re-rotated (KVPress's behaviour). Observes nothing."""

    def __init__(self, budget=None, ratio=None, *, n_sink: int = 4, **kw):
        super().__init__(budget, ratio, **kw)
        self.n_sink = n_sink

    def scores(self, cache: LayerCache, **obs) -> torch.Tensor:
        return ops().slot_scores(cache.k, cache.lengths, "recency", backend=self.backend)


class KNorm(EvictionPolicy):
    """KNorm (KVPress ``KnormPress``): keeps the keys with the smallest L2 norm. Observes nothing."""

    def scores(self, cache: LayerCache, **obs) -> torch.Tensor:
        return ops().slot_scores(cache.k, cache.lengths, "key_norm", backend=self.backend)


class KeyDiff(EvictionPolicy):
    """KeyDiff (KVPress ``KeyDiffPress``): keeps the keys least similar (cosine) to the mean
    normalised key of the head. Observes nothing. (The paper's block-wise variant is this
    policy applied every ``block`` appended tokens: ``every=block`` with :meth:`step`.)"""

    def scores(self, cache: LayerCache, **obs) -> torch.Tensor:
        return ops().slot_scores(cache.k, cache.lengths, "keydiff", backend=self.backend)


class RandomEviction(EvictionPolicy):
    """Uniformly random eviction (KVPress ``RandomPress``), the baseline every method must beat.
    The ``i``-th compression uses ``seed + i`` (counter-based, identical on every backend)."""

    def __init__(self, budget=None, ratio=None, *, seed: int = 0, **kw):
        super().__init__(budget, ratio, **kw)
        self.seed = seed
        self._calls = 0

    def scores(self, cache: LayerCache, **obs) -> torch.Tensor:
        s = ops().slot_scores(cache.k, cache.lengths, "random", seed=self.seed + self._calls, backend=self.backend)
        self._calls += 1
        return s


class SnapKV(EvictionPolicy):
    """SnapKV (KVPress ``SnapKVPress``): mean attention of the last ``window`` queries (softmax
    over all slots, causal inside the window), average pooling (``kernel``, zero padding
    counted), mean over the GQA group; the window's slots are always kept.

    Observes: ``q_win`` ``[B, Hq, >= window, D]`` post-RoPE queries whose last one is the token
    in each head's newest slot (only the last ``window`` are used).
    The budget includes the window, so ``budget >= window`` (else ``evict_`` raises).
    """

    def __init__(self, budget=None, ratio=None, *, window: int = 64, kernel: int = 5, group_reduce: str = "mean",
                 **kw):
        super().__init__(budget, ratio, **kw)
        self.window = window
        self.kernel = kernel
        self.group_reduce = group_reduce
        self.n_recent = window

    def scores(self, cache: LayerCache, q_win: torch.Tensor | None = None, **obs) -> torch.Tensor:
        q = _check_window(type(self).__name__, q_win, self.window)
        return ops().window_scores(q.to(cache.k.dtype), cache.k, cache.lengths, query_reduce="mean",
                                   group_reduce=self.group_reduce, pool="avg" if self.kernel > 1 else "none",
                                   pool_kernel=self.kernel, backend=self.backend)


class TOVA(EvictionPolicy):
    """TOVA (KVPress ``TOVAPress``): attention of the last query averaged over ALL query heads,
    the same score (so the same kept set) for every kv head; the last token is always kept.
    The original TOVA evicts one token per decoding step once full: ``every=1`` with
    :meth:`step`.

    Observes: ``q_win`` ``[B, Hq, >= 1, D]`` (the last query is used).
    """

    def __init__(self, budget=None, ratio=None, **kw):
        super().__init__(budget, ratio, **kw)
        self.n_recent = 1

    def scores(self, cache: LayerCache, q_win: torch.Tensor | None = None, **obs) -> torch.Tensor:
        q = _check_window(type(self).__name__, q_win, 1)
        return ops().window_scores(q.to(cache.k.dtype), cache.k, cache.lengths, query_reduce="mean",
                                   group_reduce="mean_all", backend=self.backend)


class H2O(EvictionPolicy):
    """H2O / heavy hitters: attention accumulated over every query the layer has seen, with the
    decode-time accumulation KVPress's ``ObservedAttentionPress`` lacks (its issue #189).

    State: ``cache.hist`` holds the raw column sums ``sum_t a[t, i]`` (mean over the GQA group;
    ``update_scores_`` "sum" adds each forward's attention, decayed by ``decay``),
    ``cache.hist_lengths`` the slots that have one; both are allocated on first use.

    Score (``normalize=True``, default): the sum divided by the number of queries that saw the
    key, ``next_position - position_i``; at a from-scratch prefill that is exactly
    ObservedAttention's ``colsum / (N - j)``, and during decoding it stays the mean attention the
    key received. ``normalize=False`` is the original H2O's raw sum (which favours old tokens).

    Observes: ``q`` ``[B, Hq, T, D]`` post-RoPE queries of the ``T`` newest tokens (the prompt at
    prefill, one token per decoding step). Pass them to :meth:`observe` on every forward (or to
    :meth:`compress` / :meth:`step`, which observe first); the attention is computed by
    ``window_scores`` with ``W = T`` and ``query_reduce="sum"``, never as a ``T x N`` matrix.
    """

    def __init__(self, budget=None, ratio=None, *, n_sink: int = 0, n_recent: int = 0, normalize: bool = True,
                 decay: float = 1.0, **kw):
        super().__init__(budget, ratio, **kw)
        self.n_sink = n_sink
        self.n_recent = n_recent
        self.normalize = normalize
        self.decay = decay

    def observe(self, cache: LayerCache, q: torch.Tensor) -> None:
        """Adds the attention of ``q`` (the ``T`` newest tokens' queries) to ``cache.hist``."""
        cache.ensure_hist()
        new = ops().window_scores(q.to(cache.k.dtype), cache.k, cache.lengths, query_reduce="sum",
                                  group_reduce="mean", backend=self.backend)
        ops().update_scores_(cache.hist, new, cache.lengths, cache.hist_lengths, self.decay, "sum",
                             backend=self.backend)
        cache.hist_lengths.copy_(cache.lengths)

    def scores(self, cache: LayerCache, **obs) -> torch.Tensor:
        if cache.hist is None:
            raise ValueError("H2O: the cache has no accumulated attention; call observe(cache, q) with every "
                             "forward's queries (or pass q= to compress/step)")
        if not self.normalize:
            return cache.hist
        seen = (cache.n_seen - cache.positions.to(torch.float32)).clamp_min(1.0)
        return cache.hist / seen

    def compress(self, cache: LayerCache, q: torch.Tensor | None = None, **obs):
        if q is not None:
            self.observe(cache, q)
        return super().compress(cache, **obs)

    def step(self, cache: LayerCache, step: int, q: torch.Tensor | None = None, **obs):
        # Accumulation happens on every step; only the eviction is periodic.
        if q is not None:
            self.observe(cache, q)
        return super().step(cache, step, **obs)


class ExpectedAttention(EvictionPolicy):
    """Expected Attention (KVPress ``ExpectedAttentionPress``, spec §3): the softmax of the
    expected logit of a Gaussian future query, times ``||v||``; the first ``n_sink`` slots kept.

    Statistics: mean and covariance of a buffer of PRE-RoPE queries (``query_statistics``,
    skipping its first ``n_sink``), rotated by the RoPE matrix averaged over the ``n_future``
    positions that start at the ABSOLUTE next position (``average_rope``; KVPress uses the buffer
    length, which is only right at a from-scratch prefill).

    Args:
        inv_freq: ``[rotary_dim / 2]`` the model's RoPE inverse frequencies (HF rotate-half).
        attention_scaling: the model's rotary scaling factor (1 for plain RoPE).
        use_covariance / use_vnorm / epsilon: KVPress's options (defaults: on, on, 0).
    Observes: ``q_prerope`` ``[B, Hq, T, D]`` (prefill: the prompt's; decoding: the last few
    hundred steps', e.g. a ``QueryWindow(256)``); ``start_position`` (default
    ``cache.n_seen``).
    """

    def __init__(self, budget=None, ratio=None, *, inv_freq: torch.Tensor, n_future: int = 512, n_sink: int = 4,
                 use_covariance: bool = True, use_vnorm: bool = True, epsilon: float = 0.0,
                 attention_scaling: float = 1.0, sm_scale: float | None = None, **kw):
        super().__init__(budget, ratio, **kw)
        self.inv_freq = inv_freq
        self.n_future = n_future
        self.n_sink = n_sink
        self.use_covariance = use_covariance
        self.use_vnorm = use_vnorm
        self.epsilon = epsilon
        self.attention_scaling = attention_scaling
        self.sm_scale = sm_scale

    def statistics(self, q_prerope: torch.Tensor, start_position: int):
        """``(mean [B, Hq, D], cov [B, Hq, D, D] or None)`` float32, already rotated."""
        mean, cov = ops().query_statistics(q_prerope, self.n_sink)
        return ops().average_rope(mean, cov if self.use_covariance else None, self.inv_freq.to(mean.device),
                                  int(start_position), self.n_future, self.attention_scaling)

    def scores(self, cache: LayerCache, q_prerope: torch.Tensor | None = None, start_position: int | None = None,
               **obs) -> torch.Tensor:
        if q_prerope is None:
            raise ValueError("ExpectedAttention: needs q_prerope, a buffer of pre-RoPE queries [B, Hq, T, D]")
        start = cache.n_seen if start_position is None else int(start_position)
        mean, cov = self.statistics(q_prerope, start)
        return ops().expected_attention_scores(mean, cov, cache.k, cache.lengths,
                                               v_cache=cache.v if self.use_vnorm else None, n_sink=self.n_sink,
                                               epsilon=self.epsilon, sm_scale=self.sm_scale, backend=self.backend)
