# SPDX-License-Identifier: Apache-2.0
"""InfiniPot-V: streaming video KV compression under a hard memory cap (spec §5)."""

from __future__ import annotations

import torch

from .base import ops
from .cache import LayerCache

__all__ = ["InfiniPotV"]


class InfiniPotV:
    """InfiniPot-V (``aiha-lab/InfiniPot-V``): TaR (temporal-axis redundancy) then VaN (value
    norm), per kv head, on a cache laid out as ``[n_system system tokens | frames of
    tokens_per_frame vision tokens]`` with token positions ``0, 1, ...`` in that order.

    Compression to ``F_t`` frames (``C = F_t * P`` vision tokens; ``C_van = round((1 - tar_ratio)
    * C)``, ``C_tar = C - C_van``), per head:

    1. TaR: the newest ``F_q = floor(query_ratio * F)`` frames (``F`` = frames in the cache) are
       the query frames. A token at (frame f, patch p) scores ``-mean_f' cos(k_{f,p}, k_{f',p})``
       over the query frames f' that hold patch p: similar to the recent frames = redundant. The
       TaR set is the query-frame tokens (newest first, at most ``C_tar``) plus the best other
       tokens up to ``C_tar`` (``select_keep``, system tokens protected by ``protect_ranges``).
       Written in torch as ``-<k̂_i, mean_f' k̂_{f', p_i}>`` (one gather, O(C D)); kept
       tokens are identified by their positions, so compressed older frames still work.
    2. VaN: ``slot_scores`` "value_norm"; ``evict_`` keeps the TaR set (``keep_mask``), the
       system tokens, and the best others by ``||v||`` up to ``n_system + C``.

    Streaming (:meth:`schedule`): the cache never exceeds ``n_system + block_frames * P``
    tokens; after each block but the last it is compressed to ``target_frames`` frames (or to
    ``block_frames - remaining`` near the end, so the last block fills the cap exactly).

    Args:
        tokens_per_frame (P), n_system; block_frames: 32; target_frames: 24; tar_ratio: 0.5;
        query_ratio: 0.25; backend.
    Keys are whatever the cache holds (post-RoPE; whether the paper uses pre-RoPE keys is
    [UNKNOWN], spec §5(d)).
    """

    def __init__(self, tokens_per_frame: int, n_system: int = 0, *, block_frames: int = 32, target_frames: int = 24,
                 tar_ratio: float = 0.5, query_ratio: float = 0.25, backend: str = "auto"):
        if tokens_per_frame < 1 or n_system < 0:
            raise ValueError(f"InfiniPotV: expected tokens_per_frame >= 1 and n_system >= 0, got "
                             f"{tokens_per_frame} and {n_system}")
        if not 0 < target_frames < block_frames:
            raise ValueError(f"InfiniPotV: expected 0 < target_frames < block_frames, got {target_frames} and "
                             f"{block_frames}")
        if not (0.0 <= tar_ratio <= 1.0 and 0.0 <= query_ratio <= 1.0):
            raise ValueError(f"InfiniPotV: tar_ratio and query_ratio: expected fractions in [0, 1], got "
                             f"{tar_ratio} and {query_ratio}")
        self.P = tokens_per_frame
        self.n_system = n_system
        self.block_frames = block_frames
        self.target_frames = target_frames
        self.tar_ratio = tar_ratio
        self.query_ratio = query_ratio
        self.backend = backend

    @property
    def cap(self) -> int:
        """The hard memory cap in tokens: ``n_system + block_frames * P``."""
        return self.n_system + self.block_frames * self.P

    def schedule(self, total_frames: int) -> list[tuple[int, int | None]]:
        """The streaming plan: ``(frames to append, frames to compress to afterwards or None)``."""
        plan = []
        remaining = total_frames
        n = min(self.block_frames, remaining)
        remaining -= n
        while remaining > 0:
            tgt = self.target_frames if self.target_frames + remaining >= self.block_frames \
                else self.block_frames - remaining
            plan.append((n, tgt))
            n = min(self.block_frames - tgt, remaining)
            remaining -= n
        plan.append((n, None))
        return plan

    def _budgets(self, target_frames: int) -> tuple[int, int]:
        C = target_frames * self.P
        c_van = int(round((1.0 - self.tar_ratio) * C))
        return C, C - c_van

    def _system_ranges(self, cache: LayerCache):
        if self.n_system == 0:
            return None
        return torch.tensor([[0, self.n_system]], dtype=torch.int32, device=cache.k.device)

    def tar_scores(self, cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tar [B, Hkv, C] float32, query bool [B, Hkv, C])``: TaR of every vision slot
        (in [-1, 1]; query-frame tokens also get one) and which slots are query-frame tokens."""
        B, H, C, D = cache.k.shape
        dev = cache.k.device
        slot = torch.arange(C, device=dev).view(1, 1, C)
        valid = slot < cache.lengths.to(torch.int64).unsqueeze(-1)
        rel = cache.positions.to(torch.int64) - self.n_system
        vision = valid & (rel >= 0)
        frame = torch.where(vision, rel // self.P, -1)
        patch = torch.where(vision, rel % self.P, 0)
        n_frames = (cache.lengths.to(torch.int64) - self.n_system).clamp_min(0) // self.P  # [B, H]
        f_q = (n_frames.to(torch.float64) * self.query_ratio).floor().to(torch.int64)
        newest = frame.amax(-1)  # [B, H]
        query = vision & (frame > (newest - f_q).unsqueeze(-1))
        k = torch.where(valid.unsqueeze(-1), cache.k.float(), 0.0)
        kh = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        # anchor[p] = mean over the query frames holding patch p of the normalised keys.
        idx = patch.unsqueeze(-1).expand(B, H, C, D)
        qk = torch.where(query.unsqueeze(-1), kh, 0.0)
        anchor = torch.zeros(B, H, self.P, D, device=dev).scatter_add_(2, idx, qk)
        count = torch.zeros(B, H, self.P, device=dev).scatter_add_(2, patch, query.float())
        anchor = anchor / count.clamp_min(1.0).unsqueeze(-1)
        tar = -(kh * anchor.gather(2, idx)).sum(-1)
        return torch.where(vision, tar, 0.0), query

    def tar_select(self, cache: LayerCache, target_frames: int) -> torch.Tensor:
        """bool ``[B, Hkv, C]``: the system tokens plus the TaR set (``C_tar`` vision tokens)."""
        _, c_tar = self._budgets(target_frames)
        tar, query = self.tar_scores(cache)
        # Query-frame tokens outrank every candidate (tar <= 1), the newest first; when they do
        # not fit in C_tar (a long first block, spec §5(d)) the newest of them are the TaR set.
        n_pos = float(max(cache.n_seen, 1))
        s = torch.where(query, 2.0 + cache.positions.float() / n_pos, tar)
        keep, _ = ops().select_keep(s, cache.lengths, self.n_system + c_tar, positions=cache.positions,
                                    protect_ranges=self._system_ranges(cache), backend=self.backend)
        return keep

    def compress(self, cache: LayerCache, target_frames: int | None = None) -> torch.Tensor | None:
        """Compresses every head's vision tokens to ``target_frames * P`` in place (TaR + VaN).
        Returns the keep mask, or None when no head exceeds the budget."""
        tf = self.target_frames if target_frames is None else target_frames
        C, _ = self._budgets(tf)
        budget = self.n_system + C
        if not torch.compiler.is_compiling() and not bool((cache.lengths > budget).any()):
            return None
        tar_keep = self.tar_select(cache, tf)
        van = ops().slot_scores(cache.k, cache.lengths, "value_norm", v_cache=cache.v, backend=self.backend)
        return ops().evict_(cache.k, cache.v, cache.lengths, van, budget, positions=cache.positions,
                            protect_ranges=self._system_ranges(cache), keep_mask=tar_keep, hist=cache.hist,
                            log_w=cache.log_w, backend=self.backend)

    def stream(self, cache: LayerCache, frames_k: torch.Tensor, frames_v: torch.Tensor, on_block=None) -> None:
        """Feeds pre-computed frame K/V ``[B, Hkv, F * P, D]`` block by block under the cap
        (tests and offline use; a model feeds each block's K/V as it prefills it).
        ``on_block(cache)`` is called after every append and every compression."""
        total = frames_k.shape[2] // self.P
        start = 0
        for n, tgt in self.schedule(total):
            a, b = start * self.P, (start + n) * self.P
            cache.append_(frames_k[:, :, a:b], frames_v[:, :, a:b])
            start += n
            if on_block is not None:
                on_block(cache)
            if tgt is not None:
                self.compress(cache, tgt)
                if on_block is not None:
                    on_block(cache)
