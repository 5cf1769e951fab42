"""One denoising step of the bench SD UNet: sequential (1 process, 1 thread) against the engine
with 2 stages on 2 processes (1 thread each, gloo).

The engine plans on FLOPs (deterministic, the configuration asked for) and, for comparison, on
block times measured on rank 0 (``cost="time"``): on CPU, FLOPs misjudge the attention-heavy
blocks, so the two plans differ.

Both sides run in processes started by :func:`asyncdiff.engine.launch.launch` and time their
calls inside the worker (median of ``K`` calls); model building and the first engine calls
(warm-up step with tracing and planning, first asynchronous step) are not timed. The
pytest-benchmark time of each test is the whole launch and is not the measurement.
"""

from __future__ import annotations

import pytest
import torch

from asyncdiff.engine.launch import launch
from benchmarks.bench_workers import engine_step, plain_step

SIZE, K, WARM_UP = "bench", 10, 1


@pytest.fixture(scope="module")
def baseline() -> dict:
    """The sequential result of this run, filled by :func:`test_step_sequential`."""
    return {}


def _sequential() -> dict:
    return launch(plain_step, 1, SIZE, K, threads=1)[0]


def test_step_sequential(benchmark, run_record, baseline):
    result = baseline["sequential"] = benchmark.pedantic(_sequential, rounds=1, iterations=1)
    assert result["threads"] == 1 and torch.isfinite(result["out"]).all()
    seconds = run_record.keep("step/sequential", result["median_s"])
    benchmark.extra_info.update({"median_s": round(seconds, 4), "times_s": [round(t, 4) for t in result["times_s"]]})
    run_record.print("one step, sequential (1 process x 1 thread, plain unet)",
                     [f"median of {K} calls: {seconds * 1e3:.1f} ms"])


@pytest.mark.parametrize("cost", ["flops", "time"])
def test_step_engine_2_stages(benchmark, run_record, baseline, cost):
    if "sequential" not in baseline:  # run alone (-k): measure the baseline here, still in this run
        baseline["sequential"] = _sequential()
    sequential = baseline["sequential"]
    results = benchmark.pedantic(launch, args=(engine_step, 2, SIZE, K, WARM_UP, cost), kwargs={"threads": 1},
                                 rounds=1, iterations=1)
    r0, r1 = results[0], results[1]
    # the warm-up step is sequential and must reproduce the plain UNet
    torch.testing.assert_close(r0["first"], r0["reference"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r0["first"], sequential["out"], rtol=1e-5, atol=1e-5)
    # every rank returns the same broadcast output
    torch.testing.assert_close(r1["last"], r0["last"], rtol=0, atol=0)
    assert torch.isfinite(r0["last"]).all() and r0["threads"] == r1["threads"] == 1
    seq = sequential["median_s"]
    par = r0["median_s"]
    speedup = seq / par
    benchmark.extra_info.update({
        "cost": cost, "engine_median_s": round(par, 4), "engine_mean_s": round(r0["mean_s"], 4),
        "sequential_median_s": round(seq, 4), "speedup": round(speedup, 3),
        "rank1_median_s": round(r1["median_s"], 4), "compile_s_rank0": round(r0["compile_s"], 3),
        "stage_blocks": r0["stage_blocks"], "bytes_sent_per_step": [r0["bytes_sent_per_step"], r1["bytes_sent_per_step"]],
        "warm_up_max_abs_diff": r0["warm_up_max_abs_diff"], "times_s": [round(t, 4) for t in r0["times_s"]]})
    run_record.print(f"one step, AsyncEngine 2 stages, cost={cost!r} (2 processes x 1 thread, gloo) vs sequential",
                     [f"engine: median of {K} asynchronous calls on rank 0 {par * 1e3:.1f} ms "
                      f"(mean {r0['mean_s'] * 1e3:.1f} ms; rank 1 median {r1['median_s'] * 1e3:.1f} ms)",
                      f"sequential: {seq * 1e3:.1f} ms; speed-up {speedup:.2f}x",
                      f"plan: {r0['stage_blocks']} blocks per stage; bytes sent per step rank 0 "
                      f"{r0['bytes_sent_per_step'] / 1e6:.3f} MB, rank 1 {r1['bytes_sent_per_step'] / 1e6:.3f} MB; "
                      f"trace+plan+split on rank 0 {r0['compile_s']:.2f} s; warm-up step max abs diff "
                      f"{r0['warm_up_max_abs_diff']:.1e}"])
