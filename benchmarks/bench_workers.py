"""Worker functions the benchmarks start with :func:`asyncdiff.engine.launch.launch`.

They live in an importable module because spawned processes import the function by name. Each
measures inside the workers (process start-up and model building are not timed) and returns
plain numbers; the pytest side prints them and checks only correctness.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from asyncdiff.engine.launch import local_device

__all__ = ["MB", "engine_step", "p2p_latency", "plain_step", "sd_bench_inputs"]

KB, MB = 1024, 1024 * 1024


# -- gloo point to point ------------------------------------------------------------------------
def _pattern(nbytes: int) -> torch.Tensor:
    return (torch.arange(nbytes, dtype=torch.int64) % 251).to(torch.uint8)


def p2p_latency(sizes: tuple[int, ...], reps: tuple[int, ...], warmup: int,
                gather_bytes: int, gather_reps: int) -> dict[str, Any]:
    """Ping-pong between ranks 0 and 1 with blocking ``dist.send``/``dist.recv`` for each size.

    One-way time = round trip / 2, median over ``reps`` round trips after ``warmup`` ones. Then an
    ``all_gather`` of ``gather_bytes`` per rank, median over ``gather_reps`` (barrier before each).
    Returns ``{"one_way_s": {size: s}, "all_gather_s": s, "echo_ok": bool, "gather_ok": bool}``.
    """
    rank = dist.get_rank()
    peer = 1 - rank
    device = local_device()  # a GPU under NCCL: the host waits for each transfer to finish
    one_way: dict[int, float] = {}
    echo_ok = True
    for nbytes, n in zip(sizes, reps):
        send = _pattern(nbytes).to(device)
        back = torch.empty(nbytes, dtype=torch.uint8, device=device)
        times = []
        dist.barrier()
        for i in range(warmup + n):
            if rank == 0:
                start = time.perf_counter()
                dist.send(send, peer)
                dist.recv(back, peer)
                _synchronize(device)
                if i >= warmup:
                    times.append((time.perf_counter() - start) / 2)
            else:
                dist.recv(back, peer)
                dist.send(back, peer)
        if rank == 0:
            echo_ok = echo_ok and torch.equal(back, send)
            one_way[nbytes] = statistics.median(times)
    mine = torch.full((gather_bytes,), rank, dtype=torch.uint8, device=device)
    outputs = [torch.empty(gather_bytes, dtype=torch.uint8, device=device) for _ in range(dist.get_world_size())]
    gather_times = []
    for _ in range(1 + gather_reps):  # the first one is warm-up
        dist.barrier()
        _synchronize(device)
        start = time.perf_counter()
        dist.all_gather(outputs, mine)
        _synchronize(device)
        gather_times.append(time.perf_counter() - start)
    gather_ok = all(bool((out == r).all()) for r, out in enumerate(outputs))
    return {"one_way_s": one_way, "all_gather_s": statistics.median(gather_times[1:]),
            "echo_ok": echo_ok, "gather_ok": gather_ok}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- one denoising step of the bench SD UNet ----------------------------------------------------
def sd_bench_inputs(unet: torch.nn.Module, seed: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A CFG-batch-2 call of an SD UNet as the pipeline makes it: (2, C, s, s) latents, a timestep
    tensor, (2, 77, cross_attention_dim) text embeddings, ``return_dict=False``."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    text = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    return (sample, torch.tensor(501)), {"encoder_hidden_states": text, "return_dict": False}


def _bench_unet(size: str) -> torch.nn.Module:
    from asyncdiff.models.sd import build_sd15

    return build_sd15(size, 0).unet.eval()


def plain_step(size: str, k: int) -> dict[str, Any]:
    """The sequential baseline: the plain UNet, median of ``k`` calls after one warm-up call."""
    unet = _bench_unet(size)
    args, kwargs = sd_bench_inputs(unet)
    times = []
    with torch.no_grad():
        for i in range(1 + k):
            start = time.perf_counter()
            out = unet(*args, **kwargs)[0]
            if i:
                times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "times_s": times, "threads": torch.get_num_threads(),
            "out": out}


def engine_step(size: str, k: int, warm_up: int, cost: str = "flops") -> dict[str, Any]:
    """``AsyncEngine`` with 2 stages on 2 processes: 2 untimed calls (the first traces, plans and
    runs the warm-up step), then ``k`` timed asynchronous calls, each timed on its own. ``cost``:
    what the planner balances (``"time"`` is measured on rank 0 during the first call).

    Rank 0 also runs the plain UNet first (before the engine releases weights) so the warm-up
    step, which must be exact, can be checked against it.
    """
    from asyncdiff.engine.runtime import AsyncEngine, EngineConfig

    rank = dist.get_rank()
    unet = _bench_unet(size)
    args, kwargs = sd_bench_inputs(unet)
    with torch.no_grad():
        reference = unet(*args, **kwargs)[0] if rank == 0 else None
        engine = AsyncEngine(unet, EngineConfig(model_n=2, warm_up=warm_up, cost=cost), latent="sample")
        first = engine(*args, **kwargs)[0]  # warm-up step; traces and plans
        engine(*args, **kwargs)  # first asynchronous step
        dist.barrier()
        times = []
        loop_start = time.perf_counter()
        for _ in range(k):
            start = time.perf_counter()
            out = engine(*args, **kwargs)[0]
            times.append(time.perf_counter() - start)
        loop_s = time.perf_counter() - loop_start
        engine.reset_state()
    result = {"median_s": statistics.median(times), "times_s": times, "mean_s": loop_s / k,
              "threads": torch.get_num_threads(), "compile_s": engine.compile_seconds,
              "bytes_sent_per_step": engine.bytes_sent_per_step,
              "stage_blocks": [len(s) for s in engine.plan.stages], "last": out}
    if rank == 0:
        result["warm_up_max_abs_diff"] = (first - reference).abs().max().item()
        result["reference"] = reference
        result["first"] = first
    return result
