# SPDX-License-Identifier: Apache-2.0
"""KV-cache eviction methods built from the kvkern score-and-evict ops.

Each policy compresses one layer's :class:`LayerCache` in place; it only calls the public
front doors of :mod:`kvkern.eviction_ops` (score -> protect -> select -> compact, spec §1) and
knows nothing about the kernels behind them. Every policy takes a kept-token count
(``budget=``) or a fraction removed (``ratio=``, KVPress's convention) and runs at prefill
(:meth:`~EvictionPolicy.compress` once) or periodically while decoding
(:meth:`~EvictionPolicy.step`).

==================  ============================================================
StreamingLLM        sinks + recent (KVPress StreamingLLMPress)
KNorm, KeyDiff      query-free key scores (KnormPress, KeyDiffPress)
RandomEviction      seeded random baseline (RandomPress)
SnapKV, TOVA        window attention (SnapKVPress, TOVAPress)
H2O                 accumulated attention, also while decoding (ObservedAttentionPress+)
ExpectedAttention   Gaussian future-query attention x ||v|| (ExpectedAttentionPress)
PyramidKV           per-layer budgets (pyramid_budgets) on SnapKV scores
AdaKV               head-wise budgets around any scorer, really freed
GKV                 G-KV: decode-time global decayed-max score + redundancy
InfiniPotV          streaming video: TaR + VaN under a hard cap
SurfaceLogicKV      [INFERRED] head-profile budgets (surfacelogic_budgets)
==================  ============================================================

Pitfalls fixes with any policy: ``protect_ranges=`` (whitelist positions) and
``segment_cuts=`` (fair per-span proportional quotas) or ``segment_min=``.
"""

from .base import EvictionPolicy, protected_slots, segment_cuts_from_spans
from .budgets import AdaKV, PyramidKV, SurfaceLogicKV, head_behaviour_profile, pyramid_budgets, surfacelogic_budgets
from .cache import LayerCache, QueryWindow
from .gkv import GKV
from .infinipot import InfiniPotV
from .scorers import H2O, TOVA, ExpectedAttention, KeyDiff, KNorm, RandomEviction, SnapKV, StreamingLLM
from .tada import calibrate_layer_errors, choose_layer_bits, mixed_cache_bytes, quantized_cache_bytes  # noqa: F401

__all__ = [
    "LayerCache", "QueryWindow", "EvictionPolicy", "protected_slots", "segment_cuts_from_spans",
    "StreamingLLM", "KNorm", "KeyDiff", "RandomEviction", "SnapKV", "TOVA", "H2O", "ExpectedAttention",
    "PyramidKV", "pyramid_budgets", "AdaKV", "GKV", "InfiniPotV", "SurfaceLogicKV", "surfacelogic_budgets",
    "head_behaviour_profile",
]
