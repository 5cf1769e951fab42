"""What a plan's stale inputs cost, measured in one process before any run (Note [predicted drift]).

Note [predicted drift]: the main-path depth (Note [staleness]) counts how old the oldest path to
the output is, not how much each stale value matters: a wrapped UNet plan keeps the long
high-resolution skip connections fresh while its main path is two steps old. So measure it: run
a candidate plan's stage programs in one process exactly as the engine schedules them
(:class:`~asyncdiff.engine.local.AsyncSimulator`: every rank's program of Note [schedule as
program] through the engine's own interpreter, Note [one interpreter] in stage.py; equal to the
engine's outputs, tests/test_drift.py and tests/test_local.py).
Two measures are built on it. ``predicted_drift`` feeds recorded sequential inputs and averages
the relative distance of the denoiser's outputs per step: cheap, but it ignores how errors
compound through the scheduler, and on the trained digits model it ranked plans opposite to
their image fidelity (BENCHMARKS.md). ``asyncdiff.inspection.final_latents`` runs the whole
pipeline with the simulator standing in for the denoiser: the final latents are the engine's
for that call and seed, so their distance from the sequential run's is the deviation the plan
will add, at the cost of one sequential run per candidate (needs the real weights).

Note [predicted error]: what the engine measures to choose a plan (Note [fidelity rule] in
:mod:`asyncdiff.partition.planner`), on the real call and with no pipeline at hand: the flat
inputs of the warm-up calls and of the first asynchronous call (recorded as they arrive), then
``horizon`` more calls continued on the line of the last step (:func:`extrapolated_calls`: the
latents and the timestep move on as they last moved). Each candidate plan runs these calls under
the engine's schedule in one process (:class:`AsyncSimulator`), and its error is the mean
relative distance of its outputs from the sequential ones over the asynchronous steps. The
horizon is ``model_n + 1`` steps, so that staleness compounding through the stages (a value as
old as the main path is deep) shows. What it rests on: the measured movement between the last
warm-up call and the first asynchronous one (with ``warm_up=1``, the only two calls there are) and
the assumption that the next few steps move alike; the loop is open (the plan's own errors do not
feed back through the scheduler), which is why it ranks plans, not predicts PSNR.

Example:
    >>> import torch
    >>> from asyncdiff.partition.plan import Plan
    >>> from asyncdiff.partition.split import split_graph
    >>> from asyncdiff.partition.trace import trace_denoiser
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)])
    >>> calls = [((torch.randn(2, 4),), {}) for _ in range(3)]
    >>> traced = trace_denoiser(net, *calls[0])
    >>> one = split_graph(traced, Plan(stages=(("0", "1", "2", "3"),)))
    >>> predicted_drift(traced, one, net, calls)  # a single stage reads nothing stale
    0.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from asyncdiff.engine.local import AsyncSimulator
from asyncdiff.partition.split import SplitDenoiser
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["extrapolated_calls", "output_motion", "predicted_drift", "predicted_error", "record_calls",
           "sequential_outputs", "simulate_async"]


def simulate_async(traced: TracedDenoiser, split: SplitDenoiser, denoiser: torch.nn.Module,
                   calls: Sequence[list[torch.Tensor]], warm_up: int = 1) -> list[list[Any]]:
    """The output leaves of each of ``calls`` (flat call tensors) under :class:`AsyncSimulator`."""
    simulator = AsyncSimulator(traced, split, denoiser, warm_up)
    return [simulator.leaves(tensors) for tensors in calls]


def predicted_drift(traced: TracedDenoiser, split: SplitDenoiser, denoiser: torch.nn.Module,
                    calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]], warm_up: int = 1) -> float:
    """Note [predicted drift]: mean relative L2 distance of ``split``'s asynchronous outputs from the
    sequential ones over the recorded ``calls`` after ``warm_up``."""
    flat = [traced.flatten_call(args, kwargs) for args, kwargs in calls]
    asynchronous = simulate_async(traced, split, denoiser, flat, warm_up)
    sequential = simulate_async(traced, split, denoiser, flat, len(flat))
    errors = []
    for got, want in list(zip(asynchronous, sequential))[warm_up:]:
        g = torch.cat([t.float().flatten() for t in got if isinstance(t, torch.Tensor)])
        w = torch.cat([t.float().flatten() for t in want if isinstance(t, torch.Tensor)])
        errors.append(float((g - w).norm() / w.norm().clamp_min(1e-30)))
    return sum(errors) / len(errors) if errors else 0.0


def extrapolated_calls(calls: Sequence[list[Any]], horizon: int) -> list[list[Any]]:
    """``calls`` (flat call tensors, two or more) and ``horizon`` more: every tensor that changed
    over the last recorded step continues on its line (integers rounded), the rest repeats."""
    if len(calls) < 2:
        raise ValueError(f"extrapolating needs two recorded calls, got {len(calls)}")
    before, last = calls[-2], calls[-1]
    out = [list(c) for c in calls]
    for k in range(1, horizon + 1):
        nxt = []
        for a, b in zip(last, before):
            moving = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                      and a.dtype == b.dtype and a.dtype != torch.bool and not torch.equal(a, b))
            if not moving:
                nxt.append(a)
                continue
            x = a.double() + k * (a.double() - b.double())
            nxt.append((x if a.is_floating_point() else x.round()).to(a.dtype))
        out.append(nxt)
    return out


def sequential_outputs(traced: TracedDenoiser, denoiser: torch.nn.Module, calls: Sequence[list[Any]]) -> list[list[Any]]:
    """The denoiser's outputs (leaves) for flat ``calls``, through its one-stage split."""
    from asyncdiff.partition.plan import Plan
    from asyncdiff.partition.split import split_graph

    whole = split_graph(traced, Plan(stages=(tuple(traced.blocks),)))
    return simulate_async(traced, whole, denoiser, calls, len(calls))


def predicted_error(traced: TracedDenoiser, split: SplitDenoiser, denoiser: torch.nn.Module,
                    calls: Sequence[list[Any]], warm_up: int, reference: Sequence[list[Any]] | None = None) -> float:
    """Note [predicted error]: mean relative L2 distance of ``split``'s outputs under the engine's
    schedule (warm-up ``warm_up``) from the sequential ``reference`` outputs, over the
    asynchronous steps of flat ``calls``."""
    reference = sequential_outputs(traced, denoiser, calls) if reference is None else reference
    errors = []
    for got, want in list(zip(simulate_async(traced, split, denoiser, calls, warm_up), reference))[warm_up:]:
        g = torch.cat([t.double().flatten() for t in got if isinstance(t, torch.Tensor)])
        w = torch.cat([t.double().flatten() for t in want if isinstance(t, torch.Tensor)])
        errors.append(float((g - w).norm() / w.norm().clamp_min(1e-30)))
    return sum(errors) / len(errors) if errors else 0.0


def output_motion(reference: Sequence[list[Any]], warm_up: int) -> float:
    """How far the first output moved per step over the asynchronous steps of ``reference``
    (sequential outputs per call): the mean relative L2 distance between consecutive ones, the
    unit of Note [predicted refresh] in engine/refresh.py."""
    firsts = [next(t for t in out if isinstance(t, torch.Tensor)).double().flatten() for out in reference]
    moves = [float((b - a).norm() / a.norm().clamp_min(1e-30)) for a, b in zip(firsts, firsts[1:])][max(0, warm_up - 1):]
    return sum(moves) / len(moves) if moves else 0.0


def record_calls(pipeline: Any, denoiser: str, **call_kwargs: Any) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Every call ``pipeline(**call_kwargs)`` makes to ``pipeline.<denoiser>``, inputs copied."""
    module = getattr(pipeline, denoiser)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def keep(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (args, kwargs)))

    handle = module.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            pipeline(**call_kwargs)
    finally:
        handle.remove()
    return calls
