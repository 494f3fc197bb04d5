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
for _op in ("window_scores", "expected_attention_scores", "slot_scores", "key_redundancy", "update_scores_",
            "select_keep", "compact_", "evict_", "allocate_head_budgets", "score_evict_",
            "quantize_kv_", "dequantize_kv", "append_quantized_kv_", "quant_decode_attention",
            "quantize_fp8_kv_", "append_fp8_kv_", "fp8_decode_attention"):
    OPS[_op] = "cpp"
    OPS[_op[:-1] + "_triton_" if _op.endswith("_") else _op + "_triton"] = "triton"
# CUDA C++ kernels exist only on the hot paths; the other ops run on CUDA through their Triton twin.
CUDA_CPP_OPS = {"decode_attention", "window_scores", "select_keep", "compact_", "evict_", "score_evict_",
                "quantize_kv_", "append_quantized_kv_", "quant_decode_attention",
                "quantize_fp8_kv_", "append_fp8_kv_", "fp8_decode_attention"}


def expected_dispatch_keys(op: str, *, with_cuda: bool, triton_available: bool,
                           triton_interpret: bool | None = None) -> set[str]:
    """Dispatch keys ``kvkern::<op>`` must have kernels for (Meta comes from the fake)."""
    if triton_interpret is None:
        triton_interpret = os.environ.get("TRITON_INTERPRET") == "1"
    keys = {"Meta"}
    family = OPS[op]
    if family == "cpp":
        keys.add("CPU")
        if with_cuda and op in CUDA_CPP_OPS:
            keys.add("CUDA")
    elif family == "triton" and triton_available:
        keys.add("CUDA")
        if triton_interpret:
            keys.add("CPU")
    return keys
