# SPDX-License-Identifier: Apache-2.0
"""The GPU check: everything that needs a GPU, in one command, with a JSON report.

    python tools/gpu_check.py [--steps build,info,test,sanitize,tune,tune_writers,bench] [--out DIR]
                              [--part N/M]

Steps (each recorded with its status, duration and output tail; a failed step does
not stop the others):
  build     KVKERN_CUDA=1 editable install for this GPU's architecture
  info      python -m kvkern info --json
  test      the whole test suite on CUDA tensors (junit XML kept); with --part N/M
            one slice of the test files, so that a long suite spans several calls
  sanitize  compute-sanitizer memcheck (and racecheck on the CUDA kernel) over
            tools/sanitizer_cases.py
  tune      the tuner on a few buckets: attention and eviction ops (files kept
            under OUT/configs)
  tune_writers  the same for the cache writers (quantize / append, int and FP8)
  bench     the benchmarks (pytest-benchmark JSON kept; every figure copied in); --part
            slices the benchmark files the same way

The report goes to OUT/gpu_report.json and to bench/results/gpu_report_<device>.json.
Steps run in several calls merge into the same report file (same commit only), so
the work can be split across commands on a machine that stays warm.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALL_STEPS = ("build", "info", "test", "sanitize", "tune", "tune_writers", "bench")


def sh(cmd, *, env=None, timeout=None, log=None) -> dict:
    t0 = time.time()
    merged = dict(os.environ, **(env or {}))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=merged, capture_output=True, text=True, timeout=timeout,
                              shell=isinstance(cmd, str))
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rc, out = 124, f"timed out after {timeout}s\n{(err.stdout or b'')[-4000:]!r}"
    if log:
        Path(log).write_text(out)
    print(out[-3000:], flush=True)
    return {"cmd": cmd if isinstance(cmd, str) else " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1),
            "tail": out[-4000:]}


def commit() -> str:
    if os.environ.get("KVKERN_COMMIT"):
        return os.environ["KVKERN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def device_summary() -> dict:
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as err:
        info["triton"] = f"unavailable: {err}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, cc=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
    smi = shutil.which("nvidia-smi")
    if smi:
        info["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                                             "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    return info


def junit_summary(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except Exception as err:
        return {"error": f"no junit xml: {err}"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None][:50]
    return counts


def step_build(out: Path) -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    env = {"KVKERN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": f"{major}.{minor}",
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 4))}
    return sh([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
              env=env, timeout=900, log=out / "build.log")


def step_info(out: Path) -> dict:
    res = sh([sys.executable, "-m", "kvkern", "info", "--json"], timeout=120)
    try:
        res["info"] = json.loads(res["tail"][res["tail"].index("{"):])
    except Exception:
        pass
    return res


def files_of(folder: str, pattern: str, part: str | None) -> list[str]:
    """The files of ``part`` "N/M": the N-th (1-based) of M interleaved slices of the sorted
    ``folder/pattern`` files, so that a run longer than one device call takes M calls; the
    whole folder when None."""
    if part is None:
        return [folder]
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern))
    try:
        n, m = (int(x) for x in part.split("/"))
    except ValueError:
        n = m = 0
    if not 1 <= n <= m:
        raise ValueError(f"--part: expected N/M with 1 <= N <= M, got {part}")
    return files[n - 1::m]


def _tag(part: str | None) -> str:
    return "" if part is None else "_" + part.replace("/", "of")


def step_test(out: Path, part: str | None = None) -> dict:
    junit = out / f"junit{_tag(part)}.xml"
    res = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files_of("tests", "test_*.py", part),
              f"--junitxml={junit}"], env={"TRITON_INTERPRET": "0"}, timeout=1500, log=out / f"test{_tag(part)}.log")
    res["summary"] = junit_summary(junit)
    return res


def step_sanitize(out: Path) -> dict:
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    results = {}
    for name, args in (("memcheck", ["--tool", "memcheck", "--leak-check", "no"]),
                       ("racecheck", ["--tool", "racecheck", "--racecheck-report", "hazard"]),
                       ("initcheck", ["--tool", "initcheck"])):
        cases = "all" if name == "memcheck" else "cuda"
        results[name] = sh([tool, *args, "--error-exitcode", "99", sys.executable, "tools/sanitizer_cases.py",
                            cases], timeout=900, log=out / f"sanitize_{name}.log")
    rc = max(r["rc"] for r in results.values())
    return {"rc": rc, "tools": results, "seconds": sum(r["seconds"] for r in results.values())}


def _tune(out: Path, jobs) -> dict:
    # jobs: (op, extra flags, timeout); the files of every tune step share OUT/configs
    cfg_dir = out / "configs"
    res = {"rc": 0, "seconds": 0.0, "ops": {}}
    for op, extra, timeout in jobs:
        ran = sh([sys.executable, "-m", "autotune", "--op", op, *extra, "--out-dir", str(cfg_dir)], timeout=timeout,
                 log=out / f"tune_{op}.log")
        res["ops"][op] = ran
        res["rc"] = max(res["rc"], ran["rc"])
        res["seconds"] = round(res["seconds"] + ran["seconds"], 1)
    res["summary"] = " ".join(f"{op}:{r['rc']}" for op, r in res["ops"].items())
    res["files"] = {str(p.relative_to(cfg_dir)): json.loads(p.read_text()) for p in sorted(cfg_dir.rglob("*.json"))}
    return res


def step_tune(out: Path) -> dict:
    # A few buckets around the benchmark shapes (B*Hkv = 8 and 128; C = 4K and 32K), so the
    # step fits one command; a full tuning run is `python -m autotune --buckets full`. The
    # eviction ops tune the backend choice (CUDA C++ vs Triton), the quantized attention the
    # backend and split count: one bucket pair each.
    at_8 = ["--batch-heads", "8", "--capacity", "4096", "32768"]
    attention = ["--dtype", "bf16", "--head-dim", "128", "--group", "4"]
    return _tune(out, [
        ("decode_attention", ["--batch-heads", "8", "128", "--capacity", "4096", "32768", *attention], 540),
        ("window_scores", [*at_8, *attention, "--window", "32"], 300),
        ("select_keep", at_8, 300),
        ("quant_decode_attention", [*at_8, *attention, "--bits", "4", "2", "--quant-group", "128"], 300),
        ("fp8_decode_attention", [*at_8, *attention], 300),
    ])


def step_tune_writers(out: Path) -> dict:
    # The cache writers tune the backend only: the prefill at the benchmark's 32K tokens, the
    # decode step at the benchmark's batch (B * Hkv = 64) and a small one.
    quant = ["--dtype", "bf16", "--head-dim", "128", "--bits", "4", "2", "--quant-group", "128", "--centred", "0", "1"]
    fp8 = ["--dtype", "bf16", "--head-dim", "128"]
    return _tune(out, [
        ("quantize_kv_", [*quant, "--batch-heads", "64", "--tokens", "32768"], 300),
        ("append_quantized_kv_", [*quant, "--residual", "128", "--batch-heads", "8", "64"], 300),
        ("quantize_fp8_kv_", [*fp8, "--batch-heads", "64", "--tokens", "32768"], 300),
        ("append_fp8_kv_", [*fp8, "--batch-heads", "8", "64"], 300),
    ])


def step_bench(out: Path, part: str | None = None) -> dict:
    bench_json = out / f"bench{_tag(part)}.json"
    res = sh([sys.executable, "-m", "pytest", *files_of("bench", "bench_*.py", part), "-q", "-p", "no:cacheprovider",
              f"--benchmark-json={bench_json}"], timeout=1200, log=out / f"bench{_tag(part)}.log")
    try:
        data = json.loads(bench_json.read_text())
        res["figures"] = [dict(b["extra_info"], name=b["name"], pytest_benchmark_median_s=b["stats"]["median"])
                          for b in data["benchmarks"]]
    except Exception as err:
        res["figures_error"] = str(err)
    return res


STEPS = {"build": step_build, "info": step_info, "test": step_test, "sanitize": step_sanitize,
         "tune": step_tune, "tune_writers": step_tune_writers, "bench": step_bench}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default=",".join(ALL_STEPS))
    parser.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "build" / "gpu_check")))
    parser.add_argument("--part", default=None, metavar="N/M",
                        help="the test and bench steps run the N-th of M slices of their files "
                             "(recorded as test[N/M], bench[N/M])")
    args = parser.parse_args()
    if args.part is not None:
        try:
            files_of("tests", "test_*.py", args.part)
        except ValueError as err:
            parser.error(str(err))
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"--steps: unknown {sorted(unknown)}; expected among {list(ALL_STEPS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name(0).replace(" ", "_")
    kept = ROOT / "bench" / "results" / f"gpu_report_{device}.json"
    report = {}
    if kept.exists():
        report = json.loads(kept.read_text())
        if report.get("commit") != commit():
            report = {}
    report.update(commit=commit(), device=device_summary(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    report.setdefault("steps", {})
    for name in steps:
        print(f"=== gpu_check: {name}", flush=True)
        if name in ("test", "bench") and args.part is not None:
            report["steps"][f"{name}[{args.part}]"] = STEPS[name](out, args.part)
        else:
            report["steps"][name] = STEPS[name](out)
        kept.parent.mkdir(parents=True, exist_ok=True)
        for path in (kept, out / "gpu_report.json"):
            path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print("=== gpu_check summary")
    for name, res in report["steps"].items():
        extra = res.get("summary", "")
        print(f"{name:12} rc={res['rc']:<4} {res['seconds']:>7}s {extra}")
    figures = [f for name, res in report["steps"].items() if name.startswith("bench") for f in res.get("figures", [])]
    for fig in figures:
        print(f"{fig.get('case', ''):32} {fig.get('impl', ''):14} {fig.get('median_us', float('nan')):>10.1f}us "
              f"{100 * fig.get('fraction_of_copy_bw', float('nan')):6.1f}% of copy")
    return max(r["rc"] for r in report["steps"].values())


if __name__ == "__main__":
    sys.exit(main())
