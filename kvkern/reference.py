# SPDX-License-Identifier: Apache-2.0
"""Plain-PyTorch references: the oracle every backend is tested against.

Written for clarity, not speed. Everything computes in ``dtype`` (float64 by
default) whatever the storage dtype, and never lets a slot at or past
``lengths`` influence a result, whatever it holds (tests poison those slots
with NaN).
"""

from __future__ import annotations

import math

import torch

__all__ = ["decode_attention", "valid_slot_mask"]


def valid_slot_mask(lengths: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[B, Hkv, C]`` bool: True where slot ``i < lengths[b, h]``."""
    slots = torch.arange(capacity, device=lengths.device)
    return slots.view(1, 1, capacity) < lengths.to(torch.int64).unsqueeze(-1)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    log_w: torch.Tensor | None = None,
    sm_scale: float | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-token attention over a static-capacity cache with per-head lengths.

    Args:
        q: ``[B, Hq, D]``.
        k_cache, v_cache: ``[B, Hkv, C, D]``; query head ``h`` reads kv head ``h // (Hq // Hkv)``.
        lengths: ``[B, Hkv]`` integer, valid slots per head, each in ``[0, C]``.
        log_w: ``[B, Hkv, C]`` or None, added to the scaled logits.
        sm_scale: logit scale, default ``D ** -0.5``.
        dtype: the precision of every computation.

    Returns:
        ``(out [B, Hq, D], lse [B, Hq])`` in ``dtype``. A head with length 0 has
        ``out == 0`` and ``lse == -inf``.
    """
    B, Hq, D = q.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if sm_scale is None else float(sm_scale)
    valid = valid_slot_mask(lengths, C)  # [B, Hkv, C]
    # Zero the garbage first: NaN * 0 is NaN, so masking the logits alone is not enough.
    k = torch.where(valid.unsqueeze(-1), k_cache.to(dtype), 0.0)
    v = torch.where(valid.unsqueeze(-1), v_cache.to(dtype), 0.0)
    k = k.repeat_interleave(G, dim=1)  # [B, Hq, C, D]
    v = v.repeat_interleave(G, dim=1)
    logits = torch.einsum("bhd,bhcd->bhc", q.to(dtype), k) * scale
    if log_w is not None:
        logits = logits + torch.where(valid, log_w.to(dtype), 0.0).repeat_interleave(G, dim=1)
    logits = logits.masked_fill(~valid.repeat_interleave(G, dim=1), -math.inf)
    lse = torch.logsumexp(logits, dim=-1)  # -inf for empty heads
    probs = torch.exp(logits - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("bhc,bhcd->bhd", probs, v)
    return out, lse


# ---------------------------------------------------------------------------
# Score-and-evict (specs/eviction-and-scoring.md). Conventions shared by every
# op below:
#   * cache tensors are [B, Hkv, C, D]; ``lengths`` [B, Hkv] says how many
#     leading slots of each (batch, kv head) are valid; slot order = token order;
#   * scores are [B, Hkv, C]; slots at or past ``lengths`` hold 0 in every score
#     output and are never selected;
#   * "higher score = keep". Ties are broken toward the later slot, so every
#     kept set is deterministic; NaN ranks as -inf.
# ---------------------------------------------------------------------------

QUERY_REDUCE = ("mean", "sum")
GROUP_REDUCE = ("mean", "max", "mean_all", "max_per_query")
POOL = ("none", "avg", "max")
SLOT_SCORE_KINDS = ("key_norm", "value_norm", "keydiff", "recency", "random")
UPDATE_MODES = ("max", "ema", "sum")

__all__ += [
    "window_scores", "expected_attention_scores", "slot_scores", "key_redundancy", "update_scores_",
    "select_keep", "compact_", "evict_", "allocate_head_budgets", "score_evict_",
    "pool_scores", "random_uniform", "query_statistics", "average_rope",
]


def _valid(lengths: torch.Tensor, C: int) -> torch.Tensor:
    return valid_slot_mask(lengths, C)


def pool_scores(scores: torch.Tensor, region: torch.Tensor, pool: str, kernel: int) -> torch.Tensor:
    """1-D pooling along slots inside ``[0, region[b, h])`` of each head, stride 1, padding
    ``kernel // 2``. ``avg`` counts the padding (KVPress's ``count_include_pad=True``: the
    sum over the in-region neighbours divided by ``kernel``); ``max`` ignores it. Slots at or
    past ``region`` are returned unchanged. ``kernel`` is odd."""
    if pool == "none" or kernel == 1:
        return scores.clone()
    B, H, C = scores.shape
    r = kernel // 2
    inside = torch.arange(C, device=scores.device).view(1, 1, C) < region.to(torch.int64).unsqueeze(-1)
    fill = 0.0 if pool == "avg" else -math.inf
    x = torch.where(inside, scores, torch.full_like(scores, fill))
    x = torch.nn.functional.pad(x, (r, r), value=fill)
    win = x.unfold(-1, kernel, 1)  # [B, H, C, kernel]
    pooled = win.sum(-1) / kernel if pool == "avg" else win.amax(-1)
    return torch.where(inside, pooled, scores)


def window_scores(
    q_win: torch.Tensor,
    k_cache: torch.Tensor,
    lengths: torch.Tensor,
    sm_scale: float | None = None,
    query_reduce: str = "mean",
    group_reduce: str = "mean",
    normalize: bool = False,
    pool: str = "none",
    pool_kernel: int = 1,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Attention that the last ``W`` queries pay to each cached slot (SnapKV, TOVA, G-KV local score).

    Window query ``t`` (``0 <= t < W``) is the token in slot ``p_t = L - W + t`` of its kv head
    (``L = lengths[b, j]``) and sees slots ``i < L`` with ``i <= p_t`` (causal inside the window).
    With ``a[h, t, i] = softmax_i(sm_scale * <q_win[b, h, t], k[b, j, i]>)`` over those slots
    (a row with no visible slot is all zero):

    1. ``query_reduce`` over t: ``mean`` (divide by W) or ``sum``;
    2. ``group_reduce`` over the G query heads of kv head j: ``mean`` or ``max`` of the
       window-reduced rows (``max_h mean_t a``: SnapKV / AdaKV-original's GQA reduce);
       ``mean_all`` averages over all Hq heads (TOVA) and gives every kv head the same row;
       ``max_per_query`` swaps steps 1 and 2: the max over the group for each window query,
       then the ``query_reduce`` over t (``mean_t max_h a``: G-KV's local score, spec §2(b));
       the two orders agree when G == 1 or W == 1;
    3. ``normalize``: divide the head's row by its max over the candidate slots
       ``i < M = max(L - W, 0)`` when that max is positive (G-KV);
    4. ``pool``/``pool_kernel``: :func:`pool_scores` over the candidate slots ``[0, M)``.

    Window slots ``[M, L)`` keep the value of step 2 (3) unpooled: callers protect them with
    ``n_recent = W``. Returns fp32-semantics scores ``[B, Hkv, C]`` in ``dtype``; 0 past ``L``.
    """
    B, Hq, W, D = q_win.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    scale = D**-0.5 if sm_scale is None else float(sm_scale)
    valid = _valid(lengths, C)  # [B, Hkv, C]
    k = torch.where(valid.unsqueeze(-1), k_cache.to(dtype), 0.0).repeat_interleave(G, dim=1)
    logits = torch.einsum("bhtd,bhcd->bhtc", q_win.to(dtype), k) * scale  # [B, Hq, W, C]
    L = lengths.to(torch.int64).repeat_interleave(G, dim=1)  # [B, Hq]
    slot = torch.arange(C, device=k.device).view(1, 1, 1, C)
    p_t = (L.view(B, Hq, 1) - W + torch.arange(W, device=k.device).view(1, 1, W)).unsqueeze(-1)
    visible = (slot < L.view(B, Hq, 1, 1)) & (slot <= p_t)
    logits = logits.masked_fill(~visible, -math.inf)
    row_max = logits.amax(-1, keepdim=True)
    probs = torch.exp(logits - torch.where(torch.isinf(row_max), 0.0, row_max))
    denom = probs.sum(-1, keepdim=True)
    probs = torch.where(denom > 0, probs / torch.where(denom > 0, denom, 1.0), 0.0)
    if group_reduce == "max_per_query":
        per_t = probs.view(B, Hkv, G, W, C).amax(2)  # [B, Hkv, W, C]
        s = per_t.sum(2) if query_reduce == "sum" else per_t.mean(2)
    else:
        s = probs.sum(2) if query_reduce == "sum" else probs.mean(2)  # [B, Hq, C]
        s = s.view(B, Hkv, G, C)
    if group_reduce == "max_per_query":
        pass  # reduced over the group above
    elif group_reduce == "max":
        s = s.amax(2)
    elif group_reduce == "mean":
        s = s.mean(2)
    else:  # mean_all
        s = s.view(B, Hq, C).mean(1, keepdim=True).expand(B, Hkv, C).clone()
    s = torch.where(valid, s, 0.0)
    region = (lengths.to(torch.int64) - W).clamp(min=0)
    cand = torch.arange(C, device=s.device).view(1, 1, C) < region.unsqueeze(-1)
    if normalize:
        top = torch.where(cand, s, 0.0).amax(-1, keepdim=True)
        s = torch.where(cand & (top > 0), s / torch.where(top > 0, top, 1.0), s)
    return pool_scores(s, region, pool, pool_kernel)


def query_statistics(q_prerope: torch.Tensor, n_sink: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[B, Hq, D]`` and biased covariance ``[B, Hq, D, D]`` of pre-RoPE queries
    ``[B, Hq, T, D]`` over ``t in [n_sink, T)`` (Expected Attention's step 1)."""
    q = q_prerope[:, :, n_sink:].to(torch.float64)
    if q.shape[2] < 1:
        raise ValueError(f"query_statistics: q_prerope: expected more than n_sink={n_sink} queries, "
                         f"got {q_prerope.shape[2]}")
    mu = q.mean(2)
    c = q - mu.unsqueeze(2)
    cov = torch.einsum("bhtd,bhte->bhde", c, c) / q.shape[2]
    return mu, cov


def average_rope(mean: torch.Tensor, cov: torch.Tensor | None, inv_freq: torch.Tensor, start_position: int,
                 n_future: int = 512, attention_scaling: float = 1.0):
    """Rotates query statistics by the RoPE matrix averaged over positions
    ``[start_position, start_position + n_future)`` (HF rotate-half layout; the rotary dim is
    ``2 * len(inv_freq)``; channels past it are not rotated). Returns ``(R̄ μ, R̄ Σ R̄ᵀ)``."""
    D = mean.shape[-1]
    half = inv_freq.numel()
    pos = torch.arange(start_position, start_position + n_future, dtype=torch.float64, device=mean.device)
    ang = pos.unsqueeze(-1) * inv_freq.to(torch.float64, ).to(mean.device).unsqueeze(0)  # [F, half]
    cos = torch.cos(ang).mean(0) * attention_scaling
    sin = torch.sin(ang).mean(0) * attention_scaling
    R = torch.eye(D, dtype=torch.float64, device=mean.device)
    idx = torch.arange(half, device=mean.device)
    # RoPE(x)[i] = x[i] cos - x[i + half] sin ; RoPE(x)[i + half] = x[i + half] cos + x[i] sin
    R[idx, idx] = cos
    R[idx + half, idx + half] = cos
    R[idx, idx + half] = -sin
    R[idx + half, idx] = sin
    mu = torch.einsum("de,bhe->bhd", R, mean.to(torch.float64))
    if cov is None:
        return mu, None
    sig = torch.einsum("de,bhef,gf->bhdg", R, cov.to(torch.float64), R)
    return mu, sig


def expected_attention_scores(
    mean: torch.Tensor,
    cov: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    lengths: torch.Tensor,
    n_sink: int = 4,
    epsilon: float = 0.0,
    sm_scale: float | None = None,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Expected attention of a Gaussian future query (spec §3, KVPress's ExpectedAttentionPress).

    ``mean [B, Hq, D]`` and ``cov [B, Hq, D, D]`` (or None: no covariance term) are the
    statistics already rotated by :func:`average_rope`. For query head h of kv head j and slot
    ``n_sink <= i < L``: ``z = s * <μ_h, k_i> + s² / 2 * k_iᵀ Σ_h k_i`` (``s = sm_scale``,
    default ``D ** -0.5``); ``a = softmax_i z`` over those slots; mean over the group; with
    ``v_cache`` given, ``(a + epsilon) * ||v_i||``. Slots ``i < min(n_sink, L)`` get ``+inf``
    (always kept); 0 past ``L``.
    """
    B, Hq, D = mean.shape
    Hkv, C = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    s = D**-0.5 if sm_scale is None else float(sm_scale)
    valid = _valid(lengths, C)
    k = torch.where(valid.unsqueeze(-1), k_cache.to(dtype), 0.0).repeat_interleave(G, dim=1)  # [B,Hq,C,D]
    z = s * torch.einsum("bhd,bhcd->bhc", mean.to(dtype), k)
    if cov is not None:
        z = z + 0.5 * s * s * torch.einsum("bhcd,bhde,bhce->bhc", k, cov.to(dtype), k)
    slot = torch.arange(C, device=k.device).view(1, 1, C)
    scored = valid & (slot >= n_sink)
    z = z.masked_fill(~scored.repeat_interleave(G, dim=1), -math.inf)
    zmax = z.amax(-1, keepdim=True)
    p = torch.exp(z - torch.where(torch.isinf(zmax), 0.0, zmax))
    den = p.sum(-1, keepdim=True)
    p = torch.where(den > 0, p / torch.where(den > 0, den, 1.0), 0.0)
    a = p.view(B, Hkv, G, C).mean(2)
    if v_cache is not None:
        vn = torch.where(valid.unsqueeze(-1), v_cache.to(dtype), 0.0).norm(dim=-1)
        a = (a + epsilon) * vn
    a = torch.where(valid & (slot < n_sink), math.inf, a)
    return torch.where(valid, a, 0.0)


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    # Chris Wellons' lowbias32 on uint32 values held in int64.
    m = 0xFFFFFFFF
    x = x & m
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    x = x ^ (x >> 16)
    return x


def random_uniform(seed: int, B: int, H: int, C: int, device=None) -> torch.Tensor:
    """The counter-based uniform [0, 1) every backend reproduces bit for bit:
    ``u = lowbias32(flat ^ lowbias32(seed + 0x9E3779B9)) >> 8`` times ``2**-24`` with
    ``flat = (b * H + h) * C + i`` (all uint32, wrapping)."""
    key = _lowbias32(torch.tensor((int(seed) + 0x9E3779B9) & 0xFFFFFFFF, dtype=torch.int64))
    flat = torch.arange(B * H * C, dtype=torch.int64, device=device) & 0xFFFFFFFF
    u = _lowbias32(flat ^ key.to(flat.device)) >> 8
    return (u.to(torch.float64) * 2.0**-24).view(B, H, C)


def slot_scores(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor | None,
    lengths: torch.Tensor,
    kind: str,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Per-slot scores that need no queries:

    * ``key_norm``: ``-||k_i||`` (KNorm: small key norm = important);
    * ``value_norm``: ``||v_i||`` (InfiniPot-V's VaN);
    * ``keydiff``: ``-cos(k_i, a)``, ``a = mean_{i<L} k_i / ||k_i||`` (KeyDiff; a zero vector gives 0);
    * ``recency``: the slot index ``i`` (StreamingLLM with ``n_sink`` protection);
    * ``random``: :func:`random_uniform` (``seed``), generated where the tensor lives.

    0 past ``L``.
    """
    B, Hkv, C, D = k_cache.shape
    valid = _valid(lengths, C)
    if kind == "key_norm":
        s = -torch.where(valid.unsqueeze(-1), k_cache.to(dtype), 0.0).norm(dim=-1)
    elif kind == "value_norm":
        s = torch.where(valid.unsqueeze(-1), v_cache.to(dtype), 0.0).norm(dim=-1)
    elif kind == "keydiff":
        k = torch.where(valid.unsqueeze(-1), k_cache.to(dtype), 0.0)
        kn = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        cnt = lengths.to(dtype).clamp_min(1).view(B, Hkv, 1)
        anchor = kn.sum(2) / cnt  # [B, Hkv, D]
        an = anchor.norm(dim=-1, keepdim=True)
        cos = torch.einsum("bhcd,bhd->bhc", kn, anchor) / an.clamp_min(1e-30)
        s = -torch.where(an > 0, cos, torch.zeros_like(cos))
    elif kind == "recency":
        s = torch.arange(C, dtype=dtype, device=k_cache.device).view(1, 1, C).expand(B, Hkv, C)
    elif kind == "random":
        s = random_uniform(seed, B, Hkv, C, device=k_cache.device).to(dtype)
    else:
        raise ValueError(f"slot_scores: kind: expected one of {list(SLOT_SCORE_KINDS)}, got {kind!r}")
    return torch.where(valid, s, 0.0)


def key_redundancy(
    k_cache: torch.Tensor,
    lengths: torch.Tensor,
    n_window: int,
    threshold: float = 0.5,
    *,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """G-KV / R-KV key-redundancy penalty (spec §2(b) step 5), higher = more redundant.

    Over the valid slots ``m, n < L`` of a head: ``c[m, n] = <k̂_m, k̂_n>`` with
    ``k̂ = k / (||k|| + 1e-8)``; zero the diagonal; for every column n, zero ``c[m*, n]`` for the
    largest ``m* != n`` with ``c[m*, n] > threshold`` ("the latest near-duplicate is spared");
    ``red[m] = sum_n c[m, n] / L``; softmax over ``m < L``; keep ``m < M = L - n_window`` and divide
    by their max. 0 for ``m >= M``.
    """
    B, Hkv, C, D = k_cache.shape
    valid = _valid(lengths, C)
    k = torch.where(valid.unsqueeze(-1), k_cache.to(dtype), 0.0)
    kh = k / (k.norm(dim=-1, keepdim=True) + 1e-8)
    c = torch.einsum("bhmd,bhnd->bhmn", kh, kh)
    pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
    eye = torch.eye(C, dtype=torch.bool, device=k.device)
    c = torch.where(pair & ~eye, c, 0.0)
    m_idx = torch.arange(C, device=k.device).view(1, 1, C, 1)
    over = (c > threshold) & pair & ~eye
    latest = torch.where(over, m_idx, -1).amax(2)  # [B, Hkv, C] per column n
    hit = (m_idx == latest.unsqueeze(2)) & over
    c = torch.where(hit, 0.0, c)
    L = lengths.to(dtype).clamp_min(1).view(B, Hkv, 1)
    red = c.sum(-1) / L
    red = red.masked_fill(~valid, -math.inf)
    rmax = red.amax(-1, keepdim=True)
    p = torch.exp(red - torch.where(torch.isinf(rmax), 0.0, rmax))
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    region = (lengths.to(torch.int64) - n_window).clamp(min=0)
    cand = torch.arange(C, device=k.device).view(1, 1, C) < region.unsqueeze(-1)
    p = torch.where(cand, p, 0.0)
    top = p.amax(-1, keepdim=True)
    return torch.where(cand & (top > 0), p / torch.where(top > 0, top, 1.0), 0.0)


def update_scores_(
    hist: torch.Tensor,
    new: torch.Tensor,
    lengths: torch.Tensor,
    hist_lengths: torch.Tensor,
    decay: float,
    mode: str = "max",
) -> torch.Tensor:
    """G-KV's global score (and its EMA / H2O variants), in place on ``hist [B, Hkv, C]``.

    For ``i < lengths`` and ``i < hist_lengths`` (slots that have a history):
    ``max``: ``max(decay * hist, new)``; ``ema``: ``decay * hist + (1 - decay) * new``;
    ``sum``: ``decay * hist + new``. For ``hist_lengths <= i < lengths``: ``new`` (no history
    yet). Slots at or past ``lengths`` are untouched. Returns ``hist``.
    """
    C = hist.shape[-1]
    slot = torch.arange(C, device=hist.device).view(1, 1, C)
    upd = slot < lengths.to(torch.int64).unsqueeze(-1)
    has = upd & (slot < hist_lengths.to(torch.int64).unsqueeze(-1))
    old = hist.to(torch.float64)
    nw = new.to(torch.float64)
    if mode == "max":
        comb = torch.maximum(decay * old, nw)
    elif mode == "ema":
        comb = decay * old + (1.0 - decay) * nw
    elif mode == "sum":
        comb = decay * old + nw
    else:
        raise ValueError(f"update_scores_: mode: expected one of {list(UPDATE_MODES)}, got {mode!r}")
    out = torch.where(has, comb, torch.where(upd, nw, old))
    hist.copy_(out.to(hist.dtype))
    return hist


def _segment_of(positions: torch.Tensor, segment_cuts: torch.Tensor | None) -> torch.Tensor:
    if segment_cuts is None:
        return torch.zeros_like(positions, dtype=torch.int64)
    # segment s holds positions in [cuts[s-1], cuts[s]) with cuts[-1] = -inf, cuts[S-1] = +inf
    return torch.bucketize(positions.to(torch.int64), segment_cuts.to(torch.int64).to(positions.device), right=True)


def protected_mask(lengths, positions, n_sink, n_recent, protect_ranges=None, keep_mask=None) -> torch.Tensor:
    """``[B, Hkv, C]`` bool: valid slots that must survive (sinks by slot index, the last
    ``n_recent`` valid slots, slots whose position lies in a ``[start, end)`` of
    ``protect_ranges`` ([R, 2] or [B, R, 2]), and ``keep_mask``)."""
    B, Hkv, C = positions.shape
    valid = _valid(lengths, C)
    slot = torch.arange(C, device=positions.device).view(1, 1, C)
    prot = (slot < n_sink) | (slot >= lengths.to(torch.int64).unsqueeze(-1) - n_recent)
    if protect_ranges is not None:
        pr = protect_ranges.to(torch.int64)
        if pr.dim() == 2:
            pr = pr.unsqueeze(0).expand(B, -1, -1)
        pos = positions.to(torch.int64).unsqueeze(-1)  # [B, Hkv, C, 1]
        start = pr[..., 0].view(B, 1, 1, -1)
        end = pr[..., 1].view(B, 1, 1, -1)
        prot = prot | ((pos >= start) & (pos < end)).any(-1)
    if keep_mask is not None:
        prot = prot | keep_mask.to(torch.bool)
    return prot & valid


def segment_quotas(budget: int, counts: list[int]) -> list[int]:
    """Proportional quotas (the Pitfalls paper's fair eviction, generalised): ``floor(budget *
    n_s / L)`` per segment, then the remainder one by one to the segments from the last backwards.
    Each quota is at most ``n_s`` and they sum to ``budget`` (``budget < L``)."""
    L = sum(counts)
    q = [budget * n // L for n in counts]
    left = budget - sum(q)
    s = len(counts) - 1
    while left > 0:
        if q[s] < counts[s]:
            q[s] += 1
            left -= 1
        s = s - 1 if s > 0 else len(counts) - 1
    return q


def _rank_order(scores_1d: torch.Tensor) -> torch.Tensor:
    """Slot indices sorted best first: higher score first, ties toward the later slot, NaN as -inf."""
    s = torch.nan_to_num(scores_1d.to(torch.float64), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    n = s.numel()
    # Stable sort on the reversed array puts later slots first among equals.
    order = torch.sort(s.flip(0), descending=True, stable=True).indices
    return (n - 1) - order


def select_keep(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    positions: torch.Tensor | None,
    budget: int | torch.Tensor,
    n_sink: int = 0,
    n_recent: int = 0,
    protect_ranges: torch.Tensor | None = None,
    keep_mask: torch.Tensor | None = None,
    segment_cuts: torch.Tensor | None = None,
    segment_min: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which slots survive: ``(keep [B, Hkv, C] bool, new_lengths [B, Hkv] int32)``.

    Per (b, j) with ``L = lengths[b, j]`` and ``K = budget`` (an int or ``budget[b, j]``): if
    ``L <= K`` every valid slot is kept. Otherwise exactly ``K`` slots are kept: every protected
    slot (:func:`protected_mask`) plus the best-ranked others (higher score first, ties toward the
    later slot, NaN as -inf). With ``segment_cuts`` (``[S-1]`` increasing int positions; segment
    ``s`` holds positions in ``[cuts[s-1], cuts[s])``, open at both ends):

    * without ``segment_min``: segment s keeps exactly ``segment_quotas(K, n_s)[s]`` slots, its
      protected ones first (Pitfalls fair eviction);
    * with ``segment_min [S]`` int: segment s first keeps its protected slots and its best others
      up to ``min(segment_min[s], n_s)`` in all, then the rest of ``K`` goes to the best remaining
      slots of any segment.

    Raises ``ValueError`` (naming the head) if the protected slots — or a segment's protected
    slots, or the sum of the minima — exceed what the budget allows.
    """
    B, Hkv, C = scores.shape
    if positions is None:
        positions = torch.arange(C, dtype=torch.int32, device=scores.device).view(1, 1, C).expand(B, Hkv, C)
    prot = protected_mask(lengths, positions, n_sink, n_recent, protect_ranges, keep_mask)
    seg = _segment_of(positions, segment_cuts)
    n_seg = 1 if segment_cuts is None else segment_cuts.numel() + 1
    keep = torch.zeros(B, Hkv, C, dtype=torch.bool, device=scores.device)
    new_len = lengths.to(torch.int32).clone()
    for b in range(B):
        for j in range(Hkv):
            L = int(lengths[b, j])
            K = int(budget[b, j]) if isinstance(budget, torch.Tensor) else int(budget)
            if L <= K:
                keep[b, j, :L] = True
                continue
            where = f"select_keep: head [{b}, {j}]"
            p = prot[b, j, :L]
            order = _rank_order(scores[b, j, :L])
            if int(p.sum()) > K:
                raise ValueError(f"{where}: {int(p.sum())} protected slots exceed the budget {K}")
            kh = p.clone()
            sg = seg[b, j, :L]
            if segment_cuts is not None and segment_min is None:
                counts = [int((sg == s).sum()) for s in range(n_seg)]
                quota = segment_quotas(K, counts)
                for s in range(n_seg):
                    ps = int((p & (sg == s)).sum())
                    if ps > quota[s]:
                        raise ValueError(f"{where}: segment {s} has {ps} protected slots but a quota of {quota[s]}")
                    need = quota[s] - ps
                    for i in order.tolist():
                        if need == 0:
                            break
                        if sg[i] == s and not kh[i]:
                            kh[i] = True
                            need -= 1
            else:
                if segment_cuts is not None:
                    for s in range(n_seg):
                        in_s = sg == s
                        want = min(int(segment_min[s]), int(in_s.sum()))
                        need = want - int((kh & in_s).sum())
                        for i in order.tolist():
                            if need <= 0:
                                break
                            if in_s[i] and not kh[i]:
                                kh[i] = True
                                need -= 1
                    if int(kh.sum()) > K:
                        raise ValueError(f"{where}: protected slots and segment minima need {int(kh.sum())} slots, "
                                         f"more than the budget {K}")
                need = K - int(kh.sum())
                for i in order.tolist():
                    if need == 0:
                        break
                    if not kh[i]:
                        kh[i] = True
                        need -= 1
            keep[b, j, :L] = kh
            new_len[b, j] = K
    return keep, new_len


def compact_(k_cache, v_cache, lengths, keep, positions=None, hist=None, log_w=None):
    """Moves the kept valid slots of every head to the front in slot order, in place, and sets
    ``lengths`` to their count. ``positions``, ``hist`` and ``log_w`` ([B, Hkv, C]) move along.
    Slots past the new length keep whatever they held. Returns ``lengths``."""
    B, Hkv, C = keep.shape
    valid = _valid(lengths, C)
    kv = keep.to(torch.bool) & valid
    for b in range(B):
        for j in range(Hkv):
            idx = kv[b, j].nonzero().flatten()
            n = idx.numel()
            for t in (k_cache, v_cache, positions, hist, log_w):
                if t is not None:
                    t[b, j, :n] = t[b, j, idx].clone()
            lengths[b, j] = n
    return lengths


def evict_(k_cache, v_cache, lengths, positions, scores, budget, n_sink=0, n_recent=0, protect_ranges=None,
           keep_mask=None, segment_cuts=None, segment_min=None, hist=None, log_w=None) -> torch.Tensor:
    """:func:`select_keep` then :func:`compact_`; returns the keep mask (before compaction)."""
    keep, _ = select_keep(scores, lengths, positions, budget, n_sink, n_recent, protect_ranges, keep_mask,
                          segment_cuts, segment_min)
    compact_(k_cache, v_cache, lengths, keep, positions, hist, log_w)
    return keep


def allocate_head_budgets(scores, lengths, budget: int, safeguard: float = 0.2, n_sink: int = 0,
                          n_recent: int = 0) -> torch.Tensor:
    """AdaKV's head-wise budgets for one layer: ``[B, Hkv]`` int32.

    Per batch element the layer keeps ``T = sum_j min(budget, L_j)`` slots. Each head's best
    ``floor(budget * safeguard)`` slots (capped at ``L_j``), its first ``n_sink`` and last
    ``n_recent`` slots count as ``+inf``; then the ``T`` best (score, slot, head) triples of all
    heads' valid slots, in descending lexicographic order, are kept; a head's budget is how many
    of its slots are among them.
    """
    B, Hkv, C = scores.shape
    out = torch.zeros(B, Hkv, dtype=torch.int32)
    n_safe = int(budget * safeguard)
    for b in range(B):
        entries = []
        T = 0
        for j in range(Hkv):
            L = int(lengths[b, j])
            T += min(budget, L)
            if L == 0:
                continue
            s = torch.nan_to_num(scores[b, j, :L].to(torch.float64), nan=-math.inf, posinf=math.inf,
                                neginf=-math.inf).clone()
            order = _rank_order(s)
            s[order[: min(n_safe, L)]] = math.inf
            s[: min(n_sink, L)] = math.inf
            if n_recent > 0:
                s[max(L - n_recent, 0):] = math.inf
            entries += [(float(s[i]), i, j) for i in range(L)]
        entries.sort(reverse=True)
        for _, _, j in entries[:T]:
            out[b, j] += 1
    return out.to(lengths.device)


def score_evict_(q_win, k_cache, v_cache, lengths, positions, budget, n_sink=0, n_recent=0, sm_scale=None,
                 query_reduce="mean", group_reduce="max_per_query", normalize=True, pool="none", pool_kernel=1,
                 hist=None, hist_lengths=None, decay=0.8, hist_mode="max", mix_lambda=1.0,
                 redundancy_threshold=0.5, protect_ranges=None, keep_mask=None, log_w=None) -> torch.Tensor:
    """The fused decode-time path (G-KV every ``divide_length`` steps), one head at a time:
    heads with ``L <= budget`` are left completely untouched (``hist`` included). Others:

    1. ``s = window_scores(q_win, ..., normalize=normalize)`` (no pooling yet);
    2. with ``hist``: ``update_scores_(hist, s, lengths - W, hist_lengths, decay, hist_mode)``
       on the candidate slots; ``g = hist`` there (and ``s`` on the window slots);
    3. ``p = pool_scores(g, L - W, pool, pool_kernel)``;
    4. ``mix_lambda < 1``: ``p = mix_lambda * p - (1 - mix_lambda) * key_redundancy(k, L, W, thr)``;
    5. ``evict_`` with ``n_recent = max(n_recent, W)`` (the window is always kept), moving
       ``positions``, ``hist`` and ``log_w``; then ``hist_lengths = new_length - W``.

    Returns the keep mask ``[B, Hkv, C]`` (before compaction; all valid slots for skipped heads).
    """
    B, Hq, W, D = q_win.shape
    C = k_cache.shape[2]
    act = lengths.to(torch.int64) > (budget.to(torch.int64) if isinstance(budget, torch.Tensor) else budget)
    s = window_scores(q_win, k_cache, lengths, sm_scale, query_reduce, group_reduce, normalize)
    region = (lengths.to(torch.int64) - W).clamp(min=0)
    g = s
    if hist is not None:
        h2 = hist.clone()
        update_scores_(h2, s, region, hist_lengths, decay, hist_mode)
        cand = torch.arange(C, device=s.device).view(1, 1, C) < region.unsqueeze(-1)
        g = torch.where(cand, h2.to(s.dtype), s)
        hist.copy_(torch.where(act.unsqueeze(-1), h2, hist))
    p = pool_scores(g, region, pool, pool_kernel)
    if mix_lambda < 1.0:
        red = key_redundancy(k_cache, lengths, W, redundancy_threshold)
        p = mix_lambda * p - (1.0 - mix_lambda) * red
    keep, _ = select_keep(p, lengths, positions, budget, n_sink, max(n_recent, W), protect_ranges, keep_mask)
    compact_(k_cache, v_cache, lengths, keep, positions, hist, log_w)
    if hist_lengths is not None:
        hist_lengths.copy_(torch.where(act, (lengths.to(torch.int64) - W).clamp(min=0),
                                       hist_lengths.to(torch.int64)).to(hist_lengths.dtype))
    return keep


# ---------------------------------------------------------------------------
# Quantized KV (specs/merge-latent-quant.md §3 TaDA, §4.1 KIVI). One layer's
# quantized cache, all tensors in the cache dtype T (fp16 / bf16 / fp32) unless
# int32; b = bits in {2, 4, 8}, G = group in {32, 64, 128}, R = residual
# (a multiple of G), C = capacity (a multiple of R), P = 32 / b codes per word:
#
#   k_codes [B, Hkv, C / P, D] int32   keys per CHANNEL: word [w, d] holds tokens
#                                      P*w + j of channel d at bits [b*j, b*j + b)
#   k_scale, k_min [B, Hkv, C / G, D]  per (group of G tokens, channel)
#   v_codes [B, Hkv, C, D / P] int32   values per TOKEN: word [t, w] holds channels
#                                      P*w + j of token t at bits [b*j, b*j + b)
#   v_scale, v_min [B, Hkv, C, D / G]  per (token, group of G channels)
#   k_res, v_res [B, Hkv, R, D]        full-precision ring: token t at slot t % R
#   k_mean, v_mean [B, C, D] or None   TaDA: per-token mean over the kv heads (T)
#   lengths [B, Hkv] int32             tokens held
#
# With L = lengths: keys [0, L - L % R) are codes and [L - L % R, L) in the ring
# (flushed in blocks of R); values [0, max(L - R, 0)) are codes and the newest
# min(L, R) in the ring (a FIFO). Mean-centring needs every kv head of a batch
# element to hold the same number of tokens.
#
# Quantizer of one group x (asymmetric min-max, round to nearest even):
#   lo = round_down_T(min x); scale = round_up_T((max x - lo) / (2^b - 1))
#   q = clamp(rint((x - lo) / scale), 0, 2^b - 1)   (q = 0 when scale == 0)
#   x̂ = q * scale + lo     (fp32 arithmetic)
# Rounding lo down and the scale up (in T) keeps every x inside the code range,
# so |x - x̂| <= scale / 2 with the STORED scale, and a constant group is exact.
# Mean-centred: m = round_T(mean over heads in fp32), the head's deviation
# x - m is quantized, x̂ = m + dequantized deviation.
# ---------------------------------------------------------------------------

QUANT_BITS = (2, 4, 8)
QUANT_GROUPS = (32, 64, 128)

__all__ += ["round_down_to", "round_up_to", "quantize_group", "pack_codes", "unpack_codes", "quantize_kv",
            "dequantize_kv", "append_quantized_kv_", "quant_decode_attention", "quantized_cache_shapes"]


def round_down_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest value of ``dtype`` <= x (fp32 in, fp32 out)."""
    x = x.to(torch.float32)
    if dtype == torch.float32:
        return x
    r = x.to(dtype).to(torch.float32)
    down = torch.nextafter(r.to(dtype), torch.full_like(r, -math.inf).to(dtype)).to(torch.float32)
    return torch.where(r > x, down, r)


def round_up_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest value of ``dtype`` >= x (fp32 in, fp32 out)."""
    x = x.to(torch.float32)
    if dtype == torch.float32:
        return x
    r = x.to(dtype).to(torch.float32)
    up = torch.nextafter(r.to(dtype), torch.full_like(r, math.inf).to(dtype)).to(torch.float32)
    return torch.where(r < x, up, r)


def quantize_group(x: torch.Tensor, bits: int, dtype: torch.dtype, dim: int = -1):
    """Quantizes fp32 ``x`` in groups along ``dim`` (the whole dim is one group).
    Returns ``(codes int64, scale fp32, lo fp32)`` with scale / lo representable in ``dtype``
    and keepdim shapes."""
    x = x.to(torch.float32)
    qmax = (1 << bits) - 1
    lo = round_down_to(x.amin(dim, keepdim=True), dtype)
    hi = x.amax(dim, keepdim=True)
    scale = round_up_to((hi - lo) / qmax, dtype)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, torch.round((x - lo) / safe), torch.zeros_like(x)).clamp(0, qmax)
    return q.to(torch.int64), scale, lo


def pack_codes(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Packs integer codes along ``dim`` (size a multiple of 32 / bits) into int32 words, LSB first."""
    P = 32 // bits
    c = codes.to(torch.int64).movedim(dim, -1)
    c = c.reshape(*c.shape[:-1], c.shape[-1] // P, P)
    shifts = torch.arange(P, device=c.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # < 2^32, disjoint bit fields
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)


def unpack_codes(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 codes, ``dim`` grows by 32 / bits."""
    P = 32 // bits
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(P, device=w.device, dtype=torch.int64) * bits
    c = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*w.shape[:-1], w.shape[-1] * P).movedim(-1, dim)


def quantized_cache_shapes(B: int, Hkv: int, C: int, D: int, bits: int, group: int, residual: int,
                           mean_centred: bool) -> dict:
    """Shapes of every tensor of the layout above (None for absent means)."""
    P = 32 // bits
    return {
        "k_codes": (B, Hkv, C // P, D), "k_scale": (B, Hkv, C // group, D), "k_min": (B, Hkv, C // group, D),
        "v_codes": (B, Hkv, C, D // P), "v_scale": (B, Hkv, C, D // group), "v_min": (B, Hkv, C, D // group),
        "k_res": (B, Hkv, residual, D), "v_res": (B, Hkv, residual, D),
        "k_mean": (B, C, D) if mean_centred else None, "v_mean": (B, C, D) if mean_centred else None,
    }


def _head_mean(x: torch.Tensor, dtype: torch.dtype, dim: int = 1) -> torch.Tensor:
    # The mean over kv heads (``dim``) rounded to the storage dtype, summed in fp32 in head order
    # and divided by Hkv, as every kernel does: torch.mean sums in another order past 16 heads,
    # and the means, hence the codes, must match exactly.
    x = x.to(torch.float32)
    total = x.select(dim, 0).clone()
    for h in range(1, x.shape[dim]):
        total = total + x.select(dim, h)
    return (total / x.shape[dim]).to(dtype).to(torch.float32)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, capacity: int, bits: int, group: int,
                residual: int, mean_centred: bool) -> dict:
    """Quantizes a filled dense cache ``k, v [B, Hkv, T, D]`` (T <= capacity) with ``lengths``
    into the layout above. Returns a dict of the layout's tensors (storage dtype = k's; unwritten
    parts zero). Keys of tokens [0, L - L % R) and values of [0, max(L - R, 0)) become codes;
    the rest goes to the rings."""
    B, H, T, D = k.shape
    dt = k.dtype
    C, G, R, P = capacity, group, residual, 32 // bits
    shapes = quantized_cache_shapes(B, H, C, D, bits, G, R, mean_centred)
    out = {n: (None if s is None else torch.zeros(s, dtype=torch.int32 if "codes" in n else dt)) for n, s in
           shapes.items()}
    kf = torch.zeros(B, H, C, D)
    vf = torch.zeros(B, H, C, D)
    valid = valid_slot_mask(lengths, T)
    kf[:, :, :T] = torch.where(valid.unsqueeze(-1), k.to(torch.float32), 0.0)
    vf[:, :, :T] = torch.where(valid.unsqueeze(-1), v.to(torch.float32), 0.0)
    kdev, vdev = kf, vf
    if mean_centred:
        km, vm = _head_mean(kf, dt), _head_mean(vf, dt)  # [B, C, D]
        kdev, vdev = kf - km.unsqueeze(1), vf - vm.unsqueeze(1)
    for b in range(B):
        for h in range(H):
            L = int(lengths[b, h])
            nk, nv = L - L % R, max(L - R, 0)
            if nk:
                x = kdev[b, h, :nk].reshape(nk // G, G, D)  # groups of G tokens per channel
                q, s, lo = quantize_group(x, bits, dt, dim=1)
                out["k_codes"][b, h, : nk // P] = pack_codes(q.reshape(nk, D), bits, dim=0)
                out["k_scale"][b, h, : nk // G] = s.squeeze(1).to(dt)
                out["k_min"][b, h, : nk // G] = lo.squeeze(1).to(dt)
                if mean_centred:
                    out["k_mean"][b, :nk] = km[b, :nk].to(dt)
            if nv:
                x = vdev[b, h, :nv].reshape(nv, D // G, G)  # groups of G channels per token
                q, s, lo = quantize_group(x, bits, dt, dim=2)
                out["v_codes"][b, h, :nv] = pack_codes(q.reshape(nv, D), bits, dim=1)
                out["v_scale"][b, h, :nv] = s.squeeze(2).to(dt)
                out["v_min"][b, h, :nv] = lo.squeeze(2).to(dt)
                if mean_centred:
                    out["v_mean"][b, :nv] = vm[b, :nv].to(dt)
            for t in range(nk, L):
                out["k_res"][b, h, t % R] = k[b, h, t]
            for t in range(nv, L):
                out["v_res"][b, h, t % R] = v[b, h, t]
    return out


def dequantize_kv(cache: dict, lengths: torch.Tensor, bits: int, group: int, *,
                  dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(k, v) [B, Hkv, C, D]`` in ``dtype`` from the layout above; 0 past ``lengths``."""
    kc = cache["k_codes"]
    B, H, _, D = kc.shape
    G, R = group, cache["k_res"].shape[2]
    C = cache["k_scale"].shape[2] * G
    k = torch.zeros(B, H, C, D, dtype=dtype)
    v = torch.zeros(B, H, C, D, dtype=dtype)
    kq = unpack_codes(kc, bits, dim=2).to(torch.float32)  # [B, H, C, D]
    vq = unpack_codes(cache["v_codes"], bits, dim=3).to(torch.float32)
    ks = cache["k_scale"].to(torch.float32).repeat_interleave(G, dim=2)
    kl = cache["k_min"].to(torch.float32).repeat_interleave(G, dim=2)
    vs = cache["v_scale"].to(torch.float32).repeat_interleave(G, dim=3)
    vl = cache["v_min"].to(torch.float32).repeat_interleave(G, dim=3)
    kd, vd = kq * ks + kl, vq * vs + vl  # fp32, as every kernel computes it
    if cache.get("k_mean") is not None:
        kd = kd + cache["k_mean"].to(torch.float32).unsqueeze(1)
        vd = vd + cache["v_mean"].to(torch.float32).unsqueeze(1)
    for b in range(B):
        for h in range(H):
            L = int(lengths[b, h])
            nk, nv = L - L % R, max(L - R, 0)
            k[b, h, :nk] = kd[b, h, :nk].to(dtype)
            v[b, h, :nv] = vd[b, h, :nv].to(dtype)
            for t in range(nk, L):
                k[b, h, t] = cache["k_res"][b, h, t % R].to(dtype)
            for t in range(nv, L):
                v[b, h, t] = cache["v_res"][b, h, t % R].to(dtype)
    return k, v


def append_quantized_kv_(cache: dict, lengths: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, bits: int,
                         group: int) -> dict:
    """One decode step, in place: token ``t = L`` of every head (``k_new, v_new [B, Hkv, D]``).
    If ``t >= R`` the value at ring slot ``t % R`` (token ``t - R``) is quantized first; then the
    new token goes to ring slot ``t % R``; if ``(t + 1) % R == 0`` the ring's R keys (tokens
    ``t + 1 - R .. t``) become codes; ``lengths += 1``. Plain caches step each head from its own
    length; mean-centring takes each flushed token's mean over the heads, which all hold the same t."""
    B, H, D = k_new.shape
    dt = cache["k_res"].dtype
    G, R, P = group, cache["k_res"].shape[2], 32 // bits
    C = cache["v_codes"].shape[2]
    centred = cache.get("k_mean") is not None
    full = [(b, h) for b in range(B) for h in range(H) if int(lengths[b, h]) >= C]
    if full:  # checked before anything is written
        raise ValueError(f"append_quantized_kv_: head {list(full[0])} holds {int(lengths[full[0]])} tokens, "
                         f"capacity {C}")
    # Mean-centred: every head of b holds the same t and flushes together (the mean spans the
    # heads). Plain: each head steps from its own length.
    groups = [(b, list(range(H))) for b in range(B)] if centred else [(b, [h]) for b in range(B) for h in range(H)]
    for b, heads in groups:
        t = int(lengths[b, heads[0]])
        if t >= R:
            s = t - R
            x = cache["v_res"][b, heads, t % R].to(torch.float32)  # [heads, D]
            if centred:
                m = _head_mean(x, dt, dim=0)
                cache["v_mean"][b, s] = m.to(dt)
                x = x - m
            q, sc, lo = quantize_group(x.reshape(len(heads), D // G, G), bits, dt, dim=2)
            cache["v_codes"][b, heads, s] = pack_codes(q.reshape(len(heads), D), bits, dim=1)
            cache["v_scale"][b, heads, s] = sc.squeeze(2).to(dt)
            cache["v_min"][b, heads, s] = lo.squeeze(2).to(dt)
        cache["k_res"][b, heads, t % R] = k_new[b, heads].to(dt)
        cache["v_res"][b, heads, t % R] = v_new[b, heads].to(dt)
        if (t + 1) % R == 0:
            s0 = t + 1 - R
            x = cache["k_res"][b, heads].to(torch.float32)  # [heads, R, D], ring slot j = token s0 + j
            if centred:
                m = _head_mean(x, dt, dim=0)  # [R, D]
                cache["k_mean"][b, s0:s0 + R] = m.to(dt)
                x = x - m
            q, sc, lo = quantize_group(x.reshape(len(heads), R // G, G, D), bits, dt, dim=2)
            cache["k_codes"][b, heads, s0 // P:(s0 + R) // P] = pack_codes(q.reshape(len(heads), R, D), bits, dim=1)
            cache["k_scale"][b, heads, s0 // G:(s0 + R) // G] = sc.squeeze(2).to(dt)
            cache["k_min"][b, heads, s0 // G:(s0 + R) // G] = lo.squeeze(2).to(dt)
        for h in heads:
            lengths[b, h] += 1
    return cache


def quant_decode_attention(q: torch.Tensor, cache: dict, lengths: torch.Tensor, bits: int, group: int,
                           sm_scale: float | None = None, *, dtype: torch.dtype = torch.float64):
    """Decode attention over the quantized cache: :func:`decode_attention` over
    :func:`dequantize_kv` (the kernels dequantize in registers, never in memory)."""
    k, v = dequantize_kv(cache, lengths, bits, group, dtype=dtype)
    return decode_attention(q, k, v, lengths, None, sm_scale, dtype=dtype)


# ---------------------------------------------------------------------------
# FP8 KV (e4m3, per-head scales, the vLLM / FlashInfer layout). One layer:
#
#   k_fp8, v_fp8 [B, Hkv, C, D] torch.float8_e4m3fn   slot t of head (b, h) = token t
#   k_scale, v_scale [Hkv] float32                     per kv head, positive and finite
#   lengths [B, Hkv] int32                             tokens held
#
# x ≈ float(code) * scale. Quantizer: y = fp32(x) / scale (ONE correctly rounded
# fp32 division), clamped to [-448, 448] (the e4m3fn range: saturating, so a finite
# or infinite x never becomes NaN; a NaN x stays NaN), then rounded to nearest even
# into e4m3fn (subnormals included: step 2^-9 below 2^-6). Dequantized: fp32
# float(code) * scale (one rounding). Static scales (vLLM's): given by the user or
# calibrated by fp8_scales (amax over the live tokens / 448; a head with no nonzero
# live value, or none at all, gets 1).
# ---------------------------------------------------------------------------

FP8_MAX = 448.0

__all__ += ["FP8_MAX", "fp8_scales", "quantize_fp8", "dequantize_fp8", "quantize_fp8_kv", "dequantize_fp8_kv",
            "append_fp8_kv_", "fp8_decode_attention"]


def fp8_scales(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-kv-head scales ``[Hkv]`` fp32 of ``x [B, Hkv, T, D]``: amax over the live tokens
    (``t < lengths[b, h]``, every batch element) / 448 in fp32; 1 where that amax is 0
    (or no token is live). Non-finite live values are the caller's problem (the scale
    then is inf / NaN)."""
    B, H, T, _ = x.shape
    valid = valid_slot_mask(lengths.clamp(max=T), T).unsqueeze(-1)  # [B, H, T, 1]
    amax = torch.where(valid, x.to(torch.float32).abs(), 0.0).amax(dim=(0, 2, 3)) if x.numel() else \
        torch.zeros(H, dtype=torch.float32, device=x.device)
    scale = amax / torch.tensor(FP8_MAX, dtype=torch.float32)
    return torch.where(amax > 0, scale, torch.ones_like(scale)).to(torch.float32)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3fn codes of ``x`` (any float dtype) with ``scale`` broadcast against it (fp32)."""
    y = x.to(torch.float32) / scale.to(torch.float32)
    # torch's CPU cast rounds to nearest even (subnormals too); clamping first makes
    # saturation explicit rather than relying on the cast's overflow behaviour.
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``float(code) * scale`` (one fp32 rounding, as every kernel computes it)."""
    return codes.to(torch.float32) * scale.to(torch.float32)


def quantize_fp8_kv(k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, capacity: int,
                    k_scale: torch.Tensor, v_scale: torch.Tensor) -> dict:
    """The fp8 cache of a prefill ``k, v [B, Hkv, T, D]`` (T <= capacity): codes of the live
    tokens, 0 elsewhere (kernels leave those slots untouched: unspecified)."""
    B, H, T, D = k.shape
    out = {"k_fp8": torch.zeros(B, H, capacity, D, dtype=torch.float8_e4m3fn),
           "v_fp8": torch.zeros(B, H, capacity, D, dtype=torch.float8_e4m3fn),
           "k_scale": k_scale.to(torch.float32).clone(), "v_scale": v_scale.to(torch.float32).clone()}
    ks, vs = out["k_scale"].view(1, H, 1, 1), out["v_scale"].view(1, H, 1, 1)
    kq, vq = quantize_fp8(k, ks), quantize_fp8(v, vs)
    for b in range(B):
        for h in range(H):
            L = int(lengths[b, h])
            out["k_fp8"][b, h, :L] = kq[b, h, :L]
            out["v_fp8"][b, h, :L] = vq[b, h, :L]
    return out


def dequantize_fp8_kv(cache: dict, lengths: torch.Tensor, *,
                      dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(k, v) [B, Hkv, C, D]`` in ``dtype``; 0 past ``lengths``."""
    kf, vf = cache["k_fp8"], cache["v_fp8"]
    H, C = kf.shape[1], kf.shape[2]
    valid = valid_slot_mask(lengths, C).unsqueeze(-1)
    k = dequantize_fp8(kf, cache["k_scale"].view(1, H, 1, 1)).to(dtype)
    v = dequantize_fp8(vf, cache["v_scale"].view(1, H, 1, 1)).to(dtype)
    return torch.where(valid, k, 0.0), torch.where(valid, v, 0.0)


def append_fp8_kv_(cache: dict, lengths: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> dict:
    """One decode step in place: ``k_new, v_new [B, Hkv, D]`` quantized into slot
    ``lengths[b, h]`` of every head, then ``lengths += 1``. A full head (length C) is an error."""
    B, H, D = k_new.shape
    C = cache["k_fp8"].shape[2]
    kq = quantize_fp8(k_new, cache["k_scale"].view(1, H, 1))
    vq = quantize_fp8(v_new, cache["v_scale"].view(1, H, 1))
    for b in range(B):
        for h in range(H):
            t = int(lengths[b, h])
            if not 0 <= t < C:
                raise ValueError(f"append_fp8_kv_: head [{b}, {h}] holds {t} tokens, capacity {C}")
            cache["k_fp8"][b, h, t] = kq[b, h]
            cache["v_fp8"][b, h, t] = vq[b, h]
            lengths[b, h] += 1
    return cache


def fp8_decode_attention(q: torch.Tensor, cache: dict, lengths: torch.Tensor, sm_scale: float | None = None, *,
                         dtype: torch.dtype = torch.float64):
    """Decode attention over the fp8 cache: :func:`decode_attention` over
    :func:`dequantize_fp8_kv` (the kernels decode in registers and fold the scales)."""
    k, v = dequantize_fp8_kv(cache, lengths, dtype=dtype)
    return decode_attention(q, k, v, lengths, None, sm_scale, dtype=dtype)
