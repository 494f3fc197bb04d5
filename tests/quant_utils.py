# SPDX-License-Identifier: Apache-2.0
"""Shared helpers for the quantized-KV tests: the layout's tensors in schema order."""

from __future__ import annotations

import torch

from kvkern import reference
from kvkern._fake import triton_twin

FIELDS = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_res", "v_res", "k_mean", "v_mean")


def empty_cache(B, Hkv, C, D, bits, group, residual, mean_centred, dtype, device) -> dict:
    """The layout's tensors, filled with garbage (NaN / random words) so nothing relies on zeros."""
    shapes = reference.quantized_cache_shapes(B, Hkv, C, D, bits, group, residual, mean_centred)
    out = {}
    for name, shape in shapes.items():
        if shape is None:
            out[name] = None
        elif "codes" in name:
            out[name] = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=device)
        else:
            out[name] = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return out


def as_args(cache: dict) -> tuple:
    """The cache's tensors in the schemas' order (k_codes ... v_mean)."""
    return tuple(cache[f] for f in FIELDS)


def call(op: str, backend: str, *args):
    name = op if backend == "cpp" else triton_twin(op)
    return getattr(torch.ops.kvkern, name)(*args)


def live_equal(got: dict, want: dict, lengths: torch.Tensor, bits: int, group: int) -> list[str]:
    """Names of the fields whose LIVE parts differ (codes, metadata and means of quantized tokens,
    ring slots of residual tokens). Empty when everything matches exactly."""
    bad = []
    R = got["k_res"].shape[2]
    P = 32 // bits
    B, H = lengths.shape
    for b in range(B):
        for h in range(H):
            L = int(lengths[b, h])
            nk, nv = L - L % R, max(L - R, 0)
            checks = [("k_codes", got["k_codes"][b, h, : nk // P], want["k_codes"][b, h, : nk // P]),
                      ("k_scale", got["k_scale"][b, h, : nk // group], want["k_scale"][b, h, : nk // group]),
                      ("k_min", got["k_min"][b, h, : nk // group], want["k_min"][b, h, : nk // group]),
                      ("v_codes", got["v_codes"][b, h, :nv], want["v_codes"][b, h, :nv]),
                      ("v_scale", got["v_scale"][b, h, :nv], want["v_scale"][b, h, :nv]),
                      ("v_min", got["v_min"][b, h, :nv], want["v_min"][b, h, :nv])]
            if got.get("k_mean") is not None:
                checks += [("k_mean", got["k_mean"][b, :nk], want["k_mean"][b, :nk]),
                           ("v_mean", got["v_mean"][b, :nv], want["v_mean"][b, :nv])]
            ring_k = [t % R for t in range(nk, L)]
            ring_v = [t % R for t in range(nv, L)]
            checks += [("k_res", got["k_res"][b, h, ring_k], want["k_res"][b, h, ring_k]),
                       ("v_res", got["v_res"][b, h, ring_v], want["v_res"][b, h, ring_v])]
            for name, a, w in checks:
                if not torch.equal(a.cpu(), w.cpu()) and name not in bad:
                    bad.append(f"{name} (head [{b}, {h}])")
    return bad
