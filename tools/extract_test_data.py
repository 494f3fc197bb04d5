# SPDX-License-Identifier: Apache-2.0
"""Extracts the slice of the shared real-activation file that the tests need, so a
clean checkout (CI, the GPU machine) has it without ../shared.

Source: ../shared/data/smollm2_wiki_T1024.safetensors (SmolLM2-135M-Instruct on 1024
tokens of Wikipedia summaries; see ../shared/specs/real-model-and-data.md).
Kept per stored layer L: layer{L}.q_last [1, 9, 64] (the last query, post-RoPE),
layer{L}.k / .v [1, 3, 1024, 64] and layer{L}.last_query_attn_out [1, 9, 64], all fp32,
bit-identical to the source (tests/test_real_activations.py checks that when the
source is present).

    python tools/extract_test_data.py [SOURCE] [DEST]
"""

import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "data" / "smollm2_wiki_T1024.safetensors"
DEST = ROOT / "tests" / "data" / "smollm2_wiki_T1024_decode.safetensors"


def main(source=SOURCE, dest=DEST):
    tensors = {}
    with safe_open(str(source), "pt") as f:
        meta = dict(f.metadata() or {})
        for layer in json.loads(meta["layers"]):
            p = f"layer{layer}"
            tensors[f"{p}.q_last"] = f.get_tensor(f"{p}.q")[:, :, -1].contiguous()
            for name in ("k", "v", "last_query_attn_out"):
                tensors[f"{p}.{name}"] = f.get_tensor(f"{p}.{name}").contiguous()
    meta["extracted_from"] = Path(source).name
    meta["extracted_by"] = "tools/extract_test_data.py"
    save_file(tensors, str(dest), metadata=meta)
    print(f"wrote {dest} ({Path(dest).stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
