# SPDX-License-Identifier: Apache-2.0
"""update_scores_ (every backend, every mode) against the reference, bit for bit; slots at
or past lengths untouched; argument errors leave hist as it was; opcheck, torch.compile."""

from __future__ import annotations

import pytest
import torch

from kvkern import reference
from kvkern.triton import scorers as triton_scorers

from eviction_utils import DEVICE, call, op_backends, out_of_range_cases, ragged_lengths, valid_mask, with_changes
from utils import randn

OP = "update_scores_"
BACKENDS = op_backends(OP)
MODES = reference.UPDATE_MODES

pytestmark = pytest.mark.skipif(not BACKENDS, reason="no update_scores_ kernel on this device")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw fp32 bits (NaN payloads and signed zeros included)."""
    return t.contiguous().view(torch.int32)


def make_inputs(B, H, C):
    """hist and new with NaN (and odd payloads) past lengths; hist_lengths on both sides of lengths."""
    lengths = ragged_lengths(B, H, C)
    hist_lengths = ragged_lengths(B, H, C)
    hist = randn(B, H, C, device=DEVICE).abs() * 3
    new = randn(B, H, C, device=DEVICE).abs() * 3
    tail = ~valid_mask(lengths, C)
    hist[tail] = float("nan")
    hist.view(torch.int32)[tail & (torch.rand(B, H, C, device=DEVICE) < 0.5)] = 0x7FC0BEEF  # a NaN payload
    new[tail] = float("nan")
    return hist, new, lengths, hist_lengths


def check(backend, hist, new, lengths, hist_lengths, decay, mode, what=""):
    C = hist.shape[-1]
    before = hist.clone()
    expected = hist.clone()
    reference.update_scores_(expected, new, lengths, hist_lengths, decay, mode)
    result = call(OP, backend, hist, new, lengths, hist_lengths, decay, mode)
    assert result is None
    what = what or f"{backend} {mode} decay={decay}"
    tail = ~valid_mask(lengths, C)
    assert torch.equal(bits(hist)[tail], bits(before)[tail]), f"{what}: a slot past lengths was written"
    torch.testing.assert_close(hist, expected, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [1, 37, 131, 1500])
def test_matches_reference(backend, mode, C):
    hist, new, lengths, hist_lengths = make_inputs(3, 4, C)
    for decay in (0.8, float(torch.rand(())), 0.0, 1.0, 1.7, -0.3):
        check(backend, hist.clone(), new, lengths, hist_lengths, decay, mode, f"{backend} {mode} C={C} decay={decay}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_history_edges(backend, mode):
    # Heads with no history, full history, history longer than the valid slots.
    C = 17
    lengths = torch.tensor([[0, 17, 17, 9, 9]], dtype=torch.int32, device=DEVICE)
    hist_lengths = torch.tensor([[17, 0, 17, 17, 4]], dtype=torch.int32, device=DEVICE)
    hist = randn(1, 5, C, device=DEVICE)
    new = randn(1, 5, C, device=DEVICE)
    check(backend, hist, new, lengths, hist_lengths, 0.9, mode)
    # No history: the new scores are copied.
    assert torch.equal(hist[0, 1], new[0, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_propagates_nan_and_handles_inf(backend):
    C = 12
    lengths = torch.full((1, 2), C, dtype=torch.int32, device=DEVICE)
    hist_lengths = torch.full((1, 2), C, dtype=torch.int32, device=DEVICE)
    hist = randn(1, 2, C, device=DEVICE)
    new = randn(1, 2, C, device=DEVICE)
    hist[0, 0, 1] = float("nan")
    new[0, 0, 2] = float("nan")
    hist[0, 1, 3] = float("inf")
    new[0, 1, 4] = float("-inf")
    for mode in MODES:
        check(backend, hist.clone(), new, lengths, hist_lengths, 0.5, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_aliased(backend, mode):
    B, H, C = 2, 3, 41
    store = randn(H, B, C + 9, device=DEVICE)
    hist = store.transpose(0, 1)[..., 4:C + 4]  # [B, H, C], batch and heads swapped, offset slots
    new = randn(B, H, 2 * C, device=DEVICE)[..., ::2].contiguous()
    lengths = ragged_lengths(B, 2 * H, C)[:, 1::2]
    hist_lengths = ragged_lengths(H, B, C).t()
    assert not (hist.is_contiguous() or lengths.is_contiguous() or hist_lengths.is_contiguous())
    store_before = store.clone()
    check(backend, hist, new, lengths, hist_lengths, 0.75, mode)
    # Nothing outside the view moved.
    outside = torch.ones_like(store, dtype=torch.bool)
    outside.transpose(0, 1)[..., 4:C + 4] = False
    assert torch.equal(store[outside], store_before[outside])
    # new may be hist itself.
    h = randn(B, H, C, device=DEVICE)
    check(backend, h, h.clone(), lengths, hist_lengths, 0.5, mode)
    h2 = h.clone()
    call(OP, backend, h2, h2, lengths, hist_lengths, 0.5, mode)
    h3 = h.clone()
    reference.update_scores_(h3, h.clone(), lengths, hist_lengths, 0.5, mode)
    assert torch.equal(h2, h3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_shapes(backend):
    for B, H, C in ((0, 2, 5), (2, 0, 5), (2, 2, 0)):
        hist = torch.zeros(B, H, C, device=DEVICE)
        z = torch.zeros(B, H, dtype=torch.int32, device=DEVICE)
        call(OP, backend, hist, hist.clone(), z, z, 0.5, "max")


# ---------------------------------------------------------------------------
# Argument errors, opcheck, torch.compile
# ---------------------------------------------------------------------------


def good():
    hist, new, lengths, hist_lengths = make_inputs(2, 3, 20)
    return dict(hist=hist, new=new, lengths=lengths, hist_lengths=hist_lengths, decay=0.8, mode="max")


def _with(**changes):
    return with_changes(good, **changes)


BAD = [
    ("mode_unknown", "hist_mode", "one of", _with(mode=lambda a: "mean")),
    ("decay_nan", "decay", "finite", _with(decay=lambda a: float("nan"))),
    ("decay_inf", "decay", "finite", _with(decay=lambda a: float("-inf"))),
    ("hist_rank", "hist", "3-D", _with(hist=lambda a: a["hist"][0])),
    ("hist_dtype", "hist", "float32", _with(hist=lambda a: a["hist"].double())),
    ("hist_last_dim_strided", "hist", "contiguous", _with(hist=lambda a: a["hist"].repeat_interleave(2, -1)[..., ::2])),
    ("new_dtype", "new", "float32", _with(new=lambda a: a["new"].half())),
    ("new_shape", "new", "shape", _with(new=lambda a: a["new"][:, :, :7])),
    ("new_last_dim_strided", "new", "contiguous", _with(new=lambda a: a["new"].repeat_interleave(2, -1)[..., ::2])),
    ("lengths_dtype", "lengths", "int32", _with(lengths=lambda a: a["lengths"].long())),
    ("lengths_shape", "lengths", "shape", _with(lengths=lambda a: a["lengths"][:, :2])),
    ("hist_lengths_rank", "hist_lengths", "2-D", _with(hist_lengths=lambda a: a["hist_lengths"][0])),
    ("hist_lengths_dtype", "hist_lengths", "int32", _with(hist_lengths=lambda a: a["hist_lengths"].float())),
] + out_of_range_cases(_with) + out_of_range_cases(_with, "hist_lengths")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_id,arg,words,make", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument_and_writes_nothing(backend, case_id, arg, words, make):
    a = make()
    before = a["hist"].clone()
    with pytest.raises((RuntimeError, ValueError)) as info:
        call(OP, backend, a["hist"], a["new"], a["lengths"], a["hist_lengths"], a["decay"], a["mode"])
    msg = str(info.value)
    assert "update_scores" in msg and f" {arg}: " in msg and words in msg, msg
    assert torch.equal(bits(a["hist"]), bits(before))


def test_device_mismatch_is_named():
    a = good()
    with pytest.raises(ValueError, match="hist_lengths: expected the device of hist"):
        triton_scorers.check_update_scores_args("op", a["hist"], a["new"], a["lengths"], a["hist_lengths"].to("meta"),
                                                0.5, "max")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    a = good()
    op = getattr(torch.ops.kvkern, OP if backend == "cpp" else "update_scores_triton_").default
    for mode in MODES:
        torch.library.opcheck(op, (a["hist"].clone(), a["new"], a["lengths"], a["hist_lengths"], 0.8, mode))
    # By keyword too (the schema's name is hist_mode: see csrc/torch_bindings.cpp).
    torch.library.opcheck(op, (a["hist"].clone(), a["new"], a["lengths"], a["hist_lengths"]),
                          {"decay": 0.5, "hist_mode": "sum"})


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    a = good()

    def step(hist, new, lengths, hist_lengths):
        call(OP, backend, hist, new * 2, lengths, hist_lengths, 0.8, "ema")
        return hist + 1

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    h1, h2 = a["hist"].clone(), a["hist"].clone()
    out1 = compiled(h1, a["new"], a["lengths"], a["hist_lengths"])
    out2 = step(h2, a["new"], a["lengths"], a["hist_lengths"])
    torch.testing.assert_close(out1, out2, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
@pytest.mark.parametrize("mode", MODES)
def test_triton_unchecked_bad_lengths_leave_the_head_alone(mode):
    # On CUDA lengths values are never read on the host: a head whose length is outside
    # [0, C] is not written; hist_lengths outside [0, C] act as the reference reads them.
    C = 19
    lengths = torch.tensor([[C, -1, C + 3, 7, 12]], dtype=torch.int32, device=DEVICE)
    hist_lengths = torch.tensor([[-4, 5, 5, C + 9, 3]], dtype=torch.int32, device=DEVICE)
    hist = randn(1, 5, C, device=DEVICE)
    new = randn(1, 5, C, device=DEVICE)
    before = hist.clone()
    triton_scorers.launch_update_scores(hist, new, lengths, hist_lengths, 0.7, triton_scorers.UPDATE_MODES[mode])
    bad = ((lengths < 0) | (lengths > C))[0]
    assert torch.equal(bits(hist[0, bad]), bits(before[0, bad]))
    expected = before.clone()
    reference.update_scores_(expected, new, lengths.clamp(0, C), hist_lengths, 0.7, mode)
    assert torch.equal(hist[0, ~bad], expected[0, ~bad])
