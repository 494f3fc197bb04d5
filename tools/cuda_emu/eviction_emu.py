# SPDX-License-Identifier: Apache-2.0
"""Runs kvkern's CUDA score-and-evict kernels on the CPU (tools/cuda_emu/eviction_emu.cpp).

``load()`` builds (once; cached under build/cuda_emu/eviction_emu-<hash>/ by
emu_build.py) and loads the emulator library: the real kernel headers (the
emulation copy tools/cuda_emu/gen.py makes), compiled by g++ with the CUDA
headers. ``Handle`` fills one of the parameter structs of eviction_params.h /
eviction_launch.h by field name from torch CPU tensors; ``run`` runs a launch
sequence (run_window_scores, run_select_keep, run_compact, run_evict,
run_score_evict) with every kernel emulated block by block.

Used by tests/test_cuda_eviction_kernels.py; importing this module needs torch
only for ``Handle`` and ``run``.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import emu_build  # noqa: E402
from emu_build import EmulatorError, Refused, available, cuda_include_dir, kv_dtype  # noqa: E402,F401

ENUMS = {
    "query_reduce": {"mean": 0, "sum": 1},
    "group_reduce": {"mean": 0, "max": 1, "mean_all": 2, "max_per_query": 3},
    "pool": {"none": 0, "avg": 1, "max": 2},
    "hist_mode": {"max": 0, "ema": 1, "sum": 2},
}


def build(verbose: bool = False, src_dir: Path | str | None = None) -> Path:
    """Compiles the emulator library if needed; returns its path. ``src_dir``: a
    kernel header directory other than csrc/include/kvkern (e.g. a copy with a
    planted bug)."""
    why = available()
    if why:
        raise EmulatorError(f"cannot build the eviction emulator: {why}")
    return emu_build.build("eviction_emu", "eviction_emu.cpp", shared=True, src_dir=src_dir, verbose=verbose)[0]


_LIBS: dict = {}


def load(src_dir: Path | str | None = None) -> emu_build.EmuLibrary:
    key = str(src_dir)
    if key not in _LIBS:
        _LIBS[key] = emu_build.EmuLibrary(build(src_dir=src_dir), {
            "emu_new": (ctypes.c_void_p, [ctypes.c_char_p]),
            "emu_workspace_bytes": (ctypes.c_longlong, [ctypes.c_void_p, ctypes.c_int]),
            "emu_run": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_void_p]),
        })
    return _LIBS[key]


class Handle:
    """One parameter struct ("window_scores", "select", "compact", "score_evict")."""

    def __init__(self, kind: str, fields: dict, src_dir: Path | str | None = None):
        self.lib = load(src_dir)
        self.kind = kind
        self.h = self.lib.emu_new(kind.encode())
        if not self.h:
            raise ValueError(kind)
        self.tensors = self.lib.set_fields(self.h, fields, f"{kind}.", ENUMS)

    def workspace_bytes(self, dtype) -> int:
        return int(self.lib.emu_workspace_bytes(self.h, kv_dtype(dtype)))

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
    ws_ptr = ws.data_ptr() + (-ws.data_ptr()) % 256
    lib.allow([*handle.tensors, *(compact.tensors if compact is not None else []), *allow])
    lib.emu_allow(ws_ptr, nbytes)
    rc = lib.emu_run(handle.h, op.encode(), kv_dtype(dtype), ws_ptr, compact.h if compact is not None else None)
    return lib.check(op, rc)


if __name__ == "__main__":
    print(build(verbose=True))
