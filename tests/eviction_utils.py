# SPDX-License-Identifier: Apache-2.0
"""Shared helpers for the score-and-evict tests: run an op by backend, build poisoned caches."""

from __future__ import annotations

import pytest
import torch

from kvkern._fake import triton_twin
from utils import poison_past_lengths, randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_KEY = {"cpu": "CPU", "cuda": "CUDA"}

# Tolerances of fp32 score outputs against the fp64 reference, by the cache dtype.
SCORE_TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 3e-2),
}


def op_backends(op: str, device: str = DEVICE) -> list[str]:
    """The backends of ``op`` with a kernel for ``device`` here: "cpp" (C++ CPU or CUDA) and "triton"."""
    key = _KEY[device]
    found = []
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"kvkern::{op}", key):
        found.append("cpp")
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"kvkern::{triton_twin(op)}", key):
        found.append("triton")
    return found


def call(op: str, backend: str, *args, **kwargs):
    """``torch.ops.kvkern.<op>`` ("cpp") or its Triton twin ("triton")."""
    name = op if backend == "cpp" else triton_twin(op)
    return getattr(torch.ops.kvkern, name)(*args, **kwargs)


def make_lengths(B: int, Hkv: int, C: int, lengths=None, low: int = 1, device=DEVICE) -> torch.Tensor:
    """None: uniform in [low, C]; an int: every head; a tensor: as given. int32 on ``device``."""
    if lengths is None:
        lengths = torch.randint(low, C + 1, (B, Hkv), dtype=torch.int32)
    elif isinstance(lengths, int):
        lengths = torch.full((B, Hkv), lengths, dtype=torch.int32)
    return lengths.to(device=device, dtype=torch.int32)


def make_cache(B, Hkv, C, D, dtype=torch.float32, lengths=None, device=DEVICE, poison=True):
    """``(k, v, lengths, positions)``: random K/V with NaN past ``lengths``, positions = slot index."""
    lengths = make_lengths(B, Hkv, C, lengths, device=device)
    k = randn(B, Hkv, C, D, dtype=dtype, device=device)
    v = randn(B, Hkv, C, D, dtype=dtype, device=device)
    if poison:
        poison_past_lengths(k, lengths)
        poison_past_lengths(v, lengths)
    positions = torch.arange(C, dtype=torch.int32, device=device).view(1, 1, C).repeat(B, Hkv, 1)
    return k, v, lengths, positions


def ragged_lengths(B: int, Hkv: int, C: int, device=DEVICE) -> torch.Tensor:
    """Lengths ``[B, Hkv]`` int32 uniform in [0, C] with a 0 and a C always present."""
    lengths = torch.randint(0, C + 1, (B, Hkv), dtype=torch.int32)
    lengths.view(-1)[0] = 0
    lengths.view(-1)[-1] = C
    return lengths.to(device)


def valid_mask(lengths: torch.Tensor, C: int) -> torch.Tensor:
    return torch.arange(C, device=lengths.device).view(1, 1, C) < lengths.to(torch.int64).unsqueeze(-1)


def with_changes(good, **changes):
    """A builder of bad arguments for the error tests: ``good()`` with each named
    argument replaced by ``fn(args)`` when ``fn`` is callable, else by the value itself."""
    def make():
        a = good()
        for name, fn in changes.items():
            a[name] = fn(a) if callable(fn) else fn
        return a
    return make


def out_of_range_cases(with_, name: str = "lengths") -> list:
    """Error cases of ``name`` values outside [0, C] (``with_``: a ``with_changes``
    builder). None on CUDA, where the ops do not read those values (a host sync)."""
    if DEVICE == "cuda":
        return []
    return [(f"{name}_negative", name, "[0, C]", with_(**{name: lambda a: a[name] - 100})),
            (f"{name}_over_capacity", name, "[0, C]", with_(**{name: lambda a: a[name] + 100}))]


def assert_error_names(op: str, backend: str, args, arg: str, words: str) -> None:
    """Calling ``op`` on ``backend`` with ``args`` raises one error that names the op
    (its Triton twin for "triton"), the argument ``arg`` and contains ``words``."""
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        call(op, backend, *args)
    msg = str(info.value)
    name = f"kvkern::{op}" + ("_triton" if backend == "triton" else "")
    assert f"{name}: {arg}: " in msg and words in msg, msg
