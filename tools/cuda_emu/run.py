#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Runs kvkern's CUDA decode-attention kernels on the CPU, in a fiber emulator.

    python tools/cuda_emu/run.py [--quick | --full] [--mode deferred|immediate|both]
                                 [-j N] [-v] [--list] [--only ID] [--src DIR]

  1. regenerates the emulation copy of the kernel headers from the current
     sources (gen.py: cp.async fallbacks -> emulator hooks, launchers cut off;
     any pattern that no longer matches exactly once is an error);
  2. compiles emu.cpp with g++ -O2 against them and the CUDA headers
     ($CUDA_HOME/include, else /usr/local/cuda/include): every kernel the
     library instantiates, in parallel objects; the binary is cached under
     build/cuda_emu/ by a hash of everything that goes into it;
  3. runs the cases in N processes (default: one per core) and prints every
     failure (with the exact case and a replay command) and a summary.

--quick (default, for CI): three rotating scenarios per kernel, in both cp.async
modes, plus the merge kernel; --full (developers): every scenario at every group
size per kernel, long caches and random cases. See emu.cpp for what is emulated
and what is not. Tolerances: the tables of tests/utils.py.

Exit status: 0 every case passed, or skipped because the CUDA headers are
missing (then it says so: nothing was verified); 1 a case failed; 2 the
emulator could not be built or run (a kernel source no longer matches gen.py's
patterns, a compile error, a crash).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import emu_build  # noqa: E402
import gen  # noqa: E402
from emu_build import REQUIRED_CUDA_HEADERS, cuda_home, cuda_include_dir  # noqa: E402,F401

_TORCH_DTYPES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def log(msg: str) -> None:
    print(f"cuda_emu: {msg}", flush=True)


def tolerances(utils: Path = REPO / "tests" / "utils.py") -> dict[str, dict[str, tuple[float, float]]]:
    """TOLERANCES and LSE_TOLERANCES of tests/utils.py, read without importing torch:
    {"TOLERANCES": {"fp32": (atol, rtol), ...}, "LSE_TOLERANCES": {...}}."""
    tree = ast.parse(utils.read_text())
    found: dict[str, dict[str, tuple[float, float]]] = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in ("TOLERANCES", "LSE_TOLERANCES") and isinstance(node.value, ast.Dict)):
            table = {}
            for k, v in zip(node.value.keys, node.value.values):
                name = _TORCH_DTYPES.get(ast.unparse(k))
                if name is not None:
                    atol, rtol = ast.literal_eval(v)
                    table[name] = (float(atol), float(rtol))
            found[node.targets[0].id] = table
    for name in ("TOLERANCES", "LSE_TOLERANCES"):
        if set(found.get(name, {})) != {"fp32", "fp16", "bf16"}:
            raise SystemExit(f"cuda_emu: could not read {name} for float32 / float16 / bfloat16 from {utils}")
    return found


def _tol_args(tols) -> list[str]:
    args = []
    for flag, table in (("--tol", tols["TOLERANCES"]), ("--lse-tol", tols["LSE_TOLERANCES"])):
        for name, (atol, rtol) in table.items():
            args += [flag, f"{name}={atol!r},{rtol!r}"]
    return args


def build(src_dir: Path, jobs: int) -> tuple[Path, float, bool]:
    """Generates the headers and compiles the emulator (every kernel, in parallel
    parts: with part 0, the runtime and cases, 2 objects per job). Returns
    (binary, seconds, cached)."""
    return emu_build.build("emu", "emu.cpp", shared=False, src_dir=src_dir, parts=max(1, 2 * jobs - 1), jobs=jobs,
                           keep=3)


_SUMMARY = re.compile(r"^SUMMARY (.*)$", re.M)


def run_cases(exe: Path, args: list[str], jobs: int, verbose: bool) -> tuple[int, dict, list[str]]:
    """Runs the emulator in `jobs` shards. Returns (status, totals, failure lines)."""
    shards = [[str(exe), *args, "--shard", f"{i}/{jobs}"] for i in range(jobs)]
    if "--only" in args:
        shards = [[str(exe), *args]]
    outs = []
    procs = []
    for cmd in shards:
        f = tempfile.TemporaryFile(mode="w+")
        e = tempfile.TemporaryFile(mode="w+")
        procs.append((subprocess.Popen(cmd, stdout=f, stderr=e, text=True), f, e, cmd))
    status = 0
    totals = {"runs": 0, "failed": 0, "worst_ratio": 0.0}
    lines: list[str] = []
    for p, f, e, cmd in procs:
        rc = p.wait()
        f.seek(0)
        e.seek(0)
        out, err = f.read(), e.read()
        outs.append(out)
        m = _SUMMARY.search(out)
        if rc not in (0, 1) or m is None:
            sys.stderr.write(f"cuda_emu: the emulator failed (exit status {rc}): {' '.join(cmd)}\n"
                             f"{out[-3000:]}{err[-3000:]}\n")
            status = 2
            continue
        kv = dict(x.split("=", 1) for x in m.group(1).split())
        totals["runs"] += int(kv["runs"])
        totals["failed"] += int(kv["failed"])
        totals["split_kernels"] = int(kv["split_kernels"])
        totals["merge_kernels"] = int(kv["merge_kernels"])
        if float(kv["worst_ratio"]) >= totals["worst_ratio"]:
            totals["worst_ratio"] = float(kv["worst_ratio"])
            totals["worst_case"] = int(kv["worst_case"])
        for line in out.splitlines():
            if line.startswith("SUMMARY"):
                continue
            if verbose or line.startswith("FAIL") or line.startswith("    "):
                lines.append(line)
        if err.strip():
            sys.stderr.write(err)
        if rc == 1:
            status = max(status, 1)
    return status, totals, lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the CI set (default)")
    size.add_argument("--full", action="store_true", help="every scenario, long and random cases")
    ap.add_argument("--mode", choices=("deferred", "immediate", "both"), default="both",
                    help="when cp.async copies land: at the wait, at issue, or each case in both (default)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles and runs")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every case, not only failures")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--only", type=int, metavar="ID", help="run case ID only (IDs from --list or a failure)")
    ap.add_argument("--src", type=Path, default=gen.SOURCE_DIR,
                    help="kernel header directory (default: csrc/include/kvkern; e.g. a scratch copy to check "
                         "that the emulator catches a planted bug)")
    args = ap.parse_args(argv)
    jobs = max(1, args.jobs)
    size_flag = "--full" if args.full else "--quick"

    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        log(f"SKIPPED: the CUDA headers ({', '.join(REQUIRED_CUDA_HEADERS)}) are not in {cuda_home() / 'include'} "
            f"(set CUDA_HOME). The CUDA kernels were NOT verified.")
        return 0
    tols = tolerances()
    try:
        src = args.src.resolve()
        rel = src.relative_to(REPO) if src.is_relative_to(REPO) else src
        exe, secs, cached = build(src, jobs)
    except (gen.PatchError, emu_build.EmulatorError) as e:
        print(f"cuda_emu: ERROR: {e}", file=sys.stderr)
        return 2
    log(f"kernels from {rel}; build {'cached' if cached else 'done'} in {secs:.1f} s "
        f"({exe.relative_to(REPO) if exe.is_relative_to(REPO) else exe})")
    emu_args = [size_flag, "--mode", args.mode, *_tol_args(tols)]
    if args.list:
        return subprocess.run([str(exe), *emu_args, "--list"]).returncode
    if args.only is not None:
        emu_args += ["--only", str(args.only), "--verbose"]
    elif args.verbose:
        emu_args += ["--verbose"]
    t0 = time.monotonic()
    status, totals, lines = run_cases(exe, emu_args, jobs, args.verbose or args.only is not None)
    secs = time.monotonic() - t0
    for line in lines:
        print(line)
    if status == 2:
        log(f"ERROR: the emulator itself failed ({secs:.1f} s)")
        return 2
    what = (f"{totals['runs']} cases ({size_flag[2:]}, cp.async {args.mode}; {totals.get('split_kernels', 0)} split "
            f"+ {totals.get('merge_kernels', 0)} merge kernels) in {secs:.1f} s on {jobs} processes; worst "
            f"error/tolerance {totals['worst_ratio']:.3f} (case {totals.get('worst_case', -1)})")
    if status == 1:
        log(f"FAILED {totals['failed']} of {what}")
        rel_here = Path(__file__).resolve().relative_to(REPO)
        log(f"replay one: python {rel_here} {size_flag} --mode {args.mode} --only ID"
            + (f" --src {args.src}" if args.src != gen.SOURCE_DIR else ""))
        return 1
    log(f"PASSED {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
