# SPDX-License-Identifier: Apache-2.0
"""The per-layer cache the policies compress, and a query window buffer for decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LayerCache", "QueryWindow"]


@dataclass
class LayerCache:
    """One layer's static-capacity KV cache, in the layout of the kvkern ops.

    Attributes:
        k, v: ``[B, Hkv, C, D]`` fp32/fp16/bf16 (post-RoPE keys). Slots at or past ``lengths``
            hold garbage and are never read.
        lengths: int32 ``[B, Hkv]``: valid slots per (batch, kv head); heads may differ after a
            head-wise eviction (AdaKV, SurfaceLogicKV, InfiniPot-V).
        positions: int32 ``[B, Hkv, C]``: the absolute token position of each slot (moves along
            with compaction; slot order stays token order).
        hist: optional fp32 ``[B, Hkv, C]``: a per-slot score history (G-KV's global score,
            H2O's accumulated attention); moves along with compaction.
        hist_lengths: int32 ``[B, Hkv]``: slots ``i < hist_lengths`` have a history.
        log_w: optional fp32 ``[B, Hkv, C]`` logit bias read by ``decode_attention``; moves along.
        next_position: absolute position of the next token (the number of tokens this layer has
            seen when positions start at 0). ``None`` means ``lengths.max()`` (a cache built from a
            from-scratch prefill). Ratio budgets and Expected Attention's future positions use it.
    """

    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    hist: torch.Tensor | None = None
    hist_lengths: torch.Tensor | None = None
    log_w: torch.Tensor | None = None
    next_position: int | None = None

    @classmethod
    def empty(cls, B: int, Hkv: int, C: int, D: int, dtype=torch.float32, device="cpu", with_hist: bool = False,
              with_log_w: bool = False) -> "LayerCache":
        """An empty cache of capacity ``C`` (all lengths 0)."""
        k = torch.zeros(B, Hkv, C, D, dtype=dtype, device=device)
        c = cls(k=k, v=torch.zeros_like(k), lengths=torch.zeros(B, Hkv, dtype=torch.int32, device=device),
                positions=torch.zeros(B, Hkv, C, dtype=torch.int32, device=device), next_position=0)
        if with_hist:
            c.ensure_hist()
        if with_log_w:
            c.log_w = torch.zeros(B, Hkv, C, dtype=torch.float32, device=device)
        return c

    @classmethod
    def from_prefill(cls, k: torch.Tensor, v: torch.Tensor, capacity: int | None = None,
                     with_hist: bool = False) -> "LayerCache":
        """A cache holding a whole prefill ``k, v [B, Hkv, T, D]`` (positions ``0..T-1``) in a
        capacity of ``capacity`` (default ``T``) slots."""
        B, H, T, D = k.shape
        c = cls.empty(B, H, capacity if capacity is not None else T, D, k.dtype, k.device, with_hist=with_hist)
        c.append_(k, v)
        return c

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def n_seen(self) -> int:
        """Tokens this layer has seen: :attr:`next_position`, or ``lengths.max()`` when unknown."""
        if self.next_position is not None:
            return int(self.next_position)
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def ensure_hist(self) -> None:
        """Allocates ``hist`` (zeros) and ``hist_lengths`` (zeros: no slot has a history yet)."""
        B, H, C = self.k.shape[:3]
        if self.hist is None:
            self.hist = torch.zeros(B, H, C, dtype=torch.float32, device=self.k.device)
        if self.hist_lengths is None:
            self.hist_lengths = torch.zeros(B, H, dtype=torch.int32, device=self.k.device)

    def append_(self, k_new: torch.Tensor, v_new: torch.Tensor, positions_new: torch.Tensor | None = None) -> None:
        """Writes ``T`` new tokens at each head's length, in place.

        Args:
            k_new, v_new: ``[B, Hkv, T, D]``, the cache's dtype (cast otherwise).
            positions_new: int ``[B, T]`` absolute positions, or None: ``next_position + 0..T-1``.
        Mutates: k, v, positions, lengths (``+= T``), next_position. ``hist`` is left alone: the
        new slots lie past ``hist_lengths``, so they have no history yet.
        Raises: ``ValueError`` naming the first head whose capacity would overflow (nothing written).
        """
        B, H, C, D = self.k.shape
        if k_new.dim() != 4 or tuple(k_new.shape[:2]) != (B, H) or k_new.shape[3] != D:
            raise ValueError(f"LayerCache.append_: k_new: expected [B, Hkv, T, D] = [{B}, {H}, T, {D}], "
                             f"got {list(k_new.shape)}")
        if v_new.shape != k_new.shape:
            raise ValueError(f"LayerCache.append_: v_new: expected the shape of k_new {list(k_new.shape)}, "
                             f"got {list(v_new.shape)}")
        T = k_new.shape[2]
        if not torch.compiler.is_compiling():
            over = (self.lengths.to(torch.int64) + T) > C
            if bool(over.any()):
                b, j = (int(x) for x in over.nonzero()[0])
                raise ValueError(f"LayerCache.append_: head [{b}, {j}] holds {int(self.lengths[b, j])} of {C} slots; "
                                 f"appending {T} tokens would overflow the capacity")
        implicit = positions_new is None
        if implicit:
            start = self.n_seen
            positions_new = torch.arange(start, start + T, dtype=torch.int32, device=self.k.device).expand(B, T)
        elif tuple(positions_new.shape) != (B, T):
            raise ValueError(f"LayerCache.append_: positions_new: expected [B, T] = [{B}, {T}], "
                             f"got {list(positions_new.shape)}")
        idx = self.lengths.to(torch.int64).unsqueeze(-1) + torch.arange(T, device=self.k.device)  # [B, H, T]
        self.k.scatter_(2, idx.unsqueeze(-1).expand(B, H, T, D), k_new.to(self.k.device, self.k.dtype))
        self.v.scatter_(2, idx.unsqueeze(-1).expand(B, H, T, D), v_new.to(self.v.device, self.v.dtype))
        self.positions.scatter_(2, idx, positions_new.to(self.k.device, torch.int32).unsqueeze(1).expand(B, H, T))
        if self.log_w is not None:
            self.log_w.scatter_(2, idx, torch.zeros(B, H, T, dtype=self.log_w.dtype, device=self.k.device))
        self.lengths += T
        if T and implicit:
            self.next_position = start + T  # a host int: no read of the device, compiled or not
        elif T:
            # Caller-given positions live on the device: reading their max is a host sync, which
            # torch.compile cannot trace, so there the position is forgotten (n_seen falls back).
            self.next_position = int(positions_new.max()) + 1 if not torch.compiler.is_compiling() else None

    def clone(self) -> "LayerCache":
        """A deep copy (tests compare a compressed cache with the original)."""
        def c(x):
            return None if x is None else x.clone()
        return LayerCache(c(self.k), c(self.v), c(self.lengths), c(self.positions), c(self.hist),
                          c(self.hist_lengths), c(self.log_w), self.next_position)


class QueryWindow:
    """The last ``size`` queries of one layer, ``[B, Hq, <= size, D]`` (post-RoPE for window
    scorers: SnapKV, TOVA, G-KV; pre-RoPE for Expected Attention's statistics).

    Push each forward's queries (prefill: the prompt's, decoding: one per step); the window's
    last query belongs to the cache's newest slot, which is what ``window_scores`` assumes.
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"QueryWindow: size: expected >= 1, got {size}")
        self.size = size
        self.q: torch.Tensor | None = None

    def push(self, q: torch.Tensor) -> None:
        """Appends ``q [B, Hq, T, D]`` and keeps the last ``size``."""
        if q.dim() != 4:
            raise ValueError(f"QueryWindow.push: q: expected [B, Hq, T, D], got {list(q.shape)}")
        q = q[:, :, -self.size:]
        self.q = q.clone() if self.q is None else torch.cat([self.q, q], dim=2)[:, :, -self.size:]

    def get(self) -> torch.Tensor:
        if self.q is None:
            raise RuntimeError("QueryWindow.get: no query pushed yet")
        return self.q

    def __len__(self) -> int:
        return 0 if self.q is None else self.q.shape[2]
