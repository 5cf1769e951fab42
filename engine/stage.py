"""One rank's stage for one call: its state across steps, its compiled programs, and the one
interpreter that runs them.

Note [one interpreter]: :func:`execute` is the only code that runs a step program (Note
[schedule as program] in :mod:`asyncdiff.engine.schedule`). Where the messages go is the
:class:`Transport`'s business: the engine's point-to-point channel
(:class:`~asyncdiff.engine.comm.StageChannel`, one process per rank, waits block) or the
in-process one (:class:`~asyncdiff.engine.local.LocalChannel`, every rank in one process: a
rank that must wait yields, and :func:`~asyncdiff.engine.local.run_together` resumes the
ranks in turn until each has finished the step). Both pack every message with the same
layouts (transfer dtype, memory order), so the in-process run of a plan computes what the
engine computes, bit for bit, for every schedule: stride 2, time shift, narrow transfers,
compensation (tests/test_local.py). :func:`run_stage` drives :func:`execute` over a transport
that never yields; :func:`boundary_drift` is Note [adaptive refresh]'s measure.
"""

from __future__ import annotations

import datetime
import inspect
import logging
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from asyncdiff.engine.comm import Pending, finish
from asyncdiff.engine.compensation import Extrapolation
from asyncdiff.engine.schedule import Action, Exchange, Layout, Recv, Reuse, Run, Send, Share, StepKind, StepProgram
from asyncdiff.kernels.pack import PackLayout
from asyncdiff.partition.split import SplitDenoiser, StageProgram
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["CompiledCall", "StageState", "Transport", "boundary_drift", "execute", "run_stage", "with_timestep"]

log = logging.getLogger(__name__)


class Transport(Protocol):
    """How a step's messages and output move between ranks (Note [one interpreter])."""

    deadline: datetime.timedelta | None

    def post(self, values: Mapping[str, torch.Tensor], sends: Iterable[tuple[int, int]],
             recvs: Iterable[tuple[int, int]], exact: bool = False) -> Pending: ...

    def ready(self, pending: Pending) -> bool: ...

    def wait(self, pending: Pending) -> dict[str, torch.Tensor]: ...

    def shared(self, owner: int) -> bool: ...

    def share(self, compiled: CompiledCall, leaves: tuple[Any, ...], owner: int, me: int) -> Any: ...


@dataclass
class StageState:
    """What lives across the steps of one pipeline call, for one branch (Note [branches]);
    :meth:`reset` at every call."""

    stale: dict[str, torch.Tensor] = field(default_factory=dict)  # values received for use at the next step
    pending: Pending | None = None  # an asynchronous step's sends, and receives for the next step
    inflight: list[Pending] = field(default_factory=list)  # a warm-up step's sends
    channel: Transport | None = None  # where ``pending`` was posted
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
    make_channel: Callable[[int], Transport]  # the channel of a branch (Note [branches])
    output_layout: PackLayout
    device: torch.device
    layout: Layout  # the plan's segments, as the schedule reads them (Note [schedule as program])
    channels: list[Transport] = field(default_factory=list)
    calls: int = 0  # steps run with it (the first also traced it: Note [deadlines])
    signature: str = ""  # a short hash of its call signature (Note [run records])

    def channel(self, branch: int) -> Transport:
        while len(self.channels) <= branch:
            self.channels.append(self.make_channel(len(self.channels)))
        return self.channels[branch]




def run_stage(compiled: CompiledCall, state: StageState, tensors: list[torch.Tensor], program: StepProgram,
              ranks: list[int]) -> Any:
    """:func:`execute` over a transport that waits instead of yielding (``state.channel``, a
    :class:`~asyncdiff.engine.comm.StageChannel`): the step's output."""
    steps = execute(compiled, state, tensors, program, ranks)
    try:
        action = next(steps)
    except StopIteration as done:
        return done.value[0]
    raise RuntimeError(f"{type(state.channel).__name__} cannot wait for {action}: run it with the ranks together "
                       "(asyncdiff.engine.local.run_together)")


def execute(compiled: CompiledCall, state: StageState, tensors: list[torch.Tensor], program: StepProgram,
            ranks: list[int]) -> Generator[Action, None, tuple[Any, tuple[Any, ...]]]:
    """Note [one interpreter]: execute ``program``, this rank's actions for one step (Note
    [schedule as program] in schedule.py), on the call's flat ``tensors``, moving messages
    through ``state.channel`` (the :class:`Transport`); returns the step's output and the
    output segment's leaves (empty on a rank that neither ran nor kept it). Yields the action it
    waits at whenever the transport is not ready: the in-process transport resumes it once
    another rank has sent, the point-to-point one is always ready (its waits block).

    ``Recv`` waits for this step's messages; ``Run`` reads the values it was sent this step
    (age 0) or the stale ones received for it during the previous computing step; ``Send`` posts
    this step's values (awaited at the next step's start); ``Exchange`` also posts the receives
    the next computing step reads; ``Share`` gives every rank of ``ranks`` (the slice, global
    ranks) the owner's output. After a sequential step its received values are the stale values
    the first asynchronous step reads; a round keeps its output for the reuse step after it.
    """
    transport, split = state.channel, compiled.split
    assert transport is not None
    log.debug("%s step (%s): %s", program.kind, program.why, program)
    segments = {seg.index: (seg, module) for seg, module in zip(compiled.program.segments, compiled.modules)}
    env: dict[str, torch.Tensor] = {}
    received: dict[str, torch.Tensor] = {}
    leaves: tuple[Any, ...] = ()
    output: Any = None
    shared = False
    for action in program.actions:
        if isinstance(action, Recv):
            pending = transport.post({}, [], action.messages, exact=True)
            while not transport.ready(pending):
                yield action
            received.update(transport.wait(pending))
        elif isinstance(action, Run):
            seg, module = segments[action.segment]
            values = {**(state.stale if action.age else received), **env}
            outputs, seg_leaves = module(*tensors, *[values[v] for v in seg.inputs])
            env.update(zip(seg.outputs, outputs))
            if seg.index == split.output_segment:
                leaves = seg_leaves
        elif isinstance(action, Send):
            state.inflight.append(transport.post(env, action.messages, [], exact=True))
        elif isinstance(action, Exchange):
            state.pending = transport.post(env, action.sends, action.recvs)
        elif isinstance(action, Reuse):
            leaves = state.reuse
        elif isinstance(action, Share):
            owner = ranks[action.owner]
            while not transport.shared(owner):
                yield action
            output, shared = transport.share(compiled, leaves, owner, ranks[program.rank]), True
    if program.kind.synchronous:
        state.stale = received  # what the first asynchronous step after it consumes
    if program.kind == StepKind.ROUND:
        state.reuse = leaves
    return (output if shared else compiled.traced.unflatten_output(list(leaves))), leaves


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
