# SPDX-License-Identifier: Apache-2.0
"""Shared test helpers: the tolerance table, a verbose allclose, cache factories."""

from __future__ import annotations

import os

import torch

# (atol, rtol) against an fp64 reference, by the dtype the kernel stores and reads.
# Attention outputs are convex combinations of V rows, so an absolute bound at
# the scale of one rounding of V dominates.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# log-sum-exp is a sum of fp32 exps of logits computed from rounded inputs.
LSE_TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                            max_print: int = 5, what: str = "") -> None:
    """allclose that says how many elements differ, where, and flags NaN/inf mismatches."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_mismatch = torch.isnan(actual) != torch.isnan(expected)
    inf_mismatch = (torch.isinf(actual) != torch.isinf(expected)) | (
        torch.isinf(actual) & torch.isinf(expected) & (torch.sign(actual) != torch.sign(expected))
    )
    finite = torch.isfinite(actual) & torch.isfinite(expected)
    diff = torch.where(finite, (actual - expected).abs(), torch.zeros_like(actual))
    too_far = finite & (diff > atol + rtol * expected.abs())
    bad = nan_mismatch | inf_mismatch | too_far
    if not bad.any():
        return
    idx = bad.nonzero()[:max_print].tolist()
    lines = [f"{what}: {int(bad.sum())} of {bad.numel()} elements differ "
             f"(NaN mismatches {int(nan_mismatch.sum())}, inf mismatches {int(inf_mismatch.sum())}, "
             f"max |diff| {diff.max().item():.3e}, atol {atol}, rtol {rtol})"]
    for i in idx:
        lines.append(f"  at {i}: got {actual[tuple(i)].item()!r}, expected {expected[tuple(i)].item()!r}")
    raise AssertionError("\n".join(lines))


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    """Standard normal values; never all zeros (the usual failure of an unwritten output)."""
    return (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype)


def poison_past_lengths(x: torch.Tensor, lengths: torch.Tensor, value=float("nan")) -> torch.Tensor:
    """Writes ``value`` into every slot at or past ``lengths`` of a [B, H, C, ...] tensor, in place."""
    C = x.shape[2]
    mask = torch.arange(C, device=x.device).view(1, 1, C) >= lengths.to(x.device, torch.int64).unsqueeze(-1)
    x[mask] = value
    return x


def make_decode_inputs(B, Hq, Hkv, C, D, dtype, device, lengths=None, with_log_w=False, poison=True):
    """Random decode-attention inputs with slots past ``lengths`` poisoned with NaN.

    ``lengths``: None (uniform in [1, C]), an int (every head), or a [B, Hkv] tensor.
    """
    if lengths is None:
        lengths = torch.randint(1, C + 1, (B, Hkv), dtype=torch.int32)
    elif isinstance(lengths, int):
        lengths = torch.full((B, Hkv), lengths, dtype=torch.int32)
    lengths = lengths.to(device=device, dtype=torch.int32)
    q = randn(B, Hq, D, dtype=dtype, device=device)
    k = randn(B, Hkv, C, D, dtype=dtype, device=device)
    v = randn(B, Hkv, C, D, dtype=dtype, device=device)
    log_w = randn(B, Hkv, C, device=device) if with_log_w else None
    if poison:
        poison_past_lengths(k, lengths)
        poison_past_lengths(v, lengths)
        if log_w is not None:
            poison_past_lengths(log_w, lengths)
    return q, k, v, lengths, log_w


def isolate_tuning_database(monkeypatch, tmp_path) -> None:
    """No user tuning directory and no packaged or source-tree database for the test: a lookup
    reads only what the test writes (and warnings fire afresh)."""
    from kvkern import tuning

    monkeypatch.delenv(tuning.ENV_DIR, raising=False)
    monkeypatch.setattr(tuning, "_PACKAGED_DIR", tmp_path / "absent_packaged")
    monkeypatch.setattr(tuning, "_SOURCE_DIR", tmp_path / "absent_source")
    monkeypatch.setattr(tuning, "_RUNNING_CC", {})
    tuning.clear_caches()
