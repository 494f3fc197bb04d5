# SPDX-License-Identifier: Apache-2.0
"""Front doors of the quantized-KV ops (re-exported by :mod:`kvkern.ops`) and the cache
object that owns one layer's quantized buffers.

The format (kvkern/reference.py, "Quantized KV"): keys per channel over groups of ``group``
tokens (KIVI), values per token over groups of ``group`` channels, asymmetric min-max codes of
2, 4 or 8 bits packed LSB-first into int32 words, metadata (scale, min) in the cache dtype, an
optional 16-bit per-token mean over the kv heads (TaDA mean-centring: each head's deviation is
quantized), and a full-precision ring of the newest ``residual`` tokens (keys flushed in blocks
of ``residual``, values as a FIFO). Capacity is static; ``lengths`` says how many tokens each
head holds; every op decides on the device what is codes and what is ring, so a decode loop of
:meth:`QuantizedKVCache.append_` + :meth:`QuantizedKVCache.attention` captures in a CUDA graph.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from . import _validate as V
from . import reference, tuning
from ._dispatch import DTYPE_KEYS, choose_kernel

__all__ = ["QuantizedKVCache", "quantize_kv_", "dequantize_kv", "append_quantized_kv_", "quant_decode_attention",
           "QUANT_DECODE_ATTENTION_TUNING", "QUANTIZE_KV_TUNING", "APPEND_QUANTIZED_KV_TUNING"]

# The tuner (python -m autotune --op <op>) picks the backend per GPU and shape bucket, and for
# attention the split count. "group" is the GQA group, "quant_group" the quantization group,
# "centred" 1 for a mean-centred (TaDA) cache: it changes how the CUDA kernels split the work.


def _check_tuned_splits(op: str, backend: str, config: dict) -> None:
    # Every backend of the two compressed-cache attentions takes num_splits up to the same bound.
    V.check_launch_config(op, config)


QUANT_DECODE_ATTENTION_TUNING = tuning.OpSpec(
    op="quant_decode_attention", static=("head_dim", "dtype", "group", "bits", "quant_group"),
    dims=("batch_heads", "capacity"), config=("num_splits",),
    check_config=functools.partial(_check_tuned_splits, "quant_decode_attention"))
QUANTIZE_KV_TUNING = tuning.OpSpec(
    op="quantize_kv_", static=("head_dim", "dtype", "bits", "quant_group", "centred"),
    dims=("batch_heads", "tokens"), config=())
# One decode step's cost does not grow with the capacity, only with the heads and the ring
# flushed (1 step in R): "capacity" is not a dim, "residual" is static.
APPEND_QUANTIZED_KV_TUNING = tuning.OpSpec(
    op="append_quantized_kv_", static=("head_dim", "dtype", "bits", "quant_group", "centred", "residual"),
    dims=("batch_heads",), config=())
for _spec in (QUANT_DECODE_ATTENTION_TUNING, QUANTIZE_KV_TUNING, APPEND_QUANTIZED_KV_TUNING):
    tuning.register_spec(_spec)

FIELDS = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_res", "v_res", "k_mean", "v_mean")


@dataclass
class QuantizedKVCache:
    """One layer's quantized KV cache (see the module docstring for the format).

    Tensors (all on one device; T = the cache dtype, fp16 / bf16 / fp32; P = 32 // bits):
        k_codes ``[B, Hkv, C / P, D]`` int32, k_scale / k_min ``[B, Hkv, C / group, D]`` T,
        v_codes ``[B, Hkv, C, D / P]`` int32, v_scale / v_min ``[B, Hkv, C, D / group]`` T,
        k_res / v_res ``[B, Hkv, residual, D]`` T, k_mean / v_mean ``[B, C, D]`` T or None,
        lengths ``[B, Hkv]`` int32.

    Range: group minima and scales are stored in T, so an fp16 cache needs every group's range
    (of the deviations ``x - mean`` when mean-centred) within fp16's 65504; past it the scale is
    inf and the group dequantizes to NaN. Real activations stay far below; bf16 and fp32 have
    no such limit.
    """

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_min: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_min: torch.Tensor
    k_res: torch.Tensor
    v_res: torch.Tensor
    k_mean: torch.Tensor | None
    v_mean: torch.Tensor | None
    lengths: torch.Tensor
    bits: int
    group: int

    @classmethod
    def empty(cls, B: int, Hkv: int, capacity: int, D: int, *, bits: int = 4, group: int = 128,
              residual: int = 128, mean_centred: bool = False, dtype=torch.bfloat16, device="cpu"):
        """An empty cache (lengths 0). Raises ValueError for an unsupported format."""
        public = "kvkern.QuantizedKVCache.empty"
        if bits not in reference.QUANT_BITS:
            raise ValueError(f"{public}: bits: expected one of {list(reference.QUANT_BITS)}, got {bits}")
        if group not in reference.QUANT_GROUPS:
            raise ValueError(f"{public}: group: expected one of {list(reference.QUANT_GROUPS)}, got {group}")
        if residual < group or residual % group:
            raise ValueError(f"{public}: residual: expected a positive multiple of group={group}, got {residual}")
        if capacity % residual:
            raise ValueError(f"{public}: capacity: expected a multiple of residual={residual}, got {capacity}")
        if D % group:
            raise ValueError(f"{public}: D: expected a multiple of group={group} (values are grouped along "
                             f"channels), got {D}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{public}: dtype: expected float16, bfloat16 or float32, got {dtype}")
        if mean_centred and Hkv == 1:
            warnings.warn(f"{public}: mean_centred with one kv head stores every token in full (the mean is the "
                          f"token, the deviation 0): falling back to plain quantization", stacklevel=2)
            mean_centred = False
        shapes = reference.quantized_cache_shapes(B, Hkv, capacity, D, bits, group, residual, mean_centred)
        t = {n: None if s is None else torch.zeros(s, dtype=torch.int32 if "codes" in n else dtype, device=device)
             for n, s in shapes.items()}
        return cls(**t, lengths=torch.zeros(B, Hkv, dtype=torch.int32, device=device), bits=bits, group=group)

    @property
    def tensors(self) -> tuple:
        return tuple(getattr(self, f) for f in FIELDS)

    @property
    def capacity(self) -> int:
        return self.k_scale.shape[2] * self.group

    @property
    def residual(self) -> int:
        return self.k_res.shape[2]

    def nbytes(self) -> dict:
        """Exact bytes of every buffer, their total, and the ratio against a bf16 dense cache of the
        same capacity (``2 * B * Hkv * C * D * 2`` bytes)."""
        sizes = {f: (0 if t is None else t.numel() * t.element_size()) for f, t in zip(FIELDS, self.tensors)}
        total = sum(sizes.values())
        B, H, _, D = self.k_codes.shape
        dense = 2 * B * H * self.capacity * D * 2
        return {**sizes, "total": total, "bf16_dense": dense, "ratio": total / dense}

    def fill_(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *, backend: str = "auto"):
        """Quantizes a prefilled dense cache ``k, v [B, Hkv, T, D]`` (T <= capacity) into this one;
        ``lengths [B, Hkv]`` int32 tokens per head. Mutates every buffer and ``self.lengths``."""
        quantize_kv_(k, v, lengths, self, backend=backend)
        self.lengths.copy_(lengths)
        return self

    def append_(self, k_new: torch.Tensor, v_new: torch.Tensor, *, backend: str = "auto"):
        """One decode step: ``k_new, v_new [B, Hkv, D]`` become token ``lengths`` of each head."""
        append_quantized_kv_(k_new, v_new, self, backend=backend)
        return self

    def attention(self, q: torch.Tensor, sm_scale: float | None = None, *, return_lse: bool = False,
                  backend: str = "auto", num_splits: int = 0):
        """Decode attention of ``q [B, Hq, D]`` over this cache (see :func:`quant_decode_attention`)."""
        return quant_decode_attention(q, self, sm_scale, return_lse=return_lse, backend=backend,
                                      num_splits=num_splits)

    def dequantize(self, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(k, v) [B, Hkv, C, D]`` in the cache dtype, 0 past ``lengths``."""
        return dequantize_kv(self, backend=backend)


def _check_cache(public: str, cache, cls: type | None = None) -> None:
    """``cache`` is a ``cls`` (default :class:`QuantizedKVCache`), else one TypeError naming the op."""
    cls = cls or QuantizedKVCache
    if not isinstance(cache, cls):
        raise TypeError(f"{public}: cache: expected a kvkern.{cls.__name__}, got {type(cache).__name__}")


def _check_dense(public: str, k, v, lengths) -> None:
    # Ranks before the tuning key reads shapes; the kernels check the rest.
    V.require_tensor(public, "k", k, 4, "[B, Hkv, T, D]")
    V.require_tensor(public, "v", v, 4, "[B, Hkv, T, D]")
    V.require_tensor(public, "lengths", lengths, 2, "[B, Hkv]")


def _check_step(public: str, k_new, v_new) -> None:
    V.require_tensor(public, "k_new", k_new, 3, "[B, Hkv, D]")
    V.require_tensor(public, "v_new", v_new, 3, "[B, Hkv, D]")


def quantize_kv_(k, v, lengths, cache: QuantizedKVCache, *, backend: str = "auto") -> QuantizedKVCache:
    """Quantizes a dense cache ``k, v [B, Hkv, T, D]`` (the cache's dtype, T <= capacity) with
    ``lengths [B, Hkv]`` int32 into ``cache``'s buffers (mutated; ``cache.lengths`` is not)."""
    public = "kvkern.quantize_kv_"
    _check_cache(public, cache)
    _check_dense(public, k, v, lengths)
    fn, _ = choose_kernel("quantize_kv_", public, k.device, backend, _format_key(cache, k.dtype),
                          {"batch_heads": k.shape[0] * k.shape[1], "tokens": k.shape[2]})
    fn(k, v, lengths, *cache.tensors, cache.bits, cache.group)
    return cache


def dequantize_kv(cache: QuantizedKVCache, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(k, v) [B, Hkv, C, D]`` (cache dtype) of ``cache``; 0 past its lengths. Mutates nothing."""
    public = "kvkern.dequantize_kv"
    _check_cache(public, cache)
    fn, _ = choose_kernel("dequantize_kv", public, cache.k_codes.device, backend)
    return fn(*cache.tensors, cache.lengths, cache.bits, cache.group)


def append_quantized_kv_(k_new, v_new, cache: QuantizedKVCache, *, backend: str = "auto") -> QuantizedKVCache:
    """One decode step in place (no host sync): ``k_new, v_new [B, Hkv, D]`` go to the ring; a value
    leaving the ring and a full block of R keys become codes, decided on the device from
    ``cache.lengths`` (incremented)."""
    public = "kvkern.append_quantized_kv_"
    _check_cache(public, cache)
    _check_step(public, k_new, v_new)
    t = cache.tensors
    key = _format_key(cache, k_new.dtype)
    fn, _ = choose_kernel("append_quantized_kv_", public, k_new.device, backend,
                          key and {**key, "residual": cache.residual},
                          {"batch_heads": k_new.shape[0] * k_new.shape[1]})
    fn(k_new, v_new, cache.lengths, *t, cache.bits, cache.group)
    return cache


def quant_decode_attention(q, cache: QuantizedKVCache, sm_scale: float | None = None, *, return_lse: bool = False,
                           backend: str = "auto", num_splits: int = 0):
    """Attention of one query per sequence ``q [B, Hq, D]`` (the cache dtype) over the quantized
    cache, dequantizing in registers. Equals :func:`kvkern.decode_attention` over
    :func:`dequantize_kv` (fp32 accumulation). Returns ``out [B, Hq, D]`` (and ``lse [B, Hq]``
    float32 with ``return_lse``). Mutates nothing."""
    public = "kvkern.quant_decode_attention"
    _check_cache(public, cache)
    V.require_tensor(public, "q", q, 3, "[B, Hq, D]")
    V.check_launch_config(public, {"num_splits": num_splits})
    B, Hkv, C = cache.k_codes.shape[0], cache.k_codes.shape[1], cache.capacity
    static = _dtype_key(q.shape[2], q.dtype)
    fn, (tuned_splits,) = choose_kernel(
        "quant_decode_attention", public, q.device, backend,
        static and {**static, "group": int(q.shape[1] // max(Hkv, 1)), "bits": cache.bits, "quant_group": cache.group},
        {"batch_heads": B * Hkv, "capacity": C})
    out, lse = fn(
        q, *cache.tensors, cache.lengths, cache.bits, cache.group, None if sm_scale is None else float(sm_scale),
        num_splits or tuned_splits)
    return (out, lse) if return_lse else out


def _dtype_key(head_dim, dtype: torch.dtype) -> dict | None:
    # The static tuning key's common part; None (no lookup) for a dtype no file is tuned for:
    # the op itself then raises its clear error.
    return {"head_dim": int(head_dim), "dtype": DTYPE_KEYS[dtype]} if dtype in DTYPE_KEYS else None


def _format_key(cache: QuantizedKVCache, dtype: torch.dtype) -> dict | None:
    # the static tuning key of the prefill / append ops (the file a lookup reads)
    key = _dtype_key(cache.k_codes.shape[3], dtype)
    return key and {**key, "bits": cache.bits, "quant_group": cache.group, "centred": int(cache.k_mean is not None)}


# ---- FP8 KV (kvkern/reference.py "FP8 KV") ----------------------------------------------------

__all__ += ["FP8KVCache", "fp8_scales", "quantize_fp8_kv_", "append_fp8_kv_", "fp8_decode_attention",
            "FP8_DECODE_ATTENTION_TUNING"]

# The tuner picks the backend per bucket, and for attention the split count (python -m
# autotune --op <op>); "dtype" is the activations' (the codes are always e4m3).
FP8_DECODE_ATTENTION_TUNING = tuning.OpSpec(
    op="fp8_decode_attention", static=("head_dim", "dtype", "group"), dims=("batch_heads", "capacity"),
    config=("num_splits",), check_config=functools.partial(_check_tuned_splits, "fp8_decode_attention"))
QUANTIZE_FP8_KV_TUNING = tuning.OpSpec(op="quantize_fp8_kv_", static=("head_dim", "dtype"),
                                       dims=("batch_heads", "tokens"), config=())
APPEND_FP8_KV_TUNING = tuning.OpSpec(op="append_fp8_kv_", static=("head_dim", "dtype"), dims=("batch_heads",),
                                     config=())
for _spec in (FP8_DECODE_ATTENTION_TUNING, QUANTIZE_FP8_KV_TUNING, APPEND_FP8_KV_TUNING):
    tuning.register_spec(_spec)
__all__ += ["QUANTIZE_FP8_KV_TUNING", "APPEND_FP8_KV_TUNING"]


def fp8_scales(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-kv-head fp8 scales ``[Hkv]`` float32 of ``x [B, Hkv, T, D]``: amax over the live tokens
    (``t < lengths[b, h]``) / 448, 1 for a head whose live values are all 0 (no NaN). Mutates nothing;
    device ops only (no host sync)."""
    B, H, T, _ = x.shape
    live = (torch.arange(T, device=x.device).view(1, 1, T) < lengths.to(x.device).unsqueeze(-1)).unsqueeze(-1)
    amax = torch.where(live, x.abs(), torch.zeros((), dtype=x.dtype, device=x.device)).to(torch.float32)
    amax = amax.amax(dim=(0, 2, 3)) if x.numel() else torch.zeros(H, dtype=torch.float32, device=x.device)
    scale = amax / reference.FP8_MAX
    return torch.where(amax > 0, scale, torch.ones_like(scale))


@dataclass
class FP8KVCache:
    """One layer's FP8 (e4m3fn) KV cache with per-kv-head scales, the vLLM / FlashInfer layout.

    Tensors (one device): k_fp8 / v_fp8 ``[B, Hkv, C, D]`` float8_e4m3fn (slot t = token t),
    k_scale / v_scale ``[Hkv]`` float32 (x ≈ code * scale), lengths ``[B, Hkv]`` int32. Scales are
    static: set by :meth:`calibrate_` (amax / 448 of a prefill) or given to :meth:`empty`.
    """

    k_fp8: torch.Tensor
    v_fp8: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def empty(cls, B: int, Hkv: int, capacity: int, D: int, *, k_scale=None, v_scale=None, device="cpu"):
        """An empty cache (lengths 0); scales default to 1 (call :meth:`calibrate_` or pass them)."""
        public = "kvkern.FP8KVCache.empty"
        if min(B, Hkv, capacity, D) < 0 or Hkv == 0 or D == 0:
            raise ValueError(f"{public}: expected B, capacity >= 0 and Hkv, D > 0, got "
                             f"B={B}, Hkv={Hkv}, capacity={capacity}, D={D}")

        def scale(s, name):
            if s is None:
                return torch.ones(Hkv, dtype=torch.float32, device=device)
            s = torch.as_tensor(s, dtype=torch.float32, device=device).reshape(-1).clone()
            if s.numel() == 1:
                s = s.expand(Hkv).clone()
            if s.shape != (Hkv,):
                raise ValueError(f"{public}: {name}: expected a scalar or [Hkv] = [{Hkv}], got {list(s.shape)}")
            return s

        z = torch.zeros(B, Hkv, capacity, D, dtype=torch.float8_e4m3fn, device=device)
        return cls(z, z.clone(), scale(k_scale, "k_scale"), scale(v_scale, "v_scale"),
                   torch.zeros(B, Hkv, dtype=torch.int32, device=device))

    @property
    def tensors(self) -> tuple:
        return (self.k_fp8, self.v_fp8)

    @property
    def capacity(self) -> int:
        return self.k_fp8.shape[2]

    def calibrate_(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor):
        """Sets the scales from a prefill ``k, v [B, Hkv, T, D]`` (:func:`fp8_scales`)."""
        self.k_scale.copy_(fp8_scales(k, lengths))
        self.v_scale.copy_(fp8_scales(v, lengths))
        return self

    def nbytes(self) -> dict:
        """Exact bytes (1 per element plus the fp32 scales), and the ratio against a bf16 dense cache
        of the same capacity (``2 * B * Hkv * C * D * 2`` bytes)."""
        sizes = {n: t.numel() * t.element_size() for n, t in
                 (("k_fp8", self.k_fp8), ("v_fp8", self.v_fp8), ("k_scale", self.k_scale), ("v_scale", self.v_scale))}
        total = sum(sizes.values())
        B, H, C, D = self.k_fp8.shape
        dense = 2 * B * H * C * D * 2
        return {**sizes, "total": total, "bf16_dense": dense, "ratio": total / dense if dense else 0.0}

    def fill_(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *, calibrate: bool = False,
              backend: str = "auto"):
        """Quantizes a prefill ``k, v [B, Hkv, T, D]`` (T <= capacity) with ``lengths [B, Hkv]`` int32
        (each <= T) into this cache; ``calibrate=True`` first sets the scales from it. Mutates the
        codes of the live slots and ``self.lengths``."""
        if calibrate:
            self.calibrate_(k, v, lengths)
        quantize_fp8_kv_(k, v, lengths, self, backend=backend)
        self.lengths.copy_(lengths)
        return self

    def append_(self, k_new: torch.Tensor, v_new: torch.Tensor, *, backend: str = "auto"):
        """One decode step: ``k_new, v_new [B, Hkv, D]`` become token ``lengths`` of each head."""
        append_fp8_kv_(k_new, v_new, self, backend=backend)
        return self

    def attention(self, q: torch.Tensor, sm_scale: float | None = None, *, return_lse: bool = False,
                  backend: str = "auto", num_splits: int = 0):
        """Decode attention of ``q [B, Hq, D]`` over this cache (see :func:`fp8_decode_attention`)."""
        return fp8_decode_attention(q, self, sm_scale, return_lse=return_lse, backend=backend,
                                    num_splits=num_splits)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(k, v) [B, Hkv, C, D]`` in ``dtype`` (fp32 code * scale), 0 past ``lengths``. For
        inspection and tests: attention never materializes it."""
        H, C = self.k_fp8.shape[1], self.capacity
        live = (torch.arange(C, device=self.k_fp8.device).view(1, 1, C) < self.lengths.unsqueeze(-1)).unsqueeze(-1)
        k = reference.dequantize_fp8(self.k_fp8, self.k_scale.view(1, H, 1, 1))
        v = reference.dequantize_fp8(self.v_fp8, self.v_scale.view(1, H, 1, 1))
        return torch.where(live, k, 0.0).to(dtype), torch.where(live, v, 0.0).to(dtype)


def quantize_fp8_kv_(k, v, lengths, cache: FP8KVCache, *, backend: str = "auto") -> FP8KVCache:
    """Codes of a prefill ``k, v [B, Hkv, T, D]`` (fp32 / fp16 / bf16, T <= C) into ``cache``'s
    slots ``t < lengths[b, h]`` (mutated; ``cache.lengths`` is not), with the cache's scales."""
    public = "kvkern.quantize_fp8_kv_"
    _check_cache(public, cache, FP8KVCache)
    _check_dense(public, k, v, lengths)
    fn, _ = choose_kernel("quantize_fp8_kv_", public, k.device, backend, _dtype_key(k.shape[-1], k.dtype),
                          {"batch_heads": k.shape[0] * k.shape[1], "tokens": k.shape[2]})
    fn(k, v, lengths, cache.k_scale, cache.v_scale, cache.k_fp8, cache.v_fp8)
    return cache


def append_fp8_kv_(k_new, v_new, cache: FP8KVCache, *, backend: str = "auto") -> FP8KVCache:
    """One decode step in place (no host sync): ``k_new, v_new [B, Hkv, D]`` into slot
    ``cache.lengths[b, h]``, which is incremented. A full head raises on CPU; on CUDA it is left
    untouched (lengths included)."""
    public = "kvkern.append_fp8_kv_"
    _check_cache(public, cache, FP8KVCache)
    _check_step(public, k_new, v_new)
    fn, _ = choose_kernel("append_fp8_kv_", public, k_new.device, backend, _dtype_key(k_new.shape[-1], k_new.dtype),
                          {"batch_heads": k_new.shape[0] * k_new.shape[1]})
    fn(k_new, v_new, cache.lengths, cache.k_scale, cache.v_scale, cache.k_fp8, cache.v_fp8)
    return cache


def fp8_decode_attention(q, cache: FP8KVCache, sm_scale: float | None = None, *, return_lse: bool = False,
                         backend: str = "auto", num_splits: int = 0):
    """Attention of one query per sequence ``q [B, Hq, D]`` (fp32 / fp16 / bf16, D in {64, 128, 256})
    over the fp8 cache, decoding in registers. Equals :func:`kvkern.decode_attention` over
    :meth:`FP8KVCache.dequantize` (fp32 accumulation). Returns ``out [B, Hq, D]`` (q's dtype), and
    ``lse [B, Hq]`` float32 with ``return_lse``. Mutates nothing."""
    public = "kvkern.fp8_decode_attention"
    _check_cache(public, cache, FP8KVCache)
    V.require_tensor(public, "q", q, 3, "[B, Hq, D]")
    V.check_launch_config(public, {"num_splits": num_splits})
    B, Hkv, C = cache.k_fp8.shape[0], cache.k_fp8.shape[1], cache.k_fp8.shape[2]
    static = _dtype_key(q.shape[2], q.dtype)
    fn, (tuned_splits,) = choose_kernel("fp8_decode_attention", public, q.device, backend,
                                        static and {**static, "group": int(q.shape[1] // max(Hkv, 1))},
                                        {"batch_heads": B * Hkv, "capacity": C})
    out, lse = fn(
        q, cache.k_fp8, cache.v_fp8, cache.k_scale, cache.v_scale, cache.lengths,
        None if sm_scale is None else float(sm_scale), num_splits or tuned_splits)
    return (out, lse) if return_lse else out
