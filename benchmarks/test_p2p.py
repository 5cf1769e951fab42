"""Point-to-point latency and bandwidth between 2 local processes, by transfer size: gloo (CPU
processes), and NCCL where the machine has 2 GPUs.

The numbers are measured inside the workers (ping-pong with blocking send/recv, one-way = round
trip / 2) and reported in ``extra_info``; the pytest-benchmark time of this test is the whole
launch (process start-up included) and is not the measurement. An ``all_gather`` of 16 MB per
rank is measured in the same workers for comparison (FACTS.md: ~40 ms; avoid it).
"""

from __future__ import annotations

import pytest
import torch

from asyncdiff.engine.launch import launch
from benchmarks.bench_workers import KB, MB, p2p_latency

SIZES = (4 * KB, 64 * KB, 1 * MB, 16 * MB)
REPS = (400, 200, 60, 20)
GATHER_BYTES, GATHER_REPS = 16 * MB, 10


def _label(nbytes: int) -> str:
    return f"{nbytes // MB} MB" if nbytes >= MB else f"{nbytes // KB} KB"


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL point-to-point needs 2 GPUs"))])
def test_p2p_by_size(benchmark, run_record, monkeypatch, backend):
    monkeypatch.setenv("ASYNCDIFF_DEVICE", "cpu" if backend == "gloo" else "cuda")
    results = benchmark.pedantic(launch, args=(p2p_latency, 2, SIZES, REPS, 5, GATHER_BYTES, GATHER_REPS),
                                 rounds=1, iterations=1)
    r = results[0]
    assert r["echo_ok"], "the ping-pong payload came back changed"
    assert results[0]["gather_ok"] and results[1]["gather_ok"], "all_gather returned wrong data"
    rows = [f"{'size':>6} {'reps':>5} {'one-way ms':>10} {'GB/s':>6}"]
    for nbytes, reps in zip(SIZES, REPS):
        s = r["one_way_s"][nbytes]
        gbps = nbytes / s / 1e9
        benchmark.extra_info[f"one_way_ms_{_label(nbytes).replace(' ', '')}"] = round(s * 1e3, 4)
        benchmark.extra_info[f"gbps_{_label(nbytes).replace(' ', '')}"] = round(gbps, 3)
        rows.append(f"{_label(nbytes):>6} {reps:>5} {s * 1e3:>10.3f} {gbps:>6.2f}")
    gather = r["all_gather_s"]
    p2p_16 = r["one_way_s"][16 * MB]
    benchmark.extra_info["all_gather_16MB_ms"] = round(gather * 1e3, 3)
    benchmark.extra_info["all_gather_over_p2p_16MB"] = round(gather / p2p_16, 2)
    rows.append(f"all_gather 16 MB per rank: {gather * 1e3:.2f} ms (median of {GATHER_REPS}), "
                f"{gather / p2p_16:.1f}x a one-way 16 MB send")
    run_record.print(f"{backend} p2p, 2 local processes (measured in the workers)", rows)
