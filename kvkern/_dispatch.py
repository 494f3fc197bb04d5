# SPDX-License-Identifier: Apache-2.0
"""Backend choice for every front door: which registered kernel runs a call.

Each op ``X`` may have a C++ kernel (``kvkern::X``, CPU and/or CUDA) and a Triton
twin (``kvkern::X_triton``). ``backend="auto"`` takes, in order: the backend the
tuning database names for this GPU and shape (ops with a registered
:class:`kvkern.tuning.OpSpec`, CUDA tensors only), the C++ kernel of the
tensors' device, the Triton twin. An explicit backend that is not registered for
the device is one clear error listing what is.

The choice is a pure function of the op, device, static shape parameters, the
dynamic dims and ``$KVKERN_TUNED_CONFIG_DIR``: cached for eager calls and marked
constant for ``torch.compile`` (dynamo does not trace the file reads and
warnings of the lookup). Dims of -1 mean "symbolic under compile": no lookup,
the kernel's own heuristics decide.
"""

from __future__ import annotations

import functools
import os

import torch
from torch.fx.experimental import symbolic_shapes

from . import tuning
from ._fake import triton_twin

__all__ = ["BACKENDS", "DTYPE_KEYS", "available_backends", "choose_kernel"]

BACKENDS = ("auto", "cpu", "cuda", "triton")
DTYPE_KEYS = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}  # "dtype" in tuning files
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _has_kernel(op: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"kvkern::{op}", dispatch_key)


def _kernels(op: str, device_type: str) -> dict[str, str]:
    # {backend: dispatcher op name} registered for this device type
    key = _DISPATCH_KEYS.get(device_type)
    have = {}
    if key and _has_kernel(op, key):
        have[device_type] = op
    if key and _has_kernel(triton_twin(op), key):
        have["triton"] = triton_twin(op)
    return have


def available_backends(op: str, device_type: str) -> tuple[str, ...]:
    """Backends of ``op`` that can run on ``device_type`` ("cpu" or "cuda") in this process."""
    return tuple(_kernels(op, device_type))


def choose_kernel(op: str, public: str, device: torch.device, backend: str, static: dict | None = None,
                  dims: dict | None = None) -> tuple:
    """``(kernel, config)``: the ``torch.ops.kvkern`` callable to run and the tuned launch config
    (a tuple in the OpSpec's ``config`` order; all 0 = the kernel's heuristics when nothing is
    tuned, the tuned backend was overridden, or the op has no spec).

    Args:
        op: the C++ op name (``"quantize_kv_"``); its twin is found by :func:`triton_twin`.
        public: the front door's name, for errors.
        device: the device of the call's tensors.
        backend: one of :data:`BACKENDS`.
        static: the OpSpec's static parameters (``{name: value}``, in its order), or None.
        dims: the OpSpec's dims (``{name: int}``); a symbolic value (torch.compile with dynamic
            shapes) in either skips the lookup.
        The database is read only when both name exactly the spec's keys.

    Raises ValueError for an unknown ``backend``, RuntimeError when none can run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{public}: backend: expected one of {list(BACKENDS)}, got {backend!r}")
    static_items = tuple((k, _constant(v)) for k, v in (static or {}).items())
    dim_items = tuple((k, _constant(v)) for k, v in (dims or {}).items())
    if any(v is None for _, v in static_items + dim_items):
        # symbolic under torch.compile(dynamic): no lookup, the kernel's own heuristics decide
        static_items, dim_items = (), tuple((k, -1) for k, _ in dim_items)
    choice = _choose(op, device.type, device.index if device.index is not None else -1, backend, static_items,
                     dim_items, os.environ.get(tuning.ENV_DIR))
    if choice[0] == "error":
        raise RuntimeError(f"{public}: {choice[1]}")
    return getattr(torch.ops.kvkern, choice[0]), tuple(choice[1:])


def _constant(value):
    # The value if it is a constant (a plain value, or a size torch.compile specialized), None if
    # symbolic. Under dynamo a SymInt passes isinstance(int) and int() keeps it symbolic: ask the
    # shape environment instead (has_static_value adds no guard).
    if not isinstance(value, (int, torch.SymInt)) or isinstance(value, bool):
        return value
    if not torch.compiler.is_compiling():
        return None if isinstance(value, torch.SymInt) else int(value)
    if not symbolic_shapes.has_static_value(value):
        return None
    return int(symbolic_shapes.guard_scalar(value))


@torch.compiler.assume_constant_result
def _choose(*key) -> tuple:
    return _choose_cached(*key)


@functools.lru_cache(maxsize=4096)
def _choose_cached(op: str, device_type: str, device_index: int, backend: str, static: tuple, dims: tuple,
                   tuned_dir: str | None) -> tuple:
    # ("error", message) or (dispatcher op name, *config values)
    have = _kernels(op, device_type)
    spec = tuning.known_specs().get(op)
    entry = None
    if (spec is not None and device_type == "cuda" and backend in ("auto", "cuda", "triton")
            and tuple(k for k, _ in static) == spec.static and tuple(k for k, _ in dims) == spec.dims
            and all(v >= 0 for _, v in dims)):
        entry = tuning.lookup(spec, tuning.device_name(torch.device("cuda", max(device_index, 0))), dict(static),
                              dict(dims))
    if backend == "auto":
        if entry is not None and entry.get("backend") in have:
            backend = entry["backend"]
        else:
            backend = next((b for b in (device_type, "triton") if b in have), "")
            if not backend:
                return ("error", f"no backend is available for {device_type} tensors (python -m kvkern info)")
    elif backend not in have:
        return ("error", f"backend: {backend!r} is not available for {device_type} tensors here; "
                         f"available: {sorted(have)} (python -m kvkern info)")
    keys = spec.config if spec is not None else ()
    tuned = entry is not None and entry.get("backend") == backend
    return (have[backend], *(int(entry.get(k, 0)) if tuned else 0 for k in keys))


tuning.on_clear_caches(_choose_cached.cache_clear)
