# SPDX-License-Identifier: Apache-2.0
"""kvkern inside Hugging Face transformers: a compressing KV cache for ``model.generate``.

::

    from kvkern.integrations import hf
    cache = hf.make_cache(model, "snapkv", budget=256, interval=64, max_new_tokens=128)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=128, do_sample=False)
    hf.cache_nbytes(cache), hf.compression_seconds(cache)

How it plugs in. :func:`enable` registers an attention function ``"kvkern"`` with transformers'
``AttentionInterface`` (and SDPA's mask builder under the same name) and switches the model to it.
The cache's ``update`` only hands the new keys/values of that layer to the attention function; the
attention function, which also sees the queries (post-RoPE) and ``position_ids``, owns the sequence:

* prefill (empty cache, ``q_len > 1``): SDPA over the uncompressed prompt (transformers' own mask),
  then the layer's policy compresses the prompt's keys/values in place (kvkern ``evict_`` et al.,
  observing the last ``window`` queries, or all the prompt's queries for H2O, or pre-RoPE query
  statistics for Expected Attention), and the survivors move into buffers allocated at the static
  capacity ``budget + interval`` (``budget + max_new_tokens`` when ``interval == 0``; prompt +
  ``max_new_tokens`` for ``"full"``): the prompt-sized buffers are freed.
* decoding: the token is appended at each head's length and attends through
  :func:`kvkern.decode_attention` over the static buffers with per-head lengths (the quantized
  methods through :func:`kvkern.quant_decode_attention`); every ``interval`` decoded tokens the
  policy compresses again. A chunk of ``q_len > 1`` after the prefill (teacher forcing in blocks)
  is exact too: its tokens are appended and attend one at a time.
* a cache that is not a kvkern cache (``DynamicCache``, ``StaticCache``) takes transformers' SDPA path
  unchanged, so the same model object also produces the full-cache reference.

Positions. After eviction a head's slot count differs from the tokens seen, so the cache keeps both:
``get_seq_length()`` returns the tokens SEEN (what transformers uses for ``position_ids`` and mask
sizes: RoPE positions keep counting absolute positions), each slot stores its absolute position
(``LayerCache.positions``), and a decode query attends to every live slot (the causal mask over a
compacted cache is "all live slots").

Supported versions: transformers 5.23.0 (tested). Other 5.x releases whose attention modules call
``past_key_values.update(k, v, layer_idx)`` and then ``ALL_ATTENTION_FUNCTIONS.get_interface(...)``, and
whose ``CacheLayerMixin`` has this interface, are expected to work; 4.x is not supported (its cache API
differs: ``cache_position`` kwargs, no layer objects).

Supported models: ``model_type`` in :data:`SUPPORTED_MODEL_TYPES` — tested: Llama (SmolLM2-135M and a
random tiny Llama), and random tiny Mistral, Qwen2 and Qwen3 (full budget equal to ``DynamicCache``).
GQA or MHA, full attention in every layer (no sliding-window or chunked layers), head dim 64 / 128 / 256
(the decode kernel's), RoPE over the whole head with a static ``inv_freq`` (not "dynamic"/"longrope").
Anything else raises one ``ValueError`` naming what was found.

Generation: greedy decoding and sampling; beam search through ``reorder_cache`` (``index_select`` on the
batch dim); no assisted/speculative decoding (a compressed cache cannot ``crop``); no
``torch.compile`` of the model (the decode path has host-side bookkeeping). Batches: ``B > 1`` without
padding (each sequence keeps its own slots); a padded batch is refused. Inference only (no autograd
through the cache). ``output_attentions`` returns None for kvkern layers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

try:
    import transformers
except ModuleNotFoundError as err:  # pragma: no cover - exercised only without transformers
    raise ModuleNotFoundError(
        "kvkern.integrations.hf needs transformers>=5 (tested 5.23.0): pip install transformers==5.23.0") from err
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"kvkern.integrations.hf needs transformers>=5 (tested 5.23.0); found {transformers.__version__}, "
                      "whose cache API differs: pip install transformers==5.23.0")
try:
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as err:  # pragma: no cover - a 5.x release that moved these
    raise ImportError(f"kvkern.integrations.hf: transformers {transformers.__version__} lacks an interface it needs "
                      f"({err}); tested with 5.23.0") from err

import kvkern

from .. import policies as P
from ..policies.cache import LayerCache, QueryWindow

__all__ = ["METHODS", "SUPPORTED_MODEL_TYPES", "ATTN_NAME", "enable", "make_cache", "cache_nbytes",
           "compression_seconds", "KVKernCache", "KVKernLayer"]

ATTN_NAME = "kvkern"

METHODS: dict[str, str] = {
    "full": "kvkern static cache, no compression (capacity = prompt + max_new_tokens)",
    "snapkv": "SnapKV: mean attention of the last `window` queries, pooled; the window is kept",
    "knorm": "KNorm: keeps the keys of smallest L2 norm (query-free)",
    "streaming_llm": "StreamingLLM: 4 attention sinks + the most recent tokens",
    "tova": "TOVA: attention of the last query averaged over all heads; one kept set per layer",
    "expected_attention": "Expected Attention: Gaussian future-query attention x ||v|| from pre-RoPE statistics",
    "observed_attention": "H2O / ObservedAttention: attention accumulated over every query seen (prefill and decode)",
    "adakv": "AdaKV around SnapKV: head-wise budgets from a global top-k, really freed",
    "pyramidkv": "PyramidKV: SnapKV scores, per-layer budgets (lower layers keep more; budget = the average)",
    "gkv": "G-KV: decayed-max global window score mixed with key redundancy",
    "keydiff": "KeyDiff: keeps the keys least similar to the head's mean key (query-free)",
    "random": "Random eviction (seeded baseline)",
    "kivi4": "KIVI-style 4-bit quantized cache (keys per channel, values per token, group 32, fp residual ring)",
    "kivi2": "KIVI-style 2-bit quantized cache (group 32, fp residual ring)",
    "tada4": "TaDA 4-bit: mean-centred over kv heads, then KIVI-style 4-bit (group 32)",
}
_QUANT = {"kivi4": (4, False), "kivi2": (2, False), "tada4": (4, True)}
_EVICTION = tuple(m for m in METHODS if m != "full" and m not in _QUANT)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_HEAD_DIMS = (64, 128, 256)
_UNSUPPORTED_ROPE = ("dynamic", "longrope")


# -----------------------------------------------------------------------------------------------
# Model checks and the attention function
# -----------------------------------------------------------------------------------------------

def _text_config(model):
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"kvkern.integrations.hf: expected a transformers PreTrainedModel, got "
                         f"{type(model).__name__}")
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _rotary(model):
    base = getattr(model, "model", model)
    return getattr(base, "rotary_emb", None)


def _check_model(model) -> None:
    """One ValueError naming what is unsupported (see the module docstring)."""
    cfg = _text_config(model)
    mt = getattr(cfg, "model_type", None)
    where = f"kvkern.integrations.hf: model {type(model).__name__} (model_type={mt!r})"
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{where} is not supported: expected a Llama-family decoder with model_type in "
                         f"{list(SUPPORTED_MODEL_TYPES)}")
    if getattr(cfg, "is_encoder_decoder", False):
        raise ValueError(f"{where}: encoder-decoder models are not supported")
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        bad = sorted({t for t in layer_types if t != "full_attention"})
        raise ValueError(f"{where}: every layer must use full attention; found layer types {bad}")
    sw = getattr(cfg, "sliding_window", None)
    if sw is not None and getattr(cfg, "use_sliding_window", True):
        raise ValueError(f"{where}: sliding-window attention (sliding_window={sw}) is not supported")
    H, Hkv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if H % Hkv:
        raise ValueError(f"{where}: num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv}")
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    if D not in _HEAD_DIMS:
        raise ValueError(f"{where}: head_dim={D} is not supported by kvkern.decode_attention "
                         f"(expected one of {list(_HEAD_DIMS)})")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rtype = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rtype in _UNSUPPORTED_ROPE:
        raise ValueError(f"{where}: RoPE type {rtype!r} changes its frequencies with the length; not supported")
    rot = _rotary(model)
    if rot is None or not hasattr(rot, "inv_freq"):
        raise ValueError(f"{where}: no rotary embedding module (model.model.rotary_emb) found")
    if rot.inv_freq.numel() * 2 != D:
        raise ValueError(f"{where}: partial rotary embeddings (rotary dim {rot.inv_freq.numel() * 2} < head_dim "
                         f"{D}) are not supported")


_HANDOFF = threading.local()  # the layer whose update() ran last on this thread: the attention call that follows


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
               **kwargs):
    """The ``"kvkern"`` attention function: a kvkern cache's layer when its update just ran, SDPA otherwise."""
    layer = getattr(_HANDOFF, "layer", None)
    if layer is not None and layer._pending is not None and layer._pending[0] is key:
        _HANDOFF.layer = None
        return layer._attend(module, query, attention_mask, scaling, kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        AttentionInterface.register(ATTN_NAME, _attention)
        # Prefill and fallbacks run SDPA, so the name gets SDPA's mask builder.
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _REGISTERED = True


def enable(model):
    """Registers the ``"kvkern"`` attention function and switches ``model`` to it (idempotent).

    The model keeps working with transformers' own caches (they take the SDPA path), so one model
    object serves both the kvkern run and the full-cache reference. Raises ValueError for an
    unsupported model. Returns ``model``.
    """
    _check_model(model)
    _register()
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        raise ValueError(f"kvkern.integrations.hf: {type(model).__name__} refused attn_implementation="
                         f"{ATTN_NAME!r} (its attention does not go through transformers' AttentionInterface)")
    return model


# -----------------------------------------------------------------------------------------------
# The cache
# -----------------------------------------------------------------------------------------------

@dataclass
class _Spec:
    method: str
    budget: int | None
    ratio: float | None
    interval: int
    max_new_tokens: int
    window: int
    policy_kwargs: dict
    num_layers: int
    inv_freq: torch.Tensor
    attention_scaling: float
    quant: tuple | None = None  # (bits, mean_centred, group, residual)
    stats: dict = field(default_factory=lambda: {"compress_s": 0.0, "compressions": 0})


def _make_policy(spec: _Spec, layer_idx: int):
    m, kw = spec.method, dict(spec.policy_kwargs)
    bud = dict(budget=spec.budget, ratio=spec.ratio)
    if m in ("full",) or m in _QUANT:
        return None
    if m == "snapkv":
        return P.SnapKV(**bud, window=spec.window, **kw)
    if m == "knorm":
        return P.KNorm(**bud, **kw)
    if m == "streaming_llm":
        return P.StreamingLLM(**bud, **kw)
    if m == "tova":
        return P.TOVA(**bud, **kw)
    if m == "expected_attention":
        return P.ExpectedAttention(**bud, inv_freq=spec.inv_freq, attention_scaling=spec.attention_scaling, **kw)
    if m == "observed_attention":
        return P.H2O(**bud, **kw)
    if m == "adakv":
        safeguard = kw.pop("safeguard", 0.2)
        return P.AdaKV(P.SnapKV(**bud, window=spec.window, **kw), safeguard=safeguard)
    if m == "pyramidkv":
        return P.PyramidKV(**bud, layer_idx=layer_idx, num_layers=spec.num_layers, window=spec.window, **kw)
    if m == "gkv":
        kw.setdefault("divide_length", spec.interval or 128)
        if spec.budget is None:
            return P.GKV(None, spec.ratio, window=spec.window, **kw)
        return P.GKV(spec.budget, window=spec.window, **kw)
    if m == "keydiff":
        return P.KeyDiff(**bud, **kw)
    if m == "random":
        return P.RandomEviction(**bud, **kw)
    raise AssertionError(m)


def _unrope(q: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> torch.Tensor:
    """Pre-RoPE queries from post-RoPE ones (HF rotate-half): ``q = R(-theta) q_post / scaling``."""
    ang = pos.to(torch.float32)[:, None, :, None] * inv_freq.to(q.device, torch.float32)  # [B, 1, T, D/2]
    ang = torch.cat([ang, ang], dim=-1)
    cos, sin = ang.cos(), ang.sin()
    qf = q.to(torch.float32)
    half = qf.shape[-1] // 2
    rot = torch.cat([-qf[..., half:], qf[..., :half]], dim=-1)
    return ((qf * cos - rot * sin) / scaling).to(q.dtype)


def _append_token(lc: LayerCache, k1: torch.Tensor, v1: torch.Tensor, pos1: torch.Tensor, n_seen: int) -> None:
    """Writes one token (``k1, v1 [B, Hkv, 1, D]``, absolute position ``pos1 [B, 1]``) at each head's
    length. ``LayerCache.append_`` without its host-side checks (the caller sized the capacity), so a
    decode step reads nothing back from the device."""
    B, H, _, D = lc.k.shape
    idx = lc.lengths.to(torch.int64).view(B, H, 1)
    lc.k.scatter_(2, idx.unsqueeze(-1).expand(B, H, 1, D), k1.to(lc.k.dtype))
    lc.v.scatter_(2, idx.unsqueeze(-1).expand(B, H, 1, D), v1.to(lc.v.dtype))
    lc.positions.scatter_(2, idx, pos1.to(torch.int32).view(B, 1, 1).expand(B, H, 1))
    if lc.log_w is not None:
        lc.log_w.scatter_(2, idx, torch.zeros(B, H, 1, dtype=lc.log_w.dtype, device=lc.log_w.device))
    lc.lengths += 1
    lc.next_position = n_seen


def _stack_heads(outs: list) -> torch.Tensor:
    """T outputs ``[B, Hq, D]`` -> ``[B, T, Hq, D]``, the layout attention functions return."""
    return outs[0].unsqueeze(1) if len(outs) == 1 else torch.stack(outs, dim=1)


class KVKernLayer(CacheLayerMixin):
    """One layer of a :class:`KVKernCache`: a :class:`~kvkern.policies.LayerCache` (or a
    :class:`kvkern.QuantizedKVCache`), its policy and its query windows."""

    is_compileable = False
    is_sliding = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, spec: _Spec, layer_idx: int):
        super().__init__()
        self.spec = spec
        self.layer_idx = layer_idx
        self.policy = _make_policy(spec, layer_idx)
        self.lc: LayerCache | None = None
        self.qc = None  # kvkern.QuantizedKVCache for the quantized methods
        self.n_seen = 0
        self.decoded = 0  # tokens appended since the prefill (the compression clock)
        # Host copy of max(lengths), kept without reading the device: a decode step then needs no
        # host sync (one per compression instead).
        self.live_max = 0
        self._pending = None
        m = spec.method
        self.q_win = QueryWindow(max(spec.window, 1)) if m in ("snapkv", "tova", "adakv", "pyramidkv", "gkv") else None
        # Expected Attention's statistics while decoding: the last 256 pre-RoPE queries.
        self.q_pre = QueryWindow(256) if m == "expected_attention" else None

    # -- transformers' layer interface --------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self._pending is not None:
            raise RuntimeError(
                "kvkern.integrations.hf: the previous update of this kvkern cache layer was never consumed by the "
                f"'{ATTN_NAME}' attention function: call hf.enable(model) (make_cache does) and do not switch the "
                "model's attn_implementation while a kvkern cache is in use")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = (key_states, value_states)
        _HANDOFF.layer = self
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks are built over absolute positions, as for a DynamicLayer; only the prefill's is used.
        return self.n_seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        t = self._storage_tensor()
        return -1 if t is None else t.shape[0]

    def _storage_tensor(self):
        if self.lc is not None:
            return self.lc.k
        if self.qc is not None:
            return self.qc.lengths
        return None

    def reset(self) -> None:
        self.lc = self.qc = None
        self.n_seen = self.decoded = self.live_max = 0
        self._pending = None
        if self.q_win is not None:
            self.q_win.q = None
        if self.q_pre is not None:
            self.q_pre.q = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:  # generate's deferred stop check calls crop(0)
            return
        raise NotImplementedError("kvkern.integrations.hf: a compressed cache cannot be cropped (evicted tokens are "
                                  "gone); assisted / speculative decoding is not supported")

    def _map_batch(self, fn) -> None:
        def f(x):
            return None if x is None else fn(x)
        if self.lc is not None:
            c = self.lc
            self.lc = LayerCache(f(c.k), f(c.v), f(c.lengths), f(c.positions), f(c.hist), f(c.hist_lengths),
                                 f(c.log_w), c.next_position)
        if self.qc is not None:
            from ..quant_ops import FIELDS
            for name in FIELDS:
                setattr(self.qc, name, f(getattr(self.qc, name)))
            self.qc.lengths = f(self.qc.lengths)
        for w in (self.q_win, self.q_pre):
            if w is not None and w.q is not None:
                w.q = f(w.q)
        lengths = self.lc.lengths if self.lc is not None else self.qc.lengths if self.qc is not None else None
        self.live_max = int(lengths.max()) if lengths is not None and lengths.numel() else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda x: x.index_select(0, beam_idx.to(x.device)).contiguous())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda x: x[indices].contiguous())

    # -- memory -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        total = 0
        if self.lc is not None:
            c = self.lc
            for t in (c.k, c.v, c.lengths, c.positions, c.hist, c.hist_lengths, c.log_w):
                if t is not None:
                    total += t.numel() * t.element_size()
        if self.qc is not None:
            total += self.qc.nbytes()["total"] + self.qc.lengths.numel() * self.qc.lengths.element_size()
        return total

    @property
    def capacity(self) -> int:
        if self.lc is not None:
            return self.lc.capacity
        if self.qc is not None:
            return self.qc.capacity
        return 0

    # -- the work -----------------------------------------------------------------------------
    def _positions(self, kwargs, B: int, T: int, device) -> torch.Tensor:
        pos = kwargs.get("position_ids")
        if pos is None or pos.shape[-1] != T:
            return torch.arange(self.n_seen, self.n_seen + T, device=device).expand(B, T)
        return pos.to(device).expand(B, T)

    def _slack(self) -> int:
        s = self.spec
        return s.interval if s.interval > 0 and self.policy is not None else s.max_new_tokens

    @torch.no_grad()
    def _attend(self, module, query, attention_mask, scaling, kwargs):
        # Inference only: the cache is mutated in place and nothing here is differentiable.
        key, value = self._pending
        self._pending = None
        B, Hq, T, D = query.shape
        scaling = D ** -0.5 if scaling is None else float(scaling)
        pos = self._positions(kwargs, B, T, query.device)
        if self.lc is None and self.qc is None:
            out = self._prefill(module, query, key, value, attention_mask, scaling, kwargs, pos)
        else:
            out = self._extend(query, key, value, scaling, pos)
        return out, None

    def _compress(self, t0: float | None = None, **obs) -> None:
        t0 = time.perf_counter() if t0 is None else t0
        self.policy.compress(self.lc, **obs)
        self.live_max = int(self.lc.lengths.max())
        self.spec.stats["compress_s"] += time.perf_counter() - t0
        self.spec.stats["compressions"] += 1

    def _obs(self) -> dict:
        """What the policy observes at a decode-time compression."""
        if self.q_win is not None:
            return {"q_win": self.q_win.get()}
        if self.q_pre is not None:
            return {"q_prerope": self.q_pre.get()}
        return {}

    def _push(self, query, pos) -> None:
        if self.q_win is not None:
            self.q_win.push(query)
        if self.q_pre is not None:
            self.q_pre.push(_unrope(query, pos, self.spec.inv_freq, self.spec.attention_scaling))

    def _prefill(self, module, query, key, value, attention_mask, scaling, kwargs, pos):
        B, Hq, T, D = query.shape
        if attention_mask is not None:
            last = attention_mask[:, :, -1, :]
            ok = last.all() if last.dtype == torch.bool else bool((last == 0).all())
            if not bool(ok):
                raise ValueError("kvkern.integrations.hf: padded batches are not supported (the prompt's attention "
                                 "mask hides some tokens); run sequences one at a time or without padding")
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=scaling,
                                        **{k: v for k, v in kwargs.items() if k in ("is_causal",)})
        self.n_seen = max(T, int(pos.max()) + 1)
        spec = self.spec
        if spec.quant is not None:
            self._prefill_quant(key, value, T)
            return out
        if self.policy is None:  # "full": one allocation at prompt + max_new_tokens
            lc = LayerCache.empty(B, key.shape[1], T + spec.max_new_tokens, D, key.dtype, key.device)
            lc.append_(key, value, pos.to(torch.int32))
            self.lc, self.live_max = lc, T
            return out
        # Compress the prompt's own buffers in place, then move the survivors to the static capacity.
        lc = LayerCache(k=key.contiguous(), v=value.contiguous(),
                        lengths=torch.full((B, key.shape[1]), T, dtype=torch.int32, device=key.device),
                        positions=pos.to(torch.int32).unsqueeze(1).expand(B, key.shape[1], T).contiguous(),
                        next_position=int(pos.max()) + 1)
        t0 = time.perf_counter()
        self._push(query, pos)
        if spec.method == "observed_attention":
            obs = {"q": query}  # H2O accumulates the attention of every prompt query first
        elif spec.method == "expected_attention":
            obs = {"q_prerope": _unrope(query, pos, spec.inv_freq, spec.attention_scaling)}  # the whole prompt's
        else:
            obs = self._obs()
        self.lc = lc
        self._compress(t0, **obs)
        # A prompt shorter than the budget grows up to it before the first decode-time compression.
        self.lc = self._reallocate(lc, max(self.live_max, self.policy.n_kept(T)) + self._slack())
        return out

    def _reallocate(self, lc: LayerCache, capacity: int) -> LayerCache:
        B, H, _, D = lc.k.shape
        n = min(lc.capacity, capacity)
        new = LayerCache.empty(B, H, capacity, D, lc.k.dtype, lc.k.device, with_hist=lc.hist is not None,
                               with_log_w=lc.log_w is not None)
        new.k[:, :, :n].copy_(lc.k[:, :, :n])
        new.v[:, :, :n].copy_(lc.v[:, :, :n])
        new.positions[:, :, :n].copy_(lc.positions[:, :, :n])
        new.lengths.copy_(lc.lengths)
        if lc.hist is not None:
            new.hist[:, :, :n].copy_(lc.hist[:, :, :n])
            new.hist_lengths.copy_(lc.hist_lengths)
        if lc.log_w is not None:
            new.log_w[:, :, :n].copy_(lc.log_w[:, :, :n])
        new.next_position = lc.next_position
        return new

    def _extend(self, query, key, value, scaling, pos):
        B, Hq, T, D = query.shape
        if self.qc is not None:
            return self._extend_quant(query, key, value, scaling, pos)
        lc = self.lc
        need = self.live_max + T
        if need > lc.capacity:
            # Past what make_cache sized for (more tokens than max_new_tokens, or a growing ratio budget).
            self.lc = lc = self._reallocate(lc, need + self._slack())
        outs = []
        h2o = self.spec.method == "observed_attention"
        # A chunk attends token by token: each query sees the live slots plus the chunk's earlier
        # tokens, which is exactly the causal mask over a compacted cache.
        for t in range(T):
            _append_token(lc, key[:, :, t:t + 1], value[:, :, t:t + 1], pos[:, t:t + 1], self.n_seen + t + 1)
            outs.append(kvkern.decode_attention(query[:, :, t], lc.k, lc.v, lc.lengths, lc.log_w, scaling))
            if h2o:
                t0 = time.perf_counter()
                self.policy.observe(lc, query[:, :, t:t + 1])
                self.spec.stats["compress_s"] += time.perf_counter() - t0
        # position_ids come from get_seq_length() (transformers) or follow on (ours): no device read
        self.n_seen += T
        self.live_max += T
        if self.policy is not None:
            self._push(query, pos)
            before, self.decoded = self.decoded, self.decoded + T
            iv = self.spec.interval
            if iv > 0 and self.decoded // iv > before // iv:
                self._compress(**self._obs())
        return _stack_heads(outs)

    # -- quantized ------------------------------------------------------------------------------
    def _prefill_quant(self, key, value, T: int) -> None:
        bits, centred, group, residual = self.spec.quant
        B, H, _, D = key.shape
        cap = -(-(T + self.spec.max_new_tokens) // residual) * residual
        qc = kvkern.QuantizedKVCache.empty(B, H, cap, D, bits=bits, group=group, residual=residual,
                                           mean_centred=centred, dtype=key.dtype, device=key.device)
        qc.fill_(key.contiguous(), value.contiguous(), torch.full((B, H), T, dtype=torch.int32, device=key.device))
        self.qc, self.live_max = qc, T

    def _extend_quant(self, query, key, value, scaling, pos):
        B, Hq, T, D = query.shape
        qc = self.qc
        if self.live_max + T > qc.capacity:
            self._grow_quant(self.live_max + T)
            qc = self.qc
        outs = []
        for t in range(T):
            qc.append_(key[:, :, t].contiguous(), value[:, :, t].contiguous())
            outs.append(qc.attention(query[:, :, t].contiguous(), scaling))
        self.n_seen += T
        self.live_max += T
        return _stack_heads(outs)

    def _grow_quant(self, need: int) -> None:
        bits, centred, group, residual = self.spec.quant
        old = self.qc
        k, v = old.dequantize()
        B, H, _, D = k.shape
        cap = -(-(need + self.spec.max_new_tokens) // residual) * residual
        qc = kvkern.QuantizedKVCache.empty(B, H, cap, D, bits=bits, group=group, residual=residual,
                                           mean_centred=centred, dtype=k.dtype, device=k.device)
        n = int(old.lengths.max())
        qc.fill_(k[:, :, :n].contiguous(), v[:, :, :n].contiguous(), old.lengths.clone())
        self.qc = qc


class KVKernCache(Cache):
    """A transformers :class:`~transformers.Cache` whose layers are :class:`KVKernLayer`. Build it with
    :func:`make_cache`; one cache serves one generation (call ``reset()`` to reuse it)."""

    def __init__(self, spec: _Spec):
        super().__init__(layers=[KVKernLayer(spec, i) for i in range(spec.num_layers)])
        self.spec = spec

    @property
    def method(self) -> str:
        return self.spec.method

    def lengths(self) -> list[torch.Tensor]:
        """Per layer: int32 ``[B, Hkv]`` live slots per head."""
        return [(layer.lc.lengths if layer.lc is not None else layer.qc.lengths).clone() for layer in self.layers
                if layer.lc is not None or layer.qc is not None]

    def positions(self) -> list[list[list[list[int]]]]:
        """Per layer, per batch, per kv head: the absolute positions of the live slots (eviction methods)."""
        out = []
        for layer in self.layers:
            lc = layer.lc
            if lc is None:
                continue
            B, H = lc.lengths.shape
            out.append([[lc.positions[b, h, :int(lc.lengths[b, h])].tolist() for h in range(H)] for b in range(B)])
        return out

    def capacities(self) -> list[int]:
        """Per layer: the slots allocated per (batch, kv head)."""
        return [layer.capacity for layer in self.layers]

    @property
    def stats(self) -> dict:
        """``{"compress_s": wall seconds inside the policies, "compressions": policy calls (all layers)}``."""
        return dict(self.spec.stats)

    def reset(self):
        super().reset()
        self.spec.stats.update(compress_s=0.0, compressions=0)


# -----------------------------------------------------------------------------------------------
# Public API
# -----------------------------------------------------------------------------------------------

def make_cache(model, method: str, *, budget: int | None = None, ratio: float | None = None, interval: int = 0,
               max_new_tokens: int = 256, window: int = 32, **policy_kwargs) -> KVKernCache:
    """A kvkern cache for ``model`` (also calls :func:`enable`).

    Args:
        method: a key of :data:`METHODS`.
        budget: kept tokens per (layer, kv head) after a compression (PyramidKV: the layer average;
            AdaKV: the head average); or ``ratio``: the fraction REMOVED (KVPress convention) of the
            tokens seen. Exactly one of the two for eviction methods, neither for "full" and the
            quantized methods.
        interval: compress again every ``interval`` decoded tokens (0: at the prefill only).
        max_new_tokens: decoding room: the capacity is ``budget + interval`` (``budget + max_new_tokens``
            with ``interval == 0``; prompt + ``max_new_tokens`` for "full" and the quantized methods). A
            cache that overflows grows (reallocates) rather than fail.
        window: observation window (last queries) for SnapKV, AdaKV, PyramidKV, G-KV (and TOVA's last).
        policy_kwargs: passed to the policy's constructor (e.g. ``n_sink=``, ``kernel=``, ``seed=``,
            ``safeguard=`` for AdaKV); for quantized methods ``group=`` (32) and ``residual=`` (128).
    """
    if method not in METHODS:
        raise ValueError(f"kvkern.integrations.hf.make_cache: unknown method {method!r}; valid methods: "
                         f"{', '.join(METHODS)}")
    enable(model)
    if method in _EVICTION:
        if (budget is None) == (ratio is None):
            raise ValueError(f"kvkern.integrations.hf.make_cache: method {method!r} needs exactly one of budget (kept "
                             f"tokens per head) and ratio (fraction removed); got budget={budget!r}, ratio={ratio!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
            raise ValueError(f"kvkern.integrations.hf.make_cache: budget: expected an int >= 1, got {budget!r}")
        if ratio is not None and not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"kvkern.integrations.hf.make_cache: ratio: expected a fraction removed in [0, 1), "
                             f"got {ratio!r}")
    elif budget is not None or ratio is not None:
        raise ValueError(f"kvkern.integrations.hf.make_cache: method {method!r} keeps every token: give neither "
                         f"budget nor ratio (got budget={budget!r}, ratio={ratio!r})")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        raise ValueError(f"kvkern.integrations.hf.make_cache: interval: expected an int >= 0, got {interval!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"kvkern.integrations.hf.make_cache: max_new_tokens: expected an int >= 0, "
                         f"got {max_new_tokens!r}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"kvkern.integrations.hf.make_cache: window: expected an int >= 1, got {window!r}")
    cfg = _text_config(model)
    rot = _rotary(model)
    kw = dict(policy_kwargs)
    quant = None
    if method in _QUANT:
        bits, centred = _QUANT[method]
        group, residual = kw.pop("group", 32), kw.pop("residual", 128)
        if kw:
            raise ValueError(f"kvkern.integrations.hf.make_cache: method {method!r} takes only group= and "
                             f"residual=; got {sorted(kw)}")
        quant = (bits, centred, group, residual)
    spec = _Spec(method, budget, None if ratio is None else float(ratio), interval, max_new_tokens, window, kw,
                 cfg.num_hidden_layers, rot.inv_freq.detach().clone(), float(getattr(rot, "attention_scaling", 1.0)),
                 quant)
    # The layers build their policies now, so bad policy kwargs fail here rather than mid-forward.
    cache = KVKernCache(spec)
    pol = cache.layers[0].policy
    if pol is not None and budget is not None:
        pol._check_budget(budget)  # e.g. SnapKV's budget must hold its window
    if quant is not None:
        D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kvkern.QuantizedKVCache.empty(1, 2, quant[3], D, bits=quant[0], group=quant[2], residual=quant[3],
                                      dtype=torch.float32)  # raises for a bad group / residual
    return cache


def cache_nbytes(cache) -> int:
    """Bytes of the KV storage actually allocated, all layers, metadata included.

    kvkern cache: k/v buffers (or the quantized codes, scales, mins, means and residual rings),
    lengths, positions and score histories (H2O / G-KV) — what the decode loop holds; the policies'
    query windows (a few KB) are not counted. transformers ``DynamicCache`` / ``StaticCache``: every
    layer's keys and values (a StaticCache counts its whole preallocated length).
    """
    if isinstance(cache, KVKernCache):
        return sum(layer.nbytes() for layer in cache.layers)
    if isinstance(cache, Cache):
        total = 0
        for layer in cache.layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    raise TypeError(f"kvkern.integrations.hf.cache_nbytes: expected a transformers Cache, got {type(cache).__name__}")


def compression_seconds(cache) -> float:
    """Wall time spent inside the policies (scoring, eviction, H2O's accumulation) so far."""
    if not isinstance(cache, KVKernCache):
        raise TypeError(f"kvkern.integrations.hf.compression_seconds: expected a kvkern cache from make_cache, got "
                        f"{type(cache).__name__}")
    return float(cache.spec.stats["compress_s"])
