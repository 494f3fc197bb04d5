# SPDX-License-Identifier: Apache-2.0
"""Runs kvkern's CUDA quantized-KV kernels on the CPU (tools/cuda_emu/quant_emu.cpp).

``build()`` compiles (once; cached under build/cuda_emu/quant-<hash>/) the
emulator library from the real kernel headers (the emulation copy
tools/cuda_emu/gen.py makes) with g++ and the CUDA headers. ``run`` fills
QuantKVParams (quant_params.h) from torch CPU tensors, as the torch glue
would (strides in elements), and runs one launch sequence ("attention",
"quantize", "append") with every kernel emulated block by block, thread by
thread. Used by tests/test_cuda_quant_kernels.py.
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
BUILD_DIR = HERE.parents[1] / "build" / "cuda_emu"
sys.path.insert(0, str(HERE))
import eviction_emu  # noqa: E402  (cuda_include_dir / available / CXXFLAGS: the same toolchain checks)
import gen  # noqa: E402

KV_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}
available = eviction_emu.available
FIELDS = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_res", "v_res")


class EmulatorError(RuntimeError):
    """The emulated kernels misbehaved (a violation, a deadlock) or the build failed."""


class Refused(RuntimeError):
    """The launch sequence returned cudaErrorInvalidValue before launching anything."""


def build(verbose: bool = False) -> Path:
    why = available()
    if why:
        raise EmulatorError(f"cannot build the quant emulator: {why}")
    cuda_inc = eviction_emu.cuda_include_dir()
    files = gen.emulation_headers()
    cxx = os.environ.get("CXX", "g++")
    src = HERE / "quant_emu.cpp"
    h = hashlib.sha256()
    for item in [src.read_text(), sorted(files.items()), eviction_emu.CXXFLAGS, str(cuda_inc)]:
        h.update(repr(item).encode())
    out = BUILD_DIR / f"quant-{h.hexdigest()[:16]}"
    lib = out / "libkvkern_quant_emu.so"
    if lib.is_file():
        return lib
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="quant.tmp", dir=BUILD_DIR))
    try:
        inc = gen.write_headers(files, tmp / "include")
        cmd = [cxx, *eviction_emu.CXXFLAGS, f"-I{inc}", f"-I{cuda_inc}", str(src), "-o", str(tmp / lib.name), "-ldl"]
        if verbose:
            print(" ".join(cmd), flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or r.stderr.strip():
            raise EmulatorError(f"{' '.join(cmd)}\n{r.stderr[-20000:]}")
        try:
            tmp.rename(out)
        except OSError:
            if not lib.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return lib


_LIB = None


def load() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(str(build()))
        lib.emu_new.restype = ctypes.c_void_p
        lib.emu_free.argtypes = [ctypes.c_void_p]
        lib.emu_set.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_double]
        lib.emu_set_ptr.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        lib.emu_allow.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.emu_error.restype = ctypes.c_char_p
        lib.emu_launches.restype = ctypes.c_char_p
        lib.emu_default_splits.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.emu_workspace_bytes.restype = ctypes.c_longlong
        lib.emu_workspace_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.emu_run.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
        lib.emu_new_fp8.restype = ctypes.c_void_p
        lib.emu_fp8_default_splits.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _LIB = lib
    return _LIB


def _strides3(t):  # [B, H, rows, cols] -> (sb, sh, sr)
    return t.stride(0), t.stride(1), t.stride(2)


def run(op: str, cache: dict, lengths, bits: int, group: int, *, q=None, sm_scale=None, num_splits=0,
        k=None, v=None, k_new=None, v_new=None, seed=1, block_order=2, deferred=True, ws_fill=0x7f):
    """Runs ``op`` on CPU tensors (cache: the layout's dict, mutated in place for
    "quantize" / "append"). "attention" returns (out, lse, launches); the others
    return the launch lines."""
    import torch

    lib = load()
    h = lib.emu_new()
    keep = []

    def ptr(name, t):
        keep.append(t)
        assert lib.emu_set_ptr(h, name.encode(), None if t is None else t.data_ptr()) == 0, lib.emu_error()

    def num(name, x):
        assert lib.emu_set(h, name.encode(), float(x)) == 0, lib.emu_error()

    try:
        kc = cache["k_codes"]
        B, H, _, D = kc.shape
        R = cache["k_res"].shape[2]
        C = cache["k_scale"].shape[2] * group
        dtype = cache["k_res"].dtype
        for f in FIELDS:
            ptr(f, cache[f])
            for s, val in zip(("sb", "sh", "sr"), _strides3(cache[f])):
                num(f"{f}_{s}", val)
        for f in ("k_mean", "v_mean"):
            t = cache.get(f)
            ptr(f, t)
            if t is not None:
                num(f"{f}_sb", t.stride(0))
                num(f"{f}_sr", t.stride(1))
        ptr("lengths", lengths)
        num("lengths_sb", lengths.stride(0))
        num("lengths_sh", lengths.stride(1))
        for name, val in (("batch", B), ("num_kv_heads", H), ("capacity", C), ("head_dim", D), ("residual", R),
                          ("bits", bits), ("group", group), ("seed", seed), ("block_order", block_order),
                          ("deferred", deferred)):
            num(name, val)
        ws = None
        out = lse = None
        if op == "attention":
            Hq = q.shape[1]
            ptr("q", q)
            num("q_sb", q.stride(0))
            num("q_sh", q.stride(1))
            num("num_q_heads", Hq)
            out = torch.full((B, Hq, D), float("nan"), dtype=q.dtype)
            lse = torch.full((B, Hq), float("nan"), dtype=torch.float32)
            ptr("out", out)
            ptr("lse", lse)
            num("sm_scale", sm_scale if sm_scale is not None else D ** -0.5)
            S = num_splits or lib.emu_default_splits(h, 132)
            num("num_splits", S)
            nbytes = lib.emu_workspace_bytes(h, S)
            ws = torch.full((nbytes + 256,), ws_fill, dtype=torch.uint8)
        elif op == "quantize":
            for name, t in (("k_in", k), ("v_in", v)):
                ptr(name, t)
                for s, val in zip(("sb", "sh", "sr"), _strides3(t)):
                    num(f"{name}_{s}", val)
            num("seq_len", k.shape[2])
        elif op == "append":
            for name, t in (("k_new", k_new), ("v_new", v_new)):
                ptr(name, t)
                num(f"{name}_sb", t.stride(0))
                num(f"{name}_sh", t.stride(1))
        lib.emu_clear_allowed()
        for t in keep:
            if t is not None:
                lib.emu_allow(t.data_ptr(), t.untyped_storage().nbytes() - t.storage_offset() * t.element_size())
        ws_ptr = None
        if ws is not None:
            ws_ptr = ws.data_ptr() + (-ws.data_ptr()) % 256
            lib.emu_allow(ws_ptr, ws.numel() - 256)
        rc = lib.emu_run(h, op.encode(), KV_DTYPES[str(dtype).split(".")[-1]], ws_ptr)
        launches = lib.emu_launches().decode().splitlines()
        if rc == 2:
            raise Refused(f"{op}: {lib.emu_error().decode()}")
        if rc != 0:
            raise EmulatorError(f"{op}: {lib.emu_error().decode()}\nlaunches:\n" + "\n".join(launches))
        return (out, lse, launches) if op == "attention" else launches
    finally:
        lib.emu_free(h)


def run_fp8(op: str, k_fp8, v_fp8, k_scale, v_scale, lengths, *, q=None, sm_scale=None, num_splits=0, k=None,
            v=None, seed=1, block_order=2, deferred=True):
    """The FP8 cache's CUDA launch sequences (fp8_kv.cuh) on CPU tensors: op "attention"
    returns (out, lse, launches); "quantize" (k, v [B, Hkv, T, D]) and "append" (k, v the new
    tokens [B, Hkv, D]) mutate k_fp8 / v_fp8 (and lengths) and return the launch lines.
    dtype: that of q (attention) or k."""
    import torch

    lib = load()
    h = lib.emu_new_fp8()
    keep = []

    def ptr(name, t):
        keep.append(t)
        assert lib.emu_set_ptr(h, name.encode(), None if t is None else t.data_ptr()) == 0, lib.emu_error()

    def num(name, x):
        assert lib.emu_set(h, name.encode(), float(x)) == 0, lib.emu_error()

    try:
        B, H, C, D = k_fp8.shape
        for name, t in (("k_fp8", k_fp8), ("v_fp8", v_fp8)):
            ptr(name, t)
            for s, val in zip(("sb", "sh", "sr"), _strides3(t)):
                num(f"{name}_{s}", val)
        ptr("k_scale", k_scale)
        ptr("v_scale", v_scale)
        num("k_scale_stride", k_scale.stride(0))
        num("v_scale_stride", v_scale.stride(0))
        ptr("lengths", lengths)
        num("lengths_sb", lengths.stride(0))
        num("lengths_sh", lengths.stride(1))
        for name, val in (("batch", B), ("num_kv_heads", H), ("capacity", C), ("head_dim", D), ("seed", seed),
                          ("block_order", block_order), ("deferred", deferred)):
            num(name, val)
        out = lse = None
        if op == "attention":
            dtype = q.dtype
            Hq = q.shape[1]
            ptr("q", q)
            num("q_sb", q.stride(0))
            num("q_sh", q.stride(1))
            num("num_q_heads", Hq)
            out = torch.full((B, Hq, D), float("nan"), dtype=q.dtype)
            lse = torch.full((B, Hq), float("nan"), dtype=torch.float32)
            ptr("out", out)
            ptr("lse", lse)
            num("sm_scale", sm_scale if sm_scale is not None else D ** -0.5)
            S = num_splits or lib.emu_fp8_default_splits(h, 132)
            num("num_splits", S)
            if S > 1:
                ptr("partial_out", torch.full((B, Hq, S, D), float("nan")))
                ptr("partial_lse", torch.full((B, Hq, S), float("nan")))
        else:
            dtype = k.dtype
            for name, t in (("k_in", k), ("v_in", v)):
                ptr(name, t)
                st = list(t.stride()) + [0]
                for s, val in zip(("sb", "sh", "sr"), st[:3]):
                    num(f"{name}_{s}", val)
            if op == "quantize":
                num("in_tokens", k.shape[2])
        lib.emu_clear_allowed()
        for t in keep:
            if t is not None:
                lib.emu_allow(t.data_ptr(), t.untyped_storage().nbytes() - t.storage_offset() * t.element_size())
        rc = lib.emu_run(h, f"fp8_{op}".encode(), KV_DTYPES[str(dtype).split(".")[-1]], None)
        launches = lib.emu_launches().decode().splitlines()
        if rc == 2:
            raise Refused(f"fp8_{op}: {lib.emu_error().decode()}")
        if rc != 0:
            raise EmulatorError(f"fp8_{op}: {lib.emu_error().decode()}\nlaunches:\n" + "\n".join(launches))
        return (out, lse, launches) if op == "attention" else launches
    finally:
        lib.emu_free(h)


if __name__ == "__main__":
    print(build(verbose=True))
