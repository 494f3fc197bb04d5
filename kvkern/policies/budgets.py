# SPDX-License-Identifier: Apache-2.0
"""Methods that change how the budget is shared: per layer (PyramidKV), per head (AdaKV),
per layer and head from a head-behaviour profile (SurfaceLogicKV)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import EvictionPolicy, ops, protected_slots
from .cache import LayerCache
from .scorers import SnapKV

__all__ = ["pyramid_budgets", "PyramidKV", "AdaKV", "head_behaviour_profile", "surfacelogic_budgets",
           "SurfaceLogicKV"]


def _pyramid_layer(n: int, base: float, window: int, num_layers: int, beta: float, layer: int) -> int:
    # Operation order follows KVPress's PyramidKVPress.get_layer_budget so the rounding matches.
    max_capacity = window + base
    min_num = (max_capacity - window) / beta
    max_num = (max_capacity - window) * 2 - min_num
    if max_num >= n - window:
        max_num = n - window
        min_num = (max_capacity - window) * 2 - max_num
    if not (n >= max_num >= min_num >= window):
        return max(1, round(base))
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    return round(max_num - layer * steps)


def pyramid_budgets(n: int, ratio: float | None, window: int = 64, num_layers: int = 32, beta: float = 20, *,
                    budget: int | None = None) -> list[int]:
    """PyramidKV's per-layer kept-token counts (spec §4.7; KVPress ``PyramidKVPress``).

    With ``base = n * (1 - ratio)`` (or ``base = budget``, the average per layer):
    ``min = base / beta``, ``max = 2 * base - min``; if ``max >= n - window`` then
    ``max = n - window`` and ``min = 2 * base - max``. Unless ``n >= max >= min >= window`` every
    layer falls back to ``max(1, round(base))``; else layer ``l`` keeps
    ``round(max - l * (max - min) / (num_layers - 1))``. Budgets include the window. Python's
    ``round`` (half to even), as KVPress. Example: ``n=4096, window=64, beta=20, 32 layers``:
    ``ratio=0.5`` gives 3994 ... 102 (sum 65536); ``ratio=0.8`` falls back to 819 everywhere.
    """
    if (ratio is None) == (budget is None):
        raise ValueError(f"pyramid_budgets: give exactly one of ratio and budget, got ratio={ratio!r}, "
                         f"budget={budget!r}")
    if beta < 1:
        raise ValueError(f"pyramid_budgets: beta: expected >= 1, got {beta}")
    base = n * (1 - ratio) if ratio is not None else float(budget)
    return [_pyramid_layer(n, base, window, num_layers, beta, layer) for layer in range(num_layers)]


class PyramidKV(SnapKV):
    """PyramidKV (KVPress ``PyramidKVPress``): SnapKV scores, a per-layer budget from
    :func:`pyramid_budgets` (lower layers keep more). ``budget`` (if given) is the average per
    layer; ``ratio`` is relative to the tokens the layer has seen (the prompt at prefill).

    Args: layer_idx, num_layers: where this layer sits; window (64), kernel (5), beta (20).
    """

    def __init__(self, budget=None, ratio=None, *, layer_idx: int, num_layers: int, window: int = 64,
                 kernel: int = 5, beta: float = 20, **kw):
        super().__init__(budget, ratio, window=window, kernel=kernel, **kw)
        if not 0 <= layer_idx < num_layers:
            raise ValueError(f"PyramidKV: layer_idx: expected in [0, {num_layers}), got {layer_idx}")
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        self.beta = beta

    def n_kept(self, n_tokens: int) -> int:
        if self.ratio == 0.0:
            return n_tokens
        return pyramid_budgets(n_tokens, self.ratio, self.window, self.num_layers, self.beta,
                               budget=self.budget)[self.layer_idx]


class AdaKV(EvictionPolicy):
    """AdaKV head-wise budgets around any scorer policy (spec §4.8), with real eviction.

    The layer keeps ``sum_j min(n_kept, L_j)`` slots chosen by a global top-k over all heads'
    scores (``allocate_head_budgets``), every head first keeping its best
    ``floor(n_kept * safeguard)``; then ``evict_`` with those per-head budgets really frees the
    others (KVPress only masks them with fake keys: no memory saved). As in KVPress, the
    scorer's protected slots (sinks, window) rank first and count toward a head's safeguard.
    While decoding (``every=`` on the scorer) heads have different lengths; a head shorter than
    ``n_kept`` keeps all its slots and does not lend its unused share, so a layer keeps
    ``sum_j min(n_kept, L_j)`` (``Hkv * n_kept`` once every head holds ``n_kept``).

    Args: scorer: any :class:`EvictionPolicy` with a per-head ``scores`` (its budget/ratio,
    protections and observations are used); safeguard: 0.2 (KVPress's ``alpha_safeguard``).
    """

    def __init__(self, scorer: EvictionPolicy, safeguard: float = 0.2):
        if not isinstance(scorer, EvictionPolicy):
            raise TypeError(f"AdaKV: scorer: expected an EvictionPolicy, got {type(scorer).__name__}")
        if not 0.0 <= safeguard <= 1.0:
            raise ValueError(f"AdaKV: safeguard: expected a fraction in [0, 1], got {safeguard}")
        self.scorer = scorer
        self.safeguard = safeguard

    def __getattr__(self, name):
        # Budget, ratio, period, whitelist, segments and backend are the scorer's.
        if name == "scorer":
            raise AttributeError(name)
        return getattr(self.scorer, name)

    @property
    def n_sink(self) -> int:
        return self.scorer.n_sink

    @property
    def n_recent(self) -> int:
        return self.scorer.n_recent

    def selection_kwargs(self, cache: LayerCache) -> dict:
        return self.scorer.selection_kwargs(cache)

    def n_kept(self, n_tokens: int) -> int:
        return self.scorer.n_kept(n_tokens)

    def scores(self, cache: LayerCache, **obs) -> torch.Tensor:
        return self.scorer.scores(cache, **obs)

    def head_budgets(self, cache: LayerCache, scores: torch.Tensor) -> torch.Tensor:
        """int32 ``[B, Hkv]`` budgets for ``scores`` (protected slots ranked first)."""
        kw = self.selection_kwargs(cache)
        prot = protected_slots(cache, self.n_sink, self.n_recent, kw["protect_ranges"], kw["keep_mask"])
        s = torch.where(prot, torch.full_like(scores, math.inf), scores)
        return ops().allocate_head_budgets(s, cache.lengths, self.n_kept(cache.n_seen), safeguard=self.safeguard,
                                           n_sink=self.n_sink, n_recent=self.n_recent, backend=self.backend)

    def compress(self, cache: LayerCache, **obs):
        if not self.needs_compression(cache):
            return None
        s = self.scorer.scores(cache, **obs)
        return self._evict(cache, s, self.head_budgets(cache, s))

    def __repr__(self) -> str:
        return f"AdaKV({self.scorer!r}, safeguard={self.safeguard})"


# ---------------------------------------------------------------------------------------------
# SurfaceLogicKV (spec §7). No public code exists; everything below is the spec's §7.2
# reconstruction, i.e. [INFERRED] design decisions, not the paper's verified method.
# ---------------------------------------------------------------------------------------------

def head_behaviour_profile(top_in_needle: torch.Tensor, copies: torch.Tensor) -> torch.Tensor:
    """[INFERRED, spec §7.2] Per-head behaviour fractions from needle-in-a-haystack probes.

    Args:
        top_in_needle: bool ``[S, L, H]``: at each of ``S`` probe decoding steps, whether head
            ``(l, h)``'s most-attended context token lies inside the needle.
        copies: bool ``[S, L, H]``: whether that token equals the token being generated.
    Returns: float32 ``[L, H, 3]``: fractions of steps that are surface memorisation (in the
    needle and copied), logic construction (in the needle, not copied) and ignoring (outside).
    The paper's exact statistic and thresholds are [UNKNOWN].
    """
    if top_in_needle.shape != copies.shape or top_in_needle.dim() != 3:
        raise ValueError(f"head_behaviour_profile: expected two bool [S, L, H] tensors of one shape, got "
                         f"{list(top_in_needle.shape)} and {list(copies.shape)}")
    inn = top_in_needle.to(torch.bool)
    cp = copies.to(torch.bool)
    surface = (inn & cp).float().mean(0)
    logic = (inn & ~cp).float().mean(0)
    return torch.stack([surface, logic, 1.0 - surface - logic], dim=-1)


def _largest_remainder(total: int, weights: torch.Tensor) -> torch.Tensor:
    """Integers proportional to ``weights`` (>= 0, not all 0) summing exactly to ``total``;
    remainders go to the largest fractional parts, ties to the earlier index."""
    w = weights.to(torch.float64)
    exact = total * w / w.sum()
    out = exact.floor().to(torch.int64)
    left = int(total - int(out.sum()))
    if left > 0:
        frac = exact - out.to(torch.float64)
        order = sorted(range(w.numel()), key=lambda i: (-float(frac[i]), i))
        for i in order[:left]:
            out[i] += 1
    return out


def surfacelogic_budgets(profile: torch.Tensor, budget: int, *, layer_floor: float = 0.5,
                         head_floor: float = 0.5) -> torch.Tensor:
    """[INFERRED, spec §7.2] Two-stage layer- then head-wise budgets from a behaviour profile.

    Args:
        profile: ``[L, Hkv, 3]`` (surface, logic, ignore) fractions per layer and kv head (reduce
            query heads to their kv head first, e.g. by max). Only surface + logic counts.
        budget: the average kept tokens per (layer, kv head); the total is ``budget * L * Hkv``.
        layer_floor: stage 1: every layer first gets ``floor(layer_floor * budget * Hkv)``;
            the rest of the total is shared in proportion to the layers' summed scores.
        head_floor: stage 2: inside layer ``l`` (total ``T_l``) every head first gets
            ``floor(head_floor * T_l / Hkv)``; the rest in proportion to the heads' scores
            (HeadKV-style). A zero score pool is shared equally (so an all-equal profile gives
            uniform SnapKV budgets). Integer shares by largest remainder, so sums are exact.
    Returns: int32 ``[L, Hkv]`` whose rows sum to the stage-1 layer totals and whose total is
    ``budget * L * Hkv``. Heads with score 0 get exactly the floor when another head of the
    layer scores above 0.
    """
    if profile.dim() != 3 or profile.shape[-1] != 3:
        raise ValueError(f"surfacelogic_budgets: profile: expected [L, Hkv, 3], got {list(profile.shape)}")
    for name, f in (("layer_floor", layer_floor), ("head_floor", head_floor)):
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"surfacelogic_budgets: {name}: expected a fraction in [0, 1], got {f}")
    L, H, _ = profile.shape
    score = (profile[..., 0] + profile[..., 1]).to(torch.float64).clamp_min(0.0)  # [L, H]
    total = budget * L * H
    lf = int(layer_floor * budget * H)
    layer_w = score.sum(1)
    pool = total - lf * L
    layer_tot = torch.full((L,), lf, dtype=torch.int64)
    layer_tot += _largest_remainder(pool, layer_w if float(layer_w.sum()) > 0 else torch.ones(L))
    out = torch.empty(L, H, dtype=torch.int64)
    for layer in range(L):
        t = int(layer_tot[layer])
        hf = int(head_floor * t / H)
        w = score[layer]
        out[layer] = hf + _largest_remainder(t - hf * H, w if float(w.sum()) > 0 else torch.ones(H))
    return out.to(torch.int32)


class SurfaceLogicKV(SnapKV):
    """[INFERRED, spec §7.2] SurfaceLogicKV's second stage: SnapKV token selection inside each
    head with that head's budget from :func:`surfacelogic_budgets` (one row of it per layer),
    really evicted through ``evict_`` with per-head budgets.

    Args: head_budgets: int ``[Hkv]`` (this layer's row) or ``[B, Hkv]``; window / kernel as SnapKV.
    """

    def __init__(self, head_budgets: torch.Tensor | Sequence[int], *, window: int = 64, kernel: int = 5, **kw):
        hb = torch.as_tensor(head_budgets, dtype=torch.int32)
        super().__init__(int(hb.min()), None, window=window, kernel=kernel, **kw)
        self.head_budgets = hb

    def target(self, cache: LayerCache) -> torch.Tensor:
        B, H = cache.lengths.shape
        hb = self.head_budgets.to(cache.lengths.device)
        return (hb.view(1, H) if hb.dim() == 1 else hb).expand(B, H).contiguous()
