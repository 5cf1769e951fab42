"""Every rank of a split in one process: the in-process transport and the simulator built on it.

:class:`LocalChannel` is the in-process :class:`~asyncdiff.engine.stage.Transport` (Note [one
interpreter] in stage.py): a message is packed exactly as the point-to-point channel packs it
(the same layouts, transfer dtype and memory order) and left in a :class:`Mailbox` that every
rank of the run shares; a rank whose message has not been sent yet is not ready, and
:func:`~asyncdiff.engine.stage.execute` yields. :func:`run_together` resumes the ranks of a step
in turn until each has finished; a turn in which no rank gets further is a schedule that would
hang, an error. :class:`AsyncSimulator` runs a whole split this way, called as the denoiser.

Example:
    >>> import torch
    >>> from asyncdiff.partition.plan import Plan
    >>> from asyncdiff.partition.split import split_graph
    >>> from asyncdiff.partition.trace import trace_denoiser
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(4)]).eval()
    >>> x = torch.randn(2, 4)
    >>> traced = trace_denoiser(net, (x,), {})
    >>> split = split_graph(traced, Plan(stages=(("0", "1"), ("2", "3"))))
    >>> sequential = AsyncSimulator(traced, split, net, warm_up=3)
    >>> outputs = [sequential(x + k) for k in range(3)]
    >>> all(torch.allclose(out, net(x + k)) for k, out in enumerate(outputs))
    True
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from asyncdiff.engine.comm import Key, Pending, StageChannel, output_template, unpack_output
from asyncdiff.engine.compensation import spacing_at
from asyncdiff.engine.config import TRANSFER_DTYPES
from asyncdiff.engine.schedule import Layout, Schedule, StepDecision, StepKind, decide_step
from asyncdiff.engine.stage import CompiledCall, StageState, execute, with_timestep
from asyncdiff.kernels.pack import PackLayout, pack
from asyncdiff.partition.split import SplitDenoiser, StageProgram
from asyncdiff.partition.traced import TracedDenoiser

__all__ = ["AsyncSimulator", "LocalChannel", "Mailbox", "run_together"]


class Mailbox:
    """The messages in flight and the step outputs of one in-process run, shared by its ranks."""

    def __init__(self) -> None:
        # (branch, message, receiving rank) -> packed buffers in the order they were sent, and whether exact
        self.messages: dict[tuple[int, Key, int], deque[tuple[torch.Tensor, bool]]] = defaultdict(deque)
        self.outputs: dict[tuple[int, int], tuple[Any, ...]] = {}  # (branch, owner) -> this step's output leaves
        self.posted = 0  # how many messages and outputs were left so far: a turn that adds none made no progress

    def new_step(self) -> None:
        self.outputs.clear()


class LocalChannel(StageChannel):
    """The in-process transport of rank ``rank`` (Note [one interpreter] in stage.py)."""

    def __init__(self, mailbox: Mailbox, rank: int, program: StageProgram, n_segments: int,
                 destinations: Mapping[int, list[int]], device: torch.device,
                 transfer_dtype: torch.dtype | None = None, branch: int = 0) -> None:
        super().__init__(program, n_segments, destinations, None, device, transfer_dtype, branch)
        self.mailbox, self.rank = mailbox, rank
        self.buffers, self.stream = {}, None  # a message is read from the sender's buffer, on one stream

    def post(self, values: Mapping[str, torch.Tensor], sends: Iterable[Key], recvs: Iterable[Key],
             exact: bool = False) -> Pending:
        layouts = self.exact_layouts if exact else self.layouts
        for key in sends:
            buffer = self._pack(values, key, layouts)
            for rank in self.destinations[self.send_groups[key][0].dst]:
                self.mailbox.messages[self.branch, key, rank].append((buffer, exact))
                self.mailbox.posted += 1
        return Pending(recvs=list(recvs), exact=exact)

    def ready(self, pending: Pending) -> bool:
        return all(self.mailbox.messages[self.branch, key, self.rank] for key in pending.recvs)

    def wait(self, pending: Pending) -> dict[str, torch.Tensor]:
        if not self.ready(pending):
            missing = [key for key in pending.recvs if not self.mailbox.messages[self.branch, key, self.rank]]
            raise RuntimeError(f"rank {self.rank} waits for message(s) {missing} that no rank has sent")
        buffers = {}
        for key in pending.recvs:
            buffer, exact = self.mailbox.messages[self.branch, key, self.rank].popleft()
            if exact != pending.exact:
                raise RuntimeError(f"message {key}: sent {'exact' if exact else 'in the transfer dtype'}, "
                                   f"received {'exact' if pending.exact else 'in the transfer dtype'}")
            buffers[key] = buffer
        return self._values(pending, buffers)

    def shared(self, owner: int) -> bool:
        return owner == self.rank or (self.branch, owner) in self.mailbox.outputs

    def share(self, compiled: CompiledCall, leaves: tuple[Any, ...], owner: int, me: int) -> Any:
        """As the broadcast does: the owner's leaves, the others' unpacked from its packed tensors."""
        if me == owner:
            self.mailbox.outputs[self.branch, owner] = leaves
            self.mailbox.posted += 1
            return compiled.traced.unflatten_output(list(leaves))
        theirs = self.mailbox.outputs[self.branch, owner]
        return unpack_output(compiled, pack([x for x in theirs if isinstance(x, torch.Tensor)], compiled.output_layout))


def run_together(steps: Sequence[Generator[Any, None, Any]], mailbox: Mailbox, what: str = "") -> list[Any]:
    """Run every rank's :func:`~asyncdiff.engine.stage.execute` of one step to its end, in turns
    (rank 0 first, each until it must wait); their results, by rank."""
    results: list[Any] = [None] * len(steps)
    live = dict(enumerate(steps))
    while live:
        before, waiting = mailbox.posted, {}
        for rank, step in list(live.items()):
            try:
                waiting[rank] = next(step)
            except StopIteration as done:
                results[rank] = done.value
                del live[rank]
        if live and len(waiting) == len(live) and mailbox.posted == before:
            raise RuntimeError(f"the schedule hangs{what}: every rank waits "
                               f"({ {r: str(a) for r, a in waiting.items()} })")
    return results


class AsyncSimulator:
    """The engine's schedule for one split, every rank in one process: call it as the denoiser.

    Every step executes each rank's program of Note [schedule as program] (the very programs
    the engine executes, through the same interpreter, Note [one interpreter]) with the ranks
    taking turns; what it computes is what the engine computes for the same calls, bit for bit
    (tests/test_local.py): stride 2 (``model_n + 1`` ranks), time shift, a transfer dtype,
    compensation. ``timesteps(step)``: the scheduler's timestep of each step (time shift and
    stride 2 feed stages another step's, through ``timestep_arg``; compensation spaces by it;
    without it, uniform)."""

    def __init__(self, traced: TracedDenoiser, split: SplitDenoiser, denoiser: torch.nn.Module,
                 warm_up: int = 1, compensate: str = "none", timesteps: Callable[[int], float] | None = None, *,
                 stride: int = 1, time_shift: bool = False, transfer_dtype: str | None = None,
                 timestep_arg: str | None = None) -> None:
        self.traced, self.split, self.denoiser = traced, split, denoiser
        self.compensate, self.timesteps, self.timestep_arg = compensate, timesteps, timestep_arg
        model_n = split.plan.model_n
        self.schedule = Schedule(model_n, warm_up, stride, time_shift)
        self.mailbox = Mailbox()
        n = self.schedule.n_ranks
        destinations = {k: [k] for k in range(model_n)}
        if stride == 2:  # the extra rank receives what the last stage receives
            destinations[model_n - 1].append(n - 1)
        layout = Layout.of(split)
        out_specs = [traced.specs[node.name] for node in output_template(traced) if isinstance(node, torch.fx.Node)]
        output_layout = PackLayout.of([(s.shape, s.torch_dtype) for s in out_specs])
        dtype = TRANSFER_DTYPES.get(transfer_dtype)
        device = next((p.device for p in denoiser.parameters()), torch.device("cpu"))
        self.compiled: list[CompiledCall] = []
        for rank in range(n):
            program = split.stages[min(rank, model_n - 1)]
            make = (lambda branch, rank=rank, program=program:  # noqa: E731
                    LocalChannel(self.mailbox, rank, program, len(split.segments), destinations, device, dtype, branch))
            self.compiled.append(CompiledCall(traced, split, program, [seg.module(denoiser) for seg in program.segments],
                                              make, output_layout, device, layout))
        self.states = [StageState(channel=c.channel(0)) for c in self.compiled]
        self.step = 0
        self.programs: list[Any] = []  # the last step's, by rank

    def run(self, calls: Sequence[list[Any]], decision: StepDecision | None = None) -> list[tuple[Any, tuple[Any, ...]]]:
        """One step; ``calls[rank]``: that rank's flat call tensors; ``decision``: as decided (by
        default :func:`decide_step` without signals). Every rank's output and output leaves."""
        decision = decision or decide_step(self.schedule, self.step)
        step = self.step = decision.step
        self.mailbox.new_step()
        steps, programs = [], []
        for rank, (compiled, state) in enumerate(zip(self.compiled, self.states)):
            state.drain()  # the previous step's sends, an asynchronous step's receives
            program = self.schedule.program(step, rank, compiled.layout, decision)
            programs.append(program)
            if self.compensate != "none":  # Note [compensation], as the engine's _call_stages
                state.stale = state.extrapolation.step(state.stale, self.compensate,
                                                       spacing_at(self.timesteps, step), decision.kind == StepKind.ASYNC)
            steps.append(execute(compiled, state, calls[rank], program, list(range(len(self.compiled)))))
        with torch.no_grad():
            results = run_together(steps, self.mailbox, f" at step {step}")
        self.step += 1
        self.programs = programs
        return results

    @staticmethod
    def owned(results: list[tuple[Any, tuple[Any, ...]]]) -> tuple[Any, list[Any]]:
        owner = next((r for r, (_, leaves) in enumerate(results) if leaves), 0)
        return results[owner][0], list(results[owner][1])

    def leaves(self, tensors: list[torch.Tensor]) -> list[Any]:
        """One step on flat call tensors (every rank computes with this step's timestep): the output leaves."""
        timesteps = {self.schedule.timestep_step(self.step, r) for r in range(self.schedule.n_ranks)}
        if timesteps != {self.step}:
            raise ValueError(f"step {self.step} feeds some stage another step's timestep (stride 2 or time shift): "
                             "call the simulator with the denoiser's arguments, and pass timesteps and timestep_arg")
        return self.owned(self.run([tensors] * self.schedule.n_ranks))[1]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.owned(self.call(args, kwargs))[0]

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any],
             decision: StepDecision | None = None) -> list[tuple[Any, tuple[Any, ...]]]:
        """One step on the denoiser's arguments (each rank's timestep set as its program says), as
        ``decision`` decided: every rank's output and output leaves."""
        decision = decision or decide_step(self.schedule, self.step)
        calls = []
        for rank in range(self.schedule.n_ranks):
            timestep = self.schedule.timestep_step(decision.step, rank, decision.kind)
            a, k = (args, kwargs) if timestep == decision.step else \
                with_timestep(self.denoiser, self.timestep_arg, self.timesteps, args, kwargs, timestep)
            calls.append(self.traced.flatten_call(a, k))
        return self.run(calls, decision)
