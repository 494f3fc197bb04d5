# SPDX-License-Identifier: Apache-2.0
"""Triton launcher for decode attention (``kvkern::decode_attention_triton``), its
default launch configuration, and the search space the tuner sweeps.

Kernels are in ``kvkern/triton/kernels/decode_attention.py``: a split-K kernel
over (batch, kv head, head tile, split) and a combine kernel that merges the
per-split partial states (``merge_states_triton``). The split-K plumbing around them
(``attention_outputs``, ``split_count``, ``split_buffers``, ``merge_split_buffers``)
serves the other attention twins too (the quantized and fp8 caches), so every op
splits and merges by the same rules.

Nothing here reads tensor values or synchronizes with the device, and every
allocation depends on shapes and the configuration only, so the op runs inside
CUDA graphs and as an opaque op under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton

from .. import _validate
from .kernels.decode_attention import decode_attention_split_kernel, merge_states_kernel

__all__ = ["decode_attention_triton", "default_config", "search_space", "check_config", "merge_states_triton",
           "head_block", "attention_outputs", "split_count", "split_buffers", "merge_split_buffers"]

OP = "kvkern::decode_attention_triton"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_ELEMENT_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
BLOCK_N_CHOICES = (16, 32, 64, 128, 256)  # accepted block_n values (powers of two)
NUM_WARPS_CHOICES = (1, 2, 4, 8, 16)
MAX_NUM_STAGES = 8
# NOTE: limits of the tuner's sweep, so that every config it gets compiles and
# runs without heavy register spills on sm_80 and sm_90 (checked by compiling each
# one with Triton 3.6 for both targets; see search_space):
# - one K (or V) tile within 32 KiB, and the software-pipelined K and V tiles
#   within 160 KiB of shared memory (A100 allows 163 KiB per block);
# - 16-bit: tensor-core dots; the fp32 accumulator, the score tile and one K/V
#   operand tile in registers come to at most 128 values per thread;
# - fp32: exact ("ieee") dots run on FMA units with whole operand tiles in
#   registers, so only block_n 16 / 32 with 8 or 16 warps, and head tiles of at
#   most 4096 accumulator values (head_block).
# A few configs still spill a few dozen bytes; none fails to compile.
_MAX_TILE_BYTES = 32 * 1024
_MAX_PIPELINE_BYTES = 160 * 1024
_MAX_VALUES_PER_THREAD = 128
# A split of fewer than this many tiles of capacity costs more in the combine
# step than it gains in parallelism.
_MIN_TILES_PER_SPLIT = 2
_MAX_DEFAULT_SPLITS = 64
_MAX_SWEEP_PROGRAMS = 4096


def head_block(group: int, head_dim: int, dtype: torch.dtype) -> int:
    """Query heads per program (the M dimension of both dots): all G heads of a kv
    head, padded to a power of two >= 16 (tl.dot's minimum), at most 64, and with
    the accumulator [BLOCK_H, D] at most 8192 values (4096 for fp32, whose dots
    hold whole operand tiles in registers). Larger groups are tiled over several
    programs, each re-reading the kv head (mostly from L2)."""
    cap = min(64, (4096 if dtype == torch.float32 else 8192) // head_dim)
    return min(cap, max(16, triton.next_power_of_2(group)))


def _fits(head_dim: int, dtype: torch.dtype, block_h: int, block_n: int, num_warps: int, num_stages: int) -> bool:
    """Whether a config stays within the sweep's shared-memory and register limits."""
    tile = block_n * head_dim * _ELEMENT_SIZE[dtype]
    if tile > _MAX_TILE_BYTES or 2 * num_stages * tile > _MAX_PIPELINE_BYTES:
        return False
    if dtype == torch.float32:
        return block_n <= 32 and num_warps >= 8
    values = block_h * head_dim + block_h * block_n + block_n * head_dim // 2
    return values <= _MAX_VALUES_PER_THREAD * 32 * num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _max_shared(device_index: int) -> int:
    # What a kernel may use per block once it opts in (Triton does): 227 KB on H100, 163 KB on
    # A100, 99 KB on sm_86 / sm_89 / sm_120.
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


_STAGES_CHOSEN: dict = {}


def pipeline_stages(kernel, grid, args: tuple, constexprs: dict, device: torch.device, candidates=(3, 2, 1)) -> int:
    """The deepest software pipeline (``num_stages`` among ``candidates``, deepest first) whose
    compiled ``kernel`` fits the device's shared memory per block. Depth costs shared memory
    (per stage, the tiles in flight), and a launch past the limit fails with OutOfResources:
    D = 256, fp32 and large tiles get fewer stages, most on 99 KB GPUs.

    Compiles without launching (Triton keeps the binaries, so the launch that follows reuses
    one), once per kernel, device and ``constexprs`` (the launch's constexpr keyword arguments,
    with num_warps); the argument dtypes are part of the key. Under the interpreter: the first.
    Raises RuntimeError when even the shallowest does not fit."""
    if interpreted(device):
        return candidates[0]
    limit = _max_shared(device.index)
    key = (kernel.fn.__name__, limit, tuple(sorted(constexprs.items())),
           tuple(a.dtype for a in args if isinstance(a, torch.Tensor)), tuple(candidates))
    stages = _STAGES_CHOSEN.get(key)
    if stages is None:
        for stages in candidates:
            if kernel.warmup(*args, grid=grid, num_stages=stages, **constexprs).metadata.shared <= limit:
                break
        else:
            raise RuntimeError(f"{kernel.fn.__name__}: needs more shared memory per block than the device's "
                               f"{limit} bytes even with {candidates[-1]} pipeline stage(s) ({constexprs})")
        _STAGES_CHOSEN[key] = stages
    return stages


def interpreted(device: torch.device) -> bool:
    """True where launches for tensors on ``device`` run in Triton's interpreter (CPU tensors):
    programs run one after another there and want few, large tiles. False on a GPU.
    (tools/triton_aot_check.py replaces it to compile the GPU configurations without one.)"""
    return device.type != "cuda"


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _default_num_splits(programs: int, capacity: int, block_n: int, target: int) -> int:
    """Enough (batch, head tile, split) programs for ``target`` (about two waves),
    without splitting a head's capacity into pieces shorter than two tiles."""
    if programs <= 0 or programs >= target:
        return 1
    want = -(-target // programs)
    most = max(1, capacity // (_MIN_TILES_PER_SPLIT * block_n))
    return max(1, min(want, most, _MAX_DEFAULT_SPLITS))


def split_count(device: torch.device, programs: int, capacity: int, tile: int) -> int:
    """The default split count of a twin with ``programs`` programs per split and
    ``tile``-slot tiles: ``_default_num_splits`` on a GPU, 1 under the interpreter
    (where programs run one after another)."""
    if interpreted(device):
        return 1
    return _default_num_splits(programs, capacity, tile, 2 * _sm_count(device.index))


def default_config(head_dim: int, dtype: torch.dtype, group: int, batch_heads: int, capacity: int,
                   device=None, block_n: int = 0) -> dict:
    """The heuristic configuration (used for every value given as 0).

    Args:
        head_dim, dtype, group: D, the cache dtype and G = Hq / Hkv.
        batch_heads: B * Hkv.   capacity: C.
        device: the tensors' device; None means the current CUDA device if any.
            CPU tensors (the Triton interpreter) get the smallest grid: one split.
        block_n: a fixed block_n to build the rest around (0 = choose).

    Returns:
        dict with num_splits, block_n, num_warps, num_stages (all > 0). On a GPU:
        K/V tiles of 8-16 KiB (block_n 64 in 16-bit, 32 at D=256; 32 in fp32, 16
        at D=256), two pipeline stages, the fewest warps that fit (``_fits``), and
        enough splits for about two waves of programs on the device's SMs.
    """
    device = _resolve_device(device)
    bh = head_block(group, head_dim, dtype)
    programs = batch_heads * -(-group // bh)
    if interpreted(device):
        # The interpreter runs programs one after another in numpy: few programs
        # and few, large tiles are fastest.
        block_n = block_n or 128
        return {"num_splits": 1, "block_n": block_n, "num_warps": 4, "num_stages": 1}
    if dtype == torch.float32:
        block_n = block_n or (32 if head_dim <= 128 else 16)
    else:
        block_n = block_n or (64 if head_dim <= 128 else 32)
    num_stages = 2
    num_warps = next((w for w in (4, 8, 16) if _fits(head_dim, dtype, bh, block_n, w, num_stages)), 8)
    num_splits = _default_num_splits(programs, capacity, block_n, 2 * _sm_count(device.index))
    return {"num_splits": num_splits, "block_n": block_n, "num_warps": num_warps, "num_stages": num_stages}


def search_space(head_dim: int, dtype: torch.dtype, group: int, batch_heads: int, capacity: int) -> list[dict]:
    """Every configuration the tuner should time for this shape (all of them run).

    block_n in {16, 32, 64, 128}, num_warps in {4, 8} (also 2 at D=64; 8 and 16
    in fp32), num_stages in {1, 2, 3}, kept where they fit (``_fits``: shared
    memory and registers), and num_splits in {1, 2, 4, ..., 64} while each split
    still covers two tiles of capacity and the grid stays within 4096 programs.
    """
    bh = head_block(group, head_dim, dtype)
    programs = max(1, batch_heads * -(-group // bh))
    if dtype == torch.float32:
        warps = (8, 16)
    else:
        warps = (2, 4, 8) if head_dim <= 64 else (4, 8)
    configs = []
    for block_n in (16, 32, 64, 128):
        max_splits = max(1, capacity // (_MIN_TILES_PER_SPLIT * block_n))
        splits = [s for s in (1, 2, 4, 8, 16, 32, 64)
                  if s == 1 or (s <= max_splits and programs * s <= _MAX_SWEEP_PROGRAMS)]
        for num_stages in (1, 2, 3):
            for num_warps in warps:
                if not _fits(head_dim, dtype, bh, block_n, num_warps, num_stages):
                    continue
                for num_splits in splits:
                    configs.append({"num_splits": num_splits, "block_n": block_n, "num_warps": num_warps,
                                    "num_stages": num_stages})
    return configs


def check_config(num_splits, block_n, num_warps, num_stages) -> None:
    """Raises TypeError / ValueError unless this launcher accepts the config (0 = heuristic):
    the bounds every backend shares, then this kernel's own choices."""
    _validate.check_launch_config(OP, {"num_splits": num_splits, "block_n": block_n, "num_warps": num_warps,
                                       "num_stages": num_stages})
    if block_n and block_n not in BLOCK_N_CHOICES:
        raise ValueError(f"{OP}: block_n: expected 0 (heuristic) or a power of two in "
                         f"[{BLOCK_N_CHOICES[0]}, {BLOCK_N_CHOICES[-1]}], got {block_n}")
    if num_warps and num_warps not in NUM_WARPS_CHOICES:
        raise ValueError(f"{OP}: num_warps: expected 0 (heuristic) or one of {list(NUM_WARPS_CHOICES)}, "
                         f"got {num_warps}")
    if num_stages > MAX_NUM_STAGES:
        raise ValueError(f"{OP}: num_stages: expected 0 (heuristic) or 1..{MAX_NUM_STAGES}, got {num_stages}")


def _device_guard(t: torch.Tensor):
    # Triton launches on the *current* device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def merge_states_triton(partial_out: torch.Tensor, partial_lse: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, num_warps: int = 4) -> None:
    """Merges per-split attention states into ``out`` and ``lse`` (written in place).

    Args:
        partial_out: ``[rows, S, D]`` float32, last dim contiguous.
        partial_lse: ``[rows, S]`` float32, natural-log LSE of each split; -inf
            marks an empty split (its ``partial_out`` is not read).
        out: ``[rows, D]`` any float dtype, last dim contiguous. Mutated.
        lse: ``[rows]`` float32. Mutated.

    out = sum_s exp(lse_s - lse) * out_s with lse = log sum_s exp(lse_s); a row
    with a NaN lse_s gives NaN, a row of empty splits gives out 0 and lse -inf.
    """
    op = "kvkern.triton.merge_states_triton"
    if partial_out.dim() != 3:
        raise ValueError(f"{op}: partial_out: expected a 3-D tensor [rows, S, D], got shape {list(partial_out.shape)}")
    rows, num_splits, head_dim = partial_out.shape
    for name, t, shape in (("partial_lse", partial_lse, (rows, num_splits)), ("out", out, (rows, head_dim)),
                           ("lse", lse, (rows,))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name}: expected shape {list(shape)}, got {list(t.shape)}")
        if t.device != partial_out.device:
            raise ValueError(f"{op}: {name}: expected device {partial_out.device}, got {t.device}")
    for name, t in (("partial_out", partial_out), ("partial_lse", partial_lse), ("lse", lse)):
        if t.dtype != torch.float32:
            raise ValueError(f"{op}: {name}: expected dtype float32, got {t.dtype}")
    for name, t in (("partial_out", partial_out), ("partial_lse", partial_lse), ("out", out)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name}: expected the last dimension to be contiguous, got stride {t.stride(-1)}")
    if rows == 0 or head_dim == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_s = max(2, min(triton.next_power_of_2(num_splits), max(2, 4096 // block_d)))
    with _device_guard(out):
        merge_states_kernel[(rows,)](
            partial_out, partial_lse, out, lse, num_splits,
            partial_out.stride(0), partial_out.stride(1), partial_lse.stride(0), out.stride(0), lse.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=block_s, num_warps=num_warps,
        )


def attention_outputs(q: torch.Tensor):
    """Empty ``out [B, Hq, D]`` (q's dtype) and ``lse [B, Hq]`` fp32 on q's device, for ``q [B, Hq, D]``."""
    B, Hq, D = q.shape
    return (torch.empty((B, Hq, D), dtype=q.dtype, device=q.device),
            torch.empty((B, Hq), dtype=torch.float32, device=q.device))


def split_buffers(out: torch.Tensor, lse: torch.Tensor, num_splits: int):
    """Where the split kernels write: ``out`` / ``lse`` themselves with one split,
    else fresh fp32 partials ``[B * Hq, S, D]`` / ``[B * Hq, S]`` for
    ``merge_split_buffers``. ``out``: ``[B, Hq, D]``, ``lse``: ``[B, Hq]``."""
    if num_splits <= 1:
        return out, lse
    B, Hq, D = out.shape
    return (torch.empty((B * Hq, num_splits, D), dtype=torch.float32, device=out.device),
            torch.empty((B * Hq, num_splits), dtype=torch.float32, device=out.device))


def merge_split_buffers(dst_out: torch.Tensor, dst_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merges the partials of ``split_buffers`` into ``out`` / ``lse`` (nothing to do with one split)."""
    if dst_out is out:
        return
    B, Hq, D = out.shape
    merge_states_triton(dst_out, dst_lse, out.view(B * Hq, D), lse.view(B * Hq))


def _launch(q, k_cache, v_cache, lengths, log_w, sm_scale, num_splits, block_n, num_warps, num_stages):
    """Runs the kernels on checked arguments; a config value of 0 takes the default.

    Reads no tensor value: a length outside [0, C] gives NaN for that head.
    """
    B, Hq, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if sm_scale is None else float(sm_scale)

    if not (num_splits and block_n and num_warps and num_stages):
        cfg = default_config(D, q.dtype, G, B * Hkv, C, device=q.device, block_n=block_n)
        num_splits = num_splits or cfg["num_splits"]
        block_n = block_n or cfg["block_n"]
        num_warps = num_warps or cfg["num_warps"]
        num_stages = num_stages or cfg["num_stages"]

    out, lse = attention_outputs(q)
    if out.numel() == 0:
        return out, lse

    block_h = head_block(G, D, q.dtype)
    grid = (B * Hkv * triton.cdiv(G, block_h), num_splits)
    has_log_w = log_w is not None
    split = num_splits > 1
    dst_out, dst_lse = split_buffers(out, lse, num_splits)
    # NOTE: the interpreter cannot do bf16 arithmetic (E6), so there bf16 tiles are
    # widened to fp32 before the dots (in one chunk: 16-bit inputs need no more).
    # fp32 inputs always use exact ("ieee") dots, summed over chunks of 16 of D.
    dot_fp32 = q.dtype == torch.float32 or (INTERPRET and q.dtype == torch.bfloat16)

    with _device_guard(q):
        decode_attention_split_kernel[grid](
            q, k_cache, v_cache, lengths, log_w if has_log_w else lse,  # lse: a dummy, never read
            dst_out, dst_lse,
            scale,
            Hkv, G, C, num_splits,
            q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            lengths.stride(0), lengths.stride(1),
            log_w.stride(0) if has_log_w else 0, log_w.stride(1) if has_log_w else 0,
            HEAD_DIM=D, BLOCK_H=block_h, BLOCK_N=block_n, HAS_LOG_W=has_log_w, WRITE_PARTIAL=split,
            DOT_FP32=dot_fp32, DOT_CHUNK=16 if q.dtype == torch.float32 else D,
            num_warps=num_warps, num_stages=num_stages,
        )
    merge_split_buffers(dst_out, dst_lse, out, lse)
    return out, lse


def decode_attention_triton(q, k_cache, v_cache, lengths, log_w=None, sm_scale=None,
                            num_splits=0, block_n=0, num_warps=0, num_stages=0):
    """Triton kernel of ``kvkern::decode_attention_triton`` (see ``kvkern.ops.decode_attention``).

    Args:
        q: ``[B, Hq, D]`` float16 / bfloat16 / float32, D in {64, 128, 256}.
        k_cache, v_cache: ``[B, Hkv, C, D]``, q's dtype; any strides but the last (1).
        lengths: ``[B, Hkv]`` int32, any strides. On CUDA an out-of-range value
            makes that head's out and lse NaN (on CPU it raises).
        log_w: ``[B, Hkv, C]`` float32 or None; may hold -inf.
        sm_scale: logit scale, default ``D ** -0.5``.
        num_splits, block_n, num_warps, num_stages: launch config; 0 = ``default_config``.

    Returns:
        ``out [B, Hq, D]`` (q's dtype, contiguous) and ``lse [B, Hq]`` float32.
        Nothing is mutated.
    """
    sm_scale = _validate.check_decode_attention_args(OP, q, k_cache, v_cache, lengths, log_w, sm_scale)
    check_config(num_splits, block_n, num_warps, num_stages)
    return _launch(q, k_cache, v_cache, lengths, log_w, sm_scale, num_splits, block_n, num_warps, num_stages)
