# SPDX-License-Identifier: Apache-2.0
"""The quality harness: run a model with the full cache and with each compression method.

For every prompt the full-cache reference runs first, on transformers' ``DynamicCache`` with the
same model object: greedy decoding gives the reference tokens and, at each step, the reference
next-token logits. Each method then

1. builds its cache with ``hf.make_cache`` and prefills the prompt (compression happens here),
2. decodes greedily on its own (needle found? decode tokens/s),
3. is teacher-forced over the reference tokens (per-token KL and top-1 agreement against the
   reference logits at the same positions). When its greedy tokens equal the reference tokens the
   greedy logits ARE the teacher-forced ones and step 3 is skipped.

Real-text windows run step 3 only, over the real continuation (KL, agreement, perplexity change).

Decoding is an explicit loop of one-token forwards (the same loop for the reference and every
method): what ``model.generate(do_sample=False)`` does, with the decode steps timed alone.
The model and tokenizer are injected, so tests use a tiny random Llama and a byte tokenizer.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import metrics as M
from .prompts import NeedlePrompt, TextWindow, decode

REFERENCE = "dynamic"  # the row name of transformers' DynamicCache reference
QUANTIZED = ("kivi4", "kivi2", "tada4")  # methods that keep every token (no budget)
KEEP_ALL = ("full",) + QUANTIZED


# -----------------------------------------------------------------------------------------------
# The cache factory: kvkern.integrations.hf when present, else DynamicCache alone
# -----------------------------------------------------------------------------------------------

def _dynamic_nbytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


class Backend:
    """What the harness needs from ``kvkern.integrations.hf`` (its public API), wrapped so a
    missing or partial module degrades to the DynamicCache reference alone."""

    # True: decoding passes explicit position_ids (for caches that count kept slots, not tokens seen).
    explicit_positions = False

    def __init__(self, hf=None):
        self.hf = hf
        self.methods = dict(getattr(hf, "METHODS", {})) if hf is not None else {}

    @classmethod
    def default(cls) -> "Backend":
        try:
            from kvkern.integrations import hf  # noqa: PLC0415
        except ImportError:
            return cls(None)
        return cls(hf if hasattr(hf, "make_cache") else None)

    def reference_cache(self, model):
        from transformers import DynamicCache

        return DynamicCache(config=model.config)

    def make_cache(self, model, method: str, *, keep_fraction: float, max_new_tokens: int, window: int,
                   interval: int, **kw):
        if self.hf is None or method not in self.methods:
            have = ", ".join(self.methods) or "none: kvkern.integrations.hf is not available"
            raise ValueError(f"kvkern.eval: unknown method {method!r}; methods available: {have}")
        if method in KEEP_ALL:
            return self.hf.make_cache(model, method, max_new_tokens=max_new_tokens, **kw)
        return self.hf.make_cache(model, method, ratio=1.0 - keep_fraction, interval=interval,
                                  max_new_tokens=max_new_tokens, window=window, **kw)

    def nbytes(self, cache) -> int:
        if self.hf is not None and hasattr(self.hf, "cache_nbytes"):
            try:
                return int(self.hf.cache_nbytes(cache))
            except TypeError:
                pass
        return _dynamic_nbytes(cache)

    def compression_seconds(self, cache) -> float:
        if self.hf is None or not hasattr(self.hf, "compression_seconds"):
            return 0.0
        try:
            return float(self.hf.compression_seconds(cache))
        except TypeError:  # a DynamicCache compresses nothing
            return 0.0

    def enable(self, model):
        # The kvkern attention function falls back to SDPA for non-kvkern caches, so enabling once
        # up front makes the reference and the methods run the same attention code path.
        if self.hf is not None and hasattr(self.hf, "enable"):
            self.hf.enable(model)
        return model


# -----------------------------------------------------------------------------------------------
# Decoding loops
# -----------------------------------------------------------------------------------------------

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache) -> tuple[torch.Tensor, float]:
    """Runs the prompt ``[1, T]`` through ``model`` into ``cache`` (mutated). Returns the last
    position's logits ``[V]`` fp32 and the wall time in seconds."""
    dev = input_ids.device
    _sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True)
    _sync(dev)
    return out.logits[0, -1].float(), time.perf_counter() - t0


@torch.no_grad()
def decode_steps(model, cache, first_logits: torch.Tensor, n: int, *, targets: Sequence[int] | None = None,
                 eos_token_id: int | None = None, start_position: int | None = None
                 ) -> tuple[list[int], torch.Tensor, float]:
    """Greedy (``targets=None``) or teacher-forced decoding after a prefill.

    ``first_logits`` ``[V]``: the prefill's last logits (they predict token 0). Step i feeds token
    i-1 (the argmax, or ``targets[i-1]``) and records the logits predicting token i. Returns the
    tokens (``n``, or fewer when greedy hits ``eos_token_id``), their logits ``[n, V]`` fp32 (cpu) and
    the wall time of the ``n - 1`` one-token forwards. ``cache`` is mutated.

    ``start_position``: the prompt length, to pass explicit ``position_ids`` (``start_position + i - 1``
    at step i) for caches whose ``get_seq_length()`` counts kept slots rather than tokens seen (a
    ``DynamicCache`` pruned by KVPress). None: transformers derives them from the cache (kvkern's
    caches report tokens seen).
    """
    dev = first_logits.device
    logits = [first_logits.float().cpu()]
    tokens = [int(first_logits.argmax()) if targets is None else int(targets[0])]
    _sync(dev)
    t0 = time.perf_counter()
    for i in range(1, n):
        if targets is None and eos_token_id is not None and tokens[-1] == eos_token_id:
            break
        ids = torch.tensor([[tokens[-1]]], dtype=torch.long, device=dev)
        kw = {} if start_position is None else \
            {"position_ids": torch.tensor([[start_position + i - 1]], dtype=torch.long, device=dev)}
        step = model(input_ids=ids, past_key_values=cache, use_cache=True, **kw).logits[0, -1].float()
        logits.append(step.cpu())
        tokens.append(int(step.argmax()) if targets is None else int(targets[i]))
    _sync(dev)
    return tokens, torch.stack(logits), time.perf_counter() - t0


# -----------------------------------------------------------------------------------------------
# Runs
# -----------------------------------------------------------------------------------------------

@dataclass
class Reference:
    """The full-cache (DynamicCache) run of one prompt."""

    tokens: list[int]
    logits: torch.Tensor  # [n, V] fp32
    answer: str
    hit: bool | None
    kv_bytes: int
    prefill_s: float
    decode_s: float


@dataclass
class Harness:
    """Runs prompts through ``model`` with the reference cache and with each method's cache.

    ``keep_fraction``: fraction of the prompt's tokens kept (KVPress's ``compression_ratio`` is
    ``1 - keep_fraction``). ``interval``: recompress every ``interval`` decoded tokens (0: prefill only).
    ``seed``: ``torch.manual_seed`` before every cache is built and run (the random baseline).
    """

    model: object
    tokenizer: object
    backend: Backend = field(default_factory=Backend.default)
    device: str | torch.device = "cpu"
    seed: int = 0
    window: int = 32
    interval: int = 0
    cache_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.backend.enable(self.model)

    def _decode(self, cache, first, n, prompt_len: int, **kw):
        pos = prompt_len if getattr(self.backend, "explicit_positions", False) else None
        return decode_steps(self.model, cache, first, n, start_position=pos, **kw)

    def warmup(self, methods: Sequence[str], input_ids: torch.Tensor) -> None:
        """A short untimed run of the reference and each method, so first-call costs (kernel
        loading, allocator growth, lazy imports) stay out of the timed decode steps. Half the
        tokens are kept: enough for any method's sinks and observation window."""
        keep_fraction = 0.5
        ids = input_ids[:, :max(64, 2 * self.window + 32)].to(self.device)
        for m in [REFERENCE] + [m for m in methods if m != REFERENCE]:
            cache = self.backend.reference_cache(self.model) if m == REFERENCE else self._new_cache(m, keep_fraction, 4)
            first, _ = prefill(self.model, ids, cache)
            self._decode(cache, first, 4, ids.shape[-1])

    # -- reference ---------------------------------------------------------------------------
    def reference(self, input_ids: torch.Tensor, n: int, *, key: str | None = None,
                  targets: Sequence[int] | None = None) -> Reference:
        """The DynamicCache run: greedy for ``n`` tokens (or teacher-forced over ``targets``)."""
        torch.manual_seed(self.seed)
        cache = self.backend.reference_cache(self.model)
        ids = input_ids.to(self.device)
        first, pre_s = prefill(self.model, ids, cache)
        toks, logits, dec_s = self._decode(cache, first, n, ids.shape[-1], targets=targets)
        answer = decode(self.tokenizer, toks)
        return Reference(tokens=toks, logits=logits, answer=answer,
                         hit=None if key is None else M.needle_hit(answer, key),
                         kv_bytes=self.backend.nbytes(cache), prefill_s=pre_s, decode_s=dec_s)

    def _new_cache(self, method: str, keep_fraction: float, max_new_tokens: int):
        torch.manual_seed(self.seed)
        return self.backend.make_cache(self.model, method, keep_fraction=keep_fraction, max_new_tokens=max_new_tokens,
                                       window=self.window, interval=self.interval, **self.cache_kwargs)

    # -- needle: greedy + teacher forcing over the reference tokens -------------------------
    def run_needle(self, method: str, prompt: NeedlePrompt, ref: Reference, keep_fraction: float) -> dict:
        n = len(ref.tokens)
        ids = prompt.input_ids.to(self.device)
        if method == REFERENCE:
            cmp = M.compare_logits(ref.logits, ref.logits)
            return dict(method=method, kv_bytes=ref.kv_bytes, hit=ref.hit, answer=ref.answer, gen_tokens=n,
                        decode_s=ref.decode_s, prefill_s=ref.prefill_s, compress_s=0.0, teacher_forced=False,
                        kl_per_token=[0.0] * n, agree_per_token=[True] * n, **cmp)
        cache = self._new_cache(method, keep_fraction, n)
        first, pre_s = prefill(self.model, ids, cache)
        kv_prefill = self.backend.nbytes(cache)
        try:  # a snapshot spares a second prefill when teacher forcing is needed
            snapshot = copy.deepcopy(cache)
        except Exception:
            snapshot = None
        toks, logits, dec_s = self._decode(cache, first, n, ids.shape[-1])
        comp_s = self.backend.compression_seconds(cache)
        kv_end = self.backend.nbytes(cache)
        teacher_forced = toks != ref.tokens
        if teacher_forced:
            if snapshot is None:
                snapshot = self._new_cache(method, keep_fraction, n)
                first, _ = prefill(self.model, ids, snapshot)
            _, logits, _ = self._decode(snapshot, first, n, ids.shape[-1], targets=ref.tokens)
        answer = decode(self.tokenizer, toks)
        kl = M.kl_per_token(ref.logits, logits)
        agree = M.top1_agreement(ref.logits, logits)
        return dict(method=method, kv_bytes=kv_end, kv_bytes_prefill=kv_prefill, hit=M.needle_hit(answer, prompt.key),
                    answer=answer, gen_tokens=len(toks), decode_s=dec_s, prefill_s=pre_s, compress_s=comp_s,
                    teacher_forced=teacher_forced, kl_per_token=kl.tolist(), agree_per_token=agree.tolist(),
                    **M.compare_logits(ref.logits, logits))

    # -- real text: teacher forcing over the real continuation ------------------------------
    def reference_text(self, window: TextWindow) -> Reference:
        targets = window.target_ids[0].tolist()
        return self.reference(window.prompt_ids, len(targets), targets=targets)

    def run_text(self, method: str, window: TextWindow, ref: Reference, keep_fraction: float) -> dict:
        targets = window.target_ids[0].tolist()
        tgt = torch.tensor(targets)
        if method == REFERENCE:
            logits, kv, pre_s, dec_s, comp_s = ref.logits, ref.kv_bytes, ref.prefill_s, ref.decode_s, 0.0
        else:
            cache = self._new_cache(method, keep_fraction, len(targets))
            first, pre_s = prefill(self.model, window.prompt_ids.to(self.device), cache)
            _, logits, dec_s = self._decode(cache, first, len(targets), window.prompt_ids.shape[-1], targets=targets)
            kv, comp_s = self.backend.nbytes(cache), self.backend.compression_seconds(cache)
        return dict(method=method, source=window.source, window=window.index, kv_bytes=kv, prefill_s=pre_s,
                    decode_s=dec_s, compress_s=comp_s, **M.compare_logits(ref.logits, logits),
                    **M.perplexity_change(ref.logits, logits, tgt))


# -----------------------------------------------------------------------------------------------
# Aggregation
# -----------------------------------------------------------------------------------------------

def summarize_needle(rows: list[dict]) -> dict:
    """Pools one method's needle runs: KL and agreement over all generated tokens of all prompts."""
    kl = [x for r in rows for x in r["kl_per_token"]]
    agree = [x for r in rows for x in r["agree_per_token"]]
    dec_tokens = sum(max(r["gen_tokens"] - 1, 0) for r in rows)
    dec_s = sum(r["decode_s"] for r in rows)
    return dict(method=rows[0]["method"], prompts=len(rows), kv_bytes=int(M.mean(r["kv_bytes"] for r in rows)),
                hits=sum(bool(r["hit"]) for r in rows), top1_agreement=M.mean(agree), kl_mean=M.mean(kl),
                kl_max=max(kl) if kl else float("nan"),
                decode_tok_s=dec_tokens / dec_s if dec_s > 0 else float("nan"),
                prefill_s=M.mean(r["prefill_s"] for r in rows), compress_s=M.mean(r["compress_s"] for r in rows))


def summarize_text(rows: list[dict]) -> dict:
    """Pools one method's real-text windows (token-weighted KL and agreement, mean perplexities)."""
    n = sum(r["tokens"] for r in rows)
    return dict(method=rows[0]["method"], windows=len(rows), tokens=n,
                kv_bytes=int(M.mean(r["kv_bytes"] for r in rows)),
                kl_mean=sum(r["kl_mean"] * r["tokens"] for r in rows) / n,
                top1_agreement=sum(r["top1_agreement"] * r["tokens"] for r in rows) / n,
                ppl_ref=M.mean(r["ppl_ref"] for r in rows), ppl=M.mean(r["ppl"] for r in rows),
                ppl_rel_change=M.mean(r["ppl_rel_change"] for r in rows),
                compress_s=M.mean(r["compress_s"] for r in rows))


ProgressFn = Callable[[str], None]


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)


def _tick(bar, label: str) -> None:
    if bar is not None:
        bar.set_postfix_str(label, refresh=False)
        bar.update(1)


def _strip(rows: list[dict]) -> list[dict]:
    """Per-run rows without the per-token lists (kept in the summaries' pools only)."""
    return [{k: v for k, v in r.items() if k not in ("kl_per_token", "agree_per_token")} for r in rows]


def run_demo(model, tokenizer, *, methods: Sequence[str], keep_fraction: float = 0.25, length: int = 2048,
             depths: Sequence[float] = (0.1, 0.5, 0.9), new_tokens: int = 16, seed: int = 0,
             backend: Backend | None = None, device="cpu", progress: bool = True, texts=None,
             interval: int = 0, window: int = 32) -> dict:
    """The demo: needle prompts at ``depths``, the reference and each method at ``keep_fraction``.

    Returns ``{"settings", "summary": [per method], "runs": [per method and depth]}``; the first
    summary row is the DynamicCache reference. Each method compresses after the prefill (as
    KVPress does), so the first generated token comes from full attention and always agrees
    (KL 0): agreement and KL over ``new_tokens`` tokens include that one.
    """
    from .prompts import needle_prompt

    h = Harness(model, tokenizer, backend=backend or Backend.default(), device=device, seed=seed,
                window=window, interval=interval)
    methods = [m for m in methods if m != REFERENCE]
    prompts = [needle_prompt(tokenizer, length, d, seed=seed, texts=texts) for d in depths]
    h.warmup(methods, prompts[0].input_ids)
    bar = _progress(len(prompts) * (1 + len(methods)), progress, "kvkern demo")
    per_method: dict[str, list[dict]] = {m: [] for m in [REFERENCE] + methods}
    try:
        for p in prompts:
            ref = h.reference(p.input_ids, new_tokens, key=p.key)
            per_method[REFERENCE].append(dict(h.run_needle(REFERENCE, p, ref, 1.0), depth=p.depth, key=p.key))
            _tick(bar, f"depth {p.depth:g} full cache")
            for m in methods:
                per_method[m].append(dict(h.run_needle(m, p, ref, keep_fraction), depth=p.depth, key=p.key))
                _tick(bar, f"depth {p.depth:g} {m}")
    finally:
        if bar is not None:
            bar.close()
    summary = [summarize_needle(rows) for rows in per_method.values()]
    settings = dict(methods=methods, keep_fraction=keep_fraction, length=length, prompt_tokens=[p.num_tokens for p in prompts],
                    depths=list(depths), new_tokens=new_tokens, seed=seed, interval=interval, window=window,
                    device=str(device), dtype=str(next(model.parameters()).dtype))
    return dict(settings=settings, summary=summary, runs=_strip([r for rows in per_method.values() for r in rows]))


def run_eval(model, tokenizer, *, methods: Sequence[str], budgets: Sequence[float] = (0.1, 0.25, 0.5),
             sources: Sequence[str] = ("essays", "wiki"), windows: int = 2, prompt_tokens: int = 1024,
             continuation_tokens: int = 64, needle_lengths: Sequence[int] = (1024, 2048),
             needle_depths: Sequence[float] = (0.1, 0.5, 0.9), new_tokens: int = 12, seed: int = 0,
             backend: Backend | None = None, device="cpu", progress: bool = True, texts: dict | None = None,
             interval: int = 0, window: int = 32) -> dict:
    """The quality harness over budgets x methods.

    Real text: ``windows`` windows per source of ``prompt_tokens`` (compressed) +
    ``continuation_tokens`` (teacher-forced real text): KL, top-1 agreement, perplexity change.
    Needles: one prompt per (length, depth): hit rate, and KL/agreement over the reference's greedy
    tokens. Methods that keep every token (``full``, quantized) run once, labelled budget 1.0.
    ``texts``: optional ``{"essays": [...], "wiki": [...]}`` overriding the offline corpora (tests).
    Returns ``{"settings", "text": [...], "needle": [...], "summary": [...]}``.
    """
    from .prompts import needle_prompt, text_windows

    texts = texts or {}
    h = Harness(model, tokenizer, backend=backend or Backend.default(), device=device, seed=seed,
                window=window, interval=interval)
    methods = [m for m in methods if m != REFERENCE]
    runs = [(REFERENCE, 1.0)] + [(m, 1.0) for m in methods if m in KEEP_ALL] + \
           [(m, b) for b in budgets for m in methods if m not in KEEP_ALL]
    wins = [w for s in sources for w in text_windows(tokenizer, s, prompt_tokens=prompt_tokens,
                                                     continuation_tokens=continuation_tokens, count=windows,
                                                     seed=seed, texts=texts.get(s))]
    needles = [needle_prompt(tokenizer, L, d, seed=seed, texts=texts.get("essays"))
               for L in needle_lengths for d in needle_depths]
    h.warmup(methods, wins[0].prompt_ids if wins else needles[0].input_ids)
    bar = _progress((len(wins) + len(needles)) * len(runs), progress, "kvkern eval")
    text_rows, needle_rows = [], []
    try:
        for w in wins:
            ref = h.reference_text(w)
            for m, b in runs:
                text_rows.append(dict(h.run_text(m, w, ref, b), budget=b))
                _tick(bar, f"{w.source}#{w.index} {m}@{b:g}")
        for p in needles:
            ref = h.reference(p.input_ids, new_tokens, key=p.key)
            for m, b in runs:
                needle_rows.append(dict(h.run_needle(m, p, ref, b), budget=b, length=p.target_tokens,
                                        prompt_tokens=p.num_tokens, depth=p.depth, key=p.key))
                _tick(bar, f"needle {p.target_tokens}@{p.depth:g} {m}@{b:g}")
    finally:
        if bar is not None:
            bar.close()
    summary = []
    for m, b in runs:
        entry = dict(method=m, budget=b)
        t = [r for r in text_rows if r["method"] == m and r["budget"] == b]
        n = [r for r in needle_rows if r["method"] == m and r["budget"] == b]
        if t:
            st = summarize_text(t)
            entry.update(kv_bytes=st["kv_bytes"], text_kl_mean=st["kl_mean"], text_top1_agreement=st["top1_agreement"],
                         ppl_ref=st["ppl_ref"], ppl=st["ppl"], ppl_rel_change=st["ppl_rel_change"],
                         compress_s=st["compress_s"])
            for s in sources:
                ts = [r for r in t if r["source"] == s]
                if ts:
                    ss = summarize_text(ts)
                    entry[f"{s}_kl_mean"], entry[f"{s}_top1_agreement"] = ss["kl_mean"], ss["top1_agreement"]
                    entry[f"{s}_ppl_rel_change"] = ss["ppl_rel_change"]
        if n:
            sn = summarize_needle(n)
            entry.update(needle_hits=sn["hits"], needle_prompts=sn["prompts"], needle_hit_rate=sn["hits"] / sn["prompts"],
                         needle_top1_agreement=sn["top1_agreement"], needle_kl_mean=sn["kl_mean"],
                         needle_kv_bytes=sn["kv_bytes"], decode_tok_s=sn["decode_tok_s"])
        summary.append(entry)
    settings = dict(methods=methods, budgets=list(budgets), sources=list(sources), windows=windows,
                    prompt_tokens=prompt_tokens, continuation_tokens=continuation_tokens,
                    needle_lengths=list(needle_lengths), needle_depths=list(needle_depths), new_tokens=new_tokens,
                    seed=seed, interval=interval, window=window, device=str(device),
                    dtype=str(next(model.parameters()).dtype))
    return dict(settings=settings, summary=summary, text=text_rows, needle=_strip(needle_rows))
