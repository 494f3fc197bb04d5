# SPDX-License-Identifier: Apache-2.0
"""TaDA (spec merge-latent-quant.md §3): per-layer precision of a mean-centred quantized KV cache.

Three pieces, all host-side and offline (nothing here runs in the decode loop):

* :func:`calibrate_layer_errors` quantizes each layer's calibration cache at every candidate bit
  width and measures the attention-output error of the calibration queries against the dense cache.
* :func:`choose_layer_bits` picks one bit width per layer that minimises the summed error under an
  average-bits or a bytes budget (an exact multiple-choice knapsack, see its docstring).
* :func:`quantized_cache_bytes` / :func:`mixed_cache_bytes`: the exact bytes of every tensor of the
  layout (kvkern/reference.py, "Quantized KV") and the ratio against a bf16 dense cache.

Spec choices, marked as the spec marks them:

* [UNKNOWN] the paper's sensitivity metric. [INFERRED] here: the relative Frobenius error of the
  attention output, ``||o_hat - o|| / ||o||`` over all query heads and calibration queries of a
  layer, with ``o`` the attention over the dense cache in its storage dtype (what the quantized
  cache replaces), computed in fp64.
* [2ND] the paper searches precision assignments at random. [INFERRED] here: the summed per-layer
  error is separable, so the optimum is computed exactly instead of sampled; layers are treated as
  independent (error propagation through later layers is ignored, as a per-layer metric must).
* [UNKNOWN] quantizer granularity and group size: the layout is KIVI's (keys per channel over G
  tokens, values per token over G channels) with a full-precision residual window (KIVI's rule;
  [UNKNOWN] whether TaDA keeps one); the caller picks G and R.
* [UNKNOWN] the bit set: {2, 4, 8} (3 bits would need the non-power-of-two packing of spec §4.5).
* Hkv = 1 with mean-centring: the mean is the key itself and the deviation is zero, so centring
  stores a 16-bit copy for nothing (spec §3(d)); every function here warns and uses the plain
  format instead.

The quantized-KV ops are reached through :data:`OPS` only, so switching from the fp64 references to
the compiled ``torch.ops.kvkern`` kernels is one assignment there.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import reference

__all__ = ["OPS", "CalibrationResult", "calibrate_layer_errors", "choose_layer_bits", "quantized_cache_bytes",
           "mixed_cache_bytes", "fp8_cache_bytes"]

# The ops calibration calls, by name. Calibration is offline and measures errors, so it runs the
# fp64 references on purpose (the figures then carry no kernel rounding); a caller may swap in
# kernel-backed callables with the same signatures for speed on long calibration sets.
OPS = {
    "quantize_kv": reference.quantize_kv,
    "dequantize_kv": reference.dequantize_kv,
    "quant_decode_attention": reference.quant_decode_attention,
    "decode_attention": reference.decode_attention,
    "quantized_cache_shapes": reference.quantized_cache_shapes,
}


def _effective_centring(Hkv: int, mean_centred: bool, *, stacklevel: int = 3) -> bool:
    if mean_centred and Hkv == 1:
        warnings.warn("kvkern TaDA: mean-centring with one kv head stores the key itself as the mean and a zero "
                      "deviation (no gain); using the plain format", UserWarning, stacklevel=stacklevel)
        return False
    return mean_centred


def _check_format(op: str, C: int, D: int, bits: int, group: int, residual: int) -> None:
    if bits not in reference.QUANT_BITS:
        raise ValueError(f"{op}: bits must be one of {reference.QUANT_BITS}, got {bits}")
    if group not in reference.QUANT_GROUPS:
        raise ValueError(f"{op}: group must be one of {reference.QUANT_GROUPS}, got {group}")
    if residual <= 0 or residual % group:
        raise ValueError(f"{op}: residual must be a positive multiple of group={group}, got {residual}")
    if C % residual:
        raise ValueError(f"{op}: capacity must be a multiple of residual={residual}, got {C}")
    if D % group:
        raise ValueError(f"{op}: head dim must be a multiple of group={group}, got {D}")


# ---------------------------------------------------------------------------------------------
# Memory accounting
# ---------------------------------------------------------------------------------------------

def quantized_cache_bytes(B: int, Hkv: int, C: int, D: int, bits: int, group: int, residual: int,
                          mean_centred: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Exact bytes of one layer's quantized cache of capacity ``C`` (storage dtype ``dtype``).

    Returns a dict: one entry per tensor of the layout (``k_codes`` ... ``v_mean``; 0 for absent
    means), the sums ``codes``, ``metadata`` (scales and mins), ``means``, ``residual`` and
    ``total``, ``dense_bf16`` (``2 * B * Hkv * C * D * 2``: a bf16 K and V of the same capacity),
    ``ratio = total / dense_bf16`` and ``mean_centred`` (False after the Hkv = 1 fallback).
    ``lengths`` ([B, Hkv] int32) is left out of both sides: a dense cache needs it too.
    Every slot is counted whether live or not: the layout is allocated at capacity.
    """
    _check_format("quantized_cache_bytes", C, D, bits, group, residual)
    centred = _effective_centring(Hkv, mean_centred)
    elem = torch.empty((), dtype=dtype).element_size()
    shapes = OPS["quantized_cache_shapes"](B, Hkv, C, D, bits, group, residual, centred)
    out = {}
    for name, shape in shapes.items():
        size = 0 if shape is None else math.prod(shape) * (4 if "codes" in name else elem)
        out[name] = size
    out["codes"] = out["k_codes"] + out["v_codes"]
    out["metadata"] = out["k_scale"] + out["k_min"] + out["v_scale"] + out["v_min"]
    out["means"] = out["k_mean"] + out["v_mean"]
    out["residual"] = out["k_res"] + out["v_res"]
    out["total"] = out["codes"] + out["metadata"] + out["means"] + out["residual"]
    out["dense_bf16"] = 2 * B * Hkv * C * D * 2
    out["ratio"] = out["total"] / out["dense_bf16"]
    out["mean_centred"] = centred
    return out


def fp8_cache_bytes(B: int, Hkv: int, C: int, D: int) -> dict:
    """Exact bytes of one layer's FP8 (e4m3fn) cache (kvkern/reference.py, "FP8 KV"): 1 byte per
    element of k_fp8 / v_fp8 plus the fp32 per-head scales, with the same keys as
    :func:`quantized_cache_bytes` (no mins, means or residual ring: 0) so the two compare directly."""
    codes = 2 * B * Hkv * C * D
    scales = 2 * Hkv * 4
    out = {"k_fp8": codes // 2, "v_fp8": codes // 2, "k_scale": scales // 2, "v_scale": scales // 2,
           "codes": codes, "metadata": scales, "means": 0, "residual": 0, "total": codes + scales,
           "dense_bf16": 2 * B * Hkv * C * D * 2, "mean_centred": False}
    out["ratio"] = out["total"] / out["dense_bf16"] if out["dense_bf16"] else float("nan")
    return out


def mixed_cache_bytes(layer_bits: Sequence[int], B: int, Hkv: int, C: int, D: int, group: int, residual: int,
                      mean_centred: bool, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes of a model's cache with one bit width per layer (``layer_bits``), same shape per layer.
    Returns ``{"total", "dense_bf16", "ratio", "avg_bits", "per_layer": [quantized_cache_bytes ...]}``."""
    per = [quantized_cache_bytes(B, Hkv, C, D, b, group, residual, mean_centred, dtype) for b in layer_bits]
    total = sum(p["total"] for p in per)
    dense = sum(p["dense_bf16"] for p in per)
    return {"total": total, "dense_bf16": dense, "ratio": total / dense if dense else float("nan"),
            "avg_bits": sum(layer_bits) / len(layer_bits) if layer_bits else float("nan"), "per_layer": per}


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------

@dataclass
class CalibrationResult:
    """``errors[l, j]``: layer ``l``'s attention-output error at ``bits[j]`` (fp64, CPU).
    ``shapes[l] = (B, Hkv, C, D)`` of the calibrated cache; ``mean_centred[l]`` after the Hkv = 1
    fallback; ``key_errors`` / ``value_errors``: relative reconstruction errors, same indexing."""
    bits: tuple
    errors: torch.Tensor
    key_errors: torch.Tensor
    value_errors: torch.Tensor
    shapes: list = field(default_factory=list)
    mean_centred: list = field(default_factory=list)
    group: int = 64
    residual: int = 128
    dtype: torch.dtype = torch.bfloat16

    def layer_bytes(self, B: int | None = None, capacity: int | None = None) -> torch.Tensor:
        """``[n_layers, n_bits]`` int64: each layer's cache bytes at each bit width, at batch ``B``
        and ``capacity`` (default: the calibrated ones)."""
        rows = []
        for (b0, H, c0, D), centred in zip(self.shapes, self.mean_centred):
            rows.append([quantized_cache_bytes(B or b0, H, capacity or c0, D, bits, self.group, self.residual,
                                               centred, self.dtype)["total"] for bits in self.bits])
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), len(self.bits))


def _rel(err: torch.Tensor, ref: torch.Tensor) -> float:
    den = float(ref.norm())
    return float(err.norm()) / den if den > 0 else float(err.norm())


def calibrate_layer_errors(layers, bits_options: Sequence[int] = (2, 4, 8), group: int = 64, residual: int = 128,
                           mean_centred: bool = True, dtype: torch.dtype | None = None) -> CalibrationResult:
    """Measures every layer's attention-output error at every bit width.

    Args:
        layers: a sequence of ``(q, k, v)``, one per layer: ``q [B, Hq, D]`` (one decode query per
            head) or ``[B, Hq, Nq, D]`` (``Nq`` decode queries, each attending over the whole cache);
            ``k, v [B, Hkv, T, D]``, every head holding all ``T`` tokens. Not mutated.
        bits_options: candidate bit widths, a subset of {2, 4, 8}.
        group, residual: the layout's G and R; the capacity is ``T`` rounded up to a multiple of R.
        mean_centred: TaDA's centring (falls back to plain, with a warning, for Hkv = 1).
        dtype: storage dtype of the cache (default k's dtype). The dense baseline is k, v rounded to
            it, so the error is the quantizer's alone.

    Returns a :class:`CalibrationResult`. The metric is [INFERRED] (the paper's is [UNKNOWN]):
    ``||o_hat - o||_F / ||o||_F`` over all heads and queries, ``o`` the fp64 attention over the dense
    cache, ``o_hat`` :func:`~kvkern.reference.quant_decode_attention` over the quantized one.
    """
    bits_options = tuple(int(b) for b in bits_options)
    for b in bits_options:
        if b not in reference.QUANT_BITS:
            raise ValueError(f"calibrate_layer_errors: bits must be in {reference.QUANT_BITS}, got {b}")
    n, nb = len(layers), len(bits_options)
    errors = torch.zeros(n, nb, dtype=torch.float64)
    kerr, verr = torch.zeros_like(errors), torch.zeros_like(errors)
    shapes, centring = [], []
    for li, (q, k, v) in enumerate(layers):
        dt = dtype or k.dtype
        B, H, T, D = k.shape
        C = max(residual, -(-T // residual) * residual)
        _check_format("calibrate_layer_errors", C, D, bits_options[0] if nb else 2, group, residual)
        centred = _effective_centring(H, mean_centred)
        shapes.append((B, H, C, D))
        centring.append(centred)
        k, v = k.to(dt), v.to(dt)
        qs = q.unsqueeze(2) if q.dim() == 3 else q  # [B, Hq, Nq, D]
        lengths = torch.full((B, H), T, dtype=torch.int32, device=k.device)
        pad = (0, 0, 0, C - T)
        kd, vd = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
        dense = [OPS["decode_attention"](qs[:, :, i], kd, vd, lengths)[0].double() for i in range(qs.shape[2])]
        for j, bits in enumerate(bits_options):
            cache = OPS["quantize_kv"](k, v, lengths, C, bits, group, residual, centred)
            kh, vh = OPS["dequantize_kv"](cache, lengths, bits, group)
            kerr[li, j] = _rel(kh[:, :, :T].double() - k.double(), k.double())
            verr[li, j] = _rel(vh[:, :, :T].double() - v.double(), v.double())
            outs = [OPS["quant_decode_attention"](qs[:, :, i], cache, lengths, bits, group)[0].double()
                    for i in range(qs.shape[2])]
            errors[li, j] = _rel(torch.stack(outs) - torch.stack(dense), torch.stack(dense))
    return CalibrationResult(bits_options, errors, kerr, verr, shapes, centring, group, residual,
                             dtype or (layers[0][1].dtype if n else torch.bfloat16))


# ---------------------------------------------------------------------------------------------
# Precision choice
# ---------------------------------------------------------------------------------------------

def choose_layer_bits(errors, budget_avg_bits: float | None = None, budget_bytes: int | None = None, *,
                      bits_options: Sequence[int] | None = None, layer_bytes=None) -> tuple:
    """One bit width per layer minimising the summed error under a budget.

    Args:
        errors: a :class:`CalibrationResult`, or an ``[n_layers, n_bits]`` table (tensor or nested
            list) with ``bits_options`` naming its columns.
        budget_avg_bits: the mean bit width over layers must not exceed it.
        budget_bytes: the summed cache bytes must not exceed it; per-layer bytes come from
            ``layer_bytes`` (``[n_layers, n_bits]``) or, for a CalibrationResult, its
            :meth:`~CalibrationResult.layer_bytes` at the calibrated shapes.
        Exactly one budget.

    Rule: an EXACT multiple-choice knapsack, by dynamic programming over the Pareto frontier of
    (cost so far, error so far) after each layer. Chosen over greedy "error reduction per byte"
    because greedy upgrades are optimal only when every layer's error curve is convex in bytes,
    which measured curves need not be (and 2 -> 4 -> 8 bits are unequal steps); with a handful of
    options per layer the frontier stays small (for an average-bits budget, at most 8 * n_layers
    distinct costs), so exactness is free. Ties: lower summed error, then fewer bytes / bits, then
    higher bits at earlier layers (deterministic). Errors must be finite and >= 0.

    Returns a tuple of bit widths, one per layer. Raises ValueError when no assignment fits.
    """
    if isinstance(errors, CalibrationResult):
        bits_options = errors.bits
        if budget_bytes is not None and layer_bytes is None:
            layer_bytes = errors.layer_bytes()
        errors = errors.errors
    if bits_options is None:
        raise ValueError("choose_layer_bits: bits_options is required with a plain error table")
    bits_options = tuple(int(b) for b in bits_options)
    err = torch.as_tensor(errors, dtype=torch.float64).reshape(-1, len(bits_options))
    if not bool(torch.isfinite(err).all()) or bool((err < 0).any()):
        raise ValueError("choose_layer_bits: errors must be finite and >= 0")
    if (budget_avg_bits is None) == (budget_bytes is None):
        raise ValueError("choose_layer_bits: give exactly one of budget_avg_bits, budget_bytes")
    n = err.shape[0]
    if budget_avg_bits is not None:
        cost = [[b for b in bits_options] for _ in range(n)]
        # The budget on a sum of integers: floor, with slack for decimal inputs like 2.2 * 5.
        limit = math.floor(float(budget_avg_bits) * n + 1e-9)
    else:
        if layer_bytes is None:
            raise ValueError("choose_layer_bits: budget_bytes needs layer_bytes (or a CalibrationResult)")
        cost = torch.as_tensor(layer_bytes, dtype=torch.int64).reshape(n, len(bits_options)).tolist()
        limit = int(budget_bytes)
    errs = err.tolist()
    min_rest = [0] * (n + 1)
    for li in range(n - 1, -1, -1):
        min_rest[li] = min_rest[li + 1] + min(cost[li])
    if min_rest[0] > limit:
        raise ValueError(f"choose_layer_bits: the budget allows {limit} but the cheapest assignment costs "
                         f"{min_rest[0]} ({'bits summed over layers' if budget_bytes is None else 'bytes'})")
    # Frontier entries: (cost, error, key) with key = -bits per layer so far (smaller = higher bits earlier).
    frontier = [(0, 0.0, ())]
    for li in range(n):
        grown = []
        for c0, e0, key in frontier:
            for j, b in enumerate(bits_options):
                c = c0 + cost[li][j]
                if c + min_rest[li + 1] <= limit:
                    grown.append((c, e0 + errs[li][j], key + (-b,)))
        grown.sort()
        frontier, best = [], math.inf
        for entry in grown:
            if entry[1] < best:  # strictly better error than every cheaper (or equal-cost, earlier) entry
                frontier.append(entry)
                best = entry[1]
    c, e, key = min(frontier, key=lambda t: (t[1], t[0], t[2]))
    return tuple(-b for b in key)
