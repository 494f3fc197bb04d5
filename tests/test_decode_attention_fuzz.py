# SPDX-License-Identifier: Apache-2.0
"""Property-based fuzzing of decode_attention against the reference (hypothesis).

Shapes, dtypes, lengths, biases and launch configs are drawn together, so corners
the hand-written cases miss (G larger than a tile, capacity below a tile, splits
exceeding a head's length) get exercised on every run.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvkern
from kvkern import reference
from kvkern.ops import available_backends

from utils import INTERPRET, TOLERANCES, assert_verbose_allclose, make_decode_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def decode_problem(draw):
    Hkv = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16]))
    C = draw(st.integers(1, 160))
    B = draw(st.integers(1, 3))
    lengths = torch.tensor(draw(st.lists(st.integers(0, C), min_size=B * Hkv, max_size=B * Hkv)),
                           dtype=torch.int32).view(B, Hkv)
    return dict(B=B, Hkv=Hkv, G=G, C=C, lengths=lengths,
                D=draw(st.sampled_from([64, 128, 256])),
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                with_log_w=draw(st.booleans()),
                num_splits=draw(st.sampled_from([0, 1, 2, 5])),
                sm_scale=draw(st.sampled_from([None, 0.05, 1.0])))


@pytest.mark.parametrize("backend", available_backends("decode_attention", DEVICE))
def test_fuzz_against_reference(backend):
    examples = 15 if backend == "triton" and INTERPRET else 60

    @settings(max_examples=examples, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(decode_problem())
    def check(p):
        q, k, v, lengths, log_w = make_decode_inputs(p["B"], p["G"] * p["Hkv"], p["Hkv"], p["C"], p["D"], p["dtype"],
                                                     DEVICE, lengths=p["lengths"], with_log_w=p["with_log_w"])
        out, lse = kvkern.decode_attention(q, k, v, lengths, log_w, p["sm_scale"], return_lse=True, backend=backend,
                                           config={"num_splits": p["num_splits"]})
        ref_out, ref_lse = reference.decode_attention(q, k, v, lengths, log_w, p["sm_scale"])
        assert_verbose_allclose(out, ref_out, *TOLERANCES[p["dtype"]], what=str(p))
        assert_verbose_allclose(lse, ref_lse, *TOLERANCES[p["dtype"]], what=f"lse {p}")

    check()
