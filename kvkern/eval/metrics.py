# SPDX-License-Identifier: Apache-2.0
"""Loyalty-to-the-full-cache metrics: pure functions on logits.

Shapes: ``logits`` are ``[..., V]`` (any leading dims, typically ``[N]`` tokens or ``[B, N]``);
token ids are ``[...]`` int64 with the same leading dims. Every reduction is computed in fp64
from a log-softmax, so fp32/bf16 inputs give stable numbers.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch


def _logp(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def kl_per_token(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || test) of next-token distributions, per position.

    ``ref_logits``, ``test_logits``: ``[..., V]`` (same shape). Returns ``[...]`` fp64, >= 0
    (clamped: rounding can give -1e-17). ``ref`` is the full cache, ``test`` the compressed one.
    Positions where ``ref`` puts zero probability contribute nothing (0 log 0 = 0).
    """
    if ref_logits.shape != test_logits.shape:
        raise ValueError(f"kl_per_token: shapes differ: ref {tuple(ref_logits.shape)} vs test {tuple(test_logits.shape)}")
    lp, lq = _logp(ref_logits), _logp(test_logits)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=torch.float64))
    return terms.sum(-1).clamp_min(0.0)


def top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """Per-position bool ``[...]``: the argmax tokens agree."""
    if ref_logits.shape != test_logits.shape:
        raise ValueError(f"top1_agreement: shapes differ: ref {tuple(ref_logits.shape)} vs test {tuple(test_logits.shape)}")
    return ref_logits.argmax(-1) == test_logits.argmax(-1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood (nats, fp64) of ``targets`` ``[...]`` under ``logits`` ``[..., V]``."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"token_nll: logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    return -_logp(logits).gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean NLL) over all positions."""
    return float(math.exp(token_nll(logits, targets).mean().item()))


def perplexity_change(ref_logits: torch.Tensor, test_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Perplexity of ``targets`` under both, and the relative change ``test / ref - 1``."""
    p_ref, p_test = perplexity(ref_logits, targets), perplexity(test_logits, targets)
    return {"ppl_ref": p_ref, "ppl": p_test, "ppl_delta": p_test - p_ref, "ppl_rel_change": p_test / p_ref - 1.0}


def compare_logits(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> dict:
    """Summary of :func:`kl_per_token` and :func:`top1_agreement` over all positions."""
    kl = kl_per_token(ref_logits, test_logits).flatten()
    agree = top1_agreement(ref_logits, test_logits).flatten()
    return {"tokens": int(kl.numel()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float(agree.double().mean())}


def needle_hit(answer: str, key: str) -> bool:
    """The exact pass key appears in ``answer`` as a whole number (not inside a longer digit run)."""
    if not re.fullmatch(r"\d+", key):
        raise ValueError(f"needle_hit: key must be digits, got {key!r}")
    return re.search(rf"(?<!\d){key}(?!\d)", answer) is not None


def mean(values: Sequence[float]) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else float("nan")
