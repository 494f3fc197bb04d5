# SPDX-License-Identifier: Apache-2.0
"""The tuner: times every candidate config of an op on this device over a grid
of shape buckets and writes the winners to the tuning database.

    python -m autotune --op decode_attention [--dtype bf16 fp16] [--head-dim 128] [--group 1 4 8]
                       [--buckets tiny|quick|full] [--batch-heads ...] [--capacity ...]
                       [--out-dir autotune/configs] [--device cuda]
    python -m autotune --check [PATH ...]     # validate config files (what CI runs)

For each static key (one file) and each bucket it builds random inputs (never
zeros, full lengths), collects candidates from each available backend's search
space, times them (CUDA: a CUDA graph of ``--graph-calls`` calls replayed
``--iters`` times between CUDA events, with inputs rotated so the cache is
not served from L2; CPU: median of ``time.perf_counter``), skips candidates
that raise, checks the fastest against ``kvkern.reference`` (dropping it for the
next if it is wrong), and writes one file per static key through
``kvkern.tuning.write_config_file``.

Everything op-specific lives in one :class:`OpTuner` per op in :data:`OPS`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import itertools
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

import kvkern  # noqa: F401  (loads the extension: registers the ops)
from kvkern import tuning

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "autotune" / "configs"


# ---------------------------------------------------------------------------
# The per-op table
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StaticArg:
    """One static key of an op, as a command-line flag ``--<name with dashes>``."""

    name: str
    parse: Callable[[str], Any]
    choices: tuple | None
    default: tuple


@dataclass
class OpTuner:
    """Everything the tuner needs to know about one op.

    backends(device_type) -> (backend names to tune, notes about the ones skipped).
    candidates(backend, static, dims) -> list of config dicts (keys among spec.config).
    make_inputs(static, dims, device, generator) -> an inputs object for run/reference.
    input_bytes(static, dims) -> bytes one set of inputs occupies (for the size limit and L2 rotation).
    run(backend, inputs, config) -> tuple of tensors (what the reference is compared with).
    reference(inputs) -> tuple of tensors, same structure.
    check_run(backend, inputs, config) -> what is compared instead of run's result, when the
        op works in place: run is what is timed (it may only reset what it needs to repeat the
        same work), check_run restores the whole input state, runs once and reads the result.
    tolerance(static) -> (atol, rtol) for comparing run with reference.
    """

    spec: tuning.OpSpec
    static_args: tuple[StaticArg, ...]
    grids: Mapping[str, Mapping[str, tuple[int, ...]]]
    backends: Callable[[str], tuple[list[str], list[str]]]
    candidates: Callable[[str, dict, dict], list]
    make_inputs: Callable[[dict, dict, torch.device, torch.Generator], Any]
    input_bytes: Callable[[dict, dict], int]
    run: Callable[[str, Any, dict], tuple]
    reference: Callable[[Any], tuple]
    tolerance: Callable[[dict], tuple[float, float]]
    default_grid: Mapping[str, str] = field(default_factory=lambda: {"cpu": "tiny", "cuda": "quick"})
    check_run: Callable[[str, Any, dict], tuple] | None = None


# --- decode_attention ------------------------------------------------------

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# abs + rel, against the fp64 reference (tests/utils.py TOLERANCES).
_TOLERANCES = {"fp32": (2e-5, 2e-5), "fp16": (2e-3, 2e-3), "bf16": (1.6e-2, 1.6e-2)}
# (backend, module, function): the search spaces live next to the kernels.
_DA_SEARCH_SPACES = {
    "cuda": ("kvkern.cuda_variants", "decode_attention_search_space"),
    "triton": ("kvkern.triton.decode_attention", "search_space"),
}
_CPU_SPLITS = (1, 2, 4, 8)
_CPU_BLOCK_N = (32, 64, 128)


def _search_space_fn(module: str, attr: str) -> Callable:
    return getattr(importlib.import_module(module), attr)


def _da_backends(device_type: str) -> tuple[list[str], list[str]]:
    from kvkern.ops import available_backends

    have = available_backends("decode_attention", device_type)
    if device_type == "cpu":
        # Under TRITON_INTERPRET the Triton kernel also runs on CPU, but timing the
        # interpreter means nothing: CPU files tune the C++ kernel only.
        return (["cpu"], []) if "cpu" in have else ([], ["no CPU kernel is registered"])
    found, notes = [], []
    for backend, (module, attr) in _DA_SEARCH_SPACES.items():
        if backend not in have:
            notes.append(f"backend {backend}: no kernel for {device_type} tensors in this build; skipped")
            continue
        try:
            _search_space_fn(module, attr)
        except Exception as err:  # being written, or a broken install
            notes.append(f"backend {backend}: {module}.{attr} unavailable ({type(err).__name__}: {err}); skipped")
            continue
        found.append(backend)
    return found, notes


def _da_candidates(backend: str, static: dict, dims: dict) -> list:
    if backend == "cpu":
        cap = dims["capacity"]
        return [{"num_splits": s, "block_n": bn, "num_warps": 0, "num_stages": 0}
                for bn in _CPU_BLOCK_N for s in _CPU_SPLITS if s == 1 or cap >= s * bn]
    fn = _search_space_fn(*_DA_SEARCH_SPACES[backend])
    return list(fn(static["head_dim"], _DTYPES[static["dtype"]], static["group"],
                   dims["batch_heads"], dims["capacity"]))


@dataclass
class _DecodeInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    lengths: torch.Tensor
    log_w: torch.Tensor | None = None


def _da_layout(batch_heads: int) -> tuple[int, int]:
    # batch_heads = B * Hkv: split it like a GQA model would (Hkv up to 8).
    hkv = 1
    while hkv < 8 and batch_heads % (2 * hkv) == 0:
        hkv *= 2
    return batch_heads // hkv, hkv


def _da_inputs(static: dict, dims: dict, device: torch.device, gen: torch.Generator) -> _DecodeInputs:
    B, Hkv = _da_layout(dims["batch_heads"])
    C, D, G = dims["capacity"], static["head_dim"], static["group"]
    dtype = _DTYPES[static["dtype"]]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    return _DecodeInputs(
        q=randn(B, Hkv * G, D), k=randn(B, Hkv, C, D), v=randn(B, Hkv, C, D),
        lengths=torch.full((B, Hkv), C, dtype=torch.int32, device=device),  # full: time the whole cache
    )


def _da_bytes(static: dict, dims: dict) -> int:
    elt = _DTYPES[static["dtype"]].itemsize
    return 2 * dims["batch_heads"] * dims["capacity"] * static["head_dim"] * elt


def _da_run(backend: str, x: _DecodeInputs, cfg: dict) -> tuple:
    fn = torch.ops.kvkern.decode_attention_triton if backend == "triton" else torch.ops.kvkern.decode_attention
    return fn(x.q, x.k, x.v, x.lengths, x.log_w, None,
              cfg["num_splits"], cfg["block_n"], cfg["num_warps"], cfg["num_stages"])


def _da_reference(x: _DecodeInputs) -> tuple:
    from kvkern import reference

    B, Hq, D = x.q.shape
    Hkv, C = x.k.shape[1], x.k.shape[2]
    G = Hq // Hkv
    # The fp64 reference expands K and V per query head: one kv head at a time, in
    # batch chunks of ~512 MiB, so the largest buckets fit next to their inputs.
    chunk = max(1, (512 << 20) // max(1, 4 * G * C * D * 8))
    outs, lses = [], []
    for j in range(Hkv):
        heads, kv = slice(j * G, (j + 1) * G), slice(j, j + 1)
        head_out, head_lse = [], []
        for s in range(0, B, chunk):
            b = slice(s, s + chunk)
            out, lse = reference.decode_attention(x.q[b, heads], x.k[b, kv], x.v[b, kv], x.lengths[b, kv],
                                                  None if x.log_w is None else x.log_w[b, kv])
            head_out.append(out)
            head_lse.append(lse)
        outs.append(torch.cat(head_out))
        lses.append(torch.cat(head_lse))
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _decode_attention_tuner() -> OpTuner:
    from kvkern.ops import DECODE_ATTENTION_TUNING

    return OpTuner(
        spec=DECODE_ATTENTION_TUNING,
        static_args=(
            StaticArg("head_dim", int, (64, 128, 256), (128,)),
            StaticArg("dtype", str, tuple(_DTYPES), ("bf16", "fp16")),
            StaticArg("group", int, None, (1, 4, 8)),
        ),
        grids={
            "tiny": {"batch_heads": (1, 4, 16), "capacity": (256, 1024, 4096)},
            "quick": {"batch_heads": (1, 8, 64, 512), "capacity": (1024, 4096, 16384, 65536)},
            "full": {"batch_heads": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                     "capacity": (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)},
        },
        backends=_da_backends,
        candidates=_da_candidates,
        make_inputs=_da_inputs,
        input_bytes=_da_bytes,
        run=_da_run,
        reference=_da_reference,
        tolerance=lambda static: _TOLERANCES[static["dtype"]],
    )


# --- score-and-evict: the tuner picks the backend (CUDA C++ or Triton) per bucket ---

def _op_backends(op: str):
    def backends(device_type: str) -> tuple[list[str], list[str]]:
        from kvkern.ops import available_backends

        have = available_backends(op, device_type)
        if device_type == "cpu":
            return (["cpu"], []) if "cpu" in have else ([], [f"no CPU kernel for {op}"])
        found = [b for b in ("cuda", "triton") if b in have]
        notes = [f"backend {b}: no kernel for {device_type} tensors in this build; skipped"
                 for b in ("cuda", "triton") if b not in have]
        return found, notes
    return backends


def _eviction_op(op: str, backend: str):
    from kvkern._fake import triton_twin

    return getattr(torch.ops.kvkern, triton_twin(op) if backend == "triton" else op)


@dataclass
class _WindowInputs:
    q_win: torch.Tensor
    k: torch.Tensor
    lengths: torch.Tensor


def _ws_inputs(static: dict, dims: dict, device: torch.device, gen: torch.Generator) -> _WindowInputs:
    B, Hkv = _da_layout(dims["batch_heads"])
    C, D, G, W = dims["capacity"], static["head_dim"], static["group"], static["window"]
    dtype = _DTYPES[static["dtype"]]
    return _WindowInputs(
        q_win=torch.randn(B, Hkv * G, W, D, generator=gen, device=device, dtype=dtype),
        k=torch.randn(B, Hkv, C, D, generator=gen, device=device, dtype=dtype),
        lengths=torch.full((B, Hkv), C, dtype=torch.int32, device=device),
    )


# The decode-time mode (G-KV's, score_evict_'s default): its CUDA block layout differs from the
# other reductions', and it is the one on the decoding path.
_WS_GROUP_REDUCE = "max_per_query"


def _ws_reference(x: _WindowInputs) -> tuple:
    from kvkern import reference

    # One kv head at a time keeps the fp64 [G, W, C] logits of the largest buckets small.
    G = x.q_win.shape[1] // x.k.shape[1]
    cols = [reference.window_scores(x.q_win[:, j * G:(j + 1) * G], x.k[:, j:j + 1], x.lengths[:, j:j + 1],
                                    group_reduce=_WS_GROUP_REDUCE, normalize=True)
            for j in range(x.k.shape[1])]
    return (torch.cat(cols, dim=1),)


def _window_scores_tuner() -> OpTuner:
    from kvkern.eviction_ops import EVICTION_TUNING

    return OpTuner(
        spec=EVICTION_TUNING["window_scores"],
        static_args=(
            StaticArg("head_dim", int, (64, 128, 256), (128,)),
            StaticArg("dtype", str, tuple(_DTYPES), ("bf16",)),
            StaticArg("group", int, None, (4,)),
            StaticArg("window", int, None, (16, 32)),
        ),
        grids={
            "tiny": {"batch_heads": (1, 8), "capacity": (256, 1024)},
            "quick": {"batch_heads": (8, 64), "capacity": (4096, 32768)},
            "full": {"batch_heads": (1, 8, 32, 64, 256), "capacity": (1024, 4096, 16384, 32768, 131072)},
        },
        backends=_op_backends("window_scores"),
        candidates=lambda backend, static, dims: [{}],
        make_inputs=_ws_inputs,
        input_bytes=lambda static, dims: dims["batch_heads"] * dims["capacity"] * static["head_dim"]
        * _DTYPES[static["dtype"]].itemsize,
        run=lambda backend, x, cfg: (_eviction_op("window_scores", backend)(
            x.q_win, x.k, x.lengths, None, "mean", _WS_GROUP_REDUCE, True, "none", 1),),
        reference=_ws_reference,
        tolerance=lambda static: {"fp32": (1e-5, 1e-4), "fp16": (2e-3, 1e-2), "bf16": (1.6e-2, 3e-2)}[static["dtype"]],
    )


@dataclass
class _SelectInputs:
    scores: torch.Tensor
    lengths: torch.Tensor
    budget: int
    n_sink: int
    n_recent: int


def _sk_inputs(static: dict, dims: dict, device: torch.device, gen: torch.Generator) -> _SelectInputs:
    B, Hkv = _da_layout(dims["batch_heads"])
    C = dims["capacity"]
    # G-KV's proportions (budget 1/16 of the cache, a 32-slot window, 4 sinks), scaled down so
    # small buckets stay feasible.
    n_sink, n_recent = min(4, C // 16), min(32, C // 8)
    return _SelectInputs(scores=torch.rand(B, Hkv, C, generator=gen, device=device),
                         lengths=torch.full((B, Hkv), C, dtype=torch.int32, device=device),
                         budget=max(C // 16, n_sink + n_recent + 1), n_sink=n_sink, n_recent=n_recent)


def _select_keep_tuner() -> OpTuner:
    from kvkern.eviction_ops import EVICTION_TUNING

    return OpTuner(
        spec=EVICTION_TUNING["select_keep"],
        static_args=(),
        grids={
            "tiny": {"batch_heads": (1, 8), "capacity": (256, 4096)},
            "quick": {"batch_heads": (8, 64), "capacity": (4096, 32768)},
            "full": {"batch_heads": (1, 8, 32, 64, 256), "capacity": (1024, 4096, 16384, 32768, 131072)},
        },
        backends=_op_backends("select_keep"),
        candidates=lambda backend, static, dims: [{}],
        make_inputs=_sk_inputs,
        input_bytes=lambda static, dims: 4 * dims["batch_heads"] * dims["capacity"],
        run=lambda backend, x, cfg: tuple(t.to(torch.int32) for t in _eviction_op("select_keep", backend)(
            x.scores, x.lengths, None, None, x.budget, x.n_sink, x.n_recent)),
        reference=lambda x: tuple(t.to(torch.int32) for t in __import__("kvkern").reference.select_keep(
            x.scores.cpu(), x.lengths.cpu(), None, x.budget, x.n_sink, x.n_recent)),
        tolerance=lambda static: (0.0, 0.0),
    )


# --- quant_decode_attention: backend and split count over the quantized cache ---

@dataclass
class _QuantInputs:
    q: torch.Tensor
    cache: Any


def _qa_inputs(static: dict, dims: dict, device: torch.device, gen: torch.Generator) -> _QuantInputs:
    import kvkern

    B, Hkv = _da_layout(dims["batch_heads"])
    C, D, G = dims["capacity"], static["head_dim"], static["group"]
    dtype = _DTYPES[static["dtype"]]
    qg = static["quant_group"]
    cache = kvkern.QuantizedKVCache.empty(B, Hkv, C, D, bits=static["bits"], group=qg, residual=max(qg, 128),
                                          dtype=dtype, device=device)
    k = torch.randn(B, Hkv, C, D, generator=gen, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, C, D, generator=gen, device=device, dtype=dtype)
    cache.fill_(k, v, torch.full((B, Hkv), C, dtype=torch.int32, device=device))  # full: time the whole cache
    return _QuantInputs(q=torch.randn(B, Hkv * G, D, generator=gen, device=device, dtype=dtype), cache=cache)


def _qa_bytes(static: dict, dims: dict) -> int:
    elt = _DTYPES[static["dtype"]].itemsize
    n = dims["batch_heads"] * dims["capacity"] * static["head_dim"]
    return 2 * n * static["bits"] // 8 + 4 * n * elt // static["quant_group"]


def _qa_run(backend: str, x: _QuantInputs, cfg: dict) -> tuple:
    import kvkern

    return kvkern.quant_decode_attention(x.q, x.cache, return_lse=True, backend=backend,
                                         num_splits=cfg["num_splits"])


def _qa_reference(x: _QuantInputs) -> tuple:
    k, v = x.cache.dequantize()
    return _da_reference(_DecodeInputs(q=x.q, k=k, v=v, lengths=x.cache.lengths))


def _split_candidates(backend: str, static: dict, dims: dict) -> list[dict]:
    # 0 = the kernel's own heuristic; a split shorter than 64 slots is never worth its merge
    return [{"num_splits": s} for s in (0, 1, 2, 4, 8, 16, 32) if s == 0 or dims["capacity"] >= 64 * s]


def _quant_decode_attention_tuner() -> OpTuner:
    from kvkern.quant_ops import QUANT_DECODE_ATTENTION_TUNING

    return OpTuner(
        spec=QUANT_DECODE_ATTENTION_TUNING,
        static_args=(
            StaticArg("head_dim", int, (64, 128, 256), (128,)),
            StaticArg("dtype", str, tuple(_DTYPES), ("bf16",)),
            StaticArg("group", int, None, (4,)),
            StaticArg("bits", int, (2, 4, 8), (4, 2)),
            StaticArg("quant_group", int, (32, 64, 128), (128,)),
        ),
        grids={
            "tiny": {"batch_heads": (1, 8), "capacity": (512, 2048)},
            "quick": {"batch_heads": (8, 64), "capacity": (4096, 32768)},
            "full": {"batch_heads": (1, 8, 32, 64, 256), "capacity": (1024, 4096, 16384, 32768, 131072)},
        },
        backends=_op_backends("quant_decode_attention"),
        candidates=_split_candidates,
        make_inputs=_qa_inputs,
        input_bytes=_qa_bytes,
        run=_qa_run,
        reference=_qa_reference,
        tolerance=lambda static: _TOLERANCES[static["dtype"]],
    )


# --- fp8_decode_attention: backend and split count over the FP8 (e4m3) cache ---

def _fa_inputs(static: dict, dims: dict, device: torch.device, gen: torch.Generator) -> _QuantInputs:
    import kvkern

    B, Hkv = _da_layout(dims["batch_heads"])
    C, D, G = dims["capacity"], static["head_dim"], static["group"]
    dtype = _DTYPES[static["dtype"]]
    cache = kvkern.FP8KVCache.empty(B, Hkv, C, D, device=device)
    k = torch.randn(B, Hkv, C, D, generator=gen, device=device, dtype=dtype)
    v = torch.randn(B, Hkv, C, D, generator=gen, device=device, dtype=dtype)
    cache.fill_(k, v, torch.full((B, Hkv), C, dtype=torch.int32, device=device), calibrate=True)
    return _QuantInputs(q=torch.randn(B, Hkv * G, D, generator=gen, device=device, dtype=dtype), cache=cache)


def _fa_run(backend: str, x: _QuantInputs, cfg: dict) -> tuple:
    import kvkern

    return kvkern.fp8_decode_attention(x.q, x.cache, return_lse=True, backend=backend, num_splits=cfg["num_splits"])


def _fa_reference(x: _QuantInputs) -> tuple:
    k, v = x.cache.dequantize()
    return _da_reference(_DecodeInputs(q=x.q, k=k.to(x.q.dtype), v=v.to(x.q.dtype), lengths=x.cache.lengths))


def _fp8_decode_attention_tuner() -> OpTuner:
    from kvkern.quant_ops import FP8_DECODE_ATTENTION_TUNING

    return OpTuner(
        spec=FP8_DECODE_ATTENTION_TUNING,
        static_args=(
            StaticArg("head_dim", int, (64, 128, 256), (128,)),
            StaticArg("dtype", str, tuple(_DTYPES), ("bf16",)),
            StaticArg("group", int, None, (4,)),
        ),
        grids=_quant_decode_attention_tuner().grids,
        backends=_op_backends("fp8_decode_attention"),
        candidates=_split_candidates,
        make_inputs=_fa_inputs,
        # one byte per code for k and v, the per-head scales are noise
        input_bytes=lambda static, dims: 2 * dims["batch_heads"] * dims["capacity"] * static["head_dim"],
        run=_fa_run,
        reference=_fa_reference,
        tolerance=lambda static: _TOLERANCES[static["dtype"]],
    )


# --- the cache writers (quantize_kv_, append_quantized_kv_ and their FP8 twins): the backend ---
#
# In place, so the timed call must repeat the same work: quantize is idempotent; an append resets
# `lengths` first (the ring's content then differs between repeats, the work does not; the small
# copy is in every backend's time alike). The check restores the whole cache, runs once and
# compares the live contents, dequantized by the reference (codes exact => tolerance 0).

@dataclass
class _WriterInputs:
    k: torch.Tensor            # [B, Hkv, T, D] prefill, or [B, Hkv, D] one step
    v: torch.Tensor
    lengths: torch.Tensor      # [B, Hkv] int32: the prefill's, or the lengths before the step
    cache: Any                 # kvkern.QuantizedKVCache / FP8KVCache, as it is before the call
    pristine: tuple = ()       # copies of the cache tensors before any call (appends)


def _prefill_run(fill):
    def run(backend: str, x: _WriterInputs, cfg: dict) -> tuple:
        fill(x.k, x.v, x.lengths, x.cache, backend=backend)
        return ()
    return run


def _append_run(append):
    def run(backend: str, x: _WriterInputs, cfg: dict) -> tuple:
        x.cache.lengths.copy_(x.lengths)
        append(x.k, x.v, x.cache, backend=backend)
        return ()
    return run


def _restore(x: _WriterInputs) -> None:
    for t, saved in zip(x.cache.tensors, x.pristine):
        if t is not None:
            t.copy_(saved)


def _writer_tuner(spec: tuning.OpSpec, static_args: tuple, grids: Mapping, front_door: Callable, step: bool,
                  live: Callable, make_inputs: Callable, input_bytes: Callable, reference: Callable) -> OpTuner:
    # live(cache, lengths) -> the dequantized live contents; reference(inputs) -> the same from
    # the reference's own writer (a step also compares the lengths it leaves)
    run = (_append_run if step else _prefill_run)(front_door)

    def check_run(backend: str, x: _WriterInputs, cfg: dict) -> tuple:
        if step:
            _restore(x)
        run(backend, x, cfg)
        if not step:
            return live(x.cache, x.lengths)
        return (*live(x.cache, x.cache.lengths), x.cache.lengths.cpu())

    return OpTuner(spec=spec, static_args=static_args, grids=grids, backends=_op_backends(spec.op),
                   candidates=lambda backend, static, dims: [{}], make_inputs=make_inputs, input_bytes=input_bytes,
                   run=run, check_run=check_run, reference=reference, tolerance=lambda static: (0.0, 0.0))


_WRITER_STATIC = (StaticArg("head_dim", int, (64, 128, 256), (128,)), StaticArg("dtype", str, tuple(_DTYPES), ("bf16",)))
_QUANT_FORMAT = (StaticArg("bits", int, (2, 4, 8), (4, 2)), StaticArg("quant_group", int, (32, 64, 128), (128,)),
                 StaticArg("centred", int, (0, 1), (0,)))
_PREFILL_GRIDS = {"tiny": {"batch_heads": (1, 8), "tokens": (256, 1024)},
                  "quick": {"batch_heads": (8, 64), "tokens": (4096, 32768)},
                  "full": {"batch_heads": (1, 8, 32, 64), "tokens": (1024, 4096, 16384, 32768)}}
_STEP_GRIDS = {"tiny": {"batch_heads": (1, 8)}, "quick": {"batch_heads": (8, 64, 256)},
               "full": {"batch_heads": (1, 8, 32, 64, 256, 1024)}}


def _prefill_bytes(static: dict, dims: dict) -> int:
    # the dense prefill read; the codes written are a fraction of it
    return 2 * dims["batch_heads"] * dims["tokens"] * static["head_dim"] * _DTYPES[static["dtype"]].itemsize


def _randn_kv(B: int, Hkv: int, T: int, static: dict, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    shape, dtype = (B, Hkv, T, static["head_dim"]), _DTYPES[static["dtype"]]
    return (torch.randn(*shape, generator=gen, device=device, dtype=dtype),
            torch.randn(*shape, generator=gen, device=device, dtype=dtype))


def _quant_cache(static: dict, B: int, Hkv: int, C: int, device):
    import kvkern

    qg = static["quant_group"]
    residual = static.get("residual", max(qg, 128))
    return kvkern.QuantizedKVCache.empty(B, Hkv, -(-C // residual) * residual, static["head_dim"],
                                         bits=static["bits"], group=qg, residual=residual,
                                         mean_centred=bool(static["centred"]), dtype=_DTYPES[static["dtype"]],
                                         device=device)


def _quant_host(tensors) -> dict:
    from kvkern.quant_ops import FIELDS

    return {f: (None if t is None else t.cpu().clone()) for f, t in zip(FIELDS, tensors)}


def _quant_live(cache, lengths) -> tuple:
    from kvkern import reference

    return reference.dequantize_kv(_quant_host(cache.tensors), lengths.cpu(), cache.bits, cache.group,
                                   dtype=cache.k_res.dtype)


def _fp8_host(k_fp8, v_fp8, cache) -> dict:
    return {"k_fp8": k_fp8.cpu().clone(), "v_fp8": v_fp8.cpu().clone(), "k_scale": cache.k_scale.cpu(),
            "v_scale": cache.v_scale.cpu()}


def _fp8_live(cache, lengths) -> tuple:
    from kvkern import reference

    return reference.dequantize_fp8_kv(_fp8_host(cache.k_fp8, cache.v_fp8, cache), lengths.cpu(), dtype=torch.float32)


def _step_lengths(B: int, Hkv: int, residual: int, device) -> torch.Tensor:
    # Lengths before the timed step, past the first R tokens (a value leaves the ring). Half the
    # batch elements (all when B = 1) are at a flush step ((t + 1) % R == 0), the slowest kind:
    # the time is that of a step that flushes somewhere in the batch, as every R-th step does.
    # Whole batch elements, because a mean-centred cache's heads must hold one length.
    t = torch.full((B, Hkv), 2 * residual + 5, dtype=torch.int32)
    t[: (B + 1) // 2] = 3 * residual - 1
    return t.to(device)


def _qk_inputs(static: dict, dims: dict, device: torch.device, gen: torch.Generator) -> _WriterInputs:
    B, Hkv = _da_layout(dims["batch_heads"])
    k, v = _randn_kv(B, Hkv, dims["tokens"], static, device, gen)
    return _WriterInputs(k=k, v=v, lengths=torch.full((B, Hkv), dims["tokens"], dtype=torch.int32, device=device),
                         cache=_quant_cache(static, B, Hkv, dims["tokens"], device))


def _qk_reference(x: _WriterInputs) -> tuple:
    from kvkern import reference

    c = x.cache
    ref = reference.quantize_kv(x.k.cpu(), x.v.cpu(), x.lengths.cpu(), c.capacity, c.bits, c.group, c.residual,
                                c.k_mean is not None)
    return reference.dequantize_kv(ref, x.lengths.cpu(), c.bits, c.group, dtype=c.k_res.dtype)


def _qa_step_inputs(static: dict, dims: dict, device: torch.device, gen: torch.Generator) -> _WriterInputs:
    B, Hkv = _da_layout(dims["batch_heads"])
    R = static["residual"]
    cache = _quant_cache(static, B, Hkv, 4 * R, device)
    lengths = _step_lengths(B, Hkv, R, device)
    cache.fill_(*_randn_kv(B, Hkv, int(lengths.max()), static, device, gen), lengths)
    k, v = _randn_kv(B, Hkv, 1, static, device, gen)
    return _WriterInputs(k=k[:, :, 0], v=v[:, :, 0], lengths=lengths.clone(), cache=cache,
                         pristine=tuple(None if t is None else t.clone() for t in cache.tensors))


def _qa_step_reference(x: _WriterInputs) -> tuple:
    from kvkern import reference

    c, host, lengths = x.cache, _quant_host(x.pristine), x.lengths.cpu().clone()
    reference.append_quantized_kv_(host, lengths, x.k.cpu(), x.v.cpu(), c.bits, c.group)
    return (*reference.dequantize_kv(host, lengths, c.bits, c.group, dtype=c.k_res.dtype), lengths)


def _fq_inputs(static: dict, dims: dict, device: torch.device, gen: torch.Generator) -> _WriterInputs:
    import kvkern

    B, Hkv = _da_layout(dims["batch_heads"])
    k, v = _randn_kv(B, Hkv, dims["tokens"], static, device, gen)
    lengths = torch.full((B, Hkv), dims["tokens"], dtype=torch.int32, device=device)
    cache = kvkern.FP8KVCache.empty(B, Hkv, dims["tokens"], static["head_dim"], device=device)
    return _WriterInputs(k=k, v=v, lengths=lengths, cache=cache.calibrate_(k, v, lengths))


def _fq_reference(x: _WriterInputs) -> tuple:
    from kvkern import reference

    c = x.cache
    ref = reference.quantize_fp8_kv(x.k.cpu(), x.v.cpu(), x.lengths.cpu(), c.capacity, c.k_scale.cpu(),
                                    c.v_scale.cpu())
    return reference.dequantize_fp8_kv(ref, x.lengths.cpu(), dtype=torch.float32)


def _fa_step_inputs(static: dict, dims: dict, device: torch.device, gen: torch.Generator) -> _WriterInputs:
    import kvkern

    B, Hkv = _da_layout(dims["batch_heads"])
    C = 256
    k, v = _randn_kv(B, Hkv, C, static, device, gen)
    lengths = torch.randint(0, C, (B, Hkv), generator=gen, device=device, dtype=torch.int32)
    cache = kvkern.FP8KVCache.empty(B, Hkv, C, static["head_dim"], device=device).fill_(k, v, lengths, calibrate=True)
    return _WriterInputs(k=k[:, :, 0], v=v[:, :, 0], lengths=lengths.clone(), cache=cache,
                         pristine=tuple(t.clone() for t in cache.tensors))


def _fa_step_reference(x: _WriterInputs) -> tuple:
    from kvkern import reference

    host, lengths = _fp8_host(*x.pristine, x.cache), x.lengths.cpu().clone()
    reference.append_fp8_kv_(host, lengths, x.k.cpu(), x.v.cpu())
    return (*reference.dequantize_fp8_kv(host, lengths, dtype=torch.float32), lengths)


def _writer_tuners() -> dict[str, OpTuner]:
    import kvkern
    from kvkern import quant_ops as Q

    def step_bytes(per_token: int):
        # what one step touches per head: the new token, plus the ring when it flushes
        return lambda static, dims: dims["batch_heads"] * static["head_dim"] * per_token(static)

    quant_step = step_bytes(lambda s: 2 * (s["residual"] + 1) * _DTYPES[s["dtype"]].itemsize)
    fp8_step = step_bytes(lambda s: 2 * (_DTYPES[s["dtype"]].itemsize + 1))
    return {
        "quantize_kv_": _writer_tuner(Q.QUANTIZE_KV_TUNING, (*_WRITER_STATIC, *_QUANT_FORMAT), _PREFILL_GRIDS,
                                      kvkern.quantize_kv_, False, _quant_live, _qk_inputs, _prefill_bytes,
                                      _qk_reference),
        "append_quantized_kv_": _writer_tuner(
            Q.APPEND_QUANTIZED_KV_TUNING, (*_WRITER_STATIC, *_QUANT_FORMAT, StaticArg("residual", int, None, (128,))),
            _STEP_GRIDS, kvkern.append_quantized_kv_, True, _quant_live, _qa_step_inputs, quant_step,
            _qa_step_reference),
        "quantize_fp8_kv_": _writer_tuner(Q.QUANTIZE_FP8_KV_TUNING, _WRITER_STATIC, _PREFILL_GRIDS,
                                          kvkern.quantize_fp8_kv_, False, _fp8_live, _fq_inputs, _prefill_bytes,
                                          _fq_reference),
        "append_fp8_kv_": _writer_tuner(Q.APPEND_FP8_KV_TUNING, _WRITER_STATIC, _STEP_GRIDS, kvkern.append_fp8_kv_,
                                        True, _fp8_live, _fa_step_inputs, fp8_step, _fa_step_reference),
    }


OPS: dict[str, OpTuner] = {
    "decode_attention": _decode_attention_tuner(),
    "window_scores": _window_scores_tuner(),
    "select_keep": _select_keep_tuner(),
    "quant_decode_attention": _quant_decode_attention_tuner(),
    "fp8_decode_attention": _fp8_decode_attention_tuner(),
    **_writer_tuners(),
}


# ---------------------------------------------------------------------------
# Progress bar (stderr; no dependency)
# ---------------------------------------------------------------------------

class Progress:
    """A one-line bar redrawn in place on a terminal; one line per step otherwise (logs)."""

    def __init__(self, total: int, stream=None, enabled: bool = True, width: int = 24):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.monotonic()
        self.text = ""

    def _line(self) -> str:
        filled = int(self.width * self.done / self.total)
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s eta {eta:4.0f}s  {self.text}")

    def _draw(self) -> None:
        cols = shutil.get_terminal_size((100, 20)).columns
        self.stream.write("\r" + self._line()[: cols - 1].ljust(cols - 1))
        self.stream.flush()

    def set(self, text: str) -> None:
        self.text = text
        if self.tty:
            self._draw()

    def step(self, text: str | None = None) -> None:
        self.done += 1
        if text is not None:
            self.text = text
        if self.tty:
            self._draw()
        elif self.enabled:
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def time_cpu(call: Callable[[], Any], warmup: int, iters: int) -> float:
    """Median wall time of ``call`` in microseconds."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def time_cuda(calls: Sequence[Callable[[], Any]], warmup: int, iters: int, graph_calls: int) -> tuple[float, str]:
    """Median time of one call in microseconds, and how it was measured.

    ``calls`` run the same config on different input copies (cycled, so a cache
    smaller than L2 is not timed hot). They are captured ``graph_calls`` at a
    time in a CUDA graph, replayed between CUDA events; if capture fails, the
    same launches are timed eagerly.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (and JIT-compile) off the capture stream
        for i in range(max(warmup, len(calls))):
            calls[i % len(calls)]()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph, method = None, f"cuda graph of {graph_calls} calls"
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(graph_calls):
                calls[i % len(calls)]()
        launch = graph.replay
    except Exception:  # not capturable: time the launches themselves
        graph, method = None, f"eager, {graph_calls} calls"
        torch.cuda.synchronize()

        def launch():
            for i in range(graph_calls):
                calls[i % len(calls)]()
    launch()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        launch()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / graph_calls)
    del graph
    return statistics.median(times), method


# ---------------------------------------------------------------------------
# The tuning loop
# ---------------------------------------------------------------------------

class TuneError(RuntimeError):
    pass


@dataclass
class TuneResult:
    files: list[Path]
    notes: list[str]
    skipped_static: list[dict]


def matches(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], atol: float, rtol: float):
    """(ok, worst excess) comparing in fp64 with ``|a - e| <= atol + rtol |e|``; NaN/inf must match."""
    worst = 0.0
    for a, e in zip(actual, expected):
        a = a.detach().to(torch.float64).cpu()
        e = e.detach().to(torch.float64).cpu()
        if a.shape != e.shape:
            return False, math.inf
        same_special = (torch.isnan(a) == torch.isnan(e)) & (torch.isinf(a) == torch.isinf(e))
        same_special &= ~(torch.isinf(a) & (a != e))
        if not bool(same_special.all()):
            return False, math.inf
        finite = torch.isfinite(e)
        excess = torch.where(finite, (a - e).abs() - (atol + rtol * e.abs()), torch.zeros_like(a))
        if excess.numel():
            worst = max(worst, float(excess.max()))
    return worst <= 0.0, worst


def _normalize_candidates(spec: tuning.OpSpec, raw, backend: str, notes: list[str]) -> list[dict]:
    out, seen = [], set()
    for cand in raw:
        if not isinstance(cand, Mapping) or set(cand) - set(spec.config):
            notes.append(f"{backend}: ignoring a malformed candidate {cand!r}")
            continue
        cfg = {k: cand.get(k, 0) for k in spec.config}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in cfg.values()):
            notes.append(f"{backend}: ignoring a candidate with values that are not non-negative ints: {cand!r}")
            continue
        key = tuple(cfg.values())
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160] if text else ''}"


def _cfg_text(cfg: Mapping) -> str:
    return ",".join(f"{k}={v}" for k, v in cfg.items())


def _check_cuda_alive(what: str) -> None:
    try:
        torch.cuda.synchronize()
    except Exception as err:  # e.g. an illegal address: the context is gone
        raise TuneError(f"the CUDA context failed after {what} ({_short(err)}); "
                        f"nothing more can run in this process: fix or drop that candidate") from err


def tune_bucket(op: OpTuner, static: dict, dims: dict, device: torch.device, backends: list[str], *,
                warmup: int, iters: int, graph_calls: int, cold_l2: bool, max_input_bytes: int, seed: int,
                notes: list[str], progress: Progress | None = None) -> dict | None:
    """The winning entry for one bucket (``{"backend", <config>, "us"}``), or None."""
    spec = op.spec
    where = ",".join(f"{k}={v}" for k, v in dims.items())
    nbytes = op.input_bytes(static, dims)
    if nbytes > max_input_bytes:
        notes.append(f"[{where}] skipped: inputs take {nbytes / 2**30:.1f} GiB > --max-input-gib")
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    try:
        inputs = op.make_inputs(static, dims, device, gen)
        copies = [inputs]
        if device.type == "cuda" and cold_l2:
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
            want = min(graph_calls, math.ceil(2 * l2 / max(nbytes, 1)))
            copies += [op.make_inputs(static, dims, device, gen) for _ in range(want - 1)]
    except torch.OutOfMemoryError:
        notes.append(f"[{where}] skipped: out of memory building inputs")
        return None

    timed = []
    for backend in backends:
        try:
            raw = op.candidates(backend, static, dims)
        except Exception as err:
            notes.append(f"[{where}] {backend}: search space failed ({_short(err)})")
            continue
        cands = _normalize_candidates(spec, raw, backend, notes)
        for i, cfg in enumerate(cands):
            if progress is not None:
                progress.set(f"{where} {backend} {i + 1}/{len(cands)}")
            try:
                if device.type == "cuda":
                    calls = [lambda x=x: op.run(backend, x, cfg) for x in copies]
                    us, _ = time_cuda(calls, warmup, iters, graph_calls)
                else:
                    us = time_cpu(lambda: op.run(backend, inputs, cfg), warmup, iters)
            except TuneError:
                raise
            except Exception as err:  # OutOfResources, unsupported config, ...
                notes.append(f"[{where}] {backend} {_cfg_text(cfg)}: skipped ({_short(err)})")
                if device.type == "cuda":
                    _check_cuda_alive(f"{backend} {_cfg_text(cfg)}")
                continue
            timed.append((us, backend, cfg))
    del copies
    if not timed:
        notes.append(f"[{where}] no candidate ran")
        return None

    timed.sort(key=lambda t: t[0])
    expected = None
    atol, rtol = op.tolerance(static)
    for us, backend, cfg in timed:
        try:
            actual = (op.check_run or op.run)(backend, inputs, cfg)
            if expected is None:
                expected = op.reference(inputs)
            ok, excess = matches(actual, expected, atol, rtol)
        except Exception as err:
            ok, excess = False, _short(err)
        if ok:
            return {"backend": backend, **cfg, "us": us}
        notes.append(f"[{where}] {backend} {_cfg_text(cfg)} ({us:.1f} us) rejected: differs from the "
                     f"reference (excess over tolerance {excess})")
    notes.append(f"[{where}] no candidate matched the reference")
    return None


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def build_meta(op: str, device: torch.device, method: str) -> dict:
    from kvkern import BUILD_INFO, __version__

    info = tuning.device_info(device)
    meta = {
        "schema": tuning.SCHEMA_VERSION, "op": op,
        "kvkern": (BUILD_INFO or {}).get("version") or __version__,
        "torch": torch.__version__, "triton": tuning._installed_triton(), "cuda": torch.version.cuda,
        "gpu": info["gpu"], "device": info["device"], "cc": info["cc"], "sm_count": info["sm_count"],
        "tuned_by": f"autotune@{git_sha()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "method": method,
    }
    if device.type == "cpu":
        meta["threads"] = torch.get_num_threads()
    return meta


def tune(op_name: str, *, device: str | torch.device, statics: Sequence[Mapping[str, Any]],
         grid: Mapping[str, Sequence[int]], out_dir: str | Path, warmup: int, iters: int,
         graph_calls: int = 10, cold_l2: bool = True, max_input_bytes: int = 8 << 30, seed: int = 0,
         progress: bool = True, stream=None) -> TuneResult:
    """Tunes ``op_name`` for every static key in ``statics`` over the product of ``grid``;
    writes ``<out_dir>/<op>/<config_file_name>`` per static key that got any entry."""
    op = OPS[op_name]
    spec = op.spec
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    backends, notes = op.backends(device.type)
    if not backends:
        raise TuneError(f"{op_name}: nothing to tune on {device}: " + "; ".join(notes))
    name = tuning.device_name(device)
    if name not in tuning.KNOWN_DEVICES:
        notes.append(f"device {name!r} is not in kvkern.tuning.KNOWN_DEVICES: add it (and an alias if the "
                     f"GPU has other spellings) before submitting these files, or CI will reject them")
    buckets = list(itertools.product(*(tuple(grid[d]) for d in spec.dims)))
    method = (f"cuda events over a cuda graph of {graph_calls} calls, median of {iters}"
              + (", inputs rotated past L2" if cold_l2 else "")) if device.type == "cuda" \
        else f"perf_counter median of {iters} after {warmup} warmup"
    meta = build_meta(op_name, device, method)
    bar = Progress(len(statics) * len(buckets), stream=stream, enabled=progress)
    files, skipped = [], []
    try:
        for static in statics:
            static = dict(static)
            label = ",".join(f"{k}={static[k]}" for k in spec.static)
            entries = {}
            for point in buckets:
                dims = dict(zip(spec.dims, point))
                bar.set(label)
                entry = tune_bucket(op, static, dims, device, backends, warmup=warmup, iters=iters,
                                    graph_calls=graph_calls, cold_l2=cold_l2, max_input_bytes=max_input_bytes,
                                    seed=seed, notes=notes, progress=bar)
                if entry is not None:
                    entries[point] = entry
                bar.step(f"{label} {','.join(map(str, point))}: "
                         + (f"{entry['backend']} {entry['us']:.1f} us" if entry else "none"))
            if not entries:
                notes.append(f"{label}: no bucket got a config; no file written")
                skipped.append(static)
                continue
            path = Path(out_dir) / spec.op / tuning.config_file_name(spec, name, static)
            files.append(tuning.write_config_file(path, meta, spec, entries))
    finally:
        bar.close()
    return TuneResult(files, notes, skipped)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _static_flags() -> dict[str, StaticArg]:
    flags = {}
    for op in OPS.values():
        for arg in op.static_args:
            flags.setdefault(arg.name, arg)
    return flags


def _dim_names() -> list[str]:
    return sorted({d for op in OPS.values() for d in op.spec.dims})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autotune",
        description="Tune kvkern ops on this device and write the tuning database (see autotune/README.md).")
    p.add_argument("--op", choices=sorted(OPS), help="the op to tune")
    for name, arg in _static_flags().items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"static_{name}", nargs="+", metavar="V",
                       help=f"static key {name} (one file each); default {' '.join(map(str, arg.default))}"
                            + (f"; choices {' '.join(map(str, arg.choices))}" if arg.choices else ""))
    for dim in _dim_names():
        p.add_argument(f"--{dim.replace('_', '-')}", dest=f"dim_{dim}", nargs="+", type=int, metavar="N",
                       help=f"bucket values of {dim}, replacing the grid's")
    p.add_argument("--buckets", choices=("tiny", "quick", "full"),
                   help="bucket grid (default: tiny on CPU, quick on CUDA)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                   help="database root; files go to <out-dir>/<op>/ (default: autotune/configs)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--warmup", type=int, default=None, help="warmup calls per candidate (default 5 CUDA, 2 CPU)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed repetitions per candidate (default 20 CUDA graph replays, 10 CPU calls)")
    p.add_argument("--graph-calls", type=int, default=10, help="calls captured per CUDA graph (default 10)")
    p.add_argument("--hot-l2", action="store_true", help="do not rotate inputs to defeat L2 (CUDA)")
    p.add_argument("--max-input-gib", type=float, default=8.0,
                   help="skip buckets whose inputs take more (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--check", nargs="*", metavar="PATH", default=None,
                   help="validate config files (default: every file under autotune/configs) and exit")
    return p


def check(paths: Sequence[str | Path], out=sys.stdout) -> int:
    files = []
    for p in (paths or [DEFAULT_OUT_DIR]):
        p = Path(p)
        files += sorted(p.rglob("*.json")) if p.is_dir() else [p]
    bad = 0
    for f in files:
        problems = tuning.validate_config_file(f)
        if problems:
            bad += 1
            print(f"{f}:", file=out)
            for problem in problems:
                print(f"  - {problem}", file=out)
    print(f"checked {len(files)} file(s): {bad} with problems", file=out)
    return 1 if bad else 0


def _statics(op: OpTuner, args, parser) -> list[dict]:
    values = []
    for arg in op.static_args:
        given = getattr(args, f"static_{arg.name}")
        if given is None:
            values.append(arg.default)
            continue
        parsed = []
        for text in given:
            try:
                v = arg.parse(text)
            except ValueError:
                parser.error(f"--{arg.name.replace('_', '-')}: cannot parse {text!r}")
            if arg.choices and v not in arg.choices:
                parser.error(f"--{arg.name.replace('_', '-')}: {text!r} is not one of {list(arg.choices)}")
            parsed.append(v)
        values.append(tuple(dict.fromkeys(parsed)))
    for name in set(_static_flags()) - {a.name for a in op.static_args}:
        if getattr(args, f"static_{name}") is not None:
            parser.error(f"--{name.replace('_', '-')} does not apply to {op.spec.op}")
    return [dict(zip((a.name for a in op.static_args), combo)) for combo in itertools.product(*values)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check is not None:
        return check(args.check)
    if args.op is None:
        parser.error("--op is required (or --check)")
    op = OPS[args.op]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    statics = _statics(op, args, parser)
    grid_name = args.buckets or op.default_grid.get(device.type, "quick")
    grid = {d: tuple(getattr(args, f"dim_{d}") or op.grids[grid_name][d]) for d in op.spec.dims}
    for d in _dim_names():
        if d not in op.spec.dims and getattr(args, f"dim_{d}") is not None:
            parser.error(f"--{d.replace('_', '-')} does not apply to {args.op}")
    for d, vals in grid.items():
        if any(v < 1 for v in vals):
            parser.error(f"--{d.replace('_', '-')}: bucket values must be positive")
    cuda = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    iters = args.iters if args.iters is not None else (20 if cuda else 10)
    n_buckets = math.prod(len(v) for v in grid.values())
    print(f"{args.op} on {tuning.device_name(device)}: {len(statics)} file(s) x {n_buckets} bucket(s) "
          f"({', '.join(f'{d}={list(v)}' for d, v in grid.items())}) -> {args.out_dir}", file=sys.stderr)
    if args.dry_run:
        for static in statics:
            print(args.out_dir / op.spec.op / tuning.config_file_name(op.spec, tuning.device_name(device), static))
        return 0
    try:
        result = tune(args.op, device=device, statics=statics, grid=grid, out_dir=args.out_dir, warmup=warmup,
                      iters=iters, graph_calls=args.graph_calls, cold_l2=not args.hot_l2,
                      max_input_bytes=int(args.max_input_gib * 2**30), seed=args.seed,
                      progress=not args.no_progress)
    except TuneError as err:
        print(f"autotune: {err}", file=sys.stderr)
        return 1
    if result.notes:
        print(f"notes ({len(result.notes)}):", file=sys.stderr)
        for note in result.notes[:40]:
            print(f"  - {note}", file=sys.stderr)
        if len(result.notes) > 40:
            print(f"  ... and {len(result.notes) - 40} more", file=sys.stderr)
    status = 1 if result.skipped_static else 0
    for path in result.files:
        table = tuning.load_config_file(path, op.spec)
        counts = {}
        for entry in table.entries.values():
            counts[entry["backend"]] = counts.get(entry["backend"], 0) + 1
        print(f"wrote {path}: {len(table.entries)} entries ({', '.join(f'{b} {n}' for b, n in counts.items())})")
        for problem in tuning.validate_config_file(path, op.spec):
            print(f"  check: {problem}", file=sys.stderr)
    return status
