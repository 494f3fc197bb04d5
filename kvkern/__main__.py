# SPDX-License-Identifier: Apache-2.0
"""``python -m kvkern info``: what a bug report needs. ``demo`` and ``eval``: the quality harness
(:mod:`kvkern.eval.cli`; needs transformers and the offline model packages)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def collect_info() -> dict:
    import torch

    import kvkern
    from kvkern import _manifest, tuning
    from kvkern import triton as kvkern_triton
    from kvkern.ops import available_backends

    try:
        import triton

        triton_version = triton.__version__
    except Exception as err:  # report, never fail
        triton_version = f"unavailable ({type(err).__name__}: {err})"

    info = {
        "kvkern": kvkern.__version__,
        "build": kvkern.BUILD_INFO,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "triton_interpret": kvkern_triton.INTERPRET,
        "cpu_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "devices": [],
        "ops": {},
        "tuning_dirs": [str(p) for p in tuning.search_dirs()],
        "tuned_config_dir_env": os.environ.get("KVKERN_TUNED_CONFIG_DIR"),
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            dev = torch.device("cuda", i)
            name = tuning.device_name(dev)
            entry = {"index": i, "name": props.name, "tuning_name": name,
                     "capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count,
                     "memory_gib": round(props.total_memory / 2**30, 1)}
            entry["tuning_files"] = [str(p) for d in tuning.search_dirs() for p in sorted(d.glob(f"*/device={name},*.json"))]
            info["devices"].append(entry)
    for op in _manifest.OPS:
        if _manifest.OPS[op] == "triton":
            continue  # reported as the "triton" backend of its base op
        info["ops"][op] = {"cpu": list(available_backends(op, "cpu")), "cuda": list(available_backends(op, "cuda"))}
    return info


def print_info(info: dict) -> None:
    build = info["build"] or {}
    print(f"kvkern {info['kvkern']}")
    if build:
        cuda = f"CUDA {build['cuda_version']} for arch {build['cuda_arch_list']}" if build.get("with_cuda") else "no CUDA"
        print(f"  extension: built with {cuda}, against torch {build['torch_built_with']} "
              f"({build['abi']}, runs on torch >= {build['torch_target_version']})")
    else:
        print("  extension: no build info (a source tree that was not built?)")
    print(f"python {info['python']} on {info['platform']}")
    print(f"torch {info['torch']} (CUDA {info['torch_cuda']}), triton {info['triton']}, "
          f"TRITON_INTERPRET={'1' if info['triton_interpret'] else '0'}, {info['cpu_threads']} CPU threads")
    if info["devices"]:
        for d in info["devices"]:
            print(f"cuda:{d['index']} {d['name']} (sm_{d['capability'].replace('.', '')}, {d['sm_count']} SMs, "
                  f"{d['memory_gib']} GiB), tuning name {d['tuning_name']}")
            for f in d.get("tuning_files", []):
                print(f"  tuning file: {f}")
    else:
        print("no CUDA device")
    print("backends per op:")
    for op, where in info["ops"].items():
        print(f"  {op}: cpu {where['cpu']}, cuda {where['cuda']}")
    print("tuning search path: " + (", ".join(info["tuning_dirs"]) or "(none)"))


def _add_eval_subcommands(sub) -> None:
    from kvkern.eval.cli import add_subcommands

    add_subcommands(sub)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvkern")
    sub = parser.add_subparsers(dest="command")
    info_p = sub.add_parser("info", help="versions, build, devices, backends and tuning files")
    info_p.add_argument("--json", action="store_true", help="print JSON")
    # demo/eval import transformers only when they run, so `info` works without it.
    _add_eval_subcommands(sub)
    args = parser.parse_args(argv)
    if args.command in ("demo", "eval"):
        from kvkern.eval import cli

        cli.run(args)
        return 0
    if args.command != "info":
        parser.print_help()
        return 2
    info = collect_info()
    if args.json:
        json.dump(info, sys.stdout, indent=2, default=str)
        print()
    else:
        print_info(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
