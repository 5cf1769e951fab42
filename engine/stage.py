"""One rank's stage for one call: its state across steps, its compiled programs, and running them.

:func:`run_stage` runs this rank's segments for one step (Notes [stale inputs] and [stride 2] in
:mod:`asyncdiff.engine.schedule`); :func:`share_output` gives every rank of the slice the step's
output; :func:`drifted` is Note [adaptive refresh]'s test.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.fx

from asyncdiff.engine.comm import Pending, StageChannel, finish
from asyncdiff.engine.schedule import StepKind
from asyncdiff.kernels.pack import PackLayout, pack, unpack
from asyncdiff.partition.split import SplitDenoiser, StageProgram
from asyncdiff.partition.trace import TracedDenoiser

__all__ = ["CompiledCall", "StageState", "drifted", "output_template", "run_stage", "share_output"]


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

    def drain(self) -> None:
        if self.pending is not None and self.channel is not None:
            self.stale = self.channel.wait(self.pending)
        for pending in self.inflight:
            finish(pending.works, self.channel.deadline if self.channel is not None else None)
        self.pending, self.inflight = None, []

    def reset(self) -> None:
        self.stale, self.pending, self.inflight, self.channel, self.reuse, self.previous = {}, None, [], None, (), {}


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
    channels: list[StageChannel] = field(default_factory=list)
    calls: int = 0  # steps run with it (the first also traced it: Note [deadlines])

    def channel(self, branch: int) -> StageChannel:
        while len(self.channels) <= branch:
            self.channels.append(self.make_channel(len(self.channels)))
        return self.channels[branch]




def run_stage(compiled: CompiledCall, state: StageState, tensors: list[torch.Tensor], kind: str,
          extra: bool) -> tuple[Any, ...]:
    """This rank's segments for one step (Note [stale inputs] and [stride 2] in schedule.py);
    ``extra``: this is stride 2's extra rank.

    Warm-up: before each segment, wait for this step's values from other stages; after it,
    send. Asynchronous step or round: run every segment on the values received for it during
    the previous computing step, then send this step's values and post the receives for the
    next one. Reuse step (stride 2): nothing runs.
    """
    channel, split = state.channel, compiled.split
    assert channel is not None
    if kind == StepKind.REUSE:
        return state.reuse
    sync = kind in (StepKind.WARM_UP, StepKind.REFRESH)
    if sync and extra:  # the extra rank only collects its first inputs
        state.stale = channel.wait(channel.post({}, [], channel.recv_keys, exact=True))
        return ()
    env: dict[str, torch.Tensor] = {}
    received: dict[str, torch.Tensor] = {}
    leaves: tuple[Any, ...] = ()
    for seg, module in zip(compiled.program.segments, compiled.modules):
        if sync and channel.recvs_into(seg.index):
            received.update(channel.wait(channel.post({}, [], channel.recvs_into(seg.index), exact=True)))
        fresh = {**received, **env} if sync else {**state.stale, **env}
        outputs, seg_leaves = module(*tensors, *[fresh[v] for v in seg.inputs])
        env.update(zip(seg.outputs, outputs))
        if seg.index == split.output_segment:
            leaves = seg_leaves
        if sync and channel.sends_from(seg.index):
            state.inflight.append(channel.post(env, channel.sends_from(seg.index), [], exact=True))
    if sync:
        state.stale = received  # what the first asynchronous step after warm-up consumes
    elif channel.send_groups or channel.recv_groups:
        state.pending = channel.post(env, list(channel.send_groups), channel.recv_keys)
    if kind == StepKind.ROUND:
        state.reuse = leaves
    return leaves


def drifted(state: StageState, compiled: CompiledCall, decide: bool, limit: float,
            group: dist.ProcessGroup | None) -> bool:
    """Note [adaptive refresh]: whether the boundary values changed, over the last step, by more
    than ``limit`` (relative L2 norm, the largest over all values and ranks). Stale
    inputs are one step old, so this is how wrong they are about to be. All ranks take the
    same decision (an all-reduce of one number), as a sequential step needs every rank. Every
    step keeps a copy of the values it received; only ``decide`` steps compare and reduce."""
    previous = state.previous
    state.previous = {name: value.clone() for name, value in state.stale.items()}  # receive buffers get reused
    if not decide:
        return False
    drift = 0.0
    for name, value in state.stale.items():
        if name in previous:
            before = previous[name].float()
            drift = max(drift, ((value.float() - before).norm() / before.norm().clamp_min(1e-12)).item())
    if group is not None:
        flag = torch.tensor([drift], dtype=torch.float64, device=compiled.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        drift = flag.item()
    return drift > limit


def share_output(compiled: CompiledCall, leaves: tuple[Any, ...], owner: int, me: int,
                 group: dist.ProcessGroup | None, deadline: datetime.timedelta | None = None) -> Any:
    """The step's output on every rank of ``group``: ``owner`` (a global rank) has it as ``leaves``;
    ``deadline``: how long to wait for it (Note [deadlines] in runtime.py)."""
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
