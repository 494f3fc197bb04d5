# SPDX-License-Identifier: Apache-2.0
"""Builds and loads kvkern's CUDA emulators (tools/cuda_emu/*.cpp on emu_runtime.h).

The one place for what the three emulators (run.py / emu.cpp, eviction_emu.py,
quant_emu.py) share: the toolchain checks (g++, the CUDA headers), the compile
(the emulation copy of the kernel headers from gen.py, g++ flags, optional
parallel parts), the cache under build/cuda_emu/<tag>-<hash>/ (hashed over
everything that goes into the build), and for the ctypes-driven libraries the
loading and the common C API of emu_capi.h (:class:`EmuLibrary`).

Named emu_build rather than build so it never meets the PyPA ``build`` package.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BUILD_DIR = REPO / "build" / "cuda_emu"
sys.path.insert(0, str(HERE))
import gen  # noqa: E402

REQUIRED_CUDA_HEADERS = ("cuda_runtime.h", "cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h", "math_constants.h")
CXXFLAGS = ["-std=c++17", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas",  # #pragma unroll
            "-Wno-class-memaccess"]  # __builtin_memcpy into __half2 (fine on the host)
RUNTIME_FILES = ("emu_runtime.h", "emu_capi.h")  # included by every emulator: part of every build's hash
KV_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}  # enum class KvDtype


class EmulatorError(RuntimeError):
    """The emulated kernels misbehaved (a violation, a deadlock) or the build failed."""


class Refused(RuntimeError):
    """The launch sequence returned cudaErrorInvalidValue before launching anything."""


def cuda_home() -> Path:
    return Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")


def cuda_include_dir() -> Path | None:
    """The CUDA include directory, or None when the headers the kernels need are missing."""
    inc = cuda_home() / "include"
    return inc if all((inc / h).is_file() for h in REQUIRED_CUDA_HEADERS) else None


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def available() -> str | None:
    """None when the ctypes emulators can be built here, else why not."""
    if not sys.platform.startswith("linux") or os.uname().machine != "x86_64":
        return "the fiber emulator needs Linux on x86-64"
    if shutil.which(compiler()) is None:
        return "no g++ (set CXX)"
    if cuda_include_dir() is None:
        return "no CUDA headers (set CUDA_HOME)"
    return None


def kv_dtype(dtype) -> int:
    """The KvDtype enum value of a torch dtype."""
    return KV_DTYPES[str(dtype).split(".")[-1]]


def build(tag: str, source: str, *, shared: bool, src_dir: Path | str | None = None, parts: int = 0,
          jobs: int = 1, keep: int = 2, verbose: bool = False) -> tuple[Path, float, bool]:
    """Compiles tools/cuda_emu/``source`` (a shared library when ``shared``, else a
    program) against the emulation copy of the kernel headers of ``src_dir``
    (default csrc/include/kvkern; e.g. a copy with a planted bug), unless the same
    build is cached. ``parts`` > 0: the source is compiled parts + 1 times with
    KVKERN_EMU_PART = 0..parts (KVKERN_EMU_PARTS = parts), ``jobs`` at a time, and
    linked. Keeps the newest ``keep`` builds of ``tag``. Returns (path, seconds,
    cached); raises EmulatorError (the build failed) or gen.PatchError."""
    t0 = time.monotonic()
    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        raise EmulatorError(f"no CUDA headers in {cuda_home() / 'include'} (set CUDA_HOME)")
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise EmulatorError(f"no C++ compiler {cxx!r} on PATH (set CXX)")
    files = gen.emulation_headers(src_dir) if src_dir is not None else gen.emulation_headers()
    flags = list(CXXFLAGS)
    if os.uname().machine in ("x86_64", "AMD64"):
        flags.append("-fcf-protection=none")  # the fibers switch stacks by hand (no shadow stack)
    if shared:
        flags += ["-fPIC", "-shared"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    src = HERE / source
    h = hashlib.sha256()
    for item in [src.read_text(), *[(HERE / f).read_text() for f in RUNTIME_FILES], sorted(files.items()), flags,
                 version, parts, str(cuda_inc), [(cuda_inc / f).stat().st_mtime_ns for f in REQUIRED_CUDA_HEADERS]]:
        h.update(repr(item).encode())
    out = BUILD_DIR / f"{tag}-{h.hexdigest()[:16]}"
    target = out / (f"libkvkern_{tag}.so" if shared else tag)
    if target.is_file():
        return target, time.monotonic() - t0, True

    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{tag}.tmp", dir=BUILD_DIR))
    try:
        inc = gen.write_headers(files, tmp / "include")
        base = [cxx, *flags, f"-I{inc}", f"-I{cuda_inc}", f"-I{HERE}"]
        if parts:
            objs = [tmp / f"part{p}.o" for p in range(parts + 1)]
            cmds = [[*base, f"-DKVKERN_EMU_PARTS={parts}", f"-DKVKERN_EMU_PART={p}", "-c", str(src), "-o", str(o)]
                    for p, o in enumerate(objs)]
            cmds.append([cxx, *map(str, objs), "-o", str(tmp / target.name), "-ldl"])
        else:
            cmds = [[*base, str(src), "-o", str(tmp / target.name), "-ldl"]]

        def compile_one(cmd):
            if verbose:
                print(" ".join(cmd), flush=True)
            return subprocess.run(cmd, capture_output=True, text=True)

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(compile_one, cmds[:-1]))
        results.append(compile_one(cmds[-1]))  # the link (or the one compile) after the objects
        for cmd, r in zip(cmds, results):
            if r.returncode != 0 or r.stderr.strip():  # a warning fails the build too
                raise EmulatorError(f"{' '.join(cmd)}\n{r.stderr[-20000:]}")
        try:
            tmp.rename(out)
        except OSError:  # built meanwhile by another process
            if not target.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    old = sorted((d for d in BUILD_DIR.iterdir() if d.is_dir() and d.name.startswith(f"{tag}-") and d != out),
                 key=lambda d: d.stat().st_mtime, reverse=True)
    for d in old[max(0, keep - 1):]:
        shutil.rmtree(d, ignore_errors=True)
    return target, time.monotonic() - t0, False


class EmuLibrary:
    """A loaded ctypes emulator library with emu_capi.h's C API, and the driver
    side of one run: tensors as fields, readable buffers, status -> exceptions."""

    def __init__(self, path: Path, extra: dict | None = None):
        lib = ctypes.CDLL(str(path))
        sig = {  # name: (restype, argtypes)
            "emu_free": (None, [ctypes.c_void_p]),
            "emu_set": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_double]),
            "emu_set_ptr": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]),
            "emu_allow": (None, [ctypes.c_void_p, ctypes.c_size_t]),
            "emu_clear_allowed": (None, []),
            "emu_error": (ctypes.c_char_p, []),
            "emu_launches": (ctypes.c_char_p, []),
            **(extra or {}),
        }
        for name, (restype, argtypes) in sig.items():
            fn = getattr(lib, name)
            fn.restype = restype
            if argtypes is not None:
                fn.argtypes = argtypes
        self.lib = lib

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def error(self) -> str:
        return self.lib.emu_error().decode()

    def set_fields(self, handle, fields: dict, where: str = "", enums: dict | None = None) -> list:
        """Sets each field of ``handle``: a tensor (its data pointer; kept alive in
        the returned list), None (a null pointer), an enum name (``enums``) or a number."""
        import torch

        kept = []
        for name, value in fields.items():
            if isinstance(value, torch.Tensor) or value is None:
                if value is not None:
                    kept.append(value)
                rc = self.lib.emu_set_ptr(handle, name.encode(), None if value is None else value.data_ptr())
            else:
                if isinstance(value, str):
                    value = enums[name][value]
                rc = self.lib.emu_set(handle, name.encode(), float(value))
            if rc != 0:
                raise KeyError(f"{where}{name}: {self.error()}")
        return kept

    def allow(self, tensors) -> None:
        """Only these tensors (their storage from their first element on) may be read."""
        self.lib.emu_clear_allowed()
        for t in tensors:
            if t is not None:
                self.lib.emu_allow(t.data_ptr(), t.untyped_storage().nbytes() - t.storage_offset() * t.element_size())

    def check(self, op: str, rc: int) -> list[str]:
        """emu_run's status as the launches ("kernel blocks threads smem" lines) or an exception."""
        launches = self.lib.emu_launches().decode().splitlines()
        if rc == 2:
            raise Refused(f"{op}: {self.error()}")
        if rc != 0:
            raise EmulatorError(f"{op}: {self.error()}\nlaunches:\n" + "\n".join(launches))
        return launches
