# SPDX-License-Identifier: Apache-2.0
"""The shape every policy shares: score -> protect -> select -> compact (spec §1).

A policy only calls the public front doors of :mod:`kvkern.eviction_ops` (looked up on the
module at call time, so tests can swap in the fp64 reference). It owns no tensors: the state
lives in the :class:`~kvkern.policies.cache.LayerCache` it compresses (``hist`` for G-KV and
H2O), so one policy object per layer (or one shared by all layers) both work.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import eviction_ops as _ops
from .cache import LayerCache

__all__ = ["EvictionPolicy", "ops", "protected_slots", "segment_cuts_from_spans"]


def ops():
    """The front-door module (resolved per call: tests monkeypatch its functions)."""
    return _ops


def _as_ranges(x, device) -> torch.Tensor | None:
    if x is None:
        return None
    t = torch.as_tensor(x, dtype=torch.int32, device=device)
    if t.dim() == 1:
        t = t.view(-1, 2)
    return t


def segment_cuts_from_spans(span_starts: Sequence[int]) -> torch.Tensor:
    """Segment cuts for fair eviction from the start positions of consecutive spans
    (e.g. ``[0, e]`` for the Pitfalls paper's earlier/later instruction spans): int32 ``[S-1]``
    (the first start is implicit: segment 0 is open to the left)."""
    starts = sorted(int(s) for s in span_starts)
    return torch.tensor(starts[1:], dtype=torch.int32)


def protected_slots(cache: LayerCache, n_sink: int = 0, n_recent: int = 0, protect_ranges=None,
                    keep_mask=None) -> torch.Tensor:
    """bool ``[B, Hkv, C]``: the valid slots a selection must keep (the first ``n_sink``
    slots, the last ``n_recent`` valid ones, positions inside ``protect_ranges`` rows
    ``[start, end)``, ``keep_mask``): what ``select_keep`` protects."""
    B, H, C = cache.positions.shape
    slot = torch.arange(C, device=cache.k.device).view(1, 1, C)
    L = cache.lengths.to(torch.int64).unsqueeze(-1)
    prot = (slot < n_sink) | (slot >= L - n_recent)
    pr = _as_ranges(protect_ranges, cache.k.device)
    if pr is not None and pr.numel():
        pr = pr.to(torch.int64)
        if pr.dim() == 2:
            pr = pr.unsqueeze(0).expand(B, -1, -1)
        pos = cache.positions.to(torch.int64).unsqueeze(-1)
        prot = prot | ((pos >= pr[..., 0].view(B, 1, 1, -1)) & (pos < pr[..., 1].view(B, 1, 1, -1))).any(-1)
    if keep_mask is not None:
        prot = prot | keep_mask.to(torch.bool)
    return prot & (slot < L)


class EvictionPolicy:
    """Base class: a kept-token count or a ratio, protections, and the compress/step loop.

    Args:
        budget: kept slots per (batch, kv head) after a compression, protected slots included.
        ratio: fraction of tokens REMOVED (KVPress convention): ``n_kept = max(1, floor(N * (1 -
            ratio)))`` with ``N = cache.n_seen``, the tokens this layer has seen (the cache length
            at a from-scratch prefill, KVPress's ``ScorerPress``; the tokens seen so far during
            decoding, KVPress's ``CompressionRatioDecodingPress``). Exactly one of the two.
        every: decoding period: :meth:`step` compresses when ``step % every == 0`` (step 0 is the
            prefill). ``None``: only at step 0 (prefill-only, KVPress's default).
        protect_ranges: Pitfalls whitelist: int ``[R, 2]`` (or ``[B, R, 2]``) rows ``[start, end)``
            of token positions kept in every head (system prompt, instructions).
        keep_mask: bool ``[B, Hkv, C]`` slots kept this time (another stage's picks).
        segment_cuts: Pitfalls fair eviction: increasing positions splitting the tokens into spans
            that each keep a proportional share of the budget (see ``segment_cuts_from_spans``).
        segment_min: int ``[S]``: instead of proportional quotas, at least this many per span.
        backend: passed to every op ("auto" | "cpu" | "cuda" | "triton").

    Subclasses set ``n_sink`` / ``n_recent`` (what the method itself protects) and implement
    :meth:`scores`; some override :meth:`compress`.
    """

    n_sink: int = 0
    n_recent: int = 0

    def __init__(self, budget: int | None = None, ratio: float | None = None, *, every: int | None = None,
                 protect_ranges=None, keep_mask: torch.Tensor | None = None, segment_cuts=None, segment_min=None,
                 backend: str = "auto"):
        name = type(self).__name__
        if (budget is None) == (ratio is None):
            raise ValueError(f"{name}: give exactly one of budget (kept tokens) and ratio (fraction removed), "
                             f"got budget={budget!r}, ratio={ratio!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"{name}: budget: expected an int >= 0, got {budget!r}")
        if ratio is not None and not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"{name}: ratio: expected a fraction removed in [0, 1), got {ratio!r}")
        if every is not None and every < 1:
            raise ValueError(f"{name}: every: expected an int >= 1 or None, got {every!r}")
        self.budget = budget
        self.ratio = None if ratio is None else float(ratio)
        self.every = every
        self.protect_ranges = protect_ranges
        self.keep_mask = keep_mask
        self.segment_cuts = segment_cuts
        self.segment_min = segment_min
        self.backend = backend

    # -- budget ---------------------------------------------------------------------------
    def n_kept(self, n_tokens: int) -> int:
        """Kept tokens for a layer that has seen ``n_tokens``."""
        if self.budget is not None:
            return self.budget
        if self.ratio == 0.0:
            return n_tokens
        return max(1, int(n_tokens * (1.0 - self.ratio)))

    def target(self, cache: LayerCache):
        """The budget handed to ``evict_``: an int, or int32 ``[B, Hkv]`` for head-wise methods."""
        return self.n_kept(cache.n_seen)

    def needs_compression(self, cache: LayerCache) -> bool:
        """Whether some head holds more than its budget (one host sync; True under compile)."""
        if torch.compiler.is_compiling():
            return True
        t = self.target(cache)
        if isinstance(t, torch.Tensor):
            return bool((cache.lengths > t.to(cache.lengths.device)).any())
        return bool((cache.lengths > t).any())

    # -- protections ----------------------------------------------------------------------
    def selection_kwargs(self, cache: LayerCache) -> dict:
        dev = cache.k.device
        cuts = self.segment_cuts
        if cuts is not None:
            cuts = torch.as_tensor(cuts, dtype=torch.int32, device=dev).flatten()
        mins = self.segment_min
        if mins is not None:
            mins = torch.as_tensor(mins, dtype=torch.int32, device=dev).flatten()
        return dict(positions=cache.positions, n_sink=self.n_sink, n_recent=self.n_recent,
                    protect_ranges=_as_ranges(self.protect_ranges, dev), keep_mask=self.keep_mask,
                    segment_cuts=cuts, segment_min=mins)

    # -- the method -----------------------------------------------------------------------
    def scores(self, cache: LayerCache, **obs) -> torch.Tensor:
        """float32 ``[B, Hkv, C]``, higher = keep. ``obs``: what the method observes (queries)."""
        raise NotImplementedError

    def compress(self, cache: LayerCache, **obs) -> torch.Tensor | None:
        """Evicts down to the budget in place (heads within budget are untouched).

        Returns the keep mask bool ``[B, Hkv, C]`` (before compaction), or None when no head
        was over budget (nothing scored). Mutates the cache (k, v, lengths, positions, hist, log_w).
        """
        if not self.needs_compression(cache):
            return None
        s = self.scores(cache, **obs)
        return self._evict(cache, s, self.target(cache))

    def step(self, cache: LayerCache, step: int, **obs) -> torch.Tensor | None:
        """Decode-loop hook: compresses at ``step == 0`` (prefill) and every ``every`` steps."""
        if step == 0 or (self.every is not None and step % self.every == 0):
            return self.compress(cache, **obs)
        return None

    # -- helpers --------------------------------------------------------------------------
    def _check_budget(self, budget) -> None:
        # A budget below what the method protects can never be met (the op would say so too,
        # but naming the policy and its window helps more).
        if isinstance(budget, int) and budget < self.n_sink + self.n_recent:
            raise ValueError(f"{type(self).__name__}: budget {budget} is smaller than the {self.n_sink} sink and "
                             f"{self.n_recent} recent slots the method always keeps")

    def _evict(self, cache: LayerCache, scores: torch.Tensor, budget, **overrides) -> torch.Tensor:
        self._check_budget(budget)
        kw = self.selection_kwargs(cache)
        kw.update(overrides)
        old_hist_len = cache.hist_lengths.clone() if cache.hist_lengths is not None else None
        keep = ops().evict_(cache.k, cache.v, cache.lengths, scores, budget, hist=cache.hist, log_w=cache.log_w,
                            backend=self.backend, **kw)
        if old_hist_len is not None:
            # Compaction keeps slot order, so the kept slots that had a history stay a prefix.
            C = keep.shape[-1]
            slot = torch.arange(C, device=keep.device).view(1, 1, C)
            had = keep & (slot < old_hist_len.to(torch.int64).unsqueeze(-1))
            cache.hist_lengths.copy_(had.sum(-1).to(cache.hist_lengths.dtype))
        return keep

    def __repr__(self) -> str:
        what = f"budget={self.budget}" if self.budget is not None else f"ratio={self.ratio}"
        return f"{type(self).__name__}({what})"


def _check_window(name: str, q_win: torch.Tensor | None, window: int) -> torch.Tensor:
    if q_win is None:
        raise ValueError(f"{name}: needs q_win, the last {window} post-RoPE queries [B, Hq, W, D] "
                         "(kvkern.policies.QueryWindow keeps them)")
    if q_win.dim() != 4 or q_win.shape[2] < window:
        raise ValueError(f"{name}: q_win: expected [B, Hq, W >= {window}, D] post-RoPE queries, "
                         f"got {list(q_win.shape)}")
    return q_win[:, :, q_win.shape[2] - window:]

