"""What the engine costs on top of the denoiser when there is nothing to split (N=1).

``AsyncEngine(unet, EngineConfig(model_n=1, cost="flops"))`` against the plain ``unet`` of
``build_sd15("bench")``, one process, one thread, a CFG-batch-2 call. The first engine call
(trace + plan + split) runs before timing. Rounds alternate: every timed engine round is paired
with one plain call, run before it on even rounds and after it on odd rounds (pedantic's setup
and teardown), so drift and order effects hit both alike. Where CUDA is present the same runs on
the GPU too (synchronising after each call), which is where the engine's Python work per step
matters most.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from asyncdiff.engine.runtime import AsyncEngine, EngineConfig
from benchmarks.bench_workers import sd_bench_inputs

ROUNDS, WARMUP = 12, 2
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def bench_unet():
    from asyncdiff.models.sd import build_sd15

    return build_sd15("bench", 0).unet.eval()


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
def test_engine_overhead_n1(benchmark, run_record, single_thread, bench_unet, device):
    unet = bench_unet.to(device)
    args, kwargs = sd_bench_inputs(unet)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    engine = AsyncEngine(unet, EngineConfig(model_n=1, cost="flops"))
    with torch.no_grad():
        reference = unet(*args, **kwargs)[0]
        start = time.perf_counter()
        first = engine(*args, **kwargs)[0]  # traces, plans, splits: not timed below
        first_call_s = time.perf_counter() - start
    torch.testing.assert_close(first, reference, rtol=1e-5, atol=1e-5)

    plain_times: list[float] = []
    rounds = {"n": 0}

    def plain() -> None:
        with torch.no_grad():
            start = time.perf_counter()
            unet(*args, **kwargs)
            _synchronize(device)
            plain_times.append(time.perf_counter() - start)

    def plain_before() -> None:
        if rounds["n"] % 2 == 0:
            plain()

    def plain_after() -> None:
        if rounds["n"] % 2 == 1:
            plain()
        rounds["n"] += 1

    def engine_call() -> torch.Tensor:
        with torch.no_grad():
            out = engine(*args, **kwargs)[0]
        _synchronize(device)
        return out

    out = benchmark.pedantic(engine_call, setup=plain_before, teardown=plain_after, rounds=ROUNDS,
                             warmup_rounds=WARMUP, iterations=1)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert len(plain_times) == ROUNDS + WARMUP

    engine_s = run_record.median(benchmark)
    plain_s = run_record.keep(f"engine/plain_unet/{device}", statistics.median(plain_times[WARMUP:]))
    overhead = engine_s / plain_s
    benchmark.extra_info.update({
        "plain_median_s": round(plain_s, 5), "engine_median_s": round(engine_s, 5),
        "overhead_ratio": round(overhead, 4), "first_engine_call_s": round(first_call_s, 3),
        "compile_s": round(engine.compile_seconds, 3), "threads": torch.get_num_threads(),
        "sample_shape": list(args[0].shape), "device": device})
    run_record.print(f"engine overhead at N=1, bench SD UNet on {device}, 1 thread, CFG batch 2, interleaved rounds",
                     [f"plain unet {plain_s * 1e3:.1f} ms, AsyncEngine(model_n=1) {engine_s * 1e3:.1f} ms "
                      f"(medians of {ROUNDS}): ratio {overhead:.3f}",
                      f"first engine call (trace + plan + split, excluded) {first_call_s:.2f} s"])
