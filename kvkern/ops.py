# SPDX-License-Identifier: Apache-2.0
"""The public front door: one typed, documented function per op.

Each function checks its arguments (one clear error per bad input), picks the
backend and launch configuration for this device and shape from the tuning
database, and calls ``torch.ops.kvkern.*``. Calling ``torch.ops.kvkern.<op>``
directly works too: it runs the C++ kernel with its own heuristics.
"""

from __future__ import annotations


import functools
import os

import torch

from . import _validate as V
from ._fake import triton_twin
from . import tuning

from .eviction_ops import *  # noqa: E402,F401,F403  (the score-and-evict front doors)
from .eviction_ops import __all__ as _EVICTION_ALL
from .quant_ops import *  # noqa: E402,F401,F403  (the quantized-KV front doors)
from .quant_ops import __all__ as _QUANT_ALL

__all__ = ["decode_attention", "BACKENDS", *_EVICTION_ALL, *_QUANT_ALL]

BACKENDS = ("auto", "cpu", "cuda", "triton")
_CONFIG_KEYS = ("num_splits", "block_n", "num_warps", "num_stages")

DECODE_ATTENTION_TUNING = tuning.OpSpec(
    op="decode_attention",
    static=("head_dim", "dtype", "group"),
    dims=("batch_heads", "capacity"),
)

_DTYPE_KEYS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"kvkern::{op}", dispatch_key)


def available_backends(op: str, device_type: str) -> tuple[str, ...]:
    """Backends of ``op`` that can run on ``device_type`` ("cpu" or "cuda") in this process."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return ()
    found = []
    if _has_kernel(op, key):
        found.append(device_type)
    if _has_kernel(triton_twin(op), key):
        found.append("triton")
    return tuple(found)


@torch.compiler.assume_constant_result
def _choose_decode_attention(*key) -> tuple:
    # Marked constant for torch.compile (dynamo does not trace into it: its file
    # reads and warnings stay out of the graph); cached for eager calls.
    return _choose_decode_attention_cached(*key)


@functools.lru_cache(maxsize=4096)
def _choose_decode_attention_cached(
    device_type: str, device_index: int, backend: str, head_dim: int, dtype_key: str, group: int,
    batch_heads: int, capacity: int, tuned_dir: str | None,
) -> tuple:
    # A pure function of shapes, device and the user's tuning directory.
    # batch_heads / capacity of -1 mean "symbolic under compile": then the kernel's
    # own run-time heuristic picks the split count.
    op = "decode_attention"
    available = available_backends(op, device_type)
    entry = None
    if device_type == "cuda" and batch_heads >= 0:
        entry = tuning.lookup(
            DECODE_ATTENTION_TUNING,
            tuning.device_name(torch.device(device_type, device_index)),
            {"head_dim": head_dim, "dtype": dtype_key, "group": group},
            {"batch_heads": batch_heads, "capacity": capacity},
        )
    if backend == "auto":
        if entry is not None and entry.get("backend") in available:
            backend = entry["backend"]
        elif device_type in available:
            backend = device_type
        elif "triton" in available:
            backend = "triton"
        else:
            return ("error", f"no backend is available for {device_type} tensors (python -m kvkern info)")
    elif backend not in available:
        return ("error", f"backend: {backend!r} is not available for {device_type} tensors here; "
                         f"available: {list(available)} (python -m kvkern info)")
    params = tuple(int(entry.get(k, 0)) if entry and entry.get("backend") == backend else 0 for k in _CONFIG_KEYS)
    return (backend, *params)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    log_w: torch.Tensor | None = None,
    sm_scale: float | None = None,
    *,
    return_lse: bool = False,
    backend: str = "auto",
    config: dict | None = None,
):
    """Attention of one new query token per sequence over a compressed KV cache.

    For batch ``b``, query head ``h`` and its kv head ``j = h // G`` (``G = Hq / Hkv``)::

        s_i = sm_scale * <q[b, h], k_cache[b, j, i]> + log_w[b, j, i]     for i < lengths[b, j]
        out[b, h] = sum_i softmax(s)_i * v_cache[b, j, i]

    Slots at or past ``lengths`` are never read; a head with length 0 gives zeros
    (and ``lse = -inf``). Accumulates in fp32. No host sync and no allocation that
    depends on data, so it runs inside CUDA graphs and ``torch.compile(fullgraph=True)``.

    Args:
        q: ``[B, Hq, D]`` float16, bfloat16 or float32; ``D`` in {64, 128, 256}.
        k_cache: ``[B, Hkv, C, D]``, q's dtype and device; ``Hq`` a multiple of ``Hkv``.
        v_cache: ``[B, Hkv, C, D]``, like ``k_cache``.
        lengths: ``[B, Hkv]`` int32, valid slots per (batch, kv head), each in ``[0, C]``.
            Checked on CPU; on CUDA (where a check would need a host sync) an
            out-of-range length makes that head's output NaN, never an out-of-bounds read.
        log_w: ``[B, Hkv, C]`` float32 or None: additive logit bias per slot
            (KeepKV electoral votes enter as ``log(votes)``).
        sm_scale: logit scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp of the logits, ``[B, Hq]`` float32.
        backend: "auto" (tuning database, else heuristic), "cpu" (C++), "cuda" (CUDA C++) or "triton".
        config: optional launch override, keys among num_splits, block_n, num_warps, num_stages.

    Inputs may be strided in every dim but the last, which must be contiguous.
    Nothing is mutated.

    Returns:
        ``out [B, Hq, D]`` in q's dtype, or ``(out, lse)`` if ``return_lse``.
    """
    op = "kvkern.decode_attention"
    sm_scale = V.check_decode_attention_args(op, q, k_cache, v_cache, lengths, log_w, sm_scale)
    B, Hq, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend: expected one of {list(BACKENDS)}, got {backend!r}")

    static_dims = isinstance(B, int) and isinstance(Hkv, int) and isinstance(C, int)
    choice = _choose_decode_attention(
        q.device.type, q.device.index if q.device.index is not None else -1, backend, int(D),
        _DTYPE_KEYS[q.dtype], int(Hq // Hkv), int(B * Hkv) if static_dims else -1, int(C) if static_dims else -1,
        os.environ.get(tuning.ENV_DIR),
    )
    if choice[0] == "error":
        raise RuntimeError(f"{op}: {choice[1]}")
    chosen_backend, *params = choice
    if config:
        unknown = set(config) - set(_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"{op}: config: unknown keys {sorted(unknown)}; expected among {list(_CONFIG_KEYS)}")
        params = [int(config.get(k, p)) for k, p in zip(_CONFIG_KEYS, params)]
        if min(params) < 0:
            raise ValueError(f"{op}: config: expected values >= 0 (0 = heuristic), got {config}")
    fn = torch.ops.kvkern.decode_attention_triton if chosen_backend == "triton" else torch.ops.kvkern.decode_attention
    out, lse = fn(q, k_cache, v_cache, lengths, log_w, sm_scale, *params)
    return (out, lse) if return_lse else out
