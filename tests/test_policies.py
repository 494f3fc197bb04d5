# SPDX-License-Identifier: Apache-2.0
"""kvkern.policies against the spec's oracles (specs/eviction-and-scoring.md §2-§7).

Every policy test runs twice: on the fp64 reference ops (``backend == "reference"``, the front
doors monkeypatched by tests/policy_utils.py) and on the kernels (skipped while the ops have no
kernel here). Expected kept sets come from dense re-computations written here, independent of
kvkern.reference, on continuous random inputs (no ties).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kvkern
import kvkern.reference as R
from kvkern import policies as P
from policy_utils import inv_freq, select_backend
from utils import TOLERANCES, assert_verbose_allclose, poison_past_lengths

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["reference", "kernels"])
def backend(request, monkeypatch):
    return select_backend(request.param, monkeypatch)


@pytest.fixture(autouse=True)
def _on_device():
    # Every tensor a test makes lives where the kernels run.
    with torch.device(DEV):
        yield


# --------------------------------------------------------------------------- helpers

def prefill(B=2, Hkv=2, G=2, T=80, D=16, C=None, dtype=torch.float32, with_hist=False):
    """A cache holding a T-token prompt, and the prompt's post-RoPE queries [B, Hq, T, D]."""
    k = torch.randn(B, Hkv, T, D, device=DEV).to(dtype)
    v = torch.randn(B, Hkv, T, D, device=DEV).to(dtype)
    q = torch.randn(B, Hkv * G, T, D, device=DEV).to(dtype)
    cache = P.LayerCache.from_prefill(k, v, capacity=C, with_hist=with_hist)
    return cache, q


def kept_positions(cache):
    """Per (b, j): the sorted list of kept positions."""
    B, H = cache.lengths.shape
    return [[cache.positions[b, j, :int(cache.lengths[b, j])].tolist() for j in range(H)] for b in range(B)]


def topk_sets(scores, n):
    """Per (b, j): the set of the n highest-scored slots of a dense [B, H, N] score."""
    idx = scores.topk(n, dim=-1).indices
    return [[set(idx[b, j].tolist()) for j in range(scores.shape[1])] for b in range(scores.shape[0])]


def assert_kept(cache, expected_sets):
    got = kept_positions(cache)
    for b, row in enumerate(expected_sets):
        for j, exp in enumerate(row):
            assert got[b][j] == sorted(exp), f"head [{b}, {j}]: kept {got[b][j]}, expected {sorted(exp)}"


def dense_window_attention(q_win, k):
    """[B, Hq, W, N] fp64 softmax rows of the last W queries over N keys, causal in the window."""
    B, Hq, W, D = q_win.shape
    N = k.shape[2]
    G = Hq // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    logits = torch.einsum("bhtd,bhnd->bhtn", q_win.double(), kk) / math.sqrt(D)
    mask = torch.ones(W, N, dtype=torch.bool, device=k.device).triu(N - W + 1)
    return logits.masked_fill(mask, -math.inf).softmax(-1)


def assert_order_increasing(cache):
    for b in range(cache.lengths.shape[0]):
        for j in range(cache.lengths.shape[1]):
            p = cache.positions[b, j, :int(cache.lengths[b, j])]
            assert bool((p[1:] > p[:-1]).all()), f"head [{b}, {j}]: positions not strictly increasing: {p.tolist()}"


# --------------------------------------------------------------------------- cache

def test_layer_cache_append_and_overflow():
    c = P.LayerCache.empty(2, 3, 10, 8, torch.float16, DEV)
    k = torch.randn(2, 3, 4, 8, device=DEV)
    c.append_(k, -k)
    assert c.lengths.tolist() == [[4] * 3] * 2 and c.next_position == 4
    assert torch.equal(c.k[:, :, :4], k.half()) and torch.equal(c.v[:, :, :4], -k.half())
    c.lengths[1, 2] = 2  # ragged heads: each appends at its own length
    k2 = torch.randn(2, 3, 3, 8, device=DEV)
    c.append_(k2, k2, positions_new=torch.tensor([[10, 11, 12], [20, 21, 22]], device=DEV))
    assert torch.equal(c.k[1, 2, 2:5], k2[1, 2].half()) and c.positions[1, 2, 2:5].tolist() == [20, 21, 22]
    assert c.lengths[1, 2] == 5 and c.next_position == 23
    with pytest.raises(ValueError, match=r"head \[0, 0\].*overflow"):
        c.append_(torch.randn(2, 3, 4, 8, device=DEV), torch.randn(2, 3, 4, 8, device=DEV))
    assert c.lengths[0, 0] == 7  # nothing written


def test_query_window_keeps_last():
    w = P.QueryWindow(5)
    q = torch.randn(1, 2, 8, 4)
    w.push(q[:, :, :3])
    assert len(w) == 3
    w.push(q[:, :, 3:])
    assert torch.equal(w.get(), q[:, :, 3:])
    w.push(q[:, :, :1])
    assert torch.equal(w.get(), torch.cat([q[:, :, 4:], q[:, :, :1]], 2))


def test_budget_or_ratio_exactly_one():
    with pytest.raises(ValueError, match="exactly one"):
        P.KNorm()
    with pytest.raises(ValueError, match="exactly one"):
        P.KNorm(budget=3, ratio=0.5)
    with pytest.raises(ValueError, match="ratio"):
        P.KNorm(ratio=1.0)
    assert P.KNorm(ratio=0.7).n_kept(1000) == int(1000 * (1 - 0.7)) == 300
    assert P.KNorm(ratio=0.99).n_kept(50) == 1  # KVPress's floor of 1
    assert P.KNorm(budget=17).n_kept(1000) == 17


# --------------------------------------------------------------------------- query-free scorers

def test_streaming_llm_kept_set_exact(backend):
    cache, _ = prefill(T=61)
    P.StreamingLLM(ratio=0.6).compress(cache)
    n = int(61 * 0.4)
    exp = set(range(4)) | set(range(61 - (n - 4), 61))
    assert_kept(cache, [[exp] * 2] * 2)


def test_knorm_keydiff_kept_sets(backend):
    cache, _ = prefill(T=53, D=8)
    k = cache.k[:, :, :53].clone()
    c1 = cache.clone()
    P.KNorm(budget=20).compress(c1)
    assert_kept(c1, topk_sets(-k.double().norm(dim=-1), 20))
    c2 = cache.clone()
    P.KeyDiff(ratio=0.5).compress(c2)
    kn = F.normalize(k.double(), dim=-1)
    anchor = kn.mean(2, keepdim=True)
    assert_kept(c2, topk_sets(-F.cosine_similarity(k.double(), anchor, dim=-1), int(53 * 0.5)))


def test_random_is_seeded_and_exact(backend):
    cache, _ = prefill(T=40)
    a, b = cache.clone(), cache.clone()
    P.RandomEviction(budget=10, seed=7).compress(a)
    P.RandomEviction(budget=10, seed=7).compress(b)
    assert kept_positions(a) == kept_positions(b)
    assert a.lengths.eq(10).all()


# --------------------------------------------------------------------------- window scorers

@pytest.mark.parametrize("G", [1, 3])
def test_snapkv_matches_dense_and_keeps_window(backend, G):
    W, T = 8, 70
    cache, q = prefill(Hkv=2, G=G, T=T)
    k = cache.k[:, :, :T].clone()
    pol = P.SnapKV(budget=30, window=W)
    pol.compress(cache, q_win=q)
    a = dense_window_attention(q[:, :, -W:], k)[..., : T - W].mean(2)  # [B, Hq, T-W]
    a = F.avg_pool1d(a, kernel_size=5, padding=2, stride=1)
    s = a.view(2, 2, G, T - W).mean(2)
    s = F.pad(s, (0, W), value=math.inf)
    assert_kept(cache, topk_sets(s, 30))
    assert cache.lengths.eq(30).all()
    for row in kept_positions(cache):
        for kept in row:
            assert set(range(T - W, T)) <= set(kept)


def test_snapkv_budget_below_window_raises(backend):
    cache, q = prefill(T=40)
    with pytest.raises(ValueError, match="smaller than"):
        P.SnapKV(budget=5, window=8).compress(cache, q_win=q)


def test_tova_same_kept_set_across_heads(backend):
    T = 50
    cache, q = prefill(B=2, Hkv=3, G=2, T=T)
    k = cache.k[:, :, :T].clone()
    P.TOVA(budget=12).compress(cache, q_win=q)
    got = kept_positions(cache)
    for row in got:
        assert all(r == row[0] for r in row), f"kept sets differ across heads: {row}"
    a = dense_window_attention(q[:, :, -1:], k)[:, :, 0, : T - 1].mean(1)  # [B, T-1], all heads
    s = F.pad(a, (0, 1), value=math.inf).unsqueeze(1).expand(2, 3, T)
    assert_kept(cache, topk_sets(s, 12))


def test_h2o_prefill_equals_observed_attention(backend):
    T, G = 40, 2
    cache, q = prefill(B=1, Hkv=2, G=G, T=T)
    k = cache.k[:, :, :T].clone()
    P.H2O(budget=15).compress(cache, q=q)
    A = dense_window_attention(q, k)  # full causal attention [B, Hq, T, T]
    s = A.sum(2) / torch.arange(T, 0, -1, dtype=torch.float64)
    s = s.view(1, 2, G, T).mean(2)
    assert_kept(cache, topk_sets(s, 15))
    assert cache.hist_lengths.eq(15).all()


def test_h2o_decode_accumulation(backend):
    # Without eviction the history is the column sums of every query's attention so far.
    T0, steps, G = 20, 6, 2
    cache, q = prefill(B=1, Hkv=2, G=G, T=T0, C=T0 + steps, with_hist=True)
    pol = P.H2O(budget=100, every=2)
    pol.compress(cache, q=q)
    ks, qs = [cache.k[:, :, :T0].clone()], [q]
    for t in range(1, steps + 1):
        kn, vn, qn = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2 * G, 1, 16)
        cache.append_(kn, vn)
        pol.step(cache, t, q=qn)
        ks.append(kn)
        qs.append(qn)
    k_all, q_all = torch.cat(ks, 2), torch.cat(qs, 2)
    N = T0 + steps
    colsum = dense_window_attention(q_all, k_all).sum(2).view(1, 2, G, N).mean(2)
    assert_verbose_allclose(cache.hist[:, :, :N], colsum, 1e-5, 1e-5, what="H2O accumulated attention")
    # With eviction: the cache stays within budget + every - 1 and survivors keep their sums.
    pol2 = P.H2O(budget=10, every=3)
    c2, q2 = prefill(B=1, Hkv=2, G=G, T=T0, C=T0 + 10)
    pol2.compress(c2, q=q2)
    for t in range(1, 10):
        c2.append_(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
        pol2.step(c2, t, q=torch.randn(1, 2 * G, 1, 16))
        assert 10 <= int(c2.lengths.min()) and int(c2.lengths.max()) <= 10 + 3 - 1
        assert torch.equal(c2.hist_lengths, c2.lengths)


def _ea_dense(q_pre, k, v, start, invf, n_sink=4, n_future=512):
    """KVPress ExpectedAttentionPress.score, restated in fp64 with an absolute start position."""
    B, Hq, T, D = q_pre.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    qq = q_pre[:, :, n_sink:].double()
    mu = qq.mean(2)
    c = qq - mu.unsqueeze(2)
    cov = torch.einsum("bhti,bhtj->bhij", c, c) / qq.shape[2]
    pos = torch.arange(start, start + n_future, dtype=torch.float64)
    ang = pos[:, None] * invf[None]
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([ang.sin(), ang.sin()], -1)
    Pm = torch.zeros(D, D, dtype=torch.float64)
    Pm[D // 2:, : D // 2] = torch.eye(D // 2)
    Pm[: D // 2, D // 2:] = -torch.eye(D // 2)
    Rm = (cos[:, :, None] * torch.eye(D, dtype=torch.float64) + sin[:, :, None] * Pm).mean(0)
    mu, cov = mu @ Rm.T, Rm @ cov @ Rm.T
    kk = k[:, :, n_sink:].double().repeat_interleave(G, 1)
    z = torch.einsum("bhd,bhnd->bhn", mu, kk) / math.sqrt(D) + torch.einsum("bhnd,bhde,bhne->bhn", kk, cov, kk) / D / 2
    s = z.softmax(-1).view(B, Hkv, G, -1).mean(2) * v[:, :, n_sink:].double().norm(dim=-1)
    return F.pad(s, (n_sink, 0), value=math.inf)


def test_expected_attention_matches_dense_with_absolute_start(backend):
    T, D = 48, 16
    cache, _ = prefill(B=1, Hkv=2, G=2, T=T, D=D)
    k, v = cache.k[:, :, :T].clone(), cache.v[:, :, :T].clone()
    invf = inv_freq(D)
    q_pre = torch.randn(1, 4, 30, D) + 0.5  # a decoding buffer of 30 pre-RoPE queries
    start = 1000  # absolute position of the next token (KVPress would use 30)
    c = cache.clone()
    P.ExpectedAttention(budget=20, inv_freq=invf).compress(c, q_prerope=q_pre, start_position=start)
    assert_kept(c, topk_sets(_ea_dense(q_pre, k, v, start, invf), 20))
    assert all(set(range(4)) <= set(kept) for row in kept_positions(c) for kept in row)
    # The default start is the absolute next position of the cache.
    c2 = cache.clone()
    c2.next_position = start
    P.ExpectedAttention(budget=20, inv_freq=invf).compress(c2, q_prerope=q_pre)
    assert kept_positions(c2) == kept_positions(c)


# --------------------------------------------------------------------------- budgets

def test_pyramid_budgets_worked_numbers():
    b = P.pyramid_budgets(4096, 0.5, 64, 32, 20)
    assert b[0] == 3994 and b[-1] == 102 and sum(b) == 65536
    assert all(x >= y for x, y in zip(b, b[1:]))
    assert P.pyramid_budgets(4096, 0.8, 64, 32, 20) == [819] * 32
    for r in (0.1, 0.3, 0.6):
        b = P.pyramid_budgets(4096, r, 64, 32)
        assert all(x >= y for x, y in zip(b, b[1:]))
        assert abs(sum(b) - 32 * 4096 * (1 - r)) <= 32
    assert P.pyramid_budgets(4096, 0.2, 64, 32)[0] == 4096 - 64  # max clipped at n - W
    assert P.pyramid_budgets(1000, None, 64, 8, budget=500) == P.pyramid_budgets(1000, 0.5, 64, 8)


def test_pyramidkv_policy_uses_layer_budget(backend):
    T, W = 120, 8
    budgets = P.pyramid_budgets(T, 0.5, W, 4, 20)
    assert budgets[0] > budgets[-1]
    for layer in (0, 3):
        cache, q = prefill(B=1, T=T)
        P.PyramidKV(ratio=0.5, layer_idx=layer, num_layers=4, window=W).compress(cache, q_win=q)
        assert cache.lengths.eq(budgets[layer]).all()
        assert all(set(range(T - W, T)) <= set(kept) for row in kept_positions(cache) for kept in row)


@pytest.mark.parametrize("inner", ["knorm", "snapkv"])
def test_adakv_floors_sum_and_real_eviction(backend, inner):
    T, Hkv, n_kept = 64, 4, 24
    cache, q = prefill(B=2, Hkv=Hkv, G=2, T=T)
    # Make heads differ in how peaked their scores are, so budgets move between heads.
    cache.k[:, 1] *= 3.0
    scorer = P.KNorm(budget=n_kept) if inner == "knorm" else P.SnapKV(budget=n_kept, window=4)
    pol = P.AdaKV(scorer, safeguard=0.25)
    s = scorer.scores(cache, q_win=q)
    budgets = pol.head_budgets(cache, s)
    keep = pol.compress(cache, q_win=q)
    assert torch.equal(cache.lengths, budgets)  # really evicted, per head
    assert budgets.sum(1).tolist() == [Hkv * n_kept] * 2
    assert int(budgets.min()) >= int(n_kept * 0.25)
    assert keep.sum(-1).tolist() == budgets.tolist()
    if inner == "snapkv":
        assert all(set(range(T - 4, T)) <= set(kept) for row in kept_positions(cache) for kept in row)
    # The safeguard: each head keeps its own best floor(n_kept * safeguard) slots.
    n_safe = int(n_kept * 0.25)
    for b in range(2):
        for j in range(Hkv):
            ss = s[b, j, :T].clone()
            if inner == "snapkv":
                ss[T - 4:] = math.inf
            best = set(ss.topk(n_safe).indices.tolist())
            assert best <= set(kept_positions(cache)[b][j])
    assert_order_increasing(cache)


def test_surfacelogic_budgets():
    L, H, budget = 4, 3, 100
    prof = torch.zeros(L, H, 3)
    prof[..., 2] = 1.0
    prof[1, 0] = torch.tensor([0.3, 0.2, 0.5])
    prof[2, 2] = torch.tensor([0.0, 0.4, 0.6])
    b = P.surfacelogic_budgets(prof, budget, layer_floor=0.5, head_floor=0.5)
    assert int(b.sum()) == budget * L * H
    # Layers with no surface/logic behaviour get exactly the layer floor, heads with score 0
    # in a layer with some behaviour exactly the head floor.
    lf = int(0.5 * budget * H)
    assert b[0].sum() == lf and b[3].sum() == lf
    t1 = int(b[1].sum())
    assert b[1, 1] == b[1, 2] == int(0.5 * t1 / H)
    uniform = torch.zeros(L, H, 3)
    uniform[..., 1] = 0.2
    assert torch.equal(P.surfacelogic_budgets(uniform, budget), torch.full((L, H), budget, dtype=torch.int32))
    top = torch.zeros(5, L, H, dtype=torch.bool)
    top[:3, 1, 0] = True
    cp = torch.zeros_like(top)
    cp[:1, 1, 0] = True
    prof2 = P.head_behaviour_profile(top, cp)
    assert torch.allclose(prof2[1, 0], torch.tensor([0.2, 0.4, 0.4]))


def test_surfacelogic_policy_per_head_budgets(backend):
    cache, q = prefill(B=2, Hkv=3, T=60)
    P.SurfaceLogicKV([30, 12, 20], window=8).compress(cache, q_win=q)
    assert cache.lengths.tolist() == [[30, 12, 20]] * 2
    assert all(set(range(52, 60)) <= set(kept) for row in kept_positions(cache) for kept in row)


# --------------------------------------------------------------------------- G-KV

def test_gkv_closed_form_over_rounds(backend):
    """Spec §2(e)4: with mix_lambda = 1, after k rounds the stored score of every surviving
    candidate is max_j alpha^(k-j) * s_hat_j over the rounds j where it was scored."""
    B, Hkv, G, D, W, budget, period, alpha = 1, 2, 2, 16, 4, 20, 6, 0.8
    pol = P.GKV(budget=budget, window=W, divide_length=period, alpha=alpha, mix_lambda=1.0)
    cache, q = prefill(B=B, Hkv=Hkv, G=G, T=30, D=D, C=40)
    win = P.QueryWindow(W)
    win.push(q)
    records = [[{} for _ in range(Hkv)] for _ in range(B)]  # position -> [(round, s_hat)]
    for rnd in range(5):
        if rnd:
            kn, vn, qn = (torch.randn(B, Hkv, period, D), torch.randn(B, Hkv, period, D),
                          torch.randn(B, Hkv * G, period, D))
            cache.append_(kn, vn)
            win.push(qn)
        s_hat = pol.scores(cache, q_win=win.get())
        for b in range(B):
            for j in range(Hkv):
                L = int(cache.lengths[b, j])
                cand = s_hat[b, j, : L - W]
                assert abs(float(cand.max()) - 1.0) < 1e-6  # normalisation: max == 1
                for i in range(L - W):
                    records[b][j].setdefault(int(cache.positions[b, j, i]), []).append((rnd, float(cand[i])))
        window_before = cache.k[:, :, int(cache.lengths[0, 0]) - W: int(cache.lengths[0, 0])].clone()
        pol.compress(cache, q_win=win.get())
        assert cache.lengths.eq(budget).all()
        assert torch.equal(cache.k[:, :, budget - W: budget], window_before)  # window bit-identical
        assert_order_increasing(cache)
        assert cache.hist_lengths.eq(budget - W).all()
        for b in range(B):
            for j in range(Hkv):
                for i in range(budget - W):
                    rec = records[b][j][int(cache.positions[b, j, i])]
                    exp = max(alpha ** (rnd - r) * s for r, s in rec)
                    assert abs(float(cache.hist[b, j, i]) - exp) < 1e-5, (rnd, b, j, i, rec)


def test_gkv_decode_loop_oscillates(backend):
    B, Hkv, G, D, W, budget, period = 1, 2, 2, 16, 4, 24, 8
    pol = P.GKV(budget=budget, window=W, divide_length=period)
    assert pol.mix_lambda == 0.5 and pol.alpha == 0.8 and pol.group_reduce == "max_per_query"
    cache, q = prefill(B=B, Hkv=Hkv, G=G, T=40, D=D, C=40)
    win = P.QueryWindow(W)
    win.push(q)
    assert pol.step(cache, 0, q_win=win.get()) is not None  # prompt longer than the budget
    assert cache.lengths.eq(budget).all()
    for t in range(1, 3 * period + 3):
        cache.append_(torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D))
        win.push(torch.randn(B, Hkv * G, 1, D))
        pol.step(cache, t, q_win=win.get())
        L = int(cache.lengths.max())
        assert budget <= int(cache.lengths.min()) and L <= budget + period - 1
        if t % period == 0:
            assert L == budget
        assert_order_increasing(cache)


def test_gkv_local_score_order_and_normalize_default(backend):
    # Spec §2(b): s_loc = mean_t max_{h in group} a (step 1), divided by its per-head max only
    # with the score cache (step 2): normalize defaults to use_history.
    B, Hkv, G, D, W = 1, 2, 4, 16, 4
    cache, q = prefill(B=B, Hkv=Hkv, G=G, T=30, D=D, C=40)
    q_win = q[:, :, -W:]
    k, lengths = cache.k.cpu(), cache.lengths.cpu()
    assert P.GKV(budget=20, window=W).normalize is True
    assert P.GKV(budget=20, window=W, use_history=False).normalize is False
    assert P.GKV(budget=20, window=W, use_history=False, normalize=True).normalize is True
    for use_history in (True, False):
        got = P.GKV(budget=20, window=W, use_history=use_history).scores(cache, q_win=q_win).cpu()
        want = R.window_scores(q_win.cpu().to(k.dtype), k, lengths, None, "mean", "max_per_query", use_history)
        assert_verbose_allclose(got, want, 1e-5, 1e-4, what=f"use_history={use_history}")
        other = R.window_scores(q_win.cpu().to(k.dtype), k, lengths, None, "mean", "max", use_history)
        assert (other - want).abs().max() > 1e-4  # max_h mean_t is another score


def test_gkv_rejects_budget_within_window():
    with pytest.raises(ValueError, match="window"):
        P.GKV(budget=16, window=16)


# --------------------------------------------------------------------------- Pitfalls

def _policy(name, budget, invf):
    return {
        "streaming": lambda **kw: P.StreamingLLM(budget=budget, **kw),
        "knorm": lambda **kw: P.KNorm(budget=budget, **kw),
        "keydiff": lambda **kw: P.KeyDiff(budget=budget, **kw),
        "snapkv": lambda **kw: P.SnapKV(budget=budget, window=4, **kw),
        "tova": lambda **kw: P.TOVA(budget=budget, **kw),
        "ea": lambda **kw: P.ExpectedAttention(budget=budget, inv_freq=invf, **kw),
        "h2o": lambda **kw: P.H2O(budget=budget, **kw),
    }[name]


def _obs(name, q):
    return {"snapkv": dict(q_win=q), "tova": dict(q_win=q), "ea": dict(q_prerope=q), "h2o": dict(q=q)}.get(name, {})


@pytest.mark.parametrize("name", ["streaming", "knorm", "keydiff", "snapkv", "tova", "ea", "h2o"])
def test_pitfalls_whitelist_and_quotas_with_any_scorer(backend, name):
    T, budget = 48, 20
    cache, q = prefill(B=1, Hkv=2, T=T)
    make = _policy(name, budget, inv_freq(16))
    # Whitelist: positions [10, 17) are kept in every head.
    c1 = cache.clone()
    make(protect_ranges=[[10, 17]]).compress(c1, **_obs(name, q))
    assert all(set(range(10, 17)) <= set(k) for row in kept_positions(c1) for k in row)
    assert c1.lengths.eq(budget).all()
    # Fair eviction: spans [0, 30) and [30, 48) keep floor(20 * 30 / 48) = 12 and 8.
    c2 = cache.clone()
    make(segment_cuts=P.segment_cuts_from_spans([0, 30])).compress(c2, **_obs(name, q))
    for row in kept_positions(c2):
        for kept in row:
            assert sum(p < 30 for p in kept) == 12 and sum(p >= 30 for p in kept) == 8, kept
    # One span only: identical to the standard policy.
    c3, c4 = cache.clone(), cache.clone()
    make(segment_cuts=[100]).compress(c3, **_obs(name, q))
    make().compress(c4, **_obs(name, q))
    assert kept_positions(c3) == kept_positions(c4)


def test_pitfalls_whitelist_over_budget_raises(backend):
    cache, _ = prefill(B=1, T=30)
    with pytest.raises((ValueError, RuntimeError), match="exceed"):
        P.KNorm(budget=5, protect_ranges=[[0, 10]]).compress(cache)


# --------------------------------------------------------------------------- InfiniPot-V

def _video(B=1, Hkv=2, S=3, Pf=6, frames=8, D=16, static=False):
    ks = torch.randn(B, Hkv, S, D)
    kf = torch.randn(B, Hkv, 1 if static else frames, Pf, D).expand(B, Hkv, frames, Pf, D).reshape(B, Hkv, -1, D)
    vf = torch.randn(B, Hkv, frames * Pf, D) * torch.rand(B, Hkv, frames * Pf, 1) * 3
    return ks, torch.randn(B, Hkv, S, D), kf.contiguous(), vf


def _vision_cache(pot, S, Pf, frames, static=False, Hkv=2):
    ks, vs, kf, vf = _video(Hkv=Hkv, S=S, Pf=Pf, frames=frames, static=static)
    cache = P.LayerCache.empty(1, Hkv, S + frames * Pf, 16, device=DEV)
    cache.append_(ks, vs)
    cache.append_(kf, vf)
    return cache


def test_infinipot_tar_scores_brute_force(backend):
    S, Pf, frames = 3, 5, 8
    pot = P.InfiniPotV(Pf, S, block_frames=8, target_frames=4)
    cache = _vision_cache(pot, S, Pf, frames)
    tar, query = pot.tar_scores(cache)
    fq = int(0.25 * frames)
    kv = cache.k[:, :, S:].view(1, 2, frames, Pf, 16)
    for j in range(2):
        for f in range(frames):
            for p in range(Pf):
                exp = -sum(F.cosine_similarity(kv[0, j, f, p], kv[0, j, g, p], dim=0)
                           for g in range(frames - fq, frames)) / fq
                assert abs(float(tar[0, j, S + f * Pf + p]) - float(exp)) < 1e-5
    assert query[0, 0, S:].view(frames, Pf)[frames - fq:].all() and not query[0, 0, : S + (frames - fq) * Pf].any()


def test_infinipot_oracles(backend):
    S, Pf, frames, tf = 3, 6, 8, 4
    pot = P.InfiniPotV(Pf, S, block_frames=8, target_frames=tf, tar_ratio=0.5, query_ratio=0.25)
    cache = _vision_cache(pot, S, Pf, frames)
    orig = cache.clone()
    C = tf * Pf
    c_tar = C - round(0.5 * C)
    tar_keep = pot.tar_select(cache, tf)
    keep = pot.compress(cache, tf)
    # 1. vision length C per head; system rows bit-identical.
    assert cache.lengths.eq(S + C).all()
    assert torch.equal(cache.k[:, :, :S], orig.k[:, :, :S]) and torch.equal(cache.v[:, :, :S], orig.v[:, :, :S])
    # 2. all query-frame tokens kept; C_tar TaR tokens, all kept.
    fq = int(0.25 * frames)
    q_pos = set(range(S + (frames - fq) * Pf, S + frames * Pf))
    assert int(tar_keep[..., S:].sum(-1).min()) == int(tar_keep[..., S:].sum(-1).max()) == c_tar
    assert bool((keep | ~tar_keep).all())
    for row in kept_positions(cache):
        for kept in row:
            assert q_pos <= set(kept) and set(range(S)) <= set(kept)
    assert_order_increasing(cache)
    # 3a. tar_ratio = 0: pure VaN, per-head top-C by ||v||.
    c0 = orig.clone()
    P.InfiniPotV(Pf, S, block_frames=8, target_frames=tf, tar_ratio=0.0).compress(c0, tf)
    vn = orig.v[:, :, S: S + frames * Pf].double().norm(dim=-1)
    exp = [[{S + i for i in s} | set(range(S)) for s in row] for row in topk_sets(vn, C)]
    assert_kept(c0, exp)
    # 3b. tar_ratio = 1 with L_q <= C: TaR only.
    c1 = orig.clone()
    pot1 = P.InfiniPotV(Pf, S, block_frames=8, target_frames=tf, tar_ratio=1.0)
    t1 = pot1.tar_select(c1, tf)
    pot1.compress(c1, tf)
    for b, row in enumerate(kept_positions(c1)):
        for j, kept in enumerate(row):
            assert kept == t1[b, j].nonzero().flatten().tolist()


def test_infinipot_static_video_and_monotone_tar(backend):
    S, Pf, frames, tf = 2, 4, 8, 3
    pot = P.InfiniPotV(Pf, S, block_frames=8, target_frames=tf)
    cache = _vision_cache(pot, S, Pf, frames, static=True)
    tar, _ = pot.tar_scores(cache)
    assert torch.allclose(tar[..., S:], torch.full_like(tar[..., S:], -1.0), atol=1e-5)
    pot.compress(cache, tf)
    assert cache.lengths.eq(S + tf * Pf).all()
    for row in kept_positions(cache):
        for kept in row:
            assert len(set(kept)) == len(kept) == S + tf * Pf
    # 5. making one old frame differ more from the recent frames never lowers its TaR rank.
    c = _vision_cache(pot, S, Pf, frames)
    t0, _ = pot.tar_scores(c)
    c.k[:, :, S + Pf: S + 2 * Pf] = torch.randn(1, 2, Pf, 16) * 0.01 - c.k[:, :, S + (frames - 1) * Pf: S + frames * Pf]
    t1, _ = pot.tar_scores(c)
    assert bool((t1[..., S + Pf: S + 2 * Pf] >= t0[..., S + Pf: S + 2 * Pf] - 1e-6).all())


def test_infinipot_streaming_memory_cap(backend):
    S, Pf, total = 3, 4, 30
    pot = P.InfiniPotV(Pf, S, block_frames=8, target_frames=6)
    assert sum(n for n, _ in pot.schedule(total)) == total
    ks, vs, kf, vf = _video(S=S, Pf=Pf, frames=total)
    cache = P.LayerCache.empty(1, 2, pot.cap, 16, device=DEV)
    cache.append_(ks, vs)
    sizes = []
    pot.stream(cache, kf, vf, on_block=lambda c: sizes.append(int(c.lengths.max())))
    assert max(sizes) <= pot.cap and sizes[-1] == pot.cap  # the last block fills the cap exactly
    assert int(cache.positions[0, 0, int(cache.lengths[0, 0]) - 1]) == S + total * Pf - 1


# --------------------------------------------------------------------------- attention equivalence

@pytest.mark.parametrize("name", ["knorm", "snapkv", "ea", "adakv", "gkv", "tova"])
def test_attention_over_compacted_cache_equals_masked_full(backend, name):
    """decode_attention over the compacted cache == attention over the full cache with the
    evicted slots masked (spec §9): covers gather, order and per-head lengths."""
    B, Hkv, G, T, D = 2, 2, 3, 50, 64
    cache, q = prefill(B=B, Hkv=Hkv, G=G, T=T, D=D, C=T + 5)
    poison_past_lengths(cache.k, cache.lengths)
    poison_past_lengths(cache.v, cache.lengths)
    full = cache.clone()
    pol = {
        "knorm": P.KNorm(ratio=0.6),
        "snapkv": P.SnapKV(ratio=0.6, window=8),
        "ea": P.ExpectedAttention(ratio=0.6, inv_freq=inv_freq(D)),
        "adakv": P.AdaKV(P.SnapKV(ratio=0.6, window=8)),
        "gkv": P.GKV(budget=20, window=8),
        "tova": P.TOVA(ratio=0.6),
    }[name]
    keep = pol.compress(cache, q_win=q, q_prerope=q)
    assert keep is not None and not bool(keep[..., T:].any())
    qd = torch.randn(B, Hkv * G, D)
    out = kvkern.decode_attention(qd, cache.k, cache.v, cache.lengths)
    log_w = torch.where(keep, 0.0, -math.inf)
    ref, _ = R.decode_attention(qd, full.k, full.v, full.lengths, log_w)
    assert_verbose_allclose(out, ref, *TOLERANCES[torch.float32], what=f"{name}: attention over compacted cache")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_caches_and_ragged_lengths(backend, dtype):
    cache, q = prefill(B=2, Hkv=2, T=40, C=45, dtype=dtype)
    cache.lengths = torch.tensor([[40, 31], [12, 0]], dtype=torch.int32)
    poison_past_lengths(cache.k, cache.lengths)
    poison_past_lengths(cache.v, cache.lengths)
    P.KNorm(budget=16).compress(cache)
    assert cache.lengths.tolist() == [[16, 16], [12, 0]]
    assert not torch.isnan(cache.k[0, 0, :16].float()).any()


def test_policies_compile_fullgraph(backend):
    """A policy's compress traces into one graph (no host sync, no data-dependent shape)."""
    if backend == "reference":
        pytest.skip("the reference ops loop in Python; compile covers the kernels")
    cache, q = prefill(B=1, Hkv=2, T=40, C=48)
    expected = cache.clone()
    P.SnapKV(budget=20, window=8).compress(expected, q_win=q)

    def run(k, v, lengths, positions, q_win):
        c = P.LayerCache(k, v, lengths, positions, next_position=40)
        P.SnapKV(budget=20, window=8).compress(c, q_win=q_win)
        return c.lengths

    torch._dynamo.reset()
    c = cache.clone()
    torch.compile(run, fullgraph=True)(c.k, c.v, c.lengths, c.positions, q)
    assert kept_positions(c) == kept_positions(expected)


def test_compiled_append_after_eviction_keeps_absolute_positions():
    """LayerCache.append_ traced by torch.compile: after an eviction the cache holds fewer slots
    than tokens seen, and the next tokens' positions must still continue from next_position."""
    k, v = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)

    def step(c, k_new, v_new):
        c.append_(k_new, v_new)
        return c.lengths

    torch._dynamo.reset()
    caches = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        c = P.LayerCache.from_prefill(k, v, capacity=24)
        P.KNorm(budget=5).compress(c)
        for _ in range(3):
            fn(c, torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
        caches.append(c)
    eager, compiled = caches
    assert kept_positions(compiled) == kept_positions(eager)
    assert compiled.next_position == eager.next_position == 23 and kept_positions(eager)[0][0][-3:] == [20, 21, 22]


def test_adakv_snapkv_decode_loop_ragged_heads(backend):
    """Periodic head-wise eviction while decoding: heads drift apart in length, every head
    keeps its newest window, and each compression leaves the layer sum_j min(n_kept, L_j) slots."""
    B, Hkv, G, D, W, n_kept, every = 1, 3, 2, 16, 4, 16, 5
    cache, q = prefill(B=B, Hkv=Hkv, G=G, T=30, D=D, C=40)
    cache.k[:, 0] *= 3.0
    win = P.QueryWindow(W)
    win.push(q)
    pol = P.AdaKV(P.SnapKV(budget=n_kept, window=W, every=every))
    pol.step(cache, 0, q_win=win.get())
    assert int(cache.lengths.sum()) == Hkv * n_kept
    for t in range(1, 4 * every + 1):
        cache.append_(torch.randn(B, Hkv, 1, D), torch.randn(B, Hkv, 1, D))
        win.push(torch.randn(B, Hkv * G, 1, D))
        total = int(cache.lengths.clamp(max=n_kept).sum())
        keep = pol.step(cache, t, q_win=win.get())
        if t % every == 0:
            assert keep is not None and int(cache.lengths.sum()) == total
            newest = cache.n_seen
            for row in kept_positions(cache):
                for kept in row:
                    assert set(range(newest - W, newest)) <= set(kept)
        assert_order_increasing(cache)
    assert len(set(cache.lengths.flatten().tolist())) > 1  # heads really differ
