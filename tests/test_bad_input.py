# SPDX-License-Identifier: Apache-2.0
"""Bad input gets one clear error naming the argument, from every entry point,
before any kernel runs: the public function (ValueError / TypeError) and the raw
ops (RuntimeError from the C++ checks, ValueError from the Triton launcher)."""

from __future__ import annotations

import re

import pytest
import torch

import kvkern
from kvkern.ops import available_backends

from utils import make_decode_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def good():
    q, k, v, lengths, log_w = make_decode_inputs(2, 6, 2, 20, 64, torch.float32, DEVICE, with_log_w=True)
    return dict(q=q, k_cache=k, v_cache=v, lengths=lengths, log_w=log_w)


def _replace(name, fn):
    def make():
        args = good()
        args[name] = fn(args)
        return args
    return make


# (id, argument named in the error, words the message must contain, builder of bad arguments)
BAD = [
    ("q_rank", "q", "3-D", _replace("q", lambda a: a["q"][0])),
    ("k_rank", "k_cache", "4-D", _replace("k_cache", lambda a: a["k_cache"][0])),
    ("v_rank", "v_cache", "4-D", _replace("v_cache", lambda a: a["v_cache"][:, :, :, None])),
    ("lengths_rank", "lengths", "2-D", _replace("lengths", lambda a: a["lengths"].flatten())),
    ("q_dtype", "q", "dtype", _replace("q", lambda a: a["q"].double())),
    ("k_dtype_mismatch", "k_cache", "dtype", _replace("k_cache", lambda a: a["k_cache"].half())),
    ("v_dtype_mismatch", "v_cache", "dtype", _replace("v_cache", lambda a: a["v_cache"].bfloat16())),
    ("lengths_dtype", "lengths", "int32", _replace("lengths", lambda a: a["lengths"].long())),
    ("log_w_dtype", "log_w", "float32", _replace("log_w", lambda a: a["log_w"].half())),
    ("head_dim", "q", "64, 128, 256",
     lambda: dict(zip(("q", "k_cache", "v_cache", "lengths", "log_w"),
                      make_decode_inputs(2, 6, 2, 20, 80, torch.float32, DEVICE, with_log_w=True)))),
    ("group_not_multiple", "q", "multiple", _replace("q", lambda a: a["q"][:, :5])),
    ("batch_mismatch", "k_cache", "shape", _replace("k_cache", lambda a: a["k_cache"][:1])),
    ("capacity_mismatch", "v_cache", "shape", _replace("v_cache", lambda a: a["v_cache"][:, :, :10])),
    ("lengths_shape", "lengths", "shape", _replace("lengths", lambda a: a["lengths"][:, :1])),
    ("log_w_shape", "log_w", "shape", _replace("log_w", lambda a: a["log_w"][:, :, :5])),
    ("k_last_dim_strided", "k_cache", "contiguous", _replace("k_cache", lambda a: a["k_cache"].repeat_interleave(
        2, dim=-1)[..., ::2])),
    ("lengths_negative", "lengths", "[0, C]", _replace("lengths", lambda a: a["lengths"] - 100)),
    ("lengths_over_capacity", "lengths", "[0, C]", _replace("lengths", lambda a: a["lengths"] + 100)),
]
if DEVICE == "cuda":  # on CUDA lengths values are not checked (that would need a host sync)
    BAD = [b for b in BAD if not b[0].startswith("lengths_") or b[0] in ("lengths_rank", "lengths_dtype", "lengths_shape")]


def call_public(a):
    return kvkern.decode_attention(a["q"], a["k_cache"], a["v_cache"], a["lengths"], a["log_w"])


@pytest.mark.parametrize("case_id,arg,words,make", BAD, ids=[b[0] for b in BAD])
def test_public_function_names_the_argument(case_id, arg, words, make):
    with pytest.raises((ValueError, TypeError)) as info:
        call_public(make())
    msg = str(info.value)
    assert msg.startswith("kvkern.decode_attention: ") and f" {arg}: " in msg and words in msg, msg


@pytest.mark.parametrize("backend", available_backends("decode_attention", DEVICE))
@pytest.mark.parametrize("case_id,arg,words,make", BAD, ids=[b[0] for b in BAD])
def test_raw_op_names_the_argument(backend, case_id, arg, words, make):
    op = torch.ops.kvkern.decode_attention_triton if backend == "triton" else torch.ops.kvkern.decode_attention
    a = make()
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        op(a["q"], a["k_cache"], a["v_cache"], a["lengths"], a["log_w"])
    msg = str(info.value)
    assert f" {arg}: " in msg and words in msg, msg


def test_device_mismatch():
    if DEVICE != "cuda":
        pytest.skip("needs a second device type")
    a = good()
    a["lengths"] = a["lengths"].cpu()
    with pytest.raises(ValueError, match="lengths: expected the device of q"):
        call_public(a)


@pytest.mark.parametrize("kwargs,words", [
    ({"backend": "tpu"}, "backend: expected one of"),
    ({"config": {"num_split": 2}}, "config: unknown keys"),
    ({"config": {"num_splits": -1}}, "config: num_splits: expected 0 (heuristic) or a value in [1, 65535], got -1"),
    ({"config": {"block_n": 2**32}}, "config: block_n: expected 0 (heuristic) or a value in [1, 4096]"),
    ({"config": {"num_warps": 2.5}}, "config: num_warps: expected an int"),
    ({"sm_scale": float("nan")}, "sm_scale: expected a finite float32 number"),
    ({"sm_scale": float("inf")}, "sm_scale: expected a finite float32 number"),
    ({"sm_scale": 1e39}, "sm_scale: expected a finite float32 number"),
])
def test_bad_options(kwargs, words):
    a = good()
    with pytest.raises((ValueError, TypeError), match=re.escape(words)):
        kvkern.decode_attention(a["q"], a["k_cache"], a["v_cache"], a["lengths"], a["log_w"], **kwargs)


# Launch-config values are int64 in the schema and int in the kernels: past the bounds they
# would wrap to 0 (a division by zero) or to a negative count (no work, garbage out).
RAW_CONFIG_CASES = [
    ((2**31, 0, 0, 0), "num_splits: expected 0 (heuristic) or a value in [1, 65535], got 2147483648"),
    ((0, 2**32, 0, 0), "block_n: expected 0 (heuristic) or a value in [1, 4096], got 4294967296"),
    ((0, 0, -1, 0), "num_warps: expected 0 (heuristic) or a value in [1, 32], got -1"),
    ((0, 0, 0, 2**40), "num_stages: expected 0 (heuristic) or a value in [1, 16]"),
]


@pytest.mark.parametrize("config,words", RAW_CONFIG_CASES)
def test_raw_op_bounds_the_launch_config(config, words):
    a = good()
    with pytest.raises(RuntimeError, match=re.escape(words)):
        torch.ops.kvkern.decode_attention(a["q"], a["k_cache"], a["v_cache"], a["lengths"], a["log_w"], None, *config)
    with pytest.raises(RuntimeError, match=re.escape("sm_scale: expected a finite float32 number")):
        torch.ops.kvkern.decode_attention(a["q"], a["k_cache"], a["v_cache"], a["lengths"], a["log_w"], 1e39)


def test_compressed_attention_bounds_num_splits():
    q = torch.randn(1, 2, 64, dtype=torch.bfloat16)
    fp8 = kvkern.FP8KVCache.empty(1, 1, 8, 64)
    quant = kvkern.QuantizedKVCache.empty(1, 1, 256, 64, bits=4, group=32, residual=32)
    for fn, cache in ((kvkern.fp8_decode_attention, fp8), (kvkern.quant_decode_attention, quant)):
        with pytest.raises(ValueError, match=re.escape("num_splits: expected 0 (heuristic) or a value in [1, 65535]")):
            fn(q, cache, num_splits=2**32)
    with pytest.raises(RuntimeError, match=re.escape("num_splits: expected 0 (heuristic) or a value in [1, 65535]")):
        torch.ops.kvkern.fp8_decode_attention(q, fp8.k_fp8, fp8.v_fp8, fp8.k_scale, fp8.v_scale, fp8.lengths, None,
                                             2**32, 0, 0, 0)
    with pytest.raises(RuntimeError, match=re.escape("num_splits: expected 0 (heuristic) or a value in [1, 65535]")):
        torch.ops.kvkern.quant_decode_attention(q, *quant.tensors, quant.lengths, 4, 32, None, 2**31)


def test_unavailable_backend_is_a_clear_error():
    a = good()
    missing = "cuda" if DEVICE == "cpu" else "cpu"
    with pytest.raises(RuntimeError, match=f"backend: '{missing}' is not available"):
        kvkern.decode_attention(a["q"], a["k_cache"], a["v_cache"], a["lengths"], backend=missing)


def test_not_a_tensor():
    a = good()
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        kvkern.decode_attention(a["q"].tolist(), a["k_cache"], a["v_cache"], a["lengths"])


def test_errors_leave_the_process_usable():
    # After every rejected call the op still computes correctly.
    for _, _, _, make in BAD:
        try:
            call_public(make())
        except (ValueError, TypeError, RuntimeError):
            pass
    a = good()
    out = call_public(a)
    assert torch.isfinite(out).all()
