# SPDX-License-Identifier: Apache-2.0
"""select_keep: every backend against kvkern.reference.select_keep, exactly, plus the
spec's oracles (budgets exact, protected slots kept, nothing past the length)."""

from __future__ import annotations

import math

import pytest
import torch

import kvkern
from kvkern import reference

from eviction_utils import DEVICE, call, op_backends, valid_mask
from utils import poison_past_lengths

OP = "select_keep"
BACKENDS = op_backends(OP)
SCORE_KINDS = ["random", "ties", "equal", "nonfinite"]


def make_scores(B, H, C, kind, device=DEVICE):
    """fp32 scores; "ties": few distinct values; "nonfinite": ties plus NaN, +-inf, +-0, subnormals."""
    if kind == "random":
        s = torch.randn(B, H, C)
    elif kind == "ties":
        s = torch.randint(0, 3, (B, H, C)).float()
    elif kind == "equal":
        s = torch.full((B, H, C), 0.25)
    else:
        s = torch.randint(-1, 2, (B, H, C)).float()
        specials = torch.tensor([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -1e-45, -math.nan])
        pick = torch.rand(B, H, C) < 0.4
        s[pick] = specials[torch.randint(0, len(specials), (int(pick.sum()),))]
    return s.to(device)


def make_lengths(B, H, C, budget, device=DEVICE):
    """Ragged lengths covering 0, C, exactly the budget, below and just above it."""
    lengths = torch.randint(0, C + 1, (B, H), dtype=torch.int32)
    special = [0, C, budget, max(budget - 1, 0), min(budget + 1, C)]
    flat = lengths.view(-1)
    n = min(len(special), flat.numel())
    flat[:n] = torch.tensor(special[:n], dtype=torch.int32)
    flat.copy_(flat[torch.randperm(flat.numel())])
    return lengths.to(device)


def run(backend, scores, lengths, positions=None, budget=0, budgets=None, **kw):
    return call(OP, backend, scores, lengths, positions, budgets, budget, **kw)


def _cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def check(backend, scores, lengths, positions=None, budget=0, budgets=None, **kw):
    """Runs the op, compares with the reference exactly and checks the spec's oracles. Where the
    random draw made the request infeasible (the reference raises), the op must raise too."""
    try:
        ref_keep, ref_lengths = reference.select_keep(
            scores.cpu(), lengths.cpu(), _cpu(positions), budget if budgets is None else budgets.cpu(),
            **{k: _cpu(v) for k, v in kw.items()})
    except ValueError as err:
        if scores.device.type == "cuda" and backend == "triton":
            return None  # values are not read on CUDA: the head is left untouched (tested elsewhere)
        with pytest.raises((ValueError, RuntimeError), match="protected|quota|minima|budget"):
            run(backend, scores, lengths, positions, budget, budgets, **kw)
        assert "head" in str(err)
        return None
    keep, new_lengths = run(backend, scores, lengths, positions, budget, budgets, **kw)
    assert keep.dtype == torch.bool and keep.shape == scores.shape and keep.device == scores.device
    assert new_lengths.dtype == torch.int32 and new_lengths.shape == lengths.shape
    diff = (keep.cpu() != ref_keep).nonzero()
    assert diff.numel() == 0, f"{backend}: keep differs from the reference at {diff[:5].tolist()}"
    assert torch.equal(new_lengths.cpu(), ref_lengths)
    # Oracles that hold whatever the reference says.
    C = scores.shape[-1]
    K = budgets if budgets is not None else torch.full_like(lengths, budget)
    assert not (keep & ~valid_mask(lengths, C)).any(), "a slot past the length is kept"
    assert torch.equal(keep.sum(-1).to(torch.int32), torch.minimum(lengths, K).to(torch.int32))
    assert torch.equal(new_lengths, keep.sum(-1).to(torch.int32))
    pos = positions if positions is not None else torch.arange(C, dtype=torch.int32, device=scores.device).expand(
        scores.shape)
    prot = reference.protected_mask(lengths, pos, kw.get("n_sink", 0), kw.get("n_recent", 0),
                                    kw.get("protect_ranges"), kw.get("keep_mask"))
    assert not (prot & ~keep).any(), "a protected slot was dropped"
    return keep, new_lengths


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C,H", [(37, 1), (131, 3), (37, 8)])
@pytest.mark.parametrize("kind", SCORE_KINDS)
@pytest.mark.parametrize("budget_kind", ["scalar", "tensor"])
def test_matches_reference(backend, C, H, kind, budget_kind):
    B = 2
    scores = make_scores(B, H, C, kind)
    n_sink, n_recent = int(torch.randint(0, 3, ())), int(torch.randint(0, 3, ()))
    budget = int(torch.randint(n_sink + n_recent, C, ()))
    lengths = make_lengths(B, H, C, budget)
    poison_past_lengths(scores, lengths)
    budgets = None
    if budget_kind == "tensor":
        budgets = torch.randint(n_sink + n_recent, C + 1, (B, H), dtype=torch.int32, device=DEVICE)
        budgets.view(-1)[0] = lengths.view(-1)[0]  # one head exactly at its budget
    check(backend, scores, lengths, None, budget, budgets, n_sink=n_sink, n_recent=n_recent)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_budget_and_empty_heads(backend):
    scores = make_scores(2, 3, 37, "ties")
    lengths = torch.tensor([[0, 37, 5], [1, 0, 36]], dtype=torch.int32, device=DEVICE)
    check(backend, scores, lengths, budget=0)
    budgets = torch.tensor([[0, 0, 5], [1, 3, 0]], dtype=torch.int32, device=DEVICE)
    check(backend, scores, lengths, budgets=budgets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capacity_over_256(backend):
    # Slot indices above 255 need two 8-bit digits in the Triton radix select; few
    # distinct scores make the slot digits decide.
    C = 300
    scores = torch.randint(0, 4, (1, 2, C)).float().to(DEVICE)
    lengths = torch.tensor([[C, 290]], dtype=torch.int32, device=DEVICE)
    for budget in (1, 77, 260, 299):
        check(backend, scores, lengths, budget=budget, n_sink=1)


def _positions(B, H, C):
    # Strictly increasing positions with gaps (as after earlier evictions), per head.
    gaps = torch.randint(1, 4, (B, H, C), dtype=torch.int32)
    return (torch.cumsum(gaps, -1) - 1).to(torch.int32).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mechanism", ["sink_recent", "ranges", "batched_ranges", "keep_mask", "all"])
def test_protection(backend, mechanism):
    B, H, C = 2, 3, 131
    scores = make_scores(B, H, C, "ties")
    lengths = make_lengths(B, H, C, 60)
    poison_past_lengths(scores, lengths)
    positions = _positions(B, H, C)
    kw = {}
    if mechanism in ("sink_recent", "all"):
        kw.update(n_sink=4, n_recent=7)
    if mechanism in ("ranges", "all"):
        kw["protect_ranges"] = torch.tensor([[10, 20], [50, 50], [100, 104]], dtype=torch.int32, device=DEVICE)
    if mechanism == "batched_ranges":
        kw["protect_ranges"] = torch.tensor([[[0, 3], [30, 40]], [[200, 400], [7, 9]]], dtype=torch.int32,
                                            device=DEVICE)
    if mechanism in ("keep_mask", "all"):
        kw["keep_mask"] = (torch.rand(B, H, C) < 0.08).to(DEVICE)
    check(backend, scores, lengths, positions, budget=60, **kw)
    # No positions: ranges apply to slot indices.
    check(backend, scores, lengths, None, budget=60, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["quota", "minima"])
@pytest.mark.parametrize("cuts", [[40], [30, 60, 61, 200]], ids=["S2", "S5"])
@pytest.mark.parametrize("kind", ["random", "equal"])
def test_segments(backend, mode, cuts, kind):
    B, H, C = 2, 3, 131
    scores = make_scores(B, H, C, kind)
    lengths = make_lengths(B, H, C, 50)
    poison_past_lengths(scores, lengths)
    positions = _positions(B, H, C)
    kw = dict(segment_cuts=torch.tensor(cuts, dtype=torch.int32, device=DEVICE), n_sink=2, n_recent=3)
    if mode == "minima":
        kw["segment_min"] = torch.randint(0, 12, (len(cuts) + 1,), dtype=torch.int32, device=DEVICE)
    check(backend, scores, lengths, positions, budget=50, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_segment_quotas_exact(backend):
    # Pitfalls fair eviction: each segment keeps exactly its proportional quota.
    B, H, C = 1, 2, 100
    scores = make_scores(B, H, C, "random")
    lengths = torch.tensor([[100, 90]], dtype=torch.int32, device=DEVICE)
    cuts = torch.tensor([30], dtype=torch.int32, device=DEVICE)
    keep, _ = check(backend, scores, lengths, budget=40, segment_cuts=cuts)
    for j, L in enumerate((100, 90)):
        counts = [30, L - 30]
        quota = reference.segment_quotas(40, counts)
        assert int(keep[0, j, :30].sum()) == quota[0] and int(keep[0, j, 30:].sum()) == quota[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    B, H, C = 2, 3, 37
    big = make_scores(B, 2 * H, C + 5, "ties")
    scores = big[:, ::2, 3:3 + C]  # strided batch / head / slot offset, last dim contiguous
    lengths = make_lengths(H, B, C, 20).t()  # transposed strides
    budgets = torch.randint(9, C, (H, B), dtype=torch.int32, device=DEVICE).t()
    positions = _positions(B, H, 2 * C)[..., ::1][..., :C]
    keep_mask = (torch.rand(B, H, 2 * C) < 0.5).to(DEVICE)[..., :C]
    keep_mask[..., 6:] = False  # at most 6 + 3 protected, within every budget
    check(backend, scores, lengths, positions, budgets=budgets, keep_mask=keep_mask, n_sink=1, n_recent=2)


def _err_args():
    B, H, C = 2, 3, 37
    scores = make_scores(B, H, C, "random")
    lengths = torch.full((B, H), 30, dtype=torch.int32, device=DEVICE)
    return dict(scores=scores, lengths=lengths, positions=None, budgets=None, budget=10)


def _i32(x):
    return torch.tensor(x, dtype=torch.int32, device=DEVICE)


# (id, change to the arguments, words the message must contain, needs values: not raised on CUDA by Triton)
ERRORS = [
    ("protected_over_budget", dict(n_sink=6, n_recent=5), r"head \[0, 0\]: 11 protected slots exceed the budget 10",
     True),
    ("protected_one_head", dict(keep_mask="head12"), r"head \[1, 2\]: 12 protected slots exceed the budget 10", True),
    ("segment_quota", dict(segment_cuts=_i32([3]), n_sink=3),
     r"head \[0, 0\]: segment 0 has 3 protected slots but a quota of 1", True),
    ("segment_minima", dict(segment_cuts=_i32([10]), segment_min=_i32([8, 0]), n_recent=5),
     r"head \[0, 0\]: protected slots and segment minima need 13 slots, more than the budget 10", True),
    ("budget_negative", dict(budget=-1), "budget", False),
    ("budgets_negative", dict(budgets=_i32([[1, 2, 3], [4, -5, 6]])), "budgets", True),
    ("budgets_shape", dict(budgets=_i32([[1, 2, 3]])), "budgets", False),
    ("budgets_dtype", dict(budgets=torch.ones(2, 3, dtype=torch.int64, device=DEVICE)), "budgets", False),
    ("n_sink_negative", dict(n_sink=-1), "n_sink", False),
    ("n_recent_negative", dict(n_recent=-2), "n_recent", False),
    ("ranges_rank", dict(protect_ranges=_i32([1, 2])), "protect_ranges", False),
    ("ranges_pair", dict(protect_ranges=_i32([[1, 2, 3]])), "protect_ranges", False),
    ("ranges_batch", dict(protect_ranges=_i32([[[1, 2]]] * 3)), "protect_ranges", False),
    ("ranges_dtype", dict(protect_ranges=torch.tensor([[1, 2]], device=DEVICE)), "protect_ranges", False),
    ("ranges_reversed", dict(protect_ranges=_i32([[1, 2], [9, 4]])), "start <= end", True),
    ("cuts_not_increasing", dict(segment_cuts=_i32([5, 5])), "increasing", True),
    ("cuts_dtype", dict(segment_cuts=torch.tensor([5.0], device=DEVICE)), "segment_cuts", False),
    ("min_without_cuts", dict(segment_min=_i32([1])), "segment_min", False),
    ("min_shape", dict(segment_cuts=_i32([5]), segment_min=_i32([1, 2, 3])), "segment_min", False),
    ("keep_mask_shape", dict(keep_mask=torch.zeros(2, 3, 36, dtype=torch.bool, device=DEVICE)), "keep_mask", False),
    ("keep_mask_dtype", dict(keep_mask=torch.zeros(2, 3, 37, dtype=torch.uint8, device=DEVICE)), "keep_mask", False),
    ("lengths_over", dict(lengths=_i32([[30, 30, 38], [0, 0, 0]])), r"\[0, C\]", True),
    ("lengths_negative", dict(lengths=_i32([[30, 30, 3], [0, -1, 0]])), r"\[0, C\]", True),
    ("lengths_dtype", dict(lengths=torch.zeros(2, 3, dtype=torch.int64, device=DEVICE)), "lengths", False),
    ("lengths_shape", dict(lengths=_i32([[1, 2]])), "lengths", False),
    ("scores_dtype", dict(scores="half"), "scores", False),
    ("scores_rank", dict(scores="2d"), "scores", False),
    ("positions_dtype", dict(positions=torch.zeros(2, 3, 37, dtype=torch.int64, device=DEVICE)), "positions",
     False),
    ("positions_shape", dict(positions=torch.zeros(2, 3, 38, dtype=torch.int32, device=DEVICE)), "positions",
     False),
]


def _apply(args, change):
    args = dict(args)
    for k, v in change.items():
        if k == "scores" and v == "half":
            v = args["scores"].half()
        elif k == "scores" and v == "2d":
            v = args["scores"][0]
        elif k == "keep_mask" and v == "head12":
            v = torch.zeros(2, 3, 37, dtype=torch.bool, device=DEVICE)
            v[1, 2, :12] = True
        args[k] = v
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,change,words,needs_values", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(backend, name, change, words, needs_values):
    if needs_values and backend == "triton" and DEVICE == "cuda":
        pytest.skip("the Triton backend cannot read values on CUDA (see test_triton_infeasible_head_untouched)")
    args = _apply(_err_args(), change)
    with pytest.raises((RuntimeError, ValueError), match=words):
        run(backend, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_error_texts(backend):
    # The errors the reference raises, the op raises with the same text.
    scores = make_scores(2, 3, 37, "random")
    lengths = torch.full((2, 3), 30, dtype=torch.int32, device=DEVICE)
    cases = [dict(n_sink=12), dict(segment_cuts=_i32([2]), n_sink=2),
             dict(segment_cuts=_i32([10]), segment_min=_i32([9, 0]), n_recent=2)]
    for kw in cases:
        with pytest.raises(ValueError) as ref_err:
            reference.select_keep(scores.cpu(), lengths.cpu(), None, 10, **{k: _cpu(v) for k, v in kw.items()})
        text = str(ref_err.value).split(": ", 1)[1]
        if backend == "triton" and DEVICE == "cuda":
            continue
        with pytest.raises((RuntimeError, ValueError)) as err:
            run(backend, scores, lengths, budget=10, **kw)
        assert text in str(err.value)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
def test_triton_infeasible_head_untouched(monkeypatch):
    # Where values cannot be read (CUDA), an infeasible head keeps all its valid
    # slots and its length; the other heads are selected as usual.
    import kvkern.triton.evict as tev
    monkeypatch.setattr(tev.V, "should_check_values", lambda x: False)
    B, H, C = 2, 3, 37
    scores = make_scores(B, H, C, "ties")
    lengths = torch.tensor([[30, 37, 5], [20, 33, 36]], dtype=torch.int32, device=DEVICE)
    keep_mask = torch.zeros(B, H, C, dtype=torch.bool, device=DEVICE)
    keep_mask[1, 1, :15] = True  # 15 protected > budget 10
    budgets = torch.full((B, H), 10, dtype=torch.int32, device=DEVICE)
    budgets[0, 0] = -3  # negative: infeasible too
    keep, new_lengths = run("triton", scores, lengths, None, 0, budgets, keep_mask=keep_mask)
    valid = valid_mask(lengths, C)
    for b, j in ((1, 1), (0, 0)):
        assert torch.equal(keep[b, j], valid[b, j]) and new_lengths[b, j] == lengths[b, j]
    ok_budgets = budgets.clone()
    ok_budgets[1, 1] = 37
    ok_budgets[0, 0] = 37
    ref_keep, ref_len = reference.select_keep(scores.cpu(), lengths.cpu(), None, ok_budgets.cpu(),
                                              keep_mask=keep_mask.cpu())
    assert torch.equal(keep.cpu(), ref_keep) and torch.equal(new_lengths.cpu(), ref_len)
    # Bad lengths: the head is left alone, its length unchanged.
    bad = torch.tensor([[-4, 37, 5], [20, 99, 36]], dtype=torch.int32, device=DEVICE)
    keep, new_lengths = run("triton", scores, bad, None, 10)
    assert torch.equal(new_lengths[0, 0], bad[0, 0]) and not keep[0, 0].any()
    assert torch.equal(new_lengths[1, 1], bad[1, 1]) and keep[1, 1].all()


@pytest.mark.parametrize("op", [OP, OP + "_triton"])
def test_opcheck(op):
    if op.endswith("_triton") and "triton" not in BACKENDS:
        pytest.skip("no Triton backend here")
    scores = make_scores(2, 3, 37, "ties")
    lengths = make_lengths(2, 3, 37, 12)
    positions = _positions(2, 3, 37)
    budgets = torch.randint(5, 37, (2, 3), dtype=torch.int32, device=DEVICE)
    f = getattr(torch.ops.kvkern, op)
    torch.library.opcheck(f, (scores, lengths, None, None, 12), {"n_sink": 1, "n_recent": 2})
    torch.library.opcheck(f, (scores, lengths, positions, budgets, 0),
                          {"protect_ranges": _i32([[3, 9]]), "segment_cuts": _i32([20]),
                           "segment_min": _i32([2, 1])})


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    scores = make_scores(2, 3, 37, "random")
    lengths = make_lengths(2, 3, 37, 12)

    def step(scores, lengths):
        keep, new_lengths = call(OP, backend, scores * 2, lengths, None, None, 12, n_sink=1)
        return keep.sum(-1) + new_lengths

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(scores, lengths), step(scores, lengths))


# (segment keywords, the message): a segment quota or the minima that the budget cannot meet.
SEGMENT_INFEASIBLE = [
    (dict(segment_cuts=[8], n_recent=2), r"head \[0, 0\]: segment 1 has 2 protected slots but a quota of 1"),
    (dict(segment_cuts=[5], segment_min=[4, 0], n_recent=2),
     r"head \[0, 0\]: protected slots and segment minima need 6 slots, more than the budget 5"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,words", SEGMENT_INFEASIBLE, ids=["quota", "minima"])
def test_front_door_segment_infeasible_is_one_value_error(backend, kw, words):
    # The front door checks the segments before any kernel runs: the same ValueError on every
    # backend, and evict_ leaves the cache as it was.
    be = {"cpp": DEVICE}.get(backend, backend)
    budget = 3 if "segment_min" not in kw else 5
    kw = {k: (_i32(v) if isinstance(v, list) else v) for k, v in kw.items()}
    scores = torch.rand(1, 1, 10, device=DEVICE)
    lengths = _i32([[10]])
    with pytest.raises(ValueError, match=words):
        kvkern.select_keep(scores, lengths, budget, backend=be, **kw)
    k, v = torch.randn(2, 1, 1, 10, 8, device=DEVICE).unbind(0)
    positions = torch.arange(10, dtype=torch.int32, device=DEVICE).view(1, 1, 10)
    before = [t.clone() for t in (k, v, lengths, positions)]
    with pytest.raises(ValueError, match=words):
        kvkern.evict_(k, v, lengths, scores, budget, positions=positions, backend=be, **kw)
    for got, want in zip((k, v, lengths, positions), before):
        assert torch.equal(got, want)
