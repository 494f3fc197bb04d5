# SPDX-License-Identifier: Apache-2.0
"""compact_: every backend against kvkern.reference.compact_, bit for bit on the valid
prefix of every head, in all three cache dtypes, with NaN-poisoned tails."""

from __future__ import annotations

import pytest
import torch

from kvkern import reference

from eviction_utils import DEVICE, call, make_cache, make_lengths, op_backends, valid_mask
from utils import INTERPRET, poison_past_lengths, randn

OP = "compact_"
BACKENDS = op_backends(OP)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAMES = ("k_cache", "v_cache", "lengths", "positions", "hist", "log_w")


def make_state(B, H, C, D, dtype, lengths=None, side=True):
    """Cache and side arrays with every slot past ``lengths`` poisoned (NaN, or -7 for positions)."""
    k, v, lengths, _ = make_cache(B, H, C, D, dtype, lengths)
    state = dict(k_cache=k, v_cache=v, lengths=lengths, positions=None, hist=None, log_w=None)
    if side:
        gaps = torch.randint(1, 4, (B, H, C), dtype=torch.int32)
        state["positions"] = poison_past_lengths((torch.cumsum(gaps, -1) - 1).to(torch.int32).to(DEVICE),
                                                 lengths, -7)
        state["hist"] = poison_past_lengths(randn(B, H, C, device=DEVICE), lengths)
        state["log_w"] = poison_past_lengths(randn(B, H, C, device=DEVICE), lengths)
    return state


def random_keep(B, H, C):
    """Keep masks of mixed density per head (none, sparse, dense, all), set past the lengths too."""
    density = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])[torch.randint(0, 5, (B, H, 1))]
    return (torch.rand(B, H, C) < density).to(DEVICE)


def _bits(t):
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]) if t.is_floating_point() else t


def snapshot(state):
    return {n: (t.clone() if t is not None else None) for n, t in state.items()}


def assert_same_prefix(state, expected, lengths, what=""):
    """Every tensor equal, bit for bit, on each head's first ``lengths`` slots."""
    C = state["k_cache"].shape[2]
    valid = valid_mask(lengths, C).cpu()
    for name in NAMES:
        got, want = state[name], expected[name]
        if got is None or name == "lengths":
            continue
        g, w = _bits(got.cpu()), _bits(want.cpu())
        assert torch.equal(g[valid], w[valid]), f"{what}: {name} differs on the valid prefix"


def assert_unchanged(state, before):
    for name in NAMES:
        if state[name] is not None:
            assert torch.equal(_bits(state[name]), _bits(before[name])), f"{name} was modified"


def run(backend, state, keep):
    call(OP, backend, state["k_cache"], state["v_cache"], state["lengths"], keep, state["positions"],
         state["hist"], state["log_w"])


def check(backend, state, keep):
    expected = {n: (t.cpu().clone() if t is not None else None) for n, t in state.items()}
    reference.compact_(expected["k_cache"], expected["v_cache"], expected["lengths"], keep.cpu(),
                       expected["positions"], expected["hist"], expected["log_w"])
    run(backend, state, keep)
    assert torch.equal(state["lengths"].cpu(), expected["lengths"])
    assert_same_prefix(state, expected, expected["lengths"], what=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,C,D", [(2, 3, 37, 64), (2, 1, 131, 24), (2, 8, 37, 128)])
def test_matches_reference(backend, dtype, B, H, C, D):
    lengths = make_lengths(B, H, C)
    lengths.view(-1)[:2] = torch.tensor([0, C], dtype=torch.int32)
    state = make_state(B, H, C, D, dtype, lengths)
    check(backend, state, random_keep(B, H, C))


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_side_arrays(backend):
    state = make_state(2, 3, 37, 64, torch.bfloat16, side=False)
    check(backend, state, random_keep(2, 3, 37))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["alternate", "random", "tail"])
def test_long_heads_many_moves(backend, pattern):
    # Long heads where almost every kept slot moves, many tiles down: an in-place
    # compaction that read a slot after overwriting it would show here.
    C = 1000 if INTERPRET else 20000
    B, H, D = 1, 2, 64
    state = make_state(B, H, C, D, torch.float16, lengths=torch.tensor([[C, C - 3]], dtype=torch.int32))
    slots = torch.arange(C)
    if pattern == "alternate":
        keep = (slots % 2 == 1).view(1, 1, C).repeat(B, H, 1)
    elif pattern == "random":
        keep = torch.rand(B, H, C) < 0.5
    else:  # drop one early slot: everything after it moves by one
        keep = (slots != 3).view(1, 1, C).repeat(B, H, 1)
    check(backend, state, keep.to(DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided(backend):
    B, H, C, D = 2, 3, 37, 64
    k, v, lengths, _ = make_cache(B, H, C, D, torch.float16)
    big_k = torch.full((B, H, C, 2 * D), float("nan"), dtype=torch.float16, device=DEVICE)
    big_k[..., :D] = k
    big_v = torch.full((H, B, C + 4, D), float("nan"), dtype=torch.float16, device=DEVICE)
    big_v.transpose(0, 1)[:, :, :C] = v
    big_hist = randn(B, 2 * H, C, device=DEVICE)
    lengths_t = lengths.t().contiguous().t()
    state = dict(k_cache=big_k[..., :D], v_cache=big_v.transpose(0, 1)[:, :, :C], lengths=lengths_t, positions=None,
                 hist=big_hist[:, ::2], log_w=None)
    keep_big = (torch.rand(B, H, C + 9) < 0.5).to(DEVICE)
    check(backend, state, keep_big[:, :, 5:5 + C])
    assert torch.isnan(big_k[..., D:]).all(), "wrote outside the view"


def _bad_state():
    state = make_state(2, 3, 37, 64, torch.float32)
    return state, random_keep(2, 3, 37)


def _i32(x):
    return torch.tensor(x, dtype=torch.int32, device=DEVICE)


ERRORS = [
    ("keep_shape", lambda s, k: (s, k[:, :, :36]), "keep", False),
    ("keep_dtype", lambda s, k: (s, k.to(torch.uint8)), "keep", False),
    ("keep_rank", lambda s, k: (s, k[0]), "keep", False),
    ("lengths_over", lambda s, k: ({**s, "lengths": _i32([[1, 2, 38], [0, 0, 0]])}, k), r"\[0, C\]", True),
    ("lengths_negative", lambda s, k: ({**s, "lengths": _i32([[1, 2, 3], [0, -1, 0]])}, k), r"\[0, C\]", True),
    ("lengths_dtype", lambda s, k: ({**s, "lengths": s["lengths"].long()}, k), "lengths", False),
    ("lengths_shape", lambda s, k: ({**s, "lengths": s["lengths"][:1]}, k), "lengths", False),
    ("v_dtype", lambda s, k: ({**s, "v_cache": s["v_cache"].half()}, k), "v_cache", False),
    ("k_dtype", lambda s, k: ({**s, "k_cache": s["k_cache"].double(), "v_cache": s["v_cache"].double()}, k),
     "k_cache", False),
    ("v_shape", lambda s, k: ({**s, "v_cache": s["v_cache"][..., :32]}, k), "v_cache", False),
    ("k_rank", lambda s, k: ({**s, "k_cache": s["k_cache"][0]}, k), "k_cache", False),
    ("k_last_dim_strided", lambda s, k: ({**s, "k_cache": s["k_cache"].repeat_interleave(2, -1)[..., ::2]}, k),
     "contiguous", False),
    ("positions_dtype", lambda s, k: ({**s, "positions": s["positions"].long()}, k), "positions", False),
    ("hist_dtype", lambda s, k: ({**s, "hist": s["hist"].half()}, k), "hist", False),
    ("log_w_shape", lambda s, k: ({**s, "log_w": s["log_w"][:, :, :30]}, k), "log_w", False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,words,needs_values", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_leave_cache_unchanged(backend, name, make, words, needs_values):
    if needs_values and backend == "triton" and DEVICE == "cuda":
        pytest.skip("the Triton backend cannot read values on CUDA")
    state, keep = make(*_bad_state())
    before = snapshot(state)
    with pytest.raises((RuntimeError, ValueError), match=words):
        run(backend, state, keep)
    assert_unchanged(state, before)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
def test_triton_bad_length_head_untouched(monkeypatch):
    import kvkern.triton.evict as tev
    monkeypatch.setattr(tev.V, "should_check_values", lambda x: False)
    state, keep = _bad_state()
    state["lengths"][1, 1] = 99
    expected = {n: t.cpu().clone() for n, t in state.items()}
    reference.compact_(expected["k_cache"][:1], expected["v_cache"][:1], expected["lengths"][:1], keep[:1].cpu(),
                       expected["positions"][:1], expected["hist"][:1], expected["log_w"][:1])
    before = snapshot(state)
    run("triton", state, keep)
    assert torch.equal(state["lengths"][0].cpu(), expected["lengths"][0]) and state["lengths"][1, 1] == 99
    assert torch.equal(_bits(state["k_cache"][1, 1]), _bits(before["k_cache"][1, 1]))
    assert_same_prefix({n: t[:1] for n, t in state.items()}, {n: t[:1] for n, t in expected.items()},
                       expected["lengths"][:1])


@pytest.mark.parametrize("op", [OP, "compact_triton_"])
@pytest.mark.parametrize("side", [True, False])
def test_opcheck(op, side):
    if op.endswith("_triton_") and "triton" not in BACKENDS:
        pytest.skip("no Triton backend here")
    state = make_state(2, 3, 37, 64, torch.float16, side=side)
    for name in ("k_cache", "v_cache", "hist", "log_w"):  # opcheck compares outputs: no NaN
        if state[name] is not None:
            state[name] = torch.nan_to_num(state[name])
    keep = random_keep(2, 3, 37)
    torch.library.opcheck(getattr(torch.ops.kvkern, op),
                          (state["k_cache"], state["v_cache"], state["lengths"], keep, state["positions"],
                           state["hist"], state["log_w"]))
