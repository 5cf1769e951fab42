"""The schedule: for each step, whether the stages run one after another or all at once.

Note [stale inputs]: in a *warm-up* step, stage k waits for the values its predecessors computed
at this very step, so the result is exactly the sequential model's. In an *asynchronous* step,
every stage starts at once on the values its predecessors computed at the previous step (stale
by one step) and the step takes max(stage) + communication instead of sum(stage). Each stage
sends each boundary value exactly once per step in both modes; only when it is consumed differs.

Example:
    >>> print(Schedule(n_stages=2, warm_up=2).format(4))
    step | stage 0 | stage 1
       0 |   t     |   t
       1 |   t     |   t
       2 |   t     |   t-1
       3 |   t     |   t-1
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    n_stages: int
    warm_up: int
    stride: int = 1

    def __post_init__(self) -> None:
        if self.n_stages < 1:
            raise ValueError(f"n_stages={self.n_stages} must be >= 1")
        if self.warm_up < 0:
            raise ValueError(f"warm_up={self.warm_up} must be >= 0 (the number of sequential steps)")
        if self.stride != 1:
            raise ValueError(f"stride={self.stride}: this schedule implements stride 1; use stride=1")

    def synchronous(self, step: int) -> bool:
        """Whether stages wait for this step's values from their predecessors (warm-up)."""
        return step < self.warm_up

    def input_step(self, step: int, stage: int) -> int:
        """The step whose values ``stage`` consumes from other stages at ``step``."""
        return step if stage == 0 or self.synchronous(step) else step - 1

    def format(self, n_steps: int) -> str:
        header = "step | " + " | ".join(f"stage {k}" for k in range(self.n_stages))
        rows = [header]
        for t in range(n_steps):
            cells = ["t" if self.input_step(t, k) == t else "t-1" for k in range(self.n_stages)]
            rows.append(f"{t:>4} | " + " | ".join(f"  {c:<5}" for c in cells).rstrip())
        return "\n".join(rows)
