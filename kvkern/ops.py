# SPDX-License-Identifier: Apache-2.0
"""The public front door: one typed, documented function per op.

Each function checks its arguments (one clear error per bad input), picks the
backend and launch configuration (for CUDA tensors from the tuning database for
this GPU and shape; for CPU tensors the C++ kernel and its heuristics) and calls
``torch.ops.kvkern.*``. Calling ``torch.ops.kvkern.<op>`` directly works too: it
runs the C++ kernel with its own heuristics.
"""

from __future__ import annotations

import torch

from . import _validate as V
from . import tuning
from ._dispatch import BACKENDS, DTYPE_KEYS, available_backends, choose_kernel

from .eviction_ops import *  # noqa: E402,F401,F403  (the score-and-evict front doors)
from .eviction_ops import __all__ as _EVICTION_ALL
from .quant_ops import *  # noqa: E402,F401,F403  (the quantized-KV front doors)
from .quant_ops import __all__ as _QUANT_ALL

__all__ = ["decode_attention", "BACKENDS", *_EVICTION_ALL, *_QUANT_ALL]

_CONFIG_KEYS = ("num_splits", "block_n", "num_warps", "num_stages")


def _check_tuned_config(backend: str, config: dict) -> None:
    # What the backend's launcher or glue would refuse at the call (tuning files are checked
    # with it, so a bad entry is a skipped file rather than an error on every call).
    if backend == "triton":
        try:
            from .triton.decode_attention import check_config
        except ImportError:  # no Triton here: the entry is never chosen
            return
        check_config(**config)  # the shared bounds, then the launcher's own choices
        return
    V.check_launch_config("decode_attention", config)
    if backend == "cuda":
        from . import cuda_variants

        cuda_variants.check_config(**config)


DECODE_ATTENTION_TUNING = tuning.OpSpec(
    op="decode_attention",
    static=("head_dim", "dtype", "group"),
    dims=("batch_heads", "capacity"),
    config=_CONFIG_KEYS,
    check_config=_check_tuned_config,
)


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
    fn, params = choose_kernel("decode_attention", op, q.device, backend,
                               {"head_dim": int(D), "dtype": DTYPE_KEYS[q.dtype], "group": int(Hq // Hkv)},
                               {"batch_heads": B * Hkv, "capacity": C})
    if config:
        unknown = set(config) - set(_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"{op}: config: unknown keys {sorted(unknown)}; expected among {list(_CONFIG_KEYS)}")
        V.check_launch_config(f"{op}: config", config)
        params = [config.get(k, p) for k, p in zip(_CONFIG_KEYS, params)]
    out, lse = fn(q, k_cache, v_cache, lengths, log_w, sm_scale, *params)
    return (out, lse) if return_lse else out
