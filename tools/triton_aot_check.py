# SPDX-License-Identifier: Apache-2.0
"""Compiles every Triton kernel kvkern launches for real GPUs, on a machine without one.

CI runs the Triton twins on CPU tensors under ``TRITON_INTERPRET=1``, which interprets the
kernels: code the interpreter accepts but the compiler refuses (a dtype mix, a shape that is
not a constexpr, an unsupported op) or that needs more shared memory than a GPU has would first
show on a GPU. Here each front door runs with ``backend="triton"`` on CPU tensors while Triton's
driver answers with a CUDA target, and every launch stops after compilation (Triton's warmup
path): the frontend, the MLIR passes, LLVM and ptxas all run; nothing executes, so outputs are
never written and nothing is compared.

Each compiled kernel's static shared memory is checked against the target's opt-in limit per
block (a launch past it fails with OutOfResources on the GPU).

    python tools/triton_aot_check.py                 # sm_86 and sm_90, the quick matrix
    python tools/triton_aot_check.py --scope full --json r.json

Exit status 1 when a kernel fails to compile or does not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("tools/triton_aot_check.py: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Opt-in shared memory per block (bytes) of the targets.
SMEM_LIMITS = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}


class _CompileOnlyDriver:
    """Triton's driver interface as far as compilation needs it: a fixed CUDA target."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # JITFunction keeps its compiled kernels (and the target) per device: one "device" per
        # architecture, or every later target would reuse the first one's binaries.
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0


@dataclass
class Compiled:
    kernel: str
    arch: int
    exercise: str
    shared: int
    seconds: float


@dataclass
class Report:
    compiled: list[Compiled] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)


def _install(arch: int, report: Report, exercise: list[str]):
    """Points Triton at a CUDA target of ``arch`` and makes every launch compile only."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from kvkern.triton import decode_attention

    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    decode_attention._max_shared = lambda device_index: SMEM_LIMITS[arch]
    if not hasattr(JITFunction, "_kvkern_launch"):
        JITFunction._kvkern_launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        start = time.perf_counter()
        kernel = JITFunction._kvkern_launch(self, *args, grid=grid, warmup=True, **kwargs)
        if not warmup:  # a launch; warmups are the launchers' own probes (pipeline_stages)
            report.compiled.append(Compiled(self.fn.__name__, arch, exercise[0], int(kernel.metadata.shared),
                                            time.perf_counter() - start))
        return kernel

    JITFunction.run = compile_only


def _as_if_on_a_gpu(sm_count: int = 132) -> None:
    # The launchers pick GPU configurations (tiles, warps, splits) unless the tensors' device
    # is interpreted; these CPU tensors stand in for an H100's (132 SMs).
    from kvkern.triton import decode_attention, evict, fp8, quant, score_evict, scorers, window_scores

    for module in (decode_attention, window_scores, scorers, evict, score_evict, quant, fp8):
        if hasattr(module, "interpreted"):
            module.interpreted = lambda device: False
        if hasattr(module, "_sm_count"):
            module._sm_count = lambda device_index: sm_count


def _register_twins_for_cpu() -> None:
    # The twins are registered for CUDA only outside the interpreter; CPU tensors carry the
    # calls here (they are never read by a kernel).
    from kvkern.triton import decode_attention, evict, fp8, quant, score_evict, scorers, window_scores

    kernels = {"decode_attention_triton": decode_attention.decode_attention_triton}
    for module in (window_scores, scorers, evict, score_evict, quant, fp8):
        kernels.update(module.KERNELS)
    for name, fn in kernels.items():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"kvkern::{name}", "CPU"):
            torch.library.register_kernel(f"kvkern::{name}", "cpu", fn)


# ---------------------------------------------------------------------------------------------
# Exercises: each calls front doors so that the launchers pick the kernels (and constexprs) a
# GPU run would. Sizes are small: only the specialization matters, not the work.
# ---------------------------------------------------------------------------------------------

def _cache(B, Hkv, C, D, dtype, fill=None):
    k = torch.randn(B, Hkv, C, D).to(dtype)
    v = torch.randn(B, Hkv, C, D).to(dtype)
    lengths = torch.full((B, Hkv), C if fill is None else fill, dtype=torch.int32)
    return k, v, lengths


def ex_decode_attention(kv, dtype, D, G):
    B, Hkv, C = 2, 2, 512
    k, v, lengths = _cache(B, Hkv, C, D, dtype)
    q = torch.randn(B, Hkv * G, D).to(dtype)
    kv.decode_attention(q, k, v, lengths, backend="triton", config={"num_splits": 4})
    kv.decode_attention(q, k, v, lengths, torch.zeros(B, Hkv, C), backend="triton")


def ex_decode_attention_search_space(kv, dtype, D, G):
    # Every config the tuner may time (and then ship) at one shape.
    from kvkern.triton import decode_attention as T

    B, Hkv, C = 2, 2, 4096
    k, v, lengths = _cache(B, Hkv, C, D, dtype)
    q = torch.randn(B, Hkv * G, D).to(dtype)
    seen = set()
    for cfg in T.search_space(D, dtype, G, B * Hkv, C):
        key = (cfg["block_n"], cfg["num_warps"], cfg["num_stages"], cfg["num_splits"] > 1)
        if key not in seen:
            seen.add(key)
            kv.decode_attention(q, k, v, lengths, backend="triton", config=cfg)


def ex_window_scores(kv, dtype, D, G):
    B, Hkv, C, W = 1, 2, 300, 16
    k, _, lengths = _cache(B, Hkv, C, D, dtype)
    q = torch.randn(B, Hkv * G, W, D).to(dtype)
    for query_reduce, group_reduce, normalize, pool, kernel in (
            ("mean", "mean", False, "none", 1), ("mean", "max", True, "avg", 5), ("sum", "max_per_query", True, "max", 3),
            ("mean", "mean_all", False, "none", 1)):
        kv.window_scores(q, k, lengths, query_reduce=query_reduce, group_reduce=group_reduce, normalize=normalize,
                         pool=pool, pool_kernel=kernel, backend="triton")


def ex_scorers(kv, dtype, D, G):
    B, Hkv, C = 1, 2, 300
    k, v, lengths = _cache(B, Hkv, C, D, dtype)
    mean = torch.randn(B, Hkv * G, D)
    cov = torch.randn(B, Hkv * G, D, D) * 0.01
    kv.expected_attention_scores(mean, cov, k, lengths, v_cache=v, backend="triton")
    kv.expected_attention_scores(mean, None, k, lengths, backend="triton")
    for kind in ("key_norm", "value_norm", "keydiff", "recency", "random"):
        kv.slot_scores(k, lengths, kind, v_cache=v, backend="triton")
    kv.key_redundancy(k, lengths, 16, backend="triton")


def ex_select_evict(kv, dtype, D, G):
    B, Hkv, C = 2, 2, 300
    k, v, lengths = _cache(B, Hkv, C, D, dtype)
    scores = torch.randn(B, Hkv, C)
    hist = torch.randn(B, Hkv, C)
    for mode in ("max", "ema", "sum"):
        kv.update_scores_(hist, scores, lengths, torch.full_like(lengths, C // 2), 0.8, mode, backend="triton")
    keep, _ = kv.select_keep(scores, lengths, 64, n_sink=4, n_recent=16, backend="triton")
    kv.select_keep(scores, lengths, 64, segment_cuts=torch.tensor([100, 200], dtype=torch.int32), backend="triton")
    kv.compact_(k, v, lengths.clone(), keep, positions=torch.arange(C, dtype=torch.int32).expand(B, Hkv, C).clone(),
                hist=hist, log_w=torch.zeros(B, Hkv, C), backend="triton")
    kv.evict_(k, v, lengths.clone(), scores, 64, n_recent=16, backend="triton")
    kv.allocate_head_budgets(scores, lengths, 64, backend="triton")


def ex_score_evict(kv, dtype, D, G):
    B, Hkv, C, W = 1, 2, 300, 16
    k, v, lengths = _cache(B, Hkv, C, D, dtype)
    q = torch.randn(B, Hkv * G, W, D).to(dtype)
    hist = torch.zeros(B, Hkv, C)
    kv.score_evict_(q, k, v, lengths.clone(), 64, n_recent=W, hist=hist, hist_lengths=torch.zeros_like(lengths),
                    mix_lambda=0.5, backend="triton")
    kv.score_evict_(q, k, v, lengths.clone(), 64, n_recent=W, query_reduce="mean", group_reduce="mean",
                    normalize=False, pool="avg", pool_kernel=5, backend="triton")


def ex_quant(kv, dtype, D, G):
    B, Hkv, C, R = 1, 2, 256, 128
    for bits, group in ((2, 32), (4, min(128, D)), (8, 64)):
        for centred in (False, True):
            cache = kv.QuantizedKVCache.empty(B, Hkv, C, D, bits=bits, group=group, residual=R, mean_centred=centred,
                                              dtype=dtype)
            k, v, lengths = _cache(B, Hkv, C - 8, D, dtype)
            kv.quantize_kv_(k, v, lengths, cache, backend="triton")
            cache.lengths.copy_(lengths)
            kv.append_quantized_kv_(k[:, :, 0], v[:, :, 0], cache, backend="triton")
            kv.dequantize_kv(cache, backend="triton")
            q = torch.randn(B, Hkv * G, D).to(dtype)
            kv.quant_decode_attention(q, cache, backend="triton", num_splits=3)


def ex_fp8(kv, dtype, D, G):
    B, Hkv, C = 1, 2, 256
    cache = kv.FP8KVCache.empty(B, Hkv, C, D)
    k, v, lengths = _cache(B, Hkv, C - 8, D, dtype)
    kv.quantize_fp8_kv_(k, v, lengths, cache, backend="triton")
    cache.lengths.copy_(lengths)
    kv.append_fp8_kv_(k[:, :, 0], v[:, :, 0], cache, backend="triton")
    q = torch.randn(B, Hkv * G, D).to(dtype)
    kv.fp8_decode_attention(q, cache, backend="triton", num_splits=3)


EXERCISES = [ex_decode_attention, ex_window_scores, ex_scorers, ex_select_evict, ex_score_evict, ex_quant, ex_fp8]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def matrix(scope: str):
    """(exercise, dtype, D, G) to run. ``quick``: every dtype at D = 128, G = 4, and the other
    head dims and group sizes in bf16. ``smoke`` (CI): the largest tiles (bf16, D = 256,
    G = 8). ``full``: everything crossed, and the tuner's decode search space."""
    if scope == "full":
        cases = [(ex, dt, D, G) for ex in EXERCISES for dt in DTYPES for D in (64, 128, 256) for G in (1, 4, 8)]
        return cases + [(ex_decode_attention_search_space, dt, 128, 4) for dt in DTYPES]
    if scope == "smoke":
        return [(ex, torch.bfloat16, 256, 8) for ex in EXERCISES]
    cases = [(ex, dt, 128, 4) for ex in EXERCISES for dt in DTYPES]
    return cases + [(ex, torch.bfloat16, D, G) for ex in EXERCISES for D, G in ((64, 1), (256, 8))]


def run(archs, scope: str) -> Report:
    import kvkern

    _register_twins_for_cpu()
    _as_if_on_a_gpu()
    report = Report()
    current = [""]
    for arch in archs:
        _install(arch, report, current)
        for ex, dtype, D, G in matrix(scope):
            current[0] = f"{ex.__name__[3:]} {str(dtype)[6:]} D={D} G={G}"
            torch.manual_seed(0)
            try:
                ex(kvkern, dtype, D, G)
            except Exception as err:  # a compile error names the kernel in its text
                report.failures.append({"arch": arch, "exercise": current[0], "error": f"{type(err).__name__}: {err}",
                                        "traceback": traceback.format_exc(limit=-3)})
    for c in report.compiled:
        limit = SMEM_LIMITS[c.arch]
        if c.shared > limit:
            report.failures.append({"arch": c.arch, "exercise": c.exercise,
                                    "error": f"{c.kernel}: {c.shared} bytes of shared memory, over sm_{c.arch}'s {limit}"})
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="86,90", help="compute capabilities (default 86,90: the smallest shared "
                                                        "memory of the targets, and the H100)")
    parser.add_argument("--scope", choices=("smoke", "quick", "full"), default="quick",
                        help="smoke: the largest tiles (CI); quick (default): every dtype, head dim and "
                             "group size once; full: all crossed, and the tuner's decode search space")
    parser.add_argument("--json", help="write every compiled kernel and failure here")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in SMEM_LIMITS]
    if unknown:
        parser.error(f"--arch: expected among {sorted(SMEM_LIMITS)}, got {unknown}")
    start = time.perf_counter()
    report = run(archs, args.scope)
    kernels = sorted({(c.kernel, c.arch) for c in report.compiled})
    most = max(report.compiled, key=lambda c: c.shared, default=None)
    print(f"compiled {len(report.compiled)} launches of {len(kernels)} (kernel, arch) pairs for sm_"
          f"{', sm_'.join(map(str, archs))} in {time.perf_counter() - start:.0f} s"
          + (f"; most shared memory: {most.kernel} {most.shared} B ({most.exercise}, sm_{most.arch})" if most else ""))
    for f in report.failures:
        print(f"FAILED sm_{f['arch']} {f['exercise']}: {f['error'][:2000]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"compiled": [c.__dict__ for c in report.compiled],
                                               "failures": report.failures}, indent=1, default=str))
    return 1 if report.failures or not report.compiled else 0


if __name__ == "__main__":
    sys.exit(main())
