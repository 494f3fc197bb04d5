# SPDX-License-Identifier: Apache-2.0
"""The CUDA C++ decode-attention kernels (csrc/include/kvkern/decode_attention*.{cuh,h}).

On any machine with g++ and the CUDA headers (no GPU):
  * kvkern/cuda_variants.py, the autotuner's mirror of the compiled variants,
    matches the C++ header (variant list, stage limits, heads tile, shared memory);
  * the kernels run in the fiber emulator, tools/cuda_emu/run.py --quick.
On a GPU (marked gpu): every config of the search space runs and matches the
fp64 reference, and unsupported configs are refused with an error naming the
argument.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvkern
from kvkern import cuda_variants, reference

from utils import LSE_TOLERANCES, TOLERANCES, assert_verbose_allclose, make_decode_inputs

ROOT = Path(__file__).resolve().parents[1]
HEADER_DIR = ROOT / "csrc" / "include" / "kvkern"
LAUNCH_H = HEADER_DIR / "decode_attention_launch.h"
EMU_DIR = ROOT / "tools" / "cuda_emu"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


emu_run = _load("kvkern_cuda_emu_run", EMU_DIR / "run.py")
emu_gen = _load("kvkern_cuda_emu_gen", EMU_DIR / "gen.py")

CUDA_INC = emu_run.cuda_include_dir()
CXX = shutil.which("g++")
needs_headers = pytest.mark.skipif(CUDA_INC is None, reason=f"no CUDA headers in {emu_run.cuda_home() / 'include'}")
needs_compiler = pytest.mark.skipif(CXX is None or CUDA_INC is None,
                                    reason="needs g++ and the CUDA headers (CUDA_HOME or /usr/local/cuda)")
DTYPES = {torch.float32: "kFloat32", torch.float16: "kFloat16", torch.bfloat16: "kBFloat16"}


# ---------------------------------------------------------------------------
# The Python mirror against the C++ header.
# ---------------------------------------------------------------------------
def _header_variants() -> list[tuple[int, int]]:
    text = LAUNCH_H.read_text()
    m = re.search(r"#define KVKERN_DECODE_ATTENTION_VARIANTS\(X\)((?:[^\n]*\\\n)*[^\n]*)", text)
    assert m, f"no KVKERN_DECODE_ATTENTION_VARIANTS in {LAUNCH_H}"
    return [(int(a), int(b)) for a, b in re.findall(r"X\(\s*(\d+)\s*,\s*(\d+)\s*\)", m.group(1))]


def _header_constant(name: str) -> int:
    m = re.search(rf"constexpr int {name} = (\d+);", LAUNCH_H.read_text())
    assert m, f"no {name} in {LAUNCH_H}"
    return int(m.group(1))


def test_variants_match_the_header():
    variants = _header_variants()
    assert variants, "empty variant list"
    assert tuple(variants) == cuda_variants.SUPPORTED_VARIANTS, \
        f"kvkern/cuda_variants.py SUPPORTED_VARIANTS {cuda_variants.SUPPORTED_VARIANTS} != the header's {variants}"
    lo, hi = _header_constant("kDecodeAttentionMinStages"), _header_constant("kDecodeAttentionMaxStages")
    assert cuda_variants.SUPPORTED_NUM_STAGES == tuple(range(lo, hi + 1))
    for bn, nw in variants:  # the header's own rule for a pair
        assert bn % (nw * 4) == 0, (bn, nw)


_SMEM_PROGRAM = r"""
#include <cstdio>
#include <kvkern/decode_attention_launch.h>
int main() {
  long d, g;
  int dt, bn, nw, st;
  while (std::scanf("%ld %d %ld %d %d %d", &d, &dt, &g, &bn, &nw, &st) == 6)
    std::printf("%zu %d %ld %d\n",
                kvkern::decode_attention_smem_bytes(d, static_cast<kvkern::KvDtype>(dt), g, bn, nw, st),
                kvkern::decode_attention_heads_tile(g), static_cast<long>(kvkern::decode_attention_head_chunks(g)),
                kvkern::decode_attention_variant_supported(bn, nw) ? 1 : 0);
  return 0;
}
"""


@needs_compiler
def test_smem_bytes_and_heads_tile_match_the_cpp(tmp_path):
    src = tmp_path / "smem.cpp"
    src.write_text(_SMEM_PROGRAM)
    exe = tmp_path / "smem"
    r = subprocess.run([CXX, "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}", f"-I{CUDA_INC}", str(src), "-o", str(exe)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dt_index = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # enum class KvDtype
    header_dt = re.search(r"enum class KvDtype : int \{([^}]*)\}", LAUNCH_H.read_text()).group(1)
    for dt, idx in dt_index.items():
        assert f"{DTYPES[dt]} = {idx}" in header_dt, header_dt
    block_ns = sorted({bn for bn, _ in cuda_variants.SUPPORTED_VARIANTS} | {8, 48, 128})
    warps = sorted({nw for _, nw in cuda_variants.SUPPORTED_VARIANTS} | {1, 2, 16})
    grid = list(itertools.product((64, 128, 256), dt_index, (1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 64), block_ns, warps,
                                  (1, 2, 3, 4, 5)))
    stdin = "".join(f"{d} {dt_index[dt]} {g} {bn} {nw} {st}\n" for d, dt, g, bn, nw, st in grid)
    r = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True)
    rows = r.stdout.splitlines()
    assert len(rows) == len(grid)
    mismatches = []
    for (d, dt, g, bn, nw, st), row in zip(grid, rows):
        smem, ht, chunks, supported = map(int, row.split())
        py = (cuda_variants.smem_bytes(d, dt, g, bn, nw, st), cuda_variants.heads_tile(g), -(-g // cuda_variants.heads_tile(g)),
              int(cuda_variants.is_supported(bn, nw)))
        if py != (smem, ht, chunks, supported):
            mismatches.append(f"D={d} {dt} G={g} block_n={bn} num_warps={nw} stages={st}: python {py}, "
                              f"C++ {(smem, ht, chunks, supported)}")
    assert not mismatches, f"{len(mismatches)} of {len(grid)} differ, e.g.\n" + "\n".join(mismatches[:10])


# ---------------------------------------------------------------------------
# The emulator.
# ---------------------------------------------------------------------------
def test_emulator_tolerances_are_the_test_tables():
    tols = emu_run.tolerances()
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    assert tols["TOLERANCES"] == {names[k]: v for k, v in TOLERANCES.items()}
    assert tols["LSE_TOLERANCES"] == {names[k]: v for k, v in LSE_TOLERANCES.items()}


def test_emulator_patches_fail_loudly_on_changed_sources(tmp_path):
    # The patched copy never silently tests stale code: a pattern that no longer
    # matches exactly once is an error naming it.
    files = emu_gen.emulation_headers(HEADER_DIR)
    assert "::kvkern_emu::cp_async(smem_dst, gmem_src, 16);" in files["common.cuh"]
    assert "<<<" not in files["decode_attention.cuh"]
    for i, (name, old, new) in enumerate([
        ("common.cuh", "*static_cast<uint4*>(smem_dst) = *static_cast<const uint4*>(gmem_src);",
         "*static_cast<uint4*>(smem_dst) = __ldg(static_cast<const uint4*>(gmem_src));"),
        ("common.cuh", "cp_async_commit() {", "cp_async_commit() {\n#if defined(__CUDA_ARCH__)\n#endif"),
        ("decode_attention.cuh", "}  // namespace decode_attention_detail", "}  // end of decode_attention_detail"),
    ]):
        d = tmp_path / str(i) / "kvkern"
        shutil.copytree(HEADER_DIR, d)
        text = (d / name).read_text()
        assert text.count(old) == 1
        (d / name).write_text(text.replace(old, new))
        with pytest.raises(emu_gen.PatchError, match=re.escape(name)):
            emu_gen.emulation_headers(d)


@needs_headers
def test_emulator_quick():
    r = subprocess.run([sys.executable, str(EMU_DIR / "run.py"), "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=1800)
    out = r.stdout + r.stderr
    assert "SKIPPED" not in out, out
    assert r.returncode == 0, f"tools/cuda_emu/run.py --quick failed (exit {r.returncode}):\n{out[-20000:]}"
    assert "PASSED" in out, out


# ---------------------------------------------------------------------------
# On a GPU.
# ---------------------------------------------------------------------------
# (B, Hq, Hkv, C, D, dtype, log_w): G = 1, 4, 12 (two head chunks), 3 (partial tile).
GPU_SHAPES = [
    (2, 2, 2, 70, 64, torch.float32, False),
    (2, 8, 2, 100, 128, torch.bfloat16, True),
    (1, 12, 1, 50, 256, torch.float16, True),
    (3, 6, 2, 33, 128, torch.float32, True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"B{s[0]}-Hq{s[1]}-Hkv{s[2]}-C{s[3]}-D{s[4]}-"
                         f"{str(s[5]).split('.')[-1]}{'-logw' if s[6] else ''}")
def test_gpu_every_search_space_config_matches_reference(shape):
    B, Hq, Hkv, C, D, dtype, with_log_w = shape
    lengths = torch.randint(1, C + 1, (B, Hkv), dtype=torch.int32)
    lengths.view(-1)[0] = C
    if lengths.numel() > 2:
        lengths.view(-1)[1] = 0  # an empty head
    q, k, v, lengths, log_w = make_decode_inputs(B, Hq, Hkv, C, D, dtype, "cuda", lengths=lengths,
                                                 with_log_w=with_log_w)
    ref_out, ref_lse = reference.decode_attention(q, k, v, lengths, log_w)
    props = torch.cuda.get_device_properties(0)
    max_smem = getattr(props, "shared_memory_per_block_optin", cuda_variants.DEFAULT_MAX_SMEM_BYTES)
    configs = cuda_variants.decode_attention_search_space(D, dtype, Hq // Hkv, B * Hkv, C, max_smem_bytes=max_smem)
    assert configs
    failures = []
    for cfg in configs:
        try:
            out, lse = kvkern.decode_attention(q, k, v, lengths, log_w, backend="cuda", config=cfg, return_lse=True)
            torch.cuda.synchronize()
            assert_verbose_allclose(out, ref_out, *TOLERANCES[dtype], what=f"out {cfg}")
            assert_verbose_allclose(lse, ref_lse, *LSE_TOLERANCES[dtype], what=f"lse {cfg}")
        except Exception as e:  # collect them all
            failures.append(f"{cfg}: {type(e).__name__}: {e}")
    assert not failures, f"{len(failures)} of {len(configs)} configs failed:\n" + "\n".join(failures[:20])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config, argument", [
    ({"block_n": 48, "num_warps": 4}, "block_n"),
    ({"block_n": 32, "num_warps": 2}, "num_warps"),
    ({"block_n": 16, "num_warps": 8}, "block_n, num_warps"),  # both compiled, not as a pair
    ({"num_stages": 1}, "num_stages"),
    ({"num_stages": 5}, "num_stages"),
    ({"num_splits": 2**17}, "num_splits"),
    ({"block_n": -1}, "config"),
    ({"blocks": 4}, "config"),
])
def test_gpu_unsupported_config_is_refused(config, argument):
    q, k, v, lengths, _ = make_decode_inputs(1, 4, 2, 64, 128, torch.float16, "cuda")
    with pytest.raises((RuntimeError, ValueError), match=re.escape(argument)):
        kvkern.decode_attention(q, k, v, lengths, backend="cuda", config=config)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_config_over_the_shared_memory_limit_is_refused():
    # fp32, D = 256, block_n = 64: one stage is 128 KiB; 4 stages fit on no GPU.
    q, k, v, lengths, _ = make_decode_inputs(1, 2, 2, 512, 256, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="shared memory") as info:
        kvkern.decode_attention(q, k, v, lengths, backend="cuda",
                                config={"block_n": 64, "num_warps": 4, "num_stages": 4})
    assert "block_n" in str(info.value) and "num_stages" in str(info.value)
