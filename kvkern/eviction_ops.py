# SPDX-License-Identifier: Apache-2.0
"""Front doors of the score-and-evict ops (re-exported by :mod:`kvkern.ops`).

Every method in ``specs/eviction-and-scoring.md`` is score -> protect -> select ->
compact; each stage is an op here, and :func:`score_evict_` fuses the decode-time
path. All follow the cache contract: static capacity ``C``, per-(batch, kv head)
``lengths`` int32 ``[B, Hkv]``, ``positions`` int32 ``[B, Hkv, C]``, compaction in
place, no output shape that depends on data, so every op runs inside CUDA graphs and
``torch.compile(fullgraph=True)``. Scores are float32 ``[B, Hkv, C]``, higher = keep,
0 past ``lengths``. ``kvkern.reference`` states each op's math exactly; the
docstrings below summarise it.

Shapes/dtypes/devices are checked by the ops themselves (one clear error each, before
anything is written); these wrappers add the checks that need Python (argument types,
the budget's form) and, in eager mode, the feasibility checks that read values (a GPU
kernel cannot raise without a host sync, so it would leave an infeasible head untouched).
"""

from __future__ import annotations

import math

import torch

from . import _validate as V
from . import tuning
from ._dispatch import DTYPE_KEYS as _DTYPE_KEYS, choose_kernel

__all__ = [
    "window_scores", "expected_attention_scores", "query_statistics", "average_rope", "slot_scores",
    "key_redundancy", "update_scores_", "select_keep", "compact_", "evict_", "allocate_head_budgets",
    "score_evict_", "EVICTION_TUNING",
]

# The tuner picks the faster backend (CUDA C++ or Triton) per shape bucket on each GPU for the
# pure ops that dominate the cost; the in-place ops follow the default preference (C++ first).
EVICTION_TUNING = {
    "window_scores": tuning.OpSpec(op="window_scores", static=("head_dim", "dtype", "group", "window"),
                                   dims=("batch_heads", "capacity"), config=()),
    "select_keep": tuning.OpSpec(op="select_keep", static=(), dims=("batch_heads", "capacity"), config=()),
}
for _spec in EVICTION_TUNING.values():
    tuning.register_spec(_spec)


def _run(op: str, public: str, ref: torch.Tensor, cache: torch.Tensor, backend: str, *args, static: tuple = ()):
    B, H, C = cache.shape[0], cache.shape[1], cache.shape[2]
    fn, _ = choose_kernel(op, public, ref.device, backend, dict(static), {"batch_heads": B * H, "capacity": C})
    return fn(*args)


def _tensor(public: str, name: str, x, rank: int | None = None, layout: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{public}: {name}: expected a torch.Tensor {layout}, got {type(x).__name__}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{public}: {name}: expected a {rank}-D tensor {layout}, got shape {list(x.shape)}")


def _int(public: str, name: str, x, low: int | None = 0) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{public}: {name}: expected an int, got {type(x).__name__}")
    if low is not None and x < low:
        raise ValueError(f"{public}: {name}: expected an int >= {low}, got {x}")
    return x


def _choice(public: str, name: str, x, allowed) -> str:
    if x not in allowed:
        raise ValueError(f"{public}: {name}: expected one of {list(allowed)}, got {x!r}")
    return x


def _budget(public: str, budget, lengths: torch.Tensor):
    """(budgets tensor or None, int budget) from an int or an int32 [B, Hkv] tensor."""
    if isinstance(budget, torch.Tensor):
        _tensor(public, "budget", budget, 2, "[B, Hkv] int32")
        if budget.dtype != torch.int32:
            raise ValueError(f"{public}: budget: expected dtype int32, got {str(budget.dtype).replace('torch.', '')}")
        if tuple(budget.shape) != tuple(lengths.shape):
            raise ValueError(f"{public}: budget: expected shape [B, Hkv] = {list(lengths.shape)}, "
                             f"got {list(budget.shape)}")
        if budget.device != lengths.device:
            raise ValueError(f"{public}: budget: expected the device of lengths ({lengths.device}), got {budget.device}")
        return budget, 0
    return None, _int(public, "budget", budget)


def _eager(x: torch.Tensor) -> bool:
    return not torch.compiler.is_compiling()


def _check_feasible(public, lengths, positions, budgets, budget, n_sink, n_recent, protect_ranges, keep_mask,
                    segment_cuts, segment_min, C: int) -> None:
    """Eager mode: the value checks that read data, done here for every backend (one host sync
    on a GPU), so an infeasible request raises the same ValueError everywhere instead of a GPU
    kernel leaving the head untouched. Under torch.compile they are skipped (documented)."""
    from .reference import protected_mask

    L = lengths.to(torch.int64)
    if int(L.min()) < 0 or int(L.max()) > C:
        raise ValueError(f"{public}: lengths: expected every value in [0, C] = [0, {C}], got "
                         f"{int(L.min()) if int(L.min()) < 0 else int(L.max())}")
    K = budgets.to(torch.int64) if budgets is not None else torch.full_like(L, budget)
    if int(K.min()) < 0:
        raise ValueError(f"{public}: budget: expected values >= 0, got {int(K.min())}")
    if protect_ranges is None and keep_mask is None:
        # Sinks [0, n_sink) and the recent [L - n_recent, L) of a head's L valid slots: their union
        # holds min(L, n_sink + n_recent) slots, so the [B, Hkv, C] mask is not needed (the common
        # case, and a per-call cost that showed in every prefill compression).
        prot = torch.clamp(L, max=n_sink + n_recent)
    else:
        if positions is None:
            B, H = lengths.shape
            positions = torch.arange(C, dtype=torch.int32, device=lengths.device).view(1, 1, C).expand(B, H, C)
        prot = protected_mask(lengths, positions, n_sink, n_recent, protect_ranges, keep_mask).sum(-1)
    bad = (L > K) & (prot > K)
    if bool(bad.any()):
        b, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"{public}: head [{b}, {j}]: {int(prot[b, j])} protected slots exceed the budget "
                         f"{int(K[b, j])}")
    if segment_cuts is not None and segment_cuts.numel() > 1 and bool((segment_cuts[1:] <= segment_cuts[:-1]).any()):
        raise ValueError(f"{public}: segment_cuts: expected strictly increasing positions, got {segment_cuts.tolist()}")
    if segment_cuts is not None:
        _check_segments(public, lengths, positions, K, n_sink, n_recent, protect_ranges, keep_mask, segment_cuts,
                        segment_min, C)


def _check_segments(public, lengths, positions, K, n_sink, n_recent, protect_ranges, keep_mask, segment_cuts,
                    segment_min, C: int) -> None:
    """The per-segment feasibility of reference.select_keep on every head with ``L > K``: without
    ``segment_min`` each segment's protected slots fit its quota (reference.segment_quotas), with it
    the protected slots plus the minima fit the budget. Arguments of the wrong form are left to the
    op's own checks (one clear error there)."""
    from .reference import _segment_of, protected_mask, segment_quotas

    B, H = lengths.shape
    int_types = (torch.int32, torch.int64)
    if not (isinstance(segment_cuts, torch.Tensor) and segment_cuts.dim() == 1 and segment_cuts.dtype in int_types
            and segment_cuts.device == lengths.device):
        return
    S = segment_cuts.numel() + 1
    if segment_min is not None and not (isinstance(segment_min, torch.Tensor) and segment_min.dim() == 1
                                        and segment_min.numel() == S and segment_min.dtype in int_types):
        return
    if positions is None:
        positions = torch.arange(C, dtype=torch.int32, device=lengths.device).view(1, 1, C).expand(B, H, C)
    elif not (isinstance(positions, torch.Tensor) and tuple(positions.shape) == (B, H, C)
              and positions.device == lengths.device):
        return
    L = lengths.to(torch.int64)
    active = L > K
    if not bool(active.any()):
        return
    valid = torch.arange(C, device=lengths.device).view(1, 1, C) < L.unsqueeze(-1)
    prot = protected_mask(lengths, positions, n_sink, n_recent, protect_ranges, keep_mask)
    seg = _segment_of(positions, segment_cuts)
    in_seg = [(seg == s) & valid for s in range(S)]
    counts = torch.stack([m.sum(-1) for m in in_seg], -1).tolist()  # [B][H][S]
    prot_s = torch.stack([(m & prot).sum(-1) for m in in_seg], -1).tolist()
    mins = None if segment_min is None else segment_min.to(torch.int64).tolist()
    Kl, act = K.tolist(), active.tolist()
    for b in range(B):
        for j in range(H):
            if not act[b][j]:
                continue
            n, ps, k = counts[b][j], prot_s[b][j], Kl[b][j]
            if mins is None:
                quota = segment_quotas(k, n)
                for s in range(S):
                    if ps[s] > quota[s]:
                        raise ValueError(f"{public}: head [{b}, {j}]: segment {s} has {ps[s]} protected slots but "
                                         f"a quota of {quota[s]} (budget {k})")
            else:
                need = sum(max(ps[s], min(max(mins[s], 0), n[s])) for s in range(S))
                if need > k:
                    raise ValueError(f"{public}: head [{b}, {j}]: protected slots and segment minima need {need} "
                                     f"slots, more than the budget {k}")


def _window_args(public, q_win, k_cache, lengths, query_reduce, group_reduce, pool) -> None:
    """The argument types and options of the window scoring (window_scores, score_evict_)."""
    _tensor(public, "q_win", q_win, 4, "[B, Hq, W, D]")
    _tensor(public, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    _tensor(public, "lengths", lengths, 2, "[B, Hkv]")
    _choice(public, "query_reduce", query_reduce, ("mean", "sum"))
    _choice(public, "group_reduce", group_reduce, ("mean", "max", "mean_all", "max_per_query"))
    _choice(public, "pool", pool, ("none", "avg", "max"))


def window_scores(q_win, k_cache, lengths, sm_scale=None, *, query_reduce="mean", group_reduce="mean",
                  normalize=False, pool="none", pool_kernel=1, backend="auto") -> torch.Tensor:
    """Attention that the last ``W`` queries pay to every cached slot (SnapKV, TOVA, G-KV, PyramidKV, AdaKV).

    Window query ``t`` is the token in slot ``L - W + t`` (``L = lengths[b, j]``) and sees the slots
    up to it (causal inside the window). Softmax over valid slots in fp32, then ``query_reduce``
    over the window (``"mean"`` | ``"sum"``), then ``group_reduce`` over the GQA group (``"mean"`` |
    ``"max"``: ``max_h mean_t``, SnapKV / AdaKV | ``"mean_all"``: all query heads, TOVA); or
    ``group_reduce="max_per_query"``: the max over the group for each window query first, then the
    ``query_reduce`` over the window (``mean_t max_h``, G-KV's local score; the same as ``"max"``
    when G == 1 or W == 1). Optional per-head max ``normalize`` over the
    candidate slots ``[0, L - W)`` (G-KV), optional pooling along those slots (``pool`` ``"avg"``
    with KVPress's count-include-pad, or ``"max"``; odd ``pool_kernel``). The ``W x C`` probability
    matrix never goes to memory.

    Args:
        q_win: ``[B, Hq, W, D]`` fp16/bf16/fp32, post-RoPE window queries.
        k_cache: ``[B, Hkv, C, D]``, q_win's dtype. lengths: ``[B, Hkv]`` int32.
        sm_scale: logit scale, default ``D ** -0.5``.
    Returns: float32 ``[B, Hkv, C]``; 0 past ``lengths``. Mutates nothing.
    """
    public = "kvkern.window_scores"
    _window_args(public, q_win, k_cache, lengths, query_reduce, group_reduce, pool)
    _int(public, "pool_kernel", pool_kernel, 1)
    static = ()
    if q_win.dtype in _DTYPE_KEYS and k_cache.shape[1] > 0:
        static = (("head_dim", int(q_win.shape[3])), ("dtype", _DTYPE_KEYS[q_win.dtype]),
                  ("group", int(q_win.shape[1] // k_cache.shape[1])), ("window", int(q_win.shape[2])))
    return _run("window_scores", public, q_win, k_cache, backend, q_win, k_cache, lengths,
                None if sm_scale is None else float(sm_scale), query_reduce, group_reduce, bool(normalize), pool,
                pool_kernel, static=static)


def query_statistics(q_prerope: torch.Tensor, n_sink: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased covariance of pre-RoPE queries (Expected Attention's statistics).

    Args:
        q_prerope: ``[B, Hq, T, D]`` any float dtype: a buffer of pre-RoPE queries (prefill: the
            context; decoding: the last few hundred steps). The first ``n_sink`` are skipped.
    Returns: ``(mean [B, Hq, D], cov [B, Hq, D, D])`` float32, computed in fp32 on q's device.
    """
    public = "kvkern.query_statistics"
    _tensor(public, "q_prerope", q_prerope, 4, "[B, Hq, T, D]")
    _int(public, "n_sink", n_sink)
    if q_prerope.shape[2] <= n_sink:
        raise ValueError(f"{public}: q_prerope: expected more than n_sink={n_sink} queries, got {q_prerope.shape[2]}")
    q = q_prerope[:, :, n_sink:].float()
    mean = q.mean(2)
    centred = q - mean.unsqueeze(2)
    cov = torch.einsum("bhtd,bhte->bhde", centred, centred) / q.shape[2]
    return mean, cov


def average_rope(mean: torch.Tensor, cov: torch.Tensor | None, inv_freq: torch.Tensor, start_position: int,
                 n_future: int = 512, attention_scaling: float = 1.0):
    """Rotates query statistics by the RoPE matrix averaged over the next ``n_future`` positions.

    HF rotate-half layout: channel ``i < r/2`` pairs with ``i + r/2`` where ``r = 2 * len(inv_freq)``
    is the rotary dim; channels past ``r`` are not rotated (partial rotary). ``start_position`` is
    the ABSOLUTE position of the next token (KVPress uses the buffer length instead, which
    mis-phases decode-time statistics). ``attention_scaling`` is the model's rotary scaling factor.

    Args:
        mean: ``[B, Hq, D]``; cov: ``[B, Hq, D, D]`` or None; inv_freq: ``[r / 2]``.
    Returns: ``(mean', cov')`` float32 (``cov'`` None when ``cov`` is None).
    """
    public = "kvkern.average_rope"
    _tensor(public, "mean", mean, 3, "[B, Hq, D]")
    _tensor(public, "inv_freq", inv_freq, 1, "[rotary_dim / 2]")
    _int(public, "start_position", start_position)
    _int(public, "n_future", n_future, 1)
    D = mean.shape[-1]
    half = inv_freq.numel()
    if 2 * half > D:
        raise ValueError(f"{public}: inv_freq: expected at most D/2 = {D // 2} frequencies, got {half}")
    if cov is not None:
        _tensor(public, "cov", cov, 4, "[B, Hq, D, D]")
        if tuple(cov.shape) != (*mean.shape, D):
            raise ValueError(f"{public}: cov: expected shape {[*mean.shape, D]}, got {list(cov.shape)}")
    dev = mean.device
    pos = torch.arange(start_position, start_position + n_future, dtype=torch.float64, device=dev)
    ang = pos.unsqueeze(-1) * inv_freq.to(device=dev, dtype=torch.float64).unsqueeze(0)
    cos = (torch.cos(ang).mean(0) * attention_scaling).float()
    sin = (torch.sin(ang).mean(0) * attention_scaling).float()
    idx = torch.arange(half, device=dev)
    R = torch.eye(D, dtype=torch.float32, device=dev)
    R[idx, idx] = cos
    R[idx + half, idx + half] = cos
    R[idx, idx + half] = -sin
    R[idx + half, idx] = sin
    mu = mean.float() @ R.T
    if cov is None:
        return mu, None
    return mu, R @ cov.float() @ R.T


def expected_attention_scores(mean, cov, k_cache, lengths, *, v_cache=None, n_sink=4, epsilon=0.0, sm_scale=None,
                              backend="auto") -> torch.Tensor:
    """Expected attention of a Gaussian future query (Expected Attention, KVPress's default press).

    ``z = s <μ_h, k_i> + s²/2 k_iᵀ Σ_h k_i`` (``s = sm_scale``, default ``D ** -0.5``), softmax over
    the slots ``[n_sink, L)``, mean over the GQA group, then ``(a + epsilon) * ||v_i||`` when
    ``v_cache`` is given. Sinks get ``+inf`` (always kept).

    Args:
        mean: ``[B, Hq, D]`` float32 and cov ``[B, Hq, D, D]`` float32 or None: statistics already
            passed through :func:`average_rope`. k_cache / v_cache: ``[B, Hkv, C, D]``.
        lengths: ``[B, Hkv]`` int32.
    Returns: float32 ``[B, Hkv, C]``. Mutates nothing.
    """
    public = "kvkern.expected_attention_scores"
    _tensor(public, "mean", mean, 3, "[B, Hq, D]")
    _tensor(public, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    _int(public, "n_sink", n_sink)
    return _run("expected_attention_scores", public, k_cache, k_cache, backend, mean, cov, k_cache, v_cache, lengths,
                int(n_sink), float(epsilon), None if sm_scale is None else float(sm_scale))


def slot_scores(k_cache, lengths, kind, *, v_cache=None, seed=0, backend="auto") -> torch.Tensor:
    """Query-free per-slot scores: ``"key_norm"`` (``-||k||``, KNorm), ``"value_norm"`` (``||v||``,
    InfiniPot-V's VaN; needs ``v_cache``), ``"keydiff"`` (``-cos(k, mean of k/||k||)``, KeyDiff),
    ``"recency"`` (the slot index: StreamingLLM with ``n_sink`` protection) or ``"random"``
    (counter-based uniform [0, 1) from ``seed``, generated on the tensor's device, identical on
    every backend).

    Args: k_cache / v_cache ``[B, Hkv, C, D]``; lengths ``[B, Hkv]`` int32.
    Returns: float32 ``[B, Hkv, C]``, 0 past ``lengths``. Mutates nothing.
    """
    public = "kvkern.slot_scores"
    _tensor(public, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    _choice(public, "kind", kind, ("key_norm", "value_norm", "keydiff", "recency", "random"))
    _int(public, "seed", seed, None)
    return _run("slot_scores", public, k_cache, k_cache, backend, k_cache, v_cache, lengths, kind, int(seed))


def key_redundancy(k_cache, lengths, n_window, threshold=0.5, *, backend="auto") -> torch.Tensor:
    """G-KV / R-KV key-redundancy penalty in [0, 1] (higher = more redundant), on the candidate
    slots ``[0, L - n_window)``; each key's latest near-duplicate (cosine > ``threshold``) is spared.

    Args: k_cache ``[B, Hkv, C, D]``; lengths ``[B, Hkv]`` int32.
    Returns: float32 ``[B, Hkv, C]``. O(L² D) per head. Mutates nothing.
    """
    public = "kvkern.key_redundancy"
    _tensor(public, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    _int(public, "n_window", n_window)
    return _run("key_redundancy", public, k_cache, k_cache, backend, k_cache, lengths, n_window, float(threshold))


def update_scores_(hist, new, lengths, hist_lengths, decay, mode="max", *, backend="auto") -> torch.Tensor:
    """G-KV's global score, in place: ``hist = max(decay * hist, new)`` (``"max"``), ``decay * hist +
    (1 - decay) * new`` (``"ema"``) or ``decay * hist + new`` (``"sum"``, H2O's accumulation) on the
    slots ``i < hist_lengths`` that have a history; ``hist = new`` on ``hist_lengths <= i < lengths``.

    Args: hist (MUTATED) / new float32 ``[B, Hkv, C]``; lengths / hist_lengths int32 ``[B, Hkv]``.
    Returns: ``hist``.
    """
    public = "kvkern.update_scores_"
    _tensor(public, "hist", hist, 3, "[B, Hkv, C]")
    _choice(public, "mode", mode, ("max", "ema", "sum"))
    decay = float(decay)
    if not math.isfinite(decay):
        raise ValueError(f"{public}: decay: expected a finite number, got {decay}")
    _run("update_scores_", public, hist, hist.unsqueeze(-1), backend, hist, new, lengths, hist_lengths, decay, mode)
    return hist


def _selection_args(public, scores, lengths, budget, positions, n_sink, n_recent, protect_ranges, keep_mask,
                    segment_cuts, segment_min, C):
    budgets, budget_int = _budget(public, budget, lengths)
    _int(public, "n_sink", n_sink)
    _int(public, "n_recent", n_recent)
    if _eager(lengths):
        _check_feasible(public, lengths, positions, budgets, budget_int, n_sink, n_recent, protect_ranges, keep_mask,
                        segment_cuts, segment_min, C)
    return budgets, budget_int


def select_keep(scores, lengths, budget, *, positions=None, n_sink=0, n_recent=0, protect_ranges=None,
                keep_mask=None, segment_cuts=None, segment_min=None, backend="auto"):
    """Which slots survive eviction, per (batch, kv head): exactly ``budget`` of them where
    ``lengths > budget`` (else all valid slots): the protected ones plus the best-scored others.

    Protected: the first ``n_sink`` slots, the last ``n_recent`` valid slots, slots whose position
    lies in a ``[start, end)`` row of ``protect_ranges`` (int32 ``[R, 2]`` or ``[B, R, 2]``: system
    prompts, instructions — the Pitfalls whitelist) and ``keep_mask``. Ranking: higher score first,
    ties toward the later slot, NaN as -inf. ``segment_cuts`` (int32 ``[S-1]`` increasing positions)
    splits positions into S segments that each keep their proportional share of the budget
    (Pitfalls fair eviction), or, with ``segment_min`` (int32 ``[S]``), at least that many slots.

    Args:
        scores: float32 ``[B, Hkv, C]``. lengths: int32 ``[B, Hkv]``. budget: int or int32 ``[B, Hkv]``
            (head-wise budgets, e.g. from :func:`allocate_head_budgets`). positions: int32
            ``[B, Hkv, C]`` or None (= slot index). keep_mask: bool ``[B, Hkv, C]`` or None.
    Returns: ``(keep bool [B, Hkv, C], new_lengths int32 [B, Hkv])``. Mutates nothing.
    Raises: ``ValueError`` when protected slots (or a segment's, or the minima) exceed the budget.
    """
    public = "kvkern.select_keep"
    _tensor(public, "scores", scores, 3, "[B, Hkv, C]")
    _tensor(public, "lengths", lengths, 2, "[B, Hkv]")
    budgets, b = _selection_args(public, scores, lengths, budget, positions, n_sink, n_recent, protect_ranges,
                                 keep_mask, segment_cuts, segment_min, scores.shape[-1])
    return _run("select_keep", public, scores, scores.unsqueeze(-1), backend, scores, lengths, positions, budgets, b,
                n_sink, n_recent, protect_ranges, keep_mask, segment_cuts, segment_min)


def compact_(k_cache, v_cache, lengths, keep, *, positions=None, hist=None, log_w=None, backend="auto"):
    """Moves each head's kept valid slots to the front, in slot order, in place, and sets ``lengths``
    to their count. ``positions`` (int32), ``hist`` and ``log_w`` (float32), all ``[B, Hkv, C]``,
    move along. Slots past the new length keep stale data (never read).

    Mutates: k_cache, v_cache ``[B, Hkv, C, D]``, lengths int32 ``[B, Hkv]``, positions, hist, log_w.
    Returns: ``lengths``.
    """
    public = "kvkern.compact_"
    _tensor(public, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    _run("compact_", public, k_cache, k_cache, backend, k_cache, v_cache, lengths, keep, positions, hist, log_w)
    return lengths


def evict_(k_cache, v_cache, lengths, scores, budget, *, positions=None, n_sink=0, n_recent=0, protect_ranges=None,
           keep_mask=None, segment_cuts=None, segment_min=None, hist=None, log_w=None, backend="auto"):
    """:func:`select_keep` then :func:`compact_` in one call: keeps exactly ``budget`` slots per head
    (heads already within budget are untouched), really freeing the rest.

    Mutates: k_cache, v_cache, lengths, positions, hist, log_w (as :func:`compact_`).
    Returns: the keep mask bool ``[B, Hkv, C]`` taken before compaction.
    Raises: ``ValueError`` before anything is written if the request is infeasible.
    """
    public = "kvkern.evict_"
    _tensor(public, "k_cache", k_cache, 4, "[B, Hkv, C, D]")
    _tensor(public, "lengths", lengths, 2, "[B, Hkv]")
    budgets, b = _selection_args(public, scores, lengths, budget, positions, n_sink, n_recent, protect_ranges,
                                 keep_mask, segment_cuts, segment_min, k_cache.shape[2])
    return _run("evict_", public, k_cache, k_cache, backend, k_cache, v_cache, lengths, positions, scores, budgets, b,
                n_sink, n_recent, protect_ranges, keep_mask, segment_cuts, segment_min, hist, log_w)


def allocate_head_budgets(scores, lengths, budget, *, safeguard=0.2, n_sink=0, n_recent=0,
                          backend="auto") -> torch.Tensor:
    """AdaKV's head-wise budgets for one layer: the layer keeps ``sum_j min(budget, L_j)`` slots per
    batch element, chosen by a global top-k over all heads' scores; each head first gets its best
    ``floor(budget * safeguard)`` slots and its protected sinks/recent slots. Feed the result to
    :func:`evict_` as ``budget`` to really free the other slots (KVPress only masks them).

    Args: scores float32 ``[B, Hkv, C]``; lengths int32 ``[B, Hkv]``; budget: the average per head.
    Returns: int32 ``[B, Hkv]``. Mutates nothing.
    """
    public = "kvkern.allocate_head_budgets"
    _tensor(public, "scores", scores, 3, "[B, Hkv, C]")
    _int(public, "budget", budget)
    safeguard = float(safeguard)
    if not 0.0 <= safeguard <= 1.0:
        raise ValueError(f"{public}: safeguard: expected a fraction in [0, 1], got {safeguard}")
    return _run("allocate_head_budgets", public, scores, scores.unsqueeze(-1), backend, scores, lengths, budget,
                safeguard, _int(public, "n_sink", n_sink), _int(public, "n_recent", n_recent))


def score_evict_(q_win, k_cache, v_cache, lengths, budget, *, positions=None, n_sink=0, n_recent=0, sm_scale=None,
                 query_reduce="mean", group_reduce="max_per_query", normalize=True, pool="none", pool_kernel=1,
                 hist=None, hist_lengths=None, decay=0.8, hist_mode="max", mix_lambda=1.0,
                 redundancy_threshold=0.5, protect_ranges=None, keep_mask=None, log_w=None, backend="auto"):
    """The whole decode-time eviction in one call, as G-KV runs it every 128 decode steps.

    Per head with ``L > budget`` (others are left completely untouched): window scores of
    ``q_win`` (normalised per head by default), the global-score update into ``hist`` (``decay``,
    ``hist_mode``; slots ``< hist_lengths`` have a history), pooling, the key-redundancy mix
    ``mix_lambda * score - (1 - mix_lambda) * redundancy`` when ``mix_lambda < 1``, protection (the
    window's ``W`` slots always, plus ``n_sink``, ``n_recent``, ``protect_ranges``, ``keep_mask``),
    selection of exactly ``budget`` slots and in-place compaction; then ``hist_lengths = L' - W``.
    The defaults are G-KV's (``group_reduce="max_per_query"``: the group max of each window query,
    then the window mean; normalised, decay 0.8, max); pass ``mix_lambda=0.5`` for
    G-KV's redundancy term, ``hist=None`` for SnapKV-style one-shot scoring.

    Mutates: k_cache, v_cache, lengths, positions, hist, hist_lengths, log_w.
    Returns: the keep mask bool ``[B, Hkv, C]`` taken before compaction.
    """
    public = "kvkern.score_evict_"
    _window_args(public, q_win, k_cache, lengths, query_reduce, group_reduce, pool)
    _choice(public, "hist_mode", hist_mode, ("max", "ema", "sum"))
    if (hist is None) != (hist_lengths is None):
        raise ValueError(f"{public}: hist and hist_lengths: expected both or neither, got "
                         f"hist={'a tensor' if hist is not None else None}, "
                         f"hist_lengths={'a tensor' if hist_lengths is not None else None}")
    mix_lambda = float(mix_lambda)
    if not 0.0 <= mix_lambda <= 1.0:
        raise ValueError(f"{public}: mix_lambda: expected a value in [0, 1], got {mix_lambda}")
    pool_kernel = _int(public, "pool_kernel", pool_kernel, 1)
    W = q_win.shape[2]
    budgets, b = _selection_args(public, None, lengths, budget, positions, n_sink, max(n_recent, W), protect_ranges,
                                 keep_mask, None, None, k_cache.shape[2])
    return _run("score_evict_", public, k_cache, k_cache, backend, q_win, k_cache, v_cache, lengths, positions, budgets,
                b, n_sink, n_recent, None if sm_scale is None else float(sm_scale), query_reduce, group_reduce,
                bool(normalize), pool, pool_kernel, hist, hist_lengths, float(decay), hist_mode, mix_lambda,
                float(redundancy_threshold), protect_ranges, keep_mask, log_w)
