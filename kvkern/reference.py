# SPDX-License-Identifier: Apache-2.0
"""Plain-PyTorch references: the oracle every backend is tested against.

Written for clarity, not speed. Everything computes in ``dtype`` (float64 by
default) whatever the storage dtype, and never lets a slot at or past
``lengths`` influence a result, whatever it holds (tests poison those slots
with NaN).
"""

from __future__ import annotations

import math

import torch

__all__ = ["decode_attention", "valid_slot_mask"]


def valid_slot_mask(lengths: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[B, Hkv, C]`` bool: True where slot ``i < lengths[b, h]``."""
    slots = torch.arange(capacity, device=lengths.device)
    return slots.view(1, 1, capacity) < lengths.to(torch.int64).unsqueeze(-1)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    log_w: torch.Tensor | None = None,
    sm_scale: float | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-token attention over a static-capacity cache with per-head lengths.

    Args:
        q: ``[B, Hq, D]``.
        k_cache, v_cache: ``[B, Hkv, C, D]``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
        lengths: ``[B, Hkv]`` integer, valid slots per head, each in ``[0, C]``.
        log_w: ``[B, Hkv, C]`` or None, added to the scaled logits.
        sm_scale: logit scale, default ``D ** -0.5``.
        dtype: the precision of every computation.

    Returns:
        ``(out [B, Hq, D], lse [B, Hq])`` in ``dtype``. A head with length 0 has
        ``out == 0`` and ``lse == -inf``.
    """
    B, Hq, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if sm_scale is None else float(sm_scale)
    valid = valid_slot_mask(lengths, C)  # [B, Hkv, C]
    # Zero the garbage first: NaN * 0 is NaN, so masking the logits alone is not enough.
    k = torch.where(valid.unsqueeze(-1), k_cache.to(dtype), 0.0)
    v = torch.where(valid.unsqueeze(-1), v_cache.to(dtype), 0.0)
    k = k.repeat_interleave(G, dim=1)  # [B, Hq, C, D]
    v = v.repeat_interleave(G, dim=1)
    logits = torch.einsum("bhd,bhcd->bhc", q.to(dtype), k) * scale
    if log_w is not None:
        logits = logits + torch.where(valid, log_w.to(dtype), 0.0).repeat_interleave(G, dim=1)
    logits = logits.masked_fill(~valid.repeat_interleave(G, dim=1), -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # -inf for empty heads
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("bhc,bhcd->bhd", probs, v)
    return out, lse
