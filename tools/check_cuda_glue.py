# SPDX-License-Identifier: Apache-2.0
"""Compile-checks the CUDA glue (csrc/cuda/*.cpp) on a machine without a GPU.

The glue uses only the LibTorch stable ABI, so it compiles against the headers of
a CPU build of torch plus the CUDA toolkit's runtime headers. (It cannot be linked
into something loadable here: that needs a CUDA build of torch.) Same flags as
setup.py's CUDA build, plus -Werror.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from torch.utils.cpp_extension import CUDA_HOME, include_paths

ROOT = Path(__file__).resolve().parents[1]
TORCH_TARGET_VERSION = "0x020b000000000000"  # keep in step with setup.py


def main() -> int:
    cuda_home = CUDA_HOME or "/usr/local/cuda"
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
    if not sources:
        print("no CUDA glue sources")
        return 0
    cxx = os.environ.get("CXX", shutil.which("g++") or "c++")
    flags = ["-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
             f"-DTORCH_TARGET_VERSION={TORCH_TARGET_VERSION}", "-DUSE_CUDA", "-DKVKERN_WITH_CUDA",
             f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}", f"-I{Path(cuda_home) / 'include'}"]
    flags += [f"-isystem{p}" for p in include_paths()]
    failed = 0
    for src in sources:
        result = subprocess.run([cxx, *flags, str(src)], capture_output=True, text=True)
        status = "ok" if result.returncode == 0 else "FAILED"
        print(f"{status}: {src.relative_to(ROOT)}")
        if result.returncode:
            failed += 1
            print(result.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
