# SPDX-License-Identifier: Apache-2.0
"""decode_attention on real activations of a real model (SmolLM2-135M, GQA 9/3, D=64).

The last query of a 1024-token Wikipedia passage over the full cache must reproduce
the model's own attention output (computed in fp64 when the data was recorded) for
every stored layer: real keys have outlier channels and strong attention sinks,
which random data lacks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import kvkern
from kvkern import reference
from kvkern.ops import available_backends

from utils import TOLERANCES, assert_verbose_allclose, poison_past_lengths

DATA = Path(__file__).parent / "data" / "smollm2_wiki_T1024_decode.safetensors"
SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "smollm2_wiki_T1024.safetensors"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = available_backends("decode_attention", DEVICE)


def _layers():
    with safe_open(str(DATA), "pt") as f:
        return json.loads(f.metadata()["layers"])


LAYERS = _layers()


def load_layer(layer: int, device=DEVICE):
    with safe_open(str(DATA), "pt", device="cpu") as f:
        get = lambda name: f.get_tensor(f"layer{layer}.{name}").to(device)  # noqa: E731
        return get("q_last"), get("k"), get("v"), get("last_query_attn_out")


@pytest.mark.skipif(not SOURCE.exists(), reason="the shared data folder is not beside this checkout")
def test_extract_matches_source():
    with safe_open(str(SOURCE), "pt") as src, safe_open(str(DATA), "pt") as ext:
        for layer in LAYERS:
            assert torch.equal(ext.get_tensor(f"layer{layer}.q_last"), src.get_tensor(f"layer{layer}.q")[:, :, -1])
            for name in ("k", "v", "last_query_attn_out"):
                assert torch.equal(ext.get_tensor(f"layer{layer}.{name}"), src.get_tensor(f"layer{layer}.{name}"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", LAYERS)
def test_reproduces_model_attention_fp32(backend, layer):
    q, k, v, expected = load_layer(layer)
    lengths = torch.full((1, k.shape[1]), k.shape[2], dtype=torch.int32, device=DEVICE)
    out = kvkern.decode_attention(q, k, v, lengths, backend=backend)
    assert_verbose_allclose(out, expected, *TOLERANCES[torch.float32], what=f"layer {layer}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_real_activations_low_precision(backend, dtype):
    # Rounded storage: hold the kernel to the fp64 reference on the same rounded
    # inputs, and to the model's output within the rounding of the inputs.
    for layer in LAYERS:
        q, k, v, expected = (t.to(dtype) if t.dim() == 4 or i == 0 else t
                             for i, t in enumerate(load_layer(layer)))
        lengths = torch.full((1, k.shape[1]), k.shape[2], dtype=torch.int32, device=DEVICE)
        out = kvkern.decode_attention(q, k, v, lengths, backend=backend)
        ref, _ = reference.decode_attention(q, k, v, lengths)
        assert_verbose_allclose(out, ref, *TOLERANCES[dtype], what=f"layer {layer} vs reference")
        assert_verbose_allclose(out, expected, 5e-2, 5e-2, what=f"layer {layer} vs model")


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_activations_truncated_cache(backend):
    # The same real cache cut to ragged per-head lengths, garbage past them.
    layer = LAYERS[len(LAYERS) // 2]
    q, k, v, _ = load_layer(layer)
    k, v = k.clone(), v.clone()
    lengths = torch.tensor([[1, 517, 1024]], dtype=torch.int32, device=DEVICE)
    poison_past_lengths(k, lengths)
    poison_past_lengths(v, lengths)
    out = kvkern.decode_attention(q, k, v, lengths, backend=backend)
    ref, _ = reference.decode_attention(q, k, v, lengths)
    assert_verbose_allclose(out, ref, *TOLERANCES[torch.float32])
