# SPDX-License-Identifier: Apache-2.0
"""allocate_head_budgets (AdaKV): every backend against kvkern.reference.allocate_head_budgets,
exactly, plus the spec's oracles (budgets sum to sum_j min(budget, L_j), per-head floors)."""

from __future__ import annotations

import pytest
import torch

from kvkern import reference

from eviction_utils import DEVICE, call, op_backends
from test_select_keep import SCORE_KINDS, make_lengths, make_scores
from utils import poison_past_lengths

OP = "allocate_head_budgets"
BACKENDS = op_backends(OP)


def check(backend, scores, lengths, budget, safeguard=0.2, n_sink=0, n_recent=0):
    out = call(OP, backend, scores, lengths, budget, safeguard, n_sink, n_recent)
    ref = reference.allocate_head_budgets(scores.cpu(), lengths.cpu(), budget, safeguard, n_sink, n_recent)
    assert out.dtype == torch.int32 and out.shape == lengths.shape and out.device == scores.device
    assert torch.equal(out.cpu(), ref), f"{backend}: {out.tolist()} != reference {ref.tolist()}"
    # Oracles: the layer keeps sum_j min(budget, L_j) per batch element; no head
    # more than its length; without sinks / recent slots every head keeps at least
    # its safeguard floor (capped at its length).
    L = lengths.to(torch.int64)
    assert torch.equal(out.sum(-1).to(torch.int64), L.clamp(max=budget).sum(-1))
    assert (out.to(torch.int64) <= L).all()
    if n_sink == 0 and n_recent == 0 and safeguard <= 1:
        floor = L.clamp(max=int(budget * safeguard))
        assert (out.to(torch.int64) >= floor).all()
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,H", [(37, 1), (131, 3), (37, 8)])
@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("safeguard", [0.0, 0.2, 1.0])
def test_matches_reference(backend, C, H, kind, safeguard):
    B = 2
    scores = make_scores(B, H, C, kind)
    budget = int(torch.randint(1, C, ()))
    lengths = make_lengths(B, H, C, budget)
    poison_past_lengths(scores, lengths)
    n_sink, n_recent = (0, 0) if safeguard == 0.2 else (int(torch.randint(0, 4, ())), int(torch.randint(0, 4, ())))
    check(backend, scores, lengths, budget, safeguard, n_sink, n_recent)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_budgets(backend):
    scores = make_scores(2, 3, 37, "ties")
    lengths = torch.tensor([[0, 37, 5], [1, 0, 36]], dtype=torch.int32, device=DEVICE)
    for budget, safeguard in ((0, 0.2), (1, 1.0), (37, 0.5), (100, 0.3), (20, 1.0)):
        check(backend, scores, lengths, budget, safeguard, n_sink=2, n_recent=1)
    zero = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    assert not check(backend, scores, zero, 10).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_over_256(backend):
    # Two 8-bit slot digits in the Triton radix select; few distinct values and
    # heads that tie at equal slots exercise the (score, slot, head) tie rule.
    C = 300
    base = torch.randint(0, 3, (1, 1, C)).float()
    scores = base.repeat(2, 3, 1).to(DEVICE)
    scores[1, 1] = torch.randint(0, 3, (C,)).float()
    lengths = torch.tensor([[C, 290, 300], [7, 299, 260]], dtype=torch.int32, device=DEVICE)
    for budget in (1, 100, 259):
        check(backend, scores, lengths, budget, 0.25)
        check(backend, scores, lengths, budget, 0.1, n_sink=3, n_recent=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_heads_split_evenly(backend):
    # Identical scores in every head: the heads tie slot for slot, so each keeps
    # exactly the budget (the tie on equal (score, slot) goes to later heads but
    # covers whole slots).
    C, H = 64, 4
    scores = torch.randn(1, 1, C).repeat(2, H, 1).to(DEVICE)
    lengths = torch.full((2, H), C, dtype=torch.int32, device=DEVICE)
    out = check(backend, scores, lengths, 24, 0.2)
    assert (out == 24).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided(backend):
    big = make_scores(2, 6, 50, "random")
    scores = big[:, 1::2, 5:42]
    lengths = make_lengths(3, 2, 37, 10).t()
    check(backend, scores, lengths, 10, 0.3, n_sink=1)


def _args():
    scores = make_scores(2, 3, 37, "random")
    lengths = torch.full((2, 3), 30, dtype=torch.int32, device=DEVICE)
    return dict(scores=scores, lengths=lengths, budget=10, safeguard=0.2, n_sink=0, n_recent=0)


ERRORS = [
    ("budget_negative", dict(budget=-1), "budget"),
    ("safeguard_negative", dict(safeguard=-0.5), "safeguard"),
    ("safeguard_nan", dict(safeguard=float("nan")), "safeguard"),
    ("safeguard_over_one", dict(safeguard=2.0), r"safeguard: expected a fraction in \[0, 1\]"),
    ("n_sink_negative", dict(n_sink=-1), "n_sink"),
    ("n_recent_negative", dict(n_recent=-1), "n_recent"),
    ("scores_dtype", dict(scores="half"), "scores"),
    ("lengths_dtype", dict(lengths="long"), "lengths"),
    ("lengths_shape", dict(lengths="short"), "lengths"),
    ("lengths_over", dict(lengths="over"), r"\[0, C\]"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,change,words", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(backend, name, change, words):
    if name == "lengths_over" and backend == "triton" and DEVICE == "cuda":
        pytest.skip("the Triton backend cannot read values on CUDA")
    a = _args()
    for k, v in change.items():
        if v == "half":
            v = a["scores"].half()
        elif v == "long":
            v = a["lengths"].long()
        elif v == "short":
            v = a["lengths"][:, :2]
        elif v == "over":
            v = a["lengths"] + 8
        a[k] = v
    with pytest.raises((RuntimeError, ValueError), match=words):
        call(OP, backend, a["scores"], a["lengths"], a["budget"], a["safeguard"], a["n_sink"], a["n_recent"])


@pytest.mark.parametrize("op", [OP, OP + "_triton"])
def test_opcheck(op):
    if op.endswith("_triton") and "triton" not in BACKENDS:
        pytest.skip("no Triton backend here")
    scores = make_scores(2, 3, 37, "ties")
    lengths = make_lengths(2, 3, 37, 12)
    torch.library.opcheck(getattr(torch.ops.kvkern, op), (scores, lengths, 12, 0.25, 1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    scores = make_scores(2, 3, 37, "random")
    lengths = make_lengths(2, 3, 37, 12)

    def step(scores, lengths):
        return call(OP, backend, scores + 1, lengths, 12, 0.2, 1, 1) * 2

    torch._dynamo.reset()
    assert torch.equal(torch.compile(step, fullgraph=True)(scores, lengths), step(scores, lengths))
