# SPDX-License-Identifier: Apache-2.0
"""Benchmark harness: device timing, the copy-bandwidth yardstick, a summary table.

Decode-time ops are memory-bound, so every case records the fewest bytes it must
move and its achieved bandwidth as a fraction of the copy bandwidth measured in
the same run (read + write bytes of a large device copy).

On CUDA each call is timed with CUDA events (median of many, after warm-up, L2
flushed before each call unless KVKERN_BENCH_WARM_L2=1); on CPU with
time.perf_counter. pytest-benchmark's own statistics time the same call plus a
synchronize; the summary and ``extra_info`` use the device timing.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

RESULTS: list[dict] = []  # one row per benchmarked (case, impl), for the summary
_COPY_BW: dict[str, float] = {}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device: str, *, warmup: int = 3, reps: int | None = None, budget_s: float = 1.0) -> float:
    """Median seconds per call of ``fn()``."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device == "cuda":
        flush = None if os.environ.get("KVKERN_BENCH_WARM_L2") == "1" else torch.empty(
            256 * 2**20, dtype=torch.uint8, device="cuda")
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        est = max(start.elapsed_time(end) / 1e3, 1e-6)
        reps = reps or int(min(200, max(10, budget_s / est)))
        times = []
        for _ in range(reps):
            if flush is not None:
                flush.zero_()  # evicts the previous call's data from L2
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    t0 = time.perf_counter()
    fn()
    est = max(time.perf_counter() - t0, 1e-6)
    reps = reps or int(min(50, max(3, budget_s / est)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write), measured once per run."""
    if device not in _COPY_BW:
        n = (1 << 30) if device == "cuda" else (256 << 20)
        src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        seconds = time_call(lambda: dst.copy_(src), device, budget_s=0.5)
        _COPY_BW[device] = 2 * n / seconds
        del src, dst
    return _COPY_BW[device]


def record(benchmark, *, case: str, impl: str, device: str, fn, nbytes: int, note: str = "") -> float:
    """Times ``fn`` on ``device``, fills ``benchmark.extra_info`` and the summary row.

    Under ``--benchmark-disable`` (the CI smoke test) it only calls ``fn`` once.
    """
    if getattr(benchmark, "disabled", False):
        fn()
        sync(device)
        return float("nan")
    bw_copy = copy_bandwidth(device)
    seconds = time_call(fn, device)
    achieved = nbytes / seconds
    info = {"case": case, "impl": impl, "device": device_name(device), "bytes": nbytes,
            "median_us": seconds * 1e6, "achieved_GBps": achieved / 1e9, "copy_GBps": bw_copy / 1e9,
            "fraction_of_copy_bw": achieved / bw_copy, "note": note}
    benchmark.extra_info.update(info)
    RESULTS.append(info)

    def timed():
        fn()
        sync(device)

    benchmark.pedantic(timed, rounds=3 if device == "cpu" else 10, warmup_rounds=1)
    return seconds


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.write_sep("=", "kvkern decode benchmarks: median time, bandwidth as a fraction of copy")
    eager = {r["case"]: r["median_us"] for r in RESULTS if r["impl"] == "eager"}
    tr.write_line(f"{'case':34} {'impl':12} {'median':>11} {'GB/s':>9} {'of copy':>8} {'vs eager':>9}")
    for r in RESULTS:
        speed = f"{eager[r['case']] / r['median_us']:.2f}x" if r["case"] in eager else "-"
        tr.write_line(f"{r['case']:34} {r['impl']:12} {r['median_us']:>9.1f}us {r['achieved_GBps']:>9.1f} "
                      f"{100 * r['fraction_of_copy_bw']:>7.1f}% {speed:>9}")
    for dev, bw in _COPY_BW.items():
        tr.write_line(f"copy bandwidth on {device_name(dev)}: {bw / 1e9:.1f} GB/s (read + write, same run)")


@pytest.fixture(scope="session")
def cuda_available():
    return torch.cuda.is_available()
