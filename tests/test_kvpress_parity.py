# SPDX-License-Identifier: Apache-2.0
"""Parity of kvkern.policies with NVIDIA KVPress's presses on the same random inputs.

Skipped unless ``kvpress`` is importable (it pulls transformers, so it lives in its own venv;
see README: ``/work/venv-kvpress``). The presses are driven directly, without a model: a tiny
``LlamaAttention`` whose ``q_proj`` is the identity, so the "hidden states" KVPress projects are
exactly our pre-RoPE queries, with the model's rotary embedding attached as KVPress does.

Compared: scores (KVPress's fp32 against ours, up to tolerance, on the slots KVPress scores)
and kept sets (exact; continuous random inputs, so no ties) for KnormPress, SnapKVPress,
TOVAPress, StreamingLLMPress, ExpectedAttentionPress, KeyDiffPress, ObservedAttentionPress
(our H2O at prefill); PyramidKVPress's per-layer budgets; AdaKVPress's kept counts per head
(and which slots, from its ``masked_key_indices``).
"""

from __future__ import annotations

import math

import pytest
import torch

kvpress = pytest.importorskip("kvpress")

from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding, rotate_half  # noqa: E402

import kvkern  # noqa: E402
from kvkern import policies as P  # noqa: E402
from policy_utils import select_backend  # noqa: E402

B, HQ, HKV, D, T = 2, 6, 2, 32, 160
SCORE_TOL = dict(atol=1e-6, rtol=2e-4)


@pytest.fixture(params=["reference", "kernels"])
def backend(request, monkeypatch):
    return select_backend(request.param, monkeypatch)


class Setup:
    """A tiny attention module and one random prompt: pre-RoPE queries, post-RoPE keys, values."""

    def __init__(self, num_layers=1, layer_idx=0, theta=10000.0):
        cfg = LlamaConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                          num_hidden_layers=num_layers, rope_theta=theta, intermediate_size=64, vocab_size=16)
        cfg._attn_implementation = "sdpa"  # AdaKVPress refuses eager
        self.module = LlamaAttention(cfg, layer_idx).eval()
        with torch.no_grad():
            self.module.q_proj.weight.copy_(torch.eye(HQ * D))
        self.module.rotary_emb = LlamaRotaryEmbedding(cfg)
        self.inv_freq = self.module.rotary_emb.inv_freq.double()
        self.q_pre = torch.randn(B, HQ, T, D) + 0.3  # a mean so Expected Attention's mu matters
        self.hidden = self.q_pre.transpose(1, 2).reshape(B, T, HQ * D)
        pos = torch.arange(T).unsqueeze(0)
        self.cos, self.sin = self.module.rotary_emb(self.hidden, pos)
        self.q = self.q_pre * self.cos.unsqueeze(1) + rotate_half(self.q_pre) * self.sin.unsqueeze(1)
        self.k = torch.randn(B, HKV, T, D)
        self.v = torch.randn(B, HKV, T, D) * torch.rand(B, HKV, T, 1)
        self.kwargs = {"position_embeddings": (self.cos, self.sin)}

    def press_score(self, press, attentions=None):
        with torch.no_grad():
            return press.score(self.module, self.hidden, self.k, self.v, attentions, self.kwargs)

    def press_kept(self, press, attentions=None):
        """Per (b, j): the set of slots KVPress keeps, recovered from the keys it returns."""
        with torch.no_grad():
            kk, _ = press.compress(self.module, self.hidden, self.k, self.v, attentions, self.kwargs)
        out = []
        for b in range(B):
            row = []
            for j in range(HKV):
                match = (kk[b, j].unsqueeze(1) == self.k[b, j].unsqueeze(0)).all(-1)  # [n_kept, T]
                assert bool((match.sum(1) == 1).all())
                row.append(set(match.nonzero()[:, 1].tolist()))
            out.append(row)
        return out

    def cache(self):
        return P.LayerCache.from_prefill(self.k.clone(), self.v.clone())


def kept(cache):
    return [[set(cache.positions[b, j, :int(cache.lengths[b, j])].tolist()) for j in range(HKV)] for b in range(B)]


def assert_same_sets(ours, theirs, what):
    for b in range(B):
        for j in range(HKV):
            a, t = ours[b][j], theirs[b][j]
            assert a == t, f"{what}: head [{b}, {j}]: kvkern-only {sorted(a - t)}, kvpress-only {sorted(t - a)}"


def close(ours, theirs, what):
    ours, theirs = ours.double(), theirs.double()
    diff = (ours - theirs).abs()
    bad = diff > SCORE_TOL["atol"] + SCORE_TOL["rtol"] * theirs.abs()
    assert not bool(bad.any()), f"{what}: {int(bad.sum())} scores differ, max |diff| {float(diff.max()):.3e}"
    rel = float((diff / theirs.abs().clamp_min(1e-30)).max())
    print(f"\n{what}: max |diff| {float(diff.max()):.2e}, max relative {rel:.2e}")
    return rel


RATIOS = [0.3, 0.75]


@pytest.mark.parametrize("ratio", RATIOS)
def test_knorm_keydiff_streaming(backend, ratio):
    s = Setup()
    for press, pol, kind in ((kvpress.KnormPress(ratio), P.KNorm(ratio=ratio), "key_norm"),
                             (kvpress.KeyDiffPress(ratio), P.KeyDiff(ratio=ratio), "keydiff"),
                             (kvpress.StreamingLLMPress(ratio), P.StreamingLLM(ratio=ratio), "recency")):
        c = s.cache()
        if kind != "recency":
            ours = kvkern.eviction_ops.slot_scores(c.k, c.lengths, kind)
            close(ours, s.press_score(press), type(press).__name__)
        pol.compress(c)
        assert_same_sets(kept(c), s.press_kept(press), type(press).__name__)


# kvkern keeps the whole window (budget >= 64 or ValueError); KVPress would keep part of it.
@pytest.mark.parametrize("ratio", [0.3, 0.55])
def test_snapkv(backend, ratio):
    s = Setup()
    press = kvpress.SnapKVPress(ratio)  # window 64, kernel 5
    c = s.cache()
    ours = kvkern.eviction_ops.window_scores(s.q[:, :, -64:], c.k, c.lengths, pool="avg", pool_kernel=5)
    close(ours[..., : T - 64], s.press_score(press)[..., : T - 64], "SnapKVPress scores")
    P.SnapKV(ratio=ratio).compress(c, q_win=s.q)
    assert_same_sets(kept(c), s.press_kept(press), "SnapKVPress")


@pytest.mark.parametrize("ratio", RATIOS)
def test_tova(backend, ratio):
    s = Setup()
    press = kvpress.TOVAPress(ratio)
    c = s.cache()
    ours = kvkern.eviction_ops.window_scores(s.q[:, :, -1:], c.k, c.lengths, group_reduce="mean_all")
    close(ours[..., : T - 1], s.press_score(press)[..., : T - 1], "TOVAPress scores")
    P.TOVA(ratio=ratio).compress(c, q_win=s.q)
    assert_same_sets(kept(c), s.press_kept(press), "TOVAPress")


@pytest.mark.parametrize("ratio", RATIOS)
def test_expected_attention(backend, ratio):
    s = Setup()
    press = kvpress.ExpectedAttentionPress(ratio)  # 512 future positions, 4 sinks, cov, vnorm, eps 0
    c = s.cache()
    pol = P.ExpectedAttention(ratio=ratio, inv_freq=s.inv_freq)
    mean, cov = pol.statistics(s.q_pre, T)  # KVPress's future positions start at the prompt length
    ours = kvkern.eviction_ops.expected_attention_scores(mean, cov, c.k, c.lengths, v_cache=c.v, n_sink=4)
    close(ours[..., 4:], s.press_score(press)[..., 4:], "ExpectedAttentionPress scores")
    pol.compress(c, q_prerope=s.q_pre)
    assert_same_sets(kept(c), s.press_kept(press), "ExpectedAttentionPress")


@pytest.mark.parametrize("ratio", RATIOS)
def test_observed_attention_is_h2o_at_prefill(backend, ratio):
    s = Setup()
    G = HQ // HKV
    logits = torch.einsum("bhtd,bhnd->bhtn", s.q, s.k.repeat_interleave(G, 1)) / math.sqrt(D)
    attn = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
    press = kvpress.ObservedAttentionPress(ratio)
    c = s.cache()
    pol = P.H2O(ratio=ratio)
    pol.observe(c, s.q)
    close(pol.scores(c)[..., :T], s.press_score(press, attn), "ObservedAttentionPress scores")
    c = s.cache()
    P.H2O(ratio=ratio).compress(c, q=s.q)
    assert_same_sets(kept(c), s.press_kept(press, attn), "ObservedAttentionPress")


def test_pyramidkv_budgets_and_kept_sets(backend):
    L = 8
    for n in (150, 160, 4096):
        for ratio in (0.1, 0.3, 0.5, 0.7, 0.9):
            press = kvpress.PyramidKVPress(ratio, window_size=16)
            theirs = []
            for layer in range(L):
                m = Setup.__new__(Setup)
                cfg = LlamaConfig(num_hidden_layers=L, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                                  intermediate_size=64, vocab_size=16)
                m.module = LlamaAttention(cfg, layer)
                theirs.append(press.get_layer_budget(m.module, n))
            assert P.pyramid_budgets(n, ratio, 16, L, 20) == theirs, (n, ratio)
    s = Setup(num_layers=L, layer_idx=2)
    press = kvpress.PyramidKVPress(0.4, window_size=16)
    c = s.cache()
    P.PyramidKV(ratio=0.4, layer_idx=2, num_layers=L, window=16).compress(c, q_win=s.q)
    assert_same_sets(kept(c), s.press_kept(press), "PyramidKVPress")


@pytest.mark.parametrize("inner", ["knorm", "snapkv", "expected_attention"])
@pytest.mark.parametrize("ratio", RATIOS)
def test_adakv_kept_counts_per_head(backend, inner, ratio):
    s = Setup()
    s.k[:, 1] *= 2.5  # heads with different score spreads, so budgets move between heads
    press_inner, pol_inner, obs = {
        "knorm": (kvpress.KnormPress(ratio), P.KNorm(ratio=ratio), {}),
        "snapkv": (kvpress.SnapKVPress(ratio, window_size=16), P.SnapKV(ratio=ratio, window=16), {"q_win": s.q}),
        "expected_attention": (kvpress.ExpectedAttentionPress(ratio), P.ExpectedAttention(ratio=ratio,
                               inv_freq=s.inv_freq), {"q_prerope": s.q_pre}),
    }[inner]
    press = kvpress.AdaKVPress(press_inner)
    with torch.no_grad():
        press.compress(s.module, s.hidden, s.k, s.v, None, s.kwargs)
    bi, hi, si = s.module.masked_key_indices
    masked = torch.zeros(B, HKV, T, dtype=torch.bool)
    masked[bi, hi, si] = True
    c = s.cache()
    P.AdaKV(pol_inner).compress(c, **obs)
    theirs_counts = (T - masked.sum(-1)).to(torch.int32)
    assert torch.equal(c.lengths, theirs_counts), f"kept per head: kvkern {c.lengths.tolist()}, " \
                                                  f"kvpress {theirs_counts.tolist()}"
    theirs = [[set((~masked[b, j]).nonzero().flatten().tolist()) for j in range(HKV)] for b in range(B)]
    assert_same_sets(kept(c), theirs, f"AdaKVPress({inner})")
