# SPDX-License-Identifier: Apache-2.0
"""Runs kvkern's CUDA score-and-evict kernels on the CPU (tools/cuda_emu/eviction_emu.cpp).

``load()`` builds (once; cached under build/cuda_emu/eviction-<hash>/ by a hash of
everything that goes into it) and loads the emulator library: the real kernel
headers (the emulation copy tools/cuda_emu/gen.py makes), compiled by g++ with
the CUDA headers. ``Emulator.run`` fills one of the parameter structs of
eviction_params.h / eviction_launch.h by field name from torch CPU tensors and
runs the launch sequence (run_window_scores, run_select_keep, run_compact,
run_evict, run_score_evict) with every kernel emulated block by block.

Used by tests/test_cuda_eviction_kernels.py; importing this module needs torch
only for ``Emulator.run``'s tensor handling.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD_DIR = REPO / "build" / "cuda_emu"
sys.path.insert(0, str(HERE))
import gen  # noqa: E402

REQUIRED_CUDA_HEADERS = ("cuda_runtime.h", "cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h", "math_constants.h")
CXXFLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
            "-Wno-class-memaccess", "-fcf-protection=none"]
KV_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}  # enum class KvDtype
ENUMS = {
    "query_reduce": {"mean": 0, "sum": 1},
    "group_reduce": {"mean": 0, "max": 1, "mean_all": 2},
    "pool": {"none": 0, "avg": 1, "max": 2},
    "hist_mode": {"max": 0, "ema": 1, "sum": 2},
}


class EmulatorError(RuntimeError):
    """The emulated kernels misbehaved (a violation, a deadlock) or the build failed."""


def cuda_include_dir() -> Path | None:
    inc = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda") / "include"
    return inc if all((inc / h).is_file() for h in REQUIRED_CUDA_HEADERS) else None


def available() -> str | None:
    """None when the emulator can be built here, else why not."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return "the fiber emulator needs Linux on x86-64"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no g++ (set CXX)"
    if cuda_include_dir() is None:
        return "no CUDA headers (set CUDA_HOME)"
    return None


def build(verbose: bool = False, src_dir: Path | str | None = None) -> Path:
    """Compiles the emulator library if needed; returns its path. ``src_dir``: a
    kernel header directory other than csrc/include/kvkern (e.g. a copy with a
    planted bug)."""
    why = available()
    if why:
        raise EmulatorError(f"cannot build the eviction emulator: {why}")
    cuda_inc = cuda_include_dir()
    files = gen.emulation_headers(src_dir) if src_dir is not None else gen.emulation_headers()
    cxx = os.environ.get("CXX", "g++")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    src = HERE / "eviction_emu.cpp"
    h = hashlib.sha256()
    for item in [src.read_text(), sorted(files.items()), CXXFLAGS, version, str(cuda_inc),
                 [(cuda_inc / f).stat().st_mtime_ns for f in REQUIRED_CUDA_HEADERS]]:
        h.update(repr(item).encode())
    out = BUILD_DIR / f"eviction-{h.hexdigest()[:16]}"
    lib = out / "libkvkern_eviction_emu.so"
    if lib.is_file():
        return lib
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="eviction.tmp", dir=BUILD_DIR))
    try:
        inc = gen.write_headers(files, tmp / "include")
        cmd = [cxx, *CXXFLAGS, f"-I{inc}", f"-I{cuda_inc}", str(src), "-o", str(tmp / lib.name), "-ldl"]
        if verbose:
            print(" ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or r.stderr.strip():
            raise EmulatorError(f"{' '.join(cmd)}\n{r.stderr[-20000:]}")
        try:
            tmp.rename(out)
        except OSError:  # built meanwhile by another process
            if not lib.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    old = sorted((d for d in BUILD_DIR.iterdir() if d.is_dir() and d.name.startswith("eviction-") and d != out),
                 key=lambda d: d.stat().st_mtime, reverse=True)
    for d in old[2:]:
        shutil.rmtree(d, ignore_errors=True)
    return lib


_LIBS: dict = {}


def load(src_dir: Path | str | None = None) -> ctypes.CDLL:
    key = str(src_dir)
    if key not in _LIBS:
        lib = ctypes.CDLL(str(build(src_dir=src_dir)))
        lib.emu_new.restype = ctypes.c_void_p
        lib.emu_new.argtypes = [ctypes.c_char_p]
        lib.emu_free.argtypes = [ctypes.c_void_p]
        lib.emu_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_double]
        lib.emu_set_ptr.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        lib.emu_allow.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.emu_clear_allowed.argtypes = []
        lib.emu_error.restype = ctypes.c_char_p
        lib.emu_launches.restype = ctypes.c_char_p
        lib.emu_workspace_bytes.restype = ctypes.c_longlong
        lib.emu_workspace_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.emu_run.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        _LIBS[key] = lib
    return _LIBS[key]


class Refused(RuntimeError):
    """The launch sequence returned cudaErrorInvalidValue before launching anything."""


class Handle:
    """One parameter struct ("window_scores", "select", "compact", "score_evict")."""

    def __init__(self, kind: str, fields: dict, src_dir: Path | str | None = None):
        import torch

        self.lib = load(src_dir)
        self.kind = kind
        self.h = self.lib.emu_new(kind.encode())
        if not self.h:
            raise ValueError(kind)
        self.tensors = []
        for name, value in fields.items():
            if isinstance(value, torch.Tensor):
                self.tensors.append(value)
                self._check(self.lib.emu_set_ptr(self.h, name.encode(), value.data_ptr()), name)
            elif value is None:
                self._check(self.lib.emu_set_ptr(self.h, name.encode(), None), name)
            else:
                if isinstance(value, str):
                    value = ENUMS[name][value]
                self._check(self.lib.emu_set(self.h, name.encode(), float(value)), name)

    def _check(self, rc, name):
        if rc != 0:
            raise KeyError(f"{self.kind}.{name}: {self.lib.emu_error().decode()}")

    def workspace_bytes(self, dtype) -> int:
        return int(self.lib.emu_workspace_bytes(self.h, KV_DTYPES[str(dtype).split(".")[-1]]))

    def __del__(self):
        if getattr(self, "h", None):
            self.lib.emu_free(self.h)


def run(op: str, handle: Handle, dtype, compact: Handle | None = None, allow=(), ws_fill: int = 0x7f) -> list[str]:
    """Runs ``op`` ("window_scores", "select_keep", "compact", "evict", "score_evict").

    cp.async / __ldg may read the tensors of the handles, ``allow`` and the
    workspace (anything else is reported). The workspace starts filled with ``ws_fill`` bytes:
    the kernels must not depend on its contents. Returns the launches
    ("kernel blocks threads smem" lines); raises Refused or EmulatorError."""
    import torch

    lib = handle.lib
    nbytes = handle.workspace_bytes(dtype)
    if nbytes < 0:
        raise Refused(f"{op}: the plan refuses these parameters")
    ws = torch.full((max(nbytes, 1) + 256,), ws_fill, dtype=torch.uint8)
    off = (-ws.data_ptr()) % 256
    ws_ptr = ws.data_ptr() + off
    lib.emu_clear_allowed()
    for t in [*handle.tensors, *(compact.tensors if compact is not None else []), *allow]:
        lib.emu_allow(t.data_ptr(), t.untyped_storage().nbytes() - t.storage_offset() * t.element_size())
    lib.emu_allow(ws_ptr, nbytes)
    rc = lib.emu_run(handle.h, op.encode(), KV_DTYPES[str(dtype).split(".")[-1]], ws_ptr,
                     compact.h if compact is not None else None)
    launches = lib.emu_launches().decode().splitlines()
    if rc == 2:
        raise Refused(f"{op}: {lib.emu_error().decode()}")
    if rc != 0:
        raise EmulatorError(f"{op}: {lib.emu_error().decode()}\nlaunches:\n" + "\n".join(launches))
    return launches


if __name__ == "__main__":
    print(build(verbose=True))
