"""One rank's stage for one call: its state across steps, its compiled programs, and running them.

:func:`run_stage` runs this rank's segments for one step (Notes [stale inputs] and [stride 2] in
:mod:`asyncdiff.engine.schedule`); :func:`share_output` gives every rank of the slice the step's
output; :func:`boundary_drift` is Note [adaptive refresh]'s measure.
"""

from __future__ import annotations

import datetime
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx

from asyncdiff.engine.comm import Pending, StageChannel, finish
from asyncdiff.engine.compensation import Extrapolation
from asyncdiff.engine.schedule import Exchange, Layout, Recv, Reuse, Run, Send, Share, StepKind, StepProgram
from asyncdiff.kernels.pack import PackLayout, pack, unpack
from asyncdiff.partition.split import SplitDenoiser, StageProgram
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["CompiledCall", "StageState", "boundary_drift", "output_template", "run_stage", "share_output"]

log = logging.getLogger(__name__)


@dataclass
class StageState:
    """What lives across the steps of one pipeline call, for one branch (Note [branches]);
    :meth:`reset` at every call."""

    stale: dict[str, torch.Tensor] = field(default_factory=dict)  # values received for use at the next step
    pending: Pending | None = None  # an asynchronous step's sends, and receives for the next step
    inflight: list[Pending] = field(default_factory=list)  # a warm-up step's sends
    channel: StageChannel | None = None  # where ``pending`` was posted
    reuse: tuple[Any, ...] = ()  # stride 2: the last stage's round output, the next step's prediction
    previous: dict[str, torch.Tensor] = field(default_factory=dict)  # last step's stale values (adaptive refresh)
    extrapolation: Extrapolation = field(default_factory=Extrapolation)  # Note [compensation]

    def drain(self) -> None:
        if self.pending is not None and self.channel is not None:
            self.stale = self.channel.wait(self.pending)
        for pending in self.inflight:
            finish(pending.works, self.channel.deadline if self.channel is not None else None)
        self.pending, self.inflight = None, []

    def reset(self) -> None:
        self.stale, self.pending, self.inflight, self.channel, self.reuse, self.previous = {}, None, [], None, (), {}
        self.extrapolation = Extrapolation()


@dataclass
class CompiledCall:
    """Everything this rank needs for one call signature."""

    traced: TracedDenoiser
    split: SplitDenoiser
    program: StageProgram
    modules: list[Callable[..., Any]]  # one per segment of this stage (compiled or not)
    make_channel: Callable[[int], StageChannel]  # the channel of a branch (Note [branches])
    output_layout: PackLayout
    device: torch.device
    layout: Layout  # the plan's segments, as the schedule reads them (Note [schedule as program])
    channels: list[StageChannel] = field(default_factory=list)
    calls: int = 0  # steps run with it (the first also traced it: Note [deadlines])
    signature: str = ""  # a short hash of its call signature (Note [run records])

    def channel(self, branch: int) -> StageChannel:
        while len(self.channels) <= branch:
            self.channels.append(self.make_channel(len(self.channels)))
        return self.channels[branch]




def run_stage(compiled: CompiledCall, state: StageState, tensors: list[torch.Tensor], program: StepProgram,
              ranks: list[int], group: dist.ProcessGroup | None) -> Any:
    """Execute ``program``, this rank's actions for one step (Note [schedule as program] in
    schedule.py), on the call's flat ``tensors``; the step's output (the denoiser's).

    ``Recv`` waits for this step's messages; ``Run`` reads the values it was sent this step
    (age 0) or the stale ones received for it during the previous computing step; ``Send`` posts
    this step's values (awaited at the next step's start); ``Exchange`` also posts the receives
    the next computing step reads; ``Share`` gives every rank of ``ranks`` (the slice, global
    ranks) the owner's output. After a sequential step its received values are the stale values
    the first asynchronous step reads; a round keeps its output for the reuse step after it.
    """
    channel, split = state.channel, compiled.split
    assert channel is not None
    log.debug("%s step (%s): %s", program.kind, program.why, program)
    segments = {seg.index: (seg, module) for seg, module in zip(compiled.program.segments, compiled.modules)}
    env: dict[str, torch.Tensor] = {}
    received: dict[str, torch.Tensor] = {}
    leaves: tuple[Any, ...] = ()
    owner: int | None = None
    for action in program.actions:
        if isinstance(action, Recv):
            received.update(channel.wait(channel.post({}, [], action.messages, exact=True)))
        elif isinstance(action, Run):
            seg, module = segments[action.segment]
            values = {**(state.stale if action.age else received), **env}
            outputs, seg_leaves = module(*tensors, *[values[v] for v in seg.inputs])
            env.update(zip(seg.outputs, outputs))
            if seg.index == split.output_segment:
                leaves = seg_leaves
        elif isinstance(action, Send):
            state.inflight.append(channel.post(env, action.messages, [], exact=True))
        elif isinstance(action, Exchange):
            state.pending = channel.post(env, action.sends, action.recvs)
        elif isinstance(action, Reuse):
            leaves = state.reuse
        elif isinstance(action, Share):
            owner = ranks[action.owner]
            output = share_output(compiled, leaves, owner, ranks[program.rank], group, channel.deadline)
    if program.kind.synchronous:
        state.stale = received  # what the first asynchronous step after it consumes
    if program.kind == StepKind.ROUND:
        state.reuse = leaves
    return output if owner is not None else compiled.traced.unflatten_output(list(leaves))


def boundary_drift(state: StageState, compiled: CompiledCall, decide: bool,
                   group: dist.ProcessGroup | None) -> float | None:
    """Note [adaptive refresh]: how far the boundary values moved over the last step (relative L2
    norm, the largest over all values and ranks); None unless ``decide``. Stale inputs are one
    step old, so this is how wrong they are about to be. Every rank gets the same number (an
    all-reduce), as a sequential step needs every rank. Every step keeps a copy of the values it
    received; only ``decide`` steps compare and reduce."""
    previous = state.previous
    state.previous = {name: value.clone() for name, value in state.stale.items()}  # receive buffers get reused
    if not decide:
        return None
    drift = 0.0
    for name, value in state.stale.items():
        if name in previous:
            before = previous[name].float()
            drift = max(drift, ((value.float() - before).norm() / before.norm().clamp_min(1e-12)).item())
    if group is not None:
        flag = torch.tensor([drift], dtype=torch.float64, device=compiled.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        drift = flag.item()
    return drift


def share_output(compiled: CompiledCall, leaves: tuple[Any, ...], owner: int, me: int,
                 group: dist.ProcessGroup | None, deadline: datetime.timedelta | None = None) -> Any:
    """The step's output on every rank of ``group``: ``owner`` (a global rank) has it as ``leaves``;
    ``deadline``: how long to wait for it (Note [deadlines] in config.py)."""
    template = output_template(compiled.traced)
    mine = me == owner
    if mine:
        buffer = pack([x for x in leaves if isinstance(x, torch.Tensor)], compiled.output_layout)
    else:
        buffer = torch.empty(compiled.output_layout.nbytes, dtype=torch.uint8, device=compiled.device)
    finish([dist.broadcast(buffer, src=owner, group=group, async_op=True)], deadline)
    if mine:
        return compiled.traced.unflatten_output(list(leaves))
    received = iter(unpack(buffer, compiled.output_layout))
    return compiled.traced.unflatten_output(
        [next(received) if isinstance(x, torch.fx.Node) else x for x in template])


def output_template(traced: TracedDenoiser) -> tuple[Any, ...]:
    output = next(n for n in traced.graph.nodes if n.op == "output")
    return tuple(output.args[0])


def with_timestep(denoiser: torch.nn.Module, timestep_arg: str | None, timesteps: Callable[[int], Any] | None,
                  args: tuple[Any, ...], kwargs: dict[str, Any], step: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call ``(args, kwargs)`` with its ``timestep_arg`` set to step ``step``'s timestep
    ``timesteps(step)`` (stride 2 and time shift feed stages other steps' timesteps)."""
    assert timesteps is not None and timestep_arg is not None
    bound = inspect.signature(denoiser.forward).bind(*args, **kwargs)
    current = bound.arguments[timestep_arg]
    value = timesteps(step)
    if isinstance(current, torch.Tensor):  # no float(value): that would wait for the GPU
        value = torch.as_tensor(value).to(current.device, current.dtype, non_blocking=True).expand(current.shape).clone()
    bound.arguments[timestep_arg] = value
    return bound.args, bound.kwargs
