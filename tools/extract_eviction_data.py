# SPDX-License-Identifier: Apache-2.0
"""Extracts the queries tests/test_policies_real_data.py needs from the shared real-activation
file, so a clean checkout (CI, the GPU machine) has them without ../shared.

Source: shared/data/smollm2_wiki_T1024.safetensors (SmolLM2-135M-Instruct on 1024 tokens of
Wikipedia lead summaries; see shared/specs/real-model-and-data.md). Keys and values are NOT
copied: tests/data/smollm2_wiki_T1024_decode.safetensors already holds them bit-identically.
Kept per layer L in 8, 15, 22:

* ``layer{L}.q_tail``: fp32 ``[1, 9, 96, 64]``, the post-RoPE queries of positions
  ``928..1023`` (bit-identical to the source): SnapKV's 64-query window and G-KV's 16-query
  window ending at position 1007, and the 16 later queries 1008..1023 whose attention output
  the test measures;
* ``layer{L}.q_pre_rope``: fp16 ``[1, 9, 1024, 64]``, the pre-RoPE queries (rounded to fp16;
  the source is fp32), from which Expected Attention computes its statistics.

    python tools/extract_eviction_data.py [SOURCE] [DEST]
"""

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
NAME = "smollm2_wiki_T1024.safetensors"
# The shared folder sits beside the main checkout (../shared) and two levels up from a worktree.
CANDIDATES = [ROOT.parent / "shared" / "data" / NAME, ROOT.parent.parent / "shared" / "data" / NAME]
DEST = ROOT / "tests" / "data" / "smollm2_wiki_T1024_eviction.safetensors"
LAYERS = (8, 15, 22)
TAIL = 96


def find_source() -> Path | None:
    return next((p for p in CANDIDATES if p.exists()), None)


def main(source=None, dest=DEST):
    source = Path(source) if source else find_source()
    if source is None or not source.exists():
        sys.exit(f"extract_eviction_data: source not found (looked in {[str(p) for p in CANDIDATES]})")
    tensors = {}
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata() or {})
        T = int(meta["tokens"])
        for layer in LAYERS:
            p = f"layer{layer}"
            tensors[f"{p}.q_tail"] = f.get_tensor(f"{p}.q")[:, :, T - TAIL:].contiguous()
            tensors[f"{p}.q_pre_rope"] = f.get_tensor(f"{p}.q_pre_rope").to(torch.float16).contiguous()
    meta.update({
        "layers": json.dumps(list(LAYERS)),
        "tail_start": str(T - TAIL),
        "contents": "layer{L}.q_tail fp32 [1, 9, 96, 64] = post-RoPE q[:, :, tail_start:] (bit-identical); "
                    "layer{L}.q_pre_rope fp16 [1, 9, T, 64] = pre-RoPE q rounded to fp16; k and v are in "
                    "smollm2_wiki_T1024_decode.safetensors",
        "extracted_from": Path(source).name,
        "extracted_by": "tools/extract_eviction_data.py",
    })
    save_file(tensors, str(dest), metadata=meta)
    print(f"wrote {dest} ({Path(dest).stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
