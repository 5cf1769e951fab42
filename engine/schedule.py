"""The schedule: for each step and rank, what runs, on which stale inputs, at which timestep.

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

Example:
    >>> print(Schedule(n_stages=2, warm_up=2).format(4))
    step | rank 0       | rank 1
       0 | t            | t
       1 | t            | t
       2 | t            | t (in t-1)
       3 | t            | t (in t-1)
    >>> print(Schedule(n_stages=2, warm_up=1, stride=2).format(5))
    step | rank 0       | rank 1       | rank 2
       0 | t            | t            | -
       1 | t+1          | t+1 (in t-1) | t (in t-1)
       2 | -            | -            | -
       3 | t+1          | t+1 (in t-2) | t (in t-2)
       4 | -            | -            | -
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule", "StepKind"]


class StepKind:
    WARM_UP = "warm-up"
    ASYNC = "async"  # stride 1 after warm-up
    REFRESH = "refresh"  # stride 1: a sequential step after warm-up (refresh_every)
    ROUND = "round"  # stride 2: every rank computes once
    REUSE = "reuse"  # stride 2: no compute, the last stage's round output is this step's


@dataclass(frozen=True)
class Schedule:
    n_stages: int
    warm_up: int
    stride: int = 1
    time_shift: bool = False
    refresh_every: int | None = None

    def __post_init__(self) -> None:
        if self.n_stages < 1:
            raise ValueError(f"n_stages={self.n_stages} must be >= 1")
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
        return self.n_stages + self.stride - 1

    def kind(self, step: int) -> str:
        if step < max(1, self.warm_up):
            return StepKind.WARM_UP
        if self.stride == 1:
            after = step - max(1, self.warm_up) + 1
            if self.refresh_every and after % self.refresh_every == 0:
                return StepKind.REFRESH
            return StepKind.ASYNC
        return StepKind.ROUND if (step - max(1, self.warm_up)) % 2 == 0 else StepKind.REUSE

    def synchronous(self, step: int) -> bool:
        """Whether stages wait for this step's values from their predecessors (warm-up, refresh)."""
        return self.kind(step) in (StepKind.WARM_UP, StepKind.REFRESH)

    def timestep_step(self, step: int, rank: int) -> int:
        """Which step's timestep ``rank`` computes with at ``step`` (Note [stride 2], time shift)."""
        kind = self.kind(step)
        if self.synchronous(step):
            return step
        shift = 1 if self.time_shift else 0
        if kind == StepKind.ROUND and rank < self.n_stages:
            return step + 1 - shift
        return step - shift

    def input_step(self, step: int, rank: int) -> int | None:
        """The step whose values ``rank`` consumes from other stages at ``step`` (None: no compute)."""
        kind = self.kind(step)
        if self.synchronous(step):
            return step if rank < self.n_stages else None
        if kind == StepKind.REUSE:
            return None
        if rank == 0:
            return step
        first = max(1, self.warm_up)  # the first step after warm-up
        previous = step - self.stride  # the previous computing step
        return previous if previous >= first else first - 1

    def format(self, n_steps: int) -> str:
        """A step x rank grid: the timestep each rank computes with, and (in ...) the step its
        values from other stages come from when that is not this step; ``-``: no compute."""
        rows = ["step | " + " | ".join(f"{f'rank {r}':<12}" for r in range(self.n_ranks)).rstrip()]
        for t in range(n_steps):
            cells = []
            for r in range(self.n_ranks):
                source = self.input_step(t, r)
                if source is None:
                    cells.append("-")
                    continue
                cell = _offset(self.timestep_step(t, r) - t)
                if source != t:
                    cell += f" (in {_offset(source - t)})"
                cells.append(cell)
            rows.append(f"{t:>4} | " + " | ".join(f"{c:<12}" for c in cells).rstrip())
        return "\n".join(rows)


def _offset(delta: int) -> str:
    return "t" if delta == 0 else f"t{delta:+d}"
