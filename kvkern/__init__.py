# SPDX-License-Identifier: Apache-2.0
"""kvkern: KV-cache compression for LLM inference as PyTorch custom ops.

Public ops live in ``kvkern.ops`` and are re-exported here; every one is also
``torch.ops.kvkern.<name>``. ``kvkern.reference`` holds the plain-PyTorch oracles.
``python -m kvkern info`` prints what a bug report needs.
"""

from ._version import __version__

try:
    from ._build_info import BUILD_INFO
except ImportError:  # a source tree that was never built
    BUILD_INFO = None


def _load_extension():
    import torch

    try:
        from . import _C  # noqa: F401  (its static initializers register the ops)
    except ImportError as err:
        hint = "build it with: pip install --no-build-isolation -e ."
        if BUILD_INFO and BUILD_INFO.get("with_cuda") and torch.version.cuda is None:
            hint = (f"this kvkern was built with CUDA {BUILD_INFO['cuda_version']} but torch "
                    f"{torch.__version__} has no CUDA; rebuild with KVKERN_CUDA=0 or install a CUDA torch")
        raise ImportError(f"kvkern: the compiled extension kvkern._C failed to load ({err}); {hint}") from err
    if BUILD_INFO and BUILD_INFO.get("with_cuda") and torch.version.cuda:
        built, running = BUILD_INFO["cuda_version"].split(".")[0], torch.version.cuda.split(".")[0]
        if built != running:
            raise ImportError(
                f"kvkern: built for CUDA {BUILD_INFO['cuda_version']} but torch {torch.__version__} uses CUDA "
                f"{torch.version.cuda}; install the kvkern wheel for CUDA {running}"
            )


_load_extension()

from . import _fake  # noqa: E402,F401  (registers the fake impls)
from . import reference  # noqa: E402,F401
from . import triton as _triton_backend  # noqa: E402,F401  (registers the Triton kernels)
from . import ops  # noqa: E402
from .ops import decode_attention  # noqa: E402
from .eviction_ops import (  # noqa: E402
    allocate_head_budgets, average_rope, compact_, evict_, expected_attention_scores, key_redundancy,
    query_statistics, score_evict_, select_keep, slot_scores, update_scores_, window_scores,
)

from .quant_ops import (  # noqa: E402
    QuantizedKVCache, append_quantized_kv_, dequantize_kv, quant_decode_attention, quantize_kv_,
)
from .quant_ops import FP8KVCache, append_fp8_kv_, fp8_decode_attention, fp8_scales, quantize_fp8_kv_  # noqa: E402

__all__ = ["__version__", "decode_attention", "reference", "ops", "QuantizedKVCache", "quantize_kv_",
           "dequantize_kv", "append_quantized_kv_", "quant_decode_attention", "window_scores", "expected_attention_scores",
           "query_statistics", "average_rope", "slot_scores", "key_redundancy", "update_scores_", "select_keep",
           "compact_", "evict_", "allocate_head_budgets", "score_evict_", "FP8KVCache", "fp8_scales",
           "quantize_fp8_kv_", "append_fp8_kv_", "fp8_decode_attention"]
