# SPDX-License-Identifier: Apache-2.0
"""evict_ (select_keep + compact_ in one call): every backend against kvkern.reference.evict_,
attention over the compacted cache against attention with the evicted slots masked, error
paths that must leave the cache untouched, opcheck and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch

from kvkern import reference

from eviction_utils import DEVICE, call, op_backends, valid_mask
from test_compact import _bits, assert_same_prefix, assert_unchanged, make_state, snapshot
from test_select_keep import make_lengths, make_scores
from utils import poison_past_lengths, randn

OP = "evict_"
BACKENDS = op_backends(OP)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _i32(x):
    return torch.tensor(x, dtype=torch.int32, device=DEVICE)


def run(backend, state, scores, budget=0, budgets=None, **kw):
    return call(OP, backend, state["k_cache"], state["v_cache"], state["lengths"], state["positions"], scores,
                budgets, budget, hist=state["hist"], log_w=state["log_w"], **kw)


def _cpu(x):
    return x.cpu() if isinstance(x, torch.Tensor) else x


def check(backend, state, scores, budget=0, budgets=None, **kw):
    expected = {n: _cpu(t).clone() if t is not None else None for n, t in state.items()}
    ref_keep = reference.evict_(expected["k_cache"], expected["v_cache"], expected["lengths"], expected["positions"],
                                scores.cpu(), budget if budgets is None else budgets.cpu(),
                                hist=expected["hist"], log_w=expected["log_w"],
                                **{k: _cpu(v) for k, v in kw.items()})
    keep = run(backend, state, scores, budget, budgets, **kw)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert torch.equal(keep.cpu(), ref_keep), f"{backend}: keep differs from the reference"
    assert torch.equal(state["lengths"].cpu(), expected["lengths"])
    assert_same_prefix(state, expected, expected["lengths"], what=backend)
    return keep


def make_case(B, H, C, D, dtype, kind="ties", budget=20):
    lengths = make_lengths(B, H, C, budget)
    state = make_state(B, H, C, D, dtype, lengths)
    scores = poison_past_lengths(make_scores(B, H, C, kind), lengths)
    return state, scores


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("budget_kind", ["scalar", "tensor"])
@pytest.mark.parametrize("B,H,C", [(2, 3, 37), (1, 8, 131)])
def test_matches_reference(backend, dtype, budget_kind, B, H, C):
    state, scores = make_case(B, H, C, 64, dtype, "ties")
    budgets = None
    if budget_kind == "tensor":
        budgets = torch.randint(3, C + 1, (B, H), dtype=torch.int32, device=DEVICE)
    check(backend, state, scores, 20, budgets, n_sink=1, n_recent=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["quota", "minima"])
def test_protection_and_segments(backend, mode):
    B, H, C = 2, 3, 131
    state, scores = make_case(B, H, C, 32, torch.bfloat16, "random", budget=50)
    keep_mask = torch.zeros(B, H, C, dtype=torch.bool, device=DEVICE)
    keep_mask[..., 70:73] = True
    kw = dict(n_sink=2, n_recent=4, protect_ranges=_i32([[[20, 23]], [[0, 4]]]), keep_mask=keep_mask,
              segment_cuts=_i32([40, 150]))
    if mode == "minima":
        kw["segment_min"] = _i32([5, 20, 3])
    check(backend, state, scores, 50, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_equivalence(backend, dtype):
    # Attention over the compacted cache equals attention over the full cache with
    # the evicted slots masked by a -inf logit bias (log_w moves along, so any bias
    # it held counts on both sides).
    B, Hkv, G, C, D = 2, 3, 4, 131, 64
    state, scores = make_case(B, Hkv, C, D, dtype, "random", budget=40)
    full = {n: t.clone() for n, t in state.items()}
    q = randn(B, G * Hkv, D, dtype=dtype, device=DEVICE)
    budgets = torch.randint(0, 80, (B, Hkv), dtype=torch.int32, device=DEVICE)
    keep = run(backend, state, scores, 0, budgets, n_recent=0)
    bias = torch.where(keep, full["log_w"], torch.full_like(full["log_w"], -math.inf))
    out_full, lse_full = reference.decode_attention(q, full["k_cache"], full["v_cache"], full["lengths"], bias)
    out, lse = reference.decode_attention(q, state["k_cache"], state["v_cache"], state["lengths"], state["log_w"])
    assert torch.allclose(out, out_full, atol=1e-12, rtol=1e-10)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_full))
    assert torch.allclose(lse[~torch.isinf(lse)], lse_full[~torch.isinf(lse_full)], atol=1e-12, rtol=1e-10)
    # Spec oracles: exact budgets, kept order (positions) strictly increasing.
    assert torch.equal(state["lengths"], torch.minimum(full["lengths"], budgets))
    pos = state["positions"]
    ordered = (pos[..., 1:] > pos[..., :-1]) | ~valid_mask(state["lengths"], C)[..., 1:]
    assert ordered.all()


def _case():
    B, H, C = 2, 3, 37
    lengths = torch.full((B, H), 30, dtype=torch.int32)
    state = make_state(B, H, C, 64, torch.float16, lengths)
    slots = torch.arange(C, dtype=torch.int32, device=DEVICE).repeat(B, H, 1)
    state["positions"] = poison_past_lengths(slots, state["lengths"], -7)  # positions = slots: known quotas
    return state, make_scores(B, H, C, "random")


def _head12_mask():
    m = torch.zeros(2, 3, 37, dtype=torch.bool, device=DEVICE)
    m[1, 2, :12] = True
    return m


# (id, kwargs for run, words of the error, needs values: not raised on CUDA by Triton)
ERRORS = [
    ("protected_last_head", lambda: dict(keep_mask=_head12_mask()),
     r"head \[1, 2\]: 12 protected slots exceed the budget 10", True),
    ("segment_quota", lambda: dict(segment_cuts=_i32([3]), n_sink=3),
     r"head \[0, 0\]: segment 0 has 3 protected slots but a quota of 1", True),
    ("segment_minima", lambda: dict(segment_cuts=_i32([10]), segment_min=_i32([8, 0]), n_recent=5),
     r"head \[0, 0\]: protected slots and segment minima need 13 slots, more than the budget 10", True),
    ("budgets_negative", lambda: dict(budgets=_i32([[10, 10, 10], [10, -1, 10]])), "budgets", True),
    ("budgets_shape", lambda: dict(budgets=_i32([10, 10])), "budgets", False),
    ("budget_negative", lambda: dict(budget=-3), "budget", False),
    ("n_sink_negative", lambda: dict(n_sink=-1), "n_sink", False),
    ("ranges_reversed", lambda: dict(protect_ranges=_i32([[5, 2]])), "start <= end", True),
    ("ranges_shape", lambda: dict(protect_ranges=_i32([[[5, 6]]] * 3)), "protect_ranges", False),
    ("cuts_not_increasing", lambda: dict(segment_cuts=_i32([9, 4])), "increasing", True),
    ("keep_mask_shape", lambda: dict(keep_mask=torch.zeros(2, 3, 30, dtype=torch.bool, device=DEVICE)),
     "keep_mask", False),
    ("scores_shape", lambda: dict(scores=torch.zeros(2, 3, 36, device=DEVICE)), "scores", False),
    ("scores_dtype", lambda: dict(scores=torch.zeros(2, 3, 37, dtype=torch.float64, device=DEVICE)), "scores",
     False),
    ("lengths_over", lambda: dict(lengths=_i32([[30, 30, 30], [30, 40, 30]])), r"\[0, C\]", True),
    ("hist_dtype", lambda: dict(hist="half"), "hist", False),
    ("positions_shape", lambda: dict(positions="short"), "positions", False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,words,needs_values", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_leave_cache_unchanged(backend, name, make, words, needs_values):
    if needs_values and backend == "triton" and DEVICE == "cuda":
        pytest.skip("the Triton backend cannot read values on CUDA (see test_triton_infeasible_head_untouched)")
    state, scores = _case()
    kw = {"budget": 10, **make()}
    scores = kw.pop("scores", scores)
    if "lengths" in kw:
        state["lengths"] = kw.pop("lengths")
    if kw.get("hist") == "half":
        state["hist"] = state["hist"].half()
        kw.pop("hist")
    if kw.get("positions") == "short":
        state["positions"] = state["positions"][..., :36]
        kw.pop("positions")
    before = snapshot(state)
    with pytest.raises((RuntimeError, ValueError), match=words):
        run(backend, state, scores, **kw)
    assert_unchanged(state, before)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
def test_triton_infeasible_head_untouched(monkeypatch):
    # Where values cannot be read (CUDA), an infeasible head is left as it was;
    # the other heads are evicted as usual.
    import kvkern.triton.evict as tev
    monkeypatch.setattr(tev.V, "should_check_values", lambda x: False)
    state, scores = _case()
    before = snapshot(state)
    keep_mask = _head12_mask()
    keep = run("triton", state, scores, 10, keep_mask=keep_mask)
    assert torch.equal(keep[1, 2], valid_mask(before["lengths"], 37)[1, 2])
    assert state["lengths"][1, 2] == 30
    for name in ("k_cache", "v_cache", "positions", "hist", "log_w"):
        assert torch.equal(_bits(state[name][1, 2]), _bits(before[name][1, 2])), name
    # Every other head: as the reference with head [1, 2]'s protection lifted.
    expected = {n: t.cpu().clone() for n, t in before.items()}
    lifted = keep_mask.clone()
    lifted[1, 2] = False
    ref_keep = reference.evict_(expected["k_cache"], expected["v_cache"], expected["lengths"],
                                expected["positions"], scores.cpu(), 10, keep_mask=lifted.cpu(),
                                hist=expected["hist"], log_w=expected["log_w"])
    others = torch.ones(2, 3, dtype=torch.bool)
    others[1, 2] = False
    assert torch.equal(keep.cpu()[others], ref_keep[others])
    assert torch.equal(state["lengths"].cpu()[others], expected["lengths"][others])
    pick = {n: t.cpu()[others].unsqueeze(0) for n, t in state.items()}
    want = {n: t[others].unsqueeze(0) for n, t in expected.items()}
    assert_same_prefix(pick, want, want["lengths"])


@pytest.mark.parametrize("op", [OP, "evict_triton_"])
def test_opcheck(op):
    if op.endswith("_triton_") and "triton" not in BACKENDS:
        pytest.skip("no Triton backend here")
    state, scores = make_case(2, 3, 37, 64, torch.float32, "ties", budget=12)
    for name in ("k_cache", "v_cache", "hist", "log_w"):  # opcheck compares outputs: no NaN
        state[name] = torch.nan_to_num(state[name])
    scores = torch.nan_to_num(scores)
    f = getattr(torch.ops.kvkern, op)
    torch.library.opcheck(f, (state["k_cache"], state["v_cache"], state["lengths"], state["positions"], scores,
                              None, 12), {"n_sink": 1, "hist": state["hist"], "log_w": state["log_w"]})
    budgets = torch.randint(4, 37, (2, 3), dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(f, (state["k_cache"], state["v_cache"], state["lengths"], None, scores, budgets, 0),
                          # n_recent=1: the last segment's quota is never below 1 when it has slots, so
                          # every random budget is feasible (2 could exceed a 1-slot quota).
                          {"segment_cuts": _i32([15]), "n_recent": 1})


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    state, scores = make_case(2, 3, 37, 64, torch.float16, "random", budget=12)
    for name in ("k_cache", "v_cache", "hist", "log_w"):
        state[name] = torch.nan_to_num(state[name])
    scores = torch.nan_to_num(scores)

    def step(k, v, lengths, positions, scores, hist):
        keep = call(OP, backend, k, v, lengths, positions, scores * 2, None, 12, n_sink=1, hist=hist)
        return keep.sum(-1) + lengths

    eager = {n: t.clone() for n, t in state.items() if n != "log_w"}
    compiled_state = {n: t.clone() for n, t in state.items() if n != "log_w"}
    args = ("k_cache", "v_cache", "lengths", "positions")
    want = step(*(eager[n] for n in args), scores, eager["hist"])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(*(compiled_state[n] for n in args), scores, compiled_state["hist"])
    assert torch.equal(got, want)
    for n in eager:
        assert torch.equal(_bits(compiled_state[n]), _bits(eager[n])), n
