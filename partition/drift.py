"""What a plan's stale inputs cost, measured in one process before any run (Note [predicted drift]).

Note [predicted drift]: the main-path depth (Note [staleness]) counts how old the oldest path to
the output is, not how much each stale value matters: a wrapped UNet plan keeps the long
high-resolution skip connections fresh while its main path is two steps old. So measure it: run
a candidate plan's stage programs in one process exactly as the engine schedules them
(:class:`AsyncSimulator` executes every rank's program of Note [schedule as program], the lists
the engine executes; equal to the engine's outputs, tests/test_drift.py).
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

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree

from asyncdiff.engine.compensation import Extrapolation, spacing_at
from asyncdiff.engine.schedule import Exchange, Layout, Message, Recv, Run, Schedule, Send, StepKind
from asyncdiff.partition.split import SplitDenoiser
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["AsyncSimulator", "extrapolated_calls", "output_motion", "predicted_drift", "predicted_error", "record_calls",
           "sequential_outputs", "simulate_async"]


class AsyncSimulator:
    """The engine's schedule (stride 1) for one split, run in one process: call it as the denoiser.

    Every step executes each rank's program of Note [schedule as program] (the very lists the
    engine executes), the ranks taking turns: a rank runs until it must wait for a message no
    other rank has sent yet. Messages are the values themselves (no packing, no transfer dtype).
    A step in which no rank can go on is a schedule that would hang: an error."""

    def __init__(self, traced: TracedDenoiser, split: SplitDenoiser, denoiser: torch.nn.Module,
                 warm_up: int = 1, compensate: str = "none", timesteps: Callable[[int], float] | None = None) -> None:
        """``compensate``, ``timesteps(step)``: as the engine's (Note [compensation]; without
        ``timesteps`` the spacing is taken as uniform)."""
        self.traced, self.split = traced, split
        self.compensate, self.timesteps = compensate, timesteps
        self.extrapolations = [Extrapolation() for _ in split.stages]
        self.schedule = Schedule(split.plan.model_n, warm_up)
        self.layout = Layout.of(split)
        self.segments = {seg.index: (seg, seg.module(denoiser)) for seg in split.segments}
        self.values: dict[Message, list[str]] = {}  # the values each message carries
        for t in split.transfers:
            names = self.values.setdefault((t.src_segment, t.dst_segment), [])
            if t.value not in names:
                names.append(t.value)
        self.stale: list[dict[str, Any]] = [{} for _ in split.stages]  # per rank
        self.step = 0

    def leaves(self, tensors: list[torch.Tensor]) -> list[Any]:
        """One step on flat call tensors: the output leaves."""
        n = len(self.split.stages)
        programs = [self.schedule.program(self.step, rank, self.layout) for rank in range(n)]
        if self.compensate != "none":  # Note [compensation], as the engine's _call_stages
            ratio = spacing_at(self.timesteps, self.step)
            self.stale = [e.step(stale, self.compensate, ratio, p.kind == StepKind.ASYNC)
                          for e, stale, p in zip(self.extrapolations, self.stale, programs)]
        sent: dict[Message, dict[str, Any]] = {}
        env: list[dict[str, Any]] = [{} for _ in range(n)]
        received: list[dict[str, Any]] = [{} for _ in range(n)]
        posted: list[tuple[Message, ...]] = [() for _ in range(n)]
        done, leaves = [0] * n, ()
        with torch.no_grad():
            while any(done[r] < len(programs[r].actions) for r in range(n)):
                progressed = False
                for r, program in enumerate(programs):
                    while done[r] < len(program.actions):
                        action = program.actions[done[r]]
                        if isinstance(action, Recv):
                            if any(m not in sent for m in action.messages):
                                break  # another rank sends it later in this step
                            for m in action.messages:
                                received[r].update(sent[m])
                        elif isinstance(action, Run):
                            seg, module = self.segments[action.segment]
                            values = {**(self.stale[r] if action.age else received[r]), **env[r]}
                            outs, seg_leaves = module(*tensors, *[values[v] for v in seg.inputs])
                            env[r].update(zip(seg.outputs, outs))
                            if seg.index == self.split.output_segment:
                                leaves = seg_leaves
                        elif isinstance(action, (Send, Exchange)):
                            for m in action.messages if isinstance(action, Send) else action.sends:
                                sent[m] = {v: env[r][v] for v in self.values[m]}
                            if isinstance(action, Exchange):
                                posted[r] = action.recvs
                        done[r] += 1
                        progressed = True
                if not progressed:
                    waiting = {r: str(programs[r].actions[done[r]]) for r in range(n) if done[r] < len(programs[r].actions)}
                    raise RuntimeError(f"the schedule hangs at step {self.step}: every rank waits ({waiting})")
        for r, program in enumerate(programs):
            if program.kind.synchronous:
                self.stale[r] = received[r]
            elif posted[r]:
                self.stale[r] = {v: value for m in posted[r] for v, value in sent[m].items()}
        self.step += 1
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
    return simulate_async(whole, denoiser, calls, len(calls), traced)


def predicted_error(traced: TracedDenoiser, split: SplitDenoiser, denoiser: torch.nn.Module,
                    calls: Sequence[list[Any]], warm_up: int, reference: Sequence[list[Any]] | None = None) -> float:
    """Note [predicted error]: mean relative L2 distance of ``split``'s outputs under the engine's
    schedule (warm-up ``warm_up``) from the sequential ``reference`` outputs, over the
    asynchronous steps of flat ``calls``."""
    reference = sequential_outputs(traced, denoiser, calls) if reference is None else reference
    errors = []
    for got, want in list(zip(simulate_async(split, denoiser, calls, warm_up, traced), reference))[warm_up:]:
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
