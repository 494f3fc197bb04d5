# SPDX-License-Identifier: Apache-2.0
"""Small CUDA cases for compute-sanitizer (run by tools/gpu_check.py).

    compute-sanitizer --tool memcheck python tools/sanitizer_cases.py [all|cuda|triton]

Covers odd lengths, empty heads, out-of-range lengths (must never become an
address), every split rule path, log_w, strided views, each dtype and head dim.
Each output is also checked against the reference, so the run fails on wrong
numbers as well as on bad memory accesses.
"""

import os
import sys

import torch

import kvkern
from kvkern import reference


def cases():
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for D in (64, 128, 256):
            for G, Hkv in ((1, 2), (3, 2), (8, 1)):
                yield dict(B=2, Hkv=Hkv, G=G, C=97, D=D, dtype=dtype)


def run(backend: str) -> int:
    failures = 0
    for c in cases():
        B, Hkv, G, C, D, dtype = c["B"], c["Hkv"], c["G"], c["C"], c["D"], c["dtype"]
        q = torch.randn(B, G * Hkv, D, device="cuda", dtype=dtype)
        # Allocate exactly C slots so any read past the cache is outside the allocation.
        k = torch.randn(B, Hkv, C, D, device="cuda", dtype=dtype)
        v = torch.randn(B, Hkv, C, D, device="cuda", dtype=dtype)
        log_w = torch.randn(B, Hkv, C, device="cuda")
        lengths = torch.randint(0, C + 1, (B, Hkv), device="cuda", dtype=torch.int32)
        lengths[0, 0] = 0
        lengths[-1, -1] = C
        for config in ({}, {"num_splits": 1}, {"num_splits": 3}, {"num_splits": 16}):
            out = kvkern.decode_attention(q, k, v, lengths, log_w, backend=backend, config=config)
            ref, _ = reference.decode_attention(q, k, v, lengths, log_w)
            err = (out.double() - ref).abs().max().item()
            if not err < 3e-2:
                print(f"FAIL {backend} {c} {config}: max error {err}")
                failures += 1
        bad = lengths.clone()
        bad[0, 0], bad[-1, -1] = C + 5, -3
        op = torch.ops.kvkern.decode_attention_triton if backend == "triton" else torch.ops.kvkern.decode_attention
        out, _ = op(q, k, v, bad)
        torch.cuda.synchronize()
        if not torch.isnan(out[0, :G]).all():
            print(f"FAIL {backend} {c}: out-of-range length did not give NaN")
            failures += 1
    return failures


def run_eviction(backend: str) -> int:
    """score_evict_ (window scores, update, select, compact) and evict_ with every protection kind,
    on caches allocated to exactly C slots, checked against the reference."""
    failures = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for G, Hkv, D, C, W in ((1, 2, 64, 97, 5), (4, 2, 128, 300, 32), (3, 3, 64, 1025, 16)):
            B, budget = 2, C // 3
            k = torch.randn(B, Hkv, C, D, device="cuda", dtype=dtype)
            v = torch.randn(B, Hkv, C, D, device="cuda", dtype=dtype)
            q_win = torch.randn(B, G * Hkv, W, D, device="cuda", dtype=dtype)
            lengths = torch.randint(W + 4, C + 1, (B, Hkv), device="cuda", dtype=torch.int32)
            lengths[0, 0] = budget  # within budget: untouched
            positions = torch.arange(C, device="cuda", dtype=torch.int32).view(1, 1, C).repeat(B, Hkv, 1)
            hist = torch.rand(B, Hkv, C, device="cuda")
            hist_lengths = torch.randint(0, budget, (B, Hkv), device="cuda", dtype=torch.int32)
            ref = [t.cpu().clone() for t in (k, v, lengths, positions, hist, hist_lengths)]
            keep = kvkern.score_evict_(q_win, k, v, lengths, budget, positions=positions, n_sink=2, hist=hist,
                                       hist_lengths=hist_lengths, backend=backend)
            keep_ref = reference.score_evict_(q_win.cpu(), ref[0], ref[1], ref[2], ref[3], budget, n_sink=2,
                                              hist=ref[4], hist_lengths=ref[5])
            torch.cuda.synchronize()
            if not (torch.equal(keep.cpu(), keep_ref) and torch.equal(lengths.cpu(), ref[2])):
                print(f"FAIL score_evict_ {backend} {dtype} G={G} C={C}: kept sets differ from the reference")
                failures += 1
            scores = torch.rand(B, Hkv, C, device="cuda")
            ranges = torch.tensor([[3, 9]], device="cuda", dtype=torch.int32)
            cuts = torch.tensor([C // 2], device="cuda", dtype=torch.int32)
            ref = [t.cpu().clone() for t in (k, v, lengths, positions)]
            keep = kvkern.evict_(k, v, lengths, scores, max(budget // 2, 12), positions=positions, n_sink=1,
                                 n_recent=2, protect_ranges=ranges, segment_cuts=cuts, backend=backend)
            keep_ref = reference.evict_(ref[0], ref[1], ref[2], ref[3], scores.cpu(), max(budget // 2, 12), 1, 2,
                                        ranges.cpu(), None, cuts.cpu())
            torch.cuda.synchronize()
            if not torch.equal(keep.cpu(), keep_ref):
                print(f"FAIL evict_ {backend} {dtype} G={G} C={C}: kept sets differ from the reference")
                failures += 1
    return failures


def run_quant(backend: str) -> int:
    """Quantized cache: fill, a few appends across a flush, attention; exact buffers (C slots),
    checked against the reference."""
    failures = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for bits, group, centred, G in ((2, 32, False, 1), (4, 64, True, 4), (8, 128, False, 3)):
            B, Hkv, D, R = 2, 2, 128, 128
            C = 2 * R
            cache = kvkern.QuantizedKVCache.empty(B, Hkv, C, D, bits=bits, group=group, residual=R,
                                                  mean_centred=centred, dtype=dtype, device="cuda")
            k = torch.randn(B, Hkv, C, D, device="cuda", dtype=dtype)
            v = torch.randn(B, Hkv, C, D, device="cuda", dtype=dtype)
            lengths = torch.full((B, Hkv), R - 2, dtype=torch.int32, device="cuda")
            cache.fill_(k, v, lengths, backend=backend)
            for t in range(R - 2, R + 3):
                cache.append_(k[:, :, t], v[:, :, t], backend=backend)
            q = torch.randn(B, G * Hkv, D, device="cuda", dtype=dtype)
            ref_cache = {f: (None if getattr(cache, f) is None else getattr(cache, f).cpu())
                         for f in kvkern.quant_ops.FIELDS}
            ref, _ = reference.quant_decode_attention(q.cpu(), ref_cache, cache.lengths.cpu(), bits, group)
            # both CUDA attention kernels: the default (tensor cores for 16-bit caches) and the scalar one
            for kernel in (("auto", "scalar") if backend == "cuda" else ("auto",)):
                os.environ["KVKERN_QUANT_DECODE_KERNEL"] = kernel
                out = cache.attention(q, backend=backend)
                torch.cuda.synchronize()
                err = (out.double().cpu() - ref).abs().max().item()
                if not err < 3e-2:
                    print(f"FAIL quant {backend}/{kernel} {dtype} bits={bits} G={G}: max error {err}")
                    failures += 1
            os.environ.pop("KVKERN_QUANT_DECODE_KERNEL")
    return failures


def run_fp8(backend: str) -> int:
    """FP8 cache: calibrated fill, appends up to a full head (plus one more: a no-op on CUDA),
    attention with the default and a forced split count; codes exact, attention vs the reference."""
    failures = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for G, D in ((1, 64), (4, 128), (3, 256)):
            B, Hkv, C = 2, 2, 70
            k = torch.randn(B, Hkv, C, D, device="cuda", dtype=dtype)
            v = torch.randn(B, Hkv, C, D, device="cuda", dtype=dtype)
            lengths = torch.tensor([[C - 3, 0], [1, C - 1]], dtype=torch.int32, device="cuda")
            cache = kvkern.FP8KVCache.empty(B, Hkv, C, D, device="cuda").fill_(k, v, lengths, calibrate=True,
                                                                              backend=backend)
            want = reference.quantize_fp8_kv(k.cpu(), v.cpu(), lengths.cpu(), C, cache.k_scale.cpu(),
                                             cache.v_scale.cpu())
            for t in range(4):
                kn = torch.randn(B, Hkv, D, device="cuda", dtype=dtype)
                vn = torch.randn(B, Hkv, D, device="cuda", dtype=dtype)
                cache.append_(kn, vn, backend=backend)
                ref_len = torch.minimum(lengths.cpu() + t + 1, torch.full_like(lengths.cpu(), C))
                if not torch.equal(cache.lengths.cpu(), ref_len):
                    print(f"FAIL fp8 append {backend} {dtype}: lengths {cache.lengths.tolist()}")
                    failures += 1
            q = torch.randn(B, G * Hkv, D, device="cuda", dtype=dtype)
            for splits in (0, 3):
                out = cache.attention(q, backend=backend, num_splits=splits)
                ref_cache = {"k_fp8": cache.k_fp8.cpu(), "v_fp8": cache.v_fp8.cpu(), "k_scale": cache.k_scale.cpu(),
                             "v_scale": cache.v_scale.cpu()}
                ref, _ = reference.fp8_decode_attention(q.cpu(), ref_cache, cache.lengths.cpu())
                torch.cuda.synchronize()
                err = (out.double().cpu() - ref).abs().max().item()
                if not err < 3e-2:
                    print(f"FAIL fp8 {backend} {dtype} G={G} D={D} splits={splits}: max error {err}")
                    failures += 1
            got = cache.k_fp8.view(torch.uint8).cpu()
            for b in range(B):
                for h in range(Hkv):
                    L = int(lengths[b, h])
                    if not torch.equal(got[b, h, :L], want["k_fp8"].view(torch.uint8)[b, h, :L]):
                        print(f"FAIL fp8 codes {backend} {dtype} head [{b}, {h}]")
                        failures += 1
    return failures


def main() -> int:
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    backends = [b for b in kvkern.ops.available_backends("decode_attention", "cuda")
                if which == "all" or b == which]
    failures = sum(run(b) for b in backends)
    for b in kvkern.ops.available_backends("score_evict_", "cuda"):
        if which in ("all", b):
            failures += run_eviction(b)
    for b in kvkern.ops.available_backends("quant_decode_attention", "cuda"):
        if which in ("all", b):
            failures += run_quant(b)
    for b in kvkern.ops.available_backends("fp8_decode_attention", "cuda"):
        if which in ("all", b):
            failures += run_fp8(b)
    torch.cuda.synchronize()
    print(f"sanitizer cases: backends {backends}, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
