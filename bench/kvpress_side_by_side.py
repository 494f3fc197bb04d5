# SPDX-License-Identifier: Apache-2.0
"""kvkern against NVIDIA KVPress, same model, prompts and budget: quality and compression time.

    PYTHONPATH=$PWD python bench/kvpress_side_by_side.py [--length 1024] [--budget 0.25] \
        [--kvpress-python /work/venv-kvpress/bin/python] [--out bench/results/kvpress_side_by_side_cpu.json]

KVPress pins its own transformers, so it runs in its own environment: this script (in kvkern's
environment) builds the prompts, runs kvkern's methods through :mod:`kvkern.eval.harness`, then
starts the KVPress environment's python on this same file (``--worker``), which runs the same
harness with a backend that applies KVPress's presses (the press context manager) to a
``DynamicCache`` on the same fp32 weights (the converted SmolLM2 under ``~/.cache/kvkern``).

Each side is measured against its OWN full cache (a ``DynamicCache`` run in its own transformers):
per-token KL and top-1 agreement over (a) the real continuation of text windows (teacher forced)
and (b) the full cache's greedy answer to needle prompts, and the needle hit count. Compression
time: kvkern's ``hf.compression_seconds`` (time inside the policies: scoring and eviction) and, for
KVPress, the wall time inside ``press.compress`` (scoring, top-k, gather); both exclude the model's
own forward. ObservedAttention needs attention maps: KVPress runs it with eager attention (the map
is computed by the model's forward, not counted), kvkern computes its own. KV bytes: the cache after
prefill + decoding; KVPress's AdaKV masks evicted keys rather than freeing them.

Not a pytest file (its name matches neither ``test_*.py`` nor ``bench_*.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
METHODS = ("snapkv", "knorm", "streaming_llm", "tova", "expected_attention", "observed_attention", "adakv")
LABELS = {"snapkv": "SnapKV", "knorm": "KNorm", "streaming_llm": "StreamingLLM", "tova": "TOVA",
          "expected_attention": "Expected Attention", "observed_attention": "ObservedAttention (H2O)",
          "adakv": "AdaKV (SnapKV)", "dynamic": "full cache"}
WINDOW = 64  # KVPress's SnapKV window_size default; kvkern is given the same
DEFAULT_KVPRESS_PYTHON = "/work/venv-kvpress/bin/python"


# -----------------------------------------------------------------------------------------------
# Shared: run one side through the harness
# -----------------------------------------------------------------------------------------------

def run_side(model, tokenizer, backend, job: dict, progress: bool = True) -> dict:
    """Runs the reference and every method of ``job`` over its prompts. Returns per-method pools."""
    from kvkern.eval import harness
    from kvkern.eval.prompts import NeedlePrompt, TextWindow

    h = harness.Harness(model, tokenizer, backend=backend, seed=job["seed"], window=WINDOW)
    needles = [NeedlePrompt(text="", input_ids=torch.tensor([p["ids"]]), key=p["key"], depth=p["depth"],
                            actual_depth=p["depth"], target_tokens=len(p["ids"]), needle_token_start=0)
               for p in job["needles"]]
    windows = [TextWindow(source=w["source"], index=i, prompt_ids=torch.tensor([w["prompt"]]),
                          target_ids=torch.tensor([w["target"]])) for i, w in enumerate(job["windows"])]
    keep = job["keep_fraction"]
    methods = job["methods"]
    h.warmup(methods, (windows[0].prompt_ids if windows else needles[0].input_ids))
    total = (len(needles) + len(windows)) * (1 + len(methods))
    bar = harness._progress(total, progress, job.get("side", "side"))
    out = {m: {"needle": [], "text": []} for m in ["dynamic"] + list(methods)}
    try:
        for w in windows:
            ref = h.reference_text(w)
            for m in ["dynamic"] + list(methods):
                out[m]["text"].append(h.run_text(m, w, ref, keep))
                harness._tick(bar, f"{w.source} {m}")
        for p in needles:
            ref = h.reference(p.input_ids, job["new_tokens"], key=p.key)
            for m in ["dynamic"] + list(methods):
                r = h.run_needle(m, p, ref, keep)
                r.pop("kl_per_token"), r.pop("agree_per_token")
                out[m]["needle"].append(r)
                harness._tick(bar, f"needle@{p.depth:g} {m}")
    finally:
        if bar is not None:
            bar.close()
    return out


def summarize(per_method: dict) -> dict:
    res = {}
    for m, d in per_method.items():
        t, n = d["text"], d["needle"]
        tok_t = sum(r["tokens"] for r in t)
        tok_n = sum(r["tokens"] for r in n)
        runs = t + n
        res[m] = dict(
            text_tokens=tok_t,
            text_top1=sum(r["top1_agreement"] * r["tokens"] for r in t) / tok_t if tok_t else None,
            text_kl=sum(r["kl_mean"] * r["tokens"] for r in t) / tok_t if tok_t else None,
            ppl_rel_change=sum(r["ppl_rel_change"] for r in t) / len(t) if t else None,
            needle_hits=sum(bool(r["hit"]) for r in n), needles=len(n),
            needle_top1=sum(r["top1_agreement"] * r["tokens"] for r in n) / tok_n if tok_n else None,
            needle_kl=sum(r["kl_mean"] * r["tokens"] for r in n) / tok_n if tok_n else None,
            answers=[r["answer"] for r in n],
            kv_bytes=sum(r["kv_bytes"] for r in runs) / len(runs),
            compress_ms=1e3 * sum(r["compress_s"] for r in runs) / len(runs),
            prefill_ms=1e3 * sum(r["prefill_s"] for r in runs) / len(runs),
        )
    return res


# -----------------------------------------------------------------------------------------------
# KVPress side (runs in the KVPress environment)
# -----------------------------------------------------------------------------------------------

def _kvpress_factory(method: str, ratio: float):
    import kvpress as K

    if method == "snapkv":
        return K.SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=5)
    if method == "knorm":
        return K.KnormPress(compression_ratio=ratio)
    if method == "streaming_llm":
        return K.StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    if method == "tova":
        return K.TOVAPress(compression_ratio=ratio)
    if method == "expected_attention":
        return K.ExpectedAttentionPress(compression_ratio=ratio)
    if method == "observed_attention":
        return K.ObservedAttentionPress(compression_ratio=ratio)
    if method == "adakv":
        return K.AdaKVPress(K.SnapKVPress(compression_ratio=ratio, window_size=WINDOW, kernel_size=5),
                            alpha_safeguard=0.2)
    raise ValueError(method)


def _make_kvpress_backend():
    from kvkern.eval import harness

    class KVPressBackend(harness.Backend):
        """A DynamicCache per run with a press's hooks on the model while the run's cache is live
        (presses compress at prefill only, as kvkern's ``interval=0``). A pruned DynamicCache's
        ``get_seq_length()`` counts kept slots, so decoding passes explicit positions, as KVPress's
        own pipeline does (``generate_answer``)."""

        explicit_positions = True

        def __init__(self):
            super().__init__(None)
            self.methods = {m: "kvpress" for m in METHODS}
            self._ctx, self._press, self._seconds = None, None, 0.0

        def _close(self, model=None):
            if self._ctx is not None:
                self._ctx.__exit__(None, None, None)
                self._ctx = None
            if model is not None:
                model.set_attn_implementation("sdpa")

        def reference_cache(self, model):
            self._close(model)
            from transformers import DynamicCache

            return DynamicCache(config=model.config)

        def make_cache(self, model, method, *, keep_fraction, **kw):
            self._close(model)
            from transformers import DynamicCache

            press = _kvpress_factory(method, 1.0 - keep_fraction)
            if method == "observed_attention":
                model.set_attn_implementation("eager")  # the press reads the attention map
            inner = press.compress
            self._seconds = 0.0

            def timed(*a, **k):
                t0 = time.perf_counter()
                try:
                    return inner(*a, **k)
                finally:
                    self._seconds += time.perf_counter() - t0

            press.compress = timed
            self._press, self._ctx = press, press(model)
            self._ctx.__enter__()
            return DynamicCache(config=model.config)

        def compression_seconds(self, cache) -> float:
            return self._seconds

    return KVPressBackend()


def worker(job_path: str, out_path: str) -> None:
    import importlib.metadata
    import transformers

    torch.set_grad_enabled(False)
    job = json.loads(Path(job_path).read_text())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    model = transformers.AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["model_dir"])
    job["side"] = "kvpress"
    t0 = time.perf_counter()
    per = run_side(model, tokenizer, _make_kvpress_backend(), job)
    Path(out_path).write_text(json.dumps(dict(
        versions=dict(kvpress=importlib.metadata.version("kvpress"), transformers=transformers.__version__,
                      torch=torch.__version__),
        wall_s=time.perf_counter() - t0, summary=summarize(per)), default=str))


# -----------------------------------------------------------------------------------------------
# Driver (kvkern's environment)
# -----------------------------------------------------------------------------------------------

def build_job(tokenizer, args) -> dict:
    from kvkern.eval.prompts import needle_prompt, text_windows
    from kvkern.integrations import offline

    needles = [needle_prompt(tokenizer, args.length, d, seed=args.seed) for d in args.depths]
    wins = [w for s in args.sources for w in text_windows(tokenizer, s, prompt_tokens=args.length,
                                                          continuation_tokens=args.continuation, count=1,
                                                          seed=args.seed)]
    return dict(seed=args.seed, keep_fraction=args.budget, methods=list(args.methods), new_tokens=args.new_tokens,
                threads=args.threads, model_dir=str(offline.cache_dir() / f"{offline.MODEL_NAME}-fp32"),
                needles=[dict(ids=p.input_ids[0].tolist(), key=p.key, depth=p.depth) for p in needles],
                windows=[dict(source=w.source, prompt=w.prompt_ids[0].tolist(), target=w.target_ids[0].tolist())
                         for w in wins])


def _f(x, fmt):
    return "-" if x is None else fmt.format(x)


def markdown(result: dict) -> str:
    kk, kp = result["kvkern"]["summary"], result["kvpress"]["summary"]
    s = result["settings"]
    lines = [
        f"SmolLM2-135M-Instruct fp32, CPU ({s['threads'] or 'default'} threads), {s['budget']:.0%} of the prompt kept, "
        f"prompts of ~{s['length']} tokens: {len(s['depths'])} needle prompts (depths {', '.join(map(str, s['depths']))}; "
        f"{s['new_tokens']} greedy tokens) and {len(s['sources'])} text windows ({', '.join(s['sources'])}; "
        f"{s['continuation']} teacher-forced tokens). Each side against its own full cache. "
        f"kvpress {result['kvpress']['versions']['kvpress']} (transformers {result['kvpress']['versions']['transformers']}), "
        f"kvkern with transformers {result['kvkern']['versions']['transformers']}.",
        "",
        "| method | side | text top-1 | text KL | needle found | needle top-1 | KV MiB | compress ms | prefill ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in ["dynamic"] + s["methods"]:
        for side, d in (("kvkern", kk), ("KVPress", kp)):
            r = d.get(m)
            if r is None:
                continue
            lines.append(f"| {LABELS.get(m, m)} | {side} | {_f(r['text_top1'], '{:.3f}')} | {_f(r['text_kl'], '{:.4f}')} | "
                         f"{r['needle_hits']}/{r['needles']} | {_f(r['needle_top1'], '{:.3f}')} | "
                         f"{r['kv_bytes'] / 2**20:.2f} | {r['compress_ms']:.1f} | {r['prefill_ms']:.0f} |")
    lines += ["", "compress ms: mean per prompt inside the policy (kvkern) / press.compress (KVPress); prefill ms: "
              "the whole prefill forward including it (KVPress's ObservedAttention runs eager attention to get the "
              "map, kvkern's H2O computes it in the policy, so compare those two by prefill). The sides ran one "
              f"after the other on a shared CPU: the full-cache rows' prefill shows the timing noise between them. "
              f"Wall: kvkern {result['kvkern']['wall_s']:.0f} s, KVPress {result['kvpress']['wall_s']:.0f} s."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--markdown-from", metavar="JSON", help="reprint the table of a saved result and exit")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    ap.add_argument("--budget", type=float, default=0.25, help="fraction of the prompt kept (default 0.25)")
    ap.add_argument("--length", type=int, default=1024, help="prompt tokens (default 1024)")
    ap.add_argument("--depths", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.75])
    ap.add_argument("--sources", type=lambda s: s.split(","), default=["essays", "wiki"])
    ap.add_argument("--continuation", type=int, default=32, help="teacher-forced tokens per text window")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kvpress-python", default=os.environ.get("KVPRESS_PYTHON", DEFAULT_KVPRESS_PYTHON))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "kvpress_side_by_side_cpu.json"))
    args = ap.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    if args.markdown_from:
        print(markdown(json.loads(Path(args.markdown_from).read_text())))
        return 0

    import transformers

    from kvkern.eval import harness
    from kvkern.integrations import offline

    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = offline.load_smollm2()
    job = build_job(tokenizer, args)
    with tempfile.TemporaryDirectory() as tmp:
        job_path, kp_path = Path(tmp) / "job.json", Path(tmp) / "kvpress.json"
        job_path.write_text(json.dumps(job))
        t0 = time.perf_counter()
        job["side"] = "kvkern"
        kk = dict(versions=dict(transformers=transformers.__version__, torch=torch.__version__),
                  summary=summarize(run_side(model, tokenizer, harness.Backend.default(), job)))
        kk["wall_s"] = time.perf_counter() - t0
        del model
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([args.kvpress_python, str(Path(__file__).resolve()), "--worker", str(job_path), str(kp_path)],
                       check=True, env=env, cwd=str(REPO))
        kp = json.loads(kp_path.read_text())
    settings = dict(methods=list(args.methods), budget=args.budget, length=args.length, depths=args.depths,
                    sources=args.sources, continuation=args.continuation, new_tokens=args.new_tokens, seed=args.seed,
                    threads=args.threads, window=WINDOW, device="cpu", dtype="float32",
                    prompt_tokens=[len(p["ids"]) for p in job["needles"]] + [len(w["prompt"]) for w in job["windows"]])
    result = dict(settings=settings, kvkern=kk, kvpress=kp)
    result["markdown"] = markdown(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(result["markdown"])
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
