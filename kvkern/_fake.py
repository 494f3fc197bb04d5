# SPDX-License-Identifier: Apache-2.0
"""Fake (meta) implementations of every kvkern op, in one place.

They describe output shapes and dtypes for torch.compile and FakeTensor tracing
and never touch data. Shape rules are stated with torch._check.
"""

from __future__ import annotations

import torch


def _decode_attention_fake(q, k_cache, v_cache, lengths, log_w=None, sm_scale=None,
                           num_splits=0, block_n=0, num_warps=0, num_stages=0):
    torch._check(q.dim() == 3, lambda: "decode_attention: q must be [B, Hq, D]")
    torch._check(k_cache.dim() == 4, lambda: "decode_attention: k_cache must be [B, Hkv, C, D]")
    B, Hq, D = q.shape
    out = q.new_empty((B, Hq, D))
    lse = q.new_empty((B, Hq), dtype=torch.float32)
    return out, lse


for _name in ("kvkern::decode_attention", "kvkern::decode_attention_triton"):
    torch.library.register_fake(_name)(_decode_attention_fake)


# ---- score-and-evict: each op X and its Triton twin share one fake ----------

def _scores_like(k_cache):
    B, H, C, _ = k_cache.shape
    return k_cache.new_empty((B, H, C), dtype=torch.float32)


def _window_scores_fake(q_win, k_cache, lengths, sm_scale=None, query_reduce="mean", group_reduce="mean",
                        normalize=False, pool="none", pool_kernel=1):
    torch._check(q_win.dim() == 4, lambda: "window_scores: q_win must be [B, Hq, W, D]")
    return _scores_like(k_cache)


def _expected_attention_scores_fake(mean, cov, k_cache, v_cache, lengths, n_sink=4, epsilon=0.0, sm_scale=None):
    return _scores_like(k_cache)


def _slot_scores_fake(k_cache, v_cache, lengths, kind, seed=0):
    return _scores_like(k_cache)


def _key_redundancy_fake(k_cache, lengths, n_window, threshold=0.5):
    return _scores_like(k_cache)


def _update_scores_fake(hist, new, lengths, hist_lengths, decay, hist_mode="max"):
    return None


def _select_keep_fake(scores, lengths, positions, budgets, budget, n_sink=0, n_recent=0, protect_ranges=None,
                      keep_mask=None, segment_cuts=None, segment_min=None):
    return scores.new_empty(scores.shape, dtype=torch.bool), lengths.new_empty(lengths.shape, dtype=torch.int32)


def _compact_fake(k_cache, v_cache, lengths, keep, positions=None, hist=None, log_w=None):
    return None


def _evict_fake(k_cache, v_cache, lengths, positions, scores, budgets, budget, n_sink=0, n_recent=0,
                protect_ranges=None, keep_mask=None, segment_cuts=None, segment_min=None, hist=None, log_w=None):
    return scores.new_empty(scores.shape, dtype=torch.bool)


def _allocate_head_budgets_fake(scores, lengths, budget, safeguard=0.2, n_sink=0, n_recent=0):
    return lengths.new_empty(lengths.shape, dtype=torch.int32)


def _score_evict_fake(q_win, k_cache, v_cache, lengths, positions, budgets, budget, n_sink=0, n_recent=0,
                      sm_scale=None, query_reduce="mean", group_reduce="max_per_query", normalize=True, pool="none",
                      pool_kernel=1, hist=None, hist_lengths=None, decay=0.8, hist_mode="max", mix_lambda=1.0,
                      redundancy_threshold=0.5, protect_ranges=None, keep_mask=None, log_w=None):
    B, H, C, _ = k_cache.shape
    return k_cache.new_empty((B, H, C), dtype=torch.bool)


# (name, in-place?) -> fake; the Triton twin of "x_" is "x_triton_", of "x" is "x_triton".
EVICTION_FAKES = {
    "window_scores": _window_scores_fake,
    "expected_attention_scores": _expected_attention_scores_fake,
    "slot_scores": _slot_scores_fake,
    "key_redundancy": _key_redundancy_fake,
    "update_scores_": _update_scores_fake,
    "select_keep": _select_keep_fake,
    "compact_": _compact_fake,
    "evict_": _evict_fake,
    "allocate_head_budgets": _allocate_head_budgets_fake,
    "score_evict_": _score_evict_fake,
}


def triton_twin(op: str) -> str:
    """``evict_`` -> ``evict_triton_``, ``window_scores`` -> ``window_scores_triton``."""
    return op[:-1] + "_triton_" if op.endswith("_") else op + "_triton"


for _op, _fake in EVICTION_FAKES.items():
    for _name in (_op, triton_twin(_op)):
        torch.library.register_fake(f"kvkern::{_name}")(_fake)


# ---- compressed caches (quantized KV, FP8 KV): each op and its Triton twin ------

def _register_with_twins(fakes):
    for op, fake in fakes.items():
        for name in (op, triton_twin(op)):
            torch.library.register_fake(f"kvkern::{name}")(fake)


def _attention_outputs(q):
    """out [B, Hq, D] in q's dtype and lse [B, Hq] fp32, as every decode-attention op returns."""
    B, Hq, D = q.shape
    return q.new_empty((B, Hq, D)), q.new_empty((B, Hq), dtype=torch.float32)


# ---- quantized KV ---------------------------------------------------------------

def _quantize_kv_fake(k, v, lengths, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean,
                      v_mean, bits, group):
    return None


def _dequantize_kv_fake(k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean, v_mean, lengths,
                        bits, group):
    B, H, _, D = k_codes.shape
    C = k_scale.shape[2] * group
    return k_res.new_empty((B, H, C, D)), k_res.new_empty((B, H, C, D))


def _append_quantized_kv_fake(k_new, v_new, lengths, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res,
                              k_mean, v_mean, bits, group):
    return None


def _quant_decode_attention_fake(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, k_mean, v_mean,
                                 lengths, bits, group, sm_scale=None, num_splits=0):
    return _attention_outputs(q)


QUANT_FAKES = {
    "quantize_kv_": _quantize_kv_fake,
    "dequantize_kv": _dequantize_kv_fake,
    "append_quantized_kv_": _append_quantized_kv_fake,
    "quant_decode_attention": _quant_decode_attention_fake,
}

_register_with_twins(QUANT_FAKES)


# ---- FP8 KV ----------------------------------------------------------------------

def _quantize_fp8_kv_fake(k, v, lengths, k_scale, v_scale, k_fp8, v_fp8):
    return None


def _append_fp8_kv_fake(k_new, v_new, lengths, k_scale, v_scale, k_fp8, v_fp8):
    return None


def _fp8_decode_attention_fake(q, k_fp8, v_fp8, k_scale, v_scale, lengths, sm_scale=None, num_splits=0, block_n=0,
                               num_warps=0, num_stages=0):
    torch._check(q.dim() == 3, lambda: "fp8_decode_attention: q must be [B, Hq, D]")
    return _attention_outputs(q)


FP8_FAKES = {
    "quantize_fp8_kv_": _quantize_fp8_kv_fake,
    "append_fp8_kv_": _append_fp8_kv_fake,
    "fp8_decode_attention": _fp8_decode_attention_fake,
}

_register_with_twins(FP8_FAKES)
