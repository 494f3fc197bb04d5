# SPDX-License-Identifier: Apache-2.0
"""Emulation copy of the CUDA kernel headers, for the emulators of tools/cuda_emu (emu_build.py).

The kernels are compiled for the host by g++ as they are, except:
  * common.cuh: the pre-sm_80 fallback of each cp.async primitive (a plain
    copy; commit / wait do nothing) becomes a call into the emulator
    (``kvkern_emu::cp_async / commit / wait`` of emu_runtime.h), which checks and
    defers the copy;
  * decode_attention.cuh: everything after the kernels (the host launchers,
    which use ``<<<>>>``) is cut off.

Every substitution must match exactly once, and the sources are checked for
constructs the emulator would silently mis-handle (another cp.async primitive,
``__CUDA_ARCH__``-dependent code in the kernels, a kernel after the cut). Any
mismatch raises :class:`PatchError` naming the file and the pattern, so the
emulator never tests stale or half-patched code: update this file together with
the kernels.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIR = REPO / "csrc" / "include" / "kvkern"  # the real headers

HEADER_SUFFIXES = (".h", ".cuh")


class PatchError(RuntimeError):
    """The kernel sources no longer match what the emulator patches."""


def substitute(text: str, old: str, new: str, where: str) -> str:
    """Replaces ``old`` by ``new``; ``old`` must occur exactly once."""
    n = text.count(old)
    if n != 1:
        raise PatchError(
            f"{where}: expected exactly one occurrence of\n    {old!r}\nfound {n}. The kernel source changed under the "
            f"emulator: update the patterns in tools/cuda_emu/gen.py (and the hooks in emu_runtime.h) to match.")
    return text.replace(old, new)


# (file, old, new): the cp.async host fallbacks -> emulator hooks.
_CP_ASYNC_PATCHES = (
    ("common.cuh",
     "*static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gmem_src);",
     "::kvkern_emu::cp_async(smem_dst, gmem_src, 16);"),
    ("common.cuh",
     "*static_cast<uint32_t*>(smem_dst) = *static_cast<const uint32_t*>(gmem_src);",
     "::kvkern_emu::cp_async(smem_dst, gmem_src, 4);"),
    ("common.cuh",
     'asm volatile("cp.async.commit_group;\\n" ::: "memory");\n#endif',
     'asm volatile("cp.async.commit_group;\\n" ::: "memory");\n#else\n  ::kvkern_emu::commit();\n#endif'),
    ("common.cuh",
     'asm volatile("cp.async.wait_group %0;\\n" ::"n"(N) : "memory");\n#endif',
     'asm volatile("cp.async.wait_group %0;\\n" ::"n"(N) : "memory");\n#else\n  ::kvkern_emu::wait(N);\n#endif'),
)

# Where the kernels end in decode_attention.cuh; the launchers after it are dropped.
_KERNELS_END = "}  // namespace decode_attention_detail"


def _check_no_arch_code(text: str, where: str, allowed: int = 0) -> None:
    n = text.count("__CUDA_ARCH__")
    if n != allowed:
        raise PatchError(
            f"{where}: {n} mentions of __CUDA_ARCH__ (the emulator accounts for {allowed}): the host compile would take "
            f"the non-device branch of new architecture-dependent code. Teach tools/cuda_emu/gen.py about it.")


def emulation_headers(src_dir: Path | str = SOURCE_DIR) -> dict[str, str]:
    """The patched headers: {file name: text}, for every header of ``src_dir``."""
    src_dir = Path(src_dir)
    files = {p.name: p.read_text() for p in sorted(src_dir.iterdir()) if p.suffix in HEADER_SUFFIXES}
    for required in ("common.cuh", "decode_attention.cuh", "decode_attention_launch.h", "decode_attention_params.h"):
        if required not in files:
            raise PatchError(f"{src_dir}: {required} is missing")

    # common.cuh: every cp.async asm statement must be one the emulator hooks.
    common = files["common.cuh"]
    n_asm = common.count('asm volatile("cp.async')
    if n_asm != len(_CP_ASYNC_PATCHES):
        raise PatchError(f"common.cuh: {n_asm} cp.async asm statements, the emulator hooks {len(_CP_ASYNC_PATCHES)}: "
                         f"update tools/cuda_emu/gen.py and emu_runtime.h")
    _check_no_arch_code(common, "common.cuh", allowed=2 * len(_CP_ASYNC_PATCHES))  # `defined(...) && ... >= 800`
    for name, old, new in _CP_ASYNC_PATCHES:
        files[name] = substitute(files[name], old, new, name)

    # decode_attention.cuh: keep the kernels, drop the host launchers.
    da = files["decode_attention.cuh"]
    _check_no_arch_code(da, "decode_attention.cuh")
    n = da.count(_KERNELS_END)
    if n != 1:
        raise PatchError(f"decode_attention.cuh: expected exactly one {_KERNELS_END!r} (where the kernels end), found {n}")
    cut = da.index(_KERNELS_END) + len(_KERNELS_END)
    tail = da[cut:]
    if "__global__" in tail or "__device__" in tail:
        raise PatchError("decode_attention.cuh: device code after the end of namespace decode_attention_detail would be "
                         "cut off with the launchers: move it into the namespace or update tools/cuda_emu/gen.py")
    if not tail.rstrip().endswith("}  // namespace kvkern"):
        raise PatchError("decode_attention.cuh: expected the file to end with '}  // namespace kvkern'")
    files["decode_attention.cuh"] = (
        da[:cut] + "\n// (tools/cuda_emu/gen.py: the host launchers are cut off here)\n}  // namespace kvkern\n")

    for name in files:
        if name not in ("common.cuh", "decode_attention.cuh"):
            _check_no_arch_code(files[name], name)
    return files


def write_headers(files: dict[str, str], include_root: Path | str) -> Path:
    """Writes ``files`` under ``include_root/kvkern/``; returns ``include_root``."""
    include_root = Path(include_root)
    d = include_root / "kvkern"
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return include_root
