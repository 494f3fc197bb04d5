# SPDX-License-Identifier: Apache-2.0
"""Bad input gets one clear error naming the argument, from every entry point,
before any kernel runs: the public function (ValueError / TypeError) and the raw
ops (RuntimeError from the C++ checks, ValueError from the Triton launcher)."""

from __future__ import annotations

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
    ({"config": {"num_splits": -1}}, "config: expected values >= 0"),
    ({"sm_scale": float("nan")}, "sm_scale: expected a finite number"),
    ({"sm_scale": float("inf")}, "sm_scale: expected a finite number"),
])
def test_bad_options(kwargs, words):
    a = good()
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        kvkern.decode_attention(a["q"], a["k_cache"], a["v_cache"], a["lengths"], a["log_w"], **kwargs)


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
