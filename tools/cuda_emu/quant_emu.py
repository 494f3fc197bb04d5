# SPDX-License-Identifier: Apache-2.0
"""Runs kvkern's CUDA quantized-KV and FP8-cache kernels on the CPU (tools/cuda_emu/quant_emu.cpp).

``build()`` compiles (once; cached under build/cuda_emu/quant_emu-<hash>/ by
emu_build.py) the emulator library from the real kernel headers (the emulation
copy tools/cuda_emu/gen.py makes) with g++ and the CUDA headers. ``run`` fills
QuantKVParams (quant_params.h) from torch CPU tensors, as the torch glue
would (strides in elements), and runs one launch sequence ("attention",
"quantize", "append") with every kernel emulated block by block, thread by
thread; ``run_fp8`` does the same for Fp8KVParams (fp8_params.h). Used by
tests/test_cuda_quant_kernels.py.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import emu_build  # noqa: E402
from emu_build import EmulatorError, Refused, available, kv_dtype  # noqa: E402,F401

FIELDS = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_res", "v_res")


def build(verbose: bool = False) -> Path:
    why = available()
    if why:
        raise EmulatorError(f"cannot build the quant emulator: {why}")
    return emu_build.build("quant_emu", "quant_emu.cpp", shared=True, verbose=verbose)[0]


_LIB = None


def load() -> emu_build.EmuLibrary:
    global _LIB
    if _LIB is None:
        _LIB = emu_build.EmuLibrary(build(), {
            "emu_new": (ctypes.c_void_p, []),
            "emu_new_fp8": (ctypes.c_void_p, []),
            "emu_default_splits": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
            "emu_fp8_default_splits": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
            "emu_workspace_bytes": (ctypes.c_longlong, [ctypes.c_void_p, ctypes.c_int]),
            "emu_run": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]),
        })
    return _LIB


def _strides(t, n: int = 3) -> tuple:
    """The first n strides of t (0 past its dims): [B, H, rows, cols] -> (sb, sh, sr)."""
    return tuple((list(t.stride()) + [0] * n)[:n])


def _ref(name: str, t, suffixes=("sb", "sh", "sr")) -> dict:
    """A tensor ref's fields: the data and its strides."""
    return {name: t, **{f"{name}_{s}": v for s, v in zip(suffixes, _strides(t, len(suffixes)))}}


def _attention_fields(q, D: int, sm_scale) -> tuple[dict, object, object]:
    """q and fresh NaN-filled out / lse; returns (fields, out, lse)."""
    import torch

    B, Hq = q.shape[0], q.shape[1]
    out = torch.full((B, Hq, D), float("nan"), dtype=q.dtype)
    lse = torch.full((B, Hq), float("nan"), dtype=torch.float32)
    fields = {**_ref("q", q, ("sb", "sh")), "num_q_heads": Hq, "out": out, "lse": lse,
              "sm_scale": sm_scale if sm_scale is not None else D ** -0.5}
    return fields, out, lse


def _run(lib, h, op: str, dtype, kept: list, ws=None) -> list[str]:
    """Lets the kernels read the ``kept`` tensors (and ``ws``, a uint8 tensor, from
    a 256-byte aligned start) and runs ``op``; returns the launch lines."""
    lib.allow(kept)
    ws_ptr = None
    if ws is not None:
        ws_ptr = ws.data_ptr() + (-ws.data_ptr()) % 256
        lib.emu_allow(ws_ptr, ws.numel() - 256)
    return lib.check(op, lib.emu_run(h, op.encode(), kv_dtype(dtype), ws_ptr))


def run(op: str, cache: dict, lengths, bits: int, group: int, *, q=None, sm_scale=None, num_splits=0,
        k=None, v=None, k_new=None, v_new=None, seed=1, block_order=2, deferred=True, ws_fill=0x7f,
        kernel_variant=0, smem_limit=None):
    """Runs ``op`` on CPU tensors (cache: the layout's dict, mutated in place for
    "quantize" / "append"). "attention" returns (out, lse, launches); the others
    return the launch lines."""
    import torch

    lib = load()
    h = lib.emu_new()
    try:
        B, H, _, D = cache["k_codes"].shape
        fields = {}
        for f in FIELDS:
            fields.update(_ref(f, cache[f]))
        for f in ("k_mean", "v_mean"):
            t = cache.get(f)
            fields.update(_ref(f, t, ("sb", "sr")) if t is not None else {f: None})
        fields.update(_ref("lengths", lengths, ("sb", "sh")))
        fields.update(batch=B, num_kv_heads=H, capacity=cache["k_scale"].shape[2] * group, head_dim=D,
                      residual=cache["k_res"].shape[2], bits=bits, group=group, seed=seed, block_order=block_order,
                      deferred=deferred, dtype=kv_dtype(cache["k_res"].dtype))
        if smem_limit is not None:  # the device's opt-in shared memory per block (default: an H100's)
            fields["smem_limit"] = smem_limit
        out = lse = ws = None
        if op == "attention":
            more, out, lse = _attention_fields(q, D, sm_scale)
            fields.update(more, kernel_variant=kernel_variant)
        elif op == "quantize":
            fields.update(**_ref("k_in", k), **_ref("v_in", v), seq_len=k.shape[2])
        elif op == "append":
            fields.update(**_ref("k_new", k_new, ("sb", "sh")), **_ref("v_new", v_new, ("sb", "sh")))
        kept = lib.set_fields(h, fields)
        if op == "attention":
            S = num_splits or lib.emu_default_splits(h, 132)
            lib.set_fields(h, {"num_splits": S})
            ws = torch.full((lib.emu_workspace_bytes(h, S) + 256,), ws_fill, dtype=torch.uint8)
        launches = _run(lib, h, op, cache["k_res"].dtype, kept, ws)
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
    try:
        B, H, C, D = k_fp8.shape
        fields = {**_ref("k_fp8", k_fp8), **_ref("v_fp8", v_fp8), "k_scale": k_scale, "v_scale": v_scale,
                  "k_scale_stride": k_scale.stride(0), "v_scale_stride": v_scale.stride(0),
                  **_ref("lengths", lengths, ("sb", "sh")), "batch": B, "num_kv_heads": H, "capacity": C,
                  "head_dim": D, "seed": seed, "block_order": block_order, "deferred": deferred}
        out = lse = None
        if op == "attention":
            dtype = q.dtype
            more, out, lse = _attention_fields(q, D, sm_scale)
            fields.update(more)
        else:
            dtype = k.dtype
            fields.update(**_ref("k_in", k), **_ref("v_in", v))
            if op == "quantize":
                fields["in_tokens"] = k.shape[2]
        kept = lib.set_fields(h, fields)
        if op == "attention":
            S = num_splits or lib.emu_fp8_default_splits(h, 132)
            kept += lib.set_fields(h, {"num_splits": S, **({
                "partial_out": torch.full((B, q.shape[1], S, D), float("nan")),
                "partial_lse": torch.full((B, q.shape[1], S), float("nan"))} if S > 1 else {})})
        launches = _run(lib, h, f"fp8_{op}", dtype, kept)
        return (out, lse, launches) if op == "attention" else launches
    finally:
        lib.emu_free(h)


if __name__ == "__main__":
    print(build(verbose=True))
