"""What a plan's stale inputs cost, measured in one process before any run (Note [predicted drift]).

Note [predicted drift]: the main-path depth (Note [staleness]) counts how old the oldest path to
the output is, not how much each stale value matters: a wrapped UNet plan keeps the long
high-resolution skip connections fresh while its main path is two steps old. So measure it: run
a candidate plan's stage programs in one process exactly as the engine schedules them
(:class:`AsyncSimulator`: a segment reads values of its own stage from this step and values
from other stages from the previous step's run; equal to the engine's outputs, tests/test_drift.py).
Two measures are built on it. ``predicted_drift`` feeds recorded sequential inputs and averages
the relative distance of the denoiser's outputs per step: cheap, but it ignores how errors
compound through the scheduler, and on the trained digits model it ranked plans opposite to
their image fidelity (BENCHMARKS.md). ``asyncdiff.inspection.final_latents`` runs the whole
pipeline with the simulator standing in for the denoiser: the final latents are the engine's
for that call and seed, so their distance from the sequential run's is the deviation the plan
will add, at the cost of one sequential run per candidate (needs the real weights).

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

from asyncdiff.partition.split import SplitDenoiser
from asyncdiff.partition.trace import TracedDenoiser

__all__ = ["AsyncSimulator", "predicted_drift", "record_calls", "simulate_async"]


class AsyncSimulator:
    """The engine's schedule (stride 1) for one split, run in one process: call it as the denoiser.
    The first ``warm_up`` calls run sequentially; after that every value a segment receives from
    another stage is the one computed at the previous call (Note [stale inputs])."""

    def __init__(self, traced: TracedDenoiser, split: SplitDenoiser, denoiser: torch.nn.Module,
                 warm_up: int = 1) -> None:
        self.traced, self.split, self.denoiser, self.warm_up = traced, split, denoiser, warm_up
        self.stale_inputs = {(t.value, t.dst_segment) for t in split.transfers}
        self.modules = [seg.module(denoiser) for seg in split.segments]
        self.previous: dict[str, Any] = {}
        self.step = 0

    def leaves(self, tensors: list[torch.Tensor]) -> list[Any]:
        """One step on flat call tensors: the output leaves."""
        values: dict[str, Any] = {}
        leaves: tuple[Any, ...] = ()
        with torch.no_grad():
            for seg, module in zip(self.split.segments, self.modules):
                inputs = [self.previous[v] if self.step >= self.warm_up and (v, seg.index) in self.stale_inputs
                          else values[v] for v in seg.inputs]
                outs, seg_leaves = module(*tensors, *inputs)
                values.update(zip(seg.outputs, outs))
                if seg.index == self.split.output_segment:
                    leaves = seg_leaves
        self.previous, self.step = values, self.step + 1
        return list(leaves)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.traced.unflatten_output(self.leaves(self.traced.flatten_call(args, kwargs)))


def simulate_async(split: SplitDenoiser, denoiser: torch.nn.Module, calls: Sequence[list[torch.Tensor]],
                   warm_up: int = 1, traced: TracedDenoiser | None = None) -> list[list[Any]]:
    """The output leaves of each of ``calls`` (flat call tensors) under :class:`AsyncSimulator`."""
    simulator = AsyncSimulator(traced, split, denoiser, warm_up)  # type: ignore[arg-type]
    return [simulator.leaves(tensors) for tensors in calls]


def predicted_drift(traced: TracedDenoiser, split: SplitDenoiser, denoiser: torch.nn.Module,
                    calls: Sequence[tuple[tuple[Any, ...], dict[str, Any]]], warm_up: int = 1) -> float:
    """Note [predicted drift]: mean relative L2 distance of ``split``'s asynchronous outputs from the
    sequential ones over the recorded ``calls`` after ``warm_up``."""
    flat = [traced.flatten_call(args, kwargs) for args, kwargs in calls]
    asynchronous = simulate_async(split, denoiser, flat, warm_up, traced)
    sequential = simulate_async(split, denoiser, flat, len(flat), traced)
    errors = []
    for got, want in list(zip(asynchronous, sequential))[warm_up:]:
        g = torch.cat([t.float().flatten() for t in got if isinstance(t, torch.Tensor)])
        w = torch.cat([t.float().flatten() for t in want if isinstance(t, torch.Tensor)])
        errors.append(float((g - w).norm() / w.norm().clamp_min(1e-30)))
    return sum(errors) / len(errors) if errors else 0.0


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
