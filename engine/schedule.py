"""The schedule: for each step and rank, the program that rank executes, and the same program printed.

Note [stale inputs]: in a *warm-up* step, stage k waits for the values its predecessors computed
at this very step, so the result is exactly the sequential model's. In an *asynchronous* step,
every stage starts at once on the values its predecessors computed at the previous step (stale
by one step) and the step takes max(stage) + communication instead of sum(stage). Each stage
sends each boundary value exactly once per computing step in both modes; only when it is
consumed differs. The first step is always a warm-up step: there is no earlier step to take
stale values from.

Note [stride 2]: with stride 2, ``model_n`` stages run on ``model_n + 1`` ranks; the extra rank
is a second copy of the last stage. After warm-up, steps come in pairs ``(s, s + 1)``. At ``s``
(a *round*) every rank computes once on the values of the previous round: ranks ``0 .. n-1`` at
the timestep of step ``s + 1``, the extra rank (the last stage again) at the timestep of ``s``,
giving step ``s``'s noise prediction. At ``s + 1`` (a *reuse* step) nothing runs: the last
stage's round output is step ``s + 1``'s prediction. One parallel round advances two steps.

Time shift feeds every computing rank the timestep of one step earlier after warm-up (the
stale inputs it computes on are one step older than its step).

Refresh (stride 1): with ``refresh_every=K``, every K-th step after warm-up is run sequentially
again, which resets the stale values to exact ones: a knob between the speed of asynchronous
steps and the fidelity of sequential ones, beyond a fixed warm-up.

Note [schedule as program]: :meth:`Schedule.program` gives, for one step and one rank, the list
of actions that rank executes: wait for messages (``Recv``), run a segment (``Run``, on this
step's values or on the stale ones of an earlier step), send (``Send``), send and post the
receives the next computing step consumes (``Exchange``), take the last round's output
(``Reuse``), share the step's output (``Share``). The engine (``run_stage`` in
:mod:`asyncdiff.engine.stage`) executes exactly these lists, the one-process simulator of Note
[predicted drift] executes them for every rank, and :meth:`Schedule.format` prints them. A
message is ``(source segment, destination segment)`` (one per segment pair per step, Note
[overlap] in comm.py); segments come from the plan's :class:`Layout` (a wrapped plan gives stage 0
a head and a tail segment, whose stale inputs are older than its head's).

Note [step decision]: a step's kind is decided once, by the pure :func:`decide_step`, from the
schedule, the step's index and the engine's :class:`Signals` (a new loop, a branch without stale
values, the measured drift); the decision carries its reason (``why="drift 0.12 > 0.05"``), the
program is made from it (``StepProgram.why``), and nothing rewrites the kind after. The grid
:meth:`Schedule.format` prints is the decision without signals; a run's decisions are its own
(the engine keeps them: ``AsyncEngine.call.decisions``, logged at DEBUG with each program).

Example (the contiguous chain of two stages; every rank receives the output that rank 1 shares):
    >>> print(Schedule(model_n=2, warm_up=2).format(4))
    step | kind    | rank 0           | rank 1
       0 | warm-up | s0 send 0>1 out1 | recv 0>1 s1 out
       1 | warm-up | s0 send 0>1 out1 | recv 0>1 s1 out
       2 | async   | s0 send 0>1 out1 | s1[t-1] next 0>1 out
       3 | async   | s0 send 0>1 out1 | s1[t-1] next 0>1 out
    >>> print(Schedule(model_n=2, warm_up=1, stride=2).format(4))
    step | kind    | rank 0                | rank 1                     | rank 2
       0 | warm-up | s0 send 0>1 out1      | recv 0>1 s1 out            | recv 0>1 out1
       1 | round   | @t+1 s0 send 0>1 out2 | @t+1 s1[t-1] next 0>1 out2 | s1[t-1] next 0>1 out
       2 | reuse   | out1                  | reuse out                  | out1
       3 | round   | @t+1 s0 send 0>1 out2 | @t+1 s1[t-2] next 0>1 out2 | s1[t-2] next 0>1 out

A wrapped plan (stage 0 holds segments 0 and 2): the tail reads values of the previous step that
stage 1 computed from stage 0's head of the step before, so the output is two steps behind:
    >>> wrapped = Layout(((SegmentIO(0, send=((0, 1),)), SegmentIO(2, recv=((1, 2),))),
    ...                   (SegmentIO(1, recv=((0, 1),), send=((1, 2),)),)), output_stage=0)
    >>> print(Schedule(model_n=2, warm_up=1).format(2, wrapped))
    step | kind    | rank 0                           | rank 1
       0 | warm-up | s0 send 0>1 recv 1>2 s2 out      | recv 0>1 s1 send 1>2 out0
       1 | async   | s0 s2[t-1] send 0>1 next 1>2 out | s1[t-1] send 1>2 next 0>1 out0
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from asyncdiff.partition.split import SplitDenoiser

__all__ = ["Action", "Exchange", "Layout", "Message", "Recv", "Reuse", "Run", "Schedule", "SegmentIO", "Send",
           "Share", "Signals", "StepDecision", "StepKind", "StepProgram", "decide_step", "needs_drift"]

Message = tuple[int, int]  # (source segment, destination segment): one packed message per step


class StepKind(str, enum.Enum):
    WARM_UP = "warm-up"
    ASYNC = "async"  # stride 1 after warm-up
    REFRESH = "refresh"  # stride 1: a sequential step after warm-up (refresh_every)
    ROUND = "round"  # stride 2: every rank computes once
    REUSE = "reuse"  # stride 2: no compute, the last stage's round output is this step's

    def __str__(self) -> str:
        return self.value

    @property
    def synchronous(self) -> bool:
        """Whether stages wait for this step's values from their predecessors."""
        return self in (StepKind.WARM_UP, StepKind.REFRESH)


# -- the plan's shape, as the schedule needs it ---------------------------------------------------
@dataclass(frozen=True)
class SegmentIO:
    """One segment of a stage: the messages it reads from and writes to other stages."""

    index: int
    recv: tuple[Message, ...] = ()
    send: tuple[Message, ...] = ()


@dataclass(frozen=True)
class Layout:
    """Each stage's segments in program order, and the stage whose output segment gives the output."""

    stages: tuple[tuple[SegmentIO, ...], ...]
    output_stage: int

    @classmethod
    def of(cls, split: SplitDenoiser) -> Layout:
        messages = sorted({(t.src_segment, t.dst_segment) for t in split.transfers})
        stages = tuple(
            tuple(SegmentIO(seg.index, tuple(m for m in messages if m[1] == seg.index),
                            tuple(m for m in messages if m[0] == seg.index)) for seg in program.segments)
            for program in split.stages)
        return cls(stages, split.output_stage)

    @classmethod
    def chain(cls, model_n: int) -> Layout:
        """A contiguous plan: stage k is segment k and reads what stage k - 1 sends."""
        return cls(tuple((SegmentIO(k, ((k - 1, k),) if k else (), ((k, k + 1),) if k + 1 < model_n else ()),)
                         for k in range(model_n)), model_n - 1)

    def recv(self, stage: int) -> tuple[Message, ...]:
        return tuple(m for seg in self.stages[stage] for m in seg.recv)

    def send(self, stage: int) -> tuple[Message, ...]:
        return tuple(m for seg in self.stages[stage] for m in seg.send)


# -- actions ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recv:
    """Wait for this step's ``messages`` (in the values' own dtypes, Note [exact warm-up])."""

    messages: tuple[Message, ...]

    def __str__(self) -> str:
        return "recv " + _messages(self.messages)


@dataclass(frozen=True)
class Run:
    """Run ``segment``; the values it reads from other stages are those of step ``step - age``
    (``age`` 0: this step's, received just before)."""

    segment: int
    age: int = 0

    def __str__(self) -> str:
        return f"s{self.segment}" + (f"[t-{self.age}]" if self.age else "")


@dataclass(frozen=True)
class Send:
    """Send this step's ``messages``, exactly (a sequential step)."""

    messages: tuple[Message, ...]

    def __str__(self) -> str:
        return "send " + _messages(self.messages)


@dataclass(frozen=True)
class Exchange:
    """Send this step's ``sends`` and post the receives of ``recvs``, which the next computing step
    consumes (Note [overlap]); in the transfer dtype."""

    sends: tuple[Message, ...]
    recvs: tuple[Message, ...]

    def __str__(self) -> str:
        return " ".join([*(["send " + _messages(self.sends)] if self.sends else []),
                         *(["next " + _messages(self.recvs)] if self.recvs else [])])


@dataclass(frozen=True)
class Reuse:
    """Stride 2: this step's output is the last round's (no compute)."""

    def __str__(self) -> str:
        return "reuse"


@dataclass(frozen=True)
class Share:
    """Every rank gets the step's output from rank ``owner`` (printed ``out`` on the owner,
    ``out<owner>`` on the others)."""

    owner: int

    def __str__(self) -> str:
        return f"out{self.owner}"


Action = Recv | Run | Send | Exchange | Reuse | Share


@dataclass(frozen=True)
class StepProgram:
    """What one rank executes at one step; ``timestep``: the step whose timestep it computes with."""

    step: int
    rank: int
    kind: StepKind
    timestep: int
    actions: tuple[Action, ...]
    why: str = ""  # the reason for its kind (Note [step decision])

    @property
    def owner(self) -> int | None:
        """The rank that shares this step's output (None: one stage, nothing to share)."""
        return next((a.owner for a in self.actions if isinstance(a, Share)), None)

    def __str__(self) -> str:
        words = [] if self.timestep == self.step or not self.computes else [f"@{_offset(self.timestep - self.step)}"]
        for action in self.actions:
            if isinstance(action, Share):
                words.append("out" if action.owner == self.rank else f"out{action.owner}")
            else:
                words.append(str(action))
        return " ".join(words) or "-"

    @property
    def computes(self) -> bool:
        return any(isinstance(a, Run) for a in self.actions)


@dataclass(frozen=True)
class Schedule:
    model_n: int
    warm_up: int
    stride: int = 1
    time_shift: bool = False
    refresh_every: int | None = None

    def __post_init__(self) -> None:
        if self.model_n < 1:
            raise ValueError(f"model_n={self.model_n} must be >= 1")
        if self.warm_up < 0:
            raise ValueError(f"warm_up={self.warm_up} must be >= 0 (the number of sequential steps)")
        if self.stride not in (1, 2):
            raise ValueError(f"stride={self.stride} must be 1 or 2")
        if self.refresh_every is not None:
            if self.refresh_every < 1:
                raise ValueError(f"refresh_every={self.refresh_every} must be >= 1 (or None: never)")
            if self.stride != 1:
                raise ValueError("refresh_every works with stride=1 only; use stride=1 or refresh_every=None")

    @property
    def n_ranks(self) -> int:
        return self.model_n + self.stride - 1

    def kind(self, step: int) -> StepKind:
        if step < max(1, self.warm_up):
            return StepKind.WARM_UP
        if self.stride == 1:
            after = step - max(1, self.warm_up) + 1
            if self.refresh_every and after % self.refresh_every == 0:
                return StepKind.REFRESH
            return StepKind.ASYNC
        return StepKind.ROUND if (step - max(1, self.warm_up)) % 2 == 0 else StepKind.REUSE

    def timestep_step(self, step: int, rank: int, kind: StepKind | None = None) -> int:
        """Which step's timestep ``rank`` computes with at ``step`` (Note [stride 2], time shift)."""
        kind = kind or self.kind(step)
        if kind.synchronous:
            return step
        shift = 1 if self.time_shift else 0
        if kind == StepKind.ROUND and rank < self.model_n:
            return step + 1 - shift
        return step - shift

    def stale_step(self, step: int) -> int:
        """The step whose values an asynchronous step or round consumes from other stages: the
        previous computing step, or the last warm-up step."""
        first = max(1, self.warm_up)  # the first step after warm-up
        previous = step - self.stride
        return previous if previous >= first else first - 1

    def program(self, step: int, rank: int, layout: Layout | None = None,
                decision: StepDecision | None = None) -> StepProgram:
        """Note [schedule as program]: what ``rank`` executes at ``step`` for ``layout`` (default:
        the contiguous chain), as ``decision`` decided it (default: :func:`decide_step` without
        signals; Note [step decision])."""
        layout = layout or Layout.chain(self.model_n)
        if len(layout.stages) != self.model_n:
            raise ValueError(f"the layout has {len(layout.stages)} stages, the schedule {self.model_n}")
        if self.stride == 2 and layout.send(self.model_n - 1):
            raise ValueError("stride=2 repeats the last stage on an extra rank, so the last stage must send nothing "
                             "(a contiguous plan); this plan's last stage sends to another stage: use a contiguous "
                             "plan (layouts=('contiguous',)) or stride=1")
        decision = decision or decide_step(self, step)
        step, kind = decision.step, decision.kind
        stage = min(rank, self.model_n - 1)
        extra = rank >= self.model_n  # stride 2's second copy of the last stage
        owner = self.n_ranks - 1 if kind == StepKind.ROUND else layout.output_stage
        actions: list[Action] = []
        if kind == StepKind.REUSE:
            if rank == layout.output_stage:  # it kept its round output (the other ranks kept none)
                actions.append(Reuse())
        elif kind.synchronous and extra:  # the extra rank only collects the inputs of the first round
            actions.append(Recv(layout.recv(stage)))
        elif kind.synchronous:
            for seg in layout.stages[stage]:
                if seg.recv:
                    actions.append(Recv(seg.recv))
                actions.append(Run(seg.index))
                if seg.send:
                    actions.append(Send(seg.send))
        else:
            age = step - self.stale_step(step)
            actions.extend(Run(seg.index, age if seg.recv else 0) for seg in layout.stages[stage])
            sends, recvs = () if extra else layout.send(stage), layout.recv(stage)
            if sends or recvs:
                actions.append(Exchange(sends, recvs))
        if self.model_n > 1:
            actions.append(Share(owner))
        return StepProgram(step, rank, kind, self.timestep_step(step, rank, kind), tuple(actions), decision.why)

    def programs(self, n_steps: int, layout: Layout | None = None) -> list[list[StepProgram]]:
        """Every rank's program for steps ``0 .. n_steps - 1``, by step then rank."""
        return [[self.program(t, r, layout) for r in range(self.n_ranks)] for t in range(n_steps)]

    def format(self, n_steps: int, layout: Layout | None = None) -> str:
        """The step x rank grid of :meth:`program`: ``sK`` runs segment K (``[t-a]``: on the values
        other stages sent ``a`` steps ago), ``recv``/``send`` this step's messages ``src>dst``
        (segments), ``next`` posts the receives the next computing step reads, ``@t+1`` the
        timestep when it is not this step's, ``out``/``outR`` shares the output (from rank R)."""
        programs = self.programs(n_steps, layout)
        header = ["step", "kind", *(f"rank {r}" for r in range(self.n_ranks))]
        rows = [[f"{t:>4}", str(row[0].kind), *(str(p) for p in row)] for t, row in enumerate(programs)]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        widths[-1] = 0  # no padding after the last column
        return "\n".join(" | ".join(f"{c:<{w}}" for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _messages(messages: Iterable[Message]) -> str:
    return ",".join(f"{a}>{b}" for a, b in messages)


def _offset(delta: int) -> str:
    return "t" if delta == 0 else f"t{delta:+d}"


# -- what a step runs as ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Signals:
    """What a step's kind depends on beyond its index (Note [step decision]): measured by the
    engine before it decides, the same on every rank."""

    new_loop: bool = False  # the step's first call has another signature than the loop's (Note [a second loop])
    new_branch: bool = False  # this branch (or its signature) has no stale values yet (Note [late branches])
    drift: float | None = None  # how far the boundary values moved over the last step (Note [adaptive refresh])
    drift_limit: float | None = None
    error: float | None = None  # this step's predicted error (Note [predicted refresh])
    error_limit: float | None = None


@dataclass(frozen=True)
class StepDecision:
    """A step's index in its loop, its kind, and why: what the engine runs, unchanged after."""

    step: int
    kind: StepKind
    why: str

    def __str__(self) -> str:
        return f"step {self.step} {self.kind} ({self.why})"


def decide_step(schedule: Schedule, step: int, signals: Signals = Signals()) -> StepDecision:
    """Note [step decision]: the kind of ``step`` of ``schedule`` given ``signals``, with the reason.

    Every override the engine makes is here, in order: a new loop starts again at step 0 (so it
    warms up); a branch first met after warm-up runs sequentially (stride 2 cannot: an error);
    an asynchronous step whose boundary values moved more than the limit, or whose predicted
    error is above its limit (Note [predicted refresh]), runs sequentially. Pure: the same inputs give the same decision on every rank.

    Example:
        >>> s = Schedule(model_n=2, warm_up=1)
        >>> str(decide_step(s, 0)), str(decide_step(s, 3))
        ('step 0 warm-up (step 0 < warm_up=1)', 'step 3 async (after warm-up: stale inputs)')
        >>> str(decide_step(s, 3, Signals(drift=0.12, drift_limit=0.05)))
        'step 3 refresh (drift 0.12 > 0.05)'
        >>> str(decide_step(s, 3, Signals(error=0.08, error_limit=0.05)))
        'step 3 refresh (predicted error 0.08 > 0.05)'
    """
    if signals.new_loop and step > 0:
        step, restart = 0, "a new loop (another call signature): "
    else:
        restart = ""
    kind = schedule.kind(step)
    if kind == StepKind.WARM_UP:
        why = f"step {step} < warm_up={max(1, schedule.warm_up)}"
    elif kind == StepKind.REFRESH:
        why = f"refresh_every={schedule.refresh_every}"
    elif kind == StepKind.ASYNC:
        why = "after warm-up: stale inputs"
    else:
        why = "stride 2: " + ("a round, every rank computes" if kind == StepKind.ROUND else "the round's output")
    if signals.new_branch and kind != StepKind.WARM_UP:
        if schedule.stride == 2:
            raise ValueError("this pipeline makes a new kind of denoiser call after the warm-up steps (a call "
                             "with another signature, or an extra call per step, on some steps only); stride 2 "
                             "cannot start it there: use stride=1, or warm_up covering those steps")
        kind, why = StepKind.REFRESH, "a branch without stale values yet (Note [late branches])"
    elif kind == StepKind.ASYNC and signals.drift is not None and signals.drift_limit is not None \
            and signals.drift > signals.drift_limit:
        kind, why = StepKind.REFRESH, f"drift {signals.drift:.3g} > {signals.drift_limit:g}"
    elif kind == StepKind.ASYNC and signals.error is not None and signals.error_limit is not None \
            and signals.error > signals.error_limit:
        kind, why = StepKind.REFRESH, f"predicted error {signals.error:.3g} > {signals.error_limit:g}"
    return StepDecision(step, kind, restart + why)


def needs_drift(schedule: Schedule, step: int, signals: Signals) -> bool:
    """Whether :func:`decide_step` would read a drift measurement (an asynchronous step)."""
    return decide_step(schedule, step, signals).kind == StepKind.ASYNC
