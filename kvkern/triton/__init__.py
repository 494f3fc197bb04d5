# SPDX-License-Identifier: Apache-2.0
"""Registers the Triton implementations (the ``*_triton`` ops) with the dispatcher.

They run on CUDA tensors, and on CPU tensors too when ``TRITON_INTERPRET=1`` was
set before kvkern was imported (Triton fixes the mode when a kernel is defined).
Each is an opaque custom op: torch.compile calls it as an extern kernel.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ("cpu", "cuda") if INTERPRET else ("cuda",)

try:
    import triton  # noqa: F401

    AVAILABLE = True
    UNAVAILABLE_REASON = ""
except Exception as err:  # a broken triton install must not break kvkern's C++ ops
    AVAILABLE = False
    UNAVAILABLE_REASON = f"{type(err).__name__}: {err}"

if AVAILABLE:
    from .decode_attention import decode_attention_triton

    torch.library.register_kernel("kvkern::decode_attention_triton", DEVICES, decode_attention_triton)

    # Each module maps the ops it implements (the *_triton twins' names) to launchers.
    from . import evict, fp8, quant, score_evict, scorers, window_scores

    for _module in (window_scores, scorers, evict, score_evict, quant, fp8):
        for _name, _fn in _module.KERNELS.items():
            torch.library.register_kernel(f"kvkern::{_name}", DEVICES, _fn)
