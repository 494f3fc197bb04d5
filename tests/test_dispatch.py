# SPDX-License-Identifier: Apache-2.0
"""Backend choice (kvkern._dispatch): every front door asks the tuning database with exactly its
OpSpec's keys, and a tuned file decides the backend (and launch config) on CUDA."""

from __future__ import annotations

import pytest
import torch

import kvkern
from kvkern import _dispatch, quant_ops, tuning
from kvkern._fake import triton_twin

from utils import isolate_tuning_database

H100 = "NVIDIA_H100_80GB_HBM3"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    isolate_tuning_database(monkeypatch, tmp_path)
    _dispatch._choose_cached.cache_clear()
    yield
    tuning.clear_caches()
    _dispatch._choose_cached.cache_clear()


@pytest.fixture
def recorded(monkeypatch):
    calls = []
    real = _dispatch._choose

    def spy(op, device_type, device_index, backend, static, dims, tuned_dir):
        calls.append((op, static, dims))
        return real(op, device_type, device_index, backend, static, dims, tuned_dir)

    monkeypatch.setattr(_dispatch, "_choose", spy)
    return calls


def _call_every_tuned_front_door(B=2, Hkv=2, G=2, D=64, C=128):
    dt = torch.float32
    q = torch.randn(B, Hkv * G, D, dtype=dt)
    k, v = torch.randn(B, Hkv, C, D, dtype=dt), torch.randn(B, Hkv, C, D, dtype=dt)
    lengths = torch.randint(1, C, (B, Hkv), dtype=torch.int32)
    kvkern.decode_attention(q, k, v, lengths)
    cache = kvkern.QuantizedKVCache.empty(B, Hkv, C, D, bits=4, group=32, residual=64, mean_centred=True, dtype=dt)
    cache.fill_(k, v, torch.full((B, Hkv), 70, dtype=torch.int32))
    cache.append_(k[:, :, 0], v[:, :, 0])
    cache.attention(q)
    fp8 = kvkern.FP8KVCache.empty(B, Hkv, C, D).fill_(k, v, lengths - 1, calibrate=True)
    fp8.append_(k[:, :, 0], v[:, :, 0])
    fp8.attention(q)
    q_win = torch.randn(B, Hkv * G, 4, D, dtype=dt)
    scores = kvkern.window_scores(q_win, k, lengths)
    kvkern.select_keep(scores, lengths, budget=16)


def test_every_tuned_front_door_asks_with_its_spec_keys(recorded):
    _call_every_tuned_front_door()
    specs = tuning.known_specs()
    tuned = {op for op, _, _ in recorded if op in specs}
    assert tuned >= {"decode_attention", "quant_decode_attention", "quantize_kv_", "append_quantized_kv_",
                     "fp8_decode_attention", "quantize_fp8_kv_", "append_fp8_kv_", "window_scores", "select_keep"}
    for op, static, dims in recorded:
        if op in specs:
            assert tuple(k for k, _ in static) == specs[op].static, op
            assert tuple(k for k, _ in dims) == specs[op].dims, op
            assert all(isinstance(v, int) and v > 0 for _, v in dims), (op, dims)


def _fake_cuda(monkeypatch, op):
    # Both kernels registered for CUDA, and this process's GPU is an H100: what a CUDA build sees.
    real = _dispatch._kernels

    def kernels(name, device_type):
        if device_type == "cuda":
            return {"cuda": name, "triton": triton_twin(name)}
        return real(name, device_type)

    monkeypatch.setattr(_dispatch, "_kernels", kernels)
    monkeypatch.setattr(tuning, "device_name", lambda device: H100)


def _write(root, spec, static, entries):
    meta = {"schema": 1, "op": spec.op, "kvkern": "0.1.0", "torch": torch.__version__,
            "triton": tuning._installed_triton(), "cuda": "13.0", "gpu": "NVIDIA H100 80GB HBM3", "device": H100,
            "cc": "9.0", "sm_count": 132, "tuned_by": "autotune@test", "date": "2026-11-25T00:00:00Z"}
    path = root / spec.op / tuning.config_file_name(spec, H100, static)
    tuning.write_config_file(path, meta, spec, entries)


QUANT_STATIC = {"head_dim": 128, "dtype": "bf16", "bits": 4, "quant_group": 128, "centred": 0}


@pytest.mark.parametrize("spec, static, dims, key", [
    (quant_ops.QUANTIZE_KV_TUNING, QUANT_STATIC, {"batch_heads": 64, "tokens": 30000}, (64, 32768)),
    (quant_ops.APPEND_QUANTIZED_KV_TUNING, {**QUANT_STATIC, "residual": 128}, {"batch_heads": 48}, (64,)),
    (quant_ops.QUANTIZE_FP8_KV_TUNING, {"head_dim": 128, "dtype": "fp16"}, {"batch_heads": 5, "tokens": 900},
     (8, 1024)),
    (quant_ops.APPEND_FP8_KV_TUNING, {"head_dim": 64, "dtype": "fp32"}, {"batch_heads": 8}, (8,)),
])
def test_a_tuned_file_picks_the_writer_backend(monkeypatch, tmp_path, spec, static, dims, key):
    _fake_cuda(monkeypatch, spec.op)
    _write(tmp_path, spec, static, {key: {"backend": "triton", "us": 3.0}})
    frozen_static, frozen_dims = tuple(static.items()), tuple(dims.items())
    choose = _dispatch._choose_cached
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))  # the lookup reads it; the argument keys the cache
    assert choose(spec.op, "cuda", 0, "auto", frozen_static, frozen_dims, str(tmp_path)) == (triton_twin(spec.op),)
    # an explicit backend wins over the file; symbolic dims and foreign keys read nothing
    assert choose(spec.op, "cuda", 0, "cuda", frozen_static, frozen_dims, str(tmp_path)) == (spec.op,)
    symbolic = tuple((k, -1) for k in dims)
    assert choose(spec.op, "cuda", 0, "auto", frozen_static, symbolic, str(tmp_path)) == (spec.op,)
    assert choose(spec.op, "cuda", 0, "auto", frozen_static[:-1], frozen_dims, str(tmp_path)) == (spec.op,)


def test_tuned_attention_config_follows_its_backend(monkeypatch, tmp_path):
    spec = quant_ops.QUANT_DECODE_ATTENTION_TUNING
    _fake_cuda(monkeypatch, spec.op)
    static = {"head_dim": 128, "dtype": "bf16", "group": 4, "bits": 2, "quant_group": 64}
    _write(tmp_path, spec, static, {(8, 32768): {"backend": "cuda", "num_splits": 12, "us": 80.0}})
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    args = (tuple(static.items()), (("batch_heads", 8), ("capacity", 32768)), str(tmp_path))
    assert _dispatch._choose_cached(spec.op, "cuda", 0, "auto", *args) == (spec.op, 12)
    # the triton kernel does not get the CUDA kernel's split count
    assert _dispatch._choose_cached(spec.op, "cuda", 0, "triton", *args) == (triton_twin(spec.op), 0)


def test_clear_caches_reaches_the_backend_choice(monkeypatch, tmp_path):
    # After files change in a long-lived process, tuning.clear_caches() is the documented way to
    # see them: the front doors' cached choice must follow, not keep answering from before.
    spec = quant_ops.QUANT_DECODE_ATTENTION_TUNING
    _fake_cuda(monkeypatch, spec.op)
    static = {"head_dim": 128, "dtype": "bf16", "group": 4, "bits": 4, "quant_group": 128}
    dims = {"batch_heads": 8, "capacity": 4096}
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
    device = torch.device("cuda", 0)
    with pytest.warns(tuning.TuningWarning, match="no tuned"):
        assert _dispatch.choose_kernel(spec.op, "t", device, "auto", static, dims)[1] == (0,)
    _write(tmp_path, spec, static, {(8, 4096): {"backend": "cuda", "num_splits": 6, "us": 9.0}})
    assert _dispatch.choose_kernel(spec.op, "t", device, "auto", static, dims)[1] == (0,)  # still cached
    tuning.clear_caches()
    assert _dispatch.choose_kernel(spec.op, "t", device, "auto", static, dims)[1] == (6,)


def test_choice_errors_name_the_backend():
    cache = kvkern.FP8KVCache.empty(1, 1, 8, 64)
    with pytest.raises(ValueError, match=r"kvkern.append_fp8_kv_: backend: expected one of .*got 'gpu'"):
        kvkern.append_fp8_kv_(torch.randn(1, 1, 64), torch.randn(1, 1, 64), cache, backend="gpu")
    with pytest.raises(RuntimeError, match=r"kvkern.append_fp8_kv_: backend: 'cuda' is not available for cpu"):
        kvkern.append_fp8_kv_(torch.randn(1, 1, 64), torch.randn(1, 1, 64), cache, backend="cuda")
    assert int(cache.lengths) == 0  # nothing was written


def test_available_backends_is_what_the_dispatcher_has():
    assert _dispatch.available_backends("quantize_kv_", "cpu")[0] == "cpu"
    assert _dispatch.available_backends("quantize_kv_", "meta") == ()


def test_compile_with_dynamic_shapes_runs_without_a_lookup(recorded):
    # torch.compile(dynamic=True) makes the sizes symbolic: the choice must not need their values
    # (no database lookup, the kernels' heuristics), and the results equal eager calls.
    D, Hkv, G, C = 64, 2, 2, 96

    def step(q, k, v, lengths, cache, k_new, v_new):
        dense = kvkern.decode_attention(q, k, v, lengths)
        cache.append_(k_new, v_new)
        return dense, cache.attention(q)

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for B in (2, 3):
        q = torch.randn(B, Hkv * G, D)
        k, v = torch.randn(B, Hkv, C, D), torch.randn(B, Hkv, C, D)
        lengths = torch.randint(1, C, (B, Hkv), dtype=torch.int32)
        k_new, v_new = torch.randn(B, Hkv, D), torch.randn(B, Hkv, D)
        caches = []
        for _ in range(2):
            cache = kvkern.QuantizedKVCache.empty(B, Hkv, C, D, bits=4, group=32, residual=32, dtype=torch.float32)
            caches.append(cache.fill_(k, v, torch.full((B, Hkv), 40, dtype=torch.int32)))
        want = step(q, k, v, lengths, caches[0], k_new, v_new)
        got = compiled(q, k, v, lengths, caches[1], k_new, v_new)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert torch.equal(caches[0].lengths, caches[1].lengths)
    symbolic = [(op, dims) for op, _, dims in recorded if all(v == -1 for _, v in dims)]
    assert {op for op, _ in symbolic} >= {"decode_attention", "append_quantized_kv_", "quant_decode_attention"}
