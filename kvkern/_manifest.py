# SPDX-License-Identifier: Apache-2.0
"""Which dispatch keys each kvkern op must have kernels for, in this process.

tests/test_registration.py holds the dispatcher to this table exactly, so a
missing registration or a second kernel for a key cannot slip in unnoticed.
"""

from __future__ import annotations

import os

# op -> the backend family that implements it ("cpp": C++ CPU/CUDA kernels, "triton": Python launcher)
OPS = {
    "decode_attention": "cpp",
    "decode_attention_triton": "triton",
}


def expected_dispatch_keys(op: str, *, with_cuda: bool, triton_available: bool,
                           triton_interpret: bool | None = None) -> set[str]:
    """Dispatch keys ``kvkern::<op>`` must have kernels for (Meta comes from the fake)."""
    if triton_interpret is None:
        triton_interpret = os.environ.get("TRITON_INTERPRET") == "1"
    keys = {"Meta"}
    family = OPS[op]
    if family == "cpp":
        keys.add("CPU")
        if with_cuda:
            keys.add("CUDA")
    elif family == "triton" and triton_available:
        keys.add("CUDA")
        if triton_interpret:
            keys.add("CPU")
    return keys
